"""PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8 (armada.export), measured in one run with interleaved rounds.

Families (random-init weights, seeded: speed and size do not depend on the weights' values; parity is checked by
`export_onnx` at export and greedy outputs are compared below):
  agency      AgencyGPT2 on the GPT-2 124M shape, unpruned (from_gpt2 of a random GPT2LMHeadModel); ONNX through
              armada.onnxruntime.ORTAgencyGPT2ForCausalLM (every armada family uses its armada ORT class)
  agency50    the same with 50% of the heads pruned (select_heads(score_heads(model, "magnitude"), 0.5), global)
  gpt2        stock GPT2LMHeadModel exported as a decoder with past and quantized with the same int8 config: the
              peer. With the optimum backend (`armada.export.onnx_backend()`) optimum's own export
              (onnx_export_from_model, text-generation-with-past) run by its ORTModelForCausalLM; with the torch
              backend armada's decoder graph run by ORTAgencyGPT2ForCausalLM. Either way with the generation-loop
              setting of armada's ORT classes (`armada.onnxruntime.torch_threads(1)` around generate;
              benchmarks/ort_threads.py measures what it is worth)
  armt        UnifiedARMT at the size of benchmarks/armt_scaling.py (256 wide, 4 layers, 4 heads, segment 512,
              16 memory tokens, GPT-2 vocabulary)
  diffusion   ThoughtDiffusion at the size of benchmarks/diffusion.py (128 wide, 4 layers, 4 heads, blocks of 16,
              thought stack 8) with the GPT-2 vocabulary + [MASK]; its `generate` is greedy `generate_with_stack`
              with 16 denoising steps for the 64 new tokens (block KV cache), its forward one denoising call on
              inputs with half of the tokens masked
Each family runs as pt (PyTorch fp32, eval, inference_mode), onnx (fp32) and int8 (dynamic int8 with the config for
this CPU: ORTQuantizer with the optimum backend, onnxruntime's quantize_dynamic with the torch backend). Measured:
  generate  tokens/s (new tokens / wall time of generate(), prefill included), batch 1, 32-token prompt, 64 greedy
            new tokens (min_new_tokens=64)
  forward   tokens/s, batch 4 x 256, full-sequence forward without cache
  size      bytes of the model file (PyTorch: model.safetensors from save_pretrained)
A round runs every variant once per measure in a shuffled order; a ratio is the median over rounds of the two speeds
measured in the same round (paired), as in benchmarks/agency_speed.py. Every sample records the share of the CPUs
other processes used while it ran (the machine may be shared); the load average is recorded too.

    python benchmarks/onnx_speed.py                          # full run -> outputs/onnx_speed
    python benchmarks/onnx_speed.py --quick --out /tmp/o     # tiny models, smoke test
    python benchmarks/onnx_speed.py --update-committed-results   # -> benchmarks/results/onnx_speed (the record)

The exported models go to a temporary folder, removed at the end (`--keep-models DIR` keeps them there).
"""

import argparse
import datetime
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("agency", "agency50", "gpt2", "armt", "diffusion")
KINDS = ("pt", "onnx", "int8")
MEASURES = ("generate", "forward")
TARGETS = {"generate_vs_pt": 2.5, "size_vs_pt": 0.3}  # AgencyGPT2 int8 (both families), + never slower than gpt2 int8
SIGNIFICANCE = 0.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "onnx_speed")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, quick 2)")
    p.add_argument("--keep-models", default=None, metavar="DIR", help="export the models into DIR and keep them")
    p.add_argument("--max-wait", type=float, default=None,
                   help="seconds the run may spend waiting for other processes' load to drop (default 120)")
    p.add_argument("--per-channel", action="store_true", help="per-channel int8 weight scales")
    p.add_argument("--families", default="agency,agency50,gpt2,armt,diffusion",
                   help=f"comma-separated, from {', '.join(FAMILIES)}")
    args = p.parse_args(argv)
    if args.update_committed_results and args.out is None:
        args.out = os.path.join(common.COMMITTED_RESULTS, "onnx_speed")
    args.out = common.output_dir(args, "onnx_speed")
    args.rounds = args.rounds or (2 if args.quick else 10)
    args.max_wait = args.max_wait if args.max_wait is not None else (5.0 if args.quick else 120.0)
    args.families = [f for f in args.families.split(",") if f]
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        p.error(f"unknown families {bad}; allowed: {', '.join(FAMILIES)}")
    return args


# ----------------------------------------------------------------------------------------------------- models
def build_pytorch(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    from armada import (
        AgencyGPT2ForCausalLM,
        ThoughtDiffusionConfig,
        ThoughtDiffusionForMaskedLM,
        UnifiedARMTConfig,
        UnifiedARMTForCausalLM,
    )
    from armada.pruning import score_heads, select_heads

    torch.manual_seed(args.seed)
    if args.quick:
        gpt2_config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=256)
        armt_config = UnifiedARMTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        segment_size=128, num_memory_tokens=8)
        diffusion_config = ThoughtDiffusionConfig(vocab_size=1001, mask_token_id=1000, hidden_size=32,
                                                  num_hidden_layers=2, num_attention_heads=2, block_length=8,
                                                  thought_stack_size=4, max_position_embeddings=128)
    else:
        gpt2_config = GPT2Config()  # GPT-2 124M
        armt_config = UnifiedARMTConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                        segment_size=512, num_memory_tokens=16)
        diffusion_config = ThoughtDiffusionConfig(vocab_size=50258, mask_token_id=50257, hidden_size=128,
                                                  num_hidden_layers=4, num_attention_heads=4, block_length=16,
                                                  thought_stack_size=8, max_position_embeddings=512)
    gpt2 = GPT2LMHeadModel(gpt2_config).eval()
    models = {"gpt2": gpt2, "agency": AgencyGPT2ForCausalLM.from_gpt2(gpt2).eval()}
    agency50 = AgencyGPT2ForCausalLM.from_gpt2(gpt2).eval()
    agency50.prune_heads(select_heads(score_heads(agency50, "magnitude"), 0.5))
    models["agency50"] = agency50
    models["armt"] = UnifiedARMTForCausalLM(armt_config).eval()
    if "diffusion" in args.families:
        models["diffusion"] = ThoughtDiffusionForMaskedLM(diffusion_config).eval()
    return {name: model for name, model in models.items() if name in args.families}


def export_all(models, work, args):
    """PyTorch checkpoint + ONNX fp32/int8 export of every family; returns {family: {kind: path}} and reports."""
    from armada.export import AgencyGPT2Graph, export_onnx, onnx_backend, quantization_config, quantize_int8
    from armada.export.onnx_export import export_graph

    files, reports = {}, {}
    for name, model in models.items():
        pt_dir, onnx_dir = os.path.join(work, name, "pytorch"), os.path.join(work, name, "onnx")
        model.save_pretrained(pt_dir)
        t = time.perf_counter()
        if name == "gpt2":  # the stock model as a decoder with past, quantized with the same config
            if onnx_backend() == "optimum":  # optimum's own export
                from optimum.exporters.onnx import onnx_export_from_model

                onnx_export_from_model(model, onnx_dir, task="text-generation-with-past", do_validation=False)
                exporter = "optimum onnx_export_from_model + ORTQuantizer"
            else:
                export_graph(model, AgencyGPT2Graph(model.config), onnx_dir)
                exporter = "armada decoder graph (torch.onnx) + onnxruntime quantize_dynamic"
            quantize_int8(onnx_dir, quantization_config(per_channel=args.per_channel))
            reports[name] = {"exporter": exporter}
        else:
            reports[name] = export_onnx(model, onnx_dir, quantize="int8", per_channel=args.per_channel,
                                        overwrite=True, sample_tokens=512)
        reports[name]["export_seconds"] = round(time.perf_counter() - t, 1)
        files[name] = {"pt": os.path.join(pt_dir, "model.safetensors"),
                       "onnx": os.path.join(onnx_dir, "model.onnx"),
                       "int8": os.path.join(onnx_dir, "model_quantized.onnx")}
        print(f"exported {name} in {reports[name]['export_seconds']} s", flush=True)
    return files, reports


def _version(package):
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def load_ort(name, path, threads):
    import onnxruntime as ort

    from armada.export import onnx_backend
    from armada.onnxruntime import (
        ORTAgencyGPT2ForCausalLM,
        ORTThoughtDiffusionForMaskedLM,
        ORTUnifiedARMTForCausalLM,
    )

    peer = ORTAgencyGPT2ForCausalLM
    if onnx_backend() == "optimum":  # optimum's class runs optimum's export of the peer
        from optimum.onnxruntime import ORTModelForCausalLM as peer

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    cls = {"gpt2": peer, "agency": ORTAgencyGPT2ForCausalLM, "agency50": ORTAgencyGPT2ForCausalLM,
           "armt": ORTUnifiedARMTForCausalLM, "diffusion": ORTThoughtDiffusionForMaskedLM}[name]
    return cls.from_pretrained(os.path.dirname(path), file_name=os.path.basename(path), session_options=options)


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    models = build_pytorch(args)
    work = args.keep_models or tempfile.mkdtemp(prefix="onnx_speed_models-")
    try:
        return measure(args, models, work, started, load_before)
    finally:
        if not args.keep_models:
            shutil.rmtree(work, ignore_errors=True)


def measure(args, models, work, started, load_before):
    """Export, check greedy outputs, time the interleaved rounds, write the report; returns the exit status."""
    import onnxruntime
    import transformers

    import armada  # noqa: F401
    from armada.export import cpu_instruction_set, onnx_backend
    from armada.io_utils import atomic_savefig, atomic_write_text
    from armada.onnxruntime import torch_threads

    files, reports = export_all(models, work, args)
    variants = {}
    for name, model in models.items():
        variants[(name, "pt")] = model
        for kind in ("onnx", "int8"):
            variants[(name, kind)] = load_ort(name, files[name][kind], args.threads)

    vocab = 1000 if args.quick else 50257  # every family's vocabulary starts with these ids
    gen = torch.Generator().manual_seed(args.seed)
    fwd_batch, fwd_len, prompt_len, new_tokens = (2, 64, 8, 8) if args.quick else (4, 256, 32, 64)
    fwd_ids = torch.randint(0, vocab, (fwd_batch, fwd_len), generator=gen)
    masked_ids = fwd_ids.masked_fill(torch.rand(fwd_ids.shape, generator=gen) < 0.5, vocab)  # diffusion's [MASK]
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    gen_kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, pad_token_id=0)
    denoising_steps = new_tokens // 4

    def run_forward(key):
        model = variants[key]
        if key[0] == "armt":
            return model(fwd_ids)
        if key[0] == "diffusion":
            return model(input_ids=masked_ids)
        return model(input_ids=fwd_ids, attention_mask=torch.ones_like(fwd_ids), use_cache=False)

    def run_generate(key):
        if key[0] == "gpt2" and key[1] != "pt":  # the peer with the generation-loop setting armada's classes use
            with torch_threads(1):
                return variants[key].generate(prompt, **gen_kwargs)
        if key[0] == "diffusion":
            return variants[key].generate_with_stack(prompt, max_new_tokens=new_tokens, num_steps=denoising_steps,
                                                     top_k=1).sequences
        return variants[key].generate(prompt, **gen_kwargs)

    with torch.inference_mode():  # greedy outputs of ONNX fp32 against PyTorch (random weights: ties are rare)
        checks = {name: {kind: torch.equal(run_generate((name, kind)), run_generate((name, "pt")))
                         for kind in ("onnx", "int8")} for name in models}
    print(f"greedy equal to PyTorch: {json.dumps(checks)}", flush=True)

    clock = common.LoadMonitor(args.max_wait)
    tokens = {"forward": fwd_ids.numel(), "generate": new_tokens}
    samples = {key: {m: [] for m in MEASURES} for key in variants}
    loads = {key: {m: [] for m in MEASURES} for key in variants}
    order, rng = list(variants), random.Random(args.seed)
    with torch.inference_mode():
        for key in order:  # warm-up
            run_forward(key)
            run_generate(key)
        for r in range(args.rounds):
            for m, fn in (("generate", run_generate), ("forward", run_forward)):
                rng.shuffle(order)
                for key in order:
                    seconds, load = clock.measure(lambda: fn(key))
                    samples[key][m].append(tokens[m] / seconds)
                    loads[key][m].append(load)
            print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)", flush=True)

    def per_round(key, other, m):
        return [a / b for a, b in zip(samples[key][m], samples[other][m])]

    results = {}
    for (name, kind) in variants:
        entry = {"size_bytes": os.path.getsize(files[name][kind])}
        entry["size_vs_pt"] = entry["size_bytes"] / os.path.getsize(files[name]["pt"])
        for m in MEASURES:
            values = samples[(name, kind)][m]
            ratios = per_round((name, kind), (name, "pt"), m)
            entry[m] = {"median_tokens_per_s": statistics.median(values), "samples": values,
                        "foreign_load": loads[(name, kind)][m], "vs_pt": statistics.median(ratios),
                        "vs_pt_per_round": ratios,
                        "contended_samples": sum(x > common.CONTENDED for x in loads[(name, kind)][m])}
        results.setdefault(name, {})[kind] = entry

    targets = []
    for name in ("agency", "agency50"):
        if name not in results:
            continue
        int8 = results[name]["int8"]
        targets.append({"target": f"{name} int8 generate >= {TARGETS['generate_vs_pt']}x PyTorch fp32",
                        "value": int8["generate"]["vs_pt"], "pass": int8["generate"]["vs_pt"] >=
                        TARGETS["generate_vs_pt"]})
        targets.append({"target": f"{name} int8 size <= {TARGETS['size_vs_pt']}x PyTorch fp32",
                        "value": int8["size_vs_pt"], "pass": int8["size_vs_pt"] <= TARGETS["size_vs_pt"]})
        if "gpt2" in results:
            for m in MEASURES:
                ratios = per_round((name, "int8"), ("gpt2", "int8"), m)
                lost_rounds = sum(x < 1 for x in ratios)
                p_value = sum(math.comb(len(ratios), k) for k in range(lost_rounds, len(ratios) + 1)) / 2 ** len(ratios)
                value = statistics.median(ratios)
                int8.setdefault("vs_gpt2_int8", {})[m] = {"ratio": value, "per_round": ratios, "sign_test_p": p_value}
                targets.append({"target": f"{name} int8 {m} not slower than stock GPT-2 int8", "value": value,
                                "rounds_slower": lost_rounds, "sign_test_p": p_value,
                                "pass": value >= 1.0 or p_value >= SIGNIFICANCE})

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    report = {
        "benchmark": "onnx_speed",
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "threads": args.threads, "instruction_set": cpu_instruction_set(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx_backend": onnx_backend(),
            "optimum": _version("optimum"),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "seconds_lost_to_other_processes": clock.lost,
            "contended_samples": sum(e[m]["contended_samples"] for f in results.values() for e in f.values()
                                     for m in MEASURES),
            "total_samples": len(variants) * len(MEASURES) * args.rounds,
        },
        "config": {"quick": args.quick, "seed": args.seed, "rounds": args.rounds, "weights": "random init (seeded)",
                   "forward": {"batch": fwd_batch, "seq_len": fwd_len, "use_cache": False},
                   "generate": {"batch": 1, "prompt_len": prompt_len, "new_tokens": new_tokens, "greedy": True,
                                "diffusion_denoising_steps": denoising_steps},
                   "int8": {"per_channel": args.per_channel, "mode": "dynamic"},
                   "ort_session": {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1,
                                   "graph_optimization_level": "ORT_ENABLE_ALL"},
                   "statistic": "paired: median over rounds of (variant / PyTorch fp32 of the same family, same "
                                "round)"},
        "exports": reports, "greedy_equal_to_pytorch": checks, "results": results, "targets": targets,
        "all_targets_pass": all(t["pass"] for t in targets), "wall_time_s": time.perf_counter() - started,
    }
    table = markdown_table(report)
    print("\n" + table)
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']:.3f}")
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "onnx_speed.json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(os.path.join(args.out, "onnx_speed.md"), table)
    plot(report, os.path.join(args.out, "onnx_speed.png"), atomic_savefig)
    print(f"wrote {args.out}/onnx_speed.{{json,md,png}}" + (f" (models in {work})" if args.keep_models else ""))
    if args.quick:  # tiny models say nothing about the speed targets: only the correctness checks count
        return 0 if all(all(kinds.values()) for kinds in checks.values()) else 1
    return 0 if report["all_targets_pass"] else 1


LABELS = {"agency": "AgencyGPT2 124M", "agency50": "AgencyGPT2 124M, 50% heads pruned",
          "gpt2": "GPT2LMHeadModel 124M", "armt": "UnifiedARMT (256x4, segment 512)",
          "diffusion": "ThoughtDiffusion (128x4, block 16, 16 steps)"}


def markdown_table(report):
    rows = ["| model | runtime | generate tokens/s | vs PyTorch | forward tokens/s | vs PyTorch | file MB "
            "| vs PyTorch |", "|---|---|---|---|---|---|---|---|"]
    for name, kinds in report["results"].items():
        for kind, e in kinds.items():
            runtime = {"pt": "PyTorch fp32", "onnx": "ONNX Runtime fp32", "int8": "ONNX Runtime int8"}[kind]
            rows.append(f"| {LABELS[name]} | {runtime} | {e['generate']['median_tokens_per_s']:.1f} | "
                        f"{e['generate']['vs_pt']:.2f}x | {e['forward']['median_tokens_per_s']:.0f} | "
                        f"{e['forward']['vs_pt']:.2f}x | {e['size_bytes'] / 1e6:.0f} | {e['size_vs_pt']:.2f}x |")
    env = report["environment"]
    rows.append("")
    rows.append(f"Median over {report['config']['rounds']} interleaved rounds; ratios are paired (same round). "
                f"{env['threads']} threads, {env['cpu']} ({env['instruction_set']}), onnxruntime "
                f"{env['onnxruntime']}, torch {env['torch']}; load average before/after "
                f"{env['load_average_before'][0]:.1f}/{env['load_average_after'][0]:.1f}; "
                f"{env['contended_samples']} of {env['total_samples']} samples contended. Random-init weights.")
    return "\n".join(rows) + "\n"


def plot(report, path, save):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (what, label) in zip(axes, (("generate", "generate speed / PyTorch fp32"),
                                        ("forward", "forward speed / PyTorch fp32"), ("size", "file size / PyTorch"))):
        for i, kind in enumerate(("onnx", "int8")):
            values = [report["results"][n][kind]["size_vs_pt" if what == "size" else what]
                      if what == "size" else report["results"][n][kind][what]["vs_pt"] for n in names]
            ax.bar([x + 0.4 * i for x in range(len(names))], values, width=0.4,
                   label={"onnx": "ONNX fp32", "int8": "ONNX int8"}[kind])
        ax.axhline(1.0, color="gray", lw=0.8)
        if what == "generate":
            ax.axhline(TARGETS["generate_vs_pt"], color="red", ls="--", lw=0.8, label="AgencyGPT2 int8 target")
        if what == "size":
            ax.axhline(TARGETS["size_vs_pt"], color="red", ls="--", lw=0.8, label="AgencyGPT2 int8 target")
        ax.set_xticks([x + 0.2 for x in range(len(names))], names)
        ax.set_title(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
