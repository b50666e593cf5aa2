"""Launcher for the Gluon (warp-specialised, sm_90) attention forward in ``kernels.fwd_gluon``.

Shape letters: B batch, H query heads, H_kv key/value heads, S_q / S_k sequence lengths, D head dim.

Covers dense forward on Hopper (compute capability 9.x), float16/bfloat16, D 64 and 128, full and
causal (bottom-right), GQA/MQA, any strides TMA accepts (16-byte aligned base and strides, last
dim contiguous). ``supported`` says whether a call is covered; everything else goes to the Triton
kernel (``launch``). Gluon does not run under Triton's CPU interpreter.
"""

from __future__ import annotations

import os

import torch
import triton

_LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)

# (BLOCK_M per consumer warpgroup, BLOCK_N, NUM_STAGES, PINGPONG, consumers, schedule): schedule 0
# launches one program per tile, 1 one per SM taking tiles round-robin (persistent), 2 likewise
# with every other round in reverse (persistent, "snake").
_Cfg = tuple[int, int, int, bool, int, int]
# Per head dim and mask, measured on an H200 (docs/attention_fwd.md, runs 2-3; TFLOP/s, bf16,
# 16k tokens). Full: persistent round-robin, D128 2k 608 vs 557 one program per tile, 1k 575
# vs 500. Causal: the snake schedule, D128 2k 558 vs 465, 8k 602 vs 567, but at 16k it lost
# (478 vs 606): there one program per tile is kept. D64: three consumer warpgroups (192 query
# rows a program) and the snake schedule, 513 vs 477 full, 426 vs 399 causal. Ping-pong
# between the consumers made no consistent difference (within the ~5% run-to-run spread).
DEFAULT_CONFIG: dict[tuple[int, bool], _Cfg] = {
    (64, False): (64, 128, 3, False, 3, 2),
    (64, True): (64, 128, 3, False, 3, 2),
    (128, False): (64, 128, 2, False, 2, 1),
    (128, True): (64, 128, 2, False, 2, 2),
}
_LONG_CAUSAL_SEQ = 8192  # causal S_q above this: one program per tile (schedule 0)


def default_config(d: int, causal: bool, s_q: int) -> _Cfg:
    cfg = DEFAULT_CONFIG[(d, bool(causal))]
    if causal and s_q > _LONG_CAUSAL_SEQ:
        cfg = cfg[:5] + (0,)
    return cfg


# Registers per thread at launch (all warpgroups alike; 64K per SM) and what each consumer
# warpgroup gets after setmaxnreg (the producer warp's warpgroup drops to 24).
_REGS = {2: (168, 240), 3: (128, 160)}


def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


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
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        # TMA strides: positive multiples of 16 bytes (a broadcast, stride-0 dim is not one).
        if any((st * es) % 16 or (st <= 0 and n > 1) for st, n in zip(t.stride()[:-1], t.shape[:-1])):
            return False
    return True


def enabled() -> bool:
    """``FLASHMOE_ATTN_GLUON=0`` sends everything to the Triton kernel."""
    return os.environ.get("FLASHMOE_ATTN_GLUON", "1").strip().lower() not in ("0", "false", "")


def _descriptor(t: torch.Tensor, rows: int):
    """4-D TMA descriptor over (B, H, S, D) with (1, 1, rows, D) boxes: rows past S read as zeros
    and are clipped on store."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    block = [1, 1, rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, gdt)
    # A size-1 dim is only ever indexed at 0: give it a valid (positive) stride whatever it had.
    contiguous = [t.shape[1] * t.shape[2] * t.shape[3], t.shape[2] * t.shape[3], t.shape[3], 1]
    strides = [st if n > 1 else c for st, n, c in zip(t.stride(), t.shape, contiguous)]
    return TensorDescriptor(t, list(t.shape), strides, block, layout)


def attention_fwd(q, k, v, causal: bool, scale: float, config: _Cfg | None = None, out=None, lse=None):
    """Dense forward (caller checked ``supported``; S_q, S_k > 0). q (B, H, S_q, D); k, v
    (B, H_kv, S_k, D). Returns out (B, H, S_q, D) contiguous and lse float32 (B, H, S_q)."""
    from .kernels import fwd_gluon

    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    config = config if config is not None else default_config(d, causal, s_q)
    bm, bn, stages, pingpong, consumers, schedule = config
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    tiles = triton.cdiv(s_q, consumers * bm) * b * h
    grid = (min(tiles, _num_sms(q.device)) if schedule else tiles,)
    maxnreg, consumer_regs = _REGS[consumers]
    fwd_gluon.attn_fwd_gluon_kernel[grid](
        _descriptor(q, bm), _descriptor(k, bn), _descriptor(v, bn), _descriptor(out, bm),
        lse, lse.stride(0), lse.stride(1), b, h, h // h_kv, s_q, s_k, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, NUM_STAGES=stages, NUM_CONSUMERS=consumers, CAUSAL=bool(causal),
        PINGPONG=bool(pingpong), CONSUMER_REGS=consumer_regs, SNAKE=schedule == 2,
        num_warps=4, maxnreg=maxnreg,
    )  # fmt: skip
    return out, lse
