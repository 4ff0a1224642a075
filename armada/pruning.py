"""Head scoring and physical head pruning for AgencyGPT2.

`score_heads(model, strategy, data)` returns a [n_layer, n_head] tensor where a higher score means a more useful
head; heads already pruned score +inf so they are never selected again. `prune(model, level, strategy, data)`
scores, picks the lowest-scoring `level` fraction of heads (globally or per layer) and removes them with
`model.prune_heads`, which slices the weights so the pruned model is smaller and faster.

Strategies:
- ``random``: seeded uniform scores (the control).
- ``magnitude``: L2 norm of each head's q/k/v columns of `c_attn` times the norm of its rows of `c_proj`.
- ``entropy``: mean normalized entropy of each head's real attention probabilities on the calibration data;
  diffuse (high-entropy) heads score low.
- ``importance``: Michel et al. (2019), |dL/d gate| accumulated over the calibration data, with gates at their
  current values; optionally normalized per layer (L2), as in the paper.
- ``l0``: Voita et al. (2019): hard-concrete gates trained on the calibration data with the model frozen and an L0
  penalty; the score is each gate's probability of being non-zero.
"""

import math
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

STRATEGIES = ("random", "magnitude", "entropy", "importance", "l0")


def _batches(data) -> list:
    """Calibration data as a list of dicts with `input_ids` (and optionally `attention_mask`)."""
    if data is None:
        raise ValueError("This strategy needs calibration data: a LongTensor of token ids, a dict, or an iterable "
                         "of those (batches).")
    if isinstance(data, torch.Tensor):
        data = [data]
    elif isinstance(data, dict):
        data = [data]
    batches = []
    for batch in data:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if "input_ids" not in batch:
            raise ValueError("Each calibration batch must have 'input_ids'.")
        ids = batch["input_ids"]
        if ids.dim() == 1:
            ids = ids[None]
        batches.append({"input_ids": ids, "attention_mask": batch.get("attention_mask")})
    if not batches:
        raise ValueError("Calibration data is empty.")
    return batches


def _lm_loss(model, batch):
    device = model.device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"]
    mask = mask.to(device) if mask is not None else None
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss


def _check_lm(model):
    if not hasattr(model, "transformer") or not hasattr(model.transformer, "head_gates"):
        raise ValueError(f"Head pruning works on AgencyGPT2ForCausalLM; got {type(model).__name__}. Convert a GPT-2 "
                         "first with AgencyGPT2ForCausalLM.from_gpt2(...).")


def _magnitude_scores(model) -> torch.Tensor:
    cfg = model.config
    scores = torch.zeros(cfg.n_layer, cfg.n_head)
    hd = cfg.n_embd // cfg.n_head
    for layer, block in enumerate(model.transformer.h):
        attn = block.attn
        if attn.num_heads == 0:
            continue
        with torch.no_grad():
            w = attn.c_attn.weight.float()  # (n_embd, 3 * nh * hd)
            qkv = w.view(cfg.n_embd, 3, attn.num_heads, hd).permute(2, 0, 1, 3).reshape(attn.num_heads, -1)
            out = attn.c_proj.weight.float().view(attn.num_heads, hd, cfg.n_embd).reshape(attn.num_heads, -1)
            scores[layer, attn.head_index.cpu()] = (qkv.norm(dim=1) * out.norm(dim=1)).cpu()
    return scores


@torch.no_grad()
def _entropy_scores(model, batches) -> torch.Tensor:
    cfg = model.config
    total = torch.zeros(cfg.n_layer, cfg.n_head)
    for batch in batches:
        model.transformer.utilization.zero_()
        model.transformer.observations.zero_()
        model.measure_utilization(batch["input_ids"].to(model.device),
                                  None if batch["attention_mask"] is None else batch["attention_mask"].to(model.device))
        total += model.transformer.utilization.detach().float().cpu()
    # Restore nothing: utilization now holds the calibration entropy, which is what the agency report should show.
    return -(total / len(batches))


def _importance_scores(model, batches, normalize_per_layer: bool) -> torch.Tensor:
    gates = model.transformer.head_gates
    was_training, requires = model.training, gates.requires_grad
    model.eval()
    gates.requires_grad_(True)
    total = torch.zeros_like(gates, dtype=torch.float32)
    for batch in batches:
        (grad,) = torch.autograd.grad(_lm_loss(model, batch), gates)
        total += grad.detach().float().abs()
    gates.requires_grad_(requires)
    model.train(was_training)
    scores = total.cpu() / len(batches)
    if normalize_per_layer:
        scores = scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return scores


class HardConcreteGate(nn.Module):
    """Hard-concrete distribution over [0, 1] per head (Louizos et al. 2018), used as a parametrization of the
    model's `head_gates` so that every forward samples gates (training) or uses their expected value (eval)."""

    def __init__(self, shape, beta=2.0 / 3.0, gamma=-0.1, zeta=1.1, init_open=0.9):
        super().__init__()
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        init = math.log(init_open / (1 - init_open))
        self.log_alpha = nn.Parameter(torch.full(shape, init + beta * math.log(-gamma / zeta)))

    def forward(self, gates):  # the original gate values are ignored while the parametrization is in place
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0).to(gates.dtype)

    def prob_nonzero(self):
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))


def _l0_scores(model, batches, steps: int, l0_penalty: float, lr: float, seed: int) -> torch.Tensor:
    base = model.transformer
    pruned = model.pruned_head_mask().to(base.head_gates.device)
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    was_training = model.training
    model.train()
    gate = HardConcreteGate(tuple(base.head_gates.shape)).to(base.head_gates.device)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    parametrize.register_parametrization(base, "head_gates", gate)
    try:
        optimizer = torch.optim.Adam([gate.log_alpha], lr=lr)
        live = (~pruned).float()
        for step in range(steps):
            batch = batches[step % len(batches)]
            loss = _lm_loss(model, batch) + l0_penalty * (gate.prob_nonzero() * live).sum() / live.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scores = gate.prob_nonzero().detach().float().cpu()
    finally:
        parametrize.remove_parametrizations(base, "head_gates", leave_parametrized=False)
        torch.random.set_rng_state(generator_state)
        for name, p in model.named_parameters():
            p.requires_grad_(frozen.get(name, True))
        model.train(was_training)
    return scores


def score_heads(
    model,
    strategy: str,
    data=None,
    *,
    seed: int = 0,
    normalize_per_layer: bool = True,
    l0_steps: int = 100,
    l0_penalty: float = 0.01,
    l0_lr: float = 0.1,
) -> torch.Tensor:
    """[n_layer, n_head] utility scores (higher = more useful). Heads already pruned get +inf."""
    _check_lm(model)
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown pruning strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}.")
    cfg = model.config
    if strategy == "random":
        generator = torch.Generator().manual_seed(seed)
        scores = torch.rand(cfg.n_layer, cfg.n_head, generator=generator)
    elif strategy == "magnitude":
        scores = _magnitude_scores(model)
    elif strategy == "entropy":
        scores = _entropy_scores(model, _batches(data))
    elif strategy == "importance":
        scores = _importance_scores(model, _batches(data), normalize_per_layer)
    else:
        scores = _l0_scores(model, _batches(data), l0_steps, l0_penalty, l0_lr, seed)
    scores = scores.float().clone()
    scores[model.pruned_head_mask()] = float("inf")
    return scores


def select_heads(scores: torch.Tensor, level: float, pruned: Optional[torch.Tensor] = None,
                 per_layer: bool = False) -> dict:
    """The `level` fraction of the heads with the lowest scores, as `{layer: [heads]}` (original indices).

    `level` is a fraction of all heads of the model (of each layer with `per_layer=True`); heads already pruned
    count towards it, so pruning to 0.3 and then to 0.5 leaves half the heads, not 35%.
    """
    if not isinstance(level, (int, float)) or not 0.0 <= level < 1.0:
        raise ValueError(f"Pruning level must be in [0, 1) (a fraction of heads), got {level!r}.")
    n_layer, n_head = scores.shape
    pruned = torch.zeros_like(scores, dtype=torch.bool) if pruned is None else pruned.bool()
    selection = {}
    if per_layer:
        target = min(int(round(level * n_head)), n_head - 1)  # every layer keeps at least one head
        for layer in range(n_layer):
            k = target - int(pruned[layer].sum())
            if k > 0:
                order = torch.argsort(scores[layer].masked_fill(pruned[layer], float("inf")), stable=True)
                selection[layer] = sorted(order[:k].tolist())
    else:
        k = min(int(round(level * n_layer * n_head)), n_layer * n_head - 1) - int(pruned.sum())
        if k > 0:
            order = torch.argsort(scores.masked_fill(pruned, float("inf")).flatten(), stable=True)[:k]
            for flat in order.tolist():
                selection.setdefault(flat // n_head, []).append(flat % n_head)
            selection = {layer: sorted(heads) for layer, heads in sorted(selection.items())}
    return selection


def prune(model, level: float, strategy: str = "importance", data=None, *, per_layer: bool = False, **score_kwargs):
    """Score the heads with `strategy`, remove the lowest-utility `level` fraction, return `{layer: [heads]}`."""
    _check_lm(model)
    if not isinstance(level, (int, float)) or not 0.0 <= level < 1.0:
        raise ValueError(f"Pruning level must be in [0, 1) (a fraction of heads), got {level!r}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown pruning strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}.")
    scores = score_heads(model, strategy, data, **score_kwargs)
    selection = select_heads(scores, level, model.pruned_head_mask(), per_layer=per_layer)
    if selection:
        model.prune_heads(selection)
    return selection


__all__ = ["STRATEGIES", "score_heads", "select_heads", "prune", "HardConcreteGate"]
