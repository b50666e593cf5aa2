"""Benchmark cases as data, one module per family (``attention``, ``moe``)."""
