"""Triton kernels for the attention backward (FlashAttention-2 equations).

Shape letters: B batch, H query heads, H_kv key/value heads (GROUP = H // H_kv query heads
share one KV head), S_q / S_k sequence lengths, D head dim (BLOCK_D = next power of two).

Three kernels, launched by ``launch_bwd``:

* ``_bwd_preprocess``: delta = rowsum(dO * O) in float32, one value per query row.
* ``_bwd_dkdv``: one program per (KV block, b, kv head). K and V stay on chip; the program
  walks the Q blocks of every query head of its group (GQA: dK/dV summed in registers, the
  repeated K/V is never materialised) and accumulates dV = P^T dO and dK = dS^T Q.
  With ``DQ_ATOMIC`` it also adds dS K into a float32 dQ buffer with atomics (one pass,
  five GEMMs, run-to-run order not fixed).
* ``_bwd_dq``: one program per (Q block, b, query head); recomputes P and dP and
  accumulates dQ = dS K in registers (seven GEMMs in total with ``_bwd_dkdv``, bit-identical
  run to run: the deterministic path).

Numerics: P is recomputed from the forward's lse (natural log) converted to the log2
domain, so P = exp2(S * scale * log2(e) - lse * log2(e)). A row with lse = -inf saw no key;
it is given lse2 = +inf so that P = 0 and it contributes nothing. Causal masking is
bottom-right aligned (query i sees key j <= i + S_k - S_q); fully hidden blocks are never
visited. In ``_bwd_dq`` only the blocks that straddle the diagonal pay for the mask; in
``_bwd_dkdv`` every visited block applies it (one loop instance: a second, unmasked one
spilled registers at D=128 in the sm_90 compile, see docs/attention_bwd.md).

Varlen (``IS_VARLEN``): the batch index selects ``cu_seqlens`` offsets; tensors are packed
(T, H, D) and are passed with a batch stride of 0. Programs past the end of a sequence
return at once, so the grid can be sized with ``max_seqlen`` and no host sync.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _seq_bounds(cu_ptr, b, seqlen, IS_VARLEN: tl.constexpr):
    """(start row in the packed tensor, length) of sequence ``b``."""
    if IS_VARLEN:
        start = tl.load(cu_ptr + b)
        end = tl.load(cu_ptr + b + 1)
        return start, end - start
    else:
        return 0, seqlen


@triton.jit
def _row_offset(start, stride, IS_VARLEN: tl.constexpr):
    """Element offset of a sequence's first row (always 0 for the dense layout)."""
    if IS_VARLEN:
        return start.to(tl.int64) * stride
    else:
        return 0


@triton.jit
def _load_rows(ptrs, offs_r, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero outside the sequence and past the head dim."""
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
    else:
        return tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_rows(ptrs, val, offs_r, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, val, mask=offs_r[:, None] < n_rows)
    else:
        tl.store(ptrs, val, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _load_lse2(lse_ptrs, offs_m, seqlen_q):
    """lse (natural log) -> log2 domain; rows outside the sequence or that saw no key -> +inf
    so that exp2(s - lse2) = 0 there."""
    lse = tl.load(lse_ptrs, mask=offs_m < seqlen_q, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _pid_bh():
    """The (batch, head) index of this program: grid axes 1 and 2 together (``launch_bwd``
    splits batch * heads over both when it exceeds the 65,535 limit of a y axis; programs
    past ``NUM_BH`` exit)."""
    return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)


@triton.jit
def _rowsum_do_o(O, DO, b, h, rows, offs_m, seqlen_q, stride_ob, stride_oh, stride_os, stride_dob, stride_doh,
                 stride_dos, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """delta = rowsum(dO * O) in float32 over ``rows`` (int64 sequence rows) of head (b, h);
    rows at or past ``seqlen_q`` (``offs_m``) and columns past HEAD_DIM read as zero."""
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b.to(tl.int64) * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
                   offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D)  # fmt: skip
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                    offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D)  # fmt: skip
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)


@triton.jit(do_not_specialize=["seqlen_q", "S_PAD", "H", "NUM_BH"])
def _bwd_preprocess_padded(
    O, DO, LSE, DELTA, LSE2, DQ_ACC,
    stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos, stride_lb, stride_lh, stride_ls,
    seqlen_q, S_PAD, H, NUM_BH,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_DQ: tl.constexpr,
):  # fmt: skip
    """For the Gluon backward (dense; BLOCK_D: HEAD_DIM rounded up to a power of two):
    delta = rowsum(dO * O) and lse2 = lse * log2(e) (+inf for rows that saw no key) into
    contiguous float32 (B, H, S_PAD) buffers, every row written: delta = 0 and lse2 = +inf past
    S_q (P = 0 there).

    With ``ZERO_DQ`` it also zeroes the program's rows of the contiguous float32
    (B, H, S_q, HEAD_DIM) buffer ``DQ_ACC`` the backward kernel reduces dQ into (one launch
    instead of a separate fill)."""
    pid_m = tl.program_id(0)
    pid_bh = _pid_bh()
    if pid_bh >= NUM_BH:
        return
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)  # int64: h * stride_h passes 2**31 on long sequences
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row = offs_m.to(tl.int64)
    delta = _rowsum_do_o(O, DO, b, h, row, offs_m, seqlen_q, stride_ob, stride_oh, stride_os, stride_dob, stride_doh,
                         stride_dos, HEAD_DIM, BLOCK_D)  # fmt: skip
    lse2 = _load_lse2(LSE + b.to(tl.int64) * stride_lb + h * stride_lh + row * stride_ls, offs_m, seqlen_q)
    out = pid_bh.to(tl.int64) * S_PAD + row
    tl.store(DELTA + out, delta)
    tl.store(LSE2 + out, lse2)
    if ZERO_DQ:
        offs_d = tl.arange(0, BLOCK_D)
        acc = DQ_ACC + (pid_bh.to(tl.int64) * seqlen_q + row[:, None]) * HEAD_DIM + offs_d[None, :]
        _store_rows(
            acc, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D
        )


@triton.jit(do_not_specialize=["seqlen_q", "H", "NUM_BH"])
def _bwd_preprocess(
    O,
    DO,
    DELTA,
    cu_seqlens_q,
    stride_ob,
    stride_oh,
    stride_os,
    stride_dob,
    stride_doh,
    stride_dos,
    stride_deltab,
    stride_deltah,
    stride_deltas,
    seqlen_q,
    H,
    NUM_BH,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] (float32)."""
    pid_m = tl.program_id(0)
    pid_bh = _pid_bh()
    if pid_bh >= NUM_BH:
        return
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)  # int64: h * stride_h passes 2**31 on long sequences
    q_start, seqlen_q = _seq_bounds(cu_seqlens_q, b, seqlen_q, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row0 = (q_start + offs_m).to(tl.int64)
    delta = _rowsum_do_o(O, DO, b, h, row0, offs_m, seqlen_q, stride_ob, stride_oh, stride_os, stride_dob,
                         stride_doh, stride_dos, HEAD_DIM, BLOCK_D)  # fmt: skip
    tl.store(
        DELTA + b.to(tl.int64) * stride_deltab + h * stride_deltah + row0 * stride_deltas,
        delta,
        mask=offs_m < seqlen_q,
    )


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    lse_ptrs,
    delta_ptrs,
    dq_ptrs,
    stride_qs,
    stride_dos,
    stride_ls,
    stride_deltas,
    stride_dqs,
    offs_n,
    offs_d,
    lo,
    hi,
    seqlen_q,
    seqlen_k,
    diag_off,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASK: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
):
    """Accumulate dK, dV of one KV block over query rows [lo, hi) of one head.

    ``*_ptrs`` point at row 0 of the sequence; rows are reached with ``offs_m * stride``.
    Computed transposed (key rows x query columns) so that dK/dV come out row-major.
    """
    offs_mb = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_mb
        rows = offs_m.to(tl.int64)
        q = _load_rows(q_ptrs + rows[:, None] * stride_qs, offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D)
        lse2 = _load_lse2(lse_ptrs + rows * stride_ls, offs_m, seqlen_q)
        qk_t = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(qk_t * qk_scale_log2 - lse2[None, :])
        if MASK:
            # causal, bottom-right: key j visible to row i iff j <= i + S_k - S_q
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag_off, p_t, 0.0)
        if DQ_ATOMIC:
            # keys past S_k have k = 0 but P may be huge (exp2(-lse2)); keep them out of dQ
            p_t = tl.where(offs_n[:, None] < seqlen_k, p_t, 0.0)
        do = _load_rows(do_ptrs + rows[:, None] * stride_dos, offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D)
        dv += tl.dot(p_t.to(do.dtype), do)
        delta = tl.load(delta_ptrs + rows * stride_deltas, mask=offs_m < seqlen_q, other=0.0)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q)
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(ds_t), k)  # unscaled; the launcher multiplies by scale
            dq_mask = offs_m[:, None] < seqlen_q
            if BLOCK_D != HEAD_DIM:
                dq_mask = dq_mask & (offs_d[None, :] < HEAD_DIM)
            tl.atomic_add(
                dq_ptrs + rows[:, None] * stride_dqs + offs_d[None, :], dq, mask=dq_mask, sem="relaxed"
            )
    return dk, dv


# Sequence lengths and head counts vary per call: not specialised, so one compiled kernel
# serves every shape (strides stay specialised: their divisibility enables wide loads).
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "H_KV", "GROUP", "NUM_BH"])
def _bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DQ_ACC,
    cu_seqlens_q,
    cu_seqlens_k,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_dob,
    stride_doh,
    stride_dos,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_deltab,
    stride_deltah,
    stride_deltas,
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    stride_dqb,
    stride_dqh,
    stride_dqs,
    seqlen_q,
    seqlen_k,
    H_KV,
    GROUP,
    scale,
    NUM_BH,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    pid_n = tl.program_id(0)
    pid_bh = _pid_bh()
    if pid_bh >= NUM_BH:
        return
    b = pid_bh // H_KV
    hk = (pid_bh % H_KV).to(tl.int64)  # int64 head offsets (h * stride_h passes 2**31)
    q_start, seqlen_q = _seq_bounds(cu_seqlens_q, b, seqlen_q, IS_VARLEN)
    k_start, seqlen_k = _seq_bounds(cu_seqlens_k, b, seqlen_k, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    krows = (k_start + offs_n).to(tl.int64)
    k = _load_rows(
        K + b64 * stride_kb + hk * stride_kh + krows[:, None] * stride_ks + offs_d[None, :],
        offs_n,
        seqlen_k,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
    )
    v = _load_rows(
        V + b64 * stride_vb + hk * stride_vh + krows[:, None] * stride_vs + offs_d[None, :],
        offs_n,
        seqlen_k,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale_log2 = scale * LOG2E
    diag_off = seqlen_k - seqlen_q
    if CAUSAL:
        # Query blocks above the first row that sees key start_n are fully hidden: skipped.
        m_lo = (tl.maximum(start_n - diag_off, 0) // BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
    for g in range(GROUP):
        hq = hk * GROUP + g
        q_ptrs = (
            Q
            + b64 * stride_qb
            + hq * stride_qh
            + _row_offset(q_start, stride_qs, IS_VARLEN)
            + offs_d[None, :]
        )
        do_ptrs = (
            DO
            + b64 * stride_dob
            + hq * stride_doh
            + _row_offset(q_start, stride_dos, IS_VARLEN)
            + offs_d[None, :]
        )
        lse_ptrs = LSE + b64 * stride_lb + hq * stride_lh + _row_offset(q_start, stride_ls, IS_VARLEN)
        delta_ptrs = (
            DELTA + b64 * stride_deltab + hq * stride_deltah + _row_offset(q_start, stride_deltas, IS_VARLEN)
        )
        dq_ptrs = DQ_ACC + b64 * stride_dqb + hq * stride_dqh + _row_offset(q_start, stride_dqs, IS_VARLEN)
        # One loop instance (the mask is applied to every block when CAUSAL): a second,
        # unmasked instance doubled the live ranges and spilled registers at D=128.
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, dq_ptrs,
            stride_qs, stride_dos, stride_ls, stride_deltas, stride_dqs,
            offs_n, offs_d, m_lo, seqlen_q, seqlen_q, seqlen_k, diag_off, qk_scale_log2,
            HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, DQ_ATOMIC,
        )  # fmt: skip
    dk = dk * scale
    _store_rows(
        DK + b64 * stride_dkb + hk * stride_dkh + krows[:, None] * stride_dks + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        offs_n,
        seqlen_k,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
    )
    _store_rows(
        DV + b64 * stride_dvb + hk * stride_dvh + krows[:, None] * stride_dvs + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        offs_n,
        seqlen_k,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
    )


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    k_ptrs,
    v_ptrs,
    stride_ks,
    stride_vs,
    offs_m,
    offs_d,
    lo,
    hi,
    seqlen_k,
    diag_off,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK: tl.constexpr,
):
    """Accumulate dQ of one Q block over key rows [lo, hi)."""
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        rows = offs_n.to(tl.int64)
        k = _load_rows(k_ptrs + rows[:, None] * stride_ks, offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_ptrs + rows[:, None] * stride_vs, offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D)
        qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk * qk_scale_log2 - lse2[:, None])
        if MASK:
            if CAUSAL:  # also hides keys >= S_k for every row inside the sequence
                p = tl.where(offs_n[None, :] <= offs_m[:, None] + diag_off, p, 0.0)
            else:  # the tail block past S_k
                p = tl.where(offs_n[None, :] < seqlen_k, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq += tl.dot(ds, k)
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "H", "GROUP", "NUM_BH"])
def _bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    cu_seqlens_q,
    cu_seqlens_k,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_dob,
    stride_doh,
    stride_dos,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_deltab,
    stride_deltah,
    stride_deltas,
    stride_dqb,
    stride_dqh,
    stride_dqs,
    seqlen_q,
    seqlen_k,
    H,
    GROUP,
    scale,
    NUM_BH,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    pid_m = tl.program_id(0)
    pid_bh = _pid_bh()
    if pid_bh >= NUM_BH:
        return
    b = pid_bh // H
    hq = (pid_bh % H).to(tl.int64)  # int64 head offsets (h * stride_h passes 2**31)
    hk = hq // GROUP
    q_start, seqlen_q = _seq_bounds(cu_seqlens_q, b, seqlen_q, IS_VARLEN)
    k_start, seqlen_k = _seq_bounds(cu_seqlens_k, b, seqlen_k, IS_VARLEN)
    n_mblocks = tl.cdiv(seqlen_q, BLOCK_M)
    if pid_m >= n_mblocks:
        return
    if CAUSAL:
        pid_m = n_mblocks - 1 - pid_m  # the longest rows (most keys) start first
    start_m = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qrows = (q_start + offs_m).to(tl.int64)
    q = _load_rows(
        Q + b64 * stride_qb + hq * stride_qh + qrows[:, None] * stride_qs + offs_d[None, :],
        offs_m,
        seqlen_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
    )
    do = _load_rows(
        DO + b64 * stride_dob + hq * stride_doh + qrows[:, None] * stride_dos + offs_d[None, :],
        offs_m,
        seqlen_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
    )
    lse2 = _load_lse2(LSE + b64 * stride_lb + hq * stride_lh + qrows * stride_ls, offs_m, seqlen_q)
    delta = tl.load(
        DELTA + b64 * stride_deltab + hq * stride_deltah + qrows * stride_deltas,
        mask=offs_m < seqlen_q,
        other=0.0,
    )
    k_ptrs = (
        K + b64 * stride_kb + hk * stride_kh + _row_offset(k_start, stride_ks, IS_VARLEN) + offs_d[None, :]
    )
    v_ptrs = (
        V + b64 * stride_vb + hk * stride_vh + _row_offset(k_start, stride_vs, IS_VARLEN) + offs_d[None, :]
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale_log2 = scale * LOG2E
    diag_off = seqlen_k - seqlen_q
    if CAUSAL:
        # Keys [0, n_full) are visible to every row of the block; [n_full, hi) straddle the
        # diagonal; keys >= hi are hidden from every row.
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag_off, 0), seqlen_k)
        n_full = tl.minimum((tl.maximum(start_m + diag_off + 1, 0) // BLOCK_N) * BLOCK_N, hi)
    else:
        hi = seqlen_k
        n_full = (seqlen_k // BLOCK_N) * BLOCK_N
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d,
        0, n_full, seqlen_k, diag_off, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d,
        n_full, hi, seqlen_k, diag_off, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True,
    )  # fmt: skip
    dq = dq * scale
    _store_rows(
        DQ + b64 * stride_dqb + hq * stride_dqh + qrows[:, None] * stride_dqs + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        offs_m,
        seqlen_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
    )
