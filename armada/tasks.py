"""Seeded synthetic tasks for memory models (UnifiedARMT): retrieval, patterns, multi-hop pointers, bAbI, BABILong.

Synthetic tasks (`MemoryRetrieval`, `PatternReasoning`, `MultiHop`) write integer ids in a small `TaskVocab`;
their samples are `{"input_ids", "labels", "answer", "answer_start"}` with the answer span at the very end and
`labels` = -100 everywhere except on it (the HF causal-LM convention: the model shifts internally). Text tasks
(`BabiTask`, `BabiLong`, `load_babilong_hf`) give `{"context", "question", "answer": str, ...}`;
`tokenize_sample` turns one into the same ids/labels format.

    >>> task = MultiHop(n_hops=2, n_distractors=8)
    >>> train = build_dataset(task, 10_000, seed=0)               # datasets.Dataset for transformers.Trainer
    >>> collator = TaskCollator(task.vocab.tokenizer())
    >>> harder = task.with_difficulty(n_hops=3, chain_length=4)   # for a curriculum stage

Every generator is a dataclass whose fields are its difficulty knobs, validated on construction;
`generate(n, seed)` draws from its own `random.Random(seed)`, so the same seed gives the same samples.
"""

import math
import os
import random
import re
import weakref
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any, Callable, Optional

import torch
from datasets import Dataset, load_dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast

IGNORE_INDEX = -100
DEFAULT_BACKGROUND = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "..", "shared", "data", "tinyshakespeare", "input.txt")


def _check_ints(obj, minimum: int, *names):
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{type(obj).__name__}.{name} must be an integer >= {minimum}, got {value!r}.")


# ----------------------------------------------------------------------------------------------------- vocabulary

@dataclass(frozen=True)
class TaskVocab:
    """Ids of the synthetic tasks: 7 reserved ids, then `n_symbols` symbols (symbol i has id 7 + i).

    The layout is the same for every task, so one model with `vocab_size >= max(task.vocab.vocab_size)` can train
    on all of them at once.
    """

    n_symbols: int
    SPECIALS = ("<pad>", "<bos>", "<sep>", "<key>", "<query>", "<answer>", "<unk>")
    PAD, BOS, SEP, KEY, QUERY, ANSWER, UNK = range(7)

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + self.n_symbols

    def symbol(self, i: int) -> int:
        return len(self.SPECIALS) + i

    def value(self, token_id: int) -> int:
        """Inverse of `symbol`."""
        return token_id - len(self.SPECIALS)

    def decode(self, ids) -> str:
        return " ".join(self.SPECIALS[i] if i < len(self.SPECIALS) else str(self.value(i)) for i in ids)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """A word-level HF tokenizer over this vocab ("<bos> 3 17 <answer> 5"), for padding, decoding and saving."""
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {name: i for i, name in enumerate(self.SPECIALS)}
        vocab.update({str(i): self.symbol(i) for i in range(self.n_symbols)})
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                       sep_token="<sep>", unk_token="<unk>", padding_side="right",
                                       model_input_names=["input_ids", "attention_mask"])


class _Task:
    """Shared by every generator: `generate(n, seed)` and `with_difficulty(**changes)`."""

    is_text = False

    def sample(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def generate(self, n: int, seed: int = 0) -> list:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}.")
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]

    def with_difficulty(self, **changes):
        """A copy with some knobs changed (validated again), e.g. `task.with_difficulty(n_hops=3)`."""
        names = [f.name for f in fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no knob {unknown}; knobs: {names}.")
        return replace(self, **changes)


def _ids_sample(prompt: list, answer: list, supervised: tuple = ()) -> dict:
    """Labels are -100 except on the answer and on the prompt positions in `supervised` (extra training signal:
    earlier queries' answers, or shown terms the rule determines). `answer`/`answer_start` are the final answer."""
    start = len(prompt)
    labels = [IGNORE_INDEX] * start + answer
    for i in supervised:
        labels[i] = prompt[i]
    return {"input_ids": prompt + answer, "labels": labels, "answer": answer, "answer_start": start}


# ----------------------------------------------------------------------------------------------- synthetic tasks

@dataclass
class MemoryRetrieval(_Task):
    """Key -> value markers scattered in random distractor tokens; then a query for one key, answered by its value.

    Layout: `<bos> [context_length tokens: distractors and n_pairs "<key> k.. v.."] <query> k.. <answer> v..`.
    With `n_queries` > 1 the final query is preceded by n_queries - 1 more `<query> k.. <answer> v..` about other
    keys (all distinct), whose values are labeled too: n_queries training signals per sample instead of one. Keep
    n_queries well below n_pairs: the final answer is never among the earlier ones, so with n_queries = n_pairs it
    is the one value not yet given, a shortcut around memory.
    """

    context_length: int = 128
    n_pairs: int = 4
    key_length: int = 1
    value_length: int = 1
    n_symbols: int = 64
    n_queries: int = 1

    def __post_init__(self):
        _check_ints(self, 1, "context_length", "n_pairs", "key_length", "value_length", "n_symbols", "n_queries")
        if self.n_queries > self.n_pairs:
            raise ValueError(f"n_queries={self.n_queries} asks about distinct keys, so it must be <= n_pairs "
                             f"({self.n_pairs}).")
        block = 1 + self.key_length + self.value_length
        if self.n_pairs * block > self.context_length:
            raise ValueError(
                f"n_pairs={self.n_pairs} key/value pairs take {self.n_pairs * block} tokens ({block} each: marker, "
                f"key, value) but context_length is {self.context_length}; allowed: n_pairs <= "
                f"{self.context_length // block}, or a longer context.")
        if self.n_symbols ** self.key_length < self.n_pairs:
            raise ValueError(f"n_pairs={self.n_pairs} distinct keys need n_symbols ** key_length >= n_pairs, got "
                             f"{self.n_symbols} ** {self.key_length}.")

    @property
    def vocab(self) -> TaskVocab:
        return TaskVocab(self.n_symbols)

    def _digits(self, k: int, length: int) -> list:
        return [self.vocab.symbol((k // self.n_symbols ** i) % self.n_symbols) for i in range(length)]

    def sample(self, rng):
        v, block = self.vocab, 1 + self.key_length + self.value_length
        keys = [self._digits(k, self.key_length) for k in rng.sample(range(self.n_symbols ** self.key_length),
                                                                       self.n_pairs)]
        values = [[v.symbol(rng.randrange(self.n_symbols)) for _ in range(self.value_length)] for _ in keys]
        n_filler = self.context_length - self.n_pairs * block
        slots = set(rng.sample(range(n_filler + self.n_pairs), self.n_pairs))
        context, pair = [], 0
        for i in range(n_filler + self.n_pairs):
            if i in slots:
                context += [v.KEY] + keys[pair] + values[pair]
                pair += 1
            else:
                context.append(v.symbol(rng.randrange(self.n_symbols)))
        *earlier, q = rng.sample(range(self.n_pairs), self.n_queries)
        prompt, supervised = [v.BOS] + context, []
        for e in earlier:
            prompt += [v.QUERY] + keys[e] + [v.ANSWER]
            supervised += range(len(prompt), len(prompt) + self.value_length)
            prompt += values[e]
        return _ids_sample(prompt + [v.QUERY] + keys[q] + [v.ANSWER], values[q], supervised)


PATTERN_RULES = ("arithmetic", "fibonacci", "geometric", "custom")


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


@dataclass
class PatternReasoning(_Task):
    """Continue a sequence mod `modulus`: `<bos> x_0 .. x_{n_shown-1} <answer> x_{n_shown} .. (n_predict terms)`.

    rule "arithmetic": x_k = a + k*d; "fibonacci": x_n = x_{n-1} + x_{n-2}; "geometric": x_k = a * r^k (needs a
    prime modulus so the ratio is identifiable); "custom": either `coefficients` (c_1..c_m: x_n = sum_i c_i x_{n-i})
    or `rule_fn(history) -> int` with `order` random first terms. Everything is mod `modulus`; a, d, r and the
    first terms are drawn per sample. Symbol i stands for the number i. `label_shown=True` also labels every shown
    term the rule determines (from index 2, or the recurrence order, on): up to n_shown - 1 training signals per sample.
    """

    rule: str = "arithmetic"
    modulus: int = 31
    n_shown: int = 8
    n_predict: int = 1
    coefficients: Optional[tuple] = None
    rule_fn: Optional[Callable] = None
    order: int = 2
    n_symbols: Optional[int] = None   # vocab symbols; defaults to `modulus` (larger to share a vocab across tasks)
    label_shown: bool = False

    def __post_init__(self):
        if not isinstance(self.label_shown, bool):
            raise ValueError(f"label_shown must be True or False, got {self.label_shown!r}.")
        if self.rule not in PATTERN_RULES:
            raise ValueError(f"Unknown rule {self.rule!r}; allowed: {', '.join(PATTERN_RULES)}.")
        _check_ints(self, 2, "modulus")
        _check_ints(self, 1, "n_shown", "n_predict", "order")
        if self.n_symbols is not None and (not isinstance(self.n_symbols, int) or self.n_symbols < self.modulus):
            raise ValueError(f"n_symbols must be an integer >= modulus ({self.modulus}), got {self.n_symbols!r}.")
        if self.rule == "custom":
            if (self.coefficients is None) == (self.rule_fn is None):
                raise ValueError("rule='custom' needs exactly one of coefficients=(c_1, ..., c_m) (linear recurrence "
                                 "x_n = sum_i c_i x_(n-i)) or rule_fn=callable(history) -> int.")
            if self.coefficients is not None:
                self.coefficients = tuple(self.coefficients)
                if not self.coefficients or not all(isinstance(c, int) for c in self.coefficients):
                    raise ValueError(f"coefficients must be a non-empty sequence of ints, got {self.coefficients!r}.")
            if self.rule_fn is not None and not callable(self.rule_fn):
                raise ValueError(f"rule_fn must be callable(history: list[int]) -> int, got {self.rule_fn!r}.")
        elif self.coefficients is not None or self.rule_fn is not None:
            raise ValueError(f"coefficients/rule_fn are only used with rule='custom', not rule={self.rule!r}.")
        if self.rule == "geometric" and (self.modulus < 3 or not _is_prime(self.modulus)):
            raise ValueError(f"rule='geometric' needs a prime modulus (so x_1 / x_0 fixes the ratio), got "
                             f"{self.modulus}; e.g. 31, 61, 127.")
        if self.n_shown < self.min_shown:
            raise ValueError(f"rule={self.rule!r} shows its rule only with n_shown >= {self.min_shown}, got "
                             f"n_shown={self.n_shown}.")

    @property
    def min_shown(self) -> int:
        """Shown terms needed to see the rule at work at least once."""
        return {"arithmetic": 2, "geometric": 2}.get(self.rule) or self._recurrence()[1] + 1

    def _recurrence(self):
        """(step(history) -> next term, number of random first terms) for fibonacci and custom."""
        if self.rule_fn is not None:
            return self.rule_fn, self.order
        coefficients = (1, 1) if self.rule == "fibonacci" else self.coefficients
        return (lambda xs: sum(c * xs[-i] for i, c in enumerate(coefficients, 1))), len(coefficients)

    @property
    def vocab(self) -> TaskVocab:
        return TaskVocab(self.n_symbols or self.modulus)

    def sequence(self, rng: random.Random, length: int) -> list:
        p = self.modulus
        if self.rule == "arithmetic":
            a, d = rng.randrange(p), rng.randrange(1, p)
            return [(a + k * d) % p for k in range(length)]
        if self.rule == "geometric":
            a, r = rng.randrange(1, p), rng.randrange(2, p)
            return [a * pow(r, k, p) % p for k in range(length)]
        step, order = self._recurrence()
        xs = [rng.randrange(p) for _ in range(order)]
        while self.rule_fn is None and not any(xs):   # all-zero first terms make a linear recurrence constant
            xs = [rng.randrange(p) for _ in range(order)]
        while len(xs) < length:
            xs.append(int(step(list(xs))) % p)
        return xs[:length]

    def sample(self, rng):
        v = self.vocab
        xs = [v.symbol(x) for x in self.sequence(rng, self.n_shown + self.n_predict)]
        first = 2 if self.rule in ("arithmetic", "geometric") else self._recurrence()[1]  # first determined term
        supervised = range(1 + first, 1 + self.n_shown) if self.label_shown else ()
        return _ids_sample([v.BOS] + xs[:self.n_shown] + [v.ANSWER], xs[self.n_shown:], supervised)


@dataclass
class MultiHop(_Task):
    """Follow `n_hops` pointers: a chain a_0 -> a_1 -> .. -> a_L (L = chain_length, default n_hops) given as
    shuffled pairs among `n_distractors` other pairs (whose sources are distinct nodes off the chain).

    Layout: `<bos> (u v <sep>)* <query> start k <answer> end`; the hop count k is written as symbol k.
    With `n_queries` > 1 the final query (k = n_hops) is preceded by n_queries - 1 more `<query> s j <answer> e`
    with starts s on the chain and hop counts 1 <= j <= n_hops, labeled too (more signal per sample); they are
    distinct and none has the final answer, so it cannot be copied from them.
    With `show_path` every query's answer is preceded by the nodes it passes through, labeled (a scratchpad:
    `<query> a 2 <answer> b c` instead of `... <answer> c`; one retrieval per token), e.g. as a curriculum stage.
    """

    n_hops: int = 2
    chain_length: Optional[int] = None
    n_distractors: int = 8
    n_symbols: int = 64
    n_queries: int = 1
    show_path: bool = False

    def __post_init__(self):
        _check_ints(self, 1, "n_hops", "n_symbols", "n_queries")
        _check_ints(self, 0, "n_distractors")
        if not isinstance(self.show_path, bool):
            raise ValueError(f"show_path must be True or False, got {self.show_path!r}.")
        if self.chain_length is not None:
            _check_ints(self, 1, "chain_length")
        if self.n_hops > self.length:
            raise ValueError(f"n_hops={self.n_hops} is more than chain_length={self.length}: a query can follow at "
                             f"most chain_length pointers.")
        nodes = self.length + 1 + self.n_distractors
        if nodes > self.n_symbols:
            raise ValueError(f"A chain of {self.length} pointers and {self.n_distractors} distractor pairs need "
                             f"{nodes} distinct nodes but n_symbols is {self.n_symbols}; allowed: n_distractors <= "
                             f"{max(self.n_symbols - self.length - 1, 0)}.")
        if self.n_hops >= self.n_symbols:
            raise ValueError(f"The hop count is written as a symbol, so n_hops must be < n_symbols ({self.n_symbols}).")
        queries = sum(self.length - h + 1 for h in range(1, self.n_hops + 1))  # (start, hops) pairs on the chain
        if self.n_queries - 1 > queries - self.n_hops:
            raise ValueError(f"n_queries={self.n_queries}: the earlier queries are distinct and never end where the "
                             f"final one does, so at most {queries - self.n_hops + 1} fit a chain of {self.length} "
                             f"with n_hops={self.n_hops}; allowed: n_queries <= {queries - self.n_hops + 1}, or a "
                             f"longer chain_length.")

    @property
    def length(self) -> int:
        return self.chain_length or self.n_hops

    @property
    def vocab(self) -> TaskVocab:
        return TaskVocab(self.n_symbols)

    def sample(self, rng):
        v, L = self.vocab, self.length
        nodes = rng.sample(range(self.n_symbols), L + 1 + self.n_distractors)
        chain = nodes[:L + 1]
        pairs = list(zip(chain, chain[1:])) + [(s, rng.randrange(self.n_symbols)) for s in nodes[L + 1:]]
        rng.shuffle(pairs)
        prompt = [v.BOS]
        for u, w in pairs:
            prompt += [v.symbol(u), v.symbol(w), v.SEP]
        start = rng.randrange(L - self.n_hops + 1)
        # earlier queries: distinct, and none ends where the final one does (its answer would be copied)
        others = [(s, h) for h in range(1, self.n_hops + 1) for s in range(L - h + 1) if s + h != start + self.n_hops]
        supervised = []
        for s, hops in rng.sample(others, self.n_queries - 1) + [(start, self.n_hops)]:
            prompt += [v.QUERY, v.symbol(chain[s]), v.symbol(hops), v.ANSWER]
            shown = range(1 if self.show_path else hops, hops + 1)  # the path (scratchpad), or the answer alone
            supervised += range(len(prompt), len(prompt) + len(shown))
            prompt += [v.symbol(chain[s + h]) for h in shown]
        answer = prompt[-1:]  # the final query's answer, split off the prompt
        return _ids_sample(prompt[:-1], answer, supervised[:-1])


# ---------------------------------------------------------------------------------------------------------- bAbI

BABI_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
PEOPLE = ("Mary", "John", "Daniel", "Sandra", "Fred", "Bill", "Jeff", "Julie")
LOCATIONS = ("kitchen", "bedroom", "garden", "hallway", "bathroom", "office", "cinema", "park")
OBJECTS = ("football", "apple", "milk", "cake", "box", "book")
MOVE_VERBS = ("went to", "journeyed to", "travelled to", "moved to", "went back to")
GRAB_VERBS = ("picked up", "got", "grabbed", "took")
DROP_VERBS = ("dropped", "put down", "discarded", "left")
GIVE_VERBS = ("gave", "handed", "passed")
DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
_ACTION_WEIGHTS = {"qa1": {"move": 1.0}, "qa2": {"move": 1.0, "grab": 1.0, "drop": 0.5},
                   "qa3": {"move": 1.0, "grab": 1.0, "drop": 0.5},
                   "qa5": {"move": 1.0, "grab": 1.0, "drop": 0.3, "give": 2.0}}
_MIN_FACTS = {"qa1": 1, "qa2": 2, "qa3": 3, "qa4": 1, "qa5": 4}


@dataclass
class BabiTask(_Task):
    """bAbI-style stories (qa1-qa5) from a small world simulation; answers are single words.

    qa1 "Where is Mary?"; qa2 "Where is the football?" (carried by someone who moves); qa3 "Where was the football
    before the kitchen?" (the kitchen is where it is now; the answer is where it was before it last came there);
    qa4 "What is north of the bedroom?" / "What is the kitchen north of?" (a map on a grid); qa5 "Who gave the cake
    to Fred?" / "What did Mary give to Fred?" / "Who did Mary give the cake to?" / "Who received the cake?" (the
    latest matching gift). People must move before they act; `n_facts` is the number of story sentences.
    Sample: `{"context", "question", "answer", "facts": list of sentences, "task", "questions", "answers"}`.

    `n_questions` > 1 asks that many distinct questions about the same story (denser training signal, like bAbI's
    questions every few facts): `questions`/`answers` list them; the last one is `question`/`answer`, drawn as with
    one question (the extra ones are drawn after it, so only a stream's first sample stays the same for a seed);
    `tokenize_sample` labels every answer.

    `distinct_people` (qa1, n_facts <= n_people): every fact is about another person, so the latest fact's place is the
    answer only when its person is asked: a curriculum stage that makes "answer the most recent place" stop paying off
    and the person -> place binding learnable (see the README's BABILong notes).
    """

    task: str = "qa1"
    n_facts: Optional[int] = None   # default: 2 for qa4, 8 otherwise
    n_people: int = 4
    n_locations: int = 6
    n_objects: int = 3
    n_questions: int = 1
    distinct_people: bool = False
    max_tries: int = 1000
    is_text = True

    def __post_init__(self):
        if self.task not in BABI_TASKS:
            raise ValueError(f"Unknown bAbI task {self.task!r}; allowed: {', '.join(BABI_TASKS)}.")
        _check_ints(self, 1, "n_people", "n_objects", "n_questions", "max_tries")
        if self.distinct_people not in (True, False):
            raise ValueError(f"distinct_people must be True or False, got {self.distinct_people!r}.")
        if self.distinct_people and (self.task != "qa1" or self.num_facts > self.n_people):
            raise ValueError(f"distinct_people (every fact about another person) is for qa1 with n_facts <= n_people; "
                             f"got task={self.task}, n_facts={self.num_facts}, n_people={self.n_people}.")
        if self.task == "qa1" and self.n_questions > self.n_people:
            raise ValueError(f"qa1 asks about distinct people: n_questions must be <= n_people = {self.n_people}, "
                             f"got {self.n_questions}.")
        if self.n_facts is not None:
            _check_ints(self, 1, "n_facts")
        _check_ints(self, 2, "n_locations")
        for name, pool in (("n_people", PEOPLE), ("n_locations", LOCATIONS), ("n_objects", OBJECTS)):
            if getattr(self, name) > len(pool):
                raise ValueError(f"{name}={getattr(self, name)} but only {len(pool)} are defined: {', '.join(pool)}.")
        if self.task == "qa5" and self.n_people < 2:
            raise ValueError("qa5 needs n_people >= 2 (a giver and a receiver).")
        if self.num_facts < _MIN_FACTS[self.task]:
            raise ValueError(f"{self.task} needs n_facts >= {_MIN_FACTS[self.task]}, got {self.n_facts}.")
        if self.task == "qa4" and self.num_facts > self.n_locations - 1:
            raise ValueError(f"qa4 relates distinct locations: n_facts must be <= n_locations - 1 = "
                             f"{self.n_locations - 1}, got {self.n_facts}.")

    @property
    def num_facts(self) -> int:
        return self.n_facts or (2 if self.task == "qa4" else 8)

    def sample(self, rng):
        for _ in range(self.max_tries):
            story = self._map(rng) if self.task == "qa4" else self._world(rng)
            if story is None:
                continue
            facts, question, answer, candidates = story
            others = [qa for qa in dict(candidates).items() if qa[0] != question]   # distinct questions
            if len(others) < self.n_questions - 1:
                continue
            asked = rng.sample(others, self.n_questions - 1) + [(question, answer)] if self.n_questions > 1 else \
                [(question, answer)]
            return {"context": " ".join(facts), "question": question, "answer": answer, "facts": facts,
                    "task": self.task, "questions": [q for q, _ in asked], "answers": [a for _, a in asked]}
        raise RuntimeError(f"No answerable {self.task} story with {self.n_questions} distinct question(s) in "
                           f"{self.max_tries} tries; raise n_facts or lower n_questions.")

    def _world(self, rng):
        people, locations = PEOPLE[:self.n_people], LOCATIONS[:self.n_locations]
        objects = OBJECTS[:self.n_objects]
        where, holder, place, history, gifts, facts = {}, {}, {}, {o: [] for o in objects}, [], []

        def put(o, loc):
            place[o] = loc
            if not history[o] or history[o][-1] != loc:
                history[o].append(loc)

        for _ in range(self.num_facts):
            options = {
                "move": [(p, loc) for p in people for loc in locations
                         if where.get(p) != loc and not (self.distinct_people and p in where)],
                "grab": [(p, o) for p in where for o in objects
                         if o not in holder and place.get(o, where[p]) == where[p]],   # unseen objects: anywhere
                "drop": [(p, o) for o, p in holder.items()],
                "give": [(p, o, q) for o, p in holder.items() for q in where if q != p and where[q] == where[p]],
            }
            kinds = [k for k in _ACTION_WEIGHTS[self.task] if options[k]]
            kind = rng.choices(kinds, weights=[_ACTION_WEIGHTS[self.task][k] for k in kinds])[0]
            action = rng.choice(options[kind])
            if kind == "move":
                p, loc = action
                where[p] = loc
                for o in [o for o, h in holder.items() if h == p]:
                    put(o, loc)
                facts.append(f"{p} {rng.choice(MOVE_VERBS)} the {loc}.")
            elif kind == "grab":
                p, o = action
                holder[o] = p
                put(o, where[p])
                facts.append(f"{p} {rng.choice(GRAB_VERBS)} the {o}{rng.choice(('', ' there'))}.")
            elif kind == "drop":
                p, o = action
                del holder[o]
                facts.append(f"{p} {rng.choice(DROP_VERBS)} the {o}.")
            else:
                p, o, q = action
                holder[o] = q
                gifts.append(action)
                facts.append(f"{p} {rng.choice(GIVE_VERBS)} the {o} to {q}.")

        # (question, answer) for one draw, plus every question the story answers (for n_questions > 1)
        if self.task == "qa1":
            every = [(f"Where is {p}?", where[p]) for p in sorted(where)]
            return (facts, *rng.choice(every), every)
        if self.task == "qa2":
            every = [(f"Where is the {o}?", place[o]) for o in sorted(place)]
            return (facts, *rng.choice(every), every) if every else None
        if self.task == "qa3":
            every = [(f"Where was the {o} before the {history[o][-1]}?", history[o][-2])
                     for o in sorted(objects) if len(history[o]) >= 2]
            return (facts, *rng.choice(every), every) if every else None
        if not gifts:
            return None

        def latest(match):
            return [g for g in gifts if match(g)][-1]

        def ask(p, o, q, form):
            if form == 0:
                return f"Who gave the {o} to {q}?", latest(lambda g: g[1:] == (o, q))[0]
            if form == 1:
                return f"What did {p} give to {q}?", latest(lambda g: (g[0], g[2]) == (p, q))[1]
            if form == 2:
                return f"Who did {p} give the {o} to?", latest(lambda g: g[:2] == (p, o))[2]
            return f"Who received the {o}?", latest(lambda g: g[1] == o)[2]

        p, o, q = rng.choice(gifts)
        return (facts, *ask(p, o, q, rng.randrange(4)), [ask(*g, form) for g in gifts for form in range(4)])

    def _map(self, rng):
        names = rng.sample(LOCATIONS[:self.n_locations], self.num_facts + 1)
        cell = {names[0]: (0, 0)}
        relations = []   # (a, direction, b): "The a is direction of the b."
        for new in names[1:]:
            taken = set(cell.values())
            options = [(old, d) for old in cell for d, (dx, dy) in DIRECTIONS.items()
                       if (cell[old][0] + dx, cell[old][1] + dy) not in taken]
            old, d = rng.choice(options)
            cell[new] = (cell[old][0] + DIRECTIONS[d][0], cell[old][1] + DIRECTIONS[d][1])
            relations.append((new, d, old) if rng.random() < 0.5 else (old, OPPOSITE[d], new))
        rng.shuffle(relations)
        facts = [f"The {a} is {d} of the {b}." for a, d, b in relations]
        every = [qa for a, d, b in relations
                 for qa in ((f"What is {d} of the {b}?", a), (f"What is the {a} {d} of?", b))]
        a, d, b = rng.choice(relations)
        if rng.random() < 0.5:
            return facts, f"What is {d} of the {b}?", a, every
        return facts, f"What is the {a} {d} of?", b, every


# ------------------------------------------------------------------------------------------------------ BABILong

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


# ------------------------------------------------------------------------------------- tokenization and training

def tokenize_sample(sample: dict, tokenizer, max_length: Optional[int] = None) -> dict:
    """A text sample -> `{"input_ids", "labels", "answer_start", "answer", "question"}`.

    Prompt `"{context}\\nQuestion: {question}\\nAnswer:"`, then the answer as `" " + answer`; labels are -100
    except on the answer tokens. A sample with several `questions`/`answers` (`BabiTask(n_questions=k)`) gets each
    question and answer in turn, every answer labeled; `answer_start` is the last one's. If `max_length` is exceeded
    the start of the context is dropped.
    """
    def ids(text):
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    questions = sample.get("questions") or [sample["question"]]
    answers = sample.get("answers") or [sample["answer"]]
    tails = [f"\nQuestion: {q}\nAnswer:" for q in questions]
    prompt, supervised = ids(sample["context"] + tails[0]), []
    for answer, tail in zip(answers[:-1], tails[1:]):   # earlier questions: answer labeled, then the next question
        answer = ids(" " + answer.strip())
        supervised += range(len(prompt), len(prompt) + len(answer))
        prompt += answer + ids(tail)
    answer = ids(" " + answers[-1].strip())
    if max_length is not None and len(prompt) + len(answer) > max_length:
        needed = len(ids(tails[-1])) + len(answer)
        if needed > max_length:
            raise ValueError(f"max_length={max_length} cannot hold the question and answer ({needed} tokens).")
        cut = len(prompt) + len(answer) - max_length
        prompt, supervised = prompt[cut:], [i - cut for i in supervised if i >= cut]
    return {**_ids_sample(prompt, answer, tuple(supervised)), "answer": answers[-1], "question": questions[-1]}


def build_dataset(generator, n: int, seed: int = 0, tokenizer=None, max_length: Optional[int] = None) -> Dataset:
    """`n` samples of `generator` as a `datasets.Dataset` (input_ids, labels, answer, answer_start, ...).

    Text tasks are tokenized with `tokenize_sample` (`tokenizer` defaults to GPT-2 BPE).
    """
    samples = generator.generate(n, seed)
    if generator.is_text:
        tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
        samples = [tokenize_sample(s, tokenizer, max_length) for s in samples]
    return Dataset.from_list(samples)


class TaskCollator:
    """Right-pads `input_ids` (with the pad id), `labels` (with -100) and adds `attention_mask`.

    This is `transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)`, which already pads labels
    with -100 (`DataCollatorWithPadding` does not pad labels); it gets only input_ids/labels so that ragged extra
    columns (`answer`, `question`) never reach `tokenizer.pad`. Synthetic tasks: `TaskCollator(task.vocab.tokenizer())`.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: Optional[int] = None):
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token first.")
        if tokenizer.padding_side != "right":
            raise ValueError(f"TaskCollator pads on the right (answers end the sequence); tokenizer.padding_side is "
                             f"{tokenizer.padding_side!r}.")
        self.collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                               pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")

    def __call__(self, features: list) -> dict:
        return self.collator([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])


def exact_match(predictions, answers) -> float:
    """Fraction of exact matches: strings compare after strip + lower, id sequences as lists."""
    predictions, answers = list(predictions), list(answers)
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"Need as many predictions as answers (at least one), got {len(predictions)} and "
                         f"{len(answers)}.")

    def norm(x):
        if isinstance(x, str):
            return x.strip().lower()
        return list(x.tolist() if hasattr(x, "tolist") else x)

    return sum(norm(p) == norm(a) for p, a in zip(predictions, answers)) / len(answers)


def answer_accuracy(logits, labels) -> float:
    """Fraction of sequences whose every answer token is the argmax of the previous position (teacher forcing;
    equal to greedy-decoding exact match). `logits` [B, T, V] (or argmaxed ids [B, T]), `labels` [B, T]. Works as
    `compute_metrics=lambda p: {"accuracy": answer_accuracy(p.predictions, p.label_ids)}` in `Trainer`."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    predicted = logits.argmax(-1) if logits.dim() == 3 else logits
    predicted, target = predicted[:, :-1], labels[:, 1:]   # (B, T-1): position t predicts token t+1
    scored = target != IGNORE_INDEX
    correct = ((predicted == target) | ~scored).all(-1)
    has_answer = scored.any(-1)
    return (correct & has_answer).sum().item() / max(has_answer.sum().item(), 1)


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


# ---------------------------------------------------------------------------------------------------- curricula

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
    from .trainers import Curriculum, CurriculumStage  # imported here: armada.trainers imports transformers.Trainer

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
