import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "train_agency.py")
sys.path.insert(0, os.path.join(REPO, "examples"))
from train_agency import main  # noqa: E402

TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--n_positions", "64", "--block_size", "32",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no", "--use_cpu",
        "--dataloader_num_workers", "0"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 120)
    return str(path)


def test_distillation_with_pruning_curriculum(tmp_path, text_file):
    summary = main(["--output_dir", str(tmp_path), "--train_file", text_file, "--max_steps", "6", "--distill",
                    "--curriculum_levels", "0,0.25,0.5", "--steps_per_stage", "2", *TINY])
    assert summary["global_step"] == 6
    assert summary["metrics"]["heads_per_layer"] and sum(summary["metrics"]["heads_per_layer"]) == 4
    assert os.path.isfile(tmp_path / "final" / "config.json")
    assert json.load(open(tmp_path / "summary_rank0.json"))["weights_sha256"] == summary["weights_sha256"]


def test_documented_two_process_launch_runs_two_processes_that_agree(tmp_path, text_file, documented_launch):
    ranks = documented_launch("train_agency.py", tmp_path, ["--train_file", text_file, "--distill",
                                                            "--curriculum_levels", "0,0.25", "--steps_per_stage", "2",
                                                            *TINY])
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]


def test_bad_arguments_fail_before_writing(tmp_path, text_file):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="is not supported"):
        main(["--output_dir", str(out), "--train_file", text_file, "--max_steps", "1", *TINY,
              "--report_to", "nonsense"])
    with pytest.raises(ValueError, match="comma-separated fractions"):
        main(["--output_dir", str(out), "--train_file", text_file, "--curriculum_levels", "0,half", *TINY])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--output_dir", str(out), "--train_file", str(tmp_path / "missing.txt"), *TINY])
    assert not out.exists()


def test_tensorboard_logging_offline_and_bf16_with_gradient_checkpointing(tmp_path, text_file):
    """report_to=tensorboard writes event files with the distillation loss parts (no network involved); bf16 mixed
    precision and gradient checkpointing run through the same script on CPU. The events go to transformers' default
    folder under --output_dir on both stacks (transformers 5 dropped `--logging_dir`)."""
    args = [a for a in TINY if a not in ("--report_to", "none")]
    summary = main(["--output_dir", str(tmp_path), "--train_file", text_file, "--max_steps", "4", "--distill",
                    "--logging_steps", "1", "--report_to", "tensorboard",
                    "--bf16", "--gradient_checkpointing", *args])
    assert summary["global_step"] == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "runs") for f in files
              if f.startswith("events.out.tfevents")]
    assert events, "no tensorboard event file written"
    tags = set()
    for path in events:
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/loss_kd"} <= tags, tags
