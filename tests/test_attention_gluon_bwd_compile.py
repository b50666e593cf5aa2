"""Compile the Gluon attention backward for sm_90 on the CPU (Triton's bundled ptxas, no GPU).

Gluon has no interpreter, so CPU CI cannot run the kernel; compiling every candidate config
(``launch_bwd_gluon.CANDIDATE_CONFIGS``) catches front-end, layout and ptxas errors,
shared-memory overruns and register spills before the GPU machine does. Runs in a subprocess
(conftest sets ``TRITON_INTERPRET=1`` on CPU machines) with a stand-in driver reporting an sm_90
target; ``warmup`` compiles without launching. ptxas's own ``-v`` report gives the spill bytes
(the PTX has no ``st.local``: ptxas spills after it); a config may spill at most 16 bytes
(ptxas's stack frame; the shipped Gluon forward has 12) unless ``launch_bwd_gluon.SPILL_BYTES``
gives it a measured allowance (D128's default: 116-124 bytes of loop-invariant scalars).
"""

from __future__ import annotations

import textwrap

import pytest
from _sm90 import SM90_DRIVER, ptxas_available, run_script

_SCRIPT = SM90_DRIVER + textwrap.dedent(
    """
    import os, re, subprocess, sys, tempfile
    import torch
    from _sm90 import ptxas_path
    from flashmoe_science.ops.attention import launch_bwd_gluon as L, launch_gluon
    from flashmoe_science.ops.attention.kernels import bwd_gluon

    d, causal = int(sys.argv[1]), sys.argv[2] == "causal"
    dtype = torch.float16 if sys.argv[3] == "fp16" else torch.bfloat16
    q = torch.empty(2, 4, 1000, d, dtype=dtype)
    kv = torch.empty(2, 2, 777, d, dtype=dtype)
    lse2 = torch.empty(2, 4, 1024)
    dq = torch.empty(2, 4, 1000, d)
    ptxas = ptxas_path()
    desc = launch_gluon._descriptor
    assert L.DEFAULT_CONFIG[d] in L.CANDIDATE_CONFIGS[d]
    # Each config with every ping-pong mode the launcher picks for it (MHA and GQA groups).
    runs = [(c, pp) for c in L.CANDIDATE_CONFIGS[d]
            for pp in (sorted({L.pingpong(causal, d, g) for g in (1, 2)}) if c[3] == 2 else [0])]
    for config, pingpong in runs:
        bm, bn, stages, consumers = config
        maxnreg, regs = L._REGS[consumers]
        k = bwd_gluon.attn_bwd_gluon_kernel.warmup(
            desc(q, bm), desc(q, bm), desc(kv, bn), desc(kv, bn), desc(kv, bn), desc(kv, bn),
            L._dq_descriptor(dq, bm, d // consumers), L._row_descriptor(lse2, bm),
            L._row_descriptor(lse2, bm),
            2, 2, 1000, 777, 0.1, 0.1, 3,
            HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, NUM_STAGES=stages, NUM_CONSUMERS=consumers, CAUSAL=causal,
            CONSUMER_REGS=regs, A_REGS=L.A_REGS[d], DQ_LAG=L.dq_lag(causal, d),
            PINGPONG=pingpong, num_warps=4, maxnreg=maxnreg,
            grid=(1,),
        )
        assert k.asm["cubin"], "no cubin"
        assert k.metadata.shared <= 227 * 1024, k.metadata.shared
        assert k.metadata.shared >= L.smem_bytes(config, d), (k.metadata.shared, L.smem_bytes(config, d))
        assert "st.local" not in k.asm["ptx"], "register spills in PTX"
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        os.unlink(f.name)
        regs_used = int(re.findall(r"Used (\\d+) registers", log)[-1])
        spill = int(re.findall(r"(\\d+) bytes spill stores", log)[-1])
        print("config", config, "pingpong", pingpong, "regs", regs_used, "spill", spill,
              "smem", k.metadata.shared)
        # At most a few words (ptxas's stack frame; the shipped Gluon forward has 12 B)
        # unless the config has a measured allowance (launch_bwd_gluon.SPILL_BYTES).
        assert spill <= L.SPILL_BYTES.get((d, config), 16), (config, spill, log[-800:])
    print("ok")
    """
)


CASES = [
    (128, "full", "bf16"),
    (128, "causal", "fp16"),
    (64, "full", "fp16"),
    (64, "causal", "bf16"),
]


@pytest.mark.skipif(not ptxas_available(), reason="triton's ptxas is not installed")
@pytest.mark.parametrize("head_dim, mask, dtype", CASES)
def test_gluon_attention_bwd_compiles_for_sm90(head_dim, mask, dtype):
    res = run_script(_SCRIPT, str(head_dim), mask, dtype, timeout=900)
    print(res.stdout)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
