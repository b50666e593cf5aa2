"""Public MoE API on the reference path (CPU) against float64 oracles.

The float64 oracle differentiates ``fused_experts_ref`` / ``route_ref`` with torch
autograd, so the explicit backward used by the custom ops is checked too.
"""

import pytest
import torch
from _numerics import assert_close_rule
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmoe_science import fused_experts, fused_moe, route
from flashmoe_science.ops.moe import reference


def _weights(e, h, f, dtype):
    w1 = torch.randn(e, 2 * f, h, dtype=dtype) / h**0.5
    w2 = torch.randn(e, h, f, dtype=dtype) / f**0.5
    return w1, w2


def _check_experts(x, w1, w2, tw, ids, activation="silu"):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2, tw)]
    y = fused_experts(*leaves[:4], ids, activation=activation)
    assert y.dtype == x.dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)

    r_leaves = [t.detach().double().requires_grad_(True) for t in (x, w1, w2, tw)]
    r = reference.fused_experts_ref(*r_leaves, ids, activation=activation)
    r_grads = torch.autograd.grad(r, r_leaves, dy.double())
    p_leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2, tw)]
    p = reference.fused_experts_ref(*p_leaves, ids, activation=activation, compute_dtype=x.dtype)
    p_grads = torch.autograd.grad(p, p_leaves, dy)
    assert_close_rule(y, r, p, name="y")
    for name, g, rg, pg in zip(("dx", "dw_gate_up", "dw_down", "d_topk_weights"), grads, r_grads, p_grads):
        assert_close_rule(g, rg, pg, grad=True, name=name)


CASES = [
    # (T, H, F, E, K)
    (16, 32, 24, 4, 2),
    (1, 16, 8, 8, 1),  # T=1
    (9, 16, 8, 3, 3),  # K=E
    (40, 16, 8, 16, 4),  # ragged counts, some empty experts
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}H{}F{}E{}K{}".format(*c))
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_fused_experts_matches_float64(case, dtype, activation):
    t, h, f, e, k = case
    x = torch.randn(t, h, dtype=dtype)
    w1, w2 = _weights(e, h, f, dtype)
    tw, ids = route(torch.randn(t, e), k)
    _check_experts(x, w1, w2, tw.to(dtype), ids, activation)


def test_all_tokens_to_one_expert():
    t, h, f, e = 12, 16, 8, 4
    x = torch.randn(t, h)
    w1, w2 = _weights(e, h, f, torch.float32)
    ids = torch.full((t, 1), 2, dtype=torch.int32)
    _check_experts(x, w1, w2, torch.rand(t, 1), ids)


def test_fused_moe_equals_route_then_experts():
    t, h, f, e = 10, 16, 8, 6
    x = torch.randn(t, h, dtype=torch.float64)
    w1, w2 = _weights(e, h, f, torch.float64)
    logits = torch.randn(t, e, dtype=torch.float64)
    y = fused_moe(x, w1, w2, logits, top_k=2)
    torch.testing.assert_close(y, fused_experts(x, w1, w2, *route(logits, 2)))


def test_dense_definition():
    # y[t] = sum_k w[t,k] * down(silu(gate x) * up x), written out token by token.
    t, h, f, e, k = 5, 8, 6, 4, 2
    x = torch.randn(t, h, dtype=torch.float64)
    w1, w2 = _weights(e, h, f, torch.float64)
    tw, ids = route(torch.randn(t, e, dtype=torch.float64), k)
    y = fused_experts(x, w1, w2, tw, ids)
    for i in range(t):
        acc = torch.zeros(h, dtype=torch.float64)
        for j in range(k):
            ex = int(ids[i, j])
            hdn = w1[ex] @ x[i]
            acc += tw[i, j] * (w2[ex] @ (torch.nn.functional.silu(hdn[:f]) * hdn[f:]))
        torch.testing.assert_close(y[i], acc)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_semantics_and_grads(scoring, renormalize):
    t, e, k = 7, 8, 3
    logits = torch.randn(t, e, dtype=torch.float32, requires_grad=True)
    w, ids = route(logits, k, scoring=scoring, renormalize=renormalize)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == (t, k)
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    expected_ids = scores.topk(k, -1).indices
    assert torch.equal(ids.long(), expected_ids)
    if renormalize:
        torch.testing.assert_close(w.sum(-1), torch.ones(t))
    dw = torch.randn_like(w)
    (g,) = torch.autograd.grad(w, logits, dw)
    l64 = logits.detach().double().requires_grad_(True)
    s64 = torch.softmax(l64, -1) if scoring == "softmax" else torch.sigmoid(l64)
    w64 = s64.gather(1, ids.long())
    if renormalize:
        w64 = w64 / w64.sum(-1, keepdim=True)
    (g64,) = torch.autograd.grad(w64, l64, dw.double())
    torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-6)


def test_route_bias_selects_but_does_not_weight():
    logits = torch.zeros(4, 4)
    logits[:, 0] = 1.0  # expert 0 has the best score
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # but the bias makes expert 3 win selection
    w, ids = route(logits, 1, scoring="sigmoid", renormalize=False, bias=bias)
    assert torch.all(ids == 3)
    torch.testing.assert_close(w, torch.sigmoid(torch.zeros(4, 1)))  # unbiased score of expert 3


def test_group_limited_routing_stays_in_best_groups():
    t, e, n_group, topk_group = 32, 16, 4, 2
    logits = torch.randn(t, e)
    _, ids = route(logits, 4, scoring="sigmoid", n_group=n_group, topk_group=topk_group)
    group_best = torch.sigmoid(logits).view(t, n_group, -1).amax(-1)
    allowed = group_best.topk(topk_group, -1).indices
    for i in range(t):
        groups = set((ids[i].long() // (e // n_group)).tolist())
        assert groups <= set(allowed[i].tolist())


@settings(max_examples=30, deadline=None)
@given(
    t=st.integers(1, 24),
    e=st.integers(1, 12),
    k_frac=st.floats(0.0, 1.0),
    skew=st.floats(0.0, 6.0),
    seed=st.integers(0, 2**16),
)
def test_property_experts_under_skewed_routing(t, e, k_frac, skew, seed):
    torch.manual_seed(seed)
    k = max(1, round(k_frac * e))
    h, f = 8, 6
    logits = torch.randn(t, e)
    logits[:, 0] += skew  # skew pushes most tokens to expert 0
    tw, ids = route(logits, k)
    x = torch.randn(t, h, dtype=torch.float16)
    w1, w2 = _weights(e, h, f, torch.float16)
    _check_experts(x, w1, w2, tw.half(), ids)
