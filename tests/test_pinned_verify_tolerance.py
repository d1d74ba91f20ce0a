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
from conftest import cube_root, twice_primitive

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


def _user_tanh():
    @jax.custom_jvp
    def act(x):
        return jnp.tanh(x)

    act.defjvps(lambda t, ans, x: t * (1 - ans**2))
    return act


def _rule_on_jax_function():
    act = jax.custom_jvp(jnp.tanh)  # JAX's function, the user's rule
    act.defjvps(lambda t, ans, x: t * (1 - ans**2))
    return act


def _user_solve(w):
    # lax.custom_linear_solve with the user's solve and transpose_solve: reverse mode uses the latter.
    a = jnp.diag(jnp.array([2.0, 3.0, 4.0]))
    solve = lambda matvec, b: b / jnp.diag(a)  # noqa: E731
    return jnp.sum(jax.lax.custom_linear_solve(lambda x: a @ x, w, solve, transpose_solve=solve) ** 2)


class _TanhRule:
    """A JVP rule given as an object (``shift``: a constant added to the tangent, a mistake)."""

    def __init__(self, shift=0.0):
        self.shift = shift

    def __call__(self, primals, tangents):
        (x,), (t,) = primals, tangents
        y = jnp.tanh(x)
        return y, t * (1 - y**2) + self.shift


def _object_rule_on_jax_function(shift=0.0):
    act = jax.custom_jvp(jnp.tanh)
    act.defjvp(_TanhRule(shift))
    return act


# (fn, whether forward mode is compared with reverse mode)
_MODE_CASES = {
    "plain jnp": (lambda w: jnp.sum(jnp.tanh(w) ** 2), False),
    "jax.nn.relu (JAX's own rule)": (lambda w: jnp.sum(jax.nn.relu(w) * w), False),
    "logsumexp (JAX's own rule)": (lambda w: jax.nn.logsumexp(w * 2.0), False),
    "jnp.linalg.solve (JAX's own linear solve)": (
        lambda w: jnp.sum(jnp.linalg.solve(jnp.eye(3) * 2 + w[:, None] * 0.1, w)), False),
    "the user's custom_jvp": (lambda w: jnp.sum(_user_tanh()(w) ** 2), True),
    "the user's rule on a JAX function": (lambda w: jnp.sum(_rule_on_jax_function()(w) ** 2), True),
    "the user's rule object on a JAX function": (lambda w: jnp.sum(_object_rule_on_jax_function()(w) ** 2), True),
    "the user's custom_linear_solve": (_user_solve, True),
    "the user's primitive": (twice_primitive(), True),
    "the user's custom_root": (cube_root(), True),
}


@pytest.mark.parametrize("case", list(_MODE_CASES))
def test_forward_mode_is_compared_where_a_rule_not_jaxs_own_could_make_it_differ(case):
    # JAX's reverse mode is the transpose of forward mode's linear map, and JAX's own rules are linear in the
    # tangents: made of them alone, the two agree by construction, and the comparison is not run (it costs an
    # evaluation and a half per leaf). A rule of the user's can make them differ.
    fn, compared = _MODE_CASES[case]
    w = jnp.array([0.3, 1.2, 0.7])
    report = verify.check_grad(fn, w)
    assert report.ok, report
    assert report.environment["forward_mode_compared"] is compared, report.environment


def _affine_rule_on_jax_function():
    act = jax.custom_jvp(jnp.tanh)  # JAX's function, the user's rule: not trusted as JAX's own
    act.defjvps(lambda t, ans, x: t * (1 - ans**2) + 0.25)  # affine in the tangent
    return lambda w: jnp.sum(act(w))


@pytest.mark.parametrize("make", [_affine_rule_on_jax_function, lambda: (lambda w: jnp.sum(
    _object_rule_on_jax_function(0.25)(w))), lambda: twice_primitive(shift=0.25), lambda: cube_root(shift=0.3)],
    ids=["rule on a JAX function", "rule object", "primitive", "custom_root's tangent_solve"])
def test_a_users_affine_rule_is_still_caught(make):
    fn = make()
    w = jnp.array([0.3, 1.2, 0.7])
    with jax.enable_x64(True):  # (the construction: the two modes really disagree; reverse mode is right)
        w64, u = w.astype(jnp.float64), jnp.ones(3) / math.sqrt(3)
        forward, reverse = float(jax.jvp(fn, (w64,), (u,))[1]), float(jax.grad(fn)(w64) @ u)
        central = (float(fn(w64 + 1e-6 * u)) - float(fn(w64 - 1e-6 * u))) / 2e-6
    assert abs(forward - reverse) > 0.05 and reverse == pytest.approx(central, rel=1e-6, abs=1e-8)
    report = verify.check_grad(fn, w)
    assert report.verdict == "autodiff_wrong", report
    assert "forward mode is wrong" in report.rows[0].note + " ".join(report.notes), report
