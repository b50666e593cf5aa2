"""torch.compile and torch.library checks on CPU (reference path; the Triton path under compile is
tested on the GPU in tests/gpu/test_gpu_integrations.py: DESIGN.md, an interpreted Triton kernel
cannot run under FakeTensor).

- ``torch.compile(fullgraph=True)`` of a small model built from FlashMoEScienceAttention and
  FlashMoELayer traces forward and backward with zero graph breaks (fullgraph raises on any
  break; ``torch._dynamo.explain`` counts them) and matches eager.
- ``torch.library.opcheck`` on every ``flashmoe_science::*`` custom op (schema, fake tensor,
  autograd registration, AOT dispatch with dynamic shapes).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flashmoe_science.ops.attention.autograd  # noqa: F401  (registers the ops)
import flashmoe_science.ops.moe.autograd  # noqa: F401
import flashmoe_science.ops.norm  # noqa: F401
from flashmoe_science import FlashMoELayer, FlashMoEScienceAttention


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # Compile-compatibility on CPU goes through the reference path (DESIGN.md toolchain facts).
    monkeypatch.setenv("FLASHMOE_BACKEND", "reference")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TinyMoETransformer(nn.Module):
    def __init__(self, dim=32, heads=4, kv_heads=2, experts=4, top_k=2, scoring="softmax"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FlashMoEScienceAttention(dim, heads, kv_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.moe = FlashMoELayer(dim, experts, top_k, 2 * dim, scoring=scoring, num_shared_experts=1)
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, is_causal=True)[0]
        x = x + self.moe(self.norm2(x))
        return self.head(x), self.moe.aux_loss


def _run(fn, model, x, g):
    out, aux = fn(x)
    (out * g).sum().add(aux).backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# The attention layer hands the op transposed (B, S, H, D) views. The reference branch of
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_compile_fullgraph_forward_backward_matches_eager(scoring):
    torch.manual_seed(0)
    model = TinyMoETransformer(scoring=scoring)
    x = torch.randn(2, 16, 32)
    g = torch.randn(2, 16, 32)
    eager_out, eager_grads = _run(model, model, x, g)
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, grads = _run(compiled, model, x, g)
    # Same ops in the same order: compiled and eager agree to rounding.
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_dynamo_explain_reports_no_graph_breaks():
    model = TinyMoETransformer()
    x = torch.randn(2, 8, 32)

    def step(x):
        out, aux = model(x)
        return out.sum() + aux

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops = {str(n.target) for gm in explanation.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("flashmoe_science.attn_fwd" in o for o in ops), ops
    assert any("flashmoe_science.experts_fwd" in o for o in ops), ops


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_compile_fullgraph_moe_layer_forward_backward(scoring):
    """FlashMoELayer alone (route + experts ops, aux loss) under fullgraph aot_eager."""
    torch.manual_seed(0)
    layer = FlashMoELayer(16, 4, 2, 32, scoring=scoring, num_shared_experts=1)
    x = torch.randn(2, 12, 16)
    g = torch.randn(2, 12, 16)

    def fn(x):
        return layer(x), layer.aux_loss

    eager_out, eager_grads = _run(fn, layer, x, g)
    layer.zero_grad()
    out, grads = _run(torch.compile(fn, backend="aot_eager", fullgraph=True), layer, x, g)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compile_inductor_forward_backward():
    """The default backend (inductor, CPU codegen) on the MoE layer: compiles and matches eager."""
    torch.manual_seed(0)
    layer = FlashMoELayer(16, 4, 2, 32)
    x = torch.randn(24, 16, requires_grad=True)
    g = torch.randn(24, 16)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, g)
    compiled = torch.compile(layer, fullgraph=True)
    y_c = compiled(x)
    (dx_c,) = torch.autograd.grad(y_c, x, g)
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_c, dx, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- opcheck
def _attn_inputs():
    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    k = torch.randn(2, 2, 10, 16, requires_grad=True)
    v = torch.randn(2, 2, 10, 16, requires_grad=True)
    return q, k, v


def _varlen_inputs():
    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32)  # includes an empty sequence
    q = torch.randn(9, 4, 16, requires_grad=True)
    k = torch.randn(9, 2, 16, requires_grad=True)
    v = torch.randn(9, 2, 16, requires_grad=True)
    return q, k, v, cu


def _moe_inputs():
    t, h, f, e, k = 12, 16, 8, 4, 2
    x = torch.randn(t, h, requires_grad=True)
    w1 = torch.randn(e, 2 * f, h, requires_grad=True)
    w2 = torch.randn(e, h, f, requires_grad=True)
    weights = torch.rand(t, k, requires_grad=True)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32)
    return x, w1, w2, weights, ids


def _cases():
    ops = torch.ops.flashmoe_science
    q, k, v = _attn_inputs()
    out, lse = ops.attn_fwd(q.detach(), k.detach(), v.detach(), True, 0.25, False)
    do = torch.randn_like(out)
    vq, vk, vv, cu = _varlen_inputs()
    vout, vlse = ops.attn_varlen_fwd(vq.detach(), vk.detach(), vv.detach(), cu, cu, 6, 6, True, 0.25, False)
    x, w1, w2, tw, ids = _moe_inputs()
    logits = torch.randn(12, 8, requires_grad=True)
    bias = torch.randn(8)
    d_w = torch.randn(12, 2)
    route_ids = ops.route(logits.detach(), 2, "sigmoid", True, bias, 4, 2, False)[1]
    # (B, S, H, D) tensors viewed as (B, H, S, D), as the attention layer passes them.
    tq, tk, tv = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    tout, tlse = ops.attn_fwd(tq, tk, tv, True, 0.25, False)
    return {
        "attn_fwd": (ops.attn_fwd, (q, k, v, True, 0.25, False)),
        "attn_fwd_noncausal": (ops.attn_fwd, (q, k, v, False, 0.3, False)),
        "attn_bwd": (ops.attn_bwd, (do, q.detach(), k.detach(), v.detach(), out, lse, True, 0.25, False)),
        "attn_fwd_strided": (
            ops.attn_fwd,
            (tq.requires_grad_(), tk.requires_grad_(), tv.requires_grad_(), True, 0.25, False),
        ),
        "attn_bwd_strided": (
            ops.attn_bwd,
            (torch.randn_like(tout), tq.detach(), tk.detach(), tv.detach(), tout, tlse, True, 0.25, False),
        ),
        "attn_varlen_fwd": (ops.attn_varlen_fwd, (vq, vk, vv, cu, cu, 6, 6, True, 0.25, False)),
        "attn_varlen_bwd": (
            ops.attn_varlen_bwd,
            (
                torch.randn_like(vout),
                vq.detach(),
                vk.detach(),
                vv.detach(),
                vout,
                vlse,
                cu,
                cu,
                6,
                6,
                True,
                0.25,
                False,
            ),
        ),
        "route_softmax": (ops.route, (logits, 2, "softmax", True, None, None, None, False)),
        "route_sigmoid_grouped": (ops.route, (logits, 2, "sigmoid", True, bias, 4, 2, False)),
        "route_bwd": (ops.route_bwd, (d_w, logits.detach(), route_ids, "sigmoid", True)),
        "experts_fwd": (ops.experts_fwd, (x, w1, w2, tw, ids, "silu", False)),
        "experts_fwd_gelu": (ops.experts_fwd, (x, w1, w2, tw, ids, "gelu", False)),
        "layer_norm_fwd": (
            ops.layer_norm_fwd,
            (torch.randn(6, 16), torch.randn(16), torch.randn(16), 1e-5, False),
        ),
        "experts_bwd": (
            ops.experts_bwd,
            (torch.randn(12, 16), x.detach(), w1.detach(), w2.detach(), tw.detach(), ids, "silu", False),
        ),
    }


def test_opcheck_covers_every_registered_op():
    registered = {
        n.split("::", 1)[1]
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("flashmoe_science::")
    }
    covered = {op._qualified_op_name.split("::", 1)[1] for op, _ in _cases().values()}
    assert registered <= covered, f"ops without an opcheck case: {sorted(registered - covered)}"


_CASES = sorted(_cases())


@pytest.mark.parametrize("case", _CASES)
def test_opcheck(case):
    torch.manual_seed(0)
    op, args = _cases()[case]
    torch.library.opcheck(op, args)
