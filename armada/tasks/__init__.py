"""Seeded tasks for memory models (UnifiedARMT): retrieval, patterns, multi-hop pointers, bAbI, BABILong.

Synthetic tasks (`MemoryRetrieval`, `PatternReasoning`, `MultiHop`) write integer ids in a small `TaskVocab`;
their samples are `{"input_ids", "labels", "answer", "answer_start"}` with the answer span at the very end and
`labels` = -100 everywhere except on it (the HF causal-LM convention: the model shifts internally). Text tasks
(`BabiTask`, `BabiLong`, `load_babilong_hf`) give `{"context", "question", "answer": str, ...}`;
`tokenize_sample` turns one into the same ids/labels format.

    >>> task = MultiHop(n_hops=2, n_distractors=8)
    >>> train = build_dataset(task, 10_000, seed=0)               # datasets.Dataset for transformers.Trainer
    >>> collator = TaskCollator(task.vocab.tokenizer())
    >>> harder = task.with_difficulty(n_hops=3, chain_length=4)   # for a curriculum stage

Modules: `base` (TaskVocab, the task base class), `synthetic` (MemoryRetrieval, PatternReasoning, MultiHop),
`babi` (BabiTask and its world), `babilong` (BabiLong, load_babilong_hf), `collation` (tokenize_sample,
build_dataset, TaskCollator), `metrics` (exact_match, answer_accuracy), `streams` (TaskStream, task_curriculum,
DynamicTaskWeights). Everything public is importable from `armada.tasks` directly.

Every generator is a dataclass whose fields are its difficulty knobs, validated on construction;
`generate(n, seed)` draws from its own `random.Random(seed)`, so the same seed gives the same samples.
"""

from .babi import (
    BABI_TASKS,
    DIRECTIONS,
    DROP_VERBS,
    GIVE_VERBS,
    GRAB_VERBS,
    LOCATIONS,
    MOVE_VERBS,
    OBJECTS,
    OPPOSITE,
    PEOPLE,
    BabiTask,
)
from .babilong import BabiLong, load_babilong_hf
from .base import DEFAULT_BACKGROUND, IGNORE_INDEX, TaskVocab
from .collation import TaskCollator, build_dataset, tokenize_sample
from .metrics import answer_accuracy, exact_match
from .streams import DynamicTaskWeights, TaskStream, task_curriculum
from .synthetic import PATTERN_RULES, MemoryRetrieval, MultiHop, PatternReasoning

__all__ = [
    "BABI_TASKS", "DIRECTIONS", "DROP_VERBS", "GIVE_VERBS", "GRAB_VERBS", "LOCATIONS", "MOVE_VERBS", "OBJECTS",
    "OPPOSITE", "PEOPLE", "PATTERN_RULES", "DEFAULT_BACKGROUND", "IGNORE_INDEX", "TaskVocab", "MemoryRetrieval",
    "PatternReasoning", "MultiHop", "BabiTask", "BabiLong", "load_babilong_hf", "tokenize_sample", "build_dataset",
    "TaskCollator", "exact_match", "answer_accuracy", "TaskStream", "task_curriculum", "DynamicTaskWeights",
]
