"""funcgrad verify: the catalog of hand-derived rules and the book's model through the three-way checks."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

# ----------------------------------------------------------------------------------------------------------
# funcgrad verify


def verify_suite(seed: int = 0, only: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs every rule of the catalog and the book's model through the checks; returns one record per check
    (name, kind, formula, report, seconds). Prints nothing."""
    import jax
    import jax.numpy as jnp

    import funcgrad as fg
    from funcgrad import rules, verify

    checks: list[tuple[str, str, str, Any]] = []
    for name, rule in rules.CATALOG.items():
        checks.append((
            f"rule {name}",
            "check_vjp",
            rule.formula,
            lambda rule=rule: verify.check_vjp(rule.forward, rule.backward, *rule.example(jax.random.key(seed)),
                                               argnums=rule.argnums, seed=seed),
        ))
    checks.append((
        "rule softmax_jacobian",
        "check_jacobian",
        "J = diag(s) − s·sᵀ",
        lambda: verify.check_jacobian(rules.softmax.forward, jnp.array([1.0, 2.0, 0.5, -1.0]), rules.softmax_jacobian,
                                      seed=seed),
    ))

    def book_model(l2=None, dropout=None):
        model = fg.nn.mlp([64, 3], activation="relu", output="softmax", dropout=dropout)
        obj = fg.Objective(model, "categorical_crossentropy", l2=l2)
        params = model.init(jax.random.key(seed), (2,))
        X, y = fg.data.spiral(100, 3, key=seed)
        return obj, params, X, y

    def model_check():
        obj, params, X, y = book_model()
        return verify.check_grad(obj.value, params, X, y, hand=obj.hand_grad, seed=seed)

    def regularised_check():
        obj, params, X, y = book_model(l2={"dense1/*": 5e-4}, dropout=0.1)
        key = jax.random.key(seed + 1)
        fn = lambda p, X, y, k: obj.value(p, X, y, key=k, train=True)  # noqa: E731
        hand = lambda p, X, y, k: obj.hand_grad(p, X, y, key=k, train=True)  # noqa: E731
        return verify.check_grad(fn, params, X, y, key, hand=hand, seed=seed)

    def chain_check():
        obj, params, X, y = book_model()
        return verify.check_chain(obj.stages(params, X, y), X, seed=seed)

    checks += [
        ("book model (ch. 11)", "check_grad", "spiral 100×3, 2→64 ReLU→3 softmax + CCE, at init", model_check),
        ("book model + L2 + dropout (ch. 14-15)", "check_grad", "as ch. 11, L2 5e-4 on dense1, dropout 0.1",
         regularised_check),
        ("book chain (ch. 11)", "check_chain", "dense1 → relu1 → dense2 → softmax1 → loss, link by link",
         chain_check),
    ]
    records = []
    for name, kind, formula, run in checks:
        if only and not any(o in name for o in only):
            continue
        start = time.perf_counter()
        report = run()
        records.append({"name": name, "kind": kind, "formula": formula, "report": report,
                        "seconds": time.perf_counter() - start})
    return records


def _worst(report: Any) -> tuple[str, float | None]:
    """Where a check's verdict was decided: the link (for chains), the leaf and element, and its error."""
    from funcgrad.verify import ChainReport

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
            {k: v for k, v in r.items() if k != "report"} | {"verdict": r["report"].verdict, "ok": r["report"].ok,
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


