"""ONNX Runtime inference for exported armada models (`armada.export.export_onnx`), built on optimum.onnxruntime.

    >>> from armada.onnxruntime import ORTAgencyGPT2ForCausalLM, ORTUnifiedARMTForCausalLM
    >>> model = ORTAgencyGPT2ForCausalLM.from_pretrained("out/agency_onnx", file_name="model_quantized.onnx")
    >>> model.generate(input_ids, max_new_tokens=32)

- `ORTAgencyGPT2ForCausalLM`: `ORTModelForCausalLM` (which already loads an unpruned AgencyGPT2 export) taught
  that every layer's cache has its own head count, so physically pruned checkpoints generate too.
- `ORTUnifiedARMTForCausalLM`: streams input of any length through the exported segment step, carrying the
  associative memory and the open segment's cache between calls, and generates across segment boundaries with
  `GenerationMixin.generate` (greedy decoding and sampling, as the PyTorch model).
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from optimum.onnxruntime import ORTModel, ORTModelForCausalLM
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin
from transformers.modeling_outputs import ModelOutput

import armada  # noqa: F401  (registers the configurations with AutoConfig)
from armada import UnifiedARMTForCausalLM

from .export.onnx_configs import armt_state_names, armt_state_shapes


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
        return super().generate(*args, generation_config=generation_config, **kwargs)


__all__ = ["ORTAgencyGPT2ForCausalLM", "ORTUnifiedARMTForCausalLM", "ORTUnifiedARMTState"]
