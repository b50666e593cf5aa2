"""Attention test helpers shared by the CPU (interpreter) and GPU kernel tests."""

from __future__ import annotations

import math

import torch
from _numerics import assert_close_rule


def reference_grads(q, k, v, do, causal, scale, ref_fn):
    """(float64 grads, same-dtype grads) of (q, k, v) by autograd through ``ref_fn``, a
    reference forward taking ``compute_dtype``."""
    out = []
    for cd in (torch.float64, q.dtype):
        leaves = [t.detach().to(cd).requires_grad_(True) for t in (q, k, v)]
        o, _ = ref_fn(*leaves, causal, scale, compute_dtype=cd)
        out.append(torch.autograd.grad(o, leaves, do.to(cd)))
    return out


def varlen_ref_fn(cu_seqlens_q, cu_seqlens_k):
    """``reference.attention_varlen_ref`` over fixed ``cu_seqlens``, in the ``ref_fn`` form
    ``reference_grads`` takes."""
    from flashmoe_science.ops.attention import reference

    def ref_fn(q, k, v, causal, scale, compute_dtype):
        return reference.attention_varlen_ref(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, compute_dtype=compute_dtype
        )

    return ref_fn


def check_grads(grads, r_grads, p_grads):
    """dq, dk, dv against the float64 grads by DESIGN.md's rule (3x the same-dtype error)."""
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, r_grads, p_grads):
        assert g.dtype == p.dtype and g.shape == r.shape, name
        assert_close_rule(g, r, p, grad=True, name=name)


def poison_allocations(monkeypatch):
    """Make ``torch.empty`` / ``torch.empty_like`` return NaN-filled floating tensors until
    ``monkeypatch.undo()``: outputs and scratch a kernel never writes then fail the checks."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_fill(empty_like(*a, **kw)))


def check_public_api_fwd_bwd(causal):
    """``flash_attention_science`` forward + autograd backward on CUDA (GQA 8:2, D 128, 1000
    tokens, bf16) against the float64 oracle by the rule; which backward runs is the caller's
    (environment) choice."""
    from flashmoe_science import flash_attention_science
    from flashmoe_science.ops.attention import reference

    q = torch.randn(2, 8, 1000, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(2, 2, 1000, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = flash_attention_science(*leaves, causal=causal)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    check_grads(grads, *reference_grads(q, k, v, do, causal, 1.0 / math.sqrt(128), reference.attention_ref))
