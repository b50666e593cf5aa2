"""Launcher for the Gluon (warp-specialised, sm_90) attention forward in ``kernels.fwd_gluon``.

Shape letters: B batch, H query heads, H_kv key/value heads, S_q / S_k sequence lengths, D head dim.

Covers dense forward on Hopper (compute capability 9.x), float16/bfloat16, D 64 and 128, full and
causal (bottom-right), GQA/MQA, any strides TMA accepts (16-byte aligned base and strides, last
dim contiguous). ``supported`` says whether a call is covered; everything else goes to the Triton
kernel (``launch``). Gluon does not run under Triton's CPU interpreter.
"""

from __future__ import annotations

import torch
import triton

_LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)

# (BLOCK_M per consumer warpgroup, BLOCK_N, NUM_STAGES, PINGPONG) per head dim.
_Cfg = tuple[int, int, int, bool]
DEFAULT_CONFIG: dict[int, _Cfg] = {64: (64, 128, 3, True), 128: (64, 128, 2, True)}
# Registers per thread: 168 at launch for 3 warpgroups (2 consumers + the producer's); the
# producer warp drops to 24 and the consumers rise to 240 (setmaxnreg).
_MAXNREG = 168


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Gluon kernel covers these dense (B, H, S, D) inputs on this device."""
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[-1] not in HEAD_DIMS:
        return False
    for t in (q, k, v):
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _descriptor(t: torch.Tensor, rows: int):
    """4-D TMA descriptor over (B, H, S, D) with (1, 1, rows, D) boxes: rows past S read as zeros
    and are clipped on store."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    block = [1, 1, rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, gdt)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def attention_fwd(q, k, v, causal: bool, scale: float, config: _Cfg | None = None, out=None, lse=None):
    """Dense forward (caller checked ``supported``; S_q, S_k > 0). q (B, H, S_q, D); k, v
    (B, H_kv, S_k, D). Returns out (B, H, S_q, D) contiguous and lse float32 (B, H, S_q)."""
    from .kernels import fwd_gluon

    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    bm, bn, stages, pingpong = config if config is not None else DEFAULT_CONFIG[d]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(s_q, 2 * bm) * b * h,)
    fwd_gluon.attn_fwd_gluon_kernel[grid](
        _descriptor(q, bm), _descriptor(k, bn), _descriptor(v, bn), _descriptor(out, bm),
        lse, lse.stride(0), lse.stride(1), h, h // h_kv, s_q, s_k, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, NUM_STAGES=stages, CAUSAL=bool(causal), PINGPONG=bool(pingpong),
        num_warps=4, maxnreg=_MAXNREG,
    )  # fmt: skip
    return out, lse
