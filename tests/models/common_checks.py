"""Checks every armada model passes, whatever its head (causal LM, masked LM, ...), in the spirit of transformers'
ModelTesterMixin. A test module builds a small `*ModelTester` (config + inputs) and calls these functions; causal
LMs add the generation checks of `causal_lm_checks.py`."""

import tempfile

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM


def assert_close(a, b, atol=1e-5, msg=""):
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= atol, f"{msg} max abs diff {diff:.3g} > {atol:g}"


def auto_class_of(model):
    """The Auto class that maps this model's config to its class (registered by `import armada`)."""
    for auto in (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModel):
        mapping = auto._model_mapping
        if type(model.config) in mapping and mapping[type(model.config)] is type(model):
            return auto
    raise AssertionError(f"{type(model).__name__} is not registered with an Auto class")


def check_save_load_round_trip(model, input_ids, atol=1e-6):
    """save_pretrained -> Auto*.from_pretrained gives the same class, config and logits."""
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = auto_class_of(model).from_pretrained(tmp).eval()
    assert type(reloaded) is type(model)
    ignore = {"_name_or_path"}
    config_before = {k: v for k, v in model.config.to_dict().items() if k not in ignore}
    assert {k: v for k, v in reloaded.config.to_dict().items() if k not in ignore} == config_before
    with torch.no_grad():
        assert_close(model(input_ids).logits, reloaded(input_ids).logits, atol, "save/load")
    return reloaded


def check_gradient_flow(model, input_ids, frozen_prefixes=(), unused_prefixes=(), labels=None):
    """Every trainable parameter gets a finite gradient from the loss; frozen ones get none.

    `labels` default to `input_ids`; `unused_prefixes` names parameters the forward legitimately never touches (e.g.
    a layer with no head left)."""
    model.train()
    model.zero_grad()
    loss = model(input_ids, labels=input_ids if labels is None else labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        if any(name.startswith(p) for p in frozen_prefixes):
            assert param.grad is None, f"{name} is frozen but got a gradient"
            continue
        if not param.requires_grad or (param.grad is None and any(name.startswith(p) for p in unused_prefixes)):
            continue
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), f"non-finite gradient for {name}"
    model.eval()


def check_dtype(model, input_ids, dtype=torch.bfloat16, labels=None):
    """The model runs in `dtype`: logits in it, a finite loss; a model that generates also generates in it."""
    model = model.to(dtype).eval()
    with torch.no_grad():
        out = model(input_ids, labels=input_ids if labels is None else labels)
    assert out.logits.dtype == dtype
    assert torch.isfinite(out.loss)
    if model.can_generate():
        generated = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert generated.shape == (input_ids.shape[0], input_ids.shape[1] + 4)


def check_export(model, input_ids, atol=1e-5):
    """torch.export traces one graph of the (no-cache) forward that serves padded and unpadded batches alike (no
    data-dependent Python branching: the path to ONNX export)."""
    extra = {"use_cache": False} if model.can_generate() else {}

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, **extra).logits

    wrapper = Logits(model.eval())
    padded = torch.ones_like(input_ids)
    padded[-1, :3] = 0
    exported = torch.export.export(wrapper, (input_ids, padded), strict=False).module()
    with torch.no_grad():
        for mask in (padded, torch.ones_like(input_ids)):
            assert_close(exported(input_ids, mask), wrapper(input_ids, mask), atol, "exported vs eager")
