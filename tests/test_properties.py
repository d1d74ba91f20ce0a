"""Property-based tests (hypothesis) for the rule catalog and the book's optimizers.

- Every rule's hand-written backward against an independent NumPy transcription of the book's formula
  (../shared/reference/nnfs.md, chapters 9-17), at random shapes and points that include exact zeros, exact ties,
  points exactly at kinks, the cross-entropy clip ends (probabilities exactly 0 and 1), tiny (1e-30) and huge
  (±1e4) magnitudes, and random hyperparameters. At a kink the derivative does not exist, so only these
  transcriptions pin each rule's convention there (ReLU 0 at 0, leaky ReLU α at 0, L1 +1 at 0, MAE 0 at ŷ = y,
  maximum: all to x at a tie).
- The rules whose points need care (kinks, clips, ties, labels, hyperparameters) through funcgrad's own three-way
  verifier (`verify.check_vjp`) at random points away from kinks and clip ends, where forward and backward must
  agree with autodiff and finite differences.
- The book's optimizers (chapter 10: SGD with and without momentum, Adagrad, RMSprop, Adam, each with
  inverse-time decay) against a transcription of the book's Optimizer_* classes, update by update, under random
  hyperparameters and gradient sequences.

Everything is compared in float64 (x64 is switched on inside each test) with tight tolerances: rtol 1e-10
relative to the value plus the magnitude of the terms that may cancel in it (the two sides evaluate exp, tanh or
a sum in different orders, so they agree to rounding, not bit for bit). Masks and sign conventions are compared
exactly. The "ci" profile (tests/conftest.py) keeps every test bounded and derandomized;
HYPOTHESIS_PROFILE=explore searches far more examples.
"""

import functools

import pytest

pytest.importorskip("hypothesis")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from funcgrad import optim, rules, verify  # noqa: E402

RTOL = 1e-10
BOOK_CLIP = 1e-7  # the book clips predicted probabilities to [1e-7, 1 - 1e-7]

# ----------------------------------------------------------------------------------------------------------------
# Strategies. Random magnitudes stay in [1e-3, 10] (no products fall into the subnormal range, where XLA on CPU
# flushes to zero and NumPy does not); the special values are mixed in with st.sampled_from.

SPECIAL = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, -1e-30, 1e4, -1e4)


def magnitudes(lo=1e-3, hi=10.0):
    """Floats with lo <= |v| <= hi, either sign."""
    return st.builds(lambda sign, m: sign * m, st.sampled_from((1.0, -1.0)), st.floats(lo, hi))


VALUES = st.one_of(st.sampled_from(SPECIAL), magnitudes())  # zeros, kinks, ties, tiny and huge, random
DVALUES = st.one_of(st.sampled_from((0.0, 1.0, -1.0, 0.5)), magnitudes(1e-3, 10.0))  # upstream gradients
SHAPES = hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=3)  # few distinct shapes: few compilations
BATCHES = hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=5)  # (N samples, J outputs)
# Random hyperparameters stay >= 1e-3 (or exactly 0): a tiny one times a tiny value would be subnormal.
ALPHA = st.one_of(st.sampled_from((0.0, 0.01, 0.3, 1.0)), st.floats(1e-3, 1.0))
LAM = st.one_of(st.sampled_from((0.0, 5e-4, 1.0)), st.floats(1e-3, 10.0))
EPS = st.one_of(st.sampled_from((BOOK_CLIP, 1e-12, 1e-3)), st.floats(1e-12, 1e-3))
# probabilities: the clip ends exactly, just inside and outside them, tiny, and random
PROBS = st.one_of(st.sampled_from((0.0, 1.0, 1e-30, 1e-8, BOOK_CLIP, 1 - BOOK_CLIP, 1 - 1e-9, 0.5)), st.floats(1e-6, 1.0))


def arrays(shape, elements=VALUES):
    return hnp.arrays(np.float64, shape, elements=elements)


@st.composite
def same_shape(draw, n, elements=VALUES, shapes=SHAPES):
    """n arrays of one random shape, then dvalues of that shape."""
    shape = draw(shapes)
    return tuple(draw(arrays(shape, elements)) for _ in range(n)), draw(arrays(shape, DVALUES))


@st.composite
def with_ties(draw, shapes=SHAPES):
    """(x, y, dvalues) with y equal to x exactly at random elements (a tie: the kink of max)."""
    (x, y), d = draw(same_shape(2, shapes=shapes))
    tie = draw(hnp.arrays(np.bool_, x.shape))
    return x, np.where(tie, x, y), d


@st.composite
def logits(draw, shapes=SHAPES):
    """Logits with ties: values from a small pool (so rows share entries and maxima), whole rows constant."""
    shape = draw(shapes)
    pool = st.one_of(st.sampled_from((0.0, 1.0, -1.0, 2.0, 1e4, -1e4, 1e-30)), magnitudes())
    x = draw(arrays(shape, pool))
    constant = draw(hnp.arrays(np.bool_, shape[:-1]))
    x[constant] = draw(st.sampled_from((0.0, 3.0, 1e4, -1e4)))
    return x


@st.composite
def labels(draw, n, c):
    """Class labels for n samples of c classes: integers (n,) or one-hot rows (n, c)."""
    y = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    return np.eye(c)[y] if draw(st.booleans()) else y


# ----------------------------------------------------------------------------------------------------------------
# Comparison and calling


def assert_close(got, want, mag=0.0, *, rtol=RTOL, what=""):
    """got (float64) equals want to rtol·(|want| + mag), mag bounding the terms that may cancel in want; the same
    infinities and NaNs in the same places. rtol=0: exactly equal."""
    got = np.asarray(got)
    want = np.asarray(want, np.float64)
    assert got.dtype == np.float64, f"{what}: dtype {got.dtype}, expected float64"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    with np.errstate(invalid="ignore"):
        bound = rtol * (np.abs(want) + np.abs(mag))
        same_nonfinite = (np.isnan(got) & np.isnan(want)) | (np.isinf(want) & (got == want))
        bad = ~same_nonfinite & ~(np.abs(got - want) <= bound)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements differ; first at {idx}: got "
                             f"{got[idx]!r}, expected {want[idx]!r} (tolerance {np.broadcast_to(bound, want.shape)[idx]:.3g})"
                             f"\ngot:\n{got}\nexpected:\n{want}")


@functools.cache
def _jitted(fn):
    # Under jit, as training runs them; hyperparameters are traced (keyword arguments of a jitted function), so a new
    # value does not recompile; one compilation per shape (faster here than op-by-op dispatch of each new shape).
    return jax.jit(fn)


def backward(name, *primals, dvalues, **hyper):
    """The rule's backward on float64 JAX arrays, as NumPy; a tuple when the rule has several argnums."""
    out = _jitted(rules.CATALOG[name].backward)(*(jnp.asarray(p) for p in primals), jnp.asarray(dvalues), **hyper)
    return tuple(np.asarray(o) for o in out) if isinstance(out, tuple) else np.asarray(out)


def forward(name, *primals, **hyper):
    return np.asarray(_jitted(rules.CATALOG[name].forward)(*(jnp.asarray(p) for p in primals), **hyper))


# ----------------------------------------------------------------------------------------------------------------
# The book's formulas, transcribed in NumPy (nnfs.md; the book writes dvalues for the incoming gradient)


def np_softmax(x):
    """The book's Activation_Softmax.forward, row-wise over the last axis."""
    exp_values = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_values / np.sum(exp_values, axis=-1, keepdims=True)


def book_relu(inputs, dvalues):
    dinputs = dvalues.copy()
    dinputs[inputs <= 0] = 0
    return dinputs


def book_leaky_relu(inputs, dvalues, alpha):
    dinputs = dvalues.copy()
    dinputs[inputs <= 0] *= alpha  # the same kink convention as ReLU: the x <= 0 branch at exactly 0
    return dinputs


def book_sigmoid(inputs, dvalues):
    with np.errstate(over="ignore"):  # exp(1e4) = inf: σ = 0, as it should
        output = 1 / (1 + np.exp(-inputs))
    return dvalues * (1 - output) * output, np.abs(dvalues) * (output + output**2)


def book_tanh(inputs, dvalues):
    t = np.tanh(inputs)
    return dvalues * (1 - t**2), np.abs(dvalues) * (1 + t**2)


def book_softmax(inputs, dvalues):
    """Per sample: J = diagflat(s) − s·sᵀ, dinputs_i = J·dvalues_i (the book's loop over samples)."""
    c = inputs.shape[-1]
    out, dv = np_softmax(inputs).reshape(-1, c), dvalues.reshape(-1, c)
    dinputs, mag = np.empty_like(dv), np.empty_like(dv)
    for index, (row, single_dvalues) in enumerate(zip(out, dv, strict=True)):
        single_output = row.reshape(-1, 1)
        jacobian_matrix = np.diagflat(single_output) - np.dot(single_output, single_output.T)
        dinputs[index] = np.dot(jacobian_matrix, single_dvalues)
        # the terms before any cancellation (s − s² on the diagonal cancels where s ≈ 1): s|dv| + s(s·|dv|)
        mag[index] = row * np.abs(single_dvalues) + row * np.dot(row, np.abs(single_dvalues))
    return dinputs.reshape(inputs.shape), mag.reshape(inputs.shape)


def book_log_softmax(inputs, dvalues):
    """log s_i = x_i − log Σ e^x: Jacobian ∂ log s_i / ∂x_j = δ_ij − s_j, so dinputs = Jᵀ·dvalues per sample."""
    c = inputs.shape[-1]
    s, dv = np_softmax(inputs).reshape(-1, c), dvalues.reshape(-1, c)
    dinputs, mag = np.empty_like(dv), np.empty_like(dv)
    for index in range(len(s)):
        jacobian = np.eye(c) - s[index][None, :]
        dinputs[index] = jacobian.T @ dv[index]
        mag[index] = np.abs(dv[index]) + s[index] * np.abs(dv[index]).sum()  # 1 − s_j cancels where s_j ≈ 1
    return dinputs.reshape(inputs.shape), mag.reshape(inputs.shape)


def book_dense(inputs, weights, dvalues):
    dweights = np.dot(inputs.T, dvalues)
    dbiases = np.sum(dvalues, axis=0, keepdims=True)
    dinputs = np.dot(dvalues, weights.T)
    mags = (np.abs(dvalues) @ np.abs(weights).T, np.abs(inputs).T @ np.abs(dvalues), np.abs(dvalues).sum(axis=0))
    return (dinputs, dweights, dbiases[0]), mags  # funcgrad's bias is (n_out,), the book's (1, n_out)


def book_cce(y_pred, y_true, dvalue):
    """Loss_CategoricalCrossentropy.backward: −y_true / ŷ / N, NOT clipped (only the forward clips); times the
    scalar upstream gradient of the loss."""
    samples, n_labels = y_pred.shape
    if len(y_true.shape) == 1:
        y_true = np.eye(n_labels)[y_true]
    with np.errstate(divide="ignore", invalid="ignore"):
        dinputs = -y_true / y_pred
        dinputs = dinputs / samples
        return dvalue * dinputs


def book_cce_forward(y_pred, y_true, eps):
    y_pred_clipped = np.clip(y_pred, eps, 1 - eps)
    if len(y_true.shape) == 1:
        correct_confidences = y_pred_clipped[range(len(y_pred)), y_true]
    else:
        correct_confidences = np.sum(y_pred_clipped * y_true, axis=1)
    return np.mean(-np.log(correct_confidences))


def book_softmax_cce(logits, y_true, dvalue):
    """Activation_Softmax_Loss_CategoricalCrossentropy.backward on the softmax outputs: (ŷ − y)/N."""
    softmax_outputs = np_softmax(logits)
    samples = len(softmax_outputs)
    if len(y_true.shape) == 2:
        y_true = np.argmax(y_true, axis=1)
    dinputs = softmax_outputs.copy()
    dinputs[range(samples), y_true] -= 1
    dinputs = dinputs / samples
    return dvalue * dinputs, np.abs(dvalue) * (softmax_outputs + 1) / samples


def book_bce(y_pred, y_true, dvalue, eps):
    """Loss_BinaryCrossentropy.backward: ŷ clipped, −(y/ŷ − (1−y)/(1−ŷ)) / outputs / samples."""
    samples, outputs = y_pred.shape
    clipped_dvalues = np.clip(y_pred, eps, 1 - eps)
    dinputs = -(y_true / clipped_dvalues - (1 - y_true) / (1 - clipped_dvalues)) / outputs
    dinputs = dinputs / samples
    mag = (y_true / clipped_dvalues + (1 - y_true) / (1 - clipped_dvalues)) / outputs / samples
    return dvalue * dinputs, np.abs(dvalue) * mag


def book_bce_forward(y_pred, y_true, eps):
    y_pred_clipped = np.clip(y_pred, eps, 1 - eps)
    sample_losses = -(y_true * np.log(y_pred_clipped) + (1 - y_true) * np.log(1 - y_pred_clipped))
    return np.mean(np.mean(sample_losses, axis=-1)), np.mean(np.abs(sample_losses))


def book_mse(y_pred, y_true, dvalue):
    samples, outputs = y_pred.shape
    dinputs = -2 * (y_true - y_pred) / outputs
    return dvalue * dinputs / samples, np.abs(dvalue) * 2 * (np.abs(y_true) + np.abs(y_pred)) / outputs / samples


def book_mae(y_pred, y_true, dvalue):
    """|y − ŷ| differentiated in ŷ: −sign(y − ŷ) (np.sign(0) = 0 at the kink ŷ = y), / outputs / samples."""
    samples, outputs = y_pred.shape
    dinputs = -np.sign(y_true - y_pred) / outputs
    return dvalue * dinputs / samples


def book_l1(weights, dvalue, lam):
    dL1 = np.ones_like(weights)
    dL1[weights < 0] = -1  # the book's sign: +1 at exactly 0
    return dvalue * (lam * dL1)


def book_l2(weights, dvalue, lam):
    return dvalue * (2 * lam * weights)


# ----------------------------------------------------------------------------------------------------------------
# Rules: chapter 9's elementary functions


@given(same_shape(2))
@pytest.mark.slow
def test_add(case):
    (x, y), d = case
    with jax.enable_x64(True):
        dx, dy = backward("add", x, y, dvalues=d)
    assert_close(dx, d, rtol=0, what="dx")
    assert_close(dy, d, rtol=0, what="dy")


@given(same_shape(2))
def test_multiply(case):
    (x, y), d = case
    with jax.enable_x64(True):
        dx, dy = backward("multiply", x, y, dvalues=d)
    assert_close(dx, d * y, what="dx")
    assert_close(dy, d * x, what="dy")


@given(with_ties())
def test_maximum_gives_a_tie_wholly_to_x(case):
    """∂max/∂x = 1(x > y), ∂max/∂y = 1(y > x); at a tie rules.maximum documents "the whole gradient to x"."""
    x, y, d = case
    with jax.enable_x64(True):
        dx, dy = backward("maximum", x, y, dvalues=d)
    want_dx, want_dy = d.copy(), d.copy()
    want_dx[x < y] = 0
    want_dy[x >= y] = 0  # ties (−0.0 against 0.0 included) go to x
    assert_close(dx, want_dx, rtol=0, what="dx")
    assert_close(dy, want_dy, rtol=0, what="dy")


@given(same_shape(3, elements=st.one_of(st.sampled_from((0.0, 1.0, -1.0, 1e-30, 100.0, -100.0)), magnitudes())))
def test_polynomial(case):
    """f = 3x³z − y² + 5z + 2yz (chapter 9): ∇f = [9x²z, −2y + 2z, 3x³ + 5 + 2y]."""
    (x, y, z), d = case
    with jax.enable_x64(True):
        dx, dy, dz = backward("polynomial", x, y, z, dvalues=d)
    assert_close(dx, d * 9 * x**2 * z, what="dx")
    assert_close(dy, d * (2 * z - 2 * y), np.abs(d) * 2 * (np.abs(y) + np.abs(z)), what="dy")
    assert_close(dz, d * (3 * x**3 + 2 * y + 5), np.abs(d) * (3 * np.abs(x) ** 3 + 2 * np.abs(y) + 5), what="dz")


@given(same_shape(1, elements=st.one_of(st.sampled_from((0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4)), magnitudes())))
def test_chain(case):
    """y = 3(2x²)⁵: dy/dx = 15(2x²)⁴ · 4x (the chain rule, chapter 9)."""
    (x,), d = case
    with jax.enable_x64(True):
        got = backward("chain", x, dvalues=d)
    assert_close(got, d * (15 * (2 * x**2) ** 4) * (4 * x))


GRID = st.integers(-16, 16).map(lambda k: k / 4)  # dyadic: w·x + b is exact, so z = 0 is hit exactly


@given(st.integers(1, 5).flatmap(lambda n: st.tuples(arrays((n,), GRID), arrays((n,), GRID), arrays((), GRID))),
       st.booleans(), arrays((), DVALUES))
def test_neuron(xwb, at_kink, d):
    """y = ReLU(w·x + b) (chapter 9's single neuron): the ReLU mask 1(z > 0), 0 at z = 0 exactly."""
    x, w, b = xwb
    if at_kink:
        b = -np.dot(x, w)
    with jax.enable_x64(True):
        dx, dw, db = backward("neuron", x, w, b, dvalues=d)
    z = np.dot(x, w) + b
    drelu = d * (1.0 if z > 0 else 0.0)  # the book's ReLU: drelu[z <= 0] = 0
    assert_close(dx, drelu * w, rtol=0, what="dx")
    assert_close(dw, drelu * x, rtol=0, what="dw")
    assert_close(db, drelu, rtol=0, what="db")


# ----------------------------------------------------------------------------------------------------------------
# Rules: layers and activations


@given(st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4)).flatmap(
    lambda s: st.tuples(arrays((s[0], s[1])), arrays((s[1], s[2])), arrays((s[2],)), arrays((s[0], s[2]), DVALUES))))
@pytest.mark.slow
def test_dense(case):
    X, W, b, d = case
    with jax.enable_x64(True):
        got = backward("dense", X, W, b, dvalues=d)
    want, mags = book_dense(X, W, d)
    for g, w, m, what in zip(got, want, mags, ("dX", "dW", "db"), strict=True):
        assert_close(g, w, m, what=what)


@given(same_shape(1))
def test_relu_is_zero_at_zero(case):
    (x,), d = case
    with jax.enable_x64(True):
        got = backward("relu", x, dvalues=d)
    assert_close(got, book_relu(x, d), rtol=0)


@given(same_shape(1), ALPHA)
def test_leaky_relu_is_alpha_at_zero(case, alpha):
    (x,), d = case
    with jax.enable_x64(True):
        got = backward("leaky_relu", x, dvalues=d, alpha=alpha)
    assert_close(got, book_leaky_relu(x, d, alpha), rtol=0)


@given(same_shape(1, elements=st.one_of(st.sampled_from((0.0, 1e-30, 40.0, -40.0, 1e4, -1e4)), magnitudes())))
def test_sigmoid(case):
    (x,), d = case
    with jax.enable_x64(True):
        got = backward("sigmoid", x, dvalues=d)
    assert_close(got, *book_sigmoid(x, d))


@given(same_shape(1, elements=st.one_of(st.sampled_from((0.0, 1e-30, 20.0, -20.0, 1e4, -1e4)), magnitudes())))
def test_tanh(case):
    (x,), d = case
    with jax.enable_x64(True):
        got = backward("tanh", x, dvalues=d)
    assert_close(got, *book_tanh(x, d))


@given(same_shape(1))
def test_linear(case):
    (x,), d = case
    with jax.enable_x64(True):
        got = backward("linear", x, dvalues=d)
    assert_close(got, d, rtol=0)


@st.composite
def logits_and_dvalues(draw):
    x = draw(logits(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3)))  # batches of any rank
    return x, draw(arrays(x.shape, DVALUES))


@given(logits_and_dvalues())
@example((np.array([[-9.37036832, 7.63532758]]), np.array([[1.0, 0.5]])))  # s ≈ (4e-8, 1): s − s² cancels
@pytest.mark.slow
def test_softmax_is_the_jacobian_product(case):
    """diagflat(s) − s·sᵀ times dvalues, per sample; ±1e4 logits (exact 0s and 1s in s) and tied rows."""
    x, d = case
    with jax.enable_x64(True):
        got = backward("softmax", x, dvalues=d)
        s = forward("softmax", x)
    assert_close(s, np_softmax(x), what="softmax forward")
    assert_close(got, *book_softmax(x, d), what="softmax backward")


@given(logits_and_dvalues())
@example((np.array([[-9.37036832, 7.63532758]]), np.array([[1.0, 0.5]])))  # s ≈ (4e-8, 1): 1 − s cancels
@pytest.mark.slow
def test_log_softmax(case):
    x, d = case
    with jax.enable_x64(True):
        got = backward("log_softmax", x, dvalues=d)
    assert_close(got, *book_log_softmax(x, d))


@given(same_shape(1), st.one_of(st.sampled_from((0.0, 0.1, 0.5)), st.floats(0.0, 0.95)), st.data())
def test_dropout_scales_by_the_mask(case, rate, data):
    """Inverted dropout: mask = Bernoulli(1 − rate) / (1 − rate); dinputs = dvalues · mask."""
    (x,), d = case
    binary_mask = data.draw(hnp.arrays(np.bool_, x.shape)).astype(np.float64) / (1 - rate)
    with jax.enable_x64(True):
        got = backward("dropout", x, binary_mask, dvalues=d)
    assert_close(got, d * binary_mask, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Rules: losses and regularisation


@st.composite
def probabilities(draw):
    """(N, C) probabilities: softmax rows of tied or ±1e4 logits (exact 0s and 1s), exact one-hot rows, and raw
    entries at the clip ends (0, 1e-30, 1e-7, 1 − 1e-7, 1)."""
    n, c = draw(st.integers(1, 5)), draw(st.integers(2, 4))
    probs = np_softmax(draw(logits(st.just((n, c)))))
    raw = draw(arrays((n, c), PROBS))
    use_raw = draw(hnp.arrays(np.bool_, (n,)))
    probs[use_raw] = raw[use_raw]
    hot = draw(hnp.arrays(np.bool_, (n,)))
    probs[hot] = np.eye(c)[draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))][hot]
    return probs


@given(probabilities(), st.data())
@pytest.mark.slow
def test_categorical_crossentropy_is_not_clipped_in_backward(probs, data):
    """−y/ŷ/N unclipped: −1/N at ŷ_true = 1, −∞ at ŷ_true = 0 (NaN from 0/0 at a zero non-target probability, as
    the book's NumPy has it); the forward clips to [eps, 1 − eps]."""
    y = data.draw(labels(*probs.shape))
    d = data.draw(arrays((), DVALUES))
    eps = data.draw(st.one_of(st.none(), EPS))
    hyper = {} if eps is None else {"eps": eps}
    with jax.enable_x64(True):
        got = backward("categorical_crossentropy", probs, y, dvalues=d, **hyper)
        loss = forward("categorical_crossentropy", probs, y, **hyper)
    assert_close(got, book_cce(probs, y, d), what="backward")
    assert_close(loss, book_cce_forward(probs, y, BOOK_CLIP if eps is None else eps), what="forward")


@given(st.tuples(st.integers(1, 5), st.integers(1, 4)).flatmap(lambda s: logits(st.just(s))), st.data())
@pytest.mark.slow
def test_softmax_crossentropy(z, data):
    y = data.draw(labels(*z.shape))
    d = data.draw(arrays((), DVALUES))
    with jax.enable_x64(True):
        got = backward("softmax_crossentropy", z, y, dvalues=d)
    assert_close(got, *book_softmax_cce(z, y, d))


@given(BATCHES.flatmap(lambda s: st.tuples(arrays(s, PROBS), arrays(s, st.one_of(st.sampled_from((0.0, 1.0)),
                                                                                   st.floats(1e-3, 1.0))))),
       arrays((), DVALUES), st.one_of(st.none(), EPS))
@pytest.mark.slow
def test_binary_crossentropy_is_clipped_in_backward(case, d, eps):
    probs, y = case
    hyper = {} if eps is None else {"eps": eps}
    eps = BOOK_CLIP if eps is None else eps
    with jax.enable_x64(True):
        got = backward("binary_crossentropy", probs, y, dvalues=d, **hyper)
        loss = forward("binary_crossentropy", probs, y, **hyper)
    assert_close(got, *book_bce(probs, y, d, eps), what="backward")
    assert_close(loss, *book_bce_forward(probs, y, eps), what="forward")


@given(same_shape(2, shapes=BATCHES))
def test_mse(case):
    (pred, target), d = case
    d = d.reshape(-1)[0]  # the loss is a scalar: one upstream gradient
    with jax.enable_x64(True):
        got = backward("mse", pred, target, dvalues=d)
    assert_close(got, *book_mse(pred, target, d))


@given(with_ties(shapes=BATCHES))
def test_mae_is_zero_where_the_prediction_hits(case):
    pred, target, d = case
    d = d.reshape(-1)[0]
    with jax.enable_x64(True):
        got = backward("mae", pred, target, dvalues=d)
    assert_close(got, book_mae(pred, target, d))


@given(same_shape(1), LAM)
def test_l1_is_plus_lambda_at_zero(case, lam):
    (w,), d = case
    d = d.reshape(-1)[0]
    with jax.enable_x64(True):
        got = backward("l1", w, dvalues=d, lam=lam)
    assert_close(got, book_l1(w, d, lam), rtol=0)


@given(same_shape(1), LAM)
def test_l2(case, lam):
    (w,), d = case
    d = d.reshape(-1)[0]
    with jax.enable_x64(True):
        got = backward("l2", w, dvalues=d, lam=lam)
    assert_close(got, book_l2(w, d, lam))


TRANSCRIBED = {"add", "multiply", "maximum", "polynomial", "chain", "neuron", "dense", "relu", "leaky_relu", "sigmoid",
               "tanh", "linear", "softmax", "log_softmax", "dropout", "categorical_crossentropy", "softmax_crossentropy",
               "binary_crossentropy", "mse", "mae", "l1", "l2"}


def test_every_rule_has_a_property():
    assert set(rules.CATALOG) == TRANSCRIBED, "a rule without a NumPy transcription here, or one that went away"


# ----------------------------------------------------------------------------------------------------------------
# Rules through funcgrad's own verifier, away from kinks and clip ends. Each check_vjp call takes about a second
# (it compiles and runs finite differences), so: one random point for each rule whose point needs care (a kink, a
# clip, a tie, labels or a hyperparameter); every rule is also checked at its own example in test_rules.py. The point
# comes from a NumPy generator seeded by hypothesis (a random point even at the first, "simplest" example).


def point_away_from_kinks(name, seed):
    """(primals, hyper) for rule `name`: every entry at least 0.1 from a kink (0, a tie, ŷ = y, z = 0), probabilities
    inside the clip, random hyperparameters."""
    rng = np.random.default_rng(seed)
    n, c = rng.integers(2, 6), rng.integers(2, 5)

    def away(*shape):
        return rng.choice((-1.0, 1.0), shape) * rng.uniform(0.1, 3.0, shape)

    def class_labels():
        y = rng.integers(0, c, n)
        return np.eye(c)[y] if rng.random() < 0.5 else y

    if name in ("maximum", "mae"):
        x = away(n, c)
        return (x, x + away(n, c)), {}
    if name == "neuron":
        x, w, b = away(c), away(c), away()
        z = np.dot(x, w) + b
        return (x, w, b + (0.5 if 0 <= z < 0.1 else -0.5 if -0.1 < z < 0 else 0.0)), {}
    if name == "softmax":
        return (away(n, c),), {}
    if name == "categorical_crossentropy":
        return (np_softmax(rng.uniform(-2.0, 2.0, (n, c))), class_labels()), {"eps": 10 ** rng.uniform(-12, -3)}
    if name == "softmax_crossentropy":
        return (away(n, c), class_labels()), {}
    if name == "binary_crossentropy":
        probs, y = rng.uniform(0.05, 0.95, (n, c)), rng.integers(0, 2, (n, c)).astype(np.float64)
        return (probs, y), {"eps": 10 ** rng.uniform(-12, -3)}
    if name == "leaky_relu":
        return (away(n, c),), {"alpha": rng.uniform(0.01, 1.0)}
    if name == "l1":
        return (away(n, c),), {"lam": rng.uniform(0.01, 2.0)}
    raise KeyError(name)


VERIFIED = ("maximum", "neuron", "leaky_relu", "softmax", "categorical_crossentropy", "softmax_crossentropy",
            "binary_crossentropy", "mae", "l1")


@pytest.mark.parametrize("name", VERIFIED)
@settings(max_examples=1)
@given(seed=st.integers(0, 2**32 - 1))
@pytest.mark.slow
def test_rules_pass_the_three_way_check_away_from_kinks(name, seed):
    rule = rules.CATALOG[name]
    primals, hyper = point_away_from_kinks(name, seed)
    with jax.enable_x64(True):
        report = verify.check_vjp(functools.partial(rule.forward, **hyper), functools.partial(rule.backward, **hyper),
                                  *(jnp.asarray(p) for p in primals), argnums=rule.argnums, cotangents=1, seed=seed)
    assert report.verdict == "ok", report


# ----------------------------------------------------------------------------------------------------------------
# Optimizers: the book's Optimizer_SGD / _Adagrad / _RMSprop / _Adam (chapter 10), transcribed


class BookOptimizer:
    """One layer's weights under the book's optimizer `kind`: pre_update_params, update_params,
    post_update_params. Also tracks the magnitude of the terms that may cancel in each update (for tolerances)."""

    DEFAULTS = {
        "sgd": {"learning_rate": 1.0, "decay": 0.0, "momentum": 0.0},
        "adagrad": {"learning_rate": 1.0, "decay": 0.0, "epsilon": 1e-7},
        "rmsprop": {"learning_rate": 0.001, "decay": 0.0, "epsilon": 1e-7, "rho": 0.9},
        "adam": {"learning_rate": 0.001, "decay": 0.0, "epsilon": 1e-7, "beta_1": 0.9, "beta_2": 0.999},
    }

    def __init__(self, kind, weights, **hyper):
        self.kind = kind
        for k, v in (self.DEFAULTS[kind] | hyper).items():
            setattr(self, k, v)
        self.current_learning_rate = self.learning_rate
        self.iterations = 0
        self.weights = weights.copy()
        self.weight_momentums = np.zeros_like(weights)
        self.weight_cache = np.zeros_like(weights)
        self.abs_momentums = np.zeros_like(weights)

    def pre_update_params(self):
        if self.decay:
            self.current_learning_rate = self.learning_rate * (1.0 / (1.0 + self.decay * self.iterations))

    def update_params(self, dweights):
        """Returns (the update added to the weights, a bound on the magnitude of the terms in it)."""
        lr = self.current_learning_rate
        if self.kind == "sgd":
            if self.momentum:
                weight_updates = self.momentum * self.weight_momentums - lr * dweights
                self.weight_momentums = weight_updates
                self.abs_momentums = self.momentum * self.abs_momentums + lr * np.abs(dweights)
                mag = self.abs_momentums
            else:
                weight_updates = -lr * dweights
                mag = np.abs(weight_updates)
        elif self.kind in ("adagrad", "rmsprop"):
            if self.kind == "adagrad":
                self.weight_cache += dweights**2
            else:
                self.weight_cache = self.rho * self.weight_cache + (1 - self.rho) * dweights**2
            weight_updates = -lr * dweights / (np.sqrt(self.weight_cache) + self.epsilon)
            mag = np.abs(weight_updates)
        else:
            self.weight_momentums = self.beta_1 * self.weight_momentums + (1 - self.beta_1) * dweights
            self.abs_momentums = self.beta_1 * self.abs_momentums + (1 - self.beta_1) * np.abs(dweights)
            correction = 1 - self.beta_1 ** (self.iterations + 1)
            weight_momentums_corrected = self.weight_momentums / correction
            self.weight_cache = self.beta_2 * self.weight_cache + (1 - self.beta_2) * dweights**2
            weight_cache_corrected = self.weight_cache / (1 - self.beta_2 ** (self.iterations + 1))
            denominator = np.sqrt(weight_cache_corrected) + self.epsilon
            weight_updates = -lr * weight_momentums_corrected / denominator
            mag = lr * self.abs_momentums / correction / denominator
        self.weights = self.weights + weight_updates
        return weight_updates, mag

    def post_update_params(self):
        self.iterations += 1

    def step(self, dweights):
        self.pre_update_params()
        out = self.update_params(dweights)
        self.post_update_params()
        return out


RATE = st.floats(1e-4, 1.0)
DECAY = st.one_of(st.sampled_from((0.0, 1e-3, 0.1)), st.floats(1e-3, 10.0))
UNIT = st.one_of(st.sampled_from((0.0, 0.5, 0.9)), st.floats(1e-3, 1.0, exclude_max=True))  # [0, 1)
# Adam's bias correction 1 − β^(t+1) amplifies rounding by 1/(1 − β): betas stay <= 0.9999 for rtol 1e-10.
BETA = st.one_of(st.sampled_from((0.0, 0.9, 0.999)), st.floats(1e-3, 0.9999))
OPT_EPS = st.one_of(st.sampled_from((1e-7, 1e-8)), st.floats(1e-10, 1e-3))
OPT_HYPER = {  # funcgrad's name: (the book's name, strategy)
    "sgd": {"learning_rate": ("learning_rate", RATE), "decay": ("decay", DECAY), "momentum": ("momentum", UNIT)},
    "adagrad": {"learning_rate": ("learning_rate", RATE), "decay": ("decay", DECAY), "eps": ("epsilon", OPT_EPS)},
    "rmsprop": {"learning_rate": ("learning_rate", RATE), "decay": ("decay", DECAY), "rho": ("rho", UNIT),
                "eps": ("epsilon", OPT_EPS)},
    "adam": {"learning_rate": ("learning_rate", RATE), "decay": ("decay", DECAY), "beta1": ("beta_1", BETA),
             "beta2": ("beta_2", BETA), "eps": ("epsilon", OPT_EPS)},
}
GRADS = st.one_of(st.sampled_from((0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e4, -1e4)), magnitudes())


@st.composite
def optimizer_case(draw, kind):
    """(funcgrad's kwargs, the book's kwargs, w0, gradients): each hyperparameter drawn, or (one time in four) left
    at its default (the defaults must agree too); 3-6 gradient steps of one small shape."""
    ours, book = {}, {}
    for name, (book_name, strategy) in OPT_HYPER[kind].items():
        if draw(st.sampled_from((True, True, True, False)), label=f"{name} given"):
            ours[name] = book[book_name] = draw(strategy, label=name)
    shape = draw(st.sampled_from(((1,), (4,), (2, 3), (3, 1))))  # few shapes: optax runs op by op, compiling each
    w0 = draw(arrays(shape, st.one_of(st.just(0.0), magnitudes())))
    grads = draw(st.lists(arrays(shape, GRADS), min_size=3, max_size=6))
    return ours, book, w0, grads


def run_against_book(tx, kind, book_kwargs, w0, grads):
    book = BookOptimizer(kind, w0, **book_kwargs)
    w = jnp.asarray(w0)
    state = tx.init(w)
    scale = np.abs(w0)  # the weights' magnitude plus every update's: what rounding in the sums is relative to
    for t, g in enumerate(grads):
        updates, state = tx.update(jnp.asarray(g), state, w)
        w = optax.apply_updates(w, updates)
        want, mag = book.step(g)
        scale = scale + mag
        assert_close(updates, want, mag, what=f"{kind} update {t}")
        assert_close(w, book.weights, scale, what=f"{kind} weights after update {t}")


@pytest.mark.parametrize("kind", sorted(OPT_HYPER))
@given(data=st.data())
@pytest.mark.slow
def test_optimizer_matches_the_books_update_rule(kind, data):
    ours, book_kwargs, w0, grads = data.draw(optimizer_case(kind))
    with jax.enable_x64(True):
        run_against_book(optim.OPTIMIZERS[kind](**ours), kind, book_kwargs, w0, grads)


@settings(max_examples=10)
@given(st.sampled_from(sorted(OPT_HYPER)), st.data())
def test_optimizer_with_injected_hyperparameters_matches_the_book(kind, data):
    """optax.inject_hyperparams passes every numeric hyperparameter as an array (a zero momentum or decay is then
    not a Python 0): the same updates."""
    ours, book_kwargs, w0, grads = data.draw(optimizer_case(kind))
    with jax.enable_x64(True):
        run_against_book(optax.inject_hyperparams(optim.OPTIMIZERS[kind])(**ours), kind, book_kwargs, w0, grads)
