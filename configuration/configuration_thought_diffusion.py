"""ThoughtDiffusion configuration."""

from transformers import PretrainedConfig

NOISE_SCHEDULES = ("log_linear", "cosine")
POSITION_EMBEDDING_TYPES = ("rotary", "absolute")


# Copied from configuration_agency_gpt2 (a configuration file imports only transformers: it travels as remote code).
def _refuse_kernel_fields(kwargs):
    """A config field naming an attention implementation can make transformers fetch and run a Hub kernel
    (CVE-2026-4372): this architecture has eager and SDPA attention only, so any other value is refused."""
    for key in ("_attn_implementation_internal", "attn_implementation", "_attn_implementation"):
        if kwargs.get(key) not in (None, "eager", "sdpa"):
            raise ValueError(f"config field {key}={kwargs[key]!r} is refused (it could load a kernel's code); "
                             "allowed: 'eager', 'sdpa' or none.")


class ThoughtDiffusionConfig(PretrainedConfig):
    r"""
    Configuration of a ThoughtDiffusion model: a masked-diffusion language model (MDLM, Sahoo et al. 2024) whose
    denoiser is a bidirectional transformer conditioned on the noise level and on a stack of past "thought"
    tensors, optionally block-causal between blocks of `block_length` tokens (BD3-LM, Arriola et al. 2025) so that
    sampling can keep a key/value cache of the prompt and of finished blocks.

    Args:
        vocab_size (`int`, *optional*, defaults to 50258): Vocabulary size, `[MASK]` included (GPT-2's 50257 + 1).
        hidden_size (`int`, *optional*, defaults to 768): Width of the residual stream.
        num_hidden_layers (`int`, *optional*, defaults to 12): Number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 12): Attention heads (self-, cross- and slot attention).
        intermediate_size (`int`, *optional*): MLP width; defaults to `4 * hidden_size`.
        hidden_act (`str`, *optional*, defaults to `"gelu_new"`): MLP activation (a key of `ACT2FN`).
        max_position_embeddings (`int`, *optional*, defaults to 1024): The longest prompt + generation (the size
            of the learned position table with `position_embedding_type="absolute"`).
        position_embedding_type (`str`, *optional*, defaults to `"rotary"`): `"rotary"` (RoPE on the self-attention
            queries and keys, as MDLM's backbone) or `"absolute"` (a learned position table added to the input, as
            GPT-2). See the modeling docstring for why rotary is the default.
        rope_theta (`float`, *optional*, defaults to 10000.0): Base of the rotary frequencies.
        neighbor_tokens (`int`, *optional*, defaults to 1): Tokens on each side whose embeddings every position's
            input also holds (left: any real token; right: its own block's only); 0 disables.
        mask_token_id (`int`, *optional*, defaults to 50257): Id of `[MASK]`, the absorbing state; must be inside
            the vocabulary. Its logit is never predicted (SUBS parameterization).
        thought_dims (`list[int]`, *optional*, defaults to `[16, 16, 8]`): Shape of one thought tensor.
        thought_stack_size (`int`, *optional*, defaults to 8): Slots of the thought stack (ring buffer); 0 disables
            the stack, the thought encoder and the cross-attention (a plain MDLM / BD3-LM).
        noise_schedule (`str`, *optional*, defaults to `"log_linear"`): Probability that a token is masked at time
            t in [0, 1]: `"log_linear"` (t, MDLM's default: ELBO weight 1/t) or `"cosine"` (1 - cos(pi t / 2)).
        sampling_eps (`float`, *optional*, defaults to 1e-3): Smallest training time (t ~ U(eps, 1)): bounds the
            ELBO weight 1/t. In (0, 1).
        min_train_time (`float`, *optional*): Smallest t sampled in training; defaults to `sampling_eps`. With
            `max_train_time` this is the masking range a curriculum stage may narrow; a clipped range such as
            [0.3, 0.8] lowers the variance of the 1/t-weighted loss for block models (BD3-LM), see
            benchmarks/diffusion.py. The ELBO is still a bound over all of (eps, 1) whatever the training range.
        max_train_time (`float`, *optional*, defaults to 1.0): Largest t sampled in training.
        block_length (`int`, *optional*): Block-causal attention between blocks of this many tokens (BD3-LM): a
            token sees its own block and earlier ones, and training runs the clean copy of the text beside the
            noisy one. Enables the exact prefix KV cache in `generate_with_stack`. `None`: full bidirectional
            attention (MDLM), sampled with recomputation.
        label_smoothing (`float`, *optional*, defaults to 0.0): Label smoothing of the training cross-entropy (the
            reported `elbo` is never smoothed). In [0, 1).
        complementary_masking (`bool`, *optional*, defaults to `False`): In training (t sampled by the model), run
            each batch twice, the second copy masked exactly where the first is not (mask rate 1 - m(t), at the
            time that gives it), so every labeled token is a target once per step: twice the compute per step for
            the same tokens (LaViDa's complementary masking). Such a step's outputs (thoughts, `mask_rate`) cover
            both copies.
        thought_loss_weight (`float`, *optional*, defaults to 0.01): Weight of the auxiliary thought losses in the
            training loss (0 turns them off; a curriculum stage may change it).
        thought_consistency_weight, thought_diversity_weight, thought_sparsity_weight (`float`, *optional*,
            defaults to 1.0, 1.0, 0.1): Weights of the three auxiliary terms inside the thought loss: new thought
            close to the newest thought in the stack; thoughts of different rows not alike; thoughts sparse (L1).
        thought_train_prob (`float`, *optional*, defaults to 0.5): Probability that a training batch first runs
            `thought_train_hops` passes at noisier times and pushes their thoughts, so the stack holds what it
            would hold during sampling (see the modeling docstring).
        thought_train_hops (`int`, *optional*, defaults to 1): Noisier passes per such batch.
        resid_pdrop, embd_pdrop, attn_pdrop (`float`, *optional*, defaults to 0.1): Dropout probabilities.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): LayerNorm epsilon.
        initializer_range (`float`, *optional*, defaults to 0.02): Std of the normal weight initialization.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`): Tie the output head to the input embeddings.
    """

    model_type = "thought_diffusion"
    keys_to_ignore_at_inference = ["thought_stack", "new_thought", "past_key_values", "diffusion_loss", "elbo",
                                   "thought_loss", "thought_consistency", "thought_diversity", "thought_sparsity"]

    def __init__(
        self,
        vocab_size=50258,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=None,
        hidden_act="gelu_new",
        max_position_embeddings=1024,
        position_embedding_type="rotary",
        rope_theta=10000.0,
        neighbor_tokens=1,
        mask_token_id=50257,
        thought_dims=(16, 16, 8),
        thought_stack_size=8,
        noise_schedule="log_linear",
        sampling_eps=1e-3,
        min_train_time=None,
        max_train_time=1.0,
        block_length=None,
        label_smoothing=0.0,
        complementary_masking=False,
        thought_loss_weight=0.01,
        thought_consistency_weight=1.0,
        thought_diversity_weight=1.0,
        thought_sparsity_weight=0.1,
        thought_train_prob=0.5,
        thought_train_hops=1,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        pad_token_id=50256,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=True,
        **kwargs,
    ):
        _refuse_kernel_fields(kwargs)
        def integer(name, value, minimum, allow_none=False):
            if allow_none and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
                raise ValueError(f"`{name}` must be {allowed}{' or None' if allow_none else ''}, got {value!r}")

        def number(name, value, low, high, low_open=False, high_open=False):
            ok = not isinstance(value, bool) and isinstance(value, (int, float))
            ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
            if not ok:
                interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}")

        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("num_attention_heads", num_attention_heads),
                            ("max_position_embeddings", max_position_embeddings),
                            ("thought_train_hops", thought_train_hops)):
            integer(name, value, 1)
        integer("intermediate_size", intermediate_size, 1, allow_none=True)
        integer("block_length", block_length, 1, allow_none=True)
        integer("thought_stack_size", thought_stack_size, 0)
        integer("neighbor_tokens", neighbor_tokens, 0)
        if hidden_size % num_attention_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` "
                             f"({num_attention_heads})")
        integer("mask_token_id", mask_token_id, 0)
        if mask_token_id >= vocab_size:
            raise ValueError(f"`mask_token_id` must be inside the vocabulary [0, vocab_size={vocab_size}), got "
                             f"{mask_token_id}")
        if (not isinstance(thought_dims, (list, tuple)) or not thought_dims
                or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in thought_dims)):
            raise ValueError(f"`thought_dims` must be a non-empty list of positive integers, e.g. [16, 16, 8], got "
                             f"{thought_dims!r}")
        if position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"`position_embedding_type` must be one of {POSITION_EMBEDDING_TYPES}, got "
                             f"{position_embedding_type!r}")
        number("rope_theta", rope_theta, 0, float("inf"), low_open=True, high_open=True)
        if position_embedding_type == "rotary" and (hidden_size // num_attention_heads) % 2:
            raise ValueError(f"rotary position embeddings need an even head size, got hidden_size / "
                             f"num_attention_heads = {hidden_size // num_attention_heads}")
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"`noise_schedule` must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}")
        number("sampling_eps", sampling_eps, 0, 1, low_open=True, high_open=True)
        if min_train_time is not None:
            number("min_train_time", min_train_time, sampling_eps, 1, high_open=True)
        number("max_train_time", max_train_time, min_train_time or sampling_eps, 1, low_open=True)
        if block_length is not None and block_length > max_position_embeddings:
            raise ValueError(f"`block_length` ({block_length}) must be at most `max_position_embeddings` "
                             f"({max_position_embeddings})")
        number("label_smoothing", label_smoothing, 0, 1, high_open=True)
        if not isinstance(complementary_masking, bool):
            raise ValueError(f"`complementary_masking` must be True or False, got {complementary_masking!r}")
        for name, value in (("thought_loss_weight", thought_loss_weight),
                            ("thought_consistency_weight", thought_consistency_weight),
                            ("thought_diversity_weight", thought_diversity_weight),
                            ("thought_sparsity_weight", thought_sparsity_weight)):
            number(name, value, 0, float("inf"), high_open=True)
        number("thought_train_prob", thought_train_prob, 0, 1)
        for name, value in (("resid_pdrop", resid_pdrop), ("embd_pdrop", embd_pdrop), ("attn_pdrop", attn_pdrop)):
            number(name, value, 0, 1, high_open=True)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type
        self.rope_theta = float(rope_theta)
        self.neighbor_tokens = neighbor_tokens
        self.mask_token_id = mask_token_id
        self.thought_dims = list(thought_dims)
        self.thought_stack_size = thought_stack_size
        self.noise_schedule = noise_schedule
        self.sampling_eps = float(sampling_eps)
        self.min_train_time = min_train_time
        self.max_train_time = float(max_train_time)
        self.block_length = block_length
        self.label_smoothing = float(label_smoothing)
        self.complementary_masking = complementary_masking
        self.thought_loss_weight = float(thought_loss_weight)
        self.thought_consistency_weight = float(thought_consistency_weight)
        self.thought_diversity_weight = float(thought_diversity_weight)
        self.thought_sparsity_weight = float(thought_sparsity_weight)
        self.thought_train_prob = float(thought_train_prob)
        self.thought_train_hops = thought_train_hops
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_size(self):
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def thought_size(self):
        """Number of values in one thought (the product of `thought_dims`)."""
        size = 1
        for d in self.thought_dims:
            size *= d
        return size

    @property
    def train_time_range(self):
        return (self.min_train_time if self.min_train_time is not None else self.sampling_eps, self.max_train_time)
