"""Re-launching an already compiled Triton/Gluon kernel without Triton's per-call Python.

``kernel[grid](*args)`` re-derives the specialisation of every argument (divisibility of each
int, alignment of each pointer, the type string of each host tensor descriptor), hashes it
into the cache key and expands the descriptors on every call: 35-40 us of host time on the
H100 machine for the attention forward, more than a 512-token forward takes on the GPU
(docs/attention_fwd.md, "Short sequences"). A launcher that has run a kernel once for
some fixed metadata (shapes, strides, dtype, config) can keep the ``CompiledKernel`` that
call returned and launch it again directly, as TorchInductor's generated launchers do
(``CompiledKernel.run`` with the stream, function and packed metadata).

The caller owns correctness of the key: everything Triton specialises on must be fixed by
it (here: exact shapes and strides, dtype, device, constexprs; pointer alignment is checked
per call by the caller). Launch hooks (profilers such as Proton) make ``active`` False, so
hooked launches take Triton's full path.
"""

from __future__ import annotations

import torch
from triton import knobs


class TmaArg:
    """What Triton's launcher reads from a host tensor descriptor (base tensor, shape,
    strides, padding): the descriptor's block shape and layout are fixed in the compiled
    kernel's metadata, so a replay needs only these."""

    __slots__ = ("base", "shape", "strides", "padding")

    def __init__(self, base: torch.Tensor, shape: list[int], strides: list[int], padding: str = "zero"):
        self.base, self.shape, self.strides, self.padding = base, shape, strides, padding


def _no_hook(hook) -> bool:
    # triton 3.6 keeps a HookChain (empty ``calls`` when nothing is installed); a plain
    # callable or anything else counts as a hook.
    return hook is None or getattr(hook, "calls", None) == []


def active() -> bool:
    """Whether replays may run now: no launch hooks installed."""
    rt = knobs.runtime
    return _no_hook(rt.launch_enter_hook) and _no_hook(rt.launch_exit_hook)


class Replay:
    """One compiled kernel with its grid and device. ``replay(*args)`` takes every kernel
    parameter in declaration order, constexprs included (as ``bound_args`` in Triton's own
    launch), with host descriptors as ``TmaArg`` (or ``TensorDescriptor``)."""

    __slots__ = ("compiled", "grid", "device")

    def __init__(self, compiled, grid: tuple[int, ...], device: int):
        self.compiled = compiled
        g = tuple(grid) + (1, 1)
        self.grid = (int(g[0]), int(g[1]), int(g[2]))
        self.device = device

    def __call__(self, *args) -> None:
        ck = self.compiled
        g0, g1, g2 = self.grid
        stream = torch._C._cuda_getCurrentRawStream(self.device)
        ck.run(g0, g1, g2, stream, ck.function, ck.packed_metadata, None, None, None, *args)


class _NoReplay(Exception):
    pass


def _sig(a):
    """What Triton specialises an argument on, or stricter: tensors by dtype and 16-byte
    alignment, ints/bools/strings/None by exact value, floats by type (not specialised)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    t = type(a)
    if t is int or t is bool or t is str or a is None:
        return (t, a)
    if t is float:
        return t
    raise _NoReplay


class ReplayJIT:
    """``ReplayJIT(jit_fn)[grid](*args, **kwargs)`` launches like ``jit_fn[grid](...)`` the first
    time for a signature (grid, each positional argument's ``_sig``, the keyword arguments),
    then relaunches the compiled kernel it returned. For plain ``@triton.jit`` functions with
    tensor/int/float/bool positional arguments and hashable constexpr/launch keywords; anything
    else (callable grids, host descriptors, keyword values other than scalars, launch hooks,
    pre-run hooks, ``knobs.runtime.debug`` or an instrumentation mode, the interpreter) takes
    Triton's full path. The key includes the current device and each keyword value's type
    (``True`` and ``1`` are different constexprs). Not re-checked on a replay: Triton's check
    that the globals a kernel read at compile time are unchanged (no kernel here reads any)."""

    __slots__ = ("fn", "names", "defaults", "cache")

    def __init__(self, fn):
        import inspect

        self.fn = fn
        self.names = list(fn.arg_names)
        self.defaults = {p.name: p.default for p in fn.params if p.default is not inspect.Parameter.empty}
        self.cache: dict[tuple, tuple] = {}

    def __getitem__(self, grid):
        return lambda *args, **kw: self._launch(grid, args, kw)

    def _launch(self, grid, args, kw):
        if callable(grid) or not active() or not torch.cuda.is_available():
            return self.fn[grid](*args, **kw)
        # Pre-run hooks must run; debug or instrumentation modes compile another binary.
        hooks = getattr(self.fn, "pre_run_hooks", None)
        if hooks or knobs.runtime.debug or knobs.compilation.instrumentation_mode:
            return self.fn[grid](*args, **kw)
        if not all(type(v) in _SCALARS for v in kw.values()):
            return self.fn[grid](*args, **kw)  # the recording would keep a tensor or object alive
        device = torch.cuda.current_device()
        try:
            key = (device, tuple(grid), tuple(map(_sig, args)), tuple((n, type(v), v) for n, v in kw.items()))
            entry = self.cache.get(key)
        except (_NoReplay, TypeError):  # an argument Triton treats otherwise, or unhashable
            return self.fn[grid](*args, **kw)
        if entry is not None:
            replay, tail = entry
            replay(*args, *tail)
            return None
        compiled = self.fn[grid](*args, **kw)
        rest = self.names[len(args) :]
        if compiled is not None and all(n in kw or n in self.defaults for n in rest):
            if len(self.cache) >= 256:
                self.cache.clear()
            tail = tuple(kw[n] if n in kw else self.defaults[n] for n in rest)
            self.cache[key] = (Replay(compiled, tuple(grid), device), tail)
        return compiled


# Keyword values a recording may keep (constexprs and launch options): no tensors, no objects.
_SCALARS = (int, bool, float, str, type(None), torch.dtype)


_REPLAY_JIT: dict[int, ReplayJIT] = {}


def replay_jit(fn) -> ReplayJIT:
    """The process's ``ReplayJIT`` for a JIT function (one cache per kernel); under Triton's
    interpreter (no compiled kernels) the function itself."""
    if not hasattr(fn, "params"):
        return fn
    r = _REPLAY_JIT.get(id(fn))
    if r is None or r.fn is not fn:
        r = _REPLAY_JIT[id(fn)] = ReplayJIT(fn)
    return r
