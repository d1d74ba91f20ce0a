"""Layers and models as pure functions over parameter pytrees, in the spirit of stax.

A :class:`Layer` bundles pure functions and no state:

- ``init(key, input_shape, dtype=float32) -> params``: nested dicts with readable names
  (``params["dense1"]["W"]``); ``input_shape`` is the shape of one sample, e.g. ``(2,)``.
- ``apply(params, x, *, key=None, train=False) -> y``: the forward pass. ``x`` has a leading batch axis.
- ``backward(params, x, dvalues, *, key=None, train=False) -> (dparams, dx)``: the book's hand-derived
  backward pass (from :mod:`funcgrad.rules`), composed by the chain rule. It never calls `jax.grad`;
  :mod:`funcgrad.verify` compares it with JAX.

Shapes and dtypes are checked when a function is traced (free under `jax.jit`); errors name the pytree path.

Example:
    >>> import jax
    >>> import funcgrad as fg
    >>> model = fg.nn.mlp([64, 3], activation="relu", output="softmax")   # 2 → 64 ReLU → 3 softmax
    >>> params = model.init(jax.random.key(0), (2,))
    >>> params["dense1"]["W"].shape, params["dense2"]["b"].shape
    ((2, 64), (3,))
    >>> X, y = fg.data.spiral(100, 3, key=0)
    >>> model.apply(params, X).shape
    (300, 3)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad import initializers as inits
from funcgrad import rules
from funcgrad._checks import as_shape, describe, is_key, require_float

__all__ = [
    "Layer",
    "Params",
    "dense",
    "relu",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "linear",
    "softmax",
    "log_softmax",
    "dropout",
    "elementwise",
    "serial",
    "mlp",
    "activation",
    "ACTIVATIONS",
    "param_count",
]

Params = Any  # a pytree (nested dicts) of float arrays
Shape = tuple[int, ...]


def _check_key(key: Any, where: str) -> None:
    if isinstance(key, (int, np.integer)) or key is None:
        raise TypeError(
            f"{where}: key must be a PRNG key, e.g. jax.random.key(0); got {describe(key)}. "
            "funcgrad never keeps hidden random state: pass keys explicitly."
        )
    if not is_key(key):
        raise TypeError(f"{where}: key must be a PRNG key from jax.random.key(seed); got {describe(key)}")


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Layer:
    """A layer or model: pure ``init``/``apply``/``backward`` functions and no state.

    Build layers with the constructors in this module (:func:`dense`, :func:`relu`, ...) and compose them with
    :func:`serial` or :func:`mlp`; a composed model is itself a Layer. Instances hash by identity, so their
    bound methods can be static arguments of `jax.jit`.
    """

    kind: str
    init_fn: Callable[[jax.Array, Shape, Any], Params]
    forward_fn: Callable[[Params, jax.Array, Any, bool], jax.Array]
    backward_fn: Callable[[Params, jax.Array, jax.Array, Any, bool], tuple[Params, jax.Array]]
    check_fn: Callable[[Params, jax.Array, str, bool, Any], None]
    shape_fn: Callable[[Shape], Shape]
    has_params: bool
    needs_key: bool = False
    name: str | None = None
    layers: tuple[tuple[str, Layer], ...] = ()
    config: tuple[tuple[str, Any], ...] = ()

    def init(self, key: jax.Array, input_shape: int | Sequence[int], dtype: Any = jnp.float32) -> Params:
        """Initial parameters for inputs whose samples have shape ``input_shape`` (e.g. ``(2,)``)."""
        where = f"{self.label}.init"
        _check_key(key, where)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{where}: dtype must be a floating dtype (e.g. jnp.float32); got {dtype!r}")
        return self.init_fn(key, as_shape(input_shape, where), dtype)

    def apply(self, params: Params, x: jax.Array, *, key: jax.Array | None = None, train: bool = False) -> jax.Array:
        """The forward pass. ``key`` is needed only by dropout in training (``train=True``)."""
        self.check_fn(params, x, "params", train, key)
        return self.forward_fn(params, x, key, train)

    def backward(
        self,
        params: Params,
        x: jax.Array,
        dvalues: jax.Array,
        *,
        key: jax.Array | None = None,
        train: bool = False,
    ) -> tuple[Params, jax.Array]:
        """The hand-derived backward pass: ``(∂L/∂params, ∂L/∂x)`` given ``dvalues = ∂L/∂y``."""
        self.check_fn(params, x, "params", train, key)
        y_shape = jax.eval_shape(lambda p, v: self.forward_fn(p, v, key, train), params, x).shape
        if jnp.shape(dvalues) != y_shape:
            raise ValueError(
                f"{self.label}.backward: dvalues must have the output's shape {y_shape}; got {describe(dvalues)}"
            )
        return self.backward_fn(params, x, dvalues, key, train)

    def output_shape(self, input_shape: int | Sequence[int]) -> Shape:
        """The shape of one output sample for samples of ``input_shape``."""
        return self.shape_fn(as_shape(input_shape, f"{self.label}.output_shape"))

    @property
    def label(self) -> str:
        return self.name or self.kind

    def __repr__(self) -> str:
        if self.layers:
            inner = ", ".join(f"{n}={layer!r}" for n, layer in self.layers)
            return f"{self.kind}({inner})"
        args = ", ".join(f"{k}={v!r}" for k, v in self.config)
        return f"{self.kind}({args})"


def param_count(params: Params) -> int:
    """The number of scalar parameters in a params pytree."""
    return sum(int(np.prod(jnp.shape(leaf))) for leaf in jax.tree.leaves(params))


# ----------------------------------------------------------------------------------------------------------
# Dense


def dense(
    units: int,
    *,
    W_init: inits.Initializer | None = None,
    b_init: inits.Initializer | None = None,
    name: str | None = None,
) -> Layer:
    """A fully connected layer, ``Y = X·W + b``, with the book's layout: ``W`` (n_in, units), ``b`` (units,).

    Hand-derived backward (:data:`funcgrad.rules.dense`): ``dW = Xᵀ·dvalues``, ``db = Σ dvalues``,
    ``dX = dvalues·Wᵀ``.

    Args:
        units: number of output features (neurons).
        W_init: weight initialiser; default the book's ``0.01·N(0, 1)``.
        b_init: bias initialiser; default zeros.
        name: the layer's key in a serial model's params (default ``dense1``, ``dense2``, ...).
    """
    if not isinstance(units, (int, np.integer)) or isinstance(units, bool) or units <= 0:
        raise ValueError(f"dense: units must be a positive int; got {units!r}")
    units = int(units)
    W_init = W_init or inits.book(0.01)
    b_init = b_init or inits.zeros

    def init_fn(key, input_shape, dtype):
        if len(input_shape) != 1:
            raise ValueError(f"dense: input samples must be 1-D feature vectors; got input_shape {input_shape}")
        kW, kb = jax.random.split(key)
        return {"W": W_init(kW, (input_shape[0], units), dtype), "b": b_init(kb, (units,), dtype)}

    def check_fn(params, x, where, train, key):
        if not isinstance(params, dict) or set(params) != {"W", "b"}:
            got = sorted(params) if isinstance(params, dict) else describe(params)
            raise ValueError(f"{where} must be a dict with keys ['W', 'b'] for a dense layer; got {got}")
        W, b = params["W"], params["b"]
        for leaf, leaf_name in ((W, "W"), (b, "b")):
            require_float(leaf, f"{where}['{leaf_name}']")
        if jnp.ndim(W) != 2 or jnp.shape(W)[1] != units:
            raise ValueError(f"{where}['W'] must have shape (n_in, {units}); got {describe(W)}")
        if jnp.shape(b) != (units,):
            raise ValueError(f"{where}['b'] must have shape ({units},); got {describe(b)}")
        require_float(x, f"dense input x (feeding {where})")
        if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != jnp.shape(W)[0]:
            n_in = jnp.shape(W)[0]
            got = jnp.shape(x)[-1] if jnp.ndim(x) else "no"
            raise ValueError(
                f"dense input x has {got} features ({describe(x)}) but {where}['W'] is {describe(W)}, "
                f"which expects {n_in} features in the last axis. Check the data's width or re-initialise the "
                f"model with init(key, ({got},))."
            )

    def forward_fn(params, x, key, train):
        return rules.dense.forward(x, params["W"], params["b"])

    def backward_fn(params, x, dvalues, key, train):
        dx, dW, db = rules.dense.backward(x, params["W"], params["b"], dvalues)
        return {"W": dW, "b": db}, dx

    return Layer(
        kind="dense",
        init_fn=init_fn,
        forward_fn=forward_fn,
        backward_fn=backward_fn,
        check_fn=check_fn,
        shape_fn=lambda s: (units,),
        has_params=True,
        name=name,
        config=(("units", units), ("book_scale", W_init.stddev if isinstance(W_init, inits.Normal) else None)),
    )


# ----------------------------------------------------------------------------------------------------------
# Activations: elementwise (or per-row) functions without parameters, each with its catalog rule.


def _no_params_check(kind: str):
    def check_fn(params, x, where, train, key):
        if params not in ({}, (), None):
            raise ValueError(f"{where}: a {kind} layer has no parameters; got {describe(params)}")
        require_float(x, f"{kind} input x")

    return check_fn


def _activation(rule: rules.Rule, name: str | None, **hyper: Any) -> Layer:
    def forward_fn(params, x, key, train):
        return rule.forward(x, **hyper)

    def backward_fn(params, x, dvalues, key, train):
        return {}, rule.backward(x, dvalues, **hyper)

    return Layer(
        kind=rule.name,
        init_fn=lambda key, s, dtype: {},
        forward_fn=forward_fn,
        backward_fn=backward_fn,
        check_fn=_no_params_check(rule.name),
        shape_fn=lambda s: s,
        has_params=False,
        name=name,
        config=tuple(hyper.items()),
    )


def elementwise(rule: rules.Rule, *, name: str | None = None, **hyper: Any) -> Layer:
    """A parameter-free layer from a :class:`funcgrad.rules.Rule` of one input, e.g. a custom activation with
    its hand-derived backward: ``forward(x)`` and ``backward(x, dvalues)``. It composes with :func:`serial`
    like the built-in activations, so models using it keep a hand-derived gradient.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from funcgrad import nn, rules
        >>> swish = rules.Rule("swish", lambda x: x * jax.nn.sigmoid(x),
        ...                    lambda x, d: d * jax.nn.sigmoid(x) * (1 + x * (1 - jax.nn.sigmoid(x))),
        ...                    "swish' = σ(x)(1 + x(1 − σ(x)))")
        >>> model = nn.serial(nn.dense(8), nn.elementwise(swish), nn.dense(1))
    """
    if not isinstance(rule, rules.Rule):
        raise TypeError(f"elementwise: expected a funcgrad.rules.Rule; got {describe(rule)}")
    return _activation(rule, name, **hyper)


def relu(*, name: str | None = None) -> Layer:
    """ReLU, ``max(x, 0)``; backward ``dvalues · 1(x > 0)`` (0 at the kink x = 0, as the book does)."""
    return _activation(rules.relu, name)


def leaky_relu(alpha: float = 0.01, *, name: str | None = None) -> Layer:
    """Leaky ReLU, ``x if x > 0 else αx``; backward ``dvalues · (1 if x > 0 else α)``."""
    if not 0 <= alpha < 1:
        raise ValueError(f"leaky_relu: alpha must lie in [0, 1); got {alpha!r}")
    return _activation(rules.leaky_relu, name, alpha=float(alpha))


def sigmoid(*, name: str | None = None) -> Layer:
    """Sigmoid, ``σ(x) = 1/(1 + e^−x)``; backward ``dvalues · σ(1 − σ)``."""
    return _activation(rules.sigmoid, name)


def tanh(*, name: str | None = None) -> Layer:
    """tanh; backward ``dvalues · (1 − tanh²)``."""
    return _activation(rules.tanh, name)


def linear(*, name: str | None = None) -> Layer:
    """The identity (the book's linear output activation); backward ``dvalues``."""
    return _activation(rules.linear, name)


def softmax(*, name: str | None = None) -> Layer:
    """Softmax over the last axis; backward ``J·dvalues`` with ``J = diag(s) − s·sᵀ`` per sample."""
    return _activation(rules.softmax, name)


def log_softmax(*, name: str | None = None) -> Layer:
    """log-softmax over the last axis; backward ``dvalues − s·Σ dvalues``."""
    return _activation(rules.log_softmax, name)


ACTIVATIONS: dict[str, Callable[..., Layer]] = {
    "relu": relu,
    "leaky_relu": leaky_relu,
    "sigmoid": sigmoid,
    "tanh": tanh,
    "linear": linear,
    "softmax": softmax,
    "log_softmax": log_softmax,
}


def activation(name: str) -> Layer:
    """The activation layer called ``name`` (one of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


# ----------------------------------------------------------------------------------------------------------
# Dropout


def dropout_mask(key: jax.Array, rate: float, shape: Shape, dtype: Any) -> jax.Array:
    """Inverted dropout's mask: ``Bernoulli(1 − rate) / (1 − rate)``, so activations keep their mean."""
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return keep.astype(dtype) / jnp.asarray(1.0 - rate, dtype)


def dropout(rate: float, *, name: str | None = None) -> Layer:
    """Inverted dropout: in training, zero each input with probability ``rate`` and scale the rest by
    ``1/(1 − rate)``; the identity when not training. Training needs an explicit ``key``.

    Backward: ``dvalues · mask`` with the same mask (the same key regenerates it).
    """
    if not 0 <= rate < 1:
        raise ValueError(f"dropout: rate must lie in [0, 1); got {rate!r}")
    rate = float(rate)

    def check_fn(params, x, where, train, key):
        _no_params_check("dropout")(params, x, where, train, key)
        if train and rate > 0:
            if key is None:
                raise ValueError(
                    f"dropout (rate {rate}) in training needs a PRNG key: call apply(params, x, key=key, train=True) "
                    "with key = jax.random.key(seed), or train=False for evaluation"
                )
            _check_key(key, "dropout")

    def mask(x, key):
        return dropout_mask(key, rate, jnp.shape(x), jnp.result_type(x))

    def forward_fn(params, x, key, train):
        if not train or rate == 0:
            return x
        return rules.dropout.forward(x, mask(x, key))

    def backward_fn(params, x, dvalues, key, train):
        if not train or rate == 0:
            return {}, dvalues
        return {}, rules.dropout.backward(x, mask(x, key), dvalues)

    return Layer(
        kind="dropout",
        init_fn=lambda key, s, dtype: {},
        forward_fn=forward_fn,
        backward_fn=backward_fn,
        check_fn=check_fn,
        shape_fn=lambda s: s,
        has_params=False,
        needs_key=True,
        name=name,
        config=(("rate", rate),),
    )


_dropout_layer = dropout  # `mlp` has an argument named `dropout`


# ----------------------------------------------------------------------------------------------------------
# Composition


def _named_layers(layers: Sequence[Layer | tuple[str, Layer]]) -> tuple[tuple[str, Layer], ...]:
    counts: dict[str, int] = {}
    named: list[tuple[str, Layer]] = []
    for i, item in enumerate(layers):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, layer = item
        else:
            name, layer = None, item
        if not isinstance(layer, Layer):
            hint = " (did you forget the parentheses, e.g. fg.nn.relu()?)" if callable(layer) else ""
            raise TypeError(f"serial: layer {i} must be a funcgrad Layer; got {describe(layer)}{hint}")
        if name is None:
            if layer.name:
                name = layer.name
            else:
                counts[layer.kind] = counts.get(layer.kind, 0) + 1
                name = f"{layer.kind}{counts[layer.kind]}"
        if name in dict(named):
            raise ValueError(f"serial: two layers are named {name!r}; give them distinct names")
        named.append((name, layer))
    return tuple(named)


def _check_param_keys(params: Any, with_params: list[str], where: str) -> None:
    """``params`` of a serial model is a dict with exactly one entry per parameterised layer."""
    if not isinstance(params, dict):
        raise TypeError(
            f"{where} must be a dict with keys {with_params} (from model.init(key, input_shape)); "
            f"got {describe(params)}"
        )
    missing = [n for n in with_params if n not in params]
    extra = [n for n in params if n not in with_params]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"is missing {', '.join(repr(m) for m in missing)}")
        if extra:
            parts.append(f"has unexpected {', '.join(repr(e) for e in extra)}")
        raise ValueError(
            f"{where} {' and '.join(parts)}: this model's parameterised layers are {with_params}, "
            f"params has {sorted(params)}. Create params with model.init(key, input_shape)."
        )


def _serial_backward(named, with_params, params, x, dvalues, keys, train):
    """The chain rule through a serial model: forward keeping each layer's input, then each layer's backward
    given the gradient of the layer after it, last layer first."""
    inputs = []
    for k, (n, layer) in zip(keys, named, strict=True):
        inputs.append(x)
        x = layer.forward_fn(params.get(n, {}), x, k, train)
    grads = {}
    for k, (n, layer), x_in in reversed(list(zip(keys, named, inputs, strict=True))):
        dp, dvalues = layer.backward_fn(params.get(n, {}), x_in, dvalues, k, train)
        if layer.has_params:
            grads[n] = dp
    return {n: grads[n] for n in with_params}, dvalues


def serial(*layers: Layer | tuple[str, Layer], name: str | None = None, _key_slots: int | None = None) -> Layer:
    """Composes layers in sequence: ``y = f_n(... f_2(f_1(x)))``; itself a Layer.

    Layers are named ``<kind><count>`` (``dense1``, ``relu1``, ``dense2``, ...) unless given a name, either as
    ``dense(64, name="hidden")`` or as a ``("hidden", layer)`` pair. Params hold one entry per layer that has
    parameters: ``{"dense1": {"W", "b"}, "dense2": {...}}``. ``init`` splits the key once per layer; ``apply``
    splits ``key`` (when given) once per layer.

    The backward pass is the chain rule: run forward keeping each layer's input, then hand each layer's
    ``backward`` the gradient of the layer after it, last layer first.
    """
    if not layers:
        raise ValueError("serial: needs at least one layer")
    named = _named_layers(layers)
    with_params = [n for n, layer in named if layer.has_params]

    def init_fn(key, input_shape, dtype):
        keys = jax.random.split(key, len(named))
        params, shape = {}, input_shape
        for k, (n, layer) in zip(keys, named, strict=True):
            p = layer.init_fn(k, shape, dtype)
            if layer.has_params:
                params[n] = p
            shape = layer.shape_fn(shape)
        return params

    def child_params(params, n):
        return params.get(n, {})

    def check_fn(params, x, where, train, key):
        _check_param_keys(params, with_params, where)
        shape_struct = x
        for n, layer in named:
            sub = f"{where}['{n}']"
            layer.check_fn(child_params(params, n), shape_struct, sub, train, key if layer.needs_key else None)
            shape_struct = jax.eval_shape(lambda p, v, layer=layer: layer.forward_fn(p, v, None, False),
                                          child_params(params, n), shape_struct)

    def layer_keys(key):
        if key is None:
            return [None] * len(named)
        # (_key_slots: the first layers of a longer serial draw the keys that serial gives them)
        return list(jax.random.split(key, _key_slots or len(named)))[: len(named)]

    def forward_fn(params, x, key, train):
        for k, (n, layer) in zip(layer_keys(key), named, strict=True):
            x = layer.forward_fn(child_params(params, n), x, k, train)
        return x

    def backward_fn(params, x, dvalues, key, train):
        return _serial_backward(named, with_params, params, x, dvalues, layer_keys(key), train)

    def shape_fn(shape):
        for _, layer in named:
            shape = layer.shape_fn(shape)
        return shape

    return Layer(
        kind="serial",
        init_fn=init_fn,
        forward_fn=forward_fn,
        backward_fn=backward_fn,
        check_fn=check_fn,
        shape_fn=shape_fn,
        has_params=bool(with_params),
        needs_key=any(layer.needs_key for _, layer in named),
        name=name,
        layers=named,
    )


def mlp(
    sizes: Sequence[int],
    *,
    activation: str = "relu",
    output: str | None = None,
    dropout: float | None = None,
    W_init: inits.Initializer | None = None,
    b_init: inits.Initializer | None = None,
) -> Layer:
    """A multi-layer perceptron in one line: dense layers of the given widths with ``activation`` between them.

    ``mlp([64, 3], activation="relu", output="softmax")`` is the book's chapter-11 model
    ``dense1 (n_in→64) → relu1 → dense2 (64→3) → softmax1``. With ``dropout=rate`` a dropout layer follows each
    hidden activation (chapter 15). The input width comes from ``init(key, (n_in,))``.

    Args:
        sizes: output width of each dense layer; the last is the model's output width.
        activation: hidden activation, one of :data:`ACTIVATIONS`.
        output: output activation (``"softmax"``, ``"sigmoid"``, ``"linear"``, ...) or None for none.
        dropout: dropout rate after each hidden activation, or None.
        W_init, b_init: initialisers for every dense layer (default: the book's).
    """
    sizes = list(sizes)
    if not sizes or any(not isinstance(s, (int, np.integer)) or s <= 0 for s in sizes):
        raise ValueError(f"mlp: sizes must be a non-empty list of positive ints, e.g. [64, 3]; got {sizes!r}")
    for arg, value in (("activation", activation), ("output", output)):
        if value is not None and value not in ACTIVATIONS:
            raise ValueError(f"mlp: unknown {arg} {value!r}; expected one of {sorted(ACTIVATIONS)}")
    layers: list[Layer] = []
    for i, width in enumerate(sizes):
        layers.append(dense(width, W_init=W_init, b_init=b_init))
        if i < len(sizes) - 1:
            layers.append(ACTIVATIONS[activation]())
            if dropout:
                layers.append(_dropout_layer(dropout))
    if output is not None:
        layers.append(ACTIVATIONS[output]())
    return serial(*layers)
