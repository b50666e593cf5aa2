"""Host time per eager attention forward call at short sequences, and what it does to flushed
timings (docs/attention_fwd.md, "Host time per call").

    PYTHONPATH=src:. python3 -m benchmarks.attn_host_time

For B*S = 16k tokens, H16, D128, bf16, S in {512, 1k} x {causal, full}, in one process:
``api`` (the public call: remembered checks + replay of the compiled kernel), ``launcher``
(``launch.attention_fwd``), ``api_no_replay_no_memo`` (the public call with both host-time
shortcuts switched off, i.e. the path before them) and SDPA's cuDNN backend. Each gets the
host time to enqueue one call (16 calls queued behind ``torch.cuda._sleep`` so the host never
waits on the GPU, median of 15: a longer queue of launches carrying four 128-byte tensor maps
each fills the launch queue and then measures the GPU) and ``triton.testing.do_bench`` (L2
flushed before each call). Prints a table; writes nothing.
"""

from __future__ import annotations

import time


def host_us(fn, calls: int = 16, reps: int = 15) -> float:
    import torch

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = []
    for _ in range(reps):
        torch.cuda._sleep(20_000_000)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(t)[len(t) // 2]


def main() -> None:
    import torch
    import torch.nn.functional as F
    import triton
    import triton.testing as tt

    from flashmoe_science import flash_attention_science
    from flashmoe_science.ops.attention import api, launch, launch_gluon

    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    real_replay = launch_gluon.replay_fwd

    def without_shortcuts(q, k, v, causal):
        launch_gluon.replay_fwd = lambda *a, **kw: None
        api._DIRECT.clear()
        try:
            return flash_attention_science(q, k, v, causal=causal)
        finally:
            launch_gluon.replay_fwd = real_replay

    print(f"{'case':<12} {'impl':<24} {'host us':>8} {'do_bench us':>12} {'TFLOP/s':>8}")
    for s, causal in ((512, True), (512, False), (1024, True), (1024, False)):
        b = 16384 // s
        q = torch.randn(b, 16, s, 128, device="cuda", dtype=torch.bfloat16)
        k, v = torch.randn_like(q), torch.randn_like(q)
        flops = 4 * b * 16 * s * s * 128 / (2 if causal else 1)
        a = (q, k, v, causal)
        fns = {
            "api": lambda a=a: flash_attention_science(*a[:3], causal=a[3]),
            "launcher": lambda a=a: launch.attention_fwd(*a, 128**-0.5),
            "api_no_replay_no_memo": lambda a=a: without_shortcuts(*a),
            "sdpa_cudnn": lambda a=a: F.scaled_dot_product_attention(*a[:3], is_causal=a[3]),
        }
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            for name, fn in fns.items():
                h = host_us(fn)
                ms = tt.do_bench(fn, warmup=25, rep=200)
                label = f"S{s} {'causal' if causal else 'full'}"
                print(f"{label:<12} {name:<24} {h:8.1f} {ms * 1e3:12.1f} {flops / ms / 1e9:8.0f}", flush=True)


if __name__ == "__main__":
    main()
