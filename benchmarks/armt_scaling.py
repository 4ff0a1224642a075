"""UnifiedARMT vs full attention: forward time and peak memory as the input grows (1K ... 16K tokens).

Both models have the same blocks (width, depth, heads, MLP): UnifiedARMT processes segments of `--segment-size`
tokens plus memory tokens and carries only its associative memory between them; the baseline is a
GPT2LMHeadModel whose position table covers the longest input and attends over everything (SDPA, causal).

Every (model, length) point runs in its own fresh process, so the peak memory of one point cannot hide in memory
that an earlier point already took from the OS. A point reports the median forward time over `--repeats` calls
(after one warm-up, `torch.inference_mode`, batch 1) and the peak resident memory above the process's memory after
the model was built and the input created (on CUDA: max allocated minus allocated before the forward).

Targets (issue 4): time(16K) / time(1K) <= 17 for UnifiedARMT, and flat peak memory.

The run exits non-zero when the time target FAILs (judged on full runs only) or a point errors.

    python benchmarks/armt_scaling.py              # 1K..16K, ~5 minutes on 2 CPU cores -> outputs/armt_scaling
    python benchmarks/armt_scaling.py --quick      # 256..1K, tiny model, seconds
    python benchmarks/armt_scaling.py --update-committed-results   # replace benchmarks/results/armt_scaling.*
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import common  # noqa: E402

NAME = "armt_scaling"
TARGET_TIME_RATIO = 17.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, NAME, seed=False)
    p.add_argument("--lengths", default=None, help="comma-separated token counts (default 1024,...,16384)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--segment-size", type=int, default=512)
    p.add_argument("--memory-tokens", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed for one point")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "model:length", run one point and exit
    args = p.parse_args(argv)
    if not args.worker:
        args.out = common.output_dir(args, NAME)
    if args.quick:
        args.hidden_size, args.layers, args.heads, args.segment_size, args.memory_tokens = 64, 2, 2, 128, 8
        args.vocab_size, args.repeats = 1000, 2
        args.lengths = args.lengths or "256,512,1024"
    args.lengths = [int(x) for x in (args.lengths or "1024,2048,4096,8192,16384").split(",")]
    return args


def build(kind, args, max_length):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from armada import UnifiedARMTConfig, UnifiedARMTForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=args.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if kind == "armt":
        config = UnifiedARMTConfig(hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                                   num_attention_heads=args.heads, segment_size=args.segment_size,
                                   num_memory_tokens=args.memory_tokens, **common)
        return UnifiedARMTForCausalLM(config)
    config = GPT2Config(n_embd=args.hidden_size, n_layer=args.layers, n_head=args.heads, n_positions=max_length,
                        **common)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def worker(args):
    """One point: build, warm up, time, measure peak memory; print one JSON line."""
    import torch

    sys.path.insert(0, REPO)
    from armada.evaluation import peak_memory

    kind, length = args.worker.split(":")
    length = int(length)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(kind, args, max(args.lengths)).to(device).eval()
    ids = torch.randint(0, args.vocab_size, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
    kwargs = {"use_cache": False}  # no state to return: both models run their plain forward

    def forward():
        with torch.inference_mode():
            model(ids, **kwargs, logits_to_keep=1)  # the LM head over 50K words would dominate both otherwise
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with peak_memory(device) as mem:
        forward()  # warm-up; the first call also allocates what the forward needs at its peak
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    print(json.dumps({"model": kind, "length": length, "seconds": statistics.median(times), "all_seconds": times,
                      "peak_memory_bytes": mem["peak_delta_bytes"], "memory_kind": mem["kind"],
                      "parameters": sum(p.numel() for p in model.parameters())}), flush=True)


def run_point(kind, length, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{kind}:{length}",
           "--lengths", ",".join(map(str, args.lengths)), "--hidden-size", str(args.hidden_size),
           "--layers", str(args.layers), "--heads", str(args.heads), "--segment-size", str(args.segment_size),
           "--memory-tokens", str(args.memory_tokens), "--vocab-size", str(args.vocab_size),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": kind, "length": length, "error": f"took longer than {args.timeout:.0f}s"}
    if done.returncode != 0:
        return {"model": kind, "length": length, "error": done.stderr.strip().splitlines()[-1][-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(results, out):
    plt = common.pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, label in (("armt", "UnifiedARMT"), ("full", "full attention (GPT-2 blocks)")):
        points = [r for r in results if r["model"] == kind and "error" not in r]
        xs = [r["length"] for r in points]
        ax_t.plot(xs, [r["seconds"] for r in points], "o-", label=label)
        ax_m.plot(xs, [r["peak_memory_bytes"] / 2**20 for r in points], "o-", label=label)
    for ax, ylabel in ((ax_t, "forward time (s)"), (ax_m, "peak memory above model (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if any("error" not in r for r in results):  # a log axis needs data: every point may have failed
        ax_t.set_yscale("log")
    ax_t.set_title("time vs length")
    ax_m.set_title("peak memory vs length")
    fig.tight_layout()
    return common.save_figure(fig, out, f"{NAME}.png")


def summarize(results, args):
    def ratio(kind, key):
        by_len = {r["length"]: r for r in results if r["model"] == kind and "error" not in r}
        lo, hi = min(args.lengths), max(args.lengths)
        if lo in by_len and hi in by_len and by_len[lo][key] > 0:
            return by_len[hi][key] / by_len[lo][key]
        return None

    time_ratio = ratio("armt", "seconds")
    return {
        "time_ratio_longest_to_shortest": {"armt": time_ratio, "full": ratio("full", "seconds")},
        "length_ratio": max(args.lengths) / min(args.lengths),
        "memory_ratio_longest_to_shortest": {"armt": ratio("armt", "peak_memory_bytes"),
                                             "full": ratio("full", "peak_memory_bytes")},
        "target_time_ratio": TARGET_TIME_RATIO if not args.quick else None,
        "time_target_met": (time_ratio is not None and time_ratio <= TARGET_TIME_RATIO) if not args.quick else None,
    }


def markdown(results, args):
    lines = ["| tokens | UnifiedARMT time (s) | full attention time (s) | UnifiedARMT peak MiB "
             "| full attention peak MiB |",
             "|---|---|---|---|---|"]
    for n in args.lengths:
        row = {r["model"]: r for r in results if r["length"] == n}
        cell = lambda r, k, f: (f(r[k]) if "error" not in r else r["error"]) if r else "-"  # noqa: E731
        lines.append(f"| {n} | " + " | ".join([
            cell(row.get("armt"), "seconds", lambda v: f"{v:.3f}"),
            cell(row.get("full"), "seconds", lambda v: f"{v:.3f}"),
            cell(row.get("armt"), "peak_memory_bytes", lambda v: f"{v / 2**20:.0f}"),
            cell(row.get("full"), "peak_memory_bytes", lambda v: f"{v / 2**20:.0f}")]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from tqdm.auto import tqdm

    started = time.perf_counter()
    points = [(kind, n) for n in args.lengths for kind in ("armt", "full")]
    results = []
    for kind, n in tqdm(points, desc="points"):
        results.append(run_point(kind, n, args))
        tqdm.write(json.dumps(results[-1]))
    summary = summarize(results, args)
    report = {"benchmark": NAME, "quick": args.quick, "config": {k: v for k, v in vars(args).items()
                                                                 if k != "worker"},
              "environment": common.environment(args.threads),
              "results": results, "summary": summary, "wall_seconds": round(time.perf_counter() - started, 1)}
    table = markdown(results, args)
    paths = common.write_report(args.out, NAME, report, table)
    paths.append(plot(results, args.out))
    print(table)
    print(json.dumps(summary, indent=2))
    common.print_written(paths)
    errors = [f"{r['model']} at {r['length']}: {r['error']}" for r in results if "error" in r and r["model"] == "armt"]
    return common.report_checks([
        {"name": "every UnifiedARMT point ran", "pass": not errors, "detail": "; ".join(errors)},
        {"name": f"UnifiedARMT time ratio longest/shortest <= {TARGET_TIME_RATIO}", "pass": summary["time_target_met"],
         "detail": f"{summary['time_ratio_longest_to_shortest']['armt']}"}])


if __name__ == "__main__":
    sys.exit(main())
