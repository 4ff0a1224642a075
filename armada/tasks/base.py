"""What every task shares: the small integer vocabulary of the synthetic tasks, the task base class (difficulty
knobs as dataclass fields, seeded sampling) and the ids/labels sample format."""

import os
import random
from dataclasses import dataclass, fields, replace

from transformers import PreTrainedTokenizerFast

IGNORE_INDEX = -100
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_BACKGROUND = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt")


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
