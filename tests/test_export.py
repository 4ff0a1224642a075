"""ONNX export (armada.export), ONNX Runtime inference (armada.onnxruntime) and `armada export onnx`.

Tiny models; every export goes through the parity checks of `export_onnx`, on the backend `onnx_backend()` picks
(optimum where optimum-onnx installs, torch.onnx elsewhere); where both exist, `test_torch_backend_*` exports every
architecture through the torch backend too.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import armada  # noqa: F401
from armada import (
    AgencyGPT2Config,
    AgencyGPT2ForCausalLM,
    ThoughtDiffusionConfig,
    ThoughtDiffusionForMaskedLM,
    ThoughtStack,
    UnifiedARMTConfig,
    UnifiedARMTForCausalLM,
)

pytest.importorskip("onnxruntime")

from armada.cli import main  # noqa: E402
from armada.export import ExportParityError, cpu_instruction_set, export_onnx, onnx_backend, onnx_export  # noqa: E402
from armada.onnxruntime import (  # noqa: E402
    ORTAgencyGPT2ForCausalLM,
    ORTThoughtDiffusionForMaskedLM,
    ORTUnifiedARMTForCausalLM,
)

VOCAB = 97
BACKEND = onnx_backend()
needs_optimum = pytest.mark.skipif(BACKEND != "optimum", reason="optimum-onnx is not installed (transformers 5)")


def agency(prune=None, seed=0):
    torch.manual_seed(seed)
    # a wide initialization makes random logits peaked, so greedy generations vary from token to token
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                      initializer_range=0.3))
    model = AgencyGPT2ForCausalLM.from_gpt2(gpt2).eval()
    with torch.no_grad():  # gates away from 1 so the export must carry the gate multiply
        model.transformer.head_gates.uniform_(0.5, 1.0)
    if prune:
        model.prune_heads(prune)
    return model


def armt(seed=0):
    torch.manual_seed(seed)
    config = UnifiedARMTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               segment_size=8, num_memory_tokens=4, d_mem=8, initializer_range=0.3)
    model = UnifiedARMTForCausalLM(config).eval()
    with torch.no_grad():  # memory writes start silent (zero W_V); open them so memory carries information
        for block in model.transformer.h:
            block.associative_memory.v_proj.weight.normal_(0, 0.3)
    return model


def diffusion(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, mask_token_id=VOCAB - 1, thought_dims=(4, 4), thought_stack_size=3,
                  block_length=8, initializer_range=0.3)
    return ThoughtDiffusionForMaskedLM(ThoughtDiffusionConfig(**{**config, **overrides})).eval()


def prompt(length=7, batch=1, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, new=20):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def agency_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("agency")
    model = agency()
    model.save_pretrained(root / "model")
    report = export_onnx(root / "model", root / "onnx", quantize="int8")
    return model, root / "onnx", report


@pytest.fixture(scope="module")
def armt_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("armt")
    model = armt()
    report = export_onnx(model, root / "onnx", quantize="int8")
    return model, root / "onnx", report


@pytest.fixture(scope="module")
def diffusion_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    model = diffusion()
    model.save_pretrained(root / "model")
    report = export_onnx(root / "model", root / "onnx", quantize="int8")  # from a directory: AutoModelForMaskedLM
    return model, root / "onnx", report


# ----------------------------------------------------------------------------------------------------- AgencyGPT2
def test_agency_export_fp32_and_int8_with_parity(agency_export):
    model, out, report = agency_export
    assert {"config.json", "export_report.json", "model.onnx", "model_quantized.onnx"} <= set(os.listdir(out))
    assert report["backend"] == BACKEND
    assert report["fp32"]["pass"] and report["fp32"]["max_abs_logit_diff"] <= 1e-4
    assert report["int8"]["instruction_set"] == cpu_instruction_set()
    assert 0 <= report["int8"]["top1_agreement"] <= 1 and report["int8"]["perplexity_int8"] > 0
    assert not report["int8"]["enforced"]  # random weights: perplexity ~ vocabulary size, the check is not meaningful
    assert json.loads((out / "export_report.json").read_text())["fp32"] == report["fp32"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".onnx-")]


def test_agency_ort_generates_like_pytorch(agency_export):
    model, out, _ = agency_export
    ort_model = ORTAgencyGPT2ForCausalLM.from_pretrained(out, file_name="model.onnx")
    assert ort_model.can_use_cache and "position_ids" in ort_model.input_names
    ids = prompt()
    expected = greedy(model, ids)
    assert len(set(expected[0, ids.shape[1]:].tolist())) > 3  # not a degenerate repetition
    assert torch.equal(greedy(ort_model, ids), expected)
    int8 = ORTAgencyGPT2ForCausalLM.from_pretrained(out, file_name="model_quantized.onnx")
    assert greedy(int8, ids).shape == expected.shape
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(ort_model.generate(ids, **beams), model.generate(ids, **beams))


@needs_optimum
def test_agency_optimum_ort_model_for_causal_lm_generates_like_pytorch(agency_export):
    from optimum.onnxruntime import ORTModelForCausalLM

    model, out, _ = agency_export
    ort_model = ORTModelForCausalLM.from_pretrained(out, file_name="model.onnx")  # optimum's class as is
    ids = prompt()
    assert torch.equal(greedy(ort_model, ids), greedy(model, ids))


def test_agency_left_padded_batch_matches_pytorch(agency_export):
    model, out, _ = agency_export
    ort_model = ORTAgencyGPT2ForCausalLM.from_pretrained(out, file_name="model.onnx")
    ids = prompt(length=9, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(ort_model.generate(ids, **kwargs), model.generate(ids, **kwargs))


@pytest.mark.parametrize("prune", [{0: [0, 1], 2: [3]}, {0: [0, 1, 2, 3], 1: [1]}], ids=["uneven", "empty-layer"])
def test_pruned_agency_exports_and_generates_like_pytorch(tmp_path, prune):
    model = agency(prune)
    report = export_onnx(model, tmp_path / "onnx")
    assert report["fp32"]["pass"]
    ort_model = ORTAgencyGPT2ForCausalLM.from_pretrained(tmp_path / "onnx")
    assert ort_model.cache_heads == [h for h in model.num_heads_per_layer() for _ in range(2)]
    ids = prompt()
    assert torch.equal(greedy(ort_model, ids), greedy(model, ids))


@needs_optimum
def test_agency_registered_with_optimum_tasks_manager(tmp_path):
    from optimum.exporters.onnx import main_export
    from optimum.exporters.tasks import TasksManager

    tasks = TasksManager.get_supported_tasks_for_model_type("agency_gpt2", "onnx", library_name="transformers")
    assert "text-generation-with-past" in tasks
    assert "text-generation" in TasksManager.get_supported_tasks_for_model_type("unified_armt", "onnx",
                                                                               library_name="transformers")
    model = agency({1: [2]})
    model.save_pretrained(tmp_path / "model")
    # optimum's own entry point (what optimum-cli runs) finds the registered config, pruned shapes included
    main_export(str(tmp_path / "model"), tmp_path / "onnx", task="text-generation-with-past", do_validation=False)
    ids = prompt()
    assert torch.equal(greedy(ORTAgencyGPT2ForCausalLM.from_pretrained(tmp_path / "onnx"), ids), greedy(model, ids))


# ----------------------------------------------------------------------------------------------------- UnifiedARMT
def test_armt_export_fp32_and_int8_with_parity(armt_export):
    _, out, report = armt_export
    assert report["fp32"]["pass"] and report["fp32"]["max_abs_logit_diff"] <= 1e-4
    assert os.path.isfile(out / "model_quantized.onnx")


def test_armt_generation_crosses_segment_boundaries_like_pytorch(armt_export):
    model, out, _ = armt_export
    ort_model = ORTUnifiedARMTForCausalLM.from_pretrained(out)
    ids = prompt(length=11)  # segment_size 8: the prompt already ends inside the second segment
    expected = greedy(model, ids, new=22)  # ... and generation commits two more segments
    assert len(set(expected[0, ids.shape[1]:].tolist())) > 3
    assert torch.equal(greedy(ort_model, ids, new=22), expected)


def test_armt_streaming_and_padding_match_pytorch(armt_export):
    model, out, _ = armt_export
    ort_model = ORTUnifiedARMTForCausalLM.from_pretrained(out)
    ids = prompt(length=29, batch=2)
    with torch.no_grad():
        expected = model(ids).logits
    state, chunks, start = None, [], 0
    for size in (5, 3, 9, 1, 11):
        out_chunk = ort_model(ids[:, start:start + size], memory_state=state)
        chunks.append(out_chunk.logits)
        state, start = out_chunk.memory_state, start + size
    assert (torch.cat(chunks, dim=1) - expected).abs().max() <= 1e-4
    assert state.fill.tolist() == [29 % 8] * 2
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding: row 1 is its last 23 tokens alone
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
    got = ort_model(ids, attention_mask=mask).logits
    assert (got - padded)[mask.bool()].abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------------------- ThoughtDiffusion
def test_diffusion_export_fp32_and_int8_with_parity(diffusion_export):
    _, out, report = diffusion_export
    assert report["model_type"] == "thought_diffusion"
    assert report["fp32"]["pass"] and report["fp32"]["max_abs_logit_diff"] <= 1e-4
    assert {"model.onnx", "model_quantized.onnx", "config.json"} <= set(os.listdir(out))
    assert report["int8"]["scored_positions"] > 100 and not report["int8"]["enforced"]


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_k=1, use_block_cache=False),
                                    dict(temperature=0.8, confidence_threshold=0.5),
                                    dict(temperature=1.0, remasking="random", top_p=0.9)],
                         ids=["greedy-cache", "greedy-recompute", "sampled-threshold", "sampled-random"])
def test_diffusion_ort_generate_with_stack_matches_pytorch(diffusion_export, kwargs):
    model, out, _ = diffusion_export
    ort_model = ORTThoughtDiffusionForMaskedLM.from_pretrained(out)
    ids = prompt(length=6, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    runs = []
    for m in (model, ort_model):
        runs.append(m.generate_with_stack(ids, attention_mask=mask, max_new_tokens=16, num_steps=8,
                                          generator=torch.Generator().manual_seed(5), return_history=True, **kwargs))
    expected, got = runs
    assert len(set(expected.sequences[0, 6:].tolist())) > 3  # not a degenerate repetition
    assert torch.equal(got.sequences, expected.sequences)
    assert (got.thought_stack.buffer - expected.thought_stack.buffer).abs().max() <= 1e-4
    assert torch.equal(got.thought_stack.count, expected.thought_stack.count)
    assert got.num_forward_passes == expected.num_forward_passes and len(got.history) == len(expected.history)


def test_diffusion_ort_forward_and_generate(diffusion_export):
    model, out, _ = diffusion_export
    ort_model = ORTThoughtDiffusionForMaskedLM.from_pretrained(out)
    ids = prompt(length=12, batch=3).masked_fill(torch.rand(3, 12, generator=torch.Generator().manual_seed(0)) < 0.5,
                                                  VOCAB - 1)
    stack = ThoughtStack.empty(model.config, 3).push(torch.rand(3, 4, 4) - 0.5)
    with torch.no_grad():
        expected = model(ids, thought_stack=stack)
    got = ort_model(ids, thought_stack=stack)
    real = expected.logits > -1e30
    assert (got.logits - expected.logits)[real].abs().max() <= 1e-4
    assert (got.new_thought - expected.new_thought).abs().max() <= 1e-4
    assert torch.equal(ort_model.generate(ids[:1, :5], max_new_tokens=8), model.generate(ids[:1, :5], max_new_tokens=8))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=97\)"):
        ort_model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match="num_steps must be"):
        ort_model.generate_with_stack(ids[:1, :5], max_new_tokens=8, num_steps=0)


@pytest.mark.parametrize("overrides", [dict(thought_stack_size=0), dict(block_length=None),
                                       dict(position_embedding_type="absolute")],
                         ids=["no-stack", "full-attention", "absolute-positions"])
def test_diffusion_variants_export(tmp_path, overrides):
    model = diffusion(**overrides)
    report = export_onnx(model, tmp_path / "onnx")
    assert report["fp32"]["pass"]
    ort_model = ORTThoughtDiffusionForMaskedLM.from_pretrained(tmp_path / "onnx")
    ids = prompt(length=5)
    kwargs = dict(max_new_tokens=16, num_steps=8, top_k=1)
    assert torch.equal(ort_model.generate_with_stack(ids, **kwargs).sequences,
                       model.generate_with_stack(ids, **kwargs).sequences)


# ----------------------------------------------------------------------------------------------------- torch backend
def graph_signature(graph):
    """(name, element type, shape with dynamic axes by name) of every input and output of an ONNX graph."""
    def describe(value):
        return value.name, value.type.tensor_type.elem_type, [d.dim_param or d.dim_value
                                                             for d in value.type.tensor_type.shape.dim]
    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


@pytest.mark.skipif(BACKEND == "torch", reason="every other test here already exports through the torch backend")
@pytest.mark.parametrize("build", [lambda: agency({0: [0, 1], 2: [3]}), armt, diffusion],
                         ids=["agency-pruned", "armt", "diffusion"])
def test_torch_backend_exports_the_same_graphs(monkeypatch, tmp_path, build):
    """Where optimum-onnx is installed, the torch.onnx backend (the one of transformers 5) writes graphs with the same
    inputs and outputs, passes the same parity checks and serves the same ORT classes."""
    import onnx

    model = build()
    reference = export_onnx(model, tmp_path / "optimum", quantize="int8")
    monkeypatch.setattr(onnx_export, "onnx_backend", lambda: "torch")
    report = export_onnx(model, tmp_path / "torch", quantize="int8")
    assert reference["backend"] == "optimum" and report["backend"] == "torch" and report["fp32"]["pass"]
    settings = ("instruction_set", "per_channel", "weights_dtype", "activations_dtype", "weights_symmetric",
                "reduce_range", "operators_to_quantize")
    assert {k: report["int8"][k] for k in settings} == {k: reference["int8"][k] for k in settings}
    for name in ("model.onnx", "model_quantized.onnx"):
        optimum_graph, torch_graph = (onnx.load(tmp_path / backend / name).graph for backend in ("optimum", "torch"))
        assert graph_signature(torch_graph) == graph_signature(optimum_graph)
    ids = prompt(length=6)
    if model.config.model_type == "thought_diffusion":
        kwargs = dict(max_new_tokens=16, num_steps=8, top_k=1)
        got = ORTThoughtDiffusionForMaskedLM.from_pretrained(tmp_path / "torch").generate_with_stack(ids, **kwargs)
        assert torch.equal(got.sequences, model.generate_with_stack(ids, **kwargs).sequences)
    else:
        cls = ORTAgencyGPT2ForCausalLM if model.config.model_type == "agency_gpt2" else ORTUnifiedARMTForCausalLM
        assert torch.equal(greedy(cls.from_pretrained(tmp_path / "torch"), ids, new=12), greedy(model, ids, new=12))


def test_tied_embedding_table_is_stored_once(tmp_path):
    """The output head shares GPT-2's embedding table: the export holds it once (the head reads a Transpose of it),
    whichever backend wrote it, so the file is no larger than the PyTorch weights."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = agency()
    export_onnx(model, tmp_path / "out")
    table = model.transformer.wte.weight.detach().numpy()
    copies = [init.name for init in onnx.load(tmp_path / "out" / "model.onnx").graph.initializer
              if any(np.array_equal(numpy_helper.to_array(init), t) for t in (table, table.T))]
    assert len(copies) == 1, copies


# ----------------------------------------------------------------------------------------------------- int8 check
@pytest.fixture(scope="module")
def trained_agency():
    """A tiny AgencyGPT2 trained for a few seconds on repetitive text (perplexity far below the vocabulary size)."""
    torch.manual_seed(0)
    model = AgencyGPT2ForCausalLM(AgencyGPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    base = torch.arange(40) * 7 % VOCAB
    data = torch.stack([base.roll(-s) for s in range(0, 40, 4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), base.tolist() * 5


def test_int8_check_enforced_for_a_trained_model(trained_agency, tmp_path):
    model, sample = trained_agency
    report = export_onnx(model, tmp_path / "onnx", quantize="int8", sample_ids=sample)
    assert report["int8"]["enforced"] and report["int8"]["pass"], report["int8"]
    assert report["int8"]["tokens"] == len(sample) and report["int8"]["perplexity_fp32"] < VOCAB / 2


def test_failed_parity_leaves_nothing_behind(monkeypatch, tmp_path, trained_agency):
    model, sample = trained_agency
    monkeypatch.setattr(onnx_export, "INT8_MIN_TOP1", 1.01)
    with pytest.raises(ExportParityError, match="int8 ONNX parity failed.*top-1 agreement"):
        export_onnx(model, tmp_path / "out", quantize="int8", sample_ids=sample)
    monkeypatch.setattr(onnx_export, "FP32_ATOL", -1.0)
    with pytest.raises(ExportParityError, match="fp32 ONNX parity failed"):
        export_onnx(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------- without armada
def test_onnxruntime_alone_runs_the_exported_files(agency_export, armt_export, diffusion_export):
    """A fresh interpreter with onnxruntime and numpy only builds inputs from each graph's declared inputs."""
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import onnxruntime as ort
        for path in sys.argv[1:]:
            session = ort.InferenceSession(path)
            feed = {}
            for spec in session.get_inputs():
                shape = [d if isinstance(d, int) else (0 if "past" in d and "+" not in d else 3) for d in spec.shape]
                if spec.name == "lengths":
                    shape = [3]
                if spec.type == "tensor(bool)":  # UnifiedARMT's `commit` flag, ThoughtDiffusion's `past_mask`
                    feed[spec.name] = np.zeros(shape, bool)
                elif spec.type == "tensor(int64)":
                    feed[spec.name] = np.full(shape, 3 if spec.name == "lengths" else 1, np.int64)
                else:
                    feed[spec.name] = np.zeros(shape, np.float32)
            outputs = session.run(None, feed)
            assert outputs[0].shape[:2] == (3, 3) and np.isfinite(outputs[0]).all(), (path, outputs[0].shape)
        assert not [m for m in sys.modules if m.split(".")[0] in ("armada", "optimum", "torch", "transformers")]
        print("ok")
    """)
    files = [str(agency_export[1] / name) for name in ("model.onnx", "model_quantized.onnx")]
    files += [str(armt_export[1] / "model.onnx"), str(diffusion_export[1] / "model_quantized.onnx")]
    result = subprocess.run([sys.executable, "-c", script, *files], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_export(tmp_path, capsys):
    agency().save_pretrained(tmp_path / "model")
    assert main(["export", "onnx", str(tmp_path / "model"), str(tmp_path / "onnx")]) in (None, 0)
    assert json.loads(capsys.readouterr().out)["fp32"]["pass"]
    assert os.path.isfile(tmp_path / "onnx" / "model.onnx")


def test_cli_export_errors(tmp_path, monkeypatch):
    agency().save_pretrained(tmp_path / "model")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "no_weights").mkdir()
    AgencyGPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path / "no_weights")
    cases = [
        ([str(tmp_path / "gpt2"), str(tmp_path / "o")], "unsupported model type 'gpt2'"),
        ([str(tmp_path / "model"), str(tmp_path / "full")], "exists and is not empty; pass --overwrite"),
        ([str(tmp_path / "model"), str(tmp_path / "o"), "--opset", "9"], r"unsupported opset 9; allowed: integers 14"),
        ([str(tmp_path / "no_weights"), str(tmp_path / "o")], "has no weights"),
        ([str(tmp_path / "missing"), str(tmp_path / "o")], "does not exist"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit, match=message) as error:
            main(["export", "onnx", *args])
        assert error.value.code not in (0, None)
    monkeypatch.setattr(onnx_export, "FP32_ATOL", -1.0)
    with pytest.raises(SystemExit, match="fp32 ONNX parity failed") as error:
        main(["export", "onnx", str(tmp_path / "model"), str(tmp_path / "o")])
    assert error.value.code not in (0, None)
    assert not (tmp_path / "o").exists() and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_export_is_a_subprocess_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "armada.cli", "export", "onnx", str(tmp_path / "nothing"),
                             str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "does not exist" in result.stderr


def test_bad_arguments(tmp_path):
    model = agency()
    with pytest.raises(ValueError, match="unsupported quantize='int4'; allowed: None or 'int8'"):
        export_onnx(model, tmp_path / "o", quantize="int4")
    with pytest.raises(ValueError, match="unsupported instruction set 'sse'"):
        export_onnx(model, tmp_path / "o", quantize="int8", instruction_set="sse")
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        export_onnx(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2)), tmp_path / "o")
    with pytest.raises(ValueError, match="sample_ids must be"):
        export_onnx(model, tmp_path / "o", quantize="int8", sample_ids=[VOCAB + 5] * 20)
    assert not (tmp_path / "o").exists()


def test_ort_classes_refuse_bad_input(armt_export):
    ort_model = ORTUnifiedARMTForCausalLM.from_pretrained(armt_export[1])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=97\)"):
        ort_model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match="memory_state holds 1 rows but the input has 2"):
        ort_model(prompt(batch=2), memory_state=ort_model(prompt()).memory_state)


def test_onnx_speed_benchmark_quick(tmp_path):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "onnx_speed.py")
    result = subprocess.run([sys.executable, script, "--quick", "--families", "agency,gpt2", "--rounds", "1",
                             "--max-wait", "0", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "onnx_speed.json").read_text())
    assert report["greedy_equal_to_pytorch"]["agency"]["onnx"]
    assert set(report["results"]["agency"]) == {"pt", "onnx", "int8"}
    assert {t["target"].split(" int8")[0] for t in report["targets"]} == {"agency"}
    assert os.path.isfile(tmp_path / "onnx_speed.png")


def test_pruned_to_the_same_head_count_in_every_layer_exports(tmp_path):
    """Every layer keeps 2 of 4 heads: one count, but not config.n_head, so the empty first-step cache must come
    from the graph's shapes (the demo's importance-pruned model hit this)."""
    torch.manual_seed(0)
    model = AgencyGPT2ForCausalLM(AgencyGPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=256))
    model.prune_heads({0: [0, 1], 1: [2, 3]})
    model.save_pretrained(tmp_path / "m")
    report = export_onnx(str(tmp_path / "m"), str(tmp_path / "o"), sample_ids=torch.randint(0, 256, (64,)))
    assert report["fp32"]["max_abs_logit_diff"] <= 1e-4


def test_ort_generation_runs_torch_single_threaded_and_restores(agency_export, armt_export, diffusion_export):
    """armada's ORT classes generate under torch_threads(1) (benchmarks/ort_threads.py says why) and put the
    process's torch thread count back afterwards, also when generation fails."""
    from armada.onnxruntime import torch_threads

    before = torch.get_num_threads()
    seen = []
    models = [ORTAgencyGPT2ForCausalLM.from_pretrained(agency_export[1]),
              ORTUnifiedARMTForCausalLM.from_pretrained(armt_export[1]),
              ORTThoughtDiffusionForMaskedLM.from_pretrained(diffusion_export[1])]
    for model in models:
        run = model.session.run
        model.session.run = lambda *a, run=run, **k: seen.append(torch.get_num_threads()) or run(*a, **k)
        model.generate(prompt(), max_new_tokens=8)
        assert torch.get_num_threads() == before
    assert seen and set(seen) == {1}
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_onnx_export_refused_only_without_onnx_or_onnxruntime(monkeypatch):
    import importlib.util

    from armada import compat

    assert compat.onnx_export_missing() == ""  # optimum is not needed
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else find_spec(name, *args))
    assert "onnxruntime not installed" in compat.onnx_export_missing()
    with pytest.raises(ImportError, match=r'pip install "armada\[onnx\]"'):
        compat.require_onnx_export()
