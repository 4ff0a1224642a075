"""Curriculum learning as a plain `Trainer` subclass.

A `Curriculum` is a list of `CurriculumStage`s. Each stage changes something when it begins (its `apply(trainer)`:
pruning level, task difficulty, sequence length, noise schedule, ...) and ends when its step budget is spent or
when an evaluation metric crosses its threshold, whichever comes first. The current stage and the history of past
stages are saved in every checkpoint (`trainer_state.json`, `stateful_callbacks`) and restored by
`train(resume_from_checkpoint=...)`; a stage's `apply` must therefore be idempotent, because it runs again when
training resumes inside that stage.

The first user is the pruning curriculum for AgencyGPT2 (`pruning_curriculum`): during training, heads are
withdrawn through the consent mask (shapes stay fixed, so optimizers, DDP and checkpoints are untouched); after
training, `finalize_pruning(model)` removes the withdrawn heads physically.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from .agency_callback import find_agency_model


@dataclass
class CurriculumStage:
    """One stage. `apply(trainer)` runs when the stage begins; the stage ends after `max_steps` optimizer steps or
    at the first evaluation where `metric` (a key of the eval metrics, e.g. "eval_accuracy") passes `threshold`."""

    name: str
    apply: Optional[Callable] = None
    max_steps: Optional[int] = None
    metric: Optional[str] = None
    threshold: Optional[float] = None
    greater_is_better: bool = True
    params: dict = field(default_factory=dict)

    def reached(self, metrics: dict) -> bool:
        if self.metric is None or self.metric not in metrics:
            return False
        value = metrics[self.metric]
        return value >= self.threshold if self.greater_is_better else value <= self.threshold


class Curriculum:
    def __init__(self, stages: Sequence[CurriculumStage]):
        stages = list(stages)
        if not stages:
            raise ValueError("A curriculum needs at least one stage.")
        by_metric = {}
        for i, stage in enumerate(stages):
            if stage.max_steps is not None and (not isinstance(stage.max_steps, int) or stage.max_steps < 1):
                raise ValueError(f"Stage {stage.name!r}: max_steps must be a positive integer, "
                                 f"got {stage.max_steps!r}.")
            if (stage.metric is None) != (stage.threshold is None):
                raise ValueError(f"Stage {stage.name!r}: give both metric and threshold, or neither.")
            if stage.max_steps is None and stage.metric is None and i < len(stages) - 1:
                raise ValueError(f"Stage {stage.name!r} can never end: give it max_steps and/or a metric threshold "
                                 "(only the last stage may run until training stops).")
            if stage.metric is not None:
                by_metric.setdefault((stage.metric, stage.greater_is_better), []).append((stage.name, stage.threshold))
        for (metric, greater), thresholds in by_metric.items():
            values = [t for _, t in thresholds]
            ordered = all(b >= a for a, b in zip(values, values[1:])) if greater else \
                all(b <= a for a, b in zip(values, values[1:]))
            if not ordered:
                direction = "non-decreasing" if greater else "non-increasing"
                raise ValueError(f"Thresholds on {metric!r} must be {direction} from stage to stage (later stages are "
                                 f"harder); got {thresholds}.")
        self.stages = stages

    def __len__(self):
        return len(self.stages)

    def __getitem__(self, i):
        return self.stages[i]


class CurriculumCallback(TrainerCallback, ExportableState):
    def __init__(self, curriculum: Curriculum, trainer: Optional[Trainer] = None):
        self.curriculum = curriculum
        self.trainer = trainer
        self.stage = 0
        self.stage_start_step = 0
        self.history = []
        self._applied = None

    def state(self) -> dict:
        return {"args": {}, "attributes": {"stage": self.stage, "stage_start_step": self.stage_start_step,
                                           "history": self.history}}

    def restore(self, saved: dict):
        attributes = saved.get("attributes", {})
        self.stage = attributes.get("stage", 0)
        self.stage_start_step = attributes.get("stage_start_step", 0)
        self.history = attributes.get("history", [])
        self._applied = None

    @property
    def finished(self) -> bool:
        return self.stage >= len(self.curriculum)

    def _apply_current(self):
        if self.finished or self._applied == self.stage:
            return
        stage = self.curriculum[self.stage]
        if stage.apply is not None:
            stage.apply(self.trainer)
        self._applied = self.stage

    def _advance(self, state, control, reason: str, metrics: Optional[dict] = None):
        stage = self.curriculum[self.stage]
        self.history.append({"stage": self.stage, "name": stage.name, "params": stage.params, "reason": reason,
                             "start_step": self.stage_start_step, "end_step": state.global_step,
                             "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}})
        self.stage += 1
        self.stage_start_step = state.global_step
        if self.finished:
            control.should_training_stop = True
        else:
            self._apply_current()

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply_current()

    def on_step_end(self, args, state, control, **kwargs):
        if self.finished:
            control.should_training_stop = True
            return
        stage = self.curriculum[self.stage]
        if stage.max_steps is not None and state.global_step - self.stage_start_step >= stage.max_steps:
            self._advance(state, control, "step budget")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.finished and metrics and self.curriculum[self.stage].reached(metrics):
            self._advance(state, control, "threshold", metrics)


class CurriculumTrainer(Trainer):
    """`Trainer` that runs a `Curriculum`. `trainer.curriculum_stage` is the current stage index and
    `trainer.curriculum_history` the finished stages (why each ended, at which step, with which metrics)."""

    def __init__(self, *args, curriculum: Curriculum, **kwargs):
        if not isinstance(curriculum, Curriculum):
            curriculum = Curriculum(curriculum)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        self.curriculum_callback = CurriculumCallback(curriculum)
        super().__init__(*args, callbacks=callbacks + [self.curriculum_callback], **kwargs)
        self.curriculum_callback.trainer = self

    @property
    def curriculum_stage(self) -> int:
        return self.curriculum_callback.stage

    @property
    def curriculum_history(self) -> list:
        return self.curriculum_callback.history

    def train(self, resume_from_checkpoint=None, **kwargs):
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, "trainer_state.json")
            with open(path, encoding="utf-8") as f:
                saved = json.load(f).get("stateful_callbacks", {}).get(CurriculumCallback.__name__)
            if saved is None:
                raise ValueError(f"{path} holds no curriculum state: it was not written by a CurriculumTrainer.")
            self.curriculum_callback.restore(saved[0] if isinstance(saved, list) else saved)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def config_stage(name: str, max_steps: Optional[int] = None, metric: Optional[str] = None,
                 threshold: Optional[float] = None, greater_is_better: bool = True, config=None,
                 **changes) -> CurriculumStage:
    """A stage that sets model config fields when it begins, e.g. for ThoughtDiffusion
    `config_stage("easy", 100, max_train_time=0.5, noise_schedule="cosine", thought_loss_weight=0.0)`: the noise
    schedule, the masking range or the auxiliary-loss weight (the model reads them at every forward). The changed
    config is validated as a whole, up front when `config` is given, else when the stage begins: a bad value raises
    the config's ValueError naming the allowed values."""

    def validated(base):
        return type(base)(**{**base.to_dict(), **changes})

    if config is not None:
        validated(config)

    def apply(trainer):
        config = trainer.model.config
        new = validated(config)
        for key in changes:
            setattr(config, key, getattr(new, key))

    return CurriculumStage(name=name, apply=apply, max_steps=max_steps, metric=metric, threshold=threshold,
                           greater_is_better=greater_is_better, params=dict(changes))


# ---------------------------------------------------------------------------------------------- pruning curriculum


def withdrawn_or_pruned(model) -> torch.Tensor:
    """[n_layer, n_head] bool: heads physically pruned or withdrawn through the consent mask."""
    agency = find_agency_model(model)
    return agency.pruned_head_mask() | (agency.base_model.consent.cpu() == 0)


def mask_heads_to_level(model, level: float, strategy: str = "importance", data=None, per_layer=False, **score_kwargs):
    """Withdraw (consent 0) the lowest-scoring heads until `level` of all heads are withdrawn or pruned."""
    from armada.pruning import score_heads, select_heads

    agency = find_agency_model(model)
    was_training = agency.training
    scores = score_heads(agency, strategy, data, **score_kwargs)
    agency.train(was_training)
    selection = select_heads(scores, level, withdrawn_or_pruned(agency), per_layer=per_layer)
    if selection:
        agency.set_consent(selection, consent=False)
    return selection


def finalize_pruning(model) -> dict:
    """Physically remove every head whose consent is withdrawn; returns `{layer: [heads]}` removed."""
    agency = find_agency_model(model)
    withdrawn = (agency.base_model.consent.cpu() == 0) & ~agency.pruned_head_mask()
    selection = {layer: torch.nonzero(withdrawn[layer]).flatten().tolist()
                 for layer in range(withdrawn.shape[0]) if withdrawn[layer].any()}
    if selection:
        agency.prune_heads(selection)
    return selection


def pruning_curriculum(levels=(0.0, 0.3, 0.5, 0.7), strategy="importance", data=None, steps_per_stage=100,
                       metric: Optional[str] = None, thresholds: Optional[Sequence[float]] = None,
                       greater_is_better=False, **score_kwargs) -> Curriculum:
    """Stages that withdraw heads up to each level in turn, each stage trained for `steps_per_stage` steps (or until
    `metric` reaches its threshold, e.g. metric="eval_loss", thresholds=[3.2, 3.3, 3.4, 3.5])."""
    levels = list(levels)
    if any(b < a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"Pruning levels must be non-decreasing, got {levels}.")
    if thresholds is not None and len(thresholds) != len(levels):
        raise ValueError(f"Give one threshold per level ({len(levels)}), got {len(thresholds)}.")
    stages = []
    for i, level in enumerate(levels):
        def apply(trainer, level=level):
            mask_heads_to_level(trainer.model, level, strategy, data, **score_kwargs)

        stages.append(CurriculumStage(
            name=f"prune {level:.0%}", apply=apply, max_steps=steps_per_stage,
            metric=metric if thresholds is not None else None,
            threshold=thresholds[i] if thresholds is not None else None,
            greater_is_better=greater_is_better, params={"pruning_level": level, "strategy": strategy}))
    return Curriculum(stages)


__all__ = ["CurriculumStage", "Curriculum", "CurriculumCallback", "CurriculumTrainer", "pruning_curriculum",
           "config_stage", "mask_heads_to_level", "finalize_pruning", "withdrawn_or_pruned"]
