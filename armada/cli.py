"""The `armada` command line.

    armada prune --model DIR --level 0.5 --strategy importance --data text.txt --output DIR [--overwrite]
    armada report --model DIR
    armada bench pruning [--quick]      (benchmarks/pruning_comparison.py, from a source checkout)
    armada bench speed [--quick]        (benchmarks/agency_speed.py)

--model is a checkpoint folder or a Hub id; the checkpoint's own tokenizer is used and saved with the output when
it has one (else GPT-2's BPE). --output must be new or empty; --overwrite replaces an earlier armada output or the
--model folder itself, never a folder holding other files (see `armada.io_utils.atomic_directory`). Every error is
one line on stderr with exit status 1.
"""

import argparse
import json
import os
import sys

import torch

from .io_utils import atomic_directory, check_output_directory


def _calibration_blocks(path: str, block_size: int, n_blocks: int, tokenizer, vocab_size: int):
    if not os.path.isfile(path):
        raise SystemExit(f"error: calibration file {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, return_attention_mask=False)["input_ids"][: block_size * n_blocks]
    if len(ids) < block_size:
        raise SystemExit(f"error: {path!r} has {len(ids)} tokens, fewer than one block of {block_size}.")
    if max(ids) >= vocab_size:
        raise SystemExit(f"error: the tokenizer gives ids up to {max(ids)} but the model's vocabulary has {vocab_size} "
                         "entries: the model was not trained with this tokenizer. Save the model's own tokenizer into "
                         "its folder (tokenizer.save_pretrained(DIR)); without one armada uses GPT-2's.")
    usable = len(ids) // block_size * block_size
    return list(torch.tensor(ids[:usable]).view(-1, block_size).split(4))


def _looks_like_path(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else (absolute, ./, ~, deeper folders) can only be a local path."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in
            name or name.endswith("/"))


def check_model_location(name: str):
    """Fail fast with one line when `name` is neither a usable local checkpoint folder nor a model on the Hub.

    A local folder is checked on the spot (config.json present, safetensors files complete). A name that can only
    be a path and does not exist is reported at once; a possible Hub id is looked up in the local cache, then with a
    single Hub request, instead of transformers' retries (about 27 s without a network) before its error."""
    from .io_utils import check_checkpoint_folder

    if os.path.isdir(name):
        return check_checkpoint_folder(name)
    if os.path.exists(name):
        raise SystemExit(f"error: {name!r} is a file; --model takes a checkpoint folder or a Hub model id.")
    if _looks_like_path(name):
        raise SystemExit(f"error: model folder {name!r} does not exist.")
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    from .compat import HUB_UNREACHABLE_ERRORS

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except HFValidationError:
        raise SystemExit(f"error: model folder {name!r} does not exist (and it is not a valid Hub model id).")
    if constants.HF_HUB_OFFLINE:
        raise SystemExit(f"error: no folder {name!r} here, and no Hub model of that name in the cache (HF_HUB_OFFLINE "
                         "is set, so the Hub was not asked).")
    try:
        HfApi().model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise SystemExit(f"error: no folder {name!r} here, and no model {name!r} on the Hub.")
    except HUB_UNREACHABLE_ERRORS as error:  # no answer (connection refused, timeout), or an HTTP error answer
        raise SystemExit(f"error: no folder {name!r} here, and the Hub cannot be reached to look for a model of that "
                         f"name ({type(error).__name__}).")


def _load(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    import armada  # noqa: F401  (registers the Auto classes)

    from .modeling import AgencyGPT2ForCausalLM

    check_model_location(path)
    # trust_remote_code=False: a checkpoint's own code never runs here (transformers would otherwise ask on stdin).
    if AutoConfig.from_pretrained(path, trust_remote_code=False).model_type == "gpt2":
        return AgencyGPT2ForCausalLM.from_gpt2(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    if not isinstance(model, AgencyGPT2ForCausalLM):
        raise SystemExit(f"error: {path!r} is a {type(model).__name__}; allowed: a GPT-2 or AgencyGPT2 checkpoint.")
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _tokenizer(path: str):
    """(tokenizer, source): the checkpoint's own tokenizer when it has one, else GPT-2's BPE (`source` says which)."""
    from transformers import AutoTokenizer

    from .tokenization import gpt2_tokenizer

    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(path), "checkpoint"
        return gpt2_tokenizer(), "gpt2 (the checkpoint has none)"
    try:
        return AutoTokenizer.from_pretrained(path), "checkpoint"
    except (OSError, ValueError):
        return gpt2_tokenizer(), "gpt2 (the checkpoint has none)"


def cmd_prune(args):
    from .pruning import prune

    model = _load(args.model).eval()
    tokenizer, tokenizer_source = _tokenizer(args.model)
    vocab_size = model.config.vocab_size
    data = None
    if args.strategy in ("entropy", "importance", "l0"):
        if not args.data:
            raise SystemExit(f"error: strategy {args.strategy!r} needs --data (a text file for calibration).")
        data = _calibration_blocks(args.data, args.block_size, args.calibration_blocks, tokenizer, vocab_size)
    save_tokenizer = tokenizer_source == "checkpoint" or len(tokenizer) <= vocab_size
    inputs = [p for p in (args.model, args.data) if p and os.path.exists(p)]
    check_output_directory(args.output, args.overwrite, inputs)  # before the (slow) scoring, not after it
    already = int(model.pruned_head_mask().sum())
    selection = prune(model, args.level, args.strategy, data, per_layer=args.per_layer, seed=args.seed)
    with atomic_directory(args.output, overwrite=args.overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp)
        if save_tokenizer:
            tokenizer.save_pretrained(tmp)
    result = {"pruned": {str(k): v for k, v in selection.items()}, "heads_per_layer": model.num_heads_per_layer(),
              "output": args.output, "tokenizer": tokenizer_source if save_tokenizer else "none saved (GPT-2's does "
              f"not fit the model's vocabulary of {vocab_size})"}
    if not selection:
        total = model.config.n_layer * model.config.n_head
        result["note"] = (f"nothing pruned: {already} of {total} heads were already pruned, which meets --level "
                          f"{args.level} (levels count from the original model's heads, so re-pruning only goes up).")
    print(json.dumps(result))


def cmd_report(args):
    report = _load(args.model).agency_report()
    print(json.dumps(report if args.per_head else {k: v for k, v in report.items() if k != "heads"}, indent=2))


BENCHMARKS = {"pruning": "pruning_comparison.py", "speed": "agency_speed.py"}


def cmd_bench(args, extra):
    import runpy

    if args.name is None:
        usage = f"usage: armada bench {{{','.join(sorted(BENCHMARKS))}}} [script arguments, --help for them]"
        if extra and extra[0] in ("-h", "--help"):
            print(usage + "\n\n" + "\n".join(f"  {k:<10} benchmarks/{v}" for k, v in sorted(BENCHMARKS.items())))
            return 0
        raise SystemExit(f"{usage}\nerror: name a benchmark: {', '.join(sorted(BENCHMARKS))}")
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
    p.add_argument("--output", required=True, help="directory to save the pruned model and tokenizer (new, or an "
                   "earlier armada output / the --model folder itself with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (see armada.io_utils)")
    p.set_defaults(func=cmd_prune)


def add_report_parser(sub):
    r = sub.add_parser("report", help="print the agency report of an AgencyGPT2 checkpoint")
    r.add_argument("--model", required=True)
    r.add_argument("--per-head", action="store_true", help="include every head's entry")
    r.set_defaults(func=cmd_report)


def add_bench_parser(sub):
    b = sub.add_parser("bench", add_help=False, help="run a benchmark (other arguments, --help too, go to the script)")
    b.add_argument("name", nargs="?", choices=sorted(BENCHMARKS))
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
    e.add_argument("model_dir", help="AgencyGPT2, UnifiedARMT or ThoughtDiffusion checkpoint directory "
                                    "(save_pretrained)")
    e.add_argument("out_dir", help="directory to write model.onnx (and model_quantized.onnx) into")
    e.add_argument("--quantize", choices=["int8"], help="also write a dynamic int8 model (ORTQuantizer's settings)")
    e.add_argument("--opset", type=int, help="ONNX opset (default 18; allowed 14..20)")
    e.add_argument("--instruction-set", choices=["avx512_vnni", "avx512", "avx2", "arm64"],
                   help="int8 target (default: this CPU's)")
    e.add_argument("--per-channel", action="store_true", help="per-channel int8 weight scales")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    e.set_defaults(func=cmd_export)


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
                   help="results files for the model card, as for `armada card` (replaces the folder's README.md)")
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
                   help="JSON written by armada's evaluation/benchmark code: examples/demo.py's demo_summary.json, "
                        "the reports of benchmarks/{armt_babilong,armt_tasks,pruning_comparison,onnx_speed,diffusion}"
                        ".py, or {\"eval_results\": [...]}")
    p.add_argument("--repo-id", help="Hub id used in the card's loading snippets (default: the folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing README.md")
    p.set_defaults(func=cmd_card)


# One function per subcommand: each adds its parser and sets `func` (heavy imports stay inside the handlers).
SUBCOMMANDS = (add_prune_parser, add_report_parser, add_bench_parser, add_export_parser, add_push_parser,
               add_pull_parser, add_card_parser)


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
    from safetensors import SafetensorError

    try:
        args.func(args)
    except (ValueError, OSError, SafetensorError, ImportError) as error:  # bad input, broken files, missing extra
        raise SystemExit(f"error: {' '.join(str(error).split())}")


if __name__ == "__main__":
    sys.exit(main())
