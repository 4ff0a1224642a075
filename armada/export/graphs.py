"""The ONNX graphs of the armada architectures, defined once for every exporter (no optimum import here).

A graph is a step function of the model on plain tensors with its input and output names, dynamic axes and dummy
inputs. `onnx_configs.py` wraps these in optimum `OnnxConfig`s (the optimum backend); `onnx_export.py` hands them to
`torch.onnx.export` directly (the torch backend). Both trace with TorchScript: the same inputs, outputs and
operations.

- `AgencyGPT2Graph`: a GPT-2-style decoder with past key/values: `input_ids`, `past_key_values.{i}.key/value`,
  `attention_mask`, `position_ids` in; `logits` and `present.{i}.key/value` out. Every layer keeps its own head count,
  so pruned checkpoints export: the cache of layer i is (batch, heads of layer i, past length, head_dim). With
  baseline fusion the frozen baseline's n_layer cache slots follow the model's (slots n_layer..2*n_layer-1), as in
  the PyTorch cache.
- `UnifiedARMTGraph`: one segment step (`armt_segment_step`): a piece of the open segment goes in with the whole
  recurrent state, the logits and the new state come out. `commit=True` is the step that also commits full
  segments, `commit=False` the one that only appends; the export merges the two into one graph with an ONNX `If` on
  a boolean `commit` input (`COMMIT_INPUT`).
- `ThoughtDiffusionGraph`: one denoising step (`diffusion_denoise_step`): partially masked tokens, their noise level,
  the thought stack and the block cache of the clean prefix go in; SUBS logits, the new thought, the pushed stack and
  the cache extended by this call's keys/values come out.

Inputs are listed in the order of the step function's parameters; a parameter holding a list of tensors (the past
key/values, the per-layer state) is the group of inputs named `{parameter}.{index}...`.
"""

import inspect
from collections import OrderedDict
from contextlib import contextmanager

import torch

# Opsets the TorchScript exporter (torch.onnx with dynamo=False, which optimum-onnx also uses) writes for these
# graphs: SDPA needs 14.
MIN_OPSET, MAX_OPSET = 14, 20
DEFAULT_OPSET = 18
COMMIT_INPUT = "commit"  # the boolean input of the merged UnifiedARMT step that selects the committing branch


class OnnxGraph:
    """One exported step of a model: `inputs`/`outputs` ({name: {axis: dynamic axis name}}, in graph order),
    `dummy_inputs()` (tensors to trace with, grouped as `step` takes them) and `step(model, ...)`."""

    def __init__(self, config):
        self.config = config

    @property
    def inputs(self) -> OrderedDict:
        raise NotImplementedError

    @property
    def outputs(self) -> OrderedDict:
        raise NotImplementedError

    def dummy_inputs(self) -> OrderedDict:
        raise NotImplementedError

    def step(self, model, *args, **kwargs):
        raise NotImplementedError

    def forward_for(self, model):
        """`step` bound to `model`, with the step's own signature (exporters read the parameter names)."""
        def forward(*args, **kwargs):
            return self.step(model, *args, **kwargs)

        forward.__signature__ = inspect.Signature(list(inspect.signature(self.step).parameters.values())[1:])
        return forward


@contextmanager
def patched_forward(model, graph: OnnxGraph):
    """While exporting, `model.forward` is the graph's step (what optimum's ModelPatcher does)."""
    model.forward = graph.forward_for(model)
    try:
        yield model
    finally:
        del model.forward


def _random(shape, generator, scale=1.0):
    return torch.rand(shape, generator=generator) * scale


# ----------------------------------------------------------------------------------------------------- AgencyGPT2
def agency_cache_heads(config) -> list:
    """Heads in each cache slot of an AgencyGPT2 config: the kept heads of every layer, then (with baseline fusion)
    the unpruned baseline's n_head per layer. (A stock GPT-2 config, the benchmarks' peer: n_head per layer.)"""
    if not hasattr(config, "kept_heads"):
        return [config.n_head] * config.n_layer
    heads = [len(config.kept_heads(layer)) for layer in range(config.n_layer)]
    if config.use_baseline_fusion:
        heads += [config.n_head] * config.n_layer
    return heads


class AgencyGPT2Graph(OnnxGraph):
    """Decoder with past (`text-generation-with-past`), the graph of optimum's decoders with per-slot head counts."""

    def _cache_axes(self, name, length):
        axes = OrderedDict()
        for i in range(len(agency_cache_heads(self.config))):
            axes[f"{name}.{i}.key"] = {0: "batch_size", 2: length}
            axes[f"{name}.{i}.value"] = {0: "batch_size", 2: length}
        return axes

    @property
    def inputs(self):
        axes = OrderedDict(input_ids={0: "batch_size", 1: "sequence_length"})
        axes.update(self._cache_axes("past_key_values", "past_sequence_length"))
        axes["attention_mask"] = {0: "batch_size", 1: "past_sequence_length + sequence_length"}
        axes["position_ids"] = {0: "batch_size", 1: "sequence_length"}
        return axes

    @property
    def outputs(self):
        axes = OrderedDict(logits={0: "batch_size", 1: "sequence_length"})
        axes.update(self._cache_axes("present", "past_sequence_length + sequence_length"))
        return axes

    def dummy_inputs(self):
        cfg, batch, past, length = self.config, 2, 4, 3
        generator = torch.Generator().manual_seed(0)
        head_dim = cfg.n_embd // cfg.n_head
        mask = torch.ones(batch, past + length, dtype=torch.long)
        mask[1, :2] = 0
        return OrderedDict(
            input_ids=torch.randint(0, cfg.vocab_size, (batch, length), generator=generator),
            past_key_values=[tuple(_random((batch, heads, past, head_dim), generator) for _ in range(2))
                             for heads in agency_cache_heads(cfg)],
            attention_mask=mask,
            position_ids=torch.arange(past, past + length).expand(batch, -1),
        )

    def step(self, model, input_ids, past_key_values, attention_mask, position_ids):
        from transformers.cache_utils import DynamicCache

        from ..modeling.modeling_agency_gpt2 import CACHE_FIELD

        cache = DynamicCache()
        for slot, (key, value) in enumerate(past_key_values):
            cache.update(key, value, slot)
        forward = type(model).forward  # the model's own forward (while exporting, `model.forward` is this step)
        out = forward(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, return_dict=True, **{CACHE_FIELD: cache})
        present = out[CACHE_FIELD]
        return (out.logits, *[tensor for layer in present.layers for tensor in (layer.keys, layer.values)])


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


class UnifiedARMTGraph(OnnxGraph):
    """The segment step: `input_ids`, `lengths`, then the state (`fill`, `memory_A.{l}`, `memory_z.{l}`,
    `segment_keys.{l}`, `segment_values.{l}`) in; `logits` and the same state prefixed `present_` out. The piece
    length is dynamic (1 token for generation, up to `segment_size` for a prompt)."""

    def __init__(self, config, commit=True):
        super().__init__(config)
        self.commit = commit

    @property
    def inputs(self):
        axes = OrderedDict(input_ids={0: "batch_size", 1: "sequence_length"}, lengths={0: "batch_size"})
        axes.update((name, {0: "batch_size"}) for name in armt_state_names(self.config))
        return axes

    @property
    def outputs(self):
        axes = OrderedDict(logits={0: "batch_size", 1: "sequence_length"})
        axes.update((name, {0: "batch_size"}) for name in armt_state_names(self.config, prefix="present_"))
        return axes

    def dummy_inputs(self):
        cfg, batch = self.config, 2
        generator = torch.Generator().manual_seed(0)
        piece = max(2, cfg.segment_size // 2)  # with fill = segment_size - piece the step commits: both paths traced
        dummy = OrderedDict(input_ids=torch.randint(0, cfg.vocab_size, (batch, piece), generator=generator),
                            lengths=torch.full((batch,), piece, dtype=torch.long),
                            fill=torch.tensor([cfg.segment_size - piece, 0], dtype=torch.long))
        for name, shape in armt_state_shapes(cfg, batch).items():
            if name != "fill":
                group = name.split(".")[0]
                dummy.setdefault(group, []).append(_random(shape, generator, 0.1 if group.startswith("memory") else 1))
        return dummy

    def step(self, model, input_ids, lengths, fill, memory_A, memory_z, segment_keys, segment_values):
        return armt_segment_step(model, input_ids, lengths, fill, memory_A, memory_z, segment_keys, segment_values,
                                 commit=self.commit)


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


class ThoughtDiffusionGraph(OnnxGraph):
    """The denoising step: `input_ids`, `attention_mask`, `position_ids`, `block_ids` (B, T), `timesteps` (B,), the
    prefix cache `past_mask`, `past_tokens` (B, P), `past_key.{l}`, `past_value.{l}` (P may be 0: no cache) and, with
    a thought stack, `thought_buffer`, `thought_head`, `thought_count` in; `logits` (SUBS, B x T x V),
    `new_thought`, `present_thought_*`, `present_mask`, `present_tokens` and `present_key/value.{l}` (P + T
    positions) out."""

    @property
    def inputs(self):
        axes = OrderedDict((name, {0: "batch_size", 1: "sequence_length"})
                           for name in ("input_ids", "attention_mask", "position_ids", "block_ids"))
        axes["timesteps"] = {0: "batch_size"}
        axes["past_mask"] = {0: "batch_size", 1: "past_sequence_length"}
        axes["past_tokens"] = {0: "batch_size", 1: "past_sequence_length"}
        axes.update((name, {0: "batch_size", 2: "past_sequence_length"})
                    for name in diffusion_cache_names(self.config)[2:])
        axes.update((name, {0: "batch_size"}) for name in diffusion_stack_names(self.config))
        return axes

    @property
    def outputs(self):
        axes = OrderedDict(logits={0: "batch_size", 1: "sequence_length"})
        if self.config.thought_stack_size:
            axes["new_thought"] = {0: "batch_size"}
        axes.update((name, {0: "batch_size"}) for name in diffusion_stack_names(self.config, prefix="present_"))
        total = "past_sequence_length + sequence_length"
        axes["present_mask"] = {0: "batch_size", 1: total}
        axes["present_tokens"] = {0: "batch_size", 1: total}
        axes.update((name, {0: "batch_size", 2: total})
                    for name in diffusion_cache_names(self.config, prefix="present_")[2:])
        return axes

    def dummy_inputs(self):
        """Two rows, a prefix of 5 cached positions (one row left-padded), 4 new positions with some [MASK], a stack
        holding 3 thoughts in one row and none in the other."""
        cfg, batch, past, length = self.config, 2, 5, 4
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=generator)
        ids[:, 1::2] = cfg.mask_token_id
        past_mask = torch.ones(batch, past, dtype=torch.bool)
        past_mask[1, :2] = False
        positions = torch.arange(past, past + length).expand(batch, -1) - torch.tensor([[0], [2]])
        block = cfg.block_length or 1
        kv = (batch, cfg.num_attention_heads, past, cfg.hidden_size // cfg.num_attention_heads)
        dummy = OrderedDict(
            input_ids=ids, attention_mask=torch.ones(batch, length, dtype=torch.long), position_ids=positions,
            block_ids=positions // block if cfg.block_length else positions * 0, timesteps=torch.tensor([0.5, 0.9]),
            past_mask=past_mask, past_tokens=torch.randint(0, cfg.vocab_size, (batch, past), generator=generator),
            past_key=[torch.randn(kv, generator=generator) for _ in range(cfg.num_hidden_layers)],
            past_value=[torch.randn(kv, generator=generator) for _ in range(cfg.num_hidden_layers)],
        )
        if cfg.thought_stack_size:
            size = cfg.thought_stack_size
            dummy["thought_buffer"] = torch.randn(batch, size, *cfg.thought_dims, generator=generator)
            dummy["thought_head"] = torch.tensor([3 % size, 0])
            dummy["thought_count"] = torch.tensor([min(3, size), 0])
        return dummy

    def step(self, model, input_ids, attention_mask, position_ids, block_ids, timesteps, past_mask, past_tokens,
             past_key, past_value, thought_buffer=None, thought_head=None, thought_count=None):
        return diffusion_denoise_step(model, input_ids, attention_mask, position_ids, block_ids, timesteps, past_mask,
                                      past_tokens, past_key, past_value, thought_buffer, thought_head, thought_count)


# model_type -> its graph class
GRAPHS = {"agency_gpt2": AgencyGPT2Graph, "unified_armt": UnifiedARMTGraph, "thought_diffusion": ThoughtDiffusionGraph}
