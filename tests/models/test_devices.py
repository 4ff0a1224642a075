"""The same model on any device: every check here runs on the CPU in the suite and on CUDA where a GPU is present
(`make gpu-check`). Half precision, SDPA against eager attention, cached against uncached decoding and a short
`Trainer` run, for each architecture, with everything placed by the model's own device."""

import pytest
import torch
from test_modeling_agency_gpt2 import AgencyGPT2ModelTester
from test_modeling_thought_diffusion import MASK, ThoughtDiffusionModelTester
from test_modeling_unified_armt import UnifiedARMTModelTester
from transformers import Trainer, TrainingArguments

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HALF = {"cpu": [torch.bfloat16], "cuda": [torch.bfloat16, torch.float16]}
ARCHS = ["agency_gpt2", "unified_armt", "thought_diffusion"]


def build(arch):
    """(model, input_ids, labels) on the CPU, fp32, eval mode."""
    if arch == "agency_gpt2":
        tester = AgencyGPT2ModelTester()
        return tester.agency(), tester.input_ids(), None
    if arch == "unified_armt":
        tester = UnifiedARMTModelTester()
        return tester.model(), tester.input_ids(), None
    tester = ThoughtDiffusionModelTester(block_length=4)
    ids = tester.input_ids()
    noisy = ids.clone()
    noisy[:, 4:8] = MASK
    return tester.model(), noisy, ids


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_on_device(arch, device):
    for dtype in HALF[device.type]:
        model, ids, labels = build(arch)
        model = model.to(device=device, dtype=dtype)
        with torch.no_grad():
            out = model(ids.to(device), labels=(ids if labels is None else labels).to(device))
        assert out.logits.device.type == device.type and out.logits.dtype == dtype
        assert torch.isfinite(out.loss)


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_matches_eager_on_device(arch, device):
    model, ids, _ = build(arch)
    model, ids = model.to(device), ids.to(device)
    logits = {}
    for implementation in ("eager", "sdpa"):
        model.config._attn_implementation = implementation
        with torch.no_grad():
            logits[implementation] = model(ids).logits.float()
    tolerance = 1e-4 if device.type == "cuda" else 1e-5  # TF32 and other kernels on a GPU
    assert (logits["eager"] - logits["sdpa"]).abs().max().item() <= tolerance


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_equals_recomputing_on_device(arch, device):
    model, ids, _ = build(arch)
    model, ids = model.to(device), ids.to(device)
    if arch == "thought_diffusion":
        greedy = dict(max_new_tokens=8, num_steps=4, top_k=1)
        cached = model.generate_with_stack(ids[:, :4], use_block_cache=True, **greedy).sequences
        recomputed = model.generate_with_stack(ids[:, :4], use_block_cache=False, **greedy).sequences
    else:
        greedy = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
        cached = model.generate(ids, use_cache=True, **greedy)
        recomputed = model.generate(ids, use_cache=False, **greedy)
    assert cached.device.type == device.type and torch.equal(cached, recomputed)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.mark.parametrize("arch", ARCHS)
def test_short_trainer_run_on_device(arch, device, tmp_path):
    model, ids, labels = build(arch)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=device.type == "cpu", seed=0,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model.train(), args=args, train_dataset=_Batches(ids, ids if labels is None else labels))
    result = trainer.train()
    assert trainer.model.device.type == device.type and result.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    moved = [name for name, p in trainer.model.named_parameters() if name in before and
             not torch.equal(p.detach().cpu(), before[name])]
    assert moved, "no parameter changed in two optimizer steps"
