"""Fused-MoE Triton kernels on CUDA (bf16 and fp16) vs the float64 reference, DESIGN.md rule.

Shape letters: T tokens, H hidden, E experts, K top-k, F ffn. The interpreter cases of
tests/test_moe_kernels.py plus large ones; outputs of the kernels land in memory that was
NaN-filled just before (the caching allocator hands the poisoned block back), so rows a
kernel forgets to write fail.
"""

from __future__ import annotations

import pytest
import torch
from _numerics import assert_close_rule

from flashmoe_science.ops.moe import fused_experts, fused_moe, launch, route
from flashmoe_science.ops.moe import reference as ref

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
    monkeypatch.setenv("FLASHMOE_MOE_AUTOTUNE", "0")  # first config of each list: fast start


def _poison_allocator(nbytes: int) -> None:
    """NaN-fill a block and free it: the next allocations of the caching allocator reuse it."""
    torch.empty(nbytes // 2, device=DEV, dtype=torch.float16).fill_(float("nan"))
    torch.cuda.synchronize()


def _distinct_logits(t, e, dtype):
    spaced = torch.stack([torch.randperm(e) for _ in range(t)]).float() * (4.0 / e) - 2.0
    return (spaced + torch.rand(t, e) * (1.0 / e)).to(dtype).to(DEV)


def _random_ids(t, e, k, experts=None):
    pool = torch.arange(e) if experts is None else torch.tensor(experts)
    scores = torch.rand(t, len(pool))
    return pool[scores.topk(k, dim=1).indices].to(torch.int32).to(DEV)


ROUTE_CASES = [
    pytest.param(1, 8, 2, "softmax", True, False, None, None, id="T=1"),
    pytest.param(50, 8, 1, "softmax", False, False, None, None, id="K=1-no-renorm"),
    pytest.param(333, 64, 8, "softmax", True, False, None, None, id="E=64-K=8"),
    pytest.param(17, 6, 6, "softmax", True, False, None, None, id="K=E-non-pow2-E"),
    pytest.param(4096, 128, 8, "softmax", True, False, None, None, id="B-router"),
    pytest.param(400, 16, 4, "sigmoid", True, True, None, None, id="sigmoid-bias"),
    pytest.param(2048, 256, 8, "sigmoid", True, True, 8, 4, id="deepseek-v3"),
    pytest.param(40, 32, 6, "softmax", False, False, 4, 2, id="groups-max-score"),
]


@pytest.mark.parametrize("t,e,k,scoring,renorm,with_bias,n_group,topk_group", ROUTE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_gpu(triton_backend, t, e, k, scoring, renorm, with_bias, n_group, topk_group, dtype):
    logits = _distinct_logits(t, e, dtype)
    bias = (torch.randn(e) * 0.1).to(DEV) if with_bias else None
    kw = dict(scoring=scoring, renormalize=renorm, bias=bias, n_group=n_group, topk_group=topk_group)
    _poison_allocator(1 << 24)
    w, ids = route(logits, k, **kw)
    w_ref, ids_ref = ref.route_ref(logits, k, **kw)
    w64, ids64 = ref.route_ref(logits.double(), k, **{**kw, "bias": None if bias is None else bias.double()})
    torch.testing.assert_close(ids, ids64, rtol=0, atol=0)
    assert_close_rule(w, w64, w_ref, name="topk_weights")


EXPERT_CASES = [
    # (T, H, F, E, K, experts allowed, activation)
    pytest.param(1, 64, 64, 4, 2, None, "silu", id="T=1"),
    pytest.param(37, 64, 64, 8, 3, None, "silu", id="ragged-K=3"),
    pytest.param(48, 64, 64, 64, 8, None, "silu", id="E=64-K=8"),
    pytest.param(20, 64, 64, 6, 6, None, "silu", id="K=E"),
    pytest.param(33, 64, 64, 16, 2, [2, 11, 12], "silu", id="mostly-empty-experts"),
    pytest.param(40, 64, 64, 8, 1, [5], "silu", id="all-to-one-K=1"),
    pytest.param(29, 64, 64, 8, 5, None, "gelu", id="gelu-K=5"),
    pytest.param(8, 2048, 768, 128, 8, None, "silu", id="decode-B-T=8"),
    pytest.param(1500, 1024, 768, 128, 8, None, "silu", id="fine-grained-large"),
    pytest.param(1024, 1000, 360, 8, 2, None, "silu", id="H-F-not-block-multiples"),
    pytest.param(4096, 512, 256, 16, 2, [7, 8], "silu", id="large-all-tokens-to-two-experts"),
    pytest.param(4096, 512, 256, 16, 1, [7], "silu", id="large-all-to-one"),
    pytest.param(3000, 512, 384, 32, 4, None, "gelu", id="large-gelu"),
]


def _ref_outputs(x, w1, w2, tw, ids, dy, activation, dtype):
    outs = []
    for cd in (torch.float64, dtype):
        leaves = [t.detach().to(cd).requires_grad_() for t in (x, w1, w2)]
        twl = tw.detach().to(torch.float64 if cd == torch.float64 else torch.float32).requires_grad_()
        y = ref.fused_experts_ref(*leaves, twl, ids, activation=activation, compute_dtype=cd)
        y.backward(dy.to(cd))
        outs.append((y, *[t.grad for t in leaves], twl.grad))
    return outs


@pytest.mark.parametrize("t,h,f,e,k,experts,activation", EXPERT_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_experts_gpu(triton_backend, t, h, f, e, k, experts, activation, dtype):
    x = torch.randn(t, h, device=DEV).to(dtype)
    w1 = (torch.randn(e, 2 * f, h, device=DEV) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, f, device=DEV) / f**0.5).to(dtype)
    ids = _random_ids(t, e, k, experts)
    tw = torch.rand(t, k, device=DEV) + 0.1
    dy = torch.randn(t, h, device=DEV).to(dtype)
    leaves = [v.clone().requires_grad_() for v in (x, w1, w2, tw)]
    _poison_allocator(1 << 28)
    y = fused_experts(*leaves, ids, activation=activation)
    y.backward(dy)
    (y64, *g64), (yp, *gp) = _ref_outputs(x, w1, w2, tw, ids, dy, activation, dtype)
    assert_close_rule(y, y64, yp, name="y")
    for name, leaf, r, p in zip(("dx", "dw_gate_up", "dw_down", "d_topk_weights"), leaves, g64, gp):
        assert_close_rule(leaf.grad, r, p, grad=True, name=name)


@pytest.mark.parametrize("index", range(8))
def test_every_tile_config_gpu(triton_backend, monkeypatch, index):
    """Forward and backward with config ``index`` of every autotune list (what the autotuner
    may pick at scale, TMA weight loads included: H and F are multiples of every BLOCK_K)."""
    monkeypatch.setenv("FLASHMOE_MOE_CONFIG_INDEX", str(index))
    t, h, f, e, k, dtype = 1024, 512, 384, 8, 2, torch.bfloat16
    x = torch.randn(t, h, device=DEV).to(dtype)
    w1 = (torch.randn(e, 2 * f, h, device=DEV) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, f, device=DEV) / f**0.5).to(dtype)
    ids = _random_ids(t, e, k)
    tw = torch.rand(t, k, device=DEV) + 0.1
    dy = torch.randn(t, h, device=DEV).to(dtype)
    leaves = [v.clone().requires_grad_() for v in (x, w1, w2, tw)]
    _poison_allocator(1 << 28)
    y = fused_experts(*leaves, ids)
    y.backward(dy)
    (y64, *g64), (yp, *gp) = _ref_outputs(x, w1, w2, tw, ids, dy, "silu", dtype)
    assert_close_rule(y, y64, yp, name="y")
    for name, leaf, r, p in zip(("dx", "dw_gate_up", "dw_down", "d_topk_weights"), leaves, g64, gp):
        assert_close_rule(leaf.grad, r, p, grad=True, name=name)
    # The other weight-gradient kernel (TMA over gathered row copies) with the same index.
    _poison_allocator(1 << 28)
    grads = launch.fused_experts_bwd(dy, x, w1, w2, tw, ids, "silu", wgrad="rows")
    for name, g, r, p in zip(("dw_gate_up", "dw_down"), grads[1:3], g64[1:3], gp[1:3]):
        assert_close_rule(g, r, p, grad=True, name=name)


def _check_inference(t, h, f, e, k, dtype, name="y"):
    """fused_moe's inference path (no gradient: route_align/align + the decode tiles) on random
    weights and well-separated logits, into poisoned memory, against the float64 reference by
    the rule. Returns x, w1, w2 and the routed ids for further checks."""
    x = torch.randn(t, h, device=DEV).to(dtype)
    w1 = (torch.randn(e, 2 * f, h, device=DEV) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, f, device=DEV) / f**0.5).to(dtype)
    logits = _distinct_logits(t, e, torch.float32)
    _poison_allocator(1 << 26)
    with torch.no_grad():
        y = fused_moe(x, w1, w2, logits, top_k=k)
    tw64, ids = ref.route_ref(logits.double(), k)
    tw32, _ = ref.route_ref(logits, k)
    # float64 arithmetic on the bf16 weights (converted per expert inside the reference, exactly):
    # a float64 copy of every expert's weights would be 13 GB at shape C.
    y64 = ref.fused_experts_ref(x.double(), w1, w2, tw64, ids)
    yp = ref.fused_experts_ref(x, w1, w2, tw32, ids, compute_dtype=dtype)
    assert_close_rule(y, y64, yp, name=name)
    return x, w1, w2, ids


@pytest.mark.parametrize("index", range(8))
def test_every_decode_tile_config_gpu(triton_backend, monkeypatch, index):
    """Config ``index`` of every small-tile (decode, BLOCK_M 16) list: the inference path of
    fused_moe (route_align + TMA weight tiles) and forward + backward of fused_experts."""
    monkeypatch.setenv("FLASHMOE_MOE_CONFIG_INDEX", str(index))
    t, h, f, e, k, dtype = 8, 512, 384, 64, 8, torch.bfloat16
    x, w1, w2, ids = _check_inference(t, h, f, e, k, dtype, name="y inference")
    tw = torch.rand(t, k, device=DEV) + 0.1
    dy = torch.randn(t, h, device=DEV).to(dtype)
    leaves = [v.clone().requires_grad_() for v in (x, w1, w2, tw)]
    _poison_allocator(1 << 26)
    y = fused_experts(*leaves, ids.to(torch.int32))
    y.backward(dy)
    (y64, *g64), (yp, *gp) = _ref_outputs(x, w1, w2, tw, ids, dy, "silu", dtype)
    assert_close_rule(y, y64, yp, name="y")
    for name, leaf, r, p in zip(("dx", "dw_gate_up", "dw_down", "d_topk_weights"), leaves, g64, gp):
        assert_close_rule(leaf.grad, r, p, grad=True, name=name)


@pytest.mark.parametrize("shape", ["B", "C"])
@pytest.mark.parametrize("t", [1, 8, 64, 65])
def test_fused_moe_decode_gpu(triton_backend, shape, t):
    """Decode sizes with the issue-5 weights through the inference path (route_align for
    T <= 64; T = 65 takes route + single-program align), bf16, poisoned memory, by the rule."""
    h, f, e, k = {"B": (2048, 768, 128, 8), "C": (2048, 1024, 256, 8)}[shape]
    _check_inference(t, h, f, e, k, torch.bfloat16)


def test_decode_replay_gpu(triton_backend, monkeypatch):
    """Decode steps after the first relaunch the compiled route_align and GEMM kernels
    (``ops._replay``, no Triton binder): new data each step, poisoned memory, by the rule."""
    from flashmoe_science.ops import _replay

    replays = []
    real = _replay.Replay.__call__
    monkeypatch.setattr(_replay.Replay, "__call__", lambda self, *a: replays.append(1) or real(self, *a))
    # Step 0 records route_align (the GEMMs run their autotuner); step 1 replays route_align and
    # records the two tuned GEMM launches; from step 2 on all three are replays.
    for step in range(4):
        before = len(replays)
        _check_inference(8, 512, 384, 64, 8, torch.bfloat16, name=f"y step {step}")
        if step >= 2:
            assert len(replays) - before >= 3, (step, len(replays) - before)  # route_align + 2 GEMMs
        elif step == 1:
            assert len(replays) - before >= 1, (step, len(replays) - before)


@pytest.mark.parametrize("wgrad", ["gather", "rows"])
def test_backward_recompute_path_gpu(triton_backend, wgrad):
    """The backward without the forward's stored h (it recomputes the gate/up GEMM), with each
    weight-gradient kernel (in-loop gather, or TMA over gathered row copies), by the rule."""
    t, h, f, e, k, dtype = 700, 512, 384, 32, 4, torch.bfloat16
    x = torch.randn(t, h, device=DEV).to(dtype)
    w1 = (torch.randn(e, 2 * f, h, device=DEV) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, f, device=DEV) / f**0.5).to(dtype)
    ids = _random_ids(t, e, k)
    tw = torch.rand(t, k, device=DEV) + 0.1
    dy = torch.randn(t, h, device=DEV).to(dtype)
    _poison_allocator(1 << 28)
    grads = launch.fused_experts_bwd(dy, x, w1, w2, tw, ids, "silu", wgrad=wgrad)
    (_, *g64), (_, *gp) = _ref_outputs(x, w1, w2, tw, ids, dy, "silu", dtype)
    for name, g, r, p in zip(("dx", "dw_gate_up", "dw_down", "d_topk_weights"), grads, g64, gp):
        assert_close_rule(g, r, p, grad=True, name=name)


def test_fused_moe_router_gradient_gpu(triton_backend):
    t, h, f, e, k = 300, 128, 96, 16, 4
    dtype = torch.bfloat16
    x = torch.randn(t, h, device=DEV).to(dtype)
    w1 = (torch.randn(e, 2 * f, h, device=DEV) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, f, device=DEV) / f**0.5).to(dtype)
    logits = _distinct_logits(t, e, dtype)
    dy = torch.randn(t, h, device=DEV).to(dtype)
    leaves = [v.clone().requires_grad_() for v in (x, w1, w2, logits)]
    y = fused_moe(*leaves, top_k=k)
    y.backward(dy)
    outs = []
    for cd in (torch.float64, dtype):
        lv = [v.detach().to(cd).requires_grad_() for v in (x, w1, w2, logits)]
        tw, ids = ref.route_ref(lv[3], k)
        yr = ref.fused_experts_ref(*lv[:3], tw, ids, compute_dtype=cd)
        yr.backward(dy.to(cd))
        outs.append((yr, *[v.grad for v in lv]))
    (y64, *g64), (yp, *gp) = outs
    assert_close_rule(y, y64, yp, name="y")
    for name, leaf, r, p in zip(("dx", "dw_gate_up", "dw_down", "d_logits"), leaves, g64, gp):
        assert_close_rule(leaf.grad, r, p, grad=True, name=name)


def test_cuda_graph_capture(triton_backend):
    """No host sync in route + fused_experts: the layer captures into a CUDA graph and replays."""
    t, h, f, e, k = 64, 256, 128, 32, 4
    x = torch.randn(t, h, device=DEV, dtype=torch.bfloat16)
    w1 = (torch.randn(e, 2 * f, h, device=DEV) / h**0.5).bfloat16()
    w2 = (torch.randn(e, h, f, device=DEV) / f**0.5).bfloat16()
    logits = torch.randn(t, e, device=DEV)
    y_eager = fused_moe(x, w1, w2, logits, top_k=k)  # compiles the kernels before capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_moe(x, w1, w2, logits, top_k=k)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_graph = fused_moe(x, w1, w2, logits, top_k=k)
    logits.copy_(torch.randn(t, e, device=DEV))
    g.replay()
    torch.cuda.synchronize()
    y_new = fused_moe(x, w1, w2, logits, top_k=k)
    torch.testing.assert_close(y_graph, y_new, rtol=0, atol=0)
    assert not torch.equal(y_graph, y_eager)
