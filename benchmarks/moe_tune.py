"""Tuning/diagnosis script of the fused-MoE kernels (issue 5), one GPU run at a time.

Sections (pick with --sections, comma separated; each stops early past --budget-s):
  check   forward + backward of the public API on fresh random inputs in NaN-poisoned memory
          vs the float64 reference (DESIGN.md rule) for several shapes.
  fwd     forward of shapes A/B/C (routing included): flashmoe (per BLOCK_M), grouped_mm,
          loop, dense floor; ms and ratios.
  prof    per-kernel device time of one flashmoe forward (and backward) via torch.profiler.
  bwd     forward+backward on B and C: flashmoe vs a grouped_mm autograd pipeline.
  train   forward+backward on B and C: h stored vs recomputed, backward BLOCK_M, vs grouped_mm.
  decode  T 1/8/64 with B/C weights, eager and CUDA-graph replay, GB/s vs 3.0 TB/s.
  tiny    a tiny route + forward + backward (for compute-sanitizer).
Results: a table on stdout and JSON (DESIGN.md schema) at --json.

Run: PYTHONPATH=src:.:tests python benchmarks/moe_tune.py --sections check,fwd --json out.json
"""

# ruff: noqa: B023  (lambdas are timed inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

from benchmarks.peers.moe import grouped_mm_moe, loop_moe, torch_route
from flashmoe_science.ops.moe import fused_experts, fused_moe, launch
from flashmoe_science.ops.moe import reference as ref

SHAPES = {"A": (4096, 14336, 8, 2), "B": (2048, 768, 128, 8), "C": (2048, 1024, 256, 8)}
T0 = time.time()
ROWS: list[dict] = []


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def make(t, shape, dtype=torch.bfloat16, seed=0):
    h, f, e, k = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, h, device="cuda", generator=g).to(dtype)
    w1 = (torch.randn(e, 2 * f, h, device="cuda", generator=g) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, f, device="cuda", generator=g) / f**0.5).to(dtype)
    logits = torch.randn(t, e, device="cuda", generator=g)
    return x, w1, w2, logits, k


def poison(nbytes=1 << 30):
    torch.empty(nbytes // 2, device="cuda", dtype=torch.float16).fill_(float("nan"))
    torch.cuda.synchronize()


def bench(fn, rep=100):
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def add_row(op, impl, t, shape, ms, **extra):
    h, f, e, k = SHAPES[shape]
    flops = 6 * t * k * h * f * (3 if op == "moe_fwd_bwd" else 1)
    row = {
        "op": op,
        "impl": impl,
        "case": {"tokens": t, "hidden": h, "ffn": f, "experts": e, "top_k": k, "dtype": "bfloat16"},
        "ms": round(ms, 4),
        "tflops": round(flops / ms / 1e9, 1),
        "status": "ok",
        **extra,
    }
    ROWS.append(row)


def section_check(args):
    sys.path.insert(0, "tests")
    from _numerics import assert_close_rule

    os.environ["FLASHMOE_MOE_AUTOTUNE"] = "0"
    cases = [("B", 1), ("B", 513), ("C", 700), ("A", 96)]
    for shape, t in cases:
        x, w1, w2, logits, k = make(t, shape, seed=t)
        dy = torch.randn_like(x)
        leaves = [v.clone().requires_grad_() for v in (x, w1, w2, logits)]
        poison()
        y = fused_moe(*leaves, top_k=k)
        y.backward(dy)
        outs = []
        for cd in (torch.float64, torch.bfloat16):
            lv = [v.detach().to(cd).requires_grad_() for v in (x, w1, w2)] + [
                logits.detach()
                .clone()
                .to(torch.float64 if cd == torch.float64 else torch.float32)
                .requires_grad_()
            ]
            tw, ids = ref.route_ref(lv[3], k)
            yr = ref.fused_experts_ref(*lv[:3], tw, ids, compute_dtype=cd)
            yr.backward(dy.to(cd))
            outs.append((yr, *[v.grad for v in lv]))
        (y64, *g64), (yp, *gp) = outs
        status = "ok"
        try:
            assert_close_rule(y, y64, yp, name="y")
            for name, leaf, r, p in zip(("dx", "dw_gate_up", "dw_down", "d_logits"), leaves, g64, gp):
                assert_close_rule(leaf.grad, r, p, grad=True, name=name)
        except AssertionError as exc:
            status = f"FAIL {exc}"
        log(f"check {shape} T={t}: {status}")

    # all tokens to one expert, large
    x, w1, w2, logits, k = make(2048, "B", seed=5)
    ids = torch.full((2048, k), 3, device="cuda", dtype=torch.int32)
    ids[:, 1:] = torch.arange(1, k, device="cuda", dtype=torch.int32) + 10
    ids[:, 0] = 3
    tw = torch.rand(2048, k, device="cuda")
    poison()
    y = fused_experts(x, w1, w2, tw, ids)
    y64 = ref.fused_experts_ref(x.double(), w1.double(), w2.double(), tw.double(), ids)
    yp = ref.fused_experts_ref(x, w1, w2, tw, ids, compute_dtype=torch.bfloat16)
    try:
        assert_close_rule(y, y64, yp, name="y all-to-few")
        log("check all-tokens-to-8-experts T=2048 B: ok")
    except AssertionError as exc:
        log(f"check all-to-few: FAIL {exc}")
    os.environ["FLASHMOE_MOE_AUTOTUNE"] = "1"


def dense_floor(t, shape):
    h, f, e, k = SHAPES[shape]
    a = torch.randn(t * k, h, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(h, 2 * f, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(t * k, f, device="cuda", dtype=torch.bfloat16)
    d = torch.randn(f, h, device="cuda", dtype=torch.bfloat16)
    return lambda: (a @ b, c @ d)


def section_fwd(args):
    cases = [(c[0], int(c[1:])) for c in args.fwd_cases.split(",")]
    for shape, t in cases:
        if time.time() - T0 > args.budget_s:
            log("budget reached, skipping", shape, t)
            break
        x, w1, w2, logits, k = make(t, shape)
        res = {}
        with torch.no_grad():
            y_ref = grouped_mm_moe(x, logits, w1, w2, k)
            for bm in args.block_ms:
                fn = lambda bm=bm: launch.fused_experts_fwd(
                    x, w1, w2, *_route(logits, k), "silu", block_m=bm
                )[0]
                y = fn()
                err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
                res[f"flashmoe_bm{bm}"] = bench(fn)
                ms = res[f"flashmoe_bm{bm}"]
                log(f"{shape} T={t} BLOCK_M={bm}: {ms:.3f} ms (rel err vs grouped_mm {err:.1e})")
            res["flashmoe"] = bench(lambda: fused_moe(x, w1, w2, logits, k))
            res["grouped_mm"] = bench(lambda: grouped_mm_moe(x, logits, w1, w2, k))
            res["dense_floor"] = bench(dense_floor(t, shape))
            if t * k <= 32768:
                res["loop"] = bench(lambda: loop_moe(x, logits, w1, w2, k), rep=50)
        for impl, ms in res.items():
            add_row("moe_fwd", impl, t, shape, ms)
        fm = res["flashmoe"]
        log(
            f"{shape} T={t}: "
            + "  ".join(f"{k_}={v:.3f}" for k_, v in res.items())
            + f" | vs grouped_mm {res['grouped_mm'] / fm:.2f}x, floor frac {res['dense_floor'] / fm:.2f}"
            + (f", vs loop {res['loop'] / fm:.1f}x" if "loop" in res else "")
        )
        torch.cuda.empty_cache()


def section_profrows(args):
    """section_prof with the wgrad_rows kernel as the backward's default."""
    old = launch.WGRAD_DEFAULT
    launch.WGRAD_DEFAULT = "rows"
    try:
        section_prof(args)
    finally:
        launch.WGRAD_DEFAULT = old


def section_prof(args):
    from torch.profiler import ProfilerActivity, profile

    for shape, t in [(c[0], int(c[1:])) for c in args.prof_cases.split(",")]:
        x, w1, w2, logits, k = make(t, shape)
        leaves = [v.clone().requires_grad_() for v in (x, w1, w2, logits)]
        dy = torch.randn_like(x)
        for _ in range(2):
            torch.autograd.grad(fused_moe(*leaves, top_k=k), leaves, dy)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                with torch.no_grad():
                    fused_moe(x, w1, w2, logits, k)
            torch.cuda.synchronize()
        tab = {}
        for ev in prof.events():
            if ev.device_type.name == "CUDA":
                tab[ev.name[:60]] = tab.get(ev.name[:60], 0.0) + ev.device_time / 3 / 1000
        log(
            f"prof fwd {shape} T={t}: "
            + "; ".join(f"{n}={v:.3f}ms" for n, v in sorted(tab.items(), key=lambda kv: -kv[1]))
        )
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                torch.autograd.grad(fused_moe(*leaves, top_k=k), leaves, dy)
            torch.cuda.synchronize()
        tab = {}
        for ev in prof.events():
            if ev.device_type.name == "CUDA":
                tab[ev.name[:60]] = tab.get(ev.name[:60], 0.0) + ev.device_time / 3 / 1000
        log(
            f"prof fwd+bwd {shape} T={t}: "
            + "; ".join(f"{n}={v:.3f}ms" for n, v in sorted(tab.items(), key=lambda kv: -kv[1])[:14])
        )


def section_bwd(args):
    for shape, t in (("B", 4096), ("C", 8192), ("A", 4096)):
        if time.time() - T0 > args.budget_s:
            break
        x, w1, w2, logits, k = make(t, shape)
        dy = torch.randn_like(x)
        leaves = [v.clone().requires_grad_() for v in (x, w1, w2, logits)]
        f1 = lambda: torch.autograd.grad(fused_moe(*leaves, top_k=k), leaves, dy)
        f2 = lambda: torch.autograd.grad(
            grouped_mm_moe(leaves[0], leaves[3], leaves[1], leaves[2], k), leaves, dy
        )
        g1, g2 = f1(), f2()
        errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(g1, g2)]
        res = {"flashmoe": bench(f1), "grouped_mm": bench(f2)}
        for impl, ms in res.items():
            add_row("moe_fwd_bwd", impl, t, shape, ms)
        log(
            f"fwd+bwd {shape} T={t}: flashmoe {res['flashmoe']:.3f} grouped_mm {res['grouped_mm']:.3f} "
            f"-> {res['grouped_mm'] / res['flashmoe']:.2f}x; grad rel diffs {[f'{e:.1e}' for e in errs]}"
        )
        torch.cuda.empty_cache()


def _graph(fn):
    fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def section_decode(args):
    for shape in ("B", "C"):
        for t in (1, 8, 64):
            x, w1, w2, logits, k = make(t, shape)
            h, f, e, _ = SHAPES[shape]
            _, ids = torch_route(logits, k)
            touched = int(torch.unique(ids).numel())
            nbytes = touched * 3 * h * f * 2 + 2 * t * h * 2 + t * e * 4
            res = {}
            with torch.no_grad():
                fm = lambda: fused_moe(x, w1, w2, logits, k)
                gm = lambda: grouped_mm_moe(x, logits, w1, w2, k)
                res["flashmoe"] = bench(fm)
                res["grouped_mm"] = bench(gm)
                res["flashmoe_graph"] = bench(_graph(fm))
                try:
                    res["grouped_mm_graph"] = bench(_graph(gm))
                except Exception as exc:  # noqa: BLE001
                    log(f"grouped_mm graph capture failed: {type(exc).__name__}: {str(exc)[:100]}")
            for impl, ms in res.items():
                add_row("moe_decode", impl, t, shape, ms, gbps=round(nbytes / ms / 1e6, 1))
            log(
                f"decode {shape} T={t} ({touched} experts, {nbytes / 1e6:.1f} MB): "
                + "  ".join(f"{n}={v * 1000:.1f}us ({nbytes / v / 1e6:.0f} GB/s)" for n, v in res.items())
            )


def _route(logits, k):
    return launch.route(
        logits, k, scoring="softmax", renormalize=True, bias=None, n_group=None, topk_group=None
    )


def _train_step(x, w1, w2, logits, k, dy, *, store, block_m=None, bwd_block_m=None, wgrad=None):
    """Launch-level forward + backward of the experts (no route backward): stored h or recompute."""
    tw, ids = _route(logits, k)
    y, h = launch.fused_experts_fwd(x, w1, w2, tw, ids, "silu", block_m=block_m, save_h=store)
    return y, launch.fused_experts_bwd(dy, x, w1, w2, tw, ids, "silu", block_m=bwd_block_m, h=h, wgrad=wgrad)


def section_warm(args):
    """Compile (no timing) what the timed sections use; run once per config index in parallel
    processes (FLASHMOE_MOE_CONFIG_INDEX, see --parallel-warm) so the autotuner later finds
    every config cached."""
    for shape, t in [(c[0], int(c[1:])) for c in args.fwd_cases.split(",")]:
        x, w1, w2, logits, k = make(t, shape)
        with torch.no_grad():
            fused_moe(x, w1, w2, logits, k)
            if shape in ("B", "C") and args.train_variants:
                dy = torch.randn_like(x)
                for wgrad in ("gather", "rows"):
                    _train_step(x, w1, w2, logits, k, dy, store=True, wgrad=wgrad)
        if shape in ("B", "C") and t <= 8192:
            leaves = [v.clone().requires_grad_() for v in (x, w1, w2, logits)]
            x = w1 = w2 = None
            torch.autograd.grad(fused_moe(*leaves, top_k=k), leaves, torch.randn_like(leaves[0]))
            leaves = None
        x = w1 = w2 = logits = None  # free before the next shape: several warm-ups share the GPU
        torch.cuda.empty_cache()
    if args.warm_decode:
        for shape in ("B", "C"):
            for t in (1, 8, 64):
                x, w1, w2, logits, k = make(t, shape)
                with torch.no_grad():
                    fused_moe(x, w1, w2, logits, k)
    torch.cuda.synchronize()
    log("warm done", os.environ.get("FLASHMOE_MOE_CONFIG_INDEX"))


def parallel_warm(args):
    """--parallel-warm N: N processes, process i compiling config i of every list."""
    import subprocess

    cmd = [sys.executable, __file__, "--sections", "warm", "--fwd-cases", args.fwd_cases]
    if args.train_variants:
        cmd.append("--train-variants")
    if args.warm_decode:
        cmd.append("--warm-decode")
    procs = [
        subprocess.Popen(cmd, env={**os.environ, "FLASHMOE_MOE_CONFIG_INDEX": str(i)})
        for i in range(args.parallel_warm)
    ]
    codes = [p.wait() for p in procs]
    log("parallel warm exit codes", codes)


def section_train(args):
    """Forward+backward of the experts (launch level, routing forward included, no route
    backward): h stored by the forward vs recomputed in the backward, backward BLOCK_M 64 vs
    the default; and the public fused_moe autograd step vs the grouped_mm autograd pipeline."""
    for shape, t in (("B", 4096), ("C", 8192)):
        if time.time() - T0 > args.budget_s:
            break
        x, w1, w2, logits, k = make(t, shape)
        dy = torch.randn_like(x)
        res = {}
        with torch.no_grad():
            y_s, g_s = _train_step(x, w1, w2, logits, k, dy, store=True, wgrad="gather")
            y_r, g_r = _train_step(x, w1, w2, logits, k, dy, store=True, wgrad="rows")
            diffs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(g_s, g_r)]
            same = f"rel diffs {[f'{d:.1e}' for d in diffs]}"
            for wgrad in ("gather", "rows"):
                res[f"experts_wgrad_{wgrad}"] = bench(
                    lambda: _train_step(x, w1, w2, logits, k, dy, store=True, wgrad=wgrad)
                )
            if args.train_variants:
                res["experts_recompute_h"] = bench(lambda: _train_step(x, w1, w2, logits, k, dy, store=False))
            # Reference point for the weight gradients: CUTLASS's K-grouped GEMMs (what the
            # grouped_mm pipeline's backward uses) on the same FLOPs, unpadded sorted rows.
            try:
                _, ids = torch_route(logits, k)
                order = torch.argsort(ids.reshape(-1), stable=True)
                offs = torch.cumsum(
                    torch.bincount(ids.reshape(-1), minlength=w1.shape[0]), 0, dtype=torch.int32
                )
                xs, dys = x.index_select(0, order // k), dy.index_select(0, order // k)
                dhs = torch.randn(xs.shape[0], w1.shape[1], device="cuda", dtype=x.dtype)
                acts = torch.randn(xs.shape[0], w2.shape[2], device="cuda", dtype=x.dtype)
                res["cutlass_wgrad_pair"] = bench(
                    lambda: (
                        torch._grouped_mm(dhs.t(), xs, offs=offs),
                        torch._grouped_mm(dys.t(), acts, offs=offs),
                    )
                )
            except Exception as exc:  # noqa: BLE001
                log(f"cutlass wgrad timing failed: {type(exc).__name__}: {str(exc)[:200]}")
        leaves = [v.clone().requires_grad_() for v in (x, w1, w2, logits)]
        f1 = lambda: torch.autograd.grad(fused_moe(*leaves, top_k=k), leaves, dy)
        f2 = lambda: torch.autograd.grad(
            grouped_mm_moe(leaves[0], leaves[3], leaves[1], leaves[2], k), leaves, dy
        )
        g1, g2 = f1(), f2()
        errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(g1, g2)]
        res["flashmoe"] = bench(f1)
        res["grouped_mm"] = bench(f2)
        for impl in ("flashmoe", "grouped_mm"):
            add_row("moe_fwd_bwd", impl, t, shape, res[impl])
        log(
            f"train {shape} T={t}: "
            + "  ".join(f"{n}={v:.3f}" for n, v in res.items())
            + f" | fused_moe vs grouped_mm {res['grouped_mm'] / res['flashmoe']:.2f}x;"
            f" wgrad gather vs rows grads: {same};"
            f" grad rel diffs vs grouped_mm {[f'{e:.1e}' for e in errs]}"
        )
        x = w1 = w2 = leaves = g1 = g2 = g_s = g_r = None
        torch.cuda.empty_cache()


def section_tiny(args):
    os.environ["FLASHMOE_MOE_AUTOTUNE"] = "0"
    t, h, f, e, k = 77, 128, 96, 16, 4
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(e, 2 * f, h, device="cuda") / h**0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(e, h, f, device="cuda") / f**0.5).bfloat16().requires_grad_()
    logits = torch.randn(t, e, device="cuda", requires_grad=True)
    y = fused_moe(x, w1, w2, logits, top_k=k)
    y.backward(torch.randn_like(y))
    from flashmoe_science.ops.moe import route

    route(logits.detach(), 4, scoring="sigmoid", bias=torch.randn(e, device="cuda"), n_group=4, topk_group=2)
    torch.cuda.synchronize()
    log("tiny ok", float(y.float().abs().sum()))


def tuned_configs():
    out = []
    for (name, *_), tuner in launch._TUNED.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            out.append(f"{name} {key[:3]}: {cfg}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="check,fwd,prof,bwd,decode")
    ap.add_argument("--block-ms", default="64,128")
    ap.add_argument("--fwd-cases", default="B4096,C8192,A4096,B16384,A16384")
    ap.add_argument("--prof-cases", default="B4096,C8192")
    ap.add_argument("--budget-s", type=float, default=120)
    ap.add_argument("--json", default=None)
    ap.add_argument("--parallel-warm", type=int, default=0, help="compile in N processes first")
    ap.add_argument("--train-variants", action="store_true", help="warm the store/recompute/BM64 steps")
    ap.add_argument("--warm-decode", action="store_true")
    args = ap.parse_args()
    args.block_ms = [int(b) for b in args.block_ms.split(",") if b]
    log(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    if args.parallel_warm:
        parallel_warm(args)
    for s in filter(None, args.sections.split(",")):
        if time.time() - T0 > args.budget_s and s != "tiny":
            log("budget reached before section", s)
            continue
        try:
            globals()[f"section_{s.rstrip('0123456789')}"](args)
        except Exception as exc:  # noqa: BLE001  (report, keep the other sections' results)
            log(f"section {s} FAILED: {type(exc).__name__}: {str(exc)[:2000]}")
    for line in tuned_configs():
        log("tuned", line)
    if args.json:
        doc = {
            "meta": {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "triton": triton.__version__,
                "cudnn": torch.backends.cudnn.version(),
                "date": datetime.date.today().isoformat(),
                "command": " ".join(sys.argv),
            },
            "rows": ROWS,
        }
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    main()
