"""Triton kernels of the fused MoE (imported lazily by ``launch``, after TRITON_INTERPRET is set)."""
