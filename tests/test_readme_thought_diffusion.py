"""The README's ThoughtDiffusion snippet is code: run it."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_thought_diffusion_snippet_runs():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("## ThoughtDiffusion in a few lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["tokens"].shape == (2, 24)
    assert not (namespace["result"].sequences == 999).any()


def test_demo_diffusion_step(capsys, tmp_path):
    """`make demo`'s ThoughtDiffusion step on a few random GPT-2 blocks: trains, samples, prints the history, saves
    the model with its card and runs its int8 ONNX export."""
    import sys
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, os.path.join(REPO, "examples"))
    from demo import diffusion_demo

    from armada.tokenization import gpt2_tokenizer

    train = torch.randint(0, 50257, (16, 128), generator=torch.Generator().manual_seed(0))
    args = SimpleNamespace(diffusion_steps=2, seed=0, output_dir=str(tmp_path / "demo"))
    info = diffusion_demo(train, {"held-out": train[:4]}, gpt2_tokenizer(), args)
    printed = capsys.readouterr().out
    assert info["steps"] == 2 and info["forward_passes"] == 8
    assert printed.count("block ") == 8 and "_" in printed.split("block 0 step 0:")[1].splitlines()[0]
    assert info["saved_to"] == str(tmp_path / "demo_diffusion") and (tmp_path / "demo_diffusion" / "README.md").exists()
    from armada.compat import onnx_export_missing

    if onnx_export_missing():
        assert info["onnx"] == {"skipped": onnx_export_missing()}
    else:
        assert info["onnx"]["report"]["fp32"]["pass"] and 0 <= info["onnx"]["int8_greedy_agreement"] <= 1
