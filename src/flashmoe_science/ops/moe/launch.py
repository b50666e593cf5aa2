"""Launchers of the fused-MoE Triton kernels: grids, tile configurations, autotuning.

Shape letters: T tokens, H hidden, E experts, K top-k, F ffn, R rows of the padded buffer.
This is the only module that knows grids and configs; ``autograd`` calls ``route``,
``fused_experts_fwd`` and ``fused_experts_bwd``. Nothing here synchronises with the host
(no ``.item()``, no data-dependent shapes): buffers are sized for the worst case and
programs past the used blocks exit at once, so the layer can be captured in a CUDA graph.

Tile classes: BLOCK_M (rows per block, the alignment unit) is chosen from the average rows
per expert T*K/E before alignment (it cannot be autotuned after it); the other tile sizes
are autotuned once per (N, K_DIM, BLOCK_M) and cached by Triton's autotuner. Set
``FLASHMOE_MOE_AUTOTUNE=0`` to use each list's first config (fast start, e.g. in tests).
"""

from __future__ import annotations

import os

import torch
import triton

from ..._backend import interpreter_enabled
from .kernels import align as _align
from .kernels import grouped_gemm as _gg
from .kernels import routing as _routing


# ------------------------------------------------------------------ configs
def _cfg(bn, bk, warps, stages, group_m=8, **extra):
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, **extra}, num_warps=warps, num_stages=stages
    )


# (BLOCK_N, BLOCK_K, warps, stages). Large row blocks: DESIGN.md's best vLLM-style tile was
# 128x256x64, 8 warps, 3 stages; gate+up as two 128-wide accumulators is that output width.
_GATE_UP = {
    "large": [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(64, 64, 4, 4), _cfg(64, 128, 4, 3)],
    "small": [_cfg(64, 128, 4, 4), _cfg(32, 128, 4, 4), _cfg(128, 128, 4, 3), _cfg(64, 256, 4, 3)],
}
_ROWS = {
    "large": [_cfg(128, 64, 8, 4), _cfg(256, 64, 8, 3), _cfg(128, 64, 4, 4), _cfg(128, 128, 8, 3)],
    "small": [_cfg(64, 128, 4, 4), _cfg(128, 128, 4, 4), _cfg(32, 256, 4, 3), _cfg(64, 256, 4, 3)],
}
_WGRAD = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
# Under the interpreter: one config (autotune cannot run there), small blocks >= 16.
_INTERP = _cfg(32, 32, 4, 1, group_m=4)
_INTERP_WGRAD = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)


def _autotune_on() -> bool:
    return os.environ.get("FLASHMOE_MOE_AUTOTUNE", "1") not in ("0", "")


def block_m_for(num_slots: int, num_experts: int) -> int:
    """Rows per block from the average rows per expert T*K/E (decode 16 ... prefill 128)."""
    if interpreter_enabled():
        return 16
    avg = num_slots / num_experts
    if avg < 24:
        return 16
    if avg < 48:
        return 32
    if avg < 128:
        return 64
    # H100, bf16 forward: 128 beat 64 at 256 rows/expert despite more padding (B T=4096
    # 0.93 vs 1.05 ms, C T=8192 2.42 vs 2.80 ms) and at 1024 rows/expert (A: 5.66 vs 6.92 ms).
    return 128


def _even_k(args):
    return args["K_DIM"] % args["BLOCK_K"] == 0


_TUNED: dict = {}


def _forced_index() -> int | None:
    """FLASHMOE_MOE_CONFIG_INDEX=i: use only config i of each list (modulo its length). The
    tuning script compiles each config in its own process this way, filling Triton's cache
    in parallel before the autotuner benchmarks them."""
    value = os.environ.get("FLASHMOE_MOE_CONFIG_INDEX", "")
    return int(value) if value else None


def _tuned(name: str, fn, configs: list, key: list[str], heuristics: dict | None = None):
    """One autotuner per (kernel, config list, mode); built lazily, then cached for the process."""
    tune = _autotune_on() and not interpreter_enabled()
    forced = _forced_index()
    ident = (name, tune, forced)
    if ident not in _TUNED:
        if heuristics:
            fn = triton.heuristics(heuristics)(fn)
        cfgs = configs if tune else [_INTERP if interpreter_enabled() else configs[0]]
        if forced is not None and not interpreter_enabled():
            cfgs = [configs[forced % len(configs)]]
        if interpreter_enabled() and name.startswith("wgrad"):
            cfgs = [_INTERP_WGRAD]
        _TUNED[ident] = triton.autotune(configs=cfgs, key=key)(fn)
    return _TUNED[ident]


def _size_class(block_m: int) -> str:
    return "small" if block_m <= 32 else "large"


# ------------------------------------------------------------------ routing
def route(router_logits, top_k, *, scoring, renormalize, bias, n_group, topk_group):
    """One launch: (topk_weights float32 (T, K), topk_ids int32 (T, K))."""
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    t, e = logits.shape
    weights = torch.empty((t, top_k), device=logits.device, dtype=torch.float32)
    ids = torch.empty((t, top_k), device=logits.device, dtype=torch.int32)
    block_e = triton.next_power_of_2(e)
    block_t = max(1, min(64, 4096 // block_e))
    grouped = n_group is not None and n_group > 1
    groups = n_group if grouped else 1
    _routing.route_kernel[(triton.cdiv(t, block_t),)](
        logits,
        bias if bias is not None else logits,
        weights,
        ids,
        t,
        e,
        logits.stride(0),
        TOP_K=top_k,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        SIGMOID=scoring == "sigmoid",
        HAS_BIAS=bias is not None,
        RENORMALIZE=bool(renormalize),
        N_GROUP=groups,
        TOPK_GROUP=topk_group if grouped else 1,
        GROUP_SIZE=e // groups,
        BLOCK_G=triton.next_power_of_2(groups),
        PRECISE=not interpreter_enabled(),
        num_warps=4,
    )
    return weights, ids


# ------------------------------------------------------------------ alignment
class Alignment:
    """Padded per-expert row segments (see kernels/align.py). All tensors, no host values
    other than the worst-case sizes."""

    def __init__(self, sorted_slots, block_expert, expert_start, expert_count, block_m, num_blocks):
        self.sorted_slots = sorted_slots
        self.block_expert = block_expert
        self.expert_start = expert_start
        self.expert_count = expert_count
        self.block_m = block_m
        self.num_blocks = num_blocks
        self.num_rows = num_blocks * block_m


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, chunk: int | None = None) -> Alignment:
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    numel = ids.numel()
    dev = ids.device
    # Worst case: every non-empty expert (at most min(E, T*K)) leaves one partial block.
    num_blocks = triton.cdiv(numel, block_m) + min(num_experts, numel)
    chunk = chunk or min(2048, max(16, triton.next_power_of_2(numel)))
    num_chunks = triton.cdiv(numel, chunk)
    block_e = triton.next_power_of_2(num_experts + 1)  # + the spare bin for invalid ids
    counts = torch.empty((num_chunks, block_e), device=dev, dtype=torch.int32)
    base = torch.empty((num_chunks, block_e), device=dev, dtype=torch.int32)
    expert_start = torch.empty(num_experts, device=dev, dtype=torch.int32)
    expert_count = torch.empty(num_experts, device=dev, dtype=torch.int32)
    block_expert = torch.empty(num_blocks, device=dev, dtype=torch.int32)
    sorted_slots = torch.empty(num_blocks * block_m, device=dev, dtype=torch.int32)
    warps = 8 if chunk >= 1024 else 4
    _align.align_count_kernel[(num_chunks,)](
        ids, counts, numel, num_experts, CHUNK=chunk, BLOCK_E=block_e, num_warps=warps
    )
    block_c = max(1, min(triton.next_power_of_2(num_chunks), max(1, 8192 // block_e)))
    block_b = max(16, min(256, 8192 // block_e))
    _align.align_scan_kernel[(1,)](
        counts,
        base,
        expert_start,
        expert_count,
        block_expert,
        num_chunks,
        num_experts,
        num_blocks,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        BLOCK_E=block_e,
        BLOCK_B=block_b,
        num_warps=8,
    )
    _align.align_scatter_kernel[(num_chunks,)](
        ids, base, sorted_slots, numel, num_experts, CHUNK=chunk, BLOCK_E=block_e, num_warps=warps
    )
    return Alignment(sorted_slots, block_expert, expert_start, expert_count, block_m, num_blocks)


# ------------------------------------------------------------------ grouped GEMMs
def _grid_rows(al: Alignment, n: int):
    return lambda meta: (al.num_blocks * triton.cdiv(n, meta["BLOCK_N"]),)


def gate_up(x, w_gate_up, al: Alignment, top_k: int, activation: str, *, store_act=True, store_h=False):
    """act(x W_g^T) * (x W_u^T) per row (R, F) and/or the pre-activations h (R, 2F)."""
    f = w_gate_up.shape[1] // 2
    h_dim = x.shape[1]
    cls = _size_class(al.block_m)
    out = torch.empty((al.num_rows, f), device=x.device, dtype=x.dtype) if store_act else None
    h = torch.empty((al.num_rows, 2 * f), device=x.device, dtype=x.dtype) if store_h else None
    kern = _tuned(
        f"gate_up_{cls}", _gg.gate_up_kernel, _GATE_UP[cls], ["N", "K_DIM", "BLOCK_M"], {"EVEN_K": _even_k}
    )
    kern[_grid_rows(al, f)](
        x,
        w_gate_up,
        out if out is not None else h,
        h if h is not None else out,
        al.sorted_slots,
        al.block_expert,
        al.expert_start,
        al.expert_count,
        al.num_blocks,
        f,
        h_dim,
        top_k,
        x.stride(0),
        w_gate_up.stride(0),
        w_gate_up.stride(1),
        out.stride(0) if out is not None else 0,
        h.stride(0) if h is not None else 0,
        BLOCK_M=al.block_m,
        GELU=activation == "gelu",
        STORE_ACT=store_act,
        STORE_H=store_h,
    )
    return out, h


def rows_gemm(a, w, w_n_stride, w_k_stride, n, al: Alignment, out, topk_weights=None):
    """out[slot(r), :n] = a[r] @ W_e^T (* topk_weight[slot]); see rows_gemm_kernel."""
    cls = _size_class(al.block_m)
    kern = _tuned(
        f"rows_{cls}", _gg.rows_gemm_kernel, _ROWS[cls], ["N", "K_DIM", "BLOCK_M"], {"EVEN_K": _even_k}
    )
    kern[_grid_rows(al, n)](
        a,
        w,
        out,
        topk_weights if topk_weights is not None else a,
        al.sorted_slots,
        al.block_expert,
        al.expert_start,
        al.expert_count,
        al.num_blocks,
        n,
        a.shape[1],
        a.stride(0),
        w.stride(0),
        w_n_stride,
        w_k_stride,
        out.stride(0),
        BLOCK_M=al.block_m,
        HAS_WEIGHT=topk_weights is not None,
    )
    return out


def _combine(rows: torch.Tensor, t: int, k: int) -> torch.Tensor:
    """Sum the K per-slot rows of each token (float32 accumulation, one rounding)."""
    if k == 1:
        return rows
    return rows.view(t, k, -1).sum(dim=1)


def fused_experts_fwd(x, w_gate_up, w_down, topk_weights, topk_ids, activation, *, block_m=None):
    """y (T, H) = sum_k w[t,k] * down_e(act(gate_e x_t) * up_e x_t)."""
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    topk_weights = topk_weights.contiguous()
    t, h = x.shape
    e = w_gate_up.shape[0]
    k = topk_ids.shape[1]
    al = align(topk_ids, e, block_m or block_m_for(t * k, e))
    inter, _ = gate_up(x, w_gate_up, al, k, activation)
    # Per-slot rows in x's dtype, then a K-row sum per token: cheaper than a float32 scatter
    # of T*K*H (docs/moe.md). With K == 1 the slot is the token: write y directly.
    rows = torch.empty((t * k, h), device=x.device, dtype=x.dtype)
    rows_gemm(inter, w_down, w_down.stride(1), w_down.stride(2), h, al, rows, topk_weights.view(-1))
    return _combine(rows, t, k)


def fused_experts_bwd(dy, x, w_gate_up, w_down, topk_weights, topk_ids, activation, *, block_m=None):
    """(dx, dw_gate_up, dw_down, d_topk_weights). Re-aligns and recomputes the gate/up
    pre-activations (one gate/up GEMM) instead of storing them in the forward (docs/moe.md)."""
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    dy = dy.contiguous()
    tw = topk_weights.contiguous()
    t, h = x.shape
    e, f2, _ = w_gate_up.shape
    f = f2 // 2
    k = topk_ids.shape[1]
    al = align(topk_ids, e, block_m or block_m_for(t * k, e))
    _, hbuf = gate_up(x, w_gate_up, al, k, activation, store_act=False, store_h=True)

    cls = _size_class(al.block_m)
    kern = _tuned(
        f"bwd_act_{cls}", _gg.bwd_act_kernel, _ROWS[cls], ["N", "K_DIM", "BLOCK_M"], {"EVEN_K": _even_k}
    )
    dh = torch.empty((al.num_rows, f2), device=x.device, dtype=x.dtype)
    aw = torch.empty((al.num_rows, f), device=x.device, dtype=x.dtype)
    # Partial d(topk_weight) per N tile: sized for the smallest BLOCK_N any config may use.
    max_tiles = triton.cdiv(f, min(c.kwargs["BLOCK_N"] for c in _ROWS[cls] + [_INTERP]))
    dtw_part = torch.zeros((t * k, max_tiles), device=x.device, dtype=torch.float32)
    kern[_grid_rows(al, f)](
        dy,
        w_down,
        hbuf,
        tw.view(-1),
        dh,
        aw,
        dtw_part,
        al.sorted_slots,
        al.block_expert,
        al.expert_start,
        al.expert_count,
        al.num_blocks,
        f,
        h,
        k,
        dy.stride(0),
        w_down.stride(0),
        w_down.stride(2),
        w_down.stride(1),
        hbuf.stride(0),
        dh.stride(0),
        aw.stride(0),
        max_tiles,
        BLOCK_M=al.block_m,
        GELU=activation == "gelu",
    )
    d_tw = dtw_part.sum(dim=1).view(t, k).to(topk_weights.dtype)

    wgrad = _tuned("wgrad", _gg.wgrad_kernel, _WGRAD, ["M", "N"])

    def _wgrad_grid(m, n):
        return lambda meta: (e * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    # dW_down[e] (H, F) = (dy rows)^T @ (w * a rows)
    dw_down = torch.empty_like(w_down)
    wgrad[_wgrad_grid(h, f)](
        dy,
        aw,
        dw_down,
        al.sorted_slots,
        al.expert_start,
        al.expert_count,
        h,
        f,
        k,
        dy.stride(0),
        aw.stride(0),
        dw_down.stride(0),
        dw_down.stride(1),
        L_GATHER=True,
        R_GATHER=False,
    )
    # dW_gate_up[e] (2F, H) = dh^T @ (x rows)
    dw_gate_up = torch.empty_like(w_gate_up)
    wgrad[_wgrad_grid(f2, h)](
        dh,
        x,
        dw_gate_up,
        al.sorted_slots,
        al.expert_start,
        al.expert_count,
        f2,
        h,
        k,
        dh.stride(0),
        x.stride(0),
        dw_gate_up.stride(0),
        dw_gate_up.stride(1),
        L_GATHER=False,
        R_GATHER=True,
    )
    # dx[t] = sum_k dh[row(t,k)] @ Wgu_e
    rows = torch.empty((t * k, h), device=x.device, dtype=x.dtype)
    rows_gemm(dh, w_gate_up, w_gate_up.stride(2), w_gate_up.stride(1), h, al, rows)
    return _combine(rows, t, k), dw_gate_up, dw_down, d_tw
