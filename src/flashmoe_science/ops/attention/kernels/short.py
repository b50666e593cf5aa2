"""Attention kernels for packed *short* sequences (self-attention, every sequence <= MAXL).

Shape letters: T packed tokens, H query heads, H_kv key/value heads (GROUP = H // H_kv),
D head dim (D_PAD: a power of two >= D), MAXL the longest sequence.

The general varlen kernel gives every (sequence, head) at least one BLOCK_M-row program:
for compositions of 2-8 elements that is 3-30 useful rows in 64, and one program per
sequence. Here a program takes BLOCK_M consecutive *tokens*, whichever sequences they belong
to, and the window of keys those tokens can see: a token at row r belongs to a sequence that
starts after ``r - MAXL`` and ends before ``r + MAXL``, so the keys of the rows
``[r0, r0 + BLOCK_M)`` lie in ``[r0 - MAXL + 1, r0 + BLOCK_M + MAXL - 1)``, which fits in
BLOCK_N >= BLOCK_M + 2 * MAXL - 2 columns. The attention inside the tile is block-diagonal:
row i sees key j iff ``seg[i] == seg[j]`` (and ``j <= i`` with ``CAUSAL``; query and key
sequences are the same, so bottom-right alignment is the diagonal). One tile holds every key
a row can see, so the softmax is exact in one pass (no online rescaling).

``SEG`` is the int32 sequence index of every token (empty sequences own no token). Every
token sees at least itself, so no row is empty: lse is finite for every row.

Backward (``short_bwd_kernel``): a program owns BLOCK_M tokens and one KV head. It writes
dQ of its tokens for each query head of the group (scores against the key window) and dK,
dV of its tokens summed over the group (scores of the query window against its keys), so
no two programs write the same element: no atomics, deterministic. ``delta = rowsum(dO*O)``
is computed in the kernel from O and dO (no preprocessing launch).

``UPCAST`` computes in float32 (Triton's interpreter gets bfloat16 arithmetic wrong).

The two kernels repeat their block/window prologue on purpose: moving it into a shared
``@triton.jit`` helper (which also moved the sequence-id loads before the Q/K/V loads) made
the forward ~10% slower on the H200 (H4 D32 L3: 0.196 vs 0.176 ms, same-day runs, the
general kernel unchanged at 1.38 ms), so it was reverted.
"""

from __future__ import annotations

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tile(ptr, rows, row_mask, stride_t, head_off, offs_d, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """(len(rows), D_PAD) tile of one head; rows outside ``row_mask`` and columns >= D are 0."""
    p = ptr + rows.to(tl.int64)[:, None] * stride_t + head_off + offs_d[None, :]
    t = tl.load(p, mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def short_fwd_kernel(
    Q, K, V, O, LSE, SEG,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lh,
    T, MAXL, sm_scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    r0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    hk = h // GROUP
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = r0 - MAXL + 1 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    rmask = rows < T
    cmask = (cols >= 0) & (cols < T)

    q = _tile(Q, rows, rmask, stride_qt, h * stride_qh, offs_d, HEAD_DIM, UPCAST)
    k = _tile(K, cols, cmask, stride_kt, hk * stride_kh, offs_d, HEAD_DIM, UPCAST)
    v = _tile(V, cols, cmask, stride_vt, hk * stride_vh, offs_d, HEAD_DIM, UPCAST)
    seg_r = tl.load(SEG + rows, mask=rmask, other=-1)
    seg_c = tl.load(SEG + cols, mask=cmask, other=-2)

    s = tl.dot(q, tl.trans(k)) * sm_scale_log2
    keep = seg_r[:, None] == seg_c[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    s = tl.where(keep, s, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(rmask, m, 0.0)  # rows past T see nothing; keep them finite
    p = tl.where(keep, tl.exp2(s - m[:, None]), 0.0)
    l_sum = tl.sum(p, 1)
    l_safe = tl.where(l_sum > 0, l_sum, 1.0)
    acc = tl.dot(p.to(v.dtype), v)
    out = acc / l_safe[:, None]
    o_ptrs = O + rows.to(tl.int64)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rmask[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = (m + tl.log2(l_safe)) / _LOG2E
    tl.store(LSE + h * stride_lh + rows, lse, mask=rmask)


@triton.jit
def short_bwd_kernel(
    Q, K, V, O, DO, LSE, SEG, DQ, DK, DV,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_lh,
    T, MAXL, sm_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    r0 = tl.program_id(0) * BLOCK_M
    hk = tl.program_id(1)
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = r0 - MAXL + 1 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    rmask = rows < T
    cmask = (cols >= 0) & (cols < T)
    seg_r = tl.load(SEG + rows, mask=rmask, other=-1)
    seg_c = tl.load(SEG + cols, mask=cmask, other=-2)
    # keep_rc[i, j]: block row i (query) sees window column j (key);
    # keep_cr[j, i]: window row j (query) sees block column i (key).
    keep_rc = seg_r[:, None] == seg_c[None, :]
    keep_cr = seg_c[:, None] == seg_r[None, :]
    if CAUSAL:
        keep_rc = keep_rc & (cols[None, :] <= rows[:, None])
        keep_cr = keep_cr & (rows[None, :] <= cols[:, None])
    qk_scale = sm_scale * _LOG2E
    dmask = offs_d[None, :] < HEAD_DIM

    k_win = _tile(K, cols, cmask, stride_kt, hk * stride_kh, offs_d, HEAD_DIM, UPCAST)
    v_win = _tile(V, cols, cmask, stride_vt, hk * stride_vh, offs_d, HEAD_DIM, UPCAST)
    k_blk = _tile(K, rows, rmask, stride_kt, hk * stride_kh, offs_d, HEAD_DIM, UPCAST)
    v_blk = _tile(V, rows, rmask, stride_vt, hk * stride_vh, offs_d, HEAD_DIM, UPCAST)
    dk = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    dv = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        # dQ of the block's rows against the key window.
        q_blk = _tile(Q, rows, rmask, stride_qt, h * stride_qh, offs_d, HEAD_DIM, UPCAST)
        do_blk = _tile(DO, rows, rmask, stride_dot, h * stride_doh, offs_d, HEAD_DIM, UPCAST)
        o_blk = _tile(O, rows, rmask, stride_ot, h * stride_oh, offs_d, HEAD_DIM, UPCAST)
        lse_blk = tl.load(LSE + h * stride_lh + rows, mask=rmask, other=0.0) * _LOG2E
        delta_blk = tl.sum(do_blk.to(tl.float32) * o_blk.to(tl.float32), 1)
        s = tl.dot(q_blk, tl.trans(k_win)) * qk_scale
        p = tl.where(keep_rc, tl.exp2(s - lse_blk[:, None]), 0.0)
        dp = tl.dot(do_blk, tl.trans(v_win))
        ds = p * (dp - delta_blk[:, None])
        dq = tl.dot(ds.to(k_win.dtype), k_win) * sm_scale
        dq_ptrs = DQ + rows.to(tl.int64)[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :]
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rmask[:, None] & dmask)

        # dK, dV of the block's keys from the query window.
        q_w = _tile(Q, cols, cmask, stride_qt, h * stride_qh, offs_d, HEAD_DIM, UPCAST)
        do_w = _tile(DO, cols, cmask, stride_dot, h * stride_doh, offs_d, HEAD_DIM, UPCAST)
        o_w = _tile(O, cols, cmask, stride_ot, h * stride_oh, offs_d, HEAD_DIM, UPCAST)
        lse_w = tl.load(LSE + h * stride_lh + cols, mask=cmask, other=0.0) * _LOG2E
        delta_w = tl.sum(do_w.to(tl.float32) * o_w.to(tl.float32), 1)
        s2 = tl.dot(q_w, tl.trans(k_blk)) * qk_scale
        p2 = tl.where(keep_cr, tl.exp2(s2 - lse_w[:, None]), 0.0)
        dv += tl.dot(tl.trans(p2.to(do_w.dtype)), do_w)
        dp2 = tl.dot(do_w, tl.trans(v_blk))
        ds2 = p2 * (dp2 - delta_w[:, None])
        dk += tl.dot(tl.trans(ds2.to(q_w.dtype)), q_w)
    dk_ptrs = DK + rows.to(tl.int64)[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :]
    dv_ptrs = DV + rows.to(tl.int64)[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=rmask[:, None] & dmask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=rmask[:, None] & dmask)
