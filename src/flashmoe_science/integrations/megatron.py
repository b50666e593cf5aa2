"""Megatron-Core (0.16) adapter: ModuleSpec submodules.

- :class:`FlashMoECoreAttention` for ``SelfAttentionSubmodules.core_attention`` (the slot of
  ``DotProductAttention`` / ``TEDotProductAttention``). Inputs [s, b, heads, d] as Megatron
  passes them; GQA native (no ``repeat_interleave``). Masks follow Transformer Engine's
  convention: ``attn_mask_type=causal`` runs the causal kernel and ignores ``attention_mask``
  (Megatron passes the causal mask there); ``no_mask`` runs the dense kernel; any other type
  with a mask (True = masked out, as in Megatron) runs PyTorch SDPA (reference path, not the
  kernel). Attention dropout > 0, ``attention_bias`` and packed (THD) sequences raise.
- :class:`FlashMoEExperts` for ``MoESubmodules.experts`` (the slot of ``SequentialMLP`` /
  ``TEGroupedMLP``): Megatron's router and token dispatcher stay; the experts take the
  dispatched rows (grouped by expert) and their probabilities and run one ``fused_experts``
  call with top-1 ids ``repeat_interleave(arange(E), tokens_per_expert)``. SwiGLU experts
  without bias only (``gated_linear_unit=True``, ``add_bias_linear=False``, silu).
  Weights in this library's layout: ``w_gate_up`` (E, 2F, H), ``w_down`` (E, H, F);
  :meth:`FlashMoEExperts.load_sequential_mlp` copies them from a ``SequentialMLP``. With
  expert parallelism it holds the local experts (untested: the CPU test runs world size 1).

``flashmoe_layer_spec(spec)`` returns a copy of a GPT layer ModuleSpec (e.g.
``get_gpt_layer_local_spec(num_experts=...)``) with both slots replaced.

Megatron-Core 0.16.1 on a CPU-only machine needs these patches *for its own modules*, not for
ours (seen 2026-11-25; tests/test_integrations_megatron.py applies them): ``DotProductAttention``
allocates its score buffer with ``torch.cuda.current_device()`` and forks the CUDA RNG tracker;
``get_default_causal_mask`` allocates on ``"cuda"`` (pass an explicit mask); the ``alltoall``
token dispatcher creates a ``torch.cuda.Stream`` (use ``allgather``); ``moe_utils`` references
``te_general_gemm``, undefined without Transformer Engine (set it to None). The last one also
affects Megatron's router, which this adapter keeps.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ..ops.attention import flash_attention_science
from ..ops.moe import fused_experts

try:
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import ModuleSpec
except ImportError as exc:  # pragma: no cover - exercised only without megatron-core
    raise ImportError(
        "flashmoe_science.integrations.megatron needs megatron-core (pip install megatron-core==0.16.1)"
    ) from exc

__all__ = ["FlashMoECoreAttention", "FlashMoEExperts", "flashmoe_layer_spec"]


class FlashMoECoreAttention(MegatronModule):
    """Core attention slot: (query [s_q, b, h, d], key/value [s_k, b, h_kv, d]) -> [s_q, b, h * d]."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"FlashMoECoreAttention has no attention dropout (got {dropout}); set it to 0")
        if config.context_parallel_size > 1:
            raise ValueError("FlashMoECoreAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.layer_number = layer_number
        kv_channels = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed sequences (THD) are not supported by FlashMoECoreAttention yet")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by FlashMoECoreAttention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]: a view, the kernels take any strides with a unit last dim.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if mask_type == AttnMaskType.causal or (mask_type == AttnMaskType.no_mask or attention_mask is None):
            out = flash_attention_science(
                q, k, v, causal=mask_type == AttnMaskType.causal, softmax_scale=self.softmax_scale
            )
        else:
            groups = q.shape[1] // k.shape[1]
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask.bool(), scale=self.softmax_scale
            )
            out = torch.nan_to_num(out, nan=0.0)
        s_q, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s_q, b, -1)


class FlashMoEExperts(MegatronModule):
    """Experts slot: ``forward(permuted_hidden [R, H], tokens_per_expert [E], permuted_probs [R])``
    -> ``(output [R, H], None)``, rows grouped by expert as Megatron's dispatcher leaves them."""

    def __init__(self, num_local_experts: int, config, pg_collection=None) -> None:
        super().__init__(config=config)
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("FlashMoEExperts computes SwiGLU experts: needs gated_linear_unit=True, silu")
        if config.add_bias_linear:
            raise ValueError("FlashMoEExperts has no expert biases: needs add_bias_linear=False")
        if getattr(config, "moe_apply_probs_on_input", False):
            raise ValueError("moe_apply_probs_on_input is not supported by FlashMoEExperts")
        ep = getattr(config, "expert_model_parallel_size", 1)
        tp = getattr(config, "expert_tensor_parallel_size", None) or 1
        if tp > 1:
            raise ValueError("FlashMoEExperts does not shard experts over tensor parallelism")
        self.num_local_experts = num_local_experts
        self.expert_parallel_size = ep
        hidden = config.hidden_size
        ffn = config.moe_ffn_hidden_size
        dev = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        factory = {"device": dev, "dtype": config.params_dtype}
        self.w_gate_up = torch.nn.Parameter(torch.empty(num_local_experts, 2 * ffn, hidden, **factory))
        self.w_down = torch.nn.Parameter(torch.empty(num_local_experts, hidden, ffn, **factory))
        if config.perform_initialization:
            for e in range(num_local_experts):
                config.init_method(self.w_gate_up.data[e])
                config.output_layer_init_method(self.w_down.data[e])
        for p in (self.w_gate_up, self.w_down):
            # As Megatron's GroupedMLP: under expert parallelism the expert-DP group reduces these.
            p.allreduce = not ep > 1

    def forward(self, permuted_hidden: torch.Tensor, tokens_per_expert, permuted_probs: torch.Tensor):
        counts = torch.as_tensor(tokens_per_expert, device=permuted_hidden.device).long()
        rows = permuted_hidden.shape[0]
        ids = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=permuted_hidden.device), counts, output_size=rows
        )
        out = fused_experts(
            permuted_hidden,
            self.w_gate_up,
            self.w_down,
            permuted_probs.reshape(rows, 1).to(permuted_hidden.dtype),
            ids.to(torch.int32).reshape(rows, 1),
        )
        return out, None

    @torch.no_grad()
    def load_sequential_mlp(self, mlp) -> FlashMoEExperts:
        """Copy the weights of a Megatron ``SequentialMLP`` (linear_fc1 rows: gate, then up)."""
        for e, expert in enumerate(mlp.local_experts):
            self.w_gate_up[e].copy_(expert.linear_fc1.weight)
            self.w_down[e].copy_(expert.linear_fc2.weight)
        return self


def flashmoe_layer_spec(layer_spec: ModuleSpec, *, attention: bool = True, moe: bool = True) -> ModuleSpec:
    """Copy of a Megatron GPT layer spec with core attention and/or MoE experts swapped."""
    spec = copy.deepcopy(layer_spec)
    sub = spec.submodules
    if attention:
        sub.self_attention.submodules.core_attention = FlashMoECoreAttention
    if moe:
        mlp = sub.mlp
        if not hasattr(getattr(mlp, "submodules", None), "experts"):
            raise ValueError("the layer spec has no MoE experts slot (mlp.submodules.experts)")
        mlp.submodules.experts = ModuleSpec(module=FlashMoEExperts)
    return spec
