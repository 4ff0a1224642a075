import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from armada import AgencyGPT2ForCausalLM
from armada.trainers import (
    Curriculum,
    CurriculumStage,
    CurriculumTrainer,
    finalize_pruning,
    pruning_curriculum,
)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n=32, length=16, vocab=61):
        generator = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=generator)
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def model(agency=False):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return AgencyGPT2ForCausalLM.from_gpt2(gpt2) if agency else gpt2


def args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4, learning_rate=1e-3,
                    report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0)
    return TrainingArguments(**{**defaults, **kw})


def recording_curriculum(log, budgets=(2, 3, 2)):
    return Curriculum([
        CurriculumStage(name=f"s{i}", apply=lambda trainer, i=i: log.append((i, trainer.state.global_step)),
                        max_steps=budget, params={"difficulty": i})
        for i, budget in enumerate(budgets)
    ])


def test_curriculum_validation():
    with pytest.raises(ValueError, match="at least one stage"):
        Curriculum([])
    with pytest.raises(ValueError, match="non-decreasing"):
        Curriculum([CurriculumStage("a", metric="eval_accuracy", threshold=0.8),
                    CurriculumStage("b", metric="eval_accuracy", threshold=0.6)])
    with pytest.raises(ValueError, match="non-increasing"):
        Curriculum([CurriculumStage("a", metric="eval_loss", threshold=2.0, greater_is_better=False),
                    CurriculumStage("b", metric="eval_loss", threshold=3.0, greater_is_better=False)])
    with pytest.raises(ValueError, match="can never end"):
        Curriculum([CurriculumStage("a"), CurriculumStage("b", max_steps=3)])
    with pytest.raises(ValueError, match="both metric and threshold"):
        Curriculum([CurriculumStage("a", metric="eval_loss", max_steps=2)])
    with pytest.raises(ValueError, match="non-decreasing"):
        pruning_curriculum(levels=(0.5, 0.3))


def test_stages_advance_on_step_budget_and_training_stops(tmp_path):
    log = []
    trainer = CurriculumTrainer(model=model(), args=args(tmp_path), train_dataset=Blocks(),
                                curriculum=recording_curriculum(log))
    trainer.train()
    assert log == [(0, 0), (1, 2), (2, 5)]
    assert trainer.state.global_step == 7
    assert [(h["name"], h["start_step"], h["end_step"], h["reason"]) for h in trainer.curriculum_history] == [
        ("s0", 0, 2, "step budget"), ("s1", 2, 5, "step budget"), ("s2", 5, 7, "step budget")]


def test_stage_advances_when_eval_metric_passes_threshold(tmp_path):
    log = []
    curriculum = Curriculum([
        CurriculumStage("easy", apply=lambda t: log.append("easy"), max_steps=100, metric="eval_loss",
                        threshold=1e9, greater_is_better=False),
        CurriculumStage("hard", apply=lambda t: log.append("hard"), max_steps=3),
    ])
    data = Blocks()
    trainer = CurriculumTrainer(model=model(), args=args(tmp_path, eval_strategy="steps", eval_steps=2),
                                train_dataset=data, eval_dataset=data, curriculum=curriculum)
    trainer.train()
    first = trainer.curriculum_history[0]
    assert first["reason"] == "threshold" and first["end_step"] == 2 and "eval_loss" in first["metrics"]
    assert log == ["easy", "hard"] and trainer.state.global_step == 5


def test_stage_and_history_survive_resume(tmp_path):
    log = []
    trainer = CurriculumTrainer(model=model(), args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4),
                                train_dataset=Blocks(), curriculum=recording_curriculum(log))
    trainer.train()
    assert trainer.curriculum_stage == 1 and len(trainer.curriculum_history) == 1
    resumed_log = []
    resumed = CurriculumTrainer(model=model(), args=args(tmp_path), train_dataset=Blocks(),
                                curriculum=recording_curriculum(resumed_log))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed_log == [(1, 4), (2, 5)]  # the current stage is re-applied on resume, then the next one
    assert [h["end_step"] for h in resumed.curriculum_history] == [2, 5, 7]
    with pytest.raises(FileNotFoundError):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-99"))


def test_pruning_curriculum_masks_then_finalize_removes(tmp_path):
    data = Blocks()
    calibration = [data.ids[:8]]
    agency = model(agency=True)
    curriculum = pruning_curriculum(levels=(0.0, 0.25, 0.5), strategy="importance", data=calibration,
                                    steps_per_stage=2)
    trainer = CurriculumTrainer(model=agency, args=args(tmp_path), train_dataset=data, curriculum=curriculum)
    trainer.train()
    assert [h["params"]["pruning_level"] for h in trainer.curriculum_history] == [0.0, 0.25, 0.5]
    consent = agency.transformer.consent
    assert int((consent == 0).sum()) == 6 and agency.agency_report()["counts"]["withdrawn"] == 6
    agency.eval()
    with torch.no_grad():
        masked = agency(data.ids[:4]).logits
    removed = finalize_pruning(agency)
    assert sum(len(h) for h in removed.values()) == 6 and sum(agency.num_heads_per_layer()) == 6
    with torch.no_grad():
        torch.testing.assert_close(agency(data.ids[:4]).logits, masked, atol=1e-5, rtol=0)
