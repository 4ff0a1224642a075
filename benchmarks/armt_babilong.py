"""BABILong-style benchmark: train on bAbI facts hidden in background text at <= 1K tokens, evaluate at 1K/4K/16K.

Both models are trained the same way (from scratch unless started from a checkpoint) with `CurriculumTrainer` on a
`TaskStream` of `armada.tasks.BabiLong` samples (GPT-2 BPE; background text from ../shared/data; the context grows
over three curriculum stages up to `--train-length`):
  - UnifiedARMT (segments of `--segment-size` + memory tokens): any input length;
  - a GPT-2 of the same width/depth/heads with full attention and a position table of the training length plus the
    question: it cannot read longer inputs, which is reported as where it stops.
With `--advance-at` the curriculum is a mastery one: a stage ends as soon as its own accuracy (checked every
`--eval-every` steps) reaches the threshold, its share of the steps is only a cap (as in `armt_tasks.py`).
`--stages JSON` sets any story knob per stage besides the length (fewer facts first, several questions per story
with `n_questions`) and UnifiedARMT's `segment_size` (rotary positions): from scratch, memory is picked up on short
segments (16 tokens) and not on 64-token ones in the same number of steps, so a curriculum can start there and widen
the segments; evaluation reads `--segment-size`. `--questions K` asks K questions per training story throughout;
`--max-minutes` caps the wall-clock training time (the model is then evaluated as usual). Training computes the LM
head only where answers are predicted (`logits_to_keep`), evaluation keeps every logit. `--save-armt DIR` keeps the
trained UnifiedARMT and `--init-armt DIR` starts from such a checkpoint (or a probe's), so a curriculum can go on
across runs and machines; `--save-full`/`--init-full` do the same for the full-attention model (the control taken
through the same curriculum: armt_babilong_probe.py --model full), each result names its starting checkpoint
("init"); `--device auto` trains and evaluates on a CUDA GPU when there is one.
Scoring: exact match of the answer tokens (teacher-forced argmax = greedy decoding) on `--eval-samples` new samples
per length (seeded, disjoint from training). Target (issue 4): >= 90% on qa1 at 16K for UnifiedARMT.

Results go to --out (default outputs/armt_babilong; the committed record only with --update-committed-results).

    python benchmarks/armt_babilong.py                      # qa1 (and --tasks qa1,qa2), full budget
    python benchmarks/armt_babilong.py --quick              # tiny model, short lengths, smoke test
"""

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments, set_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import armada  # noqa: E402,F401
from armada import UnifiedARMTConfig, UnifiedARMTForCausalLM  # noqa: E402
from armada.io_utils import atomic_directory  # noqa: E402
from armada.modeling.modeling_unified_armt import next_token_targets  # noqa: E402
from armada.tasks import (  # noqa: E402
    BabiLong,
    BabiTask,
    TaskCollator,
    TaskStream,
    answer_accuracy,
    build_dataset,
    task_curriculum,
)
from armada.tokenization import gpt2_tokenizer  # noqa: E402
from armada.trainers import CurriculumTrainer  # noqa: E402
from benchmarks import common  # noqa: E402

# may differ between results combined with --add; and, for an added file without UnifiedARMT results, ARMT_ONLY too
# (checkpoint paths too: each result records the checkpoint it started from as its "init")
PER_PROCESS = {"models", "threads", "device", "out", "add", "max_minutes", "init_armt", "save_armt", "init_full",
               "save_full", "overwrite", "update_committed_results"}
ARMT_ONLY = {"segment_size", "memory_tokens", "memory_heads", "position"}
QUESTION_ROOM = 32  # tokens after the context: "\nQuestion: ...\nAnswer: word"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "armt_babilong", seed=False, threads=False)
    p.add_argument("--tasks", default="qa1")
    p.add_argument("--train-length", type=int, default=None, help="context tokens at the last stage (default 1024)")
    p.add_argument("--eval-lengths", default=None, help="default 1024,4096,16384 (the training length is added)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 3000, quick 6)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden-size", type=int, default=None, help="default 128 (quick 32)")
    p.add_argument("--layers", type=int, default=None, help="default 4 (quick 1)")
    p.add_argument("--segment-size", type=int, default=None,
                   help="UnifiedARMT's segments at evaluation, and in training unless --stages sets segment_size "
                        "(default 128, quick 32)")
    p.add_argument("--memory-tokens", type=int, default=16)
    p.add_argument("--memory-heads", type=int, default=1, help="heads of UnifiedARMT's associative memory")
    p.add_argument("--init-armt", default=None, metavar="DIR",
                   help="start UnifiedARMT from this checkpoint (save_pretrained directory, e.g. a probe's --save or "
                        "an earlier run's --save-armt) instead of from scratch: a curriculum can go on where another "
                        "run stopped. Its width, depth, heads, memory tokens/heads and vocabulary must be the ones "
                        "asked for here (the full-attention model is built to the same size)")
    p.add_argument("--save-armt", default=None, metavar="DIR", help="save the trained UnifiedARMT here")
    p.add_argument("--init-full", default=None, metavar="DIR",
                   help="start the full-attention GPT-2 from this checkpoint (e.g. armt_babilong_probe.py --model full "
                        "--save, or an earlier run's --save-full): the same curriculum as --init-armt for the "
                        "like-for-like control. Width, depth, heads and vocabulary must be the ones asked for here; "
                        "a shorter position table is extended to this run's with new rows")
    p.add_argument("--save-full", default=None, metavar="DIR", help="save the trained full-attention GPT-2 here")
    p.add_argument("--heads", type=int, default=4, help="attention heads per layer, both models (default 4)")
    p.add_argument("--stage-lengths", default=None, metavar="N1,N2,...",
                   help="context tokens of each curriculum stage, increasing, the last one --train-length "
                        "(default: max(96, train/4), halfway, train)")
    p.add_argument("--stages", default=None, metavar="JSON",
                   help='curriculum as a JSON list of stages, each a dict of BabiLong/BabiTask knobs, e.g. '
                        '\'[{"target_length": 32, "n_facts": 2}, {"target_length": 96}, {"target_length": 512}]\' '
                        '(replaces --stage-lengths; a stage keeps the knobs it does not set from the stage before; '
                        'the last stage\'s target_length must be --train-length). UnifiedARMT also takes '
                        '"segment_size" per stage (rotary positions only; the full-attention model ignores it): '
                        'short segments first make memory learnable (benchmarks/README.md)')
    p.add_argument("--advance-at", type=float, default=None, metavar="ACC",
                   help="mastery curriculum: every stage but the last also ends as soon as the accuracy on "
                        "--stage-eval-samples samples of its own length reaches ACC (checked every --eval-every "
                        "steps); the equal stage shares become caps and the last stage gets every step left")
    p.add_argument("--questions", type=int, default=1,
                   help="training samples ask this many distinct questions about their story, every answer labeled "
                        "(BabiTask(n_questions=...): denser signal); evaluation always asks one")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock training budget per model: training stops at the first step past it (then the "
                        "model is evaluated as usual); the stop step is in the JSON")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--stage-eval-samples", type=int, default=200)
    p.add_argument("--lr-scheduler", default="constant_with_warmup",
                   choices=["constant_with_warmup", "cosine", "linear"])
    p.add_argument("--position", choices=["absolute", "rotary"], default="absolute",
                   help="UnifiedARMT position_embedding_type (the full-attention GPT-2 keeps its position table)")
    p.add_argument("--eval-samples", type=int, default=None, help="per length (default 100, quick 4)")
    p.add_argument("--models", default="armt,full", help="comma-separated, from armt, full; '' with --add: only "
                                                          "rebuild the report from the added results")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="0: GPT-2 BPE (50,257 ids); N: a byte-level BPE of N ids retrained from GPT-2's with "
                        "train_new_from_iterator on the background text and bAbI stories (a small LM head makes "
                        "CPU training affordable)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="load this tokenizer (save_pretrained directory) instead of making one, e.g. the one a "
                        "checkpoint was trained with when the task changes (armt_babilong_probe.py keeps its "
                        "qa1 tokenizer under .cache/babilong_tokenizer/<vocab size>); replaces --vocab-size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a CUDA GPU when there is one (training through Trainer, evaluation on the same device)")
    p.add_argument("--add", action="append", default=[], metavar="JSON",
                   help="also report the results in this armt_babilong.json, made with the same settings but other "
                        "--models (e.g. the two models trained in parallel, one core each)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    q = args.quick
    args.train_length = args.train_length or (128 if q else 1024)
    args.eval_lengths = [int(x) for x in (args.eval_lengths or ("128,256" if q else "1024,4096,16384")).split(",")]
    args.eval_lengths = sorted(set(args.eval_lengths) | {args.train_length})  # both models are scored where trained
    args.steps = args.steps or (6 if q else 3000)
    args.hidden_size = args.hidden_size or (32 if q else 128)
    args.layers = args.layers or (1 if q else 4)
    args.segment_size = args.segment_size or (32 if q else 128)
    args.eval_samples = args.eval_samples or (4 if q else 100)
    if args.train_length > 1024:
        raise SystemExit(f"--train-length must be <= 1024 (the benchmark trains at <= 1K), got {args.train_length}")
    args.models = [m for m in args.models.split(",") if m]
    if set(args.models) - {"armt", "full"} or (not args.models and not args.add):
        raise SystemExit(f"--models takes armt and/or full (nothing only with --add), got {args.models}")
    if args.hidden_size % args.heads:
        raise SystemExit(f"--heads {args.heads} must divide --hidden-size {args.hidden_size}")
    if args.stages is not None:
        args.stages = stages_from_json(args.stages, args.train_length)
        if any("segment_size" in stage for stage in args.stages) and args.position != "rotary":
            raise SystemExit("--stages: segment_size per stage needs --position rotary (a learned position table "
                             "has one row per segment position)")
        args.stage_lengths = [stage["target_length"] for stage in args.stages]
    elif args.stage_lengths is None:
        shortest = max(96, args.train_length // 4)  # room for the story's facts (~50 tokens for qa1's 8 facts)
        args.stage_lengths = [shortest, (shortest + args.train_length) // 2, args.train_length]
    else:
        try:
            args.stage_lengths = [int(n) for n in args.stage_lengths.split(",")]
        except ValueError:
            raise SystemExit(f"--stage-lengths takes comma-separated token counts, got {args.stage_lengths!r}")
        if args.stage_lengths != sorted(set(args.stage_lengths)) or args.stage_lengths[-1] != args.train_length:
            raise SystemExit(f"--stage-lengths must increase and end at --train-length {args.train_length}, got "
                             f"{args.stage_lengths}")
    if args.questions < 1:
        raise SystemExit(f"--questions must be >= 1, got {args.questions}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise SystemExit(f"--max-minutes must be > 0, got {args.max_minutes}")
    if args.advance_at is not None and not 0 <= args.advance_at <= 1:
        raise SystemExit(f"--advance-at is an accuracy in [0, 1], got {args.advance_at}")
    args.out = common.output_dir(args, "armt_babilong")
    return args


def stages_from_json(text, train_length):
    """--stages -> one complete dict of knobs per stage (each keeps what it does not set from the stage before),
    validated: the knobs exist and make valid tasks, the first stage sets target_length."""
    try:
        stages = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--stages is not valid JSON ({err}): {text!r}")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise SystemExit(f"--stages takes a non-empty JSON list of dicts (knob: value), got {text!r}")
    if "target_length" not in stages[0]:
        raise SystemExit(f"--stages: the first stage must set target_length, got {stages[0]}")
    complete = []
    for stage in stages:
        complete.append({**(complete[-1] if complete else {}), **stage})
        segment_size = complete[-1].get("segment_size", 1)
        if not isinstance(segment_size, int) or isinstance(segment_size, bool) or segment_size < 1:
            raise SystemExit(f"--stages: segment_size must be a positive integer, got {segment_size!r} in {stage}")
        try:
            BabiLong().with_difficulty(**task_knobs(complete[-1]))
        except (TypeError, ValueError) as err:
            raise SystemExit(f"--stages: stage {stage} is not valid: {err}")
    if complete[-1]["target_length"] != train_length:
        raise SystemExit(f"--stages: the last stage's target_length must be --train-length {train_length}, "
                         f"got {complete[-1]['target_length']}")
    return complete


def task_knobs(stage):
    """A --stages dict without the model's knob (segment_size): what BabiLong.with_difficulty takes."""
    return {k: v for k, v in stage.items() if k != "segment_size"}


def small_tokenizer(vocab_size, task_names, seed=0):
    """GPT-2's byte-level BPE retrained (`train_new_from_iterator`) on the background text plus bAbI stories, so that
    bAbI words and frequent background words are single tokens. Deterministic for a given corpus."""
    from armada.tasks import DEFAULT_BACKGROUND

    with open(DEFAULT_BACKGROUND, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    stories = []
    for name in task_names:
        for story in BabiTask(task=name).generate(2000, seed=seed):
            stories.append(f"{story['context']}\nQuestion: {story['question']}\nAnswer: {story['answer']}")
    tokenizer = gpt2_tokenizer().train_new_from_iterator(lines + stories, vocab_size=vocab_size)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def question_room(task, args, tokenizer):
    """Tokens after the context in a training sample: its questions and answers, the longest over 500 stories of
    every stage (a small vocabulary spells them in more tokens than `QUESTION_ROOM`)."""
    stages = args.stages or [{"target_length": n} for n in args.stage_lengths]
    base = BabiLong(babi=task.with_difficulty(n_questions=args.questions), tokenizer=tokenizer)
    room = 0
    for stage in stages:
        stories = base.with_difficulty(**task_knobs(stage)).babi.generate(500, seed=args.seed)
        tails = [f"\nQuestion: {q}\nAnswer: {a}" for s in stories for q, a in zip(s["questions"], s["answers"])]
        lengths = iter(tokenizer(tails, add_special_tokens=False)["input_ids"])
        room = max(room, *(sum(len(next(lengths)) for _ in s["questions"]) for s in stories))
    return room


def build_model(kind, args, vocab_size, room=0):
    common = dict(vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if kind == "armt":
        config = UnifiedARMTConfig(
            hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            segment_size=args.segment_size, num_memory_tokens=args.memory_tokens, d_mem=64,
            num_memory_heads=args.memory_heads, position_embedding_type=args.position,
            max_backprop_segments=None, **common)
        if not args.init_armt:
            return UnifiedARMTForCausalLM(config)
        model = UnifiedARMTForCausalLM.from_pretrained(args.init_armt)
        fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_memory_tokens",
                  "d_mem", "num_memory_heads", "position_embedding_type")
        differ = [f"{f}={getattr(model.config, f)} (asked {getattr(config, f)})" for f in fields
                  if getattr(model.config, f) != getattr(config, f)]
        if differ:
            raise SystemExit(f"--init-armt {args.init_armt} does not match this run: {', '.join(differ)}; set "
                             "--hidden-size/--layers/--heads/--memory-tokens/--memory-heads/--position/--vocab-size "
                             "to the checkpoint's")
        model.config.segment_size = args.segment_size
        return model
    config = GPT2Config(n_embd=args.hidden_size, n_layer=args.layers, n_head=args.heads,
                        n_positions=args.train_length + max(QUESTION_ROOM * args.questions, room + 8), **common)
    if not args.init_full:
        return GPT2LMHeadModel(config)
    model = GPT2LMHeadModel.from_pretrained(args.init_full)
    differ = [f"{f}={getattr(model.config, f)} (asked {getattr(config, f)})"
              for f in ("vocab_size", "n_embd", "n_layer", "n_head") if getattr(model.config, f) != getattr(config, f)]
    if differ:
        raise SystemExit(f"--init-full {args.init_full} does not match this run: {', '.join(differ)}; set "
                         "--hidden-size/--layers/--heads/--vocab-size to the checkpoint's")
    if model.config.n_positions < config.n_positions:
        # rows past the checkpoint's are new: only tokens it could never read reach them
        table = model.transformer.wpe.weight.data
        extended = torch.nn.Embedding(config.n_positions, config.n_embd)
        model._init_weights(extended)
        extended.weight.data[: table.shape[0]] = table
        model.transformer.wpe = extended
        model.config.n_positions = config.n_positions
    return model


def labeled_logits_inputs(inputs):
    """`inputs` plus `logits_to_keep` (the positions whose next token is labeled in some row) and `shift_labels`
    (their targets): the LM head then runs only there, with the same loss."""
    targets = next_token_targets(inputs["labels"], inputs.get("attention_mask"))
    kept = (targets != -100).any(0).nonzero().squeeze(-1)
    return {**inputs, "logits_to_keep": kept, "shift_labels": targets[:, kept].contiguous()}


class LabeledLogitsTrainer(CurriculumTrainer):
    """Training computes the LM head only at positions that predict a label (the answers): `logits_to_keep` lists
    them and `shift_labels` gives their targets, which both models' forward take (transformers' contract). Same loss
    and gradients as full logits; the [batch, tokens, vocab] head over the rest of the context is work thrown away
    (~20% of a 3x64 step at vocabulary 2,048). Evaluation keeps every logit."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and inputs.get("labels") is not None:
            inputs = labeled_logits_inputs(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class TimeBudget(TrainerCallback):
    """Stops training at the first step that ends past `minutes` of wall-clock time."""

    def __init__(self, minutes):
        self.seconds, self.start = 60 * minutes, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True


def train(kind, task, args, tokenizer):
    set_seed(args.seed)
    model = build_model(kind, args, len(tokenizer), room=question_room(task, args, tokenizer) if kind == "full" else 0)
    lengths = args.stage_lengths
    stream = TaskStream(BabiLong(babi=task.with_difficulty(n_questions=args.questions), target_length=lengths[0],
                                 tokenizer=tokenizer), seed=args.seed,
                        tokenizer=tokenizer)
    per_stage = max(1, args.steps // len(lengths))
    mastery = args.advance_at is not None
    # with --advance-at the shares are caps, the last stage runs to the end, and each stage is scored on its length
    stages = args.stages or [{"target_length": n} for n in lengths]
    curriculum = task_curriculum(stream, [task_knobs(stage) for stage in stages],
                                 steps_per_stage=[per_stage] * (len(lengths) - 1) + [None if mastery else per_stage],
                                 metric="eval_accuracy" if mastery else None,
                                 thresholds=[args.advance_at] * (len(lengths) - 1) + [None] if mastery else None,
                                 eval_samples=args.stage_eval_samples if mastery else 0)
    segments_read = []   # (step, segment_size) whenever a stage begins
    if kind == "armt" and any("segment_size" in stage for stage in stages):
        for stage, knobs in zip(curriculum.stages, stages):   # the stage also sets the segments UnifiedARMT reads
            def apply(trainer, task_apply=stage.apply, size=knobs.get("segment_size", args.segment_size)):
                trainer.model.config.segment_size = size
                segments_read.append((trainer.state.global_step, size))
                task_apply(trainer)
            stage.apply = apply
            stage.name += f", segment_size={knobs.get('segment_size', args.segment_size)}"
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, max_steps=per_stage * len(lengths), per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=8, learning_rate=args.lr, warmup_steps=min(100, per_stage),
            lr_scheduler_type=args.lr_scheduler, weight_decay=0.01, max_grad_norm=1.0,
            logging_steps=max(1, args.steps // 20), eval_strategy="steps" if mastery else "no",
            eval_steps=args.eval_every, save_strategy="no", report_to=[], use_cpu=args.device == "cpu", seed=args.seed,
            dataloader_num_workers=0)
        trainer = LabeledLogitsTrainer(
            model=model, args=training_args, train_dataset=stream, data_collator=TaskCollator(tokenizer),
            eval_dataset=build_dataset(stream.task, 1, tokenizer=tokenizer).select_columns(["input_ids", "labels"])
            if mastery else None,  # a placeholder: every stage brings its own (its length)
            curriculum=curriculum, preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
            compute_metrics=lambda p: {"accuracy": answer_accuracy(p.predictions, p.label_ids)},
            callbacks=[TimeBudget(args.max_minutes)] if args.max_minutes else None)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    if kind == "armt":
        model.config.segment_size = args.segment_size   # evaluation reads --segment-size
    save = args.save_armt if kind == "armt" else args.save_full
    if save:
        with atomic_directory(save, overwrite=True) as tmp:
            model.save_pretrained(tmp)
    history = trainer.state.log_history
    return model.eval(), {"init": args.init_armt if kind == "armt" else args.init_full,
                          "train_seconds": round(seconds, 1), "stage_lengths": lengths,
                          "steps": trainer.state.global_step,
                          "stage_history": [{k: h[k] for k in ("name", "reason", "start_step", "end_step")}
                                            for h in trainer.curriculum_history],
                          "eval_accuracy_curve": [(h["step"], h["eval_accuracy"]) for h in history
                                                  if "eval_accuracy" in h],
                          "loss_curve": [h["loss"] for h in history if "loss" in h],
                          **({"segment_size_from_step": segments_read} if segments_read else {}),
                          "parameters": model.num_parameters()}


@torch.no_grad()
def evaluate(model, kind, task, length, args, tokenizer):
    data = build_dataset(BabiLong(babi=task, target_length=length, tokenizer=tokenizer), args.eval_samples,
                         seed=100_000 + length, tokenizer=tokenizer)
    n_tokens = max(len(x) for x in data["input_ids"])
    if kind == "full" and n_tokens > model.config.n_positions:
        return {"length": length, "accuracy": None,
                "stopped": f"{n_tokens} tokens > n_positions={model.config.n_positions}: full attention cannot read it"}
    correct, start = 0.0, time.perf_counter()
    for ids, labels in zip(data["input_ids"], data["labels"]):  # batch 1: samples differ in length
        logits = model(torch.tensor([ids], device=model.device), use_cache=False).logits
        correct += answer_accuracy(logits.cpu(), torch.tensor([labels]))
    return {"length": length, "max_tokens": n_tokens, "accuracy": correct / len(data),
            "seconds_per_sample": (time.perf_counter() - start) / len(data)}


def last_stage(result, args):
    """Name of the stage training ended in (the history lists finished stages only)."""
    history = result.get("stage_history") or []
    if history and result["steps"] == history[-1]["end_step"]:
        return history[-1]["name"]
    stages = args.stages or [{"target_length": n} for n in args.stage_lengths]
    return ", ".join(f"{k}={v}" for k, v in stages[len(history)].items())


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch (use --device cpu or auto)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tokenizer:
        if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer_config.json")):
            raise SystemExit(f"--tokenizer {args.tokenizer}: not a saved tokenizer (no tokenizer_config.json there)")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    elif args.vocab_size:
        tokenizer = small_tokenizer(args.vocab_size, args.tasks.split(","), seed=args.seed)
    else:
        tokenizer = gpt2_tokenizer()
        tokenizer.pad_token = tokenizer.eos_token
    added = []
    for path in args.add:  # refuse anything not made the same way: the comparison must be like for like
        with open(path) as f:
            other = json.load(f)
        free = PER_PROCESS | (ARMT_ONLY if all(r["model"] != "armt" for r in other["results"]) else set())
        differ = sorted(k for k in set(other["args"]) | set(vars(args)) if k not in free
                        and other["args"].get(k) != vars(args).get(k))
        if differ:
            raise SystemExit(f"{path} was made with other settings ({', '.join(differ)}); --add takes only results "
                             f"that differ in {', '.join(sorted(PER_PROCESS))} (and, for a file with no armt "
                             f"result, in the UnifiedARMT-only {', '.join(sorted(ARMT_ONLY))})")
        for r in other["results"]:   # files made before results recorded their start
            r.setdefault("init", other["args"].get("init_armt" if r["model"] == "armt" else "init_full"))
        added += other["results"]
    started, results = time.perf_counter(), []
    for task_name in args.tasks.split(","):
        task = BabiTask(task=task_name)
        for kind in args.models:
            model, info = train(kind, task, args, tokenizer)
            evals = [evaluate(model, kind, task, n, args, tokenizer) for n in args.eval_lengths]
            results.append({"task": task_name, "model": kind, **info, "eval": evals})
            print(json.dumps({k: v for k, v in results[-1].items() if k != "loss_curve"}), flush=True)
    results += [r for r in added if (r["task"], r["model"]) not in {(x["task"], x["model"]) for x in results}]
    report = {"benchmark": "armt_babilong", "quick": args.quick, "args": vars(args), "results": results,
              "data": "bAbI facts from armada.tasks.BabiTask in ../shared/data/tinyshakespeare background",
              "tokenizer": f"{len(tokenizer)} ids loaded from {args.tokenizer}" if args.tokenizer
              else (f"byte-level BPE with {len(tokenizer)} ids retrained from GPT-2's on the background text "
                    "and bAbI stories") if args.vocab_size else "GPT-2 BPE",
              "environment": {"python": platform.python_version(), "torch": torch.__version__},
              "wall_seconds": round(time.perf_counter() - started, 1)}
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = ["| task | model | training | " + " | ".join(f"{n} tokens" for n in args.eval_lengths) + " |",
             "|---|---|---|" + "---|" * len(args.eval_lengths)]
    for r in results:
        points = [(e["length"], e["accuracy"]) for e in r["eval"] if e["accuracy"] is not None]
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"{r['task']} {r['model']}")
        stops = [re.search(r"n_positions=(\d+)", e["stopped"]) for e in r["eval"] if e.get("stopped")]
        if stops:   # where the full-attention model stops: its position table
            n = int(stops[0].group(1))
            ax.axvline(n, color=line.get_color(), linestyle="--", label=f"{r['task']} {r['model']}: stops at {n:,}")
        cells = [f"{e['accuracy']:.1%}" if e["accuracy"] is not None else "cannot (beyond n_positions)"
                 for e in r["eval"]]
        trained = f"{r['steps']} steps, {r['train_seconds'] / 60:.0f} min, last stage {last_stage(r, args)}"
        if r.get("init"):
            trained = f"from {os.path.basename(os.path.normpath(r['init']))} + {trained}"
        lines.append(f"| {r['task']} | {r['model']} | {trained} | " + " | ".join(cells) + " |")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("exact-match accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths = common.write_report(args.out, "armt_babilong", report, "\n".join(lines))
    paths.append(common.save_figure(fig, args.out, "armt_babilong.png"))
    print("\n".join(lines))
    common.print_written(paths)


if __name__ == "__main__":
    main()
