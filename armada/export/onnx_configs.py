"""optimum ONNX export configurations of the armada architectures, registered with optimum's `TasksManager`.

- `AgencyGPT2OnnxConfig`: a GPT-2-style decoder with past key/values (`text-generation-with-past`), inputs
  `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key/value`; outputs `logits` and
  `present.{i}.key/value`. Every layer keeps its own head count, so pruned checkpoints export: the cache of layer i is
  (batch, heads of layer i, past length, head_dim). With baseline fusion the frozen baseline's n_layer cache slots
  follow the model's (slots n_layer..2*n_layer-1), as in the PyTorch cache.
- `UnifiedARMTOnnxConfig`: one segment step (see `UnifiedARMTSegmentStepPatcher`): a piece of the open segment goes
  in with the whole recurrent state, the logits and the new state come out.
- `ThoughtDiffusionOnnxConfig`: one denoising step (see `ThoughtDiffusionDenoiseStepPatcher`): partially masked
  tokens, their noise level, the thought stack and the block cache of the clean prefix go in; SUBS logits, the new
  thought, the pushed stack and the cache extended by this call's keys/values come out.

Importing this module also lets optimum recognize armada's model classes as `transformers` models (optimum infers a
model's library from the module its class lives in, and armada's classes live in `armada.modeling`).
"""

from collections import OrderedDict

import torch
from optimum.exporters.onnx.base import OnnxConfig
from optimum.exporters.onnx.config import TextDecoderWithPositionIdsOnnxConfig
from optimum.exporters.onnx.model_patcher import ModelPatcher
from optimum.exporters.tasks import TasksManager
from optimum.utils import DummyPastKeyValuesGenerator, DummyTextInputGenerator, NormalizedTextConfig

# Opsets the legacy TorchScript exporter (what optimum-onnx uses) can write for these graphs: SDPA needs 14.
MIN_OPSET, MAX_OPSET = 14, 20
DEFAULT_OPSET = 18


# ----------------------------------------------------------------------------------------------------- AgencyGPT2
def agency_cache_heads(config) -> list:
    """Heads in each cache slot of an AgencyGPT2 config: the kept heads of every layer, then (with baseline fusion)
    the unpruned baseline's n_head per layer."""
    heads = [len(config.kept_heads(layer)) for layer in range(config.n_layer)]
    if config.use_baseline_fusion:
        heads += [config.n_head] * config.n_layer
    return heads


class AgencyGPT2DummyPastKeyValuesGenerator(DummyPastKeyValuesGenerator):
    """Dummy past key/values with each layer's own head count (pruned layers keep fewer heads)."""

    def __init__(self, task, normalized_config, **kwargs):
        super().__init__(task, normalized_config, **kwargs)
        self.cache_heads = agency_cache_heads(normalized_config.config)

    def generate(self, input_name, framework="pt", int_dtype="int64", float_dtype="fp32"):
        head_dim = self.hidden_size // self.num_attention_heads
        return [
            tuple(self.random_float_tensor((self.batch_size, heads, self.sequence_length, head_dim),
                                           framework=framework, dtype=float_dtype) for _ in range(2))
            for heads in self.cache_heads
        ]


class AgencyGPT2OnnxConfig(TextDecoderWithPositionIdsOnnxConfig):
    NORMALIZED_CONFIG_CLASS = NormalizedTextConfig.with_args(num_layers="n_layer", num_attention_heads="n_head")
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyTextInputGenerator, AgencyGPT2DummyPastKeyValuesGenerator)
    DUMMY_PKV_GENERATOR_CLASS = AgencyGPT2DummyPastKeyValuesGenerator
    DEFAULT_ONNX_OPSET = DEFAULT_OPSET
    ATOL_FOR_VALIDATION = 1e-4

    def add_past_key_values(self, inputs_or_outputs, direction):
        name, length = (("past_key_values", "past_sequence_length") if direction == "inputs"
                        else ("present", "past_sequence_length + sequence_length"))
        for i in range(len(agency_cache_heads(self._config))):
            inputs_or_outputs[f"{name}.{i}.key"] = {0: "batch_size", 2: length}
            inputs_or_outputs[f"{name}.{i}.value"] = {0: "batch_size", 2: length}


# ----------------------------------------------------------------------------------------------------- UnifiedARMT
def armt_state_names(config, prefix=""):
    """Names of the recurrent-state tensors of a UnifiedARMT segment step, in graph order."""
    n = config.num_hidden_layers
    per_layer = ("memory_A", "memory_z", "segment_keys", "segment_values")
    return [f"{prefix}fill"] + [f"{prefix}{name}.{i}" for name in per_layer for i in range(n)]


def armt_state_shapes(config, batch_size):
    """{state name: shape} of a UnifiedARMT segment step's state (fill is int64, the rest float32)."""
    n, h = config.num_hidden_layers, config.num_memory_heads
    kv = (batch_size, config.num_attention_heads, config.segment_size, config.head_dim)
    shapes = {"fill": (batch_size,)}
    for i in range(n):
        shapes[f"memory_A.{i}"] = (batch_size, h, config.memory_key_dim, config.memory_value_dim)
    for i in range(n):
        shapes[f"memory_z.{i}"] = (batch_size, h, config.memory_key_dim)
    for i in range(n):
        shapes[f"segment_keys.{i}"] = kv
    for i in range(n):
        shapes[f"segment_values.{i}"] = kv
    return shapes


def armt_segment_step(model, input_ids, lengths, fill, memory_A, memory_z, segment_keys, segment_values,
                      commit=True):
    """One step of a UnifiedARMTForCausalLM over a piece of the open segment, with the state as plain tensors.

    input_ids (B, T) with T <= segment_size - fill (the piece never crosses a segment boundary); lengths (B,): real
    tokens of each row in the piece (the rest is padding at its end); fill (B,): tokens already in each row's open
    segment. Returns (logits (B, T, V), new fill, new A's, new z's, new keys, new values). With `commit`, a row
    whose segment the piece fills is committed: its memory tokens write to (A, z) and its segment is closed (fill 0);
    the commit is computed for every row and kept where the segment is full (`torch.where`), so the graph has no
    data-dependent branch. Without `commit` the memory passes through (the step for pieces that close no segment).
    This is the body of `UnifiedARMTModel.forward`'s loop over pieces, for a continued stream.
    """
    from ..modeling.modeling_unified_armt import UnifiedARMTMemoryState, _additive

    base, s = model.transformer, model.config.segment_size
    piece = input_ids.shape[1]
    slots = torch.arange(s, device=input_ids.device)
    positions = (fill.unsqueeze(1) + torch.arange(piece, device=input_ids.device)).clamp_max(s - 1)
    embeds = base.wte(input_ids)
    rotary = base._rotary(positions, embeds.dtype)
    hidden = embeds if rotary is not None else embeds + base.wpe(positions)
    source = (slots - fill.unsqueeze(1)).clamp(0, piece - 1)
    write = (slots >= fill.unsqueeze(1)) & (slots < (fill + lengths).unsqueeze(1))
    mask = _additive((slots.view(1, 1, s) <= positions.unsqueeze(-1)).unsqueeze(1), hidden.dtype)
    keys, values = [], []
    for layer, block in enumerate(base.h):
        hidden, k, v, _ = block(hidden, memory_A[layer], memory_z[layer], segment_keys[layer], segment_values[layer],
                                source, write, mask, rotary=rotary)
        keys.append(k)
        values.append(v)
    logits = model.lm_head(base.ln_f(hidden))
    fill = fill + lengths
    state = UnifiedARMTMemoryState(list(zip(memory_A, memory_z)), keys, values, fill, torch.zeros_like(fill))
    if commit:
        state, _ = base._commit(state, fill == s, False)
    return (logits, state.fill, *[a for a, _ in state.memory], *[z for _, z in state.memory], *state.keys,
            *state.values)


class UnifiedARMTSegmentStepPatcher(ModelPatcher):
    """While exporting, the model's forward is the segment step (`armt_segment_step`) on flat state tensors."""

    def __init__(self, config, model, model_kwargs=None):
        super().__init__(config, model, model_kwargs)

        def segment_step(input_ids, lengths, fill, memory_A, memory_z, segment_keys, segment_values):
            return armt_segment_step(model, input_ids, lengths, fill, memory_A, memory_z, segment_keys,
                                     segment_values, commit=config.commit)

        self.patched_forward = segment_step


class UnifiedARMTOnnxConfig(OnnxConfig):
    """The segment step of UnifiedARMT: `input_ids`, `lengths`, then the state (`fill`, `memory_A.{l}`,
    `memory_z.{l}`, `segment_keys.{l}`, `segment_values.{l}`) in; `logits` and the same state prefixed `present_`
    out. The piece length is dynamic (1 token for generation, up to `segment_size` for a prompt).

    `commit=True` exports the step that also commits full segments, `commit=False` the one that only appends;
    `export_onnx` merges the two into one graph with an ONNX `If` on a boolean `commit` input (optimum's
    `merge_decoders`, the mechanism of its merged decoders), so generating a token does not pay for the memory
    tokens' pass except when it closes a segment.
    """

    NORMALIZED_CONFIG_CLASS = NormalizedTextConfig
    DEFAULT_ONNX_OPSET = DEFAULT_OPSET
    ATOL_FOR_VALIDATION = 1e-4
    _MODEL_PATCHER = UnifiedARMTSegmentStepPatcher

    def __init__(self, config, task="text-generation", commit=True, **kwargs):
        super().__init__(config, task=task, **kwargs)
        self.commit = commit

    @property
    def inputs(self):
        axes = OrderedDict(input_ids={0: "batch_size", 1: "sequence_length"}, lengths={0: "batch_size"})
        for name in armt_state_names(self._config):
            axes[name] = {0: "batch_size"}
        return axes

    @property
    def outputs(self):
        axes = OrderedDict(logits={0: "batch_size", 1: "sequence_length"})
        for name in armt_state_names(self._config, prefix="present_"):
            axes[name] = {0: "batch_size"}
        return axes

    def generate_dummy_inputs(self, framework="pt", **kwargs):
        cfg, batch = self._config, 2
        generator = torch.Generator().manual_seed(0)
        piece = max(2, cfg.segment_size // 2)  # with fill = segment_size - piece the step commits: both paths traced
        dummy = {
            "input_ids": torch.randint(0, cfg.vocab_size, (batch, piece), generator=generator),
            "lengths": torch.full((batch,), piece, dtype=torch.long),
        }
        grouped = {}
        for name, shape in armt_state_shapes(cfg, batch).items():
            if name == "fill":
                dummy["fill"] = torch.tensor([cfg.segment_size - piece, 0], dtype=torch.long)
            else:
                value = torch.rand(shape, generator=generator) * (0.1 if name.startswith("memory") else 1.0)
                grouped.setdefault(name.split(".")[0], []).append(value)
        dummy.update(grouped)
        if framework == "np":  # optimum runs the graph on numpy inputs to fix output shapes it cannot infer
            return {k: [t.numpy() for t in v] if isinstance(v, list) else v.numpy() for k, v in dummy.items()}
        return dummy


# ----------------------------------------------------------------------------------------------------- ThoughtDiffusion
def diffusion_stack_names(config, prefix=""):
    """Names of the thought-stack tensors of a ThoughtDiffusion denoising step (none when the stack is disabled)."""
    if not config.thought_stack_size:
        return []
    return [f"{prefix}thought_buffer", f"{prefix}thought_head", f"{prefix}thought_count"]


def diffusion_cache_names(config, prefix="past_"):
    n = config.num_hidden_layers
    return ([f"{prefix}mask", f"{prefix}tokens"] + [f"{prefix}key.{i}" for i in range(n)]
            + [f"{prefix}value.{i}" for i in range(n)])


def diffusion_denoise_step(model, input_ids, attention_mask, position_ids, block_ids, timesteps, past_mask,
                           past_tokens, past_key, past_value, thought_buffer=None, thought_head=None,
                           thought_count=None):
    """One call of `ThoughtDiffusionForMaskedLM`'s sampler with its state as plain tensors: the prefix cache
    (`past_mask` (B, P) bool, `past_tokens` (B, P) int64, per layer `past_key`/`past_value` (B, n_head, P,
    head_dim); P may be 0) and the thought stack (`thought_buffer` (B, S, *thought_dims), `thought_head`/
    `thought_count` (B,) int64). Returns (SUBS logits (B, T, V), [new thought, buffer, head, count,] present mask
    and tokens (B, P + T), present keys, present values)."""
    from ..modeling.modeling_thought_diffusion import ThoughtDiffusionBlockCache, ThoughtStack

    stack = None if thought_buffer is None else ThoughtStack(thought_buffer, thought_head, thought_count)
    cache = ThoughtDiffusionBlockCache(list(past_key), list(past_value), past_mask, past_tokens)
    out = model.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids, block_ids=block_ids,
                            timesteps=timesteps, thought_stack=stack, past_key_values=cache, use_cache=True,
                            return_dict=True)
    logits = model.subs_logits(out.last_hidden_state, input_ids)
    thought = () if stack is None else (out.new_thought, out.thought_stack.buffer, out.thought_stack.head,
                                        out.thought_stack.count)
    present = out.past_key_values
    return (logits, *thought, present.mask, present.tokens, *present.keys, *present.values)


class ThoughtDiffusionDenoiseStepPatcher(ModelPatcher):
    """While exporting, the model's forward is the denoising step (`diffusion_denoise_step`) on flat tensors."""

    def __init__(self, config, model, model_kwargs=None):
        super().__init__(config, model, model_kwargs)

        def denoise_step(input_ids, attention_mask, position_ids, block_ids, timesteps, past_mask, past_tokens,
                         past_key, past_value, thought_buffer=None, thought_head=None, thought_count=None):
            return diffusion_denoise_step(model, input_ids, attention_mask, position_ids, block_ids, timesteps,
                                          past_mask, past_tokens, past_key, past_value, thought_buffer,
                                          thought_head, thought_count)

        self.patched_forward = denoise_step


class ThoughtDiffusionOnnxConfig(OnnxConfig):
    """The denoising step of ThoughtDiffusion: `input_ids`, `attention_mask`, `position_ids`, `block_ids` (B, T),
    `timesteps` (B,), the prefix cache `past_mask`, `past_tokens` (B, P), `past_key.{l}`, `past_value.{l}` (P may be
    0: no cache) and, with a thought stack, `thought_buffer`, `thought_head`, `thought_count` in; `logits` (SUBS,
    B x T x V), `new_thought`, `present_thought_*`, `present_mask`, `present_tokens` and `present_key/value.{l}`
    (P + T positions) out.
    `armada.onnxruntime.ORTThoughtDiffusionForMaskedLM` runs `generate_with_stack` on it."""

    NORMALIZED_CONFIG_CLASS = NormalizedTextConfig
    DEFAULT_ONNX_OPSET = DEFAULT_OPSET
    ATOL_FOR_VALIDATION = 1e-4
    _MODEL_PATCHER = ThoughtDiffusionDenoiseStepPatcher

    @property
    def inputs(self):
        tokens = {0: "batch_size", 1: "sequence_length"}
        axes = OrderedDict((name, dict(tokens)) for name in ("input_ids", "attention_mask", "position_ids",
                                                             "block_ids"))
        axes["timesteps"] = {0: "batch_size"}
        axes["past_mask"] = {0: "batch_size", 1: "past_sequence_length"}
        axes["past_tokens"] = {0: "batch_size", 1: "past_sequence_length"}
        for name in diffusion_cache_names(self._config)[2:]:
            axes[name] = {0: "batch_size", 2: "past_sequence_length"}
        for name in diffusion_stack_names(self._config):
            axes[name] = {0: "batch_size"}
        return axes

    @property
    def outputs(self):
        axes = OrderedDict(logits={0: "batch_size", 1: "sequence_length"})
        if self._config.thought_stack_size:
            axes["new_thought"] = {0: "batch_size"}
        for name in diffusion_stack_names(self._config, prefix="present_"):
            axes[name] = {0: "batch_size"}
        total = "past_sequence_length + sequence_length"
        axes["present_mask"] = {0: "batch_size", 1: total}
        axes["present_tokens"] = {0: "batch_size", 1: total}
        for name in diffusion_cache_names(self._config, prefix="present_")[2:]:
            axes[name] = {0: "batch_size", 2: total}
        return axes

    def generate_dummy_inputs(self, framework="pt", **kwargs):
        """Two rows, a prefix of 5 cached positions (one row left-padded), 4 new positions with some [MASK], a stack
        holding 3 thoughts in one row and none in the other."""
        cfg, batch, past, length = self._config, 2, 5, 4
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=generator)
        ids[:, 1::2] = cfg.mask_token_id
        past_mask = torch.ones(batch, past, dtype=torch.bool)
        past_mask[1, :2] = False
        positions = torch.arange(past, past + length).expand(batch, -1) - torch.tensor([[0], [2]])
        block = cfg.block_length or 1
        kv = (batch, cfg.num_attention_heads, past, cfg.hidden_size // cfg.num_attention_heads)
        dummy = {
            "input_ids": ids, "attention_mask": torch.ones(batch, length, dtype=torch.long),
            "position_ids": positions, "block_ids": positions // block if cfg.block_length else positions * 0,
            "timesteps": torch.tensor([0.5, 0.9]), "past_mask": past_mask,
            "past_tokens": torch.randint(0, cfg.vocab_size, (batch, past), generator=generator),
            "past_key": [torch.randn(kv, generator=generator) for _ in range(cfg.num_hidden_layers)],
            "past_value": [torch.randn(kv, generator=generator) for _ in range(cfg.num_hidden_layers)],
        }
        if cfg.thought_stack_size:
            size = cfg.thought_stack_size
            dummy["thought_buffer"] = torch.randn(batch, size, *cfg.thought_dims, generator=generator)
            dummy["thought_head"] = torch.tensor([3 % size, 0])
            dummy["thought_count"] = torch.tensor([min(3, size), 0])
        if framework == "np":
            return {k: [t.numpy() for t in v] if isinstance(v, list) else v.numpy() for k, v in dummy.items()}
        return dummy


# ----------------------------------------------------------------------------------------------------- registration
ONNX_CONFIGS = {"agency_gpt2": AgencyGPT2OnnxConfig, "unified_armt": UnifiedARMTOnnxConfig,
                "thought_diffusion": ThoughtDiffusionOnnxConfig}
ONNX_TASKS = {"agency_gpt2": "text-generation-with-past", "unified_armt": "text-generation",
              "thought_diffusion": "fill-mask"}


def _register():
    register = TasksManager.create_register("onnx", overwrite_existing=True)
    register("agency_gpt2", "text-generation", "text-generation-with-past")(AgencyGPT2OnnxConfig)
    register("unified_armt", "text-generation")(UnifiedARMTOnnxConfig)
    register("thought_diffusion", "fill-mask")(ThoughtDiffusionOnnxConfig)

    infer = TasksManager._infer_library_from_model_or_model_class.__func__
    if getattr(infer, "_armada", False):
        return

    def infer_library(cls, model=None, model_class=None):
        target = model_class if model_class is not None else type(model)
        if target is not None and target.__module__.startswith("armada."):
            return "transformers"
        return infer(cls, model=model, model_class=model_class)

    infer_library._armada = True
    TasksManager._infer_library_from_model_or_model_class = classmethod(infer_library)


_register()
