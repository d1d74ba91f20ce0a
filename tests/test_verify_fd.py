"""funcgrad.verify._fd on its own: finite differences of NumPy functions against analytic derivatives (no JAX)."""

import ast
import math

import numpy as np
import pytest
from conftest import ROOT

from funcgrad.verify import _fd
from funcgrad.verify._report import Verdict

EPS = float(np.finfo(np.float64).eps)


def evaluations(f, x0, h):
    """f at x0 + offset·h for each of _fd._OFFSETS: one item, the columns of F."""
    return np.array([[f(x0 + offset * h) for offset in _fd._OFFSETS]], np.float64)


def scale(f, x0, h, tol=0.0):
    return _fd._scale(float(f(x0)), evaluations(f, x0, h), np.array([h]), EPS, np.array([tol]))


def ladder(f, x0, h, n, tol=0.0):
    """n scales, each step _LADDER times smaller, read as the checks read them."""
    scales = [scale(f, x0, h / _fd._LADDER**k, tol) for k in range(n)]
    return scales, _fd._resolve(scales, np.array([tol]), float(f(x0)))


def test_offset_columns_are_named_in_order():
    cols = (_fd._MINUS_STEP, _fd._MINUS_HALF, _fd._PLUS_HALF, _fd._PLUS_STEP)
    assert [_fd._OFFSETS[c] for c in cols] == [-1.0, -0.5, 0.5, 1.0]


def test_richardson_removes_the_first_order_bias_of_one_sided_differences():
    # exp at 0.3: the one-sided quotients are off by f''·h/2; their Richardson extrapolations are not.
    x0, h, exact = 0.3, 1e-2, math.exp(0.3)
    F = evaluations(np.exp, x0, h)[0]
    right = (F[_fd._PLUS_STEP] - math.exp(x0)) / h
    left = (math.exp(x0) - F[_fd._MINUS_STEP]) / h
    assert abs(right - exact) == pytest.approx(exact * h / 2, rel=0.05)  # the O(h) bias is there
    assert abs(left - exact) == pytest.approx(exact * h / 2, rel=0.05)
    s = scale(np.exp, x0, h)
    assert abs(s.rp[0] - exact) < 0.01 * abs(right - exact)
    assert abs(s.rm[0] - exact) < 0.01 * abs(left - exact)
    # The central estimate, Richardson-extrapolated, is far closer still (its error is O(h⁴)).
    assert abs(s.value[0] - exact) < 1e-8
    assert not s.nonsmooth[0] and s.finite[0]


@pytest.mark.parametrize(("f", "df", "x0"), [(np.sin, np.cos, 0.7), (np.exp, np.exp, -0.4),
                                             (lambda x: x**5, lambda x: 5 * x**4, 1.3)])
def test_error_estimates_shrink_with_the_step_and_bound_the_error(f, df, x0):
    errs = []
    for h in (1e-1, 1e-2, 1e-3):
        s = scale(f, x0, h)
        errs.append(float(s.err[0]))
        assert abs(s.value[0] - df(x0)) <= s.err[0]  # an honest estimate
    assert errs[0] > 10 * errs[1] > 100 * errs[2]


def test_abs_at_zero_reads_as_the_interval_between_the_one_sided_derivatives():
    scales, fd = ladder(np.abs, 0.0, 1e-2, 2)
    assert scales[0].nonsmooth[0]
    assert fd.resolved[0] and fd.paired[0] and fd.nonsmooth[0] and not fd.singular[0]
    assert fd.lo[0] == pytest.approx(-1.0, abs=1e-12) and fd.hi[0] == pytest.approx(1.0, abs=1e-12)


def test_a_kink_with_curvature_beside_it_still_gives_the_exact_interval():
    # |x| + 3x² at 0: the one-sided quotients are ±1 + 3h; Richardson leaves exactly [-1, 1].
    f = lambda x: np.abs(x) + 3 * x**2  # noqa: E731
    h = 1e-2
    F = evaluations(f, 0.0, h)[0]
    assert F[_fd._PLUS_STEP] / h == pytest.approx(1 + 3 * h)
    _, fd = ladder(f, 0.0, h, 2)
    assert fd.nonsmooth[0] and fd.resolved[0]
    assert fd.lo[0] == pytest.approx(-1.0, abs=1e-9) and fd.hi[0] == pytest.approx(1.0, abs=1e-9)


def test_relu_at_zero_gives_zero_to_one():
    _, fd = ladder(lambda x: np.maximum(x, 0.0) + 0.5 * x**2, 0.0, 1e-2, 2)
    assert fd.nonsmooth[0]
    assert fd.lo[0] == pytest.approx(0.0, abs=1e-9) and fd.hi[0] == pytest.approx(1.0, abs=1e-9)


def test_a_kink_far_smaller_than_the_curvature_beside_it_is_read_as_a_kink():
    # 1.1 + 2.3e-9·max(x, 0) + 5e-4·x² at 0 (a dead ReLU unit's bias under L2): the one-sided derivatives are exactly
    # 0 and 2.3e-9, but at the first step the curvature's 1e-3·h dwarfs the jump. Read as smooth, the central value
    # (the midpoint, 1.15e-9 ± 2e-10) blamed a hand that takes D₋ = 0, a valid subgradient.
    jump = 2.3e-9
    f = lambda x: 1.1 + jump * np.maximum(x, 0.0) + 5e-4 * x**2  # noqa: E731
    h = EPS ** (1 / 5)
    scales, fd = ladder(f, 0.0, h, 2)
    assert not scales[0].nonsmooth[0] and scales[0].sided[0]  # (the case: only the one-sided test sees it)
    assert fd.resolved[0] and fd.paired[0] and fd.nonsmooth[0]
    assert fd.lo[0] == pytest.approx(0.0, abs=2e-11) and fd.hi[0] == pytest.approx(jump, rel=1e-2)
    assert classify(jump / 2, 0.0, fd, 4e-11) == ["kink"]
    assert classify(jump / 2, 3 * jump, fd, 4e-11) == ["hand_wrong"]


def test_a_smooth_function_with_large_high_derivatives_is_not_a_kink():
    # cosh(30x) at 0: the one-sided derivatives differ beyond rounding at every scale (f⁗h³/16), by a thousandfold
    # less at each finer one: they never agree across scales as a kink's do.
    f = lambda x: np.cosh(30 * x)  # noqa: E731
    scales, fd = ladder(f, 0.0, 5e-2, 4)
    assert all(s.sided[0] for s in scales)  # (the case)
    assert fd.resolved[0] and fd.paired[0] and not fd.nonsmooth[0]
    assert abs(fd.value[0]) <= 2 * fd.err[0] + 1e-12


def _flat_scale(value: float, err: float) -> _fd._Scale:
    """A smooth scale reading ``value ± err`` (one item)."""
    a = lambda x: np.array([x])  # noqa: E731
    return _fd._Scale(a(value), a(err), a(0.0), a(value), a(value), a(False), a(False), a(True), a(abs(value)), a(0.0))


def test_a_pair_of_scales_that_finer_scales_contradict_is_not_read():
    # sin at 3000 in float32 (an audit of a positional encoding): the steps of the first two scales span periods,
    # and both give ~0.002 with small error bars; the finer scales agree on cos(3000.3) = −0.125.
    scales = [_flat_scale(0.00192, 2.5e-4), _flat_scale(0.00197, 4e-6), _flat_scale(-0.1248, 7e-3),
              _flat_scale(-0.12507, 1.5e-3)]
    fd = _fd._resolve(scales, np.array([0.0]), 0.3)
    assert fd.resolved[0] and fd.value[0] == pytest.approx(-0.12507) and fd.err[0] > 1e-3
    # (without the finer scales, the coarse pair is read: what the finer ones are there to overrule)
    assert _fd._resolve(scales[:2], np.array([0.0]), 0.3).value[0] == pytest.approx(0.00197)


def test_the_rounding_of_the_point_itself_is_in_the_noise():
    # a float32 input of 3000 moves f by its slope times half its spacing (1.2e-4) at any step
    f = lambda x: float(np.sin(np.float64(np.float32(x))))  # noqa: E731
    eps32 = float(np.finfo(np.float32).eps)
    x0, h = float(np.float32(3000.3)), 1e-2
    plain = _fd._scale(f(x0), evaluations(f, x0, h), np.array([h]), eps32, np.array([0.0]))
    rounded = _fd._scale(f(x0), evaluations(f, x0, h), np.array([h]), eps32, np.array([0.0]), np.array([x0]))
    assert rounded.noise[0] > 10 * plain.noise[0]
    assert abs(rounded.value[0] - math.cos(x0)) <= rounded.err[0] < 0.5


def test_a_smooth_function_is_read_as_a_point():
    _, fd = ladder(np.sin, 0.7, 1e-2, 2)
    assert fd.resolved[0] and fd.paired[0] and not fd.nonsmooth[0]
    assert fd.lo[0] == fd.hi[0] == fd.value[0]
    assert abs(fd.value[0] - math.cos(0.7)) <= 2 * fd.err[0]


def test_sqrt_at_zero_is_singular():
    # The right quotients grow like 1/√h without bound; left of 0 the function is not defined.
    with np.errstate(invalid="ignore"):
        _, fd = ladder(np.sqrt, 0.0, 1e-2, 4)
    assert fd.singular[0] and not fd.paired[0]
    _, fd = ladder(lambda x: np.sqrt(np.abs(x)), 0.0, 1e-2, 4)  # defined on both sides, still no derivative
    assert fd.singular[0]


def classify(A, H, fd, tol):
    return list(_fd._classify(np.array([A]), None if H is None else np.array([H]), fd, np.array([tol])))


def test_classify_blames_the_side_that_disagrees_with_the_other_two():
    _, fd = ladder(np.exp, 0.3, 1e-2, 2, tol=1e-7)
    g = math.exp(0.3)
    tol = _fd._default_rtol(EPS) * g
    assert classify(g, g, fd, tol) == [Verdict.OK]
    assert classify(g, 1.01 * g, fd, tol) == ["hand_wrong"]
    assert classify(1.01 * g, g, fd, tol) == ["autodiff_wrong"]
    assert classify(1.01 * g, 1.01 * g, fd, tol) == ["both_wrong"]
    assert classify(1.01 * g, None, fd, tol) == ["autodiff_wrong"]


def test_classify_blames_only_what_finite_differences_rule_out_with_confidence():
    """Between the reading's slack (2·err + tol) and its confidence margin (_CONFIDENT·err + tol) a value is
    neither accepted nor blamed: the verdict says it could not decide. A reading from a single scale (not
    paired) never blames, however far off the value."""
    _, fd = ladder(np.exp, 0.3, 1e-2, 2, tol=1e-7)
    assert fd.paired[0] and fd.err[0] > 0
    tol = 1e-9
    grey = fd.hi[0] + tol + 0.5 * (2 + _fd._CONFIDENT) * fd.err[0]  # outside the slack, inside the margin
    assert classify(grey, None, fd, tol) == ["mismatch"]
    assert classify(grey, grey, fd, tol) == ["fd_unreliable"]
    far = fd.hi[0] + tol + 2 * _fd._CONFIDENT * fd.err[0]
    assert classify(far, None, fd, tol) == ["autodiff_wrong"] and classify(far, far, fd, tol) == ["both_wrong"]

    # the last resort: one clean scale, read when no two scales agree
    single = _fd._resolve([scale(np.exp, 0.3, 1e-2, 1e-7)], np.array([1e-7]), math.exp(0.3), True)
    assert single.resolved[0] and not single.paired[0]
    off = 1.5 * math.exp(0.3)
    assert classify(off, None, single, tol) == ["mismatch"] and classify(off, off, single, tol) == ["fd_unreliable"]
    assert classify(math.exp(0.3), off, single, tol) == ["hand_wrong"]  # one side fits, the other does not


def test_classify_at_a_kink_accepts_every_value_in_the_interval_and_no_other():
    _, fd = ladder(np.abs, 0.0, 1e-2, 2)
    # JAX's |x|' at 0 is 0; the book's sign rule may say 1: both are subgradients.
    assert classify(0.0, 1.0, fd, 1e-7) == ["kink"]
    assert classify(0.0, -1.0, fd, 1e-7) == ["kink"]
    assert classify(0.0, 2.0, fd, 1e-7) == ["hand_wrong"]
    assert classify(3.0, 0.5, fd, 1e-7) == ["autodiff_wrong"]


def test_classify_does_not_call_two_values_a_kink_that_finite_differences_cannot_resolve():
    # A kink reading of 194 ± 607 (float32 noise) says nothing about 0.28 against 3e-5: undecided, not kink.
    fd = _fd._FD(*(np.array([v]) for v in (193.7, 606.6, -400.0, 800.0, True, True, True, False, False, True)))
    assert classify(3.1e-5, 0.276, fd, 1e-6) == ["mismatch"]
    fd = _fd._FD(*(np.array([v]) for v in (0.5, 0.01, 0.0, 1.0, True, True, True, False, True, True)))
    assert classify(0.0, 1.0, fd, 1e-7) == ["kink"]  # (a resolved kink: its sides are known to 1%)


def test_classify_at_a_singular_point():
    with np.errstate(invalid="ignore"):
        _, fd = ladder(np.sqrt, 0.0, 1e-2, 4)
    assert classify(math.inf, math.inf, fd, 1e-7) == ["singular"]
    assert classify(math.inf, 0.0, fd, 1e-7) == ["mismatch"]


def outer(f, x0, h, values, tol, also=None):
    """A costly function's first reading (the outer offsets only) of one item, with these analytic values."""
    F = np.full((1, len(_fd._OFFSETS)), np.nan)
    for c in _fd._OUTER:
        F[0, c] = f(x0 + _fd._OFFSETS[c] * h)
    settled, fd = _fd._outer_reading(float(f(x0)), F, np.array([h]), EPS, np.array([tol]), 0.0,
                                     [np.array([v]) for v in values], None if also is None else np.array([also]))
    return bool(settled[0]), fd


def test_the_outer_reading_settles_a_smooth_item_whose_values_agree_with_its_central_difference():
    # exp at 0.3, step 1e-4: the central difference is off by exp·h²/6 ≈ 2e-9, well inside 1e-7.
    settled, fd = outer(np.exp, 0.3, 1e-4, [math.exp(0.3), math.exp(0.3)], 1e-7)
    assert settled and fd.resolved[0] and not fd.nonsmooth[0] and not fd.paired[0]
    assert fd.value[0] == pytest.approx(math.exp(0.3), rel=1e-8) and fd.lo[0] == fd.hi[0] == fd.value[0]
    # Forward mode, where asked for (NaN: not along this item), must agree too; an analytic value that is NaN never does.
    assert outer(np.exp, 0.3, 1e-4, [math.exp(0.3)], 1e-7, also=math.nan)[0]
    assert outer(np.exp, 0.3, 1e-4, [math.exp(0.3)], 1e-7, also=math.exp(0.3))[0]
    assert not outer(np.exp, 0.3, 1e-4, [math.exp(0.3)], 1e-7, also=1.01 * math.exp(0.3))[0]
    assert not outer(np.exp, 0.3, 1e-4, [math.exp(0.3), math.nan], 1e-7)[0]


@pytest.mark.parametrize("wrong", [1.0 + 3e-7, 1.0 - 3e-7, 1.01, 0.0, -1.0, math.inf])
def test_the_outer_reading_leaves_a_value_off_its_central_difference_to_the_ladder(wrong):
    # One value off by three tolerances (or by its sign, or not finite): never settled from the central
    # difference alone; the ladder reads it.
    exact = math.exp(0.3)
    assert not outer(np.exp, 0.3, 1e-4, [exact, exact * wrong], 1e-7 * exact)[0]
    assert not outer(np.exp, 0.3, 1e-4, [exact * wrong], 1e-7 * exact)[0]


@pytest.mark.parametrize(("f", "value"), [(np.abs, 0.0), (lambda x: np.maximum(x, 0.0), 0.5),
                                          (lambda x: np.maximum(x, 0.0), 0.0), (lambda x: np.maximum(x, 0.0), 1.0),
                                          (lambda x: np.where(x < 1e-5, 0.0, x - 1e-5), 0.0)])
def test_the_outer_reading_leaves_a_kink_within_the_step_to_the_ladder(f, value):
    # At a kink, the central difference is a weighted mean of the two sides: |x| at 0 gives exactly 0, relu at 0
    # exactly 1/2, even where the values say so; and a kink a little off the point, within the step, likewise.
    assert not outer(f, 0.0, 1e-4, [value, value], 1e-7)[0]


def test_the_outer_reading_needs_its_rounding_within_the_tolerance():
    # sin(x)·1e6 + 1e6 at a step of 1e-9: a quotient's rounding is far above a tolerance of 1e-3.
    f = lambda x: 1e6 * np.sin(x) + 1e6  # noqa: E731
    settled, _ = outer(f, 0.3, 1e-9, [1e6 * math.cos(0.3)], 1e-3)
    assert not settled
    assert outer(f, 0.3, 1e-4, [1e6 * math.cos(0.3)], 1e-2 * 1e6)[0]


def test_merge_puts_each_reading_at_its_items():
    _, a = outer(np.exp, 0.3, 1e-4, [math.exp(0.3)], 1e-7)
    scales, b = ladder(np.abs, 0.0, 1e-2, 2)
    fd = _fd._merge(3, [(np.array([1]), a), (np.array([0, 2]), b.take(np.array([0, 0])))])
    assert fd.value[1] == a.value[0] and fd.nonsmooth.tolist() == [True, False, True]
    assert fd.lo[0] == fd.lo[2] == pytest.approx(-1.0) and not fd.paired[1] and fd.paired[0]
    assert np.isnan(fd.near_lo[1])


def test_default_rtol():
    assert _fd._default_rtol(EPS) == 1e-7
    assert _fd._default_rtol(float(np.finfo(np.float32).eps)) == pytest.approx(3 * math.sqrt(2.0**-23))
    assert _fd._default_rtol(2.0**-7) == 0.05  # bfloat16: capped


@pytest.mark.parametrize("module", ["_fd", "_report"])
def test_the_numpy_layers_do_not_import_jax(module):
    tree = ast.parse((ROOT / "funcgrad" / "verify" / f"{module}.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [m for m in imported if m == "jax" or m.startswith(("jax.", "funcgrad.verify._compiled"))], imported
    assert all(m.startswith("funcgrad.verify._report") for m in imported if m.startswith("funcgrad"))


# ---- the rounding of one evaluation, measured (fourth differences) ----


def test_the_fourth_difference_vanishes_on_cubics_and_is_exact_on_quartics():
    h = 0.1
    cubic = lambda x: 2 * x**3 - x + 1  # noqa: E731
    assert _fd._fourth(cubic(0.3), evaluations(cubic, 0.3, h))[0] < 1e-14
    quartic = lambda x: x**4  # noqa: E731
    # Δ⁴ of x⁴ at spacing h/2 is 4!·(h/2)⁴, whatever the point
    want = 24 * (h / 2) ** 4 / math.sqrt(70)
    assert _fd._fourth(quartic(-0.7), evaluations(quartic, -0.7, h))[0] == pytest.approx(want, rel=1e-8)


def test_pooled_rounding_is_three_times_the_rms_of_at_least_eight_samples():
    rng = np.random.default_rng(0)
    sigma = 1e-9
    F = np.sin(0.4) + sigma * rng.standard_normal((400, 4))  # five points each, independent rounding of RMS σ
    f0s = np.sin(0.4) + sigma * rng.standard_normal(400)
    samples = np.concatenate([_fd._fourth(f0, F[i : i + 1]) for i, f0 in enumerate(f0s)])
    assert _fd._pooled_rounding(samples) == pytest.approx(3 * sigma, rel=0.15)
    assert math.isnan(_fd._pooled_rounding(samples[:7]))
    assert not math.isnan(_fd._pooled_rounding(samples[:8]))
    assert math.isnan(_fd._pooled_rounding(np.full(20, np.nan)))


def test_items_along_which_f_does_not_change_say_nothing_about_the_rounding():
    F = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0 + 1e-15, 1.0], [np.nan, 1.0, 1.0, 1.0]])
    assert _fd._informative(1.0, F).tolist() == [False, True, False]


def test_a_measured_rounding_narrows_the_noise_within_the_quantum_and_the_bound():
    eps, size, h = float(np.finfo(np.float32).eps), 2.0, 1e-2
    bound = _fd._rounding(eps, size, h, 0.0, 0.0)
    assert bound == pytest.approx(4 * 12 * eps * size / h)
    assert _fd._rounding(eps, size, h, 0.0, 0.0, np.array([3 * eps * size]))[0] == pytest.approx(bound / 4)
    # never below one unit of the output's own rounding, never above the bound, unchanged where unknown (NaN)
    assert _fd._rounding(eps, size, h, 0.0, 0.0, np.array([1e-3 * eps]))[0] == pytest.approx(4 * eps * size / h)
    assert _fd._rounding(eps, size, h, 0.0, 0.0, np.array([1e3 * eps * size]))[0] == pytest.approx(bound)
    assert _fd._rounding(eps, size, h, 0.0, 0.0, np.array([np.nan]))[0] == pytest.approx(bound)
    # the floor is a unit of the grid fn's values lie on, where given: a float32 loss of a bfloat16 model
    eps64 = float(np.finfo(np.float64).eps)
    assert _fd._rounding(eps, size, h, 0.0, 0.0, np.array([0.0]), np.array([eps64]))[0] == pytest.approx(
        4 * eps64 * size / h)
    assert _fd._rounding(eps, size, h, 0.0, 0.0, np.array([np.nan]), np.array([eps64]))[0] == pytest.approx(bound)


@pytest.mark.parametrize("h", [4e-3, 4e-4, 4e-5])
def test_a_float32_outputs_measured_rounding_still_bounds_the_error_and_is_far_below_the_generous_one(h):
    # f computed in float64, its output rounded to float32 (fn's loss in float32): sixteen points, the pool
    # measured from their own evaluations, as the checks measure it along a leaf (at coarser steps the truncation,
    # (h/2)⁴·f⁗, dominates the samples and the generous bound stays)
    eps32 = float(np.finfo(np.float32).eps)
    f = lambda x: float(np.float32(np.exp(np.sin(3 * x)) + 1.5))  # noqa: E731
    df = lambda x: 3 * math.cos(3 * x) * math.exp(math.sin(3 * x))  # noqa: E731
    xs = np.linspace(-1.1, 1.3, 16)
    Fs = [evaluations(f, x, h) for x in xs]
    pool = _fd._pooled_rounding(np.concatenate([_fd._fourth(f(x), F) for x, F in zip(xs, Fs, strict=True)]))
    assert eps32 * 0.05 < pool < 12 * eps32 * 3
    for x, F in zip(xs, Fs, strict=True):
        s = _fd._scale(f(x), F, np.array([h]), eps32, np.array([0.0]), measured=np.array([pool]))
        plain = _fd._scale(f(x), F, np.array([h]), eps32, np.array([0.0]))
        assert abs(s.value[0] - df(x)) <= s.err[0], (x, s.value[0], df(x), s.err[0])
        assert s.noise[0] < plain.noise[0] / 3


def test_an_unconfirmed_zero_gradient_is_not_said_to_disagree():
    # h110: autodiff and hand both 0, finite differences 0 ± something: the note spoke of "the disagreement", of 0.
    from funcgrad.verify._grad import _make_item, _note_for

    zero = _note_for(Verdict.FD_UNRELIABLE, _make_item("fd_unreliable", (3,), 0.0, 0.0, N=0.0), [])
    assert "disagreement" not in zero and "too wide to confirm" in zero and "at [3]" in zero, zero
    apart = _note_for(Verdict.FD_UNRELIABLE, _make_item("fd_unreliable", (3,), 1.0, 1.0, N=1.5), [])
    assert "not far enough below the disagreement" in apart, apart
