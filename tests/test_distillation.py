import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from armada import AgencyGPT2ForCausalLM
from armada.trainers import DistillationTrainer


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n=16, length=16, vocab=61):
        generator = torch.Generator().manual_seed(0)
        # a learnable pattern: token t is followed by (t + 1) mod vocab
        start = torch.randint(0, vocab, (n, 1), generator=generator)
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2(seed=0, vocab=61):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3,
                    report_to=[], save_strategy="no", logging_steps=4, use_cpu=True, dataloader_num_workers=0)
    return TrainingArguments(**{**defaults, **kw})


def loss_on(trainer, batch):
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def test_alpha_one_is_the_label_loss_and_identical_teacher_has_zero_kd(tmp_path):
    data = Blocks()
    batch = {"input_ids": data.ids[:4], "labels": data.ids[:4]}
    student = gpt2()
    trainer = DistillationTrainer(model=student, args=args(tmp_path), train_dataset=data,
                                  teacher_model=copy.deepcopy(student), alpha=1.0)
    with torch.no_grad():
        ce = student(**batch).loss.item()
    assert loss_on(trainer, batch) == pytest.approx(ce, rel=1e-5)
    trainer.alpha = 0.0
    assert loss_on(trainer, batch) == pytest.approx(0.0, abs=1e-6)


def test_pruned_student_learns_from_full_teacher(tmp_path):
    data = Blocks()
    teacher = gpt2()
    student = AgencyGPT2ForCausalLM.from_gpt2(teacher)
    student.prune_heads({0: [0, 1], 1: [3]})
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = DistillationTrainer(model=student, args=args(tmp_path), train_dataset=data, teacher_model=teacher,
                                  alpha=0.5, temperature=2.0)
    batch = {"input_ids": data.ids, "labels": data.ids}
    before = loss_on(trainer, batch)
    trainer.train()
    assert loss_on(trainer, batch) < before
    logged = [h for h in trainer.state.log_history if "loss_kd" in h]
    assert len(logged) == 2 and all(h["loss_ce"] > 0 and h["loss_kd"] >= 0 for h in logged)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items()), "teacher must not change"
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    data = Blocks(n=8)
    params = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        student, teacher = gpt2(seed=1), gpt2(seed=2)
        training_args = args(tmp_path, max_steps=1, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, learning_rate=0.1, optim="sgd")
        trainer = DistillationTrainer(model=student, args=training_args, train_dataset=data, teacher_model=teacher)
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=1e-5, rtol=1e-4)


def test_bad_configuration_errors(tmp_path):
    data = Blocks()
    with pytest.raises(ValueError, match="vocabularies differ"):
        DistillationTrainer(model=gpt2(), args=args(tmp_path), train_dataset=data, teacher_model=gpt2(vocab=62))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        DistillationTrainer(model=gpt2(), args=args(tmp_path), train_dataset=data, teacher_model=gpt2(), alpha=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillationTrainer(model=gpt2(), args=args(tmp_path), train_dataset=data, teacher_model=gpt2(), temperature=0)
    with pytest.raises(ValueError, match="needs teacher_model"):
        DistillationTrainer(model=gpt2(), args=args(tmp_path), train_dataset=data)
