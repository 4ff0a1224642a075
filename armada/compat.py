"""Every difference between the two transformers stacks armada supports, in one place.

armada runs on transformers 5.x (with huggingface_hub 1.x/2.x) and on transformers 4.57.x (with huggingface_hub
0.x, where optimum-onnx 0.1.0 still holds users). Code elsewhere asks this module instead of testing versions
itself, so dropping 4.57 later is one change here. (Modeling files cannot import armada — they travel as remote
code — and keep the few branches they need beside the line that needs them, each marked `# transformers 4.57`.)
"""

from importlib import metadata

import torch
from packaging.version import Version

TRANSFORMERS_VERSION = Version(metadata.version("transformers"))
HUB_VERSION = Version(metadata.version("huggingface_hub"))
TRANSFORMERS_V5 = TRANSFORMERS_VERSION.major >= 5


# transformers ------------------------------------------------------------------------------------------------------
def prune_gpt2_heads(model, heads_to_prune: dict):
    """transformers' own GPT-2 head pruning (`GPT2LMHeadModel.prune_heads({layer: [heads]})`, the peer armada's
    benchmarks compare against). transformers 5 removed `prune_heads`; there its slicing is done here the same way:
    the heads' q/k/v columns of `c_attn` and rows of `c_proj` go, `split_size`/`num_heads` shrink, and
    `config.pruned_heads` records the union (as 4.57 does, so `AgencyGPT2ForCausalLM.from_gpt2` reads it)."""
    if hasattr(model, "prune_heads"):  # transformers 4.57
        model.prune_heads(heads_to_prune)
        return
    from .modeling.modeling_agency_gpt2 import _slice_conv1d

    base = getattr(model, "transformer", model)
    pruned = {int(layer): set(heads) for layer, heads in (getattr(model.config, "pruned_heads", None) or {}).items()}
    for layer, heads in heads_to_prune.items():
        attn, gone = base.h[layer].attn, pruned.setdefault(layer, set())
        current = [h for h in range(model.config.n_head) if h not in gone]  # original index of each head left
        keep = torch.tensor([pos for pos, h in enumerate(current) if h not in set(heads)], dtype=torch.long)
        if len(keep) == len(current):
            continue
        if len(keep) == 0:  # 4.57 prunes it, then its forward fails with a ValueError
            raise ValueError(f"GPT-2 cannot run layer {layer} with no head left.")
        cols = (keep[:, None] * attn.head_dim + torch.arange(attn.head_dim)).flatten()
        attn.c_attn = _slice_conv1d(attn.c_attn, torch.cat([cols + k * attn.split_size for k in range(3)]), dim=1)
        attn.c_proj = _slice_conv1d(attn.c_proj, cols, dim=0)
        attn.num_heads, attn.split_size = len(keep), len(keep) * attn.head_dim
        gone.update(heads)
    model.config.pruned_heads = {layer: sorted(heads) for layer, heads in pruned.items() if heads}

# huggingface_hub ---------------------------------------------------------------------------------------------------
# The errors of a Hub request that got no answer (no network, connection refused, timed out). huggingface_hub 0.x
# speaks HTTP through requests, whose errors are all OSErrors; 1.x through httpx and 2.x through httpx2, whose
# transport errors are not (its error answers, HfHubHTTPError, are OSErrors on 0.x and 2.x alike). From 1.30 on,
# huggingface_hub exports the HTTP module it uses as `huggingface_hub.utils.httpx`.
if HUB_VERSION >= Version("1.30"):
    from huggingface_hub.utils import httpx as _hub_http

    HUB_UNREACHABLE_ERRORS = (OSError, _hub_http.TransportError)
elif HUB_VERSION.major >= 1:
    import httpx as _hub_http

    HUB_UNREACHABLE_ERRORS = (OSError, _hub_http.TransportError)
else:
    HUB_UNREACHABLE_ERRORS = (OSError,)


# ONNX --------------------------------------------------------------------------------------------------------------
# armada's ONNX export and ONNX Runtime classes need onnx and onnxruntime only: the graphs go through optimum-onnx
# where it installs (transformers 4.57: its latest release, 0.1.0, requires transformers < 4.58) and through
# torch.onnx elsewhere (armada.export.onnx_backend()).
def onnx_export_missing() -> str:
    """Why armada.export / armada.onnxruntime cannot be used here ('' when they can)."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if not missing:
        return ""
    return (f"ONNX export needs the onnx extra ({' and '.join(missing)} not installed): "
            'pip install "armada[onnx]".')


def require_onnx_export():
    """Raise ImportError with `onnx_export_missing()`'s one-line reason when ONNX export cannot run here."""
    reason = onnx_export_missing()
    if reason:
        raise ImportError(reason)
