"""Checks for causal LMs on top of `common_checks.py`: padding in batched forward and generate, the cache."""

import torch
from common_checks import assert_close


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


def check_tokenizer_padded_generation_equals_single(model, tokenizer, prompts, max_new_tokens=6):
    """Prompts padded by `tokenizer` (the package's gpt2_tokenizer() pads on the right) and generated as one batch:
    every row gets the tokens it gets alone, for greedy decoding and for seeded sampling of a batch of one."""
    model.eval()
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all(), "the prompts must differ in length to test padding"
    with torch.no_grad():
        generated = model.generate(**batch, **kwargs)
        for row, prompt in enumerate(prompts):
            alone = model.generate(**tokenizer(prompt, return_tensors="pt"), **kwargs)
            assert torch.equal(generated[row, -max_new_tokens:], alone[0, -max_new_tokens:]), (
                f"row {row} ({prompt!r}) generates differently when padded into a batch")
            n = int(batch["attention_mask"][row].sum())  # the prompt's real tokens end right before the new ones
            assert torch.equal(generated[row, -max_new_tokens - n:-max_new_tokens], alone[0, :n])


def check_generation_contract(model, input_ids, cache_field=None, pad_id=0, new=3):
    """transformers' generation contract with padding (its own generation tests hold models to it):
    - `inputs_embeds` with a right-padded mask give the new tokens `input_ids` give (both are aligned alike);
    - a mask with padding inside a row is used as given: the returned prompt is the caller's, and continuing from the
      returned sequences with the caller's mask extended (and, `cache_field` given, the returned cache) equals one
      longer generation."""
    model.eval()
    settings = dict(do_sample=False, pad_token_id=pad_id)
    right = torch.ones_like(input_ids)
    right[1, -2:] = 0
    with torch.no_grad():
        from_ids = model.generate(input_ids, attention_mask=right, max_new_tokens=new, **settings)[:, -new:]
        embeds = model.get_input_embeddings()(input_ids)
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=right, max_new_tokens=new, **settings)
        assert torch.equal(from_embeds[:, -new:], from_ids), "inputs_embeds and input_ids generate differently"

        holed = torch.ones_like(input_ids)
        holed[0, 1] = 0
        full = model.generate(input_ids, attention_mask=holed, max_new_tokens=2 * new, **settings)
        out = model.generate(input_ids, attention_mask=holed, max_new_tokens=new, return_dict_in_generate=True,
                             **settings)
        assert torch.equal(out.sequences[:, :input_ids.shape[1]], input_ids), "the returned prompt was reordered"
        extended = torch.cat([holed, holed.new_ones(len(holed), new)], dim=1)
        caches = [{}] + ([{cache_field: out.get(cache_field)}] if cache_field else [])
        for cache in caches:
            more = model.generate(out.sequences, attention_mask=extended, max_new_tokens=new, **cache, **settings)
            assert torch.equal(more, full), f"continuing generation{' from the cache' if cache else ''} diverges"


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
