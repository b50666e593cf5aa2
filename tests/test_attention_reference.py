"""Public attention API on the reference path (CPU) against a float64 oracle.

The float64 oracle differentiates ``attention_ref`` with torch autograd, so the explicit
backward in ``reference.attention_bwd_ref`` (used by the custom op) is checked too.
"""

import math

import pytest
import torch
from _numerics import assert_close_rule
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmoe_science import flash_attention_science, flash_attention_varlen
from flashmoe_science.ops.attention import reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _inputs(b, h, h_kv, s_q, s_k, d, dtype, requires_grad=False):
    q = torch.randn(b, h, s_q, d, dtype=dtype)
    k = torch.randn(b, h_kv, s_k, d, dtype=dtype)
    v = torch.randn(b, h_kv, s_k, d, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _oracle(q, k, v, causal, scale, do=None):
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out, lse = reference.attention_ref(q64, k64, v64, causal, scale, compute_dtype=torch.float64)
    grads = torch.autograd.grad(out, (q64, k64, v64), do.double()) if do is not None else None
    return out, lse, grads


def _same_dtype(q, k, v, causal, scale, do=None):
    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = reference.attention_ref(qs, ks, vs, causal, scale, compute_dtype=q.dtype)
    grads = torch.autograd.grad(out, (qs, ks, vs), do) if do is not None else None
    return out, lse, grads


CASES = [
    # (b, h, h_kv, s_q, s_k, d, causal)
    (2, 4, 4, 33, 33, 32, False),  # odd length
    (1, 4, 1, 17, 40, 16, True),  # MQA, Sq < Sk causal (bottom-right)
    (2, 6, 2, 40, 9, 16, True),  # GQA 3:1, Sq > Sk causal: first rows see no key
    (1, 2, 2, 1, 5, 64, True),  # S_q=1 (decode step) against 5 keys
    (1, 8, 2, 24, 24, 8, False),  # GQA 4:1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "b{}h{}kv{}sq{}sk{}d{}{}".format(*c[:6], "c" if c[6] else "")
)
def test_forward_and_grads_match_float64(case, dtype):
    b, h, h_kv, s_q, s_k, d, causal = case
    q, k, v = _inputs(b, h, h_kv, s_q, s_k, d, dtype, requires_grad=True)
    scale = 1.0 / math.sqrt(d)
    out, lse = flash_attention_science(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == (b, h, s_q)
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)

    r_out, r_lse, r_grads = _oracle(q, k, v, causal, scale, do)
    p_out, p_lse, p_grads = _same_dtype(q, k, v, causal, scale, do)
    assert_close_rule(out, r_out, p_out, name="out")
    assert_close_rule(lse, r_lse, p_lse, name="lse", extra_floor=1e-5)
    for name, g, r, p in zip(("dq", "dk", "dv"), (dq, dk, dv), r_grads, p_grads):
        assert_close_rule(g, r, p, grad=True, name=name)


def test_single_query_single_key():
    # S_q = S_k = 1: out = v exactly and dq = 0 (the softmax of one score is constant).
    q, k, v = _inputs(2, 2, 2, 1, 1, 64, torch.float32, requires_grad=True)
    out = flash_attention_science(q, k, v, causal=True)
    torch.testing.assert_close(out, v, rtol=0, atol=0)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq.abs().max() < 1e-6 and dk.abs().max() < 1e-6


def test_rows_that_see_no_key_are_zero_with_neg_inf_lse():
    q, k, v = _inputs(1, 2, 2, 6, 3, 8, torch.float32)
    out, lse = flash_attention_science(q, k, v, causal=True, return_lse=True)
    # S_q=6, S_k=3: row i sees keys j <= i - 3, so rows 0..2 see nothing.
    assert torch.all(out[:, :, :3] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :3]))
    assert torch.all(torch.isfinite(lse[:, :, 3:]))


def test_causal_is_bottom_right_aligned():
    q, k, v = _inputs(1, 1, 1, 2, 5, 8, torch.float64)
    out = flash_attention_science(q, k, v, causal=True)
    # Row 0 sees keys 0..3, row 1 sees all five.
    for row, n in ((0, 4), (1, 5)):
        p = torch.softmax(q[0, 0, row] @ k[0, 0, :n].T / math.sqrt(8), -1)
        torch.testing.assert_close(out[0, 0, row], p @ v[0, 0, :n])


def test_strided_inputs_from_bshd_layout():
    x = torch.randn(2, 19, 3 * 4 * 16, dtype=torch.float32)
    q, k, v = x.view(2, 19, 3, 4, 16).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views, no copy
    assert not q.is_contiguous()
    out = flash_attention_science(q, k, v, causal=True)
    expected = flash_attention_science(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    torch.testing.assert_close(out, expected)


def test_softmax_scale_is_used():
    q, k, v = _inputs(1, 2, 2, 5, 7, 16, torch.float64)
    out = flash_attention_science(q, k, v, softmax_scale=0.3)
    ref, _ = reference.attention_ref(q, k, v, False, 0.3)
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, flash_attention_science(q, k, v))


@pytest.mark.parametrize("shape", [(0, 2, 4, 8), (2, 2, 0, 8)], ids=["batch0", "seqlen0"])
def test_empty_inputs_return_empty(shape):
    q = torch.randn(shape)
    out, lse = flash_attention_science(q, q, q, return_lse=True)
    assert out.shape == shape and lse.shape == shape[:3]


def test_gradcheck_float64():
    q, k, v = _inputs(1, 4, 2, 5, 6, 4, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention_science(a, b, c, causal=True), (q, k, v))


def _pack(lengths, h, d, dtype):
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return torch.randn(total, h, d, dtype=dtype), cu


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence_dense(causal):
    lengths_q, lengths_k = [5, 0, 12, 1], [7, 3, 12, 0]
    q, cu_q = _pack(lengths_q, 4, 16, torch.float32)
    k, cu_k = _pack(lengths_k, 2, 16, torch.float32)
    v = torch.randn_like(k)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, 12, 12, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    # float64 oracle: per-sequence dense attention differentiated by autograd.
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    r_out, r_lse = reference.attention_varlen_ref(q64, k64, v64, cu_q, cu_k, causal, 0.25)
    r_grads = torch.autograd.grad(r_out, (q64, k64, v64), do.double())
    p_out, p_lse = reference.attention_varlen_ref(q, k, v, cu_q, cu_k, causal, 0.25)
    p_grads = torch.autograd.grad(p_out, (q, k, v), do)
    assert_close_rule(out, r_out, p_out, name="out")
    assert_close_rule(lse, r_lse, p_lse, name="lse", extra_floor=1e-5)
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, r_grads, p_grads):
        assert_close_rule(g, r, p, grad=True, name=name)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    h_kv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    s_q=st.integers(1, 24),
    s_k=st.integers(2, 24),  # S_k = 1 makes dq identically 0: see test_single_query_single_key
    d=st.sampled_from([4, 8, 16]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_float64(b, h_kv, group, s_q, s_k, d, causal, seed):
    torch.manual_seed(seed)
    q, k, v = _inputs(b, h_kv * group, h_kv, s_q, s_k, d, torch.float16, requires_grad=True)
    out = flash_attention_science(q, k, v, causal=causal)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    scale = 1.0 / math.sqrt(d)
    r_out, _, r_grads = _oracle(q, k, v, causal, scale, do)
    p_out, _, p_grads = _same_dtype(q, k, v, causal, scale, do)
    assert_close_rule(out, r_out, p_out, name="out")
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, r_grads, p_grads):
        assert_close_rule(g, r, p, grad=True, name=name)
