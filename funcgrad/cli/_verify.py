"""funcgrad verify: the catalog of hand-derived rules and the book's model through the three-way checks."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from funcgrad._checks import describe
from funcgrad.cli._train import UsageError
from funcgrad.verify import ChainReport, audit, verify_suite

_TARGET_FORM = "path/to/file.py:FUNCTION or package.module:FUNCTION"


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
    if args.audit is not None:
        return _cmd_audit(args)
    if args.max_calls is not None or args.exclude is not None:
        raise UsageError(f"{'--max-calls' if args.max_calls is not None else '--exclude'} applies to --audit only")
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


# ---- funcgrad verify --audit TARGET ---------------------------------------------------------------------------


@contextlib.contextmanager
def _on_path(folder: Path | None) -> Iterator[None]:
    """``folder`` first on sys.path while the user's code runs (as ``python file.py`` has the file's folder), so
    that it can import its neighbours."""
    if folder is None:
        yield
        return
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def _load(target: str) -> tuple[Any, Path | None]:
    """The module TARGET names (a file is executed; a module is imported) and the folder its code runs with first
    on sys.path: the file's, or the working directory."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"--audit expects {_TARGET_FORM}; got {target!r}")
    is_file = where.endswith(".py") or "/" in where or "\\" in where or where in (".", "..")
    if is_file and Path(where).is_dir():  # (a package's dotted name is imported, folder or not)
        raise UsageError(f"--audit {target}: {where!r} is a folder; give the Python file in it "
                         f"(path/to/file.py:{name}) or a module's dotted name (package.module:{name})")
    if where.startswith("."):
        raise UsageError(f"--audit {target}: {where!r} is a relative module name; give a file's path "
                         f"(path/to/file.py:{name}) or the module's full dotted name (package.module:{name})")
    if is_file:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"--audit {target}: no such file {where!r}")
        spec = importlib.util.spec_from_file_location(f"_funcgrad_audit_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise UsageError(f"--audit {target}: {where!r} cannot be loaded as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look their module up there
        folder = path.resolve().parent
        with _on_path(folder):
            spec.loader.exec_module(module)
        return module, folder
    folder = Path.cwd()  # as `python -m` has it, also for the installed `funcgrad` command
    try:
        with _on_path(folder):
            return importlib.import_module(where), folder
    except ModuleNotFoundError as e:
        if e.name and (where == e.name or where.startswith(e.name + ".")):
            raise UsageError(f"--audit {target}: no module named {where!r} (nor a file: a file's path ends in "
                             "'.py')") from None
        raise


def _setup(target: str) -> tuple[tuple, Path | None]:
    """Runs the user's setup function: ``(fn, params, *args)``."""
    module, folder = _load(target)
    name = target.rpartition(":")[2]
    func = getattr(module, name, None)
    if func is None:
        raise UsageError(f"--audit {target}: {target.rpartition(':')[0]!r} defines no {name!r}")
    if not callable(func):
        raise UsageError(f"--audit {target}: {name!r} is not a function ({describe(func)})")
    needed = _required_parameters(func)
    if needed:
        raise UsageError(f"--audit {target}: {name}() takes argument(s) {', '.join(needed)} without defaults; "
                         f"funcgrad calls it with none: give them defaults, or add a function that calls {name} "
                         "with them and returns (fn, params, *args)")
    with _on_path(folder):
        got = func()
    if not isinstance(got, tuple) or len(got) < 2:
        raise UsageError(f"--audit {target}: {name}() must return a tuple (fn, params, *args); it returned "
                         + (f"a tuple of {len(got)}" if isinstance(got, tuple) else describe(got)))
    if not callable(got[0]):
        raise UsageError(f"--audit {target}: {name}() must return (fn, params, *args) with fn the function to "
                         f"audit; its first element is {describe(got[0])}, not callable")
    return got, folder


def _required_parameters(func: Any) -> list[str]:
    """The parameters ``func`` cannot be called without (none where its signature cannot be read)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                                          p.KEYWORD_ONLY)]


def _cmd_audit(args: argparse.Namespace) -> int:
    if args.only:
        raise UsageError("--only selects checks of the catalog; it cannot be combined with --audit")
    max_calls = 8 if args.max_calls is None else args.max_calls
    if max_calls < 1:
        raise UsageError(f"--max-calls must be at least 1; got {max_calls}")
    if args.seed < 0:
        raise UsageError(f"--seed must be at least 0 with --audit; got {args.seed}")
    try:
        (fn, params, *rest), folder = _setup(args.audit)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code raised: its traceback, then one line saying whose
        traceback.print_exc()
        print(f"funcgrad verify: --audit {args.audit}: loading or calling it raised {type(e).__name__}",
              file=sys.stderr)
        return 2
    except SystemExit as e:  # the user's file ends in sys.exit(): nothing audited, which is not a pass
        print(f"funcgrad verify: --audit {args.audit}: loading or calling it exited (SystemExit: {e.code!r}) "
              "before returning (fn, params, *args), so nothing was audited; guard the file's script part with "
              "`if __name__ == \"__main__\":`", file=sys.stderr)
        return 2
    with _on_path(folder):
        try:
            report = audit(fn, params, *rest, max_calls=max_calls, seed=args.seed, exclude=args.exclude or ())
        except ValueError as e:  # (an exclude name shared by rules at several places: which to name)
            if not str(e).startswith("audit: exclude"):
                raise
            raise UsageError(f"--exclude: {e}") from None
        except SystemExit as e:
            print(f"funcgrad verify: --audit {args.audit}: the function exited while being traced (SystemExit: "
                  f"{e.code!r}), so nothing was audited", file=sys.stderr)
            return 2
        except Exception as e:
            if not any("verify.audit traces fn" in n for n in getattr(e, "__notes__", ())):
                raise
            traceback.print_exc()  # the user's fn failed to trace: where, then one line saying so
            print(f"funcgrad verify: --audit {args.audit}: the function failed to trace ({type(e).__name__})",
                  file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps({**report.to_dict(), "ok": report.ok, "target": args.audit}, indent=1))
        return 2 if not report.rows else 0 if report.ok else 1
    if not report.rows:  # (nothing audited is not a pass)
        print(f"funcgrad verify: --audit {args.audit}: no custom rule to check: the function calls none defined "
              "outside JAX and the frameworks" + (" that --exclude leaves" if args.exclude else "")
              + "; nothing was audited" + "".join(f" ({n})" for n in report.notes if "not audited" in n),
              file=sys.stderr)
        return 2
    print(f"funcgrad verify --audit {args.audit}: every custom_vjp/custom_jvp rule it calls, checked at its calls "
          "against the rule's primal (plain autodiff) and finite differences")
    print(report)
    print()
    if report.ok:
        print(f"all {len(report.rows)} custom rule(s) passed ({report.seconds:.1f}s)")
        return 0
    names = ", ".join(r.rule for r in report.failing)
    print(f"{len(report.failing)} of {len(report.rows)} custom rule(s) FAILED: {names} ({report.seconds:.1f}s)")
    return 1
