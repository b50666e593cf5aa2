"""Attention backward launchers (contract placeholder: delegates to the reference until the
Triton kernels land in ``kernels/bwd.py``)."""

from __future__ import annotations

from . import reference


def attention_bwd(do, q, k, v, out, lse, causal: bool, scale: float):
    """Dense backward: do/q/out (B, H, S_q, D), k/v (B, H_kv, S_k, D), lse float32 (B, H, S_q)."""
    return reference.attention_bwd_ref(do, q, k, v, out, lse, causal, scale)


def attention_varlen_bwd(
    do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal, scale
):
    """Varlen backward: packed (T, H, D) layouts, lse (H, T_q)."""
    return reference.attention_varlen_bwd_ref(
        do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, scale
    )
