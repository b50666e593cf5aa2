"""Triton MoE kernels under TRITON_INTERPRET=1 (CPU) vs the float64 reference (DESIGN.md rule).

Shape letters: T tokens, H hidden, E experts, K top-k, F ffn. Kernels run through the public
API with FLASHMOE_BACKEND=triton (CPU tensors then go to the interpreter), plus direct calls
of ``launch.align`` for its invariants. float16 here; bfloat16 only on the GPU (the
interpreter computes bf16 wrong).
"""

from __future__ import annotations

import pytest
import torch
from _numerics import assert_close_rule

from flashmoe_science._backend import interpreter_enabled
from flashmoe_science.ops.moe import fused_experts, fused_moe, route
from flashmoe_science.ops.moe import reference as ref

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(
        not interpreter_enabled() and not torch.cuda.is_available(),
        reason="needs TRITON_INTERPRET=1 or a GPU",
    ),
]

H, F = 32, 64


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
    monkeypatch.setenv("FLASHMOE_MOE_AUTOTUNE", "0")


def _weights(e, h=H, f=F, dtype=torch.float16):
    w1 = torch.randn(e, 2 * f, h) / h**0.5
    w2 = torch.randn(e, h, f) / f**0.5
    return w1.to(dtype), w2.to(dtype)


def _random_ids(t, e, k, experts=None):
    """Distinct ids per row drawn from ``experts`` (default all): ragged counts."""
    pool = torch.arange(e) if experts is None else torch.tensor(experts)
    rows = [pool[torch.randperm(len(pool))[:k]] for _ in range(t)]
    return torch.stack(rows).to(torch.int32)


# ------------------------------------------------------------------ routing
def _distinct_logits(t, e, dtype):
    """Random logits with no ties within a row, also after rounding to float16 (ties make
    the top-k choice ambiguous; the kernel must match route_ref only without them)."""
    spaced = torch.stack([torch.randperm(e) for _ in range(t)]).float() * (4.0 / e) - 2.0
    return (spaced + torch.rand(t, e) * (1.0 / e)).to(dtype)


ROUTE_CASES = [
    # (T, E, K, scoring, renormalize, with_bias, n_group, topk_group)
    pytest.param(1, 8, 2, "softmax", True, False, None, None, id="T=1"),
    pytest.param(50, 8, 1, "softmax", False, False, None, None, id="K=1-no-renorm"),
    pytest.param(33, 64, 8, "softmax", True, False, None, None, id="E=64-K=8"),
    pytest.param(17, 6, 6, "softmax", True, False, None, None, id="K=E-non-pow2-E"),
    pytest.param(40, 16, 4, "sigmoid", True, False, None, None, id="sigmoid"),
    pytest.param(40, 16, 4, "sigmoid", True, True, None, None, id="sigmoid-bias"),
    pytest.param(40, 32, 4, "sigmoid", True, True, 8, 3, id="deepseek-v3-groups-bias"),
    pytest.param(40, 32, 6, "softmax", False, False, 4, 2, id="groups-max-score"),
    pytest.param(25, 8, 2, "sigmoid", True, True, 8, 4, id="group-size-1"),
]


@pytest.mark.parametrize("t,e,k,scoring,renorm,with_bias,n_group,topk_group", ROUTE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_route_matches_reference(
    triton_backend, t, e, k, scoring, renorm, with_bias, n_group, topk_group, dtype
):
    logits = _distinct_logits(t, e, dtype)
    bias = torch.randn(e) * 0.1 if with_bias else None
    kw = dict(scoring=scoring, renormalize=renorm, bias=bias, n_group=n_group, topk_group=topk_group)
    w, ids = route(logits, k, **kw)
    w_ref, ids_ref = ref.route_ref(logits, k, **kw)
    w64, ids64 = ref.route_ref(logits.double(), k, **{**kw, "bias": None if bias is None else bias.double()})
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    torch.testing.assert_close(ids, ids64, rtol=0, atol=0)
    assert_close_rule(w, w64, w_ref, name="topk_weights")


# ------------------------------------------------------------------ alignment
ALIGN_CASES = [
    pytest.param(1, 4, 2, None, id="T=1"),
    pytest.param(37, 8, 3, None, id="ragged"),
    pytest.param(64, 64, 8, None, id="E=64-K=8"),
    pytest.param(30, 16, 2, [3, 9], id="empty-experts"),
    pytest.param(45, 8, 1, [5], id="all-to-one"),
    pytest.param(100, 8, 4, None, id="several-chunks"),
]


def _block_owners(padded: torch.Tensor, block_m: int, num_blocks: int) -> torch.Tensor:
    """The expert owning each BLOCK_M block of the row buffer (-1 past the used blocks), from the
    experts' padded segment sizes, which are laid out in expert order."""
    owners = torch.full((num_blocks,), -1, dtype=torch.long)
    used = int(padded.sum()) // block_m
    owners[:used] = torch.repeat_interleave(torch.arange(len(padded)), padded // block_m)
    return owners


@pytest.mark.parametrize("t,e,k,experts", ALIGN_CASES)
@pytest.mark.parametrize("block_m", [16, 32])
def test_align_invariants(t, e, k, experts, block_m):
    from flashmoe_science.ops.moe import launch

    ids = _random_ids(t, e, k, experts)
    al = launch.align(ids, e, block_m, chunk=64)  # 64-slot chunks: several chunks at small T
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=e)
    torch.testing.assert_close(al.expert_count.long(), counts, rtol=0, atol=0)
    assert int(al.expert_count.sum()) == t * k  # offsets sum to T*K
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    torch.testing.assert_close(al.expert_start.long(), starts, rtol=0, atol=0)
    gathered = []
    for ex in range(e):
        seg = al.sorted_slots[starts[ex] : starts[ex] + counts[ex]].long()
        # Each segment holds exactly the slots routed to ex, in slot order (deterministic).
        torch.testing.assert_close(seg, (flat == ex).nonzero().flatten(), rtol=0, atol=0)
        gathered.append(seg)
    # Scatter and gather invert: the valid rows are a permutation of the T*K slots.
    perm = torch.cat(gathered)
    assert torch.equal(torch.sort(perm).values, torch.arange(t * k))
    torch.testing.assert_close(
        al.block_expert.long(), _block_owners(padded, block_m, al.num_blocks), rtol=0, atol=0
    )
    assert al.num_blocks * block_m >= int(padded.sum())


@pytest.mark.parametrize("t,e,k,experts", [(100, 8, 4, None), (30, 16, 2, [3, 9]), (64, 64, 8, None)])
def test_align_block_owners_across_steps(monkeypatch, t, e, k, experts):
    """The block owners come from a running maximum over marked segment starts, carried from one
    step of blocks to the next: with 16-block steps the carry is exercised (both paths), and the
    result must equal the owners implied by the padded segments."""
    from flashmoe_science.ops.moe import launch

    monkeypatch.setattr(launch, "OWNER_STEP", 16)
    ids = _random_ids(t, e, k, experts)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=e)
    padded = (counts + 15) // 16 * 16
    for chunk in (64, None):
        al = launch.align(ids, e, 16, chunk=chunk)
        assert al.num_blocks > 16
        torch.testing.assert_close(
            al.block_expert.long(), _block_owners(padded, 16, al.num_blocks), rtol=0, atol=0
        )


@pytest.mark.parametrize("t,e,k,experts", ALIGN_CASES)
@pytest.mark.parametrize("block_m", [16, 32])
def test_align_single_program_matches_chunked(t, e, k, experts, block_m):
    """Up to launch.SINGLE_CHUNK slots, align runs one program (align_single_kernel): the same
    layout as the three-kernel path (checked above), padding rows naming slot 0 included."""
    from flashmoe_science.ops.moe import launch

    ids = _random_ids(t, e, k, experts)
    chunked = launch.align(ids, e, block_m, chunk=64)
    single = launch.align(ids, e, block_m)
    assert t * k <= launch.SINGLE_CHUNK
    for name in ("sorted_slots", "block_expert", "expert_start", "expert_count"):
        torch.testing.assert_close(getattr(single, name), getattr(chunked, name), rtol=0, atol=0, msg=name)


def test_align_single_program_drops_invalid_ids():
    """Out-of-range ids (possible only when the API's value check is skipped) are dropped."""
    from flashmoe_science.ops.moe import launch

    ids = torch.tensor([[0, 9], [3, -1], [3, 0]], dtype=torch.int32)
    al = launch.align(ids, 4, 16)
    assert al.expert_count.tolist() == [2, 0, 0, 2]
    assert al.expert_start.tolist() == [0, 16, 16, 16]
    assert al.block_expert.tolist()[:3] == [0, 3, -1]
    assert al.sorted_slots[:2].tolist() == [0, 5] and al.sorted_slots[16:18].tolist() == [2, 4]


@pytest.mark.parametrize(
    "t,e,k,scoring",
    [(1, 8, 2, "softmax"), (8, 64, 8, "softmax"), (37, 16, 3, "sigmoid"), (64, 32, 8, "softmax")],
)
def test_route_align_matches_route_then_align(t, e, k, scoring):
    """The decode launch (routing and alignment in one program) gives exactly what the routing
    kernel followed by align gives."""
    from flashmoe_science.ops.moe import launch

    logits = _distinct_logits(t, e, torch.float32)
    w, ids, al = launch.route_align(logits, k, e, 16, scoring=scoring, renormalize=True)
    w_ref, ids_ref = launch.route(
        logits, k, scoring=scoring, renormalize=True, bias=None, n_group=None, topk_group=None
    )
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
    ref_al = launch.align(ids_ref, e, 16, chunk=64)
    for name in ("sorted_slots", "block_expert", "expert_start", "expert_count"):
        torch.testing.assert_close(getattr(al, name), getattr(ref_al, name), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (9, 16, 4), (70, 8, 2)])
def test_fused_moe_inference_path(triton_backend, t, e, k):
    """Without gradients fused_moe calls the launchers directly (launch.moe_forward: route_align
    for T <= 64, else route + align); by the rule vs the float64 reference, poisoned output."""
    x = torch.randn(t, H).half()
    w1, w2 = _weights(e)
    logits = _distinct_logits(t, e, torch.float32)
    with torch.no_grad():
        y = fused_moe(x, w1, w2, logits, top_k=k)
    tw, ids = ref.route_ref(logits.double(), k)
    y64 = ref.fused_experts_ref(x.double(), w1.double(), w2.double(), tw, ids)
    tw32, ids32 = ref.route_ref(logits, k)
    yp = ref.fused_experts_ref(x, w1, w2, tw32, ids32, compute_dtype=torch.float16)
    assert_close_rule(y, y64, yp, name="y")
    # The same call with gradients enabled goes through the custom ops: same values.
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(fused_moe(xg, w1, w2, logits, top_k=k).detach(), y, rtol=0, atol=0)


# ------------------------------------------------------------------ experts forward + backward
EXPERT_CASES = [
    # (T, E, K, experts allowed (None = all), activation)
    pytest.param(1, 4, 2, None, "silu", id="T=1"),
    pytest.param(37, 8, 3, None, "silu", id="ragged-K=3"),
    pytest.param(12, 64, 8, None, "silu", id="E=64-K=8-empty-experts"),
    pytest.param(20, 6, 6, None, "silu", id="K=E"),
    pytest.param(33, 16, 2, [2, 11, 12], "silu", id="mostly-empty-experts"),
    pytest.param(40, 8, 1, [5], "silu", id="all-to-one-K=1"),
    pytest.param(29, 8, 5, None, "gelu", id="gelu-K=5"),
    pytest.param(24, 8, 7, None, "silu", id="K=7"),
    pytest.param(24, 8, 4, None, "silu", id="K=4"),
]


def _experts_ref_grads(x, w1, w2, tw, ids, dy, activation, dtype):
    """Gradients of the reference: float64 and in the input dtype (the rule's r and p)."""
    outs = []
    for cd, cast in ((torch.float64, torch.float64), (dtype, dtype)):
        leaves = [t.detach().to(cast).requires_grad_() for t in (x, w1, w2)]
        twl = tw.detach().to(torch.float64 if cast == torch.float64 else torch.float32).requires_grad_()
        y = ref.fused_experts_ref(*leaves, twl, ids, activation=activation, compute_dtype=cd)
        y.backward(dy.to(cast))
        outs.append((y, *[t.grad for t in leaves], twl.grad))
    return outs


@pytest.mark.parametrize("t,e,k,experts,activation", EXPERT_CASES)
def test_fused_experts_fwd_bwd(triton_backend, t, e, k, experts, activation):
    dtype = torch.float16
    x = torch.randn(t, H).to(dtype)
    w1, w2 = _weights(e)
    ids = _random_ids(t, e, k, experts)
    tw = torch.rand(t, k) + 0.1
    dy = torch.randn(t, H).to(dtype)
    leaves = [v.clone().requires_grad_() for v in (x, w1, w2, tw)]
    y = fused_experts(*leaves, ids, activation=activation)
    y.backward(dy)
    (y64, *g64), (yp, *gp) = _experts_ref_grads(x, w1, w2, tw, ids, dy, activation, dtype)
    assert_close_rule(y, y64, yp, name="y")
    for name, leaf, r, p in zip(("dx", "dw_gate_up", "dw_down", "d_topk_weights"), leaves, g64, gp):
        assert_close_rule(leaf.grad, r, p, grad=True, name=name)


def test_all_tokens_one_expert_duplicate_ids(triton_backend):
    """K=2 with both slots of every token on the same expert (valid input of fused_experts)."""
    t, e, k = 30, 8, 2
    x = torch.randn(t, H).half()
    w1, w2 = _weights(e)
    ids = torch.full((t, k), 6, dtype=torch.int32)
    tw = torch.rand(t, k) + 0.1
    dy = torch.randn(t, H).half()
    leaves = [v.clone().requires_grad_() for v in (x, w1, w2, tw)]
    y = fused_experts(*leaves, ids)
    y.backward(dy)
    (y64, *g64), (yp, *gp) = _experts_ref_grads(x, w1, w2, tw, ids, dy, "silu", torch.float16)
    assert_close_rule(y, y64, yp, name="y")
    for name, leaf, r, p in zip(("dx", "dw_gate_up", "dw_down", "d_topk_weights"), leaves, g64, gp):
        assert_close_rule(leaf.grad, r, p, grad=True, name=name)


def test_fused_moe_router_gradient(triton_backend):
    """fused_moe end to end: routing kernel + experts, gradients reach the router logits."""
    t, e, k = 26, 16, 4
    x = torch.randn(t, H).half()
    w1, w2 = _weights(e)
    logits = torch.randn(t, e).half()
    dy = torch.randn(t, H).half()
    leaves = [v.clone().requires_grad_() for v in (x, w1, w2, logits)]
    y = fused_moe(*leaves, top_k=k)
    y.backward(dy)
    outs = []
    for cd in (torch.float64, torch.float16):
        lv = [v.detach().to(cd).requires_grad_() for v in (x, w1, w2, logits)]
        tw, ids = ref.route_ref(lv[3], k)
        yr = ref.fused_experts_ref(*lv[:3], tw, ids, compute_dtype=cd)
        yr.backward(dy.to(cd))
        outs.append((yr, *[v.grad for v in lv]))
    (y64, *g64), (yp, *gp) = outs
    assert_close_rule(y, y64, yp, name="y")
    for name, leaf, r, p in zip(("dx", "dw_gate_up", "dw_down", "d_logits"), leaves, g64, gp):
        assert_close_rule(leaf.grad, r, p, grad=True, name=name)


def test_opcheck_kernel_path():
    """torch.library.opcheck on the custom ops with use_kernel=True (the interpreter runs the
    Triton launchers): schema, fake implementations vs real outputs, autograd registration,
    AOT dispatch with dynamic shapes. tests/test_integrations_compile.py covers use_kernel=False."""
    ops = torch.ops.flashmoe_science
    t, e, k = 10, 4, 2
    x = torch.randn(t, H).half().requires_grad_()
    w1, w2 = (w.requires_grad_() for w in _weights(e))
    tw = (torch.rand(t, k) + 0.1).requires_grad_()
    ids = _random_ids(t, e, k)
    logits = torch.randn(t, 8, requires_grad=True)
    dy = torch.randn(t, H).half()
    _, h = ops.experts_fwd(x.detach(), w1.detach(), w2.detach(), tw.detach(), ids, "silu", True, True)
    cases = [
        (ops.route, (logits, 2, "softmax", True, None, None, None, True)),
        (ops.experts_fwd, (x, w1, w2, tw, ids, "silu", True)),
        (ops.experts_fwd, (x, w1, w2, tw, ids, "silu", True, True)),  # training: h stored
        (ops.experts_bwd, (dy, x.detach(), w1.detach(), w2.detach(), tw.detach(), ids, "silu", True)),
        (ops.experts_bwd, (dy, x.detach(), w1.detach(), w2.detach(), tw.detach(), ids, "silu", True, h)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_backward_with_stored_h_equals_recompute():
    """The forward's stored gate/up pre-activations (slot order) give the backward exactly what
    recomputing them gives; without ``save_h`` the forward returns an empty h."""
    ops = torch.ops.flashmoe_science
    t, e, k = 21, 8, 3
    x = torch.randn(t, H).half()
    w1, w2 = _weights(e)
    ids = _random_ids(t, e, k)
    tw = torch.rand(t, k) + 0.1
    dy = torch.randn(t, H).half()
    y, h = ops.experts_fwd(x, w1, w2, tw, ids, "silu", True, True)
    y0, h0 = ops.experts_fwd(x, w1, w2, tw, ids, "silu", True, False)
    assert h.shape == (t * k, 2 * F) and h0.shape == (0, 2 * F)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    stored = ops.experts_bwd(dy, x, w1, w2, tw, ids, "silu", True, h)
    recomputed = ops.experts_bwd(dy, x, w1, w2, tw, ids, "silu", True)
    for name, a, b in zip(("dx", "dw_gate_up", "dw_down", "d_topk_weights"), stored, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_small_tile_branch_block_m_64():
    """BLOCK_M 64 turns on the small-tile branch (an expert's last block with <= 32 rows runs a
    32-row tile) in the gate/up, down, bwd_act and dx kernels; counts chosen so that some
    experts end in such a block and others in a larger partial or a full block."""
    from flashmoe_science.ops.moe import launch

    t, e, k = 50, 4, 2
    x = torch.randn(t, H).half()
    w1, w2 = _weights(e)
    # Expert 0: 70 slots (64 + 6: small tail), 1: 20 (small only), 2: 10, 3: 0.
    ids = torch.tensor([[0, 1] if i < 20 else [0, 2] if i < 30 else [0, 0] for i in range(t)])
    ids = ids.to(torch.int32)
    tw = torch.rand(t, k) + 0.1
    dy = torch.randn(t, H).half()
    y, h = launch.fused_experts_fwd(x, w1, w2, tw, ids, "silu", block_m=64, save_h=True)
    grads = launch.fused_experts_bwd(dy, x, w1, w2, tw, ids, "silu", block_m=64, h=h)
    (y64, *g64), (yp, *gp) = _experts_ref_grads(x, w1, w2, tw, ids, dy, "silu", torch.float16)
    assert_close_rule(y, y64, yp, name="y")
    for name, g, r, p in zip(("dx", "dw_gate_up", "dw_down", "d_topk_weights"), grads, g64, gp):
        assert_close_rule(g, r, p, grad=True, name=name)


def test_ksum_combine_matches_torch_sum():
    """The K-row sum of the forward (ksum_kernel, used above launch.SINGLE_CHUNK slots) equals
    torch's float32-accumulated sum, rounded once."""
    from flashmoe_science.ops.moe import launch

    t, k, h = 300, 8, 40  # T*K > SINGLE_CHUNK: the Triton path; H not a power of two
    rows = torch.randn(t * k, h).half()
    out = launch._combine(rows, t, k)
    torch.testing.assert_close(out, rows.view(t, k, h).float().sum(1).half(), rtol=0, atol=0)
