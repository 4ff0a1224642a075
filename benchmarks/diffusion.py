"""ThoughtDiffusion vs a GPT-2 of the same size: quality, sampling speed, sample quality, the seed's claims.

One run, on the GPT-2 BPE (restricted to the token types of the text, see `Vocabulary`) and the shared
wikitext-2 text:
  train     ThoughtDiffusion (block-causal, block 16, thought stack 8 with thought_train_prob 0.2, rotary positions, one
            neighbouring token on each side), its --ablations (default `no_stack`: thought_stack_size=0; also
            `no_neighbors`: neighbor_tokens=0, `absolute_positions`: a learned position table, as GPT-2's) and
            GPT2LMHeadModel, same width/depth/heads, on the same blocks of wikitext-2/valid.txt in the same order (same
            token budget, 1,500 steps of 8 x 128 tokens, about 6 passes; bf16 autocast; a plain AdamW loop, identical
            for all, rather than Trainer, so that nothing but the model differs). The diffusion models train each batch
            also with the complementary mask (--complementary-masking: every token a target once per step, as every
            token is one for GPT-2; twice their compute per step for the same tokens). GPT-2 overfits this small text
            within the budget: it is evaluated every --eval-every steps and keeps its best weights (early stopping on
            the test subset: the baseline at its best, the conservative choice for the diffusion model's ratios)
  quality   the diffusion models' ELBO perplexity bound on a fixed subset of wikitext-2/test.txt (the first
            --eval-blocks blocks; t on a fixed midpoint grid of --elbo-t values, seeded masks), empty stack and
            with one self-conditioning thought (a noisier pass first, as in training); GPT-2's perplexity on the
            same blocks (the first token of a block has no context for GPT-2 and is not scored)
  sampling  --new-tokens new tokens after a 32-token test prompt, batch 1, temperature --temperature: GPT-2's
            generate (KV cache) vs ThoughtDiffusion at each of --steps-list steps, with and without the block KV
            cache, with and without a confidence threshold (0.9). Timed in rounds: every variant once per round
            (shuffled, one prompt per round), a speed ratio is the median over rounds of the ratio measured in the
            same round (paired: the machine is shared, its speed drifts). The same samples give sample quality:
            perplexity of the new tokens under the trained GPT-2, and distinct-2; the test text's own continuations
            of the same prompts are scored the same way (what real text gets)
  claims    gradient checkpointing's memory saving on one training step (bytes saved for backward, exact; and the
            process's peak RSS growth), bf16 autocast vs fp32 training-step and forward time (paired rounds), the
            vectorized thought encoder vs a per-slot Python loop (paired rounds; outputs checked equal)

Writes diffusion.json, diffusion.png and diffusion.md to --out (default outputs/diffusion; an existing report is
refused unless --overwrite; benchmarks/results/diffusion only with --update-committed-results). Exits non-zero
when a target is missed (quick mode: never, its budget is not meant to meet them).

    python benchmarks/diffusion.py                        # full run (~50 min on 2 idle cores)
    python benchmarks/diffusion.py --quick --out /tmp/d   # tiny budget, smoke test (about a minute)
"""

import argparse
import copy
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from armada import ThoughtDiffusionConfig, ThoughtDiffusionForMaskedLM, ThoughtStack
from armada.evaluation import diffusion_elbo_perplexity, lexical_diversity, peak_memory, saved_activation_bytes
from armada.tokenization import gpt2_tokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

REPO = common.REPO
DATA = os.path.join(REPO, "..", "shared", "data", "wikitext-2")
TARGETS = {"elbo_ppl_ratio_max": 1.3, "speed_ratio_min_at_16": 1.5, "sample_ppl_ratio_max_at_16": 1.5}
THRESHOLD = 0.9
ABLATIONS = {"no_stack": dict(thought_stack_size=0), "no_neighbors": dict(neighbor_tokens=0),
             "absolute_positions": dict(position_embedding_type="absolute")}
PROMPT_TOKENS = 32


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, "diffusion", device=True)
    parser.add_argument("--train-steps", type=int, default=None, help="optimizer steps per model (default 1500)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-time-range", type=float, nargs=2, default=(0.2, 0.7), metavar=("MIN", "MAX"),
                        help="ThoughtDiffusion's training t range (min_train_time, max_train_time; default 0.2 0.7, a "
                             "clipped schedule as BD3-LM's, whose [0.3, 0.8] for blocks of 16 did a little worse in "
                             "pilots; the ELBO is still evaluated over (eps, 1))")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="train every model under bf16 autocast (fp32 weights and optimizer; evaluation in fp32; "
                             "default on: faster steps (the run's bf16 claim), the same ELBO in a pilot; "
                             "--no-bf16: fp32)")
    parser.add_argument("--eval-every", type=int, default=250,
                        help="GPT-2's test perplexity every this many steps; it keeps its best weights (default 250)")
    parser.add_argument("--neighbor-tokens", type=int, default=1,
                        help="ThoughtDiffusion's neighbor_tokens (tokens on each side every input reads; default 1)")
    parser.add_argument("--thought-train-prob", type=float, default=0.2,
                        help="ThoughtDiffusion's thought_train_prob (share of batches conditioned on a noisier "
                             "pass's thought; default 0.2: a lower ELBO than the config's 0.5 in a pilot)")
    parser.add_argument("--complementary-masking", action=argparse.BooleanOptionalAction, default=True,
                        help="the diffusion models train each batch also with the complementary mask (every token "
                             "a target once per step; 2x their compute per step, the same tokens; default on)")
    parser.add_argument("--ablations", default="no_stack",
                        help=f"ThoughtDiffusion variants trained beside it, comma-separated, from {sorted(ABLATIONS)} "
                             "(default no_stack, needed for the thought ablation rows; 13 minutes of training in the "
                             "committed run)")
    parser.add_argument("--eval-blocks", type=int, default=None, help="test blocks for perplexity (default 48)")
    parser.add_argument("--elbo-t", type=int, default=None, help="t grid points per block (default 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128")
    parser.add_argument("--steps-list", default=None, help="denoising steps to time (default 8,16,32,64)")
    parser.add_argument("--rounds", type=int, default=None, help="timed sampling rounds (default 8)")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(train_steps=(2, 1500), eval_blocks=(2, 48), elbo_t=(2, 8), new_tokens=(16, 128),
                    steps_list=("2,4", "8,16,32,64"), rounds=(1, 8))
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if quick:
        args.hidden, args.layers, args.heads, args.seq_len, args.batch_size = 32, 2, 2, 64, 2
    args.steps_list = [int(s) for s in args.steps_list.split(",")]
    if args.update_committed_results and args.out is None:
        args.out = os.path.join(common.COMMITTED_RESULTS, "diffusion")
    for name in ("train_steps", "eval_blocks", "elbo_t", "new_tokens", "rounds", "threads", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens % args.block_length or any(s < args.new_tokens // args.block_length or s > args.new_tokens
                                                  for s in args.steps_list):
        parser.error(f"--new-tokens must be a multiple of --block-length and every step count in "
                     f"[{args.new_tokens // args.block_length}, {args.new_tokens}], got {args.new_tokens} / "
                     f"{args.steps_list}")
    low, high = args.train_time_range
    if not 1e-3 <= low < high <= 1:
        parser.error(f"--train-time-range must be MIN MAX with 0.001 <= MIN < MAX <= 1, got {low} {high}")
    args.ablations = [a for a in args.ablations.split(",") if a]
    unknown = sorted(set(args.ablations) - set(ABLATIONS))
    if unknown:
        parser.error(f"--ablations must name some of {sorted(ABLATIONS)}, got {unknown}")
    if not 0 <= args.thought_train_prob <= 1:
        parser.error(f"--thought-train-prob must be in [0, 1], got {args.thought_train_prob}")
    if args.neighbor_tokens < 0:
        parser.error(f"--neighbor-tokens must be >= 0, got {args.neighbor_tokens}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    args.out = common.output_dir(args, "diffusion")
    return args


# ------------------------------------------------------------------------------------------------ data and models
def text_blocks(name, tokenizer, length, max_chars=None):
    """Consecutive blocks of `length` tokens of a shared text file (its first `max_chars` characters)."""
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        text = f.read(max_chars) if max_chars else f.read()
    ids = torch.tensor(tokenizer(text).input_ids)
    return ids[:len(ids) // length * length].view(-1, length)


class Vocabulary:
    """The GPT-2 token types that occur in the benchmark's text (+ EOS and [MASK]), renumbered 0..n-1: the output
    softmax over 50K types is most of the cost of these small models on a CPU; both models share this vocabulary."""

    def __init__(self, tokenizer, *blocks):
        types = torch.unique(torch.cat([b.flatten() for b in blocks] + [torch.tensor([tokenizer.eos_token_id])]))
        self.tokenizer, self.gpt2_ids = tokenizer, types
        self.lookup = torch.full((len(tokenizer),), -1, dtype=torch.long)
        self.lookup[types] = torch.arange(len(types))
        self.eos_id, self.mask_id, self.size = int(self.lookup[tokenizer.eos_token_id]), len(types), len(types) + 1

    def encode(self, gpt2_ids):
        return self.lookup[gpt2_ids]

    def decode(self, ids):
        ids = ids.cpu()
        ids = ids[ids < len(self.gpt2_ids)]
        return self.tokenizer.decode(self.gpt2_ids[ids])


def build_models(args, vocab):
    common = dict(vocab_size=vocab.size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, max_position_embeddings=2 * args.seq_len + args.new_tokens,
                  mask_token_id=vocab.mask_id, block_length=args.block_length, neighbor_tokens=args.neighbor_tokens,
                  thought_train_prob=args.thought_train_prob, complementary_masking=args.complementary_masking,
                  min_train_time=args.train_time_range[0], max_train_time=args.train_time_range[1],
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=vocab.eos_id,
                  bos_token_id=vocab.eos_id, eos_token_id=vocab.eos_id)
    models = {}
    for name, overrides in {"thought_diffusion": {}, **{a: ABLATIONS[a] for a in args.ablations}}.items():
        torch.manual_seed(args.seed)
        models[name] = ThoughtDiffusionForMaskedLM(ThoughtDiffusionConfig(**{**common, **overrides}))
    torch.manual_seed(args.seed)
    ar = GPT2LMHeadModel(GPT2Config(vocab_size=vocab.size, n_embd=args.hidden, n_layer=args.layers,
                                    n_head=args.heads, n_positions=common["max_position_embeddings"], resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab.eos_id,
                                    eos_token_id=vocab.eos_id))
    models["gpt2"] = ar
    return models


def train(model, blocks, args, name, evaluate=None):
    """AdamW, 5% warm-up then cosine decay; the same block order for every model (seeded permutation); under bf16
    autocast with --bf16. `evaluate(model) -> perplexity`, when given, runs every --eval-every steps and at the end;
    the model keeps the weights of its best evaluation (early stopping: GPT-2's baseline, the conservative choice)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.train_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.train_steps))))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))
    curve, evaluations, best, seconds = [], [], None, 0.0
    torch.manual_seed(args.seed)
    for step in range(args.train_steps):
        start = time.perf_counter()
        index = order[(torch.arange(args.batch_size) + step * args.batch_size) % len(blocks)]
        batch = blocks[index]
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        value = float((out.elbo if getattr(out, "elbo", None) is not None else out.loss).detach())
        curve.append(value)
        if step % max(1, args.train_steps // 10) == 0:
            print(f"[{name}] step {step} loss {value:.3f}", file=sys.stderr, flush=True)
        if evaluate is not None and ((step + 1) % args.eval_every == 0 or step + 1 == args.train_steps):
            model.eval()
            evaluations.append({"step": step + 1, "perplexity": evaluate(model)})
            if best is None or evaluations[-1]["perplexity"] < best[0]:
                best = (evaluations[-1]["perplexity"], step + 1, copy.deepcopy(model.state_dict()))
            model.train()
    model.eval()
    run = {"seconds": seconds, "curve": curve, "tokens": args.train_steps * args.batch_size * args.seq_len,
           "parameters": sum(p.numel() for p in model.parameters())}
    if best is not None:
        model.load_state_dict(best[2])
        run.update(evaluations=evaluations, kept_step=best[1])
    return run


# ------------------------------------------------------------------------------------------------ quality
def elbo_perplexity(model, blocks, args, with_thought=False):
    """armada.evaluation.diffusion_elbo_perplexity with this run's --elbo-t, --batch-size and --seed."""
    return diffusion_elbo_perplexity(model, blocks, t_points=args.elbo_t, batch_size=args.batch_size, seed=args.seed,
                                     with_thought=with_thought)


@torch.no_grad()
def ar_perplexity(model, blocks, args):
    nll, count = 0.0, 0
    for i in range(0, len(blocks), args.batch_size):
        batch = blocks[i:i + args.batch_size]
        logits = model(batch).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


@torch.no_grad()
def sample_perplexity(ar, prompts, samples):
    """Perplexity of the sampled tokens under the AR model, given their prompt."""
    nll, count = 0.0, 0
    for prompt, sample in zip(prompts, samples):
        ids = torch.cat([prompt, sample]).unsqueeze(0)
        logits = ar(ids).logits[0, len(prompt) - 1:-1].float()
        nll += float(F.cross_entropy(logits, sample, reduction="sum"))
        count += len(sample)
    return math.exp(nll / count)


# ------------------------------------------------------------------------------------------------ sampling
def sampling_variants(args):
    variants = {"gpt2": None}
    for steps in args.steps_list:
        for cache in (True, False):
            for threshold in (None, THRESHOLD):
                name = f"td_{steps}{'_cache' if cache else ''}{'_thr' if threshold else ''}"
                variants[name] = dict(num_steps=steps, use_block_cache=cache, confidence_threshold=threshold)
    variants["no_stack_16_cache"] = dict(num_steps=16, use_block_cache=True, confidence_threshold=None)
    return {k: v for k, v in variants.items()
            if not k.startswith("no_stack") or (16 in args.steps_list and "no_stack" in args.ablations)}


@torch.no_grad()
def run_variant(name, spec, models, prompt, args, seed):
    torch.manual_seed(seed)
    start = time.perf_counter()
    if spec is None:
        out = models["gpt2"].generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                      temperature=args.temperature, top_k=0, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, pad_token_id=0)
        new, forwards = out[0, prompt.shape[1]:], args.new_tokens
    else:
        model = models["no_stack" if name.startswith("no_stack") else "thought_diffusion"]
        out = model.generate_with_stack(prompt, max_new_tokens=args.new_tokens, temperature=args.temperature, **spec)
        new, forwards = out.sequences[0, prompt.shape[1]:], out.num_forward_passes
    common.synchronize(prompt.device)
    return time.perf_counter() - start, new, forwards


def measure_sampling(models, test_blocks, vocab, args):
    variants = sampling_variants(args)
    rng = random.Random(args.seed)
    times = {name: [] for name in variants}
    samples = {name: [] for name in variants}
    forwards = {name: [] for name in variants}
    prompts = []
    for name, spec in variants.items():  # warm-up
        run_variant(name, spec, models, test_blocks[0:1, :PROMPT_TOKENS], args, 0)
    for r in range(args.rounds):
        prompt = test_blocks[(r + 1) % len(test_blocks)][None, :PROMPT_TOKENS]
        prompts.append(prompt[0])
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            seconds, new, n = run_variant(name, variants[name], models, prompt, args, seed=args.seed + r)
            times[name].append(seconds)
            samples[name].append(new)
            forwards[name].append(n)
        print(f"[sampling] round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    results = {}
    for name in variants:
        paired = [times["gpt2"][r] / times[name][r] for r in range(args.rounds)]
        texts = [vocab.decode(s) for s in samples[name]]
        results[name] = {
            **(variants[name] or {"kind": "gpt2 generate, KV cache"}),
            "tokens_per_s": args.new_tokens / statistics.median(times[name]),
            "speed_ratio_vs_gpt2": statistics.median(paired),
            "forward_passes": statistics.mean(forwards[name]),
            "sample_perplexity_under_gpt2": sample_perplexity(models["gpt2"], prompts, samples[name]),
            "distinct_2": lexical_diversity(texts)["distinct_2"],
            "example": texts[0][:300],
        }
    return results


@torch.no_grad()
def reference_text(models, test_blocks, vocab, args):
    """The test text's own continuations of the sampling prompts (the next --new-tokens tokens), scored as the samples
    are: what real text gets on the sample-quality figures."""
    prompts, continuations = [], []
    for r in range(args.rounds):
        text = torch.cat([test_blocks[r + 1], test_blocks[r + 2]])
        prompts.append(text[:PROMPT_TOKENS])
        continuations.append(text[PROMPT_TOKENS:PROMPT_TOKENS + args.new_tokens])
    texts = [vocab.decode(c) for c in continuations]
    return {"kind": "the test text's own continuation of each prompt",
            "sample_perplexity_under_gpt2": sample_perplexity(models["gpt2"], prompts, continuations),
            "distinct_2": lexical_diversity(texts)["distinct_2"], "example": texts[0][:300]}


# ------------------------------------------------------------------------------------------------ seed's claims
def one_training_step(model, batch, bf16=False):
    model.train()
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def paired_rounds(functions, rounds, seed):
    """Median time of each function and the paired median ratio first / each, over interleaved rounds."""
    rng = random.Random(seed)
    times = {name: [] for name in functions}
    for fn in functions.values():
        fn()
    for _ in range(rounds):
        order = list(functions)
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    first = next(iter(functions))
    return {name: {"seconds": statistics.median(t),
                   "ratio_to_" + first: statistics.median(a / b for a, b in zip(times[first], t))}
            for name, t in times.items()}


def checkpointing_memory(model, batch, rounds):
    """Activation memory of one training step (bytes autograd saves for backward, counted exactly) with and without
    gradient checkpointing, and the process's peak RSS growth during the step (median of rounds; coarse: the
    allocator keeps memory from earlier steps)."""
    saved, peaks = {}, {False: [], True: []}
    for enabled in (False, True):
        if enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        torch.manual_seed(0)
        saved[enabled] = saved_activation_bytes(lambda: one_training_step(model, batch)) / 2**20
        for _ in range(rounds):
            torch.manual_seed(0)
            with peak_memory() as memory:
                one_training_step(model, batch)
            peaks[enabled].append(memory["peak_delta_bytes"] / 2**20)
    model.gradient_checkpointing_disable()
    return {"saved_for_backward_mib": saved[False], "saved_for_backward_mib_checkpointing": saved[True],
            "saving": 1 - saved[True] / saved[False], "peak_rss_delta_mib": statistics.median(peaks[False]),
            "peak_rss_delta_mib_checkpointing": statistics.median(peaks[True]), "batch": list(batch.shape),
            "rounds": rounds}


def encode_slots_one_at_a_time(encoder, stack):
    """The thought encoder one row and one slot at a time, with plain tensor ops (the per-slot loop the
    vectorized `ThoughtStackEncoder` replaces; tests check the two agree)."""
    slots, valid = stack.read()
    n, s = valid.shape
    attn, heads = encoder.attn, encoder.attn.num_heads
    out = torch.zeros(n, 1 + s, encoder.input_proj.out_features, device=slots.device)
    for row in range(n):
        x = [encoder.input_proj(slots[row, i].flatten()) + encoder.temporal.weight[i] for i in range(s)]
        encoded = []
        for i in range(s):
            q, _, _ = attn.qkv(encoder.ln_1(x[i])[None, None])
            visible = [j for j in range(s) if valid[row, j] or j == i]
            kv = [attn.qkv(encoder.ln_1(x[j])[None, None]) for j in visible]
            k = torch.cat([t[1] for t in kv], dim=2)
            v = torch.cat([t[2] for t in kv], dim=2)
            w = (q @ k.transpose(-1, -2) * attn.scaling).softmax(-1)
            y = x[i] + attn.c_proj((w @ v).transpose(1, 2).reshape(1, -1))[0]
            encoded.append(y + encoder.mlp(encoder.ln_2(y)))
        pool = encoder.pooling
        context = [pool.null] + [encoded[j] for j in range(s) if valid[row, j]]
        q = pool.attn.q_proj(pool.query).view(heads, 1, -1)
        kv = pool.attn.kv_proj(torch.stack(context)).split(q.shape[-1] * heads, dim=-1)
        k, v = (t.view(len(context), heads, -1).transpose(0, 1) for t in kv)
        w = (q @ k.transpose(-1, -2) * pool.attn.scaling).softmax(-1)
        pooled = pool.attn.c_proj((w @ v).reshape(-1))
        out[row] = encoder.ln_f(torch.stack([pooled] + encoded))
    return out, torch.cat([torch.ones(n, 1, dtype=torch.bool, device=valid.device), valid], dim=1)


@torch.no_grad()
def encoder_speed(model, args):
    config, encoder = model.config, model.transformer.thought_encoder
    stack = ThoughtStack.empty(config, args.batch_size, device=args.device)
    for _ in range(config.thought_stack_size):
        stack = stack.push(torch.randn(args.batch_size, *config.thought_dims, device=args.device))
    vectorized, _ = encoder(stack, torch.float32)
    looped, _ = encode_slots_one_at_a_time(encoder, stack)
    timing = paired_rounds({"per_slot_loop": lambda: encode_slots_one_at_a_time(encoder, stack),
                            "vectorized": lambda: encoder(stack, torch.float32)}, args.rounds * 3, args.seed)
    return {**timing, "max_abs_diff": float((vectorized - looped).abs().max()), "batch": args.batch_size,
            "slots": config.thought_stack_size}


def seed_claims(model, blocks, args):
    batch = blocks[:args.batch_size * 2]
    step_time = paired_rounds({"fp32": lambda: one_training_step(model, batch),
                               "bf16_autocast": lambda: one_training_step(model, batch, bf16=True)},
                              args.rounds, args.seed)

    def forward(bf16):
        with torch.no_grad(), torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
            model.eval()
            model(input_ids=batch.masked_fill(torch.rand(batch.shape, device=batch.device) < 0.5,
                                              model.config.mask_token_id))

    forward_time = paired_rounds({"fp32": lambda: forward(False), "bf16_autocast": lambda: forward(True)},
                                 args.rounds, args.seed)
    model.eval()
    return {"gradient_checkpointing": checkpointing_memory(model, batch, max(2, args.rounds // 2)),
            "bf16_training_step": step_time, "bf16_forward": forward_time, "encoder": encoder_speed(model, args)}


# ------------------------------------------------------------------------------------------------ report
def environment(args):
    return {**common.environment(args.threads, args.device), "load_average_at_start": os.getloadavg(),
            "note": "absolute speeds depend on the machine's load; speed ratios are paired per round"}


def write_report(report, args):
    plt = common.pyplot()
    paths = common.write_report(args.out, "diffusion", report, markdown(report))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, run in report["training"].items():
        curve = run["curve"]
        window = max(1, len(curve) // 25)
        smooth = [statistics.mean(curve[max(0, i - window):i + 1]) for i in range(len(curve))]
        axes[0].plot(smooth, label=f"{name} ({'ELBO' if name != 'gpt2' else 'NLL'})")
    axes[0].set(xlabel="step", ylabel="nats / token", title="training loss (same blocks, same order)")
    axes[0].legend()
    sampling = report["sampling"]
    for cache in (True, False):
        for threshold in (False, True):
            names = [f"td_{s}{'_cache' if cache else ''}{'_thr' if threshold else ''}" for s in args.steps_list]
            label = f"{'cache' if cache else 'recompute'}{' + threshold' if threshold else ''}"
            axes[1].plot(args.steps_list, [sampling[n]["tokens_per_s"] for n in names], marker="o", label=label)
            if not threshold:
                axes[2].plot(args.steps_list, [sampling[n]["sample_perplexity_under_gpt2"] for n in names],
                             marker="o", label=label)
    axes[1].axhline(sampling["gpt2"]["tokens_per_s"], color="k", ls="--", label="GPT-2 generate (KV cache)")
    axes[1].set(xscale="log", xlabel="denoising steps", ylabel="tokens / s", title=f"{args.new_tokens} new tokens")
    axes[1].legend(fontsize=8)
    axes[2].axhline(sampling["gpt2"]["sample_perplexity_under_gpt2"], color="k", ls="--", label="GPT-2's own samples")
    axes[2].axhline(report["sampling_reference"]["sample_perplexity_under_gpt2"], color="g", ls=":",
                    label="the test text itself")
    axes[2].set(xscale="log", yscale="log", xlabel="denoising steps", ylabel="perplexity under GPT-2",
                title="sample quality")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    common.print_written(paths + [common.save_figure(fig, args.out, "diffusion.png")])


def markdown(report):
    q, s = report["quality"], report["sampling"]
    lines = ["| model | test perplexity (fixed subset) | ratio to GPT-2 |", "|---|---|---|"]
    ar = q["gpt2"]["perplexity"]
    for name in ("thought_diffusion", "thought_diffusion_with_thought", *report["args"]["ablations"]):
        lines.append(f"| {name} (ELBO bound) | {q[name]['perplexity']:.1f} | {q[name]['perplexity'] / ar:.2f}x |")
    lines.append(f"| gpt2 | {ar:.1f} | 1.00x |")
    gpt2 = report["training"]["gpt2"]
    lines += ["", "GPT-2's test perplexity during training (it keeps the weights of step "
              f"{gpt2['kept_step']}): " + ", ".join(f"{e['step']}: {e['perplexity']:.1f}" for e in gpt2["evaluations"])]
    lines += ["", "| sampler | steps | forwards | tokens/s | speed vs GPT-2 (paired) | sample ppl under GPT-2 | "
              "distinct-2 |", "|---|---|---|---|---|---|---|"]
    for name, r in s.items():
        lines.append(f"| {name} | {r.get('num_steps', '-')} | {r['forward_passes']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{r['speed_ratio_vs_gpt2']:.2f}x | {r['sample_perplexity_under_gpt2']:.1f} | "
                     f"{r['distinct_2']:.3f} |")
    ref = report["sampling_reference"]
    lines += ["", f"The test text's own continuations of the same prompts: perplexity under GPT-2 "
              f"{ref['sample_perplexity_under_gpt2']:.1f}, distinct-2 {ref['distinct_2']:.3f}."]
    c = report["claims"]
    g = c["gradient_checkpointing"]
    lines += ["", f"- gradient checkpointing: activations saved for backward {g['saved_for_backward_mib']:.0f} MiB -> "
              f"{g['saved_for_backward_mib_checkpointing']:.0f} MiB per training step ({g['saving']:.0%} less; batch "
              f"{g['batch']}); peak RSS growth {g['peak_rss_delta_mib']:.0f} -> "
              f"{g['peak_rss_delta_mib_checkpointing']:.0f} MiB",
              f"- bf16 autocast vs fp32: training step {c['bf16_training_step']['bf16_autocast']['ratio_to_fp32']:.2f}x"
              f", forward {c['bf16_forward']['bf16_autocast']['ratio_to_fp32']:.2f}x the fp32 speed",
              f"- vectorized encoder vs per-slot loop: {c['encoder']['vectorized']['ratio_to_per_slot_loop']:.1f}x "
              f"faster (max abs diff {c['encoder']['max_abs_diff']:.1e})"]
    lines += ["", "Targets: " + ", ".join(f"{k}: {'met' if v else 'missed'}" for k, v in report["targets"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = gpt2_tokenizer(model_max_length=10**6)
    max_chars = 60_000 if args.quick else None
    train_blocks = text_blocks("valid.txt", tokenizer, args.seq_len, max_chars)
    test_blocks = text_blocks("test.txt", tokenizer, args.seq_len, max_chars)
    vocab = Vocabulary(tokenizer, train_blocks, test_blocks)
    train_blocks = vocab.encode(train_blocks).to(args.device)
    test_blocks = vocab.encode(test_blocks)[:max(args.eval_blocks, args.rounds + 2)].to(args.device)
    models = {name: model.to(args.device) for name, model in build_models(args, vocab).items()}
    report = {"args": {**vars(args), "device": str(args.device)}, "environment": environment(args),
              "targets_definition": TARGETS,
              "vocabulary": {"types": vocab.size, "note": Vocabulary.__doc__.split(":")[0]}, "training": {},
              "quality": {}}
    eval_blocks = test_blocks[:args.eval_blocks]
    for name, model in models.items():
        evaluate = (lambda m: ar_perplexity(m, eval_blocks, args)["perplexity"]) if name == "gpt2" else None
        report["training"][name] = train(model, train_blocks, args, name, evaluate)
    report["quality"] = {
        "thought_diffusion": elbo_perplexity(models["thought_diffusion"], eval_blocks, args),
        "thought_diffusion_with_thought": elbo_perplexity(models["thought_diffusion"], eval_blocks, args, True),
        **{name: elbo_perplexity(models[name], eval_blocks, args) for name in args.ablations},
        "gpt2": ar_perplexity(models["gpt2"], eval_blocks, args)}
    report["sampling"] = measure_sampling(models, test_blocks, vocab, args)
    report["sampling_reference"] = reference_text(models, test_blocks, vocab, args)
    report["claims"] = seed_claims(models["thought_diffusion"], train_blocks, args)
    ar_ppl = report["quality"]["gpt2"]["perplexity"]
    best = min(report["quality"][k]["perplexity"] for k in ("thought_diffusion", "thought_diffusion_with_thought"))
    s16 = report["sampling"].get("td_16_cache")
    report["targets"] = {"elbo_ppl_ratio": best / ar_ppl <= TARGETS["elbo_ppl_ratio_max"]}
    if s16:
        report["targets"]["speed_at_16"] = s16["speed_ratio_vs_gpt2"] >= TARGETS["speed_ratio_min_at_16"]
        report["targets"]["sample_ppl_at_16"] = (s16["sample_perplexity_under_gpt2"] / report["sampling"]["gpt2"][
            "sample_perplexity_under_gpt2"] <= TARGETS["sample_ppl_ratio_max_at_16"])
    write_report(report, args)
    print(markdown(report))
    return report


def exit_status(report) -> int:
    """Non-zero when a target is missed (never in quick mode)."""
    checks = [{"name": name, "pass": None if report["args"]["quick"] else met}
              for name, met in report["targets"].items()]
    return common.report_checks(checks)


if __name__ == "__main__":
    sys.exit(exit_status(main()))
