"""AgencyGPT2: GPT-2 whose attention heads carry gates, agency states and consent, and can be physically pruned.

Read top to bottom: attention -> MLP -> block -> frozen baseline (fusion) -> PreTrainedModel base (pruning, agency
dynamics) -> base model -> causal-LM head. Parameter names follow `GPT2LMHeadModel`, so a GPT-2 state dict loads
as is. Head gates, agency states and consent are [n_layer, n_head] tensors applied by broadcasting: there is no
Python loop over heads on the forward path.
"""

import math
import os
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import Conv1D

from ..configuration.configuration_agency_gpt2 import AGENCY_STATES, AgencyGPT2Config

# transformers 4.57 names the cache `past_key_values`; 5.x renamed it `cache` (in generate, forward and outputs) and
# warns on the old name. Forward passes accept both; outputs use the field the installed version declares.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

ACTIVE, OVERLOADED, MISALIGNED, WITHDRAWN = range(4)
# The agency state of every head: [n_layer, n_head] buffers saved with the model, name -> (dtype, value at reset).
AGENCY_BUFFERS = {
    "head_state": (torch.long, ACTIVE),
    "consent": (torch.float32, 1.0),
    "utilization": (torch.float32, 0.0),
    "importance": (torch.float32, 0.0),
    "gate_grad_ema": (torch.float32, 0.0),
    "observations": (torch.long, 0),
    "state_age": (torch.long, 0),
    "overload_streak": (torch.long, 0),
}
# AgencyGPT2Model attributes a GPT-2 checkpoint does not have (from_gpt2 leaves them at their initial values).
AGENCY_ONLY = ("head_gates", *AGENCY_BUFFERS, "unet_skips", "baseline", "fusion_adapters", "fusion_gates", "router",
               "hybrid_gate")


def _is_tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def _check_inputs(input_ids, inputs_embeds, attention_mask, past_length=0):
    """Clear errors for an empty input and for a 2-D attention_mask whose shape is not (batch, past + input length)
    (instead of a reshape or index error deep inside, or a mask silently applied to the wrong positions)."""
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is None or _is_tracing():
        return
    batch, length = tokens.shape[:2]
    if length == 0:
        raise ValueError(f"The input has no tokens (input shape {tuple(tokens.shape)}); give at least one token.")
    if attention_mask is not None and attention_mask.dim() == 2 and \
            tuple(attention_mask.shape) != (batch, past_length + length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must be (batch, past + input "
                         f"length) = ({batch}, {past_length + length}) for this input and cache.")


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


def _slice_conv1d(layer: Conv1D, index: torch.Tensor, dim: int) -> Conv1D:
    """A new Conv1D keeping `index` along `dim` of its (in, out) weight: dim=1 slices outputs, dim=0 inputs."""
    index = index.to(layer.weight.device)
    weight = layer.weight.index_select(dim, index).detach().clone()
    bias = layer.bias.detach().clone() if dim == 0 else layer.bias.index_select(0, index).detach().clone()
    new = Conv1D(weight.shape[1], weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    new.bias.requires_grad_(layer.bias.requires_grad)
    return new


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


class AgencyGPT2Attention(nn.Module):
    """Causal self-attention over the heads this layer still has; each head's output is scaled by its gate."""

    def __init__(self, config: AgencyGPT2Config, layer_idx: int, cache_idx: Optional[int] = None, prunable=True):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.cache_idx = layer_idx if cache_idx is None else cache_idx
        self.head_dim = config.n_embd // config.n_head
        self.prunable = prunable
        kept = self.kept_heads()
        self.num_heads = len(kept)
        # Original indices of the heads kept here; gates/states are looked up through it after pruning.
        self.register_buffer("head_index", kept, persistent=False)
        inner = self.num_heads * self.head_dim
        self.c_attn = Conv1D(3 * inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, inner)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.attn_dropout_p = config.attn_pdrop
        self.scaling = (self.head_dim**-0.5) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        self.is_causal = True

    def kept_heads(self) -> torch.Tensor:
        """Original indices of the heads this layer has by its config (config.pruned_heads), in order."""
        kept = self.config.kept_heads(self.layer_idx) if self.prunable else range(self.config.n_head)
        return torch.tensor(list(kept), dtype=torch.long)

    def prune_heads(self, heads):
        """Remove the heads with original indices `heads` (those already gone are ignored)."""
        current = self.head_index.tolist()
        remove = set(heads) & set(current)
        if not remove:
            return
        keep = torch.tensor([p for p, h in enumerate(current) if h not in remove], dtype=torch.long)
        cols = (keep[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()
        inner = self.num_heads * self.head_dim
        self.c_attn = _slice_conv1d(self.c_attn, torch.cat([cols, cols + inner, cols + 2 * inner]), dim=1)
        self.c_proj = _slice_conv1d(self.c_proj, cols, dim=0)
        self.head_index = self.head_index[keep.to(self.head_index.device)]
        self.num_heads = len(keep)

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_scale: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        cache_position: Optional[torch.LongTensor] = None,
        output_attentions: bool = False,
        is_causal: bool = False,
    ):
        bsz, seq_len, _ = hidden_states.shape
        if self.num_heads == 0:  # every head of this layer was pruned: the sublayer reduces to c_proj's bias
            if past_key_values is not None:  # keep the cache's length bookkeeping for this layer
                empty = hidden_states.new_zeros(bsz, 0, seq_len, self.head_dim)
                past_key_values.update(empty, empty, self.cache_idx, {"cache_position": cache_position})
            out = self.c_proj.bias.to(hidden_states.dtype).expand(bsz, seq_len, -1)
            return self.resid_dropout(out), None

        query, key, value = self.c_attn(hidden_states).split(self.num_heads * self.head_dim, dim=2)
        shape = (bsz, seq_len, self.num_heads, self.head_dim)
        query = query.view(shape).transpose(1, 2)  # (B, nh, T, hs)
        key = key.view(shape).transpose(1, 2)
        value = value.view(shape).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.cache_idx, {"cache_position": cache_position})

        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager" and not output_attentions:
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attn_dropout_p if self.training else 0.0,
            scaling=self.scaling,
            is_causal=is_causal,
        )  # (B, T, nh, hs)

        # Gates, agency state and consent: one broadcast multiply over the heads (None: every scale is 1).
        if head_scale is not None:
            attn_output = attn_output * head_scale.to(attn_output.dtype).view(1, 1, -1, 1)
        attn_output = attn_output.reshape(bsz, seq_len, -1)
        attn_output = self.resid_dropout(self.c_proj(attn_output))
        return attn_output, attn_weights


class AgencyGPT2MLP(nn.Module):
    def __init__(self, config: AgencyGPT2Config):
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.c_fc = Conv1D(inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, inner)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states):
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class AgencyGPT2Block(GradientCheckpointingLayer):
    def __init__(self, config: AgencyGPT2Config, layer_idx: int, cache_idx: Optional[int] = None, prunable=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = AgencyGPT2Attention(config, layer_idx, cache_idx, prunable)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = AgencyGPT2MLP(config)

    def forward(
        self,
        hidden_states,
        head_scale,
        attention_mask=None,
        past_key_values=None,
        cache_position=None,
        output_attentions=False,
        is_causal=False,
    ):
        attn_output, attn_weights = self.attn(
            self.ln_1(hidden_states),
            head_scale,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            cache_position=cache_position,
            output_attentions=output_attentions,
            is_causal=is_causal,
        )
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, attn_weights


class AgencyGPT2ZeroInitLinear(nn.Linear):
    """A linear layer initialized to zero, so the path it opens starts closed (the model stays exactly GPT-2)."""


class AgencyGPT2FusionAdapter(nn.Module):
    """Bottleneck adapter applied to a baseline hidden state before it is mixed in by a (zero-initialized) gate."""

    def __init__(self, config: AgencyGPT2Config):
        super().__init__()
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.down = nn.Linear(config.n_embd, config.fusion_adapter_dim)
        self.up = nn.Linear(config.fusion_adapter_dim, config.n_embd)

    def forward(self, hidden_states):
        return self.up(F.gelu(self.down(self.ln(hidden_states))))


class AgencyGPT2Baseline(nn.Module):
    """A frozen, unpruned GPT-2 run in lock-step with the agency model; its per-layer hidden states feed fusion.

    Its blocks use cache slots n_layer..2*n_layer-1 of the same `Cache`, so generation with a cache just works.
    """

    def __init__(self, config: AgencyGPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(
            [AgencyGPT2Block(config, i, cache_idx=config.n_layer + i, prunable=False) for i in range(config.n_layer)]
        )
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.requires_grad_(False)


class AgencyGPT2PreTrainedModel(PreTrainedModel):
    config_class = AgencyGPT2Config
    config: AgencyGPT2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AgencyGPT2Block"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$", r"\.attn\.masked_bias$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            raise _broken_weights_error(error, pretrained_model_name_or_path) from error

    # Auto class -> model class of this file, written with the config's own entry to config.json's `auto_map`.
    _remote_code_auto_map = {"AutoModel": "AgencyGPT2Model", "AutoModelForCausalLM": "AgencyGPT2ForCausalLM"}

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
        if isinstance(module, AgencyGPT2ZeroInitLinear):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, Conv1D)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.zeros_(module.bias)
            nn.init.ones_(module.weight)
        elif isinstance(module, AgencyGPT2Model):
            nn.init.ones_(module.head_gates)
            module.reset_agency_state()
            module.state_scale.copy_(module.state_scales())  # not saved: transformers 5 leaves it empty on load
            if module.fusion_gates is not None:
                nn.init.zeros_(module.fusion_gates)
            if module.hybrid_gate is not None:
                nn.init.zeros_(module.hybrid_gate)
        # GPT-2's scaled init of the residual projections (2 residual sublayers per block).
        if isinstance(module, (AgencyGPT2Attention, AgencyGPT2MLP)):
            nn.init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        if isinstance(module, AgencyGPT2Attention):
            module.head_index.copy_(module.kept_heads())  # not saved: transformers 5 leaves it empty on load

    # ------------------------------------------------------------------ pruning
    def prune_heads(self, heads_to_prune: dict):
        """Physically remove heads: `{layer: [original head indices]}`. Heads already pruned are ignored.

        Slices the q/k/v columns of `c_attn` and the rows of `c_proj`; layers may keep different head counts and a
        layer with no head left skips attention. `config.pruned_heads` records the union, so `save_pretrained` ->
        `from_pretrained` rebuilds the pruned shapes.
        """
        base = self.base_model
        cfg = self.config
        merged = {layer: set(heads) for layer, heads in cfg.pruned_heads.items()}
        for layer in heads_to_prune:
            if not isinstance(layer, int) or not -cfg.n_layer <= layer < cfg.n_layer:
                raise ValueError(f"Cannot prune layer {layer!r}: allowed layers are 0..{cfg.n_layer - 1} (or "
                                 f"-{cfg.n_layer}..-1 counted from the end).")
        heads_to_prune = {layer % cfg.n_layer: heads for layer, heads in heads_to_prune.items()}  # -1: the last
        for layer, heads in heads_to_prune.items():
            heads = list(heads)
            bad = [h for h in heads if not isinstance(h, int) or not 0 <= h < cfg.n_head]
            if bad:
                raise ValueError(f"Cannot prune heads {bad} of layer {layer}: allowed heads are 0..{cfg.n_head - 1}.")
            merged.setdefault(layer, set()).update(heads)
        if sum(len(h) for h in merged.values()) >= cfg.n_layer * cfg.n_head:
            raise ValueError(
                f"Pruning {heads_to_prune} would remove every head of the model ({cfg.n_layer * cfg.n_head}); "
                "at least one head must remain."
            )
        for layer, heads in heads_to_prune.items():
            base.h[layer].attn.prune_heads(list(heads))
        cfg.pruned_heads = {layer: sorted(heads) for layer, heads in sorted(merged.items()) if heads}

    def num_heads_per_layer(self) -> list:
        return [block.attn.num_heads for block in self.base_model.h]

    def pruned_head_mask(self) -> torch.Tensor:
        """[n_layer, n_head] bool: True where a head was physically removed."""
        mask = torch.zeros(self.config.n_layer, self.config.n_head, dtype=torch.bool)
        for layer, heads in self.config.pruned_heads.items():
            mask[layer, heads] = True
        return mask

    # ------------------------------------------------------------------ agency
    def measure_utilization(self, input_ids, attention_mask=None):
        """Run a no-grad forward that materializes attention and fold its entropy into the utilization EMA."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True,
                                  use_cache=False)
        self.train(was_training)
        self.observe_attentions(out.attentions, attention_mask)
        return self.base_model.utilization.clone()

    def observe_attentions(self, attentions, attention_mask=None):
        """Update the per-head utilization EMA from attention probabilities (one tensor per layer, (B, nh, T, S)).

        Utilization is the attention entropy of each query row divided by log(number of keys it may see), so 0
        means a head always attends to a single token and 1 means uniform attention; rows that can see one key
        only, and padding queries, are left out.
        """
        base = self.base_model
        entropy = torch.full_like(base.utilization, float("nan"))
        for layer, probs in enumerate(attentions):
            if probs is None or probs.shape[1] == 0:
                continue
            probs = probs.detach().float()
            visible = (probs > 0).sum(-1)  # (B, nh, T)
            row_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
            normalized = row_entropy / visible.clamp_min(2).float().log()
            valid = visible > 1
            if attention_mask is not None:
                valid = valid & attention_mask[:, None, -probs.shape[2]:].bool()
            valid = valid.float()
            per_head = (normalized * valid).sum((0, 2)) / valid.sum((0, 2)).clamp_min(1.0)
            entropy[layer, base.h[layer].attn.head_index.to(entropy.device)] = per_head.to(entropy.device)
        seen = ~torch.isnan(entropy)
        decay = self.config.utilization_decay
        first = seen & (base.observations == 0)
        updated = torch.where(first, entropy, decay * base.utilization + (1 - decay) * entropy)
        base.utilization.copy_(torch.where(seen, updated, base.utilization))
        base.observations.add_(seen.long())

    def observe_gate_gradients(self):
        """Fold `head_gates.grad` (call after backward) into the importance and signed-gradient EMAs."""
        base = self.base_model
        grad = base.head_gates.grad
        if grad is None:
            return
        grad = grad.detach().float()
        decay = self.config.utilization_decay
        base.importance.mul_(decay).add_((1 - decay) * grad.abs())
        base.gate_grad_ema.mul_(decay).add_((1 - decay) * grad)

    @torch.no_grad()
    def update_agency_states(self):
        """One tensorized state transition for every head (see `AgencyGPT2Config` for the thresholds)."""
        base, cfg = self.base_model, self.config
        state, age, streak = base.head_state, base.state_age, base.overload_streak
        live = ~self.pruned_head_mask().to(state.device)
        consent = base.consent > 0

        overloaded_now = (base.utilization >= cfg.overload_threshold) & (base.observations > 0)
        scale = base.importance[live].mean().clamp_min(1e-12) if live.any() else base.importance.new_tensor(1.0)
        misaligned_now = (base.gate_grad_ema / scale) > cfg.misalignment_threshold

        streak.copy_(torch.where(overloaded_now, streak + 1, torch.zeros_like(streak)))
        active = state == ACTIVE
        trigger = torch.where(misaligned_now, MISALIGNED, ACTIVE)
        trigger = torch.where(overloaded_now, OVERLOADED, trigger)
        trigger = torch.where(streak >= cfg.withdraw_after, WITHDRAWN, trigger)

        age.copy_(torch.where(active, torch.zeros_like(age), age + 1))
        recovered = ~active & (age >= cfg.recovery_period)
        escalate = (state == OVERLOADED) & (trigger == WITHDRAWN)
        new_state = torch.where(active, trigger, state)
        new_state = torch.where(escalate, WITHDRAWN, new_state)
        new_state = torch.where(recovered, ACTIVE, new_state)
        age.copy_(torch.where(recovered | escalate | (new_state != state), torch.zeros_like(age), age))
        streak.copy_(torch.where(recovered, torch.zeros_like(streak), streak))
        new_state = torch.where(consent, new_state, WITHDRAWN)  # consent withdrawn overrides everything
        state.copy_(torch.where(live, new_state, state))

    @torch.no_grad()
    def controller_step(self, step: int) -> dict:
        """Move gate logits from the utilization (down) and gradient-importance (up) signals; regrow useful heads.

        Acts only after `controller_warmup_steps` and every `controller_update_frequency` steps. Returns counts.
        """
        base, cfg = self.base_model, self.config
        if step < cfg.controller_warmup_steps or step % cfg.controller_update_frequency != 0:
            return {"moved": 0, "regrown": 0}
        gates = base.head_gates
        eligible = (~self.pruned_head_mask().to(gates.device)) & (base.consent > 0)
        if int(eligible.sum()) < 2:
            return {"moved": 0, "regrown": 0}

        def standardize(x):
            values = x[eligible]
            return (x - values.mean()) / values.std().clamp_min(1e-12)

        z_importance = standardize(base.importance)
        z_utilization = standardize(base.utilization)
        signal = cfg.controller_gradient_weight * z_importance - cfg.controller_entropy_weight * z_utilization
        logits = torch.logit(gates.float().clamp(1e-4, 1 - 1e-4)) + cfg.controller_lr * signal
        moved = torch.where(eligible, torch.sigmoid(logits), gates.float())

        regrow = eligible & (gates < cfg.gate_prune_threshold) & (z_importance > cfg.regrowth_threshold)
        moved = torch.where(regrow, torch.full_like(moved, cfg.regrowth_gate), moved)
        gates.copy_(moved.to(gates.dtype))
        return {"moved": int(eligible.sum()), "regrown": int(regrow.sum())}

    def agency_step(self, step: int) -> dict:
        """Gradient bookkeeping, state transitions and controller for one training step (call after backward)."""
        self.observe_gate_gradients()
        self.update_agency_states()
        return self.controller_step(step)

    @torch.no_grad()
    def set_consent(self, heads: dict, consent: bool):
        """Give or withdraw consent: `{layer: [heads]}`. A head without consent is masked (state `withdrawn`)."""
        base, cfg = self.base_model, self.config
        for layer, idx in heads.items():
            if not 0 <= layer < cfg.n_layer or any(not 0 <= h < cfg.n_head for h in idx):
                raise ValueError(f"set_consent got layer {layer} heads {list(idx)}; "
                                 f"allowed layers 0..{cfg.n_layer - 1}, heads 0..{cfg.n_head - 1}.")
            base.consent[layer, list(idx)] = 1.0 if consent else 0.0
            if consent:
                restore = base.head_state[layer, list(idx)] == WITHDRAWN
                base.head_state[layer, list(idx)] = torch.where(restore, ACTIVE, base.head_state[layer, list(idx)])
            else:
                base.head_state[layer, list(idx)] = WITHDRAWN

    def agency_report(self) -> dict:
        """Per-head state, gate, consent, utilization and importance, plus counts per state."""
        base = self.base_model
        labels = (*AGENCY_STATES, "pruned")
        state = torch.where(self.pruned_head_mask(), len(AGENCY_STATES), base.head_state.long()).cpu()
        layer, head = torch.meshgrid(torch.arange(self.config.n_layer), torch.arange(self.config.n_head), indexing="ij")
        columns = {"layer": layer, "head": head, "state": state, "gate": base.head_gates.detach().float(),
                   "consent": base.consent > 0, "utilization": base.utilization, "importance": base.importance}
        rows = zip(*(column.flatten().tolist() for column in columns.values()))
        heads = [{**dict(zip(columns, row)), "state": labels[row[2]]} for row in rows]
        counts = dict(zip(labels, torch.bincount(state.flatten(), minlength=len(labels)).tolist()))
        return {"heads": heads, "counts": counts, "heads_per_layer": self.num_heads_per_layer()}


class AgencyGPT2Model(AgencyGPT2PreTrainedModel):
    def __init__(self, config: AgencyGPT2Config):
        super().__init__(config)
        L, H = config.n_layer, config.n_head
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([AgencyGPT2Block(config, i) for i in range(L)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

        # Head gates (learnable) and agency state (buffers, saved with the model), all [n_layer, n_head].
        self.head_gates = nn.Parameter(torch.ones(L, H))
        for name, (dtype, value) in AGENCY_BUFFERS.items():
            self.register_buffer(name, torch.full((L, H), value, dtype=dtype))
        self.register_buffer("state_scale", self.state_scales(), persistent=False)

        # U-Net skips: the output of layer i feeds the input of layer L-1-i through a zero-initialized projection.
        self.unet_pairs = [(i, L - 1 - i) for i in range(L // 2)] if config.use_unet_skips else []
        self.unet_skips = (
            nn.ModuleList([AgencyGPT2ZeroInitLinear(config.n_embd, config.n_embd, bias=False) for _ in self.unet_pairs])
            if config.use_unet_skips
            else None
        )
        # Fusion with a frozen baseline GPT-2 and, on top, hybrid routing between the two.
        self.baseline = AgencyGPT2Baseline(config) if config.use_baseline_fusion else None
        self.fusion_adapters = (
            nn.ModuleList([AgencyGPT2FusionAdapter(config) for _ in range(L)]) if config.use_baseline_fusion else None
        )
        self.fusion_gates = nn.Parameter(torch.zeros(L)) if config.use_baseline_fusion else None
        self.router = nn.Linear(config.n_embd, 1) if config.hybrid_routing else None
        self.hybrid_gate = nn.Parameter(torch.zeros(())) if config.hybrid_routing else None

        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def state_scales(self) -> torch.Tensor:
        """Output factor of a head in each agency state: active, overloaded, misaligned, withdrawn."""
        return torch.tensor([1.0, self.config.overloaded_scale, self.config.misaligned_scale, 0.0])

    @torch.no_grad()
    def reset_agency_state(self):
        for name, (_, value) in AGENCY_BUFFERS.items():
            nn.init.constant_(getattr(self, name), value)

    def _first_attending_layer(self) -> int:
        """Cache slot that tells the cached length (a layer with every head pruned stores empty keys)."""
        return next(i for i, block in enumerate(self.h) if block.attn.num_heads > 0)

    def head_scales(self) -> torch.Tensor:
        """[n_layer, n_head] multiplier of every head's output: gate x state factor x consent."""
        return self.head_gates * self.state_scale[self.head_state] * self.consent

    def _attention_mask(self, attention_mask, batch, q_len, past_len, dtype, device, need_explicit):
        """Additive float mask (B|1, 1, T, S), or None when SDPA's own causal path is exact."""
        if attention_mask is not None and not _is_tracing() and bool(attention_mask.all()):
            attention_mask = None  # all-ones padding mask: same as none, and lets SDPA use its fast causal kernel
        if attention_mask is None and not need_explicit and (past_len == 0 or q_len == 1):
            return None
        kv_len = past_len + q_len
        keys = torch.arange(kv_len, device=device)
        queries = torch.arange(past_len, kv_len, device=device)
        allowed = (keys[None, :] <= queries[:, None])[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :kv_len].bool()
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        **kwargs,
    ) -> Union[tuple, BaseModelOutputWithPast]:
        cfg = self.config
        past_key_values = cache if cache is not None else past_key_values
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        use_cache = use_cache if use_cache is not None else cfg.use_cache
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False

        inputs_embeds = self._embed(input_ids, inputs_embeds)
        batch, seq_len = inputs_embeds.shape[:2]
        past_key_values, past_len = self._cache(past_key_values, use_cache, seq_len)
        _check_inputs(input_ids, inputs_embeds, attention_mask, past_len)
        if cache_position is None:
            cache_position = torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D (batch, past + input length); got {attention_mask.dim()}-D.")
        use_eager = output_attentions or cfg._attn_implementation == "eager"
        mask = self._attention_mask(
            attention_mask, batch, seq_len, past_len, inputs_embeds.dtype, inputs_embeds.device, use_eager
        )
        layer_kwargs = dict(attention_mask=mask, past_key_values=past_key_values, cache_position=cache_position,
                            is_causal=mask is None and seq_len > 1)

        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
        base_states = self._baseline_inputs(input_ids, inputs_embeds, position_ids)
        hidden_states, base_states, all_hidden_states, all_attentions = self._run_blocks(
            hidden_states, base_states, layer_kwargs, output_attentions, output_hidden_states
        )
        hidden_states = self._final_norm(hidden_states, base_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)

        if not return_dict:
            return tuple(
                v for v in (hidden_states, past_key_values if use_cache else None, all_hidden_states, all_attentions)
                if v is not None
            )
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: past_key_values if use_cache else None},
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )

    def _embed(self, input_ids, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is None:
            return inputs_embeds
        vocab_size = self.config.vocab_size
        if not _is_tracing() and input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
            raise ValueError(
                f"input_ids must be in [0, {vocab_size - 1}] (vocab_size={vocab_size}); got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]."
            )
        return self.wte(input_ids)

    def _cache(self, past_key_values, use_cache, seq_len):
        """The cache to use (a new DynamicCache when asked for one, with slots for the baseline's blocks) and the
        length already in it; refuses inputs beyond the position table."""
        cfg = self.config
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if past_key_values is not None and self.baseline is not None:
            while len(past_key_values.layers) < 2 * cfg.n_layer:  # cache slots for the baseline's blocks
                past_key_values.layers.append(DynamicLayer())
        past_len = past_key_values.get_seq_length(self._first_attending_layer()) if past_key_values is not None else 0
        if past_len + seq_len > cfg.n_positions:
            raise ValueError(
                f"Sequence length {past_len + seq_len} (cache {past_len} + input {seq_len}) exceeds n_positions="
                f"{cfg.n_positions}."
            )
        return past_key_values, past_len

    def _baseline_inputs(self, input_ids, inputs_embeds, position_ids):
        """Input of the frozen baseline's first block (fusion), or None without a baseline."""
        if self.baseline is None:
            return None
        with torch.no_grad():
            base_embeds = self.baseline.wte(input_ids) if input_ids is not None else inputs_embeds
            return base_embeds + self.baseline.wpe(position_ids)

    def _layer_scales(self):
        """Per layer, the multiplier of each kept head's output, or None where every one is 1 (inference with
        every gate open, e.g. a GPT-2 just converted or pruned: the multiply is skipped)."""
        scales = self.head_scales()
        if not torch.is_grad_enabled() and not _is_tracing() and bool((scales == 1).all()):
            return [None] * len(self.h)
        return [scales[i] if block.attn.num_heads == self.config.n_head else
                scales[i].index_select(0, block.attn.head_index) for i, block in enumerate(self.h)]

    def _run_blocks(self, hidden_states, base_states, layer_kwargs, output_attentions, output_hidden_states):
        """The blocks in order, with U-Net skips and fusion with the baseline's block of the same layer."""
        skips, skip_into = {}, {dst: (k, src) for k, (src, dst) in enumerate(self.unet_pairs)}
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for i, (block, layer_scale) in enumerate(zip(self.h, self._layer_scales())):
            if i in skip_into:
                k, src = skip_into[i]
                hidden_states = hidden_states + self.unet_skips[k](skips[src])
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            hidden_states, attn_weights = block(
                hidden_states, layer_scale, output_attentions=output_attentions, **layer_kwargs
            )
            if base_states is not None:
                with torch.no_grad():  # the baseline's heads are never scaled
                    base_states, _ = self.baseline.h[i](base_states, None, **layer_kwargs)
                hidden_states = hidden_states + self.fusion_gates[i] * self.fusion_adapters[i](base_states)
            if i < len(self.unet_pairs):
                skips[i] = hidden_states
            if output_attentions:
                all_attentions = all_attentions + (attn_weights,)
        return hidden_states, base_states, all_hidden_states, all_attentions

    def _final_norm(self, hidden_states, base_states):
        """ln_f, then (hybrid routing) a per-token mix towards the baseline's final hidden states."""
        hidden_states = self.ln_f(hidden_states)
        if self.router is None:
            return hidden_states
        with torch.no_grad():
            base_final = self.baseline.ln_f(base_states)
        route = self.hybrid_gate * torch.sigmoid(self.router(hidden_states))  # (B, T, 1)
        return hidden_states + route * (base_final - hidden_states)


class AgencyGPT2ForCausalLM(AgencyGPT2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: AgencyGPT2Config):
        super().__init__(config)
        self.transformer = AgencyGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        cache: Optional[Cache] = None,
        **kwargs,
    ) -> Union[tuple, CausalLMOutputWithPast]:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(
            input_ids=input_ids,
            past_key_values=cache if cache is not None else past_key_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        hidden_states, past_key_values = outputs.last_hidden_state, outputs.get(CACHE_FIELD)
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            output = (logits,) + tuple(
                v for v in (past_key_values, outputs.hidden_states, outputs.attentions) if v is not None
            )
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: past_key_values},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`GenerationMixin.generate` for prompts padded on either side. Right-padded rows (the package's
        `gpt2_tokenizer()` pads on the right) are left-aligned first, so every row continues from its own last real
        token and gets the tokens it gets alone; their returned rows are therefore left-padded. Other rows (unpadded,
        left-padded, padding elsewhere) are used as given, so the returned prompts, `inputs_embeds` and the cache
        agree with the caller's `attention_mask`."""
        if inputs is None and "input_ids" in kwargs:
            inputs = kwargs.pop("input_ids")
        _check_inputs(inputs, None, kwargs.get("attention_mask"))
        inputs = _left_align_right_padding(inputs, kwargs)
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    @classmethod
    def from_gpt2(cls, model_or_path, **config_overrides) -> "AgencyGPT2ForCausalLM":
        """Convert a GPT-2 checkpoint (`GPT2LMHeadModel`/`GPT2Model`, a local directory or a Hub id) to AgencyGPT2.

        The weights are copied; with all gates at 1 and the optional extras off the result computes the same logits
        as the source. `config_overrides` set AgencyGPT2 fields (e.g. `optimization_level=2`); with baseline fusion
        on, the frozen baseline receives a copy of the same weights.
        """
        from transformers import AutoConfig, GPT2LMHeadModel, GPT2Model

        if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
            source_config = AutoConfig.from_pretrained(model_or_path)
            if source_config.model_type != "gpt2":
                raise ValueError(
                    f"from_gpt2 expects a GPT-2 checkpoint (model_type 'gpt2'); {model_or_path!s} has model_type "
                    f"{source_config.model_type!r}."
                )
            model_or_path = GPT2LMHeadModel.from_pretrained(model_or_path)
        if not isinstance(model_or_path, (GPT2LMHeadModel, GPT2Model)):
            raise ValueError(
                "from_gpt2 expects a GPT2LMHeadModel, a GPT2Model, or a path/Hub id of a GPT-2 checkpoint; got "
                f"{type(model_or_path).__name__}."
            )
        source = model_or_path
        fields = source.config.to_dict()
        for key in ("architectures", "model_type", "transformers_version", "_name_or_path", "auto_map",
                    "task_specific_params", "torch_dtype", "dtype"):
            fields.pop(key, None)
        fields.update(config_overrides)
        config = AgencyGPT2Config(**fields)
        config._attn_implementation = getattr(source.config, "_attn_implementation", None) or "sdpa"
        dtype = next(source.parameters()).dtype
        model = cls(config).to(dtype)

        state = source.state_dict()
        if isinstance(source, GPT2Model):
            state = {f"transformer.{k}": v for k, v in state.items()}
            state["lm_head.weight"] = state["transformer.wte.weight"]
        state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"from_gpt2: the checkpoint has weights AgencyGPT2 does not know: {unexpected[:5]}")
        not_copied = [k for k in missing if not (k.startswith("transformer.") and k.split(".")[1] in AGENCY_ONLY)]
        if not_copied:
            raise ValueError(f"from_gpt2: GPT-2 weights missing from the checkpoint: {not_copied[:5]}")
        if model.transformer.baseline is not None:
            model.load_baseline(source)
        model.tie_weights()
        return model

    def load_baseline(self, gpt2):
        """Copy an (unpruned) GPT-2's weights into the frozen baseline used by fusion / hybrid routing."""
        baseline = self.transformer.baseline
        if baseline is None:
            raise ValueError("This model has no baseline (use_baseline_fusion=False); set optimization_level >= 2.")
        state = gpt2.state_dict()
        prefix = "transformer." if any(k.startswith("transformer.") for k in state) else ""
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        baseline.load_state_dict(state, strict=True)


__all__ = [
    "AgencyGPT2PreTrainedModel",
    "AgencyGPT2Model",
    "AgencyGPT2ForCausalLM",
    "eager_attention_forward",
]
