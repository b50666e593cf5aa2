"""Small attention-forward launches for compute-sanitizer, and one launch for Nsight Compute.

PYTHONPATH=src python3 -m benchmarks.attn_fwd_profile sanitize  # every load mode, dense + varlen
PYTHONPATH=src python3 -m benchmarks.attn_fwd_profile ncu       # one B4 H16 S4k D128 full launch
PYTHONPATH=src python3 -m benchmarks.attn_fwd_profile sanitize_gluon  # the Gluon kernel's configs
"""

from __future__ import annotations

import sys

import torch

from flashmoe_science.ops.attention import launch, reference


def _dense(b, h, h_kv, s_q, s_k, d, causal, mode):
    q = torch.randn(b, h, s_q, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=torch.bfloat16)
    out, lse = launch.attention_fwd(q, k, v, causal, d**-0.5, use_tma=mode)
    ref, _ = reference.attention_ref(q, k, v, causal, d**-0.5)
    return (out.float() - ref.float()).abs().max().item()


def _varlen(lens_q, lens_k, h, h_kv, d, causal, mode):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens_k), h_kv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(lens_k), h_kv, d, device="cuda", dtype=torch.bfloat16)
    out, _ = launch.attention_varlen_fwd(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal, d**-0.5, use_tma=mode
    )
    ref, _ = reference.attention_varlen_ref(q, k, v, cu_q, cu_k, causal, d**-0.5)
    return (out.float() - ref.float()).abs().max().item()


def sanitize() -> None:
    errs = []
    for mode in (0, 1, 2):
        errs.append(_dense(1, 4, 2, 100, 130, 64, True, mode))
        errs.append(_dense(1, 4, 2, 130, 100, 128, True, mode))
        errs.append(_dense(2, 2, 2, 70, 70, 128, False, mode))
        errs.append(_varlen([5, 0, 70, 33], [5, 9, 70, 0], 4, 2, 64, True, mode))
    errs.append(_dense(1, 2, 2, 70, 70, 96, True, None))
    errs.append(_dense(1, 2, 1, 70, 90, 256, True, None))
    errs.append(_dense(1, 2, 1, 70, 90, 32, False, None))
    torch.cuda.synchronize()
    print(f"sanitize script: {len(errs)} launches, max |out - ref| = {max(errs):.3e}")


def sanitize_gluon() -> None:
    """The Gluon kernel (sm_90): each default config, ping-pong, and persistent schedules on 3
    programs (several tiles each), on small ragged shapes."""
    from flashmoe_science.ops.attention import launch_gluon

    def run(b, h, h_kv, s_q, s_k, d, causal, config=None, programs=None):
        q = torch.randn(b, h, s_q, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=torch.bfloat16)
        real = launch_gluon._num_sms
        if programs is not None:
            launch_gluon._num_sms = lambda device: programs
        out, _ = launch_gluon.attention_fwd(q, k, v, causal, d**-0.5, config=config)
        launch_gluon._num_sms = real
        ref, _ = reference.attention_ref(q, k, v, causal, d**-0.5)
        return (out.float() - ref.float()).abs().max().item()

    errs = [
        run(1, 4, 2, 300, 333, 128, False),  # snake (default since run 8)
        run(1, 4, 2, 300, 333, 128, False, (64, 128, 2, False, 2, 1)),  # persistent round-robin
        run(1, 4, 2, 333, 300, 128, True),  # snake (default), rows that see no key
        run(1, 4, 2, 300, 333, 128, True, (64, 128, 2, False, 2, 0)),  # one program per tile
        run(1, 4, 2, 300, 333, 128, True, (64, 128, 2, True, 2, 2), programs=3),  # ping-pong
        run(1, 4, 2, 300, 333, 128, False, (64, 128, 2, False, 2, 1), programs=3),
        run(1, 4, 1, 400, 450, 64, False),  # 3 consumers, snake (default)
        run(1, 4, 1, 450, 400, 64, True, programs=3),
        run(1, 4, 1, 450, 400, 64, True, (64, 128, 3, True, 3, 1), programs=3),
        # Three consumers, causal, S_q 1000: the first tile is shifted by two empty consumers.
        run(1, 2, 1, 1000, 1000, 64, True, (64, 128, 2, True, 3, 2), programs=3),
        run(1, 4, 2, 300, 333, 96, False),  # D96 as 128: zero-filled columns, clipped stores
        run(1, 4, 2, 333, 300, 80, True, programs=3),
        run(1, 4, 2, 300, 333, 256, False),  # D256: output staged in Q's buffer
        run(1, 4, 2, 333, 300, 256, True, (64, 64, 2, False, 2, 2), programs=3),  # ... persistent
        run(1, 4, 2, 300, 333, 256, True, (64, 32, 3, False, 2, 0)),  # own output buffer
    ]
    torch.cuda.synchronize()
    print(f"sanitize_gluon script: {len(errs)} launches, max |out - ref| = {max(errs):.3e}")


def ncu() -> None:
    q = torch.randn(4, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(4, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
    launch.attention_fwd(q, k, v, False, 128**-0.5)
    torch.cuda.synchronize()


if __name__ == "__main__":
    {"sanitize": sanitize, "sanitize_gluon": sanitize_gluon, "ncu": ncu}[sys.argv[1]]()
