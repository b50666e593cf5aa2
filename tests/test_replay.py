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
