"""Training over pure functions: a pytree train state and jit-compiled steps with optax.

- :class:`TrainState`: params, optimizer state, step count and a base PRNG key; a pytree.
- :func:`make_step`: a compiled pure step ``(state, data) -> (state, metrics)``: loss and gradient from
  `jax.value_and_grad`, the optax update applied, the state's buffers donated.
- :func:`make_steps`: K steps fused into one dispatch with a `jax.lax` loop (the book trains full-batch for
  10001 epochs; one Python dispatch per step would dominate). Steps at or past ``until`` are not run, so one
  compiled program serves every chunk, the last one included.
- :func:`make_eval`, :func:`fit`, :func:`chunks`.

Randomness is a function of the step: with ``k_data, k_model = split(state.key)``, step t's dropout key is
``fold_in(k_model, t)`` and, with a batch size, epoch e's order of the data is the permutation drawn from
``fold_in(k_data, e)``. Results therefore do not depend on how steps are fused or on where a run was
interrupted and resumed.

Nothing here is device-specific: the same code runs on CPU, GPU and TPU.

Example:
    >>> import jax
    >>> import funcgrad as fg
    >>> X, y = fg.data.spiral(100, 3, key=0)
    >>> model = fg.nn.mlp([64, 3], output="softmax")
    >>> obj = fg.Objective(model, "categorical_crossentropy")
    >>> tx = fg.optim.adam(0.05, decay=5e-7)
    >>> state = fg.train.init(model.init(jax.random.key(0), (2,)), tx, jax.random.key(1))
    >>> state, history = fg.train.fit(obj.train_loss, tx, state, (X, y), steps=200, fuse=100)
    >>> int(state.step), history["loss"].shape
    (200, (200,))
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from funcgrad._checks import describe, is_key, to_host

__all__ = ["TrainState", "Metrics", "init", "make_step", "make_steps", "make_eval", "fit", "chunks", "chunk_size",
           "batch_indices", "MAX_FUSE"]

# The most steps fused into one dispatch. Beyond a few hundred the dispatch cost is already negligible; the
# cap bounds the per-chunk metrics buffer (steps × metrics floats) whatever ``fuse`` is asked for.
MAX_FUSE = 1 << 16

LossFn = Callable[..., Any]  # (params, x, y, key) or (params, x, y) -> loss or (loss, metrics dict)


class TrainState(NamedTuple):
    """Everything a training run carries from step to step. A pytree: it can be jitted, scanned, sharded
    and checkpointed as a whole."""

    params: Any
    opt_state: Any
    step: jax.Array  # updates made so far (int32 scalar)
    key: jax.Array  # base PRNG key; step t derives its keys from (key, t)


@jax.tree_util.register_pytree_node_class
class Metrics(Mapping):
    """A step's metrics (loss, accuracy, lr, ...) as one float32 array on the device (``table``), read by name.

    Returning one array instead of a dict of scalars keeps a step's dispatch as cheap as a hand-written one;
    ``metrics["loss"]`` indexes it when read, and :meth:`numpy` fetches everything at once. For fused steps
    each metric has a leading axis of steps, and ``metrics["step"]`` gives each row's step number (-1 for
    steps not run). A pytree, so it can be returned from jitted functions and passed to ``jax.device_get``.
    """

    def __init__(self, names: tuple[str, ...], values: Any, steps: Any = None):
        self.names, self.table, self.steps = tuple(names), values, steps

    @classmethod
    def stack(cls, metrics: dict[str, jax.Array]) -> Metrics:
        names = tuple(metrics)
        return cls(names, jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in names], axis=-1))

    def tree_flatten(self):
        return (self.table, self.steps), self.names

    @classmethod
    def tree_unflatten(cls, names, children):
        return cls(names, *children)

    def __getitem__(self, key: str) -> Any:
        if key == "step" and self.steps is not None:
            return self.steps
        try:
            return self.table[..., self.names.index(key)]
        except ValueError:
            raise KeyError(f"no metric {key!r}; the metrics are {list(self)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(("step",) + self.names if self.steps is not None else self.names)

    def __len__(self) -> int:
        return len(self.names) + (self.steps is not None)

    def numpy(self) -> dict[str, np.ndarray]:
        """Every metric as a NumPy array, fetched in one transfer."""
        values, steps = (to_host(self.table), None if self.steps is None else to_host(self.steps))
        out = {} if steps is None else {"step": np.asarray(steps)}
        out.update({k: np.asarray(values)[..., i] for i, k in enumerate(self.names)})
        return out

    def __repr__(self) -> str:
        return f"Metrics({', '.join(self)})"


def init(params: Any, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """The state before the first step. The params are copied: steps donate the state's buffers, and the
    caller's arrays stay usable."""
    _check_optimizer("init", optimizer)
    if not is_key(key):
        raise TypeError(f"init: key must be a PRNG key from jax.random.key(seed); got {describe(key)}")
    _check_params(params)
    params = jax.tree.map(jnp.copy, params)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jnp.copy(key))


def _check_optimizer(who: str, optimizer: Any) -> None:
    """An optax GradientTransformation, with the remedy for the usual near misses."""
    if isinstance(optimizer, optax.GradientTransformation):
        return
    hint = ""
    if hasattr(optimizer, "gradient_transformation"):  # optax.MultiSteps
        hint = "; pass optimizer.gradient_transformation()"
    elif callable(optimizer):  # optax.adam itself, not optax.adam(1e-3)
        hint = "; call it with its hyperparameters first (optax.adam(1e-3), not optax.adam)"
    raise TypeError(f"{who}: optimizer must be an optax GradientTransformation; got {describe(optimizer)}{hint}")


def _check_params(params: Any, who: str = "init") -> None:
    """Every leaf of params is trained (differentiated), so each must be a floating-point array or number."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, jax.core.Tracer))
        if not array or is_key(leaf) or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"{who}: params leaf {jax.tree_util.keystr(path) or '(params)'} is {describe(leaf)}: every leaf of params "
                "is trained (differentiated), so each must be a floating-point array; keep counters, PRNG keys, "
                "functions and other state out of params (e.g. nnx.split(model, nnx.Param, ...), "
                "eqx.partition(model, eqx.is_inexact_array)) and close over them in the loss")


def _check_data(data: Any, batch_size: int | None) -> int:
    if not isinstance(data, (tuple, list)):
        raise TypeError(f"data must be a tuple of arrays, passed as loss_fn(params, *data), e.g. (X, y); got "
                        f"{describe(data)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))):
        raise TypeError(f"batch_size must be an int or None; got {describe(batch_size)}")
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data must be a pytree of arrays with a leading sample axis, e.g. (X, y); got no arrays")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = [describe(leaf) for leaf in leaves]
        raise ValueError(f"data arrays must share their leading (sample) axis; got {shapes}")
    n = sizes.pop()
    assert n is not None  # excluded above
    if n == 0:
        raise ValueError(f"data has no samples (leading axis of size 0): {[describe(leaf) for leaf in leaves]}")
    if batch_size is not None and (n is None or not 1 <= batch_size <= n):
        raise ValueError(f"batch_size must lie in [1, {n}] for {n} samples; got {batch_size}")
    return n


def batch_indices(key: jax.Array, step: jax.Array, n: int, batch_size: int) -> jax.Array:
    """The sample indices of step ``step``'s minibatch: epoch e = step // (n // batch_size) visits the samples
    in the order of a permutation drawn from ``fold_in(key, e)``; the last incomplete batch is dropped."""
    per_epoch = n // batch_size
    epoch, pos = step // per_epoch, step % per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    return jax.lax.dynamic_slice_in_dim(perm, pos * batch_size, batch_size)


_RESERVED = ("loss", "step", "lr")  # metric names the training loop writes itself


def _normalise(out: Any) -> tuple[jax.Array, dict]:
    """``loss`` or ``(loss, metrics)`` as returned by a loss function, checked: a scalar loss, a dict of scalar
    metrics whose names are not the loop's own."""
    paired = isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)
    loss, metrics = out if paired else (out, {})
    if isinstance(out, tuple) and not paired:
        raise TypeError(f"loss_fn must return a scalar loss, or (loss, metrics) with metrics a dict of scalars; got a "
                        f"tuple ({', '.join(describe(x) for x in out)})")
    if not hasattr(loss, "shape") and not isinstance(loss, (int, float)) or jnp.shape(loss) != ():
        raise TypeError(f"loss_fn must return a scalar loss; got {describe(loss)}")
    for name, value in metrics.items():
        if name in _RESERVED:
            raise ValueError(f"loss_fn's metrics may not be named {name!r}: the training loop records "
                             f"{', '.join(map(repr, _RESERVED))} itself; rename it")
        if not isinstance(value, (int, float, np.number, np.bool_, np.ndarray, jax.Array)) or jnp.shape(value) != () \
                or not jnp.issubdtype(jnp.result_type(value), jnp.number) and jnp.result_type(value) != jnp.bool_:
            raise TypeError(f"loss_fn's metric {name!r} must be a scalar number; got {describe(value)}"
                            + (" (a model's updated state, such as batch_stats, is not a metric: return it from a "
                               "step of your own)" if isinstance(value, dict) else ""))
    return loss, metrics


def _default_not_key(sig: inspect.Signature, bound: inspect.BoundArguments) -> bool:
    """Whether the parameter a key would bind to has a default and a name that is not a key's (``l2=0.0``,
    ``train=False``, ``sample_weight=None``): a hyperparameter with a default, which the step must not fill with its
    PRNG key (``key=None``, ``dropout_rng=None`` and ``k=None`` still get it)."""
    name = list(bound.arguments)[-1]
    param = sig.parameters[name]
    keyish = any(k in name.lower() for k in ("key", "rng")) or name == "k"
    return (param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
            and param.default is not param.empty and not keyish)


def _takes_key(loss_fn: Callable, n_data: int) -> bool:
    """Whether ``loss_fn`` is called as ``loss_fn(params, *data, key)`` (True) or ``loss_fn(params, *data)``
    (False), read from its signature (a parameter in the key's place with a default, not named like a key, is a
    hyperparameter: False); a clear TypeError when it takes neither."""
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # no signature to read (a builtin, some C wrappers): the documented form
        return True
    dummy = [None] * (n_data + 1)
    for with_key in (True, False):
        try:
            bound = sig.bind(*dummy, *([None] if with_key else []))
        except TypeError:
            continue
        if with_key and _default_not_key(sig, bound):
            with contextlib.suppress(TypeError):  # loss(params, x, y, l2=0.0): l2 is not a key
                sig.bind(*dummy)
                return False
        return with_key
    name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    raise TypeError(
        f"loss_fn {name}{sig} cannot be called with this data: training calls loss_fn(params, *data, key) or, "
        f"when it takes no key, loss_fn(params, *data); the data has {n_data} array(s), so loss_fn must take "
        f"{n_data + 2} or {n_data + 1} positional arguments")


def _step_fn(loss_fn, optimizer, batch_size, schedule, shard_batch):
    def one_step(state: TrainState, data: Any) -> tuple[TrainState, Metrics]:
        n = jax.tree.leaves(data)[0].shape[0]
        k_data, k_model = jax.random.split(state.key)
        if batch_size is not None and batch_size < n:
            idx = batch_indices(k_data, state.step, n, batch_size)
            data = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
        if shard_batch is not None:
            data = shard_batch(data)
        key = jax.random.fold_in(k_model, state.step)
        extra = (key,) if _takes_key(loss_fn, len(data)) else ()

        def objective(params):
            return _normalise(loss_fn(params, *data, *extra))

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **aux}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(params, opt_state, state.step + 1, state.key), Metrics.stack(metrics)

    return one_step


def make_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int | None = None,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    donate: bool = True,
    shard_batch: Callable[[Any], Any] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """A compiled training step ``(state, data) -> (state, metrics)`` (:class:`Metrics`: ``metrics["loss"]``).

    Args:
        loss_fn: ``loss_fn(params, *data, key) -> loss`` or ``(loss, metrics)``, e.g.
            :meth:`funcgrad.Objective.train_loss`. ``key`` is this step's PRNG key (for dropout); a loss that
            needs none may take ``(params, *data)`` only (read from its signature).
        optimizer: any optax GradientTransformation (e.g. :func:`funcgrad.optim.adam`).
        batch_size: None for full-batch steps; else each step takes a minibatch of this size (see
            :func:`batch_indices`).
        schedule: the learning-rate schedule, to report ``lr`` in the metrics.
        donate: donate the input state's buffers (its memory is reused for the output).
        shard_batch: applied to each (mini)batch inside the step, e.g. a sharding constraint for data
            parallelism (see :mod:`funcgrad.parallel`).
    """
    _check_optimizer("make_step", optimizer)
    one_step = _step_fn(loss_fn, optimizer, batch_size, schedule, shard_batch)

    @functools.partial(jax.jit, donate_argnums=(0,) if donate else ())
    def compiled(state, data):
        _check_state(state)  # at trace time only: free on every later call
        _check_data(data, batch_size)
        return one_step(state, data)

    @functools.wraps(compiled)
    def step(state, data):
        try:
            return compiled(state, data)
        except (ValueError, RuntimeError):  # XLA's "Buffer has been deleted or donated" (JAX 0.12: RuntimeError)
            if isinstance(state, TrainState) and _consumed(state):
                raise ValueError(_CONSUMED) from None
            raise

    step.lower = compiled.lower  # type: ignore[attr-defined]
    return step


def make_steps(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    steps: int,
    *,
    batch_size: int | None = None,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    donate: bool = True,
    shard_batch: Callable[[Any], Any] | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """``steps`` training steps fused into one compiled dispatch (a `jax.lax.fori_loop`).

    Returns ``run(state, data, until=None) -> (state, metrics)``: :class:`Metrics` where each metric has shape
    ``(steps,)`` and ``metrics["step"]`` is the step number of each row (-1 for steps not run). Steps at or past ``until``
    (a total step count) are skipped, so the same compiled program serves a final, shorter chunk.
    Arguments as in :func:`make_step`.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"make_steps: steps must be an int >= 1; got {steps!r}")
    _check_optimizer("make_steps", optimizer)
    one_step = _step_fn(loss_fn, optimizer, batch_size, schedule, shard_batch)

    @functools.partial(jax.jit, donate_argnums=(0,) if donate else ())
    def run(state, data, until):
        _check_state(state)  # at trace time only
        _check_data(data, batch_size)
        shape = jax.eval_shape(one_step, state, data)[1]
        rows = Metrics(shape.names, jnp.full((steps, len(shape.names)), jnp.nan, jnp.float32),
                       jnp.full((steps,), -1, jnp.int32))

        def body(i, carry):
            s, rows = carry
            new, m = one_step(s, data)
            return new, Metrics(rows.names, rows.table.at[i].set(m.table), rows.steps.at[i].set(s.step))

        # A loop of dynamic length (steps left before `until`, at most `steps`): no per-step branch, and one
        # compiled program for every chunk, the last and shorter one included.
        n = jnp.clip(until - state.step, 0, steps)
        return jax.lax.fori_loop(0, n, body, (state, rows))

    def checked(state: TrainState, data: Any, until: int | None = None) -> tuple[TrainState, Metrics]:
        limit = np.iinfo(np.int32).max if until is None else int(until)
        if isinstance(state, TrainState) and _consumed(state):
            raise ValueError(_CONSUMED)
        return run(state, data, jnp.asarray(limit, jnp.int32))

    return checked


def make_eval(metrics_fn: Callable[..., dict]) -> Callable[..., dict]:
    """A compiled evaluation ``(params, *data) -> metrics``, e.g. from :meth:`funcgrad.Objective.metrics`."""
    return jax.jit(metrics_fn)


def _check_state(state: Any) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(f"expected a funcgrad.train.TrainState (from funcgrad.train.init); got {describe(state)}")
    _check_params(state.params, "step")


_CONSUMED = ("state was consumed by an earlier fit or step: steps donate the state's buffers to the state they "
             "return; pass that returned state, or train from a copy (jax.tree.map(jnp.copy, state)) to keep this one")


def _consumed(state: TrainState) -> bool:
    return any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(state))


def chunk_size(fuse: int, steps: int) -> int:
    """The steps :func:`chunks` fuses per dispatch: ``fuse``, but no more than the run's ``steps`` nor
    :data:`MAX_FUSE`, so buffers follow the steps actually run."""
    if isinstance(fuse, bool) or not isinstance(fuse, (int, np.integer)) or fuse < 1:
        raise ValueError(f"fuse must be an int >= 1; got {fuse!r}")
    return int(max(1, min(fuse, steps, MAX_FUSE)))


def chunks(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    data: Any,
    *,
    steps: int,
    fuse: int = 100,
    batch_size: int | None = None,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    shard_batch: Callable[[Any], Any] | None = None,
) -> Iterator[tuple[TrainState, dict[str, np.ndarray]]]:
    """Trains until ``state.step == steps``, yielding ``(state, metrics)`` after each fused chunk of ``fuse``
    steps (at most :func:`chunk_size`). Metrics are NumPy arrays of the chunk's steps. The caller does any I/O between chunks.

    Every step runs the same compiled loop body whichever chunk it falls in, so an interrupted run resumed from
    a checkpoint ends bit for bit where an uninterrupted one does."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an int >= 0 (the step count to train until); got {steps!r}")
    fuse = chunk_size(fuse, steps)
    _check_state(state)
    if _consumed(state):
        raise ValueError(_CONSUMED)
    run = make_steps(loss_fn, optimizer, fuse, batch_size=batch_size, schedule=schedule, shard_batch=shard_batch)
    current = int(to_host(state.step))
    while current < steps:
        state, fused = run(state, data, steps)
        metrics = fused.numpy()
        keep = metrics["step"] >= 0
        yield state, {k: v[keep] for k, v in metrics.items()}
        current = min(current + fuse, steps)


def fit(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    data: Any,
    *,
    steps: int,
    fuse: int = 100,
    batch_size: int | None = None,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Trains until ``state.step == steps``; returns the final state and every step's metrics."""
    history: dict[str, list] = {}
    final = state
    for trained, metrics in chunks(loss_fn, optimizer, state, data, steps=steps, fuse=fuse, batch_size=batch_size,
                                   schedule=schedule):
        final = trained
        for k, v in metrics.items():
            history.setdefault(k, []).append(v)
    return final, {k: np.concatenate(v) for k, v in history.items()}
