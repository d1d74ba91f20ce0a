"""Per-step randomness and minibatching in funcgrad.train (issue 13, classes 3 and 4).

funcgrad/train.py derives every step's randomness from the state's key and the step number: the state's key is
split into (k_data, k_model); step t's loss gets ``fold_in(k_model, t)`` (dropout), and with a batch size the
samples of epoch e are visited in the order of ``permutation(fold_in(k_data, e), n)``, the last incomplete batch
dropped. A key reused every step, a permutation drawn per step instead of per epoch, or an epoch count that does
not advance would each pass a test that only looks at one step; these look at many.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcgrad as fg
from funcgrad import train

KEY = jax.random.key(11)


def step_keys(key, steps):
    """The documented per-step keys: fold_in(k_model, t), with (k_data, k_model) = split(key)."""
    _, k_model = jax.random.split(key)
    return [jax.random.fold_in(k_model, t) for t in range(steps)]


def data_key(key):
    return jax.random.split(key)[0]


# ---- per-step keys ----


def _key_probe(params, x, y, key):
    """A loss whose metrics show the key it was given: two uniform draws from it."""
    u = jax.random.uniform(key, (2,))
    return jnp.sum(params["w"] ** 2) + 0 * jnp.sum(x), {"u0": u[0], "u1": u[1]}


@pytest.mark.parametrize("fuse", [1, 3, 7])
@pytest.mark.slow
def test_each_step_gets_fold_in_of_its_step_number(fuse):
    X, y = jnp.ones((4, 2)), jnp.zeros(4, jnp.int32)
    state = train.init({"w": jnp.ones(3)}, optax.sgd(0.1), KEY)
    _, hist = train.fit(_key_probe, optax.sgd(0.1), state, (X, y), steps=7, fuse=fuse)
    expected = np.array([np.asarray(jax.random.uniform(k, (2,))) for k in step_keys(KEY, 7)])
    np.testing.assert_array_equal(hist["u0"], expected[:, 0])
    np.testing.assert_array_equal(hist["u1"], expected[:, 1])
    assert len(set(hist["u0"].tolist())) == 7  # a fresh key every step


def test_single_compiled_steps_also_fold_in_the_step():
    X, y = jnp.ones((4, 2)), jnp.zeros(4, jnp.int32)
    step = train.make_step(_key_probe, optax.sgd(0.1))
    state = train.init({"w": jnp.ones(3)}, optax.sgd(0.1), KEY)
    seen = []
    for _ in range(3):
        state, m = step(state, (X, y))
        seen.append(float(m["u0"]))
    expected = [float(jax.random.uniform(k, (2,))[0]) for k in step_keys(KEY, 3)]
    assert seen == expected and len(set(seen)) == 3


def _dropout_setup():
    """2 → 32 ReLU → dropout 0.5 → 3 softmax, with 60 samples; drawn with NumPy."""
    rs = np.random.RandomState(1)
    model = fg.nn.mlp([32, 3], dropout=0.5, output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy")
    params = {"dense1": {"W": jnp.asarray(rs.randn(2, 32), jnp.float32), "b": jnp.full((32,), 0.1)},
              "dense2": {"W": jnp.asarray(rs.randn(32, 3), jnp.float32), "b": jnp.zeros(3)}}
    return obj, params, jnp.asarray(rs.randn(60, 2), jnp.float32), jnp.asarray(rs.randint(0, 3, 60))


@pytest.mark.slow
def test_dropout_masks_differ_between_steps_with_identical_params_and_data():
    obj, params, X, y = _dropout_setup()
    frozen = optax.set_to_zero()  # params never change: only the dropout masks can move the loss
    state = train.init(params, frozen, KEY)
    _, hist = train.fit(obj.train_loss, frozen, state, (X, y), steps=5, fuse=5)
    losses = hist["loss"]
    assert len(set(losses.tolist())) == 5, losses  # one key reused every step would repeat one loss
    # and step t's loss is the one the documented key of step t gives
    loss_of = jax.jit(lambda k: obj.train_loss(params, X, y, k)[0])
    expected = [float(loss_of(k)) for k in step_keys(KEY, 5)]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    # the same run without dropout: the loss does not move at all, so the differences above are the masks'
    plain = fg.Objective(fg.nn.mlp([32, 3], output="softmax"), "categorical_crossentropy")
    _, hist = train.fit(plain.train_loss, frozen, train.init(params, frozen, KEY), (X, y), steps=3, fuse=3)
    assert len(set(hist["loss"].tolist())) == 1


def test_the_train_state_key_is_not_consumed():
    """The key stays and the step moves, so step t's randomness is the same in a run resumed at any step."""
    X, y = jnp.ones((4, 2)), jnp.zeros(4, jnp.int32)
    tx = optax.sgd(0.1)
    mid, first = train.fit(_key_probe, tx, train.init({"w": jnp.ones(3)}, tx, KEY), (X, y), steps=3, fuse=3)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(mid.key)), np.asarray(jax.random.key_data(KEY)))
    _, rest = train.fit(_key_probe, tx, mid, (X, y), steps=5, fuse=3)
    expected = [float(jax.random.uniform(k, (2,))[0]) for k in step_keys(KEY, 5)]
    assert np.concatenate([first["u0"], rest["u0"]]).tolist() == expected


# ---- minibatches: batch_indices ----


def _epochs(key, n, batch_size, epochs):
    per_epoch = n // batch_size
    return [[np.asarray(train.batch_indices(key, jnp.asarray(e * per_epoch + b), n, batch_size)).tolist()
             for b in range(per_epoch)] for e in range(epochs)]


def test_batch_indices_when_the_batch_size_does_not_divide_the_data():
    n, bs = 10, 3
    epochs = _epochs(KEY, n, bs, 6)
    left_out = []
    for batches in epochs:
        assert len(batches) == 3 and all(len(b) == bs for b in batches)  # 3 full batches, the incomplete one dropped
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == 9 and all(0 <= i < n for i in flat)  # no duplicate within an epoch
        (out,) = set(range(n)) - set(flat)  # exactly one sample left out
        left_out.append(out)
    assert len(set(left_out)) > 1, left_out  # a different one across epochs
    assert epochs[0] != epochs[1]  # each epoch its own order
    for e, batches in enumerate(epochs):  # the documented order: a permutation drawn from fold_in(key, e)
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(KEY, e), n)).tolist()
        assert [i for b in batches for i in b] == perm[:9]


def test_batch_indices_partition_the_data_when_the_batch_size_divides_it():
    epochs = _epochs(KEY, 12, 4, 3)
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(12))
    assert epochs[0] != epochs[1] != epochs[2]


def test_batch_indices_of_one_epoch_do_not_depend_on_the_step_alone():
    # two steps in the same epoch draw from one permutation: their batches are disjoint
    a = set(np.asarray(train.batch_indices(KEY, jnp.asarray(0), 10, 5)).tolist())
    b = set(np.asarray(train.batch_indices(KEY, jnp.asarray(1), 10, 5)).tolist())
    assert a.isdisjoint(b) and a | b == set(range(10))


# ---- minibatches in a real training run ----


def _batch_probe(params, x, y):
    """Metrics that identify the minibatch: x holds sample indices; their bit set, and its size."""
    code = jnp.sum(2.0 ** x[:, 0])
    return jnp.sum((params["w"] - x[:, 0].mean()) ** 2) + 0 * jnp.sum(y), {"code": code, "n": jnp.asarray(x.shape[0])}


def _decode(code):
    code = int(round(float(code)))
    return {i for i in range(10) if code >> i & 1}


@pytest.mark.parametrize("fuse", [1, 4])
@pytest.mark.slow
def test_fit_with_a_batch_size_that_does_not_divide_the_data(fuse):
    n, bs, epochs = 10, 3, 5
    X = jnp.arange(n, dtype=jnp.float32).reshape(n, 1)
    y = jnp.zeros(n, jnp.int32)
    tx = optax.sgd(0.01)
    state = train.init({"w": jnp.zeros(1)}, tx, KEY)
    final, hist = train.fit(_batch_probe, tx, state, (X, y), steps=3 * epochs, fuse=fuse, batch_size=bs)
    assert int(final.step) == 3 * epochs and hist["code"].shape == (3 * epochs,)
    assert (hist["n"] == bs).all()
    batches = [_decode(c) for c in hist["code"]]
    assert all(len(b) == bs for b in batches)  # no sample twice in a batch
    left_out, per_epoch = [], []
    for e in range(epochs):
        three = batches[3 * e: 3 * e + 3]
        union = set().union(*three)
        assert len(union) == 9, three  # the epoch's batches are disjoint: no duplicate within an epoch
        left_out.append((set(range(n)) - union).pop())
        per_epoch.append(three)
    assert len(set(left_out)) > 1, left_out  # the sample left out changes across epochs
    assert per_epoch[0] != per_epoch[1]
    expected = [set(np.asarray(train.batch_indices(data_key(KEY), jnp.asarray(t), n, bs)).tolist())
                for t in range(3 * epochs)]
    assert batches == expected  # the batches the documented derivation gives, whatever the fusion


@pytest.mark.slow
def test_objective_training_with_minibatches_runs_every_step():
    obj, params, X, y = _dropout_setup()  # 60 samples, batch 7: 8 batches per epoch, 4 samples left out
    tx = fg.optim.sgd(0.1)
    state = train.init(params, tx, KEY)
    final, hist = train.fit(obj.train_loss, tx, state, (X, y), steps=16, fuse=5, batch_size=7)
    assert int(final.step) == 16 and hist["loss"].shape == (16,) and np.isfinite(hist["loss"]).all()
    # the first step's loss: the documented minibatch, with the documented dropout key, at the initial params
    idx = train.batch_indices(data_key(KEY), jnp.asarray(0), 60, 7)
    first = obj.train_loss(params, X[idx], y[idx], step_keys(KEY, 1)[0])[0]
    assert hist["loss"][0] == pytest.approx(float(first), rel=1e-5)
    with pytest.raises(ValueError, match=r"batch_size must lie in \[1, 60\]"):
        train.fit(obj.train_loss, tx, train.init(params, tx, KEY), (X, y), steps=1, batch_size=61)
