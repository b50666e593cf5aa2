"""Expert parallelism: ``ExpertParallelMoE``, a :class:`~flashmoe_science.nn.FlashMoELayer`
whose experts are sharded over an expert-parallel (EP) process group.

Shape letters: T local tokens, H hidden, E experts (global), E_l = E / W local experts,
W ranks in the EP group, K top-k, F ffn per expert, N rows received by this rank.

One forward step on every rank of the EP group::

    logits = router(x)                       local (router weights replicated)
    weights, ids = route(logits)             local, (T, K)
    counts (E,) ──all_to_all──> (W, E_l)     the one exchange of split sizes (one host sync)
    x rows sorted by expert ──all_to_all──> (N, H) rows for this rank's experts
    fused_experts on the local experts       CUDA: the fused Triton kernels
    (N, H) ──all_to_all (transposed splits)──> (T*K, H) back in the sender's sorted order
    y = sum_k weights[t, k] * expert_out[t, k]   combine on the sender (float32 math)
    all_reduce of (prob sums, z sums, expert counts, T)   global aux-loss statistics

Each (token, k) slot travels once; rows for rank s are sorted by global expert id, so the
receiver rebuilds the local expert id of each row from the exchanged counts alone. Backward
runs the two row all-to-alls in reverse with transposed splits (``comm.all_to_all``).

Rules for callers (the same as for any collective layer): every rank of the EP group calls
``forward`` (with any number of tokens, zero included) and backward in the same order, with
the same grad mode and the same ``requires_grad`` on ``x``.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..nn.moe import FlashMoELayer, check_moe_input, init_moe_module
from ..ops.moe import route
from ..ops.moe.api import _run_experts
from . import comm

logger = logging.getLogger(__name__)

_EXPERT_PARAMS = ("w_gate_up", "w_down")


def new_ep_dp_groups(ep_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Split the default world into EP groups of ``ep_size`` consecutive ranks and the
    matching data-parallel groups (ranks holding the same expert shard).

    World 8, ep_size 4: EP groups {0-3}, {4-7}; DP groups {0,4}, {1,5}, {2,6}, {3,7}.
    Collective over the whole world (every rank creates every group). Returns this rank's
    ``(ep_group, dp_group)``.
    """
    world = dist.get_world_size()
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size must be a positive int dividing the world size {world}, got {ep_size!r}")
    rank = dist.get_rank()
    ep_group = dp_group = None
    for i in range(world // ep_size):
        ranks = list(range(i * ep_size, (i + 1) * ep_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            ep_group = g
    for j in range(ep_size):
        ranks = list(range(j, world, ep_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            dp_group = g
    return ep_group, dp_group


class ExpertParallelMoE(nn.Module):
    """Sparse MoE feed-forward with experts sharded over ``ep_group``.

    Same constructor arguments, parameter names and ``forward``/``aux_loss`` semantics as
    :class:`~flashmoe_science.nn.FlashMoELayer`, except that ``w_gate_up`` (E_l, 2F, H) and
    ``w_down`` (E_l, H, F) hold only this rank's experts: global experts
    ``[rank * E_l, (rank + 1) * E_l)`` of the EP group. The router, the optional shared
    experts and ``expert_bias`` are replicated (identical on every rank; shard them with
    FSDP2 or reduce their gradients with DDP-style all-reduce, see ``docs/distributed.md``).

    Build it from a dense layer with :meth:`from_dense` (every rank passes the same layer),
    or construct it directly: the router is initialised from the current RNG (seed all ranks
    alike), expert ``e`` from a generator seeded with ``torch.initial_seed()`` and ``e``, so
    the experts do not depend on the EP degree.

    After each forward:
      - ``aux_loss``: ``aux_loss_coef * load_balancing + z_loss_coef * z_loss`` computed on
        the statistics of all tokens of the EP group (one all_reduce), so its value equals
        the dense layer's on the concatenated tokens. Its gradient with respect to this
        rank's router logits is ``W * d(aux)/d(local logits)``: what an autograd all_reduce
        would give when every rank back-propagates the same ``aux_loss``, obtained without a
        collective in backward. With gradients averaged over the EP group (DDP/FSDP
        default), the router receives exactly ``d(aux)/d(router)``.
      - ``last_tokens_per_rank`` (W,) int64: (token, expert) rows each EP rank's experts
        processed this step; ``last_expert_counts`` (E,) int64: rows per global expert
        (both EP-group totals, identical on every rank, left on the device: no sync);
        ``last_recv_tokens``: rows this rank's experts processed (int).
        Logged at DEBUG level by ``flashmoe_science.distributed.expert_parallel``.
    """

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
        ep_group: dist.ProcessGroup | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ExpertParallelMoE needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first)"
            )
        ep_size = dist.get_world_size(ep_group)
        ep_rank = dist.get_rank(ep_group)
        if ep_rank < 0:
            raise ValueError("this process is not a member of ep_group")
        if num_experts % ep_size:
            raise ValueError(
                f"num_experts={num_experts} must be a multiple of the EP group size {ep_size} "
                "(every rank holds the same number of experts)"
            )
        self.ep_group = ep_group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local_experts = num_experts // ep_size
        self.expert_offset = ep_rank * self.num_local_experts
        init_moe_module(
            self,
            hidden_size,
            num_experts,
            self.num_local_experts,
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
        self.last_tokens_per_rank: torch.Tensor | None = None
        self.last_expert_counts: torch.Tensor | None = None
        self.last_recv_tokens: int | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------ weights
    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=0.02)
        if self.w_gate_up.device.type == "meta":
            return
        b1, b2 = 1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.ffn_hidden_size)
        base = torch.initial_seed()
        with torch.no_grad():
            for j in range(self.num_local_experts):
                gen = torch.Generator(device=self.w_gate_up.device)
                gen.manual_seed((base + 1_000_003 * (self.expert_offset + j + 1)) % (2**63))
                self.w_gate_up[j].uniform_(-b1, b1, generator=gen)
                self.w_down[j].uniform_(-b2, b2, generator=gen)

    @classmethod
    def from_dense(cls, layer: FlashMoELayer, ep_group: dist.ProcessGroup | None = None) -> ExpertParallelMoE:
        """This rank's shard of a dense :class:`FlashMoELayer` (same device and dtype).
        Every rank of ``ep_group`` passes a layer with the same weights."""
        if not isinstance(layer, FlashMoELayer):
            raise TypeError(f"layer must be a FlashMoELayer, got {type(layer).__name__}")
        w = layer.w_gate_up
        ep = cls(
            layer.hidden_size,
            layer.num_experts,
            layer.top_k,
            layer.ffn_hidden_size,
            scoring=layer.scoring,
            renormalize=layer.renormalize,
            num_shared_experts=layer.num_shared_experts,
            aux_loss_coef=layer.aux_loss_coef,
            z_loss_coef=layer.z_loss_coef,
            ep_group=ep_group,
            device=w.device,
            dtype=w.dtype,
        )
        ep.load_dense_state_dict(layer.state_dict())
        return ep

    def load_dense_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a :class:`FlashMoELayer` state dict (all E experts), keeping this rank's
        experts. Keys and shapes must match exactly."""
        lo, hi = self.expert_offset, self.expert_offset + self.num_local_experts
        local = {}
        for key, value in state_dict.items():
            if key in _EXPERT_PARAMS:
                if value.shape[0] != self.num_experts:
                    raise ValueError(
                        f"{key} has {value.shape[0]} experts (shape {tuple(value.shape)}); "
                        f"expected {self.num_experts}"
                    )
                value = value[lo:hi]
            local[key] = value
        self.load_state_dict(local, strict=True)

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """A :class:`FlashMoELayer` state dict with all E experts gathered from the EP group
        (collective: every rank must call it). Loads into ``FlashMoELayer``."""
        out = {}
        for key, value in self.state_dict().items():
            out[key] = comm.all_gather_rows(value, self.ep_group) if key in _EXPERT_PARAMS else value.detach()
        return out

    def expert_parameters(self):
        """Parameters sharded over the EP group (reduce their gradients over the
        data-parallel group of ranks holding the same shard, never over the EP group)."""
        return [self.w_gate_up, self.w_down]

    def non_expert_parameters(self):
        """Replicated parameters (router, shared experts): reduce over all ranks, or shard
        with FSDP2."""
        expert = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in expert]

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, "
            f"local_experts=[{self.expert_offset}, {self.expert_offset + self.num_local_experts}), "
            f"ep_size={self.ep_size}, top_k={self.top_k}, ffn_hidden_size={self.ffn_hidden_size}, "
            f"scoring={self.scoring!r}, num_shared_experts={self.num_shared_experts}"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_moe_input(x, self.hidden_size)
        if x.dtype != self.w_gate_up.dtype:
            # Checked here: the expert call below skips fused_experts' validation.
            raise ValueError(f"x has dtype {x.dtype}; expected {self.w_gate_up.dtype}, the experts' dtype")
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
        y, counts = self._experts(tokens, weights, ids)
        if self.shared_gate_up is not None:
            gate, up = self.shared_gate_up(tokens).chunk(2, dim=-1)
            y = y + self.shared_down(F.silu(gate) * up)
        self.aux_loss = self._global_aux_loss(logits, counts)
        self.last_topk_ids = ids.detach()
        return y.reshape(shape)

    def _experts(
        self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch (T*K) slots to the expert owners, run them, combine. Returns y (T, H)
        and this rank's per-expert slot counts (E,) int64."""
        t, h = tokens.shape
        w, el, k = self.ep_size, self.num_local_experts, self.top_k
        group = self.ep_group
        flat_ids = ids.reshape(-1).long()
        # Stable sort by global expert id: groups the slots by destination rank, then by
        # that rank's local expert, which is the order the receiver reads them in.
        order = torch.argsort(flat_ids, stable=True)
        # scatter_add instead of bincount: CUDA bincount syncs with the host to size its output.
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=flat_ids.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)  # (W * E_l): [source, local expert]
        # The one host sync of the step: all_to_all_single takes its splits as lists.
        splits = torch.cat([counts.view(w, el).sum(1), recv_counts.view(w, el).sum(1)]).tolist()
        in_splits, out_splits = splits[:w], splits[w:]
        n_recv = sum(out_splits)

        recv_x = comm.all_to_all(tokens.index_select(0, order // k), out_splits, in_splits, group)
        if n_recv > 0:
            local_ids = torch.repeat_interleave(
                torch.arange(el, device=tokens.device).repeat(w), recv_counts, output_size=n_recv
            )
            # fused_experts without its id range check (two host syncs that would stall
            # the launch queue behind the all-to-all): these ids are in range by construction.
            out_local = _run_experts(
                recv_x,
                self.w_gate_up,
                self.w_down,
                recv_x.new_ones((n_recv, 1)),
                local_ids.view(-1, 1).to(torch.int32),
                "silu",
            )
        else:
            out_local = self._empty_connected(recv_x)
        back = comm.all_to_all(out_local, in_splits, out_splits, group)  # (T*K, H), sorted order
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        slots = back.index_select(0, inv).view(t, k, h)
        cd = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        y = torch.bmm(weights.to(cd).unsqueeze(1), slots.to(cd)).view(t, h).to(tokens.dtype)
        self.last_recv_tokens = n_recv
        return y, counts

    def _empty_connected(self, recv_x: torch.Tensor) -> torch.Tensor:
        """(0, H) expert output for a rank that received no rows, still connected to the
        autograd graph (``recv_x`` and the expert weights, zero gradients), so this rank's
        backward runs the same all-to-alls as the others' instead of skipping them."""
        out = recv_x * 0
        if self.w_gate_up.requires_grad or self.w_down.requires_grad:
            out = out + (self.w_gate_up.sum() + self.w_down.sum()) * 0
        return out

    def _global_aux_loss(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Load balancing (Switch/GShard ``E * sum_e f_e P_e``) + router z-loss over all
        tokens of the EP group, from one all_reduce of local sums."""
        e = self.num_experts
        lf = logits.float()
        if self.scoring == "softmax":
            probs = torch.softmax(lf, -1)
        else:
            probs = torch.sigmoid(lf)
            probs = probs / probs.sum(-1, keepdim=True)
        local = torch.cat([probs.sum(0), torch.logsumexp(lf, -1).square().sum().view(1)]).double()
        t_local = torch.full((1,), float(logits.shape[0]), dtype=torch.float64, device=logits.device)
        # float64: the counts stay exact beyond 2**24 rows.
        packed = torch.cat([local.detach(), counts.double(), t_local])
        dist.all_reduce(packed, group=self.ep_group)
        # Value: the global sums. Gradient: W x this rank's share (see the class docstring).
        stats = packed[: e + 1] + self.ep_size * (local - local.detach())
        counts_g = packed[e + 1 : 2 * e + 1]
        t_g = packed[-1].clamp_min(1.0)  # T_global = 0: every sum is 0 and so is the loss
        f = counts_g / (t_g * self.top_k)
        lb = e * (f * stats[:e] / t_g).sum()
        z = stats[e] / t_g
        self.last_expert_counts = counts_g.detach().long()
        self.last_tokens_per_rank = self.last_expert_counts.view(self.ep_size, -1).sum(1)
        if logger.isEnabledFor(logging.DEBUG):  # the .tolist() is a host sync: only when logging
            logger.debug(
                "ep rank %d/%d: tokens per EP rank %s, received %d rows",
                self.ep_rank,
                self.ep_size,
                self.last_tokens_per_rank.tolist(),
                self.last_recv_tokens,
            )
        return (self.aux_loss_coef * lb + self.z_loss_coef * z).float()
