"""Combine: y[t] = sum over k of the K per-slot rows of token t (rows (T*K, H), slot t*K + k),
float32 accumulation, one rounding to y's dtype. What ``rows.view(T, K, H).sum(1)`` computes,
as one launch with wide vector loads (K contiguous rows per token)."""

import triton
import triton.language as tl


@triton.jit
def ksum_kernel(rows_ptr, out_ptr, T, H, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (ts < T)[:, None] & (hs < H)[None, :]
    first = ts.to(tl.int64) * TOP_K * H
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(rows_ptr + (first + k * H)[:, None] + hs[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + ts.to(tl.int64)[:, None] * H + hs[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask
    )
