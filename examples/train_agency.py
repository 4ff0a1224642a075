"""Train AgencyGPT2 with `Trainer`: plain, with distillation from the unpruned model, with a pruning curriculum,
or both. Runs as a script or under accelerate:

    python examples/train_agency.py --output_dir runs/agency --max_steps 200
    python examples/train_agency.py --output_dir runs/agency --distill --curriculum_levels 0,0.3,0.5,0.7
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        examples/train_agency.py --output_dir runs/ddp --max_steps 50 --use_cpu
    python examples/train_agency.py --output_dir runs/agency --max_steps 200 --save_steps 50 \
        --resume_from_checkpoint last
    accelerate launch --config_file examples/accelerate/fsdp_full_shard.yaml examples/train_agency.py \
        --output_dir runs/fsdp --max_steps 200

The first accelerate command starts two processes on the CPU: `--multi_gpu` launches them through torchrun and
`--use_cpu` makes `Trainer` train with DDP over gloo (accelerate's own `--cpu` flag starts a single process unless
MPI is set up). `--resume_from_checkpoint` takes a `checkpoint-N` folder, or `True`/`last` for the newest checkpoint
in --output_dir. With a curriculum, training ends when the last stage's budget is spent (stages x
--steps_per_stage); a --max_steps that differs is reported at the start.
The last command shards the model over 2 GPUs with FSDP (full shard; `save_model` gathers a full checkpoint;
pruning changes weight shapes, so no --curriculum_levels); on CPU accelerate trains with DDP instead
(tests/test_fsdp.py runs it on CPU through tests/fsdp_cpu_shim.py). examples/accelerate/deepspeed_zero2.yaml is
the DeepSpeed ZeRO-2 counterpart (not run here).

Without --model_name_or_path a GPT-2 of the given size is built from scratch (GPT-2 tokenizer, from local files).
Training text defaults to ../shared/data/tinyshakespeare/input.txt; any text file, folder or `datasets` Hub id works.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

import armada  # noqa: F401  (registers the Auto classes)
from armada import AgencyGPT2ForCausalLM
from armada.data import build_lm_datasets
from armada.io_utils import atomic_write_text, weights_digest
from armada.tokenization import gpt2_tokenizer
from armada.trainers import (
    AgencyCallback,
    CurriculumTrainer,
    DistillationTrainer,
    finalize_pruning,
    pruning_curriculum,
)

logger = logging.get_logger("train_agency")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "GPT-2 or AgencyGPT2 checkpoint"})
    n_layer: int = field(default=4, metadata={"help": "layers, when training from scratch"})
    n_embd: int = field(default=128, metadata={"help": "width, when training from scratch"})
    n_head: int = field(default=4, metadata={"help": "heads, when training from scratch"})
    n_positions: int = field(default=256)
    optimization_level: int = field(default=0, metadata={"help": "AgencyGPT2 optimization level 0-3"})


@dataclass
class DataArguments:
    train_file: str = field(default=DEFAULT_TEXT, metadata={"help": "text file, folder, or datasets Hub id"})
    eval_file: Optional[str] = field(default=None, metadata={"help": "evaluation text (default: split of train)"})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "config of a Hub dataset"})
    block_size: int = field(default=128)
    eval_fraction: float = field(default=0.05)
    max_train_blocks: Optional[int] = field(default=None)
    max_eval_blocks: Optional[int] = field(default=200)


@dataclass
class AgencyArguments:
    distill: bool = field(default=False, metadata={"help": "distil from the unpruned starting model"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the label loss in distillation"})
    temperature: float = field(default=2.0)
    curriculum_levels: Optional[str] = field(default=None, metadata={"help": "e.g. 0,0.3,0.5,0.7"})
    curriculum_strategy: str = field(default="importance")
    steps_per_stage: int = field(default=100)
    calibration_blocks: int = field(default=8)
    agency_dynamics: bool = field(default=False, metadata={"help": "run the head controller (AgencyCallback)"})
    finalize: bool = field(default=True, metadata={"help": "physically remove withdrawn heads at the end"})


class DistillationCurriculumTrainer(CurriculumTrainer, DistillationTrainer):
    """Curriculum stages (from CurriculumTrainer) with the distillation loss (from DistillationTrainer)."""


def build_model(model_args: ModelArguments) -> AgencyGPT2ForCausalLM:
    if model_args.model_name_or_path is None:
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=model_args.n_layer, n_embd=model_args.n_embd,
                                          n_head=model_args.n_head, n_positions=model_args.n_positions))
        return AgencyGPT2ForCausalLM.from_gpt2(gpt2, optimization_level=model_args.optimization_level)
    from transformers import AutoConfig, AutoModelForCausalLM

    if AutoConfig.from_pretrained(model_args.model_name_or_path).model_type == "gpt2":
        return AgencyGPT2ForCausalLM.from_gpt2(model_args.model_name_or_path,
                                               optimization_level=model_args.optimization_level)
    return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)


def resolve_checkpoint(value: Optional[str], output_dir: str) -> Optional[str]:
    """--resume_from_checkpoint as `Trainer` users expect: a checkpoint folder, or True/last for the newest
    `checkpoint-N` in output_dir; a clear error (before any work) for anything else."""
    if value is None or value.lower() in ("", "false", "none"):
        return None
    if value.lower() in ("true", "last"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {value}: --output_dir {output_dir} holds no checkpoint-N "
                             "folder to resume from.")
        return last
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value!r}: no such folder; give a checkpoint folder "
                         "(OUTPUT_DIR/checkpoint-N) or True/last for the newest one in --output_dir.")
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise ValueError(f"--resume_from_checkpoint {value!r} has no trainer_state.json, so it is not a Trainer "
                         "checkpoint (those are the OUTPUT_DIR/checkpoint-N folders); to start a new run from a saved "
                         "model, pass it as --model_name_or_path.")
    return value


def curriculum_budget_note(n_stages: int, steps_per_stage: int, max_steps: int) -> Optional[str]:
    """What a --max_steps that differs from the curriculum's budget (stages x steps per stage) really does."""
    total = n_stages * steps_per_stage
    if max_steps <= 0 or max_steps == total:
        return None
    if max_steps > total:
        return (f"the curriculum ({n_stages} stages x {steps_per_stage} steps) ends training after {total} steps, "
                f"not --max_steps {max_steps}; for {max_steps} steps give --steps_per_stage "
                f"{-(-max_steps // n_stages)} (or --max_steps {total}).")
    return (f"--max_steps {max_steps} stops training in stage {max_steps // steps_per_stage + 1} of {n_stages} "
            f"({n_stages} stages x {steps_per_stage} steps = {total}); the later stages never run.")


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, AgencyArguments, TrainingArguments))
    model_args, data_args, agency_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    get_reporting_integration_callbacks(training_args.report_to)  # unknown backend: clear error before any output
    levels = None
    if agency_args.curriculum_levels:
        try:
            levels = [float(x) for x in agency_args.curriculum_levels.split(",")]
        except ValueError:
            raise ValueError(f"--curriculum_levels must be comma-separated fractions, got "
                             f"{agency_args.curriculum_levels!r}") from None
    resume = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    notes = []
    if levels is not None:
        note = curriculum_budget_note(len(levels), agency_args.steps_per_stage, training_args.max_steps)
        if note:
            logger.warning(note)
            notes.append(note)
    set_seed(training_args.seed)

    tokenizer = gpt2_tokenizer(model_max_length=model_args.n_positions)
    with training_args.main_process_first(desc="tokenize"):
        splits = build_lm_datasets(data_args.train_file, tokenizer, data_args.block_size, data_args.eval_fraction,
                                   eval_source=data_args.eval_file, config_name=data_args.dataset_config,
                                   seed=training_args.seed)
    train, evaluation = splits["train"], splits["eval"]
    if data_args.max_train_blocks:
        train = train.select(range(min(data_args.max_train_blocks, len(train))))
    if data_args.max_eval_blocks:
        evaluation = evaluation.select(range(min(data_args.max_eval_blocks, len(evaluation))))

    model = build_model(model_args)
    teacher = None
    if agency_args.distill:
        teacher = AgencyGPT2ForCausalLM(model.config)
        teacher.load_state_dict(model.state_dict())
    callbacks = []
    if agency_args.agency_dynamics:
        callbacks.append(AgencyCallback({"input_ids": torch.tensor(evaluation[:4]["input_ids"])}))
    kwargs = dict(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                  processing_class=tokenizer, callbacks=callbacks)
    if teacher is not None:
        kwargs.update(teacher_model=teacher, alpha=agency_args.alpha, temperature=agency_args.temperature)
    if levels is not None:
        calibration = [torch.tensor(train[:agency_args.calibration_blocks]["input_ids"])]
        kwargs["curriculum"] = pruning_curriculum(levels, agency_args.curriculum_strategy, calibration,
                                                  agency_args.steps_per_stage)
        trainer_cls = DistillationCurriculumTrainer if teacher is not None else CurriculumTrainer
    else:
        trainer_cls = DistillationTrainer if teacher is not None else Trainer

    trainer = trainer_cls(**kwargs)
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    if levels is not None and agency_args.finalize:
        metrics["pruned_heads"] = {str(k): v for k, v in finalize_pruning(model).items()}
    metrics["heads_per_layer"] = model.num_heads_per_layer()
    trainer.save_model(os.path.join(training_args.output_dir, "final"))  # rank 0 writes; under FSDP all gather
    rank = training_args.process_index
    summary = {"rank": rank, "world_size": training_args.world_size, "weights_sha256": weights_digest(model),
               "metrics": metrics, "global_step": trainer.state.global_step, "notes": notes}
    atomic_write_text(os.path.join(training_args.output_dir, f"summary_rank{rank}.json"),
                      json.dumps(summary, indent=2, default=str))
    if trainer.is_world_process_zero():
        print(json.dumps({k: v for k, v in summary.items() if k != "weights_sha256"}, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
