"""benchmarks/diffusion.py in its quick mode: runs end to end, writes JSON + PNG + markdown where told, refuses to
overwrite, refuses bad arguments."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "diffusion.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=900)


def test_quick_run_writes_the_report(tmp_path):
    done = run("--quick", "--out", str(tmp_path), "--ablations", "no_stack,no_neighbors")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "diffusion.json").read_text())
    assert set(report["training"]) == {"thought_diffusion", "no_stack", "no_neighbors", "gpt2"}
    assert {"no_stack", "no_neighbors"} <= set(report["quality"])
    gpt2 = report["training"]["gpt2"]  # evaluated at the end (and every --eval-every steps), keeps its best
    assert [e["step"] for e in gpt2["evaluations"]] == [2] and gpt2["kept_step"] == 2
    assert report["quality"]["gpt2"]["perplexity"] > 1 and report["quality"]["thought_diffusion"]["perplexity"] > 1
    assert {"gpt2", "td_2_cache", "td_4", "td_4_cache_thr"} <= set(report["sampling"])
    assert report["claims"]["encoder"]["max_abs_diff"] < 1e-4
    assert (tmp_path / "diffusion.png").stat().st_size > 0 and "| gpt2 |" in (tmp_path / "diffusion.md").read_text()
    assert report["args"]["complementary_masking"] and report["args"]["thought_train_prob"] == 0.2
    again = run("--quick", "--out", str(tmp_path))
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_bad_arguments_exit_non_zero(tmp_path):
    done = run("--quick", "--out", str(tmp_path), "--steps-list", "100")
    assert done.returncode != 0 and "--new-tokens must be a multiple" in done.stderr
    assert not (tmp_path / "diffusion.json").exists()
    done = run("--quick", "--out", str(tmp_path), "--ablations", "no_stack,bigger")
    assert done.returncode != 0 and "--ablations must name some of" in done.stderr
