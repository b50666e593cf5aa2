"""Attention implementations measured side by side.

* ``flashmoe``: this library's public ``flash_attention_science`` with
  ``FLASHMOE_BACKEND=triton`` (CUDA only: never a reference number under this name).
* ``sdpa_flash``: ``F.scaled_dot_product_attention`` under
  ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` (FlashAttention-2 inside PyTorch).
* ``sdpa_cudnn``: the same under ``SDPBackend.CUDNN_ATTENTION`` (PyTorch's default on H100).
* ``flex``: ``torch.compile(flex_attention)``, causal through a block mask made once,
  outside the timed region.
* ``reference``: ``flash_attention_science`` with ``FLASHMOE_BACKEND=reference`` (the
  plain-PyTorch path: float32 scores, the math baseline).

GQA: ``enable_gqa=True`` for SDPA and flex (K/V never repeated). SDPA's ``is_causal`` is
top-left aligned when S_q != S_k while the contract is bottom-right, so the SDPA peers
report such cases as unsupported.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from ..cases.attention import REFERENCE_PEAK_SCORES, AttentionCase, memory_budget, score_bytes
from ..harness import Built, Data, Unavailable, Unsupported, op_kind
from ._common import forced_backend, wrap_op

IMPLS = ("flashmoe", "sdpa_flash", "sdpa_cudnn", "flex", "reference")
_LEAVES = ("q", "k", "v")


def _device(data: Data) -> torch.device:
    return data.sets[0]["q"].device


def _library(backend: str, case: AttentionCase):
    from flashmoe_science import flash_attention_science

    def forward(s: dict[str, Any]) -> torch.Tensor:
        with forced_backend(backend):
            return flash_attention_science(s["q"], s["k"], s["v"], causal=case.causal)

    return forward


def _sdpa(backend_name: str, op: str, case: AttentionCase, data: Data):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if case.causal and case.seqlen_q != case.seqlen_k:
        raise Unsupported(
            "SDPA's is_causal is top-left aligned when seqlen_q != seqlen_k; the contract is bottom-right"
        )
    backend = getattr(SDPBackend, backend_name)
    kwargs = {"is_causal": case.causal, "enable_gqa": case.gqa}

    def forward(s: dict[str, Any]) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(s["q"], s["k"], s["v"], **kwargs)

    # Probe once (with the backward for the backward ops): SDPA refuses unsupported inputs
    # with "No available kernel" and explains why in warnings; record that reason instead
    # of a bare failure.
    s = data.sets[0]
    grad = op_kind(op) != "fwd"
    with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(grad):
        warnings.simplefilter("always")
        try:
            probe = {k: s[k].detach().requires_grad_(grad) for k in _LEAVES}
            out = forward(probe)
            if grad:
                out.backward(s["do"])
        except RuntimeError as exc:
            if not any(m in str(exc) for m in ("No available kernel", "No viable backend")):
                raise
            reasons = "; ".join(str(w.message).split("\n")[0] for w in caught[:3])
            raise Unsupported(f"SDPA {backend_name}: no available kernel ({reasons})") from None
    return forward


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # One compiled graph per (shape, mask, grad mode): a full suite exceeds dynamo's default
    # recompile limit (8), past which flex would silently run eager (materialised scores).
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    return torch.compile(flex_attention, dynamic=False)


def _flex(case: AttentionCase, data: Data):
    from torch.nn.attention.flex_attention import create_block_mask

    compiled = _compiled_flex()
    block_mask = None
    if case.causal:
        offset = case.seqlen_k - case.seqlen_q  # bottom-right alignment

        def causal_mask(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        block_mask = create_block_mask(
            causal_mask, B=None, H=None, Q_LEN=case.seqlen_q, KV_LEN=case.seqlen_k, device=_device(data)
        )
    gqa = case.gqa

    def forward(s: dict[str, Any]) -> torch.Tensor:
        return compiled(s["q"], s["k"], s["v"], block_mask=block_mask, enable_gqa=gqa)

    return forward


def build(impl: str, op: str, case: AttentionCase, data: Data) -> Built:
    device = _device(data)
    if impl == "flashmoe":
        if device.type != "cuda":
            raise Unavailable("flashmoe runs its Triton kernels on CUDA only")
        forward = _library("triton", case)
    elif impl == "reference":
        need = REFERENCE_PEAK_SCORES[op] * score_bytes(case)
        budget = memory_budget(device, 0.6)
        if need > budget:
            raise Unsupported(
                f"the reference path would hold ~{need / 2**30:.0f} GiB of float32 scores "
                f"(> {budget / 2**30:.0f} GiB available)"
            )
        forward = _library("reference", case)
    elif impl == "sdpa_flash":
        forward = _sdpa("FLASH_ATTENTION", op, case, data)
    elif impl == "sdpa_cudnn":
        forward = _sdpa("CUDNN_ATTENTION", op, case, data)
    elif impl == "flex":
        forward = _flex(case, data)
    else:
        raise ValueError(f"unknown attention impl {impl!r}; known: {IMPLS}")
    return Built(fn=wrap_op(op, forward, data, _LEAVES, "do"))
