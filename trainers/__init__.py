"""Trainer integrations: agency dynamics callback, distillation, curriculum."""

from .agency_callback import AgencyCallback, find_agency_model
from .curriculum import (
    Curriculum,
    CurriculumCallback,
    CurriculumStage,
    CurriculumTrainer,
    finalize_pruning,
    mask_heads_to_level,
    pruning_curriculum,
)
from .distillation import DistillationTrainer

__all__ = [
    "AgencyCallback",
    "Curriculum",
    "CurriculumCallback",
    "CurriculumStage",
    "CurriculumTrainer",
    "DistillationTrainer",
    "finalize_pruning",
    "find_agency_model",
    "mask_heads_to_level",
    "pruning_curriculum",
]
