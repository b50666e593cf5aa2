"""Attention forward kernel (FlashAttention-2 style), dense and varlen in one kernel.

Shape letters: B batch, H query heads, H_kv key/value heads (GROUP = H // H_kv), S_q / S_k
sequence lengths, D head dim (D_PAD: D rounded up to a power of two), T packed tokens.

One program computes BLOCK_M query rows of one (batch, head) and loops over the key/value
blocks that those rows can see, keeping an online softmax in float32. Scores are scaled by
``softmax_scale * log2(e)`` and exponentiated with ``exp2``. With ``CAUSAL`` (bottom-right
aligned: row i sees key j <= i + S_k - S_q) the key blocks split into

    [0, n_full)        every row of the block sees every key: no mask (the fast loop)
    [n_full, n_end)    the diagonal blocks and the ragged last key block: masked

and blocks no row can see are never visited. Without ``CAUSAL`` only a ragged last key block
(S_k not a multiple of BLOCK_N) is masked. Rows that see no key produce out = 0, lse = -inf.

``USE_TMA`` picks how tiles are loaded (Hopper's bulk tensor copy engine, TMA, or not):
  0  masked pointer loads (any layout);
  1  tensor descriptors built per program over this (batch, head)'s rows: any strides that
     TMA accepts, varlen too; out-of-range rows and padded head-dim columns are zero-filled;
  2  descriptors built once on the host over a 2-D row view of the whole tensor (needs the
     batch and head strides to be multiples of the row stride, e.g. contiguous (B, H, S, D));
     rows past this head's end belong to the next head: masked like a ragged key block for
     K/V, never stored for Q (the output uses masked pointer stores). ``UPCAST`` computes in float32 (Triton's interpreter
gets bfloat16 arithmetic wrong). Grids and configs live in ``launch``; nothing here knows them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_kv(
    desc,
    ptrs,
    row0,
    start_n,
    offs_n,
    offs_d,
    seqlen_k,
    stride_s,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MASK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Load a (BLOCK_N, D_PAD) tile of K or V starting at key row ``start_n`` (descriptor row
    ``row0 + start_n``)."""
    if USE_TMA > 0:
        tile = desc.load([row0 + start_n, 0])
    else:
        p = ptrs + tl.cast(start_n, tl.int64) * stride_s
        if MASK_N:
            mask = (start_n + offs_n)[:, None] < seqlen_k
            if HEAD_DIM != HEAD_DIM_PAD:
                mask = mask & (offs_d[None, :] < HEAD_DIM)
            tile = tl.load(p, mask=mask, other=0.0)
        elif HEAD_DIM != HEAD_DIM_PAD:
            tile = tl.load(p, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            tile = tl.load(p)
    return tile


@triton.jit
def _softmax_update(
    acc,
    l_i,
    m_i,
    qk,
    v,
    start_n,
    offs_m,
    offs_n,
    seqlen_k,
    diag,
    qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One online-softmax step: fold the (BLOCK_M, BLOCK_N) scores ``qk`` and the V tile into
    (acc, l_i, m_i). Only ``MASKED`` steps pay for the mask and the all-masked-row guard."""
    if MASKED:
        cols = start_n + offs_n
        keep = cols[None, :] < seqlen_k
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
        s = tl.where(keep, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet has m_new = -inf; shift by 0 instead so that
        # exp2(-inf - -inf) = NaN never happens (p and alpha become exactly 0).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(p, v, acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    # The row sum after the PV product is issued: it runs while the (async) MMA does.
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_blocks(
    acc, l_i, m_i, q, k_desc, v_desc, k_ptrs, v_ptrs, k_row0, v_row0, lo, hi,
    offs_m, offs_n, offs_d, seqlen_k, diag, qk_scale, stride_ks, stride_vs,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Visit key blocks [lo, hi) (multiples of BLOCK_N)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_kv(k_desc, k_ptrs, k_row0, start_n, offs_n, offs_d, seqlen_k, stride_ks,
                     HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA)  # fmt: skip
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        v = _load_kv(v_desc, v_ptrs, v_row0, start_n, offs_n, offs_d, seqlen_k, stride_vs,
                     HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA)  # fmt: skip
        if USE_TMA == 2 and MASKED:
            # Rows past this head's keys come from a neighbour (or, for a strided view, from
            # memory that may hold NaN); their p is 0, but 0 * NaN is not: zero them.
            v = tl.where(((start_n + offs_n) < seqlen_k)[:, None], v, 0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, qk, v, start_n, offs_m, offs_n, seqlen_k, diag,
                                        qk_scale, MASKED, CAUSAL, UPCAST)  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, Lse, Q_desc, K_desc, V_desc, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    H, GROUP, seqlen_q, seqlen_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    SEQ_BUCKET: tl.constexpr,
):  # fmt: skip
    """Grid: (cdiv(S_q, BLOCK_M) * B * H,), query blocks fastest so that the programs of one
    head run together and share its K/V in L2 (a 1-D grid: B * H may exceed 65535 for varlen
    batches of many small structures). Dense: S_q/S_k are the arguments and the cu_seqlens
    pointers are unused. Varlen: ``seqlen_q`` is max S_q, sequence b is rows cu[b]:cu[b+1] and
    the batch strides are 0 (the token offset carries the position). ``*_desc`` are host
    descriptors with USE_TMA == 2, else unused."""
    tl.static_assert(HEAD_DIM <= HEAD_DIM_PAD)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)
    # SEQ_BUCKET only keys the autotuner (configs per sequence-length class).
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hk = off_h // GROUP  # GQA/MQA: the K/V head is indexed, never repeated

    q_off = off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_off = off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_off = off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    o_off = off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    lse_off = off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh
    if VARLEN:
        q_start = tl.load(cu_seqlens_q + off_b)
        seqlen_q = tl.load(cu_seqlens_q + off_b + 1) - q_start
        k_start = tl.load(cu_seqlens_k + off_b)
        seqlen_k = tl.load(cu_seqlens_k + off_b + 1) - k_start
        q_off += q_start.to(tl.int64) * stride_qs
        k_off += k_start.to(tl.int64) * stride_ks
        v_off += k_start.to(tl.int64) * stride_vs
        o_off += q_start.to(tl.int64) * stride_os
        lse_off += q_start.to(tl.int64)

    if CAUSAL:
        # The largest query blocks have the most keys: launch them first.
        start_m = num_m - 1 - pid_m
    else:
        start_m = pid_m
    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k_ptrs = K
    v_ptrs = V
    k_row0 = 0
    v_row0 = 0
    if USE_TMA == 2:
        # Row index of this head's first row in the 2-D row view.
        k_row0 = (k_off // stride_ks).to(tl.int32)
        v_row0 = (v_off // stride_vs).to(tl.int32)
        k_desc = K_desc
        v_desc = V_desc
        q = Q_desc.load([(q_off // stride_qs).to(tl.int32) + m0, 0])
    elif USE_TMA == 1:
        q_desc = tl.make_tensor_descriptor(Q + q_off, shape=[seqlen_q, HEAD_DIM], strides=[stride_qs, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM_PAD])  # fmt: skip
        k_desc = tl.make_tensor_descriptor(K + k_off, shape=[seqlen_k, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM_PAD])  # fmt: skip
        v_desc = tl.make_tensor_descriptor(V + v_off, shape=[seqlen_k, HEAD_DIM], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM_PAD])  # fmt: skip
        q = q_desc.load([m0, 0])
    else:
        k_desc = K
        v_desc = V
        q_mask = offs_m[:, None] < seqlen_q
        if HEAD_DIM != HEAD_DIM_PAD:
            q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + q_off + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :], mask=q_mask,
                    other=0.0)  # fmt: skip
        k_ptrs = K + k_off + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = V + v_off + offs_n[:, None] * stride_vs + offs_d[None, :]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # Key-block ranges. diag = S_k - S_q: row i sees keys j <= i + diag.
    diag = seqlen_k - seqlen_q
    n_full_k = (seqlen_k // BLOCK_N) * BLOCK_N  # blocks with no ragged tail
    if CAUSAL:
        # Every row of this block sees key j <= m0 + diag; blocks ending there are unmasked.
        n_free = tl.maximum(m0 + diag + 1, 0)
        n_unmasked = tl.minimum((n_free // BLOCK_N) * BLOCK_N, n_full_k)
        # The last row of the block sees keys < m0 + BLOCK_M + diag.
        n_end = tl.minimum(tl.maximum(m0 + BLOCK_M + diag, 0), seqlen_k)
    else:
        n_unmasked = n_full_k
        n_end = seqlen_k
    n_end = tl.maximum(n_end, n_unmasked)

    acc, l_i, m_i = _attn_fwd_blocks(
        acc, l_i, m_i, q, k_desc, v_desc, k_ptrs, v_ptrs, k_row0, v_row0, 0, n_unmasked,
        offs_m, offs_n, offs_d, seqlen_k, diag, qk_scale, stride_ks, stride_vs,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, False, CAUSAL, USE_TMA, UPCAST,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_blocks(
        acc, l_i, m_i, q, k_desc, v_desc, k_ptrs, v_ptrs, k_row0, v_row0, n_unmasked, n_end,
        offs_m, offs_n, offs_d, seqlen_k, diag, qk_scale, stride_ks, stride_vs,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True, CAUSAL, USE_TMA, UPCAST,
    )  # fmt: skip

    # Epilogue. Rows that saw no key have l_i = 0 and acc = 0: out 0, lse -inf.
    seen = l_i > 0.0
    inv_l = 1.0 / tl.where(seen, l_i, 1.0)
    out = acc * inv_l[:, None]
    LN2: tl.constexpr = 0.6931471805599453
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(Lse + lse_off + offs_m, lse, mask=offs_m < seqlen_q)
    out = out.to(Out.dtype.element_ty)
    if USE_TMA == 1:
        o_desc = tl.make_tensor_descriptor(Out + o_off, shape=[seqlen_q, HEAD_DIM], strides=[stride_os, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM_PAD])  # fmt: skip
        o_desc.store([m0, 0], out)
    else:
        o_mask = offs_m[:, None] < seqlen_q
        if HEAD_DIM != HEAD_DIM_PAD:
            o_mask = o_mask & (offs_d[None, :] < HEAD_DIM)
        tl.store(Out + o_off + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :], out, mask=o_mask)
