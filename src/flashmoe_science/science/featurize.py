"""Compositions as element tokens, packed without padding; composition features for baselines.

Shape letters: N compositions, T tokens (one per element of a composition, all compositions
concatenated), P element properties, Z atomic number (1..MAX_Z).

Element properties come from pymatgen's periodic table (``pymatgen-core``), read once and
standardised per property; missing values become 0 after standardisation (the mean).
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch

MAX_Z = 103  # hydrogen .. lawrencium

# Scalar properties read from pymatgen.core.Element (name, attribute).
_SCALAR_PROPS = (
    ("Z", "Z"),
    ("atomic_mass", "atomic_mass"),
    ("row", "row"),
    ("group", "group"),
    ("mendeleev_no", "mendeleev_no"),
    ("electronegativity", "X"),
    ("atomic_radius", "atomic_radius"),
    ("average_ionic_radius", "average_ionic_radius"),
    ("ionization_energy", "ionization_energy"),
    ("electron_affinity", "electron_affinity"),
    ("molar_volume", "molar_volume"),
    ("melting_point", "melting_point"),
)
_DERIVED_PROPS = (
    "valence_s",
    "valence_p",
    "valence_d",
    "valence_f",
    "block_s",
    "block_p",
    "block_d",
    "block_f",
)
PROPERTY_NAMES: tuple[str, ...] = tuple(n for n, _ in _SCALAR_PROPS) + _DERIVED_PROPS


def _valence(el) -> tuple[float, float, float, float]:
    """Electrons in the outer s, p shell (max n), (n-1)d and (n-2)f."""
    shells = el.full_electronic_structure
    n_max = max(n for n, _, _ in shells)
    counts = {"s": 0.0, "p": 0.0, "d": 0.0, "f": 0.0}
    for n, orb, occ in shells:
        if (orb in "sp" and n == n_max) or (orb == "d" and n == n_max - 1) or (orb == "f" and n == n_max - 2):
            counts[orb] += float(occ)
    return counts["s"], counts["p"], counts["d"], counts["f"]


@functools.lru_cache(maxsize=1)
def element_symbols() -> tuple[str, ...]:
    """Symbols indexed by Z (index 0 is a placeholder)."""
    from pymatgen.core.periodic_table import Element

    return ("",) + tuple(Element.from_Z(z).symbol for z in range(1, MAX_Z + 1))


@functools.lru_cache(maxsize=1)
def raw_element_table() -> np.ndarray:
    """(MAX_Z + 1, P) float64 properties in pymatgen's units; NaN where pymatgen has none."""
    from pymatgen.core.periodic_table import Element

    table = np.full((MAX_Z + 1, len(PROPERTY_NAMES)), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns for every missing value
        for z in range(1, MAX_Z + 1):
            el = Element.from_Z(z)
            row = []
            for _, attr in _SCALAR_PROPS:
                try:
                    v = getattr(el, attr)
                    row.append(float(v) if v is not None else np.nan)
                except (TypeError, ValueError, AttributeError, KeyError):
                    row.append(np.nan)
            try:
                row.extend(_valence(el))
            except (TypeError, ValueError, AttributeError, KeyError):
                row.extend([np.nan] * 4)
            row.extend(float(el.block == b) for b in "spdf")
            table[z] = row
    return table


@functools.lru_cache(maxsize=1)
def element_table() -> np.ndarray:
    """(MAX_Z + 1, P) float32 standardised properties (zero mean, unit std over Z=1..MAX_Z),
    missing values at 0; row 0 (no element) is all zeros."""
    raw = raw_element_table()[1:]
    mean = np.nanmean(raw, axis=0)
    std = np.nanstd(raw, axis=0)
    std[std == 0] = 1.0
    out = np.zeros((MAX_Z + 1, raw.shape[1]), dtype=np.float32)
    out[1:] = np.nan_to_num((raw - mean) / std, nan=0.0)
    return out


_BAD_FORMULA = re.compile(r"[^A-Za-z0-9.()\[\]]")


def parse_formula(formula: str) -> tuple[np.ndarray, np.ndarray]:
    """``"(Ba0.72K0.28)Fe2As2"`` -> (Z int64 (n,), fractions float64 (n,) summing to 1).

    Raises ValueError for anything that is not a plain formula of real elements (variables
    like ``x``/``d``, ``+``/``-``/``,``, hydrate dots, unknown symbols, Z > MAX_Z).
    Results are cached (pymatgen's parser costs ~0.5 ms a formula)."""
    z, frac = _parse_cached(formula)
    return np.array(z, dtype=np.int64), np.array(frac, dtype=np.float64)


@functools.lru_cache(maxsize=200_000)
def _parse_cached(formula: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    from pymatgen.core import Composition

    if not isinstance(formula, str) or not formula.strip() or _BAD_FORMULA.search(formula.strip()):
        raise ValueError(f"cannot parse formula {formula!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            amounts = Composition(formula.strip()).get_el_amt_dict()
    except Exception as exc:  # noqa: BLE001 - pymatgen raises many types for bad input
        raise ValueError(f"cannot parse formula {formula!r}: {exc}") from exc
    symbols = element_symbols()
    z, amt = [], []
    for sym, a in amounts.items():
        if sym not in symbols or a <= 0:
            raise ValueError(f"formula {formula!r} has element {sym!r} with amount {a}; not supported")
        z.append(symbols.index(sym))
        amt.append(float(a))
    if not z:
        raise ValueError(f"formula {formula!r} has no elements")
    total = sum(amt)
    return tuple(z), tuple(a / total for a in amt)


@dataclass
class PackedCompositions:
    """N compositions as flat token arrays: ``z`` (T,) int64, ``frac`` (T,) float32,
    ``offsets`` (N + 1,) int64 prefix sums of the per-composition element counts."""

    z: np.ndarray
    frac: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, index) -> PackedCompositions:
        """Compositions ``index`` (any order), gathered without a Python loop."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = np.repeat(self.offsets[:-1][index], lengths)
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        tok = starts + within
        return PackedCompositions(self.z[tok], self.frac[tok], offsets)

    def to_torch(self, device=None) -> PackedBatch:
        lengths = self.lengths
        return PackedBatch(
            z=torch.as_tensor(self.z, device=device),
            frac=torch.as_tensor(self.frac, device=device),
            cu_seqlens=torch.as_tensor(self.offsets.astype(np.int32), device=device),
            seg=torch.as_tensor(np.repeat(np.arange(len(lengths)), lengths), device=device),
            max_seqlen=int(lengths.max()) if len(lengths) else 0,
            runs=length_runs(self.offsets),
        )


def length_runs(offsets: np.ndarray) -> tuple[tuple[int, int, int], ...]:
    """Maximal runs of consecutive compositions with the same element count L, as
    (first token, end token, L): each run is a dense (n, L) block with no padding."""
    lengths = np.diff(offsets)
    if len(lengths) == 0:
        return ()
    breaks = np.flatnonzero(np.diff(lengths)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(lengths)]])
    return tuple((int(offsets[a]), int(offsets[b]), int(lengths[a])) for a, b in zip(starts, ends))


@dataclass
class PackedBatch:
    """Model input on a device: z (T,), frac (T,), cu_seqlens int32 (N + 1,), seg (T,) the
    composition of each token, max_seqlen, and ``runs`` (see :func:`length_runs`; host-side
    metadata for the length-bucketed attention path)."""

    z: torch.Tensor
    frac: torch.Tensor
    cu_seqlens: torch.Tensor
    seg: torch.Tensor
    max_seqlen: int
    runs: tuple[tuple[int, int, int], ...] = ()

    @property
    def num_compositions(self) -> int:
        return self.cu_seqlens.numel() - 1


def pack_formulas(formulas: list[str]) -> PackedCompositions:
    """Parse and pack formulas (raises ValueError naming the first one that does not parse)."""
    zs, fs = [], []
    for f in formulas:
        z, frac = parse_formula(f)
        zs.append(z)
        fs.append(frac)
    lengths = np.array([len(z) for z in zs], dtype=np.int64)
    offsets = np.zeros(len(zs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    z = np.concatenate(zs) if zs else np.zeros(0, dtype=np.int64)
    frac = np.concatenate(fs).astype(np.float32) if fs else np.zeros(0, dtype=np.float32)
    return PackedCompositions(z, frac, offsets)


def composition_features(packed: PackedCompositions) -> np.ndarray:
    """Magpie-style (Ward et al. 2016) features for tree baselines: for every element
    property its fraction-weighted mean, weighted mean absolute deviation, min, max and
    range; the element-fraction vector (MAX_Z); element count and the L2, L3 norms of the
    fractions. Returns (N, 5 * P + MAX_Z + 3) float64."""
    table = raw_element_table()
    n = len(packed)
    starts = packed.offsets[:-1]
    props = table[packed.z]  # (T, P), NaN where missing
    col_mean = np.nanmean(table[1:], axis=0)
    props = np.where(np.isnan(props), col_mean, props)
    w = packed.frac.astype(np.float64)[:, None]
    seg = np.repeat(np.arange(n), packed.lengths)
    mean = np.add.reduceat(props * w, starts, axis=0)
    dev = np.add.reduceat(np.abs(props - mean[seg]) * w, starts, axis=0)
    pmin = np.minimum.reduceat(props, starts, axis=0)
    pmax = np.maximum.reduceat(props, starts, axis=0)
    fractions = np.zeros((n, MAX_Z), dtype=np.float64)
    np.add.at(fractions, (seg, packed.z - 1), packed.frac)
    f = packed.frac.astype(np.float64)
    count = packed.lengths.astype(np.float64)[:, None]
    l2 = np.sqrt(np.add.reduceat(f**2, starts))[:, None]
    l3 = np.cbrt(np.add.reduceat(f**3, starts))[:, None]
    return np.concatenate([mean, dev, pmin, pmax, pmax - pmin, fractions, count, l2, l3], axis=1)


def formula_string(z: np.ndarray, amounts: np.ndarray) -> str:
    """A readable formula from atomic numbers and amounts, elements ordered by Pauling
    electronegativity (then symbol): (3, 26, 8), (2, 1, 3) -> Li2FeO3."""
    from pymatgen.core.periodic_table import Element

    symbols = element_symbols()
    items = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for zi, a in zip(z.tolist(), amounts.tolist()):
            x = Element(symbols[int(zi)]).X
            items.append((x if x == x else 99.0, symbols[int(zi)], float(a)))  # NaN X sorts last
    parts = []
    for _, sym, a in sorted(items):
        parts.append(sym + ("" if a == 1 else (str(int(a)) if a.is_integer() else f"{a:g}")))
    return "".join(parts)


__all__ = [
    "MAX_Z",
    "PROPERTY_NAMES",
    "PackedBatch",
    "PackedCompositions",
    "composition_features",
    "element_symbols",
    "element_table",
    "formula_string",
    "length_runs",
    "pack_formulas",
    "parse_formula",
    "raw_element_table",
]
