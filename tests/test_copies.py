"""Code copied between files that travel as remote code (a modeling or configuration file imports only torch,
transformers and its own config, so shared helpers are copies, marked "Copied from"): the copies are checked, not
trusted, as transformers' utils/check_copies.py does for its models."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIES = {  # function -> the file that holds the original, then its copies
    "_refuse_kernel_fields": ["configuration/configuration_agency_gpt2.py",
                              "configuration/configuration_unified_armt.py",
                              "configuration/configuration_thought_diffusion.py"],
    "_warn_unknown_keys": ["configuration/configuration_agency_gpt2.py", "configuration/configuration_unified_armt.py"],
    "_broken_weights_error": ["modeling/modeling_agency_gpt2.py", "modeling/modeling_unified_armt.py"],
    "_left_align_right_padding": ["modeling/modeling_agency_gpt2.py", "modeling/modeling_unified_armt.py"],
    "rotary_cos_sin": ["modeling/modeling_unified_armt.py", "modeling/modeling_thought_diffusion.py"],
    "apply_rotary": ["modeling/modeling_unified_armt.py", "modeling/modeling_thought_diffusion.py"],
}


def function_source(path, name):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = [ast.unparse(node) for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    assert found, f"{path} has no function {name}"
    return found[0]


@pytest.mark.parametrize("name", sorted(COPIES))
def test_copies_equal_their_original(name):
    original, *copies = COPIES[name]
    for path in copies:
        assert function_source(path, name) == function_source(original, name), (
            f"{path}: {name} differs from {original}'s; change both")
