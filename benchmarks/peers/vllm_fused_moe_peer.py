"""vLLM's Triton fused-MoE forward, timed side by side with ``flashmoe`` and ``grouped_mm``.

vLLM cannot be installed beside this project (CUDA builds of torch, a wheel too large for the
GPU machine), so its public kernel source is read from outside the repository and never
committed: put vLLM's files in ``.peers/vllm_fused_moe/`` (ignored through
``.git/info/exclude``; ``FLASHMOE_VLLM_PEER_DIR`` names another folder holding
``vllm_fused_moe/``):

* ``fused_moe.py`` — from ``vllm/model_executor/layers/fused_moe/fused_moe.py``:
  ``fused_moe_kernel``, ``invoke_fused_moe_kernel``, ``get_default_config``,
  ``try_get_optimal_moe_config`` (+ ``get_moe_configs``, ``get_config_file_name``), with
  vLLM's own imports replaced by small shims (device name from torch, no override config).
* ``moe_align_block_size.py`` — a vLLM version that still has ``moe_align_block_size_triton``.
* ``configs/`` — vLLM's tuned JSON files for the shapes and cards at hand (optional;
  ``try_get_optimal_moe_config`` falls back to ``get_default_config`` as vLLM does).
* ``SOURCE.md`` — the vLLM commit of each file (copied into the results rows).

The pipeline is vLLM's ``fused_experts_impl`` for an unquantised model, one chunk (T is far
below ``VLLM_FUSED_MOE_CHUNK_SIZE``): routing (vLLM's ``fused_topk`` semantics — softmax over
float32 logits, top-k, renormalise, float32 weights and int32 ids — in torch, as every impl
here), alignment (``sorted_token_ids`` padded per expert to BLOCK_SIZE_M, ``expert_ids`` per
block, ``num_tokens_post_padded``), kernel 1 (gate_up on gathered rows), SiLU-and-mul,
kernel 2 (down, routing weight multiplied in its epilogue), and the top-k sum. vLLM's
``silu_and_mul`` and ``moe_sum`` are CUDA ops; here they are torch ops with the same
rounding (``silu`` rounded to the dtype, then the product; ``moe_sum`` is ``at::sum_out``
for top-k > 4 in vLLM).

Impls (names in the results file):

* ``vllm`` — the config vLLM would use: its tuned JSON for (E, N=F, card) when
  ``configs/`` has one, else ``get_default_config``; alignment in torch (:func:`torch_align`,
  the same output as vLLM's CUDA ``moe_align_block_size``, sync-free, ~15 small launches where
  vLLM's CUDA op is one or two).
* ``vllm_default_config`` — ``get_default_config`` even where a tuned JSON exists
  (unsupported where none does: identical to ``vllm``).
* ``vllm_triton_align`` — ``vllm`` with vLLM's Triton alignment (``moe_align_block_size_triton``,
  sglang's port; vLLM used it only for E >= 224 other than 256, or on request): serial loops
  over T*K/E slots per program.
* ``vllm_gemms_only`` — ``vllm`` with routing and alignment done before the timed region
  (kernel 1 + SiLU-and-mul + kernel 2 + sum): a floor for vLLM's pipeline whatever its
  alignment costs.

Run on the GPU (one process, same inputs per case, each impl checked against the float32
reference before timing, CUDA events, L2 flushed, median — the harness of ``benchmarks/``)::

    PYTHONPATH=src:. python -m benchmarks.peers.vllm_fused_moe_peer --out results.json

CPU smoke test of the peer under the interpreter: ``--cases smoke`` (float32, tiny).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from .. import harness
from ..cases import moe as moe_cases
from ..cases.moe import MoECase
from ..harness import Built, Data, Unavailable, Unsupported
from . import moe as moe_peers

IMPLS = ("vllm", "vllm_default_config", "vllm_triton_align", "vllm_gemms_only")
SIDE_BY_SIDE_IMPLS = ("grouped_mm", *IMPLS, "flashmoe")
DEFAULT_CASES = "B4096,C8192,A4096,B1,B8,B64"
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the vendored source
def peer_dir() -> Path:
    return Path(os.environ.get("FLASHMOE_VLLM_PEER_DIR", REPO_ROOT / ".peers"))


def load_peer() -> SimpleNamespace:
    """The vendored vLLM modules; ``Unavailable`` (with what to do) when they are absent."""
    root = peer_dir()
    if not (root / "vllm_fused_moe" / "fused_moe.py").is_file():
        raise Unavailable(
            f"vLLM's fused_moe source is not in {root}/vllm_fused_moe/ (fused_moe.py and "
            "moe_align_block_size.py from vllm/model_executor/layers/fused_moe/, never committed; "
            "see benchmarks/peers/vllm_fused_moe_peer.py and docs/moe.md)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    fm = importlib.import_module("vllm_fused_moe.fused_moe")
    try:
        align = importlib.import_module("vllm_fused_moe.moe_align_block_size")
    except ImportError:
        align = None
    source_file = root / "vllm_fused_moe" / "SOURCE.md"
    source = source_file.read_text().strip() if source_file.is_file() else "unknown (no SOURCE.md)"
    return SimpleNamespace(fm=fm, align=align, source=source)


# ---------------------------------------------------------------- alignment
def _align_buffers(numel: int, block_size: int, num_experts: int, device: torch.device):
    """Buffers as vLLM's ``moe_align_block_size`` allocates them."""
    max_padded = numel + num_experts * (block_size - 1)
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=device)
    expert_ids = torch.zeros((-(-max_padded // block_size),), dtype=torch.int32, device=device)
    num_post = torch.empty((1,), dtype=torch.int32, device=device)
    return sorted_ids, expert_ids, num_post


def torch_align(topk_ids: torch.Tensor, block_size: int, num_experts: int):
    """vLLM's ``moe_align_block_size`` output, in torch ops without host synchronisation.

    ``sorted_ids`` (numel + E*(BLOCK-1),): slot indices ``t*K + k`` grouped by expert, each
    expert's segment in slot order and padded to a multiple of ``block_size`` with ``numel``;
    ``expert_ids`` (blocks,): the expert of each block, 0 past the used blocks (vLLM zeroes
    them); ``num_post`` (1,): the padded total.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    numel = flat.numel()
    sorted_ids, _, _ = _align_buffers(numel, block_size, num_experts, device)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_size - 1) // block_size * block_size
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    first_slot = torch.cumsum(counts, 0) - counts
    rank = torch.arange(numel, device=device) - first_slot[experts]
    sorted_ids[(ends - padded)[experts] + rank] = order.to(torch.int32)
    blocks = sorted_ids.numel() // block_size + (sorted_ids.numel() % block_size > 0)
    starts = torch.arange(blocks, device=device) * block_size
    owner = torch.searchsorted(ends, starts, right=True)
    expert_ids = torch.where(starts < ends[-1], owner, 0).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


def triton_align(peer: SimpleNamespace, topk_ids: torch.Tensor, block_size: int, num_experts: int):
    """vLLM's ``moe_align_block_size_triton`` on buffers allocated as vLLM's wrapper does."""
    if peer.align is None or not hasattr(peer.align, "moe_align_block_size_triton"):
        raise Unavailable("no moe_align_block_size_triton in the vendored vLLM source")
    bufs = _align_buffers(topk_ids.numel(), block_size, num_experts, topk_ids.device)
    peer.align.moe_align_block_size_triton(topk_ids, num_experts, block_size, *bufs)
    return bufs


# ---------------------------------------------------------------- vLLM's pipeline
def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``fused_topk(..., renormalize=True)``: float32 weights (T, K), int32 ids."""
    weights, ids = moe_peers.torch_route(logits, top_k)
    return weights, ids.to(torch.int32)


def vllm_config(peer: SimpleNamespace, w1: torch.Tensor, w2: torch.Tensor, top_k: int, m: int, tuned: bool):
    """(config, where it came from), as ``try_get_optimal_moe_config`` picks it (dtype None:
    unquantised bf16/fp16) or, with ``tuned=False``, ``get_default_config``."""
    fm = peer.fm
    e, _, n = w2.shape
    if tuned:
        configs = fm.get_moe_configs(e, n, None, 0, 0)
        if configs:
            name = fm.get_config_file_name(e, n, None)
            key = min(configs.keys(), key=lambda x: abs(x - m))
            return fm.try_get_optimal_moe_config(w1.size(), w2.size(), top_k, None, m), f"tuned {name}[{key}]"
    return fm.get_default_config(m, e, n, w1.size(2), top_k, None, None), "get_default_config"


def _compute_type(dtype: torch.dtype):
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def experts(peer, x, w1, w2, topk_weights, aligned, top_k: int, config: dict) -> torch.Tensor:
    """``fused_experts_impl`` (unquantised, one chunk) after alignment: kernel 1, SiLU-and-mul,
    kernel 2 with the routing weight, top-k sum. ``aligned`` = (sorted_ids, expert_ids, num_post)."""
    fm = peer.fm
    m = x.size(0)
    _, n, _ = w1.size()
    k = w2.size(1)
    cache13 = torch.empty(m * top_k * max(n, k), device=x.device, dtype=x.dtype)
    cache1 = cache13[: m * top_k * n].view(m, top_k, n)
    cache3 = cache13[: m * top_k * k].view(m, top_k, k)
    cache2 = torch.empty((m * top_k, n // 2), device=x.device, dtype=x.dtype)
    compute_type = _compute_type(x.dtype)
    quant = dict(use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False)
    sorted_ids, expert_ids, num_post = aligned
    fm.invoke_fused_moe_kernel(
        x, w1, cache1, None, None, None, topk_weights, sorted_ids, expert_ids, num_post,
        False, top_k, config, compute_type=compute_type, per_channel_quant=False, **quant,
    )  # fmt: skip
    h = cache1.view(-1, n)
    torch.mul(F.silu(h[:, : n // 2]), h[:, n // 2 :], out=cache2)  # vLLM: torch.ops._C.silu_and_mul
    fm.invoke_fused_moe_kernel(
        cache2, w2, cache3, None, None, None, topk_weights, sorted_ids, expert_ids, num_post,
        True, 1, config, compute_type=compute_type, per_channel_quant=False, **quant,
    )  # fmt: skip
    out = torch.empty_like(x)
    torch.sum(cache3, dim=1, out=out)  # vLLM: ops.moe_sum (at::sum_out for top-k > 4)
    return out


def forward(peer, x, logits, w1, w2, top_k: int, config: dict, align: str) -> torch.Tensor:
    """The whole forward, routing included (what every impl of the harness times)."""
    weights, ids = route(logits, top_k)
    e = w1.size(0)
    bm = config["BLOCK_SIZE_M"]
    aligned = triton_align(peer, ids, bm, e) if align == "triton" else torch_align(ids, bm, e)
    return experts(peer, x, w1, w2, weights, aligned, top_k, config)


# ---------------------------------------------------------------- harness plumbing
def build(impl: str, op: str, case: MoECase, data: Data) -> Built:
    """``Built`` for one of :data:`IMPLS` (the harness's peer interface)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown vllm impl {impl!r}; known: {IMPLS}")
    if op == "moe_fwd_bwd":
        raise Unsupported("vLLM's fused_moe is inference only (no backward)")
    device = data.sets[0]["x"].device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unavailable("vLLM's Triton kernels need CUDA (or TRITON_INTERPRET=1)")
    peer = load_peer()
    w1, w2 = data.shared["w_gate_up"], data.shared["w_down"]
    t, k = case.tokens, case.top_k
    config, source = vllm_config(peer, w1, w2, k, t, tuned=impl != "vllm_default_config")
    if impl == "vllm_default_config" and vllm_config(peer, w1, w2, k, t, tuned=True)[1] == source:
        raise Unsupported("no tuned vLLM config for this shape and card: same as 'vllm'")
    cfg_text = ",".join(f"{k}={v}" for k, v in config.items())
    align = "triton" if impl == "vllm_triton_align" else "torch"
    note = f"config {source}: {cfg_text}; align {align}"
    if impl == "vllm_gemms_only":
        pre = []
        for s in data.sets:
            weights, ids = route(s["logits"], k)
            pre.append((weights, torch_align(ids, config["BLOCK_SIZE_M"], w1.size(0))))
        note += " (routing and alignment outside the timed region)"

        def fn(i: int) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return (experts(peer, data.sets[i]["x"], w1, w2, pre[i][0], pre[i][1], k, config),)

        return Built(fn=fn, note=note)

    def fn_full(i: int) -> tuple[torch.Tensor, ...]:
        s = data.sets[i]
        with torch.no_grad():
            return (forward(peer, s["x"], s["logits"], w1, w2, k, config, align),)

    return Built(fn=fn_full, note=note)


def build_side_by_side(impl: str, op: str, case: MoECase, data: Data) -> Built:
    return build(impl, op, case, data) if impl in IMPLS else moe_peers.build(impl, op, case, data)


def family() -> harness.Family:
    peers = SimpleNamespace(IMPLS=SIDE_BY_SIDE_IMPLS, build=build_side_by_side)
    return harness.Family(name="moe", cases=moe_cases, peers=peers)


# ---------------------------------------------------------------- breakdown and main
def parse_cases(text: str) -> list[MoECase]:
    """``B4096,A4096,B8`` -> issue-5 shapes at those token counts; ``smoke`` -> tiny float32."""
    if text == "smoke":
        base = MoECase("smoke", 40, 64, 32, 8, 2, "float32")
        return [base, replace(base, tokens=3, experts=16, top_k=4)]
    return [moe_cases.shape_case(item[0], int(item[1:])) for item in text.split(",") if item]


def breakdown(peer, case: MoECase, data: Data, config: dict) -> dict[str, float]:
    """Median ms of each step of ``vllm`` on set 0 (do_bench, L2 flushed by it)."""
    import triton

    s, w1, w2 = data.sets[0], data.shared["w_gate_up"], data.shared["w_down"]
    k, e, bm = case.top_k, w1.size(0), config["BLOCK_SIZE_M"]
    weights, ids = route(s["logits"], k)
    aligned = torch_align(ids, bm, e)
    steps = {
        "routing_torch": lambda: route(s["logits"], k),
        "align_torch": lambda: torch_align(ids, bm, e),
        "align_vllm_triton": lambda: triton_align(peer, ids, bm, e),
        "experts_after_align": lambda: experts(peer, s["x"], w1, w2, weights, aligned, k, config),
    }
    out = {}
    for name, step in steps.items():
        try:
            out[name] = harness.sig(triton.testing.do_bench(step, warmup=25, rep=50, return_mode="median"), 4)
        except Exception as exc:  # a step that breaks is reported, not fatal
            out[name] = harness._short(exc, 120)
    return out


GRAPH_IMPLS = ("vllm", "vllm_triton_align", "vllm_gemms_only", "flashmoe")


def graph_rows(op: str, case: MoECase, data: Data, impls: list[str]) -> list[dict[str, Any]]:
    """Each impl's call on set 0 captured in one CUDA graph, replays timed (do_bench median,
    L2 flushed): what a decode step costs without host launch overhead. The replay's output
    must equal an eager call's. ``grouped_mm`` cannot be captured (host sync in bincount)."""
    import triton

    rows = []
    for impl in [i for i in GRAPH_IMPLS if i in impls]:
        row: dict[str, Any] = {"op": op, "impl": f"{impl}_cuda_graph", "case": moe_cases.case_dict(case)}
        row.update(ms=None, tflops=None, status="ok", note=None)
        if op == "moe_decode":
            row["gbps"] = None
        graph = None
        try:
            fn = build_side_by_side(impl, op, case, data).fn
            eager = fn(0)[0]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(0)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(0)[0]
            graph.replay()
            torch.cuda.synchronize()
            err = harness.rel_err([out], [eager])
            if not err <= 1e-6:
                raise RuntimeError(f"graph replay differs from the eager call: rel err {err:.3g}")
            ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
            row["ms"] = harness.sig(ms, 5)
            row["tflops"] = harness.sig(harness.tflops(moe_cases.flops(op, case), ms))
            if op == "moe_decode":
                row["gbps"] = harness.sig(harness.gbps(moe_cases.nbytes(op, case, data), ms))
            row["note"] = "one call on set 0 captured in a CUDA graph; replays timed (do_bench median)"
        except Exception as exc:  # a capture that breaks is a result, not a crash of the run
            row.update(status="failed", note=harness._short(exc))
        finally:
            del graph
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        rows.append(row)
    ok = {r["impl"]: r["ms"] for r in rows if r["status"] == "ok"}
    main = ok.get("flashmoe_cuda_graph")
    for r in rows:
        if r["impl"] == "flashmoe_cuda_graph" and main:
            r["speedup"] = {p: harness.sig(ms / main) for p, ms in ok.items() if p != r["impl"]}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers.vllm_fused_moe_peer", description=__doc__)
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"default {DEFAULT_CASES}; 'smoke' on CPU")
    ap.add_argument("--impls", default=",".join(SIDE_BY_SIDE_IMPLS))
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/moe_vllm-*.json)")
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--deadline-s", type=float, default=1e9, help="start no new case after this many seconds")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replay timings")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        peer = load_peer()
    except Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("error: no CUDA; set TRITON_INTERPRET=1 for the CPU smoke test", file=sys.stderr)
        return 2
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    cfg = harness.TimingConfig(n_sets=args.sets, rep_ms=args.rep_ms)
    fam = family()
    cli = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.peers.vllm_fused_moe_peer " + shlex.join(cli)
    out_path = harness.new_results_path(args.out, "moe_vllm")
    doc: dict[str, Any] = {"meta": harness.collect_meta(command, device), "rows": []}
    source = peer.source.splitlines()
    cases = parse_cases(args.cases)
    for n, case in enumerate(cases, 1):
        if time.perf_counter() - t0 > args.deadline_s:
            print(f"deadline: {len(cases) - n + 1} case(s) not run", file=sys.stderr, flush=True)
            break
        op = "moe_decode" if case.tokens <= 64 else "moe_fwd"
        rows = harness.run_case(fam, op, case, impls, device, cfg)
        for r in rows:
            if r["impl"].startswith("vllm"):
                r["vllm_source"] = source
        if device.type == "cuda" and not (args.no_breakdown and args.no_graphs):
            torch.manual_seed(0)
            data = moe_cases.make_data(op, case, 1, device, None)
            w1, w2 = data.shared["w_gate_up"], data.shared["w_down"]
            config, _ = vllm_config(peer, w1, w2, case.top_k, case.tokens, tuned=True)
            for r in rows:
                if r["impl"] == "vllm" and not args.no_breakdown:
                    r["vllm_breakdown_ms"] = breakdown(peer, case, data, config)
            if not args.no_graphs:
                rows.extend(graph_rows(op, case, data, impls))
            del data
            torch.cuda.empty_cache()
        doc["rows"].extend(rows)
        harness.write_results(out_path, doc)
        line = harness.progress_line(n, len(cases), op, moe_cases.label(case), rows)
        print(f"{line}  [{time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    print(harness.format_table(doc))
    for r in doc["rows"]:
        if r["impl"] in ("flashmoe", "flashmoe_cuda_graph") and r.get("speedup"):
            label = moe_cases.label(MoECase(**r["case"]))
            print(f"{label}: peer ms / {r['impl']} ms = {json.dumps(r['speedup'])}")
        if r.get("vllm_breakdown_ms"):
            label = moe_cases.label(MoECase(**r["case"]))
            print(f"  vllm steps ({label}): {json.dumps(r['vllm_breakdown_ms'])}")
    print(f"wrote {out_path} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
