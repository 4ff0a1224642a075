import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import armada  # noqa: F401
from armada import AgencyGPT2ForCausalLM
from armada.pruning import STRATEGIES, prune, score_heads, select_heads

N_LAYER, N_HEAD, N_EMBD = 3, 4, 32
HEAD_DIM = N_EMBD // N_HEAD


def make_model(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=61, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AgencyGPT2ForCausalLM.from_gpt2(GPT2LMHeadModel(config)).eval()


def calibration(seed=0, batches=2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 61, (4, 16), generator=generator) for _ in range(batches)]


def kill_head(model, layer, head):
    """Zero the head's rows of c_proj: it contributes nothing, so every data-driven score must rank it last."""
    with torch.no_grad():
        model.transformer.h[layer].attn.c_proj.weight[head * HEAD_DIM:(head + 1) * HEAD_DIM].zero_()


def flatten_selection(selection):
    return sorted((layer, head) for layer, heads in selection.items() for head in heads)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_prunes_the_heads_it_scores_lowest(strategy):
    data = calibration()
    scores = score_heads(make_model(), strategy, data, l0_steps=20)
    assert scores.shape == (N_LAYER, N_HEAD) and torch.isfinite(scores).all()
    expected = flatten_selection(select_heads(scores, 0.5))
    model = make_model()
    selection = prune(model, 0.5, strategy, data, l0_steps=20)
    assert flatten_selection(selection) == expected
    assert len(expected) == 6
    assert sum(model.num_heads_per_layer()) == N_LAYER * N_HEAD - 6


@pytest.mark.parametrize("strategy", ["magnitude", "importance", "l0"])
def test_dead_head_is_scored_lowest(strategy):
    model = make_model()
    kill_head(model, 1, 2)
    if strategy == "magnitude":  # magnitude sees weights, not function: kill the q/k/v columns too
        with torch.no_grad():
            cols = torch.arange(2 * HEAD_DIM, 3 * HEAD_DIM)
            model.transformer.h[1].attn.c_attn.weight[:, torch.cat([cols, cols + N_EMBD, cols + 2 * N_EMBD])] = 0
    scores = score_heads(model, strategy, calibration(), l0_steps=60, l0_penalty=0.001)
    assert scores.flatten().argmin().item() == 1 * N_HEAD + 2


def test_entropy_prunes_the_most_diffuse_head():
    model = make_model()
    with torch.no_grad():  # zero queries -> uniform attention over the visible keys: maximal entropy
        model.transformer.h[2].attn.c_attn.weight[:, 3 * HEAD_DIM:4 * HEAD_DIM] = 0
        model.transformer.h[2].attn.c_attn.bias[3 * HEAD_DIM:4 * HEAD_DIM] = 0
    scores = score_heads(model, "entropy", calibration())
    assert scores.flatten().argmin().item() == 2 * N_HEAD + 3
    assert scores[2, 3].item() == pytest.approx(-1.0, abs=1e-5)


def test_importance_is_gradient_of_loss_wrt_gates():
    model = make_model()
    data = calibration(batches=1)
    scores = score_heads(model, "importance", data, normalize_per_layer=False)
    model.transformer.head_gates.grad = None
    model(data[0], labels=data[0]).loss.backward()
    torch.testing.assert_close(scores, model.transformer.head_gates.grad.abs())


def test_pruned_parameter_count_drops_as_expected():
    model = make_model()
    before = model.num_parameters()
    prune(model, 0.5, "magnitude")
    per_head = 3 * (N_EMBD * HEAD_DIM + HEAD_DIM) + HEAD_DIM * N_EMBD  # c_attn q/k/v columns + c_proj rows
    assert before - model.num_parameters() == 6 * per_head


def test_physical_pruning_equals_zero_gates():
    ids = calibration(batches=1)[0]
    pruned, gated = make_model(), make_model()
    selection = prune(pruned, 0.3, "random")
    with torch.no_grad():
        for layer, heads in selection.items():
            gated.transformer.head_gates[layer, heads] = 0.0
        torch.testing.assert_close(pruned(ids).logits, gated(ids).logits, atol=1e-5, rtol=0)


def test_levels_accumulate_and_per_layer_option():
    model = make_model()
    prune(model, 0.3, "magnitude")
    assert sum(model.num_heads_per_layer()) == 12 - round(0.3 * 12)
    prune(model, 0.5, "magnitude")  # a level is a fraction of all heads, already-pruned ones count
    assert sum(model.num_heads_per_layer()) == 6
    assert prune(model, 0.5, "magnitude") == {}
    per_layer = make_model()
    prune(per_layer, 0.5, "random", per_layer=True)
    assert per_layer.num_heads_per_layer() == [2, 2, 2]


def test_high_level_keeps_at_least_one_head():
    model = make_model()
    prune(model, 0.99, "random")
    assert sum(model.num_heads_per_layer()) == 1


@pytest.mark.parametrize("level", [-0.1, 1.0, 1.5, "half"])
def test_bad_level_raises(level):
    with pytest.raises(ValueError, match=r"Pruning level must be in \[0, 1\)"):
        prune(make_model(), level, "random")


def test_unknown_strategy_and_missing_data_raise():
    with pytest.raises(ValueError, match="allowed: random, magnitude, entropy, importance, l0"):
        prune(make_model(), 0.5, "taylor")
    with pytest.raises(ValueError, match="needs calibration data"):
        score_heads(make_model(), "importance")


def test_prune_heads_rejects_bad_requests():
    model = make_model()
    with pytest.raises(ValueError, match=r"allowed heads are 0..3"):
        model.prune_heads({0: [4]})
    with pytest.raises(ValueError, match=r"allowed layers are 0..2"):
        model.prune_heads({3: [0]})
    with pytest.raises(ValueError, match="every head of the model"):
        model.prune_heads({layer: list(range(N_HEAD)) for layer in range(N_LAYER)})
    with pytest.raises(ValueError, match=r"allowed layers are 0..2 \(or -3..-1"):
        model.prune_heads({-4: [0]})
    assert model.num_heads_per_layer() == [4, 4, 4], "a rejected request must leave the model untouched"


def test_prune_heads_counts_negative_layers_from_the_end():
    """As in GPT-2 and PreTrainedModel: layer -1 is the last one."""
    model = make_model()
    model.prune_heads({-1: [0], -3: [1, 2]})
    assert model.num_heads_per_layer() == [2, 4, 3] and model.config.pruned_heads == {0: [1, 2], 2: [0]}


def test_prune_on_non_agency_model_raises():
    with pytest.raises(ValueError, match="works on AgencyGPT2ForCausalLM"):
        prune(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)), 0.5, "random")
