"""UnifiedARMT on the synthetic memory / reasoning / multi-hop tasks, with sweeps over memory size and init.

For every run a tiny UnifiedARMT (default 3 layers, 64 wide) is trained from scratch with `CurriculumTrainer` on an
endless `TaskStream` of fresh samples (`armada.tasks`) for a fixed number of steps, then scored on 1,000 held-out
samples of the evaluation task (a different seed) by exact match of the answer (teacher-forced argmax, which equals
greedy decoding for these answers). Segments are shorter than the samples and every answer needs tokens from
earlier segments, so it must come through memory; each run is also scored with the memory reset at every segment
boundary (the same weights), which shows what memory contributes.

Training signal and curricula (evaluation always uses the plain task: one query, only the final answer scored):
  - memory_retrieval: the context grows over the stages (first inside one segment, then across two, then the full
    length); one query per sample (with as many queries as pairs the last answer is the one value not yet given,
    a shortcut around memory that the first attempt found);
  - pattern_reasoning: every term the rule determines is labeled (`label_shown`); the answer marker opens a new
    segment, so the last terms come from memory;
  - multi_hop: first one hop only (retrieval among the 6 pairs, three queries per sample), then the task with the
    path written out before the answer (`show_path`: `<query> a 2 <answer> b c`, one retrieval per token), then the
    task itself. Earlier curricula (each run's "stages" in the JSON says what it trained): four queries per sample
    with 1..n_hops hops (`n_queries`, until 2026-11-30; their earlier answers write chain nodes into the context,
    which the single-query task does not have), then one hop first and those four queries.

Runs: each task with 16 memory tokens and random init; the SWEPT task again with 8/32/64 memory tokens and with
the orthogonal and embedding_kmeans inits. On request (`--runs <task>_full_attention`) a control: GPT-2 of the same
size trained the same way on whole samples (no segments, nothing passes through memory), which separates what the
memory costs from what the model size and budget reach at all; with `--position rotary` the control is UnifiedARMT
itself with rotary positions and one segment longer than every sample (full attention, memory never written).
Targets (issue 4): retrieval >= 95%, reasoning >= 90%, multi-hop >= 99%.

Results go to --out (default outputs/armt_tasks; the committed record only with --update-committed-results).

    python benchmarks/armt_tasks.py                   # full run (hours on 2 CPU cores; --runs picks some)
    python benchmarks/armt_tasks.py --quick           # smoke test: tiny model, few steps
    python benchmarks/armt_tasks.py --runs memory_retrieval_m16_random,multi_hop_m16_random
    # retrieval >= 95% (99.7% / 98.7% for seeds 0 / 1, ~1 h on 1 thread): rotary positions, 8 heads, mastery
    # curriculum (leave a stage as soon as its own accuracy reaches 90%; its share of the steps is a cap)
    python benchmarks/armt_tasks.py --runs memory_retrieval_m4_random --position rotary --heads 8 --batch-size 128 \
        --lr 1e-3 --lr-scheduler constant_with_warmup --steps 9000 --stage-fractions 0.35,0.25,0.4 --advance-at 0.9,0.9
    # multi-hop >= 99% (100.0%, ~1 h on 1 thread): the same recipe with the default multi-hop curriculum
    python benchmarks/armt_tasks.py --runs multi_hop_m4_random --position rotary --heads 8 --batch-size 128 \
        --lr 1e-3 --lr-scheduler constant_with_warmup --steps 9000 --stage-fractions 0.25,0.25,0.5 --advance-at 0.9,0.9
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments, set_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import armada  # noqa: E402,F401
from armada import UnifiedARMTConfig, UnifiedARMTForCausalLM  # noqa: E402
from armada.tasks import (  # noqa: E402  # noqa: E402
    MemoryRetrieval,
    MultiHop,
    PatternReasoning,
    TaskCollator,
    TaskStream,
    answer_accuracy,
    build_dataset,
    task_curriculum,
)
from armada.trainers import CurriculumTrainer  # noqa: E402
from benchmarks import common  # noqa: E402

TARGETS = {"memory_retrieval": 0.95, "pattern_reasoning": 0.90, "multi_hop": 0.99}


STEPS = {"memory_retrieval": 8000, "pattern_reasoning": 800, "multi_hop": 2000}  # default budgets (--steps overrides)
MODEL = {"memory_retrieval": (3, 64), "pattern_reasoning": (4, 128), "multi_hop": (3, 64)}  # (layers, hidden)


def tasks(quick):
    """name -> (evaluation task, segment size, training stages [(fraction of the steps, knobs of the stage)]).

    Stage knobs are applied to the evaluation task; each sample spans several segments at the last stage."""
    if quick:
        return {"memory_retrieval": (MemoryRetrieval(context_length=24, n_pairs=2, n_symbols=16), 8,
                                     [(0.5, {"context_length": 6}), (0.5, {})]),
                "pattern_reasoning": (PatternReasoning(rule="arithmetic", modulus=17, n_shown=7), 4,
                                      [(1.0, {"label_shown": True})]),
                "multi_hop": (MultiHop(n_hops=2, chain_length=3, n_distractors=2, n_symbols=16), 8,
                              [(0.3, {"n_hops": 1, "n_queries": 3}), (0.3, {"show_path": True}), (0.4, {})])}
    return {"memory_retrieval": (MemoryRetrieval(context_length=48, n_pairs=2, n_symbols=16), 16,
                                 [(0.1, {"context_length": 8}), (0.2, {"context_length": 24}), (0.7, {})]),
            "pattern_reasoning": (PatternReasoning(rule="arithmetic", modulus=17, n_shown=15), 8,
                                  [(1.0, {"label_shown": True})]),
            "multi_hop": (MultiHop(n_hops=2, chain_length=3, n_distractors=3, n_symbols=16), 8,
                          [(0.25, {"n_hops": 1, "n_queries": 3}), (0.25, {"show_path": True}), (0.5, {})])}


SWEPT = "pattern_reasoning"  # the default sweeps run on the task that trains in minutes


HEADS = 4  # attention heads per layer of every run (--heads)


POSITION = "absolute"  # default position_embedding_type of the runs (--position)


LR_SCHEDULER = "cosine"  # default learning-rate schedule (--lr-scheduler)
SCHEDULER_TAGS = {"cosine": "cosine", "constant_with_warmup": "constlr", "warmup_stable_decay": "wsd"}
WSD_DECAY = 0.1  # share of the steps over which warmup_stable_decay decays the learning rate


CONTROL = "full_attention"  # "memory init" of the control runs: a GPT-2 of the same size, no segments, no memory


def run_name(task, memory_tokens, memory_init):
    return f"{task}_{CONTROL}" if memory_init == CONTROL else f"{task}_m{memory_tokens}_{memory_init}"


def runs(quick, everything=False):
    """Run name -> (task, memory tokens, memory init). Default: every task with 16 memory tokens and random init,
    then the memory-size (8/32/64) and init sweeps on SWEPT; `everything`: the sweeps on every task, 4 memory tokens
    on every task, and the full-attention controls `<task>_full_attention` (GPT-2 of the same size trained the same
    way on whole samples: what the model size and budget reach when nothing has to pass through memory)."""
    out = [(task, 16 if not quick else 4, "random") for task in TARGETS]
    if not quick:
        for task in (TARGETS if everything else [SWEPT]):
            out += [(task, m, "random") for m in (8, 32, 64)]
            out += [(task, 16, init) for init in ("orthogonal", "embedding_kmeans")]
    if everything:
        out += [(task, 4, "random") for task in TARGETS]  # fewest memory tokens: learned fastest in probes
        out += [(task, 0, CONTROL) for task in TARGETS]
    return {run_name(*r): r for r in out}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "armt_tasks", seed=False)
    p.add_argument("--runs", default=None, help="comma-separated run names (default: all)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other runs already in <out>/armt_tasks.json (replace only the runs made now)")
    p.add_argument("--add", action="append", default=[], metavar="JSON",
                   help="also take the runs in this armt_tasks.json (e.g. made in parallel); with --runs '' the "
                        "report is only rebuilt")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per run (default per task {STEPS}, quick 30)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden-size", type=int, default=None, help=f"default per task {MODEL} (quick 32)")
    p.add_argument("--layers", type=int, default=None, help="default per task (quick 2); runs made at another size "
                                                            "than the task's default are named ..._<layers>x<hidden>")
    p.add_argument("--heads", type=int, default=HEADS, help=f"attention heads per layer (default {HEADS}); runs made "
                                                            "with another count are named ..._h<heads>")
    p.add_argument("--position", choices=["absolute", "rotary"], default=POSITION,
                   help=f"UnifiedARMT position_embedding_type (default {POSITION}); runs made with the other one are "
                        "named ..._<position>")
    p.add_argument("--stages", default=None, metavar="JSON",
                   help="the training curriculum instead of the task's own: a JSON list of knob dicts applied to "
                        "the evaluation task, one per stage, e.g. '[{\"n_hops\": 1, \"n_queries\": 3}, {}]' (equal "
                        "shares unless --stage-fractions); runs are named ..._curriculum-<stage>-<stage>-... with "
                        "each stage written as its knobs (hops1queries3; {} is 'task')")
    p.add_argument("--stage-fractions", default=None, metavar="F1,F2,...",
                   help="share of the steps spent in each curriculum stage, one number per stage of the task, "
                        "summing to 1 (default: the task's own, see `tasks`); runs made with other shares are "
                        "named ..._stages<percent>-<percent>-...")
    p.add_argument("--lr-scheduler", choices=list(SCHEDULER_TAGS), default=LR_SCHEDULER,
                   help=f"default {LR_SCHEDULER}; warmup_stable_decay: constant, then a cosine decay over the last "
                        f"{WSD_DECAY:.0%} of the steps; runs made with another schedule are named "
                        "..._constlr / ..._wsd")
    p.add_argument("--advance-at", default=None, metavar="T1,T2,...",
                   help="mastery curriculum: a stage (all but the last) also ends as soon as the accuracy on "
                        "--stage-eval-samples samples of its own difficulty reaches its threshold (checked every "
                        "--eval-every steps); the stage shares become step caps and the last stage gets every step "
                        "left. Runs are named ..._advance<percent>-<percent>-...")
    p.add_argument("--stage-eval-samples", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: a sixth of "
                                                                "the steps; 250 with --advance-at)")
    p.add_argument("--eval-samples", type=int, default=None, help="default 1000 (quick 64)")
    p.add_argument("--seed", type=int, default=0, help="runs made with another seed are named ..._seed<n>")
    args = p.parse_args(argv)
    args.eval_samples = args.eval_samples or (64 if args.quick else 1000)
    if args.stage_fractions is not None:
        try:
            args.stage_fractions = [float(f) for f in args.stage_fractions.split(",")]
        except ValueError:
            p.error(f"--stage-fractions takes comma-separated numbers, got {args.stage_fractions!r}")
        if any(f <= 0 for f in args.stage_fractions) or abs(sum(args.stage_fractions) - 1) > 1e-6:
            p.error(f"--stage-fractions must be positive and sum to 1, got {args.stage_fractions}")
    if args.stages is not None:
        try:
            args.stages = json.loads(args.stages)
        except json.JSONDecodeError as e:
            p.error(f"--stages must be a JSON list of knob dicts, got {args.stages!r} ({e})")
        if not (isinstance(args.stages, list) and args.stages and all(isinstance(k, dict) for k in args.stages)):
            p.error(f"--stages must be a non-empty JSON list of knob dicts (one per stage), got {args.stages!r}")
    if args.advance_at is not None:
        try:
            args.advance_at = [float(t) for t in args.advance_at.split(",")]
        except ValueError:
            p.error(f"--advance-at takes comma-separated accuracies, got {args.advance_at!r}")
        if any(not 0 <= t <= 1 for t in args.advance_at):
            p.error(f"--advance-at thresholds are accuracies in [0, 1] (0: advance at the first evaluation), got "
                    f"{args.advance_at}")
    if args.heads < 1:
        p.error(f"--heads must be a positive number of attention heads, got {args.heads}")
    if args.eval_every is not None and args.eval_every < 1:
        p.error(f"--eval-every must be a positive number of steps, got {args.eval_every}")
    args.out = common.output_dir(args, "armt_tasks", merge=args.merge)
    return args


class Clock(TrainerCallback):
    def on_train_begin(self, *a, **k):
        self.start = time.perf_counter()

    def on_train_end(self, *a, **k):
        self.seconds = time.perf_counter() - self.start


@torch.no_grad()
def accuracy(model, data, collator, reset_memory=False, batch_size=250):
    """Exact-match accuracy; with `reset_memory` the input is streamed one segment at a time and the memory state
    is reset after each, so nothing crosses a segment boundary (same weights, memory ablated)."""
    model.eval()
    segment, correct = getattr(model.config, "segment_size", None), 0.0
    for i in range(0, len(data), batch_size):
        batch = collator([data[j] for j in range(i, min(i + batch_size, len(data)))])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if not reset_memory:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        else:
            pieces = [model(input_ids=ids[:, t:t + segment], attention_mask=mask[:, t:t + segment],
                            use_cache=False).logits for t in range(0, ids.shape[1], segment)]
            logits = torch.cat(pieces, dim=1)
        correct += answer_accuracy(logits, batch["labels"]) * len(ids)
    return correct / len(data)


def stage_tag(knobs):
    """A stage's knobs in a run name: {"n_hops": 1, "n_queries": 3} -> hops1queries3, {"show_path": True} ->
    showpath1, {} (the evaluation task itself) -> task."""
    return "".join(f"{k.removeprefix('n_').replace('_', '')}{int(v) if isinstance(v, bool) else v}"
                   for k, v in knobs.items()) or "task"


def run(name, task_name, memory_tokens, memory_init, args):
    task, segment_size, stages = tasks(args.quick)[task_name]
    default_layers, default_hidden = (2, 32) if args.quick else MODEL[task_name]
    layers, hidden = args.layers or default_layers, args.hidden_size or default_hidden
    if (layers, hidden) != (default_layers, default_hidden):
        name = f"{name}_{layers}x{hidden}"
    if hidden % args.heads:
        raise SystemExit(f"--heads {args.heads} must divide the hidden size {hidden}")
    if args.heads != HEADS:
        name = f"{name}_h{args.heads}"
    if args.position != POSITION:
        name = f"{name}_{args.position}"
    if args.stages is not None:
        for knobs in args.stages:
            task.with_difficulty(**knobs)  # unknown knobs or impossible values: a clear error before training
        stages = [(1 / len(args.stages), knobs) for knobs in args.stages]
        name = f"{name}_curriculum-" + "-".join(stage_tag(knobs) for knobs in args.stages)
    if args.stage_fractions is not None:
        if len(args.stage_fractions) != len(stages):
            raise SystemExit(f"--stage-fractions gives {len(args.stage_fractions)} shares but {task_name} has "
                             f"{len(stages)} stages: {[knobs for _, knobs in stages]}")
        stages = [(f, knobs) for f, (_, knobs) in zip(args.stage_fractions, stages)]
        name = f"{name}_stages" + "-".join(f"{round(100 * f)}" for f in args.stage_fractions)
    if args.advance_at is not None:
        if len(args.advance_at) != len(stages) - 1:
            raise SystemExit(f"--advance-at gives {len(args.advance_at)} thresholds but {task_name} has "
                             f"{len(stages)} stages: give one for each stage but the last")
        name = f"{name}_advance" + "-".join(f"{round(100 * t)}" for t in args.advance_at)
    if args.lr_scheduler != LR_SCHEDULER:
        name = f"{name}_{SCHEDULER_TAGS[args.lr_scheduler]}"
    if args.seed != 0:
        name = f"{name}_seed{args.seed}"
    steps = args.steps or (30 if args.quick else STEPS[task_name])
    set_seed(args.seed)
    longest = max(len(x["input_ids"]) for t in [task] + [task.with_difficulty(**k) for _, k in stages]
                  for x in t.generate(32, seed=args.seed))
    if memory_init == CONTROL:
        # one segment longer than every sample: full attention with the same blocks and positions, nothing is
        # ever committed to memory (and reading an empty memory returns zero)
        segment_size = 2 * longest
    if memory_init == CONTROL and args.position == "absolute":  # GPT-2 of the same size (the original control)
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=task.vocab.vocab_size, n_embd=hidden, n_layer=layers, n_head=args.heads,
            n_positions=2 * longest,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=task.vocab.BOS, eos_token_id=None,
            pad_token_id=task.vocab.PAD))
    else:
        config = UnifiedARMTConfig(vocab_size=task.vocab.vocab_size, hidden_size=hidden,
                                   num_hidden_layers=layers, num_attention_heads=args.heads,
                                   segment_size=segment_size,
                                   position_embedding_type=args.position,
                                   num_memory_tokens=max(1, memory_tokens), d_mem=32, num_memory_heads=1,
                                   memory_init="random" if memory_init == CONTROL else memory_init,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   bos_token_id=task.vocab.BOS, eos_token_id=None, pad_token_id=task.vocab.PAD)
        model = UnifiedARMTForCausalLM(config)
    stage_steps = [max(1, round(fraction * steps)) for fraction, _ in stages]
    stage_steps[-1] = max(1, steps - sum(stage_steps[:-1]))
    # stage knobs apply to the evaluation task; the first stage's task is swapped in when training begins
    stream = TaskStream(task, seed=args.seed)  # an endless stream: every step sees new samples
    if args.advance_at is None:
        curriculum = task_curriculum(stream, [knobs for _, knobs in stages], steps_per_stage=stage_steps)
    else:  # stage shares are caps; evaluation during training scores each stage on its own difficulty
        curriculum = task_curriculum(stream, [knobs for _, knobs in stages], steps_per_stage=stage_steps[:-1] + [None],
                                     metric="eval_accuracy", thresholds=args.advance_at + [None],
                                     eval_samples=args.stage_eval_samples)
    eval_every = args.eval_every or (250 if args.advance_at is not None else max(1, steps // 6))
    test = build_dataset(task, args.eval_samples, seed=10_000 + args.seed)
    lengths = [len(x) for x in test["input_ids"]]
    collator = TaskCollator(task.vocab.tokenizer())
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=250, learning_rate=args.lr, warmup_steps=min(100, steps // 10),
            lr_scheduler_type=args.lr_scheduler, weight_decay=0.01, max_grad_norm=1.0,
            lr_scheduler_kwargs={"num_decay_steps": round(WSD_DECAY * steps)}
            if args.lr_scheduler == "warmup_stable_decay" else {},
            logging_steps=max(1, steps // 10),
            eval_strategy="steps", eval_steps=eval_every, save_strategy="no", report_to=[],
            seed=args.seed, use_cpu=True, dataloader_num_workers=0, disable_tqdm=False)
        clock = Clock()
        trainer = CurriculumTrainer(
            model=model, args=training_args, train_dataset=stream, curriculum=curriculum,
            eval_dataset=test.select_columns(["input_ids", "labels"]), data_collator=collator, callbacks=[clock],
            preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
            compute_metrics=lambda p: {"accuracy": answer_accuracy(p.predictions, p.label_ids)})
        trainer.train()
    if stream.task != task.with_difficulty(**stages[-1][1]):
        raise RuntimeError(f"the last stage trained on {stream.task}, not on the task it names")
    history = trainer.state.log_history
    with_memory = accuracy(model, test, collator)
    return {"name": name, "task": task_name, "model": f"{layers}x{hidden}", "heads": args.heads,
            "task_params": {k: v for k, v in vars(task).items() if not callable(v)},
            "stages": [{"steps": n, "knobs": knobs} for n, (_, knobs) in zip(stage_steps, stages)],
            "stage_history": [{k: h[k] for k in ("name", "reason", "start_step", "end_step")}
                              for h in trainer.curriculum_history],
            "segment_size": segment_size, "sample_tokens": {"min": min(lengths), "max": max(lengths)},
            "segments_per_sample": max(lengths) / segment_size, "num_memory_tokens": memory_tokens,
            "memory_init": memory_init, "position_embedding_type": args.position, "steps": steps,
            "train_seconds": round(clock.seconds, 1),
            "train_loss_curve": [(h["step"], h["loss"]) for h in history if "loss" in h],
            "eval_accuracy_curve": [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h],
            "accuracy": with_memory,
            "accuracy_memory_reset": None if memory_init == CONTROL else accuracy(model, test, collator,
                                                                                   reset_memory=True),
            "target": TARGETS[task_name] if not args.quick else None, "parameters": model.num_parameters()}


def plot(results, out):
    plt = common.pyplot()
    fig, (ax_a, ax_m) = plt.subplots(1, 2, figsize=(12, 4))
    names = [r["name"] for r in results]
    y = range(len(names))
    ax_a.barh([i + 0.2 for i in y], [r["accuracy"] for r in results], height=0.4, color="tab:blue",
              label="memory kept")
    ax_a.barh([i - 0.2 for i in y], [r["accuracy_memory_reset"] or 0.0 for r in results], height=0.4, color="tab:gray",
              label="memory reset at every segment")
    ax_a.set_yticks(list(y), names)
    ax_a.legend(loc="lower right", fontsize=8)
    for i, r in enumerate(results):
        if r["target"]:
            ax_a.plot([r["target"]] * 2, [i - 0.4, i + 0.4], "r-")
    ax_a.set_xlim(0, 1)
    ax_a.set_xlabel("exact-match accuracy (red: target)")
    for model in sorted({r["model"] for r in results if r["task"] == SWEPT}):
        sweep = sorted((r for r in results if r["task"] == SWEPT and r["memory_init"] == "random"
                        and r["model"] == model), key=lambda r: r["num_memory_tokens"])
        ax_m.plot([r["num_memory_tokens"] for r in sweep], [r["accuracy"] for r in sweep], "o-", label=model)
    if ax_m.lines:
        ax_m.legend(title="layers x hidden", fontsize=8)
    ax_m.set_xscale("log", base=2)
    ax_m.set_ylim(0, 1)
    ax_m.set_xlabel("memory tokens")
    ax_m.set_ylabel(f"{SWEPT} accuracy (random init)")
    ax_m.grid(alpha=0.3)
    fig.tight_layout()
    return common.save_figure(fig, out, "armt_tasks.png")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = [r for r in args.runs.split(",") if r] if args.runs is not None else list(runs(args.quick))
    available = runs(args.quick, everything=True)
    unknown = [r for r in chosen if r not in available]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; available: {list(available)}")
    path = os.path.join(args.out, "armt_tasks.json")
    previous = {}
    for old_path in ([path] if args.merge and os.path.isfile(path) else []) + args.add:
        with open(old_path) as f:
            old = json.load(f)
        if old.get("quick") != args.quick:
            raise SystemExit(f"{old_path} holds {'quick' if old.get('quick') else 'full'} runs; cannot mix them.")
        for r in old["results"]:  # records written before "model" was recorded carry it in their args
            r.setdefault("model", f"{r['args']['layers']}x{r['args']['hidden_size']}")
        previous.update({r["name"]: r for r in old["results"]})
    results = []
    for name in chosen:
        started = time.perf_counter()
        result = run(name, *available[name], args)
        result["args"], result["wall_seconds"] = vars(args), round(time.perf_counter() - started, 1)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("curve")}), flush=True)
    merged = {**previous, **{r["name"]: r for r in results}}
    order = list(available)
    base = lambda r: run_name(r["task"], r["num_memory_tokens"], r["memory_init"])  # noqa: E731
    results = sorted(merged.values(), key=lambda r: (order.index(base(r)) if base(r) in order else len(order),
                                                     r["name"]))  # in the order of `runs`
    report = {"benchmark": "armt_tasks", "quick": args.quick, "results": results,
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "threads": args.threads}}
    lines = ["| run | model | segments/sample | memory tokens | init | steps | train s | accuracy | memory reset | "
             "target |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        target = f"{r['target']:.0%}" if r["target"] else "-"
        reset = "-" if r["accuracy_memory_reset"] is None else f"{r['accuracy_memory_reset']:.1%}"
        lines.append(f"| {r['name']} | {r['model']} | {r['segments_per_sample']:.1f} | {r['num_memory_tokens']} "
                     f"| {r['memory_init']} "
                     f"| {r['steps']} | {r['train_seconds']:.0f} | {r['accuracy']:.1%} "
                     f"| {reset} | {target} |")
    paths = common.write_report(args.out, "armt_tasks", report, "\n".join(lines))
    paths.append(plot(results, args.out))
    print("\n".join(lines))
    common.print_written(paths)


if __name__ == "__main__":
    main()
