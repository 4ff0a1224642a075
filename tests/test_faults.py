"""Faults a user meets: killed runs, outputs that must not be deleted, broken checkpoints, wrong inputs.

Training and pruning are killed with SIGKILL from inside the process (a callback / a save that kills its own
process right after a checkpoint or a partial save), so the point of death is deterministic."""

import ast
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import armada  # noqa: F401
from armada import AgencyGPT2ForCausalLM, UnifiedARMTConfig, UnifiedARMTForCausalLM
from armada.cli import main as cli
from armada.compat import TRANSFORMERS_V5
from armada.io_utils import MARKER, UnsafeOutputError, atomic_directory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "train_agency.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(REPO, "examples")}
TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--n_positions", "64", "--block_size", "32",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0",
        "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", "--max_eval_blocks", "4"]

# Runs examples/train_agency.py, adding a callback that SIGKILLs the process once checkpoint-KILL_AT is saved.
KILLED_TRAINING = textwrap.dedent("""
    import os, signal, sys
    import transformers
    from transformers import TrainerCallback
    import train_agency

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)

    init = transformers.Trainer.__init__
    def init_with_kill(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(KillAfterSave())
    transformers.Trainer.__init__ = init_with_kill
    train_agency.main(sys.argv[1:])
""")

# Runs `armada prune`, SIGKILLing the process right after the model's weights are written into the temp folder.
KILLED_PRUNE = textwrap.dedent("""
    import os, signal, sys
    from armada import AgencyGPT2ForCausalLM
    from armada.cli import main

    save = AgencyGPT2ForCausalLM.save_pretrained
    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    AgencyGPT2ForCausalLM.save_pretrained = save_then_die
    main(sys.argv[1:])
""")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 60)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2") / "model"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=4, n_positions=64)).save_pretrained(path)
    return str(path)


def _train(out, text_file, *extra, kill_at=None):
    """Start examples/train_agency.py (killed with SIGKILL once checkpoint-KILL_AT is saved, if given)."""
    out.mkdir(exist_ok=True)
    code = ["-c", KILLED_TRAINING] if kill_at else [SCRIPT]
    env = {**ENV, "KILL_AT": str(kill_at)} if kill_at else ENV
    return subprocess.Popen([sys.executable, *code, "--output_dir", str(out), "--train_file", text_file, *TINY, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(out))


def _finish(process):
    """(returncode, the training losses Trainer printed, stderr)."""
    stdout, stderr = process.communicate(timeout=600)
    losses = [line for line in stdout.splitlines() if line.startswith("{'loss'")]
    return process.returncode, [ast.literal_eval(line)["loss"] for line in losses], stderr


@pytest.mark.parametrize("extra", [[], ["--curriculum_levels", "0,0.25,0.5", "--steps_per_stage", "2"]],
                         ids=["plain", "pruning_curriculum"])
def test_training_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, text_file, extra):
    full, killed = _train(tmp_path / "full", text_file, *extra), _train(tmp_path / "killed", text_file, *extra,
                                                                         kill_at=3)
    (rc_full, losses_full, err), (rc_killed, losses_killed, err_killed) = _finish(full), _finish(killed)
    assert rc_full == 0, err[-3000:]
    assert rc_killed == -signal.SIGKILL, err_killed[-3000:]
    assert sorted(os.listdir(tmp_path / "killed")) == ["checkpoint-3"]  # killed after it, before anything else
    rc, losses_resumed, err = _finish(_train(tmp_path / "killed", text_file, *extra, "--resume_from_checkpoint",
                                             "last"))
    assert rc == 0, err[-3000:]
    assert len(losses_full) == 6 and len(losses_killed) == 3 and len(losses_resumed) == 3  # it resumed at step 3
    assert losses_killed + losses_resumed == losses_full  # the same loss at every step
    a, b = (json.load(open(tmp_path / d / "summary_rank0.json")) for d in ("full", "killed"))
    assert b["global_step"] == a["global_step"] == 6
    assert b["weights_sha256"] == a["weights_sha256"]
    assert b["metrics"]["heads_per_layer"] == a["metrics"]["heads_per_layer"]
    if extra:
        assert sum(a["metrics"]["heads_per_layer"]) == 4  # the curriculum's last stage (50%) was restored and run


def test_resume_arguments_are_checked_first(tmp_path, text_file):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    from train_agency import curriculum_budget_note, main

    with pytest.raises(ValueError, match="holds no checkpoint-N folder"):
        main(["--output_dir", str(tmp_path / "new"), "--train_file", text_file, *TINY, "--resume_from_checkpoint",
              "True"])
    saved = tmp_path / "saved_model"
    saved.mkdir()
    (saved / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no trainer_state.json, so it is not a Trainer checkpoint"):
        main(["--output_dir", str(tmp_path / "new"), "--train_file", text_file, *TINY, "--resume_from_checkpoint",
              str(saved)])
    with pytest.raises(ValueError, match="no such folder"):
        main(["--output_dir", str(tmp_path / "new"), "--train_file", text_file, *TINY, "--resume_from_checkpoint",
              str(tmp_path / "missing")])
    assert not (tmp_path / "new").exists()
    assert "ends training after 6 steps, not --max_steps 8" in curriculum_budget_note(3, 2, 8)
    assert "--steps_per_stage 3" in curriculum_budget_note(3, 2, 8)
    assert "stops training in stage 2 of 3" in curriculum_budget_note(3, 2, 3)
    assert curriculum_budget_note(3, 2, 6) is None and curriculum_budget_note(3, 2, -1) is None


def test_a_curriculum_budget_that_does_not_match_max_steps_is_reported(tmp_path, text_file):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    from train_agency import main

    args = [a for a in TINY if a not in ("--save_steps", "3")]
    summary = main(["--output_dir", str(tmp_path), "--train_file", text_file, *args, "--save_strategy", "no",
                    "--curriculum_levels", "0,0.25", "--steps_per_stage", "2", "--max_steps", "3"])
    assert summary["global_step"] == 3
    assert summary["notes"] == ["--max_steps 3 stops training in stage 2 of 2 (2 stages x 2 steps = 4); the later "
                                "stages never run."]


# ------------------------------------------------------------------------------------------------ output folders


def _write(folder, files):
    os.makedirs(folder, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def _save(path, text, **kwargs):
    with atomic_directory(str(path), **kwargs) as tmp:
        _write(tmp, {"config.json": text})


def test_existing_output_is_refused_without_overwrite(tmp_path):
    _save(tmp_path / "out", "first")
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER, "config.json"]
    with pytest.raises(UnsafeOutputError, match="exists and is not empty; pass --overwrite"):
        _save(tmp_path / "out", "second")
    assert (tmp_path / "out" / "config.json").read_text() == "first"
    _save(tmp_path / "out", "second", overwrite=True)
    assert (tmp_path / "out" / "config.json").read_text() == "second"
    (tmp_path / "empty").mkdir()
    _save(tmp_path / "empty", "into an empty folder")  # an empty folder is no data to lose
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsafeOutputError, match="is not a folder"):
        _save(tmp_path / "file", "y", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "out"]


def test_overwrite_never_deletes_cwd_parents_of_inputs_or_foreign_folders(tmp_path, monkeypatch):
    project = tmp_path / "project"
    _write(project / "model", {"config.json": "{}", "model.safetensors": "w"})
    _write(project, {"notes.txt": "mine"})
    monkeypatch.chdir(project)
    for target, why in ((".", "current directory"), (str(tmp_path), "current directory")):
        with pytest.raises(UnsafeOutputError, match=why):
            _save(target, "x", overwrite=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeOutputError, match="contains the input"):
        _save(project, "x", overwrite=True, inputs=[project / "model"])
    with pytest.raises(UnsafeOutputError, match="does not look like armada's output"):
        _save(project, "x", overwrite=True)
    assert (project / "notes.txt").read_text() == "mine" and os.listdir(project / "model")
    # a folder holding only what a checkpoint save writes may be replaced (e.g. the input model, in place)
    _save(project / "model", "new", overwrite=True, inputs=[project / "model"])
    assert (project / "model" / "config.json").read_text() == "new"
    assert sorted(os.listdir(project)) == ["model", "notes.txt"]


def test_in_place_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    model = tmp_path / "model"
    _write(model, {"config.json": "old", "model.safetensors": "old weights"})
    with pytest.raises(RuntimeError):
        with atomic_directory(str(model), overwrite=True, inputs=[model]) as tmp:
            _write(tmp, {"config.json": "half"})
            assert (model / "model.safetensors").read_text() == "old weights"  # still readable while writing
            raise RuntimeError("interrupted")
    assert (model / "config.json").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["model"]
    with atomic_directory(str(model), overwrite=True, inputs=[model]) as tmp:
        _write(tmp, {"config.json": "new"})
        assert (model / "model.safetensors").read_text() == "old weights"
    assert sorted(os.listdir(model)) == [MARKER, "config.json"] and sorted(os.listdir(tmp_path)) == ["model"]


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_a_killed_run_are_cleaned_by_the_next_run(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    _write(tmp_path / f".out.armada-tmp-{dead}-abcd", {"config.json": "half-written"})
    _write(tmp_path / f".out.armada-tmp-{alive}-abcd", {"config.json": "a run still going"})
    # killed between moving the old folder aside and the new one into place: the old one is put back, then replaced
    _write(tmp_path / f".out.armada-old-{dead}-abcd", {"config.json": "old", MARKER: ""})
    with pytest.raises(UnsafeOutputError, match="exists and is not empty"):
        _save(tmp_path / "out", "new")
    assert (tmp_path / "out" / "config.json").read_text() == "old"
    _save(tmp_path / "out", "new", overwrite=True)
    assert (tmp_path / "out" / "config.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == [f".out.armada-tmp-{alive}-abcd", "out"]


def test_prune_killed_while_saving_leaves_the_old_output_and_the_next_run_is_clean(gpt2_dir, tmp_path):
    out = tmp_path / "pruned"
    args = ["prune", "--model", gpt2_dir, "--level", "0.25", "--strategy", "magnitude", "--output", str(out)]
    cli(args)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    killed = subprocess.run([sys.executable, "-c", KILLED_PRUNE, *args[:4], "0.5", *args[5:], "--overwrite"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before, "the old output was touched"
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".pruned.armada-tmp-")]
    assert len(leftovers) == 1 and "model.safetensors" in os.listdir(tmp_path / leftovers[0])
    cli([*args[:4], "0.5", *args[5:], "--overwrite"])
    assert sorted(os.listdir(tmp_path)) == ["pruned"]
    assert sum(AgencyGPT2ForCausalLM.from_pretrained(out).num_heads_per_layer()) == 4


def test_cli_refuses_unsafe_outputs_before_pruning(gpt2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    prune = ["prune", "--model", gpt2_dir, "--level", "0.25", "--strategy", "magnitude", "--overwrite", "--output"]
    with pytest.raises(SystemExit, match="it is or contains the current directory"):
        cli([*prune, "."])
    with pytest.raises(SystemExit, match="contains the input"):
        cli([*prune, os.path.dirname(gpt2_dir)])
    with pytest.raises(SystemExit, match="exists and is not empty; pass --overwrite"):
        cli([*prune[:-2], "--output", gpt2_dir])
    assert (tmp_path / "notes.txt").read_text() == "mine" and os.listdir(gpt2_dir)
    copy = tmp_path / "copy"
    cli([*prune[:-2], "--output", str(copy)])
    cli([*prune, str(copy), "--model", str(copy), "--level", "0.5"])  # in place, over the input folder
    assert sum(AgencyGPT2ForCausalLM.from_pretrained(copy).num_heads_per_layer()) == 4
    assert sorted(os.listdir(tmp_path)) == ["copy", "notes.txt"]


# -------------------------------------------------------------------------------------- broken checkpoints, configs


@pytest.fixture()
def agency_dir(tmp_path):
    torch.manual_seed(0)
    model = AgencyGPT2ForCausalLM.from_gpt2(GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4,
                                                                       n_positions=32)))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_broken_weights_are_named(agency_dir, damage, capsys):
    weights = agency_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(OSError, match=r"model\.safetensors looks truncated or corrupt"):
        AgencyGPT2ForCausalLM.from_pretrained(agency_dir)
    with pytest.raises(SystemExit) as error:
        cli(["report", "--model", str(agency_dir)])
    message = str(error.value.code)
    assert message.startswith(f"error: {weights} looks truncated or corrupt") and "\n" not in message
    assert "Save the model again, or download it again" in message


def test_cli_errors_are_one_line_with_a_nonzero_exit(agency_dir, tmp_path):
    (agency_dir / "config.json").unlink()
    run = subprocess.run([sys.executable, "-m", "armada.cli", "report", "--model", str(agency_dir)],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [f"error: {agency_dir} has no config.json, so it is not a saved model "
                                               "folder (a model saved with save_pretrained(DIR) has one)."]
    for name, expected in ((str(tmp_path / "missing"), "model folder .* does not exist"),
                           ("./typo", "model folder './typo' does not exist"),
                           ("no-such-armada-model", "no folder 'no-such-armada-model' here, and .*Hub")):
        with pytest.raises(SystemExit, match=expected):
            cli(["report", "--model", name])
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        cli(["report", "--model", str(tmp_path / "a_file")])
    bad_json = tmp_path / "bad"
    _write(bad_json, {"config.json": "{not json"})
    with pytest.raises(SystemExit) as error:
        cli(["report", "--model", str(bad_json)])
    assert str(error.value.code).startswith("error: ") and "\n" not in str(error.value.code)


@pytest.mark.parametrize("field", ["_attn_implementation_internal", "attn_implementation"])
def test_a_config_naming_a_hub_kernel_is_refused_on_every_load_path(agency_dir, tmp_path, field):
    """CVE-2026-4372: an attention implementation named in config.json can make transformers load a Hub kernel's
    code. Every armada config refuses any value but eager/sdpa, so AutoConfig, from_pretrained by path (armada
    installed or the checkpoint's own code) and the CLI stop before a model is built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from armada import ThoughtDiffusionConfig

    config = json.loads((agency_dir / "config.json").read_text())
    (agency_dir / "config.json").write_text(json.dumps({**config, field: "kernels-community/flash-attn"}))
    if field == "attn_implementation" and not TRANSFORMERS_V5:  # 4.57 drops this key before any config sees it
        model = AgencyGPT2ForCausalLM.from_pretrained(agency_dir)
        assert model.config._attn_implementation == "sdpa"
        return
    for load in (AutoConfig, AutoModelForCausalLM, AgencyGPT2ForCausalLM):
        with pytest.raises(ValueError, match=f"config field {field}='kernels-community/flash-attn' is refused"):
            load.from_pretrained(agency_dir)
    with pytest.raises(SystemExit, match="is refused .*allowed: 'eager', 'sdpa' or none"):
        cli(["report", "--model", str(agency_dir)])
    for config_class in (UnifiedARMTConfig, ThoughtDiffusionConfig):
        with pytest.raises(ValueError, match="is refused"):
            config_class(**{field: "kernels-community/flash-attn"})
    assert UnifiedARMTConfig(**{field: "sdpa"}) is not None  # what transformers itself may pass


def test_cli_never_runs_a_checkpoints_own_code(tmp_path):
    """A folder whose auto_map names code for an unknown model type: transformers asks `[y/N]` on stdin unless
    trust_remote_code is given. The CLI passes trust_remote_code=False, so even `echo y |` runs none of it."""
    canary = tmp_path / "ran"
    _write(tmp_path / "evil", {
        "config.json": json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}),
        "configuration_evil.py": f"open({str(canary)!r}, 'w').write('ran')\n"
                                 "from transformers import PretrainedConfig\n"
                                 "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"})
    run = subprocess.run([sys.executable, "-m", "armada.cli", "report", "--model", str(tmp_path / "evil")],
                         input="y\n", capture_output=True, text=True, timeout=300, env=ENV)
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "trust_remote_code" in run.stderr and not canary.exists()


def _warnings(fn):
    logger = hf_logging.get_logger("armada.configuration")
    hf_logging.set_verbosity(logging.WARNING)
    with CaptureLogger(logger) as captured:
        fn()
    return captured.out


def test_unknown_config_keys_warn_by_name(agency_dir, tmp_path):
    from transformers import AutoConfig

    assert _warnings(lambda: AutoConfig.from_pretrained(agency_dir)) == ""  # what save_pretrained wrote: silent
    config = json.loads((agency_dir / "config.json").read_text())
    config.update(n_layers=3, controler_lr=0.5, torch_dtype="float32", id2label={"0": "a"})  # two typos, two HF keys
    (agency_dir / "config.json").write_text(json.dumps(config))
    out = _warnings(lambda: AutoConfig.from_pretrained(agency_dir))
    assert "AgencyGPT2Config: unknown keys ['controler_lr', 'n_layers']" in out
    armt = UnifiedARMTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, d_mem=8)
    armt.save_pretrained(tmp_path / "armt")
    assert _warnings(lambda: AutoConfig.from_pretrained(tmp_path / "armt")) == ""
    assert "UnifiedARMTConfig: unknown keys ['segmnet_size']" in _warnings(lambda: UnifiedARMTConfig(segmnet_size=4))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_ctx=32, n_positions=32))
    assert _warnings(lambda: AgencyGPT2ForCausalLM.from_gpt2(gpt2)) == ""  # GPT-2's own fields are not unknown


# ------------------------------------------------------------------------------------------------ model inputs


def _models():
    torch.manual_seed(0)
    agency = AgencyGPT2ForCausalLM.from_gpt2(GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4,
                                                                        n_positions=32)))
    armt = UnifiedARMTForCausalLM(UnifiedARMTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, segment_size=8, num_memory_tokens=2,
                                                    d_mem=8))
    return {"agency": agency.eval(), "armt": armt.eval()}


@pytest.mark.parametrize("name", ["agency", "armt"])
def test_model_inputs_are_checked(name):
    model = _models()[name]
    ids = torch.randint(0, 50, (2, 10))
    for length in (7, 12):
        with pytest.raises(ValueError, match=rf"attention_mask has shape \(2, {length}\); it must be .*\(2, 10\)"):
            model(ids, attention_mask=torch.ones(2, length, dtype=torch.long))
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="(?i)the input has no tokens"):
        model(empty)
    with pytest.raises(ValueError, match="(?i)the input has no tokens"):
        model.generate(empty, max_new_tokens=2, pad_token_id=0)
    zeros = torch.zeros(2, 10, dtype=torch.long)
    out = model(ids, attention_mask=zeros, labels=ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
    out.loss.backward()  # still a graph: Trainer can step on such a batch
    # a valid mask with padding still gives the mean over the real targets
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    assert torch.isfinite(model(ids, attention_mask=mask, labels=ids).loss)


def test_cached_generation_with_a_full_mask_still_works():
    for model in _models().values():
        ids = torch.randint(0, 50, (2, 5))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
        assert out.shape == (2, 9)


# ------------------------------------------------------------------------------------- what already held, kept held


def test_save_pretrained_writes_only_safetensors(tmp_path):
    for name, model in _models().items():
        model.save_pretrained(tmp_path / name)
        files = set(os.listdir(tmp_path / name))
        assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]


MEMORY_PROBE = textwrap.dedent("""
    import json, torch
    from armada import UnifiedARMTConfig, UnifiedARMTForCausalLM
    from armada.evaluation import peak_memory

    torch.manual_seed(0)
    model = UnifiedARMTForCausalLM(UnifiedARMTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, segment_size=1024, num_memory_tokens=8,
                                                     d_mem=16)).eval()
    peaks = {}
    for length in (2048, 2048, 32768):  # the first run warms the allocator up
        ids = torch.randint(0, 64, (1, length))
        with torch.inference_mode(), peak_memory() as mem:
            model(ids, logits_to_keep=1)
        peaks[length] = mem["peak_delta_bytes"]
    print(json.dumps(peaks))
""")


def test_unified_armt_memory_stays_flat_to_32k_tokens():
    """Peak resident memory of a forward over 32K tokens above that over 2K: what grows with the input is only the
    returned hidden states (32K x 32 floats = 4 MiB, plus their concatenation), not the segments' activations."""
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    peaks = {int(k): v for k, v in json.loads(run.stdout.splitlines()[-1]).items()}
    assert peaks[32768] - peaks[2048] < 24 * 2**20, peaks
