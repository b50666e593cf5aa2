"""Differentiable collectives for expert parallelism, on ``torch.distributed`` only.

``all_to_all`` wraps :func:`torch.distributed.all_to_all_single` in an autograd function
whose backward is the same all-to-all with the split sizes transposed (what rank r sent to
rank s comes back from s to r). Split sizes are Python lists, exchanged once per step by
the caller. Every rank of the group must call these in the same order, forward and
backward; a rank with no rows still takes part with empty tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


def _all_to_all_rows(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all_rows(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        # Transposed splits: the gradient of the rows received from rank s goes back to s.
        grad_in = _all_to_all_rows(grad_out, ctx.in_splits, ctx.out_splits, ctx.group)
        # out_splits, in_splits, group: not tensors
        return grad_in, None, None, None


def all_to_all(
    x: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Rows of ``x`` (sum(in_splits), ...) scattered by ``in_splits`` to the ranks of
    ``group``; returns the (sum(out_splits), ...) rows received, in rank order.
    Differentiable in ``x``."""
    if x.shape[0] != sum(in_splits):
        raise ValueError(f"x has {x.shape[0]} rows; expected sum(in_splits) = {sum(in_splits)}")
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, in rank order (not differentiable).
    All ranks must pass the same shape (expert shards are equal-sized)."""
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)
