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


def _act_grad(name: str, x: torch.Tensor) -> torch.Tensor:
    """d act(x) / dx."""
    if name == "silu":
        sig = torch.sigmoid(x)
        return sig * (1 + x * (1 - sig))
    c = 0.7978845608028654  # sqrt(2/pi)
    inner = c * (x + 0.044715 * x**3)
    th = torch.tanh(inner)
    return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * c * (1 + 3 * 0.044715 * x * x)


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
    return weights.to(torch.float32 if logits.dtype != torch.float64 else torch.float64), ids.to(torch.int32)


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
    flat_w = topk_weights.reshape(-1)
    for expert, slots, rows in _expert_slots(topk_ids, e):
        xe = x[rows].to(cd)
        hidden = xe @ w_gate_up[expert].to(cd).t()
        a = _act(activation, hidden[:, :f]) * hidden[:, f:]
        ye = a @ w_down[expert].to(cd).t()
        out = out.index_add(0, rows, ye * flat_w[slots].to(cd)[:, None])
    return out.to(x.dtype)


def _expert_slots(topk_ids: torch.Tensor, num_experts: int):
    """Yield (expert, slots, rows): the flat (t*K + k) slots routed to each non-empty expert
    and their token rows. Host-side loop: this is the reference path."""
    t, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1).long()
    token_of = torch.arange(t, device=topk_ids.device).repeat_interleave(k)
    order = torch.argsort(flat_ids, stable=True)
    start = 0
    for expert, n in enumerate(torch.bincount(flat_ids, minlength=num_experts).tolist()):
        if n:
            slots = order[start : start + n]
            yield expert, slots, token_of[slots]
            start += n


def fused_experts_bwd_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit backward of :func:`fused_experts_ref`: (dx, dw_gate_up, dw_down, d_topk_weights),
    float32 math for half inputs (float64 for float64), the SwiGLU intermediate recomputed."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    f = w_gate_up.shape[1] // 2
    dx = torch.zeros(x.shape, dtype=cd, device=x.device)
    dw1 = torch.zeros(w_gate_up.shape, dtype=cd, device=x.device)
    dw2 = torch.zeros(w_down.shape, dtype=cd, device=x.device)
    dtw = torch.zeros(topk_weights.numel(), dtype=cd, device=x.device)
    flat_w = topk_weights.reshape(-1).to(cd)
    for expert, slots, rows in _expert_slots(topk_ids, w_gate_up.shape[0]):
        xe = x[rows].to(cd)
        w1, w2 = w_gate_up[expert].to(cd), w_down[expert].to(cd)
        hidden = xe @ w1.t()
        gate, up = hidden[:, :f], hidden[:, f:]
        a = _act(activation, gate) * up
        ye = a @ w2.t()
        dye = dy[rows].to(cd)
        dtw[slots] = (dye * ye).sum(-1)
        dye = dye * flat_w[slots][:, None]
        dw2[expert] = dye.t() @ a
        da = dye @ w2
        dgate = da * up * _act_grad(activation, gate)
        dup = da * _act(activation, gate)
        dh = torch.cat([dgate, dup], dim=1)
        dw1[expert] = dh.t() @ xe
        dx.index_add_(0, rows, dh @ w1)
    return (
        dx.to(x.dtype),
        dw1.to(w_gate_up.dtype),
        dw2.to(w_down.dtype),
        dtw.view(topk_weights.shape).to(topk_weights.dtype),
    )


def route_bwd_ref(
    d_weights: torch.Tensor,
    router_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    scoring: str,
    renormalize: bool,
) -> torch.Tensor:
    """d router_logits from d topk_weights with the selected ids held fixed."""
    cd = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    logits = router_logits.to(cd)
    ids = topk_ids.long()
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    sel = scores.gather(1, ids)
    dw = d_weights.to(cd)
    if renormalize:
        total = sel.sum(-1, keepdim=True)
        # w = sel / total  ->  d sel = (dw - sum(dw * w)) / total
        dsel = (dw - (dw * sel).sum(-1, keepdim=True) / total) / total
    else:
        dsel = dw
    dscores = torch.zeros_like(scores).scatter_add_(1, ids, dsel)
    if scoring == "softmax":
        dlogits = scores * (dscores - (dscores * scores).sum(-1, keepdim=True))
    else:
        dlogits = dscores * scores * (1 - scores)
    return dlogits.to(router_logits.dtype)
