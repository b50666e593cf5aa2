"""``layer_norm``: LayerNorm over the last dim as a ``torch.library`` custom op.

CUDA float16/bfloat16 inputs run the Triton kernels (``kernels.py``); everything else the
plain-PyTorch reference (statistics in float32, float64 for float64 inputs). Same maths as
``torch.nn.functional.layer_norm`` (biased variance, ``eps`` inside the square root). The
backward is registered on the op, so ``torch.compile`` traces it without graph breaks.

Shape letters: M rows (all leading dims), N the normalised size.
"""

from __future__ import annotations

import torch
import triton

from ..._backend import select_backend
from ..._validation import check_tensor
from . import kernels

_LIB = "flashmoe_science"
MAX_N = 8192  # one row is one register tile; wider rows take the reference path
_BWD_PROGRAMS = 1024


def _ref_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _block_m(block_n: int) -> int:
    return max(1, min(64, 4096 // block_n))


# ---------------------------------------------------------------- forward
@torch.library.custom_op(f"{_LIB}::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, use_kernel: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if use_kernel:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        if m:
            block_n = triton.next_power_of_2(n)
            block_m = _block_m(block_n)
            kernels.layer_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
                x2, weight, bias if bias is not None else weight, y, mean, rstd,
                x2.stride(0), y.stride(0), m, n, eps,
                HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
            )  # fmt: skip
        return y.view(x.shape), mean, rstd
    cd = _ref_dtype(x)
    xf = x2.to(cd)
    mean = xf.mean(-1)
    xc = xf - mean[:, None]
    rstd = torch.rsqrt((xc * xc).mean(-1) + eps)
    y = xc * rstd[:, None] * weight.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype).view(x.shape), mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, use_kernel):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    dt = _ref_dtype(x)
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        x.new_empty(m, dtype=dt),
        x.new_empty(m, dtype=dt),
    )


# ---------------------------------------------------------------- backward
@torch.library.custom_op(f"{_LIB}::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    dy2 = dy.reshape(-1, n)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
    m = x2.shape[0]
    if use_kernel:
        dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
        block_n = triton.next_power_of_2(n)
        block_m = _block_m(block_n)
        grid = max(1, min(_BWD_PROGRAMS, triton.cdiv(m, block_m)))
        dw_part = torch.empty((grid, n), dtype=torch.float32, device=x.device)
        db_part = torch.empty((grid, n), dtype=torch.float32, device=x.device)
        kernels.layer_norm_bwd_kernel[(grid,)](
            dy2, x2, weight, mean, rstd, dx, dw_part, db_part,
            dy2.stride(0), x2.stride(0), dx.stride(0), m, n,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
        return dx.view(x.shape), dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)
    cd = mean.dtype
    xhat = (x2.to(cd) - mean[:, None]) * rstd[:, None]
    dyf = dy2.to(cd)
    g = dyf * weight.to(cd)
    dx = (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd[:, None]
    dw = (dyf * xhat).sum(0)
    db = dyf.sum(0)
    return dx.to(x.dtype).view(x.shape), dw.to(weight.dtype), db.to(weight.dtype)


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, use_kernel):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty_like(weight),
        torch.empty_like(weight),
    )


def _setup(ctx, inputs, output):
    x, weight, bias, eps, use_kernel = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias, ctx.use_kernel = bias is not None, use_kernel


def _backward(ctx, dy, d_mean, d_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd(dy, x, weight, mean, rstd, ctx.use_kernel)
    return dx, dw, (db if ctx.has_bias else None), None, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` (any leading shape) with ``weight``/``bias`` (N,).

    Matches ``torch.nn.functional.layer_norm(x, (N,), weight, bias, eps)``; on CUDA in
    float16/bfloat16 it runs one fused Triton kernel each way (float32 statistics)."""
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=1)
    if x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"x has last dim {x.shape[-1] if x.dim() else None}; expected weight's size {weight.shape[0]}"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape != weight.shape:
            raise ValueError(
                f"bias has shape {tuple(bias.shape)}; expected {tuple(weight.shape)} like weight"
            )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must match")
    use_kernel = (
        select_backend(x) == "triton"
        and x.dtype in (torch.float16, torch.bfloat16)
        and 0 < x.shape[-1] <= MAX_N
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
    )
    y, _, _ = layer_norm_fwd(x, weight, bias, float(eps), use_kernel)
    return y


__all__ = ["layer_norm"]
