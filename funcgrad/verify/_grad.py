"""check_grad: the float64 probe read out into a row per leaf. Finite differences beyond the compiled probe (finer
steps, arbitration of disagreeing elements, bisection of a failing projection), the check at the parameters' own
precision, and the notes that explain each verdict."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib.metadata as md
import inspect
import itertools
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad._checks import describe, in_range, nonfinite_entries, x64_enabled
from funcgrad.verify._compiled import (
    _CUSTOM,
    _dir_items,
    _dtype64,
    _Facts,
    _Group,
    _item_leaves,
    _Items,
    _items_jit,
    _lower,
    _make_plan,
    _measured_const,
    _Plan,
    _probe,
    _ProbeOut,
    _project_jit,
    _random_widths,
    _retain,
    _static_facts,
    _sub_jaxprs,
    _take_jit,
    _tolerance,
    _user_both,
    _user_grad,
    _user_hand,
)
from funcgrad.verify._fd import (
    _FD,
    _LADDER,
    _MAX_SCALES,
    _OFFSETS,
    _OUTER,
    _OUTER_STEP,
    _ROUNDING,
    _classify,
    _consistent,
    _default_rtol,
    _fourth,
    _informative,
    _merge,
    _outer_reading,
    _pooled_rounding,
    _resolve,
    _scale,
)
from funcgrad.verify._inputs import (
    _DTYPE_CLASH,
    _ISOLATE,
    _TRACE_ERRORS,
    _Bound,
    _bound,
    _check_value,
    _clean,
    _concrete_note,
    _concrete_tiers,
    _extract_grad,
    _first_line,
    _fresh,
    _host,
    _host_tree,
    _isolating,
    _Layout,
    _leaked_tracer,
    _main_output,
    _select,
    _split_args,
    _UndefinedValue,
    _untraceable,
    _UserTypeError,
    _UserValueError,
    _views,
    _x64,
)
from funcgrad.verify._report import _BLAMES, _FAILING, _LIST, GradReport, Row, Verdict, _combine_verdicts, _err_key
from funcgrad.verify._sides import _MIXED_PART, has_kinks, kink_sides
from funcgrad.verify._traced import trace_pair

# Disagreeing (or non-finite) elements per leaf arbitrated by finite differences, in rounds until one fails.
_ARBITRATION_ROUNDS = (8, 24, 96, 384)


_CHECKED: collections.OrderedDict = collections.OrderedDict()  # traces checked in this process, most recent last
_CHECKED_MAX = 64
_CHUNK = 1 << 18  # elements per host-side pass over a gradient: temporaries of a few MB, whatever the model's size
_TOP = sum(_ARBITRATION_ROUNDS) + 1  # disagreeing elements per leaf kept, worst first: all arbitration can reach


def _checked_before(key: Any) -> bool:
    """Whether the same trace (``key``: fn, hand, layout, argument shapes) was checked before in this process
    (the last :data:`_CHECKED_MAX` are remembered, by hash: nothing of the function is kept alive, and a collision
    only changes the plan, never a result). Repeated checks get the plan that compiles more and runs faster (see
    :func:`funcgrad.verify._compiled._make_plan`)."""
    key = hash(key)
    seen = key in _CHECKED
    _CHECKED[key] = None
    _CHECKED.move_to_end(key)
    while len(_CHECKED) > _CHECKED_MAX:
        _CHECKED.popitem(last=False)
    return seen


def _tolerances(a: np.ndarray, h: np.ndarray | None, leaf_max: float, gmax: float, tp: tuple,
                fin: np.ndarray | None = None, zero: float = 0.0) -> np.ndarray:
    """Per-element analytic tolerances (autodiff against hand) of some elements of a leaf whose largest finite
    max(|a|, |h|) is ``leaf_max`` (``gmax`` over all leaves); ``tp`` = (rtol, atol, eps), as in the probe. ``fin``:
    where both are finite, when known."""
    rtol, atol, eps = tp
    if fin is None:
        fin = np.isfinite(a) if h is None else np.isfinite(a) & np.isfinite(h)
    everywhere = bool(fin.all())
    a_s = a if everywhere else np.where(fin, a, 0.0)
    mag = np.abs(a_s)
    if h is not None:
        mag = np.maximum(mag, np.abs(h if everywhere else np.where(fin, h, 0.0)))
    return np.add(*_tolerance(a_s, mag, leaf_max, gmax, rtol, atol, eps, xp=np, zero=zero))


def _first_step(eps_f: np.ndarray) -> np.ndarray:
    """Finite differences' first (relative) step for a rounding ``eps_f``: eps^(1/5), where Richardson's O(h⁴)
    truncation meets the rounding's eps/h."""
    return np.asarray(eps_f, np.float64) ** (1 / 5)


def _abs_max(x: np.ndarray, finite: np.ndarray) -> float:
    """The largest |x| over the elements ``finite`` marks (0 for none)."""
    return float(np.max(np.abs(x if finite.all() else np.where(finite, x, 0.0)), initial=0.0))


def _first_max(best: tuple | None, key: np.ndarray, c0: int, *extra: np.ndarray) -> tuple | None:
    """The running (largest key, its index, extra values there) over chunks: the first of equal keys wins, as
    np.argmax over the whole array would pick it."""
    if key.size == 0:
        return best
    j = int(np.argmax(key))
    if best is None or key[j] > best[0]:
        return (key[j], c0 + j, *(x[j] for x in extra))
    return best


@dataclasses.dataclass
class _LeafFacts:
    """What a leaf's float64 gradients say, read in one pass before they are freed (nothing of the leaf's size is
    kept, unless some element is not finite: then the random directions' mask)."""

    nonfinite: int = 0  # elements where autodiff or hand is not finite
    support: np.ndarray | None = None  # the random directions' mask, where some element is not finite
    empty_support: bool = False  # no element where both are finite: random directions have nothing to move
    order: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # to arbitrate, worst first
    n_order: int = 0  # elements to arbitrate in all (``order`` holds as many as arbitration can reach)
    n_reference_nonfinite: int = 0  # among them, where hand is only a reference and it alone is not finite
    extra: list[str] = dataclasses.field(default_factory=list)  # notes on the disagreements
    ref_max: dict[str, float] = dataclasses.field(default_factory=dict)  # per side: the largest finite |value|
    user: dict[str, tuple] = dataclasses.field(default_factory=dict)  # per side: (deviation, non-finite, index)
    user_at: dict[int, tuple] = dataclasses.field(default_factory=dict)  # index -> (autodiff, hand) there
    # per side: (elements, first flat index, its float64 value, dtype) where the float64 value overflows the side's
    # own dtype and the side gives an infinity of its sign there
    overflow: dict[str, tuple] = dataclasses.field(default_factory=dict)


# The grids fn's values may lie on, coarsest first: a value cast from one of them at the end (a loss summed in
# bfloat16, then cast to float32) is rounded to its grid, whatever dtype fn returns.
_GRIDS = tuple(jnp.dtype(d) for d in (jnp.float8_e5m2, jnp.float8_e4m3fn, jnp.bfloat16, jnp.float16, jnp.float32,
                                      jnp.float64))
_GRID_EPS = np.array([float(jnp.finfo(d).eps) for d in _GRIDS])


def _on_grid(values: np.ndarray, dtype) -> bool:
    """Whether every finite value is exactly representable in ``dtype``."""
    v = values[np.isfinite(values)]
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.all(v.astype(dtype).astype(np.float64) == v))


class _Pending(NamedTuple):
    """Finite differences dispatched to XLA, read by ``result()``; ``support``: the directions' supports they were
    planned with (a reading dispatched before the gradients were analysed holds where those did not change)."""

    support: tuple
    result: Callable[[], tuple[np.ndarray, np.ndarray]]


class _Engine:
    """Finite-difference evaluations (the probe's items, finer scales, arbitration, bisection), from the
    parameters at their own dtypes; and the values at the elements the check reads. The full float64 gradients
    are read once (:meth:`analyse`) and freed; only a bisection computes them again."""

    def __init__(self, prep, plan, res: _ProbeOut, seed, eps_f: np.ndarray, tp, regrad: Callable):
        layout = prep.layout
        self.fn, self.spec, self.layout, self.plan = prep.bound.value, prep.spec, layout, plan
        self.user_dtypes = prep.dtypes  # each leaf's own dtype
        self.params, self.dyn, self.seed = prep.dleaves, prep.dyn, seed
        self.default_tolerances = True  # neither rtol nor atol given (see _at_their_own_size)
        # Per leaf: the rounding finite differences along it carry, and their first step.
        self.eps_f, self.f0 = np.asarray(eps_f, np.float64), float(res.f0)
        self.h0 = _first_step(self.eps_f)
        # Per leaf: one evaluation's rounding, as assumed before the ladder measures it (see floor_at).
        self.rounding = (_ROUNDING * self.eps_f * max(abs(self.f0), 1e-300) if math.isfinite(self.f0)
                         else np.zeros_like(self.eps_f))
        # Per leaf: the fourth differences seen along it so far, and the rounding of one evaluation they measure
        # (NaN until enough of them; see _fd._pooled_rounding).
        self.samples: list[np.ndarray] = [np.empty(0) for _ in layout.sizes]
        self.measured = np.full(len(layout.sizes), np.nan)
        # ... and the grid fn's values along it lie on: an index into _GRIDS, the coarsest dtype that holds them all
        # so far (a float32 output cast from a bfloat16 loss lies on bfloat16's grid, and its rounding is that coarse)
        self.grid = np.zeros(len(layout.sizes), int)
        self.hand_reference = False  # hand is only a reference (verify.audit; see _classify)
        self.eps_grad = [0.0] * len(layout.sizes)  # per leaf, the rounding of the lowest precision its gradient meets
        self.tp = tp  # (a row per leaf, atol, eps) of the analytic tolerances (see _tolerance)
        self.leaf_max = np.asarray(res.leaf_max, np.float64)
        self.gmax = float(np.max(self.leaf_max, initial=0.0))
        self.zero = np.asarray(res.zero, np.float64)  # per leaf (see _zero_roundoff)
        # what a hand computing in a lower precision is allowed (see _hand_allowance): per leaf, at each element
        # (None: nothing), and along a random direction (their root mean square)
        self.allow_el: list[np.ndarray | None] = [None] * len(layout.sizes)
        self.allow = np.zeros(len(layout.sizes), np.float64)
        self.size = np.asarray(res.size, np.float64)  # per leaf (see _direction_size)
        self.support: list[np.ndarray | None] = [None] * len(layout.sizes)
        self.leaves = [_LeafFacts() for _ in layout.sizes]
        self.global_scale = 0.0  # the largest finite |autodiff| over all leaves
        # flat index -> (autodiff, hand, tolerance against finite differences, tolerance autodiff against hand)
        self.vals: dict[int, tuple[float, float, float, float]] = {}
        self._regrad = regrad  # the probe again: the float64 gradients (a bisection needs them whole)
        self._full: tuple[list, list | None] | None = None

    def tp_of(self, li: int) -> tuple[np.ndarray, float, float]:
        """(rtol row, atol, eps) of leaf ``li``'s analytic tolerances (see _tolerance)."""
        rtols, atol, eps = self.tp
        return rtols[li], atol, eps

    # -- the float64 gradients, read once --------------------------------------------------------------------

    def analyse(self, a: Sequence[np.ndarray], h: Sequence[np.ndarray] | None, items_flat: np.ndarray) -> None:
        """One pass over each leaf's gradients (in chunks): the elements where autodiff and hand disagree or are
        not finite (the worst first, for arbitration), the directions' support, the scales the user-precision
        check measures against, and the values at the planned elements and at those to arbitrate."""
        layout = self.layout
        for li, (o, s, shape) in enumerate(zip(layout.offsets, layout.sizes, layout.shapes, strict=True)):
            done = np.sort(items_flat[(items_flat >= o) & (items_flat < o + s)] - o)
            self._analyse_leaf(li, a[li], None if h is None else h[li], done, shape)
            self._store(o + np.concatenate([done, self.leaves[li].order - o]).astype(np.int64), li, a[li],
                        None if h is None else h[li])
        self.global_scale = max((lf.ref_max["autodiff"] for lf in self.leaves), default=0.0)

    def _analyse_leaf(self, li: int, a: np.ndarray, h: np.ndarray | None, done: np.ndarray, shape) -> None:
        lf, o, s = self.leaves[li], self.layout.offsets[li], self.layout.sizes[li]
        n_dis, gap_best, any_support = 0, None, False
        cand, bads = [], []
        ref_max = {"autodiff": 0.0, "hand": 0.0}
        for c0 in range(0, s, _CHUNK):
            ac = a[c0 : c0 + _CHUNK]
            hc = None if h is None else h[c0 : c0 + _CHUNK]
            fa = np.isfinite(ac)
            fh = None if hc is None else np.isfinite(hc)
            fin = fa if fh is None else fa & fh
            everywhere = bool(fin.all())
            ref_max["autodiff"] = max(ref_max["autodiff"], _abs_max(ac, fa))
            if hc is not None and fh is not None:
                ref_max["hand"] = max(ref_max["hand"], _abs_max(hc, fh))
            if not everywhere:
                if lf.support is None:
                    lf.support = np.ones(s, bool)
                lf.support[c0 : c0 + _CHUNK] = fin
            any_support |= everywhere or bool(fin.any())
            nonfinite = ~fin
            lf.nonfinite += 0 if everywhere else int(np.count_nonzero(nonfinite))
            some = not everywhere  # elements to arbitrate in this chunk (non-finite ones, at least)
            if hc is not None:
                tol_ah = _tolerances(ac, hc, self.leaf_max[li], self.gmax, self.tp_of(li), fin,
                                     self.zero[li] + self.allowed(li, slice(c0, c0 + _CHUNK)))
                with np.errstate(invalid="ignore"):
                    diff = np.abs(ac - hc)
                    dis = ~(diff <= tol_ah)
                # (both sides the same infinity: not a disagreement)
                real = dis if everywhere else dis & ~(~fa & (ac == hc))
                k = int(np.count_nonzero(real))
                some |= k > 0
                if k:
                    n_dis += k
                    gap = np.where(real, diff, -1.0)
                    gap_best = _first_max(gap_best, np.where(np.isnan(gap), np.inf, gap), c0, gap)
            else:
                dis = nonfinite
            if some:
                ci = np.nonzero(dis)[0]
                ci = ci[~np.isin(ci + c0, done)]  # elements the probe checks one by one already
                if len(ci):
                    bad = _badness(ac[ci], None if hc is None else hc[ci],
                                   None if hc is None else tol_ah[ci], nonfinite[ci], self.hand_reference)
                    lf.n_order += len(ci)
                    lf.n_reference_nonfinite += int(np.count_nonzero(bad == -1.0)) if self.hand_reference else 0
                    if len(ci) > _TOP:  # only the worst can be reached; kept in index order (ties: lower first)
                        keep = np.sort(np.argsort(-bad, kind="stable")[:_TOP])
                        ci, bad = ci[keep], bad[keep]
                    cand.append(ci + c0)
                    bads.append(bad)
        if cand:
            ci, bad = np.concatenate(cand), np.concatenate(bads)
            lf.order = o + ci[np.argsort(-bad, kind="stable")][:_TOP].astype(np.int64)
        lf.empty_support = s > 0 and not any_support
        lf.ref_max = ref_max
        self.support[li] = lf.support
        if h is not None and n_dis:
            assert gap_best is not None
            where = [int(j) for j in np.unravel_index(gap_best[1], shape)]
            largest = float(gap_best[2])
            lf.extra.append(f"autodiff and hand disagree at {n_dis} element(s); " + (
                f"the largest gap is {_g(largest)} at {where}" if math.isfinite(largest)
                else f"one side is not finite at {where}"))
        if lf.nonfinite:
            lf.extra.append(f"{lf.nonfinite} element(s) not finite in " + ("autodiff or hand" if h is not None else "autodiff")
                            + " (checked one by one; random projections skip them)")

    def _store(self, flat: np.ndarray, li: int, a: np.ndarray, h: np.ndarray | None) -> None:
        """Keeps autodiff, hand and the tolerances at these elements of leaf ``li`` (flat indices)."""
        if not len(flat):
            return
        loc = flat - self.layout.offsets[li]
        av = a[loc].astype(np.float64)
        hv = None if h is None else h[loc].astype(np.float64)
        tol_ah = _tolerances(av, hv, self.leaf_max[li], self.gmax, self.tp_of(li),
                             zero=self.zero[li] + self.allowed(li, loc))
        tol = tol_ah  # (finite differences' floor comes with each element's step: see floor_at)
        for k, i in enumerate(flat):
            self.vals[int(i)] = (float(av[k]), float("nan") if hv is None else float(hv[k]), float(tol[k]),
                                 float(tol_ah[k]))

    def allowed(self, li: int, where: Any) -> Any:
        """The allowance of a hand computing in a lower precision (see _hand_allowance) at these elements of leaf
        ``li`` (a slice or flat indices within it): 0.0 where there is none."""
        el = self.allow_el[li]
        return 0.0 if el is None else el[where]

    def user_side(self, side: str, u: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> None:
        """The parameters' own precision against float64 for one side (``u``: its gradient at the parameters'
        dtypes, per leaf): per leaf, the largest deviation relative to the scale, whether some element is
        finite in float64 only, and the element to show."""
        for li, s in enumerate(self.layout.sizes):
            lf = self.leaves[li]
            scale = max(lf.ref_max[side] if s else 0.0, self.global_scale, 1e-300)
            dev_max, nonfinite, best = 0.0, False, None
            # (a float64 value beyond the largest of the side's own dtype overflows there whoever computes it: an
            # infinity of its sign is not a defect of the side; a float16 gradient of 65536 is inf)
            big = float(jnp.finfo(u[li].dtype).max) if jnp.issubdtype(u[li].dtype, jnp.floating) else np.inf
            for c0 in range(0, s, _CHUNK):
                uc = np.asarray(u[li][c0 : c0 + _CHUNK]).astype(np.float64)
                rc = ref[li][c0 : c0 + _CHUNK]
                with np.errstate(invalid="ignore"):
                    dev = np.abs(uc - rc)
                fd = np.isfinite(dev)
                if fd.all():  # (then u is finite wherever the float64 value is)
                    dev_max = max(dev_max, float(np.max(dev)))
                    best = _first_max(best, dev, c0, rc)
                    continue
                dev_max = max(dev_max, float(np.max(np.where(fd, dev, 0.0))))
                over = np.isfinite(rc) & (np.abs(rc) > big) & (uc == np.copysign(np.inf, rc))
                nf = ~np.isfinite(uc) & np.isfinite(rc) & ~over
                if over.any():
                    n0, first, v0, _ = lf.overflow.get(side, (0, None, None, None))
                    k = int(np.argmax(over))
                    lf.overflow[side] = (n0 + int(over.sum()), first if first is not None else c0 + k,
                                         v0 if v0 is not None else float(rc[k]), str(u[li].dtype))
                nonfinite |= bool(nf.any())
                best = _first_max(best, np.where(nf, np.inf, np.where(fd, dev, 0.0)), c0, rc)
            lf.user[side] = (dev_max / scale if s else 0.0, nonfinite, None if best is None else (best[1], float(best[2])))

    def user_values(self, a_user: Sequence[np.ndarray], h_user: Sequence[np.ndarray] | None) -> None:
        """The gradients at the parameters' own precision at the elements the user-precision check would show."""
        for li, lf in enumerate(self.leaves):
            for _, _, best in lf.user.values():
                if best is not None:
                    i = best[0]
                    lf.user_at[i] = (float(a_user[li][i]), None if h_user is None else float(h_user[li][i]))

    # -- values at elements ----------------------------------------------------------------------------------

    def floor_at(self, li: Any, step: Any) -> np.ndarray:
        """The smallest derivative finite differences resolve along an item of leaf ``li`` whose first step is
        ``step`` (absolute: h0 times the element's size, or the direction's, when above 1): nothing below it is wrong.
        Four times fn's rounding of one evaluation over the step: assumed generously, 12·eps·|f(θ)|, or as measured
        along the leaf once the ladder has (see _fd._rounding, whose bound it is at the first step: never above the
        assumed one, never below a unit of the grid fn's values lie on).

        (The relative first step alone overstated it by the element's size, and a float32 rule's derivative 10% off
        at an input of 800 passed; with bfloat16 inside fn the assumed rounding, 1.08 where the ladder measured
        6e-5, let autodiff and hand both 0 pass beside finite differences reading −0.663 ± 0.05.)"""
        li = np.asarray(li)
        assumed = self.rounding[li]
        with np.errstate(invalid="ignore"):
            grid = self.quantum(li) * max(abs(self.f0), 1e-300) if math.isfinite(self.f0) else assumed
            measured = np.where(np.isfinite(self.measured[li]), np.maximum(self.measured[li], grid), np.inf)
        return 4 * np.minimum(assumed, measured) / np.maximum(np.asarray(step, np.float64), 1e-300)

    def values(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Autodiff, hand (NaN without one), the tolerance against finite differences (without their floor: see
        :meth:`floor_at`) and that of autodiff against hand, at these flat indices."""
        flat = np.asarray(flat, np.int64)
        missing = [int(i) for i in flat if int(i) not in self.vals]
        if missing:  # a bisection's element: the gradients again
            a, h = self.full()
            for i in missing:
                li = int(np.searchsorted(np.array(self.layout.offsets), i, side="right") - 1)
                self._store(np.array([i]), li, a[li], None if h is None else h[li])
        v = np.array([self.vals[int(i)] for i in flat], np.float64).reshape(-1, 4)
        return v[:, 0], v[:, 1], v[:, 2], v[:, 3]

    def full(self) -> tuple[list, list | None]:
        """The float64 gradients per leaf, computed again (a bisection needs whole leaves)."""
        if self._full is None:
            res = self._regrad()
            self._full = ([np.asarray(x) for x in res.a], None if res.h is None else [np.asarray(x) for x in res.h])
        return self._full

    def theta(self, flat: np.ndarray) -> np.ndarray:
        """The parameters at these flat indices, in float64 (read from the leaves on the device)."""
        flat = np.asarray(flat, np.int64)
        size = max(8, 1 << max(0, (len(flat) - 1).bit_length()))
        return np.asarray(_take_jit(self.params, np.resize(flat, size).astype(np.int32), layout=self.layout))[: len(flat)]

    # -- finite differences ----------------------------------------------------------------------------------

    def evaluate(self, items: _Items, want: np.ndarray | None = None, pad: bool = True,
                 leaves: np.ndarray | None = None, cols: tuple[int, ...] | None = None,
                 later: bool = False) -> Any:
        """f along the given items (at the offsets ``cols`` only, F's other columns NaN, when given), and the
        forward-mode derivative along those ``want`` marks (NaN elsewhere).
        The items go in the plan's runs (``leaves``: each item's leaf, found from the items when not given), each
        padded to a power of two (so that few shapes are compiled) unless told not to. Padded evaluations of a
        plan whose runs share a program go in one run over all the leaves: a program is compiled per combination of
        run sizes, and these evaluations (finer steps, arbitration) come in varying numbers.

        ``later``: the programs are dispatched and a :class:`_Pending` returned, whose ``result()`` reads them, so
        that XLA computes them while Python goes on (otherwise each batch is read before the next is dispatched:
        separate runs are large parameters' programs)."""
        index, lo = np.asarray(items.index), np.asarray(items.lo)
        m = len(index)
        groups = self.plan.groups if self.plan.groups and (self.plan.separate or not pad) else ()
        groups = groups or (tuple(range(len(self.layout.sizes))),)
        if len(groups) == 1:
            run_of = np.zeros(m, np.int64)
        else:
            if leaves is None:
                leaves = self.leaf_of(index, lo)
            owner = np.zeros(len(self.layout.sizes), np.int64)
            for g, run in enumerate(groups):
                owner[list(run)] = g
            run_of = owner[np.asarray(leaves, np.int64)]
        runs, picks, sels = [], [], []
        for g, run in enumerate(groups):
            sel = np.nonzero(run_of == g)[0]
            if not len(sel):
                continue
            size = max(self.plan.pad_min, 1 << (len(sel) - 1).bit_length()) if pad else len(sel)
            jv = () if want is None else tuple(int(k) for k in np.nonzero(want[sel])[0])
            runs.append(_Group(run, size, jv))
            picks.append(np.resize(sel, size))
            sels.append(sel)
        batches = [(runs, picks, sels)] if not self.plan.separate else [([r], [p], [q]) for r, p, q in
                                                                           zip(runs, picks, sels, strict=True)]
        support = tuple(self.support)
        F_out, JV_out = np.full((m, len(_OFFSETS)), np.nan), np.full(m, np.nan)

        def dispatch(b_runs: list, b_picks: list) -> tuple:
            take = np.concatenate(b_picks) if b_picks else np.zeros(0, np.int64)
            taken = [np.asarray(x)[take] for x in items]
            padded = _Items._make([*(c.astype(np.int32) for c in taken[:4]), taken[4].astype(np.float64)])
            return _items_jit(self.params, self.dyn, self.seed, padded, support, fn=self.fn, layout=self.layout,
                              args_spec=self.spec, batch=self.plan.batch, groups=tuple(b_runs), cols=cols)

        def read(b_runs: list, b_sels: list, F: Any, JV: Any) -> None:
            F, JV = np.asarray(F), np.asarray(JV)
            start = 0
            for sel, r in zip(b_sels, b_runs, strict=True):
                F_out[sel], JV_out[sel] = F[start : start + len(sel)], JV[start : start + len(sel)]
                start += r.size

        if later:
            outs = [dispatch(b_runs, b_picks) for b_runs, b_picks, _ in batches]

            def result() -> tuple[np.ndarray, np.ndarray]:
                for (b_runs, _, b_sels), out in zip(batches, outs, strict=True):
                    read(b_runs, b_sels, *out)
                return F_out, JV_out

            return _Pending(support, result)
        for b_runs, b_picks, b_sels in batches:
            read(b_runs, b_sels, *dispatch(b_runs, b_picks))
        return F_out, JV_out

    def projections(self, li: int, stream: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Random directions of stream ``stream`` within [lo, hi) ⊂ leaf ``li``, dotted with autodiff, hand and
        the tolerances: (directions, 3)."""
        a, h = self.full()
        rtol, atol, eps = self.tp_of(li)
        return np.asarray(_project_jit(a[li], None if h is None else h[li], self.seed,
                                       np.full(len(lo), stream, np.int32), np.asarray(lo, np.int32),
                                       np.asarray(hi, np.int32), self.leaf_max[li], self.gmax, rtol, atol, eps,
                                       float(self.zero[li] + self.allow[li]), offset=self.layout.offsets[li]))

    def ladder(self, items: _Items, tol, initial: np.ndarray | None = None,
               values: Sequence[np.ndarray] = (), also: np.ndarray | None = None,
               outer: np.ndarray | None = None) -> _FD:
        """Resolves the derivative along each item: the initial scales, then finer ones where unresolved.

        With a single initial scale, an item whose analytic ``values`` all lie within the tolerance of a smooth
        estimate, counting twice its error, is accepted without a second scale: a wrong finite difference does not
        land on the analytic value by chance. Everything else (disagreement, kinks, error bars too wide to tell)
        goes down the ladder.

        ``outer`` (a costly function's first reading, with a hand): f at the outer offsets of each item's step over
        _OUTER_STEP (the other columns NaN). It settles the items :func:`_outer_reading` settles, where ``also`` (a
        further analytic value per item, NaN where none: forward mode) agrees too; the others are read from a single
        scale of the four offsets at their step, then as above. (Only with a hand: the central difference's
        truncation error is not estimated, so a value off by just that much would settle; a hand derived apart from
        autodiff would have to be off by it too. A hand that calls the same wrong rule is: that residue is in the
        README.)"""
        items = _Items(*(np.asarray(x) for x in items))
        if outer is not None and len(items.index):
            eps_f = self.eps_f[self.leaf_of(items.index, items.lo)]
            settled, reading = _outer_reading(self.f0, outer, items.step / _OUTER_STEP, eps_f, tol, self._mag(items),
                                              list(values), also)
            rest = np.nonzero(~settled)[0]
            if not len(rest):
                return reading
            sub = _Items._make([x[rest] for x in items])
            fd = self.ladder(sub, tol[rest], initial=self.evaluate(sub)[0][:, None], values=[v[rest] for v in values])
            return _merge(len(items.index), [(np.nonzero(settled)[0], reading.take(settled)), (rest, fd)])
        if initial is None:
            two = _Items._make([*(np.tile(x, 2) for x in items[:4]), np.concatenate([items.step, items.step / _LADDER])])
            F = self.evaluate(two)[0]
            n_items = len(items.index)
            initial = np.stack([F[:n_items], F[n_items:]], axis=1)
        leaves = self.leaf_of(items.index, items.lo)
        eps_f = self.eps_f[leaves]
        mag = self._mag(items)
        for level in range(initial.shape[1]):
            self._measure(leaves, initial[:, level])
        scales = [_scale(self.f0, initial[:, level], items.step / _LADDER**level, eps_f, tol, mag, self.measured[leaves],
                         self.quantum(leaves))
                  for level in range(initial.shape[1])]
        # (from a single scale, the ladder stops at the first reading that settles an item, not at the best of
        # four: a smooth reading settles only once its error bars are within the tolerance, as the best of four
        # scales' usually is)
        strict = initial.shape[1] == 1
        fd, settled = self._settle(scales, tol, values, strict=strict)
        while len(scales) < _MAX_SCALES and not settled.all():
            sel = np.nonzero(~settled)[0]
            level = len(scales)
            F = np.full((len(items.index), len(_OFFSETS)), np.nan)
            F[sel] = self.evaluate(_Items._make([*(x[sel] for x in items[:4]), items.step[sel] / _LADDER**level]))[0]
            self._measure(leaves[sel], F[sel])
            scales.append(_scale(self.f0, F, items.step / _LADDER**level, eps_f, tol, mag, self.measured[leaves],
                                 self.quantum(leaves)))
            fd, settled = self._settle(scales, tol, values, strict=strict)
        if not fd.resolved.all():
            fd = self._settle(scales, tol, values, final=True)[0]
        return fd

    def _measure(self, leaves: np.ndarray, F: np.ndarray) -> None:
        """Adds the fourth differences of evaluations ``F`` (items along ``leaves``, one scale) to their leaves'
        samples, and measures the rounding of those leaves that now have enough."""
        keep = _informative(self.f0, F)
        d4 = _fourth(self.f0, F)
        for li in np.unique(leaves[keep]):
            self.samples[li] = np.concatenate([self.samples[li], d4[keep & (leaves == li)]])
            self.measured[li] = _pooled_rounding(self.samples[li])
            values = np.append(F[keep & (leaves == li)].ravel(), self.f0)
            while self.grid[li] < len(_GRIDS) - 1 and not _on_grid(values, _GRIDS[self.grid[li]]):
                self.grid[li] += 1

    def quantum(self, leaves: np.ndarray) -> np.ndarray:
        """The eps of the grid fn's values lie on along each of ``leaves`` (see _measure)."""
        return _GRID_EPS[self.grid[leaves]]

    def _mag(self, items: _Items) -> np.ndarray:
        """Each item's element's size (0 for a direction): the rounding of the point itself (see _scale)."""
        mag = np.zeros(len(items.index))
        el = np.nonzero(items.index >= 0)[0]
        if len(el):
            mag[el] = np.abs(self.theta(items.index[el]))
        return mag

    def _settle(self, scales, tol, values, final: bool = False, strict: bool = False) -> tuple[_FD, np.ndarray]:
        """The ladder's reading, and which items it settles: a finer scale could still change the verdict
        where some analytic value disagrees with the estimate, or where two values that disagree with each
        other both fit inside its error bars. With a single scale, values that all agree with a smooth
        estimate are accepted (a wrong finite difference does not land on the analytic value by chance).
        ``strict``: a smooth reading whose error bars are wider than half the tolerance settles nothing (a value
        off by 1.5 tolerances fits them) while a finer scale can still narrow them: until the finest scale's error
        is no smaller than the one before (rounding grows as the step shrinks), as the best of four scales would."""
        fd = _resolve(scales, tol, self.f0, final)
        if len(scales) == 1 and values:
            s0 = scales[0]
            with np.errstate(invalid="ignore"):
                agree = s0.finite & ~s0.nonsmooth
                for v in values:
                    # (within the tolerance of the derivative whatever the reading's error: a reading whose error bars
                    # are as wide as the tolerance cannot tell a value off by 1.5 tolerances, and a finer scale can)
                    agree &= np.abs(v - s0.value) + 2 * s0.err <= tol
            fd.value[agree], fd.err[agree] = s0.value[agree], s0.err[agree]
            fd.lo[agree] = fd.hi[agree] = s0.value[agree]
            fd.finite[agree] = fd.resolved[agree] = True
            fd.nonsmooth[agree] = False
        settled = fd.resolved.copy()
        if values:
            fits = [_consistent(v, fd, tol) for v in values]
            decided = np.logical_and.reduce(fits)  # everything agrees (or sits inside a kink's interval)
            if len(values) == 2:
                with np.errstate(invalid="ignore"):
                    apart = ~(np.abs(values[0] - values[1]) <= tol)
                decided &= ~(apart & ~fd.nonsmooth)  # both fit smooth error bars yet disagree: too coarse
                decided |= fits[0] ^ fits[1]  # exactly one side fits
            settled &= decided
        if strict:
            limited = len(scales) >= 2 and scales[-1].err >= scales[-2].err  # (elementwise; False with one scale)
            settled &= fd.nonsmooth | (2 * fd.err <= tol) | limited
        return fd, settled

    def leaf_of(self, index: np.ndarray, lo: np.ndarray | None = None) -> np.ndarray:
        """Each item's leaf: its element's (flat ``index``), or for a direction (index -1) its support's (``lo``)."""
        where = index if lo is None else np.where(np.asarray(index) >= 0, index, lo)
        return np.searchsorted(np.asarray(self.layout.offsets), where, side="right") - 1

    def resolved_zero(self, li: np.ndarray, fd: _FD, elements: np.ndarray | bool = True) -> np.ndarray:
        """Per item (of leaves ``li``), how much less than the round-off at zero (see :func:`_zero_roundoff`) its
        tolerances allow once finite differences have read it: an element finite differences resolve, smooth, to
        within err is allowed no more than 4·err of that round-off (the rounding of fn's value |f| stands for the
        terms that cancel in a gradient, which a float32 loss of 1e5 holding a small term makes wider than that
        term's whole gradient: a hand of the wrong sign passed beside a reading of ±2e-7, h112). Subtracted from
        the tolerances: nothing where ``atol`` was given (the round-off is not in them), nor for random directions
        (``elements`` False: their tolerances add their elements' in quadrature)."""
        if self.tp[1] >= 0:
            return np.zeros(len(li))
        z = self.zero[li] * np.asarray(elements, bool)
        with np.errstate(invalid="ignore"):
            sure = fd.resolved & fd.finite & ~fd.nonsmooth & ~fd.singular & np.isfinite(fd.err)
            return np.where(sure, np.maximum(z - 4 * np.where(sure, fd.err, 0.0), 0.0), 0.0)

    def at_elements(self, flat: np.ndarray) -> tuple[_FD, np.ndarray]:
        """Finite differences at these elements (flat indices), and the tolerance against them there (with their
        floor at each element's step, as the ladder measured it, and the round-off at zero as they resolve it)."""
        flat = np.asarray(flat, np.int64)
        zeros = np.zeros(len(flat), np.int64)
        li = self.leaf_of(flat)
        steps = self.h0[li] * np.maximum(1.0, np.abs(self.theta(flat)))
        base = self.values(flat)[2]
        fd = self.ladder(_Items(flat, zeros, zeros, zeros, steps), np.maximum(base, self.floor_at(li, steps)))
        # (again: the ladder has measured the rounding now; and the round-off at zero as they resolve it)
        return fd, np.maximum(base - self.resolved_zero(li, fd), self.floor_at(li, steps))


@_isolating
def check_grad(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    hand: Callable[..., Any] | None = None,
    has_aux: bool = False,
    wrt: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    mode: str = "auto",
    seed: int = 0,
) -> GradReport:
    """Checks the gradient of a scalar function three ways: autodiff, the hand formula, finite differences.

    Args:
        fn: ``fn(params, *args) -> scalar`` (any float dtype), or ``-> (scalar, aux)`` with ``has_aux=True``.
        params: any pytree: dicts, lists, tuples, NamedTuples, registered dataclasses, whole Equinox modules,
            Flax NNX states. Inexact-array leaves are differentiated, everything else is held fixed (see
            ``wrt``); Python floats count as scalar parameters.
        *args: further arguments of ``fn`` (data, labels, keys), not differentiated. Arrays are traced; other
            values (Python numbers, strings, objects) are held static.
        hand: ``hand(params, *args)``, the hand-derived gradient with the structure and shapes of ``params``
            (any float dtype; None, or anything, at leaves that are not differentiated). It may be written in
            NumPy: when JAX cannot trace it, it is called on NumPy arrays. None checks autodiff against finite
            differences only.
        has_aux: ``fn`` returns ``(loss, aux)``, as for ``jax.grad(..., has_aux=True)``; aux is not checked.
        wrt: which leaves to differentiate: a predicate ``leaf -> bool`` or a pytree of bools with the structure
            of ``params`` (or a prefix of it), as ``equinox.partition`` takes; or, when ``params`` is a Flax NNX
            module or state, an NNX filter as ``nnx.state(model, filter)`` takes (``nnx.Param``,
            ``(nnx.Param, nnx.BatchStat)``, ``nnx.PathContains("encoder")``, ``nnx.Not(...)``: the floating-point
            arrays of the Variables it selects). Default: inexact arrays.
        rtol, atol: override the analytic tolerances (relative and absolute, per element).
        mode: ``"auto"`` (every element by finite differences where cheap, projections elsewhere),
            ``"exact"`` (every element) or ``"projection"``.
        seed: seed of the random directions.

    Returns:
        A :class:`GradReport`: a row per differentiated leaf with its verdict, the element that decided it and
        the three values there.

    Raises:
        TypeError, ValueError: nothing to differentiate, non-finite params, a non-scalar or non-finite ``fn``,
            a ``hand`` whose result has another structure or shape or a non-float dtype, a function JAX can
            differentiate in neither mode; each message names the leaf path.
    """
    for name, f in (("fn", fn), ("hand", hand)):
        _callable_as(f, name, "check_grad", 1 + len(args))

    def check(at: Any) -> GradReport:
        return _check_grad_impl(fn, at, args, hand=hand, has_aux=has_aux, wrt=wrt, rtol=rtol, atol=atol, mode=mode,
                                seed=seed, reuse=False)

    return _second_look(check(params), check, fn, params, args, hand=hand, has_aux=has_aux, wrt=wrt, seed=seed)


def _callable_as(f: Any, name: str, where: str, n: int) -> None:
    """TypeError naming ``f`` (fn or hand) when its signature cannot take n positional arguments, params and
    ``*args``: called so, it fails with only its own name in the message (``<lambda>() takes 1 positional argument
    but 2 were given``). Functions whose signature Python cannot read are let through."""
    if f is None or not callable(f):
        return
    try:
        signature = inspect.signature(f, follow_wrapped=False)  # (a decorator may call f otherwise)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*([None] * n))
    except TypeError as e:
        hint = "hand takes the same arguments as fn" if name == "hand" else \
            f"{where} passes fn params, then every argument given after params"
        raise TypeError(f"{where}: {name} is called as {name}(params, *args), with {n} argument(s) here "
                        f"(params and the {n - 1} given after it), but its signature {signature} cannot take them "
                        f"({e}); {hint}") from None


def _second_look(report: GradReport, check: Callable[[Any], GradReport], fn: Callable[..., Any], params: Any,
                 args: tuple, *, hand: Callable[..., Any] | None, has_aux: bool, wrt: Any, seed: int,
                 primal: Callable[..., Any] | None = None) -> GradReport:
    """:func:`_off_the_kinks` for the check ``check(params)`` of ``fn(params, *args)`` (with ``hand``) that gave
    ``report``: check_grad's, and each of check_vjp's and check_jacobian's scalar checks. ``primal``: the same
    function without fn's custom rule (verify.audit's rule through its primal), whose gradients with each of its own
    kinks on a side of its own count among the sides too: a rule's kinks lie inside it, where only its inputs can
    be moved (a fused dense + ReLU at zero weights on integer data, where no move of its inputs turns every ReLU
    off, though its primal's ReLUs all off give the rule's and JAX's own gradient there)."""

    def nearby(sel: Any, points: Iterable, wide: int | None = None) -> Iterator[dict[str, np.ndarray]]:  # autodiff's
        return _autodiff_at(fn, sel, points, args, has_aux, wide)  # gradient, leaf by leaf

    def sided(sel: Any) -> Iterator[dict[str, np.ndarray]]:
        yield from _autodiff_sided(fn, sel, args, has_aux, seed)

    def primal_sided(sel: Any) -> Iterator[dict[str, np.ndarray]]:
        assert primal is not None
        yield from _autodiff_sided(primal, sel, args, has_aux, seed)

    def kinked(sel: Any) -> bool:
        return _has_kinks(fn, sel, args, has_aux)

    def hand_at(sel: Any, at: Any) -> dict[str, np.ndarray]:  # hand's gradient, leaf by leaf (as the check reads it)
        specs = tuple((p, tuple(int(d) for d in getattr(x, "shape", ())), describe(x))
                      for p, x in zip(sel.paths, sel.leaves, strict=True))
        assert hand is not None  # (only called with a hand)
        try:  # (on copies of the NumPy arrays among them: a book-style hand may write into what it is given)
            out = hand(*_copied((at, *args)))
        except Exception:  # noqa: BLE001 - a NumPy hand (in-place operations): on NumPy arrays, as the check calls it
            out = hand(_host_tree(at, False), *_host_tree(args, False))
        got = _extract_grad(out, _Bound(fn, hand, sel.treedef, sel.diff, specs, has_aux))
        return {p: np.asarray(g, np.float64) for p, g in zip(sel.diff_paths, got, strict=True)}

    also = "" if primal is None else (", and of the primal's gradient (without the rule) with each of its own kinks "
                                      "on a side of its own")
    return _off_the_kinks(report, check, _Beside(nearby, sided, hand_at if hand is not None else None, kinked, also,
                                                 primal_sided if primal is not None else None), params, wrt, seed)


_AT_KINKS = "D₋/D₊ = ["  # (in the note of an element read as a kink: its one-sided derivatives)
_OFF_KINKS = 1e-2  # the shift off the kinks for the second check, relative to each element's size (see _shifted)
_NEARBY = 32  # points right beside the given one, where autodiff's gradient is read (each on some side of each kink)
# their distance, relative to each element's size, by itemsize: a unit of the precision (the least that moves an exact
# kink, integer data's; a tie a few units off the point is no kink and must not be crossed: max at [1, 1 + 2⁻²⁰])
_NEARBY_SHIFT = {8: float(np.finfo(np.float64).eps), 4: float(np.finfo(np.float32).eps), 2: 1e-3, 1: 1e-2}


_SECOND_LOOK_MAX = 1 << 24  # differentiated elements beyond which the second look is not taken (its cost)


class _Beside(NamedTuple):
    """What the second look off the kinks reads beside the given point (see :func:`_off_the_kinks`)."""

    nearby: Callable[..., Iterator[dict[str, np.ndarray]]]  # autodiff's gradient at points, leaf by leaf (``wide``:
    # from that point on in float64 where it can be, see _autodiff_at)
    sided: Callable[[Any], Iterator[dict[str, np.ndarray]]]  # ... at the given point with each kink on a side of its own
    hand_at: Callable[[Any, Any], dict[str, np.ndarray]] | None  # hand's gradient at a point, leaf by leaf
    kinked: Callable[[Any], bool]  # whether fn has kinks at all (max, |x|, comparisons, sorts, custom rules)
    also: str = ""  # what else the sides read, for the notes (audit: a rule's primal's gradients)
    reference: Callable[[Any], Iterator[dict[str, np.ndarray]]] | None = None  # audit: the rule's primal's gradient
    # with each of its kinks on a side of its own (among the sides too; and the range a failing rule's value must lie
    # in to be excused as a choice at kinks, see _beyond_primal_sides)


def _off_the_kinks(report: GradReport, check: Callable[[Any], GradReport], beside: _Beside, params: Any, wrt: Any,
                   seed: int) -> GradReport:
    """A report whose rows were decided where kinks meet, checked again off them. Where several kinks meet (ReLUs
    of several samples at 0, integer data with zero biases), autodiff's and hand's choices at each kink add up to
    values that need not lie between the one-sided derivatives, nor next to a derivative finite differences read as
    smooth (two kinks whose slopes add up to the same on both sides), and finite differences cannot tell such a
    choice from a mistake. Looked at again: failing rows of a function with kinks, and rows passed as ``kink`` (which
    a copied relu'(0) of 5, a sign-flipped hand, or a max-pool backward sending the gradient to every tied maximum
    can be).

    A row becomes (or stays) ``kink``, its note saying why, when both: the whole check passes (``ok``, or ``kink``)
    at a point off the kinks (each differentiated element shifted by a random 1% of its size, :func:`_shifted`), so
    the formulas agree there; and at every element of the leaf, autodiff's and hand's values lie within the range
    of autodiff's gradient at :data:`_NEARBY` points right beside the given one (each on some side of each kink)
    and at the given one with each kink on a random side of its own (:func:`_autodiff_sided`: ``relu(a)`` and
    ``relu(−a)`` both off, which no point gives), as a choice at each kink does; and jointly along directions that
    keep ties (:func:`_off_every_side`). A row failing off the kinks takes
    the verdict found there (its blame, and its element, read where finite differences know the derivative); a
    value no side of the kinks gives (a relu'(0) of 5; a max-pool backward sending the gradient to every tied
    maximum, jointly) fails, blamed on the side it belongs to; where finite differences cannot decide off the kinks the row
    stays as it was, with that in its note."""
    def candidate(r: Row) -> bool:
        if not all(v is None or math.isfinite(v) for v in (r.autodiff, r.hand)):
            return False
        return r.verdict in _FAILING or r.verdict == Verdict.KINK

    rows = [r for r in report.rows if candidate(r)]
    if not rows:
        return report
    try:
        sel, _ = _select(params, wrt)  # (once: the points differ only in the differentiated leaves' values)
        if not any(_AT_KINKS in r.note or r.verdict == Verdict.KINK for r in rows) and not beside.kinked(sel):
            return report  # (no kink anywhere in fn: a failure stands as decided, with nothing more to pay)
        n = sum(int(np.size(x)) for x, d in zip(sel.leaves, sel.diff, strict=True) if d)
        if n > _SECOND_LOOK_MAX:
            return _not_looked_at_again(report, rows, n)
        other = check(_shifted(sel, seed, _OFF_KINKS))
    except Exception:  # noqa: BLE001 - the function failing off the kinks: the report stands as it is
        return report
    there = {r.path: r for r in other.rows}
    how = f"each parameter shifted by a random {_OFF_KINKS:.0%} of its size"
    read: dict[str, Any] = {}

    def reading() -> dict[str, Any]:  # (autodiff beside, and both sides here: read once, when a row needs them)
        if not read:
            read.update(_read_beside(beside, sel, params, seed))
        return read

    def amended(r: Row) -> Row:
        o = there.get(r.path)
        if r not in rows or o is None:
            return r
        if o.verdict == r.verdict and _AT_KINKS not in r.note:
            return r  # (decided away from kinks, and the same off them: the given point's own reading stands)
        if o.verdict in _FAILING:
            # Off the kinks finite differences know the derivative: the verdict and element found there, not those
            # read at the kinks (a hand 2% off everywhere, agreeing with autodiff at an element where kinks meet, is
            # not both_wrong; a wrong element is named, not a kink beside it).
            # (said as it was read: a kink's one-sided derivatives, which several kinks meeting can defeat, or a
            # failure decided beside kinks elsewhere in fn, named again where no kink is near)
            at = ("at kinks, where finite differences read one-sided derivatives only and several kinks may meet"
                  if _AT_KINKS in r.note else "beside kinks elsewhere in fn")
            return dataclasses.replace(o, path=r.path, note=(
                f"at the given point this leaf read {r.verdict} at {r.where}, {at}; at a point off the kinks ({how}), "
                f"with the values shown there: {o.note}"))
        # (fd_unreliable with a hand: autodiff and hand agree there, which finite differences, too coarse there,
        # cannot confirm; that the formulas agree off the kinks is what the range test below needs)
        # Not for a row read both_wrong: autodiff and hand agreed there already, and it is their agreement that
        # finite differences ruled out (a stop_gradient copied into the hand, bfloat16 inside fn: 0 and 0 against
        # −0.662 ± 0.074 off the kinks read kink so).
        agreed = o.verdict == Verdict.FD_UNRELIABLE and o.hand is not None and r.verdict != Verdict.BOTH_WRONG
        if o.verdict not in (Verdict.OK, Verdict.KINK) and not agreed:  # (fd_unreliable, singular: decided nothing)
            return dataclasses.replace(r, note=f"{r.note}; at a point off the kinks ({how}) finite differences cannot "
                                               f"decide either ({o.verdict})")
        try:
            got = reading()
        except Exception:  # noqa: BLE001 - autodiff failing beside the point: the row stands as it is
            return r
        return _within_reach(r, o, got, how)

    amended_rows = [amended(r) for r in report.rows]
    return dataclasses.replace(report, rows=tuple(amended_rows),
                               verdict=_combine_verdicts([r.verdict for r in amended_rows]),
                               seconds=report.seconds + other.seconds)


def _read_beside(beside: _Beside, sel: Any, params: Any, seed: int) -> dict[str, Any]:
    """Autodiff's gradient at params (``here``), the range of it beside them (``lo``, ``hi``: at :data:`_NEARBY`
    points right beside, and with each kink on a side of its own), hand's gradient at params (``hand``), and the
    :func:`_along_ties` directions of each leaf (``dirs``) with every one of those gradients' projections on them
    (``proj``: a row per gradient)."""
    # (each leaf's groups of equal elements, found once: for the directions along ties, and for every point beside)
    groups = {i: _equal_groups(np.asarray(x, np.float64)) for i, (x, d) in enumerate(zip(sel.leaves, sel.diff,
                                                                                          strict=True)) if d}
    dirs = {sel.paths[i]: _along_ties(sel.leaves[i], seed, found) for i, found in groups.items()}
    points = itertools.chain([params], (_shifted(sel, seed + 1 + k, None, groups) for k in range(_NEARBY)))
    # (the points beside in float64 where they can be, so that ties of values computed from the parameters break too)
    grads = beside.nearby(sel, points, wide=1)
    here = next(grads)
    ranges: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {"own": ({}, {}), "reference": ({}, {})}
    proj: dict[str, list[np.ndarray]] = {p: [] for p in dirs}
    sides = itertools.chain(((g, "own") for g in itertools.chain(grads, beside.sided(sel))),
                            ((g, "reference") for g in (beside.reference(sel) if beside.reference is not None else ())))
    for g, part in sides:  # (one at a time: their range is all that is kept)
        lo, hi = ranges[part]
        for path, v in g.items():
            v64 = np.asarray(v, np.float64)
            lo[path] = np.fmin(lo[path], v64) if path in lo else v64  # (NaN only where every point gives NaN)
            hi[path] = np.fmax(hi[path], v64) if path in hi else v64
            if path in dirs:
                proj[path].append(dirs[path] @ v64.ravel())
    (lo, hi), (ref_lo, ref_hi) = ranges["own"], ranges["reference"]
    both = {p: (np.fmin(lo[p], ref_lo[p]), np.fmax(hi[p], ref_hi[p])) if p in ref_lo else (lo[p], hi[p]) for p in lo}
    return {"here": here, "lo": {p: b[0] for p, b in both.items()}, "hi": {p: b[1] for p, b in both.items()},
            "reference": (ref_lo, ref_hi), "dirs": dirs,
            "proj": {p: np.array(v) for p, v in proj.items()},
            "hand": beside.hand_at(sel, params) if beside.hand_at is not None else {}, "also": beside.also}


_TIE_DIRECTIONS = 2  # directions per leaf for the second look's joint test (see _along_ties)


def _along_ties(x: Any, seed: int, found: tuple[np.ndarray, np.ndarray] | tuple[()]) -> np.ndarray:
    """Random directions (rows, float32) in the space of a leaf with values ``x`` (``found``: its groups of equal
    elements, :func:`_equal_groups`) that move equal elements together: the first moves every element, the second
    holds the zeros still. Along such a direction ties stay ties (a max-pool window's equal inputs, sort's equal
    keys), so a function whose kinks are such ties is differentiable along it, and every side of every kink gives the
    same derivative there: one that a choice at each kink gives must too (see :func:`_within_reach`)."""
    n = int(np.size(x))
    out = np.zeros((_TIE_DIRECTIONS, n), np.float32)
    if n == 0 or not jnp.issubdtype(np.asarray(x).dtype, jnp.inexact):  # (NumPy's own test says no to bfloat16)
        return out
    rng = np.random.default_rng([seed % 2**32, 0x7175])
    for k in range(_TIE_DIRECTIONS):
        d = rng.standard_normal(n)
        if found:
            group, counts = found
            d = (np.bincount(group, weights=d) / counts)[group]  # (each group's elements move by their mean)
        if k == 1:
            d[np.ravel(np.asarray(x, np.float64)) == 0] = 0.0
        out[k] = d / max(float(np.linalg.norm(d)), 1e-300)
    return out


def _not_looked_at_again(report: GradReport, rows: list[Row], n: int) -> GradReport:
    """``report`` with a note on its rows read at kinks: too many parameters for the second look."""
    why = (f"not looked at again off the kinks: {n} parameters, more than {_SECOND_LOOK_MAX} (a second check and "
           f"{2 * _NEARBY + _NEARBY // _MIXED_PART} more gradients would cost more than the check); where several "
           "kinks meet (integer data), "
           "check a smaller model, or at parameters off them")
    out = tuple(dataclasses.replace(r, note=f"{r.note}; {why}") if r in rows and (_AT_KINKS in r.note or
                                                                                  r.verdict == Verdict.KINK) else r
                for r in report.rows)
    return dataclasses.replace(report, rows=out)


def _beyond_primal_sides(r: Row, got: dict[str, Any], a: np.ndarray, slack: Any) -> Row | None:
    """The audit's range test of a rule the check failed at the given point (``autodiff_wrong``, ``mismatch``): to be
    excused as a choice at kinks, its value must lie, at every element, in the range of its primal's gradient with
    each of the primal's kinks on a side of its own, not merely in the range of both together. The rule's own
    gradient beside the point is the thing under test: a rule wrong only in a branch near 0 (a series for
    (eˣ − 1)/x, 20% off) moved only where the branch flipped to the formula's rounding, and its wrong value lay within
    its own range (``kink``). Where kinks meet, a rule's choice at each is one its primal's sides give (a fused dense +
    ReLU on integer data: the primal's ReLUs all off give it). Not excused, the row stands as the check read it, with
    a note (a ``mismatch`` beside a primal whose plain autodiff is rounding is then read again, see
    verify._audit._beside_noisy_reference). None where every element is within (or there is no primal)."""
    ref_lo, ref_hi = got["reference"]
    if r.verdict not in (Verdict.AUTODIFF_WRONG, Verdict.MISMATCH) or r.path not in ref_lo:
        return None
    p_lo, p_hi = ref_lo[r.path], ref_hi[r.path]
    slack = np.broadcast_to(slack, p_lo.shape)
    with np.errstate(invalid="ignore"):
        apart = np.isfinite(a) & np.isfinite(p_lo) & np.isfinite(p_hi) & ((a < p_lo - slack) | (a > p_hi + slack))
        excess = np.where(apart, np.maximum(p_lo - a, a - p_hi) - slack, -np.inf)
    if not excess.size or float(np.max(excess)) <= 0:
        return None
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), p_lo.shape))
    return dataclasses.replace(r, note=(
        f"{r.note}; not a choice at kinks: autodiff's gradient at {list(idx)} ({_g(float(a[idx]))}) lies outside "
        f"[{_g(float(p_lo[idx]))}, {_g(float(p_hi[idx]))}], the range of the primal's gradient with each of its own "
        "kinks on a side of its own"))


def _within_reach(r: Row, o: Row, got: dict[str, Any], how: str) -> Row:
    """The second look's range test of row ``r`` (see :func:`_off_the_kinks`), the leaf checking out off the kinks
    (``o``): every element's autodiff and hand values within the range of autodiff's gradient read beside (``got``)."""
    lo, hi = got["lo"][r.path], got["hi"][r.path]
    dtype = np.dtype(got["here"][r.path].dtype)
    sides = [("autodiff", np.asarray(got["here"][r.path], np.float64))]
    if r.path in got["hand"]:
        sides.append(("hand", got["hand"][r.path].reshape(lo.shape)))
    scale = np.maximum.reduce([np.abs(lo), np.abs(hi), *(np.abs(v) for _, v in sides)])
    # (the points lie a little off the given one, so their gradients drift by about that much, relative; and
    # they are rounded to the parameters' precision, at the leaf's scale)
    slack = (max(1e-4, 10 * _NEARBY_SHIFT.get(dtype.itemsize, 1e-2)) * scale
             + 16 * float(jnp.finfo(dtype).eps) * float(np.nanmax(np.abs(np.concatenate([np.ravel(lo), np.ravel(hi)])),
                                                                   initial=0.0)))
    with np.errstate(invalid="ignore"):  # (a value that is not finite, here or beside, is outside)
        excess = {name: np.where(np.isfinite(v) & np.isfinite(lo) & np.isfinite(hi),
                                 np.maximum(lo - slack - v, v - hi - slack), np.inf) for name, v in sides}
    where = f"the range of autodiff's gradient there at {_NEARBY} points right beside this one and at this one " \
            f"with each kink on a side of its own{got['also']}"
    standing = _beyond_primal_sides(r, got, sides[0][1], slack)  # (the audit: before either side is blamed here)
    if standing is not None:
        return standing
    worst = max(excess, key=lambda n: float(np.max(excess[n], initial=-np.inf)))
    if excess[worst].size and float(np.max(excess[worst])) > 0:
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess[worst])), lo.shape))
        out = {n for n, e in excess.items() if float(e[idx]) > 0}
        note = (f"{r.note}; the leaf checks out at a point off the kinks ({how}), but "
                + " and ".join(f"{n} ({_g(float(v[idx]))})" for n, v in sides if n in out)
                + f" at {list(idx)} {'lie' if len(out) > 1 else 'lies'} outside [{_g(float(lo[idx]))}, "
                f"{_g(float(hi[idx]))}], {where}: a value no side of the kinks gives, not a choice at them")
        # (blamed on the side, or sides, outside: the other one gives a choice at the kinks)
        verdict = (Verdict.BOTH_WRONG if len(out) > 1 else
                   Verdict.HAND_WRONG if "hand" in out else Verdict.AUTODIFF_WRONG)
        vals = {n: float(v[idx]) for n, v in sides}
        return dataclasses.replace(r, verdict=verdict, worst_index=idx, autodiff=vals["autodiff"],
                                   hand=vals.get("hand"), numeric=None, note=note)
    strayed = _off_every_side(r, got, sides, slack)
    if strayed is not None:
        return strayed
    if r.verdict == Verdict.KINK:
        return dataclasses.replace(r, note=(
            f"{r.note}; looked at again: at a point off the kinks ({how}) {_checks_out(o)}, and "
            f"{' and '.join(n for n, _ in sides)}'s values lie within {where}, at every element"))
    gaps = np.abs(sides[0][1] - sides[1][1]) if len(sides) > 1 else np.zeros(lo.shape)
    idx = tuple(r.worst_index) if r.worst_index is not None else tuple(
        int(i) for i in np.unravel_index(int(np.argmax(gaps)) if gaps.size else 0, lo.shape))
    lo_i, hi_i = float(lo[idx]), float(hi[idx])
    reach = max(hi_i - lo_i, float(np.broadcast_to(slack, lo.shape)[idx]))
    if (r.worst_index is not None and r.numeric is not None and math.isfinite(r.numeric)
            and not lo_i - reach <= r.numeric <= hi_i + reach):
        # Finite differences far outside what autodiff gives on every side beside the element: that the kinks meet
        # here is then not what the points show (h90: a custom rule's bfloat16 residual near a scalar's optimum, a
        # smooth function whose gradient nearly cancels there, its rounding a few percent of it, within the
        # tolerance a little off the point).
        return dataclasses.replace(r, verdict=Verdict.KINK, note=(
            f"read at the given point alone: {r.note}; looked at again: autodiff's gradient beside this point spans "
            f"[{_g(lo_i)}, {_g(hi_i)}] at {list(idx)} ({where}), which does not reach finite differences' "
            f"{_g(r.numeric)}: either kinks meet here in combinations those points do not take, or fn rounds inside "
            "(a low-precision residual, cast or constant) by more than the tolerance allows where the gradient nearly "
            f"cancels; at a point off it ({how}) {_checks_out(o)}, and "
            f"{' and '.join(n for n, _ in sides)}'s values lie within that range at every element: passed as kink, "
            "undecided rather than judged a mistake"))
    return dataclasses.replace(r, verdict=Verdict.KINK, note=(
        f"read at the given point alone: {r.note}; but kinks meet here, where autodiff's and hand's choices at each "
        "kink add up to values finite "
        f"differences cannot judge: at a point off the kinks ({how}) {_checks_out(o)}, and "
        f"{' and '.join(n for n, _ in sides)}'s values lie within {where}, at every element "
        f"([{_g(float(lo[idx]))}, {_g(float(hi[idx]))}] at {list(idx)}), so this disagreement is such a choice, "
        "not a mistake"))


def _checks_out(o: Row) -> str:
    """What the second look's check off the kinks found for a leaf it passes on (see :func:`_off_the_kinks`)."""
    if o.verdict in (Verdict.OK, Verdict.KINK):
        return f"the leaf checks out ({o.verdict})"
    return "autodiff and hand agree (finite differences cannot confirm them there)"


def _off_every_side(r: Row, got: dict[str, Any], sides: list[tuple[str, np.ndarray]],
                    slack: np.ndarray) -> Row | None:
    """The second look's joint test of row ``r``, whose every element lies within the range beside (see
    :func:`_within_reach`): along each of the leaf's :func:`_along_ties` directions where every gradient read beside
    gives the same derivative (within their ``slack``, summed along it), so no kink is crossed, autodiff's and
    hand's projections must give it too. A failing row (which side strays, at the element where it strays most
    along that direction), or None. This catches what each element's own range cannot: a max-pool backward that
    sends the whole gradient to every tied maximum has each element between 0 and the gradient, but their sum is
    more than any choice at the tie gives."""
    dirs, proj = got["dirs"].get(r.path), got["proj"].get(r.path)
    if dirs is None or proj is None or not len(proj):
        return None
    lo, hi = got["lo"][r.path], got["hi"][r.path]
    for k, d in enumerate(dirs):
        d64 = d.astype(np.float64)
        tol = float(np.abs(d64) @ np.ravel(np.broadcast_to(slack, lo.shape)))
        ps = proj[:, k]
        if not np.all(np.isfinite(ps)) or not tol > 0:
            continue
        top, bottom = float(np.max(ps)), float(np.min(ps))
        if top - bottom > tol:
            continue  # (the direction crosses a kink: its sides differ, and a choice may lie anywhere between)
        mid = 0.5 * (top + bottom)
        off = {n: float(d64 @ np.ravel(v)) for n, v in sides}
        out = {n for n, v in off.items() if not abs(v - mid) <= tol + 0.5 * (top - bottom)}
        if not out:
            continue
        worst = max(out, key=lambda n: abs(off[n] - mid))
        centre = 0.5 * (np.ravel(lo) + np.ravel(hi))
        v = dict(sides)[worst]
        flat = int(np.argmax(np.abs(d64) * np.abs(np.ravel(v) - centre)))
        idx = tuple(int(i) for i in np.unravel_index(flat, lo.shape))
        vals = {n: float(np.ravel(val)[flat]) for n, val in sides}
        note = (f"{r.note}; every element lies within the range of autodiff's gradient beside this point, but not "
                f"jointly: along a random direction that moves equal elements of the leaf together"
                f"{' and holds its zeros still' if k else ''} (so ties stay ties), autodiff's gradient at "
                f"{_NEARBY} points right beside this one and at this one with each kink on a side of its own gives "
                f"{_g(mid)} (± {_g(tol + 0.5 * (top - bottom))}) every time, while "
                + " and ".join(f"{n} gives {_g(off[n])}" for n, _ in sides if n in out)
                + f": a value no choice at the kinks gives (a max-pool backward that sends the whole gradient to "
                f"every tied maximum: each element lies between 0 and the gradient, their sum does not); it strays "
                f"most at {list(idx)}")
        verdict = (Verdict.BOTH_WRONG if len(out) > 1 else
                   Verdict.HAND_WRONG if "hand" in out else Verdict.AUTODIFF_WRONG)
        return dataclasses.replace(r, verdict=verdict, worst_index=idx, autodiff=vals["autodiff"],
                                   hand=vals.get("hand"), numeric=None, note=note)
    return None


def _copied(tree: Any) -> Any:
    """``tree`` with its NumPy arrays copied (the same tree when it holds none)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not any(type(x) is np.ndarray for x in leaves):
        return tree
    return jax.tree_util.tree_unflatten(treedef, [x.copy() if type(x) is np.ndarray else x for x in leaves])


def _autodiff_at(fn: Callable[..., Any], sel: Any, points: Iterable, args: tuple,
                 has_aux: bool, wide: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """JAX's gradient of fn at each of ``points`` (params with the same structure and fixed leaves), its
    differentiated leaves by path, as the user's own code gets it: at the parameters' dtypes and the caller's x64
    setting (jitted once; op by op where fn needs values in Python). Lazily: one point's gradient at a time.

    ``wide``: from the point of that number on, float32 parameters are evaluated in float64 instead (their values
    exactly), where fn draws no random numbers (it would draw others), outside a check isolated for its NumPy
    closures, and where that works at all (else as the user's code gets it): points a unit in the last place beside
    a tie of values computed from the parameters (two logits from equal weight columns) keep the tie after float32's
    rounding about one time in four, and a rule wrong only at ties is then read there, as if it were a side of the
    kink."""
    at = [i for i, d in enumerate(sel.diff) if d]
    f, _ = _as_leaf_fn(fn, sel, args, has_aux)
    grad: Callable[[list], Any] = jax.jit(jax.grad(f))
    # (not in a check isolated for a NumPy array fn closes over, see _isolating: each switch of the x64 setting
    # there clears JAX's caches, and 32 points would compile 32 times)
    widens = wide is not None and not _ISOLATE.get() and _widens(f, sel)
    for k, point in enumerate(points):
        dl = [jnp.asarray(x) for x, d in zip(jax.tree_util.tree_leaves(point), sel.diff, strict=True) if d]
        grads = None
        if widens and k >= (wide or 0):
            try:
                with _x64(True):
                    grads = [np.asarray(g) for g in grad([jnp.asarray(np.asarray(x, np.float64)) for x in dl])]
            except Exception:  # noqa: BLE001 - fn refusing float64 (lax ops of mixed dtypes): as the user's code runs
                widens = False
        if grads is None:
            try:
                grads = grad(dl)
            except Exception:  # noqa: BLE001 - Python control flow on a value: op by op, as jax.grad allows
                grad = jax.grad(f)
                grads = grad(dl)
        yield {sel.paths[i]: np.asarray(g) for i, g in zip(at, grads, strict=True)}


def _widens(f: Callable[[list], Any], sel: Any) -> bool:
    """Whether :func:`_autodiff_at` may evaluate the leaf function ``f`` in float64 (``wide``): its differentiated
    leaves all float32, and no random numbers drawn in it."""
    dl = [x for x, d in zip(sel.leaves, sel.diff, strict=True) if d]
    if not dl or any(jnp.result_type(x) != jnp.float32 for x in dl):
        return False
    try:
        closed = jax.make_jaxpr(f)([jnp.asarray(x) for x in dl])
    except Exception:  # noqa: BLE001 - no jaxpr (Python control flow on a value): as the user's code runs
        return False
    return not _random_widths(closed.jaxpr)


def _as_leaf_fn(fn: Callable[..., Any], sel: Any, args: tuple, has_aux: bool) -> tuple[Callable[[list], Any], list]:
    """fn as a scalar function of the differentiated leaves (a list), and their values at params."""
    at = [i for i, d in enumerate(sel.diff) if d]

    def f(dl: list) -> Any:
        leaves = list(sel.leaves)
        for i, x in zip(at, dl, strict=True):
            leaves[i] = x
        return jnp.asarray(_main_output(fn(jax.tree_util.tree_unflatten(sel.treedef, leaves), *args), has_aux))

    return f, [jnp.asarray(sel.leaves[i]) for i in at]


def _has_kinks(fn: Callable[..., Any], sel: Any, args: tuple, has_aux: bool) -> bool:
    """Whether fn can have kinks at all (:func:`funcgrad.verify._sides.has_kinks`)."""
    return has_kinks(*_as_leaf_fn(fn, sel, args, has_aux))


def _autodiff_sided(fn: Callable[..., Any], sel: Any, args: tuple, has_aux: bool,
                    seed: int) -> Iterator[dict[str, np.ndarray]]:
    """JAX's gradient of fn at params (``sel``: their selection), :data:`_NEARBY` times with each kink on a random
    side of its own (:func:`funcgrad.verify._sides.kink_sides`), its differentiated leaves by path, lazily; none
    where fn cannot be traced to a jaxpr (Python control flow on a value)."""
    at = [i for i, d in enumerate(sel.diff) if d]
    try:
        for d in kink_sides(*_as_leaf_fn(fn, sel, args, has_aux), _NEARBY, seed):
            yield {sel.paths[i]: g for i, g in zip(at, d, strict=True)}
    except Exception:  # noqa: BLE001 - no jaxpr to re-evaluate: the points beside are all there is
        return


def _shifted(sel: Any, seed: int, shift: float | None, groups: dict[int, Any] | None = None) -> Any:
    """``params`` with each element x of each differentiated leaf moved by a random shift·max(|x|, s)·N(0, 1), s the
    median size of the leaf's nonzero elements (of all differentiated leaves', where it has none; 1 where none has
    any): relative to each element, so that a leaf holding huge masked values (a causal mask's −1e9) moves its real
    ones by their own size, not by the mask's. In x's dtype, and by one unit in its last place at least (a bfloat16
    element would round 1% of itself back to itself). ``shift`` None: by :data:`_NEARBY_SHIFT` for the leaf's
    precision, where elements equal at params are then moved apart too (see :func:`_untied`; ``groups`` keeps each
    leaf's groups of them from one call to the next). ``sel``: the selection of params' leaves (see ``_select``)."""
    rng = np.random.default_rng([seed % 2**32, 0x6B696E6B])

    def typical(xs: list) -> float:
        a = np.concatenate([np.abs(np.ravel(np.asarray(x, np.float64))) for x in xs]) if xs else np.zeros(0)
        a = a[(a > 0) & np.isfinite(a)]
        return float(np.median(a)) if a.size else 0.0

    overall = typical([x for x, d in zip(sel.leaves, sel.diff, strict=True) if d])

    def moved(i: int, x: Any) -> Any:
        dtype = jnp.result_type(x)
        size = shift if shift is not None else _NEARBY_SHIFT.get(jnp.dtype(dtype).itemsize, 1e-2)
        x0 = np.asarray(x).astype(np.float64)
        noise = rng.standard_normal(np.shape(x)) * size * np.maximum(np.abs(x0), typical([x]) or overall or 1.0)
        y = (x0 + noise).astype(dtype)
        # (at least one unit in the last place, towards the noise's sign)
        y = np.where(y.astype(np.float64) == x0, np.nextafter(x0.astype(dtype), np.where(noise < 0, -np.inf, np.inf)
                                                              .astype(dtype)), y)
        if shift is None:  # (a point right beside: ties broken; a shift off the kinks moves each element its own way)
            found = groups.get(i) if groups is not None else None
            if found is None:
                found = _equal_groups(x0)
                if groups is not None:
                    groups[i] = found
            y = _untied(x0, y, rng, dtype, found)
        if isinstance(x, np.ndarray):  # (a NumPy hand gets NumPy arrays, as at the given point)
            return np.asarray(y, x.dtype)
        return jnp.asarray(y, dtype)

    leaves = [moved(i, x) if d else x for i, (x, d) in enumerate(zip(sel.leaves, sel.diff, strict=True))]
    return jax.tree_util.tree_unflatten(sel.treedef, leaves)


def _equal_groups(x0: np.ndarray) -> tuple[np.ndarray, np.ndarray] | tuple[()]:
    """The groups of equal elements of x0: each element's group and each group's size (``()`` where no two are
    equal)."""
    if x0.size < 2:
        return ()
    _, group, counts = np.unique(np.ravel(x0), return_inverse=True, return_counts=True)
    return (np.ravel(group), counts) if counts.max(initial=0) > 1 else ()


def _untied(x0: np.ndarray, y: np.ndarray, rng: np.random.Generator, dtype: Any,
            found: tuple[np.ndarray, np.ndarray] | tuple[()]) -> np.ndarray:
    """``y`` (x0 moved, see :func:`_shifted`), with elements equal in x0 (``found``: :func:`_equal_groups`) that
    moved to equal values too moved apart: within each group of x0's equal elements, in the order of their moved
    values (equal ones at random), each at least two units in the last place above the one before, the lowest where
    it was. Each element keeps the side its own move took wherever that is unambiguous. Moved by random amounts
    alone, two tied elements stay tied about as often as their moves round alike; a rule wrong only at ties (a
    max-pool backward sending the gradient to every tied maximum) would then give its wrong gradient at points meant
    to lie beside the kinks."""
    if not found:
        return y
    group, _ = found
    flat_y = np.ravel(y).astype(np.float64)
    n = flat_y.size
    order = np.lexsort((rng.random(n), flat_y, group))  # (by group, then moved value; equal values at random)
    g, sy = group[order], flat_y[order]
    fi = jnp.finfo(dtype)
    step = 4 * float(fi.eps) * np.maximum(np.abs(sy), float(fi.tiny))  # (two units in the last place at least)
    new = np.r_[True, g[1:] != g[:-1]]
    clash = ~new[1:] & ~(sy[1:] - sy[:-1] >= step[1:])
    if not clash.any():
        return y
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], n]
    for k in np.unique(np.searchsorted(starts, np.flatnonzero(clash) + 1, side="right") - 1):
        a, b = starts[k], ends[k]
        s = float(np.max(step[a:b])) * (1 + 2 * (b - a) * float(fi.eps))  # (the group's largest, with room to grow)
        j = np.arange(b - a)
        sy[a:b] = np.maximum.accumulate(sy[a:b] - s * j) + s * j
    out = np.empty(n)
    out[order] = sy
    return out.astype(dtype).reshape(np.shape(y))


def _check_grad_impl(fn: Callable[..., Any], params: Any, args: tuple, *, hand: Callable[..., Any] | None,
                     has_aux: bool, wrt: Any, rtol: float | None, atol: float | None, mode: str, seed: int,
                     reuse: bool, hand_reference: bool = False) -> GradReport:
    """:func:`check_grad`. ``reuse`` checks ``fn`` and ``hand`` themselves rather than fresh wrappers of them, so
    that checks of the same function objects share compilations (see below). ``hand_reference``: hand is only a
    reference that may fail where fn is right (verify.audit's plain autodiff of a rule's primal): a row is
    ``hand_wrong`` only when nothing else in it fails."""
    start = time.perf_counter()
    _check_options(fn, hand, mode, rtol, atol, seed, has_aux)
    caller_x64 = x64_enabled()
    sel, notes = _select(params, wrt)
    layout = sel.layout()
    dleaves, fleaves = sel.split()
    packed: tuple = (fleaves, args)
    specs = tuple((p, tuple(int(d) for d in getattr(x, "shape", ())), describe(x))
                  for p, x in zip(sel.paths, sel.leaves, strict=True))
    dtypes = tuple(jnp.result_type(x) for x in dleaves)
    user_dtypes = sorted({str(d) for d in dtypes})
    tiers = _concrete_tiers(jax.tree_util.tree_leaves(packed))
    fn0, hand0, packed0 = fn, hand, packed
    for tier, concrete in enumerate(tiers):
        fn, hand, packed = fn0, hand0, packed0
        try:
            if not reuse:
                # Traced afresh: a function may read globals (data, constants) that changed since an earlier
                # check. Identical traces share compilations (see _traced). Only check_vjp and check_jacobian,
                # which make their own wrappers for one call, pass reuse=True and keep the function objects.
                fn, hand, packed = _traced_functions(_Bound(fn, hand, sel.treedef, sel.diff, specs, has_aux), dleaves,
                                                     dtypes, packed, concrete)
            dyn, spec = _split_args((packed,), concrete)
            bound = _bound(fn, hand, sel.treedef, sel.diff, specs, has_aux)
            dyn_sig = tuple((tuple(d.shape), d.dtype) for d in dyn)
            facts = _static_facts(bound, layout, spec, dtypes, dyn_sig, caller_x64)
            break
        except (_UserValueError, _UserTypeError) as e:
            raise _clean(e) from None
        except _TRACE_ERRORS as e:  # fn uses a value in Python: perhaps an argument's (as jax.grad allows)
            if tier + 1 == len(tiers):
                raise _clean(_untraceable(e, "check_grad", "p", layout.paths)) from None
        except Exception as e:
            _noted_fn_failed(e, specs)
            raise
    if tier:
        notes.append(_concrete_note(packed0, tiers[tier]))
    repeated = _checked_before((bound, layout, spec, dtypes, dyn_sig, caller_x64))
    _retain(bound)
    if layout.n == 0:  # every differentiated leaf is empty: nothing to compare
        rows = [Row(p, Verdict.OK, None, 0.0, 0.0, None, None, None, "exact", 0, 0, 0,
                    "no elements (zero-size leaf): nothing to check") for p in layout.paths]
        return GradReport(tuple(rows), Verdict.OK, "check_grad", "/".join(user_dtypes), tuple(notes),
                          time.perf_counter() - start, {})
    prep = _Prepared(bound, hand is not None, dleaves, packed, dyn, spec, layout, dtypes, user_dtypes, caller_x64,
                     repeated, tiers[tier])
    base_notes = list(notes)
    options = _Options(has_aux, rtol, atol, mode, seed, hand_reference)

    try:
        rows, notes, plan, rtol_eff, eager = _compute(prep, facts, base_notes, options)
    except (_UserValueError, _UserTypeError) as e:
        raise _clean(_UndefinedValue(e.args[0] + _nonfinite_inputs(sel, args)) if isinstance(e, _UndefinedValue)
                     else e) from None
    except Exception as e:
        if any("funcgrad:" in n for n in getattr(e, "__notes__", ())):
            raise  # the user's NumPy hand failed
        if _leaked_tracer(e):
            raise TypeError(
                f"check_grad: fn leaks a value JAX traced inside it ({_first_line(e).rstrip('.')}): a custom rule's "
                "forward or backward (a custom_vjp's fwd or bwd, Flax's nn.custom_vjp) closes over a value traced "
                "inside fn (a scan's input, a parameter) rather than taking it as an argument or returning it among "
                "its residuals, so its derivative cannot run where JAX runs it; jax.grad(fn) fails on it too. "
                "verify.audit(fn, params, *args) names the rule") from None
        # Perhaps JAX cannot differentiate fn in one of the modes (lax.while_loop has no reverse mode): find
        # out, and check with the other; if both work, the failure was something else.
        diagnosed = _static_facts(bound, layout, spec, dtypes, tuple((tuple(d.shape), d.dtype) for d in dyn),
                                  caller_x64, True)
        if (diagnosed.reverse, diagnosed.jvp) == (facts.reverse, facts.jvp):
            raise
        facts = diagnosed
        rows, notes, plan, rtol_eff, eager = _compute(prep, facts, base_notes, options)

    unsure = [r.path for r in rows if r.verdict == Verdict.FD_UNRELIABLE and r.size]
    singular = [r.path for r in rows if r.verdict == Verdict.SINGULAR and r.size]
    if hand is None and (unsure or singular) and _holds_custom_rules(bound.fn):
        listed = unsure or singular
        why = ("the finite differences' error bars there are wider than the tolerance (fn computes in float32 or "
               "lower inside?)" if unsure else "finite differences there grow without bound as the step shrinks (no "
               "finite derivative: a router or gate at a tie, at zero weights?), where autodiff is not compared")
        notes.append(
            f"without a hand, autodiff could not be confirmed on {', '.join(listed[:_LIST])}"
            f"{'...' if len(listed) > _LIST else ''}: {why}, and fn calls custom derivative rules (its own or a "
            "library's), a wrong one of which could hide so; verify.audit(fn, params, *args) checks each rule at its "
            "inputs, and a hand decides")
    dtype = "/".join(user_dtypes) + (" (finite differences in float64)" if user_dtypes != ["float64"] else "")
    env = _environment(caller_x64, user_dtypes, facts, mode, plan, seed, rtol_eff, atol, hand, eager, has_aux,
                       layout, sel)
    return GradReport(tuple(rows), _combine_verdicts([r.verdict for r in rows]), "check_grad", dtype, tuple(notes),
                      time.perf_counter() - start, env)


def _nonfinite_inputs(sel: Any, args: tuple) -> str:
    """Where fn's inputs other than the differentiated leaves (check_grad refuses non-finite ones) hold NaN or inf:
    the leaves ``wrt`` holds fixed and the arguments, their first such elements (up to :data:`_LIST`), as a sentence
    to add to the message of a NaN value; "" where there are none."""
    fixed = [(p, x) for p, x, d in zip(sel.paths, sel.leaves, sel.diff, strict=True) if not d]
    bad = [e + " (held fixed by wrt)" for p, x in fixed for e in nonfinite_entries(x, f"params{p}")]
    bad += nonfinite_entries(tuple(args), "args")
    if not bad:
        return ""
    return ("; non-finite values fn reads: " + "; ".join(bad[:_LIST]) + ("; ..." if len(bad) > _LIST else ""))


def _holds_custom_rules(fn: Any) -> bool:
    """Whether fn, as traced for the check, calls a custom derivative rule (custom_vjp, custom_jvp) anywhere; False
    for a function that was not traced."""
    def holds(jaxpr: Any) -> bool:
        return any(e.primitive.name in _CUSTOM or any(holds(sub) for sub in _sub_jaxprs(e)) for e in jaxpr.eqns)

    traces = getattr(fn, "traces", ())
    return any(holds(t.jaxpr) for t in traces[:1])


def _noted_fn_failed(e: Exception, specs: tuple) -> None:
    """fn's own error while it is traced (a KeyError 'dense2', a dot_general's shapes, for params that do not match
    fn), noted with where and with what params; funcgrad's own errors, and hand's, say so already."""
    if not str(e).startswith("check_grad") and not any(str(n).startswith("funcgrad:") for n in getattr(e, "__notes__", ())):
        e.add_note("funcgrad: check_grad traced fn(params, *args) (as jax.jit does, at the parameters' shapes and "
                   f"dtypes), and fn failed there; params: {_listed(specs)}")


def _listed(specs: tuple, most: int = 8) -> str:
    """The leaves of ``specs`` ((path, shape, description) each) in a line: the first ``most``, then how many more."""
    shown = ", ".join(f"{path} {what}" for path, _, what in specs[:most])
    return shown + (f", and {len(specs) - most} more" if len(specs) > most else "") if specs else "no leaves"


def _traced_functions(bound0: _Bound, dleaves: list, dtypes: tuple, packed: tuple,
                      concrete: frozenset[int] = frozenset()) -> tuple[Any, Any, tuple]:
    """fn and hand traced at the parameters' precision and in float64, with the constants they close over
    appended to ``packed`` (see :mod:`funcgrad.verify._traced`); fresh wrappers of them where they cannot be
    traced (a NumPy hand; fn's own errors then surface where they always did)."""
    fn = _fresh(bound0.fn)
    hand = _fresh(bound0.hand) if bound0.hand is not None else None
    dyn, spec2 = _split_args(packed, concrete)
    dl_user = [jax.ShapeDtypeStruct(jnp.shape(x), d) for x, d in zip(dleaves, dtypes, strict=True)]
    dl64 = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.float64) for x in dleaves]
    dyn64 = [jax.ShapeDtypeStruct(jnp.shape(x), _dtype64(jnp.result_type(x))) for x in dyn]
    consts: list = []
    try:
        fn = trace_pair(bound0.raw, dl_user, dl64, dyn, dyn64, spec2, "fn", consts)
    except Exception:  # noqa: BLE001 - fn's own errors are reported by the checks, as for any function
        return fn, hand, packed
    if bound0.hand is not None:
        with contextlib.suppress(Exception):  # a NumPy hand (called eagerly), or one that fails: reported later
            hand = trace_pair(bound0.grad, dl_user, dl64, dyn, dyn64, spec2, "hand", consts)
    return fn, hand, (*packed, tuple(consts))


def _check_options(fn: Any, hand: Any, mode: Any, rtol: Any, atol: Any, seed: Any, has_aux: Any) -> None:
    """check_grad's arguments other than params and args: TypeError or ValueError when one is not valid."""
    if not callable(fn):
        raise TypeError(f"check_grad: fn must be callable; got {describe(fn)}")
    if hand is not None and not callable(hand):
        raise TypeError(f"check_grad: hand must be callable (params, *args) -> gradient; got {describe(hand)}")
    if mode not in ("auto", "exact", "projection"):
        raise ValueError(f"check_grad: mode must be 'auto', 'exact' or 'projection'; got {mode!r}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and in_range(value, 0.0):
            raise ValueError(f"check_grad: {name} must be a number >= 0 or None; got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"check_grad: seed must be an int; got {describe(seed)}")
    if not isinstance(has_aux, bool):
        raise TypeError(f"check_grad: has_aux must be True or False; got {describe(has_aux)}")


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A check's inputs as the compiled pieces take them (the same for a retry with diagnosed facts)."""

    bound: _Bound  # fn and hand bound to the differentiated leaves
    has_hand: bool
    dleaves: list  # the differentiated leaves
    packed: tuple  # (fixed leaves, args)
    dyn: list  # the traced arrays among the fixed leaves and args
    spec: tuple  # and where they go among the static values
    layout: _Layout
    dtypes: tuple  # the differentiated leaves' own dtypes
    user_dtypes: list[str]  # the distinct ones, as names, sorted
    x64: bool  # the caller's x64 setting (the user's code runs at it)
    repeated: bool = False  # the same trace was checked before in this process
    concrete: frozenset[int] = frozenset()  # ids of the arrays fn gets as values, at their own dtypes (see
    # _concrete_tiers): a NumPy hand gets them so too


class _Options(NamedTuple):
    """check_grad's settings that the comparison reads."""

    has_aux: bool
    rtol: float | None
    atol: float | None
    mode: str
    seed: int
    hand_reference: bool = False


def _compute(prep: _Prepared, facts: _Facts, base_notes: list[str],
             options: _Options) -> tuple[list[Row], list[str], _Plan, float, bool]:
    """The check with what tracing told (``facts``): the rows, the notes, the plan, the effective rtol, and
    whether hand was called eagerly (on NumPy arrays)."""
    notes = list(base_notes)
    if options.has_aux:
        aux = jax.tree_util.tree_leaves(facts.out_raw[1])
        notes.append(f"has_aux: the loss is checked; aux ({type(facts.out_raw[1]).__name__}, {len(aux)} leaves) is not")
    notes += list(facts.notes)
    eager = prep.has_hand and facts.hand_eager is not None
    if eager:
        notes.append(f"hand cannot be traced by JAX ({facts.hand_eager}); it was called eagerly on NumPy arrays "
                     "(float64 for the float64 check)")

    # A NumPy hand is called at the parameters' own precision first (for float64 parameters, the float64 check
    # is that precision); traced gradients at that precision are computed after the float64 ones (see
    # _in_float64), so that the two are never held in full together.
    hand_dtypes = facts.hand_dtypes
    h_user = None
    if eager and prep.user_dtypes != ["float64"]:
        hu = _eager_hand(prep, facts.hand_eager, False)
        hand_dtypes = tuple(np.asarray(x).dtype for x in hu)
        h_user = [np.ravel(np.asarray(x)) for x in hu]
    if prep.has_hand:
        # strict=False: hand_dtypes is empty for a hand called eagerly on float64 parameters (only in float64).
        def held(x: Any, pd: Any) -> str:  # a float64 NumPy array is float32 to JAX without x64
            raw = getattr(x, "dtype", None)
            return f" (a {raw} NumPy array: JAX holds it as {pd} without x64)" if (
                isinstance(x, np.ndarray) and raw is not None and jnp.dtype(raw) != jnp.dtype(pd)) else ""

        other = [f"{p or '(params)'} ({hd}, parameter {pd}{held(x, pd)})"
                 for p, hd, pd, x in zip(prep.layout.paths, hand_dtypes or (), prep.dtypes, prep.dleaves, strict=False)
                 if jnp.dtype(hd) != jnp.dtype(pd)]
        if other:
            notes.append("hand returns another float dtype than the parameter for " + ", ".join(other[:_LIST])
                         + ("..." if len(other) > _LIST else "") + "; compared in float64")

    # In float64: autodiff, hand and finite differences, compared (and the parameters' own precision).
    rows, plan, rtol_eff = _in_float64(prep, facts, eager, options, h_user, notes)
    return rows, notes, plan, rtol_eff, eager


def _eager_hand(prep: _Prepared, hand_eager: str | None, float64: bool) -> list:
    """hand, which JAX cannot trace (``hand_eager`` says why), called on NumPy arrays (float64 when asked)."""
    dl = [_host(x, float64) for x in prep.dleaves]
    try:
        try:
            return prep.bound.grad(dl, _host_tree(prep.packed, float64, prep.concrete))
        except Exception as e:
            if not _DTYPE_CLASH.search(str(e)):
                raise
            # jnp code inside the hand on a float64 NumPy array it closes over, run before at the parameters' own
            # precision: JAX (0.10) can hand a jitted jnp function that array's float32 copy under x64. Run op by op.
            with jax.disable_jit():
                return prep.bound.grad(dl, _host_tree(prep.packed, float64, prep.concrete))
    except Exception as e:
        e.add_note(f"funcgrad: hand could not be traced by JAX ({hand_eager}), so check_grad called it "
                   "on NumPy arrays, where it failed")
        raise


def _in_float64(prep: _Prepared, facts: _Facts, eager: bool, options: _Options, h_user: list | None,
                notes: list[str]) -> tuple[list[Row], _Plan, float]:
    """The float64 check: autodiff, hand and finite differences compared, a row per leaf (with the results at
    the parameters' own precision, when not float64; ``h_user``: a NumPy hand's there). Appends to ``notes``;
    returns the rows, the plan and the effective rtol.

    Memory: the two float64 gradients are the only arrays of the parameters' size the probe returns. They are
    read in one pass (with the gradients at the parameters' own precision, computed one at a time meanwhile)
    and freed before the finite differences run, which convert the parameters to float64 inside each
    perturbation. Below :data:`_OVERLAP_ELEMENTS` parameters, where that memory does not matter, the gradients at
    the parameters' own precision and the first finite differences are dispatched before the float64 gradients are
    read, so that XLA computes them while Python analyses those."""
    layout = prep.layout
    user = prep.user_dtypes != ["float64"]
    user_in = lambda: (_views(prep.dleaves), _views(prep.dyn))  # noqa: E731 - fresh views for each setting (see _views)
    prep = dataclasses.replace(prep, dleaves=_views(prep.dleaves), dyn=_views(prep.dyn))
    with _x64(True):
        h_given = None
        hand64, hand_inner = facts.hand64, facts.hand_inner64
        if eager:
            h64 = _eager_hand(prep, facts.hand_eager, True)
            hand64 = tuple(np.asarray(x).dtype for x in h64)
            h_given = [jnp.asarray(np.ravel(np.asarray(x, np.float64)), jnp.float64) for x in h64]
            # (NumPy code: what it computes in is its output's dtype, as far as one can tell)
            hand_inner = tuple((d, jnp.dtype(jnp.float64), jnp.dtype(jnp.float64)) for d in hand64)
        # (only a hand may use those values unrounded: without one the allowance is not used)
        measured = (_measured_const(prep.bound, layout, prep.spec, prep.dyn, facts.grad64_const)
                    if prep.has_hand and any(d != jnp.float64 for d in facts.grad64_const) and options.rtol is None
                    else None)
        eps_f, rtols = _precision_plan(facts, layout, hand64, hand_inner, options.rtol, notes, measured)
        rtol_eff = float(np.max(rtols[:, 0], initial=0.0))  # (reported: the loosest)
        h0 = _first_step(eps_f)
        # (forward mode against reverse mode only where fn's own derivative rules could make them differ)
        plan, exact_idx = _make_plan(options.mode, layout, facts.flops, prep.has_hand, facts.reverse,
                                     facts.jvp and facts.modes_differ,
                                     facts.dependence, prep.repeated)
        seed = np.uint32(options.seed % 2**32)
        tp = (rtols, -1.0 if options.atol is None else float(options.atol), float(jnp.finfo(jnp.float64).eps))

        # (the probe reads the plan's items, not how the finite differences run them: a plan whose runs change from
        # the first check to the next, see _make_plan, compiles the probe once)
        probe_plan = dataclasses.replace(plan, groups=(), pad_min=8, separate=False, batch=1)

        def probe() -> _ProbeOut:
            return _probe(prep.dleaves, prep.dyn, h_given, exact_idx, seed, h0, *tp, fn=prep.bound.value,
                          hand=prep.bound.grad if prep.has_hand and not eager else None, layout=layout,
                          args_spec=prep.spec, plan=probe_plan)

        res = probe()
        # Small parameters: XLA computes the gradients at the parameters' own precision while Python reads the
        # float64 ones, and the first finite differences while it analyses them. Large ones one at a time.
        overlap = layout.n <= _OVERLAP_ELEMENTS
        user_grad = functools.partial(_user_grad, fn=prep.bound.value, layout=layout, dtypes=prep.dtypes,
                                      args_spec=prep.spec, reverse=facts.reverse)
        user_hand = functools.partial(_user_hand, hand=prep.bound.grad, layout=layout, args_spec=prep.spec)
        user_both = functools.partial(_user_both, fn=prep.bound.value, hand=prep.bound.grad, layout=layout,
                                      dtypes=prep.dtypes, args_spec=prep.spec, reverse=facts.reverse)
        early_u, early_h = _dispatch_own(user_in, user_grad, user_hand if prep.has_hand and not eager else None,
                                         prep.x64, user_both) if user and overlap else (None, None)
        a = [np.asarray(x) for x in res.a]
        h = None if res.h is None else [np.asarray(x) for x in res.h]
        res = res._replace(a=None, h=None)  # the host's views above are the only references left
        f0 = float(res.f0)
        _check_value(f0)
        f_ad = float(res.f_ad)
        if (math.isfinite(f0) or math.isfinite(f_ad)) and not math.isclose(f_ad, f0, rel_tol=rtol_eff):
            notes.append(f"fn's value under differentiation ({f_ad:.9g}, as jax.value_and_grad gives it) differs from "
                         f"its value ({f0:.9g}): a custom rule's forward (a custom_vjp's fwd, a custom_jvp's rule) "
                         "returns another primal output than its function, so the gradient autodiff gives belongs to "
                         "another function; verify.audit(fn, params, *args) names the rule")
        engine = _Engine(prep, plan, res, seed, eps_f, tp, probe)
        engine.hand_reference = options.hand_reference
        engine.default_tolerances = options.rtol is None and options.atol is None
        engine.eps_grad = [float(jnp.finfo(d).eps) for d in facts.grad64 or (facts.inner64,) * len(layout.paths)]
        items = _Items(*(np.asarray(x) for x in res.items))
        low_hand = _low_hand(hand_inner if h is not None else None, eager, user, prep.dtypes, facts, options)
        # (autodiff at the parameters' own precision read before the analysis where it sets its tolerances)
        value_u, a_user = _set_allowance(engine, low_hand, a, lambda: _own_grad(early_u, user_grad, user_in, prep.x64),
                                          prep.dtypes, facts.inner_user, eager, notes)
        pending = _dispatched(lambda: _first_reading(items, engine, prep.has_hand, later=True)) if overlap else None
        engine.analyse(a, h, items.index)
        if user and a_user is None:
            value_u, a_user = _own_grad(early_u, user_grad, user_in, prep.x64)
        early_u = None
        if math.isinf(f0):
            notes.append(f"fn(params, *args) = {f0} at these parameters: the function itself is singular there (a "
                         "log of 0?), so no element has a finite derivative to check; each is reported singular "
                         "where autodiff and hand agree, a mismatch where they do not")
        elif user and not np.isfinite(float(value_u)):
            raise _UserValueError(f"fn(params, *args) = {float(value_u)} at the parameters' own precision "
                                  f"({'/'.join(prep.user_dtypes)}), though {f0:.6g} in float64: it overflows or loses "
                                  "all precision there")

        def own_hand() -> list:  # hand at the parameters' own dtypes, traced (a NumPy hand's came with h_user)
            if early_h is not None:
                return [np.asarray(x) for x in early_h]
            with _x64(prep.x64):
                return [np.asarray(x) for x in user_hand(*user_in())]

        user_gaps = None
        eps_own = float(jnp.finfo(facts.inner_user).eps)
        if facts.draws64:
            # The float64 check evaluates fn with other random numbers: its gradients are not those of fn at the
            # parameters' own dtypes, which are compared with them only for being finite, then.
            if a_user is not None and h is not None and h_user is None:
                h_user = own_hand()
            user_gaps = _user_gaps(a_user, h_user if h is not None else None, a, h, eps_own)
            notes.append(_draws_note(user_gaps, layout, eps_own))
        elif a_user is not None:
            engine.user_side("autodiff", a_user, a)
            a = None  # type: ignore[assignment]  # (freed before hand's gradient at the parameters' own dtypes is computed)
            if h is not None:
                if h_user is None:
                    h_user = own_hand()
                engine.user_side("hand", h_user, h)
            engine.user_values(a_user, h_user if h is not None else None)
        del a, h, a_user, h_user
        rows = _rows(items, np.asarray(res.P), engine, prep.has_hand, user and not facts.draws64,
                     float(jnp.finfo(facts.inner_user).eps), options.hand_reference, pending)
        if user_gaps is not None:
            rows = _at_own_dtypes(rows, user_gaps, eps_own, layout)
    return rows, plan, rtol_eff


def _dispatched(f: Callable[[], Any]) -> Any:
    """``f()``, a computation dispatched ahead of where the check reads it (XLA computes it while Python goes on), or
    None where it fails (a callback refusing float32, jax_debug_nans): computed again where the check reads it, its
    error comes after the check's own (fn overflowing at the parameters' precision, say), as without dispatching."""
    try:
        return f()
    except Exception:  # noqa: BLE001 - raised again where it is read (see above)
        return None


def _dispatch_own(user_in: Callable, user_grad: Callable, user_hand: Callable | None, x64: bool,
                  user_both: Callable | None = None) -> tuple:
    """The gradients at the parameters' own precision (autodiff's value and gradient, and hand's), dispatched at the
    caller's x64 setting, as the user's code runs (see :func:`_dispatched`): with a hand, in one program
    (``user_both``) where it compiles and runs, else one program each (a hand failing at these dtypes fails then
    where its gradient is read, after fn's own errors, as without the shared program)."""
    def dispatch(f: Callable) -> Any:
        with _x64(x64):
            return f(*user_in())

    if user_hand is not None and user_both is not None:
        both = _dispatched(lambda: dispatch(user_both))
        if both is not None:
            return both
    return _dispatched(lambda: dispatch(user_grad)), None if user_hand is None else _dispatched(lambda: dispatch(user_hand))


def _own_grad(early: Any, user_grad: Callable, user_in: Callable, x64: bool) -> tuple[Any, list]:
    """Autodiff's value and gradient at the parameters' own precision, as NumPy arrays per leaf: the ones dispatched
    early (``early``), or computed now at the caller's x64 setting, as the user's code runs."""
    with _x64(x64):
        value, grad = early if early is not None else user_grad(*user_in())
    return value, [np.asarray(x) for x in grad]


def _set_allowance(engine: _Engine, low_hand: list[float] | None, a64: list, own: Callable[[], tuple[Any, list]],
                   dtypes: Sequence[Any], inner_user: Any, numpy: bool, notes: list[str]) -> tuple[Any, list | None]:
    """Sets ``engine.allow_el`` and ``engine.allow`` (see :func:`_hand_allowance`) where ``low_hand`` (see
    :func:`_low_hand`) says it applies, from autodiff at the parameters' own precision (``own()``: its value and
    gradient, returned), and appends the note; (None, None) elsewhere."""
    if low_hand is None:
        return None, None
    value, a_user = own()
    eps_u = float(jnp.finfo(inner_user).eps)
    engine.allow_el = _hand_allowance(a_user, a64, low_hand, [max(float(jnp.finfo(d).eps), eps_u) for d in dtypes])
    engine.allow = np.array([0.0 if x is None else float(np.sqrt(np.mean(np.square(x)))) for x in engine.allow_el])
    notes += _allowance_notes(engine, low_hand, numpy)
    return value, a_user


def _low_hand(hand_inner: tuple | None, eager: bool, user: bool, dtypes: Sequence[Any], facts: _Facts,
              options: _Options) -> list[float] | None:
    """Per leaf, the rounding of the precision hand computes in (``hand_inner``; None without a hand), where some is
    lower than float64 and :func:`_hand_allowance` applies: with parameters below float64 (their autodiff measures
    the rounding), default tolerances (given ones are the user's), and outside verify.audit (``hand_reference``: its
    "hand" is a primal's plain autodiff and its "autodiff" the rule under test, whose rounding would excuse itself).
    What a NumPy hand (``eager``) computes in cannot be seen: as low as the parameters' precision, say. None where
    the allowance does not apply."""
    if (hand_inner is None or not user or facts.draws64 or options.rtol is not None or options.atol is not None
            or options.hand_reference):
        return None
    low = [float(jnp.finfo(inner).eps) for inner, _, _ in hand_inner]
    if eager:
        low = [max(e, float(jnp.finfo(d).eps)) for e, d in zip(low, dtypes, strict=True)]
    return low if any(e > float(jnp.finfo(jnp.float64).eps) for e in low) else None


def _hand_allowance(a_user: list, a64: list, eps_hand: list[float], eps_user: list[float]) -> list:
    """Per leaf, what each element of a hand that computes in a lower precision than float64 (``eps_hand``, per
    leaf) is allowed beside the float64 gradients (flat; None for leaves whose hand computes in float64): 4 times the
    gap between autodiff at the parameters' own precision (``a_user``, computed with rounding ``eps_user``) and in
    float64 (``a64``) at that element, the rounding a computation of that very element shows at that precision (the
    terms it sums), scaled to the hand's (``eps_hand / eps_user``, at most 1); at most max(1e-3, 30·eps) of the whole
    gradient's scale, the precision loss the check accepts from either side at the parameters' precision (see
    :func:`_user_precision`). Element by element: the leaf's largest gap (an element summing terms that cancel)
    allowed at every element let a constant element of the wrong sign pass beside it (h115).

    A float32 hand's bias gradient, a sum over 30,000 samples whose true value is 0, is 6e-4 (float32 autodiff gives
    the same): far beyond float32's round-off at the whole gradient's scale (4·eps·115 = 5e-5), which sees only the
    sums' results, not their 30,000 terms of 0.3-0.7 (h113: the exact hand read hand_wrong)."""
    eps64 = float(jnp.finfo(jnp.float64).eps)
    scale = max((_abs_max(x, np.isfinite(x)) for x in a64), default=0.0)
    out: list[np.ndarray | None] = [None] * len(a64)
    for li, (u, r, e_h, e_u) in enumerate(zip(a_user, a64, eps_hand, eps_user, strict=True)):
        if e_h <= eps64 or not np.size(r):
            continue
        with np.errstate(invalid="ignore"):
            dev = np.abs(np.asarray(u, np.float64).reshape(-1) - r)
        out[li] = np.minimum(4 * min(1.0, e_h / e_u) * np.where(np.isfinite(dev), dev, 0.0), max(1e-3, 30 * e_u) * scale)
    return out


def _allowance_notes(engine: _Engine, eps_hand: list[float], numpy: bool) -> list[str]:
    """A note on the leaves where :func:`_hand_allowance` allows more than the tolerances' own floor did somewhere."""
    wider, most = [], {}
    for li, el in enumerate(engine.allow_el):
        rtol, _, eps = engine.tp_of(li)
        floor = rtol[0] * engine.leaf_max[li] + (64 * eps + 4 * rtol[5]) * engine.gmax + engine.zero[li]
        most[li] = float(np.max(el, initial=0.0)) if el is not None else 0.0
        if most[li] > floor:
            wider.append(li)
    if not wider:
        return []
    low = _dtype_of_eps(max(eps_hand[li] for li in wider))
    paths = _listed(tuple((engine.layout.paths[li] or "params", None, f"{most[li]:.3g}") for li in wider))
    how = (f"a NumPy hand may compute in {low} inside (what it computes in cannot be seen: nnfs.init() makes np.dot "
           "return float32)" if numpy else f"hand computes in {low}")
    return [f"{how}: each element may be off by 4 times the rounding autodiff shows at that element at the "
            f"parameters' own precision (against float64), at most: {paths}"]


# Parameters up to this many: the pieces of a check are dispatched together (see _in_float64); 32 MB a float64 copy.
_OVERLAP_ELEMENTS = 1 << 22


def _own_limit(eps: float) -> float:
    """hand against autodiff at the parameters' own dtypes, where the float64 check draws other random numbers:
    the gap allowed, relative to each element plus the leaf's largest value (100 units in the last place, at
    least 1e-5, at most 5%)."""
    return min(0.05, max(100 * eps, 1e-5))


def _user_gaps(a_user: list | None, h_user: list | None, a64: list, h64: list | None, eps: float) -> list | None:
    """Per leaf, at the parameters' own dtypes: (hand against autodiff: the largest gap in units of what
    :func:`_own_limit` allows, its flat index, autodiff and hand there, or None without a hand; the flat index of an
    element where autodiff is not finite though its float64 gradient is finite everywhere on the leaf, or None;
    the same for hand). None without autodiff at those dtypes."""
    if a_user is None:
        return None
    limit = _own_limit(eps)
    out = []
    for k, a_leaf in enumerate(a_user):
        a = np.asarray(a_leaf, np.float64)
        h = None if h_user is None else np.asarray(h_user[k], np.float64)

        def nonfinite(u: np.ndarray | None, ref: Any) -> int | None:
            if u is None or ref is None or not u.size or np.isfinite(u).all() or not np.isfinite(ref).all():
                return None
            return int(np.argmax(~np.isfinite(u)))

        bad_a, bad_h = nonfinite(a, a64[k]), nonfinite(h, None if h64 is None else h64[k])
        pair = None
        if h is not None and a.size:
            scale = float(np.max(np.abs(np.where(np.isfinite(a), a, 0.0))))
            with np.errstate(invalid="ignore"):
                gap = np.where(np.isnan(a) & np.isnan(h), 0.0, np.abs(a - h))
                units = gap / (limit * (np.abs(a) + scale) + 1e-300)
            units = np.where(np.isnan(units), np.inf, units)
            i = int(np.argmax(units))
            pair = (float(units[i]), i, float(a[i]), float(h[i]))
        out.append((pair, bad_a, bad_h))
    return out


def _draws_note(gaps: list | None, layout: _Layout, eps: float) -> str:
    """The note for a function whose float64 trace draws other random numbers (see ``_Facts.draws64``), with how far
    apart autodiff and hand are at the parameters' own dtypes (``gaps``, see :func:`_user_gaps`), where fn and hand
    draw as the user's code does."""
    note = ("fn draws random numbers with jax.random at a dtype that follows x64 (the default float, as "
            "jax.random.bernoulli(key, 0.5, shape) and Flax's Dropout do, or the parameters' dtype): in float64 it draws "
            "other numbers than at the parameters' own dtypes (another dropout mask, other noise), so the float64 "
            "check, of autodiff (and hand) against finite differences, is of fn with those numbers, and the gradients "
            "at the parameters' own dtypes were compared with it only for being finite. For a leaf where hand "
            "disagrees with autodiff in float64 only, hand is judged against autodiff at the parameters' own dtypes, "
            f"where both draw as your code does (a gap of {_own_limit(eps):.1g} of the element plus the leaf's largest "
            "value is allowed: weaker than the float64 check). To check in float64, draw at a fixed dtype "
            "(jax.random.bernoulli(key, jnp.float32(p), shape), jax.random.normal(key, shape, jnp.float32)) or "
            "outside fn, passing the result as an argument")
    pairs = [(p, g[0]) for p, g in zip(layout.paths, gaps or (), strict=False) if g[0] is not None]
    if not pairs:
        return note
    listed = [f"{p or '(params)'} {g[0]:.2g}" for p, g in pairs]
    return (f"{note}. At the parameters' own dtypes, hand's largest gap from autodiff, in units of that allowance: "
            f"{', '.join(listed[:_LIST])}" + ("..." if len(listed) > _LIST else ""))


def _at_own_dtypes(rows: list[Row], gaps: list, eps: float, layout: _Layout) -> list[Row]:
    """Rows of a float64 check that draws other random numbers than fn at the parameters' own dtypes (see
    :func:`_draws_note`), decided at those dtypes where they can be: a side whose gradient is not finite there,
    though finite in float64, is wrong; a row that blames hand (autodiff agreed with finite differences in
    float64) is decided by hand against autodiff there: ok within :func:`_own_limit`, else hand_wrong at the element
    farthest apart."""
    limit = _own_limit(eps)
    by_path = dict(zip(layout.paths, gaps, strict=True))
    out = []
    for r in rows:
        if r.path not in by_path:
            out.append(r)
            continue
        pair, bad_a, bad_h = by_path[r.path]
        shape = layout.shapes[layout.paths.index(r.path)]
        nonfinite = [(side, i) for side, i in (("autodiff", bad_a), ("hand", bad_h)) if i is not None]
        if nonfinite and r.verdict not in _BLAMES:
            side, i = nonfinite[0]
            index = tuple(int(k) for k in np.unravel_index(i, shape))
            out.append(dataclasses.replace(
                r, verdict=Verdict.AUTODIFF_WRONG if side == "autodiff" else Verdict.HAND_WRONG, worst_index=index,
                numeric=None, max_abs_err=math.inf, max_rel_err=math.inf,
                note=f"{side} is not finite at {list(index)} at the parameters' own dtypes, though finite at every "
                     "element in float64"))
            continue
        if r.verdict != Verdict.HAND_WRONG or pair is None:
            out.append(r)
            continue
        units, i, a, h = pair
        index = tuple(int(k) for k in np.unravel_index(i, shape))
        err = abs(a - h)
        shown = dict(worst_index=index, autodiff=a, hand=h, numeric=None, max_abs_err=err,
                     max_rel_err=err / max(abs(a), abs(h), 1e-300) if err else 0.0)
        if units <= 1.0:
            out.append(dataclasses.replace(r, verdict=Verdict.OK, **shown, note=(
                "hand disagrees with autodiff in float64, whose random draws differ from fn's at the parameters' own "
                f"dtypes; there hand agrees with autodiff at every element (at most {units:.2g} of the {limit:.1g} of "
                "the element plus the leaf's largest value allowed); autodiff agrees with finite differences")))
        else:
            out.append(dataclasses.replace(r, verdict=Verdict.HAND_WRONG, **shown, note=(
                f"hand ({h:.6g}) differs from autodiff ({a:.6g}) at {list(index)} at the parameters' own dtypes, "
                f"where both draw as your code does, by {units:.2g} times the {limit:.1g} of the element plus the "
                "leaf's largest value allowed; autodiff agrees with finite differences in float64")))
    return out


def _precision_plan(facts: _Facts, layout: _Layout, hand64: tuple, hand_inner: tuple, rtol: float | None,
                    notes: list[str], measured: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per leaf, the rounding its finite differences carry (eps) and its analytic tolerances' parameters (rows of
    rtol, and the eps, smallest normal, smallest subnormal and flushing (1 or 0) of the dtype hand rounds its result
    to, zeros where it does not; see :func:`_tolerance`). Appends notes on low precisions.

    Finite differences along a leaf carry the rounding of fn's output and of the lowest precision fn computes in
    from that leaf (what does not depend on it is the same at every step, and cancels). Each leaf's tolerance
    follows the lowest precision its gradients are computed in: its float64 gradient's path through fn (a leaf
    whose gradient never meets fn's bfloat16 part keeps float64 tolerances), and hand's computation of it
    (``hand_inner``, final casts aside). A hand that only casts a float64 result to ``hand64`` (a mixed-precision
    policy's ``g.astype(bfloat16)``) rounds each element by half a unit in its last place: a tolerance of each
    element's own, not one scaled by the leaf's largest gradient, which would pass a wrong sign on its small
    elements.

    Values that do not depend on the parameters, rounded on a gradient's way (data cast to bfloat16), are allowed
    for (twice their rounding) with a hand or without one: a hand may use them unrounded, and a custom rule may
    round them where fn's value does not (a residual saved in bfloat16), which finite differences never see (h88:
    without the allowance such a rule, accurate to that rounding, failed)."""
    eps_of = lambda dt: float(jnp.finfo(dt).eps)  # noqa: E731
    paths = [p or "params" for p in layout.paths]
    eps_f = np.array([max(eps_of(facts.out64), eps_of(d)) for d in facts.noise64 or (facts.inner64,) * len(paths)],
                     np.float64)
    grad64 = facts.grad64 or (facts.inner64,) * len(paths)
    comp = [eps_of(d) for d in grad64]
    # (values that do not depend on the parameters, rounded on a gradient's way: a hand may have them unrounded)
    # (measured at their values where given: see _measured_const)
    const = [max(eps_of(jnp.float64), m) for m in measured] if measured else [
        eps_of(d) for d in facts.grad64_const or (jnp.float64,) * len(paths)]
    cast: list[Any] = [None] * len(paths)  # the dtype hand rounds each leaf's result to, if it does
    low = [p for p, d in zip(paths, grad64, strict=True) if d != jnp.float64]
    if low:
        lowest = functools.reduce(_lower, grad64)
        which = "" if len(low) == len(paths) else f" where the gradients of {', '.join(low)} pass"
        loose = f" (rtol {_default_rtol(eps_of(lowest)):.2g})"
        notes.append(f"fn computes in {lowest} even with float64 inputs{which}; "
                     + (f"tolerances follow it{loose}" if not which else f"their tolerances follow it{loose}, the other "
                        "leaves' stay float64's"))
    elif facts.out64 != jnp.float64:
        notes.append(f"fn's output is cast to {facts.out64} even with float64 inputs: finite differences carry its "
                     "rounding (autodiff and hand are still compared to float64 precision)")
    # strict=False: hand64 and hand_inner are empty without a hand.
    for i, (dtype, (inner, read, hconst)) in enumerate(zip(hand64, hand_inner, strict=False)):
        comp[i] = max(comp[i], eps_of(inner))
        const[i] = max(const[i], eps_of(hconst))
        # (a constant made in dtype reads as float64)
        rounded = _lower(read, dtype) if inner == jnp.float64 and dtype != jnp.float64 else read
        if rounded != jnp.float64:
            cast[i] = rounded
        how = f" (a cast of a float64 result: {rounded}'s rounding is allowed)" if rounded != jnp.float64 else ""
        if dtype != jnp.float64:
            notes.append(f"hand returns {dtype} for {paths[i]} even with float64 inputs{how}")
        elif how:
            notes.append(f"hand rounds {paths[i]} to {rounded} even with float64 inputs{how}")
        if inner not in (jnp.float64, dtype):
            notes.append(f"hand computes {paths[i]} in {inner} even with float64 inputs; its tolerance follows {inner}"
                         f" (rtol {_default_rtol(eps_of(inner)):.2g})")
        elif inner != jnp.float64 and _default_rtol(eps_of(inner)) > 1e-6:
            notes.append(f"hand computes {paths[i]} in {inner}; its tolerance follows it (rtol "
                         f"{_default_rtol(eps_of(inner)):.2g})")
    rtols = np.zeros((len(paths), 6), np.float64)
    if rtol is not None:  # the user's tolerance overrides everything, a cast's rounding too
        rtols[:, 0] = float(rtol)
        return eps_f, rtols
    rtols[:, 0] = [max(_default_rtol(c), min(0.05, 2 * k)) for c, k in zip(comp, const, strict=True)]
    # (the round-off at the whole gradient's scale, float32's at most: a float32 hand's gradient whose true value is 0;
    # a 16-bit one's is already within rtol of the leaf's scale elsewhere, and more would pass 16-bit errors)
    rtols[:, 5] = np.minimum(comp, eps_of(jnp.float32))
    rounded = [p for p, c, k in zip(paths, comp, const, strict=True) if 2 * k > max(_default_rtol(c), 1e-6)]
    if rounded:
        notes.append(f"values that do not depend on the parameters (data, masks, scales) are rounded to "
                     f"{_dtype_of_eps(max(const))} on the way of the gradients of {', '.join(rounded)}: as a hand may "
                     "use them unrounded, those gradients may differ by twice that rounding "
                     f"(rtol {min(0.05, 2 * max(const)):.2g})")
    for i, dt in enumerate(cast):
        if dt:  # the cast's rounding (see _tolerance)
            fi = jnp.finfo(dt)
            rtols[i, 1:5] = float(fi.eps), float(fi.smallest_normal), float(fi.smallest_subnormal), float(_flushes(dt))
    return eps_f, rtols


def _dtype_of_eps(eps: float) -> str:
    """The float dtype whose machine epsilon is ``eps``."""
    for dt in (jnp.float64, jnp.float32, jnp.float16, jnp.bfloat16):
        if float(jnp.finfo(dt).eps) == eps:
            return str(jnp.dtype(dt))
    return f"eps {eps:.2g}"


@functools.lru_cache(maxsize=8)
def _flushes(dtype: Any) -> bool:
    """Whether converting to ``dtype`` flushes its subnormals to zero on this backend (XLA's CPU does for
    bfloat16, not for float16)."""
    with _x64(True):
        tiny = float(jnp.finfo(dtype).smallest_subnormal)
        return float(jnp.asarray(np.float64(2 * tiny)).astype(dtype).astype(jnp.float64)) == 0.0


@functools.lru_cache(maxsize=1)
def _installed_versions() -> tuple[str | None, str | None]:
    """funcgrad's and jaxlib's installed versions (read once: the metadata lookup costs milliseconds per check)."""

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return version("funcgrad"), version("jaxlib")


def _environment_versions() -> dict:
    """The versions and backend a verdict was reached with."""
    funcgrad_version, jaxlib_version = _installed_versions()
    return {
        "funcgrad": funcgrad_version,
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
    }


def _environment(x64, user_dtypes, facts, mode, plan, seed, rtol, atol, hand, eager, has_aux, layout, sel) -> dict:
    """What a bug report about a verdict needs: versions, backend, precision and the check's settings."""
    return {
        **_environment_versions(),
        "x64": x64,
        "dtypes": {"params": list(user_dtypes), "output": str(facts.out.dtype), "check": "float64"},
        "mode": mode,
        "seed": int(seed),
        "rtol": rtol,
        "atol": float(atol) if atol is not None else "rtol × each leaf's largest gradient",
        "autodiff": "reverse mode" if plan.reverse else "forward mode",
        # (compared only where fn meets a derivative rule that is not JAX's own: see _modes_may_differ)
        "forward_mode_compared": bool(plan.jvp),
        "hand": None if hand is None else ("NumPy, called eagerly" if eager else "traced"),
        "has_aux": has_aux,
        "leaves": {"differentiated": len(layout.paths), "fixed": sum(1 for d in sel.diff if not d)},
        "parameters": layout.n,
    }


@dataclasses.dataclass
class _Item:
    """One comparison: an element (index into the leaf) or a random direction (index None)."""

    verdict: Verdict
    index: tuple[int, ...] | None
    A: float
    H: float | None
    N: float  # the finite-difference value shown: the estimate, or at a kink the nearest one-sided bound
    abs_err: float
    rel_err: float
    fd_err: float = float("nan")
    lo: float = float("nan")  # the one-sided derivatives at a kink
    hi: float = float("nan")
    kink: bool = False
    resolved: bool = True
    fd_finite: bool = True
    user_precision: bool = False  # N is the float64 value of the same side, not finite differences
    tol_ah: float = 0.0  # the tolerance of autodiff against hand (a direction's: over its elements)


def _make_item(verdict, index, A, H, fd: _FD | None = None, k: int | np.integer = 0, N: float | None = None) -> _Item:
    A = float(A)
    H = None if H is None else float(H)
    extra: dict[str, Any] = {}
    if fd is not None:
        lo, hi, kink = float(fd.lo[k]), float(fd.hi[k]), bool(fd.nonsmooth[k] and fd.resolved[k])
        N = float(fd.value[k])
        if kink:  # the nearest valid subgradient to the value judged
            ref = H if H is not None and math.isfinite(H) else A
            N = min(max(ref, lo), hi) if math.isfinite(ref) else N
        extra = {"fd_err": float(fd.err[k]), "lo": lo, "hi": hi, "kink": kink, "resolved": bool(fd.resolved[k]),
                 "fd_finite": bool(fd.finite[k])}
    N = float("nan") if N is None else float(N)
    vals = [A, N] + ([H] if H is not None else [])
    diffs = [abs(A - N)] + ([abs(H - N), abs(A - H)] if H is not None else [])
    if H is not None and not math.isfinite(A) and A == H:
        diffs[-1] = 0.0
    abs_err = max(diffs) if all(math.isfinite(d) for d in diffs) else float("inf")
    mag = max((abs(v) for v in vals if math.isfinite(v)), default=0.0)
    rel_err = abs_err / mag if mag > 0 else (0.0 if abs_err == 0 else float("inf"))
    return _Item(Verdict(verdict), None if index is None else tuple(int(i) for i in index), A, H, N, abs_err, rel_err,
                 **extra)


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.6g}"


def _close(a: float, b: float) -> bool:
    """Two values the same to about float32's tolerance (for a note's wording only)."""
    return bool(abs(a - b) <= 1e-3 * max(abs(a), abs(b))) or (math.isnan(a) and math.isnan(b))


def _note_for(verdict: Verdict, item: _Item | None, extra: Sequence[str]) -> str:
    parts = []
    if item is not None and verdict != Verdict.OK:
        at = f"at {list(item.index)}" if item.index is not None else "along a random direction"
        # (as the verdict reads it: within the reading's error and the comparison's tolerance)
        slack = (2 * item.fd_err if math.isfinite(item.fd_err) else 0.0) + item.tol_ah
        outside = [name for name, v in (("autodiff", item.A), ("hand", item.H))
                   if v is not None and item.kink and not item.lo - slack <= v <= item.hi + slack]
        meet = ("several kinks may meet at this point along this direction (e.g. ReLUs of several samples at 0 "
                "moving in opposite directions), where a per-kink convention need not lie between D₋ and D₊")
        sides = f"D₋/D₊ = [{_g(item.lo)}, {_g(item.hi)}]" if item.kink else ""
        fd = (f"finite differences give {_g(item.N)} ± {_g(item.fd_err)}" if not item.kink
              else f"the one-sided derivatives are {sides} (± {_g(item.fd_err)})")
        why_unsure = ("finite differences do not settle as the step shrinks (noise, a discontinuity, or kinks all "
                      "around the point)" if not item.resolved else
                      f"{fd}; their error estimate is not far enough below the disagreement to decide" if item.abs_err
                      else f"{fd}; their error estimate is too wide to confirm it")
        if not item.fd_finite:
            why_unsure = "the function is not finite on both sides of the point, so finite differences cannot judge"
        hand_part = f", hand {_g(item.H)}" if item.H is not None else ""
        if item.user_precision:  # (N: finite differences, not the side's float64 value, which h94 found stated)
            fd = f"finite differences (in float64) give {_g(item.N)} ± {_g(item.fd_err)}"
        parts.append({
            Verdict.KINK: (
                (f"not differentiable {at}: {fd}, and autodiff ({_g(item.A)})"
                 + (f" and hand ({_g(item.H)})" if item.H is not None else "") + " lie between them") if
                item.kink and not outside else
                (f"not differentiable {at}: {fd}; "
                 + (f"autodiff ({_g(item.A)}) and hand ({_g(item.H)}) both lie" if len(outside) == 2 else
                    f"{outside[0]} ({_g(item.A if outside[0] == 'autodiff' else item.H)}) lies")
                 + f" outside: {meet}; finite differences cannot judge there (check at a point off the kinks to "
                 "be sure)") if item.kink
                else (f"kinks at or right next to {at.removeprefix('at ')} (within the finite-difference steps): "
                      f"{fd}, which cannot separate autodiff ({_g(item.A)})"
                      + (f" and hand ({_g(item.H)})" if item.H is not None else "") + "; both are accepted")),
            Verdict.SINGULAR: (
                f"no finite derivative {at}: the difference quotients grow without bound as the step "
                f"shrinks (sqrt or log at 0, |x|^p with p < 1, a discontinuity); autodiff gives {_g(item.A)}"
                + (f" and hand {_g(item.H)}, which describe it alike" if item.H is not None else "")),
            Verdict.FD_UNRELIABLE: (
                (f"autodiff and hand agree {at} ({_g(item.A)}); {why_unsure}" if _close(item.A, item.H) else
                 f"autodiff ({_g(item.A)}) and hand ({_g(item.H)}) differ {at}, both within the finite differences' "
                 f"error bars, which cannot tell which is right: {why_unsure}") if item.H is not None
                else f"autodiff ({_g(item.A)}) cannot be confirmed {at}: {why_unsure}"),
            Verdict.HAND_WRONG: (
                f"hand ({_g(item.H)}) differs from autodiff ({_g(item.A)}) and finite differences {at}; {fd}"
                + (f" (unless {meet})" if item.kink else "")),
            Verdict.AUTODIFF_WRONG: (
                f"autodiff ({_g(item.A)}) differs from finite differences"
                + (f" and hand ({_g(item.H)})" if item.H is not None else "") + f" {at}; {fd}"
                + (f" (unless {meet})" if item.kink else "")),
            Verdict.BOTH_WRONG: (
                f"autodiff and hand agree {at} ({_g(item.A)}), but {fd}, confidently: a mistake both "
                "share (a stop_gradient, or a custom rule copied into the hand formula?)"),
            Verdict.MISMATCH: (
                f"autodiff ({_g(item.A)}){hand_part} and finite differences disagree {at}; no one side can "
                f"be blamed: " + (
                    "the derivative does not exist there (the difference quotients grow without bound) "
                    "and the two sides describe it differently" if not item.resolved and not item.fd_finite
                    else why_unsure if not item.resolved else fd)),
        }[verdict])
    parts += list(extra)
    return "; ".join(parts)


def _first_reading(items: _Items, engine: _Engine, has_hand: bool, later: bool = False) -> Any:
    """The finite differences :func:`_rows` reads first, along the probe's items: F and JV (see
    :meth:`_Engine.evaluate`), or with ``later`` a :class:`_Pending` of them."""
    plan, n_items = engine.plan, len(items.index)
    scaled = _Items._make([*(np.tile(x, plan.scales) for x in items[:4]),
                           np.concatenate([items.step / _LADDER**level for level in range(plan.scales)])])
    want = None
    if plan.jvp:  # forward mode along each leaf's first direction (at the first scale)
        want = np.zeros(n_items * plan.scales, bool)
        want[_first_directions(plan, n_items)] = True
    # A costly function (a single scale) with a hand: a central difference at a quarter of the step first, the
    # ladder's four offsets only where it does not settle the item (see _Engine.ladder): half the evaluations where
    # all agree. Not without a hand: the central difference's truncation error is not estimated, and a rule off by
    # just that much (sin(10x)'s -w²h²/6, 5.7e-7 relative) would settle; with a hand that is independent of
    # autodiff, both would have to be off by it.
    outer = _outer_first(plan, has_hand)
    if outer:
        scaled = scaled._replace(step=scaled.step / _OUTER_STEP)
    return engine.evaluate(scaled, want, pad=False, leaves=np.tile(_item_leaves(plan, engine.layout), plan.scales),
                           cols=_OUTER if outer else None, later=later)


def _first_directions(plan: _Plan, n_items: int) -> list[int]:
    """Each leaf's first direction among the probe's ``n_items`` items (its elements first, then its directions)."""
    d_leaf = _dir_items(plan)[0]
    n_i = n_items - len(d_leaf)
    return [n_i + d_leaf.index(i) for i in range(len(plan.exact))]


def _outer_first(plan: _Plan, has_hand: bool) -> bool:
    """Whether the first reading is a costly function's central difference alone (see :func:`_first_reading`)."""
    return plan.scales == 1 and has_hand


def _rows(items: _Items, P: np.ndarray, engine: _Engine, has_hand: bool, user: bool, eps_inner: float,
          hand_reference: bool = False, pending: _Pending | None = None) -> list[Row]:
    """The probe's finite differences along its items (``P``: the directions' projections), read out into a row
    per leaf, with the evaluations beyond them (finer steps, arbitration, bisection). ``pending``: the first
    reading (:func:`_first_reading`), dispatched before the gradients were analysed; used where the directions'
    supports it was planned with did not change (no gradient was found non-finite)."""
    layout, plan = engine.layout, engine.plan
    flat = items.index  # each item's element (-1: a direction)
    is_el = flat >= 0
    n_items = len(flat)
    d_leaf = np.array(_dir_items(plan)[0], np.int64)
    n_i = n_items - len(d_leaf)  # elements first, then the directions
    first = _first_directions(plan, n_items)
    outer = _outer_first(plan, has_hand)
    if pending is not None and all(x is y for x, y in zip(pending.support, engine.support, strict=True)):
        F, JV = pending.result()
    else:
        F, JV = _first_reading(items, engine, has_hand)
    F = np.stack([F[level * n_items : (level + 1) * n_items] for level in range(plan.scales)], axis=1)
    jvp = JV[first]

    proj = np.zeros((n_items, 3))  # each item's projections: autodiff, hand, the aggregated tolerance
    proj[n_i:] = P
    proj[n_i:, 2] += engine.allow[d_leaf]  # (a unit direction: each element's allowance adds up to it at most)
    av, hv, tv, tahv = engine.values(flat[is_el])
    A = proj[:, 0].copy()
    A[is_el] = av
    H = None
    if has_hand:
        H = proj[:, 1].copy()
        H[is_el] = hv
    base_tol = proj[:, 2].copy()
    base_tol[is_el] = tv
    item_leaves = engine.leaf_of(items.index, items.lo)
    item_tol_ah = proj[:, 2].copy()
    item_tol_ah[is_el] = tahv
    fd = engine.ladder(items, np.maximum(base_tol, engine.floor_at(item_leaves, items.step)),
                       initial=None if outer else F, values=[A] if H is None else [A, H], also=JV[:n_items],
                       outer=F[:, 0] if outer else None)
    # (read with the floor the ladder measured along each leaf: see _Engine.floor_at; and the round-off at zero no
    # wider than what finite differences resolve: see _Engine.resolved_zero)
    less = engine.resolved_zero(item_leaves, fd, is_el)
    base_tol -= less
    item_tol_ah -= less
    item_tol = np.maximum(base_tol, engine.floor_at(item_leaves, items.step))
    verdicts = _classify(A, H, fd, item_tol, lenient=~is_el, tol_ah=item_tol_ah, reference=engine.hand_reference,
                         scale=engine.global_scale)
    item_leaf = np.where(is_el, np.searchsorted(np.array(layout.offsets), np.maximum(flat, 0), side="right") - 1,
                         np.concatenate([np.zeros(int(is_el.sum()), int), d_leaf]))
    verdicts = _at_their_own_size(verdicts, A, H, fd, is_el, item_leaf, engine)

    rows = []
    for li, (path, shape, o, s) in enumerate(zip(layout.paths, layout.shapes, layout.offsets, layout.sizes, strict=True)):
        lf = engine.leaves[li]
        row_items: list[_Item] = []
        for k in np.nonzero(item_leaf == li)[0]:
            if not is_el[k] and (s == 0 or lf.empty_support):
                continue  # a direction with nothing to move: no information
            index = np.unravel_index(flat[k] - o, shape) if is_el[k] else None
            row_items.append(dataclasses.replace(_make_item(verdicts[k], index, A[k], None if H is None else H[k], fd,
                                                            k), tol_ah=float(item_tol_ah[k])))
        extra = list(lf.extra)
        if plan.exact[li]:
            _waive_kinked_directions(row_items, extra)
        if lf.n_order:
            _arbitrate_disagreements(li, has_hand, engine, row_items, extra)
        if has_hand:
            _waive_explained_directions(row_items, extra)
        _locate_failing_projection(li, has_hand, engine, row_items, extra)
        if plan.jvp and not lf.empty_support and s:
            k_dir = int(np.nonzero(~is_el)[0][list(d_leaf).index(li)])
            _compare_modes(float(jvp[li]), float(A[k_dir]), k_dir, lf.nonfinite > 0, fd, item_tol, item_tol_ah,
                           float(engine.eps_f[li]), row_items, extra, engine.f0 if math.isfinite(engine.f0) else 0.0)
        if user and s:
            # (fn may compute in bfloat16; a custom rule's backward pass too)
            eps = max(float(jnp.finfo(engine.user_dtypes[li]).eps), eps_inner, engine.eps_grad[li])
            extra_u, items_u = _user_precision(li, engine, has_hand, eps, skip=_blamed_sides(row_items))
            extra += extra_u
            row_items += items_u
        row = _row(path, li, s, row_items, extra, plan, hand_reference)
        if (row.verdict == Verdict.FD_UNRELIABLE and s and engine.leaf_max[li] == 0 and row.numeric is not None
                and math.isfinite(row.numeric) and row.numeric != 0):
            # (undecided, as the verdict says; but a gradient that is exactly 0 everywhere while fn moves with the
            # leaf is what an underflow in a low-precision backward pass gives: worth the user's look)
            row = dataclasses.replace(row, note=(
                f"{row.note}; {'autodiff and hand give' if has_hand else 'autodiff gives'} exactly 0 at every "
                f"element of this leaf, while the finite differences' estimate is {row.numeric:.6g}: a gradient that "
                "underflows in a "
                "low-precision backward pass (a float8 or float16 cast of the gradient) reads so; scale the loss, "
                "or check with a hand"))
        rows.append(row)
    return rows


# An element's own share of the tolerance where it is read at its own size (see _at_their_own_size), and how much
# finer than that finite differences must be there.
_OWN_SIZE_RTOL = 1e-3
_OWN_SIZE_FD = 0.1


def _at_their_own_size(verdicts: np.ndarray, A: np.ndarray, H: np.ndarray | None, fd: Any, is_el: np.ndarray,
                       item_leaf: np.ndarray, engine: _Engine) -> np.ndarray:
    """The elements checked one by one that passed, read again against a tolerance of their own size where the
    leaf's is far wider: 0.1% of the element (plus float64's round-off at the whole gradient's scale), where finite
    differences there are smooth and ten times finer than that, and fn computes in float64 throughout with the
    default tolerances and no cast of hand's. The leaf's tolerance is relative to its largest gradient (1e-7 of it
    in float64), which, across a leaf of wide dynamic range, is more than a small element itself: a rule for rsqrt
    50% off at a variance of 1 passed beside a variance of 1e-6 (h93). A side confidently off finite differences
    at its own size is then wrong; a correct float64 gradient is not 0.1% off an element that finite differences
    resolve."""
    out = verdicts.copy()
    if not engine.default_tolerances:
        return out
    # (float64 throughout: rtol at its floor; and no cast of hand's, whose rounding each element is allowed)
    rtols = engine.tp[0]
    # (nor a hand computing in a lower precision: see _hand_allowance)
    pure = ((rtols[:, 0] <= 1.01e-7) & ~np.any(rtols[:, 1:5] != 0, axis=1) & (engine.allow == 0))[item_leaf]
    cand = is_el & pure & (verdicts == Verdict.OK) & fd.resolved & fd.finite & ~fd.nonsmooth & ~fd.singular
    if not cand.any():
        return out
    with np.errstate(invalid="ignore"):
        mag = np.abs(A) if H is None else np.maximum(np.abs(A), np.abs(H))
        eps = float(engine.tp[2])
        tight = _OWN_SIZE_RTOL * np.maximum(mag, np.abs(fd.value)) + 64 * eps * engine.gmax + engine.zero[item_leaf]
        cand &= fd.err <= _OWN_SIZE_FD * tight
    if not cand.any():
        return out
    again = _classify(A, H, fd, tight, lenient=~is_el, tol_ah=tight, reference=engine.hand_reference,
                      scale=engine.global_scale)
    wrong = cand & np.isin(again.astype(str), [Verdict.AUTODIFF_WRONG.value, Verdict.HAND_WRONG.value,
                                               Verdict.BOTH_WRONG.value])
    out[wrong] = again[wrong]
    return out


def _between_sides(it: _Item, v: float | None) -> bool:
    """Whether a value (None: no value) lies between an element's one-sided derivatives, within its reading's error."""
    slack = 2 * it.fd_err + 1e-9 * max(abs(it.lo), abs(it.hi))
    return v is None or min(it.lo, it.hi) - slack <= v <= max(it.lo, it.hi) + slack


def _waive_kinked_directions(items: list[_Item], extra: list[str]) -> None:
    """A leaf checked element by element, each element at a kink between its one-sided derivatives: a random
    direction whose reading crosses kinks tells nothing the elements did not. Along several kinks at once (ReLUs of
    several samples at 0), a valid one-sided choice per element need not lie between the direction's one-sided
    derivatives, so such a direction neither fails the row nor blames a side against what the elements found; it
    is reported ``kink``."""
    # Only where each element passed at a kink lies between its own one-sided derivatives: a value outside them
    # that passed as one of several kinks meeting at the element (the lenient reading) may be wrong, and the
    # direction is then the evidence left. (An element that fails decides the row itself.)
    if not all(_between_sides(it, it.A) and _between_sides(it, it.H) for it in items
               if it.index is not None and it.kink and it.verdict not in _FAILING):
        return
    waived = [it for it in items if it.index is None and it.kink and it.verdict in _FAILING]
    for it in waived:
        it.verdict = Verdict.KINK
    if waived:
        extra.append("a random direction through kinks disagreed where each element, checked on its own, decides: "
                     "along several kinks at once a valid one-sided choice per element need not lie between the "
                     "direction's one-sided derivatives, so the direction is not judged (kink)")


def _waive_explained_directions(items: list[_Item], extra: list[str]) -> None:
    """A direction whose reading is too coarse to see kinks that the elements resolved (a jump of 2e-9 beside a
    curvature of 1e-3), where every element passes and each kinked one has autodiff and hand between its one-sided
    derivatives: if autodiff and hand differ along it by no more than those elements' choices of one-sided derivative
    account for, and one side fits its reading, it tells nothing the elements did not; it is reported ``kink``.
    A gap beyond that is evidence left (errors each below an element's tolerance that add up), and is judged."""
    elements = [it for it in items if it.index is not None]
    kinks = [(it, it.H) for it in elements if it.kink and it.H is not None]
    if not kinks or any(it.verdict in _FAILING for it in elements):
        return
    if not all(_between_sides(it, it.A) and _between_sides(it, h) for it, h in kinks):
        return
    budget = sum(abs(it.A - h) for it, h in kinks)  # (each direction is a unit vector)

    def one_side_fits(it: _Item) -> bool:
        h = it.H if it.H is not None else math.nan  # (asked only of items with a hand value)
        return it.verdict != Verdict.MISMATCH or min(abs(it.A - it.N), abs(h - it.N)) <= 2 * it.fd_err + it.tol_ah

    waived = [it for it in items if it.index is None and not it.kink and it.H is not None
              and it.verdict in (Verdict.HAND_WRONG, Verdict.AUTODIFF_WRONG, Verdict.MISMATCH) and one_side_fits(it)
              and abs(it.A - it.H) <= budget + it.tol_ah]
    for it in waived:
        it.verdict = Verdict.KINK
    if waived:
        extra.append("a random direction disagreed by no more than the kinked elements' choices of one-sided derivative "
                     "(its steps too coarse to see kinks the elements resolved), so it is not judged (kink)")


def _fails(it: _Item, hand_reference: bool) -> bool:
    """Whether an item fails fn: not a failure of hand alone where hand is only a reference (see _row)."""
    return it.verdict in _FAILING and not (hand_reference and it.verdict == Verdict.HAND_WRONG)


def _arbitrate_disagreements(li: int, has_hand: bool, engine: _Engine, items: list[_Item], extra: list[str]) -> None:
    """Disagreeing elements of leaf ``li`` (or, without a hand, non-finite ones), worst first and not checked by
    the probe already, are arbitrated in growing rounds until one fails: a wrong element must not hide behind
    disagreements that are only kinks (two valid conventions). Appends to ``items`` and ``extra``."""
    lf = engine.leaves[li]
    o, shape = engine.layout.offsets[li], engine.layout.shapes[li]
    order = [int(i) for i in lf.order]
    ref = engine.hand_reference
    skipped = 0
    if ref and lf.n_reference_nonfinite:
        # hand is only a reference (audit: the primal's plain autodiff): the elements where it alone is not finite
        # (the NaN a rule exists for) come last in the order (see _badness), and only the first round's worth of
        # them is checked: each is the reference's failure, not fn's, and must not use up the rounds before an
        # element where fn is wrong.
        n_finite = lf.n_order - lf.n_reference_nonfinite
        keep = min(len(order), n_finite + _ARBITRATION_ROUNDS[0])
        skipped = lf.n_order - max(keep, n_finite)
        order = order[:keep]
    checked = 0
    for size in _ARBITRATION_ROUNDS:
        batch = order[checked : checked + size]
        if not batch:
            break
        new = _arbitrate(np.array(batch), li, has_hand, engine)
        items += new
        checked += len(batch)
        if any(_fails(it, ref) for it in new):
            break
    left = lf.n_order - skipped - checked
    if skipped and left <= 0 and not any(_fails(it, ref) for it in items):
        extra.append(f"the primal's plain autodiff is not finite at {skipped} more element(s), beyond the ones of that "
                     "kind checked one by one: those were not checked")
    if left > 0 and not any(_fails(it, ref) for it in items):
        i = order[checked]
        what = "autodiff and hand disagree" if has_hand else "autodiff is not finite"
        extra.append(f"{what} at {left} more element(s) than the {checked} checked one by one (all passing): "
                     "too many to check, so the leaf cannot pass")
        av, hv = engine.values(np.array([i]))[:2]
        items.append(_make_item(Verdict.MISMATCH, np.unravel_index(i - o, shape), av[0], hv[0] if has_hand else None,
                                N=float("nan")))


def _locate_failing_projection(li: int, has_hand: bool, engine: _Engine, items: list[_Item], extra: list[str]) -> None:
    """A projection that fails with no element to show for it: bisect down to the element. Appends to ``items``
    and ``extra``; a located element that is blamed explains the failing projections (their verdict becomes its)."""
    bad_dirs = [it for it in items if it.index is None and it.verdict in _FAILING]
    if bad_dirs and not any(it.index is not None and _fails(it, engine.hand_reference) for it in items):
        located = _bisect(li, has_hand, engine)
        items.append(located)
        if located.verdict in _FAILING:
            extra.append("element located by bisecting a failing random projection")
            if located.verdict in _BLAMES:
                for it in items:  # the located element explains the failing projections
                    if it.index is None and it.verdict == Verdict.MISMATCH:
                        it.verdict = located.verdict
        elif engine.leaves[li].n_order or any(it.index is not None and it.H is not None and it.A != it.H
                                              and it.verdict == Verdict.KINK for it in items):
            extra.append("bisecting the failing random projection singled out no element failing on its own: autodiff "
                         "and hand disagree at the element(s) listed, where finite differences accept each value alone "
                         "(several kinks may meet there), so only the direction's joint reading fails")
        else:
            extra.append("bisecting the failing random projection singled out no failing element (the "
                         "disagreement is spread over many elements)")


def _compare_modes(jv: float, jr: float, k: int, nonfinite: bool, fd: _FD, item_tol: np.ndarray,
                   item_tol_ah: np.ndarray, eps_f: float, items: list[_Item], extra: list[str], f0: float = 0.0) -> None:
    """Forward mode (``jv``, the jvp) against reverse mode (``jr``, grad·u) along a leaf's first random direction,
    item ``k``; finite differences say which one is wrong. Appends to ``items`` and ``extra``."""
    if not math.isfinite(jv) and nonfinite:
        extra.append("forward mode not compared: autodiff is not finite at some elements of this leaf")
    # (forward mode's tangent is rounded to fn's output dtype, e.g. by a final cast to bfloat16)
    elif not abs(jv - jr) <= item_tol_ah[k] + 4 * eps_f * max(abs(jv), abs(jr)) and not (
            # (a gap at the rounding of fn's value, both modes inside finite differences' error bars: rounding where
            # the gradients' scale gives no tolerance, e.g. every gradient exactly 0 and the modes' terms cancelling)
            abs(jv - jr) <= 64 * eps_f * abs(f0)
            and _consistent(np.array([jv, jr]), fd.take([k, k]), item_tol[[k, k]]).all()):
        fwd_right = bool(_consistent(np.array([jv]), fd.take(slice(k, k + 1)), item_tol[k : k + 1])[0])
        extra.append(
            f"forward mode (jvp {jv:.6e}) and reverse mode (grad·u {jr:.6e}) disagree along a random "
            f"direction; finite differences give {fd.value[k]:.6e}: {'reverse' if fwd_right else 'forward'} "
            "mode is wrong"
        )
        items.append(_make_item(Verdict.AUTODIFF_WRONG, None, jr if fwd_right else jv, None, fd, k))


def _blamed_sides(items: Sequence[_Item]) -> set[str]:
    """The sides already found wrong in float64 (not judged again at the parameters' own precision)."""
    already = {"hand" if it.verdict == Verdict.HAND_WRONG else "autodiff" for it in items if it.verdict in _BLAMES}
    if any(it.verdict == Verdict.BOTH_WRONG for it in items):
        already = {"hand", "autodiff"}
    return already


def _row(path, li, size, items, extra, plan, hand_reference: bool = False) -> Row:
    verdict = _combine_verdicts([it.verdict for it in items]) if items else Verdict.OK
    if hand_reference and verdict in _FAILING:
        # hand is only a reference: its failures must not hide, or blur into a mismatch, another element's
        # disagreement with fn (a NaN of the primal's plain autodiff at 0 beside a rule wrong at [2]).
        others = _combine_verdicts([it.verdict for it in items if it.verdict != Verdict.HAND_WRONG])
        if others in _FAILING:
            verdict = others
    if verdict == Verdict.OK:
        cands = [it for it in items if it.index is not None] or items
    else:
        # An element rather than a direction where one fails: the verdict's own first, then an unattributed
        # disagreement (not an element blaming another side).
        same = [it for it in items if it.verdict == verdict]
        failing = [it for it in items if it.verdict in _FAILING and (it.verdict not in _BLAMES or verdict not in _BLAMES)]
        cands = ([it for it in same if it.index is not None] or [it for it in failing if it.index is not None]
                 or same or failing or items)
    worst = max(cands, key=lambda it: (it.index is not None, _err_key(it.abs_err)), default=None)
    return Row(
        path=path,
        verdict=verdict,
        worst_index=worst.index if worst is not None else None,
        max_abs_err=float(worst.abs_err) if worst is not None else 0.0,
        max_rel_err=float(worst.rel_err) if worst is not None else 0.0,
        autodiff=worst.A if worst is not None else None,
        hand=worst.H if worst is not None else None,
        numeric=worst.N if worst is not None else None,
        method="exact" if plan.exact[li] else "projection",
        size=size,
        checked=len({it.index for it in items if it.index is not None}),
        directions=sum(1 for it in items if it.index is None),
        note=_note_for(verdict, worst, extra) if size else "no elements (zero-size leaf): nothing to check",
    )


def _badness(a, h, tol, nonfinite, reference: bool = False):
    """How far autodiff and hand are apart, in tolerances; non-finite elements first. ``reference``: hand is only a
    reference (see _row), and elements where it alone is not finite (the NaN a rule exists for) come last."""
    if h is None:
        return np.where(nonfinite, 1e308, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.abs(a - h) / np.maximum(tol, 1e-300)
    b = np.where(nonfinite | np.isnan(b), 1e308, b)
    return np.where(~np.isfinite(h) & np.isfinite(a), -1.0, b) if reference else b


def _arbitrate(flat: np.ndarray, li: int, has_hand: bool, engine: _Engine) -> list[_Item]:
    """Finite differences at elements where autodiff and hand disagree (or are not finite): who is wrong."""
    fd, tv = engine.at_elements(flat)
    av, hv, _, tahv = engine.values(flat)
    tahv = tahv - engine.resolved_zero(engine.leaf_of(flat), fd)
    H = hv if has_hand else None
    verdicts = _classify(av, H, fd, tv, tol_ah=tahv, reference=engine.hand_reference, scale=engine.global_scale)
    o, shape = engine.layout.offsets[li], engine.layout.shapes[li]
    return [_make_item(verdicts[k], np.unravel_index(i - o, shape), av[k], None if H is None else H[k], fd, k)
            for k, i in enumerate(flat)]


def _bisect(li: int, has_hand: bool, engine: _Engine) -> _Item:
    """Locates an element responsible for a failing projection: halve the direction's support, keep the half
    whose finite-difference check fails worst, until one element is left; then check that element."""
    layout, plan = engine.layout, engine.plan
    o, s = layout.offsets[li], layout.sizes[li]
    step = engine.h0[li] * max(1.0, float(engine.size[li]))
    d_leaf, d_j = _dir_items(plan)
    streams = [j for leaf, j in zip(d_leaf, d_j, strict=True) if leaf == li]

    def badness(j, ranges):
        """How far each half's projection is from finite differences, in units of the allowed error (one
        scale: only the comparison between the halves matters here)."""
        n = len(ranges)
        lo, hi = np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges])
        F = engine.evaluate(_Items(np.full(n, -1), np.full(n, j), lo, hi, np.full(n, step)))[0]
        P = engine.projections(li, j, lo, hi)
        dt = np.maximum(P[:, 2], engine.floor_at(li, step))
        sc = _scale(engine.f0, F, np.full(n, step), engine.eps_f[li], dt)
        refs = [P[:, 0]] if not has_hand else [P[:, 0], P[:, 1]]
        with np.errstate(invalid="ignore", divide="ignore"):
            bad = np.max([np.abs(r - sc.value) for r in refs], axis=0) / (2 * sc.err + dt)
        return np.where(np.isnan(bad), 1e308, bad)

    j = max(streams, key=lambda j: float(badness(j, [(o, o + s)])[0]))
    lo, hi = o, o + s
    while hi - lo > 1:
        mid = (lo + hi) // 2
        bad = badness(j, [(lo, mid), (mid, hi)])
        lo, hi = (lo, mid) if bad[0] >= bad[1] else (mid, hi)
    return _arbitrate(np.array([lo]), li, has_hand, engine)[0]


def _side_eps(engine: _Engine, li: int, name: str, eps: float) -> float:
    """The rounding a side's gradient of leaf ``li`` carries at the parameters' own precision (``eps``): a hand that
    rounds its result, to bfloat16 say, rounds each precision's gradient apart by an ulp of that dtype."""
    return max(eps, float(engine.tp[0][li][1])) if name == "hand" else eps


def _user_precision(li: int, engine: _Engine, has_hand: bool, eps: float, skip=()) -> tuple[list[str], list[_Item]]:
    """The parameters' own precision (e.g. float32) against float64 for leaf ``li`` (see :meth:`_Engine.user_side`):
    a side whose values are not finite, or that loses far more precision than the other side, is wrong at that
    precision only. Sides already found wrong in float64 (``skip``) are not judged again. Deviations are
    measured against the leaf's largest value, or the whole gradient's when that is larger (rounding follows the
    gradient's overall scale: a leaf whose true gradient is 0 still gets round-off)."""
    lf, shape = engine.leaves[li], engine.layout.shapes[li]
    sides = ["autodiff", "hand"] if has_hand else ["autodiff"]
    extra, items = [], []
    over = [name for name in sides if name in lf.overflow and name not in skip]
    if over:
        n, i, v, dt = lf.overflow[over[0]]
        extra.append(f"{' and '.join(over)} overflow{'s' if len(over) == 1 else ''} {dt} at "
                     f"{[int(k) for k in np.unravel_index(i, shape)]}" + (f" and {n - 1} other element(s)" if n > 1 else "")
                     + f": the float64 value there, {v:.6g}, is beyond {dt}'s largest ({float(jnp.finfo(dt).max):.6g}), "
                     "so the right gradient is an infinity at the parameters' precision (a loss scaled down, or this "
                     "gradient kept in a wider dtype, would hold it)")
    for name in sides:
        if name in skip:
            continue
        r, nonfinite, best = lf.user[name]
        others = [lf.user[n][0] for n in sides if n != name]
        e = _side_eps(engine, li, name, eps)
        gross = bool(others) and r > max(1e-3, 30 * e) and r > 30 * max(others[0], 1e-7)
        if nonfinite or gross:
            i, ref = best
            what = "is not finite" if nonfinite else f"loses precision (deviation {r:.1e} of its scale)"
            extra.append(f"{name} {what} at the parameters' own precision, though right in float64")
            blame = Verdict.AUTODIFF_WRONG if name == "autodiff" else Verdict.HAND_WRONG
            a_u, h_u = lf.user_at[i]
            it = _make_item(blame, np.unravel_index(i, shape), a_u, h_u if has_hand else None, N=ref)
            it.user_precision = True
            items.append(it)
    if has_hand and not items:
        items += _user_branch(li, engine, eps, skip, extra)
    return extra, items


def _user_branch(li: int, engine: _Engine, eps: float, skip, extra: list[str]) -> list[_Item]:
    """Where both sides move at the parameters' own precision (neither grossly more than the other): each one's
    element that moved most, against finite differences there. A side outside what they allow (a kink's interval
    too), while the other lies inside, is wrong at that precision only: a branch that only the lower precision
    takes, as float32 makes a residual exactly 0 (an MAE tie) where float64 leaves it 1e-9, and a hand that
    mishandles that tie (3/N for np.sign(0)) passed while its float64 copy was right. Appends to ``extra``."""
    lf, shape, o = engine.leaves[li], engine.layout.shapes[li], engine.layout.offsets[li]
    items: list[_Item] = []
    for k, name in enumerate(("autodiff", "hand")):
        r, _, best = lf.user[name]
        e = _side_eps(engine, li, name, eps)
        if name in skip or best is None or r <= max(1e-3, 30 * e):
            continue
        i = int(best[0])
        values = lf.user_at[i]
        fd = engine.at_elements(np.array([o + i]))[0]
        if not (fd.finite[0] and fd.resolved[0]) or fd.singular[0]:
            continue
        lo, hi = float(fd.lo[0]), float(fd.hi[0])
        if fd.near_kink[0] and fd.near_lo is not None and fd.near_hi is not None and math.isfinite(fd.near_lo[0]):
            lo, hi = min(lo, float(fd.near_lo[0])), max(hi, float(fd.near_hi[0]))
        scale = max(lf.ref_max[name], engine.global_scale, 1e-300)
        slack = 2 * float(fd.err[0]) + max(1e-3, 30 * e) * scale
        inside = [lo - slack <= v <= hi + slack for v in values]
        if inside[k] or not inside[1 - k]:
            continue
        index = tuple(int(j) for j in np.unravel_index(i, shape))
        extra.append(f"{name} at the parameters' own precision ({values[k]:.6g}) lies outside what finite differences "
                     f"allow at {list(index)} ([{lo:.6g}, {hi:.6g}] ± {slack:.3g}), though right in float64; "
                     f"{'hand' if name == 'autodiff' else 'autodiff'} ({values[1 - k]:.6g}) lies inside: a branch "
                     "that only the lower precision takes (an exact tie, a comparison with ==)?")
        it = _make_item(Verdict.AUTODIFF_WRONG if name == "autodiff" else Verdict.HAND_WRONG, index, values[0],
                        values[1], fd)
        it.user_precision = True
        items.append(it)
    return items
