"""Attention cases as data, FLOP model, inputs and the float32 reference.

Shape letters: B batch, H query heads, H_kv key/value heads, S_q / S_k sequence lengths,
D head dim. Layout (B, H, S, D), as ``scaled_dot_product_attention``.

FLOP model (the flash-attn convention, used by the issue tables): forward
``4 * B * H * S_q * S_k * D`` (two GEMMs), halved when causal; backward 2.5x the forward
(five GEMMs where the forward has two); forward+backward 3.5x.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..harness import Data

OPS = ("attention_fwd", "attention_bwd", "attention_fwd_bwd")
OP_FLOP_FACTOR = {"attention_fwd": 1.0, "attention_bwd": 2.5, "attention_fwd_bwd": 3.5}
FLOOR_IMPL = None
TOKENS = 16384  # batch * seqlen of the issue tables


@dataclass(frozen=True)
class AttentionCase:
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool
    dtype: str = "bfloat16"

    @property
    def gqa(self) -> bool:
        return self.heads_kv != self.heads_q


def tokens_case(
    seqlen: int,
    *,
    causal: bool,
    heads: int = 16,
    heads_kv: int | None = None,
    head_dim: int = 128,
    tokens: int = TOKENS,
) -> AttentionCase:
    """A case with ``batch * seqlen = tokens`` (the issue tables' convention)."""
    return AttentionCase(
        batch=max(1, tokens // seqlen),
        heads_q=heads,
        heads_kv=heads if heads_kv is None else heads_kv,
        seqlen_q=seqlen,
        seqlen_k=seqlen,
        head_dim=head_dim,
        causal=causal,
    )


@dataclass(frozen=True)
class Suite:
    description: str
    cases: tuple[AttentionCase, ...]
    quick: tuple[AttentionCase, ...]


_MAIN = tuple(tokens_case(s, causal=c) for s in (2048, 4096, 8192, 16384) for c in (False, True))
_GQA = tokens_case(4096, heads=32, heads_kv=8, causal=True)  # 32:8, 4k causal
_HDIM64 = tuple(tokens_case(4096, heads=32, head_dim=64, causal=c) for c in (False, True))
_SHORT = tuple(tokens_case(s, causal=c) for s in (512, 1024) for c in (False, True))
_HDIMS = tuple(tokens_case(4096, head_dim=d, causal=c) for d in (32, 96, 256) for c in (False, True))
_QUICK = tuple(tokens_case(s, causal=c) for s in (2048, 8192) for c in (False, True)) + (_GQA,)

SUITES: dict[str, Suite] = {
    "issue3": Suite(
        "forward bar of issue 3: hdim 128 / 16 heads / 16k tokens at 2k-16k full+causal; hdim 64 "
        "(32 heads); GQA 32:8 4k causal; short 512/1k; hdim 32/96/256",
        _MAIN + _HDIM64 + (_GQA,) + _SHORT + _HDIMS,
        _QUICK,
    ),
    "issue4": Suite(
        "backward bar of issue 4: hdim 128 at 2k-16k full+causal, GQA 32:8 4k causal, hdim 64",
        _MAIN + (_GQA,) + _HDIM64,
        _QUICK,
    ),
    "d128": Suite(
        "the hdim-128 rows of issues 3 and 4 only (2k-16k full+causal): decisive many-round runs",
        _MAIN,
        _MAIN[:2],
    ),
    "short": Suite(
        "issue 3's short sequences (512/1k, hdim 128) where host time per call shows",
        _SHORT,
        _SHORT[:2],
    ),
    # Tiny shapes for the CPU tests: odd length, GQA, causal with S_q != S_k.
    "smoke": Suite(
        "tiny CPU shapes (tests)",
        (
            AttentionCase(1, 2, 2, 64, 64, 32, False),
            AttentionCase(1, 4, 2, 48, 48, 32, True),
            AttentionCase(1, 2, 2, 32, 64, 32, True),
        ),
        (AttentionCase(1, 2, 2, 64, 64, 32, False),),
    ),
}
DEFAULT_SUITE = {"attention_fwd": "issue3", "attention_bwd": "issue4", "attention_fwd_bwd": "issue4"}


def select_cases(op: str, suite: str, quick: bool) -> list[AttentionCase]:
    if suite not in SUITES:
        raise ValueError(f"unknown attention suite {suite!r}; known: {sorted(SUITES)}")
    s = SUITES[suite]
    return list(s.quick if quick else s.cases)


def case_dict(case: AttentionCase) -> dict[str, Any]:
    return asdict(case)


def label(case: AttentionCase) -> str:
    kv = f":{case.heads_kv}" if case.gqa else ""
    s = f"S{case.seqlen_q}" + (f"/{case.seqlen_k}" if case.seqlen_k != case.seqlen_q else "")
    return f"B{case.batch} H{case.heads_q}{kv} {s} D{case.head_dim} {'causal' if case.causal else 'full'}"


def fwd_flops(case: AttentionCase) -> float:
    f = 4.0 * case.batch * case.heads_q * case.seqlen_q * case.seqlen_k * case.head_dim
    return f / 2 if case.causal else f


def flops(op: str, case: AttentionCase) -> float:
    return OP_FLOP_FACTOR[op] * fwd_flops(case)


def nbytes(op: str, case: AttentionCase, data: Data | None) -> float | None:
    return None  # compute bound: TFLOP/s only


def score_bytes(case: AttentionCase) -> int:
    """Bytes of one float32 (B, H, S_q, S_k) score matrix, what the reference path holds."""
    return 4 * case.batch * case.heads_q * case.seqlen_q * case.seqlen_k


# How many float32 score-sized tensors are alive at the peak (counted from reference.py):
# forward s, e, p and a temporary; backward s, p, dp, ds and two temporaries; the autograd
# oracle keeps the forward's intermediates too.
REFERENCE_PEAK_SCORES = {"attention_fwd": 4, "attention_bwd": 6, "attention_fwd_bwd": 6}
ORACLE_PEAK_SCORES = {"attention_fwd": 4, "attention_bwd": 9, "attention_fwd_bwd": 9}


def memory_budget(device: torch.device, fraction: float) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return fraction * free
    return 2e9  # CPU: keep the test machine safe


def _oracle_unit_bytes(op: str, case: AttentionCase) -> int:
    """Peak bytes of the oracle on one batch element and one KV head (its query group)."""
    g = case.heads_q // case.heads_kv
    return ORACLE_PEAK_SCORES[op] * 4 * g * case.seqlen_q * case.seqlen_k


def check_case(op: str, case: AttentionCase, device: torch.device) -> AttentionCase:
    """The case itself when the float32 oracle fits one batch element and one KV head at a
    time (``reference_outputs`` chunks over those), else a smaller case of the same kind
    (same heads, head dim, mask, dtype; both seqlens halved)."""
    budget = memory_budget(device, 0.35)
    c = case
    while _oracle_unit_bytes(op, c) > budget and min(c.seqlen_q, c.seqlen_k) > 128:
        c = replace(c, batch=1, seqlen_q=c.seqlen_q // 2, seqlen_k=c.seqlen_k // 2)
    return c


def make_data(op: str, case: AttentionCase, n_sets: int, device: torch.device, shared: Data | None) -> Data:
    """``n_sets`` fresh standard-normal (q, k, v[, do]) sets; leaves require grad for the
    backward ops."""
    dt = getattr(torch, case.dtype)
    grad = op != "attention_fwd"
    sets = []
    for _ in range(n_sets):
        s = {
            "q": torch.randn(case.batch, case.heads_q, case.seqlen_q, case.head_dim, device=device, dtype=dt),
            "k": torch.randn(
                case.batch, case.heads_kv, case.seqlen_k, case.head_dim, device=device, dtype=dt
            ),
            "v": torch.randn(
                case.batch, case.heads_kv, case.seqlen_k, case.head_dim, device=device, dtype=dt
            ),
        }
        if grad:
            for name in ("q", "k", "v"):
                s[name].requires_grad_(True)
            s["do"] = torch.randn(
                case.batch, case.heads_q, case.seqlen_q, case.head_dim, device=device, dtype=dt
            )
        sets.append(s)
    return Data(shared={}, sets=sets)


def reference_outputs(op: str, case: AttentionCase, data: Data) -> tuple[torch.Tensor, ...]:
    """The float32 oracle on set 0: (out,) for the forward, (dq, dk, dv) for the backward,
    (out, dq, dk, dv) for forward+backward (random grad_out ``do``). Computed a batch
    element and a few KV heads (with their query groups) at a time, so the oracle of a 16k
    case fits where the whole score tensor would not."""
    from flashmoe_science.ops.attention.reference import attention_ref

    s = data.sets[0]
    scale = 1.0 / math.sqrt(case.head_dim)
    q, k, v = (s[n].detach().float() for n in ("q", "k", "v"))
    do = s["do"].detach().float() if "do" in s else None
    g = case.heads_q // case.heads_kv
    per_head = _oracle_unit_bytes(op, case)
    chunk = int(max(1, min(case.heads_kv, memory_budget(q.device, 0.35) // max(per_head, 1))))
    out = torch.empty_like(q)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v)) if do is not None else (None, None, None)
    for b in range(case.batch):
        for h0 in range(0, case.heads_kv, chunk):
            h1 = min(case.heads_kv, h0 + chunk)
            qs, ks, vs = q[b : b + 1, h0 * g : h1 * g], k[b : b + 1, h0:h1], v[b : b + 1, h0:h1]
            if do is None:
                with torch.no_grad():
                    out[b : b + 1, h0 * g : h1 * g] = attention_ref(qs, ks, vs, case.causal, scale)[0]
                continue
            qs, ks, vs = (t.clone().requires_grad_(True) for t in (qs, ks, vs))
            o, _ = attention_ref(qs, ks, vs, case.causal, scale)
            grads = torch.autograd.grad(o, (qs, ks, vs), do[b : b + 1, h0 * g : h1 * g])
            out[b : b + 1, h0 * g : h1 * g] = o.detach()
            dq[b : b + 1, h0 * g : h1 * g], dk[b : b + 1, h0:h1], dv[b : b + 1, h0:h1] = grads
            del o, grads
    if op == "attention_fwd":
        return (out,)
    return (dq, dk, dv) if op == "attention_bwd" else (out, dq, dk, dv)
