"""Compile kernels for sm_90 on a machine without a GPU (Triton's bundled ptxas), in a subprocess.

Shared by the sm_90 compile tests. The subprocess is needed because conftest sets
``TRITON_INTERPRET=1`` on CPU machines, under which ``@triton.jit`` makes interpreter objects
that cannot be compiled; scripts that compile through ``JITFunction.warmup`` start with
``SM90_DRIVER``, a stand-in driver that reports an sm_90 target.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import triton

_TESTS = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(_TESTS), "src")

SM90_DRIVER = textwrap.dedent(
    """
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class Sm90:  # enough of a driver for JITFunction.warmup to compile
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(Sm90())
    """
)


def ptxas_path() -> str:
    """Triton's bundled ptxas, else whichever ``ptxas`` is on PATH."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else "ptxas"


def ptxas_available() -> bool:
    return os.path.exists(ptxas_path()) or shutil.which("ptxas") is not None


def run_script(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -c script args`` without ``TRITON_INTERPRET``, importing this checkout's sources
    (not whichever copy the environment installed, e.g. from a git worktree) and the test
    helpers (``_sm90``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, _TESTS, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
