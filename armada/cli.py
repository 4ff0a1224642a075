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


def cmd_push(args):
    from .hub import push

    info = push(args.model_dir, args.repo_id, private=args.private, revision=args.revision, results=args.results,
                commit_message=args.message)
    print(json.dumps({"repo_id": args.repo_id, "revision": args.revision or "main", "commit": info.oid,
                      "url": info.commit_url}))


def add_push_parser(sub):
    p = sub.add_parser("push", help="push a checkpoint or PEFT adapter folder to the Hub (one commit, safetensors)")
    p.add_argument("model_dir", help="folder written by save_pretrained (model + tokenizer, or a PEFT adapter)")
    p.add_argument("repo_id", help="'namespace/name' on the Hub (HF_ENDPOINT); the token comes from HF_TOKEN")
    p.add_argument("--private", action="store_true", help="create the repo private (needs a token)")
    p.add_argument("--revision", help="branch to push to (created from main if missing); default main")
    p.add_argument("--results", nargs="+", default=[], metavar="JSON",
                   help="results files for the model card (replaces the folder's README.md)")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=cmd_push)


def cmd_pull(args):
    from .hub import pull

    print(json.dumps({"repo_id": args.repo_id, "revision": args.revision or "main",
                      "output": pull(args.repo_id, args.out_dir, revision=args.revision, overwrite=args.overwrite)}))


def add_pull_parser(sub):
    p = sub.add_parser("pull", help="download a checkpoint from the Hub (through the HF cache) into a folder")
    p.add_argument("repo_id")
    p.add_argument("out_dir")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty OUT_DIR")
    p.set_defaults(func=cmd_pull)


def cmd_card(args):
    from .hub_cards import build_card
    from .io_utils import atomic_write_text

    path = os.path.join(args.model_dir, "README.md")
    if os.path.exists(path) and not args.overwrite:
        raise SystemExit(f"error: {path} exists; pass --overwrite to replace it.")
    card = build_card(args.model_dir, results=args.results, repo_id=args.repo_id)
    atomic_write_text(path, str(card))
    print(json.dumps({"card": path, "eval_results": len(card.data.eval_results or [])}))


def add_card_parser(sub):
    p = sub.add_parser("card", help="write MODEL_DIR/README.md, a model card with the measured results")
    p.add_argument("model_dir")
    p.add_argument("--results", nargs="+", default=[], metavar="JSON",
                   help="JSON written by armada's evaluation/benchmark code (examples/demo.py, benchmarks/...)")
    p.add_argument("--repo-id", help="Hub id used in the card's loading snippets (default: the folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing README.md")
    p.set_defaults(func=cmd_card)


# One function per subcommand: each adds its parser and sets `func` (heavy imports stay inside the handlers).
SUBCOMMANDS = (add_prune_parser, add_report_parser, add_bench_parser, add_push_parser, add_pull_parser,
               add_card_parser)


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
