"""A run assembled from a :class:`funcgrad.config.Config`: data, model, objective, optimizer and initial
parameters (:func:`build` returns a :class:`Setup`). The config module is the schema and its validation;
this one turns a valid config into the pure functions and arrays a training run needs.

Example:
    >>> from funcgrad import config, experiment
    >>> setup = experiment.build(config.loads('name = "demo"', overrides=["train.epochs=5"]))
    >>> setup.steps, setup.train_data[0].shape
    (5, (300, 2))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from funcgrad import data as fgdata
from funcgrad import initializers, losses, nn, optim
from funcgrad.config import CLASSIFICATION, INPUT_SIZE, OPTIMIZER_KEYS, Config, ConfigError
from funcgrad.objective import Objective

__all__ = ["Setup", "build"]



@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a training run needs, built from a Config."""

    config: Config
    model: Any
    objective: Any
    optimizer: Any
    schedule: Callable[[jax.Array], jax.Array]
    params: Any
    train_data: tuple[jax.Array, jax.Array]
    validation_data: tuple[jax.Array, jax.Array]
    input_shape: tuple[int, ...]
    steps: int
    batch_size: int | None

    @property
    def classification(self) -> bool:
        return self.config.data.kind in CLASSIFICATION


def build(cfg: Config, *, validation_seed: int | None = None) -> Setup:
    """Data, model, objective, optimizer and initial parameters for ``cfg``.

    With ``data.exact`` the training data, then the weights, then the validation data come from the
    ``nnfs`` package's NumPy stream in the book's order; otherwise from JAX keys derived from ``seed``
    (validation data from a different key, or from ``validation_seed``)."""
    d, m = cfg.data, cfg.model
    w_init = initializers.book(m.init_scale) if m.init == "book" else initializers.INITIALIZERS[m.init]()
    model = nn.mlp(list(m.sizes), activation=m.activation, output=None if m.output == "none" else m.output,
                   dropout=m.dropout or None, W_init=w_init)
    objective = Objective(model, cfg.loss.kind, l1=cfg.loss.l1 or None, l2=cfg.loss.l2 or None)
    o = cfg.optimizer
    kwargs = {k: getattr(o, k) for k in OPTIMIZER_KEYS[o.kind]}
    optimizer = optim.OPTIMIZERS[o.kind](**kwargs)
    schedule = optim.inverse_time_decay(o.learning_rate, o.decay)
    n_val = d.validation_samples or d.samples

    def draw(kind, samples, source):
        if kind == "sine":
            return fgdata.sine(samples)
        fn = source.spiral if kind == "spiral" else source.vertical
        X, y = fn(samples, d.classes)
        return jnp.asarray(X), jnp.asarray(y, jnp.int32)

    input_shape = (INPUT_SIZE.get(d.kind, 2),)
    if d.kind == "fashion_mnist":
        train, val = _read_fashion_mnist(d.path)
        params = model.init(jax.random.key(cfg.seed), input_shape)
        if cfg.train.batch_size is not None and cfg.train.batch_size > train[0].shape[0]:
            raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is more than the {train[0].shape[0]} "
                              f"training samples in {d.path}")
    elif d.exact:
        stream = fgdata.NNFSRandom(cfg.seed)
        train = draw(d.kind, d.samples, stream)
        params = stream.init(model, input_shape)
        if validation_seed is not None:
            stream = fgdata.NNFSRandom(validation_seed)
        val = draw(d.kind, n_val, stream)
    else:
        train = draw(d.kind, d.samples, _KeyedSource(cfg.seed))
        params = model.init(jax.random.key(cfg.seed), input_shape)
        val = draw(d.kind, n_val, _KeyedSource(validation_seed if validation_seed is not None else cfg.seed + 10_000))
    for name, table in (("l1", cfg.loss.l1), ("l2", cfg.loss.l2)):
        for pattern in table:
            try:
                losses.select(params, pattern)
            except ValueError as e:
                raise ConfigError(f"loss.{name}.{pattern}: {e}") from None
    if cfg.loss.kind == "binary_crossentropy":
        train = (train[0], train[1].reshape(-1, 1))
        val = (val[0], val[1].reshape(-1, 1))
    n = train[0].shape[0]
    per_epoch = 1 if cfg.train.batch_size is None else n // cfg.train.batch_size
    return Setup(cfg, model, objective, optimizer, schedule, params, train, val, input_shape,
                 cfg.train.epochs * per_epoch, cfg.train.batch_size)


def _read_fashion_mnist(path: str) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """The training and test splits (the book validates on the test split), preprocessed as the book does; a
    missing or damaged file is a ConfigError naming it."""
    try:
        return fgdata.fashion_mnist(path, "train"), fgdata.fashion_mnist(path, "test")
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"data.path: {e}") from None


class _KeyedSource:
    """spiral/vertical drawn from JAX keys, with NNFSRandom's method names."""

    def __init__(self, seed: int):
        self.seed = seed

    def spiral(self, samples, classes):
        return fgdata.spiral(samples, classes, key=self.seed)

    def vertical(self, samples, classes):
        return fgdata.vertical(samples, classes, key=self.seed)
