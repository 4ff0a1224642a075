"""What to train on and how much: an endless `TaskStream`, curricula that make its task harder stage by stage
(`task_curriculum`, a `trainers.Curriculum`), and `DynamicTaskWeights` for multi-task losses. They stay with the
tasks (they need `with_difficulty`, `build_dataset`), so `armada.trainers` stays task-agnostic."""

import math
import random
from typing import Optional

import torch

from .babilong import _default_tokenizer
from .collation import build_dataset, tokenize_sample


class DynamicTaskWeights:
    """Multi-task loss weights proportional to each task's recent loss (an EMA), so lagging tasks get more weight.

    `update(task, loss)` folds a loss into the task's EMA (the first value initializes it); `weights()` gives
    ema_t / sum(ema) over all tasks (a task not yet seen counts as the mean of the seen ones; uniform before any
    update). `combine(losses)` updates with the detached losses, then returns sum_t w_t * loss_t with the weights
    renormalized over the tasks present; the weights are constants for autograd.
    """

    def __init__(self, tasks, momentum: float = 0.9):
        self.tasks = list(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be non-empty and unique, got {self.tasks}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        self.momentum = momentum
        self.ema = {}

    def update(self, task: str, loss) -> None:
        if task not in self.tasks:
            raise ValueError(f"Unknown task {task!r}; tasks: {self.tasks}.")
        value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"Loss of task {task!r} must be finite and >= 0, got {value}.")
        old = self.ema.get(task)
        self.ema[task] = value if old is None else self.momentum * old + (1 - self.momentum) * value

    def weights(self) -> dict:
        default = sum(self.ema.values()) / len(self.ema) if self.ema else 1.0
        raw = {t: self.ema.get(t, default) for t in self.tasks}
        total = sum(raw.values())
        return {t: (r / total if total > 0 else 1.0 / len(raw)) for t, r in raw.items()}

    def combine(self, losses: dict, update: bool = True) -> torch.Tensor:
        if not losses:
            raise ValueError("combine needs at least one task loss.")
        for task, loss in losses.items():
            if update:
                self.update(task, loss)
            elif task not in self.tasks:
                raise ValueError(f"Unknown task {task!r}; tasks: {self.tasks}.")
        weights = self.weights()
        total = sum(weights[t] for t in losses)
        return sum(weights[t] / total * loss for t, loss in losses.items())




class TaskStream(torch.utils.data.IterableDataset):
    """An endless stream of fresh samples from `task` (ids/labels only), for `Trainer(train_dataset=stream)` with
    `max_steps`. `stream.task` may be replaced while training runs (a curriculum stage does it): later batches come
    from the new task. Each pass restarts a seeded RNG; with several dataloader workers each gets its own seed."""

    def __init__(self, task, seed: int = 0, tokenizer=None, max_length: Optional[int] = None):
        super().__init__()
        self.task, self.seed, self.tokenizer, self.max_length = task, seed, tokenizer, max_length
        self.epoch = 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(hash((self.seed, self.epoch, info.id if info else 0)))
        self.epoch += 1
        while True:
            sample = self.task.sample(rng)
            if self.task.is_text:
                tokenizer = self.tokenizer if self.tokenizer is not None else _default_tokenizer()
                sample = tokenize_sample(sample, tokenizer, self.max_length)
            yield {"input_ids": sample["input_ids"], "labels": sample["labels"]}


def task_curriculum(stream: TaskStream, difficulties: list, steps_per_stage=None,
                    metric: Optional[str] = None, thresholds: Optional[list] = None, eval_samples: int = 0,
                    greater_is_better: bool = True):
    """A `trainers.Curriculum` whose stages make `stream.task` harder: stage i sets
    `stream.task = base.with_difficulty(**difficulties[i])` and, if `eval_samples`, gives the trainer an eval set of
    that difficulty. A stage ends after `steps_per_stage` steps (one int for all stages, or a list with one per
    stage; None: no step budget) or when `metric` (e.g. "eval_accuracy", see `answer_accuracy`) reaches
    `thresholds[i]` (None: the stage has no threshold, e.g. the last one, which runs until training stops).

        >>> stream = TaskStream(MultiHop(n_hops=1, chain_length=4))
        >>> curriculum = task_curriculum(stream, [{"n_hops": 1}, {"n_hops": 2}, {"n_hops": 4}],
        ...                              steps_per_stage=500, metric="eval_accuracy", thresholds=[0.8, 0.8, 0.8])
    """
    from ..trainers import Curriculum, CurriculumStage  # imported here: armada.trainers imports transformers.Trainer

    if not difficulties:
        raise ValueError("task_curriculum needs at least one difficulty (a dict of knob changes).")
    if thresholds is not None and len(thresholds) != len(difficulties):
        raise ValueError(f"Give one threshold per stage ({len(difficulties)}), got {len(thresholds)}.")
    if isinstance(steps_per_stage, (list, tuple)):
        if len(steps_per_stage) != len(difficulties):
            raise ValueError(f"Give one steps_per_stage per stage ({len(difficulties)}), got {len(steps_per_stage)}.")
        stage_steps = list(steps_per_stage)
    else:
        stage_steps = [steps_per_stage] * len(difficulties)
    base = stream.task
    tasks = [base.with_difficulty(**changes) for changes in difficulties]  # validates every stage up front
    stages = []
    for i, (changes, task) in enumerate(zip(difficulties, tasks)):
        def apply(trainer, task=task, i=i):
            stream.task = task
            if eval_samples:
                trainer.eval_dataset = build_dataset(task, eval_samples, seed=10_000 + i,
                                                     tokenizer=stream.tokenizer).select_columns(["input_ids",
                                                                                                 "labels"])
        name = ", ".join(f"{k}={v}" for k, v in changes.items()) or "base"
        stages.append(CurriculumStage(name=name, apply=apply, max_steps=stage_steps[i],
                                      metric=metric if thresholds is not None and thresholds[i] is not None
                                      else None,
                                      threshold=thresholds[i] if thresholds is not None else None,
                                      greater_is_better=greater_is_better, params=dict(changes)))
    return Curriculum(stages)
