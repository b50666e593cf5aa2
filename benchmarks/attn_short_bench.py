"""Packed self-attention over short sequences: the short-sequence kernels vs the general
varlen kernels (``short=False``) vs SDPA on the equivalent dense (N, H, L, D) batch.

Every sequence has L tokens (equal lengths, so SDPA needs no padding: its best case).
Forward, and forward + backward, ms (``triton.testing.do_bench``, median). Outputs of the two
kernels are compared before timing.

    PYTHONPATH=src python3 benchmarks/attn_short_bench.py --out benchmarks/results/attn_short.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import collect_meta  # noqa: E402
from flashmoe_science.ops.attention import launch, launch_bwd  # noqa: E402


def _bench_or_none(tt, fn):
    """SDPA's default backend (cuDNN on these machines) fails on some of these shapes: record
    None (printed as nan) instead of stopping the run."""
    try:
        return tt.do_bench(fn)
    except RuntimeError as exc:
        print(f"  sdpa failed: {str(exc)[:120]}", flush=True)
        return None


def _case(h: int, d: int, length: int, tokens: int, tt) -> dict:
    dev, dt = "cuda", torch.bfloat16
    n = tokens // length
    t = n * length
    q, k, v, do = (torch.randn(t, h, d, device=dev, dtype=dt) for _ in range(4))
    cu = torch.arange(0, t + 1, length, dtype=torch.int32, device=dev)
    scale = d**-0.5

    def fwd(short):
        return launch.attention_varlen_fwd(q, k, v, cu, cu, length, length, False, scale, short=short)

    def fwd_bwd(short):
        o, lse = fwd(short)
        return launch_bwd.attention_varlen_bwd(
            do, q, k, v, o, lse, cu, cu, length, length, False, scale, short=short
        )

    diff = (fwd(True)[0].float() - fwd(False)[0].float()).abs().max().item()
    dense = [x.view(n, length, h, d).transpose(1, 2) for x in (q, k, v, do)]
    leaves = [x.detach().requires_grad_(True) for x in dense[:3]]

    def sdpa_fwd_bwd():
        out = F.scaled_dot_product_attention(*leaves)
        return torch.autograd.grad(out, leaves, dense[3])

    return {
        "heads": h, "head_dim": d, "L": length, "tokens": t,
        "short_fwd_ms": tt.do_bench(lambda: fwd(True)),
        "general_fwd_ms": tt.do_bench(lambda: fwd(False)),
        "sdpa_fwd_ms": _bench_or_none(tt, lambda: F.scaled_dot_product_attention(*dense[:3])),
        "short_fwd_bwd_ms": tt.do_bench(lambda: fwd_bwd(True)),
        "general_fwd_bwd_ms": tt.do_bench(lambda: fwd_bwd(False)),
        "sdpa_fwd_bwd_ms": _bench_or_none(tt, sdpa_fwd_bwd),
        "max_abs_diff_short_vs_general": diff,
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--lengths", default="3,4,8,16,32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import triton.testing as tt

    rows = []
    print(f"{'H':>3s} {'D':>4s} {'L':>3s} {'short fwd':>10s} {'general':>9s} {'sdpa':>8s} "
          f"{'short f+b':>10s} {'general':>9s} {'sdpa':>8s}  max|diff|")  # fmt: skip
    for h, d in ((4, 32), (8, 32), (4, 64)):
        for length in (int(x) for x in args.lengths.split(",")):
            r = _case(h, d, length, args.tokens, tt)
            rows.append(r)
            print(
                f"{h:3d} {d:4d} {length:3d} {r['short_fwd_ms']:10.3f} {r['general_fwd_ms']:9.3f} "
                f"{r['sdpa_fwd_ms'] or float('nan'):8.3f} {r['short_fwd_bwd_ms']:10.3f} "
                f"{r['general_fwd_bwd_ms']:9.3f} "
                f"{r['sdpa_fwd_bwd_ms'] or float('nan'):8.3f}  {r['max_abs_diff_short_vs_general']:.2e}",
                flush=True,
            )
    command = "python3 benchmarks/attn_short_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {**collect_meta(command, torch.device("cuda")), "dtype": "bfloat16"}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
