"""BABILong: bAbI facts hidden in long background text (sentences of ../shared/data/tinyshakespeare by default),
and the Hub's RMT-team/babilong when it is reachable."""

import os
import re
import weakref
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any, Optional

from datasets import Dataset, load_dataset

from .babi import BabiTask
from .base import DEFAULT_BACKGROUND, _check_ints, _Task


@lru_cache(maxsize=1)
def _default_tokenizer():
    from .tokenization import gpt2_tokenizer

    return gpt2_tokenizer()


_SENTENCE_COUNTS = weakref.WeakKeyDictionary()   # tokenizer -> {background path: token count of each sentence}


@lru_cache(maxsize=4)
def _background_sentences(path: str) -> tuple:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"\s+", " ", f.read()).strip()
    sentences = tuple(s for s in re.split(r"(?<=[.!?;])\s+", text) if s)
    if not sentences:
        raise ValueError(f"Background text file {path!r} is empty.")
    return sentences


@dataclass
class BabiLong(_Task):
    """BABILong-style samples: the facts of a `BabiTask` story, in order, spread at random places in background
    text (consecutive sentences from `background_path`, any text file, default ../shared/data/tinyshakespeare) until
    the context is `target_length` tokens of `tokenizer` (default GPT-2 BPE). The question comes after the context.

    The context has exactly `target_length` tokens up to a few tokens where sentences join (`n_tokens` in each
    sample gives the count); the last background sentence is cut to fit. Sample: BabiTask's keys + `n_tokens`.
    """

    babi: BabiTask = field(default_factory=BabiTask)
    target_length: int = 1024
    background_path: Optional[str] = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    is_text = True

    def __post_init__(self):
        if not isinstance(self.babi, BabiTask):
            raise ValueError(f"babi must be a BabiTask, got {type(self.babi).__name__}.")
        _check_ints(self, 1, "target_length")
        path = self.background
        if self.background_path is None and not os.path.isfile(path):
            raise FileNotFoundError("BabiLong's default background text (tinyshakespeare, in ../shared/data beside a "
                                    "checkout of armada) is not here, as in an installed armada; pass "
                                    "background_path= any long text file.")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Background text file {path!r} not found; pass background_path= any text file "
                                    "(e.g. ../shared/data/wikitext-2/valid.txt or tinyshakespeare/input.txt).")

    def with_difficulty(self, **changes):
        """As for every task, plus the story's knobs directly: `with_difficulty(target_length=4096, n_facts=4)`
        changes `babi` too (so one curriculum stage can set both)."""
        own, story_knobs = [f.name for f in fields(self)], [f.name for f in fields(BabiTask)]
        unknown = sorted(set(changes) - set(own) - set(story_knobs))
        if unknown:
            raise ValueError(f"BabiLong has no knob {unknown}; knobs: {own}, and the story's: {story_knobs}.")
        story = {k: changes.pop(k) for k in list(changes) if k in story_knobs}
        task = super().with_difficulty(**changes)
        return replace(task, babi=task.babi.with_difficulty(**story)) if story else task

    @property
    def background(self) -> str:
        return os.path.normpath(self.background_path or DEFAULT_BACKGROUND)

    def _tok(self):
        return self.tokenizer if self.tokenizer is not None else _default_tokenizer()

    def count_tokens(self, texts: list) -> list:
        ids = self._tok()(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def _sentence_counts(self) -> list:
        """Tokens of every background sentence (as " " + sentence), counted once per tokenizer and file."""
        per_tokenizer = _SENTENCE_COUNTS.setdefault(self._tok(), {})
        if self.background not in per_tokenizer:
            sentences = [" " + s for s in _background_sentences(self.background)]
            per_tokenizer[self.background] = self.count_tokens(sentences)
        return per_tokenizer[self.background]

    def _cut(self, sentence: str, n: int) -> str:
        """The longest prefix of `sentence` that is at most `n` tokens (as " " + sentence)."""
        text = " " + sentence
        offsets = self._tok()(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text[:offsets[n - 1][1]].strip() if n > 0 else ""

    def sample(self, rng):
        story = self.babi.sample(rng)
        facts = story["facts"]
        budget = self.target_length - sum(self.count_tokens([" " + f for f in facts]))
        if budget < 0:
            raise ValueError(f"target_length={self.target_length} is smaller than the facts' length "
                             f"({self.target_length - budget} tokens); raise target_length or lower babi.n_facts.")
        sentences, counts = _background_sentences(self.background), self._sentence_counts()
        i, chosen = rng.randrange(len(sentences)), []
        while budget > 0:   # wraps around a short file
            batch = [(i + j) % len(sentences) for j in range(64)]
            i += 64
            for sentence, n in zip((sentences[j] for j in batch), (counts[j] for j in batch)):
                if n > budget:
                    sentence, n = self._cut(sentence, budget), budget
                if sentence:
                    chosen.append(sentence)
                budget -= n
                if budget <= 0:
                    break
        where = sorted(rng.randrange(len(chosen) + 1) for _ in facts)
        pieces, f = [], 0
        for k in range(len(chosen) + 1):
            while f < len(facts) and where[f] == k:
                pieces.append(facts[f])
                f += 1
            if k < len(chosen):
                pieces.append(chosen[k])
        context = " ".join(pieces)
        return {**story, "context": context, "n_tokens": self.count_tokens([context])[0]}


def load_babilong_hf(task: str = "qa1", split: str = "1k", name: str = "RMT-team/babilong", n: Optional[int] = None,
                     **load_kwargs) -> Dataset:
    """The real BABILong benchmark through `datasets.load_dataset(name, split, split=task)` (on the Hub, configs are
    context lengths "0k", "1k", "2k", "4k", ... and splits are tasks "qa1".."qa20"). Columns are renamed to this
    module's format: input -> context, question -> question, target -> answer; score with `exact_match`.
    Needs internet access or a local `datasets` cache.
    """
    if not re.fullmatch(r"qa([1-9]|1\d|20)", str(task)):
        raise ValueError(f"Unknown BABILong task {task!r}; allowed: qa1 .. qa20.")
    try:
        dataset = load_dataset(name, split, split=task, **load_kwargs)
    except Exception as err:
        raise RuntimeError(f"Could not load BABILong ({name!r}, length {split!r}, task {task!r}): "
                           f"{type(err).__name__}: {err}. It needs internet access or a local datasets cache; "
                           "offline, generate samples with BabiLong(...) instead.") from err
    missing = {"input", "question", "target"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{name!r} has no column(s) {sorted(missing)}; columns: {dataset.column_names}.")
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    dataset = dataset.select_columns(["input", "question", "target"])
    return dataset.rename_columns({"input": "context", "target": "answer"})
