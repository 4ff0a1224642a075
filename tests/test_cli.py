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


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>")


def test_checkpoint_tokenizer_is_used_and_kept(tmp_path, capsys):
    words = "the quick brown fox jumps over lazy dog".split()
    model_dir = tmp_path / "small"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words) + 1, n_embd=16, n_layer=2, n_head=4,
                               n_positions=64)).save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    prune = ["prune", "--model", str(model_dir), "--level", "0.5", "--data", str(text), "--block-size", "16",
             "--calibration-blocks", "4", "--output"]
    with pytest.raises(SystemExit, match="the model's vocabulary has 9 entries: the model was not trained with this "
                                         "tokenizer"):
        main([*prune, str(tmp_path / "o")])  # no tokenizer of its own: GPT-2's ids do not fit
    _word_tokenizer(words).save_pretrained(model_dir)
    main([*prune, str(tmp_path / "o")])
    assert json.loads(capsys.readouterr().out)["tokenizer"] == "checkpoint"
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "o")
    assert len(saved) == 9 and saved.encode("the lazy dog") == [1, 7, 8]


def test_repruning_to_a_lower_level_says_why_nothing_changed(gpt2_dir, tmp_path, capsys):
    main(["prune", "--model", gpt2_dir, "--level", "0.5", "--strategy", "magnitude", "--output", str(tmp_path / "a")])
    capsys.readouterr()
    main(["prune", "--model", str(tmp_path / "a"), "--level", "0.25", "--strategy", "magnitude", "--output",
          str(tmp_path / "b")])
    result = json.loads(capsys.readouterr().out)
    assert result["pruned"] == {} and result["tokenizer"] == "checkpoint"
    assert result["note"].startswith("nothing pruned: 4 of 8 heads were already pruned, which meets --level 0.25")


def test_bench_help_exits_zero():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "armada.cli", "bench", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "usage: armada bench {pruning,speed}" in run.stdout
    assert "agency_speed.py" in run.stdout
    run = subprocess.run([sys.executable, "-m", "armada.cli", "bench"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "name a benchmark: pruning, speed" in run.stderr


def test_export_help_names_every_architecture(capsys):
    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in ("AgencyGPT2", "UnifiedARMT", "ThoughtDiffusion"))
