"""``FlashMoELayer``: router + dropless SwiGLU experts (+ optional shared experts).

Weights in DESIGN.md's layout: ``w_gate_up`` (E, 2F, H), ``w_down`` (E, H, F). After each
forward, ``aux_loss`` holds ``aux_loss_coef * load_balancing + z_loss_coef * z_loss``:
load balancing as in Switch/GShard, ``E * sum_e f_e * P_e`` with f_e the fraction of the
T*K assignments that went to expert e and P_e the mean router probability of e; router
z-loss as in ST-MoE, ``mean_t logsumexp(logits_t)^2``. In eval mode under ``no_grad``
(pure inference) it is computed only when ``aux_loss`` is read.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_flag
from ..ops.moe import fused_experts, route


def load_balancing_loss(
    router_logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, scoring: str
) -> torch.Tensor:
    """Switch/GShard loss ``E * sum_e f_e * P_e`` (1.0 when perfectly balanced)."""
    logits = router_logits.float()
    probs = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    if scoring == "sigmoid":
        probs = probs / probs.sum(-1, keepdim=True)
    counts = torch.zeros(num_experts, device=logits.device, dtype=torch.float32)
    counts = counts.index_add(
        0, topk_ids.reshape(-1).long(), torch.ones(topk_ids.numel(), device=logits.device)
    )
    f = counts / max(topk_ids.numel(), 1)
    p = probs.mean(0)
    return num_experts * (f * p).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()


def _positive_int(name: str, value: object) -> int:
    """A size argument as a Python int (NumPy ints from configs included): TypeError for
    another type, ValueError for a value below 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def check_moe_input(x: object, hidden_size: int) -> None:
    """The input check of the MoE layers (this one and the expert-parallel one): a
    floating-point tensor whose last dim is ``hidden_size``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.shape[-1] != hidden_size:
        raise ValueError(f"x has last dim {x.shape[-1]}; expected hidden_size={hidden_size}")


def init_moe_module(
    module: nn.Module,
    hidden_size: int,
    num_experts: int,
    num_held_experts: int,
    top_k: int,
    ffn_hidden_size: int | None,
    *,
    scoring: str,
    renormalize: bool,
    num_shared_experts: int,
    aux_loss_coef: float,
    z_loss_coef: float,
    device=None,
    dtype=None,
) -> None:
    """Check the arguments and create the router, the weights of the ``num_held_experts``
    experts this module holds, the selection bias and the shared experts. Shared by
    :class:`FlashMoELayer` (holds all experts) and the expert-parallel layer (a shard)."""
    hidden_size = _positive_int("hidden_size", hidden_size)
    num_experts = _positive_int("num_experts", num_experts)
    top_k = _positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (num_experts), got {top_k}")
    if ffn_hidden_size is not None:
        ffn_hidden_size = _positive_int("ffn_hidden_size", ffn_hidden_size)
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if num_shared_experts < 0:
        raise ValueError(f"num_shared_experts must be >= 0, got {num_shared_experts}")
    for name, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
        if not 0.0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    renormalize = check_flag("renormalize", renormalize)
    factory = {"device": device, "dtype": dtype}
    ffn = ffn_hidden_size if ffn_hidden_size is not None else 4 * hidden_size
    module.hidden_size = hidden_size
    module.num_experts = num_experts
    module.top_k = top_k
    module.ffn_hidden_size = ffn
    module.scoring = scoring
    module.renormalize = renormalize
    module.num_shared_experts = num_shared_experts
    module.aux_loss_coef = aux_loss_coef
    module.z_loss_coef = z_loss_coef
    module.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
    module.w_gate_up = nn.Parameter(torch.empty(num_held_experts, 2 * ffn, hidden_size, **factory))
    module.w_down = nn.Parameter(torch.empty(num_held_experts, hidden_size, ffn, **factory))
    if scoring == "sigmoid":
        # Selection-only bias (DeepSeek-V3 aux-loss-free balancing); updated by the user.
        module.register_buffer("expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
    else:
        module.expert_bias = None
    if num_shared_experts > 0:
        shared_ffn = num_shared_experts * ffn
        module.shared_gate_up = nn.Linear(hidden_size, 2 * shared_ffn, bias=False, **factory)
        module.shared_down = nn.Linear(shared_ffn, hidden_size, bias=False, **factory)
    else:
        module.shared_gate_up = None
        module.shared_down = None
    module.aux_loss = None
    module.last_topk_ids = None


class FlashMoELayer(nn.Module):
    """Sparse MoE feed-forward: ``forward(x)`` on (..., H) returns (..., H)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        ffn_hidden_size: int | None = None,
        *,
        scoring: str = "softmax",
        renormalize: bool = True,
        num_shared_experts: int = 0,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        init_moe_module(
            self,
            hidden_size,
            num_experts,
            num_experts,
            top_k,
            ffn_hidden_size,
            scoring=scoring,
            renormalize=renormalize,
            num_shared_experts=num_shared_experts,
            aux_loss_coef=aux_loss_coef,
            z_loss_coef=z_loss_coef,
            device=device,
            dtype=dtype,
        )
        self.reset_parameters()

    def _aux_value_of(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        lb = load_balancing_loss(logits, ids, self.num_experts, self.scoring)
        return self.aux_loss_coef * lb + self.z_loss_coef * router_z_loss(logits)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """``aux_loss_coef * load_balancing + z_loss_coef * z_loss`` of the last forward
        (None before the first). In eval under ``no_grad`` it is computed on first read."""
        pending = self._aux_pending
        if pending is not None:
            self._aux_pending = None
            self._aux_value = self._aux_value_of(*pending)
        return self._aux_value

    @aux_loss.setter
    def aux_loss(self, value: torch.Tensor | None) -> None:
        self._aux_pending = None
        self._aux_value = value

    def reset_parameters(self) -> None:
        # Each expert's projections initialised as an nn.Linear of the same shape would be.
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.uniform_(self.w_gate_up, -1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.hidden_size))
        nn.init.uniform_(
            self.w_down, -1 / math.sqrt(self.ffn_hidden_size), 1 / math.sqrt(self.ffn_hidden_size)
        )

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"ffn_hidden_size={self.ffn_hidden_size}, scoring={self.scoring!r}, "
            f"num_shared_experts={self.num_shared_experts}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_moe_input(x, self.hidden_size)
        shape = x.shape
        tokens = x.reshape(-1, self.hidden_size)
        logits = self.router(tokens)
        weights, ids = route(
            logits,
            self.top_k,
            scoring=self.scoring,
            renormalize=self.renormalize,
            bias=self.expert_bias,
        )
        y = fused_experts(tokens, self.w_gate_up, self.w_down, weights.to(tokens.dtype), ids)
        if self.shared_gate_up is not None:
            gate, up = self.shared_gate_up(tokens).chunk(2, dim=-1)
            y = y + self.shared_down(F.silu(gate) * up)
        if tokens.shape[0] == 0:
            self.aux_loss = logits.new_zeros((), dtype=torch.float32)
        elif not (self.training or torch.is_grad_enabled()):
            # Inference (eval mode under no_grad): computed on first read of ``aux_loss``
            # only; its expert histogram costs an atomic add per slot (~0.27 ms per layer at
            # 196k tokens, H200) that a screening loop never reads.
            self.aux_loss = None
            self._aux_pending = (logits, ids)
        else:
            self.aux_loss = self._aux_value_of(logits, ids)
        self.last_topk_ids = ids.detach()
        return y.reshape(shape)
