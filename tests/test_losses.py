import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcgrad as fg

RS = np.random.RandomState(0)
LOGITS = RS.randn(6, 3)
PROBS = np.exp(LOGITS) / np.exp(LOGITS).sum(1, keepdims=True)
LABELS = np.array([0, 2, 1, 1, 0, 2])
ONE_HOT = np.eye(3)[LABELS]


def book_cce(y_pred, y_true):
    """The book's Loss_CategoricalCrossentropy.forward, transcribed."""
    y_pred_clipped = np.clip(y_pred, 1e-7, 1 - 1e-7)
    correct = (
        y_pred_clipped[range(len(y_pred)), y_true] if y_true.ndim == 1 else np.sum(y_pred_clipped * y_true, axis=1)
    )
    return np.mean(-np.log(correct))


def book_bce(y_pred, y_true):
    y_pred_clipped = np.clip(y_pred, 1e-7, 1 - 1e-7)
    sample_losses = -(y_true * np.log(y_pred_clipped) + (1 - y_true) * np.log(1 - y_pred_clipped))
    return np.mean(np.mean(sample_losses, axis=-1))


def test_book_worked_example():
    probs = jnp.array([[0.7, 0.1, 0.2], [0.1, 0.5, 0.4], [0.02, 0.9, 0.08]])
    loss = fg.losses.categorical_crossentropy(probs, jnp.array([0, 1, 1]))
    assert abs(float(loss) - (-np.log(0.7) - np.log(0.5) - np.log(0.9)) / 3) < 1e-6


@pytest.mark.parametrize("labels", [LABELS, ONE_HOT], ids=["int", "one-hot"])
def test_categorical_crossentropy(labels):
    got = jax.jit(fg.losses.categorical_crossentropy)(jnp.asarray(PROBS, jnp.float32), jnp.asarray(labels))
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), book_cce(PROBS, labels), rtol=1e-6)
    got_logits = fg.losses.categorical_crossentropy_with_logits(jnp.asarray(LOGITS, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(float(got_logits), book_cce(PROBS, labels), rtol=1e-6)


def test_crossentropy_clip_at_zero_and_logits_stability():
    probs = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    assert np.isclose(float(fg.losses.categorical_crossentropy(probs, jnp.array([1, 0]))), -np.log(1e-7), rtol=1e-4)
    logits = jnp.array([[1000.0, -1000.0], [0.0, 0.0]])
    got = float(fg.losses.categorical_crossentropy_with_logits(logits, jnp.array([1, 0])))
    assert np.isclose(got, (2000 + np.log(2)) / 2, rtol=1e-6)  # no clip: exact and finite


def test_binary_crossentropy_mse_mae():
    p = 1 / (1 + np.exp(-RS.randn(8, 2)))
    t = (RS.rand(8, 2) > 0.5).astype(np.float64)
    np.testing.assert_allclose(
        float(fg.losses.binary_crossentropy(jnp.asarray(p), jnp.asarray(t))), book_bce(p, t), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(fg.losses.binary_crossentropy(jnp.asarray(p), jnp.asarray(t, jnp.int32))), book_bce(p, t), rtol=1e-6
    )
    pred, target = RS.randn(8, 2), RS.randn(8, 2)
    np.testing.assert_allclose(
        float(fg.losses.mse(jnp.asarray(pred), jnp.asarray(target))), np.mean((target - pred) ** 2), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(fg.losses.mae(jnp.asarray(pred), jnp.asarray(target))), np.mean(np.abs(target - pred)), rtol=1e-6
    )


def test_penalties_choose_leaves():
    params = {
        "dense1": {"W": jnp.array([[1.0, -2.0]]), "b": jnp.array([3.0, -4.0])},
        "dense2": {"W": jnp.array([[5.0]]), "b": jnp.array([6.0])},
    }
    assert float(fg.losses.l1_penalty(params, 0.5)) == 0.5 * 21
    assert float(fg.losses.l2_penalty(params, 0.5, where="dense1/*")) == 0.5 * (1 + 4 + 9 + 16)
    assert float(fg.losses.l2_penalty(params, 2.0, where=["dense1/W", "dense2/b"])) == 2.0 * (1 + 4 + 36)
    assert float(fg.losses.l1_penalty(params, 1.0, where=lambda name, leaf: name.endswith("/W"))) == 8.0
    assert fg.losses.leaf_names(params) == ["dense1/W", "dense1/b", "dense2/W", "dense2/b"]
    with pytest.raises(ValueError, match=r"pattern 'dens1/W' matches no parameter; the parameters are \['dense1/W'"):
        fg.losses.l2_penalty(params, 1.0, where="dens1/W")
    with pytest.raises(ValueError, match="scale must be a number >= 0"):
        fg.losses.l1_penalty(params, -1.0)


# ---- bad input ----


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for 3 classes; labels\[1\] = 3"):
        fg.losses.categorical_crossentropy(jnp.asarray(PROBS), jnp.array([0, 3, 1, 1, 0, 2]))
    with pytest.raises(ValueError, match=r"labels\[0\] = -1"):
        fg.losses.categorical_crossentropy_with_logits(jnp.asarray(LOGITS), jnp.array([-1, 0, 1, 1, 0, 2]))


def test_labels_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"must have shape \(6,\) .* got int32\[5\]"):
        fg.losses.categorical_crossentropy(jnp.asarray(PROBS), jnp.arange(5) % 3)
    with pytest.raises(ValueError, match=r"Flatten them with .reshape\(-1\)"):
        fg.losses.categorical_crossentropy(jnp.asarray(PROBS), jnp.asarray(LABELS).reshape(-1, 1))
    with pytest.raises(ValueError, match=r"one-hot labels must have shape \(6, 3\)"):
        fg.losses.categorical_crossentropy(jnp.asarray(PROBS), jnp.ones((6, 4)))
    with pytest.raises(ValueError, match=r"probs must be 2-D"):
        fg.losses.categorical_crossentropy(jnp.ones(3), jnp.array([0]))


def test_no_silent_broadcasting():
    with pytest.raises(ValueError, match=r"same shape \(no broadcasting\).*Reshape targets with .reshape\(-1, 1\)"):
        fg.losses.binary_crossentropy(jnp.full((4, 1), 0.5), jnp.array([0, 1, 1, 0]))
    with pytest.raises(ValueError, match=r"pred and target must have the same shape"):
        fg.losses.mse(jnp.ones((4, 2)), jnp.ones((4, 1)))


def test_labels_in_range_are_checked_once_traced_values_are_unknown():
    # Under jit the values are unknown: shapes are still checked.
    f = jax.jit(fg.losses.categorical_crossentropy)
    with pytest.raises(ValueError, match="must have shape"):
        f(jnp.asarray(PROBS), jnp.arange(5))


def test_bool_labels_and_empty_batches_are_errors_not_nan():
    with pytest.raises(TypeError, match=r"labels: bool labels bool\[6\].*astype\(int\)"):
        fg.losses.categorical_crossentropy(jnp.asarray(PROBS), jnp.asarray(LABELS) > 0)
    with pytest.raises(ValueError, match=r"probs: an empty batch float32\[0,3\]"):
        fg.losses.categorical_crossentropy(jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32))
    with pytest.raises(ValueError, match=r"logits: an empty batch"):
        jax.jit(fg.losses.categorical_crossentropy_with_logits)(jnp.zeros((0, 3)), jnp.zeros((0, 3)))
    for loss in (fg.losses.mse, fg.losses.mae, fg.losses.binary_crossentropy):
        with pytest.raises(ValueError, match=r"an empty batch"):
            loss(jnp.zeros((0, 1)), jnp.zeros((0, 1)))


def test_out_of_range_labels_under_jit_raise_through_checkify():
    probs, bad = jnp.asarray(PROBS, jnp.float32), jnp.array([0, 2, 5, 1, 0, 2])
    # A plain jit cannot see the values: the loss is NaN, from probabilities and from logits (where the one-hot
    # row of an out-of-range label is zero and the loss would otherwise be finite and wrong).
    assert np.isnan(float(jax.jit(fg.losses.categorical_crossentropy)(probs, bad)))
    assert np.isnan(float(jax.jit(fg.losses.categorical_crossentropy_with_logits)(jnp.asarray(LOGITS), bad)))
    good = jax.jit(fg.losses.categorical_crossentropy_with_logits)(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    eager = fg.losses.categorical_crossentropy_with_logits(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    assert float(good) == float(eager)
    checked = jax.jit(fg.losses.checked(fg.losses.categorical_crossentropy))
    err, _ = checked(probs, bad)
    assert "class labels must lie in [0, 3) for 3 classes; got min 0, max 5" in err.get()
    err, value = checked(probs, jnp.asarray(LABELS))
    assert err.get() is None and float(value) == pytest.approx(book_cce(PROBS, LABELS), rel=1e-5)


def test_label_checks_add_nothing_to_a_plain_jitted_program():
    probs, labels = jnp.asarray(PROBS, jnp.float32), jnp.asarray(LABELS)
    text = jax.jit(fg.losses.categorical_crossentropy).lower(probs, labels).as_text()
    assert "callback" not in text and "custom_call" not in text  # no host round trip per call
    # ... and a whole training step under checked() reports the bad label of its batch.
    model = fg.nn.mlp([4, 3], output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy")
    params = model.init(jax.random.key(0), (3,))
    X = jnp.asarray(RS.randn(6, 3), jnp.float32)
    err, _ = jax.jit(fg.losses.checked(jax.grad(obj.value)))(params, X, jnp.array([0, 1, 2, 3, 0, 1]))
    assert "class labels must lie in [0, 3)" in err.get()


def test_out_of_range_labels_under_jit_make_the_gradient_nan_too():
    # A `where` would give the NaN loss a finite (zero) gradient, which a step would apply silently.
    logits = jnp.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])
    W = jnp.eye(3)
    for loss in (fg.losses.categorical_crossentropy_with_logits,
                 lambda z, y: fg.losses.categorical_crossentropy(jax.nn.softmax(z), y)):
        def f(W, y, loss=loss):
            return loss(logits @ W, y)

        bad = jax.jit(jax.value_and_grad(f))(W, jnp.array([0, 3]))
        assert np.isnan(float(bad[0])) and np.isnan(np.asarray(bad[1])).all()
        y = jnp.array([0, 2])  # in range: the same gradient, bit for bit, as with the labels known (not traced)
        good = jax.jit(jax.grad(f))(W, y)
        np.testing.assert_array_equal(good, jax.jit(jax.grad(functools.partial(f, y=y)))(W))


def test_penalties_name_the_leaf_and_ignore_leaves_they_do_not_choose():
    p = {"dense1": {"W": jnp.ones((2, 2))}, "bn": {"count": jnp.zeros((), jnp.int32)}, "rng": jax.random.key(0)}
    assert float(fg.losses.l2_penalty(p, 0.1, where="dense1/*")) == pytest.approx(0.4)
    with pytest.raises(TypeError, match=r"l2_penalty leaf \['bn'\]\['count'\] must have a floating dtype"):
        fg.losses.l2_penalty(p, 0.1, where="bn/*")
    for scale in (float("nan"), True, -1.0, float("inf")):
        with pytest.raises(ValueError, match="scale must be a number >= 0, and finite"):
            fg.losses.l1_penalty(p, scale, where="dense1/*")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.slow
def test_crossentropies_of_saturated_half_precision_predictions_are_finite(dtype):
    # sigmoid(9) is 1.0 in bfloat16: the book's upper clip 1 − 1e-7 is 1 there too, and log(1 − p) was log 0.
    # The upper bound is kept below 1 in the dtype: 1 − its spacing below 1.
    top = 1 - float(jnp.finfo(dtype).epsneg)
    p, t = jnp.array([[1.0], [0.5]], dtype), jnp.array([[1.0], [0.0]], dtype)
    want = -np.mean([np.log(top), np.log(0.5)])
    got = fg.losses.binary_crossentropy(p, t)
    assert np.isfinite(float(got)) and abs(float(got) - want) <= 0.02 * want
    g = jax.grad(lambda q: fg.losses.binary_crossentropy(q, t).astype(jnp.float32))(p)
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
    probs = jnp.array([[1.0, 0.0], [0.0, 1.0]], dtype)
    assert np.isfinite(float(fg.losses.categorical_crossentropy(probs, jnp.array([0, 0]))))
