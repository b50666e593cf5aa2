"""The materials model's CUDA-graph paths on the GPU: screening (GraphedPredictor) and
training (TrainStep with cuda_graphs) give what the same kernels give eagerly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from flashmoe_science.science.featurize import MAX_Z, PackedCompositions
from flashmoe_science.science.model import CompositionTransformer, GraphedPredictor
from flashmoe_science.science.train import TrainStep, _Precision

pytestmark = pytest.mark.gpu
DEV = "cuda"
SHAPE = {"dim": 64, "heads": 2, "layers": 2, "experts": 4, "top_k": 2, "ffn": 64}


def _model() -> CompositionTransformer:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return CompositionTransformer(
        ("band_gap",), **SHAPE, element_props=torch.randn(MAX_Z + 1, 8, generator=gen)
    )


def _compositions(n: int, seed: int = 1) -> tuple[PackedCompositions, torch.Tensor]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    z = rng.integers(1, MAX_Z + 1, int(offsets[-1]))
    amounts = rng.integers(1, 7, int(offsets[-1])).astype(np.float32)
    frac = amounts / np.repeat(np.add.reduceat(amounts, offsets[:-1]), lengths)
    return PackedCompositions(z, frac.astype(np.float32), offsets), torch.randn(n)


def test_graphed_predictor_matches_predict():
    model = _model().to(DEV, torch.bfloat16).eval()
    packed, _ = _compositions(512)
    order = np.argsort(packed.lengths, kind="stable")
    batch = packed.select(order).to_torch(DEV)
    graphed = GraphedPredictor(model, "band_gap")
    want = model.predict(batch, "band_gap")
    for _ in range(3):  # eager, capture + replay, replay
        got = graphed(batch)
    assert len(graphed._graphs) == 1
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # same kernels, same inputs


def test_graphed_train_step_matches_eager_steps():
    """The same padded batches through captured graphs and through eager steps (max_graphs=0):
    per-step losses and the final float32 master weights agree."""
    base = _model().to(DEV)
    packed, y = _compositions(192)
    batches = [np.arange(i, i + 64) for i in (0, 64, 128)] * 3
    result = {}
    for max_graphs in (16, 0):
        master = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(master.parameters(), lr=torch.tensor(1e-3, device=DEV), capturable=True)
        prec = _Precision(master, torch.bfloat16)
        prec.work.train()
        step = TrainStep(
            prec,
            opt,
            "band_gap",
            grad_clip=1.0,
            cuda_graphs=True,
            batch_size=64,
            max_len=8,
            max_graphs=max_graphs,
        )
        losses = []
        for idx in batches:
            sel = packed.select(idx)
            order = np.argsort(sel.lengths, kind="stable")
            losses.append(float(step(sel.select(order), y[idx][order])))
        result[max_graphs] = (losses, [p.detach().clone() for p in master.parameters()], step.num_graphs)
    (l_graph, p_graph, n_graph), (l_eager, p_eager, n_eager) = result[16], result[0]
    assert n_eager == 0 and n_graph >= 1
    assert all(np.isfinite(l_graph))
    # Atomics in the backward kernels are the only run-to-run difference.
    np.testing.assert_allclose(l_graph, l_eager, rtol=2e-2)
    for a, b in zip(p_graph, p_eager):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)
    moved = max(float((a - b.detach()).abs().max()) for a, b in zip(p_graph, base.parameters(), strict=True))
    assert moved > 1e-3  # it trained
