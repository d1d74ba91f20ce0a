"""A checkpoint's PRNG keys keep their implementation (issue 13, class 7).

from_bytes must refuse a stored key of another implementation than the template's, naming the leaf's path,
in both directions, also when the two implementations have key data of the same shape and dtype (rbg and
unsafe_rbg: uint32[4]), where only the recorded implementation tells them apart, and when the stored leaf is
a plain uint32 array rather than a key.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcgrad as fg
from funcgrad import checkpoint
from funcgrad.checkpoint import CheckpointError

IMPLS = ["threefry2x32", "rbg", "unsafe_rbg"]


def tree_with(impl):
    return {"w": jnp.arange(4.0), "rng": {"key": jax.random.key(3, impl=impl)}}


@pytest.mark.parametrize("saved", IMPLS)
@pytest.mark.parametrize("template", IMPLS)
def test_a_key_of_another_implementation_is_refused_by_path(saved, template):
    data = checkpoint.to_bytes(tree_with(saved))
    like = tree_with(template)
    if saved == template:
        back = checkpoint.from_bytes(data, like)
        assert str(jax.random.key_impl(back["rng"]["key"])) == str(jax.random.key_impl(like["rng"]["key"]))
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(back["rng"]["key"])),
                                      np.asarray(jax.random.key_data(tree_with(saved)["rng"]["key"])))
        return
    with pytest.raises(CheckpointError) as err:
        checkpoint.from_bytes(data, like)
    msg = str(err.value)
    assert "['rng']['key']" in msg, msg
    assert re.search(rf"stored a {saved} PRNG key.*expected a {template} PRNG key", msg), msg
    assert "['w']" not in msg  # only the leaf that differs is named


def test_same_key_data_shape_but_another_implementation_is_refused():
    rbg, unsafe = jax.random.key(0, impl="rbg"), jax.random.key(0, impl="unsafe_rbg")
    same = jax.eval_shape(jax.random.key_data, rbg)
    other = jax.eval_shape(jax.random.key_data, unsafe)
    assert (same.shape, same.dtype) == (other.shape, other.dtype)  # only the implementation differs
    for a, b in ((rbg, unsafe), (unsafe, rbg)):
        with pytest.raises(CheckpointError, match=r"\['key'\]"):
            checkpoint.from_bytes(checkpoint.to_bytes({"key": a}), {"key": b})


def test_raw_key_data_is_not_a_key():
    key = jax.random.key(5)
    raw = checkpoint.to_bytes({"key": jax.random.key_data(key)})  # uint32[2], like a threefry key's data
    with pytest.raises(CheckpointError, match=r"\['key'\]"):
        checkpoint.from_bytes(raw, {"key": key})
    with pytest.raises(CheckpointError, match=r"\['key'\]"):
        checkpoint.from_bytes(checkpoint.to_bytes({"key": key}), {"key": jax.random.key_data(key)})


def test_a_train_state_key_round_trips_with_its_implementation():
    model = fg.nn.mlp([3, 2], output="softmax")
    tx = fg.optim.sgd(0.1)
    state = fg.train.init(model.init(jax.random.key(0), (2,)), tx, jax.random.key(9, impl="rbg"))
    data = checkpoint.to_bytes(state)
    back = checkpoint.from_bytes(data, state)
    np.testing.assert_array_equal(np.asarray(jax.random.uniform(back.key, (3,))),
                                  np.asarray(jax.random.uniform(state.key, (3,))))
    threefry = fg.train.init(model.init(jax.random.key(0), (2,)), tx, jax.random.key(9))
    with pytest.raises(CheckpointError, match=r"\.key: stored a rbg PRNG key.*expected a threefry2x32"):
        checkpoint.from_bytes(data, threefry)


def test_orbax_restore_refuses_another_implementation(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    with checkpoint.orbax_manager(tmp_path / "ckpt", async_save=False) as mngr:
        mngr.save(1, {"key": jax.random.key(0, impl="rbg")}, {})
        with pytest.raises(CheckpointError, match=r"\['key'\].*unsafe_rbg"):
            mngr.restore(like={"key": jax.random.key(0, impl="unsafe_rbg")})
        back, _ = mngr.restore(like={"key": jax.random.key(1, impl="rbg")})
    assert str(jax.random.key_impl(back["key"])) == "rbg"
