"""UnifiedARMT: a segment-recurrent transformer with memory tokens and a per-layer associative memory.

A native Hugging Face model of the Associative Recurrent Memory Transformer (Rodkin et al. 2024), which extends the
Recurrent Memory Transformer (Bulatov et al. 2022). An input of any length is cut into segments of
`config.segment_size` tokens; each segment is followed by `config.num_memory_tokens` learned memory tokens.

    before layer l, every position reads:   x <- x + phi(W_Q x)^T A_l / (z_l^T phi(W_Q x) + eps)
    after layer l, the memory tokens write: A_l <- A_l + sum_i beta_i phi(k_i) (v_i - v_bar_i)^T
                                            z_l <- z_l + sum_i gamma_i phi(k_i)
    with k_i = W_K m_i, v_i = W_V m_i (W_V zero-initialized), v_bar_i = what memory returns for k_i today,
    beta_i = sigmoid(W_beta m_i), gamma_i = ARMT's correction and phi = DPFP (nu = 3), per memory head.

Positions restart in every segment: a learned table (`position_embedding_type="absolute"`, GPT-2) or rotary
embeddings of the queries and keys (`"rotary"`, RoPE), with the memory tokens at positions segment_size.. after it.

Attention is causal inside a segment and the memory tokens come last, so a real token never attends to memory
tokens: everything it learns from earlier segments arrives through (A, z). Only (A, z) cross segment boundaries,
hence linear time in the input length and flat memory.

The model keeps one open segment in a fixed-size key/value cache (`UnifiedARMTMemoryState`). Tokens are appended to
it; when it holds `segment_size` tokens, the memory tokens run over it ("commit"), write to (A, z), and the segment
is closed. A forward over a whole text, a stream of chunks of any sizes, and token-by-token generation all go
through this one mechanism, so they give the same outputs.

Padding: each row's real tokens (attention_mask == 1) are packed to the left before segmentation and the outputs
are put back where they came from, so a padded row gives the same logits as the same row alone.
"""

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from ..configuration.configuration_unified_armt import DPFP_NU, UnifiedARMTConfig


# ----------------------------------------------------------------------------------------------------- state
# Copied from modeling_agency_gpt2 (modeling files import only torch, transformers and their own config).
def _left_align_right_padding(inputs, kwargs):
    """For `generate`: rotate each right-padded prompt row (its real tokens, then one run of padding) so that its
    padding comes first, in `inputs` (input_ids), `attention_mask` and `inputs_embeds` alike; decoding appends after
    the last column, so such a row would otherwise continue from its padding. Unpadded rows and rows padded any other
    way (on the left, or with holes) are used as given. Returns the new `inputs`; updates `kwargs` in place."""
    mask, embeds = kwargs.get("attention_mask"), kwargs.get("inputs_embeds")
    if mask is None or mask.dim() != 2 or any(t is not None and t.shape[:2] != mask.shape for t in (inputs, embeds)):
        return inputs
    batch, length = mask.shape
    real, columns = mask.bool(), torch.arange(length, device=mask.device)
    count = real.sum(1, keepdim=True)
    right_padded = (real == (columns < count)).all(1, keepdim=True)
    order = (columns - torch.where(right_padded, length - count, 0)) % length  # (B, T): one rotation per row

    def rotate(t):
        return t.gather(1, order.view(batch, length, *[1] * (t.dim() - 2)).expand_as(t))

    kwargs["attention_mask"] = rotate(mask)
    if embeds is not None:
        kwargs["inputs_embeds"] = rotate(embeds)
    return None if inputs is None else rotate(inputs)


# The model_kwargs key under which generate keeps (and beam search reorders) a cache: `past_key_values` in
# transformers 4.57, `cache` in 5.x. Generation keeps the memory state there, so beams carry their own memory.
GENERATION_CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class UnifiedARMTMemoryState:
    """Everything a UnifiedARMT model carries between calls, per layer l and batch row b:

    - `memory[l] = (A, z)`: associative matrix (B, h, d_key, d_value) and normalizer (B, h, d_key), float32;
    - `keys[l]`, `values[l]`: the open segment's key/value cache (B, n_head, segment_size, head_dim);
    - `fill`: (B,) tokens in each row's open segment; `segments`: (B,) segments each row has committed.
    """

    def __init__(self, memory, keys, values, fill, segments):
        self.memory, self.keys, self.values, self.fill, self.segments = memory, keys, values, fill, segments

    @classmethod
    def empty(cls, config, batch_size, device, dtype):
        h, dk, dv = config.num_memory_heads, config.memory_key_dim, config.memory_value_dim
        kv = (batch_size, config.num_attention_heads, config.segment_size, config.head_dim)
        n = config.num_hidden_layers
        return cls(
            memory=[(torch.zeros(batch_size, h, dk, dv, device=device), torch.zeros(batch_size, h, dk, device=device))
                    for _ in range(n)],
            keys=[torch.zeros(kv, device=device, dtype=dtype) for _ in range(n)],
            values=[torch.zeros(kv, device=device, dtype=dtype) for _ in range(n)],
            fill=torch.zeros(batch_size, dtype=torch.long, device=device),
            segments=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    @property
    def batch_size(self):
        return self.fill.shape[0]

    def _map(self, fn):
        return UnifiedARMTMemoryState([(fn(a), fn(z)) for a, z in self.memory], [fn(k) for k in self.keys],
                                      [fn(v) for v in self.values], fn(self.fill), fn(self.segments))

    def detach(self):
        """A copy cut from the autograd graph (truncated backpropagation through time across calls)."""
        return self._map(lambda t: t.detach())

    def index_select(self, index):
        """Rows `index` of every tensor (beam search reordering, dropping finished rows)."""
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def reset(self, rows=None):
        """Forget everything (`rows=None`) or only the given rows (a bool or index tensor)."""
        if rows is None:
            return self._map(torch.zeros_like)
        keep = torch.ones(self.batch_size, dtype=torch.bool, device=self.fill.device)
        keep[rows] = False
        return self._map(lambda t: t * keep.view(-1, *([1] * (t.dim() - 1))).to(t.dtype))


def dpfp(x, nu=DPFP_NU):
    """Deterministic parameter-free projection (Schlag et al. 2021): (..., d) -> (..., 2 * nu * d), non-negative."""
    x = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    rolled = torch.cat([x.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    return x.repeat(*([1] * (x.dim() - 1)), nu) * rolled


# ----------------------------------------------------------------------------------------------------- layers
class UnifiedARMTAssociativeMemory(nn.Module):
    """Per-layer associative memory: `read` before the layer, delta-rule `write` from the memory tokens after it."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_memory_heads
        self.eps = config.memory_eps
        self.correction = config.memory_correction
        self.q_proj = nn.Linear(config.hidden_size, config.d_mem, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.d_mem, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)  # zero-initialized
        self.beta_proj = nn.Linear(config.hidden_size, config.num_memory_heads)

    def _features(self, proj, x):
        x = proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, h, T, d_mem / h)
        return F.normalize(dpfp(x.float()), dim=-1)  # (B, h, T, d_key)

    def _lookup(self, phi, A, z):
        numerator = phi @ A  # (B, h, T, d_value)
        normalizer = (phi @ z.unsqueeze(-1)) + self.eps  # (B, h, T, 1)
        return numerator / normalizer, normalizer

    def read(self, hidden_states, A, z):
        """What memory returns for every position, (B, T, D); zero while memory is empty."""
        out, _ = self._lookup(self._features(self.q_proj, hidden_states), A, z)
        return out.transpose(1, 2).flatten(2).to(hidden_states.dtype)

    def write(self, memory_states, A, z):
        """Delta-rule update from the memory tokens' layer outputs (B, M, D). Returns the new (A, z)."""
        phi = self._features(self.k_proj, memory_states)  # (B, h, M, d_key)
        values = self.v_proj(memory_states).float().unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        previous, normalizer = self._lookup(phi, A, z)  # what memory holds for these keys today
        beta = torch.sigmoid(self.beta_proj(memory_states).float()).transpose(1, 2).unsqueeze(-1)  # (B, h, M, 1)
        A = A + phi.transpose(-1, -2) @ (beta * (values - previous))
        if self.correction:  # grow z only by the part of each key that memory does not hold yet
            gamma = (1 - (normalizer - self.eps) / phi.pow(2).sum(-1, keepdim=True).clamp_min(self.eps))
            gamma = gamma.clamp(0, 1).detach()
        else:
            gamma = 1.0
        z = z + (gamma * phi).sum(dim=-2)
        return A, z


def _check_inputs(input_ids, inputs_embeds, attention_mask):
    """A clear error for an attention_mask whose shape is not the input's (batch, length): it would silently cut
    the input to the mask's length, or fail with an index error."""
    tokens = input_ids if input_ids is not None else inputs_embeds
    if attention_mask is not None and tokens is not None and tuple(attention_mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must be the input's (batch, "
                         f"length) = {tuple(tokens.shape[:2])}.")


# Copied from modeling_agency_gpt2 (with `from_pretrained` below): modeling files import only torch, transformers and
# their config, so that a checkpoint with remote code works without armada.
def _broken_weights_error(error, pretrained_model_name_or_path):
    """safetensors' own error for an empty or truncated file ("incomplete metadata ...") names no file: name it."""
    path = os.fspath(pretrained_model_name_or_path)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
    where = os.path.join(path, files[0]) if len(files) == 1 else f"a .safetensors file of {path}"
    return OSError(f"{where} looks truncated or corrupt ({error}); an interrupted save or download? Save the model "
                   "again, or download it again (from_pretrained(..., force_download=True)).")


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention that materializes the probabilities. Returns (B, T, nh, hs) and (B, nh, T, S)."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(value.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def rotary_cos_sin(positions, head_dim, theta, dtype):
    """RoPE angles for integer `positions` (B, T): cos and sin of shape (B, 1, T, head_dim), frequencies
    theta^(-2i/head_dim) as in Su et al. 2021 (halves layout, as in Llama). Computed on the fly: no buffer to load."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (B, T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate feature pairs (i, i + head_dim/2) of x (B, nh, T, hs) by the position angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class UnifiedARMTAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def qkv(self, hidden_states):
        q, k, v = self.c_attn(hidden_states).split(self.config.hidden_size, dim=-1)
        return [t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v)]  # (B, nh, T, hs)

    def attend(self, query, key, value, attention_mask, output_attentions=False):
        """query (B, nh, T, hs) over key/value (B, nh, S, hs); attention_mask is additive (B, 1, T, S)."""
        interface: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager" and not output_attentions:
            interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = interface(self, query, key, value, attention_mask, scaling=self.scaling, is_causal=False,
                                 dropout=self.config.attn_pdrop if self.training else 0.0)
        return self.resid_dropout(self.c_proj(out.flatten(2))), weights


class UnifiedARMTMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.mlp_size)
        self.c_proj = nn.Linear(config.mlp_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class UnifiedARMTBlock(GradientCheckpointingLayer):
    """Associative read -> pre-LN causal self-attention -> pre-LN MLP; on commit (memory tokens) the associative
    write."""

    def __init__(self, config):
        super().__init__()
        self.associative_memory = UnifiedARMTAssociativeMemory(config)
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = UnifiedARMTAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = UnifiedARMTMLP(config)

    def forward(self, hidden_states, A, z, cache_keys, cache_values, write_index, write_mask, attention_mask,
                rotary=None, output_attentions=False):
        """hidden_states (B, T, D). Real tokens (`write_index` given) are written into the open segment's cache
        (B, nh, S, hs) and attend to it; memory tokens (`write_index` None) attend to the cache and to each other.
        `rotary`: (cos, sin) of the positions of hidden_states with rotary positions (keys are cached rotated).
        Returns (hidden, keys, values, attention weights); for memory tokens (the commit) the layer's memory (A, z)
        after their write takes the place of keys and values (the write runs here, inside the block's forward, where
        a sharded model has its parameters gathered)."""
        hidden_states = hidden_states + self.associative_memory.read(hidden_states, A, z)
        q, k, v = self.attn.qkv(self.ln_1(hidden_states))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if write_index is not None:  # append to the open segment's cache: keys = that cache
            k = _cache_write(cache_keys, k, write_index, write_mask)
            v = _cache_write(cache_values, v, write_index, write_mask)
            keys, values = k, v
        else:  # memory tokens: attend to the (full) segment cache, then to each other
            keys, values = torch.cat([cache_keys, k], dim=2), torch.cat([cache_values, v], dim=2)
        attn_out, weights = self.attn.attend(q, keys, values, attention_mask, output_attentions)
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        if write_index is None:
            return (hidden_states, *self.associative_memory.write(hidden_states, A, z), weights)
        return hidden_states, k, v, weights


def _cache_write(cache, new, source_index, write_mask):
    """cache (B, nh, S, hs) with slot p of row b replaced by new[b, :, source_index[b, p]] where write_mask[b, p].
    A gather rather than a scatter: vectorized over rows with different fill levels, and exportable."""
    gathered = new.gather(2, source_index[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[3]))
    return torch.where(write_mask[:, None, :, None], gathered, cache)


# ----------------------------------------------------------------------------------------------------- outputs
@dataclass
class UnifiedARMTModelOutput(ModelOutput):
    """
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Final hidden states of the real tokens (memory positions stripped), in the input's order.
    memory_state (`UnifiedARMTMemoryState`, *optional*, returned when `use_cache=True`):
        Associative memories and open segment; pass it back as `memory_state` to continue the stream.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): Embeddings + each layer's output for the real tokens.
    attentions (`tuple(torch.FloatTensor)`, *optional*): Per layer, (batch, heads, sequence_length, segment_size):
        each real token's attention over the slots of its own segment.
    memory_attentions (`tuple(torch.FloatTensor)`, *optional*): Per layer, (batch, commits, heads,
        num_memory_tokens, segment_size + num_memory_tokens): the memory tokens' attention at each commit.
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    memory_state: Optional[UnifiedARMTMemoryState] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    memory_attentions: Optional[tuple] = None


@dataclass
class UnifiedARMTCausalLMOutput(ModelOutput):
    """As `UnifiedARMTModelOutput`, with `loss` (next-token cross-entropy on `labels`) and `logits`
    (batch, sequence_length, vocab_size) for the real tokens only."""

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    memory_state: Optional[UnifiedARMTMemoryState] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    memory_attentions: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------------- models
class UnifiedARMTPreTrainedModel(PreTrainedModel):
    config_class = UnifiedARMTConfig
    config: UnifiedARMTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UnifiedARMTBlock"]
    _skip_keys_device_placement = "memory_state"
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    _is_stateful = True  # own state object instead of a transformers Cache

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            raise _broken_weights_error(error, pretrained_model_name_or_path) from error

    # Auto class -> model class of this file, written with the config's own entry to config.json's `auto_map`.
    _remote_code_auto_map = {"AutoModel": "UnifiedARMTModel", "AutoModelForCausalLM": "UnifiedARMTForCausalLM"}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the code that defines the model: this file and its configuration
        file beside the weights, with the configuration imported flat (`from .configuration_... import`, the only
        form transformers' remote-code loader follows), and `auto_map` naming them in config.json. The folder then
        loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` where armada is absent."""
        import sys
        from pathlib import Path

        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) would upload before the model's code is written; "
                             "use model.push_to_hub(repo_id) or `armada push DIR REPO_ID`.")
        code, config_code = Path(__file__), Path(sys.modules[type(self.config).__module__].__file__)
        self.config.auto_map = {"AutoConfig": f"{config_code.stem}.{type(self.config).__name__}",
                                **{auto: f"{code.stem}.{name}" for auto, name in self._remote_code_auto_map.items()}}
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            flat = code.read_text(encoding="utf-8").replace("from ..configuration.", "from .")
            (Path(save_directory) / code.name).write_text(flat, encoding="utf-8")
            (Path(save_directory) / config_code.name).write_text(config_code.read_text(encoding="utf-8"),
                                                                 encoding="utf-8")

    def _initialize_weights(self, module, *args, **kwargs):
        # transformers 5 skips, in remote code, every module that owns no parameter itself, so `_init_weights` would
        # never see the modules whose children it scales or zeroes below; nothing here needs that shortcut.
        super()._initialize_weights(module)

    def _init_weights(self, module):
        # torch.nn.init functions, never `.data.normal_()`: transformers 5 loads a checkpoint into a model built on the
        # meta device and then runs this for every module, with those functions made to skip what it loaded.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.zeros_(module.bias)
            nn.init.ones_(module.weight)
        if isinstance(module, UnifiedARMTAssociativeMemory):
            nn.init.zeros_(module.v_proj.weight)  # memory starts silent: the model begins as a plain transformer
        elif isinstance(module, (UnifiedARMTAttention, UnifiedARMTMLP)):
            nn.init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, UnifiedARMTModel) and not getattr(module.memory_tokens, "_is_hf_initialized", False):
            module.init_memory_tokens()  # (transformers 5 flags what it loaded; 4.57 skips loaded modules instead)


class UnifiedARMTModel(UnifiedARMTPreTrainedModel):
    def __init__(self, config: UnifiedARMTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "absolute":
            self.wpe = nn.Embedding(config.segment_size, config.hidden_size)  # positions restart in every segment
        self.memory_tokens = nn.Parameter(torch.zeros(config.num_memory_tokens, config.hidden_size))
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([UnifiedARMTBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    @torch.no_grad()
    def init_memory_tokens(self, method=None, kmeans_iters=10, seed=0):
        """(Re-)initialize the memory-token embeddings with `method` (default `config.memory_init`)."""
        method = method or self.config.memory_init
        std, (m, d) = self.config.initializer_range, self.memory_tokens.shape
        generator = torch.Generator(device="cpu").manual_seed(seed)
        if method == "random":
            init = torch.randn(m, d, generator=generator) * std
        elif method == "orthogonal":
            init = torch.linalg.qr(torch.randn(max(m, d), min(m, d), generator=generator))[0]
            init = (init if m >= d else init.T) * std * math.sqrt(d)
        elif method == "embedding_kmeans":
            init = self.init_memory_from_embeddings(kmeans_iters, seed, assign=False)
        else:
            raise ValueError(f"memory init must be one of 'random', 'orthogonal', 'embedding_kmeans', got {method!r}")
        self.memory_tokens.copy_(init.to(self.memory_tokens))

    @torch.no_grad()
    def init_memory_from_embeddings(self, kmeans_iters=10, seed=0, assign=True):
        """K-means (cosine) centroids of the word embeddings as memory tokens: call after loading pretrained
        embeddings so the memory starts in the region of embedding space the layers know."""
        emb = self.wte.weight.detach().float().cpu()
        m = self.memory_tokens.shape[0]
        if emb.shape[0] < m:
            raise ValueError(f"embedding_kmeans needs at least num_memory_tokens={m} embeddings, got {emb.shape[0]}")
        unit = F.normalize(emb, dim=-1)
        generator = torch.Generator().manual_seed(seed)
        centroids = unit[torch.randperm(unit.shape[0], generator=generator)[:m]]
        for _ in range(kmeans_iters):
            assign_to = (unit @ centroids.T).argmax(dim=-1)  # (V,)
            sums = torch.zeros_like(centroids).index_add_(0, assign_to, emb)
            counts = torch.bincount(assign_to, minlength=m).clamp_min(1).unsqueeze(-1)
            centroids = torch.where(counts > 0, F.normalize(sums / counts, dim=-1), centroids)
        init = centroids * emb.norm(dim=-1).mean()
        if assign:
            self.memory_tokens.copy_(init.to(self.memory_tokens))
        return init

    def _pack(self, input_ids, inputs_embeds, attention_mask):
        """Move each row's real tokens to the left. Returns the packed ids (or embeddings), lengths (B,) and the
        permutation. Ids are embedded later, one piece at a time, so memory does not grow with the input."""
        tokens = input_ids if inputs_embeds is None else inputs_embeds
        batch, length = tokens.shape[:2]
        if attention_mask is None:
            return tokens, torch.full((batch,), length, dtype=torch.long, device=tokens.device), None
        attention_mask = attention_mask.to(tokens.device).bool()
        order = torch.sort((~attention_mask).to(torch.int8), dim=1, stable=True).indices  # real tokens first
        index = order if tokens.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return tokens.gather(1, index), attention_mask.sum(dim=1), order

    @staticmethod
    def _unpack(x, order):
        """Inverse of `_pack` along dim 1 (positions of padding receive the outputs computed there)."""
        if order is None:
            return x
        inverse = torch.argsort(order, dim=1)
        return x.gather(1, inverse.view(*inverse.shape, *([1] * (x.dim() - 2))).expand(*inverse.shape, *x.shape[2:]))

    def _rotary(self, positions, dtype):
        """(cos, sin) for `positions` (B, T) with rotary positions, else None."""
        if self.config.position_embedding_type != "rotary":
            return None
        return rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def _commit(self, state, rows, output_attentions):
        """Memory tokens read the closed segments' caches and write to every layer's memory, for `rows` only."""
        cfg, batch = self.config, state.batch_size
        hidden = self.drop(self.memory_tokens).unsqueeze(0).expand(batch, -1, -1)
        m, s = cfg.num_memory_tokens, cfg.segment_size
        rotary = self._rotary(torch.arange(s, s + m, device=hidden.device).unsqueeze(0), hidden.dtype)
        causal = torch.ones(m, s + m, dtype=torch.bool, device=hidden.device).tril(diagonal=s)
        mask = _additive(causal.expand(batch, 1, m, s + m), hidden.dtype)
        memory, weights = [], []
        for layer, block in enumerate(self.h):
            A, z = state.memory[layer]
            hidden, new_A, new_z, w = block(hidden, A, z, state.keys[layer], state.values[layer], None, None, mask,
                                            rotary=rotary, output_attentions=output_attentions)
            keep = rows.view(-1, 1, 1, 1)
            memory.append((torch.where(keep, new_A, A), torch.where(keep.view(-1, 1, 1), new_z, z)))
            weights.append(w)
        fill = torch.where(rows, torch.zeros_like(state.fill), state.fill)
        state = UnifiedARMTMemoryState(memory, state.keys, state.values, fill, state.segments + rows.long())
        return state, weights

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        memory_state: Optional[UnifiedARMTMemoryState] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        cfg = self.config
        use_cache = use_cache if use_cache is not None else (cfg.use_cache and not self.training)
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else cfg.output_hidden_states)
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        self._check_inputs(input_ids, inputs_embeds)

        _check_inputs(input_ids, inputs_embeds, attention_mask)
        tokens, lengths, order = self._pack(input_ids, inputs_embeds, attention_mask)
        batch, length = tokens.shape[:2]
        dtype = self.wte.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
        if length == 0:
            raise ValueError("the input has no tokens (sequence length 0)")
        fresh = memory_state is None
        state = memory_state or UnifiedARMTMemoryState.empty(cfg, batch, tokens.device, dtype)
        if state.batch_size != batch:
            raise ValueError(f"memory_state holds {state.batch_size} rows but the input has {batch}")
        bounds = self._piece_bounds(state, lengths, length, fresh)

        outputs, all_hidden, all_attn, mem_attn = [], [], [], []
        n_pieces = len(bounds) - 1
        for i in range(n_pieces):
            start, end = bounds[i], bounds[i + 1]
            state, piece_hidden, piece_attn = self._run_piece(
                tokens[:, start:end], (lengths - start).clamp(0, end - start), state, inputs_embeds is not None,
                output_attentions,
            )
            outputs.append(self.ln_f(piece_hidden[-1]))
            if output_hidden_states:
                all_hidden.append(piece_hidden)
            if output_attentions:
                all_attn.append(piece_attn)

            # Commit the rows whose segment is now full. From a fresh state that can only happen at the end of a
            # whole segment, decided statically (the last one is skipped when no state is returned).
            full = state.fill == cfg.segment_size
            if fresh:
                needed = end - start == cfg.segment_size and (use_cache or i < n_pieces - 1)
            else:
                needed = bool(full.any())
            if needed:
                state, w = self._commit(state, full, output_attentions)
                mem_attn.append(w)
                if cfg.max_backprop_segments is not None and i < n_pieces - cfg.max_backprop_segments:
                    # truncated BPTT: this write is read only by segments that lie outside the backprop window
                    state.memory = [(A.detach(), z.detach()) for A, z in state.memory]

        out = self._collect(outputs, all_hidden, all_attn, mem_attn, order, output_hidden_states, output_attentions)
        out = UnifiedARMTModelOutput(memory_state=state if use_cache else None, **out)
        return out if return_dict else out.to_tuple()

    def _check_inputs(self, input_ids, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        if input_ids is not None and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            vocab_size = self.config.vocab_size
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
                raise ValueError(f"token ids must be in [0, vocab_size={vocab_size}), got values in "
                                 f"[{int(input_ids.min())}, {int(input_ids.max())}]")

    def _piece_bounds(self, state, lengths, length, fresh):
        """Cut points of the input into pieces that never cross a segment boundary for any row. From a fresh state
        every row starts at slot 0, so pieces are whole segments (static: traceable). A continued stream may have
        rows at different fill levels: then a piece ends where the fullest row's segment does."""
        s = self.config.segment_size
        if fresh:
            bounds = list(range(0, length, s)) + [length]
        else:
            bounds, start = [0], 0
            fill_now = state.fill.tolist()
            while start < length:
                step = min(s - f for f in fill_now)
                end = min(length, start + step)
                bounds.append(end)
                fill_now = [f + max(0, min(end, n) - start) for f, n in zip(fill_now, lengths.tolist())]
                fill_now = [0 if f == s else f for f in fill_now]
                start = end
        if self.config.max_segments is not None and len(bounds) - 1 > self.config.max_segments:
            raise ValueError(f"the input needs {len(bounds) - 1} segments, more than config.max_segments="
                             f"{self.config.max_segments}")
        return bounds

    def _run_piece(self, piece_tokens, real, state, is_embeds, output_attentions):
        """Every layer over one piece, appended to the open segment's cache; `real` (B,) counts each row's real
        tokens in the piece. Returns the new state, the hidden states (input + one per layer) and attentions."""
        s, device, piece = self.config.segment_size, piece_tokens.device, piece_tokens.shape[1]
        slots = torch.arange(s, device=device)
        fill = state.fill
        positions = (fill.unsqueeze(1) + torch.arange(piece, device=device)).clamp_max(s - 1)
        embeds = piece_tokens if is_embeds else self.wte(piece_tokens)
        rotary = self._rotary(positions, embeds.dtype)
        hidden = self.drop(embeds if rotary is not None else embeds + self.wpe(positions))
        source = (slots - fill.unsqueeze(1)).clamp(0, piece - 1)  # which new token lands in slot p
        write = (slots >= fill.unsqueeze(1)) & (slots < (fill + real).unsqueeze(1))
        visible = slots.view(1, 1, s) <= positions.unsqueeze(-1)  # (B, piece, S): causal inside the segment
        mask = _additive(visible.unsqueeze(1), hidden.dtype)
        keys, values, piece_hidden, piece_attn = [], [], [hidden], []
        for layer, block in enumerate(self.h):
            A, z = state.memory[layer]
            hidden, k, v, w = block(hidden, A, z, state.keys[layer], state.values[layer], source, write, mask,
                                    rotary=rotary, output_attentions=output_attentions)
            keys.append(k)
            values.append(v)
            piece_hidden.append(hidden)
            piece_attn.append(w)
        return UnifiedARMTMemoryState(state.memory, keys, values, fill + real, state.segments), piece_hidden, piece_attn

    def _collect(self, outputs, all_hidden, all_attn, mem_attn, order, output_hidden_states, output_attentions):
        """The pieces' outputs joined and put back in the input's order (padding where it was), as output fields."""
        n_layers = len(self.h)
        hidden = self._unpack(torch.cat(outputs, dim=1), order)
        hidden_states = attentions = memory_attentions = None
        if output_hidden_states:
            hidden_states = tuple(
                self._unpack(torch.cat([p[j] for p in all_hidden], dim=1), order)
                if j < n_layers else hidden for j in range(n_layers + 1))
        if output_attentions:
            attentions = tuple(self._unpack(torch.cat([p[j] for p in all_attn], dim=2).transpose(1, 2), order)
                               .transpose(1, 2) for j in range(n_layers))
            memory_attentions = tuple(
                torch.stack([c[j] for c in mem_attn], dim=1) if mem_attn else None for j in range(n_layers))
        return dict(last_hidden_state=hidden, hidden_states=hidden_states, attentions=attentions,
                    memory_attentions=memory_attentions)


def _additive(allowed, dtype):
    """bool mask (True = may attend) -> additive float mask."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def next_token_targets(labels, attention_mask=None):
    """The label each position predicts (its next real token's; -100 where none): `labels` shifted left by one
    within each row's real tokens, so that padding anywhere (left, right or in between) is skipped, and labels at
    padded positions are ignored whatever they say."""
    if attention_mask is None:
        return nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    padded = attention_mask.to(labels.device) == 0
    labels = labels.masked_fill(padded, -100)
    order = torch.sort(padded.to(torch.int8), dim=1, stable=True).indices   # real tokens first, in order
    packed = nn.functional.pad(labels.gather(1, order)[:, 1:], (0, 1), value=-100)
    return torch.empty_like(labels).scatter_(1, order, packed)


class UnifiedARMTForCausalLM(UnifiedARMTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: UnifiedARMTConfig):
        super().__init__(config)
        self.transformer = UnifiedARMTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        memory_state: Optional[UnifiedARMTMemoryState] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **kwargs,
    ):
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets as in GPT-2: `labels = input_ids` (shifted inside), -100 is ignored. The loss covers
            segment boundaries: the last token of a segment predicts the first token of the next one.
        memory_state (`UnifiedARMTMemoryState`, *optional*):
            State returned by a previous call with `use_cache=True`; the input continues that stream.
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            As in transformers: an int k > 0 keeps the logits of the last k positions, a 1D tensor those of the
            positions it lists (e.g. only where the labels are: the LM head over the other positions is work
            thrown away in training). With `labels`, the loss covers the next-token targets of the kept
            positions only (the same loss as without `logits_to_keep` when every labeled token follows a
            kept position); a `shift_labels` keyword (targets already aligned with the kept logits) overrides.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.transformer(input_ids, attention_mask=attention_mask, memory_state=memory_state,
                               inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=True)
        hidden = out.last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, kept])
        loss = None
        if labels is not None:
            shift_labels = kwargs.pop("shift_labels", None)
            if shift_labels is None:
                columns = kept.to(labels.device) if torch.is_tensor(kept) else kept
                shift_labels = next_token_targets(labels, attention_mask)[:, columns].contiguous()
            # mean over the real targets; with none (e.g. an all-zeros mask) the loss is 0, not 0 / 0 = NaN
            kwargs.setdefault("num_items_in_batch", (shift_labels != -100).sum().clamp(min=1))
            loss = self.loss_function(logits, None, vocab_size=self.config.vocab_size, shift_labels=shift_labels,
                                      **kwargs)
        output = UnifiedARMTCausalLMOutput(loss=loss, logits=logits, memory_state=out.memory_state,
                                           hidden_states=out.hidden_states, attentions=out.attentions,
                                           memory_attentions=out.memory_attentions)
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, memory_state=None, inputs_embeds=None,
                                      use_cache=True, logits_to_keep=None, **kwargs):
        # Overwritten: the state is `memory_state`, not a `Cache`; after the first step generate keeps it under its
        # cache key (so beam search reorders it). After the prompt only the new token is fed; it is always a real
        # token, so no mask is needed (earlier padding was dropped when the prompt was packed).
        cached = kwargs.get(GENERATION_CACHE_KEY)
        memory_state = cached if isinstance(cached, UnifiedARMTMemoryState) else memory_state
        if memory_state is not None:
            model_inputs = {"input_ids": input_ids[:, -1:].contiguous(), "attention_mask": None}
        elif inputs_embeds is not None:
            model_inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        else:
            model_inputs = {"input_ids": input_ids.contiguous(), "attention_mask": attention_mask}
        model_inputs.update(memory_state=memory_state, use_cache=use_cache, logits_to_keep=logits_to_keep or 1)
        for key, value in kwargs.items():
            if key not in model_inputs and key not in ("cache_position", "position_ids", "past_key_values", "cache"):
                model_inputs[key] = value
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        model_kwargs[GENERATION_CACHE_KEY] = outputs.get("memory_state", None)
        if model_kwargs.get("attention_mask") is not None:
            mask = model_kwargs["attention_mask"]
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], num_new_tokens))], dim=-1)
        if model_kwargs.get("cache_position") is not None:
            model_kwargs["cache_position"] = model_kwargs["cache_position"][-1:] + num_new_tokens
        return model_kwargs

    def _reorder_cache(self, memory_state, beam_idx):
        """Beam search: every beam continues with the memory (and open segment's cache) of the beam it came from."""
        if isinstance(memory_state, UnifiedARMTMemoryState):
            return memory_state.index_select(beam_idx)
        return memory_state  # generate's own empty cache, before the first step

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`GenerationMixin.generate` for prompts padded on either side. Right-padded rows (the package's
        `gpt2_tokenizer()` pads on the right) are left-aligned first, so every row continues from its own last real
        token and gets the tokens it gets alone; their returned rows are therefore left-padded. Other rows (unpadded,
        left-padded, padding elsewhere) are used as given, so the returned prompts, `inputs_embeds` and the cache
        agree with the caller's `attention_mask`."""
        num_beams = kwargs.get("num_beams") or getattr(generation_config or self.generation_config, "num_beams", 1)
        if num_beams and num_beams > 1 and kwargs.get("memory_state") is not None:
            raise NotImplementedError("beam search starts from the prompt alone; continuing a stream (memory_state=) "
                                      "is supported with num_beams=1")
        if inputs is None and "input_ids" in kwargs:
            inputs = kwargs.pop("input_ids")
        inputs = _left_align_right_padding(inputs, kwargs)
        return super().generate(inputs, generation_config=generation_config, **kwargs)


__all__ = ["UnifiedARMTForCausalLM", "UnifiedARMTModel", "UnifiedARMTPreTrainedModel", "UnifiedARMTMemoryState",
           "UnifiedARMTAssociativeMemory", "dpfp"]
