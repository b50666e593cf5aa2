"""Training and prediction for :class:`CompositionTransformer`.

AdamW, linear warm-up then cosine decay (per step), early stopping on a validation MAE,
seeded shuffling, per-epoch checkpoints that resume exactly (model, optimiser, schedule,
RNG states, history), a tqdm progress bar. On CUDA the model trains in bfloat16 (what the
kernels take) with float32 master weights; on CPU in float32 through the reference path.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import MaterialsDataset
from .featurize import PackedCompositions, pack_formulas
from .model import CompositionTransformer, model_from_config, regression_loss

TASK_OF_DATASET = {"expt_gap": "band_gap", "mp_gap": "band_gap", "superconductors": "tc"}


@dataclass
class TrainConfig:
    epochs: int = 80
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    patience: int = 20  # epochs without a better validation MAE before stopping
    val_fraction: float = 0.1  # of the training rows, held out for early stopping
    aux_weight: float = 1.0  # times the MoE layers' aux losses (coefficients live in the layers)
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto: cuda if available
    max_minutes: float | None = None  # wall-clock budget: stop after the epoch that crosses it
    progress: bool = True
    model: dict = field(
        default_factory=lambda: {"dim": 128, "heads": 4, "layers": 3, "experts": 8, "top_k": 2}
    )


@dataclass
class TrainResult:
    model: CompositionTransformer
    task: str
    history: list[dict]
    best_epoch: int
    best_val_mae: float
    seconds: float
    samples_per_second: float


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Precision:
    """float32 master weights (what the optimiser steps) and a working copy in the
    compute dtype (what runs forward/backward). On CPU both are the same module."""

    def __init__(self, model: CompositionTransformer, dtype: torch.dtype) -> None:
        self.master = model
        self.dtype = dtype
        if dtype == torch.float32:
            self.work = model
        else:
            self.work = copy.deepcopy(model).to(dtype)
            self.work.target_stats = model.target_stats.clone()

    def to_work(self) -> None:
        if self.work is not self.master:
            with torch.no_grad():
                for pw, pm in zip(self.work.parameters(), self.master.parameters()):
                    pw.copy_(pm)

    def grads_to_master(self) -> None:
        if self.work is not self.master:
            for pw, pm in zip(self.work.parameters(), self.master.parameters()):
                pm.grad = None if pw.grad is None else pw.grad.float()
                pw.grad = None


def for_inference(model: CompositionTransformer) -> CompositionTransformer:
    """The model to predict with: on CUDA a bfloat16 copy (what the kernels take; the
    target statistics stay float32), elsewhere the model itself."""
    p = next(model.parameters())
    if p.is_cuda and p.dtype == torch.float32:
        work = copy.deepcopy(model).to(torch.bfloat16)
        work.target_stats = model.target_stats.clone()
        return work.eval()
    return model.eval()


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sorted_batches(index: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None):
    """Split ``index`` into batches (shuffled when ``rng`` is given), each sorted by
    element count so it has at most a few equal-length runs."""
    index = np.asarray(index)
    if rng is not None:
        index = index[rng.permutation(len(index))]
    for start in range(0, len(index), batch_size):
        b = index[start : start + batch_size]
        yield b[np.argsort(lengths[b], kind="stable")]


@torch.no_grad()
def predict(
    model: CompositionTransformer,
    packed: PackedCompositions,
    task: str,
    *,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) as float64 arrays in physical units, in the order of ``packed``."""
    dev = next(model.parameters()).device if device is None else resolve_device(str(device))
    model = for_inference(model)
    mean = np.empty(len(packed))
    std = np.empty(len(packed))
    for b in sorted_batches(np.arange(len(packed)), packed.lengths, batch_size, None):
        mu, sd = model.predict(packed.select(b).to_torch(dev), task)
        mean[b] = mu.float().cpu().numpy()
        std[b] = sd.float().cpu().numpy()
    return mean, std


def _state(model, optimizer, scheduler, epoch, best, history, rng, config) -> dict:
    return {
        "model_config": model.config,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best": best,
        "history": history,
        "rng_numpy": rng.bit_generator.state,
        "rng_torch": torch.get_rng_state(),
        "train_config": asdict(config),
    }


def save_model(
    path: str | os.PathLike, model: CompositionTransformer, task: str, meta: dict | None = None
) -> None:
    """A self-contained checkpoint for screening and evaluation."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    torch.save({"model_config": model.config, "model": state, "task": task, "meta": meta or {}}, path)


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[CompositionTransformer, str]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = model_from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(resolve_device(str(device))).eval(), ckpt["task"]


def fit(
    train: MaterialsDataset,
    task: str,
    config: TrainConfig | None = None,
    *,
    val: MaterialsDataset | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train a composition transformer on ``train`` for ``task`` (a head name).

    Without ``val``, ``config.val_fraction`` of ``train`` (seeded) is held out for early
    stopping. With ``checkpoint_dir``, ``last.pt`` is written after every epoch and
    ``best.pt`` (a :func:`save_model` file) whenever validation improves; ``resume=True``
    continues from ``last.pt`` where it stopped.
    """
    cfg = config or TrainConfig()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    if val is None:
        perm = rng.permutation(len(train))
        n_val = max(1, int(round(cfg.val_fraction * len(train))))
        val, train = train.subset(np.sort(perm[:n_val])), train.subset(np.sort(perm[n_val:]))
    packed_train = pack_formulas(train.formulas)
    packed_val = pack_formulas(val.formulas)
    y_mean = float(np.mean(train.targets))
    y_scale = float(np.mean(np.abs(train.targets - np.median(train.targets)))) or 1.0
    y = torch.as_tensor((train.targets - y_mean) / y_scale, dtype=torch.float32)

    model = CompositionTransformer((task,), **cfg.model).to(device)
    model.set_target_stats(task, y_mean, y_scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = max(1, int(cfg.warmup_fraction * total))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history: list[dict] = []
    best = {"mae": float("inf"), "epoch": -1, "state": None}
    start_epoch = 0
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckdir is not None and resume and (ckdir / "last.pt").is_file():
        state = torch.load(ckdir / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        best, history = state["best"], state["history"]
        rng.bit_generator.state = state["rng_numpy"]
        torch.set_rng_state(state["rng_torch"])
        start_epoch = state["epoch"] + 1

    prec = _Precision(model, compute_dtype(device))
    lengths = packed_train.lengths
    t0 = time.perf_counter()
    seen = 0
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch, desc=f"train {task}", unit="epoch", leave=False)
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        prec.work.train()
        losses = []
        for b in sorted_batches(np.arange(len(train)), lengths, cfg.batch_size, rng):
            prec.to_work()
            batch = packed_train.select(b).to_torch(device)
            mu, log_b = prec.work(batch)[task]
            loss = regression_loss(mu, log_b, y[b].to(device))
            total_loss = loss + cfg.aux_weight * prec.work.aux_loss.to(loss.device)
            total_loss.backward()
            prec.grads_to_master()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(loss.item())
            seen += len(b)
        prec.to_work()
        val_pred, _ = predict(prec.work, packed_val, task)
        val_mae = float(np.mean(np.abs(np.maximum(val_pred, 0.0) - val.targets)))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_mae": val_mae})
        if val_mae < best["mae"]:
            best = {
                "mae": val_mae,
                "epoch": epoch,
                "state": {k: v.detach().clone().cpu() for k, v in model.state_dict().items()},
            }
            if ckdir is not None:
                save_model(ckdir / "best.pt", model, task, {"epoch": epoch, "val_mae": val_mae})
        if ckdir is not None:
            ckdir.mkdir(parents=True, exist_ok=True)
            torch.save(_state(model, optimizer, scheduler, epoch, best, history, rng, cfg), ckdir / "last.pt")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val_mae=f"{val_mae:.3f}")
        elapsed = (time.perf_counter() - t0) / 60
        if epoch - best["epoch"] >= cfg.patience:
            break
        if cfg.max_minutes is not None and elapsed >= cfg.max_minutes:
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return TrainResult(
        model=model,
        task=task,
        history=history,
        best_epoch=best["epoch"],
        best_val_mae=best["mae"],
        seconds=seconds,
        samples_per_second=seen / seconds if seconds > 0 else float("nan"),
    )


__all__ = [
    "TASK_OF_DATASET",
    "TrainConfig",
    "TrainResult",
    "fit",
    "for_inference",
    "load_model",
    "predict",
    "resolve_device",
    "save_model",
    "seed_everything",
    "sorted_batches",
]
