"""The verifier's tolerances and its forward-versus-reverse-mode check (issue 13, class 5).

funcgrad/verify documents its default tolerances: ``rtol = max(1e-7, 3·√eps)`` (capped at 5%) of the precision
fn computes in with float64 inputs, and ``atol = rtol × the leaf's largest gradient``, so an element i of a leaf
passes while ``|autodiff − hand| <= rtol·max|g| + rtol·|g_i|``. A hand gradient wrong by a few times that must be
``hand_wrong``, and one wrong by a fraction of it must be ``ok``: a default widened (or narrowed) tenfold fails
here. The forward-mode check is exercised with a ``jax.custom_jvp`` whose rule is affine rather than linear in
the tangent: forward mode (the rule itself) then differs from reverse mode (its transpose drops the constant).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funcgrad import verify

# The documented default for a function computing in float64 (float32 parameters are checked in float64 too).
RTOL = max(1e-7, 3 * math.sqrt(np.finfo(np.float64).eps))
W = np.array([1.0, -2.0, 0.5, 1.5])
G = 3 * W**2  # the gradient of Σw³: [3, 12, 0.75, 6.75]


def cube_sum(w):
    return jnp.sum(w**3)


def documented_tolerance(i):
    return RTOL * np.max(np.abs(G)) + RTOL * abs(G[i])


def _hand_off_by(i, err):
    bump = np.zeros_like(W)
    bump[i] = err

    def hand(w):
        return 3 * w**2 + jnp.asarray(bump, w.dtype)

    return hand


def test_the_documented_default_is_1e_7_for_float64_arithmetic():
    assert RTOL == 1e-7  # 3·√eps(float64) = 4.5e-8 is below the 1e-7 floor


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("i", [1, 2])  # the leaf's largest element, and a small one
@pytest.mark.slow
def test_a_hand_error_just_above_the_default_tolerance_is_hand_wrong(dtype, i):
    err = 3 * documented_tolerance(i)  # e.g. 7.7e-6 on a gradient of 12: 6e-7 relative
    with jax.enable_x64(dtype == jnp.float64):
        w = jnp.asarray(W, dtype)
        report = verify.check_grad(cube_sum, w, hand=_hand_off_by(i, err))
    assert report.verdict == "hand_wrong", report
    row = report.rows[0]
    assert row.worst_index == (i,)
    assert row.hand - row.autodiff == pytest.approx(err, rel=0.05)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("i", [1, 2])
def test_a_hand_error_below_the_default_tolerance_is_ok(dtype, i):
    err = 0.3 * documented_tolerance(i)
    with jax.enable_x64(dtype == jnp.float64):
        report = verify.check_grad(cube_sum, jnp.asarray(W, dtype), hand=_hand_off_by(i, err))
    assert report.verdict == "ok", report


def test_an_explicit_rtol_widens_the_tolerance():
    err = 3 * documented_tolerance(1)
    assert verify.check_grad(cube_sum, jnp.asarray(W), hand=_hand_off_by(1, err)).verdict == "hand_wrong"
    assert verify.check_grad(cube_sum, jnp.asarray(W), hand=_hand_off_by(1, err), rtol=100 * RTOL).verdict == "ok"


X = np.array([1.0, -2.0, 0.5, 1.5, -0.75])


@pytest.mark.parametrize("factor,verdict", [(6.0, "hand_wrong"), (0.3, "ok")])
@pytest.mark.slow
def test_check_vjp_tolerance(factor, verdict):
    """A hand VJP off by a relative δ: wrong by 3× the largest element's tolerance (2·rtol), or by 0.3·rtol."""
    delta = factor * RTOL

    def hand_vjp(x, ct):
        return 3 * x**2 * ct * (1 + delta)

    report = verify.check_vjp(lambda x: x**3, hand_vjp, jnp.asarray(X))
    assert report.verdict == verdict, report


# ---- forward mode against reverse mode ----


def _affine_jvp_cube():
    @jax.custom_jvp
    def cube(x):
        return x**3

    # Affine in the tangent: jvp adds 0.5 to every directional derivative; reverse mode, the transpose of the
    # rule's linear part, does not see the constant. The primal is right, so reverse mode is right.
    cube.defjvp(lambda primals, tangents: (cube(primals[0]), 3 * primals[0] ** 2 * tangents[0] + 0.5))
    return cube


def test_the_construction_really_makes_the_two_modes_disagree():
    cube = _affine_jvp_cube()
    f = lambda w: jnp.sum(cube(w))  # noqa: E731
    w, u = jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0])
    reverse = float(jnp.vdot(jax.grad(f)(w), u))
    forward = float(jax.jvp(f, (w,), (u,))[1])
    assert reverse == pytest.approx(3.0)  # 3·1² along the first axis
    assert forward == pytest.approx(3.0 + 0.5 * w.size)  # plus the rule's constant, once per element summed


@pytest.mark.parametrize("with_hand", [True, False])
@pytest.mark.slow
def test_forward_mode_disagreeing_with_reverse_mode_is_reported(with_hand):
    cube = _affine_jvp_cube()
    hand = (lambda w: 3 * w**2) if with_hand else None
    report = verify.check_grad(lambda w: jnp.sum(cube(w)), jnp.array([1.0, 2.0, -0.5]), hand=hand)
    assert report.verdict == "autodiff_wrong", report
    text = report.rows[0].note + " ".join(report.notes)
    assert "forward mode" in text and "reverse mode" in text and "disagree" in text, text
    assert "forward mode is wrong" in text, text  # finite differences side with reverse mode
