"""Train ThoughtDiffusion (masked diffusion LM with a thought stack) with `Trainer`. Runs as a script or under
accelerate:

    python examples/train_diffusion.py --output_dir runs/diffusion --max_steps 200
    python examples/train_diffusion.py --output_dir runs/diffusion --block_length 16 --max_steps 200 \
        --curriculum '[{"max_steps": 100, "max_train_time": 0.5, "thought_loss_weight": 0}, {"max_train_time": 1.0}]'
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        examples/train_diffusion.py --use_cpu --output_dir runs/ddp --max_steps 200
    accelerate launch --config_file examples/accelerate/fsdp_full_shard.yaml examples/train_diffusion.py \
        --output_dir runs/fsdp --max_steps 200

The last command shards the model over 2 GPUs with FSDP (full shard, full checkpoint saved; on CPU accelerate
trains with DDP instead, tests/test_fsdp.py runs it on CPU through tests/fsdp_cpu_shim.py);
examples/accelerate/deepspeed_zero2.yaml is the DeepSpeed ZeRO-2 counterpart (not run here).

Every log record holds the loss parts (`diffusion_loss`, `elbo`, thought terms, `mask_rate`), `thought_norm` and
`peak_memory_mib`; every rank writes `summary_rank<r>.json` (its weights' sha256: equal on all ranks under DDP);
`--report_to tensorboard` writes them under `<output_dir>/runs` (offline). The tokenizer is
GPT-2's (local files) plus a `[MASK]` token; text defaults to ../shared/data/tinyshakespeare/input.txt, any text
file, folder or `datasets` Hub id works. At the end the model is saved to `<output_dir>/final` with the tokenizer
(ready for `pipeline("fill-mask")`) and a sample is printed.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import HfArgumentParser, TrainingArguments, set_seed
from transformers.integrations import get_reporting_integration_callbacks

import armada  # noqa: F401  (registers the Auto classes)
from armada import ThoughtDiffusionConfig, ThoughtDiffusionForMaskedLM
from armada.data import build_lm_datasets
from armada.io_utils import atomic_write_text, weights_digest
from armada.tokenization import gpt2_tokenizer
from armada.trainers import DiffusionCurriculumTrainer, DiffusionTrainer, config_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "a ThoughtDiffusion checkpoint"})
    hidden_size: int = field(default=128)
    num_hidden_layers: int = field(default=4)
    num_attention_heads: int = field(default=4)
    max_position_embeddings: int = field(default=256)
    thought_dims: str = field(default="16,16,8", metadata={"help": "shape of one thought, comma-separated"})
    thought_stack_size: int = field(default=8, metadata={"help": "0 disables the thought stack"})
    noise_schedule: str = field(default="log_linear", metadata={"help": "log_linear or cosine"})
    block_length: Optional[int] = field(default=None, metadata={"help": "block-causal blocks (BD3-LM)"})
    neighbor_tokens: int = field(default=1, metadata={"help": "tokens on each side every input reads (0: none)"})
    thought_loss_weight: float = field(default=0.01)
    thought_train_prob: float = field(default=0.5)
    label_smoothing: float = field(default=0.0)
    complementary_masking: bool = field(default=False, metadata={
        "help": "each batch also runs with the complementary mask: every token a target once per step (2x compute)"})
    dropout: float = field(default=0.0)


@dataclass
class DataArguments:
    train_file: str = field(default=DEFAULT_TEXT, metadata={"help": "text file, folder, or datasets Hub id"})
    eval_file: Optional[str] = field(default=None, metadata={"help": "evaluation text (default: split of train)"})
    block_size: int = field(default=128)
    eval_fraction: float = field(default=0.05)
    max_train_blocks: Optional[int] = field(default=None)
    max_eval_blocks: Optional[int] = field(default=100)


@dataclass
class DiffusionArguments:
    curriculum: Optional[str] = field(default=None, metadata={
        "help": "JSON list of stages, each {\"max_steps\": n, <config field>: value, ...}; fields: noise_schedule, "
                "min_train_time, max_train_time, thought_loss_weight, label_smoothing, thought_train_prob"})
    sample_tokens: int = field(default=32, metadata={"help": "tokens of the sample printed at the end (0: none)"})
    sample_steps: int = field(default=16)
    train_time: Optional[float] = field(default=None, metadata={
        "help": "train every row at this t instead of sampling it; 1.0 masks every token, a deterministic objective "
                "(tests/test_fsdp.py compares 2 processes with one)"})


def diffusion_tokenizer(max_length):
    tokenizer = gpt2_tokenizer(model_max_length=max_length)
    tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    return tokenizer


def build_model(args: ModelArguments, tokenizer) -> ThoughtDiffusionForMaskedLM:
    if args.model_name_or_path:
        return ThoughtDiffusionForMaskedLM.from_pretrained(args.model_name_or_path)
    try:
        dims = [int(d) for d in args.thought_dims.split(",")]
    except ValueError:
        raise ValueError(f"--thought_dims must be comma-separated integers, got {args.thought_dims!r}") from None
    config = ThoughtDiffusionConfig(
        vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings, thought_dims=dims,
        thought_stack_size=args.thought_stack_size, noise_schedule=args.noise_schedule,
        block_length=args.block_length, neighbor_tokens=args.neighbor_tokens,
        thought_loss_weight=args.thought_loss_weight,
        thought_train_prob=args.thought_train_prob, label_smoothing=args.label_smoothing,
        complementary_masking=args.complementary_masking,
        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return ThoughtDiffusionForMaskedLM(config)


def parse_curriculum(text: Optional[str], config):
    """The --curriculum JSON as `config_stage`s (validated against the model's config now)."""
    if not text:
        return None
    try:
        stages = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--curriculum must be a JSON list of stage objects: {error}") from None
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ValueError(f"--curriculum must be a non-empty JSON list of objects, got {text!r}")
    return [config_stage(s.pop("name", f"stage {i}"), s.pop("max_steps", None), config=config, **s)
            for i, s in enumerate(dict(s) for s in stages)]


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, DiffusionArguments, TrainingArguments))
    model_args, data_args, diffusion_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    get_reporting_integration_callbacks(training_args.report_to)  # unknown backend: clear error before any output
    training_args.prediction_loss_only = True  # no metric needs the (batch x length x vocabulary) eval logits
    set_seed(training_args.seed)
    tokenizer = diffusion_tokenizer(model_args.max_position_embeddings)
    model = build_model(model_args, tokenizer)
    stages = parse_curriculum(diffusion_args.curriculum, model.config)
    with training_args.main_process_first(desc="tokenize"):
        splits = build_lm_datasets(data_args.train_file, tokenizer, data_args.block_size, data_args.eval_fraction,
                                   eval_source=data_args.eval_file, seed=training_args.seed)
    train, evaluation = splits["train"], splits["eval"]
    if data_args.max_train_blocks:
        train = train.select(range(min(data_args.max_train_blocks, len(train))))
    if data_args.max_eval_blocks:
        evaluation = evaluation.select(range(min(data_args.max_eval_blocks, len(evaluation))))
    if diffusion_args.train_time is not None:
        train = train.add_column("timesteps", [float(diffusion_args.train_time)] * len(train))

    kwargs = dict(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                  processing_class=tokenizer)
    trainer = DiffusionCurriculumTrainer(curriculum=stages, **kwargs) if stages else DiffusionTrainer(**kwargs)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    rank = training_args.process_index
    summary = {"global_step": trainer.state.global_step, "metrics": metrics,
               "log_history": trainer.state.log_history, "rank": rank, "world_size": training_args.world_size,
               "weights_sha256": weights_digest(model)}
    if stages:
        summary["curriculum"] = trainer.curriculum_history
    trainer.save_model(os.path.join(training_args.output_dir, "final"))  # rank 0 writes; under FSDP all gather
    # under FSDP every forward gathers shards, so every rank samples (same seed, same tokens); else rank 0 only
    if diffusion_args.sample_tokens and (trainer.is_world_process_zero() or trainer.is_fsdp_enabled):
        if trainer.is_fsdp_enabled and hasattr(model, "unshard"):  # FSDP2: gather the root's shards around sampling
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(model, "generate_with_stack")
        model.eval()
        torch.manual_seed(training_args.seed)
        prompt = tokenizer("ROMEO:", return_tensors="pt").input_ids.to(model.device)
        out = model.generate_with_stack(prompt, max_new_tokens=diffusion_args.sample_tokens,
                                        num_steps=diffusion_args.sample_steps, temperature=0.8, top_k=50)
        summary["sample"] = tokenizer.decode(out.sequences[0])
    if trainer.is_world_process_zero():
        if "sample" in summary:
            print(summary["sample"])
        atomic_write_text(os.path.join(training_args.output_dir, "summary.json"),
                          json.dumps(summary, indent=2, default=str))
    # every rank: its view of the run (under DDP the ranks must end with the same weights)
    atomic_write_text(os.path.join(training_args.output_dir, f"summary_rank{rank}.json"),
                      json.dumps({k: summary[k] for k in ("rank", "world_size", "global_step", "weights_sha256")}))
    return summary


if __name__ == "__main__":
    main()
