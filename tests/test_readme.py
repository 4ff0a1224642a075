"""The README is code: every ```python block runs as written (each in a fresh interpreter, in an empty folder), and
the guide stays a guide (its measured record lives in benchmarks/README.md)."""

import os
import re
import subprocess
import sys

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
def test_readme_python_block_runs(index, tmp_path):
    if "armada.export" in BLOCKS[index] and onnx_export_missing():
        pytest.skip(f"an ONNX block: {onnx_export_missing()}")
    done = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{done.stderr[-3000:]}"
