"""What every armada benchmark shares: common flags, where results go, timing on a shared machine, result files.

Output. A benchmark writes `<name>.json`, `<name>.md` and its plots into one folder: `--out DIR` (default
`outputs/<name>` under the current directory). The committed record in `benchmarks/results/` is written only with
`--update-committed-results`; an `--out` inside it without that flag is refused, and so is an `--out` that names a
file (`x.json`). A folder that already holds `<name>.json` is refused unless `--overwrite` (or the benchmark's own
`--merge`). Files are written atomically (temp file, then rename), and the run prints where it wrote.

Timing. The machine may be shared with other processes. `LoadMonitor` reads /proc/stat to tell the share of the
CPUs other processes used while a sample ran ("foreign load"); before a sample it waits for them to go quiet and it
re-runs a sample whose foreign load exceeds `CONTENDED`, both from a bounded budget. `interleaved_rounds` times
every variant once per round, round-robin in a new (seeded) order each round, and `paired_ratio` takes the median
over rounds of two speeds measured in the same round: the machine's speed drifts by tens of percent over minutes on
a shared host, and a ratio per round cancels that drift where a ratio of medians taken minutes apart does not.

Checks. `report_checks` prints one PASS/FAIL line per check and returns the exit status: non-zero when any FAILs.
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import time

import torch

from armada.io_utils import atomic_savefig, atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_RESULTS = os.path.join(REPO, "benchmarks", "results")
CONTENDED = 0.10  # foreign load above which a sample counts as contended
BUSY = 0.25  # foreign load, measured before the run starts, above which the machine is reported busy
FILE_SUFFIXES = (".json", ".md", ".png", ".txt", ".csv")


def add_common_args(parser: argparse.ArgumentParser, name: str, *, quick=True, threads=2, seed=True, model=None,
                    device=False):
    """--out/--overwrite/--update-committed-results always; --quick, --threads, --seed, --model DIR and --device
    when asked (`model` is the help text of --model)."""
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"folder to write {name}.json/.md and plots into (default outputs/{name})")
    parser.add_argument("--overwrite", action="store_true", help=f"replace a {name}.json already in --out")
    parser.add_argument("--update-committed-results", action="store_true",
                        help=f"write into the committed record {os.path.relpath(COMMITTED_RESULTS, REPO)}/ "
                             "(replaces what is there)")
    if quick:
        parser.add_argument("--quick", action="store_true", help="tiny model and budgets (a smoke test, seconds)")
    if threads:
        parser.add_argument("--threads", type=int, default=threads, help=f"torch threads (default {threads})")
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    if model:
        parser.add_argument("--model", default=None, metavar="DIR", help=model)
    if device:
        parser.add_argument("--device", default="cpu", type=torch_device,
                            help="torch device to measure on: cpu (default), cuda, cuda:1, ... (timings wait for it)")


def torch_device(name: str) -> torch.device:
    """argparse type of --device: a device this machine has, else a one-line error naming the choices."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch device; allowed: cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: this machine has no CUDA device; allowed: cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{name!r}: allowed: cpu, cuda, cuda:N")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA runs asynchronously: a timer must not stop before it ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def output_dir(args, name: str, *, merge: bool = False, report: str = None) -> str:
    """The folder this run will write to (created only when the results are written, so a run refused later leaves
    nothing behind), or SystemExit with what was wrong with --out. `report` is the JSON
    file whose presence makes the folder taken (default `<name>.json`)."""
    out = args.out
    if args.update_committed_results:
        out = out or COMMITTED_RESULTS
    elif out is None:
        out = os.path.join("outputs", name)
    if out.lower().endswith(FILE_SUFFIXES) or os.path.isfile(out):
        raise SystemExit(f"error: --out takes a folder (the benchmark writes {name}.json, {name}.md and plots into "
                         f"it), got the file name {out!r}")
    inside = os.path.commonpath([os.path.abspath(out), COMMITTED_RESULTS]) == COMMITTED_RESULTS
    if inside and not args.update_committed_results:
        raise SystemExit(f"error: --out {out!r} is inside the committed results "
                         f"{os.path.relpath(COMMITTED_RESULTS)}; add --update-committed-results to replace them")
    existing = os.path.join(out, report or f"{name}.json")
    if os.path.exists(existing) and not (merge or args.overwrite or args.update_committed_results):
        raise SystemExit(f"error: {existing} exists; pass --overwrite to replace it (or choose another --out)")
    return out


def environment(threads=None, device=None) -> dict:
    """Versions, CPU (and the GPU, when measuring on one) and date, for the report."""
    import transformers

    cpu = "?"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": threads or torch.get_num_threads(), "cpu": cpu,
            "cpu_count": os.cpu_count(),
            **({"device": str(device), "gpu": torch.cuda.get_device_name(device)} if device is not None
               and device.type == "cuda" else {})}


def write_report(out: str, name: str, report: dict, markdown: str) -> list:
    """`<out>/<name>.json` and `<out>/<name>.md`, atomically; returns the paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.md")]
    atomic_write_text(paths[0], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths[1], markdown if markdown.endswith("\n") else markdown + "\n")
    return paths


def save_figure(fig, out: str, filename: str) -> str:
    """Save a matplotlib figure atomically into `out` and close it; returns the path."""
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, filename)
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def print_written(paths) -> None:
    print("wrote " + ", ".join(sorted(paths)))


def report_checks(checks) -> int:
    """Print `PASS|FAIL  name: detail` per check, then a verdict; return 1 when any failed, else 0.

    `checks` is a list of dicts with "name", "pass" (True, False, or None for "not judged") and optional "detail".
    """
    failed = 0
    for c in checks:
        verdict = "n/a " if c["pass"] is None else "PASS" if c["pass"] else "FAIL"
        failed += c["pass"] is False
        print(f"{verdict}  {c['name']}" + (f": {c['detail']}" if c.get("detail") else ""))
    judged = sum(c["pass"] is not None for c in checks)
    print(f"{failed} of {judged} checks FAIL" if failed else f"all {judged} checks PASS")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ timing


class LoadMonitor:
    """Times a callable while watching what other processes do to the machine (Linux /proc/stat; elsewhere no
    load is seen). `budget` seconds may go to waiting for quiet or re-measuring contended samples."""

    def __init__(self, budget: float):
        self.budget, self.lost = budget, 0.0
        self.hz, self.ncpu = (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100), os.cpu_count() or 1
        self.has_proc = os.path.isfile("/proc/stat")

    def snapshot(self):
        """(wall seconds, CPU-seconds busy on the whole machine, CPU-seconds used by this process)."""
        busy = 0.0
        if self.has_proc:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]
            busy = (sum(ticks) - ticks[3] - ticks[4]) / self.hz
        times = os.times()
        return time.perf_counter(), busy, times.user + times.system

    def foreign_load(self, a, b) -> float:
        """Share of the machine's CPUs used by other processes between two snapshots."""
        if not self.has_proc or b[0] <= a[0]:
            return 0.0
        share = max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / ((b[0] - a[0]) * self.ncpu)
        return min(1.0, share)  # tick granularity can overshoot on a saturated machine

    def load_over(self, seconds: float) -> float:
        a = self.snapshot()
        time.sleep(seconds)
        return self.foreign_load(a, self.snapshot())

    def wait_quiet(self, window=0.25, threshold=0.05):
        """Wait until other processes use < `threshold` of the machine over `window` s, or the budget is spent."""
        while self.budget > 0:
            load = self.load_over(window)
            self.budget, self.lost = self.budget - window, self.lost + window
            if load < threshold:
                return

    def measure(self, fn):
        """(seconds, foreign load) of one run of fn; re-run while other processes interfere and the budget lasts."""
        while True:
            self.wait_quiet()
            a = self.snapshot()
            fn()
            b = self.snapshot()
            seconds, load = b[0] - a[0], self.foreign_load(a, b)
            if load <= CONTENDED or self.budget <= 0:
                return seconds, load
            self.budget, self.lost = self.budget - seconds, self.lost + seconds


def busy_machine_warning(seconds: float = 1.0):
    """A warning line when other processes use more than BUSY of the CPUs now (measured over `seconds`), else None."""
    load = LoadMonitor(0).load_over(seconds)
    if load > BUSY:
        return (f"warning: other processes are using {load:.0%} of the {os.cpu_count()} CPUs; speed figures from "
                "this run may be distorted (ratios measured in the same round cancel part of it)")
    return None


def interleaved_rounds(variants: dict, measures: dict, rounds: int, warmup: int, monitor: LoadMonitor, seed=0,
                       progress=None):
    """Time every variant under every measure in `rounds` interleaved rounds.

    variants: {key: model}; measures: {name: (fn(model), units per call)}. Each round runs one measure for every
    variant (order shuffled, seeded), then the next measure. Returns (speeds, loads): {key: {measure: [units/s per
    round]}} and the foreign load of each sample.
    """
    speeds = {key: {m: [] for m in measures} for key in variants}
    loads = {key: {m: [] for m in measures} for key in variants}
    order, rng = list(variants), random.Random(seed)
    for _ in range(warmup):
        for key in order:
            for fn, _units in measures.values():
                fn(variants[key])
    for _ in range(rounds):
        for m, (fn, units) in measures.items():
            rng.shuffle(order)
            for key in order:
                seconds, load = monitor.measure(lambda: fn(variants[key]))
                speeds[key][m].append(units / seconds)
                loads[key][m].append(load)
                if progress is not None:
                    progress.set_postfix_str(f"{m} {key}")
                    progress.update()
    return speeds, loads


def per_round(a: list, b: list) -> list:
    """a[i] / b[i]: two speeds measured seconds apart in the same round."""
    return [x / y for x, y in zip(a, b)]


def paired_ratio(a: list, b: list) -> float:
    """Median over rounds of the per-round ratio."""
    return statistics.median(per_round(a, b))


def slower_p_value(ratios: list) -> float:
    """One-sided sign test: the chance of losing at least as many rounds (ratio < 1) as observed if both were equally
    fast (each round a coin flip). Small means really slower, not unlucky."""
    n, lost = len(ratios), sum(r < 1.0 for r in ratios)
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2**n


def summary(values: list, loads: list) -> dict:
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "spread": (max(values) - min(values)) / med,
            "samples": values, "foreign_load": loads, "contended_samples": sum(x > CONTENDED for x in loads)}


def contention_warning(contended: int, total: int):
    if contended:
        return (f"**Warning:** {contended} of {total} samples ran while other processes used more than "
                f"{CONTENDED:.0%} of the CPUs; the ratios may be distorted.")
    return None
