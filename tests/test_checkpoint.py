import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcgrad as fg
from funcgrad import checkpoint


def state():
    model = fg.nn.mlp([4, 3], output="softmax")
    params = model.init(jax.random.key(0), (2,))
    tx = fg.optim.adam(0.1)
    return fg.train.init(params, tx, jax.random.key(7))


def test_round_trip_of_a_train_state_with_its_key():
    s = state()
    data = checkpoint.to_bytes(s, {"step": 3})
    back = checkpoint.from_bytes(data, like=state())
    assert checkpoint.metadata(data) == {"step": 3}
    chex.assert_trees_all_equal(back.params, s.params)
    chex.assert_trees_all_equal_dtypes(back.opt_state, s.opt_state)
    assert jnp.array_equal(jax.random.key_data(back.key), jax.random.key_data(s.key))
    assert back.step.dtype == jnp.int32
    np.testing.assert_array_equal(jax.random.normal(back.key, (3,)), jax.random.normal(s.key, (3,)))


def test_bfloat16_leaves():
    tree = {"w": jnp.arange(4, dtype=jnp.bfloat16) / 3}
    back = checkpoint.from_bytes(checkpoint.to_bytes(tree), like=tree)
    assert back["w"].dtype == jnp.bfloat16 and jnp.array_equal(back["w"], tree["w"])


def test_mismatches_name_the_leaf():
    data = checkpoint.to_bytes(state())
    other = fg.train.init(fg.nn.mlp([5, 3], output="softmax").init(jax.random.key(0), (2,)), fg.optim.adam(), jax.random.key(0))
    with pytest.raises(checkpoint.CheckpointError, match=r"\.params\['dense1'\]\['W'\]: stored float32\[2, 4\], expected float32\[2, 5\]"):
        checkpoint.from_bytes(data, like=other)
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        checkpoint.from_bytes(checkpoint.to_bytes({"a": jnp.ones(2)}), like={"a": jnp.ones(2), "b": jnp.ones(1)})


def test_loading_never_unpickles():
    buf = io.BytesIO()
    np.savez(buf, __funcgrad__=np.array([{"evil": 1}], dtype=object))  # an object array needs pickle
    with pytest.raises(checkpoint.CheckpointError, match="not a readable funcgrad checkpoint"):
        checkpoint.from_bytes(buf.getvalue(), like={})
    with pytest.raises(checkpoint.CheckpointError, match="not a readable"):
        checkpoint.metadata(b"not a zip file")
