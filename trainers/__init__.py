"""Trainer integrations: agency dynamics callback, distillation, curriculum, loss-part logging."""

from .agency_callback import AgencyCallback, find_agency_model
from .curriculum import (
    Curriculum,
    CurriculumCallback,
    CurriculumStage,
    CurriculumTrainer,
    config_stage,
    finalize_pruning,
    mask_heads_to_level,
    pruning_curriculum,
)
from .distillation import DistillationTrainer
from .loss_parts import DiffusionCurriculumTrainer, DiffusionTrainer, LossPartsLoggingMixin

__all__ = [
    "AgencyCallback",
    "Curriculum",
    "CurriculumCallback",
    "CurriculumStage",
    "CurriculumTrainer",
    "DiffusionCurriculumTrainer",
    "DiffusionTrainer",
    "LossPartsLoggingMixin",
    "config_stage",
    "DistillationTrainer",
    "finalize_pruning",
    "find_agency_model",
    "mask_heads_to_level",
    "pruning_curriculum",
]
