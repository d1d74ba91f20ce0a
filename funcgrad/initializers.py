"""Weight initialisers: ``init(key, shape, dtype) -> array``, pure and keyed.

For a dense weight of shape ``(n_in, n_out)``: fan_in = n_in, fan_out = n_out.

- :func:`book`: the book's ``scale · N(0, 1)`` (scale 0.01 in most chapters, 0.1 in chapter 17).
- :func:`glorot_uniform`, :func:`glorot_normal`: variance ``2 / (fan_in + fan_out)`` (Glorot & Bengio, 2010).
- :func:`he_normal`, :func:`he_uniform`: variance ``2 / fan_in`` (He et al., 2015), for ReLU layers.
  These four are JAX's own (``jax.nn.initializers``): the same distributions, the "normal" ones truncated at
  two standard deviations, and the same numbers for the same key.
- :func:`zeros`: the book's biases.

Example:
    >>> import jax
    >>> from funcgrad import initializers
    >>> initializers.book(0.01)(jax.random.key(0), (2, 3)).shape
    (2, 3)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "INITIALIZERS", "Initializer", "Normal", "book", "normal", "zeros", "glorot_uniform", "glorot_normal", "he_normal",
    "he_uniform",
]

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 1:
        raise ValueError(f"fan-based initialisers need an array of at least 1 dimension; got shape {shape}")
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def normal(stddev: float) -> Initializer:
    """``stddev · N(0, 1)``."""
    if not stddev >= 0:
        raise ValueError(f"normal: stddev must be >= 0; got {stddev!r}")

    return Normal(float(stddev))


@dataclasses.dataclass(frozen=True)
class Normal:
    """``stddev · N(0, 1)`` as a value: callable like any initializer, and its ``stddev`` is readable (so
    :class:`funcgrad.data.NNFSRandom` can draw the same weights from the book's NumPy stream)."""

    stddev: float

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return self.stddev * jax.random.normal(key, shape, dtype)


def book(scale: float = 0.01) -> Initializer:
    """The book's dense weights: ``scale · N(0, 1)`` (``0.01 * np.random.randn(n_in, n_out)``)."""
    return normal(scale)


def zeros(key, shape, dtype=jnp.float32) -> jax.Array:
    """All zeros (the book's biases). The key is accepted for a uniform signature and unused."""
    del key
    return jnp.zeros(shape, dtype)


def _variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
    """JAX's ``jax.nn.initializers.variance_scaling``, so that a name shared with ``jax.nn.initializers`` draws the
    same distribution (and, for the same key, the same numbers). A 1-D shape (which JAX refuses) takes
    fan_in = fan_out = its length."""
    jax_init = jax.nn.initializers.variance_scaling(scale, mode, distribution)  # type: ignore[arg-type]  # checked names

    def init(key, shape, dtype=jnp.float32):
        shape = tuple(shape)
        _fans(shape)  # a clear error for a 0-d shape
        if len(shape) == 1:  # JAX's formulas with fan_in = fan_out = n
            std = math.sqrt(scale / shape[0])
            if distribution == "uniform":
                return jax.random.uniform(key, shape, dtype, -math.sqrt(3) * std, math.sqrt(3) * std)
            # a standard normal truncated to [-2, 2] has standard deviation 0.8796...: rescaled to std
            return (std / 0.87962566103423978) * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)
        return jax_init(key, shape, dtype)

    return init


def glorot_uniform() -> Initializer:
    """U(−a, a) with a = √(6 / (fan_in + fan_out)): ``jax.nn.initializers.glorot_uniform``."""
    return _variance_scaling(1.0, "fan_avg", "uniform")


def glorot_normal() -> Initializer:
    """Variance 2 / (fan_in + fan_out), drawn from a normal truncated at ±2 standard deviations (and rescaled
    to keep that variance), as ``jax.nn.initializers.glorot_normal`` draws it."""
    return _variance_scaling(1.0, "fan_avg", "truncated_normal")


def he_normal() -> Initializer:
    """Variance 2 / fan_in, from a truncated normal as ``jax.nn.initializers.he_normal`` draws it."""
    return _variance_scaling(2.0, "fan_in", "truncated_normal")


def he_uniform() -> Initializer:
    """U(−a, a) with a = √(6 / fan_in): ``jax.nn.initializers.he_uniform``."""
    return _variance_scaling(2.0, "fan_in", "uniform")


# The weight initialisers a config can name (``model.init``), each called with no arguments but the book's
# scale: the one place this list lives.
INITIALIZERS: dict[str, Callable[..., Initializer]] = {
    "book": book,
    "glorot_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "he_normal": he_normal,
    "he_uniform": he_uniform,
}
