"""Small MoE launches for compute-sanitizer: every kernel family once, outputs checked.

    PYTHONPATH=src compute-sanitizer --tool memcheck  python3 -m benchmarks.moe_sanitize
    PYTHONPATH=src compute-sanitizer --tool racecheck python3 -m benchmarks.moe_sanitize

Covers routing (softmax; group-limited sigmoid with bias), the three alignment paths
(``route_align_kernel`` at T <= 16, ``align_single_kernel`` for T*K <= ``SINGLE_CHUNK``, the
count / scan / scatter kernels above, with more blocks than one ``OWNER_STEP`` of the block-owner
scan), the grouped GEMMs of the inference path and of autograd (small and large tile classes),
and the backward (``bwd_act``, wgrad). Autotuning is off (the first config of each list), so the
run is short under the sanitizers. Each check compares with the float32 reference path; the
alignment is checked against counts computed with torch. Prints one line per check and a last
line ``moe_sanitize: N checks, all ok`` (or the failures).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLASHMOE_MOE_AUTOTUNE", "0")

import torch  # noqa: E402

from benchmarks.harness import rel_err  # noqa: E402
from benchmarks.peers._common import forced_backend  # noqa: E402
from flashmoe_science import fused_moe  # noqa: E402
from flashmoe_science.ops.moe import launch, route  # noqa: E402


def _weights(e: int, h: int, f: int, dev, grad: bool = False):
    w1 = (torch.randn(e, 2 * f, h, device=dev) / h**0.5).bfloat16().requires_grad_(grad)
    w2 = (torch.randn(e, h, f, device=dev) / f**0.5).bfloat16().requires_grad_(grad)
    return w1, w2


def _inference(t: int, h: int, f: int, e: int, k: int, dev) -> float:
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
    w1, w2 = _weights(e, h, f, dev)
    logits = torch.randn(t, e, device=dev)
    with torch.no_grad():
        y = fused_moe(x, w1, w2, logits, top_k=k)
        with forced_backend("reference"):
            ref = fused_moe(x.float(), w1.float(), w2.float(), logits, top_k=k)
    return rel_err([y], [ref])


def _training(t: int, h: int, f: int, e: int, k: int, dev) -> float:
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w1, w2 = _weights(e, h, f, dev, grad=True)
    logits = torch.randn(t, e, device=dev, requires_grad=True)
    dy = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
    leaves = (x, w1, w2, logits)
    y = fused_moe(x, w1, w2, logits, top_k=k)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t_.detach().float().requires_grad_() for t_ in leaves]
    with forced_backend("reference"):
        ref_y = fused_moe(*ref_leaves[:3], ref_leaves[3], top_k=k)
        ref_grads = torch.autograd.grad(ref_y, ref_leaves, dy.float())
    return rel_err([y, *grads], [ref_y, *ref_grads])


def _align_check(t: int, e: int, k: int, block_m: int, dev) -> bool:
    ids = torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(t)]).to(torch.int32)
    al = launch.align(ids, e, block_m)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=e)
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(padded, 0) - padded
    owner = torch.repeat_interleave(torch.arange(e, device=dev), padded // block_m)
    used = owner.numel()
    slots = al.sorted_slots[: used * block_m].view(used, block_m).long()
    # Every real slot appears once, in its expert's segment.
    rows = torch.arange(block_m, device=dev)[None, :] + torch.arange(used, device=dev)[:, None] * block_m
    real = rows < (start[owner] + counts[owner])[:, None]
    seen = torch.zeros(t * k, dtype=torch.long, device=dev)
    seen.index_add_(0, slots[real], torch.ones_like(slots[real]))
    ok = bool((seen == 1).all())
    ok &= bool((ids.reshape(-1)[slots[real]].long() == owner[:, None].expand_as(slots)[real]).all())
    ok &= torch.equal(al.expert_count.long(), counts) and torch.equal(al.expert_start.long(), start)
    ok &= torch.equal(al.block_expert[:used].long(), owner)
    return ok and used > launch.OWNER_STEP


def main() -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: TRITON_INTERPRET=1
    torch.manual_seed(0)
    results = []

    def check(name: str, value, ok: bool) -> None:
        results.append((name, ok))
        print(f"moe_sanitize {name}: {value} {'ok' if ok else 'FAILED'}", flush=True)

    # bf16 inputs against the float32 reference: errors of a few 1e-3 (DESIGN.md's bf16 band).
    for t in (8, 40, 300):  # route_align, align_single, three-kernel align
        err = _inference(t, 128, 96, 16, 4, dev)
        check(f"inference T={t}", f"rel err {err:.2e}", err < 2e-2)
    err = _training(77, 128, 96, 16, 4, dev)
    check("forward+backward T=77 E=16 K=4", f"max rel err {err:.2e}", err < 2e-2)
    err = _training(640, 256, 128, 8, 2, dev)  # ~160 rows an expert: the large tile class
    check("forward+backward T=640 E=8 K=2", f"max rel err {err:.2e}", err < 2e-2)
    logits = torch.randn(64, 32, device=dev)
    bias = torch.randn(32, device=dev)
    w, ids = route(logits, 4, scoring="sigmoid", bias=bias, n_group=4, topk_group=2)
    with forced_backend("reference"):
        w_ref, ids_ref = route(logits, 4, scoring="sigmoid", bias=bias, n_group=4, topk_group=2)
    same = torch.equal(ids.long().sort(1).values, ids_ref.long().sort(1).values)
    check("group-limited sigmoid route", f"ids equal {same}, weights err {rel_err([w], [w_ref]):.1e}", same)
    ok = _align_check(2048, 64, 8, 16, dev)
    check("align T=2048 E=64 K=8 block_m 16 (multi-step block owners)", ok, ok)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    bad = [n for n, ok in results if not ok]
    print(f"moe_sanitize: {len(results)} checks, " + ("all ok" if not bad else f"FAILED: {bad}"), flush=True)


if __name__ == "__main__":
    main()
