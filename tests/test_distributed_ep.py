"""ExpertParallelMoE on gloo (CPU) against the single-process FlashMoELayer.

Each test spawns the processes once (spawn is the slow part) and runs several cases in
them. Every case compares, on every rank, the expert-parallel layer in float32 (``o``) with
the dense layer on the concatenated tokens of the EP group in float32 (``p``) and in float64
(``r``), by DESIGN.md's rule: outputs, aux loss, and the gradients of x, router, experts
(shards gathered) and shared experts. Loss per rank: ``<y_r, g_r> + aux_r`` with a random
``g``; gradients summed over ranks, so the dense oracle's loss is ``<y, g> + W * aux``
(see ExpertParallelMoE's docstring for why W).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _numerics import assert_close_rule

from flashmoe_science.distributed import ExpertParallelMoE, all_gather_rows, new_ep_dp_groups
from flashmoe_science.nn import FlashMoELayer

H, F = 16, 8  # hidden, ffn per expert: tiny, spawn and setup dominate the runtime
AUX_COEF, Z_COEF = 1.0, 0.1  # large enough that the aux-loss gradient is tested, not drowned


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, cases: str) -> None:
    mp.spawn(_worker, args=(world, _free_port(), cases), nprocs=world, join=True)


def _worker(rank: int, world: int, port: int, cases: str) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # 127.0.0.1 only
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a mismatched collective fails instead of hanging CI
    )
    try:
        for case in _CASES[cases]:
            case(rank, world)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- oracle
def _aux64(logits: torch.Tensor, ids: torch.Tensor, e: int, k: int, scoring: str) -> torch.Tensor:
    """The dense layer's aux loss, all in float64."""
    t = logits.shape[0]
    if t == 0:
        return logits.new_zeros(())
    lf = logits.double()
    probs = torch.softmax(lf, -1) if scoring == "softmax" else torch.sigmoid(lf)
    if scoring == "sigmoid":
        probs = probs / probs.sum(-1, keepdim=True)
    ones = torch.ones(ids.numel(), dtype=torch.float64)
    counts = torch.zeros(e, dtype=torch.float64).index_add(0, ids.reshape(-1).long(), ones)
    lb = e * (counts / (t * k) * probs.mean(0)).sum()
    z = torch.logsumexp(lf, -1).square().mean()
    return AUX_COEF * lb + Z_COEF * z


def _dense_run(layer: FlashMoELayer, x: torch.Tensor, g: torch.Tensor, w: int, oracle: bool) -> dict:
    """Forward + backward of the dense layer on one EP group's tokens."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = layer(x)
    if oracle:
        aux = _aux64(layer.router(x), layer.last_topk_ids, layer.num_experts, layer.top_k, layer.scoring)
    else:
        aux = layer.aux_loss
    loss = (y * g).sum() + w * aux
    if loss.requires_grad:  # not with zero tokens: the dense layer returns constants then
        loss.backward()
    x_grad = x.grad if x.grad is not None else torch.zeros_like(x)
    out = {"y": y.detach(), "aux": aux.detach(), "x": x_grad, "ids": layer.last_topk_ids}
    for name, p in layer.named_parameters():
        out[name] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return out


def _check_case(
    rank: int,
    world: int,
    *,
    experts: int,
    top_k: int,
    tokens: list[int],
    scoring: str = "softmax",
    shared: int = 0,
    skew_to: int | None = None,
    ep_size: int | None = None,
    fsdp: bool = False,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
    hidden: int = H,
    ffn: int = F,
) -> None:
    """``tokens[r]``: local tokens of rank r. ``skew_to``: the sigmoid router's selection
    bias sends every token to that EP rank's experts. ``ep_size`` < world: EP x DP.
    ``backend``: FLASHMOE_BACKEND for the expert-parallel layer only (the dense ``p`` runs
    the reference path)."""
    ep_size = ep_size or world
    tag = (
        f"[rank {rank}, E={experts}, K={top_k}, T={tokens}, {scoring}, ep={ep_size}, fsdp={fsdp}, "
        f"{dtype}, backend={backend}]"
    )
    if ep_size == world:
        ep_group, dp_group = None, None
    else:
        ep_group, dp_group = new_ep_dp_groups(ep_size)
    el = experts // ep_size
    torch.manual_seed(1234)  # same dense weights and data on every rank
    dense = FlashMoELayer(
        hidden,
        experts,
        top_k,
        ffn,
        scoring=scoring,
        num_shared_experts=shared,
        aux_loss_coef=AUX_COEF,
        z_loss_coef=Z_COEF,
    )
    if skew_to is not None:
        dense.expert_bias[skew_to * el : (skew_to + 1) * el] = 50.0
    dense = dense.to(dtype)
    dense64 = copy.deepcopy(dense).double()
    total = sum(tokens)
    x_all = torch.randn(total, hidden).to(dtype)
    g_all = torch.randn(total, hidden).to(dtype)
    starts = [sum(tokens[:r]) for r in range(world)]

    def rows(r):
        return slice(starts[r], starts[r] + tokens[r])

    # Dense references, one per EP group (replica); gradients of shared weights summed.
    replica = rank // ep_size
    refs_p, refs_r = [], []
    for q in range(world // ep_size):
        members = range(q * ep_size, (q + 1) * ep_size)
        xq = torch.cat([x_all[rows(r)] for r in members])
        gq = torch.cat([g_all[rows(r)] for r in members])
        refs_p.append(_dense_run(dense, xq, gq, ep_size, oracle=False))
        refs_r.append(_dense_run(dense64, xq.double(), gq.double(), ep_size, oracle=True))
    mine_p, mine_r = refs_p[replica], refs_r[replica]
    assert torch.equal(mine_p["ids"], mine_r["ids"]), f"{tag} float32 and float64 routing differ: reseed"

    ep = ExpertParallelMoE.from_dense(dense, ep_group)
    assert ep.w_gate_up.shape[0] == el
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # Router and shared experts sharded by FSDP2; the EP experts left to the EP group.
        fully_shard(ep, mesh=init_device_mesh("cpu", (world,)), ignored_params=set(ep.expert_parameters()))
    x = x_all[rows(rank)].clone().requires_grad_()
    saved = os.environ.get("FLASHMOE_BACKEND")
    if backend is not None:
        os.environ["FLASHMOE_BACKEND"] = backend
    try:
        y = ep(x)
        ((y * g_all[rows(rank)]).sum() + ep.aux_loss).backward()
    finally:
        if saved is None:
            os.environ.pop("FLASHMOE_BACKEND", None)
        else:
            os.environ["FLASHMOE_BACKEND"] = saved
    if backend == "triton":
        assert "flashmoe_science.ops.moe.launch" in sys.modules, f"{tag} the Triton launchers never ran"

    # Outputs, routing and the load-balance counters.
    off = sum(tokens[r] for r in range(replica * ep_size, rank))
    mine = slice(off, off + tokens[rank])
    assert torch.equal(ep.last_topk_ids, mine_p["ids"][mine]), f"{tag} routing differs"
    assert_close_rule(y, mine_r["y"][mine], mine_p["y"][mine], name=f"{tag} y")
    assert_close_rule(ep.aux_loss, mine_r["aux"], mine_p["aux"], name=f"{tag} aux_loss")
    expected_counts = torch.bincount(mine_p["ids"].reshape(-1).long(), minlength=experts)
    assert torch.equal(ep.last_expert_counts, expected_counts), f"{tag} expert counts"
    assert torch.equal(ep.last_tokens_per_rank, expected_counts.view(ep_size, el).sum(1)), tag
    assert ep.last_recv_tokens == int(ep.last_tokens_per_rank[rank % ep_size]), tag
    if skew_to is not None:
        assert ep.last_tokens_per_rank.count_nonzero() == 1, f"{tag} skew did not leave ranks empty"

    # Gradients: x (local rows), replicated weights (summed over all ranks), experts
    # (summed over the DP replicas of this shard, then gathered over the EP group).
    assert_close_rule(x.grad, mine_r["x"][mine], mine_p["x"][mine], grad=True, name=f"{tag} dx")
    for name, p in ep.named_parameters():
        grad = p.grad
        if fsdp and name not in ("w_gate_up", "w_down"):
            # FSDP2 reduce-scatters the mean over the mesh: back to the sum.
            grad = grad.full_tensor() * world
        elif name in ("w_gate_up", "w_down"):
            if dp_group is not None:
                grad = _sum(grad, dp_group)
            grad = all_gather_rows(grad, ep_group)
        else:
            grad = _sum(grad, None)
        ref_p = sum(ref[name] for ref in refs_p)
        ref_r = sum(ref[name] for ref in refs_r)
        assert_close_rule(grad, ref_r, ref_p, grad=True, name=f"{tag} d{name}")


def _sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks in float64, rounded once to t's dtype (the test's reduction adds
    no error of its own beyond that rounding)."""
    s = t.double()
    dist.all_reduce(s, group=group)
    return s.to(t.dtype)


def _case_dense_roundtrip(rank: int, world: int) -> None:
    """from_dense -> dense_state_dict gives back the dense weights exactly."""
    torch.manual_seed(7)
    dense = FlashMoELayer(H, 2 * world, 2, F, num_shared_experts=1)
    ep = ExpertParallelMoE.from_dense(dense)
    state = ep.dense_state_dict()
    for key, value in dense.state_dict().items():
        assert torch.equal(state[key], value), key
    with pytest.raises(ValueError, match="multiple of the EP group size"):
        ExpertParallelMoE(H, 2 * world + 1, 2, F)
    bad = dict(dense.state_dict(), w_down=dense.w_down[:1])
    with pytest.raises(ValueError, match="w_down has 1 experts"):
        ep.load_dense_state_dict(bad)
    with pytest.raises(ValueError, match="expected torch.float32, the experts' dtype"):
        ep(torch.randn(3, H, dtype=torch.float64))
    # (..., H) inputs: a (2, 3, H) batch gives the rows of the flattened (6, H) one.
    x = torch.randn(2, 3, H)
    assert torch.equal(ep(x), ep(x.reshape(6, H)).view(2, 3, H))
    assert ep.last_recv_tokens == int(ep.last_tokens_per_rank[rank])


def _case_input_without_grad(rank: int, world: int) -> None:
    """x without requires_grad (a first layer): no dispatch all-to-all in backward on any
    rank, the ranks that receive nothing included; weight gradients as with x trainable."""
    torch.manual_seed(3)
    dense = FlashMoELayer(H, 2 * world, 2, F, scoring="sigmoid")
    dense.expert_bias[:2] = 50.0  # everything to rank 0's experts
    ep = ExpertParallelMoE.from_dense(dense)
    x = torch.randn(3 if rank else 0, H)
    g = torch.randn(x.shape)
    grads = []
    for x_grad in (True, False):
        ep.zero_grad(set_to_none=True)
        y = ep(x.clone().requires_grad_(x_grad))
        ((y * g).sum() + ep.aux_loss).backward()
        grads.append([p.grad.clone() for p in ep.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _case_bench_smoke(rank: int, world: int) -> None:
    """benchmarks/ep_bench.py runs (gloo, tiny shapes): its check passes, rows come out."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import ep_bench

    args = "--device cpu --tokens-per-rank 16 --hidden 16 --ffn 8 --experts 4 --top-k 2 --iters 1 --warmup 1"
    table = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ep.json"
        with contextlib.redirect_stdout(table):
            assert ep_bench.main([*args.split(), "--out", str(out), "--ep-sizes", "1,2"]) == 0
        if rank == 0:
            assert table.getvalue().count(" ok") == 6, table.getvalue()  # 2 ops x (ep 1: 2 impls, ep 2)
            from benchmarks import harness

            problems = harness.validate_results(json.loads(out.read_text()))
            assert problems == [], problems
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"


_CASES = {
    "world2": [
        _case_dense_roundtrip,
        _case_bench_smoke,
        _case_input_without_grad,
        # uneven token counts, shared expert
        lambda r, w: _check_case(r, w, experts=4, top_k=2, tokens=[5, 3], shared=1),
        # rank 0 has no tokens; every token goes to rank 0's experts, rank 1 receives none
        lambda r, w: _check_case(r, w, experts=4, top_k=2, tokens=[0, 6], scoring="sigmoid", skew_to=0),
        # no tokens anywhere: empty outputs, aux loss 0, collectives still matched
        lambda r, w: _check_case(r, w, experts=4, top_k=1, tokens=[0, 0]),
        # EP degree 1 inside a DP world of 2 (each rank its own EP group)
        lambda r, w: _check_case(r, w, experts=2, top_k=2, tokens=[3, 4], ep_size=1),
        # FSDP2 shards router + shared experts, EP holds the experts
        lambda r, w: _check_case(r, w, experts=4, top_k=2, tokens=[4, 3], shared=1, fsdp=True),
        # float16 through the Triton kernels (interpreter on CPU): the CUDA path's code
        lambda r, w: _check_case(
            r, w, experts=4, top_k=2, tokens=[5, 2], dtype=torch.float16, backend="triton", ffn=16
        ),
    ],
    "world4": [
        # uneven, one rank without tokens, K=E_l
        lambda r, w: _check_case(r, w, experts=8, top_k=2, tokens=[5, 0, 7, 3]),
        # all tokens to rank 2's experts; three ranks receive none, rank 2 sends none
        lambda r, w: _check_case(r, w, experts=8, top_k=2, tokens=[3, 4, 0, 2], scoring="sigmoid", skew_to=2),
        # EP 2 x DP 2: experts reduced over the DP group, router over the world
        lambda r, w: _check_case(r, w, experts=4, top_k=2, tokens=[3, 2, 4, 1], shared=1, ep_size=2),
    ],
}


def test_distributed_ep_needs_process_group():
    if dist.is_initialized():
        pytest.skip("another test left a default process group in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(H, 4, 2, F)


def test_distributed_ep_two_processes():
    _spawn(2, "world2")


def test_distributed_ep_four_processes():
    _spawn(4, "world4")
