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

from ..._backend import interpreter_enabled
from .kernels import fwd

SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 256)
_LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_stages, num_warps), best first (the first is the untuned default).
# Measured on an H100 (docs/attention_fwd.md); the others are what the autotuner tries.
_CANDIDATES: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    32: ((128, 64, 3, 4), (128, 128, 3, 8), (64, 64, 3, 4), (128, 64, 4, 8)),
    64: ((128, 64, 3, 4), (128, 128, 3, 8), (64, 64, 3, 4), (128, 64, 4, 8)),
    128: ((128, 128, 2, 8), (128, 64, 3, 8), (128, 128, 3, 8), (64, 64, 3, 4)),
    256: ((128, 64, 2, 8), (64, 64, 2, 4), (64, 32, 3, 4)),
}
# Short sequences: smaller query blocks give more programs to fill 132 SMs.
_SHORT_CANDIDATES: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    32: ((64, 64, 3, 4), (128, 64, 3, 4)),
    64: ((64, 64, 3, 4), (128, 64, 3, 4)),
    128: ((64, 64, 3, 4), (128, 64, 3, 8), (128, 128, 2, 8)),
    256: ((64, 64, 2, 4), (64, 32, 3, 4)),
}
_INTERPRETER_CONFIG = (32, 16, 1, 4)


def _head_dim_pad(d: int) -> int:
    return 128 if d == 96 else d


def _seq_bucket(max_seqlen_q: int, max_seqlen_k: int) -> int:
    """Sequence-length class keying the autotuner: <=1k, <=4k, longer."""
    n = max(max_seqlen_q, max_seqlen_k)
    return 0 if n <= 1024 else (1 if n <= 4096 else 2)


def _candidates(head_dim_pad: int, bucket: int) -> tuple[tuple[int, int, int, int], ...]:
    return (_SHORT_CANDIDATES if bucket == 0 else _CANDIDATES)[head_dim_pad]


def _all_configs() -> list[triton.Config]:
    seen, out = set(), []
    for table in (_CANDIDATES, _SHORT_CANDIDATES):
        for cands in table.values():
            for bm, bn, st, nw in cands:
                if (bm, bn, st, nw) not in seen:
                    seen.add((bm, bn, st, nw))
                    out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=st, num_warps=nw))
    return out


def _prune(configs, named_args, **kwargs):
    """Keep the candidates listed for this head dim and sequence-length class."""
    wanted = set(_candidates(kwargs["HEAD_DIM_PAD"], kwargs["SEQ_BUCKET"]))
    kept = [
        c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, c.num_warps) in wanted
    ]
    return kept or configs[:1]


_tuned_kernel = triton.autotune(
    configs=_all_configs(),
    key=["HEAD_DIM_PAD", "CAUSAL", "VARLEN", "USE_TMA", "PREFETCH_QK", "SEQ_BUCKET"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(fwd.attn_fwd_kernel)


def _autotune_enabled() -> bool:
    return os.environ.get("FLASHMOE_ATTN_AUTOTUNE", "1").strip() not in ("0", "false", "")


# Measured choices (docs/attention_fwd.md): whether TMA descriptors and the hand-pipelined
# QK^T pay on the H100.
_DEFAULT_USE_TMA = True
_DEFAULT_PREFETCH_QK = False


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot run these inputs, or None. Called by ``api`` on the kernel path."""
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        dims = ", ".join(str(x) for x in SUPPORTED_HEAD_DIMS)
        return f"head_dim {d} is not supported by the kernel; supported: {dims}"
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


def _launch(
    q,
    k,
    v,
    out,
    lse,
    cu_q,
    cu_k,
    strides_q,
    strides_k,
    strides_v,
    strides_o,
    strides_lse,
    batch,
    heads,
    group,
    seqlen_q,
    seqlen_k,
    scale,
    causal,
    varlen,
    config=None,
    use_tma=None,
    prefetch_qk=None,
):
    d = q.shape[-1]
    d_pad = _head_dim_pad(d)
    interp = interpreter_enabled() and not q.is_cuda
    if use_tma is None:
        use_tma = _DEFAULT_USE_TMA and (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9)
    use_tma = bool(use_tma) and _tma_ok(q, k, v, out)
    if prefetch_qk is None:
        prefetch_qk = _DEFAULT_PREFETCH_QK
    if use_tma and q.is_cuda:
        _ensure_allocator()
    bucket = _seq_bucket(seqlen_q, seqlen_k)
    args = (
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        *strides_q,
        *strides_k,
        *strides_v,
        *strides_o,
        *strides_lse,
        heads,
        group,
        seqlen_q,
        seqlen_k,
        scale * _LOG2E,
    )
    consts = dict(
        HEAD_DIM=d,
        HEAD_DIM_PAD=d_pad,
        CAUSAL=bool(causal),
        VARLEN=bool(varlen),
        USE_TMA=use_tma,
        # Triton's interpreter gets bfloat16 arithmetic wrong: compute in float32 there.
        UPCAST=bool(interp and q.dtype != torch.float16) or q.dtype == torch.float32,
        PREFETCH_QK=bool(prefetch_qk),
        SEQ_BUCKET=bucket,
    )

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]) * batch * heads,)

    if config is None and not interp and _autotune_enabled():
        _tuned_kernel[grid](*args, **consts)
        return
    if config is None:
        config = _INTERPRETER_CONFIG if interp else _candidates(d_pad, bucket)[0]
    bm, bn, stages, warps = config
    fwd.attn_fwd_kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_stages=stages, num_warps=warps)


def attention_fwd(q, k, v, causal: bool, scale: float, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense forward. q (B, H, S_q, D); k, v (B, H_kv, S_k, D), any strides with a contiguous
    last dim. Returns out (B, H, S_q, D) contiguous in q's dtype and lse float32 (B, H, S_q).

    ``options`` (config=(BLOCK_M, BLOCK_N, stages, warps), use_tma, prefetch_qk) are for
    tests and tuning scripts; the library never passes them.
    """
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
    ``max_seqlen_q``; programs past a sequence's end exit at once."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
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
