"""Plain-PyTorch attention: the CPU path and the test oracle.

Shapes: B batch, H heads of q, H_kv heads of k/v (H % H_kv == 0), S_q / S_k sequence
lengths, D head dim. Dense layout (B, H, S, D); varlen layout (total, H, D) with
``cu_seqlens`` prefix sums.

Causal masking is bottom-right aligned: query row i sees key columns j <= i + S_k - S_q.
A row that sees no key outputs zeros and has lse = -inf.

GQA is computed by viewing q as (B, H_kv, H/H_kv, S_q, D) and broadcasting k/v, so the
repeated K/V is never materialised. Nothing here imports the kernel side.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    # float32 accumulation for half inputs; float32/float64 stay as they are.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def causal_mask(s_q: int, s_k: int, device: torch.device) -> torch.Tensor:
    """Boolean (S_q, S_k) mask, True where the key is *hidden* (bottom-right aligned)."""
    rows = torch.arange(s_q, device=device)[:, None]
    cols = torch.arange(s_k, device=device)[None, :]
    return cols > rows + (s_k - s_q)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention. Returns ``(out, lse)``: out like q (dtype of q), lse float32 (B, H, S_q).

    ``compute_dtype`` sets the arithmetic precision (default float32 for half inputs);
    tests pass the input dtype to measure what plain PyTorch loses in that dtype, and
    float64 for the oracle.
    """
    b, h, s_q, d = q.shape
    h_kv, s_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    g = h // h_kv
    cd = _compute_dtype(q.dtype, compute_dtype)
    lse_dtype = torch.float64 if cd == torch.float64 else torch.float32
    if s_k == 0:  # no key at all: every row sees nothing
        out = q.new_zeros((b, h, s_q, d_v))
        return out, torch.full((b, h, s_q), float("-inf"), dtype=lse_dtype, device=q.device)
    qg = q.to(cd).reshape(b, h_kv, g, s_q, d)
    kf, vf = k.to(cd), v.to(cd)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, kf) * softmax_scale
    if causal:
        s = s.masked_fill(causal_mask(s_q, s_k, q.device), float("-inf"))
    # Softmax with a detached finite shift: exact, and no NaN (value or gradient) in rows
    # that see no key.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.einsum("bhgqk,bhkd->bhgqd", p.to(cd), vf)
    lse = (torch.log(denom) + m).squeeze(-1)
    out = out.reshape(b, h, s_q, d_v).to(q.dtype)
    lse = lse.reshape(b, h, s_q).to(lse_dtype)
    return out, lse


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed attention, one sequence at a time. Returns out (total_q, H, D), lse (H, total_q)."""
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        qs = q[cq[i] : cq[i + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[ck[i] : ck[i + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[ck[i] : ck[i + 1]].transpose(0, 1).unsqueeze(0)
        o, lse = attention_ref(qs, ks, vs, causal, softmax_scale, compute_dtype=compute_dtype)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, dim=0) if outs else q.new_empty((0,) + tuple(q.shape[1:]))
    lse = torch.cat(lses, dim=1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return out, lse


def attention_bwd_ref(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit attention backward (the FlashAttention-2 equations), float32 math for half
    inputs. P is recomputed from lse; GQA gradients are summed over each KV head's group."""
    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    g = h // h_kv
    cd = _compute_dtype(q.dtype, None)
    qg = q.to(cd).reshape(b, h_kv, g, s_q, d)
    kf, vf = k.to(cd), v.to(cd)
    dog = do.to(cd).reshape(b, h_kv, g, s_q, d)
    og = out.to(cd).reshape(b, h_kv, g, s_q, d)
    lse_g = lse.to(cd).reshape(b, h_kv, g, s_q, 1)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, kf) * softmax_scale
    if causal:
        s = s.masked_fill(causal_mask(s_q, s_k, q.device), float("-inf"))
    # Rows that saw no key (lse = -inf) have P = 0 and contribute nothing.
    p = torch.exp(s - torch.where(torch.isfinite(lse_g), lse_g, torch.zeros_like(lse_g)))
    p = torch.where(torch.isfinite(lse_g), p, torch.zeros_like(p))
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, dog)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", dog, vf)
    delta = (dog * og).sum(-1, keepdim=True)
    ds = p * (dp - delta) * softmax_scale
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, kf).reshape(b, h, s_q, d)
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, qg)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_varlen_bwd_ref(
    do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal: bool, softmax_scale: float
):
    """Varlen backward, one sequence at a time (layouts as ``attention_varlen_ref``)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    to_dense = lambda t, a, z: t[a:z].transpose(0, 1).unsqueeze(0)  # noqa: E731
    for i in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if q1 == q0 or k1 == k0:
            continue
        g = attention_bwd_ref(
            to_dense(do, q0, q1),
            to_dense(q, q0, q1),
            to_dense(k, k0, k1),
            to_dense(v, k0, k1),
            to_dense(out, q0, q1),
            lse[:, q0:q1].unsqueeze(0),
            causal,
            softmax_scale,
        )
        dq[q0:q1] = g[0][0].transpose(0, 1)
        dk[k0:k1] = g[1][0].transpose(0, 1)
        dv[k0:k1] = g[2][0].transpose(0, 1)
    return dq, dk, dv
