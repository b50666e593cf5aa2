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
from .featurize import PackedBatch, PackedCompositions, pack_formulas
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
    cuda_graphs: bool = True  # on CUDA: replay each padded batch shape's whole step (TrainStep)
    graph_token_multiple: int = 64  # padded token counts are multiples of this (fewer shapes)
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
            if hasattr(model, "target_stats"):  # stays float32 (physical units)
                self.work.target_stats = model.target_stats.clone()

    def to_work(self) -> None:
        if self.work is not self.master:
            with torch.no_grad():
                torch._foreach_copy_(list(self.work.parameters()), list(self.master.parameters()))

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


class TrainStep:
    """One optimisation step of :func:`fit`: copy the master weights to the working copy,
    forward, loss, backward, gradients to the master, clip, AdamW. Returns the (detached)
    regression loss on the device; nothing here waits for the GPU.

    With ``cuda_graphs`` (CUDA only) the whole step is captured as one CUDA graph per batch
    shape and replayed: a small model's eager step is bound by the CPU (hundreds of kernel
    launches for ~1 ms of GPU work). Batches vary in token count, so each is padded to a
    fixed shape: ``slots`` compositions (``batch_size`` plus a few spare ones) and a token
    count that is a multiple of ``token_multiple``, by appending dummy compositions (element
    0, 1..``max_len`` tokens each) that carry zero loss weight. The regression loss and its
    gradients are exactly those of the unpadded batch (attention never crosses compositions,
    LayerNorm and routing are per token); the MoE load-balancing statistics do count the
    dummy tokens (under ``token_multiple`` + spare-slot tokens of a full batch, a few %).
    Between the shapes that fit a batch, one already captured is preferred, so an epoch
    needs a handful of graphs. A shape runs eagerly (padded, on a side stream) the first two
    times it is seen (autotuning, lazy initialisation), is captured the third time and
    replayed from then on; at most ``max_graphs`` are kept, others run eagerly.

    The optimiser must be built for capture: ``capturable=True`` and a learning rate that
    is a tensor on the device (an LR scheduler then updates it in place)."""

    def __init__(
        self,
        prec: _Precision,
        optimizer: torch.optim.Optimizer,
        task: str,
        *,
        aux_weight: float = 1.0,
        grad_clip: float = 0.0,
        cuda_graphs: bool = False,
        batch_size: int = 256,
        max_len: int = 1,
        token_multiple: int = 64,
        max_graphs: int = 16,
    ) -> None:
        self.prec, self.optimizer, self.task = prec, optimizer, task
        self.aux_weight, self.grad_clip = aux_weight, grad_clip
        self.device = next(prec.master.parameters()).device
        self.graphs = bool(cuda_graphs) and self.device.type == "cuda"
        if self.graphs:
            group = optimizer.param_groups[0]
            if not group.get("capturable", False) or not isinstance(group["lr"], torch.Tensor):
                raise ValueError("cuda_graphs needs an optimizer with capturable=True and a tensor lr")
        self.max_len = max(1, int(max_len))
        self.multiple = max(1, int(token_multiple)) if self.max_len > 1 else 1
        # Spare dummy slots: with d >= 1 dummies of 1..max_len tokens every padding amount
        # in [d, d * max_len] is reachable, so a whole multiple always fits.
        spare = math.ceil((self.multiple - 1) / (self.max_len - 1)) if self.max_len > 1 else 0
        self.slots = int(batch_size) + max(1, spare)
        self.max_graphs = max_graphs
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._seen: dict[tuple[int, int], int] = {}
        self._static: dict[tuple[int, int], tuple] = {}
        self._side = torch.cuda.Stream(self.device) if self.graphs else None

    # -- the step itself (eager, warm-up and capture run this same code) -----------------
    def _body(self, batch: PackedBatch, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        prec = self.prec
        prec.to_work()
        mu, log_b = prec.work(batch)[self.task]
        loss = regression_loss(mu, log_b, y, weight)
        total = loss + self.aux_weight * prec.work.aux_loss.to(loss.device)
        total.backward()
        prec.grads_to_master()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(prec.master.parameters(), self.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, packed: PackedCompositions, y: torch.Tensor) -> torch.Tensor:
        """One step on compositions ``packed`` with normalised targets ``y`` (N,)."""
        if not self.graphs:
            loss = self._body(packed.to_torch(self.device), y.to(self.device), None)
            self.optimizer.zero_grad(set_to_none=True)
            return loss
        lengths = packed.lengths
        if len(packed) > self.slots - 1 or (len(lengths) and int(lengths.max()) > self.max_len):
            raise ValueError(
                f"batch of {len(packed)} compositions (longest {int(lengths.max())}) does not fit "
                f"TrainStep(batch_size={self.slots - 1}, max_len={self.max_len})"
            )
        with torch.cuda.device(self.device):  # capture and streams on the model's GPU
            return self._graphed(packed, y)

    def _graphed(self, packed: PackedCompositions, y: torch.Tensor) -> torch.Tensor:
        key = self._shape(len(packed), int(packed.offsets[-1]))
        batch, ys, weight = self._fill(key, packed, y)
        entry = self._graphs.get(key)
        if entry is not None:
            entry[0].replay()
            return entry[1]
        self._seen[key] = self._seen.get(key, 0) + 1
        stream = torch.cuda.current_stream(self.device)
        self._side.wait_stream(stream)
        if self._seen[key] <= 2 or len(self._graphs) >= self.max_graphs:
            with torch.cuda.stream(self._side):
                loss = self._body(batch, ys, weight)
                self.optimizer.zero_grad(set_to_none=True)
            stream.wait_stream(self._side)
            return loss
        # Capture records without running: replay once to take this step.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._side):
            loss = self._body(batch, ys, weight)
        stream.wait_stream(self._side)
        self._graphs[key] = (graph, loss)
        graph.replay()
        return loss

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    # -- padding to a bucket shape ---------------------------------------------------------
    def _shape(self, n: int, tokens: int) -> tuple[int, int]:
        """(slots, padded tokens): the padding is ``slots - n`` dummies of 1..max_len tokens."""
        dummies = self.slots - n
        lo, hi = tokens + dummies, tokens + dummies * self.max_len
        options = range(-(-lo // self.multiple) * self.multiple, hi + 1, self.multiple)
        for table in (self._graphs, self._seen):
            for t in options:
                if (self.slots, t) in table:
                    return (self.slots, t)
        return (self.slots, options[0])

    def _fill(self, key: tuple[int, int], packed: PackedCompositions, y: torch.Tensor):
        slots, tokens = key
        n, t = len(packed), int(packed.offsets[-1])
        dummies = slots - n
        extra = tokens - t - dummies  # tokens beyond one per dummy
        dl = np.ones(dummies, dtype=np.int64)
        if extra:
            full, rem = divmod(extra, self.max_len - 1)
            dl[:full] += self.max_len - 1
            if rem:
                dl[full] += rem
        lengths = np.concatenate([packed.lengths, dl])
        offsets = np.zeros(slots + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        host = {
            "z": torch.from_numpy(np.concatenate([packed.z, np.zeros(tokens - t, dtype=packed.z.dtype)])),
            "frac": torch.from_numpy(
                np.concatenate([packed.frac, np.repeat((1.0 / dl).astype(np.float32), dl)])
            ),
            "cu_seqlens": torch.from_numpy(offsets.astype(np.int32)),
            "seg": torch.from_numpy(np.repeat(np.arange(slots), lengths)),
        }
        weight = torch.zeros(slots, dtype=torch.float32)
        weight[:n] = 1.0 / max(n, 1)
        ys = torch.zeros(slots, dtype=torch.float32)
        ys[:n] = y.detach().float().cpu()
        static = self._static.get(key)
        if static is None:
            # Fixed max_seqlen and no runs: the shape key alone decides the kernels.
            batch = PackedBatch(**{k: v.to(self.device) for k, v in host.items()}, max_seqlen=self.max_len)
            static = self._static[key] = (batch, ys.to(self.device), weight.to(self.device))
        else:
            batch = static[0]
            for name, v in host.items():
                getattr(batch, name).copy_(v, non_blocking=False)
            static[1].copy_(ys)
            static[2].copy_(weight)
        return static


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


def _floats(obj):
    """0-dim tensors (a capturable optimiser's learning rates) as floats, recursively."""
    if isinstance(obj, torch.Tensor) and obj.dim() == 0 and obj.is_floating_point():
        return float(obj)
    if isinstance(obj, dict):
        return {k: _floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_floats(v) for v in obj]
    return obj


def _state(model, optimizer, scheduler, epoch, best, history, rng, config) -> dict:
    opt_state = optimizer.state_dict()
    opt_state["param_groups"] = _floats(opt_state["param_groups"])
    return {
        "model_config": model.config,
        "model": model.state_dict(),
        "optimizer": opt_state,
        "scheduler": _floats(scheduler.state_dict()),
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
    graphs = cfg.cuda_graphs and device.type == "cuda"
    # A captured step reads the learning rate from a device tensor that the scheduler updates.
    lr = torch.tensor(cfg.lr, device=device) if graphs else cfg.lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, capturable=graphs)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = max(1, int(cfg.warmup_fraction * total))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # Float base rates: the scheduler then fills the tensor lr from a float (a tensor base
    # rate would be read back with a host sync every step).
    scheduler.base_lrs = [float(lr) for lr in scheduler.base_lrs]
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
        if graphs:  # checkpoints store plain floats (see _state)
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=device)

    prec = _Precision(model, compute_dtype(device))
    lengths = packed_train.lengths
    step = TrainStep(
        prec,
        optimizer,
        task,
        aux_weight=cfg.aux_weight,
        grad_clip=cfg.grad_clip,
        cuda_graphs=graphs,
        batch_size=cfg.batch_size,
        max_len=int(lengths.max()) if len(lengths) else 1,
        token_multiple=cfg.graph_token_multiple,
    )
    t0 = time.perf_counter()
    seen = 0
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch, desc=f"train {task}", unit="epoch", leave=False)
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        prec.work.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        for b in sorted_batches(np.arange(len(train)), lengths, cfg.batch_size, rng):
            loss_sum += step(packed_train.select(b), y[b])  # read before the next step
            scheduler.step()
            batches += 1
            seen += len(b)
        prec.to_work()
        val_pred, _ = predict(prec.work, packed_val, task)
        val_mae = float(np.mean(np.abs(np.maximum(val_pred, 0.0) - val.targets)))
        history.append({"epoch": epoch, "train_loss": float(loss_sum) / max(batches, 1), "val_mae": val_mae})
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
    "TrainStep",
    "fit",
    "for_inference",
    "load_model",
    "predict",
    "resolve_device",
    "save_model",
    "seed_everything",
    "sorted_batches",
]
