"""Gluon (warp-specialised, sm_90) attention forward on the GPU, against the float64 reference
with the DESIGN.md rule. Outputs are NaN-poisoned so unwritten elements fail. Skipped off
Hopper: the kernel is sm_90 only and Gluon has no CPU interpreter (CPU CI tests the Triton
kernel instead).
"""

from __future__ import annotations

import pytest
import torch
from _numerics import assert_close_rule

from flashmoe_science import flash_attention_science
from flashmoe_science.ops.attention import api, launch, launch_gluon, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
        reason="the Gluon kernel needs an sm_90 GPU",
    ),
]


@pytest.fixture(autouse=True)
def _fresh_replays():
    """Each test starts with no recorded replays and no remembered direct calls, so a test that
    counts kernel launches does not depend on what ran before it in the same process."""
    launch_gluon._REPLAYS.clear()
    api._DIRECT.clear()
    yield
    launch_gluon._REPLAYS.clear()
    api._DIRECT.clear()


DTYPES = [torch.float16, torch.bfloat16]
# (B, H, H_kv, S_q, S_k)
SHAPES = [
    (2, 4, 4, 128, 128),  # one program, block multiple
    (1, 4, 4, 1, 1),  # S = 1
    (1, 4, 4, 1, 333),  # decode: one query, ragged keys
    (2, 8, 2, 257, 257),  # GQA 4:1, not a block multiple
    (1, 8, 1, 300, 1000),  # MQA, S_q < S_k (bottom-right causal)
    (1, 4, 4, 1000, 300),  # S_q > S_k: first rows see no key when causal
    (1, 4, 2, 1537, 1537),  # longer, ragged
]


def _check(q, k, v, causal, config=None):
    scale = q.shape[-1] ** -0.5
    b, h, s_q, _ = q.shape
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((b, h, s_q), float("nan"), dtype=torch.float32, device=q.device)
    assert launch_gluon.supported(q, k, v)
    launch_gluon.attention_fwd(q, k, v, causal, scale, config=config, out=out, lse=lse)
    r_out, r_lse = reference.attention_ref(q, k, v, causal, scale, compute_dtype=torch.float64)
    p_out, p_lse = reference.attention_ref(q, k, v, causal, scale, compute_dtype=q.dtype)
    assert_close_rule(out, r_out, p_out, name="out")
    assert_close_rule(lse, r_lse, p_lse.float(), name="lse")


# 80 and 96 run as 128 inside the kernel (zero-filled columns, clipped stores); 256 stages its
# output in Q's shared buffer.
DENSE_DIMS = [64, 80, 96, 128, 256]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", DENSE_DIMS, ids=[f"D{d}" for d in DENSE_DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_dense(dtype, d, causal):
    for b, h, h_kv, s_q, s_k in SHAPES:
        q = torch.randn(b, h, s_q, d, device="cuda", dtype=dtype)
        k = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=dtype)
        v = torch.randn(b, h_kv, s_k, d, device="cuda", dtype=dtype)
        _check(q, k, v, causal)


CONFIGS = [  # (BLOCK_M, BLOCK_N, stages, ping-pong, consumers, schedule)
    pytest.param(128, (64, 128, 2, True, 2, 0), id="D128-pingpong"),
    pytest.param(128, (64, 128, 2, False, 2, 1), id="D128-persistent"),
    pytest.param(128, (64, 128, 2, True, 2, 2), id="D128-snake-pingpong"),
    pytest.param(64, (64, 128, 3, True, 2, 0), id="D64-2-consumers"),
    pytest.param(64, (64, 128, 3, True, 3, 1), id="D64-3-consumers-persistent-pingpong"),
    pytest.param(64, (64, 128, 3, False, 3, 2), id="D64-3-consumers-snake"),
    pytest.param(96, (64, 128, 2, False, 2, 1), id="D96-persistent"),
    pytest.param(96, (64, 128, 2, False, 2, 2), id="D96-snake"),
    pytest.param(256, (64, 64, 2, False, 2, 1), id="D256-o-in-q-persistent"),
    pytest.param(256, (64, 64, 2, False, 2, 0), id="D256-o-in-q-per-tile"),
    pytest.param(256, (64, 64, 2, True, 2, 2), id="D256-o-in-q-snake-pingpong"),
    pytest.param(256, (64, 32, 3, False, 2, 0), id="D256-separate-o"),
]


@pytest.mark.parametrize("programs", [None, 5], ids=["sm-count", "5-programs"])
@pytest.mark.parametrize("d, config", CONFIGS)
def test_configs(d, config, programs, monkeypatch):
    """Other pipeline depths, consumer counts and schedules give the same results; persistent
    configs on 5 programs loop over many tiles each."""
    if programs is not None:
        if not config[5]:
            pytest.skip("the program count matters for persistent configs only")
        monkeypatch.setattr(launch_gluon, "_num_sms", lambda device: programs)
    q = torch.randn(2, 4, 1100, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 1300, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 2, 1300, d, device="cuda", dtype=torch.bfloat16)
    for causal in (False, True):
        _check(q, k, v, causal, config=config)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_strided_bshd_views(dtype):
    """Transposed (B, S, H, D) views go through 4-D descriptors with no copy."""
    b, s, h, h_kv, d = 2, 777, 8, 2, 128
    q = torch.randn(b, s, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(b, s, h_kv, d, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(b, s, h_kv, d, device="cuda", dtype=dtype).transpose(1, 2)
    _check(q, k, v, True)


def test_kv_cache_view_with_nan_tail():
    """Keys/values are a view of a longer cache whose unused rows hold NaN: rows past S_k
    must never reach the output (TMA zero-fills rows outside the descriptor's shape)."""
    cache_k = torch.full((1, 4, 512, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    cache_v = torch.full_like(cache_k, float("nan"))
    s_k = 300
    cache_k[:, :, :s_k] = torch.randn(1, 4, s_k, 128, device="cuda", dtype=torch.bfloat16)
    cache_v[:, :, :s_k] = torch.randn(1, 4, s_k, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 4, 200, 128, device="cuda", dtype=torch.bfloat16)
    for causal in (False, True):
        _check(q, cache_k[:, :, :s_k], cache_v[:, :, :s_k], causal)


def test_padded_head_dim_reads_and_writes_only_real_columns():
    """D96 runs as 128: q/k/v are (.., 96) views of 128-wide buffers whose columns 96..127 hold
    NaN (they must load as zeros, never as the neighbouring memory), and the output is a view
    whose columns 96..127 hold a sentinel (stores must be clipped at 96)."""
    b, h, h_kv, s_q, s_k, d = 2, 4, 2, 333, 555, 96

    def view(hh, s):
        buf = torch.full((b, hh, s, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
        buf[..., :d] = torch.randn(b, hh, s, d, device="cuda", dtype=torch.bfloat16)
        return buf[..., :d]

    q, k, v = view(h, s_q), view(h_kv, s_k), view(h_kv, s_k)
    assert launch_gluon.supported(q, k, v)
    for causal in (False, True):
        buf = torch.full((b, h, s_q, 128), 7.0, device="cuda", dtype=torch.bfloat16)
        out = buf[..., :d].fill_(float("nan"))
        lse = torch.full((b, h, s_q), float("nan"), device="cuda")
        launch_gluon.attention_fwd(q, k, v, causal, d**-0.5, out=out, lse=lse)
        assert torch.all(buf[..., d:] == 7.0), "store past the real head dim"
        r_out, r_lse = reference.attention_ref(q, k, v, causal, d**-0.5, compute_dtype=torch.float64)
        p_out, p_lse = reference.attention_ref(q, k, v, causal, d**-0.5, compute_dtype=q.dtype)
        assert_close_rule(out, r_out, p_out, name="out")
        assert_close_rule(lse, r_lse, p_lse.float(), name="lse")


def test_unsupported_falls_outside():
    """What the Gluon kernel does not cover is reported, not run."""
    for d in (32, 48, 100, 160, 192):  # below 64, not a multiple of 8, between 128 and 256
        q = torch.randn(1, 2, 64, d, device="cuda", dtype=torch.bfloat16)
        assert not launch_gluon.supported(q, q, q), d
    q = torch.randn(1, 2, 64, 128, device="cuda", dtype=torch.float32)
    assert not launch_gluon.supported(q, q, q)


@pytest.mark.parametrize("d", [128, 96], ids=["D128", "D96"])
@pytest.mark.parametrize("gluon", ["1", "0"], ids=["gluon", "FLASHMOE_ATTN_GLUON=0"])
def test_public_api_dispatch(gluon, d, monkeypatch):
    """The dense forward runs the Gluon kernel where it applies, unless switched off; the
    default scale is 1/sqrt of the real head dim (96, not the padded 128)."""
    monkeypatch.setenv("FLASHMOE_ATTN_GLUON", gluon)
    monkeypatch.setenv("FLASHMOE_BACKEND", "auto")
    calls = []
    real = launch_gluon.attention_fwd
    monkeypatch.setattr(launch_gluon, "attention_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launch, "_empty", poisoned)
    q = torch.randn(2, 8, 333, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 555, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 2, 555, d, device="cuda", dtype=torch.bfloat16)
    out, lse = flash_attention_science(q, k, v, causal=True, return_lse=True)
    assert len(calls) == (1 if gluon == "1" else 0)
    r_out, r_lse = reference.attention_ref(q, k, v, True, d**-0.5, compute_dtype=torch.float64)
    p_out, p_lse = reference.attention_ref(q, k, v, True, d**-0.5, compute_dtype=q.dtype)
    assert_close_rule(out, r_out, p_out, name="out")
    assert_close_rule(lse, r_lse, p_lse.float(), name="lse")


def test_broadcast_kv_is_not_covered():
    """An expanded (stride-0) K/V head dim is no TMA layout: it stays on the Triton kernel."""
    q = torch.randn(1, 4, 64, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16).expand(1, 4, 64, 128)
    assert not launch_gluon.supported(q, k, k)


def _check_api(q, k, v, causal, scale=None):
    out, lse = flash_attention_science(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    r_out, r_lse = reference.attention_ref(q, k, v, causal, scale, compute_dtype=torch.float64)
    p_out, p_lse = reference.attention_ref(q, k, v, causal, scale, compute_dtype=q.dtype)
    assert_close_rule(out, r_out, p_out, name="out")
    assert_close_rule(lse, r_lse, p_lse.float(), name="lse")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_replay(causal, monkeypatch):
    """Eager calls with metadata seen before relaunch the recorded compiled kernel without
    Triton's binder (``launch_gluon.replay_fwd``): new data, another scale and poisoned outputs
    still meet the rule; other strides record their own replay; an unaligned base, a launch
    hook and FLASHMOE_ATTN_GLUON=0 do not replay."""
    from triton import knobs

    from flashmoe_science.ops.attention.kernels import fwd_gluon

    monkeypatch.setenv("FLASHMOE_BACKEND", "auto")
    monkeypatch.setenv("FLASHMOE_ATTN_GLUON", "1")
    nan = float("nan")
    monkeypatch.setattr(launch, "_empty", lambda s, dt, dev: torch.full(s, nan, dtype=dt, device=dev))
    kernel = fwd_gluon.attn_fwd_gluon_kernel
    jit, replays = [], []
    real_run, real_replay = kernel.run, launch_gluon.replay_fwd
    monkeypatch.setattr(kernel, "run", lambda *a, **kw: jit.append(1) or real_run(*a, **kw))

    def counted(*a, **kw):
        res = real_replay(*a, **kw)
        replays.append(res is not None)
        return res

    monkeypatch.setattr(launch_gluon, "replay_fwd", counted)

    def qkv(bshd=False):
        def rand(h):
            if bshd:  # (B, S, H, D) storage viewed as (B, H, S, D)
                return torch.randn(2, 300, h, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            return torch.randn(2, h, 300, 128, device="cuda", dtype=torch.bfloat16)

        return rand(8), rand(2), rand(2)

    _check_api(*qkv(), causal)
    assert (len(jit), replays) == (1, [False])
    # The recording keeps no tensor of the call that made it (no memory held by the cache).
    (entry,) = launch_gluon._REPLAYS.values()
    assert not any(isinstance(a, torch.Tensor) or hasattr(a, "base") for a in entry[1])
    _check_api(*qkv(), causal)  # remembered metadata: straight to the replay
    _check_api(*qkv(), causal, scale=0.05)  # another scale: checked again, then replayed
    assert (len(jit), replays) == (1, [False, True, True])
    _check_api(*qkv(bshd=True), causal)  # other strides: a launch of their own ...
    _check_api(*qkv(bshd=True), causal)  # ... then replayed
    assert (len(jit), replays[3:]) == (2, [False, True])

    # Same shapes and strides over a base 2 bytes off 16-byte alignment: no TMA, no replay
    # (the Triton kernel runs).
    q, k, v = qkv()
    buf = torch.randn(q.numel() + 1, device="cuda", dtype=q.dtype)
    q_off = buf[1:].view(q.shape)
    _check_api(q_off, k, v, causal)
    assert (len(jit), replays[5:]) == (2, [False])

    # A launch hook (a profiler): Triton's full path, so the hook sees the launch.
    seen = []

    def hook(meta):
        seen.append(1)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        _check_api(*qkv(), causal)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert (len(jit), len(seen) > 0, replays[6:]) == (3, True, [False])

    monkeypatch.setenv("FLASHMOE_ATTN_GLUON", "0")
    _check_api(*qkv(), causal)
    assert (len(jit), replays[7:]) == (3, [])
