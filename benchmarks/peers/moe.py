"""MoE implementations measured side by side. Every one routes inside the timed call
(softmax over float32 logits, top-k, renormalise) and returns y (T, H) in x's dtype.

* ``flashmoe``: this library's public ``fused_moe`` with ``FLASHMOE_BACKEND=triton``
  (CUDA only: never a reference number under this name).
* ``loop``: a Python loop over experts (one host sync for the counts, then per expert:
  gather rows, gate_up GEMM, SwiGLU, down GEMM, weighted ``index_add_``) — what a plain
  PyTorch MoE block does.
* ``grouped_mm``: argsort by expert + gather + ``torch._grouped_mm`` (gate_up) + SwiGLU +
  ``torch._grouped_mm`` (down) + weighted float32 ``index_add_`` combine. ``offs`` is the
  int32 cumulative row count per expert; weights are passed as transposed views
  (column-major B, nn.Linear layout), what the CUTLASS path wants.
* ``dense_floor``: the same FLOPs (6·T·K·H·F) as two plain dense GEMMs, (T·K, H) x (H, 2F)
  and (T·K, F) x (F, H), no routing, no gather: the floor. Not checked (it does not compute
  the MoE). Not run for ``moe_decode``, which is bandwidth bound (see ``gbps``).
* ``reference``: ``fused_moe`` with ``FLASHMOE_BACKEND=reference`` (float32 expert loop).

Backward (``moe_fwd_bwd``): autograd through the same code, gradients w.r.t. x, both
weights and the router logits, with a random grad ``dy``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..cases.moe import MoECase
from ..harness import Built, Data, Unavailable, Unsupported, op_kind
from ._common import forced_backend, wrap_op

IMPLS = ("flashmoe", "loop", "grouped_mm", "dense_floor", "reference")
_LEAVES = ("x", ("shared", "w_gate_up"), ("shared", "w_down"), "logits")


def torch_route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing as the library's default: float32 weights (T, K) renormalised, ids."""
    scores = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(scores, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def _sorted_slots(ids: torch.Tensor, top_k: int, experts: int):
    """Slots (t*K + k) sorted by expert: (order, token of each sorted slot, counts per expert)."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order, order // top_k, torch.bincount(flat, minlength=experts)


def loop_moe(x, logits, w_gate_up, w_down, top_k: int) -> torch.Tensor:
    t, h = x.shape
    e, f2, _ = w_gate_up.shape
    f = f2 // 2
    weights, ids = torch_route(logits, top_k)
    order, token, counts = _sorted_slots(ids, top_k, e)
    w_sorted = weights.reshape(-1)[order]
    out = torch.zeros((t, h), dtype=torch.float32, device=x.device)
    start = 0
    for expert, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        tok = token[start : start + n]
        hid = x[tok] @ w_gate_up[expert].t()
        act = F.silu(hid[:, :f]) * hid[:, f:]
        y = act @ w_down[expert].t()
        out.index_add_(0, tok, y.float() * w_sorted[start : start + n, None])
        start += n
    return out.to(x.dtype)


def grouped_mm_moe(x, logits, w_gate_up, w_down, top_k: int) -> torch.Tensor:
    t, h = x.shape
    e, f2, _ = w_gate_up.shape
    f = f2 // 2
    weights, ids = torch_route(logits, top_k)
    order, token, counts = _sorted_slots(ids, top_k, e)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x.index_select(0, token)
    hid = torch._grouped_mm(xs, w_gate_up.transpose(-2, -1), offs=offs)
    act = F.silu(hid[:, :f]) * hid[:, f:]
    ys = torch._grouped_mm(act, w_down.transpose(-2, -1), offs=offs)
    w_sorted = weights.reshape(-1)[order]
    out = torch.zeros((t, h), dtype=torch.float32, device=x.device)
    out.index_add_(0, token, ys.float() * w_sorted[:, None])
    return out.to(x.dtype)


def _library(backend: str, case: MoECase):
    from flashmoe_science import fused_moe

    def forward(s: dict[str, Any], shared: dict[str, Any]) -> torch.Tensor:
        with forced_backend(backend):
            return fused_moe(s["x"], shared["w_gate_up"], shared["w_down"], s["logits"], case.top_k)

    return forward


def _dense_floor(op: str, case: MoECase, data: Data) -> Built:
    """Two plain GEMMs with the MoE's FLOPs; for fwd_bwd, autograd through them (3x)."""
    if op == "moe_decode":
        raise Unsupported("decode is weight-bandwidth bound: compare gbps with the copy ceiling instead")
    rows = case.tokens * case.top_k
    dev = data.sets[0]["x"].device
    dt = getattr(torch, case.dtype)
    grad = op_kind(op) == "fwd_bwd"
    # One expert's weights as the dense B operands (same layout as the experts').
    w1 = data.shared["w_gate_up"][0].detach().t().requires_grad_(grad)  # (H, 2F)
    w2 = data.shared["w_down"][0].detach().t().requires_grad_(grad)  # (F, H)
    bufs = []
    for _ in data.sets:
        b = {
            "xk": torch.randn(rows, case.hidden, device=dev, dtype=dt, requires_grad=grad),
            "act": torch.randn(rows, case.ffn, device=dev, dtype=dt, requires_grad=grad),
        }
        if grad:
            b["dh"] = torch.randn(rows, 2 * case.ffn, device=dev, dtype=dt)
            b["dy"] = torch.randn(rows, case.hidden, device=dev, dtype=dt)
        bufs.append(b)

    if not grad:

        def fn(i: int) -> tuple[torch.Tensor, ...]:
            b = bufs[i]
            with torch.no_grad():
                return (torch.mm(b["xk"], w1), torch.mm(b["act"], w2))

        return Built(fn=fn, check=False)

    def fn_bwd(i: int) -> tuple[torch.Tensor, ...]:
        b = bufs[i]
        hid = torch.mm(b["xk"], w1)
        y = torch.mm(b["act"], w2)
        return torch.autograd.grad((hid, y), (b["xk"], w1, b["act"], w2), (b["dh"], b["dy"]))

    return Built(fn=fn_bwd, check=False)


def build(impl: str, op: str, case: MoECase, data: Data) -> Built:
    device = data.sets[0]["x"].device
    shared = data.shared
    if impl == "dense_floor":
        return _dense_floor(op, case, data)
    if impl == "flashmoe":
        if device.type != "cuda":
            raise Unavailable("flashmoe runs its Triton kernels on CUDA only")
        lib = _library("triton", case)
        forward = lambda s: lib(s, shared)
    elif impl == "reference":
        lib_ref = _library("reference", case)
        forward = lambda s: lib_ref(s, shared)
    elif impl == "loop":
        forward = lambda s: loop_moe(s["x"], s["logits"], shared["w_gate_up"], shared["w_down"], case.top_k)
    elif impl == "grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            raise Unavailable(f"torch {torch.__version__} has no torch._grouped_mm")
        forward = lambda s: grouped_mm_moe(
            s["x"], s["logits"], shared["w_gate_up"], shared["w_down"], case.top_k
        )
    else:
        raise ValueError(f"unknown moe impl {impl!r}; known: {IMPLS}")
    return Built(fn=wrap_op(op, forward, data, _LEAVES, "dy"))
