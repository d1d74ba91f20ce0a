"""funcgrad.verify._xla: how a check's gradient programs are compiled (jaxlib 0.10's CPU backend sums over a leading
axis in YNNPACK 10-25 times slower than XLA's own loop; the gradient programs of small functions keep YNNPACK for
each matrix product and convolution alone)."""

import functools
import re

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
        assert options == {"xla_cpu_experimental_ynn_fusion_type":
                           "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
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
        # The options reach XLA: the sum over the batch, and the tanh around the products, are no longer in YNNPACK
        # fusions (they are under jax.jit).
        plain_ops = _ynn_ops(jax.jit(_bias_grad).lower(small, x).compile().as_text())
        assert "reduce" in plain_ops or "tanh" in plain_ops, plain_ops
        tuned_ops = _ynn_ops(tuned.lower(small, x).compile().as_text())
        assert not {"reduce", "tanh"} & tuned_ops, tuned_ops


def _ynn_ops(hlo: str) -> set[str]:
    """The opcodes inside an optimised HLO module's YNNPACK fusions."""
    bodies = dict(re.findall(r"\n(%[\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S))
    ops: set[str] = set()
    for line in hlo.splitlines():
        if "__ynn_fusion" in line and "kCustom" in line:
            body = bodies[re.search(r"calls=(%[\w.\-]+)", line).group(1)]
            ops |= set(re.findall(r"= \w+\[[^\]]*\](?:\{[^}]*\})? (\w[\w-]*)\(", body))
    return ops


def test_a_convolution_stays_in_ynnpack_with_the_options():
    # Matrix products alone in YNNPACK (the previous options) also took the kernel gradient's convolution from it,
    # to XLA's loop: a small CNN's float64 gradient took 22 ms against 8.7.
    if not _xla.compiler_options():
        pytest.skip("JAX's defaults here (not jaxlib 0.10 on CPU)")

    def conv_grad(params, x):
        def f(p):
            z = jax.lax.conv_general_dilated(x, p[0], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.sum(jnp.tanh(z) ** 2)

        return jax.grad(f)(params)[0]

    rs = np.random.RandomState(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rs.randn(32, 16, 16, 3))
        k = [jnp.asarray(rs.randn(3, 3, 3, 16) * 0.2)]
        plain_ops = _ynn_ops(jax.jit(conv_grad).lower(k, x).compile().as_text())
        tuned_ops = _ynn_ops(_xla.gradient_jit(conv_grad)._pick(k).lower(k, x).compile().as_text())
        assert "convolution" in plain_ops and "convolution" in tuned_ops, (plain_ops, tuned_ops)
        np.testing.assert_allclose(np.asarray(_xla.gradient_jit(conv_grad)(k, x)), np.asarray(jax.jit(conv_grad)(k, x)),
                                   rtol=1e-12, atol=1e-12)


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


def test_options_xla_refuses_fall_back_to_the_defaults(monkeypatch):
    # Options XLA cannot honour for a program (an unknown fusion type here) must not break a check: its programs are
    # compiled as JAX compiles any program, and the verdicts are the same.
    monkeypatch.setattr(_xla, "compiler_options", lambda: {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION"})
    fn = _xla.gradient_jit(_bias_grad)
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(8, 16), jnp.float32)
    p = [jnp.asarray(rs.randn(16), jnp.float32)]
    with pytest.raises(jax.errors.JaxRuntimeError):
        fn._pick(p)(p, x)  # (the construction: XLA refuses these options)
    np.testing.assert_allclose(np.asarray(fn(p, x)), np.asarray(jax.jit(_bias_grad)(p, x)), rtol=1e-6)
    W = jnp.asarray(rs.randn(4, 3), jnp.float32)
    report = verify.check_grad(lambda W, x: jnp.sum(jnp.tanh(x[:, :4] @ W)), W, x,
                               hand=lambda W, x: x[:, :4].T @ (1 - jnp.tanh(x[:, :4] @ W) ** 2))
    assert report.ok, report


def test_an_error_of_the_program_itself_is_raised_once_not_run_again():
    # A program that fails as it runs (a callback raising on its first call only) under the options: the error is
    # the user's, raised as without them; running it again at JAX's defaults swallowed it (h91).
    if not _xla.compiler_options():
        pytest.skip("JAX's defaults here (not jaxlib 0.10 on CPU)")
    calls = []

    def once(x):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("the first call fails")

    def f(params, x):
        jax.debug.callback(once, x)
        return jnp.sum(params[0] * x)

    fn = _xla.gradient_jit(f)
    p, x = [jnp.ones(3)], jnp.arange(3.0)
    with pytest.raises(jax.errors.JaxRuntimeError, match="the first call fails"):
        fn(p, x)
    assert len(calls) == 1
    assert float(fn(p, x)) == 3.0 and not fn._refused  # (the options are kept: XLA compiled the program with them)
