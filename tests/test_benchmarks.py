"""The benchmark harness without a GPU: case tables, FLOP/byte formulas, the peers' math,
JSON schema writing, ratios and plotting. No timing assertions (CPU times mean nothing)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
import torch

# benchmarks/ is a top-level package beside src/ (not installed); pyproject's pytest
# pythonpath puts the repo root on sys.path.
import flashmoe_science
from benchmarks import harness
from benchmarks.__main__ import main as cli_main
from benchmarks.cases import attention as att
from benchmarks.cases import moe
from benchmarks.peers import moe as moe_peers

FAST = harness.TimingConfig(n_sets=2, rep_ms=0.0, min_reps=1, max_reps=1, max_iter_s=60.0, flush_l2=False)
CPU = torch.device("cpu")


# ---------------------------------------------------------------- case tables
def _keys(cases):
    return {(c.heads_q, c.heads_kv, c.seqlen_q, c.head_dim, c.causal) for c in cases}


def test_attention_issue3_table():
    cases = att.select_cases("attention_fwd", "issue3", quick=False)
    assert all(c.batch * c.seqlen_q == 16384 and c.seqlen_q == c.seqlen_k for c in cases)
    assert all(c.dtype == "bfloat16" for c in cases)
    keys = _keys(cases)
    for s in (2048, 4096, 8192, 16384):
        for causal in (False, True):
            assert (16, 16, s, 128, causal) in keys
    assert (32, 8, 4096, 128, True) in keys  # GQA 32:8, 4k causal
    assert {c.head_dim for c in cases} == {32, 64, 96, 128, 256}
    assert {512, 1024} <= {c.seqlen_q for c in cases}
    assert len(set(cases)) == len(cases)


def test_attention_issue4_and_quick_tables():
    bwd = _keys(att.select_cases("attention_bwd", "issue4", quick=False))
    for s in (2048, 4096, 8192, 16384):
        assert (16, 16, s, 128, True) in bwd and (16, 16, s, 128, False) in bwd
    assert (32, 8, 4096, 128, True) in bwd and 64 in {k[3] for k in bwd}
    quick = att.select_cases("attention_fwd", "issue3", quick=True)
    assert _keys(quick) == {(16, 16, s, 128, c) for s in (2048, 8192) for c in (False, True)} | {
        (32, 8, 4096, 128, True)
    }
    assert set(quick) <= set(att.select_cases("attention_fwd", "issue3", quick=False))
    with pytest.raises(ValueError, match="unknown attention suite"):
        att.select_cases("attention_fwd", "nope", quick=False)


def test_moe_issue5_table():
    pre = moe.select_cases("moe_fwd", "issue5", quick=False)
    got = {(c.shape, c.tokens, c.hidden, c.ffn, c.experts, c.top_k) for c in pre}
    assert got == {
        ("A", 4096, 4096, 14336, 8, 2),
        ("A", 16384, 4096, 14336, 8, 2),
        ("B", 4096, 2048, 768, 128, 8),
        ("B", 16384, 2048, 768, 128, 8),
        ("C", 8192, 2048, 1024, 256, 8),
    }
    dec = moe.select_cases("moe_decode", "issue5", quick=False)
    assert {(c.shape, c.tokens) for c in dec} == {(s, t) for s in "BC" for t in (1, 8, 64)}
    assert {(c.shape, c.tokens) for c in moe.select_cases("moe_fwd", "issue5", quick=True)} == {
        ("A", 4096),
        ("B", 4096),
        ("C", 8192),
    }
    quick_dec = moe.select_cases("moe_decode", "issue5", quick=True)
    assert {(c.shape, c.tokens) for c in quick_dec} == {(s, t) for s in "BC" for t in (1, 8, 64)}


# ---------------------------------------------------------------- formulas
def test_attention_flops_match_design_example():
    c = att.AttentionCase(2, 16, 16, 8192, 8192, 128, False)
    assert att.flops("attention_fwd", c) == 4 * 2 * 16 * 8192 * 8192 * 128
    # DESIGN.md's example row: 1.71 ms -> 643 TFLOP/s.
    assert harness.tflops(att.flops("attention_fwd", c), 1.71) == pytest.approx(643.0, abs=0.5)
    causal = att.AttentionCase(2, 16, 16, 8192, 8192, 128, True)
    assert att.flops("attention_fwd", causal) == att.flops("attention_fwd", c) / 2
    assert att.flops("attention_bwd", c) == 2.5 * att.flops("attention_fwd", c)
    assert att.flops("attention_fwd_bwd", c) == 3.5 * att.flops("attention_fwd", c)
    gqa = att.AttentionCase(4, 32, 8, 4096, 4096, 128, True)
    assert att.flops("attention_fwd", gqa) == 2 * 4 * 32 * 4096 * 4096 * 128  # heads_q counts
    assert att.nbytes("attention_fwd", c, None) is None


def test_moe_flops_and_bytes():
    a = moe.shape_case("A", 4096)
    assert moe.flops("moe_fwd", a) == 6 * 4096 * 2 * 4096 * 14336
    assert moe.flops("moe_fwd_bwd", a) == 3 * moe.flops("moe_fwd", a)
    # Issue 5's floor for A: 4.23 ms -> ~682 TFLOP/s.
    assert harness.tflops(moe.flops("moe_fwd", a), 4.23) == pytest.approx(682.3, abs=0.5)
    assert moe.expected_experts_touched(1, 128, 8) == pytest.approx(8.0)
    assert moe.expected_experts_touched(10**6, 128, 8) == pytest.approx(128.0)
    b1 = moe.shape_case("B", 1)
    per_expert = 3 * 2048 * 768 * 2
    assert moe.decode_bytes(b1, 8) == 8 * per_expert + 2 * 2048 * 2 + 4 * 128
    assert moe.nbytes("moe_decode", b1, None) == pytest.approx(moe.decode_bytes(b1, 8.0))
    assert moe.nbytes("moe_fwd", a, None) is None
    assert harness.gbps(3e9, 1.0) == pytest.approx(3000.0)


def test_sig_and_rel_err():
    assert harness.sig(643.0123, 4) == 643.0
    assert harness.sig(0.000123456, 3) == 0.000123
    r = torch.randn(8, 4)
    assert harness.rel_err((r,), (r,)) == 0.0
    assert math.isinf(harness.rel_err((torch.full_like(r, float("nan")),), (r,)))
    assert math.isinf(harness.rel_err((r[:4],), (r,)))
    assert math.isinf(harness.rel_err((r, r), (r,)))


def test_check_case_shrinks_only_when_the_oracle_cannot_fit():
    small = att.AttentionCase(1, 2, 2, 64, 64, 32, False)
    assert att.check_case("attention_fwd", small, CPU) == small
    huge = att.AttentionCase(1, 16, 16, 65536, 65536, 128, True)
    shrunk = att.check_case("attention_bwd", huge, CPU)
    assert shrunk.seqlen_q < huge.seqlen_q and shrunk.head_dim == 128 and shrunk.causal
    assert moe.check_case("moe_fwd", moe.shape_case("B", 16384), CPU).tokens == moe.CHECK_MAX_TOKENS


# ---------------------------------------------------------------- peers' math (float32, CPU)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_peers_match_the_reference(top_k):
    from flashmoe_science.ops.moe.reference import fused_experts_ref, route_ref

    t, h, f, e = 29, 32, 16, 6  # odd T; some experts get no token at small T
    x = torch.randn(t, h)
    w13 = torch.randn(e, 2 * f, h) / h**0.5
    w2 = torch.randn(e, h, f) / f**0.5
    logits = torch.randn(t, e)
    ref = fused_experts_ref(x, w13, w2, *route_ref(logits, top_k))
    for fn in (moe_peers.loop_moe, moe_peers.grouped_mm_moe):
        torch.testing.assert_close(fn(x, logits, w13, w2, top_k), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- JSON end to end (CPU)
def _run(tmp_path, family, ops, impls):
    out = harness.new_results_path(tmp_path / f"{family}.json", family)
    doc = harness.run(
        family,
        ops,
        "smoke",
        impls,
        quick=True,
        device=CPU,
        cfg=FAST,
        out_path=out,
        command=f"python -m benchmarks {family} --suite smoke --quick",
        log=io.StringIO(),
    )
    return out, doc


def test_attention_run_writes_the_schema(tmp_path):
    out, doc = _run(tmp_path, "attention", ["attention_fwd_bwd"], ["flashmoe", "reference", "sdpa_cudnn"])
    on_disk = json.loads(out.read_text())
    assert on_disk == doc
    assert harness.validate_results(on_disk) == []
    assert list(on_disk["meta"]) == list(harness.META_KEYS + harness.OPTIONAL_META_KEYS)
    assert on_disk["meta"]["device"].startswith("cpu")
    rows = {(r["op"], r["impl"]): r for r in on_disk["rows"]}
    assert rows[("attention_fwd_bwd", "flashmoe")]["status"] == "unavailable"  # CUDA only
    assert rows[("attention_fwd_bwd", "sdpa_cudnn")]["status"] == "unsupported"  # no cuDNN on CPU
    ref = rows[("attention_fwd_bwd", "reference")]
    assert ref["status"] == "ok" and ref["ms"] > 0 and ref["tflops"] > 0
    assert ref["check_rel_err"] < harness.CHECK_TOL["bfloat16"]
    assert set(ref["case"]) == set(harness.ATTENTION_CASE_KEYS)


def test_moe_run_writes_ratios_and_never_overwrites(tmp_path):
    out, doc = _run(tmp_path, "moe", ["moe_fwd", "moe_decode"], ["grouped_mm", "dense_floor", "flashmoe"])
    assert harness.validate_results(doc) == []
    fwd = {r["impl"]: r for r in doc["rows"] if r["op"] == "moe_fwd"}
    assert fwd["grouped_mm"]["status"] == "ok"
    assert fwd["dense_floor"]["frac_of_floor"] == 1.0 and fwd["dense_floor"]["check_rel_err"] is None
    assert fwd["grouped_mm"]["frac_of_floor"] > 0
    dec = {r["impl"]: r for r in doc["rows"] if r["op"] == "moe_decode"}
    assert dec["grouped_mm"]["gbps"] > 0 and dec["dense_floor"]["status"] == "unsupported"
    again = harness.new_results_path(out, "moe")
    assert again != out and not again.exists()


def test_validate_results_finds_problems():
    row = {"op": "moe_fwd", "impl": "loop", "case": {}, "ms": None, "tflops": None, "status": "ok"}
    problems = harness.validate_results({"meta": {"device": "x"}, "rows": [row]})
    text = " ".join(problems)
    assert "meta must have the keys" in text and "case must carry" in text and "ms > 0" in text
    assert harness.validate_results({"rows": []}) != []
    meta = dict.fromkeys(harness.META_KEYS + ("unknown",), "x")
    assert "meta must have the keys" in " ".join(harness.validate_results({"meta": meta, "rows": []}))


def test_add_ratios():
    rows = [
        {"impl": "flashmoe", "status": "ok", "ms": 2.0},
        {"impl": "grouped_mm", "status": "ok", "ms": 4.0},
        {"impl": "dense_floor", "status": "ok", "ms": 1.0},
        {"impl": "loop", "status": "skipped", "ms": None},
    ]
    harness.add_ratios(rows, "dense_floor")
    assert rows[0]["speedup"] == {"grouped_mm": 2.0, "dense_floor": 0.5}
    assert rows[0]["frac_of_floor"] == 0.5 and rows[1]["frac_of_floor"] == 0.25
    assert "frac_of_floor" not in rows[3] and "speedup" not in rows[1]


# ---------------------------------------------------------------- plots from JSON only
def _synthetic_doc():
    meta = dict.fromkeys(harness.META_KEYS, "x")
    rows = []
    for s in (2048, 4096, 8192):
        for causal in (False, True):
            case = att.case_dict(att.tokens_case(s, causal=causal))
            for impl, tf in (("sdpa_cudnn", 600.0), ("sdpa_flash", 340.0)):
                rows.append(
                    {
                        "op": "attention_fwd",
                        "impl": impl,
                        "case": case,
                        "ms": 1.0,
                        "tflops": tf,
                        "status": "ok",
                    }
                )
            rows.append(
                {"op": "attention_fwd", "impl": "flashmoe", "case": case, "ms": None, "tflops": None}
                | {"status": "unavailable"}
            )
    for shape, t in (("A", 4096), ("B", 4096)):
        case = moe.case_dict(moe.shape_case(shape, t))
        for impl, ms in (("grouped_mm", 5.6), ("dense_floor", 4.2), ("loop", 5.9)):
            rows.append(
                {"op": "moe_fwd", "impl": impl, "case": case, "ms": ms, "tflops": 500.0, "status": "ok"}
                | {"frac_of_floor": 4.2 / ms}
            )
    dcase = moe.case_dict(moe.shape_case("B", 8))
    rows.append(
        {"op": "moe_decode", "impl": "grouped_mm", "case": dcase, "ms": 0.1, "tflops": 1.0, "gbps": 900.0}
        | {"status": "ok"}
    )
    return {"meta": meta, "rows": rows}


def test_plot_from_synthetic_json(tmp_path):
    doc = _synthetic_doc()
    assert harness.validate_results(doc) == []
    src = tmp_path / "r.json"
    src.write_text(json.dumps(doc))
    png = tmp_path / "r.png"
    assert cli_main(["plot", str(src), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a results document"):
        cli_main(["plot", str(bad), "--out", str(tmp_path / "bad.png")])


def test_cli_list(capsys):
    assert cli_main(["list", "moe"]) == 0
    out = capsys.readouterr().out
    assert "issue5" in out and "moe_decode" in out


@pytest.mark.parametrize(
    "kind,results",
    [
        ("attn_short", "attn_short-h200-20261126.json"),
        ("science", "science_throughput-h200-20261126.json"),
        ("hf", "hf_throughput_qwen3_moe_h200_20261126b.json"),
    ],
)
def test_plot_throughput_from_committed_results(kind, results, tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot_throughput

    root = Path(__file__).resolve().parents[1]
    out = plot_throughput.plot(kind, root / "benchmarks" / "results" / results, tmp_path / f"{kind}.png")
    assert out.stat().st_size > 10_000


def test_rounds_take_the_median_and_rotate_the_order(tmp_path, monkeypatch):
    """``rounds=3``: each impl timed three times, impl order rotated, the row's ms the median."""
    seen, fake_ms = [], iter([5.0, 1.0, 3.0, 2.0, 9.0, 4.0])
    real = harness.run_impl

    def fake_run_impl(family, impl, *a, **kw):
        seen.append(impl)
        row = real(family, impl, *a, **kw)
        if row["status"] == "ok":
            row["ms"] = next(fake_ms)
        return row

    monkeypatch.setattr(harness, "run_impl", fake_run_impl)
    family = harness.get_family("moe")
    case = family.cases.select_cases("moe_fwd", "smoke", True)[0]
    cfg = dataclasses.replace(harness.QUICK_TIMING, rep_ms=1.0, max_reps=2, rounds=3)
    rows = harness.run_case(family, "moe_fwd", case, ["flashmoe", "grouped_mm"], torch.device("cpu"), cfg)
    assert seen == ["grouped_mm", "flashmoe", "flashmoe", "grouped_mm", "grouped_mm", "flashmoe"]
    by = {r["impl"]: r for r in rows}
    assert by["flashmoe"]["status"] == "unavailable"  # CUDA only: no ms consumed
    assert by["grouped_mm"]["ms_rounds"] == [5.0, 1.0, 3.0] and by["grouped_mm"]["ms"] == 3.0
    assert by["grouped_mm"]["tflops"] == harness.sig(harness.tflops(family.cases.flops("moe_fwd", case), 3.0))


def test_source_digest_identifies_the_code(tmp_path):
    """The results' source_digest changes with any byte or path of src/ and benchmarks/ sources
    (it identifies the code where git cannot), and not with other files."""
    for d in ("src/pkg", "benchmarks"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "src/pkg/a.py").write_text("x = 1\n")
    (tmp_path / "benchmarks/b.py").write_text("y = 2\n")
    first = harness.source_digest(tmp_path)
    assert first == harness.source_digest(tmp_path) and len(first) == 16
    (tmp_path / "README.md").write_text("not code")
    assert harness.source_digest(tmp_path) == first
    (tmp_path / "src/pkg/a.py").write_text("x = 2\n")
    assert harness.source_digest(tmp_path) != first
    (tmp_path / "src/pkg/a.py").write_text("x = 1\n")
    (tmp_path / "src/pkg/a.py").rename(tmp_path / "src/pkg/c.py")
    assert harness.source_digest(tmp_path) != first


def test_source_digest_hashes_the_library_given(tmp_path):
    """With the library elsewhere (imported through PYTHONPATH, e.g. an archived older tree, or
    installed), the digest is that package's: equal to a checkout holding the same files."""
    for d in ("a/src/pkg", "a/benchmarks", "other/pkg", "other/unrelated"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "a/src/pkg/m.py").write_text("x = 1\n")
    (tmp_path / "a/benchmarks/b.py").write_text("y = 2\n")
    (tmp_path / "other/pkg/m.py").write_text("x = 0\n")
    (tmp_path / "other/unrelated/z.py").write_text("not part of the package\n")
    own = harness.source_digest(tmp_path / "a")
    assert harness.source_digest(tmp_path / "a", package=tmp_path / "other/pkg") != own
    (tmp_path / "other/pkg/m.py").write_text("x = 1\n")
    assert harness.source_digest(tmp_path / "a", package=tmp_path / "other/pkg") == own


def _old_source_digest(base: Path) -> str:
    """The digest as results recorded it before it followed the imported package."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(
        p for d in ("src", "benchmarks") for p in (base / d).rglob("*.py") if "__pycache__" not in p.parts
    )
    for f in files:
        h.update(f.relative_to(base).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def test_source_digest_unchanged_on_a_checkout(tmp_path):
    """Digests recorded before stay reproducible: on this checkout (the imported package is
    its src/flashmoe_science) and on a tree whose names sort differently as strings and as paths."""
    root = Path(harness.__file__).resolve().parent.parent
    if Path(flashmoe_science.__file__).resolve().parent == root / "src" / "flashmoe_science":
        assert harness.source_digest() == _old_source_digest(root)
    for d in ("src/pkg/ops/moe", "benchmarks"):
        (tmp_path / d).mkdir(parents=True)
    for f in ("src/pkg/ops/moe/a.py", "src/pkg/ops/moe.py", "src/pkg/ops/moe-x.py", "benchmarks/b.py"):
        (tmp_path / f).write_text(f"# {f}\n")
    assert harness.source_digest(tmp_path) == _old_source_digest(tmp_path)
