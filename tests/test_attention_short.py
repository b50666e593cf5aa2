"""The short-sequence varlen kernels (``launch_short``: packed self-attention, every
sequence <= 32 tokens) against the float64 reference with the DESIGN.md rule, on CPU under
Triton's interpreter (on a GPU machine the same tests run the compiled kernels).

Batches mix empty sequences, length 1 and the longest allowed length, so program blocks
start in the middle of sequences and key windows run past both ends of the tensor.
Outputs and gradients are NaN-poisoned before each call.
"""

from __future__ import annotations

import math

import pytest
import torch
from _attention import check_grads, reference_grads, varlen_ref_fn
from _numerics import assert_close_rule

from flashmoe_science import flash_attention_varlen
from flashmoe_science.ops.attention import launch, launch_bwd, launch_short, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("poisoned_alloc")


def _packed(lengths, h, h_kv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(total, n, d, generator=g).to(DEVICE, dtype) for n in (h, h_kv, h_kv))
    return q, k, v, cu


def _lengths(n, longest, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, longest + 1, (n,), generator=g).tolist()
    return [0, longest, 1, *lens, longest]  # an empty head, the extremes, a full tail


CASES = [
    # (number of sequences, longest, h, h_kv, d, causal, dtype)
    pytest.param((40, 5, 2, 2, 32, False, torch.float16), id="compositions-d32"),
    pytest.param((30, 8, 4, 2, 64, True, torch.float16), id="gqa2-causal-d64"),
    pytest.param((12, 32, 2, 1, 32, False, torch.float16), id="mqa-longest32"),
    pytest.param((20, 7, 2, 2, 96, True, torch.bfloat16), id="d96-bf16-causal"),
]


@pytest.mark.parametrize("case", CASES)
def test_short_forward_matches_float64(case):
    n, longest, h, h_kv, d, causal, dtype = case
    q, k, v, cu = _packed(_lengths(n, longest, 1), h, h_kv, d, dtype)
    scale = 1.0 / math.sqrt(d)
    assert launch_short.applies(q, k, cu, cu, longest, longest) == (longest <= launch_short.MAX_SEQLEN_FWD)
    out, lse = launch.attention_varlen_fwd(q, k, v, cu, cu, longest, longest, causal, scale, short=True)
    r_out, r_lse = reference.attention_varlen_ref(q, k, v, cu, cu, causal, scale, compute_dtype=torch.float64)
    p_out, p_lse = reference.attention_varlen_ref(q, k, v, cu, cu, causal, scale, compute_dtype=q.dtype)
    assert_close_rule(out, r_out, p_out, name="out")
    assert_close_rule(lse, r_lse, p_lse.float(), name="lse")


@pytest.mark.parametrize("case", CASES)
def test_short_backward_matches_float64(case):
    n, longest, h, h_kv, d, causal, dtype = case
    q, k, v, cu = _packed(_lengths(n, longest, 2), h, h_kv, d, dtype, seed=3)
    scale = 1.0 / math.sqrt(d)
    out, lse = reference.attention_varlen_ref(q, k, v, cu, cu, causal, scale)
    do = torch.randn_like(q.float()).to(dtype)
    grads = launch_bwd.attention_varlen_bwd(do, q, k, v, out, lse, cu, cu, longest, longest, causal, scale)
    check_grads(grads, *reference_grads(q, k, v, do, causal, scale, varlen_ref_fn(cu, cu)))


def test_dispatch_needs_one_packing_and_short_sequences(monkeypatch):
    q, k, v, cu = _packed([3, 4, 2], 2, 2, 32, torch.float16)
    assert launch_short.applies(q, k, cu, cu, 4, 4)
    assert not launch_short.applies(q, k, cu, cu.clone(), 4, 4)  # equal values, other tensor
    assert not launch_short.applies(q, k, cu, cu, 17, 17)  # longer than MAX_SEQLEN_FWD
    assert launch_short.applies(q, k, cu, cu, 32, 32, backward=True)
    assert not launch_short.applies(q, k, cu, cu, 33, 33, backward=True)
    assert not launch_short.applies(q, k, cu, cu, 4, 5)
    monkeypatch.setenv("FLASHMOE_ATTN_SHORT", "0")
    assert not launch_short.applies(q, k, cu, cu, 4, 4)


def test_public_api_fwd_bwd_through_short_path(monkeypatch):
    """flash_attention_varlen(q, k, v, cu, cu, ...) takes the short kernels in both directions
    and agrees with the general kernels (forced with short=False)."""
    monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
    calls = []
    for name in ("varlen_fwd", "varlen_bwd"):
        real = getattr(launch_short, name)
        monkeypatch.setattr(
            launch_short, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw)
        )
    lengths = _lengths(16, 6, 4)
    q, k, v, cu = _packed(lengths, 2, 2, 32, torch.float16, seed=5)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = flash_attention_varlen(*leaves, cu, cu, 6, 6, causal=True)
    do = torch.randn_like(out)
    out.backward(do)
    assert calls == ["varlen_fwd", "varlen_bwd"]
    scale = 32**-0.5
    r_out, _ = reference.attention_varlen_ref(q, k, v, cu, cu, True, scale, compute_dtype=torch.float64)
    p_out, _ = reference.attention_varlen_ref(q, k, v, cu, cu, True, scale, compute_dtype=q.dtype)
    assert_close_rule(out, r_out, p_out, name="out")
    check_grads([t.grad for t in leaves], *reference_grads(q, k, v, do, True, scale, varlen_ref_fn(cu, cu)))
    general, _ = launch.attention_varlen_fwd(q, k, v, cu, cu, 6, 6, True, scale, short=False)
    assert_close_rule(general, r_out, p_out, name="general kernel out")
