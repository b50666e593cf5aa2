"""Grouped GEMMs of the fused MoE, over the padded per-expert row segments made by ``align``.

Shape letters: T tokens, H hidden, E experts, K top-k, F ffn, R rows of the padded buffer
(a multiple of BLOCK_M; block b belongs to expert ``block_expert[b]``, -1 = unused). A "slot"
is t*K + k; ``sorted_slots[r]`` is the slot at row r; rows past an expert's count are padding.

Forward:  ``gate_up_kernel``  act(x[tok] @ Wg^T) * (x[tok] @ Wu^T) -> inter (R, F)  [x read by index]
          ``rows_gemm_kernel`` inter @ Wd^T * topk_weight -> per-slot rows (T*K, H)
          (STORE_H, training) also writes the gate/up pre-activations h (T*K, 2F) in slot order
Backward: ``gate_up_kernel`` (STORE_H) recomputes h only when the forward did not store it;
          ``bwd_act_kernel``  dy[tok] @ Wd, h[slot] -> d(topk_weight) partials, dh (R, 2F), a*w (R, F);
          ``wgrad_kernel``    dW[e] = L_e^T R_e over the expert's rows (dW_down, dW_gate_up);
          ``rows_gemm_kernel`` dh @ Wgu -> per-slot dx rows.
"""

import triton
import triton.language as tl

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2/pi); a constexpr global so jit code may read it


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(g, GELU: tl.constexpr):
    if GELU:
        inner = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        return 0.5 * g * (1.0 + _tanh(inner))
    else:
        return g * tl.sigmoid(g)


@triton.jit
def _act_grad(g, GELU: tl.constexpr):
    if GELU:
        inner = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        th = _tanh(inner)
        return 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        s = tl.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))


@triton.jit
def _block_coords(num_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M consecutive row blocks (mostly one expert) sweep the N tiles
    together so the expert's weight tiles are reused from L2."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def gate_up_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    h_ptr,
    sorted_slots_ptr,
    block_expert_ptr,
    expert_start_ptr,
    expert_count_ptr,
    num_blocks,
    N,
    K_DIM,
    TOP_K,
    stride_xt,
    stride_we,
    stride_wn,
    stride_om,
    stride_hm,
    num_experts,
    tune_bucket,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GELU: tl.constexpr,
    STORE_ACT: tl.constexpr,
    STORE_H: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    TMA_OK: tl.constexpr,
    SMALL_M: tl.constexpr,
):
    """``tune_bucket``: unused here; an autotuning key (the launcher's size class of the
    routing, so decode batches of very different sizes get their own tiles).
    x (T, H) gathered by token, w (E, 2N, H): rows [0, N) gate, [N, 2N) up. Two accumulators
    share every x tile; the epilogue writes act(gate) * up (STORE_ACT) and/or gate, up (STORE_H).
    USE_TMA (with TMA_OK: w contiguous, 16-byte rows; and EVEN_K): weight tiles through a tensor
    descriptor over w as (E*2N, K_DIM); gate rows past N read up rows and up rows past 2N the
    next expert's, all in columns the epilogue masks off."""
    pid_m, pid_n = _block_coords(num_blocks, N, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    row_end = tl.load(expert_start_ptr + expert) + tl.load(expert_count_ptr + expert)
    m0 = pid_m * BLOCK_M
    # SMALL_M > 0: an expert's last block with at most SMALL_M rows runs a SMALL_M-row tile
    # (a fraction of the MMA work; the padding rows past SMALL_M are never read downstream).
    if SMALL_M > 0:
        if row_end - m0 <= SMALL_M:
            _gate_up_tile(
                x_ptr, w_ptr, out_ptr, h_ptr, sorted_slots_ptr, block_expert_ptr, expert_start_ptr,
                expert_count_ptr, num_blocks, N, K_DIM, TOP_K, stride_xt, stride_we, stride_wn, stride_om,
                stride_hm, num_experts, SMALL_M, BLOCK_N, BLOCK_K, GROUP_M, GELU, STORE_ACT, STORE_H,
                EVEN_K, USE_TMA, TMA_OK, pid_n, expert, row_end, m0,
            )  # fmt: skip
        else:
            _gate_up_tile(
                x_ptr, w_ptr, out_ptr, h_ptr, sorted_slots_ptr, block_expert_ptr, expert_start_ptr,
                expert_count_ptr, num_blocks, N, K_DIM, TOP_K, stride_xt, stride_we, stride_wn, stride_om,
                stride_hm, num_experts, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, GELU, STORE_ACT, STORE_H,
                EVEN_K, USE_TMA, TMA_OK, pid_n, expert, row_end, m0,
            )  # fmt: skip
    else:
        _gate_up_tile(
            x_ptr, w_ptr, out_ptr, h_ptr, sorted_slots_ptr, block_expert_ptr, expert_start_ptr,
            expert_count_ptr, num_blocks, N, K_DIM, TOP_K, stride_xt, stride_we, stride_wn, stride_om,
            stride_hm, num_experts, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, GELU, STORE_ACT, STORE_H, EVEN_K,
            USE_TMA, TMA_OK, pid_n, expert, row_end, m0,
        )  # fmt: skip


@triton.jit
def _gate_up_tile(
    x_ptr,
    w_ptr,
    out_ptr,
    h_ptr,
    sorted_slots_ptr,
    block_expert_ptr,
    expert_start_ptr,
    expert_count_ptr,
    num_blocks,
    N,
    K_DIM,
    TOP_K,
    stride_xt,
    stride_we,
    stride_wn,
    stride_om,
    stride_hm,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GELU: tl.constexpr,
    STORE_ACT: tl.constexpr,
    STORE_H: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    TMA_OK: tl.constexpr,
    pid_n,
    expert,
    row_end,
    m0,
):
    """The work of one gate_up_kernel program over rows [m0, m0 + BLOCK_M)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < row_end
    # Padding rows read token 0 (always valid memory) and are never used downstream.
    slots = tl.load(sorted_slots_ptr + offs_m, mask=row_ok, other=0)
    tokens = slots // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None].to(tl.int64) * stride_xt + offs_k[None, :]
    wg_ptrs = w_ptr + expert.to(tl.int64) * stride_we + (offs_n % N)[None, :] * stride_wn + offs_k[:, None]
    wu_ptrs = wg_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if USE_TMA and TMA_OK and EVEN_K:
        w_desc = tl.make_tensor_descriptor(
            w_ptr, shape=[num_experts * 2 * N, K_DIM], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K]
        )
        w_row = expert * 2 * N + pid_n * BLOCK_N
    for k0 in range(0, K_DIM, BLOCK_K):
        if USE_TMA and TMA_OK and EVEN_K:
            a = tl.load(x_ptrs)
            g = w_desc.load([w_row, k0]).T
            u = w_desc.load([w_row + N, k0]).T
        elif EVEN_K:
            a = tl.load(x_ptrs)
            g = tl.load(wg_ptrs)
            u = tl.load(wu_ptrs)
        else:
            k_ok = offs_k < K_DIM - k0
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            g = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(wu_ptrs, mask=k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, g, acc_g)
        acc_u = tl.dot(a, u, acc_u)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    n_ok = (offs_n < N)[None, :]
    rows64 = offs_m[:, None].to(tl.int64)
    if STORE_H:
        # h is in slot order (T*K, 2N): its shape needs no alignment, so the forward can
        # hand it to the backward through the custom op's outputs.
        h_ptrs = h_ptr + slots[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
        h_mask = row_ok[:, None] & n_ok
        tl.store(h_ptrs, acc_g.to(h_ptr.dtype.element_ty), mask=h_mask)
        tl.store(h_ptrs + N, acc_u.to(h_ptr.dtype.element_ty), mask=h_mask)
    if STORE_ACT:
        act = _act(acc_g, GELU) * acc_u
        tl.store(out_ptr + rows64 * stride_om + offs_n[None, :], act.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def rows_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    topk_w_ptr,
    sorted_slots_ptr,
    block_expert_ptr,
    expert_start_ptr,
    expert_count_ptr,
    num_blocks,
    N,
    K_DIM,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    num_experts,
    tune_bucket,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    TMA_OK: tl.constexpr,
    W_K_CONTIG: tl.constexpr,
    SMALL_M: tl.constexpr,
):
    """``tune_bucket``: an autotuning key only (see gate_up_kernel).
    out[slot(r)] = (a[r] @ W_e^T) (* topk_weight[slot]) for the valid rows r of each block.
    a (R, K_DIM) is contiguous in row order; W_e element (n, k) at w + e*stride_we + n*stride_wn
    + k*stride_wk (so both Wd (E, H, F) and Wgu (E, 2F, H) fit without a transpose copy).
    USE_TMA (with TMA_OK: w contiguous, 16-byte rows; and EVEN_K): weight tiles through a tensor
    descriptor over w as (E*N, K_DIM) (W_K_CONTIG) or (E*K_DIM, N); rows past the expert's N
    belong to columns the store masks off."""
    pid_m, pid_n = _block_coords(num_blocks, N, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    row_end = tl.load(expert_start_ptr + expert) + tl.load(expert_count_ptr + expert)
    m0 = pid_m * BLOCK_M
    # SMALL_M > 0: an expert's last block with at most SMALL_M rows runs a SMALL_M-row tile
    # (a fraction of the MMA work; the padding rows past SMALL_M are never read downstream).
    if SMALL_M > 0:
        if row_end - m0 <= SMALL_M:
            _rows_gemm_tile(
                a_ptr, w_ptr, out_ptr, topk_w_ptr, sorted_slots_ptr, block_expert_ptr, expert_start_ptr,
                expert_count_ptr, num_blocks, N, K_DIM, stride_am, stride_we, stride_wn, stride_wk,
                stride_om, num_experts, SMALL_M, BLOCK_N, BLOCK_K, GROUP_M, HAS_WEIGHT, EVEN_K, USE_TMA,
                TMA_OK, W_K_CONTIG, pid_n, expert, row_end, m0,
            )  # fmt: skip
        else:
            _rows_gemm_tile(
                a_ptr, w_ptr, out_ptr, topk_w_ptr, sorted_slots_ptr, block_expert_ptr, expert_start_ptr,
                expert_count_ptr, num_blocks, N, K_DIM, stride_am, stride_we, stride_wn, stride_wk,
                stride_om, num_experts, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, HAS_WEIGHT, EVEN_K, USE_TMA,
                TMA_OK, W_K_CONTIG, pid_n, expert, row_end, m0,
            )  # fmt: skip
    else:
        _rows_gemm_tile(
            a_ptr, w_ptr, out_ptr, topk_w_ptr, sorted_slots_ptr, block_expert_ptr, expert_start_ptr,
            expert_count_ptr, num_blocks, N, K_DIM, stride_am, stride_we, stride_wn, stride_wk, stride_om,
            num_experts, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, HAS_WEIGHT, EVEN_K, USE_TMA, TMA_OK,
            W_K_CONTIG, pid_n, expert, row_end, m0,
        )  # fmt: skip


@triton.jit
def _rows_gemm_tile(
    a_ptr,
    w_ptr,
    out_ptr,
    topk_w_ptr,
    sorted_slots_ptr,
    block_expert_ptr,
    expert_start_ptr,
    expert_count_ptr,
    num_blocks,
    N,
    K_DIM,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    TMA_OK: tl.constexpr,
    W_K_CONTIG: tl.constexpr,
    pid_n,
    expert,
    row_end,
    m0,
):
    """The work of one rows_gemm_kernel program over rows [m0, m0 + BLOCK_M)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = (
        w_ptr
        + expert.to(tl.int64) * stride_we
        + (offs_n % N)[None, :] * stride_wn
        + offs_k[:, None].to(tl.int64) * stride_wk
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if USE_TMA and TMA_OK and EVEN_K:
        if W_K_CONTIG:
            w_desc = tl.make_tensor_descriptor(
                w_ptr, shape=[num_experts * N, K_DIM], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K]
            )
            w_row = expert * N + pid_n * BLOCK_N
        else:
            w_desc = tl.make_tensor_descriptor(
                w_ptr, shape=[num_experts * K_DIM, N], strides=[stride_wk, 1], block_shape=[BLOCK_K, BLOCK_N]
            )
            w_row = expert * K_DIM
    for k0 in range(0, K_DIM, BLOCK_K):
        if USE_TMA and TMA_OK and EVEN_K:
            a = tl.load(a_ptrs)
            if W_K_CONTIG:
                w = w_desc.load([w_row, k0]).T
            else:
                w = w_desc.load([w_row + k0, pid_n * BLOCK_N])
        elif EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K_DIM - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    slots = tl.load(sorted_slots_ptr + offs_m, mask=row_ok, other=0)
    if HAS_WEIGHT:
        acc = acc * tl.load(topk_w_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < N)[None, :])


@triton.jit
def bwd_act_kernel(
    dy_ptr,
    w_ptr,
    h_ptr,
    topk_w_ptr,
    dh_ptr,
    aw_ptr,
    dtw_part_ptr,
    sorted_slots_ptr,
    block_expert_ptr,
    expert_start_ptr,
    expert_count_ptr,
    num_blocks,
    N,
    K_DIM,
    TOP_K,
    stride_dyt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_hm,
    stride_dhm,
    stride_awm,
    num_n_tiles,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GELU: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    TMA_OK: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    SMALL_M: tl.constexpr,
):
    """g = dy[tok] @ Wd_e (N = F columns, K_DIM = H). Epilogue, with gate/up from h[slot]:
    a = act(gate)*up; d_topk_weight partial = sum_n g*a; da = w*g; dh = [da*up*act'(gate),
    da*act(gate)]; aw = w*a (the left factor of dW_down). Padding rows write zeros."""
    pid_m, pid_n = _block_coords(num_blocks, N, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    row_end = tl.load(expert_start_ptr + expert) + tl.load(expert_count_ptr + expert)
    m0 = pid_m * BLOCK_M
    # SMALL_M > 0: an expert's last block with at most SMALL_M rows runs a SMALL_M-row tile
    # (a fraction of the MMA work; the padding rows past SMALL_M are never read downstream).
    if SMALL_M > 0:
        if row_end - m0 <= SMALL_M:
            _bwd_act_tile(
                dy_ptr, w_ptr, h_ptr, topk_w_ptr, dh_ptr, aw_ptr, dtw_part_ptr, sorted_slots_ptr,
                block_expert_ptr, expert_start_ptr, expert_count_ptr, num_blocks, N, K_DIM, TOP_K,
                stride_dyt, stride_we, stride_wn, stride_wk, stride_hm, stride_dhm, stride_awm, num_n_tiles,
                num_experts, SMALL_M, BLOCK_N, BLOCK_K, GROUP_M, GELU, EVEN_K, USE_TMA, TMA_OK,
                SPLIT_EPILOGUE, pid_n, expert, row_end, m0,
            )  # fmt: skip
        else:
            _bwd_act_tile(
                dy_ptr, w_ptr, h_ptr, topk_w_ptr, dh_ptr, aw_ptr, dtw_part_ptr, sorted_slots_ptr,
                block_expert_ptr, expert_start_ptr, expert_count_ptr, num_blocks, N, K_DIM, TOP_K,
                stride_dyt, stride_we, stride_wn, stride_wk, stride_hm, stride_dhm, stride_awm, num_n_tiles,
                num_experts, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, GELU, EVEN_K, USE_TMA, TMA_OK,
                SPLIT_EPILOGUE, pid_n, expert, row_end, m0,
            )  # fmt: skip
    else:
        _bwd_act_tile(
            dy_ptr, w_ptr, h_ptr, topk_w_ptr, dh_ptr, aw_ptr, dtw_part_ptr, sorted_slots_ptr,
            block_expert_ptr, expert_start_ptr, expert_count_ptr, num_blocks, N, K_DIM, TOP_K, stride_dyt,
            stride_we, stride_wn, stride_wk, stride_hm, stride_dhm, stride_awm, num_n_tiles, num_experts,
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, GELU, EVEN_K, USE_TMA, TMA_OK, SPLIT_EPILOGUE, pid_n,
            expert, row_end, m0,
        )  # fmt: skip


@triton.jit
def _bwd_act_tile(
    dy_ptr,
    w_ptr,
    h_ptr,
    topk_w_ptr,
    dh_ptr,
    aw_ptr,
    dtw_part_ptr,
    sorted_slots_ptr,
    block_expert_ptr,
    expert_start_ptr,
    expert_count_ptr,
    num_blocks,
    N,
    K_DIM,
    TOP_K,
    stride_dyt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_hm,
    stride_dhm,
    stride_awm,
    num_n_tiles,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GELU: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    TMA_OK: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    pid_n,
    expert,
    row_end,
    m0,
):
    """The work of one bwd_act_kernel program over rows [m0, m0 + BLOCK_M)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < row_end
    slots = tl.load(sorted_slots_ptr + offs_m, mask=row_ok, other=0)
    tokens = slots // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    dy_ptrs = dy_ptr + tokens[:, None].to(tl.int64) * stride_dyt + offs_k[None, :]
    w_ptrs = (
        w_ptr
        + expert.to(tl.int64) * stride_we
        + (offs_n % N)[None, :] * stride_wn
        + offs_k[:, None].to(tl.int64) * stride_wk
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if USE_TMA and TMA_OK and EVEN_K:
        # Wd (E, H=K_DIM, F=N) as (E*K_DIM, N): (BLOCK_K, BLOCK_N) tiles, N contiguous.
        w_desc = tl.make_tensor_descriptor(
            w_ptr, shape=[num_experts * K_DIM, N], strides=[stride_wk, 1], block_shape=[BLOCK_K, BLOCK_N]
        )
        w_row = expert * K_DIM
    for k0 in range(0, K_DIM, BLOCK_K):
        if USE_TMA and TMA_OK and EVEN_K:
            a = tl.load(dy_ptrs)
            w = w_desc.load([w_row + k0, pid_n * BLOCK_N])
        elif EVEN_K:
            a = tl.load(dy_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K_DIM - k0
            a = tl.load(dy_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
        dy_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    wt = tl.load(topk_w_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)
    if SPLIT_EPILOGUE:
        # Two column halves one after the other: half the epilogue's float32 tiles live at
        # once (ptxas: 128-wide N tiles at 8 warps spill ~1 KB a thread without this).
        halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        half_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        part = _bwd_act_epilogue(
            halves[0], half_n, offs_m, row_ok, slots, wt, h_ptr, dh_ptr, aw_ptr, N,
            stride_hm, stride_dhm, stride_awm, GELU,
        )  # fmt: skip
        part += _bwd_act_epilogue(
            halves[1], half_n + BLOCK_N // 2, offs_m, row_ok, slots, wt, h_ptr, dh_ptr, aw_ptr, N,
            stride_hm, stride_dhm, stride_awm, GELU,
        )  # fmt: skip
    else:
        part = _bwd_act_epilogue(
            acc, offs_n, offs_m, row_ok, slots, wt, h_ptr, dh_ptr, aw_ptr, N,
            stride_hm, stride_dhm, stride_awm, GELU,
        )  # fmt: skip
    tl.store(dtw_part_ptr + slots.to(tl.int64) * num_n_tiles + pid_n, part, mask=row_ok)


@triton.jit
def _bwd_act_epilogue(
    g, offs_n, offs_m, row_ok, slots, wt, h_ptr, dh_ptr, aw_ptr, N,
    stride_hm, stride_dhm, stride_awm, GELU: tl.constexpr,
):  # fmt: skip
    """Columns offs_n of bwd_act's epilogue for g = dy @ Wd; returns sum_n g * a per row."""
    n_ok = offs_n < N
    mask = row_ok[:, None] & n_ok[None, :]
    rows64 = offs_m[:, None].to(tl.int64)
    h_ptrs = h_ptr + slots[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    act = _act(gate, GELU)
    a_val = act * up
    part = tl.sum(g * a_val, axis=1)
    aw = tl.where(mask, a_val * wt[:, None], 0.0)
    tl.store(
        aw_ptr + rows64 * stride_awm + offs_n[None, :], aw.to(aw_ptr.dtype.element_ty), mask=n_ok[None, :]
    )
    da = g * wt[:, None]
    dh_ptrs = dh_ptr + rows64 * stride_dhm + offs_n[None, :]
    dup = tl.where(mask, da * act, 0.0)
    tl.store(dh_ptrs + N, dup.to(dh_ptr.dtype.element_ty), mask=n_ok[None, :])
    dgate = tl.where(mask, da * up * _act_grad(gate, GELU), 0.0)
    tl.store(dh_ptrs, dgate.to(dh_ptr.dtype.element_ty), mask=n_ok[None, :])
    return part


@triton.jit
def wgrad_kernel(
    l_ptr,
    r_ptr,
    out_ptr,
    sorted_slots_ptr,
    expert_start_ptr,
    expert_count_ptr,
    M,
    N,
    TOP_K,
    stride_l,
    stride_r,
    stride_oe,
    stride_om,
    L_GATHER: tl.constexpr,
    R_GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[e] (M, N) = sum over e's rows r of L[r, :M]^T R[r, :N]. L/R rows are either the
    padded row buffer (row r) or gathered by token (``*_GATHER``: row = sorted_slots[r] // K).
    One program per (expert, M tile, N tile); the whole row reduction stays in one program
    (deterministic, no atomics). Experts with no rows write zeros."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    expert = pid // tiles
    pid_m = (pid % tiles) // tiles_n
    pid_n = pid % tiles_n
    start = tl.load(expert_start_ptr + expert)
    count = tl.load(expert_count_ptr + expert)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(0, count, BLOCK_K):
        k_ok = offs_k < count - r0
        rows = start + r0 + offs_k
        if L_GATHER or R_GATHER:
            slots = tl.load(sorted_slots_ptr + rows, mask=k_ok, other=0)
            tokens = slots // TOP_K
        if L_GATHER:
            l_rows = tokens
        else:
            l_rows = rows
        if R_GATHER:
            r_rows = tokens
        else:
            r_rows = rows
        lt = tl.load(
            l_ptr + l_rows[None, :].to(tl.int64) * stride_l + (offs_m % M)[:, None],
            mask=k_ok[None, :],
            other=0.0,
        )
        rt = tl.load(
            r_ptr + r_rows[:, None].to(tl.int64) * stride_r + (offs_n % N)[None, :],
            mask=k_ok[:, None],
            other=0.0,
        )
        acc = tl.dot(lt, rt, acc)
    out_ptrs = (
        out_ptr + expert.to(tl.int64) * stride_oe + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def wgrad_rows_kernel(
    l_ptr,
    r_ptr,
    out_ptr,
    expert_start_ptr,
    expert_count_ptr,
    R,
    M,
    N,
    stride_l,
    stride_r,
    stride_oe,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[e] (M, N) = sum over e's rows r of L[r, :M]^T R[r, :N], both operands row buffers in
    the padded row order (gathered copies made beforehand), read through tensor descriptors
    with no index loads in the loop. The last step reads up to BLOCK_K - 1 rows past the
    expert's count: padding rows of its own segment (BLOCK_K divides the alignment block and
    is at most the small-tile rows, so they were written), which the launcher guarantees are
    zero in one operand and finite in the other."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    expert = pid // tiles
    pid_m = (pid % tiles) // tiles_n
    pid_n = pid % tiles_n
    start = tl.load(expert_start_ptr + expert)
    count = tl.load(expert_count_ptr + expert)
    l_desc = tl.make_tensor_descriptor(
        l_ptr, shape=[R, M], strides=[stride_l, 1], block_shape=[BLOCK_K, BLOCK_M]
    )
    r_desc = tl.make_tensor_descriptor(
        r_ptr, shape=[R, N], strides=[stride_r, 1], block_shape=[BLOCK_K, BLOCK_N]
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(0, count, BLOCK_K):
        lt = l_desc.load([start + r0, pid_m * BLOCK_M])
        rt = r_desc.load([start + r0, pid_n * BLOCK_N])
        acc = tl.dot(lt.T, rt, acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = (
        out_ptr + expert.to(tl.int64) * stride_oe + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])
