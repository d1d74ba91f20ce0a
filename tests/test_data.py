import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

import funcgrad as fg

# ../shared/reference/nnfs.md: spiral_data(100, 3) with seed 0, then dense1 = 2→3 with the book's weights.
REFERENCE_DENSE1_OUTPUT = np.array(
    [
        [0, 0, 0],
        [-1.0475188e-04, 1.1395361e-04, -4.7983500e-05],
        [-2.7414842e-04, 3.1729150e-04, -8.6921798e-05],
        [-4.2188365e-04, 5.2666257e-04, -5.5912682e-05],
        [-5.7707680e-04, 7.1401405e-04, -8.9430439e-05],
    ],
    dtype=np.float32,
)


def test_exact_spiral_pins_the_reference_figures():
    stream = fg.data.NNFSRandom(0)
    X, y = stream.spiral(100, 3)
    dense1 = stream.dense_params(2, 3)
    # The book's np.dot after nnfs.init(): cast to float64, multiply, cast back to float32.
    out = (X.astype(np.float64) @ dense1["W"].astype(np.float64)).astype(np.float32) + dense1["b"]
    np.testing.assert_allclose(out[:5], REFERENCE_DENSE1_OUTPUT, rtol=1e-6, atol=1e-12)
    # funcgrad's own dense layer (JAX float32) gives the same figures.
    layer = fg.nn.dense(3)
    jax_out = layer.apply({k: jnp.asarray(v) for k, v in dense1.items()}, jnp.asarray(X))
    np.testing.assert_allclose(np.asarray(jax_out[:5]), REFERENCE_DENSE1_OUTPUT, rtol=1e-5, atol=1e-9)


NNFS_SCRIPT = """
import sys, numpy as np, nnfs
from nnfs.datasets import spiral_data, vertical_data
nnfs.init()
X, y = spiral_data(100, 3)
V, vy = vertical_data(50, 2)
np.savez(sys.argv[1], X=X, y=y, V=V, vy=vy)
"""


def test_exact_spiral_is_bit_for_bit_the_nnfs_package(tmp_path):
    pytest.importorskip("nnfs")
    out = tmp_path / "nnfs.npz"
    run_python(["-c", NNFS_SCRIPT, str(out)])  # nnfs.init() patches NumPy globally: keep it out of this process
    ref = np.load(out, allow_pickle=False)
    stream = fg.data.NNFSRandom(0)
    X, y = stream.spiral(100, 3)
    assert X.dtype == ref["X"].dtype == np.float32
    assert np.array_equal(X, ref["X"]) and np.array_equal(y, ref["y"])
    V, vy = stream.vertical(50, 2)  # the stream continues, as in a book script
    assert np.array_equal(V, ref["V"]) and np.array_equal(vy, ref["vy"])
    Xj, yj = fg.data.spiral(100, 3, exact=True)
    assert np.array_equal(np.asarray(Xj), ref["X"]) and yj.dtype == jnp.int32
    assert np.array_equal(np.asarray(yj), ref["y"])


def spiral_numpy(noise, samples, classes):
    """A NumPy transcription of the spiral formula, given the normal draws."""
    X = np.zeros((samples * classes, 2))
    for c in range(classes):
        r = np.linspace(0, 1, samples)
        t = np.linspace(4 * c, 4 * (c + 1), samples) + noise[c] * 0.2
        X[c * samples : (c + 1) * samples] = np.c_[r * np.sin(2.5 * t), r * np.cos(2.5 * t)]
    return X


@pytest.mark.parametrize("samples,classes", [(100, 3), (7, 2), (1, 1)])
def test_spiral_from_key_follows_the_formula(samples, classes):
    key = jax.random.key(3)
    X, y = fg.data.spiral(samples, classes, key=key)
    assert X.shape == (samples * classes, 2) and X.dtype == jnp.float32
    assert y.shape == (samples * classes,) and y.dtype == jnp.int32
    noise = np.asarray(jax.random.normal(key, (classes, samples), jnp.float32))
    np.testing.assert_allclose(np.asarray(X), spiral_numpy(noise, samples, classes), atol=2e-6)
    np.testing.assert_array_equal(np.asarray(y), np.repeat(np.arange(classes), samples))
    assert np.all(np.asarray(X)[::samples] == 0)  # every class starts at exactly (0, 0)


def test_spiral_is_deterministic_and_key_dependent():
    a, _ = fg.data.spiral(50, 3, key=1)
    b, _ = fg.data.spiral(50, 3, key=jax.random.key(1))
    c, _ = fg.data.spiral(50, 3, key=2)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_vertical_and_sine():
    X, y = fg.data.vertical(200, 3, key=0)
    assert X.shape == (600, 2)
    means = np.array([np.asarray(X)[np.asarray(y) == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(means, [[c / 3, 0.5] for c in range(3)], atol=0.03)
    Xs, ys = fg.data.sine(1000)
    assert Xs.shape == ys.shape == (1000, 1)
    ref_x = np.arange(1000).reshape(-1, 1) / 1000
    np.testing.assert_allclose(np.asarray(Xs), ref_x, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(ys), np.sin(2 * np.pi * ref_x), atol=1e-7)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: fg.data.spiral(0, 3), "samples must be an int >= 1"),
        (lambda: fg.data.spiral(10, 2.5), "classes must be an int"),
        (lambda: fg.data.spiral(10, 3, key="seed"), "key must be an int seed or a PRNG key"),
        (lambda: fg.data.spiral(10, 3, key=jax.random.key(0), exact=True), "int seed for NumPy"),
        (lambda: fg.data.sine(-1), "samples must be an int >= 1"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_book_initialisation_from_the_stream():
    model = fg.nn.mlp([3, 3], output="softmax")
    stream = fg.data.NNFSRandom(0)
    X, y = stream.spiral(100, 3)
    params = stream.init(model, (2,))
    again = fg.data.NNFSRandom(0)
    again.spiral(100, 3)
    W1 = again.dense_params(2, 3)["W"]
    np.testing.assert_array_equal(np.asarray(params["dense1"]["W"]), W1)
    # The chapter-5 model (2→3 ReLU → 3 softmax) prints softmax rows ≈ 1/3 and loss 1.0986104.
    probs = model.apply(params, jnp.asarray(X))
    np.testing.assert_allclose(np.asarray(probs[:5]), 1 / 3, atol=1e-4)
    loss = fg.losses.categorical_crossentropy(probs, jnp.asarray(y, jnp.int32))
    assert abs(float(loss) - 1.0986104) < 2e-6
