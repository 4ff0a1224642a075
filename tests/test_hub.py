"""Hub push/pull, remote code and model cards, against the loopback Hub in tests/hub_server.py.

In-process tests point `huggingface_hub` at the server by patching its endpoint constants (they are read from
HF_ENDPOINT at import); the CLI and offline tests run `armada` / python in subprocesses with HF_ENDPOINT, HF_TOKEN,
HF_HOME and HF_HUB_OFFLINE in their environment, as a user would. The remote-code test runs in a virtualenv that has
torch and transformers but not armada (built once under .cache/, reused between runs).
"""

import ast
import filecmp
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
import transformers
from conftest import bare_python
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from armada import (
    ARCHITECTURES,
    AgencyGPT2Config,
    AgencyGPT2ForCausalLM,
    ThoughtDiffusionConfig,
    ThoughtDiffusionForMaskedLM,
    UnifiedARMTConfig,
    UnifiedARMTForCausalLM,
)
from armada.hub import check_config, pull, push
from armada.hub_cards import architecture, build_card, head_auto_class, read_results
from armada.tokenization import gpt2_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings"


def tiny_model(model_type, seed=0):
    torch.manual_seed(seed)
    if model_type == "agency_gpt2":
        model = AgencyGPT2ForCausalLM(AgencyGPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4))
        model.prune_heads({0: [1], 1: [0, 3]})  # pruned shapes must survive the round trip
    elif model_type == "unified_armt":
        model = UnifiedARMTForCausalLM(UnifiedARMTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         segment_size=8, num_memory_tokens=2, d_mem=8))
    else:
        mask = len(gpt2_tokenizer())  # [MASK] one past GPT-2's vocabulary, as checkpoint_tokenizer adds it
        model = ThoughtDiffusionForMaskedLM(ThoughtDiffusionConfig(
            vocab_size=mask + 1, mask_token_id=mask, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=96, block_length=8, thought_dims=[4, 4], thought_stack_size=2))
    return model.eval()


ARCHS = ["agency_gpt2", "unified_armt", "thought_diffusion"]
# model_type -> the Auto class of its head (AutoModelForCausalLM, AutoModelForMaskedLM for ThoughtDiffusion)
AUTO = {model_type: getattr(transformers, head_auto_class(architecture(model_type)[1])) for model_type in ARCHS}

def model_inputs(model, tokenizer, text):
    """The tokenized text; a masked LM gets every second token masked (at unmasked positions its SUBS logits only
    copy the input, whatever the weights). Its source is part of the scripts below that run in other processes."""
    inputs = tokenizer(text, return_tensors="pt")
    if type(model).__name__.endswith("ForMaskedLM"):
        inputs["input_ids"][:, 1::2] = model.config.mask_token_id
    return inputs


INPUTS = inspect.getsource(model_inputs)


def logits(model, tokenizer):
    with torch.no_grad():
        return model(**model_inputs(model, tokenizer, TEXT)).logits  # 22 tokens: 3 ARMT segments


def assert_same_logits(loaded, reference):
    """Logits of a loaded checkpoint against the model that saved it. Its weights are the same bits, but they sit at
    another memory alignment (safetensors maps the file), which can take a matmul down another kernel path:
    ThoughtDiffusion's logits then differ by ~1.5e-7 (0 after cloning the loaded weights), rounding, not the trip."""
    torch.testing.assert_close(loaded, reference, rtol=0, atol=1e-6)


def checkpoint_tokenizer(model_type):
    """The GPT-2 tokenizer, with [MASK] (id 50257) for ThoughtDiffusion, as examples/train_diffusion.py saves it."""
    tokenizer = gpt2_tokenizer()
    if model_type == "thought_diffusion":
        tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    return tokenizer


def save_checkpoint(model, path):
    model.save_pretrained(path)
    checkpoint_tokenizer(model.config.model_type).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    """huggingface_hub in this process talks to the loopback Hub with its token, into a fresh cache."""
    import huggingface_hub.constants as constants
    import huggingface_hub.file_download as file_download
    import huggingface_hub.hf_api as hf_api

    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    if hasattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE"):  # huggingface_hub 0.x imports its own copy
        monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)  # behind huggingface_hub.file_exists & co.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the loopback Hub serves LFS, not Xet
    monkeypatch.setenv("HF_TOKEN", hub.token)
    return hub


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{model_type: (folder, reference logits)}, each saved with the GPT-2 tokenizer."""
    tokenizer, result = gpt2_tokenizer(), {}
    for model_type in ARCHS:
        model = tiny_model(model_type)
        folder = save_checkpoint(model, tmp_path_factory.mktemp(model_type))
        result[model_type] = (folder, logits(model, tokenizer))
    return result


def cli_env(hub, home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def run(args, env, cwd=None, check=True):
    proc = subprocess.run(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


ARMADA = [sys.executable, "-m", "armada.cli"]


# ------------------------------------------------------------------------------------------------- remote code
@pytest.mark.parametrize("model_type", ARCHS)
def test_saved_checkpoint_carries_flat_remote_code(checkpoints, model_type):
    folder, _ = checkpoints[model_type]
    config = json.load(open(os.path.join(folder, "config.json")))
    modules = {value.split(".")[0] for value in config["auto_map"].values()}
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", AUTO[model_type].__name__}
    assert all(value.count(".") == 1 for value in config["auto_map"].values())  # `module.Class`, one dot
    for module in modules:
        tree = ast.parse(open(os.path.join(folder, f"{module}.py")).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and os.path.isfile(os.path.join(folder, f"{node.module}.py")), ast.dump(node)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                roots = {n.split(".")[0] for n in names}
                assert roots <= {"torch", "transformers"} | set(sys.stdlib_module_names), roots


def test_remote_code_auto_map_matches_architectures():
    """Each modeling file's auto_map table says what armada.ARCHITECTURES says."""
    for config_cls, models in ARCHITECTURES.items():
        expected = {auto.__name__: model.__name__ for auto, model in models.items()}
        for model in models.values():
            assert model._remote_code_auto_map == expected, (config_cls.__name__, model.__name__)


def test_save_pretrained_push_to_hub_refused(tmp_path):
    with pytest.raises(ValueError, match="push_to_hub"):
        tiny_model("agency_gpt2").save_pretrained(tmp_path, push_to_hub=True)


REMOTE_LOAD = INPUTS + """
import json, sys, torch, transformers
from transformers import AutoTokenizer
try:
    import armada
    sys.exit("armada is importable here")
except ImportError:
    pass
out = {}
for auto_class, repo_id in (arg.split("=") for arg in sys.argv[2:]):
    model = getattr(transformers, auto_class).from_pretrained(repo_id, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)  # transformers 5 loads the config
    with torch.no_grad():
        out[repo_id] = [type(model).__module__, model(**model_inputs(model, tokenizer, sys.argv[1])).logits.tolist()]
print(json.dumps(out))
"""


def test_remote_code_loads_without_armada(hub, checkpoints, tmp_path):
    """Pushed checkpoints load with trust_remote_code=True where armada is not installed: same logits."""
    env = cli_env(hub, tmp_path / "push-home")
    for model_type in ARCHS:
        run(ARMADA + ["push", checkpoints[model_type][0], f"tester/remote-{model_type}"], env, cwd=REPO)
    env = cli_env(hub, tmp_path / "bare-home")
    script = tmp_path / "remote_load.py"
    script.write_text(REMOTE_LOAD)
    repos = [f"{AUTO[m].__name__}=tester/remote-{m}" for m in ARCHS]
    proc = run([bare_python(), str(script), TEXT] + repos, env, cwd=tmp_path)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for model_type in ARCHS:
        module, values = out[f"tester/remote-{model_type}"]
        assert module.startswith("transformers_modules.") and module.endswith(f"modeling_{model_type}")
        torch.testing.assert_close(torch.tensor(values), checkpoints[model_type][1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("model_type", ARCHS)
def test_push_pull_round_trip(hub_env, checkpoints, model_type, tmp_path):
    folder, reference = checkpoints[model_type]
    repo_id = f"tester/round-trip-{model_type}"
    info = push(folder, repo_id)
    remote = hub_env.files(repo_id)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", f"modeling_{model_type}.py",
            f"configuration_{model_type}.py", ".gitattributes"} <= remote.keys()
    assert not [p for p in remote if p.endswith((".bin", ".pt", ".pth"))]
    assert hub_env.repos[repo_id].resolve("main").tree["model.safetensors"].lfs  # went through LFS
    assert info.oid == hub_env.head(repo_id)

    out = pull(repo_id, str(tmp_path / "pulled"))
    with pytest.raises(ValueError, match="overwrite"):
        pull(repo_id, out)
    assert pull(repo_id, out, overwrite=True) == out
    assert filecmp.cmp(os.path.join(out, "model.safetensors"), os.path.join(folder, "model.safetensors"), False)
    model = AUTO[model_type].from_pretrained(out).eval()  # armada installed: no trust_remote_code
    assert type(model).__module__.startswith("armada.")
    assert_same_logits(logits(model, AutoTokenizer.from_pretrained(out)), reference)

    cache = str(tmp_path / "transformers-cache")
    model = AUTO[model_type].from_pretrained(repo_id, cache_dir=cache).eval()
    assert_same_logits(logits(model, AutoTokenizer.from_pretrained(repo_id, cache_dir=cache)), reference)
    card = open(os.path.join(out, "README.md")).read()
    assert f'from_pretrained("{repo_id}", trust_remote_code=True)' in card


OFFLINE_LOAD = INPUTS + """
import json, sys, torch, transformers
import armada
from armada.hub import pull
from transformers import AutoTokenizer
out = {}
for auto_class, repo_id in (arg.split("=") for arg in sys.argv[2:]):
    folder = pull(repo_id, sys.argv[1] + "/" + repo_id.split("/")[1])   # from the cache, Hub unreachable
    model = getattr(transformers, auto_class).from_pretrained(repo_id).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo_id)
    with torch.no_grad():
        out[repo_id] = model(**model_inputs(model, tokenizer, %r)).logits.tolist()
print(json.dumps(out))
""" % TEXT


def test_cli_push_pull_then_offline_from_cache(hub, checkpoints, tmp_path):
    """`armada push` / `armada pull` with HF_ENDPOINT + HF_TOKEN; then HF_HUB_OFFLINE=1 reads the filled cache."""
    home = tmp_path / "hf-home"
    env = cli_env(hub, home)
    repos = [f"tester/cli-{m}" for m in ARCHS]
    for model_type, repo_id in zip(ARCHS, repos):
        proc = run(ARMADA + ["push", checkpoints[model_type][0], repo_id, "--private"], env, cwd=REPO)
        assert json.loads(proc.stdout)["commit"] == hub.head(repo_id)
        assert hub.repos[repo_id].private
        run(ARMADA + ["pull", repo_id, str(tmp_path / "pulled" / model_type)], env, cwd=REPO)
    proc = run(ARMADA + ["pull", repos[0], str(tmp_path / "pulled" / ARCHS[0])], env, cwd=REPO, check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr  # an existing output is refused
    # the cache holds the files; the Hub is now unreachable (offline, wrong endpoint, no token)
    env = cli_env(hub, home, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    del env["HF_TOKEN"]
    script = tmp_path / "offline_load.py"
    script.write_text(OFFLINE_LOAD)
    proc = run([sys.executable, str(script), str(tmp_path / "offline")]
               + [f"{AUTO[m].__name__}={r}" for m, r in zip(ARCHS, repos)], env, cwd=tmp_path)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for model_type, repo_id in zip(ARCHS, repos):
        assert_same_logits(torch.tensor(out[repo_id]), checkpoints[model_type][1])


def test_revisions_and_branches(hub_env, checkpoints, tmp_path):
    tokenizer = gpt2_tokenizer()
    repo_id = "tester/revisions"
    v1, v1_logits = checkpoints["agency_gpt2"]
    first = push(v1, repo_id).oid
    v2_model = tiny_model("agency_gpt2", seed=1)
    v2 = save_checkpoint(v2_model, tmp_path / "v2")
    push(v2, repo_id, revision="dev")
    assert hub_env.head(repo_id) == first  # main untouched by the branch push
    assert {b.name for b in HfApi().list_repo_refs(repo_id).branches} == {"main", "dev"}
    for revision, expected in (("main", v1_logits), ("dev", logits(v2_model, tokenizer)), (first, v1_logits)):
        out = pull(repo_id, str(tmp_path / f"rev-{revision}"), revision=revision)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(logits(model, tokenizer), expected, rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(repo_id, revision="dev", cache_dir=str(tmp_path / "c")).eval()
    torch.testing.assert_close(logits(model, tokenizer), logits(v2_model, tokenizer), rtol=0, atol=0)


def test_interrupted_push_leaves_previous_commit(hub, checkpoints, tmp_path):
    """`armada push` killed while its weights upload: the branch stays at the previous commit, files unchanged."""
    repo_id = "tester/interrupted"
    env = cli_env(hub, tmp_path / "home")
    run(ARMADA + ["push", checkpoints["agency_gpt2"][0], repo_id], env, cwd=REPO)
    before, files = hub.head(repo_id), hub.files(repo_id)
    v2 = save_checkpoint(tiny_model("agency_gpt2", seed=2), tmp_path / "v2")
    hub.interrupt_lfs_upload, hub.lfs_upload_started = threading.Event(), threading.Event()
    try:
        proc = subprocess.Popen(ARMADA + ["push", v2, repo_id], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        assert hub.lfs_upload_started.wait(timeout=120), "the push never started uploading"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        hub.interrupt_lfs_upload.set()
        hub.interrupt_lfs_upload = None
    assert hub.head(repo_id) == before and hub.files(repo_id) == files


# ------------------------------------------------------------------------------------------------- bad input
def test_private_push_without_token_refused(hub_env, checkpoints, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", "/nonexistent/token")
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", "/nonexistent/tokens")
    calls = len(hub_env.requests)
    with pytest.raises(ValueError, match="private push .* needs a token.*nothing was uploaded"):
        push(checkpoints["agency_gpt2"][0], "tester/secret", private=True)
    assert len(hub_env.requests) == calls and "tester/secret" not in hub_env.repos
    # and the server itself refuses to create a repo for a request without a token
    with pytest.raises(Exception, match="401"):
        HfApi(token=False).create_repo("tester/secret", private=True)
    assert "tester/secret" not in hub_env.repos


def test_private_repo_hidden_without_token(hub_env, checkpoints, tmp_path, monkeypatch):
    push(checkpoints["unified_armt"][0], "tester/hidden", private=True)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", "/nonexistent/token")
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", "/nonexistent/tokens")
    with pytest.raises(ValueError, match="not found .*private repo needs HF_TOKEN"):
        pull("tester/hidden", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("repo_id", ["bad//id", "a/b/c", "-lead/name", "name with spaces", "x" * 97])
def test_malformed_repo_id(hub_env, checkpoints, tmp_path, repo_id):
    calls = len(hub_env.requests)
    with pytest.raises(ValueError, match="malformed repo id"):
        push(checkpoints["agency_gpt2"][0], repo_id)
    with pytest.raises(ValueError, match="malformed repo id"):
        pull(repo_id, str(tmp_path / "out"))
    assert len(hub_env.requests) == calls


def test_unknown_revision_and_repo(hub_env, checkpoints, tmp_path):
    push(checkpoints["agency_gpt2"][0], "tester/known")
    with pytest.raises(ValueError, match="revision 'nope' does not exist.*branches: main"):
        pull("tester/known", str(tmp_path / "out"), revision="nope")
    with pytest.raises(ValueError, match="not found"):
        pull("tester/unknown", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_checkpoint_missing_weights_or_config(hub_env, checkpoints, tmp_path):
    folder = checkpoints["agency_gpt2"][0]
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(open(os.path.join(folder, "model.safetensors"), "rb").read())
    with pytest.raises(ValueError, match="no config.json"):
        push(str(no_config), "tester/broken")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no safetensors weights.*pickled weights"):
        push(str(pickled), "tester/broken")
    assert "tester/broken" not in hub_env.repos
    # a repo whose commit lacks the weights: pull refuses and writes nothing
    HfApi().create_repo("tester/weightless")
    HfApi().upload_file(path_or_fileobj=os.path.join(folder, "config.json"), path_in_repo="config.json",
                        repo_id="tester/weightless")
    with pytest.raises(ValueError, match="no safetensors weights"):
        pull("tester/weightless", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_checkpoint_from_newer_armada(hub_env, checkpoints, tmp_path):
    """A config.json with fields this armada does not know: a clear error that names them and the way out."""
    folder, reference = checkpoints["unified_armt"]
    newer = shutil.copytree(folder, tmp_path / "newer")
    config = json.load(open(newer / "config.json"))
    config.update(memory_decay=0.5, armada_version="9.0.0")
    (newer / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\['memory_decay'\].*saved by 9.0.0.*trust_remote_code=True"):
        check_config(config)
    with pytest.raises(ValueError, match="memory_decay"):
        push(str(newer), "tester/newer")
    HfApi().create_repo("tester/newer")
    HfApi().upload_folder(folder_path=str(newer), repo_id="tester/newer")  # as a newer armada would have pushed it
    with pytest.raises(ValueError, match="memory_decay"):
        pull("tester/newer", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------------------- cards
def test_card_from_benchmark_results(checkpoints, tmp_path):
    """UnifiedARMT's card takes BABILong accuracies per length from benchmarks/armt_babilong.py's JSON."""
    results = os.path.join(REPO, "benchmarks", "results", "armt_babilong.json")
    data = json.load(open(results))
    expected = [(r["task"], p["length"], p["accuracy"]) for r in data["results"] if r["model"] == "armt"
                for p in r["eval"] if p.get("accuracy") is not None]
    card = build_card(checkpoints["unified_armt"][0], results=[results], repo_id="tester/armt")
    got = [(r.task_name.split()[-1], int(r.metric_name.split()[2]), r.metric_value) for r in card.data.eval_results]
    assert got == expected and expected
    text = str(card)
    assert "model-index" in text and "BABILong" in text and "plots/armt_babilong.png" in text
    assert "Associative Recurrent Memory Transformer" in text and "trust_remote_code=True" in text


def test_card_from_demo_summary(checkpoints, tmp_path):
    summary = {"args": {"level": 0.5}, "best": "agency importance 50%",
               "data": {"train": "/x/tinyshakespeare/input.txt", "train_tokens": 1000, "held-out": 512},
               "training": {"steps": 10, "tokens": 5120, "seconds": 3.0, "final_loss_ema": 6.5},
               "results": {"agency importance 50%": {"heads_per_layer": [3, 2], "perplexity": {"held-out": 412.25}}}}
    path = tmp_path / "demo_summary.json"
    path.write_text(json.dumps(summary))
    measured = read_results([str(path)])
    assert [(r.metric_type, r.metric_value) for r in measured.eval_results] == [
        ("perplexity", 412.25), ("heads_kept", 5), ("pruning_level", 0.5)]
    card = build_card(checkpoints["agency_gpt2"][0], results=[str(path)], repo_id="tester/agency")
    assert "5,120 tokens" in str(card) and "heads kept per layer: [3, 2]" in str(card)


def test_card_template_field_missing(checkpoints, tmp_path):
    template = tmp_path / "template.md"
    template.write_text("---\n{{ card_data }}\n---\n# {{ model_name }}\n{{ training_budget_hours }}\n")
    with pytest.raises(ValueError, match=r"uses \['training_budget_hours'\], which the card builder does not fill"):
        build_card(checkpoints["agency_gpt2"][0], template=str(template))


def test_card_unknown_results_file(checkpoints, tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="not one armada knows; allowed: .*`benchmarks/pruning_comparison.py`'s "
                                         "pruning_comparison.json; .*`benchmarks/diffusion.py`'s diffusion.json"):
        build_card(checkpoints["agency_gpt2"][0], results=[str(path)])


RESULTS = os.path.join(REPO, "benchmarks", "results")


def metrics(card):
    """{metric name: value} of a card's EvalResults."""
    return {r.metric_name: r.metric_value for r in card.data.eval_results}


def test_card_from_armt_tasks(checkpoints):
    """UnifiedARMT's card: every memory run's accuracy, and with the memory reset, from armt_tasks.json; the
    full-attention controls (no memory) are not this model's. The model-index keeps each task apart."""
    path = os.path.join(RESULTS, "armt_tasks.json")
    runs = [r for r in json.load(open(path))["results"] if r["memory_init"] != "full_attention"]
    card = build_card(checkpoints["unified_armt"][0], results=[path], repo_id="tester/armt")
    got = metrics(card)
    assert runs and len(got) == 2 * len(runs)
    assert {f"accuracy ({r['name']})": r["accuracy"] for r in runs}.items() <= got.items()
    assert {f"accuracy, memory reset at every segment ({r['name']})": r["accuracy_memory_reset"]
            for r in runs}.items() <= got.items()
    reparsed = ModelCard(str(card)).data.eval_results
    assert len(reparsed) == len(got) and all(r.dataset_config in r.dataset_name for r in reparsed)
    assert "plots/armt_tasks.png" in str(card) and "CurriculumTrainer" in str(card)


def test_card_from_pruning_comparison(checkpoints):
    """AgencyGPT2's card: perplexity of every AgencyGPT2 row (strategy, level, recovery) of pruning_comparison.json;
    the GPT-2 rows are the reference, in the training lines."""
    path = os.path.join(RESULTS, "pruning_comparison.json")
    data = json.load(open(path))
    rows = [r for r in data["rows"] if r["variant"] in ("agency", "agency_distilled", "curriculum")]
    card = build_card(checkpoints["agency_gpt2"][0], results=[path])
    assert rows and [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("perplexity", round(r["perplexity"], 3)) for r in rows]
    distilled = next(r for r in rows if r["variant"] == "agency_distilled" and r["level"] == 0.5)
    assert (f"perplexity ({distilled['strategy']}, 50% of heads pruned, distillation recovery, heads per layer "
            f"{distilled['heads_per_layer']})") in metrics(card)
    text = str(card)
    assert "plots/pruning_perplexity.png" in text and f"{data['training']['tokens']:,} tokens" in text
    with pytest.raises(ValueError, match="describes agency_gpt2 checkpoints, not this unified_armt one"):
        build_card(checkpoints["unified_armt"][0], results=[path])


def test_card_from_onnx_speed(checkpoints, tmp_path):
    """ONNX Runtime fp32 / int8 vs PyTorch (generate, forward, file size) for the families of the checkpoint's
    architecture in onnx_speed.json; optimum's GPT-2 (the peer) is not one; no family of it: an error."""
    path = os.path.join(RESULTS, "onnx_speed", "onnx_speed.json")
    data = json.load(open(path))
    families = [f for f in data["results"] if data["exports"][f].get("model_type") == "agency_gpt2"]
    card = build_card(checkpoints["agency_gpt2"][0], results=[path])
    entries = [data["results"][f][kind] for f in families for kind in ("onnx", "int8")]
    expected = [round(v, 4) for e in entries for v in (e["generate"]["vs_pt"], e["forward"]["vs_pt"], e["size_vs_pt"])]
    assert families and [r.metric_value for r in card.data.eval_results] == expected
    assert all(r.metric_name.endswith(tuple(f"({f})" for f in families)) for r in card.data.eval_results)
    assert "plots/onnx_speed.png" in str(card)
    diffusion = build_card(checkpoints["thought_diffusion"][0], results=[path]).data.eval_results
    assert diffusion and all(r.metric_name.endswith("(diffusion)") for r in diffusion)
    only_agency = dict(data, results={f: data["results"][f] for f in ("gpt2", *families)})
    (tmp_path / "onnx_speed.json").write_text(json.dumps(only_agency))
    with pytest.raises(ValueError, match="no ONNX figures for thought_diffusion"):
        build_card(checkpoints["thought_diffusion"][0], results=[str(tmp_path / "onnx_speed.json")])


@pytest.fixture(scope="module")
def diffusion_report(tmp_path_factory):
    """benchmarks/diffusion.py in its quick mode, sampling at 4 and 16 steps (seconds)."""
    out = tmp_path_factory.mktemp("diffusion")
    run([sys.executable, os.path.join(REPO, "benchmarks", "diffusion.py"), "--quick", "--steps-list", "4,16",
         "--threads", "1", "--out", str(out)], dict(os.environ), cwd=REPO)
    return out / "diffusion.json"


def test_card_from_diffusion_benchmark(checkpoints, diffusion_report, tmp_path):
    """ThoughtDiffusion's card: ELBO perplexity bounds and, at 16 steps with the block cache, sampling speed and
    sample quality, from a real (quick) diffusion.json; the card says it is a quick run."""
    data = json.load(open(diffusion_report))
    card = build_card(checkpoints["thought_diffusion"][0], results=[str(diffusion_report)], repo_id="tester/td")
    q, s16 = data["quality"], data["sampling"]["td_16_cache"]
    assert [(r.task_name, r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("Language modelling", "perplexity", round(q["thought_diffusion"]["perplexity"], 3)),
        ("Language modelling", "perplexity", round(q["thought_diffusion_with_thought"]["perplexity"], 3)),
        ("Sampling", "tokens_per_second", round(s16["tokens_per_s"], 4)),
        ("Sampling", "speedup", round(s16["speed_ratio_vs_gpt2"], 4)),
        ("Sampling", "perplexity", round(s16["sample_perplexity_under_gpt2"], 4)),
        ("Sampling", "distinct_2", round(s16["distinct_2"], 4))]
    text = str(card)
    assert "Quick mode (`benchmarks/diffusion.py --quick`)" in text and "plots/diffusion.png" in text
    assert f"perplexity {q['gpt2']['perplexity']:.3f}" in text  # the same-size GPT-2 of the same run
    assert "pipeline_tag: fill-mask" in text and "Block Diffusion" in text and "AutoModelForMaskedLM" in text
    # a run without 16 steps + cache: the perplexity bounds only, and the card says why
    del data["sampling"]["td_16_cache"]
    partial = tmp_path / "diffusion.json"
    partial.write_text(json.dumps(data))
    card = build_card(checkpoints["thought_diffusion"][0], results=[str(partial)])
    assert [r.task_name for r in card.data.eval_results] == ["Language modelling"] * 2
    assert "no sampling figures" in str(card)
    with pytest.raises(ValueError, match="describes thought_diffusion checkpoints, not this agency_gpt2 one"):
        build_card(checkpoints["agency_gpt2"][0], results=[str(diffusion_report)])


@pytest.mark.parametrize("model_type", ARCHS)
def test_card_snippets_run(checkpoints, model_type, tmp_path):
    """The card's Python snippets (load with armada, load with the checkpoint's own code, ThoughtDiffusion's
    sampling) run against the checkpoint, in order, in one namespace: here all but the own-code one; where armada is
    not installed all but the armada one (with armada imported, transformers 5's Auto classes load armada's classes
    even with trust_remote_code=True)."""
    folder = checkpoints[model_type][0]
    snippets = re.findall(r"```python\n(.*?)```", str(build_card(folder, repo_id=folder)), flags=re.S)
    assert len(snippets) == (3 if model_type == "thought_diffusion" else 2)
    own_code = [s for s in snippets if "trust_remote_code=True" in s]
    with_armada = [s for s in snippets if s not in own_code]
    assert len(own_code) == 1 and "import armada" in with_armada[0]
    namespace = {}
    for snippet in with_armada:
        exec(compile(snippet, f"{model_type} card snippet", "exec"), namespace)
    assert type(namespace["model"]).__module__.startswith("armada.")
    script = tmp_path / "card_snippets.py"
    script.write_text("\n".join(own_code + with_armada[1:]) + "print(type(model).__module__)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = run([bare_python(), str(script)], {**env, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"},
               cwd=tmp_path)
    assert proc.stdout.strip().splitlines()[-1].startswith("transformers_modules.")


def test_cli_card(checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints["unified_armt"][0], tmp_path / "model")
    results = os.path.join(REPO, "benchmarks", "results", "armt_babilong.json")
    from armada.cli import main

    main(["card", str(folder), "--results", results, "--repo-id", "tester/armt"])
    assert "BABILong" in (folder / "README.md").read_text()
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["card", str(folder)])
    main(["card", str(folder), "--overwrite"])
    assert "No measured results" in (folder / "README.md").read_text()


# ------------------------------------------------------------------------------------------------- PEFT
def test_peft_adapter_push_pull(hub_env, checkpoints, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    folder, _ = checkpoints["agency_gpt2"]
    push(folder, "tester/base")
    base = AutoModelForCausalLM.from_pretrained("tester/base", cache_dir=str(tmp_path / "c1"))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 init_lora_weights=False))
    peft_model.eval()
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    assert json.load(open(adapter_dir / "adapter_config.json"))["base_model_name_or_path"] == "tester/base"
    tokenizer = gpt2_tokenizer()
    reference = logits(peft_model, tokenizer)
    push(str(adapter_dir), "tester/adapter")
    remote = hub_env.files("tester/adapter")
    assert "adapter_model.safetensors" in remote
    assert "base_model: tester/base" in remote["README.md"].decode()

    out = pull("tester/adapter", str(tmp_path / "pulled"))
    fresh_base = AutoModelForCausalLM.from_pretrained("tester/base", cache_dir=str(tmp_path / "c2"))
    loaded = PeftModel.from_pretrained(fresh_base, out).eval()
    torch.testing.assert_close(logits(loaded, tokenizer), reference, rtol=0, atol=0)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), "tester/adapter").eval()
    torch.testing.assert_close(logits(loaded, tokenizer), reference, rtol=0, atol=0)



def test_readme_hub_snippet(tmp_path, monkeypatch):
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    snippet = readme.split("<!-- readme-test: hub -->\n```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md (hub snippet)", "exec"), {"__name__": "readme"})
    assert os.path.isfile(tmp_path / "outputs" / "armt_tiny" / "modeling_unified_armt.py")


def test_model_push_to_hub_carries_remote_code(hub_env, checkpoints, tmp_path):
    """transformers' own `model.push_to_hub` goes through the same save_pretrained: code and auto_map included."""
    model, tokenizer = tiny_model("unified_armt"), gpt2_tokenizer()
    model.push_to_hub("tester/direct")
    tokenizer.push_to_hub("tester/direct")
    remote = hub_env.files("tester/direct")
    assert {"modeling_unified_armt.py", "configuration_unified_armt.py", "tokenizer.json"} <= remote.keys()
    assert "from .configuration_unified_armt import" in remote["modeling_unified_armt.py"].decode()
    assert json.loads(remote["config.json"])["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_unified_armt.UnifiedARMTForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained("tester/direct", cache_dir=str(tmp_path / "c")).eval()
    torch.testing.assert_close(logits(loaded, tokenizer), logits(model, tokenizer), rtol=0, atol=0)


def test_push_adds_remote_code_to_older_folder(hub_env, checkpoints, tmp_path):
    """A folder saved before checkpoints carried their code: push saves it again, with code and auto_map."""
    folder, reference = checkpoints["agency_gpt2"]
    old = shutil.copytree(folder, tmp_path / "old", ignore=shutil.ignore_patterns("*.py"))
    config = json.load(open(old / "config.json"))
    del config["auto_map"]
    (old / "config.json").write_text(json.dumps(config))
    push(str(old), "tester/old")
    remote = hub_env.files("tester/old")
    assert "modeling_agency_gpt2.py" in remote and "auto_map" in json.loads(remote["config.json"])
    out = pull("tester/old", str(tmp_path / "out"))
    # the pushed code itself: with armada imported, transformers 5's Auto classes pick armada's registered classes
    # even with trust_remote_code=True
    auto_map = json.load(open(os.path.join(out, "config.json")))["auto_map"]
    model = get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], out).from_pretrained(out).eval()
    assert type(model).__module__.startswith("transformers_modules.")
    torch.testing.assert_close(logits(model, gpt2_tokenizer()), reference, rtol=0, atol=0)
