"""Compile the Gluon attention forward for sm_90 on the CPU (Triton's bundled ptxas, no GPU).

Gluon has no interpreter, so CPU CI cannot run the kernel; compiling each default config
catches front-end, layout and ptxas errors and shared-memory overruns before the GPU machine
does. Runs in a subprocess (conftest sets ``TRITON_INTERPRET=1`` on CPU machines) with a
stand-in driver that reports an sm_90 target; ``warmup`` compiles without launching.
"""

from __future__ import annotations

import textwrap

import pytest
from _sm90 import SM90_DRIVER, ptxas_available, run_script

_SCRIPT = SM90_DRIVER + textwrap.dedent(
    """
    import sys
    import torch
    from flashmoe_science.ops.attention import launch_gluon
    from flashmoe_science.ops.attention.kernels import fwd_gluon

    d, causal = int(sys.argv[1]), sys.argv[2] == "causal"
    dtype = torch.float16 if sys.argv[3] == "fp16" else torch.bfloat16
    d_pad = launch_gluon.padded_head_dim(d)
    assert d_pad is not None, d
    q = torch.empty(2, 4, 1000, d, dtype=dtype)
    out, lse = torch.empty_like(q), torch.empty(2, 4, 1000)
    configs = [launch_gluon.default_config(d_pad, causal, s_q) for s_q in (1000, 16384)]
    configs += [tuple(int(x) for x in c.split(",")) for c in sys.argv[4:]]  # extra configs
    for config in configs:
        bm, bn, stages, pingpong, consumers, schedule = config
        maxnreg, regs = launch_gluon._REGS[consumers]
        smem, o_in_q = launch_gluon.smem_bytes(config, d_pad)
        k = fwd_gluon.attn_fwd_gluon_kernel.warmup(
            launch_gluon._descriptor(q, bm, d_pad), launch_gluon._descriptor(q, bn, d_pad),
            launch_gluon._descriptor(q, bn, d_pad), launch_gluon._descriptor(out, bm, d_pad), lse,
            lse.stride(0), lse.stride(1), 2, 4, 1, 1000, 1000, 0.1,
            HEAD_DIM=d_pad, BLOCK_M=bm, BLOCK_N=bn, NUM_STAGES=stages, NUM_CONSUMERS=consumers, CAUSAL=causal,
            PINGPONG=bool(pingpong), CONSUMER_REGS=regs, SNAKE=schedule == 2, O_IN_Q=o_in_q, num_warps=4,
            maxnreg=maxnreg, grid=(1,),
        )
        assert k.asm["cubin"], "no cubin"
        assert k.metadata.shared <= 227 * 1024, k.metadata.shared
        assert k.metadata.shared >= smem, (k.metadata.shared, smem)  # the launcher's estimate is a floor
        assert "st.local" not in k.asm["ptx"], "register spills in PTX"
    print("ok", k.metadata.shared)
    """
)


# (head dim, mask, dtype, extra configs as "BM,BN,stages,pingpong,consumers,schedule"). 80/96 run
# as 128 (padded inside the kernel); 256 stages its output in Q's buffer (O_IN_Q) at BLOCK_N 64,
# and the 256 extras cover a separate output buffer (BLOCK_N 32, 3 stages) and the other two
# schedules with O_IN_Q.
CASES = [
    (128, "full", "bf16", ()),
    (128, "causal", "fp16", ()),
    (64, "full", "fp16", ()),
    (64, "causal", "bf16", ()),
    (96, "causal", "bf16", ()),
    (80, "full", "fp16", ()),
    (256, "full", "bf16", ("64,32,3,0,2,0", "64,64,2,0,2,0")),
    (256, "causal", "fp16", ("64,64,2,0,2,1",)),
]


@pytest.mark.skipif(not ptxas_available(), reason="triton's ptxas is not installed")
@pytest.mark.parametrize("head_dim, mask, dtype, extra", CASES)
def test_gluon_attention_compiles_for_sm90(head_dim, mask, dtype, extra):
    res = run_script(_SCRIPT, str(head_dim), mask, dtype, *extra, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
