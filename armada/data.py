"""Text -> tokenized fixed-length blocks for causal-LM training and evaluation, through `datasets`.

A source is a local text file, a folder of text files, or a `datasets` Hub id (with optional config and split);
local sources work offline (`../shared/data/*`), the Hub path is the ordinary `datasets.load_dataset` call.

    >>> splits = build_lm_datasets("../shared/data/tinyshakespeare/input.txt", block_size=128, eval_fraction=0.1)
    >>> splits["train"][0].keys()   # input_ids, attention_mask, labels
"""

import os
from typing import Optional

from datasets import Dataset, DatasetDict, load_dataset

from .tokenization import gpt2_tokenizer

TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw", ".tokens")


def _local_files(source: str) -> list:
    if os.path.isdir(source):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(source)
            for name in names
            if name.endswith(TEXT_SUFFIXES)
        )
        if not files:
            raise ValueError(f"Folder {source!r} has no text files (allowed suffixes: {', '.join(TEXT_SUFFIXES)}).")
        return files
    if not os.path.exists(source):
        raise FileNotFoundError(f"Data file {source!r} does not exist (give a text file, a folder of text files, or "
                                "a datasets Hub id such as 'wikitext').")
    return [source]


def load_text(source: str, config_name: Optional[str] = None, split: str = "train",
              text_column: str = "text") -> Dataset:
    """A `Dataset` with one `text` column, from a local file/folder or a `datasets` Hub id."""
    looks_local = os.path.sep in source or source.startswith(".") or os.path.exists(source)
    if looks_local:
        files = _local_files(source)
        empty = [f for f in files if os.path.getsize(f) == 0]
        if empty:
            raise ValueError(f"Data file {empty[0]!r} is empty.")
        # sample_by="document": one row per file keeps long texts intact for block packing.
        dataset = load_dataset("text", data_files=files, split="train", sample_by="document")
    else:
        dataset = load_dataset(source, config_name, split=split)
        if text_column not in dataset.column_names:
            raise ValueError(f"Dataset {source!r} has no column {text_column!r}; columns: {dataset.column_names}.")
        if text_column != "text":
            dataset = dataset.rename_column(text_column, "text")
        dataset = dataset.select_columns(["text"])
    return dataset


def tokenize_into_blocks(dataset: Dataset, tokenizer, block_size: int, num_proc: Optional[int] = None) -> Dataset:
    """Tokenize the `text` column, join documents with EOS and cut fixed `block_size` blocks (the tail that does not
    fill a block is dropped). Each block has `input_ids`, `attention_mask` and `labels` (= input_ids)."""
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}.")
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return {"input_ids": [row + [eos] for row in ids]}

    def group(batch):
        joined = [token for row in batch["input_ids"] for token in row]
        usable = len(joined) // block_size * block_size
        blocks = [joined[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                            desc="tokenize")
    total = sum(len(row) for row in tokenized["input_ids"])
    if total < block_size:
        raise ValueError(f"The text has {total} tokens, shorter than one block of {block_size}; give more text or a "
                         "smaller block_size.")
    return tokenized.map(group, batched=True, batch_size=1000, num_proc=num_proc, desc=f"blocks of {block_size}")


def build_lm_datasets(source: str, tokenizer=None, block_size: int = 128, eval_fraction: float = 0.1,
                      eval_source: Optional[str] = None, config_name: Optional[str] = None, split: str = "train",
                      seed: int = 0, num_proc: Optional[int] = None) -> DatasetDict:
    """Train/eval `DatasetDict` of blocks. The eval split is `eval_source` when given, else a seeded
    `eval_fraction` of the blocks of `source`."""
    tokenizer = tokenizer or gpt2_tokenizer()
    blocks = tokenize_into_blocks(load_text(source, config_name, split), tokenizer, block_size, num_proc)
    if eval_source is not None:
        evaluation = tokenize_into_blocks(load_text(eval_source, config_name, "validation"), tokenizer, block_size,
                                          num_proc)
        return DatasetDict(train=blocks, eval=evaluation)
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}.")
    if len(blocks) < 2:
        raise ValueError(f"Only {len(blocks)} block of {block_size} tokens: too little text to split train/eval.")
    parts = blocks.train_test_split(test_size=eval_fraction, seed=seed)
    return DatasetDict(train=parts["train"], eval=parts["test"])


__all__ = ["load_text", "tokenize_into_blocks", "build_lm_datasets"]
