"""The benchmark harness: check each implementation once, time it, write JSON.

One harness for every family (``attention``, ``moe``). A family is two modules:

* ``benchmarks.cases.<family>``: the cases as data and everything that needs no peer —
  ``OPS``, ``SUITES``, ``DEFAULT_SUITE``, ``select_cases(op, suite, quick)``,
  ``case_dict``, ``label``, ``flops(op, case)``, ``nbytes(op, case, data)``,
  ``make_data(op, case, n_sets, device, shared)``, ``check_case(op, case, device)``,
  ``reference_outputs(op, case, data)`` (the float32 oracle), ``FLOOR_IMPL``.
* ``benchmarks.peers.<family>``: ``IMPLS`` and ``build(impl, op, case, data) -> Built``.

For every (op, case) the harness makes ``n_sets`` input sets (rotated through during
timing so L2 never holds them), computes the float32 reference once (on the case or on a
smaller case of the same kind when the reference would not fit), and for each impl:
builds it, checks it against the reference (a failing impl is recorded, not timed), runs
one iteration to pay compilation / autotuning, times one more iteration (an impl slower
than ``max_iter_s`` is skipped), then times it with CUDA events (L2 flushed before every
repetition, median of the repetitions) — the same method as ``triton.testing.do_bench``,
with the input rotation added. On CPU (tests) ``time.perf_counter`` stands in.

Rows follow DESIGN.md's "Performance contract"; see ``docs/benchmarks.md`` for the fields.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import hashlib
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("attention", "moe")
ALL_OPS = (
    "attention_fwd",
    "attention_bwd",
    "attention_fwd_bwd",
    "moe_fwd",
    "moe_fwd_bwd",
    "moe_decode",
    "moe_ep_fwd",  # expert parallelism (benchmarks/ep_bench.py)
    "moe_ep_fwd_bwd",
)
MAIN_IMPL = "flashmoe"
META_KEYS = ("device", "torch", "triton", "cudnn", "date", "command", "git_sha")
# Written by this harness since 2026-11-26; files from before lack it.
OPTIONAL_META_KEYS = ("source_digest",)
ROW_REQUIRED = ("op", "impl", "case", "ms", "status")
# ok: timed. failed: raised or did not match the reference (not timed). unsupported: the
# impl does not handle this case (reason in note). unavailable: the impl cannot run here at
# all (e.g. kernels not built yet, no CUDA). skipped: a harness rule (too slow, too big).
STATUSES = ("ok", "failed", "unsupported", "unavailable", "skipped")
ATTENTION_CASE_KEYS = ("batch", "heads_q", "heads_kv", "seqlen_q", "seqlen_k", "head_dim", "causal", "dtype")
MOE_CASE_KEYS = ("tokens", "hidden", "ffn", "experts", "top_k", "dtype")
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Sanity gate against the float32 reference (relative L2 error of every output). Not the
# DESIGN.md test rule (the test suites apply that); it catches wrong masks, wrong routing,
# unwritten outputs. bf16 rounding of the output alone is ~2e-3.
CHECK_TOL = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 2e-3, "float64": 1e-6}


class Unsupported(Exception):
    """The impl does not handle this case; the message says why."""


class Unavailable(Exception):
    """The impl cannot run in this environment at all; the message says why."""


@dataclass
class Built:
    """A ready-to-time implementation: ``fn(i)`` runs on input set ``i`` and returns a tuple
    of tensors comparable with the family's ``reference_outputs``."""

    fn: Callable[[int], Any]
    note: str | None = None
    check: bool = True  # False only for floors that do not compute the op (dense_floor)


@dataclass
class Data:
    """Inputs of one case: ``shared`` tensors (e.g. expert weights) and ``sets`` of
    per-iteration inputs that the timing loop rotates through."""

    shared: dict[str, Any] = field(default_factory=dict)
    sets: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class TimingConfig:
    n_sets: int = 3  # input sets rotated through (with the L2 flush, none stays cached)
    rep_ms: float = 100.0  # target time of the timed repetitions
    min_reps: int = 5
    max_reps: int = 200
    max_iter_s: float = 1.0  # an impl slower than this per iteration is skipped, not timed
    flush_l2: bool = True
    # Each case is timed this many times, the impls' order rotated between rounds, and each
    # impl reports the median of its rounds: an H100 at its 700 W cap moves its clocks by
    # 10-20% within seconds, which favours whichever impl happens to run cool.
    rounds: int = 1


QUICK_TIMING = TimingConfig(rep_ms=40.0, max_reps=100)


@dataclass(frozen=True)
class Family:
    name: str
    cases: Any  # module benchmarks.cases.<name>
    peers: Any  # module benchmarks.peers.<name>


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {name!r}")
    return Family(
        name=name,
        cases=importlib.import_module(f"benchmarks.cases.{name}"),
        peers=importlib.import_module(f"benchmarks.peers.{name}"),
    )


def op_kind(op: str) -> str:
    """``fwd``, ``bwd`` (backward only, graph built outside the timed region) or ``fwd_bwd``."""
    if op.endswith("_fwd_bwd"):
        return "fwd_bwd"
    if op.endswith("_bwd"):
        return "bwd"
    return "fwd"  # *_fwd and moe_decode


# ---------------------------------------------------------------- numbers
def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (JSON stays readable at any scale)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def rel_err(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """Largest relative L2 error over the outputs (inf when shapes differ or NaN appears)."""
    if len(outs) != len(refs):
        return math.inf
    worst = 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            return math.inf
        o64, r64 = o.detach().double(), r.detach().double()
        if not bool(torch.isfinite(o64).all()):
            return math.inf
        denom = r64.norm().item()
        num = (o64 - r64).norm().item()
        worst = max(worst, num / denom if denom > 0 else num)
    return worst


# ---------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _l2_flush_buffer(device: torch.device) -> torch.Tensor | None:
    if device.type != "cuda":
        return None
    # 256 MB, as triton.testing.do_bench: larger than the L2 of any current GPU.
    return torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)


def time_one_iteration(fn: Callable[[int], Any], device: torch.device) -> float:
    """Seconds for one call of ``fn(0)`` (wall clock around a synchronised call)."""
    _sync(device)
    t0 = time.perf_counter()
    fn(0)
    _sync(device)
    return time.perf_counter() - t0


def measure(fn: Callable[[int], Any], device: torch.device, cfg: TimingConfig) -> tuple[float, int]:
    """Median milliseconds of ``fn(i % n_sets)`` over repetitions; returns (ms, reps).

    Warm-up first (one call per input set), so compilation and autotuning never fall in
    the timed region; then a short estimate sizes the number of repetitions to ``rep_ms``.
    """
    n_sets = max(1, cfg.n_sets)
    for i in range(n_sets):
        fn(i)
    _sync(device)
    flush = _l2_flush_buffer(device) if cfg.flush_l2 else None
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(3):
            fn(i % n_sets)
        end.record()
        torch.cuda.synchronize(device)
        est = max(start.elapsed_time(end) / 3, 1e-3)
    else:
        t0 = time.perf_counter()
        fn(0)
        est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    reps = int(min(cfg.max_reps, max(cfg.min_reps, cfg.rep_ms / est)))
    times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for r in range(reps):
            if flush is not None:
                flush.zero_()
            starts[r].record()
            fn(r % n_sets)
            ends[r].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for r in range(reps):
            t0 = time.perf_counter()
            fn(r % n_sets)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    mid = len(times) // 2
    median = times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])
    return median, reps


# ---------------------------------------------------------------- metadata and files
def git_sha() -> str | None:
    """HEAD of the repository (``+dirty`` when src/ or benchmarks/ have uncommitted changes);
    ``FLASHMOE_GIT_SHA`` wins (copies of the tree without .git, e.g. the GPU machine)."""
    env = os.environ.get("FLASHMOE_GIT_SHA")
    if env:
        return env
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "benchmarks"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def source_digest(root: str | os.PathLike | None = None, package: str | os.PathLike | None = None) -> str:
    """sha256 (first 16 hex digits) over the library and benchmark sources (relative path and
    bytes of every ``src/flashmoe_science/**/*.py`` and ``benchmarks/**/*.py``, in path order).
    It identifies the code a result came from where ``git_sha`` cannot: a copy of the tree whose
    ``.git`` is stale or missing (the GPU machine). Recompute it on a checkout to see whether
    that commit ran.

    ``root``: a tree with ``src/<package>/`` and ``benchmarks/`` (every package under ``src/``
    is hashed). By default the benchmarks are this package's and the library is the
    ``flashmoe_science`` that Python imported, hashed under its ``src/flashmoe_science/`` name
    wherever it lives: a run that imports the library from elsewhere through ``PYTHONPATH`` (or
    an installed copy) records that code, not the checkout's. ``package``: a package directory
    to hash instead."""
    if root is not None:
        base = Path(root)
        pkgs = (
            [Path(package)]
            if package is not None
            else [d for d in sorted((base / "src").iterdir()) if d.is_dir()]
        )
    else:
        base = Path(__file__).resolve().parent.parent
        if package is None:
            try:
                import flashmoe_science

                package = Path(flashmoe_science.__file__).resolve().parent
            except ImportError:  # a tree that does not import: hash the checkout's sources
                package = base / "src" / "flashmoe_science"
        pkgs = [Path(package)]
    named = [(f"src/{p.name}/{f.relative_to(p).as_posix()}", f) for p in pkgs for f in p.rglob("*.py")]
    named += [(f.relative_to(base).as_posix(), f) for f in (base / "benchmarks").rglob("*.py")]
    h = hashlib.sha256()
    # path order part by part (as pathlib sorts), so that "a/b.py" comes before "a.py"
    for name, f in sorted(
        (n for n in named if "__pycache__" not in n[1].parts), key=lambda n: Path(n[0]).parts
    ):
        h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def collect_meta(command: str, device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cudnn": cudnn,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "command": command,
        "git_sha": git_sha(),
        "source_digest": source_digest(),
    }


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def new_results_path(out: str | os.PathLike | None, stem: str) -> Path:
    """A path that does not exist yet: ``out`` if given and free, else ``out`` with a
    timestamp added; without ``out``, ``benchmarks/results/<stem>-<timestamp>.json``.
    A re-run never overwrites an earlier results file."""
    if out is None:
        path = RESULTS_DIR / f"{stem}-{timestamp()}.json"
    else:
        path = Path(out)
        if path.exists():
            path = path.with_name(f"{path.stem}-{timestamp()}{path.suffix or '.json'}")
    n = 1
    base = path
    while path.exists():
        path = base.with_name(f"{base.stem}-{n}{base.suffix}")
        n += 1
    return path


def write_results(path: Path, doc: dict[str, Any]) -> None:
    """Write atomically (a run rewrites its own file after every case, so a run that is
    cut short still leaves valid JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def validate_results(doc: Any) -> list[str]:
    """Problems with a results document (empty list: it follows the schema)."""
    problems: list[str] = []
    if not isinstance(doc, dict) or set(doc) != {"meta", "rows"}:
        return ["top level must be an object with exactly the keys 'meta' and 'rows'"]
    meta = doc["meta"]
    if not isinstance(meta, dict) or not set(META_KEYS) <= set(meta) <= set(META_KEYS + OPTIONAL_META_KEYS):
        got = sorted(meta) if isinstance(meta, dict) else meta
        problems.append(f"meta must have the keys {META_KEYS} (optionally {OPTIONAL_META_KEYS}), got {got}")
    if not isinstance(doc["rows"], list):
        return problems + ["rows must be a list"]
    for n, row in enumerate(doc["rows"]):
        where = f"row {n}"
        if not isinstance(row, dict):
            problems.append(f"{where}: not an object")
            continue
        missing = [k for k in ROW_REQUIRED if k not in row]
        if missing:
            problems.append(f"{where}: missing {missing}")
            continue
        if "tflops" not in row and "gbps" not in row:
            problems.append(f"{where}: needs 'tflops' or 'gbps'")
        if row["op"] not in ALL_OPS:
            problems.append(f"{where}: unknown op {row['op']!r}")
        if row["status"] not in STATUSES:
            problems.append(f"{where}: unknown status {row['status']!r}")
        case = row["case"]
        keys = ATTENTION_CASE_KEYS if str(row["op"]).startswith("attention") else MOE_CASE_KEYS
        if not isinstance(case, dict) or any(k not in case for k in keys):
            problems.append(f"{where}: case must carry {keys}")
        ms = row["ms"]
        if row["status"] == "ok":
            if not isinstance(ms, (int, float)) or not ms > 0:
                problems.append(f"{where}: status ok needs ms > 0, got {ms!r}")
        elif ms is not None:
            problems.append(f"{where}: status {row['status']} must have ms null")
    return problems


# ---------------------------------------------------------------- running
def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _case_seed(op: str, label: str) -> int:
    # Stable across runs and processes (str hash is salted).
    return sum((i + 1) * ord(c) for i, c in enumerate(f"{op}|{label}")) % (2**31)


def run_impl(
    family: Family,
    impl: str,
    op: str,
    case: Any,
    data: Data,
    check_case: Any,
    check_data: Data,
    ref: tuple | None,
    ref_error: str | None,
    device: torch.device,
    cfg: TimingConfig,
) -> dict[str, Any]:
    """One row: check, then time (or the reason it was not timed)."""
    cases = family.cases
    row: dict[str, Any] = {
        "op": op,
        "impl": impl,
        "case": cases.case_dict(case),
        "ms": None,
        "tflops": None,
    }
    nbytes_known = cases.nbytes(op, case, data) is not None
    if nbytes_known:
        row["gbps"] = None
    row.update(status="ok", note=None, check_rel_err=None)
    built = built_check = None
    try:
        built_check = family.peers.build(impl, op, check_case, check_data)
        if built_check.check:
            if ref is None:  # never time what could not be checked
                row.update(status="skipped", note=f"not checked: the float32 reference failed ({ref_error})")
                return row
            outs = built_check.fn(0)
            err = rel_err(outs, ref)
            row["check_rel_err"] = sig(err, 3) if math.isfinite(err) else None
            tol = CHECK_TOL.get(case.dtype, 2e-2)
            if not err <= tol:
                row["status"] = "failed"
                row["note"] = f"check vs float32 reference failed: rel L2 error {err:.3g} > {tol:g}" + (
                    "" if check_case == case else f" (checked on {cases.label(check_case)})"
                )
                return row
            del outs
        if check_case == case:
            built = built_check
        else:
            built_check = None
            _free(device)
            built = family.peers.build(impl, op, case, data)
        notes = [n for n in (built.note,) if n]
        if not built.check:
            notes.append("not checked (does not compute the op)")
        elif check_case != case:
            notes.append(f"checked on {cases.label(check_case)}")
        built.fn(0)  # compilation / autotuning happen here, outside any timed region
        one = time_one_iteration(built.fn, device)
        if one > cfg.max_iter_s:
            row["status"] = "skipped"
            notes.append(f"one iteration took {one:.2f} s > {cfg.max_iter_s:g} s")
            row["note"] = "; ".join(notes)
            return row
        ms, reps = measure(built.fn, device, cfg)
        row["ms"] = sig(ms, 5)
        row["tflops"] = sig(tflops(cases.flops(op, case), ms))
        if nbytes_known:
            row["gbps"] = sig(gbps(cases.nbytes(op, case, data), ms))
        row["note"] = "; ".join(notes) or None
    except Unavailable as exc:
        row.update(status="unavailable", note=str(exc))
    except Unsupported as exc:
        row.update(status="unsupported", note=str(exc))
    except ImportError as exc:
        row.update(status="unavailable", note=_short(exc))
    except torch.OutOfMemoryError as exc:
        row.update(status="failed", note="out of memory: " + _short(exc, 200))
    except Exception as exc:  # a peer that breaks is a result, not a crash of the run
        row.update(status="failed", note=_short(exc))
    finally:
        if row["status"] != "ok":
            row["ms"] = None
            row["tflops"] = None
            if "gbps" in row:
                row["gbps"] = None
        del built, built_check
        _free(device)
    return row


def add_ratios(rows: list[dict[str, Any]], floor_impl: str | None) -> None:
    """Per-case ratios, in place. On the ``flashmoe`` row: ``speedup`` = {peer: peer_ms /
    flashmoe_ms} (> 1: flashmoe faster). With a floor impl: ``frac_of_floor`` = floor_ms /
    ms on every timed row (1.0 = as fast as the same FLOPs as plain GEMMs)."""
    ok = {r["impl"]: r["ms"] for r in rows if r["status"] == "ok"}
    main = ok.get(MAIN_IMPL)
    for r in rows:
        if r["impl"] == MAIN_IMPL and main is not None:
            r["speedup"] = {p: sig(ms / main) for p, ms in ok.items() if p != MAIN_IMPL}
        if floor_impl is not None and floor_impl in ok and r["status"] == "ok":
            r["frac_of_floor"] = sig(ok[floor_impl] / r["ms"])


def run_case(
    family: Family,
    op: str,
    case: Any,
    impls: Sequence[str],
    device: torch.device,
    cfg: TimingConfig,
) -> list[dict[str, Any]]:
    cases = family.cases
    torch.manual_seed(_case_seed(op, cases.label(case)))
    data = cases.make_data(op, case, cfg.n_sets, device, None)
    check_case = cases.check_case(op, case, device)
    check_data = data if check_case == case else cases.make_data(op, check_case, 1, device, data)
    ref, ref_error = None, None
    try:
        ref = cases.reference_outputs(op, check_case, check_data)
    except Exception as exc:  # e.g. out of memory: every checked impl is then marked failed
        ref_error = _short(exc)
    _free(device)
    # flashmoe runs last in the first round: a kernel under development that faults would
    # poison the CUDA context for the peers of the same case. Later rounds rotate the order.
    order = [i for i in impls if i != MAIN_IMPL] + [i for i in impls if i == MAIN_IMPL]
    rounds: dict[str, list[dict[str, Any]]] = {impl: [] for impl in order}
    for r in range(max(1, cfg.rounds)):
        if r and device.type == "cuda" and not _cuda_healthy(device):
            break
        shift = r % len(order)
        for impl in order[shift:] + order[:shift]:
            rounds[impl].append(
                run_impl(family, impl, op, case, data, check_case, check_data, ref, ref_error, device, cfg)
            )
    flops, nbytes = cases.flops(op, case), cases.nbytes(op, case, data)
    rows = [_merge_rounds(rounds[impl], flops, nbytes) for impl in order]
    del data, check_data, ref
    _free(device)
    add_ratios(rows, getattr(cases, "FLOOR_IMPL", None))
    return rows


def _merge_rounds(rows: list[dict[str, Any]], flops: float, nbytes: float | None) -> dict[str, Any]:
    """One impl's row from its rounds: the first round's row (check, notes), the median of
    the timed rounds' ms (``ms_rounds`` lists them); any round not ok makes the row that round's."""
    if len(rows) == 1:
        return rows[0]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        return bad[0]
    times = sorted(r["ms"] for r in rows)
    mid = len(times) // 2
    ms = times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])
    row = dict(rows[0], ms=sig(ms, 5), tflops=sig(tflops(flops, ms)), ms_rounds=[r["ms"] for r in rows])
    if "gbps" in row and nbytes is not None:
        row["gbps"] = sig(gbps(nbytes, ms))
    return row


def progress_line(index: int, total: int, op: str, label: str, rows: Iterable[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        if r["status"] == "ok":
            metric = f"{r['tflops']:.1f} TF/s" + (f", {r['gbps']:.0f} GB/s" if r.get("gbps") else "")
            parts.append(f"{r['impl']} {r['ms']:.3f} ms ({metric})")
        else:
            parts.append(f"{r['impl']} {r['status']}")
    return f"[{index}/{total}] {op} {label}: " + " | ".join(parts)


def run(
    family_name: str,
    ops: Sequence[str],
    suite: str | None,
    impls: Sequence[str] | None,
    *,
    quick: bool,
    device: torch.device,
    cfg: TimingConfig,
    out_path: Path,
    command: str,
    dtype: str | None = None,
    log=sys.stderr,
) -> dict[str, Any]:
    """Run every (op, case) of the suite for the impls; rewrite ``out_path`` after each case.
    ``dtype`` overrides the cases' dtype (default bfloat16)."""
    family = get_family(family_name)
    cases = family.cases
    impls = tuple(impls) if impls else tuple(family.peers.IMPLS)
    unknown = [i for i in impls if i not in family.peers.IMPLS]
    if unknown:
        raise ValueError(f"unknown impls {unknown} for {family_name}; known: {family.peers.IMPLS}")
    for op in ops:
        if op not in cases.OPS:
            raise ValueError(f"op {op!r} is not a {family_name} op; expected one of {cases.OPS}")
    plan = [(op, c) for op in ops for c in cases.select_cases(op, suite or cases.DEFAULT_SUITE[op], quick)]
    if dtype is not None:
        plan = [(op, dataclasses.replace(c, dtype=dtype)) for op, c in plan]
    doc: dict[str, Any] = {"meta": collect_meta(command, device), "rows": []}
    for n, (op, case) in enumerate(plan, 1):
        rows = run_case(family, op, case, impls, device, cfg)
        doc["rows"].extend(rows)
        write_results(out_path, doc)
        print(progress_line(n, len(plan), op, cases.label(case), rows), file=log, flush=True)
        if device.type == "cuda" and not _cuda_healthy(device):
            print(
                "the CUDA context is broken (a kernel faulted); stopping the run here", file=log, flush=True
            )
            break
    return doc


def _cuda_healthy(device: torch.device) -> bool:
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
    except RuntimeError:
        return False
    return True


def format_table(doc: dict[str, Any]) -> str:
    """A compact text table: one line per (op, case), ms and TFLOP/s (GB/s) per impl."""
    from collections import OrderedDict

    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in doc["rows"]:
        groups.setdefault((r["op"], json.dumps(r["case"], sort_keys=True)), []).append(r)
    lines = []
    for (op, case_json), rows in groups.items():
        case = json.loads(case_json)
        if "tokens" in case:
            label = (
                f"{case.get('shape', '')} T{case['tokens']} H{case['hidden']} F{case['ffn']} "
                f"E{case['experts']} k{case['top_k']}"
            )
        else:
            kv = f":{case['heads_kv']}" if case["heads_kv"] != case["heads_q"] else ""
            label = f"B{case['batch']} H{case['heads_q']}{kv} S{case['seqlen_q']} D{case['head_dim']} " + (
                "causal" if case["causal"] else "full"
            )
        cells = []
        for r in rows:
            if r["status"] == "ok":
                extra = f"/{r['gbps']:.0f}GB/s" if r.get("gbps") else ""
                cells.append(f"{r['impl']}={r['ms']:.3f}ms/{r['tflops']:.0f}TF{extra}")
            else:
                cells.append(f"{r['impl']}={r['status']}")
        lines.append(f"{op:18s} {label:34s} " + " ".join(cells))
    return "\n".join(lines)
