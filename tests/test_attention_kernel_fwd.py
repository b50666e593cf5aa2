"""The attention forward kernel under Triton's interpreter (CPU), against the float64 reference
with the DESIGN.md rule. Outputs are NaN-poisoned before each call so unwritten elements fail.

Small shapes, blocks >= 16, one fixed config (the interpreter cannot autotune). bfloat16
runs through the kernel's float32-upcast path (the interpreter computes bf16 wrong).
"""

from __future__ import annotations

import os

import pytest
import torch
from _numerics import assert_close_rule

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="interpreter tests (CPU); the GPU module covers CUDA",
)

from flashmoe_science import flash_attention_science, flash_attention_varlen  # noqa: E402
from flashmoe_science.ops.attention import launch, reference  # noqa: E402


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Every output buffer the launcher allocates starts as NaN."""

    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launch, "_empty", empty)


def _qkv(b, h, h_kv, s_q, s_k, d, dtype):
    q = torch.randn(b, h, s_q, d, dtype=dtype)
    k = torch.randn(b, h_kv, s_k, d, dtype=dtype)
    v = torch.randn(b, h_kv, s_k, d, dtype=dtype)
    return q, k, v


def _check(out, lse, q, k, v, causal, scale):
    r_out, r_lse = reference.attention_ref(q, k, v, causal, scale, compute_dtype=torch.float64)
    p_out, p_lse = reference.attention_ref(q, k, v, causal, scale, compute_dtype=q.dtype)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close_rule(out, r_out, p_out, name="out")
    # lse is float32 in the kernel and in the same-dtype reference alike: floor at float32.
    assert_close_rule(lse, r_lse, p_lse.float(), name="lse")


# (B, H, H_kv, S_q, S_k, D, causal): the interpreter config is BLOCK_M 32, BLOCK_N 16.
CASES = [
    pytest.param(1, 2, 2, 37, 37, 32, False, id="odd-S-full"),
    pytest.param(1, 2, 2, 37, 37, 32, True, id="odd-S-causal"),
    pytest.param(2, 2, 2, 64, 64, 64, True, id="block-multiple-causal"),
    pytest.param(1, 2, 2, 19, 50, 32, True, id="Sq<Sk-causal-bottom-right"),
    pytest.param(1, 2, 2, 50, 19, 32, True, id="Sq>Sk-causal-rows-see-nothing"),
    pytest.param(1, 8, 2, 33, 45, 32, True, id="GQA-4:1"),
    pytest.param(1, 4, 1, 40, 23, 64, False, id="MQA"),
    pytest.param(2, 2, 2, 1, 1, 32, True, id="S=1"),
    pytest.param(1, 2, 2, 1, 29, 32, True, id="Sq=1-decode"),
    pytest.param(1, 2, 2, 21, 21, 96, True, id="D=96-padded"),
    pytest.param(1, 2, 1, 19, 26, 80, False, id="D=80-padded"),
]


@pytest.mark.parametrize("b,h,h_kv,s_q,s_k,d,causal", CASES)
def test_dense_fp16(b, h, h_kv, s_q, s_k, d, causal):
    q, k, v = _qkv(b, h, h_kv, s_q, s_k, d, torch.float16)
    scale = d**-0.5
    out, lse = launch.attention_fwd(q, k, v, causal, scale)
    _check(out, lse, q, k, v, causal, scale)


MODES = [pytest.param(0, id="pointers"), pytest.param(1, id="tma-device"), pytest.param(2, id="tma-host")]


@pytest.mark.parametrize("use_tma", MODES)
@pytest.mark.parametrize(
    "config",
    [(32, 16, 1, 4), (16, 32, 1, 4)],
    ids=["BM>BN", "BM<BN"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_variants(use_tma, config, causal):
    """Every load mode (pointers, per-program or host TMA descriptors), with the diagonal
    spanning several key blocks (BM > BN) or one key block wider than the query block."""
    q, k, v = _qkv(1, 4, 2, 45, 71, 32, torch.float16)
    scale = 0.3
    out, lse = launch.attention_fwd(q, k, v, causal, scale, config=config, use_tma=use_tma)
    _check(out, lse, q, k, v, causal, scale)


def test_bf16_upcast_path():
    q, k, v = _qkv(1, 2, 1, 40, 40, 32, torch.bfloat16)
    out, lse = launch.attention_fwd(q, k, v, True, 0.2)
    _check(out, lse, q, k, v, True, 0.2)


def test_fp32_upcast_path():
    """float32 inputs run the kernel's float32 (UPCAST) path under the interpreter."""
    q, k, v = _qkv(1, 2, 2, 33, 33, 32, torch.float32)
    out, lse = launch.attention_fwd(q, k, v, True, 0.2)
    _check(out, lse, q, k, v, True, 0.2)


@pytest.mark.parametrize("use_tma", MODES)
def test_strided_bshd_view(use_tma):
    """q/k/v as transposed views of (B, S, H, D) tensors: no copy, strides honoured."""
    b, s, h, h_kv, d = 2, 35, 4, 2, 32
    q = torch.randn(b, s, h, d, dtype=torch.float16).transpose(1, 2)
    k = torch.randn(b, s, h_kv, d, dtype=torch.float16).transpose(1, 2)
    v = torch.randn(b, s, h_kv, d, dtype=torch.float16).transpose(1, 2)
    assert not q.is_contiguous()
    out, lse = launch.attention_fwd(q, k, v, True, d**-0.5, use_tma=use_tma)
    assert out.is_contiguous()
    _check(out, lse, q, k, v, True, d**-0.5)


@pytest.mark.parametrize("use_tma", MODES)
def test_kv_cache_view_with_nan_tail(use_tma):
    """k/v are views of a larger, partly NaN cache (decoding): the rows past S_k that a
    row-view descriptor can reach must not leak into the output."""
    b, h, s_q, s_k, cap, d = 1, 2, 3, 37, 64, 32
    cache_k = torch.full((b, h, cap, d), float("nan"), dtype=torch.float16)
    cache_v = torch.full((b, h, cap, d), float("nan"), dtype=torch.float16)
    cache_k[:, :, :s_k] = torch.randn(b, h, s_k, d, dtype=torch.float16)
    cache_v[:, :, :s_k] = torch.randn(b, h, s_k, d, dtype=torch.float16)
    k, v = cache_k[:, :, :s_k], cache_v[:, :, :s_k]
    q = torch.randn(b, h, s_q, d, dtype=torch.float16)
    out, lse = launch.attention_fwd(q, k, v, True, d**-0.5, use_tma=use_tma)
    _check(out, lse, q, k, v, True, d**-0.5)


def test_non_contiguous_last_dim():
    """A last dim with stride != 1 is copied once, not rejected."""
    q, k, v = _qkv(1, 2, 2, 20, 20, 32, torch.float16)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    out, lse = launch.attention_fwd(qt, k, v, False, 0.25)
    _check(out, lse, q, k, v, False, 0.25)


def _varlen_case(lens_q, lens_k, h, h_kv, d, dtype):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), h, d, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), h_kv, d, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), h_kv, d, dtype=dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("use_tma", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_with_empty_sequences(use_tma, causal):
    lens_q = [5, 0, 33, 1, 0, 17]
    lens_k = [5, 0, 33, 9, 4, 0]  # seq 4: keys but no queries; seq 5: queries but no keys
    q, k, v, cu_q, cu_k = _varlen_case(lens_q, lens_k, 4, 2, 32, torch.float16)
    scale = 32**-0.5
    out, lse = launch.attention_varlen_fwd(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal, scale, use_tma=use_tma
    )
    r_out, r_lse = reference.attention_varlen_ref(
        q, k, v, cu_q, cu_k, causal, scale, compute_dtype=torch.float64
    )
    p_out, p_lse = reference.attention_varlen_ref(q, k, v, cu_q, cu_k, causal, scale, compute_dtype=q.dtype)
    assert_close_rule(out, r_out, p_out, name="out")
    assert_close_rule(lse, r_lse, p_lse.float(), name="lse")


def test_public_api_runs_the_kernel(monkeypatch):
    """FLASHMOE_BACKEND=triton routes CPU fp16 tensors to the interpreted kernel."""
    monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
    calls = []
    real = launch.attention_fwd
    monkeypatch.setattr(launch, "attention_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(1, 4, 2, 30, 30, 64, torch.float16)
    out, lse = flash_attention_science(q, k, v, causal=True, return_lse=True)
    assert calls
    _check(out, lse, q, k, v, True, 64**-0.5)


def test_public_varlen_api_runs_the_kernel(monkeypatch):
    monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
    lens = [7, 0, 20]
    q, k, v, cu_q, cu_k = _varlen_case(lens, lens, 2, 2, 32, torch.float16)
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, 20, 20, causal=True, return_lse=True)
    r_out, r_lse = reference.attention_varlen_ref(
        q, k, v, cu_q, cu_k, True, 32**-0.5, compute_dtype=torch.float64
    )
    p_out, _ = reference.attention_varlen_ref(q, k, v, cu_q, cu_k, True, 32**-0.5, compute_dtype=q.dtype)
    assert_close_rule(out, r_out, p_out, name="out")


def test_unsupported_head_dim_is_named():
    q = torch.randn(1, 1, 4, 48, dtype=torch.float16)
    reason = launch.unsupported_reason(q, q, q)
    assert reason is not None and "head_dim 48" in reason and "32, 64, 96, 128, 256" in reason
    q64 = torch.randn(1, 1, 4, 64, dtype=torch.float16)
    assert launch.unsupported_reason(q64, q64, q64) is None
