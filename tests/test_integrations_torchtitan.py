"""TorchTitan 0.3.0: a real Qwen3-MoE model built from TorchTitan's own configs, its inner
attention and routed experts swapped by ``use_flashmoe``, compared with TorchTitan's default
(flex attention with per-document masks, bf16 grouped-mm experts), and run under FSDP2
(world size 1, gloo, CPU).

Oracle: TorchTitan's default model in float64 with two forwards replaced by plain PyTorch:
``GroupedExperts.forward`` by a per-expert loop without the bf16 casts (TorchTitan's experts
always compute in bf16, so they cannot be a float64 oracle) and ``FlexAttention.forward`` by
SDPA on the dense form of the same BlockMask (TorchTitan's own mask_mods; flex attention has no
backward on CPU). Yardstick: the same in float32.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from _numerics import assert_close_rule

pytest.importorskip("torchtitan")

from torch.nn.attention.flex_attention import create_mask  # noqa: E402
from torchtitan.models.common import CosSinRoPE, Embedding, Linear  # noqa: E402
from torchtitan.models.common.attention import FlexAttention  # noqa: E402
from torchtitan.models.common.moe import GroupedExperts  # noqa: E402
from torchtitan.models.qwen3 import (  # noqa: E402
    _EMBEDDING_INIT,
    _LINEAR_INIT,
    Qwen3Model,
    _build_qwen3_moe_layers,
    _qwen3_norm,
)

from flashmoe_science._backend import interpreter_enabled  # noqa: E402
from flashmoe_science.integrations import torchtitan as fmtt  # noqa: E402
from flashmoe_science.ops.attention import launch as attn_launch  # noqa: E402
from flashmoe_science.ops.moe import launch as moe_launch  # noqa: E402

VOCAB, DIM, HEAD_DIM = 96, 64, 32  # head dim 32: one the attention kernel takes
# TorchTitan's flex-attention masks use 128-token blocks; on CPU (eager flex) a sequence that
# is not a multiple of 128 gave NaN / run-to-run different outputs from the default model, so
# the comparison uses L = 128 (training sequences are block multiples anyway).
SEQ = 128


def _config():
    return Qwen3Model.Config(
        vocab_size=VOCAB,
        dim=DIM,
        norm=_qwen3_norm(DIM),
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=_EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=_LINEAR_INIT),
        layers=_build_qwen3_moe_layers(
            fuse_qkv=True,
            n_layers=2,
            dim=DIM,
            n_heads=4,
            n_kv_heads=2,
            head_dim=HEAD_DIM,
            moe_hidden_dim=32,
            num_experts=8,
            top_k=2,
            attn_backend="flex",
            rope=CosSinRoPE.Config(dim=HEAD_DIM, max_seq_len=SEQ, theta=1e6),
            moe_comm_backend="standard",
        ),
    )


def _plain_grouped_experts_forward(self, x_RD, num_tokens_per_expert_E):
    """GroupedExperts.forward without the bf16 casts: one matmul per expert in x's dtype."""
    out = x_RD.new_zeros(x_RD.shape)
    start = 0
    for e, n in enumerate(num_tokens_per_expert_E.tolist()):
        n = int(n)
        if n:
            xe = x_RD[start : start + n]
            w1, w2, w3 = (w[e].to(x_RD.dtype) for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))
            h = F.silu(xe @ w1.t()) * (xe @ w3.t())
            out = out.index_copy(0, torch.arange(start, start + n), h @ w2.t())
        start += n
    return out


def _dense_flex_forward(self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks, scale=None, enable_gqa=False, **kw):
    """FlexAttention.forward as SDPA on the dense form of the same BlockMask."""
    b, seq = q_BLNH.shape[:2]
    mask = create_mask(attention_masks.mask_mod, b, 1, seq, seq, device=q_BLNH.device)
    q, k, v = (t.transpose(1, 2) for t in (q_BLNH, k_BLNH, v_BLNH))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2)


def _inputs():
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    positions = torch.stack([torch.cat([torch.arange(50), torch.arange(SEQ - 50)]), torch.arange(SEQ)])
    return tokens, positions  # row 0: two packed documents; row 1: one


def _models():
    torch.manual_seed(0)
    default = _config().build()
    default.init_states()
    with torch.no_grad():  # larger than TorchTitan's 0.02 init so the outputs are not ~0
        for p in default.parameters():
            p.mul_(4.0)
    ours = fmtt.use_flashmoe(_config()).build()
    ours.init_states()
    ours.load_state_dict(default.state_dict())
    return default, ours


def _forward(model, tokens, positions):
    return model(tokens, positions, model.get_attention_masks(positions))


def test_use_flashmoe_swaps_modules_and_keeps_checkpoint_keys():
    default, ours = _models()
    assert list(ours.state_dict()) == list(default.state_dict())
    layer = ours.layers["0"]
    assert isinstance(layer.attention.inner_attention, fmtt.FlashMoEVarlenAttention)
    assert isinstance(layer.moe.routed_experts, fmtt.FlashMoERoutedExperts)


def test_forward_backward_matches_torchtitan(monkeypatch):
    default, ours = _models()
    tokens, positions = _inputs()
    with torch.no_grad():
        stock = _forward(default, tokens, positions)  # TorchTitan as shipped: bf16 experts
    monkeypatch.setattr(GroupedExperts, "forward", _plain_grouped_experts_forward)
    monkeypatch.setattr(FlexAttention, "forward", _dense_flex_forward)
    ref32 = default
    ref64 = _config().build()
    ref64.init_states()
    ref64.load_state_dict(default.state_dict())
    ref64.double()
    g = torch.randn(2, SEQ, VOCAB, dtype=torch.float64)
    outs, grads = {}, {}
    for tag, model in (("o", ours), ("p", ref32), ("r", ref64)):
        model.zero_grad()
        out = _forward(model, tokens, positions)
        out.backward(g.to(out.dtype))
        outs[tag] = out.detach()
        layer = model.layers["1"]
        grads[tag] = {
            "w1": layer.moe.routed_experts.inner_experts.w1_EFD.grad,
            "w2": layer.moe.routed_experts.inner_experts.w2_EDF.grad,
            "w3": layer.moe.routed_experts.inner_experts.w3_EFD.grad,
            "router": layer.moe.router.gate.weight.grad,
            "wqkv": next(layer.attention.qkv_linear.parameters()).grad,
        }
    assert_close_rule(outs["o"], outs["r"], outs["p"], name="logits")
    for key in grads["r"]:
        assert_close_rule(grads["o"][key], grads["r"][key], grads["p"][key], grad=True, name=key)
    # Against TorchTitan's shipped default (bf16 grouped experts): at least as close to the oracle.
    assert (outs["o"] - outs["r"]).abs().max() <= (stock.double() - outs["r"]).abs().max()


def test_swapped_model_runs_the_triton_kernels_under_the_interpreter(monkeypatch):
    """float16, FLASHMOE_BACKEND=triton, TRITON_INTERPRET=1: our modules run the Triton kernels."""
    if not interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    default, ours = _models()
    tokens, positions = _inputs()
    monkeypatch.setattr(GroupedExperts, "forward", _plain_grouped_experts_forward)
    monkeypatch.setattr(FlexAttention, "forward", _dense_flex_forward)
    ref64 = _config().build()
    ref64.init_states()
    ref64.load_state_dict(default.state_dict())
    ref64.double()
    default.half()
    ours.half()
    calls = []
    for module, name in ((attn_launch, "attention_varlen_fwd"), (moe_launch, "fused_experts_fwd")):
        fn = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1]
        )
    with torch.no_grad():
        r = _forward(ref64, tokens, positions)
        p = _forward(default, tokens, positions)
        monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
        o = _forward(ours, tokens, positions)
    assert {"attention_varlen_fwd", "fused_experts_fwd"} <= set(calls), calls
    assert_close_rule(o, r, p, name="fp16 logits (Triton, interpreted)")


def test_fsdp2_world_size_1_gloo():
    """fully_shard over a 1-rank gloo mesh (DTensor parameters): same outputs and gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _, ours = _models()
    tokens, positions = _inputs()
    g = torch.randn(2, SEQ, VOCAB)
    out = _forward(ours, tokens, positions)
    out.backward(g)
    ref_out = out.detach()
    ref_grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad(set_to_none=True)

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1
        )
        try:
            mesh = init_device_mesh("cpu", (1,))
            for layer in ours.layers.values():
                fully_shard(layer, mesh=mesh)
            fully_shard(ours, mesh=mesh)
            assert any(type(p).__name__ == "DTensor" for p in ours.parameters())
            out = _forward(ours, tokens, positions)
            out.backward(g)
            torch.testing.assert_close(out.detach(), ref_out, rtol=1e-5, atol=1e-6)
            for name, p in ours.named_parameters():
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
        finally:
            dist.destroy_process_group()


def test_mla_value_head_padding_and_dense_path():
    """DeepSeek-style value heads narrower than query heads; attention_masks=None (causal)."""
    attn = fmtt.FlashMoEVarlenAttention.Config().build()
    q = torch.randn(2, 20, 4, 24, dtype=torch.float64)
    k = torch.randn(2, 20, 4, 24, dtype=torch.float64)
    v = torch.randn(2, 20, 4, 16, dtype=torch.float64)
    out = attn(q, k, v, attention_masks=None, scale=0.2)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=0.2
    ).transpose(1, 2)
    assert out.shape == (2, 20, 4, 16)
    torch.testing.assert_close(out, ref)


def test_unsupported_window_raises():
    with pytest.raises(ValueError, match="window_size"):
        fmtt.FlashMoEVarlenAttention.Config(window_size=(64, 0)).build()
