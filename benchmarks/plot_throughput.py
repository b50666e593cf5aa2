"""PNG plots for the stand-alone benchmarks' JSON (the harness has its own, ``benchmarks.plot``).

    python -m benchmarks.plot_throughput KIND RESULTS.json OUT.png

KIND: ``attn_short`` (benchmarks/attn_short_bench.py), ``science``
(benchmarks/science_throughput.py) or ``hf`` (benchmarks/hf_throughput.py).

Drawn from the JSON only (never from a live run), with the device and date in the title.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _title(meta: dict[str, Any], what: str) -> str:
    return f"{what} - {meta.get('device', '?')}, torch {meta.get('torch', '?')}, {meta.get('date', '?')}"


def attn_short(doc: dict[str, Any], out: Path, plt) -> None:
    """ms vs sequence length L per (heads, head dim): short kernels, general varlen, SDPA."""
    rows = doc["rows"]
    configs = sorted({(r["heads"], r["head_dim"]) for r in rows})
    fig, axes = plt.subplots(2, len(configs), figsize=(4.2 * len(configs), 7), squeeze=False)
    for j, (h, d) in enumerate(configs):
        sel = sorted((r for r in rows if (r["heads"], r["head_dim"]) == (h, d)), key=lambda r: r["L"])
        lengths = [r["L"] for r in sel]
        for i, (phase, label) in enumerate((("fwd", "forward"), ("fwd_bwd", "forward + backward"))):
            ax = axes[i][j]
            for impl, color in (("short", "#d62728"), ("general", "#ff7f0e"), ("sdpa", "#1f77b4")):
                pts = [(n, r[f"{impl}_{phase}_ms"]) for n, r in zip(lengths, sel) if r[f"{impl}_{phase}_ms"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=color, label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_title(f"H{h} D{d}: {label}", fontsize=9)
            ax.set_xlabel("tokens per sequence L")
            ax.set_ylabel("ms (log)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        _title(doc["meta"], f"packed self-attention, {rows[0]['tokens']:,} tokens, bf16"), fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def science(doc: dict[str, Any], out: Path, plt) -> None:
    """Speed-up over plain PyTorch per (op, model, size), one bar per library variant."""
    rows = doc["rows"]

    def key(r):
        c = r["case"]
        size = (
            f"{c['candidates']:,}x{c['elements_per_candidate']}"
            if r["op"] == "science_screen"
            else f"B{c['batch']}"
        )
        return f"{r['op'].replace('science_', '')}\nE{c['dim']} X{c['experts']}\n{size}"

    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["impl"]] = r["value"]
    labels = list(groups)
    impls = ["flashmoe", "flashmoe_cuda_graphs"]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(labels)), 4.5))
    width = 0.38
    for k, (impl, color) in enumerate(zip(impls, ("#ff9896", "#d62728"))):
        xs, ys = [], []
        for i, label in enumerate(labels):
            g = groups[label]
            if impl in g and "plain_pytorch" in g:
                xs.append(i + (k - 0.5) * width)
                ys.append(g[impl] / g["plain_pytorch"])
        bars = ax.bar(xs, ys, width, color=color, label=impl)
        ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="#7f7f7f", lw=1, label="plain PyTorch")
    ax.axhline(3.0, color="#2ca02c", lw=1, ls="--", label="issue bar 3x")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("speed-up over plain PyTorch (same weights)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(_title(doc["meta"], "composition transformer throughput, bf16"), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def hf(doc: dict[str, Any], out: Path, plt) -> None:
    """Tokens/s of each variant of the transformers training step (failed variants named)."""
    rows = doc["rows"]
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [f"{r['impl']}: {r.get('note', r.get('status'))[:60]}" for r in rows if r.get("status") != "ok"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = ["#d62728" if not r["impl"].startswith("hf_") else "#1f77b4" for r in ok]
    bars = ax.barh([r["impl"] for r in ok], [r["tokens_per_s"] for r in ok], color=colors)
    ax.bar_label(bars, labels=[f"{r['tokens_per_s']:,.0f} tok/s ({r['ms']:.1f} ms)" for r in ok], fontsize=8)
    ax.set_xlabel("training tokens/s (forward + backward)")
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
    c = ok[0]["case"] if ok else {}
    what = f"transformers {doc['meta'].get('transformers', '?')} {c.get('model', '')} step"
    ax.set_title(_title(doc["meta"], what), fontsize=10)
    if failed:
        ax.text(0.01, -0.18, "not timed: " + "; ".join(failed), transform=ax.transAxes, fontsize=7)
    ax.set_xlim(0, max(r["tokens_per_s"] for r in ok) * 1.45 if ok else 1)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


KINDS = {"attn_short": attn_short, "science": science, "hf": hf}


def plot(kind: str, results: str | Path, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(results).read_text())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    KINDS[kind](doc, out, plt)
    plt.close("all")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("results", help="results JSON")
    ap.add_argument("out", help="PNG path")
    args = ap.parse_args(argv)
    print(f"wrote {plot(args.kind, args.results, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
