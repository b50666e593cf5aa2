"""Plain-PyTorch Mixture-of-Experts: routing and dropless experts. CPU path and test oracle.

Shape letters: T tokens, H hidden, E experts, K top-k, F ffn (per expert).
Weights: ``w_gate_up`` (E, 2F, H) with rows [0, F) the gate and [F, 2F) the up projection;
``w_down`` (E, H, F). Expert e computes ``down_e(act(gate_e x) * up_e x)`` and
``y[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])``.
Nothing here imports the kernel side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu")


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh")


def route_ref(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing. Returns ``(topk_weights float32 (T, K), topk_ids int32 (T, K))``.

    ``scoring``: "softmax" over experts or "sigmoid" per expert. ``bias`` (E,) is added to
    the scores for *selection only* (DeepSeek-V3 aux-loss-free balancing); the weights
    are the unbiased scores. ``n_group``/``topk_group``: experts are split into n_group
    groups, each scored by its best expert (or the sum of its best two when a bias is
    given, as DeepSeek-V3 does), and only the best topk_group groups compete.
    ``renormalize`` divides the K weights by their sum.
    """
    logits = router_logits.float() if router_logits.dtype != torch.float64 else router_logits
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
    sel = scores if bias is None else scores + bias.to(scores.dtype)
    if n_group is not None and n_group > 1:
        t, e = sel.shape
        grouped = sel.view(t, n_group, e // n_group)
        if bias is not None:
            group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        sel = sel.masked_fill(~expert_mask, float("-inf"))
    ids = sel.detach().topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(torch.float32 if logits.dtype != torch.float64 else torch.float64), ids.to(
        torch.int32
    )


def fused_experts_ref(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dropless expert computation, one expert at a time (reads only routed rows).

    ``compute_dtype``: arithmetic precision (default float32 for half inputs, float64 for
    float64). Returns (T, H) in x's dtype. Differentiable in x, both weights and
    ``topk_weights``.
    """
    t, h = x.shape
    e, f2, _ = w_gate_up.shape
    f = f2 // 2
    k = topk_ids.shape[1]
    cd = compute_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    out = torch.zeros((t, h), dtype=cd, device=x.device)
    if t == 0 or k == 0:
        return out.to(x.dtype)
    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1)
    token_of = torch.arange(t, device=x.device).repeat_interleave(k)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=e).tolist()
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start : start + n]
        start += n
        rows = token_of[slots]
        xe = x[rows].to(cd)
        hidden = xe @ w_gate_up[expert].to(cd).t()
        a = _act(activation, hidden[:, :f]) * hidden[:, f:]
        ye = a @ w_down[expert].to(cd).t()
        out = out.index_add(0, rows, ye * flat_w[slots].to(cd)[:, None])
    return out.to(x.dtype)
