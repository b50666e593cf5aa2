"""FlashMoE-Science benchmarks: one harness, cases as data, peers measured side by side.

``python -m benchmarks {attention,moe} --op OP --suite NAME`` times the implementations of
one family on one GPU, checks each against a float32 reference first, and writes a JSON
file under ``benchmarks/results/`` (schema: DESIGN.md "Performance contract", documented in
``docs/benchmarks.md``). ``python -m benchmarks plot RESULTS.json --out PNG`` draws it.
"""
