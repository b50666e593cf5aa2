"""Helpers shared by the peer modules."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..harness import Data, op_kind


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Run the library with ``FLASHMOE_BACKEND=name`` (read at call time by the API), and
    restore the previous value afterwards."""
    old = os.environ.get("FLASHMOE_BACKEND")
    os.environ["FLASHMOE_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLASHMOE_BACKEND", None)
        else:
            os.environ["FLASHMOE_BACKEND"] = old


def wrap_op(
    op: str,
    forward: Callable[[dict[str, Any]], torch.Tensor],
    data: Data,
    leaves: Sequence[str | tuple[str, str]],
    grad_key: str,
) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """Turn ``forward(set) -> out`` into the timed ``fn(i)`` of ``op``.

    fwd: ``(out,)`` under no_grad. fwd_bwd: forward then ``autograd.grad`` with the set's
    random grad_out, ``(out, *grads)``. bwd: the forward of every set runs here, outside the
    timed region; ``fn(i)`` is only ``autograd.grad(..., retain_graph=True)``, ``grads``.
    ``leaves`` name the tensors to differentiate: a key of the set, or ("shared", key).
    """
    kind = op_kind(op)
    sets = data.sets

    def leaf_tensors(s: dict[str, Any]) -> list[torch.Tensor]:
        return [data.shared[n[1]] if isinstance(n, tuple) else s[n] for n in leaves]

    if kind == "fwd":

        def fn(i: int) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return (forward(sets[i]),)

        return fn
    if kind == "fwd_bwd":

        def fn(i: int) -> tuple[torch.Tensor, ...]:
            s = sets[i]
            out = forward(s)
            grads = torch.autograd.grad(out, leaf_tensors(s), s[grad_key])
            return (out.detach(), *grads)

        return fn
    outs = [forward(s) for s in sets]

    def fn(i: int) -> tuple[torch.Tensor, ...]:
        s = sets[i]
        return tuple(torch.autograd.grad(outs[i], leaf_tensors(s), s[grad_key], retain_graph=True))

    return fn
