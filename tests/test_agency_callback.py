import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from armada import AgencyGPT2ForCausalLM
from armada.trainers import AgencyCallback, find_agency_model


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n=16, length=16, vocab=61):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_agency_callback_runs_dynamics_in_trainer(tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    model = AgencyGPT2ForCausalLM.from_gpt2(gpt2, controller_warmup_steps=2, controller_update_frequency=2)
    data = Blocks()
    callback = AgencyCallback(utilization_batch={"input_ids": data.ids[:4]})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert [h["step"] for h in callback.history] == [2, 4, 6]
    assert all(h["moved"] == 8 for h in callback.history)
    base = model.transformer
    assert torch.all(base.importance > 0) and torch.all(base.observations == 3)
    assert not torch.allclose(base.head_gates.detach(), torch.ones(2, 4))


def test_find_agency_model_through_wrappers():
    model = AgencyGPT2ForCausalLM.from_gpt2(GPT2LMHeadModel(GPT2Config(vocab_size=11, n_embd=8, n_layer=1, n_head=2)))
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert find_agency_model(wrapper) is model
    assert find_agency_model(torch.nn.Linear(2, 2)) is None
