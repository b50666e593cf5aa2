"""Offline materials data sets (see DATA.md next to this file for source, licence, citation).

- ``load_expt_gap()``: Matbench ``expt_gap`` (Zhuo et al. 2018), 4,604 compositions with an
  experimental band gap in eV, in Matbench's row order.
- ``matbench_folds(n)``: Matbench's 5-fold protocol (sklearn ``KFold(5, shuffle=True,
  random_state=18012019)``) reproduced with numpy, so no scikit-learn is needed at run time.
- ``load_superconductors()``: 588 measured critical temperatures (Citrine 2016, shipped by
  smlb); ranges become midpoints, unparseable formulas are dropped, duplicates are joined
  by their median.
- ``load_mp_gap()``: Materials Project DFT band gaps (106,113 rows) read from an installed
  ``crabnet`` 2.0.8 wheel (not shipped here: 2 MB), or from a path.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

MATBENCH_SEED = 18012019  # matbench v0.1 validation random_state
EXPT_GAP_ROWS = 4604
SUPERCONDUCTOR_RAW_ROWS = 588
MP_GAP_ROWS = 106113


@dataclass
class MaterialsDataset:
    """Formulas and one regression target (``unit`` says what it is)."""

    name: str
    formulas: list[str]
    targets: np.ndarray
    unit: str
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.formulas)

    def subset(self, index) -> MaterialsDataset:
        index = np.asarray(index, dtype=np.int64)
        return MaterialsDataset(
            self.name, [self.formulas[i] for i in index], self.targets[index], self.unit, dict(self.info)
        )


def _data_file(name: str) -> Path:
    return Path(str(resources.files(__name__).joinpath(name)))


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows


def load_expt_gap() -> MaterialsDataset:
    """Matbench ``expt_gap``: 4,604 formulas, experimental band gap (eV), Matbench order."""
    rows = _read_csv(_data_file("matbench_expt_gap.csv"))
    if rows[0] != ["formula", "target"]:
        raise ValueError(f"matbench_expt_gap.csv has header {rows[0]}; expected ['formula', 'target']")
    rows = rows[1:]
    return MaterialsDataset(
        "expt_gap",
        [r[0] for r in rows],
        np.array([float(r[1]) for r in rows], dtype=np.float64),
        "eV",
        {"source": "matbench_expt_gap (via crabnet 2.0.8)"},
    )


def kfold_indices(
    n: int, n_splits: int = 5, seed: int = MATBENCH_SEED
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays identical to ``sklearn.model_selection.KFold(n_splits,
    shuffle=True, random_state=seed).split(range(n))``."""
    if n_splits < 2 or n_splits > n:
        raise ValueError(f"n_splits must be in [2, n={n}], got {n_splits}")
    indices = np.arange(n)
    np.random.RandomState(seed).shuffle(indices)
    sizes = np.full(n_splits, n // n_splits, dtype=np.int64)
    sizes[: n % n_splits] += 1
    folds, start = [], 0
    for size in sizes:
        test = indices[start : start + size]
        mask = np.ones(n, dtype=bool)
        mask[test] = False
        folds.append((np.arange(n)[mask], np.sort(test)))
        start += size
    return folds


def matbench_folds(n: int = EXPT_GAP_ROWS) -> list[tuple[np.ndarray, np.ndarray]]:
    """Matbench v0.1's 5 regression folds over a data set of ``n`` rows."""
    return kfold_indices(n, 5, MATBENCH_SEED)


def _parse_tc(value: str) -> float:
    value = value.strip()
    if " to " in value:
        low, high = (float(v) for v in value.split(" to "))
        return 0.5 * (low + high)
    return float(value)


def load_superconductors(join_duplicates: bool = True) -> MaterialsDataset:
    """Citrine 2016 superconductors: formula and measured Tc (K).

    Processing: a range "a to b" becomes its midpoint; formulas pymatgen cannot parse into
    elements and amounts (variables such as ``O7-d``, ``KxFe2-ySe2``, family names such as
    ``Hg-1201``, alternatives such as ``(Ba,K)BiO3``) are dropped; with ``join_duplicates``
    rows with the same normalised composition are joined by their median Tc.
    """
    from ..featurize import parse_formula

    rows = _read_csv(_data_file("superconductors_citrine16.csv"))[1:]
    kept: dict[tuple, list] = {}
    order: list[tuple] = []
    dropped = []
    for r in rows:
        formula, tc = r[2], _parse_tc(r[4])
        try:
            z, frac = parse_formula(formula)
        except ValueError:
            dropped.append(formula)
            continue
        key = tuple(sorted(zip(z.tolist(), np.round(frac, 6).tolist()))) if join_duplicates else (len(order),)
        if key not in kept:
            kept[key] = [formula, []]
            order.append(key)
        kept[key][1].append(tc)
    formulas = [kept[k][0] for k in order]
    targets = np.array([float(np.median(kept[k][1])) for k in order], dtype=np.float64)
    info = {
        "source": "smlb 0.3.5 superconductors_citrine16",
        "raw_rows": len(rows),
        "dropped_unparseable": len(dropped),
        "dropped_formulas": dropped,
    }
    return MaterialsDataset("superconductors", formulas, targets, "K", info)


def find_mp_gap(path: str | os.PathLike | None = None) -> Path:
    """Locate ``mp_gap.csv``: an explicit path, ``$FLASHMOE_MP_GAP``, or an installed crabnet
    (found through its distribution metadata; crabnet itself is never imported)."""
    candidates = []
    if path is not None:
        candidates.append(Path(path))
    if os.environ.get("FLASHMOE_MP_GAP"):
        candidates.append(Path(os.environ["FLASHMOE_MP_GAP"]))
    try:
        from importlib import metadata

        dist = metadata.distribution("crabnet")
        candidates.append(Path(str(dist.locate_file("crabnet/data/matbench/mp_gap.csv"))))
    except Exception:  # noqa: BLE001 - crabnet is optional; any failure means "not installed"
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        "mp_gap.csv not found: pass a path, set FLASHMOE_MP_GAP, or install the wheel that ships it: "
        "pip install --no-deps --ignore-requires-python crabnet==2.0.8"
    )


def load_mp_gap(path: str | os.PathLike | None = None) -> MaterialsDataset:
    """Materials Project DFT band gaps (eV), 106,113 compositions (Matbench ``mp_gap``)."""
    rows = _read_csv(find_mp_gap(path))[1:]
    return MaterialsDataset(
        "mp_gap",
        [r[0] for r in rows],
        np.array([float(r[1]) for r in rows], dtype=np.float64),
        "eV",
        {"source": "crabnet 2.0.8 data/matbench/mp_gap.csv"},
    )


DATASETS = {"expt_gap": load_expt_gap, "tc": load_superconductors, "mp_gap": load_mp_gap}


def load_dataset(name: str) -> MaterialsDataset:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name]()


__all__ = [
    "DATASETS",
    "MaterialsDataset",
    "find_mp_gap",
    "kfold_indices",
    "load_dataset",
    "load_expt_gap",
    "load_mp_gap",
    "load_superconductors",
    "matbench_folds",
]
