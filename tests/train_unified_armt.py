"""Train a saved UnifiedARMT with `Trainer` on blocks of a text file: the minimal script tests/test_fsdp.py runs in
one process and under `accelerate launch` (UnifiedARMT has no example training script).

    python tests/train_unified_armt.py --model_name_or_path DIR --train_file text.txt --output_dir OUT --use_cpu

Saves `<output_dir>/final` (under FSDP every rank joins the gathering of the full state dict; rank 0 writes) and
`summary_rank<r>.json` on every rank.
"""

import json
import os
from dataclasses import dataclass

from transformers import AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments, set_seed

import armada  # noqa: F401  (registers the Auto classes)
from armada.data import load_text, tokenize_into_blocks
from armada.tokenization import gpt2_tokenizer


@dataclass
class Arguments:
    model_name_or_path: str
    train_file: str
    block_size: int = 32


def main(argv=None):
    args, training_args = HfArgumentParser((Arguments, TrainingArguments)).parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)
    tokenizer = gpt2_tokenizer()
    with training_args.main_process_first(desc="tokenize"):
        train = tokenize_into_blocks(load_text(args.train_file), tokenizer, args.block_size)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(os.path.join(training_args.output_dir, "final"))
    rank = training_args.process_index
    with open(os.path.join(training_args.output_dir, f"summary_rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": training_args.world_size, "global_step": trainer.state.global_step,
                   "fsdp": trainer.is_fsdp_enabled}, f)


if __name__ == "__main__":
    main()
