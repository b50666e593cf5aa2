"""The fused LayerNorm (``ops.norm``): the Triton kernels (interpreter on CPU, compiled on a
GPU) and the reference against float64 ``F.layer_norm`` by DESIGN.md's rule, gradients
included; ``FlashLayerNorm`` is a drop-in ``nn.LayerNorm``; the op traces under compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _numerics import assert_close_rule

from flashmoe_science.nn import FlashLayerNorm
from flashmoe_science.ops.norm import api, layer_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("FLASHMOE_BACKEND", "triton")


def _oracle(x, w, b, eps, dy):
    """[(y, dx, dw[, db]) of F.layer_norm in float64, the same in x's dtype]."""
    out = []
    for cd in (torch.float64, x.dtype):
        leaves = [t.detach().to(cd).requires_grad_(True) if t is not None else None for t in (x, w, b)]
        y = F.layer_norm(leaves[0], (x.shape[-1],), leaves[1], leaves[2], eps)
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(cd))
        out.append((y, *grads))
    return out


CASES = [
    # (shape, dtype, bias)
    pytest.param((37, 128), torch.float16, True, id="rows-not-multiple-fp16"),
    pytest.param((3, 11, 96), torch.bfloat16, True, id="3d-n96-bf16"),
    pytest.param((130, 64), torch.float16, False, id="no-bias"),
    pytest.param((5, 1000), torch.float16, True, id="n1000-not-pow2"),
]


@pytest.mark.parametrize("shape,dtype,bias", CASES)
def test_kernel_fwd_bwd_match_float64(shape, dtype, bias, triton_path):
    g = torch.Generator().manual_seed(0)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    b = (0.5 * torch.randn(n, generator=g)).to(DEVICE, dtype) if bias else None
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = layer_norm(leaves[0], leaves[1], leaves[2], 1e-5)
    y.backward(dy)
    ref64, ref_same = _oracle(x, w, b, 1e-5, dy)
    assert_close_rule(y, ref64[0], ref_same[0], name="y")
    names = ["dx", "dw", "db"][: 3 if bias else 2]
    for i, name in enumerate(names):
        got = leaves[i].grad
        assert_close_rule(got, ref64[i + 1], ref_same[i + 1], grad=True, name=name)


def test_kernel_path_is_taken(monkeypatch, triton_path):
    seen = []
    real = api.kernels.layer_norm_fwd_kernel
    monkeypatch.setattr(api.kernels, "layer_norm_fwd_kernel", _Spy(real, seen))
    x = torch.randn(4, 32, dtype=torch.float16, device=DEVICE)
    layer_norm(x, torch.ones(32, dtype=torch.float16, device=DEVICE))
    assert seen


class _Spy:
    def __init__(self, fn, seen):
        self.fn, self.seen = fn, seen

    def __getitem__(self, grid):
        self.seen.append(grid)
        return self.fn[grid]


def test_reference_path_matches_torch_float64():
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: layer_norm(*a, eps=1e-5), (x, w, b))
    torch.testing.assert_close(layer_norm(x, w, b), F.layer_norm(x, (40,), w, b))


def test_flash_layer_norm_is_a_drop_in():
    ref = torch.nn.LayerNorm(48)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    mine = FlashLayerNorm(48)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 48)
    torch.testing.assert_close(mine(x), ref(x))
    assert isinstance(mine, torch.nn.LayerNorm)


def test_errors_name_the_argument():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight's size 4"):
        layer_norm(x, torch.ones(4))
    with pytest.raises(ValueError, match="bias has shape"):
        layer_norm(x, torch.ones(8), torch.ones(3))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        layer_norm(x, None)


def test_compiles_without_graph_breaks():
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)

    def f(x, w):
        return layer_norm(x, w).square().sum()

    explained = torch._dynamo.explain(f)(x, w)
    assert explained.graph_break_count == 0
    torch.library.opcheck(api.layer_norm_fwd, (x, w, None, 1e-5, False))
