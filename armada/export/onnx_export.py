"""Export armada models to ONNX, quantize them to int8 dynamically, and check parity.

Two backends trace the same graphs (`graphs.py`) with the TorchScript exporter; `onnx_backend()` picks one:
  optimum  where optimum-onnx installs (transformers 4.57): optimum's exporter with the armada `OnnxConfig`s, int8
           through `ORTQuantizer`
  torch    elsewhere (transformers 5): `torch.onnx.export` of the graph's step (tracing the models' eager
           attention, the same MatMul/Softmax ops), int8 through onnxruntime's `quantize_dynamic` with the same
           settings (`Int8Config`)

`export_onnx(model_or_dir, out_dir, quantize=None, opset=None, overwrite=False)` writes, into `out_dir`:

    model.onnx             the fp32 graph (AgencyGPT2: decoder with past; UnifiedARMT: the segment step;
                           ThoughtDiffusion: the denoising step)
    model_quantized.onnx   with quantize="int8": dynamic int8 (`Int8Config` for this CPU)
    config.json, generation_config.json, tokenizer files (when the source has them)
    export_report.json     what was checked and measured (backend, parity figures, quantization settings)

Everything is written to a temporary folder beside `out_dir` and moved into place only after every check passed, so
a failed export leaves nothing behind.

Parity checks (a failure raises `ExportParityError`):
  fp32: max |logit difference| between ONNX Runtime and PyTorch <= 1e-4 over sample inputs that exercise the cache
        (AgencyGPT2: a prompt, then steps with past key/values; UnifiedARMT: a stream crossing segment boundaries;
        ThoughtDiffusion: a padded denoising call with a filled thought stack, then greedy `generate_with_stack` with
        and without the block cache, whose tokens must be equal).
  int8: on a text sample, top-1 agreement with fp32 >= 98% and perplexity within 5% of fp32 (next-token prediction;
        ThoughtDiffusion: the masked half of the sample at t = 0.5). Enforced for trained
        models (`int8_check=None`: when the fp32 perplexity on the sample is below half the vocabulary size; a
        random-init model is about uniform there and int8 noise flips its arbitrary top-1); `True`/`False` force it.
"""

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..io_utils import atomic_directory, check_output_directory
from ..modeling.modeling_agency_gpt2 import CACHE_FIELD
from .graphs import COMMIT_INPUT, DEFAULT_OPSET, GRAPHS, MAX_OPSET, MIN_OPSET, patched_forward

FP32_ATOL = 1e-4
INT8_MIN_TOP1 = 0.98
INT8_MAX_PPL_INCREASE = 0.05
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
INSTRUCTION_SETS = ("avx512_vnni", "avx512", "avx2", "arm64")
ONNX_FILE, QUANTIZED_FILE = "model.onnx", "model_quantized.onnx"


class ExportParityError(ValueError):
    """The exported graph does not compute what the PyTorch model computes (within the stated tolerance)."""


@functools.lru_cache(maxsize=None)
def onnx_backend() -> str:
    """The exporter used here: "optimum" where optimum-onnx imports, else "torch" (the one place that chooses; when
    optimum-onnx supports transformers 5 only this changes)."""
    try:
        import optimum.exporters.onnx  # noqa: F401
        import optimum.onnxruntime  # noqa: F401
    except Exception:  # not installed, or installed beside a transformers it does not support
        return "torch"
    return "optimum"


# ----------------------------------------------------------------------------------------------------- checks
def _check_out_dir(out_dir, overwrite, inputs=()):
    """Refuse a bad output before any work (armada.io_utils' rules: a non-empty folder only with overwrite, and
    never the current directory, a folder holding an input, or one that is not armada's own output)."""
    check_output_directory(out_dir, overwrite, inputs)


def _check_opset(opset):
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"unsupported opset {opset!r}; allowed: integers {MIN_OPSET}..{MAX_OPSET} "
                         f"(default {DEFAULT_OPSET}).")
    return opset


def _load_model(model_or_dir):
    """The model to export and the directory it came from (None for an in-memory model)."""
    import transformers
    from transformers import AutoConfig, PreTrainedModel

    import armada  # noqa: F401  (registers the Auto classes)

    if isinstance(model_or_dir, PreTrainedModel):
        model, source = model_or_dir, None
    else:
        source = os.fspath(model_or_dir)
        if not os.path.isdir(source):
            raise ValueError(f"model directory {source!r} does not exist.")
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ValueError(f"{source!r} has no config.json; expected a directory written by save_pretrained.")
        model_type = AutoConfig.from_pretrained(source, trust_remote_code=False).model_type  # never a folder's code
        if model_type not in GRAPHS:
            raise ValueError(f"unsupported model type {model_type!r} in {source!r}; ONNX export supports "
                             f"{sorted(GRAPHS)}.")
        if not any(os.path.isfile(os.path.join(source, name)) for name in WEIGHT_FILES):
            raise ValueError(f"{source!r} has no weights (none of {', '.join(WEIGHT_FILES)}).")
        model = getattr(transformers, EXPORTERS[model_type]["auto_class"]).from_pretrained(source,
                                                                                    trust_remote_code=False)
    model_type = model.config.model_type
    if model_type not in GRAPHS:
        raise ValueError(f"unsupported model type {model_type!r}; ONNX export supports {sorted(GRAPHS)}.")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError(f"export from a float32 model; got {next(model.parameters()).dtype} (use model.float()).")
    return model.eval(), source


# ----------------------------------------------------------------------------------------------------- quantization
def cpu_instruction_set() -> str:
    """The best int8 instruction set of this CPU among `INSTRUCTION_SETS` (what `AutoQuantizationConfig` targets)."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        flags = set()
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "avx512_vnni"
    if {"avx512f", "avx512bw"} <= flags:
        return "avx512"
    return "avx2"


@dataclass(frozen=True)
class Int8Config:
    """Dynamic int8 settings: those of optimum's `AutoQuantizationConfig.<instruction_set>(is_static=False)`
    (QOperator format, IntegerOps: uint8 activations quantized at run time, symmetric int8 weights — uint8 on avx2 —,
    full range). The optimum backend applies them through `ORTQuantizer`, the torch backend through onnxruntime's
    `quantize_dynamic` with the same arguments."""

    instruction_set: str
    per_channel: bool = False
    operators_to_quantize: Optional[tuple] = None  # None: onnxruntime's IntegerOps defaults (as optimum's)

    @property
    def weights_dtype(self) -> str:
        return "QUInt8" if self.instruction_set == "avx2" else "QInt8"

    def to_optimum(self):
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        ops = list(self.operators_to_quantize) if self.operators_to_quantize else None
        return getattr(AutoQuantizationConfig, self.instruction_set)(is_static=False, per_channel=self.per_channel,
                                                                     operators_to_quantize=ops)

    def quantize_dynamic_kwargs(self, has_subgraphs: bool) -> dict:
        """`onnxruntime.quantization.quantize_dynamic` arguments equivalent to what `ORTQuantizer` passes."""
        from onnxruntime.quantization import QuantType

        return dict(op_types_to_quantize=list(self.operators_to_quantize or ()), per_channel=self.per_channel,
                    reduce_range=False, weight_type=getattr(QuantType, self.weights_dtype),
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "ForceSymmetric": False,
                                   "EnableSubgraph": has_subgraphs, "MatMulConstBOnly": False})

    def to_dict(self) -> dict:
        return {**asdict(self), "weights_dtype": self.weights_dtype, "activations_dtype": "QUInt8",
                "weights_symmetric": True, "reduce_range": False}


def quantization_config(instruction_set: Optional[str] = None, per_channel: bool = False,
                        operators_to_quantize=None) -> Int8Config:
    """Dynamic int8 `Int8Config` for `instruction_set` (default: this CPU's, see `cpu_instruction_set`).

    per_channel=False by default: per-tensor scales keep ORT's fast `MatMulInteger` path on x86 for dynamic
    quantization, and measured top-1 agreement stayed above the target without per-channel scales.
    """
    instruction_set = instruction_set or cpu_instruction_set()
    if instruction_set not in INSTRUCTION_SETS:
        raise ValueError(f"unsupported instruction set {instruction_set!r}; allowed: {', '.join(INSTRUCTION_SETS)}.")
    return Int8Config(instruction_set, per_channel,
                      tuple(operators_to_quantize) if operators_to_quantize else None)


def quantize_int8(directory, config: Int8Config, backend: Optional[str] = None) -> str:
    """Write `model_quantized.onnx` in `directory`, from its `model.onnx`, dynamically quantized with `config`."""
    source, target = os.path.join(directory, ONNX_FILE), os.path.join(directory, QUANTIZED_FILE)
    if (backend or onnx_backend()) == "optimum":
        from optimum.onnxruntime import ORTQuantizer

        # ORTQuantizer saves its own ort_config.json next to the model; keep it (it records the settings).
        ORTQuantizer.from_pretrained(directory, file_name=ONNX_FILE).quantize(config.to_optimum(), save_dir=directory)
        return target
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    graph = onnx.load(source, load_external_data=False).graph
    has_subgraphs = any(node.op_type in ("If", "Loop", "Scan") for node in graph.node)
    quiet = _QuietOrtQuantization()
    logging.getLogger().addFilter(quiet)
    try:
        quantize_dynamic(source, target, **config.quantize_dynamic_kwargs(has_subgraphs))
    finally:
        logging.getLogger().removeFilter(quiet)
    return target


class _QuietOrtQuantization(logging.Filter):
    """Drops the warnings onnxruntime's quantizer logs on the root logger for every export (advice to pre-process,
    tensors whose type shape inference leaves open: they stay float, as with ORTQuantizer)."""

    def filter(self, record):
        return record.levelno > logging.WARNING or "onnxruntime" not in record.pathname


# ----------------------------------------------------------------------------------------------------- parity
def _sample_ids(model, source, sample_text, n_tokens):
    """Token ids of a text sample: the source's tokenizer if it has one, else GPT-2's (ids folded into a smaller
    vocabulary for tiny test models)."""
    from .. import tokenization

    text = sample_text
    if text is None:
        here = os.path.dirname(os.path.abspath(__file__))
        for path in (os.path.join(here, "..", "..", "..", "shared", "data", "wikitext-2", "valid.txt"),
                     os.path.join(here, "..", "..", "..", "shared", "data", "tinyshakespeare", "input.txt")):
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    text = f.read(20 * n_tokens)
                break
    if text is None:
        text = _FALLBACK_TEXT * 8
    tokenizer = None
    if source is not None and os.path.isfile(os.path.join(source, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer = tokenizer or tokenization.gpt2_tokenizer()
    ids = np.array(tokenizer(text, verbose=False)["input_ids"][:n_tokens], dtype=np.int64) % model.config.vocab_size
    if len(ids) < 16:
        raise ValueError(f"the parity text sample has {len(ids)} tokens; at least 16 are needed.")
    return ids


def _perplexity(logits, targets):
    logits = torch.as_tensor(logits, dtype=torch.float64)
    return float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(targets)).exp())


def _agency_parity_fp32(model, ort_model):
    """Prompt (batch 2, one row left-padded), then two cached steps: logits and presents vs PyTorch."""
    generator = torch.Generator().manual_seed(0)
    vocab, length = model.config.vocab_size, min(12, model.config.n_positions - 4)
    ids = torch.randint(0, vocab, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    worst, past_pt, past_ort = 0.0, None, None
    for step in range(3):
        with torch.no_grad():
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
            ref = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                        **{CACHE_FIELD: past_pt})
        out = ort_model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=past_ort,
                        use_cache=True)
        keep = mask[:, -ids.shape[1]:].bool()  # logits at padding positions are not used by anyone
        worst = max(worst, float((out.logits - ref.logits).abs()[keep].max()))
        past_pt, past_ort = ref[CACHE_FIELD], out.past_key_values
        ids = ref.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return worst


def _armt_parity_fp32(model, ort_model):
    """A stream of 2.5 segments fed whole and in uneven chunks, against the PyTorch forward over the whole text."""
    s = model.config.segment_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 2 * s + s // 2 + 1), generator=generator)
    with torch.no_grad():
        ref = model(ids).logits
    whole = ort_model(ids).logits
    worst = float((whole - ref).abs().max())
    state, chunks, start = None, [], 0
    for size in (3, s, 1, 2 * s):
        out = ort_model(ids[:, start:start + size], memory_state=state)
        chunks.append(out.logits)
        state, start = out.memory_state, start + size
    worst = max(worst, float((torch.cat(chunks, dim=1) - ref[:, :start]).abs().max()))
    return worst


def _causal_scores(ort_model, ids, config):
    """Next-token logits (N - 1, V) of one row of token ids and their targets (AgencyGPT2 in windows of its position
    table, UnifiedARMT streamed)."""
    if config.model_type == "unified_armt":
        logits = ort_model(torch.as_tensor(ids)[None]).logits[0].numpy()
    else:
        chunks = []
        for start in range(0, len(ids), config.n_positions):
            piece = torch.as_tensor(ids[start:start + config.n_positions])[None]
            chunks.append(ort_model(input_ids=piece, attention_mask=torch.ones_like(piece), use_cache=False).logits[0])
        logits = torch.cat(chunks).numpy()
    return logits[:-1], ids[1:]


def _diffusion_scores(ort_model, ids, config):
    """ThoughtDiffusion: windows of the text (at most 128 tokens) with a seeded half of their tokens masked at t = 0.5;
    the logits (N, V) of the masked positions and their clean tokens."""
    window = min(128, config.max_position_embeddings)
    ids = torch.as_tensor(ids[:len(ids) // window * window]).view(-1, window)
    ids = ids.masked_fill(ids == config.mask_token_id, 0)
    masked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    logits = ort_model(input_ids=ids.masked_fill(masked, config.mask_token_id),
                       timesteps=torch.full((len(ids),), 0.5)).logits
    return logits[masked].numpy(), ids[masked].numpy()


def _diffusion_parity_fp32(model, ort_model):
    """A denoising call with a filled stack, a cache and padding (3 rows: another batch size than the traced one),
    then greedy `generate_with_stack` with and without the block cache: the same tokens, and logits and thoughts
    within tolerance. Returns the max abs difference (inf when tokens differ)."""
    cfg = model.config
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.mask_token_id, (3, 7), generator=generator)
    mask = torch.ones_like(prompt)
    mask[2, :3] = 0
    block = cfg.block_length or 8
    new = 2 * block if 7 + 2 * block <= cfg.max_position_embeddings else block
    worst = 0.0
    stack = None
    if cfg.thought_stack_size:
        from ..modeling.modeling_thought_diffusion import ThoughtStack

        stack = ThoughtStack.empty(cfg, 3)
        for _ in range(cfg.thought_stack_size + 1):
            stack = stack.push(torch.rand(3, *cfg.thought_dims, generator=generator) * 2 - 1)
    with torch.no_grad():
        ids = prompt.masked_fill(torch.rand(prompt.shape, generator=generator) < 0.5, cfg.mask_token_id)
        ref = model(input_ids=ids, attention_mask=mask, thought_stack=stack, use_cache=True)
        out = ort_model(input_ids=ids, attention_mask=mask, thought_stack=stack, use_cache=True)
    real = ref.logits > torch.finfo(ref.logits.dtype).min / 2
    worst = max(worst, float((out.logits - ref.logits).abs()[real].max()))
    if stack is not None:
        worst = max(worst, float((out.new_thought - ref.new_thought).abs().max()))
    for use_cache in ((True, False) if cfg.block_length is not None else (False,)):
        kwargs = dict(max_new_tokens=new, num_steps=new // 2, top_k=1, attention_mask=mask, initial_stack=stack,
                      use_block_cache=use_cache)
        expected = model.generate_with_stack(prompt, **kwargs)
        got = ort_model.generate_with_stack(prompt, **kwargs)
        if not torch.equal(expected.sequences, got.sequences):
            return float("inf")
        if stack is not None:
            worst = max(worst, float((expected.thought_stack.buffer - got.thought_stack.buffer).abs().max()))
    return worst


def _load_ort(directory, file_name, model_type):
    from .. import onnxruntime

    return getattr(onnxruntime, EXPORTERS[model_type]["ort_class"]).from_pretrained(directory, file_name=file_name)


# ----------------------------------------------------------------------------------------------------- export
def export_onnx(
    model_or_dir,
    out_dir: Union[str, os.PathLike],
    quantize: Optional[str] = None,
    opset: Optional[int] = None,
    overwrite: bool = False,
    instruction_set: Optional[str] = None,
    per_channel: bool = False,
    int8_check: Optional[bool] = None,
    sample_text: Optional[str] = None,
    sample_tokens: int = 1024,
    sample_ids: Optional[Sequence[int]] = None,
) -> dict:
    """Export an AgencyGPT2, UnifiedARMT or ThoughtDiffusion model (a `PreTrainedModel` or a `save_pretrained`
    directory) to ONNX.

    Args:
        model_or_dir: the model, or a directory with its config.json and weights.
        out_dir: the directory to write (see the module docstring for its files). An existing non-empty directory is
            refused unless `overwrite=True`.
        quantize: None (fp32 only) or "int8" (also write `model_quantized.onnx`, dynamic int8, see `Int8Config`).
        opset: ONNX opset, MIN_OPSET..MAX_OPSET (default DEFAULT_OPSET).
        instruction_set: int8 target ("avx512_vnni", "avx512", "avx2", "arm64"); default: this CPU's.
        per_channel: per-channel int8 weight scales (default per-tensor).
        int8_check: enforce the int8 agreement/perplexity targets (None: only for trained models, see module doc).
        sample_text, sample_tokens: the text (default: wikitext-2 valid from ../shared/data, else a built-in
            paragraph) and the number of its tokens used by the int8 check.
        sample_ids: token ids to use instead of a text (e.g. held-out data of a model with its own vocabulary).

    Returns the export report (also saved as `export_report.json`). Raises `ValueError` on bad input and
    `ExportParityError` when a parity check fails; in both cases nothing is written.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"unsupported quantize={quantize!r}; allowed: None or 'int8'.")
    out_dir = os.fspath(out_dir)
    _check_out_dir(out_dir, overwrite)
    opset = _check_opset(opset)
    if sample_ids is not None:
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
    if instruction_set is not None and instruction_set not in INSTRUCTION_SETS:
        raise ValueError(f"unsupported instruction set {instruction_set!r}; allowed: {', '.join(INSTRUCTION_SETS)}.")
    model, source = _load_model(model_or_dir)
    model_type = model.config.model_type
    vocab = model.config.vocab_size
    if sample_ids is not None and (sample_ids.ndim != 1 or len(sample_ids) < 16 or sample_ids.min() < 0
                                   or sample_ids.max() >= vocab):
        raise ValueError(f"sample_ids must be a 1-D sequence of at least 16 token ids in [0, {vocab}).")

    started = time.perf_counter()
    backend = onnx_backend()
    report = {"model_type": model_type, "backend": backend, "opset": opset, "source": source, "files": {}}
    with atomic_directory(out_dir, overwrite=overwrite, inputs=[source] if source else ()) as tmp:
        EXPORTERS[model_type]["export"](model, tmp, opset, backend)
        if source is not None:
            _copy_tokenizer(source, tmp)
        report["files"][ONNX_FILE] = os.path.getsize(os.path.join(tmp, ONNX_FILE))

        fp32 = _load_ort(tmp, ONNX_FILE, model_type)
        diff = EXPORTERS[model_type]["parity_fp32"](model, fp32)
        report["fp32"] = {"max_abs_logit_diff": diff, "atol": FP32_ATOL, "pass": diff <= FP32_ATOL}
        if not diff <= FP32_ATOL:
            raise ExportParityError(f"fp32 ONNX parity failed: max |logit difference| vs PyTorch is {diff:.3g}, "
                                    f"allowed {FP32_ATOL:g}; nothing was written to {out_dir!r}.")

        if quantize == "int8":
            config = quantization_config(instruction_set, per_channel=per_channel)
            quantize_int8(tmp, config, backend)
            report["files"][QUANTIZED_FILE] = os.path.getsize(os.path.join(tmp, QUANTIZED_FILE))
            ids = sample_ids if sample_ids is not None else _sample_ids(model, source, sample_text, sample_tokens)
            report["int8"] = _int8_check(model, ids, fp32, _load_ort(tmp, QUANTIZED_FILE, model_type), int8_check,
                                         out_dir)
            report["int8"].update(config.to_dict())
        report["seconds"] = round(time.perf_counter() - started, 2)
        with open(os.path.join(tmp, "export_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    report["out_dir"] = out_dir
    return report


def _int8_check(model, ids, fp32, int8, enforce, out_dir):
    scores = EXPORTERS[model.config.model_type]["text_scores"]
    ref, targets = scores(fp32, ids, model.config)
    got, _ = scores(int8, ids, model.config)
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    ppl_fp32, ppl_int8 = _perplexity(ref, targets), _perplexity(got, targets)
    increase = ppl_int8 / ppl_fp32 - 1
    trained = ppl_fp32 < 0.5 * model.config.vocab_size
    enforced = trained if enforce is None else bool(enforce)
    passed = top1 >= INT8_MIN_TOP1 and abs(increase) <= INT8_MAX_PPL_INCREASE
    result = {"tokens": int(len(ids)), "scored_positions": int(len(targets)), "top1_agreement": top1,
              "perplexity_fp32": ppl_fp32, "perplexity_int8": ppl_int8,
              "perplexity_change": increase, "min_top1": INT8_MIN_TOP1, "max_perplexity_change": INT8_MAX_PPL_INCREASE,
              "enforced": enforced, "pass": passed}
    if enforced and not passed:
        raise ExportParityError(
            f"int8 ONNX parity failed on {len(ids)} tokens: top-1 agreement with fp32 {top1:.1%} (needs >= "
            f"{INT8_MIN_TOP1:.0%}), perplexity {ppl_int8:.3f} vs fp32 {ppl_fp32:.3f} ({increase:+.1%}, allowed "
            f"+-{INT8_MAX_PPL_INCREASE:.0%}); nothing was written to {out_dir!r}.")
    return result


def export_graph(model, graph, directory, opset=DEFAULT_OPSET, backend=None):
    """Write `graph` (a `graphs.OnnxGraph` of `model`) to `directory`/model.onnx with the model's config (and
    generation config), through optimum's exporter or `torch.onnx.export` (see `onnx_backend`)."""
    if (backend or onnx_backend()) == "optimum":
        from optimum.exporters.onnx import onnx_export_from_model

        from .onnx_configs import onnx_config_for

        onnx_config, task = onnx_config_for(graph)
        onnx_export_from_model(model, directory, opset=opset, task=task, monolith=True,
                               custom_onnx_configs={"model": onnx_config}, do_validation=False)
        return
    dummy = graph.dummy_inputs()
    os.makedirs(directory, exist_ok=True)
    with torch.no_grad(), _eager_attention(model), patched_forward(model, graph), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model, tuple(dummy.values()), os.path.join(directory, ONNX_FILE), dynamo=False,
                          input_names=list(graph.inputs), output_names=list(graph.outputs),
                          dynamic_axes={**graph.inputs, **graph.outputs}, opset_version=opset,
                          do_constant_folding=True)
    import onnx

    path = os.path.join(directory, ONNX_FILE)
    onnx.save(share_transposed_tables(onnx.load(path)), path)
    model.config.save_pretrained(directory)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def share_transposed_tables(onnx_model):
    """The TorchScript exporter writes a tied output head (lm_head = wte) twice: the embedding table for its Gather,
    and the table's transpose, constant-folded into a second initializer, for the head's MatMul. As optimum's
    exporter does, keep the Gather's table and feed the MatMul a Transpose of it, so the file holds the vocabulary
    once (ONNX Runtime folds the Transpose when it loads the graph)."""
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    used_elsewhere = {name for node in graph.node if node.op_type != "Gather" for name in node.input}
    tables = [init for init in graph.initializer if len(init.dims) == 2 and init.name not in used_elsewhere
              and any(node.op_type == "Gather" and node.input[0] == init.name for node in graph.node)]
    for table in tables:
        values = numpy_helper.to_array(table)
        for copy in [init for init in graph.initializer if list(init.dims) == list(table.dims)[::-1]
                     and init.data_type == table.data_type]:
            if not np.array_equal(values.T, numpy_helper.to_array(copy)):
                continue
            transposed = f"{table.name}_transposed"
            first = next(i for i, node in enumerate(graph.node) if copy.name in node.input)
            graph.node.insert(first, helper.make_node("Transpose", [table.name], [transposed], name=transposed))
            for node in graph.node:
                node.input[:] = [transposed if name == copy.name else name for name in node.input]
            graph.initializer.remove(copy)
    return onnx_model


@contextlib.contextmanager
def _eager_attention(model):
    """Trace the models' own eager attention (the same MatMul/Softmax graph the exporter writes for SDPA):
    transformers 5's SDPA wrapper reshapes by a query length that TorchScript tracing freezes to the traced one."""
    saved = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        yield
    finally:
        model.config._attn_implementation = saved


def _export_one(model, directory, opset, backend):
    """AgencyGPT2 (decoder with past), ThoughtDiffusion (denoising step): one graph."""
    export_graph(model, GRAPHS[model.config.model_type](model.config), directory, opset, backend)


def _export_armt(model, directory, opset, backend):
    """UnifiedARMT: the append-only and the committing segment step, merged into one graph with an `If` on the
    `commit` input (`merge_branches`)."""
    import onnx

    from .graphs import UnifiedARMTGraph

    parts = {}
    for commit in (False, True):
        parts[commit] = os.path.join(directory, f"_step_commit_{commit}")
        export_graph(model, UnifiedARMTGraph(model.config, commit=commit), parts[commit], opset, backend)
    merged = merge_branches(onnx.load(os.path.join(parts[False], ONNX_FILE)),
                            onnx.load(os.path.join(parts[True], ONNX_FILE)), COMMIT_INPUT,
                            graph_name="unified_armt_segment_step")
    onnx.checker.check_model(merged)
    onnx.save(merged, os.path.join(directory, ONNX_FILE))
    for name in os.listdir(parts[True]):
        if name != ONNX_FILE:
            shutil.copy(os.path.join(parts[True], name), directory)
    for part in parts.values():
        shutil.rmtree(part)


def merge_branches(else_model, then_model, flag: str, graph_name: str = "merged"):
    """One ONNX model running `then_model` where the boolean input `flag` (shape [1]) is true and `else_model` where
    it is false (an `If` node; the mechanism of optimum's merged decoders). Both have the same inputs and outputs.
    Weights equal in content are stored once, in the outer graph; scalars and 1-D int shapes stay in their branch
    (as optimum's `merge_decoders` does: ONNX Runtime's optimizer needs them there)."""
    import onnx

    shared, used = {}, {}
    branches = []
    for name, model in (("else", else_model), ("then", then_model)):
        local, rename = [], {}
        for init in model.graph.initializer:
            if len(init.dims) == 0 or (len(init.dims) == 1 and init.data_type in (onnx.TensorProto.INT32,
                                                                                  onnx.TensorProto.INT64)):
                local.append(init)
                continue
            array = onnx.numpy_helper.to_array(init)
            key = (init.data_type, tuple(init.dims), hashlib.sha256(array.tobytes()).hexdigest())
            if key not in shared:
                used[init.name] = used.get(init.name, -1) + 1
                shared[key] = onnx.numpy_helper.from_array(array, f"{init.name}_{graph_name}_{used[init.name]}")
            rename[init.name] = shared[key].name
        for node in model.graph.node:
            node.input[:] = [rename.get(i, i) for i in node.input]
        branches.append(onnx.helper.make_graph(list(model.graph.node), name, [], list(model.graph.output), local))
    else_branch, then_branch = branches
    outputs = [output.name for output in else_model.graph.output]
    node = onnx.helper.make_node("If", [flag], outputs, name=f"{graph_name}_if", then_branch=then_branch,
                                 else_branch=else_branch)
    flag_input = onnx.helper.make_tensor_value_info(flag, onnx.TensorProto.BOOL, [1])
    graph = onnx.helper.make_graph([node], graph_name, [*else_model.graph.input, flag_input],
                                   list(else_model.graph.output), list(shared.values()))
    return onnx.helper.make_model(graph, producer_name="armada", opset_imports=list(else_model.opset_import),
                                  ir_version=else_model.ir_version)


def _copy_tokenizer(source, target):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        path = os.path.join(source, name)
        if os.path.isfile(path) and not os.path.exists(os.path.join(target, name)):
            shutil.copy(path, target)


_FALLBACK_TEXT = (
    "The European lobster is a species of clawed lobster from the eastern Atlantic Ocean, the Mediterranean Sea and "
    "parts of the Black Sea. It is closely related to the American lobster. It may grow to a length of sixty "
    "centimetres and a mass of six kilograms, and bears a conspicuous pair of claws. In life the lobsters are blue, "
    "only becoming lobster red on cooking. Mating occurs in the summer, producing eggs which are carried by the "
    "females for up to a year before hatching into larvae. "
)


# model_type -> how it is loaded, exported, checked and served (on either backend). A new architecture adds a graph
# in graphs.py (and its OnnxConfig in onnx_configs.py), a row here and an ORT class in armada/onnxruntime.py.
EXPORTERS = {
    "agency_gpt2": {"auto_class": "AutoModelForCausalLM", "export": _export_one,
                    "parity_fp32": _agency_parity_fp32, "text_scores": _causal_scores,
                    "ort_class": "ORTAgencyGPT2ForCausalLM"},
    "unified_armt": {"auto_class": "AutoModelForCausalLM", "export": _export_armt,
                     "parity_fp32": _armt_parity_fp32, "text_scores": _causal_scores,
                     "ort_class": "ORTUnifiedARMTForCausalLM"},
    "thought_diffusion": {"auto_class": "AutoModelForMaskedLM", "export": _export_one,
                          "parity_fp32": _diffusion_parity_fp32, "text_scores": _diffusion_scores,
                          "ort_class": "ORTThoughtDiffusionForMaskedLM"},
}
