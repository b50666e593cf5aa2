"""``flashmoe-science``: the materials pipeline from the command line.

Subcommands:
  demo      train on Matbench expt_gap (a CPU-sized budget by default, ``--full`` for the
            5-fold protocol), compare with a random-forest baseline, fit a Tc model, screen
            a small composition space; writes tables, plots and CSVs into ``--out``.
  train     train one model (all rows, or one fold's training rows) and save a checkpoint.
  evaluate  k-fold cross-validation against the baseline; metrics table and parity plot.
  screen    rank an enumerated composition space with a trained checkpoint.

On a machine without CUDA everything runs the library's PyTorch reference path; on a GPU
the Triton kernels (bfloat16, float32 master weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path


def _log(msg: str) -> None:
    print(msg, flush=True)


def _add_train_args(p: argparse.ArgumentParser, *, epochs: int) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help=f"maximum epochs per model (default {epochs})")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience in epochs")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget per model (stops early)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ffn", type=int, default=128, help="hidden size of each expert")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on CUDA, run every training step eagerly instead of replaying captured graphs",
    )
    p.add_argument("--trees", type=int, default=300, help="trees of the random-forest baseline")
    p.add_argument(
        "--ensemble", type=int, default=1, help="models per fold, averaged (seeds seed, seed+1, ...)"
    )


def _train_config(args):
    from .science.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        max_minutes=args.minutes,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        cuda_graphs=not args.no_cuda_graphs,
        model={
            "dim": args.dim,
            "heads": args.heads,
            "layers": args.layers,
            "experts": args.experts,
            "top_k": args.top_k,
            "ffn": args.ffn,
        },
    )


def _parse_folds(text: str) -> list[int]:
    folds = [int(f) for f in text.split(",") if f.strip()]
    if not folds or any(not 0 <= f < 5 for f in folds):
        raise SystemExit(f"--folds must list fold numbers in 0..4, got {text!r}")
    return folds


def _environment(device: str) -> dict:
    import torch

    from .science.train import resolve_device

    dev = resolve_device(device)
    name = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    )
    return {
        "device": f"{dev} ({name})",
        "path": "Triton kernels (bfloat16)" if dev.type == "cuda" else "PyTorch reference path (float32)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "flashmoe-science " + " ".join(sys.argv[1:]),
    }


def _setup(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _dataset(name: str):
    from .science.data import load_dataset

    ds = load_dataset(name)
    from .science.train import TASK_OF_DATASET

    return ds, TASK_OF_DATASET[ds.name]


def cmd_evaluate(args) -> int:
    from .science.evaluate import cross_validate

    _setup(args)
    ds, task = _dataset(args.dataset)
    env = _environment(args.device)
    _log(f"{args.dataset}: {len(ds)} rows; folds {args.folds}; {env['path']} on {env['device']}")
    report = cross_validate(
        ds,
        task,
        _train_config(args),
        folds=_parse_folds(args.folds),
        out_dir=args.out,
        baseline=not args.no_baseline,
        baseline_trees=args.trees,
        ensemble=args.ensemble,
        log=_log,
    )
    (Path(args.out) / "environment.json").write_text(json.dumps(env, indent=2))
    _log("\n" + report.table())
    _log(f"\nwrote {args.out}/metrics.md, metrics.json, predictions.csv, parity_{ds.name}.png")
    return 0


def cmd_train(args) -> int:
    from .science.evaluate import folds_for
    from .science.train import fit, save_model

    _setup(args)
    ds, task = _dataset(args.dataset)
    if args.fold is not None:
        tr, _ = folds_for(ds)[args.fold]
        ds = ds.subset(tr)
    out = Path(args.out)
    cfg = _train_config(args)
    _log(f"training {task} on {len(ds)} rows of {args.dataset}; checkpoints in {out}")
    result = fit(ds, task, cfg, checkpoint_dir=out, resume=args.resume)
    meta = {
        "dataset": args.dataset,
        "fold": args.fold,
        "best_epoch": result.best_epoch,
        "config": asdict(cfg),
    }
    save_model(out / "model.pt", result.model, task, meta)
    _log(
        f"best validation MAE {result.best_val_mae:.4f} {ds.unit} at epoch {result.best_epoch}; "
        f"{result.samples_per_second:.0f} samples/s; saved {out / 'model.pt'}"
    )
    return 0


def _run_screen(model, task, args, out: Path, unit: str, known=None):
    from .science.screen import Space, parse_elements, screen, space_summary, write_screen

    space = Space(
        parse_elements(args.elements), args.min_elements, args.max_elements, args.max_amount, args.max_atoms
    )
    _log(f"screening {space_summary(space)}; objective {args.objective!r}")
    result = screen(
        model,
        task,
        space,
        objective=args.objective,
        kappa=args.kappa,
        top_k=args.top,
        chunk_size=args.chunk_size,
        known_formulas=known,
        progress=not args.no_progress,
        require_charge_balance=args.charge_balanced,
    )
    csv_path, png_path = write_screen(result, out, unit)
    rate = result.candidates_per_second
    kept = f" ({result.n_candidates:,} charge-balanced)" if args.charge_balanced else ""
    _log(f"{result.n_enumerated:,} candidates{kept} in {result.seconds:.1f} s ({rate:,.0f} predicted/s)")
    for row in result.top[:10]:
        flag = "  (in training data)" if row["in_training_data"] else ""
        pred = f"{row['prediction']:7.3f} ± {row['std']:.3f} {unit}"
        _log(f"  {row['rank']:3d}. {row['formula']:18s} {pred}{flag}")
    _log(f"wrote {csv_path} and {png_path}")
    return result


def cmd_screen(args) -> int:
    from .science.train import load_model

    _setup(args)
    model, task = load_model(args.checkpoint, _device_str(args.device))
    unit = "eV" if task == "band_gap" else "K"
    known = None
    if args.exclude_known:
        known = _dataset("expt_gap" if task == "band_gap" else "tc")[0].formulas
    _run_screen(model, task, args, Path(args.out), unit, known)
    return 0


def _device_str(device: str) -> str:
    from .science.train import resolve_device

    return str(resolve_device(device))


def cmd_demo(args) -> int:
    from .science.evaluate import cross_validate
    from .science.train import resolve_device

    _setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.full:
        args.folds, args.tc_folds = "0,1,2,3,4", "0,1,2,3,4"
        args.minutes = None
    env = _environment(args.device)
    _log(f"FlashMoE-Science materials demo — {env['path']} on {env['device']}, torch {env['torch']}")
    t_start = time.perf_counter()
    cfg = _train_config(args)

    ds, task = _dataset("expt_gap")
    folds = _parse_folds(args.folds)
    _log(f"\n[1/3] Matbench expt_gap: {len(ds)} compositions, experimental band gap (eV); folds {folds}")
    gap = cross_validate(
        ds,
        task,
        cfg,
        folds=folds,
        out_dir=out / "expt_gap",
        baseline_trees=args.trees,
        ensemble=args.ensemble,
        log=_log,
    )
    _log("\n" + gap.table())

    tc_table = ""
    if not args.skip_tc:
        tc, tc_task = _dataset("tc")
        tc_folds = _parse_folds(args.tc_folds)
        _log(f"\n[2/3] Superconductors: {len(tc)} compositions, measured Tc (K); folds {tc_folds}")
        tc_cfg = _train_config(args)
        tc_cfg.epochs = args.tc_epochs
        tc_cfg.batch_size = 64
        tc_report = cross_validate(
            tc,
            tc_task,
            tc_cfg,
            folds=tc_folds,
            out_dir=out / "tc",
            baseline_trees=args.trees,
            ensemble=args.ensemble,
            log=_log,
        )
        tc_table = tc_report.table()
        _log("\n" + tc_table)

    _log("\n[3/3] Screening with the fold-0 band-gap model")
    from .science.train import load_model

    model, _ = load_model(out / "expt_gap" / f"fold{folds[0]}" / "best.pt", resolve_device(args.device))
    result = _run_screen(model, task, args, out / "screen", "eV", known=ds.formulas)

    summary = {
        "environment": env,
        "expt_gap": gap.summary(),
        "tc": None if args.skip_tc else tc_report.summary(),
        "screen": {"candidates": result.n_candidates, "seconds": result.seconds, "top": result.top[:10]},
        "seconds": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    md = ["# flashmoe-science demo", "", f"{env['command']} — {env['date']} — {env['device']}", ""]
    md += [
        gap.table(),
        "",
        tc_table,
        "",
        f"Screening: {result.n_candidates:,} candidates in {result.seconds:.1f} s.",
    ]
    (out / "metrics.md").write_text("\n".join(md) + "\n")
    s = gap.summary()
    from .science.evaluate import BASELINE_NAME, MODEL_NAME

    _log(
        f"\nexpt_gap MAE: model {s[MODEL_NAME]['mae_mean']:.4f} eV "
        f"vs baseline {s[BASELINE_NAME]['mae_mean']:.4f} eV "
        f"({len(folds)} fold(s)); total {summary['seconds'] / 60:.1f} min; outputs in {out}/"
    )
    return 0


def _add_screen_args(
    p: argparse.ArgumentParser,
    *,
    elements: str,
    objective: str,
    max_elements: int,
    max_amount: int,
    kappa: float = 0.0,
):
    p.add_argument(
        "--elements", default=elements, help=f"comma-separated element symbols (default {elements})"
    )
    p.add_argument("--min-elements", type=int, default=2)
    p.add_argument("--max-elements", type=int, default=max_elements)
    p.add_argument("--max-amount", type=int, default=max_amount, help="largest integer amount per element")
    p.add_argument("--max-atoms", type=int, default=None, help="cap on atoms per formula unit")
    p.add_argument(
        "--objective",
        default=objective,
        help="max, min or target:<value> (closest to value); default %(default)s",
    )
    p.add_argument(
        "--kappa", type=float, default=kappa, help="penalise the predicted std by this factor (%(default)s)"
    )
    p.add_argument("--top", type=int, default=50)
    p.add_argument(
        "--charge-balanced",
        action="store_true",
        help="keep only candidates that some common oxidation states make neutral (pymatgen)",
    )
    p.add_argument("--chunk-size", type=int, default=65536)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashmoe-science",
        description="FlashMoE-Science materials pipeline: demo, train, evaluate, screen.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train, compare with the baseline, screen; CPU-sized by default")
    p.add_argument("--out", default="flashmoe_demo")
    p.add_argument(
        "--full", action="store_true", help="Matbench 5-fold protocol for both data sets, no time cap"
    )
    p.add_argument("--folds", default="0", help="expt_gap folds to run (default 0)")
    p.add_argument("--tc-folds", default="0")
    p.add_argument("--tc-epochs", type=int, default=60)
    p.add_argument("--skip-tc", action="store_true")
    _add_train_args(p, epochs=80)
    p.set_defaults(minutes=4.0)  # per model; --full lifts it
    _add_screen_args(
        p,
        elements="Li,Na,K,Mg,Ca,Ba,Zn,Cu,Ga,In,Sn,Bi,N,O,S,Se,F,Cl,I",
        objective="target:1.4",  # near the single-junction solar optimum
        max_elements=3,
        max_amount=4,
        kappa=1.0,  # prefer confident predictions: rank by |mu - 1.4| + sigma
    )
    p.set_defaults(func=cmd_demo, charge_balanced=True)  # the demo screens neutral formulas only

    p = sub.add_parser("train", help="train one model and save a checkpoint")
    p.add_argument("--dataset", default="expt_gap", choices=["expt_gap", "tc", "mp_gap"])
    p.add_argument("--fold", type=int, default=None, help="train on this Matbench fold's training rows only")
    p.add_argument("--out", default="flashmoe_model")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    _add_train_args(p, epochs=80)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="k-fold CV against a random-forest baseline")
    p.add_argument("--dataset", default="expt_gap", choices=["expt_gap", "tc"])
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--out", default="flashmoe_eval")
    p.add_argument("--no-baseline", action="store_true")
    _add_train_args(p, epochs=80)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("screen", help="rank an enumerated composition space with a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="flashmoe_screen")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--exclude-known", action="store_true", help="flag candidates present in the training data"
    )
    _add_screen_args(
        p, elements="Li,Na,Mg,Al,Si,Zn,Ga,Ge,N,O,S,Se", objective="max", max_elements=3, max_amount=6
    )
    p.set_defaults(func=cmd_screen)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import pymatgen.core  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as exc:
        print(
            f"flashmoe-science needs the science extra ({exc}); run: pip install 'flashmoe-science[science]'"
        )
        return 2
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # missing optional data, bad element list...
        print(f"flashmoe-science {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
