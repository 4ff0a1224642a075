"""UnifiedARMT configuration."""

from transformers import PretrainedConfig
from transformers.utils import logging

MEMORY_INITS = ("random", "orthogonal", "embedding_kmeans")
POSITION_EMBEDDING_TYPES = ("absolute", "rotary")
DPFP_NU = 3  # DPFP feature map order: phi(x) has 2 * nu * d features for an input of d features


# Copied from configuration_agency_gpt2 (a configuration file imports only transformers: it travels as remote code).
def _refuse_kernel_fields(kwargs):
    """A config field naming an attention implementation can make transformers fetch and run a Hub kernel
    (CVE-2026-4372): this architecture has eager and SDPA attention only, so any other value is refused."""
    for key in ("_attn_implementation_internal", "attn_implementation", "_attn_implementation"):
        if kwargs.get(key) not in (None, "eager", "sdpa"):
            raise ValueError(f"config field {key}={kwargs[key]!r} is refused (it could load a kernel's code); "
                             "allowed: 'eager', 'sdpa' or none.")


class UnifiedARMTConfig(PretrainedConfig):
    r"""
    Configuration of a UnifiedARMT model: a segment-recurrent transformer with memory tokens and a per-layer
    associative memory (Rodkin et al. 2024, "Associative Recurrent Memory Transformer"; Bulatov et al. 2022, RMT).

    Input of any length is cut into segments of `segment_size` tokens. Every segment is followed by
    `num_memory_tokens` learned memory tokens (the write block); token positions restart in every segment, so the
    length of an input is not bounded by the position table. Before each layer, every position reads the layer's
    associative memory (A, z); after the layer, the memory tokens' outputs write to it with the delta rule. Only
    (A, z) are carried from one segment to the next, so time grows linearly with length and memory stays flat.

    Args:
        vocab_size (`int`, *optional*, defaults to 50257): Vocabulary size (GPT-2's by default).
        hidden_size (`int`, *optional*, defaults to 768): Width of the residual stream.
        num_hidden_layers (`int`, *optional*, defaults to 12): Number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 12): Attention heads per block.
        intermediate_size (`int`, *optional*): MLP width; defaults to `4 * hidden_size`.
        hidden_act (`str`, *optional*, defaults to `"gelu_new"`): MLP activation (a key of `ACT2FN`).
        segment_size (`int`, *optional*, defaults to 512): Real tokens per segment (also the size of the position
            table). Must be positive.
        position_embedding_type (`str`, *optional*, defaults to `"absolute"`): `"absolute"`: a learned table of
            `segment_size` positions added to the token embeddings (GPT-2); `"rotary"`: rotary embeddings (RoPE,
            Su et al. 2021) applied to attention queries and keys, no table. Either way positions restart in every
            segment; the memory tokens sit at positions `segment_size ..` after it. Rotary positions make
            "attend to the previous token", the first half of an induction head, a fixed rotation rather than
            something to learn per position: key->value retrieval trains much faster with them (see
            benchmarks/armt_tasks.py).
        rope_theta (`float`, *optional*, defaults to 10000.0): Base of the rotary frequencies.
        num_memory_tokens (`int`, *optional*, defaults to 16): Memory tokens appended to every segment.
        d_mem (`int`, *optional*, defaults to 64): Width of the associative memory's query/key projection before the
            DPFP feature map (which multiplies it by `2 * 3`). Must be divisible by `num_memory_heads`.
        num_memory_heads (`int`, *optional*, defaults to 1): Heads of the associative memory; `hidden_size` and
            `d_mem` must both be divisible by it.
        memory_init (`str`, *optional*, defaults to `"random"`): Initialization of the memory-token embeddings:
            `"random"` (normal, `initializer_range`), `"orthogonal"` (orthogonal rows of norm
            `initializer_range * sqrt(hidden_size)`), `"embedding_kmeans"` (k-means centroids of the word
            embeddings, see `UnifiedARMTModel.init_memory_from_embeddings`).
        max_backprop_segments (`int`, *optional*): Truncated backpropagation through time: the loss of a call
            reaches back through memory across at most this many of its last segments (1: no gradient through
            memory at all, 2: the last segment's loss trains the previous segment's write, ...). `None`: all.
        max_segments (`int`, *optional*): Optional safety limit on the number of segments in one forward call.
        memory_correction (`bool`, *optional*, defaults to `True`): ARMT's correction of the normalizer update
            (z grows only by the part of a key that memory does not already hold).
        resid_pdrop, embd_pdrop, attn_pdrop (`float`, *optional*, defaults to 0.1): Dropout probabilities.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): LayerNorm epsilon.
        memory_eps (`float`, *optional*, defaults to 1e-5): Added to the associative read's normalizer.
        initializer_range (`float`, *optional*, defaults to 0.02): Std of the normal weight initialization.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`): Tie the LM head to the input embeddings.
        bos_token_id, eos_token_id (`int`, *optional*, default 50256, GPT-2's), pad_token_id (`int`, *optional*):
            The special tokens, as in `PretrainedConfig`.
    """

    model_type = "unified_armt"
    keys_to_ignore_at_inference = ["memory_state"]

    def __init__(
        self,
        vocab_size=50257,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=None,
        hidden_act="gelu_new",
        segment_size=512,
        position_embedding_type="absolute",
        rope_theta=10000.0,
        num_memory_tokens=16,
        d_mem=64,
        num_memory_heads=1,
        memory_init="random",
        max_backprop_segments=None,
        max_segments=None,
        memory_correction=True,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        layer_norm_eps=1e-5,
        memory_eps=1e-5,
        initializer_range=0.02,
        use_cache=True,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=None,
        tie_word_embeddings=True,
        **kwargs,
    ):
        _refuse_kernel_fields(kwargs)
        def positive(name, value, allow_none=False):
            if allow_none and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer{' or None' if allow_none else ''}, "
                                 f"got {value!r}")

        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("num_attention_heads", num_attention_heads),
                            ("segment_size", segment_size), ("d_mem", d_mem), ("num_memory_heads", num_memory_heads),
                            ("num_memory_tokens", num_memory_tokens)):
            positive(name, value)
        positive("intermediate_size", intermediate_size, allow_none=True)
        positive("max_backprop_segments", max_backprop_segments, allow_none=True)
        positive("max_segments", max_segments, allow_none=True)
        if hidden_size % num_attention_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` "
                             f"({num_attention_heads})")
        if hidden_size % num_memory_heads or d_mem % num_memory_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) and `d_mem` ({d_mem}) must both be divisible by "
                             f"`num_memory_heads` ({num_memory_heads})")
        if position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"`position_embedding_type` must be one of {POSITION_EMBEDDING_TYPES}, got "
                             f"{position_embedding_type!r}")
        if position_embedding_type == "rotary" and (hidden_size // num_attention_heads) % 2:
            raise ValueError(f"rotary positions rotate pairs of features, so the head size hidden_size / "
                             f"num_attention_heads must be even, got {hidden_size} / {num_attention_heads} = "
                             f"{hidden_size // num_attention_heads}")
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or rope_theta <= 1:
            raise ValueError(f"`rope_theta` must be a number > 1, got {rope_theta!r}")
        if memory_init not in MEMORY_INITS:
            raise ValueError(f"`memory_init` must be one of {MEMORY_INITS}, got {memory_init!r}")
        for name, p in (("resid_pdrop", resid_pdrop), ("embd_pdrop", embd_pdrop), ("attn_pdrop", attn_pdrop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {p}")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.segment_size = segment_size
        self.position_embedding_type = position_embedding_type
        self.rope_theta = float(rope_theta)
        self.num_memory_tokens = num_memory_tokens
        self.d_mem = d_mem
        self.num_memory_heads = num_memory_heads
        self.memory_init = memory_init
        self.max_backprop_segments = max_backprop_segments
        self.max_segments = max_segments
        self.memory_correction = memory_correction
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_eps = layer_norm_eps
        self.memory_eps = memory_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        _warn_unknown_keys(self, kwargs)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_size(self):
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def memory_key_dim(self):
        """Features per memory head after DPFP: 2 * nu * d_mem / num_memory_heads."""
        return 2 * DPFP_NU * self.d_mem // self.num_memory_heads

    @property
    def memory_value_dim(self):
        return self.hidden_size // self.num_memory_heads


# Copied from configuration_agency_gpt2: a configuration file imports only transformers (it must work as remote code).
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
