"""The book's optimizers (chapter 10) as optax GradientTransformations, with the book's exact semantics.

Every one uses the book's inverse-time decay ``lr_t = lr / (1 + decay·t)``, t = updates already made (0 at
the first update), and ``eps = 1e-7``. Where the book ("Neural Networks from Scratch", chapter 10) differs
from optax's defaults, these follow the book:

- :func:`sgd`: with momentum μ, ``v = μ·v − lr_t·g; w += v`` (v holds learning-rate-scaled steps; optax's
  ``trace`` holds unscaled momentum, equal only at a constant learning rate).
- :func:`adagrad`: ``cache += g²; w −= lr_t·g / (√cache + eps)`` (optax starts the cache at 0.1 and puts eps
  inside the square root).
- :func:`rmsprop`: ``cache = ρ·cache + (1 − ρ)·g²; w −= lr_t·g / (√cache + eps)`` (eps outside the root).
- :func:`adam`: bias-corrected moments, ``w −= lr_t·m̂ / (√v̂ + eps)`` with eps 1e-7 (optax: 1e-8).

Any other optax GradientTransformation works with :mod:`funcgrad.train` as well.

Example:
    >>> import jax.numpy as jnp
    >>> from funcgrad import optim
    >>> tx = optim.adam(0.05, decay=5e-7)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> updates, state = tx.update({"w": jnp.array([1.0, -2.0])}, state)
    >>> [round(float(u), 4) for u in updates["w"]]
    [-0.05, 0.05]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from funcgrad._checks import in_range

__all__ = ["inverse_time_decay", "sgd", "adagrad", "rmsprop", "adam", "OPTIMIZERS", "HYPERPARAMETERS"]

BOOK_EPS = 1e-7


def _check(name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False) -> float:
    expected = in_range(value, low, high, low_open=low_open)
    if expected:
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return float(value)


def inverse_time_decay(learning_rate: float, decay: float = 0.0) -> Callable[[jax.Array], jax.Array]:
    """The book's learning-rate schedule: ``lr / (1 + decay·t)`` at update count t."""
    lr = _check("learning_rate", learning_rate, 0.0, low_open=True)
    decay = _check("decay", decay, 0.0)
    return lambda count: lr / (1.0 + decay * count)


class _BookState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # updates made so far; named as optax's states name it
    acc: Any  # the per-parameter accumulator (momentum or cache)


def _book_transform(accumulate, step, schedule) -> optax.GradientTransformation:
    def init(params):
        return _BookState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        lr = schedule(state.count)
        acc = jax.tree.map(lambda a, g: accumulate(a, g, lr), state.acc, grads)
        updates = jax.tree.map(lambda a, g: step(a, g, lr), acc, grads)
        return updates, _BookState(optax.safe_increment(state.count), acc)

    return optax.GradientTransformation(init, update)


def sgd(learning_rate: float = 1.0, *, decay: float = 0.0, momentum: float = 0.0) -> optax.GradientTransformation:
    """The book's SGD: ``w −= lr_t·g``; with momentum μ: ``v = μ·v − lr_t·g; w += v``."""
    schedule = inverse_time_decay(learning_rate, decay)
    mu = _check("momentum", momentum, 0.0, 1.0)
    if mu == 0:
        return optax.scale_by_learning_rate(schedule)
    return _book_transform(lambda v, g, lr: mu * v - lr * g, lambda v, g, lr: v, schedule)


def adagrad(learning_rate: float = 1.0, *, decay: float = 0.0, eps: float = BOOK_EPS) -> optax.GradientTransformation:
    """The book's Adagrad: ``cache += g²; w −= lr_t·g / (√cache + eps)``."""
    schedule = inverse_time_decay(learning_rate, decay)
    eps = _check("eps", eps, 0.0, low_open=True)
    return _book_transform(lambda c, g, lr: c + g * g, lambda c, g, lr: -lr * g / (jnp.sqrt(c) + eps), schedule)


def rmsprop(
    learning_rate: float = 0.001, *, decay: float = 0.0, rho: float = 0.9, eps: float = BOOK_EPS
) -> optax.GradientTransformation:
    """The book's RMSprop: ``cache = ρ·cache + (1 − ρ)·g²; w −= lr_t·g / (√cache + eps)``."""
    schedule = inverse_time_decay(learning_rate, decay)
    rho = _check("rho", rho, 0.0, 1.0)
    eps = _check("eps", eps, 0.0, low_open=True)
    return optax.chain(
        optax.scale_by_rms(decay=rho, eps=eps, initial_scale=0.0, eps_in_sqrt=False),
        optax.scale_by_learning_rate(schedule),
    )


def adam(
    learning_rate: float = 0.001,
    *,
    decay: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = BOOK_EPS,
) -> optax.GradientTransformation:
    """The book's Adam: ``m = β1·m + (1 − β1)·g; v = β2·v + (1 − β2)·g²; m̂ = m/(1 − β1^(t+1));
    v̂ = v/(1 − β2^(t+1)); w −= lr_t·m̂ / (√v̂ + eps)``."""
    schedule = inverse_time_decay(learning_rate, decay)
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
