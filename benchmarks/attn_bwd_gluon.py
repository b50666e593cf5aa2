"""Gluon attention backward (``launch_bwd_gluon``) against the Triton backward and SDPA's
cuDNN / flash backends: a check phase, then backward-only timings at issue 4's cases.
On an sm_90 machine:

    PYTHONPATH=src:. python3 -m benchmarks.attn_bwd_gluon --phase check       # gradients, per config
    PYTHONPATH=src:. python3 -m benchmarks.attn_bwd_gluon --phase bench --out benchmarks/results
    PYTHONPATH=src:. compute-sanitizer --tool memcheck python3 -m benchmarks.attn_bwd_gluon --phase sanitize

check  every candidate config (``launch_bwd_gluon.CANDIDATE_CONFIGS``) at a small GQA causal
       and full shape, each in a subprocess with a timeout (a deadlocked mbarrier ring costs one
       config, not the run), against the float64 reference by the DESIGN.md rule.
bench  backward TFLOP/s (2.5 x forward FLOPs / backward time, issue 4's convention; out/lse from
       PyTorch's flash forward) for SDPA cuDNN, SDPA flash, the Triton backward
       (``FLASHMOE_ATTN_BWD_TUNE=0``, its default configs) and each Gluon config; the Gluon
       times include its preprocess, the dQ buffer's zero fill and the cast. Writes
       ``attention_bwd-gluon-<stamp>.json`` into --out.
sanitize  small ragged launches for ``compute-sanitizer`` (memcheck / racecheck): D 64 / 96 / 128,
       both configs of D64, full and causal, GQA, S_q < S_k and S_q > S_k, program chunks
       (``head_chunk``) of 1, 2 and 3 heads (a short last chunk); gradients checked after.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import subprocess
import sys

import torch

# (name, B, H, H_kv, S, D, causal): issue 4's table (16k tokens) and the D64 points.
CASES = [
    ("D128 2k full", 8, 16, 16, 2048, 128, False),
    ("D128 8k full", 2, 16, 16, 8192, 128, False),
    ("D128 2k causal", 8, 16, 16, 2048, 128, True),
    ("D128 8k causal", 2, 16, 16, 8192, 128, True),
    ("D128 GQA 32:8 4k causal", 4, 32, 8, 4096, 128, True),
    ("D64 4k full", 4, 32, 32, 4096, 64, False),
    ("D64 4k causal", 4, 32, 32, 4096, 64, True),
    ("D96 4k full", 4, 16, 16, 4096, 96, False),
    ("D96 4k causal", 4, 16, 16, 4096, 96, True),
]
CHECK_SHAPES = [(1, 8, 2, 333, 711, False), (1, 8, 2, 333, 711, True), (2, 4, 4, 517, 300, True)]


def _check_one(d: int, cfg: tuple[int, ...]) -> None:
    sys.path.insert(0, "tests")
    from _attention import check_grads, reference_grads

    from flashmoe_science.ops.attention import launch_bwd_gluon, reference

    for b, h, h_kv, s_q, s_k, causal in CHECK_SHAPES:
        for dtype in (torch.float16, torch.bfloat16):
            q = torch.randn(b, h, s_q, d, dtype=dtype, device="cuda")
            k = torch.randn(b, h_kv, s_k, d, dtype=dtype, device="cuda")
            v = torch.randn_like(k)
            scale = 1.0 / math.sqrt(d)
            out, lse = reference.attention_ref(q, k, v, causal, scale)
            do = torch.randn_like(q)
            grads = launch_bwd_gluon.attention_bwd_gluon(do, q, k, v, out, lse, causal, scale, config=cfg)
            torch.cuda.synchronize()
            check_grads(grads, *reference_grads(q, k, v, do, causal, scale, reference.attention_ref))
    print("ok")


def sanitize() -> None:
    sys.path.insert(0, "tests")
    from _attention import check_grads, reference_grads

    from flashmoe_science.ops.attention import launch_bwd_gluon, reference

    # (B, H, H_kv, S_q, S_k, D, causal, config, chunk); None: the launcher's choice.
    runs = [
        (1, 4, 2, 200, 131, 128, False, None, None),
        (2, 4, 2, 300, 517, 128, False, None, None),  # full D128: ping-pong over 5 tiles x 2 heads
        (1, 4, 2, 131, 200, 128, True, None, None),
        (2, 4, 1, 257, 257, 128, True, None, 3),  # a chunk of 3 over 2 (batch, KV head) pairs
        (5, 2, 1, 300, 300, 128, True, None, 2),  # 5 pairs in chunks of 2: the last holds 1
        (1, 4, 2, 200, 77, 64, False, None, None),
        (1, 4, 2, 77, 200, 64, True, None, None),
        (1, 4, 2, 200, 131, 64, True, (64, 64, 2, 1), None),  # one consumer
        (1, 4, 4, 131, 200, 96, True, None, None),  # D96 as 128
        (1, 4, 4, 300, 131, 96, False, None, None),  # D96 full: ping-pong
    ]
    launches = 0
    for b, h, h_kv, s_q, s_k, d, causal, cfg, chunk in runs:
        q = torch.randn(b, h, s_q, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(b, h_kv, s_k, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        scale = 1.0 / math.sqrt(d)
        out, lse = reference.attention_ref(q, k, v, causal, scale)
        do = torch.randn_like(q)
        grads = launch_bwd_gluon.attention_bwd_gluon(
            do, q, k, v, out, lse, causal, scale, config=cfg, chunk=chunk
        )
        torch.cuda.synchronize()
        check_grads(grads, *reference_grads(q, k, v, do, causal, scale, reference.attention_ref))
        launches += 1
    print(f"sanitize: {launches} Gluon backward launches, gradients within the DESIGN.md rule")


def check(timeout: int) -> dict:
    from flashmoe_science.ops.attention import launch_bwd_gluon

    res = {}
    for d, cfgs in launch_bwd_gluon.CANDIDATE_CONFIGS.items():
        for cfg in cfgs:
            arg = ",".join(map(str, (d, *cfg)))
            try:
                p = subprocess.run([sys.executable, "-m", "benchmarks.attn_bwd_gluon", "--check-one", arg],
                                   capture_output=True, text=True, timeout=timeout)  # fmt: skip
                ok = p.returncode == 0 and "ok" in p.stdout
                res[arg] = "pass" if ok else "FAIL " + (p.stderr or p.stdout)[-600:]
            except subprocess.TimeoutExpired:
                res[arg] = f"TIMEOUT {timeout}s (deadlock?)"
            print(f"D{d} {cfg}: {res[arg][:300]}", flush=True)
    return res


def bench(out_dir: str, only_passed: dict | None) -> None:
    import triton
    from torch.nn.attention import SDPBackend

    from benchmarks.attn_bwd_tune import _out_lse, _sdpa_grad_fn
    from flashmoe_science.ops.attention import launch_bwd, launch_bwd_gluon

    os.environ["FLASHMOE_ATTN_BWD_TUNE"] = "0"
    rows = []
    for name, b, h, h_kv, s, d, causal in CASES:
        q = torch.randn(b, h, s, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(b, h_kv, s, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        do = torch.randn_like(q)
        scale = 1.0 / math.sqrt(d)
        out, lse = _out_lse(q, k, v, causal, scale)
        flops = 2.5 * 4.0 * b * h * s * s * d / (2 if causal else 1)
        impls = {}
        for label, backend in (
            ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
            ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ):
            try:
                impls[label] = _sdpa_grad_fn(backend, q, k, v, do, causal, scale)[0]
            except RuntimeError as e:  # e.g. a backend without GQA
                print(f"{name} {label}: {e}", flush=True)
        args = (do, q, k, v, out, lse, causal, scale)
        impls["triton"] = functools.partial(launch_bwd.attention_bwd, *args)
        d_kernel = launch_bwd_gluon.kernel_head_dim(d)
        for cfg in launch_bwd_gluon.CANDIDATE_CONFIGS[d_kernel]:
            key = ",".join(map(str, (d_kernel, *cfg)))  # the check phase runs the kernel head dims
            if only_passed is not None and only_passed.get(key) != "pass":
                continue
            impls[f"gluon{cfg}"] = functools.partial(launch_bwd_gluon.attention_bwd_gluon, *args, config=cfg)
        res = {}
        for label, fn in impls.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            res[label] = {"ms": ms, "tflops": flops / ms / 1e9}
        gluon = [r["tflops"] for k, r in res.items() if k.startswith("gluon")]
        cudnn = res.get("sdpa_cudnn", {}).get("tflops")
        ratio = f"  best gluon x cuDNN {max(gluon) / cudnn:.2f}" if gluon and cudnn else ""
        print(f"{name}: " + " ".join(f"{k} {r['tflops']:.1f}" for k, r in res.items()) + ratio, flush=True)
        case = {"case": name, "B": b, "H": h, "H_kv": h_kv, "S": s, "D": d, "causal": causal}
        rows.append({**case, "results": res})
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%MZ")
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "dtype": "bfloat16",
        "metric": "backward TFLOP/s = 2.5 x fwd FLOPs / bwd time (median, do_bench rep=100)",
        "command": "PYTHONPATH=src:. python3 -m benchmarks.attn_bwd_gluon --phase bench",
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"attention_bwd-gluon-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("wrote", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", choices=("all", "check", "bench", "sanitize"), default="all")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--check-one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.check_one:
        d, *cfg = (int(x) for x in a.check_one.split(","))
        _check_one(d, tuple(cfg))
        return 0
    if a.phase == "sanitize":
        sanitize()
        return 0
    passed = check(a.timeout) if a.phase in ("all", "check") else None
    if a.phase in ("all", "bench"):
        bench(a.out, passed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
