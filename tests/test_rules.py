"""The catalog's hand-derived backward passes against the book's printed numbers and NumPy transcriptions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funcgrad import rules


def test_book_dense_layer_backward():
    weights = jnp.array([[0.2, 0.8, -0.5, 1], [0.5, -0.91, 0.26, -0.5], [-0.26, -0.27, 0.17, 0.87]]).T
    dvalues = jnp.array([[1.0, 1, 1], [2, 2, 2], [3, 3, 3]])
    inputs = jnp.array([[1, 2, 3, 2.5], [2.0, 5, -1, 2], [-1.5, 2.7, 3.3, -0.8]])
    dx, dW, db = rules.dense.backward(inputs, weights, jnp.zeros(3), dvalues)
    np.testing.assert_allclose(
        np.asarray(dx), [[0.44, -0.38, -0.07, 1.37], [0.88, -0.76, -0.14, 2.74], [1.32, -1.14, -0.21, 4.11]], atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(dW), [[0.5] * 3, [20.1] * 3, [10.9] * 3, [4.1] * 3], atol=1e-5)
    np.testing.assert_allclose(np.asarray(db), [6, 6, 6])


def test_book_relu_mask():
    z = jnp.array([[1.0, 2, -3, -4], [2, -7, -1, 3], [-1, 2, 5, -1]])
    dvalues = jnp.arange(1.0, 13.0).reshape(3, 4)
    np.testing.assert_array_equal(
        np.asarray(rules.relu.backward(z, dvalues)), [[1, 2, 0, 0], [5, 0, 0, 8], [0, 10, 11, 0]]
    )


def test_book_softmax_crossentropy_combined_and_separate():
    softmax_outputs = np.array([[0.7, 0.1, 0.2], [0.1, 0.5, 0.4], [0.02, 0.9, 0.08]])
    targets = np.array([0, 1, 1])
    expected = [[-0.1, 0.0333333, 0.0666667], [0.0333333, -0.1666667, 0.1333333], [0.0066667, -0.0333333, 0.0266667]]
    # Combined: (ŷ − y)/N, with the logits whose softmax is these outputs.
    logits = jnp.log(jnp.asarray(softmax_outputs))
    combined = rules.softmax_crossentropy.backward(logits, jnp.asarray(targets), 1.0)
    np.testing.assert_allclose(np.asarray(combined), expected, atol=1e-6)
    # Separate: CCE backward, then softmax's Jacobian-vector product.
    dprobs = rules.categorical_crossentropy.backward(jnp.asarray(softmax_outputs), jnp.asarray(targets), 1.0)
    separate = rules.softmax.backward(logits, dprobs)
    np.testing.assert_allclose(np.asarray(separate), expected, atol=1e-6)


def test_softmax_jacobian_is_diag_minus_outer():
    x = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    J = np.asarray(rules.softmax_jacobian(x))
    for i, row in enumerate(np.asarray(rules.softmax(x))):
        np.testing.assert_allclose(J[i], np.diagflat(row) - np.outer(row, row), atol=1e-7)


RS = np.random.RandomState(0)


def numpy_backward(name, *primals, d):
    """The book's backward formulas in NumPy (../shared/reference/nnfs.md)."""
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-primals[0]))
        return d * (1 - s) * s
    if name == "tanh":
        return d * (1 - np.tanh(primals[0]) ** 2)
    if name == "binary_crossentropy":
        p, y = primals
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return d * -(y / p - (1 - y) / (1 - p)) / p.shape[1] / p.shape[0]
    if name == "mse":
        p, y = primals
        return d * -2 * (y - p) / p.shape[1] / p.shape[0]
    if name == "mae":
        p, y = primals
        return d * np.sign(p - y) / p.shape[1] / p.shape[0]
    if name == "l1":
        return d * 0.3 * np.where(primals[0] >= 0, 1, -1)
    if name == "l2":
        return d * 2 * 0.3 * primals[0]
    raise KeyError(name)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "binary_crossentropy", "mse", "mae", "l1", "l2"])
def test_backward_matches_numpy_transcription(name):
    rule = rules.CATALOG[name]
    primals = tuple(np.asarray(p, np.float64) for p in rule.example(jax.random.key(0)))
    hyper = {"lam": 0.3} if name in ("l1", "l2") else {}
    out_shape = jax.eval_shape(lambda *p: rule.forward(*p, **hyper), *primals).shape
    d = RS.randn(*out_shape)
    got = rule.backward(*(jnp.asarray(p) for p in primals), jnp.asarray(d), **hyper)
    np.testing.assert_allclose(np.asarray(got), numpy_backward(name, *primals, d=d), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_every_rule_has_a_formula_and_an_example():
    assert len(rules.CATALOG) >= 22
    for name, rule in rules.CATALOG.items():
        assert rule.name == name and rule.formula and rule.example is not None
        primals = rule.example(jax.random.key(1))
        out = rule(*primals)
        assert jnp.all(jnp.isfinite(out))


@pytest.mark.parametrize("name", sorted(rules.CATALOG))
@pytest.mark.slow
def test_every_rule_passes_the_three_way_check(name):
    from funcgrad import verify

    rule = rules.CATALOG[name]
    report = verify.check_vjp(rule.forward, rule.backward, *rule.example(jax.random.key(0)), argnums=rule.argnums)
    assert report.ok, report
    kinked = {"maximum", "relu", "leaky_relu", "mae", "l1"}  # their examples sit on kinks on purpose
    assert report.verdict == ("kink" if name in kinked else "ok"), report


def test_a_wrong_rule_is_caught():
    from funcgrad import verify

    sigmoid_wrong = lambda x, d: d * jax.nn.sigmoid(x)  # noqa: E731  forgot the (1 − σ) factor
    report = verify.check_vjp(rules.sigmoid.forward, sigmoid_wrong, *rules.sigmoid.example(jax.random.key(0)))
    assert report.verdict == "hand_wrong" and report.rows[0].path == "x"
