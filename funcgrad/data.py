"""The book's data sets, generated locally (no downloads): spiral, vertical and sine.

Two ways to draw them:

- From a JAX key or an int seed (default): ``spiral(100, 3, key=0)``. Deterministic, jit-free, any size.
- ``exact=True``: bit for bit what the ``nnfs`` package gives after ``nnfs.init()`` (NumPy's
  ``RandomState(seed)``, float32 normal draws, float32 storage), so readers can compare numbers with the
  book's code. :class:`NNFSRandom` continues that stream the way the book's scripts do: data first, then
  each dense layer's ``0.01·randn`` weights, then validation data.

Both return ``(X, y)`` as JAX arrays: X float32 of shape (samples·classes, 2), y int32 class labels.

Example:
    >>> import funcgrad as fg
    >>> X, y = fg.data.spiral(100, 3, key=0, exact=True)
    >>> X.shape, y.shape, X[0].tolist()
    ((300, 2), (300,), [0.0, 0.0])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad._checks import as_shape, describe, is_key

__all__ = ["spiral", "vertical", "sine", "NNFSRandom", "as_key"]


def as_key(key: Any, where: str = "key") -> jax.Array:
    """An int seed or a PRNG key -> a PRNG key."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if is_key(key):
        return key
    raise TypeError(f"{where} must be an int seed or a PRNG key from jax.random.key(seed); got {describe(key)}")


def _check_counts(samples: Any, classes: Any, where: str) -> tuple[int, int]:
    for name, value, low in (("samples", samples, 1), ("classes", classes, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{where}: {name} must be an int >= {low}; got {value!r}")
    return int(samples), int(classes)


def _labels(samples: int, classes: int) -> jax.Array:
    return jnp.repeat(jnp.arange(classes, dtype=jnp.int32), samples)


def spiral(samples: int, classes: int, key: Any = 0, *, exact: bool = False) -> tuple[jax.Array, jax.Array]:
    """Spiral arms, one per class (CS231n's, as in the book).

    For class c, ``r = linspace(0, 1, samples)``, ``t = linspace(4c, 4(c+1), samples) + 0.2·N(0, 1)``, and
    the points are ``(r·sin 2.5t, r·cos 2.5t)``. The first point of every class is exactly (0, 0).

    Args:
        samples: points per class.
        classes: number of classes (spiral arms).
        key: an int seed or a PRNG key. With ``exact=True`` an int seed for NumPy's RandomState.
        exact: reproduce the ``nnfs`` package's data bit for bit (see :class:`NNFSRandom`).
    """
    samples, classes = _check_counts(samples, classes, "spiral")
    if exact:
        X, y = NNFSRandom(_exact_seed(key, "spiral")).spiral(samples, classes)
        return jnp.asarray(X), jnp.asarray(y, jnp.int32)
    noise = jax.random.normal(as_key(key), (classes, samples), jnp.float32) * 0.2
    r = jnp.linspace(0.0, 1.0, samples, dtype=jnp.float32)
    c = jnp.arange(classes, dtype=jnp.float32)[:, None]
    t = 4 * c + 4 * r[None, :] + noise  # == linspace(4c, 4(c+1), samples) + noise
    points = jnp.stack([r[None, :] * jnp.sin(2.5 * t), r[None, :] * jnp.cos(2.5 * t)], axis=-1).reshape(-1, 2)
    return points, _labels(samples, classes)


def vertical(samples: int, classes: int, key: Any = 0, *, exact: bool = False) -> tuple[jax.Array, jax.Array]:
    """Vertical clusters: class c has ``x = 0.1·N(0, 1) + c/3``, ``y = 0.1·N(0, 1) + 0.5``."""
    samples, classes = _check_counts(samples, classes, "vertical")
    if exact:
        X, y = NNFSRandom(_exact_seed(key, "vertical")).vertical(samples, classes)
        return jnp.asarray(X), jnp.asarray(y, jnp.int32)
    noise = jax.random.normal(as_key(key), (classes, samples, 2), jnp.float32) * 0.1
    centre = jnp.stack([jnp.arange(classes, dtype=jnp.float32) / 3, jnp.full((classes,), 0.5)], axis=-1)
    return (noise + centre[:, None, :]).reshape(-1, 2), _labels(samples, classes)


def sine(samples: int = 1000, *, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The book's regression data: ``X = arange(samples)/samples`` as a column, ``y = sin(2πX)``; no randomness.

    Computed in float64 and cast to ``dtype``, as the ``nnfs`` package computes it (in float64)."""
    if not isinstance(samples, (int, np.integer)) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"sine: samples must be an int >= 1; got {samples!r}")
    X = np.arange(samples).reshape(-1, 1) / samples
    y = np.sin(2 * np.pi * X)
    return jnp.asarray(X, dtype), jnp.asarray(y, dtype)


def _exact_seed(key: Any, where: str) -> int:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    raise TypeError(f"{where}(exact=True): key must be an int seed for NumPy's RandomState; got {describe(key)}")


class NNFSRandom:
    """The ``nnfs`` package's random stream: ``nnfs.init()`` then the book's calls, in order.

    ``nnfs.init()`` seeds NumPy's global RandomState with 0 and makes ``randn`` return float32; everything
    else in a book script draws from that one stream. This class keeps the stream in a private
    ``RandomState(seed)`` (no global state), so ``NNFSRandom(0)`` followed by ``spiral(100, 3)`` then
    ``dense_params(2, 64)`` draws exactly what the book's chapter-11 script draws. Results are NumPy arrays.
    """

    def __init__(self, seed: int = 0):
        self._rs = np.random.RandomState(seed)

    def randn(self, *shape: int) -> np.ndarray:
        """``np.random.randn(*shape)`` cast to float32, as after ``nnfs.init()``."""
        return self._rs.randn(*shape).astype(np.float32)

    def _per_class(self, samples: int, classes: int, where: str, points: Any) -> tuple[np.ndarray, np.ndarray]:
        """The nnfs generators' shared loop: class by class, ``points(c)`` gives that class's rows."""
        samples, classes = _check_counts(samples, classes, where)
        X = np.zeros((samples * classes, 2), dtype=np.float32)  # nnfs.init() makes np.zeros float32
        y = np.zeros(samples * classes, dtype=np.uint8)
        for c in range(classes):
            X[samples * c : samples * (c + 1)] = points(c, samples)
            y[samples * c : samples * (c + 1)] = c
        return X, y

    def spiral(self, samples: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
        """``nnfs.datasets.spiral_data(samples, classes)``: X float32 (samples·classes, 2), y uint8."""

        def arm(c, n):
            r = np.linspace(0.0, 1, n)
            t = np.linspace(c * 4, (c + 1) * 4, n) + self.randn(n) * np.float32(0.2)
            return np.c_[r * np.sin(t * 2.5), r * np.cos(t * 2.5)]

        return self._per_class(samples, classes, "spiral", arm)

    def vertical(self, samples: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
        """``nnfs.datasets.vertical_data(samples, classes)``."""

        def cluster(c, n):
            x0 = self.randn(n) * np.float32(0.1) + c / 3  # x drawn before y, as nnfs does
            return np.c_[x0, self.randn(n) * np.float32(0.1) + 0.5]

        return self._per_class(samples, classes, "vertical", cluster)

    def dense_params(self, n_in: int, n_out: int, scale: float = 0.01) -> dict[str, np.ndarray]:
        """The book's ``Layer_Dense(n_in, n_out)``: ``W = scale·randn(n_in, n_out)`` (float32), ``b = 0``.

        The bias is returned with shape (n_out,) (funcgrad's layout) rather than the book's (1, n_out)."""
        W = np.float32(scale) * self.randn(n_in, n_out)
        return {"W": W, "b": np.zeros(n_out, dtype=np.float32)}

    def init(self, model: Any, input_shape: int | tuple[int, ...]) -> dict:
        """Params for a funcgrad model drawn the book's way: each dense layer, in order, draws
        ``scale·randn(n_in, n_out)`` weights (scale from its ``initializers.book(scale)``) and zero biases."""
        return self._init_layer(model, as_shape(input_shape, "NNFSRandom.init"))[0]

    def _init_layer(self, layer: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
        if layer.layers:
            params = {}
            for name, child in layer.layers:
                p, shape = self._init_layer(child, shape)
                if child.has_params:
                    params[name] = p
            return params, shape
        if layer.kind == "dense":
            scale = dict(layer.config).get("book_scale")
            if scale is None:
                raise ValueError(
                    "NNFSRandom.init: every dense layer must use the book's initializer "
                    "(initializers.book(scale), the default) to be drawn the book's way"
                )
            units = dict(layer.config)["units"]
            p = self.dense_params(shape[0], units, scale)
            return {k: jnp.asarray(v) for k, v in p.items()}, (units,)
        if layer.has_params:
            raise ValueError(f"NNFSRandom.init: no book initialisation for a {layer.kind} layer")
        return {}, layer.shape_fn(shape)
