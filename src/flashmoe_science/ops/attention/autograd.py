"""Attention as ``torch.library`` custom ops with fake implementations and registered
autograd, so ``torch.compile(fullgraph=True)`` traces forward and backward without graph
breaks on every path.

``use_kernel`` (decided once in ``api``) picks the Triton launchers (``launch`` /
``launch_bwd``) or the reference. The reference backward is the explicit
FlashAttention-2 equations in ``reference``.
"""

from __future__ import annotations

import torch

from . import reference

_LIB = "flashmoe_science"


def _like_inputs(grads, inputs):
    """Gradients with their inputs' strides, as the fake implementations promise
    (``empty_like``), so a compiled graph may view them the way it viewed the inputs."""
    return tuple(torch.empty_like(t).copy_(g) for g, t in zip(grads, inputs))


# ---------------------------------------------------------------- dense
@torch.library.custom_op(f"{_LIB}::attn_fwd", mutates_args=())
def attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, use_kernel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_kernel:
        from . import launch

        return launch.attention_fwd(q, k, v, causal, scale)
    out, lse = reference.attention_ref(q, k, v, causal, scale)
    return out.contiguous(), lse.contiguous()


@attn_fwd.register_fake
def _(q, k, v, causal, scale, use_kernel):
    b, h, s_q, d = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((b, h, s_q, d)), q.new_empty((b, h, s_q), dtype=lse_dtype)


@torch.library.custom_op(f"{_LIB}::attn_bwd", mutates_args=())
def attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_kernel:
        from . import launch_bwd

        return launch_bwd.attention_bwd(do, q, k, v, out, lse, causal, scale)
    return _like_inputs(reference.attention_bwd_ref(do, q, k, v, out, lse, causal, scale), (q, k, v))


@attn_bwd.register_fake
def _(do, q, k, v, out, lse, causal, scale, use_kernel):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attn_setup(ctx, inputs, output):
    q, k, v, causal, scale, use_kernel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.use_kernel = causal, scale, use_kernel


def _attn_backward(ctx, d_out, d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # d_lse is ignored: lse is returned for inspection and merging, not differentiated.
    dq, dk, dv = attn_bwd(d_out.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale, ctx.use_kernel)
    return dq, dk, dv, None, None, None  # causal, scale, use_kernel: not tensors


attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


def attention(q, k, v, causal: bool, scale: float, use_kernel: bool):
    return attn_fwd(q, k, v, causal, scale, use_kernel)


class EagerAttention(torch.autograd.Function):
    """The kernel path of ``attn_fwd`` / ``attn_bwd`` for eager training, without the custom
    ops' dispatch (host time: a short-sequence step is host-bound; docs/attention_bwd.md). Same
    launchers, saved tensors and gradients; lse's gradient is ignored as in ``_attn_backward``.
    The API takes it only where ``_backend.direct_autograd_ok`` holds: torch.compile and
    dispatch modes see the custom ops."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        from . import launch

        out, lse = launch.attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.set_materialize_grads(False)  # no zero-filled d_lse per step
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if d_out is None:  # only lse was used: zero gradients, as the custom op's zero d_out gives
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None
        from . import launch_bwd

        dq, dk, dv = launch_bwd.attention_bwd(d_out.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


# ---------------------------------------------------------------- varlen
@torch.library.custom_op(f"{_LIB}::attn_varlen_fwd", mutates_args=())
def attn_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_kernel:
        from . import launch

        return launch.attention_varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale
        )
    out, lse = reference.attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
    return out.contiguous(), lse.contiguous()


@attn_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, use_kernel):
    t, h, d = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((t, h, d)), q.new_empty((h, t), dtype=lse_dtype)


@torch.library.custom_op(f"{_LIB}::attn_varlen_bwd", mutates_args=())
def attn_varlen_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_kernel:
        from . import launch_bwd

        return launch_bwd.attention_varlen_bwd(
            do,
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            causal,
            scale,
        )
    grads = reference.attention_varlen_bwd_ref(
        do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, scale
    )
    return _like_inputs(grads, (q, k, v))


@attn_varlen_bwd.register_fake
def _(
    do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, use_kernel
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, use_kernel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.max_q, ctx.max_k = max_q, max_k
    ctx.causal, ctx.scale, ctx.use_kernel = causal, scale, use_kernel


def _varlen_backward(ctx, d_out, d_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = attn_varlen_bwd(
        d_out.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        ctx.max_q,
        ctx.max_k,
        ctx.causal,
        ctx.scale,
        ctx.use_kernel,
    )
    # cu_seqlens_q/k, max_seqlen_q/k, causal, scale, use_kernel: not differentiable.
    return dq, dk, dv, None, None, None, None, None, None, None


attn_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale: float, use_kernel: bool):
    return attn_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, use_kernel)
