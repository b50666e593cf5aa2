"""Compile kernels (short attention, LayerNorm) for sm_90 on the CPU (Triton's bundled ptxas, no GPU needed).

The interpreter accepts code the compiler rejects (e.g. a non-constexpr global read inside a
kernel); compiling here catches that class of error in CI instead of on the GPU machine.
It runs in a subprocess: under ``TRITON_INTERPRET=1`` (set by conftest on CPU machines)
``@triton.jit`` makes interpreter objects, which cannot be compiled.
"""

from __future__ import annotations

import textwrap

import pytest
from _sm90 import ptxas_available, run_script

_SCRIPT = textwrap.dedent(
    """
    import sys
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as tcompile
    from flashmoe_science.ops.attention.kernels import short
    from flashmoe_science.ops.norm import kernels as norm

    def build(fn, const, ptrs, warps):
        sig = {}
        for name in fn.arg_names:
            if name in const:
                sig[name] = "constexpr"
            elif name in ptrs:
                sig[name] = ptrs[name]
            else:
                sig[name] = "fp32" if ("scale" in name or name == "eps") else "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs=const)
        return tcompile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})

    d = int(sys.argv[1])
    const = dict(GROUP=2, HEAD_DIM=d, D_PAD=d, BLOCK_M=64, BLOCK_N=128, CAUSAL=True, UPCAST=False)
    ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", SEG="*i32")
    kernels = [build(short.short_fwd_kernel, const, ptrs, 4)]
    ptrs.update(DO="*bf16", DQ="*bf16", DK="*bf16", DV="*bf16")
    kernels.append(build(short.short_bwd_kernel, const, ptrs, 8))
    ln = dict(X="*bf16", W="*bf16", B="*bf16", Y="*bf16")
    kernels.append(build(norm.layer_norm_fwd_kernel, dict(HAS_BIAS=True, BLOCK_M=32, BLOCK_N=d), ln, 4))
    for k in kernels:
        assert k.asm["cubin"], "no cubin"
        assert k.metadata.shared <= 227 * 1024, k.metadata.shared
    print("ok", [k.metadata.shared for k in kernels])
    """
)


@pytest.mark.skipif(not ptxas_available(), reason="triton's ptxas is not installed")
@pytest.mark.parametrize("head_dim", [32, 128])
def test_kernels_compile_for_sm90(head_dim):
    res = run_script(_SCRIPT, str(head_dim), timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
