"""Synthetic memory tasks on a small `TaskVocab`: key-value retrieval, sequence patterns, multi-hop pointers."""

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional

from .base import TaskVocab, _check_ints, _ids_sample, _Task


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
