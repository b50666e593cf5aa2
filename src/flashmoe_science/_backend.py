"""Backend selection: which implementation an op call runs.

Rule (DESIGN.md): CUDA tensors go to the Triton kernels, CPU tensors to the plain-PyTorch
reference. ``FLASHMOE_BACKEND=reference|triton`` forces a path. ``triton`` on CPU tensors is
only possible under ``TRITON_INTERPRET=1`` (Triton's interpreter; this is how CI tests the
kernels without a GPU). The variable is read at call time, so no module state is flipped.
"""

from __future__ import annotations

import os

import torch

_VALID = ("auto", "reference", "triton")


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is on (kernels may run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forced_backend() -> str:
    value = os.environ.get("FLASHMOE_BACKEND", "auto").strip().lower() or "auto"
    if value not in _VALID:
        raise ValueError(f"FLASHMOE_BACKEND={value!r} is not understood; expected one of {', '.join(_VALID)}")
    return value


def select_backend(t: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"reference"`` for an op whose main input is ``t``."""
    forced = forced_backend()
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if t.is_cuda or interpreter_enabled():
            return "triton"
        raise ValueError(
            "FLASHMOE_BACKEND=triton with tensors on "
            f"{t.device.type!r} needs a CUDA device or TRITON_INTERPRET=1 set before import"
        )
    return "triton" if t.is_cuda else "reference"


def direct_launch_ok(*tensors: torch.Tensor) -> bool:
    """True when an op may call its kernel launcher without the custom-op layer: eager
    (nothing compiling or intercepting dispatch), plain tensors, no gradient wanted. The
    custom ops exist for torch.compile and autograd; in eager inference their dispatch costs
    tens of microseconds a call, more than a decode step or a 512-token attention forward
    takes on the GPU (docs/moe.md, docs/attention_fwd.md)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if type(t) is not torch.Tensor or (grad and t.requires_grad):
            return False
    return True


def direct_autograd_ok(*tensors: torch.Tensor) -> bool:
    """True when an op may run its launchers under a plain ``torch.autograd.Function`` instead
    of its custom op: eager (nothing compiling, no dispatch or function modes, no functorch
    transform), plain tensors. Gradients may be wanted. In an eager training step the custom
    ops' dispatch (forward and backward) cost ~250 us of host time per attention call on the
    H100 machine, more than a short-sequence step takes on the GPU (docs/attention_bwd.md)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active():
        return False
    return all(type(t) is torch.Tensor for t in tensors)
