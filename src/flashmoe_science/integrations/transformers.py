"""Hugging Face transformers (5.x) adapter: attention through ``AttentionInterface``, sparse-MoE
blocks through the fused MoE ops. Adapters only; all numerics live in ``flashmoe_science.ops``.

``apply(model)`` switches a loaded model in place and returns it; ``undo(model)`` switches it back.

Attention (name ``"fmsci"`` in ``AttentionInterface`` and ``AttentionMaskInterface``):

- no mask (no padding): ``flash_attention_science`` on the (B, H, S, D) tensors transformers
  already has (GQA native, no ``repeat_kv``); causal masks are bottom-right aligned, the
  flash-attn convention, which is what decoding with a KV cache needs.
- padded batches: the mask function hands over the 2-D padding mask (as for flash_attention_2),
  queries and keys are packed and run through ``flash_attention_varlen``: padded tokens cost
  nothing. As in transformers' flash-attention path, when S_q differs from S_k and S_q > 1 the
  padding of the queries is read from the last S_q mask columns (left padding).
- any other mask pattern (sliding windows, packed sequences detected from ``position_ids``,
  ``or``/``and`` overlays, bidirectional configs, a user's 4-D mask) arrives as a 4-D mask and
  runs through PyTorch's SDPA in the input dtype, the reference path of
  ``FlashMoEScienceAttention`` for arbitrary masks. ``cu_seq_lens_*`` / ``max_length_*`` kwargs
  (padding-free training) run the varlen kernel.
- MLA value heads narrower than the query heads (DeepSeek-V3) are zero-padded to the query
  head dim and the output is cropped, as transformers' flash-attention path does.
- not supported, raising ``ValueError``: attention dropout > 0, ``softcap``, attention sinks
  (``s_aux``), paged caches, ``output_attentions`` weights (``None`` is returned for them).

Sparse-MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3): each block is replaced by a
:class:`FlashMoESparseBlock` that keeps the original ``gate`` (router), ``experts`` and shared-
expert modules as its children (the same objects: no copy, same state-dict keys, so
``save_pretrained`` and optimisers see the original parameters) and computes

    router_logits = gate(x)[0]                 # the model's own router logits
    weights, ids  = route(router_logits, ...)  # the model's routing rule, see _ROUTERS
    y = fused_experts(x, experts.gate_up_proj, experts.down_proj, weights, ids) [+ shared]

Routers: Mixtral softmax top-k renormalised; Qwen2/Qwen3-MoE softmax top-k renormalised iff
``norm_topk_prob``; Qwen2-MoE adds ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``;
DeepSeek-V3 sigmoid scores, ``e_score_correction_bias`` for selection only, group-limited
(``n_group``/``topk_group``), renormalised iff ``norm_topk_prob``, times
``routed_scaling_factor``, plus ``shared_experts(x)``. The router module still runs (its logits
feed ``output_router_logits`` and transformers' load-balancing loss); its own top-k is
recomputed by ``route``, an O(T * E) cost next to the experts' O(T * K * H * F).

``register()`` also adds ``"fmsci"`` to ``ExpertsInterface``, so
``from_pretrained(..., experts_implementation="fmsci")`` runs only the experts through
``fused_experts`` and keeps the model's own router.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import flash_attention_science, flash_attention_varlen
from ..ops.moe import fused_experts, route

# Not "flashmoe_science": transformers treats every attention name containing "flash" as a
# flash-attention build and tries to load it from the hub (utils.generic.is_flash_attention_requested).
NAME = "fmsci"

__all__ = [
    "NAME",
    "FlashMoESparseBlock",
    "apply",
    "flashmoe_attention_forward",
    "flashmoe_experts_forward",
    "flashmoe_mask",
    "register",
    "undo",
]


# ------------------------------------------------------------------------------------ attention
def flashmoe_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """``AttentionMaskInterface`` entry: ``None`` or a (B, L) bool padding mask for plain causal
    masks (as flash_attention_2 gets), a 4-D bool mask for every other pattern."""
    from transformers.masking_utils import causal_mask_function, flash_attention_mask, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    if mask_function is causal_mask_function:
        return flash_attention_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask
        )
    kwargs["allow_is_causal_skip"] = False
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(
        batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs
    )


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"attn_implementation={NAME!r} does not support {what}; use attn_implementation='sdpa' "
        "for this model, or call flashmoe_science.integrations.transformers.apply(model, attention=False)"
    )


def flashmoe_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    cache=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry. query (B, H, S_q, D), key/value (B, H_kv, S_k, D[_v]);
    returns ((B, S_q, H, D_v), None) like every transformers attention function."""
    if dropout:
        raise _unsupported(f"attention dropout (got dropout={dropout}); set config.attention_dropout=0")
    if softcap is not None:
        raise _unsupported("logit soft-capping (softcap)")
    if s_aux is not None:
        raise _unsupported("attention sinks (s_aux)")
    if cache is not None:
        raise _unsupported("paged attention caches (continuous batching)")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))

    d_qk, d_v = query.shape[-1], value.shape[-1]
    if d_v < d_qk:  # MLA: pad the value heads, crop the output
        value = F.pad(value, (0, d_qk - d_v))
    elif d_v > d_qk:
        query, key = F.pad(query, (0, d_v - d_qk)), F.pad(key, (0, d_v - d_qk))
    if scaling is None:
        scaling = d_qk**-0.5

    varlen_names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    varlen_kwargs = [kwargs.get(n) for n in varlen_names]
    if all(v is not None for v in varlen_kwargs):
        out = _padding_free(query, key, value, *varlen_kwargs, causal, scaling)
    elif attention_mask is None:
        out = flash_attention_science(
            query, key, value, causal=causal and query.shape[2] > 1, softmax_scale=scaling
        ).transpose(1, 2)
    elif attention_mask.dim() == 2:
        out = _padded(query, key, value, attention_mask, causal, scaling)
    elif attention_mask.dim() == 4:
        out = _sdpa_masked(query, key, value, attention_mask, scaling)
    else:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected None, (batch, kv_len) or "
            "(batch, 1 or heads, q_len, kv_len)"
        )
    if out.shape[-1] != d_v:
        out = out[..., :d_v]
    return out, None


def _padding_free(query, key, value, cu_q, cu_k, max_q, max_k, causal, scaling):
    """Sequences packed along the sequence axis of a batch of 1 (DataCollatorWithFlattening)."""
    b, h, s_q, d = query.shape
    q = query.transpose(1, 2).reshape(b * s_q, h, d)
    k = key.transpose(1, 2).reshape(-1, key.shape[1], d)
    v = value.transpose(1, 2).reshape(-1, value.shape[1], d)
    out = flash_attention_varlen(
        q,
        k,
        v,
        cu_q.to(torch.int32),
        cu_k.to(torch.int32),
        int(max_q),
        int(max_k),
        causal=causal,
        softmax_scale=scaling,
    )
    return out.view(b, s_q, h, d)


def _padded(query, key, value, mask, causal, scaling):
    """(B, L) padding mask (True = token): pack the real tokens, run the varlen kernel, scatter back.
    Padded query rows come back as zeros."""
    mask = mask.bool()
    b, h, s_q, d = query.shape
    h_kv = key.shape[1]
    length = mask.shape[1]
    if key.shape[2] > length:  # static cache: slots past the mask are unwritten
        key, value = key[:, :, :length], value[:, :, :length]
    if key.shape[2] != length:
        raise ValueError(f"the padding mask covers {length} keys but the keys have length {key.shape[2]}")
    if s_q == length:
        q_mask = mask
    elif s_q == 1:
        q_mask = torch.ones(b, 1, dtype=torch.bool, device=mask.device)
    else:
        q_mask = mask[:, -s_q:]  # queries are the last S_q positions (left padding)

    def pack(m):
        lengths = m.sum(dim=1, dtype=torch.int32)
        cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        return m.reshape(-1).nonzero().squeeze(1), cu, int(lengths.max()) if b else 0

    keep_k, cu_k, max_k = pack(mask)
    keep_q, cu_q, max_q = pack(q_mask)
    k = key.transpose(1, 2).reshape(b * length, h_kv, d).index_select(0, keep_k)
    v = value.transpose(1, 2).reshape(b * length, h_kv, d).index_select(0, keep_k)
    q = query.transpose(1, 2).reshape(b * s_q, h, d).index_select(0, keep_q)
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scaling)
    full = out.new_zeros((b * s_q, h, d)).index_copy(0, keep_q, out)
    return full.view(b, s_q, h, d)


def _sdpa_masked(query, key, value, mask, scaling):
    """Arbitrary 4-D masks: PyTorch SDPA in the input dtype (reference path, not the kernel)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    # Rows that see no key: NaN in SDPA; zeros here as in FlashMoEScienceAttention.
    return torch.nan_to_num(out, nan=0.0).transpose(1, 2)


# ------------------------------------------------------------------------------------ experts
def _check_experts_module(experts: nn.Module) -> str:
    """Our fused experts compute down(act(gate x) * up x) with [gate; up] rows: check the module agrees.
    Returns the activation name of ``fused_experts``."""
    flags = {
        "has_gate": True,
        "has_bias": False,
        "is_transposed": False,
        "is_concatenated": True,
        "has_post_expert_norm": False,
    }
    for flag, want in flags.items():
        got = getattr(experts, flag, want)
        if got != want:
            raise ValueError(
                f"{type(experts).__name__}.{flag}={got}; the flashmoe_science experts need {flag}={want}"
            )
    for name in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, name, None), torch.Tensor):
            raise ValueError(f"{type(experts).__name__} has no 3-D {name} weight")
    act = getattr(getattr(experts, "config", None), "hidden_act", None)
    if act is None:
        act = _act_name_from_module(getattr(experts, "act_fn", None))
    if act in ("silu", "swish"):
        return "silu"
    if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return "gelu"
    raise ValueError(f"{type(experts).__name__} uses activation {act!r}; supported: silu, tanh-gelu")


def _act_name_from_module(act_fn) -> str | None:
    if isinstance(act_fn, nn.SiLU):
        return "silu"
    return type(act_fn).__name__ if act_fn is not None else None


def flashmoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``ExpertsInterface`` entry (the model's router, our fused experts)."""
    activation = _check_experts_module(self)
    if getattr(self, "_is_expert_parallel", False):
        raise ValueError(f"experts_implementation={NAME!r} does not support transformers' expert parallelism")
    return fused_experts(
        hidden_states,
        self.gate_up_proj,
        self.down_proj,
        top_k_weights.to(hidden_states.dtype),
        top_k_index,
        activation=activation,
    )


class FlashMoESparseBlock(nn.Module):
    """A transformers sparse-MoE block running on ``route`` + ``fused_experts``.

    Children are the original block's modules (``gate``, ``experts`` and, where the model has
    them, ``shared_expert`` + ``shared_expert_gate`` or ``shared_experts``): the parameters and
    state-dict keys are those of the original block.
    """

    def __init__(
        self,
        original: nn.Module,
        *,
        scoring: str,
        renormalize: bool,
        top_k: int,
        n_group: int | None = None,
        topk_group: int | None = None,
        scaling_factor: float = 1.0,
        jitter_noise: float = 0.0,
        gated_shared_expert: bool = False,
    ) -> None:
        super().__init__()
        self.gate = original.gate
        self.experts = original.experts
        self.activation = _check_experts_module(self.experts)
        self.scoring = scoring
        self.renormalize = renormalize
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.scaling_factor = float(scaling_factor)
        self.jitter_noise = float(jitter_noise)
        self.gated_shared_expert = gated_shared_expert
        for name in ("shared_expert", "shared_expert_gate", "shared_experts"):
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        # Kept outside the module tree (no duplicate state-dict entries) for ``undo``.
        object.__setattr__(self, "_original", original)

    def extra_repr(self) -> str:
        return (
            f"scoring={self.scoring!r}, top_k={self.top_k}, renormalize={self.renormalize}, "
            f"n_group={self.n_group}, topk_group={self.topk_group}, scaling_factor={self.scaling_factor}"
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.training and self.jitter_noise > 0:  # Mixtral's router jitter, as in transformers
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        router_logits = self.gate(x)[0]
        bias = getattr(self.gate, "e_score_correction_bias", None) if self.scoring == "sigmoid" else None
        weights, ids = route(
            router_logits,
            self.top_k,
            scoring=self.scoring,
            renormalize=self.renormalize,
            bias=bias,
            n_group=self.n_group,
            topk_group=self.topk_group,
        )
        if self.scaling_factor != 1.0:
            weights = weights * self.scaling_factor
        y = fused_experts(
            x,
            self.experts.gate_up_proj,
            self.experts.down_proj,
            weights.to(x.dtype),
            ids,
            activation=self.activation,
        )
        if self.gated_shared_expert:  # Qwen2-MoE
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif hasattr(self, "shared_experts"):  # DeepSeek-V3
            y = y + self.shared_experts(x)
        return y.reshape(shape)


def _mixtral(block, config):
    return dict(
        scoring="softmax",
        renormalize=True,
        top_k=config.num_experts_per_tok,
        jitter_noise=getattr(config, "router_jitter_noise", 0.0) or 0.0,
    )


def _qwen3(block, config):
    return dict(scoring="softmax", renormalize=bool(config.norm_topk_prob), top_k=config.num_experts_per_tok)


def _qwen2(block, config):
    return dict(_qwen3(block, config), gated_shared_expert=True)


def _deepseek_v3(block, config):
    n_group, topk_group = int(config.n_group), int(config.topk_group)
    experts = config.n_routed_experts
    if experts // n_group < 2:
        # transformers takes the top-2 of each group: it needs at least 2 experts per group.
        raise ValueError(f"DeepSeek-V3 routing needs >= 2 experts per group, got {experts}/{n_group}")
    return dict(
        scoring="sigmoid",
        renormalize=bool(config.norm_topk_prob),
        top_k=config.num_experts_per_tok,
        # n_group=1 (one group holds every expert) is the same as no group limit.
        n_group=n_group if n_group > 1 else None,
        topk_group=topk_group if n_group > 1 else None,
        scaling_factor=float(config.routed_scaling_factor),
    )


# Block class name -> routing rule. Checked against transformers 5.23's modeling files.
_ROUTERS = {
    "MixtralSparseMoeBlock": _mixtral,
    "Qwen2MoeSparseMoeBlock": _qwen2,
    "Qwen3MoeSparseMoeBlock": _qwen3,
    "DeepseekV3MoE": _deepseek_v3,
}


def _looks_like_moe_block(module: nn.Module) -> bool:
    return hasattr(module, "gate") and isinstance(getattr(module, "experts", None), nn.Module)


# ------------------------------------------------------------------------------------ entry points
def register() -> None:
    """Register ``"fmsci"`` with transformers' attention, mask and experts interfaces
    (idempotent). ``apply`` calls it."""
    from transformers import AttentionInterface
    from transformers.integrations.moe import ExpertsInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, flashmoe_attention_forward)
    AttentionMaskInterface.register(NAME, flashmoe_mask)
    ExpertsInterface.register(NAME, flashmoe_experts_forward)


def apply(model: nn.Module, *, attention: bool = True, moe: bool = True) -> nn.Module:
    """Switch a transformers model's attention and sparse-MoE blocks to flashmoe_science, in place.

    Args:
        model: a ``PreTrainedModel`` (e.g. ``MixtralForCausalLM``), weights already loaded.
        attention: set ``attn_implementation="fmsci"``.
        moe: replace every sparse-MoE block of a supported class (``_ROUTERS``) by a
            :class:`FlashMoESparseBlock` holding the same parameters. An MoE-looking block of an
            unsupported class raises ``ValueError`` (pass ``moe=False`` to keep it).

    Returns:
        ``model`` itself. ``undo(model)`` restores the original blocks and attention.
    """
    register()
    if moe:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        swaps = []
        for parent in model.modules():
            for name, child in parent.named_children():
                if isinstance(child, FlashMoESparseBlock):
                    continue
                rule = _ROUTERS.get(type(child).__name__)
                if rule is None:
                    if _looks_like_moe_block(child) and not isinstance(parent, FlashMoESparseBlock):
                        raise ValueError(
                            f"{type(child).__name__} looks like a sparse-MoE block but its routing rule "
                            f"is not known to flashmoe_science (supported: {sorted(_ROUTERS)}); "
                            "pass moe=False to keep it"
                        )
                    continue
                swaps.append((parent, name, FlashMoESparseBlock(child, **rule(child, config))))
        for parent, name, block in swaps:
            setattr(parent, name, block)
    if attention and model.config._attn_implementation != NAME:
        object.__setattr__(model, "_flashmoe_previous_attn", model.config._attn_implementation)
        model.set_attn_implementation(NAME)
    return model


def undo(model: nn.Module) -> nn.Module:
    """Restore what ``apply`` changed: the original MoE blocks (the same parameter objects, so
    training done meanwhile is kept) and the previous attention implementation."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, FlashMoESparseBlock):
                setattr(parent, name, child._original)
    previous = getattr(model, "_flashmoe_previous_attn", None)
    if previous is not None and model.config._attn_implementation == NAME:
        model.set_attn_implementation(previous)
        object.__delattr__(model, "_flashmoe_previous_attn")
    return model
