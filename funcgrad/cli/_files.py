"""Files of a run: atomic writes (temporary file, fsync, rename), metrics lines, checkpoints.

Every read goes through :func:`funcgrad._io.read_regular` (re-exported here): only a regular file and only up to
a size that the file can honestly have, so a hostile file is a one-line error instead of a hang or gigabytes read.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from funcgrad import checkpoint
from funcgrad._io import FileError, read_regular

CHECKPOINT = "checkpoint.npz"
ORBAX = "orbax"  # the folder of orbax checkpoints (checkpoint.backend = "orbax")
TENSORBOARD = "tensorboard"  # TensorBoard event files (train.tensorboard = true)
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_new(tmp: Path) -> BinaryIO:
    """A new file at ``tmp``, opened for writing: never through a link, never into an existing file (whatever is at
    that name, a leftover or a planted link, is removed first; removing a link leaves its target alone)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileExistsError:
        tmp.unlink()
        fd = os.open(tmp, flags, 0o644)
    return os.fdopen(fd, "wb")


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that the file is either the old one or the new one, never a mix:
    write a temporary file in the same folder, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with create_new(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
    _fsync_dir(path.parent)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or Infinity
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(_clean(obj), indent=2) + "\n").encode())


def append_lines(path: Path, records: Iterable[dict]) -> None:
    """Appends one JSON object per line, in one write, flushed to disk. A file whose last line lacks its
    newline (a process killed between the two) gets it first, so no two records share a line. A file with other
    names too (hard links: a snapshot's, ``cp -al``, ``rsync --link-dest``) is first replaced by a copy of its own,
    so that the other names keep it as it was."""
    text = "".join(json.dumps(_clean(r)) + "\n" for r in records)
    if not text:
        return
    fd = _open_append(path)
    st = os.fstat(fd)
    if st.st_nlink > 1:
        os.close(fd)
        atomic_write(path, read_regular(path, st.st_size))
        fd = _open_append(path)
    with os.fdopen(fd, "ab+") as f:
        if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
            text = "\n" + text
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


def _open_append(path: Path) -> int:
    """``path`` opened to append: never through a symbolic link, never anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise FileError(f"{path}: cannot append to it ({'a symbolic link' if path.is_symlink() else e.strerror}); "
                        "funcgrad writes only its own run files, never through a link") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileError(f"{path}: not a regular file; funcgrad appends its metrics only to one")
    return fd


def metrics_bound(steps: int) -> int:
    """The most bytes an honest metrics.jsonl of a run of ``steps`` steps can hold: a training and a validation
    line (each under 1 KiB) per step at most, twice over; at least 1 MiB."""
    return max(1 << 20, 4 * 1024 * (int(steps) + 10))


def _max_records(max_step: int) -> int:
    """The most records an honest metrics file of a run whose last step is ``max_step`` holds: a training row per
    step and a validation row per step (rows of steps past a checkpoint are not written twice)."""
    return 2 * (int(max_step) + 10)


_NON_FINITE = ("nan", "inf", "-inf")  # how a record stores a value JSON has no number for (see _clean)


def _record_problem(record: dict, max_step: int | None) -> str | None:
    """What makes a parsed line not a record of a step (or None): a step that is not a count, or past the run's
    last (``max_step``), a split that is not a name, a value that is not a number."""
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return "is not a record of a step"
    if max_step is not None and step > max_step:
        return f"records step {step}, past the run's last step {max_step}"
    for key, value in record.items():
        if key == "split":
            if value not in ("train", "validation"):
                return f"has split {str(value)[:40]!r}, not 'train' or 'validation'"
        elif key != "step" and not (isinstance(value, (int, float)) and not isinstance(value, bool)) \
                and value not in _NON_FINITE:
            return f"has {str(key)[:40]!r} = {str(value)[:40]!r}, not a number"
    return None


def read_metrics(path: Path, *, repair: bool = False, max_bytes: int = 1 << 30,
                 max_step: int | None = None) -> list[dict]:
    """The records of a metrics file. A last line that is not JSON (cut short by a killed process, so never a
    complete record) is left out, and with ``repair`` removed from the file atomically; any other damaged line
    (not JSON, not a record: a value that is not a number, a step past ``max_step``, a step not after the last of
    its split) is an error naming the file and the line. Without ``repair`` the file is only read."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return []
    if repair and path.is_symlink():  # (a run about to append to it: checked before anything is written)
        raise FileError(f"{path}: is a symbolic link; funcgrad appends to its own metrics file, never through a link "
                        "(replace the link with the file itself)")
    try:
        lines = read_regular(path, max_bytes).decode().split("\n")
    except UnicodeDecodeError as e:
        raise FileError(f"{path}: not a text file (byte {e.start} is not UTF-8); the file is damaged") from None
    records: list[dict] = []
    last: dict = {}  # per split, the last step recorded
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise FileError(f"{path}: line {i + 1} is nested too deeply to be a record; the file is damaged") from None
        except ValueError:  # not JSON (or an integer of more digits than Python converts)
            if any(rest.strip() for rest in lines[i + 1 :]):
                raise FileError(f"{path}: line {i + 1} is not JSON; the file is damaged (move it away to continue "
                                "without its records)") from None
            if repair:
                write_lines(path, records)
            break
        problem = _record_problem(record, max_step) if isinstance(record, dict) else "is not a record of a step"
        if not problem and record["step"] <= last.get(record.get("split"), -1):  # (a run logs each step once, in order)
            problem = (f"records step {record['step']} after step {last[record.get('split')]}"
                       + (f" of split {record['split']!r}" if "split" in record else "") + ", out of order or repeated")
        if problem:
            raise FileError(f"{path}: line {i + 1} {problem} ({line[:60]!r}); the file is damaged")
        last[record.get("split")] = record["step"]
        records.append(record)
        if max_step is not None and len(records) > _max_records(max_step):
            raise FileError(f"{path}: more than {_max_records(max_step)} records (line {i + 1}) for a run of at most "
                            f"{max_step} steps; the file is damaged")
    return records


def write_lines(path: Path, records: Iterable[dict]) -> None:
    """Replaces ``path`` atomically with one JSON object per line."""
    atomic_write(path, "".join(json.dumps(_clean(r)) + "\n" for r in records).encode())


def keep_copy(path: Path) -> Path:
    """Copies ``path`` to ``<name>.<n>`` (the first n free), atomically: the original stays until replaced."""
    path = Path(path)
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.{n}")
    atomic_write(target, path.read_bytes())
    return target


def set_aside(path: Path) -> Path | None:
    """Renames an existing file to ``<name>.<n>`` (the first n free), so that nothing saved is lost."""
    path = Path(path)
    if not path.exists():
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.{n}")
    os.replace(path, target)
    _fsync_dir(path.parent)
    return target


def save_checkpoint(run_dir: Path, state: Any, meta: dict) -> None:
    atomic_write(Path(run_dir) / CHECKPOINT, checkpoint.to_bytes(state, meta))


def load_checkpoint(run_dir: Path, like: Any) -> tuple[Any, dict]:
    """The train state in ``run_dir/checkpoint.npz``, shaped like ``like``; read only if it is a regular file no
    larger than a checkpoint of ``like`` can be."""
    data = read_regular(Path(run_dir) / CHECKPOINT, checkpoint.size_bound(like))
    return checkpoint.from_bytes(data, like), checkpoint.metadata(data)


MAX_JSON_BYTES = 16 * 1024 * 1024


def json_load(path: Path, *, what: str = "a JSON object") -> Any:
    """A JSON object from a regular file; anything else (a list, a number, bytes that are not text) is an
    error naming the file."""
    try:
        obj = json.loads(read_regular(path, MAX_JSON_BYTES).decode())
    except FileError:  # (a ValueError too: not a file, cannot be opened, too large; it says so itself)
        raise
    except UnicodeDecodeError as e:
        raise FileError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None
    except ValueError as e:  # not JSON, or an integer of more digits than Python converts
        raise FileError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise FileError(f"{path}: nested too deeply to be {what}") from None
    if not isinstance(obj, dict):
        raise FileError(f"{path}: expected {what}, got a JSON {type(obj).__name__}")
    return obj
