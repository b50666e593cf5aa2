"""Routing kernel: scores, selection bias, group-limited top-k and renormalisation in one launch.

Shape letters: T tokens, E experts, K top-k. One program owns BLOCK_T token rows and all E
expert columns (E <= BLOCK_E, a power of two), so every reduction stays in registers.
``route_align_kernel`` (decode sizes) routes every token in one program, then aligns the ids
in the same launch (``align._align_single``). The math is float64 (T*E exps, negligible next to the expert GEMMs): the float32 weights
are then the correctly rounded values, never an ulp or two away from torch's float32 route.
The selection compares the scores rounded to float32 (what torch's float32 route compares)
through packed integer keys: one max reduction per pick instead of a max, an argmin and a
sum in float64.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .align import _align_single

_TAKEN = tl.constexpr(-(2**63))  # key of an expert already picked: below every real key


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    # tl.exp lowers to ex2.approx on the GPU; libdevice's exp is the accurate one. The
    # interpreter has no libdevice, and numpy's exp is accurate.
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    T,
    E,
    stride_lt,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PRECISE: tl.constexpr,
):
    _route_rows(
        logits_ptr, bias_ptr, weights_ptr, ids_ptr, tl.program_id(0) * BLOCK_T, T, E, stride_lt, TOP_K,
        BLOCK_T, BLOCK_E, BLOCK_K, SIGMOID, HAS_BIAS, RENORMALIZE, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G,
        PRECISE,
    )  # fmt: skip


@triton.jit
def _route_rows(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    t0,
    T,
    E,
    stride_lt,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """Route token rows [t0, t0 + BLOCK_T): store their K weights and ids."""
    rows = t0 + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    raw = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float64)
    neg_inf = float("-inf")
    if SIGMOID:
        scores = 1.0 / (1.0 + _exp(-raw, PRECISE))
    else:
        logits = tl.where(col_ok[None, :], raw, neg_inf)
        row_max = tl.max(logits, axis=1)
        p = _exp(logits - row_max[:, None], PRECISE)
        scores = p / tl.sum(p, axis=1)[:, None]
    scores = tl.where(col_ok[None, :], scores, 0.0).to(tl.float64)
    sel = tl.where(col_ok[None, :], scores, neg_inf)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float64)
        sel = sel + bias[None, :]

    if N_GROUP > 1:
        # Group score: best expert of the group, or the sum of its best two with a bias
        # (DeepSeek-V3), then only the TOPK_GROUP best groups stay eligible.
        group = cols // GROUP_SIZE
        gcols = tl.arange(0, BLOCK_G)
        gscore = tl.full((BLOCK_T, BLOCK_G), neg_inf, tl.float64)
        for g in tl.static_range(N_GROUP):
            in_g = (group == g) & col_ok
            v = tl.where(in_g[None, :], sel, neg_inf)
            best = tl.max(v, axis=1)
            if HAS_BIAS and GROUP_SIZE >= 2:
                first = tl.min(tl.where(v == best[:, None], cols[None, :], BLOCK_E), axis=1)
                second = tl.max(tl.where(cols[None, :] == first[:, None], neg_inf, v), axis=1)
                best = best + second
            gscore = tl.where(gcols[None, :] == g, best[:, None], gscore)
        allowed = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            gbest = tl.max(gscore, axis=1)
            gidx = tl.min(tl.where(gscore == gbest[:, None], gcols[None, :], BLOCK_G), axis=1)
            allowed = allowed | (group[None, :] == gidx[:, None]).to(tl.int32)
            gscore = tl.where(gcols[None, :] == gidx[:, None], neg_inf, gscore)
        sel = tl.where(allowed != 0, sel, neg_inf)

    # Selection: one integer max per pick. The key packs the selection score (as float32,
    # its bits made order-preserving as int32) above the reversed column, so the max is the
    # best score and, among equal scores, the lowest expert id. The weights are gathered
    # from the float64 scores once, after the loop.
    bits = sel.to(tl.float32).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (BLOCK_E - 1 - cols)[None, :].to(tl.int64)
    kcols = tl.arange(0, BLOCK_K)
    out_i = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    for i in range(TOP_K):
        top = tl.max(key, axis=1)
        idx = (BLOCK_E - 1 - (top & 0x7FFFFFFF)).to(tl.int32)
        out_i = tl.where(kcols[None, :] == i, idx[:, None], out_i)
        key = tl.where(cols[None, :] == idx[:, None], _TAKEN, key)
    k_ok = kcols[None, :] < TOP_K
    out_w = tl.where(k_ok, tl.gather(scores, out_i, axis=1), 0.0)
    if RENORMALIZE:
        out_w = out_w / tl.sum(out_w, axis=1)[:, None]
    offs = rows[:, None] * TOP_K + kcols[None, :]
    mask = row_ok[:, None] & k_ok
    tl.store(weights_ptr + offs, out_w.to(tl.float32), mask=mask)
    tl.store(ids_ptr + offs, out_i, mask=mask)


@triton.jit
def route_align_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    sorted_slots_ptr,
    expert_start_ptr,
    expert_count_ptr,
    block_expert_ptr,
    T,
    E,
    stride_lt,
    num_blocks,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PRECISE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_EA: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Decode sizes (T*K <= CHUNK), one program: route all T tokens (BLOCK_T rows a step),
    then, after a barrier (the ids are re-read from global memory by other threads), align
    them exactly as ``align._align_single`` does. One launch instead of two (or four)."""
    for t0 in range(0, T, BLOCK_T):
        _route_rows(
            logits_ptr, bias_ptr, weights_ptr, ids_ptr, t0, T, E, stride_lt, TOP_K, BLOCK_T, BLOCK_E,
            BLOCK_K, SIGMOID, HAS_BIAS, RENORMALIZE, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_G, PRECISE,
        )  # fmt: skip
    tl.debug_barrier()
    _align_single(
        ids_ptr, sorted_slots_ptr, expert_start_ptr, expert_count_ptr, block_expert_ptr, T * TOP_K, E,
        num_blocks, BLOCK_M, CHUNK, BLOCK_EA, BLOCK_B, BLOCK_R,
    )  # fmt: skip
