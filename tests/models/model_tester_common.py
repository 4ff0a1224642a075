"""Checks every armada causal LM must pass, in the spirit of transformers' ModelTesterMixin.

A test module builds a small `*ModelTester` (config + inputs) and calls these functions.
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM


def assert_close(a, b, atol=1e-5, msg=""):
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= atol, f"{msg} max abs diff {diff:.3g} > {atol:g}"


def check_save_load_round_trip(model, input_ids, atol=1e-6):
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
    assert type(reloaded) is type(model)
    ignore = {"_name_or_path"}
    config_before = {k: v for k, v in model.config.to_dict().items() if k not in ignore}
    assert {k: v for k, v in reloaded.config.to_dict().items() if k not in ignore} == config_before
    with torch.no_grad():
        assert_close(model(input_ids).logits, reloaded(input_ids).logits, atol, "save/load")
    return reloaded


def check_batched_equals_single_with_padding(model, input_ids, pad_id=0, atol=1e-4, max_new_tokens=6):
    """Left-pad a batch of sequences of different lengths; each row's logits and greedy generation must equal the
    row run alone."""
    model.eval()
    lengths = [input_ids.shape[1], input_ids.shape[1] - 3]
    width = max(lengths)
    batch = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, n in enumerate(lengths):
        batch[row, width - n:] = input_ids[row, :n]
        mask[row, width - n:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batched = model(batch, attention_mask=mask, position_ids=position_ids).logits
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=pad_id)
        for row, n in enumerate(lengths):
            single = model(input_ids[row:row + 1, :n]).logits
            assert_close(batched[row:row + 1, width - n:], single, atol, f"row {row}")
            alone_ids = input_ids[row:row + 1, :n]  # explicit mask: generate() would infer one from pad_id
            alone = model.generate(alone_ids, attention_mask=torch.ones_like(alone_ids),
                                   max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            assert torch.equal(generated[row, width:], alone[0, n:]), f"row {row} generation differs when batched"


def check_cache_matches_no_cache(model, input_ids, atol=1e-4, cache_name="past_key_values", prefix=None):
    """Incremental decoding with the cache (`cache_name`: the forward argument and output field that carry it)
    equals full recomputation, token by token and in generate()."""
    model.eval()
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        prefix = prefix or input_ids.shape[1] - 3
        out = model(input_ids[:, :prefix], use_cache=True)
        steps = [out.logits]
        past = getattr(out, cache_name)
        for t in range(prefix, input_ids.shape[1]):
            out = model(input_ids[:, t:t + 1], use_cache=True, **{cache_name: past})
            past = getattr(out, cache_name)
            steps.append(out.logits)
        assert_close(torch.cat(steps, dim=1), full, atol, "cache vs full")
        kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
        with_cache = model.generate(input_ids, use_cache=True, **kwargs)
        without = model.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def check_gradient_flow(model, input_ids, frozen_prefixes=(), unused_prefixes=()):
    """Every trainable parameter gets a finite gradient from the LM loss; frozen ones get none.

    `unused_prefixes` names parameters the forward legitimately never touches (e.g. a layer with no head left)."""
    model.train()
    model.zero_grad()
    loss = model(input_ids, labels=input_ids).loss
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


def check_dtype(model, input_ids, dtype=torch.bfloat16):
    model = model.to(dtype).eval()
    with torch.no_grad():
        out = model(input_ids, labels=input_ids)
    assert out.logits.dtype == dtype
    assert torch.isfinite(out.loss)
    generated = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (input_ids.shape[0], input_ids.shape[1] + 4)


def check_export(model, input_ids, atol=1e-5):
    """torch.export traces one graph of the no-cache forward that serves padded and unpadded batches alike (no
    data-dependent Python branching: the path to ONNX export)."""

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    wrapper = Logits(model.eval())
    padded = torch.ones_like(input_ids)
    padded[-1, :3] = 0
    exported = torch.export.export(wrapper, (input_ids, padded), strict=False).module()
    with torch.no_grad():
        for mask in (padded, torch.ones_like(input_ids)):
            assert_close(exported(input_ids, mask), wrapper(input_ids, mask), atol, "exported vs eager")
