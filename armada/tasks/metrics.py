"""Scores of the answer span: exact match of decoded answers, teacher-forced answer accuracy from logits."""


import torch

from .base import IGNORE_INDEX


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
