"""Screening: enumerate compositions over an element set and a stoichiometry grid, predict
them in large packed batches, keep the best.

Candidates: every subset of ``min_elements..max_elements`` elements of the set, every
integer amount vector in ``1..max_amount`` per element whose entries have no common
divisor (so Fe2O3 appears once, not also as Fe4O6), optionally capped at ``max_atoms``
atoms per formula unit. Enumeration is vectorised (numpy) and streamed in chunks of
``chunk_size`` candidates; only the running top-k, a count and a reservoir sample of the
predictions (for the histogram) are kept, so millions of candidates fit in little memory.
All candidates of a chunk have the same element count L, so a chunk packs into
``cu_seqlens = [0, L, 2L, ...]`` with no padding at all.
"""

from __future__ import annotations

import csv
import functools
import itertools
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from math import comb
from pathlib import Path

import numpy as np
import torch

from .featurize import MAX_Z, PackedBatch, element_symbols, formula_string, pack_formulas
from .model import CompositionTransformer


def amount_grid(length: int, max_amount: int, max_atoms: int | None = None) -> np.ndarray:
    """(G, L) int64: all vectors in [1, max_amount]^L with gcd 1 (and sum <= max_atoms)."""
    grid = np.indices((max_amount,) * length).reshape(length, -1).T + 1
    keep = np.gcd.reduce(grid, axis=1) == 1
    if max_atoms is not None:
        keep &= grid.sum(axis=1) <= max_atoms
    return grid[keep]


@functools.lru_cache(maxsize=1)
def oxidation_state_table(max_states: int = 8) -> np.ndarray:
    """(MAX_Z + 1, max_states) float64: per element the union of pymatgen's common
    oxidation states and those seen in the ICSD (Cu(+1) is not "common" in pymatgen, yet
    CuInSe2 needs it), NaN-padded (elements without any, e.g. noble gases, are all NaN)."""
    from pymatgen.core.periodic_table import Element

    table = np.full((MAX_Z + 1, max_states), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for z in range(1, MAX_Z + 1):
            el = Element.from_Z(z)
            states = sorted(set(el.common_oxidation_states) | set(el.icsd_oxidation_states))[:max_states]
            table[z, : len(states)] = states
    return table


def charge_balanced(z: np.ndarray, amounts: np.ndarray) -> np.ndarray:
    """(n,) bool: some assignment of common oxidation states makes the formula neutral,
    sum_i n_i q_i = 0, with every cation less electronegative than every anion (the
    "Pauling test" of SMACT; it rules out e.g. Sn(-4) with S(+2)).

    Vectorised over the chunk: all S^L state combinations at once (L elements, S states)."""
    from .featurize import PROPERTY_NAMES, raw_element_table

    table = oxidation_state_table()
    x = raw_element_table()[:, PROPERTY_NAMES.index("electronegativity")]
    n, length = z.shape
    s = table.shape[1]
    combos = np.indices((s,) * length).reshape(length, -1).T  # (S^L, L)
    out = np.zeros(n, dtype=bool)
    rows = max(1, (1 << 21) // (len(combos) * length))  # bound the (rows, S^L, L) temporaries
    for r0 in range(0, n, rows):
        zz, aa = z[r0 : r0 + rows], amounts[r0 : r0 + rows]
        vals = table[zz][:, np.arange(length)[None, :], combos]  # (r, S^L, L), NaN = no state
        total = (vals * aa[:, None, :]).sum(-1)
        chi = np.broadcast_to(x[zz][:, None, :], vals.shape)
        with np.errstate(invalid="ignore"):
            max_cation = np.where(vals > 0, chi, -np.inf).max(-1)
            min_anion = np.where(vals < 0, chi, np.inf).min(-1)
            out[r0 : r0 + rows] = ((total == 0) & (max_cation < min_anion)).any(axis=1)
    return out


def parse_elements(elements: str | list[str]) -> list[int]:
    """ "Li,Fe,O" or ["Li", "Fe", "O"] -> sorted unique atomic numbers."""
    names = elements.split(",") if isinstance(elements, str) else list(elements)
    symbols = element_symbols()
    out = set()
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name not in symbols:
            raise ValueError(f"unknown element {name!r} in elements; expected symbols such as 'Li,Fe,O'")
        out.add(symbols.index(name))
    if not out:
        raise ValueError("elements is empty; pass symbols such as 'Li,Fe,O'")
    return sorted(out)


@dataclass
class Space:
    z: list[int]
    min_elements: int = 2
    max_elements: int = 3
    max_amount: int = 6
    max_atoms: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_elements <= self.max_elements:
            raise ValueError(
                f"need 1 <= min_elements ({self.min_elements}) <= max_elements ({self.max_elements})"
            )
        if self.max_elements > len(self.z):
            raise ValueError(f"max_elements={self.max_elements} exceeds the {len(self.z)} elements given")
        if self.max_amount < 1:
            raise ValueError(f"max_amount must be >= 1, got {self.max_amount}")

    def grids(self) -> dict[int, np.ndarray]:
        return {
            n: amount_grid(n, self.max_amount, self.max_atoms)
            for n in range(self.min_elements, self.max_elements + 1)
        }

    def size(self) -> int:
        return sum(comb(len(self.z), n) * len(g) for n, g in self.grids().items())

    def chunks(self, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (z (n, L), amounts (n, L)) int64 chunks of at most ~chunk_size rows."""
        zs = np.asarray(self.z, dtype=np.int64)
        for n, grid in self.grids().items():
            if len(grid) == 0:
                continue
            combos_per_chunk = max(1, chunk_size // len(grid))
            combos = itertools.combinations(range(len(zs)), n)
            while True:
                block = np.array(list(itertools.islice(combos, combos_per_chunk)), dtype=np.int64)
                if len(block) == 0:
                    break
                z = np.repeat(zs[block], len(grid), axis=0)  # (C*G, L)
                amounts = np.tile(grid, (len(block), 1))
                yield z, amounts


def chunk_batch(z: np.ndarray, amounts: np.ndarray, device: torch.device) -> PackedBatch:
    """A chunk of equal-length candidates as a packed batch (built on ``device``)."""
    n, length = z.shape
    zt = torch.as_tensor(z, device=device).reshape(-1)
    a = torch.as_tensor(amounts, device=device, dtype=torch.float32)
    frac = (a / a.sum(dim=1, keepdim=True)).reshape(-1)
    cu = torch.arange(0, (n + 1) * length, length, dtype=torch.int32, device=device)
    seg = torch.arange(n, device=device).repeat_interleave(length)
    return PackedBatch(zt, frac, cu, seg, length, ((0, n * length, length),))


def _objective_score(mean: torch.Tensor, std: torch.Tensor, objective: str, kappa: float) -> torch.Tensor:
    """Higher is better. ``max``: mean - kappa*std; ``min``: -(mean + kappa*std);
    ``target:V``: -(|mean - V| + kappa*std)."""
    if objective == "max":
        return mean - kappa * std
    if objective == "min":
        return -(mean + kappa * std)
    if objective.startswith("target:"):
        value = float(objective.split(":", 1)[1])
        return -((mean - value).abs() + kappa * std)
    raise ValueError(f"objective must be 'max', 'min' or 'target:<value>', got {objective!r}")


@dataclass
class ScreenResult:
    task: str
    objective: str
    n_candidates: int  # predicted (after the charge-balance filter, if any)
    seconds: float
    top: list[dict]
    sample: np.ndarray = field(repr=False)  # reservoir sample of predicted means
    n_enumerated: int = 0

    @property
    def candidates_per_second(self) -> float:
        return self.n_candidates / self.seconds if self.seconds > 0 else float("nan")


def _composition_key(z, frac) -> tuple:
    return tuple(sorted(zip((int(v) for v in z), (round(float(f), 4) for f in frac))))


@torch.no_grad()
def screen(
    model: CompositionTransformer,
    task: str,
    space: Space,
    *,
    objective: str = "max",
    kappa: float = 0.0,
    top_k: int = 50,
    chunk_size: int = 65536,
    known_formulas: list[str] | None = None,
    sample_size: int = 100_000,
    require_charge_balance: bool = False,
    progress: bool = True,
    seed: int = 0,
    cuda_graphs: bool = True,
) -> ScreenResult:
    """Predict every candidate of ``space`` and keep the ``top_k`` by ``objective``. On CUDA
    each chunk shape's forward is captured once as a CUDA graph and replayed
    (:class:`~flashmoe_science.science.model.GraphedPredictor`; ``cuda_graphs=False`` runs
    it eagerly)."""
    from .model import GraphedPredictor
    from .train import for_inference

    device = next(model.parameters()).device
    model = for_inference(model)
    if cuda_graphs and device.type == "cuda":
        predict = GraphedPredictor(model, task)
    else:

        def predict(batch):
            return model.predict(batch, task)

    if objective not in ("max", "min") and not objective.startswith("target:"):
        _objective_score(torch.zeros(1), torch.zeros(1), objective, kappa)  # raises with the message
    total = space.size()
    width = space.max_elements
    best_score = torch.empty(0, device=device)
    best_mean = torch.empty(0, device=device)
    best_std = torch.empty(0, device=device)
    best_z = torch.empty((0, width), dtype=torch.int64, device=device)
    best_amt = torch.empty((0, width), dtype=torch.int64, device=device)
    rng = np.random.default_rng(seed)
    sample: list[torch.Tensor] = []  # on the device: reading means back would sync every chunk
    # Reservoir-style sample for the histogram: a fixed fraction of every chunk.
    frac_keep = min(1.0, sample_size / max(total, 1))
    seen = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"screen {task}", unit="cand", unit_scale=True, leave=False)
    t0 = time.perf_counter()
    enumerated = 0
    for z, amounts in space.chunks(chunk_size):
        enumerated += len(z)
        if bar is not None:
            bar.update(len(z))
        if require_charge_balance:
            keep = charge_balanced(z, amounts)
            z, amounts = z[keep], amounts[keep]
            if len(z) == 0:
                continue
        batch = chunk_batch(z, amounts, device)
        mean, std = predict(batch)
        mean = mean.float().clamp_min(0.0)
        std = std.float()
        score = _objective_score(mean, std, objective, kappa)
        pad = width - z.shape[1]
        zt = torch.nn.functional.pad(torch.as_tensor(z, device=device), (0, pad))
        at = torch.nn.functional.pad(torch.as_tensor(amounts, device=device), (0, pad))
        best_score = torch.cat([best_score, score])
        best_mean = torch.cat([best_mean, mean])
        best_std = torch.cat([best_std, std])
        best_z = torch.cat([best_z, zt])
        best_amt = torch.cat([best_amt, at])
        k = min(top_k, best_score.numel())
        idx = torch.topk(best_score, k).indices
        best_score, best_mean, best_std = best_score[idx], best_mean[idx], best_std[idx]
        best_z, best_amt = best_z[idx], best_amt[idx]
        take = np.flatnonzero(rng.random(len(z)) < frac_keep)
        sample.append(mean[torch.as_tensor(take, device=device)])
        seen += len(z)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    known = set()
    if known_formulas:
        packed = pack_formulas(known_formulas)
        for i in range(len(packed)):
            s, e = packed.offsets[i], packed.offsets[i + 1]
            known.add(_composition_key(packed.z[s:e], packed.frac[s:e]))
    top = []
    zs, am = best_z.cpu().numpy(), best_amt.cpu().numpy()
    for i in range(best_score.numel()):
        keep = zs[i] > 0
        zi, ai = zs[i][keep], am[i][keep]
        frac = ai / ai.sum()
        top.append(
            {
                "rank": i + 1,
                "formula": formula_string(zi, ai),
                "prediction": float(best_mean[i]),
                "std": float(best_std[i]),
                "score": float(best_score[i]),
                "in_training_data": _composition_key(zi, frac) in known,
            }
        )
    sampled = torch.cat(sample).cpu().numpy().astype(np.float64) if sample else np.zeros(0)
    return ScreenResult(task, objective, seen, seconds, top, sampled, enumerated)


def write_screen(result: ScreenResult, out_dir: str | os.PathLike, unit: str = "") -> tuple[Path, Path]:
    """``screen_<task>.csv`` (the ranked top-k) and ``screen_<task>.png`` (histogram of the
    sampled predictions and the top candidates with their uncertainty)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"screen_{result.task}.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(
            fh, fieldnames=["rank", "formula", "prediction", "std", "score", "in_training_data"]
        )
        w.writeheader()
        for row in result.top:
            w.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in row.items()})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    if len(result.sample):
        ax1.hist(result.sample, bins=60, color="tab:blue", alpha=0.8)
    ax1.set_xlabel(f"predicted {result.task} {unit}".strip())
    ax1.set_ylabel("candidates (sampled)")
    ax1.set_title(f"{result.n_candidates:,} candidates, {result.candidates_per_second:,.0f}/s", fontsize=10)
    shown = result.top[:20]
    ax2.barh(
        range(len(shown))[::-1],
        [r["prediction"] for r in shown],
        xerr=[r["std"] for r in shown],
        color=["tab:gray" if r["in_training_data"] else "tab:orange" for r in shown],
    )
    ax2.set_yticks(range(len(shown))[::-1], [r["formula"] for r in shown], fontsize=7)
    ax2.set_xlabel(f"predicted {result.task} {unit} (± predicted std; grey = in training data)".strip())
    ax2.set_title(f"top {len(shown)} by objective {result.objective!r}", fontsize=10)
    fig.tight_layout()
    png_path = out / f"screen_{result.task}.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return csv_path, png_path


def space_summary(space: Space) -> str:
    symbols = element_symbols()
    els = ",".join(symbols[z] for z in space.z)
    return (
        f"{space.size():,} candidates over {{{els}}}, {space.min_elements}-{space.max_elements} elements, "
        f"amounts 1..{space.max_amount}" + (f", <= {space.max_atoms} atoms" if space.max_atoms else "")
    )


__all__ = [
    "ScreenResult",
    "Space",
    "amount_grid",
    "charge_balanced",
    "chunk_batch",
    "oxidation_state_table",
    "parse_elements",
    "screen",
    "space_summary",
    "write_screen",
]
