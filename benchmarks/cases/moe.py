"""MoE cases as data, FLOP/byte models, inputs and the float32 reference.

Shape letters: T tokens, H hidden, F ffn per expert, E experts, K top-k. Weights in
DESIGN.md's layout: ``w_gate_up`` (E, 2F, H), ``w_down`` (E, H, F). Router logits are
float32 (T, E); routing (softmax, top-k, renormalise) is inside every timed call.

FLOP model: forward ``6 * T * K * H * F`` (gate+up GEMM 4TKHF, down GEMM 2TKHF);
forward+backward 3x that. Decode (``moe_decode``) is weight-bandwidth bound: its bytes are
the weights of the experts the tokens touch plus x, y and the logits, reported as GB/s
against the device copy ceiling (3.0 TB/s on the H100).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..harness import Data

OPS = ("moe_fwd", "moe_fwd_bwd", "moe_decode")
OP_FLOP_FACTOR = {"moe_fwd": 1.0, "moe_fwd_bwd": 3.0, "moe_decode": 1.0}
FLOOR_IMPL = "dense_floor"
COPY_CEILING_GBPS = 3000.0  # H100 device copy, measured (DESIGN.md toolchain facts)
CHECK_MAX_TOKENS = 2048  # the reference check runs on at most this many tokens


@dataclass(frozen=True)
class MoECase:
    shape: str  # "A", "B", "C" (issue 5) or "smoke"
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    dtype: str = "bfloat16"


# (hidden, ffn, experts, top_k) of the issue-5 shapes.
SHAPES = {
    "A": (4096, 14336, 8, 2),  # Mixtral-like
    "B": (2048, 768, 128, 8),  # fine-grained (Qwen3-MoE-like)
    "C": (2048, 1024, 256, 8),  # fine-grained, 256 experts (DeepSeek-V3-like widths)
}


def shape_case(shape: str, tokens: int) -> MoECase:
    h, f, e, k = SHAPES[shape]
    return MoECase(shape, tokens, h, f, e, k)


@dataclass(frozen=True)
class Suite:
    description: str
    prefill: tuple[MoECase, ...]
    decode: tuple[MoECase, ...]
    quick_prefill: tuple[MoECase, ...]
    quick_decode: tuple[MoECase, ...]


_SMOKE = MoECase("smoke", 48, 64, 32, 8, 2)
SUITES: dict[str, Suite] = {
    "issue5": Suite(
        "issue 5: A (T 4096/16384), B (T 4096/16384), C (T 8192); decode T 1/8/64 with B and C weights",
        (
            shape_case("A", 4096),
            shape_case("A", 16384),
            shape_case("B", 4096),
            shape_case("B", 16384),
            shape_case("C", 8192),
        ),
        tuple(shape_case(s, t) for s in ("B", "C") for t in (1, 8, 64)),
        (shape_case("A", 4096), shape_case("B", 4096), shape_case("C", 8192)),
        # Decode cases are cheap: the quick run keeps all of issue 5's T = 1, 8, 64.
        tuple(shape_case(s, t) for s in ("B", "C") for t in (1, 8, 64)),
    ),
    "smoke": Suite(
        "tiny CPU shapes (tests)",
        (_SMOKE, replace(_SMOKE, tokens=37, top_k=3)),
        (replace(_SMOKE, tokens=3),),
        (_SMOKE,),
        (replace(_SMOKE, tokens=3),),
    ),
}
DEFAULT_SUITE = {"moe_fwd": "issue5", "moe_fwd_bwd": "issue5", "moe_decode": "issue5"}


def select_cases(op: str, suite: str, quick: bool) -> list[MoECase]:
    if suite not in SUITES:
        raise ValueError(f"unknown moe suite {suite!r}; known: {sorted(SUITES)}")
    s = SUITES[suite]
    if op == "moe_decode":
        return list(s.quick_decode if quick else s.decode)
    return list(s.quick_prefill if quick else s.prefill)


def case_dict(case: MoECase) -> dict[str, Any]:
    return asdict(case)


def label(case: MoECase) -> str:
    return f"{case.shape} T{case.tokens} H{case.hidden} F{case.ffn} E{case.experts} k{case.top_k}"


def fwd_flops(case: MoECase) -> float:
    return 6.0 * case.tokens * case.top_k * case.hidden * case.ffn


def flops(op: str, case: MoECase) -> float:
    return OP_FLOP_FACTOR[op] * fwd_flops(case)


def expected_experts_touched(tokens: int, experts: int, top_k: int) -> float:
    """Experts hit by T tokens routing uniformly to K distinct experts each."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def decode_bytes(case: MoECase, experts_touched: float) -> float:
    """Fewest bytes a decode step moves: the touched experts' weights (3*H*F each), x in,
    y out, float32 logits in."""
    elt = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    weights = experts_touched * 3 * case.hidden * case.ffn * elt
    return weights + 2 * case.tokens * case.hidden * elt + 4 * case.tokens * case.experts


def nbytes(op: str, case: MoECase, data: Data | None) -> float | None:
    if op != "moe_decode":
        return None  # prefill shapes are compute bound: TFLOP/s only
    touched = None if data is None else data.shared.get("experts_touched")
    if touched is None:
        touched = expected_experts_touched(case.tokens, case.experts, case.top_k)
    return decode_bytes(case, touched)


def check_case(op: str, case: MoECase, device: torch.device) -> MoECase:
    """The case with at most ``CHECK_MAX_TOKENS`` tokens (same weights shape): the float32
    oracle loops over experts, and routing bugs show at any token count."""
    return replace(case, tokens=min(case.tokens, CHECK_MAX_TOKENS))


def _route_ids(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    return torch.softmax(logits.float(), -1).topk(top_k, dim=-1).indices


def make_data(op: str, case: MoECase, n_sets: int, device: torch.device, shared: Data | None) -> Data:
    """Weights once (scaled like nn.Linear's init, so activations stay O(1)), then
    ``n_sets`` of (x, float32 router logits[, dy]). ``shared``: reuse its weights."""
    dt = getattr(torch, case.dtype)
    grad = op == "moe_fwd_bwd"
    if shared is not None and "w_gate_up" in shared.shared:
        w_gate_up, w_down = shared.shared["w_gate_up"], shared.shared["w_down"]
    else:
        e, h, f = case.experts, case.hidden, case.ffn
        w_gate_up = torch.randn(e, 2 * f, h, device=device, dtype=dt).mul_(h**-0.5)
        w_down = torch.randn(e, h, f, device=device, dtype=dt).mul_(f**-0.5)
        if grad:
            w_gate_up.requires_grad_(True)
            w_down.requires_grad_(True)
    sets = []
    touched = []
    for _ in range(n_sets):
        s = {
            "x": torch.randn(case.tokens, case.hidden, device=device, dtype=dt),
            "logits": torch.randn(case.tokens, case.experts, device=device, dtype=torch.float32),
        }
        if grad:
            s["x"].requires_grad_(True)
            s["logits"].requires_grad_(True)
            s["dy"] = torch.randn(case.tokens, case.hidden, device=device, dtype=dt)
        touched.append(float(_route_ids(s["logits"].detach(), case.top_k).unique().numel()))
        sets.append(s)
    return Data(
        shared={"w_gate_up": w_gate_up, "w_down": w_down, "experts_touched": sum(touched) / len(touched)},
        sets=sets,
    )


def reference_outputs(op: str, case: MoECase, data: Data) -> tuple[torch.Tensor, ...]:
    """The float32 oracle on set 0: (y,) for the forward and decode, (y, dx, dw_gate_up,
    dw_down, dlogits) for forward+backward (random grad ``dy``)."""
    from flashmoe_science.ops.moe.reference import fused_experts_ref, route_ref

    s = data.sets[0]
    w13, w2 = data.shared["w_gate_up"].detach(), data.shared["w_down"].detach()
    x, logits = s["x"].detach().float(), s["logits"].detach().float()
    if op != "moe_fwd_bwd":
        with torch.no_grad():
            weights, ids = route_ref(logits, case.top_k)
            # Weights stay in their dtype; the reference upcasts one expert at a time.
            return (fused_experts_ref(x, w13, w2, weights, ids, compute_dtype=torch.float32),)
    x, w13, w2, logits = (t.float().requires_grad_(True) for t in (x, w13, w2, logits))
    weights, ids = route_ref(logits, case.top_k)
    y = fused_experts_ref(x, w13, w2, weights, ids, compute_dtype=torch.float32)
    grads = torch.autograd.grad(y, (x, w13, w2, logits), s["dy"].float())
    return (y.detach(), *grads)
