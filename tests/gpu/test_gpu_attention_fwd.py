"""Attention forward kernel on the GPU: dtypes x head dims x seqlens x causal x GQA, through the
public API, against the float64 reference with the DESIGN.md rule. Output buffers are
NaN-poisoned (the launcher's allocation is replaced) so unwritten elements fail.

Autotuning is switched off here (FLASHMOE_ATTN_AUTOTUNE=0: the default config per head dim)
to keep compile time down; the benchmark exercises the tuner.
"""

from __future__ import annotations

import pytest
import torch
from _numerics import assert_close_rule

from flashmoe_science import flash_attention_science, flash_attention_varlen
from flashmoe_science.ops.attention import launch, launch_gluon, reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 80, 96, 128, 256]
# (B, H, H_kv, S_q, S_k)
SHAPES = [
    (2, 4, 4, 128, 128),  # block multiple
    (1, 4, 4, 1, 1),  # S = 1
    (1, 4, 4, 1, 333),  # decode: one query, ragged keys
    (2, 8, 2, 257, 257),  # GQA 4:1, not a block multiple
    (1, 8, 1, 300, 1000),  # MQA, S_q < S_k (bottom-right causal)
    (1, 4, 4, 1000, 300),  # S_q > S_k: first rows see no key when causal
    (1, 4, 2, 1537, 1537),  # longer, ragged, second sequence-length class
]


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    monkeypatch.setenv("FLASHMOE_ATTN_AUTOTUNE", "0")
    monkeypatch.setenv("FLASHMOE_BACKEND", "auto")

    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launch, "_empty", empty)


def _check_dense(q, k, v, causal, out, lse):
    scale = q.shape[-1] ** -0.5
    r_out, r_lse = reference.attention_ref(q, k, v, causal, scale, compute_dtype=torch.float64)
    p_out, p_lse = reference.attention_ref(q, k, v, causal, scale, compute_dtype=q.dtype)
    assert_close_rule(out, r_out, p_out, name="out")
    assert_close_rule(lse, r_lse, p_lse.float(), name="lse")


@pytest.mark.parametrize("gluon", ["1", "0"], ids=["dispatch", "triton-only"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=[f"D{d}" for d in HEAD_DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_dense(dtype, d, causal, gluon, monkeypatch):
    """Through the public API; on Hopper D 64-256 (but 32) dispatch to the Gluon kernel, and
    FLASHMOE_ATTN_GLUON=0 keeps the Triton kernel tested there too."""
    if gluon == "0" and launch_gluon.padded_head_dim(d) is None:
        pytest.skip("only the Triton kernel runs this head dim anyway")
    monkeypatch.setenv("FLASHMOE_ATTN_GLUON", gluon)
    for b, h, h_kv, s_q, s_k in SHAPES:
        q = torch.randn(b, h, s_q, d, device="cuda", dtype=dtype)
        k = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=dtype)
        v = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=dtype)
        out, lse = flash_attention_science(q, k, v, causal=causal, return_lse=True)
        _check_dense(q, k, v, causal, out, lse)


MODES = [pytest.param(0, id="pointers"), pytest.param(1, id="tma-device"), pytest.param(2, id="tma-host")]


@pytest.mark.parametrize("use_tma", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_strided_bshd_views(dtype, use_tma):
    b, s, h, h_kv, d = 2, 777, 8, 2, 128
    q = torch.randn(b, s, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(b, s, h_kv, d, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(b, s, h_kv, d, device="cuda", dtype=dtype).transpose(1, 2)
    out, lse = launch.attention_fwd(q, k, v, True, d**-0.5, use_tma=use_tma)
    _check_dense(q, k, v, True, out, lse)


@pytest.mark.parametrize("use_tma", MODES)
def test_load_modes(use_tma):
    q = torch.randn(2, 8, 700, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 900, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 2, 900, 128, device="cuda", dtype=torch.bfloat16)
    for causal in (False, True):
        out, lse = launch.attention_fwd(q, k, v, causal, 128**-0.5, use_tma=use_tma)
        _check_dense(q, k, v, causal, out, lse)


@pytest.mark.parametrize("use_tma", MODES)
def test_kv_cache_view_with_nan_tail(use_tma):
    """k/v are views of a larger cache whose unused rows are NaN (decoding)."""
    cache_k = torch.full((2, 4, 1024, 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    cache_v = torch.full((2, 4, 1024, 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    cache_k[:, :, :333] = torch.randn(2, 4, 333, 64, device="cuda", dtype=torch.bfloat16)
    cache_v[:, :, :333] = torch.randn(2, 4, 333, 64, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 4, 5, 64, device="cuda", dtype=torch.bfloat16)
    k, v = cache_k[:, :, :333], cache_v[:, :, :333]
    out, lse = launch.attention_fwd(q, k, v, True, 0.125, use_tma=use_tma)
    _check_dense(q, k, v, True, out, lse)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128], ids=["D64", "D128"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_varlen(dtype, d, causal):
    lens_q = [5, 0, 333, 1, 0, 1200, 64]
    lens_k = [5, 0, 333, 90, 7, 1200, 0]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens_q), 8, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), 2, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), 2, d, device="cuda", dtype=dtype)
    out, lse = flash_attention_varlen(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_lse=True
    )
    scale = d**-0.5
    r_out, r_lse = reference.attention_varlen_ref(
        q, k, v, cu_q, cu_k, causal, scale, compute_dtype=torch.float64
    )
    p_out, p_lse = reference.attention_varlen_ref(q, k, v, cu_q, cu_k, causal, scale, compute_dtype=dtype)
    assert_close_rule(out, r_out, p_out, name="out")
    assert_close_rule(lse, r_lse, p_lse.float(), name="lse")


def test_autotuned_path_matches(monkeypatch):
    """The autotuned launch (default on CUDA) gives the same answer as the reference."""
    monkeypatch.delenv("FLASHMOE_ATTN_AUTOTUNE")
    q = torch.randn(1, 4, 1111, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, 1111, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 4, 1111, 64, device="cuda", dtype=torch.bfloat16)
    out, lse = flash_attention_science(q, k, v, causal=True, return_lse=True)
    _check_dense(q, k, v, True, out, lse)
