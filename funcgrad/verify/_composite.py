"""Checks built on check_grad: check_vjp (random output cotangents), check_jacobian (a row per output element)
and check_chain (a model's backward pass link by link, and the whole chain)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad._checks import describe, is_tracer
from funcgrad.verify._fd import _default_rtol
from funcgrad.verify._grad import _check_grad_impl, _second_look, check_grad
from funcgrad.verify._inputs import (
    _first_line,
    _host_tree,
    _is_array,
    _isolating,
    _needs_eager,
    _unplaced,
    _UserValueError,
    _x64,
)
from funcgrad.verify._report import ChainReport, GradReport, Row, Verdict, _combine_verdicts, _merge, _rename_rows


def _in_terms_of(message: str, names: Sequence[str]) -> str:
    """A check_grad message about the tuple of differentiated primals, told with the primals' names."""
    message = message.replace("hand must", "hand_vjp must").replace("hand returned", "hand_vjp returned")
    message = message.replace("the same structure as params;", f"the same structure as ({', '.join(names)});")
    message = message.replace("params leaves:", f"({', '.join(names)})'s leaves:")
    # Each primal's index becomes a placeholder first, its name only once all are: a name is no index (names
    # ["params", "x"]: params[1], the second leaf of params, is not x).
    marks = [f"\x00{i}\x00" for i in range(len(names))]
    for i, mark in enumerate(marks):
        message = message.replace(f"params[{i}]", mark).replace(f"'[{i}]", f"'{mark}").replace(f"[{i}]:", f"{mark}:")
        message = re.sub(rf"(?<![\w\]'\x00])\[{i}\](?=\[)", mark, message)  # a path within it: [0]['b'] is params['b']
        message = re.sub(rf"(?<=the value of )\[{i}\](?=\))", mark, message)  # the leaf an untraceable fn needs
    for mark, name in zip(marks, names, strict=True):
        message = message.replace(mark, name)
    return f"check_vjp (differentiating {', '.join(names)}): {message}"


def _primal_names(fn: Callable, n: int) -> list[str]:
    try:
        params = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"[{i}]" for i in range(n)]


def _vdot_tree(out: Any, cot: Any) -> jax.Array | int:
    """⟨out, cot⟩ over matching leaves (0 when there are none)."""
    return sum(jnp.vdot(o, c) for o, c in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(cot), strict=True))


def _not_float(x: Any) -> list:
    """The leaves of ``x`` that are not floating-point arrays; Python floats beside such arrays aside (they are
    hyperparameters, held fixed, as check_grad holds them)."""
    leaves = jax.tree_util.tree_leaves(x)
    floating = [_is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves]
    return [leaf for leaf, f in zip(leaves, floating, strict=True)
            if not f and not (any(floating) and isinstance(leaf, float))]


def _require_floats(diff: Sequence[Any], names: Sequence[str]) -> None:
    """Each differentiated primal a floating-point array, or a pytree of them."""
    for x, name in zip(diff, names, strict=True):
        bad = _not_float(x)
        if bad or not jax.tree_util.tree_leaves(x):
            number = bad and isinstance(bad[0], (int, float))
            raise TypeError(f"check_vjp: {name} is differentiated, so it must be a floating-point array (or a pytree "
                            f"of them); got {describe(bad[0] if bad else x)}"
                            f"{' (a Python number inside a list or tuple?)' if number else ''}"
                            ": pass float arrays (np.asarray(x, np.float32)), "
                            "or leave it out of argnums")


def _argnums(argnums: Any, primals: tuple) -> tuple[int, ...]:
    """check_vjp's ``argnums`` as a tuple of positions (an int as jax.grad takes it; by default every floating
    primal), checked."""
    if argnums is None:
        argnums = tuple(i for i, p in enumerate(primals) if jax.tree_util.tree_leaves(p) and not _not_float(p))
    if isinstance(argnums, (int, np.integer)) and not isinstance(argnums, bool):
        argnums = (int(argnums),)
    if not isinstance(argnums, (tuple, list)) or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in argnums):
        raise TypeError(f"check_vjp: argnums must be an int or a sequence of ints (positions in primals); got "
                        f"{describe(argnums)}")
    argnums = tuple(int(i) for i in argnums)
    if not argnums:
        raise ValueError("check_vjp: no floating primal to differentiate; pass argnums")
    for i in argnums:
        if not 0 <= i < len(primals):
            raise ValueError(f"check_vjp: argnums {argnums} out of range for {len(primals)} primals")
    return argnums


def _number_lists(p: Any) -> bool:
    """A (nested) list or tuple of Python numbers, at least one a float, that NumPy reads as a float array."""
    if not isinstance(p, (list, tuple)) or not p:
        return False
    leaves = jax.tree_util.tree_leaves(p)
    if not leaves or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in leaves):
        return False
    try:
        a = np.asarray(p)
    except ValueError:  # ragged
        return False
    return a.dtype.kind == "f" and a.size == len(leaves)


def _as_arrays(p: Any) -> Any:
    """A primal with the book's numbers made arrays: a float, a nested list of numbers, or such lists as a dict's
    values (``{"W": W.tolist(), ...}``), whose leaves JAX would otherwise take one Python float at a time."""
    if isinstance(p, float) or _number_lists(p):
        return jnp.asarray(p)
    if isinstance(p, dict):
        return {k: _as_arrays(v) for k, v in p.items()}
    return p


def _integer_primals(primals: Sequence[Any], names: Sequence[str]) -> str:
    """A hint naming the primals that are integer arrays (the book's z = [[1, 2, -3, -4], ...]): not
    differentiated unless given as floats."""
    ints = [f"{n} ({np.asarray(p).dtype})" for p, n in zip(primals, names, strict=False)
            if _is_array(p) and jnp.issubdtype(p.dtype, jnp.integer)
            or (isinstance(p, (list, tuple)) and p and np.asarray(p, dtype=object).size
                and all(isinstance(x, int) and not isinstance(x, bool) for x in jax.tree_util.tree_leaves(p)))]
    return (f" ({', '.join(ints)} {'is an integer array' if len(ints) == 1 else 'are integer arrays'}, so not "
            "differentiated: pass it as floats, np.asarray(x, float), to differentiate it)") if ints else ""


def _float_output(fn: Callable, primals: Sequence[Any], names: Sequence[str]) -> tuple[list, Any]:
    """The shapes of ``fn(*primals)``'s leaves and its structure; each leaf must be floating-point."""
    try:  # (traced on abstract inputs, as jax.vjp would: a NumPy primal indexed by a jnp array is fine there)
        out = jax.eval_shape(fn, *primals)
    except Exception:  # noqa: BLE001 - primals eval_shape cannot take as arguments (a string): closed over instead
        try:
            out = jax.eval_shape(lambda: fn(*primals))
        except Exception as e:
            e.add_note("funcgrad: check_vjp could not evaluate fn("
                       + ", ".join(f"{n}={describe(p)}" for n, p in zip(names, primals, strict=True)) + ")")
            raise e from None
    leaves, treedef = jax.tree_util.tree_flatten(out)
    bad = [leaf for leaf in leaves if not jnp.issubdtype(leaf.dtype, jnp.floating)]
    if bad or not leaves:
        raise TypeError("check_vjp: fn's output must be floating-point arrays (its VJP is checked); got "
                        + (f"{bad[0].dtype}{list(bad[0].shape)}" if bad else "no array"))
    return leaves, treedef


def _check_counts(who: str, seed: Any, cotangents: Any) -> None:
    """``seed`` an int (any sign, as for check_grad) and ``cotangents`` a positive int."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"{who}: seed must be an int; got {describe(seed)}")
    if not isinstance(cotangents, (int, np.integer)) or isinstance(cotangents, bool) or cotangents < 1:
        raise ValueError(f"{who}: cotangents must be an int of at least 1 (random output cotangents per check); "
                         f"got {describe(cotangents) if not isinstance(cotangents, (int, np.integer)) else cotangents}")


@_isolating
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
    _check_counts("check_vjp", seed, cotangents)
    # Python floats, and nested lists of numbers with a float among them (the book's inputs), are points to
    # differentiate at; ints, strings and other non-arrays stay static arguments.
    primals = tuple(_as_arrays(p) for p in primals)
    all_names = list(names) if names is not None else _primal_names(fn, len(primals))
    try:
        argnums = _argnums(argnums, primals)
    except ValueError as e:
        raise ValueError(f"{e}{_integer_primals(primals, all_names)}") from None
    row_names = [all_names[i] for i in argnums]
    _require_floats([primals[i] for i in argnums], row_names)
    const_pos = tuple(i for i in range(len(primals)) if i not in argnums)

    def merge(diff, consts):
        full = [None] * len(primals)
        for i, v in zip(argnums, diff, strict=True):
            full[i] = v
        for i, v in zip(const_pos, consts, strict=True):
            full[i] = v
        return full

    def scalar(diff, cot, consts):
        return _vdot_tree(fn(*merge(diff, consts)), cot)

    def hand(diff, cot, consts):
        out = hand_vjp(*merge(diff, consts), cot)
        if out is None:
            raise _UserValueError(f"hand_vjp returned None; it must return the cotangent(s) of {row_names} (a "
                                  "book-style backward that stores its result, as self.dinputs, must also return it)")
        if len(argnums) == 1 and not (isinstance(out, tuple) and len(out) == 1):
            out = (out,)
        if not isinstance(out, (tuple, list)) or len(out) != len(argnums):
            got = len(out) if isinstance(out, (tuple, list)) else describe(out)
            left = [all_names[i] for i in const_pos]
            raise _UserValueError(f"hand_vjp must return {len(argnums)} cotangent(s), one for each of {row_names}; "
                                  f"got {got}{_integer_primals([primals[i] for i in const_pos], left)}")
        return tuple(out)

    diff = tuple(primals[i] for i in argnums)
    consts = tuple(primals[i] for i in const_pos)
    leaves, treedef = _float_output(fn, primals, all_names)
    n_cot = 1 if all(leaf.shape == () for leaf in leaves) else max(1, int(cotangents))
    reports = []
    rng = np.random.default_rng(seed % 2**32)  # NumPy, not jax.random: nothing to compile for a few draws
    for k in range(n_cot):
        cot = jax.tree_util.tree_unflatten(
            treedef, [np.asarray(rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
        )
        def check(at: Any, cot: Any = cot, k: int = k) -> GradReport:
            return _check_grad_impl(scalar, at, (cot, consts), hand=hand, has_aux=False, wrt=None, rtol=rtol,
                                    atol=atol, mode=mode, seed=seed + k, reuse=False)

        try:
            rep = check(diff)
        except (TypeError, ValueError) as e:
            raise (ValueError if isinstance(e, ValueError) else TypeError)(_in_terms_of(str(e.args[0]) if e.args else
                                                                                       str(e), row_names)) from None
        # (several kinks meeting on one coordinate: checked again off them, as check_grad does)
        rep = _second_look(rep, check, scalar, diff, (cot, consts), hand=hand, has_aux=False, wrt=None, seed=seed + k)
        reports.append(_rename_rows(rep, row_names, "check_vjp"))
    report = _merge(reports, f"check_vjp({getattr(fn, '__name__', 'fn')})")
    return _numpy_semantics(report, hand, diff, cot, consts, row_names)


def _numpy_semantics(report: GradReport, hand: Callable, diff: tuple, cot: Any, consts: tuple,
                     names: Sequence[str]) -> GradReport:
    """A hand that JAX could trace, run once more as the book's code runs: on writable NumPy float64 arrays.
    There ``d = dvalues; d *= mask`` changes ``dvalues`` in place (a forgotten ``.copy()``), which JAX arrays
    never do, so the traced check passed a backward pass that is wrong as the user runs it. Where the two runs
    differ, the rows are ``hand_wrong`` with a note; a hand that fails on one kind of array is left as checked."""

    def host(tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: np.array(x, np.float64) if _is_array(x) and jnp.issubdtype(
            jnp.result_type(x), jnp.floating) else x, tree)

    try:
        with _x64(True):
            traced = [np.asarray(x, np.float64) for x in hand(*jax.tree_util.tree_map(
                lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, (host(diff), host(cot), host(consts))))]
            # (JAX operations in the hand compute in float64 here too: only NumPy's in-place semantics differ)
            eager = [np.asarray(x, np.float64) for x in hand(host(diff), host(cot), host(consts))]
            again = [np.asarray(x, np.float64) for x in hand(host(diff), host(cot), host(consts))]
    except Exception:  # noqa: BLE001 - a hand for one kind of array only: nothing to compare
        return report
    found: dict[str, tuple[tuple[int, ...], float, float, str]] = {}
    for name, t, e, e2 in zip(names, traced, eager, again, strict=False):
        if t.shape != e.shape:
            continue
        if e2.shape != e.shape or not np.array_equal(e, e2, equal_nan=True):  # another result for the same arrays
            at = tuple(int(i) for i in np.argwhere(e2 != e)[0]) if e2.shape == e.shape else ()
            return dataclasses.replace(report, notes=(*report.notes, (
                f"hand_vjp gives another {name} each time it is called on the same NumPy arrays"
                + (f" ({e[at]:.6g}, then {e2[at]:.6g} at {list(at)})" if at else "")
                + ": it is not a function of its inputs (a tie broken at random without a fixed seed?), so what was "
                "checked is one of its draws; whether it handles NumPy's in-place operations as JAX arrays do "
                "was not compared")))
        with np.errstate(invalid="ignore"):
            gap = np.abs(t - e)
            bad = ~(gap <= 1e-9 * (np.abs(t) + np.max(np.abs(t), initial=0.0)) + 1e-300) & np.isfinite(t)
        if bad.any():
            at = tuple(int(i) for i in np.unravel_index(int(np.argmax(np.where(bad, gap, -1))), t.shape))
            found[name] = (at, float(e[at]), float(t[at]), (
                f"hand_vjp gives {e[at]:.6g} at {list(at)} on NumPy arrays, as the book's code runs, but "
                f"{t[at]:.6g} on JAX arrays, which were checked: an in-place operation on an array it was given "
                "(d = dvalues; d *= ..., without .copy())?"))
    if not found:
        return report

    def wrong(r: Row) -> Row:
        # The row shows the element where the two runs differ, with the value the user's code gives there (the
        # other values of the row were read at another element, where nothing was wrong).
        at, e, t, note = found[r.path]
        err = abs(e - t)
        return dataclasses.replace(r, verdict=Verdict.HAND_WRONG, worst_index=at, hand=e, autodiff=None, numeric=None,
                                   max_abs_err=err, max_rel_err=err / max(abs(e), abs(t)) if max(abs(e), abs(t)) else 0.0,
                                   note="; ".join(n for n in [note, r.note] if n))

    rows = tuple(wrong(r) if r.path in found else r for r in report.rows)
    return dataclasses.replace(report, rows=rows, verdict=_combine_verdicts([r.verdict for r in rows]))


@_isolating
def check_jacobian(
    fn: Callable[[jax.Array], jax.Array],
    x: Any,
    hand_jac: Callable[[Any], Any],  # JAX or NumPy arrays in and out
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
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise TypeError("check_jacobian: fn(x) must return a floating-point array (its Jacobian is checked); got "
                        f"{describe(y)}")
    m = math.prod(y.shape)
    if m > 4096:
        raise ValueError(f"check_jacobian: fn has {m} outputs; use check_vjp for large outputs")
    J_shape: Any
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
    notes = _autodiff_jacobian_notes(fn, x)

    def row_fn(x_, i):
        return jnp.ravel(fn(x_))[i]

    def row_hand(x_, i):
        return jnp.reshape(_unplaced(hand_jac(x_)), (m,) + x_.shape)[i]

    reports = []
    for i in range(m):
        def check(at: Any, i: int = i) -> GradReport:
            return _check_grad_impl(row_fn, at, (jnp.asarray(i, jnp.int32),), hand=row_hand, has_aux=False, wrt=None,
                                    rtol=rtol, atol=atol, mode=mode, seed=seed, reuse=False)

        rep = _second_look(check(x), check, row_fn, x, (jnp.asarray(i, jnp.int32),), hand=row_hand, has_aux=False,
                           wrt=None, seed=seed)
        out_idx = [int(k) for k in np.unravel_index(i, y.shape)] if y.shape else []
        reports.append(_rename_rows(dataclasses.replace(rep, rows=tuple(dataclasses.replace(r, path="[0]") for r in rep.rows)),
                                    [f"y{out_idx}"], "check_jacobian"))
    merged = _merge(reports, f"check_jacobian({getattr(fn, '__name__', 'fn')})", notes)
    if any(n.startswith("jacrev and jacfwd disagree") for n in notes) and merged.ok:
        merged = dataclasses.replace(merged, verdict=Verdict.AUTODIFF_WRONG)
    return merged


def _autodiff_jacobian_notes(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> list[str]:
    """jax.jacrev against jax.jacfwd at x: notes on a mode JAX cannot do, or on where the two disagree.
    Raises ValueError when JAX can do neither."""
    notes = []
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
    return notes


@_isolating
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
    _check_counts("check_chain", seed, cotangents)
    parsed: list[tuple[str, Any, Any, Any, bool]] = []
    for k, st in enumerate(stages):
        if not isinstance(st, (tuple, list)) or len(st) not in (3, 4) or not isinstance(st[0], str):
            raise TypeError(f"check_chain: stage {k} must be (name, forward, hand_backward[, params]); got {describe(st)}")
        if any(st[0] == p[0] for p in parsed):
            raise ValueError(f"check_chain: two stages are named {st[0]!r}; give each link its own name")
        parsed.append((st[0], st[1], st[2], _as_arrays(st[3]) if len(st) == 4 else None, len(st) == 4))
    if not parsed:
        raise ValueError("check_chain: needs at least one stage")
    x = jnp.asarray(x) if isinstance(x, (int, float)) or _number_lists(x) else x  # (the book's nested lists too)
    links = []
    cur = x
    for k, (name, fwd, bwd, p, has_p) in enumerate(parsed):
        try:
            rep, cur = _check_link(name, fwd, bwd, p, has_p, cur, k, cotangents, rtol, atol, mode, seed)
        except (TypeError, ValueError) as e:
            raise (ValueError if isinstance(e, ValueError) else TypeError)(f"check_chain: link {name!r}: {e}") from None
        links.append((name, rep))
    try:
        return _whole_chain(parsed, links, x, rtol, atol, mode, seed)
    except (TypeError, ValueError) as e:  # (each link passed alone: the composition is what fails, h98)
        raise (ValueError if isinstance(e, ValueError) else TypeError)(
            "check_chain: the whole chain (every forward in turn, then every hand_backward from the last link to the "
            f"first, each given the previous one's result as dvalues) fails: {type(e).__name__}: {e} -- a "
            "hand_backward gets the JAX array the next link's hand_backward returned (NumPy's in-place writes such as "
            "dinputs[x <= 0] = 0 need np.array(dvalues) first)") from e


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
    if not rep.ok and np.shape(nxt) == () and _ignores_dvalues(bwd, p, has_p, cur):
        rep = dataclasses.replace(rep, notes=(*rep.notes, (
            "this link's output is a scalar, and its hand_backward returns the same for dvalues 1 and 2: it ignores "
            "dvalues (as the book's loss backward does, which assumes 1). Each link is checked under random dvalues, "
            "as the next link would give it: multiply the result by dvalues")))
    return dataclasses.replace(rep, title=f"link {name}"), nxt


def _ignores_dvalues(bwd: Callable, p: Any, has_p: bool, x: Any) -> bool:
    """Whether a link's hand backward gives the same input gradient for dvalues 1 and 2 (on copies: it may write in
    place), and a nonzero one (h98: the book's loss backward, which takes no dvalues)."""
    try:
        outs = []
        for d in (1.0, 2.0):
            xs, dv = _host_tree(x, False), np.asarray(d, np.asarray(x).dtype)
            out = bwd(_host_tree(p, False), xs, dv)[1] if has_p else bwd(xs, dv)
            outs.append(np.asarray(out, np.float64))
        return bool(np.array_equal(outs[0], outs[1]) and np.any(outs[0] != 0))
    except Exception:  # noqa: BLE001 - a hand that cannot be called so: nothing to say
        return False


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
    rng = np.random.default_rng((seed + 1000) % 2**32)
    u = None if scalar_out else jax.tree_util.tree_map(
        lambda s: np.asarray(rng.standard_normal(s.shape), s.dtype), out_shape)

    def whole(ps, x_):
        y = forward(ps, x_)[0]
        return y if scalar_out else _vdot_tree(y, u)

    def whole_hand(ps, x_):
        y, inputs = forward(ps, x_)
        d = jnp.ones((), y.dtype) if scalar_out else u
        eager = not is_tracer(y)
        if eager:  # called eagerly (a NumPy backward): give it writable NumPy arrays, as the book does
            inputs, d = _host_tree(inputs, False), _host_tree(d, False)
        grads = {}
        for (name, _, bwd, p, has_p), inp in reversed(list(zip(parsed, inputs, strict=True))):
            if has_p:
                dp, d = bwd(ps.get(name, p), inp, d)
                if name in ps:
                    grads[name] = dp
            else:
                d = bwd(inp, d)
            if eager:  # (the next one too, whatever this one returned: a jnp array is immutable, h98)
                d = _host_tree(d, False)
        return {name: grads[name] for name in ps}, d

    if all_params:
        # The parameters' gradient through the whole chain. (Not the input's: an input coordinate can move
        # several kinks at once in opposite directions, where the one-sided test cannot judge conventions.) The
        # input is an argument, not a constant: the float64 check converts it with the parameters, as stages whose
        # operations need matching dtypes (lax.conv) require.
        end = check_grad(whole, all_params, x, hand=lambda ps, x_: whole_hand(ps, x_)[0],
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
