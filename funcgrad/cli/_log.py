"""The rows of ``metrics.jsonl`` and their optional TensorBoard copy.

Every step's metrics are computed on the device (:func:`funcgrad.train.chunks` returns them all); a row is
written every ``train.log_every`` steps. A training row carries the step's own values and the statistics of
the *window* of steps since the previous row, so a single spike and a collapse look different:

    {"step": 200, "split": "train", "loss": 0.71, "accuracy": 0.69, "lr": 0.0499,
     "loss_mean": 0.74, "loss_min": 0.70, "loss_max": 0.93, "accuracy_mean": 0.67, ..., "window": 100}

A validation row (every ``train.eval_every`` steps, and at the last step) holds the metrics of the
parameters after ``step`` updates on the run's validation data (the parameters a training row of the same
step is computed at):

    {"step": 1000, "split": "validation", "loss": 0.52, "data_loss": 0.52, "reg_loss": 0.0, "accuracy": 0.78}

Files written before rows had a ``split`` are read as training rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

# The metrics whose window statistics a training row carries.
WINDOWED = ("loss", "accuracy")
TRAIN, VALIDATION = "train", "validation"


def split_of(record: dict) -> str:
    """A row's split: ``train`` for rows of files written before rows were marked."""
    return record.get("split", TRAIN)


def train_rows(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if split_of(r) == TRAIN]


def validation_rows(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if split_of(r) == VALIDATION]


class Window:
    """Mean, min and max of each windowed metric over the steps since the last training row."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.mins: dict[str, float] = {}
        self.maxs: dict[str, float] = {}
        self.count = 0

    def add(self, metrics: dict[str, np.ndarray], lo: int, hi: int) -> None:
        """Adds the steps at positions [lo, hi) of a chunk's metrics."""
        if hi <= lo:
            return
        for key in WINDOWED:
            if key not in metrics:
                continue
            seg = np.asarray(metrics[key][lo:hi], np.float64)
            self.sums[key] = self.sums.get(key, 0.0) + float(seg.sum())
            self.mins[key] = min(self.mins.get(key, np.inf), float(seg.min()))
            self.maxs[key] = max(self.maxs.get(key, -np.inf), float(seg.max()))
        self.count += hi - lo

    def state(self) -> dict[str, Any]:
        """The window as JSON (kept in a checkpoint's metadata, so a resumed run writes the same rows)."""
        return {"count": self.count, "sums": dict(self.sums), "mins": dict(self.mins), "maxs": dict(self.maxs)}

    def restore(self, state: Any, steps: int) -> bool:
        """Continues a window saved by :meth:`state` over at most ``steps`` steps (those since the last row); anything
        else (an older checkpoint, or statistics no such window can have: more steps, a mean outside [min, max], a
        value that is not finite) leaves it empty, and its first row then says how many steps it covers. Whether
        the window was continued."""
        try:
            count = state["count"]
            parts = [{k: float(v) for k, v in state[name].items() if k in WINDOWED} for name in ("sums", "mins", "maxs")]
        except (TypeError, KeyError, ValueError, AttributeError):
            return False
        if not (isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= steps
                and len({*map(frozenset, parts)}) == 1):
            return False
        sums, mins, maxs = parts
        for key in sums:
            lo, hi, mean = mins[key], maxs[key], sums[key] / count if count else math.nan
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi
                    and (count == 0 and not sums or lo - 1e-9 * abs(lo) <= mean <= hi + 1e-9 * abs(hi))):
                return False
        self.count, (self.sums, self.mins, self.maxs) = count, parts
        return True

    def take(self) -> dict[str, Any]:
        """The statistics so far (``window``: the number of steps), and a fresh window."""
        out: dict[str, Any] = {}
        for key in self.sums:
            out[f"{key}_mean"] = self.sums[key] / self.count
            out[f"{key}_min"], out[f"{key}_max"] = self.mins[key], self.maxs[key]
        out["window"] = self.count
        self.__init__()  # type: ignore[misc]  # reset in place
        return out


def chunk_rows(metrics: dict[str, np.ndarray], good: int, window: Window, *, last_logged: int, log_every: int,
               last_step: int) -> list[dict]:
    """The training rows of a chunk's first ``good`` steps (those with a finite loss): a row at each step that is a
    multiple of ``log_every``, and at ``last_step``; steps at or before ``last_logged`` (already written by an
    earlier attempt) are neither written nor counted in a window."""
    steps = np.asarray(metrics["step"][:good])
    fresh = np.nonzero(steps > last_logged)[0]
    if not len(fresh):
        return []
    rows, lo = [], int(fresh[0])
    for i in fresh:
        s = int(steps[i])
        if s % log_every == 0 or s == last_step:
            window.add(metrics, lo, int(i) + 1)
            lo = int(i) + 1
            point = {k: float(v[i]) for k, v in metrics.items() if k != "step"}
            rows.append({"step": s, "split": TRAIN, **point, **window.take()})
    window.add(metrics, lo, good)
    return rows


def validation_row(step: int, metrics: dict[str, float]) -> dict:
    return {"step": int(step), "split": VALIDATION, **{k: float(v) for k, v in metrics.items()}}


class TensorBoard:
    """Scalars for TensorBoard (tensorboardX's event files in ``<run>/tensorboard``): ``train/<metric>`` at
    every training row (its window mean as ``train/<metric>_mean``), ``validation/<metric>`` at every
    validation row."""

    def __init__(self, folder: Path):
        self.writer = open_tensorboard(folder)

    def rows(self, rows: Iterable[dict]) -> None:
        for row in rows:
            prefix = split_of(row)
            for key, value in row.items():
                if key in ("step", "split", "window") or key.endswith(("_min", "_max")):
                    continue
                self.writer.add_scalar(f"{prefix}/{key}", value, global_step=int(row["step"]))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_missing() -> str | None:
    """Why TensorBoard scalars cannot be written here, or None."""
    try:
        import tensorboardX  # noqa: F401, PLC0415 - an optional extra, imported only when asked for
    except ImportError:
        return ("train.tensorboard = true needs tensorboardX, which is not installed: pip install "
                "'funcgrad[tensorboard]' (or pip install tensorboardX), or set train.tensorboard = false")
    return None


def open_tensorboard(folder: Path) -> Any:
    from tensorboardX import SummaryWriter  # noqa: PLC0415 - an optional extra

    return SummaryWriter(logdir=str(folder), flush_secs=30)
