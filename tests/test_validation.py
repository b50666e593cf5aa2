"""Every validation error names the argument, what was expected and what came."""

import pytest
import torch

from flashmoe_science import (
    flash_attention_science,
    flash_attention_varlen,
    fused_experts,
    fused_moe,
    route,
)


def qkv(b=1, h=4, h_kv=2, s=8, d=16, dtype=torch.float32):
    return (
        torch.randn(b, h, s, d, dtype=dtype),
        torch.randn(b, h_kv, s, d, dtype=dtype),
        torch.randn(b, h_kv, s, d, dtype=dtype),
    )


ATTN_ERRORS = [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "k has dtype torch.float64 but q has"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "q has dtype torch.int32"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "q has 3 heads and k has 2"),
    (lambda q, k, v: (q, k, v[:, :1]), ValueError, "v has 1 heads but k has 2"),
    (lambda q, k, v: (q, k[..., :8], v), ValueError, "head_dim must agree"),
    (lambda q, k, v: (q, k[:, :, :5], v), ValueError, "k has seqlen 5 but v has 8"),
    (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch sizes must agree"),
]


@pytest.mark.parametrize("mutate,exc,msg", ATTN_ERRORS, ids=[m for _, _, m in ATTN_ERRORS])
def test_attention_errors(mutate, exc, msg):
    with pytest.raises(exc, match=msg):
        flash_attention_science(*mutate(*qkv()))


@pytest.mark.parametrize("scale,exc", [(-1.0, ValueError), (float("inf"), ValueError), ("a", TypeError)])
def test_attention_bad_scale(scale, exc):
    with pytest.raises(exc, match="softmax_scale"):
        flash_attention_science(*qkv(), softmax_scale=scale)


def test_attention_devices_must_match():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        flash_attention_science(q, k.to("meta"), v)


def varlen_args():
    q = torch.randn(10, 4, 16)
    k = torch.randn(12, 2, 16)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    return q, k, k.clone(), cu_q, cu_k, 6, 7


VARLEN_ERRORS = [
    (3, torch.tensor([0, 4, 10], dtype=torch.int64), TypeError, "cu_seqlens_q has dtype torch.int64"),
    (3, torch.tensor([1, 4, 10], dtype=torch.int32), ValueError, "cu_seqlens_q must start at 0"),
    (3, torch.tensor([0, 6, 4, 10], dtype=torch.int32), ValueError, "cu_seqlens_q must be non-decreasing"),
    (3, torch.tensor([0, 4, 9], dtype=torch.int32), ValueError, "ends at 9 but the packed tensor has 10"),
    (4, torch.tensor([0, 5, 6, 12], dtype=torch.int32), ValueError, "cu_seqlens_q has 3 entries"),
    (5, 3, ValueError, "max_seqlen_q=3 but cu_seqlens_q has a sequence of 6"),
    (6, -1, TypeError, "max_seqlen_k must be a non-negative int"),
]


@pytest.mark.parametrize("pos,value,exc,msg", VARLEN_ERRORS, ids=[m for *_, m in VARLEN_ERRORS])
def test_varlen_errors(pos, value, exc, msg):
    args = list(varlen_args())
    args[pos] = value
    with pytest.raises(exc, match=msg):
        flash_attention_varlen(*args)


def test_varlen_rank():
    args = list(varlen_args())
    args[0] = args[0][None]
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        flash_attention_varlen(*args)


def moe_args(t=6, h=8, f=4, e=4, k=2):
    x = torch.randn(t, h)
    w1 = torch.randn(e, 2 * f, h)
    w2 = torch.randn(e, h, f)
    tw, ids = route(torch.randn(t, e), k)
    return x, w1, w2, tw, ids


MOE_ERRORS = [
    (0, lambda a: a[0][:, :5], ValueError, "w_gate_up has hidden size 8"),
    (1, lambda a: a[1][:, :7], ValueError, "w_gate_up dim 1 must be 2\\*ffn"),
    (2, lambda a: a[2][:, :, :3], ValueError, "w_down has shape \\(4, 8, 3\\)"),
    (3, lambda a: a[3][:, :1], ValueError, "topk_ids has shape \\(6, 2\\) but topk_weights has \\(6, 1\\)"),
    (4, lambda a: a[4].float(), TypeError, "topk_ids has dtype torch.float32"),
    (4, lambda a: a[4] + 10, ValueError, "topk_ids must be in \\[0, 4\\)"),
    (0, lambda a: a[0].int(), TypeError, "x has dtype torch.int32"),
    (1, lambda a: a[1].double(), TypeError, "w_gate_up has dtype torch.float64 but x has"),
    (0, lambda a: a[0][None], ValueError, "x must have 2 dimensions"),
    (0, lambda a: a[0][:5], ValueError, "topk_ids has 6 rows; expected 5"),
]


@pytest.mark.parametrize("pos,mutate,exc,msg", MOE_ERRORS, ids=[m for *_, m in MOE_ERRORS])
def test_fused_experts_errors(pos, mutate, exc, msg):
    args = list(moe_args())
    args[pos] = mutate(args)
    with pytest.raises(exc, match=msg):
        fused_experts(*args)


def test_fused_experts_bad_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_experts(*moe_args(), activation="relu")


ROUTE_ERRORS = [
    (dict(top_k=0), ValueError, "top_k must be in \\[1, 8\\]"),
    (dict(top_k=9), ValueError, "top_k must be in \\[1, 8\\]"),
    (dict(top_k=2.0), TypeError, "top_k must be an int"),
    (dict(scoring="relu"), ValueError, "scoring must be one of"),
    (dict(bias=torch.zeros(7)), ValueError, "bias has 7 entries; expected 8"),
    (dict(n_group=3, topk_group=1), ValueError, "n_group=3 must divide the number of experts 8"),
    (dict(n_group=4), ValueError, "n_group and topk_group must be given together"),
    (dict(n_group=4, topk_group=5), ValueError, "topk_group=5 must be <= n_group=4"),
    (dict(top_k=5, n_group=4, topk_group=2), ValueError, "top_k=5 exceeds the 4 experts"),
]


@pytest.mark.parametrize("kwargs,exc,msg", ROUTE_ERRORS, ids=[m for *_, m in ROUTE_ERRORS])
def test_route_errors(kwargs, exc, msg):
    kwargs = {"top_k": 2, **kwargs}
    top_k = kwargs.pop("top_k")
    with pytest.raises(exc, match=msg):
        route(torch.randn(5, 8), top_k, **kwargs)


def test_route_logits_rank_and_dtype():
    with pytest.raises(ValueError, match="router_logits must have 2 dimensions"):
        route(torch.randn(8), 1)
    with pytest.raises(TypeError, match="router_logits has dtype torch.int64"):
        route(torch.zeros(3, 4, dtype=torch.long), 1)


def test_fused_moe_logits_shape():
    x, w1, w2, _, _ = moe_args()
    with pytest.raises(ValueError, match="router_logits has 5 rows; expected 6"):
        fused_moe(x, w1, w2, torch.randn(5, 4))
    with pytest.raises(ValueError, match="router_logits has 3 experts but w_gate_up has 4"):
        fused_moe(x, w1, w2, torch.randn(6, 3))


def test_backend_variable_is_checked(monkeypatch):
    monkeypatch.setenv("FLASHMOE_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FLASHMOE_BACKEND='cuda-please' is not understood"):
        flash_attention_science(*qkv())


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("FLASHMOE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device or TRITON_INTERPRET=1"):
        flash_attention_science(*qkv(dtype=torch.float16))


def test_varlen_value_checks_once_per_tensor_version(monkeypatch):
    """The cu_seqlens value checks (a host sync each) run once per tensor and version: a model's
    layers reuse one cu_seqlens. An in-place change, another total or max_seqlen, or a new
    tensor with the same values is checked again; bad values written in place still raise."""
    from flashmoe_science.ops.attention import api

    seen = []
    real = api._check_cu_values
    monkeypatch.setattr(api, "_check_cu_values", lambda name, *a: seen.append(name) or real(name, *a))
    q, k, v, cu_q, cu_k, mq, mk = varlen_args()
    flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk)
    assert seen == ["cu_seqlens_q", "cu_seqlens_k"]
    flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk)  # the next layer: no sync
    assert len(seen) == 2
    flash_attention_varlen(q, k, v, cu_q, cu_k, mq + 1, mk)  # another max_seqlen_q
    flash_attention_varlen(q, k, v, cu_q.clone(), cu_k, mq, mk)  # another tensor
    assert seen[2:] == ["cu_seqlens_q", "cu_seqlens_q"]
    cu_q[1] = 7  # in place: the version counter moves, the checks run again
    with pytest.raises(ValueError, match="max_seqlen_q=6 but cu_seqlens_q has a sequence of 7"):
        flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk)


def test_varlen_inference_tensors_checked_every_call(monkeypatch):
    """Tensors made under inference mode carry no version counter: no remembering."""
    from flashmoe_science.ops.attention import api

    seen = []
    real = api._check_cu_values
    monkeypatch.setattr(api, "_check_cu_values", lambda name, *a: seen.append(name) or real(name, *a))
    with torch.inference_mode():
        q, k, v, cu_q, cu_k, mq, mk = varlen_args()
        for _ in range(2):
            flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk)
    assert seen == ["cu_seqlens_q", "cu_seqlens_k"] * 2


@pytest.mark.parametrize("flag", ["yes", 1, None, torch.tensor(True)])
def test_bool_switches_are_checked(flag):
    """causal / renormalize take a bool (as SDPA's is_causal does), not a truthy value."""
    q, k, v = qkv()
    with pytest.raises(TypeError, match="causal must be a bool"):
        flash_attention_science(q, k, v, causal=flag)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    packed = (q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))
    with pytest.raises(TypeError, match="causal must be a bool"):
        flash_attention_varlen(*packed, cu, cu, 5, 5, causal=flag)
    logits = torch.randn(6, 4)
    with pytest.raises(TypeError, match="renormalize must be a bool"):
        route(logits, 2, renormalize=flag)
    x, w1, w2 = torch.randn(6, 8), torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    with pytest.raises(TypeError, match="renormalize must be a bool"):
        fused_moe(x, w1, w2, logits, top_k=2, renormalize=flag)


def test_numpy_bool_switch_accepted():
    np = pytest.importorskip("numpy")
    q, k, v = qkv()
    torch.testing.assert_close(
        flash_attention_science(q, k, v, causal=np.bool_(True)), flash_attention_science(q, k, v, causal=True)
    )
