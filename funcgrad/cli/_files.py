"""Files of a run: atomic writes (temporary file, fsync, rename), metrics lines, checkpoints."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from funcgrad import checkpoint

CHECKPOINT = "checkpoint.npz"
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


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that the file is either the old one or the new one, never a mix:
    write a temporary file in the same folder, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
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
    newline (a process killed between the two) gets it first, so no two records share a line."""
    text = "".join(json.dumps(_clean(r)) + "\n" for r in records)
    if not text:
        return
    with open(path, "ab+") as f:
        if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
            text = "\n" + text
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file. Only a last line that is not JSON (cut short by a killed process, so
    never a complete record) is dropped, and removed from the file atomically."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i + 1 :]):
                raise ValueError(f"{path}: line {i + 1} is not JSON; the file is damaged") from None
            atomic_write(path, "".join(line + "\n" for line in lines[:i] if line.strip()).encode())
    return records


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
    data = (Path(run_dir) / CHECKPOINT).read_bytes()
    return checkpoint.from_bytes(data, like), checkpoint.metadata(data)


def json_load(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
