"""Cross-validated evaluation: the composition transformer next to a scikit-learn baseline
on the same folds, the same train rows and the same metrics; parity plots and a table.

Baseline: a random forest on Magpie-style composition features
(:func:`~flashmoe_science.science.featurize.composition_features`), the classic
"RF-SCM/Magpie" entry of the Matbench leaderboard. Predictions of both models are clipped
at 0 (band gaps and critical temperatures are non-negative).
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .data import MaterialsDataset, kfold_indices, matbench_folds
from .featurize import composition_features, pack_formulas
from .train import TrainConfig, fit, predict, save_model

# Published Matbench v0.1 number for matbench_expt_gap (5-fold mean MAE, eV), as listed on
# the Matbench leaderboard. The "predict the mean" row of every table is computed here.
PUBLISHED_EXPT_GAP = {"Matbench v0.1 leaderboard best (MODNet v0.1.12)": 0.3327}


def mae(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - y)))


def r2(pred: np.ndarray, y: np.ndarray) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def baseline_predict(
    train: MaterialsDataset, test: MaterialsDataset, *, seed: int = 0, n_estimators: int = 300
):
    """Random forest on composition features, fitted on ``train``; predictions for ``test``."""
    from sklearn.ensemble import RandomForestRegressor

    x_tr = composition_features(pack_formulas(train.formulas))
    x_te = composition_features(pack_formulas(test.formulas))
    rf = RandomForestRegressor(
        n_estimators=n_estimators, max_features=0.33, n_jobs=-1, random_state=seed, min_samples_leaf=1
    )
    rf.fit(x_tr, train.targets)
    return rf.predict(x_te)


@dataclass
class CVReport:
    dataset: str
    task: str
    unit: str
    folds: list[int]
    rows: list[dict] = field(default_factory=list)  # one per (fold, model)
    predictions: dict = field(default_factory=dict)  # model -> (formulas, y, pred)

    def summary(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name in sorted({r["model"] for r in self.rows}):
            rs = [r for r in self.rows if r["model"] == name]
            out[name] = {
                "mae_mean": float(np.mean([r["mae"] for r in rs])),
                "mae_std": float(np.std([r["mae"] for r in rs])),
                "r2_mean": float(np.mean([r["r2"] for r in rs])),
                "folds": len(rs),
                "seconds": float(np.sum([r["seconds"] for r in rs])),
            }
        return out

    def table(self) -> str:
        """Markdown table of the fold means (and published numbers for expt_gap)."""
        s = self.summary()
        lines = [
            f"| {self.dataset} ({len(self.folds)} of 5 folds) | MAE ({self.unit}) "
            "| ± std over folds | R² | time (s) |",
            "|---|---|---|---|---|",
        ]
        for name, v in s.items():
            cells = [
                f"{v['mae_mean']:.4f}",
                f"{v['mae_std']:.4f}",
                f"{v['r2_mean']:.3f}",
                f"{v['seconds']:.0f}",
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if self.dataset == "expt_gap":
            for name, value in PUBLISHED_EXPT_GAP.items():
                lines.append(f"| published: {name} | {value:.4f} | | | |")
        return "\n".join(lines)


MODEL_NAME = "flashmoe composition transformer"
BASELINE_NAME = "random forest (Magpie-style features)"
MEAN_NAME = "predict the training mean"


def folds_for(dataset: MaterialsDataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """Matbench's folds for expt_gap; the same KFold recipe (seeded) for the others."""
    if dataset.name == "expt_gap":
        return matbench_folds(len(dataset))
    return kfold_indices(len(dataset), 5)


def cross_validate(
    dataset: MaterialsDataset,
    task: str,
    config: TrainConfig,
    *,
    folds: list[int] | None = None,
    out_dir: str | os.PathLike | None = None,
    baseline: bool = True,
    baseline_trees: int = 300,
    ensemble: int = 1,
    log=None,
) -> CVReport:
    """Train and test on each requested fold; returns the per-fold metrics and predictions.

    ``ensemble`` > 1 trains that many models per fold (seeds ``seed, seed + 1, ...``, each
    with its own validation split) and averages them; the reported std is the ensemble's
    total: sqrt(mean of the members' predicted variances + variance of their means).
    ``out_dir`` receives ``fold{k}/best.pt`` checkpoints (member 0), ``predictions.csv``,
    ``metrics.json``, ``metrics.md`` and ``parity_<dataset>.png``."""
    if ensemble < 1:
        raise ValueError(f"ensemble must be >= 1, got {ensemble}")
    splits = folds_for(dataset)
    folds = list(range(len(splits))) if folds is None else list(folds)
    report = CVReport(dataset.name, task, dataset.unit, folds)
    out = Path(out_dir) if out_dir is not None else None
    preds: dict[str, list] = {MODEL_NAME: [], BASELINE_NAME: [], MEAN_NAME: []}
    for k in folds:
        tr, te = splits[k]
        train, test = dataset.subset(tr), dataset.subset(te)
        ck = out / f"fold{k}" if out is not None else None
        t0 = time.perf_counter()
        packed_test = pack_formulas(test.formulas)
        means, stds, results = [], [], []
        for member in range(ensemble):
            member_dir = ck if ck is None or member == 0 else ck / f"member{member}"
            result = fit(train, task, replace(config, seed=config.seed + member), checkpoint_dir=member_dir)
            mu, sd = predict(result.model, packed_test, task)
            means.append(mu)
            stds.append(sd)
            results.append(result)
        result = results[0]
        pred = np.maximum(np.mean(means, axis=0), 0.0)
        std = np.sqrt(np.mean(np.square(stds), axis=0) + np.var(means, axis=0))
        secs = time.perf_counter() - t0
        if ck is not None:
            save_model(ck / "best.pt", result.model, task, {"fold": k, "best_epoch": result.best_epoch})
        entries = [(MODEL_NAME, pred, secs, std)]
        if baseline:
            t0 = time.perf_counter()
            bpred = baseline_predict(train, test, seed=config.seed, n_estimators=baseline_trees)
            bpred = np.maximum(bpred, 0.0)
            entries.append((BASELINE_NAME, bpred, time.perf_counter() - t0, None))
        entries.append((MEAN_NAME, np.full(len(test), float(np.mean(train.targets))), 0.0, None))
        for name, p, s, sd in entries:
            row = {
                "fold": k,
                "model": name,
                "mae": mae(p, test.targets),
                "r2": r2(p, test.targets),
                "seconds": s,
            }
            if name == MODEL_NAME:
                row.update(
                    best_epoch=[r.best_epoch for r in results],
                    epochs_run=[len(r.history) for r in results],
                    ensemble=ensemble,
                    samples_per_s=float(np.mean([r.samples_per_second for r in results])),
                )
            report.rows.append(row)
            preds[name].append((test.formulas, test.targets, p, sd))
            if log is not None:
                log(f"fold {k}  {name:42s} MAE {row['mae']:.4f} {dataset.unit}  R2 {row['r2']:.3f}")
    report.predictions = {
        name: (
            sum((list(f) for f, _, _, _ in v), []),
            np.concatenate([y for _, y, _, _ in v]),
            np.concatenate([p for _, _, p, _ in v]),
            None if v[0][3] is None else np.concatenate([sd for _, _, _, sd in v]),
        )
        for name, v in preds.items()
        if v
    }
    if out is not None:
        write_report(report, out, config)
    return report


def write_report(report: CVReport, out: Path, config: TrainConfig | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.json", "w") as fh:
        json.dump(
            {
                "dataset": report.dataset,
                "task": report.task,
                "unit": report.unit,
                "folds": report.folds,
                "summary": report.summary(),
                "rows": report.rows,
                "published": PUBLISHED_EXPT_GAP if report.dataset == "expt_gap" else {},
                "train_config": asdict(config) if config is not None else None,
            },
            fh,
            indent=2,
        )
    (out / "metrics.md").write_text(report.table() + "\n")
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "formula", "target", "prediction", "std"])
        for name, (formulas, y, p, sd) in report.predictions.items():
            for i, f in enumerate(formulas):
                w.writerow([name, f, f"{y[i]:.6g}", f"{p[i]:.6g}", "" if sd is None else f"{sd[i]:.6g}"])
    parity_plot(report, out / f"parity_{report.dataset}.png")


def parity_plot(report: CVReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in (MODEL_NAME, BASELINE_NAME) if n in report.predictions]
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 5), squeeze=False)
    summary = report.summary()
    for ax, name in zip(axes[0], names):
        _, y, p, _ = report.predictions[name]
        hi = float(max(y.max(), p.max())) * 1.05 if len(y) else 1.0
        ax.scatter(y, p, s=6, alpha=0.4, edgecolors="none")
        ax.plot([0, hi], [0, hi], "k--", lw=1)
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_xlabel(f"measured ({report.unit})")
        ax.set_ylabel(f"predicted ({report.unit})")
        s = summary[name]
        ax.set_title(f"{name}\nMAE {s['mae_mean']:.3f} {report.unit}, R² {s['r2_mean']:.3f}", fontsize=10)
        ax.set_aspect("equal")
    fig.suptitle(f"{report.dataset}: held-out predictions, folds {report.folds}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "BASELINE_NAME",
    "MEAN_NAME",
    "MODEL_NAME",
    "PUBLISHED_EXPT_GAP",
    "CVReport",
    "baseline_predict",
    "cross_validate",
    "folds_for",
    "mae",
    "parity_plot",
    "r2",
    "write_report",
]
