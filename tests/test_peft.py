import torch
from peft import LoraConfig, PeftModel, get_peft_model

from armada import AgencyGPT2ForCausalLM


def base_model(tiny_gpt2):
    gpt2 = tiny_gpt2()
    model = AgencyGPT2ForCausalLM.from_gpt2(gpt2)
    model.prune_heads({1: [0]})  # LoRA must work on a pruned model too
    return model


def test_lora_train_save_reload_merge(tmp_path, tiny_gpt2):
    ids = (torch.arange(16)[None] + torch.arange(4)[:, None] * 7) % 61
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
                        fan_in_fan_out=True, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base_model(tiny_gpt2), config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    reloaded = PeftModel.from_pretrained(base_model(tiny_gpt2), tmp_path / "adapter").eval()
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, AgencyGPT2ForCausalLM) and merged.num_heads_per_layer() == [4, 3]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
        assert (base_model(tiny_gpt2)(input_ids=ids).logits - adapted).abs().max() > 1e-3, "the adapter changed nothing"
