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
from .. import _replay
from .kernels import align as _align
from .kernels import combine as _combine_k
from .kernels import grouped_gemm as _gg
from .kernels import routing as _routing


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """Smallest power of two >= n. triton.cdiv / triton.next_power_of_2 are constexpr-function
    objects in Triton 3.6, costing ~10 us a host call: a decode step made eight of them."""
    return 1 << max(0, int(n) - 1).bit_length()


# ------------------------------------------------------------------ configs
def _cfg(bn, bk, warps, stages, group_m=8, tma=False):
    """tma: weight tiles through a tensor descriptor (the kernel falls back to pointer loads
    where the launcher says TMA_OK=False or K_DIM is not a multiple of BLOCK_K)."""
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "USE_TMA": tma}, num_warps=warps, num_stages=stages
    )


# (BLOCK_N, BLOCK_K, warps, stages). Large row blocks: DESIGN.md's best vLLM-style tile was
# 128x256x64, 8 warps, 3 stages; gate+up as two 128-wide accumulators is that output width.
# The first config of each list is the one used without autotuning (tests).
_GATE_UP = {
    "large": [
        _cfg(128, 64, 8, 3),
        _cfg(128, 64, 8, 4),
        _cfg(64, 64, 4, 4),
        _cfg(64, 128, 4, 3),
        _cfg(128, 64, 8, 4, group_m=16),
        _cfg(128, 32, 8, 5),
        _cfg(128, 64, 8, 3, tma=True),
        _cfg(128, 64, 8, 4, tma=True),
    ],
    # Decode (BLOCK_M <= 32): weight-bandwidth bound. All tensor-descriptor (TMA) weight loads:
    # with 16-row tiles the pointer-load versions were not multi-buffered and spilled
    # (ptxas sm_90a: 64x128 tiles 4.8 KB of spill stores, 32-register cap), the TMA ones
    # keep 3-7 tiles in flight with 71-128 registers. Narrow N tiles give few touched experts
    # enough programs (T=1, K=8: 8 experts x F/BLOCK_N). Autotuned per routing size class
    # (Alignment.tune_bucket), so T=1 and T=64 get their own tiles.
    "small": [
        _cfg(32, 128, 4, 6, tma=True),
        _cfg(16, 128, 4, 6, tma=True),
        _cfg(64, 128, 4, 4, tma=True),
        _cfg(16, 64, 4, 8, tma=True),
        _cfg(32, 64, 4, 8, tma=True),
        _cfg(64, 64, 4, 8, tma=True),
        _cfg(128, 64, 4, 6, tma=True),
        _cfg(64, 128, 8, 4, tma=True),
    ],
}
_ROWS = {
    "large": [
        _cfg(128, 64, 8, 4),
        _cfg(256, 64, 8, 3),
        _cfg(128, 64, 4, 4),
        _cfg(128, 128, 8, 3),
        _cfg(256, 64, 8, 4),
        _cfg(256, 64, 8, 3, group_m=16),
        _cfg(128, 64, 8, 4, tma=True),
        _cfg(256, 64, 8, 3, tma=True),
    ],
    # Decode: as _GATE_UP["small"] (ptxas: the pointer-load 64x256 tiles spilled 7.6 KB).
    "small": [
        _cfg(64, 128, 4, 4, tma=True),
        _cfg(32, 128, 4, 6, tma=True),
        _cfg(128, 128, 4, 4, tma=True),
        _cfg(16, 128, 4, 6, tma=True),
        _cfg(64, 64, 4, 8, tma=True),
        _cfg(128, 64, 4, 6, tma=True),
        _cfg(256, 64, 4, 4, tma=True),
        _cfg(32, 64, 4, 8, tma=True),
    ],
}
# bwd_act: the GEMM's epilogue holds gate, up and five derived (BLOCK_M, BLOCK_N) float32
# tiles. ptxas (sm_90a, bf16, BLOCK_M 128, 8 warps): 128-wide N tiles spilled ~1 KB a thread;
# the kernel now runs the epilogue in two column halves (SPLIT_EPILOGUE, BLOCK_N >= 128):
# 246 registers, no spills. 64-wide N tiles re-read the gathered dy rows twice as often
# (bwd_act was 1.70 ms at C T=8192 on the H200 with them).
_BWD_ACT = {
    "large": [
        _cfg(128, 64, 8, 4),
        _cfg(128, 64, 8, 3),
        _cfg(128, 64, 8, 4, tma=True),
        _cfg(128, 128, 8, 3),
        _cfg(128, 32, 8, 5),
        _cfg(64, 64, 8, 4, tma=True),
        _cfg(128, 64, 8, 4, group_m=16),
        _cfg(128, 128, 8, 3, tma=True),
    ],
    # The forward's small list before the decode work (bwd_act's own tiles not re-tuned).
    "small": [_cfg(64, 128, 4, 4), _cfg(128, 128, 4, 4), _cfg(32, 256, 4, 3), _cfg(64, 256, 4, 3)],
}


def _wcfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# wgrad: out[e] (M, N) reduced over the expert's rows (BLOCK_K rows a step). With ~256 rows
# per expert (B, C) each tile's reduction is short, so larger tiles amortise the prologue and
# the store.
_WGRAD = [
    _wcfg(128, 128, 32, 4, 4),
    _wcfg(128, 128, 64, 8, 3),
    _wcfg(64, 128, 64, 4, 3),
    _wcfg(128, 256, 64, 8, 3),
    _wcfg(256, 128, 64, 8, 3),
    _wcfg(128, 256, 32, 8, 4),
    _wcfg(128, 128, 32, 4, 5),
    _wcfg(128, 128, 32, 8, 6),
]
# wgrad_rows (TMA over gathered row copies): BLOCK_K must stay <= the small-tile rows (32)
# so the last step reads only rows the producers wrote (see the kernel).
_WGRAD_ROWS = [
    _wcfg(128, 128, 32, 4, 4),
    _wcfg(128, 128, 32, 4, 6),
    _wcfg(128, 256, 32, 8, 4),
    _wcfg(128, 128, 32, 8, 5),
    _wcfg(256, 128, 32, 8, 4),
    _wcfg(64, 128, 32, 4, 6),
    _wcfg(128, 256, 32, 8, 6),
    _wcfg(128, 128, 32, 4, 3),
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


# None: pick the weight-gradient kernel per shape by timing both once (_auto_wgrad).
WGRAD_DEFAULT: str | None = None
_WGRAD_PICK: dict = {}


def _auto_wgrad(key, variants: dict):
    """The faster weight-gradient variant for this shape key. wgrad_kernel gathers dy and x
    rows inside its loop (index loads limit its pipelining to 2-3 stages); wgrad_rows_kernel
    reads gathered copies through tensor descriptors (deep pipelining) but pays for making the
    copies, so which wins depends on the shape. Each variant runs once (which also runs
    Triton's autotuning of its kernel), then 5 times under CUDA events; the median decides,
    once per key per process, like Triton's autotuner. Without autotuning, under CUDA-graph
    capture, or with one variant: the first (in-loop gather)."""
    if key in _WGRAD_PICK:
        return _WGRAD_PICK[key]
    first = next(iter(variants))
    if len(variants) == 1 or not _autotune_on() or torch.cuda.is_current_stream_capturing():
        return first
    times = {}
    for name, fn in variants.items():
        fn()
        ends = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            ends.append((start, end))
        torch.cuda.synchronize()
        times[name] = sorted(s.elapsed_time(e) for s, e in ends)[2]
    _WGRAD_PICK[key] = min(times, key=times.get)
    return _WGRAD_PICK[key]


def _small_m(block_m: int) -> int:
    """Rows of the smaller tile that an expert's last block runs when it holds at most that
    many rows (0: off). At ~256 rows per expert (B, C) about half the experts end in a block of
    1-16 rows; a 32-row tile does a quarter of the 128-row tile's MMA work there."""
    return 32 if block_m >= 64 else 0


def _even_k(args):
    return args["K_DIM"] % args["BLOCK_K"] == 0


_TUNED: dict = {}


def _forced_index() -> int | None:
    """FLASHMOE_MOE_CONFIG_INDEX=i: use only config i of each list (modulo its length). The
    tuning script compiles each config in its own process this way, filling Triton's cache
    in parallel before the autotuner benchmarks them."""
    value = os.environ.get("FLASHMOE_MOE_CONFIG_INDEX", "")
    return int(value) if value else None


def _tuned(name: str, fn, configs: list, key: list[str], heuristics: dict | None = None, reset_to_zero=None):
    """One autotuner per (kernel, config list, mode); built lazily, then cached for the process.
    ``reset_to_zero``: outputs that some configs leave partly unwritten (zeroed after tuning)."""
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
        _TUNED[ident] = triton.autotune(configs=cfgs, key=key, reset_to_zero=reset_to_zero)(fn)
    return _TUNED[ident]


_BEST: dict = {}


class _Fast:
    """``kern[grid](*args, **kw)`` for a forward GEMM autotuner: once the autotuner has picked
    a config for a key (the first call), later calls with that key launch the JIT function
    directly with that config (and EVEN_K), skipping the Autotuner and Heuristics wrappers'
    per-call argument dictionaries (host time that a decode step, launch bound, pays)."""

    __slots__ = ("tuner", "key")

    def __init__(self, tuner, key):
        self.tuner, self.key = tuner, key

    def __getitem__(self, grid):
        def launch(*args, **kw):
            best = _BEST.get(self.key)
            if best is None:
                self.tuner[grid](*args, **kw)
                cfg = self.tuner.best_config
                _BEST[self.key] = (cfg.all_kwargs(), cfg.kwargs["BLOCK_K"])
                return
            cfg_kw, block_k = best
            # The tuned config's grid as a tuple, so the launch can be replayed (ops._replay).
            # The grid functions here (``_grid_rows``) read only the config's meta-parameters,
            # so the config alone evaluates them.
            grid_t = grid(cfg_kw) if callable(grid) else grid
            _replay.replay_jit(self.tuner.fn.fn)[grid_t](
                *args, **kw, **cfg_kw, EVEN_K=args[_K_DIM_ARG] % block_k == 0
            )

        return launch


# Size classes that launch through _Fast: decode only (host bound); prefill keeps the plain
# autotuner path (H200, B T=4096 forward: 0.80/0.78 ms with _Fast on the large tiles too vs
# 0.76/0.77 without, within noise; nothing to gain where the GPU time is ~1 ms).
FAST_CLASSES = ("small",)


def _fast(name, tuner, n, k_dim, block_m, bucket, dtype):
    if interpreter_enabled() or _size_class(block_m) not in FAST_CLASSES:
        return tuner
    return _Fast(tuner, (id(tuner), name, n, k_dim, block_m, bucket, dtype))


def _tma_ok(w: torch.Tensor) -> bool:
    """A tensor descriptor over contiguous w as 2-D rows needs 16-byte rows and base; it also
    needs Triton's scratch allocator (device-side descriptors, 128 B each)."""
    if interpreter_enabled() or not w.is_cuda or not w.is_contiguous():
        return False
    if (w.shape[-1] * w.element_size()) % 16 or w.data_ptr() % 16:
        return False
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):

        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda")

        triton.set_allocator(alloc)
    return True


def _size_class(block_m: int) -> str:
    return "small" if block_m <= 32 else "large"


# ------------------------------------------------------------------ routing
# Routing tile: BLOCK_T = ROUTE_ELEMS // BLOCK_E token rows per program, ROUTE_WARPS warps.
ROUTE_ELEMS = 2048  # H200: C T=8192 route 35.9 us vs 42.7 at 4096; B T=4096 14.0 vs 25.5
ROUTE_WARPS = 4


def route(router_logits, top_k, *, scoring, renormalize, bias, n_group, topk_group):
    """One launch: (topk_weights float32 (T, K), topk_ids int32 (T, K))."""
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    t, e = logits.shape
    weights = torch.empty((t, top_k), device=logits.device, dtype=torch.float32)
    ids = torch.empty((t, top_k), device=logits.device, dtype=torch.int32)
    block_e = _pow2(e)
    # At least ~one program per SM at small T (decode): a program's top-k loop is latency bound.
    block_t = max(1, min(64, ROUTE_ELEMS // block_e, _pow2(_cdiv(t, 128))))
    grouped = n_group is not None and n_group > 1
    groups = n_group if grouped else 1
    _replay.replay_jit(_routing.route_kernel)[(_cdiv(t, block_t),)](
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
        BLOCK_K=_pow2(top_k),
        SIGMOID=scoring == "sigmoid",
        HAS_BIAS=bias is not None,
        RENORMALIZE=bool(renormalize),
        N_GROUP=groups,
        TOPK_GROUP=topk_group if grouped else 1,
        GROUP_SIZE=e // groups,
        BLOCK_G=_pow2(groups),
        PRECISE=not interpreter_enabled(),
        num_warps=ROUTE_WARPS,
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
        # Autotuning key of the decode (small) tiles: at most how many experts hold rows,
        # rounded to a power of two (T=1, K=8: 8 experts want narrower N tiles than T=64).
        self.tune_bucket = 0  # set by the makers for block_m <= 32


# One program aligns (and, for route_align, routes) at most this many slots.
SINGLE_CHUNK = 2048
# Blocks per step of the block-owner scan (``kernels.align._block_owners``; a running maximum
# carried across steps).
OWNER_STEP = 1024


def _owner_block(num_blocks: int) -> int:
    """BLOCK_B of the block-owner scan: one step of up to ``OWNER_STEP`` blocks."""
    return max(16, min(OWNER_STEP, _pow2(num_blocks)))


def _align_buffers(numel: int, num_experts: int, block_m: int, dev):
    # Worst case: every non-empty expert (at most min(E, T*K)) leaves one partial block.
    num_blocks = _cdiv(numel, block_m) + min(num_experts, numel)
    ints = torch.empty(num_blocks * (block_m + 1) + 2 * num_experts, device=dev, dtype=torch.int32)
    rows = num_blocks * block_m
    sorted_slots, block_expert = ints[:rows], ints[rows : rows + num_blocks]
    expert_start = ints[rows + num_blocks : rows + num_blocks + num_experts]
    expert_count = ints[rows + num_blocks + num_experts :]
    al = Alignment(sorted_slots, block_expert, expert_start, expert_count, block_m, num_blocks)
    if block_m <= 32:
        al.tune_bucket = max(16, _pow2(min(num_experts, numel)))
    return al


def _single_meta(numel: int, num_experts: int, num_blocks: int) -> dict:
    block_e = _pow2(num_experts + 1)  # + the spare bin for invalid ids
    return dict(
        CHUNK=max(16, _pow2(numel)),
        BLOCK_E=block_e,
        BLOCK_B=_owner_block(num_blocks),
        BLOCK_R=1024,
    )


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, chunk: int | None = None) -> Alignment:
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    numel = ids.numel()
    dev = ids.device
    if chunk is None and numel <= SINGLE_CHUNK:
        # One program, one launch (decode and small batches): the same layout as below.
        al = _align_buffers(numel, num_experts, block_m, dev)
        meta = _single_meta(numel, num_experts, al.num_blocks)
        _replay.replay_jit(_align.align_single_kernel)[(1,)](
            ids, al.sorted_slots, al.expert_start, al.expert_count, al.block_expert, numel, num_experts,
            al.num_blocks, BLOCK_M=block_m, num_warps=4, **meta,
        )  # fmt: skip
        return al
    # Worst case: every non-empty expert (at most min(E, T*K)) leaves one partial block.
    num_blocks = _cdiv(numel, block_m) + min(num_experts, numel)
    chunk = chunk or min(2048, max(16, _pow2(numel)))
    num_chunks = _cdiv(numel, chunk)
    block_e = _pow2(num_experts + 1)  # + the spare bin for invalid ids
    counts = torch.empty((num_chunks, block_e), device=dev, dtype=torch.int32)
    base = torch.empty((num_chunks, block_e), device=dev, dtype=torch.int32)
    expert_start = torch.empty(num_experts, device=dev, dtype=torch.int32)
    expert_count = torch.empty(num_experts, device=dev, dtype=torch.int32)
    block_expert = torch.empty(num_blocks, device=dev, dtype=torch.int32)
    # Zeros: padding rows name slot 0 (token 0), so gathers over the whole row buffer stay in
    # bounds (the backward's gathered copies for wgrad_rows_kernel).
    sorted_slots = torch.zeros(num_blocks * block_m, device=dev, dtype=torch.int32)
    warps = 8 if chunk >= 1024 else 4
    _align.align_count_kernel[(num_chunks,)](
        ids, counts, numel, num_experts, CHUNK=chunk, BLOCK_E=block_e, num_warps=warps
    )
    block_c = max(1, min(_pow2(num_chunks), max(1, 8192 // block_e)))
    block_b = _owner_block(num_blocks)
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
    al = Alignment(sorted_slots, block_expert, expert_start, expert_count, block_m, num_blocks)
    if block_m <= 32:
        al.tune_bucket = max(16, _pow2(min(num_experts, numel)))
    return al


# route_align routes every token in its one program, BLOCK_T rows a step (~12 us a step of 8
# rows at E=256 on the H200): worth it while T is small. Above, route (one row a program at
# decode sizes) + the single-program align: two launches.
ROUTE_ALIGN_MAX_TOKENS = 16


def route_align(router_logits, top_k, num_experts, block_m, *, scoring, renormalize):
    """Routing (no bias, no groups) and alignment in one launch for T <= ROUTE_ALIGN_MAX_TOKENS
    and T*K <= SINGLE_CHUNK: (topk_weights, topk_ids, Alignment)."""
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    t, e = logits.shape
    numel = t * top_k
    al = _align_buffers(numel, num_experts, block_m, logits.device)
    weights = torch.empty((t, top_k), device=logits.device, dtype=torch.float32)
    ids = torch.empty((t, top_k), device=logits.device, dtype=torch.int32)
    block_e = _pow2(e)
    meta = _single_meta(numel, num_experts, al.num_blocks)
    _replay.replay_jit(_routing.route_align_kernel)[(1,)](
        logits, logits, weights, ids, al.sorted_slots, al.expert_start, al.expert_count, al.block_expert,
        t, e, logits.stride(0), al.num_blocks,
        TOP_K=top_k, BLOCK_T=max(1, min(16, 2048 // block_e, _pow2(t))), BLOCK_E=block_e,
        BLOCK_K=_pow2(top_k), SIGMOID=scoring == "sigmoid", HAS_BIAS=False,
        RENORMALIZE=bool(renormalize), N_GROUP=1, TOPK_GROUP=1, GROUP_SIZE=e, BLOCK_G=1,
        PRECISE=not interpreter_enabled(), BLOCK_M=block_m, CHUNK=meta["CHUNK"], BLOCK_EA=meta["BLOCK_E"],
        BLOCK_B=meta["BLOCK_B"], BLOCK_R=meta["BLOCK_R"], num_warps=4,
    )  # fmt: skip
    return weights, ids, al


# ------------------------------------------------------------------ grouped GEMMs
# Autotuning key of the forward GEMMs: tune_bucket is 0 for the large tiles (prefill).
_KEY = ["N", "K_DIM", "BLOCK_M", "tune_bucket"]
_K_DIM_ARG = 10  # position of K_DIM in gate_up_kernel's and rows_gemm_kernel's arguments


def _grid_rows(al: Alignment, n: int):
    return lambda meta: (al.num_blocks * _cdiv(n, meta["BLOCK_N"]),)


def gate_up(x, w_gate_up, al: Alignment, top_k: int, activation: str, *, store_act=True, h=None):
    """act(x W_g^T) * (x W_u^T) per row (R, F), and/or (``h`` given: a (T*K, 2F) buffer) the
    gate/up pre-activations written in slot order."""
    f = w_gate_up.shape[1] // 2
    h_dim = x.shape[1]
    cls = _size_class(al.block_m)
    out = torch.empty((al.num_rows, f), device=x.device, dtype=x.dtype) if store_act else None
    kern = _tuned(f"gate_up_{cls}", _gg.gate_up_kernel, _GATE_UP[cls], _KEY, {"EVEN_K": _even_k})
    kern = _fast("gate_up", kern, f, h_dim, al.block_m, al.tune_bucket, x.dtype)
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
        w_gate_up.shape[0],
        al.tune_bucket,
        BLOCK_M=al.block_m,
        GELU=activation == "gelu",
        STORE_ACT=store_act,
        STORE_H=h is not None,
        TMA_OK=_tma_ok(w_gate_up),
        SMALL_M=_small_m(al.block_m),
    )
    return out


def rows_gemm(a, w, w_n_stride, w_k_stride, n, al: Alignment, out, topk_weights=None):
    """out[slot(r), :n] = a[r] @ W_e^T (* topk_weight[slot]); see rows_gemm_kernel."""
    cls = _size_class(al.block_m)
    kern = _tuned(f"rows_{cls}", _gg.rows_gemm_kernel, _ROWS[cls], _KEY, {"EVEN_K": _even_k})
    kern = _fast("rows", kern, n, a.shape[1], al.block_m, al.tune_bucket, (a.dtype, out.dtype, w.dtype))
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
        w.shape[0],
        al.tune_bucket,
        BLOCK_M=al.block_m,
        HAS_WEIGHT=topk_weights is not None,
        TMA_OK=_tma_ok(w),
        W_K_CONTIG=w_k_stride == 1,
        SMALL_M=_small_m(al.block_m),
    )
    return out


# "triton": ksum_kernel; "torch": rows.view(T, K, H).sum(1) (same math, float32 accumulation).
COMBINE = "triton"  # H200: C T=8192 79.6 us vs 105.9; B T=4096 45.5 vs 58.2 (same values)


def _combine(rows: torch.Tensor, t: int, k: int) -> torch.Tensor:
    """Sum the K per-slot rows of each token (float32 accumulation, one rounding)."""
    if k == 1:
        return rows
    if COMBINE == "torch" or t * k <= SINGLE_CHUNK:
        # Decode sizes: the GPU time is negligible, torch's launch is cheaper on the host.
        return rows.view(t, k, -1).sum(dim=1)
    h = rows.shape[1]
    out = torch.empty((t, h), device=rows.device, dtype=rows.dtype)
    block_h = min(1024, _pow2(h))
    block_t = max(1, min(8, 4096 // block_h))
    _combine_k.ksum_kernel[(_cdiv(t, block_t), _cdiv(h, block_h))](
        rows, out, t, h, TOP_K=k, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4
    )
    return out


def fused_experts_fwd(
    x, w_gate_up, w_down, topk_weights, topk_ids, activation, *, block_m=None, save_h=False
):
    """y (T, H) = sum_k w[t,k] * down_e(act(gate_e x_t) * up_e x_t), and with ``save_h`` the
    gate/up pre-activations h (T*K, 2F) in slot order for the backward (else None)."""
    e = w_gate_up.shape[0]
    k = topk_ids.shape[1]
    al = align(topk_ids, e, block_m or block_m_for(topk_ids.shape[0] * k, e))
    return _experts_fwd_aligned(x, w_gate_up, w_down, topk_weights, al, k, activation, save_h)


def moe_forward(x, w_gate_up, w_down, router_logits, top_k, *, scoring, renormalize, activation="silu"):
    """Inference ``fused_moe``: routing + experts with no custom-op or autograd layer between
    (the API calls this when no gradient is wanted and nothing traces). Decode sizes route and
    align in one launch: 4 launches in all (route_align, gate_up, down, K-row sum)."""
    t = x.shape[0]
    e = w_gate_up.shape[0]
    block_m = block_m_for(t * top_k, e)
    if t <= ROUTE_ALIGN_MAX_TOKENS and t * top_k <= SINGLE_CHUNK:
        tw, _, al = route_align(router_logits, top_k, e, block_m, scoring=scoring, renormalize=renormalize)
    else:
        tw, ids = route(
            router_logits, top_k, scoring=scoring, renormalize=renormalize, bias=None, n_group=None,
            topk_group=None,
        )  # fmt: skip
        al = align(ids, e, block_m)
    return _experts_fwd_aligned(x, w_gate_up, w_down, tw, al, top_k, activation, False)[0]


def _experts_fwd_aligned(x, w_gate_up, w_down, topk_weights, al: Alignment, k, activation, save_h):
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    topk_weights = topk_weights.contiguous()
    t, h = x.shape
    f2 = w_gate_up.shape[1]
    hbuf = torch.empty((t * k, f2), device=x.device, dtype=x.dtype) if save_h else None
    inter = gate_up(x, w_gate_up, al, k, activation, h=hbuf)
    # Per-slot rows in x's dtype, then a K-row sum per token: cheaper than a float32 scatter
    # of T*K*H (docs/moe.md). With K == 1 the slot is the token: write y directly.
    rows = torch.empty((t * k, h), device=x.device, dtype=x.dtype)
    rows_gemm(inter, w_down, w_down.stride(1), w_down.stride(2), h, al, rows, topk_weights.view(-1))
    return _combine(rows, t, k), hbuf


def fused_experts_bwd(
    dy, x, w_gate_up, w_down, topk_weights, topk_ids, activation, *, block_m=None, h=None, wgrad=None
):
    """(dx, dw_gate_up, dw_down, d_topk_weights). ``h``: the gate/up pre-activations the
    forward stored (T*K, 2F, slot order); None recomputes them with one gate/up GEMM
    (docs/moe.md: storing them is measured faster). Re-aligns (deterministic: the forward's
    layout; the block size may differ). ``wgrad``: "gather" (wgrad_kernel) or "rows"
    (wgrad_rows_kernel over gathered copies, where the tiles and strides allow it; else
    gather); None: WGRAD_DEFAULT, or when that is None the faster one (_auto_wgrad)."""
    wgrad = wgrad or WGRAD_DEFAULT
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    dy = dy.contiguous()
    tw = topk_weights.contiguous()
    t, hd = x.shape
    e, f2, _ = w_gate_up.shape
    f = f2 // 2
    k = topk_ids.shape[1]
    al = align(topk_ids, e, block_m or block_m_for(t * k, e))
    if h is None:
        h = torch.empty((t * k, f2), device=x.device, dtype=x.dtype)
        gate_up(x, w_gate_up, al, k, activation, store_act=False, h=h)
    else:
        h = h.contiguous()

    cls = _size_class(al.block_m)
    # Configs with wider N tiles leave the later partial columns unwritten: zeroed after tuning.
    kern = _tuned(
        f"bwd_act_{cls}",
        _gg.bwd_act_kernel,
        _BWD_ACT[cls],
        ["N", "K_DIM", "BLOCK_M"],
        {"EVEN_K": _even_k, "SPLIT_EPILOGUE": lambda args: args["BLOCK_N"] >= 128},
        reset_to_zero=["dtw_part_ptr"],
    )
    dh = torch.empty((al.num_rows, f2), device=x.device, dtype=x.dtype)
    aw = torch.empty((al.num_rows, f), device=x.device, dtype=x.dtype)
    # Partial d(topk_weight) per N tile: sized for the smallest BLOCK_N any config may use.
    max_tiles = _cdiv(f, min(c.kwargs["BLOCK_N"] for c in _BWD_ACT[cls] + [_INTERP]))
    dtw_part = torch.zeros((t * k, max_tiles), device=x.device, dtype=torch.float32)
    kern[_grid_rows(al, f)](
        dy,
        w_down,
        h,
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
        hd,
        k,
        dy.stride(0),
        w_down.stride(0),
        w_down.stride(2),
        w_down.stride(1),
        h.stride(0),
        dh.stride(0),
        aw.stride(0),
        max_tiles,
        e,
        BLOCK_M=al.block_m,
        GELU=activation == "gelu",
        TMA_OK=_tma_ok(w_down),
        SMALL_M=_small_m(al.block_m),
    )
    d_tw = dtw_part.sum(dim=1).view(t, k).to(topk_weights.dtype)

    def _wgrad_grid(m, n):
        return lambda meta: (e * _cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

    variants = {"gather": lambda: _wgrad_gather(dy, x, dh, aw, al, k, _wgrad_grid, w_gate_up, w_down)}
    if _small_m(al.block_m) >= 32 and all(_tma_ok(v) for v in (x, dh, aw)):
        variants["rows"] = lambda: _wgrad_rows(dy, x, dh, aw, al, k, _wgrad_grid)
    if wgrad is None:
        wgrad = _auto_wgrad((e, hd, f, al.block_m, x.dtype, _pow2(t * k)), variants)
    dw_gate_up, dw_down = variants.get(wgrad, variants["gather"])()
    # dx[t] = sum_k dh[row(t,k)] @ Wgu_e
    rows = torch.empty((t * k, hd), device=x.device, dtype=x.dtype)
    rows_gemm(dh, w_gate_up, w_gate_up.stride(2), w_gate_up.stride(1), hd, al, rows)
    return _combine(rows, t, k), dw_gate_up, dw_down, d_tw


def _wgrad_rows(dy, x, dh, aw, al: Alignment, k: int, grid):
    """dW via wgrad_rows_kernel: gathered copies of dy and x in the padded row order (one
    index_select each), then both weight gradients with tensor-descriptor loads."""
    e = al.expert_start.shape[0]
    hd, f2, f = x.shape[1], dh.shape[1], aw.shape[1]
    tok = al.sorted_slots // k
    dy_rows, x_rows = dy.index_select(0, tok), x.index_select(0, tok)
    kern = _tuned("wgrad_rows", _gg.wgrad_rows_kernel, _WGRAD_ROWS, ["M", "N"])
    dw_down = torch.empty((e, hd, f), device=x.device, dtype=x.dtype)
    dw_gate_up = torch.empty((e, f2, hd), device=x.device, dtype=x.dtype)
    # dW_down[e] = dy_rows^T aw (aw's padding rows are zero); dW_gate_up[e] = dh^T x_rows (dh's too).
    for left, right, out in ((dy_rows, aw, dw_down), (dh, x_rows, dw_gate_up)):
        m, n = left.shape[1], right.shape[1]
        kern[grid(m, n)](
            left, right, out, al.expert_start, al.expert_count, al.num_rows, m, n,
            left.stride(0), right.stride(0), out.stride(0), out.stride(1),
        )  # fmt: skip
    return dw_gate_up, dw_down


def _wgrad_gather(dy, x, dh, aw, al: Alignment, k: int, grid, w_gate_up, w_down):
    """dW via wgrad_kernel, which gathers dy and x rows by token inside its loop."""
    hd, f2, f = x.shape[1], dh.shape[1], aw.shape[1]
    wgrad = _tuned("wgrad", _gg.wgrad_kernel, _WGRAD, ["M", "N", "L_GATHER"])
    # dW_down[e] (H, F) = (dy rows)^T @ (w * a rows)
    dw_down = torch.empty_like(w_down)
    wgrad[grid(hd, f)](
        dy,
        aw,
        dw_down,
        al.sorted_slots,
        al.expert_start,
        al.expert_count,
        hd,
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
    wgrad[grid(f2, hd)](
        dh,
        x,
        dw_gate_up,
        al.sorted_slots,
        al.expert_start,
        al.expert_count,
        f2,
        hd,
        k,
        dh.stride(0),
        x.stride(0),
        dw_gate_up.stride(0),
        dw_gate_up.stride(1),
        L_GATHER=False,
        R_GATHER=True,
    )
    return dw_gate_up, dw_down
