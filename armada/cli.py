"""The `armada` command line.

    armada prune --model DIR --level 0.5 --strategy importance --data text.txt --output DIR
    armada report --model DIR
    armada bench pruning [--quick]      (benchmarks/pruning_comparison.py, from a source checkout)
    armada bench speed [--quick]        (benchmarks/agency_speed.py)
"""

import argparse
import json
import os
import sys

import torch

from .io_utils import atomic_directory


def _calibration_blocks(path: str, block_size: int, n_blocks: int, tokenizer):
    if not os.path.isfile(path):
        raise SystemExit(f"error: calibration file {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, return_attention_mask=False)["input_ids"][: block_size * n_blocks]
    if len(ids) < block_size:
        raise SystemExit(f"error: {path!r} has {len(ids)} tokens, fewer than one block of {block_size}.")
    usable = len(ids) // block_size * block_size
    return list(torch.tensor(ids[:usable]).view(-1, block_size).split(4))


def _load(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    import armada  # noqa: F401  (registers the Auto classes)

    from .modeling import AgencyGPT2ForCausalLM

    if AutoConfig.from_pretrained(path).model_type == "gpt2":
        return AgencyGPT2ForCausalLM.from_gpt2(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    if not isinstance(model, AgencyGPT2ForCausalLM):
        raise SystemExit(f"error: {path!r} is a {type(model).__name__}; allowed: a GPT-2 or AgencyGPT2 checkpoint.")
    return model


def cmd_prune(args):
    from .pruning import prune
    from .tokenization import gpt2_tokenizer

    model = _load(args.model).eval()
    tokenizer = gpt2_tokenizer()
    data = None
    if args.strategy in ("entropy", "importance", "l0"):
        if not args.data:
            raise SystemExit(f"error: strategy {args.strategy!r} needs --data (a text file for calibration).")
        data = _calibration_blocks(args.data, args.block_size, args.calibration_blocks, tokenizer)
    selection = prune(model, args.level, args.strategy, data, per_layer=args.per_layer, seed=args.seed)
    with atomic_directory(args.output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(json.dumps({"pruned": {str(k): v for k, v in selection.items()},
                      "heads_per_layer": model.num_heads_per_layer(), "output": args.output}))


def cmd_report(args):
    report = _load(args.model).agency_report()
    print(json.dumps(report if args.per_head else {k: v for k, v in report.items() if k != "heads"}, indent=2))


BENCHMARKS = {"pruning": "pruning_comparison.py", "speed": "agency_speed.py"}


def cmd_bench(args, extra):
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", BENCHMARKS[args.name])
    if not os.path.isfile(script):
        raise SystemExit(f"error: {script} not found; benchmarks run from a source checkout of armada.")
    sys.argv = [script, *extra]
    runpy.run_path(script, run_name="__main__")


def add_prune_parser(sub):
    p = sub.add_parser("prune", help="physically prune attention heads of a GPT-2 / AgencyGPT2 checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory or Hub id (GPT-2 or AgencyGPT2)")
    p.add_argument("--level", type=float, required=True, help="fraction of heads to remove, in [0, 1)")
    p.add_argument("--strategy", default="importance", choices=["random", "magnitude", "entropy", "importance", "l0"])
    p.add_argument("--data", help="text file used as calibration data (entropy, importance, l0)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--calibration-blocks", type=int, default=32)
    p.add_argument("--per-layer", action="store_true", help="prune the same fraction in every layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="directory to save the pruned model and tokenizer")
    p.set_defaults(func=cmd_prune)


def add_report_parser(sub):
    r = sub.add_parser("report", help="print the agency report of an AgencyGPT2 checkpoint")
    r.add_argument("--model", required=True)
    r.add_argument("--per-head", action="store_true", help="include every head's entry")
    r.set_defaults(func=cmd_report)


def add_bench_parser(sub):
    b = sub.add_parser("bench", add_help=False, help="run a benchmark (other arguments, --help too, go to the script)")
    b.add_argument("name", choices=sorted(BENCHMARKS))
    b.set_defaults(func=None)


def cmd_export(args):
    from .export import export_onnx

    report = export_onnx(args.model_dir, args.out_dir, quantize=args.quantize, opset=args.opset,
                         overwrite=args.overwrite, instruction_set=args.instruction_set,
                         per_channel=args.per_channel)
    print(json.dumps(report, indent=2))


def add_export_parser(sub):
    e = sub.add_parser("export", help="export a checkpoint for inference without PyTorch (ONNX, optionally int8)")
    e.add_argument("format", choices=["onnx"])
    e.add_argument("model_dir", help="AgencyGPT2 or UnifiedARMT checkpoint directory (save_pretrained)")
    e.add_argument("out_dir", help="directory to write model.onnx (and model_quantized.onnx) into")
    e.add_argument("--quantize", choices=["int8"], help="also write a dynamic int8 model (ORTQuantizer)")
    e.add_argument("--opset", type=int, help="ONNX opset (default 18; allowed 14..20)")
    e.add_argument("--instruction-set", choices=["avx512_vnni", "avx512", "avx2", "arm64"],
                   help="int8 target (default: this CPU's)")
    e.add_argument("--per-channel", action="store_true", help="per-channel int8 weight scales")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    e.set_defaults(func=cmd_export)


# One function per subcommand: each adds its parser and sets `func` (heavy imports stay inside the handlers).
SUBCOMMANDS = (add_prune_parser, add_report_parser, add_bench_parser, add_export_parser)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="armada", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(sub)

    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    sys.exit(main())
