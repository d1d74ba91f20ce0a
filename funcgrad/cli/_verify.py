"""funcgrad verify: the catalog of hand-derived rules and the book's model through the three-way checks."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from funcgrad.verify import ChainReport, verify_suite


def _worst(report: Any) -> tuple[str, float | None]:
    """Where a check's verdict was decided: the link (for chains), the leaf and element, and its error."""
    if isinstance(report, ChainReport):
        bad = [(n, r) for n, r in report.links if r.verdict != "ok"] or list(report.links)
        name, rep = max(bad, key=lambda nr: (not nr[1].ok, nr[1].verdict != "ok"))
        where, err = _worst(rep)
        return f"{name}: {where}", err
    r = report.worst
    return ("", None) if r is None else (r.where, r.max_abs_err)


def cmd_verify(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    records = verify_suite(seed=args.seed, only=args.only)
    if not records:
        print(f"funcgrad verify: no check matches {args.only}", file=sys.stderr)
        return 2
    failed = [r for r in records if not r["report"].ok]
    if args.json:
        out = [
            {k: v for k, v in r.items() if k != "report"} | {"verdict": str(r["report"].verdict), "ok": r["report"].ok,
                                                             "report": r["report"].to_dict()}
            for r in records
        ]
        print(json.dumps({"ok": not failed, "checks": out, "seconds": time.perf_counter() - start}, indent=1))
        return 1 if failed else 0
    print(f"funcgrad verify: {len(records)} checks — hand-derived formula vs JAX autodiff vs finite differences")
    w = max(len(r["name"]) for r in records)
    print(f"  {'check'.ljust(w)}  {'verdict':14s} {'worst at':34s} {'abs err':>10s} {'time':>7s}")
    for r in records:
        where, err = _worst(r["report"])
        err_s = f"{err:10.2e}" if err is not None else " " * 10
        print(f"  {r['name'].ljust(w)}  {r['report'].verdict:14s} {where[:34]:34s} {err_s} {r['seconds']:6.2f}s")
    kinks = sum(1 for r in records if r["report"].verdict == "kink")
    for r in failed:
        print()
        print(f"[{r['name']}] {r['formula']}")
        print(r["report"])
    print()
    total = time.perf_counter() - start
    if failed:
        print(f"{len(failed)} of {len(records)} checks FAILED ({total:.1f}s)")
        return 1
    note = f" ({kinks} at kinks, where the derivative is undefined and every convention between the one-sided " \
           f"derivatives is accepted)" if kinks else ""
    print(f"all {len(records)} checks passed{note} ({total:.1f}s)")
    return 0


