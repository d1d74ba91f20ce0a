"""A training objective: a model, a data loss and regularisation, with the book's hand-derived gradient.

``Objective.value(params, x, y)`` is the loss JAX differentiates; ``Objective.hand_grad(params, x, y)`` is
the book's backward pass: the loss's hand-derived gradient (combined softmax + cross-entropy when the model
ends in softmax, as the book's ``Activation_Softmax_Loss_CategoricalCrossentropy``), then each layer's
backward by the chain rule, plus ``λ1·sign(w) + 2·λ2·w`` on the regularised leaves. It never calls
`jax.grad`, so :func:`funcgrad.verify.check_grad` can compare the two.

Example:
    >>> import jax
    >>> import funcgrad as fg
    >>> model = fg.nn.mlp([64, 3], output="softmax")
    >>> obj = fg.Objective(model, "categorical_crossentropy", l2={"dense1/*": 5e-4})
    >>> params = model.init(jax.random.key(0), (2,))
    >>> X, y = fg.data.spiral(100, 3, key=0)
    >>> report = fg.verify.check_grad(obj.value, params, X, y, hand=obj.hand_grad)
    >>> report.ok
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funcgrad import losses, metrics, rules
from funcgrad._checks import is_strength
from funcgrad.nn import Layer, Params, serial

__all__ = ["Objective", "LossRule", "LOSS_RULES"]

class LossRule(NamedTuple):
    """A data loss an Objective can use: its validated forward, its hand-derived rule, its accuracy metric."""

    forward: Callable[..., Any]
    rule: rules.Rule
    accuracy: Callable[..., Any]


# The one list of data losses (config's loss.kind choices come from it); forwards from losses.LOSSES.
LOSS_RULES: dict[str, LossRule] = {
    name: LossRule(losses.LOSSES[name], rule, accuracy) for name, rule, accuracy in (
        ("categorical_crossentropy", rules.categorical_crossentropy, metrics.accuracy),
        ("categorical_crossentropy_with_logits", rules.softmax_crossentropy, metrics.accuracy),
        ("binary_crossentropy", rules.binary_crossentropy, metrics.binary_accuracy),
        ("mse", rules.mse, metrics.regression_accuracy),
        ("mae", rules.mae, metrics.regression_accuracy),
    )
}


def _penalties(arg: Mapping[str, float] | None, name: str) -> tuple[tuple[str, float], ...]:
    if arg is None:
        return ()
    if not isinstance(arg, Mapping):
        raise TypeError(f"Objective: {name} must map leaf patterns to strengths, e.g. {{'dense1/W': 5e-4}}; got {arg!r}")
    out = []
    for pattern, lam in arg.items():
        if not isinstance(pattern, str):
            raise TypeError(f"Objective: {name} keys must be patterns like 'dense1/W'; got {pattern!r}")
        if not is_strength(lam):
            raise ValueError(f"Objective: {name}[{pattern!r}] must be a number >= 0; got {lam!r}")
        out.append((pattern, float(lam)))
    return tuple(out)


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """``L(params) = data_loss(model(x), y) + Σ λ1·Σ|w| + Σ λ2·Σw²`` over chosen leaves.

    Args:
        model: a :class:`funcgrad.nn.Layer` (e.g. from :func:`funcgrad.nn.mlp`).
        loss: a name in :data:`LOSS_RULES`.
        l1, l2: maps from leaf patterns (``"dense1/W"``, ``"dense1/*"``) to strengths λ.

    Hashes by identity, so its bound methods can be static arguments of `jax.jit`.
    """

    model: Layer
    loss: str
    l1: Mapping[str, float] | None = None
    l2: Mapping[str, float] | None = None
    # Derived in __post_init__: the penalties as (pattern, λ) pairs, and the model up to the logits.
    _l1: tuple[tuple[str, float], ...] = dataclasses.field(init=False, repr=False, default=())
    _l2: tuple[tuple[str, float], ...] = dataclasses.field(init=False, repr=False, default=())
    _logits_model: Layer | None = dataclasses.field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.model, Layer):
            raise TypeError(f"Objective: model must be a funcgrad Layer; got {type(self.model).__name__}")
        if self.loss not in LOSS_RULES:
            raise ValueError(f"Objective: unknown loss {self.loss!r}; expected one of {sorted(LOSS_RULES)}")
        object.__setattr__(self, "_l1", _penalties(self.l1, "l1"))
        object.__setattr__(self, "_l2", _penalties(self.l2, "l2"))
        # The book's combined softmax + cross-entropy backward: the model up to the logits.
        layers = self.model.layers
        combined = self.loss == "categorical_crossentropy" and layers and layers[-1][1].kind == "softmax"
        # (its layers get the dropout keys the whole model gives them, whatever the PRNG's split rule)
        object.__setattr__(self, "_logits_model",
                           serial(*layers[:-1], _key_slots=len(layers)) if combined and len(layers) > 1 else None)

    # -- forward ---------------------------------------------------------------------------------------

    def predict(self, params: Params, x: jax.Array) -> jax.Array:
        """The model's output in evaluation mode (no dropout)."""
        return self.model.apply(params, x)

    def data_loss(self, params: Params, x: jax.Array, y: jax.Array, *, key=None, train: bool = False) -> jax.Array:
        return LOSS_RULES[self.loss].forward(self.model.apply(params, x, key=key, train=train), y)

    def regularization(self, params: Params) -> jax.Array:
        """``Σ λ1·Σ|w| + Σ λ2·Σw²`` over the chosen leaves (the book's, not divided by N)."""
        total = jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))
        for pattern, lam in self._l1:
            total = total + losses.l1_penalty(params, lam, where=pattern)
        for pattern, lam in self._l2:
            total = total + losses.l2_penalty(params, lam, where=pattern)
        return total

    def value(self, params: Params, x: jax.Array, y: jax.Array, *, key=None, train: bool = False) -> jax.Array:
        """The objective: data loss plus regularisation. ``key``/``train`` drive dropout."""
        return self.data_loss(params, x, y, key=key, train=train) + self.regularization(params)

    def _scored(self, params: Params, x: jax.Array, y: jax.Array, key, train: bool) -> dict[str, jax.Array]:
        """One forward pass: loss, its data and regularisation parts, and the loss's accuracy metric."""
        forward, accuracy = LOSS_RULES[self.loss].forward, LOSS_RULES[self.loss].accuracy
        out = self.model.apply(params, x, key=key, train=train)
        data, reg = forward(out, y), self.regularization(params)
        return {"loss": data + reg, "data_loss": data, "reg_loss": reg, "accuracy": accuracy(out, y)}

    def train_loss(self, params: Params, x: jax.Array, y: jax.Array, key: jax.Array | None = None):
        """The training loss and its metrics from one forward pass in training mode (dropout on, driven by
        ``key``): ``(loss, {"data_loss", "reg_loss", "accuracy"})``, the form :mod:`funcgrad.train` takes."""
        scored = self._scored(params, x, y, key, True)
        return scored.pop("loss"), scored

    def metrics(self, params: Params, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        """Evaluation metrics (no dropout): loss, data_loss, reg_loss and accuracy."""
        return self._scored(params, x, y, None, False)

    # -- hand-derived backward -------------------------------------------------------------------------

    def hand_grad(self, params: Params, x: jax.Array, y: jax.Array, *, key=None, train: bool = False) -> Params:
        """The book's backward pass: ``∂L/∂params`` from the hand-derived rules, composed by the chain rule."""
        one = jnp.ones((), jnp.result_type(*jax.tree.leaves(params)))
        # (the loss's own input checks first: labels out of range, targets of another shape are the same errors
        # as for value, never a gradient of broadcast inputs)
        if self._logits_model is not None:
            logits = self._logits_model.apply(params, x, key=key, train=train)
            logits, y = losses._checked_inputs("categorical_crossentropy_with_logits", logits, y)
            dlogits = rules.softmax_crossentropy.backward(logits, y, one)  # (ŷ − y)/N
            grads, _ = self._logits_model.backward(params, x, dlogits, key=key, train=train)
        else:
            out = self.model.apply(params, x, key=key, train=train)
            out, y = losses._checked_inputs(self.loss, out, y)
            dout = LOSS_RULES[self.loss].rule.backward(out, y, one)
            grads, _ = self.model.backward(params, x, dout, key=key, train=train)
        return self._add_penalty_grads(params, grads)

    def _add_penalty_grads(self, params: Params, grads: Params) -> Params:
        for rule, terms in ((rules.l1, self._l1), (rules.l2, self._l2)):
            for pattern, lam in terms:
                mask = losses.select(params, pattern)
                grads = jax.tree.map(
                    lambda g, w, m, rule=rule, lam=lam: g + rule.backward(w, jnp.ones((), w.dtype), lam=lam) if m else g,
                    grads, params, mask,
                )
        return grads

    def stages(self, params: Params, x: jax.Array, y: jax.Array, *, key=None, train: bool = False) -> list[tuple]:
        """The model's links for :func:`funcgrad.verify.check_chain`: one per layer, then the loss.

        Each layer is ``(name, forward(p, x), backward(p, x, dvalues) -> (dp, dx), params)``."""
        out: list[tuple] = []
        named = self.model.layers or ((self.model.label, self.model),)
        keys = list(jax.random.split(key, len(named))) if key is not None else [None] * len(named)
        for (name, layer), k in zip(named, keys, strict=True):
            p = params[name] if layer.has_params and self.model.layers else (params if not self.model.layers else {})

            def fwd(p_, x_, layer=layer, k=k):
                return layer.forward_fn(p_, x_, k, train)

            def bwd(p_, x_, d, layer=layer, k=k):
                return layer.backward_fn(p_, x_, d, k, train)

            out.append((name, fwd, bwd, p))
        rule = LOSS_RULES[self.loss].rule
        out.append((
            f"loss ({self.loss})",
            lambda o: rule.forward(o, y),
            lambda o, d: rule.backward(o, y, d),
        ))
        return out
