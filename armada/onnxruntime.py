"""ONNX Runtime inference for exported armada models (`armada.export.export_onnx`), built on optimum.onnxruntime.

    >>> from armada.onnxruntime import ORTAgencyGPT2ForCausalLM, ORTUnifiedARMTForCausalLM
    >>> model = ORTAgencyGPT2ForCausalLM.from_pretrained("out/agency_onnx", file_name="model_quantized.onnx")
    >>> model.generate(input_ids, max_new_tokens=32)

- `ORTAgencyGPT2ForCausalLM`: `ORTModelForCausalLM` (which already loads an unpruned AgencyGPT2 export) taught
  that every layer's cache has its own head count, so physically pruned checkpoints generate too.
- `ORTUnifiedARMTForCausalLM`: streams input of any length through the exported segment step, carrying the
  associative memory and the open segment's cache between calls, and generates across segment boundaries with
  `GenerationMixin.generate` (greedy decoding and sampling, as the PyTorch model).
- `ORTThoughtDiffusionForMaskedLM`: the exported denoising step driven by `ThoughtDiffusionForMaskedLM`'s own sampler
  (`generate_with_stack`, `generate`: blocks, remasking, threshold decoding, the block KV cache, the thought stack),
  so the two give the same tokens.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from armada.compat import require_onnx_export

require_onnx_export()  # one clear line instead of optimum's ModuleNotFoundError

from optimum.onnxruntime import ORTModel, ORTModelForCausalLM  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, GenerationConfig, GenerationMixin  # noqa: E402
from transformers.modeling_outputs import ModelOutput  # noqa: E402

import armada  # noqa: E402,F401  (registers the configurations with AutoConfig)
from armada import ThoughtDiffusionForMaskedLM, UnifiedARMTForCausalLM  # noqa: E402
from armada.modeling.modeling_thought_diffusion import (  # noqa: E402
    ThoughtDiffusionBlockCache,
    ThoughtDiffusionMaskedLMOutput,
    ThoughtDiffusionModel,
    ThoughtStack,
)

from .export.onnx_configs import (  # noqa: E402
    armt_state_names,
    armt_state_shapes,
    diffusion_cache_names,
    diffusion_stack_names,
)


@contextmanager
def torch_threads(count: int = 1):
    """Run the block with `torch.set_num_threads(count)` (process-wide), then restore the previous count.

    The armada ORT classes generate under `torch_threads(1)`: between two ONNX Runtime calls the generation loop
    runs only tiny torch ops (a token, a mask, a stopping check), and with torch's own thread pool those ops wait for
    cores that ONNX Runtime's intra-op threads are still spinning on. Measured on 2 cores (AgencyGPT2 124M int8,
    64 greedy tokens, benchmarks/ort_threads.py): 39.9 tokens/s with torch's 2 threads, 74.9 with 1.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class ORTAgencyGPT2ForCausalLM(ORTModelForCausalLM):
    """`ORTModelForCausalLM` for AgencyGPT2 exports whose layers keep different numbers of heads (pruned).

    ORT's class builds the first step's empty cache with `config.num_attention_heads` heads in every layer; here each
    layer's count is read from the ONNX graph's declared input shapes. IO binding, which also assumes one head count,
    is turned off for such graphs.
    """

    def __init__(self, *args, use_io_binding=None, **kwargs):
        super().__init__(*args, use_io_binding=use_io_binding, **kwargs)
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.cache_heads = [shapes[name][1] for name in self.key_value_input_names]
        if any(not isinstance(h, int) for h in self.cache_heads):
            raise ValueError(f"The ONNX graph's past_key_values inputs must declare their head counts; got "
                             f"{self.cache_heads}.")
        # A pruned graph may keep the same count in every layer, but fewer than config.num_attention_heads.
        self.own_empty_cache = any(h != self.config.num_attention_heads for h in self.cache_heads)
        if self.own_empty_cache and self.use_io_binding:
            self.use_io_binding = False

    def generate(self, *args, **kwargs):
        with torch_threads(1):
            return super().generate(*args, **kwargs)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, position_ids=None, use_cache=None,
                **kwargs):
        if past_key_values is None and self.key_value_input_names and self.own_empty_cache:
            batch, head_dim = input_ids.shape[0], self.embed_size_per_head
            zeros = [torch.zeros(batch, heads, 0, head_dim, dtype=self.dtype) for heads in self.cache_heads]
            if not isinstance(input_ids, torch.Tensor):
                zeros = [z.numpy() for z in zeros]
            past_key_values = tuple(tuple(zeros[i:i + 2]) for i in range(0, len(zeros), 2))
        return super().forward(input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                               position_ids=position_ids, use_cache=use_cache, **kwargs)


# ----------------------------------------------------------------------------------------------------- UnifiedARMT
@dataclass
class ORTUnifiedARMTState:
    """The recurrent state of an exported UnifiedARMT: {name: numpy array} for `fill` and, per layer, `memory_A`,
    `memory_z`, `segment_keys`, `segment_values` (the names of the segment step's inputs)."""

    tensors: dict

    @property
    def batch_size(self):
        return self.tensors["fill"].shape[0]

    @property
    def fill(self):
        return self.tensors["fill"]

    @classmethod
    def empty(cls, config, batch_size):
        return cls({name: np.zeros(shape, dtype=np.int64 if name == "fill" else np.float32)
                    for name, shape in armt_state_shapes(config, batch_size).items()})

    def index_select(self, index):
        index = np.asarray(index)
        return ORTUnifiedARMTState({k: v[index] for k, v in self.tensors.items()})


@dataclass
class ORTUnifiedARMTOutput(ModelOutput):
    logits: Optional[torch.FloatTensor] = None
    memory_state: Optional[ORTUnifiedARMTState] = None


class ORTUnifiedARMTForCausalLM(ORTModel, GenerationMixin):
    """UnifiedARMT on ONNX Runtime: the exported segment step driven over segments, as `UnifiedARMTForCausalLM`.

    `forward(input_ids, attention_mask=None, memory_state=None)` cuts the input into pieces that never cross a segment
    boundary (rows are packed left by `attention_mask`, as the PyTorch model does), runs the step on each and returns
    the logits of the real tokens in their original places, plus the state to continue from.
    """

    auto_model_class = AutoModelForCausalLM
    main_input_name = "input_ids"
    _supports_cache_class = False
    _is_stateful = True

    def __init__(self, *, config=None, session=None, use_io_binding=None, generation_config=None,
                 model_save_dir=None):
        super().__init__(config=config, session=session, use_io_binding=False, model_save_dir=model_save_dir)
        expected = ["input_ids", "lengths", *armt_state_names(config), "commit"]
        if self.input_names and list(self.input_names) != expected:
            raise ValueError(f"{session._model_path} is not a UnifiedARMT segment step exported by armada: its inputs "
                             f"are {list(self.input_names)[:4]}..., expected {expected[:4]}...")
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)
        self.state_names = armt_state_names(config)

    def can_generate(self):
        return True

    def _prepare_cache_for_generation(self, *args, **kwargs):
        return

    def step(self, input_ids: np.ndarray, lengths: np.ndarray, state: ORTUnifiedARMTState):
        """One run of the graph on a piece that does not cross a segment boundary. Returns (logits, new state).
        The graph's committing branch runs only when the piece fills some row's segment."""
        commit = np.array([bool(((state.fill + lengths) == self.config.segment_size).any())])
        feed = {"input_ids": input_ids.astype(np.int64), "lengths": lengths.astype(np.int64), **state.tensors,
                "commit": commit}
        outputs = self.session.run(None, feed)
        return outputs[0], ORTUnifiedARMTState(dict(zip(self.state_names, outputs[1:])))

    def forward(self, input_ids=None, attention_mask=None, memory_state=None, use_cache=True, **kwargs):
        use_torch = isinstance(input_ids, torch.Tensor)
        ids = input_ids.cpu().numpy() if use_torch else np.asarray(input_ids)
        batch, length = ids.shape
        if length == 0:
            raise ValueError("the input has no tokens (sequence length 0)")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={self.config.vocab_size}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        state = memory_state or ORTUnifiedARMTState.empty(self.config, batch)
        if state.batch_size != batch:
            raise ValueError(f"memory_state holds {state.batch_size} rows but the input has {batch}")

        # Pack each row's real tokens to the left (as UnifiedARMTModel._pack), then cut pieces that end where the
        # fullest row's open segment does.
        order = None
        lengths = np.full(batch, length, dtype=np.int64)
        if attention_mask is not None:
            mask = (attention_mask.cpu().numpy() if isinstance(attention_mask, torch.Tensor)
                    else np.asarray(attention_mask)).astype(bool)
            order = np.argsort(~mask, axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=1)
            lengths = mask.sum(axis=1)
        s, start, pieces = self.config.segment_size, 0, []
        fill = state.fill.copy()
        while start < length:
            end = min(length, start + int((s - fill).min()))
            real = np.clip(lengths - start, 0, end - start)
            logits, state = self.step(ids[:, start:end], real, state)
            pieces.append(logits)
            fill = state.fill.copy()
            start = end
        logits = np.concatenate(pieces, axis=1)
        if order is not None:
            logits = np.take_along_axis(logits, np.argsort(order, axis=1)[:, :, None], axis=1)
        if use_torch:
            logits = torch.from_numpy(logits)
        return ORTUnifiedARMTOutput(logits=logits, memory_state=state if use_cache else None)

    # ------------------------------------------------------------------ generation: the PyTorch model's own hooks
    # (after the prompt only the new token is fed; the state object is `memory_state`, not a Cache)
    prepare_inputs_for_generation = UnifiedARMTForCausalLM.prepare_inputs_for_generation
    _update_model_kwargs_for_generation = UnifiedARMTForCausalLM._update_model_kwargs_for_generation

    def generate(self, *args, generation_config=None, **kwargs):
        num_beams = kwargs.get("num_beams") or getattr(generation_config or self.generation_config, "num_beams", 1)
        if num_beams and num_beams > 1:
            raise NotImplementedError(f"UnifiedARMT supports greedy decoding and sampling (num_beams=1), got "
                                      f"num_beams={num_beams}")
        with torch_threads(1):
            return super().generate(*args, generation_config=generation_config, **kwargs)


# ----------------------------------------------------------------------------------------------------- ThoughtDiffusion
def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class ORTThoughtDiffusionForMaskedLM(ORTModel):
    """ThoughtDiffusion on ONNX Runtime: `forward` runs the exported denoising step (tokens, t, thought stack, block
    cache -> SUBS logits, new thought, pushed stack, extended cache); `generate_with_stack` and `generate` are
    `ThoughtDiffusionForMaskedLM`'s, with its one model call (`_denoise_step`) going to the graph. Stack and cache
    are the PyTorch classes (`ThoughtStack`, `ThoughtDiffusionBlockCache`) holding CPU tensors."""

    auto_model_class = AutoModelForMaskedLM
    main_input_name = "input_ids"

    def __init__(self, *, config=None, session=None, use_io_binding=None, generation_config=None,
                 model_save_dir=None):
        super().__init__(config=config, session=session, use_io_binding=False, model_save_dir=model_save_dir)
        self.stack_names = diffusion_stack_names(config)
        self.cache_names = diffusion_cache_names(config)
        expected = ["input_ids", "attention_mask", "position_ids", "block_ids", "timesteps", *self.cache_names,
                    *self.stack_names]
        if self.input_names and list(self.input_names) != expected:
            raise ValueError(f"{session._model_path} is not a ThoughtDiffusion denoising step exported by armada: its "
                             f"inputs are {list(self.input_names)[:6]}..., expected {expected[:6]}...")
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)

    def can_generate(self):
        return True

    def _empty_cache(self, batch):
        cfg = self.config
        shape = (batch, cfg.num_attention_heads, 0, cfg.hidden_size // cfg.num_attention_heads)
        layers = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
        return ThoughtDiffusionBlockCache(layers, list(layers), torch.zeros(batch, 0, dtype=torch.bool),
                                          torch.zeros(batch, 0, dtype=torch.long))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, block_ids=None, timesteps=None,
                thought_stack=None, past_key_values=None, use_cache=None, **kwargs):
        """As `ThoughtDiffusionForMaskedLM.forward` without labels: one denoising call. Defaults as there
        (positions counting real tokens, blocks of config.block_length, t from the fraction of [MASK], an empty
        stack, no cache)."""
        cfg = self.config
        ids = torch.as_tensor(input_ids)
        batch, length = ids.shape
        if length == 0:
            raise ValueError("the input has no tokens (sequence length 0)")
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long()
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected {tuple(ids.shape)}")
        # the PyTorch model's defaults (its methods read only the config)
        if position_ids is None:
            position_ids = ThoughtDiffusionModel.default_positions(self, ids, mask)
        if block_ids is None:
            block_ids = ThoughtDiffusionModel.default_blocks(self, torch.as_tensor(position_ids))
        if timesteps is None:
            timesteps = ThoughtDiffusionModel.estimate_timesteps(self, ids, mask)
        cache = past_key_values if past_key_values is not None else self._empty_cache(batch)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "block_ids": block_ids,
                "timesteps": torch.as_tensor(timesteps, dtype=torch.float32).expand(batch),
                "past_mask": cache.mask.bool(), "past_tokens": cache.tokens.long(),
                **{f"past_key.{i}": k for i, k in enumerate(cache.keys)},
                **{f"past_value.{i}": v for i, v in enumerate(cache.values)}}
        if self.stack_names:
            stack = thought_stack if thought_stack is not None else ThoughtStack.empty(cfg, batch)
            feed.update(thought_buffer=stack.buffer.float(), thought_head=stack.head, thought_count=stack.count)
        feed = {name: _numpy(value) for name, value in feed.items()}
        feed["input_ids"], feed["position_ids"], feed["block_ids"] = (
            feed[name].astype(np.int64) for name in ("input_ids", "position_ids", "block_ids"))
        feed["attention_mask"] = feed["attention_mask"].astype(np.int64)
        out = dict(zip(self.output_names, (torch.from_numpy(o) for o in self.session.run(None, feed))))
        n = cfg.num_hidden_layers
        stack = new_thought = None
        if self.stack_names:
            new_thought = out["new_thought"]
            stack = ThoughtStack(out["present_thought_buffer"], out["present_thought_head"],
                                 out["present_thought_count"])
        present = ThoughtDiffusionBlockCache([out[f"present_key.{i}"] for i in range(n)],
                                             [out[f"present_value.{i}"] for i in range(n)], out["present_mask"],
                                             out["present_tokens"])
        return ThoughtDiffusionMaskedLMOutput(logits=out["logits"], new_thought=new_thought, thought_stack=stack,
                                              past_key_values=present if use_cache else None)

    def _denoise_step(self, input_ids, attention_mask, position_ids, block_ids, timesteps, thought_stack,
                      past_key_values, use_cache, keep):
        out = self.forward(input_ids, attention_mask, position_ids, block_ids, timesteps, thought_stack,
                           past_key_values, use_cache=use_cache)
        return out.logits[:, keep], out.thought_stack, out.past_key_values

    # ------------------------------------------------------------------ sampling: the PyTorch model's own code
    def generate_with_stack(self, *args, **kwargs):
        """`ThoughtDiffusionForMaskedLM.generate_with_stack` with its model calls on ONNX Runtime."""
        with torch_threads(1):
            return ThoughtDiffusionForMaskedLM.generate_with_stack(self, *args, **kwargs)

    generate = ThoughtDiffusionForMaskedLM.generate
    _check_sampling = ThoughtDiffusionForMaskedLM._check_sampling
    _propose = staticmethod(ThoughtDiffusionForMaskedLM._propose)
    _select = ThoughtDiffusionForMaskedLM._select


__all__ = ["ORTAgencyGPT2ForCausalLM", "ORTUnifiedARMTForCausalLM", "ORTUnifiedARMTState",
           "ORTThoughtDiffusionForMaskedLM", "torch_threads"]
