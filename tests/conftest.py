"""Fixtures shared across the suite: the package's GPT-2 tokenizer and tiny seeded GPT-2s (CPU-sized, no Hub)."""

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import transformers
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



BARE_VENV = os.path.join(REPO, ".cache", f"bare-venv-transformers-{transformers.__version__}")  # one per stack


def bare_python():
    """A virtualenv that sees torch and transformers (this venv's site-packages, through a .pth file) but not
    armada: .pth files inside that folder, such as armada's editable-install finder, are not processed. Made in a
    temporary folder and renamed into place, so test workers that ask at once do not race."""
    python = os.path.join(BARE_VENV, "bin", "python")
    if not os.path.exists(python):
        os.makedirs(os.path.dirname(BARE_VENV), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".bare-", dir=os.path.dirname(BARE_VENV))
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp], check=True)
        try:
            os.rename(tmp, BARE_VENV)
        except OSError:  # another worker made it first
            shutil.rmtree(tmp, ignore_errors=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    pth = os.path.join(site, "project-site-packages.pth")
    packages = os.path.dirname(os.path.dirname(transformers.__file__))
    if not os.path.isfile(pth) or open(pth).read().strip() != packages:  # this venv's, not another's
        with open(pth + ".tmp", "w") as f:
            f.write(packages + "\n")
        os.replace(pth + ".tmp", pth)
    return python


@pytest.fixture(scope="session")
def installed_armada(tmp_path_factory):
    """(python, env) that run armada as a user gets it: a wheel built from this checkout and installed (without
    dependencies, which this venv provides) into a folder outside the checkout, seen through PYTHONPATH by
    `bare_python()`, which does not see the editable install."""
    wheels = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), REPO], check=True,
                   capture_output=True, timeout=600)
    target = tmp_path_factory.mktemp("site-packages")
    wheel = next(wheels.glob("armada-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    return bare_python(), {**os.environ, "PYTHONPATH": str(target)}
