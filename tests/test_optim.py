"""The book's optimizers against NumPy transcriptions of the book's update rules (chapter 10)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from funcgrad import optim


class BookOptimizer:
    """The book's Optimizer_* classes, transcribed (one parameter array; pre_update/update/post_update)."""

    def __init__(self, kind, learning_rate, decay=0.0, momentum=0.0, epsilon=1e-7, rho=0.9, beta_1=0.9, beta_2=0.999):
        self.kind, self.lr, self.current_lr, self.decay = kind, learning_rate, learning_rate, decay
        self.iterations, self.momentum, self.epsilon, self.rho = 0, momentum, epsilon, rho
        self.beta_1, self.beta_2 = beta_1, beta_2
        self.m = self.v = None

    def step(self, w, g):
        base = self.lr(self.iterations) if callable(self.lr) else self.lr  # a schedule: lr at this update count
        self.current_lr = base * (1.0 / (1.0 + self.decay * self.iterations))
        if self.m is None:
            self.m, self.v = np.zeros_like(w), np.zeros_like(w)
        if self.kind == "sgd":
            if self.momentum:
                self.m = self.momentum * self.m - self.current_lr * g
                w = w + self.m
            else:
                w = w - self.current_lr * g
        elif self.kind == "adagrad":
            self.v += g**2
            w = w - self.current_lr * g / (np.sqrt(self.v) + self.epsilon)
        elif self.kind == "rmsprop":
            self.v = self.rho * self.v + (1 - self.rho) * g**2
            w = w - self.current_lr * g / (np.sqrt(self.v) + self.epsilon)
        elif self.kind == "adam":
            self.m = self.beta_1 * self.m + (1 - self.beta_1) * g
            self.v = self.beta_2 * self.v + (1 - self.beta_2) * g**2
            m_hat = self.m / (1 - self.beta_1 ** (self.iterations + 1))
            v_hat = self.v / (1 - self.beta_2 ** (self.iterations + 1))
            w = w - self.current_lr * m_hat / (np.sqrt(v_hat) + self.epsilon)
        self.iterations += 1
        return w


CASES = [
    ("sgd", dict(learning_rate=1.0, decay=1e-2), {}),
    ("sgd", dict(learning_rate=0.5, decay=1e-1, momentum=0.9), {}),
    ("adagrad", dict(learning_rate=1.0, decay=1e-2), {}),
    ("rmsprop", dict(learning_rate=0.02, decay=1e-3, rho=0.999), {}),
    ("adam", dict(learning_rate=0.05, decay=5e-2), {}),
    ("adam", dict(learning_rate=0.001, beta_1=0.8, beta_2=0.99), {"beta1": 0.8, "beta2": 0.99}),
]


@pytest.mark.parametrize("kind,book_args,renamed", CASES)
def test_matches_the_books_update_rule(kind, book_args, renamed):
    rs = np.random.RandomState(0)
    w0 = rs.randn(4, 3)
    grads = [rs.randn(4, 3) for _ in range(7)]
    book = BookOptimizer(kind, **book_args)
    args = {k: v for k, v in book_args.items() if k not in ("beta_1", "beta_2")} | renamed
    with jax.enable_x64(True):
        tx = optim.OPTIMIZERS[kind](**args)
        w = jnp.asarray(w0)
        state = tx.init(w)
        update = jax.jit(tx.update)
        ref = w0.copy()
        for g in grads:
            updates, state = update(jnp.asarray(g), state, w)
            w = optax.apply_updates(w, updates)
            ref = book.step(ref, g)
            np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-12, atol=1e-14)


def test_optax_defaults_differ_where_the_reference_says():
    g = jnp.array([0.5, -1.0])
    book = optim.adam(0.1).update(g, optim.adam(0.1).init(g))[0]
    default = optax.adam(0.1).update(g, optax.adam(0.1).init(g))[0]
    assert not np.allclose(np.asarray(book), np.asarray(default), rtol=0, atol=0)  # eps 1e-7 vs 1e-8
    np.testing.assert_allclose(np.asarray(book), np.asarray(default), rtol=1e-5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: optim.adam(-0.1), "learning_rate must be a finite number > 0"),
        (lambda: optim.sgd(1.0, momentum=1.0), r"momentum must be a finite number >= 0.0 and < 1.0; got 1.0"),
        (lambda: optim.rmsprop(decay=-1), "decay must be a finite number >= 0"),
        (lambda: optim.adam(beta2="0.9"), "beta2 must be a finite number"),
        (lambda: optim.adam("0.1"), "learning_rate must be a finite number > 0.*or a schedule"),
        (lambda: optim.sgd(jnp.ones(2)), r"learning_rate must be a number or a scalar array; got float32\[2\]"),
        (lambda: optim.adam(jnp.asarray(-1.0)), "learning_rate must be a finite number > 0"),
        (lambda: optim.inverse_time_decay(optax.linear_schedule(1.0, 0.0, 10), decay=-1.0), "decay must be"),
    ],
)
def test_bad_hyperparameters(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _run(tx, w0, grads, jit=True):
    w = jnp.asarray(w0)
    state = tx.init(w)
    update = jax.jit(tx.update) if jit else tx.update
    out = []
    for g in grads:
        updates, state = update(jnp.asarray(g), state, w)
        w = optax.apply_updates(w, updates)
        out.append(np.asarray(w))
    return out, state


@pytest.mark.parametrize("kind,extra", [("sgd", {}), ("sgd", {"momentum": 0.7}), ("adagrad", {}), ("rmsprop", {}),
                                        ("adam", {})])
def test_an_optax_schedule_is_a_learning_rate_and_composes_with_the_books_decay(kind, extra):
    rs = np.random.RandomState(1)
    w0, grads = rs.randn(3, 2), [rs.randn(3, 2) for _ in range(6)]
    def lr_of(t):
        return 0.3 + (0.05 - 0.3) * min(t, 4) / 4  # the linear schedule, transcribed

    with jax.enable_x64(True):
        schedule = optax.linear_schedule(0.3, 0.05, transition_steps=4)
        for decay in (0.0, 0.2):
            got, _ = _run(optim.OPTIMIZERS[kind](schedule, decay=decay, **extra), w0, grads)
            book = BookOptimizer(kind, lr_of, decay=decay, **extra)
            ref = w0.copy()
            for g, w in zip(grads, got, strict=True):
                ref = book.step(ref, g)
                # optax's linear_schedule computes in float32 even under x64: agreement to float32 precision
                np.testing.assert_allclose(w, ref, rtol=1e-6, atol=1e-7)


def test_sgd_with_momentum_is_optax_scale_by_learning_rate_then_trace():
    rs = np.random.RandomState(2)
    w0, grads = rs.randn(5), [rs.randn(5) for _ in range(5)]
    s = optim.inverse_time_decay(0.5, 0.3)
    with jax.enable_x64(True):
        ours, _ = _run(optim.sgd(0.5, decay=0.3, momentum=0.8), w0, grads)
        parts, _ = _run(optax.chain(optax.scale_by_learning_rate(s), optax.trace(decay=0.8)), w0, grads)
        plain, _ = _run(optax.sgd(s, momentum=0.8), w0, grads)  # traces unscaled gradients: differs with decay
    np.testing.assert_array_equal(np.stack(ours), np.stack(parts))
    assert not np.allclose(np.stack(ours), np.stack(plain))


@pytest.mark.parametrize("kind", sorted(optim.OPTIMIZERS))
def test_inject_hyperparams_wraps_every_optimizer_and_its_learning_rate_can_be_changed(kind):
    rs = np.random.RandomState(3)
    w0, grads = rs.randn(4), [rs.randn(4) for _ in range(3)]
    lr = 0.05
    direct, _ = _run(optim.OPTIMIZERS[kind](lr), w0, grads)
    injected, state = _run(optax.inject_hyperparams(optim.OPTIMIZERS[kind])(learning_rate=lr), w0, grads)
    np.testing.assert_allclose(np.stack(injected), np.stack(direct), rtol=1e-5)  # float32 rounding
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(lr)
    # A learning rate changed in the state (as a callback or a sweep does) takes effect at the next update.
    tx = optax.inject_hyperparams(optim.OPTIMIZERS[kind])(learning_rate=lr)
    w = jnp.asarray(w0)
    state = tx.init(w)
    state.hyperparams["learning_rate"] = jnp.asarray(2 * lr)
    doubled = optax.apply_updates(w, jax.jit(tx.update)(jnp.asarray(grads[0]), state, w)[0])
    once = optax.apply_updates(w, optim.OPTIMIZERS[kind](2 * lr).update(jnp.asarray(grads[0]),
                                                                        optim.OPTIMIZERS[kind](2 * lr).init(w), w)[0])
    np.testing.assert_allclose(np.asarray(doubled), np.asarray(once), rtol=1e-5)


def test_inject_hyperparams_with_a_schedule_reports_the_scheduled_value():
    tx = optax.inject_hyperparams(optim.adam)(learning_rate=optax.linear_schedule(0.1, 0.0, 10), beta1=0.8)
    w = jnp.zeros(3)
    state = tx.init(w)
    for _ in range(4):
        _, state = jax.jit(tx.update)(jnp.ones(3), state, w)
    # the value the latest (4th) update used: the schedule at count 3
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1 * (1 - 3 / 10))
    assert float(state.hyperparams["beta1"]) == pytest.approx(0.8)


def test_inverse_time_decay_is_a_plain_schedule():
    s = optim.inverse_time_decay(0.2, decay=0.5)
    assert [float(s(t)) for t in range(3)] == pytest.approx([0.2 / (1 + 0.5 * t) for t in range(3)])
    assert float(jax.jit(s)(jnp.asarray(4))) == pytest.approx(0.2 / 3)
    nested = optim.inverse_time_decay(optax.constant_schedule(0.2), decay=0.5)
    assert float(nested(2)) == pytest.approx(0.1)
