"""Runs AgencyGPT2's head dynamics inside any `transformers.Trainer` loop."""

from typing import Optional

import torch
from transformers import TrainerCallback


def find_agency_model(model):
    """The AgencyGPT2 model inside `model` (which may be wrapped by PEFT or DDP), or None."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "agency_step") and hasattr(getattr(model, "base_model", None), "head_gates"):
            return model
        model = getattr(model, "module", None) or getattr(model, "base_model", None) or getattr(model, "model", None)
    return None


class AgencyCallback(TrainerCallback):
    """Gate gradients -> importance after every backward; every `config.controller_update_frequency` optimizer
    steps, refresh utilization on `utilization_batch` (if given), update agency states and let the controller move
    gates (after `config.controller_warmup_steps`). The latest counts are kept in `self.history`.

    >>> trainer = Trainer(model=agency_model, args=args, train_dataset=ds, callbacks=[AgencyCallback(calib_batch)])
    """

    def __init__(self, utilization_batch: Optional[dict] = None):
        self.utilization_batch = utilization_batch
        self.history = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        agency = find_agency_model(model)
        if agency is not None:
            agency.observe_gate_gradients()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        agency = find_agency_model(model)
        if agency is None or state.global_step % agency.config.controller_update_frequency != 0:
            return
        if self.utilization_batch is not None:
            batch = {k: v.to(agency.device) if isinstance(v, torch.Tensor) else v
                     for k, v in self.utilization_batch.items()}
            agency.measure_utilization(batch["input_ids"], batch.get("attention_mask"))
        agency.update_agency_states()
        moved = agency.controller_step(state.global_step)
        self.history.append({"step": state.global_step, **moved, **agency.agency_report()["counts"]})
