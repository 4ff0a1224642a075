"""Speed of a pruned AgencyGPT2 vs GPT2LMHeadModel (unpruned) and vs GPT2LMHeadModel pruned by transformers.

One run measures, on the GPT-2 124M shape (random weights, seeded, eval, fp32, inference_mode, 2 CPU threads):
  forward   tokens/s, batch 4 x 256 tokens, full-sequence forward with use_cache=False
  generate  tokens/s (new tokens / wall time, prefill included), batch 1, 32-token prompt, 64 greedy new tokens
for pruning levels 0, 0.3, 0.5, 0.7 and three models:
  baseline  GPT2LMHeadModel, unpruned: the denominator of every ratio
  agency    AgencyGPT2ForCausalLM.from_gpt2(baseline), then prune_heads(heads chosen at that level)
  peer      deepcopy(baseline).prune_heads(the same heads): transformers' own GPT-2 head pruning
The heads are chosen once, on the unpruned AgencyGPT2: select_heads(score_heads(model, "magnitude"), level).
Every variant is warmed up, then timed in rounds: in each round every variant runs the forward once (round-robin,
order shuffled, seeded), then every variant runs generate once. A ratio is the median over rounds of the two speeds
measured in the same round (paired): on a shared host the machine's speed drifts by tens of percent over minutes,
which a ratio of medians taken minutes apart does not cancel (that ratio of medians is kept in the JSON). The
unpruned "peer" is a copy of the baseline, so its distance from 1.00x shows the noise floor of the run. "Never
slower than the peer" fails when the paired ratio is below 1 and a one-sided sign test over the rounds (how many
rounds AgencyGPT2 lost) says that is not chance (p < 0.05).

The machine may be shared. For every sample the script records the share of the CPUs other processes used while
it ran ("foreign load", from /proc/stat); before a sample it waits for them to go quiet, and it re-runs a sample
whose foreign load exceeds 10%, both from a bounded budget (--max-wait). Samples still contended are counted.

    python benchmarks/agency_speed.py                       # full run (~10 min on 2 quiet cores) -> benchmarks/results
    python benchmarks/agency_speed.py --quick --out /tmp/b  # tiny model, smoke test (seconds)
"""

import argparse
import copy
import datetime
import json
import math
import os
import platform
import random
import statistics
import time

import torch
import transformers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from armada import AgencyGPT2ForCausalLM
from armada.io_utils import atomic_savefig, atomic_write_text
from armada.pruning import score_heads, select_heads

LEVELS = (0.0, 0.3, 0.5, 0.7)
TARGETS = {0.0: 0.97, 0.5: 1.10, 0.7: 1.15}  # minimum speed ratio of AgencyGPT2 to the unpruned GPT2LMHeadModel
MEASURES = ("forward", "generate")
CONTENDED = 0.10  # foreign load above which a sample counts as contended
# AgencyGPT2 and the peer run the same matmuls, so their paired ratio scatters around 1.00 by the run's noise. "Not
# slower than the peer" fails when the median ratio is below 1 and a one-sided sign test over the rounds rejects
# "equally fast" at this level: a real slowdown of ~1% is caught with 20 rounds, a coin-flip 0.99 is not.
SIGNIFICANCE = 0.05

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="tiny model and inputs, 1 warm-up, 2 rounds (smoke test)")
parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20, quick 2)")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--max-wait", type=float, default=None,
                    help="seconds the run may spend waiting for, or re-measuring under, other processes' load "
                         "(default 120, quick 10)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

if args.quick:
    model_config = GPT2Config(n_layer=4, n_embd=192, n_head=12, vocab_size=1000, n_positions=256)
    fwd_batch, fwd_len, prompt_len, new_tokens, warmup, rounds = 2, 64, 8, 8, 1, 2
else:
    model_config = GPT2Config()  # GPT-2 124M: 12 layers, 768 wide, 12 heads, vocab 50257
    fwd_batch, fwd_len, prompt_len, new_tokens, warmup, rounds = 4, 256, 32, 64, 1, 20
rounds = args.rounds or rounds
max_wait = args.max_wait if args.max_wait is not None else (10.0 if args.quick else 120.0)
torch.set_num_threads(args.threads)
started = time.perf_counter()

# ----------------------------------------------------------------------------- models
torch.manual_seed(args.seed)
baseline = GPT2LMHeadModel(model_config).eval()
reference = AgencyGPT2ForCausalLM.from_gpt2(baseline).eval()
scores = score_heads(reference, "magnitude")
heads = {level: select_heads(scores, level) for level in LEVELS}
n_heads = model_config.n_layer * model_config.n_head
for level, selection in heads.items():
    full = [layer for layer, h in selection.items() if len(h) == model_config.n_head]
    if full:  # GPT2LMHeadModel cannot run a layer with no head left; AgencyGPT2 can
        raise SystemExit(f"level {level} prunes every head of layers {full}: the peer cannot run it")

variants = {("baseline", 0.0): baseline}
for level in LEVELS:
    agency = AgencyGPT2ForCausalLM.from_gpt2(baseline).eval()
    peer = copy.deepcopy(baseline).eval()
    if heads[level]:
        agency.prune_heads(heads[level])
        peer.prune_heads(heads[level])
    variants[("agency", level)] = agency
    variants[("peer", level)] = peer

gen = torch.Generator().manual_seed(args.seed)
fwd_ids = torch.randint(0, model_config.vocab_size, (fwd_batch, fwd_len), generator=gen)
prompt = torch.randint(0, model_config.vocab_size, (1, prompt_len), generator=gen)
# All-ones attention masks, as a tokenizer returns for unpadded inputs. Without one, GPT2LMHeadModel (4.57) builds an
# explicit (B, 1, T, T) mask for the forward and leaves SDPA's is_causal path, which would flatter AgencyGPT2.
fwd_mask = torch.ones_like(fwd_ids)
gen_kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, pad_token_id=0)

# ----------------------------------------------------------------------------- correctness checks
checks = {"logits_max_abs_diff_agency_vs_peer": {}, "greedy_equal_agency_vs_peer": {}}
with torch.inference_mode():
    check_ids = fwd_ids[:2, :64]
    agency0 = variants[("agency", 0.0)]
    checks["logits_max_abs_diff_agency_vs_baseline_level0"] = (
        agency0(check_ids, use_cache=False).logits - baseline(check_ids, use_cache=False).logits).abs().max().item()
    checks["greedy_equal_agency_vs_baseline_level0"] = torch.equal(
        agency0.generate(prompt, **gen_kwargs), baseline.generate(prompt, **gen_kwargs))
    for level in LEVELS:
        agency, peer = variants[("agency", level)], variants[("peer", level)]
        diff = (agency(check_ids, use_cache=False).logits - peer(check_ids, use_cache=False).logits).abs().max()
        checks["logits_max_abs_diff_agency_vs_peer"][str(level)] = diff.item()
        checks["greedy_equal_agency_vs_peer"][str(level)] = torch.equal(
            agency.generate(prompt, **gen_kwargs), peer.generate(prompt, **gen_kwargs))
checks["logits_tolerance"] = 1e-4
checks["pass"] = (checks["greedy_equal_agency_vs_baseline_level0"]
                  and checks["logits_max_abs_diff_agency_vs_baseline_level0"] <= 1e-4
                  and all(d <= 1e-4 for d in checks["logits_max_abs_diff_agency_vs_peer"].values()))
print(f"checks: {json.dumps(checks)}")

# ----------------------------------------------------------------------------- timing
HZ, NCPU = os.sysconf("SC_CLK_TCK"), os.cpu_count()
budget, lost = max_wait, 0.0  # seconds we may spend waiting for, or re-measuring under, others' load


def cpu_snapshot():
    """(wall seconds, CPU-seconds busy on the whole machine, CPU-seconds used by this process)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    times = os.times()
    return time.perf_counter(), (sum(ticks) - ticks[3] - ticks[4]) / HZ, times.user + times.system


def foreign_load(a, b):
    """Share of the machine's CPUs used by other processes between two snapshots."""
    return max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / ((b[0] - a[0]) * NCPU)


def wait_quiet(window=0.25, threshold=0.05):
    """Wait until other processes use < `threshold` of the machine over `window` s, or the budget is spent."""
    global budget, lost
    while budget > 0:
        a = cpu_snapshot()
        time.sleep(window)
        b = cpu_snapshot()
        budget, lost = budget - window, lost + window
        if foreign_load(a, b) < threshold:
            return


def measure(fn):
    """Seconds and foreign load of one run of fn; re-run while other processes interfere and the budget lasts."""
    global budget, lost
    while True:
        wait_quiet()
        a = cpu_snapshot()
        fn()
        b = cpu_snapshot()
        seconds, load = b[0] - a[0], foreign_load(a, b)
        if load <= CONTENDED or budget <= 0:
            return seconds, load
        budget, lost = budget - seconds, lost + seconds


run_forward = lambda model: model(fwd_ids, attention_mask=fwd_mask, use_cache=False)  # noqa: E731
run_generate = lambda model: model.generate(prompt, **gen_kwargs)  # noqa: E731
tokens = {"forward": fwd_ids.numel(), "generate": new_tokens}
samples = {key: {m: [] for m in MEASURES} for key in variants}
loads = {key: {m: [] for m in MEASURES} for key in variants}
order = list(variants)
rng = random.Random(args.seed)
with torch.inference_mode():
    for _ in range(warmup):
        for key in tqdm(order, desc="warm-up"):
            run_forward(variants[key])
            run_generate(variants[key])
    bar = tqdm(total=rounds * len(order) * len(MEASURES), desc="timed rounds")
    for _ in range(rounds):
        for m, fn in (("forward", run_forward), ("generate", run_generate)):
            rng.shuffle(order)  # round-robin over the variants, one measure at a time, in a new order each round
            for key in order:
                bar.set_postfix_str(f"{m} {key[0]} {key[1]}")
                seconds, load = measure(lambda: fn(variants[key]))
                samples[key][m].append(tokens[m] / seconds)
                loads[key][m].append(load)
                bar.update()
    bar.close()


def summary(key, m):
    values = samples[key][m]
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "spread": (max(values) - min(values)) / med,
            "samples": values, "foreign_load": loads[key][m],
            "contended_samples": sum(load > CONTENDED for load in loads[key][m])}


def per_round(key, other, m):
    """speed(key) / speed(other) in every round. The machine's speed drifts by tens of percent over minutes on a
    shared host; within one round the two were measured seconds apart, so a ratio per round cancels the drift."""
    return [a / b for a, b in zip(samples[key][m], samples[other][m])]


def paired_ratio(key, other, m):
    return statistics.median(per_round(key, other, m))


def slower_p_value(key, other, m):
    """One-sided sign test over the rounds: the chance of `key` losing at least as many rounds as it did if the two
    were equally fast (each round a coin flip). A small value means `key` is really slower, not just unlucky."""
    ratios = per_round(key, other, m)
    n, lost_rounds = len(ratios), sum(r < 1.0 for r in ratios)
    return sum(math.comb(n, k) for k in range(lost_rounds, n + 1)) / 2**n


results = {"baseline": {m: summary(("baseline", 0.0), m) for m in MEASURES}, "agency": {}, "peer": {}}
for (name, level), model in variants.items():
    entry = results[name] if name == "baseline" else {m: summary((name, level), m) for m in MEASURES}
    for m in MEASURES:
        entry[m]["ratio"] = paired_ratio((name, level), ("baseline", 0.0), m)
        entry[m]["ratio_per_round"] = per_round((name, level), ("baseline", 0.0), m)
        entry[m]["ratio_of_medians"] = entry[m]["median"] / results["baseline"][m]["median"]
        if name == "agency":
            entry[m]["ratio_to_peer"] = paired_ratio((name, level), ("peer", level), m)
            entry[m]["rounds_slower_than_peer"] = sum(r < 1.0 for r in per_round((name, level), ("peer", level), m))
            entry[m]["slower_than_peer_p"] = slower_p_value((name, level), ("peer", level), m)
    entry["params"] = sum(p.numel() for p in model.parameters())
    if name != "baseline":
        results[name][str(level)] = entry
contended = sum(r[m]["contended_samples"] for r in [results["baseline"], *results["agency"].values(),
                                                     *results["peer"].values()] for m in MEASURES)

targets = []
for m in MEASURES:
    for level, threshold in TARGETS.items():
        ratio = results["agency"][str(level)][m]["ratio"]
        targets.append({"target": f"agency/baseline {m} ratio at {level:.0%} >= {threshold}", "measure": m,
                        "level": level, "value": ratio, "threshold": threshold, "pass": ratio >= threshold})
    for level in LEVELS:  # slower = median paired ratio below 1 AND a sign test that says it is not chance
        entry = results["agency"][str(level)][m]
        ratio, p = entry["ratio_to_peer"], entry["slower_than_peer_p"]
        targets.append({"target": f"agency not slower than peer, {m} at {level:.0%}", "measure": m, "level": level,
                        "value": ratio, "threshold": 1.0, "sign_test_p": p, "rounds_slower": entry[
                            "rounds_slower_than_peer"], "pass": ratio >= 1.0 or p >= SIGNIFICANCE})

# ----------------------------------------------------------------------------- report
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
report = {
    "environment": {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu": cpu, "cpu_count": NCPU,
        "contended_samples": contended, "total_samples": 2 * rounds * len(variants),
        "seconds_lost_to_other_processes": lost,
    },
    "config": {
        "quick": args.quick, "seed": args.seed, "dtype": "float32", "mode": "eval + torch.inference_mode",
        "attn_implementation": baseline.config._attn_implementation,
        "model": {k: getattr(model_config, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")},
        "forward": {"batch": fwd_batch, "seq_len": fwd_len, "use_cache": False, "attention_mask": "all ones",
                    "tokens_per_call": fwd_ids.numel()},
        "generate": {"batch": 1, "prompt_len": prompt_len, "new_tokens": new_tokens, "greedy": True,
                     "tokens_per_s": "new tokens / wall time of generate() (prefill included)"},
        "warmup_rounds": warmup, "timed_rounds": rounds, "levels": list(LEVELS),
        "statistic": "paired: ratio = median over rounds of (variant speed / baseline speed in the same round); "
                     "ratio_of_medians kept for reference; the unpruned peer (a copy of the baseline) shows the noise "
                     "floor",
        "head_selection": "select_heads(score_heads(unpruned AgencyGPT2, 'magnitude'), level), global",
        "contended_threshold": CONTENDED,
    },
    "heads": {str(level): {"n_pruned": sum(map(len, h.values())), "n_heads": n_heads,
                           "per_layer": {str(k): v for k, v in h.items()}} for level, h in heads.items()},
    "results": results,
    "checks": checks,
    "targets": targets,
    "all_targets_pass": all(t["pass"] for t in targets),
    "wall_time_s": time.perf_counter() - started,
}

rows = ["| pruned heads | forward AgencyGPT2 | forward peer | forward AgencyGPT2 / peer "
        "| generate AgencyGPT2 | generate peer | generate AgencyGPT2 / peer |", "|---|---|---|---|---|---|---|"]
for level in LEVELS:
    r = {(name, m): f"{results[name][str(level)][m]['ratio']:.2f}x" for name in ("agency", "peer") for m in MEASURES}
    vs = {m: f"{results['agency'][str(level)][m]['ratio_to_peer']:.2f}" for m in MEASURES}
    rows.append(f"| {level:.0%} | {r['agency', 'forward']} | {r['peer', 'forward']} | {vs['forward']} | "
                f"{r['agency', 'generate']} | {r['peer', 'generate']} | {vs['generate']} |")
b = results["baseline"]
rows.append("")
rows.append(f"Speed relative to unpruned `GPT2LMHeadModel` ({b['forward']['median']:.0f} tokens/s forward at "
            f"{fwd_batch}x{fwd_len}, {b['generate']['median']:.1f} tokens/s greedy generate at batch 1); each ratio "
            f"is the median over {rounds} rounds of the two speeds measured in the same round (round-robin, "
            f"shuffled). The unpruned peer is a copy of the baseline: its distance from 1.00x is the noise floor. "
            f"{torch.get_num_threads()} threads, {cpu}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}.")
if contended:
    rows.append(f"\n**Warning:** {contended} of {2 * rounds * len(variants)} samples ran while other processes used "
                f"more than {CONTENDED:.0%} of the CPUs; the ratios may be distorted.")
table = "\n".join(rows) + "\n"
print("\n" + table)
for t in targets:
    extra = f" (slower in {t['rounds_slower']}/{rounds} rounds, sign test p={t['sign_test_p']:.3f})" \
        if "sign_test_p" in t else ""
    print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']:.3f}{extra}")
print(f"checks {'PASS' if checks['pass'] else 'FAIL'}; wall time {report['wall_time_s']:.0f} s "
      f"({lost:.0f} s lost waiting for, or re-measuring under, other processes)")

os.makedirs(args.out, exist_ok=True)
atomic_write_text(os.path.join(args.out, "agency_speed.json"), json.dumps(report, indent=2) + "\n")
atomic_write_text(os.path.join(args.out, "agency_speed.md"), table)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
for ax, m in zip(axes, MEASURES):
    base = results["baseline"][m]["median"]
    for name, label, style in (("agency", "AgencyGPT2", "o-"), ("peer", "GPT2LMHeadModel.prune_heads", "s--")):
        entries = [results[name][str(level)][m] for level in LEVELS]
        ratio = [e["ratio"] for e in entries]
        low = [r - min(e["ratio_per_round"]) for r, e in zip(ratio, entries)]
        high = [max(e["ratio_per_round"]) - r for r, e in zip(ratio, entries)]
        ax.errorbar(LEVELS, ratio, yerr=[low, high], fmt=style, capsize=3, label=label)
    ax.plot(list(TARGETS), list(TARGETS.values()), "r^", markersize=9, label="AgencyGPT2 target (minimum)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_title(f"{m} (unpruned GPT2LMHeadModel: {base:.1f} tokens/s)")
    ax.set_xlabel("fraction of heads pruned")
    ax.set_xticks(LEVELS)
    ax.grid(alpha=0.3)
axes[0].set_ylabel("speed / unpruned GPT2LMHeadModel (median of rounds, bars: min-max)")
axes[0].legend(fontsize=8)
fig.tight_layout()
atomic_savefig(fig, os.path.join(args.out, "agency_speed.png"), dpi=120)
print(f"wrote {args.out}/agency_speed.{{json,md,png}}")
