"""Attention backward kernels on the GPU: dtypes x head dims x GQA x causal, varlen, both dQ
strategies, determinism. Judged with DESIGN.md's rule against a float64 autograd oracle.

Run: ``pytest -m gpu tests/gpu/test_gpu_attention_bwd.py`` (``-n 8`` compiles in parallel).
Each test pins one kernel config (``FLASHMOE_ATTN_BWD_TUNE=0``) to keep compile time down;
the autotuned configs are exercised by ``benchmarks/attn_bwd_tune.py``. These are the Triton
kernels: ``FLASHMOE_ATTN_GLUON_BWD=0`` keeps Hopper's D 64/128 dense backward off the Gluon
kernel, which ``test_gpu_attention_bwd_gluon.py`` checks.
"""

from __future__ import annotations

import math

import pytest
import torch
from _attention import (
    check_grads,
    check_public_api_fwd_bwd,
    poison_allocations,
    reference_grads,
    varlen_ref_fn,
)

from flashmoe_science import flash_attention_varlen
from flashmoe_science.ops.attention import launch_bwd, reference

pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 80, 96, 128, 256]


@pytest.fixture(autouse=True)
def _one_config(monkeypatch):
    monkeypatch.setenv("FLASHMOE_ATTN_BWD_TUNE", "0")
    monkeypatch.setenv("FLASHMOE_ATTN_AUTOTUNE", "0")  # the forward's switch (public-API tests)
    monkeypatch.setenv("FLASHMOE_ATTN_GLUON_BWD", "0")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_grads(dtype, d, heads, causal, monkeypatch):
    h, h_kv = heads
    s_q, s_k = 300, 517  # not block multiples; S_q < S_k (bottom-right causal)
    q = torch.randn(2, h, s_q, d, dtype=dtype, device="cuda")
    k = torch.randn(2, h_kv, s_k, d, dtype=dtype, device="cuda")
    v = torch.randn(2, h_kv, s_k, d, dtype=dtype, device="cuda")
    scale = 1.0 / math.sqrt(d)
    out, lse = reference.attention_ref(q, k, v, causal, scale)
    do = torch.randn_like(q)
    poison_allocations(monkeypatch)
    grads = launch_bwd.attention_bwd(do, q, k, v, out, lse, causal, scale)
    torch.cuda.synchronize()
    monkeypatch.undo()
    check_grads(grads, *reference_grads(q, k, v, do, causal, scale, reference.attention_ref))


@pytest.mark.parametrize("mode", ["separate", "atomic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_more_queries_than_keys(dtype, mode, monkeypatch):
    # S_q > S_k: the first S_q - S_k rows see no key (lse = -inf) and must contribute 0.
    monkeypatch.setenv("FLASHMOE_ATTN_BWD_DQ", mode)
    q = torch.randn(1, 6, 400, 128, dtype=dtype, device="cuda")
    k = torch.randn(1, 3, 150, 128, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    scale = 1.0 / math.sqrt(128)
    out, lse = reference.attention_ref(q, k, v, True, scale)
    do = torch.randn_like(q)
    grads = launch_bwd.attention_bwd(do, q, k, v, out, lse, True, scale)
    check_grads(grads, *reference_grads(q, k, v, do, True, scale, reference.attention_ref))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_atomic_dq_mode(dtype, causal, monkeypatch):
    monkeypatch.setenv("FLASHMOE_ATTN_BWD_DQ", "atomic")
    q = torch.randn(2, 8, 333, 64, dtype=dtype, device="cuda")
    k = torch.randn(2, 4, 333, 64, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    scale = 1.0 / math.sqrt(64)
    out, lse = reference.attention_ref(q, k, v, causal, scale)
    do = torch.randn_like(q)
    grads = launch_bwd.attention_bwd(do, q, k, v, out, lse, causal, scale)
    check_grads(grads, *reference_grads(q, k, v, do, causal, scale, reference.attention_ref))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_grads(dtype, causal):
    lq, lk = [130, 0, 1, 257, 64], [77, 9, 0, 300, 64]
    h, h_kv, d = 4, 2, 64

    def pack(lengths, heads):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        return torch.randn(sum(lengths), heads, d, dtype=dtype, device="cuda"), cu

    q, cu_q = pack(lq, h)
    k, cu_k = pack(lk, h_kv)
    v = torch.randn_like(k)
    scale = 1.0 / math.sqrt(d)
    out, lse = reference.attention_varlen_ref(q, k, v, cu_q, cu_k, causal, scale)
    do = torch.randn_like(q)
    grads = launch_bwd.attention_varlen_bwd(
        do, q, k, v, out, lse, cu_q, cu_k, max(lq), max(lk), causal, scale
    )

    ref_fn = varlen_ref_fn(cu_q, cu_k)

    check_grads(grads, *reference_grads(q, k, v, do, causal, scale, ref_fn))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_public_api_fwd_bwd_kernels(causal):
    check_public_api_fwd_bwd(causal)  # on the Triton backward (module fixture)


def test_public_varlen_fwd_bwd_kernels():
    lengths = [100, 0, 513, 7]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lengths), 4, 64, dtype=torch.bfloat16, device="cuda")
    k, v = torch.randn_like(q), torch.randn_like(q)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = flash_attention_varlen(*leaves, cu, cu, max(lengths), max(lengths), causal=True)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)

    ref_fn = varlen_ref_fn(cu, cu)

    check_grads(grads, *reference_grads(q, k, v, do, True, 1.0 / math.sqrt(64), ref_fn))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_mode_bit_identical(dtype, monkeypatch):
    monkeypatch.setenv("FLASHMOE_DETERMINISTIC", "1")
    q = torch.randn(2, 16, 1024, 128, dtype=dtype, device="cuda")
    k = torch.randn(2, 4, 1024, 128, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    scale = 1.0 / math.sqrt(128)
    out, lse = reference.attention_ref(q, k, v, True, scale)
    do = torch.randn_like(q)
    runs = [launch_bwd.attention_bwd(do, q, k, v, out, lse, True, scale) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
