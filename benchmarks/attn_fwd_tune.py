"""Tuning script for the attention forward kernel (GPU): one run checks, sweeps and compares.

    PYTHONPATH=src python3 -m benchmarks.attn_fwd_tune --out DIR [--phases precompile,check,sweep,peers]

Phases:
  precompile  compile every (variant, config, case) of the sweep in parallel worker processes
              (fills Triton's disk cache, so nothing compiles inside a timed region).
  check       fresh random inputs, NaN-poisoned outputs, each variant vs a float64 reference.
  sweep       time variants x configs on the tuning cases.
  peers       time the default launch (autotuned, warmed up first) vs SDPA flash / cuDNN.
Writes sweep.json / peers.json (DESIGN.md results schema) into --out and prints tables.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import multiprocessing as mp
import os
import sys
import time

import torch

# (name, B, H, H_kv, S, D, causal) — 16k tokens, 16 heads, as in issue 3.
SWEEP_CASES = [
    ("d128-4k-full", 4, 16, 16, 4096, 128, False),
    ("d128-4k-causal", 4, 16, 16, 4096, 128, True),
    ("d64-4k-full", 4, 16, 16, 4096, 64, False),
    ("d64-4k-causal", 4, 16, 16, 4096, 64, True),
    ("d128-1k-full", 16, 16, 16, 1024, 128, False),
    ("d128-1k-causal", 16, 16, 16, 1024, 128, True),
]
SWEEP_CONFIGS = {
    ("d128", False): [(128, 128, 3, 8), (128, 64, 3, 8), (64, 64, 3, 4), (128, 128, 2, 8), (128, 64, 4, 8)],
    ("d128", True): [(64, 64, 3, 4), (128, 64, 3, 8), (128, 128, 3, 8), (64, 64, 4, 4), (64, 128, 2, 4)],
    ("d64", False): [(128, 64, 3, 8), (64, 64, 3, 4), (128, 64, 3, 4), (64, 64, 4, 4), (128, 128, 3, 8)],
    ("d64", True): [(64, 64, 3, 4), (128, 64, 3, 8), (64, 64, 4, 4), (64, 32, 3, 4), (128, 64, 3, 4)],
}
MODES = (0, 1, 2)  # pointers, per-program descriptors, host descriptors (kernels/fwd.py)


def sweep_configs(name, causal):
    return SWEEP_CONFIGS[(name.split("-")[0], causal)]


PEER_CASES = [  # (B, H, H_kv, S, D, causal)
    *[(16384 // s, 16, 16, s, 128, c) for c in (False, True) for s in (512, 1024, 2048, 4096, 8192, 16384)],
    (4, 32, 32, 4096, 64, False),
    (4, 32, 32, 4096, 64, True),
    (4, 32, 8, 4096, 128, True),  # GQA 32:8
    (4, 16, 16, 4096, 32, True),
    (4, 16, 16, 4096, 96, True),
    (4, 16, 16, 4096, 256, True),
    (4, 16, 16, 4096, 256, False),
]


def flops(b, h, s_q, s_k, d, causal):
    f = 4.0 * b * h * s_q * s_k * d
    return f / 2 if causal else f


CHECK_CASES = [  # (B, H, H_kv, S_q, S_k, D)
    (2, 4, 4, 1000, 1000, 128),
    (1, 8, 2, 777, 1333, 64),
    (1, 4, 4, 1200, 500, 96),
    (1, 4, 1, 513, 513, 256),
    (2, 4, 4, 64, 64, 32),
]


def make(b, h, h_kv, s_q, s_k, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, s_q, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def bench(fn, warmup=3, rep=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def _precompile_job(job):
    """job = ((B, H, H_kv, S_q, S_k, D, causal), config, mode); None = default."""
    from flashmoe_science.ops.attention import launch

    (b, h, h_kv, s_q, s_k, d, causal), cfg, mode = job
    q, k, v = make(b, h, h_kv, s_q, s_k, d)
    t = time.time()
    try:
        launch.attention_fwd(q, k, v, causal, d**-0.5, config=cfg, use_tma=mode)
        torch.cuda.synchronize()
        return (job, None, time.time() - t)
    except Exception as exc:  # report and go on: e.g. out of shared memory for this config
        return (job, f"{type(exc).__name__}: {str(exc)[:200]}", time.time() - t)


def all_jobs(phases):
    jobs = []
    if "sweep" in phases:
        for name, b, h, h_kv, s, d, causal in SWEEP_CASES:
            for cfg in sweep_configs(name, causal):
                for mode in MODES:
                    jobs.append(((b, h, h_kv, s, s, d, causal), cfg, mode))
    if "check" in phases:
        for b, h, h_kv, s_q, s_k, d in CHECK_CASES:
            for causal in (False, True):
                for mode in MODES:
                    jobs.append(((b, h, h_kv, s_q, s_k, d, causal), None, mode))
    if "peers" in phases and os.environ.get("FLASHMOE_ATTN_AUTOTUNE", "1") == "0":
        for b, h, h_kv, s, d, causal in PEER_CASES:
            jobs.append(((b, h, h_kv, s, s, d, causal), None, None))
    if "harness" in phases:
        # Every autotune candidate of the harness's cases, so its tuning only benchmarks.
        from benchmarks.cases.attention import SUITES
        from flashmoe_science.ops.attention import launch

        for c in SUITES[os.environ.get("ATTN_SUITE", "issue4")].cases:
            d_pad = launch._head_dim_pad(c.head_dim)
            bucket = launch._seq_bucket(c.seqlen_q, c.seqlen_k)
            for cfg in launch._candidates(d_pad, c.causal, bucket):
                shape = (c.batch, c.heads_q, c.heads_kv, c.seqlen_q, c.seqlen_k, c.head_dim, c.causal)
                jobs.append((shape, cfg, None))
    # Longest compiles first (big head dims), so the pool's tail is short.
    jobs.sort(key=lambda j: -j[0][5])
    return jobs


def phase_precompile(jobs, workers):
    t = time.time()
    ctx = mp.get_context("spawn")
    failed = {}
    with ctx.Pool(workers) as pool:
        for job, err, _dt in pool.imap_unordered(_precompile_job, jobs):
            if err:
                failed[job] = err
    print(f"[precompile] {len(jobs)} jobs, {len(failed)} failed, {time.time() - t:.1f}s", flush=True)
    for key, err in list(failed.items())[:8]:
        print("   fail", key, err, flush=True)
    return failed


def phase_check():
    from flashmoe_science.ops.attention import launch, reference

    t0 = time.time()
    rows = []
    for b, h, h_kv, s_q, s_k, d in CHECK_CASES:
        for causal in (False, True):
            for mode in MODES:
                q, k, v = make(b, h, h_kv, s_q, s_k, d, seed=b * 7 + s_q + d + int(causal))
                launch._empty = lambda shape, dtype, device: torch.full(
                    shape, float("nan"), dtype=dtype, device=device
                )
                out, lse = launch.attention_fwd(q, k, v, causal, d**-0.5, use_tma=mode)
                r_out, r_lse = reference.attention_ref(q, k, v, causal, d**-0.5, compute_dtype=torch.float64)
                p_out, _ = reference.attention_ref(q, k, v, causal, d**-0.5, compute_dtype=torch.bfloat16)
                fin = torch.isfinite(r_lse)
                err = (out.double() - r_out).abs().max().item()
                base = (p_out.double() - r_out).abs().max().item()
                floor = 2 * (r_out.to(torch.bfloat16).double() - r_out).abs().max().item()
                lse_err = (lse.double() - r_lse)[fin].abs().max().item() if fin.any() else 0.0
                inf_ok = bool(torch.equal(torch.isinf(lse), ~fin))
                ok = (
                    (not torch.isnan(out).any().item())
                    and err <= 2 * base + floor
                    and inf_ok
                    and lse_err < 1e-3
                )
                rows.append(ok)
                if not ok:
                    print(
                        f"[check] FAIL b{b} h{h}/{h_kv} {s_q}x{s_k} d{d} causal={causal} mode={mode}: "
                        f"err {err:.3e} base {base:.3e} floor {floor:.3e} lse {lse_err:.2e} inf_ok {inf_ok}"
                    )
    launch._empty = lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device)
    print(f"[check] {sum(rows)}/{len(rows)} passed ({time.time() - t0:.1f}s)", flush=True)


def phase_sweep(failed):
    from flashmoe_science.ops.attention import launch

    t0 = time.time()
    res = []
    for case in SWEEP_CASES:
        name, b, h, h_kv, s, d, causal = case
        q, k, v = make(b, h, h_kv, s, s, d)
        f = flops(b, h, s, s, d, causal)
        best = None
        for cfg in sweep_configs(name, causal):
            line = []
            for mode in MODES:
                if ((b, h, h_kv, s, s, d, causal), cfg, mode) in failed:
                    line.append("   fail")
                    continue
                fn = functools.partial(
                    launch.attention_fwd, q, k, v, causal, d**-0.5, config=cfg, use_tma=mode
                )
                try:
                    ms = bench(fn)
                except Exception as exc:
                    line.append("    err")
                    print("   err", name, cfg, mode, str(exc)[:120])
                    continue
                tf = f / ms / 1e9
                res.append({"case": name, "config": cfg, "mode": mode, "ms": ms, "tflops": tf})
                line.append(f"{tf:7.1f}")
                if best is None or tf > best[0]:
                    best = (round(tf, 1), cfg, mode)
            print(
                f"[sweep] {name:15s} {str(cfg):18s} ptr {line[0]} tma-dev {line[1]} tma-host {line[2]}",
                flush=True,
            )
        print(f"[sweep] BEST {name}: {best}", flush=True)
    print(f"[sweep] {time.time() - t0:.1f}s", flush=True)
    return res


def phase_peers(time_left):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashmoe_science import flash_attention_science

    t0 = time.time()
    rows, table = [], []
    for b, h, h_kv, s, d, causal in PEER_CASES:
        if time.time() - t0 > time_left:
            print("[peers] out of time budget; stopping", flush=True)
            break
        q, k, v = make(b, h, h_kv, s, s, d)
        f = flops(b, h, s, s, d, causal)
        case = {
            "batch": b,
            "heads_q": h,
            "heads_kv": h_kv,
            "seqlen_q": s,
            "seqlen_k": s,
            "head_dim": d,
            "causal": causal,
            "dtype": "bfloat16",
        }
        ref = None
        impls = {"flashmoe": functools.partial(flash_attention_science, q, k, v, causal=causal)}
        gqa = h != h_kv
        for nm, be in (
            ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
        ):

            def run(be=be, q=q, k=k, v=v, causal=causal, gqa=gqa):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

            impls[nm] = run
        got = {}
        for nm, fn in impls.items():
            try:
                out = fn()
                if ref is None:
                    ref = out.float()
                else:
                    err = (out.float() - ref).abs().max().item()
                    if err > 0.05:
                        print(f"   {nm} disagrees with flashmoe by {err:.3e}", flush=True)
                ms = bench(fn, warmup=5, rep=20)
                got[nm] = f / ms / 1e9
                rows.append({"op": "attention_fwd", "impl": nm, "case": case, "ms": ms, "tflops": got[nm]})
            except Exception as exc:
                got[nm] = float("nan")
                print(f"   {nm} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        fm = got.get("flashmoe", float("nan"))
        table.append(
            f"B{b:<3d} H{h}/{h_kv} S{s:<6d} D{d:<4d} {'causal' if causal else 'full  '} "
            f"flashmoe {fm:6.1f}  fa2 {got.get('sdpa_flash', math.nan):6.1f} "
            f"cudnn {got.get('sdpa_cudnn', math.nan):6.1f}  x_fa2 {fm / got.get('sdpa_flash', math.nan):.2f} "
            f"x_cudnn {fm / got.get('sdpa_cudnn', math.nan):.2f}"
        )
        print("[peers] " + table[-1], flush=True)
    print(f"[peers] {time.time() - t0:.1f}s", flush=True)
    return rows, table


def meta(command):
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "date": datetime.date.today().isoformat(),
        "command": command,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--phases", default="precompile,check,sweep,peers")
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--peer-budget", type=float, default=60.0)
    args = ap.parse_args()
    phases = args.phases.split(",")
    command = "python3 -m benchmarks.attn_fwd_tune " + " ".join(sys.argv[1:])
    m = meta(command)
    print("[meta]", m, flush=True)
    failed = {}
    if "precompile" in phases or "harness" in phases:
        failed = phase_precompile(all_jobs(phases), args.workers)
    if "check" in phases:
        phase_check()
    if "sweep" in phases:
        res = phase_sweep(failed)
        with open(os.path.join(args.out, "sweep.json"), "w") as fh:
            json.dump({"meta": m, "rows": res}, fh, indent=1)
    if "peers" in phases:
        rows, table = phase_peers(args.peer_budget)
        with open(os.path.join(args.out, "peers.json"), "w") as fh:
            json.dump({"meta": m, "rows": rows}, fh, indent=1)
        print("\n".join(table))


if __name__ == "__main__":
    main()
