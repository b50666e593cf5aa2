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


def _length_groups(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """Yield (len_q, len_k, q_rows, k_rows) for each group of sequences of equal lengths:
    q_rows (n * len_q,) and k_rows (n * len_k,) index the packed tensors, sequence-major, so
    a group runs as one dense (n, H, len, D) batch. Host-side: this is the reference path."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(len(cq) - 1):
        groups.setdefault((cq[i + 1] - cq[i], ck[i + 1] - ck[i]), []).append(i)
    dev = cu_seqlens_q.device
    for (len_q, len_k), seqs in groups.items():
        starts_q = torch.tensor([cq[i] for i in seqs], device=dev)
        starts_k = torch.tensor([ck[i] for i in seqs], device=dev)
        q_rows = (starts_q[:, None] + torch.arange(len_q, device=dev)).reshape(-1)
        k_rows = (starts_k[:, None] + torch.arange(len_k, device=dev)).reshape(-1)
        yield len_q, len_k, q_rows, k_rows


def _to_dense(t: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
    """Packed (total, H, D) rows -> dense (n, H, length, D)."""
    return t[rows].view(-1, length, t.shape[1], t.shape[2]).transpose(1, 2)


def _to_packed(t: torch.Tensor) -> torch.Tensor:
    """Dense (n, H, length, D) -> packed (n * length, H, D)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


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
    """Packed attention. Returns out (total_q, H, D), lse (H, total_q).

    Sequences of equal (len_q, len_k) run together as one dense batch, so a batch of many
    short structures costs a few dense calls, not one call per sequence."""
    cd = _compute_dtype(q.dtype, compute_dtype)
    lse_dtype = torch.float64 if cd == torch.float64 else torch.float32
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype, device=q.device)
    for len_q, len_k, q_rows, k_rows in _length_groups(cu_seqlens_q, cu_seqlens_k):
        if len_q == 0 or len_k == 0:  # nothing to compute: zeros and -inf stay
            continue
        o, l = attention_ref(
            _to_dense(q, q_rows, len_q),
            _to_dense(k, k_rows, len_k),
            _to_dense(v, k_rows, len_k),
            causal,
            softmax_scale,
            compute_dtype=compute_dtype,
        )
        out = out.index_copy(0, q_rows, _to_packed(o))
        lse = lse.index_copy(1, q_rows, l.permute(1, 0, 2).reshape(q.shape[1], -1))
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
    # delta = rowsum(dO * O) with O = P V recomputed in the compute dtype: the stored ``out``
    # is rounded to the input dtype (fp16/bf16), and its rounding (up to 2^-11 relative) moved
    # dK by a full fp16 ulp on small cases (the kernels use the stored O, as FlashAttention
    # does; the reference is the accurate side of the comparison).
    o_exact = torch.einsum("bhgqk,bhkd->bhgqd", p, vf) if out.dtype != cd else og
    delta = (dog * o_exact).sum(-1, keepdim=True)
    ds = p * (dp - delta) * softmax_scale
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, kf).reshape(b, h, s_q, d)
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, qg)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_varlen_bwd_ref(
    do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal: bool, softmax_scale: float
):
    """Varlen backward (layouts as ``attention_varlen_ref``), one dense call per group of
    sequences of equal lengths."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for len_q, len_k, q_rows, k_rows in _length_groups(cu_seqlens_q, cu_seqlens_k):
        if len_q == 0 or len_k == 0:
            continue
        lse_d = lse[:, q_rows].view(lse.shape[0], -1, len_q).transpose(0, 1)
        g = attention_bwd_ref(
            _to_dense(do, q_rows, len_q),
            _to_dense(q, q_rows, len_q),
            _to_dense(k, k_rows, len_k),
            _to_dense(v, k_rows, len_k),
            _to_dense(out, q_rows, len_q),
            lse_d,
            causal,
            softmax_scale,
        )
        dq[q_rows] = _to_packed(g[0])
        dk[k_rows] = _to_packed(g[1])
        dv[k_rows] = _to_packed(g[2])
    return dq, dk, dv
