"""Launchers for the attention forward kernel: the only place that knows grids and configs.

Shape letters: B batch, H query heads, H_kv key/value heads, S_q / S_k sequence lengths,
D head dim, T_q / T_k packed tokens (varlen).

Config choice. On CUDA the block sizes, pipelining depth and warps are autotuned per
(head dim, causal, varlen, sequence-length class, dtype) over a short pruned list
(``_candidates``); Triton caches the winner in memory and, with ``cache_results``, on disk,
so the tuning cost is paid once per key. ``FLASHMOE_ATTN_AUTOTUNE=0`` skips tuning and uses
the first candidate (the measured best, see docs/attention_fwd.md); tests use that to keep
compile time down. Under ``TRITON_INTERPRET=1`` one small fixed config runs.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from ..._backend import interpreter_enabled
from . import launch_gluon, launch_short
from .kernels import fwd

SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 256)
_LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_stages, num_warps) per (padded head dim, causal, sequence class),
# best first: the first is the untuned default, the rest is what the autotuner also tries.
# Measured on an H100 (docs/attention_fwd.md): BLOCK_M 64 with 4 warps and 3 stages won at
# D 64 and 128, full and causal, 1k and 4k (D128 4k full: 496 TFLOP/s vs 456 for 128x128x8
# warps). Two such programs fit one SM (112 KB shared memory each at D 128), so one's
# softmax overlaps the other's MMAs; 128x128 with 8 warps holds a whole SM alone (204
# registers/thread, 12.5% occupancy in Nsight Compute).
_Cfg = tuple[int, int, int, int]
_LONG: dict[tuple[int, bool], tuple[_Cfg, ...]] = {
    (32, False): ((64, 64, 3, 4), (128, 64, 3, 8), (128, 64, 3, 4)),
    (32, True): ((64, 64, 3, 4), (128, 64, 3, 8), (64, 32, 3, 4)),
    (64, False): ((64, 64, 3, 4), (128, 64, 3, 8), (128, 64, 3, 4), (64, 64, 4, 4)),
    (64, True): ((64, 64, 3, 4), (64, 64, 4, 4), (128, 64, 3, 4), (64, 32, 3, 4)),
    (128, False): ((64, 64, 3, 4), (128, 128, 3, 8), (64, 64, 2, 4), (64, 32, 3, 4)),
    (128, True): ((64, 64, 3, 4), (128, 128, 3, 8), (64, 64, 2, 4), (64, 32, 3, 4)),
    (256, False): ((128, 64, 2, 8), (64, 64, 2, 4), (64, 32, 3, 4)),
    (256, True): ((64, 64, 2, 4), (128, 64, 2, 8), (64, 32, 3, 4)),
}
# Sequences <= 1k.
_SHORT: dict[tuple[int, bool], tuple[_Cfg, ...]] = {
    (32, False): ((64, 64, 3, 4), (64, 32, 3, 4), (128, 64, 3, 8)),
    (32, True): ((64, 64, 3, 4), (64, 32, 3, 4)),
    (64, False): ((64, 64, 3, 4), (64, 32, 3, 4), (128, 64, 3, 8)),
    (64, True): ((64, 64, 3, 4), (64, 32, 3, 4)),
    (128, False): ((64, 64, 3, 4), (128, 128, 3, 8), (64, 32, 3, 4)),
    (128, True): ((64, 64, 3, 4), (128, 128, 3, 8), (64, 32, 3, 4)),
    (256, False): ((64, 64, 2, 4), (64, 32, 3, 4), (128, 64, 2, 8)),
    (256, True): ((64, 64, 2, 4), (64, 32, 3, 4)),
}
_INTERPRETER_CONFIG: _Cfg = (32, 16, 1, 4)


def head_dim_supported(d: int) -> bool:
    """``SUPPORTED_HEAD_DIMS``, and any multiple of 8 between 64 and 128 (80, 96, 112: run as 128
    with the missing columns zero-filled)."""
    return d in SUPPORTED_HEAD_DIMS or (64 < d < 128 and d % 8 == 0)


def _head_dim_pad(d: int) -> int:
    return 128 if 64 < d < 128 else d


def _seq_bucket(max_seqlen_q: int, max_seqlen_k: int) -> int:
    """Sequence-length class keying the autotuner: <=1k, <=4k, longer."""
    n = max(max_seqlen_q, max_seqlen_k)
    return 0 if n <= 1024 else (1 if n <= 4096 else 2)


def _candidates(head_dim_pad: int, causal: bool, bucket: int) -> tuple[_Cfg, ...]:
    return (_SHORT if bucket == 0 else _LONG)[(head_dim_pad, bool(causal))]


def _set_block_shapes(nargs) -> None:
    """Autotune pre-hook: host descriptors' block shapes follow the config being tried."""
    if isinstance(nargs["Q_desc"], TensorDescriptor):
        bm, bn, dp = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM_PAD"]
        nargs["Q_desc"].block_shape = [bm, dp]
        nargs["K_desc"].block_shape = [bn, dp]
        nargs["V_desc"].block_shape = [bn, dp]


def _all_configs() -> list[triton.Config]:
    seen: list[_Cfg] = []
    for table in (_LONG, _SHORT):
        for cands in table.values():
            seen.extend(c for c in cands if c not in seen)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=st, num_warps=nw, pre_hook=_set_block_shapes)
        for bm, bn, st, nw in seen
    ]


def _prune(configs, named_args, **kwargs):
    """Keep the candidates listed for this head dim, mask and sequence-length class."""
    wanted = _candidates(kwargs["HEAD_DIM_PAD"], kwargs["CAUSAL"], kwargs["SEQ_BUCKET"])
    kept = [
        c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, c.num_warps) in wanted
    ]
    return kept or configs[:1]


_tuned_kernel = triton.autotune(
    configs=_all_configs(),
    key=["HEAD_DIM_PAD", "CAUSAL", "VARLEN", "USE_TMA", "SEQ_BUCKET"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(fwd.attn_fwd_kernel)


def _autotune_enabled() -> bool:
    return os.environ.get("FLASHMOE_ATTN_AUTOTUNE", "1").strip() not in ("0", "false", "")


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot run these inputs, or None. Called by ``api`` on the kernel path."""
    d = q.shape[-1]
    if not head_dim_supported(d):
        dims = ", ".join(str(x) for x in SUPPORTED_HEAD_DIMS)
        extra = "and multiples of 8 between 64 and 128"
        return f"head_dim {d} is not supported by the kernel; supported: {dims} {extra}"
    if q.dtype not in (torch.float16, torch.bfloat16) and not (
        interpreter_enabled() and q.dtype == torch.float32
    ):
        return f"dtype {q.dtype} is not supported by the kernel; supported: float16, bfloat16"
    if not q.is_cuda and not interpreter_enabled():
        return f"tensors on {q.device.type!r} need CUDA (or TRITON_INTERPRET=1)"
    return None


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests replace it with a NaN-filled one so unwritten elements fail)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs a 16-byte-aligned base and 16-byte-multiple strides (last dim contiguous)."""
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 != 0:
            return False
        if any((s * es) % 16 != 0 for s in t.stride()[:-1]):
            return False
    return True


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need a scratch allocator (128 B per descriptor)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):

        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda")

        triton.set_allocator(alloc)


def _rows_of_row_view(t: torch.Tensor, row_stride: int) -> int | None:
    """Rows of a 2-D (rows, D) view with stride ``row_stride`` that covers ``t``, when every
    leading stride of ``t`` is a whole number of rows (contiguous (B, H, S, D) is); else None."""
    if row_stride <= 0 or any(st % row_stride for st in t.stride()[:-1]):
        return None
    return sum((n - 1) * st for n, st in zip(t.shape[:-1], t.stride()[:-1])) // row_stride + 1


def _pick_mode(requested, q, k, v, out, row_strides) -> int:
    """0 pointers, 1 per-program descriptors, 2 host descriptors over a row view (see fwd)."""
    if requested is None:
        on_hopper = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
        # Padded head dims other than 96 (80, 112, ...) take 96's mode.
        requested = _DEFAULT_MODE.get(q.shape[-1], 1) if (on_hopper or interpreter_enabled()) else 0
    requested = int(requested)
    if requested == 0 or not _tma_ok(q, k, v, out):
        return 0
    host_ok = q.shape[-1] == _head_dim_pad(q.shape[-1]) and all(
        _rows_of_row_view(t, rs) is not None for t, rs in zip((q, k, v), row_strides)
    )
    return 2 if (requested == 2 and host_ok) else 1


# Load mode per head dim, measured on the H100 (docs/attention_fwd.md), BLOCK 64x64:
# D128 4k full: pointers 423, per-program descriptors 477, host descriptors 496 TFLOP/s;
# D64 4k full: 400 / 367 / 368 and causal 327 / 290 / 279, so D <= 64 keeps pointer loads.
# A host descriptor needs the row view (D == D_PAD); mode 2 falls back to 1 otherwise.
_DEFAULT_MODE = {32: 0, 64: 0, 96: 1, 128: 2, 256: 2}


def _launch(
    q, k, v, out, lse, cu_q, cu_k, strides_q, strides_k, strides_v, strides_o, strides_lse,
    batch, heads, group, seqlen_q, seqlen_k, scale, causal, varlen, config=None, use_tma=None,
):  # fmt: skip
    d = q.shape[-1]
    d_pad = _head_dim_pad(d)
    interp = interpreter_enabled() and not q.is_cuda
    row_strides = (strides_q[2], strides_k[2], strides_v[2])
    mode = _pick_mode(use_tma, q, k, v, out, row_strides)
    if mode == 1 and q.is_cuda:
        _ensure_allocator()
    bucket = _seq_bucket(seqlen_q, seqlen_k)
    if config is None and (interp or not _autotune_enabled()):
        config = _INTERPRETER_CONFIG if interp else _candidates(d_pad, causal, bucket)[0]
    if mode == 2:
        # Block shapes are set here for a fixed config, by the autotune pre-hook otherwise.
        bm, bn = (config[0], config[1]) if config is not None else (16, 16)
        descs = tuple(
            TensorDescriptor(t, [_rows_of_row_view(t, rs), d], [rs, 1], [blk, d_pad])
            for t, rs, blk in zip((q, k, v), row_strides, (bm, bn, bn))
        )
    else:
        descs = (q, k, v)  # unused by the kernel
    args = (
        q, k, v, out, lse, *descs, cu_q, cu_k,
        *strides_q, *strides_k, *strides_v, *strides_o, *strides_lse,
        heads, group, seqlen_q, seqlen_k, scale * _LOG2E,
    )  # fmt: skip
    consts = dict(
        HEAD_DIM=d,
        HEAD_DIM_PAD=d_pad,
        CAUSAL=bool(causal),
        VARLEN=bool(varlen),
        USE_TMA=mode,
        # Triton's interpreter gets bfloat16 arithmetic wrong: compute in float32 there.
        UPCAST=bool(interp and q.dtype != torch.float16) or q.dtype == torch.float32,
        SEQ_BUCKET=bucket,
    )

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]) * batch * heads,)

    if config is None:
        _tuned_kernel[grid](*args, **consts)
        return
    bm, bn, stages, warps = config
    fwd.attn_fwd_kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_stages=stages, num_warps=warps)


def attention_fwd(q, k, v, causal: bool, scale: float, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense forward. q (B, H, S_q, D); k, v (B, H_kv, S_k, D), any strides with a contiguous
    last dim. Returns out (B, H, S_q, D) contiguous in q's dtype and lse float32 (B, H, S_q).

    ``options`` (config=(BLOCK_M, BLOCK_N, stages, warps), use_tma=0|1|2 as in ``kernels.fwd``)
    are for tests and tuning scripts; the library never passes them.
    """
    if not options and q.is_cuda and launch_gluon.enabled():
        # Same metadata as an earlier call: relaunch its compiled kernel (host time, see
        # ``launch_gluon.replay_fwd``).
        res = launch_gluon.replay_fwd(q, k, v, bool(causal), scale, _empty)
        if res is not None:
            return res
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, h, s_q, _ = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty((b, h, s_q), torch.float32, q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    if s_k == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    if not options and launch_gluon.enabled() and launch_gluon.supported(q, k, v):
        # Hopper, fp16/bf16, D 64/128: the warp-specialised Gluon kernel, 1.08-1.38x the Triton
        # kernel below on an H200 (docs/attention_fwd.md). FLASHMOE_ATTN_GLUON=0 turns it off.
        return launch_gluon.attention_fwd(q, k, v, causal, scale, out=out, lse=lse, record=True)
    _launch(
        q,
        k,
        v,
        out,
        lse,
        q,  # cu_seqlens unused when dense
        q,
        (q.stride(0), q.stride(1), q.stride(2)),
        (k.stride(0), k.stride(1), k.stride(2)),
        (v.stride(0), v.stride(1), v.stride(2)),
        (out.stride(0), out.stride(1), out.stride(2)),
        (lse.stride(0), lse.stride(1)),
        b,
        h,
        h // h_kv,
        s_q,
        s_k,
        scale,
        causal,
        False,
        **options,
    )
    return out, lse


def attention_varlen_fwd(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed forward. q (T_q, H, D); k, v (T_k, H_kv, D); cu_seqlens int32 (B + 1).
    Returns out (T_q, H, D) and lse float32 (H, T_q). No host sync: the grid comes from
    ``max_seqlen_q``; programs past a sequence's end exit at once. Packed self-attention
    over short sequences goes to ``launch_short`` (``short=False`` forces this kernel,
    ``short=True`` the short one wherever it can run)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    short = options.pop("short", None)
    if short is not False and launch_short.applies(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, force=bool(short)
    ):
        return launch_short.varlen_fwd(q, k, v, cu_seqlens_q, max_seqlen_q, causal, scale)
    t_q, h, _ = q.shape
    h_kv = k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty((h, t_q), torch.float32, q.device)
    if t_q == 0 or batch <= 0 or max_seqlen_q <= 0:
        return out.zero_(), lse.fill_(float("-inf"))
    if k.shape[0] == 0 or max_seqlen_k <= 0:
        return out.zero_(), lse.fill_(float("-inf"))
    _launch(
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        (0, q.stride(1), q.stride(0)),
        (0, k.stride(1), k.stride(0)),
        (0, v.stride(1), v.stride(0)),
        (0, out.stride(1), out.stride(0)),
        (0, lse.stride(0)),
        batch,
        h,
        h // h_kv,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        causal,
        True,
        **options,
    )
    return out, lse
