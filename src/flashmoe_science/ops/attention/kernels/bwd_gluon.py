"""Attention backward for Hopper (sm_90) in Gluon: warp-specialised, FlashAttention-3 style.

The default backward on Hopper for dense D 64 / 128 inputs, 80 / 96 / 112 run as 128 by the
launcher's 128-wide TMA boxes (``launch_bwd.attention_bwd``;
not in deterministic mode: dQ is summed in an order that varies run to run). Measured in
docs/attention_bwd.md.

Shape letters: B batch, H query heads, H_kv key/value heads (GROUP = H // H_kv), S_q / S_k
sequence lengths, D the kernel's head dim (64 or 128).

One program per (KV block of ``NUM_CONSUMERS * BLOCK_N`` key rows, batch, KV head):

  * the producer warp TMA-loads the program's K and V rows once (one ``BLOCK_N`` slice per
    consumer), then, for every query head of the KV head's group (GQA: dK/dV summed over the
    group, K/V never repeated) and every query block the KV block can see, the Q and dO tiles
    of ``BLOCK_M`` rows, with their rows of lse2 and delta, into a ring of ``NUM_STAGES``
    shared-memory slots (``q_ready`` / ``do_ready`` / ``empty`` mbarriers per slot; ``empty``
    counts one arrival per consumer);
  * ``NUM_CONSUMERS`` consumer warpgroups each own ``BLOCK_N`` (= 64, one wgmma M) key rows
    and read every Q/dO tile. Per tile, transposed so that dK/dV come out row-major:
        S^T  = K Q^T                     (wgmma, both operands in shared memory)
        dP^T = V dO^T                    (wgmma, issued before S^T is consumed)
        P^T  = exp2(S^T * scale * log2 e - lse2)   lse2 = lse * log2 e (+inf: no key / pad)
        dS^T = scale * P^T * (dP^T - delta)         -> shared memory (bf16/fp16)
        dV  += P^T dO                    (wgmma, P^T from registers)
        dK  += dS^T Q                    (wgmma, dS^T from the registers that computed it)
        dQ[:, cols of C] = sum over the program's consumers c' of dS_c' K_c'[:, cols of C]
    With ``A_REGS`` (D64) K and V are also A operands from registers, loaded once per program.
    The three products after dS^T are issued back to back (with ``DQ_LAG``, full attention and
    D64, the dQ product is the previous tile's: its dS^T slots are complete by then). With
    ``PINGPONG`` (D128 full attention) the consumers take turns issuing their products through
    ``turn`` mbarriers (consumer 0 first): a tile's S^T and dP^T (``PINGPONG`` 2), or those and
    then its dV, dK and dQ products (``PINGPONG`` 1), so the two consumers' exponentials and
    dS^T fall at different times and one's run while the other's products hold the tensor cores
    (FA3's forward ping-pong, applied to the backward). Every consumer needs every
    consumer's dS^T for its dQ columns (D / NUM_CONSUMERS of them): the dS^T slots are
    double-buffered by tile parity with ``ds_full`` / ``ds_empty`` mbarriers. A consumer's dQ
    tile (float32) is staged in shared memory and added into a zeroed float32 (B, H, S_q, D)
    buffer by a TMA reduce-add (``cp.reduce.async.bulk.tensor``, summed in L2): one reduction
    per (query tile, program's key block), a bulk transfer instead of per-element atomics; the launcher
    casts the buffer. A program starts its walk over a head's query blocks at a block rotated
    by its KV block index, so concurrent programs reduce into different rows;
  * the epilogue stores dK / dV by TMA, staged in the consumer's K / V buffers once every
    consumer has read them for the last time; rows past S_k are clipped by the descriptor.

lse2 and delta come from float32 (B, H, S_pad) buffers the launcher pads to a multiple of
128 rows (lse2 = +inf and delta = 0 there): rows past S_q and rows that saw no key
(lse = -inf) give P = 0. Causal masking is bottom-right aligned (row i sees key
j <= i + S_k - S_q, as in ``bwd.py``): query blocks the program cannot see are never loaded,
blocks fully visible to a consumer run without a mask, only the diagonal (and the ragged key
tail, where P could overflow on zero-filled K rows) pay for one.

Gluon has no CPU interpreter: ``tests/test_attention_gluon_bwd_compile.py`` compiles every
config for sm_90 on the CPU; ``tests/gpu/test_gpu_attention_bwd_gluon.py`` checks gradients on
a GPU. Grids and configs live in ``launch_bwd_gluon``.
"""

from __future__ import annotations

from triton._C.libtriton import ir as _ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin as _builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# The forward's ping-pong turns (``turn`` mbarriers, consumer 0 first).
from .fwd_gluon import _turn_pass, _turn_wait


@_builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """TMA reduce-add of a shared-memory tile into global memory (``cp.reduce.async.bulk.tensor``,
    float32 add in L2; rows past the descriptor's shape are clipped), committed to the bulk
    group that ``tma.store_wait`` waits on. Triton 3.6's Gluon exposes the op only through its
    builder (``tt.descriptor_reduce`` lowers to the same op)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(
        _ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle
    )


@gluon.jit
def _program(H_KV, HEAD_CHUNK, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr):  # fmt: skip
    """(b, h_kv, first key row, first query block, query blocks per head) of this program.
    Programs come in chunks of ``HEAD_CHUNK`` (batch, KV head) pairs; inside a chunk the KV
    block index runs slowest, so a chunk's heads run together (sharing L2) and, for causal, the
    first KV blocks (the most query rows) of every head of the chunk start before any lighter
    block: the GPU fills its SMs in program order, so heavy programs go first and light ones
    fill the tail (longest-first). ``HEAD_CHUNK`` 1 is head by head."""
    num_n = gl.cdiv(seqlen_k, NUM_CONSUMERS * BLOCK_N)
    num_bh = gl.num_programs(0) // num_n
    pid = gl.program_id(0)
    chunk = pid // (num_n * HEAD_CHUNK)
    in_chunk = pid - chunk * (num_n * HEAD_CHUNK)
    heads = gl.minimum(HEAD_CHUNK, num_bh - chunk * HEAD_CHUNK)  # the last chunk may be short
    pid_n = in_chunk // heads
    pid_bh = chunk * HEAD_CHUNK + in_chunk % heads
    off_b = pid_bh // H_KV
    off_hk = pid_bh % H_KV
    n0 = pid_n * (NUM_CONSUMERS * BLOCK_N)
    if CAUSAL:
        # The first row that sees key n0 is n0 - (S_k - S_q); query blocks above it are hidden.
        mb_lo = gl.maximum(n0 - (seqlen_k - seqlen_q), 0) // BLOCK_M
    else:
        mb_lo = 0
    n_mb = gl.maximum(gl.cdiv(seqlen_q, BLOCK_M) - mb_lo, 0)
    # Programs of one head start their walk over its query blocks at different blocks (rotated
    # by the KV block index): dQ reductions of concurrent programs land on different rows
    # instead of all on the same tile at once.
    rot = pid_n % gl.maximum(n_mb, 1)
    return off_b, off_hk, n0, mb_lo, n_mb, rot


@gluon.jit
def _producer(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem, v_smem, lse_smem,
              delta_smem, kv_ready, q_ready, do_ready, empty, H_KV, HEAD_CHUNK, GROUP, seqlen_q, seqlen_k,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
              CAUSAL: gl.constexpr):  # fmt: skip
    """One warp: the program's K/V slices, then (Q, dO) tiles of every (query head, query block)
    into the ring."""
    off_b, off_hk, n0, mb_lo, n_mb, rot = _program(H_KV, HEAD_CHUNK, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, NUM_CONSUMERS,
                                              CAUSAL)  # fmt: skip
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.expect(kv_ready.index(c), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            k_desc, [off_b, off_hk, n0 + c * BLOCK_N, 0], kv_ready.index(c), k_smem.index(c)
        )
        tma.async_copy_global_to_shared(
            v_desc, [off_b, off_hk, n0 + c * BLOCK_N, 0], kv_ready.index(c), v_smem.index(c)
        )
    for it in range(GROUP * n_mb):
        off_h = off_hk * GROUP + it // n_mb
        m0 = (mb_lo + (it % n_mb + rot) % n_mb) * BLOCK_M
        s = it % NUM_STAGES
        ph = (it // NUM_STAGES) & 1
        # Fresh barriers count as having completed phase 1: the first wait on each slot passes.
        mbarrier.wait(empty.index(s), ph ^ 1)
        mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes + lse_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [off_b, off_h, m0, 0], q_ready.index(s), q_smem.index(s))
        tma.async_copy_global_to_shared(lse_desc, [off_b, off_h, m0], q_ready.index(s), lse_smem.index(s))
        mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes + delta_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(do_desc, [off_b, off_h, m0, 0], do_ready.index(s), do_smem.index(s))
        tma.async_copy_global_to_shared(
            delta_desc, [off_b, off_h, m0], do_ready.index(s), delta_smem.index(s)
        )


@gluon.jit
def _dq_mma(ds_smem, k_smem, ds_full, buf, phase, dq_zero, C: gl.constexpr, BLOCK_N: gl.constexpr,
            HEAD_DIM: gl.constexpr, DQ_COLS: gl.constexpr, NUM_CONSUMERS: gl.constexpr):  # fmt: skip
    """dQ[:, C * DQ_COLS:] of one query tile = sum over the program's key slices c2 of dS_c2 K_c2,
    once every consumer has written its dS^T of the tile (slots ``buf``, ``ds_full[buf]`` phase
    ``phase``). Async: returns the token."""
    if NUM_CONSUMERS > 1:
        mbarrier.wait(ds_full.index(buf), phase)
    dq_tok = warpgroup_mma(ds_smem.index(buf * NUM_CONSUMERS).permute((1, 0)),
                           k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).slice(C * DQ_COLS, DQ_COLS, dim=1),
                           dq_zero, use_acc=False, is_async=True)  # fmt: skip
    for c2 in gl.static_range(1, NUM_CONSUMERS):
        dq_tok = warpgroup_mma(ds_smem.index(buf * NUM_CONSUMERS + c2).permute((1, 0)),
                               k_smem.index(c2).reshape([BLOCK_N, HEAD_DIM]).slice(C * DQ_COLS, DQ_COLS, dim=1),
                               dq_tok, is_async=True)  # fmt: skip
    return dq_tok


@gluon.jit
def _dq_reduce(dq_desc, dq_tile, dq, off_b, off_h, m0, C: gl.constexpr, BLOCK_M: gl.constexpr,
               DQ_COLS: gl.constexpr):  # fmt: skip
    """Stage a consumer's float32 dQ columns of one query tile and add them into the dQ buffer
    by TMA reduction. The previous reduction must have read the staging tile first."""
    tma.store_wait(0)
    dq_tile.reshape([BLOCK_M, DQ_COLS]).store(dq)
    fence_async_shared()
    _tma_reduce_add(dq_desc, [off_b, off_h, m0, C * DQ_COLS], dq_tile)


@gluon.jit
def _consumer(C: gl.constexpr, dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem,
              kv_ready, q_ready, do_ready, empty, ds_full, ds_empty, turn, lse_smem, delta_smem, H_KV, HEAD_CHUNK, GROUP,
              seqlen_q, seqlen_k, qk_scale, scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
              CAUSAL: gl.constexpr, A_REGS: gl.constexpr, DQ_LAG: gl.constexpr,
              PINGPONG: gl.constexpr):  # fmt: skip
    """One warpgroup: key rows [kn0, kn0 + BLOCK_N), kn0 = n0 + C * BLOCK_N; dQ columns
    [C * DQ_COLS, (C + 1) * DQ_COLS) of every query tile, over all of the program's keys."""
    dtype: gl.constexpr = dk_desc.dtype
    DQ_COLS: gl.constexpr = HEAD_DIM // NUM_CONSUMERS
    TURNS: gl.constexpr = 2 if PINGPONG == 1 else 1  # ping-pong turns per tile
    # S^T / dP^T: (BLOCK_N keys, BLOCK_M queries). dK / dV: (BLOCK_N, D). dQ: (BLOCK_M, DQ_COLS).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])  # fmt: skip
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_COLS, 16])  # fmt: skip
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    key_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    qry_layout: gl.constexpr = gl.SliceLayout(0, s_layout)

    off_b, off_hk, n0, mb_lo, n_mb, rot = _program(H_KV, HEAD_CHUNK, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, NUM_CONSUMERS,
                                              CAUSAL)  # fmt: skip
    kn0 = n0 + C * BLOCK_N
    diag = seqlen_k - seqlen_q
    # Keys past S_k are zero rows of K/V, but P there is exp2(-lse2), which may overflow: the
    # ragged tail is masked (a slice wholly past S_k computes zeros: its dS feeds the shared dQ).
    tail = kn0 + BLOCK_N > seqlen_k
    if CAUSAL:
        # From query block mb_free on, every query row sees all of these keys.
        mb_free = gl.cdiv(gl.maximum(kn0 + BLOCK_N - 1 - diag, 0), BLOCK_M)
    else:
        mb_free = kn0 * 0

    k_tile = k_smem.index(C)
    v_tile = v_smem.index(C)
    k = k_tile.reshape([BLOCK_N, HEAD_DIM])
    v = v_tile.reshape([BLOCK_N, HEAD_DIM])
    dq_tile = dq_smem.index(C)
    keys = kn0 + gl.arange(0, BLOCK_N, key_layout)
    qcols = gl.arange(0, BLOCK_M, qry_layout)
    s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    dq_zero = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, dq_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)

    mbarrier.wait(kv_ready.index(C), 0)
    if A_REGS:
        # The A operands of S^T = K Q^T and dP^T = V dO^T from registers, loaded once per program,
        # and dK's dS^T from the registers that computed it (fits at D64; spills at D128).
        k_op = k.load(a_layout)
        v_op = v.load(a_layout)
    else:
        k_op = k
        v_op = v
    prev_h = off_hk * GROUP
    prev_m0 = n0 * 0
    for it in range(GROUP * n_mb):
        off_h = off_hk * GROUP + it // n_mb
        mb = mb_lo + (it % n_mb + rot) % n_mb
        m0 = mb * BLOCK_M
        s = it % NUM_STAGES
        ph = (it // NUM_STAGES) & 1
        buf = it % 2
        bph = (it // 2) & 1
        mbarrier.wait(q_ready.index(s), ph)
        q = q_smem.index(s).reshape([BLOCK_M, HEAD_DIM])
        do = do_smem.index(s).reshape([BLOCK_M, HEAD_DIM])
        _turn_wait(turn, TURNS * it, C, PINGPONG > 0)
        st_tok = warpgroup_mma(k_op, q.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        lse2 = lse_smem.index(s).reshape([BLOCK_M]).load(qry_layout)
        mbarrier.wait(do_ready.index(s), ph)
        dpt_tok = warpgroup_mma(v_op, do.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _turn_pass(turn, C, NUM_CONSUMERS, PINGPONG > 0)
        st = warpgroup_mma_wait(1, deps=(st_tok,))
        pt = gl.exp2(st * qk_scale - lse2[None, :])
        if tail | (mb < mb_free):
            rows = m0 + qcols
            keep = keys[:, None] < seqlen_k
            if CAUSAL:
                keep = keep & (keys[:, None] <= rows[None, :] + diag)
            pt = gl.where(keep, pt, 0.0)
        delta = delta_smem.index(s).reshape([BLOCK_M]).load(qry_layout)
        dpt = warpgroup_mma_wait(0, deps=(dpt_tok,))
        ds = (pt * (dpt - delta[None, :]) * scale).to(dtype)
        p_op = gl.convert_layout(pt.to(dtype), a_layout)
        ds_tile = ds_smem.index(buf * NUM_CONSUMERS + C)
        if NUM_CONSUMERS > 1:
            mbarrier.wait(ds_empty.index(buf), bph ^ 1)
        ds_tile.store(ds)
        fence_async_shared()
        if NUM_CONSUMERS > 1:
            mbarrier.arrive(ds_full.index(buf), count=1)
        _turn_wait(turn, TURNS * it + 1, C, PINGPONG == 1)
        dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
        ds_op = gl.convert_layout(ds, a_layout)
        dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)
        if DQ_LAG:
            if it > 0:
                # dQ of the previous tile, a tile behind: every consumer's dS^T of it was
                # written while this consumer worked on this tile, so the ds_full wait rarely
                # blocks and the consumers run less in lockstep.
                pit = it - 1
                pbuf = pit % 2
                dq_tok = _dq_mma(ds_smem, k_smem, ds_full, pbuf, (pit // 2) & 1, dq_zero, C, BLOCK_N, HEAD_DIM,
                                 DQ_COLS, NUM_CONSUMERS)  # fmt: skip
                _turn_pass(turn, C, NUM_CONSUMERS, PINGPONG == 1)
                dv, p_op, dk, ds_op, dq = warpgroup_mma_wait(0, deps=(dv_tok, p_op, dk_tok, ds_op, dq_tok))
                mbarrier.arrive(empty.index(s), count=1)
                if NUM_CONSUMERS > 1:
                    mbarrier.arrive(ds_empty.index(pbuf), count=1)
                _dq_reduce(dq_desc, dq_tile, dq, off_b, prev_h, prev_m0, C, BLOCK_M, DQ_COLS)
            else:
                _turn_pass(turn, C, NUM_CONSUMERS, PINGPONG == 1)
                dv, p_op, dk, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, p_op, dk_tok, ds_op))
                mbarrier.arrive(empty.index(s), count=1)
            prev_h = off_h
            prev_m0 = m0
        else:
            dq_tok = _dq_mma(
                ds_smem, k_smem, ds_full, buf, bph, dq_zero, C, BLOCK_N, HEAD_DIM, DQ_COLS, NUM_CONSUMERS
            )
            _turn_pass(turn, C, NUM_CONSUMERS, PINGPONG == 1)
            dv, p_op, dk, ds_op, dq = warpgroup_mma_wait(0, deps=(dv_tok, p_op, dk_tok, ds_op, dq_tok))
            mbarrier.arrive(empty.index(s), count=1)
            if NUM_CONSUMERS > 1:
                mbarrier.arrive(ds_empty.index(buf), count=1)
            _dq_reduce(dq_desc, dq_tile, dq, off_b, off_h, m0, C, BLOCK_M, DQ_COLS)

    if DQ_LAG:
        # dQ of the last tile.
        n_it = GROUP * n_mb
        if n_it > 0:
            pit = n_it - 1
            pbuf = pit % 2
            dq_tok = _dq_mma(ds_smem, k_smem, ds_full, pbuf, (pit // 2) & 1, dq_zero, C, BLOCK_N, HEAD_DIM,
                             DQ_COLS, NUM_CONSUMERS)  # fmt: skip
            dq = warpgroup_mma_wait(0, deps=(dq_tok,))
            if NUM_CONSUMERS > 1:
                mbarrier.arrive(ds_empty.index(pbuf), count=1)
            _dq_reduce(dq_desc, dq_tile, dq, off_b, prev_h, prev_m0, C, BLOCK_M, DQ_COLS)

    # Epilogue: dK and dV through the consumer's own K / V buffers. Every consumer's
    # last dQ MMA read them: wait until all have passed the last tile.
    if NUM_CONSUMERS > 1:
        last = GROUP * n_mb - 1
        lastc = gl.maximum(last, 0)
        mbarrier.wait(ds_empty.index(lastc % 2), (lastc // 2) & 1, pred=last >= 0)
    k_tile.reshape([BLOCK_N, HEAD_DIM]).store(dk.to(dtype))
    v_tile.reshape([BLOCK_N, HEAD_DIM]).store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [off_b, off_hk, kn0, 0], k_tile)
    tma.async_copy_shared_to_global(dv_desc, [off_b, off_hk, kn0, 0], v_tile)
    tma.store_wait(0)


@gluon.jit
def _consumer0(dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_ready, q_ready,
               do_ready, empty, ds_full, ds_empty, turn, lse_smem, delta_smem, H_KV, HEAD_CHUNK, GROUP, seqlen_q,
               seqlen_k, qk_scale, scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
               NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr,
               A_REGS: gl.constexpr, DQ_LAG: gl.constexpr, PINGPONG: gl.constexpr):  # fmt: skip
    _consumer(0, dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_ready,
              q_ready, do_ready, empty, ds_full, ds_empty, turn, lse_smem, delta_smem, H_KV, HEAD_CHUNK, GROUP,
              seqlen_q, seqlen_k, qk_scale, scale, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS,
              CAUSAL, A_REGS, DQ_LAG, PINGPONG)  # fmt: skip


@gluon.jit
def _consumer1(dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_ready, q_ready,
               do_ready, empty, ds_full, ds_empty, turn, lse_smem, delta_smem, H_KV, HEAD_CHUNK, GROUP, seqlen_q,
               seqlen_k, qk_scale, scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
               NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr,
               A_REGS: gl.constexpr, DQ_LAG: gl.constexpr, PINGPONG: gl.constexpr):  # fmt: skip
    _consumer(1, dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_ready,
              q_ready, do_ready, empty, ds_full, ds_empty, turn, lse_smem, delta_smem, H_KV, HEAD_CHUNK, GROUP,
              seqlen_q, seqlen_k, qk_scale, scale, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS,
              CAUSAL, A_REGS, DQ_LAG, PINGPONG)  # fmt: skip


@gluon.jit
def attn_bwd_gluon_kernel(
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, dq_desc, lse_desc, delta_desc,
    H_KV, GROUP, seqlen_q, seqlen_k, qk_scale, scale, HEAD_CHUNK,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, A_REGS: gl.constexpr = False,
    DQ_LAG: gl.constexpr = False, PINGPONG: gl.constexpr = 0,
):  # fmt: skip
    """Grid: (cdiv(S_k, NUM_CONSUMERS * BLOCK_N) * B * H_kv,). Launch with num_warps=4
    (consumer 0; the other consumer and the producer warp are worker partitions).
    ``qk_scale`` = softmax scale * log2(e); ``lse_desc`` / ``delta_desc``: over float32
    (B, H, S_pad) buffers; ``dq_desc``: over a zeroed float32 (B, H, S_q, D) buffer that
    receives dS K (dS already scaled)."""
    gl.static_assert(BLOCK_N == 64)  # one wgmma M per consumer warpgroup
    gl.static_assert(BLOCK_M == 64 or BLOCK_M == 128)
    gl.static_assert(NUM_CONSUMERS == 1 or NUM_CONSUMERS == 2)
    gl.static_assert(HEAD_DIM == 64 or HEAD_DIM == 128)
    gl.static_assert(PINGPONG == 0 or NUM_CONSUMERS == 2)

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + v_desc.block_type.shape, v_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    # dS^T of every consumer, double-buffered by tile parity (all consumers read all of them).
    ds_smem = gl.allocate_shared_memory(dtype, [2 * NUM_CONSUMERS, BLOCK_N, BLOCK_M], ds_layout)
    lse_smem = gl.allocate_shared_memory(
        gl.float32, [NUM_STAGES] + lse_desc.block_type.shape, lse_desc.layout
    )
    delta_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + delta_desc.block_type.shape,
                                           delta_desc.layout)  # fmt: skip
    dq_smem = gl.allocate_shared_memory(
        gl.float32, [NUM_CONSUMERS] + dq_desc.block_type.shape, dq_desc.layout
    )
    kv_ready = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(kv_ready.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(ds_full.index(i), count=NUM_CONSUMERS)
        mbarrier.init(ds_empty.index(i), count=NUM_CONSUMERS)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=NUM_CONSUMERS)  # every consumer releases each tile

    # Argument tuples are written inline (a tuple bound to a name turns constexprs into values).
    if NUM_CONSUMERS == 2:
        gl.warp_specialize(
            [
                (_consumer0, (dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem,
                              kv_ready, q_ready, do_ready, empty, ds_full, ds_empty, turn, lse_smem, delta_smem, H_KV, HEAD_CHUNK,
                               GROUP, seqlen_q, seqlen_k, qk_scale, scale, BLOCK_M, BLOCK_N,
                              HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, A_REGS, DQ_LAG, PINGPONG)),
                (_consumer1, (dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem,
                              kv_ready, q_ready, do_ready, empty, ds_full, ds_empty, turn, lse_smem, delta_smem, H_KV, HEAD_CHUNK,
                               GROUP, seqlen_q, seqlen_k, qk_scale, scale, BLOCK_M, BLOCK_N,
                              HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, A_REGS, DQ_LAG, PINGPONG)),
                (_producer, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem,
                             v_smem, lse_smem, delta_smem, kv_ready, q_ready, do_ready, empty, H_KV, HEAD_CHUNK, GROUP, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, NUM_STAGES,
                             NUM_CONSUMERS, CAUSAL)),
            ],
            [4, 1],
            [CONSUMER_REGS, 24],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_consumer0, (dk_desc, dv_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem,
                              kv_ready, q_ready, do_ready, empty, ds_full, ds_empty, turn, lse_smem, delta_smem, H_KV, HEAD_CHUNK,
                               GROUP, seqlen_q, seqlen_k, qk_scale, scale, BLOCK_M, BLOCK_N,
                              HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, A_REGS, DQ_LAG, PINGPONG)),
                (_producer, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem,
                             v_smem, lse_smem, delta_smem, kv_ready, q_ready, do_ready, empty, H_KV, HEAD_CHUNK, GROUP, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, NUM_STAGES,
                             NUM_CONSUMERS, CAUSAL)),
            ],
            [1],
            [24],
        )  # fmt: skip
