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
    """Appends one JSON object per line, in one write, flushed to disk."""
    text = "".join(json.dumps(_clean(r)) + "\n" for r in records)
    if not text:
        return
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict]:
    """The complete lines of a metrics file; a last line cut short by a killed process is dropped (and
    removed from the file, atomically, so that later lines start on a line of their own)."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    records, good = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            good.append(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1 :]):
                raise ValueError(f"{path}: line {i + 1} is not JSON; the file is damaged") from None
            atomic_write(path, "".join(g + "\n" for g in good).encode())  # only a cut-off last line
            break
    return records


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
