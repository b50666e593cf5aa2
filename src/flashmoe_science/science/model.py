"""A composition transformer built from the library's layers.

Each element of a composition is a token: a learned element embedding + a projection of
the element's (standardised) properties + an encoding of its fractional amount. Blocks are
pre-norm (``FlashLayerNorm``: the library's fused LayerNorm on CUDA)
``FlashMoEScienceAttention.forward_packed`` (varlen self-attention over the
elements of one composition, no padding) and ``FlashMoELayer`` (sparse SwiGLU experts;
their load-balancing losses are summed in ``aux_loss``).

Attention paths (same layer, same weights, no padding in either):

- ``"packed"``: one ``forward_packed`` call over all compositions (``cu_seqlens``), the
  varlen kernel on CUDA;
- ``"bucketed"``: compositions with the same element count L form a dense (n, L, E) block
  run through the layer's dense path, one call per run of equal L. The CPU reference of
  the varlen op loops over sequences in Python (one small einsum chain per composition),
  which this avoids; batches are sorted by L so a batch has at most a few runs.
- ``"auto"`` (default): packed on CUDA, bucketed elsewhere.

Tokens are pooled by their
fractions and each task head predicts a mean and a log-scale (Laplace), so every
prediction carries an uncertainty.

Shape letters: T tokens, N compositions, E model width, P element properties.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn import FlashLayerNorm, FlashMoELayer, FlashMoEScienceAttention
from .featurize import MAX_Z, PackedBatch, element_table


class FractionEncoding(nn.Module):
    """Fourier features of the fraction on a linear and a log scale, then a projection.

    Linear-scale features separate 0.5 from 0.25; log-scale ones separate dopant levels
    (0.001 vs 0.01), which a linear scale squeezes together (the idea of CrabNet's
    fractional encoding)."""

    def __init__(self, dim: int, num_frequencies: int = 16) -> None:
        super().__init__()
        self.num_frequencies = num_frequencies
        self.proj = nn.Linear(4 * num_frequencies + 2, dim)

    def forward(self, frac: torch.Tensor) -> torch.Tensor:
        # Frequencies made here in float32 (not a buffer): a bfloat16 copy of the model would
        # round them, and the features would differ between training and evaluation.
        k = torch.arange(self.num_frequencies, dtype=torch.float32, device=frac.device)
        freqs = torch.pi * torch.exp2(k) / 2.0
        f = frac.float().clamp_min(1e-6)[:, None]
        logf = (torch.log2(f) / 20.0 + 1.0).clamp_min(0.0)  # 1e-6 -> ~0, 1 -> 1
        angles = torch.cat([f * freqs, logf * freqs], dim=-1)
        feats = torch.cat([angles.sin(), angles.cos(), f, logf], dim=-1)
        return self.proj(feats.to(self.proj.weight.dtype))


class CompositionBlock(nn.Module):
    """x + Attn(LN(x)) then x + MoE(LN(x)), attention packed over each composition."""

    def __init__(self, dim: int, heads: int, experts: int, top_k: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = FlashLayerNorm(dim)
        self.attn = FlashMoEScienceAttention(dim, heads)
        self.norm2 = FlashLayerNorm(dim)
        self.moe = FlashMoELayer(dim, experts, top_k=top_k, ffn_hidden_size=ffn)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, batch: PackedBatch, path: str) -> torch.Tensor:
        h = self.norm1(x)
        if path == "packed":
            a = self.attn.forward_packed(h, batch.cu_seqlens, batch.max_seqlen)
        else:
            pieces = []
            for t0, t1, length in batch.runs:
                blk = h[t0:t1].reshape(-1, length, h.shape[-1])
                pieces.append(self.attn(blk, blk, blk)[0].reshape(t1 - t0, h.shape[-1]))
            a = torch.cat(pieces, dim=0) if pieces else h
        x = x + self.dropout(a)
        return x + self.dropout(self.moe(self.norm2(x)))


class CompositionTransformer(nn.Module):
    """``forward(batch) -> {task: (mean (N,), log_scale (N,))}`` in normalised target units.

    ``target_stats`` (a buffer per task: mean, scale) turns outputs back into physical
    units in :meth:`predict`. The element property table is a buffer, so a checkpoint
    needs no pymatgen to run.
    """

    def __init__(
        self,
        tasks: tuple[str, ...] = ("band_gap",),
        *,
        dim: int = 128,
        heads: int = 4,
        layers: int = 3,
        experts: int = 8,
        top_k: int = 2,
        ffn: int = 256,
        dropout: float = 0.0,
        attention_path: str = "auto",
        element_props: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if attention_path not in ("auto", "packed", "bucketed"):
            raise ValueError(f"attention_path must be 'auto', 'packed' or 'bucketed', got {attention_path!r}")
        self.attention_path = attention_path
        self.config = {
            "tasks": list(tasks),
            "dim": dim,
            "heads": heads,
            "layers": layers,
            "experts": experts,
            "top_k": top_k,
            "ffn": ffn,
            "dropout": dropout,
        }
        self.tasks = tuple(tasks)
        # (MAX_Z + 1, P) standardised element properties; default: pymatgen's, via featurize.
        table = torch.as_tensor(element_table()) if element_props is None else element_props.float()
        if table.dim() != 2 or table.shape[0] != MAX_Z + 1:
            raise ValueError(f"element_props must be ({MAX_Z + 1}, P), got {tuple(table.shape)}")
        self.config["num_props"] = int(table.shape[1])
        self.register_buffer("element_props", table)
        self.element_embedding = nn.Embedding(MAX_Z + 1, dim)
        self.property_proj = nn.Linear(table.shape[1], dim)
        self.fraction = FractionEncoding(dim)
        self.blocks = nn.ModuleList(
            CompositionBlock(dim, heads, experts, top_k, ffn, dropout) for _ in range(layers)
        )
        self.norm = FlashLayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 2 * len(tasks)))
        self.register_buffer("target_stats", torch.tensor([[0.0, 1.0]] * len(tasks)))
        nn.init.normal_(self.element_embedding.weight, std=1.0 / math.sqrt(dim))

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary losses from the last forward."""
        losses = [b.moe.aux_loss for b in self.blocks if b.moe.aux_loss is not None]
        return torch.stack([x.float() for x in losses]).sum() if losses else torch.zeros(())

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        z = batch.z
        props = self.element_props[z].to(self.property_proj.weight.dtype)
        return self.element_embedding(z) + self.property_proj(props) + self.fraction(batch.frac)

    def forward(self, batch: PackedBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        x = self.embed(batch)
        path = self.attention_path
        if path == "auto":
            path = "packed" if x.is_cuda else "bucketed"
        if path == "bucketed" and not batch.runs and batch.z.numel():
            raise ValueError("attention_path='bucketed' needs batch.runs (build the batch with to_torch())")
        for block in self.blocks:
            x = block(x, batch, path)
        x = self.norm(x)
        out = self.head(self.pool(x, batch)).float().view(-1, len(self.tasks), 2)
        return {t: (out[:, i, 0], out[:, i, 1].clamp(-7.0, 7.0)) for i, t in enumerate(self.tasks)}

    @staticmethod
    def pool(x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Fraction-weighted mean over the elements of each composition: (T, E) -> (N, E).

        With ``batch.runs`` (equal-length runs covering the batch in order) each run is a
        dense (n, L, E) sum, accumulated in float32 and rounded once; otherwise a
        float32 scatter-add over ``batch.seg``, rounded once (what a padded, graph-captured
        training batch takes: its runs change from batch to batch)."""
        xw = x * batch.frac.to(x.dtype)[:, None]
        runs = batch.runs
        if runs and runs[0][0] == 0 and runs[-1][1] == x.shape[0] and all(r[2] > 0 for r in runs):
            contiguous = all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
            if contiguous and sum((t1 - t0) // n for t0, t1, n in runs) == batch.num_compositions:
                parts = [xw[t0:t1].view(-1, length, x.shape[1]).sum(1) for t0, t1, length in runs]
                return parts[0] if len(parts) == 1 else torch.cat(parts)
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        acc = x.new_zeros((batch.num_compositions, x.shape[1]), dtype=acc_dtype)
        return acc.index_add_(0, batch.seg, xw.to(acc_dtype)).to(x.dtype)

    def set_target_stats(self, task: str, mean: float, scale: float) -> None:
        i = self.tasks.index(task)
        self.target_stats[i] = torch.tensor([mean, scale], dtype=self.target_stats.dtype)

    @torch.no_grad()
    def predict(self, batch: PackedBatch, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) in physical units; std of the Laplace head (sqrt(2) * scale)."""
        i = self.tasks.index(task)
        mu, log_b = self.forward(batch)[task]
        m, s = self.target_stats[i].float()
        return mu * s + m, math.sqrt(2.0) * torch.exp(log_b) * s


class GraphedPredictor:
    """``model.predict(batch, task)`` replayed from CUDA graphs: one graph per batch shape
    (tokens, compositions, longest, runs), captured the second time a shape is seen, at most
    ``max_graphs`` (other shapes run eagerly). Screening feeds thousands of equal-shape chunks, where
    per-launch CPU cost dominates an eager forward; the library's layers never synchronise
    with the host on CUDA (no ``.item()``, no data-dependent shapes), so the whole forward
    captures. A plain PyTorch expert loop (``nonzero`` per expert) cannot be captured.

    Returns fresh tensors (copies of the graph's outputs). Off CUDA it calls ``predict``.
    The model must not change between calls (weights are baked into the graphs by address:
    in-place updates are seen, replaced parameters are not)."""

    def __init__(self, model: CompositionTransformer, task: str, max_graphs: int = 8) -> None:
        self.model, self.task, self.max_graphs = model, task, max_graphs
        self._graphs: dict[tuple, tuple] = {}
        self._seen: dict[tuple, int] = {}
        self._pool = None

    def __call__(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if not batch.z.is_cuda:
            return self.model.predict(batch, self.task)
        key = (batch.z.numel(), batch.num_compositions, batch.max_seqlen, batch.runs)
        entry = self._graphs.get(key)
        if entry is None:
            # Capture on a shape's second sighting: a shape seen once (a filtered chunk of odd
            # size) runs eagerly instead of paying two warm-ups and a capture for one use.
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < 2 or len(self._graphs) >= self.max_graphs:
                return self.model.predict(batch, self.task)
            with torch.cuda.device(batch.z.device):
                entry = self._graphs[key] = self._capture(batch)
        static, graph, outputs = entry
        for name in ("z", "frac", "cu_seqlens", "seg"):
            getattr(static, name).copy_(getattr(batch, name))
        graph.replay()
        return tuple(t.clone() for t in outputs)

    def _capture(self, batch: PackedBatch):
        static = PackedBatch(
            batch.z.clone(),
            batch.frac.clone(),
            batch.cu_seqlens.clone(),
            batch.seg.clone(),
            batch.max_seqlen,
            batch.runs,
        )
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: autotuning, compilation
            for _ in range(2):
                self.model.predict(static, self.task)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.model.predict(static, self.task)
        self._pool = graph.pool()
        return static, graph, outputs


def _mean(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return x.mean() if weight is None else (x * weight).sum()


def laplace_nll(
    mu: torch.Tensor, log_b: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative log-likelihood of a Laplace(mu, b): |y - mu| / b + log b (CrabNet's robust
    L1 loss up to constants). Its minimiser in mu is the median, so it trains for MAE.
    ``weight`` (N,): a weighted sum instead of the mean (1/n on real rows, 0 on padding)."""
    return _mean(torch.abs(y - mu) * torch.exp(-log_b) + log_b, weight)


def regression_loss(
    mu: torch.Tensor, log_b: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Training loss: L1 on the mean plus the Laplace NLL of the scale head with the mean
    detached. Through the full NLL the mean's gradient is scaled by 1/b, which explodes on
    the 53% of expt_gap rows whose target is exactly 0 (metals: b -> 0) and made training
    spike; decoupled, the mean trains for MAE and the scale head still learns |y - mu|.
    ``weight`` as in :func:`laplace_nll`."""
    return _mean(torch.abs(y - mu), weight) + laplace_nll(mu.detach(), log_b, y, weight)


def model_from_config(config: dict) -> CompositionTransformer:
    """An untrained model of this shape; its element table is a placeholder that a
    checkpoint's state dict overwrites (so loading needs no pymatgen)."""
    cfg = dict(config)
    tasks = tuple(cfg.pop("tasks"))
    num_props = cfg.pop("num_props")
    return CompositionTransformer(tasks, **cfg, element_props=torch.zeros(MAX_Z + 1, num_props))


__all__ = [
    "CompositionTransformer",
    "FractionEncoding",
    "GraphedPredictor",
    "laplace_nll",
    "model_from_config",
    "regression_loss",
]
