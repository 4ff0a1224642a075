"""ONNX Runtime inference for exported armada models (`armada.export.export_onnx`), with onnxruntime alone.

    >>> from armada.onnxruntime import ORTAgencyGPT2ForCausalLM, ORTUnifiedARMTForCausalLM
    >>> model = ORTAgencyGPT2ForCausalLM.from_pretrained("out/agency_onnx", file_name="model_quantized.onnx")
    >>> model.generate(input_ids, max_new_tokens=32)

- `ORTAgencyGPT2ForCausalLM`: the exported decoder with past key/values under `GenerationMixin.generate` (greedy,
  sampling, beam search); every layer's cache keeps its own head count, so physically pruned checkpoints generate
  too. (Where optimum is installed, its `ORTModelForCausalLM` also loads an unpruned export.)
- `ORTUnifiedARMTForCausalLM`: streams input of any length through the exported segment step, carrying the
  associative memory and the open segment's cache between calls, and generates across segment boundaries with
  `GenerationMixin.generate` (greedy decoding and sampling, as the PyTorch model).
- `ORTThoughtDiffusionForMaskedLM`: the exported denoising step driven by `ThoughtDiffusionForMaskedLM`'s own sampler
  (`generate_with_stack`, `generate`: blocks, remasking, threshold decoding, the block KV cache, the thought stack),
  so the two give the same tokens.

All three derive from `ORTModel` (an `onnxruntime.InferenceSession` with the model's config; no optimum needed).
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from armada.compat import require_onnx_export

require_onnx_export()  # one clear line instead of a ModuleNotFoundError

import onnxruntime  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    GenerationConfig,
    GenerationMixin,
)
from transformers.modeling_outputs import ModelOutput  # noqa: E402

import armada  # noqa: E402,F401  (registers the configurations with AutoConfig)
from armada import ThoughtDiffusionForMaskedLM, UnifiedARMTForCausalLM  # noqa: E402
from armada.modeling.modeling_agency_gpt2 import CACHE_FIELD, _left_align_right_padding  # noqa: E402
from armada.modeling.modeling_thought_diffusion import (  # noqa: E402
    ThoughtDiffusionBlockCache,
    ThoughtDiffusionMaskedLMOutput,
    ThoughtDiffusionModel,
    ThoughtStack,
)

from .export.graphs import (  # noqa: E402
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


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class ORTModel:
    """An exported armada graph on ONNX Runtime: `session` (an `onnxruntime.InferenceSession`), `config` and
    `generation_config` of the model, and the graph's `input_names`/`output_names` ({name: index}) and
    `input_shapes`/`output_shapes`. Runs on the CPU in float32 (`device`, `dtype`)."""

    auto_model_class = None
    main_input_name = "input_ids"
    _supports_cache_class = False
    _is_stateful = False
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, *, config=None, session=None, use_io_binding=None, generation_config=None,
                 model_save_dir=None):
        self.config, self.session = config, session
        self.path = Path(session._model_path)
        self.model_save_dir = model_save_dir
        self.use_io_binding = False
        self.input_names = {spec.name: i for i, spec in enumerate(session.get_inputs())}
        self.output_names = {spec.name: i for i, spec in enumerate(session.get_outputs())}
        self.input_shapes = {spec.name: spec.shape for spec in session.get_inputs()}
        self.output_shapes = {spec.name: spec.shape for spec in session.get_outputs()}
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)

    @classmethod
    def from_pretrained(cls, model_id, file_name: str = "model.onnx", subfolder: str = "", config=None,
                        session_options: Optional[onnxruntime.SessionOptions] = None,
                        provider: str = "CPUExecutionProvider", provider_options: Optional[dict] = None,
                        use_io_binding=None, **hub_kwargs):
        """Load `file_name` of an export folder (`export_onnx`'s output), or of a Hub repository holding one."""
        directory = os.path.join(os.fspath(model_id), subfolder)
        if not os.path.isdir(directory):
            from huggingface_hub import snapshot_download

            directory = os.path.join(snapshot_download(os.fspath(model_id), allow_patterns=[
                os.path.join(subfolder, pattern) for pattern in (file_name, f"{file_name}_data", "*.json", "*.txt")
            ], **hub_kwargs), subfolder)
        path = os.path.join(directory, file_name)
        if not os.path.isfile(path):
            raise ValueError(f"{directory!r} has no {file_name!r}; expected a folder written by armada.export.")
        config = config or AutoConfig.from_pretrained(directory, trust_remote_code=False)
        generation_config = None
        if os.path.isfile(os.path.join(directory, "generation_config.json")):
            generation_config = GenerationConfig.from_pretrained(directory)
        session = onnxruntime.InferenceSession(path, sess_options=session_options, providers=[provider],
                                               provider_options=[provider_options] if provider_options else None)
        return cls(config=config, session=session, use_io_binding=use_io_binding,
                   generation_config=generation_config, model_save_dir=directory)

    def can_generate(self):
        return True

    def _prepare_cache_for_generation(self, *args, **kwargs):
        return  # the state lives in model_kwargs as the graph's own tensors, not as a transformers Cache

    @contextmanager
    def _optimize_model_for_decode(self):
        yield  # transformers 5 switches PyTorch MoE kernels here; an ONNX graph has none

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def run(self, feed: dict) -> dict:
        """The session on `feed` ({input name: array or tensor}; names the graph lacks are left out), as
        {output name: numpy array}."""
        feed = {name: _numpy(value) for name, value in feed.items() if name in self.input_names}
        return dict(zip(self.output_names, self.session.run(None, feed)))


# ----------------------------------------------------------------------------------------------------- AgencyGPT2
@dataclass
class ORTCausalLMOutput(ModelOutput):
    logits: Optional[torch.FloatTensor] = None
    past_key_values: Optional[tuple] = None  # ((key, value) per cache slot)


class ORTAgencyGPT2ForCausalLM(ORTModel, GenerationMixin):
    """AgencyGPT2 exported as a decoder with past key/values (`export_onnx`), on ONNX Runtime.

    Every cache slot's head count is read from the graph's declared input shapes (`cache_heads`, one per
    `key_value_input_names` entry), so layers pruned to different head counts generate too. `forward` takes and
    returns the cache as a tuple of (key, value) per slot; prompts padded on either side generate as in
    `AgencyGPT2ForCausalLM.generate` (right padding is moved to the left first).
    """

    auto_model_class = AutoModelForCausalLM

    def __init__(self, *, config=None, session=None, use_io_binding=None, generation_config=None,
                 model_save_dir=None):
        super().__init__(config=config, session=session, generation_config=generation_config,
                         model_save_dir=model_save_dir)
        self.key_value_input_names = [name for name in self.input_names if name.startswith("past_key_values.")]
        self.key_value_output_names = [name for name in self.output_names if name.startswith("present.")]
        self.can_use_cache = bool(self.key_value_input_names and self.key_value_output_names)
        self.cache_heads = [self.input_shapes[name][1] for name in self.key_value_input_names]
        if any(not isinstance(h, int) for h in self.cache_heads):
            raise ValueError(f"The ONNX graph's past_key_values inputs must declare their head counts; got "
                             f"{self.cache_heads}.")
        self.embed_size_per_head = config.n_embd // config.n_head

    def _empty_cache(self, batch):
        return tuple(
            tuple(torch.zeros(batch, heads, 0, self.embed_size_per_head) for _ in range(2))
            for heads in self.cache_heads[::2]
        )

    def forward(self, input_ids, attention_mask=None, past_key_values=None, position_ids=None, use_cache=None,
                **kwargs):
        """Logits of `input_ids` after the cached `past_key_values` (((key, value) per slot) or None), and the cache
        extended by them. Positions default to counting on from the cache, the mask to all ones."""
        use_torch = isinstance(input_ids, torch.Tensor)
        ids = torch.as_tensor(input_ids)
        batch, length = ids.shape
        past = past_key_values if past_key_values is not None else self._empty_cache(batch)
        past_length = past[0][1].shape[-2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length).expand(batch, -1)
        feed = {"input_ids": ids, "attention_mask": torch.as_tensor(attention_mask).long(),
                "position_ids": torch.as_tensor(position_ids).long(),
                **dict(zip(self.key_value_input_names, (t for pair in past for t in pair)))}
        out = self.run(feed)
        convert = torch.from_numpy if use_torch else (lambda array: array)
        present = [convert(out[name]) for name in self.key_value_output_names]
        return ORTCausalLMOutput(
            logits=convert(out["logits"]),
            past_key_values=tuple(zip(present[::2], present[1::2])) if use_cache is not False else None,
        )

    # ------------------------------------------------------------------ generation (the cache: `ORTCausalLMOutput`'s)
    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        past = kwargs.get(CACHE_FIELD)
        if past is not None:
            input_ids = input_ids[:, past[0][1].shape[-2]:]
        position_ids = None
        if attention_mask is not None:  # positions count real tokens (left padding), as the PyTorch model's
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            position_ids = position_ids[:, -input_ids.shape[1]:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": past,
                "position_ids": position_ids, "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        model_kwargs[CACHE_FIELD] = outputs.past_key_values
        if model_kwargs.get("attention_mask") is not None:
            mask = model_kwargs["attention_mask"]
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], num_new_tokens))], dim=-1)
        if model_kwargs.get("cache_position") is not None:
            model_kwargs["cache_position"] = model_kwargs["cache_position"][-1:] + num_new_tokens
        return model_kwargs

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(tuple(t.index_select(0, beam_idx) for t in pair) for pair in past_key_values)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`GenerationMixin.generate` under `torch_threads(1)`, for prompts padded on either side (as
        `AgencyGPT2ForCausalLM.generate`: right-padded rows are left-aligned first)."""
        if inputs is None and "input_ids" in kwargs:
            inputs = kwargs.pop("input_ids")
        inputs = _left_align_right_padding(inputs, kwargs)
        with torch_threads(1):
            return super().generate(inputs, generation_config=generation_config, **kwargs)


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
        super().__init__(config=config, session=session, generation_config=generation_config,
                         model_save_dir=model_save_dir)
        expected = ["input_ids", "lengths", *armt_state_names(config), "commit"]
        if self.input_names and list(self.input_names) != expected:
            raise ValueError(f"{session._model_path} is not a UnifiedARMT segment step exported by armada: its inputs "
                             f"are {list(self.input_names)[:4]}..., expected {expected[:4]}...")
        self.state_names = armt_state_names(config)

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
class ORTThoughtDiffusionForMaskedLM(ORTModel):
    """ThoughtDiffusion on ONNX Runtime: `forward` runs the exported denoising step (tokens, t, thought stack, block
    cache -> SUBS logits, new thought, pushed stack, extended cache); `generate_with_stack` and `generate` are
    `ThoughtDiffusionForMaskedLM`'s, with its one model call (`_denoise_step`) going to the graph. Stack and cache
    are the PyTorch classes (`ThoughtStack`, `ThoughtDiffusionBlockCache`) holding CPU tensors."""

    auto_model_class = AutoModelForMaskedLM
    main_input_name = "input_ids"

    def __init__(self, *, config=None, session=None, use_io_binding=None, generation_config=None,
                 model_save_dir=None):
        super().__init__(config=config, session=session, generation_config=generation_config,
                         model_save_dir=model_save_dir)
        self.stack_names = diffusion_stack_names(config)
        self.cache_names = diffusion_cache_names(config)
        expected = ["input_ids", "attention_mask", "position_ids", "block_ids", "timesteps", *self.cache_names,
                    *self.stack_names]
        if self.input_names and list(self.input_names) != expected:
            raise ValueError(f"{session._model_path} is not a ThoughtDiffusion denoising step exported by armada: its "
                             f"inputs are {list(self.input_names)[:6]}..., expected {expected[:6]}...")

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


__all__ = ["ORTModel", "ORTAgencyGPT2ForCausalLM", "ORTCausalLMOutput", "ORTUnifiedARMTForCausalLM",
           "ORTUnifiedARMTState", "ORTThoughtDiffusionForMaskedLM", "torch_threads"]
