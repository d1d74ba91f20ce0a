"""Every hyperparameter at a value other than its default, against a NumPy transcription of the book's formula
(issue 13, class 2): a rule, loss, layer, optimizer or config key that ignored its hyperparameter (used the
default instead) fails here. Each test also checks that the non-default value changes the answer, so it
cannot pass by accident."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcgrad as fg
from funcgrad import config, experiment, optim, rules

# ---- the book's optimizers (chapter 10), transcribed ----

DEFAULTS = {
    "sgd": {"learning_rate": 1.0, "decay": 0.0, "momentum": 0.0},
    "adagrad": {"learning_rate": 1.0, "decay": 0.0, "eps": 1e-7},
    "rmsprop": {"learning_rate": 0.001, "decay": 0.0, "rho": 0.9, "eps": 1e-7},
    "adam": {"learning_rate": 0.001, "decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-7},
}
# Non-default values large enough to move every update: gradients are O(1), so eps = 0.05 matters.
OTHER = {"learning_rate": 0.1, "decay": 0.2, "momentum": 0.6, "rho": 0.7, "beta1": 0.75, "beta2": 0.95, "eps": 0.05}

RS = np.random.RandomState(7)
GRADS = [RS.randn(3, 4) for _ in range(6)]
W0 = RS.randn(3, 4)


def book_optimizer(kind, hp, w0=W0, grads=GRADS):
    """The book's update rules, step by step, in float64: every step's weights."""
    w = np.array(w0, np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    out = []
    for t, g in enumerate(grads):
        lr = hp["learning_rate"] / (1 + hp["decay"] * t)
        if kind == "sgd":
            if hp["momentum"]:
                m = hp["momentum"] * m - lr * g
                w = w + m
            else:
                w = w - lr * g
        elif kind == "adagrad":
            v = v + g**2
            w = w - lr * g / (np.sqrt(v) + hp["eps"])
        elif kind == "rmsprop":
            v = hp["rho"] * v + (1 - hp["rho"]) * g**2
            w = w - lr * g / (np.sqrt(v) + hp["eps"])
        else:
            m = hp["beta1"] * m + (1 - hp["beta1"]) * g
            v = hp["beta2"] * v + (1 - hp["beta2"]) * g**2
            m_hat = m / (1 - hp["beta1"] ** (t + 1))
            v_hat = v / (1 - hp["beta2"] ** (t + 1))
            w = w - lr * m_hat / (np.sqrt(v_hat) + hp["eps"])
        out.append(w.copy())
    return np.stack(out)


def run_optimizer(tx, w0=W0, grads=GRADS):
    params = {"w": jnp.asarray(w0, jnp.float64)}
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float64)}, state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(params["w"]))
    return np.stack(out)


CASES = [(kind, None) for kind in DEFAULTS] + [(kind, name) for kind, hp in DEFAULTS.items() for name in hp]


@pytest.mark.parametrize("kind,changed", CASES, ids=[f"{k}-{c or 'all'}" for k, c in CASES])
def test_optimizer_follows_the_book_at_non_default_hyperparameters(kind, changed, x64):
    defaults = DEFAULTS[kind]
    assert optim.HYPERPARAMETERS[kind] == tuple(defaults), "a hyperparameter was added: cover it here"
    hp = dict(defaults)
    if changed is None:
        hp.update({k: OTHER[k] for k in defaults})
    else:
        hp[changed] = OTHER[changed]
        if changed != "learning_rate":
            hp["learning_rate"] = OTHER["learning_rate"]  # a visible step size, the default elsewhere
    expected = book_optimizer(kind, hp)
    # the changed hyperparameter matters (compared with its default, everything else as above)
    if changed is not None:
        assert np.max(np.abs(expected - book_optimizer(kind, {**hp, changed: defaults[changed]}))) > 1e-4
    got = run_optimizer(optim.OPTIMIZERS[kind](**hp))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_inverse_time_decay_at_a_non_default_decay(x64):
    s = optim.inverse_time_decay(0.3, decay=0.25)
    for t in (0, 1, 2, 7):
        assert float(s(t)) == pytest.approx(0.3 / (1 + 0.25 * t), rel=1e-12)


def _optimizer_config(kind, hp):
    return config.from_dict({"optimizer": {"kind": kind, **hp}, "data": {"samples": 5}, "train": {"epochs": 3}})


@pytest.mark.parametrize("kind", list(DEFAULTS))
def test_config_passes_every_optimizer_hyperparameter_through(kind, x64):
    hp = {k: OTHER[k] for k in DEFAULTS[kind]}
    setup = experiment.build(_optimizer_config(kind, hp))
    np.testing.assert_allclose(run_optimizer(setup.optimizer), book_optimizer(kind, hp), rtol=1e-10, atol=1e-12)
    for t in (0, 3):
        assert float(setup.schedule(t)) == pytest.approx(OTHER["learning_rate"] / (1 + OTHER["decay"] * t))
    back = config.to_dict(setup.config)["optimizer"]
    assert back == {"kind": kind, **hp}


# ---- layers and initialisers ----


@pytest.mark.parametrize("rate", [0.3, 0.75])
def test_dropout_layer_uses_its_rate(rate):
    layer = fg.nn.dropout(rate)
    x = jnp.ones((200, 100))
    y = np.asarray(layer.apply({}, x, key=jax.random.key(3), train=True))
    scale = 1 / (1 - rate)
    assert np.all((y == 0) | np.isclose(y, scale, rtol=1e-6))  # inverted dropout: kept values scaled by 1/(1 − rate)
    dropped = np.mean(y == 0)
    assert abs(dropped - rate) < 0.02  # 20000 draws: 5 standard deviations are under 0.02
    np.testing.assert_array_equal(np.asarray(layer.apply({}, x, key=jax.random.key(3), train=False)), np.asarray(x))
    _, dx = layer.backward({}, x, jnp.full_like(x, 2.0), key=jax.random.key(3), train=True)
    np.testing.assert_allclose(np.asarray(dx), 2.0 * y, rtol=1e-6)  # the same mask, book: dX = dvalues · mask


def test_mlp_and_config_pass_the_dropout_rate_to_the_layers():
    def rates(model):
        return [dict(layer.config)["rate"] for _, layer in model.layers if layer.kind == "dropout"]

    assert rates(fg.nn.mlp([8, 8, 3], dropout=0.35)) == [0.35, 0.35]
    setup = experiment.build(config.from_dict({"model": {"sizes": [8, 8, 3], "dropout": 0.35},
                                               "data": {"samples": 5}, "train": {"epochs": 1}}))
    assert rates(setup.model) == [0.35, 0.35]
    # and behaviourally: the training loss uses dropout at that rate (zeros in a fraction 0.35 of the units)
    drop = [layer for _, layer in setup.model.layers if layer.kind == "dropout"][0]
    y = np.asarray(drop.apply({}, jnp.ones((100, 100)), key=jax.random.key(0), train=True))
    assert abs(np.mean(y == 0) - 0.35) < 0.03


@pytest.mark.parametrize("exact", [False, True])
def test_config_init_scale_scales_the_book_initialiser(exact):
    stds = {}
    for scale in (0.01, 0.5):
        cfg = config.from_dict({"model": {"sizes": [256, 3], "init_scale": scale},
                                "data": {"exact": exact, "samples": 5}, "train": {"epochs": 1}})
        params = experiment.build(cfg).params
        stds[scale] = float(np.std(np.asarray(params["dense1"]["W"])))
        np.testing.assert_array_equal(np.asarray(params["dense1"]["b"]), 0.0)
    assert stds[0.5] == pytest.approx(0.5, rel=0.15)  # 512 draws
    assert stds[0.01] == pytest.approx(0.01, rel=0.15)


def test_book_initialiser_and_dense_layer_use_the_given_scale():
    key = jax.random.key(4)
    w = fg.initializers.book(0.37)(key, (50, 40))
    np.testing.assert_allclose(np.asarray(w), 0.37 * np.asarray(jax.random.normal(key, (50, 40))), rtol=1e-6)
    params = fg.nn.dense(200, W_init=fg.initializers.book(0.37)).init(key, (30,))
    assert float(np.std(np.asarray(params["W"]))) == pytest.approx(0.37, rel=0.1)


# ---- rules and losses: alpha, lam, eps ----


def test_leaky_relu_alpha_away_from_the_kink():
    x = jnp.array([[-2.0, -0.5, 0.5, 3.0]])
    dv = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    for alpha in (0.05, 0.3):
        xn = np.asarray(x, np.float64)
        np.testing.assert_allclose(np.asarray(rules.leaky_relu.forward(x, alpha=alpha)),
                                   np.where(xn > 0, xn, alpha * xn), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(rules.leaky_relu.backward(x, dv, alpha=alpha)),
                                   np.where(xn > 0, 1.0, alpha) * np.asarray(dv), rtol=1e-6)
        layer = fg.nn.leaky_relu(alpha)
        np.testing.assert_allclose(np.asarray(layer.apply({}, x)), np.where(xn > 0, xn, alpha * xn), rtol=1e-6)


def test_l1_l2_rules_and_penalties_at_non_default_strengths(x64):
    w = np.array([[0.5, -1.5, 2.0], [-0.25, 1.0, -3.0]])
    for lam in (0.3, 2.5):
        assert float(rules.l1.forward(jnp.asarray(w), lam=lam)) == pytest.approx(lam * np.abs(w).sum(), rel=1e-12)
        assert float(rules.l2.forward(jnp.asarray(w), lam=lam)) == pytest.approx(lam * (w * w).sum(), rel=1e-12)
        np.testing.assert_allclose(np.asarray(rules.l1.backward(jnp.asarray(w), jnp.array(1.0), lam=lam)),
                                   lam * np.sign(w), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(rules.l2.backward(jnp.asarray(w), jnp.array(1.0), lam=lam)),
                                   2 * lam * w, rtol=1e-12)
    params = {"a": {"W": jnp.asarray(w), "b": jnp.array([1.0, -2.0])}, "b": {"W": jnp.asarray(-w)}}
    assert float(fg.losses.l1_penalty(params, 0.3, "a/*")) == pytest.approx(0.3 * (np.abs(w).sum() + 3.0))
    assert float(fg.losses.l2_penalty(params, 0.3, ["a/b", "b/W"])) == pytest.approx(0.3 * (5.0 + (w * w).sum()))


def test_cross_entropy_eps_clips_where_asked(x64):
    probs = np.array([[0.001, 0.004, 0.995], [0.2, 0.79, 0.01], [0.999, 0.0005, 0.0005]])
    labels = np.array([0, 1, 0])
    for eps in (1e-2, 1e-3):
        clipped = np.clip(probs, eps, 1 - eps)
        expected = -np.mean(np.log(clipped[range(3), labels]))
        assert float(fg.losses.categorical_crossentropy(jnp.asarray(probs), jnp.asarray(labels), eps=eps)) == \
            pytest.approx(expected, rel=1e-12)
        assert float(rules.categorical_crossentropy.forward(jnp.asarray(probs), jnp.asarray(labels), eps=eps)) == \
            pytest.approx(expected, rel=1e-12)
    assert abs(float(fg.losses.categorical_crossentropy(jnp.asarray(probs), jnp.asarray(labels), eps=1e-2))
               - float(fg.losses.categorical_crossentropy(jnp.asarray(probs), jnp.asarray(labels)))) > 0.1


def test_binary_crossentropy_eps_forward_and_backward(x64):
    probs = np.array([[0.001, 0.995], [0.5, 0.9999]])
    y = np.array([[1.0, 0.0], [1.0, 0.0]])
    for eps in (1e-2, 1e-3):
        p = np.clip(probs, eps, 1 - eps)
        expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        assert float(fg.losses.binary_crossentropy(jnp.asarray(probs), jnp.asarray(y), eps=eps)) == \
            pytest.approx(expected, rel=1e-12)
        back = rules.binary_crossentropy.backward(jnp.asarray(probs), jnp.asarray(y), jnp.array(1.0), eps=eps)
        np.testing.assert_allclose(np.asarray(back), -(y / p - (1 - y) / (1 - p)) / probs.size, rtol=1e-12)
    default = float(fg.losses.binary_crossentropy(jnp.asarray(probs), jnp.asarray(y)))
    assert abs(default - float(fg.losses.binary_crossentropy(jnp.asarray(probs), jnp.asarray(y), eps=1e-2))) > 0.1


# ---- Objective's L1 and L2 strengths ----

L1 = {"dense1/W": 0.003, "dense2/b": 0.02}
L2 = {"dense1/b": 0.05, "dense2/W": 0.004}


def book_regularised(params, X, y, l1, l2):
    """The book's chapter-14 loss and backward with per-leaf λ1, λ2 (float64): value, reg loss, gradients."""
    p = {n: {k: np.asarray(v, np.float64) for k, v in d.items()} for n, d in params.items()}
    z1 = X @ p["dense1"]["W"] + p["dense1"]["b"]
    a1 = np.maximum(0, z1)
    z2 = a1 @ p["dense2"]["W"] + p["dense2"]["b"]
    e = np.exp(z2 - z2.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    n = len(X)
    data = -np.mean(np.log(np.clip(probs[range(n), y], 1e-7, 1 - 1e-7)))
    dz2 = probs.copy()
    dz2[range(n), y] -= 1
    dz2 /= n
    dz1 = dz2 @ p["dense2"]["W"].T
    dz1[z1 <= 0] = 0
    g = {"dense1": {"W": X.T @ dz1, "b": dz1.sum(0)}, "dense2": {"W": a1.T @ dz2, "b": dz2.sum(0)}}
    reg = 0.0
    for pattern, lam in l1.items():
        layer, leaf = pattern.split("/")
        w = p[layer][leaf]
        reg += lam * np.abs(w).sum()
        dl1 = np.ones_like(w)
        dl1[w < 0] = -1
        g[layer][leaf] = g[layer][leaf] + lam * dl1
    for pattern, lam in l2.items():
        layer, leaf = pattern.split("/")
        w = p[layer][leaf]
        reg += lam * (w * w).sum()
        g[layer][leaf] = g[layer][leaf] + 2 * lam * w
    return data + reg, reg, g


def _reg_params():
    """The book's 2 → 6 ReLU → 3 softmax model; float64 weights of size 0.3 and biases 0.05 (off every kink)."""
    rs = np.random.RandomState(5)
    model = fg.nn.mlp([6, 3], output="softmax")
    params = {"dense1": {"W": jnp.asarray(0.3 * rs.randn(2, 6)), "b": jnp.full((6,), 0.05)},
              "dense2": {"W": jnp.asarray(0.3 * rs.randn(6, 3)), "b": jnp.full((3,), 0.05)}}
    return model, params, rs.randn(20, 2), rs.randint(0, 3, 20)


@pytest.mark.slow
def test_objective_l1_l2_strengths_in_value_and_hand_gradient(x64):
    model, params, X, y = _reg_params()
    obj = fg.Objective(model, "categorical_crossentropy", l1=L1, l2=L2)
    value, reg, grads = book_regularised(params, X, y, L1, L2)
    assert float(obj.value(params, jnp.asarray(X), jnp.asarray(y))) == pytest.approx(value, rel=1e-12)
    assert float(obj.metrics(params, jnp.asarray(X), jnp.asarray(y))["reg_loss"]) == pytest.approx(reg, rel=1e-12)
    hand = obj.hand_grad(params, jnp.asarray(X), jnp.asarray(y))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-10, atol=1e-14), hand, grads)
    # every strength matters: with it at another value, both the value and the gradient change
    for table, name in ((L1, "l1"), (L2, "l2")):
        for pattern in table:
            other = {**table, pattern: 1.0}
            v2, _, g2 = book_regularised(params, X, y, other if name == "l1" else L1, other if name == "l2" else L2)
            layer, leaf = pattern.split("/")
            assert abs(v2 - value) > 1e-3 and np.max(np.abs(g2[layer][leaf] - grads[layer][leaf])) > 1e-3


def test_config_loss_strengths_reach_the_objective(x64):
    model, params, X, y = _reg_params()
    cfg = config.from_dict({"model": {"sizes": [6, 3]}, "loss": {"l1": L1, "l2": L2}, "data": {"samples": 5},
                            "train": {"epochs": 1}})
    obj = experiment.build(cfg).objective
    value, reg, grads = book_regularised(params, X, y, L1, L2)
    assert float(obj.regularization(params)) == pytest.approx(reg, rel=1e-12)
    hand = obj.hand_grad(params, jnp.asarray(X), jnp.asarray(y))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-10, atol=1e-14), hand, grads)
