"""Triton kernels for attention. Import only from ``launch`` / ``launch_bwd``: the kernels
know nothing of grids or configs, and ``TRITON_INTERPRET`` must be set before this imports."""
