import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcgrad as fg

X = np.random.RandomState(0).randn(5, 4).astype(np.float32)


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


NUMPY_ACTIVATIONS = {
    "relu": lambda z: np.maximum(z, 0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "tanh": np.tanh,
    "linear": lambda z: z,
    "softmax": np_softmax,
    "log_softmax": lambda z: np.log(np_softmax(z)),
}


@pytest.mark.parametrize("name", sorted(NUMPY_ACTIVATIONS))
def test_activation_matches_numpy_under_jit(name):
    layer = fg.nn.activation(name)
    assert layer.init(jax.random.key(0), (4,)) == {}
    out = jax.jit(layer.apply)({}, jnp.asarray(X))
    assert out.shape == X.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), NUMPY_ACTIVATIONS[name](X.astype(np.float64)), rtol=2e-6, atol=1e-6)
    assert layer.output_shape((4,)) == (4,)


def test_dense_matches_numpy_and_book_layout(key):
    layer = fg.nn.dense(3)
    params = layer.init(key, (4,))
    assert params["W"].shape == (4, 3) and params["b"].shape == (3,)
    assert np.all(np.asarray(params["b"]) == 0)
    params = {"W": params["W"], "b": jnp.array([0.5, -1.0, 2.0])}
    out = jax.jit(layer.apply)(params, jnp.asarray(X))
    ref = X.astype(np.float64) @ np.asarray(params["W"], np.float64) + np.array([0.5, -1.0, 2.0])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    assert layer.output_shape(4) == (3,)


def test_dense_params_follow_the_dtype(key):
    with jax.enable_x64(True):
        params = fg.nn.dense(2).init(key, (3,), dtype=jnp.float64)
        assert params["W"].dtype == jnp.float64
        assert fg.nn.dense(2).apply(params, jnp.ones((1, 3), jnp.float64)).dtype == jnp.float64


def test_book_initialiser_statistics():
    W = fg.initializers.book(0.01)(jax.random.key(1), (400, 500))
    assert abs(float(W.std()) - 0.01) < 2e-4 and abs(float(W.mean())) < 2e-4


@pytest.mark.parametrize(
    "init,var",
    [
        (fg.initializers.glorot_uniform(), 2 / (400 + 600)),
        (fg.initializers.glorot_normal(), 2 / (400 + 600)),
        (fg.initializers.he_normal(), 2 / 400),
        (fg.initializers.he_uniform(), 2 / 400),
    ],
)
def test_variance_scaling_initialisers(init, var):
    W = np.asarray(init(jax.random.key(2), (400, 600)))
    assert abs(W.var() / var - 1) < 0.02
    assert abs(W.mean()) < 0.01 * np.sqrt(var)


def test_mlp_builds_the_books_model_in_one_line(key):
    model = fg.nn.mlp([64, 3], activation="relu", output="softmax")
    assert [n for n, _ in model.layers] == ["dense1", "relu1", "dense2", "softmax1"]
    params = model.init(key, (2,))
    assert jax.tree.map(jnp.shape, params) == {
        "dense1": {"W": (2, 64), "b": (64,)},
        "dense2": {"W": (64, 3), "b": (3,)},
    }
    assert fg.nn.param_count(params) == 2 * 64 + 64 + 64 * 3 + 3
    x = jnp.asarray(np.random.RandomState(1).randn(7, 2), jnp.float32)
    out = jax.jit(model.apply)(params, x)
    p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
    h = np.maximum(np.asarray(x, np.float64) @ p["dense1"]["W"] + p["dense1"]["b"], 0)
    ref = np_softmax(h @ p["dense2"]["W"] + p["dense2"]["b"])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-7)
    assert model.output_shape((2,)) == (3,)


def test_serial_naming_and_nesting(key):
    block = fg.nn.serial(fg.nn.dense(4), fg.nn.tanh(), name="block")
    model = fg.nn.serial(("hidden", fg.nn.dense(8)), fg.nn.relu(), block, fg.nn.dense(2, name="head"))
    params = model.init(key, (3,))
    assert sorted(params) == ["block", "head", "hidden"]
    assert sorted(params["block"]) == ["dense1"]
    assert model.apply(params, jnp.ones((5, 3))).shape == (5, 2)
    with pytest.raises(ValueError, match="two layers are named 'x'"):
        fg.nn.serial(("x", fg.nn.dense(2)), ("x", fg.nn.dense(2)))
    with pytest.raises(TypeError, match="forget the parentheses"):
        fg.nn.serial(fg.nn.dense(2), fg.nn.relu)


def test_dropout_is_inverted_and_needs_a_key():
    layer = fg.nn.dropout(0.25)
    x = jnp.ones((200, 500))
    assert layer.apply({}, x) is x  # identity when not training
    out = np.asarray(jax.jit(lambda x, k: layer.apply({}, x, key=k, train=True))(x, jax.random.key(0)))
    zero_share = (out == 0).mean()
    assert abs(zero_share - 0.25) < 0.01
    np.testing.assert_allclose(out[out != 0], 1 / 0.75, rtol=1e-6)
    assert abs(out.mean() - 1) < 0.02  # inverted dropout keeps the mean
    with pytest.raises(ValueError, match="needs a PRNG key"):
        layer.apply({}, x, train=True)
    # The same key gives the same mask; the backward pass reuses it.
    k = jax.random.key(5)
    y = layer.apply({}, x, key=k, train=True)
    _, dx = layer.backward({}, x, jnp.ones_like(x), key=k, train=True)
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(y))


def test_serial_splits_keys_for_dropout(key):
    model = fg.nn.mlp([16, 3], dropout=0.5, output="softmax")
    assert [n for n, _ in model.layers] == ["dense1", "relu1", "dropout1", "dense2", "softmax1"]
    params = model.init(key, (2,))
    x = jnp.ones((4, 2))
    a = model.apply(params, x, key=jax.random.key(1), train=True)
    b = model.apply(params, x, key=jax.random.key(2), train=True)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        model.apply(params, x, train=True)


# ---- bad input: clear errors naming the argument and pytree path ----


@pytest.fixture
def book_model():
    model = fg.nn.mlp([64, 3], output="softmax")
    return model, model.init(jax.random.key(0), (2,))


def test_wrong_input_width_names_the_layer(book_model):
    model, params = book_model
    with pytest.raises(ValueError, match=r"has 3 features .*params\['dense1'\]\['W'\] is float32\[2,64\]"):
        model.apply(params, jnp.ones((10, 3)))
    with pytest.raises(ValueError, match=r"has 3 features"):
        jax.jit(model.apply)(params, jnp.ones((10, 3)))  # also under jit


def test_missing_layer_in_params(book_model):
    model, params = book_model
    del params["dense2"]
    with pytest.raises(ValueError, match=r"params is missing 'dense2'.*\['dense1', 'dense2'\]"):
        model.apply(params, jnp.ones((10, 2)))


def test_integer_parameters_are_rejected(book_model):
    model, params = book_model
    params["dense1"]["W"] = params["dense1"]["W"].astype(jnp.int32)
    with pytest.raises(TypeError, match=r"params\['dense1'\]\['W'\] must have a floating dtype.*int32"):
        model.apply(params, jnp.ones((10, 2)))


def test_wrong_param_shape(book_model):
    model, params = book_model
    params["dense2"]["b"] = jnp.zeros((4,))
    with pytest.raises(ValueError, match=r"params\['dense2'\]\['b'\] must have shape \(3,\); got float32\[4\]"):
        model.apply(params, jnp.ones((10, 2)))


def test_integer_input_and_bad_init_arguments(book_model):
    model, params = book_model
    with pytest.raises(TypeError, match="dense input x .* floating dtype"):
        model.apply(params, jnp.ones((10, 2), jnp.int32))
    with pytest.raises(TypeError, match=r"key must be a PRNG key, e.g. jax.random.key\(0\); got int 0"):
        model.init(0, (2,))
    with pytest.raises(ValueError, match="input_shape must be"):
        model.init(jax.random.key(0), (0,))
    with pytest.raises(ValueError, match="units must be a positive int"):
        fg.nn.dense(0)
    with pytest.raises(ValueError, match="rate must lie in"):
        fg.nn.dropout(1.0)
    with pytest.raises(ValueError, match="unknown activation 'relux'"):
        fg.nn.mlp([3], activation="relux")


def test_backward_checks_dvalues_shape(book_model):
    model, params = book_model
    with pytest.raises(ValueError, match=r"dvalues must have the output's shape \(10, 3\)"):
        model.backward(params, jnp.ones((10, 2)), jnp.ones((10, 4)))


@pytest.mark.parametrize("name", ["glorot_uniform", "glorot_normal", "he_normal", "he_uniform"])
def test_initialisers_named_as_jaxs_draw_jaxs_distribution(name):
    ours = fg.initializers.INITIALIZERS[name]()(jax.random.key(3), (30, 40, 50))
    theirs = getattr(jax.nn.initializers, name)()(jax.random.key(3), (30, 40, 50))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    if name.endswith("normal"):  # truncated at two standard deviations of the untruncated normal it rescales
        fan = {"glorot_normal": (40 * 30 + 50 * 30) / 2, "he_normal": 40 * 30 / 2}[name]
        bound = 2 * np.sqrt(1 / fan) / 0.87962566103423978
        assert np.abs(np.asarray(ours)).max() <= bound * (1 + 1e-6)


def test_one_dimensional_shapes_take_their_length_as_both_fans():
    W = np.asarray(fg.initializers.he_uniform()(jax.random.key(0), (10000,)))
    assert abs(W.var() / (2 / 10000) - 1) < 0.05
    with pytest.raises(ValueError, match="at least 1 dimension"):
        fg.initializers.glorot_normal()(jax.random.key(0), ())
