"""Trainer integrations. Distillation and curriculum trainers land here next (see the issue tracker)."""

from .agency_callback import AgencyCallback, find_agency_model

__all__ = ["AgencyCallback", "find_agency_model"]
