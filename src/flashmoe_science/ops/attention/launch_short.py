"""Launchers of the short-sequence varlen kernels (``kernels/short.py``).

They serve packed *self*-attention (``cu_seqlens_q`` and ``cu_seqlens_k`` the same tensor)
whose longest sequence is at most ``MAX_SEQLEN_FWD`` (forward) / ``MAX_SEQLEN_BWD``
(backward) tokens: the composition transformer's
case (2-8 elements per formula), where the general varlen kernel spends a 64-row program
on every (sequence, head). ``FLASHMOE_ATTN_SHORT=0`` turns the path off.

Block sizes: BLOCK_M = 64 token rows per program and a key window of BLOCK_N =
next_pow2(64 + 2 * max_seqlen - 2) columns (128 up to max_seqlen 33). No host sync: the
per-token sequence index comes from a ``searchsorted`` on the device.
"""

from __future__ import annotations

import os

import torch
import triton

from ..._backend import interpreter_enabled
from .kernels import short

# Longest sequence served, per direction (H200, bf16, 262k tokens, 4-8 heads of 32-64,
# benchmarks/attn_short_bench.py): the forward beats the general kernel up to L = 16 (L 3:
# 7.8x, L 16: 1.5x) and loses at L = 32 (0.80x at 4 x 32); the backward wins through L = 32
# (L 32: 2.7x).
MAX_SEQLEN_FWD = 16
MAX_SEQLEN_BWD = 32
MAX_SEQLEN = MAX_SEQLEN_BWD  # the window (BLOCK_N) the kernels are built for
_BLOCK_M = 64
_LOG2E = 1.4426950408889634


def enabled() -> bool:
    return os.environ.get("FLASHMOE_ATTN_SHORT", "1") != "0"


def applies(
    q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *, backward=False, force=False
) -> bool:
    """True when the short kernels serve this call: same packing for q and k (one tensor,
    compared by storage, never by value: no host sync), every sequence <= MAX_SEQLEN_FWD
    (forward) or MAX_SEQLEN_BWD (backward), head dim <= 128. ``force`` (tests, benchmarks)
    allows up to MAX_SEQLEN and ignores FLASHMOE_ATTN_SHORT."""
    longest = MAX_SEQLEN if force else (MAX_SEQLEN_BWD if backward else MAX_SEQLEN_FWD)
    return (
        (force or enabled())
        and 0 < max_seqlen_q <= longest
        and max_seqlen_q == max_seqlen_k
        and q.shape[0] == k.shape[0]
        and q.shape[-1] <= 128
        and cu_seqlens_q.shape == cu_seqlens_k.shape
        and cu_seqlens_q.data_ptr() == cu_seqlens_k.data_ptr()
        and cu_seqlens_q.stride() == cu_seqlens_k.stride()
    )


def _segments(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int32 (T,): the sequence index of every token (empty sequences own none)."""
    tokens = torch.arange(total, dtype=torch.int32, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True, out_int32=True)


def _meta(q: torch.Tensor, k: torch.Tensor, max_seqlen: int, causal: bool) -> dict:
    d = q.shape[-1]
    return dict(
        GROUP=q.shape[1] // k.shape[1],
        HEAD_DIM=d,
        D_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=max(16, triton.next_power_of_2(_BLOCK_M + 2 * max_seqlen - 2)),
        CAUSAL=bool(causal),
        # Triton's interpreter gets bfloat16 arithmetic wrong: compute in float32 there.
        UPCAST=bool(interpreter_enabled() and not q.is_cuda and q.dtype == torch.bfloat16),
    )


def _warps(meta: dict) -> int:
    return 4 if meta["D_PAD"] <= 64 else 8


def varlen_fwd(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
    """q (T, H, D), k/v (T, H_kv, D) with last dim contiguous -> out (T, H, D), lse (H, T)."""
    t, h, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((h, t), dtype=torch.float32, device=q.device)
    meta = _meta(q, k, max_seqlen, causal)
    seg = _segments(cu_seqlens, t)
    grid = (triton.cdiv(t, _BLOCK_M), h)
    short.short_fwd_kernel[grid](
        q, k, v, out, lse, seg,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        t, max_seqlen, scale * _LOG2E,
        **meta, num_warps=_warps(meta), num_stages=1,
    )  # fmt: skip
    return out, lse


def varlen_bwd(do, q, k, v, out, lse, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
    """Gradients (dq, dk, dv) with the shapes, dtypes and strides of q, k, v."""
    t, h_kv = q.shape[0], k.shape[1]
    # Gradients take the inputs' strides (what the op's fake implementation promises).
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    meta = _meta(q, k, max_seqlen, causal)
    seg = _segments(cu_seqlens, t)
    grid = (triton.cdiv(t, _BLOCK_M), h_kv)
    short.short_bwd_kernel[grid](
        q, k, v, out, do, lse, seg, dq, dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0),
        t, max_seqlen, scale,
        **meta, num_warps=_warps(meta), num_stages=1,
    )  # fmt: skip
    return dq, dk, dv
