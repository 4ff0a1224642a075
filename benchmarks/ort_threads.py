"""Why the armada ORT classes generate with one torch thread: int8 ONNX generation speed under four thread settings.

One run exports a random-init AgencyGPT2 on the GPT-2 124M shape to int8 ONNX (`armada.export.export_onnx`; or
uses `--model DIR`, an export folder with `model_quantized.onnx`) and times greedy `generate` (batch 1, 32-token
prompt, 64 new tokens) with `armada.onnxruntime.ORTAgencyGPT2ForCausalLM` (transformers' `GenerationMixin.generate`
of it, without the thread setting its own `generate` adds) in interleaved rounds under:
  torch2_spin     torch's default 2 threads, ONNX Runtime's intra-op threads spinning between runs (the defaults)
  torch1_spin     `armada.onnxruntime.torch_threads(1)` around generate (what armada's ORT classes do)
  torch2_nospin   session option session.intra_op.allow_spinning=0
  torch1_nospin   both
The generation loop runs small torch ops between two ONNX Runtime calls; with torch's own thread pool they wait for
cores that ONNX Runtime's threads still spin on. Ratios are paired per round against torch2_spin.

    python benchmarks/ort_threads.py                         # -> outputs/ort_threads/ort_threads.{json,md}
    python benchmarks/ort_threads.py --update-committed-results
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

VARIANTS = {"torch2_spin": (2, True), "torch1_spin": (1, True), "torch2_nospin": (2, False),
            "torch1_nospin": (1, False)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, "ort_threads", model="an ONNX export folder with model_quantized.onnx")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 6, quick 2)")
    parser.add_argument("--max-wait", type=float, default=60.0, help="seconds that may go to waiting for quiet")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 6)
    if args.update_committed_results and args.out is None:
        args.out = os.path.join(common.COMMITTED_RESULTS, "ort_threads")
    args.out = common.output_dir(args, "ort_threads")
    return args


def export(work, quick, seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    from armada import AgencyGPT2ForCausalLM
    from armada.export import export_onnx

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000) if quick else GPT2Config()
    model = AgencyGPT2ForCausalLM.from_gpt2(GPT2LMHeadModel(config).eval()).eval()
    export_onnx(model, work, quantize="int8", sample_tokens=256)
    return work


def load(folder, spin, threads):
    import onnxruntime as ort

    from armada.onnxruntime import ORTAgencyGPT2ForCausalLM

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ORTAgencyGPT2ForCausalLM.from_pretrained(folder, file_name="model_quantized.onnx",
                                                    session_options=options)


def main(argv=None):
    args = parse_args(argv)
    from transformers import GenerationMixin

    from armada.onnxruntime import torch_threads

    started, work = time.perf_counter(), None
    folder = args.model
    if folder is None:
        work = tempfile.mkdtemp(prefix="ort_threads-")
        folder = export(os.path.join(work, "onnx"), args.quick, args.seed)
    sessions = {spin: load(folder, spin, args.threads) for spin in (True, False)}
    vocab = sessions[True].config.vocab_size
    prompt = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(args.seed))
    new_tokens = 8 if args.quick else 64
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, pad_token_id=0)

    def generate(variant):
        threads, spin = VARIANTS[variant]
        with torch_threads(args.threads if threads == 2 else 1):  # the class's generate would pin 1 thread
            return GenerationMixin.generate(sessions[spin], prompt, **kwargs)

    outputs = {name: generate(name) for name in VARIANTS}
    same = all(torch.equal(out, outputs["torch2_spin"]) for out in outputs.values())
    monitor = common.LoadMonitor(args.max_wait)
    speeds, loads = common.interleaved_rounds({name: name for name in VARIANTS},
                                              {"generate": (generate, new_tokens)}, args.rounds, 1, monitor,
                                              seed=args.seed)
    results = {name: {**common.summary(speeds[name]["generate"], loads[name]["generate"]),
                      "vs_torch2_spin": common.paired_ratio(speeds[name]["generate"],
                                                            speeds["torch2_spin"]["generate"])}
               for name in VARIANTS}
    report = {"benchmark": "ort_threads", "environment": common.environment(args.threads),
              "config": {"quick": args.quick, "rounds": args.rounds, "new_tokens": new_tokens, "prompt": 32,
                         "model": args.model or "random-init AgencyGPT2 (GPT-2 124M shape) exported to int8"},
              "same_tokens_in_every_variant": same, "results": results,
              "wall_time_s": time.perf_counter() - started}
    lines = ["| torch threads in the loop | ORT spinning | generate tokens/s | vs defaults (paired) |",
             "|---|---|---|---|"]
    for name, (threads, spin) in VARIANTS.items():
        r = results[name]
        lines.append(f"| {threads} | {'on' if spin else 'off'} | {r['median']:.1f} | {r['vs_torch2_spin']:.2f}x |")
    markdown = "\n".join(lines) + f"\n\nMedian over {args.rounds} interleaved rounds; greedy tokens equal in every " \
                                  f"variant: {same}.\n"
    print(markdown)
    common.print_written(common.write_report(args.out, "ort_threads", report, markdown))
    if work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return common.report_checks([{"name": "same greedy tokens in every variant", "pass": same}])


if __name__ == "__main__":
    sys.exit(main())
