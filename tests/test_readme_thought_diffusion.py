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
