"""MoE ops as ``torch.library`` custom ops with fake implementations and registered
autograd (``torch.compile(fullgraph=True)`` without graph breaks, also on the reference
path, whose data-dependent loop is hidden inside the op).

``use_kernel`` (decided once in ``api``) picks the Triton launchers in ``launch`` or the
reference; the reference backward is explicit (``reference.*_bwd_ref``).
"""

from __future__ import annotations

import torch

from . import reference

_LIB = "flashmoe_science"


# ---------------------------------------------------------------- routing
@torch.library.custom_op(f"{_LIB}::route", mutates_args=())
def route_op(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
    bias: torch.Tensor | None,
    n_group: int | None,
    topk_group: int | None,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs = dict(scoring=scoring, renormalize=renormalize, bias=bias, n_group=n_group, topk_group=topk_group)
    if use_kernel:
        from . import launch

        return launch.route(router_logits, top_k, **kwargs)
    return reference.route_ref(router_logits, top_k, **kwargs)


@route_op.register_fake
def _(router_logits, top_k, scoring, renormalize, bias, n_group, topk_group, use_kernel):
    t = router_logits.shape[0]
    wd = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    return (
        router_logits.new_empty((t, top_k), dtype=wd),
        router_logits.new_empty((t, top_k), dtype=torch.int32),
    )


@torch.library.custom_op(f"{_LIB}::route_bwd", mutates_args=())
def route_bwd(
    d_weights: torch.Tensor,
    router_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    scoring: str,
    renormalize: bool,
) -> torch.Tensor:
    """d router_logits from d topk_weights, the selection (ids) held fixed."""
    return reference.route_bwd_ref(d_weights, router_logits, topk_ids, scoring, renormalize)


@route_bwd.register_fake
def _(d_weights, router_logits, topk_ids, scoring, renormalize):
    return torch.empty_like(router_logits)


def _route_setup(ctx, inputs, output):
    router_logits, top_k, scoring, renormalize, bias, n_group, topk_group, use_kernel = inputs
    _, ids = output
    ctx.save_for_backward(router_logits, ids)
    ctx.scoring, ctx.renormalize = scoring, renormalize


def _route_backward(ctx, d_weights, d_ids):
    router_logits, ids = ctx.saved_tensors
    d_logits = route_bwd(d_weights.contiguous(), router_logits, ids, ctx.scoring, ctx.renormalize)
    # top_k, scoring, renormalize, bias (selection only), n_group, topk_group, use_kernel
    return d_logits, None, None, None, None, None, None, None


route_op.register_autograd(_route_backward, setup_context=_route_setup)


def route(router_logits, top_k, *, scoring, renormalize, bias, n_group, topk_group, use_kernel):
    return route_op(router_logits, top_k, scoring, renormalize, bias, n_group, topk_group, use_kernel)


# ---------------------------------------------------------------- experts
def _no_h(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0, w_gate_up.shape[1]))


@torch.library.custom_op(f"{_LIB}::experts_fwd", mutates_args=())
def experts_fwd(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    use_kernel: bool,
    save_h: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h is the gate/up pre-activations (T*K, 2F) in slot order when ``save_h`` and
    ``use_kernel`` (the backward then skips recomputing them), else empty (0, 2F)."""
    if use_kernel:
        from . import launch

        y, h = launch.fused_experts_fwd(
            x, w_gate_up, w_down, topk_weights, topk_ids, activation, save_h=save_h
        )
        return y, h if h is not None else _no_h(x, w_gate_up)
    y = reference.fused_experts_ref(x, w_gate_up, w_down, topk_weights, topk_ids, activation=activation)
    return y, _no_h(x, w_gate_up)


@experts_fwd.register_fake
def _(x, w_gate_up, w_down, topk_weights, topk_ids, activation, use_kernel, save_h=False):
    slots = topk_ids.shape[0] * topk_ids.shape[1] if (save_h and use_kernel) else 0
    return torch.empty_like(x), x.new_empty((slots, w_gate_up.shape[1]))


@torch.library.custom_op(f"{_LIB}::experts_bwd", mutates_args=())
def experts_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    use_kernel: bool,
    h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h``: the forward's stored pre-activations (kernel path); None recomputes them."""
    if use_kernel:
        from . import launch

        return launch.fused_experts_bwd(dy, x, w_gate_up, w_down, topk_weights, topk_ids, activation, h=h)
    return reference.fused_experts_bwd_ref(
        dy, x, w_gate_up, w_down, topk_weights, topk_ids, activation=activation
    )


@experts_bwd.register_fake
def _(dy, x, w_gate_up, w_down, topk_weights, topk_ids, activation, use_kernel, h=None):
    return (
        torch.empty_like(x),
        torch.empty_like(w_gate_up),
        torch.empty_like(w_down),
        torch.empty_like(topk_weights),
    )


def _experts_setup(ctx, inputs, output):
    x, w_gate_up, w_down, topk_weights, topk_ids, activation, use_kernel, save_h = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x, w_gate_up, w_down, topk_weights, topk_ids, h)
    ctx.activation, ctx.use_kernel, ctx.stored_h = activation, use_kernel, save_h and use_kernel


def _experts_backward(ctx, dy, dh):
    # dh: h is non-differentiable (an intermediate handed to the backward), never used.
    x, w_gate_up, w_down, topk_weights, topk_ids, h = ctx.saved_tensors
    dx, dw1, dw2, dw = experts_bwd(
        dy.contiguous(),
        x,
        w_gate_up,
        w_down,
        topk_weights,
        topk_ids,
        ctx.activation,
        ctx.use_kernel,
        h if ctx.stored_h else None,
    )
    return dx, dw1, dw2, dw, None, None, None, None  # topk_ids, activation, use_kernel, save_h


experts_fwd.register_autograd(_experts_backward, setup_context=_experts_setup)


def fused_experts(x, w_gate_up, w_down, topk_weights, topk_ids, activation: str, use_kernel: bool):
    """y. On the kernel path with gradients wanted, the forward also stores the gate/up
    pre-activations for the backward (T*K*2F elements; docs/moe.md: faster than recomputing)."""
    save_h = (
        use_kernel
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (x, w_gate_up, w_down, topk_weights))
    )
    y, _ = experts_fwd(x, w_gate_up, w_down, topk_weights, topk_ids, activation, use_kernel, save_h)
    return y
