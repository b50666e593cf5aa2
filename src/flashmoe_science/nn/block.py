"""``FlashMoETransformerBlock``: pre-norm attention + MoE feed-forward, both residual."""

from __future__ import annotations

import torch
from torch import nn

from .attention import FlashMoEScienceAttention
from .moe import FlashMoELayer


class FlashMoETransformerBlock(nn.Module):
    """``x + attn(norm(x))`` then ``x + moe(norm(x))``; ``aux_loss`` is the MoE layer's.

    ``forward(x, key_padding_mask=None, is_causal=False)`` on (B, S, E);
    ``forward_packed(x, cu_seqlens, max_seqlen)`` on packed (T, E) sequences (no padding).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_experts: int,
        top_k: int = 2,
        ffn_hidden_size: int | None = None,
        *,
        num_kv_heads: int | None = None,
        num_shared_experts: int = 0,
        scoring: str = "softmax",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(embed_dim, **factory)
        self.attn = FlashMoEScienceAttention(embed_dim, num_heads, num_kv_heads, **factory)
        self.norm2 = nn.LayerNorm(embed_dim, **factory)
        self.moe = FlashMoELayer(
            embed_dim,
            num_experts,
            top_k,
            ffn_hidden_size,
            scoring=scoring,
            num_shared_experts=num_shared_experts,
            **factory,
        )

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return self.moe.aux_loss

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=key_padding_mask, is_causal=is_causal)[0]
        return x + self.moe(self.norm2(x))

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x = x + self.attn.forward_packed(self.norm1(x), cu_seqlens, max_seqlen)
        return x + self.moe(self.norm2(x))
