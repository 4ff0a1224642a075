"""FSDP full shard (examples/accelerate/fsdp_full_shard.yaml, FSDP v2) on 2 CPU processes trains AgencyGPT2,
UnifiedARMT and ThoughtDiffusion to the weights one process reaches on the same global batch, and the gathered
checkpoint loads with `from_pretrained`. The DeepSpeed ZeRO-2 config is only parsed (deepspeed is not installed).

accelerate 1.16 turns FSDP on for accelerator devices only: CPU processes launched with an FSDP config silently
train with DDP. The launches here therefore go through tests/fsdp_cpu_shim.py, which makes accelerate's own FSDP
assignment on CPU and prints how each rank holds its parameters (checked: DTensor shards on both ranks).

Tolerance: every weight within 1e-5 of the one-process run. The two runs differ only in the order of fp32 sums
(the gradient of B rows in one pass vs two B/2 halves averaged by reduce-scatter); observed at most ~1e-6 after 3
SGD steps, while the steps move the weights by 1e-3 to 2e-2 (asserted), so a wrong batch, a gradient off by a
factor or a skipped parameter would exceed it by orders of magnitude. SGD rather than AdamW: Adam's g / sqrt(v)
amplifies last-bit differences of near-zero gradients to lr-sized steps (and hides a uniform gradient scale).
"""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
sys.path.insert(0, os.path.join(REPO, "tests"))
FSDP_CONFIG = "examples/accelerate/fsdp_full_shard.yaml"
ZERO2_CONFIG = "examples/accelerate/deepspeed_zero2.yaml"
SHIM = os.path.join(REPO, "tests", "fsdp_cpu_shim.py")
ATOL = 1e-5
STEPS = 3
COMMON = ["--max_steps", str(STEPS), "--use_cpu", "--block_size", "32", "--report_to", "none", "--save_strategy", "no",
          "--dataloader_num_workers", "0", "--optim", "sgd", "--learning_rate", "0.1", "--seed", "0"]
EXTRA = {"agency": ["--max_eval_blocks", "4"],
         "diffusion": ["--max_eval_blocks", "4", "--train_time", "1.0", "--sample_tokens", "8", "--sample_steps", "2"],
         "armt": []}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 120)
    return str(path)


def save_tiny_model(arch, path):
    """A tiny dropout-free model of `arch`, saved (both runs start from it); returns its class."""
    from train_diffusion import diffusion_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from armada import (
        AgencyGPT2ForCausalLM,
        ThoughtDiffusionConfig,
        ThoughtDiffusionForMaskedLM,
        UnifiedARMTConfig,
        UnifiedARMTForCausalLM,
    )

    torch.manual_seed(0)
    nodrop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "agency":
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **nodrop))
        model = AgencyGPT2ForCausalLM.from_gpt2(gpt2)
    elif arch == "armt":  # 32-token blocks = 4 segments of 8, each with 2 memory tokens
        model = UnifiedARMTForCausalLM(UnifiedARMTConfig(
            vocab_size=50257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, segment_size=8,
            num_memory_tokens=2, d_mem=8, **nodrop))
    else:  # thought_train_prob=1 and t=1 (--train_time) make the objective deterministic; the diversity term
        # pairs rows across the whole batch, so it cannot split over ranks: weight 0
        tokenizer = diffusion_tokenizer(64)
        model = ThoughtDiffusionForMaskedLM(ThoughtDiffusionConfig(
            vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, thought_dims=[4, 2], thought_stack_size=3,
            block_length=8, thought_train_prob=1.0, thought_diversity_weight=0.0, thought_loss_weight=0.1,
            pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id, **nodrop))
    model.save_pretrained(path)
    return type(model)


def script_of(arch):
    return {"agency": "examples/train_agency.py", "diffusion": "examples/train_diffusion.py",
            "armt": "tests/train_unified_armt.py"}[arch]


def fsdp_command(arch):
    """The FSDP `accelerate launch` line of the example's docstring (UnifiedARMT has no example: the same line for
    tests/train_unified_armt.py), as a list of arguments."""
    script = script_of(arch)
    if arch == "armt":
        return ["accelerate", "launch", "--config_file", FSDP_CONFIG, script, "--output_dir", "runs/fsdp",
                "--max_steps", "200"]
    with open(os.path.join(REPO, script), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())).replace("\\\n", " ")
    return next(line.split() for line in doc.splitlines() if FSDP_CONFIG in line)


def launch_fsdp(arch, output_dir, extra):
    """Runs the documented FSDP launch on 2 CPU processes, through the shim, with this run's folder and arguments."""
    cmd = fsdp_command(arch)
    cmd[0] = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd[cmd.index("--config_file") + 1] = os.path.join(REPO, FSDP_CONFIG)
    script = cmd.index(script_of(arch))
    cmd[script:script + 1] = [SHIM, os.path.join(REPO, script_of(arch))]
    cmd[cmd.index("--output_dir") + 1] = str(output_dir)
    cmd[cmd.index("--max_steps") + 1] = str(STEPS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(output_dir.parent))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def run_one_process(arch, argv):
    if arch == "agency":
        from train_agency import main
    elif arch == "diffusion":
        from train_diffusion import main
    else:
        from train_unified_armt import main
    main(argv)


@pytest.mark.parametrize("arch", ["agency", "armt", "diffusion"])
def test_fsdp_on_two_processes_reaches_the_weights_of_one(arch, tmp_path, text_file):
    cls = save_tiny_model(arch, tmp_path / "init")
    args = ["--model_name_or_path", str(tmp_path / "init"), "--train_file", text_file, *COMMON, *EXTRA[arch]]
    run_one_process(arch, ["--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4", *args])
    (tmp_path / "fsdp").mkdir()
    log = launch_fsdp(arch, tmp_path / "fsdp", ["--per_device_train_batch_size", "2", *args])

    sharded = re.findall(r"fsdp_cpu_shim: rank (\d): (\S+) \S+ (\S+)", log)  # the shim's report of each rank
    assert {rank for rank, _, _ in sharded} == {"0", "1"}, log
    assert all(kind == "DistributedType.FSDP" and param == "DTensor" for _, kind, param in sharded), log
    ranks = [json.load(open(tmp_path / "fsdp" / f"summary_rank{r}.json")) for r in (0, 1)]
    assert [(r["world_size"], r["global_step"]) for r in ranks] == [(2, STEPS), (2, STEPS)]
    if "weights_sha256" in ranks[0]:  # the examples digest the gathered weights on every rank
        assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]

    init = cls.from_pretrained(tmp_path / "init").state_dict()
    one = cls.from_pretrained(tmp_path / "one" / "final").state_dict()
    fsdp = cls.from_pretrained(tmp_path / "fsdp" / "final").state_dict()  # the full state dict FSDP gathered
    assert one.keys() == fsdp.keys()
    moved = max((one[k] - init[k]).abs().max().item() for k in one if one[k].is_floating_point())
    worst, name = max(((one[k] - fsdp[k]).abs().max().item(), k) for k in one if one[k].is_floating_point())
    assert moved > 100 * ATOL, f"training barely moved the weights ({moved:.2e})"
    assert worst <= ATOL, f"{name} differs by {worst:.2e} between 2 FSDP processes and one process"
    for k in one:
        if not one[k].is_floating_point():
            assert torch.equal(one[k], fsdp[k]), k
    print(f"{arch}: max |FSDP - one process| = {worst:.2e} ({name}); weights moved up to {moved:.2e}")


def launcher_environment(config):
    """What `accelerate launch --config_file config` would put in its processes' environment (no launch)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", os.path.join(REPO, config), "script.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its deepspeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_fsdp_config_is_a_full_shard_with_a_full_state_dict():
    env = launcher_environment(FSDP_CONFIG)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


def test_deepspeed_zero2_config_parses():
    env = launcher_environment(ZERO2_CONFIG)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"
