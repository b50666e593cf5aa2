"""Attention forward for Hopper (sm_90) in Gluon: warp-specialised, FlashAttention-3 style.

Shape letters: B batch, H query heads, H_kv key/value heads (GROUP = H // H_kv), S_q / S_k
sequence lengths, D head dim.

Plain Triton 3.6 serialises, inside one program, the QK^T MMA, the softmax and the PV MMA
(Nsight Compute: tensor pipe ~59% busy, docs/attention_fwd.md). Gluon lets the kernel say
who does what:

  * a producer warp issues TMA loads of K and V tiles into a ring of ``NUM_STAGES`` shared
    memory slots (``*_ready`` / ``*_empty`` mbarriers per slot);
  * ``NUM_CONSUMERS`` (2 or 3) consumer warpgroups, each owning ``BLOCK_M`` query rows of the
    program's ``NUM_CONSUMERS * BLOCK_M``; all read every K/V tile, so a slot is free once all
    released it (``*_empty`` counts NUM_CONSUMERS arrivals);
  * inside a consumer, the QK^T of block j is issued (async wgmma) together with the PV of
    block j-1, and the softmax of block j runs while the PV MMA is still in flight
    (FA3's intra-warpgroup overlap);
  * with ``PINGPONG`` the consumers take turns issuing their MMAs (``turn`` mbarriers), so
    one's softmax runs while another's MMAs occupy the tensor cores (FA3's ping-pong).

Tiles are addressed through 4-D TMA descriptors over (B, H, S, D) with any strides TMA
accepts (16-byte aligned, last dim contiguous): rows past S_q / S_k read as zeros, and the
output (staged in its own shared buffer, stored by TMA) clips rows past S_q. ``HEAD_DIM`` is
the *padded* head dim (the descriptors' box width): for a head dim D < HEAD_DIM (e.g. 80 or
96 run as 128) the descriptors still span the real D columns, so columns D..HEAD_DIM-1 of
Q, K and V load as zeros (they add nothing to Q K^T, and give zero output columns) and the
output store clips them: no padded copy exists in memory. With ``O_IN_Q`` (head dim 256,
where a separate output buffer does not fit) each consumer stages its output in its own Q
sub-tile and releases Q only once the output store has read it. Causal masking
is bottom-right aligned (row i sees key j <= i + S_k - S_q); blocks no row of a consumer can
see are not computed (the consumer only releases them). Rows that see no key give out = 0,
lse = -inf. Scores are scaled by ``softmax_scale * log2(e)`` and exponentiated with exp2.

A program loops over tiles (``_tile_id``): one tile when the grid is the tile count, several
when it is persistent (grid = SM count), round-robin or in "snake" order. Ring positions and
barrier phases count on across tiles, so the next tile's Q/K/V load under this one's tail.

Gluon has no CPU interpreter: this kernel runs on the GPU only; the Triton kernel in ``fwd``
remains the one CI tests on CPU (``tests/test_attention_gluon_compile.py`` compiles this one
for sm_90 there). Grids and configs live in ``launch_gluon``.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)


@gluon.jit
def _n_blocks(m0, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Number of BLOCK_N key blocks that rows [m0, m0 + BLOCK_M) can see."""
    if CAUSAL:
        # The last row sees keys < m0 + BLOCK_M + S_k - S_q.
        n_end = gl.minimum(gl.maximum(m0 + BLOCK_M + seqlen_k - seqlen_q, 0), seqlen_k)
    else:
        n_end = seqlen_k
    return gl.cdiv(n_end, BLOCK_N)


@gluon.constexpr_function
def _shifted(BLOCK_M, BLOCK_N, NUM_CONSUMERS, CAUSAL):
    """Whether causal tiles are shifted so a partial tile is the first (see ``_tile``)."""
    return bool(CAUSAL) and (NUM_CONSUMERS * BLOCK_M) % BLOCK_N != 0


@gluon.jit
def _q_row(
    row0, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr
):
    """First row of a consumer's Q load: an empty consumer of a shifted tile (row0 < 0) reads
    from row 0 (unused), so no TMA coordinate is negative."""
    if _shifted(BLOCK_M, BLOCK_N, NUM_CONSUMERS, CAUSAL):
        return gl.maximum(row0, 0)
    else:
        return row0


@gluon.jit
def _tile(tile, num_m, H, GROUP, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
          NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr):  # fmt: skip
    """Tile index -> (b, h, h_kv, first query row, key blocks the tile's last consumer sees).
    Query blocks run fastest (a head's tiles run together and share its K/V in L2); causal
    takes each head's heaviest query block first.

    Causal tiles of three consumers (D64: 192 rows, not a multiple of the 128-key block, so the
    consumers see different block counts anyway) are shifted up by whole consumer blocks
    (``_shifted``; with 128-row tiles a 64-row shift would give the two consumers of every tile
    unequal block counts, measured 6% slower at D128 S_q 3000): when S_q leaves a tile partly empty,
    the empty consumers are at the top of the first tile (rows below 0: the consumer does no work
    and stores nothing), whose neighbours see the fewest keys, rather than at the bottom of the
    last tile, whose rows see the most (with three consumers at D64 and S_q 4096, the old last
    tile ran one consumer over every key block while two idled). Only the rest below a multiple
    of BLOCK_M stays ragged at the end (clipped by the stores as before). No TMA coordinate is
    negative: the Q load of an empty consumer reads rows from 0 (unused)."""
    pid_m = tile % num_m
    pid_bh = tile // num_m
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hk = off_h // GROUP  # GQA/MQA: the K/V head is indexed, never repeated
    if CAUSAL:
        pid_m = num_m - 1 - pid_m
    m0 = pid_m * (NUM_CONSUMERS * BLOCK_M)
    if _shifted(BLOCK_M, BLOCK_N, NUM_CONSUMERS, CAUSAL):
        m0 -= (num_m * (NUM_CONSUMERS * BLOCK_M) - seqlen_q) // BLOCK_M * BLOCK_M
    n_cta = _n_blocks(m0 + (NUM_CONSUMERS - 1) * BLOCK_M, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    return off_b, off_h, off_hk, m0, n_cta


@gluon.jit
def _tile_id(i, SNAKE: gl.constexpr):
    """Tile of this program's round i: program p takes i * grid + p, or with SNAKE every other
    round counts down (i * grid + grid - 1 - p), pairing heavy and light causal tiles so the
    programs stay in step (and keep working on neighbouring heads, which share L2)."""
    grid = gl.num_programs(0)
    pid = gl.program_id(0)
    if SNAKE:
        return i * grid + gl.where(i % 2 == 1, grid - 1 - pid, pid)
    else:
        return i * grid + pid


@gluon.jit
def _num_rounds(num_tiles, SNAKE: gl.constexpr):
    """Rounds in which this program has a tile (the same count in every partition)."""
    rounds = gl.cdiv(num_tiles, gl.num_programs(0))
    return gl.where(_tile_id(rounds - 1, SNAKE) < num_tiles, rounds, rounds - 1)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
              v_empty, num_tiles, num_m, H, GROUP, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
              CAUSAL: gl.constexpr, SNAKE: gl.constexpr):  # fmt: skip
    """One warp: per tile, the consumers' Q sub-tiles, then K_j, V_j into the ring. Ring
    positions count on across tiles, so the next tile's loads start as soon as slots free up."""
    kv = 0
    it = 0
    for i in range(_num_rounds(num_tiles, SNAKE)):
        tile = _tile_id(i, SNAKE)
        off_b, off_h, off_hk, m0, n_cta = _tile(tile, num_m, H, GROUP, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N,
                                                NUM_CONSUMERS, CAUSAL)  # fmt: skip
        for c in gl.static_range(NUM_CONSUMERS):
            # Fresh barriers count as having completed phase 1: the first wait passes.
            mbarrier.wait(q_empty.index(c), (it & 1) ^ 1)
            mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                q_desc,
                [off_b, off_h, _q_row(m0 + c * BLOCK_M, BLOCK_M, BLOCK_N, NUM_CONSUMERS, CAUSAL), 0],
                q_ready.index(c),
                q_smem.index(c),
            )
        for j in range(n_cta):
            s = kv % NUM_STAGES
            ph = (kv // NUM_STAGES) & 1
            mbarrier.wait(k_empty.index(s), ph ^ 1)
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                k_desc, [off_b, off_hk, j * BLOCK_N, 0], k_ready.index(s), k_smem.index(s)
            )
            mbarrier.wait(v_empty.index(s), ph ^ 1)
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                v_desc, [off_b, off_hk, j * BLOCK_N, 0], v_ready.index(s), v_smem.index(s)
            )
            kv += 1
        it += 1


@gluon.jit
def _turn_wait(turn, t, C: gl.constexpr, PINGPONG: gl.constexpr):
    # Consumers issue their MMAs in turn, 0, 1, (2,) 0, 1, ...: consumer C waits for the arrival
    # of the one before it. Consumer 0's first wait passes on the fresh barrier.
    if PINGPONG:
        mbarrier.wait(turn.index(C), (t & 1) ^ (1 if C == 0 else 0))


@gluon.jit
def _turn_pass(turn, C: gl.constexpr, NUM_CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index((C + 1) % NUM_CONSUMERS), count=1)


@gluon.jit
def _softmax_step(s, m_i, start_n, row0, diag, seqlen_k, qk_scale, need_mask,
                  s_layout: gl.constexpr, CAUSAL: gl.constexpr):  # fmt: skip
    """Scores -> (p, new running max, alpha). ``need_mask`` (runtime) applies the causal and
    ragged-key mask. A row that has seen no key keeps m = -inf and is shifted by 0 instead
    (p and alpha become exactly 0, never exp2(-inf - -inf) = NaN)."""
    BLOCK_M: gl.constexpr = s.shape[0]
    BLOCK_N: gl.constexpr = s.shape[1]
    if need_mask:
        cols = start_n + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
        keep = cols[None, :] < seqlen_k
        if CAUSAL:
            rows = row0 + gl.arange(0, BLOCK_M, gl.SliceLayout(1, s_layout))
            keep = keep & (cols[None, :] <= rows[:, None] + diag)
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_shift[:, None])
    alpha = gl.exp2(m_i - m_shift)
    return p, m_new, alpha


@gluon.jit
def _store_out(o_desc, o_tile, acc, off_b, off_h, row0, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr):
    """A consumer's output rows [row0, row0 + BLOCK_M) through its staging buffer by TMA (rows
    past S_q clip). The previous tile's store must have read the buffer first."""
    tma.store_wait(0)
    o_tile.reshape([BLOCK_M, HEAD_DIM]).store(acc.to(o_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [off_b, off_h, row0, 0], o_tile)


@gluon.jit
def _consumer(C: gl.constexpr, o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
              v_ready, v_empty, turn, Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q, seqlen_k,
              qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr,
              PINGPONG: gl.constexpr, SNAKE: gl.constexpr, O_IN_Q: gl.constexpr):  # fmt: skip
    """One warpgroup: per tile, query rows [row0, row0 + BLOCK_M), row0 = m0 + C * BLOCK_M."""
    dtype: gl.constexpr = o_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    LN2: gl.constexpr = 0.6931471805599453

    q_tile = q_smem.index(C)
    q_s = q_tile.reshape([BLOCK_M, HEAD_DIM])
    # Q as the QK^T MMA's A operand from registers (loaded once per tile): Q's shared buffer is
    # released as soon as it is read (the next tile's Q loads under this whole tile) and the
    # per-block MMAs read only K from shared memory. With O_IN_Q the buffer stages the output.
    # Measured (H100, same process): D128 full +0-4%; D128 causal spilled 124 bytes and lost 4%;
    # three consumers (D64) have no registers to spare.
    Q_REGS: gl.constexpr = (not O_IN_Q) and NUM_CONSUMERS == 2 and not CAUSAL
    Q_LATE: gl.constexpr = (not O_IN_Q) and not Q_REGS  # Q released after the tile's last QK^T
    q_op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    o_tile = o_smem.index(C)  # with O_IN_Q the caller passes q_smem as o_smem
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    diag = seqlen_k - seqlen_q
    kv = 0  # ring position of this tile's first K/V block (counts on across tiles)
    it = 0  # tiles done
    t = 0  # turns taken (PINGPONG)
    for i in range(_num_rounds(num_tiles, SNAKE)):
        tile = _tile_id(i, SNAKE)
        off_b, off_h, off_hk, m0, n_cta = _tile(tile, num_m, H, GROUP, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N,
                                                NUM_CONSUMERS, CAUSAL)  # fmt: skip
        row0 = m0 + C * BLOCK_M
        n_mine = gl.minimum(_n_blocks(row0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL), n_cta)
        if _shifted(BLOCK_M, BLOCK_N, NUM_CONSUMERS, CAUSAL):
            n_mine = gl.where(row0 >= 0, n_mine, 0)  # an empty consumer of a shifted tile (_tile)
        # Blocks [0, n_free) are fully visible to every row of this consumer: no mask.
        if CAUSAL:
            n_free = gl.minimum(gl.maximum(row0 + diag + 1, 0), seqlen_k) // BLOCK_N
        else:
            n_free = seqlen_k // BLOCK_N

        mbarrier.wait(q_ready.index(C), it & 1)
        if Q_REGS:
            q = q_s.load(q_op_layout)
            mbarrier.arrive(q_empty.index(C), count=1)
        else:
            q = q_s
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        if n_mine > 0:
            # Block 0: S_0 = Q K_0^T.
            s0 = kv % NUM_STAGES
            mbarrier.wait(k_ready.index(s0), (kv // NUM_STAGES) & 1)
            k_t = k_smem.index(s0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
            _turn_wait(turn, t, C, PINGPONG)
            s_tok = warpgroup_mma(q, k_t, s_zero, use_acc=False, is_async=True)
            _turn_pass(turn, C, NUM_CONSUMERS, PINGPONG)
            t += 1
            s = warpgroup_mma_wait(0, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(s0), count=1)
            # Q is free once the last QK^T is done: the next tile's Q loads under this one's tail
            # (unless Q's buffer stages the output: then after the output store, below).
            if Q_LATE:
                mbarrier.arrive(q_empty.index(C), count=1, pred=n_mine == 1)
            p, m_i, alpha = _softmax_step(
                s, m_i, 0, row0, diag, seqlen_k, qk_scale, 0 >= n_free, s_layout, CAUSAL
            )
            l_i = gl.sum(p, 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, n_mine):
                sj = (kv + j) % NUM_STAGES
                phj = ((kv + j) // NUM_STAGES) & 1
                sp = (kv + j - 1) % NUM_STAGES
                php = ((kv + j - 1) // NUM_STAGES) & 1
                mbarrier.wait(k_ready.index(sj), phj)
                mbarrier.wait(v_ready.index(sp), php)
                k_t = k_smem.index(sj).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
                v = v_smem.index(sp).reshape([BLOCK_N, HEAD_DIM])
                _turn_wait(turn, t, C, PINGPONG)
                # Issue S_j = Q K_j^T, then O += P_{j-1} V_{j-1}; both run while this warpgroup
                # does the softmax of block j.
                s_tok = warpgroup_mma(q, k_t, s_zero, use_acc=False, is_async=True)
                o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
                _turn_pass(turn, C, NUM_CONSUMERS, PINGPONG)
                t += 1
                s = warpgroup_mma_wait(1, deps=(s_tok,))
                mbarrier.arrive(k_empty.index(sj), count=1)
                if Q_LATE:
                    mbarrier.arrive(q_empty.index(C), count=1, pred=j == n_mine - 1)
                p, m_i, alpha = _softmax_step(s, m_i, j * BLOCK_N, row0, diag, seqlen_k, qk_scale, j >= n_free,
                                              s_layout, CAUSAL)  # fmt: skip
                l_i = l_i * alpha + gl.sum(p, 1)
                acc = warpgroup_mma_wait(0, deps=(o_tok,))
                mbarrier.arrive(v_empty.index(sp), count=1)
                acc = acc * gl.convert_layout(alpha, orow_layout)[:, None]
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            # Last PV.
            sl = (kv + n_mine - 1) % NUM_STAGES
            mbarrier.wait(v_ready.index(sl), ((kv + n_mine - 1) // NUM_STAGES) & 1)
            v = v_smem.index(sl).reshape([BLOCK_N, HEAD_DIM])
            _turn_wait(turn, t, C, PINGPONG)
            o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
            _turn_pass(turn, C, NUM_CONSUMERS, PINGPONG)
            t += 1
            acc = warpgroup_mma_wait(0, deps=(o_tok,))
            mbarrier.arrive(v_empty.index(sl), count=1)
        elif Q_LATE:
            mbarrier.arrive(q_empty.index(C), count=1)

        # Blocks the producer loaded for the other consumers only: release them unread.
        for j in range(n_mine, n_cta):
            s2 = (kv + j) % NUM_STAGES
            ph2 = ((kv + j) // NUM_STAGES) & 1
            mbarrier.wait(k_ready.index(s2), ph2)
            mbarrier.arrive(k_empty.index(s2), count=1)
            mbarrier.wait(v_ready.index(s2), ph2)
            mbarrier.arrive(v_empty.index(s2), count=1)
        if PINGPONG:
            # Every consumer takes n_cta + 1 turns per tile (none if n_cta == 0): none waits forever.
            t_end = t - gl.where(n_mine > 0, n_mine + 1, 0) + gl.where(n_cta > 0, n_cta + 1, 0)
            while t < t_end:
                _turn_wait(turn, t, C, PINGPONG)
                _turn_pass(turn, C, NUM_CONSUMERS, PINGPONG)
                t += 1

        # Epilogue. Rows that saw no key have l = 0 and acc = 0: out 0, lse -inf.
        seen = l_i > 0.0
        l_safe = gl.where(seen, l_i, 1.0)
        acc = acc * gl.convert_layout(1.0 / l_safe, orow_layout)[:, None]
        lse = gl.where(seen, (m_i + gl.log2(l_safe)) * LN2, float("-inf"))
        rows = row0 + gl.arange(0, BLOCK_M, row_layout)
        lse_ptrs = Lse + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh + rows
        if _shifted(BLOCK_M, BLOCK_N, NUM_CONSUMERS, CAUSAL):
            # An empty consumer of a shifted tile (rows below 0) stores nothing.
            gl.store(lse_ptrs, lse, mask=(rows < seqlen_q) & (rows >= 0))
            if row0 >= 0:
                _store_out(o_desc, o_tile, acc, off_b, off_h, row0, BLOCK_M, HEAD_DIM)
        else:
            gl.store(lse_ptrs, lse, mask=rows < seqlen_q)
            _store_out(o_desc, o_tile, acc, off_b, off_h, row0, BLOCK_M, HEAD_DIM)
        if O_IN_Q:
            # The output went out through Q's buffer: the next tile's Q may load once it is read.
            tma.store_wait(0)
            mbarrier.arrive(q_empty.index(C), count=1)
        kv += n_cta
        it += 1
    tma.store_wait(0)


@gluon.jit
def _consumer0(o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
               Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q, seqlen_k, qk_scale,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
               NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
               SNAKE: gl.constexpr, O_IN_Q: gl.constexpr):  # fmt: skip
    _consumer(0, o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
              Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q, seqlen_k, qk_scale,
              BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, PINGPONG, SNAKE, O_IN_Q)  # fmt: skip


@gluon.jit
def _consumer1(o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
               Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q, seqlen_k, qk_scale,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
               NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
               SNAKE: gl.constexpr, O_IN_Q: gl.constexpr):  # fmt: skip
    _consumer(1, o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
              Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q, seqlen_k, qk_scale,
              BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, PINGPONG, SNAKE, O_IN_Q)  # fmt: skip


@gluon.jit
def _consumer2(o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
               Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q, seqlen_k, qk_scale,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
               NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
               SNAKE: gl.constexpr, O_IN_Q: gl.constexpr):  # fmt: skip
    _consumer(2, o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
              Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q, seqlen_k, qk_scale,
              BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, PINGPONG, SNAKE, O_IN_Q)  # fmt: skip


@gluon.jit
def attn_fwd_gluon_kernel(
    q_desc, k_desc, v_desc, o_desc, Lse, stride_lb, stride_lh,
    B, H, GROUP, seqlen_q, seqlen_k, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, SNAKE: gl.constexpr, O_IN_Q: gl.constexpr,
):  # fmt: skip
    """Tiles of NUM_CONSUMERS * BLOCK_M query rows of one (batch, head). Grid: any number of
    programs up to the tile count, each taking one tile per round (``_tile_id``): one tile
    each when the grid is the tile count, persistent when it is the SM count. Launch with num_warps=4
    (consumer 0; the other consumers and the producer are worker partitions)."""
    gl.static_assert(BLOCK_M == 64)
    gl.static_assert(NUM_CONSUMERS == 2 or NUM_CONSUMERS == 3)
    gl.static_assert(HEAD_DIM % 16 == 0 and HEAD_DIM <= 256)
    num_m = gl.cdiv(seqlen_q, NUM_CONSUMERS * BLOCK_M)
    num_tiles = num_m * B * H

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    if O_IN_Q:
        # Head dim 256: a separate output buffer does not fit beside Q and the K/V ring; each
        # consumer stages its output in its own Q sub-tile (Q is dead after the last QK^T).
        gl.static_assert(o_desc.block_type.nbytes == q_desc.block_type.nbytes)
        o_smem = q_smem
    else:
        o_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + o_desc.block_type.shape, o_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)  # every consumer releases each tile
        mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)

    # Argument tuples are written inline: a tuple assigned to a name turns its constexprs
    # into runtime values.
    if NUM_CONSUMERS == 2:
        gl.warp_specialize(
            [
                (_consumer0, (o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                              v_empty, turn, Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q,
                              seqlen_k, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL,
                              PINGPONG, SNAKE, O_IN_Q)),
                (_consumer1, (o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                              v_empty, turn, Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q,
                              seqlen_k, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL,
                              PINGPONG, SNAKE, O_IN_Q)),
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                             v_ready, v_empty, num_tiles, num_m, H, GROUP, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N,
                             NUM_STAGES, NUM_CONSUMERS, CAUSAL, SNAKE)),
            ],
            [4, 1],
            [CONSUMER_REGS, 24],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_consumer0, (o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                              v_empty, turn, Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q,
                              seqlen_k, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL,
                              PINGPONG, SNAKE, O_IN_Q)),
                (_consumer1, (o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                              v_empty, turn, Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q,
                              seqlen_k, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL,
                              PINGPONG, SNAKE, O_IN_Q)),
                (_consumer2, (o_desc, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                              v_empty, turn, Lse, stride_lb, stride_lh, num_tiles, num_m, H, GROUP, seqlen_q,
                              seqlen_k, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL,
                              PINGPONG, SNAKE, O_IN_Q)),
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                             v_ready, v_empty, num_tiles, num_m, H, GROUP, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N,
                             NUM_STAGES, NUM_CONSUMERS, CAUSAL, SNAKE)),
            ],
            [4, 4, 1],
            [CONSUMER_REGS, CONSUMER_REGS, 24],
        )  # fmt: skip
