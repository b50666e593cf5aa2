"""What compute-sanitizer's racecheck reports for Triton 3.6 Gluon warp specialisation itself.

    PYTHONPATH=src compute-sanitizer --tool racecheck python3 -m benchmarks.racecheck_ws_repro
    PYTHONPATH=src python3 -m benchmarks.racecheck_ws_repro sass   # CPU: SASS of the kernels (sm_90)

The attention kernels' racecheck reports (one hazard per launch, between a shared-memory read at
the kernel's first instructions and a write attributed to the ``gl.warp_specialize`` line) are
reproduced here by kernels with no shared memory of their own. Every kernel below has a default
partition (4 warps) and one 1-warp worker, each storing its own range of ``out``:

* ``ws``: nothing else;
* ``bar0`` / ``bar3``: the default partition also passes a named barrier over its own 128 threads
  (``bar.sync 0, 128`` / ``bar.sync 3, 128``, inline PTX), as Gluon emits before a warpgroup's
  mbarrier arrive;
* ``mbar``: mbarriers initialised in the body before ``warp_specialize``, a worker arrives and
  the default partition waits (the pattern of the attention Gluon kernels).

On an H100 (compute-sanitizer 2025.3.1, 2026-11-26, two runs of these kernels or equivalent
ones): ``ws`` 0 hazards in both; ``bar3`` and ``mbar`` one reported race each in both; ``bar0``
one in the first run, none in the second. The race is always between the worker warps' read of
Triton's partition-state byte (``LDS.U8`` after the dispatch's ``BAR.SYNC 1``) and the default
warps' write of the exit state at the end (``STS`` before the final ``BAR.SYNC 1``). In the SASS
(``sass`` mode) every such read and write is separated by CTA-wide ``BAR.SYNC 1`` (all threads),
so the pair is ordered; the only change between ``ws`` and ``bar3`` is a barrier over a subset
of the threads with a different id. Prints ``racecheck_ws_repro <kernel>: outputs written <bool>``.
"""

from __future__ import annotations

import os
import sys

SASS = len(sys.argv) > 1 and sys.argv[1] == "sass"
if SASS:  # compile for sm_90 without a GPU
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from _sm90 import SM90_DRIVER

    exec(SM90_DRIVER)

import torch  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import mbarrier  # noqa: E402


@gluon.jit
def _store(out, base, NW: gl.constexpr):
    offs = gl.arange(0, 32 * NW, layout=gl.BlockedLayout([1], [32], [NW], [0]))
    gl.store(out + base + offs, offs.to(gl.float32) + 1.0)


@gluon.jit
def _default(out):
    _store(out, 0, 4)


@gluon.jit
def _worker(out):
    _store(out, 128, 1)


@gluon.jit
def ws_kernel(out):
    gl.warp_specialize([(_default, (out,)), (_worker, (out,))], [1], [24])


@gluon.jit
def _default_bar(out, BAR_ID: gl.constexpr):
    offs = gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [4], [0]))
    offs = gl.inline_asm_elementwise(
        "bar.sync " + BAR_ID + ", 128;\n mov.b32 $0, $1;",
        "=r,r",
        [offs],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )
    gl.store(out + offs, offs.to(gl.float32) + 1.0)


@gluon.jit
def bar0_kernel(out):
    gl.warp_specialize([(_default_bar, (out, "0")), (_worker, (out,))], [1], [24])


@gluon.jit
def bar3_kernel(out):
    gl.warp_specialize([(_default_bar, (out, "3")), (_worker, (out,))], [1], [24])


@gluon.jit
def _default_wait(out, bar):
    mbarrier.wait(bar.index(0), 0)
    _store(out, 0, 4)


@gluon.jit
def _worker_arrive(out, bar):
    _store(out, 128, 1)
    mbarrier.arrive(bar.index(0), count=1)


@gluon.jit
def mbar_kernel(out):
    bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bar.index(0), count=1)
    gl.warp_specialize([(_default_wait, (out, bar)), (_worker_arrive, (out, bar))], [1], [24])


KERNELS = {"ws": ws_kernel, "bar0": bar0_kernel, "bar3": bar3_kernel, "mbar": mbar_kernel}


def main() -> None:
    if SASS:
        import subprocess
        import tempfile

        import triton

        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        for name, kernel in KERNELS.items():
            compiled = kernel.warmup(torch.empty(160, dtype=torch.float32), grid=(1,), num_warps=4)
            path = os.path.join(tempfile.mkdtemp(), f"{name}.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            print(subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout)
        return
    out = torch.empty(160, device="cuda")
    for name, kernel in KERNELS.items():
        out.zero_()
        kernel[(1,)](out, num_warps=4)
        torch.cuda.synchronize()
        print(f"racecheck_ws_repro {name}: outputs written {bool((out != 0).all())}", flush=True)


if __name__ == "__main__":
    main()
