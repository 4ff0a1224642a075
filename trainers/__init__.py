"""Trainer integrations. The curriculum trainer lands here next (see the issue tracker)."""

from .agency_callback import AgencyCallback, find_agency_model
from .distillation import DistillationTrainer

__all__ = ["AgencyCallback", "DistillationTrainer", "find_agency_model"]
