import math
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from armada.data import build_lm_datasets, load_text, tokenize_into_blocks
from armada.evaluation import (
    generate_texts,
    generation_speed,
    lexical_diversity,
    peak_memory,
    perplexity,
    perplexity_on_blocks,
)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 30


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64)).eval()


def test_blocks_from_a_local_file(tmp_path, gpt2_tok):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    splits = build_lm_datasets(str(path), gpt2_tok, block_size=16, eval_fraction=0.25)
    total = len(gpt2_tok(TEXT)["input_ids"]) + 1  # + the EOS that ends the document
    assert len(splits["train"]) + len(splits["eval"]) == total // 16
    row = splits["train"][0]
    assert len(row["input_ids"]) == 16 and row["labels"] == row["input_ids"] and sum(row["attention_mask"]) == 16


def test_folder_of_files_and_separate_eval_source(tmp_path, gpt2_tok):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text(TEXT)
    (tmp_path / "docs" / "two.txt").write_text(TEXT.upper())
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00\x01")
    assert len(load_text(str(tmp_path / "docs"))) == 2
    (tmp_path / "eval.txt").write_text(TEXT)
    splits = build_lm_datasets(str(tmp_path / "docs"), gpt2_tok, block_size=32, eval_source=str(tmp_path / "eval.txt"))
    assert len(splits["eval"]) == (len(gpt2_tok(TEXT)["input_ids"]) + 1) // 32


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is not beside the checkout")
def test_shared_corpus_offline(gpt2_tok):
    path = os.path.join(SHARED, "wikitext-2", "valid.txt")
    blocks = tokenize_into_blocks(load_text(path), gpt2_tok, block_size=256)
    assert len(blocks) > 500


def test_bad_data_errors(tmp_path, gpt2_tok):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="shorter than one block of 64"):
        build_lm_datasets(str(tmp_path / "short.txt"), gpt2_tok, block_size=64)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_text(str(tmp_path / "nothing"))


def test_sliding_window_perplexity(model, gpt2_tok):
    ids = torch.tensor(gpt2_tok(TEXT)["input_ids"][:150])
    with torch.no_grad():
        whole = model(ids[None, :64], labels=ids[None, :64]).loss.item()
    assert perplexity(model, ids[:64], max_length=64)["nll"] == pytest.approx(whole, rel=1e-5)
    sliding = perplexity(model, ids, max_length=64, stride=16, batch_size=3)
    assert sliding["tokens"] == 149  # every token but the first, exactly once
    disjoint = perplexity(model, ids[:128], max_length=32, stride=32)
    blocks = perplexity_on_blocks(model, ids[:128].view(4, 32), batch_size=3)
    assert disjoint["tokens"] == blocks["tokens"] == 124  # a disjoint window's first token has no context
    assert disjoint["nll"] == pytest.approx(blocks["nll"], rel=1e-5)
    assert math.isfinite(sliding["perplexity"]) and sliding["perplexity"] > 1
    with pytest.raises(ValueError, match="stride must be in"):
        perplexity(model, ids, max_length=32, stride=64)


def test_lexical_diversity():
    result = lexical_diversity(["a b a b", "c d"])
    assert result["distinct_1"] == pytest.approx(4 / 6)
    assert result["distinct_2"] == pytest.approx(3 / 4)  # (a,b) (b,a) (a,b) (c,d)
    assert result["type_token_ratio"] == pytest.approx((2 / 4 + 2 / 2) / 2)


def test_generation_helpers(model, gpt2_tok):
    texts = generate_texts(model, gpt2_tok, prompts=["Hello", "The"], max_new_tokens=5)
    assert len(texts) == 2 and texts == generate_texts(model, gpt2_tok, prompts=["Hello", "The"], max_new_tokens=5)
    speed = generation_speed(model, torch.tensor([[1, 2, 3]]), new_tokens=4, repeats=2)
    assert speed["new_tokens"] == 4 and speed["tokens_per_s"] > 0
    with peak_memory() as mem:
        big = torch.ones(64, 1024, 1024)  # 256 MiB
        big += 1
    del big
    assert mem["kind"] == "rss" and mem["peak_delta_bytes"] > 200 * 2**20


def test_saved_activation_bytes_counts_what_checkpointing_saves():
    from torch.utils.checkpoint import checkpoint

    from armada.evaluation import saved_activation_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    x = torch.randn(32, 64)
    plain = saved_activation_bytes(lambda: model(x).sum().backward())
    checkpointed = saved_activation_bytes(lambda: checkpoint(model, x, use_reentrant=False).sum().backward())
    assert plain >= 32 * 256 * 4 * 2  # at least the hidden pre- and post-activation
    assert checkpointed < plain / 2
