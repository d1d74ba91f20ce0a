"""funcgrad.verify._xla: how a check's gradient programs are compiled (jaxlib 0.10's CPU backend sums over a leading
axis in YNNPACK 10-25 times slower than XLA's own loop; the gradient programs of small functions keep YNNPACK for
matrix products only)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funcgrad import verify
from funcgrad.verify import _xla


def _affected() -> bool:
    return _xla._jaxlib_version()[:2] == (0, 10) and jax.default_backend() == "cpu"


def test_options_only_where_the_slow_sum_is():
    options = _xla.compiler_options()
    if _affected():
        assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
    else:
        assert options is None


def _bias_grad(params, x):
    """A bias's gradient: a sum over the batch (the leading axis)."""
    return jax.grad(lambda p: jnp.sum(jnp.tanh(x + p[0][None, :]) ** 2))(params)[0]


def test_small_parameters_compile_with_the_options_large_ones_without():
    fn = _xla.gradient_jit(_bias_grad)
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(64, 512), jnp.float32)
    small = [jnp.asarray(rs.randn(512), jnp.float32)]
    large = [np.broadcast_to(np.float32(0.0), (_xla._MAX_ELEMENTS,))]  # (its size is what is read, not its memory)
    tuned, plain = fn._pick(small), fn._pick(large)
    assert plain is not tuned if _xla.compiler_options() else plain is tuned
    # Either way, the gradient is the one jax.jit computes (the sum's order may differ: float64 rounding only).
    with jax.enable_x64(True):
        x64, small64 = x.astype(jnp.float64), [small[0].astype(jnp.float64)]
        np.testing.assert_allclose(np.asarray(fn(small64, x64)), np.asarray(jax.jit(_bias_grad)(small64, x64)),
                                   rtol=1e-12, atol=1e-12)
    if _xla.compiler_options():
        # The options reach XLA: the sum over the batch is no longer a YNNPACK fusion (it is under jax.jit).
        assert "__ynn_fusion" in jax.jit(_bias_grad).lower(small, x).compile().as_text()
        hlo = tuned.lower(small, x).compile().as_text()
        assert not any("reduce" in line for line in hlo.splitlines() if "__ynn_fusion" in line and "kCustom" in line)


def test_decorator_form_keeps_static_arguments():
    @functools.partial(_xla.gradient_jit, static_argnames=("power",))
    def f(params, *, power):
        return jnp.sum(params[0] ** power)

    p = [jnp.arange(4.0)]
    assert float(f(p, power=2)) == 14.0
    assert float(f(p, power=3)) == 36.0
    assert f.__name__ == "f"


def test_check_grad_same_verdict_and_values_either_way(monkeypatch):
    """A check with the options and one without read the same gradients (to rounding) and give the same verdicts."""
    rs = np.random.RandomState(1)
    params = {"W": jnp.asarray(rs.randn(8, 64) / 3, jnp.float32), "b": jnp.asarray(rs.randn(64) * 0.1, jnp.float32)}
    X = jnp.asarray(rs.randn(32, 8), jnp.float32)

    def loss(p, X):
        return jnp.mean(jnp.tanh(X @ p["W"] + p["b"][None, :]) ** 2)

    def hand(p, X):
        h = jnp.tanh(X @ p["W"] + p["b"][None, :])
        dz = 2 * h * (1 - h**2) / h.size
        return {"W": X.T @ dz, "b": dz.sum(0)}

    with_options = verify.check_grad(loss, params, X, hand=hand)
    monkeypatch.setattr(_xla, "_MAX_ELEMENTS", 0)  # every check's programs at JAX's defaults
    without = verify.check_grad(loss, params, X, hand=hand)
    assert with_options.ok and without.ok
    for r1, r2 in zip(with_options.rows, without.rows, strict=True):
        assert (r1.path, r1.verdict) == (r2.path, r2.verdict)
        assert r1.autodiff == pytest.approx(r2.autodiff, rel=1e-9, abs=1e-12)
        assert r1.hand == pytest.approx(r2.hand, rel=1e-9, abs=1e-12)
