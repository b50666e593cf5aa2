"""Launcher for the Gluon (warp-specialised, sm_90) attention backward in ``kernels.bwd_gluon``.

The default dense backward on Hopper for D 64 and 128 (``launch_bwd.attention_bwd`` routes
here unless deterministic mode is on, since dQ's reductions land in a varying order, or
``FLASHMOE_ATTN_GLUON_BWD=0``); everything else runs the Triton kernels of ``launch_bwd``.

Shape letters: B batch, H query heads, H_kv key/value heads, S_q / S_k sequence lengths, D head dim.

Covers dense (B, H, S, D) float16/bfloat16 on sm_90, D 64 and 128 (80, 96, 112 run as 128), full and causal
(bottom-right), GQA/MQA, strides TMA accepts. Same interface as ``launch_bwd.attention_bwd``:
(do, q, k, v, out, lse, causal, scale) -> (dq, dk, dv), lse float32 (B, H, S_q), natural log.

Steps: (1) the Triton ``_bwd_preprocess_padded`` writes delta = rowsum(dO * O) and
lse2 = lse * log2(e) into float32 (B, H, S_pad) buffers (S_pad: S_q rounded up to 128;
delta 0 and lse2 +inf past S_q and where a row saw no key: P = 0 there), and zeroes the float32
dQ buffer; (2) the Gluon kernel accumulates dK, dV per KV block and adds (scaled) dS K into that
buffer by TMA reduce-add; (3) the buffer is cast to dQ's dtype.
"""

from __future__ import annotations

import os

import torch
import triton

from . import launch_gluon

HEAD_DIMS = (64, 128)
_LOG2E = 1.4426950408889634
_S_PAD = 128  # lse2 / delta rows are padded to a multiple of this (>= every BLOCK_M)
_PRE_BLOCK_M = 64

# (BLOCK_M, BLOCK_N per consumer, NUM_STAGES, consumers). Chosen on an H100 (docs/attention_bwd.md,
# benchmarks/attn_bwd_gluon.py): two consumer warpgroups (128 key rows a program, as FA3) beat one
# by 1.3-1.4x at both head dims; a third ring stage did not help; BLOCK_M 128 spilled.
# ``CANDIDATE_CONFIGS`` are what the benchmark's check phase runs and times (the compile test builds
# every one). ``SPILL_BYTES``: ptxas's spill stores allowed per config (the offline sm_90 compile):
# at D128 two consumers hold dK + dV (128 of 240 registers) and a few loop-invariant scalars go to
# the stack (reloaded from L1 a handful of times per tile), not accumulators.
_Cfg = tuple[int, int, int, int]
DEFAULT_CONFIG: dict[int, _Cfg] = {64: (64, 64, 2, 2), 128: (64, 64, 2, 2)}
CANDIDATE_CONFIGS: dict[int, tuple[_Cfg, ...]] = {
    64: ((64, 64, 2, 2), (64, 64, 3, 2), (64, 64, 2, 1)),
    128: ((64, 64, 2, 2), (64, 64, 2, 1)),
}
SPILL_BYTES: dict[tuple[int, _Cfg], int] = {(128, (64, 64, 2, 2)): 128}
# A operands from registers: K of S^T = K Q^T and V of dP^T = V dO^T (loaded once per program) and
# dS^T of dK = dS^T Q (from the registers that computed it; the dQ MMAs still read it from shared
# memory). D64: 1.07-1.09x the shared-memory version on an H100 (docs/attention_bwd.md). D128: K/V in
# registers spill 468-596 bytes (ptxas), dS^T alone measured 0.95-0.99x in 5 of 6 cases: off.
A_REGS: dict[int, bool] = {64: True, 128: False}
# maxnreg at launch (64K registers / SM over 4 + 4 + 1(4) warps) and each consumer's setmaxnreg.
_REGS = {2: (168, 240), 1: (255, 255)}


def enabled() -> bool:
    """``FLASHMOE_ATTN_GLUON_BWD=0`` sends every backward to the Triton kernels."""
    return os.environ.get("FLASHMOE_ATTN_GLUON_BWD", "1").strip().lower() not in ("0", "false", "")


def smem_bytes(config: _Cfg, d: int, elem: int = 2) -> int:
    """Shared memory of a program's tiles (the compiler adds barriers and scratch)."""
    bm, bn, stages, consumers = config
    ring = 2 * stages * bm * d * elem  # Q and dO
    kv = 2 * consumers * bn * d * elem  # K and V (reused to stage dK / dV)
    ds = 2 * consumers * bn * bm * elem  # dS^T, double-buffered
    dq = bm * d * 4  # float32 dQ tiles staged for the TMA reduction
    return ring + kv + ds + dq


def kernel_head_dim(d: int) -> int | None:
    """The head dim the kernel runs d at (64 or 128), or None: 80, 96 and 112 run as 128 with
    128-wide TMA boxes over the real d columns (the rest load as zeros; dK/dV stores and dQ
    reductions clip them), as the Gluon forward does. Other multiples of 8 between 64 and 128,
    which the forward also pads, have not run through this backward on a GPU: they stay on the
    Triton kernels."""
    if d in HEAD_DIMS:
        return d
    return 128 if d in (80, 96, 112) else None


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the Gluon backward covers these dense (B, H, S, D) inputs on this device."""
    if kernel_head_dim(q.shape[-1]) is None or not launch_gluon.supported(q, k, v):
        return False
    return launch_gluon.supported(do, out, out) and do.dtype == q.dtype


def _dq_descriptor(dq_acc: torch.Tensor, rows: int, cols: int):
    """TMA descriptor over the float32 (B, H, S_q, D) dQ accumulator, (1, 1, rows, cols) boxes
    (each consumer reduces its ``cols`` = D / consumers columns of a query tile)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    block = [1, 1, rows, cols]
    return TensorDescriptor(dq_acc, list(dq_acc.shape), list(dq_acc.stride()), block,
                            gl.NVMMASharedLayout.get_default_for(block, gl.float32))  # fmt: skip


def _row_descriptor(t: torch.Tensor, rows: int):
    """TMA descriptor over a float32 (B, H, S_pad) per-row buffer (lse2, delta), (1, 1, rows)
    boxes, unswizzled: the consumers read a box back in the layout of a score tile's columns."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows], layout)


def head_chunk(causal: bool, num_n: int, num_bh: int, d_pad: int, device: torch.device) -> int:
    """(batch, KV head) pairs per chunk of programs (kernel ``_program``).

    Causal programs carry unequal work (a KV block's query rows shrink along the sequence).
    Head by head, the last head's heaviest programs start last and run alone at the end; with
    the KV block index running slowest inside a chunk of heads, every head's heavy blocks start
    before its light ones, which fill the tail. A chunk of about one wave of programs (the
    largest power of two heads with ``chunk * num_n <= SMs``) measured best on an H100
    (docs/attention_bwd.md, session 10; bf16, 16k tokens, interleaved rounds, at the power
    cap): D128 causal 2k / 4k / 8k 1.03 / 1.05 / 1.05x head by head, GQA 32:8 4k 1.10x,
    32:4 8k 1.08x, 16k 1.00x; chunks of two waves or more gave less and a chunk of every head
    0.56-0.97x (the concurrent programs then span many heads' Q/dO in L2). D64 causal 4k:
    0.995-0.997x for every chunk size: head by head there. Full attention: every program has
    the same work, head by head."""
    if not causal or d_pad != 128:
        return 1
    chunk = 1 << max(0, (launch_gluon._num_sms(device) // num_n).bit_length() - 1)
    return max(1, min(chunk, num_bh))


def attention_bwd_gluon(
    do, q, k, v, out, lse, causal: bool, scale: float, config: _Cfg | None = None, chunk: int | None = None
):
    """Dense backward (caller checked ``supported``; S_q, S_k > 0).

    Args:
        do, q, out: (B, H, S_q, D); k, v: (B, H_kv, S_k, D); lse: float32 (B, H, S_q), natural
            log, from the forward (-inf for rows that saw no key).
        config: (BLOCK_M, BLOCK_N, NUM_STAGES, consumers); ``DEFAULT_CONFIG`` when None.
        chunk: (batch, KV head) pairs per program chunk; ``head_chunk`` when None.
    Returns:
        (dq, dk, dv) with the shapes, dtypes and (``empty_like``) strides of q, k, v.
    """
    from . import launch_bwd
    from .kernels import bwd as _triton_k
    from .kernels import bwd_gluon

    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    d_pad = kernel_head_dim(d)
    assert d_pad is not None, f"head dim {d}: not covered by the Gluon backward"
    bm, bn, stages, consumers = config if config is not None else DEFAULT_CONFIG[d_pad]
    s_pad = triton.cdiv(s_q, _S_PAD) * _S_PAD
    dev = q.device

    delta = torch.empty((b, h, s_pad), dtype=torch.float32, device=dev)
    lse2 = torch.empty((b, h, s_pad), dtype=torch.float32, device=dev)
    dq_acc = torch.empty((b, h, s_q, d), dtype=torch.float32, device=dev)  # zeroed by the preprocess
    num_bh = b * h
    _triton_k._bwd_preprocess_padded[(s_pad // _PRE_BLOCK_M, *launch_bwd._bh_axes(num_bh))](
        out, do, lse, delta, lse2, dq_acc, *out.stride()[:3], *do.stride()[:3], *lse.stride(), s_q, s_pad, h,
        num_bh, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=_PRE_BLOCK_M, ZERO_DQ=True,
    )  # fmt: skip
    dq_desc = _dq_descriptor(dq_acc, bm, d_pad // consumers)
    # Gradients with their inputs' strides (``empty_like``), as the custom op's fake
    # implementation promises: a compiled graph views them the way it viewed q, k, v.
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)

    desc = launch_gluon._descriptor
    num_n = triton.cdiv(s_k, consumers * bn)
    grid = (num_n * b * h_kv,)
    if chunk is None:
        chunk = head_chunk(causal, num_n, b * h_kv, d_pad, dev)
    maxnreg, consumer_regs = _REGS[consumers]
    bwd_gluon.attn_bwd_gluon_kernel[grid](
        desc(q, bm, d_pad), desc(do, bm, d_pad), desc(k, bn, d_pad), desc(v, bn, d_pad), desc(dk, bn, d_pad),
        desc(dv, bn, d_pad),
        dq_desc, _row_descriptor(lse2, bm), _row_descriptor(delta, bm),
        h_kv, h // h_kv, s_q, s_k, scale * _LOG2E, scale, chunk,
        HEAD_DIM=d_pad, BLOCK_M=bm, BLOCK_N=bn, NUM_STAGES=stages, NUM_CONSUMERS=consumers,
        CAUSAL=bool(causal), CONSUMER_REGS=consumer_regs, A_REGS=A_REGS[d_pad], num_warps=4,
        maxnreg=maxnreg,
    )  # fmt: skip
    return torch.empty_like(q).copy_(dq_acc), dk, dv
