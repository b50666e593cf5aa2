"""Public attention API: validation, then dispatch to the Triton kernels or the reference.

Shape letters: B batch, H query heads, H_kv key/value heads, S_q / S_k sequence lengths,
D head dim, T_q / T_k total packed tokens (varlen).
"""

from __future__ import annotations

import math
import os
import weakref

import torch

from ..._backend import direct_autograd_ok, direct_launch_ok, select_backend
from ..._validation import (
    check_flag,
    check_float,
    check_int_tensor,
    check_positive_scale,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from . import autograd


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_axis: int) -> None:
    h, h_kv = q.shape[head_axis], k.shape[head_axis]
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"q has {h} heads and k has {h_kv}; heads_q must be a positive multiple of heads_kv")
    if v.shape[head_axis] != h_kv:
        raise ValueError(f"v has {v.shape[head_axis]} heads but k has {h_kv}; they must match")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"head_dim must agree: q has {d}, k has {k.shape[-1]}, v has {v.shape[-1]}")
    if d == 0:
        raise ValueError("head_dim must be positive, got 0")


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    return check_positive_scale("softmax_scale", softmax_scale)


def _check_common(q, k, v, ndim: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=ndim)
        check_float(name, t)
    check_same_dtype(("q", "k", "v"), (q, k, v))
    check_same_device(("q", "k", "v"), (q, k, v))


def _triton_path(q: torch.Tensor) -> bool:
    """True when the Triton kernels run. Documented choice: float32/float64 always take the
    reference path (float32 math on CUDA, no tf32 kernel)."""
    return select_backend(q) == "triton" and q.dtype in (torch.float16, torch.bfloat16)


def _check_kernel_support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    from . import launch

    reason = launch.unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(
            f"the attention kernel does not support this input: {reason}. "
            "Set FLASHMOE_BACKEND=reference to run the plain-PyTorch path."
        )


# Eager inference at short sequences is host-bound (docs/attention_fwd.md, "Short sequences"):
# the checks below depend only on metadata (types, shapes, dtypes, devices, the mask flag, the
# scale argument and FLASHMOE_BACKEND), so a call whose metadata already passed them on the way
# to the direct launch skips them. Values: the softmax scale that call used.
_DIRECT: dict[tuple, float] = {}
_MAX_DIRECT = 1024


def _direct_key(q, k, v, causal, softmax_scale) -> tuple | None:
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return None
    if not q.is_cuda or type(causal) is not bool:
        return None
    if softmax_scale is not None and type(softmax_scale) is not float:
        return None
    return (
        q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
        os.environ.get("FLASHMOE_BACKEND"), causal, softmax_scale,
    )  # fmt: skip


def _remember(key: tuple | None, scale: float) -> None:
    if key is not None:  # None while compiling
        if len(_DIRECT) >= _MAX_DIRECT:
            _DIRECT.clear()
        _DIRECT[key] = scale


def flash_attention_science(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """Fused scaled-dot-product attention.

    Args:
        q: (B, H, S_q, D). k, v: (B, H_kv, S_k, D), with H % H_kv == 0 (GQA/MQA).
            Any strides with a contiguous last dim (a transposed (B, S, H, D) view is free).
        causal: bottom-right aligned mask: query i sees keys j <= i + S_k - S_q::

                S_q=2, S_k=5        S_q=5, S_k=2
                1 1 1 1 0           0 0     <- rows that see no key output 0, lse = -inf
                1 1 1 1 1           0 0
                                    0 0
                                    1 0
                                    1 1
        softmax_scale: defaults to 1/sqrt(D).
        return_lse: also return lse, float32 (B, H, S_q), natural log of the softmax
            denominator.

    Returns:
        out (B, H, S_q, D) in q's dtype, or (out, lse) when ``return_lse``.

    CUDA float16/bfloat16 runs the Triton kernels; CPU and float32/float64 run the
    reference path (float32 accumulation).
    """
    # Metadata validated by an earlier eager call that went straight to the launcher.
    key = None if torch.compiler.is_compiling() else _direct_key(q, k, v, causal, softmax_scale)
    scale = _DIRECT.get(key) if key is not None else None
    if scale is not None:
        if direct_launch_ok(q, k, v):
            from . import launch

            out, lse = launch.attention_fwd(q, k, v, causal, scale)
            return (out, lse) if return_lse else out
        if direct_autograd_ok(q, k, v):
            out, lse = autograd.EagerAttention.apply(q, k, v, causal, scale)
            return (out, lse) if return_lse else out
    _check_common(q, k, v, ndim=4)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(
            f"batch sizes must agree: q has {q.shape[0]}, k has {k.shape[0]}, v has {v.shape[0]}"
        )
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"k has seqlen {k.shape[2]} but v has {v.shape[2]}; they must match")
    _check_heads(q, k, v, head_axis=1)
    causal = check_flag("causal", causal)
    scale = _scale(softmax_scale, q.shape[-1])

    b, h, s_q, d = q.shape
    if b == 0 or s_q == 0 or k.shape[2] == 0:
        # Empty inputs: no kernel launch. With no keys, every row sees nothing -> zeros.
        out = q.new_zeros(q.shape)
        lse = torch.full((b, h, s_q), float("-inf"), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out

    use_kernel = _triton_path(q)
    if use_kernel:
        _check_kernel_support(q, k, v)
        if direct_launch_ok(q, k, v):
            # Inference: straight to the launcher (the custom op's dispatch costs ~30-170 us on
            # the host, more than a 512-token forward takes on the GPU; docs/attention_fwd.md).
            from . import launch

            out, lse = launch.attention_fwd(q, k, v, causal, scale)
            _remember(key, scale)
            return (out, lse) if return_lse else out
        if direct_autograd_ok(q, k, v):
            # Eager training: the same launchers under a plain autograd.Function (the custom
            # ops' dispatch costs host time a short-sequence step does not have).
            out, lse = autograd.EagerAttention.apply(q, k, v, causal, scale)
            _remember(key, scale)
            return (out, lse) if return_lse else out
    out, lse = autograd.attention(q, k, v, causal, scale, use_kernel)
    return (out, lse) if return_lse else out


# cu_seqlens tensors whose values passed the checks: id -> (weakref, version, total, max_seqlen).
# A model calls varlen attention once per layer with the same cu_seqlens, and the value checks
# need a host sync: they run once per tensor, and again after an in-place change through
# PyTorch (which bumps the tensor's version counter) or with another total / max_seqlen. Writes
# that bypass PyTorch (a custom kernel filling a persistent buffer) do not bump the counter:
# such a buffer is checked when first seen. Inference tensors have no version counter and are
# checked on every call.
_CU_CHECKED: dict[int, tuple] = {}
_MAX_CU_CHECKED = 256


def _cu_checked_before(cu: torch.Tensor, total: int, max_seqlen: int) -> bool:
    hit = _CU_CHECKED.get(id(cu))
    return hit is not None and hit[0]() is cu and hit[1:] == (cu._version, total, max_seqlen)


def _remember_cu(cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    if len(_CU_CHECKED) >= _MAX_CU_CHECKED:
        _CU_CHECKED.clear()
    _CU_CHECKED[id(cu)] = (weakref.ref(cu), cu._version, total, max_seqlen)


def _check_cu_values(name: str, cu: torch.Tensor, total: int, max_seqlen: int, max_name: str) -> None:
    """The value checks (one host sync)."""
    c = cu.detach().to("cpu", torch.int64)
    if c[0].item() != 0:
        raise ValueError(f"{name} must start at 0, got {c[0].item()}")
    lengths = c[1:] - c[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"{name} must be non-decreasing, got {c.tolist()}")
    if c[-1].item() != total:
        raise ValueError(f"{name} ends at {c[-1].item()} but the packed tensor has {total} tokens")
    longest = int(lengths.max().item()) if lengths.numel() else 0
    if longest > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} but {name} has a sequence of {longest}")


def _check_cu_seqlens(name: str, cu: object, total: int, max_seqlen: object, max_name: str):
    check_tensor(name, cu, ndim=1)
    check_int_tensor(name, cu, dtypes=(torch.int32,))
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have batch + 1 >= 1 entries, got shape {tuple(cu.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    capturing = cu.is_cuda and torch.cuda.is_current_stream_capturing()
    if torch.compiler.is_compiling() or capturing:
        # Value checks need the data; they are skipped while tracing or capturing a CUDA graph
        # (the metadata checks above still run). Never a sync inside the kernels.
        return
    tracked = not cu.is_inference()
    if tracked and _cu_checked_before(cu, total, max_seqlen):
        return
    _check_cu_values(name, cu, total, max_seqlen, max_name)
    if tracked:
        _remember_cu(cu, total, max_seqlen)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """Attention over packed variable-length sequences (no padding).

    Args:
        q: (T_q, H, D). k, v: (T_k, H_kv, D).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) prefix sums starting at 0; sequence i
            is rows ``cu[i]:cu[i+1]``. Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: upper bounds on the sequence lengths.
        causal, softmax_scale: as in :func:`flash_attention_science`, per sequence.

    Returns:
        out (T_q, H, D), or (out, lse) with lse float32 (H, T_q).
    """
    _check_common(q, k, v, ndim=3)
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens but v has {v.shape[0]}; they must match")
    _check_heads(q, k, v, head_axis=1)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries and cu_seqlens_k has "
            f"{cu_seqlens_k.shape[0]}; both must be batch + 1"
        )
    check_same_device(("q", "cu_seqlens_q", "cu_seqlens_k"), (q, cu_seqlens_q, cu_seqlens_k))
    causal = check_flag("causal", causal)
    scale = _scale(softmax_scale, q.shape[-1])

    if q.shape[0] == 0:
        out = q.new_zeros(q.shape)
        lse = q.new_empty((q.shape[1], 0), dtype=torch.float32)
        return (out, lse) if return_lse else out

    use_kernel = _triton_path(q)
    if use_kernel:
        _check_kernel_support(q, k, v)
    out, lse = autograd.attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, use_kernel
    )
    return (out, lse) if return_lse else out
