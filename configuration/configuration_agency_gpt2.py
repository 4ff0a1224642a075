"""AgencyGPT2 configuration."""

from transformers import PretrainedConfig
from transformers.utils import logging

AGENCY_STATES = ("active", "overloaded", "misaligned", "withdrawn")

# optimization_level -> (use_unet_skips, use_baseline_fusion, hybrid_routing)
OPTIMIZATION_LEVELS = {
    0: (False, False, False),
    1: (True, False, False),
    2: (True, True, False),
    3: (True, True, True),
}


def _refuse_unsupported_gpt2_fields(kwargs):
    """GPT-2 checkpoints may carry these fields: refuse the ones that change the model, drop the heads' ones."""
    if kwargs.pop("reorder_and_upcast_attn", False):
        raise ValueError("reorder_and_upcast_attn=True is not supported by AgencyGPT2; allowed: False.")
    if kwargs.pop("add_cross_attention", False):
        raise ValueError("add_cross_attention=True is not supported by AgencyGPT2; allowed: False.")
    for key in ("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                "summary_first_dropout", "n_ctx"):
        kwargs.pop(key, None)


def _check_sizes(n_inner, **sizes):
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    n_embd, n_head = sizes["n_embd"], sizes["n_head"]
    if n_embd % n_head != 0:
        divisors = [h for h in range(1, n_embd + 1) if n_embd % h == 0 and h <= 64]
        raise ValueError(
            f"n_embd ({n_embd}) must be divisible by n_head ({n_head}); n_head values allowed for this "
            f"n_embd include {divisors}."
        )
    if n_inner is not None and (not isinstance(n_inner, int) or n_inner <= 0):
        raise ValueError(f"n_inner must be None or a positive integer, got {n_inner!r}.")


def _check_fractions(**fractions):
    for name, value in fractions.items():
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}.")


def _check_counts(minimum, **counts):
    for name, value in counts.items():
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _features(optimization_level, use_unet_skips, use_baseline_fusion, hybrid_routing):
    """(use_unet_skips, use_baseline_fusion, hybrid_routing): the level's choice unless overridden."""
    if optimization_level not in OPTIMIZATION_LEVELS:
        allowed = sorted(OPTIMIZATION_LEVELS)
        raise ValueError(f"optimization_level must be one of {allowed}, got {optimization_level!r}.")
    level_unet, level_fusion, level_hybrid = OPTIMIZATION_LEVELS[optimization_level]
    use_unet_skips = level_unet if use_unet_skips is None else bool(use_unet_skips)
    use_baseline_fusion = level_fusion if use_baseline_fusion is None else bool(use_baseline_fusion)
    hybrid_routing = level_hybrid if hybrid_routing is None else bool(hybrid_routing)
    if hybrid_routing and not use_baseline_fusion:
        raise ValueError("hybrid_routing=True needs use_baseline_fusion=True (it routes to the baseline).")
    return use_unet_skips, use_baseline_fusion, hybrid_routing


def _refuse_kernel_fields(kwargs):
    """A config field naming an attention implementation can make transformers fetch and run a Hub kernel
    (CVE-2026-4372): this architecture has eager and SDPA attention only, so any other value is refused."""
    for key in ("_attn_implementation_internal", "attn_implementation", "_attn_implementation"):
        if kwargs.get(key) not in (None, "eager", "sdpa"):
            raise ValueError(f"config field {key}={kwargs[key]!r} is refused (it could load a kernel's code); "
                             "allowed: 'eager', 'sdpa' or none.")


class AgencyGPT2Config(PretrainedConfig):
    r"""
    Configuration of an AgencyGPT2 model: a GPT-2 whose attention heads carry gates and agency states.

    The GPT-2 fields keep the names and defaults of [`GPT2Config`] (the defaults reproduce GPT-2 124M), so a
    GPT-2 checkpoint converts with [`AgencyGPT2ForCausalLM.from_gpt2`] and gives the same logits while every
    gate is 1 and the optional extras are off.

    Args:
        vocab_size, n_positions, n_embd, n_layer, n_head, n_inner, activation_function, resid_pdrop, embd_pdrop,
        attn_pdrop, layer_norm_epsilon, initializer_range, scale_attn_weights, scale_attn_by_inverse_layer_idx,
        use_cache, bos_token_id, eos_token_id, pad_token_id, tie_word_embeddings:
            As in `GPT2Config`.
        pruned_heads (`dict[int, list[int]]`, *optional*):
            Heads physically removed from each layer (original head indices). Written by `prune_heads`; read at
            construction so that `from_pretrained` rebuilds the pruned shapes.
        optimization_level (`int`, *optional*, defaults to 0):
            Which optional extras are on. 0: gated GPT-2 (gates, agency states, consent). 1: + U-Net skips
            (layer i feeds layer n_layer-1-i). 2: + fusion with a frozen baseline GPT-2 (per-layer adapter mixed in
            by a zero-initialized gate). 3: + hybrid routing (a per-token router mixes the baseline's and the
            agency model's final hidden states). Every level is exactly GPT-2 at initialization.
        use_unet_skips, use_baseline_fusion, hybrid_routing (`bool`, *optional*):
            Override the feature chosen by `optimization_level`. `hybrid_routing` needs `use_baseline_fusion`.
        fusion_adapter_dim (`int`, *optional*, defaults to 64):
            Bottleneck width of the adapters applied to the baseline's hidden states.
        overloaded_scale (`float`, *optional*, defaults to 0.5):
            Multiplier applied to the output of a head in the `overloaded` state.
        misaligned_scale (`float`, *optional*, defaults to 0.7):
            Multiplier applied to the output of a head in the `misaligned` state. `withdrawn` heads are masked (0).
        utilization_decay (`float`, *optional*, defaults to 0.9):
            EMA decay of the per-head utilization (normalized attention entropy, in [0, 1]).
        overload_threshold (`float`, *optional*, defaults to 0.9):
            A head whose utilization reaches this value (attention spread almost uniformly) becomes `overloaded`.
        misalignment_threshold (`float`, *optional*, defaults to 1.0):
            A head whose gate-gradient EMA, normalized by the mean absolute gate gradient, exceeds this value
            (raising the gate would raise the loss) becomes `misaligned`.
        withdraw_after (`int`, *optional*, defaults to 3):
            Consecutive agency updates a head may stay `overloaded` before it withdraws.
        recovery_period (`int`, *optional*, defaults to 10):
            Agency updates after which a non-active head (whose consent is given) returns to `active`.
        controller_lr (`float`, *optional*, defaults to 0.1):
            Step size of the gate controller, in gate-logit units.
        controller_warmup_steps (`int`, *optional*, defaults to 100):
            Training steps before the controller first moves gates.
        controller_update_frequency (`int`, *optional*, defaults to 10):
            The controller moves gates every this many training steps.
        controller_entropy_weight, controller_gradient_weight (`float`, *optional*, defaults to 1.0):
            Weights of the utilization (pushes gates down) and gradient-importance (pushes gates up) signals.
        gate_prune_threshold (`float`, *optional*, defaults to 0.05):
            A head whose gate is below this value counts as pruned by its gate (it can regrow).
        regrowth_threshold (`float`, *optional*, defaults to 1.0):
            A gate-pruned head whose standardized importance exceeds this value is regrown.
        regrowth_gate (`float`, *optional*, defaults to 0.5):
            Gate value given to a regrown head.
    """

    model_type = "agency_gpt2"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        use_cache=True,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=None,
        tie_word_embeddings=True,
        pruned_heads=None,
        optimization_level=0,
        use_unet_skips=None,
        use_baseline_fusion=None,
        hybrid_routing=None,
        fusion_adapter_dim=64,
        overloaded_scale=0.5,
        misaligned_scale=0.7,
        utilization_decay=0.9,
        overload_threshold=0.9,
        misalignment_threshold=1.0,
        withdraw_after=3,
        recovery_period=10,
        controller_lr=0.1,
        controller_warmup_steps=100,
        controller_update_frequency=10,
        controller_entropy_weight=1.0,
        controller_gradient_weight=1.0,
        gate_prune_threshold=0.05,
        regrowth_threshold=1.0,
        regrowth_gate=0.5,
        **kwargs,
    ):
        _refuse_kernel_fields(kwargs)
        _refuse_unsupported_gpt2_fields(kwargs)
        _check_sizes(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     n_inner=n_inner)
        _check_fractions(resid_pdrop=resid_pdrop, embd_pdrop=embd_pdrop, attn_pdrop=attn_pdrop,
                         utilization_decay=utilization_decay, overload_threshold=overload_threshold,
                         overloaded_scale=overloaded_scale, misaligned_scale=misaligned_scale,
                         gate_prune_threshold=gate_prune_threshold, regrowth_gate=regrowth_gate)
        _check_counts(1, withdraw_after=withdraw_after, recovery_period=recovery_period,
                      controller_update_frequency=controller_update_frequency, fusion_adapter_dim=fusion_adapter_dim)
        _check_counts(0, controller_warmup_steps=controller_warmup_steps)
        use_unet_skips, use_baseline_fusion, hybrid_routing = _features(optimization_level, use_unet_skips,
                                                                         use_baseline_fusion, hybrid_routing)

        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.activation_function = activation_function
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = scale_attn_by_inverse_layer_idx
        self.use_cache = use_cache
        self.optimization_level = optimization_level
        self.use_unet_skips = use_unet_skips
        self.use_baseline_fusion = use_baseline_fusion
        self.hybrid_routing = hybrid_routing
        self.fusion_adapter_dim = fusion_adapter_dim
        self.overloaded_scale = float(overloaded_scale)
        self.misaligned_scale = float(misaligned_scale)
        self.utilization_decay = float(utilization_decay)
        self.overload_threshold = float(overload_threshold)
        self.misalignment_threshold = float(misalignment_threshold)
        self.withdraw_after = withdraw_after
        self.recovery_period = recovery_period
        self.controller_lr = float(controller_lr)
        self.controller_warmup_steps = controller_warmup_steps
        self.controller_update_frequency = controller_update_frequency
        self.controller_entropy_weight = float(controller_entropy_weight)
        self.controller_gradient_weight = float(controller_gradient_weight)
        self.gate_prune_threshold = float(gate_prune_threshold)
        self.regrowth_threshold = float(regrowth_threshold)
        self.regrowth_gate = float(regrowth_gate)

        _warn_unknown_keys(self, kwargs)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        # Set after the base class, which has its own (v4-only) handling of this field.
        self.pruned_heads = self._validated_pruned_heads(pruned_heads or {})

    def _validated_pruned_heads(self, pruned_heads):
        result = {}
        for layer, heads in pruned_heads.items():
            layer = int(layer)
            if not 0 <= layer < self.n_layer:
                raise ValueError(f"pruned_heads names layer {layer}; allowed layers are 0..{self.n_layer - 1}.")
            heads = sorted({int(h) for h in heads})
            bad = [h for h in heads if not 0 <= h < self.n_head]
            if bad:
                raise ValueError(f"pruned_heads[{layer}] has head indices {bad}; allowed 0..{self.n_head - 1}.")
            if heads:
                result[layer] = heads
        if sum(len(h) for h in result.values()) >= self.n_layer * self.n_head:
            raise ValueError("pruned_heads removes every head of the model; at least one head must remain.")
        return result

    def kept_heads(self, layer):
        """Original indices of the heads that layer `layer` still has."""
        pruned = set(self.pruned_heads.get(layer, ()))
        return [h for h in range(self.n_head) if h not in pruned]


__all__ = ["AgencyGPT2Config", "AGENCY_STATES", "OPTIMIZATION_LEVELS"]


def _warn_unknown_keys(config, kwargs):
    """Warn about keys neither this config nor `PretrainedConfig` knows: a misspelled field in a config.json would
    otherwise load silently (and be ignored by the model)."""
    known = set(PretrainedConfig().to_dict()) | set(config.attribute_map) | {
        "torch_dtype", "name_or_path", "attn_implementation", "_commit_hash", "num_labels", "auto_map",
        "gradient_checkpointing", "_attn_implementation_autoset"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        logging.get_logger(__name__).warning(
            f"{type(config).__name__}: unknown keys {unknown} (not fields of this config, so the model ignores them; "
            "misspelled?).")
