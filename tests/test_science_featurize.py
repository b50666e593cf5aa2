"""Formula parsing, element properties, packing, baseline features."""

import numpy as np
import pytest

pytest.importorskip("pymatgen.core")

from flashmoe_science.science import featurize as fz  # noqa: E402


def test_parse_formula_brackets_and_decimals():
    z, frac = fz.parse_formula("(Ba0.72K0.28)Fe2As2")
    got = dict(zip(z.tolist(), frac.tolist()))
    total = 0.72 + 0.28 + 2 + 2
    assert got == pytest.approx({56: 0.72 / total, 19: 0.28 / total, 26: 2 / total, 33: 2 / total})
    assert frac.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "bad",
    [
        "KxFe2-ySe2",  # variables
        "NdBa2Cu3O7-d",  # oxygen deficiency
        "(Ba,K)BiO3",  # alternatives
        "Hg-1201",  # family name
        "Na0.3CoO2*1.3H2O",  # hydrate
        "Xx2O",  # unknown element
        "",
    ],
)
def test_parse_formula_rejects(bad):
    with pytest.raises(ValueError):
        fz.parse_formula(bad)


def test_element_table_from_pymatgen():
    raw = fz.raw_element_table()
    assert raw.shape == (fz.MAX_Z + 1, len(fz.PROPERTY_NAMES))
    i = fz.PROPERTY_NAMES.index
    fe = raw[26]
    assert fe[i("Z")] == 26 and fe[i("row")] == 4 and fe[i("group")] == 8
    assert fe[i("electronegativity")] == pytest.approx(1.83)
    assert fe[i("valence_d")] == 6 and fe[i("valence_s")] == 2 and fe[i("block_d")] == 1
    assert raw[8][i("valence_p")] == 4  # oxygen 2p4
    table = fz.element_table()
    assert np.isfinite(table).all() and (table[0] == 0).all()
    assert np.abs(table[1:].mean(0)).max() < 0.2


def test_pack_and_select_roundtrip():
    formulas = ["NaCl", "Fe2O3", "Si", "LiFePO4"]
    p = fz.pack_formulas(formulas)
    assert p.lengths.tolist() == [2, 2, 1, 4]
    sub = p.select([3, 0])
    assert sub.lengths.tolist() == [4, 2]
    np.testing.assert_array_equal(sub.z[4:], p.z[:2])
    batch = sub.to_torch()
    assert batch.cu_seqlens.tolist() == [0, 4, 6] and batch.max_seqlen == 4
    assert batch.seg.tolist() == [0, 0, 0, 0, 1, 1]
    assert batch.runs == ((0, 4, 4), (4, 6, 2))


def test_length_runs():
    assert fz.length_runs(np.array([0, 2, 4, 5, 8, 11])) == ((0, 4, 2), (4, 5, 1), (5, 11, 3))
    assert fz.length_runs(np.array([0])) == ()


def test_composition_features():
    p = fz.pack_formulas(["NaCl", "Fe2O3"])
    x = fz.composition_features(p)
    n_prop = len(fz.PROPERTY_NAMES)
    assert x.shape == (2, 5 * n_prop + fz.MAX_Z + 3)
    i = fz.PROPERTY_NAMES.index("Z")
    assert x[0, i] == pytest.approx((11 + 17) / 2)  # weighted mean
    assert x[1, i] == pytest.approx(0.4 * 26 + 0.6 * 8)
    assert x[1, 2 * n_prop + i] == 8 and x[1, 3 * n_prop + i] == 26  # min, max
    frac = x[:, 5 * n_prop : 5 * n_prop + fz.MAX_Z]
    assert frac[1, 25] == pytest.approx(0.4) and frac.sum(1) == pytest.approx([1, 1])


def test_formula_string():
    assert fz.formula_string(np.array([3, 26, 8]), np.array([2, 1, 3])) == "Li2FeO3"
    assert fz.formula_string(np.array([11, 17]), np.array([1, 1])) == "NaCl"
