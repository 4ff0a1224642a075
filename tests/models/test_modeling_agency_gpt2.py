import tempfile

import pytest
import torch
from causal_lm_checks import (
    check_batched_equals_single_with_padding,
    check_cache_matches_no_cache,
    check_generation_contract,
    check_tokenizer_padded_generation_equals_single,
)
from common_checks import (
    assert_close,
    check_dtype,
    check_export,
    check_gradient_flow,
    check_save_load_round_trip,
)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig

import armada  # noqa: F401  (registers the Auto classes)
from armada import AgencyGPT2Config, AgencyGPT2ForCausalLM, AgencyGPT2Model
from armada.compat import prune_gpt2_heads


class AgencyGPT2ModelTester:
    def __init__(self, batch_size=2, seq_length=12, vocab_size=99, n_embd=32, n_layer=4, n_head=4, n_positions=64):
        self.batch_size, self.seq_length = batch_size, seq_length
        self.gpt2_kwargs = dict(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def gpt2(self, seed=0, attn_implementation="sdpa"):
        torch.manual_seed(seed)
        config = GPT2Config(**self.gpt2_kwargs)
        config._attn_implementation = attn_implementation
        return GPT2LMHeadModel(config).eval()

    def config(self, **overrides):
        return AgencyGPT2Config(**{**self.gpt2_kwargs, **overrides})

    def agency(self, seed=0, attn_implementation="sdpa", **overrides):
        model = AgencyGPT2ForCausalLM.from_gpt2(self.gpt2(seed, attn_implementation), **overrides)
        return model.eval()

    def input_ids(self, seed=1):
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.gpt2_kwargs["vocab_size"], (self.batch_size, self.seq_length), generator=generator)


@pytest.fixture(scope="module")
def tester():
    return AgencyGPT2ModelTester()


# ---------------------------------------------------------------- configuration


def test_config_defaults_are_gpt2_124m():
    config = AgencyGPT2Config()
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size) == (12, 12, 768, 50257)
    assert config.num_hidden_layers == 12 and config.hidden_size == 768 and config.num_attention_heads == 12
    assert not (config.use_unet_skips or config.use_baseline_fusion or config.hybrid_routing)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(optimization_level=4), "optimization_level must be one of"),
        (dict(use_baseline_fusion=False, hybrid_routing=True), "needs use_baseline_fusion"),
        (dict(pruned_heads={9: [0]}), "allowed layers"),
        (dict(pruned_heads={0: [7]}), "allowed 0..3"),
        (dict(pruned_heads={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, n_layer=2), "every head"),
        (dict(overloaded_scale=1.5), r"overloaded_scale must be in \[0, 1\]"),
        (dict(reorder_and_upcast_attn=True), "not supported"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    base = dict(n_embd=32, n_head=4, n_layer=3, vocab_size=99)
    with pytest.raises(ValueError, match=message):
        AgencyGPT2Config(**{**base, **kwargs})


def test_optimization_levels_select_features():
    flags = [
        (c.use_unet_skips, c.use_baseline_fusion, c.hybrid_routing)
        for c in (AgencyGPT2Config(optimization_level=level) for level in range(4))
    ]
    assert flags == [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    assert AgencyGPT2Config(optimization_level=2, use_unet_skips=False).use_unet_skips is False


def test_config_json_round_trip_keeps_pruned_heads():
    config = AgencyGPT2Config(n_embd=32, n_head=4, n_layer=3, pruned_heads={1: [3, 0]})
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        loaded = AutoConfig.from_pretrained(tmp)
    assert isinstance(loaded, AgencyGPT2Config)
    assert loaded.pruned_heads == {1: [0, 3]}


# ---------------------------------------------------------------- equivalence with GPT-2


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_from_gpt2_logits_and_loss_match(tester, attn_implementation):
    gpt2 = tester.gpt2(attn_implementation=attn_implementation)
    agency = AgencyGPT2ForCausalLM.from_gpt2(gpt2).eval()
    ids = tester.input_ids()
    with torch.no_grad():
        ref, out = gpt2(ids, labels=ids), agency(ids, labels=ids)
    assert_close(out.logits, ref.logits, 1e-4, "logits")
    assert_close(out.loss, ref.loss, 1e-5, "loss")


def test_from_gpt2_matches_with_padding_and_generation(tester):
    gpt2, agency = tester.gpt2(), tester.agency()
    ids = tester.input_ids()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = gpt2(ids, attention_mask=mask, position_ids=position_ids).logits
        out = agency(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert_close(out[real], ref[real], 1e-4, "padded logits at real tokens")
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(agency.generate(ids, **kwargs), gpt2.generate(ids, **kwargs))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(agency.generate(ids, **kwargs), gpt2.generate(ids, **kwargs))


def test_generation_from_the_package_tokenizer_right_padding(tester, gpt2_tok):
    # gpt2_tokenizer() pads on the right: generate() left-aligns the rows, as transformers' GPT-2 needs left padding
    torch.manual_seed(0)
    agency = AgencyGPT2ForCausalLM(tester.config(vocab_size=len(gpt2_tok))).eval()
    prompts = ["Now is the winter of our discontent made glorious", "Hi", "To be, or not"]
    check_tokenizer_padded_generation_equals_single(agency, gpt2_tok, prompts)
    agency.prune_heads({0: [1, 2], 2: [0]})
    check_tokenizer_padded_generation_equals_single(agency, gpt2_tok, prompts)


def test_state_dict_is_gpt2s_plus_the_agency_state_and_reset_restores_it(tester):
    from armada.modeling.modeling_agency_gpt2 import AGENCY_BUFFERS

    agency, gpt2 = tester.agency(), tester.gpt2()
    gpt2_keys = {k for k in gpt2.state_dict() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    keys = set(agency.state_dict())
    assert keys - gpt2_keys == {f"transformer.{name}" for name in ("head_gates", *AGENCY_BUFFERS)}
    assert gpt2_keys <= keys
    fresh = {name: getattr(agency.transformer, name).clone() for name in AGENCY_BUFFERS}
    for name in AGENCY_BUFFERS:
        getattr(agency.transformer, name).fill_(2)
    agency.transformer.reset_agency_state()
    assert all(torch.equal(getattr(agency.transformer, name), fresh[name]) for name in AGENCY_BUFFERS)


def test_from_gpt2_accepts_local_directory_and_gpt2model(tester):
    gpt2 = tester.gpt2()
    ids = tester.input_ids()
    with tempfile.TemporaryDirectory() as tmp:
        gpt2.save_pretrained(tmp)
        from_dir = AgencyGPT2ForCausalLM.from_gpt2(tmp).eval()
    from_base = AgencyGPT2ForCausalLM.from_gpt2(gpt2.transformer).eval()
    with torch.no_grad():
        ref = gpt2(ids).logits
        assert_close(from_dir(ids).logits, ref, 1e-4)
        assert_close(from_base(ids).logits, ref, 1e-4)


def test_from_gpt2_rejects_other_checkpoints(tester):
    with tempfile.TemporaryDirectory() as tmp:
        llama = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
        llama.save_pretrained(tmp)
        with pytest.raises(ValueError, match="model_type 'gpt2'"):
            AgencyGPT2ForCausalLM.from_gpt2(tmp)
    with pytest.raises(ValueError, match="expects a GPT2LMHeadModel"):
        AgencyGPT2ForCausalLM.from_gpt2(torch.nn.Linear(2, 2))


def test_from_gpt2_carries_hf_pruned_heads(tester):
    """A GPT-2 pruned with transformers' own prune_heads converts with the same shapes and logits."""
    gpt2 = tester.gpt2()
    prune_gpt2_heads(gpt2, {0: [1], 2: [0, 3]})
    agency = AgencyGPT2ForCausalLM.from_gpt2(gpt2).eval()
    assert agency.num_heads_per_layer() == [3, 4, 2, 4]
    ids = tester.input_ids()
    with torch.no_grad():
        assert_close(agency(ids).logits, gpt2(ids).logits, 1e-4)


# ---------------------------------------------------------------- common model checks


@pytest.mark.parametrize("level", [0, 3])
def test_common_checks(tester, level):
    model = tester.agency(optimization_level=level)
    ids = tester.input_ids()
    check_save_load_round_trip(model, ids)
    check_batched_equals_single_with_padding(model, ids)
    check_cache_matches_no_cache(model, ids)
    frozen = ("transformer.baseline.",) if level >= 2 else ()
    check_gradient_flow(model, ids, frozen_prefixes=frozen)
    check_dtype(model, ids)


def test_common_checks_on_pruned_model(tester):
    model = tester.agency()
    model.prune_heads({0: [0, 1, 2, 3], 1: [2], 3: [0, 1, 3]})  # layer 0 keeps no head at all
    assert model.num_heads_per_layer() == [0, 3, 4, 1]
    ids = tester.input_ids()
    reloaded = check_save_load_round_trip(model, ids)
    assert reloaded.num_heads_per_layer() == [0, 3, 4, 1]
    check_batched_equals_single_with_padding(model, ids)
    check_cache_matches_no_cache(model, ids)
    layer0 = ("transformer.h.0.ln_1.", "transformer.h.0.attn.c_attn.", "transformer.h.0.attn.c_proj.weight")
    check_gradient_flow(model, ids, unused_prefixes=layer0)


def test_auto_classes(tester):
    config = tester.config()
    assert isinstance(AutoModel.from_config(config), AgencyGPT2Model)
    assert isinstance(AutoModelForCausalLM.from_config(config), AgencyGPT2ForCausalLM)
    assert AutoConfig.for_model("agency_gpt2").__class__ is AgencyGPT2Config


def test_base_model_outputs_and_attentions(tester):
    model = tester.agency()
    model.prune_heads({1: [0, 2]})
    ids = tester.input_ids()
    with torch.no_grad():
        out = model.transformer(ids, output_attentions=True, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 12, 32)
    assert len(out.hidden_states) == model.config.n_layer + 1
    assert [a.shape[1] for a in out.attentions] == [4, 2, 4, 4]
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 12))
    assert torch.all(out.attentions[0].triu(1) == 0), "attention must be causal"


def test_gradient_checkpointing_gives_same_gradients(tester):
    ids = tester.input_ids()
    grads = []
    for checkpointing in (False, True):
        model = tester.agency()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append(model.transformer.head_gates.grad.clone())
    assert_close(grads[0], grads[1], 1e-6)


def test_token_ids_out_of_range_raise(tester):
    model = tester.agency()
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 98\]"):
        model(torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match="exceeds n_positions"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ---------------------------------------------------------------- gates, states, consent


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_zero_gate_equals_physically_pruned_head(tester):
    ids = tester.input_ids()
    gated, pruned = tester.agency(), tester.agency()
    with torch.no_grad():
        gated.transformer.head_gates[1, 2] = 0.0
        gated.transformer.head_gates[3, 0] = 0.0
    pruned.prune_heads({1: [2], 3: [0]})
    assert_close(_logits(gated, ids), _logits(pruned, ids), 1e-5)


def test_open_gates_skip_the_multiply_at_inference_only(tester):
    # with every scale at 1, inference skips the gate multiply; training keeps it (the gates need their gradient)
    ids = tester.input_ids()
    model = tester.agency()
    with_grad = model(ids).logits
    assert_close(_logits(model, ids), with_grad.detach(), 0.0)
    with_grad.sum().backward()
    assert model.transformer.head_gates.grad.abs().sum() > 0
    with torch.no_grad():
        model.transformer.head_gates[2, 1] = 0.5
    assert not torch.allclose(_logits(model, ids), with_grad.detach())


def test_states_and_consent_scale_heads_exactly(tester):
    ids = tester.input_ids()
    reference, model = tester.agency(), tester.agency()
    with torch.no_grad():
        reference.transformer.head_gates[0, 1] = 0.5  # overloaded -> x0.5
        reference.transformer.head_gates[2, 3] = 0.7  # misaligned -> x0.7
        reference.transformer.head_gates[3, 2] = 0.0  # withdrawn -> masked
        reference.transformer.head_gates[1, 0] = 0.0  # consent withdrawn -> masked
        model.transformer.head_state[0, 1] = 1
        model.transformer.head_state[2, 3] = 2
        model.transformer.head_state[3, 2] = 3
    model.set_consent({1: [0]}, consent=False)
    assert model.transformer.head_state[1, 0] == 3
    assert_close(_logits(model, ids), _logits(reference, ids), 1e-5)
    model.set_consent({1: [0]}, consent=True)
    assert model.transformer.head_state[1, 0] == 0
    with pytest.raises(ValueError, match="allowed layers"):
        model.set_consent({7: [0]}, consent=False)


def test_observe_attentions_measures_normalized_entropy(tester):
    model = tester.agency()
    T = 6
    causal = torch.tril(torch.ones(T, T))
    uniform = (causal / causal.sum(-1, keepdim=True))[None, None].expand(1, 4, T, T).clone()
    focused = torch.eye(T)[None, None].expand(1, 4, T, T).clone()
    attentions = [uniform, focused, uniform, focused]
    model.observe_attentions(attentions)
    util = model.transformer.utilization
    assert_close(util[0], torch.ones(4), 1e-5)
    assert_close(util[1], torch.zeros(4), 1e-5)
    model.observe_attentions([focused, focused, focused, focused])
    assert_close(util[0], torch.full((4,), 0.9), 1e-5)  # EMA with decay 0.9


def test_measure_utilization_uses_real_attention(tester):
    model = tester.agency()
    util = model.measure_utilization(tester.input_ids())
    assert util.shape == (4, 4)
    assert torch.all((util > 0) & (util <= 1))
    assert torch.all(model.transformer.observations == 1)


def test_state_transitions_overload_withdraw_recover(tester):
    model = tester.agency(withdraw_after=2, recovery_period=3, overload_threshold=0.9)
    base = model.transformer
    base.utilization.fill_(0.5)
    base.observations.fill_(1)
    base.utilization[0, 0] = 0.95
    model.update_agency_states()
    assert base.head_state[0, 0] == 1 and int((base.head_state != 0).sum()) == 1  # overloaded, others active
    model.update_agency_states()
    assert base.head_state[0, 0] == 3  # still overloaded after withdraw_after updates -> withdrawn
    base.utilization[0, 0] = 0.5
    for _ in range(2):
        model.update_agency_states()
        assert base.head_state[0, 0] == 3
    model.update_agency_states()
    assert base.head_state[0, 0] == 0  # recovered after recovery_period updates
    report = model.agency_report()
    assert report["counts"]["active"] == 16


def test_misaligned_state_from_gate_gradients(tester):
    model = tester.agency(misalignment_threshold=1.0)
    base = model.transformer
    base.importance.fill_(1.0)
    base.gate_grad_ema.fill_(-0.5)
    base.gate_grad_ema[2, 1] = 3.0  # raising this gate raises the loss
    model.update_agency_states()
    assert base.head_state[2, 1] == 2
    assert int((base.head_state == 2).sum()) == 1


def test_controller_warmup_frequency_and_direction(tester):
    model = tester.agency(controller_warmup_steps=10, controller_update_frequency=5, controller_lr=0.5)
    base = model.transformer
    with torch.no_grad():
        base.head_gates.fill_(0.5)
    base.importance.copy_(torch.linspace(0, 1, 16).view(4, 4))
    base.utilization.fill_(0.5)
    assert model.controller_step(5) == {"moved": 0, "regrown": 0}  # warm-up
    assert model.controller_step(12) == {"moved": 0, "regrown": 0}  # not an update step
    assert model.controller_step(15)["moved"] == 16
    gates = base.head_gates.detach().flatten()
    assert gates[-1] > 0.5 > gates[0]  # important heads up, unimportant down
    assert torch.all(gates[1:] >= gates[:-1])


def test_controller_regrows_useful_gated_heads(tester):
    model = tester.agency(controller_warmup_steps=0, controller_update_frequency=1, regrowth_threshold=1.0)
    base = model.transformer
    with torch.no_grad():
        base.head_gates[1, 1] = 0.0
        base.head_gates[1, 2] = 0.0
    base.importance.fill_(0.1)
    base.importance[1, 1] = 5.0  # gate-pruned but important -> regrow
    result = model.controller_step(1)
    assert result["regrown"] == 1
    assert base.head_gates[1, 1].item() == pytest.approx(model.config.regrowth_gate)
    assert base.head_gates[1, 2].item() < model.config.gate_prune_threshold


def test_agency_step_from_a_real_backward(tester):
    model = tester.agency(controller_warmup_steps=0, controller_update_frequency=1)
    ids = tester.input_ids()
    model.train()
    model(ids, labels=ids).loss.backward()
    model.measure_utilization(ids)
    before = model.transformer.head_gates.detach().clone()
    result = model.agency_step(step=1)
    assert result["moved"] == 16
    assert torch.all(model.transformer.importance > 0)
    assert not torch.equal(before, model.transformer.head_gates.detach())


def test_agency_report(tester):
    model = tester.agency()
    model.prune_heads({2: [1]})
    report = model.agency_report()
    assert len(report["heads"]) == 16
    assert report["counts"] == {"active": 15, "overloaded": 0, "misaligned": 0, "withdrawn": 0, "pruned": 1}
    assert report["heads_per_layer"] == [4, 4, 3, 4]
    entry = report["heads"][2 * 4 + 1]
    assert entry["state"] == "pruned" and (entry["layer"], entry["head"]) == (2, 1)


# ---------------------------------------------------------------- U-Net, fusion, hybrid


@pytest.mark.parametrize("level", [1, 2, 3])
def test_optional_extras_are_exactly_gpt2_at_init(tester, level):
    gpt2 = tester.gpt2()
    model = AgencyGPT2ForCausalLM.from_gpt2(gpt2, optimization_level=level).eval()
    assert (model.transformer.unet_skips is not None) == (level >= 1)
    assert (model.transformer.baseline is not None) == (level >= 2)
    assert (model.transformer.router is not None) == (level >= 3)
    ids = tester.input_ids()
    with torch.no_grad():
        assert_close(model(ids).logits, gpt2(ids).logits, 1e-4, f"level {level}")
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), gpt2.generate(ids, **kwargs))


def test_extras_learn_and_change_outputs(tester):
    model = tester.agency(optimization_level=3)
    ids = tester.input_ids()
    with torch.no_grad():  # move the agency path away from the baseline, as training would
        model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)
    model.train()
    model(ids, labels=ids).loss.backward()
    base = model.transformer
    assert base.unet_skips[0].weight.grad.abs().sum() > 0
    assert base.fusion_gates.grad.abs().sum() > 0
    assert base.hybrid_gate.grad.abs() > 0
    assert all(p.grad is None for p in base.baseline.parameters())
    before = _logits(model.eval(), ids)
    with torch.no_grad():
        base.fusion_gates.fill_(0.5)
        base.hybrid_gate.fill_(0.5)
    assert (_logits(model, ids) - before).abs().max() > 1e-3


def test_hybrid_routes_to_baseline(tester):
    """Router fully open: the agency model's final states are replaced by the frozen baseline's."""
    gpt2 = tester.gpt2()
    model = AgencyGPT2ForCausalLM.from_gpt2(gpt2, optimization_level=3).eval()
    ids = tester.input_ids()
    with torch.no_grad():
        for block in model.transformer.h:  # wreck the agency path
            block.mlp.c_fc.weight.mul_(5.0)
        model.transformer.hybrid_gate.fill_(1.0)
        model.transformer.router.weight.zero_()
        model.transformer.router.bias.fill_(30.0)  # sigmoid -> 1
        assert_close(model(ids).logits, gpt2(ids).logits, 1e-4)


def test_load_baseline_requires_fusion(tester):
    with pytest.raises(ValueError, match="no baseline"):
        tester.agency().load_baseline(tester.gpt2())


def test_forward_exports_without_data_dependent_branches(tester):
    """torch.export traces one graph that serves padded and unpadded batches (the path to ONNX export)."""
    model = tester.agency()
    model.prune_heads({0: [1], 2: [0, 1, 2, 3]})
    check_export(model, tester.input_ids())


def test_generation_contract(tester):
    from armada.modeling.modeling_agency_gpt2 import CACHE_FIELD

    check_generation_contract(tester.agency(), tester.input_ids(), cache_field=CACHE_FIELD)
