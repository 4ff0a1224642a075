"""ThoughtDiffusion: a masked-diffusion language model conditioned on an evolving stack of thought tensors.

The objective is MDLM's (Sahoo et al. 2024). At time t in [0, 1] every token is replaced by [MASK] with probability
m(t) (`log_linear`: m = t; `cosine`: m = 1 - cos(pi t / 2)); the denoiser predicts the clean token at masked
positions, and the negative ELBO per token is

    L = E_{t ~ U(eps, 1)} [ w(t) * sum_{masked l} -log p(x0_l | x_t) ] / L,   w(t) = m'(t) / m(t)   (1/t log-linear)

with SUBS parameterization: the [MASK] logit is never predicted and unmasked positions carry their token over, so
only masked positions enter the loss and copying the input earns nothing. Training draws t antithetically (one
uniform, shifted by i/n for the n rows or blocks of a batch), which lowers the variance of the 1/t weight. With
`complementary_masking` a training batch runs twice, the second copy masked exactly where the first is not (at the
time with mask rate 1 - m(t)): every token is a target once per step, for twice the compute (LaViDa, Li et al. 2025).

Block diffusion (`config.block_length`, BD3-LM, Arriola et al. 2025): attention is bidirectional inside a block of
`block_length` tokens and causal between blocks. Training runs the noisy text and its clean copy side by side
(2 x length): a noisy block sees itself and the clean earlier blocks, a clean block sees clean blocks up to its own;
every block has its own t. During sampling the prompt and the finished blocks are clean, so their keys and values
never change: they are computed once and kept in a prefix cache (`ThoughtDiffusionBlockCache`), and each step runs
only the block being denoised (exactly the same result as recomputing everything, see the tests).

The thought stack. Every forward decodes a thought tensor (`config.thought_dims`) from the final hidden states of
the masked positions (what the model is still working out). A ring buffer (`ThoughtStack`) keeps the last
`thought_stack_size` thoughts; the `ThoughtStackEncoder` embeds all slots at once, adds temporal (recency)
encodings, runs self-attention over the slots and a `LearnableTemporalPooling` summary. Every transformer block then
reads [summary, slot_1 .. slot_S] through cross-attention. Cross-attention rather than adding one pooled vector:
a pooled vector keeps only what the pooling query chose, while cross-attention lets each masked position pick the
slots it needs (a recent plan, an older one) at a cost of T x (S + 1) scores, small beside self-attention.

Positions are rotary by default (RoPE on the self-attention queries and keys, as MDLM's backbone; a learned table,
`position_embedding_type="absolute"`, as GPT-2, is kept for comparison). A [MASK] position has no token of its
own in its residual stream, unlike an AR model's last position, so everything it predicts from must come through
attention, first of all its neighbours: with a learned table every position has to learn its own "look one to
the left" pattern, with rotary one head's weights do it at every offset and position. Neighbouring tokens
(`neighbor_tokens=k`, default 1) go further: each position's input also holds the embeddings of the k tokens on
either side (one linear map of their concatenation), so a [MASK] starts from its context as an AR model's last
position starts from its token. To the left it reads any real token (in training, earlier blocks from the clean
copy, as when sampling; with the prefix cache, the cached tokens), to the right only its own block's: no block
reads a later one, so the cache stays exact. benchmarks/diffusion.py measures both (README there).

Conditioning (noise level and thoughts) enters only at [MASK] positions: a clean token's representation then does
not depend on t or on the stack, which keeps the prefix cache exact while the stack changes at every step. The
noise level is also visible from the masks themselves (MDLM observes time conditioning is nearly redundant).

How the stack is trained. During sampling each step pushes the thought of the step before. Training does the same,
as self-conditioning (Chen et al. 2022) does with its own estimate: with probability `thought_train_prob` a batch
first runs `thought_train_hops` passes at noisier times t' > t, without gradient through the transformer, pushes
their thoughts, and then trains at t conditioned on that stack. Masks are nested (one uniform per token: masked at t
implies masked at t'), so the thoughts come from strictly less information than x_t and cannot leak the tokens to be
predicted: the ELBO stays an ELBO. The thought head is applied with gradient to the (detached) pooled states of
those passes, so the diffusion loss teaches it what to write. For block models the thoughts are per block (the
thought of block b sees only block b at t' and clean blocks before it), so no block learns from a later block.

Auxiliary thought losses (weighted by `thought_loss_weight`, each logged): consistency (the new thought stays close
to the newest one in the stack), diversity (thoughts of different rows differ: mean squared cosine similarity) and
sparsity (mean |thought|).
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from ..configuration.configuration_thought_diffusion import ThoughtDiffusionConfig

REMASKING = ("low_confidence", "random")


# ----------------------------------------------------------------------------------------------------- schedule
def mask_rate(t, schedule):
    """Probability that a token is masked at time t (a tensor in [0, 1])."""
    if schedule == "log_linear":
        return t
    return 1 - torch.cos(0.5 * math.pi * t)


def elbo_weight(t, schedule):
    """Continuous-time ELBO weight m'(t) / m(t): 1/t (log-linear), (pi/2) sin / (1 - cos) (cosine)."""
    if schedule == "log_linear":
        return 1 / t
    return 0.5 * math.pi * torch.sin(0.5 * math.pi * t) / (1 - torch.cos(0.5 * math.pi * t))


def time_for_mask_rate(rate, schedule):
    """Inverse of `mask_rate`: the time at which a fraction `rate` of the tokens is masked."""
    if schedule == "log_linear":
        return rate
    return (2 / math.pi) * torch.arccos((1 - rate).clamp(-1, 1))


# ----------------------------------------------------------------------------------------------------- state
class ThoughtStack:
    """A ring buffer of thoughts per row: `buffer` (N, S, *thought_dims), `head` (N,) the slot the next push
    writes, `count` (N,) how many slots hold a thought (<= S). `read()` returns the slots oldest first and
    right-aligned: index S-1 is always the newest thought, empty slots come first."""

    def __init__(self, buffer, head, count):
        self.buffer, self.head, self.count = buffer, head, count

    @classmethod
    def empty(cls, config, batch_size, device=None, dtype=torch.float32):
        buffer = torch.zeros(batch_size, config.thought_stack_size, *config.thought_dims, device=device, dtype=dtype)
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(buffer, zeros, zeros.clone())

    @property
    def batch_size(self):
        return self.buffer.shape[0]

    @property
    def size(self):
        return self.buffer.shape[1]

    def push(self, thought, rows=None):
        """A new stack with `thought` (N, *thought_dims) written at each row's head: one scatter for all rows.
        `rows` (N,) bool: push only these rows (the others are left as they are)."""
        n, s = self.batch_size, self.size
        index = self.head.view(n, 1, *([1] * (thought.dim() - 1))).expand(n, 1, *thought.shape[1:])
        buffer = self.buffer.to(thought.dtype).scatter(1, index, thought.unsqueeze(1))
        head, count = (self.head + 1) % s, (self.count + 1).clamp_max(s)
        if rows is not None:
            keep = rows.view(n, *([1] * (buffer.dim() - 1)))
            buffer = torch.where(keep, buffer, self.buffer.to(buffer.dtype))
            head, count = torch.where(rows, head, self.head), torch.where(rows, count, self.count)
        return ThoughtStack(buffer, head, count)

    def read(self):
        """(slots (N, S, *thought_dims) in temporal order, valid (N, S) bool)."""
        s = self.size
        order = (self.head.unsqueeze(1) + torch.arange(s, device=self.head.device)) % s  # (N, S)
        index = order.view(*order.shape, *([1] * (self.buffer.dim() - 2))).expand_as(self.buffer)
        valid = torch.arange(s, device=self.head.device) >= (s - self.count).unsqueeze(1)
        return self.buffer.gather(1, index), valid

    def newest(self):
        """(the newest thought (N, *thought_dims), whether the row has one (N,))."""
        slots, valid = self.read()
        return slots[:, -1], valid[:, -1]

    def detach(self):
        return ThoughtStack(self.buffer.detach(), self.head, self.count)

    def index_select(self, index):
        index = index.to(self.head.device)
        return ThoughtStack(self.buffer.index_select(0, index), self.head.index_select(0, index),
                            self.count.index_select(0, index))


class ThoughtDiffusionBlockCache:
    """Keys and values of the clean prefix (prompt and finished blocks) per layer, (B, n_head, P, head_dim), which
    of those P positions are real tokens (`mask`, (B, P) bool; left padding of a prompt is not) and their token ids
    (`tokens`, (B, P); the next call's first positions read their left neighbours there)."""

    def __init__(self, keys, values, mask, tokens):
        self.keys, self.values, self.mask, self.tokens = keys, values, mask, tokens

    @property
    def length(self):
        return self.mask.shape[1]

    def crop(self, length):
        """The cache of the first `length` positions."""
        return ThoughtDiffusionBlockCache([k[:, :, :length] for k in self.keys], [v[:, :, :length] for v in
                                          self.values], self.mask[:, :length], self.tokens[:, :length])


# ----------------------------------------------------------------------------------------------------- layers
def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention that materializes the probabilities. Returns (B, T, nh, hs) and (B, nh, T, S)."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(value.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _additive(allowed, dtype):
    """bool mask (True = may attend) -> additive float mask."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


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


class ThoughtDiffusionAttention(nn.Module):
    """Multi-head attention of queries from `hidden_states` over keys/values from `context` (self-attention when
    `context` is None: one fused projection). Dispatches through `ALL_ATTENTION_FUNCTIONS` (SDPA) or eager."""

    def __init__(self, config, cross=False):
        super().__init__()
        self.config = config
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        if cross:
            self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
            self.kv_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        else:
            self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def _heads(self, x):
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, nh, T, hs)

    def qkv(self, hidden_states, context=None):
        if context is None:
            q, k, v = self.c_attn(hidden_states).split(self.config.hidden_size, dim=-1)
        else:
            q = self.q_proj(hidden_states)
            k, v = self.kv_proj(context).split(self.config.hidden_size, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def attend(self, query, key, value, attention_mask, output_attentions=False):
        """query (B, nh, T, hs) over key/value (B, nh, S, hs); attention_mask is additive (B, 1, T, S)."""
        interface: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager" and not output_attentions:
            interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = interface(self, query, key, value, attention_mask, scaling=self.scaling, is_causal=False,
                                 dropout=self.config.attn_pdrop if self.training else 0.0)
        return self.resid_dropout(self.c_proj(out.flatten(2))), weights

    def forward(self, hidden_states, attention_mask, context=None, output_attentions=False):
        q, k, v = self.qkv(hidden_states, context)
        return self.attend(q, k, v, attention_mask, output_attentions)


class ThoughtDiffusionMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.mlp_size)
        self.c_proj = nn.Linear(config.mlp_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class LearnableTemporalPooling(nn.Module):
    """One learned query attends over the encoded slots (and a learned null entry, so an empty stack pools to
    something defined): a summary of the stack, (N, D)."""

    def __init__(self, config):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(config.hidden_size))
        self.null = nn.Parameter(torch.zeros(config.hidden_size))
        self.attn = ThoughtDiffusionAttention(config, cross=True)

    def forward(self, slots, valid):
        n = slots.shape[0]
        context = torch.cat([self.null.expand(n, 1, -1), slots], dim=1)  # (N, 1 + S, D)
        allowed = torch.cat([valid.new_ones(n, 1), valid], dim=1)
        mask = _additive(allowed[:, None, None, :], slots.dtype)
        pooled, _ = self.attn(self.query.expand(n, 1, -1).to(slots.dtype), mask, context=context)
        return pooled[:, 0]


class ThoughtStackEncoder(nn.Module):
    """All slots at once: flatten each thought -> linear -> + temporal encoding (by recency) -> one pre-LN
    self-attention + MLP layer over the slots -> (memory (N, 1 + S, D) = [pooled summary, slots], valid (N, 1 + S))."""

    def __init__(self, config):
        super().__init__()
        self.input_proj = nn.Linear(config.thought_size, config.hidden_size)
        self.temporal = nn.Embedding(config.thought_stack_size, config.hidden_size)  # index S-1 = newest
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = ThoughtDiffusionAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ThoughtDiffusionMLP(config)
        self.pooling = LearnableTemporalPooling(config)
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, stack: ThoughtStack, dtype):
        slots, valid = stack.read()  # (N, S, *dims), (N, S)
        x = self.input_proj(slots.flatten(2).to(dtype)) + self.temporal.weight.to(dtype)  # (N, S, D)
        # every query may attend to itself, so rows with empty slots stay finite (their outputs are masked later)
        slot = torch.arange(x.shape[1], device=x.device)
        allowed = valid[:, None, None, :] | (slot[:, None] == slot[None, :])[None, None]
        x = x + self.attn(self.ln_1(x), _additive(allowed, dtype))[0]
        x = x + self.mlp(self.ln_2(x))
        pooled = self.pooling(x, valid)
        memory = self.ln_f(torch.cat([pooled.unsqueeze(1), x], dim=1))
        return memory, torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)


class ThoughtDiffusionBlock(GradientCheckpointingLayer):
    """Pre-LN self-attention (bidirectional or block-causal; prefix cache keys prepended) -> pre-LN cross-attention
    to the encoded thought stack, added at [MASK] positions only -> pre-LN MLP. The cross-attention's output
    projection starts at zero (as Flamingo's gated cross-attention starts closed): a new model reads nothing from
    the stack and learns to read it where it helps, instead of first learning to ignore random messages."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = ThoughtDiffusionAttention(config)
        if config.thought_stack_size:
            self.ln_cross = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.cross_attn = ThoughtDiffusionAttention(config, cross=True)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ThoughtDiffusionMLP(config)

    def forward(self, hidden_states, attention_mask, past_key=None, past_value=None, memory=None, memory_mask=None,
                condition=None, rotary=None, output_attentions=False):
        """hidden_states (B, T, D); attention_mask additive (B, 1, T, P + T); past_key/value (B, nh, P, hs);
        memory (B, M, D) with memory_mask additive (B, 1, T, M); condition (B, T, 1): 1 at [MASK] positions;
        rotary: (cos, sin) of this call's positions (rotary models). Returns (hidden, key, value, attention
        weights) with key/value of this call's positions (keys rotated: the cache keeps them as they are)."""
        q, k, v = self.attn.qkv(self.ln_1(hidden_states))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        keys = k if past_key is None else torch.cat([past_key, k], dim=2)
        values = v if past_value is None else torch.cat([past_value, v], dim=2)
        attn_out, weights = self.attn.attend(q, keys, values, attention_mask, output_attentions)
        hidden_states = hidden_states + attn_out
        if memory is not None:
            cross, _ = self.cross_attn(self.ln_cross(hidden_states), memory_mask, context=memory)
            hidden_states = hidden_states + condition * cross
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, k, v, weights


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t (x 1000, as in DDPM) -> MLP -> (..., D)."""

    def __init__(self, config):
        super().__init__()
        self.linear_1 = nn.Linear(config.hidden_size, config.hidden_size)
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.register_buffer("frequencies", self.sinusoid_frequencies(config.hidden_size), persistent=False)

    @staticmethod
    def sinusoid_frequencies(hidden_size):
        half = hidden_size // 2
        return torch.exp(-math.log(10000.0) * torch.arange(half) / half)

    def forward(self, t, dtype):
        angles = 1000 * t.float().unsqueeze(-1) * self.frequencies
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        features = F.pad(features, (0, self.linear_1.in_features - 2 * self.frequencies.numel()))  # odd hidden size
        return self.linear_2(F.silu(self.linear_1(features.to(dtype))))


class ThoughtHead(nn.Module):
    """Pooled hidden state (N, D) -> LayerNorm -> linear -> tanh -> thought (N, *thought_dims)."""

    def __init__(self, config):
        super().__init__()
        self.dims = tuple(config.thought_dims)
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.proj = nn.Linear(config.hidden_size, config.thought_size)

    def forward(self, features):
        return torch.tanh(self.proj(self.ln(features))).unflatten(-1, self.dims)


# ----------------------------------------------------------------------------------------------------- outputs
@dataclass
class ThoughtDiffusionModelOutput(ModelOutput):
    """
    last_hidden_state (`(batch_size, sequence_length, hidden_size)`): final hidden states (noisy stream only).
    new_thought (`(N, *thought_dims)`): the thought decoded from this forward (N = batch rows x thought groups).
    thought_stack (`ThoughtStack`): the input stack with `new_thought` (detached) pushed.
    thought_features (`(N, hidden_size)`): the pooled hidden states `new_thought` was decoded from.
    past_key_values (`ThoughtDiffusionBlockCache`, with `use_cache=True`): the prefix cache followed by this
        call's keys and values; `crop` it to the clean part before passing it back.
    hidden_states, attentions (`tuple`, *optional*): per layer, as in transformers.
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    new_thought: Optional[torch.FloatTensor] = None
    thought_stack: Optional[ThoughtStack] = None
    thought_features: Optional[torch.FloatTensor] = None
    past_key_values: Optional[ThoughtDiffusionBlockCache] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class ThoughtDiffusionMaskedLMOutput(ModelOutput):
    """
    loss: `diffusion_loss + thought_loss_weight * thought_loss` (with `labels`).
    logits (`(batch_size, sequence_length, vocab_size)`): SUBS logits: the [MASK] logit is never predicted, an
        unmasked position has logit 0 for its own token and the dtype's minimum elsewhere. With `labels` in
        training mode None: the loss runs the head on the masked positions only.
    diffusion_loss: the ELBO-weighted masked cross-entropy per token (label smoothing applied).
    elbo: the same without label smoothing: an upper bound on the NLL per token (exp: perplexity bound).
    thought_loss, thought_consistency, thought_diversity, thought_sparsity: the auxiliary terms.
    mask_rate: fraction of the labeled tokens that were masked.
    Other fields as in `ThoughtDiffusionModelOutput`.
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    diffusion_loss: Optional[torch.FloatTensor] = None
    elbo: Optional[torch.FloatTensor] = None
    thought_loss: Optional[torch.FloatTensor] = None
    thought_consistency: Optional[torch.FloatTensor] = None
    thought_diversity: Optional[torch.FloatTensor] = None
    thought_sparsity: Optional[torch.FloatTensor] = None
    mask_rate: Optional[torch.FloatTensor] = None
    new_thought: Optional[torch.FloatTensor] = None
    thought_stack: Optional[ThoughtStack] = None
    past_key_values: Optional[ThoughtDiffusionBlockCache] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class ThoughtDiffusionGenerateOutput(ModelOutput):
    """
    sequences (`(batch_size, prompt_length + max_new_tokens)`): prompt (as given, padding included) + new tokens.
    thought_stack (`ThoughtStack`): the stack after the last step.
    history (`list[dict]`, with `return_history=True`): per denoising step: `block`, `step`, `tokens` (the canvas
        after the step), `committed` (bool, what this step committed), `forward` (False where MDLM's cache reused
        the previous logits), `thought_norm` (per row).
    num_forward_passes (`int`): model calls made.
    """

    sequences: Optional[torch.LongTensor] = None
    thought_stack: Optional[ThoughtStack] = None
    history: Optional[list] = None
    num_forward_passes: Optional[int] = None


# ----------------------------------------------------------------------------------------------------- models
class ThoughtDiffusionPreTrainedModel(PreTrainedModel):
    config_class = ThoughtDiffusionConfig
    config: ThoughtDiffusionConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ThoughtDiffusionBlock", "ThoughtStackEncoder"]
    _skip_keys_device_placement = ["thought_stack", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    # Auto class -> model class of this file, written with the config's own entry to config.json's `auto_map`.
    _remote_code_auto_map = {"AutoModel": "ThoughtDiffusionModel",
                             "AutoModelForMaskedLM": "ThoughtDiffusionForMaskedLM"}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the code that defines the model: this file and its configuration
        file beside the weights, with the configuration imported flat (`from .configuration_... import`, the only
        form transformers' remote-code loader follows), and `auto_map` naming them in config.json. The folder then
        loads with `AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)` where armada is absent."""
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
        elif isinstance(module, TimestepEmbedding):  # not saved: transformers 5 leaves it empty on load
            module.frequencies.copy_(module.sinusoid_frequencies(self.config.hidden_size))
        elif isinstance(module, LearnableTemporalPooling):
            nn.init.normal_(module.query, mean=0.0, std=std)
            nn.init.normal_(module.null, mean=0.0, std=std)
        if isinstance(module, (ThoughtDiffusionAttention, ThoughtDiffusionMLP)):
            nn.init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        if isinstance(module, ThoughtDiffusionBlock) and hasattr(module, "cross_attn"):
            nn.init.zeros_(module.cross_attn.c_proj.weight)  # the stack starts as a no-op (ThoughtDiffusionBlock)


class ThoughtDiffusionModel(ThoughtDiffusionPreTrainedModel):
    """The denoiser trunk: embeddings (+ noise level at [MASK] positions), thought-stack encoder, blocks, final LN,
    and the thought head."""

    def __init__(self, config: ThoughtDiffusionConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "absolute":
            self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if config.neighbor_tokens:
            self.neighbor_proj = nn.Linear(2 * config.neighbor_tokens * config.hidden_size, config.hidden_size,
                                           bias=False)
        self.time_embedding = TimestepEmbedding(config)
        self.drop = nn.Dropout(config.embd_pdrop)
        if config.thought_stack_size:
            self.thought_encoder = ThoughtStackEncoder(config)
            self.thought_head = ThoughtHead(config)
        self.h = nn.ModuleList([ThoughtDiffusionBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def default_positions(self, input_ids, attention_mask):
        """position_ids counting real tokens only (left padding does not shift them) and block ids."""
        if attention_mask is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return positions

    def default_blocks(self, position_ids):
        if self.config.block_length is None:
            return torch.zeros_like(position_ids)
        return position_ids // self.config.block_length

    def _self_attention_mask(self, blocks, valid, noisy_stream, past_mask, dtype):
        """Additive (B, 1, T, P + T). Full model: every real key. Block model: a key of block <= the query's; with
        the clean stream (training), noisy queries see their own noisy block and earlier clean blocks, clean queries
        see clean blocks up to their own. Prefix-cache keys (earlier blocks) are visible to every query."""
        allowed = valid[:, None, :].expand(-1, blocks.shape[1], -1)
        if self.config.block_length is not None:
            bq, bk = blocks[:, :, None], blocks[:, None, :]
            nq, nk = noisy_stream[:, :, None], noisy_stream[:, None, :]
            same = bk == bq  # boolean algebra, not torch.where: ONNX Runtime has no Where kernel for booleans
            allowed = allowed & ((nk & nq & same) | (~nk & ((bk < bq) | (~nq & same))))
        if past_mask is not None:
            allowed = torch.cat([past_mask[:, None, :].expand(-1, blocks.shape[1], -1), allowed], dim=-1)
        return _additive(allowed.unsqueeze(1), dtype)

    def _encode_stack(self, thought_stack, groups, batch, dtype):
        """Encoded memory of every row's stack(s), (B, G * M, D), and the additive mask (B, 1, T, G * M) that lets
        each token read its own group's stack only (G thought groups per row: 1, or the blocks in training)."""
        memory, memory_valid = self.thought_encoder(thought_stack, dtype)  # (B * G, M, D), (B * G, M)
        num_groups, m = thought_stack.batch_size // batch, memory.shape[1]
        memory = memory.reshape(batch, num_groups * m, -1)
        key_group = torch.arange(num_groups, device=groups.device).repeat_interleave(m)  # (G * M,)
        allowed = (groups[:, :, None] == key_group) & memory_valid.reshape(batch, 1, num_groups * m)
        return memory, _additive(allowed.unsqueeze(1), dtype), num_groups

    def _pool_thought(self, hidden, is_mask, groups, num_groups):
        """Mean final hidden state of each group's [MASK] positions, (B * G, D) (zeros where a group has none)."""
        weights = F.one_hot(groups, num_groups).to(hidden.dtype) * is_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, G)
        pooled = torch.einsum("btg,btd->bgd", weights, hidden) / weights.sum(1).clamp_min(1).unsqueeze(-1)
        return pooled.flatten(0, 1)

    def estimate_timesteps(self, input_ids, attention_mask):
        """t per row from its fraction of [MASK] among real tokens (the schedule inverted), (B,)."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rate = ((input_ids == self.config.mask_token_id) & valid).sum(1) / valid.sum(1).clamp_min(1)
        return time_for_mask_rate(rate.float(), self.config.noise_schedule).clamp_min(self.config.sampling_eps)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        timesteps: Optional[torch.Tensor] = None,
        thought_stack: Optional[ThoughtStack] = None,
        block_ids: Optional[torch.LongTensor] = None,
        thought_groups: Optional[torch.LongTensor] = None,
        clean_input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[ThoughtDiffusionBlockCache] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        r"""
        input_ids (`(batch_size, sequence_length)`): partially masked tokens (x_t).
        timesteps (`(batch_size,)` or `(batch_size, sequence_length)`, *optional*): noise level t per row or per
            token; estimated from the fraction of [MASK] per row when omitted.
        thought_stack (`ThoughtStack`, *optional*): N = batch_size x G rows (G thought groups per row); empty when
            omitted.
        block_ids, thought_groups (`(batch_size, sequence_length)`, *optional*): block of each position (default
            position // block_length) and the thought group (row of the stack within the row's G) each position
            reads and writes (default 0).
        clean_input_ids (`(batch_size, sequence_length)`, *optional*): block models in training: the clean copy run
            beside x_t (BD3-LM); its outputs are not returned.
        past_key_values (`ThoughtDiffusionBlockCache`, *optional*): clean prefix before `input_ids`.
        """
        cfg = self.config
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else cfg.output_hidden_states)
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        self._check_ids(input_ids)
        batch, length = input_ids.shape
        dtype = self.wte.weight.dtype
        if torch.is_autocast_enabled(input_ids.device.type):
            dtype = torch.get_autocast_dtype(input_ids.device.type)
        x = self._positions_and_streams(input_ids, attention_mask, position_ids, block_ids, thought_groups, timesteps,
                                        clean_input_ids, past_key_values)
        condition = x["is_mask"].unsqueeze(-1).to(dtype)
        hidden = self.wte(x["tokens"]) + condition * self.time_embedding(x["times"], dtype)
        if cfg.neighbor_tokens:
            neighbors = self.wte(x["neighbor_tokens"]) * x["neighbor_valid"].unsqueeze(-1)  # (B, T, 2k, D)
            hidden = hidden + self.neighbor_proj(neighbors.flatten(2).to(dtype))
        rotary = None
        if cfg.position_embedding_type == "absolute":
            hidden = hidden + self.wpe(x["positions"])
        else:
            rotary = rotary_cos_sin(x["positions"], cfg.head_dim, cfg.rope_theta, dtype)
        hidden = self.drop(hidden.to(dtype))
        past_mask = None if past_key_values is None else past_key_values.mask
        mask = self._self_attention_mask(x["blocks"], x["valid"], x["noisy_stream"], past_mask, dtype)

        memory = memory_mask = None
        if cfg.thought_stack_size:
            if thought_stack is None:
                thought_stack = ThoughtStack.empty(cfg, batch, input_ids.device)
            if not torch.jit.is_tracing() and thought_stack.batch_size % batch:  # (a shape check, not traced)
                raise ValueError(f"thought_stack holds {thought_stack.batch_size} rows, not a multiple of the batch "
                                 f"size {batch}")
            memory, memory_mask, num_groups = self._encode_stack(thought_stack, x["groups"], batch, dtype)

        all_hidden, all_attn, keys, values = [hidden], [], [], []
        for i, block in enumerate(self.h):
            past_k = None if past_key_values is None else past_key_values.keys[i]
            past_v = None if past_key_values is None else past_key_values.values[i]
            hidden, k, v, w = block(hidden, mask, past_k, past_v, memory, memory_mask, condition, rotary,
                                    output_attentions=output_attentions)
            if use_cache:
                keys.append(k if past_k is None else torch.cat([past_k, k], dim=2))
                values.append(v if past_v is None else torch.cat([past_v, v], dim=2))
            all_hidden.append(hidden)
            all_attn.append(w)
        hidden = self.ln_f(hidden)[:, :length]  # the noisy stream

        new_thought = features = None
        if cfg.thought_stack_size:
            features = self._pool_thought(hidden, x["is_mask"][:, :length], x["groups"][:, :length], num_groups)
            new_thought = self.thought_head(features)
            thought_stack = thought_stack.push(new_thought.detach())
        cache = None
        if use_cache:
            valid = x["valid"][:, :length]
            cache = ThoughtDiffusionBlockCache(
                keys, values, valid if past_mask is None else torch.cat([past_mask, valid], dim=1),
                input_ids if past_mask is None else torch.cat([past_key_values.tokens, input_ids], dim=1))
        out = ThoughtDiffusionModelOutput(
            last_hidden_state=hidden, new_thought=new_thought, thought_stack=thought_stack,
            thought_features=features, past_key_values=cache,
            hidden_states=self._noisy_stream(all_hidden, length) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None)
        return out if return_dict else out.to_tuple()

    @staticmethod
    def _noisy_stream(all_hidden, length):
        """Each layer's hidden states of the noisy stream: the tensors themselves when no clean stream was appended
        (so `retain_grad()` on them sees the gradient), else their first `length` positions."""
        return tuple(h if h.shape[1] == length else h[:, :length] for h in all_hidden)

    def _positions_and_streams(self, input_ids, attention_mask, position_ids, block_ids, thought_groups, timesteps,
                               clean_input_ids, past_key_values=None):
        """Per-position tensors (B, T) of one call, with defaults filled in: tokens, positions, blocks, valid (real
        token), thought groups, times, is_mask and noisy_stream. With `clean_input_ids` every tensor is doubled
        to (B, 2T): [x_t ; x_0], noisy_stream True on the first half."""
        length = input_ids.shape[1]
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = self.default_positions(input_ids, attention_mask) if position_ids is None else position_ids
        blocks = self.default_blocks(positions) if block_ids is None else block_ids
        groups = torch.zeros_like(input_ids) if thought_groups is None else thought_groups
        times = self.estimate_timesteps(input_ids, attention_mask) if timesteps is None else timesteps
        times = times.to(input_ids.device).float()
        times = times.unsqueeze(1).expand(-1, length) if times.dim() == 1 else times
        x = {"tokens": input_ids, "positions": positions, "blocks": blocks, "valid": valid, "groups": groups,
             "times": times, "is_mask": (input_ids == self.config.mask_token_id) & valid,
             "noisy_stream": torch.zeros_like(valid)}
        k = self.config.neighbor_tokens
        if k:
            streams = [input_ids] if clean_input_ids is None else [input_ids, clean_input_ids]
            neighbors, x["neighbor_valid"], earlier = self._neighbors(streams, valid, blocks, k, past_key_values)
            x["neighbor_tokens"] = neighbors[0]
        if clean_input_ids is None:
            return x
        x = {key: value.repeat(1, 2, *([1] * (value.dim() - 2))) for key, value in x.items()}
        x["tokens"] = torch.cat([input_ids, clean_input_ids], dim=1)
        if k:  # a noisy block reads its neighbours in earlier blocks from the clean copy (as when sampling)
            noisy, clean = neighbors
            x["neighbor_tokens"] = torch.cat([torch.where(earlier, clean, noisy), clean], dim=1)
        x["is_mask"][:, length:] = False
        x["noisy_stream"][:, :length] = True
        return x

    @staticmethod
    def _neighbors(streams, valid, blocks, k, past_key_values=None):
        """For each token tensor of `streams` ((B, T) each, sharing `valid` and `blocks`), the k tokens on each side
        of every position, (B, T, 2k) (offsets -k..-1, 1..k); then, shared by the streams, whether each is a real
        token the position may read (left: any; right: its own block only) and whether it lies in an earlier block.
        The cache's last tokens precede the first positions; outside the text there are none."""
        length = valid.shape[1]
        if past_key_values is not None:
            past = past_key_values.tokens
            streams = [torch.cat([past, ids], dim=1) for ids in streams]
            valid = torch.cat([past_key_values.mask.bool(), valid], dim=1)
            blocks = torch.cat([torch.zeros_like(past) - 1, blocks], dim=1)  # earlier than any block of the call
        padded = [F.pad(ids, (k, k), value=0) for ids in streams]
        ok, block = F.pad(valid, (k, k), value=False), F.pad(blocks, (k, k), value=-1)
        end, own_block = ok.shape[1] - k, blocks[:, -length:]
        offsets = (*range(-k, 0), *range(1, k + 1))
        windows = [slice(end - length + offset, end + offset) for offset in offsets]  # 2k static slices
        same = [block[:, window] == own_block for window in windows]
        readable = [ok[:, w] if offset < 0 else ok[:, w] & s for offset, w, s in zip(offsets, windows, same)]
        tokens = [torch.stack([ids[:, window] for window in windows], dim=-1) for ids in padded]
        return tokens, torch.stack(readable, dim=-1), ~torch.stack(same, dim=-1)

    def _check_ids(self, input_ids):
        if input_ids is None:
            raise ValueError("`input_ids` is required")
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling() and input_ids.numel():
            if input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size:
                raise ValueError(f"token ids must be in [0, vocab_size={self.config.vocab_size}), got values in "
                                 f"[{int(input_ids.min())}, {int(input_ids.max())}]")


class ThoughtDiffusionForMaskedLM(ThoughtDiffusionPreTrainedModel):
    """The denoiser with its (tied) output head, the diffusion loss and the samplers (`generate_with_stack`,
    `generate`)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    accepts_loss_kwargs = False  # the loss is a per-token ELBO mean: Trainer scales it for gradient accumulation

    def __init__(self, config: ThoughtDiffusionConfig):
        super().__init__(config)
        self.transformer = ThoughtDiffusionModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def prediction_logits(self, hidden):
        """Output head with the [MASK] logit at the dtype's minimum (never predicted)."""
        logits = self.lm_head(hidden)
        mask_column = torch.arange(logits.shape[-1], device=logits.device) == self.config.mask_token_id
        return logits.masked_fill(mask_column, torch.finfo(logits.dtype).min)

    def subs_logits(self, hidden, input_ids):
        """SUBS: [MASK] is never predicted; an unmasked position puts all its mass on its own token."""
        logits = self.prediction_logits(hidden)
        low = torch.finfo(logits.dtype).min
        carry = torch.full_like(logits, low).scatter(-1, input_ids.unsqueeze(-1), 0.0)
        return torch.where((input_ids == self.config.mask_token_id).unsqueeze(-1), logits, carry)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        timesteps: Optional[torch.Tensor] = None,
        thought_stack: Optional[ThoughtStack] = None,
        labels: Optional[torch.LongTensor] = None,
        block_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[ThoughtDiffusionBlockCache] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
        **kwargs,
    ):
        r"""
        Without `labels`: one denoising call on `input_ids` as given (x_t, [MASK] where unknown); `timesteps`
        defaults to the fraction of [MASK] per row.

        labels (`(batch_size, sequence_length)`, *optional*): the clean tokens (-100: not a target, never masked;
            usually `labels = input_ids`). The model then masks `input_ids` itself: t per row (per block with
            `block_length`) drawn antithetically from `config.train_time_range` unless `timesteps` is given, each
            labeled real token masked with probability m(t), and returns the ELBO-weighted cross-entropy on the
            masked positions (plus the auxiliary thought losses).
        generator (`torch.Generator`, *optional*, on the inputs' device): draws t and the masks with `labels`. In
            evaluation (`model.eval()`) it defaults to a generator seeded with 0, so the same batch always gives the
            same loss (`Trainer.evaluate` is reproducible); in training, torch's global random state.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None:
            out = self._diffusion_loss(input_ids, attention_mask, position_ids, timesteps, thought_stack, labels,
                                       output_attentions, output_hidden_states, generator)
        else:
            base = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    timesteps=timesteps, thought_stack=thought_stack, block_ids=block_ids,
                                    past_key_values=past_key_values, use_cache=use_cache,
                                    output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                    return_dict=True)
            out = ThoughtDiffusionMaskedLMOutput(
                logits=self.subs_logits(base.last_hidden_state, input_ids), new_thought=base.new_thought,
                thought_stack=base.thought_stack, past_key_values=base.past_key_values,
                hidden_states=base.hidden_states, attentions=base.attentions)
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------ training objective
    def sample_times(self, shape, device, generator=None):
        """Antithetic t in `config.train_time_range`: one uniform u, then (u + i / n) mod 1 for the n draws."""
        n = math.prod(shape)
        u = (torch.rand((), device=device, generator=generator) + torch.arange(n, device=device) / n) % 1
        low, high = self.config.train_time_range
        return (low + (high - low) * u)[torch.randperm(n, device=device, generator=generator)].view(shape)

    def _diffusion_loss(self, input_ids, attention_mask, position_ids, timesteps, thought_stack, labels,
                        output_attentions, output_hidden_states, generator=None):
        cfg, model = self.config, self.transformer
        input_ids = input_ids if input_ids is not None else labels.clamp_min(0)
        batch, length = input_ids.shape
        device = input_ids.device
        if generator is None and not self.training:  # evaluation: the same batch, the same t, masks and loss
            generator = torch.Generator(device=device).manual_seed(0)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        targets = labels.to(device)
        corruptible = (targets != -100) & valid & (input_ids != cfg.mask_token_id)
        position_ids = model.default_positions(input_ids, attention_mask) if position_ids is None else position_ids
        blocks = model.default_blocks(position_ids)
        num_groups = 1 if cfg.block_length is None else -(-length // cfg.block_length)
        groups = blocks.clamp(0, num_groups - 1)  # time and thought groups: the row, or each block of it

        complementary = self.training and cfg.complementary_masking and timesteps is None
        if timesteps is None:
            timesteps = self.sample_times((batch, num_groups), device, generator).gather(1, groups)
        timesteps = timesteps.to(device).float()
        timesteps = timesteps.unsqueeze(1).expand(-1, length) if timesteps.dim() == 1 else timesteps
        uniform = torch.rand(batch, length, device=device, generator=generator)  # one per token: masks are nested
        if complementary:
            tensors = (input_ids, attention_mask, targets, corruptible, position_ids, blocks, groups)
            tensors, timesteps, uniform, thought_stack = self._complementary_copy(tensors, timesteps, uniform,
                                                                                  thought_stack)
            input_ids, attention_mask, targets, corruptible, position_ids, blocks, groups = tensors
            batch *= 2
        masked = corruptible & (uniform < mask_rate(timesteps, cfg.noise_schedule))
        noisy = input_ids.masked_fill(masked, cfg.mask_token_id)
        clean = input_ids if cfg.block_length is not None else None
        kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, block_ids=blocks,
                      thought_groups=groups if cfg.block_length is not None else None, clean_input_ids=clean)

        stack = None
        if cfg.thought_stack_size:
            stack = thought_stack or ThoughtStack.empty(cfg, batch * num_groups, device)
            if self.training and cfg.thought_train_prob > 0 and torch.rand(()).item() < cfg.thought_train_prob:
                stack = self._push_noisier_thoughts(stack, input_ids, corruptible, uniform, timesteps, kwargs)
        out = model(noisy, timesteps=timesteps, thought_stack=stack, output_attentions=output_attentions,
                    output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        # the head runs on masked positions only: unmasked ones carry over under SUBS and cost nothing (full
        # logits are returned in eval mode only, training does not need them)
        logits = None if self.training else self.subs_logits(out.last_hidden_state, noisy)
        logp = F.log_softmax(self.prediction_logits(out.last_hidden_state[masked]).float(), dim=-1)  # (n, V)
        nll = -logp.gather(-1, targets[masked].unsqueeze(-1)).squeeze(-1)
        weight = elbo_weight(timesteps[masked], cfg.noise_schedule)
        per_token = corruptible.sum().clamp_min(1)
        elbo = (weight * nll).sum() / per_token
        if cfg.label_smoothing > 0:
            mask_column = torch.arange(logp.shape[-1], device=device) == cfg.mask_token_id
            smooth = -logp.masked_fill(mask_column, 0.0).sum(-1) / (logp.shape[-1] - 1)
            diffusion_loss = (weight * ((1 - cfg.label_smoothing) * nll + cfg.label_smoothing * smooth)).sum()
            diffusion_loss = diffusion_loss / per_token
        else:
            diffusion_loss = elbo

        parts = {}
        loss = diffusion_loss
        if cfg.thought_stack_size:
            parts = self.thought_losses(out.new_thought, stack)
            loss = loss + cfg.thought_loss_weight * parts["thought_loss"]
        return ThoughtDiffusionMaskedLMOutput(
            loss=loss, logits=logits, diffusion_loss=diffusion_loss.detach(), elbo=elbo.detach(),
            mask_rate=masked.sum() / corruptible.sum().clamp_min(1), new_thought=out.new_thought,
            thought_stack=out.thought_stack, hidden_states=out.hidden_states, attentions=out.attentions,
            **{k: (v if k == "thought_loss" else v.detach()) for k, v in parts.items()})

    def _complementary_copy(self, tensors, timesteps, uniform, thought_stack):
        """The batch twice (`tensors` concatenated with themselves), the second copy masked exactly where the first
        is not: its uniforms are 1 - u and its time has mask rate 1 - m(t), and 1 - u < 1 - m(t) iff u > m(t)."""
        cfg = self.config
        other = time_for_mask_rate(1 - mask_rate(timesteps, cfg.noise_schedule), cfg.noise_schedule)
        if thought_stack is not None:
            thought_stack = thought_stack.index_select(torch.arange(thought_stack.batch_size).repeat(2))
        return ([None if x is None else torch.cat([x, x]) for x in tensors],
                torch.cat([timesteps, other.clamp_min(cfg.sampling_eps)]), torch.cat([uniform, 1 - uniform]),
                thought_stack)

    def _push_noisier_thoughts(self, stack, input_ids, corruptible, uniform, timesteps, kwargs):
        """`thought_train_hops` passes at times between t and 1 (noisiest first, masks nested in each other's),
        transformer without gradient, thought head with gradient; each pass pushes its thought."""
        cfg, model = self.config, self.transformer
        hops = cfg.thought_train_hops
        fractions = torch.rand(hops, *timesteps.shape[:1], device=input_ids.device).sort(0, descending=True).values
        for hop in range(hops):
            t = timesteps + (1 - timesteps) * fractions[hop].unsqueeze(-1)
            noisy = input_ids.masked_fill(corruptible & (uniform < mask_rate(t, cfg.noise_schedule)),
                                          cfg.mask_token_id)
            with torch.no_grad():
                features = model(noisy, timesteps=t, thought_stack=stack, return_dict=True, **kwargs).thought_features
            stack = stack.push(model.thought_head(features.detach()))
        return stack

    def thought_losses(self, thought, stack):
        """Auxiliary terms on the new thoughts (N, *dims) given the stack they were conditioned on."""
        cfg = self.config
        flat = thought.flatten(1).float()
        newest, has_newest = stack.newest()
        squared = (flat - newest.flatten(1).float().detach()).pow(2).mean(-1)
        consistency = (squared * has_newest).sum() / has_newest.sum().clamp_min(1)
        unit = F.normalize(flat, dim=-1)
        n = flat.shape[0]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=flat.device)
        diversity = (unit @ unit.T).pow(2)[off_diagonal].sum() / max(n * (n - 1), 1)
        sparsity = flat.abs().mean()
        total = (cfg.thought_consistency_weight * consistency + cfg.thought_diversity_weight * diversity
                 + cfg.thought_sparsity_weight * sparsity)
        return {"thought_loss": total, "thought_consistency": consistency, "thought_diversity": diversity,
                "thought_sparsity": sparsity}

    # ------------------------------------------------------------------ sampling
    def _check_sampling(self, prompt_length, max_new_tokens, num_steps, temperature, top_k, top_p, remasking,
                        block_length, confidence_threshold):
        """Validates the sampler's arguments; returns (block_length, number of blocks)."""
        cfg = self.config
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= max_new_tokens:
            raise ValueError(f"num_steps must be an integer in [1, max_new_tokens={max_new_tokens}] (at least one "
                             f"token per step), got {num_steps!r}")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be > 0 (greedy decoding: top_k=1), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
        if confidence_threshold is not None and not 0 < confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold must be in (0, 1] or None, got {confidence_threshold!r}")
        if cfg.block_length is not None and block_length not in (None, cfg.block_length):
            raise ValueError(f"this model attends block-causally in blocks of config.block_length={cfg.block_length}"
                             f" tokens, so block_length must be None or {cfg.block_length}, got {block_length!r}")
        block_length = block_length or cfg.block_length or max_new_tokens
        if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1 or \
                max_new_tokens % block_length:
            raise ValueError(f"block_length must be a positive integer dividing max_new_tokens={max_new_tokens}, got "
                             f"{block_length!r}")
        num_blocks = max_new_tokens // block_length
        if num_steps < num_blocks:
            raise ValueError(f"num_steps must be at least the number of blocks ({max_new_tokens} / {block_length} = "
                             f"{num_blocks}), got {num_steps}")
        if prompt_length + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt ({prompt_length}) + max_new_tokens ({max_new_tokens}) = "
                             f"{prompt_length + max_new_tokens} tokens exceed max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        return block_length, num_blocks

    @staticmethod
    def _propose(logits, temperature, top_k, top_p, generator):
        """Sampled tokens (B, L) from the filtered, tempered distribution and their confidence: the probability of
        the token under the tempered, unfiltered distribution (so greedy decoding still ranks positions)."""
        logits = logits.float() / temperature
        probs = logits.softmax(-1)
        filtered = logits
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if top_p is not None and top_p < 1:
            sorted_logits, order = filtered.sort(-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
            filtered = filtered.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        if top_k == 1:
            tokens = filtered.argmax(-1)
        else:
            flat = filtered.softmax(-1).flatten(0, 1)
            tokens = torch.multinomial(flat, 1, generator=generator).view(logits.shape[:-1])
        return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def _select(self, confidence, masked, step, steps, remasking, threshold, generator):
        """Which masked positions (B, L) this step commits. low_confidence: each row's ceil(remaining / steps left)
        most confident (LLaDA); random: each masked token with MDLM's reverse-process probability
        (m(t) - m(s)) / m(t) for this step's t -> s. A threshold adds every position above it (Fast-dLLM)."""
        steps_left = steps - step
        if remasking == "low_confidence":
            remaining = masked.sum(-1, keepdim=True)
            quota = -(-remaining // steps_left)  # ceil
            ranked = confidence.masked_fill(~masked, -1.0)
            rank = ranked.argsort(-1, descending=True).argsort(-1)
            commit = masked & (rank < quota)
        else:
            t = torch.tensor([1 - step / steps, 1 - (step + 1) / steps], device=masked.device)
            rate = mask_rate(t, self.config.noise_schedule)
            probability = 1.0 if steps_left == 1 else float((rate[0] - rate[1]) / rate[0])
            draw = torch.rand(masked.shape, device=masked.device, generator=generator)
            commit = masked & (draw < probability)
        if threshold is not None:
            commit = commit | (masked & (confidence >= threshold))
        return commit

    def _denoise_step(self, input_ids, attention_mask, position_ids, block_ids, timesteps, thought_stack,
                      past_key_values, use_cache, keep):
        """The sampler's model call: SUBS logits of the positions `keep` (a slice: the block being denoised; the
        head runs on those only), the new thought stack and the cache (None without `use_cache`). The ONNX Runtime
        class (armada.onnxruntime) replaces this method and reuses the rest of the sampler."""
        out = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               block_ids=block_ids, timesteps=timesteps, thought_stack=thought_stack,
                               past_key_values=past_key_values, use_cache=use_cache, return_dict=True)
        logits = self.subs_logits(out.last_hidden_state[:, keep], input_ids[:, keep])
        return logits, out.thought_stack, out.past_key_values

    @torch.no_grad()
    def generate_with_stack(self, prompt_ids=None, max_new_tokens=32, num_steps=None, temperature=1.0, top_k=None,
                            top_p=None, remasking="low_confidence", block_length=None, confidence_threshold=None,
                            initial_stack=None, return_history=False, attention_mask=None, batch_size=1,
                            use_block_cache=None, generator=None):
        r"""
        Sample `max_new_tokens` after `prompt_ids` (B, P) (left padding or any padding with `attention_mask`;
        None: unconditional, `batch_size` rows). The new tokens start as [MASK] and are denoised block by block
        (semi-autoregressive, blocks of `block_length`, default `config.block_length` or one block), with
        `num_steps` steps spread over the blocks (default one token per step). Each step runs the model (its
        thought is pushed onto the stack), proposes a token for every masked position (`temperature`, `top_k`,
        `top_p`; greedy: `top_k=1`) and commits some of them (`remasking`, `confidence_threshold`); committed and
        prompt tokens never change. When a step committed nothing (possible with `remasking="random"`), the next
        step reuses its logits without calling the model (MDLM's cache). `use_block_cache` (default: on for block
        models) keeps the keys/values of the prompt and finished blocks (exact: block-causal attention). Returns a
        `ThoughtDiffusionGenerateOutput`.
        """
        cfg = self.config
        device = self.device
        if prompt_ids is None:
            prompt_ids = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        prompt_ids = prompt_ids.to(device)
        batch, width = prompt_ids.shape
        num_steps = max_new_tokens if num_steps is None else num_steps
        block_length, num_blocks = self._check_sampling(width, max_new_tokens, num_steps, temperature, top_k, top_p,
                                                        remasking, block_length, confidence_threshold)
        if use_block_cache is None:
            use_block_cache = cfg.block_length is not None
        if use_block_cache and cfg.block_length is None:
            raise ValueError("use_block_cache needs a block-causal model (config.block_length set); this model "
                             "attends bidirectionally over the whole sequence, so earlier blocks change with later "
                             "ones")
        stack = None
        if cfg.thought_stack_size:
            stack = initial_stack if initial_stack is not None else ThoughtStack.empty(cfg, batch, device)
            if stack.batch_size != batch:
                raise ValueError(f"initial_stack holds {stack.batch_size} rows but there are {batch} prompts")

        prompt_mask = torch.ones_like(prompt_ids) if attention_mask is None else attention_mask.to(device).long()
        canvas = torch.cat([prompt_ids, prompt_ids.new_full((batch, max_new_tokens), cfg.mask_token_id)], dim=1)
        valid = torch.cat([prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)], dim=1)
        positions = (valid.cumsum(-1) - 1).clamp_min(0)
        columns = torch.arange(canvas.shape[1], device=device)
        blocks = torch.div(columns - width, block_length, rounding_mode="floor").expand(batch, -1)
        if cfg.block_length is None:
            blocks = torch.zeros_like(blocks)
        steps_per_block = [num_steps // num_blocks + (j < num_steps % num_blocks) for j in range(num_blocks)]

        history, cache, logits, forward_passes = [], None, None, 0
        for j, steps in enumerate(steps_per_block):
            lo, hi = width + j * block_length, width + (j + 1) * block_length
            changed = True
            for step in range(steps):
                masked = canvas[:, lo:hi] == cfg.mask_token_id
                if changed:
                    start = (cache.length if cache is not None else 0) if use_block_cache else 0
                    end = hi if cfg.block_length is not None else canvas.shape[1]
                    rate = masked.float().mean(-1)
                    logits, stack, cache = self._denoise_step(
                        canvas[:, start:end], valid[:, start:end], positions[:, start:end], blocks[:, start:end],
                        time_for_mask_rate(rate, cfg.noise_schedule).clamp_min(cfg.sampling_eps), stack, cache,
                        use_block_cache, slice(lo - start, hi - start))
                    if use_block_cache:
                        cache = cache.crop(lo)  # the prompt and finished blocks are clean now
                    forward_passes += 1
                proposal, confidence = self._propose(logits, temperature, top_k, top_p, generator)
                commit = self._select(confidence, masked, step, steps, remasking, confidence_threshold, generator)
                canvas[:, lo:hi] = torch.where(commit, proposal, canvas[:, lo:hi])
                if return_history:
                    history.append({"block": j, "step": step, "tokens": canvas.clone(), "committed": commit.clone(),
                                    "forward": changed, "thought_norm": None if stack is None else
                                    stack.newest()[0].flatten(1).norm(dim=-1)})
                changed = bool(commit.any())
                if not bool((canvas[:, lo:hi] == cfg.mask_token_id).any()):
                    break  # threshold decoding finished the block early
        return ThoughtDiffusionGenerateOutput(sequences=canvas, thought_stack=stack,
                                              history=history if return_history else None,
                                              num_forward_passes=forward_passes)

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=None, num_steps=None, do_sample=None,
                 temperature=None, top_k=None, top_p=None, generation_config=None, return_dict_in_generate=False,
                 **kwargs):
        """`generate()` as users call it, mapped onto `generate_with_stack`: greedy (top_k=1) unless
        `do_sample=True`; returns prompt + new tokens (or the full output with `return_dict_in_generate`). Other
        keywords (`remasking`, `block_length`, `confidence_threshold`, `initial_stack`, ...) pass through."""
        # (transformers 5 sets `generation_config` only on GenerationMixin models)
        config = generation_config or getattr(self, "generation_config", None)
        max_new_tokens = max_new_tokens or getattr(config, "max_new_tokens", None) or 20
        do_sample = do_sample if do_sample is not None else bool(getattr(config, "do_sample", False))
        if do_sample:
            temperature = temperature if temperature is not None else getattr(config, "temperature", 1.0) or 1.0
            top_k = top_k if top_k is not None else getattr(config, "top_k", None)
            top_p = top_p if top_p is not None else getattr(config, "top_p", None)
        else:
            temperature, top_k, top_p = 1.0, 1, None
        for unused in ("pad_token_id", "eos_token_id", "use_cache"):
            kwargs.pop(unused, None)
        out = self.generate_with_stack(input_ids, max_new_tokens=max_new_tokens, num_steps=num_steps,
                                       temperature=temperature, top_k=top_k, top_p=top_p,
                                       attention_mask=attention_mask, **kwargs)
        return out if return_dict_in_generate else out.sequences


__all__ = ["ThoughtDiffusionForMaskedLM", "ThoughtDiffusionModel", "ThoughtDiffusionPreTrainedModel",
           "ThoughtStack", "ThoughtStackEncoder", "LearnableTemporalPooling", "ThoughtDiffusionBlockCache",
           "ThoughtDiffusionGenerateOutput", "mask_rate", "elbo_weight", "time_for_mask_rate"]
