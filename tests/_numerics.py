"""DESIGN.md's correctness rule, in one place.

For a kernel output ``o``, a float64 reference ``r`` and ``p`` the plain-PyTorch reference
run in the input dtype: ``max|o - r| <= mult * max|p - r| + floor`` with mult 2 for outputs
and 3 for gradients, and floor twice the error of rounding ``r`` to the output dtype.
NaN never passes. A failure prints both errors and the worst index.
"""

from __future__ import annotations

import torch


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    r = ref.double()
    return 2.0 * (r.to(dtype).double() - r).abs().max().item() if r.numel() else 0.0


def assert_close_rule(
    out: torch.Tensor,
    ref64: torch.Tensor,
    same_dtype_ref: torch.Tensor,
    *,
    grad: bool = False,
    name: str = "output",
    extra_floor: float = 0.0,
) -> None:
    """Assert ``out`` meets the DESIGN.md rule against ``ref64`` (float64)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if out.numel() == 0:
        return
    o = out.detach().double().cpu()
    r = ref64.detach().double().cpu()
    p = same_dtype_ref.detach().double().cpu()
    finite = torch.isfinite(r)
    # Where the oracle itself is infinite (lse of a row that sees nothing) demand equality.
    if (~finite).any():
        assert torch.equal(o[~finite], r[~finite]), f"{name}: non-finite entries differ from the reference"
    assert not torch.isnan(o[finite]).any(), (
        f"{name}: NaN in output at {torch.isnan(o).nonzero()[:5].tolist()}"
    )
    err = (o - r).abs().masked_fill(~finite, 0)
    base = (p - r).abs().masked_fill(~finite, 0).max().item()
    floor = rounding_floor(r.masked_fill(~finite, 0), out.dtype) + extra_floor
    mult = 3.0 if grad else 2.0
    tol = mult * base + floor
    worst = err.max().item()
    if worst > tol:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name}: max|out-ref|={worst:.3e} > {mult}*{base:.3e} (same-dtype ref error) + "
            f"{floor:.3e} (floor) at index {idx}: out={o[idx].item():.6g} ref={r[idx].item():.6g}"
        )


def poison_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))
