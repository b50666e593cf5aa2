"""Gluon attention backward (``launch_bwd_gluon``) on a Hopper GPU: dq/dk/dv against the
float64 autograd oracle by DESIGN.md's rule (3x the same-dtype error + a rounding floor).

Every candidate config of ``launch_bwd_gluon.CANDIDATE_CONFIGS`` is checked at one shape; the
defaults over D 64/128 x full/causal x MHA/GQA x odd lengths (S_q < S_k, S_q > S_k, S = 1),
both dtypes; D 80/96/112 (run as 128) on two odd shapes. Scratch buffers and outputs are
NaN-poisoned allocations, so a row the preprocess or a tile the kernel never writes fails.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from _attention import check_grads, check_public_api_fwd_bwd, poison_allocations, reference_grads

from flashmoe_science.ops.attention import launch_bwd, launch_bwd_gluon, reference


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _hopper(), reason="needs an sm_90 (Hopper) GPU")]
DTYPES = [torch.float16, torch.bfloat16]


def _check(b, h, h_kv, s_q, s_k, d, causal, dtype, monkeypatch, config=None, chunk=None):
    q = torch.randn(b, h, s_q, d, dtype=dtype, device="cuda")
    k = torch.randn(b, h_kv, s_k, d, dtype=dtype, device="cuda")
    v = torch.randn(b, h_kv, s_k, d, dtype=dtype, device="cuda")
    scale = 1.0 / math.sqrt(d)
    out, lse = reference.attention_ref(q, k, v, causal, scale)
    do = torch.randn_like(q)
    assert launch_bwd_gluon.supported(q, k, v, do, out)
    poison_allocations(monkeypatch)
    grads = launch_bwd_gluon.attention_bwd_gluon(
        do, q, k, v, out, lse, causal, scale, config=config, chunk=chunk
    )
    torch.cuda.synchronize()
    monkeypatch.undo()
    check_grads(grads, *reference_grads(q, k, v, do, causal, scale, reference.attention_ref))


@pytest.mark.parametrize("chunk", [1, 2, 4, 7, 15])
@pytest.mark.parametrize(
    "shape", [(3, 10, 5, 300, 517), (3, 5, 5, 1000, 1000)], ids=lambda s: "x".join(map(str, s))
)
def test_gluon_bwd_head_chunks(shape, chunk, monkeypatch):
    """Program order in chunks of (batch, KV head) pairs (``head_chunk``): 15 pairs, so chunks
    of 2, 4 and 7 leave a short last chunk; every program must still cover its own KV block."""
    _check(*shape, 128, True, torch.bfloat16, monkeypatch, chunk=chunk)


def test_head_chunk_rule():
    """Causal D128: about one wave of programs per chunk, capped by the head count; full
    attention and D64: head by head."""
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for num_n in (1, 8, 16, 64, 128, 4 * sms):
        chunk = launch_bwd_gluon.head_chunk(True, num_n, 1 << 20, 128, dev)
        assert chunk & (chunk - 1) == 0 and chunk * num_n <= max(sms, num_n) < 2 * chunk * num_n
    assert launch_bwd_gluon.head_chunk(True, 8, 3, 128, dev) == 3
    assert launch_bwd_gluon.head_chunk(False, 8, 64, 128, dev) == 1
    assert launch_bwd_gluon.head_chunk(True, 8, 64, 64, dev) == 1


# (B, H, H_kv, S_q, S_k): block multiples, odd lengths with S_q < S_k and S_q > S_k (causal: the
# first S_q - S_k rows see no key), GQA 4:1, MQA, a single query row.
SHAPES = [
    (2, 4, 4, 256, 256),
    (2, 4, 4, 300, 517),
    (1, 8, 2, 517, 300),
    (2, 8, 2, 1000, 1000),
    (1, 4, 1, 1, 333),
    (1, 2, 2, 77, 77),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", launch_bwd_gluon.HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gluon_bwd_grads(dtype, d, causal, shape, monkeypatch):
    _check(*shape, d, causal, dtype, monkeypatch)


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [80, 96, 112])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gluon_bwd_padded_head_dims(dtype, d, causal, shape, monkeypatch):
    """Head dims run as 128 (128-wide TMA boxes over the real d columns)."""
    assert launch_bwd_gluon.kernel_head_dim(d) == 128
    _check(*shape, d, causal, dtype, monkeypatch)


@pytest.mark.parametrize(
    "d, config",
    [(d, c) for d, cs in launch_bwd_gluon.CANDIDATE_CONFIGS.items() for c in cs],
    ids=lambda x: str(x).replace(" ", ""),
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gluon_bwd_candidate_configs(d, config, causal, monkeypatch):
    _check(1, 8, 2, 333, 711, d, causal, torch.bfloat16, monkeypatch, config=config)


@pytest.fixture
def gluon_calls(monkeypatch):
    """Default routing (no opt-out, not deterministic); records each call of the Gluon
    backward launcher, which still runs."""
    calls = []
    real = launch_bwd_gluon.attention_bwd_gluon
    monkeypatch.setattr(
        launch_bwd_gluon, "attention_bwd_gluon", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    monkeypatch.delenv("FLASHMOE_ATTN_GLUON_BWD", raising=False)
    monkeypatch.delenv("FLASHMOE_DETERMINISTIC", raising=False)
    return calls


def test_routing(gluon_calls, monkeypatch):
    """``launch_bwd.attention_bwd`` runs the Gluon kernel by default on Hopper; deterministic mode
    and ``FLASHMOE_ATTN_GLUON_BWD=0`` keep it on the Triton kernels."""
    monkeypatch.setenv("FLASHMOE_ATTN_BWD_TUNE", "0")
    q = torch.randn(1, 4, 200, 128, dtype=torch.bfloat16, device="cuda")
    k, v = torch.randn_like(q), torch.randn_like(q)
    scale = 1.0 / math.sqrt(128)
    out, lse = reference.attention_ref(q, k, v, True, scale)
    do = torch.randn_like(q)
    want = reference_grads(q, k, v, do, True, scale, reference.attention_ref)
    check_grads(launch_bwd.attention_bwd(do, q, k, v, out, lse, True, scale), *want)
    assert gluon_calls == [1]
    monkeypatch.setenv("FLASHMOE_DETERMINISTIC", "1")
    check_grads(launch_bwd.attention_bwd(do, q, k, v, out, lse, True, scale), *want)
    assert gluon_calls == [1]
    monkeypatch.delenv("FLASHMOE_DETERMINISTIC")
    monkeypatch.setenv("FLASHMOE_ATTN_GLUON_BWD", "0")
    check_grads(launch_bwd.attention_bwd(do, q, k, v, out, lse, True, scale), *want)
    assert gluon_calls == [1]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_public_api_runs_gluon_bwd(causal, gluon_calls):
    """``flash_attention_science``'s autograd backward reaches the Gluon kernel (GQA 8:2, D 128)."""
    check_public_api_fwd_bwd(causal)
    assert gluon_calls == [1]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_grads_keep_input_strides(causal, monkeypatch):
    """(B, S, H, D) tensors viewed as (B, H, S, D), as the attention layer passes them: the
    gradients come back with ``empty_like``'s strides (the custom op's fake implementation
    promises them to torch.compile) and the right values."""
    q = torch.randn(2, 300, 8, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    k = torch.randn(2, 517, 2, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    v = torch.randn(2, 517, 2, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    scale = 1.0 / math.sqrt(128)
    out, lse = reference.attention_ref(q, k, v, causal, scale)
    do = torch.randn_like(q)
    assert launch_bwd_gluon.supported(q, k, v, do, out)
    poison_allocations(monkeypatch)
    grads = launch_bwd_gluon.attention_bwd_gluon(do, q, k, v, out, lse, causal, scale)
    torch.cuda.synchronize()
    monkeypatch.undo()
    for g, t in zip(grads, (q, k, v)):
        assert g.stride() == torch.empty_like(t).stride() == t.stride()
    check_grads(grads, *reference_grads(q, k, v, do, causal, scale, reference.attention_ref))


@pytest.mark.parametrize("layout", ["bhsd", "bshd_view"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_replay_of_recorded_kernels(causal, layout, monkeypatch):
    """The first call records the preprocess and the Gluon kernel; later calls with the same
    metadata replay them (new tensors, another scale), NaN-poisoned scratch and outputs each
    time; a different stride pattern records its own entry."""
    launch_bwd_gluon._REPLAYS.clear()
    records = []
    real_record = launch_bwd_gluon._record_bwd
    for i, scale in enumerate((0.09, 0.11, 0.13)):
        if layout == "bhsd":
            q = torch.randn(2, 8, 300, 128, dtype=torch.bfloat16, device="cuda")
            k = torch.randn(2, 2, 517, 128, dtype=torch.bfloat16, device="cuda")
        else:
            q = torch.randn(2, 300, 8, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
            k = torch.randn(2, 517, 2, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
        v = torch.randn_like(k)
        out, lse = reference.attention_ref(q, k, v, causal, scale)
        do = torch.randn_like(q)
        poison_allocations(monkeypatch)
        spy = functools.partial(lambda i, *a: records.append(i) or real_record(*a), i)
        monkeypatch.setattr(launch_bwd_gluon, "_record_bwd", spy)
        grads = launch_bwd_gluon.attention_bwd_gluon(do, q, k, v, out, lse, causal, scale)
        torch.cuda.synchronize()
        monkeypatch.undo()
        for g, t in zip(grads, (q, k, v)):
            assert g.stride() == torch.empty_like(t).stride()
        check_grads(grads, *reference_grads(q, k, v, do, causal, scale, reference.attention_ref))
    assert records == [0] and len(launch_bwd_gluon._REPLAYS) == 1
