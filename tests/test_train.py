import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcgrad as fg


@pytest.fixture
def setup():
    X, y = fg.data.spiral(20, 3, key=0)
    model = fg.nn.mlp([16, 3], output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy", l2={"dense1/*": 1e-3})
    params = model.init(jax.random.key(0), (2,))
    return obj, params, (X, y)


@pytest.mark.slow
def test_step_equals_a_hand_written_raw_jax_step(setup):
    obj, params, data = setup
    tx = fg.optim.adam(0.05, decay=1e-3)
    state = fg.train.init(params, tx, jax.random.key(1))
    step = fg.train.make_step(obj.train_loss, tx, schedule=fg.optim.inverse_time_decay(0.05, 1e-3))

    @jax.jit
    def raw(params, opt_state):
        loss, grads = jax.value_and_grad(obj.value)(params, *data)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    p, o = params, tx.init(params)
    for t in range(5):
        state, metrics = step(state, data)
        p, o, loss = raw(p, o)
        assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
        assert float(metrics["lr"]) == pytest.approx(0.05 / (1 + 1e-3 * t), rel=1e-6)
        chex.assert_trees_all_close(state.params, p, rtol=1e-6, atol=1e-7)
    assert int(state.step) == 5
    assert set(metrics) == {"loss", "data_loss", "reg_loss", "accuracy", "lr"}
    assert set(metrics.numpy()) == set(metrics) and isinstance(metrics.numpy()["loss"], np.ndarray)
    with pytest.raises(KeyError, match="no metric 'acc'"):
        metrics["acc"]


def test_fused_steps_equal_single_steps_and_skip_past_until(setup):
    obj, params, data = setup
    tx = fg.optim.sgd(0.5, momentum=0.9)
    single = fg.train.init(params, tx, jax.random.key(1))
    step = fg.train.make_step(obj.train_loss, tx, donate=False)
    losses = []
    for _ in range(7):
        single, m = step(single, data)
        losses.append(float(m["loss"]))
    run = fg.train.make_steps(obj.train_loss, tx, 5, donate=False)
    fused = fg.train.init(params, tx, jax.random.key(1))
    fused, m1 = run(fused, data, until=7)
    fused, m2 = run(fused, data, until=7)
    assert int(fused.step) == 7
    np.testing.assert_array_equal(np.asarray(m2["step"]), [5, 6, -1, -1, -1])
    assert np.isnan(np.asarray(m2["loss"])[2:]).all()
    np.testing.assert_allclose(np.concatenate([m1["loss"], m2["loss"][:2]]), losses, rtol=1e-6)
    chex.assert_trees_all_close(fused.params, single.params, rtol=1e-6, atol=1e-7)
    # without `until`, a call runs all its steps
    whole, m = run(fg.train.init(params, tx, jax.random.key(1)), data)
    np.testing.assert_array_equal(np.asarray(m["step"]), [0, 1, 2, 3, 4])
    np.testing.assert_allclose(np.asarray(m["loss"]), losses[:5], rtol=1e-6)
    assert int(whole.step) == 5


@pytest.mark.slow
def test_chunking_and_resuming(setup):
    obj, params, data = setup
    tx = fg.optim.adam(0.01)
    a, ha = fg.train.fit(obj.train_loss, tx, fg.train.init(params, tx, jax.random.key(2)), data, steps=23, fuse=10)
    b, hb = fg.train.fit(obj.train_loss, tx, fg.train.init(params, tx, jax.random.key(2)), data, steps=23, fuse=4)
    assert ha["loss"].shape == (23,) and np.array_equal(ha["step"], np.arange(23))
    np.testing.assert_allclose(ha["loss"], hb["loss"], rtol=1e-5)  # another fused program: rounding may differ
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    # Resuming from the middle with the same fused program gives the same parameters, bit for bit.
    half, _ = fg.train.fit(obj.train_loss, tx, fg.train.init(params, tx, jax.random.key(2)), data, steps=13, fuse=10)
    resumed, _ = fg.train.fit(obj.train_loss, tx, half, data, steps=23, fuse=10)
    chex.assert_trees_all_equal(resumed.params, a.params)


def test_donation_reuses_the_input_state(setup):
    obj, params, data = setup
    tx = fg.optim.adam()
    state = fg.train.init(jax.tree.map(jnp.copy, params), tx, jax.random.key(0))
    new, _ = fg.train.make_step(obj.train_loss, tx)(state, data)
    assert state.params["dense1"]["W"].is_deleted() and not new.params["dense1"]["W"].is_deleted()


def test_minibatches_visit_every_sample_once_per_epoch():
    key = jax.random.key(3)
    n, bs = 23, 5
    per_epoch = n // bs
    epoch0 = np.concatenate([np.asarray(fg.train.batch_indices(key, jnp.int32(t), n, bs)) for t in range(per_epoch)])
    epoch1 = np.concatenate([np.asarray(fg.train.batch_indices(key, jnp.int32(t), n, bs))
                             for t in range(per_epoch, 2 * per_epoch)])
    assert len(set(epoch0)) == len(epoch0) == per_epoch * bs  # no repeats; the last 3 samples sit out
    assert not np.array_equal(epoch0, epoch1)
    again = np.asarray(fg.train.batch_indices(key, jnp.int32(0), n, bs))
    np.testing.assert_array_equal(again, epoch0[:bs])


@pytest.mark.slow
def test_minibatch_training_uses_the_batch(setup):
    obj, params, data = setup
    tx = fg.optim.sgd(0.1)
    full, _ = fg.train.fit(obj.train_loss, tx, fg.train.init(params, tx, jax.random.key(0)), data, steps=4, fuse=2)
    mini, _ = fg.train.fit(obj.train_loss, tx, fg.train.init(params, tx, jax.random.key(0)), data, steps=4, fuse=2,
                           batch_size=10)
    assert not np.allclose(np.asarray(full.params["dense2"]["b"]), np.asarray(mini.params["dense2"]["b"]))


@pytest.mark.slow
def test_a_minibatch_step_is_sgd_on_the_documented_minibatch(setup):
    """make_step(batch_size=B): the step's loss and update are those of the minibatch batch_indices names,
    drawn from the first half of split(state.key); the data outside it play no part. 60 samples in batches of 7:
    8 per epoch, 4 left out."""
    obj, params, data = setup
    batch_size = 7
    tx = fg.optim.sgd(0.1)
    state = fg.train.init(params, tx, jax.random.key(5))
    step = fg.train.make_step(obj.value, tx, batch_size=batch_size, donate=False)
    reference = jax.jit(jax.value_and_grad(obj.value))
    for t in range(3):
        k_data = jax.random.split(state.key)[0]
        idx = np.asarray(fg.train.batch_indices(k_data, state.step, 60, batch_size))
        assert len(set(idx.tolist())) == batch_size
        Xb, yb = data[0][idx], data[1][idx]
        loss, grads = reference(state.params, Xb, yb)
        expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
        state, metrics = step(state, data)
        np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
        chex.assert_trees_all_close(state.params, expected, rtol=1e-5, atol=1e-7)
        assert int(state.step) == t + 1


@pytest.mark.slow
def test_dropout_keys_follow_the_state_key():
    X, y = fg.data.spiral(20, 3, key=0)
    model = fg.nn.mlp([16, 3], dropout=0.5, output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy")
    params = model.init(jax.random.key(0), (2,))
    tx = fg.optim.adam(0.01)
    runs = [fg.train.fit(obj.train_loss, tx, fg.train.init(params, tx, jax.random.key(k)), (X, y), steps=3, fuse=3)[0]
            for k in (1, 1, 2)]
    w = [np.asarray(r.params["dense1"]["W"]) for r in runs]
    assert np.array_equal(w[0], w[1]) and not np.array_equal(w[0], w[2])


def test_bad_input(setup):
    obj, params, data = setup
    tx = fg.optim.adam()
    with pytest.raises(TypeError, match="optimizer must be an optax GradientTransformation"):
        fg.train.init(params, lambda g: g, jax.random.key(0))
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        fg.train.init(params, tx, 0)
    state = fg.train.init(params, tx, jax.random.key(0))
    step = fg.train.make_step(obj.train_loss, tx, batch_size=100)
    with pytest.raises(ValueError, match=r"batch_size must lie in \[1, 60\] for 60 samples; got 100"):
        step(state, data)
    with pytest.raises(ValueError, match="must share their leading"):
        fg.train.make_step(obj.train_loss, tx)(state, (data[0], data[1][:5]))
    with pytest.raises(TypeError, match="expected a funcgrad.train.TrainState"):
        fg.train.make_step(obj.train_loss, tx)(params, data)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        fg.train.make_steps(obj.train_loss, tx, 0)


@pytest.mark.slow
def test_fit_takes_a_loss_without_a_key_and_trains_as_with_one():
    X, y = fg.data.spiral(20, 3, key=0)
    model = fg.nn.mlp([8, 3], output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy")
    tx = fg.optim.adam(0.05)
    params = model.init(jax.random.key(0), (2,))

    def keyless(p, x, t):  # an optax-style loss: no PRNG key
        return obj.value(p, x, t)

    calls = []

    def with_key(p, x, t, key):
        calls.append(key)
        return obj.value(p, x, t)

    a, hist_a = fg.train.fit(keyless, tx, fg.train.init(params, tx, jax.random.key(1)), (X, y), steps=5, fuse=5)
    b, hist_b = fg.train.fit(with_key, tx, fg.train.init(params, tx, jax.random.key(1)), (X, y), steps=5, fuse=5)
    assert calls  # the 4-argument loss was given the key
    np.testing.assert_allclose(hist_a["loss"], hist_b["loss"], rtol=1e-6)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-6)
    assert hist_a["loss"][-1] < hist_a["loss"][0]


def test_a_loss_that_takes_neither_form_gets_a_clear_error():
    X, y = fg.data.spiral(5, 3, key=0)
    model = fg.nn.mlp([3], output="softmax")
    tx = fg.optim.sgd(0.1)
    state = fg.train.init(model.init(jax.random.key(0), (2,)), tx, jax.random.key(1))

    def two_args(p, x):
        return jnp.sum(model.apply(p, x))

    with pytest.raises(TypeError, match=r"loss_fn .*two_args\(p, x\) cannot be called with this data.*2 array\(s\).*4 or 3"):
        fg.train.fit(two_args, tx, state, (X, y), steps=1)


# ---- what users of other libraries pass: each mistake named, nothing silently wrong --------------------------------


def test_params_that_cannot_be_trained_are_named_by_path():
    tx = optax.sgd(0.1)
    key = jax.random.key(0)
    for params, path in [({"w": jnp.ones(2), "count": jnp.zeros((), jnp.uint32)}, r"\['count'\] is uint32"),
                         ({"w": jnp.ones(2), "rng": jax.random.key(1)}, r"\['rng'\] is key"),
                         ({"w": jnp.ones(2), "act": "relu"}, r"\['act'\] is str"),
                         ({"w": jnp.ones(2), "f": jax.nn.relu}, r"\['f'\]")]:
        with pytest.raises(TypeError, match=r"init: params leaf " + path + ".*floating-point"):
            fg.train.init(params, tx, key)


def test_fit_checks_steps_batch_size_data_and_the_loss_s_return_value(setup):
    obj, params, data = setup
    tx = optax.sgd(0.1)
    fresh = lambda: fg.train.init(params, tx, jax.random.key(1))  # noqa: E731
    for steps in (5.5, True, -3, None, "10"):
        with pytest.raises(ValueError, match="steps must be an int >= 0"):
            fg.train.fit(obj.train_loss, tx, fresh(), data, steps=steps)
    for batch_size in (4.0, True):
        with pytest.raises(TypeError, match="batch_size must be an int or None"):
            fg.train.fit(obj.train_loss, tx, fresh(), data, steps=2, batch_size=batch_size)
    with pytest.raises(TypeError, match=r"data must be a tuple of arrays.*got dict"):
        fg.train.fit(obj.train_loss, tx, fresh(), {"x": data[0], "y": data[1]}, steps=2)
    with pytest.raises(ValueError, match="data has no samples"):
        fg.train.fit(lambda p, X, y: jnp.mean(X), tx, fresh(), (data[0][:0], data[1][:0]), steps=2)

    def with_aux(out):
        return lambda p, X, y: out(obj.value(p, X, y))

    assert fg.train.fit(with_aux(lambda v: (v, {})), tx, fresh(), data, steps=2)[1]["loss"].shape == (2,)
    for out, err, match in [
        (lambda v: (v, {"loss": v - 10}), ValueError, "metrics may not be named 'loss'"),
        (lambda v: (v, {"step": v}), ValueError, "metrics may not be named 'step'"),
        (lambda v: (v, {"pred": jnp.ones(3) * v}), TypeError, r"metric 'pred' must be a scalar number; got float32\[3\]"),
        # a Linen loss returning its updated batch_stats, a forgotten value, a label
        (lambda v: (v, {"batch_stats": {"mean": v}}), TypeError, r"metric 'batch_stats' must be a scalar number; "
                                                                  r"got dict.*is not a metric"),
        (lambda v: (v, {"acc": None}), TypeError, r"metric 'acc' must be a scalar number; got None"),
        (lambda v: (v, {"tag": "run1"}), TypeError, r"metric 'tag' must be a scalar number; got str"),
        (lambda v: (v, jnp.ones(3)), TypeError, r"\(loss, metrics\) with metrics a dict"),
        (lambda v: jnp.ones(3) * v, TypeError, r"must return a scalar loss; got float32\[3\]"),
    ]:
        with pytest.raises(err, match=match):
            fg.train.fit(with_aux(out), tx, fresh(), data, steps=2)


def test_a_state_consumed_by_an_earlier_fit_is_named(setup):
    obj, params, data = setup
    tx = optax.sgd(0.1)
    state = fg.train.init(params, tx, jax.random.key(1))
    fg.train.fit(obj.train_loss, tx, state, data, steps=2)
    with pytest.raises(ValueError, match="state was consumed by an earlier fit"):
        fg.train.fit(obj.train_loss, tx, state, data, steps=2)
    # make_step too (it gave XLA's "Buffer has been deleted or donated"), and make_steps
    step = fg.train.make_step(obj.train_loss, tx)
    state = fg.train.init(params, tx, jax.random.key(1))
    step(state, data)
    with pytest.raises(ValueError, match="state was consumed by an earlier fit or step"):
        step(state, data)
    run = fg.train.make_steps(obj.train_loss, tx, 3)
    with pytest.raises(ValueError, match="state was consumed by an earlier fit or step"):
        run(state, data)


def test_a_step_checks_the_params_it_is_given_and_the_optimizer(setup):
    # A state built or _replace'd by hand with an int leaf gave JAX's "grad requires real-valued inputs", no path;
    # optax.MultiSteps and an uncalled optax.adam reached the step as a bare AttributeError.
    obj, params, data = setup
    tx = optax.sgd(0.1)
    state = fg.train.init(params, tx, jax.random.key(1))
    bad = state._replace(params={**state.params, "count": jnp.zeros((), jnp.int32)})
    with pytest.raises(TypeError, match=r"step: params leaf \['count'\] is int32\[\]"):
        fg.train.make_step(lambda p, X, y: obj.train_loss({k: v for k, v in p.items() if k != "count"}, X, y), tx)(
            bad, data)
    multi = optax.MultiSteps(optax.adam(1e-3), 2)
    for make in (fg.train.make_step, lambda f, o: fg.train.make_steps(f, o, 2)):
        with pytest.raises(TypeError, match=r"optimizer must be an optax GradientTransformation.*gradient_transformation\(\)"):
            make(obj.train_loss, multi)
        with pytest.raises(TypeError, match=r"call it with its hyperparameters first \(optax.adam\(1e-3\)"):
            make(obj.train_loss, optax.adam)
    with pytest.raises(TypeError, match=r"init: optimizer must be.*gradient_transformation\(\)"):
        fg.train.init(params, multi, jax.random.key(1))
    # the hint's remedy works
    fg.train.fit(obj.train_loss, multi.gradient_transformation(),
                 fg.train.init(params, multi.gradient_transformation(), jax.random.key(1)), data, steps=2)


def test_a_defaulted_hyperparameter_in_the_keys_place_is_not_given_the_key(setup):
    # loss(params, X, y, l2=0.0) can be called with a fourth argument, so the step passed its PRNG key as l2 and the
    # user got JAX's "multiply does not accept dtypes key<fry>".
    obj, params, data = setup
    seen = {}

    def loss(p, X, y, l2=0.0):
        seen["l2"] = l2
        return obj.value(p, X, y) + l2 * sum(jnp.sum(w**2) for w in jax.tree.leaves(p))

    tx = optax.sgd(0.1)
    fg.train.fit(loss, tx, fg.train.init(params, tx, jax.random.key(1)), data, steps=2)
    assert seen["l2"] == 0.0

    def with_key(p, X, y, key=None):  # a defaulted parameter named like a key still gets it
        seen["key"] = key
        return obj.value(p, X, y)

    fg.train.fit(with_key, tx, fg.train.init(params, tx, jax.random.key(1)), data, steps=2)
    assert seen["key"] is not None and jax.dtypes.issubdtype(seen["key"].dtype, jax.dtypes.prng_key)

    def k_none(p, X, y, k=None):  # an optional key by its None default, whatever its name
        seen["k"] = k
        return obj.value(p, X, y)

    fg.train.fit(k_none, tx, fg.train.init(params, tx, jax.random.key(1)), data, steps=2)
    assert seen["k"] is not None and jax.dtypes.issubdtype(seen["k"].dtype, jax.dtypes.prng_key)

    def weighted(p, X, y, sample_weight=None):  # a None default is not a key by itself (round 3)
        seen["w"] = sample_weight
        return obj.value(p, X, y)

    fg.train.fit(weighted, tx, fg.train.init(params, tx, jax.random.key(1)), data, steps=2)
    assert seen["w"] is None
