"""Metrics: classification accuracy and the book's regression accuracy. Pure and shape-checked.

Example:
    >>> import jax.numpy as jnp
    >>> import funcgrad as fg
    >>> acc = fg.metrics.accuracy(jnp.array([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.02, 0.9, 0.08]]), jnp.array([0, 1, 1]))
    >>> round(float(acc), 6)
    0.666667
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from funcgrad._checks import as_array, check_labels, describe, require_float, require_ndim, require_same_shape

__all__ = ["accuracy", "binary_accuracy", "regression_accuracy"]


def accuracy(outputs: Any, labels: Any) -> jax.Array:
    """Share of samples whose highest-scoring class is the label: ``mean(argmax ŷ_i == y_i)``.

    Args:
        outputs: probabilities or logits, shape (N, C) with C >= 2.
        labels: integer class indices (N,) or one-hot rows (N, C).
    """
    outputs = as_array(outputs, "outputs")
    labels = as_array(labels, "labels")
    require_ndim(outputs, 2, "outputs", "(samples, classes)")
    if outputs.shape[1] < 2:
        raise ValueError(
            f"accuracy needs at least 2 classes; got outputs {describe(outputs)}. "
            "For a single sigmoid output use binary_accuracy."
        )
    check_labels(labels, outputs.shape[1], outputs.shape[0], "labels")
    if labels.ndim == 2:
        labels = jnp.argmax(labels, axis=1)
    return jnp.mean(jnp.argmax(outputs, axis=1) == labels)


def binary_accuracy(probs: Any, targets: Any, *, threshold: float = 0.5) -> jax.Array:
    """Share of outputs where ``(ŷ > threshold) == y`` (the book's chapter 16), over samples and outputs."""
    probs = as_array(probs, "probs")
    targets = as_array(targets, "targets")
    require_float(probs, "probs")
    require_same_shape(probs, targets, "probs", "targets")
    return jnp.mean((probs > threshold) == (targets > 0.5))


def regression_accuracy(pred: Any, target: Any, *, precision: float | None = None) -> jax.Array:
    """The book's regression accuracy (chapter 17): share of outputs with ``|ŷ − y| < precision``, where
    ``precision`` defaults to ``std(y) / 250``."""
    pred = as_array(pred, "pred")
    target = as_array(target, "target")
    require_float(pred, "pred")
    require_same_shape(pred, target, "pred", "target")
    limit = jnp.std(target) / 250 if precision is None else precision
    return jnp.mean(jnp.abs(pred - target) < limit)
