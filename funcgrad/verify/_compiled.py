"""The compiled pieces of a check, and what tracing fn tells before anything runs. Functions, layouts and plans are
static arguments, so repeated checks of the same function reuse one compilation.

A finite-difference "item" is a direction u along which f is differentiated: a coordinate (index >= 0) or a
random unit vector confined to the flat index range [lo, hi) (index = -1, drawn from stream ``stream`` of the
check's key) and to the elements where autodiff and hand are finite. f is evaluated at theta + t·u for
t in ±step, ±step/2 (see :mod:`funcgrad.verify._fd`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad.verify._fd import _LADDER, _OFFSETS
from funcgrad.verify._inputs import (
    _Bound,
    _check_output,
    _first_line,
    _join_args,
    _Layout,
    _main_output,
    _needs_eager,
)

# Budget for coordinate-wise finite differences in mode="auto": about this many flops in total.
_EXACT_FLOP_BUDGET = 4e9
_ALWAYS_EXACT = 16  # leaves this small are always checked element by element
_MAX_EXACT_ELEMENTS = 4096  # mode="auto" never checks more elements than this one by one
_N_PROJ = 3  # random directions per projection-checked leaf without a hand gradient (1 with one)
_K_MAG = 1  # largest-|gradient| elements per projection-checked leaf, checked one by one
_MEM_ELEMENTS = 1 << 23  # perturbed parameter copies held at once (float64 elements)


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
    returns F (items, 4: the offsets), P (items, 3) and JV (items,) (NaN where not wanted).

    ``batch`` > 1 evaluates that many items at once with vmap (accelerators); ``batch`` == 1 evaluates them
    one at a time with lax.map (CPU, where XLA's batched matrix products are several times slower than a loop
    of plain ones, for small and large functions alike)."""
    want_all = jnp.zeros(items.index.shape, bool) if want_jvp is None else want_jvp
    n = theta.shape[0]
    offsets = jnp.asarray(_OFFSETS, theta.dtype)
    a, h, tol2 = vecs
    nan = jnp.full((), jnp.nan, theta.dtype)

    def branch(pred, yes, no):
        # A real branch in a sequential loop (the untaken side costs nothing); a select under vmap.
        return jax.lax.cond(pred, yes, no) if batch == 1 else jnp.where(pred, yes(), no())

    def one(item):
        index, stream, lo, hi, step, want = item
        e = branch(index < 0, lambda: _direction(seed, stream, lo, hi, n, support),
                   lambda: jax.nn.one_hot(jnp.maximum(index, 0), n, dtype=theta.dtype))
        at = lambda offset: f(theta + (offset * step) * e)  # noqa: E731
        F = jax.vmap(at)(offsets) if batch > 1 else jax.lax.map(at, offsets)
        jv = branch(want, lambda: jax.jvp(f, (theta,), (e,))[1], lambda: nan) if want_jvp is not None else nan
        return F, jnp.stack([e @ a, e @ h, jnp.sqrt((e * e) @ tol2)]), jv

    n_items = items.index.shape[0]
    cols = (*items, want_all)
    if n_items == 0:
        return jnp.zeros((0, 4), theta.dtype), jnp.zeros((0, 3), theta.dtype), jnp.zeros((0,), theta.dtype)
    if batch == 1:
        return jax.lax.map(one, cols)
    pad = (-n_items) % batch
    padded = [jnp.concatenate([x, jnp.repeat(x[:1], pad)]) if pad else x for x in cols]
    chunks = [x.reshape(-1, min(batch, n_items + pad)) for x in padded]
    if chunks[0].shape[0] == 1:
        F, P, JV = jax.vmap(one)(tuple(c[0] for c in chunks))
    else:
        F, P, JV = jax.lax.map(jax.vmap(one), tuple(chunks))
        F, P, JV = F.reshape(-1, 4), P.reshape(-1, 3), JV.reshape(-1)
    return F[:n_items], P[:n_items], JV[:n_items]


def _dtype64(dtype: Any) -> Any:
    """An argument's dtype in the float64 check: floats become float64, and signed integers int64, as they
    are in an x64 program (``lax.fori_loop(0, n)`` needs n and the literal 0 to share a dtype); unsigned
    integers (raw PRNG keys), booleans and keys stay as they are."""
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float64)
    if jnp.issubdtype(dtype, jnp.signedinteger):
        return jnp.dtype(jnp.int64)
    return dtype


def _n_consts(spec: tuple) -> int:
    """How many of the traced arrays are the constants a traced fn closes over: ``packed`` is then (fixed
    leaves, args, constants), and the constants come last (see :mod:`funcgrad.verify._traced`)."""
    (packed,) = jax.tree_util.treedef_children(spec[0])
    parts = jax.tree_util.treedef_children(packed)
    return int(parts[2].num_leaves) if len(parts) == 3 else 0  # type: ignore[attr-defined]


def _cast64(dyn: list, spec: tuple) -> list:
    """The traced arrays in the float64 check, the constants of a traced fn aside: they keep their dtypes, as
    they do when fn closes over them."""
    keep = _n_consts(spec)
    return [x.astype(_dtype64(x.dtype)) if i < len(dyn) - keep else x for i, x in enumerate(dyn)]


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
    dyn = _cast64(list(dyn), args_spec)
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
                                for o, s in zip(layout.offsets, layout.sizes, strict=True)])
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
    rms = jnp.stack([jnp.sqrt(jnp.sum(theta[o : o + s] ** 2) / max(s, 1))
                     for o, s in zip(layout.offsets, layout.sizes, strict=True)])
    i_steps = h0 * jnp.maximum(1.0, jnp.abs(theta[idx]))
    d_steps = h0 * jnp.maximum(1.0, rms[jnp.asarray(np.array(d_leaf, np.int32))])
    n_i, n_d = idx.shape[0], len(d_leaf)
    zeros_i = jnp.zeros((n_i,), jnp.int32)
    items = _Items(jnp.concatenate([idx, jnp.full((n_d,), -1, jnp.int32)]),
                   jnp.concatenate([zeros_i, jnp.asarray(np.array(d_j, np.int32))]),
                   jnp.concatenate([zeros_i, lo]), jnp.concatenate([zeros_i, hi]),
                   jnp.concatenate([i_steps, d_steps]))
    n_items = n_i + n_d
    scaled = _Items(*(jnp.tile(x, plan.scales) for x in items[:4]),
                    jnp.concatenate([items.step / _LADDER**level for level in range(plan.scales)]))
    # Forward mode along the first direction of each leaf (at the first scale's items).
    first = [n_i + d_leaf.index(i) for i in range(len(plan.exact))]
    want = np.zeros(n_items * plan.scales, bool)
    want[first] = plan.jvp
    F, P, JV = _eval_items(f, theta, seed, scaled, (a_s, h_s, tol * tol), plan.batch, support,
                           jnp.asarray(want) if plan.jvp else None)
    # (items, scales, offsets)
    F = jnp.stack([F[level * n_items : (level + 1) * n_items] for level in range(plan.scales)], axis=1)
    return _ProbeOut(f0, theta, a, h, a_s, h_s, tol, support, JV[jnp.asarray(first)], items, F, P[:n_items])


def _dir_items(plan: _Plan) -> tuple[list[int], list[int]]:
    """The random directions: their leaves, and their stream numbers. One per exact leaf (for the forward-mode
    check), n_proj per projection-checked leaf."""
    leaves: list[int] = []
    for i, exact in enumerate(plan.exact):
        leaves += [i] * (1 if exact else plan.n_proj)
    return leaves, list(range(len(leaves)))


@functools.partial(jax.jit, static_argnames=("fn", "layout", "args_spec", "batch"))
def _items_jit(theta, dyn, seed, items, a, h, tol, support, *, fn, layout, args_spec, batch):
    dyn = _cast64(list(dyn), args_spec)
    f = _flat_fn(fn, layout, args_spec, dyn)
    return _eval_items(f, theta, seed, items, (a, h, tol * tol), batch, support)[:2]


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


@functools.lru_cache(maxsize=16)
def _static_facts(bound: _Bound, layout: _Layout, spec, param_dtypes, dyn_sig, x64, diagnose=False) -> _Facts:  # noqa: ARG001
    """Traces fn (and hand) once. Reverse and forward mode are assumed to work (a custom_vjp rule aside),
    which costs nothing to find out; only when the check then fails does ``diagnose`` trace each mode to
    see which one JAX cannot do. ``x64`` is part of the cache key only: the caller's x64 state changes the
    dtypes fn's trace sees."""
    params = [jax.ShapeDtypeStruct(s, d) for s, d in zip(layout.shapes, param_dtypes, strict=True)]
    # (a float64 constant of the float64 trace is truncated when passed without x64, as the real call does;
    # canonicalized here so that JAX does not warn about it)
    dyn = [jax.ShapeDtypeStruct(s, d if jnp.issubdtype(d, jax.dtypes.prng_key) else jax.dtypes.canonicalize_dtype(d))
           for s, d in dyn_sig]
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
        keep = _n_consts(spec)
        dyn_s = [jax.ShapeDtypeStruct(d.shape, _dtype64(d.dtype) if i < len(dyn) - keep else d.dtype)
                 for i, d in enumerate(dyn)]

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
    idx = [np.arange(o, o + s) for o, s, e in zip(layout.offsets, sizes, exact, strict=True) if e]
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
