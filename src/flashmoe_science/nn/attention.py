"""``FlashMoEScienceAttention``: a drop-in for ``nn.MultiheadAttention(batch_first=True)``.

Parameter names follow ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
``out_proj``), so its state dict loads as is when ``num_kv_heads`` is None. With GQA the
packed ``in_proj_weight`` is (E + 2 * H_kv * D, E): q rows, then k rows, then v rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_flag, check_tensor
from ..ops.attention import flash_attention_science, flash_attention_varlen


class FlashMoEScienceAttention(nn.Module):
    """Multi-head attention over the fused kernels (GQA through ``num_kv_heads``).

    ``forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
    is_causal=False) -> (out, None)``, as ``nn.MultiheadAttention``.

    - ``key_padding_mask`` (B, S_k) bool, True = ignore that key: keys are packed and run
      through the varlen kernel, so padded keys cost nothing. Rows whose keys are all
      padded output the projection of zeros (MHA returns NaN there).
    - ``is_causal=True`` uses the causal kernel (and, as in MHA, treats ``attn_mask`` as
      that causal mask).
    - Any other ``attn_mask`` (bool or float, (S_q, S_k) or (B*H, S_q, S_k)), and causal
      combined with ``key_padding_mask``, run the reference path through PyTorch's SDPA.
    - ``need_weights=True`` is not supported: the fused kernels never form the weights.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        bias: bool = True,
        batch_first: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be a positive multiple of num_heads={num_heads}")
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if kv <= 0 or num_heads % kv != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={kv}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = kv
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self._kv_dim = kv * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(embed_dim + 2 * self._kv_dim, embed_dim, **factory))
        self.in_proj_bias = (
            nn.Parameter(torch.empty(embed_dim + 2 * self._kv_dim, **factory)) if bias else None
        )
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # As nn.MultiheadAttention: xavier-uniform packed projection, zero biases.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, batch_first={self.batch_first}"
        )

    def _check_inputs(self, query, key, value) -> None:
        """nn.MultiheadAttention's input contract, with errors naming the argument."""
        order = "(batch, seq, embed)" if self.batch_first else "(seq, batch, embed)"
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_tensor(name, t)
            if t.dim() != 3:
                raise ValueError(f"{name} must be 3-D {order}, got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
            if t.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} has embed dim {t.shape[-1]}; expected embed_dim={self.embed_dim}")
        if key.shape != value.shape:
            raise ValueError(
                f"key has shape {tuple(key.shape)} but value has {tuple(value.shape)}; they must match"
            )
        batch_axis = 0 if self.batch_first else 1
        if key.shape[batch_axis] != query.shape[batch_axis]:
            q_b, k_b = query.shape[batch_axis], key.shape[batch_axis]
            raise ValueError(f"query has batch {q_b} but key has {k_b}; they must match")

    def _project(self, query, key, value):
        e, kvd = self.embed_dim, self._kv_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:
            qkv = F.linear(query, w, b)
            return qkv.split((e, kvd, kvd), dim=-1)
        wq, wk, wv = w.split((e, kvd, kvd), dim=0)
        bq, bk, bv = b.split((e, kvd, kvd), dim=0) if b is not None else (None, None, None)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError(
                "need_weights=True is not supported: the fused kernels never materialise the "
                "attention weights; pass need_weights=False"
            )
        self._check_inputs(query, key, value)
        is_causal = check_flag("is_causal", is_causal)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, s_q, _ = query.shape
        s_k = key.shape[1]
        if attn_mask is not None and not is_causal:
            check_tensor("attn_mask", attn_mask)
            allowed = ((s_q, s_k), (b * self.num_heads, s_q, s_k))
            if tuple(attn_mask.shape) not in allowed:
                raise ValueError(
                    f"attn_mask has shape {tuple(attn_mask.shape)}; expected {allowed[0]} or {allowed[1]}"
                )
        q, k, v = self._project(query, key, value)
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = q.view(b, s_q, h, d)
        k = k.view(b, s_k, h_kv, d)
        v = v.view(b, s_k, h_kv, d)

        if key_padding_mask is not None:
            if key_padding_mask.shape != (b, s_k):
                raise ValueError(
                    f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected {(b, s_k)}"
                )
            if not key_padding_mask.is_floating_point():
                key_padding_mask = key_padding_mask.bool()

        float_padding = key_padding_mask is not None and key_padding_mask.is_floating_point()
        if float_padding:
            # A float key_padding_mask is an additive bias (MHA semantics): reference path.
            out = self._sdpa(q, k, v, None if is_causal else attn_mask, key_padding_mask, is_causal)
        elif is_causal or attn_mask is None:
            causal = is_causal
            if key_padding_mask is None:
                out = flash_attention_science(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
                ).transpose(1, 2)
            elif not causal:
                out = self._padded_varlen(q, k, v, key_padding_mask)
            else:
                out = self._sdpa(q, k, v, None, key_padding_mask, causal=True)
        else:
            out = self._sdpa(q, k, v, attn_mask, key_padding_mask, causal=False)

        out = self.out_proj(out.reshape(b, s_q, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _padded_varlen(self, q, k, v, key_padding_mask):
        """All queries against the unpadded keys of their own row, through the varlen kernel."""
        b, s_q, h, d = q.shape
        keep = ~key_padding_mask
        lengths_k = keep.sum(dim=1, dtype=torch.int32)
        cu_k = F.pad(torch.cumsum(lengths_k, 0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32, device=q.device)
        k_packed = k[keep]
        v_packed = v[keep]
        max_k = int(lengths_k.max()) if b > 0 else 0
        out = flash_attention_varlen(q.reshape(b * s_q, h, d), k_packed, v_packed, cu_q, cu_k, s_q, max_k)
        return out.view(b, s_q, h, d)

    def _sdpa(self, q, k, v, attn_mask, key_padding_mask, causal):
        """Reference path for arbitrary masks (PyTorch SDPA, math in the input dtype)."""
        b, s_q, h, d = q.shape
        s_k = k.shape[1]
        mask = None
        if attn_mask is not None:
            mask = attn_mask
            if mask.dim() == 3:
                mask = mask.view(b, h, s_q, s_k)
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                    mask, float("-inf")
                )
        if causal:
            hide = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(1 + s_k - s_q)
            causal_bias = torch.zeros(s_q, s_k, dtype=q.dtype, device=q.device).masked_fill(
                hide, float("-inf")
            )
            mask = causal_bias if mask is None else mask + causal_bias
        if key_padding_mask is not None:
            if key_padding_mask.is_floating_point():
                pad = key_padding_mask.to(q.dtype).view(b, 1, 1, s_k)
            else:
                pad = torch.zeros(b, 1, 1, s_k, dtype=q.dtype, device=q.device).masked_fill(
                    key_padding_mask.view(b, 1, 1, s_k), float("-inf")
                )
            mask = pad if mask is None else mask + pad
        g = h // self.num_kv_heads
        kt = k.transpose(1, 2).repeat_interleave(g, dim=1) if g > 1 else k.transpose(1, 2)
        vt = v.transpose(1, 2).repeat_interleave(g, dim=1) if g > 1 else v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, attn_mask=mask)
        # Rows that see no key give NaN in SDPA; this layer's convention is zeros.
        return torch.nan_to_num(out.transpose(1, 2), nan=0.0)

    def forward_packed(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *, causal: bool = False
    ) -> torch.Tensor:
        """Self-attention over packed sequences: x (T, E), ``cu_seqlens`` int32 (B + 1,).
        Returns (T, E). Nothing is padded: this is the path for variable-size structures."""
        t = x.shape[0]
        q, k, v = self._project(x, x, x)
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        out = flash_attention_varlen(
            q.view(t, h, d),
            k.view(t, h_kv, d),
            v.view(t, h_kv, d),
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            causal=causal,
        )
        return self.out_proj(out.reshape(t, self.embed_dim))


__all__ = ["FlashMoEScienceAttention"]
