"""Expert-parallel MoE throughput: tokens/s vs EP degree, with NCCL (or gloo on CPU).

Launch with torchrun, one process per GPU; every EP degree in ``--ep-sizes`` (each must
divide the world size) is measured in the same launch, the world split into
``world / ep`` data-parallel replicas of an EP group (``new_ep_dp_groups``)::

    torchrun --standalone --nproc_per_node=8 benchmarks/ep_bench.py --ep-sizes 1,2,4,8

Weak scaling: every rank holds ``--tokens-per-rank`` tokens, so throughput is
``world * tokens_per_rank / step_time`` with the step time the slowest rank's (wall clock
between barriers, ``--iters`` steps averaged, after ``--warmup``). At ``ep = 1`` the dense
``FlashMoELayer`` (all experts on every GPU, no all-to-all; impl ``flashmoe``) is timed
too: the baseline for the EP degrees (``flashmoe_ep`` at ``ep = 1`` adds the dispatch and
combine bookkeeping and size-1 all-to-alls to it). Before timing, each EP layer's output is
checked against the dense ``FlashMoELayer`` with the same weights on the same tokens.

NVLink multicast (NVLS) is switched off below, before torch is imported: the lent
multi-GPU machines require it, and it keeps numbers comparable.

Rows (rank 0 writes one JSON file, DESIGN.md's results shape): ``op`` is ``moe_ep_fwd``
(forward under no_grad) or ``moe_ep_fwd_bwd`` (forward + backward with the aux loss);
``impl`` is ``flashmoe_ep`` (or ``flashmoe``, the dense baseline); ``case`` carries
``tokens`` (per rank), ``hidden``, ``ffn``, ``experts``, ``top_k``, ``dtype``, ``ep_size``,
``world_size``; each row also has ``ms``, ``tokens_per_s`` (global),
``tokens_per_s_per_gpu``, ``tflops`` (expert GEMMs of all ranks), ``max_over_mean_load``
(the busiest EP rank's rows over the mean, averaged over the steps), ``check_rel_err``,
``backend``, ``nccl`` (CUDA) and ``status``.
``meta`` has exactly the harness's keys; its ``command`` starts with the NVLS switches.

CPU smoke test (gloo; numbers meaningless, checks that the script runs)::

    torchrun --standalone --nproc_per_node=2 benchmarks/ep_bench.py --device cpu \\
        --tokens-per-rank 64 --hidden 32 --ffn 16 --experts 4 --top-k 2 --iters 2 --warmup 1
"""

from __future__ import annotations

import os

# NVLink multicast off (before torch / NCCL are imported or initialised).
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NVLS_OFF)

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` when run by torchrun

from benchmarks.harness import git_sha  # noqa: E402
from flashmoe_science.distributed import ExpertParallelMoE, new_ep_dp_groups  # noqa: E402
from flashmoe_science.nn import FlashMoELayer  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHECK_TOL = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 2e-3}  # relative L2 error vs dense


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ep-sizes", default=None, help="comma list; default 1 and every power of 2 up to world")
    p.add_argument("--tokens-per-rank", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(CHECK_TOL))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--ops", default="moe_ep_fwd,moe_ep_fwd_bwd")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/ep_<date>_w<world>.json)"
    )
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call on the slowest rank."""
    for _ in range(warmup):
        fn()
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    elapsed = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def _nccl_version() -> str:
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _meta(args, world: int) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = args.device == "cuda"
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "date": _dt.date.today().isoformat(),
        # The NVLS switches are part of how the numbers were made: in the command line.
        "command": " ".join(
            [f"{k}={os.environ[k]}" for k in NVLS_OFF] + [f"torchrun --nproc_per_node={world}", *sys.argv]
        ),
        "git_sha": git_sha(),
    }


def _bench_ep(args, ep_size: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_group, _ = new_ep_dp_groups(ep_size)  # collective: every rank, every EP size
    torch.manual_seed(0)  # the same dense weights on every rank
    dense = FlashMoELayer(args.hidden, args.experts, args.top_k, args.ffn, device=device, dtype=dtype)
    layer = ExpertParallelMoE.from_dense(dense, ep_group)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    x = torch.randn(args.tokens_per_rank, args.hidden, device=device, dtype=dtype, generator=gen)
    g = torch.randn(x.shape, device=device, dtype=dtype, generator=gen)
    case = {
        "tokens": args.tokens_per_rank,
        "hidden": args.hidden,
        "ffn": args.ffn,
        "experts": args.experts,
        "top_k": args.top_k,
        "dtype": args.dtype,
        "ep_size": ep_size,
        "world_size": world,
    }

    # Check once against the dense layer (same weights, same tokens; routing is per token).
    with torch.no_grad():
        y = layer(x).float()
        ref = dense(x).float()
    err = torch.tensor([(y - ref).norm().item() / max(ref.norm().item(), 1e-30)], device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    del ref, y
    ok = bool(torch.isfinite(err).all()) and float(err) <= CHECK_TOL[args.dtype]
    impls = [("flashmoe_ep", layer)]
    if ep_size == 1:
        impls.append(("flashmoe", dense))  # dense baseline: nothing to check, it is the reference
    else:
        del dense
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows = []
    for impl, mod in impls:
        rows += _time_impl(args, impl, mod, x, g, case, float(err), ok, device)
    return rows


def _time_impl(args, impl, mod, x, g, case, err, ok, device) -> list[dict]:
    world = dist.get_world_size()
    loads = []

    def record_load():
        if impl == "flashmoe_ep":
            loads.append(mod.last_tokens_per_rank)

    def fwd():
        with torch.no_grad():
            mod(x)
        record_load()

    def fwd_bwd():
        mod.zero_grad(set_to_none=True)
        y = mod(x)
        ((y * g).sum() + mod.aux_loss).backward()
        record_load()

    rows = []
    for op, fn in (("moe_ep_fwd", fwd), ("moe_ep_fwd_bwd", fwd_bwd)):
        if op not in args.ops.split(","):
            continue
        row = {"op": op, "impl": impl, "case": case, "check_rel_err": err, "backend": dist.get_backend()}
        if device.type == "cuda":
            row["nccl"] = _nccl_version()
        if not ok:
            row.update(status="failed", ms=None, note=f"relative L2 error {err:.3e} vs dense layer")
            rows.append(row)
            continue
        loads.clear()
        sec = _time(fn, args.iters, args.warmup, device)
        # Expert GEMM FLOPs of all ranks: 6*H*F per (token, k) forward (gate_up 4HF, down
        # 2HF), x3 with backward; router and all-to-alls not counted.
        flops = world * args.tokens_per_rank * args.top_k * 6 * args.hidden * args.ffn
        flops *= 3 if op == "moe_ep_fwd_bwd" else 1
        imbalance = (
            torch.stack([ld.double().max() / ld.double().mean() for ld in loads]).mean().item()
            if loads
            else None
        )
        row.update(
            status="ok",
            ms=sec * 1e3,
            tflops=flops / sec / 1e12,
            tokens_per_s=world * args.tokens_per_rank / sec,
            tokens_per_s_per_gpu=args.tokens_per_rank / sec,
            max_over_mean_load=imbalance,
        )
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = _parse(argv)
    device_type = args.device
    backend = "nccl" if device_type == "cuda" else "gloo"
    own_group = not dist.is_initialized()  # the CPU test calls main() in its own processes
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if args.dtype != "float32":
            args.dtype = "float32"  # CPU: reference path, float32
    if own_group:
        # No device_id: it would make every new_group (one set per EP size) build its NCCL
        # communicator eagerly, also the DP groups the benchmark never uses.
        dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = getattr(torch, args.dtype)
    if args.ep_sizes:
        ep_sizes = [int(s) for s in args.ep_sizes.split(",")]
    else:
        ep_sizes = [e for e in (1, 2, 4, 8, 16, 32, 64) if e <= world and world % e == 0]
    bad = [e for e in ep_sizes if world % e or args.experts % e]
    if bad:
        raise SystemExit(f"EP sizes {bad} must divide the world size {world} and --experts {args.experts}")

    rows = []
    for ep in ep_sizes:
        rows += _bench_ep(args, ep, device, dtype)
    if rank == 0:
        cols = ("op", "impl", "ep", "ms", "Mtok/s", "Mtok/s/gpu", "load max/mean", "status")
        header = "".join(f"{c:>14}" for c in cols)
        lines = [header]
        for r in rows:
            ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
            tps = f"{r['tokens_per_s'] / 1e6:.3f}" if r.get("tokens_per_s") else "-"
            tpg = f"{r['tokens_per_s_per_gpu'] / 1e6:.3f}" if r.get("tokens_per_s_per_gpu") else "-"
            imb = f"{r['max_over_mean_load']:.2f}" if r.get("max_over_mean_load") else "-"
            vals = (r["op"], r["impl"], r["case"]["ep_size"], ms, tps, tpg, imb, r["status"])
            lines.append("".join(f"{v:>14}" for v in vals))
        sys.stdout.write("\n".join(lines) + "\n")
        if not args.no_save:
            out = (
                Path(args.out)
                if args.out
                else RESULTS_DIR / (f"ep_{_dt.datetime.now().strftime('%Y%m%d_%H%M%S')}_w{world}.json")
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"meta": _meta(args, world), "rows": rows}, indent=1) + "\n")
            sys.stdout.write(f"wrote {out}\n")
    dist.barrier()
    if own_group:
        dist.destroy_process_group()
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
