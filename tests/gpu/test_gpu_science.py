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
        if max_graphs:
            # The replay reads the learning rate from its tensor: at lr 0 AdamW changes nothing.
            opt.param_groups[0]["lr"].fill_(0.0)
            sel = packed.select(batches[0])
            order = np.argsort(sel.lengths, kind="stable")
            step(sel.select(order), y[batches[0]][order])
            for a, b in zip(master.parameters(), result[max_graphs][1], strict=True):
                assert torch.equal(a.detach(), b)
    (l_graph, p_graph, n_graph), (l_eager, p_eager, n_eager) = result[16], result[0]
    assert n_eager == 0 and n_graph >= 1
    assert all(np.isfinite(l_graph))
    # Atomics in the backward kernels are the only run-to-run difference.
    np.testing.assert_allclose(l_graph, l_eager, rtol=2e-2)
    for a, b in zip(p_graph, p_eager):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)
    moved = max(float((a - b.detach()).abs().max()) for a, b in zip(p_graph, base.parameters(), strict=True))
    assert moved > 1e-3  # it trained


def _fake_pack(formulas):
    """'z:amount z:amount' strings packed without pymatgen (not installed on the GPU machine)."""
    zs, fs = [], []
    for f in formulas:
        pairs = [tuple(map(float, p.split(":"))) for p in f.split()]
        a = np.array([p[1] for p in pairs], dtype=np.float32)
        zs.append(np.array([int(p[0]) for p in pairs]))
        fs.append(a / a.sum())
    lengths = np.array([len(z) for z in zs])
    offsets = np.zeros(len(zs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return PackedCompositions(np.concatenate(zs), np.concatenate(fs), offsets)


def test_fit_with_cuda_graphs_learns_and_follows_the_schedule(monkeypatch):
    """fit() on CUDA with its captured steps: the loss falls, validation MAE beats predicting
    the mean, graphs were used, and the learning-rate schedule reaches the captured step."""
    from flashmoe_science.science import model as model_mod
    from flashmoe_science.science import train as train_mod
    from flashmoe_science.science.data import MaterialsDataset

    monkeypatch.setattr(train_mod, "pack_formulas", _fake_pack)
    props = np.random.default_rng(1).standard_normal((MAX_Z + 1, 8)).astype(np.float32)
    monkeypatch.setattr(model_mod, "element_table", lambda: props)  # pymatgen's, without pymatgen
    rng = np.random.default_rng(0)
    formulas, targets = [], []
    for _ in range(1200):
        n = int(rng.integers(1, 6))
        z = rng.choice(np.arange(1, 40), n, replace=False)
        a = rng.integers(1, 5, n)
        formulas.append(" ".join(f"{zi}:{ai}" for zi, ai in zip(z, a)))
        targets.append(float((z * a).sum() / a.sum()) / 10.0)  # a learnable function of the composition
    ds = MaterialsDataset("synthetic", formulas, np.array(targets), "a.u.")
    captured = []
    real_init = train_mod.TrainStep.__init__

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        captured.append(self)

    monkeypatch.setattr(train_mod.TrainStep, "__init__", spy_init)
    cfg = train_mod.TrainConfig(epochs=6, batch_size=128, lr=3e-3, progress=False, model=dict(SHAPE))
    result = train_mod.fit(ds, "band_gap", cfg)
    step = captured[0]
    assert step.graphs and step.num_graphs >= 1
    losses = [h["train_loss"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
    baseline = float(np.mean(np.abs(np.array(targets) - np.mean(targets))))
    assert result.best_val_mae < 0.7 * baseline
    # The cosine schedule ends at lr 0: the last captured steps must have read it (a baked-in
    # float would keep the first value).
    assert float(step.optimizer.param_groups[0]["lr"]) < 1e-3 * cfg.lr
