"""Command line: ``python -m benchmarks {attention,moe,plot,list} ...`` (see README.md)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from . import harness

_DEFAULT_OP = {"attention": "attention_fwd", "moe": "moe_fwd"}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for fam in harness.FAMILIES:
        s = sub.add_parser(fam, help=f"time the {fam} implementations side by side")
        s.add_argument(
            "--op",
            type=_csv,
            default=[_DEFAULT_OP[fam]],
            help="op or comma-separated ops (one results file; shared compile caches)",
        )
        s.add_argument("--suite", default=None, help="case table (default: the op's issue suite)")
        s.add_argument("--impls", type=_csv, default=None, help="comma-separated impls (default: all)")
        s.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/<...>.json)")
        s.add_argument("--plot", default=None, help="also draw this PNG from the results")
        s.add_argument("--quick", action="store_true", help="reduced case list and shorter timing")
        s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
        s.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
        s.add_argument("--sets", type=int, default=None, help="input sets rotated through (default 3)")
        s.add_argument("--rep-ms", type=float, default=None, help="timed repetitions target (ms)")
        s.add_argument(
            "--rounds",
            type=int,
            default=None,
            help="time every case this many times, impl order rotated; median per impl (default 1)",
        )
        s.add_argument(
            "--max-iter-s",
            type=float,
            default=None,
            help="skip an impl whose single iteration takes longer (default 1.0 s)",
        )
    pl = sub.add_parser("plot", help="draw a PNG from a results JSON")
    pl.add_argument("results", help="results JSON file")
    pl.add_argument("--out", required=True, help="PNG to write")
    ls = sub.add_parser("list", help="print the suites and their cases")
    ls.add_argument("family", nargs="?", choices=harness.FAMILIES)
    return p


def _list(family: str | None) -> None:
    for fam in [family] if family else harness.FAMILIES:
        cases = harness.get_family(fam).cases
        for name, suite in cases.SUITES.items():
            print(f"{fam} suite {name!r}: {suite.description}")
            for op in cases.OPS:
                full = cases.select_cases(op, name, False)
                quick = set(cases.select_cases(op, name, True))
                print(f"  {op}: {len(full)} cases, {len(quick)} with --quick")
                for c in full:
                    print(f"    {'*' if c in quick else ' '} {cases.label(c)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.cmd == "plot":
        from .plot import plot_file

        plot_file(args.results, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
        return 0
    if args.cmd == "list":
        _list(args.family)
        return 0

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = harness.QUICK_TIMING if args.quick else harness.TimingConfig()
    overrides = {
        k: v
        for k, v in (
            ("n_sets", args.sets),
            ("rep_ms", args.rep_ms),
            ("max_iter_s", args.max_iter_s),
            ("rounds", args.rounds),
        )
        if v is not None
    }
    cfg = dataclasses.replace(base, **overrides)
    default_suites = harness.get_family(args.cmd).cases.DEFAULT_SUITE
    suite_tag = args.suite or "+".join(sorted({default_suites.get(op, "default") for op in args.op}))
    stem = f"{args.cmd}-{'+'.join(args.op)}-{suite_tag}{'-quick' if args.quick else ''}"
    out_path = harness.new_results_path(args.out, stem)
    command = "python -m benchmarks " + shlex.join(argv)
    print(f"writing {out_path} ({harness.device_name(device)})", file=sys.stderr, flush=True)
    doc = harness.run(
        args.cmd,
        args.op,
        args.suite,
        args.impls,
        quick=args.quick,
        device=device,
        cfg=cfg,
        out_path=out_path,
        command=command,
        dtype=args.dtype,
    )
    print(harness.format_table(doc))
    print(f"results: {out_path}", file=sys.stderr)
    if args.plot:
        from .plot import plot_results

        plot_results(doc, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
