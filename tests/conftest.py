"""Fixtures shared across the suite: the package's GPT-2 tokenizer and tiny seeded GPT-2s (CPU-sized, no Hub)."""

import ast
import json
import os
import subprocess
import sys

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


@pytest.fixture
def documented_launch():
    """Runs the `accelerate launch` command of an example script's docstring (2 CPU processes) with this run's
    output folder, step budget and extra arguments; returns the per-rank summaries (`summary_rank<r>.json`)."""

    def run(script, output_dir, extra, max_steps=4):
        path = os.path.join(REPO, "examples", script)
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())).replace("\\\n", " ")
        cmd = next(line.split() for line in doc.splitlines() if line.strip().startswith("accelerate launch"))
        assert cmd[cmd.index("--num_processes") + 1] == "2"
        cmd[0] = os.path.join(os.path.dirname(sys.executable), "accelerate")
        cmd[cmd.index(f"examples/{script}")] = path
        cmd[cmd.index("--output_dir") + 1] = str(output_dir)
        cmd[cmd.index("--max_steps") + 1] = str(max_steps)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd + list(extra), check=True, capture_output=True, text=True, timeout=600, env=env,
                       cwd=str(output_dir))
        return [json.load(open(os.path.join(output_dir, f"summary_rank{r}.json"))) for r in (0, 1)]

    return run

