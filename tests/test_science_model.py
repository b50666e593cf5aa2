"""The composition transformer: attention paths agree, training lowers the loss,
checkpoints resume, the bfloat16 master-weight path runs."""

import numpy as np
import pytest
import torch

pytest.importorskip("pymatgen.core")

from flashmoe_science.science.data import MaterialsDataset, load_expt_gap  # noqa: E402
from flashmoe_science.science.featurize import pack_formulas  # noqa: E402
from flashmoe_science.science.model import CompositionTransformer, laplace_nll  # noqa: E402
from flashmoe_science.science.train import TrainConfig, _Precision, fit, load_model, predict, save_model  # noqa: E402

TINY = {"dim": 32, "heads": 2, "layers": 1, "experts": 4, "top_k": 2, "ffn": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(formulas):
    return pack_formulas(formulas).to_torch()


def test_packed_and_bucketed_paths_agree():
    torch.manual_seed(0)
    model = CompositionTransformer(("band_gap",), **TINY).double()
    formulas = ["Si", "NaCl", "GaAs", "Fe2O3", "LiFePO4", "CuInSe2", "Al2O3", "ZnO"]
    batch = _batch(formulas)  # unsorted: several runs of equal length
    batch.frac = batch.frac.double()
    outs, grads = {}, {}
    for path in ("packed", "bucketed"):
        model.attention_path = path
        model.zero_grad()
        mu, log_b = model(batch)["band_gap"]
        g = torch.randn_like(mu, generator=torch.Generator().manual_seed(1))
        (mu * g).sum().backward()
        outs[path] = torch.stack([mu, log_b])
        grads[path] = model.blocks[0].attn.in_proj_weight.grad.clone()
    torch.testing.assert_close(outs["packed"], outs["bucketed"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads["packed"], grads["bucketed"], rtol=1e-10, atol=1e-10)


def test_aux_loss_is_collected():
    model = CompositionTransformer(("band_gap",), **{**TINY, "layers": 2})
    model(_batch(["NaCl", "Fe2O3"]))
    aux = model.aux_loss
    assert aux.ndim == 0 and aux.item() > 0 and aux.requires_grad


def test_laplace_nll_minimised_at_median():
    y = torch.tensor([0.0, 0.0, 3.0])
    lb = torch.zeros(3)
    assert laplace_nll(torch.zeros(3), lb, y) < laplace_nll(torch.ones(3), lb, y)


def _small_gap(n=400):
    ds = load_expt_gap()
    return ds.subset(np.random.default_rng(0).permutation(len(ds))[:n])


def test_short_training_lowers_the_loss(tmp_path):
    ds = _small_gap()
    cfg = TrainConfig(epochs=6, batch_size=64, lr=3e-3, progress=False, model=TINY, patience=100)
    result = fit(ds, "band_gap", cfg, checkpoint_dir=tmp_path)
    loss = [h["train_loss"] for h in result.history]
    assert len(loss) == 6
    assert loss[-1] < loss[0] - 0.2, loss
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    model, task = load_model(tmp_path / "best.pt")
    mean, std = predict(model, pack_formulas(ds.formulas[:10]), task)
    assert mean.shape == (10,) and (std > 0).all()


def test_resume_continues_exactly(tmp_path):
    ds = _small_gap(200)
    cfg = TrainConfig(epochs=4, batch_size=64, progress=False, model=TINY, patience=100)
    full = fit(ds, "band_gap", cfg, checkpoint_dir=tmp_path / "a")
    part_cfg = TrainConfig(**{**cfg.__dict__, "max_minutes": 0.0})  # stops after the first epoch
    part = fit(ds, "band_gap", part_cfg, checkpoint_dir=tmp_path / "b")
    assert len(part.history) == 1
    resumed = fit(ds, "band_gap", cfg, checkpoint_dir=tmp_path / "b", resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    np.testing.assert_allclose(
        [h["train_loss"] for h in resumed.history], [h["train_loss"] for h in full.history], rtol=1e-5
    )


def test_bf16_master_weight_path_runs_on_cpu():
    torch.manual_seed(0)
    model = CompositionTransformer(("band_gap",), **TINY)
    prec = _Precision(model, torch.bfloat16)
    assert prec.work is not model and prec.work.blocks[0].moe.w_gate_up.dtype == torch.bfloat16
    assert prec.work.target_stats.dtype == torch.float32
    before = model.head[0].weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prec.to_work()
    mu, log_b = prec.work(_batch(["NaCl", "Fe2O3", "Si"]))["band_gap"]
    laplace_nll(mu, log_b, torch.tensor([5.0, 2.0, 1.0])).backward()
    prec.grads_to_master()
    assert model.head[0].weight.grad.dtype == torch.float32
    opt.step()
    assert not torch.equal(before, model.head[0].weight)


def test_save_load_roundtrip(tmp_path):
    model = CompositionTransformer(("tc",), **TINY)
    model.set_target_stats("tc", 20.0, 10.0)
    save_model(tmp_path / "m.pt", model, "tc")
    loaded, task = load_model(tmp_path / "m.pt")
    assert task == "tc"
    batch = _batch(["MgB2", "Nb3Sn"])
    torch.testing.assert_close(model.eval().predict(batch, "tc")[0], loaded.predict(batch, "tc")[0])


def test_dataset_subset_keeps_unit():
    ds = MaterialsDataset("x", ["Si", "Ge"], np.array([1.0, 0.7]), "eV")
    assert ds.subset([1]).formulas == ["Ge"] and ds.subset([1]).unit == "eV"


def test_pooling_by_runs_equals_scatter_add():
    formulas = ["Si", "NaCl", "GaAs", "Fe2O3", "LiFePO4", "CuInSe2", "Al2O3", "ZnO", "H2O"]
    batch = _batch(formulas)
    assert len(batch.runs) > 1
    x = torch.randn(batch.z.numel(), 8, dtype=torch.float64)
    batch.frac = batch.frac.double()
    by_runs = CompositionTransformer.pool(x, batch)
    batch.runs = ()  # no run metadata: the scatter-add path
    by_seg = CompositionTransformer.pool(x, batch)
    assert by_runs.shape == (len(formulas), 8)
    torch.testing.assert_close(by_runs, by_seg, rtol=1e-12, atol=1e-12)


def test_graph_padding_keeps_loss_and_gradients():
    """TrainStep pads a batch (dummy compositions, zero loss weight) to a bucket shape for
    CUDA-graph replay; the regression loss and its gradients must equal the unpadded batch's."""
    from flashmoe_science.science.model import regression_loss
    from flashmoe_science.science.train import TrainStep

    torch.manual_seed(0)
    model = CompositionTransformer(("band_gap",), **TINY, attention_path="packed").double()
    opt = torch.optim.AdamW(model.parameters())
    step = TrainStep(
        _Precision(model, torch.float64), opt, "band_gap", batch_size=8, max_len=5, token_multiple=8
    )
    assert step.slots == 8 + 2  # ceil(7 / 4) spare dummies
    formulas = ["Si", "NaCl", "GaAs", "Fe2O3", "LiFePO4", "CuInSe2", "Al2O3"]
    packed = pack_formulas(formulas)
    y = torch.randn(len(formulas)).double()  # targets and weights are float32 in training
    key = step._shape(len(packed), int(packed.offsets[-1]))
    assert key[0] == step.slots and key[1] % 8 == 0 and key[1] >= packed.offsets[-1] + step.slots - 7
    padded, ys, weight = step._fill(key, packed, y)
    lengths = (padded.cu_seqlens[1:] - padded.cu_seqlens[:-1]).tolist()
    assert padded.z.numel() == key[1] and len(lengths) == step.slots
    assert lengths[:7] == packed.lengths.tolist() and all(1 <= n <= 5 for n in lengths)
    assert padded.max_seqlen == 5 and float(weight.sum()) == pytest.approx(1.0)
    padded.frac = padded.frac.double()

    def loss_and_grads(batch, target, w):
        model.zero_grad()
        mu, log_b = model(batch)["band_gap"]
        loss = regression_loss(mu, log_b, target, w)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = _batch(formulas)
    plain.frac = plain.frac.double()
    ref_loss, ref_grads = loss_and_grads(plain, y, torch.full((7,), 1 / 7).double())
    got_loss, got_grads = loss_and_grads(padded, ys.double(), weight.double())
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert len(got_grads) == len(ref_grads)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    # A later batch whose padding range holds a seen shape reuses it (one graph, not two).
    step._seen[key] = 1
    other = pack_formulas(formulas[:5])
    assert step._shape(len(other), int(other.offsets[-1])) == key


def test_train_step_refuses_graphs_without_capturable_optimizer():
    from flashmoe_science.science.train import TrainStep

    model = CompositionTransformer(("band_gap",), **TINY)
    opt = torch.optim.AdamW(model.parameters())
    prec = _Precision(model, torch.float32)
    step = TrainStep(prec, opt, "band_gap", cuda_graphs=True)  # CPU: graphs are off, no error
    assert not step.graphs
