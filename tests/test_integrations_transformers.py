"""Hugging Face transformers: apply() on tiny random models built from configs (no downloads).

Oracle: the original model in float64 (r); yardstick: the original model in float32 (p); the
applied float32 model (o) must meet DESIGN.md's rule on the logits of every real token.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _numerics import assert_close_rule

transformers = pytest.importorskip("transformers")

from flashmoe_science._backend import interpreter_enabled  # noqa: E402
from flashmoe_science.integrations import transformers as fmt  # noqa: E402
from flashmoe_science.ops.attention import launch as attn_launch  # noqa: E402
from flashmoe_science.ops.moe import launch as moe_launch  # noqa: E402

VOCAB = 96


def _cfg(cls, overrides, **defaults):
    return cls(**{**defaults, **overrides})


def _mixtral(**overrides):
    cfg = _cfg(
        transformers.MixtralConfig,
        overrides,
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA 2:1
        num_local_experts=6,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        initializer_range=0.15,
    )
    return transformers.MixtralForCausalLM(cfg)


def _qwen2_moe(**overrides):
    cfg = _cfg(
        transformers.Qwen2MoeConfig,
        overrides,
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=False,  # Qwen2-MoE's default: top-k softmax weights are not renormalised
        max_position_embeddings=64,
        initializer_range=0.15,
    )
    return transformers.Qwen2MoeForCausalLM(cfg)


def _qwen3_moe(**overrides):
    cfg = _cfg(
        transformers.Qwen3MoeConfig,
        overrides,
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,  # MQA
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=64,
        initializer_range=0.15,
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def _deepseek_v3(**overrides):
    cfg = _cfg(
        transformers.DeepseekV3Config,
        overrides,
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,  # group-limited routing: 4 groups of 2, the best 2 groups compete
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=12,  # MLA: value heads narrower than query heads (16)
        max_position_embeddings=64,
        initializer_range=0.15,
    )
    model = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # a non-zero selection bias, so the test sees it
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


MODELS = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
}


def _pair(name, **overrides):
    """(float32 model, float64 copy), both with transformers' plain per-expert loop ("eager"):
    its default on CPU, grouped_mm, has no float64 kernel."""
    model = MODELS[name](**overrides).eval()
    model.set_experts_implementation("eager")
    return model, copy.deepcopy(model).double()


def _batch(b=3, s=12, pad=True):
    ids = torch.randint(0, VOCAB, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    if pad:
        mask[1, :4] = 0  # left padding
        mask[2, -5:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("pad", [False, True], ids=["dense", "padded"])
def test_apply_matches_original_logits(name, pad):
    model, model64 = _pair(name)
    ids, mask = _batch(pad=pad)
    with torch.no_grad():
        ref64 = model64(ids, attention_mask=mask).logits
        ref32 = model(ids, attention_mask=mask).logits
        assert fmt.apply(model) is model
        out = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == fmt.NAME
    n_blocks = sum(isinstance(m, fmt.FlashMoESparseBlock) for m in model.modules())
    assert n_blocks == (1 if name == "deepseek_v3" else 2)
    real = mask.bool()  # padded positions are not compared (their logits are meaningless)
    assert_close_rule(out[real], ref64[real], ref32[real], name=f"{name} logits")


# Head dims the attention kernel takes (32 here); float16, as the interpreter computes bf16 wrong.
KERNEL_DIMS = {
    "mixtral": dict(hidden_size=128),  # 4 heads x 32
    "qwen2_moe": dict(hidden_size=128),
    "qwen3_moe": dict(head_dim=32),
    "deepseek_v3": dict(qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24),  # q/k 32, v 24
}


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_runs_the_triton_kernels_under_the_interpreter(name, monkeypatch):
    """FLASHMOE_BACKEND=triton + TRITON_INTERPRET=1: the adapter drives the real Triton kernels."""
    if not interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    model, model64 = _pair(name, **KERNEL_DIMS[name])
    model.half()
    ids, mask = _batch()
    calls = []

    def spy(module, fn_name):
        fn = getattr(module, fn_name)
        monkeypatch.setattr(module, fn_name, lambda *a, **k: (calls.append(fn_name), fn(*a, **k))[1])

    with torch.no_grad():
        ref64 = model64(ids, attention_mask=mask).logits
        ref16 = model(ids, attention_mask=mask).logits
        fmt.apply(model)
        for module, fn_name in (
            (attn_launch, "attention_varlen_fwd"),
            (moe_launch, "route"),
            (moe_launch, "fused_experts_fwd"),
        ):
            spy(module, fn_name)
        monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
        out = model(ids, attention_mask=mask).logits
    assert {"attention_varlen_fwd", "route", "fused_experts_fwd"} <= set(calls), calls
    real = mask.bool()
    assert_close_rule(out[real], ref64[real], ref16[real], name=f"{name} fp16 logits (Triton, interpreted)")


def test_apply_keeps_parameters_and_state_dict():
    model = _qwen2_moe().eval()
    before = {k: v for k, v in model.state_dict().items()}
    params_before = {id(p) for p in model.parameters()}
    fmt.apply(model)
    after = model.state_dict()
    assert list(after) == list(before)  # same keys, same order: save_pretrained format unchanged
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)  # no copies
    assert {id(p) for p in model.parameters()} == params_before
    fmt.undo(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, fmt.FlashMoESparseBlock) for m in model.modules())
    assert type(model.model.layers[0].mlp).__name__ == "Qwen2MoeSparseMoeBlock"


def test_apply_backward_matches_original():
    model, model64 = _pair("qwen2_moe")
    ref32 = copy.deepcopy(model)
    fmt.apply(model)
    ids, mask = _batch()
    g = torch.randn(ids.shape[0], ids.shape[1], VOCAB, dtype=torch.float64)
    g = g * mask[..., None]  # no gradient from padded positions
    grads = {}
    for tag, m in (("o", model), ("p", ref32), ("r", model64)):
        m.zero_grad()
        logits = m(ids, attention_mask=mask).logits
        logits.backward(g.to(logits.dtype))
        layer = m.model.layers[1]
        grads[tag] = {
            "experts.gate_up_proj": layer.mlp.experts.gate_up_proj.grad,
            "experts.down_proj": layer.mlp.experts.down_proj.grad,
            "gate.weight": layer.mlp.gate.weight.grad,
            "q_proj.weight": layer.self_attn.q_proj.weight.grad,
            "embed_tokens": m.model.embed_tokens.weight.grad,
        }
    for key in grads["r"]:
        assert_close_rule(grads["o"][key], grads["r"][key], grads["p"][key], grad=True, name=key)


def test_decode_with_kv_cache_and_left_padding():
    """Prefill then one decode step (S_q=1 against a cache): the 2-D mask path with S_q != S_k."""
    model, model64 = _pair("mixtral")
    ids, mask = _batch(pad=False)
    mask[0, :5] = 0  # left padding only, as generate() uses
    nxt = torch.randint(0, VOCAB, (ids.shape[0], 1))
    mask2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)

    def step(m):
        with torch.no_grad():
            cache = transformers.DynamicCache(config=m.config)
            m(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            return m(nxt, attention_mask=mask2, past_key_values=cache, use_cache=True).logits

    ref64, ref32 = step(model64), step(model)
    out = step(fmt.apply(model))
    assert_close_rule(out, ref64, ref32, name="decode logits")


def test_router_logits_and_aux_loss_still_reported():
    model, model64 = _pair("mixtral")
    ids, mask = _batch(pad=False)

    def run(m):
        with torch.no_grad():
            return m(ids, labels=ids, output_router_logits=True)

    ref64, ref32 = run(model64), run(model)
    out = run(fmt.apply(model))
    assert len(out.router_logits) == len(ref32.router_logits) == 2
    assert_close_rule(out.aux_loss, ref64.aux_loss, ref32.aux_loss, name="aux_loss")
    assert_close_rule(out.loss, ref64.loss, ref32.loss, name="loss")


def test_experts_implementation_interface():
    """``experts_implementation="fmsci"``: the model's router, our fused experts."""
    model, model64 = _pair("qwen3_moe")
    ids, _ = _batch(pad=False)
    fmt.register()
    with torch.no_grad():
        ref64, ref32 = model64(ids).logits, model(ids).logits
        model.set_experts_implementation(fmt.NAME)
        assert model.config._experts_implementation == fmt.NAME
        out = model(ids).logits
    assert_close_rule(out, ref64, ref32, name="experts_implementation logits")


def test_packed_sequences_take_the_masked_path():
    """position_ids restarting inside a row (packed sequences) arrive as a 4-D mask."""
    model, model64 = _pair("qwen3_moe")
    ids = torch.randint(0, VOCAB, (1, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        ref64, ref32 = model64(ids, position_ids=pos).logits, model(ids, position_ids=pos).logits
        out = fmt.apply(model)(ids, position_ids=pos).logits
    assert_close_rule(out, ref64, ref32, name="packed logits")


def test_unsupported_features_raise():
    model = fmt.apply(_mixtral(attention_dropout=0.1).train())
    with pytest.raises(ValueError, match="dropout"):
        model(torch.randint(0, VOCAB, (1, 4)))


def test_unknown_moe_block_raises():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(4, 2)
            self.experts = torch.nn.Linear(4, 4)

    model = _mixtral().eval()
    model.model.layers[0].mlp = Block()
    with pytest.raises(ValueError, match="routing rule is not known"):
        fmt.apply(model)
    fmt.apply(model, moe=False)  # attention only
    assert model.config._attn_implementation == fmt.NAME
