"""Gluon (warp-specialised, sm_90) attention forward on the GPU, against the float64 reference
with the DESIGN.md rule. Outputs are NaN-poisoned so unwritten elements fail. Skipped off
Hopper: the kernel is sm_90 only and Gluon has no CPU interpreter (CPU CI tests the Triton
kernel instead).
"""

from __future__ import annotations

import pytest
import torch
from _numerics import assert_close_rule

from flashmoe_science.ops.attention import launch_gluon, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
        reason="the Gluon kernel needs an sm_90 GPU",
    ),
]

DTYPES = [torch.float16, torch.bfloat16]
# (B, H, H_kv, S_q, S_k)
SHAPES = [
    (2, 4, 4, 128, 128),  # one program, block multiple
    (1, 4, 4, 1, 1),  # S = 1
    (1, 4, 4, 1, 333),  # decode: one query, ragged keys
    (2, 8, 2, 257, 257),  # GQA 4:1, not a block multiple
    (1, 8, 1, 300, 1000),  # MQA, S_q < S_k (bottom-right causal)
    (1, 4, 4, 1000, 300),  # S_q > S_k: first rows see no key when causal
    (1, 4, 2, 1537, 1537),  # longer, ragged
]


def _check(q, k, v, causal, config=None):
    scale = q.shape[-1] ** -0.5
    b, h, s_q, _ = q.shape
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((b, h, s_q), float("nan"), dtype=torch.float32, device=q.device)
    assert launch_gluon.supported(q, k, v)
    launch_gluon.attention_fwd(q, k, v, causal, scale, config=config, out=out, lse=lse)
    r_out, r_lse = reference.attention_ref(q, k, v, causal, scale, compute_dtype=torch.float64)
    p_out, p_lse = reference.attention_ref(q, k, v, causal, scale, compute_dtype=q.dtype)
    assert_close_rule(out, r_out, p_out, name="out")
    assert_close_rule(lse, r_lse, p_lse.float(), name="lse")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", launch_gluon.HEAD_DIMS, ids=[f"D{d}" for d in launch_gluon.HEAD_DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_dense(dtype, d, causal):
    for b, h, h_kv, s_q, s_k in SHAPES:
        q = torch.randn(b, h, s_q, d, device="cuda", dtype=dtype)
        k = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=dtype)
        v = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=dtype)
        _check(q, k, v, causal)


@pytest.mark.parametrize("pingpong", [False, True], ids=["no-pingpong", "pingpong"])
@pytest.mark.parametrize("stages", [2, 3], ids=["2-stages", "3-stages"])
def test_configs(stages, pingpong):
    """Other pipeline depths and the consumers' scheduling give the same results."""
    q = torch.randn(2, 4, 1100, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 1300, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 2, 1300, 128, device="cuda", dtype=torch.bfloat16)
    for causal in (False, True):
        _check(q, k, v, causal, config=(64, 128, stages, pingpong))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_strided_bshd_views(dtype):
    """Transposed (B, S, H, D) views go through 4-D descriptors with no copy."""
    b, s, h, h_kv, d = 2, 777, 8, 2, 128
    q = torch.randn(b, s, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(b, s, h_kv, d, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(b, s, h_kv, d, device="cuda", dtype=dtype).transpose(1, 2)
    _check(q, k, v, True)


def test_kv_cache_view_with_nan_tail():
    """Keys/values are a view of a longer cache whose unused rows hold NaN: rows past S_k
    must never reach the output (TMA zero-fills rows outside the descriptor's shape)."""
    cache_k = torch.full((1, 4, 512, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    cache_v = torch.full_like(cache_k, float("nan"))
    s_k = 300
    cache_k[:, :, :s_k] = torch.randn(1, 4, s_k, 128, device="cuda", dtype=torch.bfloat16)
    cache_v[:, :, :s_k] = torch.randn(1, 4, s_k, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 4, 200, 128, device="cuda", dtype=torch.bfloat16)
    for causal in (False, True):
        _check(q, cache_k[:, :, :s_k], cache_v[:, :, :s_k], causal)


def test_unsupported_falls_outside():
    """What the Gluon kernel does not cover is reported, not run."""
    q = torch.randn(1, 2, 64, 96, device="cuda", dtype=torch.bfloat16)
    assert not launch_gluon.supported(q, q, q)
    q = torch.randn(1, 2, 64, 128, device="cuda", dtype=torch.float32)
    assert not launch_gluon.supported(q, q, q)
