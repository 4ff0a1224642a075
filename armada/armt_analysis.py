"""Looking inside a UnifiedARMT: where memory tokens look, how focused each head is, what each head specializes in.

    maps = attention_maps(model, input_ids)          # one eager forward with output_attentions=True
    attention_entropy(maps)                          # [layers, heads] normalized entropy of the tokens' attention
    head_specialization(maps)                        # per-head summary (plain dict, JSON-ready)
    plot_memory_attention(maps, "memory.png")        # heatmap: memory tokens x segment slots, one panel a layer
"""

import math

import torch

from .io_utils import atomic_savefig


@torch.no_grad()
def attention_maps(model, input_ids, attention_mask=None):
    """Attention probabilities of one forward (batch averaged). Returns a dict of float tensors:

    - `tokens`: [layers, heads, seq_len, segment_size], each real token's attention over its segment's slots;
    - `memory_to_input`: [layers, commits, heads, memory_tokens, segment_size], memory tokens -> segment tokens;
    - `memory_to_memory`: [layers, commits, heads, memory_tokens, memory_tokens];
    - `segment_size`, `num_memory_tokens` (ints).
    """
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=True)
    finally:
        model.train(was_training)
    s = model.config.segment_size
    if out.memory_attentions[0] is None:
        raise ValueError(f"the input ({input_ids.shape[1]} tokens) fills no segment of {s} tokens: memory tokens "
                         "only run when a segment is complete")
    memory = torch.stack([a.float().mean(0) for a in out.memory_attentions])  # [L, C, H, M, S + M]
    return {"tokens": torch.stack([a.float().mean(0) for a in out.attentions]),
            "memory_to_input": memory[..., :s], "memory_to_memory": memory[..., s:],
            "segment_size": s, "num_memory_tokens": model.config.num_memory_tokens}


def _normalized_entropy(p, support):
    """Entropy of distributions p (last dim) divided by log(support): 0 = one slot, 1 = uniform over `support`."""
    h = -(p.clamp_min(1e-12).log() * p).sum(-1)
    return h / math.log(max(support, 2))


def attention_entropy(maps):
    """[layers, heads] mean normalized entropy of the real tokens' attention (each token over the slots it can
    see: token at segment slot i sees i + 1 slots)."""
    tokens = maps["tokens"]  # [L, H, T, S]
    s = maps["segment_size"]
    visible = (torch.arange(tokens.shape[2]) % s + 1).float()  # slots each query could attend to
    h = -(tokens.clamp_min(1e-12).log() * tokens).sum(-1)  # [L, H, T]
    return (h / visible.clamp_min(2).log()).mean(-1)


def head_specialization(maps):
    """Per layer and head: how focused the tokens' attention is, how far back it reaches, and how much of the memory
    tokens' attention goes to the segment rather than to other memory tokens. Plain lists, JSON-ready."""
    tokens, s = maps["tokens"], maps["segment_size"]
    slot = torch.arange(s).float()
    query_slot = (torch.arange(tokens.shape[2]) % s).float()
    distance = ((query_slot[:, None] - slot[None, :]).clamp_min(0) * tokens).sum(-1).mean(-1)  # [L, H]
    to_input = maps["memory_to_input"].sum(-1).mean(dim=(1, 3))  # [L, H]
    memory_entropy = _normalized_entropy(maps["memory_to_input"] / maps["memory_to_input"].sum(-1, keepdim=True)
                                         .clamp_min(1e-12), s).mean(dim=(1, 3))
    entropy = attention_entropy(maps)
    heads = []
    for layer in range(tokens.shape[0]):
        for head in range(tokens.shape[1]):
            local = distance[layer, head].item() < 1.5
            role = ("memory writer" if to_input[layer, head] > 0.5 and memory_entropy[layer, head] < 0.5
                    else "local" if local else "broad" if entropy[layer, head] > 0.8 else "selective")
            heads.append({"layer": layer, "head": head, "token_entropy": round(entropy[layer, head].item(), 4),
                          "mean_distance": round(distance[layer, head].item(), 3),
                          "memory_attention_to_input": round(to_input[layer, head].item(), 4),
                          "memory_entropy_over_input": round(memory_entropy[layer, head].item(), 4),
                          "role": role})
    return {"heads": heads, "roles": {r: sum(h["role"] == r for h in heads)
                                      for r in ("memory writer", "local", "broad", "selective")}}


def plot_memory_attention(maps, path, commit=-1):
    """Heatmap per layer of the memory tokens' attention (averaged over heads) over the segment's slots and the
    memory tokens at one commit (default: the last). Written atomically to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = torch.cat([maps["memory_to_input"], maps["memory_to_memory"]], dim=-1)[:, commit].mean(1)  # [L, M, S+M]
    layers = full.shape[0]
    fig, axes = plt.subplots(layers, 1, figsize=(10, 1.2 + 1.1 * layers), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        image = ax.imshow(full[layer].numpy(), aspect="auto", cmap="viridis")
        ax.axvline(maps["segment_size"] - 0.5, color="white", linewidth=1)
        ax.set_ylabel(f"layer {layer}\nmemory token")
        fig.colorbar(image, ax=ax, fraction=0.02)
    axes[-1, 0].set_xlabel(f"segment slots (left of the line) | memory tokens (right); commit {commit}")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["attention_maps", "attention_entropy", "head_specialization", "plot_memory_attention"]
