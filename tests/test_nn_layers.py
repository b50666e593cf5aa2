"""Layers: the nn.MultiheadAttention drop-in, FlashMoELayer, and a tiny model that trains."""

import pytest
import torch
from torch import nn

from flashmoe_science import FlashMoELayer, FlashMoEScienceAttention, FlashMoETransformerBlock
from flashmoe_science.nn.moe import load_balancing_loss


def _pair(e=32, h=4, dtype=torch.float64):
    mha = nn.MultiheadAttention(e, h, batch_first=True, dtype=dtype)
    with torch.no_grad():  # non-zero biases so their loading is tested too
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    ours = FlashMoEScienceAttention(e, h, dtype=dtype)
    ours.load_state_dict(mha.state_dict())
    return mha, ours


def test_state_dict_keys_match_mha():
    mha, ours = _pair()
    assert set(mha.state_dict()) == set(ours.state_dict())


@pytest.mark.parametrize("self_attention", [True, False], ids=["self", "cross"])
def test_same_outputs_as_mha(self_attention):
    mha, ours = _pair()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    kv = x if self_attention else torch.randn(3, 7, 32, dtype=torch.float64)
    expected, _ = mha(x, kv, kv, need_weights=False)
    out, weights = ours(x, kv, kv)
    assert weights is None
    torch.testing.assert_close(out, expected)


def test_same_outputs_as_mha_with_padding_mask():
    mha, ours = _pair()
    x = torch.randn(3, 10, 32, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 6:] = True  # right padding
    pad[2, :3] = True  # left padding
    expected, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    out, _ = ours(x, x, x, key_padding_mask=pad)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(gx, gx_ref)


def test_same_outputs_as_mha_causal_and_float_mask():
    mha, ours = _pair()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64)
    expected, _ = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    torch.testing.assert_close(ours(x, x, x, attn_mask=causal, is_causal=True)[0], expected)
    torch.testing.assert_close(ours(x, x, x, is_causal=True)[0], expected)
    bias = torch.randn(9, 9, dtype=torch.float64)
    expected, _ = mha(x, x, x, attn_mask=bias, need_weights=False)
    torch.testing.assert_close(ours(x, x, x, attn_mask=bias)[0], expected)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 5:] = True
    expected, _ = mha(x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(ours(x, x, x, key_padding_mask=pad, is_causal=True)[0], expected)


def test_batch_first_false():
    mha = nn.MultiheadAttention(16, 2, batch_first=False, dtype=torch.float64)
    ours = FlashMoEScienceAttention(16, 2, batch_first=False, dtype=torch.float64)
    ours.load_state_dict(mha.state_dict())
    x = torch.randn(5, 2, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x, x, x)[0], mha(x, x, x, need_weights=False)[0])


def test_gqa_layer_matches_explicit_repeat():
    layer = FlashMoEScienceAttention(32, 8, num_kv_heads=2, dtype=torch.float64)
    assert layer.in_proj_weight.shape == (32 + 2 * 2 * 4, 32)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    out, _ = layer(x, x, x)
    q, k, v = torch.nn.functional.linear(x, layer.in_proj_weight, layer.in_proj_bias).split((32, 8, 8), -1)
    q = q.view(2, 6, 8, 4).transpose(1, 2)
    k = k.view(2, 6, 2, 4).transpose(1, 2).repeat_interleave(4, 1)
    v = v.view(2, 6, 2, 4).transpose(1, 2).repeat_interleave(4, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 6, 32)
    torch.testing.assert_close(out, layer.out_proj(ref))


def test_forward_packed_matches_padded():
    layer = FlashMoEScienceAttention(16, 2, dtype=torch.float64)
    lengths = [3, 5, 1]
    xs = [torch.randn(n, 16, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    packed = layer.forward_packed(torch.cat(xs), cu, 5)
    for i, xi in enumerate(xs):
        single, _ = layer(xi[None], xi[None], xi[None])
        torch.testing.assert_close(packed[cu[i] : cu[i + 1]], single[0])


def test_need_weights_is_refused():
    _, ours = _pair()
    x = torch.randn(1, 3, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="need_weights=True is not supported"):
        ours(x, x, x, need_weights=True)


def test_moe_layer_shapes_aux_loss_and_grads():
    layer = FlashMoELayer(16, 8, top_k=2, ffn_hidden_size=12, num_shared_experts=1, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    assert layer.aux_loss is not None and layer.aux_loss.ndim == 0 and layer.aux_loss > 0
    (y.square().mean() + layer.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert layer.router.weight.grad.abs().sum() > 0


def test_load_balancing_loss_is_one_when_balanced():
    # Uniform router probabilities and a perfectly even assignment give E * sum(1/E * 1/E) = 1.
    e = 4
    logits = torch.zeros(8, e)
    ids = torch.arange(8).remainder(e).view(8, 1)
    assert load_balancing_loss(logits, ids, e, "softmax").item() == pytest.approx(1.0)


def test_moe_layer_sigmoid_with_bias_buffer():
    layer = FlashMoELayer(8, 4, top_k=1, ffn_hidden_size=8, scoring="sigmoid")
    assert layer.expert_bias.shape == (4,)
    layer.expert_bias[3] = 100.0  # selection-only bias: every token goes to expert 3
    layer(torch.randn(6, 8))
    assert torch.all(layer.last_topk_ids == 3)


def test_tiny_model_trains_on_cpu():
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 32)
            self.blocks = nn.ModuleList(
                FlashMoETransformerBlock(32, 4, num_experts=4, top_k=2, ffn_hidden_size=32, num_kv_heads=2)
                for _ in range(2)
            )
            self.head = nn.Linear(32, 1)

        def forward(self, x, pad):
            h = self.embed(x)
            for blk in self.blocks:
                h = blk(h, key_padding_mask=pad)
            keep = (~pad).unsqueeze(-1).float()
            pooled = (h * keep).sum(1) / keep.sum(1)
            aux = sum(b.aux_loss for b in self.blocks)
            return self.head(pooled).squeeze(-1), aux

    x = torch.randn(64, 6, 4)
    pad = torch.zeros(64, 6, dtype=torch.bool)
    pad[::3, 4:] = True
    target = (x[..., 0] * (~pad)).sum(1) / (~pad).sum(1)  # a learnable function of the set
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        pred, aux = model(x, pad)
        loss = nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_moe_aux_loss_in_inference_is_computed_on_read():
    """Eval + no_grad defers the aux loss to its first read (screening never reads it); the
    value read is the one a training-mode forward gives."""
    torch.manual_seed(0)
    layer = FlashMoELayer(16, 4, top_k=2)
    x = torch.randn(10, 16)
    layer(x)
    expected = layer.aux_loss.detach().clone()
    layer.eval()
    with torch.no_grad():
        layer(x)
        assert layer._aux_pending is not None
        got = layer.aux_loss
    assert layer._aux_pending is None
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(hidden_size=-16), ValueError, "hidden_size must be positive, got -16"),
        (dict(hidden_size="16"), TypeError, "hidden_size must be an int, got str"),
        (dict(num_experts=0, top_k=1), ValueError, "num_experts must be positive"),
        (dict(top_k=0), ValueError, "top_k must be positive"),
        (dict(top_k=2.0), TypeError, "top_k must be an int, got float"),
        (dict(top_k=5), ValueError, r"top_k must be in \[1, 4\]"),
        (dict(ffn_hidden_size=0), ValueError, "ffn_hidden_size must be positive"),
        (dict(aux_loss_coef="0.1"), TypeError, "aux_loss_coef must be a number"),
        (dict(aux_loss_coef=-1.0), ValueError, "aux_loss_coef must be a finite number >= 0"),
        (dict(z_loss_coef=float("nan")), ValueError, "z_loss_coef must be a finite number >= 0"),
        (dict(renormalize="no"), TypeError, "renormalize must be a bool"),
    ],
)
def test_moe_layer_bad_arguments(kwargs, exc, msg):
    args = dict(hidden_size=16, num_experts=4, top_k=2) | kwargs
    with pytest.raises(exc, match=msg):
        FlashMoELayer(**args)


def test_moe_layer_takes_numpy_sizes():
    """Sizes from a config may be NumPy ints: stored as Python ints, and the layer runs."""
    np = pytest.importorskip("numpy")
    layer = FlashMoELayer(np.int64(16), np.int32(4), np.int64(2), ffn_hidden_size=np.int64(24))
    sizes = (layer.hidden_size, layer.num_experts, layer.top_k, layer.ffn_hidden_size)
    assert all(type(v) is int for v in sizes)
    assert layer(torch.randn(3, 16)).shape == (3, 16)


def test_moe_layer_bad_input():
    layer = FlashMoELayer(16, 4, 2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.randint(0, 3, (3, 16)))
    with pytest.raises(ValueError, match="x has last dim 15; expected hidden_size=16"):
        layer(torch.randn(3, 15))


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda m, x: m(x[..., :12], x[..., :12], x[..., :12]), ValueError, "query has embed dim 12"),
        (lambda m, x: m(x, x[:, :3], x), ValueError, r"key has shape \(2, 3, 16\) but value has"),
        (lambda m, x: m(x, x[:1], x[:1]), ValueError, "query has batch 2 but key has 1"),
        (lambda m, x: m(x, x, x.long()), TypeError, "value must be floating point"),
        (lambda m, x: m(x, x, x, is_causal="x"), TypeError, "is_causal must be a bool"),
        (lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, 3)), ValueError, r"attn_mask has shape \(3, 3\)"),
        (lambda m, x: m(x, x, x, attn_mask=[[0.0]]), TypeError, "attn_mask must be a torch.Tensor, got list"),
    ],
)
def test_attention_layer_bad_input(call, exc, msg):
    m = FlashMoEScienceAttention(16, 4)
    with pytest.raises(exc, match=msg):
        call(m, torch.randn(2, 5, 16))
