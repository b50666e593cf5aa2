"""Attention backward: parallel precompile, autotune, correctness and timing vs SDPA peers.

Modes (one GPU; run from the repo root with ``PYTHONPATH=src``):

  python benchmarks/attn_bwd_tune.py --precompile 8   # compile every config, 8 processes
  python benchmarks/attn_bwd_tune.py --bench --out DIR  # tune, check, time; JSON in DIR
  python benchmarks/attn_bwd_tune.py --tiny             # tiny shapes (compute-sanitizer)
  python benchmarks/attn_bwd_tune.py --ptxas 64,128     # no GPU: sm_90 registers/spills per config

The forward's out/lse come from PyTorch's flash kernel (``aten._scaled_dot_product_flash_
attention``, natural-log lse), so the backward is checked and timed on its own. Peers:
SDPA's FLASH_ATTENTION (FA2) and CUDNN_ATTENTION backends; only the backward is timed
(``autograd.grad`` on a retained graph). Backward TFLOP/s = 2.5 x forward FLOPs / time, with
forward FLOPs = 4 B H S_q S_k D, halved for causal; fwd+bwd uses 3.5x.
JSON rows follow DESIGN.md's schema (``op`` attention_bwd / attention_fwd_bwd).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

# (name, batch, heads_q, heads_kv, seqlen, head_dim, causal): 16k tokens per case.
CASES = [
    ("2k-full", 8, 16, 16, 2048, 128, False),
    ("8k-full", 2, 16, 16, 8192, 128, False),
    ("2k-causal", 8, 16, 16, 2048, 128, True),
    ("8k-causal", 2, 16, 16, 8192, 128, True),
    ("gqa32:8-4k-causal", 4, 32, 8, 4096, 128, True),
    ("d64-4k-full", 4, 16, 16, 4096, 64, False),
    ("d64-4k-causal", 4, 16, 16, 4096, 64, True),
]


def _sync():
    if not DRY["on"]:
        torch.cuda.synchronize()


def _fwd_flops(b, h, s_q, s_k, d, causal):
    f = 4.0 * b * h * s_q * s_k * d
    return f / 2 if causal else f


DRY = {"on": False}
DEV = {"d": "cuda"}  # --dry-run: CPU + interpreter, tiny shapes, to check this script itself


def _out_lse(q, k, v, causal, scale):
    """Forward by PyTorch's flash kernel: out and natural-log lse (float32)."""
    if DRY["on"]:
        from flashmoe_science.ops.attention import reference

        return reference.attention_ref(q, k, v, causal, scale)
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0], res[1]


# ------------------------------------------------------------------ precompile
def _precompile_job(job):
    if job[0] == "fwd":  # the forward's default config at a bench shape (fwd+bwd timings)
        return _precompile_fwd(job[1])
    d, causal, mode, idx = job
    os.environ["FLASHMOE_ATTN_BWD_TUNE"] = f"cfg{idx}"
    os.environ["FLASHMOE_ATTN_BWD_DQ"] = mode
    from flashmoe_science.ops.attention import launch_bwd

    t0 = time.time()
    try:
        q = torch.randn(1, 4, 256, d, device=DEV["d"], dtype=torch.bfloat16)
        k = torch.randn(1, 2, 256, d, device=DEV["d"], dtype=torch.bfloat16)
        v = torch.randn_like(k)
        out, lse = _out_lse(q, k, v, causal, d**-0.5)
        launch_bwd.attention_bwd(torch.randn_like(q), q, k, v, out, lse, causal, d**-0.5)
        _sync()
        return f"ok   d={d} causal={causal} {mode} cfg{idx} {time.time() - t0:.1f}s"
    except Exception as e:  # report and go on: one config failing to compile is data
        return f"FAIL d={d} causal={causal} {mode} cfg{idx}: {type(e).__name__}: {str(e)[:200]}"


def _precompile_fwd(case):
    os.environ["FLASHMOE_ATTN_AUTOTUNE"] = "0"
    from flashmoe_science import flash_attention_science

    name, b, h, h_kv, s, d, causal = case
    t0 = time.time()
    try:
        q = torch.randn(b, h, s, d, device=DEV["d"], dtype=torch.bfloat16)
        k = torch.randn(b, h_kv, s, d, device=DEV["d"], dtype=torch.bfloat16)
        flash_attention_science(q, k, k, causal=causal)
        _sync()
        return f"ok   fwd {name} {time.time() - t0:.1f}s"
    except Exception as e:
        return f"FAIL fwd {name}: {type(e).__name__}: {str(e)[:200]}"


def precompile(workers: int) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    from flashmoe_science.ops.attention import launch_bwd

    n_cfg = max(len(t[d]) for t in (launch_bwd._DKDV_TABLE, launch_bwd._DQ_TABLE) for d in (64, 128))
    jobs = [("fwd", case) for case in CASES] + [
        (d, c, m, i)
        for d in (128, 64)
        for c in (False, True)
        for m in ("separate", "atomic")
        for i in range(n_cfg)
    ]
    t0 = time.time()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        for line in ex.map(_precompile_job, jobs):
            print(line, flush=True)
    print(f"precompile: {len(jobs)} jobs in {time.time() - t0:.1f}s", flush=True)


# ------------------------------------------------------------------ ptxas (no GPU needed)
def ptxas_report(head_dims) -> None:
    """Compile every listed config for sm_90 on this (CPU) machine and print ptxas's register
    and spill counts: how the config tables in launch_bwd were chosen."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as tcompile

    from flashmoe_science.ops.attention import launch_bwd
    from flashmoe_science.ops.attention.kernels import bwd as kern

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    tensors = {"Q", "K", "V", "DO", "DK", "DV", "DQ"}

    def signature(fn, const):
        sig, attrs = {}, {}
        for i, n in enumerate(fn.arg_names):
            if n in const:
                sig[n] = "constexpr"
                continue
            sig[n] = ("*bf16" if n in tensors else "*fp32" if n in ("LSE", "DELTA", "DQ_ACC")
                      else "*i32" if n.startswith("cu_") else "fp32" if n == "scale" else "i32")  # fmt: skip
            if sig[n].startswith("*") or (n.startswith("stride") and not n.endswith(("_ls", "_deltas"))):
                attrs[(i,)] = [["tt.divisibility", 16]]  # as for contiguous (B, H, S, D) inputs
        return sig, attrs

    for d in head_dims:
        bd = triton.next_power_of_2(d)
        for causal in (False, True):
            for name, fn, table, extra in (
                ("dkdv", kern._bwd_dkdv, launch_bwd._DKDV_TABLE, {"DQ_ATOMIC": False}),
                ("dkdv_atomic", kern._bwd_dkdv, launch_bwd._DKDV_TABLE, {"DQ_ATOMIC": True}),
                ("dq", kern._bwd_dq, launch_bwd._DQ_TABLE, {}),
            ):
                for m, n, w, st in table[min(max(bd, 32), 256)]:
                    const = dict(
                        HEAD_DIM=d, BLOCK_D=bd, CAUSAL=causal, IS_VARLEN=False, BLOCK_M=m, BLOCK_N=n, **extra
                    )
                    sig, attrs = signature(fn, const)
                    try:
                        src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
                        opts = {"num_warps": w, "num_stages": st}
                        k = tcompile(src, target=GPUTarget("cuda", 90, 32), options=opts)
                        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                            f.write(k.asm["ptx"])
                        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                             capture_output=True, text=True).stderr  # fmt: skip
                        regs = re.findall(r"Used (\d+) registers", log)[-1]
                        spill = re.findall(r"(\d+) bytes spill stores", log)[-1]
                        res = f"regs {regs} spill-stores {spill} B smem {k.metadata.shared} B"
                    except Exception as e:  # a config that does not compile is data
                        res = f"FAIL {type(e).__name__}: {str(e)[:200]}"
                    print(f"D={d} causal={causal} {name} M{m}N{n}w{w}s{st}: {res}", flush=True)


# ------------------------------------------------------------------ tiny (sanitizer)
def tiny() -> None:
    from flashmoe_science.ops.attention import launch_bwd, reference

    torch.manual_seed(0)
    worst = 0.0
    for mode in ("separate", "atomic"):
        os.environ["FLASHMOE_ATTN_BWD_DQ"] = mode
        for causal in (False, True):
            q = torch.randn(1, 4, 200, 64, device=DEV["d"], dtype=torch.bfloat16)
            k = torch.randn(1, 2, 333, 64, device=DEV["d"], dtype=torch.bfloat16)
            v = torch.randn_like(k)
            out, lse = reference.attention_ref(q, k, v, causal, 0.125)
            do = torch.randn_like(q)
            g = launch_bwd.attention_bwd(do, q, k, v, out, lse, causal, 0.125)
            r = reference.attention_bwd_ref(do, q, k, v, out, lse, causal, 0.125)
            worst = max(
                worst,
                *[((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(g, r)],
            )
        lens = [37, 0, 129, 1]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV["d"])
        q = torch.randn(sum(lens), 4, 64, device=DEV["d"], dtype=torch.bfloat16)
        k = torch.randn(sum(lens), 2, 64, device=DEV["d"], dtype=torch.bfloat16)
        v = torch.randn_like(k)
        out, lse = reference.attention_varlen_ref(q, k, v, cu, cu, True, 0.125)
        do = torch.randn_like(q)
        g = launch_bwd.attention_varlen_bwd(do, q, k, v, out, lse, cu, cu, max(lens), max(lens), True, 0.125)
        r = reference.attention_varlen_bwd_ref(do, q, k, v, out, lse, cu, cu, True, 0.125)
        worst = max(
            worst,
            *[((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(g, r)],
        )
    _sync()
    print(f"tiny: worst max-relative error vs float32 reference {worst:.2e}", flush=True)


# ------------------------------------------------------------------ bench
def _bench(fn, rep=100):
    import triton

    if DRY["on"]:
        t0 = time.time()
        fn()
        return (time.time() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def _sdpa_grad_fn(backend, q, k, v, do, causal, scale, expand=False):
    """Returns (bwd-only closure, fwd+bwd closure, grads) for one SDPA backend. ``expand``
    repeats K/V per query head for backends without native GQA."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    if gqa and expand:
        g = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), False
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def fwd():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(*leaves, is_causal=causal, scale=scale, enable_gqa=gqa)

    out = fwd()
    grads = torch.autograd.grad(out, leaves, do, retain_graph=True)

    def bwd_only():
        torch.autograd.grad(out, leaves, do, retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad(fwd(), leaves, do)

    return bwd_only, fwd_bwd, grads


def _cfg_str(c) -> str:
    if c is None:
        return "none"
    return f"M{c.kwargs['BLOCK_M']}N{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"


def _err64(g, q, k, v, do, causal, scale, group):
    """max|g - float64| on batch 0 and the first KV head's query group (dq, dk, dv)."""
    from flashmoe_science.ops.attention import reference

    sl = [t[:1, :group].double() for t in (q,)] + [t[:1, :1].double() for t in (k, v)]
    leaves = [t.requires_grad_(True) for t in sl]
    o, _ = reference.attention_ref(*leaves, causal, scale, compute_dtype=torch.float64)
    r = torch.autograd.grad(o, leaves, do[:1, :group].double())
    mine = (g[0][:1, :group], g[1][:1, :1], g[2][:1, :1])
    return [(a.double() - b).abs().max().item() for a, b in zip(mine, r)]


def _bench_case(name, b, h, h_kv, s, d, causal, rows, fwd_bwd=True):
    """Tune, check and time one case; appends JSON rows, returns a table line."""
    from torch.nn.attention import SDPBackend

    from flashmoe_science import flash_attention_science
    from flashmoe_science.ops.attention import launch_bwd

    torch.manual_seed(0)
    scale = 1.0 / math.sqrt(d)
    q = torch.randn(b, h, s, d, device=DEV["d"], dtype=torch.bfloat16)
    k = torch.randn(b, h_kv, s, d, device=DEV["d"], dtype=torch.bfloat16)
    v = torch.randn_like(k)
    do = torch.randn_like(q)
    out, lse = _out_lse(q, k, v, causal, scale)
    flops = _fwd_flops(b, h, s, s, d, causal)
    case = {"batch": b, "heads_q": h, "heads_kv": h_kv, "seqlen_q": s, "seqlen_k": s, "head_dim": d,
            "causal": causal, "dtype": "bfloat16"}  # fmt: skip
    res = {}

    def add(op, impl, ms, mult, extra=None):
        res[(op, impl)] = ms
        row = {
            "op": op,
            "impl": impl,
            "case": case,
            "ms": round(ms, 4),
            "tflops": round(mult * flops / ms / 1e9, 1),
            "status": "ok",
        }
        rows.append({**row, **(extra or {})})

    def ours():
        return launch_bwd.attention_bwd(do, q, k, v, out, lse, causal, scale)

    grads = {}
    for mode in ("separate", "atomic"):
        os.environ["FLASHMOE_ATTN_BWD_DQ"] = mode
        t0 = time.time()
        g = ours()  # autotunes on the first call of a key
        _sync()
        tune_s = time.time() - t0
        ms = _bench(ours)
        tuned = [("dkdv", launch_bwd._dkdv_atomic if mode == "atomic" else launch_bwd._dkdv)]
        if mode == "separate":
            tuned.append(("dq", launch_bwd._dq))
        cfgs = {kn: _cfg_str(getattr(t, "best_config", None)) for kn, t in tuned}
        if tune_s > 2:  # this call autotuned: show every config's time
            for kn, t in tuned:
                timings = getattr(t, "configs_timings", None) or {}
                print(f"  tune {kn}: " + ", ".join(f"{_cfg_str(c)}={v[0]:.3f}" for c, v in timings.items()))
        err = _err64(g, q, k, v, do, causal, scale, h // h_kv)
        grads[mode] = g
        add("attention_bwd", f"flashmoe_{mode}_dq", ms, 2.5, {"configs": cfgs, "max_err_vs_fp64": err})
        print(f"{name} {mode}: {ms:.3f} ms (first call {tune_s:.1f}s) {cfgs} err {err}", flush=True)
    # Deterministic mode = separate dQ: bit-identical check on this shape.
    os.environ["FLASHMOE_DETERMINISTIC"] = "1"
    same = all(torch.equal(x, y) for x, y in zip(grads["separate"], ours()))
    del os.environ["FLASHMOE_DETERMINISTIC"]
    os.environ["FLASHMOE_ATTN_BWD_DQ"] = launch_bwd._DEFAULT_DQ_MODE
    ms_def = res[("attention_bwd", f"flashmoe_{launch_bwd._DEFAULT_DQ_MODE}_dq")]
    add("attention_bwd", "flashmoe", ms_def, 2.5, {"dq_mode": launch_bwd._DEFAULT_DQ_MODE})

    for impl, backend in (
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
    ):
        for expand in (False, True) if h != h_kv else (False,):
            try:
                bwd_only, fwd_bwd, pg = _sdpa_grad_fn(backend, q, k, v, do, causal, scale, expand)
                extra = {"gqa_expanded_kv": True} if expand else {}
                if not expand:
                    extra["max_err_vs_fp64"] = _err64(pg, q, k, v, do, causal, scale, h // h_kv)
                add("attention_bwd", impl, _bench(bwd_only), 2.5, extra)
                add("attention_fwd_bwd", impl, _bench(fwd_bwd), 3.5, extra)
                print(f"{name} {impl}: {res[('attention_bwd', impl)]:.3f} ms {extra}", flush=True)
                break
            except Exception as e:  # a peer that cannot run this case is reported, not fatal
                print(f"{name} {impl} expand={expand}: {type(e).__name__}: {str(e)[:160]}", flush=True)
    os.environ["FLASHMOE_ATTN_AUTOTUNE"] = "0"  # the forward's untuned default config
    for mode in ("separate", "atomic") if fwd_bwd else ():
        os.environ["FLASHMOE_ATTN_BWD_DQ"] = mode
        try:
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

            def ours_fwd_bwd(leaves=leaves):
                torch.autograd.grad(flash_attention_science(*leaves, causal=causal), leaves, do)

            ours_fwd_bwd()
            add("attention_fwd_bwd", f"flashmoe_{mode}_dq", _bench(ours_fwd_bwd), 3.5)
        except Exception as e:
            print(f"{name} flashmoe fwd+bwd {mode}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    os.environ.pop("FLASHMOE_ATTN_AUTOTUNE", None)
    os.environ["FLASHMOE_ATTN_BWD_DQ"] = launch_bwd._DEFAULT_DQ_MODE
    fb_def = res.get(("attention_fwd_bwd", f"flashmoe_{launch_bwd._DEFAULT_DQ_MODE}_dq"))
    if fb_def:
        add("attention_fwd_bwd", "flashmoe", fb_def, 3.5, {"dq_mode": launch_bwd._DEFAULT_DQ_MODE})

    def tf(op, impl, mult):
        ms = res.get((op, impl))
        return mult * flops / ms / 1e9 if ms else float("nan")

    return (
        name,
        tf("attention_bwd", "flashmoe_separate_dq", 2.5),
        tf("attention_bwd", "flashmoe_atomic_dq", 2.5),
        tf("attention_bwd", "sdpa_flash", 2.5),
        tf("attention_bwd", "sdpa_cudnn", 2.5),
        max(
            tf("attention_fwd_bwd", "flashmoe_separate_dq", 3.5),
            tf("attention_fwd_bwd", "flashmoe_atomic_dq", 3.5),
        ),
        tf("attention_fwd_bwd", "sdpa_cudnn", 3.5),
        same,
    )


def bench(out_dir: str, sha: str, fwd_bwd: bool = True) -> None:
    import triton

    dev = torch.cuda.get_device_name() if not DRY["on"] else "cpu (dry run)"
    meta = {
        "device": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "date": datetime.date.today().isoformat(),
        "command": "PYTHONPATH=src python benchmarks/attn_bwd_tune.py --bench  # backward-only timings: "
        "autograd.grad on a retained graph (SDPA) / launch_bwd (flashmoe, out/lse from aten flash forward); "
        "fwd+bwd: public API with the forward's untuned default config (FLASHMOE_ATTN_AUTOTUNE=0)",
        "git_sha": sha,
    }
    print(f"# {dev} torch {torch.__version__} triton {triton.__version__} cudnn {meta['cudnn']}", flush=True)
    os.environ["FLASHMOE_ATTN_BWD_TUNE"] = "1"  # tune the backward even where the forward is pinned
    rows, table = [], []
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"attention_bwd_{meta['date']}_{sha[:8]}.json")
    for case in CASES:
        try:
            table.append(_bench_case(*case, rows, fwd_bwd=fwd_bwd))
        except Exception as e:  # keep the other cases' numbers
            print(f"{case[0]}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        with open(path, "w") as f:  # after every case: a run cut short keeps what it measured
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        _sync()
        if not DRY["on"]:
            torch.cuda.empty_cache()

    print(
        "\nbackward TFLOP/s (bf16)   sep  atomic    FA2  cuDNN | sep/FA2 sep/cuDNN atom/cuDNN | "
        "fwd+bwd best-ours cuDNN ratio | determ. bit-identical"
    )
    for n, sep, atom, fa2, cud, fb, fbc, same in table:
        print(
            f"{n:20s} {sep:7.1f} {atom:7.1f} {fa2:6.1f} {cud:6.1f} | {sep / fa2:6.2f} {sep / cud:8.2f} "
            f"{atom / cud:8.2f} | {fb:6.1f} {fbc:6.1f} {fb / fbc:5.2f} | {same}"
        )
    # The dQ strategy that won more cases (backward time), for a follow-up run to use.
    atomic_wins = sum(1 for line in table if line[2] > line[1])
    best = "atomic" if 2 * atomic_wins > len(table) else "separate"
    print(f"dQ strategy: atomic faster in {atomic_wins}/{len(table)} cases -> {best}", flush=True)
    with open(os.path.join(out_dir, "best_dq_mode.txt"), "w") as f:
        f.write(best)
    print(f"wrote {path}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precompile", type=int, default=0, metavar="WORKERS")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--sha", default=os.environ.get("GIT_SHA", "unknown"))
    p.add_argument("--ptxas", default=None, metavar="D,D", help="sm_90 register/spill report, no GPU needed")
    p.add_argument("--no-fwd-bwd", action="store_true", help="skip the forward+backward timings")
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes: checks this script")
    a = p.parse_args(argv)
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        DRY["on"], DEV["d"] = True, "cpu"
        CASES[:] = [(n, 1, h // 8 or 1, hk // 8 or 1, 64, d, c) for n, b, h, hk, s, d, c in CASES[-3:]]
    if a.ptxas:
        os.environ.pop("TRITON_INTERPRET", None)
        ptxas_report([int(x) for x in a.ptxas.split(",")])
    if a.precompile:
        precompile(a.precompile)
    if a.tiny:
        tiny()
    if a.bench:
        bench(a.out, a.sha, fwd_bwd=not a.no_fwd_bwd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
