"""LayerNorm forward kernel over rows of a (M, N) matrix (inference).

A program normalises BLOCK_M rows at once (the whole row, N <= BLOCK_N, is one tile),
statistics in float32, and stores y in x's dtype. PyTorch's own kernel gives each row a
thread block, which for N = 128-256 and 10^5 rows runs at a fraction of the memory
bandwidth. There is no backward kernel: a first one (row blocks looping per program,
partial dW/dB rows) measured 0.3-0.8x PyTorch's fused forward + backward on the H200, so
training keeps PyTorch's LayerNorm (see ``api.layer_norm``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def layer_norm_fwd_kernel(
    X, W, B, Y,
    stride_x, stride_y, M, N, eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(X + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
