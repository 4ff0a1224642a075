import collections
import importlib.util
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from model_tester_common import assert_close, check_dtype, check_export, check_gradient_flow
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, pipeline

import armada  # noqa: F401  (registers the Auto classes)
from armada import ThoughtDiffusionConfig, ThoughtDiffusionForMaskedLM, ThoughtDiffusionModel, ThoughtStack
from armada.modeling.modeling_thought_diffusion import elbo_weight, mask_rate, time_for_mask_rate

MASK = 98
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def encode_slots_one_at_a_time(encoder, stack):
    """The per-slot loop reference lives beside its speed benchmark (benchmarks/diffusion.py)."""
    spec = importlib.util.spec_from_file_location("bench_diffusion", os.path.join(REPO, "benchmarks", "diffusion.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.encode_slots_one_at_a_time(encoder, stack)


class ThoughtDiffusionModelTester:
    """Tiny config: 99 tokens ([MASK] = 98), width 32, 2 layers, thoughts of shape (4, 2), a stack of 3 slots.
    `block_length=4` gives the block-causal (BD3-LM) variant; positions are rotary unless `position_embedding_type`
    says otherwise; each position reads `neighbor_tokens` tokens on either side (default 1). A large init std makes
    a random model's outputs depend on its inputs clearly, so sampling tests see real differences."""

    def __init__(self, batch_size=2, seq_length=12, block_length=None, position_embedding_type="rotary",
                 neighbor_tokens=1):
        self.batch_size, self.seq_length = batch_size, seq_length
        self.kwargs = dict(vocab_size=99, mask_token_id=MASK, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                           position_embedding_type=position_embedding_type, neighbor_tokens=neighbor_tokens,
                           thought_dims=[4, 2], thought_stack_size=3, block_length=block_length,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2,
                           pad_token_id=0, bos_token_id=0, eos_token_id=0)

    def config(self, **overrides):
        return ThoughtDiffusionConfig(**{**self.kwargs, **overrides})

    def model(self, seed=0, **overrides):
        """A random model; its cross-attention to the stack (zero at initialization) random too, so that the
        stack's effects are visible."""
        torch.manual_seed(seed)
        model = ThoughtDiffusionForMaskedLM(self.config(**overrides)).eval()
        for block in model.transformer.h:
            if hasattr(block, "cross_attn"):
                torch.nn.init.normal_(block.cross_attn.c_proj.weight, std=self.kwargs["initializer_range"])
        return model

    def input_ids(self, seed=1, length=None, batch_size=None):
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(1, MASK, (batch_size or self.batch_size, length or self.seq_length), generator=generator)


@pytest.fixture(scope="module", params=[(None, "rotary", 1), (4, "rotary", 2), (4, "absolute", 0)],
                ids=["full", "block4-neighbors2", "block4-absolute-no-neighbors"])
def tester(request):
    """Every common check runs on the bidirectional (MDLM) and the block-causal (BD3-LM) model (two neighbours on
    each side: offsets that cross block boundaries), and on a GPT-2-like input: a learned position table, no
    neighbouring tokens."""
    block_length, positions, neighbors = request.param
    return ThoughtDiffusionModelTester(block_length=block_length, position_embedding_type=positions,
                                       neighbor_tokens=neighbors)


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_size=-1), "hidden_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(hidden_size=30, num_attention_heads=4), "divisible by `num_attention_heads`"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(mask_token_id=99), r"inside the vocabulary \[0, vocab_size=99\)"),
    (dict(mask_token_id=-1), "mask_token_id"),
    (dict(thought_dims=[]), "non-empty list of positive integers"),
    (dict(thought_dims=[4, 0]), "non-empty list of positive integers"),
    (dict(thought_dims=4), "non-empty list of positive integers"),
    (dict(thought_stack_size=-1), "thought_stack_size` must be an integer >= 0"),
    (dict(noise_schedule="linear"), "log_linear"),
    (dict(sampling_eps=0.0), r"sampling_eps` must be a number in \(0, 1\)"),
    (dict(min_train_time=1.0), "min_train_time"),
    (dict(min_train_time=0.5, max_train_time=0.4), "max_train_time"),
    (dict(max_train_time=1.5), "max_train_time"),
    (dict(block_length=0), "block_length"),
    (dict(block_length=65), "at most `max_position_embeddings`"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(thought_loss_weight=-0.1), "thought_loss_weight"),
    (dict(thought_consistency_weight=-1), "thought_consistency_weight"),
    (dict(thought_diversity_weight=-1), "thought_diversity_weight"),
    (dict(thought_sparsity_weight=-1), "thought_sparsity_weight"),
    (dict(thought_train_prob=1.5), "thought_train_prob"),
    (dict(thought_train_hops=0), "thought_train_hops"),
    (dict(attn_pdrop=1.0), "attn_pdrop"),
    (dict(resid_pdrop=-0.1), "resid_pdrop"),
    (dict(embd_pdrop=2), "embd_pdrop"),
    (dict(position_embedding_type="alibi"), r"position_embedding_type` must be one of \('rotary', 'absolute'\)"),
    (dict(rope_theta=0), r"rope_theta` must be a number in \(0, inf\)"),
    (dict(neighbor_tokens=-1), "neighbor_tokens` must be an integer >= 0"),
    (dict(complementary_masking=1), "complementary_masking` must be True or False"),
    (dict(hidden_size=36, num_attention_heads=4), "rotary position embeddings need an even head size"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ThoughtDiffusionModelTester().config(**kwargs)


def test_config_round_trip(tester):
    config = tester.config(noise_schedule="cosine", min_train_time=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        loaded = AutoConfig.from_pretrained(tmp)
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert isinstance(loaded, ThoughtDiffusionConfig) and drop(loaded.to_dict()) == drop(config.to_dict())
    assert config.thought_size == 8 and config.train_time_range == (0.1, 1.0)


# ---------------------------------------------------------------- schedule and objective
@pytest.mark.parametrize("schedule", ["log_linear", "cosine"])
def test_masking_rate_matches_the_schedule_at_fixed_t(schedule):
    model = ThoughtDiffusionModelTester().model(noise_schedule=schedule)
    ids = ThoughtDiffusionModelTester().input_ids(length=64, batch_size=64)
    for t in (0.1, 0.5, 0.9):
        torch.manual_seed(0)
        with torch.no_grad():
            out = model(ids, labels=ids, timesteps=torch.full((64,), t))
        expected = float(mask_rate(torch.tensor(t), schedule))
        assert abs(out.mask_rate.item() - expected) < 0.02, (t, out.mask_rate.item(), expected)
    t = torch.linspace(0.05, 0.95, 7)
    assert_close(time_for_mask_rate(mask_rate(t, schedule), schedule), t, 1e-5, "inverse schedule")
    # the ELBO weight is m'(t) / m(t)
    tt = t.clone().requires_grad_(True)
    (derivative,) = torch.autograd.grad(mask_rate(tt, schedule).sum(), tt)
    assert_close(elbo_weight(t, schedule), derivative / mask_rate(t, schedule), 1e-4, "ELBO weight")


def test_loss_is_the_elbo_over_masked_positions_only(tester):
    """Recompute the loss by hand from the same masks: only masked positions count, with weight 1/t, normalized by
    the labeled tokens; positions labeled -100 are never masked. The loss is > 0 when labels equal the inputs."""
    model, ids = tester.model(), tester.input_ids()
    labels = ids.clone()
    labels[:, :2] = -100
    t = torch.tensor([0.3, 0.7])
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(ids, labels=labels, timesteps=t)
    torch.manual_seed(0)
    uniform = torch.rand(ids.shape)  # the first random draw of a forward with given timesteps
    masked = (uniform < t[:, None]) & (labels != -100)
    noisy = ids.masked_fill(masked, MASK)
    blocks = model.config.block_length
    groups = torch.arange(ids.shape[1]).expand_as(ids) // blocks if blocks else None  # BD3: x_t beside x_0
    stack = ThoughtStack.empty(model.config, 2 * (ids.shape[1] // blocks if blocks else 1))
    with torch.no_grad():
        hidden = model.transformer(noisy, timesteps=t, clean_input_ids=ids if blocks else None, thought_groups=groups,
                                   thought_stack=stack).last_hidden_state
        logits = model.subs_logits(hidden, noisy)
    nll = F.cross_entropy(logits[masked], ids[masked], reduction="none")
    expected = ((1 / t[:, None]).expand_as(ids)[masked] * nll).sum() / (labels != -100).sum()
    assert_close(out.loss - model.config.thought_loss_weight * out.thought_loss, expected, 1e-4, "ELBO")
    assert_close(out.elbo, expected, 1e-4)
    assert out.loss > 0.5 and masked.any()
    assert not masked[:, :2].any()


@pytest.mark.parametrize("schedule", ["log_linear", "cosine"])
def test_complementary_masking_makes_every_token_a_target_once(tester, schedule):
    """In training the batch runs twice: the second copy masked exactly where the first is not, at the time whose
    mask rate is 1 - m(t); labels -100 are never masked. Given timesteps (evaluation) the batch is not doubled."""
    model, ids = tester.model(complementary_masking=True, noise_schedule=schedule, thought_train_prob=0.0), \
        tester.input_ids()
    labels = ids.clone()
    labels[:, :2] = -100
    seen = []
    hook = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0], kwargs["timesteps"])), with_kwargs=True)
    model.train()
    out = model(ids, labels=labels)
    model.eval()
    with torch.no_grad():
        model(ids, labels=labels, timesteps=torch.tensor([0.5, 0.5]))
    hook.remove()
    (noisy, t), (evaluated, _) = seen
    first, second = (noisy == MASK).chunk(2)
    assert noisy.shape[0] == 2 * ids.shape[0] and evaluated.shape == ids.shape
    assert not (first & second).any() and ((first | second) == (labels != -100)).all()
    assert_close(mask_rate(t[ids.shape[0]:], schedule), 1 - mask_rate(t[:ids.shape[0]], schedule), 1e-5)
    assert 0.49 < out.mask_rate < 0.51 and torch.isfinite(out.loss)


def test_block_model_never_sees_the_clean_tokens_of_its_own_or_later_blocks():
    """BD3 training runs x_t beside x_0: changing x_0 in block b and later, or x_t in a later block, must not change
    x_t's outputs in b (attention and the neighbouring tokens alike)."""
    tester = ThoughtDiffusionModelTester(block_length=4, neighbor_tokens=2)
    model, ids = tester.model(), tester.input_ids()
    noisy = ids.clone()
    noisy[:, 4:8] = MASK
    changed = ids.clone()
    changed[:, 4:] = (ids[:, 4:] + 1) % MASK
    later = noisy.clone()
    later[:, 8:] = (noisy[:, 8:] + 1) % MASK
    with torch.no_grad():
        a = model.transformer(noisy, clean_input_ids=ids).last_hidden_state
        b = model.transformer(noisy, clean_input_ids=changed).last_hidden_state
        c = model.transformer(later, clean_input_ids=ids).last_hidden_state
    assert_close(a[:, :8], b[:, :8], 1e-6, "blocks 0-1 see clean blocks < their own only")
    assert_close(a[:, :8], c[:, :8], 1e-6, "blocks 0-1 do not see x_t of block 2")
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3  # block 2 does see clean block 1


def test_neighbor_tokens_come_from_x0_across_a_block_boundary_and_never_from_a_later_block():
    """Offsets -2, -1, +1, +2 of every position: left of a noisy block's first positions the clean tokens (as
    when sampling), inside the block x_t, right of the block's end nothing; the clean copy reads clean tokens."""
    tester = ThoughtDiffusionModelTester(block_length=4, neighbor_tokens=2)
    model, ids = tester.model(), tester.input_ids()
    noisy = ids.clone()
    noisy[:, 2:6] = MASK
    x = model.transformer._positions_and_streams(noisy, None, None, None, None, torch.tensor([0.5, 0.5]), ids)
    tokens, valid, length = x["neighbor_tokens"], x["neighbor_valid"], ids.shape[1]
    assert torch.equal(tokens[:, 5], torch.stack([ids[:, 3], noisy[:, 4], noisy[:, 6], noisy[:, 7]], dim=-1))
    assert torch.equal(tokens[:, length + 5], torch.stack([ids[:, 3], ids[:, 4], ids[:, 6], ids[:, 7]], dim=-1))
    assert valid[:, 5].all() and not valid[:, 0, :2].any() and valid[:, 0, 2:].all()
    for stream in (0, length):
        assert not valid[:, stream + 7, 2:].any() and not valid[:, stream + 6, 3].any()  # block 2 is later
    assert valid[:, 8, :2].all()  # block 2's first position reads block 1 (clean)


def test_subs_parameterization(tester):
    model, ids = tester.model(), tester.input_ids()
    noisy = ids.clone()
    noisy[:, ::3] = MASK
    with torch.no_grad():
        probs = model(noisy).logits.softmax(-1)
    assert probs[..., MASK].max() == 0  # [MASK] is never predicted
    unmasked = noisy != MASK
    assert torch.equal(probs[unmasked].argmax(-1), ids[unmasked]) and (probs[unmasked].max(-1).values == 1).all()


def test_label_smoothing_changes_the_loss_not_the_elbo(tester):
    ids = tester.input_ids()
    results = []
    for smoothing in (0.0, 0.1):
        model = tester.model(label_smoothing=smoothing)
        torch.manual_seed(0)
        with torch.no_grad():
            results.append(model(ids, labels=ids, timesteps=torch.tensor([0.5, 0.5])))
    assert_close(results[0].elbo, results[1].elbo, 1e-5)
    assert (results[0].diffusion_loss - results[1].diffusion_loss).abs() > 1e-4


def test_thought_losses_are_logged_and_weighted(tester):
    model, ids = tester.model(thought_loss_weight=0.5), tester.input_ids()
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(ids, labels=ids)
    parts = model.thought_losses(out.new_thought, ThoughtStack.empty(model.config, out.new_thought.shape[0]))
    assert_close(out.thought_loss, parts["thought_loss"], 1e-6)
    assert_close(out.loss, out.diffusion_loss + 0.5 * out.thought_loss, 1e-5)
    assert out.thought_consistency == 0  # an empty stack has no newest thought to stay close to
    assert out.thought_diversity > 0 and out.thought_sparsity > 0


def test_stack_size_zero_is_a_plain_mdlm(tester):
    model, ids = tester.model(thought_stack_size=0), tester.input_ids()
    assert not any("thought" in name for name, _ in model.named_parameters())
    out = model(ids, labels=ids)
    assert out.new_thought is None and out.thought_stack is None and out.thought_loss is None
    assert torch.isfinite(out.loss)
    assert model.generate_with_stack(ids[:, :4], max_new_tokens=4, top_k=1).sequences.shape == (2, 8)


def test_training_pushes_noisier_thoughts(tester):
    """With thought_train_prob=1 every training batch conditions on a thought pushed by a noisier pass; the thought
    head then gets a gradient from the diffusion loss itself (thought_loss_weight=0)."""
    model, ids = tester.model(thought_train_prob=1.0, thought_train_hops=2, thought_loss_weight=0.0), tester.input_ids()
    model.train()
    out = model(ids, labels=ids)
    assert (out.thought_stack.count == 3).all()  # two hops + the new thought
    out.loss.backward()
    assert model.transformer.thought_head.proj.weight.grad.abs().sum() > 0
    assert out.thought_consistency > 0


# ---------------------------------------------------------------- thought stack
def test_ring_buffer_order_matches_a_deque():
    config = ThoughtDiffusionModelTester().config()
    stack = ThoughtStack.empty(config, 3)
    reference = [collections.deque(maxlen=3) for _ in range(3)]
    generator = torch.Generator().manual_seed(0)
    for step in range(11):
        thought = torch.randn(3, 4, 2, generator=generator)
        rows = torch.tensor([True, step % 2 == 0, step % 3 == 0])  # rows at different heads and fill levels
        stack = stack.push(thought, rows=rows)
        for r in range(3):
            if rows[r]:
                reference[r].append(thought[r])
        slots, valid = stack.read()
        for r in range(3):
            n = len(reference[r])
            assert valid[r].tolist() == [False] * (3 - n) + [True] * n
            if n:
                assert torch.equal(slots[r, 3 - n:], torch.stack(list(reference[r])))
    newest, has = stack.newest()
    assert torch.equal(newest[0], reference[0][-1]) and has.all()


def test_vectorized_encoder_equals_per_slot_reference():
    model = ThoughtDiffusionModelTester().model()
    encoder = model.transformer.thought_encoder
    stack = ThoughtStack.empty(model.config, 3)
    generator = torch.Generator().manual_seed(0)
    for step in range(4):  # rows with 1, 2 and 3 (wrapped) thoughts
        stack = stack.push(torch.randn(3, 4, 2, generator=generator), rows=torch.tensor([True, step < 2, step < 1]))
    with torch.no_grad():
        memory, valid = encoder(stack, torch.float32)
        reference, reference_valid = encode_slots_one_at_a_time(encoder, stack)
    assert torch.equal(valid, reference_valid)
    assert_close(memory[valid], reference[valid], 1e-5, "vectorized vs per-slot")


def test_stack_conditions_masked_positions_only(tester):
    """Thoughts and the noise level enter at [MASK] positions: the outputs of clean positions do not depend on
    them (what keeps the prefix cache exact), those of masked positions do."""
    model, ids = tester.model(), tester.input_ids()
    noisy = ids.clone()
    noisy[:, 4:8] = MASK
    if model.config.block_length is None:
        noisy[:, :4] = ids[:, :4]
    stack = ThoughtStack.empty(model.config, 2).push(torch.randn(2, 4, 2))
    with torch.no_grad():
        plain = model.transformer(noisy).last_hidden_state
        conditioned = model.transformer(noisy, thought_stack=stack, timesteps=torch.tensor([0.9, 0.9]))
    assert (plain[:, 4:8] - conditioned.last_hidden_state[:, 4:8]).abs().max() > 1e-3
    if model.config.block_length is not None:  # block 0 is clean and sees no later block
        assert_close(plain[:, :4], conditioned.last_hidden_state[:, :4], 1e-6, "clean block")
    assert (conditioned.thought_stack.count == 2).all()


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("remasking, threshold", [("low_confidence", None), ("random", None),
                                                  ("low_confidence", 1e-6)])
def test_sampling_never_changes_committed_or_prompt_tokens(tester, remasking, threshold):
    model, prompt = tester.model(), tester.input_ids(length=5)
    torch.manual_seed(0)
    out = model.generate_with_stack(prompt, max_new_tokens=8, num_steps=4, block_length=4, remasking=remasking,
                                    confidence_threshold=threshold, temperature=0.8, top_p=0.9, return_history=True)
    assert not (out.sequences == MASK).any() and torch.equal(out.sequences[:, :5], prompt)
    previous = torch.cat([prompt, torch.full((2, 8), MASK)], dim=1)
    for entry in out.history:
        tokens = entry["tokens"]
        was_set = previous != MASK
        assert torch.equal(tokens[was_set], previous[was_set]), "a committed token changed"
        previous = tokens
    assert out.num_forward_passes <= len(out.history) and (out.thought_stack.count >= 1).all()
    if threshold is not None:  # every proposal is above a tiny threshold: one step per block
        assert len(out.history) == 2


def test_mdlm_cache_reuses_logits_when_nothing_changed(tester):
    """Random remasking with as many steps as tokens often commits nothing in a step; the next one then reuses the
    logits instead of calling the model."""
    model, prompt = tester.model(), tester.input_ids(length=3, batch_size=1)
    for seed in range(5):
        torch.manual_seed(seed)
        out = model.generate_with_stack(prompt, max_new_tokens=8, num_steps=8, block_length=4, remasking="random",
                                        return_history=True)
        skipped = [not e["forward"] for e in out.history]
        if any(skipped):
            break
    assert any(skipped) and out.num_forward_passes == len(out.history) - sum(skipped)
    for before, entry in zip(out.history, out.history[1:]):
        if not entry["forward"]:
            assert not before["committed"].any()


@pytest.mark.parametrize("positions, neighbors", [("rotary", 2), ("absolute", 0)])
def test_block_cache_gives_the_same_tokens_as_recomputation(positions, neighbors):
    tester = ThoughtDiffusionModelTester(block_length=4, position_embedding_type=positions, neighbor_tokens=neighbors)
    model, prompt = tester.model(attn_implementation="eager"), tester.input_ids(length=6)
    results = {}
    for cache in (True, False):
        results[cache] = model.generate_with_stack(prompt, max_new_tokens=12, num_steps=6, top_k=1,
                                                   use_block_cache=cache, return_history=True)
    assert torch.equal(results[True].sequences, results[False].sequences)
    for a, b in zip(results[True].history, results[False].history):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.allclose(a["thought_norm"], b["thought_norm"])
    assert torch.equal(results[True].thought_stack.buffer, results[False].thought_stack.buffer) or torch.allclose(
        results[True].thought_stack.buffer, results[False].thought_stack.buffer, atol=1e-5)
    with pytest.raises(ValueError, match="block-causal model"):
        ThoughtDiffusionModelTester().model().generate_with_stack(prompt, max_new_tokens=4, use_block_cache=True)


def test_batched_prompts_with_padding_equal_one_at_a_time(tester):
    model = tester.model(attn_implementation="eager")
    prompts = [tester.input_ids(length=6)[0], tester.input_ids(seed=2, length=3)[0]]
    batch = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, 6 - len(p):], mask[row, 6 - len(p):] = p, 1
    kwargs = dict(max_new_tokens=8, num_steps=4, block_length=4, top_k=1)
    together = model.generate_with_stack(batch, attention_mask=mask, **kwargs)
    for row, p in enumerate(prompts):
        alone = model.generate_with_stack(p[None], **kwargs)
        assert torch.equal(together.sequences[row, 6:], alone.sequences[0, len(p):]), f"row {row}"
        assert_close(together.thought_stack.buffer[row], alone.thought_stack.buffer[0], 1e-5)
    assert not torch.equal(together.sequences[0, 6:], together.sequences[1, 6:])  # the prompts matter


def test_generate_maps_onto_generate_with_stack(tester):
    model, prompt = tester.model(), tester.input_ids(length=4)
    greedy = model.generate(prompt, max_new_tokens=8, num_steps=4)
    assert torch.equal(greedy, model.generate_with_stack(prompt, max_new_tokens=8, num_steps=4, top_k=1).sequences)
    torch.manual_seed(0)
    sampled = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=True,
                             temperature=0.7, top_k=20, pad_token_id=0, return_dict_in_generate=True)
    assert sampled.sequences.shape == (2, 12) and not (sampled.sequences == MASK).any()
    unconditional = model.generate_with_stack(max_new_tokens=4, batch_size=3, top_k=1)
    assert unconditional.sequences.shape == (3, 4)


def test_a_new_model_reads_nothing_from_the_stack():
    """The cross-attention output starts at zero: before training the stack changes no output."""
    tester = ThoughtDiffusionModelTester(block_length=4)
    torch.manual_seed(0)
    model = ThoughtDiffusionForMaskedLM(tester.config()).eval()
    noisy = tester.input_ids()
    noisy[:, 4:8] = MASK
    stack = ThoughtStack.empty(model.config, 2).push(torch.randn(2, 4, 2))
    with torch.no_grad():
        plain = model.transformer(noisy).last_hidden_state
        conditioned = model.transformer(noisy, thought_stack=stack).last_hidden_state
    assert torch.equal(plain, conditioned)
    assert all(not block.cross_attn.c_proj.weight.any() for block in model.transformer.h)


def test_initial_stack_is_used(tester):
    model, prompt = tester.model(), tester.input_ids(length=4)
    stack = ThoughtStack.empty(model.config, 2).push(torch.ones(2, 4, 2) * 0.9)
    out = model.generate_with_stack(prompt, max_new_tokens=4, top_k=1, initial_stack=stack)
    assert (out.thought_stack.count == 3).all()  # one given + one per step (4 steps, 3 slots kept)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=0), r"num_steps must be an integer in \[1, max_new_tokens=8\]"),
    (dict(num_steps=9), r"num_steps must be an integer in \[1, max_new_tokens=8\]"),
    (dict(temperature=0), "temperature must be > 0"),
    (dict(temperature=-1.0), "temperature must be > 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(block_length=3), "block_length must be a positive integer dividing max_new_tokens=8"),
    (dict(num_steps=1, block_length=2), "at least the number of blocks"),
    (dict(max_new_tokens=60), "exceed max_position_embeddings=64"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(remasking="entropy"), "low_confidence"),
    (dict(confidence_threshold=0.0), r"confidence_threshold must be in \(0, 1\]"),
    (dict(initial_stack="bad"), None),
])
def test_sampling_rejects_bad_input(kwargs, message):
    model, prompt = ThoughtDiffusionModelTester().model(), ThoughtDiffusionModelTester().input_ids(length=5)
    if message is None:  # a stack for the wrong number of rows
        kwargs, message = dict(initial_stack=ThoughtStack.empty(model.config, 3)), "holds 3 rows but there are 2"
    with pytest.raises(ValueError, match=message):
        model.generate_with_stack(prompt, **{"max_new_tokens": 8, **kwargs})


def test_block_model_refuses_another_block_length():
    model = ThoughtDiffusionModelTester(block_length=4).model()
    with pytest.raises(ValueError, match="block_length must be None or 4"):
        model.generate_with_stack(max_new_tokens=8, block_length=8)


def test_forward_rejects_out_of_vocabulary_ids(tester):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=99\)"):
        tester.model()(torch.tensor([[1, 99]]))


# ---------------------------------------------------------------- common checks
def test_auto_classes_and_save_load(tester):
    config = tester.config()
    assert isinstance(AutoModel.from_config(config), ThoughtDiffusionModel)
    model, ids = tester.model(), tester.input_ids()
    noisy = ids.masked_fill(torch.rand(ids.shape) < 0.5, MASK)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = AutoModelForMaskedLM.from_pretrained(tmp).eval()
        base = AutoModel.from_pretrained(tmp).eval()
    assert type(reloaded) is ThoughtDiffusionForMaskedLM and isinstance(base, ThoughtDiffusionModel)
    with torch.no_grad():
        assert_close(model(noisy).logits, reloaded(noisy).logits, 1e-6, "save/load")
        assert_close(model.transformer(noisy).last_hidden_state, base(noisy).last_hidden_state, 1e-6, "base model")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()  # tied


def test_sdpa_matches_eager(tester):
    ids = tester.input_ids()
    noisy = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5, MASK)
    stack = ThoughtStack.empty(tester.config(), 2).push(torch.randn(2, 4, 2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    outputs = []
    for implementation in ("eager", "sdpa"):
        model = tester.model(attn_implementation=implementation)
        with torch.no_grad():
            outputs.append(model(noisy, attention_mask=mask, thought_stack=stack).logits)
    assert_close(outputs[0], outputs[1], 1e-4, "sdpa vs eager")


def test_gradient_checkpointing_gives_the_same_gradients(tester):
    ids = tester.input_ids()
    grads = []
    for checkpointing in (False, True):
        model = tester.model(thought_train_prob=1.0)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(0)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], 1e-5, name)


def test_gradient_flow(tester):
    check_gradient_flow(tester.model(thought_train_prob=1.0), tester.input_ids())


def test_bf16(tester):
    model, ids = tester.model(), tester.input_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    check_dtype(model, ids)


def test_export(tester):
    check_export(tester.model(), tester.input_ids().masked_fill(torch.rand(2, 12) < 0.5, MASK))


def test_fill_mask_pipeline_with_the_gpt2_tokenizer(tmp_path):
    from armada.tokenization import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    assert tokenizer.mask_token_id == 50257
    tester = ThoughtDiffusionModelTester()
    model = tester.model(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, pad_token_id=50256,
                         bos_token_id=50256, eos_token_id=50256, initializer_range=0.02)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    fill = pipeline("fill-mask", model=str(tmp_path), tokenizer=str(tmp_path))
    predictions = fill("The capital of France is [MASK].", top_k=3)
    assert len(predictions) == 3 and all(p["token"] != tokenizer.mask_token_id for p in predictions)
    assert all("[MASK]" not in p["sequence"] for p in predictions)


def test_saved_checkpoint_loads_as_remote_code_without_armada(tmp_path):
    """save_pretrained writes flat-import code + auto_map: a fresh interpreter loads it with trust_remote_code=True
    (armada never imported) and computes the same logits."""
    import subprocess
    import sys

    from armada import ThoughtDiffusionConfig, ThoughtDiffusionForMaskedLM

    config = ThoughtDiffusionConfig(vocab_size=100, mask_token_id=99, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, thought_dims=[4, 4],
                                    thought_stack_size=2)
    torch.manual_seed(0)
    model = ThoughtDiffusionForMaskedLM(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 99, (1, 16))
    ids[0, 5:9] = 99
    torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForMaskedLM\n"
        f"m = AutoModelForMaskedLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True).eval()\n"
        "assert 'armada' not in sys.modules\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "print(type(m).__module__, (m(ref['ids']).logits - ref['logits']).abs().max().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    module, diff = out.stdout.split()
    assert module.startswith("transformers_modules.") and float(diff) <= 1e-6


def test_hidden_states_are_the_layers_own_tensors():
    """Without a doubled stream (MDLM, or evaluation) `hidden_states` are the tensors the layers computed, so
    `retain_grad()` on them gets their gradient, as in transformers' models."""
    tester = ThoughtDiffusionModelTester()
    model = tester.model().train()
    noisy = tester.input_ids()
    noisy[:, 4:8] = MASK
    out = model(noisy, output_hidden_states=True)
    for h in out.hidden_states:
        h.retain_grad()
    out.logits.float().pow(2).mean().backward()
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in out.hidden_states)


@pytest.mark.parametrize("block_length", [None, 4])
def test_evaluation_loss_is_reproducible(block_length):
    """In eval mode the loss's t and masks come from a generator seeded with 0 (or the one given), so evaluating a
    batch twice gives one figure; in training they follow torch's global random state."""
    tester = ThoughtDiffusionModelTester(block_length=block_length)
    model, ids = tester.model().eval(), tester.input_ids()
    with torch.no_grad():
        first, second = (model(ids, labels=ids).loss for _ in range(2))
        assert torch.equal(first, second)
        seeded = [model(ids, labels=ids, generator=torch.Generator().manual_seed(7)).loss for _ in range(2)]
        assert torch.equal(*seeded) and not torch.equal(seeded[0], first)
        model.train()
        torch.manual_seed(0)
        drawn = [model(ids, labels=ids).loss for _ in range(2)]
    assert not torch.equal(*drawn)
