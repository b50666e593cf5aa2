"""Alignment: from topk_ids (T*K flat "slots", slot = t*K + k) to per-expert segments of rows
padded to BLOCK_M, entirely on the GPU and with no host synchronisation.

Three launches, all sized by shapes only (never by the routing data):
  1. ``align_count_kernel`` (one program per CHUNK slots): histogram of the chunk's experts.
  2. ``align_scan_kernel`` (one program): per-expert totals, padded segment starts, the
     destination base of each (chunk, expert) pair, and the expert of every BLOCK_M block
     of the worst-case-sized row buffer (-1 past the last used block; ``_block_owners``).
  3. ``align_scatter_kernel`` (one program per chunk): sorts the chunk by (expert, slot),
     writes each slot to its row. Within an expert, rows are in slot order (deterministic).

Outputs: ``sorted_slots[row]`` (slot at each row; padding rows are never read),
``expert_start[e]`` (first row of e's segment, a multiple of BLOCK_M), ``expert_count[e]``
(slots routed to e), ``block_expert[b]``.
"""

import triton
import triton.language as tl


@triton.jit
def _load_ids(ids_ptr, c, numel, E, CHUNK: tl.constexpr):
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < numel, other=E)
    # Out-of-range ids (only possible when the API's value check was skipped) land in the
    # spare bin E and are dropped rather than written out of bounds.
    return tl.where((ids >= 0) & (ids < E), ids, E)


@triton.jit
def align_count_kernel(ids_ptr, counts_ptr, numel, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    ids = _load_ids(ids_ptr, c, numel, E, CHUNK)
    hist = tl.histogram(ids, BLOCK_E)
    tl.store(counts_ptr + c * BLOCK_E + tl.arange(0, BLOCK_E), hist)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _block_owners(
    block_expert_ptr, pstart, total, e, e_ok, num_blocks, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr
):
    """block_expert[b] = the expert whose padded segment holds row b * BLOCK_M, -1 past the last
    used block. Segments are in expert order and every expert with slots starts its own block, so:
    mark each such start with its expert (distinct blocks: plain stores), then a running maximum
    over the blocks (empty experts, whose segments are empty, never own a block). One program;
    ``tl.debug_barrier`` orders its global stores and loads."""
    for b0 in range(0, num_blocks, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        tl.store(block_expert_ptr + bs, tl.full((BLOCK_B,), -1, tl.int32), mask=bs < num_blocks)
    tl.debug_barrier()
    tl.store(block_expert_ptr + pstart // BLOCK_M, e, mask=e_ok & (total > 0))
    tl.debug_barrier()
    used_rows = tl.sum(tl.where(e_ok, (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0), axis=0)
    carry = -1
    for b0 in range(0, num_blocks, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        mark = tl.load(block_expert_ptr + bs, mask=bs < num_blocks, other=-1)
        owner = tl.maximum(tl.associative_scan(mark, 0, _max_combine), carry)
        carry = tl.max(owner, axis=0)
        tl.store(block_expert_ptr + bs, tl.where(bs * BLOCK_M < used_rows, owner, -1), mask=bs < num_blocks)


@triton.jit
def align_scan_kernel(
    counts_ptr,
    base_ptr,
    expert_start_ptr,
    expert_count_ptr,
    block_expert_ptr,
    num_chunks,
    E,
    num_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    total = tl.zeros((BLOCK_E,), tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cnt = tl.load(counts_ptr + cs[:, None] * BLOCK_E + e[None, :], mask=cs[:, None] < num_chunks, other=0)
        total += tl.sum(cnt, axis=0)
    total = tl.where(e_ok, total, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, 0)
    pstart = pend - padded
    tl.store(expert_start_ptr + e, pstart, mask=e_ok)
    tl.store(expert_count_ptr + e, total, mask=e_ok)

    # base[c, e] = start of e + slots of e in earlier chunks - slots of chunk c with expert < e,
    # so that the slot at sorted position p of chunk c goes to row base[c, e] + p.
    run = pstart
    for c0 in range(0, num_chunks, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs[:, None] < num_chunks
        cnt = tl.load(counts_ptr + cs[:, None] * BLOCK_E + e[None, :], mask=c_ok, other=0)
        before = run[None, :] + tl.cumsum(cnt, 0) - cnt
        smaller = tl.cumsum(cnt, 1) - cnt
        tl.store(base_ptr + cs[:, None] * BLOCK_E + e[None, :], before - smaller, mask=c_ok)
        run += tl.sum(cnt, axis=0)

    _block_owners(block_expert_ptr, pstart, total, e, e_ok, num_blocks, BLOCK_M, BLOCK_B)


@triton.jit
def align_scatter_kernel(
    ids_ptr, base_ptr, sorted_slots_ptr, numel, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr
):
    c = tl.program_id(0)
    local = tl.arange(0, CHUNK)
    ids = _load_ids(ids_ptr, c, numel, E, CHUNK)
    key = tl.sort(ids * CHUNK + local)
    expert = key // CHUNK
    slot = c * CHUNK + key % CHUNK
    ok = expert < E
    dest = tl.load(base_ptr + c * BLOCK_E + expert, mask=ok, other=0) + local
    tl.store(sorted_slots_ptr + dest, slot, mask=ok)


@triton.jit
def _align_single(
    ids_ptr,
    sorted_slots_ptr,
    expert_start_ptr,
    expert_count_ptr,
    block_expert_ptr,
    numel,
    E,
    num_blocks,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """All three steps for numel <= CHUNK slots in one program, with the same outputs as the
    three kernels run on one chunk (same row order: within an expert, slots in order). Padding
    rows of the whole buffer are zeroed first (they name slot 0, like the launcher's zeroed
    buffer); a barrier orders those stores before the scatter's."""
    local = tl.arange(0, CHUNK)
    ids = _load_ids(ids_ptr, 0, numel, E, CHUNK)
    hist = tl.histogram(ids, BLOCK_E)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    total = tl.where(e_ok, hist, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, 0)
    pstart = pend - padded
    tl.store(expert_start_ptr + e, pstart, mask=e_ok)
    tl.store(expert_count_ptr + e, total, mask=e_ok)
    _block_owners(block_expert_ptr, pstart, total, e, e_ok, num_blocks, BLOCK_M, BLOCK_B)
    num_rows = num_blocks * BLOCK_M
    for r0 in range(0, num_rows, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        tl.store(sorted_slots_ptr + rs, tl.zeros((BLOCK_R,), tl.int32), mask=rs < num_rows)
    tl.debug_barrier()
    # The slot at sorted position p (expert x) goes to row start[x] + p - (slots of experts < x).
    key = tl.sort(ids * CHUNK + local)
    expert = key // CHUNK
    ok = expert < E
    base = pstart - (tl.cumsum(hist, 0) - hist)
    dest = tl.gather(base, tl.where(ok, expert, 0), axis=0) + local
    tl.store(sorted_slots_ptr + dest, key % CHUNK, mask=ok)


@triton.jit
def align_single_kernel(
    ids_ptr,
    sorted_slots_ptr,
    expert_start_ptr,
    expert_count_ptr,
    block_expert_ptr,
    numel,
    E,
    num_blocks,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    _align_single(
        ids_ptr, sorted_slots_ptr, expert_start_ptr, expert_count_ptr, block_expert_ptr, numel, E,
        num_blocks, BLOCK_M, CHUNK, BLOCK_E, BLOCK_B, BLOCK_R,
    )  # fmt: skip
