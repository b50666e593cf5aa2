"""PNG plots drawn from a results JSON only (never from a live run's objects).

Attention ops: TFLOP/s vs seqlen, one panel per (heads, head_dim, mask) configuration, one
line per impl. MoE ops: ms per shape per impl (log scale) and the fraction of the dense
floor (``dense_floor`` ms / ms); ``moe_decode``: ms and GB/s against the copy ceiling.
Impls that were not timed are listed under each panel with their status.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .harness import ALL_OPS, validate_results

COLORS = {
    "flashmoe": "#d62728",
    "sdpa_flash": "#1f77b4",
    "sdpa_cudnn": "#2ca02c",
    "flex": "#9467bd",
    "reference": "#7f7f7f",
    "loop": "#8c564b",
    "grouped_mm": "#1f77b4",
    "dense_floor": "#2ca02c",
}
COPY_CEILING_GBPS = 3000.0


def _color(impl: str) -> str | None:
    return COLORS.get(impl)


def _not_timed(rows: list[dict[str, Any]]) -> str:
    seen: OrderedDict[str, str] = OrderedDict()
    for r in rows:
        if r["status"] != "ok":
            seen.setdefault(r["impl"], r["status"])
    return ", ".join(f"{i}: {s}" for i, s in seen.items())


def _impls_in_order(rows: list[dict[str, Any]]) -> list[str]:
    return list(OrderedDict.fromkeys(r["impl"] for r in rows))


def _attention_panels(fig, axes, rows: list[dict[str, Any]], op: str) -> None:
    groups: OrderedDict[tuple, list[dict[str, Any]]] = OrderedDict()
    for r in rows:
        c = r["case"]
        key = (c["heads_q"], c["heads_kv"], c["head_dim"], c["causal"], c["dtype"])
        groups.setdefault(key, []).append(r)
    for ax, (key, grows) in zip(axes, groups.items()):
        hq, hkv, d, causal, dtype = key
        for impl in _impls_in_order(grows):
            pts = sorted(
                (r["case"]["seqlen_q"], r["tflops"])
                for r in grows
                if r["impl"] == impl and r["status"] == "ok"
            )
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=impl, color=_color(impl))
        heads = f"{hq}" if hq == hkv else f"{hq}:{hkv}"
        ax.set_title(f"{op}: H {heads}, D {d}, {'causal' if causal else 'full'} ({dtype})", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("seqlen (batch*seqlen fixed)", fontsize=8)
        ax.set_ylabel("TFLOP/s", fontsize=8)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        missing = _not_timed(grows)
        if missing:
            ax.text(
                0.01, -0.3, "not timed: " + missing, transform=ax.transAxes, fontsize=6, va="top", wrap=True
            )


def _moe_label(c: dict[str, Any]) -> str:
    return f"{c.get('shape', '')} T{c['tokens']}\nE{c['experts']} k{c['top_k']}"


def _bars(ax, rows: list[dict[str, Any]], value, ylabel: str, title: str, log: bool = False) -> None:
    cases = list(OrderedDict.fromkeys(json.dumps(r["case"], sort_keys=True) for r in rows))
    impls = _impls_in_order(rows)
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, cj in enumerate(cases):
            for r in rows:
                if r["impl"] == impl and r["status"] == "ok" and json.dumps(r["case"], sort_keys=True) == cj:
                    v = value(r)
                    if v is not None:
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(v)
        if ys:
            ax.bar(xs, ys, width=width, label=impl, color=_color(impl))
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([_moe_label(json.loads(c)) for c in cases], fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _moe_panels(axes, rows: list[dict[str, Any]], op: str) -> None:
    ax_ms, ax_2 = axes
    _bars(ax_ms, rows, lambda r: r["ms"], "ms (log)", f"{op}: time per call", log=True)
    if op == "moe_decode":
        _bars(ax_2, rows, lambda r: r.get("gbps"), "GB/s", f"{op}: bandwidth (line: copy ceiling)")
        ax_2.axhline(COPY_CEILING_GBPS, color="k", linestyle="--", linewidth=1)
    else:
        _bars(ax_2, rows, lambda r: r.get("frac_of_floor"), "dense_floor ms / ms", f"{op}: fraction of floor")
        ax_2.axhline(1.0, color="k", linestyle="--", linewidth=1)
    missing = _not_timed(rows)
    if missing:
        ax_ms.text(0.01, -0.25, "not timed: " + missing, transform=ax_ms.transAxes, fontsize=6, va="top")


def plot_results(doc: dict[str, Any], out: str | Path) -> Path:
    """Draw ``doc`` (a results document) to the PNG ``out``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = validate_results(doc)
    if problems:
        raise ValueError("not a results document: " + "; ".join(problems[:5]))
    by_op: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for op in ALL_OPS:
        rows = [r for r in doc["rows"] if r["op"] == op]
        if rows:
            by_op[op] = rows
    if not by_op:
        raise ValueError("the results document has no rows to plot")
    layout = []  # (op, number of panels)
    for op, rows in by_op.items():
        if op.startswith("attention"):
            n = len(
                {
                    (
                        r["case"]["heads_q"],
                        r["case"]["heads_kv"],
                        r["case"]["head_dim"],
                        r["case"]["causal"],
                        r["case"]["dtype"],
                    )
                    for r in rows
                }
            )
        else:
            n = 2
        layout.append((op, n))
    ncols = min(4, max(n for _, n in layout))
    nrows = sum(math.ceil(n / ncols) for _, n in layout)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.9 * nrows), squeeze=False)
    row = 0
    for op, n in layout:
        span = math.ceil(n / ncols)
        axes = [grid[row + i // ncols][i % ncols] for i in range(span * ncols)]
        for ax in axes[n:]:
            ax.axis("off")
        if op.startswith("attention"):
            _attention_panels(fig, axes[:n], by_op[op], op)
        else:
            _moe_panels(axes[:2], by_op[op], op)
        row += span
    m = doc["meta"]
    sha = (m.get("git_sha") or "?")[:12]
    fig.suptitle(
        f"{m['device']} · torch {m['torch']} · triton {m['triton']} · cuDNN {m['cudnn']} · "
        f"{m['date']} · {sha}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_file(results: str | Path, out: str | Path) -> Path:
    return plot_results(json.loads(Path(results).read_text()), out)
