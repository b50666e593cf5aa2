"""Implementations measured side by side, one module per family. Each module has ``IMPLS``
(stable names used in the results files) and ``build(impl, op, case, data) -> Built``."""
