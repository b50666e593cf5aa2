"""The fused LayerNorm forward (``ops.norm``): the Triton kernel (interpreter on CPU,
compiled on a GPU) against float64 ``F.layer_norm`` by DESIGN.md's rule; with autograd the
op is PyTorch's; ``FlashLayerNorm`` is a drop-in ``nn.LayerNorm``; the op traces under
compile."""

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


class _Spy:
    def __init__(self, fn, seen):
        self.fn, self.seen = fn, seen

    def __getitem__(self, grid):
        self.seen.append(grid)
        return self.fn[grid]


CASES = [
    # (shape, dtype, bias)
    pytest.param((37, 128), torch.float16, True, id="rows-not-multiple-fp16"),
    pytest.param((3, 11, 96), torch.bfloat16, True, id="3d-n96-bf16"),
    pytest.param((130, 64), torch.float16, False, id="no-bias"),
    pytest.param((5, 1000), torch.float16, True, id="n1000-not-pow2"),
]


@pytest.mark.parametrize("shape,dtype,bias", CASES)
def test_kernel_matches_float64(shape, dtype, bias, triton_path, monkeypatch):
    seen = []
    monkeypatch.setattr(api.kernels, "layer_norm_fwd_kernel", _Spy(api.kernels.layer_norm_fwd_kernel, seen))
    g = torch.Generator().manual_seed(0)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    b = (0.5 * torch.randn(n, generator=g)).to(DEVICE, dtype) if bias else None
    y = layer_norm(x, w, b, 1e-5)
    assert seen, "the Triton kernel did not run"
    ref64 = F.layer_norm(x.double(), (n,), w.double(), b.double() if bias else None, 1e-5)
    ref_same = F.layer_norm(x, (n,), w, b, 1e-5)
    assert_close_rule(y, ref64, ref_same, name="y")


def test_autograd_takes_pytorchs_layer_norm(triton_path, monkeypatch):
    seen = []
    monkeypatch.setattr(api.kernels, "layer_norm_fwd_kernel", _Spy(api.kernels.layer_norm_fwd_kernel, seen))
    x = torch.randn(6, 40, dtype=torch.float16, device=DEVICE, requires_grad=True)
    w = torch.randn(40, dtype=torch.float16, device=DEVICE, requires_grad=True)
    y = layer_norm(x, w)
    y.float().sum().backward()
    assert not seen and x.grad is not None and w.grad is not None
    with torch.no_grad():
        layer_norm(x, w)
    assert seen


def test_flash_layer_norm_is_a_drop_in():
    ref = torch.nn.LayerNorm(48)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    mine = FlashLayerNorm(48)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 48, requires_grad=True)
    torch.testing.assert_close(mine(x), ref(x))
    with torch.no_grad():
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


def test_op_has_a_fake_and_traces_without_graph_breaks():
    # The kernel path: compiled on a GPU, interpreted on CPU (conftest sets TRITON_INTERPRET).
    x = torch.randn(5, 16, dtype=torch.float16, device=DEVICE)
    w = torch.randn(16, dtype=torch.float16, device=DEVICE)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(api.layer_norm_fwd, (x, w, None, 1e-5, True), test_utils=checks)

    def f(x, w):
        return api.layer_norm_fwd(x, w, None, 1e-5, True)

    assert torch._dynamo.explain(f)(x, w).graph_break_count == 0


def test_strided_weight_and_bias(triton_path):
    """Views with non-unit strides (e.g. columns of a packed parameter) give the same result."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 7, generator=g).to(DEVICE, torch.float16)
    wb = torch.randn(7, 2, generator=g).to(DEVICE, torch.float16)
    with torch.no_grad():
        got = layer_norm(x, wb[:, 0], wb[:, 1])
    ref64 = F.layer_norm(x.double(), (7,), wb[:, 0].double(), wb[:, 1].double())
    assert_close_rule(got, ref64, F.layer_norm(x, (7,), wb[:, 0], wb[:, 1]), name="y")
