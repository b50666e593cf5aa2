"""Attention backward launchers: grids, autotune configs and the dQ strategy.

Shape letters: B batch, H query heads, H_kv key/value heads, S_q / S_k sequence lengths,
D head dim; varlen tensors are packed (T, H, D).

Strategy (kernels in ``kernels/bwd.py``):
  1. ``_bwd_preprocess``: delta = rowsum(dO * O), float32.
  2. ``_bwd_dkdv``: one program per (KV block, b, kv head) loops over the query blocks of
     every query head of its group; dK/dV sums stay in registers.
  3. dQ, either
     * ``"separate"``: the ``_bwd_dq`` kernel (recomputes P and dP; deterministic), or
     * ``"atomic"``: ``_bwd_dkdv`` adds dS K into a float32 buffer with atomics (fewer
       GEMMs; the summation order varies run to run).
     Deterministic mode (``torch.are_deterministic_algorithms_enabled()`` or
     ``FLASHMOE_DETERMINISTIC=1``) always uses ``"separate"``. Otherwise the default is
     ``_DEFAULT_DQ_MODE``; ``FLASHMOE_ATTN_BWD_DQ=separate|atomic`` overrides it.

Autotuning: each kernel is tuned per (head dim, causal, varlen, dtype) over the configs
listed for its head dim (``_DKDV_TABLE`` / ``_DQ_TABLE``). Without tuning
(``_pinned_config``): ``FLASHMOE_ATTN_BWD_TUNE=0`` (or, when it is unset, the forward's
``FLASHMOE_ATTN_AUTOTUNE=0``) runs the head dim's default config (quick tests);
``FLASHMOE_ATTN_BWD_TUNE=cfg<i>`` runs the i-th (``benchmarks/attn_bwd_tune.py`` compiles
the configs in parallel that way). Under ``TRITON_INTERPRET=1`` one fixed config runs (the
interpreter cannot autotune).
"""

from __future__ import annotations

import os

import torch
import triton

from ..._backend import interpreter_enabled
from . import launch_short
from .kernels import bwd as _k

# Measured (H100, bf16, 16k tokens, 7 cases, docs/attention_bwd.md): the separate dQ kernel
# was faster than atomics in 7/7 cases (atomic 1.07-1.22x slower), and it is the
# deterministic path, so determinism costs nothing.
_DEFAULT_DQ_MODE = "separate"
_MAX_HEAD_DIM = 256
_PRE_BLOCK_M = 64


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, warps, stages) per padded head dim; the first is the untuned default.
# dK/dV keeps two (BLOCK_N, D) float32 accumulators in registers and streams (BLOCK_M, D)
# tiles of Q and dO; dQ keeps one (BLOCK_M, D). The lists were chosen from ptxas register
# spill counts of an offline sm_90 compile of these kernels (2026-11-25, docs/attention_bwd.md:
# a first list spilled 200-3500 bytes at D=128; these spill 0-140); the GPU autotuner picks. On
# the H100 it chose dK/dV (64, 128, 8, 1) at D=128 and (64, 128, 8, 2) / (64, 128, 8, 1) at
# D=64 full / causal, dQ (128, 64, 8, 3) (D=64 causal: (64, 64, 4, 3)); those winners are
# listed first. D=32 and D=256 were not timed (their lists only compile without spills).
_DKDV_TABLE: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    32: ((64, 128, 8, 2), (64, 128, 8, 1), (32, 128, 8, 2), (16, 128, 8, 3)),
    64: ((64, 128, 8, 2), (64, 128, 8, 1), (32, 128, 8, 2), (16, 128, 8, 3)),
    128: ((64, 128, 8, 1), (32, 128, 8, 2), (16, 128, 8, 2), (32, 64, 8, 2)),
    256: ((16, 64, 8, 2), (16, 32, 4, 2)),
}
_DQ_TABLE: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    32: ((128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)),
    64: ((128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)),
    128: ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 2), (64, 128, 8, 2)),
    256: ((128, 32, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)),
}
# BLOCK_M != BLOCK_N on purpose: the CPU tests then exercise the general mask bounds.
_INTERPRETER_DKDV = (32, 64, 4, 1)
_INTERPRETER_DQ = (64, 32, 4, 1)


def _table_configs(table, block_d: int) -> list[triton.Config]:
    if interpreter_enabled():
        return [_cfg(*(_INTERPRETER_DKDV if table is _DKDV_TABLE else _INTERPRETER_DQ))]
    return [_cfg(*c) for c in table[min(max(block_d, 32), 256)]]


def _all_configs(table) -> list[triton.Config]:
    if interpreter_enabled():
        return _table_configs(table, 64)
    seen = dict.fromkeys(c for entries in table.values() for c in entries)
    return [_cfg(*c) for c in seen]


def _key(c: triton.Config) -> tuple[int, int, int, int]:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _prune_configs_for_head_dim(configs, named_args, **kwargs):
    """Keep the configs listed for this head dim (``_DKDV_TABLE`` / ``_DQ_TABLE``)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    table = _DKDV_TABLE if "DQ_ACC" in named_args else _DQ_TABLE
    wanted = {_key(c) for c in _table_configs(table, block_d)}
    return [c for c in configs if _key(c) in wanted]


def _pinned_config(table, block_d: int) -> triton.Config | None:
    """The config to run without autotuning, or None to autotune.

    ``FLASHMOE_ATTN_BWD_TUNE``: ``1`` autotune, ``0`` the head dim's default config,
    ``cfg<i>`` its i-th config (the default when there is no i-th). Unset, it follows the
    forward's ``FLASHMOE_ATTN_AUTOTUNE`` (default on). The interpreter always runs its
    single config.
    """
    listed = _table_configs(table, block_d)
    forward_switch = os.environ.get("FLASHMOE_ATTN_AUTOTUNE", "1").strip()
    choice = os.environ.get("FLASHMOE_ATTN_BWD_TUNE", "0" if forward_switch == "0" else "1").strip()
    if interpreter_enabled() or choice == "0":
        return listed[0]
    if choice.startswith("cfg") and choice[3:].isdigit():
        i = int(choice[3:])
        return listed[i] if i < len(listed) else listed[0]
    return None


_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "IS_VARLEN"]
_PRUNE = {"early_config_prune": _prune_configs_for_head_dim}
_dkdv = triton.autotune(configs=_all_configs(_DKDV_TABLE), key=_TUNE_KEY, prune_configs_by=_PRUNE)(
    _k._bwd_dkdv
)
# The atomic variant accumulates into DQ_ACC, which must be zeroed before each tuning run.
_dkdv_atomic = triton.autotune(
    configs=_all_configs(_DKDV_TABLE), key=_TUNE_KEY, prune_configs_by=_PRUNE, reset_to_zero=["DQ_ACC"]
)(_k._bwd_dkdv)
_dq = triton.autotune(configs=_all_configs(_DQ_TABLE), key=_TUNE_KEY, prune_configs_by=_PRUNE)(_k._bwd_dq)


def _launch(tuned, table, grid, args, kwargs) -> None:
    cfg = _pinned_config(table, kwargs["BLOCK_D"])
    if cfg is None:
        tuned[grid](*args, **kwargs)
    else:
        tuned.fn[grid](*args, **kwargs, **cfg.all_kwargs())


def deterministic_requested() -> bool:
    return (
        torch.are_deterministic_algorithms_enabled() or os.environ.get("FLASHMOE_DETERMINISTIC", "0") == "1"
    )


def dq_mode() -> str:
    """ "separate" or "atomic" (see the module docstring)."""
    if deterministic_requested():
        return "separate"
    mode = os.environ.get("FLASHMOE_ATTN_BWD_DQ", _DEFAULT_DQ_MODE).strip().lower()
    if mode not in ("separate", "atomic"):
        raise ValueError(f"FLASHMOE_ATTN_BWD_DQ={mode!r} is not understood; expected separate or atomic")
    return mode


def _check(**tensors: torch.Tensor) -> None:
    d = tensors["q"].shape[-1]
    if d > _MAX_HEAD_DIM:
        raise ValueError(f"the attention backward kernel supports head_dim <= {_MAX_HEAD_DIM}, got {d}")
    for name, t in tensors.items():
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {tuple(t.stride())}")


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, seq) strides; packed varlen tensors (T, H, D) have no batch stride."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, seq) strides of lse / delta: (B, H, S_q) dense, (H, T_q) varlen."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


_MAX_GRID_Y = 65535


def _bh_axes(num_bh: int) -> tuple[int, int]:
    """Grid axes 1 and 2 for ``num_bh`` (batch, head) pairs: a y axis holds at most 65,535
    (packed batches of tens of thousands of sequences exceed it); kernels exit past num_bh."""
    z = triton.cdiv(num_bh, _MAX_GRID_Y)
    return triton.cdiv(num_bh, z), z


def _run(do, q, k, v, out, lse, cu_q, cu_k, batch, max_q, max_k, causal, scale, varlen):
    """Shared launcher for the dense (varlen=False) and packed layouts."""
    h, d = (q.shape[1], q.shape[-1])
    h_kv = k.shape[1]
    group = h // h_kv
    block_d = max(16, triton.next_power_of_2(d))
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    if cu_q is None:  # dense: the cu_seqlens arguments are unused; any pointer will do
        cu_q = cu_k = lse
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=bool(causal), IS_VARLEN=varlen)

    _k._bwd_preprocess[(triton.cdiv(max_q, _PRE_BLOCK_M), *_bh_axes(batch * h))](
        out, do, delta, cu_q,
        *_strides3(out, varlen), *_strides3(do, varlen), *_lse_strides(delta, varlen),
        max_q, h, batch * h,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=_PRE_BLOCK_M, IS_VARLEN=varlen,
    )  # fmt: skip

    atomic = dq_mode() == "atomic"
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else delta
    dq_acc_strides = _strides3(dq_acc, varlen) if atomic else (0, 0, 0)
    kernel = _dkdv_atomic if atomic else _dkdv

    def grid_dkdv(meta):
        return (triton.cdiv(max_k, meta["BLOCK_N"]), *_bh_axes(batch * h_kv))

    args = (
        q, k, v, do, lse, delta, dk, dv, dq_acc, cu_q, cu_k,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen),
        *_lse_strides(lse, varlen), *_lse_strides(delta, varlen),
        *_strides3(dk, varlen), *_strides3(dv, varlen), *dq_acc_strides,
        max_q, max_k, h_kv, group, scale, batch * h_kv,
    )  # fmt: skip
    _launch(kernel, _DKDV_TABLE, grid_dkdv, args, dict(DQ_ATOMIC=atomic, **common))

    if atomic:
        dq.copy_(dq_acc.mul_(scale))
        return dq, dk, dv

    def grid_dq(meta):
        return (triton.cdiv(max_q, meta["BLOCK_M"]), *_bh_axes(batch * h))

    args = (
        q, k, v, do, lse, delta, dq, cu_q, cu_k,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen),
        *_lse_strides(lse, varlen), *_lse_strides(delta, varlen), *_strides3(dq, varlen),
        max_q, max_k, h, group, scale, batch * h,
    )  # fmt: skip
    _launch(_dq, _DQ_TABLE, grid_dq, args, common)
    return dq, dk, dv


def _interpreter_bf16(*tensors: torch.Tensor) -> bool:
    # Triton's interpreter computes bfloat16 wrong: run those in float32 there.
    return interpreter_enabled() and tensors[0].dtype == torch.bfloat16


def attention_bwd(do, q, k, v, out, lse, causal: bool, scale: float):
    """Dense backward.

    Args:
        do, q, out: (B, H, S_q, D); k, v: (B, H_kv, S_k, D) (any strides, contiguous last
            dim); lse: float32 (B, H, S_q), natural log, from the forward.
    Returns:
        (dq, dk, dv) with the shapes and dtypes of q, k, v.
    """
    _check(do=do, q=q, k=k, v=v, out=out)
    if _interpreter_bf16(q):
        up = [t.float() for t in (do, q, k, v, out)]
        return tuple(g.to(torch.bfloat16) for g in attention_bwd(*up, lse, causal, scale))
    b, h, s_q, _ = q.shape
    s_k = k.shape[2]
    if b == 0 or h == 0 or s_q == 0 or s_k == 0:  # nothing to launch (no head, or no row sees a key)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.is_cuda and not deterministic_requested():
        # Hopper, D 64 / 128: the warp-specialised Gluon backward (dQ summed by TMA reductions
        # in a varying order, so never in deterministic mode).
        from . import launch_bwd_gluon

        if launch_bwd_gluon.enabled() and launch_bwd_gluon.supported(q, k, v, do, out):
            return launch_bwd_gluon.attention_bwd_gluon(do, q, k, v, out, lse, causal, scale)
    return _run(do, q, k, v, out, lse, None, None, b, s_q, s_k, causal, scale, varlen=False)


def attention_varlen_bwd(
    do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal, scale,
    short: bool | None = None,
):  # fmt: skip
    """Varlen backward: do/q/out (T_q, H, D), k/v (T_k, H_kv, D), lse float32 (H, T_q),
    ``cu_seqlens_*`` int32 (B + 1). Empty sequences are allowed; no host sync. Packed
    self-attention over short sequences goes to ``launch_short`` (``short=False`` forces
    the general kernels, ``short=True`` the short ones wherever they can run)."""
    _check(do=do, q=q, k=k, v=v, out=out)
    batch = cu_seqlens_q.shape[0] - 1
    empty = batch <= 0 or max_seqlen_q == 0 or max_seqlen_k == 0 or q.shape[0] == 0 or k.shape[0] == 0
    if empty or q.shape[1] == 0:  # nothing to launch (no head, or no row sees a key)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if short is not False and launch_short.applies(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backward=True, force=bool(short)
    ):
        return launch_short.varlen_bwd(do, q, k, v, out, lse, cu_seqlens_q, max_seqlen_q, causal, scale)
    if _interpreter_bf16(q):
        up = [t.float() for t in (do, q, k, v, out)]
        grads = attention_varlen_bwd(
            *up, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, short=False
        )
        return tuple(g.to(torch.bfloat16) for g in grads)
    return _run(
        do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, batch,
        max_seqlen_q, max_seqlen_k, causal, scale, varlen=True,
    )  # fmt: skip
