"""Launcher for the Gluon (warp-specialised, sm_90) attention forward in ``kernels.fwd_gluon``.

Shape letters: B batch, H query heads, H_kv key/value heads, S_q / S_k sequence lengths, D head dim.

Covers dense forward on Hopper (compute capability 9.x), float16/bfloat16, D 64, 128 and 256,
and D between 64 and 128 that is a multiple of 8 (80, 96, 112, ...: run as 128 inside the
kernel, see ``padded_head_dim``), full and causal (bottom-right), GQA/MQA, any strides TMA
accepts (16-byte aligned base and strides, last dim contiguous). ``supported`` says whether a
call is covered; everything else goes to the Triton kernel (``launch``). Gluon does not run
under Triton's CPU interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

_LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128, 256)  # the kernel's (padded) head dims
# Shared memory a program may take (sm_90: 227 KB), less room for the mbarriers.
_SMEM_LIMIT = 227 * 1024 - 1024


def _pad(d: int) -> int:
    """The kernel head dim a head dim d runs at: the smallest of ``HEAD_DIMS`` >= d."""
    return next((p for p in HEAD_DIMS if p >= d), 0)


def padded_head_dim(d: int) -> int | None:
    """The head dim the dispatch runs d at, or None where the Gluon kernel is not used.
    64, 128 and 256 run as they are. A multiple of 8 between 64 and 128 (80, 96, 112) runs as
    128: the TMA descriptors span the real d columns with a 128-wide box, so the missing
    columns load as zeros and the output store clips them (no padded copy of q/k/v). Below 64
    (32: half the MMA work would be padding) and between 128 and 256 stay on the Triton kernel."""
    if d in HEAD_DIMS:
        return d
    if 64 < d < 128 and d % 8 == 0:
        return 128
    return None


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
# D128 full moved from round-robin to snake (runs 6 and 8, snake vs round-robin: 2k 596 / 596
# and 622 / 600, 16k 653 / 633, 1k 571 / 567 and 585 / 572, 512 509 / 505 and 518 / 511).
# D256: BLOCK_N 64 and 2 stages, with the output staged in Q's buffer (``smem_bytes``): Q 64 KB +
# K/V ring 128 KB; a separate 64 KB output buffer would need 256 KB. H200, B4 H16 S4k (run 6):
# snake 667 full / 604 causal vs one program per tile 633 / 581, round-robin 630 / 524, and
# BLOCK_N 32 with 3 stages and its own output buffer 508 / 468 (cuDNN 659 / 592); run 8 had
# snake 653 / 598 and per tile 679 / 605: the schedules are within the spread there.
# D80/D96 take D128's configs (run 6, D96 4k: full 496 vs cuDNN 514, causal 458 vs 409; snake
# vs round-robin at D96 full 489 / 478 and 500 / 488 in runs 6 and 8).
# D64 since session 8 (H100, one process, 5 rotated rounds, B*S = 16k, H32; previous (3 stages, no
# ping-pong) vs ping-pong with 2 stages, TFLOP/s): causal 2k 350 / 368, 4k 419 / 422, full 2k 470 /
# 479, 4k 486 / 481, 16k 507 / 520; and causal above 4k one program per tile: 8k 425 -> 448, 16k
# 432 -> 477 (persistent at 4k: 422 vs 384 per tile). See docs/attention_fwd.md.
DEFAULT_CONFIG: dict[tuple[int, bool], _Cfg] = {
    (64, False): (64, 128, 2, True, 3, 2),
    (64, True): (64, 128, 2, True, 3, 2),
    (128, False): (64, 128, 2, False, 2, 2),
    (128, True): (64, 128, 2, False, 2, 2),
    (256, False): (64, 64, 2, False, 2, 2),
    (256, True): (64, 64, 2, False, 2, 2),
}
# Causal S_q above this (per padded head dim): one program per tile (schedule 0).
_LONG_CAUSAL_SEQ = {64: 4096, 128: 8192, 256: 8192}
# D64 short sequences: two consumers (128-row tiles) instead of three (192 rows: at 512 rows three
# tiles hold 576, and a causal tile's work is more uneven). H100, same process, 5 rounds, TFLOP/s
# three consumers / this: causal 512 128 / 203, 1k 207 / 316, 2k 365 / 380; full 512 373 / 396,
# 1k 414 / 436 (cuDNN 260, 336, 386, 385, 425). Used up to S_q 1024, and 2048 for causal.
_D64_SHORT: _Cfg = (64, 128, 3, False, 2, 2)


def default_config(d: int, causal: bool, s_q: int) -> _Cfg:
    """Config for (padded) head dim d."""
    cfg = DEFAULT_CONFIG[(_pad(d), bool(causal))]
    if _pad(d) == 64 and s_q <= (2048 if causal else 1024):
        cfg = _D64_SHORT
    if causal and s_q > _LONG_CAUSAL_SEQ[_pad(d)]:
        cfg = cfg[:5] + (0,)
    return cfg


# Registers per thread at launch (all warpgroups alike; 64K per SM) and what each consumer
# warpgroup gets after setmaxnreg (the producer warp's warpgroup drops to 24).
_REGS = {2: (168, 240), 3: (128, 160)}


def smem_bytes(config: _Cfg, d_pad: int, elem: int = 2) -> tuple[int, bool]:
    """(Shared memory of a program's tiles, whether the output is staged in Q's buffer): the
    output gets its own buffer (so the next tile's Q loads under this one's epilogue) unless
    that would not fit."""
    bm, bn, stages, _, consumers, _ = config
    q = consumers * bm * d_pad * elem
    ring = 2 * stages * bn * d_pad * elem
    o_in_q = 2 * q + ring > _SMEM_LIMIT
    return (q + ring if o_in_q else 2 * q + ring), o_in_q


# Host cost per launch matters at short sequences (a 512-token causal forward takes ~30 us on
# the GPU): device queries and shared-memory layouts are cached, and descriptors are built
# without re-running checks that ``supported`` made (``_descriptor``).
@functools.cache
def _device_props(index: int) -> tuple[int, int]:
    p = torch.cuda.get_device_properties(index)
    return p.major, p.multi_processor_count


def _device_index(device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _num_sms(device) -> int:
    return _device_props(_device_index(device))[1]


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Gluon kernel covers these dense (B, H, S, D) inputs on this device."""
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return False
    if _device_props(_device_index(q.device))[0] != 9:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if padded_head_dim(q.shape[-1]) is None:
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


@functools.lru_cache(maxsize=64)
def _smem_layout(rows: int, width: int, bf16: bool):
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, width], gl.bfloat16 if bf16 else gl.float16)


def _descriptor(t: torch.Tensor, rows: int, d_pad: int | None = None):
    """4-D TMA descriptor over (B, H, S, D) with (1, 1, rows, d_pad) boxes (d_pad >= D, default
    D): rows past S and columns past D read as zeros and are clipped on store."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    width = d_pad or t.shape[-1]
    # A size-1 dim is only ever indexed at 0: give it a valid (positive) stride whatever it had.
    shape = list(t.shape)
    contiguous = [shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1]
    strides = [st if n > 1 else c for st, n, c in zip(t.stride(), shape, contiguous)]
    if _FAST_DESCRIPTORS:
        # TensorDescriptor's __post_init__ re-checks what ``supported`` checked (alignment,
        # strides) at ~10 us a descriptor on the host: fill the dataclass's fields directly.
        desc = object.__new__(TensorDescriptor)
        desc.__dict__.update(
            base=t, shape=shape, strides=strides, block_shape=[1, 1, rows, width],
            layout=_smem_layout(rows, width, t.dtype == torch.bfloat16), padding="zero",
        )  # fmt: skip
        return desc
    return TensorDescriptor(
        t, shape, strides, [1, 1, rows, width], _smem_layout(rows, width, t.dtype == torch.bfloat16)
    )


_FAST_DESCRIPTORS = True


def attention_fwd(
    q, k, v, causal: bool, scale: float, config: _Cfg | None = None, out=None, lse=None, record: bool = False
):
    """Dense forward (caller checked ``supported``; S_q, S_k > 0). q (B, H, S_q, D); k, v
    (B, H_kv, S_k, D). Returns out (B, H, S_q, D) contiguous and lse float32 (B, H, S_q).
    ``scale`` is the caller's (the API's default is 1/sqrt(D) of the real D, not the padded one).
    The kernel runs at head dim ``_pad(D)``; tests and benchmarks may call this directly for a D
    the dispatch keeps on the Triton kernel (e.g. 32, run as 64).

    ``record``: keep the compiled kernel for ``replay_fwd`` on later calls with the same
    metadata (the dispatch passes it; only with the default config and contiguous out/lse)."""
    from .kernels import fwd_gluon

    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    d_pad = _pad(d)
    assert d_pad and d % 8 == 0, f"head dim {d}: not covered by the Gluon kernel"
    record = record and config is None
    config = config if config is not None else default_config(d_pad, causal, s_q)
    bm, bn, stages, pingpong, consumers, schedule = config
    _, o_in_q = smem_bytes(config, d_pad, q.element_size())
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    tiles = triton.cdiv(s_q, consumers * bm) * b * h
    grid = (min(tiles, _num_sms(q.device)) if schedule else tiles,)
    maxnreg, consumer_regs = _REGS[consumers]
    params = dict(
        q_desc=_descriptor(q, bm, d_pad), k_desc=_descriptor(k, bn, d_pad), v_desc=_descriptor(v, bn, d_pad),
        o_desc=_descriptor(out, bm, d_pad), Lse=lse, stride_lb=lse.stride(0), stride_lh=lse.stride(1),
        B=b, H=h, GROUP=h // h_kv, seqlen_q=s_q, seqlen_k=s_k, qk_scale=scale * _LOG2E,
        HEAD_DIM=d_pad, BLOCK_M=bm, BLOCK_N=bn, NUM_STAGES=stages, NUM_CONSUMERS=consumers,
        CAUSAL=bool(causal), PINGPONG=bool(pingpong), CONSUMER_REGS=consumer_regs, SNAKE=schedule == 2,
        O_IN_Q=o_in_q,
    )  # fmt: skip
    compiled = fwd_gluon.attn_fwd_gluon_kernel[grid](**params, num_warps=4, maxnreg=maxnreg)
    if record and out.is_contiguous() and lse.is_contiguous():
        _record_fwd(q, k, v, causal, compiled, grid, params)
    return out, lse


# Replays of the forward (``ops._replay``): eager inference at short sequences is host-bound
# (a 512-token causal forward is ~30 us on the GPU; Triton's launch path alone took 35-40 us
# of host time on the H100 machine). Keyed by everything the compiled kernel and its fixed
# arguments depend on: q/k/v shapes and strides (-> B, H, GROUP, S_q, S_k, the descriptors'
# shapes and strides, the config), dtype, device and the mask. Per call only the tensors,
# the scale and the 16-byte alignment of q/k/v change (checked in ``replay_fwd``).
_REPLAYS: dict[tuple, tuple] = {}
_MAX_REPLAYS = 512
_SLOTS = ("q_desc", "k_desc", "v_desc", "o_desc", "Lse", "qk_scale")


def _replay_key(q, k, v, causal: bool) -> tuple:
    return (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device, causal)


def _record_fwd(q, k, v, causal, compiled, grid, params) -> None:
    from .. import _replay
    from .kernels import fwd_gluon

    names = list(fwd_gluon.attn_fwd_gluon_kernel.arg_names)
    device = _device_index(q.device)
    if set(names) != set(params) or device != torch.cuda.current_device() or not _replay.active():
        return
    slots = tuple(names.index(n) for n in _SLOTS)
    # The per-call slots are filled by ``replay_fwd``: the template must not keep this call's
    # tensors (q, k, v, out, lse) alive for as long as the entry lives.
    template = [None if i in slots else params[n] for i, n in enumerate(names)]
    descs = tuple((params[n].shape, params[n].strides) for n in _SLOTS[:4])
    if len(_REPLAYS) >= _MAX_REPLAYS:
        _REPLAYS.clear()
    _REPLAYS[_replay_key(q, k, v, bool(causal))] = (
        _replay.Replay(compiled, grid, device),
        template,
        slots,
        descs,
        tuple(params["Lse"].shape),
    )


def replay_fwd(q, k, v, causal: bool, scale: float, empty):
    """The forward by replay of a kernel recorded for this metadata, or None (no recording
    yet, unaligned data, launch hooks installed, another current device). ``empty(shape,
    dtype, device)`` allocates out and lse (the dispatch's allocator)."""
    entry = _REPLAYS.get(_replay_key(q, k, v, causal))
    if entry is None or (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15:
        return None
    from .. import _replay

    replay, template, slots, descs, lse_shape = entry
    if replay.device != torch.cuda.current_device() or not _replay.active():
        return None
    out = empty(q.shape, q.dtype, q.device)
    lse = empty(lse_shape, torch.float32, q.device)
    if (out.data_ptr() | lse.data_ptr()) & 15 or not out.is_contiguous() or not lse.is_contiguous():
        return None
    args = list(template)
    sq, sk, sv, so, sl, ss = slots
    args[sq] = _replay.TmaArg(q, *descs[0])
    args[sk] = _replay.TmaArg(k, *descs[1])
    args[sv] = _replay.TmaArg(v, *descs[2])
    args[so] = _replay.TmaArg(out, *descs[3])
    args[sl] = lse
    args[ss] = scale * _LOG2E
    replay(*args)
    return out, lse
