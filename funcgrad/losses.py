"""Losses and regularisation penalties: pure, shape-checked (no silent broadcasting), jit-friendly.

Each data loss averages over samples, as the book does, and has a hand-derived backward in
:mod:`funcgrad.rules` (the rule of the same name). N = number of samples, J = outputs per sample.

Inputs are checked when the function is called: shapes and dtypes always (also under ``jit``), an empty batch
is an error, and integer class labels outside [0, C) are an error when their values are known. Under ``jit``
they are not known: an out-of-range label then makes the loss NaN (never a finite wrong number), and a
function wrapped in :func:`checked` (``jax.experimental.checkify``) reports it as an error naming the range::

    err, loss = jax.jit(fg.losses.checked(fg.losses.categorical_crossentropy))(probs, labels)
    err.throw()  # raises: labels: class labels must lie in [0, 3) for 3 classes; got min 0, max 5

- :func:`categorical_crossentropy`: ``−mean log ŷ_true``, ŷ clipped to [1e-7, 1 − 1e-7] (the book's).
- :func:`categorical_crossentropy_with_logits`: the same from logits, stable (log-softmax, no clip).
- :func:`binary_crossentropy`: ``−mean[y log ŷ + (1 − y) log(1 − ŷ)]`` with the book's clip.
- :func:`mse`, :func:`mae`: ``mean (y − ŷ)²``, ``mean |y − ŷ|``.
- :func:`l1_penalty`, :func:`l2_penalty`: ``λ Σ|w|`` and ``λ Σ w²`` over chosen leaves (not divided by N).

Example:
    >>> import jax.numpy as jnp
    >>> import funcgrad as fg
    >>> probs = jnp.array([[0.7, 0.1, 0.2], [0.1, 0.5, 0.4], [0.02, 0.9, 0.08]])
    >>> round(float(fg.losses.categorical_crossentropy(probs, jnp.array([0, 1, 1]))), 4)
    0.3851
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from funcgrad import rules
from funcgrad._checks import (
    LABEL_CHECKS,
    as_array,
    check_labels,
    describe,
    is_tracer,
    require_float,
    require_ndim,
    require_same_shape,
)

__all__ = [
    "checked",
    "categorical_crossentropy",
    "categorical_crossentropy_with_logits",
    "binary_crossentropy",
    "mse",
    "mae",
    "l1_penalty",
    "l2_penalty",
    "select",
    "leaf_names",
    "LOSSES",
]

Where = str | Sequence[str] | Callable[[str, jax.Array], bool] | None


def _class_inputs(scores: Any, labels: Any, scores_name: str) -> tuple[jax.Array, jax.Array]:
    scores = as_array(scores, scores_name)
    labels = as_array(labels, "labels")
    require_float(scores, scores_name)
    require_ndim(scores, 2, scores_name, "(samples, classes)")
    n, c = scores.shape
    if n == 0:
        raise ValueError(f"{scores_name}: an empty batch {describe(scores)}; a mean over no samples is undefined")
    check_labels(labels, c, n, "labels")
    return scores, labels


def checked(fn: Callable[..., Any], errors: Any = None) -> Callable[..., Any]:
    """``fn`` functionalised by ``jax.experimental.checkify.checkify`` with funcgrad's run-time input checks
    (class labels in [0, C)) switched on: returns ``(error, value)``; ``error.throw()`` raises the first failed
    check. ``fn`` is any function that calls funcgrad's losses (a loss, an objective, a training step) and may
    be jitted around the result. ``errors``: checkify's error set (default ``checkify.user_checks``; e.g. add
    ``checkify.nan_checks``). Without it, under ``jit``, an out-of-range label only makes the loss NaN."""
    def with_checks(*args: Any, **kwargs: Any) -> Any:
        token = LABEL_CHECKS.set(True)  # while fn is traced: funcgrad's checks become checkify checks
        try:
            return fn(*args, **kwargs)
        finally:
            LABEL_CHECKS.reset(token)

    return checkify.checkify(with_checks, errors=checkify.user_checks if errors is None else errors)


def _nan_unless_in_range(loss: jax.Array, labels: jax.Array, n_classes: int) -> jax.Array:
    """Under jit, where label values are unknown when checked: NaN, never a finite wrong loss, when one is
    outside [0, C), and NaN gradients too (a factor of NaN, not a ``where``, whose gradient would be a finite 0).
    The same loss and gradients, bit for bit, when all are in range (a factor of exactly 1)."""
    if is_tracer(labels) and jnp.issubdtype(labels.dtype, jnp.integer):
        ok = jnp.all((labels >= 0) & (labels < n_classes))
        return loss * jnp.where(ok, jnp.ones((), loss.dtype), jnp.full((), jnp.nan, loss.dtype))
    return loss


def categorical_crossentropy(probs: Any, labels: Any, *, eps: float = rules.CLIP_EPS) -> jax.Array:
    """Categorical cross-entropy from probabilities: ``L = −(1/N) Σ_i log clip(ŷ_{i, y_i}, eps, 1 − eps)``.

    Args:
        probs: predicted probabilities, shape (N, C) (e.g. a softmax output).
        labels: integer class indices (N,) or one-hot rows (N, C).
        eps: the clip that keeps log finite (the book's 1e-7).
    """
    probs, labels = _class_inputs(probs, labels, "probs")
    return _nan_unless_in_range(rules.categorical_crossentropy.forward(probs, labels, eps=eps), labels, probs.shape[1])


def categorical_crossentropy_with_logits(logits: Any, labels: Any) -> jax.Array:
    """Categorical cross-entropy from logits, ``−(1/N) Σ_i log softmax(z_i)_{y_i}``, computed stably with
    log-softmax (no clip). Its gradient is the book's combined ``(ŷ − y)/N``."""
    logits, labels = _class_inputs(logits, labels, "logits")
    return _nan_unless_in_range(rules.softmax_crossentropy.forward(logits, labels), labels, logits.shape[1])


def _paired(pred: Any, target: Any, pred_name: str, target_name: str) -> tuple[jax.Array, jax.Array]:
    pred = as_array(pred, pred_name)
    target = as_array(target, target_name)
    require_float(pred, pred_name)
    require_same_shape(pred, target, pred_name, target_name)
    if pred.ndim == 0:
        raise ValueError(f"{pred_name} must have a sample axis; got a scalar {describe(pred)}")
    if pred.size == 0:
        raise ValueError(f"{pred_name}: an empty batch {describe(pred)}; a mean over no samples is undefined")
    return pred, target.astype(pred.dtype)


def binary_crossentropy(probs: Any, targets: Any, *, eps: float = rules.CLIP_EPS) -> jax.Array:
    """Binary cross-entropy, ``−mean[y log ŷ + (1 − y) log(1 − ŷ)]`` over samples and outputs, with ŷ clipped
    to [eps, 1 − eps]. ``probs`` and ``targets`` must have the same shape, e.g. (N, 1)."""
    probs, targets = _paired(probs, targets, "probs", "targets")
    return rules.binary_crossentropy.forward(probs, targets, eps=eps)


def mse(pred: Any, target: Any) -> jax.Array:
    """Mean squared error, ``mean (y − ŷ)²`` over samples and outputs (same shapes required)."""
    pred, target = _paired(pred, target, "pred", "target")
    return rules.mse.forward(pred, target)


def mae(pred: Any, target: Any) -> jax.Array:
    """Mean absolute error, ``mean |y − ŷ|`` over samples and outputs (same shapes required)."""
    pred, target = _paired(pred, target, "pred", "target")
    return rules.mae.forward(pred, target)


def _checked_inputs(loss: str, pred: Any, target: Any) -> tuple[jax.Array, jax.Array]:
    """The checks loss ``loss`` (a name of :data:`LOSSES`) runs on its inputs, for code that computes the loss's
    derivative by hand (:meth:`funcgrad.Objective.hand_grad`): the same errors for the same inputs. Returns the
    inputs as the loss uses them."""
    if loss in ("categorical_crossentropy", "categorical_crossentropy_with_logits"):
        return _class_inputs(pred, target, "logits" if loss.endswith("logits") else "probs")
    names = ("probs", "targets") if loss == "binary_crossentropy" else ("pred", "target")
    return _paired(pred, target, *names)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "categorical_crossentropy": categorical_crossentropy,
    "categorical_crossentropy_with_logits": categorical_crossentropy_with_logits,
    "binary_crossentropy": binary_crossentropy,
    "mse": mse,
    "mae": mae,
}


# ----------------------------------------------------------------------------------------------------------
# Regularisation penalties over chosen leaves.


def leaf_names(params: Any) -> list[str]:
    """Every leaf's name as a slash-joined path, e.g. ``dense1/W`` (the form ``where`` patterns match)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat]


def select(params: Any, where: Where = None) -> Any:
    """A pytree of bools like ``params``: True at the leaves that ``where`` chooses.

    ``where`` is None (every leaf), a glob pattern on slash-joined paths (``"dense1/*"``, ``"*/W"``), a list
    of patterns, or a predicate ``(name, leaf) -> bool``. A pattern that matches no leaf is an error, so a typo
    cannot silently switch regularisation off.
    """
    names = leaf_names(params)
    leaves, treedef = jax.tree.flatten(params)
    if where is None:
        chosen = [True] * len(leaves)
    elif callable(where):
        chosen = [bool(where(n, leaf)) for n, leaf in zip(names, leaves, strict=True)]
    else:
        patterns = [where] if isinstance(where, str) else list(where)
        for p in patterns:
            if not isinstance(p, str):
                raise TypeError(f"where: patterns must be strings like 'dense1/W'; got {describe(p)}")
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(f"where: pattern {p!r} matches no parameter; the parameters are {names}")
        chosen = [any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in names]
    return jax.tree.unflatten(treedef, chosen)


def _penalty(kind: rules.Rule, params: Any, scale: float, where: Where) -> jax.Array:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{kind.name}_penalty: scale must be a number >= 0, and finite; got {scale!r}")
    mask = select(params, where)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    chosen = [(jax.tree_util.keystr(path), leaf) for c, (path, leaf) in zip(jax.tree.leaves(mask), flat, strict=True)
              if c]
    for path, leaf in chosen:
        require_float(leaf, f"{kind.name}_penalty leaf {path or '(params)'}")
    # (the sum's dtype follows the chosen leaves only: an unchosen PRNG key or counter does not take part)
    total = jnp.zeros((), jnp.result_type(*(leaf for _, leaf in chosen)) if chosen else jnp.float32)
    for _, leaf in chosen:
        total = total + kind.forward(leaf, lam=scale)
    return total


def l1_penalty(params: Any, scale: float, where: Where = None) -> jax.Array:
    """``λ Σ |w|`` over the leaves chosen by ``where`` (see :func:`select`). Not divided by N (the book's)."""
    return _penalty(rules.l1, params, scale, where)


def l2_penalty(params: Any, scale: float, where: Where = None) -> jax.Array:
    """``λ Σ w²`` over the leaves chosen by ``where`` (see :func:`select`). Not divided by N (the book's)."""
    return _penalty(rules.l2, params, scale, where)
