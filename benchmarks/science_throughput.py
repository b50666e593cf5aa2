"""Throughput of the materials model: the library's layers vs the same model in plain PyTorch.

Two implementations with *the same weights*:

- ``flashmoe``: :class:`~flashmoe_science.science.model.CompositionTransformer`
  (``FlashMoEScienceAttention.forward_packed`` over packed compositions + ``FlashMoELayer``),
  packed path (the varlen kernel on CUDA);
- ``plain_pytorch``: ``nn.MultiheadAttention`` on a padded (N, L_max, E) batch with a
  key-padding mask, a Python loop over the experts (gather, SwiGLU, scatter-add), and
  ``nn.LayerNorm`` where the library model has ``FlashLayerNorm``.

Ops (``op`` in the JSON rows, DESIGN.md's results schema):

- ``science_screen``: predictions per second over enumerated candidates (chunks of equal
  element count L, as ``flashmoe-science screen`` makes them), inference only; on CUDA also
  ``flashmoe_cuda_graphs``: the same forward captured once and replayed
  (``GraphedPredictor``, what ``screen`` does). The plain model cannot be captured (its
  expert loop calls ``nonzero``, a host sync);
- ``science_train``: training samples per second (forward, backward, AdamW step) on
  batches of random compositions with 1..8 elements (mp_gap-like length mix; a
  throughput benchmark needs no real targets, and the GPU machine has no network).

On CUDA both run in bfloat16; on CPU in float32 (the reference path; a smoke run).
Each pair is checked against each other once before timing.

    PYTHONPATH=src python benchmarks/science_throughput.py --out benchmarks/results/science_throughput.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import collect_meta  # noqa: E402
from flashmoe_science.nn.moe import load_balancing_loss, router_z_loss  # noqa: E402
from flashmoe_science.science.featurize import MAX_Z, PackedBatch, PackedCompositions  # noqa: E402
from flashmoe_science.science.model import CompositionTransformer, GraphedPredictor  # noqa: E402
from flashmoe_science.science.train import TrainStep, _Precision, compute_dtype, sorted_batches  # noqa: E402

CASES = [
    # model shape, screening chunk (candidates of L elements), training batch (compositions)
    {
        "dim": 128,
        "heads": 4,
        "layers": 2,
        "experts": 4,
        "top_k": 2,
        "ffn": 128,
        "chunk": 65536,
        "L": 3,
        "batches": (1024, 8192),
    },
    {
        "dim": 256,
        "heads": 8,
        "layers": 3,
        "experts": 8,
        "top_k": 2,
        "ffn": 512,
        "chunk": 65536,
        "L": 4,
        "batches": (1024, 8192),
    },
]
SMOKE_CASES = [
    {
        "dim": 64,
        "heads": 2,
        "layers": 1,
        "experts": 4,
        "top_k": 2,
        "ffn": 64,
        "chunk": 2048,
        "L": 3,
        "batches": (128,),
    },
]


class PlainMoE(nn.Module):
    """Router + experts as a Python loop over experts (what a plain PyTorch port does)."""

    def __init__(self, src) -> None:
        super().__init__()
        self.top_k = src.top_k
        self.router = nn.Linear(src.hidden_size, src.num_experts, bias=False)
        self.router.weight = nn.Parameter(src.router.weight.detach().clone())
        self.w_gate_up = nn.Parameter(src.w_gate_up.detach().clone())
        self.w_down = nn.Parameter(src.w_down.detach().clone())
        self.aux_loss_coef, self.z_loss_coef = src.aux_loss_coef, src.z_loss_coef
        self.aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = probs.topk(self.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        if self.training:  # the same auxiliary loss as FlashMoELayer, in plain PyTorch
            lb = load_balancing_loss(logits, ids, self.w_gate_up.shape[0], "softmax")
            self.aux_loss = self.aux_loss_coef * lb + self.z_loss_coef * router_z_loss(logits)
        out = torch.zeros_like(x)
        f = self.w_down.shape[2]
        for e in range(self.w_gate_up.shape[0]):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = x[tok] @ self.w_gate_up[e].t()
            y = (F.silu(h[:, :f]) * h[:, f:]) @ self.w_down[e].t()
            out = out.index_add(0, tok, y * w[tok, slot, None])
        return out


class PlainBlock(nn.Module):
    def __init__(self, src) -> None:
        super().__init__()
        dim, heads = src.attn.embed_dim, src.attn.num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm1.load_state_dict(src.norm1.state_dict())
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.attn.load_state_dict(src.attn.state_dict())  # FlashMoEScienceAttention is MHA-compatible
        self.norm2 = nn.LayerNorm(dim)
        self.norm2.load_state_dict(src.norm2.state_dict())
        self.moe = PlainMoE(src.moe)

    def forward(self, x: torch.Tensor, batch: PackedBatch, pad_index, pad_mask) -> torch.Tensor:
        h = self.norm1(x)
        n, lmax = pad_mask.shape
        padded = h.new_zeros((n * lmax, h.shape[1])).index_copy(0, pad_index, h).view(n, lmax, -1)
        a, _ = self.attn(padded, padded, padded, key_padding_mask=pad_mask, need_weights=False)
        x = x + a.reshape(n * lmax, -1)[pad_index]
        return x + self.moe(self.norm2(x))


class PlainCompositionTransformer(nn.Module):
    """The same network and weights as a CompositionTransformer, in plain PyTorch layers."""

    def __init__(self, src: CompositionTransformer) -> None:
        super().__init__()
        self.src_embed = src  # embedding, fraction encoding, pooling and head are shared code
        self.blocks = nn.ModuleList(PlainBlock(b) for b in src.blocks)
        self.norm = nn.LayerNorm(src.norm.normalized_shape)  # plain, not the library's FlashLayerNorm
        self.norm.load_state_dict(src.norm.state_dict())

    @property
    def aux_loss(self) -> torch.Tensor:
        return torch.stack([b.moe.aux_loss.float() for b in self.blocks]).sum()

    def forward(self, batch: PackedBatch):
        src = self.src_embed
        x = src.embed(batch)
        lengths = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
        lmax = batch.max_seqlen
        pos = torch.arange(x.shape[0], device=x.device) - batch.cu_seqlens[:-1].long()[batch.seg]
        pad_index = batch.seg * lmax + pos
        pad_mask = torch.arange(lmax, device=x.device)[None, :] >= lengths[:, None]
        for block in self.blocks:
            x = block(x, batch, pad_index, pad_mask)
        x = self.norm(x)
        out = src.head(src.pool(x, batch)).float().view(-1, len(src.tasks), 2)
        return {t: (out[:, i, 0], out[:, i, 1].clamp(-7.0, 7.0)) for i, t in enumerate(src.tasks)}


def screen_batch(n: int, length: int, device, gen) -> PackedBatch:
    z = torch.randint(1, 84, (n, length), generator=gen).to(device)
    amounts = torch.randint(1, 7, (n, length), generator=gen).float().to(device)
    frac = (amounts / amounts.sum(1, keepdim=True)).reshape(-1)
    cu = torch.arange(0, (n + 1) * length, length, dtype=torch.int32, device=device)
    seg = torch.arange(n, device=device).repeat_interleave(length)
    return PackedBatch(z.reshape(-1), frac, cu, seg, length, ((0, n * length, length),))


def train_compositions(n: int, gen) -> tuple[PackedCompositions, np.ndarray]:
    """n random compositions with an mp_gap-like mix of element counts (mostly 2-5, up to
    8) and random targets: the stand-in when no packed real data set is given."""
    probs = torch.tensor([0.02, 0.2, 0.38, 0.25, 0.1, 0.03, 0.01, 0.01])
    lengths = (torch.multinomial(probs, n, replacement=True, generator=gen) + 1).numpy()
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    t = int(offsets[-1])
    z = torch.randint(1, 84, (t,), generator=gen).numpy()
    amounts = torch.randint(1, 7, (t,), generator=gen).float().numpy()
    frac = (amounts / np.repeat(np.add.reduceat(amounts, offsets[:-1]), lengths)).astype(np.float32)
    return PackedCompositions(z, frac, offsets), torch.randn(n, generator=gen).numpy()


def load_packed(path: str) -> tuple[PackedCompositions, np.ndarray]:
    """A data set packed on a machine with pymatgen (``--pack-mp-gap``): z, frac, offsets, y."""
    d = np.load(path)
    return PackedCompositions(d["z"], d["frac"], d["offsets"]), d["y"]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def run_case(case: dict, device, dtype, warmup: int, iters: int, data, train_steps=(30, 40)) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    model_kw = {k: case[k] for k in ("dim", "heads", "layers", "experts", "top_k", "ffn")}
    torch.manual_seed(0)
    props = torch.randn(MAX_Z + 1, 20, generator=gen)  # values do not change the speed
    flash = CompositionTransformer(("band_gap",), **model_kw, element_props=props, attention_path="packed")
    flash = flash.to(device=device, dtype=dtype).eval()
    flash.target_stats = flash.target_stats.float()
    plain = PlainCompositionTransformer(flash).to(device=device, dtype=dtype).eval()
    rows = []
    shape = {**model_kw, "dtype": str(dtype).replace("torch.", "")}

    # --- screening: inference on a chunk of equal-length candidates
    sb = screen_batch(case["chunk"], case["L"], device, gen)
    with torch.no_grad():
        ref = plain(sb)["band_gap"][0].float()
        got = flash(sb)["band_gap"][0].float()
    err = float((ref - got).abs().max() / (ref.abs().max() + 1e-6))
    if dtype != torch.float32:
        # Both bf16 models against the plain model in float32 (same weights): how far each
        # is from the higher-precision answer, and on how many outputs (> 1% of the scale).
        # A deep copy: the plain model shares the flash model's embedding and head modules.
        oracle = PlainCompositionTransformer(copy.deepcopy(flash))
        oracle = oracle.to(device=device, dtype=torch.float32).eval()
        with torch.no_grad():
            r32 = oracle(sb)["band_gap"][0].float()
        scale = r32.abs().max() + 1e-6
        for name, o in (("flashmoe", got), ("plain_pytorch", ref)):
            d = (o - r32).abs() / scale
            print(
                f"{name} bf16 vs plain float32: max rel {float(d.max()):.2e}, "
                f"median {float(d.median()):.2e}, "
                f"outputs off by > 1%: {int((d > 0.01).sum())} of {d.numel()}"
            )
        del oracle
    graphed = GraphedPredictor(flash, "band_gap")
    if device.type == "cuda":
        mu, _ = flash.predict(sb, "band_gap")
        graphed(sb)  # first sighting: eager; the second call captures and replays
        replay = graphed(sb)[0]
        graph_err = float((replay - mu).abs().max() / (mu.abs().max() + 1e-6))
        print(f"graph replay vs eager predict (same weights, same kernels): max rel diff {graph_err:.2e}")
    variants = [("flashmoe", flash.forward), ("plain_pytorch", plain.forward)]
    if device.type == "cuda":
        variants.insert(1, ("flashmoe_cuda_graphs", graphed))
    for impl, m in variants:

        def step(m=m):
            with torch.no_grad():
                m(sb)

        sec = _time(step, device, warmup, iters)
        rows.append(
            {
                "op": "science_screen",
                "impl": impl,
                "case": {**shape, "candidates": case["chunk"], "elements_per_candidate": case["L"]},
                "ms": sec * 1e3,
                "metric": "candidates_per_s",
                "value": case["chunk"] / sec,
                "check_rel_err_vs_plain": err,
            }
        )

    # --- training: forward + backward + AdamW on a mixed-length batch, per batch size
    for size in case["batches"]:
        rows.extend(_train_rows(flash, size, shape, device, data, *train_steps))
    return rows


def _train_rows(flash, size, shape, device, data, warmup, iters) -> list[dict]:
    """samples/s of :class:`TrainStep` (what ``fit`` runs: float32 master weights, a
    bfloat16 working copy on CUDA, AdamW, grad clipping) over shuffled batches of ``data``,
    host-side batch assembly included, for three variants of the same model and weights."""
    packed, targets, name = data
    y = torch.as_tensor(targets, dtype=torch.float32)
    max_len = int(packed.lengths.max())
    rows = []
    variants = [("flashmoe", False), ("plain_pytorch", False)]
    if device.type == "cuda":
        variants.insert(1, ("flashmoe_cuda_graphs", True))
    for impl, graphs in variants:
        master = copy.deepcopy(flash).float()
        if impl == "plain_pytorch":
            master = PlainCompositionTransformer(master).to(device)  # new layers start on the CPU
        master.train()
        lr = torch.tensor(1e-4, device=device) if graphs else 1e-4
        opt = torch.optim.AdamW(master.parameters(), lr=lr, capturable=graphs)
        prec = _Precision(master, compute_dtype(device))
        prec.work.train()
        step = TrainStep(
            prec, opt, "band_gap", grad_clip=1.0, cuda_graphs=graphs, batch_size=size, max_len=max_len
        )
        rng = np.random.default_rng(0)

        def batches(rng=rng):
            while True:
                yield from sorted_batches(np.arange(len(packed)), packed.lengths, size, rng)

        it = batches()
        acc = torch.zeros((), device=device)
        for _ in range(warmup):
            acc += step(packed.select(idx := next(it)), y[idx])
        _sync(device)
        t0 = time.perf_counter()
        n = 0
        for _ in range(iters):
            idx = next(it)
            acc += step(packed.select(idx), y[idx])
            n += len(idx)
        _sync(device)
        sec = time.perf_counter() - t0
        loss = float(acc) / (warmup + iters)
        extra = {"graphs": step.num_graphs} if graphs else {}
        print(f"  train {impl:22s} B{size}: {sec / iters * 1e3:8.2f} ms/step, mean loss {loss:.3f} {extra}")
        rows.append(
            {
                "op": "science_train",
                "impl": impl,
                "case": {**shape, "batch": size, "data": name, "max_len": max_len},
                "ms": sec / iters * 1e3,
                "metric": "samples_per_s",
                "value": n / sec,
                "mean_loss": loss,
                **extra,
            }
        )
        del step, prec, opt, master
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON results path")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--train-warmup", type=int, default=30, help="training steps before timing")
    ap.add_argument("--train-iters", type=int, default=40, help="timed training steps")
    ap.add_argument("--data", default=None, help="packed training set (.npz from --pack-mp-gap)")
    ap.add_argument("--pack-mp-gap", default=None, metavar="NPZ", help="pack mp_gap to NPZ and exit")
    args = ap.parse_args(argv)
    if args.pack_mp_gap:
        from flashmoe_science.science.data import load_mp_gap
        from flashmoe_science.science.featurize import pack_formulas

        ds = load_mp_gap()
        pk = pack_formulas(ds.formulas)
        np.savez(args.pack_mp_gap, z=pk.z, frac=pk.frac, offsets=pk.offsets, y=np.asarray(ds.targets))
        print(f"packed {len(pk)} mp_gap compositions ({int(pk.offsets[-1])} tokens) -> {args.pack_mp_gap}")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = SMOKE_CASES if args.smoke or device.type != "cuda" else CASES
    if args.data:
        data = (*load_packed(args.data), "mp_gap")
    else:
        data = (
            *train_compositions(4096 if args.smoke else 106_113, torch.Generator().manual_seed(1)),
            "synthetic",
        )
    steps = (3, 4) if args.smoke else (args.train_warmup, args.train_iters)
    rows = []
    for case in cases:
        rows.extend(run_case(case, device, dtype, args.warmup, args.iters, data, steps))
    args_used = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/science_throughput.py " + " ".join(args_used)
    meta = collect_meta(command, device)
    hdr = f"{'op':15s} {'impl':22s} {'case':48s} {'ms':>9s} {'rate':>14s} {'speedup':>8s}"
    print(hdr)
    for r in rows:
        base = next(
            x["value"]
            for x in rows
            if x["op"] == r["op"] and x["case"] == r["case"] and x["impl"] == "plain_pytorch"
        )
        c = r["case"]
        desc = f"E{c['dim']} L{c['layers']} X{c['experts']} " + (
            f"{c['candidates']}x{c['elements_per_candidate']}"
            if r["op"] == "science_screen"
            else f"B{c['batch']}"
        )
        speedup = r["value"] / base
        print(f"{r['op']:15s} {r['impl']:22s} {desc:48s} {r['ms']:9.2f} {r['value']:14,.0f} {speedup:7.2f}x")
    errs = [r["check_rel_err_vs_plain"] for r in rows if "check_rel_err_vs_plain" in r]
    print(f"max relative difference flashmoe vs plain (screen outputs): {max(errs):.2e}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
