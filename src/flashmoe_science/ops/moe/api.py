"""Public MoE API: ``route``, ``fused_experts``, ``fused_moe``. Validation, then dispatch to
the Triton kernels (CUDA, float16/bfloat16) or the reference.

Shape letters: T tokens, H hidden, E experts, K top-k, F ffn per expert.
"""

from __future__ import annotations

import torch

from ..._backend import direct_launch_ok, select_backend
from ..._validation import (
    check_flag,
    check_float,
    check_int_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from . import autograd, reference

SCORINGS = ("softmax", "sigmoid")


def _kernel_dtype(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def _check_top_k(top_k: object, num_experts: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (the number of experts), got {top_k}")
    return top_k


def _check_routing_args(router_logits, top_k, scoring, bias, n_group, topk_group) -> None:
    check_tensor("router_logits", router_logits, ndim=2)
    check_float("router_logits", router_logits)
    e = router_logits.shape[1]
    if e == 0:
        raise ValueError("router_logits has 0 experts (shape (T, 0)); expected E >= 1")
    _check_top_k(top_k, e)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_float("bias", bias)
        if bias.shape[0] != e:
            raise ValueError(f"bias has {bias.shape[0]} entries; expected {e} (one per expert)")
        check_same_device(("router_logits", "bias"), (router_logits, bias))
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group must be given together (or both None)")
    if n_group is not None:
        for name, val in (("n_group", n_group), ("topk_group", topk_group)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if e % n_group != 0:
            raise ValueError(f"n_group={n_group} must divide the number of experts {e}")
        if topk_group > n_group:
            raise ValueError(f"topk_group={topk_group} must be <= n_group={n_group}")
        if top_k > topk_group * (e // n_group):
            raise ValueError(
                f"top_k={top_k} exceeds the {topk_group * (e // n_group)} experts "
                f"in the topk_group={topk_group} selected groups"
            )


def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose K experts per token.

    Args:
        router_logits: (T, E) float.
        top_k: K, 1 <= K <= E.
        scoring: "softmax" (over experts) or "sigmoid" (per expert, DeepSeek-V3).
        renormalize: divide the K weights by their sum.
        bias: optional (E,) added to the scores for selection only.
        n_group, topk_group: group-limited routing (DeepSeek-V2/V3).

    Returns:
        topk_weights float32 (T, K), topk_ids int32 (T, K). Differentiable in
        ``router_logits`` through the weights.
    """
    _check_routing_args(router_logits, top_k, scoring, bias, n_group, topk_group)
    kwargs = dict(
        scoring=scoring,
        renormalize=check_flag("renormalize", renormalize),
        bias=bias,
        n_group=n_group,
        topk_group=topk_group,
    )
    use_kernel = (
        router_logits.shape[0] > 0
        and select_backend(router_logits) == "triton"
        and router_logits.dtype != torch.float64
    )
    return autograd.route(router_logits, top_k, **kwargs, use_kernel=use_kernel)


def _check_weights(x, w_gate_up, w_down) -> None:
    check_tensor("x", x, ndim=2)
    check_tensor("w_gate_up", w_gate_up, ndim=3)
    check_tensor("w_down", w_down, ndim=3)
    for name, t in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_float(name, t)
    check_same_dtype(("x", "w_gate_up", "w_down"), (x, w_gate_up, w_down))
    check_same_device(("x", "w_gate_up", "w_down"), (x, w_gate_up, w_down))
    h = x.shape[1]
    e, f2, h1 = w_gate_up.shape
    if h1 != h:
        raise ValueError(
            f"w_gate_up has hidden size {h1} (shape {tuple(w_gate_up.shape)}); expected {h} from x"
        )
    if f2 % 2 != 0 or f2 == 0:
        raise ValueError(f"w_gate_up dim 1 must be 2*ffn (even, > 0), got {f2}")
    if tuple(w_down.shape) != (e, h, f2 // 2):
        raise ValueError(
            f"w_down has shape {tuple(w_down.shape)}; expected (experts, hidden, ffn) = {(e, h, f2 // 2)}"
        )


def _check_experts_args(x, w_gate_up, w_down, topk_weights, topk_ids, activation) -> None:
    _check_weights(x, w_gate_up, w_down)
    check_tensor("topk_weights", topk_weights, ndim=2)
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_float("topk_weights", topk_weights)
    check_int_tensor("topk_ids", topk_ids)
    check_same_device(("x", "topk_weights", "topk_ids"), (x, topk_weights, topk_ids))
    t, h = x.shape
    e = w_gate_up.shape[0]
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(
            f"topk_ids has shape {tuple(topk_ids.shape)} but topk_weights has "
            f"{tuple(topk_weights.shape)}; they must match"
        )
    if topk_ids.shape[0] != t:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows; expected {t} (one per token of x)")
    _check_top_k(topk_ids.shape[1], e)
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")


def _check_ids_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Value check of user-given ids (one host sync). Skipped while compiling or capturing a
    CUDA graph; ``fused_moe`` skips it because ``route`` only makes valid ids."""
    if topk_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if topk_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(
            f"topk_ids must be in [0, {num_experts}) (the number of experts), got values in [{lo}, {hi}]"
        )


def fused_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
) -> torch.Tensor:
    """Apply the routed experts: ``y[t] = sum_k w[t,k] * down_e(act(gate_e x) * up_e x)``.

    Args:
        x: (T, H). w_gate_up: (E, 2F, H). w_down: (E, H, F).
        topk_weights: (T, K) float. topk_ids: (T, K) int32/int64 in [0, E).
        activation: "silu" (SwiGLU) or "gelu" (tanh GeGLU).

    Returns:
        y (T, H) in x's dtype. Differentiable in x, both weights and topk_weights.
    """
    _check_experts_args(x, w_gate_up, w_down, topk_weights, topk_ids, activation)
    _check_ids_range(topk_ids, w_gate_up.shape[0])
    return _run_experts(x, w_gate_up, w_down, topk_weights, topk_ids, activation)


def _run_experts(x, w_gate_up, w_down, topk_weights, topk_ids, activation):
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    use_kernel = select_backend(x) == "triton" and _kernel_dtype(x)
    if use_kernel and direct_launch_ok(x, w_gate_up, w_down, topk_weights, topk_ids):
        from . import launch

        return launch.fused_experts_fwd(x, w_gate_up, w_down, topk_weights, topk_ids, activation)[0]
    return autograd.fused_experts(x, w_gate_up, w_down, topk_weights, topk_ids, activation, use_kernel)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int = 2,
    *,
    renormalize: bool = True,
    scoring: str = "softmax",
) -> torch.Tensor:
    """Route and apply the experts in one call: ``fused_experts(x, ..., *route(...))``.

    Args:
        x: (T, H). w_gate_up: (E, 2F, H). w_down: (E, H, F). router_logits: (T, E).
    """
    check_tensor("x", x, ndim=2)
    check_tensor("router_logits", router_logits, ndim=2)
    if router_logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"router_logits has {router_logits.shape[0]} rows; expected {x.shape[0]} (one per token of x)"
        )
    check_tensor("w_gate_up", w_gate_up, ndim=3)
    if router_logits.shape[1] != w_gate_up.shape[0]:
        raise ValueError(
            f"router_logits has {router_logits.shape[1]} experts but w_gate_up has {w_gate_up.shape[0]}"
        )
    if (
        x.shape[0] > 0
        and _kernel_dtype(x)
        and router_logits.dtype != torch.float64
        and select_backend(x) == "triton"
        and direct_launch_ok(x, w_gate_up, w_down, router_logits)
    ):
        # Inference: routing + experts straight to the launchers (decode: 4 launches).
        _check_routing_args(router_logits, top_k, scoring, None, None, None)
        _check_weights(x, w_gate_up, w_down)
        check_same_device(("x", "router_logits"), (x, router_logits))
        from . import launch

        return launch.moe_forward(
            x,
            w_gate_up,
            w_down,
            router_logits,
            top_k,
            scoring=scoring,
            renormalize=check_flag("renormalize", renormalize),
        )
    topk_weights, topk_ids = route(router_logits, top_k, scoring=scoring, renormalize=renormalize)
    _check_experts_args(x, w_gate_up, w_down, topk_weights, topk_ids, "silu")
    return _run_experts(x, w_gate_up, w_down, topk_weights, topk_ids, "silu")
