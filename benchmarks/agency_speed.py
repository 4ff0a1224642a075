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

The machine may be shared: timing, load watching and result writing come from benchmarks/common.py (samples
under other processes' load are waited out or re-run from a bounded budget, --max-wait; those still contended are
counted and reported). The run exits non-zero when a check or target it prints FAILs; a --quick run judges the
correctness checks only (its tiny model says nothing about the speed targets).

    python benchmarks/agency_speed.py                         # full run, ~10 min on 2 quiet cores
    python benchmarks/agency_speed.py --model DIR             # your GPT-2 checkpoint instead of a random GPT-2 124M
    python benchmarks/agency_speed.py --quick --out /tmp/b    # tiny model, smoke test (seconds)
    python benchmarks/agency_speed.py --update-committed-results   # replace benchmarks/results/agency_speed.*
"""

import argparse
import copy
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from armada import AgencyGPT2ForCausalLM  # noqa: E402
from armada.compat import prune_gpt2_heads  # noqa: E402
from armada.pruning import score_heads, select_heads  # noqa: E402
from benchmarks import common  # noqa: E402

NAME = "agency_speed"
LEVELS = (0.0, 0.3, 0.5, 0.7)
TARGETS = {0.0: 0.97, 0.5: 1.10, 0.7: 1.15}  # minimum speed ratio of AgencyGPT2 to the unpruned GPT2LMHeadModel
MEASURES = ("forward", "generate")
# AgencyGPT2 and the peer run the same matmuls, so their paired ratio scatters around 1.00 by the run's noise. "Not
# slower than the peer" fails when the median ratio is below 1 and a one-sided sign test over the rounds rejects
# "equally fast" at this level: a real slowdown of ~1% is caught with 20 rounds, a coin-flip 0.99 is not.
SIGNIFICANCE = 0.05
LOGITS_TOLERANCE = 1e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p, NAME, model="a GPT-2 checkpoint folder to measure instead of a random GPT-2 124M",
                           device=True)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20, quick 2)")
    p.add_argument("--max-wait", type=float, default=None,
                   help="seconds the run may spend waiting for, or re-measuring under, other processes' load "
                        "(default 120, quick 10)")
    args = p.parse_args(argv)
    args.out = common.output_dir(args, NAME)
    if args.quick:
        args.shape = dict(fwd_batch=2, fwd_len=64, prompt_len=8, new_tokens=8, warmup=1, rounds=2)
    else:
        args.shape = dict(fwd_batch=4, fwd_len=256, prompt_len=32, new_tokens=64, warmup=1, rounds=20)
    args.rounds = args.rounds or args.shape["rounds"]
    args.max_wait = args.max_wait if args.max_wait is not None else (10.0 if args.quick else 120.0)
    return args


def load_baseline(args):
    """The unpruned GPT2LMHeadModel every ratio is measured against: --model DIR, or seeded random weights."""
    if args.model:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise SystemExit(f"error: --model {args.model!r} is not a checkpoint folder (no config.json there)")
        config = GPT2Config.from_pretrained(args.model)
        if config.model_type != "gpt2":
            raise SystemExit(f"error: --model {args.model!r} is a {config.model_type!r} checkpoint; allowed: a "
                             "GPT-2 checkpoint (AgencyGPT2 is made from it, so both can be compared)")
        return GPT2LMHeadModel.from_pretrained(args.model).eval()
    if args.quick:
        config = GPT2Config(n_layer=4, n_embd=192, n_head=12, vocab_size=1000, n_positions=256)
    else:
        config = GPT2Config()  # GPT-2 124M: 12 layers, 768 wide, 12 heads, vocab 50257
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(config).eval()


def build_variants(baseline):
    """The heads to prune per level (chosen once on the unpruned AgencyGPT2) and every (name, level) variant."""
    config = baseline.config
    scores = score_heads(AgencyGPT2ForCausalLM.from_gpt2(baseline).eval(), "magnitude")
    heads = {level: select_heads(scores, level) for level in LEVELS}
    for level, selection in heads.items():
        full = [layer for layer, h in selection.items() if len(h) == config.n_head]
        if full:  # GPT2LMHeadModel cannot run a layer with no head left; AgencyGPT2 can
            raise SystemExit(f"error: level {level} prunes every head of layers {full}: the peer cannot run it")
    variants = {("baseline", 0.0): baseline}
    for level in LEVELS:
        agency = AgencyGPT2ForCausalLM.from_gpt2(baseline).eval()
        peer = copy.deepcopy(baseline).eval()
        if heads[level]:
            agency.prune_heads(heads[level])
            prune_gpt2_heads(peer, heads[level])
        variants[("agency", level)] = agency
        variants[("peer", level)] = peer
    return heads, variants


def make_inputs(args, config):
    s, gen = args.shape, torch.Generator().manual_seed(args.seed)
    fwd_ids = torch.randint(0, config.vocab_size, (s["fwd_batch"], s["fwd_len"]), generator=gen).to(args.device)
    prompt = torch.randint(0, config.vocab_size, (1, s["prompt_len"]), generator=gen).to(args.device)
    # All-ones attention masks, as a tokenizer returns for unpadded inputs. Without one, GPT2LMHeadModel (4.57)
    # builds an explicit (B, 1, T, T) mask for the forward and leaves SDPA's is_causal path, flattering AgencyGPT2.
    gen_kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=s["new_tokens"],
                      min_new_tokens=s["new_tokens"], pad_token_id=0)
    def timed(fn):  # a call ends when the device has finished it
        return lambda model: (fn(model), common.synchronize(args.device))

    measures = {
        "forward": (timed(lambda model: model(fwd_ids, attention_mask=torch.ones_like(fwd_ids), use_cache=False)),
                    fwd_ids.numel()),
        "generate": (timed(lambda model: model.generate(prompt, **gen_kwargs)), s["new_tokens"]),
    }
    return fwd_ids, prompt, gen_kwargs, measures


@torch.inference_mode()
def correctness_checks(variants, fwd_ids, prompt, gen_kwargs):
    """AgencyGPT2 unpruned == GPT-2, and pruned AgencyGPT2 == GPT-2 pruned by transformers (logits and greedy)."""
    check_ids, baseline = fwd_ids[:2, :64], variants[("baseline", 0.0)]

    def logits_diff(a, b):
        return (a(check_ids, use_cache=False).logits - b(check_ids, use_cache=False).logits).abs().max().item()

    agency0 = variants[("agency", 0.0)]
    checks = {"logits_max_abs_diff_agency_vs_baseline_level0": logits_diff(agency0, baseline),
              "greedy_equal_agency_vs_baseline_level0": torch.equal(agency0.generate(prompt, **gen_kwargs),
                                                                    baseline.generate(prompt, **gen_kwargs)),
              "logits_max_abs_diff_agency_vs_peer": {}, "greedy_equal_agency_vs_peer": {}}
    for level in LEVELS:
        agency, peer = variants[("agency", level)], variants[("peer", level)]
        checks["logits_max_abs_diff_agency_vs_peer"][str(level)] = logits_diff(agency, peer)
        checks["greedy_equal_agency_vs_peer"][str(level)] = torch.equal(agency.generate(prompt, **gen_kwargs),
                                                                        peer.generate(prompt, **gen_kwargs))
    checks["logits_tolerance"] = LOGITS_TOLERANCE
    checks["pass"] = (checks["greedy_equal_agency_vs_baseline_level0"]
                      and checks["logits_max_abs_diff_agency_vs_baseline_level0"] <= LOGITS_TOLERANCE
                      and all(d <= LOGITS_TOLERANCE for d in checks["logits_max_abs_diff_agency_vs_peer"].values()))
    return checks


def time_variants(args, variants, measures):
    monitor = common.LoadMonitor(args.max_wait)
    bar = tqdm(total=args.rounds * len(variants) * len(measures), desc="timed rounds")
    with torch.inference_mode():
        speeds, loads = common.interleaved_rounds(variants, measures, args.rounds, args.shape["warmup"], monitor,
                                                  seed=args.seed, progress=bar)
    bar.close()
    return speeds, loads, monitor.lost


def summarize(speeds, loads, variants):
    """Per variant and measure: speed summary, paired ratio to the baseline and (AgencyGPT2) to its peer."""
    base = ("baseline", 0.0)
    results = {"baseline": {m: common.summary(speeds[base][m], loads[base][m]) for m in MEASURES}, "agency": {},
               "peer": {}}
    for (name, level), model in variants.items():
        key = (name, level)
        entry = results[name] if name == "baseline" else {m: common.summary(speeds[key][m], loads[key][m])
                                                          for m in MEASURES}
        for m in MEASURES:
            entry[m]["ratio"] = common.paired_ratio(speeds[key][m], speeds[base][m])
            entry[m]["ratio_per_round"] = common.per_round(speeds[key][m], speeds[base][m])
            entry[m]["ratio_of_medians"] = entry[m]["median"] / results["baseline"][m]["median"]
            if name == "agency":
                to_peer = common.per_round(speeds[key][m], speeds[("peer", level)][m])
                entry[m]["ratio_to_peer"] = common.paired_ratio(speeds[key][m], speeds[("peer", level)][m])
                entry[m]["rounds_slower_than_peer"] = sum(r < 1.0 for r in to_peer)
                entry[m]["slower_than_peer_p"] = common.slower_p_value(to_peer)
        entry["params"] = sum(p.numel() for p in model.parameters())
        if name != "baseline":
            results[name][str(level)] = entry
    return results


def targets(results, rounds, judged):
    """The speed targets (ratio to GPT-2) and "never slower than the peer"; `judged` False marks them n/a."""
    out = []
    for m in MEASURES:
        for level, threshold in TARGETS.items():
            ratio = results["agency"][str(level)][m]["ratio"]
            out.append({"name": f"agency/baseline {m} ratio at {level:.0%} >= {threshold}", "measure": m,
                        "level": level, "value": ratio, "threshold": threshold,
                        "pass": ratio >= threshold if judged else None, "detail": f"{ratio:.3f}"})
        for level in LEVELS:  # slower = median paired ratio below 1 AND a sign test that says it is not chance
            entry = results["agency"][str(level)][m]
            ratio, p = entry["ratio_to_peer"], entry["slower_than_peer_p"]
            out.append({"name": f"agency not slower than peer, {m} at {level:.0%}", "measure": m, "level": level,
                        "value": ratio, "threshold": 1.0, "sign_test_p": p,
                        "rounds_slower": entry["rounds_slower_than_peer"],
                        "pass": (ratio >= 1.0 or p >= SIGNIFICANCE) if judged else None,
                        "detail": f"{ratio:.3f} (slower in {entry['rounds_slower_than_peer']}/{rounds} rounds, "
                                  f"sign test p={p:.3f})"})
    return out


def markdown(results, args, env, contended, total):
    rows = ["| pruned heads | forward AgencyGPT2 | forward peer | forward AgencyGPT2 / peer "
            "| generate AgencyGPT2 | generate peer | generate AgencyGPT2 / peer |", "|---|---|---|---|---|---|---|"]
    for level in LEVELS:
        r = {(n, m): f"{results[n][str(level)][m]['ratio']:.2f}x" for n in ("agency", "peer") for m in MEASURES}
        vs = {m: f"{results['agency'][str(level)][m]['ratio_to_peer']:.2f}" for m in MEASURES}
        rows.append(f"| {level:.0%} | {r['agency', 'forward']} | {r['peer', 'forward']} | {vs['forward']} | "
                    f"{r['agency', 'generate']} | {r['peer', 'generate']} | {vs['generate']} |")
    b, s = results["baseline"], args.shape
    rows += ["", f"Speed relative to unpruned `GPT2LMHeadModel` ({b['forward']['median']:.0f} tokens/s forward at "
             f"{s['fwd_batch']}x{s['fwd_len']}, {b['generate']['median']:.1f} tokens/s greedy generate at batch 1); "
             f"each ratio is the median over {args.rounds} rounds of the two speeds measured in the same round "
             f"(round-robin, shuffled). The unpruned peer is a copy of the baseline: its distance from 1.00x is the "
             f"noise floor. {env['threads']} threads, {env['cpu']}, torch {env['torch']}, "
             f"transformers {env['transformers']}."]
    warning = common.contention_warning(contended, total)
    return "\n".join(rows + (["", warning] if warning else [])) + "\n"


def plot(results, out):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, m in zip(axes, MEASURES):
        for name, label, style in (("agency", "AgencyGPT2", "o-"), ("peer", "GPT2LMHeadModel.prune_heads", "s--")):
            entries = [results[name][str(level)][m] for level in LEVELS]
            ratio = [e["ratio"] for e in entries]
            low = [r - min(e["ratio_per_round"]) for r, e in zip(ratio, entries)]
            high = [max(e["ratio_per_round"]) - r for r, e in zip(ratio, entries)]
            ax.errorbar(LEVELS, ratio, yerr=[low, high], fmt=style, capsize=3, label=label)
        ax.plot(list(TARGETS), list(TARGETS.values()), "r^", markersize=9, label="AgencyGPT2 target (minimum)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{m} (unpruned GPT2LMHeadModel: {results['baseline'][m]['median']:.1f} tokens/s)")
        ax.set_xlabel("fraction of heads pruned")
        ax.set_xticks(LEVELS)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed / unpruned GPT2LMHeadModel (median of rounds, bars: min-max)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return common.save_figure(fig, out, f"{NAME}.png")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    warning = common.busy_machine_warning()
    if warning:
        print(warning)
    baseline = load_baseline(args)
    heads, variants = build_variants(baseline)
    variants = {key: model.to(args.device) for key, model in variants.items()}
    fwd_ids, prompt, gen_kwargs, measures = make_inputs(args, baseline.config)
    checks = correctness_checks(variants, fwd_ids, prompt, gen_kwargs)
    print(f"checks: {json.dumps(checks)}")

    speeds, loads, lost = time_variants(args, variants, measures)
    results = summarize(speeds, loads, variants)
    judged = targets(results, args.rounds, judged=not args.quick)
    total = len(MEASURES) * args.rounds * len(variants)
    contended = sum(loads[key][m][i] > common.CONTENDED for key in loads for m in MEASURES for i in range(args.rounds))
    env = {**common.environment(device=args.device), "contended_samples": contended, "total_samples": total,
           "seconds_lost_to_other_processes": lost, "busy_at_start": warning}
    n_heads = baseline.config.n_layer * baseline.config.n_head
    report = {
        "environment": env,
        "config": {"quick": args.quick, "seed": args.seed, "model": args.model or "random weights",
                   "dtype": "float32", "mode": "eval + torch.inference_mode",
                   "attn_implementation": baseline.config._attn_implementation,
                   "shape": {k: getattr(baseline.config, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size",
                                                                       "n_positions")},
                   "forward": {"batch": args.shape["fwd_batch"], "seq_len": args.shape["fwd_len"], "use_cache": False,
                               "attention_mask": "all ones", "tokens_per_call": fwd_ids.numel()},
                   "generate": {"batch": 1, "prompt_len": args.shape["prompt_len"],
                                "new_tokens": args.shape["new_tokens"], "greedy": True,
                                "tokens_per_s": "new tokens / wall time of generate() (prefill included)"},
                   "warmup_rounds": args.shape["warmup"], "timed_rounds": args.rounds, "levels": list(LEVELS),
                   "statistic": "paired: ratio = median over rounds of (variant speed / baseline speed in the same "
                                "round); ratio_of_medians kept for reference; the unpruned peer (a copy of the "
                                "baseline) shows the noise floor",
                   "head_selection": "select_heads(score_heads(unpruned AgencyGPT2, 'magnitude'), level), global",
                   "contended_threshold": common.CONTENDED},
        "heads": {str(level): {"n_pruned": sum(map(len, h.values())), "n_heads": n_heads,
                               "per_layer": {str(k): v for k, v in h.items()}} for level, h in heads.items()},
        "results": results,
        "checks": checks,
        "targets": judged,
        "targets_judged": not args.quick,
        "all_targets_pass": all(t["pass"] is not False for t in judged),
        "wall_time_s": time.perf_counter() - started,
    }
    table = markdown(results, args, env, contended, total)
    print("\n" + table)
    paths = common.write_report(args.out, NAME, report, table) + [plot(results, args.out)]
    print(f"wall time {report['wall_time_s']:.0f} s ({lost:.0f} s lost waiting for, or re-measuring under, other "
          f"processes)")
    common.print_written(paths)
    verdicts = [{"name": "AgencyGPT2 logits and greedy output equal GPT-2's (unpruned) and the peer's (pruned)",
                 "pass": checks["pass"]}, *judged]
    if args.quick:
        print("(--quick: the speed targets are not judged on the tiny model)")
    return common.report_checks(verdicts)


if __name__ == "__main__":
    sys.exit(main())
