"""Log the parts of a model's loss next to `loss`, plus the thought norm and peak memory.

`Trainer` logs one number per step, the loss. A ThoughtDiffusion output carries its parts (`diffusion_loss`,
`elbo`, the auxiliary thought terms, `mask_rate`) and the new thought; this mixin averages them over the steps since
the last log and adds them to the same log record (console, tensorboard, `trainer_state.json`), with
`thought_norm` (mean L2 norm of the new thoughts) and `peak_memory_mib` (CUDA peak allocated, else the process's
peak resident set). `Trainer.log` has no hook for this, hence a subclass.
"""

import resource
from collections import defaultdict

import torch
from transformers import Trainer

from .curriculum import CurriculumTrainer

LOSS_PARTS = ("diffusion_loss", "elbo", "thought_loss", "thought_consistency", "thought_diversity",
              "thought_sparsity", "mask_rate")


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class LossPartsLoggingMixin:
    loss_parts = LOSS_PARTS

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            sums = self.__dict__.setdefault("_part_sums", defaultdict(float))
            for name in self.loss_parts:
                value = outputs.get(name) if hasattr(outputs, "get") else None
                if value is not None:
                    sums[name] += float(value.detach()) if torch.is_tensor(value) else float(value)
            thought = outputs.get("new_thought") if hasattr(outputs, "get") else None
            if thought is not None:
                sums["thought_norm"] += float(thought.detach().flatten(1).norm(dim=-1).mean())
            sums["_count"] += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        sums = self.__dict__.get("_part_sums")
        if "loss" in logs and sums and sums["_count"]:
            count = sums.pop("_count")
            logs.update({name: round(total / count, 5) for name, total in sums.items()})
            logs["peak_memory_mib"] = round(peak_memory_mib(), 1)
            sums.clear()
        super().log(logs, *args, **kwargs)


class DiffusionTrainer(LossPartsLoggingMixin, Trainer):
    """`Trainer` that logs the loss parts."""


class DiffusionCurriculumTrainer(LossPartsLoggingMixin, CurriculumTrainer):
    """`CurriculumTrainer` that logs the loss parts."""


__all__ = ["LossPartsLoggingMixin", "DiffusionTrainer", "DiffusionCurriculumTrainer", "LOSS_PARTS", "peak_memory_mib"]
