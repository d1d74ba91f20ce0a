"""check_grad: the float64 probe read out into a row per leaf. Finite differences beyond the compiled probe (finer
steps, arbitration of disagreeing elements, bisection of a failing projection), the check at the parameters' own
precision, and the notes that explain each verdict."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata as md
import math
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad._checks import describe, in_range, x64_enabled
from funcgrad.verify._compiled import (
    _dir_items,
    _dtype64,
    _Facts,
    _Items,
    _items_jit,
    _make_plan,
    _Plan,
    _probe,
    _ProbeOut,
    _static_facts,
    _user_stage,
)
from funcgrad.verify._fd import (
    _FD,
    _LADDER,
    _MAX_SCALES,
    _OFFSETS,
    _classify,
    _consistent,
    _default_rtol,
    _resolve,
    _scale,
)
from funcgrad.verify._inputs import (
    _Bound,
    _bound,
    _check_value,
    _clean,
    _fresh,
    _host,
    _host_tree,
    _Layout,
    _select,
    _split_args,
    _UserTypeError,
    _UserValueError,
)
from funcgrad.verify._report import _BLAMES, _FAILING, _LIST, GradReport, Row, Verdict, _combine_verdicts, _err_key
from funcgrad.verify._traced import trace_pair

# Disagreeing (or non-finite) elements per leaf arbitrated by finite differences, in rounds until one fails.
_ARBITRATION_ROUNDS = (8, 24, 96, 384)


class _Engine:
    """Finite-difference evaluations beyond the compiled probe: finer scales, arbitration, bisection."""

    def __init__(self, fn, spec, layout, plan, res: _ProbeOut, dyn, seed, eps_f, h0, user_dtypes):
        self.fn, self.spec, self.layout, self.plan = fn, spec, layout, plan
        self.user_dtypes = user_dtypes  # each leaf's own dtype
        self.dyn, self.seed = dyn, seed
        self.theta = res.theta  # on the device
        self.support = res.support
        self.a_dev, self.h_dev = res.a_finite, res.h_finite  # projections use the finite part only
        self.theta_np, self.a, self.h = np.asarray(res.theta), np.asarray(res.a), np.asarray(res.h)
        self.support_np = np.asarray(res.support) > 0
        self.eps_f, self.h0, self.f0 = eps_f, h0, float(res.f0)
        # The smallest derivative finite differences resolve at the first step: nothing below it is wrong.
        self.floor = 3 * 16 * eps_f * max(abs(self.f0), 1e-300) / h0 if math.isfinite(self.f0) else 0.0
        self.tol_ah = np.asarray(res.tol)  # per-element analytic tolerance: autodiff against hand
        self.tol = np.maximum(self.tol_ah, self.floor)  # and against finite differences
        self.tol_dev = jnp.asarray(self.tol)

    def evaluate(self, items: _Items) -> tuple[np.ndarray, np.ndarray]:
        """f along the given items (padded to a power of two, so few shapes are compiled)."""
        m = len(items.index)
        size = max(8, 1 << max(0, (m - 1).bit_length()))
        pad = [np.resize(np.asarray(x), size) for x in items]
        padded = _Items._make([*(p.astype(np.int32) for p in pad[:4]), pad[4].astype(np.float64)])
        F, P = _items_jit(self.theta, self.dyn, self.seed, padded, self.a_dev, self.h_dev, self.tol_dev, self.support,
                          fn=self.fn, layout=self.layout, args_spec=self.spec, batch=self.plan.batch)
        return np.asarray(F)[:m], np.asarray(P)[:m]

    def ladder(self, items: _Items, tol, initial: np.ndarray | None = None,
               values: Sequence[np.ndarray] = ()) -> tuple[_FD, np.ndarray | None]:
        """Resolves the derivative along each item: the initial scales, then finer ones where unresolved.
        Returns the readings and the projections P (autodiff, hand, aggregated tolerance) of each item.

        With a single initial scale, an item whose analytic ``values`` all agree with a smooth estimate is
        accepted without a second scale: a wrong finite difference does not land on the analytic value by
        chance. Everything else (disagreement, kinks) goes down the ladder."""
        items = _Items(*(np.asarray(x) for x in items))
        P = None
        if initial is None:
            two = _Items._make([*(np.tile(x, 2) for x in items[:4]), np.concatenate([items.step, items.step / _LADDER])])
            F, P = self.evaluate(two)
            n_items = len(items.index)
            initial = np.stack([F[:n_items], F[n_items:]], axis=1)
            P = P[:n_items]
        scales = [_scale(self.f0, initial[:, level], items.step / _LADDER**level, self.eps_f, tol)
                  for level in range(initial.shape[1])]
        fd, settled = self._settle(scales, tol, values)
        while len(scales) < _MAX_SCALES and not settled.all():
            sel = np.nonzero(~settled)[0]
            level = len(scales)
            F = np.full((len(items.index), len(_OFFSETS)), np.nan)
            F[sel] = self.evaluate(_Items._make([*(x[sel] for x in items[:4]), items.step[sel] / _LADDER**level]))[0]
            scales.append(_scale(self.f0, F, items.step / _LADDER**level, self.eps_f, tol))
            fd, settled = self._settle(scales, tol, values)
        if not fd.resolved.all():
            fd = self._settle(scales, tol, values, final=True)[0]
        return fd, P

    def _settle(self, scales, tol, values, final: bool = False) -> tuple[_FD, np.ndarray]:
        """The ladder's reading, and which items it settles: a finer scale could still change the verdict
        where some analytic value disagrees with the estimate, or where two values that disagree with each
        other both fit inside its error bars. With a single scale, values that all agree with a smooth
        estimate are accepted (a wrong finite difference does not land on the analytic value by chance)."""
        fd = _resolve(scales, tol, self.f0, final)
        if len(scales) == 1 and values:
            s0 = scales[0]
            with np.errstate(invalid="ignore"):
                agree = s0.finite & ~s0.nonsmooth
                for v in values:
                    agree &= np.abs(v - s0.value) <= 2 * s0.err + tol
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
        return fd, settled

    def at_elements(self, flat: np.ndarray) -> _FD:
        flat = np.asarray(flat, np.int64)
        zeros = np.zeros(len(flat), np.int64)
        steps = self.h0 * np.maximum(1.0, np.abs(self.theta_np[flat]))
        return self.ladder(_Items(flat, zeros, zeros, zeros, steps), self.tol[flat])[0]


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
            of ``params`` (or a prefix of it), as ``equinox.partition`` takes. Default: inexact arrays.
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
    return _check_grad_impl(fn, params, args, hand=hand, has_aux=has_aux, wrt=wrt, rtol=rtol, atol=atol, mode=mode,
                            seed=seed, reuse=False)


def _check_grad_impl(fn: Callable[..., Any], params: Any, args: tuple, *, hand: Callable[..., Any] | None,
                     has_aux: bool, wrt: Any, rtol: float | None, atol: float | None, mode: str, seed: int,
                     reuse: bool) -> GradReport:
    """:func:`check_grad`. ``reuse`` checks ``fn`` and ``hand`` themselves rather than fresh wrappers of them, so
    that checks of the same function objects share compilations (see below)."""
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
    if not reuse:
        # Traced afresh: a function may read globals (data, constants) that changed since an earlier check.
        # Identical traces share compilations (see _traced). Only check_vjp and check_jacobian, which make their
        # own wrappers for one call, pass reuse=True and keep the function objects themselves.
        fn, hand, packed = _traced_functions(_Bound(fn, hand, sel.treedef, sel.diff, specs, has_aux), dleaves, dtypes,
                                             packed)
    dyn, spec = _split_args((packed,))
    bound = _bound(fn, hand, sel.treedef, sel.diff, specs, has_aux)
    user_dtypes = sorted({str(d) for d in dtypes})

    try:
        facts = _static_facts(bound, layout, spec, dtypes, tuple((tuple(d.shape), d.dtype) for d in dyn), caller_x64)
    except (_UserValueError, _UserTypeError) as e:
        raise _clean(e) from None
    if layout.n == 0:  # every differentiated leaf is empty: nothing to compare
        rows = [Row(p, Verdict.OK, None, 0.0, 0.0, None, None, None, "exact", 0, 0, 0,
                    "no elements (zero-size leaf): nothing to check") for p in layout.paths]
        return GradReport(tuple(rows), Verdict.OK, "check_grad", "/".join(user_dtypes), tuple(notes),
                          time.perf_counter() - start, {})
    prep = _Prepared(bound, hand is not None, dleaves, packed, dyn, spec, layout, dtypes, user_dtypes)
    base_notes = list(notes)
    options = _Options(has_aux, rtol, atol, mode, seed)

    try:
        rows, notes, plan, rtol_eff, eager = _compute(prep, facts, base_notes, options)
    except (_UserValueError, _UserTypeError):
        raise
    except Exception as e:
        if any("funcgrad:" in n for n in getattr(e, "__notes__", ())):
            raise  # the user's NumPy hand failed
        # Perhaps JAX cannot differentiate fn in one of the modes (lax.while_loop has no reverse mode): find
        # out, and check with the other; if both work, the failure was something else.
        diagnosed = _static_facts(bound, layout, spec, dtypes, tuple((tuple(d.shape), d.dtype) for d in dyn),
                                  caller_x64, True)
        if (diagnosed.reverse, diagnosed.jvp) == (facts.reverse, facts.jvp):
            raise
        facts = diagnosed
        rows, notes, plan, rtol_eff, eager = _compute(prep, facts, base_notes, options)

    dtype = "/".join(user_dtypes) + (" (finite differences in float64)" if user_dtypes != ["float64"] else "")
    env = _environment(caller_x64, user_dtypes, facts, mode, plan, seed, rtol_eff, atol, hand, eager, has_aux,
                       layout, sel)
    return GradReport(tuple(rows), _combine_verdicts([r.verdict for r in rows]), "check_grad", dtype, tuple(notes),
                      time.perf_counter() - start, env)


def _traced_functions(bound0: _Bound, dleaves: list, dtypes: tuple, packed: tuple) -> tuple[Any, Any, tuple]:
    """fn and hand traced at the parameters' precision and in float64, with the constants they close over
    appended to ``packed`` (see :mod:`funcgrad.verify._traced`); fresh wrappers of them where they cannot be
    traced (a NumPy hand; fn's own errors then surface where they always did)."""
    fn = _fresh(bound0.fn)
    hand = _fresh(bound0.hand) if bound0.hand is not None else None
    dyn, spec2 = _split_args(packed)
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


class _Options(NamedTuple):
    """check_grad's settings that the comparison reads."""

    has_aux: bool
    rtol: float | None
    atol: float | None
    mode: str
    seed: int


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

    # 1. At the parameters' own precision: what the user's code computes (for float64 parameters, the
    #    float64 check below is that precision).
    value_u = a_user = h_user = None
    hand_dtypes = facts.hand_dtypes
    if prep.user_dtypes != ["float64"]:
        value_u, a_user, h_user, hand_dtypes = _at_user_precision(prep, facts, eager)
    if prep.has_hand:
        # strict=False: hand_dtypes is empty for a hand called eagerly on float64 parameters (only in float64).
        other = [f"{p or '(params)'} ({hd}, parameter {pd})"
                 for p, hd, pd in zip(prep.layout.paths, hand_dtypes or (), prep.dtypes, strict=False)
                 if jnp.dtype(hd) != jnp.dtype(pd)]
        if other:
            notes.append("hand returns another float dtype than the parameter for " + ", ".join(other[:_LIST])
                         + ("..." if len(other) > _LIST else "") + "; compared in float64")

    # 2. In float64: autodiff, hand and finite differences, compared.
    rows, plan, rtol_eff = _in_float64(prep, facts, eager, options, value_u, a_user, h_user, notes)
    return rows, notes, plan, rtol_eff, eager


def _eager_hand(prep: _Prepared, hand_eager: str | None, float64: bool) -> list:
    """hand, which JAX cannot trace (``hand_eager`` says why), called on NumPy arrays (float64 when asked)."""
    dl = [_host(x, float64) for x in prep.dleaves]
    try:
        out = prep.bound.grad(dl, _host_tree(prep.packed, float64))
    except Exception as e:
        e.add_note(f"funcgrad: hand could not be traced by JAX ({hand_eager}), so check_grad called it "
                   "on NumPy arrays, where it failed")
        raise
    return out


def _at_user_precision(prep: _Prepared, facts: _Facts, eager: bool) -> tuple[Any, np.ndarray, np.ndarray | None, tuple]:
    """fn's value, and the autodiff and hand gradients (flat, as float64), at the parameters' own dtypes; and
    hand's dtypes there."""
    value_u, grad_u, hand_u = _user_stage(prep.dleaves, prep.dyn, fn=prep.bound.value,
                                          hand=prep.bound.grad if prep.has_hand and not eager else None,
                                          layout=prep.layout, dtypes=prep.dtypes, args_spec=prep.spec,
                                          reverse=facts.reverse)
    a_user = np.asarray(grad_u, np.float64)
    h_user = None
    hand_dtypes = facts.hand_dtypes
    if eager:
        hu = _eager_hand(prep, facts.hand_eager, False)
        hand_dtypes = tuple(np.asarray(x).dtype for x in hu)
        h_user = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in hu]) if hu else np.zeros(0)
    elif prep.has_hand:
        h_user = np.asarray(hand_u, np.float64)
    return value_u, a_user, h_user, hand_dtypes


def _in_float64(prep: _Prepared, facts: _Facts, eager: bool, options: _Options, value_u: Any,
                a_user: np.ndarray | None, h_user: np.ndarray | None, notes: list[str]) -> tuple[list[Row], _Plan, float]:
    """The float64 check: autodiff, hand and finite differences compared, a row per leaf (with the results at
    the parameters' own precision, when not float64). Appends to ``notes``; returns the rows, the plan and the
    effective rtol."""
    layout = prep.layout
    with jax.enable_x64(True):
        # Finite differences carry the rounding of the lowest precision fn computes in, or of its output.
        eps_f = max(float(jnp.finfo(facts.out64).eps), float(jnp.finfo(facts.inner64).eps))
        # Analytic tolerances follow the precision the gradients are computed in; the finite differences'
        # own noise follows the output's dtype (eps_f).
        eps_c = float(jnp.finfo(facts.inner64).eps)
        if facts.inner64 != jnp.float64:
            notes.append(f"fn computes in {facts.inner64} even with float64 inputs; tolerances follow "
                         f"{facts.inner64}")
        elif facts.out64 != jnp.float64:
            notes.append(f"fn's output is cast to {facts.out64} even with float64 inputs: finite differences carry "
                         "its rounding (autodiff and hand are still compared to float64 precision)")
        h_given = None
        hand64 = facts.hand64
        if eager:
            h64 = _eager_hand(prep, facts.hand_eager, True)
            hand64 = tuple(np.asarray(x).dtype for x in h64)
            h_given = jnp.asarray(np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in h64]) if h64
                                  else np.zeros(0), jnp.float64)
        # strict=False: hand64 is empty without a hand.
        for path, dtype in zip(layout.paths, hand64, strict=False):
            if dtype != jnp.float64:
                eps_c = max(eps_c, float(jnp.finfo(dtype).eps))
                notes.append(f"hand returns {dtype} for {path or 'params'} even with float64 inputs")
        rtol_eff = float(options.rtol) if options.rtol is not None else _default_rtol(eps_c)
        h0 = eps_f ** (1 / 5)
        plan, exact_idx = _make_plan(options.mode, layout, facts.flops, prep.has_hand, facts.reverse, facts.jvp)
        res = _probe(prep.dleaves, prep.dyn, h_given, exact_idx, np.uint32(options.seed % 2**32), h0, rtol_eff,
                     -1.0 if options.atol is None else float(options.atol), float(jnp.finfo(jnp.float64).eps),
                     fn=prep.bound.value, hand=prep.bound.grad if prep.has_hand and not eager else None, layout=layout,
                     args_spec=prep.spec, plan=plan)
        f0 = float(res.f0)
        _check_value(f0)
        if math.isinf(f0):
            notes.append(f"fn(params, *args) = {f0} at these parameters: the function itself is singular there (a "
                         "log of 0?), so no element has a finite derivative to check; each is reported singular "
                         "where autodiff and hand agree, a mismatch where they do not")
        elif a_user is not None and not np.isfinite(float(value_u)):
            raise _UserValueError(f"fn(params, *args) = {float(value_u)} at the parameters' own precision "
                                  f"({'/'.join(prep.user_dtypes)}), though {f0:.6g} in float64: it overflows or loses "
                                  "all precision there")
        engine = _Engine(prep.bound.value, prep.spec, layout, plan, res, prep.dyn, np.uint32(options.seed % 2**32),
                         eps_f, h0, prep.dtypes)
        rows = _rows(res, engine, prep.has_hand, a_user, h_user, prep.user_dtypes,
                     float(jnp.finfo(facts.inner_user).eps))
    return rows, plan, rtol_eff


def _environment_versions() -> dict:
    """The versions and backend a verdict was reached with."""

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {
        "funcgrad": version("funcgrad"),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
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


def _note_for(verdict: Verdict, item: _Item | None, extra: Sequence[str]) -> str:
    parts = []
    if item is not None and verdict != Verdict.OK:
        at = f"at {list(item.index)}" if item.index is not None else "along a random direction"
        slack = 2 * item.fd_err if math.isfinite(item.fd_err) else 0.0
        outside = [name for name, v in (("autodiff", item.A), ("hand", item.H))
                   if v is not None and item.kink and not item.lo - slack <= v <= item.hi + slack]
        meet = ("several kinks may meet at this point along this direction (e.g. ReLUs of several samples at 0 "
                "moving in opposite directions), where a per-kink convention need not lie between D₋ and D₊")
        sides = f"D₋/D₊ = [{_g(item.lo)}, {_g(item.hi)}]" if item.kink else ""
        fd = (f"finite differences give {_g(item.N)} ± {_g(item.fd_err)}" if not item.kink
              else f"the one-sided derivatives are {sides} (± {_g(item.fd_err)})")
        why_unsure = ("finite differences do not settle as the step shrinks (noise, a discontinuity, or kinks all "
                      "around the point)" if not item.resolved else
                      f"{fd}; their error estimate is not far enough below the disagreement to decide")
        if not item.fd_finite:
            why_unsure = "the function is not finite on both sides of the point, so finite differences cannot judge"
        hand_part = f", hand {_g(item.H)}" if item.H is not None else ""
        if item.user_precision:
            fd = f"in float64 the same side gives {_g(item.N)}"
        parts.append({
            Verdict.KINK: (
                (f"not differentiable {at}: {fd}, and autodiff ({_g(item.A)})"
                 + (f" and hand ({_g(item.H)})" if item.H is not None else "") + " lie between them") if
                item.kink and not outside else
                (f"not differentiable {at}: {fd}; autodiff ({_g(item.A)}) and hand ({_g(item.H)}) both lie "
                 f"outside: {meet}; finite differences cannot judge there (check at a point off the kinks to "
                 "be sure)") if item.kink
                else (f"kinks at or right next to {at.removeprefix('at ')} (within the finite-difference steps): "
                      f"{fd}, which cannot separate autodiff ({_g(item.A)})"
                      + (f" and hand ({_g(item.H)})" if item.H is not None else "") + "; both are accepted")),
            Verdict.SINGULAR: (
                f"no finite derivative {at}: the difference quotients grow without bound as the step "
                f"shrinks (sqrt or log at 0, |x|^p with p < 1, a discontinuity); autodiff gives {_g(item.A)}"
                + (f" and hand {_g(item.H)}, which describe it alike" if item.H is not None else "")),
            Verdict.FD_UNRELIABLE: (
                f"autodiff and hand agree {at} ({_g(item.A)}); {why_unsure}" if item.H is not None
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


def _rows(res: _ProbeOut, engine: _Engine, has_hand, a_user, h_user, user_dtypes, eps_inner=0.0) -> list[Row]:
    layout, plan = engine.layout, engine.plan
    a, h, tol = engine.a, (engine.h if has_hand else None), engine.tol
    items_np = _Items(*(np.asarray(x) for x in res.items))
    flat, proj = items_np.index, np.asarray(res.P)  # each item's element (-1: a direction), its projections
    item_tol = np.where(flat >= 0, tol[np.maximum(flat, 0)], np.maximum(proj[:, 2], engine.floor))
    item_tol_ah = np.where(flat >= 0, engine.tol_ah[np.maximum(flat, 0)], proj[:, 2])
    is_el = flat >= 0
    A = np.where(is_el, a[np.maximum(flat, 0)], proj[:, 0])
    H = None if h is None else np.where(is_el, h[np.maximum(flat, 0)], proj[:, 1])
    fd, _ = engine.ladder(items_np, item_tol, initial=np.asarray(res.F), values=[A] if H is None else [A, H])
    verdicts = _classify(A, H, fd, item_tol, lenient=~is_el, tol_ah=item_tol_ah)
    d_leaf = np.array(_dir_items(plan)[0])
    item_leaf = np.where(is_el, np.searchsorted(np.array(layout.offsets), np.maximum(flat, 0), side="right") - 1,
                         np.concatenate([np.zeros(int(is_el.sum()), int), d_leaf]))
    jvp = np.asarray(res.jvp)

    rows = []
    for li, (path, shape, o, s) in enumerate(zip(layout.paths, layout.shapes, layout.offsets, layout.sizes, strict=True)):
        items: list[_Item] = []
        empty_support = s > 0 and not engine.support_np[o : o + s].any()
        for k in np.nonzero(item_leaf == li)[0]:
            if not is_el[k] and (s == 0 or empty_support):
                continue  # a direction with nothing to move: no information
            index = np.unravel_index(flat[k] - o, shape) if is_el[k] else None
            items.append(_make_item(verdicts[k], index, A[k], None if H is None else H[k], fd, k))
        nonfinite, dis, extra = _disagreements(a[o : o + s], None if h is None else h[o : o + s],
                                               engine.tol_ah[o : o + s], shape)
        done = {int(flat[k]) - o for k in np.nonzero((item_leaf == li) & is_el)[0]}
        if dis.any():
            _arbitrate_disagreements(li, dis, nonfinite, done, a, h, tol, engine, items, extra)
        _locate_failing_projection(li, a, h, tol, engine, items, extra)
        if plan.jvp and not empty_support and s:
            k_dir = int(np.nonzero(~is_el)[0][list(d_leaf).index(li)])
            _compare_modes(float(jvp[li]), float(A[k_dir]), k_dir, nonfinite, fd, item_tol, item_tol_ah, engine.eps_f,
                           items, extra)
        if user_dtypes != ["float64"] and s:
            eps = max(float(jnp.finfo(engine.user_dtypes[li]).eps), eps_inner)  # fn may compute in bfloat16
            extra_u, items_u = _user_precision(o, s, shape, a, h, a_user, h_user, eps, skip=_blamed_sides(items))
            extra += extra_u
            items += items_u
        rows.append(_row(path, li, s, items, extra, plan))
    return rows


def _disagreements(seg_a: np.ndarray, seg_h: np.ndarray | None, tol_ah: np.ndarray,
                   shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One leaf's elements where autodiff or hand is not finite, and those to arbitrate (where autodiff and hand
    disagree, or without a hand where autodiff is not finite); and notes on them."""
    extra: list[str] = []
    nonfinite = ~np.isfinite(seg_a)
    if seg_h is not None:
        nonfinite |= ~np.isfinite(seg_h)
        with np.errstate(invalid="ignore"):
            dis = ~(np.abs(seg_a - seg_h) <= tol_ah)
        same_nf = ~np.isfinite(seg_a) & (seg_a == seg_h)
        n_disagree = int((dis & ~same_nf).sum())
        if n_disagree:
            with np.errstate(invalid="ignore"):
                gap = np.where(dis & ~same_nf, np.abs(seg_a - seg_h), -1.0)
            i = int(np.argmax(np.where(np.isnan(gap), np.inf, gap)))
            where = [int(j) for j in np.unravel_index(i, shape)]
            extra.append(f"autodiff and hand disagree at {n_disagree} element(s); " + (
                f"the largest gap is {_g(float(gap[i]))} at {where}" if np.isfinite(gap[i])
                else f"one side is not finite at {where}"))
    else:
        dis = nonfinite
    n_nf = int(nonfinite.sum())
    if n_nf:
        extra.append(f"{n_nf} element(s) not finite in " + ("autodiff or hand" if seg_h is not None else "autodiff")
                     + " (checked one by one; random projections skip them)")
    return nonfinite, dis, extra


def _arbitrate_disagreements(li: int, dis: np.ndarray, nonfinite: np.ndarray, done: set[int], a, h, tol,
                             engine: _Engine, items: list[_Item], extra: list[str]) -> None:
    """Disagreeing elements of leaf ``li`` (``dis``, within the leaf), worst first and not ``done`` already, are
    arbitrated in growing rounds until one fails: a wrong element must not hide behind disagreements that are
    only kinks (two valid conventions). Appends to ``items`` and ``extra``."""
    o, s, shape = engine.layout.offsets[li], engine.layout.sizes[li], engine.layout.shapes[li]
    cand = np.nonzero(dis)[0]
    bad = _badness(a[o : o + s][cand], None if h is None else h[o : o + s][cand], engine.tol_ah[o : o + s][cand],
                   nonfinite[cand])
    order = [o + int(i) for i in cand[np.argsort(-bad, kind="stable")] if int(i) not in done]
    checked = 0
    for size in _ARBITRATION_ROUNDS:
        batch = order[checked : checked + size]
        if not batch:
            break
        new = _arbitrate(np.array(batch), li, a, h, tol, engine)
        items += new
        checked += len(batch)
        if any(it.verdict in _FAILING for it in new):
            break
    left = len(order) - checked
    if left > 0 and not any(it.verdict in _FAILING for it in items):
        i = order[checked]
        what = "autodiff and hand disagree" if h is not None else "autodiff is not finite"
        extra.append(f"{what} at {left} more element(s) than the {checked} checked one by one (all passing): "
                     "too many to check, so the leaf cannot pass")
        items.append(_make_item(Verdict.MISMATCH, np.unravel_index(i - o, shape), a[i],
                                None if h is None else h[i], N=float("nan")))


def _locate_failing_projection(li: int, a, h, tol, engine: _Engine, items: list[_Item], extra: list[str]) -> None:
    """A projection that fails with no element to show for it: bisect down to the element. Appends to ``items``
    and ``extra``; a located element that is blamed explains the failing projections (their verdict becomes its)."""
    bad_dirs = [it for it in items if it.index is None and it.verdict in _FAILING]
    if bad_dirs and not any(it.index is not None and it.verdict in _FAILING for it in items):
        located = _bisect(li, a, h, tol, engine)
        items.append(located)
        if located.verdict in _FAILING:
            extra.append("element located by bisecting a failing random projection")
            if located.verdict in _BLAMES:
                for it in items:  # the located element explains the failing projections
                    if it.index is None and it.verdict == Verdict.MISMATCH:
                        it.verdict = located.verdict
        else:
            extra.append("bisecting the failing random projection singled out no failing element (the "
                         "disagreement is spread over many elements)")


def _compare_modes(jv: float, jr: float, k: int, nonfinite: np.ndarray, fd: _FD, item_tol: np.ndarray,
                   item_tol_ah: np.ndarray, eps_f: float, items: list[_Item], extra: list[str]) -> None:
    """Forward mode (``jv``, the jvp) against reverse mode (``jr``, grad·u) along a leaf's first random direction,
    item ``k``; finite differences say which one is wrong. Appends to ``items`` and ``extra``."""
    if not math.isfinite(jv) and nonfinite.any():
        extra.append("forward mode not compared: autodiff is not finite at some elements of this leaf")
    # (forward mode's tangent is rounded to fn's output dtype, e.g. by a final cast to bfloat16)
    elif not abs(jv - jr) <= item_tol_ah[k] + 4 * eps_f * max(abs(jv), abs(jr)):
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


def _row(path, li, size, items, extra, plan) -> Row:
    verdict = _combine_verdicts([it.verdict for it in items]) if items else Verdict.OK
    if verdict == Verdict.OK:
        cands = [it for it in items if it.index is not None] or items
    else:
        cands = ([it for it in items if it.verdict == verdict] or [it for it in items if it.verdict in _FAILING]
                 or items)
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


def _badness(a, h, tol, nonfinite):
    """How far autodiff and hand are apart, in tolerances; non-finite elements first."""
    if h is None:
        return np.where(nonfinite, 1e308, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.abs(a - h) / np.maximum(tol, 1e-300)
    return np.where(nonfinite | np.isnan(b), 1e308, b)


def _arbitrate(flat: np.ndarray, li: int, a, h, tol, engine: _Engine) -> list[_Item]:
    """Finite differences at elements where autodiff and hand disagree (or are not finite): who is wrong."""
    fd = engine.at_elements(flat)
    verdicts = _classify(a[flat], None if h is None else h[flat], fd, tol[flat], tol_ah=engine.tol_ah[flat])
    o, shape = engine.layout.offsets[li], engine.layout.shapes[li]
    return [_make_item(verdicts[k], np.unravel_index(i - o, shape), a[i], None if h is None else h[i], fd, k)
            for k, i in enumerate(flat)]


def _bisect(li: int, a, h, tol, engine: _Engine) -> _Item:
    """Locates an element responsible for a failing projection: halve the direction's support, keep the half
    whose finite-difference check fails worst, until one element is left; then check that element."""
    layout, plan = engine.layout, engine.plan
    o, s = layout.offsets[li], layout.sizes[li]
    rms = math.sqrt(float(np.mean(engine.theta_np[o : o + s] ** 2))) if s else 0.0
    step = engine.h0 * max(1.0, rms)
    d_leaf, d_j = _dir_items(plan)
    streams = [j for leaf, j in zip(d_leaf, d_j, strict=True) if leaf == li]

    def badness(j, ranges):
        """How far each half's projection is from finite differences, in units of the allowed error (one
        scale: only the comparison between the halves matters here)."""
        n = len(ranges)
        lo, hi = np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges])
        F, P = engine.evaluate(_Items(np.full(n, -1), np.full(n, j), lo, hi, np.full(n, step)))
        dt = np.maximum(P[:, 2], engine.floor)
        sc = _scale(engine.f0, F, np.full(n, step), engine.eps_f, dt)
        refs = [P[:, 0]] if h is None else [P[:, 0], P[:, 1]]
        with np.errstate(invalid="ignore", divide="ignore"):
            bad = np.max([np.abs(r - sc.value) for r in refs], axis=0) / (2 * sc.err + dt)
        return np.where(np.isnan(bad), 1e308, bad)

    j = max(streams, key=lambda j: float(badness(j, [(o, o + s)])[0]))
    lo, hi = o, o + s
    while hi - lo > 1:
        mid = (lo + hi) // 2
        bad = badness(j, [(lo, mid), (mid, hi)])
        lo, hi = (lo, mid) if bad[0] >= bad[1] else (mid, hi)
    return _arbitrate(np.array([lo]), li, a, h, tol, engine)[0]


def _user_precision(o, s, shape, a64, h64, a_user, h_user, eps, skip=()) -> tuple[list[str], list[_Item]]:
    """The parameters' own precision (e.g. float32) against float64: a side whose values are not finite, or
    that loses far more precision than the other side, is wrong at that precision only. Sides already found
    wrong in float64 (``skip``) are not judged again. Deviations are measured against the leaf's largest
    value, or the whole gradient's when that is larger (rounding follows the gradient's overall scale: a
    leaf whose true gradient is 0 still gets round-off)."""
    global_scale = float(np.max(np.abs(np.where(np.isfinite(a64), a64, 0.0)))) if a64.size else 0.0
    extra, items = [], []
    sides = {"autodiff": (a_user[o : o + s], a64[o : o + s])}
    if h64 is not None:
        sides["hand"] = (h_user[o : o + s], h64[o : o + s])
    rel = {}
    for name, (u, ref) in sides.items():
        with np.errstate(invalid="ignore"):
            dev = np.abs(u - ref)
        scale = max(float(np.max(np.abs(np.where(np.isfinite(ref), ref, 0.0)))) if s else 0.0, global_scale, 1e-300)
        rel[name] = (float(np.max(np.where(np.isfinite(dev), dev, 0.0))) / scale if s else 0.0, dev)
    for name, (u, ref) in sides.items():
        if name in skip:
            continue
        r, dev = rel[name]
        nonfinite = ~np.isfinite(u) & np.isfinite(ref)
        others = [v[0] for n, v in rel.items() if n != name]
        gross = bool(others) and r > max(1e-3, 30 * eps) and r > 30 * max(others[0], 1e-7)
        if nonfinite.any() or gross:
            i = int(np.argmax(np.where(nonfinite, np.inf, np.where(np.isfinite(dev), dev, 0.0))))
            what = "is not finite" if nonfinite.any() else f"loses precision (deviation {r:.1e} of its scale)"
            extra.append(f"{name} {what} at the parameters' own precision, though right in float64")
            blame = Verdict.AUTODIFF_WRONG if name == "autodiff" else Verdict.HAND_WRONG
            it = _make_item(blame, np.unravel_index(i, shape), a_user[o + i], None if h64 is None else h_user[o + i],
                            N=ref[i])
            it.user_precision = True
            items.append(it)
    return extra, items
