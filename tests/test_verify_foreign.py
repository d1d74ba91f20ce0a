"""funcgrad.verify on code nobody here wrote: subgradients at curved kinks, shared mistakes, non-finite
leaves, singular points, any float dtype, has_aux, whole Equinox and Flax NNX modules, NumPy hand
gradients, functions only forward mode can differentiate, zero-size leaves, and the report for bug reports.

Each case is written from its description; the expected values come from the calculus (one-sided derivatives,
the true gradient of a quadratic), not from running the checker."""

import dataclasses
import functools
import glob
import json
import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import funcgrad as fg
from funcgrad import verify

RS = np.random.RandomState(7)


def row(report, path):
    return {r.path: r for r in report.rows}[path]


def shown_gap(r):
    """The largest difference among the values a row shows: what its abs err must be."""
    vals = [v for v in (r.autodiff, r.hand, r.numeric) if v is not None]
    return max(abs(a - b) for a in vals for b in vals)


# ---- 1. kinks with curvature beside them -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("sign0", [0.0, 1.0, -1.0])
def test_abs_at_zero_with_curvature_accepts_every_subgradient(dtype, sign0):
    # f = w² − |w|: D₋ = +1 and D₊ = −1 at 0, both exact; JAX's abs'(0) = 1 makes autodiff −1 = D₊.
    with jax.enable_x64(dtype == jnp.float64):
        w = jnp.array([0.0, 0.5, -1.5], dtype)
        report = verify.check_grad(lambda w: jnp.sum(w**2 - jnp.abs(w)), w,
                                   hand=lambda w: 2 * w - jnp.where(w == 0, sign0, jnp.sign(w)))
    assert report.verdict == "kink" and report.ok, report
    r = report.rows[0]
    assert r.worst_index == (0,) and r.autodiff == -1.0 and r.hand == pytest.approx(-sign0)


def test_relu_with_curvature_and_an_inclusive_mask_is_a_kink():
    # f = (b − 3)² − 2·relu(b) at b = 0: D₋ = −6, D₊ = −8; the hand's mask b >= 0 takes D₊.
    report = verify.check_grad(lambda b: jnp.sum((b - 3) ** 2 - 2 * jax.nn.relu(b)), jnp.array([0.0, 1.0]),
                               hand=lambda b: 2 * (b - 3) - 2 * (b >= 0))
    assert report.verdict == "kink", report
    assert report.rows[0].worst_index == (0,) and report.rows[0].hand == -8.0


@pytest.mark.usefixtures("implicit_broadcasting")
@pytest.mark.parametrize("mask", [">=", ">"])
@pytest.mark.slow
def test_relu_network_on_integer_data_with_zero_biases(mask):
    # Integer inputs and weights with zero biases put many pre-activations exactly on 0.
    X = jnp.asarray(RS.randint(-2, 3, size=(12, 3)), jnp.float32)
    params = {"W1": jnp.asarray(RS.randint(-1, 2, size=(3, 5)), jnp.float32), "b1": jnp.zeros(5),
              "W2": jnp.asarray(RS.randn(5, 2) * 0.5, jnp.float32), "b2": jnp.zeros(2)}

    def loss(p, X):
        h = jax.nn.relu(X @ p["W1"] + p["b1"])
        return jnp.mean(jnp.sum((h @ p["W2"] + p["b2"] - 1.0) ** 2, axis=1))

    def hand(p, X):
        z = X @ p["W1"] + p["b1"]
        h = jnp.maximum(z, 0.0)
        dout = 2 * (h @ p["W2"] + p["b2"] - 1.0) / X.shape[0]
        dz = (dout @ p["W2"].T) * ((z >= 0) if mask == ">=" else (z > 0))
        return {"W1": X.T @ dz, "b1": dz.sum(0), "W2": h.T @ dout, "b2": dout.sum(0)}

    assert np.any(np.asarray(X @ params["W1"]) == 0)
    report = verify.check_grad(loss, params, X, hand=hand)
    assert report.ok and report.verdict == "kink", report


def _book_relu_mlp(sizes, X, y, rng):
    """The book's dense → ReLU → ... → softmax cross-entropy with its own initialisation (0.1·randn weights, zero
    (1, n) biases) and its NumPy backward (``dinputs[z <= 0] = 0``, the combined softmax/cross-entropy step):
    (params, fn spelling ReLU as the book does, jnp.maximum(0, z), hand)."""
    params = [{"W": (0.1 * rng.standard_normal((a, b))).astype(np.float32), "b": np.zeros((1, b), np.float32)}
              for a, b in zip(sizes[:-1], sizes[1:], strict=True)]

    def loss(p, X, y):
        h = X
        for q in p[:-1]:
            h = jnp.maximum(0, h @ q["W"] + q["b"])
        logp = jax.nn.log_softmax(h @ p[-1]["W"] + p[-1]["b"], axis=1)
        return -jnp.mean(logp[jnp.arange(len(y)), y])

    def hand(p, X, y):
        inputs, zs, h = [], [], np.asarray(X)
        for q in p[:-1]:
            inputs.append(h)
            zs.append(h @ q["W"] + q["b"])
            h = np.maximum(0, zs[-1])
        inputs.append(h)
        z = h @ p[-1]["W"] + p[-1]["b"]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        dvalues = e / e.sum(axis=1, keepdims=True)
        dvalues[range(len(y)), y] -= 1
        dvalues = dvalues / len(y)
        grads = [None] * len(p)
        for i in reversed(range(len(p))):
            grads[i] = {"W": inputs[i].T @ dvalues, "b": np.sum(dvalues, axis=0, keepdims=True)}
            dvalues = dvalues @ p[i]["W"].T
            if i:
                dvalues = dvalues.copy()
                dvalues[zs[i - 1] <= 0] = 0
        return grads

    return params, loss, hand


@pytest.mark.slow
def test_the_books_backward_where_dead_units_put_the_next_layer_on_its_kinks():
    # Book initialisation on the spiral data: samples whose first-layer units are all dead feed exactly 0 into the
    # second layer, whose ReLUs then all sit at 0 (b = 0) for those samples. Each element of the book's backward is
    # a valid one-sided derivative there; a random direction moving every bias at once crosses kinks of both
    # curvatures, where such a choice need not lie between the direction's one-sided derivatives. That used to
    # fail the correct hand (hand_wrong on [1]['b'], no element named) when fn spelt ReLU jnp.maximum(0, z).
    X, y = fg.data.spiral(30, 3, key=0)
    X, y = np.asarray(X, np.float32), np.asarray(y).astype(np.uint8)
    params, loss, hand = _book_relu_mlp([2, 3, 4, 3], X, y, np.random.default_rng(5))
    h1 = np.maximum(0, X @ params[0]["W"] + params[0]["b"])
    assert (h1 == 0).all(axis=1).sum() > 5  # the premise: dead first layers, second layer at its kinks
    report = verify.check_grad(loss, params, X, y, hand=hand)
    assert report.ok and report.verdict == "kink", report
    # One element of the hand outside its one-sided interval is still blamed, at that element.

    def wrong(p, X, y):
        g = hand(p, X, y)
        g[1]["b"] = g[1]["b"] + np.array([[0.0, 0.0, 0.01, 0.0]], np.float32)
        return g

    report = verify.check_grad(loss, params, X, y, hand=wrong)
    row = report.rows[[r.path for r in report.rows].index("[1]['b']")]
    assert report.verdict == "hand_wrong" and row.verdict == "hand_wrong" and row.worst_index == (0, 2), report


def test_the_books_backward_on_integer_data_with_zero_biases_where_many_kinks_meet():
    # Integer inputs and weights with zero biases put many pre-activations exactly at 0, several on one coordinate,
    # moving in opposite directions: the book's relu'(0) = 0 and JAX's jnp.maximum (1/2 at the tie) both add up to
    # values outside [D₋, D₊], which finite differences cannot judge. Off the kinks (a 1% shift) both check out,
    # so the book's correct backward is a kink, not a failure; a wrong one still fails.
    rng = np.random.default_rng(3)
    X = rng.integers(-2, 3, size=(60, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=60)
    params, loss, hand = _book_relu_mlp([2, 8, 8, 3], X, y, rng)
    params[0]["W"] = rng.integers(-2, 3, size=(2, 8)).astype(np.float32)
    params[1]["W"] = rng.integers(-1, 2, size=(8, 8)).astype(np.float32)
    z1 = X @ params[0]["W"]
    assert (z1 == 0).sum() > 40  # the premise: many first-layer kinks
    report = verify.check_grad(loss, params, X, y, hand=hand)
    assert report.ok and report.verdict == "kink", report
    assert any("off the kinks" in r.note for r in report.rows), report

    def wrong(p, X, y):  # the combined softmax/cross-entropy step without its 1/samples
        return [{k: v * len(y) for k, v in g.items()} for g in hand(p, X, y)]

    bad = verify.check_grad(loss, params, X, y, hand=wrong)
    assert bad.verdict == "hand_wrong" and all(r.verdict == "hand_wrong" for r in bad.rows[-2:]), bad

    def one_off(p, X, y):  # one first-layer weight 2% of the leaf's largest off: smaller than the choices' gaps
        g = hand(p, X, y)
        g[0]["W"] = g[0]["W"].copy()
        g[0]["W"][1, 2] += 0.02 * np.abs(g[0]["W"]).max()
        return g

    bad = verify.check_grad(loss, params, X, y, hand=one_off)
    assert not bad.ok and not bad.rows[0].ok, bad


@pytest.mark.usefixtures("implicit_broadcasting")
@pytest.mark.parametrize("mask", ["<=", "<", "relu'(0) = 2"])
def test_the_books_l1_penalty_at_zero_weights_beside_relus_at_zero(mask):
    # The book's L1 term (λ·sign(W)) at a zero-initialised first layer on integer data: every |w| and every ReLU sits
    # at its kink. The correct backward (``dinputs[inputs <= 0] = 0``, λ·sign(0) = 0) and the ``<`` mask are choices
    # at each kink; the check failed them (h74: hand_wrong, "outside the range beside"), the range then holding the
    # all-off/all-on ReLU extremes only with every |w| on one side too. relu'(0) = 2 is no choice, and fails.
    lam = 1e-3
    rng = np.random.default_rng(2)
    X = rng.integers(-2, 3, size=(8, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=8)
    p = {"W1": np.zeros((4, 4), np.float32), "b1": np.zeros(4, np.float32),
         "W2": (0.5 * rng.normal(size=(4, 3))).astype(np.float32), "b2": np.zeros(3, np.float32)}

    def loss(p, X, y):
        h = jnp.maximum(0, X @ p["W1"] + p["b1"])
        logp = jax.nn.log_softmax(h @ p["W2"] + p["b2"], axis=1)
        return -jnp.mean(logp[jnp.arange(len(y)), y]) + lam * jnp.sum(jnp.abs(p["W1"]))

    def hand(p, X, y):
        z1 = X @ p["W1"] + p["b1"]
        a1 = np.maximum(0, z1)
        z2 = a1 @ p["W2"] + p["b2"]
        e = np.exp(z2 - z2.max(axis=1, keepdims=True))
        d = e / e.sum(axis=1, keepdims=True)
        d[range(len(y)), y] -= 1
        d = d / len(y)
        dz = d @ p["W2"].T
        if mask == "<=":
            dz[z1 <= 0] = 0
        elif mask == "<":
            dz[z1 < 0] = 0
        else:
            dz[z1 < 0] = 0
            dz[z1 == 0] *= 2
        return {"W1": X.T @ dz + lam * np.sign(p["W1"]), "b1": dz.sum(0), "W2": a1.T @ d, "b2": d.sum(0)}

    report = verify.check_grad(loss, p, X, y, hand=hand)
    if mask == "relu'(0) = 2":
        assert report.verdict == "hand_wrong" and row(report, "['W1']").verdict == "hand_wrong", report
    else:
        assert report.ok and row(report, "['W1']").verdict == "kink", report


def test_check_vjp_of_the_books_dense_relu_layer_on_integer_data_where_kinks_meet_on_an_input():
    # relu(X @ W + b) with integer X and W: 31 of 240 pre-activations exactly 0, several in one row of X, so the
    # derivative along one input element crosses several kinks moving in opposite directions. The book's backward
    # (mask z > 0, as JAX's relu'(0) = 0) agrees with jax.vjp there, at 0, outside [D₋, D₊]: a sum of choices at
    # each kink, not a shared mistake. check_vjp takes the second look off the kinks, as check_grad does.
    rng = np.random.RandomState(1)
    X = rng.randint(-2, 3, size=(40, 4)).astype(np.float32)
    W = rng.randint(-1, 2, size=(4, 6)).astype(np.float32)
    b = np.zeros((1, 6), np.float32)
    assert ((X @ W) == 0).sum() > 20  # the premise

    def forward(W, b, X):
        return jnp.maximum(0, X @ W + b)

    def backward(W, b, X, dvalues):  # the book's, in NumPy, in place on a copy
        z = np.asarray(X) @ np.asarray(W) + np.asarray(b)
        dz = np.array(dvalues, copy=True)
        dz[z <= 0] = 0
        return np.asarray(X).T @ dz, dz.sum(0, keepdims=True), dz @ np.asarray(W).T

    report = verify.check_vjp(forward, backward, W, b, X)
    assert report.ok and report.verdict == "kink", report
    assert "kinks meet here" in row(report, "X").note, report

    def unmasked(W, b, X, dvalues):  # the ReLU's mask forgotten on the way to the inputs
        dW, db, _ = backward(W, b, X, dvalues)
        return dW, db, np.asarray(dvalues) @ np.asarray(W).T

    bad = verify.check_vjp(forward, unmasked, W, b, X)
    assert row(bad, "X").verdict == "hand_wrong" and row(bad, "W").ok and row(bad, "b").ok, bad


def _crelu_net(kinked_relu):
    """A CReLU-style unit: relu(a) and relu(−a) of the same pre-activation a (rows of W1 that are each other's
    negatives), at integer inputs putting a at exactly 0: no point nearby has both ReLUs off, as JAX's relu'(0) = 0
    has them at the point itself."""
    W1 = np.array([[1, 1, 0], [-1, -1, 2], [2, 2, -1], [-2, -2, 1], [1, 0, 1], [0, 1, -1]], np.float32)
    w2 = np.array([0.7, -1.3, 1.9, -0.4, 0.5, 1.1], np.float32)
    x = np.array([1.0, -1.0, 0.0], np.float32)
    assert (W1 @ x == 0).sum() == 4  # the premise: four ReLUs at 0, two of them each other's mirror

    def f(x):
        return w2 @ kinked_relu(W1 @ x)

    def hand(x):  # the book's backward: relu'(0) = 0
        z = W1 @ np.asarray(x)
        return ((z > 0) * w2) @ W1

    return f, hand, x


def test_relu_of_a_pre_activation_and_of_its_negative_both_at_zero_is_a_kink_not_a_mistake():
    # Along x[1] the one-sided derivatives (w2 · the active rows of W1) are both away from 0, and autodiff and the
    # book's hand both give 0 there: relu(a) and relu(−a) both off, a side no point gives (one of them is on at any
    # point beside). Sampled with
    # each kink on a side of its own, 0 is one of the values autodiff takes: kink, with or without a hand, and in
    # check_jacobian. A hand 3% off still fails, as hand_wrong.
    f, hand, x = _crelu_net(jax.nn.relu)
    for report in (verify.check_grad(f, x), verify.check_grad(f, x, hand=hand)):
        assert report.ok and report.verdict == "kink", report
        assert "each kink on a side of its own" in report.rows[0].note, report
    jac = verify.check_jacobian(lambda x: jnp.stack([f(x), 2 * f(x)]), x,
                                lambda x: np.stack([hand(x), 2 * hand(x)]))
    assert jac.ok and jac.verdict == "kink", jac
    off = verify.check_grad(f, x, hand=lambda x: 1.03 * hand(x))
    assert off.verdict == "hand_wrong", off


def test_a_relu_rule_giving_5_at_zero_inside_a_crelu_still_fails():
    # The second look samples JAX's and the frameworks' choices at kinks; a user's rule is evaluated as it is. Its
    # relu'(0) = 5 adds up to a value no side of the kinks gives: autodiff_wrong, as before the second look.
    @jax.custom_jvp
    def relu5(z):
        return jnp.maximum(z, 0.0)

    @relu5.defjvp
    def _(primals, tangents):
        (z,), (t,) = primals, tangents
        return relu5(z), jnp.where(z > 0, 1.0, jnp.where(z == 0, 5.0, 0.0)) * t

    f, hand, x = _crelu_net(relu5)
    report = verify.check_grad(f, x, hand=hand)
    assert report.verdict == "autodiff_wrong", report
    alone = verify.check_grad(f, x)
    assert alone.verdict == "autodiff_wrong", alone


def test_a_relu_rule_giving_5_at_zero_copied_into_the_hand_fails_where_every_relu_is_at_zero():
    # Zero-initialised first layer, integer data: every ReLU at 0. The rule's relu'(0) = 5, copied into the hand,
    # gives W1 values far outside what any choice at the kinks gives (each sample's term times s in [0, 1]), though
    # autodiff and hand agree: they were passed as kink ("both lie outside, several kinks may meet"). Looked at
    # again (the rule's inputs moved off its kink, never trusted at it): both_wrong.
    @jax.custom_jvp
    def relu5(x):
        return jnp.maximum(x, 0.0)

    @relu5.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return relu5(x), t * jnp.where(x > 0, 1.0, jnp.where(x == 0, 5.0, 0.0))

    rng = np.random.default_rng(3)
    X = jnp.asarray(rng.integers(-2, 3, (6, 3)).astype(np.float32))
    Y = jnp.asarray(rng.integers(-2, 3, (6,)).astype(np.float32))
    p0 = {"W1": jnp.zeros((3, 4)), "b1": jnp.zeros((1, 4)), "W2": jnp.array([1.0, -1.0, 2.0, 1.0]),
          "b2": jnp.float32(0.0)}

    def f(p):
        return jnp.mean((relu5(X @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"] - Y) ** 2)

    def hand(p, relu0=5.0):
        z = X @ p["W1"] + p["b1"]
        a = jnp.maximum(z, 0)
        d = 2 * (a @ p["W2"] + p["b2"] - Y) / X.shape[0]
        dz = jnp.outer(d, p["W2"]) * jnp.where(z > 0, 1.0, jnp.where(z == 0, relu0, 0.0))
        return {"W1": X.T @ dz, "b1": dz.sum(0, keepdims=True), "W2": a.T @ d, "b2": d.sum()}

    # (the premise, in float64: hand's W1 lies outside the range every choice at the kinks gives)
    Xn, Yn, W2 = (np.asarray(a, np.float64) for a in (X, Y, p0["W2"]))
    T = Xn[:, :, None] * ((2 * (0 - Yn) / 6)[:, None] * W2[None, :])[:, None, :]
    g = np.asarray(hand(p0)["W1"], np.float64)
    assert ((g < np.minimum(T, 0).sum(0) - 1e-6) | (g > np.maximum(T, 0).sum(0) + 1e-6)).any()
    report = verify.check_grad(f, p0, hand=hand)
    assert row(report, "['W1']").verdict == "both_wrong" and row(report, "['b1']").verdict == "both_wrong", report
    # The book's relu'(0) = 0 through jnp.maximum, with the same hand at relu'(0) = 0: a choice at every kink.
    good = verify.check_grad(lambda p: jnp.mean((jnp.maximum(X @ p["W1"] + p["b1"], 0) @ p["W2"] + p["b2"] - Y) ** 2),
                             p0, hand=lambda p: hand(p, 0.0))
    assert good.ok, good


def test_a_sign_flipped_hand_at_zero_weights_fails_though_every_element_sits_at_kinks():
    # Every z = 0: hand −Xᵀ(C·[z ≥ 0]) lay no farther from autodiff than autodiff from D₋ and D₊ together, and passed
    # as kink. Off the kinks it is plainly wrong: hand_wrong, with the values there.
    X = jnp.array([[2.0, -1.0], [-2.0, -1.0], [0.0, 2.0], [0.0, -2.0], [-1.0, 1.0]])
    C = jnp.array([[2.0, 1.0], [2.0, -2.0], [2.0, -2.0], [0.0, -1.0], [-1.0, 1.0]])

    def f(p):
        return jnp.sum(C * jax.nn.relu(X @ p["W"]))

    report = verify.check_grad(f, {"W": jnp.zeros((2, 2))}, hand=lambda p: {"W": -(X.T @ (C * (X @ p["W"] >= 0)))})
    assert report.verdict == "hand_wrong", report
    right = verify.check_grad(f, {"W": jnp.zeros((2, 2))}, hand=lambda p: {"W": X.T @ (C * (X @ p["W"] >= 0))})
    assert right.ok, right


@pytest.mark.usefixtures("implicit_broadcasting")
@pytest.mark.parametrize("routing", ["every tie", "first", "split"])
def test_a_max_rule_at_logits_tied_by_equal_weight_columns(routing):
    # A multiclass hinge loss through a custom max whose backward is g·(z == max): every tied maximum takes the whole
    # gradient. Weight column 3 a copy of column 0 ties two logits of every sample. Its points beside moved the
    # weights by a unit in the last place, after which float32's rounding kept the logits tied one time in four:
    # the wrong rule was read there as a side, and passed as kink (h75). Along the columns moved together the tie
    # stays, the loss is smooth, and the rule's value is twice the one every side gives.
    @jax.custom_vjp
    def rowmax(z):
        return jnp.max(z, -1)

    def bwd(z, g):
        eq = (z == jnp.max(z, -1, keepdims=True)).astype(z.dtype)
        w = {"every tie": eq, "split": eq / eq.sum(-1, keepdims=True),
             "first": jax.nn.one_hot(jnp.argmax(z, -1), z.shape[-1], dtype=z.dtype)}[routing]
        return (g[..., None] * w,)

    rowmax.defvjp(lambda z: (rowmax(z), z), bwd)
    W = jax.random.normal(jax.random.key(0), (4, 3))
    p = {"W": jnp.concatenate([W, W[:, :1]], 1), "b": jnp.zeros(4)}
    x = jnp.abs(jax.random.normal(jax.random.key(1), (6, 4)))
    y = jnp.array([1, 2, 0, 1, 2, 1])

    def loss(p, x, y):
        s = x @ p["W"] + p["b"]
        return jnp.mean(rowmax(s + 1.0 - jax.nn.one_hot(y, 4)) - s[jnp.arange(6), y])

    # (the premise: a sample whose maximum is the tied pair)
    s = np.asarray(x @ p["W"] + p["b"] + 1.0 - jax.nn.one_hot(y, 4))
    assert ((s[:, 0] == s[:, 3]) & (s[:, 0] == s.max(1))).any()
    report = verify.check_grad(loss, p, x, y)
    if routing == "every tie":
        assert report.verdict == "autodiff_wrong" and row(report, "['W']").verdict == "autodiff_wrong", report
    else:
        assert report.ok and report.verdict == "kink", report


def test_a_reduce_window_max_pool_with_every_window_tied_reads_first_maximum_routing_as_a_choice():
    # Flax's and Equinox's max-pool layers are lax.reduce_window: every window tied (duplicated weight columns,
    # integer data). The hand routes each tie to its first maximum, as JAX's own gradient does here; a window's
    # choice is read as one (each tie to its first element, or to its last, at either end of the draws).
    N, D, K = 16, 3, 8
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.integers(-2, 3, (N, D)).astype(np.float32))
    C = jnp.asarray(rng.integers(-2, 3, (N, K // 2)).astype(np.float32))
    W0 = jnp.asarray(np.repeat(rng.integers(-1, 2, (D, K // 2)), 2, axis=1).astype(np.float32))

    def pool(z):
        return jax.lax.reduce_window(z, -jnp.inf, jax.lax.max, (1, 2), (1, 2), "VALID")

    def hand(p):
        z = (X @ p["W"]).reshape(N, -1, 2)
        first = (jnp.argmax(z, -1)[..., None] == jnp.arange(2)[None, None, :]).astype(z.dtype)
        return {"W": X.T @ (first * C[..., None]).reshape(N, K)}

    report = verify.check_grad(lambda p: jnp.sum(C * pool(X @ p["W"])), {"W": W0}, hand=hand)
    assert report.ok and report.verdict == "kink", report


def test_a_max_pool_backward_sending_the_gradient_to_every_tied_maximum_fails_though_right_off_the_ties():
    # A 1-D convolution with zero-initialised weights, max-pooled: every window ties at the given point. The naive
    # backward (mask = window == its max) counts each tie twice: 3.03 along w[0], where [D₋, D₊] = [1.27, 1.76] and
    # no side of the ties gives more than 2.92. Off the ties it is right, so the check off the kinks passes; the
    # value is still no choice at the kinks, and it fails.
    rng = np.random.default_rng(1)
    n, length, k = 5, 5, 2
    X = rng.standard_normal((n, length)).astype(np.float32)
    Y = rng.standard_normal(n).astype(np.float32)
    P = np.stack([X[:, i : i + k] for i in range(length - k + 1)], 1)  # (n, 4, k) patches
    params = {"w": np.zeros(k, np.float32), "v": rng.standard_normal(2).astype(np.float32)}

    def f(p, P, Y):
        pooled = jnp.max((P @ p["w"]).reshape(n, 2, 2), -1)
        return jnp.mean((pooled @ p["v"] - Y) ** 2)

    def hand(p, P, Y):
        w, v, P, Y = (np.asarray(a) for a in (p["w"], p["v"], P, Y))
        windows = (P @ w).reshape(n, 2, 2)
        pooled = windows.max(-1)
        dout = 2 * (pooled @ v - Y) / n
        dh = ((windows == pooled[..., None]) * np.outer(dout, v)[..., None]).reshape(n, 4)
        return {"w": np.einsum("np,npk->k", dh, P).astype(np.float32), "v": (pooled.T @ dout).astype(np.float32)}

    report = verify.check_grad(f, params, P, Y, hand=hand)
    row = report.rows[[r.path for r in report.rows].index("['w']")]
    assert report.verdict == "hand_wrong" and row.verdict == "hand_wrong", report
    assert "no side of the kinks gives" in row.note, report


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_value_beyond_every_convention_where_kinks_meet_still_fails_along_a_direction(seed):
    # f(b) = 2·relu(b) − relu(−b) at b = 0: D₋ = 1, D₊ = 2, and every choice of relu'(0) per kink gives 2·s₁ + s₂
    # in [0, 3]. -2.9 lies outside both, and "near" enough that the element alone reads it as a kink of several
    # kinks meeting; the random direction is what fails it, so it must not be waived (as for the book's dead
    # units above, where each element lies between its one-sided derivatives).
    def f(b):
        return jnp.sum(2 * jax.nn.relu(b[:1]) - jax.nn.relu(-b[:1])) + jnp.sum(b[1:] ** 2)

    b = jnp.array([0.0, 0.5, -0.3, 0.7])
    report = verify.check_grad(f, b, hand=lambda b: jax.grad(f)(b).at[0].set(-2.9), seed=seed)
    assert report.verdict == "hand_wrong", report


def _max_over_time(split):
    """Max-over-time pooling (T, C) -> (C,) as a custom_vjp: the textbook backward g·(h == max), which sends the
    whole gradient to every tied maximum, or one that splits it among them."""

    @jax.custom_vjp
    def pool(h):
        return jnp.max(h, 0)

    def bwd(h, g):
        tied = (h == jnp.max(h, 0)[None]).astype(h.dtype)
        return (g[None] * (tied / tied.sum(0, keepdims=True) if split else tied),)

    pool.defvjp(lambda h: (jnp.max(h, 0), h), bwd)
    return pool


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("split", [False, True])
def test_a_max_pool_backward_that_gives_every_tied_maximum_the_whole_gradient_fails_where_tokens_repeat(dtype, split):
    # A sentence with a repeated token has identical rows of embeddings, so max-over-time ties across them, and the
    # ties persist whatever the parameters: the model is differentiable there, and its true gradient counts the
    # maximum once. g·(h == max) counts it once per repetition. Each element alone lies between the one-sided
    # derivatives of the pool at its inputs (0 and g), which is all a range per element could test; along a
    # direction that moves the tied inputs together, every choice at the tie gives the same derivative, and
    # 3g is none of them.
    pool = _max_over_time(split)
    rs = np.random.RandomState(3)
    p = {"E": rs.randn(6, 4).astype(dtype), "W": rs.randn(4, 5).astype(dtype), "v": np.linspace(0.5, 1.5, 5, dtype=dtype)}
    tokens = jnp.array([3, 1, 3, 2, 5, 3])

    def model(p, tokens):
        return jnp.sum(pool(jnp.tanh(p["E"][tokens] @ p["W"])) * p["v"])

    with jax.enable_x64(dtype == jnp.float64):
        report = verify.audit(model, p, tokens)
    assert report.verdict == ("ok" if split else "autodiff_wrong") or (split and report.verdict == "kink"), report
    if not split:
        (r,) = report.rows
        assert r.rule == "pool" and "not jointly" in str(report), report
    # The truth, from the whole model (where the ties persist): float64 central differences in every element of W
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), p)
        g = np.asarray(jax.grad(model)(p64, tokens)["W"])
        h = 1e-6
        fd = np.array([(model({**p64, "W": p64["W"].at[i].add(h)}, tokens)
                        - model({**p64, "W": p64["W"].at[i].add(-h)}, tokens)) / (2 * h) for i in np.ndindex(4, 5)])
    assert (np.max(np.abs(g.ravel() - fd)) < 1e-6) == split, (g, fd)


@pytest.mark.parametrize(("dtype", "gap"), [(jnp.float32, 2**-20), (jnp.float64, 1e-6), (jnp.float64, 3e-6)])
def test_a_tie_a_little_off_the_point_is_not_read_as_a_kink_there(dtype, gap):
    # max(w) at w = [1, 1 + gap]: smooth there (the gradient is (0, 1)), with a kink within the coarse steps only.
    # Those steps saw a kink at the point and passed a hand sending the gradient to the smaller element as "kink";
    # the extrapolated one-sided derivatives move between the scales, so finer steps now decide.
    with jax.enable_x64(dtype == jnp.float64):
        w = jnp.asarray([1.0, 1.0 + gap], dtype)
        assert float(w[1] - w[0]) > 0  # the premise: not a tie in this dtype
        report = verify.check_grad(jnp.max, w, hand=lambda w: jnp.array([1.0, 0.0], w.dtype))
        assert report.verdict == "hand_wrong", report
        assert verify.check_grad(jnp.max, w, hand=lambda w: jnp.array([0.0, 1.0], w.dtype)).ok


def test_a_value_outside_the_one_sided_interval_is_blamed_on_its_side():
    f = lambda w: jnp.sum(w**2 - jnp.abs(w))  # noqa: E731  D₋ = 1, D₊ = −1 at w = 0
    w = jnp.array([0.0, 0.5])
    for outside in (1.5, -1.001, 1.001):  # 0.1% beyond D₋ or D₊ is far beyond the finite-difference error
        report = verify.check_grad(f, w, hand=lambda w, c=outside: 2 * w - jnp.where(w == 0, c, jnp.sign(w)))
        assert report.verdict == "hand_wrong" and report.rows[0].worst_index == (0,), (outside, report)

    @jax.custom_jvp
    def bad_abs(x):
        return jnp.abs(x)

    bad_abs.defjvp(lambda p, t: (bad_abs(p[0]), jnp.where(p[0] == 0, 2.0, jnp.sign(p[0])) * t[0]))  # 2 ∉ [−1, 1]
    report = verify.check_grad(lambda w: jnp.sum(w**2 - bad_abs(w)), w, hand=lambda w: 2 * w - jnp.sign(w))
    assert report.verdict == "autodiff_wrong" and report.rows[0].worst_index == (0,), report


# ---- 2. a mistake shared by autodiff and hand --------------------------------------------------------------


def test_stop_gradient_shared_by_the_hand_formula_is_both_wrong():
    w = jnp.array([1.0, 2.0, -0.5])
    report = verify.check_grad(lambda w: jnp.sum(jax.lax.stop_gradient(w) * w), w, hand=lambda w: w)
    assert not report.ok and report.verdict == "both_wrong", report
    r = report.rows[0]
    assert r.worst_index is not None and r.autodiff == r.hand
    i = r.worst_index[0]
    assert r.numeric == pytest.approx(2 * float(w[i]), rel=1e-6)  # the true gradient of Σw²
    assert "both" in r.note


def test_a_wrong_custom_vjp_copied_into_the_hand_is_both_wrong():
    @jax.custom_vjp
    def square(x):
        return x * x

    square.defvjp(lambda x: (x * x, x), lambda x, g: (g * x,))  # should be 2·g·x
    params = {"a": jnp.array([0.3, -1.2]), "b": jnp.array(2.0)}
    report = verify.check_grad(lambda p: jnp.sum(square(p["a"])) + p["b"] ** 2, params,
                               hand=lambda p: {"a": p["a"], "b": 2 * p["b"]})
    assert report.verdict == "both_wrong", report
    assert row(report, "['a']").verdict == "both_wrong" and row(report, "['b']").verdict == "ok"
    assert row(report, "['a']").worst_index is not None


def test_fd_unreliable_only_where_finite_differences_cannot_decide_and_says_why():
    # x^1.5 at 0: the function is undefined left of 0, so no central difference exists; both sides say 0.
    report = verify.check_grad(lambda x: jnp.sum(x**1.5), jnp.array([0.0, 1.0]), hand=lambda x: 1.5 * jnp.sqrt(x))
    assert report.ok and report.verdict == "fd_unreliable", report
    assert report.rows[0].worst_index == (0,) and "not finite" in report.rows[0].note


# ---- 3. a non-finite element in one hand leaf --------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_one_non_finite_hand_element_fails_only_its_leaf(bad):
    params = {"a": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([0.5, -0.5])}
    fn = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(jnp.sin(p["b"]))  # noqa: E731
    report = verify.check_grad(fn, params, hand=lambda p: {"a": (2 * p["a"]).at[1].set(bad), "b": jnp.cos(p["b"])})
    a, b = row(report, "['a']"), row(report, "['b']")
    assert report.verdict == "hand_wrong" and a.verdict == "hand_wrong" and a.worst_index == (1,)
    assert a.autodiff == pytest.approx(4.0) and a.numeric == pytest.approx(4.0, rel=1e-6)
    assert b.verdict == "ok" and all(math.isfinite(v) for v in (b.autodiff, b.hand, b.numeric))
    assert "bisect" not in str(report)


def test_non_finite_element_in_a_projection_checked_leaf():
    n = 50_000
    w = jnp.asarray(RS.randn(n) * 0.3, jnp.float32)
    fn = lambda p: jnp.sum(jnp.tanh(p["w"])) + jnp.sum(p["v"] ** 2)  # noqa: E731
    report = verify.check_grad(fn, {"w": w, "v": jnp.zeros(2)},
                               hand=lambda p: {"w": (1 - jnp.tanh(p["w"]) ** 2).at[4321].set(jnp.nan),
                                               "v": jnp.zeros(2)}, mode="projection")
    r = row(report, "['w']")
    assert r.method == "projection" and r.verdict == "hand_wrong" and r.worst_index == (4321,), report
    assert row(report, "['v']").verdict == "ok"


# ---- 4. singular points --------------------------------------------------------------------------------------


def test_sqrt_at_zero_is_singular_not_autodiff_wrong():
    report = verify.check_grad(lambda x: jnp.sum(jnp.sqrt(x)), jnp.array([0.0, 1.0]), hand=lambda x: 0.5 / jnp.sqrt(x))
    assert report.ok and report.verdict == "singular", report
    assert report.rows[0].worst_index == (0,)


@pytest.mark.parametrize("name,fn", [
    ("abs_pow", lambda x: jnp.sum(jnp.abs(x) ** 0.5)),
    ("entropy", lambda x: jnp.sum(jax.scipy.special.entr(x))),  # −x·log x: log at 0
    ("sqrt", lambda x: jnp.sum(jnp.sqrt(x))),
])
def test_singular_points_without_a_hand(name, fn):
    report = verify.check_grad(fn, jnp.array([0.0, 0.7]))
    assert report.verdict == "singular" and report.ok, (name, report)
    assert report.rows[0].worst_index == (0,)


def test_log_at_zero_makes_the_function_itself_singular():
    x = jnp.array([0.0, 1.0])
    report = verify.check_grad(lambda x: jnp.sum(jnp.log(x)), x, hand=lambda x: 1 / x)
    assert report.ok and report.verdict == "singular" and any("= -inf" in n for n in report.notes), report
    wrong = verify.check_grad(lambda x: jnp.sum(jnp.log(x)), x, hand=lambda x: 2 / x)
    assert wrong.verdict == "mismatch"  # nothing can be checked, and the sides disagree: not passed, not blamed
    with pytest.raises(ValueError, match=r"= nan at the given params: the function itself is not defined there"):
        verify.check_grad(lambda x: jnp.sum(jnp.sqrt(x)), jnp.array([-1.0, 1.0]))


def test_sides_that_describe_a_singular_point_differently_are_not_blamed():
    report = verify.check_grad(lambda x: jnp.sum(jnp.sqrt(x)), jnp.array([0.0, 1.0]),
                               hand=lambda x: jnp.where(x > 0, 0.5 / jnp.sqrt(jnp.where(x > 0, x, 1.0)), 0.0))
    assert report.verdict == "mismatch" and not report.ok, report
    assert "no finite derivative" in report.rows[0].note or "does not exist" in report.rows[0].note


# ---- 5. the shipped configs ----------------------------------------------------------------------------------


CONFIGS = sorted(glob.glob(str(fg.config.__file__).rsplit("/funcgrad/", 1)[0] + "/configs/*.toml"))
DEFAULT_SUITE = ("spiral_dropout.toml",)  # the one that used to fail; the rest run with `make test-slow`


@pytest.mark.parametrize("path", [p if p.endswith(DEFAULT_SUITE) else pytest.param(p, marks=pytest.mark.slow)
                                  for p in CONFIGS])
@pytest.mark.slow
def test_every_shipped_config_checks_ok_or_kink(path, tmp_path):
    from funcgrad.cli._train import _verify

    cfg = fg.config.load(path)
    if cfg.data.kind == "fashion_mnist":  # its files are not here: a tiny generated copy in the same format
        from test_data_fashion import write_idx

        raw = fg.config.to_dict(cfg)
        raw["data"]["path"] = str(write_idx(tmp_path / "fashion"))
        raw["train"]["batch_size"] = 4
        cfg = fg.config.from_dict(raw)
    report = _verify(fg.config.build(cfg))
    assert report.verdict in ("ok", "kink"), report
    for r in report.rows:
        assert r.max_abs_err == pytest.approx(shown_gap(r), rel=1e-9, abs=1e-300), r


@pytest.mark.slow  # (a long check: make test-slow)
def test_a_failing_row_shows_the_element_that_decided_it():
    model = fg.nn.mlp([16, 3], output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy")
    params = model.init(jax.random.key(0), (2,))
    X, y = fg.data.spiral(30, 3, key=0)

    def hand(p, X, y):
        g = obj.hand_grad(p, X, y)
        return {**g, "dense1": {**g["dense1"], "b": g["dense1"]["b"].at[7].add(1e-3)}}

    report = verify.check_grad(obj.value, params, X, y, hand=hand)
    r = row(report, "['dense1']['b']")
    assert report.verdict == "hand_wrong" and r.worst_index == (7,)
    assert r.max_abs_err == pytest.approx(shown_gap(r)) and r.max_abs_err == pytest.approx(1e-3, rel=1e-3)


# ---- 6. outputs and parameters in other float dtypes ---------------------------------------------------------


@pytest.mark.parametrize("pdtype,odtype", [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16),
                                           (jnp.float16, jnp.float32), (jnp.float32, jnp.float16)])
@pytest.mark.slow
def test_any_float_output_dtype(pdtype, odtype):
    w = (jnp.arange(6, dtype=jnp.float32) / 6 - 0.4).astype(pdtype)
    fn = lambda w: jnp.sum(jnp.tanh(w) ** 2).astype(odtype)  # noqa: E731  mixed precision
    hand = lambda w: (2 * jnp.tanh(w) * (1 - jnp.tanh(w) ** 2)).astype(w.dtype)  # noqa: E731
    assert verify.check_grad(fn, w, hand=hand).ok
    wrong = verify.check_grad(fn, w, hand=lambda w: hand(w).at[2].multiply(1.5))
    assert not wrong.ok and wrong.rows[0].worst_index == (2,), wrong
    if jnp.finfo(odtype).bits >= 32:  # finite differences of a float32 (or wider) output can arbitrate
        assert wrong.verdict == "hand_wrong", wrong


# ---- 7. has_aux ------------------------------------------------------------------------------------------------


def test_has_aux_checks_the_loss_and_ignores_aux():
    fn = lambda p: (jnp.sum(p**3), {"norm": jnp.linalg.norm(p), "n": 3})  # noqa: E731
    report = verify.check_grad(fn, jnp.array([1.0, -2.0, 0.5]), hand=lambda p: 3 * p**2, has_aux=True)
    assert report.ok and any("aux" in n for n in report.notes)
    with pytest.raises(TypeError, match=r"has_aux=True"):
        verify.check_grad(fn, jnp.array([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"with has_aux=True, fn must return a pair \(loss, aux\)"):
        verify.check_grad(jnp.sum, jnp.array([1.0, 2.0]), has_aux=True)


@pytest.mark.slow
def test_objective_train_loss_and_the_training_loss_are_checkable():
    model = fg.nn.mlp([16, 3], output="softmax", dropout=0.2)
    obj = fg.Objective(model, "categorical_crossentropy", l2={"dense1/*": 5e-4})
    params = model.init(jax.random.key(0), (2,))
    X, y = fg.data.spiral(20, 3, key=1)
    key = jax.random.key(3)
    hand = lambda p, X, y, k: obj.hand_grad(p, X, y, key=k, train=True)  # noqa: E731
    # Objective.train_loss is fg.train's loss convention: loss_fn(params, *data, key) -> (loss, metrics).
    report = fg.testing.assert_grads_match(obj.train_loss, params, X, y, key, hand=hand, has_aux=True)
    assert report.ok and any("aux" in n for n in report.notes), report


# ---- 8. whole modules: Equinox, Flax NNX, wrt ----------------------------------------------------------------


def eqx_loss(m, x):
    return jnp.mean(jax.vmap(m)(x) ** 2)


@pytest.mark.slow
def test_a_whole_equinox_mlp_with_functions_in_its_pytree():
    mlp = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(0))
    x = jnp.asarray(RS.randn(6, 3), jnp.float32)
    report = verify.check_grad(eqx_loss, mlp, x, hand=eqx.filter_grad(eqx_loss))
    assert report.ok, report
    assert {r.path for r in report.rows} == {f".layers[{i}].{k}" for i in range(3) for k in ("weight", "bias")}
    held = [n for n in report.notes if "held fixed" in n]
    assert held and ".activation" in held[0] and ".final_activation" in held[0]

    def wrong(m, x):  # one layer's weight gradient twice too large
        g = eqx.filter_grad(eqx_loss)(m, x)
        return eqx.tree_at(lambda g: g.layers[1].weight, g, g.layers[1].weight * 2)

    bad = verify.check_grad(eqx_loss, mlp, x, hand=wrong)
    assert bad.verdict == "hand_wrong" and [r.path for r in bad.failing] == [".layers[1].weight"]


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(jnp.tanh(self.lin(x))))


def test_a_flax_nnx_state_with_rng_counters_and_keys():
    graphdef, state = nnx.split(_Net(nnx.Rngs(0)))
    x = jnp.asarray(RS.randn(5, 3), jnp.float32)

    def loss(state, x):
        return jnp.mean(nnx.merge(graphdef, state)(x) ** 2)

    report = verify.check_grad(loss, state, x)
    assert report.ok and all("kernel" in r.path or "bias" in r.path for r in report.rows), report
    held = next(n for n in report.notes if "held fixed" in n)
    assert "count" in held and "key" in held and "uint32" in held


class _NormNet(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.lin = nnx.Linear(3, 4, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(4, 1, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.temp = jnp.asarray(1.5, dtype)  # (a plain array: state too, outside any Variable)

    def __call__(self, x):
        return self.out(self.drop(jnp.tanh(self.bn(self.lin(x)) / self.temp)))


@pytest.mark.parametrize(("name", "how"), [("Param", "module"), ("Param", "state"), ("BatchStat", "state"),
                                           ("tuple", "module"), ("path", "split"), ("all", "module"), ("not", "module"),
                                           ("temp", "module"), ("lambda", "split")])
def test_flax_nnx_filters_as_wrt_select_what_nnx_state_selects(name, how):
    filt = {"Param": nnx.Param, "BatchStat": nnx.BatchStat, "tuple": (nnx.Param, nnx.BatchStat),
            "path": nnx.PathContains("lin"), "all": nnx.All(nnx.Param, nnx.PathContains("out")),
            "not": nnx.Not(nnx.BatchStat), "temp": nnx.PathContains("temp"),
            "lambda": lambda path, x: "out" in path or "temp" in path}[name]  # (NNX's (path, value) -> bool)
    with jax.enable_x64(True):  # (float64, smooth: every selected leaf checks out)
        model = _NormNet(nnx.Rngs(0), jnp.float64)
        graphdef, state = nnx.split(model)
        x = jnp.asarray(RS.randn(5, 3), jnp.float64)
        if how == "module":
            report = verify.check_grad(lambda m, x: jnp.mean(m(x) ** 2), model, x, wrt=filt)
        elif how == "state":
            report = verify.check_grad(lambda s, x: jnp.mean(nnx.merge(graphdef, s)(x) ** 2), state, x, wrt=filt)
        else:  # (graphdef, state) as nnx.split gives them: paths are the state's own
            report = verify.check_grad(lambda gs, x: jnp.mean(nnx.merge(*gs)(x) ** 2), (graphdef, state), x, wrt=filt)
    # NNX's own selection (its float leaves: an nnx.Rngs' counter and key are held fixed, as by default)
    want = sorted(".".join(map(str, k)) for k, v in nnx.to_flat_state(nnx.state(model, filt))
                  if jnp.issubdtype(jax.tree.leaves(v)[0].dtype, jnp.floating))
    got = sorted(r.path.removeprefix("[1]").replace("['", ".").replace("']", "").lstrip(".").removesuffix(".value")
                 for r in report.rows)
    assert got == want, report
    assert report.ok, report


def test_a_hand_from_nnx_grad_checks_a_whole_nnx_module_and_tied_weights_are_noted():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(6, 3, rngs=rngs, param_dtype=jnp.float64)
            self.proj = nnx.Linear(3, 3, rngs=rngs, param_dtype=jnp.float64)
            self.out_w = self.emb.embedding  # the output layer's weight is the embedding's (tied)

        def __call__(self, ids):
            return jnp.tanh(self.proj(self.emb(ids))) @ self.out_w[...].T

    ids = jnp.array([1, 5, 2, 0])

    def loss(m, ids):
        return jnp.sum(jax.nn.log_softmax(m(ids))[jnp.arange(4), ids])

    with jax.enable_x64(True):
        model = Tied(nnx.Rngs(0))

        def hand(m, ids):  # an nnx.State of the module's Params, as nnx.grad returns it
            return nnx.grad(loss)(nnx.merge(*nnx.split(m)), ids)

        def wrong(m, ids):
            g = hand(m, ids)
            g["proj"]["bias"] = nnx.Param(g["proj"]["bias"][...] * 1.1)
            return g

        good = verify.check_grad(loss, model, ids, hand=hand, wrt=nnx.Param)
        bad = verify.check_grad(loss, model, ids, hand=wrong, wrt=nnx.Param)
        graphdef, state = nnx.split(model)
        whole = verify.check_grad(lambda s, ids: loss(nnx.merge(graphdef, s), ids), state, ids,
                                  hand=lambda s, ids: nnx.grad(loss)(nnx.merge(graphdef, s), ids))
    # the module's pytree holds the tied weight at two paths, and the module rebuilt from it holds two copies: the
    # hand's nnx.State names both, by the module's paths
    assert [r.path for r in bad.failing] == [".proj.bias.value"] and bad.verdict == "hand_wrong", bad
    assert any("tied" in n and ".emb.embedding" in n and ".out_w" in n for n in good.notes), good
    assert good.ok and sorted(r.path for r in good.rows) == [".emb.embedding.value", ".out_w.value", ".proj.bias.value",
                                                             ".proj.kernel.value"], good
    assert all(r.hand is not None for r in good.rows), good
    assert whole.ok and all(r.hand is not None for r in whole.rows), whole  # (the state holds it once: summed)
    assert not any("tied" in n for n in whole.notes), whole


def test_a_numpy_hand_returning_plain_dicts_of_a_module_s_names_is_read_by_those_names():
    # h110: a book-style NumPy hand for an NNX module writes {"l2": {"kernel": dW2, "bias": db2}} (what
    # nnx.State.to_pure_dict gives): it was refused, "missing ['.l2.bias.value', ...]". Read by its names, a wrong
    # element is found there; a hand returning only some leaves is told of wrt=.
    class Two(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 4, rngs=rngs)
            self.l2 = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    model = Two(nnx.Rngs(0))
    x = np.asarray(RS.randn(5, 3), np.float32)
    y = np.asarray(RS.randn(5, 2), np.float32)

    def loss(m, x, y):
        return jnp.mean((m(x) - y) ** 2)

    def np_hand(m, x, y, bug=False):  # the book's backward, transcribed in NumPy (float64)
        w1, b1 = np.asarray(m.l1.kernel[...], np.float64), np.asarray(m.l1.bias[...], np.float64)
        w2, b2 = np.asarray(m.l2.kernel[...], np.float64), np.asarray(m.l2.bias[...], np.float64)
        a = np.tanh(x @ w1 + b1)
        d = 2 * (a @ w2 + b2 - y) / y.size
        db2 = d.sum(0)
        if bug:
            db2[1] = -db2[1]
        dz = (d @ w2.T) * (1 - a**2)
        return {"l1": {"kernel": x.T @ dz, "bias": dz.sum(0)}, "l2": {"kernel": a.T @ d, "bias": db2}}

    good = verify.check_grad(loss, model, x, y, hand=np_hand)
    bad = verify.check_grad(loss, model, x, y, hand=functools.partial(np_hand, bug=True))
    assert good.ok and all(r.hand is not None for r in good.rows), good
    assert bad.verdict == "hand_wrong" and [(r.path, r.worst_index) for r in bad.failing] == [(".l2.bias.value", (1,))]

    def part(m, x, y):
        return {"l2": np_hand(m, x, y)["l2"]}

    with pytest.raises(ValueError, match=r"missing \['\.l1\.bias\.value', '\.l1\.kernel\.value'\].*wrt="):
        verify.check_grad(loss, model, x, y, hand=part)
    assert verify.check_grad(loss, model, x, y, hand=part, wrt=nnx.PathContains("l2")).ok


def test_an_nnx_filter_class_instead_of_an_instance_is_named():
    graphdef, state = nnx.split(_NormNet(nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"wrt=Everything is the class of a Flax NNX filter; pass an instance"):
        verify.check_grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(jnp.ones((2, 3))) ** 2), state,
                          wrt=nnx.Everything)


def test_a_flax_nnx_filter_on_params_without_variables_and_a_filter_selecting_nothing_are_named():
    with pytest.raises(TypeError, match=r"wrt=.*Param.* is a Flax NNX filter.*params \(dict\) holds none"):
        verify.check_grad(lambda p: jnp.sum(p["a"] ** 2), {"a": jnp.ones(3)}, wrt=nnx.Param)
    graphdef, state = nnx.split(_NormNet(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="wrt selects no leaf"):
        verify.check_grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(jnp.ones((2, 3))) ** 2), state,
                          wrt=nnx.PathContains("nope"))


def test_wrt_as_a_predicate_or_a_pytree_of_bools():
    params = {"layer1": {"W": jnp.array([[1.0, 2.0]]), "b": jnp.array([0.5, 0.1])}, "layer2": {"W": jnp.array([3.0])}}
    fn = lambda p: jnp.sum(p["layer1"]["W"] ** 2) + jnp.sum(p["layer1"]["b"] ** 3) * p["layer2"]["W"][0]  # noqa: E731

    def hand(p):
        return {"layer1": {"W": 2 * p["layer1"]["W"], "b": 3 * p["layer1"]["b"] ** 2 * p["layer2"]["W"][0]},
                "layer2": None}

    by_prefix = verify.check_grad(fn, params, hand=hand, wrt={"layer1": True, "layer2": False})
    assert by_prefix.ok and [r.path for r in by_prefix.rows] == ["['layer1']['W']", "['layer1']['b']"]
    by_pred = verify.check_grad(fn, params, wrt=lambda leaf: leaf.ndim == 1)
    assert by_pred.ok and [r.path for r in by_pred.rows] == ["['layer1']['b']", "['layer2']['W']"]
    # (by path, not JAX's tree_map words about key paths; h75)
    said = """wrt has ["['layer3']"], which params lacks; no leaf of wrt covers params' ["['layer1']['W']", """
    with pytest.raises(ValueError, match=r"wrt must be a predicate .* or a pytree of bools.*" + re.escape(said)):
        verify.check_grad(fn, params, wrt={"layer3": True})
    with pytest.raises(ValueError, match=r"hand must return a gradient .*missing \[\"\['layer1'\]\['b'\]\"\]"):
        verify.check_grad(fn, params, hand=lambda p: {"layer1": {"W": p["layer1"]["W"]}}, wrt={"layer1": True,
                                                                                             "layer2": False})


# ---- 9 and 10. hand gradients in another dtype, and in NumPy ---------------------------------------------------


def book_dense_relu_params():
    return {"W": jnp.asarray(RS.randn(3, 4) * 0.5, jnp.float32), "b": jnp.zeros(4, jnp.float32)}


def book_loss(p, X):
    return jnp.sum(jnp.maximum(X @ p["W"] + p["b"], 0.0) ** 2) / X.shape[0]


def book_numpy_backward(p, X):
    """The book's style: NumPy arrays, a copy and an in-place mask."""
    X, W, b = np.asarray(X), np.asarray(p["W"]), np.asarray(p["b"])
    z = X @ W + b
    out = np.maximum(0, z)
    dvalues = 2 * out / X.shape[0]
    dinputs = dvalues.copy()
    dinputs[z <= 0] = 0
    return {"W": X.T @ dinputs, "b": np.sum(dinputs, axis=0)}


@pytest.mark.usefixtures("implicit_broadcasting")
def test_a_numpy_hand_gradient_is_called_eagerly_with_the_same_verdicts():
    X = jnp.asarray(RS.randn(7, 3), jnp.float32)
    X = X.at[0].set(0.0)  # a row on the kinks
    seen = []

    def hand(p, X):
        seen.append(np.asarray(p["W"]).dtype)
        return book_numpy_backward(p, X)

    report = verify.check_grad(book_loss, book_dense_relu_params(), X, hand=hand)
    assert report.ok, report
    assert any("called eagerly on NumPy arrays" in n for n in report.notes)
    assert np.dtype("float64") in seen and np.dtype("float32") in seen  # the float64 check and the user's precision

    def wrong(p, X):
        g = book_numpy_backward(p, X)
        g["W"][2, 1] *= 1.1
        return g

    bad = verify.check_grad(book_loss, book_dense_relu_params(), X, hand=wrong)
    assert bad.verdict == "hand_wrong" and row(bad, "['W']").worst_index == (2, 1), bad


@pytest.mark.slow
def test_hand_gradients_in_another_float_dtype_are_compared_in_float64():
    w = jnp.array([0.3, -1.1, 2.0], jnp.float32)
    report = verify.check_grad(lambda w: jnp.sum(jnp.sin(w)), w, hand=lambda w: np.cos(np.asarray(w, np.float64)))
    assert report.ok and any("another float dtype" in n for n in report.notes), report
    with pytest.raises(ValueError, match=r"expected a floating dtype .*got int32\[3\]"):
        verify.check_grad(jnp.sum, w, hand=lambda w: np.ones(3, np.int32))
    with pytest.raises(ValueError, match=r"expected shape \(3,\), got float64\[2\]"):
        verify.check_grad(jnp.sum, w, hand=lambda w: np.ones(2))


# ---- 11. functions JAX cannot reverse-differentiate --------------------------------------------------------------


def test_forward_mode_stands_in_for_a_while_loop():
    def fn(w, n):  # a loop with a dynamic trip count: reverse mode is not defined
        return jax.lax.fori_loop(0, n, lambda i, acc: acc * jnp.cos(w), jnp.ones_like(w)).sum()

    w, n = jnp.array([0.1, 0.4, -0.3]), jnp.asarray(3)
    hand = lambda w, n: -3 * jnp.cos(w) ** 2 * jnp.sin(w)  # noqa: E731  d cos³w
    report = verify.check_grad(fn, w, n, hand=hand)
    assert report.ok and any("forward mode" in s and "reverse mode is unavailable" in s for s in report.notes), report
    bad = verify.check_grad(fn, w, n, hand=lambda w, n: hand(w, n).at[1].add(0.01))
    assert bad.verdict == "hand_wrong" and bad.rows[0].worst_index == (1,)


def test_a_function_neither_mode_can_differentiate_is_a_clear_error():
    def fn(w):
        return jax.pure_callback(lambda x: np.sum(x**2).astype(x.dtype), jax.ShapeDtypeStruct((), w.dtype), w)

    with pytest.raises(ValueError, match=r"neither in reverse mode .* nor in forward mode") as err:
        verify.check_grad(fn, jnp.array([1.0, 2.0]))
    assert "verify.audit" not in str(err.value)


def test_a_custom_rule_whose_backward_raises_is_pointed_to_the_audit():
    # A bwd that raises made check_grad say "nothing to compare the hand formula with", though no hand was given,
    # and not where to look (h97): the message now points to verify.audit, which names the rule.
    @jax.custom_vjp
    def square(x):
        return x * x

    square.defvjp(lambda x: (x * x, x), lambda x, g: (g * x[5],) if x.shape[0] > 5 else (1 / 0,))
    with pytest.raises(ValueError, match=r"no autodiff gradient to check; fn calls jax.custom_vjp") as err:
        verify.check_grad(lambda w: jnp.sum(square(w)), jnp.array([0.3, -0.7]))
    assert "hand" not in str(err.value) and "verify.audit(fn, params, *args)" in str(err.value)


# ---- 12. zero-size leaves ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,with_hand", [("auto", True), ("exact", False), ("projection", True),
                                            ("projection", False)])
def test_zero_size_leaves_are_trivially_ok(mode, with_hand):
    params = {"w": jnp.array([1.0, -2.0]), "empty": jnp.zeros((0, 4)), "none": jnp.zeros((3, 0))}
    fn = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["empty"]) + jnp.sum(p["none"])  # noqa: E731
    hand = (lambda p: {"w": 2 * p["w"], "empty": jnp.zeros((0, 4)), "none": jnp.zeros((3, 0))}) if with_hand else None
    report = verify.check_grad(fn, params, hand=hand, mode=mode)
    assert report.ok and row(report, "['empty']").verdict == "ok" and row(report, "['empty']").size == 0, report
    assert row(report, "['none']").verdict == "ok"
    json.dumps(report.to_dict())


# ---- the report for bug reports ------------------------------------------------------------------------------------


def test_environment_block_and_markdown():
    report = verify.check_grad(lambda w: jnp.sum(w**3), jnp.array([1.0, 2.0]), hand=lambda w: 3 * w**2.0 + 1,
                               seed=5)
    env = json.loads(report.to_json())["environment"]
    assert env["jax"] == jax.__version__ and env["backend"] == jax.default_backend()
    assert env["x64"] is False and env["dtypes"] == {"params": ["float32"], "output": "float32", "check": "float64"}
    assert env["seed"] == 5 and env["mode"] == "auto"
    assert env["rtol"] > 0 and "atol" in env and env["jaxlib"] and "funcgrad" in env
    md = report.to_markdown()
    assert md.startswith("### check_grad: `hand_wrong` (NOT OK)")
    assert re.search(r"^\| `\(params\)` \| hand_wrong \|", md, re.M) and "Environment" in md


# ---- the same through check_vjp, check_jacobian, check_chain ---------------------------------------------------------


@pytest.mark.slow  # (a long check: make test-slow)
def test_check_vjp_with_book_style_numpy_backward_and_new_verdicts():
    def relu_backward(x, dvalues):  # the book's ReLU backward, in place
        dinputs = np.array(dvalues, copy=True)
        dinputs[np.asarray(x) <= 0] = 0
        return dinputs

    x = jnp.array([[-1.0, 0.0, 2.0], [0.5, -0.2, 0.0]])
    report = verify.check_vjp(jax.nn.relu, relu_backward, x)
    assert report.ok and report.verdict == "kink" and any("NumPy" in n for n in report.notes), report
    assert verify.check_vjp(jnp.sqrt, lambda x, d: d * 0.5 / jnp.sqrt(x), jnp.array([0.0, 4.0])).verdict == "singular"

    @jax.custom_vjp
    def cube(x):
        return x**3

    cube.defvjp(lambda x: (x**3, x), lambda x, g: (2 * x**2 * g,))  # should be 3x²
    shared = verify.check_vjp(cube, lambda x, d: 2 * x**2 * d, jnp.array([0.5, -1.5]))
    assert shared.verdict == "both_wrong", shared


def test_check_jacobian_with_a_numpy_hand_and_a_while_loop():
    def np_softmax_jacobian(x):
        s = np.exp(x - np.max(x))
        s /= s.sum()
        return np.diagflat(s) - np.outer(s, s)

    x = jnp.array([1.0, 2.0])
    assert verify.check_jacobian(jax.nn.softmax, x, np_softmax_jacobian).ok

    def loop(x):
        return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.sin(c[1])), (0, x))[1]

    report = verify.check_jacobian(loop, x, lambda x: jnp.diag(jnp.cos(jnp.sin(x)) * jnp.cos(x)))
    assert report.ok and any("jacrev is unavailable" in n for n in report.notes), report


def test_check_chain_with_book_style_numpy_stages():
    X = jnp.asarray(RS.randn(6, 3), jnp.float32)
    W = jnp.asarray(RS.randn(3, 4) * 0.5, jnp.float32)

    def dense_bwd(p, x, d):
        x, d, p = np.asarray(x), np.asarray(d), np.asarray(p)
        return x.T @ d, d @ p.T

    def relu_bwd(x, d):
        out = np.array(d, copy=True)
        out[np.asarray(x) <= 0] = 0
        return out

    stages = [("dense", lambda p, x: x @ p, dense_bwd, W), ("relu", jax.nn.relu, relu_bwd),
              ("sum", lambda o: jnp.sum(o**2), lambda o, d: 2 * np.asarray(o) * d)]
    broken = list(stages)
    broken[1] = ("relu", jax.nn.relu, lambda x, d: relu_bwd(x, d) * 1.5)
    report = verify.check_chain(broken, X, cotangents=1)
    assert not report.ok and report.first_broken == "relu"
    links = dict(report.links)
    assert links["dense"].ok and links["sum"].ok and links["relu"].verdict == "hand_wrong"
    assert any("NumPy" in n for n in links["dense"].notes)


def test_check_chain_gives_each_book_backward_numpy_arrays_whatever_the_next_one_returned():
    # A dropout backward written with jnp (d * mask) before the book's in-place ReLU backward: each link passed alone,
    # and the whole chain raised JAX's bare "arrays are immutable" (h98). The composition now hands every backward
    # writable NumPy arrays, as each link's own check does; a ReLU backward 1.5× off is still blamed.
    X = jnp.asarray(RS.randn(6, 3), jnp.float32)
    W = jnp.asarray(RS.randn(3, 4) * 0.5, jnp.float32)
    mask = jnp.asarray(RS.binomial(1, 0.8, (6, 4)) / 0.8, jnp.float32)

    def dense_bwd(p, x, d):
        x, d, p = np.asarray(x), np.asarray(d), np.asarray(p)
        return x.T @ d, d @ p.T

    def relu_bwd(x, d, slip=1.0):
        d *= slip  # (in place: the book's dvalues are its own NumPy arrays)
        d[np.asarray(x) <= 0] = 0
        return d

    def stages(slip):
        return [("dense", lambda p, x: x @ p, dense_bwd, W), ("relu", jax.nn.relu, lambda x, d: relu_bwd(x, d, slip)),
                ("dropout", lambda x: x * mask, lambda x, d: d * mask),
                ("sum", lambda o: jnp.sum(o**2), lambda o, d: 2 * np.asarray(o) * d)]

    assert verify.check_chain(stages(1.0), X, cotangents=1).ok
    report = verify.check_chain(stages(1.5), X, cotangents=1)
    assert report.first_broken == "relu" and report.end_to_end.verdict == "hand_wrong", report


def test_a_loss_link_whose_backward_ignores_dvalues_says_so():
    # The book's loss backward takes no dvalues (it assumes 1): as a link of check_chain, checked under a random
    # dvalues, it reads hand_wrong, and nothing said why (h98). The link's report now says it; times dvalues passes.
    z = jnp.asarray(RS.randn(5, 3), jnp.float32)
    y = jnp.asarray([0, 2, 1, 1, 0])  # (int32: NumPy int64 labels as an index, see the README)

    def loss(z):
        return -jnp.mean(jax.nn.log_softmax(z)[np.arange(5), y])

    def loss_bwd(z, d):  # the book's softmax + cross-entropy backward, without dvalues
        g = np.array(jax.nn.softmax(np.asarray(z)), np.float64)
        g[np.arange(5), np.asarray(y)] -= 1
        return (g / 5).astype(np.float32)

    report = verify.check_chain([("softmax_ce", loss, loss_bwd)], z)
    link = dict(report.links)["softmax_ce"]
    assert link.verdict == "hand_wrong" and any("ignores dvalues" in n for n in link.notes), link
    fixed = verify.check_chain([("softmax_ce", loss, lambda z, d: loss_bwd(z, d) * d)], z)
    assert fixed.ok and not any("ignores dvalues" in n for n in dict(fixed.links)["softmax_ce"].notes), fixed


# ---- found in review: wrong gradients that must not pass, right ones that must not fail ------------------------------


def test_a_wrong_element_does_not_hide_behind_kink_disagreements():
    w = np.linspace(0.5, 1.5, 5000).astype(np.float32)
    w[:10] = 0  # ten |x| kinks where hand (0) and autodiff (1) take different valid conventions
    fn = lambda p: jnp.sum(jnp.abs(p[:10])) + jnp.sum(p[10:] ** 2)  # noqa: E731
    hand = lambda p: jnp.concatenate([jnp.zeros(10), 2 * p[10:]]).at[4000].multiply(1.05)  # noqa: E731
    report = verify.check_grad(fn, jnp.asarray(w), hand=hand)
    assert report.verdict == "hand_wrong" and report.rows[0].worst_index == (4000,), report


def test_a_wrong_rule_is_not_excused_by_one_kink_on_its_random_direction():
    @jax.custom_vjp
    def sq(x):
        return x**2

    sq.defvjp(lambda x: (x**2, x), lambda x, g: (g * 2 * x * jnp.where(jnp.abs(x) < 1, 1.5, 1.0),))
    w = np.random.default_rng(0).normal(size=5000).astype(np.float32)
    w[0] = 0.0  # |w| has its kink here, on every random direction through the leaf
    report = verify.check_grad(lambda p: 0.01 * jnp.sum(jnp.abs(p)) + jnp.sum(sq(p)), jnp.asarray(w))
    assert report.verdict == "autodiff_wrong", report


def test_both_sides_outside_a_kink_pass_only_within_autodiffs_own_distance():
    f = lambda p: jnp.sum(2 * jax.nn.relu(p) - jax.nn.relu(-p))  # noqa: E731  [D₋, D₊] = [1, 2]; JAX says 0
    w = jnp.array([0.0, 1.0])
    assert verify.check_grad(f, w, hand=lambda p: jnp.where(p == 0, 3.0, 2.0)).verdict == "kink"  # all active
    assert not verify.check_grad(f, w, hand=lambda p: jnp.where(p == 0, 1000.0, 2.0)).ok


def test_low_precision_inside_fn():
    # bfloat16 inside: tolerances follow it, but are capped; an all-zero hand still fails.
    fn = lambda p: jnp.sum(jnp.tanh(p["w"].astype(jnp.bfloat16)).astype(jnp.float32) ** 2)  # noqa: E731
    w = {"w": jnp.asarray(RS.randn(8), jnp.float32)}
    assert not verify.check_grad(fn, w, hand=lambda p: {"w": 0.0 * p["w"]}).ok
    # float32 inside, float64 outside: finite differences carry float32's rounding, not a false both_wrong.
    X = RS.randn(500, 20).astype(np.float32)

    def loss(p):
        z = jnp.asarray(X) @ p["w"].astype(jnp.float32)
        return jnp.sum(jnp.log1p(jnp.exp(z))) + 0.5 * jnp.sum(p["w"] ** 2)

    def hand(p):
        z = jnp.asarray(X) @ p["w"].astype(jnp.float32)
        return {"w": (X.T @ jax.nn.sigmoid(z)).astype(p["w"].dtype) + p["w"]}

    with jax.enable_x64(True):
        report = verify.check_grad(loss, {"w": jnp.asarray(RS.randn(20) * 0.3)}, hand=hand)
    assert report.ok, report


def test_an_equinox_filter_spec_as_wrt_and_only_empty_leaves():
    m = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    spec = eqx.tree_at(lambda t: t.weight, jax.tree_util.tree_map(lambda _: False, m), replace=True)
    report = verify.check_grad(lambda m, x: jnp.sum(m(x) ** 2), m, jnp.ones(3), wrt=spec)
    assert report.ok and [r.path for r in report.rows] == [".weight"], report
    empty = verify.check_grad(lambda p: jnp.sum(p["e"]), {"e": jnp.zeros((0,))}, hand=lambda p: {"e": p["e"]})
    assert empty.ok and empty.rows[0].size == 0


# ---- code written without check_grad in mind ------------------------------------------------------------------


def test_aux_with_non_arrays_is_accepted_as_jax_grad_accepts_it():
    def loss(p):
        value = jnp.sum(p["w"] ** 2)
        return value, {"phase": "train", "value": value}

    report = verify.check_grad(loss, {"w": jnp.array([1.0, 2.0])}, has_aux=True, hand=lambda p: {"w": 2 * p["w"]})
    assert report.verdict == "ok"


def test_a_constant_python_float_loss_is_checked():
    report = verify.check_grad(lambda p: 0.0, {"w": jnp.array([1.0, 2.0])}, hand=lambda p: {"w": jnp.zeros(2)})
    assert report.verdict == "ok"


@pytest.mark.slow  # (a long check: make test-slow)
def test_a_dtype_fixed_inside_fn_is_named_when_the_float64_evaluation_fails():
    def rnn_loss(p, xs):
        def step(h, x):
            h = jnp.tanh(p["W"] * h + x)
            return h, h

        return jnp.sum(jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)[1])

    p, xs = {"W": jnp.asarray(0.5, jnp.float32)}, jnp.asarray([0.1, 0.2, 0.3], jnp.float32)
    jax.grad(rnn_loss)(p, xs)  # fine at the parameters' own dtype
    with pytest.raises(TypeError, match="fails when evaluated in float64") as e:
        verify.check_grad(rnn_loss, p, xs)
    assert type(e.value) is TypeError and "jnp.zeros((), x.dtype)" in str(e.value)


def test_wrt_selecting_nothing_says_so():
    p = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}
    with pytest.raises(ValueError, match="wrt selects no leaf of params"):
        verify.check_grad(lambda p: jnp.sum(p["w"] ** 2) + p["b"], p, wrt=lambda leaf: False)


def test_errors_about_fn_value_are_plain_value_errors():
    with pytest.raises(ValueError, match="nan") as e:
        verify.check_grad(lambda w: jnp.sum(jnp.log(w)), jnp.array([-1.0, 2.0]))
    assert type(e.value) is ValueError


# ---- every gradient exactly zero; a primal that finite differences alone must judge; composite options -------------


def test_forward_and_reverse_rounding_where_every_gradient_is_zero_is_not_a_failure():
    # A zero first layer and symmetric data: every gradient is exactly 0, so the gradients give no tolerance. The
    # modes' terms cancel to -5.6e-17 in forward mode and to 0 in reverse mode: rounding, inside finite differences'
    # own error, not a wrong mode.
    X = jnp.array([[1.0, 2.0], [-1.0, -2.0], [2.0, 1.0], [-2.0, -1.0]])
    y = jnp.array([0, 1, 0, 1])
    P = {"d1": {"W": jnp.zeros((2, 3)), "b": jnp.zeros((1, 3))},
         "d2": {"W": jnp.asarray(np.random.RandomState(0).randn(3, 2), jnp.float32), "b": jnp.zeros((1, 2))}}

    def fn(p, X, y):
        a = jax.nn.relu(X @ p["d1"]["W"] + p["d1"]["b"])
        z = a @ p["d2"]["W"] + p["d2"]["b"]
        return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(len(y)), y])

    report = verify.check_grad(fn, P, X, y)
    row = {r.path: r for r in report.rows}["['d2']['b']"]
    assert row.ok and "mode is wrong" not in row.note, report


@pytest.mark.parametrize("wrong", [False, True])
def test_without_a_hand_a_value_finite_differences_cannot_confirm_is_not_ok(wrong):
    # fn computes in float32 next to a large constant term: its finite differences are only good to ~1e-3 here, far
    # coarser than the tolerance. A 2% slip in a custom rule is then not confirmed ("ok" would be a promise the check
    # cannot keep); the correct rule is.
    @jax.custom_vjp
    def sq(x):
        return x * x

    sq.defvjp(lambda x: (x * x, x), lambda x, g: (g * 2 * x * (1.02 if wrong else 1.0),))
    fn = lambda p: jnp.sum(sq(p["x"].astype(jnp.float32))) + jnp.float32(3e3)  # noqa: E731
    report = verify.check_grad(fn, {"x": jnp.array([0.3, -0.2, 0.25])})
    assert report.rows[0].verdict != "ok" if wrong else report.ok, report


def test_check_vjp_and_check_chain_name_their_own_arguments():
    x = jnp.array([[0.5, -1.0, 2.0], [0.1, 0.2, -0.3]])
    with pytest.raises(TypeError, match=r"check_vjp: fn's output must be floating-point.*int32\[2, 3\]"):
        verify.check_vjp(lambda x: jnp.round(x).astype(jnp.int32), lambda x, d: d, x)
    with pytest.raises(TypeError, match=r"check_chain: link 'double': check_vjp: x is differentiated.*int32\[2\]"):
        verify.check_chain([("double", lambda x: x * 2.0, lambda x, d: 2 * d)], jnp.array([1, 2]))
    for seed in (1.5, None, "3", True):
        with pytest.raises(TypeError, match="check_vjp: seed must be an int"):
            verify.check_vjp(lambda x: 2 * x, lambda x, d: 2 * d, x, seed=seed)
        with pytest.raises(TypeError, match="check_chain: seed must be an int"):
            verify.check_chain([("double", lambda x: x * 2.0, lambda x, d: 2 * d)], x, seed=seed)
    for n in (0, -1, 2.5, "2"):
        with pytest.raises(ValueError, match="check_vjp: cotangents must be an int of at least 1"):
            verify.check_vjp(lambda x: 2 * x, lambda x, d: 2 * d, x, cotangents=n)
    assert verify.check_vjp(lambda x: 2 * x, lambda x, d: 2 * d, x, seed=-1).ok
    assert verify.check_chain([("double", lambda x: x * 2.0, lambda x, d: 2 * d)], x, seed=-1).ok
    # A leaf of a primal is named by the primal's name and its path (was "[0]['b']").
    p = {"W": jnp.ones((3, 2)), "b": jnp.zeros((1, 2))}
    with pytest.raises(ValueError, match=r"params\['b'\]: expected shape \(1, 2\)"):
        verify.check_vjp(lambda params, x: x @ params["W"] + params["b"],
                         lambda params, x, d: ({"W": x.T @ d, "b": d.sum(0)}, d @ params["W"].T), p, x)


def test_a_python_float_beside_arrays_is_held_fixed_as_equinox_holds_it():
    # eqx.nn.Dropout keeps p as a Python float (and stop_gradients it): a hyperparameter, not a parameter.
    class Model(eqx.Module):
        lin: eqx.nn.Linear
        drop: eqx.nn.Dropout

        def __call__(self, x, key):
            return self.drop(jnp.tanh(self.lin(x)), key=key)

    m = Model(eqx.nn.Linear(4, 8, key=jax.random.key(0)), eqx.nn.Dropout(0.5))
    X = jax.random.normal(jax.random.key(1), (16, 4))

    def loss(m, X, key):
        return jnp.mean(jax.vmap(m)(X, jax.random.split(key, X.shape[0])) ** 2)

    report = verify.check_grad(loss, m, X, jax.random.key(2), hand=eqx.filter_grad(loss))
    assert report.ok and [r.path for r in report.rows] == [".lin.weight", ".lin.bias"], report
    assert verify.check_grad(lambda w: w["a"] ** 3, {"a": 2.0}, hand=lambda w: {"a": 3 * w["a"] ** 2}).ok



@pytest.mark.parametrize("slip", [1.0, 1.01])
@pytest.mark.slow
def test_a_python_float_field_in_python_control_flow_stays_a_number(slip):
    # An equinox module's `scale: float`, read by Python control flow: it is held fixed, so fn must see the number
    # itself (equinox.filter_grad passes it so); it was traced as an array ("boolean conversion of traced array").
    @jax.custom_jvp
    def softplus(x):
        return jnp.logaddexp(x, 0.0)

    softplus.defjvps(lambda t, y, x: slip * t * jax.nn.sigmoid(x))

    class Block(eqx.Module):
        lin: eqx.nn.Linear
        scale: float

        def __call__(self, x):
            h = softplus(self.lin(x))
            return h * self.scale if self.scale != 1.0 else h

    m = Block(eqx.nn.Linear(3, 4, key=jax.random.key(0)), 0.5)
    x = jnp.array([0.3, -1.2, 2.0])

    def loss(m, x):
        return jnp.sum(m(x) ** 2)

    def reference(m, x):  # the same loss through the library's softplus
        h = jax.nn.softplus(m.lin(x))
        return jnp.sum((h * m.scale if m.scale != 1.0 else h) ** 2)

    report = verify.check_grad(loss, m, x, hand=eqx.filter_grad(reference))
    assert [r.path for r in report.rows] == [".lin.weight", ".lin.bias"], report
    assert report.verdict == (verify.Verdict.OK if slip == 1.0 else verify.Verdict.AUTODIFF_WRONG), report
    audit = verify.audit(loss, m, x)
    assert [r.rule for r in audit.rows] == ["softplus"], audit
    assert audit.verdict == (verify.Verdict.OK if slip == 1.0 else verify.Verdict.AUTODIFF_WRONG), audit


@pytest.mark.parametrize("labels", ["int", "onehot"])
@pytest.mark.parametrize("planted", [False, True])
@pytest.mark.slow
def test_labels_read_with_numpy_inside_fn_are_held_as_values(labels, planted):
    # The book's loss takes labels as ints or one-hot and converts them with NumPy (np.argmax); jax.grad allows it
    # (only the parameters are traced). Both checks traced the labels too and failed with JAX's bare
    # TracerArrayConversionError; they now hold such arguments as values, and still judge the gradient.
    rs = np.random.RandomState(0)
    X = jnp.asarray(rs.randn(12, 4), jnp.float32)
    y = rs.randint(0, 3, 12)
    y_true = jnp.asarray(y) if labels == "int" else jax.nn.one_hot(y, 3)
    p = {"W": jnp.asarray(rs.randn(4, 3) * 0.5, jnp.float32), "b": jnp.zeros(3, jnp.float32)}

    def as_ints(y_true):
        y_true = np.asarray(y_true)
        return np.argmax(y_true, axis=1) if len(y_true.shape) == 2 else y_true

    @jax.custom_vjp
    def dense(W, b, X):
        return X @ W + b[None]

    def dense_bwd(res, dz):
        W, X = res
        dW = X.T @ dz
        return (dW.at[2, 1].multiply(1.25) if planted else dW), dz.sum(0), dz @ W.T

    dense.defvjp(lambda W, b, X: (dense(W, b, X), (W, X)), dense_bwd)

    def loss(p, X, y_true):
        t = as_ints(y_true)
        return -jnp.mean(jax.nn.log_softmax(dense(p["W"], p["b"], X))[np.arange(len(t)), t])

    def hand(p, X, y_true):  # the book's combined softmax / cross-entropy backward
        t = as_ints(y_true)
        d = (jax.nn.softmax(X @ p["W"] + p["b"][None]) - jax.nn.one_hot(t, 3)) / len(t)
        return {"W": X.T @ d, "b": d.sum(0)}

    with jax.enable_x64(True):  # the truth, independently: float64 autodiff without the custom rule
        true = jax.grad(lambda W: -jnp.mean(jax.nn.log_softmax(np.asarray(X, np.float64) @ W)[np.arange(12), y]))(
            np.asarray(p["W"], np.float64))
    np.testing.assert_allclose(hand(p, X, y_true)["W"], true, rtol=1e-4, atol=1e-6)
    report = verify.check_grad(loss, p, X, y_true, hand=hand)
    assert any("held as constants" in n for n in report.notes), report
    row = next(r for r in report.rows if r.path == "['W']")
    if planted:
        assert row.verdict == verify.Verdict.AUTODIFF_WRONG and row.worst_index == (2, 1), report
    else:
        assert report.ok, report
    audit = verify.audit(loss, p, X, y_true)
    assert [r.rule for r in audit.rows] == ["dense"], audit
    assert audit.verdict == (verify.Verdict.AUTODIFF_WRONG if planted else verify.Verdict.OK), audit
    if planted:
        assert audit.rows[0].worst_index == (0, 2, 1), audit


@pytest.mark.parametrize("slip", [1.0, 1.0001])
def test_data_standardised_in_python_is_the_same_for_fn_and_a_numpy_hand(slip):
    # fn and a NumPy hand standardise float32 data near 1000 when it looks unscaled (a Python if on it): fn is
    # retried with the data held as float32 values, and the hand, called on float64 copies, standardised in float64,
    # 1.6e-4 apart: a correct hand failed (review 2). The hand gets the held data at its own dtype too.
    rng = np.random.default_rng(5)
    X = (1000 + rng.standard_normal((40, 4)) * 0.05).astype(np.float32)
    y = rng.standard_normal(40).astype(np.float32)
    w = jnp.asarray(rng.standard_normal(4), jnp.float32)

    def prep(X):
        return (X - X.mean(0)) / X.std(0) if np.abs(X).max() > 1 else X

    def fn(w, X, y):
        return jnp.mean((prep(X) @ w - y) ** 2)

    def hand(w, X, y):
        Xs = prep(np.asarray(X))
        return slip * 2 * Xs.T @ (Xs @ np.asarray(w) - np.asarray(y)) / len(y)

    g = np.asarray(jax.grad(fn)(w, X, y))  # the user's float32 program: the hand agrees with autodiff
    np.testing.assert_allclose(hand(w, X, y) / slip, g, rtol=1e-5)
    report = verify.check_grad(fn, w, X, y, hand=hand)
    assert report.verdict == ("ok" if slip == 1.0 else "hand_wrong"), report


def test_a_parameter_used_in_python_gets_an_error_naming_it():
    # A jitted training step fails here too (the parameter's value is traced); the checks, which trace fn as jit
    # does, said so with JAX's bare error about their internal argument p[0].
    def fn(p, x):
        return jnp.sum(p["w"] * x) * (2.0 if p["w"][0] > 0.5 else 1.0)

    p, x = {"w": jnp.ones(3)}, jnp.arange(3.0)
    with pytest.raises(jax.errors.TracerBoolConversionError):
        jax.jit(jax.grad(fn))(p, x)
    for check in (verify.check_grad, verify.audit):
        with pytest.raises(TypeError, match=re.escape("(it needs the value of ['w'])") + ".*jnp.where") as e:
            check(fn, p, x)
        assert "docs.jax.dev" not in str(e.value) and not e.value.__cause__, e.value

    def count(p, x, y):  # a value computed from the labels inside the trace: passed in as a number instead
        return jnp.sum(p["w"] * x) * (int(y.max()) + 1)

    with pytest.raises(TypeError, match=r"cannot trace fn: ConcretizationTypeError.*int\(y.max\(\)\) \+ 1"):
        verify.check_grad(count, p, x, jnp.arange(3))


@pytest.mark.parametrize("slip", [1.0, 1.04])
def test_a_bfloat16_hand_leaf_loosens_only_its_own_tolerance(slip):
    # A mixed-precision policy casts one leaf's gradient to bfloat16 (5% tolerance there); a 4% slip in a float64
    # leaf beside it used to pass, every leaf's tolerance being the loosest.
    with jax.enable_x64(True):
        p = {"emb": jnp.array([0.25, 2.0], jnp.bfloat16), "d": jnp.array([0.1, 0.2], jnp.float64)}

        def hand(p):
            return {"emb": jnp.cos(p["emb"]).astype(jnp.bfloat16), "d": jnp.exp(p["d"]).at[0].multiply(slip)}

        report = verify.check_grad(lambda p: jnp.sum(jnp.sin(p["emb"])) + jnp.sum(jnp.exp(p["d"])), p, hand=hand)
    rows = {r.path: r for r in report.rows}
    assert rows["['emb']"].ok, report
    assert rows["['d']"].verdict == (verify.Verdict.OK if slip == 1.0 else verify.Verdict.HAND_WRONG), report
    if slip != 1.0:
        assert rows["['d']"].worst_index == (0,) and np.isclose(rows["['d']"].numeric, np.exp(0.1), rtol=1e-9)


def test_a_book_style_backward_that_mutates_its_dvalues_is_checked_as_numpy_runs_it():
    # The book's ReLU backward without .copy(), plus a skip path: JAX can trace it (operators only), and JAX arrays
    # are never changed in place, so it passed; on NumPy arrays, as the user's training loop runs it, `*=`
    # zeroes dvalues itself and the skip path's gradient is lost.
    def hand(x, dvalues):
        dinputs = dvalues
        dinputs *= x > 0
        return dinputs + dvalues

    def hand_copied(x, dvalues):
        dinputs = dvalues.copy()
        dinputs *= x > 0
        return dinputs + dvalues

    x = jnp.array([[0.5, -1.0, 2.0], [-0.3, 0.2, -2.0]])
    f = lambda x: jnp.maximum(0, x) + x  # noqa: E731
    d = np.ones((2, 3))
    assert not np.allclose(hand(np.asarray(x, np.float64), d.copy()), jax.vjp(f, x)[1](jnp.ones((2, 3)))[0])
    report = verify.check_vjp(f, hand, x)
    assert report.verdict == verify.Verdict.HAND_WRONG and "on NumPy arrays" in report.rows[0].note, report
    # The row shows an element where the two runs differ (x <= 0, where dvalues was zeroed), with the NumPy run's
    # value there, and the note once.
    row = report.rows[0]
    assert row.worst_index in {(0, 1), (1, 0), (1, 2)} and row.autodiff is None, report
    assert str(report).count("on NumPy arrays") == 1, report
    assert verify.check_vjp(f, hand_copied, x).ok


@pytest.mark.slow  # (20 s: the hand runs in Python at every evaluation)
def test_a_numpy_hand_breaking_ties_at_random_is_not_blamed_for_in_place_operations():
    # A max-pool backward that routes each tie to a maximum drawn afresh at each call (no seed): its two runs differ,
    # which was read as an in-place operation on dvalues (h81). Each draw is a valid choice at the kink.
    x = jnp.repeat(jnp.arange(4.0)[:, None], 16, axis=1)  # (every pair a tie)
    f = lambda x: jnp.max(x.reshape(4, 8, 2), axis=-1)  # noqa: E731 - 32 windows, each a tie: 2**-32 to draw alike
    draws = np.random.default_rng()

    def hand(x, d):
        x, d = np.asarray(x, np.float64).reshape(4, 8, 2), np.asarray(d, np.float64)
        out = np.zeros_like(x)
        for i, j in np.ndindex(4, 8):
            top = np.flatnonzero(x[i, j] == x[i, j].max())
            out[i, j, draws.choice(top)] = d[i, j]
        return out.reshape(4, 16)

    report = verify.check_vjp(f, hand, x)
    assert report.ok and not any("on NumPy arrays, as the book" in r.note for r in report.rows), report
    assert any("not a function of its inputs" in n for n in report.notes), report.notes


@pytest.mark.slow
def test_a_numpy_float64_array_closed_over_by_fn_and_hand():
    # The book's dropout mask (np.random.binomial(...) / rate: float64) and one-hot labels (np.eye(3)[y]) closed
    # over. JAX caches its conversion of such an array by the array, whatever the x64 setting, while the converted
    # value lives: the float64 check saw float32 copies ("lax.mul requires arguments to have the same dtypes"), and
    # the user's own 32-bit programs saw float64 ones after a check. From JAX 0.12 a jaxpr holds its constants'
    # values: the check's trace at the parameters' precision kept the float32 copy alive for the float64 trace.
    M = np.random.RandomState(0).binomial(1, 0.8, size=3) / 0.8
    w = jnp.array([0.3, -0.2, 0.1])
    assert verify.check_grad(lambda w: jnp.sum(jnp.maximum(0, w) * M), w, hand=lambda w: (np.asarray(w) > 0) * M).ok
    assert verify.check_vjp(lambda x: x * M, lambda x, d: d * M, w).ok
    y = np.array([0, 2, 1])
    P = jax.nn.softmax(jnp.array([[1.0, 2.0, 0.5], [0.1, 0.2, 0.3], [2.0, -1.0, 0.0]]), axis=1)
    assert verify.check_grad(lambda p: jnp.mean(-jnp.log(p[jnp.arange(3), y])), P,
                             hand=lambda p: -np.eye(3)[y] / np.asarray(p) / 3).ok
    assert jnp.asarray(M).dtype == jnp.float32 and jax.jit(lambda w: w * M)(w).dtype == jnp.float32


@pytest.mark.slow  # (three links and the whole chain: make test-slow)
def test_check_chain_of_a_loss_link_closing_over_float64_one_hot_labels():
    # The book's loss link with its labels one-hot in NumPy (np.eye(3)[y], float64) closed over: with JAX 0.12 the
    # link's check stopped with "fails when evaluated in float64" (its trace at float32 held JAX's float32 copy),
    # though check_vjp alone passed. A wrong 1/N in the loss's backward is still the link blamed.
    rs = np.random.RandomState(0)
    X = rs.randn(6, 2).astype(np.float32)
    Y = np.eye(3)[rs.randint(0, 3, 6)]
    W = (rs.randn(2, 3) * 0.5).astype(np.float32)

    def softmax_bwd(x, d):
        s = jax.nn.softmax(x)
        return s * (d - jnp.sum(d * s, axis=1, keepdims=True))

    def stages(n):
        return [("dense", lambda W, x: x @ W, lambda W, x, d: (x.T @ d, d @ W.T), W),
                ("softmax", jax.nn.softmax, softmax_bwd),
                ("loss", lambda p: -jnp.mean(jnp.sum(Y * jnp.log(p), axis=1)), lambda p, d: d * (-Y / p) / n)]

    assert verify.check_chain(stages(6), X).ok
    wrong = verify.check_chain(stages(1), X)
    assert wrong.first_broken == "loss", wrong


def test_without_a_hand_a_pass_needs_finite_differences_precise_enough():
    # bfloat16 inside fn: finite differences ± ~80 cannot confirm a rule 20% off (it was "ok"); a float64 function's
    # small gradient (1e-3 of fn's value) and an unused leaf are confirmed by precise finite differences.
    def gelu_bf16(fac):
        @jax.custom_vjp
        def g(x):
            xb = x.astype(jnp.bfloat16)
            return (xb * jax.nn.sigmoid(1.702 * xb)).astype(jnp.float32)

        def bwd(x, ct):
            xb = x.astype(jnp.bfloat16)
            s = jax.nn.sigmoid(1.702 * xb)
            return ((ct.astype(jnp.bfloat16) * (s + 1.702 * xb * s * (1 - s))).astype(jnp.float32) * fac,)

        g.defvjp(lambda x: (g(x), x), bwd)
        return lambda p, x: jnp.sum(g(x @ p["W"]))

    p = {"W": 0.5 * jax.random.normal(jax.random.key(0), (4, 3))}
    x = jax.random.normal(jax.random.key(1), (5, 4))
    for fac in (1.0, 1.2):
        assert verify.check_grad(gelu_bf16(fac), p, x).verdict == verify.Verdict.FD_UNRELIABLE
    params = {"a": jnp.array([0.3, -0.2]), "b": jnp.array([0.1, 0.4]), "unused": jnp.ones(3)}
    report = verify.check_grad(lambda q: jnp.sum(q["a"] ** 2) + 3.0 + 1e-3 * jnp.sum(jnp.sin(q["b"])), params)
    assert report.verdict == verify.Verdict.OK, report


def test_a_numpy_hand_running_jnp_on_closed_over_float64_numpy_data_is_checked():
    # The book's set-up: float64 NumPy data, x64 off, a NumPy backward that recomputes the forward with jnp. JAX
    # handed the jitted jnp.dot the data's float32 copy under x64: an XLA RuntimeProgramInputMismatch, no verdict.
    rs = np.random.RandomState(4)
    X = rs.randn(8, 2)
    W = jnp.asarray(rs.randn(2, 3), jnp.float32)

    def fwd(W):
        return jnp.maximum(jnp.dot(X, W), 0.0)

    def hand(W, wrong=1.0):
        out = np.asarray(fwd(W))
        d = np.ones_like(out)
        d[out <= 0] = 0
        g = np.dot(X.T, d)
        g[0, 0] *= wrong
        return g

    assert verify.check_grad(lambda W: jnp.sum(fwd(W)), W, hand=hand).ok
    bad = verify.check_grad(lambda W: jnp.sum(fwd(W)), W, hand=lambda W: hand(W, 1.5))
    assert bad.verdict == "hand_wrong" and bad.rows[0].worst_index == (0, 0), bad


def test_check_vjp_takes_numpy_primals_as_jax_vjp_does():
    # The book's categorical cross-entropy forward indexes a NumPy p with jnp.arange: check_vjp ran fn on the raw
    # NumPy array inside eval_shape, a bare TracerArrayConversionError.
    y = np.array([0, 1, 2, 1])
    P = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.02, 0.9, 0.08], [0.3, 0.3, 0.4]])

    def cce(p, y_true):
        return jnp.mean(-jnp.log(p[jnp.arange(p.shape[0]), y_true]))

    def cce_backward(p, y_true, d):  # the book's Loss_CategoricalCrossentropy.backward
        return -np.eye(3)[y_true] / p / len(p) * d

    assert verify.check_vjp(cce, cce_backward, P, y).ok
    wrong = verify.check_vjp(cce, lambda p, y_true, d: cce_backward(p, y_true, d) * len(p), P, y)
    assert wrong.verdict == "hand_wrong", wrong


@pytest.mark.slow  # (a long check: make test-slow)
def test_check_vjp_argnums_as_an_int_and_the_books_list_inputs():
    rs = np.random.RandomState(3)
    X = rs.randn(4, 3).astype(np.float32)
    W = rs.randn(3, 2).astype(np.float32)
    def fwd(x, W):
        return jnp.dot(x, W)

    assert verify.check_vjp(fwd, lambda x, W, d: np.dot(np.asarray(x).T, d), X, W, argnums=1).ok
    both = verify.check_vjp(fwd, lambda x, W, d: (np.dot(d, W.T), np.dot(np.asarray(x).T, d)), X.tolist(), W)
    assert both.ok and len(both.rows) == 2, both
    with pytest.raises(TypeError, match=r"argnums must be an int or a sequence of ints .* got str"):
        verify.check_vjp(fwd, lambda x, W, d: d, X, W, argnums="1")


@pytest.mark.slow
def test_check_chain_takes_the_books_nested_list_input():
    # The book's chapter-9 inputs as written: x a nested list. Each link converted it; the whole chain did not (a bare
    # "unsupported operand type(s) for @: 'list'" TypeError after every link had passed).
    inputs = [[1, 2, 3, 2.5], [2.0, 5.0, -1.0, 2], [-1.5, 2.7, 3.3, -0.8]]
    W = np.array([[0.2, 0.8, -0.5, 1], [0.5, -0.91, 0.26, -0.5], [-0.26, -0.27, 0.17, 0.87]], np.float32).T.copy()
    b = np.array([[2.0, 3.0, 0.5]], np.float32)

    def dense_back(p, x, d):
        return {"W": np.asarray(x).T @ d, "b": np.sum(d, axis=0, keepdims=True)}, d @ np.asarray(p["W"]).T

    stages = [("dense", lambda p, x: x @ p["W"] + p["b"], dense_back, {"W": W, "b": b}),
              ("relu", lambda x: jnp.maximum(x, 0), lambda x, d: np.asarray(d) * (np.asarray(x) > 0))]
    assert verify.check_chain(stages, inputs).ok


@pytest.mark.slow  # (a long check: make test-slow)
def test_the_books_integer_examples_and_list_params_get_errors_that_say_so():
    # ReLU's z = [[1, 2, -3, -4], ...] as the book writes it is an integer array: not differentiated. The error says
    # that, instead of only "no floating primal" or "must return 2 cotangent(s), got 3".
    z = [[1, 2, -3, -4], [2, -7, -1, 3]]
    with pytest.raises(ValueError, match=r"no floating primal .*x \(int\d+\) is an integer array.*np\.asarray\(x, float\)"):
        verify.check_vjp(lambda x: jnp.maximum(x, 0), lambda x, d: d * (np.asarray(x) > 0), z)
    W, b = np.ones((4, 2), np.float32), np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match=r"must return 2 cotangent\(s\).*got 3 \(x \(int\d+\) is an integer array"):
        verify.check_vjp(lambda x, W, b: x @ W + b, lambda x, W, b, d: (d @ W.T, np.asarray(x).T @ d, d.sum(0, keepdims=True)),
                         np.array(z), W, b)
    # a link's parameters as the book's nested lists are differentiated like arrays
    X = np.random.RandomState(0).randn(5, 2).astype(np.float32)
    p = {"W": [[0.1, -0.2, 0.3], [0.4, 0.5, -0.6]], "b": [[0.0, 0.1, 0.2]]}

    def back(p, x, d):
        return {"W": np.asarray(x).T @ d, "b": np.sum(d, axis=0, keepdims=True)}, d @ np.asarray(p["W"]).T

    assert verify.check_chain([("dense", lambda p, x: x @ p["W"] + p["b"], back, p)], X).ok


def test_a_backward_that_only_stores_its_result_gets_an_error_that_says_so():
    # The book's backward sets self.dinputs and returns nothing: check_vjp said the cotangent was "missing ['x']",
    # which names params the user does not have.
    def relu_backward(x, dvalues):
        dinputs = np.array(dvalues, copy=True)
        dinputs[np.asarray(x) <= 0] = 0  # (stored on an object, never returned)

    x = np.array([[-1.0, 2.0], [0.5, -0.3]])
    with pytest.raises(ValueError, match=r"hand_vjp returned None; it must return the cotangent\(s\) of \['x'\].*"
                                         r"self\.dinputs"):
        verify.check_vjp(lambda x: jnp.maximum(x, 0.0), relu_backward, x)
    with pytest.raises(ValueError, match=r"link 'relu'.*hand_vjp returned None"):
        verify.check_chain([("relu", lambda x: jnp.maximum(x, 0.0), relu_backward)], x)


@pytest.mark.slow  # (a long check: make test-slow)
def test_check_vjp_names_the_primal_an_untraceable_fn_needs_and_the_shapes_a_failing_fn_got():
    # A Python `if` on a primal: the message named the internal tuple's "[0]", not the user's argument x.
    def gated(x, W):
        return x @ W if x.sum() > 0 else x

    def back(x, W, d):
        return d @ W.T, np.asarray(x).T @ d

    x, W = np.ones((2, 3), np.float32), np.ones((3, 5), np.float32)
    with pytest.raises(TypeError, match=r"check_vjp \(differentiating x, W\).*it needs the value of x\)"):
        verify.check_vjp(gated, back, x, W)
    # fn that fails on the primals it is given: the user's own error, with a note of what check_vjp passed
    with pytest.raises(ValueError, match="matmul") as info:
        verify.check_vjp(lambda x, W: x @ W, back, x, np.ones((4, 5), np.float32))
    assert "check_vjp could not evaluate fn(x=float32[2,3], W=float32[4,5])" in "\n".join(info.value.__notes__)


def test_numpy_data_that_other_code_closed_over_without_x64_is_checked_in_float64():
    # JAX keeps its float32 copy of a NumPy float64 array that a live trace closed over (here the user's own
    # make_jaxpr; in a notebook, a jitted function or an earlier check), by the array object: passed to the float64
    # check as it was, the array came with "float64" claimed for float32 data, and the check died with XLA's
    # RuntimeProgramInputMismatch (found on a second check_chain of the book's layers in one session).
    rs = np.random.RandomState(0)
    X, W = rs.randn(5, 4), 0.5 * rs.randn(4, 3)
    held = jax.make_jaxpr(lambda w: jnp.sum(jnp.tanh(X @ w)))(jnp.ones((4, 3)))  # noqa: F841 - kept alive

    def loss(p, X):
        return jnp.sum(jnp.tanh(X @ p["W"]) ** 2)

    def hand(p, X):
        t = np.tanh(np.asarray(X) @ np.asarray(p["W"]))
        return {"W": np.asarray(X).T @ (2 * t * (1 - t**2))}

    assert verify.check_grad(loss, {"W": W}, X, hand=hand).ok
    bad = verify.check_grad(loss, {"W": W}, X, hand=lambda p, X: {"W": 1.01 * hand(p, X)["W"]})
    assert bad.verdict == "hand_wrong", bad


def test_the_dtype_note_says_a_float64_numpy_parameter_is_float32_to_jax_without_x64():
    # The note said "(float64, parameter float32)" of a parameter the user passed as float64 NumPy.
    W = np.random.RandomState(0).randn(3, 2)

    def hand(p):
        t = np.tanh(np.asarray(p["W"], np.float64))
        return {"W": 2 * t * (1 - t**2)}

    report = verify.check_grad(lambda p: jnp.sum(jnp.tanh(p["W"]) ** 2), {"W": W}, hand=hand)
    assert report.ok, report
    assert any("parameter float32 (a float64 NumPy array: JAX holds it as float32 without x64)" in n
               for n in report.notes), report.notes


def test_a_hand_that_fails_when_traced_raises_its_own_error_with_a_note():
    # A hand given the whole variables dict where it expects v["params"] (a KeyError) raised with no word of where.
    params = {"params": {"W": jnp.ones((3, 2))}}

    def loss(v, x):
        return jnp.sum(jnp.tanh(x @ v["params"]["W"]))

    def hand(v, x):
        return jax.grad(lambda q: loss({"params": q}, x))(v["par"])

    with pytest.raises(KeyError, match="par") as info:
        verify.check_grad(loss, params, jnp.ones((4, 3)), hand=hand)
    assert any("check_grad traced hand(params, *args)" in n for n in getattr(info.value, "__notes__", [])), info.value


def _overlapping_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (3, 3), (1, 1), "VALID")


def _routed_pool(route):
    """A 3x3, stride-1 max-pool as a custom_vjp whose backward sends each window's cotangent to its first maximum,
    its last, or to every tied one (wrong)."""

    @jax.custom_vjp
    def pool(x):
        return _overlapping_pool(x)

    def bwd(x, g):
        y = _overlapping_pool(x)
        n = y.shape[0]
        dx, taken = jnp.zeros_like(x), jnp.zeros(y.shape, bool)
        offsets = [(i, j) for i in range(3) for j in range(3)]
        for i, j in offsets[::-1] if route == "last" else offsets:
            tied = x[i : i + n, j : j + n] == y
            pick = tied if route == "every" else tied & ~taken
            taken = taken | tied
            dx = dx.at[i : i + n, j : j + n].add(pick.astype(x.dtype) * g)
        return (dx,)

    pool.defvjp(lambda x: (_overlapping_pool(x), x), bwd)
    return pool


@pytest.mark.parametrize("route", ["first", "last", "every"])
def test_overlapping_max_pool_windows_on_a_zero_background_take_their_first_or_last_maximum(route):
    # 3x3 windows with stride 1 over zeros share their tied elements: a window's first (or last) maximum collects
    # several windows' cotangents, a sum that ties broken at random beside the point rarely give. The draws at either
    # end of the sided ones break every tie in raster order, as JAX's own reduce_window gradient and the book's
    # argmax do. Correct routings were failed (JAX's own gradient too, with no rule and no hand).
    x = np.zeros((6, 6), np.float32)
    x[1, 1] = 1.0
    v = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4)), jnp.float32)
    if route == "first":
        plain = verify.check_grad(lambda x: jnp.sum(_overlapping_pool(x) * v), jnp.asarray(x))
        assert plain.ok, plain
    report = verify.audit(lambda x: jnp.sum(_routed_pool(route)(x) * v), jnp.asarray(x))
    assert report.ok == (route != "every"), report
    # The truth: first (last) routing is the exact gradient at a point beside, each element raised (lowered) by a
    # hair more the earlier it comes in raster order; every-tie routing is no point's gradient
    with jax.enable_x64(True):
        beside = x + (-1 if route == "first" else 1) * 1e-9 * np.arange(36).reshape(6, 6)
        exact = jax.grad(lambda x: jnp.sum(_overlapping_pool(x) * jnp.asarray(v, jnp.float64)))(jnp.asarray(beside))
        rule = jax.vjp(_routed_pool(route), jnp.asarray(x))[1](v)[0]
    assert np.allclose(rule, exact, atol=1e-6) == (route != "every")


def test_a_bfloat16_leaf_takes_the_joint_test_at_ties_too():
    # bfloat16 is no NumPy float: the directions that keep ties were all 0 for it, and 2·(x == max) passed
    x = jnp.asarray([1.0, 3.0, 3.0, 0.0, 3.0], jnp.bfloat16)
    for dtype in (jnp.bfloat16, jnp.float32):
        report = verify.check_grad(lambda p: 2 * jnp.max(p), x.astype(dtype),
                                   hand=lambda p: 2.0 * (np.asarray(p, np.float64) == 3.0))
        assert report.verdict == "hand_wrong", report
    # the truth: along (0, 1, 1, 0, 1), where the ties stay ties, f moves by 2 per unit; the hand says 6
    assert float(2.0 * (np.asarray(x, np.float64) == 3.0) @ np.array([0, 1, 1, 0, 1.0])) == 6.0


def test_flax_rnn_whose_carry_is_float32_says_how_to_check_it():
    # nnx.RNN's cell makes its carry in float32 whatever the inputs (h78): the float64 check cannot run, and the
    # advice to follow the inputs' dtype is not the user's to take inside Flax; the error names initial_carry, and
    # with it the model checks out.
    class M(nnx.Module):
        def __init__(self, rngs):
            self.rnn = nnx.RNN(nnx.GRUCell(3, 4, rngs=rngs))
            self.head = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, xs, carry):
            return self.head(self.rnn(xs) if carry is None else self.rnn(xs, initial_carry=carry))[..., 0]

    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(2, 5, 3)).astype(np.float32))
    model = M(nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"fails when evaluated in float64.*initial_carry=jnp\.zeros\(carry_shape, x\.dtype\)"):
        verify.check_grad(lambda m, xs: jnp.mean(m(xs, None) ** 2), model, xs, wrt=nnx.Param)
    report = verify.check_grad(lambda m, xs: jnp.mean(m(xs, jnp.zeros((2, 4), xs.dtype)) ** 2), model, xs,
                               wrt=nnx.Param)
    assert report.ok, report


def test_an_unregistered_dataclass_holding_weights_is_named_not_silently_held_fixed():
    # h112: a @dataclass not registered as a pytree is one opaque leaf to JAX: check_grad held it fixed and passed a
    # hand wrong in its weights (jax.grad refuses such params). Named, with what to do.
    @dataclasses.dataclass
    class Dense:
        W: jax.Array
        b: jax.Array

    params = {"head": jnp.array([0.3, -0.4, 0.2]), "body": Dense(jnp.full((2, 3), 0.2), jnp.zeros((1, 3)))}
    x = jnp.array([[1.0, 2.0], [0.5, -1.0]])

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["body"].W + p["body"].b) * p["head"][None])

    with pytest.raises(TypeError, match=r"params\['body'\].*Dense, a class not registered as a pytree.*\(W, b\)"
                                        r".*register_dataclass"):
        verify.check_grad(loss, params, x)
    with pytest.raises(TypeError, match=r"selected by wrt.*Dense, a class not registered"):
        verify.check_grad(loss, params, x, wrt={"head": True, "body": True})
    # held fixed on purpose (wrt), or registered, it is checked as usual
    assert verify.check_grad(loss, params, x, wrt={"head": True, "body": False}).ok
    jax.tree_util.register_dataclass(Dense, data_fields=["W", "b"], meta_fields=[])
    report = verify.check_grad(loss, params, x)
    assert report.ok and sorted(r.path for r in report.rows) == ["['body'].W", "['body'].b", "['head']"], report
