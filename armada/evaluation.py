"""Evaluation of causal LMs: perplexity, lexical diversity, generation speed, peak memory.

Every function returns a plain dict (JSON-ready) so reports and model cards can consume the results directly.
"""

import math
import os
import statistics
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

DEFAULT_PROMPTS = (
    "The king said",
    "In the beginning of the year",
    "She opened the door and",
    "The history of the city",
    "When the war was over,",
    "My lord, I",
)


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, max_length: Optional[int] = None, stride: Optional[int] = None,
               batch_size: int = 8, progress: bool = False) -> dict:
    """Token-weighted perplexity of one long token sequence with a sliding window.

    Windows of `max_length` tokens advance by `stride`; in each window only the tokens not scored by an earlier
    window count (the rest is context): with `stride < max_length` every token after the first is scored exactly
    once, with at least `max_length - stride` tokens of context once the first window is past. `stride ==
    max_length` gives disjoint blocks, whose first tokens are not scored (they have no context).
    """
    input_ids = torch.as_tensor(input_ids).flatten()
    max_length = max_length or model.config.max_position_embeddings
    stride = stride or max_length
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in (0, max_length={max_length}], got {stride}.")
    if input_ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens.")
    windows = []
    previous_end = 0
    for begin in range(0, input_ids.numel() - 1, stride):
        end = min(begin + max_length, input_ids.numel())
        windows.append((begin, end, end - previous_end if begin else end))
        previous_end = end
        if end == input_ids.numel():
            break
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        chunk = windows[i:i + batch_size]
        width = max(end - begin for begin, end, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, (begin, end, new) in enumerate(chunk):
            n = end - begin
            ids[row, :n] = input_ids[begin:end]
            mask[row, :n] = 1
            labels[row, n - new:n] = input_ids[end - new:end]
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        nll += loss.item()
        count += int((shift_labels != -100).sum())
    mean = nll / count
    return {"perplexity": float(torch.tensor(mean).exp()), "nll": mean, "tokens": count,
            "max_length": max_length, "stride": stride}


@torch.no_grad()
def perplexity_on_blocks(model, blocks: Iterable, batch_size: int = 8, progress: bool = False) -> dict:
    """Token-weighted perplexity over fixed blocks (e.g. `build_lm_datasets(...)["eval"]`)."""
    model.eval()
    device = next(model.parameters()).device
    rows = [torch.as_tensor(b["input_ids"] if isinstance(b, dict) else b) for b in blocks]
    if not rows:
        raise ValueError("perplexity_on_blocks got no blocks.")
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(rows), batch_size), desc="perplexity", disable=not progress):
        ids = torch.stack(rows[i:i + batch_size]).to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += ids[:, 1:].numel()
    mean = nll / count
    return {"perplexity": float(torch.tensor(mean).exp()), "nll": mean, "tokens": count}


@torch.no_grad()
def diffusion_elbo_perplexity(model, blocks: torch.Tensor, t_points: int = 8, batch_size: int = 8, seed: int = 0,
                              with_thought: bool = False) -> dict:
    """exp(mean ELBO per token) of a masked-diffusion model (`ThoughtDiffusionForMaskedLM`) over `blocks` (N, T):
    an upper bound on its perplexity. t runs over the midpoint grid of `t_points` points in (sampling_eps, 1), a
    deterministic quadrature of the ELBO's integral over t, with seeded masks (the same masks for every model).
    `with_thought`: the training path's self-conditioning (a noisier pass pushes its thought first; run in train
    mode for that, so dropout must be 0 for a deterministic figure)."""
    config = model.config
    saved, was_training = config.thought_train_prob, model.training
    if with_thought:
        config.thought_train_prob = 1.0
        model.train()
    else:
        model.eval()
    low, high = config.sampling_eps, 1.0
    grid = [low + (high - low) * (k + 0.5) / t_points for k in range(t_points)]
    total = 0.0
    try:
        for k, t in enumerate(grid):
            for i in range(0, len(blocks), batch_size):
                torch.manual_seed(seed * 1000 + k * 100 + i)
                batch = blocks[i:i + batch_size]
                generator = torch.Generator(batch.device).manual_seed(seed * 1000 + k * 100 + i)
                out = model(input_ids=batch, labels=batch, timesteps=torch.full((len(batch),), t, device=batch.device),
                            generator=generator)
                total += float(out.elbo) * len(batch)
    finally:
        config.thought_train_prob = saved
        model.train(was_training)
    nll = total / (len(grid) * len(blocks))
    return {"perplexity": math.exp(nll), "nll": nll, "t_grid": len(grid), "blocks": len(blocks)}


def lexical_diversity(texts: Sequence[str]) -> dict:
    """distinct-1/2 (unique n-grams / all n-grams, over all texts; Li et al. 2016) and type-token ratio, on
    lower-cased whitespace tokens. (`evaluate` has no offline distinct-n metric, hence the few lines here.)"""
    tokens = [text.lower().split() for text in texts]
    unigrams = [t for row in tokens for t in row]
    bigrams = [pair for row in tokens for pair in zip(row, row[1:])]
    return {
        "distinct_1": len(set(unigrams)) / max(len(unigrams), 1),
        "distinct_2": len(set(bigrams)) / max(len(bigrams), 1),
        "type_token_ratio": statistics.mean(len(set(row)) / len(row) for row in tokens if row) if any(tokens) else 0.0,
        "tokens": len(unigrams),
    }


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str] = DEFAULT_PROMPTS, max_new_tokens: int = 40,
                   do_sample: bool = True, top_k: int = 50, seed: int = 0) -> list:
    """Continuations (prompt excluded) of each prompt; sampling is seeded so runs are comparable."""
    model.eval()
    device = next(model.parameters()).device
    texts = []
    for i, prompt in enumerate(prompts):
        torch.manual_seed(seed + i)
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=top_k,
                             pad_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


@torch.no_grad()
def generation_speed(model, prompt_ids: torch.Tensor, new_tokens: int = 64, repeats: int = 3, warmup: int = 1) -> dict:
    """Greedy decoding throughput: exactly `new_tokens` per row, median over `repeats` timed runs."""
    model.eval()
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    kwargs = dict(attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt_ids, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = new_tokens * prompt_ids.shape[0]
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "new_tokens": tokens, "repeats": repeats}


def saved_activation_bytes(step) -> int:
    """Bytes of the tensors autograd saves for the backward pass while `step()` runs its forward (and backward):
    the activation memory of a training step, counted exactly (each storage once) through
    `torch.autograd.graph.saved_tensors_hooks`. What gradient checkpointing reduces; unlike process RSS it does
    not depend on what the allocator kept from earlier steps."""
    seen, total = set(), [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return total[0]


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: Optional[torch.device] = None, interval: float = 0.005):
    """Measure peak memory inside the block: CUDA max allocated on a GPU, else the process RSS sampled every
    `interval` seconds. Yields a dict filled on exit with `peak_bytes`, `baseline_bytes` and `peak_delta_bytes`."""
    result = {}
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result["baseline_bytes"] = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["kind"] = "cuda_max_allocated"
    else:
        result["baseline_bytes"] = peak = _rss_bytes()
        stop = threading.Event()

        def sample():
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _rss_bytes())
                stop.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield result
        finally:
            stop.set()
            sampler.join()
            result["peak_bytes"] = max(peak, _rss_bytes())
            result["kind"] = "rss"
    result["peak_delta_bytes"] = result["peak_bytes"] - result["baseline_bytes"]


__all__ = ["perplexity", "perplexity_on_blocks", "diffusion_elbo_perplexity", "lexical_diversity", "generate_texts",
           "generation_speed", "peak_memory", "saved_activation_bytes", "DEFAULT_PROMPTS"]
