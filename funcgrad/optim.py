"""The book's optimizers (chapter 10) as optax GradientTransformations, built from optax's own parts.

Every one takes an ``optax.ScalarOrSchedule`` learning rate: a number, or a schedule ``count -> lr`` such as
``optax.linear_schedule(...)``, and works inside ``optax.inject_hyperparams`` (which passes hyperparameters as
arrays). Only Python/NumPy numbers are range-checked when the optimizer is built; arrays are taken as given
(they may be traced). ``decay`` applies the book's inverse-time decay on top (:func:`inverse_time_decay`:
``lr_t = lr / (1 + decay·t)``, t = updates already made, 0 at the first update), and ``eps = 1e-7``. Where the
book ("Neural Networks from Scratch", chapter 10) differs from optax's defaults, these follow the book:

- :func:`sgd`: with momentum μ, ``v = μ·v − lr_t·g; w += v``: exactly
  ``optax.chain(optax.scale_by_learning_rate(lr_t), optax.trace(decay=μ))``, since v holds learning-rate-scaled
  steps (``optax.sgd(lr, momentum)`` traces unscaled gradients; equal only at a constant learning rate).
- :func:`adagrad`: ``cache += g²; w −= lr_t·g / (√cache + eps)``. The one custom transformation here
  (:func:`scale_by_book_adagrad`): optax's ``scale_by_rss`` puts eps inside the square root and starts the
  cache at 0.1.
- :func:`rmsprop`: ``cache = ρ·cache + (1 − ρ)·g²; w −= lr_t·g / (√cache + eps)``:
  ``optax.scale_by_rms(decay=ρ, eps=eps, initial_scale=0, eps_in_sqrt=False)``.
- :func:`adam`: bias-corrected moments, ``w −= lr_t·m̂ / (√v̂ + eps)``: ``optax.scale_by_adam`` with the book's
  eps 1e-7 (optax's default: 1e-8).

Any other optax GradientTransformation works with :mod:`funcgrad.train` as well.

Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from funcgrad import optim
    >>> tx = optim.adam(0.05, decay=5e-7)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> updates, state = tx.update({"w": jnp.array([1.0, -2.0])}, state)
    >>> [round(float(u), 4) for u in updates["w"]]
    [-0.05, 0.05]
    >>> tx = optax.inject_hyperparams(optim.adam)(learning_rate=optax.linear_schedule(0.05, 0.0, 100))
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> round(float(state.hyperparams["learning_rate"]), 4)
    0.05
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from funcgrad._checks import describe, in_range, is_tracer

__all__ = ["inverse_time_decay", "sgd", "adagrad", "rmsprop", "adam", "scale_by_book_adagrad", "OPTIMIZERS",
           "HYPERPARAMETERS"]

BOOK_EPS = 1e-7


def _check(name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False) -> Any:
    """A hyperparameter: a Python/NumPy number is range-checked; a JAX array (``inject_hyperparams`` passes
    arrays, traced under jit) is taken as given when it is a floating or integer scalar."""
    if isinstance(value, (jax.Array, np.ndarray)) or is_tracer(value):
        if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.number):
            raise ValueError(f"{name} must be a number or a scalar array; got {describe(value)}")
        if not is_tracer(value):
            expected = in_range(np.asarray(value).item(), low, high, low_open=low_open)
            if expected:
                raise ValueError(f"{name} must be {expected}; got {np.asarray(value).item()!r}")
        return value
    expected = in_range(value, low, high, low_open=low_open)
    if expected:
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return float(value)


def _learning_rate(learning_rate: Any) -> Any:
    """A learning rate as optax takes it (``optax.ScalarOrSchedule``): a number > 0 or a schedule."""
    if callable(learning_rate):
        return learning_rate
    try:
        return _check("learning_rate", learning_rate, 0.0, low_open=True)
    except ValueError as e:
        if isinstance(learning_rate, (int, float, np.number, jax.Array, np.ndarray)) or is_tracer(learning_rate):
            raise
        raise ValueError(f"{e} (or a schedule: a callable count -> learning rate, e.g. optax.linear_schedule)") \
            from None


def inverse_time_decay(learning_rate: optax.ScalarOrSchedule, decay: float = 0.0) -> optax.Schedule:
    """The book's learning-rate schedule: ``lr / (1 + decay·t)`` at update count t, a plain optax schedule
    (``count -> lr``). ``learning_rate`` may itself be a schedule; it is then divided by ``1 + decay·t``.

    Example:
        >>> from funcgrad import optim
        >>> s = optim.inverse_time_decay(1.0, decay=0.1)
        >>> [round(float(s(t)), 4) for t in (0, 1, 10)]
        [1.0, 0.9091, 0.5]
    """
    lr = _learning_rate(learning_rate)
    decay = _check("decay", decay, 0.0)
    if callable(lr):
        return lambda count: lr(count) / (1.0 + decay * count)
    return lambda count: lr / (1.0 + decay * count)


def _schedule(learning_rate: Any, decay: Any) -> optax.ScalarOrSchedule:
    """The learning rate an optimizer applies: the given one when there is no decay (a number stays a number,
    as optax's own optimizers keep it), else the book's inverse-time decay of it."""
    lr = _learning_rate(learning_rate)
    if _is_zero(decay):
        return lr
    return inverse_time_decay(lr, decay)


def _is_zero(value: Any) -> bool:
    """True for a Python/NumPy number equal to 0. An array (as ``inject_hyperparams`` passes every numeric
    hyperparameter, traced inside jit) is never "zero": the transformation's structure must not depend on
    values, or the state made by ``init`` would not fit the one ``update`` expects."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and value == 0


class BookAdagradState(NamedTuple):
    """The sum of squared gradients, started at 0 (optax's ``scale_by_rss`` starts it at 0.1)."""

    sum_of_squares: Any


def scale_by_book_adagrad(eps: float = BOOK_EPS) -> optax.GradientTransformation:
    """The book's Adagrad scaling: ``cache += g²; u = g / (√cache + eps)``.

    Custom because optax's ``scale_by_rss`` computes ``g / √(cache + eps)`` (eps inside the square root) from a
    cache started at 0.1, which moves the first steps far from the book's (a first step of size ``lr·g/(|g|+eps)``
    ≈ lr in the book).
    """
    eps = _check("eps", eps, 0.0, low_open=True)

    def init(params):
        return BookAdagradState(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        cache = jax.tree.map(lambda c, g: c + g * g, state.sum_of_squares, updates)
        updates = jax.tree.map(lambda g, c: g / (jnp.sqrt(c) + eps), updates, cache)
        return updates, BookAdagradState(cache)

    return optax.GradientTransformation(init, update)


def sgd(learning_rate: optax.ScalarOrSchedule = 1.0, *, decay: float = 0.0,
        momentum: float = 0.0) -> optax.GradientTransformation:
    """The book's SGD: ``w −= lr_t·g``; with momentum μ: ``v = μ·v − lr_t·g; w += v``, i.e.
    ``optax.chain(optax.scale_by_learning_rate(lr_t), optax.trace(decay=μ))``."""
    schedule = _schedule(learning_rate, decay)
    mu = _check("momentum", momentum, 0.0, 1.0)
    if _is_zero(momentum):
        return optax.scale_by_learning_rate(schedule)
    return optax.chain(optax.scale_by_learning_rate(schedule), optax.trace(decay=mu))


def adagrad(learning_rate: optax.ScalarOrSchedule = 1.0, *, decay: float = 0.0,
            eps: float = BOOK_EPS) -> optax.GradientTransformation:
    """The book's Adagrad: ``cache += g²; w −= lr_t·g / (√cache + eps)`` (see :func:`scale_by_book_adagrad`)."""
    schedule = _schedule(learning_rate, decay)
    return optax.chain(scale_by_book_adagrad(eps), optax.scale_by_learning_rate(schedule))


def rmsprop(
    learning_rate: optax.ScalarOrSchedule = 0.001, *, decay: float = 0.0, rho: float = 0.9, eps: float = BOOK_EPS
) -> optax.GradientTransformation:
    """The book's RMSprop: ``cache = ρ·cache + (1 − ρ)·g²; w −= lr_t·g / (√cache + eps)``."""
    schedule = _schedule(learning_rate, decay)
    rho = _check("rho", rho, 0.0, 1.0)
    eps = _check("eps", eps, 0.0, low_open=True)
    return optax.chain(
        optax.scale_by_rms(decay=rho, eps=eps, initial_scale=0.0, eps_in_sqrt=False),
        optax.scale_by_learning_rate(schedule),
    )


def adam(
    learning_rate: optax.ScalarOrSchedule = 0.001,
    *,
    decay: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = BOOK_EPS,
) -> optax.GradientTransformation:
    """The book's Adam: ``m = β1·m + (1 − β1)·g; v = β2·v + (1 − β2)·g²; m̂ = m/(1 − β1^(t+1));
    v̂ = v/(1 − β2^(t+1)); w −= lr_t·m̂ / (√v̂ + eps)``."""
    schedule = _schedule(learning_rate, decay)
    b1 = _check("beta1", beta1, 0.0, 1.0)
    b2 = _check("beta2", beta2, 0.0, 1.0)
    eps = _check("eps", eps, 0.0, low_open=True)
    return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.scale_by_learning_rate(schedule))


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": sgd,
    "adagrad": adagrad,
    "rmsprop": rmsprop,
    "adam": adam,
}

# Each optimizer's hyperparameters, in order, read from its signature: the learning rate, then its keywords.
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    name: tuple(p.name for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    for name, fn in OPTIMIZERS.items()
}
