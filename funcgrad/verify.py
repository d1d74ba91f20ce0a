"""Three-way gradient checks: autodiff, hand-derived formulas and finite differences, compared per element.

:func:`check_grad` computes JAX's gradient (reverse mode, cross-checked with forward mode), the user's
hand-derived gradient and a finite-difference reference, and says, per parameter leaf, which side disagrees
with the other two, at which element, and whether the disagreement is only a kink.

How it decides (see also :class:`GradReport`):

- **Finite differences** are computed in float64 (even for float32 models), along a direction ``u`` (a
  coordinate, or a random unit vector within one leaf) at steps ±h and ±h/2: two central differences give a
  Richardson-extrapolated derivative and an estimate of its own error; rounding error is bounded from the
  dtype of ``fn``'s output. One-sided differences at both steps test smoothness: for a smooth function
  ``(D₊ − D₋)(h) ≈ 2·(D₊ − D₋)(h/2)``; at or near a kink (ReLU at 0, max at a tie, |x| at 0) this fails.
  Steps form a ladder h, h/10, ..., h/10⁴, read from the top: the pair of consecutive steps that agree with
  the least uncertainty decides (a kink within the larger step only makes them disagree), and finer steps are
  evaluated only for items not yet decided. At a kink any value between the one-sided derivatives is
  accepted: verdict ``"kink"``.
- **Autodiff and hand** are compared element by element over every leaf (both are full vectors, so a single
  wrong element among millions is located exactly). Elements that disagree are arbitrated by finite
  differences at that element: the side that disagrees with the other two is wrong.
- **Large leaves** are checked against finite differences by random projections plus the largest-gradient
  element, compiled with ``jit`` into one program (batched with ``vmap`` on accelerators, a ``lax`` loop on
  CPU); a projection that disagrees is bisected down to the element responsible. No Jacobian is ever
  materialised.
- Every call traces ``fn`` and ``hand`` afresh: a function may read globals that changed since an earlier
  check, and a cached trace would check the old function.
- **Tolerances** come from the dtypes (``rtol = max(1e-7, 3·√eps)`` of the float64 check's working precision,
  ``atol`` from each leaf's gradient scale and the finite-difference noise floor) and from the measured
  finite-difference error; ``rtol``/``atol`` override the analytic part. The user's own precision (e.g.
  float32) is checked separately: a side that becomes non-finite or loses far more precision than the other
  is reported.

Example:
    >>> import jax.numpy as jnp
    >>> from funcgrad import verify
    >>> f = lambda p: jnp.sum(p["w"] ** 3)
    >>> report = verify.check_grad(f, {"w": jnp.array([1.0, -2.0])}, hand=lambda p: {"w": 3 * p["w"] ** 2})
    >>> report.verdict
    'ok'
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad._checks import check_finite_tree, describe, float_leaves, in_range, x64_enabled

__all__ = [
    "VERDICTS",
    "Row",
    "GradReport",
    "ChainReport",
    "check_grad",
    "check_vjp",
    "check_jacobian",
    "check_chain",
]

VERDICTS = ("ok", "kink", "fd_unreliable", "hand_wrong", "autodiff_wrong", "mismatch")
PASSING = ("ok", "kink", "fd_unreliable")
_SEVERITY = {v: i for i, v in enumerate(VERDICTS)}
_FAILING = ("hand_wrong", "autodiff_wrong", "mismatch")

# Budget for coordinate-wise finite differences in mode="auto": about this many flops in total.
_EXACT_FLOP_BUDGET = 4e9
_ALWAYS_EXACT = 16  # leaves this small are always checked element by element
_MAX_EXACT_ELEMENTS = 4096  # mode="auto" never checks more elements than this one by one
_N_PROJ = 3  # random directions per projection-checked leaf without a hand gradient (1 with one)
_K_MAG = 1  # largest-|gradient| elements per projection-checked leaf, checked one by one
_K_DISAGREE = 8  # disagreeing elements per leaf arbitrated by finite differences
_MEM_ELEMENTS = 1 << 23  # perturbed parameter copies held at once (float64 elements)


# ----------------------------------------------------------------------------------------------------------
# Reports


def _fmt(x: float | None, width: int = 11) -> str:
    if x is None:
        return "—".rjust(width)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x).rjust(width)
    return f"{x:.4e}".rjust(width)


def _json_float(x: float | None) -> float | str | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


@dataclasses.dataclass(frozen=True)
class Row:
    """The check of one parameter leaf.

    Attributes:
        path: the leaf's pytree path in `jax.tree_util.keystr` form, e.g. ``['dense1']['W']``.
        verdict: one of :data:`VERDICTS`.
        worst_index: index into the leaf of the worst element (None when the leaf was checked by projections
            only and nothing was wrong).
        max_abs_err: the largest disagreement found among the three (absolute).
        max_rel_err: the same relative to the magnitude of the values compared.
        autodiff, hand, numeric: the three values at ``worst_index`` (numeric: the finite-difference estimate).
        method: ``"exact"`` (every element by finite differences) or ``"projection"``.
        size: the leaf's number of elements.
        checked: the number of elements checked one by one with finite differences.
        directions: the number of random directions checked with finite differences.
        note: why the verdict was given, in words.
    """

    path: str
    verdict: str
    worst_index: tuple[int, ...] | None
    max_abs_err: float
    max_rel_err: float
    autodiff: float | None
    hand: float | None
    numeric: float | None
    method: str
    size: int
    checked: int
    directions: int = 0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict in PASSING

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["worst_index"] = list(self.worst_index) if self.worst_index is not None else None
        for k in ("max_abs_err", "max_rel_err", "autodiff", "hand", "numeric"):
            d[k] = _json_float(d[k])
        d["ok"] = self.ok
        return d


def _combine_verdicts(verdicts: Sequence[str]) -> str:
    """The verdict over several: a side blamed alone (with or without unattributed disagreements) is that
    side; both sides blamed is a mismatch; else the most severe passing verdict."""
    blamed = {v for v in verdicts if v in ("hand_wrong", "autodiff_wrong")}
    if len(blamed) == 1:
        return blamed.pop()
    if blamed or "mismatch" in verdicts:
        return "mismatch"
    return max(verdicts, key=_SEVERITY.__getitem__, default="ok")


@dataclasses.dataclass(frozen=True)
class GradReport:
    """The result of :func:`check_grad` (and of :func:`check_vjp`, :func:`check_jacobian`).

    ``ok`` is True unless some disagreement is left that a kink (or unreliable finite differences, when
    autodiff and the hand formula agree with each other) does not explain. ``verdict`` is ``"ok"``, ``"kink"``,
    ``"fd_unreliable"``, ``"hand_wrong"``, ``"autodiff_wrong"`` or ``"mismatch"`` (failing rows that blame
    different sides, or a disagreement that cannot be attributed). ``str(report)`` is a table, a line per leaf;
    :meth:`to_dict` is JSON-able; :meth:`assert_ok` raises an AssertionError carrying the table.
    """

    rows: tuple[Row, ...]
    verdict: str
    title: str = "check_grad"
    dtype: str = ""
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict in PASSING

    @property
    def failing(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if not r.ok)

    def summary(self) -> str:
        """A line: the verdict and, when not plain ok, the leaf and element that decided it."""
        n = sum(r.size for r in self.rows)
        head = (f"{self.title}: {self.verdict} ({'ok' if self.ok else 'NOT OK'}) — {len(self.rows)} leaves, "
                f"{n} parameters, {self.seconds:.2f}s")
        bad = self.failing or tuple(r for r in self.rows if r.verdict != "ok")
        if not bad:
            return head
        r = max(bad, key=lambda r: (_SEVERITY[r.verdict], r.max_abs_err))
        at = f"{r.path}{list(r.worst_index) if r.worst_index is not None else ''}"
        if self.ok:
            why = {"kink": "not differentiable at or next to", "fd_unreliable": "finite differences unsure at"}
            return f"{head}; {why.get(r.verdict, r.verdict)} {at}"
        return f"{head}; {r.verdict} at {at}: {r.note}"

    def __str__(self) -> str:
        n = sum(r.size for r in self.rows)
        lines = [
            f"{self.title}: verdict {self.verdict} ({'ok' if self.ok else 'NOT OK'}) — {len(self.rows)} leaves, "
            f"{n} parameters{', ' + self.dtype if self.dtype else ''}, {self.seconds:.2f}s"
        ]
        pw = max([len("leaf")] + [len(r.path) for r in self.rows])
        header = (
            f"  {'leaf'.ljust(pw)}  {'verdict':14s} {'method':18s} {'worst index':12s}"
            f" {'autodiff':>11s} {'hand':>11s} {'numeric':>11s} {'abs err':>10s} {'rel err':>10s}"
        )
        lines.append(header)
        for r in self.rows:
            idx = str(list(r.worst_index)) if r.worst_index is not None else "—"
            method = f"exact {r.checked}/{r.size}" if r.method == "exact" else f"proj {r.directions}d+{r.checked}e"
            lines.append(
                f"  {r.path.ljust(pw)}  {r.verdict:14s} {method:18s} {idx:12s}"
                f" {_fmt(r.autodiff)} {_fmt(r.hand)} {_fmt(r.numeric)} {_fmt(r.max_abs_err, 10)} {_fmt(r.max_rel_err, 10)}"
            )
        explained = [r for r in self.rows if r.note]
        if explained or self.notes:
            lines.append("  notes:")
            lines += [f"    {r.path}: {r.note}" for r in explained]
            lines += [f"    {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "verdict": self.verdict,
            "ok": self.ok,
            "dtype": self.dtype,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "rows": [r.to_dict() for r in self.rows],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def assert_ok(self) -> GradReport:
        """Raises an AssertionError carrying the table unless ``ok``; returns the report otherwise."""
        if not self.ok:
            raise AssertionError("gradient check failed\n" + str(self))
        return self


# ----------------------------------------------------------------------------------------------------------
# Flat parameter layout (hashable, so jitted helpers are cached per function and layout)


@dataclasses.dataclass(frozen=True)
class _Layout:
    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    paths: tuple[str, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def n(self) -> int:
        return sum(self.sizes)

    def unravel(self, theta: jax.Array) -> Any:
        leaves = [theta[o : o + s].reshape(shape) for o, s, shape in zip(self.offsets, self.sizes, self.shapes)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def ravel(self, tree: Any, dtype: Any = jnp.float64) -> jax.Array:
        leaves = jax.tree_util.tree_leaves(tree)
        if not leaves:
            return jnp.zeros((0,), dtype)
        return jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves])


def _layout(params: Any) -> _Layout:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    shapes = tuple(tuple(int(d) for d in jnp.shape(leaf)) for _, leaf in flat)
    sizes = [math.prod(s) for s in shapes]
    offsets = tuple(int(o) for o in np.cumsum([0] + sizes[:-1]))
    return _Layout(treedef, shapes, offsets, tuple(jax.tree_util.keystr(p) for p, _ in flat))


# Arguments after params: arrays are traced; anything else (Python numbers, strings, ...) is held static.
class _Dynamic:
    def __repr__(self) -> str:
        return "<array>"


_DYN = _Dynamic()


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _split_args(args: tuple) -> tuple[list, tuple]:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    dyn, spec = [], []
    for leaf in leaves:
        if _is_array(leaf):
            dyn.append(leaf)
            spec.append(_DYN)
        else:
            try:
                hash(leaf)
            except TypeError:
                raise TypeError(
                    f"check_grad: argument leaf {describe(leaf)} is neither an array nor hashable; "
                    "pass arrays, or close over it in fn"
                ) from None
            spec.append(leaf)
    return dyn, (treedef, tuple(spec))


def _join_args(dyn: Sequence, spec: tuple) -> tuple:
    treedef, static = spec
    it = iter(dyn)
    return jax.tree_util.tree_unflatten(treedef, [next(it) if s is _DYN else s for s in static])


def _fresh(fn: Callable) -> Callable:
    return lambda *a, **k: fn(*a, **k)


# ----------------------------------------------------------------------------------------------------------
# Validation


def _prepare_params(params: Any) -> Any:
    def convert(leaf):
        if isinstance(leaf, bool):
            return leaf
        if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            return jnp.asarray(leaf) if isinstance(leaf, float) else leaf
        return leaf

    params = jax.tree_util.tree_map(convert, params)
    float_leaves(params, "params")
    if not jax.tree_util.tree_leaves(params):
        raise ValueError("check_grad: params has no leaves; pass the arrays to differentiate with respect to")
    check_finite_tree(params, "params")
    return jax.tree_util.tree_map(jnp.asarray, params)


def _check_output(out: Any, what: str) -> None:
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", None)
        raise ValueError(
            f"{what} must return a scalar (shape ()); got {describe(out) if shape is not None else type(out).__name__}. "
            "Reduce it, e.g. with .sum() or .mean(), or use check_vjp for vector outputs."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{what} must return a floating scalar; got {describe(out)}")


def _check_hand_structure(hand_out: Any, params: Any, what: str = "hand") -> None:
    pflat, pdef = jax.tree_util.tree_flatten_with_path(params)
    try:
        hflat, hdef = jax.tree_util.tree_flatten_with_path(hand_out)
    except Exception:  # noqa: BLE001 - anything unflattenable is a structure mismatch
        hflat, hdef = [], None
    if hdef != pdef:
        ppaths = [jax.tree_util.keystr(p) for p, _ in pflat]
        hpaths = [jax.tree_util.keystr(p) for p, _ in hflat]
        missing = [p for p in ppaths if p not in hpaths]
        extra = [p for p in hpaths if p not in ppaths]
        detail = []
        if missing:
            detail.append(f"missing {missing}")
        if extra:
            detail.append(f"unexpected {extra}")
        if not detail:
            detail.append(f"the same leaves in other containers (e.g. a tuple where params has a list): {hdef}, "
                          f"where params is {pdef}")
        raise ValueError(
            f"{what} must return a gradient with the same structure as params; it returned "
            f"{'; '.join(detail)}. params leaves: {ppaths}"
        )
    bad = []
    for (path, p), (_, h) in zip(pflat, hflat):
        name = jax.tree_util.keystr(path)
        if not hasattr(h, "shape") or tuple(h.shape) != tuple(jnp.shape(p)):
            bad.append(f"{name}: expected shape {tuple(jnp.shape(p))}, got {describe(h)}")
        elif h.dtype != jnp.result_type(p):
            bad.append(f"{name}: expected dtype {jnp.result_type(p)} (the parameter's), got {describe(h)}")
    if bad:
        raise ValueError(f"{what} returned leaves that do not match params:\n  " + "\n  ".join(bad))


# ----------------------------------------------------------------------------------------------------------
# The compiled pieces. Functions, layouts and plans are static arguments, so repeated checks of the same
# function reuse one compilation.
#
# A finite-difference "item" is a direction u along which f is differentiated: a coordinate (I >= 0) or a
# random unit vector confined to the index range [LO, HI) (I = -1, drawn from stream J of the check's key).
# f is evaluated at theta + t·u for t in ±T, ±T/2.


_OFFSETS = (-1.0, -0.5, 0.5, 1.0)
_LADDER = 10.0  # each finer scale divides the step by this
_MAX_SCALES = 5  # the finest step is T/10⁴


@dataclasses.dataclass(frozen=True)
class _Plan:
    exact: tuple[bool, ...]  # per leaf: every element by finite differences
    n_proj: int  # random directions per projection-checked leaf
    k_mag: int  # largest-|gradient| elements per projection-checked leaf
    scales: int  # step sizes evaluated in the probe (T, T/10, ...)
    jvp: bool  # check forward mode against reverse mode
    batch: int  # items evaluated at once (memory: about 6·n floats each)


def _hash_uniform(seed, j, n):
    """n pseudo-random numbers in [-1/2, 1/2) from a counter-based integer hash (lowbias32) of
    (seed, stream j, index): cheap to compile, unlike a cryptographic generator, and plenty for directions."""
    x = jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1)
    x = x + (jnp.asarray(j, jnp.uint32) + jnp.uint32(1)) * jnp.uint32(0x85EBCA77) + jnp.asarray(seed, jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    return x.astype(jnp.float64) / 2.0**32 - 0.5


def _direction(seed, j, lo, hi, n):
    """A random unit vector confined to the index range [lo, hi)."""
    r = jnp.arange(n)
    d = _hash_uniform(seed, j, n) * ((r >= lo) & (r < hi))
    return d / jnp.maximum(jnp.linalg.norm(d), 1e-300)


def _eval_items(f, theta, seed, items, vecs, batch, want_jvp=None):
    """f at the four offsets along each item, each item's direction dotted with ``vecs`` (autodiff, hand,
    tolerances²), and, where ``want_jvp`` is set, the forward-mode derivative along the item's direction:
    returns F (K, 4), P (K, 3) and JV (K,) (NaN where not wanted).

    ``batch`` > 1 evaluates that many items at once with vmap (accelerators); ``batch`` == 1 evaluates them
    one at a time with lax.map (CPU, where XLA's batched matrix products are several times slower than a loop
    of plain ones, for small and large functions alike)."""
    I, J, LO, HI, T = items
    W = jnp.zeros(I.shape, bool) if want_jvp is None else want_jvp
    n = theta.shape[0]
    offsets = jnp.asarray(_OFFSETS, theta.dtype)
    a, h, tol2 = vecs
    nan = jnp.full((), jnp.nan, theta.dtype)

    def branch(pred, yes, no):
        # A real branch in a sequential loop (the untaken side costs nothing); a select under vmap.
        return jax.lax.cond(pred, yes, no) if batch == 1 else jnp.where(pred, yes(), no())

    def one(item):
        i, j, lo, hi, t, w = item
        e = branch(i < 0, lambda: _direction(seed, j, lo, hi, n),
                   lambda: jax.nn.one_hot(jnp.maximum(i, 0), n, dtype=theta.dtype))
        at = lambda s: f(theta + (s * t) * e)  # noqa: E731
        F = jax.vmap(at)(offsets) if batch > 1 else jax.lax.map(at, offsets)
        jv = branch(w, lambda: jax.jvp(f, (theta,), (e,))[1], lambda: nan) if want_jvp is not None else nan
        return F, jnp.stack([e @ a, e @ h, jnp.sqrt((e * e) @ tol2)]), jv

    K = I.shape[0]
    if K == 0:
        return jnp.zeros((0, 4), theta.dtype), jnp.zeros((0, 3), theta.dtype), jnp.zeros((0,), theta.dtype)
    if batch == 1:
        return jax.lax.map(one, (I, J, LO, HI, T, W))
    pad = (-K) % batch
    padded = [jnp.concatenate([x, jnp.repeat(x[:1], pad)]) if pad else x for x in (I, J, LO, HI, T, W)]
    chunks = [x.reshape(-1, min(batch, K + pad)) for x in padded]
    if chunks[0].shape[0] == 1:
        F, P, JV = jax.vmap(one)(tuple(c[0] for c in chunks))
    else:
        F, P, JV = jax.lax.map(jax.vmap(one), tuple(chunks))
        F, P, JV = F.reshape(-1, 4), P.reshape(-1, 3), JV.reshape(-1)
    return F[:K], P[:K], JV[:K]


def _cast64(tree):
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _flat_fn(fn: Callable, layout: _Layout, args_spec: tuple, dyn64: Sequence) -> Callable:
    args = _join_args(dyn64, args_spec)
    return lambda theta: fn(layout.unravel(theta), *args)


@functools.partial(jax.jit, static_argnames=("fn", "hand", "args_spec"))
def _user_stage(params, dyn, *, fn, hand, args_spec):
    args = _join_args(dyn, args_spec)
    value, grad = jax.value_and_grad(fn)(params, *args)
    return value, grad, (hand(params, *args) if hand is not None else None)


@functools.partial(jax.jit, static_argnames=("fn", "hand", "layout", "args_spec", "plan"))
def _probe(params, dyn, exact_idx, seed, h0, rtol, atol, *, fn, hand, layout, args_spec, plan):
    """The common path in one compiled program (float64): value, autodiff and hand gradients, per-element
    tolerances, forward-mode products, and finite differences at ``plan.scales`` step sizes for every planned
    element and random direction."""
    theta = layout.ravel(params, jnp.float64)
    dyn = _cast64(list(dyn))
    f = _flat_fn(fn, layout, args_spec, dyn)
    f0, a = jax.value_and_grad(f)(theta)
    h = layout.ravel(hand(layout.unravel(theta), *_join_args(dyn, args_spec))) if hand is not None else jnp.zeros_like(theta)
    # Per-element analytic tolerance: atol + rtol·max(|a|, |h|), atol defaulting to rtol·(the leaf's largest).
    mag = jnp.maximum(jnp.abs(a), jnp.abs(h))
    mag = jnp.where(jnp.isfinite(mag), mag, 0.0)
    leaf_max = jnp.concatenate([jnp.full((s,), jnp.max(mag[o : o + s], initial=0.0))
                                for o, s in zip(layout.offsets, layout.sizes)])
    tol = jnp.where(atol >= 0, atol, rtol * leaf_max) + rtol * mag

    # Items: planned elements (all of each exact leaf, the largest gradients of the others), then directions.
    parts = [exact_idx]
    for i, exact in enumerate(plan.exact):
        if not exact and plan.k_mag:
            o, s = layout.offsets[i], layout.sizes[i]
            seg = jnp.where(jnp.isfinite(a[o : o + s]), jnp.abs(a[o : o + s]), 0.0)
            if plan.k_mag == 1:  # argmax compiles far faster than top_k
                parts.append(jnp.argmax(seg)[None] + o)
            else:
                parts.append(jax.lax.top_k(seg, min(plan.k_mag, s))[1] + o)
    idx = jnp.concatenate(parts).astype(jnp.int32)
    d_leaf, d_j = _dir_items(plan)
    lo = jnp.asarray(np.array([layout.offsets[i] for i in d_leaf], np.int32))
    hi = jnp.asarray(np.array([layout.offsets[i] + layout.sizes[i] for i in d_leaf], np.int32))
    rms = jnp.stack([jnp.sqrt(jnp.sum(theta[o : o + s] ** 2) / max(s, 1)) for o, s in zip(layout.offsets, layout.sizes)])
    i_steps = h0 * jnp.maximum(1.0, jnp.abs(theta[idx]))
    d_steps = h0 * jnp.maximum(1.0, rms[jnp.asarray(np.array(d_leaf, np.int32))])
    n_i, n_d = idx.shape[0], len(d_leaf)
    zeros_i = jnp.zeros((n_i,), jnp.int32)
    I = jnp.concatenate([idx, jnp.full((n_d,), -1, jnp.int32)])
    J = jnp.concatenate([zeros_i, jnp.asarray(np.array(d_j, np.int32))])
    LO = jnp.concatenate([zeros_i, lo])
    HI = jnp.concatenate([zeros_i, hi])
    T = jnp.concatenate([i_steps, d_steps])
    K = n_i + n_d
    scaled = [jnp.tile(x, plan.scales) for x in (I, J, LO, HI)]
    Ts = jnp.concatenate([T / _LADDER**k for k in range(plan.scales)])
    # Forward mode along the first direction of each leaf (at the first scale's items).
    first = [n_i + d_leaf.index(i) for i in range(len(plan.exact))]
    want = np.zeros(K * plan.scales, bool)
    want[first] = plan.jvp
    F, P, JV = _eval_items(f, theta, seed, (*scaled, Ts), (a, h, tol * tol), plan.batch,
                           jnp.asarray(want) if plan.jvp else None)
    F = jnp.stack([F[k * K : (k + 1) * K] for k in range(plan.scales)], axis=1)  # (items, scales, 4)
    return {"f0": f0, "theta": theta, "a": a, "h": h, "tol": tol, "jvp": JV[jnp.asarray(first)], "I": I, "J": J,
            "LO": LO, "HI": HI, "T": T, "F": F, "P": P[:K]}


def _dir_items(plan: _Plan) -> tuple[list[int], list[int]]:
    """The random directions: their leaves, and their stream numbers. One per exact leaf (for the forward-mode
    check), n_proj per projection-checked leaf."""
    leaves: list[int] = []
    for i, exact in enumerate(plan.exact):
        leaves += [i] * (1 if exact else plan.n_proj)
    return leaves, list(range(len(leaves)))


@functools.partial(jax.jit, static_argnames=("fn", "layout", "args_spec", "batch"))
def _items_jit(theta, dyn, seed, I, J, LO, HI, T, a, h, tol, *, fn, layout, args_spec, batch):
    dyn = _cast64(list(dyn))
    f = _flat_fn(fn, layout, args_spec, dyn)
    return _eval_items(f, theta, seed, (I, J, LO, HI, T), (a, h, tol * tol), batch)[:2]


# ----------------------------------------------------------------------------------------------------------
# Finite differences: a ladder of step sizes (host side, NumPy float64)


@dataclasses.dataclass
class _FD:
    """Finite-difference estimates for a batch of items."""

    value: np.ndarray  # the derivative estimate (Richardson-extrapolated central differences)
    err: np.ndarray  # its estimated error: truncation, rounding, and disagreement between scales
    nonsmooth: np.ndarray  # a kink at or near the point: one-sided derivatives differ
    lo: np.ndarray  # where nonsmooth: the range of the one-sided derivatives, widened by their error
    hi: np.ndarray
    finite: np.ndarray  # every evaluation used was finite
    resolved: np.ndarray  # two consecutive scales agreed (smooth) or showed the same jump (a kink at the point)

    def take(self, sel: Any) -> _FD:
        return _FD(*(getattr(self, f.name)[sel] for f in dataclasses.fields(self)))


def _scale(f0: float, F: np.ndarray, h: np.ndarray, eps_f: float, tol: np.ndarray) -> dict[str, np.ndarray]:
    """Differences at one step h (central at h and h/2, one-sided at both) and what they say."""
    fm2, fm1, fp1, fp2 = (F[:, j] for j in range(4))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d1 = (fp2 - fm2) / (2 * h)  # central, step h
        d2 = (fp1 - fm1) / h  # central, step h/2
        rich = (4 * d2 - d1) / 3  # Richardson: the h² error terms cancel
        dp1, dm1 = (fp2 - f0) / h, (f0 - fm2) / h
        dp2, dm2 = (fp1 - f0) / (h / 2), (f0 - fm1) / (h / 2)
        size = np.maximum(np.max(np.where(np.isfinite(F), np.abs(F), 0.0), axis=1), abs(f0))
        noise = 3 * 16 * eps_f * size / h  # rounding error of a difference quotient at step h/2, generously
        asym1, asym2 = dp1 - dm1, dp2 - dm2
        r = asym1 - 2 * asym2  # O(h³) for a smooth function, O(jump) with a kink within the step
        finite = np.isfinite(F).all(axis=1) & np.isfinite(f0)
        nonsmooth = finite & (np.abs(r) > np.maximum.reduce([12 * noise, 0.1 * np.abs(asym1), tol]))
        one_sided = np.stack([dp1, dm1, dp2, dm2])
    return {"value": rich, "err": np.abs(d1 - d2) / 3 + noise, "noise": noise, "asym": asym1,
            "os_min": one_sided.min(axis=0), "os_max": one_sided.max(axis=0), "nonsmooth": nonsmooth, "finite": finite}


def _resolve(scales: list[dict[str, np.ndarray]], tol: np.ndarray) -> _FD:
    """Reads the ladder: each pair of consecutive scales may resolve the derivative, and the pair with the
    smallest uncertainty wins.

    Smooth: both scales smooth and their estimates agree within their errors (uncertainty: the error).
    Kink: both scales see the same jump between the one-sided derivatives, as a kink at the point itself does
    (uncertainty: half the one-sided interval). Kinks near the point, within the larger step only, make the
    scales disagree or inflate their error, and a finer pair wins."""
    n = len(tol)
    out = _FD(np.full(n, np.nan), np.full(n, np.inf), np.zeros(n, bool), np.full(n, -np.inf), np.full(n, np.inf),
              np.zeros(n, bool), np.zeros(n, bool))
    best = np.full(n, np.inf)
    with np.errstate(invalid="ignore"):
        for s0, s1 in zip(scales, scales[1:]):
            both = s0["finite"] & s1["finite"]
            gap = np.abs(s0["value"] - s1["value"])
            err = s0["err"] + s1["err"] + gap
            smooth = both & ~s0["nonsmooth"] & ~s1["nonsmooth"] & (gap <= 2 * (s0["err"] + s1["err"]) + tol)
            jump = np.maximum(np.abs(s0["asym"]), np.abs(s1["asym"]))
            kink = (both & s0["nonsmooth"] & s1["nonsmooth"]
                    & (np.abs(s0["asym"] - s1["asym"]) <= 0.25 * jump + 4 * (s0["noise"] + s1["noise"])))
            slack = 4 * (s0["noise"] + s1["noise"])
            lo = np.minimum(s0["os_min"], s1["os_min"]) - slack
            hi = np.maximum(s0["os_max"], s1["os_max"]) + slack
            unc = np.where(kink, (hi - lo) / 2, err)
            win = (smooth | kink) & (unc < best)
            best[win] = unc[win]
            out.value[win] = s1["value"][win]
            out.err[win] = err[win]
            out.nonsmooth[win] = kink[win]
            out.lo[win] = np.where(kink, lo, -np.inf)[win]
            out.hi[win] = np.where(kink, hi, np.inf)[win]
            out.finite[win] = True
            out.resolved[win] = True
    todo = ~out.resolved
    if todo.any():
        # Unresolved: not smooth at any scale tried (kinks all around the point), or non-finite values. Accept
        # anything within the one-sided derivatives of the two finest scales.
        s0, s1 = scales[-2] if len(scales) > 1 else scales[-1], scales[-1]
        with np.errstate(invalid="ignore"):
            gap = np.abs(s0["value"] - s1["value"])
            slack = 4 * (s0["noise"] + s1["noise"]) + gap
            out.value[todo] = s1["value"][todo]
            out.err[todo] = (s0["err"] + s1["err"] + gap)[todo]
            out.lo[todo] = (np.fmin(s0["os_min"], s1["os_min"]) - slack)[todo]
            out.hi[todo] = (np.fmax(s0["os_max"], s1["os_max"]) + slack)[todo]
        out.nonsmooth[todo] = True
        out.finite[todo] = (s0["finite"] & s1["finite"])[todo]
    return out


class _Engine:
    """Finite-difference evaluations beyond the compiled probe: finer scales, arbitration, bisection."""

    def __init__(self, fn, spec, layout, plan, res, dyn, seed, eps_f, h0, user_dtypes):
        self.fn, self.spec, self.layout, self.plan = fn, spec, layout, plan
        self.user_dtypes = user_dtypes  # each leaf's own dtype
        self.theta, self.dyn, self.seed = res["theta_dev"], dyn, seed
        self.theta_np, self.a, self.h = res["theta"], res["a"], res["h"]
        self.eps_f, self.h0, self.f0 = eps_f, h0, float(res["f0"])
        # The smallest derivative finite differences resolve at the first step: nothing below it is wrong.
        self.floor = 3 * 16 * eps_f * max(abs(self.f0), 1e-300) / h0
        self.tol = np.maximum(res["tol"], self.floor)  # per-element analytic tolerance

    def evaluate(self, I, J, LO, HI, T) -> tuple[np.ndarray, np.ndarray]:
        """f along the given items (padded to a power of two, so few shapes are compiled)."""
        m = len(I)
        size = max(8, 1 << max(0, (m - 1).bit_length()))
        pad = [np.resize(np.asarray(x), size) for x in (I, J, LO, HI, T)]
        F, P = _items_jit(self.theta, self.dyn, self.seed, *(p.astype(np.int32) for p in pad[:4]),
                          pad[4].astype(np.float64), self.a, self.h, self.tol, fn=self.fn, layout=self.layout,
                          args_spec=self.spec, batch=self.plan.batch)
        return np.asarray(F)[:m], np.asarray(P)[:m]

    def ladder(self, items, tol, initial: np.ndarray | None = None,
               values: Sequence[np.ndarray] = ()) -> tuple[_FD, np.ndarray]:
        """Resolves the derivative along each item: the initial scales, then finer ones where unresolved.
        Returns the estimates and the projections P (autodiff, hand, aggregated tolerance) of each item.

        With a single initial scale, an item whose analytic ``values`` all agree with a smooth estimate is
        accepted without a second scale: a wrong finite difference does not land on the analytic value by
        chance. Everything else (disagreement, kinks) goes down the ladder."""
        I, J, LO, HI, T = (np.asarray(x) for x in items)
        P = None
        if initial is None:
            F, P = self.evaluate(np.tile(I, 2), np.tile(J, 2), np.tile(LO, 2), np.tile(HI, 2),
                                 np.concatenate([T, T / _LADDER]))
            initial = np.stack([F[: len(I)], F[len(I) :]], axis=1)
            P = P[: len(I)]
        scales = [_scale(self.f0, initial[:, k], T / _LADDER**k, self.eps_f, tol) for k in range(initial.shape[1])]
        fd, settled = self._settle(scales, tol, values)
        while len(scales) < _MAX_SCALES and not settled.all():
            sel = np.nonzero(~settled)[0]
            k = len(scales)
            F = np.full((len(I), 4), np.nan)
            F[sel] = self.evaluate(I[sel], J[sel], LO[sel], HI[sel], T[sel] / _LADDER**k)[0]
            scales.append(_scale(self.f0, F, T / _LADDER**k, self.eps_f, tol))
            fd, settled = self._settle(scales, tol, values)
        return fd, P

    @staticmethod
    def _settle(scales, tol, values) -> tuple[_FD, np.ndarray]:
        """The ladder's reading, and which items it settles: a finer scale could still change the verdict
        where some analytic value disagrees with the estimate, or where two values that disagree with each
        other both fit inside its error bars. With a single scale, values that all agree with a smooth
        estimate are accepted (a wrong finite difference does not land on the analytic value by chance)."""
        fd = _resolve(scales, tol)
        if len(scales) == 1 and values:
            s0 = scales[0]
            with np.errstate(invalid="ignore"):
                agree = s0["finite"] & ~s0["nonsmooth"]
                for v in values:
                    agree &= np.abs(v - s0["value"]) <= 2 * s0["err"] + tol
            fd.value[agree], fd.err[agree] = s0["value"][agree], s0["err"][agree]
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
        return self.ladder((flat, zeros, zeros, zeros, steps), self.tol[flat])[0]


def _consistent(v: np.ndarray, fd: _FD, tol: np.ndarray) -> np.ndarray:
    """Whether values agree with finite differences: within the estimate's error, or inside the one-sided
    interval where the function is not smooth."""
    with np.errstate(invalid="ignore"):
        smooth_ok = np.abs(v - fd.value) <= 2 * fd.err + tol
        kink_ok = (v >= fd.lo - tol) & (v <= fd.hi + tol)
    return fd.finite & np.isfinite(v) & np.where(fd.nonsmooth, kink_ok | smooth_ok, smooth_ok)


def _classify(A: np.ndarray, H: np.ndarray | None, fd: _FD, tol: np.ndarray,
              lenient: np.ndarray | bool = False) -> np.ndarray:
    """Per-item verdicts from autodiff A, hand H (or None) and finite differences: the side that disagrees
    with the other two is wrong.

    ``lenient`` items are random directions. Along a direction through several kinks at once (ties, ReLUs at
    0 in several coordinates), a valid choice of one-sided derivative per coordinate need not lie between the
    directional one-sided derivatives, so finite differences cannot judge there: such items are "kink"."""
    kinked = fd.nonsmooth
    waived = kinked & lenient & fd.finite  # lenient items at a kink: every finite value is accepted
    ca = _consistent(A, fd, tol) | (waived & np.isfinite(A))
    if H is None:
        with np.errstate(invalid="ignore"):
            # Two sides only: blame autodiff when finite differences are smooth, resolved and far off.
            decisive = fd.resolved & ~kinked & (np.abs(A - fd.value) > 10 * (2 * fd.err + tol))
        out = np.where(ca, np.where(kinked, "kink", "ok"), np.where(decisive, "autodiff_wrong", "mismatch"))
        return np.where(~np.isfinite(A) & fd.finite, "autodiff_wrong", out).astype(object)
    ch = _consistent(H, fd, tol) | (waived & np.isfinite(H))
    with np.errstate(invalid="ignore"):
        agree = (np.abs(A - H) <= tol) | (waived & np.isfinite(A) & np.isfinite(H))
    out = np.where(
        agree,
        np.where(kinked, "kink", np.where(ca, "ok", "fd_unreliable")),
        np.where(ca & ch, np.where(kinked, "kink", "mismatch"),
                 np.where(ca, "hand_wrong", np.where(ch, "autodiff_wrong", "mismatch"))),
    )
    return out.astype(object)


def _default_rtol(eps: float) -> float:
    return max(1e-7, 3 * math.sqrt(eps))


# ----------------------------------------------------------------------------------------------------------
# check_grad


@dataclasses.dataclass
class _Item:
    """One comparison: an element (index into the leaf) or a random direction (index None)."""

    verdict: str
    index: tuple[int, ...] | None
    A: float
    H: float | None
    N: float
    abs_err: float
    rel_err: float


def _make_item(verdict, index, A, H, N) -> _Item:
    A, N = float(A), float(N)
    H = None if H is None else float(H)
    vals = [A, N] + ([H] if H is not None else [])
    diffs = [abs(A - N)] + ([abs(H - N), abs(A - H)] if H is not None else [])
    abs_err = max(diffs) if all(math.isfinite(d) for d in diffs) else float("inf")
    mag = max((abs(v) for v in vals if math.isfinite(v)), default=0.0)
    rel_err = abs_err / mag if mag > 0 else (0.0 if abs_err == 0 else float("inf"))
    return _Item(str(verdict), None if index is None else tuple(int(i) for i in index), A, H, N, abs_err, rel_err)


def _note_for(verdict: str, item: _Item | None, n_disagree: int, extra: Sequence[str]) -> str:
    parts = []
    if item is not None and verdict != "ok":
        at = f"at {list(item.index)}" if item.index is not None else "along a random direction"
        parts.append({
            "kink": f"not differentiable at or right next to {at.removeprefix('at ')}: the one-sided derivatives "
                    "differ, and autodiff and hand lie between them",
            "fd_unreliable": f"autodiff and hand agree {at}; finite differences do not (a noisy or nearly non-smooth function)",
            "hand_wrong": f"hand differs from autodiff and finite differences {at}",
            "autodiff_wrong": f"autodiff differs from finite differences{' and hand' if item.H is not None else ''} {at}",
            "mismatch": f"autodiff, hand and finite differences disagree {at}; no one side can be blamed",
        }[verdict])
    if n_disagree and verdict != "ok":
        parts.append(f"autodiff and hand disagree at {n_disagree} element(s)")
    parts += list(extra)
    return "; ".join(parts)


def check_grad(
    fn: Callable[..., jax.Array],
    params: Any,
    *args: Any,
    hand: Callable[..., Any] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    mode: str = "auto",
    seed: int = 0,
    _reuse: bool = False,
) -> GradReport:
    """Checks the gradient of a scalar function three ways: autodiff, the hand formula, finite differences.

    Args:
        fn: ``fn(params, *args) -> scalar``.
        params: any pytree of float arrays (dicts, lists, tuples, NamedTuples, registered dataclasses).
        *args: further arguments of ``fn`` (data, labels, keys), not differentiated. Arrays are traced; other
            values (Python numbers, strings) are held static.
        hand: ``hand(params, *args)``, the hand-derived gradient with the structure, shapes and dtypes of
            ``params``; None checks autodiff against finite differences only.
        rtol, atol: override the analytic tolerances (relative and absolute, per element).
        mode: ``"auto"`` (every element by finite differences where cheap, projections elsewhere),
            ``"exact"`` (every element) or ``"projection"``.
        seed: seed of the random directions.

    Returns:
        A :class:`GradReport`: a row per leaf with its verdict, worst element and the three values there.

    Raises:
        TypeError, ValueError: integer or non-finite params, a non-scalar or non-finite ``fn``, a ``hand``
            whose result has another structure, shape or dtype; each message names the leaf path.
    """
    start = time.perf_counter()
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
    if not _reuse:
        # A fresh wrapper per call: compiled programs are cached per function object, and a function may read
        # globals (data, constants) that changed since an earlier check. Only check_vjp and check_jacobian,
        # which make their own wrappers for one call, reuse compilations across their inner checks.
        fn = _fresh(fn)
        hand = _fresh(hand) if hand is not None else None
    params = _prepare_params(params)
    layout = _layout(params)
    dyn, spec = _split_args(args)

    # 1. At the parameters' own precision: what the user's code computes (for float64 parameters, the
    #    float64 check below is that precision).
    facts = _static_facts(fn, hand, layout, spec, tuple(jnp.result_type(x) for x in jax.tree_util.tree_leaves(params)),
                          tuple((tuple(d.shape), d.dtype) for d in dyn), x64_enabled())
    _check_output(facts.out, "fn(params, *args)")
    if hand is not None:
        _check_hand_structure(facts.hand_out, params)
    user_dtypes = sorted({str(jnp.result_type(leaf)) for leaf in jax.tree_util.tree_leaves(params)})
    a_user = h_user = None
    if user_dtypes != ["float64"]:
        value_u, grad_u, hand_u = _user_stage(params, dyn, fn=fn, hand=hand, args_spec=spec)
        _check_value(value_u)
        a_user = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree_util.tree_leaves(grad_u)])
        if hand is not None:
            h_user = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree_util.tree_leaves(hand_u)])

    # 2. In float64: autodiff, hand and finite differences, compared.
    notes: list[str] = []
    with jax.enable_x64(True):
        eps_f = float(jnp.finfo(facts.out64).eps)
        if facts.out64 != jnp.float64:
            notes.append(f"fn computes in {facts.out64} even with float64 inputs; tolerances follow {facts.out64}")
        eps_c = eps_f
        for path, dtype in zip(layout.paths, facts.hand64):
            if dtype != jnp.float64:
                eps_c = max(eps_c, float(jnp.finfo(dtype).eps))
                notes.append(f"hand returns {dtype} for {path or 'params'} even with float64 inputs")
        rtol_eff = float(rtol) if rtol is not None else _default_rtol(eps_c)
        h0 = eps_f ** (1 / 5)
        plan, exact_idx = _make_plan(mode, layout, facts.flops, hand is not None)
        probe = functools.partial(_probe, params, dyn, exact_idx, np.uint32(seed % 2**32), h0, rtol_eff,
                                  -1.0 if atol is None else float(atol), fn=fn, hand=hand, layout=layout, args_spec=spec)
        try:
            res = probe(plan=plan)
        except TypeError as e:  # forward mode is undefined for jax.custom_vjp functions
            if "custom_vjp" not in str(e):
                raise
            plan = dataclasses.replace(plan, jvp=False)
            notes.append("forward mode (jvp) is unavailable for fn (a jax.custom_vjp rule): reverse mode only")
            res = probe(plan=plan)
        theta_dev = res["theta"]
        res = {k: np.asarray(v) for k, v in res.items()}
        _check_value(res["f0"])
        res["theta_dev"] = theta_dev
        engine = _Engine(fn, spec, layout, plan, res, dyn, np.uint32(seed % 2**32), eps_f, h0,
                         [jnp.result_type(leaf) for leaf in jax.tree_util.tree_leaves(params)])
        rows = _rows(res, engine, hand is not None, a_user, h_user, user_dtypes)
    dtype = "/".join(user_dtypes) + (" (finite differences in float64)" if user_dtypes != ["float64"] else "")
    return GradReport(tuple(rows), _combine_verdicts([r.verdict for r in rows]), "check_grad", dtype, tuple(notes),
                      time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class _Facts:
    """What tracing fn and hand tells, without running them (cached per function and argument shapes)."""

    out: Any  # fn's output (ShapeDtypeStruct) at the parameters' precision
    hand_out: Any  # hand's output structure, or None
    out64: Any  # fn's output dtype with float64 inputs
    hand64: tuple  # hand's leaf dtypes with float64 inputs
    flops: float  # estimated cost of one evaluation of fn


@functools.lru_cache(maxsize=16)
def _static_facts(fn, hand, layout, spec, param_dtypes, dyn_sig, x64) -> _Facts:
    params = jax.tree_util.tree_unflatten(
        layout.treedef, [jax.ShapeDtypeStruct(s, d) for s, d in zip(layout.shapes, param_dtypes)])
    dyn = [jax.ShapeDtypeStruct(s, d) for s, d in dyn_sig]
    out = jax.eval_shape(lambda p, d: fn(p, *_join_args(d, spec)), params, dyn)
    hand_out = jax.eval_shape(lambda p, d: hand(p, *_join_args(d, spec)), params, dyn) if hand is not None else None
    with jax.enable_x64(True):
        theta_s = jax.ShapeDtypeStruct((layout.n,), jnp.float64)
        dyn_s = [jax.ShapeDtypeStruct(d.shape, jnp.float64 if jnp.issubdtype(d.dtype, jnp.floating) else d.dtype)
                 for d in dyn]
        closed = jax.make_jaxpr(lambda th, d: fn(layout.unravel(th), *_join_args(d, spec)))(theta_s, dyn_s)
        out64 = closed.out_avals[0] if len(closed.out_avals) == 1 else None
        hand64 = ()
        if hand is not None:
            h = jax.eval_shape(lambda th, d: hand(layout.unravel(th), *_join_args(d, spec)), theta_s, dyn_s)
            hand64 = tuple(leaf.dtype for leaf in jax.tree_util.tree_leaves(h))
    return _Facts(out, hand_out, getattr(out64, "dtype", None), hand64, max(_jaxpr_flops(closed.jaxpr), 1.0))


def _check_value(value: Any) -> None:
    if not np.isfinite(float(value)):
        raise ValueError(f"fn(params, *args) = {float(value)} at the given params: the function itself is not finite")


def _vectorise() -> bool:
    """Evaluate finite-difference items many at a time (vmap) on accelerators, one at a time on CPU."""
    return jax.default_backend() != "cpu"


def _make_plan(mode, layout, flops, has_hand) -> tuple[_Plan, np.ndarray]:
    sizes = layout.sizes
    if mode == "exact":
        exact = [True] * len(sizes)
    elif mode == "projection":
        exact = [False] * len(sizes)
    else:
        # Coordinate-wise where the budget allows (8 evaluations per element), smallest leaves first.
        budget = min(int(_EXACT_FLOP_BUDGET / (8 * max(flops, 1.0))), _MAX_EXACT_ELEMENTS)
        exact, used = [False] * len(sizes), 0
        for i in sorted(range(len(sizes)), key=lambda i: sizes[i]):
            if sizes[i] <= _ALWAYS_EXACT or used + sizes[i] <= budget:
                exact[i] = True
                used += sizes[i]
    idx = [np.arange(o, o + s) for o, s, e in zip(layout.offsets, sizes, exact) if e]
    exact_idx = (np.concatenate(idx) if idx else np.zeros(0)).astype(np.int32)
    # With a hand gradient, autodiff and hand are compared at every element; one direction per leaf then
    # checks the two jointly against finite differences. Without one, three directions per leaf.
    n_proj = 1 if has_hand else _N_PROJ
    n_items = len(exact_idx) + sum(_K_MAG + n_proj for e in exact if not e) + sum(1 for e in exact if e)
    # Cheap functions: 4 scales up front (kinks then rarely need a second compilation). Costly ones: 1, and
    # finer scales only where finite differences disagree with the analytic values.
    scales = 4 if n_items * 16 * flops <= _EXACT_FLOP_BUDGET else 1
    # Accelerators: many items at once (vmap). CPU: one at a time (see _eval_items).
    batch = max(1, min(256, _MEM_ELEMENTS // (6 * max(layout.n, 1)))) if _vectorise() else 1
    return _Plan(tuple(exact), n_proj, _K_MAG, scales, True, batch), exact_idx


def _jaxpr_flops(jaxpr: Any) -> float:
    """A rough count of one evaluation's flops from its jaxpr: 2·m·n·k per matrix product, one per output
    element for everything else, sub-computations included (a loop's body counted once per trip)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        out = sum(math.prod(getattr(v.aval, "shape", ())) for v in eqn.outvars)
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * out * math.prod(lhs[d] for d in lc)
        else:
            total += out
        trips = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    total += trips * _jaxpr_flops(inner)
                elif hasattr(sub, "eqns"):
                    total += trips * _jaxpr_flops(sub)
    return total


def _rows(res, engine: _Engine, has_hand, a_user, h_user, user_dtypes) -> list[Row]:
    layout, plan = engine.layout, engine.plan
    a, h, tol = res["a"], (res["h"] if has_hand else None), engine.tol
    I, J, LO, HI, T, P = res["I"], res["J"], res["LO"], res["HI"], res["T"], res["P"]
    item_tol = np.where(I >= 0, tol[np.maximum(I, 0)], np.maximum(P[:, 2], engine.floor))
    is_el = I >= 0
    A = np.where(is_el, a[np.maximum(I, 0)], P[:, 0])
    H = None if h is None else np.where(is_el, h[np.maximum(I, 0)], P[:, 1])
    fd, _ = engine.ladder((I, J, LO, HI, T), item_tol, initial=res["F"], values=[A] if H is None else [A, H])
    verdicts = _classify(A, H, fd, item_tol, lenient=~is_el)
    d_leaf = np.array(_dir_items(plan)[0])
    item_leaf = np.where(is_el, np.searchsorted(np.array(layout.offsets), np.maximum(I, 0), side="right") - 1,
                         np.concatenate([np.zeros(int(is_el.sum()), int), d_leaf]))

    rows = []
    for li, (path, shape, o, s) in enumerate(zip(layout.paths, layout.shapes, layout.offsets, layout.sizes)):
        items: list[_Item] = []
        extra: list[str] = []
        for k in np.nonzero(item_leaf == li)[0]:
            index = np.unravel_index(I[k] - o, shape) if is_el[k] else None
            items.append(_make_item(verdicts[k], index, A[k], None if H is None else H[k], fd.value[k]))
        n_disagree = 0
        if h is not None:
            with np.errstate(invalid="ignore"):
                dis = ~(np.abs(a[o : o + s] - h[o : o + s]) <= tol[o : o + s])
            n_disagree = int(dis.sum())
            done = {int(I[k]) - o for k in np.nonzero((item_leaf == li) & is_el)[0]}
            todo = []
            if n_disagree:
                bad = _badness(a[o : o + s], h[o : o + s], tol[o : o + s])
                k = min(s, _K_DISAGREE + len(done))
                top = np.argpartition(-bad, k - 1)[:k] if k < s else np.arange(s)
                top = top[np.argsort(-bad[top], kind="stable")]
                todo = [o + int(i) for i in top if dis[i] and int(i) not in done][:_K_DISAGREE]
            if todo:
                items += _arbitrate(np.array(todo), li, a, h, tol, engine)
        # A projection that fails with no element to show for it: bisect down to the element.
        bad_dirs = [it for it in items if it.index is None and it.verdict in _FAILING + ("fd_unreliable",)]
        if bad_dirs and not any(it.index is not None and it.verdict == bad_dirs[0].verdict for it in items):
            located = _bisect(li, a, h, tol, engine)
            items.append(located)
            extra.append("element located by bisecting a failing random projection")
            if located.verdict in ("hand_wrong", "autodiff_wrong"):
                for it in items:  # the located element explains the failing projections
                    if it.index is None and it.verdict == "mismatch":
                        it.verdict = located.verdict
        if plan.jvp:
            k = int(np.nonzero(~is_el)[0][list(d_leaf).index(li)])
            jv, jr = float(res["jvp"][li]), float(A[k])
            if not abs(jv - jr) <= item_tol[k]:
                fwd_right = bool(_consistent(np.array([jv]), fd.take(slice(k, k + 1)), item_tol[k : k + 1])[0])
                extra.append(
                    f"forward mode (jvp {jv:.6e}) and reverse mode (grad·u {jr:.6e}) disagree along a random "
                    f"direction; finite differences give {fd.value[k]:.6e}: {'reverse' if fwd_right else 'forward'} "
                    "mode is wrong"
                )
                items.append(_make_item("autodiff_wrong", None, jr if fwd_right else jv, None, fd.value[k]))
        if user_dtypes != ["float64"]:
            already = {"hand" if it.verdict == "hand_wrong" else "autodiff" for it in items
                       if it.verdict in ("hand_wrong", "autodiff_wrong")}
            eps = float(jnp.finfo(engine.user_dtypes[li]).eps)
            extra_u, items_u = _user_precision(o, s, shape, a, h, a_user, h_user, eps, skip=already)
            extra += extra_u
            items += items_u
        rows.append(_row(path, li, s, items, n_disagree, extra, a, h, o, plan))
    return rows


def _row(path, li, size, items, n_disagree, extra, a, h, o, plan) -> Row:
    verdict = _combine_verdicts([it.verdict for it in items]) if items else "ok"

    def rank(it):
        relevant = verdict != "mismatch" or it.verdict in _FAILING
        err = it.abs_err if math.isfinite(it.abs_err) else 1e308
        return (_SEVERITY[it.verdict] if relevant else -1, it.index is not None, err)

    shown = [it for it in items if it.index is not None] if verdict == "ok" else items
    worst = max(shown or items, key=rank, default=None)
    max_abs = max((it.abs_err for it in items), default=0.0)
    max_rel = max((it.rel_err for it in items), default=0.0)
    if h is not None and size:
        with np.errstate(invalid="ignore"):
            d = np.abs(a[o : o + size] - h[o : o + size])
        max_abs = max(max_abs, float(np.max(np.where(np.isnan(d), np.inf, d))))
    return Row(
        path=path,
        verdict=verdict,
        worst_index=worst.index if worst is not None else None,
        max_abs_err=float(max_abs),
        max_rel_err=float(max_rel),
        autodiff=worst.A if worst is not None else None,
        hand=worst.H if worst is not None else None,
        numeric=worst.N if worst is not None else None,
        method="exact" if plan.exact[li] else "projection",
        size=size,
        checked=len({it.index for it in items if it.index is not None}),
        directions=sum(1 for it in items if it.index is None),
        note=_note_for(verdict, worst, n_disagree, extra),
    )


def _badness(a, h, tol):
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.abs(a - h) / np.maximum(tol, 1e-300)
    return np.where(np.isnan(b), 1e308, b)


def _arbitrate(flat: np.ndarray, li: int, a, h, tol, engine: _Engine) -> list[_Item]:
    """Finite differences at elements where autodiff and hand disagree: who is wrong there."""
    fd = engine.at_elements(flat)
    verdicts = _classify(a[flat], None if h is None else h[flat], fd, tol[flat])
    o, shape = engine.layout.offsets[li], engine.layout.shapes[li]
    return [_make_item(verdicts[k], np.unravel_index(i - o, shape), a[i], None if h is None else h[i], fd.value[k])
            for k, i in enumerate(flat)]


def _bisect(li: int, a, h, tol, engine: _Engine) -> _Item:
    """Locates an element responsible for a failing projection: halve the direction's support, keep the half
    whose finite-difference check fails worst, until one element is left; then check that element."""
    layout, plan = engine.layout, engine.plan
    o, s = layout.offsets[li], layout.sizes[li]
    rms = math.sqrt(float(np.mean(engine.theta_np[o : o + s] ** 2))) if s else 0.0
    step = engine.h0 * max(1.0, rms)
    d_leaf, d_j = _dir_items(plan)
    streams = [j for leaf, j in zip(d_leaf, d_j) if leaf == li]

    def badness(j, ranges):
        """How far each half's projection is from finite differences, in units of the allowed error (one
        scale: only the comparison between the halves matters here)."""
        n = len(ranges)
        lo, hi = np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges])
        F, P = engine.evaluate(np.full(n, -1), np.full(n, j), lo, hi, np.full(n, step))
        dt = np.maximum(P[:, 2], engine.floor)
        sc = _scale(engine.f0, F, np.full(n, step), engine.eps_f, dt)
        refs = [P[:, 0]] if h is None else [P[:, 0], P[:, 1]]
        with np.errstate(invalid="ignore", divide="ignore"):
            bad = np.max([np.abs(r - sc["value"]) for r in refs], axis=0) / (2 * sc["err"] + dt)
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
            items.append(_make_item("autodiff_wrong" if name == "autodiff" else "hand_wrong", np.unravel_index(i, shape),
                                    a_user[o + i], None if h64 is None else h_user[o + i], ref[i]))
    return extra, items


# ----------------------------------------------------------------------------------------------------------
# check_vjp, check_jacobian, check_chain


def _rename_rows(report: GradReport, names: Sequence[str], title: str) -> GradReport:
    rows = []
    for r in report.rows:
        path = r.path
        if path.startswith("["):
            end = path.index("]")
            head = path[1:end]
            if head.isdigit() and int(head) < len(names):
                path = names[int(head)] + path[end + 1 :]
        rows.append(dataclasses.replace(r, path=path))
    return dataclasses.replace(report, rows=tuple(rows), title=title)


def _merge(reports: Sequence[GradReport], title: str, extra_notes: Sequence[str] = ()) -> GradReport:
    by_path: dict[str, Row] = {}
    order = []
    for rep in reports:
        for r in rep.rows:
            if r.path not in by_path:
                order.append(r.path)
                by_path[r.path] = r
            else:
                cur = by_path[r.path]
                key = lambda x: (_SEVERITY[x.verdict], x.max_abs_err if math.isfinite(x.max_abs_err) else 1e308)
                best = r if key(r) > key(cur) else cur
                by_path[r.path] = dataclasses.replace(best, checked=max(cur.checked, r.checked),
                                                      directions=cur.directions + r.directions)
    rows = tuple(by_path[p] for p in order)
    notes = tuple(dict.fromkeys([n for rep in reports for n in rep.notes] + list(extra_notes)))
    return GradReport(rows, _combine_verdicts([r.verdict for r in rows]), title, reports[0].dtype, notes,
                      sum(rep.seconds for rep in reports))


def _in_terms_of(message: str, names: Sequence[str]) -> str:
    """A check_grad message about the tuple of differentiated primals, told with the primals' names."""
    message = message.replace("hand must", "hand_vjp must").replace("hand returned", "hand_vjp returned")
    for i, name in enumerate(names):
        message = message.replace(f"params[{i}]", name).replace(f"'[{i}]", f"'{name}").replace(f"[{i}]:", f"{name}:")
    return f"check_vjp (differentiating {', '.join(names)}): {message}"


def _primal_names(fn: Callable, n: int) -> list[str]:
    try:
        params = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"[{i}]" for i in range(n)]


def _vdot_tree(out: Any, cot: Any) -> jax.Array:
    return sum(jnp.vdot(o, c) for o, c in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(cot)))


def check_vjp(
    fn: Callable[..., Any],
    hand_vjp: Callable[..., Any],
    *primals: Any,
    argnums: Sequence[int] | None = None,
    cotangents: int = 2,
    names: Sequence[str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    mode: str = "auto",
    seed: int = 0,
) -> GradReport:
    """Checks a book-style backward function against `jax.vjp` and finite differences.

    ``hand_vjp(*primals, cotangent)`` must return the cotangents of the differentiable primals (``argnums``;
    default: every floating primal), as a tuple, or a single array when there is one. Under each of
    ``cotangents`` random output cotangents u, the scalar ``⟨fn(*primals), u⟩`` is checked with
    :func:`check_grad`, whose gradient is exactly the VJP. Rows are named after ``fn``'s parameters.
    """
    if not callable(fn) or not callable(hand_vjp):
        raise TypeError("check_vjp: fn and hand_vjp must be callable")
    # Python floats are points to differentiate at; ints, strings and other non-arrays stay static arguments.
    primals = tuple(jnp.asarray(p) if isinstance(p, float) else p for p in primals)
    if argnums is None:
        argnums = tuple(i for i, p in enumerate(primals) if jax.tree_util.tree_leaves(p) and all(
            _is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in jax.tree_util.tree_leaves(p)))
    argnums = tuple(argnums)
    if not argnums:
        raise ValueError("check_vjp: no floating primal to differentiate; pass argnums")
    for i in argnums:
        if not 0 <= i < len(primals):
            raise ValueError(f"check_vjp: argnums {argnums} out of range for {len(primals)} primals")
    all_names = list(names) if names is not None else _primal_names(fn, len(primals))
    row_names = [all_names[i] for i in argnums]
    const_pos = tuple(i for i in range(len(primals)) if i not in argnums)

    def merge(diff, consts):
        full = [None] * len(primals)
        for i, v in zip(argnums, diff):
            full[i] = v
        for i, v in zip(const_pos, consts):
            full[i] = v
        return full

    def scalar(diff, cot, consts):
        return _vdot_tree(fn(*merge(diff, consts)), cot)

    def hand(diff, cot, consts):
        out = hand_vjp(*merge(diff, consts), cot)
        if len(argnums) == 1 and not (isinstance(out, tuple) and len(out) == 1):
            out = (out,)
        if not isinstance(out, (tuple, list)) or len(out) != len(argnums):
            got = len(out) if isinstance(out, (tuple, list)) else describe(out)
            raise ValueError(f"hand_vjp must return {len(argnums)} cotangent(s), one for each of {row_names}; got {got}")
        return tuple(out)

    diff = tuple(primals[i] for i in argnums)
    consts = tuple(primals[i] for i in const_pos)
    out_shape = jax.eval_shape(lambda: fn(*primals))
    leaves, treedef = jax.tree_util.tree_flatten(out_shape)
    n_cot = 1 if all(leaf.shape == () for leaf in leaves) else max(1, int(cotangents))
    reports = []
    rng = np.random.default_rng(seed)  # NumPy, not jax.random: nothing to compile for a few draws
    for k in range(n_cot):
        cot = jax.tree_util.tree_unflatten(
            treedef, [np.asarray(rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
        )
        try:
            rep = check_grad(scalar, diff, cot, consts, hand=hand, rtol=rtol, atol=atol, mode=mode, seed=seed + k,
                             _reuse=True)
        except (TypeError, ValueError) as e:
            raise type(e)(_in_terms_of(str(e), row_names)) from None
        reports.append(_rename_rows(rep, row_names, "check_vjp"))
    return _merge(reports, f"check_vjp({getattr(fn, '__name__', 'fn')})")


def check_jacobian(
    fn: Callable[[jax.Array], jax.Array],
    x: Any,
    hand_jac: Callable[[jax.Array], jax.Array],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    mode: str = "auto",
    seed: int = 0,
) -> GradReport:
    """``jax.jacrev`` vs ``jax.jacfwd`` vs the hand Jacobian (e.g. softmax's ``diag(s) − s·sᵀ``) vs finite
    differences. ``hand_jac(x)`` has shape ``fn(x).shape + x.shape``. One row per output element ``y[i]``:
    the check of its gradient row ``∂y[i]/∂x``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"check_jacobian: x must be a float array; got {describe(x)}")
    y = jax.eval_shape(fn, x)
    if not hasattr(y, "shape"):
        raise TypeError("check_jacobian: fn must return a single array")
    m = math.prod(y.shape)
    if m > 4096:
        raise ValueError(f"check_jacobian: fn has {m} outputs; use check_vjp for large outputs")
    J_shape = jax.eval_shape(hand_jac, x)
    if tuple(J_shape.shape) != tuple(y.shape) + tuple(x.shape):
        raise ValueError(
            f"hand_jac(x) must have shape fn(x).shape + x.shape = {tuple(y.shape) + tuple(x.shape)}; got {describe(J_shape)}"
        )
    notes = []
    J_rev = jax.jacrev(fn)(x)
    try:
        J_fwd = jax.jacfwd(fn)(x)
    except TypeError as e:  # forward mode is undefined for jax.custom_vjp functions
        if "custom_vjp" not in str(e):
            raise
        J_fwd = None
        notes.append("jacfwd is unavailable for fn (a jax.custom_vjp rule): jacrev only")
    if J_fwd is not None:
        with np.errstate(invalid="ignore"):
            gap = np.abs(np.asarray(J_rev, np.float64) - np.asarray(J_fwd, np.float64))
        eps = float(jnp.finfo(x.dtype).eps)
        scale = float(np.max(np.abs(np.asarray(J_rev, np.float64)))) if m else 0.0
        if not np.all(gap <= 100 * eps * max(scale, 1e-30) + _default_rtol(eps) * scale):
            i = np.unravel_index(int(np.nanargmax(gap)), gap.shape)
            notes.append(f"jacrev and jacfwd disagree at J{list(i)}: {float(np.asarray(J_rev)[i])} vs "
                         f"{float(np.asarray(J_fwd)[i])}")

    def row_fn(x_, i):
        return jnp.ravel(fn(x_))[i]

    def row_hand(x_, i):
        return jnp.reshape(hand_jac(x_), (m,) + x_.shape)[i]

    reports = []
    for i in range(m):
        rep = check_grad(row_fn, x, jnp.asarray(i, jnp.int32), hand=row_hand, rtol=rtol, atol=atol, mode=mode,
                         seed=seed, _reuse=True)
        out_idx = [int(k) for k in np.unravel_index(i, y.shape)] if y.shape else []
        reports.append(_rename_rows(dataclasses.replace(rep, rows=tuple(dataclasses.replace(r, path="[0]") for r in rep.rows)),
                                    [f"y{out_idx}"], "check_jacobian"))
    merged = _merge(reports, f"check_jacobian({getattr(fn, '__name__', 'fn')})", notes)
    if any(n.startswith("jacrev and jacfwd disagree") for n in notes) and merged.ok:
        merged = dataclasses.replace(merged, verdict="autodiff_wrong")
    return merged


@dataclasses.dataclass(frozen=True)
class ChainReport:
    """The result of :func:`check_chain`: one :class:`GradReport` per link, and the whole chain's.

    ``first_broken`` is the first link (in forward order) whose hand backward is wrong, or None.
    """

    links: tuple[tuple[str, GradReport], ...]
    end_to_end: GradReport

    @property
    def first_broken(self) -> str | None:
        return next((name for name, rep in self.links if not rep.ok), None)

    @property
    def ok(self) -> bool:
        return self.end_to_end.ok and all(rep.ok for _, rep in self.links)

    @property
    def verdict(self) -> str:
        return _combine_verdicts([rep.verdict for _, rep in self.links] + [self.end_to_end.verdict])

    def __str__(self) -> str:
        w = max(len(n) for n, _ in self.links) if self.links else 4
        lines = [f"check_chain: {self.verdict} ({'ok' if self.ok else 'NOT OK'})"
                 + (f" — first broken link: {self.first_broken}" if self.first_broken else "")]
        for name, rep in self.links:
            worst = max(rep.rows, key=lambda r: (_SEVERITY[r.verdict], r.max_abs_err), default=None)
            where = f"{worst.path}{list(worst.worst_index) if worst and worst.worst_index is not None else ''}" if worst else ""
            lines.append(f"  {name.ljust(w)}  {rep.verdict:14s} worst {where:24s} abs err {_fmt(worst.max_abs_err if worst else None)}")
        lines.append(f"  {'(whole chain)'.ljust(w)}  {self.end_to_end.verdict}")
        for name, rep in self.links:
            if not rep.ok or rep.verdict != "ok":
                lines.append("")
                lines.append(f"[{name}] " + str(rep))
        if not self.end_to_end.ok:
            lines += ["", "[whole chain] " + str(self.end_to_end)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "ok": self.ok,
            "first_broken": self.first_broken,
            "links": [{"name": n, **rep.to_dict()} for n, rep in self.links],
            "end_to_end": self.end_to_end.to_dict(),
        }

    def assert_ok(self) -> ChainReport:
        if not self.ok:
            raise AssertionError("chain check failed\n" + str(self))
        return self


def check_chain(
    stages: Sequence[tuple],
    x: Any,
    *,
    cotangents: int = 2,
    rtol: float | None = None,
    atol: float | None = None,
    mode: str = "auto",
    seed: int = 0,
) -> ChainReport:
    """Checks every link of a model's backward pass at the link's actual input, and the whole chain.

    Each stage is ``(name, forward, hand_backward)`` with ``forward(x) -> y`` and
    ``hand_backward(x, dvalues) -> dx``, or ``(name, forward, hand_backward, params)`` with
    ``forward(params, x)`` and ``hand_backward(params, x, dvalues) -> (dparams, dx)``. The forward pass runs
    link by link; each link's hand backward is compared with ``jax.vjp`` of that link at its input
    (:func:`check_vjp`), and the composed hand backward with ``jax.grad`` of the composition. The report's
    ``first_broken`` names the link whose formula broke the chain.

    ``funcgrad.nn`` models give their stages with ``funcgrad.objective.Objective.stages``.
    """
    parsed = []
    for k, st in enumerate(stages):
        if not isinstance(st, (tuple, list)) or len(st) not in (3, 4) or not isinstance(st[0], str):
            raise TypeError(f"check_chain: stage {k} must be (name, forward, hand_backward[, params]); got {describe(st)}")
        if any(st[0] == p[0] for p in parsed):
            raise ValueError(f"check_chain: two stages are named {st[0]!r}; give each link its own name")
        parsed.append((st[0], st[1], st[2], st[3] if len(st) == 4 else None, len(st) == 4))
    if not parsed:
        raise ValueError("check_chain: needs at least one stage")
    x = jnp.asarray(x) if isinstance(x, (int, float)) else x
    links = []
    cur = x
    for k, (name, fwd, bwd, p, has_p) in enumerate(parsed):
        try:
            rep, cur = _check_link(name, fwd, bwd, p, has_p, cur, k, cotangents, rtol, atol, mode, seed)
        except (TypeError, ValueError) as e:
            raise type(e)(f"check_chain: link {name!r}: {e}") from None
        links.append((name, rep))
    return _whole_chain(parsed, links, x, rtol, atol, mode, seed)


def _check_link(name, fwd, bwd, p, has_p, cur, k, cotangents, rtol, atol, mode, seed):
    """One link: its hand backward against jax.vjp at the link's input. Returns the report and the output."""
    common = dict(cotangents=cotangents, rtol=rtol, atol=atol, mode=mode, seed=seed + k)
    if has_p and _has_leaves(p):
        rep = check_vjp(fwd, bwd, p, cur, argnums=(0, 1), names=["params", "x"], **common)
        nxt = fwd(p, cur)
    elif has_p:  # a link without parameters, given in the (params, x) form
        rep = check_vjp(functools.partial(fwd, p), lambda x_, d: bwd(p, x_, d)[1], cur, argnums=(0,), names=["x"],
                        **common)
        nxt = fwd(p, cur)
    else:
        rep = check_vjp(fwd, bwd, cur, argnums=(0,), names=["x"], **common)
        nxt = fwd(cur)
    return dataclasses.replace(rep, title=f"link {name}"), nxt


def _whole_chain(parsed, links, x, rtol, atol, mode, seed) -> ChainReport:
    """The composed hand backward against jax.grad of the composition."""
    all_params = {name: p for name, _, _, p, has_p in parsed if has_p and _has_leaves(p)}

    def forward(ps, x_):
        inputs, y = [], x_
        for name, fwd, _, p, has_p in parsed:
            inputs.append(y)
            y = fwd(ps.get(name, p), y) if has_p else fwd(y)
        return y, inputs

    out_shape = jax.eval_shape(lambda: forward(all_params, x)[0])
    scalar_out = getattr(out_shape, "shape", None) == ()
    rng = np.random.default_rng(seed + 1000)
    u = None if scalar_out else jax.tree_util.tree_map(
        lambda s: np.asarray(rng.standard_normal(s.shape), s.dtype), out_shape)

    def whole(ps, x_):
        y = forward(ps, x_)[0]
        return y if scalar_out else _vdot_tree(y, u)

    def whole_hand(ps, x_):
        y, inputs = forward(ps, x_)
        d = jnp.ones((), y.dtype) if scalar_out else u
        grads = {}
        for (name, _, bwd, p, has_p), inp in reversed(list(zip(parsed, inputs))):
            if has_p:
                dp, d = bwd(ps.get(name, p), inp, d)
                if name in ps:
                    grads[name] = dp
            else:
                d = bwd(inp, d)
        return {name: grads[name] for name in ps}, d

    if all_params:
        # The parameters' gradient through the whole chain. (Not the input's: an input coordinate can move
        # several kinks at once in opposite directions, where the one-sided test cannot judge conventions.)
        end = check_grad(lambda ps: whole(ps, x), all_params, hand=lambda ps: whole_hand(ps, x)[0],
                         rtol=rtol, atol=atol, mode=mode, seed=seed)
        root = "params"
    else:
        end = check_grad(lambda x_: whole({}, x_), x, hand=lambda x_: whole_hand({}, x_)[1],
                         rtol=rtol, atol=atol, mode=mode, seed=seed)
        root = "x"
    end = dataclasses.replace(end, rows=tuple(dataclasses.replace(r, path=root + r.path) for r in end.rows),
                              title="whole chain")
    return ChainReport(tuple(links), end)


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))
