"""Plots of a run, written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib  # noqa: PLC0415 - heavy, and only the CLI's plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after the Agg backend is chosen

    return plt


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # the run folder's one pattern of temporaries
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip("."))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def curves(path: Path, records: list[dict], title: str) -> None:
    """Loss (and its data/regularisation parts), accuracy and learning rate against the step."""
    plt = _pyplot()
    steps = np.array([r["step"] for r in records])
    fig, axes = plt.subplots(1, 3 if any("lr" in r for r in records) else 2, figsize=(13, 3.6))
    for key, style in (("loss", "-"), ("data_loss", "--"), ("reg_loss", ":")):
        if records and key in records[0] and (key == "loss" or any(r.get("reg_loss", 0) for r in records)):
            axes[0].plot(steps, [r[key] for r in records], style, label=key.replace("_", " "))
    axes[0].set_yscale("log")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(steps, [r.get("accuracy", np.nan) for r in records])
    axes[1].set_title("accuracy")
    axes[1].set_ylim(0, 1.02)
    if len(axes) > 2:
        axes[2].plot(steps, [r.get("lr", np.nan) for r in records])
        axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, y=1.04)
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
