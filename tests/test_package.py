import os
import subprocess
import sys

import pytest
import torch

from armada.tokenization import gpt2_tokenizer, save_gpt2_tokenizer


def test_import_registers_auto_classes_in_a_fresh_interpreter():
    code = (
        "import armada\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoModel\n"
        "c = AutoConfig.for_model('agency_gpt2', n_layer=1, n_embd=16, n_head=2, vocab_size=10)\n"
        "print(type(AutoModelForCausalLM.from_config(c)).__name__, type(AutoModel.from_config(c)).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AgencyGPT2ForCausalLM", "AgencyGPT2Model"]


def test_gpt2_tokenizer_is_the_real_gpt2_bpe():
    tokenizer = gpt2_tokenizer()
    assert len(tokenizer) == 50257
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's ids, as published
    assert tokenizer.eos_token_id == 50256 and tokenizer.pad_token_id == 50256
    text = "To be, or not to be: that is the question."
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_padding_side_and_save(tmp_path):
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        gpt2_tokenizer(padding_side="middle")
    left = gpt2_tokenizer(padding_side="left")
    batch = left(["a b c", "a"], padding=True, return_tensors="pt")
    assert torch.equal(batch["attention_mask"][1], torch.tensor([0, 0, 1]))
    path = save_gpt2_tokenizer(str(tmp_path / "tok"))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path).encode("Hello world") == [15496, 995]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tok-")], "temp folder left behind"


def test_atomic_directory_leaves_nothing_on_error(tmp_path):
    from armada.io_utils import MARKER, atomic_directory

    target = tmp_path / "out"
    with atomic_directory(str(target)) as tmp:
        open(f"{tmp}/a.txt", "w").write("first")
    assert (target / "a.txt").read_text() == "first" and (target / MARKER).is_file()
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target), overwrite=True) as tmp:
            open(f"{tmp}/a.txt", "w").write("second")
            raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "first", "a failed write must not touch the previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_pyproject_installs_every_package_of_the_source_tree():
    """A wheel holds only the packages pyproject lists (armada.export was once missing, so `pip install` users had
    no ONNX export): every folder with an __init__.py under armada/ and the mapped top-level folders is listed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    folders = {name: os.path.join(repo, folder) for name, folder in setuptools["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            relative = os.path.relpath(root, folder)
            if "__init__.py" in files:
                found.add(name if relative == "." else f"{name}.{relative.replace(os.sep, '.')}")
    assert sorted(found) == sorted(setuptools["packages"])
