"""Shipped materials data: row counts, Matbench folds, superconductor processing."""

import numpy as np
import pytest

pytest.importorskip("pymatgen.core")

from flashmoe_science.science import data  # noqa: E402


def test_expt_gap_rows_and_values():
    ds = data.load_expt_gap()
    assert len(ds) == data.EXPT_GAP_ROWS == 4604
    assert len(set(ds.formulas)) == 4604
    assert ds.formulas[:2] == ["Ag(AuS)2", "Ag(W3Br7)2"]  # Matbench row order
    assert (ds.targets >= 0).all() and ds.targets.max() < 12
    assert int((ds.targets == 0).sum()) == 2450  # metals
    # Predicting the mean of all rows: the ~1.14 eV Matbench "dummy" level.
    assert abs(np.mean(np.abs(ds.targets - ds.targets.mean())) - 1.1432) < 1e-3


def test_matbench_folds_match_sklearn_kfold():
    sklearn_ms = pytest.importorskip("sklearn.model_selection")
    folds = data.matbench_folds()
    ref = sklearn_ms.KFold(5, shuffle=True, random_state=18012019).split(np.arange(4604))
    for (tr, te), (rtr, rte) in zip(folds, ref):
        np.testing.assert_array_equal(tr, rtr)
        np.testing.assert_array_equal(te, rte)
    assert [len(te) for _, te in folds] == [921, 921, 921, 921, 920]
    all_test = np.sort(np.concatenate([te for _, te in folds]))
    np.testing.assert_array_equal(all_test, np.arange(4604))


def test_matbench_fold_membership():
    # crabnet's matbench_cv/expt_gap/test0.csv (the same fold) starts with these rows.
    ds = data.load_expt_gap()
    test0 = {ds.formulas[i] for i in data.matbench_folds()[0][1]}
    assert {"Ag2GeSe3", "Ag2Mo(I2O7)2", "TeSe"} <= test0


def test_superconductors_processing():
    ds = data.load_superconductors()
    assert ds.info["raw_rows"] == data.SUPERCONDUCTOR_RAW_ROWS == 588
    assert ds.info["dropped_unparseable"] == 52
    assert len(ds) == 434
    assert ds.unit == "K"
    assert (ds.targets >= 0).all() and ds.targets.max() == 95.0
    assert "Hg-1201" in ds.info["dropped_formulas"]
    raw = data.load_superconductors(join_duplicates=False)
    assert len(raw) == 536


def test_tc_range_midpoint():
    assert data._parse_tc("56 to 62") == 59.0
    assert data._parse_tc("6.3") == 6.3


def test_mp_gap_from_path(tmp_path, monkeypatch):
    f = tmp_path / "mp_gap.csv"
    f.write_text("formula,target\nSi,0.61\nGaAs,0.19\n")
    ds = data.load_mp_gap(f)
    assert ds.formulas == ["Si", "GaAs"] and ds.targets.tolist() == [0.61, 0.19]
    monkeypatch.setenv("FLASHMOE_MP_GAP", str(f))
    assert data.find_mp_gap() == f


def test_mp_gap_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FLASHMOE_MP_GAP", raising=False)
    try:
        path = data.find_mp_gap()
    except FileNotFoundError as exc:
        assert "crabnet==2.0.8" in str(exc)
    else:  # crabnet installed: the real file
        assert sum(1 for _ in open(path)) - 1 == data.MP_GAP_ROWS


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_dataset("nope")
