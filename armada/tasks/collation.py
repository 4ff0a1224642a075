"""From samples to training batches: tokenizing text samples, `datasets.Dataset`s of a task, the collator."""

from typing import Optional

from datasets import Dataset
from transformers import DataCollatorForSeq2Seq

from .babilong import _default_tokenizer
from .base import IGNORE_INDEX, _ids_sample


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
