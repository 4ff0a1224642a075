"""Agency vs. baseline pruning comparison, from one command.

1. Train a small GPT-2 (GPT-2 tokenizer) on wikitext-2 *valid* + tinyshakespeare for a fixed time budget and
   evaluate perplexity on a fixed prefix of wikitext-2 *test* (the splits are recorded in the JSON).
2. Convert to AgencyGPT2 (identical weights). For every pruning level and strategy: prune, then measure perplexity,
   lexical diversity (distinct-1/2 of seeded samples from fixed prompts), greedy generation tokens/s and time,
   and peak memory for (a) the baseline GPT-2 pruned by transformers' own `prune_heads` on the same heads and
   (b) AgencyGPT2 pruned; for the two best strategies also (c) AgencyGPT2 pruned + a short distillation recovery
   from the unpruned model and (d) the pruning curriculum (0 -> 30 -> 50 -> 70%, distilled, one run).
3. Write pruning_comparison.{json,md} and four PNGs into --out (default outputs/pruning_comparison), and judge the
   goals: AgencyGPT2 equals GPT-2 at 0% (always), and on a full run the distilled models within 10% of the unpruned
   perplexity and better than random pruning at 50%. The run exits non-zero when a judged goal FAILs.

    python benchmarks/pruning_comparison.py                # full run, about 30 minutes on 2 CPU cores
    python benchmarks/pruning_comparison.py --model DIR    # start from your GPT-2 checkpoint (no training)
    python benchmarks/pruning_comparison.py --quick        # CI-sized smoke run
    python benchmarks/pruning_comparison.py --update-committed-results   # replace benchmarks/results/pruning_*
"""

import argparse
import copy
import math
import os
import shutil
import sys
import time

import torch
from datasets import concatenate_datasets
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments, set_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import armada  # noqa: E402,F401
from armada import AgencyGPT2ForCausalLM  # noqa: E402
from armada.compat import prune_gpt2_heads  # noqa: E402
from armada.data import build_lm_datasets, load_text, tokenize_into_blocks  # noqa: E402
from armada.evaluation import (  # noqa: E402
    generate_texts,
    generation_speed,
    lexical_diversity,
    peak_memory,
    perplexity,
)
from armada.io_utils import atomic_savefig  # noqa: E402
from armada.pruning import STRATEGIES, score_heads, select_heads  # noqa: E402
from armada.tokenization import gpt2_tokenizer  # noqa: E402
from armada.trainers import CurriculumTrainer, DistillationTrainer, finalize_pruning, pruning_curriculum  # noqa: E402
from benchmarks import common  # noqa: E402

NAME = "pruning_comparison"
SHARED = os.path.join(REPO, "..", "shared", "data")


class DistilledCurriculumTrainer(CurriculumTrainer, DistillationTrainer):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, NAME, model="a GPT-2 checkpoint folder to prune instead of training one (its "
                                          "tokenizer must be GPT-2's)")
    p.add_argument("--train-files", nargs="+",
                   default=[os.path.join(SHARED, "wikitext-2", "valid.txt"),
                            os.path.join(SHARED, "tinyshakespeare", "input.txt")])
    p.add_argument("--eval-file", default=os.path.join(SHARED, "wikitext-2", "test.txt"))
    p.add_argument("--levels", default="0,0.3,0.5,0.7")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    args = p.parse_args(argv)
    size = dict(n_layer=2, n_embd=64, n_head=4) if args.quick else dict(n_layer=4, n_embd=256, n_head=8)
    budget = dict(train_seconds=25, eval_tokens=2048, recovery_steps=4, stage_steps=3, gen_tokens=16,
                  gen_repeats=1, calib_blocks=4, sample_tokens=16, l0_steps=10) if args.quick else \
        dict(train_seconds=480, eval_tokens=8192, recovery_steps=25, stage_steps=15, gen_tokens=64,
             gen_repeats=3, calib_blocks=8, sample_tokens=40, l0_steps=30)
    args.model_size, args.budget = size, budget
    args.levels = [float(x) for x in args.levels.split(",")]
    args.strategies = args.strategies.split(",")
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad:
        p.error(f"unknown strategies {bad}; allowed: {', '.join(STRATEGIES)}")
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model!r} is not a checkpoint folder (no config.json there)")
    args.out = common.output_dir(args, NAME)
    return args


# ------------------------------------------------------------------------------------------------ training


def train_baseline(args, tokenizer, train_blocks):
    config = GPT2Config(n_positions=256, **args.model_size)
    model = GPT2LMHeadModel(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3 if args.quick else 6e-4, weight_decay=0.1)
    batch_size = 8
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(args.seed))
    ids = torch.tensor(train_blocks["input_ids"])
    start, step, tokens, losses = time.time(), 0, 0, []
    bar = tqdm(total=args.budget["train_seconds"], desc="train baseline (s)", unit="s")
    while time.time() - start < args.budget["train_seconds"]:
        index = order[(step * batch_size) % len(order):][:batch_size]
        batch = ids[index]
        lr_scale = min(1.0, (step + 1) / 50)
        for group in optimizer.param_groups:
            group["lr"] = (1e-3 if args.quick else 6e-4) * lr_scale
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        step, tokens = step + 1, tokens + batch.numel()
        losses.append(loss.item())
        bar.n = min(int(time.time() - start), args.budget["train_seconds"])
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", step=step)
    bar.close()
    model.eval()
    return model, {"steps": step, "tokens": tokens, "seconds": time.time() - start, "batch_size": batch_size,
                   "block_size": ids.shape[1], "final_train_loss": sum(losses[-20:]) / len(losses[-20:])}


def training_args(args, out, steps):
    return TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-4,
                             warmup_steps=0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, seed=args.seed, disable_tqdm=True)


def recover(args, student, teacher, train_blocks, out):
    trainer = DistillationTrainer(model=student, args=training_args(args, out, args.budget["recovery_steps"]),
                                  train_dataset=train_blocks, teacher_model=teacher, alpha=0.5, temperature=2.0)
    trainer.train()
    return student.eval()


class StageSnapshots(TrainerCallback):
    """Copy the model at the end of every curriculum stage (before the next stage withdraws more heads)."""

    def __init__(self):
        self.snapshots = {}
        self.trainer = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        callback = self.trainer.curriculum_callback
        if callback.finished:
            return
        stage = callback.curriculum[callback.stage]
        if state.global_step - callback.stage_start_step >= stage.max_steps:
            snapshot = copy.deepcopy(model).eval()
            finalize_pruning(snapshot)
            self.snapshots[stage.params["pruning_level"]] = snapshot


def curriculum(args, student, teacher, train_blocks, calibration, strategy, out):
    snapshots = StageSnapshots()
    levels = [level for level in args.levels]
    trainer = DistilledCurriculumTrainer(
        model=student, args=training_args(args, out, args.budget["stage_steps"] * len(levels)),
        train_dataset=train_blocks, teacher_model=teacher, alpha=0.5, temperature=2.0, callbacks=[snapshots],
        curriculum=pruning_curriculum(levels, strategy, calibration, args.budget["stage_steps"],
                                      l0_steps=args.budget["l0_steps"]))
    snapshots.trainer = trainer
    trainer.train()
    return snapshots.snapshots, trainer.curriculum_history


# ------------------------------------------------------------------------------------------------ measuring


def measure(args, model, tokenizer, eval_ids, prompt_ids):
    model.eval()
    ppl = perplexity(model, eval_ids, max_length=256, stride=256, batch_size=8)
    with peak_memory() as memory:
        speed = generation_speed(model, prompt_ids, new_tokens=args.budget["gen_tokens"],
                                 repeats=args.budget["gen_repeats"])
    samples = generate_texts(model, tokenizer, max_new_tokens=args.budget["sample_tokens"], seed=args.seed)
    return {"perplexity": ppl["perplexity"], "eval_tokens": ppl["tokens"], **lexical_diversity(samples),
            "gen_tokens_per_s": speed["tokens_per_s"], "gen_seconds": speed["seconds"],
            "peak_memory_mb": memory["peak_bytes"] / 2**20, "params": model.num_parameters()}


def heads_list(selection):
    return {str(layer): heads for layer, heads in selection.items()}


# ------------------------------------------------------------------------------------------------ plots


def plot(results, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    levels = sorted({r["level"] for r in rows})
    base = next(r for r in rows if r["variant"] == "baseline" and r["level"] == 0.0)
    strategies = results["strategies"]
    paths = {}

    def series(variant, strategy, key):
        pts = sorted((r["level"], r[key]) for r in rows if r["variant"] == variant and r["strategy"] == strategy)
        return [p[0] * 100 for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in strategies:
        x, y = series("agency", strategy, "gen_tokens_per_s")
        ax.plot(x, [v / base["gen_tokens_per_s"] for v in y], "o-", label=f"AgencyGPT2 ({strategy})")
    x, y = series("baseline_pruned", strategies[0], "gen_tokens_per_s")
    ax.plot(x, [v / base["gen_tokens_per_s"] for v in y], "k--s", label="GPT-2 + transformers prune_heads")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="heads pruned (%)", ylabel="generation speed / unpruned GPT-2", title="Speed vs pruning level")
    ax.legend(fontsize=8)
    paths["speed"] = os.path.join(out_dir, "pruning_speed.png")
    fig.tight_layout()
    atomic_savefig(fig, paths["speed"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in strategies:
        x, y = series("agency", strategy, "perplexity")
        ax.plot(x, y, "o-", label=f"pruned ({strategy})")
    for variant, style in (("agency_distilled", "s--"), ("curriculum", "^:")):
        for strategy in results["best_strategies"]:
            x, y = series(variant, strategy, "perplexity")
            if x:
                ax.plot(x, y, style, label=f"{variant.replace('_', ' ')} ({strategy})")
    ax.axhline(base["perplexity"], color="gray", lw=0.8, label="unpruned")
    ax.set(xlabel="heads pruned (%)", ylabel="perplexity (wikitext-2 test prefix)", yscale="log",
           title="Perplexity vs pruning level")
    ax.legend(fontsize=7)
    paths["perplexity"] = os.path.join(out_dir, "pruning_perplexity.png")
    fig.tight_layout()
    atomic_savefig(fig, paths["perplexity"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, marker in (("agency", "o"), ("agency_distilled", "s"), ("curriculum", "^"),
                            ("baseline_pruned", "x")):
        pts = [r for r in rows if r["variant"] == variant and r["level"] > 0]
        ax.scatter([r["gen_tokens_per_s"] / base["gen_tokens_per_s"] for r in pts], [r["perplexity"] for r in pts],
                   marker=marker, label=variant.replace("_", " "))
    ax.scatter([1.0], [base["perplexity"]], marker="*", s=150, color="k", label="unpruned")
    ax.set(xlabel="generation speed / unpruned", ylabel="perplexity", yscale="log",
           title="Quality-speed trade-off (lower right is better)")
    ax.legend(fontsize=8)
    paths["pareto"] = os.path.join(out_dir, "pruning_pareto.png")
    fig.tight_layout()
    atomic_savefig(fig, paths["pareto"], dpi=120)
    plt.close(fig)

    top = max(levels)
    at_top = [r for r in rows if r["level"] == top and r["variant"] != "baseline_pruned"]
    metrics = [("speed", lambda r: r["gen_tokens_per_s"] / base["gen_tokens_per_s"]),
               ("1/ppl (rel.)", lambda r: base["perplexity"] / r["perplexity"]),
               ("distinct-2", lambda r: r["distinct_2"]),
               ("1/params (rel.)", lambda r: base["params"] / r["params"]),
               ("1/memory (rel.)", lambda r: base["peak_memory_mb"] / r["peak_memory_mb"])]
    angles = [2 * math.pi * i / len(metrics) for i in range(len(metrics))] + [0]
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(polar=True)
    for r in at_top:
        values = [fn(r) for _, fn in metrics]
        ax.plot(angles, values + values[:1], label=f"{r['variant'].replace('_', ' ')} ({r['strategy']})")
    ax.set_xticks(angles[:-1], [name for name, _ in metrics])
    ax.set_title(f"At {top:.0%} pruning (1.0 = unpruned on speed/ppl/params/memory)")
    ax.legend(fontsize=6, loc="lower left", bbox_to_anchor=(-0.15, -0.2))
    paths["radar"] = os.path.join(out_dir, f"pruning_radar_{int(top * 100)}.png")
    fig.tight_layout()
    atomic_savefig(fig, paths["radar"], dpi=120)
    plt.close(fig)
    return paths


def markdown(results):
    base = next(r for r in results["rows"] if r["variant"] == "baseline" and r["level"] == 0.0)
    lines = ["| variant | strategy | pruned | perplexity | Δ vs unpruned | distinct-2 | gen tok/s | speed × | params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['variant']} | {r['strategy']} | {r['level']:.0%} | {r['perplexity']:.1f} | "
                     f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.1f}% | {r['distinct_2']:.3f} | "
                     f"{r['gen_tokens_per_s']:.1f} | {r['gen_tokens_per_s'] / base['gen_tokens_per_s']:.2f} | "
                     f"{r['params'] / 1e6:.2f}M |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def load_data(args, tokenizer):
    for path in [*args.train_files, args.eval_file]:
        if not os.path.isfile(path):
            raise SystemExit(f"error: data file {path} not found (expected ../shared/data beside the repo).")
    train_blocks = concatenate_datasets([build_lm_datasets(f, tokenizer, block_size=128, eval_fraction=0.01,
                                                           seed=args.seed)["train"] for f in args.train_files])
    eval_ids = torch.tensor(sum(tokenize_into_blocks(load_text(args.eval_file), tokenizer, 256)["input_ids"][
        : math.ceil(args.budget["eval_tokens"] / 256)], []))
    calibration = [torch.tensor(train_blocks.shuffle(seed=args.seed)[: args.budget["calib_blocks"]]["input_ids"])]
    prompt_ids = torch.tensor([tokenizer("The history of the city of")["input_ids"] * 4])[:, :32]
    return train_blocks, eval_ids, calibration, prompt_ids


def load_or_train_baseline(args, tokenizer, train_blocks):
    """--model DIR (a GPT-2 checkpoint), or a small GPT-2 trained for the time budget."""
    if not args.model:
        return train_baseline(args, tokenizer, train_blocks)
    model = GPT2LMHeadModel.from_pretrained(args.model).eval()
    if model.config.model_type != "gpt2" or model.config.vocab_size != len(tokenizer):
        raise SystemExit(f"error: --model {args.model!r} must be a GPT-2 checkpoint with GPT-2's {len(tokenizer)}-id "
                         f"vocabulary (got {model.config.model_type}, {model.config.vocab_size} ids)")
    return model, {"checkpoint": args.model, "steps": 0}


class Rows(list):
    """The measured rows; `add` measures one model and prints its line."""

    def __init__(self, args, tokenizer, eval_ids, prompt_ids):
        super().__init__()
        self.measure = lambda model: measure(args, model, tokenizer, eval_ids, prompt_ids)

    def add(self, variant, strategy, level, model, selection=None, **extra):
        row = {"variant": variant, "strategy": strategy, "level": level,
               "heads_per_layer": model.num_heads_per_layer() if hasattr(model, "num_heads_per_layer") else None,
               **self.measure(model), **extra}
        if selection is not None:
            row["pruned_heads"] = heads_list(selection)
        self.append(row)
        tqdm.write(f"{variant:>17} {strategy:>10} {level:4.0%}  ppl {row['perplexity']:9.2f}  "
                   f"gen {row['gen_tokens_per_s']:7.1f} tok/s  distinct-2 {row['distinct_2']:.3f}")
        return row


def prune_sweep(args, baseline, agency, calibration, rows):
    """Every strategy x level: GPT-2 pruned by transformers (where it can run) and AgencyGPT2 on the same heads."""
    failures, scores = [], {}
    for strategy in tqdm(args.strategies, desc="score heads"):
        scores[strategy] = score_heads(copy.deepcopy(agency), strategy, calibration, seed=args.seed,
                                       l0_steps=args.budget["l0_steps"])
    for strategy in args.strategies:
        for level in [lv for lv in args.levels if lv > 0]:
            selection = select_heads(scores[strategy], level)
            pruned_gpt2 = copy.deepcopy(baseline)
            try:
                prune_gpt2_heads(pruned_gpt2, selection)
                rows.add("baseline_pruned", strategy, level, pruned_gpt2, selection)
            except ValueError as error:  # transformers' GPT-2 cannot run a layer left with no head
                failures.append({"variant": "baseline_pruned", "strategy": strategy, "level": level,
                                 "pruned_heads": heads_list(selection), "error": str(error)})
                tqdm.write(f"  baseline_pruned {strategy} {level:.0%}: transformers failed ({error})")
            pruned = copy.deepcopy(agency)
            pruned.prune_heads(selection)
            rows.add("agency", strategy, level, pruned, selection)
    return scores, failures


def best_strategies(args, rows, mid):
    ranked = sorted(args.strategies, key=lambda s: next(
        r["perplexity"] for r in rows if r["variant"] == "agency" and r["strategy"] == s and r["level"] == mid))
    return [s for s in ranked if s != "random"][:2]


def recovery_sweep(args, agency, scores, best, train_blocks, calibration, rows, work):
    """For the best strategies: prune + distillation per level, and the pruning curriculum through all levels."""
    for strategy in best:
        for level in [lv for lv in args.levels if lv > 0]:
            student = copy.deepcopy(agency).requires_grad_(True)  # the teacher copy is frozen by the trainer
            student.prune_heads(select_heads(scores[strategy], level))
            recover(args, student.train(), agency, train_blocks, work)
            rows.add("agency_distilled", strategy, level, student, recovery_steps=args.budget["recovery_steps"])
        student = copy.deepcopy(agency).requires_grad_(True).train()
        snapshots, _history = curriculum(args, student, agency, train_blocks, calibration, strategy, work)
        for level, model in sorted(snapshots.items()):
            if level > 0:
                rows.add("curriculum", strategy, level, model, steps_per_stage=args.budget["stage_steps"])


def goals(args, rows, best, mid):
    """The judged goals as report_checks entries; quality goals are n/a on a --quick run (tiny budgets)."""
    base = rows[0]
    mid_rows = {(r["variant"], r["strategy"]): r for r in rows if r["level"] == mid}
    judged = None if args.quick else True
    out = [{"name": "agency equals baseline at 0%",
            "pass": abs(rows[1]["perplexity"] - base["perplexity"]) <= 1e-4 * base["perplexity"]}]
    for strategy in best:
        distilled, random = mid_rows.get(("agency_distilled", strategy)), mid_rows.get(("agency", "random"))
        if distilled:
            ok = distilled["perplexity"] <= 1.1 * base["perplexity"]
            out.append({"name": f"{strategy}+distill within 10% of unpruned at {mid:.0%}", "pass": judged and ok,
                        "detail": f"{distilled['perplexity']:.2f} vs {base['perplexity']:.2f}"})
            if random:
                ok = distilled["perplexity"] < random["perplexity"]
                out.append({"name": f"{strategy}+distill beats random at {mid:.0%}", "pass": judged and ok,
                            "detail": f"{distilled['perplexity']:.2f} vs {random['perplexity']:.2f}"})
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    started = time.time()
    warning = common.busy_machine_warning()
    if warning:
        print(warning)
    tokenizer = gpt2_tokenizer()
    train_blocks, eval_ids, calibration, prompt_ids = load_data(args, tokenizer)
    baseline, train_info = load_or_train_baseline(args, tokenizer, train_blocks)
    agency = AgencyGPT2ForCausalLM.from_gpt2(baseline).eval()

    rows = Rows(args, tokenizer, eval_ids, prompt_ids)
    rows.add("baseline", "-", 0.0, baseline)
    rows.add("agency", "-", 0.0, agency)
    scores, failures = prune_sweep(args, baseline, agency, calibration, rows)
    mid = 0.5 if 0.5 in args.levels else max(args.levels)
    best = best_strategies(args, rows, mid)
    work = os.path.join(args.out, ".work")
    recovery_sweep(args, agency, scores, best, train_blocks, calibration, rows, work)
    shutil.rmtree(work, ignore_errors=True)
    checks = goals(args, rows, best, mid)

    results = {
        "description": "Agency vs. baseline pruning comparison",
        "quick": args.quick,
        "environment": {**common.environment(args.threads), "busy_at_start": warning},
        "data": {"train": [os.path.relpath(f, REPO) for f in args.train_files],
                 "eval": os.path.relpath(args.eval_file, REPO),
                 "eval_note": f"first {eval_ids.numel()} tokens of the eval file, disjoint 256-token windows"},
        "model": {**{k: getattr(baseline.config, k) for k in ("n_layer", "n_embd", "n_head", "n_positions",
                                                               "vocab_size")}, "tokenizer": "GPT-2 BPE",
                  "checkpoint": args.model},
        "training": train_info,
        "budget": args.budget,
        "strategies": args.strategies,
        "best_strategies": best,
        "goal": {c["name"]: c["pass"] for c in checks},
        "rows": list(rows),
        "peer_failures": failures,
        "wall_seconds": time.time() - started,
    }
    figures = plot(results, args.out)
    results["figures"] = {k: os.path.relpath(v, args.out) for k, v in figures.items()}
    paths = common.write_report(args.out, NAME, results, markdown(results)) + list(figures.values())
    print(markdown(results))
    print(f"wall time {results['wall_seconds'] / 60:.1f} min")
    common.print_written(paths)
    return common.report_checks(checks)


if __name__ == "__main__":
    sys.exit(main())
