import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import book_mlp_numpy

import funcgrad as fg


@pytest.mark.slow
def test_value_and_hand_gradient_match_the_books_numpy_code():
    model = fg.nn.mlp([16, 3], output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy", l2={"dense1/*": 5e-4})
    params = model.init(jax.random.key(3), (2,))
    params["dense1"]["b"] = jnp.linspace(-0.01, 0.01, 16)
    X, y = fg.data.spiral(30, 3, key=2)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        X64 = X.astype(jnp.float64)
        loss, data, reg, grads = book_mlp_numpy(p64["dense1"]["W"], p64["dense1"]["b"], p64["dense2"]["W"],
                                                p64["dense2"]["b"], X64, np.asarray(y), lam=5e-4)
        assert float(obj.value(p64, X64, y)) == pytest.approx(loss, rel=1e-12)
        m = obj.metrics(p64, X64, y)
        assert float(m["data_loss"]) == pytest.approx(data, rel=1e-12)
        assert float(m["reg_loss"]) == pytest.approx(reg, rel=1e-12)
        hand = obj.hand_grad(p64, X64, y)
        jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g), r, rtol=1e-10, atol=1e-15), hand, grads)


@pytest.mark.slow
def test_softmax_and_crossentropy_use_the_books_combined_backward_even_where_softmax_saturates():
    """With logits thousands apart, softmax rounds the true class's probability to 0: chaining the separate
    backward rules (−y/ŷ through the softmax Jacobian) loses the gradient there, the book's combined
    ``(ŷ − y)/N`` does not. Any model ending in softmax with categorical_crossentropy takes the combined one."""
    model = fg.nn.mlp([16, 8, 3], output="softmax")  # dense, relu, dense, relu, dense, softmax
    obj = fg.Objective(model, "categorical_crossentropy")
    params = model.init(jax.random.key(1), (2,))
    for name, width in (("dense1", 16), ("dense2", 8)):  # spiral's first points are (0, 0): off ReLU's kink
        params[name]["b"] = jnp.linspace(-0.01, 0.013, width)
    X = fg.data.spiral(10, 3, key=4)[0]
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64) * 1000.0, params)  # logits thousands apart
        z = np.asarray(obj._logits_model.apply(p64, X.astype(jnp.float64)))
        y = jnp.asarray(z.argmin(1))  # labels on the least likely class: confidently wrong
        assert np.mean(np.exp(z - z.max(1, keepdims=True))[np.arange(30), np.asarray(y)] == 0.0) > 0.5  # saturated
        hand = obj.hand_grad(p64, X.astype(jnp.float64), y)
        expected = jax.grad(lambda p: -jnp.mean(jax.nn.log_softmax(obj._logits_model.apply(p, X.astype(jnp.float64)))
                                                [jnp.arange(30), y]))(p64)
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(hand))
        jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-9, atol=1e-12),
                     hand, expected)


@pytest.mark.parametrize(
    "loss,output,sizes,data",
    [
        ("binary_crossentropy", "sigmoid", [8, 1], "binary"),
        ("mse", "linear", [8, 8, 1], "sine"),
        ("mae", "linear", [8, 1], "sine"),
        ("categorical_crossentropy_with_logits", None, [8, 3], "spiral"),
    ],
)
@pytest.mark.slow
def test_hand_gradient_of_other_losses(loss, output, sizes, data):
    model = fg.nn.mlp(sizes, activation="tanh", output=output)
    obj = fg.Objective(model, loss, l1={"dense1/W": 1e-3})
    if data == "binary":
        X, y = fg.data.spiral(20, 2, key=0)
        y = y.reshape(-1, 1)
    elif data == "sine":
        X, y = fg.data.sine(40)
    else:
        X, y = fg.data.spiral(20, 3, key=0)
    params = model.init(jax.random.key(0), (X.shape[1],))
    params = jax.tree.map(lambda a: a + 0.01, params)  # off the L1 kink at w = 0
    report = fg.verify.check_grad(obj.value, params, X, y, hand=obj.hand_grad)
    assert report.ok and report.verdict == "ok", report
    assert set(obj.metrics(params, X, y)) == {"loss", "data_loss", "reg_loss", "accuracy"}


def test_stages_cover_every_layer_and_the_loss():
    model = fg.nn.mlp([4, 3], dropout=0.5, output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy")
    params = model.init(jax.random.key(0), (2,))
    X, y = fg.data.spiral(5, 3, key=0)
    names = [s[0] for s in obj.stages(params, X, y, key=jax.random.key(1), train=True)]
    assert names == ["dense1", "relu1", "dropout1", "dense2", "softmax1", "loss (categorical_crossentropy)"]


def test_objective_errors():
    model = fg.nn.mlp([3], output="softmax")
    with pytest.raises(ValueError, match="unknown loss 'cross_entropy'"):
        fg.Objective(model, "cross_entropy")
    with pytest.raises(ValueError, match=r"l2\['dense1/W'\] must be a number >= 0"):
        fg.Objective(model, "categorical_crossentropy", l2={"dense1/W": -1.0})
    with pytest.raises(ValueError, match=r"^Objective: l1\['dense1/b'\] must be a number >= 0; got nan"):
        fg.Objective(model, "categorical_crossentropy", l1={"dense1/b": float("nan")})
    with pytest.raises(TypeError, match="model must be a funcgrad Layer; got function"):
        fg.Objective(lambda p, x: x, "mse")
    obj = fg.Objective(model, "categorical_crossentropy", l2={"dense9/W": 1e-3})
    params = model.init(jax.random.key(0), (2,))
    with pytest.raises(ValueError, match="pattern 'dense9/W' matches no parameter"):
        obj.value(params, jnp.ones((2, 2)), jnp.array([0, 1]))


@pytest.mark.slow
def test_hand_gradient_keeps_the_parameters_dtype():
    """float32 parameters get a float32 hand gradient even with x64 on (the loss's cotangent takes their dtype)."""
    model = fg.nn.mlp([8, 3], output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy")
    params = model.init(jax.random.key(0), (2,))
    X, y = fg.data.spiral(5, 3, key=0)
    with jax.enable_x64(True):
        hand = obj.hand_grad(params, X, y)
        assert {str(g.dtype) for g in jax.tree.leaves(hand)} == {"float32"}
        auto = jax.grad(obj.value)(params, X, y)
        jax.tree.map(lambda h, a: np.testing.assert_allclose(np.asarray(h), np.asarray(a), rtol=2e-5, atol=1e-7),
                     hand, auto)


def test_hand_grad_checks_its_inputs_as_value_does():
    # The same errors for the same inputs: never a gradient of out-of-range labels or of broadcast targets.
    X, y = fg.data.spiral(10, 3, key=0)
    model = fg.nn.mlp([8, 3], output="softmax")
    params = model.init(jax.random.key(0), (2,))
    obj = fg.Objective(model, "categorical_crossentropy")
    for labels, match in [(y.at[0].set(3), r"labels must lie in \[0, 3\)"), (y[:, None], r"must have shape \(30,\)")]:
        for f in (obj.value, obj.hand_grad):
            with pytest.raises(ValueError, match=match):
                f(params, X, labels)
    reg = fg.nn.mlp([8, 1], output="linear")
    rp = reg.init(jax.random.key(0), (2,))
    for loss in ("mse", "mae"):
        o = fg.Objective(reg, loss)
        for target in (X[:, 0], jnp.zeros((1, 1))):
            for f in (o.value, o.hand_grad):
                with pytest.raises(ValueError, match="must have the same shape"):
                    f(rp, X, target)
