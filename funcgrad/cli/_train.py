"""funcgrad train / funcgrad evaluate."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

import funcgrad as fg
from funcgrad import checkpoint, experiment, parallel, verify
from funcgrad import config as fgconfig
from funcgrad._checks import check_finite_tree, describe
from funcgrad.cli import _files as files
from funcgrad.cli import _log as log
from funcgrad.cli import _plots as plots
from funcgrad.cli import _rundir as rundir
from funcgrad.cli._progress import Progress

DEFAULT_CONFIG = Path("configs") / "spiral.toml"
# Keys that may change when a run is resumed: they do not change the computation already done.
RESUMABLE = {("train", "epochs"), ("train", "verify"), ("train", "log_every"), ("train", "checkpoint_every"),
             ("train", "eval_every"), ("train", "tensorboard"),  # what is logged, not what is computed
             ("checkpoint", "max_to_keep"),
             ("train", "fuse"),  # results do not depend on how steps are fused
             ("optimizer", "learning_rate"), ("optimizer", "decay")}  # e.g. a lower rate after a divergence


class UsageError(Exception):
    """A user mistake the CLI reports in one line, exiting with status 2."""


# Ctrl-C seen during a command. Python raises KeyboardInterrupt where the main thread happens to be; inside a
# callback (JAX's garbage-collection hook) it is only printed as "ignored", and training went on to its end with
# status 0. The training loop checks this between chunks.
_INTERRUPTED = threading.Event()


def _on_sigint(signum: int, frame: Any) -> None:  # noqa: ARG001 - a signal handler's signature
    _INTERRUPTED.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Records Ctrl-C (see :data:`_INTERRUPTED`) while a command runs, where Python's own handler is in place."""
    _INTERRUPTED.clear()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _default_config() -> Path:
    """configs/spiral.toml here (a checkout, as `make run` uses it), else the one that ships with funcgrad."""
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    try:
        return fgconfig.locate(DEFAULT_CONFIG.stem)
    except fgconfig.ConfigError:
        raise UsageError(f"no --config given and {DEFAULT_CONFIG} not found here; pass --config FILE") from None


def _config_diff(a: dict, b: dict, prefix: str = "", *, every_key: bool = False) -> list[str]:
    """``key: run has <b>, now <a>`` for each key that differs (only the keys a resumed run cannot change,
    unless ``every_key``)."""
    return [f"{path}: run has {vb!r}, now {va!r}" for path, va, vb in _changed(a, b, prefix)
            if every_key or tuple(path.split(".")) not in RESUMABLE]


def _summary_line(metrics: dict[str, Any]) -> str:
    keys = [("loss", "loss", ".4g"), ("data_loss", "data", ".4g"), ("reg_loss", "reg", ".4g"), ("accuracy", "acc", ".4f")]
    parts = [f"{label} {float(metrics[k]):{fmt}}" for k, label, fmt in keys if k in metrics]
    if "reg_loss" in metrics and float(metrics["reg_loss"]) == 0:
        parts = [p for p in parts if not p.startswith(("data ", "reg "))]
    return ", ".join(parts)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _memory_available() -> tuple[int, str, bool] | None:
    """Bytes free where the run allocates, what that memory is, and whether the devices share it: the
    accelerator's own memory (per device), or the host's (MemAvailable, within a cgroup's limit less its
    reclaimable page cache); None when it cannot be told."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        try:
            stats = dev.memory_stats() or {}
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{dev.platform} memory per device", False
        except (KeyError, TypeError, AttributeError, NotImplementedError, RuntimeError):
            return None
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit.isdigit():
            used = int((cgroup / "memory.current").read_text())
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines() if " " in line)
            used -= int(stat.get("inactive_file", 0))  # page cache the kernel reclaims before it refuses memory
            avail = min(avail if avail is not None else 1 << 62, int(limit) - max(used, 0))
    except (OSError, ValueError):
        pass
    return (avail, "memory", True) if avail is not None else None


def _check_memory(cfg: Any, *, check: bool) -> None:
    """Refuses a run that cannot fit, before a byte of it is allocated. ``check``: the float64 gradient check
    runs (a new run with train.verify)."""

    free = _memory_available()
    if free is None:
        return
    devices = 1 if cfg.parallel.mode == "none" else len(jax.devices())
    need = fgconfig.memory_estimate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, verify=check)))
    total = need.on(devices, shared=free[2])
    if total > free[0]:
        raise UsageError(f"the run needs about {fgconfig._gb(total)}: {need.describe()}; but only "
                         f"{fgconfig._gb(free[0])} of {free[1]} is available. Reduce model.sizes, data.samples or "
                         "train.batch_size" + (" (or set train.verify=false to skip the float64 gradient check)"
                                               if check else ""))


def _load_config(args: argparse.Namespace) -> tuple[Any, Path]:

    try:
        path = fgconfig.locate(args.config) if args.config is not None else _default_config()
        return fgconfig.load(path, overrides=args.set or ()), path
    except fgconfig.ConfigError as e:
        raise UsageError(str(e)) from None


def _run_config(saved: dict) -> Any:
    """A run's own ``config.json`` as a Config. Runs saved before ``data.path`` was refused for data that is drawn
    hold its default there whatever the kind: that one value is dropped (it was never read), anything else is checked."""
    data = saved.get("data")
    if (isinstance(data, dict) and data.get("kind", fgconfig.DataConfig.kind) not in fgconfig.FILE_DATA
            and data.get("path") == fgconfig.DataConfig.path):
        saved = {**saved, "data": {k: v for k, v in data.items() if k != "path"}}
    return fgconfig.from_dict(saved)


def _resume_config(out: Path, args: argparse.Namespace) -> tuple[Any, dict, list[str]]:
    """The configuration a resumed run continues with: the run's own ``config.json`` with this command's
    ``--set`` applied, only to keys that may change. ``--config`` must describe the same run."""
    try:
        saved = files.json_load(out / files.CONFIG, what="a JSON object (the run's configuration)")
        before = _run_config(saved)
    except files.FileError as e:
        raise UsageError(f"--resume: {e}") from None
    except fgconfig.ConfigError as e:
        raise UsageError(f"--resume: {out / files.CONFIG}: {e}") from None
    try:
        cfg = fgconfig.from_dict(fgconfig.apply_overrides(fgconfig.to_dict(before), args.set or ()))
    except fgconfig.ConfigError as e:
        raise UsageError(f"--resume: {e}") from None
    old, new = fgconfig.to_dict(before), fgconfig.to_dict(cfg)
    fixed = _config_diff(new, old)
    if fixed:
        allowed = ", ".join(".".join(k) for k in sorted(RESUMABLE))
        raise UsageError(f"--resume: {'; '.join(fixed)}: cannot change when a run continues (only {allowed} can)")
    if args.config is not None:
        given, path = _load_config(args)
        differ = _config_diff(fgconfig.to_dict(given), new, every_key=True)
        if differ:
            raise UsageError(f"--resume: --config {path} (with --set) does not match the run in {out} ({'; '.join(differ)}); "
                             "resume without --config to continue with the run's own configuration")
    changes = [f"{k}: {a!r} → {b!r}" for k, a, b in _changed(old, new)]
    return cfg, saved, changes


def _changed(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key not in ("l1", "l2"):
            out += _changed(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


def _open_folder(out: Path, resume: bool) -> tuple[Any, Path | None]:
    """The run folder, checked and locked for this writer: (the lock, or None for a read-only folder, which
    can only be told that it is complete; the outermost folder this call created, if any)."""
    try:
        kind = rundir.inspect(out)
        if resume and kind != "run":
            raise UsageError(f"--resume: {out} holds no run to continue; train without --resume to start one")
        created = None
        if kind == "new":
            created = next(p for p in reversed([out, *out.parents]) if not p.exists())
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create {out}: {e.strerror or e}") from None
        try:
            lock = rundir.Lock(out)
        except rundir.ReadOnlyFolder:
            if resume:
                return None, None  # a finished run may still be told complete; any write is refused later
            raise
        except BaseException:
            _remove_created(out, created)
            raise
        try:
            rundir.inspect(out)  # again, under the lock: another writer may have finished in between
        except BaseException:
            lock.release()
            raise
    except rundir.RunFolderError as e:
        raise UsageError(str(e)) from None
    return lock, created


def _counts(opt_state: Any) -> list[tuple[str, int]]:
    """The update counts in an optimizer state (optax's and the book optimizers' ``count`` fields)."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        last = path[-1] if path else None
        if getattr(last, "name", None) == "count" and np.ndim(leaf) == 0:
            found.append((f"opt_state{jax.tree_util.keystr(path)}", int(np.asarray(leaf))))
    return found


def _validate_state(state: Any, meta: dict, ckpt: Path) -> int:
    """The checkpoint's step, checked against the state it holds; its parameters and optimizer state finite."""
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        what = "below 1" if isinstance(step, int) and not isinstance(step, bool) else "not a whole number"
        raise UsageError(f"{ckpt}: its step is {step!r}, {what}; a checkpoint is written after step 1 or later, "
                         "and its step is a whole number")
    if int(state.step) != step:
        raise UsageError(f"{ckpt}: the header says step {step} but the state's step is {int(state.step)}; "
                         "the checkpoint is inconsistent")
    for where, count in _counts(state.opt_state):
        if count != step:
            raise UsageError(f"{ckpt}: step {step} but the optimizer has made {count} updates ({where}); "
                             "the checkpoint is inconsistent")
    for tree, root in ((state.params, "params"), (state.opt_state, "opt_state")):
        try:
            check_finite_tree(tree, root)
        except ValueError as e:
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise UsageError(f"{ckpt}: holds non-finite values: {first}; it cannot be used (an earlier "
                             "checkpoint, or a new run, can)") from None
    return step


def _checkpoint_path(out: Path, cfg: Any) -> Path:
    """Where a run's checkpoint lives: ``checkpoint.npz``, or the orbax folder of steps."""
    return out / (files.ORBAX if cfg.checkpoint.backend == "orbax" else files.CHECKPOINT)


def _has_checkpoint(out: Path) -> bool:
    """A checkpoint of either backend in ``out`` (an orbax folder with at least one step)."""
    npz = out / files.CHECKPOINT
    orbax_dir = out / files.ORBAX
    return (npz.exists() or npz.is_symlink()
            or (orbax_dir.is_dir() and any(p.name.isdigit() for p in orbax_dir.iterdir())))


def _orbax_missing() -> str | None:
    try:
        import orbax.checkpoint  # noqa: F401, PLC0415 - an optional extra, imported only when asked for
    except ImportError:
        return ("checkpoint.backend = 'orbax' needs orbax-checkpoint, which is not installed: pip install "
                "'funcgrad[orbax]', or set checkpoint.backend = 'npz'")
    return None


def _settings_digest(cfg: Any) -> str:
    """A digest of the settings that decide what a run computes: all but its name and those --resume may change."""
    settings = fgconfig.to_dict(cfg)
    settings.pop("name", None)
    for section, key in RESUMABLE:
        if isinstance(settings.get(section), dict):
            settings[section].pop(key, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_checkpoint(out: Path, like: Any, cfg: Any) -> tuple[Any, int, dict]:
    ckpt = _checkpoint_path(out, cfg)
    try:
        if cfg.checkpoint.backend == "orbax":
            if not ckpt.is_dir():
                raise UsageError(f"{ckpt}: no orbax checkpoint there (checkpoint.backend is 'orbax')")
            with checkpoint.orbax_manager(ckpt, max_to_keep=None, async_save=False) as manager:
                if manager.latest_step() is None:
                    raise UsageError(f"{ckpt}: no orbax checkpoint there (checkpoint.backend is 'orbax')")
                state, meta = manager.restore(like)
        else:
            state, meta = files.load_checkpoint(out, like=like)
    except (files.FileError, checkpoint.CheckpointError, ImportError) as e:
        msg = str(e)
        raise UsageError(msg if msg.startswith((str(ckpt), str(ckpt.absolute()))) else f"{ckpt}: {msg}") from None
    try:
        here = rundir.run_id(out)
    except rundir.RunFolderError as e:
        raise UsageError(str(e)) from None
    if here is not None:
        # A run with a name was made by a funcgrad that writes the name, the config's and the settings' into each
        # checkpoint: one without them (stripped, or written by other code) cannot be told to be this run's.
        absent = [k for k in ("run", "config", "settings") if not isinstance(meta.get(k), str)]
        if absent:
            raise UsageError(f"{ckpt}: its metadata does not name the run, config and settings that wrote it (no "
                             f"{' or '.join(repr(k) for k in absent)} string there), though {out / rundir.MARKER} "
                             f"names this run (run {here}), whose checkpoints all do: it was not written by this run, "
                             "or was altered since; a checkpoint continues only the run that wrote it")
    written_by = meta.get("config")
    if isinstance(written_by, str) and written_by != cfg.name:
        # (another run's checkpoint copied in: same shapes, another learning rate or regularisation)
        raise UsageError(f"{ckpt}: written by a run of config {written_by!r}, but this run's config is {cfg.name!r}; "
                         "a checkpoint continues only the run that wrote it")
    written_in = meta.get("run")
    if "run" in meta and here is None:
        # (a folder from before run names writes checkpoints without one: this one came from a named run, or the
        # folder's run.json lost its name)
        raise UsageError(f"{ckpt}: written by a run named {written_in!r}, but {out / rundir.MARKER} names no run (a "
                         "folder from before run names, whose checkpoints name none, or a run.json that lost its "
                         "name); a checkpoint continues only the run that wrote it")
    if isinstance(written_in, str) and here is not None and written_in != here:
        # (a sibling run's checkpoint copied in: the same config and settings, another history of training)
        raise UsageError(f"{ckpt}: written by another run (run {written_in}) than the one {out / rundir.MARKER} "
                         f"names (run {here}); a checkpoint continues only the run that wrote it: copy the whole run "
                         "folder to continue that run")
    settings = meta.get("settings")
    if isinstance(settings, str) and settings != _settings_digest(cfg):
        # (config.json edited by hand since: another seed draws other data, another penalty trains another loss)
        raise UsageError(f"{ckpt}: written by a run with other settings than {out / files.CONFIG} now holds (beyond "
                         f"those --resume may change: {', '.join('.'.join(k) for k in sorted(RESUMABLE))}); "
                         "was config.json edited? A checkpoint continues only the run that wrote it")
    return state, _validate_state(state, meta, ckpt), meta


def _read_metrics(out: Path, steps: int, *, repair: bool = False, bound: int | None = None) -> list[dict]:
    """The run's metrics rows, each checked: a step past ``bound`` (default: the run's last step) is damage. On
    resume the bound is the larger of the run's last step and the last step of the run as it was saved: a killed
    run logs past its checkpoint, and the resumed one may now end earlier (see _metrics_to_continue)."""
    try:
        last = steps if bound is None else max(steps, bound)
        return files.read_metrics(out / files.METRICS, repair=repair, max_bytes=files.metrics_bound(last), max_step=last)
    except files.FileError as e:
        raise UsageError(str(e)) from None


def _saved_steps(setup: Any, cfg: Any, saved: dict | None) -> int:
    """The larger of the run's last step and that of the run as its config.json was saved (its epochs, at the
    steps per epoch of now)."""
    epochs = (saved or {}).get("train", {}).get("epochs") if isinstance((saved or {}).get("train"), dict) else None
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        return setup.steps
    return max(setup.steps, epochs * max(1, setup.steps // max(cfg.train.epochs, 1)))


def _summarised(out: Path, steps: int) -> bool:
    """Whether ``summary.json`` describes the run at its last step (a run extended and killed after its last
    checkpoint, or whose summary could not be written, has none or still the earlier, shorter run's). A summary that
    cannot be read, or is not a run's summary, was damaged by someone (it is written atomically): a one-line error
    naming it, and nothing overwrites it."""
    path = out / files.SUMMARY
    if not path.exists() and not path.is_symlink():
        return False
    try:
        summary = files.json_load(path)
    except files.FileError as e:
        raise UsageError(f"the run is complete, but {e}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("train"), dict):
        raise UsageError(f"the run is complete, but {path} is not a run's summary (an object with 'steps' and "
                         f"'train'); got {describe(summary)}: the file is damaged (move it away to have it written again)")
    return summary.get("steps") == steps and not isinstance(summary.get("steps"), bool)


def _complete(out: Path, steps: int, default_out: bool) -> str:
    try:
        summary = files.json_load(out / files.SUMMARY)
        result = f" ({files.SUMMARY}: training {_summary_line(summary.get('train', {}))})"
    except (files.FileError, TypeError, ValueError):
        result = ""
    where = "" if default_out else f" --out {out}"
    return (f"{out} is complete: {steps} of {steps} steps{result}; nothing was changed. To train further, raise "
            f"the epochs: funcgrad train --resume{where} --set train.epochs=N (more than now). To start over, "
            f"remove {out} (make clean-runs) or train into another --out.")


def _header_batch(setup: Any) -> str:
    if setup.batch_size is None:
        return " full batch"
    n = setup.train_data[0].shape[0]
    per, left = n // setup.batch_size, n % setup.batch_size
    dropped = (f"; the last {left} of {n} samples of each epoch's shuffle are left out" if left else "")
    return f" of batch {setup.batch_size} ({per} per epoch{dropped}; metrics are per minibatch)"


@dataclasses.dataclass
class _Prepared:
    """A run read and checked, before anything of it is written."""
    cfg: Any
    source: Path
    saved: dict | None  # the run's config.json as read, when resuming
    changes: list[str]
    setup: Any
    mesh: Any
    state: Any
    start: int
    complete: bool  # resumed at its last step with its summary written: nothing to do
    meta: dict = dataclasses.field(default_factory=dict)  # the resumed checkpoint's metadata


def _refuse_empty(**options: str | None) -> None:
    """An option given as an empty string (``--out ""``, e.g. from an unset shell variable) is a mistake, never
    taken for the option left out (its default)."""
    for name, value in options.items():
        if value == "":
            what = {"config": "a config file or the name of one that ships with funcgrad (leave --config out for "
                              "the default)",
                    "out": "a folder (leave --out out for runs/<name>)", "run": "a run folder"}[name]
            raise UsageError(f"--{name}: expected {what}, got an empty string")


def _quiet_libraries() -> None:
    """--quiet: the libraries' own warnings too (orbax logs through absl: "Metadata file does not exist" after a
    killed save, which the resume cleans up)."""
    if importlib.util.find_spec("absl") is not None:
        import absl.logging  # noqa: PLC0415 - only where orbax brought it

        absl.logging.set_verbosity(absl.logging.ERROR)


def cmd_train(args: argparse.Namespace) -> int:

    _refuse_empty(config=args.config, out=args.out)
    if args.quiet:
        _quiet_libraries()
    t_start = time.perf_counter()
    try:
        parallel.initialize(args.coordinator, args.num_processes, args.process_id)  # before any computation
    except parallel.ParallelError as e:
        raise UsageError(str(e)) from None
    writer = parallel.is_writer()  # only process 0 reads and writes the run folder, and prints
    out = Path(args.out) if args.out is not None else _default_out(args)
    lock, created, error, prepared = None, None, None, None
    try:
        if writer:
            lock, created = _open_folder(out, args.resume)
        prepared = _prepare(args, out, writer)
        if writer and lock is None and not prepared.complete:
            # A folder and files that can be written, but a lock file that cannot (immutable, or read-only to
            # this user): a second writer could not be kept out.
            raise UsageError(f"--resume: cannot lock the run: {out / rundir.LOCK} cannot be opened for writing, so "
                             "another train into this run could not be kept out; nothing was changed (make it "
                             "writable, or remove it if no other train is running)")
    except UsageError as e:
        error = e
    try:
        # Every process stops when one cannot go on (process 0 alone checks the folder): none is left waiting.
        if parallel.any_process(error is not None) or prepared is None:
            raise error or UsageError("process 0 refused the run; its message says why")
        if parallel.any_process(writer and prepared.complete):
            if writer:
                _sayer(args, writer)(_complete(out, prepared.setup.steps, args.out is None))
                if args.json:
                    try:
                        print(json.dumps(files.json_load(out / files.SUMMARY)))
                    except files.FileError as e:
                        raise UsageError(f"the run is complete, but {e}") from None
            return 0
        return _execute(args, out, prepared, writer, t_start)
    except BaseException:
        if lock is not None:
            lock.release()
        _remove_created(out, created)
        raise
    finally:
        if lock is not None:
            lock.release()


def _default_out(args: argparse.Namespace) -> Path:
    """``runs/<name>``, the name from ``--config`` (default configs/spiral.toml) or a ``--set name=...``; the
    other overrides are not applied here (with --resume they apply to the run's own configuration)."""
    names = [s for s in args.set or () if s.split("=", 1)[0].strip() == "name"]
    return Path("runs") / _load_config(argparse.Namespace(config=args.config, set=names))[0].name


def _remove_created(out: Path, created: Path | None) -> None:
    """Removes the folders a failed command created (``out`` up to ``created``) if it wrote nothing into them."""
    if created is None:
        return
    for folder in [out, *out.parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return


def _refuse_links(out: Path, ckpt: Path, orbax: bool, *, metrics: bool, tensorboard: bool = False) -> None:
    """The run files written in place that must not be symbolic links: the orbax folder and its step folders (orbax
    deletes old steps where it writes), the tensorboard folder a run writes events into, and, for a run about to
    append to it, metrics.jsonl. A file where either folder belongs is refused too."""
    links = [ckpt] if orbax and ckpt.is_symlink() else []
    if orbax and ckpt.is_dir() and not links:
        links = sorted(p for p in ckpt.iterdir() if p.is_symlink())
    if links:
        raise UsageError(f"{links[0]} is a symbolic link; funcgrad keeps a run's orbax checkpoints in the run folder "
                         "itself and never writes (or deletes old steps) through a link: replace it with the folder "
                         "it points to")
    board = out / files.TENSORBOARD
    if tensorboard and board.is_symlink():
        raise UsageError(f"{board} is a symbolic link; funcgrad writes a run's TensorBoard events into the run folder "
                         "itself, never through a link: replace it with the folder it points to, or remove it")
    for folder, used in ((ckpt, orbax), (board, tensorboard)):
        if used and (folder.exists() and not folder.is_dir()):
            raise UsageError(f"{folder} is not a folder; funcgrad writes the run's {folder.name} there: move it away "
                             "(nothing was changed)")
    if metrics and (out / files.METRICS).is_symlink():
        raise UsageError(f"{out / files.METRICS}: is a symbolic link; funcgrad appends to its own metrics file, "
                         "never through a link (replace the link with the file itself); nothing was changed")


def _refuse_to_replace(out: Path, resume: bool, writer: bool) -> None:
    """--resume needs a checkpoint; a new run is refused where a run's checkpoint, or a finished run's results
    without it (summary.json), would be replaced."""
    finished = (out / files.SUMMARY).exists()
    if resume and not _has_checkpoint(out):
        if finished:
            raise UsageError(f"--resume: no checkpoint in {out}, which holds a finished run's results "
                             f"({files.SUMMARY}): there is nothing to continue from; train a new run into another "
                             "folder with --out")
        raise UsageError(f"--resume: no checkpoint in {out}; train without --resume to start the run")
    if not resume and writer and _has_checkpoint(out):
        raise UsageError(f"{out} already holds a run (a checkpoint); pass --resume to continue it, or --out "
                         "to train into another folder")
    if not resume and writer and finished:  # a finished run's results, its checkpoint gone
        raise UsageError(f"{out} holds a finished run's results ({files.SUMMARY}) but no checkpoint to continue "
                         "it from; a new run there would replace them: train into another folder with --out, or "
                         "move that run away (make clean-runs removes runs/); nothing was changed")


def _prepare(args: argparse.Namespace, out: Path, writer: bool) -> _Prepared:
    """Reads and checks everything a run needs; writes nothing (a command that fails here changes nothing)."""

    _refuse_to_replace(out, args.resume, writer)
    if args.resume:
        cfg, saved, changes = _resume_config(out, args)
        source = out / files.CONFIG
    else:
        (cfg, source), saved, changes = _load_config(args), None, []
    ckpt = _checkpoint_path(out, cfg)
    if cfg.checkpoint.backend == "orbax" and (missing := _orbax_missing()):
        raise UsageError(missing)
    _refuse_links(out, ckpt, cfg.checkpoint.backend == "orbax", metrics=False)
    _check_memory(cfg, check=cfg.train.verify and not args.resume)
    try:
        setup = experiment.build(cfg)
    except fgconfig.ConfigError as e:
        raise UsageError(str(e)) from None
    try:
        mesh = parallel.setup_for(cfg.parallel.mode, setup.train_data, setup.batch_size)
    except parallel.ParallelError as e:
        raise UsageError(f"parallel.mode {cfg.parallel.mode!r}: {e}") from None

    state = fg.train.init(setup.params, setup.optimizer, jax.random.key(cfg.seed))
    start, meta = 0, dict[str, Any]()
    if args.resume:
        state, start, meta = _read_checkpoint(out, state, cfg)
        if start > setup.steps:
            raise UsageError(f"--resume: train.epochs = {cfg.train.epochs} makes {setup.steps} steps, but the "
                             f"checkpoint in {out} is already at step {start}; a run cannot go back (to end at step "
                             f"{start} or later, set train.epochs accordingly)")
    complete = False
    if writer and cfg.train.tensorboard and (missing := log.tensorboard_missing()):
        raise UsageError(missing)
    if writer:
        # (a fresh run sets an earlier attempt's metrics aside whole, whatever steps they reach)
        records = _read_metrics(out, setup.steps, bound=_saved_steps(setup, cfg, saved)) if args.resume else []
        logged = meta.get("last_logged")
        if isinstance(logged, int) and logged >= start:
            raise UsageError(f"{ckpt}: logged step {logged} before being written at step {start}; the checkpoint "
                             "is inconsistent")
        trained = log.train_rows(records)
        if args.resume and isinstance(logged, int) and trained and max(r["step"] for r in trained) < logged:
            raise UsageError(f"{out / files.METRICS} ends at step {max(r['step'] for r in trained)}, but the checkpoint "
                             f"was written after step {logged} was logged: the files are not of the same run")
        # (a --set that changes the saved config, shortening a killed extension back say, is not "nothing to do")
        complete = args.resume and start == setup.steps and not changes and _summarised(out, setup.steps)
        # (before config.json is rewritten)
        _refuse_links(out, ckpt, False, metrics=not complete, tensorboard=cfg.train.tensorboard and not complete)
        bad = [] if complete else rundir.read_only_files(out)
        if bad:
            raise UsageError(f"cannot write into the run: read-only {', '.join(bad)}; nothing was changed (make them "
                             "writable, or train into another --out)")
    return _Prepared(cfg, source, saved, changes, setup, mesh, state, start, complete, meta)


def _say_header(out: Path, p: _Prepared, fuse: int, say: Any) -> None:

    cfg, setup = p.cfg, p.setup
    say(f"funcgrad train: {cfg.name} ({p.source}) → {out}")
    say(f"  data   {cfg.data.kind} {tuple(setup.train_data[0].shape)}{' (nnfs exact)' if cfg.data.exact else ''}, "
        f"validation {tuple(setup.validation_data[0].shape)}")
    say(f"  model  {' → '.join(n for n, _ in setup.model.layers)}, {fg.nn.param_count(setup.params)} parameters")
    say(f"  train  {cfg.optimizer.kind} lr {cfg.optimizer.learning_rate} decay {cfg.optimizer.decay}, "
        f"{setup.steps} steps{_header_batch(setup)}, {parallel.describe_mesh(p.mesh)}"
        + (f"; {fuse} fused per dispatch (train.fuse {cfg.train.fuse} is capped)"
           if fuse < min(cfg.train.fuse, setup.steps) else ""))
    cluster = parallel.cluster_environment()
    if cluster:
        say(f"  joined {cluster}")
    ev = _rounded(cfg.train.eval_every, fuse)
    say(f"  log    metrics.jsonl every {cfg.train.log_every} steps (with the window's mean/min/max), validation every "
        f"{ev} steps{' (train.eval_every rounded up to a multiple of the fused steps)' if ev != cfg.train.eval_every else ''}"
        + (", TensorBoard scalars in tensorboard/" if cfg.train.tensorboard else ""))
    for change in p.changes:
        say(f"  change {change}")


def _write_start(args: argparse.Namespace, out: Path, p: _Prepared, say: Any) -> tuple[int, int]:
    """Process 0's first writes, once every check passed: the marker, the metrics to continue, the config.
    Returns the last steps already logged: of a training row, of a validation row.

    The metrics come before config.json: what they keep is judged against the run as config.json saved it (its
    length, its optimizer), so a resume killed in between finds that config.json still and judges the same way
    (written first, a shortened run's new config.json made its own older rows look damaged, and a changed learning
    rate's made the abandoned rows look like the new run's)."""
    resolved = fgconfig.to_dict(p.cfg)
    try:
        removed = rundir.remove_stale_temporaries(out)
        if removed:
            say(f"  (removed {len(removed)} temporary file(s) of killed processes: {', '.join(removed)})")
        rundir.write_marker(out)
        if args.resume:
            # (a last line cut by a kill is dropped now)
            records = _read_metrics(out, p.setup.steps, repair=True, bound=_saved_steps(p.setup, p.cfg, p.saved))
            logged = _metrics_to_continue(out, p.start, records, resolved, p.saved, say, p.setup.steps)
        else:
            kept = files.set_aside(out / files.METRICS)  # an earlier attempt that never reached a checkpoint
            if kept:
                say(f"  (the metrics of an earlier attempt here are kept as {kept})")
            logged = (-1, -1)
        if p.saved != resolved:
            files.write_json(out / files.CONFIG, resolved)
        return logged
    except OSError as e:
        raise UsageError(f"cannot write the run's files into {out}: {e.strerror or e}") from None


def _execute(args: argparse.Namespace, out: Path, p: _Prepared, writer: bool, t_start: float) -> int:
    """Writes the run's files and trains; every process runs this, only process 0 writes and prints."""

    say = _sayer(args, writer)
    fuse = fg.train.chunk_size(p.cfg.train.fuse, p.setup.steps)
    _say_header(out, p, fuse, say)
    last_logged = _write_start(args, out, p, say) if writer else (-1, -1)
    if p.cfg.train.verify and not args.resume and writer:
        report = _verify(p.setup)
        say("  check  hand-derived gradient vs JAX vs finite differences at the initial parameters:")
        say("         " + report.summary())
        if not report.ok:
            say(report)
            say("  (training continues with JAX's gradients; the hand-derived formulas above disagree with them)")
    if args.resume:
        say(f"  resume from step {p.start} ({_checkpoint_path(out, p.cfg)})")
    loop = _Loop(out, p, writer, fuse, last_logged, jax.jit(p.setup.objective.metrics),
                 last_good=p.start if args.resume else None, show_progress=not (args.quiet or args.json))
    try:
        return loop.run() or _finish(args, out, p, loop.params, loop.evaluate, writer, t_start, loop.board)
    finally:
        loop.close()


class _Loop:
    """The training loop of ``funcgrad train``: chunks of fused steps, metrics lines and checkpoints between
    them, and one decision per chunk that every process takes together (stop or go on)."""
    def __init__(self, out: Path, p: _Prepared, writer: bool, fuse: int, last_logged: tuple[int, int],
                 evaluate: Any, last_good: int | None, show_progress: bool = True):
        self.out, self.p, self.writer, self.fuse = out, p, writer, fuse
        (self.last_logged, self.last_validated), self.evaluate, self.last_good = last_logged, evaluate, last_good
        self.every = _rounded(p.cfg.train.checkpoint_every, fuse)
        self.next_checkpoint = (p.start // self.every + 1) * self.every
        self.eval_every = _rounded(p.cfg.train.eval_every, fuse)
        self.next_eval = (p.start // self.eval_every + 1) * self.eval_every
        # The window of steps since the last row: a resumed run continues the checkpoint's, unless rows were
        # written past the checkpoint (their steps are then run again, and counted afresh).
        self.window = log.Window()
        if p.meta.get("last_logged") == self.last_logged:
            self.window.restore(p.meta.get("window"), steps=p.start - self.last_logged)
        self.progress = Progress(p.setup.steps, start=p.start, enabled=writer and show_progress)
        self.board = log.TensorBoard(out / files.TENSORBOARD) if writer and p.cfg.train.tensorboard else None
        # orbax: every process writes its part of each checkpoint (made on all of them, in the same order)
        self.orbax = (checkpoint.orbax_manager(out / files.ORBAX, max_to_keep=p.cfg.checkpoint.max_to_keep)
                      if p.cfg.checkpoint.backend == "orbax" else None)
        self.params: Any = None
        self.run_name = rundir.run_id(out)  # (the marker is written before the loop starts)

    def close(self) -> None:
        """Ends the progress line, and waits for checkpoints still being written in the background."""
        self.progress.close()
        if self.board is not None:
            self.board.close()
        if self.orbax is not None:
            self.orbax.close()
            self.orbax = None

    def run(self) -> int:
        """0 when every step ran (``self.params`` then holds the result), else 1 after saying why."""
        setup = self.p.setup
        state, data, shard_batch = parallel.place(self.p.mesh, self.p.state, setup.train_data)
        final = state
        try:
            for final, m in fg.train.chunks(setup.objective.train_loss, setup.optimizer, state, data,
                                            steps=setup.steps, fuse=self.fuse, batch_size=setup.batch_size,
                                            schedule=setup.schedule, shard_batch=shard_batch):
                problem = self._chunk(final, m)
                if parallel.any_process(problem is not None):
                    return self._stop(problem)
                if _INTERRUPTED.is_set():  # a Ctrl-C that Python printed as "ignored" (see _INTERRUPTED)
                    raise KeyboardInterrupt
        finally:
            self.progress.close()  # (the bar's last line ends before any message)
        self.params = parallel.gather(final).params
        return 0

    def _chunk(self, state: Any, m: dict[str, np.ndarray]) -> str | None:
        """Logs a chunk's metrics and writes a checkpoint when one is due; why training must stop, or None."""
        cfg, setup, out = self.p.cfg, self.p.setup, self.out
        step = int(m["step"][-1]) + 1
        bad = np.nonzero(~np.isfinite(m["loss"]))[0]
        good = bad[0] if len(bad) else len(m["step"])
        new = log.chunk_rows(m, good, self.window, last_logged=self.last_logged, log_every=cfg.train.log_every,
                             last_step=setup.steps - 1)
        if not len(bad) and (step >= self.next_eval or step == setup.steps):
            self.next_eval = (step // self.eval_every + 1) * self.eval_every
            # (every process evaluates: gathering a split state is a collective)
            metrics = _floats(self.evaluate(parallel.gather(state).params, *setup.validation_data))
            if step > self.last_validated:  # an earlier attempt may have written it before being killed
                new.append(log.validation_row(step, metrics))
                self.last_validated = step
        if self.writer:
            try:
                files.append_lines(out / files.METRICS, new)
            except OSError as e:
                return f"training stopped at step {step}: cannot write {out / files.METRICS} ({e.strerror or e})"
            if self.board is not None:
                self.board.rows(new)
            self.last_logged = max([self.last_logged] + [int(r["step"]) for r in log.train_rows(new)])
        if len(bad):  # the same on every process: the metrics are replicated
            return f"training stopped at step {int(m['step'][bad[0]])}: the loss is {m['loss'][bad[0]]}"
        self.progress.update(step, {k: float(v[-1]) for k, v in m.items()})
        if step < self.next_checkpoint and step != setup.steps:
            return None
        self.next_checkpoint = (step // self.every + 1) * self.every
        snapshot = parallel.gather(state)  # a collective when the state is split: every process joins
        unfit = _unfit_for_checkpoint(snapshot, self.evaluate, setup.train_data)
        if unfit:
            return f"training stopped after step {step}: {unfit}, so it is not saved"
        meta = {"step": step, "config": cfg.name, "settings": _settings_digest(cfg), "last_logged": self.last_logged,
                "window": self.window.state(), **({"run": self.run_name} if self.run_name is not None else {})}
        try:
            if self.orbax is not None:
                self.orbax.save(step, state, meta)  # in the background; the arrays are copied first
            elif self.writer:
                files.save_checkpoint(out, snapshot, meta)
        except (OSError, checkpoint.CheckpointError) as e:
            where = _checkpoint_path(out, cfg)
            return f"training stopped at step {step}: cannot write {where} ({getattr(e, 'strerror', None) or e})"
        self.last_good = step
        return None

    def _stop(self, message: str | None) -> int:
        self.close()
        if self.writer:
            where = (f"The last good checkpoint is step {self.last_good} in {_checkpoint_path(self.out, self.p.cfg)}; lower "
                     "optimizer.learning_rate and continue from it with --resume" if self.last_good is not None
                     else "No checkpoint was written; try a lower optimizer.learning_rate")
            print(f"{message}. {where}", file=sys.stderr)
        else:
            print(f"funcgrad train: stopped with process 0 ({message or 'see its message'})", file=sys.stderr)
        return 1


def _sayer(args: argparse.Namespace, writer: bool) -> Any:
    """How ``funcgrad train`` tells what it does: printed by process 0; with ``--json`` on stderr (stdout holds
    the JSON summary alone); nothing with ``--quiet`` (errors are still printed, on stderr)."""
    if not writer or args.quiet:
        return lambda *a, **k: None
    if args.json:
        return lambda *a, **k: print(*a, **k, file=sys.stderr)
    return print


def _finish(args: argparse.Namespace, out: Path, p: _Prepared, params: Any, evaluate: Any, writer: bool,
            t_start: float, board: Any = None) -> int:
    """Final metrics, summary.json and plots; with ``--json`` the summary printed on stdout."""
    say = _sayer(args, writer)
    setup = p.setup
    train_m = _floats(evaluate(params, *setup.train_data))
    val_m = _floats(evaluate(params, *setup.validation_data))
    records = _read_metrics(out, setup.steps) if writer else []
    if writer and not any(r["step"] == setup.steps for r in log.validation_rows(records)):
        # (a run resumed at its last step, shortened to its checkpoint's: no chunk ran to write its final row)
        row = log.validation_row(setup.steps, val_m)
        try:
            files.append_lines(out / files.METRICS, [row])
            if board is not None:
                board.rows([row])
        except OSError as e:
            print(f"cannot write {out / files.METRICS}: {e.strerror or e}", file=sys.stderr)
            return 1
        records.append(row)
    wall = time.perf_counter() - t_start
    if writer and p.start == setup.steps:  # nothing trained now: the run's own wall time, if its summary has it
        with contextlib.suppress(files.FileError, TypeError, ValueError, AttributeError):
            earlier = files.json_load(out / files.SUMMARY)
            if earlier.get("steps") == setup.steps and isinstance(earlier.get("wall_seconds"), (int, float)):
                wall = float(earlier["wall_seconds"])
    say(f"  final  training:   {_summary_line(train_m)}")
    say(f"         validation: {_summary_line(val_m)}")
    if writer:
        trained = log.train_rows(records)
        summary = {
            "name": p.cfg.name, "steps": setup.steps, "train": train_m, "validation": val_m,
            "last_step": dict(trained[-1]) if trained else {},
            "wall_seconds": wall, "config": fgconfig.to_dict(p.cfg), "devices": parallel.describe_mesh(p.mesh),
            "run": str(out),
        }
        try:  # the plots first: summary.json marks the run complete, so it comes last
            _plots(out, setup, params, records, p.cfg.name)
            files.write_json(out / files.SUMMARY, summary)
        except OSError as e:
            print(f"cannot write the plots or the summary into {out}: {e.strerror or e}; the checkpoint at step "
                  f"{setup.steps} is saved (train --resume writes them)", file=sys.stderr)
            return 1
    ckpt = _checkpoint_path(out, p.cfg).name + ("/" if p.cfg.checkpoint.backend == "orbax" else "")
    say(f"  wrote  {out}/{{{files.METRICS}, {files.SUMMARY}, {ckpt}, *.png}} ({wall:.1f}s)")
    if writer and args.json:
        print(json.dumps(summary))
    return 0


def _rounded(every: int, fuse: int) -> int:
    """An interval in steps rounded up to a multiple of ``fuse``: things happen between fused chunks."""
    return math.ceil(every / fuse) * fuse


def _unfit_for_checkpoint(state: Any, evaluate: Any, data: Any) -> str | None:
    """Why a state must not be saved as a checkpoint (non-finite parameters, or a non-finite loss at them), or
    None. The loss logged at a step is that of the parameters before it; a checkpoint holds those after it,
    so its own loss is computed here."""
    for tree, root in ((state.params, "params"), (state.opt_state, "opt_state")):
        try:
            check_finite_tree(tree, root)
        except ValueError as e:
            return "non-finite values in " + str(e).splitlines()[1].strip()
    loss = float(evaluate(state.params, *data)["loss"])
    if not math.isfinite(loss):
        return f"the loss at its parameters is {loss}"
    return None


def _metrics_to_continue(out: Path, start: int, records: list[dict], resolved: dict,
                         saved: dict | None, say: Any = print, steps: int | None = None) -> tuple[int, int]:
    """The last steps already logged in ``metrics.jsonl`` (training, validation), which training continues.
    Lines past the resumed checkpoint were computed by the same steps, unless the learning rate or its decay
    changed: then the file is set aside whole (nothing saved is lost) and a copy of its lines up to the checkpoint continues."""
    path = out / files.METRICS
    changed = saved is not None and saved.get("optimizer") != resolved.get("optimizer")

    def past(r: dict, step: int) -> bool:  # a row of steps that a run ending after ``step`` steps did not take
        return r["step"] >= step if log.split_of(r) == log.TRAIN else r["step"] > step

    beyond = steps is not None and any(past(r, steps) for r in records)  # past the run's new last step
    if (changed or beyond) and any(past(r, start) for r in records):
        kept = files.keep_copy(path)  # the whole file, beside it; then the lines up to the checkpoint, atomically
        # (a training row's step is its step's index: the checkpoint after `start` steps holds steps 0..start-1; a
        # validation row's step is a count of steps)
        records = [r for r in records if not past(r, start)]
        files.write_lines(path, records)
        why = "the optimizer changed" if changed else f"the run now ends at step {steps}"
        say(f"  ({why}: metrics past step {start} are kept in {kept})")
    return (max((r["step"] for r in log.train_rows(records)), default=-1),
            max((r["step"] for r in log.validation_rows(records)), default=-1))


def _verify(setup: Any) -> Any:
    """The model's hand-derived gradient against JAX at the initial parameters."""

    obj = setup.objective
    X, y = setup.train_data
    if setup.config.model.dropout:
        key = jax.random.key(setup.config.seed)
        return verify.check_grad(lambda p, X, y, k: obj.value(p, X, y, key=k, train=True), setup.params, X, y, key,
                                 hand=lambda p, X, y, k: obj.hand_grad(p, X, y, key=k, train=True))
    return verify.check_grad(obj.value, setup.params, X, y, hand=obj.hand_grad)


def _plots(out: Path, setup: Any, params: Any, records: list[dict], name: str) -> None:


    if records:
        plots.curves(out / "curves.png", records, f"{name}: training and validation",
                     "accuracy" if setup.classification else "accuracy (the book's: share of |ŷ − y| < std(y)/250)")
    predict = jax.jit(setup.objective.predict)
    X, y = (np.asarray(a) for a in setup.train_data)
    if setup.classification and X.shape[1] == 2:
        plots.decision_boundary(out / "decision_boundary.png", lambda g: predict(params, g), X, y,
                                f"{name}: decision boundary")
    elif not setup.classification:
        plots.regression(out / "regression.png", lambda g: predict(params, g), X, y, f"{name}: fit")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Metrics of a run's latest checkpoint: on the run's own validation data by default (the numbers of
    ``summary.json`` once the run is complete), or on data drawn with ``--seed``. Reads only; changes nothing."""
    _refuse_empty(run=args.run)
    run = Path(args.run)
    if not _has_checkpoint(run) or not (run / files.CONFIG).exists():
        pid = rundir.writer_pid(run) if run.is_dir() else None
        if pid is not None:
            raise UsageError(f"--run {run}: a training process{f' (PID {pid})' if pid > 0 else ''} is writing this "
                             "run and has not written its first checkpoint yet; evaluate it once it has")
        raise UsageError(f"--run {run}: no finished or checkpointed run there (need {files.CONFIG} and a checkpoint: "
                         f"{files.CHECKPOINT} or {files.ORBAX}/)")
    try:
        cfg = _run_config(files.json_load(run / files.CONFIG, what="a JSON object (the run's configuration)"))
    except files.FileError as e:
        raise UsageError(str(e)) from None
    except fgconfig.ConfigError as e:
        raise UsageError(f"{run / files.CONFIG}: {e}") from None
    _check_memory(cfg, check=False)
    try:
        setup = experiment.build(cfg, validation_seed=args.seed)
    except fgconfig.ConfigError as e:
        raise UsageError(f"--run {run}: {e}") from None
    state = fg.train.init(setup.params, setup.optimizer, jax.random.key(cfg.seed))
    state, step, _ = _read_checkpoint(run, state, cfg)
    X, X_train = np.asarray(setup.validation_data[0]), np.asarray(setup.train_data[0])
    if X.shape == X_train.shape and np.array_equal(X, X_train):
        why = ("the run's validation data is the same draw" if args.seed is None
               else f"seed {args.seed} is the run's own seed" if args.seed == cfg.seed
               else f"the draw with seed {args.seed} is the same")
        data, label = "training", f"the training data {X.shape} ({why}; not fresh data)"
    elif args.seed is None:
        data, label = "validation", f"the run's validation data {X.shape} (drawn with the run's validation seed)"
    else:
        data, label = "fresh", f"fresh {cfg.data.kind} data {X.shape} drawn with seed {args.seed}"
    metrics = _floats(jax.jit(setup.objective.metrics)(state.params, *setup.validation_data))
    pid = rundir.writer_pid(run)
    if args.json:
        print(json.dumps({"run": str(run), "step": step, "of_steps": setup.steps, "data": data, "seed": args.seed,
                          "metrics": metrics, "training_pid": pid}))
        return 0
    print(f"funcgrad evaluate: {run} at step {step} of {setup.steps}, on {label}")
    if pid is not None:
        print(f"  (a training process{f' (PID {pid})' if pid > 0 else ''} is writing this run: this is its latest "
              "checkpoint)")
    print(f"  {data + ':':<11} {_summary_line(metrics)}")
    return 0
