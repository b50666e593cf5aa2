"""Extra GPU memory of one attention forward + backward (issue 4: 16k causal within 1.2x
cuDNN's). Peak ``torch.cuda.max_memory_allocated`` during the step minus what was allocated
before it: q, k, v and the output gradient are not counted; the output, lse/stats, and the
gradients are.

    PYTHONPATH=src python3 benchmarks/attn_memory.py [--seqlen 16384] [--heads 16] [--head-dim 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flashmoe_science import flash_attention_science  # noqa: E402


def _extra_gib(fn, b: int, s: int, h: int, d: int) -> float:
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn_like(q, requires_grad=True)
    g = torch.randn_like(q)
    fn(q, k, v).backward(g)  # warm-up (compilation, workspaces)
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(q, k, v).backward(g)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _bhsd(fn):
    """Run ``fn`` on (B, H, S, D) views of (B, S, H, D) tensors; output back as (B, S, H, D)."""

    def run(q, k, v):
        return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return run


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return _bhsd(run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args(argv)
    s, h, d = args.seqlen, args.heads, args.head_dim
    impls = {
        "flashmoe": _bhsd(lambda q, k, v: flash_attention_science(q, k, v, causal=True)),
        "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B1 S{s} H{h} D{d} causal bf16")
    for name, fn in impls.items():
        print(f"{name:12s} extra peak {_extra_gib(fn, 1, s, h, d):.3f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
