"""Knowledge distillation as a plain `Trainer` subclass (Hinton et al. 2015).

loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)),

both parts averaged over the label tokens. The teacher is frozen and runs in eval mode without gradients on the
student's device; student and teacher may differ in shape (e.g. a pruned student and its full teacher) as long as
they share the vocabulary.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import Trainer


class DistillationTrainer(Trainer):
    def __init__(self, *args, teacher_model=None, alpha: float = 0.5, temperature: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs teacher_model=... (a frozen causal LM sharing the vocabulary).")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (weight of the label loss), got {alpha!r}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        student_vocab = self.model.get_output_embeddings().weight.shape[0]
        teacher_vocab = teacher_model.get_output_embeddings().weight.shape[0]
        if student_vocab != teacher_vocab:
            raise ValueError(f"Teacher and student vocabularies differ ({teacher_vocab} vs {student_vocab} logits); "
                             "distillation needs the same vocabulary.")
        self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature
        self._parts = {"ce": 0.0, "kd": 0.0, "tokens": 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch: Optional[torch.Tensor] = None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs, use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs, use_cache=False).logits

        logits = outputs.logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != -100
        ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                 reduction="sum")
        T = self.temperature
        student_log_probs = F.log_softmax(logits / T, dim=-1)
        teacher_log_probs = F.log_softmax(teacher_logits[:, :-1].float() / T, dim=-1)
        kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
        kd_sum = (T * T) * (kl * mask).sum()

        tokens = mask.sum()
        # With gradient accumulation, Trainer passes the label-token count of the whole accumulated batch.
        denominator = num_items_in_batch if num_items_in_batch is not None else tokens.clamp_min(1)
        loss = (self.alpha * ce_sum + (1 - self.alpha) * kd_sum) / denominator
        if model.training:
            self._parts["ce"] += ce_sum.item()
            self._parts["kd"] += kd_sum.item()
            self._parts["tokens"] += int(tokens)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._parts["tokens"]:
            logs["loss_ce"] = round(self._parts["ce"] / self._parts["tokens"], 4)
            logs["loss_kd"] = round(self._parts["kd"] / self._parts["tokens"], 4)
            self._parts = {"ce": 0.0, "kd": 0.0, "tokens": 0}
        super().log(logs, start_time)


__all__ = ["DistillationTrainer"]
