"""Megatron-Core 0.16.1: Megatron's own TransformerLayer built from its local GPT MoE layer spec,
with ``flashmoe_layer_spec`` swapping core attention and experts, compared with the default
layer (DotProductAttention + SequentialMLP) under Megatron's process groups (world size 1,
gloo, CPU).

Oracle: the default layer in float64; yardstick: the default layer in float32.
Megatron's own modules need four CPU patches (see integrations/megatron.py), applied here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from _numerics import assert_close_rule

pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel import random as megatron_random  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from flashmoe_science._backend import interpreter_enabled  # noqa: E402
from flashmoe_science.integrations import megatron as fmm  # noqa: E402
from flashmoe_science.ops.attention import launch as attn_launch  # noqa: E402
from flashmoe_science.ops.moe import launch as moe_launch  # noqa: E402

S, B, H = 24, 2, 128  # 4 heads of 32: a head dim the attention kernel takes


@contextlib.contextmanager
def _no_cuda_rng_fork(self, name="model-parallel-rng"):
    yield


@pytest.fixture(scope="module")
def megatron_world():
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tmp:
        # CPU patches for Megatron's own default modules (not needed by ours).
        mp.setattr(torch.cuda, "current_device", lambda: "cpu")
        mp.setattr(megatron_random.CudaRNGStatesTracker, "fork", _no_cuda_rng_fork)
        mp.setattr(moe_utils, "te_general_gemm", None, raising=False)
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1
        )
        parallel_state.initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def _config(**overrides):
    kw = dict(
        num_layers=2,
        hidden_size=H,
        num_attention_heads=4,
        num_query_groups=2,  # GQA 2:1
        ffn_hidden_size=128,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        use_cpu_initialization=True,
        moe_token_dispatcher_type="allgather",  # alltoall creates a torch.cuda.Stream
        moe_router_load_balancing_type="none",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.1,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def _layers(**overrides):
    torch.manual_seed(0)
    config = _config(**overrides)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, normalization="RMSNorm")
    default = build_module(spec, config=config, layer_number=1)
    ours = build_module(fmm.flashmoe_layer_spec(spec), config=config, layer_number=1)
    state = {k: v for k, v in default.state_dict().items() if ".local_experts." not in k}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert set(missing) == {"mlp.experts.w_gate_up", "mlp.experts.w_down"} and not unexpected
    ours.mlp.experts.load_sequential_mlp(default.mlp.experts)
    default64 = build_module(spec, config=config, layer_number=1)  # deepcopy fails on process groups
    default64.load_state_dict(default.state_dict())
    return default, ours, default64.double()


def _causal_mask():
    return torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None]  # True = masked


def test_spec_swaps_the_slots(megatron_world):
    _, ours, _ = _layers()
    assert isinstance(ours.self_attention.core_attention, fmm.FlashMoECoreAttention)
    assert isinstance(ours.mlp.experts, fmm.FlashMoEExperts)
    assert type(ours.mlp.router).__name__ == "TopKRouter"  # Megatron's router is kept


def test_layer_forward_backward_matches_megatron(megatron_world):
    default, ours, default64 = _layers()
    x = torch.randn(S, B, H, dtype=torch.float64)
    g = torch.randn(S, B, H, dtype=torch.float64)
    outs, grads = {}, {}
    for tag, layer in (("o", ours), ("p", default), ("r", default64)):
        xi = x.to(next(layer.parameters()).dtype).requires_grad_()
        out = layer(xi, attention_mask=_causal_mask())[0]
        out.backward(g.to(out.dtype))
        outs[tag] = out.detach()
        if tag == "o":
            w1, w2 = layer.mlp.experts.w_gate_up.grad, layer.mlp.experts.w_down.grad
        else:
            experts = layer.mlp.experts.local_experts
            w1 = torch.stack([e.linear_fc1.weight.grad for e in experts])
            w2 = torch.stack([e.linear_fc2.weight.grad for e in experts])
        grads[tag] = {
            "x": xi.grad,
            "w_gate_up": w1,
            "w_down": w2,
            "router": layer.mlp.router.weight.grad,
            "linear_qkv": layer.self_attention.linear_qkv.weight.grad,
        }
    assert_close_rule(outs["o"], outs["r"], outs["p"], name="layer output")
    for key in grads["r"]:
        assert_close_rule(grads["o"][key], grads["r"][key], grads["p"][key], grad=True, name=key)


def test_layer_runs_the_triton_kernels_under_the_interpreter(megatron_world, monkeypatch):
    """float16, FLASHMOE_BACKEND=triton, TRITON_INTERPRET=1: our slots run the Triton kernels."""
    if not interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    default, ours, default64 = _layers()
    ours.half()
    default.half()
    x = torch.randn(S, B, H, dtype=torch.float64)
    calls = []
    for module, name in ((attn_launch, "attention_fwd"), (moe_launch, "fused_experts_fwd")):
        fn = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1]
        )
    with torch.no_grad():
        ref64 = default64(x, attention_mask=_causal_mask())[0]
        ref16 = default(x.half(), attention_mask=_causal_mask())[0]
        monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
        out = ours(x.half(), attention_mask=_causal_mask())[0]
    assert {"attention_fwd", "fused_experts_fwd"} <= set(calls), calls
    assert_close_rule(out, ref64, ref16, name="fp16 layer output (Triton, interpreted)")


def test_padding_mask_type_uses_the_mask(megatron_world):
    """A non-causal layer with an explicit key-padding mask (arbitrary mask path)."""
    from megatron.core.transformer.enums import AttnMaskType

    config = _config()
    attn = fmm.FlashMoECoreAttention(config, 1, AttnMaskType.padding, "self")
    d = H // 4
    q = torch.randn(S, B, 4, d, dtype=torch.float64)
    k = torch.randn(S, B, 2, d, dtype=torch.float64)
    v = torch.randn(S, B, 2, d, dtype=torch.float64)
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., -7:] = True  # the last 7 keys of row 1 are padding
    out = attn(q, k, v, mask)
    kk, vv = (t.permute(1, 2, 0, 3).repeat_interleave(2, dim=1) for t in (k, v))
    ref = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), kk, vv, attn_mask=~mask, scale=d**-0.5)
    torch.testing.assert_close(out, ref.permute(2, 0, 1, 3).reshape(S, B, -1))


def test_unsupported_configs_raise(megatron_world):
    with pytest.raises(ValueError, match="bias"):
        fmm.FlashMoEExperts(8, _config(add_bias_linear=True))
    with pytest.raises(ValueError, match="dropout"):
        from megatron.core.transformer.enums import AttnMaskType

        fmm.FlashMoECoreAttention(_config(attention_dropout=0.1), 1, AttnMaskType.causal, "self")
