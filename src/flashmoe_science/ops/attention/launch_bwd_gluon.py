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
# the stack (reloaded from L1 a handful of times per tile), not accumulators: 116 bytes full
# attention (ping-pong), 124 causal (dK's dS^T from registers; 48 / 72 from shared memory).
_Cfg = tuple[int, int, int, int]
DEFAULT_CONFIG: dict[int, _Cfg] = {64: (64, 64, 2, 2), 128: (64, 64, 2, 2)}
CANDIDATE_CONFIGS: dict[int, tuple[_Cfg, ...]] = {
    64: ((64, 64, 2, 2), (64, 64, 3, 2), (64, 64, 2, 1)),
    128: ((64, 64, 2, 2), (64, 64, 2, 1)),
}
SPILL_BYTES: dict[tuple[int, _Cfg], int] = {(128, (64, 64, 2, 2)): 128}
# A operands from registers: K of S^T = K Q^T and V of dP^T = V dO^T (loaded once per program).
# D64: 1.07-1.09x the shared-memory version on an H100 (docs/attention_bwd.md). D128: K/V in
# registers spill 468-596 bytes (ptxas): off. (dK's dS^T comes from registers at every head dim.)
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


def dq_lag(causal: bool, d_pad: int) -> bool:
    """Whether consumers compute a tile's dQ one tile later (kernel ``DQ_LAG``): by then every
    consumer's dS^T of that tile is written, so the wait for it rarely blocks and the two
    consumers run less in lockstep. H100, bf16, 16k tokens, one process, 30 interleaved rounds
    (docs/attention_bwd.md, session 10): D128 full 2k / 4k / 8k / 16k 1.011 / 1.012 / 1.013 /
    1.034x, D64 full / causal 1.047 / 1.012x; D128 causal 0.985-0.998x (ptxas spills 196 bytes
    there against 72): D128 causal keeps the dQ of the tile it is on."""
    return not causal or d_pad == 64


def pingpong(causal: bool, d_pad: int, group: int) -> int:
    """Kernel ``PINGPONG``: 0, or how the two consumers take turns issuing their products
    (consumer 0 first), so their exponentials and dS^T fall at different times and one's run
    while the other's products hold the tensor cores: 2 = each tile's S^T / dP^T products, 1 =
    those and then its dV / dK / dQ products. H100, bf16, 16k tokens, one process, interleaved
    rounds (docs/attention_bwd.md, session 11), D128 full attention: mode 1 over none 1.035 /
    1.051 / 1.075x at 2k / 8k / 16k; mode 2 over mode 1 1.011-1.012x at 2k-8k,
    1.00-1.03 at 16k, but 0.967-0.973x at GQA 32:8 4k (two runs): mode 2 for MHA, mode 1 for
    GQA/MQA. D128 causal 0.92-0.97x with either (the other consumer's dS^T of the same tile
    gates the dQ product), D64 0.93x: 0 there."""
    if causal or d_pad != 128:
        return 0
    return 2 if group == 1 else 1


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
    0.56-0.98x (the concurrent programs then span many heads' Q/dO in L2). D64 causal 4k:
    0.995-1.011x over two runs, no gain to rely on: head by head there. Full attention: every
    program has the same work, head by head."""
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

    key = None
    if config is None and chunk is None:
        key = _replay_key(do, q, k, v, out, lse, causal)
        res = _replay_bwd(key, do, q, k, v, out, lse, scale)
        if res is not None:
            return res
    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    d_pad = kernel_head_dim(d)
    assert d_pad is not None, f"head dim {d}: not covered by the Gluon backward"
    bm, bn, stages, consumers = config if config is not None else DEFAULT_CONFIG[d_pad]
    s_pad = triton.cdiv(s_q, _S_PAD) * _S_PAD
    dev = q.device

    delta, lse2, dq_acc = _scratch(b, h, s_q, d, s_pad, dev)
    num_bh = b * h
    pre_grid = (s_pad // _PRE_BLOCK_M, *launch_bwd._bh_axes(num_bh))
    pre_params = dict(
        O=out, DO=do, LSE=lse, DELTA=delta, LSE2=lse2, DQ_ACC=dq_acc,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_os=out.stride(2),
        stride_dob=do.stride(0), stride_doh=do.stride(1), stride_dos=do.stride(2),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_ls=lse.stride(2),
        seqlen_q=s_q, S_PAD=s_pad, H=h, NUM_BH=num_bh,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=_PRE_BLOCK_M, ZERO_DQ=True,
    )  # fmt: skip
    pre = _triton_k._bwd_preprocess_padded[pre_grid](**pre_params)
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
    params = dict(
        q_desc=desc(q, bm, d_pad), do_desc=desc(do, bm, d_pad), k_desc=desc(k, bn, d_pad),
        v_desc=desc(v, bn, d_pad), dk_desc=desc(dk, bn, d_pad), dv_desc=desc(dv, bn, d_pad),
        dq_desc=_dq_descriptor(dq_acc, bm, d_pad // consumers), lse_desc=_row_descriptor(lse2, bm),
        delta_desc=_row_descriptor(delta, bm),
        H_KV=h_kv, GROUP=h // h_kv, seqlen_q=s_q, seqlen_k=s_k, qk_scale=scale * _LOG2E, scale=scale,
        HEAD_CHUNK=chunk, HEAD_DIM=d_pad, BLOCK_M=bm, BLOCK_N=bn, NUM_STAGES=stages,
        NUM_CONSUMERS=consumers, CAUSAL=bool(causal), CONSUMER_REGS=consumer_regs, A_REGS=A_REGS[d_pad],
        DQ_LAG=dq_lag(causal, d_pad), PINGPONG=pingpong(causal, d_pad, h // h_kv) if consumers == 2 else 0,
    )  # fmt: skip
    compiled = bwd_gluon.attn_bwd_gluon_kernel[grid](**params, num_warps=4, maxnreg=maxnreg)
    if key is not None:
        _record_bwd(key, q, do, out, lse, pre, pre_grid, pre_params, compiled, grid, params, s_pad)
    return _cast_dq(dq_acc, q), dk, dv


def _scratch(b: int, h: int, s_q: int, d: int, s_pad: int, dev):
    """delta and lse2 (float32 (B, H, S_pad) each, one allocation) and the float32 dQ buffer."""
    delta, lse2 = torch.empty((2, b, h, s_pad), dtype=torch.float32, device=dev).unbind(0)
    dq_acc = torch.empty((b, h, s_q, d), dtype=torch.float32, device=dev)  # zeroed by the preprocess
    return delta, lse2, dq_acc


def _cast_dq(dq_acc: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """dQ in q's dtype with ``empty_like(q)``'s strides (one op when those are dq_acc's)."""
    if q.stride() == dq_acc.stride():
        return dq_acc.to(q.dtype)
    return torch.empty_like(q).copy_(dq_acc)


# Replays (``ops._replay``): a training step at short sequences is host-bound, and Triton's launch
# path (argument specialisation, host descriptor objects) was ~300 of the launcher's ~420 us of
# host time on the H100 machine; replayed, the launcher takes ~115 us (docs/attention_bwd.md,
# session 10). Keyed by everything the two
# compiled kernels and their fixed arguments depend on: the inputs' shapes, strides and dtypes
# (-> B, H, H_kv, S_q, S_k, D, descriptor shapes and strides, the config and the chunk), device
# and mask. Per call only the tensors and the scale change; inputs must be 16-byte aligned (TMA,
# and the preprocess was compiled for aligned pointers), checked per call.
_REPLAYS: dict[tuple, tuple] = {}
_MAX_REPLAYS = 512
_DESC_SLOTS = (
    "q_desc", "do_desc", "k_desc", "v_desc", "dk_desc", "dv_desc", "dq_desc", "lse_desc", "delta_desc",
)  # fmt: skip
_PRE_SLOTS = ("O", "DO", "LSE", "DELTA", "LSE2", "DQ_ACC")


def _replay_key(do, q, k, v, out, lse, causal: bool) -> tuple:
    return (
        q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), do.shape, do.stride(),
        out.shape, out.stride(), lse.shape, lse.stride(), q.dtype, do.dtype, out.dtype, lse.dtype,
        q.device, bool(causal),
    )  # fmt: skip


def _aligned(*tensors: torch.Tensor) -> bool:
    ptr = 0
    for t in tensors:
        ptr |= t.data_ptr()
    return ptr & 15 == 0


def _record_bwd(key, q, do, out, lse, pre, pre_grid, pre_params, compiled, grid, params, s_pad) -> None:
    from .. import _replay
    from .kernels import bwd as _triton_k
    from .kernels import bwd_gluon

    device = launch_gluon._device_index(q.device)
    if pre is None or compiled is None or device != torch.cuda.current_device() or not _replay.active():
        return
    if not _aligned(out, do, lse):  # the preprocess was compiled for these pointers' alignment
        return
    pre_names = list(_triton_k._bwd_preprocess_padded.arg_names)
    names = list(bwd_gluon.attn_bwd_gluon_kernel.arg_names)
    if set(pre_names) != set(pre_params) or set(names) != set(params):
        return
    if pre_names[: len(_PRE_SLOTS)] != list(_PRE_SLOTS):
        return
    # Templates keep no tensor of this call alive: the per-call slots are filled by _replay_bwd.
    pre_tail = tuple(pre_params[n] for n in pre_names[len(_PRE_SLOTS) :])
    slots = tuple(names.index(n) for n in (*_DESC_SLOTS, "qk_scale", "scale"))
    template = [None if i in slots else params[n] for i, n in enumerate(names)]
    descs = tuple((params[n].shape, params[n].strides) for n in _DESC_SLOTS)
    if len(_REPLAYS) >= _MAX_REPLAYS:
        _REPLAYS.clear()
    _REPLAYS[key] = (
        _replay.Replay(pre, pre_grid, device), pre_tail, _replay.Replay(compiled, grid, device), template,
        slots, descs, s_pad,
    )  # fmt: skip


def _replay_bwd(key, do, q, k, v, out, lse, scale: float):
    """The backward by replay of kernels recorded for this metadata, or None (not recorded yet,
    unaligned data, launch hooks installed, another current device)."""
    entry = _REPLAYS.get(key)
    if entry is None or not _aligned(q, k, v, do, out, lse):
        return None
    from .. import _replay

    replay_pre, pre_tail, replay_k, template, slots, descs, s_pad = entry
    if replay_k.device != torch.cuda.current_device() or not _replay.active():
        return None
    b, h, s_q, d = q.shape
    delta, lse2, dq_acc = _scratch(b, h, s_q, d, s_pad, q.device)
    replay_pre(out, do, lse, delta, lse2, dq_acc, *pre_tail)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    args = list(template)
    tma = _replay.TmaArg
    for slot, t, (shape, strides) in zip(slots, (q, do, k, v, dk, dv, dq_acc, lse2, delta), descs):
        args[slot] = tma(t, shape, strides)
    args[slots[-2]] = scale * _LOG2E
    args[slots[-1]] = scale
    replay_k(*args)
    return _cast_dq(dq_acc, q), dk, dv
