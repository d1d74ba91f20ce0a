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
        if self.decay:
            self.current_lr = self.lr * (1.0 / (1.0 + self.decay * self.iterations))
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
    ],
)
def test_bad_hyperparameters(call, match):
    with pytest.raises(ValueError, match=match):
        call()
