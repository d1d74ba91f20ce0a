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
  evaluated only for items not yet decided.
- **Kinks.** At a kink every value between the one-sided derivatives D₋ and D₊ is a valid subgradient,
  D₋ and D₊ included. Each one-sided derivative is estimated with its own Richardson extrapolation
  (``2·D₊(h/2) − D₊(h)``: the O(h·f'') bias of a one-sided quotient cancels) and its own error (the change
  between two steps of the ladder); a value inside ``[min(D₋, D₊), max(D₋, D₊)]`` within that error passes
  with verdict ``"kink"``; a value outside fails, blamed on the side that holds it when the other is inside.
  Both outside: several kinks may meet at the point (per-kink conventions then need not lie in the
  interval), so it passes as ``"kink"`` while hand is no farther from autodiff than autodiff is from D₋ and
  D₊ together, with a note.
- **Singular points** (``sqrt``/``log`` at 0, ``|x|^p`` with p < 1 at 0): the difference quotients grow
  without bound as the step shrinks, or the function is undefined on one side. The derivative does not exist
  there: verdict ``"singular"`` (passing) when autodiff and hand describe it alike (both infinite, or the
  same convention), ``"mismatch"`` when they differ; neither side is blamed.
- **Autodiff and hand** are compared element by element over every leaf (both are full vectors, so a single
  wrong element among millions is located exactly). Elements that disagree, and elements where either side
  is not finite, are arbitrated by finite differences at that element: the side that disagrees with the other
  two is wrong. When autodiff and hand agree with each other and finite differences are confident (their
  error estimate far below the disagreement) and say otherwise, both share a mistake: ``"both_wrong"``
  (a ``stop_gradient`` in the wrong place, a wrong ``custom_vjp`` copied into the hand formula).
  ``"fd_unreliable"`` is kept for when finite differences truly cannot decide; the row's note says why.
- **Large leaves** are checked against finite differences by random projections plus the largest-gradient
  element, compiled with ``jit`` into one program (batched with ``vmap`` on accelerators, a ``lax`` loop on
  CPU); a projection that disagrees is bisected down to the element responsible. No Jacobian is ever
  materialised. Projections skip elements where either side is not finite (those are checked one by one).
- **What is differentiated.** By default every inexact-array leaf of ``params``; every other leaf (integer
  arrays, RNG keys and counters, functions, strings) is held fixed and listed in the report's notes; ``wrt``
  chooses otherwise. ``has_aux=True`` takes ``fn`` returning ``(loss, aux)`` as `jax.grad` does.
- **Hand gradients** may be in any float dtype (compared in float64) and may be written in NumPy, as the book
  writes every backward pass: a ``hand`` that JAX cannot trace is called eagerly on NumPy arrays (float64
  for the float64 check, the parameters' own dtypes for the user-precision check). Functions JAX cannot
  reverse-differentiate (``lax.while_loop``) get their autodiff gradient from forward mode.
- Every call traces ``fn`` and ``hand`` afresh: a function may read globals that changed since an earlier
  check, and a cached trace would check the old function.
- **Tolerances** come from the dtypes (``rtol = max(1e-7, 3·√eps)``, at most 5%, of the lowest precision fn
  computes in with float64 inputs, a final cast of its output aside; finite differences carry that rounding too,
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
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad._checks import check_finite_tree, describe, in_range, is_tracer, x64_enabled

__all__ = [
    "VERDICTS",
    "PASSING",
    "Row",
    "GradReport",
    "ChainReport",
    "check_grad",
    "check_vjp",
    "check_jacobian",
    "check_chain",
]

#: Every verdict, from the mildest to the most severe.
VERDICTS = ("ok", "kink", "singular", "fd_unreliable", "hand_wrong", "autodiff_wrong", "both_wrong", "mismatch")
#: The verdicts that pass.
PASSING = ("ok", "kink", "singular", "fd_unreliable")
_SEVERITY = {v: i for i, v in enumerate(VERDICTS)}
_FAILING = ("hand_wrong", "autodiff_wrong", "both_wrong", "mismatch")
_BLAMES = ("hand_wrong", "autodiff_wrong", "both_wrong")

# Budget for coordinate-wise finite differences in mode="auto": about this many flops in total.
_EXACT_FLOP_BUDGET = 4e9
_ALWAYS_EXACT = 16  # leaves this small are always checked element by element
_MAX_EXACT_ELEMENTS = 4096  # mode="auto" never checks more elements than this one by one
_N_PROJ = 3  # random directions per projection-checked leaf without a hand gradient (1 with one)
_K_MAG = 1  # largest-|gradient| elements per projection-checked leaf, checked one by one
# Disagreeing (or non-finite) elements per leaf arbitrated by finite differences, in rounds until one fails.
_ARBITRATION_ROUNDS = (8, 24, 96, 384)
_MEM_ELEMENTS = 1 << 23  # perturbed parameter copies held at once (float64 elements)
_CONFIDENT = 10.0  # finite differences are confident when a value lies this many error estimates away
_LIST = 8  # paths listed in a note before "and N more"


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
        worst_index: index into the leaf of the element that decided the verdict (None when the leaf was
            checked by projections only and nothing was wrong, or no element could be singled out).
        max_abs_err: the largest difference among the three values shown (``autodiff``, ``hand``,
            ``numeric``), i.e. at ``worst_index``.
        max_rel_err: the same relative to the largest of those values.
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

    @property
    def where(self) -> str:
        """The leaf path and, when known, the element: ``['dense1']['W'][3, 1]``."""
        return self.path + (str(list(self.worst_index)) if self.worst_index is not None else "")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["worst_index"] = list(self.worst_index) if self.worst_index is not None else None
        for k in ("max_abs_err", "max_rel_err", "autodiff", "hand", "numeric"):
            d[k] = _json_float(d[k])
        d["ok"] = self.ok
        return d


def _combine_verdicts(verdicts: Sequence[str]) -> str:
    """The verdict over several: one kind of blame (with or without unattributed disagreements) is that
    blame; different blames together are a mismatch; else the most severe passing verdict."""
    blamed = {v for v in verdicts if v in _BLAMES}
    if len(blamed) == 1:
        return blamed.pop()
    if blamed or "mismatch" in verdicts:
        return "mismatch"
    return max(verdicts, key=_SEVERITY.__getitem__, default="ok")


def _err_key(x: float) -> float:
    return x if math.isfinite(x) else 1e308


def _worst_row(rows: Sequence[Row], verdict: str) -> Row | None:
    """The row that decided ``verdict``: failing rows first (the blamed kind when one is blamed), then the
    most severe passing verdict, then the largest error."""
    if not rows:
        return None
    deciding = [r for r in rows if r.verdict == verdict] or [r for r in rows if not r.ok] or list(rows)
    return max(deciding, key=lambda r: (_SEVERITY[r.verdict], _err_key(r.max_abs_err)))


@dataclasses.dataclass(frozen=True)
class GradReport:
    """The result of :func:`check_grad` (and of :func:`check_vjp`, :func:`check_jacobian`).

    ``verdict`` is one of :data:`VERDICTS`; ``ok`` is True for the passing ones (:data:`PASSING`):

    - ``ok``: autodiff, hand and finite differences agree.
    - ``kink``: not differentiable there (ReLU at 0, max at a tie, |x| at 0); the values lie between the
      one-sided derivatives, so each is a valid subgradient.
    - ``singular``: the derivative is infinite or undefined there (``sqrt`` at 0), and autodiff and hand
      describe it alike.
    - ``fd_unreliable``: autodiff and hand agree; finite differences cannot decide (the note says why).
    - ``hand_wrong`` / ``autodiff_wrong``: that side disagrees with the other two (a wrong ``custom_vjp`` is
      ``autodiff_wrong``).
    - ``both_wrong``: autodiff and hand agree with each other, and confident finite differences disagree
      with both: a mistake they share.
    - ``mismatch``: a disagreement no single side can be blamed for.

    ``str(report)`` is a table, a line per leaf; :meth:`to_dict` is JSON-able (with an ``environment``
    block), :meth:`to_markdown` is for pasting into a bug report; :meth:`assert_ok` raises an AssertionError
    carrying the table.
    """

    rows: tuple[Row, ...]
    verdict: str
    title: str = "check_grad"
    dtype: str = ""
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    environment: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def ok(self) -> bool:
        return self.verdict in PASSING

    @property
    def failing(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if not r.ok)

    @property
    def worst(self) -> Row | None:
        """The row that decided the verdict (None for a report without rows)."""
        return _worst_row(self.rows, self.verdict)

    def _head(self) -> str:
        n = sum(r.size for r in self.rows)
        return (f"{self.title}: verdict {self.verdict} ({'ok' if self.ok else 'NOT OK'}) — {len(self.rows)} leaves, "
                f"{n} parameters{', ' + self.dtype if self.dtype else ''}, {self.seconds:.2f}s")

    def summary(self) -> str:
        """A line: the verdict and, when not plain ok, the leaf and element that decided it."""
        n = sum(r.size for r in self.rows)
        head = (f"{self.title}: {self.verdict} ({'ok' if self.ok else 'NOT OK'}) — {len(self.rows)} leaves, "
                f"{n} parameters, {self.seconds:.2f}s")
        r = self.worst
        if r is None or self.verdict == "ok":
            return head
        if self.ok:
            why = {"kink": "not differentiable at or next to", "fd_unreliable": "finite differences unsure at",
                   "singular": "no finite derivative at"}
            return f"{head}; {why.get(r.verdict, r.verdict)} {r.where}"
        return f"{head}; {r.verdict} at {r.where}: {r.note}"

    def __str__(self) -> str:
        lines = [self._head()]
        pw = max([len("leaf")] + [len(r.path) for r in self.rows])
        lines.append(
            f"  {'leaf'.ljust(pw)}  {'verdict':14s} {'method':18s} {'worst index':12s}"
            f" {'autodiff':>11s} {'hand':>11s} {'numeric':>11s} {'abs err':>10s} {'rel err':>10s}"
        )
        for r in self.rows:
            idx = str(list(r.worst_index)) if r.worst_index is not None else "—"
            lines.append(
                f"  {r.path.ljust(pw)}  {r.verdict:14s} {_method(r):18s} {idx:12s}"
                f" {_fmt(r.autodiff)} {_fmt(r.hand)} {_fmt(r.numeric)} {_fmt(r.max_abs_err, 10)} {_fmt(r.max_rel_err, 10)}"
            )
        explained = [r for r in self.rows if r.note]
        if explained or self.notes:
            lines.append("  notes:")
            lines += [f"    {r.path or '(params)'}: {r.note}" for r in explained]
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
            "environment": dict(self.environment),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_markdown(self) -> str:
        """The report as Markdown, for pasting into an issue: verdict, a table of leaves, notes, environment."""
        def cell(x: Any) -> str:
            return str(x).replace("|", "\\|")

        out = [f"### {cell(self.title)}: `{self.verdict}` ({'ok' if self.ok else 'NOT OK'})", ""]
        out.append(f"{len(self.rows)} leaves, {sum(r.size for r in self.rows)} parameters"
                   + (f", {self.dtype}" if self.dtype else "") + f", {self.seconds:.2f}s")
        out += ["", "| leaf | verdict | method | worst index | autodiff | hand | numeric | abs err | rel err |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            idx = str(list(r.worst_index)) if r.worst_index is not None else "—"
            vals = [_fmt(v).strip() for v in (r.autodiff, r.hand, r.numeric)]
            out.append(f"| `{cell(r.path or '(params)')}` | {r.verdict} | {_method(r)} | {idx} | "
                       + " | ".join(vals) + f" | {_fmt(r.max_abs_err).strip()} | {_fmt(r.max_rel_err).strip()} |")
        notes = [f"`{cell(r.path or '(params)')}`: {cell(r.note)}" for r in self.rows if r.note] + list(self.notes)
        if notes:
            out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
        if self.environment:
            out += ["", "<details><summary>Environment</summary>", "", "```json",
                    json.dumps(self.environment, indent=1, sort_keys=True), "```", "", "</details>"]
        return "\n".join(out) + "\n"

    def assert_ok(self) -> GradReport:
        """Raises an AssertionError carrying the table unless ``ok``; returns the report otherwise."""
        if not self.ok:
            raise AssertionError("gradient check failed\n" + str(self))
        return self


def _method(r: Row) -> str:
    return f"exact {r.checked}/{r.size}" if r.method == "exact" else f"proj {r.directions}d+{r.checked}e"


# ----------------------------------------------------------------------------------------------------------
# What is differentiated: the selection of leaves, and the flat layout of the differentiated ones


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The differentiated leaves as one flat vector (hashable, so jitted helpers are cached per layout)."""

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

    def unravel(self, theta: jax.Array, dtypes: Sequence[Any] | None = None) -> Any:
        leaves = [theta[o : o + s].reshape(shape) for o, s, shape in zip(self.offsets, self.sizes, self.shapes)]
        if dtypes is not None:
            leaves = [leaf.astype(d) for leaf, d in zip(leaves, dtypes)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def ravel(self, tree: Any, dtype: Any = jnp.float64) -> jax.Array:
        leaves = jax.tree_util.tree_leaves(tree)
        if not leaves:
            return jnp.zeros((0,), dtype)
        return jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves])


@dataclasses.dataclass(frozen=True, eq=False)
class _Selection:
    """Which leaves of ``params`` are differentiated (``diff``) and which are held fixed."""

    treedef: Any
    paths: tuple[str, ...]
    leaves: tuple[Any, ...]
    diff: tuple[bool, ...]

    @property
    def diff_paths(self) -> tuple[str, ...]:
        return tuple(p for p, d in zip(self.paths, self.diff) if d)

    def split(self) -> tuple[list, list]:
        return ([x for x, d in zip(self.leaves, self.diff) if d], [x for x, d in zip(self.leaves, self.diff) if not d])

    def layout(self) -> _Layout:
        dl = self.split()[0]
        shapes = tuple(tuple(int(s) for s in jnp.shape(x)) for x in dl)
        sizes = [math.prod(s) for s in shapes]
        offsets = tuple(int(o) for o in np.cumsum([0] + sizes[:-1]))
        return _Layout(jax.tree_util.tree_structure(list(dl)), shapes, offsets, self.diff_paths)


def _leaf_dtype(leaf: Any) -> Any:
    if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
        return leaf.dtype
    return None


def _is_inexact(leaf: Any) -> bool:
    dt = _leaf_dtype(leaf)
    return dt is not None and jnp.issubdtype(dt, jnp.inexact)


def _wrt_mask(params: Any, wrt: Any, n: int) -> list[bool] | None:
    """``wrt`` as one bool per leaf: None (default), a predicate, or a pytree (prefix) of bools."""
    if wrt is None:
        return None
    # A predicate is a callable leaf; an equinox filter spec is a Module, callable but a pytree.
    if callable(wrt) and not isinstance(wrt, bool) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(wrt)):
        out = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            v = wrt(leaf)
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"check_grad: wrt(leaf) must return True or False; for {jax.tree_util.keystr(path)} "
                                f"it returned {describe(v)}")
            out.append(bool(v))
        return out
    try:
        spread = jax.tree_util.tree_map(
            lambda w, sub: jax.tree_util.tree_map(lambda _: w, sub), wrt, params,
            is_leaf=lambda x: isinstance(x, (bool, np.bool_)))
        mask = jax.tree_util.tree_leaves(spread)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "check_grad: wrt must be a predicate (leaf -> bool) or a pytree of bools with the structure of params "
            f"(or a prefix of it, as in equinox.partition); it does not match params: {str(e).splitlines()[0]}"
        ) from None
    bad = [describe(m) for m in mask if not isinstance(m, (bool, np.bool_))]
    if bad or len(mask) != n:
        raise TypeError(f"check_grad: wrt's leaves must be True or False; got {bad[:3] or mask[:3]}")
    return [bool(m) for m in mask]


def _select(params: Any, wrt: Any) -> tuple[_Selection, list[str]]:
    """Decides which leaves are differentiated; returns the selection and notes on the leaves held fixed."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError("check_grad: params has no leaves; pass the arrays to differentiate with respect to")
    paths = tuple(jax.tree_util.keystr(p) for p, _ in flat)
    # Python floats are points to differentiate at (the book's chapter-9 examples); ints stay integers.
    leaves = tuple(jnp.asarray(x) if isinstance(x, float) else x for _, x in flat)
    mask = _wrt_mask(params, wrt, len(leaves))
    if mask is None:
        mask = [_is_inexact(x) for x in leaves]
    errors = []
    for path, leaf, d in zip(paths, leaves, mask):
        if not d:
            continue
        dt = _leaf_dtype(leaf)
        name = "params" + path
        if dt is None or not jnp.issubdtype(dt, jnp.inexact):
            what = "selected by wrt, " if wrt is not None else ""
            errors.append(f"{name} ({what}{describe(leaf)}) is not a floating-point array")
        elif jnp.issubdtype(dt, jnp.complexfloating):
            errors.append(f"{name} is complex ({describe(leaf)}); only real floating leaves can be checked: hold it "
                          "fixed with wrt=")
    if errors:
        raise TypeError("check_grad: cannot differentiate:\n  " + "\n  ".join(errors))
    if not any(mask):
        listed = ", ".join(f"{p or '(params)'} {describe(x)}" for p, x in list(zip(paths, leaves))[:_LIST])
        raise TypeError(
            "check_grad: nothing to differentiate: params has no floating-point array leaves "
            f"({listed}{', ...' if len(leaves) > _LIST else ''}). Write parameters as floats (1.0, not 1; "
            "x.astype(jnp.float32)), or choose the leaves with wrt=."
        )
    check_finite_tree(jax.tree_util.tree_unflatten(treedef, [x if d else None for x, d in zip(leaves, mask)]),
                      "params")
    fixed = [(p, x) for p, x, d in zip(paths, leaves, mask) if not d]
    notes = []
    if fixed:
        def what(x):
            if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
                return f"int {x!r}: write {x}.0 to differentiate it"
            return describe(x)

        listed = "; ".join(f"{p or '(params)'} ({what(x)})" for p, x in fixed[:_LIST])
        more = f"; and {len(fixed) - _LIST} more" if len(fixed) > _LIST else ""
        how = "wrt" if wrt is not None else "not inexact arrays; choose with wrt="
        notes.append(f"held fixed, not differentiated ({how}): {listed}{more}")
    return _Selection(treedef, paths, leaves, tuple(mask)), notes


# Arguments after params, and fixed leaves of params: arrays are traced; anything else (Python numbers,
# strings, functions, objects) is held static, compared by value when hashable and by identity otherwise.
class _Dynamic:
    def __repr__(self) -> str:
        return "<array>"


_DYN = _Dynamic()


class _ById:
    """A static value that cannot be hashed, compared by identity (a check traces its own wrappers)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ById) and other.value is self.value


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _split_args(args: Any) -> tuple[list, tuple]:
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
                leaf = _ById(leaf)
            spec.append(leaf)
    return dyn, (treedef, tuple(spec))


def _join_args(dyn: Sequence, spec: tuple) -> Any:
    treedef, static = spec
    it = iter(dyn)
    return jax.tree_util.tree_unflatten(
        treedef, [next(it) if s is _DYN else (s.value if isinstance(s, _ById) else s) for s in static])


def _fresh(fn: Callable) -> Callable:
    return lambda *a, **k: fn(*a, **k)


def _main_output(out: Any, has_aux: bool) -> Any:
    """fn's differentiated output: the loss, or its first element with ``has_aux``."""
    if has_aux:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise _UserTypeError(f"check_grad: with has_aux=True, fn must return a pair (loss, aux); it returned "
                            f"{_describe_out(out)}")
        return out[0]
    return out


def _describe_out(out: Any) -> str:
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}: ({', '.join(_describe_out(o) for o in out)})"
    return describe(out) if hasattr(out, "shape") else type(out).__name__


def _check_output(out: Any, what: str, has_aux: bool = False) -> None:
    if isinstance(out, (tuple, list)) and not has_aux:
        hint = (" If it returns (loss, aux), as for jax.value_and_grad(..., has_aux=True), pass has_aux=True."
                if len(out) == 2 else "")
        raise _UserTypeError(f"{what} must return a scalar; it returned {_describe_out(out)}.{hint}")
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", None)
        raise _UserValueError(
            f"{what} must return a scalar (shape ()); got {describe(out) if shape is not None else type(out).__name__}. "
            "Reduce it, e.g. with .sum() or .mean(), or use check_vjp for vector outputs."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise _UserTypeError(f"{what} must return a floating scalar; got {describe(out)}")


class _UserValueError(ValueError):
    """A user error detected while JAX traces the user's function (re-raised clean, without JAX's notes)."""


class _UserTypeError(TypeError):
    """A user error detected while JAX traces the user's function (re-raised clean, without JAX's notes)."""


def _clean(e: Exception) -> Exception:
    """A user error raised inside a JAX trace, as a plain ValueError/TypeError without the trace's notes."""
    return (ValueError if isinstance(e, ValueError) else TypeError)(*e.args)


# Errors JAX raises when a function needs concrete values (NumPy code): such a hand is called eagerly.
_TRACE_ERRORS = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                 jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


def _needs_eager(e: Exception) -> bool:
    return isinstance(e, _TRACE_ERRORS) or (isinstance(e, TypeError) and "immutable" in str(e))


def _host(x: Any, float64: bool) -> Any:
    """A writable NumPy copy of a concrete array (float64 when asked); PRNG keys and non-arrays as they are."""
    if not _is_array(x) or is_tracer(x):
        return x
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return x
    a = np.array(x)
    if float64 and jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(np.float64)
    return a


def _host_tree(tree: Any, float64: bool) -> Any:
    return jax.tree_util.tree_map(lambda x: _host(x, float64), tree)


# ----------------------------------------------------------------------------------------------------------
# The compiled pieces. Functions, layouts and plans are static arguments, so repeated checks of the same
# function reuse one compilation.
#
# A finite-difference "item" is a direction u along which f is differentiated: a coordinate (index >= 0) or a
# random unit vector confined to the flat index range [lo, hi) (index = -1, drawn from stream ``stream`` of the
# check's key) and to the elements where autodiff and hand are finite. f is evaluated at theta + t·u for
# t in ±step, ±step/2.


_OFFSETS = (-1.0, -0.5, 0.5, 1.0)
_LADDER = 10.0  # each finer scale divides the step by this
_MAX_SCALES = 5  # the finest step is T/10⁴


class _Items(NamedTuple):
    """Finite-difference items (arrays of equal length)."""

    index: Any  # flat element index, or -1 for a random direction
    stream: Any  # the random direction's stream number
    lo: Any  # the direction's support [lo, hi)
    hi: Any
    step: Any  # the step t


class _ProbeOut(NamedTuple):
    """What the compiled probe returns."""

    f0: Any  # fn at the parameters (float64)
    theta: Any  # the parameters, flat (float64)
    a: Any  # autodiff gradient, flat
    h: Any  # hand gradient, flat (zeros without one)
    a_finite: Any  # a and h where both are finite, else 0: what random projections use
    h_finite: Any
    tol: Any  # per-element analytic tolerance
    support: Any  # 1.0 where both autodiff and hand are finite (random directions live there)
    jvp: Any  # forward-mode derivative along each leaf's first random direction
    items: _Items
    F: Any  # (items, scales, 4): f at the four offsets per scale
    P: Any  # (items, 3): each item's direction dotted with autodiff, hand, and the aggregated tolerance


@dataclasses.dataclass(frozen=True)
class _Plan:
    exact: tuple[bool, ...]  # per leaf: every element by finite differences
    n_proj: int  # random directions per projection-checked leaf
    k_mag: int  # largest-|gradient| elements per projection-checked leaf
    scales: int  # step sizes evaluated in the probe (T, T/10, ...)
    jvp: bool  # check forward mode against reverse mode
    batch: int  # items evaluated at once (memory: about 6·n floats each)
    reverse: bool = True  # autodiff by reverse mode (else forward mode, one basis vector at a time)


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


def _direction(seed, j, lo, hi, n, support):
    """A random unit vector confined to the index range [lo, hi) and to ``support``."""
    r = jnp.arange(n)
    d = _hash_uniform(seed, j, n) * ((r >= lo) & (r < hi)) * support
    return d / jnp.maximum(jnp.linalg.norm(d), 1e-300)


def _eval_items(f, theta, seed, items, vecs, batch, support, want_jvp=None):
    """f at the four offsets along each item, each item's direction dotted with ``vecs`` (autodiff, hand,
    tolerances²), and, where ``want_jvp`` is set, the forward-mode derivative along the item's direction:
    returns F (K, 4), P (K, 3) and JV (K,) (NaN where not wanted).

    ``batch`` > 1 evaluates that many items at once with vmap (accelerators); ``batch`` == 1 evaluates them
    one at a time with lax.map (CPU, where XLA's batched matrix products are several times slower than a loop
    of plain ones, for small and large functions alike)."""
    W = jnp.zeros(items.index.shape, bool) if want_jvp is None else want_jvp
    n = theta.shape[0]
    offsets = jnp.asarray(_OFFSETS, theta.dtype)
    a, h, tol2 = vecs
    nan = jnp.full((), jnp.nan, theta.dtype)

    def branch(pred, yes, no):
        # A real branch in a sequential loop (the untaken side costs nothing); a select under vmap.
        return jax.lax.cond(pred, yes, no) if batch == 1 else jnp.where(pred, yes(), no())

    def one(item):
        i, j, lo, hi, t, w = item
        e = branch(i < 0, lambda: _direction(seed, j, lo, hi, n, support),
                   lambda: jax.nn.one_hot(jnp.maximum(i, 0), n, dtype=theta.dtype))
        at = lambda s: f(theta + (s * t) * e)  # noqa: E731
        F = jax.vmap(at)(offsets) if batch > 1 else jax.lax.map(at, offsets)
        jv = branch(w, lambda: jax.jvp(f, (theta,), (e,))[1], lambda: nan) if want_jvp is not None else nan
        return F, jnp.stack([e @ a, e @ h, jnp.sqrt((e * e) @ tol2)]), jv

    K = items.index.shape[0]
    cols = (*items, W)
    if K == 0:
        return jnp.zeros((0, 4), theta.dtype), jnp.zeros((0, 3), theta.dtype), jnp.zeros((0,), theta.dtype)
    if batch == 1:
        return jax.lax.map(one, cols)
    pad = (-K) % batch
    padded = [jnp.concatenate([x, jnp.repeat(x[:1], pad)]) if pad else x for x in cols]
    chunks = [x.reshape(-1, min(batch, K + pad)) for x in padded]
    if chunks[0].shape[0] == 1:
        F, P, JV = jax.vmap(one)(tuple(c[0] for c in chunks))
    else:
        F, P, JV = jax.lax.map(jax.vmap(one), tuple(chunks))
        F, P, JV = F.reshape(-1, 4), P.reshape(-1, 3), JV.reshape(-1)
    return F[:K], P[:K], JV[:K]


def _dtype64(dtype: Any) -> Any:
    """An argument's dtype in the float64 check: floats become float64, and signed integers int64, as they
    are in an x64 program (``lax.fori_loop(0, n)`` needs n and the literal 0 to share a dtype); unsigned
    integers (raw PRNG keys), booleans and keys stay as they are."""
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float64)
    if jnp.issubdtype(dtype, jnp.signedinteger):
        return jnp.dtype(jnp.int64)
    return dtype


def _cast64(tree):
    return jax.tree_util.tree_map(lambda x: x.astype(_dtype64(x.dtype)), tree)


def _flat_fn(fn: Callable, layout: _Layout, args_spec: tuple, dyn64: Sequence) -> Callable:
    """fn of the flat float64 parameter vector, its output in float64 (whatever dtype fn computes in)."""
    args = _join_args(dyn64, args_spec)
    return lambda theta: fn(layout.unravel(theta), *args).astype(jnp.float64)


def _forward_chunk(n: int) -> int:
    """Basis vectors per forward-mode batch: memory for about 2²² elements."""
    return max(1, min(n, (1 << 22) // max(n, 1)))


def _value_and_grad(f: Callable, theta: jax.Array, reverse: bool) -> tuple[jax.Array, jax.Array]:
    """f and its gradient: reverse mode, or forward mode along every basis vector (for functions JAX cannot
    reverse-differentiate, e.g. ``lax.while_loop``), a batch of basis vectors at a time."""
    if reverse:
        return jax.value_and_grad(f)(theta)
    n = theta.shape[0]
    c = _forward_chunk(n)

    def block(b):
        basis = jax.nn.one_hot(b * c + jnp.arange(c), n, dtype=theta.dtype)  # rows past n are zero
        return jax.vmap(lambda e: jax.jvp(f, (theta,), (e,))[1])(basis)

    g = jax.lax.map(block, jnp.arange(-(-n // c))).reshape(-1)[:n]
    return f(theta), g


@functools.partial(jax.jit, static_argnames=("fn", "hand", "layout", "dtypes", "args_spec", "reverse"))
def _user_stage(params, dyn, *, fn, hand, layout, dtypes, args_spec, reverse):
    """Value, autodiff and (traced) hand gradients at the parameters' own dtypes."""
    theta = layout.ravel(params, jnp.result_type(*dtypes))  # exact: the widest of the leaves' dtypes
    args = _join_args(dyn, args_spec)
    f = lambda th: fn(layout.unravel(th, dtypes), *args)  # noqa: E731
    wide = jax.dtypes.canonicalize_dtype(jnp.float64)  # float64 where enabled, else float32
    if reverse:
        value, grad = jax.value_and_grad(lambda p: fn(p, *args))(layout.unravel(theta, dtypes))
        grad = layout.ravel(grad, wide)
    else:
        value, grad = _value_and_grad(f, theta, False)
    h = layout.ravel(hand(layout.unravel(theta, dtypes), *args), wide) if hand is not None else None
    return value, grad, h


@functools.partial(jax.jit, static_argnames=("fn", "hand", "layout", "args_spec", "plan"))
def _probe(params, dyn, h_given, exact_idx, seed, h0, rtol, atol, eps, *, fn, hand, layout, args_spec, plan):
    """The common path in one compiled program (float64): value, autodiff and hand gradients, per-element
    tolerances, forward-mode products, and finite differences at ``plan.scales`` step sizes for every planned
    element and random direction."""
    theta = layout.ravel(params, jnp.float64)
    dyn = _cast64(list(dyn))
    f = _flat_fn(fn, layout, args_spec, dyn)
    f0, a = _value_and_grad(f, theta, plan.reverse)
    if hand is not None:
        h = layout.ravel(hand(layout.unravel(theta), *_join_args(dyn, args_spec)))
    elif h_given is not None:
        h = h_given
    else:
        h = jnp.zeros_like(theta)
    support = (jnp.isfinite(a) & jnp.isfinite(h)).astype(jnp.float64)
    a_s, h_s = jnp.where(support > 0, a, 0.0), jnp.where(support > 0, h, 0.0)
    # Per-element analytic tolerance: atol + rtol·max(|a|, |h|), atol defaulting to rtol·(the leaf's largest)
    # plus round-off at the whole gradient's scale (a leaf whose true gradient is 0 still gets round-off).
    mag = jnp.maximum(jnp.abs(a_s), jnp.abs(h_s))
    leaf_max = jnp.concatenate([jnp.full((s,), jnp.max(mag[o : o + s], initial=0.0))
                                for o, s in zip(layout.offsets, layout.sizes)])
    tol = jnp.where(atol >= 0, atol, rtol * leaf_max + 64 * eps * jnp.max(mag, initial=0.0)) + rtol * mag
    # (eps: float64's; the round-off of a float64 gradient whose true value is 0)

    # Items: planned elements (all of each exact leaf, the largest gradients of the others), then directions.
    parts = [exact_idx]
    for i, exact in enumerate(plan.exact):
        if not exact and plan.k_mag and layout.sizes[i]:
            o, s = layout.offsets[i], layout.sizes[i]
            seg = jnp.abs(a_s[o : o + s])
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
    items = _Items(jnp.concatenate([idx, jnp.full((n_d,), -1, jnp.int32)]),
                   jnp.concatenate([zeros_i, jnp.asarray(np.array(d_j, np.int32))]),
                   jnp.concatenate([zeros_i, lo]), jnp.concatenate([zeros_i, hi]),
                   jnp.concatenate([i_steps, d_steps]))
    K = n_i + n_d
    scaled = _Items(*(jnp.tile(x, plan.scales) for x in items[:4]),
                    jnp.concatenate([items.step / _LADDER**k for k in range(plan.scales)]))
    # Forward mode along the first direction of each leaf (at the first scale's items).
    first = [n_i + d_leaf.index(i) for i in range(len(plan.exact))]
    want = np.zeros(K * plan.scales, bool)
    want[first] = plan.jvp
    F, P, JV = _eval_items(f, theta, seed, scaled, (a_s, h_s, tol * tol), plan.batch, support,
                           jnp.asarray(want) if plan.jvp else None)
    F = jnp.stack([F[k * K : (k + 1) * K] for k in range(plan.scales)], axis=1)  # (items, scales, 4)
    return _ProbeOut(f0, theta, a, h, a_s, h_s, tol, support, JV[jnp.asarray(first)], items, F, P[:K])


def _dir_items(plan: _Plan) -> tuple[list[int], list[int]]:
    """The random directions: their leaves, and their stream numbers. One per exact leaf (for the forward-mode
    check), n_proj per projection-checked leaf."""
    leaves: list[int] = []
    for i, exact in enumerate(plan.exact):
        leaves += [i] * (1 if exact else plan.n_proj)
    return leaves, list(range(len(leaves)))


@functools.partial(jax.jit, static_argnames=("fn", "layout", "args_spec", "batch"))
def _items_jit(theta, dyn, seed, items, a, h, tol, support, *, fn, layout, args_spec, batch):
    dyn = _cast64(list(dyn))
    f = _flat_fn(fn, layout, args_spec, dyn)
    return _eval_items(f, theta, seed, items, (a, h, tol * tol), batch, support)[:2]


# ----------------------------------------------------------------------------------------------------------
# Finite differences: a ladder of step sizes (host side, NumPy float64)


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

    def take(self, sel: Any) -> _FD:
        return _FD(*(getattr(self, f.name)[sel] for f in dataclasses.fields(self)))


class _Scale(NamedTuple):
    """Differences at one step h, per item."""

    value: np.ndarray  # Richardson-extrapolated central difference
    err: np.ndarray  # its error estimate
    noise: np.ndarray  # rounding error of a difference quotient at step h/2
    rp: np.ndarray  # the right derivative D₊, Richardson-extrapolated from one-sided quotients at h and h/2
    rm: np.ndarray  # the left derivative D₋, likewise
    nonsmooth: np.ndarray  # the one-sided quotients say: a kink within the step
    finite: np.ndarray  # all four evaluations and f0 are finite
    quotient: np.ndarray  # the largest finite one-sided quotient at h/2 (NaN when none is finite)
    os_change: np.ndarray  # how much the one-sided quotients change between h and h/2 (the larger side)


def _scale(f0: float, F: np.ndarray, h: np.ndarray, eps_f: float, tol: np.ndarray) -> _Scale:
    """Differences at one step h (central at h and h/2, one-sided at both) and what they say."""
    fm2, fm1, fp1, fp2 = (F[:, j] for j in range(4))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d1 = (fp2 - fm2) / (2 * h)  # central, step h
        d2 = (fp1 - fm1) / h  # central, step h/2
        rich = (4 * d2 - d1) / 3  # Richardson: the h² error terms cancel
        dp1, dm1 = (fp2 - f0) / h, (f0 - fm2) / h
        dp2, dm2 = (fp1 - f0) / (h / 2), (f0 - fm1) / (h / 2)
        # One-sided Richardson: D(h/2) = D + f''·h/4 + O(h²), D(h) = D + f''·h/2 + O(h²), so 2·D(h/2) − D(h)
        # has no O(h) bias: the exact one-sided derivative at a kink with curvature beside it.
        rp, rm = 2 * dp2 - dp1, 2 * dm2 - dm1
        size = np.maximum(np.max(np.where(np.isfinite(F), np.abs(F), 0.0), axis=1), abs(f0))
        noise = 3 * 16 * eps_f * size / h  # rounding error of a difference quotient at step h/2, generously
        asym1, asym2 = dp1 - dm1, dp2 - dm2
        r = asym1 - 2 * asym2  # O(h³) for a smooth function, O(jump) with a kink within the step
        finite = np.isfinite(F).all(axis=1) & np.isfinite(f0)
        nonsmooth = finite & (np.abs(r) > np.maximum.reduce([12 * noise, 0.1 * np.abs(asym1), tol]))
        q = np.stack([np.where(np.isfinite(dp2), np.abs(dp2), np.nan), np.where(np.isfinite(dm2), np.abs(dm2), np.nan)])
        quotient = np.where(np.isnan(q).all(axis=0), np.nan, np.nanmax(np.where(np.isnan(q), -np.inf, q), axis=0))
        os_change = np.maximum(np.abs(dp2 - dp1), np.abs(dm2 - dm1))
        err = np.abs(d1 - d2) / 3 + noise
    return _Scale(rich, err, noise, rp, rm, nonsmooth, finite, quotient, os_change)


def _resolve(scales: list[_Scale], tol: np.ndarray, f0: float, final: bool = False) -> _FD:
    """Reads the ladder: each pair of consecutive scales may resolve the derivative, and the pair with the
    smallest uncertainty wins.

    Smooth: both scales smooth and their estimates agree within their errors (uncertainty: the error).
    Kink: the coarser scale sees a kink, and each side's Richardson-extrapolated one-sided derivative is the
    same at both scales (their change is its error) while the two sides stay clearly apart; the interval between them
    is accepted (uncertainty: half its width plus the error). Kinks near the point, within the larger step
    only, make the scales disagree or inflate their error, and a finer pair wins. Items that no pair resolves
    are singular when their one-sided quotients keep growing as the step shrinks.

    ``final`` (the ladder is exhausted): an item still unresolved, and not singular, is read from the finest
    scale alone (kinks a little off the point, within the coarser steps, spoil every pair of scales, and
    several of them can even cancel in a coarse step's smoothness test; the finest step sees the fewest).
    Such a reading never blames both sides at once."""
    n = len(tol)
    out = _FD(np.full(n, np.nan), np.full(n, np.inf), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool),
              np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool),
              np.logical_or.reduce([s.nonsmooth for s in scales]))
    best = np.full(n, np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        for s0, s1 in zip(scales, scales[1:]):
            both = s0.finite & s1.finite
            gap = np.abs(s0.value - s1.value)
            err = s0.err + s1.err + gap
            smooth = both & ~s0.nonsmooth & ~s1.nonsmooth & (gap <= 2 * (s0.err + s1.err) + tol)
            kerr = np.maximum(np.abs(s0.rp - s1.rp), np.abs(s0.rm - s1.rm)) + 2 * (s0.noise + s1.noise)
            lo, hi = np.minimum(s1.rp, s1.rm), np.maximum(s1.rp, s1.rm)
            # (The finer scale's own smoothness test may lack the power to see a small jump through its larger
            # rounding error; its one-sided estimates agreeing with the coarser scale's are the evidence.)
            kink = both & s0.nonsmooth & (kerr <= 0.25 * (hi - lo))
            unc = np.where(kink, (hi - lo) / 2 + kerr, err)
            win = (smooth | kink) & (unc < best)
            best[win] = unc[win]
            out.value[win] = s1.value[win]
            out.err[win] = np.where(kink, kerr, err)[win]
            out.lo[win] = np.where(kink, lo, s1.value)[win]
            out.hi[win] = np.where(kink, hi, s1.value)[win]
            out.nonsmooth[win] = kink[win]
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


def _consistent(v: np.ndarray, fd: _FD, tol: np.ndarray) -> np.ndarray:
    """Whether values agree with finite differences: within the reading's interval (a point when smooth),
    widened by twice its error and the analytic tolerance."""
    with np.errstate(invalid="ignore"):
        slack = 2 * fd.err + tol
        inside = (v >= fd.lo - slack) & (v <= fd.hi + slack)
    return fd.finite & np.isfinite(v) & inside


def _confidently_off(v: np.ndarray, fd: _FD, tol: np.ndarray) -> np.ndarray:
    """Whether finite differences rule a value out with confidence: a resolved reading whose error estimate
    is far (``_CONFIDENT``×) below the value's distance from it, or a non-finite value where the reading is
    finite."""
    with np.errstate(invalid="ignore"):
        far = _CONFIDENT * fd.err + tol
        off = ~np.isfinite(v) | (v < fd.lo - far) | (v > fd.hi + far)
    return fd.paired & fd.finite & ~fd.singular & off


def _classify(A: np.ndarray, H: np.ndarray | None, fd: _FD, tol: np.ndarray,
              lenient: np.ndarray | bool = False, tol_ah: np.ndarray | None = None) -> np.ndarray:
    """Per-item verdicts from autodiff A, hand H (or None) and finite differences: the side that disagrees
    with the other two is wrong; both, when they agree with each other and confident finite differences
    rule them out.

    ``lenient`` items are random directions. Along a direction through several kinks at once (ties, ReLUs at
    0 in several coordinates), a valid choice of one-sided derivative per coordinate need not lie between the
    directional one-sided derivatives, so finite differences cannot judge there: such items are "kink".

    ``tol`` bounds a value's distance from finite differences (it includes their noise floor); ``tol_ah``
    (default ``tol``) bounds autodiff's distance from hand, both computed in float64."""
    tol_ah = tol if tol_ah is None else tol_ah
    kinked = fd.nonsmooth & fd.resolved & fd.finite
    with np.errstate(invalid="ignore"):
        # Lenient items at a kink accept a value up to twice the interval's width beyond it (several kinks of
        # opposite curvature along one direction widen the set of valid conventions); not any value: a wrong
        # rule whose direction happens to cross one kink must still fail.
        reach = 2 * (fd.hi - fd.lo) + 2 * fd.err + tol
        waive_a = kinked & lenient & (A >= fd.lo - reach) & (A <= fd.hi + reach)
    waived = kinked & lenient
    fits = np.where(fd.resolved, np.where(fd.nonsmooth, "kink", "ok"), "fd_unreliable")
    ca = _consistent(A, fd, tol) | waive_a
    off_a = _confidently_off(A, fd, tol) & ~waived
    if H is None:
        out = np.where(ca, fits, np.where(off_a, "autodiff_wrong", "mismatch"))
        return np.where(fd.singular, "singular", out).astype(object)
    with np.errstate(invalid="ignore"):
        waive_h = kinked & lenient & (H >= fd.lo - reach) & (H <= fd.hi + reach)
    ch = _consistent(H, fd, tol) | waive_h
    off_h = _confidently_off(H, fd, tol) & ~waived
    with np.errstate(invalid="ignore"):
        both_nf = ~np.isfinite(A) & ~np.isfinite(H)
        same_nf = both_nf & ((A == H) | (np.isnan(A) & np.isnan(H)))
        agree = (np.abs(A - H) <= tol_ah) | same_nf | (waive_a & waive_h)
    out = np.where(
        agree,
        np.where(ca, fits, np.where(off_a & off_h, "both_wrong", np.where(both_nf, "mismatch", "fd_unreliable"))),
        # Both within the reading's error bars yet apart: a kink at or right next to the point whose sides
        # finite differences cannot separate, or else nothing to tell them apart.
        np.where(ca & ch, np.where((fd.nonsmooth & fd.resolved) | fd.near_kink, "kink", "mismatch"),
                 np.where(ca, "hand_wrong", np.where(ch, "autodiff_wrong", "mismatch"))),
    )
    # Both outside a kink's one-sided interval: only possible, for correct code, where several kinks meet at
    # the point along this direction (ReLUs of several samples at 0 moving in opposite directions), where a
    # per-kink convention need not lie between D₋ and D₊; finite differences cannot judge such a point.
    # Bounded: hand may differ from autodiff (a valid convention) by at most autodiff's own distances from
    # D₋ and D₊ together (a hand of 1000 where [D₋, D₊] = [1, 2] and autodiff says 0 still fails).
    with np.errstate(invalid="ignore"):
        near = np.abs(A - H) <= np.abs(A - fd.lo) + np.abs(A - fd.hi) + 2 * fd.err + tol
    out = np.where(kinked & ~ca & ~ch & np.isfinite(A) & np.isfinite(H) & near, "kink", out)
    # At a singular point there is no derivative to be right about: sides that describe it alike pass.
    out = np.where(fd.singular, np.where(agree | both_nf, "singular", "mismatch"), out)
    return out.astype(object)


def _default_rtol(eps: float) -> float:
    """max(1e-7, 3·√eps), capped at 5%: with bfloat16 inside fn, 3·√eps would be 27% and let a hand that
    is wrong by a quarter pass."""
    return min(0.05, max(1e-7, 3 * math.sqrt(eps)))


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
        padded = _Items(*(p.astype(np.int32) for p in pad[:4]), pad[4].astype(np.float64))
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
            two = _Items(*(np.tile(x, 2) for x in items[:4]), np.concatenate([items.step, items.step / _LADDER]))
            F, P = self.evaluate(two)
            k = len(items.index)
            initial = np.stack([F[:k], F[k:]], axis=1)
            P = P[:k]
        scales = [_scale(self.f0, initial[:, k], items.step / _LADDER**k, self.eps_f, tol)
                  for k in range(initial.shape[1])]
        fd, settled = self._settle(scales, tol, values)
        while len(scales) < _MAX_SCALES and not settled.all():
            sel = np.nonzero(~settled)[0]
            k = len(scales)
            F = np.full((len(items.index), 4), np.nan)
            F[sel] = self.evaluate(_Items(*(x[sel] for x in items[:4]), items.step[sel] / _LADDER**k))[0]
            scales.append(_scale(self.f0, F, items.step / _LADDER**k, self.eps_f, tol))
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


# ----------------------------------------------------------------------------------------------------------
# check_grad


@dataclasses.dataclass(frozen=True)
class _Bound:
    """fn and hand as functions of the differentiated leaves (a list) and ``packed = (fixed leaves, args)``.
    Hashable, so that checks of the same function with the same layout share compilations."""

    fn: Callable
    hand: Callable | None
    treedef: Any
    diff: tuple[bool, ...]
    specs: tuple[tuple[str, tuple[int, ...], str], ...]  # every leaf: path, shape, description
    has_aux: bool

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(s[0] for s in self.specs)

    def merge(self, dl: Sequence, fl: Sequence) -> Any:
        di, fi = iter(dl), iter(fl)
        return jax.tree_util.tree_unflatten(self.treedef, [next(di) if d else next(fi) for d in self.diff])

    def raw(self, dl: Sequence, packed: Any) -> Any:
        fixed, args = packed
        return self.fn(self.merge(dl, fixed), *args)

    def value(self, dl: Sequence, packed: Any) -> Any:
        return _main_output(self.raw(dl, packed), self.has_aux)

    def grad(self, dl: Sequence, packed: Any) -> list:
        fixed, args = packed
        return _extract_grad(self.hand(self.merge(dl, fixed), *args), self)


# One _Bound per distinct (fn, hand, layout): jit caches compare bound methods by the identity of their
# object, so check_vjp's inner checks of one function must get the very same object to share compilations.
_bound = functools.lru_cache(maxsize=32)(_Bound)


def _extract_grad(out: Any, b: _Bound, what: str = "hand") -> list:
    """The differentiated leaves of a hand gradient. It must have params' structure; at leaves that are not
    differentiated it may hold None, the parameter itself or anything else (as `equinox.filter_grad` does)."""
    try:
        flat, _ = jax.tree_util.tree_flatten_with_path(out, is_leaf=lambda x: x is None)
    except Exception as e:  # noqa: BLE001 - anything unflattenable is a structure mismatch
        raise _UserValueError(f"{what} must return a gradient with the structure of params; got {describe(out)} ({e})") from None
    got = {jax.tree_util.keystr(p): x for p, x in flat}
    paths = b.paths
    known = set(paths)
    diff = [s for s, d in zip(b.specs, b.diff) if d]
    missing = [p for p, _, _ in diff if p not in got or got[p] is None]
    extra = [p for p, x in got.items() if p not in known and x is not None]
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"missing {missing}" if got and not (len(got) == 1 and "" in got) else
                          f"{_describe_out(out)}, not a tree of gradients")
        if extra:
            detail.append(f"unexpected {extra}")
        held = [p for p, d in zip(paths, b.diff) if not d]
        raise _UserValueError(
            f"{what} must return a gradient with the same structure as params; it returned {'; '.join(detail)}. "
            f"params leaves: {list(paths)}" + (f" (held fixed, may be None: {held})" if held else "")
        )
    bad, leaves = [], []
    for p, shape, desc in diff:
        h = got[p]
        if isinstance(h, (float, int)) and not isinstance(h, bool) and shape == ():
            h = np.float64(h)
        if not hasattr(h, "shape") or not hasattr(h, "dtype"):
            bad.append(f"{p or '(params)'}: expected an array of shape {shape}, got {describe(h)}")
        elif tuple(h.shape) != shape:
            bad.append(f"{p or '(params)'}: expected shape {shape}, got {describe(h)}")
        elif not jnp.issubdtype(h.dtype, jnp.floating):
            bad.append(f"{p or '(params)'}: expected a floating dtype (the parameter is {desc}), got {describe(h)}")
        leaves.append(h)
    if bad:
        raise _UserValueError(f"{what} returned leaves that do not match params:\n  " + "\n  ".join(bad))
    return leaves


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
    _reuse: bool = False,
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
    if not isinstance(has_aux, bool):
        raise TypeError(f"check_grad: has_aux must be True or False; got {describe(has_aux)}")
    caller_x64 = x64_enabled()
    if not _reuse:
        # A fresh wrapper per call: compiled programs are cached per function object, and a function may read
        # globals (data, constants) that changed since an earlier check. Only check_vjp and check_jacobian,
        # which make their own wrappers for one call, reuse compilations across their inner checks.
        fn = _fresh(fn)
        hand = _fresh(hand) if hand is not None else None
    sel, notes = _select(params, wrt)
    layout = sel.layout()
    dleaves, fleaves = sel.split()
    packed = (fleaves, args)
    dyn, spec = _split_args((packed,))
    bound = _bound(fn, hand, sel.treedef, sel.diff,
                   tuple((p, tuple(int(d) for d in getattr(x, "shape", ())), describe(x))
                         for p, x in zip(sel.paths, sel.leaves)),
                   has_aux)
    dtypes = tuple(jnp.result_type(x) for x in dleaves)
    user_dtypes = sorted({str(d) for d in dtypes})

    try:
        facts = _static_facts(bound, layout, spec, dtypes, tuple((tuple(d.shape), d.dtype) for d in dyn), caller_x64)
    except (_UserValueError, _UserTypeError) as e:
        raise _clean(e) from None
    if layout.n == 0:  # every differentiated leaf is empty: nothing to compare
        rows = [Row(p, "ok", None, 0.0, 0.0, None, None, None, "exact", 0, 0, 0,
                    "no elements (zero-size leaf): nothing to check") for p in layout.paths]
        return GradReport(tuple(rows), "ok", "check_grad", "/".join(user_dtypes), tuple(notes),
                          time.perf_counter() - start, {})
    base_notes = list(notes)

    def compute(facts: _Facts) -> tuple[list[Row], list[str], _Plan, float, bool]:
        notes = list(base_notes)
        if has_aux:
            aux = jax.tree_util.tree_leaves(facts.out_raw[1])
            notes.append(f"has_aux: the loss is checked; aux ({type(facts.out_raw[1]).__name__}, {len(aux)} leaves) is not")
        notes += list(facts.notes)
        eager = hand is not None and facts.hand_eager is not None
        if eager:
            notes.append(f"hand cannot be traced by JAX ({facts.hand_eager}); it was called eagerly on NumPy arrays "
                         "(float64 for the float64 check)")

        def eager_hand(float64: bool) -> list:
            dl = [_host(x, float64) for x in dleaves]
            try:
                out = bound.grad(dl, _host_tree(packed, float64))
            except Exception as e:
                e.add_note(f"funcgrad: hand could not be traced by JAX ({facts.hand_eager}), so check_grad called it "
                           "on NumPy arrays, where it failed")
                raise
            return out

        # 1. At the parameters' own precision: what the user's code computes (for float64 parameters, the
        #    float64 check below is that precision).
        a_user = h_user = None
        hand_dtypes = facts.hand_dtypes
        if user_dtypes != ["float64"]:
            value_u, grad_u, hand_u = _user_stage(dleaves, dyn, fn=bound.value,
                                                  hand=bound.grad if hand is not None and not eager else None,
                                                  layout=layout, dtypes=dtypes, args_spec=spec, reverse=facts.reverse)
            a_user = np.asarray(grad_u, np.float64)
            if eager:
                hu = eager_hand(False)
                hand_dtypes = tuple(np.asarray(x).dtype for x in hu)
                h_user = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in hu]) if hu else np.zeros(0)
            elif hand is not None:
                h_user = np.asarray(hand_u, np.float64)
        if hand is not None:
            other = [f"{p or '(params)'} ({hd}, parameter {pd})" for p, hd, pd in zip(layout.paths, hand_dtypes or (), dtypes)
                     if jnp.dtype(hd) != jnp.dtype(pd)]
            if other:
                notes.append("hand returns another float dtype than the parameter for " + ", ".join(other[:_LIST])
                             + ("..." if len(other) > _LIST else "") + "; compared in float64")

        # 2. In float64: autodiff, hand and finite differences, compared.
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
                h64 = eager_hand(True)
                hand64 = tuple(np.asarray(x).dtype for x in h64)
                h_given = jnp.asarray(np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in h64]) if h64
                                      else np.zeros(0), jnp.float64)
            for path, dtype in zip(layout.paths, hand64):
                if dtype != jnp.float64:
                    eps_c = max(eps_c, float(jnp.finfo(dtype).eps))
                    notes.append(f"hand returns {dtype} for {path or 'params'} even with float64 inputs")
            rtol_eff = float(rtol) if rtol is not None else _default_rtol(eps_c)
            h0 = eps_f ** (1 / 5)
            plan, exact_idx = _make_plan(mode, layout, facts.flops, hand is not None, facts.reverse, facts.jvp)
            res = _probe(dleaves, dyn, h_given, exact_idx, np.uint32(seed % 2**32), h0, rtol_eff,
                         -1.0 if atol is None else float(atol), float(jnp.finfo(jnp.float64).eps), fn=bound.value,
                         hand=bound.grad if hand is not None and not eager else None, layout=layout, args_spec=spec,
                         plan=plan)
            f0 = float(res.f0)
            _check_value(f0)
            if math.isinf(f0):
                notes.append(f"fn(params, *args) = {f0} at these parameters: the function itself is singular there (a "
                             "log of 0?), so no element has a finite derivative to check; each is reported singular "
                             "where autodiff and hand agree, a mismatch where they do not")
            elif a_user is not None and not np.isfinite(float(value_u)):
                raise _UserValueError(f"fn(params, *args) = {float(value_u)} at the parameters' own precision "
                                      f"({'/'.join(user_dtypes)}), though {f0:.6g} in float64: it overflows or loses "
                                      "all precision there")
            engine = _Engine(bound.value, spec, layout, plan, res, dyn, np.uint32(seed % 2**32), eps_f, h0, dtypes)
            rows = _rows(res, engine, hand is not None, a_user, h_user, user_dtypes,
                         float(jnp.finfo(facts.inner_user).eps))
        return rows, notes, plan, rtol_eff, eager

    try:
        rows, notes, plan, rtol_eff, eager = compute(facts)
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
        rows, notes, plan, rtol_eff, eager = compute(facts)

    dtype = "/".join(user_dtypes) + (" (finite differences in float64)" if user_dtypes != ["float64"] else "")
    env = _environment(caller_x64, user_dtypes, facts, mode, plan, seed, rtol_eff, atol, hand, eager, has_aux,
                       layout, sel)
    return GradReport(tuple(rows), _combine_verdicts([r.verdict for r in rows]), "check_grad", dtype, tuple(notes),
                      time.perf_counter() - start, env)


def _environment(x64, user_dtypes, facts, mode, plan, seed, rtol, atol, hand, eager, has_aux, layout, sel) -> dict:
    """What a bug report about a verdict needs: versions, backend, precision and the check's settings."""
    import importlib.metadata as md

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


@dataclasses.dataclass(frozen=True)
class _Facts:
    """What tracing fn and hand tells, without running them (cached per function and argument shapes)."""

    out_raw: Any  # fn's output (ShapeDtypeStruct, or a (loss, aux) pair) at the parameters' precision
    out: Any  # the differentiated output
    hand_dtypes: tuple  # hand's leaf dtypes at the parameters' precision (traced hands)
    hand_eager: str | None  # why hand cannot be traced (it is called on NumPy arrays then)
    out64: Any  # fn's output dtype with float64 inputs
    hand64: tuple  # hand's leaf dtypes with float64 inputs
    flops: float  # estimated cost of one evaluation of fn
    reverse: bool  # JAX can reverse-differentiate fn
    jvp: bool  # JAX can forward-differentiate fn
    notes: tuple[str, ...]
    inner64: Any  # the lowest float precision inside fn with float64 inputs, a final cast of the output aside
    inner_user: Any  # the same at the parameters' own dtypes


def _first_line(e: Exception) -> str:
    lines = [s for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


@functools.lru_cache(maxsize=16)
def _static_facts(bound: _Bound, layout: _Layout, spec, param_dtypes, dyn_sig, x64, diagnose=False) -> _Facts:  # noqa: ARG001
    """Traces fn (and hand) once. Reverse and forward mode are assumed to work (a custom_vjp rule aside),
    which costs nothing to find out; only when the check then fails does ``diagnose`` trace each mode to
    see which one JAX cannot do. ``x64`` is part of the cache key only: the caller's x64 state changes the
    dtypes fn's trace sees."""
    params = [jax.ShapeDtypeStruct(s, d) for s, d in zip(layout.shapes, param_dtypes)]
    dyn = [jax.ShapeDtypeStruct(s, d) for s, d in dyn_sig]
    closed_user, out_raw = jax.make_jaxpr(lambda p, d: bound.raw(p, *_join_args(d, spec)), return_shape=True)(
        params, dyn)
    out = _main_output(out_raw, bound.has_aux)
    _check_output(out_raw if not bound.has_aux else out, "fn(params, *args)", bound.has_aux)
    hand_dtypes, hand_eager = (), None
    if bound.hand is not None:
        try:
            h = jax.eval_shape(lambda p, d: bound.grad(p, *_join_args(d, spec)), params, dyn)
            hand_dtypes = tuple(leaf.dtype for leaf in h)
        except Exception as e:
            if not _needs_eager(e):
                raise
            hand_eager = _first_line(e)
    notes = []
    with jax.enable_x64(True):
        theta_s = jax.ShapeDtypeStruct((layout.n,), jnp.float64)
        dyn_s = [jax.ShapeDtypeStruct(d.shape, _dtype64(d.dtype)) for d in dyn]

        def f(th, d):
            return bound.value(layout.unravel(th), *_join_args(d, spec))

        closed = jax.make_jaxpr(f)(theta_s, dyn_s)
        out64 = closed.out_avals[0] if len(closed.out_avals) == 1 else None
        inner = _lowest_float(closed.jaxpr)
        f64 = lambda th, d: f(th, d).astype(jnp.float64)  # noqa: E731
        reverse = jvp = True
        if diagnose:
            try:
                jax.eval_shape(jax.grad(f64), theta_s, dyn_s)
            except Exception as e:  # noqa: BLE001 - any failure of reverse mode: try forward mode
                reverse, why_rev = False, _first_line(e)
        if _uses_primitive(closed.jaxpr, "custom_vjp"):
            # Tracing jvp through a custom_vjp rule succeeds; evaluating it fails ("can't apply forward-mode
            # autodiff (jvp) to a custom_vjp function").
            jvp, why_fwd = False, "TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp function"
        elif diagnose:
            try:
                jax.eval_shape(lambda th, d: jax.jvp(lambda t: f64(t, d), (th,), (th,))[1], theta_s, dyn_s)
            except Exception as e:  # noqa: BLE001
                jvp, why_fwd = False, _first_line(e)
        if not reverse and not jvp:
            raise ValueError(f"check_grad: JAX can differentiate fn neither in reverse mode ({why_rev}) nor in "
                             f"forward mode ({why_fwd}); nothing to compare the hand formula with")
        if not reverse:
            notes.append(f"reverse mode is unavailable for fn ({why_rev}); autodiff's gradient comes from forward "
                         f"mode (jvp), one basis vector at a time ({layout.n} evaluations)")
        elif not jvp:
            notes.append(f"forward mode (jvp) is unavailable for fn ({why_fwd.split(':')[0]}"
                         + (", a jax.custom_vjp rule" if "custom_vjp" in why_fwd else "") + "): reverse mode only")
        hand64 = ()
        if bound.hand is not None and hand_eager is None:
            h = jax.eval_shape(lambda th, d: bound.grad(layout.unravel(th), *_join_args(d, spec)), theta_s, dyn_s)
            hand64 = tuple(leaf.dtype for leaf in h)
    return _Facts(out_raw, out, hand_dtypes, hand_eager, getattr(out64, "dtype", None), hand64,
                  max(_jaxpr_flops(closed.jaxpr), 1.0), reverse, jvp, tuple(notes), inner,
                  _lowest_float(closed_user.jaxpr))


def _lowest_float(jaxpr: Any, top: bool = True) -> Any:
    """The lowest float precision among the values fn computes (sub-computations included), leaving out a
    cast of the output itself: ``loss.astype(bfloat16)`` rounds the value, not the gradient (whose
    derivative through the cast is the identity), so autodiff and hand still agree to float64 precision."""
    outs = {id(v) for v in jaxpr.outvars} if top else set()
    lowest = jnp.dtype(jnp.float64)
    # Only what the output depends on: an aux output computed in float32 (an accuracy) does not count.
    needed, live = {id(v) for v in jaxpr.outvars}, []
    for eqn in reversed(jaxpr.eqns):
        if any(id(v) in needed for v in eqn.outvars) or not top:
            live.append(eqn)
            needed.update(id(v) for v in eqn.invars)
    for eqn in reversed(live):
        final_cast = eqn.primitive.name == "convert_element_type" and any(id(v) in outs for v in eqn.outvars)
        for v in [] if final_cast else eqn.outvars:
            dt = getattr(getattr(v, "aval", None), "dtype", None)
            if dt is not None and jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).eps > jnp.finfo(lowest).eps:
                lowest = jnp.dtype(dt)
        for sub in _sub_jaxprs(eqn):
            dt = _lowest_float(sub, False)
            if jnp.finfo(dt).eps > jnp.finfo(lowest).eps:
                lowest = dt
    return lowest


def _sub_jaxprs(eqn: Any) -> list:
    out = []
    for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
            inner = getattr(sub, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                out.append(inner)
            elif hasattr(sub, "eqns"):
                out.append(sub)
    return out


def _uses_primitive(jaxpr: Any, fragment: str) -> bool:
    """Whether a primitive whose name contains ``fragment`` occurs in the jaxpr, sub-computations included."""
    return any(fragment in eqn.primitive.name or any(_uses_primitive(j, fragment) for j in _sub_jaxprs(eqn))
               for eqn in jaxpr.eqns)


def _check_value(value: Any) -> None:
    """fn's value must be a number; ±inf (a log of 0) is a singular point, reported as such."""
    v = float(value)
    if math.isnan(v):
        raise _UserValueError(f"fn(params, *args) = {v} at the given params: the function itself is not defined "
                              "there, so it has no derivative to check (a sqrt or log of a negative number, 0/0, "
                              "inf − inf?)")


def _vectorise() -> bool:
    """Evaluate finite-difference items many at a time (vmap) on accelerators, one at a time on CPU."""
    return jax.default_backend() != "cpu"


def _make_plan(mode, layout, flops, has_hand, reverse=True, jvp=True) -> tuple[_Plan, np.ndarray]:
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
    return _Plan(tuple(exact), n_proj, _K_MAG, scales, reverse and jvp, batch, reverse), exact_idx


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
        total += sum(trips * _jaxpr_flops(sub) for sub in _sub_jaxprs(eqn))
    return total


@dataclasses.dataclass
class _Item:
    """One comparison: an element (index into the leaf) or a random direction (index None)."""

    verdict: str
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


def _make_item(verdict, index, A, H, fd: _FD | None = None, k: int = 0, N: float | None = None) -> _Item:
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
    return _Item(str(verdict), None if index is None else tuple(int(i) for i in index), A, H, N, abs_err, rel_err,
                 **extra)


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.6g}"


def _note_for(verdict: str, item: _Item | None, extra: Sequence[str]) -> str:
    parts = []
    if item is not None and verdict != "ok":
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
            "kink": (f"not differentiable {at}: {fd}, and autodiff ({_g(item.A)})"
                     + (f" and hand ({_g(item.H)})" if item.H is not None else "") + " lie between them") if
                    item.kink and not outside else
                    (f"not differentiable {at}: {fd}; autodiff ({_g(item.A)}) and hand ({_g(item.H)}) both lie "
                     f"outside: {meet}; finite differences cannot judge there (check at a point off the kinks to "
                     "be sure)") if item.kink
                    else (f"kinks at or right next to {at.removeprefix('at ')} (within the finite-difference steps): "
                          f"{fd}, which cannot separate autodiff ({_g(item.A)})"
                          + (f" and hand ({_g(item.H)})" if item.H is not None else "") + "; both are accepted"),
            "singular": f"no finite derivative {at}: the difference quotients grow without bound as the step "
                        f"shrinks (sqrt or log at 0, |x|^p with p < 1, a discontinuity); autodiff gives {_g(item.A)}"
                        + (f" and hand {_g(item.H)}, which describe it alike" if item.H is not None else ""),
            "fd_unreliable": (f"autodiff and hand agree {at} ({_g(item.A)}); {why_unsure}" if item.H is not None
                              else f"autodiff ({_g(item.A)}) cannot be confirmed {at}: {why_unsure}"),
            "hand_wrong": f"hand ({_g(item.H)}) differs from autodiff ({_g(item.A)}) and finite differences {at}; {fd}"
                          + (f" (unless {meet})" if item.kink else ""),
            "autodiff_wrong": f"autodiff ({_g(item.A)}) differs from finite differences"
                              + (f" and hand ({_g(item.H)})" if item.H is not None else "") + f" {at}; {fd}"
                              + (f" (unless {meet})" if item.kink else ""),
            "both_wrong": f"autodiff and hand agree {at} ({_g(item.A)}), but {fd}, confidently: a mistake both "
                          "share (a stop_gradient, or a custom rule copied into the hand formula?)",
            "mismatch": (f"autodiff ({_g(item.A)}){hand_part} and finite differences disagree {at}; no one side can "
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
    I, P = items_np.index, np.asarray(res.P)
    item_tol = np.where(I >= 0, tol[np.maximum(I, 0)], np.maximum(P[:, 2], engine.floor))
    item_tol_ah = np.where(I >= 0, engine.tol_ah[np.maximum(I, 0)], P[:, 2])
    is_el = I >= 0
    A = np.where(is_el, a[np.maximum(I, 0)], P[:, 0])
    H = None if h is None else np.where(is_el, h[np.maximum(I, 0)], P[:, 1])
    fd, _ = engine.ladder(items_np, item_tol, initial=np.asarray(res.F), values=[A] if H is None else [A, H])
    verdicts = _classify(A, H, fd, item_tol, lenient=~is_el, tol_ah=item_tol_ah)
    d_leaf = np.array(_dir_items(plan)[0])
    item_leaf = np.where(is_el, np.searchsorted(np.array(layout.offsets), np.maximum(I, 0), side="right") - 1,
                         np.concatenate([np.zeros(int(is_el.sum()), int), d_leaf]))
    jvp = np.asarray(res.jvp)

    rows = []
    for li, (path, shape, o, s) in enumerate(zip(layout.paths, layout.shapes, layout.offsets, layout.sizes)):
        items: list[_Item] = []
        extra: list[str] = []
        empty_support = s > 0 and not engine.support_np[o : o + s].any()
        for k in np.nonzero(item_leaf == li)[0]:
            if not is_el[k] and (s == 0 or empty_support):
                continue  # a direction with nothing to move: no information
            index = np.unravel_index(I[k] - o, shape) if is_el[k] else None
            items.append(_make_item(verdicts[k], index, A[k], None if H is None else H[k], fd, k))
        seg_a = a[o : o + s]
        nonfinite = ~np.isfinite(seg_a)
        if h is not None:
            seg_h = h[o : o + s]
            nonfinite |= ~np.isfinite(seg_h)
            with np.errstate(invalid="ignore"):
                dis = ~(np.abs(seg_a - seg_h) <= engine.tol_ah[o : o + s])
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
            extra.append(f"{n_nf} element(s) not finite in " + ("autodiff or hand" if h is not None else "autodiff")
                         + " (checked one by one; random projections skip them)")
        done = {int(I[k]) - o for k in np.nonzero((item_leaf == li) & is_el)[0]}
        if dis.any():
            # Disagreeing elements, worst first, are arbitrated in growing rounds until one fails: a wrong
            # element must not hide behind disagreements that are only kinks (two valid conventions).
            cand = np.nonzero(dis)[0]
            bad = _badness(seg_a[cand], None if h is None else h[o : o + s][cand], engine.tol_ah[o : o + s][cand],
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
                extra.append(f"autodiff and hand disagree at {left} more element(s) than the {checked} checked one "
                             "by one (all passing): too many to check, so the leaf cannot pass")
                items.append(_make_item("mismatch", np.unravel_index(i - o, shape), a[i], h[i], N=float("nan")))
        # A projection that fails with no element to show for it: bisect down to the element.
        bad_dirs = [it for it in items if it.index is None and it.verdict in _FAILING]
        if bad_dirs and not any(it.index is not None and it.verdict in _FAILING for it in items):
            located = _bisect(li, a, h, tol, engine)
            items.append(located)
            if located.verdict in _FAILING:
                extra.append("element located by bisecting a failing random projection")
                if located.verdict in _BLAMES:
                    for it in items:  # the located element explains the failing projections
                        if it.index is None and it.verdict == "mismatch":
                            it.verdict = located.verdict
            else:
                extra.append("bisecting the failing random projection singled out no failing element (the "
                             "disagreement is spread over many elements)")
        if plan.jvp and not empty_support and s:
            k = int(np.nonzero(~is_el)[0][list(d_leaf).index(li)])
            jv, jr = float(jvp[li]), float(A[k])
            if not math.isfinite(jv) and nonfinite.any():
                extra.append("forward mode not compared: autodiff is not finite at some elements of this leaf")
            # (forward mode's tangent is rounded to fn's output dtype, e.g. by a final cast to bfloat16)
            elif not abs(jv - jr) <= item_tol_ah[k] + 4 * engine.eps_f * max(abs(jv), abs(jr)):
                fwd_right = bool(_consistent(np.array([jv]), fd.take(slice(k, k + 1)), item_tol[k : k + 1])[0])
                extra.append(
                    f"forward mode (jvp {jv:.6e}) and reverse mode (grad·u {jr:.6e}) disagree along a random "
                    f"direction; finite differences give {fd.value[k]:.6e}: {'reverse' if fwd_right else 'forward'} "
                    "mode is wrong"
                )
                items.append(_make_item("autodiff_wrong", None, jr if fwd_right else jv, None, fd, k))
        if user_dtypes != ["float64"] and s:
            already = {"hand" if it.verdict == "hand_wrong" else "autodiff" for it in items
                       if it.verdict in ("hand_wrong", "autodiff_wrong", "both_wrong")}
            if any(it.verdict == "both_wrong" for it in items):
                already = {"hand", "autodiff"}
            eps = max(float(jnp.finfo(engine.user_dtypes[li]).eps), eps_inner)  # fn may compute in bfloat16
            extra_u, items_u = _user_precision(o, s, shape, a, h, a_user, h_user, eps, skip=already)
            extra += extra_u
            items += items_u
        rows.append(_row(path, li, s, items, extra, plan))
    return rows


def _row(path, li, size, items, extra, plan) -> Row:
    verdict = _combine_verdicts([it.verdict for it in items]) if items else "ok"
    if verdict == "ok":
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
    streams = [j for leaf, j in zip(d_leaf, d_j) if leaf == li]

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
            it = _make_item("autodiff_wrong" if name == "autodiff" else "hand_wrong", np.unravel_index(i, shape),
                            a_user[o + i], None if h64 is None else h_user[o + i], N=ref[i])
            it.user_precision = True
            items.append(it)
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
                key = lambda x: (_SEVERITY[x.verdict], _err_key(x.max_abs_err))
                best = r if key(r) > key(cur) else cur
                by_path[r.path] = dataclasses.replace(best, checked=max(cur.checked, r.checked),
                                                      directions=cur.directions + r.directions)
    rows = tuple(by_path[p] for p in order)
    notes = tuple(dict.fromkeys([n for rep in reports for n in rep.notes] + list(extra_notes)))
    return GradReport(rows, _combine_verdicts([r.verdict for r in rows]), title, reports[0].dtype, notes,
                      sum(rep.seconds for rep in reports), dict(reports[0].environment))


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
            raise _UserValueError(f"hand_vjp must return {len(argnums)} cotangent(s), one for each of {row_names}; "
                                  f"got {got}")
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
            raise (ValueError if isinstance(e, ValueError) else TypeError)(_in_terms_of(str(e.args[0]) if e.args else
                                                                                       str(e), row_names)) from None
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
    if not callable(fn) or not callable(hand_jac):
        raise TypeError("check_jacobian: fn and hand_jac must be callable")
    y = jax.eval_shape(fn, x)
    if not hasattr(y, "shape"):
        raise TypeError("check_jacobian: fn must return a single array")
    m = math.prod(y.shape)
    if m > 4096:
        raise ValueError(f"check_jacobian: fn has {m} outputs; use check_vjp for large outputs")
    notes = []
    try:
        J_shape = jax.eval_shape(hand_jac, x)
    except Exception as e:
        if not _needs_eager(e):
            raise
        J_shape = np.asarray(hand_jac(np.array(x)))  # a NumPy hand Jacobian: check_grad calls it eagerly too
    if tuple(getattr(J_shape, "shape", ())) != tuple(y.shape) + tuple(x.shape):
        raise ValueError(
            f"hand_jac(x) must have shape fn(x).shape + x.shape = {tuple(y.shape) + tuple(x.shape)}; got {describe(J_shape)}"
        )
    jacobians = {}
    for name, jac in (("jacrev", jax.jacrev), ("jacfwd", jax.jacfwd)):
        try:
            jacobians[name] = jac(fn)(x)
        except Exception as e:  # noqa: BLE001 - custom_vjp (no forward mode), while_loop (no reverse mode)
            notes.append(f"{name} is unavailable for fn ({_first_line(e).split(':')[0]}"
                         + (", a jax.custom_vjp rule" if "custom_vjp" in str(e) else "") + "): "
                         + ("jacrev only" if name == "jacfwd" else "jacfwd only"))
    if not jacobians:
        raise ValueError("check_jacobian: JAX can differentiate fn neither in reverse nor in forward mode")
    if len(jacobians) == 2:
        J_rev, J_fwd = jacobians["jacrev"], jacobians["jacfwd"]
        with np.errstate(invalid="ignore"):
            gap = np.abs(np.asarray(J_rev, np.float64) - np.asarray(J_fwd, np.float64))
        eps = float(jnp.finfo(x.dtype).eps)
        finite = np.isfinite(np.asarray(J_rev, np.float64))
        scale = float(np.max(np.abs(np.asarray(J_rev, np.float64)[finite]))) if finite.any() else 0.0
        same = np.asarray(J_rev) == np.asarray(J_fwd)  # equal infinities count as agreeing
        if not np.all(same | (gap <= 100 * eps * max(scale, 1e-30) + _default_rtol(eps) * scale)):
            i = np.unravel_index(int(np.nanargmax(np.where(same, 0.0, np.where(np.isnan(gap), np.inf, gap)))), gap.shape)
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
            worst = rep.worst
            where = worst.where if worst else ""
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
            raise (ValueError if isinstance(e, ValueError) else TypeError)(f"check_chain: link {name!r}: {e}") from None
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
        if not is_tracer(y):  # called eagerly (a NumPy backward): give it writable NumPy arrays, as the book does
            inputs, d = _host_tree(inputs, False), _host_tree(d, False)
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
