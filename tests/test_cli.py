import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import armada  # noqa: F401
from armada.cli import main


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    # the real GPT-2 vocabulary size, since the CLI tokenizes text with the GPT-2 tokenizer
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=4, n_positions=64)).save_pretrained(path)
    return str(path)


def test_prune_then_report(gpt2_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "pruned"
    main(["prune", "--model", gpt2_dir, "--level", "0.5", "--strategy", "importance", "--data", str(text),
          "--block-size", "32", "--calibration-blocks", "4", "--output", str(out)])
    result = json.loads(capsys.readouterr().out)
    assert sum(result["heads_per_layer"]) == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.num_heads_per_layer() == result["heads_per_layer"]
    assert os.path.isfile(out / "tokenizer.json")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned-")]
    main(["report", "--model", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["pruned"] == 4


def test_prune_errors_are_clear(gpt2_dir, tmp_path):
    with pytest.raises(SystemExit, match="needs --data"):
        main(["prune", "--model", gpt2_dir, "--level", "0.5", "--strategy", "entropy", "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"Pruning level must be in \[0, 1\)"):
        main(["prune", "--model", gpt2_dir, "--level", "1.2", "--strategy", "random", "--output", str(tmp_path / "o")])
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(SystemExit, match="fewer than one block"):
        main(["prune", "--model", gpt2_dir, "--level", "0.5", "--strategy", "importance", "--data", str(short),
              "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
