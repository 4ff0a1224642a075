import glob
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
from train_diffusion import main  # noqa: E402

TINY = ["--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "4",
        "--max_position_embeddings", "64", "--block_size", "32", "--thought_dims", "4,2", "--thought_stack_size", "3",
        "--per_device_train_batch_size", "2", "--save_strategy", "no", "--use_cpu", "--dataloader_num_workers", "0",
        "--logging_steps", "2", "--max_eval_blocks", "4", "--sample_tokens", "8", "--sample_steps", "4"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 60)
    return str(path)


def test_curriculum_changes_the_config_and_parts_are_logged(tmp_path, text_file):
    curriculum = json.dumps([{"name": "easy", "max_steps": 2, "max_train_time": 0.5, "thought_loss_weight": 0.0},
                             {"name": "full", "max_train_time": 1.0, "noise_schedule": "cosine",
                              "thought_loss_weight": 0.05}])
    summary = main(["--output_dir", str(tmp_path), "--train_file", text_file, "--max_steps", "4", "--block_length",
                    "8", "--curriculum", curriculum, "--report_to", "tensorboard", *TINY])
    assert summary["global_step"] == 4
    assert [s["name"] for s in summary["curriculum"]] == ["easy"]
    logged = [r for r in summary["log_history"] if "loss" in r]
    assert len(logged) == 2
    for record in logged:
        for key in ("diffusion_loss", "elbo", "thought_loss", "thought_consistency", "thought_diversity",
                    "thought_sparsity", "mask_rate", "thought_norm", "peak_memory_mib"):
            assert key in record, key
    assert logged[0]["mask_rate"] < 0.6  # t <= 0.5 in the first stage
    config = json.load(open(tmp_path / "final" / "config.json"))
    assert config["noise_schedule"] == "cosine" and config["thought_loss_weight"] == 0.05
    assert glob.glob(str(tmp_path / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert os.path.isfile(tmp_path / "final" / "tokenizer.json") and "sample" in summary
    assert json.load(open(tmp_path / "summary.json"))["global_step"] == 4


def test_documented_two_process_launch_trains_with_ddp(tmp_path, text_file, documented_launch):
    ranks = documented_launch("train_diffusion.py", tmp_path, ["--train_file", text_file, "--block_length", "8",
                                                               "--report_to", "none", *TINY])
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [4, 4]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # DDP kept the two replicas equal
    assert os.path.isfile(tmp_path / "final" / "model.safetensors")


@pytest.mark.parametrize("args, message", [
    (["--curriculum", "[{\"max_steps\": 2, \"noise_schedule\": \"linear\"}]"], "noise_schedule"),
    (["--curriculum", "not json"], "JSON list"),
    (["--thought_dims", "4,x"], "comma-separated integers"),
])
def test_bad_arguments_fail_before_training(tmp_path, text_file, args, message):
    with pytest.raises(ValueError, match=message):
        main(["--output_dir", str(tmp_path / "never"), "--train_file", text_file, "--max_steps", "2",
              "--report_to", "none", *TINY, *args])
    assert not (tmp_path / "never" / "final").exists()
