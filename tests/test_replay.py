"""CPU checks of the launch-replay helpers (``ops._replay``); the replay itself launches CUDA
kernels and is tested on the GPU (tests/gpu/test_gpu_attention_fwd_gluon.py::test_replay)."""

from __future__ import annotations

import torch
from triton import knobs

from flashmoe_science.ops import _replay


def test_launch_hooks_turn_replays_off():
    """A profiler's launch hook must see every launch: with one installed, replays step aside."""
    assert _replay.active()

    def hook(meta):
        pass

    for chain in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        chain.add(hook)
        try:
            assert not _replay.active()
        finally:
            chain.remove(hook)
        assert _replay.active()


def test_tma_arg_carries_what_the_launcher_reads():
    """Triton's launcher builds the CUtensorMap from base.data_ptr(), shape, strides, padding."""
    t = torch.zeros(2, 3, 4, 8)
    arg = _replay.TmaArg(t, [2, 3, 4, 8], [96, 32, 8, 1])
    assert arg.base is t and arg.padding == "zero"
    assert (arg.shape, arg.strides) == ([2, 3, 4, 8], [96, 32, 8, 1])


def test_replay_grid_is_three_ints():
    r = _replay.Replay(object(), (7,), 0)
    assert r.grid == (7, 1, 1) and r.device == 0


class _Param:
    def __init__(self, name, default):
        self.name, self.default = name, default


class _FakeJIT:
    """Stands in for a ``@triton.jit`` function: records full-path launches and returns a
    stand-in compiled kernel, so ReplayJIT's keying runs without a GPU."""

    def __init__(self):
        import inspect

        self.arg_names = ["x", "n", "BLOCK"]
        self.params = [_Param("x", inspect.Parameter.empty), _Param("n", inspect.Parameter.empty),
                       _Param("BLOCK", 16)]  # fmt: skip
        self.pre_run_hooks = []
        self.full = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.full.append((grid, args, kw))
            return object()

        return launch


def _replay_env(monkeypatch):
    replays, device = [], {"index": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device["index"])
    monkeypatch.setattr(_replay.Replay, "__call__", lambda self, *a: replays.append((self.device, a)))
    return replays, device


def test_replay_jit_records_then_replays(monkeypatch):
    replays, _ = _replay_env(monkeypatch)
    fn = _FakeJIT()
    rj = _replay.ReplayJIT(fn)
    x = torch.zeros(8)
    rj[(4,)](x, 32, BLOCK=16)
    assert len(fn.full) == 1 and not replays
    rj[(4,)](x, 32, BLOCK=16)
    assert len(fn.full) == 1 and replays == [(0, (x, 32, 16))]  # positional args, then the tail
    # another value of an int, grid, keyword value or keyword type: a new recording
    for grid, n, kw in [((4,), 33, {"BLOCK": 16}), ((5,), 32, {"BLOCK": 16}), ((4,), 32, {"BLOCK": 32}),
                        ((4,), 32, {"BLOCK": True})]:  # fmt: skip
        before = len(fn.full)
        rj[grid](x, n, **kw)
        assert len(fn.full) == before + 1, (grid, n, kw)


def test_replay_jit_takes_the_full_path(monkeypatch):
    replays, device = _replay_env(monkeypatch)
    fn = _FakeJIT()
    rj = _replay.ReplayJIT(fn)
    x = torch.zeros(8)
    rj[(4,)](x, 32)
    # another device: its own recording, then replays there
    device["index"] = 1
    rj[(4,)](x, 32)
    rj[(4,)](x, 32)
    assert len(fn.full) == 2 and replays == [(1, (x, 32, 16))]
    device["index"] = 0
    rj[(4,)](x, 32)
    assert len(fn.full) == 2 and replays[-1][0] == 0
    n_full = len(fn.full)
    # non-scalar keyword values (a tensor, a tuple holding one), a callable grid, pre-run hooks,
    # Triton's debug mode: always the full path, never recorded
    rj[(4,)](x, 32, BLOCK=x)
    rj[(4,)](x, 32, BLOCK=(x,))
    rj[lambda meta: (4,)](x, 32)
    fn.pre_run_hooks.append(lambda *a, **k: None)
    rj[(4,)](x, 32)
    fn.pre_run_hooks.clear()
    monkeypatch.setattr(knobs.runtime, "debug", True)
    rj[(4,)](x, 32)
    monkeypatch.setattr(knobs.runtime, "debug", False)
    assert len(fn.full) == n_full + 5
    # an argument Triton handles otherwise (an object): the full path
    rj[(4,)](object(), 32)
    assert len(fn.full) == n_full + 6
