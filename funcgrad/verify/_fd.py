"""Finite differences on a ladder of step sizes, and the verdicts they give (host side, NumPy float64; no JAX here).

Along an item's direction ``u``, ``f`` is evaluated at ``theta + offset·step·u`` for each of :data:`_OFFSETS`
(the columns of ``F``: :data:`_MINUS_STEP`, :data:`_MINUS_HALF`, :data:`_PLUS_HALF`, :data:`_PLUS_STEP`), at
the steps of a ladder: the first step, then each :data:`_LADDER` times smaller, at most :data:`_MAX_SCALES` of
them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, NamedTuple

import numpy as np

from funcgrad.verify._report import Verdict

_CONFIDENT = 10.0  # finite differences are confident when a value lies this many error estimates away
# Where f is evaluated along an item's direction, in steps; the columns of F, in this order.
_OFFSETS = (-1.0, -0.5, 0.5, 1.0)
_MINUS_STEP, _MINUS_HALF, _PLUS_HALF, _PLUS_STEP = range(len(_OFFSETS))
_LADDER = 10.0  # each finer scale divides the step by this
_MAX_SCALES = 5  # the finest step is the first one / 10⁴
# A kink is read at the point only when each side's extrapolated one-sided derivative changes between two scales
# by at most this fraction of the interval: at a kink on the point they agree to rounding (the extrapolation removes
# the curvature beside it), while a kink a little off the point, within the steps only, moves them by about
# 30·(distance / step) between scales (max(w) at w = [1, 1 + 1e-6]: 0.996, then 0.96), and finer steps resolve it.
_KINK_STABILITY = 0.02
# ... and their rounding allowance is at most this fraction of it (a kink well above the rounding).
_KINK_NOISE = 0.25
_KINK_REPEATED = 0.005  # ... or a coarser scale's clear kink repeated by the finer scale to this part of its jump
_SIDED_JUMP = 0.01  # a kink only the one-sided test sees is at least this fraction of its one-sided derivatives


@dataclasses.dataclass
class _FD:
    """Finite-difference readings for a batch of items.

    A smooth reading is ``value ± err`` (then ``lo == hi == value``); a kink reading is the interval
    ``[lo, hi]`` between the one-sided derivatives, each known to ``± err``."""

    value: np.ndarray  # the central (Richardson-extrapolated) derivative estimate
    err: np.ndarray  # the reading's error: truncation, rounding, and disagreement between scales
    lo: np.ndarray  # the accepted interval (smooth: the value itself)
    hi: np.ndarray
    nonsmooth: np.ndarray  # a kink at the point: the one-sided derivatives differ
    finite: np.ndarray  # every evaluation used was finite
    resolved: np.ndarray  # a reading was made: two consecutive scales agreed, or (last resort) one clean scale
    singular: np.ndarray  # the difference quotients grow without bound as the step shrinks
    paired: np.ndarray  # the reading comes from two consecutive scales (required to blame both sides)
    near_kink: np.ndarray  # some scale saw a kink within its step (at the point or right next to it)
    # the hull of those scales' one-sided derivatives (NaN where none): values a kink near the point can explain
    near_lo: np.ndarray | None = None
    near_hi: np.ndarray | None = None

    def take(self, sel: Any) -> _FD:
        parts: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        taken: dict[str, Any] = {k: None if v is None else v[sel] for k, v in parts.items()}
        return _FD(**taken)


class _Scale(NamedTuple):
    """Differences at one step h, per item."""

    value: np.ndarray  # Richardson-extrapolated central difference
    err: np.ndarray  # its error estimate
    noise: np.ndarray  # rounding error of a difference quotient at step h/2
    rp: np.ndarray  # the right derivative D₊, Richardson-extrapolated from one-sided quotients at h and h/2
    rm: np.ndarray  # the left derivative D₋, likewise
    nonsmooth: np.ndarray  # the one-sided quotients say: a kink within the step
    sided: np.ndarray  # the one-sided derivatives differ beyond rounding (a kink, or a smooth function's h³ terms)
    finite: np.ndarray  # all four evaluations and f0 are finite
    quotient: np.ndarray  # the largest finite one-sided quotient at h/2 (NaN when none is finite)
    os_change: np.ndarray  # how much the one-sided quotients change between h and h/2 (the larger side)


_ROUNDING = 12.0  # the rounding of one evaluation of fn, assumed (generously) when unmeasured: this many eps_f·|f|
_NOISE_MARGIN = 3.0  # a measured rounding (the RMS of fourth differences) is taken this many times over
_POOL_MIN = 8  # the fewest informative fourth differences a leaf's measured rounding rests on


def _fourth(f0: float, F: np.ndarray) -> np.ndarray:
    """|Δ⁴f| / √70 per item over the points −h, −h/2, 0, h/2, h (NaN where a value is not finite): a sample of
    one evaluation's rounding error, plus the (h/2)⁴·f⁗ / √70 truncation that makes it larger, never smaller,
    at coarse steps."""
    with np.errstate(invalid="ignore", over="ignore"):
        d4 = (F[:, _MINUS_STEP] - 4 * F[:, _MINUS_HALF] + 6 * f0 - 4 * F[:, _PLUS_HALF] + F[:, _PLUS_STEP]) / math.sqrt(70)
    return np.where(np.isfinite(d4), np.abs(d4), np.nan)


def _informative(f0: float, F: np.ndarray) -> np.ndarray:
    """The items whose five values are finite and not all equal: their fourth difference samples the rounding
    (where f does not change at all along the item, it says nothing about the rounding elsewhere)."""
    return np.isfinite(F).all(axis=1) & math.isfinite(f0) & ~np.all(F == f0, axis=1)  # noqa: SIM300


def _pooled_rounding(samples: np.ndarray) -> float:
    """The rounding of one evaluation of fn, measured along a leaf: :data:`_NOISE_MARGIN` times the RMS of the
    fourth differences ``samples`` (:func:`_fourth` of informative items), NaN below :data:`_POOL_MIN` of them.

    Rounding errors at nearby points behave as independent draws (Moré and Wild, "Estimating computational noise",
    2011): the RMS of eight or more samples is below a third of the true one with probability about 10⁻³, and
    truncation only ever adds to it. fn's output rounded to float32 measures 0.3-0.5 eps_f·|f| here, where
    :data:`_ROUNDING` assumes 12."""
    samples = samples[np.isfinite(samples)]
    if len(samples) < _POOL_MIN:
        return math.nan
    return _NOISE_MARGIN * float(np.sqrt(np.mean(samples**2)))


def _rounding(eps_f, size, h, mag, quotient, measured=None, quantum=None):
    """The rounding error of a difference quotient at step h/2: fn's output, of size ``size``, to ``eps_f``
    (generously: :data:`_ROUNDING` units), or to the rounding ``measured`` along the item where that is known and
    smaller, but at least one unit of the grid fn's values lie on (``quantum``, an eps: their dtype's, or a coarser
    one's that holds them all; ``eps_f`` when not given); and the point's own rounding, ``mag`` (|θ| of an element)
    times the slope ``quotient``."""
    delta = _ROUNDING * eps_f * size  # one evaluation's rounding; a quotient at h/2 carries twice it over h/2
    if measured is not None:
        grid = (eps_f if quantum is None else quantum) * size
        with np.errstate(invalid="ignore"):
            delta = np.where(np.isfinite(measured), np.minimum(delta, np.maximum(measured, grid)), delta)
    return 4 * delta / h + 4 * eps_f * (mag + h) * quotient / h


def _scale(f0: float, F: np.ndarray, h: np.ndarray, eps_f: float, tol: np.ndarray,
           mag: np.ndarray | float = 0.0, measured: np.ndarray | None = None,
           quantum: np.ndarray | None = None) -> _Scale:
    """Differences at one step h (central at h and h/2, one-sided at both) and what they say.

    Rounding: fn's output to ``eps_f`` of its size (generously), or as measured (``measured``: the pooled rounding
    of one evaluation along the item's leaf, see :func:`_pooled_rounding`, NaN where unknown; this scale's own
    fourth difference, :data:`_NOISE_MARGIN` times over, counts too; never below a unit of ``quantum``, the grid
    fn's values lie on, see :func:`_rounding`), and, where fn rounds the parameter itself
    to that precision (a float32 rule's input, a cast to bfloat16), the point's own rounding: θ + t is off by up to
    eps·|θ + t|/2, which moves f by that much times its slope (``mag``: |θ|, the element's size; sin at
    θ = 3000 in float32 is 3000 times noisier along θ than its value's rounding says)."""
    f_minus, f_minus_half = F[:, _MINUS_STEP], F[:, _MINUS_HALF]  # f at theta − h·u, theta − h/2·u
    f_plus_half, f_plus = F[:, _PLUS_HALF], F[:, _PLUS_STEP]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        central = (f_plus - f_minus) / (2 * h)  # central, step h
        central_half = (f_plus_half - f_minus_half) / h  # central, step h/2
        rich = (4 * central_half - central) / 3  # Richardson: the h² error terms cancel
        right, left = (f_plus - f0) / h, (f0 - f_minus) / h  # one-sided quotients, step h
        right_half, left_half = (f_plus_half - f0) / (h / 2), (f0 - f_minus_half) / (h / 2)  # and step h/2
        # One-sided Richardson: D(h/2) = D + f''·h/4 + O(h²), D(h) = D + f''·h/2 + O(h²), so 2·D(h/2) − D(h)
        # has no O(h) bias: the exact one-sided derivative at a kink with curvature beside it.
        rp, rm = 2 * right_half - right, 2 * left_half - left
        size = np.maximum(np.max(np.where(np.isfinite(F), np.abs(F), 0.0), axis=1), abs(f0))
        q = np.stack([np.where(np.isfinite(right_half), np.abs(right_half), np.nan),
                      np.where(np.isfinite(left_half), np.abs(left_half), np.nan)])
        quotient = np.where(np.isnan(q).all(axis=0), np.nan, np.nanmax(np.where(np.isnan(q), -np.inf, q), axis=0))
        if measured is not None:  # (this scale's own sample counts too: a rounding above the leaf's typical one)
            # An item along which f does not change at all at this step may sit on a step of a staircase (a float16
            # part of fn that one element alone feeds, beside elements that carry float32's rounding): its
            # difference quotients read 0, whatever the slope, and it keeps the generous bound.
            measured = np.where(_informative(f0, F), np.maximum(measured, _NOISE_MARGIN * _fourth(f0, F)), np.nan)
        noise = _rounding(eps_f, size, h, mag, np.nan_to_num(quotient), measured, quantum)
        asym, asym_half = right - left, right_half - left_half
        defect = asym - 2 * asym_half  # O(h³) for a smooth function, O(jump) with a kink within the step
        finite = np.isfinite(F).all(axis=1) & np.isfinite(f0)
        # (defect = D₋ − D₊ as rp and rm extrapolate them.) Sided: beyond rounding. Nonsmooth: also a tenth of the
        # asymmetry, which curvature dominates at coarse steps: a kink of 2e-9 beside a curvature of 1e-3 is only
        # sided there, and then the two scales' one-sided derivatives must agree for a kink reading (see _resolve).
        sided = finite & (np.abs(defect) > np.maximum(12 * noise, tol))
        nonsmooth = sided & (np.abs(defect) > 0.1 * np.abs(asym))
        os_change = np.maximum(np.abs(right_half - right), np.abs(left_half - left))
        err = np.abs(central - central_half) / 3 + noise
    return _Scale(rich, err, noise, rp, rm, nonsmooth, sided, finite, quotient, os_change)


def _resolve(scales: list[_Scale], tol: np.ndarray, f0: float, final: bool = False) -> _FD:
    """Reads the ladder: each pair of consecutive scales may resolve the derivative, and the pair with the
    smallest uncertainty wins.

    Smooth: both scales smooth and their estimates agree within their errors (uncertainty: the error).
    Kink: the coarser scale sees a kink, and each side's Richardson-extrapolated one-sided derivative is the
    same at both scales (their change is its error) while the two sides stay clearly apart; the interval between them
    is accepted (uncertainty: half its width plus the error); or, with curvature hiding a small kink from the
    smoothness test, both scales' one-sided derivatives differ beyond rounding by 1% of themselves, stably (the
    item's smooth readings are then its midpoint, and none is taken). Kinks near the point, within the larger step
    only, make the scales disagree or inflate their error, and a finer pair wins. A pair that a finer scale,
    smooth on its own, contradicts is not read (steps spanning periods). Items that no pair resolves are singular
    when their one-sided quotients keep growing as the step shrinks.

    ``final`` (the ladder is exhausted): an item still unresolved, and not singular, is read from the finest
    scale alone (kinks a little off the point, within the coarser steps, spoil every pair of scales, and
    several of them can even cancel in a coarse step's smoothness test; the finest step sees the fewest).
    Such a reading never blames both sides at once."""
    n = len(tol)
    out = _FD(np.full(n, np.nan), np.full(n, np.inf), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool),
              np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool),
              *_near_kink(scales, tol))
    best = np.full(n, np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        pairs = [_pair(s0, s1, tol) for s0, s1 in itertools.pairwise(scales)]
        # A kink that only the one-sided test sees, beside a curvature that hides it from the smoothness test: the
        # pairs that pass as smooth read its midpoint, not a derivative, with small error bars; none is read.
        hidden = np.logical_or.reduce([p.hidden for p in pairs]) if pairs else np.zeros(n, bool)
        for k, p in enumerate(pairs):
            # A reading that a finer scale, smooth on its own, contradicts was made out of the steps' asymptotic range: sin at
            # 3000 in float32, its steps of 123 and 12 span periods, and both scales give ~0 with small error bars.
            # (Its error counts the spread of its one-sided derivatives too: a finer scale whose rounding fn's value
            # understates, a variance as mean(w²) − mean(w)² at w ≈ 1000, is off by more than its error bars, and
            # its one-sided derivatives differ by that much.)
            contradicted = np.zeros(n, bool)
            for s in scales[k + 2 :]:
                slack = 2 * (p.err + s.err + np.abs(s.rp - s.rm)) + tol
                contradicted |= s.finite & ~s.nonsmooth & ((s.value < p.lo - slack) | (s.value > p.hi + slack))
            win = ((p.smooth & ~hidden) | p.kink) & ~contradicted & (p.unc < best)
            best[win] = p.unc[win]
            out.value[win] = p.value[win]
            out.err[win] = p.err[win]
            out.lo[win], out.hi[win] = p.lo[win], p.hi[win]
            out.nonsmooth[win] = p.kink[win]
            out.finite[win] = True
            out.resolved[win] = out.paired[win] = True
        todo = ~out.resolved
        if todo.any():
            # Unresolved: no pair settles (kinks all around the point, noise, a discontinuity, non-finite values).
            # Accept anything within the estimates of the two finest scales, widened by their disagreement; such
            # readings never blame a side with confidence.
            s0, s1 = scales[-2] if len(scales) > 1 else scales[-1], scales[-1]
            gap = np.abs(s0.value - s1.value)
            cand = np.stack([s0.rp, s1.rp, s0.rm, s1.rm, s1.value])
            cand = np.where(np.isfinite(cand), cand, np.nan)
            none = np.isnan(cand).all(axis=0)
            lo = np.where(none, np.nan, np.nanmin(np.where(np.isnan(cand), np.inf, cand), axis=0))
            hi = np.where(none, np.nan, np.nanmax(np.where(np.isnan(cand), -np.inf, cand), axis=0))
            out.value[todo] = s1.value[todo]
            out.err[todo] = (s0.err + s1.err + gap + 4 * (s0.noise + s1.noise))[todo]
            out.lo[todo], out.hi[todo] = lo[todo], hi[todo]
            out.nonsmooth[todo] = True
            out.finite[todo] = (s0.finite & s1.finite)[todo]
            # Singular: the one-sided quotients grow steadily across at least three scales, far above rounding
            # (sqrt at 0: ×√10 a step; log-like: slower, but steadily); a discontinuity looks the same.
            if math.isinf(f0):  # the function itself is singular at the point
                out.singular[todo] = True
            elif len(scales) >= 3:
                Q = np.stack([s.quotient for s in scales])
                growing = np.all(Q[1:] >= 1.05 * Q[:-1], axis=0) & (Q[-1] >= 2 * Q[0])
                out.singular[todo] = (np.isfinite(Q).all(axis=0) & growing & (Q[-1] > 1000 * s1.noise))[todo]
            if final:
                _single_scale(scales, out, todo & ~out.singular)
    return out


class _Pair(NamedTuple):
    """What two consecutive scales read together, per item."""

    smooth: np.ndarray  # both smooth, and their values agree within their errors
    kink: np.ndarray  # a kink at the point: each side's one-sided derivative is the same at both scales
    hidden: np.ndarray  # such a kink that only the one-sided test sees (both scales pass as smooth)
    value: np.ndarray  # the finer scale's value
    lo: np.ndarray  # the reading: the kink's interval, or the value
    hi: np.ndarray
    err: np.ndarray  # its error
    unc: np.ndarray  # its uncertainty (a kink: half its width plus the error)


def _pair(s0: _Scale, s1: _Scale, tol: np.ndarray) -> _Pair:
    """Reads two consecutive scales (see :func:`_resolve`)."""
    both = s0.finite & s1.finite
    gap = np.abs(s0.value - s1.value)
    smooth = both & ~s0.nonsmooth & ~s1.nonsmooth & (gap <= 2 * (s0.err + s1.err) + tol)
    moves = np.maximum(np.abs(s0.rp - s1.rp), np.abs(s0.rm - s1.rm))
    kerr = moves + 2 * (s0.noise + s1.noise)
    lo, hi = np.minimum(s1.rp, s1.rm), np.maximum(s1.rp, s1.rm)
    # (The finer scale's own smoothness test may lack the power to see a small jump through its larger rounding
    # error; its one-sided estimates agreeing with the coarser scale's are the evidence. Sided at both scales: a
    # kink too small beside the curvature for the coarser scale's smoothness test. A smooth function's h³ terms
    # shrink a thousandfold from one scale to the next: they never agree so.)
    # (Sided only, the jump must be a sizeable part of the derivative too, 1%: rounding that fn's value understates,
    # a variance as mean(w²) − mean(w)² at w ≈ 1000, makes smooth one-sided derivatives differ stably by 1e-4 of
    # themselves.)
    sided = s0.sided & s1.sided & (hi - lo >= _SIDED_JUMP * np.maximum(np.abs(lo), np.abs(hi)))
    # (A kink the coarser scale sees beyond its rounding, whose one-sided derivatives the finer scale repeats to
    # within a small part of the jump, is read though the finer scale's rounding, as assumed, could hide it: noise
    # that large would not repeat both sides so closely. A float32 rule's primal at integer inputs, whose value's
    # rounding mostly cancels in the differences, is read so, rather than as smooth with wide error bars.)
    stable = s0.nonsmooth & (moves <= _KINK_REPEATED * (hi - lo))
    kink = (both & (s0.nonsmooth | sided) & (moves <= _KINK_STABILITY * (hi - lo))
            & ((kerr - moves <= _KINK_NOISE * (hi - lo)) | stable))
    err = np.where(kink, kerr, s0.err + s1.err + gap)
    return _Pair(smooth, kink, kink & ~s0.nonsmooth, s1.value, np.where(kink, lo, s1.value),
                 np.where(kink, hi, s1.value), err, np.where(kink, (hi - lo) / 2 + kerr, err))


def _near_kink(scales: list[_Scale], tol: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whether some scale saw a kink within its step that the finer scales bear out (a finer scale that is smooth on
    its own reads one of that scale's one-sided derivatives: a kink a little off the point, whose one side the
    finer steps see), and the hull of those scales' one-sided derivatives (NaN where none). Steps spanning the
    periods of sin(10⁶·w) look kinked and give an interval that has nothing to do with the derivative there; they
    do not count, and a value far outside the hull is not explained by a kink."""
    n = len(tol)
    near, hull_lo, hull_hi = np.zeros(n, bool), np.full(n, np.inf), np.full(n, -np.inf)
    with np.errstate(invalid="ignore"):
        for k, s in enumerate(scales):
            lo, hi = np.minimum(s.rp, s.rm), np.maximum(s.rp, s.rm)
            refuted = np.zeros(n, bool)
            for f in scales[k + 1 :]:
                slack = 2 * (s.err + f.err) + tol
                # (the finer steps see one side of a kink a little off the point: their value is one of its two)
                refuted |= f.finite & ~f.nonsmooth & ~(np.abs(f.value - s.rp) <= slack) & ~(np.abs(f.value - s.rm) <= slack)
            seen = s.nonsmooth & ~refuted & np.isfinite(lo) & np.isfinite(hi)
            near |= seen
            hull_lo = np.where(seen, np.minimum(hull_lo, lo - 2 * s.err), hull_lo)
            hull_hi = np.where(seen, np.maximum(hull_hi, hi + 2 * s.err), hull_hi)
    return near, np.where(near, hull_lo, np.nan), np.where(near, hull_hi, np.nan)


def _single_scale(scales: list[_Scale], out: _FD, todo: np.ndarray) -> None:
    """The last resort for ``todo`` items (in place): the finest scale with finite values, read as the interval
    between its two Richardson one-sided derivatives, each known to within three times the change of its
    one-sided quotients between h and h/2 plus rounding. A smooth function gives a point (both sides agree);
    a kink gives its interval; a spoiled scale gives a wide error, never a wrong interval."""
    todo = todo.copy()
    with np.errstate(invalid="ignore", over="ignore"):
        for s in reversed(scales):
            win = todo & s.finite & np.isfinite(s.rp) & np.isfinite(s.rm)
            kerr = 3 * s.os_change + 2 * s.noise
            lo, hi = np.minimum(s.rp, s.rm), np.maximum(s.rp, s.rm)
            out.value[win] = s.value[win]
            out.err[win] = kerr[win]
            out.lo[win], out.hi[win] = lo[win], hi[win]
            out.nonsmooth[win] = (hi - lo > kerr)[win]
            out.finite[win] = out.resolved[win] = True
            todo &= ~win


_OUTER = (_MINUS_STEP, _PLUS_STEP)  # the columns a costly function's first reading evaluates (see _outer_reading)
_OUTER_STEP = 4.0  # ... at the ladder's first step over this: a sixteenth of its truncation, four times its rounding


def _outer_reading(f0: float, F: np.ndarray, h: np.ndarray, eps_f: np.ndarray | float, tol: np.ndarray,
                   mag: np.ndarray | float, values: list[np.ndarray],
                   also: np.ndarray | None = None) -> tuple[np.ndarray, _FD]:
    """A costly function's first reading, from f at ±h alone (F's :data:`_OUTER` columns; the others are not
    evaluated), h the ladder's first step over :data:`_OUTER_STEP`: the items it settles, and their reading.

    It settles an item where every analytic value (``values``, and ``also`` where it is not NaN: forward mode,
    along some items only) lies within the tolerance of the central difference D = (f(+h) − f(−h))/2h, where D's
    rounding (as :func:`_scale` bounds it: generously) is within the tolerance too, and where the two one-sided
    quotients differ by at most half their size (or the rounding, or the tolerance): a kink within the step differs
    so from a smooth slope, and at a kink the central difference is a weighted mean of the two sides, which a
    correct value (one side) does not match. What the ladder's four offsets would add is an estimate of the
    truncation error (the third derivative times h²/6 here, a sixteenth of the first step's): a value off by just
    that much, within the tolerance, settles; so the check reads this way only with a hand, which autodiff and hand
    must then both be off by (see :meth:`_Engine.ladder`). Everything else is read on the ladder, as a cheap
    function's items are."""
    f_minus, f_plus = F[:, _MINUS_STEP], F[:, _PLUS_STEP]
    n = len(F)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        central = (f_plus - f_minus) / (2 * h)
        right, left = (f_plus - f0) / h, (f0 - f_minus) / h
        size = np.maximum(np.maximum(np.abs(f_minus), np.abs(f_plus)), abs(f0))
        quotient = np.maximum(np.abs(right), np.abs(left))
        noise = _rounding(eps_f, size, h, mag, quotient)  # (as _scale counts it at h/2: twice a quotient at h's)
        finite = np.isfinite(f_minus) & np.isfinite(f_plus) & np.isfinite(f0) & np.isfinite(central)
        smooth = np.abs(right - left) <= np.maximum(np.maximum(12 * noise, tol), 0.5 * quotient)
        settled = finite & smooth & (noise <= tol)
        for v in values:
            settled &= np.abs(v - central) <= tol
        if also is not None:
            settled &= np.isnan(also) | (np.abs(also - central) <= tol)
    zeros = np.zeros(n, bool)
    fd = _FD(central, noise, central.copy(), central.copy(), zeros.copy(), settled.copy(), settled.copy(), zeros.copy(),
             zeros.copy(), zeros.copy(), np.full(n, np.nan), np.full(n, np.nan))
    return settled, fd


def _merge(n: int, parts: list[tuple[np.ndarray, _FD]]) -> _FD:
    """One reading of ``n`` items from readings of disjoint subsets (each: its items' positions, its reading)."""
    fields = [f.name for f in dataclasses.fields(_FD)]
    out: dict[str, Any] = {}
    for name in fields:
        first = getattr(parts[0][1], name)
        dtype = bool if first is not None and first.dtype == bool else np.float64
        arr = np.zeros(n, bool) if dtype is bool else np.full(n, np.nan)
        for sel, fd in parts:
            part = getattr(fd, name)
            if part is not None:
                arr[sel] = part
        out[name] = arr
    return _FD(**out)


def _consistent(v: np.ndarray, fd: _FD, tol: np.ndarray) -> np.ndarray:
    """Whether values agree with finite differences: within the reading's interval (a point when smooth),
    widened by twice its error and the analytic tolerance."""
    with np.errstate(invalid="ignore"):
        slack = 2 * fd.err + tol
        inside = (v >= fd.lo - slack) & (v <= fd.hi + slack)
    return fd.finite & np.isfinite(v) & inside


def _confirms(v: np.ndarray, fd: _FD, tol: np.ndarray, scale: float = 0.0) -> np.ndarray:
    """Whether finite differences confirm a value to about the analytic tolerance ``tol`` (from the gradients'
    scale, without finite differences' noise floor): within the reading's interval, widened by its error counted at
    most up to ``tol``, and ``tol``. A reading whose error bars (or noise floor) are much wider than the tolerance is
    consistent with a value that is wrong by several tolerances; with nothing else to compare with (no hand), such
    a value is not confirmed."""
    with np.errstate(invalid="ignore"):
        # (a zero tolerance, every gradient exactly 0, gives no scale: the reading's own error is the measure)
        slack = 2 * np.where(tol > 0, np.minimum(fd.err, tol), fd.err) + tol
        inside = (v >= fd.lo - slack) & (v <= fd.hi + slack)
        # Error bars wider than the tolerance and than a thousandth of the value (or of the gradient's scale,
        # ``scale``) confirm nothing (bfloat16 inside fn: a rule 20% off sat within three tolerances of such a
        # reading); a float64 reading a millionth wide confirms a small gradient that its tolerance is below.
        precise = (tol <= 0) | (fd.err <= tol) | (fd.err <= 1e-3 * np.maximum(np.abs(v), scale))
    return fd.finite & np.isfinite(v) & inside & precise


def _confidently_off(v: np.ndarray, fd: _FD, tol: np.ndarray) -> np.ndarray:
    """Whether finite differences rule a value out with confidence: a resolved reading whose error estimate
    is far (``_CONFIDENT``×) below the value's distance from it, or a non-finite value where the reading is
    finite."""
    with np.errstate(invalid="ignore"):
        far = _CONFIDENT * fd.err + tol
        off = ~np.isfinite(v) | (v < fd.lo - far) | (v > fd.hi + far)
    return fd.paired & fd.finite & ~fd.singular & off


def _inside(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return (v >= lo) & (v <= hi)


def _classify(A: np.ndarray, H: np.ndarray | None, fd: _FD, tol: np.ndarray,
              lenient: np.ndarray | bool = False, tol_ah: np.ndarray | None = None,
              reference: bool = False, scale: float = 0.0) -> np.ndarray:
    """Per-item verdicts from autodiff A, hand H (or None) and finite differences: the side that disagrees
    with the other two is wrong; both, when they agree with each other and confident finite differences
    rule them out.

    ``lenient`` items are random directions. Along a direction through several kinks at once (ties, ReLUs at
    0 in several coordinates), a valid choice of one-sided derivative per coordinate need not lie between the
    directional one-sided derivatives, so finite differences cannot judge there: such items are "kink".

    ``tol`` bounds a value's distance from finite differences (it includes their noise floor); ``tol_ah``
    (default ``tol``) bounds autodiff's distance from hand, both computed in float64. ``reference``: hand is only a
    reference (verify.audit's plain autodiff of a rule's primal); where it is not finite, autodiff confidently off
    finite differences is wrong on its own."""
    tol_ah = tol if tol_ah is None else tol_ah
    kinked = fd.nonsmooth & fd.resolved & fd.finite
    with np.errstate(invalid="ignore"):
        # Lenient items at a kink accept a value up to twice the interval's width beyond it (several kinks of
        # opposite curvature along one direction widen the set of valid conventions); not any value: a wrong
        # rule whose direction happens to cross one kink must still fail.
        reach = 2 * (fd.hi - fd.lo) + 2 * fd.err + tol
        waive_a = kinked & lenient & (A >= fd.lo - reach) & (A <= fd.hi + reach)  # noqa: SIM300 - A: a value, not a constant
    waived = kinked & lenient
    fits = np.where(fd.resolved, np.where(fd.nonsmooth, Verdict.KINK, Verdict.OK), Verdict.FD_UNRELIABLE)
    ca = _consistent(A, fd, tol) | waive_a
    off_a = _confidently_off(A, fd, tol) & ~waived
    if H is None:
        # Nothing but finite differences to compare autodiff with: a pass needs them precise enough to confirm it.
        sure = _confirms(A, fd, tol_ah, scale) | waive_a
        out = np.where(ca, np.where(sure, fits, Verdict.FD_UNRELIABLE),
                       np.where(off_a, Verdict.AUTODIFF_WRONG, Verdict.MISMATCH))
        return np.where(fd.singular, Verdict.SINGULAR, out).astype(object)
    with np.errstate(invalid="ignore"):
        waive_h = kinked & lenient & (H >= fd.lo - reach) & (H <= fd.hi + reach)  # noqa: SIM300 - H: a value, not a constant
    ch = _consistent(H, fd, tol) | waive_h
    off_h = _confidently_off(H, fd, tol) & ~waived
    with np.errstate(invalid="ignore"):
        both_nf = ~np.isfinite(A) & ~np.isfinite(H)
        same_nf = both_nf & ((A == H) | (np.isnan(A) & np.isnan(H)))
        agree = (np.abs(A - H) <= tol_ah) | same_nf | (waive_a & waive_h)
    # A kink explains two values that differ only where finite differences know the derivative to within half its
    # size: a reading of 193 ± 606 says nothing about 0.28 against 3e-5 (float32 noise, a rule wrong by its sign).
    with np.errstate(invalid="ignore"):
        informative = fd.err <= 0.5 * np.maximum(np.abs(A), np.abs(H))
        # (a kink near the point explains values within the one-sided derivatives its scales saw, and no others)
        if fd.near_lo is None or fd.near_hi is None:
            explained = np.ones(len(A), bool)
        else:
            explained = _inside(A, fd.near_lo - tol, fd.near_hi + tol) & _inside(H, fd.near_lo - tol, fd.near_hi + tol)
    # (agreeing, they pass; but "ok" says finite differences confirm them, which a smooth reading whose error bars are
    # wider than the tolerance, than half the values and than half the whole gradient's scale does not: bfloat16
    # inside fn, where a mistake copied into the hand, 0 against a true 0.2, read "ok" beside 0.07 ± 1.4)
    with np.errstate(invalid="ignore"):
        sure = (fd.err <= np.maximum(0.5 * np.maximum(np.abs(A), np.abs(H)), np.maximum(tol, 0.5 * max(scale, 0.0)))
                ) | fd.nonsmooth | waive_a
    out = np.where(
        agree,
        np.where(ca, np.where(sure, fits, Verdict.FD_UNRELIABLE), np.where(off_a & off_h, Verdict.BOTH_WRONG,
                                    np.where(both_nf, Verdict.MISMATCH, Verdict.FD_UNRELIABLE))),
        # Both within the reading's error bars yet apart: a kink at or right next to the point whose sides
        # finite differences cannot separate, or else nothing to tell them apart.
        np.where(ca & ch, np.where(((fd.nonsmooth & fd.resolved) | (fd.near_kink & explained)) & informative, Verdict.KINK,
                                   Verdict.MISMATCH),
                 np.where(ca, Verdict.HAND_WRONG, np.where(ch, Verdict.AUTODIFF_WRONG, Verdict.MISMATCH))),
    )
    # Both outside a kink's one-sided interval: only possible, for correct code, where several kinks meet at
    # the point along this direction (ReLUs of several samples at 0 moving in opposite directions), where a
    # per-kink convention need not lie between D₋ and D₊; finite differences cannot judge such a point.
    # Bounded: hand may differ from autodiff (a valid convention) by at most autodiff's own distances from
    # D₋ and D₊ together (a hand of 1000 where [D₋, D₊] = [1, 2] and autodiff says 0 still fails).
    with np.errstate(invalid="ignore"):
        near = np.abs(A - H) <= np.abs(A - fd.lo) + np.abs(A - fd.hi) + 2 * fd.err + tol
    out = np.where(kinked & ~ca & ~ch & np.isfinite(A) & np.isfinite(H) & near & informative, Verdict.KINK, out)
    if reference:
        with np.errstate(invalid="ignore"):
            out = np.where(~np.isfinite(H) & np.isfinite(A) & off_a & ~ca, Verdict.AUTODIFF_WRONG, out)
            # (the reference off too, elsewhere, does not excuse autodiff confidently off finite differences: a rule
            # 20% off beside the rounding of a primal's plain autodiff read mismatch, h99)
            out = np.where((out == Verdict.MISMATCH) & off_a & off_h & ~agree & np.isfinite(A), Verdict.AUTODIFF_WRONG,
                           out)
    # At a singular point there is no derivative to be right about: sides that describe it alike pass.
    out = np.where(fd.singular, np.where(agree | both_nf, Verdict.SINGULAR, Verdict.MISMATCH), out)
    return out.astype(object)


def _default_rtol(eps: float) -> float:
    """max(1e-7, 3·√eps), capped at 5%: with bfloat16 inside fn, 3·√eps would be 27% and let a hand that
    is wrong by a quarter pass."""
    return min(0.05, max(1e-7, 3 * math.sqrt(eps)))
