"""The catalog of hand-derived derivatives: each rule's forward and its backward side by side.

Every backward is written from the calculus with `jax.numpy`, never with `jax.grad`, in the notation of
"Neural Networks from Scratch" (chapter 9 onward): `dvalues` is the gradient flowing in from the next
operation (the cotangent), and a backward returns the gradients with respect to the rule's inputs by the
chain rule, ``∂L/∂x = ∂L/∂y · ∂y/∂x``.

A :class:`Rule` is callable like its forward function. Its ``backward(*primals, dvalues)`` returns the
gradients of the primals listed in ``argnums`` (a single array when there is one). The verification module
(:mod:`funcgrad.verify`) checks each rule against `jax.vjp` and finite differences; ``funcgrad verify`` runs
them all. Hyperparameters (``alpha``, ``lam``, ``eps``) are keyword-only.

Example:
    >>> import jax.numpy as jnp
    >>> from funcgrad import rules
    >>> rules.relu.backward(jnp.array([-1.0, 0.0, 2.0]), jnp.ones(3))
    Array([0., 0., 1.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "Rule",
    "CATALOG",
    "add",
    "multiply",
    "maximum",
    "polynomial",
    "chain",
    "neuron",
    "dense",
    "relu",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "linear",
    "softmax",
    "softmax_jacobian",
    "log_softmax",
    "dropout",
    "categorical_crossentropy",
    "softmax_crossentropy",
    "binary_crossentropy",
    "mse",
    "mae",
    "l1",
    "l2",
    "one_hot_like",
]

CLIP_EPS = 1e-7  # the book clips predicted probabilities to [1e-7, 1 - 1e-7] before taking logs


@dataclasses.dataclass(frozen=True, eq=False)
class Rule:
    """A forward function and its hand-derived backward (vector-Jacobian product), side by side.

    Attributes:
        name: the rule's name in the catalog.
        forward: ``forward(*primals, **hyper) -> output``.
        backward: ``backward(*primals, dvalues, **hyper)`` -> gradients of the primals in ``argnums``.
        formula: the derivative in the book's notation, shown by ``funcgrad verify``.
        argnums: which primals the backward differentiates (labels and masks are constants).
        example: ``example(key) -> primals``: a point to check the rule at, kinks included.
    """

    name: str
    forward: Callable[..., Any]
    backward: Callable[..., Any]
    formula: str
    argnums: tuple[int, ...] = (0,)
    example: Callable[[jax.Array], tuple] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Rule({self.name}: {self.formula})"


def one_hot_like(labels: jax.Array, probs: jax.Array) -> jax.Array:
    """Integer class labels (N,) -> one-hot rows shaped and typed like ``probs`` (N, C); one-hot passes through."""
    if jnp.ndim(labels) == jnp.ndim(probs):
        return labels.astype(probs.dtype)
    return jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)


def _normal(key: jax.Array, *shapes: tuple[int, ...]) -> list[jax.Array]:
    keys = jax.random.split(key, len(shapes))
    return [jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]


# ----------------------------------------------------------------------------------------------------------
# Chapter 9: partial derivatives of elementary functions, the gradient, the chain rule.


def _add_forward(x, y):
    return x + y


def _add_backward(x, y, dvalues):
    # ∂(x + y)/∂x = 1, ∂(x + y)/∂y = 1
    return dvalues, dvalues


add = Rule(
    "add",
    _add_forward,
    _add_backward,
    "∂(x+y)/∂x = 1, ∂(x+y)/∂y = 1",
    argnums=(0, 1),
    example=lambda key: tuple(_normal(key, (3,), (3,))),
)


def _mul_forward(x, y):
    return x * y


def _mul_backward(x, y, dvalues):
    # ∂(x·y)/∂x = y, ∂(x·y)/∂y = x
    return dvalues * y, dvalues * x


multiply = Rule(
    "multiply",
    _mul_forward,
    _mul_backward,
    "∂(x·y)/∂x = y, ∂(x·y)/∂y = x",
    argnums=(0, 1),
    example=lambda key: tuple(_normal(key, (3,), (3,))),
)


def _max_forward(x, y):
    return jnp.maximum(x, y)


def _max_backward(x, y, dvalues):
    # ∂max(x, y)/∂x = 1(x > y), ∂max(x, y)/∂y = 1(y > x). At x = y the derivative does not exist; this rule
    # gives the whole gradient to x (JAX's convention splits it, 0.5 to each side): both are one-sided limits.
    x_wins = x >= y
    return jnp.where(x_wins, dvalues, 0.0), jnp.where(x_wins, 0.0, dvalues)


maximum = Rule(
    "maximum",
    _max_forward,
    _max_backward,
    "∂max(x,y)/∂x = 1(x>y), ∂max(x,y)/∂y = 1(y>x); undefined at x = y",
    argnums=(0, 1),
    example=lambda key: (jnp.array([1.0, -2.0, 3.0, 0.5]), jnp.array([0.0, -1.0, 3.0, 0.5])),
)


def _poly_forward(x, y, z):
    return 3 * x**3 * z - y**2 + 5 * z + 2 * y * z


def _poly_backward(x, y, z, dvalues):
    # ∇f(x, y, z) = [∂f/∂x, ∂f/∂y, ∂f/∂z] = [9x²z, −2y + 2z, 3x³ + 5 + 2y]
    return dvalues * 9 * x**2 * z, dvalues * (-2 * y + 2 * z), dvalues * (3 * x**3 + 5 + 2 * y)


polynomial = Rule(
    "polynomial",
    _poly_forward,
    _poly_backward,
    "f = 3x³z − y² + 5z + 2yz; ∇f = [9x²z, −2y + 2z, 3x³ + 5 + 2y]",
    argnums=(0, 1, 2),
    example=lambda key: tuple(_normal(key, (), (), ())),
)


def _chain_forward(x):
    return 3 * (2 * x**2) ** 5


def _chain_backward(x, dvalues):
    # y = g(f(x)) with f(x) = 2x², g(u) = 3u⁵:  dy/dx = g'(f(x)) · f'(x) = 15(2x²)⁴ · 4x
    f = 2 * x**2
    return dvalues * 15 * f**4 * 4 * x


chain = Rule(
    "chain",
    _chain_forward,
    _chain_backward,
    "y = g(f(x)), f = 2x², g = 3u⁵: dy/dx = g'(f(x))·f'(x) = 15(2x²)⁴·4x",
    example=lambda key: (jnp.array([0.5, -0.8, 1.1]),),
)


def _neuron_forward(x, w, b):
    return jnp.maximum(jnp.dot(x, w) + b, 0.0)


def _neuron_backward(x, w, b, dvalues):
    # z = Σ xᵢwᵢ + b, y = ReLU(z):  ∂y/∂wᵢ = 1(z > 0)·xᵢ, ∂y/∂xᵢ = 1(z > 0)·wᵢ, ∂y/∂b = 1(z > 0)
    drelu = dvalues * (jnp.dot(x, w) + b > 0)
    return drelu * w, drelu * x, drelu


neuron = Rule(
    "neuron",
    _neuron_forward,
    _neuron_backward,
    "y = ReLU(w·x + b): ∂y/∂x = 1(z>0)·w, ∂y/∂w = 1(z>0)·x, ∂y/∂b = 1(z>0)",
    argnums=(0, 1, 2),
    example=lambda key: (jnp.array([1.0, -2.0, 3.0]), jnp.array([-3.0, -1.0, 2.0]), jnp.array(1.0)),
)


# ----------------------------------------------------------------------------------------------------------
# Layers (chapters 9, 15): dense, activations, dropout.


def _dense_forward(x, W, b):
    y = x @ W
    return y + b.reshape((1,) * (y.ndim - 1) + b.shape)  # the bias's broadcast over samples, made explicit


def _dense_backward(x, W, b, dvalues):
    # Y = X·W + b:  ∂L/∂W = Xᵀ·dvalues,  ∂L/∂b = Σ_samples dvalues,  ∂L/∂X = dvalues·Wᵀ
    x2 = x.reshape(-1, W.shape[0])
    d2 = dvalues.reshape(-1, W.shape[1])
    return dvalues @ W.T, x2.T @ d2, d2.sum(axis=0)


dense = Rule(
    "dense",
    _dense_forward,
    _dense_backward,
    "Y = XW + b: dW = Xᵀ·dvalues, db = Σ dvalues, dX = dvalues·Wᵀ",
    argnums=(0, 1, 2),
    example=lambda key: tuple(_normal(key, (5, 4), (4, 3), (3,))),
)


def _relu_forward(x):
    return jnp.maximum(x, 0.0)


def _relu_backward(x, dvalues):
    # ReLU(x) = max(x, 0):  ∂/∂x = 1(x > 0); the book takes 0 at exactly x = 0, where it is undefined
    return jnp.where(x > 0, dvalues, 0.0)


relu = Rule(
    "relu",
    _relu_forward,
    _relu_backward,
    "ReLU'(x) = 1(x > 0) (0 at x = 0, a kink)",
    example=lambda key: (jnp.array([[1.0, 2.0, -3.0, -4.0], [2.0, -7.0, -1.0, 3.0], [-1.0, 2.0, 5.0, 0.0]]),),
)


def _leaky_relu_forward(x, *, alpha=0.01):
    return jnp.where(x > 0, x, alpha * x)


def _leaky_relu_backward(x, dvalues, *, alpha=0.01):
    # LeakyReLU(x) = x if x > 0 else αx:  ∂/∂x = 1 if x > 0 else α
    return jnp.where(x > 0, dvalues, alpha * dvalues)


leaky_relu = Rule(
    "leaky_relu",
    _leaky_relu_forward,
    _leaky_relu_backward,
    "∂/∂x = 1 if x > 0 else α",
    example=lambda key: (jnp.array([[1.5, -0.5, 0.0], [-2.0, 0.3, 4.0]]),),
)


def _sigmoid_forward(x):
    return jax.nn.sigmoid(x)


def _sigmoid_backward(x, dvalues):
    # σ(x) = 1 / (1 + e^−x):  σ'(x) = σ(x)·(1 − σ(x))
    s = jax.nn.sigmoid(x)
    return dvalues * (1 - s) * s


sigmoid = Rule(
    "sigmoid",
    _sigmoid_forward,
    _sigmoid_backward,
    "σ' = σ·(1 − σ)",
    example=lambda key: tuple(_normal(key, (4, 3))),
)


def _tanh_forward(x):
    return jnp.tanh(x)


def _tanh_backward(x, dvalues):
    # tanh'(x) = 1 − tanh²(x)
    return dvalues * (1 - jnp.tanh(x) ** 2)


tanh = Rule(
    "tanh",
    _tanh_forward,
    _tanh_backward,
    "tanh' = 1 − tanh²",
    example=lambda key: tuple(_normal(key, (4, 3))),
)


def _linear_forward(x):
    return x


def _linear_backward(x, dvalues):
    # y = x:  ∂y/∂x = 1
    return dvalues


linear = Rule(
    "linear",
    _linear_forward,
    _linear_backward,
    "y = x: ∂y/∂x = 1",
    example=lambda key: tuple(_normal(key, (4, 3))),
)


def _softmax_forward(x):
    # Subtracting the row maximum changes nothing mathematically and prevents overflow in exp.
    e = jnp.exp(x - jax.lax.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_jacobian(x: jax.Array) -> jax.Array:
    """The softmax Jacobian per sample, ``J = diag(s) − s·sᵀ``: shape ``x.shape + x.shape[-1:]``."""
    s = _softmax_forward(x)
    return jnp.einsum("...i,ij->...ij", s, jnp.eye(s.shape[-1], dtype=s.dtype)) - s[..., :, None] * s[..., None, :]


def _softmax_backward(x, dvalues):
    # s = softmax(x); per sample dX = J·dvalues with J = diag(s) − s·sᵀ, i.e. dX = s ⊙ (dvalues − (dvalues·s))
    s = _softmax_forward(x)
    return s * (dvalues - (dvalues * s).sum(axis=-1, keepdims=True))


softmax = Rule(
    "softmax",
    _softmax_forward,
    _softmax_backward,
    "J = diag(s) − s·sᵀ; dX = J·dvalues = s ⊙ (dvalues − Σ dvalues·s)",
    example=lambda key: tuple(_normal(key, (4, 3))),
)


def _log_softmax_forward(x):
    shifted = x - jax.lax.stop_gradient(x.max(axis=-1, keepdims=True))
    return shifted - jnp.log(jnp.exp(shifted).sum(axis=-1, keepdims=True))


def _log_softmax_backward(x, dvalues):
    # log s_i = x_i − log Σ_j e^{x_j}:  ∂/∂x_j = δ_ij − s_j, so dX = dvalues − s·Σ dvalues
    return dvalues - _softmax_forward(x) * dvalues.sum(axis=-1, keepdims=True)


log_softmax = Rule(
    "log_softmax",
    _log_softmax_forward,
    _log_softmax_backward,
    "∂ log s_i/∂x_j = δ_ij − s_j; dX = dvalues − s·Σ dvalues",
    example=lambda key: tuple(_normal(key, (4, 3))),
)


def _dropout_forward(x, mask):
    return x * mask


def _dropout_backward(x, mask, dvalues):
    # y = x ⊙ mask with mask = Bernoulli(1 − rate) / (1 − rate):  ∂y/∂x = mask
    return dvalues * mask


def _dropout_example(key):
    (x,) = _normal(key, (4, 5))
    keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.9, x.shape)
    return x, keep.astype(x.dtype) / 0.9


dropout = Rule(
    "dropout",
    _dropout_forward,
    _dropout_backward,
    "y = x ⊙ mask, mask = Bernoulli(1−rate)/(1−rate): dX = dvalues ⊙ mask",
    example=_dropout_example,
)


# ----------------------------------------------------------------------------------------------------------
# Losses (chapters 5, 9, 16, 17) and regularisation (chapter 14). N = number of samples, J = outputs per sample.


def _clip(p, eps):
    """``clip(p, eps, 1 − eps)``, the upper bound kept below 1 in p's dtype: 1 − 1e-7 is 1 in bfloat16 and float16,
    where the book's clip would leave log(1 − p) = log 0 (the upper bound is then 1 − the dtype's spacing below 1)."""
    if jnp.issubdtype(jnp.result_type(p), jnp.floating):
        return jnp.clip(p, eps, 1 - jnp.maximum(eps, float(jnp.finfo(jnp.result_type(p)).epsneg)))
    return jnp.clip(p, eps, 1 - eps)


def _cce_forward(probs, labels, *, eps=CLIP_EPS):
    y = one_hot_like(labels, probs)
    clipped = _clip(probs, eps)
    return -jnp.mean(jnp.log((clipped * y).sum(axis=-1)))


def _cce_backward(probs, labels, dvalues, *, eps=CLIP_EPS):
    # L = −(1/N) Σ_i log ŷ_{i,y_i}:  ∂L/∂ŷ = −y_onehot / ŷ / N   (the book does not clip here)
    y = one_hot_like(labels, probs)
    return dvalues * -y / probs / probs.shape[0]


def _class_example(key, n=6, c=3):
    k1, k2 = jax.random.split(key)
    logits = jax.random.normal(k1, (n, c))
    return logits, jax.random.randint(k2, (n,), 0, c)


def _probs_example(logits, labels):
    return _softmax_forward(logits), labels


categorical_crossentropy = Rule(
    "categorical_crossentropy",
    _cce_forward,
    _cce_backward,
    "L = −mean log ŷ_true (ŷ clipped to [1e-7, 1−1e-7]); ∂L/∂ŷ = −y/ŷ/N",
    example=lambda key: _probs_example(*_class_example(key)),
)


def _softmax_ce_forward(logits, labels):
    y = one_hot_like(labels, logits)
    return -jnp.mean((_log_softmax_forward(logits) * y).sum(axis=-1))


def _softmax_ce_backward(logits, labels, dvalues):
    # Softmax then categorical cross-entropy, combined:  ∂L/∂z = (ŷ − y_onehot) / N
    y = one_hot_like(labels, logits)
    return dvalues * (_softmax_forward(logits) - y) / logits.shape[0]


softmax_crossentropy = Rule(
    "softmax_crossentropy",
    _softmax_ce_forward,
    _softmax_ce_backward,
    "L = CCE(softmax(z)); ∂L/∂z = (ŷ − y)/N",
    example=_class_example,
)


def _bce_forward(probs, targets, *, eps=CLIP_EPS):
    p = _clip(probs, eps)
    return -jnp.mean(targets * jnp.log(p) + (1 - targets) * jnp.log(1 - p))


def _bce_backward(probs, targets, dvalues, *, eps=CLIP_EPS):
    # L = −mean[y log ŷ + (1−y) log(1−ŷ)]:  ∂L/∂ŷ = −(y/ŷ − (1−y)/(1−ŷ)) / J / N   (ŷ clipped, as the book does)
    p = _clip(probs, eps)
    return dvalues * -(targets / p - (1 - targets) / (1 - p)) / probs.size


def _binary_example(key):
    k1, k2 = jax.random.split(key)
    probs = jax.nn.sigmoid(jax.random.normal(k1, (6, 2)))
    return probs, jax.random.bernoulli(k2, 0.5, (6, 2)).astype(probs.dtype)


binary_crossentropy = Rule(
    "binary_crossentropy",
    _bce_forward,
    _bce_backward,
    "L = −mean[y log ŷ + (1−y) log(1−ŷ)]; ∂L/∂ŷ = −(y/ŷ − (1−y)/(1−ŷ))/J/N",
    example=_binary_example,
)


def _mse_forward(pred, target):
    return jnp.mean((target - pred) ** 2)


def _mse_backward(pred, target, dvalues):
    # L = mean (y − ŷ)²:  ∂L/∂ŷ = −2(y − ŷ) / J / N
    return dvalues * -2 * (target - pred) / pred.size


mse = Rule(
    "mse",
    _mse_forward,
    _mse_backward,
    "L = mean (y − ŷ)²; ∂L/∂ŷ = −2(y − ŷ)/J/N",
    example=lambda key: tuple(_normal(key, (6, 2), (6, 2))),
)


def _mae_forward(pred, target):
    return jnp.mean(jnp.abs(target - pred))


def _mae_backward(pred, target, dvalues):
    # L = mean |y − ŷ|:  ∂|y − ŷ|/∂ŷ = −sign(y − ŷ) = sign(ŷ − y), so ∂L/∂ŷ = sign(ŷ − y) / J / N
    # (undefined at ŷ = y, a kink; sign(0) = 0 lies between the one-sided derivatives −1 and +1)
    return dvalues * jnp.sign(pred - target) / pred.size


def _mae_example(key):
    pred, target = _normal(key, (6, 2), (6, 2))
    return pred, target.at[0, 0].set(pred[0, 0])  # one exact hit: a kink


mae = Rule(
    "mae",
    _mae_forward,
    _mae_backward,
    "L = mean |y − ŷ|; ∂L/∂ŷ = sign(ŷ − y)/J/N (kink at ŷ = y)",
    example=_mae_example,
)


def _l1_forward(w, *, lam=1.0):
    return lam * jnp.abs(w).sum()


def _l1_backward(w, dvalues, *, lam=1.0):
    # L1 = λ Σ|w|:  ∂L1/∂w = λ·sign₊(w), with sign₊(0) = +1 as in the book (|w| has a kink at 0)
    return dvalues * lam * jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype)


l1 = Rule(
    "l1",
    _l1_forward,
    _l1_backward,
    "L1 = λΣ|w|; ∂/∂w = λ·sign(w) (+1 at w = 0, a kink)",
    example=lambda key: (jnp.array([[0.5, -0.2, 0.0], [1.5, 0.0, -3.0]]),),
)


def _l2_forward(w, *, lam=1.0):
    return lam * (w * w).sum()


def _l2_backward(w, dvalues, *, lam=1.0):
    # L2 = λ Σw²:  ∂L2/∂w = 2λw
    return dvalues * 2 * lam * w


l2 = Rule(
    "l2",
    _l2_forward,
    _l2_backward,
    "L2 = λΣw²; ∂/∂w = 2λw",
    example=lambda key: tuple(_normal(key, (2, 3))),
)


CATALOG: dict[str, Rule] = {
    r.name: r
    for r in [
        add,
        multiply,
        maximum,
        polynomial,
        chain,
        neuron,
        dense,
        relu,
        leaky_relu,
        sigmoid,
        tanh,
        linear,
        softmax,
        log_softmax,
        dropout,
        categorical_crossentropy,
        softmax_crossentropy,
        binary_crossentropy,
        mse,
        mae,
        l1,
        l2,
    ]
}
