"""The hand-derived gradient with dropout on, as training computes it (issue 13, class 8).

Objective.hand_grad(..., key=k, train=True) must equal jax.grad of Objective.value with the same key and
train=True (the same dropout masks), in float64, on small models, for the combined softmax + cross-entropy
path and for the layer-by-layer one. Parameters and data are kept off ReLU's kink, where the book's
convention (0) and JAX's (½) legitimately differ.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcgrad as fg

CASES = [
    ("categorical_crossentropy", "softmax", [8, 8, 3], "spiral"),
    ("categorical_crossentropy_with_logits", None, [8, 3], "spiral"),
    ("binary_crossentropy", "sigmoid", [8, 1], "binary"),
    ("mse", "linear", [8, 8, 1], "sine"),
]


def _setup(loss, output, sizes, data, rate=0.4):
    """The objective, float64 parameters (weights of size 0.4, biases 0.05) and 12 samples, drawn with NumPy."""
    rs = np.random.RandomState(0)
    n_in = 1 if data == "sine" else 2
    X = rs.randn(12, n_in) if data != "sine" else rs.rand(12, 1)
    if data == "spiral":
        y = jnp.asarray(rs.randint(0, 3, 12))
    elif data == "binary":
        y = jnp.asarray(rs.randint(0, 2, (12, 1)).astype(np.float64))
    else:
        y = jnp.asarray(np.sin(2 * np.pi * X))
    model = fg.nn.mlp(sizes, dropout=rate, output=output)
    obj = fg.Objective(model, loss, l1={"dense1/W": 1e-3}, l2={"*/b": 1e-3})
    params, width = {}, n_in
    for i, units in enumerate(sizes, 1):
        params[f"dense{i}"] = {"W": jnp.asarray(0.4 * rs.randn(width, units)), "b": jnp.full((units,), 0.05)}
        width = units
    return obj, params, jnp.asarray(X), y


def _grads(obj, X, y):
    """Jitted: the hand gradient and autodiff's, each with dropout driven by a key (one compilation each)."""
    hand = jax.jit(lambda p, k: obj.hand_grad(p, X, y, key=k, train=True))
    auto = jax.jit(jax.grad(lambda p, k: obj.value(p, X, y, key=k, train=True)))
    return hand, auto


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - z))) for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("loss,output,sizes,data", CASES, ids=[c[0] for c in CASES])
@pytest.mark.slow
def test_hand_grad_with_dropout_equals_autodiff_with_the_same_key(loss, output, sizes, data, x64):
    obj, params, X, y = _setup(loss, output, sizes, data)
    hand, auto = _grads(obj, X, y)
    for seed in (1, 2):
        key = jax.random.key(seed)
        jax.tree.map(lambda h, a: np.testing.assert_allclose(np.asarray(h), np.asarray(a), rtol=1e-9, atol=1e-13),
                     hand(params, key), auto(params, key))
    # dropout really acts here: with another key, or without training, the gradient is another one
    g0 = jax.jit(jax.grad(lambda p: obj.value(p, X, y)))(params)
    assert _max_diff(auto(params, jax.random.key(1)), auto(params, jax.random.key(2))) > 1e-4
    assert _max_diff(auto(params, jax.random.key(1)), g0) > 1e-4


def test_hand_grad_without_training_ignores_the_key(x64):
    obj, params, X, y = _setup(*CASES[0])
    evaluate = jax.jit(lambda p, k: obj.hand_grad(p, X, y, key=k, train=False))
    plain = jax.jit(lambda p: obj.hand_grad(p, X, y))(params)
    auto = jax.jit(jax.grad(lambda p: obj.value(p, X, y)))(params)
    jax.tree.map(lambda u, v, w: (np.testing.assert_array_equal(np.asarray(u), np.asarray(v)),
                                  np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-9, atol=1e-13)),
                 evaluate(params, jax.random.key(1)), plain, auto)


def test_hand_grad_with_dropout_without_partitionable_threefry(x64):
    # The combined softmax path runs the model without its last layer; its layers must still get the keys the
    # whole model gives them (a split into one key fewer differs once threefry is not partitionable).
    obj, params, X, y = _setup(*CASES[0])
    key = jax.random.key(1)
    with jax.threefry_partitionable(False):
        hand, auto = _grads(obj, X, y)
        jax.tree.map(lambda h, a: np.testing.assert_allclose(np.asarray(h), np.asarray(a), rtol=1e-9, atol=1e-13),
                     hand(params, key), auto(params, key))
