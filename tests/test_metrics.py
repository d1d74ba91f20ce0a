import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcgrad as fg


def test_accuracy_int_and_one_hot():
    out = jnp.array([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.02, 0.9, 0.08]])
    y = jnp.array([0, 1, 1])
    assert float(jax.jit(fg.metrics.accuracy)(out, y)) == pytest.approx(2 / 3)
    assert float(fg.metrics.accuracy(out, jax.nn.one_hot(y, 3))) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="binary_accuracy"):
        fg.metrics.accuracy(jnp.ones((3, 1)), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match=r"labels\[2\] = 7"):
        fg.metrics.accuracy(out, jnp.array([0, 1, 7]))


def test_binary_accuracy_matches_the_book():
    p = np.random.RandomState(0).rand(50, 1)
    t = (np.random.RandomState(1).rand(50, 1) > 0.5).astype(np.int32)
    ref = np.mean((p > 0.5) * 1 == t)
    assert float(fg.metrics.binary_accuracy(jnp.asarray(p), jnp.asarray(t))) == pytest.approx(ref)


def test_regression_accuracy_matches_the_book():
    rs = np.random.RandomState(0)
    y = rs.randn(100, 1)
    pred = y + rs.randn(100, 1) * np.std(y) / 250
    ref = np.mean(np.absolute(pred - y) < np.std(y) / 250)
    assert 0 < ref < 1
    assert float(fg.metrics.regression_accuracy(jnp.asarray(pred), jnp.asarray(y))) == pytest.approx(ref)
    assert float(fg.metrics.regression_accuracy(jnp.asarray(pred), jnp.asarray(y), precision=10.0)) == 1.0
