"""The README is code: every ```python block runs as written (each in a fresh interpreter, in an empty folder), and
the guide stays a guide (its measured record lives in benchmarks/README.md)."""

import os
import re
import subprocess

import pytest

from armada.compat import onnx_export_missing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_is_a_guide_with_snippets_and_a_link_to_the_record():
    assert len(BLOCKS) >= 4
    assert 150 <= README.count("\n") <= 350
    assert "benchmarks/README.md" in README and os.path.isfile(os.path.join(REPO, "benchmarks", "README.md"))
    assert "make demo" in README and "make test" in README and "import armada" in README
    assert "ThoughtDiffusion" in README and "DEMO_TIME" not in README


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, installed_armada):
    if "armada.export" in BLOCKS[index] and onnx_export_missing():
        pytest.skip(f"an ONNX block: {onnx_export_missing()}")
    python, env = installed_armada
    done = subprocess.run([python, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{done.stderr[-3000:]}"


def test_the_installed_wheel_has_every_subpackage_and_the_cli(tmp_path, installed_armada):
    """From the wheel, outside the checkout: every package pyproject lists imports (armada.export once did not, so
    the ONNX block and `armada export` failed for every user), and the CLI answers with every subcommand."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]
    python, env = installed_armada
    code = ("import importlib, os, sys\n"
            f"modules = {packages + ['armada.onnxruntime', 'armada.cli']!r}\n"
            "files = [importlib.import_module(m).__file__ for m in modules]\n"
            "assert all(f.startswith(os.environ['PYTHONPATH']) for f in files), files\n"
            "print(len(files))\n")
    done = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and done.stdout.strip() == str(len(packages) + 2), done.stderr[-3000:]
    for command in ("prune", "report", "bench", "export", "push", "pull", "card"):
        done = subprocess.run([python, "-m", "armada.cli", command, "--help"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env=env)
        assert done.returncode == 0 and "usage: armada" in done.stdout, (command, done.stderr[-2000:])
