"""Attention backward Triton kernels (``launch_bwd``) against the float64 oracle.

On a CPU machine the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET);
shapes are small and odd so every masked path (sequence tails, causal diagonal with
S_q != S_k, rows that see no key, empty varlen sequences) is exercised. The forward's
``out``/``lse`` come from ``reference.attention_ref`` (float32 math, lse natural log), as
the forward kernel would produce them. Gradients are judged with DESIGN.md's rule:
float64 autograd oracle ``r``, same-dtype autograd reference ``p``.
"""

from __future__ import annotations

import math

import pytest
import torch
from _attention import check_grads, reference_grads, varlen_ref_fn

from flashmoe_science import flash_attention_science, flash_attention_varlen
from flashmoe_science.ops.attention import launch_bwd, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, h, h_kv, s_q, s_k, d, dtype):
    q = torch.randn(b, h, s_q, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, h_kv, s_k, d, dtype=dtype, device=DEVICE)
    v = torch.randn(b, h_kv, s_k, d, dtype=dtype, device=DEVICE)
    return q, k, v


DENSE_CASES = [
    # (b, h, h_kv, s_q, s_k, d, causal)
    pytest.param((1, 2, 2, 67, 67, 64, False), id="odd-length"),
    pytest.param((1, 2, 2, 67, 67, 64, True), id="odd-length-causal"),
    pytest.param((1, 4, 2, 45, 83, 32, True), id="gqa2-causal-sq<sk"),
    pytest.param((1, 4, 1, 90, 40, 64, True), id="mqa-causal-sq>sk-rows-see-no-key"),
    pytest.param((2, 2, 1, 1, 70, 64, True), id="decode-sq1"),
    pytest.param((1, 2, 2, 40, 40, 96, False), id="d96-not-pow2"),
    pytest.param((1, 2, 1, 33, 40, 80, True), id="d80-not-pow2"),
    pytest.param((1, 3, 3, 130, 17, 32, False), id="sk<block"),
]


@pytest.mark.parametrize("mode", ["separate", "atomic"])
@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_grads_match_float64(case, mode, monkeypatch, poisoned_alloc):
    monkeypatch.setenv("FLASHMOE_ATTN_BWD_DQ", mode)
    b, h, h_kv, s_q, s_k, d, causal = case
    q, k, v = _inputs(b, h, h_kv, s_q, s_k, d, torch.float16)
    scale = 1.0 / math.sqrt(d)
    out, lse = reference.attention_ref(q, k, v, causal, scale)
    do = torch.randn_like(q)
    grads = launch_bwd.attention_bwd(do, q, k, v, out, lse, causal, scale)
    check_grads(grads, *reference_grads(q, k, v, do, causal, scale, reference.attention_ref))


def test_strided_bshd_views(poisoned_alloc):
    # (B, S, H, D) tensors viewed as (B, H, S, D): non-contiguous, last dim contiguous.
    b, s_q, s_k, h, h_kv, d = 2, 33, 50, 4, 2, 32
    q = torch.randn(b, s_q, h, d, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    k = torch.randn(b, s_k, h_kv, d, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    v = torch.randn(b, s_k, h_kv, d, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    scale = 0.3  # not 1/sqrt(d): the scale must be threaded through
    out, lse = reference.attention_ref(q, k, v, True, scale)
    do = torch.randn(b, s_q, h, d, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    grads = launch_bwd.attention_bwd(do, q, k, v, out, lse, True, scale)
    assert grads[0].stride() == q.stride()
    check_grads(grads, *reference_grads(q, k, v, do, True, scale, reference.attention_ref))


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the interpreter's bfloat16 detour")
def test_bfloat16_under_interpreter_runs_in_float32():
    q, k, v = _inputs(1, 2, 1, 40, 56, 32, torch.bfloat16)
    scale = 1.0 / math.sqrt(32)
    out, lse = reference.attention_ref(q, k, v, True, scale)
    do = torch.randn_like(q)
    grads = launch_bwd.attention_bwd(do, q, k, v, out, lse, True, scale)
    check_grads(grads, *reference_grads(q, k, v, do, True, scale, reference.attention_ref))


def _pack(lengths, h, d, dtype):
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return torch.randn(total, h, d, dtype=dtype, device=DEVICE), cu


VARLEN_CASES = [
    # (lengths_q, lengths_k, h, h_kv, causal)
    pytest.param(([37, 0, 1, 64, 5], [20, 3, 0, 64, 41], 4, 2, True), id="empty-seqs-gqa-causal"),
    pytest.param(([37, 0, 1, 64, 5], [20, 3, 0, 64, 41], 2, 2, False), id="empty-seqs-full"),
]


@pytest.mark.parametrize("mode", ["separate", "atomic"])
@pytest.mark.parametrize("case", VARLEN_CASES)
def test_varlen_grads_match_float64(case, mode, monkeypatch, poisoned_alloc):
    monkeypatch.setenv("FLASHMOE_ATTN_BWD_DQ", mode)
    _check_varlen_grads(*case)


def _check_varlen_grads(lq, lk, h, h_kv, causal, **bwd_options):
    """The varlen backward kernels on packed fp16 inputs (d = 32) against the float64 oracle."""
    d = 32
    q, cu_q = _pack(lq, h, d, torch.float16)
    k, cu_k = _pack(lk, h_kv, d, torch.float16)
    v = torch.randn_like(k)
    scale = 1.0 / math.sqrt(d)
    out, lse = reference.attention_varlen_ref(q, k, v, cu_q, cu_k, causal, scale)
    do = torch.randn_like(q)
    grads = launch_bwd.attention_varlen_bwd(
        do, q, k, v, out, lse, cu_q, cu_k, max(lq), max(lk), causal, scale, **bwd_options
    )
    check_grads(grads, *reference_grads(q, k, v, do, causal, scale, varlen_ref_fn(cu_q, cu_k)))


def test_empty_inputs_launch_nothing():
    q, k, v = _inputs(1, 2, 2, 0, 8, 32, torch.float16)
    lse = torch.empty(1, 2, 0, device=DEVICE)
    dq, dk, dv = launch_bwd.attention_bwd(q, q, k, v, q, lse, False, 0.2)
    assert (
        dq.shape == q.shape and torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))
    )


def test_deterministic_mode_forces_separate_dq(monkeypatch):
    monkeypatch.setenv("FLASHMOE_ATTN_BWD_DQ", "atomic")
    assert launch_bwd.dq_mode() == "atomic"
    monkeypatch.setenv("FLASHMOE_DETERMINISTIC", "1")
    assert launch_bwd.dq_mode() == "separate"
    monkeypatch.delenv("FLASHMOE_DETERMINISTIC")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert launch_bwd.dq_mode() == "separate"
    finally:
        torch.use_deterministic_algorithms(previous)


def test_deterministic_runs_are_bit_identical(monkeypatch):
    monkeypatch.setenv("FLASHMOE_DETERMINISTIC", "1")
    q, k, v = _inputs(1, 4, 2, 70, 70, 32, torch.float16)
    scale = 1.0 / math.sqrt(32)
    out, lse = reference.attention_ref(q, k, v, True, scale)
    do = torch.randn_like(q)
    first = launch_bwd.attention_bwd(do, q, k, v, out, lse, True, scale)
    second = launch_bwd.attention_bwd(do, q, k, v, out, lse, True, scale)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_public_api_triton_path_fwd_and_bwd(causal, path, monkeypatch):
    """Forward and backward kernels together through the public API: in eager mode under the
    plain ``EagerAttention`` function (twice: the second call takes the remembered-metadata
    shortcut), and with that switched off through the custom ops' registered autograd (the
    path torch.compile traces)."""
    from flashmoe_science.ops.attention import api, autograd

    monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
    monkeypatch.setattr(api, "_DIRECT", {})
    calls = []
    real = autograd.EagerAttention.apply
    if path == "eager":
        monkeypatch.setattr(autograd.EagerAttention, "apply", lambda *a: calls.append(1) or real(*a))
    else:
        monkeypatch.setattr(api, "direct_autograd_ok", lambda *t: False)
    q, k, v = _inputs(1, 4, 2, 50, 70, 32, torch.float16)
    scale = 1.0 / math.sqrt(32)
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = flash_attention_science(*leaves, causal=causal)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, do)
        check_grads(grads, *reference_grads(q, k, v, do, causal, scale, reference.attention_ref))
    assert calls == ([1, 1] if path == "eager" else [])


def test_eager_path_lse_only_gives_zero_grads(monkeypatch):
    """Only lse used (it is not differentiated): zero gradients, as the custom op gives."""
    monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
    q, k, v = _inputs(1, 2, 2, 20, 20, 32, torch.float16)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    _, lse = flash_attention_science(*leaves, causal=True, return_lse=True)
    grads = torch.autograd.grad(lse.sum(), leaves)
    assert all(torch.equal(g, torch.zeros_like(t)) for g, t in zip(grads, leaves))


def test_public_varlen_triton_path_fwd_and_bwd(monkeypatch):
    monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
    lengths = [30, 0, 45]
    q, cu = _pack(lengths, 2, 32, torch.float16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = flash_attention_varlen(*leaves, cu, cu, max(lengths), max(lengths), causal=True)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)

    ref_fn = varlen_ref_fn(cu, cu)

    check_grads(grads, *reference_grads(q, k, v, do, True, 1.0 / math.sqrt(32), ref_fn))


def test_gradcheck_reference_plumbing(monkeypatch):
    # float64 takes the reference path: checks the custom op's registered backward wiring.
    monkeypatch.setenv("FLASHMOE_BACKEND", "reference")
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)  # GQA 2:1, S_q < S_k causal
    k = torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention_science(a, b, c, causal=True), (q, k, v))


def test_batch_times_heads_over_the_grid_y_limit(monkeypatch, poisoned_alloc):
    """Packed batches of >65,535 (sequence, head) pairs split them over grid axes 1 and 2;
    the limit is lowered here so the split (and the exit of the spare programs) runs small."""
    monkeypatch.setattr(launch_bwd, "_MAX_GRID_Y", 3)
    assert launch_bwd._bh_axes(10) == (3, 4) and launch_bwd._bh_axes(3) == (3, 1)
    _check_varlen_grads([9, 0, 17, 4, 30], [9, 0, 17, 4, 30], 2, 2, True, short=False)


@pytest.mark.parametrize("d", [64, 96])
def test_bwd_preprocess_padded(d):
    """The Gluon backward's preprocess (a Triton kernel, so it runs in the interpreter): delta =
    rowsum(dO * O) and lse2 = lse * log2(e) over every row of a padded (B, H, S_pad) buffer, with
    delta 0 and lse2 +inf past S_q and where a row saw no key (lse = -inf); the buffers start
    NaN, so an unwritten row fails. It also zeroes the float32 dQ accumulator's S_q rows and
    nothing past them."""
    from flashmoe_science.ops.attention.kernels import bwd as bwd_k

    b, h, s_q, s_pad, block_m = 2, 3, 70, 128, 64
    o = torch.randn(b, h, s_q, d, device=DEVICE)
    do = torch.randn(b, h, s_q, d, device=DEVICE)
    lse = torch.randn(b, h, s_q, device=DEVICE)
    lse[0, 1, 5] = float("-inf")
    delta = torch.full((b, h, s_pad), float("nan"), device=DEVICE)
    lse2 = torch.full((b, h, s_pad), float("nan"), device=DEVICE)
    # The dQ accumulator, with a sentinel row past its end that the kernel must not touch.
    dq_acc = torch.full((b * h * s_q + 1, d), float("nan"), device=DEVICE)
    bwd_k._bwd_preprocess_padded[(s_pad // block_m, b * h, 1)](
        o, do, lse, delta, lse2, dq_acc, *o.stride()[:3], *do.stride()[:3], *lse.stride(), s_q, s_pad, h,
        b * h, HEAD_DIM=d, BLOCK_D=128 if d > 64 else 64, BLOCK_M=block_m, ZERO_DQ=True,
    )  # fmt: skip
    assert not dq_acc[:-1].any() and dq_acc[-1].isnan().all()
    want_delta = torch.zeros(b, h, s_pad, dtype=torch.float64)
    want_delta[..., :s_q] = (o.double() * do.double()).sum(-1).cpu()
    want_lse2 = torch.full((b, h, s_pad), math.inf, dtype=torch.float64)
    want_lse2[..., :s_q] = torch.where(torch.isneginf(lse), math.inf, lse * math.log2(math.e)).double().cpu()
    torch.testing.assert_close(delta.double().cpu(), want_delta, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse2.double().cpu(), want_lse2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("h_kv", [0, 2])
def test_zero_query_heads_backward(h_kv):
    """H = 0 (the API accepts it when H % H_kv == 0): zero gradients of the right shapes, no
    launch (a grid over B * H = 0 programs used to divide by zero sizing its axes)."""
    q = torch.randn(2, 0, 10, 64, device=DEVICE)
    k = torch.randn(2, h_kv, 12, 64, device=DEVICE)
    v = torch.randn_like(k)
    out, lse = torch.zeros_like(q), torch.zeros(2, 0, 10, device=DEVICE)
    grads = launch_bwd.attention_bwd(torch.randn_like(q), q, k, v, out, lse, True, 0.125)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all(not g.any() for g in grads)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    qv = torch.randn(10, 0, 64, device=DEVICE)
    kv = torch.randn(10, h_kv, 64, device=DEVICE)
    grads = launch_bwd.attention_varlen_bwd(
        torch.randn_like(qv), qv, kv, kv.clone(), torch.zeros_like(qv), torch.zeros(0, 10, device=DEVICE),
        cu, cu, 6, 6, True, 0.125,
    )  # fmt: skip
    assert [g.shape for g in grads] == [qv.shape, kv.shape, kv.shape]
    assert all(not g.any() for g in grads)
