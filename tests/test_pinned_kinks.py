"""Values exactly at a kink or a threshold, pinned to the book's conventions (issue 13, class 1).

Every expected value comes from a NumPy transcription of the book's code ("Neural Networks from Scratch",
see ../shared/reference/nnfs.md), evaluated at inputs that sit exactly on the kink or threshold: ReLU's
``dinputs[z <= 0] = 0`` at z == 0, leaky ReLU at 0, ``(outputs > 0.5) * 1``, ``|ŷ − y| < precision``, the
cross-entropy clip to [1e-7, 1 − 1e-7] at probabilities exactly 0 and 1, the first index winning an argmax tie.
Each test also checks that the other side of the convention would give a different answer there, so the
test cannot pass by accident.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import book_mlp_numpy

import funcgrad as fg
from funcgrad import rules

EPS = 1e-7  # the book's clip

# ---- NumPy transcriptions of the book's code ----


def book_relu_backward(z, dvalues):
    dinputs = np.array(dvalues, dtype=np.float64, copy=True)
    dinputs[np.asarray(z) <= 0] = 0
    return dinputs


def book_cce(probs, y):
    probs = np.asarray(probs, np.float64)
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    y = np.asarray(y)
    conf = clipped[range(len(probs)), y] if y.ndim == 1 else np.sum(clipped * y, axis=1)
    return -np.mean(np.log(conf))


def book_bce(probs, y):
    clipped = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, np.float64)
    sample = -(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))
    return np.mean(np.mean(sample, axis=-1))


def book_bce_backward(dvalues, y):
    samples, outputs = np.shape(dvalues)
    clipped = np.clip(np.asarray(dvalues, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, np.float64)
    return -(y / clipped - (1 - y) / (1 - clipped)) / outputs / samples


def book_cce_backward(dvalues, y):
    dvalues = np.asarray(dvalues, np.float64)
    samples, labels = dvalues.shape
    y_true = np.eye(labels)[np.asarray(y)]
    return -y_true / dvalues / samples


def book_binary_accuracy(outputs, y):
    predictions = (np.asarray(outputs) > 0.5) * 1
    return np.mean(predictions == np.asarray(y))


def book_regression_accuracy(predictions, y, precision):
    return np.mean(np.absolute(np.asarray(predictions) - np.asarray(y)) < precision)


def book_accuracy(outputs, y):
    return np.mean(np.argmax(np.asarray(outputs), axis=1) == np.asarray(y))


# ---- ReLU at z == 0 ----

Z = np.array([[0.0, -0.0, 1e-30, -1e-30], [2.0, 0.0, -3.0, 5e-38]], np.float32)
DV = np.arange(1.0, 9.0, dtype=np.float32).reshape(2, 4)


def test_relu_rule_backward_is_zero_at_exactly_zero():
    got = np.asarray(rules.relu.backward(jnp.asarray(Z), jnp.asarray(DV)))
    np.testing.assert_array_equal(got, book_relu_backward(Z, DV))
    assert got[0, 0] == 0 and got[0, 1] == 0 and got[1, 1] == 0  # the kink itself, both zeros
    assert got[0, 2] == DV[0, 2] and got[1, 3] == DV[1, 3]  # the smallest positive inputs pass
    np.testing.assert_array_equal(np.asarray(rules.relu.forward(jnp.asarray(Z))), np.maximum(Z, 0))


def test_relu_layer_backward_is_zero_at_exactly_zero():
    layer = fg.nn.relu()
    dparams, dx = layer.backward({}, jnp.asarray(Z), jnp.asarray(DV))
    assert dparams == {}
    np.testing.assert_array_equal(np.asarray(dx), book_relu_backward(Z, DV))


def test_neuron_rule_at_z_exactly_zero_passes_nothing():
    # z = 1·2 + 2·(−1) + 0 = 0 exactly: ReLU'(0) = 0 (the book's), so no gradient reaches x, w or b
    x, w, b = jnp.array([1.0, 2.0]), jnp.array([2.0, -1.0]), jnp.array(0.0)
    dx, dw, db = rules.neuron.backward(x, w, b, jnp.array(1.0))
    np.testing.assert_array_equal(np.asarray(dx), [0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(dw), [0.0, 0.0])
    assert float(db) == 0.0
    dx, dw, db = rules.neuron.backward(x, w, jnp.array(1e-6), jnp.array(1.0))  # just above the kink: all pass
    np.testing.assert_array_equal(np.asarray(dx), [2.0, -1.0])
    assert float(db) == 1.0


# A model whose hidden pre-activations are exactly 0 at (0, 0) and (1, 2), with nonzero inputs there.
KINK_X = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 1.0]])
KINK_W1 = np.array([[2.0, 1.0, -1.0], [-1.0, 0.5, 0.5]])
KINK_B1 = np.array([0.0, -1.0, 1.0])
KINK_W2 = np.array([[0.3, -0.2, 0.5], [-0.4, 0.1, 0.2], [0.25, 0.6, -0.35]])
KINK_B2 = np.array([0.01, -0.02, 0.03])
KINK_Y = np.array([0, 1, 2])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.slow
def test_objective_hand_grad_takes_relu_derivative_zero_at_exactly_zero(dtype):
    z1 = KINK_X @ KINK_W1 + KINK_B1
    assert z1[0, 0] == 0 and z1[1, 2] == 0  # the kinks are really hit
    model = fg.nn.mlp([3, 3], output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy")
    expected = book_mlp_numpy(KINK_W1, KINK_B1, KINK_W2, KINK_B2, KINK_X, KINK_Y)[3]
    other = book_mlp_numpy(KINK_W1, KINK_B1, KINK_W2, KINK_B2, KINK_X, KINK_Y, relu_at_zero=1.0)[3]
    assert np.max(np.abs(expected["dense1"]["b"] - other["dense1"]["b"])) > 1e-3  # the convention matters here
    with jax.enable_x64(dtype == jnp.float64):
        params = {"dense1": {"W": jnp.asarray(KINK_W1, dtype), "b": jnp.asarray(KINK_B1, dtype)},
                  "dense2": {"W": jnp.asarray(KINK_W2, dtype), "b": jnp.asarray(KINK_B2, dtype)}}
        hand = obj.hand_grad(params, jnp.asarray(KINK_X, dtype), jnp.asarray(KINK_Y))
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=tol, atol=tol),
                 hand, expected)


def test_objective_hand_grad_relu_zero_also_without_the_combined_softmax_path():
    # Sigmoid + BCE goes through each layer's own backward (no combined softmax rule): ReLU at 0 is still 0.
    X = KINK_X
    y = np.array([[1.0], [0.0], [1.0]])
    W2 = KINK_W2[:, :1]
    b2 = KINK_B2[:1]
    model = fg.nn.mlp([3, 1], output="sigmoid")
    obj = fg.Objective(model, "binary_crossentropy")
    z1 = X @ KINK_W1 + KINK_B1
    a1 = np.maximum(0, z1)
    out = 1 / (1 + np.exp(-(a1 @ W2 + b2)))
    dout = book_bce_backward(out, y)
    dz2 = dout * (1 - out) * out
    dz1 = book_relu_backward(z1, dz2 @ W2.T)
    expected = {"dense1": {"W": X.T @ dz1, "b": dz1.sum(0)}, "dense2": {"W": a1.T @ dz2, "b": dz2.sum(0)}}
    assert abs((dz2 @ W2.T)[0, 0]) > 1e-3 and abs((dz2 @ W2.T)[1, 2]) > 1e-3  # a gradient arrives at the kinks
    with jax.enable_x64(True):
        params = {"dense1": {"W": jnp.asarray(KINK_W1), "b": jnp.asarray(KINK_B1)},
                  "dense2": {"W": jnp.asarray(W2), "b": jnp.asarray(b2)}}
        hand = obj.hand_grad(params, jnp.asarray(X), jnp.asarray(y))
    jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g), r, rtol=1e-12, atol=1e-15), hand, expected)


# ---- leaky ReLU at 0, max at a tie, |x| at 0 ----


@pytest.mark.parametrize("alpha", [0.01, 0.2])
def test_leaky_relu_at_exactly_zero_takes_the_alpha_side(alpha):
    x = jnp.array([[0.0, -0.0, 1e-30, -1e-30, 2.0, -3.0]])
    dv = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    xn, dn = np.asarray(x, np.float64), np.asarray(dv, np.float64)
    expected = np.where(xn > 0, dn, alpha * dn)  # ∂/∂x = 1 if x > 0 else α: α at x == 0
    got = rules.leaky_relu.backward(x, dv, alpha=alpha)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    assert float(got[0, 0]) == pytest.approx(alpha * 1.0) and float(got[0, 1]) == pytest.approx(alpha * 2.0)
    _, dx = fg.nn.leaky_relu(alpha).backward({}, x, dv)
    np.testing.assert_allclose(np.asarray(dx), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rules.leaky_relu.forward(x, alpha=alpha)), np.where(xn > 0, xn, alpha * xn),
                               rtol=1e-6)


def test_maximum_rule_gives_a_tie_wholly_to_x():
    x, y = jnp.array([1.0, 2.0, -1.0]), jnp.array([1.0, 3.0, -2.0])
    dx, dy = rules.maximum.backward(x, y, jnp.array([5.0, 6.0, 7.0]))
    np.testing.assert_array_equal(np.asarray(dx), [5.0, 0.0, 7.0])  # the tie (index 0) goes to x
    np.testing.assert_array_equal(np.asarray(dy), [0.0, 6.0, 0.0])


def test_mae_at_an_exact_hit_and_l1_at_zero():
    pred, target = jnp.array([[1.0, 2.0], [0.5, -1.0]]), jnp.array([[1.0, 1.0], [1.5, -1.0]])
    got = rules.mae.backward(pred, target, jnp.array(1.0))
    np.testing.assert_allclose(np.asarray(got), [[0.0, 0.25], [-0.25, 0.0]])  # sign(0) = 0 at an exact hit
    # The book's L1: dL1 = ones; dL1[weights < 0] = −1, so +λ at w == 0
    w = np.array([[0.0, -0.0, 1.0], [-2.0, 0.0, 3.0]])
    book = np.ones_like(w)
    book[w < 0] = -1
    got = rules.l1.backward(jnp.asarray(w, jnp.float32), jnp.array(1.0), lam=0.3)
    np.testing.assert_allclose(np.asarray(got), 0.3 * book, rtol=1e-6)
    assert float(got[0, 0]) > 0 and float(got[0, 1]) > 0


def test_objective_l1_gradient_is_plus_lambda_at_weights_exactly_zero():
    model = fg.nn.mlp([2, 2], output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy", l1={"dense1/W": 0.5})
    params = {"dense1": {"W": jnp.zeros((2, 2)), "b": jnp.array([0.1, 0.2])},
              "dense2": {"W": jnp.array([[0.3, -0.1], [0.2, 0.4]]), "b": jnp.zeros(2)}}
    X, y = jnp.array([[1.0, 2.0], [-1.0, 0.5]]), jnp.array([0, 1])
    no_reg = fg.Objective(model, "categorical_crossentropy").hand_grad(params, X, y)
    got = obj.hand_grad(params, X, y)
    np.testing.assert_allclose(np.asarray(got["dense1"]["W"] - no_reg["dense1"]["W"]), 0.5 * np.ones((2, 2)), rtol=1e-6)


# ---- accuracy thresholds ----


def test_binary_accuracy_puts_exactly_one_half_in_class_zero():
    half = np.float32(0.5)
    probs = np.array([[half], [half], [np.nextafter(half, np.float32(1))], [np.nextafter(half, np.float32(0))]],
                     np.float32)
    targets = np.array([[0.0], [1.0], [1.0], [0.0]], np.float32)
    got = float(fg.metrics.binary_accuracy(jnp.asarray(probs), jnp.asarray(targets)))
    assert got == book_binary_accuracy(probs, targets) == 0.75  # 0.5 → class 0: right for target 0, wrong for 1
    assert float(fg.metrics.binary_accuracy(jnp.array([[0.5]]), jnp.array([[0.0]]))) == 1.0
    assert float(fg.metrics.binary_accuracy(jnp.array([[0.5]]), jnp.array([[1.0]]))) == 0.0


def test_binary_accuracy_at_a_non_default_threshold():
    probs = jnp.array([[0.25], [0.25], [0.3], [0.2], [0.6]])
    targets = jnp.array([[0.0], [1.0], [1.0], [0.0], [1.0]])
    # the book's rule at threshold 0.25: (ŷ > 0.25) — 0.25 itself is class 0
    expected = np.mean((np.asarray(probs) > 0.25) == (np.asarray(targets) > 0.5))
    got = float(fg.metrics.binary_accuracy(probs, targets, threshold=0.25))
    assert got == pytest.approx(expected) == pytest.approx(0.8)
    assert float(fg.metrics.binary_accuracy(probs, targets)) == pytest.approx(0.6)  # default 0.5: a different answer


def test_regression_accuracy_excludes_an_error_exactly_at_the_precision():
    y = np.array([[0.0], [1.0], [2.0], [3.0]])
    pred = y + np.array([[0.25], [-0.25], [0.125], [0.5]])  # exactly at the limit twice, inside once, outside once
    got = float(fg.metrics.regression_accuracy(jnp.asarray(pred, jnp.float32), jnp.asarray(y, jnp.float32),
                                               precision=0.25))
    assert got == book_regression_accuracy(pred, y, 0.25) == 0.25


def test_regression_accuracy_default_precision_is_population_std_over_250():
    with jax.enable_x64(True):
        y = np.array([[0.0], [1.0], [2.0], [5.0]])
        s0 = np.std(y) / 250  # ddof 0, as np.std in the book
        s1 = np.std(y, ddof=1) / 250
        assert s1 > 1.1 * s0
        # errors between the two limits: outside with ddof 0, inside with ddof 1; one well inside
        pred = y + np.array([[1.07 * s0], [-1.07 * s0], [0.5 * s0], [-0.9 * s0]])
        got = float(fg.metrics.regression_accuracy(jnp.asarray(pred), jnp.asarray(y)))
        assert got == book_regression_accuracy(pred, y, s0) == 0.5


# ---- the cross-entropy clip at probabilities exactly 0 and 1 ----


def test_categorical_crossentropy_clips_exactly_one_and_exactly_zero(x64):
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    for labels in ([0, 1, 0], [0, 0, 2]):  # true probability 1 (twice) and 0.5; then 1, 0 and 0 (clipped to 1e-7)
        got = float(fg.losses.categorical_crossentropy(jnp.asarray(probs), jnp.asarray(labels)))
        assert got == pytest.approx(book_cce(probs, labels), rel=1e-12)
        one_hot = np.eye(3)[labels]
        got = float(fg.losses.categorical_crossentropy(jnp.asarray(probs), jnp.asarray(one_hot)))
        assert got == pytest.approx(book_cce(probs, one_hot), rel=1e-12)
    # at exactly 1 the loss is −log(1 − 1e-7) ≈ 1e-7, not 0; at exactly 0 it is −log(1e-7), not inf
    one = float(fg.losses.categorical_crossentropy(jnp.array([[1.0, 0.0]]), jnp.array([0])))
    assert one == pytest.approx(-np.log(1 - EPS), rel=1e-9) and one > 0
    zero = float(fg.losses.categorical_crossentropy(jnp.array([[1.0, 0.0]]), jnp.array([1])))
    assert zero == pytest.approx(-np.log(EPS), rel=1e-12)


def test_categorical_crossentropy_clip_in_float32():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    got = float(fg.losses.categorical_crossentropy(jnp.asarray(probs), jnp.array([0, 0])))
    assert got == pytest.approx(book_cce(np.clip(probs, np.float32(1e-7), np.float32(1 - 1e-7)), [0, 0]), rel=1e-5)


def test_categorical_crossentropy_backward_is_not_clipped_at_one(x64):
    probs = np.array([[1.0, 0.25, 0.5], [0.2, 0.3, 0.5]])
    y = np.array([0, 2])
    got = np.asarray(rules.categorical_crossentropy.backward(jnp.asarray(probs), jnp.asarray(y), jnp.array(1.0)))
    expected = book_cce_backward(probs, y)
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)
    assert got[0, 0] == -0.5  # −1/1/N exactly: the book does not clip in backward


def test_binary_crossentropy_clips_exactly_zero_and_one_forward_and_backward(x64):
    probs = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    y = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    got = float(fg.losses.binary_crossentropy(jnp.asarray(probs), jnp.asarray(y)))
    assert got == pytest.approx(book_bce(probs, y), rel=1e-12)
    assert float(fg.losses.binary_crossentropy(jnp.array([[1.0]]), jnp.array([[1.0]]))) == pytest.approx(
        -np.log(1 - EPS), rel=1e-9)
    back = np.asarray(rules.binary_crossentropy.backward(jnp.asarray(probs), jnp.asarray(y), jnp.array(1.0)))
    np.testing.assert_allclose(back, book_bce_backward(probs, y), rtol=1e-12)
    assert np.all(np.isfinite(back))


# ---- argmax ties ----


def test_accuracy_breaks_argmax_ties_towards_the_first_class():
    outputs = jnp.array([[0.4, 0.4, 0.2], [0.1, 0.45, 0.45], [1 / 3, 1 / 3, 1 / 3]])
    assert float(fg.metrics.accuracy(outputs, jnp.array([0, 1, 0]))) == 1.0
    assert float(fg.metrics.accuracy(outputs, jnp.array([1, 2, 2]))) == 0.0
    rs = np.random.RandomState(0)
    scores = rs.randint(0, 3, size=(200, 4)).astype(np.float32)  # many ties
    labels = rs.randint(0, 4, size=200)
    got = float(fg.metrics.accuracy(jnp.asarray(scores), jnp.asarray(labels)))
    assert got == pytest.approx(book_accuracy(scores, labels))
    last_wins = np.mean(3 - np.argmax(scores[:, ::-1], axis=1) == labels)
    assert abs(book_accuracy(scores, labels) - last_wins) > 0.02  # the tie rule matters on these data
    one_hot = np.eye(4, dtype=np.float32)[labels]
    assert float(fg.metrics.accuracy(jnp.asarray(scores), jnp.asarray(one_hot))) == pytest.approx(got)
