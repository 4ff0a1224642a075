"""Probe: does UnifiedARMT learn to use its memory on BABILong-style qa1, and how far does what it learned reach?

Two modes (both print one JSON line per evaluation and write `<mode>.json` atomically into --out DIR, default
outputs/armt_babilong_probe):

    # train on BabiLong qa1 samples of one kind (few people/facts, short contexts, short segments), optionally
    # starting from a checkpoint; accuracy on 200 held-out samples every --eval-every steps; checkpoint saved there
    python benchmarks/armt_babilong_probe.py train --segment-size 16 --memory-tokens 4 --people 1 --facts 1 \
        --length 64 --steps 3000 --save probe_ckpt --out outputs/probe
    # accuracy of a checkpoint by the number of segments between the asked person's last fact and the answer
    python benchmarks/armt_babilong_probe.py diagnose probe_ckpt --segment-size 16 --length 256 --people 1 \
        --facts 1 --samples 200 --out outputs/probe

The training loop is written out (no Trainer) on purpose: it is the smallest deterministic loop that reproduces the
probe figures in benchmarks/README.md (memory pickup depends on the seed), and it computes the LM head only at the
answer positions. The benchmark proper (`armt_babilong.py`, Trainer + curriculum) takes the same stages through
`--stages` (with `segment_size`). Tokenizer: the 2,048-id BPE of `armt_babilong.py --vocab-size 2048` (retrained
once, cached under --tokenizer-dir).
"""

import argparse
import collections
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402

import armada  # noqa: E402,F401
from armada import UnifiedARMTConfig, UnifiedARMTForCausalLM  # noqa: E402
from armada.io_utils import atomic_directory, atomic_write_text  # noqa: E402
from armada.tasks import BabiLong, BabiTask, tokenize_sample  # noqa: E402
from benchmarks import common  # noqa: E402

NAME = "armt_babilong_probe"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["train", "diagnose"])
    p.add_argument("checkpoint", nargs="?", help="diagnose: the checkpoint to read")
    p.add_argument("--model", choices=["armt", "full"], default="armt",
                   help="armt: UnifiedARMT; full: transformers' GPT2LMHeadModel of the same width/depth/heads "
                        "with full attention (the like-for-like control; --segment-size and the memory flags "
                        "do not apply)")
    p.add_argument("--positions", type=int, default=1040,
                   help="full: its position table (context + question must fit)")
    p.add_argument("--segment-size", type=int, default=16)
    p.add_argument("--memory-tokens", type=int, default=4)
    p.add_argument("--people", type=int, default=1)
    p.add_argument("--facts", type=int, default=1)
    p.add_argument("--questions", type=int, default=1,
                   help="train: questions per story about distinct people, every answer labeled (evaluation asks one)")
    p.add_argument("--lm-weight", type=float, default=0.0,
                   help="train: add this times the next-token loss on the context tokens (0: answers only)")
    p.add_argument("--distinct-people", action="store_true",
                   help="every fact about another person (needs --facts <= --people); train: the training stories "
                        "(held-out evaluation as usual); diagnose: the stories diagnosed")
    p.add_argument("--length", type=int, default=64, help="context tokens (BabiLong target_length)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--samples", type=int, default=200, help="held-out samples per evaluation / diagnosis")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--memory-heads", type=int, default=1, help="heads of the associative memory (num_memory_heads)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--init", default=None, help="train: start from this checkpoint")
    p.add_argument("--save", default=None, help="train: save the model here at every evaluation")
    p.add_argument("--tokenizer-dir", default=os.path.join(REPO, ".cache", "babilong_tokenizer"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available)")
    common.add_common_args(p, NAME, quick=False, threads=1)
    args = p.parse_args(argv)
    if args.distinct_people and args.facts > args.people:
        raise SystemExit(f"--distinct-people needs --facts <= --people, got {args.facts} > {args.people}")
    if args.mode == "diagnose" and not args.checkpoint:
        raise SystemExit("diagnose needs a checkpoint directory")
    for name in ("segment_size", "memory_tokens", "people", "facts", "length", "steps", "batch_size", "eval_every",
                 "samples", "memory_heads", "questions", "positions"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.out = common.output_dir(args, NAME, report=f"{args.mode}.json")
    return args


def tokenizer(args):
    from transformers import AutoTokenizer

    path = os.path.join(args.tokenizer_dir, str(args.vocab_size))
    if not os.path.isdir(path):
        from armt_babilong import small_tokenizer

        with atomic_directory(path) as tmp:
            small_tokenizer(args.vocab_size, ["qa1"]).save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    return tok


def task(args, tok, questions=1, distinct_people=False):
    return BabiLong(babi=BabiTask(task="qa1", n_facts=args.facts, n_people=args.people, n_questions=questions,
                                  distinct_people=distinct_people), target_length=args.length, tokenizer=tok)


def batch(samples, tok):
    rows = [tokenize_sample(s, tok) for s in samples]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return ids, labels, mask


def set_segments(model, segment_size):
    """UnifiedARMT reads in segments of `segment_size`; a full-attention model has none."""
    if isinstance(model, UnifiedARMTForCausalLM):
        model.config.segment_size = segment_size


def to(device, tensors):
    return [t.to(device) for t in tensors]


def answer_loss(model, ids, labels, mask, lm_weight=0.0):
    """Cross-entropy on the answer tokens, per-row exact match (every answer token right) and the predicted answer
    tokens. `lm_weight` > 0 adds that times the next-token loss on every other real token (language modelling on
    the context: a dense signal besides the one answer per sample)."""
    positions = getattr(model.config, "n_positions", None)
    if positions is not None and ids.shape[1] > positions:
        raise ValueError(f"samples of {ids.shape[1]} tokens do not fit the full-attention model's {positions} "
                         "positions; raise --positions (a new model) or lower --length")
    hidden = model.transformer(ids, attention_mask=mask).last_hidden_state
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    where = targets != -100
    logits = model.lm_head(hidden[where])
    right = torch.ones_like(where)
    predicted = logits.argmax(-1)
    right[where] = predicted == targets[where]
    loss = F.cross_entropy(logits, targets[where])
    if lm_weight:
        context = ~where & (mask.bool() & F.pad(mask[:, 1:], (0, 1)).bool())   # real token followed by a real one
        next_ids = F.pad(ids[:, 1:], (0, 1))
        loss = loss + lm_weight * F.cross_entropy(model.lm_head(hidden[context]), next_ids[context])
    return loss, right.all(-1), predicted


@torch.no_grad()
def accuracy(model, generator, tok, n, seed):
    model.eval()
    rng, correct = random.Random(seed), 0
    for start in range(0, n, 25):
        correct += answer_loss(model, *to(model.device, batch(
            [generator.sample(rng) for _ in range(min(25, n - start))], tok)))[1].sum().item()
    model.train()
    return correct / n


def train(args, tok):
    torch.manual_seed(args.seed)
    if args.init:
        model = AutoModelForCausalLM.from_pretrained(args.init)
    elif args.model == "full":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tok), n_positions=args.positions, n_embd=args.hidden_size, n_layer=args.layers,
            n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    else:
        model = UnifiedARMTForCausalLM(UnifiedARMTConfig(
            vocab_size=len(tok), hidden_size=args.hidden_size, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, segment_size=args.segment_size, num_memory_tokens=args.memory_tokens,
            d_mem=64, num_memory_heads=args.memory_heads, position_embedding_type="rotary", max_backprop_segments=None,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    set_segments(model, args.segment_size)
    model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = task(args, tok, args.questions, args.distinct_people)
    rng, curve, start = random.Random(args.seed), [], time.perf_counter()
    held_out = task(args, tok)
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 100)   # linear warmup, then constant
        samples = [generator.sample(rng) for _ in range(args.batch_size)]
        loss, _, _ = answer_loss(model, *to(args.device, batch(samples, tok)), lm_weight=args.lm_weight)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(model, held_out, tok, args.samples, seed=10**6 + args.length)
            curve.append({"step": step, "loss": round(loss.item(), 4), "accuracy": acc,
                          "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(curve[-1]), flush=True)
            if args.save:
                with atomic_directory(args.save, overwrite=True) as tmp:
                    model.save_pretrained(tmp)
    return {"curve": curve}


@torch.no_grad()
def diagnose(args, tok):
    """Accuracy by the number of segment boundaries between the asked person's last fact and the answer position, and
    by whether the asked person is the one in the story's latest fact (a memory whose keys ignore the name returns the
    latest fact's place for everyone: `wrong_with_latest_place` counts those wrong answers), and by the asked name (a
    binding learned on a few fixed names serves those names only: train with `--people` above the benchmark's four
    so every story draws its names from a larger pool). `--distinct-people` diagnoses on such stories."""
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).to(args.device).eval()
    set_segments(model, args.segment_size)
    generator, rng = task(args, tok, distinct_people=args.distinct_people), random.Random(777)
    by_distance = collections.defaultdict(lambda: [0, 0])
    by_asked = {k: dict.fromkeys(("samples", "correct", "wrong_with_latest_place"), 0)
                for k in ("latest_fact_person", "other_person")}
    by_name = collections.defaultdict(lambda: {"samples": 0, "correct": 0})
    for _ in range(args.samples):
        sample = generator.sample(rng)
        person = sample["question"].rstrip("?").split()[-1]
        latest_place = sample["facts"][-1].rstrip(".").split()[-1]
        fact = [f for f in sample["facts"] if f.startswith(person + " ")][-1]
        offsets = tok(sample["context"], return_offsets_mapping=True)["offset_mapping"]
        at = sample["context"].rindex(fact)
        fact_token = next(i for i, (_, end) in enumerate(offsets) if end > at)
        ids, labels, mask = batch([sample], tok)
        _, right, predicted = answer_loss(model, *to(args.device, (ids, labels, mask)))
        asked = by_asked["latest_fact_person" if sample["facts"][-1].startswith(person + " ") else "other_person"]
        asked["samples"] += 1
        asked["correct"] += int(right[0])
        by_name[person]["samples"] += 1
        by_name[person]["correct"] += int(right[0])
        asked["wrong_with_latest_place"] += int(not right[0] and
                                                predicted[0].item() == tok(" " + latest_place)["input_ids"][0])
        answer_position = int((labels[0, 1:] != -100).nonzero()[0])
        distance = answer_position // args.segment_size - fact_token // args.segment_size
        by_distance[distance][0] += int(right[0])
        by_distance[distance][1] += 1
    total = sum(c for c, _ in by_distance.values()) / args.samples
    result = {"accuracy": total, "by_segments_between": {d: {"correct": c, "samples": n}
                                                         for d, (c, n) in sorted(by_distance.items())},
              "by_asked_person": by_asked, "by_name": dict(sorted(by_name.items()))}
    print(json.dumps(result), flush=True)
    return result


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = tokenizer(args)
    result = train(args, tok) if args.mode == "train" else diagnose(args, tok)
    path = os.path.join(args.out, f"{args.mode}.json")
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(path, json.dumps({"args": vars(args), **result}, indent=2))
    common.print_written([path])


if __name__ == "__main__":
    main()
