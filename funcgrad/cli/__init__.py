"""The command line: ``funcgrad train``, ``funcgrad evaluate``, ``funcgrad verify``.

This is the only layer that prints, parses arguments and touches files; everything below it returns values.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax

from funcgrad.cli._train import UsageError, cmd_evaluate, cmd_train, interruptible
from funcgrad.cli._verify import cmd_verify
from funcgrad.config import packaged
from funcgrad.verify import verify_suite

__all__ = ["main", "verify_suite"]


def _enable_compilation_cache() -> None:
    """Keeps XLA's compiled programs between runs, so a second ``funcgrad verify`` or ``train`` starts in a
    fraction of the time. ``FUNCGRAD_COMPILATION_CACHE=0`` turns it off; a path moves it."""
    setting = os.environ.get("FUNCGRAD_COMPILATION_CACHE", "")
    if setting.lower() in ("0", "off", "false", "no"):
        return
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(setting) if setting else base / "funcgrad" / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # a read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _version() -> str:
    """``funcgrad X.Y.Z`` and the versions of what it runs on (what a bug report needs)."""
    import importlib.metadata  # noqa: PLC0415 - only --version needs it

    import funcgrad  # noqa: PLC0415 - the package itself, for its version

    parts = []
    for dist in ("jax", "jaxlib", "optax"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return f"funcgrad {funcgrad.__version__} ({', '.join(parts)}; Python {sys.version.split()[0]})"


def _seed(text: str) -> int:
    """A seed: an integer of at least 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 0; got {text!r}") from None
    if not 0 <= value < 2**63:
        shown = text if len(text) < 40 else text[:40] + "..."
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 2**63; got {shown}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funcgrad", description="Neural networks as pure functions in JAX.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    names = ", ".join(packaged())
    t = sub.add_parser("train", help="train a model from a TOML config (default: configs/spiral.toml)")
    t.add_argument("--config", metavar="FILE|NAME",
                   help=f"a TOML config file, or the name of one that ships with funcgrad ({names}); default: "
                        "configs/spiral.toml here, else the shipped spiral")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optimizer.learning_rate=0.02 (repeatable)")
    t.add_argument("--out", metavar="DIR", help="output folder (default: runs/<config name>)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in the output folder, with its own config.json and checkpoint; --set may "
                        "change train.epochs, train.fuse, train.log_every, train.checkpoint_every, train.eval_every, "
                        "train.tensorboard, train.verify, "
                        "optimizer.learning_rate, optimizer.decay")
    t.add_argument("--quiet", action="store_true", help="print nothing but errors (no header, no progress)")
    t.add_argument("--json", action="store_true",
                   help="print the final summary (summary.json's content) as one JSON object on stdout; what is "
                        "otherwise printed goes to stderr")
    d = t.add_argument_group("several processes (hosts), with jax.distributed; also from the environment "
                             "variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    d.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    d.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0 to N-1")
    t.set_defaults(handler=cmd_train)

    e = sub.add_parser("evaluate", help="metrics of a saved run (its validation data, or data drawn with --seed)")
    e.add_argument("--run", required=True, metavar="DIR", help="a run folder written by funcgrad train")
    e.add_argument("--seed", type=_seed, help="draw the data with this seed (default: the run's own validation data)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(handler=cmd_evaluate)

    v = sub.add_parser("verify", help="check every hand-derived formula of the catalog and the book's model, or "
                                              "(--audit) every custom_vjp/custom_jvp rule a model of yours calls",
                       description="Check every hand-derived formula of funcgrad's catalog and the book's model "
                                   "against JAX's autodiff and finite differences (exit 0: all pass, 1: some fail), "
                                   "or with --audit every custom_vjp/custom_jvp rule a model of yours calls, each at "
                                   "the inputs it receives (exit 0: all pass, 1: some fail, 2: nothing could be "
                                   "audited).")
    v.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    v.add_argument("--seed", type=_seed, default=0, help="seed of the example points and random directions (≥ 0)")
    v.add_argument("--only", nargs="+", metavar="NAME", help="run only the checks whose name contains NAME")
    v.add_argument("--audit", metavar="TARGET",
                   help="instead of the catalog, audit every custom_vjp/custom_jvp rule a model of yours calls "
                        "(verify.audit). TARGET is path/to/file.py:FUNCTION or package.module:FUNCTION; FUNCTION "
                        "takes no arguments and returns (fn, params, *args). This imports and runs your code: "
                        "the file is executed as Python, so audit only code you trust")
    v.add_argument("--max-calls", type=int, metavar="N",
                   help="with --audit: calls checked per rule at most; longer loops are sampled (default: 8)")
    v.add_argument("--exclude", nargs="+", metavar="RULE",
                   help="with --audit: rules left unchecked (deliberately not their primal's derivative: a "
                        "straight-through estimator), by name or name@file:line (verify.audit's exclude)")
    v.set_defaults(handler=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _enable_compilation_cache()
    try:
        with warnings.catch_warnings(), interruptible():
            if getattr(args, "quiet", False) and not sys.warnoptions:  # --quiet prints nothing but errors; -W still rules
                warnings.simplefilter("ignore")
            return args.handler(args)
    except UsageError as e:
        print(f"funcgrad {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that vanished or became unwritable mid-command: one line, never a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"funcgrad {args.command}: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"funcgrad {args.command}: interrupted", file=sys.stderr)
        if argv is None:  # the command itself (not a caller in Python): leave now
            # (XLA's compiler threads, interrupted mid-compilation, can crash the interpreter's shutdown: a SIGSEGV
            # instead of status 130. The run's files are complete; the lock goes with the process.)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
