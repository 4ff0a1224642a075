"""Fixtures shared across the suite: the package's GPT-2 tokenizer and tiny seeded GPT-2s (CPU-sized, no Hub)."""

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from armada.tokenization import gpt2_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def gpt2_tok():
    """`armada.tokenization.gpt2_tokenizer()` (right padding, pad = eos), built once; tests must not modify it."""
    return gpt2_tokenizer()


@pytest.fixture
def tiny_gpt2():
    """Factory of seeded, dropout-free GPT2LMHeadModels: `tiny_gpt2(n_layer=3, vocab_size=99, seed=1)`."""

    def make(seed=0, vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=32, **config):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                          n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          **config))

    return make
