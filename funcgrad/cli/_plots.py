"""Plots of a run, written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from funcgrad.cli import _files as files


def _pyplot():
    import matplotlib  # noqa: PLC0415 - heavy, and only the CLI's plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after the Agg backend is chosen

    return plt


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # the run folder's one pattern of temporaries
    try:
        with files.create_new(tmp) as f:
            fig.savefig(f, dpi=110, bbox_inches="tight", format=path.suffix.lstrip("."))
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in records if key in r]
    return np.array([r["step"] for r in rows], float), np.array([r[key] for r in rows], float)


def curves(path: Path, records: list[dict], title: str, accuracy_label: str = "accuracy") -> None:
    """Loss (log scale), accuracy and learning rate against the step: the training rows as a line with the band
    of each window's min..max behind it (so one spike reads as a spike, not a collapse), the validation rows
    as markers. ``records`` are metrics.jsonl's rows (``split`` train or validation)."""
    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter  # noqa: PLC0415 - with matplotlib, only here

    train = [r for r in records if r.get("split", "train") == "train"]
    val = [r for r in records if r.get("split") == "validation"]
    has_lr = any("lr" in r for r in train)
    fig, axes = plt.subplots(1, 3 if has_lr else 2, figsize=(15 if has_lr else 10.5, 4), layout="constrained")
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", accuracy_label)):
        steps, values = _series(train, key)
        m_steps, means = _series(train, f"{key}_mean")
        _, lo = _series(train, f"{key}_min")
        _, hi = _series(train, f"{key}_max")
        windowed = len(steps) > 0 and len(m_steps) == len(lo) == len(hi) == len(steps)
        if windowed:  # the line is each window's mean (a spike at a logged step does not pull it), the band min..max
            ax.fill_between(steps, lo, hi, alpha=0.25, linewidth=0, label="train: window min–max")
            ax.plot(steps, means, "-", linewidth=1.2, label="train: window mean")
        else:  # rows written before windows: the logged steps' own values
            ax.plot(steps, values, "-", linewidth=1.2, label="train")
        if key == "loss" and any(r.get("reg_loss", 0) for r in train):
            ax.plot(*_series(train, "data_loss"), "--", linewidth=1, label="train: data loss (logged step)")
        v_steps, v_values = _series(val, key)
        if len(v_steps):
            ax.plot(v_steps, v_values, "o-", markersize=3.5, linewidth=1, label="validation")
        ax.set_title(label, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)
    finite = [float(r["loss"]) for r in records if "loss" in r and np.isfinite(float(r["loss"]))]  # ("nan" as written)
    if finite and min(finite) > 0:
        axes[0].set_yscale("log")
    axes[1].set_ylim(-0.02, 1.02)
    if has_lr:
        axes[2].plot(*_series(train, "lr"), linewidth=1.2)
        axes[2].set_title("learning rate", fontsize=10)
        fmt = ScalarFormatter(useOffset=False)  # 0.0499..0.05 as themselves, not "+4.99e-2" offsets
        fmt.set_scientific(False)
        axes[2].yaxis.set_major_formatter(fmt)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def decision_boundary(path: Path, predict: Any, X: np.ndarray, y: np.ndarray, title: str, resolution: int = 300) -> None:
    """The predicted class over the plane, with the training points on top (2-D classification data)."""
    plt = _pyplot()
    lo, hi = X.min(axis=0), X.max(axis=0)
    pad = 0.1 * (hi - lo)
    gx, gy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], resolution),
                         np.linspace(lo[1] - pad[1], hi[1] + pad[1], resolution))
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(X.dtype)
    rows = resolution  # one row of the grid per call: memory bounded by the width of the model, not the grid's size
    out = np.concatenate([np.asarray(predict(grid[i : i + rows])) for i in range(0, len(grid), rows)])
    classes = (out[:, 0] > 0.5).astype(int) if out.shape[1] == 1 else out.argmax(axis=1)
    labels = y.reshape(-1).astype(int)
    n_cls = max(int(labels.max()) + 1, int(classes.max()) + 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.contourf(gx, gy, classes.reshape(gx.shape), levels=np.arange(n_cls + 1) - 0.5, cmap="brg", alpha=0.25)
    ax.scatter(X[:, 0], X[:, 1], c=labels, cmap="brg", s=12, edgecolors="k", linewidths=0.3, vmin=0, vmax=n_cls - 1)
    ax.set_title(title)
    ax.set_aspect("equal")
    _save(fig, path)
    plt.close(fig)


def regression(path: Path, predict: Any, X: np.ndarray, y: np.ndarray, title: str) -> None:
    """Predictions against targets for 1-D regression data."""
    plt = _pyplot()
    order = np.argsort(X[:, 0])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(X[order, 0], y[order, 0], label="target")
    ax.plot(X[order, 0], np.asarray(predict(X))[order, 0], "--", label="prediction")
    ax.legend()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
