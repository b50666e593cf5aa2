"""TorchTitan (0.3.0) adapter: modules that slot into TorchTitan's config-built models.

TorchTitan builds every module from a nested ``Config`` dataclass. Two configs of a decoder
layer are swapped; everything else (router, shared experts, norms, RoPE, param init, FSDP2 /
DTensor sharding, checkpoint keys) stays TorchTitan's own:

- ``layer.attention.inner_attention`` -> :class:`FlashMoEVarlenAttention`. Its ``Config``
  subclasses ``VarlenAttention.Config``, so the model's ``get_attention_masks(positions)``
  builds the per-document ``VarlenMetadata`` and the layer runs ``flash_attention_varlen``
  (documents packed in a row never see each other); with ``attention_masks=None`` it runs
  ``flash_attention_science`` (causal). MLA value heads narrower than the query heads
  (DeepSeek-V3) are zero-padded and the output cropped.
- ``layer.moe.routed_experts`` -> :class:`FlashMoERoutedExperts`: TorchTitan's router output
  (top-k scores and ids) goes straight into ``fused_experts``, which replaces the token
  dispatcher (permute), ``GroupedExperts`` (three ``_grouped_mm``) and the combine
  (scatter-add). The expert weights stay in the ``inner_experts`` child as TorchTitan's
  ``w1_EFD``, ``w2_EDF``, ``w3_EFD`` (same FQNs, param init and checkpoints); ``[w1; w3]`` is
  concatenated into our ``w_gate_up`` layout on each forward (one weight-sized copy; its
  gradient is split back by autograd). Expert parallelism is not supported here (TorchTitan's
  EP lives in its token dispatcher; use ``flashmoe_science.distributed`` for ours).

``use_flashmoe(model_config)`` performs both swaps on a model config (e.g. from
``torchtitan.models.qwen3.model_registry("debugmodel_moe").model``) and returns it.

Precision: TorchTitan's ``GroupedExperts`` casts activations and weights to bfloat16 whatever
the model dtype; ``FlashMoERoutedExperts`` computes in the model dtype (bf16/fp16 take the
Triton kernels on CUDA, float32 the reference path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.attention import flash_attention_science, flash_attention_varlen
from ..ops.moe import fused_experts

try:  # Lazy in spirit: this module is only imported by users of TorchTitan.
    from torch.distributed.tensor import DTensor
    from torchtitan.models.common.attention import VarlenAttention, VarlenMetadata
    from torchtitan.models.common.moe import GroupedExperts, RoutedExperts
    from torchtitan.protocols.module import Module
except ImportError as exc:  # pragma: no cover - exercised only without torchtitan
    raise ImportError(
        "flashmoe_science.integrations.torchtitan needs torchtitan (pip install torchtitan==0.3.0)"
    ) from exc

__all__ = ["FlashMoERoutedExperts", "FlashMoEVarlenAttention", "use_flashmoe"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class FlashMoEVarlenAttention(Module):
    """TorchTitan inner attention on flashmoe_science kernels: (B, L, N, H) in and out."""

    @dataclass(kw_only=True, slots=True)
    class Config(VarlenAttention.Config):
        # window_size (from VarlenAttention.Config): only (-1, 0) causal and (-1, -1) full.
        pass

    def __init__(self, config: Config) -> None:
        super().__init__()
        if tuple(config.window_size) not in ((-1, 0), (-1, -1)):
            raise ValueError(
                f"window_size={tuple(config.window_size)} is not supported by flashmoe_science attention; "
                "expected (-1, 0) (causal) or (-1, -1) (full)"
            )
        self.causal = tuple(config.window_size) == (-1, 0)

    def forward(
        self,
        q_BLNH: torch.Tensor,
        k_BLNH: torch.Tensor,
        v_BLNH: torch.Tensor,
        *,
        attention_masks: VarlenMetadata | None = None,
        scale: float | None = None,
        out_transform=None,
        **kwargs,
    ) -> torch.Tensor:
        if out_transform is not None:
            raise ValueError("out_transform (LSE epilogue) is not supported by FlashMoEVarlenAttention")
        d_qk, d_v = q_BLNH.shape[-1], v_BLNH.shape[-1]
        if d_v < d_qk:  # MLA
            v_BLNH = F.pad(v_BLNH, (0, d_qk - d_v))
        elif d_v > d_qk:
            raise ValueError(f"value head dim {d_v} > query head dim {d_qk} is not supported")
        b, seq, n, d = q_BLNH.shape
        if attention_masks is None:
            out = flash_attention_science(
                q_BLNH.transpose(1, 2),
                k_BLNH.transpose(1, 2),
                v_BLNH.transpose(1, 2),
                causal=self.causal,
                softmax_scale=scale,
            ).transpose(1, 2)
        elif isinstance(attention_masks, VarlenMetadata):
            m = attention_masks
            out = flash_attention_varlen(
                q_BLNH.reshape(b * seq, n, d),
                k_BLNH.reshape(b * seq, -1, d),
                v_BLNH.reshape(b * seq, -1, d),
                m.cu_seq_q.to(torch.int32),
                m.cu_seq_k.to(torch.int32),
                int(m.max_q),
                int(m.max_k),
                causal=self.causal,
                softmax_scale=scale,
            ).view(b, seq, n, d)
        else:
            raise ValueError(
                f"attention_masks of type {type(attention_masks).__name__} is not supported; "
                "FlashMoEVarlenAttention takes VarlenMetadata (per-document masks) or None"
            )
        return out[..., :d_v] if d_v != d else out


class FlashMoERoutedExperts(Module):
    """Drop-in for TorchTitan's ``RoutedExperts`` (dispatch + GroupedExperts + combine)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        inner_experts: GroupedExperts.Config

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.inner_experts = config.inner_experts.build()

    def forward(
        self,
        x_BLD: torch.Tensor,
        topk_scores_BLK: torch.Tensor,
        topk_expert_ids_BLK: torch.Tensor,
        num_local_tokens_per_expert_E: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, seq, d = x_BLD.shape
        k = topk_scores_BLK.shape[-1]
        experts = self.inner_experts
        w1, w2, w3 = _local(experts.w1_EFD), _local(experts.w2_EDF), _local(experts.w3_EFD)
        w_gate_up = torch.cat([w1, w3], dim=1)  # (E, 2F, D): gate rows, then up rows
        x = _local(x_BLD).reshape(b * seq, d)
        y = fused_experts(
            x,
            w_gate_up.to(x.dtype),
            w2.to(x.dtype),
            _local(topk_scores_BLK).reshape(-1, k).to(x.dtype),
            _local(topk_expert_ids_BLK).reshape(-1, k),
        )
        return y.view(b, seq, d)

    def parallelize(self, parallel_dims) -> None:
        if parallel_dims is not None and getattr(parallel_dims, "ep_enabled", False):
            raise ValueError("FlashMoERoutedExperts does not support TorchTitan's expert parallelism")
        super().parallelize(parallel_dims)


def use_flashmoe(model_config, *, attention: bool = True, moe: bool = True):
    """Swap the inner attention and routed experts of every layer of a TorchTitan model config.

    Args:
        model_config: a ``Decoder.Config`` (e.g. ``Qwen3Model.Config``, ``DeepSeekV3Model.Config``).
        attention: replace ``layer.attention.inner_attention`` (any backend) by
            ``FlashMoEVarlenAttention.Config()`` (causal, per-document masks).
        moe: replace ``layer.moe.routed_experts`` by ``FlashMoERoutedExperts.Config`` with the same
            ``inner_experts`` config.

    Returns:
        ``model_config``, modified in place.
    """
    for layer in model_config.layers:
        attn = getattr(layer, "attention", None)
        if attention and attn is not None and hasattr(attn, "inner_attention"):
            window = getattr(attn.inner_attention, "window_size", (-1, 0))
            attn.inner_attention = FlashMoEVarlenAttention.Config(window_size=window)
        moe_cfg = getattr(layer, "moe", None)
        if moe and moe_cfg is not None:
            routed = moe_cfg.routed_experts
            if not isinstance(routed, (RoutedExperts.Config, FlashMoERoutedExperts.Config)):
                raise ValueError(f"unexpected routed_experts config {type(routed).__name__}")
            moe_cfg.routed_experts = FlashMoERoutedExperts.Config(inner_experts=routed.inner_experts)
    return model_config
