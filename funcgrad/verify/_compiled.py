"""The compiled pieces of a check, and what tracing fn tells before anything runs. Functions, layouts and plans are
static arguments, so repeated checks of the same function reuse one compilation.

A finite-difference "item" is a direction u along which f is differentiated: a coordinate (index >= 0) or a
random unit vector confined to the flat index range [lo, hi) (index = -1, drawn from stream ``stream`` of the
check's key) and to the elements where autodiff and hand are finite. f is evaluated at theta + t·u for
t in ±step, ±step/2 (see :mod:`funcgrad.verify._fd`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal, Primitive

from funcgrad.verify._fd import _OFFSETS
from funcgrad.verify._inputs import (
    _Bound,
    _check_output,
    _first_line,
    _join_args,
    _Layout,
    _main_output,
    _needs_eager,
    _UserTypeError,
    _x64,
)
from funcgrad.verify._xla import gradient_jit

# Budget for coordinate-wise finite differences in mode="auto": about this many flops in total.
_EXACT_FLOP_BUDGET = 4e9
_SCALES_FLOP_BUDGET = 4e9  # finite differences within this: four scales up front; beyond it, one (see _make_plan)
_ALWAYS_EXACT = 16  # leaves this small are always checked element by element
_MAX_EXACT_ELEMENTS = 4096  # mode="auto" never checks more elements than this one by one
_N_PROJ = 3  # random directions per projection-checked leaf without a hand gradient (1 with one)
_K_MAG = 1  # largest-|gradient| elements per projection-checked leaf, checked one by one
_MEM_ELEMENTS = 1 << 23  # perturbed parameter copies held at once (float64 elements)
_FOLD = 1 << 16  # elements per step of the compiled reductions over a leaf (their temporaries' size)
_GROUP_LEAVES = 64  # functions with at most this many leaves: finite differences in runs of a few leaves...
_RUN_FLOPS = 1e8  # ... where that saves more flops per check than a run's own cost (its setup, the part of fn that
# depends on none of its leaves, and a share of its compilation: about this many flops)
_PAD_FLOPS = 1e9  # evaluations cheaper than this: item counts padded to at least 8 (fewer shapes to compile)
_SEPARATE_ELEMENTS = 1 << 22  # parameters this many or more: each run of finite differences a program of its own
_PROGRAM_FLOPS = 2e10  # ... whose compilation costs about as much as this many flops (a second or so)


class _Items(NamedTuple):
    """Finite-difference items (arrays of equal length)."""

    index: Any  # flat element index, or -1 for a random direction
    stream: Any  # the random direction's stream number
    lo: Any  # the direction's support [lo, hi)
    hi: Any
    step: Any  # the step t


class _ProbeOut(NamedTuple):
    """What the compiled probe returns. The two gradients are its only outputs of the parameters' size: the
    per-element tolerances, the support of the random directions and the parameters in float64 are cheap to
    recompute where needed, and the finite differences run in a program of their own (:func:`_items_jit`)."""

    f0: Any  # fn at the parameters (float64), evaluated plainly, as the finite differences evaluate it
    a: Any  # autodiff gradient: a flat float64 array per leaf
    h: Any  # hand gradient likewise, or None without a hand (checked against finite differences only)
    leaf_max: Any  # per leaf: the largest max(|a|, |h|) over the elements where both are finite (0 if none)
    items: _Items  # the planned elements, then the random directions
    P: Any  # (directions, 3): each random direction dotted with autodiff, hand, and the aggregated tolerance
    f_ad: Any = None  # fn's value as reverse mode computes it (a custom rule's forward can make it differ from f0)
    zero: Any = None  # per leaf: the round-off at zero allowed where both sides are that small (see _tolerance)
    size: Any = None  # per leaf: its elements' size its random directions' steps follow (see _direction_size)


@dataclasses.dataclass(frozen=True)
class _Plan:
    exact: tuple[bool, ...]  # per leaf: every element by finite differences
    n_proj: int  # random directions per projection-checked leaf
    k_mag: int  # largest-|gradient| elements per projection-checked leaf
    scales: int  # step sizes evaluated in the probe (T, T/10, ...)
    jvp: bool  # check forward mode against reverse mode
    batch: int  # items evaluated at once (memory: about 6·n floats each)
    reverse: bool = True  # autodiff by reverse mode (else forward mode, one basis vector at a time)
    groups: tuple[tuple[int, ...], ...] = ()  # finite differences in runs, each over these leaves (see _eval_items);
    # () : one run over all of them
    pad_min: int = 8  # a run's items are padded to a power of two, at least this many (fewer shapes to compile)
    separate: bool = False  # each run a program of its own (large parameters: XLA does not always reuse one
    # run's memory for the next within a program)


def _hash_uniform(seed, j, idx):
    """Pseudo-random numbers in [-1/2, 1/2) from a counter-based integer hash (lowbias32) of (seed, stream j,
    flat index ``idx``): cheap to compile, unlike a cryptographic generator, and plenty for directions."""
    x = idx.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
    x = x + (jnp.asarray(j, jnp.uint32) + jnp.uint32(1)) * jnp.uint32(0x85EBCA77) + jnp.asarray(seed, jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    return x.astype(jnp.float64) / 2.0**32 - 0.5


def _fold(s: int, fn: Callable, init: Any) -> Any:
    """Folds ``fn(carry, start, r, valid)`` over a leaf of s elements in chunks of at most :data:`_FOLD`: ``start``
    is the chunk's first element, ``r`` its elements' indices within the leaf, ``valid`` marks those no earlier
    chunk read (the last chunk is shifted back to end at s). Whatever XLA fuses, the temporaries of a reduction
    over a leaf are then of the chunk's size, not the leaf's."""
    if s == 0:
        return init
    c = min(s, _FOLD)
    k = -(-s // c)
    if k == 1:
        return fn(init, 0, jnp.arange(c), jnp.ones(c, bool))

    def body(i, carry):
        start = jnp.minimum(i * c, s - c)
        r = start + jnp.arange(c)
        return fn(carry, start, r, r >= i * c)

    return jax.lax.fori_loop(0, k, body, init)


def _chunk(x, start, c):
    """Elements start, ..., start + c - 1 of a flat array (all of it when it has c elements)."""
    return x if x.shape[0] == c else jax.lax.dynamic_slice_in_dim(x, start, c)


def _leaf_direction(seed, j, lo, hi, o, r, support):
    """Elements ``r`` of one leaf (at flat offset o) of the random direction of stream j confined to the flat index
    range [lo, hi) and to ``support`` (the leaf's mask at r; None: everywhere), not yet normalised."""
    g = o + r
    d = _hash_uniform(seed, j, g) * ((g >= lo) & (g < hi))
    return d if support is None else d * support


def _sq_norm(seed, j, lo, hi, o, s, support):
    """Σ d² over one leaf's part of a direction (see :func:`_leaf_direction`), in chunks: every program that
    normalises a direction sums it the same way, so all of them move along the same unit vector."""

    def step(acc, start, r, valid):
        m = None if support is None else _chunk(support, start, r.shape[0])
        d = _leaf_direction(seed, j, lo, hi, o, r, m)
        return acc + jnp.sum(jnp.where(valid, d * d, 0.0))

    return _fold(s, step, jnp.zeros((), jnp.float64))


def _tolerance(a, mag, leaf_max, gmax, rtol, atol, eps, xp=jnp, zero=0.0):
    """Per-element analytic tolerances, (independent, rounding of a cast): atol + rtol[0]·max(|a|, |h|) (``mag``),
    atol defaulting to rtol[0]·(the leaf's largest) plus round-off at the whole gradient's scale (``gmax``; a leaf
    whose true gradient is 0 still gets round-off: 64 units in the last place of float64 (``eps``) and, when given
    (rtol[5]), 4 of the lowest precision the leaf's gradients are computed in, float32 at most: a float32 hand's
    bias before a batch norm, whose true gradient is 0, gives float32 round-off of the whole gradient's scale); and
    the rounding of the dtype hand casts its result to, if it does (rtol[1:5]: that dtype's eps, smallest normal,
    smallest subnormal, and 1 where the backend flushes its subnormals to zero; zeros without a cast): half a unit
    in the last place of autodiff's ``a`` there; below the normal range, half the subnormal spacing, or |a| itself
    where it may be flushed to zero (XLA's CPU conversion to bfloat16). ``xp``: jnp or np.
    The cast's rounding is the same for equal elements: it adds up along a direction, where the independent part
    adds in quadrature.

    ``zero`` (see :func:`_zero_roundoff`): every element is allowed that much, the round-off of fn's value, which
    terms that cancel leave in a gradient (equal logits and balanced labels give a bias gradient of ±1e-16 on both
    sides while gmax elsewhere is 1e-4; a saturated softmax's VJP at the row's largest is 3e-10 from terms of 1)."""
    eps_own = rtol[5] if rtol.shape[0] > 5 else 0.0
    base = xp.where(atol >= 0, atol, rtol[0] * leaf_max + (64 * eps + 4 * eps_own) * gmax + zero) + rtol[0] * mag
    if xp is np and not np.any(rtol[1:5]):  # (no cast: nothing to add; frexp over a large leaf is not free)
        return base, 0.0
    m = xp.abs(a)
    normal = 0.5 * rtol[1] * xp.exp2(xp.frexp(m)[1] - 1.0)
    return base, xp.where(m >= rtol[2], normal, 0.5 * rtol[3] + rtol[4] * m)


def _finite_parts(a, h):
    """Where autodiff and hand are both finite (random directions live there), and their values there (0
    elsewhere), and max(|a|, |h|) there. ``h`` may be None (no hand)."""
    fin = jnp.isfinite(a) if h is None else jnp.isfinite(a) & jnp.isfinite(h)
    a_s = jnp.where(fin, a, 0.0)
    if h is None:
        return fin, a_s, None, jnp.abs(a_s)
    h_s = jnp.where(fin, h, 0.0)
    return fin, a_s, h_s, jnp.maximum(jnp.abs(a_s), jnp.abs(h_s))


def _leaf_scale(a, h, s):
    """One leaf's largest max(|a|, |h|) where both are finite (0 if none), and the first element of its largest
    finite |a| (the element the probe checks one by one)."""

    def step(carry, start, r, valid):
        mx, best, arg = carry
        _, a_s, _, mag = _finite_parts(_chunk(a, start, r.shape[0]), None if h is None else _chunk(h, start, r.shape[0]))
        v = jnp.where(valid, jnp.abs(a_s), -1.0)
        j = jnp.argmax(v)
        better = v[j] > best
        return (jnp.maximum(mx, jnp.max(jnp.where(valid, mag, 0.0))), jnp.where(better, v[j], best),
                jnp.where(better, r[j].astype(jnp.int32), arg))

    init = (jnp.zeros((), jnp.float64), jnp.full((), -1.0, jnp.float64), jnp.zeros((), jnp.int32))
    mx, _, arg = _fold(s, step, init)
    return mx, arg


def _zero_roundoff(f0, h0, rms, eps, xp=jnp):
    """Per leaf, the round-off at zero: 4·eps·|f|, the rounding of fn's value, but no more than the smallest
    derivative finite differences resolve along the leaf (48·eps_f·|f| over its first step, eps_f = h0⁵), so that
    nothing they could settle is excused: 1e9 + 3e-7·w at w = 1e5 has an exact gradient of 1.4·eps·|f| whose sign
    steps of 74 settle."""
    f = xp.where(xp.isfinite(f0), xp.abs(f0), 0.0)
    return xp.minimum(4 * eps * f, 48 * h0**4 * f / xp.maximum(1.0, rms))


def _direction_size(x, a, h):
    """The size of a leaf's elements (``x``, at its own dtype) that its random directions' steps follow: their root
    mean square weighted by the gradient's square there (autodiff ``a``, and ``hand`` when given, where finite;
    flat float64), the elements a directional derivative comes from; the plain root mean square where every gradient
    is 0. Elements whose gradient is 0 must not set the step: a causal mask's -1e9 logits would make it 1e5 and
    saturate the others. In chunks: nothing of the leaf's size is materialised."""
    x = x.reshape(-1)
    s = x.shape[0]

    def weight(start, c, valid):
        w = jnp.abs(_chunk(a, start, c))
        if h is not None:
            w = jnp.maximum(w, jnp.abs(_chunk(h, start, c)))
        return jnp.where(valid & jnp.isfinite(w), w, 0.0)

    top = _fold(s, lambda acc, start, r, valid: jnp.maximum(acc, jnp.max(weight(start, r.shape[0], valid))),
                jnp.zeros((), jnp.float64))
    top = jnp.where(top > 0, top, 1.0)

    def sums(acc, start, r, valid):
        xc = _chunk(x, start, r.shape[0]).astype(jnp.float64)
        sq = jnp.where(valid & jnp.isfinite(xc), xc * xc, 0.0)
        w = (weight(start, r.shape[0], valid) / top) ** 2
        return acc + jnp.stack([jnp.sum(sq), jnp.sum(w * sq), jnp.sum(w)])

    plain, num, den = _fold(s, sums, jnp.zeros(3, jnp.float64))
    return jnp.where(den > 0, jnp.sqrt(num / jnp.where(den > 0, den, 1.0)), jnp.sqrt(plain / max(s, 1)))


def _project(seed, j, lo, hi, o, a, h, leaf_max, gmax, rtol, atol, eps, zero=0.0):
    """The unit direction of stream j within [lo, hi) ⊂ one leaf (its gradients ``a`` and ``h``, None without a
    hand, at flat offset o; confined to where both are finite) dotted with autodiff, hand and the tolerances (as
    sqrt(Σ u²·tol²)), in chunks: nothing of the leaf's size is materialised."""
    s = a.shape[0]

    def support(start, c):
        fin = jnp.isfinite(_chunk(a, start, c))
        return fin if h is None else fin & jnp.isfinite(_chunk(h, start, c))

    def sq(acc, start, r, valid):
        d = _leaf_direction(seed, j, lo, hi, o, r, support(start, r.shape[0]))
        return acc + jnp.sum(jnp.where(valid, d * d, 0.0))

    norm = jnp.maximum(jnp.sqrt(_fold(s, sq, jnp.zeros((), jnp.float64))), 1e-300)

    def step(acc, start, r, valid):
        c = r.shape[0]
        fin, a_s, h_s, mag = _finite_parts(_chunk(a, start, c), None if h is None else _chunk(h, start, c))
        e = jnp.where(valid, _leaf_direction(seed, j, lo, hi, o, r, fin) / norm, 0.0)
        tol, cast = _tolerance(a_s, mag, leaf_max, gmax, rtol, atol, eps, zero=zero)
        hp = jnp.sum(e * h_s) if h_s is not None else jnp.zeros((), jnp.float64)
        return acc + jnp.stack([jnp.sum(e * a_s), hp, jnp.sum((e * e) * (tol * tol)), jnp.sum(jnp.abs(e) * cast)])

    p = _fold(s, step, jnp.zeros(4, jnp.float64))
    return p[:3].at[2].set(jnp.sqrt(p[2]) + p[3])


def _unflat(layout: _Layout, leaves: Sequence) -> Any:
    """The differentiated leaves as fn takes them, from their flat versions."""
    return jax.tree_util.tree_unflatten(layout.treedef, [x.reshape(shape) for x, shape in zip(leaves, layout.shapes,
                                                                                               strict=True)])


def _split(layout: _Layout, theta: jax.Array) -> list:
    return [theta[o : o + s] for o, s in zip(layout.offsets, layout.sizes, strict=True)]


def _leaf_fn(fn: Callable, layout: _Layout, args: tuple) -> Callable:
    """fn of the flat float64 leaves, its output in float64 (whatever dtype fn computes in)."""
    return lambda leaves: fn(_unflat(layout, leaves), *args).astype(jnp.float64)


def _take(leaves: Sequence, idx: jax.Array, layout: _Layout) -> jax.Array:
    """Elements of the flat parameter vector at ``idx``, in float64, read from its leaves (nothing concatenated)."""
    out = jnp.zeros(idx.shape, jnp.float64)
    for x, o, s in zip(leaves, layout.offsets, layout.sizes, strict=True):
        if s:
            inside = (idx >= o) & (idx < o + s)
            out = jnp.where(inside, x.reshape(-1)[jnp.clip(idx - o, 0, s - 1)].astype(jnp.float64), out)
    return out


class _Group(NamedTuple):
    """A run of consecutive finite-difference items evaluated by one loop of the compiled program."""

    moved: tuple[int, ...]  # the leaves its items move; the others stay fixed (converted to float64 once)
    size: int  # how many items
    jvp: tuple[int, ...] = ()  # its items (positions within the run) along which forward mode is wanted


def _eval_items(f, params, layout, seed, items, batch, support, groups, cols=None):
    """f at the four offsets along each item and, at the positions ``groups`` mark, the forward-mode derivative
    along the item's direction: returns F (items, 4: the offsets) and JV (items,) (NaN where not wanted). ``f``
    takes the flat float64 leaves; ``params`` are the leaves at their own dtypes, converted to float64 inside
    each perturbation (the perturbed copy and the item's direction are all that is held of the parameters' size);
    ``support`` holds each leaf's mask for the random directions (None: everywhere).

    The items come in runs (``groups``, static), each confined to some leaves (its ``moved`` ones: every item of
    the run lies within them). A run's loop perturbs only those; the others are converted to float64 once,
    outside the loop, and XLA computes what does not depend on the moved leaves (the layers before them) once for
    the whole run rather than at every evaluation. Runs go one after the other (a barrier orders them), so only
    one run's float64 copies of fixed leaves are held at a time. Each run's forward-mode derivatives follow in a
    loop of their own, outside any branch, so that their primal part is computed once per run likewise.

    ``batch`` > 1 evaluates that many items at once with vmap (accelerators); ``batch`` == 1 evaluates them
    one at a time with lax.map (CPU, where XLA's batched matrix products are several times slower than a loop
    of plain ones, for small and large functions alike).

    ``cols`` (static): the offsets to evaluate, F's other columns NaN (None: all four)."""
    Fs, JVs, start, token = [], [], 0, None
    for g in groups:
        run_items = _Items(*(x[start : start + g.size] for x in items))
        start += g.size
        ps = list(params)
        if token is not None:  # after the previous run: its float64 copies are freed before this run's are made
            ps, _ = jax.lax.optimization_barrier((ps, token))
        F, JV = _eval_run(f, ps, layout, seed, run_items, batch, support, g, cols)
        Fs.append(F)
        JVs.append(JV)
        token = (F, JV)
    if not Fs:
        return jnp.zeros((0, 4), jnp.float64), jnp.zeros((0,), jnp.float64)
    return jnp.concatenate(Fs), jnp.concatenate(JVs)


def _eval_run(f, params, layout, seed, items, batch, support, group, cols=None):
    """One run of :func:`_eval_items`."""
    dtype = jnp.float64
    cols = tuple(range(len(_OFFSETS))) if cols is None else tuple(cols)
    offsets = jnp.asarray([_OFFSETS[c] for c in cols], dtype)
    moved = list(group.moved)
    everything = len(moved) == len(layout.sizes)
    fixed = None if everything else [None if i in moved else jnp.asarray(x).astype(dtype)
                                     for i, x in enumerate(params)]

    def place(vals):
        """All the leaves, from the moved ones' values."""
        if fixed is None:
            return list(vals)
        it = iter(vals)
        return [next(it) if x is None else x for x in fixed]

    def direction_of(index, stream, lo, hi, branch):
        def direction():
            sq = [_sq_norm(seed, stream, lo, hi, layout.offsets[i], layout.sizes[i], support[i]) for i in moved]
            norm = jnp.maximum(jnp.sqrt(functools.reduce(lambda x, y: x + y, sq, jnp.zeros((), dtype))), 1e-300)
            return [_leaf_direction(seed, stream, lo, hi, layout.offsets[i], jnp.arange(layout.sizes[i]), support[i])
                    / norm for i in moved]

        def coordinate():
            return [(layout.offsets[i] + jnp.arange(layout.sizes[i]) == jnp.maximum(index, 0)).astype(dtype)
                    for i in moved]

        return branch(index < 0, direction, coordinate)

    def one(item, branch):
        index, stream, lo, hi, step = item
        # Through a barrier with the item, the moved leaves' float64 versions are made inside the loop, fused into
        # each perturbation, rather than hoisted out of it as a second float64 copy of them.
        ps, _ = jax.lax.optimization_barrier(([params[i] for i in moved], index))
        e = direction_of(index, stream, lo, hi, branch)

        def at(offset):
            # (the barrier again: the conversion is not hoisted out of the loop over the offsets either)
            xs, _ = jax.lax.optimization_barrier((ps, offset))
            return f(place([x.astype(dtype).reshape(-1) + (offset * step) * u for x, u in zip(xs, e, strict=True)]))

        return jax.vmap(at)(offsets) if batch > 1 else jax.lax.map(at, offsets)

    n = group.size
    if n == 0:
        return jnp.zeros((0, 4), dtype), jnp.zeros((0,), dtype)
    cond = jax.lax.cond  # a real branch: the untaken side costs nothing
    if batch == 1:
        F = jax.lax.map(lambda item: one(item, cond), tuple(items))
    else:
        # A select under vmap.
        select = lambda pred, yes, no: jax.tree_util.tree_map(lambda y, n: jnp.where(pred, y, n), yes(), no())  # noqa: E731
        pad = (-n) % batch
        padded = [jnp.concatenate([x, jnp.repeat(x[:1], pad)]) if pad else x for x in items]
        chunks = [x.reshape(-1, min(batch, n + pad)) for x in padded]
        if chunks[0].shape[0] == 1:
            F = jax.vmap(lambda item: one(item, select))(tuple(c[0] for c in chunks))
        else:
            F = jax.lax.map(jax.vmap(lambda item: one(item, select)), tuple(chunks)).reshape(-1, len(cols))
        F = F[:n]
    if len(cols) < len(_OFFSETS):
        F = jnp.full((n, len(_OFFSETS)), jnp.nan, dtype).at[:, np.asarray(cols)].set(F)
    JV = jnp.full((n,), jnp.nan, dtype)
    if group.jvp:
        # A loop of its own, after the finite differences (a barrier with their result orders them), so that it
        # reuses their memory; outside a branch, so that XLA computes the primal part that does not depend on the
        # moved leaves once.
        pos = np.asarray(group.jvp)
        wanted, _ = jax.lax.optimization_barrier((tuple(x[pos] for x in items), F))

        def forward(item):
            ps, _ = jax.lax.optimization_barrier(([params[i] for i in moved], item[0]))
            e = direction_of(*item[:4], cond)
            base = tuple(x.astype(dtype).reshape(-1) for x in ps)
            return jax.jvp(lambda *v: f(place(v)), base, tuple(e))[1]

        JV = JV.at[pos].set(jax.lax.map(forward, wanted))
    return F, JV


def _item_leaves(plan: _Plan, layout: _Layout) -> np.ndarray:
    """The leaf of each of the probe's items (its planned elements, then its directions): static, from the plan."""
    leaves = [i for i, e in enumerate(plan.exact) if e for _ in range(layout.sizes[i])]
    leaves += [i for i, e in enumerate(plan.exact) if not e and plan.k_mag and layout.sizes[i]
               for _ in range(min(plan.k_mag, layout.sizes[i]))]
    return np.array(leaves + _dir_items(plan)[0], np.int64)


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


@functools.partial(gradient_jit, static_argnames=("fn", "layout", "dtypes", "args_spec", "reverse"))
def _user_grad(params, dyn, *, fn, layout, dtypes, args_spec, reverse):
    """Value and autodiff gradient at the parameters' own dtypes: the gradient as a flat array per leaf, at the
    dtype autodiff gives it (no wider copy)."""
    args = _join_args(dyn, args_spec)
    if reverse:
        value, grad = jax.value_and_grad(lambda p: fn(p, *args))(_unflat(layout, list(params)))
        return value, [jnp.ravel(g) for g in jax.tree_util.tree_leaves(grad)]
    theta = layout.ravel(params, jnp.result_type(*dtypes))  # exact: the widest of the leaves' dtypes
    value, grad = _value_and_grad(lambda th: fn(layout.unravel(th, dtypes), *args), theta, False)
    return value, _split(layout, grad)


@functools.partial(gradient_jit, static_argnames=("hand", "layout", "args_spec"))
def _user_hand(params, dyn, *, hand, layout, args_spec):
    """The (traced) hand gradient at the parameters' own dtypes: a flat array per leaf, at hand's own dtypes."""
    out = hand(_unflat(layout, list(params)), *_join_args(dyn, args_spec))
    return [jnp.ravel(x) for x in jax.tree_util.tree_leaves(out)]


@functools.partial(gradient_jit, static_argnames=("fn", "hand", "layout", "dtypes", "args_spec", "reverse"))
def _user_both(params, dyn, *, fn, hand, layout, dtypes, args_spec, reverse):
    """:func:`_user_grad` and :func:`_user_hand` in one program, where both are dispatched together (parameters
    small enough): XLA computes once what they share, the forward pass (3.5 of 17 ms for benchmarks/bench_verify.py's
    393k-parameter MLP in float32)."""
    return (_user_grad._fun(params, dyn, fn=fn, layout=layout, dtypes=dtypes, args_spec=args_spec, reverse=reverse),
            _user_hand._fun(params, dyn, hand=hand, layout=layout, args_spec=args_spec))


@functools.partial(gradient_jit, static_argnames=("fn", "hand", "layout", "args_spec", "plan"))
def _probe(params, dyn, h_given, exact_idx, seed, h0, rtol, atol, eps, *, fn, hand, layout, args_spec, plan):
    """The float64 gradients in one compiled program: value, autodiff and hand gradients (a flat array per leaf,
    the program's only outputs of the parameters' size), each leaf's gradient scale, the finite-difference items
    (every planned element and random direction, with its step) and each direction's projections. Finite
    differences along the items run separately (:func:`_items_jit`), once the gradients are read."""
    dyn = _cast64(list(dyn), args_spec)
    args = _join_args(dyn, args_spec)
    theta = [jnp.asarray(x).astype(jnp.float64) for x in params]
    f = _leaf_fn(fn, layout, args)
    if plan.reverse:
        f_ad, a = jax.value_and_grad(f)(theta)
        a = [x.reshape(-1) for x in a]
        # The finite differences evaluate fn plainly: their centre must too. Under differentiation a custom rule's
        # forward (a custom_vjp's fwd, a custom_jvp's rule) gives the value instead, which a wrong rule changes;
        # without custom rules XLA computes the two once.
        f0 = f(theta)
    else:
        f0, g = _value_and_grad(lambda th: f(_split(layout, th)), layout.ravel(params, jnp.float64), False)
        a = _split(layout, g)
        f_ad = f0
    if hand is not None:
        h = [jnp.ravel(x).astype(jnp.float64) for x in jax.tree_util.tree_leaves(hand(_unflat(layout, theta), *args))]
    elif h_given is not None:
        h = list(h_given)
    else:
        h = None
    hs = [None] * len(a) if h is None else h
    scales = [_leaf_scale(x, y, s) for x, y, s in zip(a, hs, layout.sizes, strict=True)]
    leaf_max = jnp.stack([m for m, _ in scales])
    gmax = jnp.max(leaf_max, initial=0.0)

    # Items: planned elements (all of each exact leaf, the largest gradients of the others), then directions.
    parts = [exact_idx]
    for i, exact in enumerate(plan.exact):
        if not exact and plan.k_mag and layout.sizes[i]:
            if plan.k_mag == 1:  # argmax compiles far faster than top_k
                parts.append(scales[i][1][None] + layout.offsets[i])
            else:
                seg = jnp.abs(_finite_parts(a[i], hs[i])[1])
                parts.append(jax.lax.top_k(seg, min(plan.k_mag, layout.sizes[i]))[1] + layout.offsets[i])
    idx = jnp.concatenate(parts).astype(jnp.int32)
    d_leaf, d_j = _dir_items(plan)
    lo = jnp.asarray(np.array([layout.offsets[i] for i in d_leaf], np.int32))
    hi = jnp.asarray(np.array([layout.offsets[i] + layout.sizes[i] for i in d_leaf], np.int32))
    size = jnp.stack([_direction_size(x, g, hh) for x, g, hh in zip(params, a, hs, strict=True)])
    # (float64's round-off, or that of the lowest precision each leaf's gradients are computed in: rtol's last column)
    zero = _zero_roundoff(f0, h0, size, jnp.maximum(eps, rtol[:, 5]) if rtol.shape[-1] > 5 else eps)
    # (h0: each leaf's first step, relative to its elements' sizes)
    i_leaf = jnp.searchsorted(jnp.asarray(np.array(layout.offsets, np.int32)), idx, side="right") - 1
    i_steps = h0[i_leaf] * jnp.maximum(1.0, jnp.abs(_take(params, idx, layout)))
    d_index = jnp.asarray(np.array(d_leaf, np.int32))
    d_steps = h0[d_index] * jnp.maximum(1.0, size[d_index])
    n_i, n_d = idx.shape[0], len(d_leaf)
    zeros_i = jnp.zeros((n_i,), jnp.int32)
    items = _Items(jnp.concatenate([idx, jnp.full((n_d,), -1, jnp.int32)]),
                   jnp.concatenate([zeros_i, jnp.asarray(np.array(d_j, np.int32))]),
                   jnp.concatenate([zeros_i, lo]), jnp.concatenate([zeros_i, hi]),
                   jnp.concatenate([i_steps, d_steps]))
    # Each direction lies within its leaf: projected there, with that leaf's tolerances.
    proj = [_project(seed, j, layout.offsets[i], layout.offsets[i] + layout.sizes[i], layout.offsets[i], a[i], hs[i],
                     leaf_max[i], gmax, rtol[i], atol, eps, zero[i]) for i, j in zip(d_leaf, d_j, strict=True)]
    P = jnp.stack(proj) if proj else jnp.zeros((0, 3), jnp.float64)
    return _ProbeOut(f0, a, h, leaf_max, items, P, f_ad, zero, size)


def _dir_items(plan: _Plan) -> tuple[list[int], list[int]]:
    """The random directions: their leaves, and their stream numbers. One per exact leaf (for the forward-mode
    check), n_proj per projection-checked leaf."""
    leaves: list[int] = []
    for i, exact in enumerate(plan.exact):
        leaves += [i] * (1 if exact else plan.n_proj)
    return leaves, list(range(len(leaves)))


@functools.partial(jax.jit, static_argnames=("fn", "layout", "args_spec", "batch", "groups", "cols"))
def _items_jit(params, dyn, seed, items, support, *, fn, layout, args_spec, batch, groups, cols=None):
    """f (float64) along finite-difference items, from the parameters at their own dtypes: F (items, 4) and the
    forward-mode derivative along the items ``groups`` marks (NaN elsewhere); the items come in the runs
    ``groups`` describes (see :func:`_eval_items`). ``cols``: the offsets (F's columns) to evaluate, NaN in the
    others (None: all)."""
    dyn = _cast64(list(dyn), args_spec)
    f = _leaf_fn(fn, layout, _join_args(dyn, args_spec))
    return _eval_items(f, list(params), layout, seed, items, batch, support, groups, cols)


@functools.partial(jax.jit, static_argnames=("offset",))
def _project_jit(a, h, seed, streams, lo, hi, leaf_max, gmax, rtol, atol, eps, zero, *, offset):
    """Random directions within one leaf (its gradients ``a`` and ``h``, None without a hand, at flat offset
    ``offset``) dotted with autodiff, hand and the tolerances, as the probe projects its own: (directions, 3)."""
    return jax.lax.map(lambda x: _project(seed, x[0], x[1], x[2], offset, a, h, leaf_max, gmax, rtol, atol, eps,
                                         zero),
                       (streams, lo, hi))


@functools.partial(jax.jit, static_argnames=("layout",))
def _take_jit(params, idx, *, layout):
    """Parameters (flat indices ``idx``) in float64."""
    return _take(list(params), idx, layout)


# ---- what a long-lived process keeps ----------------------------------------------------------------------------
# The programs above are compiled per traced function (a static argument), and jax.jit keeps up to 8192 compilations
# per program: a notebook sweeping a hyperparameter that fn closes over (a new literal in its trace at every check)
# grew by about 9 MiB a check (h102). Past _RETAIN distinct functions, every compilation so far is let go.
_RETAIN = 32
_RETAINED: dict[Any, None] = {}


def _retain(bound: Any) -> None:
    """Registers the bound functions (see _inputs._Bound) a check is about to compile its programs for; once more
    than :data:`_RETAIN` distinct ones have been, the programs compiled so far are let go (a function checked again
    compiles again)."""
    if bound in _RETAINED:
        return
    _RETAINED[bound] = None
    if len(_RETAINED) > _RETAIN:
        _RETAINED.clear()
        _RETAINED[bound] = None
        programs: tuple[Any, ...] = (_user_grad, _user_hand, _user_both, _probe, _items_jit, _project_jit, _take_jit)
        for program in programs:
            program.clear_cache()


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
    dependence: tuple  # ((leaf mask, flops), ...): the flops of fn's operations that depend on exactly those leaves
    reverse: bool  # JAX can reverse-differentiate fn
    jvp: bool  # JAX can forward-differentiate fn
    notes: tuple[str, ...]
    inner64: Any  # the lowest float precision inside fn with float64 inputs, a final cast of the output aside
    inner_user: Any  # the same at the parameters' own dtypes
    grad64: tuple = ()  # per leaf, the lowest float precision its float64 gradient is computed through (() unknown)
    noise64: tuple = ()  # per leaf, the lowest float precision of what fn computes from it (() unknown)
    hand_inner64: tuple = ()  # per leaf, (the lowest precision hand computes it in, final casts aside; the lowest
    # those casts round it to; the lowest of what it computes without the parameters), as _precisions reads them
    # (() unknown)
    grad64_const: tuple = ()  # per leaf, the lowest precision of the values without the parameters (data cast to
    # bfloat16, a mask's scale) its float64 gradient is computed through (() unknown)
    draws64: bool = False  # fn draws random numbers (jax.random) of other widths in float64 than at the parameters'
    # own dtypes: the float64 check evaluates another function (another dropout mask)
    modes_differ: bool = True  # fn meets a derivative rule that is not JAX's own: forward mode is compared with
    # reverse mode (see _modes_may_differ)


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
    closed_user, out_raw = jax.make_jaxpr(functools.partial(_traceable_raw, bound, spec), return_shape=True)(
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
                e.add_note("funcgrad: check_grad traced hand(params, *args) (as jax.jit does, at the parameters' shapes "
                           "and dtypes), and hand failed there")
                raise
            hand_eager = _first_line(e)
    notes = []
    with _x64(True):
        theta_s = jax.ShapeDtypeStruct((layout.n,), jnp.float64)
        keep = _n_consts(spec)
        dyn_s = [jax.ShapeDtypeStruct(d.shape, _dtype64(d.dtype) if i < len(dyn) - keep else d.dtype)
                 for i, d in enumerate(dyn)]

        def f(th, d):
            return bound.value(layout.unravel(th), *_join_args(d, spec))

        closed = _trace_leaves64(bound, layout, spec, dyn_s)
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
            rules = _uses(closed.jaxpr, lambda e: e.primitive.name in _CUSTOM)
            audit = ("; fn calls jax.custom_vjp/custom_jvp rules, whose derivative may be what fails: "
                     "verify.audit(fn, params, *args) checks each rule on its own and names the one that fails")
            raise ValueError(
                f"check_grad: JAX can differentiate fn neither in reverse mode ({why_rev}) nor in forward mode "
                f"({why_fwd}); no autodiff gradient to check"
                + (" or to compare the hand formula with" if bound.hand is not None else "") + (audit if rules else ""))
        if not reverse:
            notes.append(f"reverse mode is unavailable for fn ({why_rev}); autodiff's gradient comes from forward "
                         f"mode (jvp), one basis vector at a time ({layout.n} evaluations)")
        elif not jvp:
            notes.append(f"forward mode (jvp) is unavailable for fn ({why_fwd.split(':')[0]}"
                         + (", a jax.custom_vjp rule" if "custom_vjp" in why_fwd else "") + "): reverse mode only")
        hand64: tuple = ()
        hand_inner: tuple = ()
        if bound.hand is not None and hand_eager is None:
            closed_h, h = jax.make_jaxpr(lambda th, d: bound.grad(layout.unravel(th), *_join_args(d, spec)),
                                         return_shape=True)(theta_s, dyn_s)
            hand64 = tuple(leaf.dtype for leaf in h)
            hand_inner = tuple(_precisions(closed_h.jaxpr, 1, casts=True))
        # (custom rules' backward passes, and callbacks, are not in fn's own jaxpr)
        opaque = _uses(closed.jaxpr, _opaque)
        if opaque:
            notes.append("fn calls a Python callback or an external kernel, whose arithmetic cannot be read: "
                         f"finite differences through it are assumed to carry {_OPAQUE}'s rounding")
        hidden = opaque or _uses_primitive(closed.jaxpr, "custom_vjp") or _uses_primitive(closed.jaxpr, "custom_jvp")
        gp = _gradient_precisions(bound, layout, spec, dyn_s) if (inner != jnp.float64 or hidden) and reverse else ()
    return _Facts(out_raw, out, hand_dtypes, hand_eager, getattr(out64, "dtype", None), hand64,
                  max(_jaxpr_flops(closed.jaxpr), 1.0), _dependence(closed.jaxpr, len(layout.shapes)), reverse,
                  jvp, tuple(notes), inner,
                  _lowest_float(closed_user.jaxpr), tuple(c for c, _ in gp),
                  _noise_precisions(closed.jaxpr, len(layout.shapes)), hand_inner, tuple(k for _, k in gp),
                  _random_widths(closed.jaxpr) != _random_widths(closed_user.jaxpr), _modes_may_differ(closed.jaxpr))


def _random_widths(jaxpr: Any) -> list:
    """The bit widths and shapes of the random bits a jaxpr draws (sub-computations included), in order: a
    jax.random draw at the default float dtype (jax.random.bernoulli(key, 0.5, shape), a Flax dropout) draws 64-bit
    words under x64, so the float64 trace of such a function draws other numbers than the function at float32."""
    out: list = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "random_bits":
            out.append((eqn.params.get("bit_width"), tuple(eqn.params.get("shape", ()))))
        for sub in _sub_jaxprs(eqn):
            out += _random_widths(sub)
    return out


def _gradient_precisions(bound: _Bound, layout: _Layout, spec: tuple, dyn_s: list) -> tuple:
    """Per leaf, (the lowest float precision its float64 gradient (reverse mode) is computed through, the lowest
    of the values without the parameters among them: see :func:`_precisions`): a leaf whose gradient never meets
    the bfloat16 part of fn keeps float64 tolerances. () where that cannot be traced."""
    try:
        closed = jax.make_jaxpr(jax.grad(lambda ls, d: bound.value(jax.tree_util.tree_unflatten(layout.treedef, ls),
                                                                   *_join_args(d, spec))))(
            [jax.ShapeDtypeStruct(shape, jnp.float64) for shape in layout.shapes], dyn_s)
    except Exception:  # noqa: BLE001 - then every leaf's tolerance follows the lowest precision in fn
        return ()
    return tuple((_lower(c, r), k) for c, r, k in _precisions(closed.jaxpr, len(layout.shapes)))


def _measured_const(bound: _Bound, layout: _Layout, spec: tuple, dyn: list, static: tuple) -> tuple:
    """Per leaf, the rounding (an eps) that the values without the parameters (data, masks, scales) meet on the way
    of its float64 gradient: 0 where every rounding among them is exact at their values, else ``static``'s eps (the
    lowest precision among them, see :func:`_precisions`). A cast to bfloat16 of values it holds exactly
    (``jnp.arange(16.).astype(bfloat16)``, integer data, a 0/1 mask) rounds nothing, and a hand that uses them
    unrounded computes the same gradient: no allowance is due there. Where something is rounded, what the rounding
    does to the gradient is not bounded by the rounding of each value (``x.astype(bfloat16) - 256`` cancels: a
    rounding of 0.2% moves the result by 100%), so the allowance stays the dtype's."""
    with jax.enable_x64(True):
        try:
            args = [x.astype(_dtype64(x.dtype)) if i < len(dyn) - _n_consts(spec) and not jnp.issubdtype(
                x.dtype, jax.dtypes.prng_key) else x for i, x in enumerate(dyn)]
            closed = jax.make_jaxpr(jax.grad(lambda ls, d: bound.value(
                jax.tree_util.tree_unflatten(layout.treedef, ls), *_join_args(d, spec))))(
                [jax.ShapeDtypeStruct(shape, jnp.float64) for shape in layout.shapes], args)
            measured = _const_rounding(closed, len(layout.shapes), jax.tree_util.tree_leaves(args))
        except Exception:  # noqa: BLE001 - not evaluable here: the static precisions stand
            return tuple(float(jnp.finfo(d).eps) for d in static)
    return tuple(float(jnp.finfo(d).eps) if m > 0 else 0.0 for d, m in zip(static, measured, strict=True))


def _const_rounding(closed: Any, n_params: int, args: Sequence[Any]) -> list[float]:
    """For each output of ``closed`` (traced with the parameters as its first ``n_params`` inputs and ``args`` the
    rest): the rounding, as an eps, of the values without the parameters it is computed from. Those values are
    evaluated (an equation at a time, calls followed inside); each operation on them that rounds to a precision
    below float64 adds twice its largest relative change, measured against the same operation in float64
    (at most its dtype's eps; that eps where it cannot be measured: a loop, a primitive refusing float64)."""
    f64 = jnp.dtype(jnp.float64)

    def own(eqn: Any, ins: list, outs: list) -> list[float]:
        """Each output's own rounding: twice its largest relative change against float64."""
        rounds = eqn.primitive.name == "reduce_precision"  # (a cast in place: its dtype stays)
        lows = [i for i, v in enumerate(eqn.outvars) if _is_float(v) and (v.aval.dtype != f64 or rounds)]
        if not lows or eqn.primitive.name in _MOVES:
            return [0.0] * len(outs)
        if eqn.primitive.name == "convert_element_type" or rounds:
            wide = [np.asarray(ins[0], np.float64)]
        elif _sub_jaxprs(eqn):
            inner = float(jnp.finfo(_lower(_eqn_inner(eqn, opaque=False), f64)).eps)
            return [max(inner, float(jnp.finfo(v.aval.dtype).eps)) if i in lows else 0.0
                    for i, v in enumerate(eqn.outvars)]
        else:
            try:
                wide = [np.asarray(x, np.float64) for x in _bind(eqn, [
                    jnp.asarray(x, f64) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x for x in ins],
                    _widened_params(eqn.params))]
            except Exception:  # noqa: BLE001 - not measurable: its dtype's eps
                return [float(jnp.finfo(v.aval.dtype).eps) if i in lows else 0.0 for i, v in enumerate(eqn.outvars)]
        out = []
        for i, (v, y) in enumerate(zip(eqn.outvars, outs, strict=True)):
            eps = float(jnp.finfo(_kept_by(eqn.params["mantissa_bits"]) if rounds else v.aval.dtype).eps) \
                if i in lows else 0.0
            if i not in lows or np.shape(wide[i]) != np.shape(y):
                out.append(eps)
                continue
            x, got = wide[i], np.asarray(y, np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = np.abs(got - x) / np.abs(x)
            rel = rel[np.isfinite(x) & (x != 0)]
            out.append(min(eps, 2 * float(np.max(rel, initial=0.0)) if np.all(np.isfinite(rel)) else eps))
        return out

    def walk(jx: Any, consts: Sequence[Any], ins: Sequence[tuple]) -> list[tuple]:
        env: dict = {}

        def get(v: Any) -> tuple:  # (depends on the parameters, rounding, value or None)
            return (False, 0.0, v.val) if isinstance(v, Literal) else env.get(id(v), (False, 0.0, None))

        env.update((id(v), (False, 0.0, x)) for v, x in zip(jx.constvars, consts, strict=True))
        env.update((id(v), x) for v, x in zip(jx.invars, ins, strict=True))
        for eqn in jx.eqns:
            xs = [get(v) for v in eqn.invars]
            r = max((x[1] for x in xs), default=0.0)
            call = _call_closed(eqn)
            if call is not None:
                outs = walk(call.jaxpr, call.consts, xs)
            elif any(x[0] for x in xs) or any(x[2] is None for x in xs):
                dep = any(x[0] for x in xs)
                if dep and _sub_jaxprs(eqn):  # (a loop or a branch: what it rounds inside is not evaluated; its
                    # precision stands, as the static walk may read it)
                    low = _eqn_inner(eqn, opaque=False)
                    r += float(jnp.finfo(low).eps) if low != f64 else 0.0
                outs = [(dep, r if _is_float(v) else 0.0, None) for v in eqn.outvars]
                if not dep:  # (a value that could not be evaluated: its precision, as the static walk reads it)
                    low = _lower(_eqn_inner(eqn, opaque=False), functools.reduce(
                        _lower, [v.aval.dtype for v in eqn.outvars if _is_float(v)], f64))
                    extra = float(jnp.finfo(low).eps) if low != f64 else 0.0
                    outs = [(False, x[1] + extra if _is_float(v) else 0.0, None)
                            for v, x in zip(eqn.outvars, outs, strict=True)]
            else:
                vals = _bind(eqn, [x[2] for x in xs])
                mine = own(eqn, [x[2] for x in xs], vals)
                outs = [(False, r + m if _is_float(v) else 0.0, y)
                        for v, m, y in zip(eqn.outvars, mine, vals, strict=True)]
            env.update((id(v), x) for v, x in zip(eqn.outvars, outs, strict=True))
        return [get(v) for v in jx.outvars]

    top = [(True, 0.0, None)] * n_params + [(False, 0.0, x) for x in args]
    return [x[1] for x in walk(closed.jaxpr, closed.consts, top)]


def _is_float(v: Any) -> bool:
    dt = getattr(getattr(v, "aval", None), "dtype", None)
    return dt is not None and jnp.issubdtype(dt, jnp.floating)


def _call_closed(eqn: Any) -> Any:
    """The closed jaxpr an equation calls with its own inputs and outputs (jit, custom rules, remat), or None."""
    subs = _sub_jaxprs(eqn)
    if not _is_call(eqn, subs):
        return None
    for v in eqn.params.values():
        if getattr(v, "jaxpr", None) is subs[0]:
            return v
    return ClosedJaxpr(subs[0], ())


_DTYPE_PARAMS = frozenset({"new_dtype", "preferred_element_type", "dtype"})  # (a floating one is widened)


def _widened_params(params: dict) -> dict:
    """An equation's parameters with the floating dtypes it computes or casts to made float64."""
    return {k: (jnp.dtype(jnp.float64) if k in _DTYPE_PARAMS and v is not None and jnp.issubdtype(v, jnp.floating)
                else v) for k, v in params.items()}


def _bind(eqn: Any, invals: Sequence[Any], params: dict | None = None) -> list:
    """Evaluates one equation on concrete (or traced) values, as ``jax.core.eval_jaxpr`` does (with ``params`` in
    place of the equation's own, where given). On concrete values, an equation holding a Pallas call runs compiled
    (see :func:`_staged`)."""
    run = _staged(eqn) if params is None else None
    if run is not None and not any(isinstance(x, jax.core.Tracer) for x in invals):
        return run(*invals)
    return _bind_now(eqn, invals, params)


def _bind_now(eqn: Any, invals: Sequence[Any], params: dict | None = None) -> list:
    bind_params = eqn.primitive.get_bind_params(eqn.params if params is None else params)
    if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    else:
        out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


# Equations holding a Pallas call, compiled once each (by identity; the equation is kept with its program, up to
# this many): JAX compiles a Pallas call evaluated op by op afresh at every evaluation (a jit made inside its
# implementation), about half a second each, which an audit walking a scan of Pallas rules paid per call and check.
_STAGED_MAX = 256
_STAGED: dict[int, tuple[Any, Callable | None]] = {}


def _staged(eqn: Any) -> Callable | None:
    """``eqn`` as a jitted function of its inputs (compiled once per equation and input types) where it is, or holds
    in a sub-computation, a Pallas call; else None (evaluated op by op)."""
    got = _STAGED.get(id(eqn))
    if got is not None and got[0] is eqn:
        return got[1]

    def inside(e: Any) -> bool:
        if e.primitive.name == "pallas_call":
            return True
        for value in e.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                eqns = getattr(getattr(v, "jaxpr", v), "eqns", None)
                if eqns is not None and any(inside(x) for x in eqns):
                    return True
        return False

    run = jax.jit(lambda *xs: _bind_now(eqn, xs)) if inside(eqn) else None
    if len(_STAGED) >= _STAGED_MAX:
        _STAGED.clear()
    _STAGED[id(eqn)] = (eqn, run)
    return run


def _trace_leaves64(bound: _Bound, layout: _Layout, spec: tuple, dyn_s: list) -> Any:
    """fn's float64 trace on the leaves themselves (so that what depends on which leaf can be read off the
    jaxpr); a clear error when fn, traced at its own dtypes already, fails in float64."""
    try:
        return jax.make_jaxpr(lambda ls, d: bound.value(jax.tree_util.tree_unflatten(layout.treedef, ls),
                                                        *_join_args(d, spec)))(
            [jax.ShapeDtypeStruct(shape, jnp.float64) for shape in layout.shapes], dyn_s)
    except Exception as e:  # noqa: BLE001 - any failure here is the float64 evaluation's
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()][:2]
        raise _UserTypeError(
            "check_grad: fn works at the parameters' own dtypes but fails when evaluated in float64, which "
            "check_grad does for its reference values (parameters and float arguments converted to float64): "
            f"{type(e).__name__}: {' '.join(lines) or '(no message)'} -- a function that fixes a dtype of its own (a "
            "loop carry made with jnp.zeros((), jnp.float32), say) must follow its inputs' dtype instead "
            "(jnp.zeros((), x.dtype))"
            + ("; Flax's nn.RNN and nnx.RNN make their carry so (the cell's initialize_carry): pass them "
               "initial_carry=jnp.zeros(carry_shape, x.dtype)" if "carry" in str(e) else "")
            + ("; or fn closes over a NumPy float64 array (a dropout mask drawn with np.random.binomial) that JAX, "
               "having converted it to float32 once in this process, may keep converting so: make it a JAX array of "
               "the dtype fn computes in (jnp.asarray(mask, jnp.float32)) or pass it as an argument"
               if "same dtypes" in str(e) else "")) from None


def _traceable_raw(bound: _Bound, spec: tuple, p: Any, d: Any) -> Any:
    """fn's output, with the non-arrays of aux (a string tag, a label: aux is not checked) left out, so that it
    can be traced."""
    out = bound.raw(p, *_join_args(d, spec))
    if bound.has_aux and isinstance(out, (tuple, list)) and len(out) == 2:
        array = (jax.Array, np.ndarray, np.generic, int, float, complex, bool)
        out = (out[0], jax.tree_util.tree_map(lambda x: x if isinstance(x, array) or hasattr(x, "aval") else None,
                                              out[1]))
    return out


def _lowest_float(jaxpr: Any, top: bool = True, opaque: bool = True) -> Any:
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
        final_cast = eqn.primitive.name in ("convert_element_type", "reduce_precision") and any(
            id(v) in outs for v in eqn.outvars)
        for v in [] if final_cast else eqn.outvars:
            dt = getattr(getattr(v, "aval", None), "dtype", None)
            if dt is not None and jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).eps > jnp.finfo(lowest).eps:
                lowest = jnp.dtype(dt)
        if not final_cast:
            lowest = _lower(lowest, _rounds_to(eqn))
        lowest = _lower(lowest, _eqn_inner(eqn, opaque))
    return lowest


def _rounds_to(eqn: Any) -> Any:
    """The precision an equation rounds its float outputs to beyond their dtype: lax.reduce_precision (bfloat16
    emulated in float32, say) keeps the mantissa of a narrower dtype; float64 for everything else."""
    if eqn.primitive.name == "reduce_precision":
        return _kept_by(eqn.params["mantissa_bits"])
    return jnp.dtype(jnp.float64)


# What an opaque computation (a Python callback, an external kernel) is assumed to round like, for finite
# differences' noise: its inside cannot be read, and float32 is what such kernels use.
_OPAQUE = jnp.dtype(jnp.float32)


def _opaque(eqn: Any) -> bool:
    """A computation whose arithmetic cannot be read, with results (a debug callback, which has none, is not)."""
    name = eqn.primitive.name
    return bool(eqn.outvars) and ("callback" in name or name in ("ffi_call", "custom_call"))


def _eqn_inner(eqn: Any, opaque: bool = True) -> Any:
    """The lowest float precision an equation computes in besides its outputs: its sub-computations', and
    (``opaque``) float32 for an opaque one. Finite differences' noise assumes that; analytic tolerances take an
    opaque computation at its results' dtype (a float64 NumPy hand behind a callback is judged at float64)."""
    lowest = _OPAQUE if opaque and _opaque(eqn) else jnp.dtype(jnp.float64)
    for sub in _sub_jaxprs(eqn):
        lowest = _lower(lowest, _lowest_float(sub, False, opaque))
    return lowest


# Operations that move or copy values without rounding them: a cast before them still only rounds the result.
_MOVES = frozenset({"reshape", "squeeze", "expand_dims", "transpose", "broadcast_in_dim", "copy", "copy_p", "slice",
                    "dynamic_slice", "dynamic_update_slice", "gather", "concatenate", "rev", "pad", "select_n", "neg"})


def _lower(a: Any, b: Any) -> Any:
    """The lower of two float precisions."""
    if a == b:
        return a
    return a if jnp.finfo(a).eps >= jnp.finfo(b).eps else b


def _kept_by(mantissa_bits: int) -> Any:
    """The widest float dtype whose mantissa is no finer than ``mantissa_bits`` (lax.reduce_precision's rounding)."""
    for dt in (jnp.float64, jnp.float32, jnp.float16, jnp.bfloat16):
        if jnp.finfo(dt).nmant <= mantissa_bits:
            return jnp.dtype(dt)
    return jnp.dtype(getattr(jnp, "float8_e4m3fn", jnp.bfloat16))


def _scan_layout(p: Any, n_in: int) -> tuple[int, int] | None:
    """(number of constants, number of carries) of a scan equation's flat inputs, or None when not understood.

    JAX up to 0.11 states them as ``num_consts``/``num_carry``; JAX 0.12 as ``ft_in``, a flat tree of the three
    groups (consts, carry, xs) whose ``unpack()`` gives each group and whose ``len`` is its number of leaves.
    """
    if "num_consts" in p and "num_carry" in p:
        return int(p["num_consts"]), int(p["num_carry"])
    ft = p.get("ft_in")
    try:
        groups = ft.unpack() if hasattr(ft, "unpack") else tuple(ft)
        sizes = [len(g) for g in groups]
    except (TypeError, AttributeError, AssertionError):
        return None
    if len(sizes) != 3 or sum(sizes) != n_in:
        return None
    return sizes[0], sizes[1]


def _reading(eqn: Any, ins: list, casts: bool) -> list[tuple[Any, Any, Any, bool]]:
    """The (comp, cast, const, depends) readings of one equation's outputs from its inputs' (see
    :func:`_precisions`): an equation read as a whole, its sub-computations' lowest precision included."""
    f64 = jnp.dtype(jnp.float64)
    name = eqn.primitive.name
    dep = any(x[3] for x in ins)
    comp = functools.reduce(_lower, [x[0] for x in ins], f64)
    cast = functools.reduce(_lower, [x[1] for x in ins if x[3] == dep], f64)
    # (a cast value without the parameters, ``casts``, meeting one with them: rounded inside, the third
    # place)
    const = functools.reduce(_lower, [x[2] for x in ins] + [x[1] for x in ins if x[3] != dep], f64)
    kept = casts and not dep and (name in _MOVES or name in ("convert_element_type", "reduce_precision"))
    if kept:  # (a cast of such a value, or a move after one: its rounding stays a cast's)
        comp = f64
    elif not dep:  # (all of it the definition's: its rounding is the third place's)
        comp, cast = f64, f64
        const = functools.reduce(_lower, [c for x in ins for c in x[:3]], const)
        const = _lower(const, _eqn_inner(eqn, opaque=False))
    elif name not in _MOVES and name != "convert_element_type":
        comp, cast = _lower(comp, cast), f64
    if dep:
        comp = _lower(comp, _eqn_inner(eqn, opaque=False))
    outs = []
    for v in eqn.outvars:
        dt = getattr(getattr(v, "aval", None), "dtype", None)
        if dt is None or not jnp.issubdtype(dt, jnp.floating):
            outs.append((f64, f64, f64, dep))  # (a mask or an index: exact)
        elif kept and name == "convert_element_type":
            outs.append((f64, _lower(cast, dt), const, False))
        elif kept and name == "reduce_precision":
            outs.append((f64, _lower(cast, _kept_by(eqn.params["mantissa_bits"])), const, False))
        elif kept:
            outs.append((f64, cast, const, False))
        elif not dep:  # (lax.reduce_precision of data rounds it as a cast to that precision would)
            kept_dt = _kept_by(eqn.params["mantissa_bits"]) if name == "reduce_precision" else dt
            outs.append((f64, f64, _lower(_lower(const, dt), kept_dt), False))
        elif name == "convert_element_type":
            outs.append((comp, _lower(cast, dt), const, dep))
        elif name == "reduce_precision":  # a cast in place: to the widest dtype no finer than it keeps
            outs.append((comp, _lower(cast, _kept_by(eqn.params["mantissa_bits"])), const, dep))
        elif name in _MOVES:  # (its values are its inputs')
            outs.append((comp, cast, const, dep))
        else:
            outs.append((_lower(comp, dt), cast, const, dep))
    return outs


def _precisions(jaxpr: Any, n_params: int | None = None, casts: bool = False) -> list[tuple[Any, Any, Any]]:
    """For each output of ``jaxpr``: (the lowest float precision of the values it is computed from, final casts
    aside; the lowest precision those final casts round it to; the lowest precision of the values it is computed
    from that do not depend on the parameters). ``g.astype(bfloat16)`` of a float64 ``g`` is (float64, bfloat16,
    float64): only rounded, by half an ulp at each element; ``(g.astype(bfloat16) * 2)`` is (bfloat16, float64,
    float64). Calls (jit, custom rules) are followed inside; any other equation with a sub-computation (loops,
    branches) counts as a whole, each output depending on all its inputs and everything the sub-computation
    computes.

    The parameters are the first ``n_params`` inputs (all of them when None). A value that does not depend on them
    (data cast to bfloat16, a dropout mask drawn in bfloat16, a scale) is part of fn's definition, the same for
    autodiff, hand and finite differences: its precision counts only in the third place (a hand may have computed
    it unrounded). Boolean and integer values (masks, indices) carry no rounding: a comparison of bfloat16 values
    moves a kink, which the checks judge as such.

    ``casts`` (a hand's trace): a final cast of such a value counts in the second place, as a dependent one's does.
    A hand of ``sum(w * x)`` returning ``x.astype(bfloat16)`` rounds its result by half an ulp at each element; as a
    value rounded inside (the third place) it earned twice bfloat16's eps of the leaf's largest gradient, which
    passed a hand 2.5% off, or a small element's wrong sign."""
    f64 = jnp.dtype(jnp.float64)
    exact = (f64, f64, f64, False)

    def walk(jx: Any, known: dict) -> list[tuple[Any, Any, Any, bool]]:
        def get(v: Any) -> tuple[Any, Any, Any, bool]:
            return known.get(id(v), exact)  # (a literal, or a constant: exact, and no parameter's)

        for eqn in jx.eqns:
            ins = [get(v) for v in eqn.invars]
            subs = _sub_jaxprs(eqn)
            looped = _control_flow(eqn, ins, walk)
            if looped is not None:
                outs = looped
            elif _is_call(eqn, subs):
                outs = walk(subs[0], {id(v): x for v, x in zip(subs[0].invars, ins, strict=True)})
            else:
                outs = _reading(eqn, ins, casts)
            known.update((id(v), x) for v, x in zip(eqn.outvars, outs, strict=True))
        return [get(v) for v in jx.outvars]

    n = len(jaxpr.invars) if n_params is None else n_params
    top = {id(v): (f64, f64, f64, i < n) for i, v in enumerate(jaxpr.invars)}
    return [x[:3] for x in walk(jaxpr, top)]


def _merged(a: tuple, b: tuple) -> tuple:
    """Two (comp, cast, const, depends) readings of one value (a loop's carry at two iterations, a branch's
    output in two branches): the lower precisions, and dependence on the parameters if either has it."""
    return (_lower(a[0], b[0]), _lower(a[1], b[1]), _lower(a[2], b[2]), a[3] or b[3])


def _control_flow(eqn: Any, ins: list, walk: Callable, merged: Callable = _merged) -> list | None:
    """A scan's, a while loop's or a cond's outputs read through its body (see :func:`_precisions`): the carry
    until its reading no longer changes (a few rounds: the readings only go down), each branch's outputs merged.
    None for any other equation, or one whose layout is not understood (then read as a whole). ``merged``: two
    readings of one value as one (a reading that only goes down, or only grows, as the carry goes round)."""
    name, p = eqn.primitive.name, eqn.params

    def through(body: Any, consts: list, carry: list, rest: list, n_out_carry: int) -> list:
        for _ in range(8):
            outs = walk(body, {id(v): x for v, x in zip(body.invars, [*consts, *carry, *rest], strict=True)})
            new = [merged(c, o) for c, o in zip(carry, outs[:n_out_carry], strict=True)]
            if new == carry:
                return [*carry, *outs[n_out_carry:]]
            carry = new
        return None  # type: ignore[return-value]

    try:
        if name == "scan":
            layout = _scan_layout(p, len(ins))
            if layout is None:
                return None
            n_c, n_carry = layout
            return through(p["jaxpr"].jaxpr, ins[:n_c], list(ins[n_c:n_c + n_carry]), ins[n_c + n_carry:], n_carry)
        if name == "while":
            n_cc, n_bc = int(p["cond_nconsts"]), int(p["body_nconsts"])
            return through(p["body_jaxpr"].jaxpr, ins[n_cc:n_cc + n_bc], list(ins[n_cc + n_bc:]), [],
                           len(ins) - n_cc - n_bc)
        if name == "cond":
            outs = [walk(b.jaxpr, {id(v): x for v, x in zip(b.jaxpr.invars, ins[1:], strict=True)})
                    for b in p["branches"]]
            return [functools.reduce(merged, group) for group in zip(*outs, strict=True)]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return None


# The primitives that call a user-definable custom derivative rule, and the rule's kind.
_CUSTOM = {"custom_vjp_call": "custom_vjp", "custom_vjp_call_jaxpr": "custom_vjp", "custom_jvp_call": "custom_jvp"}


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


def _is_call(eqn: Any, subs: list) -> bool:
    """Whether an equation calls its one sub-computation with its own inputs and outputs (jit, custom rules,
    remat), so that a walk can follow values inside; loops and branches are not calls."""
    return (len(subs) == 1 and len(subs[0].invars) == len(eqn.invars) and len(subs[0].outvars) == len(eqn.outvars)
            and eqn.primitive.name not in ("scan", "while", "cond"))


def _uses(jaxpr: Any, test: Callable[[Any], bool]) -> bool:
    """Whether an equation that passes ``test`` occurs in the jaxpr, sub-computations included."""
    return any(test(eqn) or any(_uses(j, test) for j in _sub_jaxprs(eqn)) for eqn in jaxpr.eqns)


def _uses_primitive(jaxpr: Any, fragment: str) -> bool:
    """Whether a primitive whose name contains ``fragment`` occurs in the jaxpr, sub-computations included."""
    return _uses(jaxpr, lambda eqn: fragment in eqn.primitive.name)


def _modes_may_differ(jaxpr: Any) -> bool:
    """Whether fn's forward and reverse mode may differ: whether it meets a derivative rule that is not JAX's own
    (a ``custom_jvp`` of the user's or a framework's, a custom linear solve's ``transpose_solve``, a custom root's
    ``tangent_solve``, a custom transpose, a primitive defined outside JAX), sub-computations included. JAX's own
    rules are linear in the tangents, and reverse mode is the transpose of forward mode's linear map: made of them
    alone, the two agree by construction. A rule affine in its tangent (its constant dropped by the transpose) or a
    transpose that is not the forward rule's makes them differ."""
    from funcgrad.verify._audit import _CUSTOM_ROOT, _jax_own, _source, _users_solves  # noqa: PLC0415 - _audit imports this module

    def own(eqn: Any) -> bool:
        name = eqn.primitive.name
        if name == "custom_jvp_call":  # (lax.custom_root's rule is JAX's, made of the user's tangent_solve)
            return not _jax_own(eqn) or (_source(eqn.params.get("call_jaxpr")) or ("",))[0] == _CUSTOM_ROOT
        if name == "custom_linear_solve":  # (jnp.linalg.solve's is JAX's own)
            return bool(_users_solves(eqn))
        return ("custom" in name or name in ("linear_call", "call_hi_primitive")
                or id(eqn.primitive) not in _jax_primitives(len(sys.modules)))

    return _uses(jaxpr, own)


@functools.lru_cache(maxsize=4)
def _jax_primitives(n_modules: int) -> frozenset[int]:  # noqa: ARG001 - a key only: modules loaded since, looked at
    """The primitives JAX defines (their ids): those held by its modules, and jax.extend's. A primitive of the user's
    (``jax.extend.core.Primitive`` with rules of their own) is not among them; nor is one JAX makes where no module
    holds it, whose forward and reverse mode are then compared (the cost of a comparison, not a wrong verdict)."""
    found: set[int] = set()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "jax" or name.startswith(("jax.", "jaxlib."))):
            continue
        with contextlib.suppress(Exception):
            found.update(id(v) for v in vars(module).values() if isinstance(v, Primitive))
    return frozenset(found)


def _vectorise() -> bool:
    """Evaluate finite-difference items many at a time (vmap) on accelerators, one at a time on CPU."""
    return jax.default_backend() != "cpu"


def _make_plan(mode, layout, flops, has_hand, reverse=True, jvp=True, dependence: tuple = (),
               repeated: bool = True) -> tuple[_Plan, np.ndarray]:
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
    scales = 4 if n_items * 16 * flops <= _SCALES_FLOP_BUDGET else 1
    # Accelerators: many items at once (vmap). CPU: one at a time (see _eval_items).
    batch = max(1, min(256, _MEM_ELEMENTS // (6 * max(layout.n, 1)))) if _vectorise() else 1
    # Functions of a few leaves: finite differences in runs over some of them (each run skips what does not
    # depend on its leaves, the layers before them, say), where that saves more than compiling the runs costs.
    # Runs sharing one program compile longer than one run (seconds for a deep model) and save less than that
    # per check: they are planned for a function checked before in this process (``repeated``); runs that are
    # programs of their own (large parameters) are charged their compilation and planned at once.
    separate = layout.n >= _SEPARATE_ELEMENTS
    pad_min = 8 if len(_OFFSETS) * 8 * flops <= _PAD_FLOPS else 1
    plan = _Plan(tuple(exact), n_proj, _K_MAG, scales, reverse and jvp, batch, reverse, (), pad_min, separate)
    if dependence and 1 < len(sizes) <= _GROUP_LEAVES and (repeated or separate):
        per_leaf = np.bincount(_item_leaves(plan, layout), minlength=len(sizes)) * scales
        groups = _runs(dependence, tuple(int(k) for k in per_leaf), (int(reverse and jvp),) * len(sizes), len(sizes),
                       _PROGRAM_FLOPS if separate else _RUN_FLOPS)
        if len(groups) > 1:
            plan = dataclasses.replace(plan, groups=groups)
    return plan, exact_idx


def _jaxpr_flops(jaxpr: Any, weighted: bool = False) -> float:
    """A rough count of one evaluation's flops from its jaxpr: 2·m·n·k per matrix product, one per output
    element for everything else, sub-computations included (a loop's body counted once per trip). ``weighted``:
    a transcendental function (exp, tanh, ...) counts :data:`_TRANSCENDENTAL` per element, closer to its time."""
    return sum(_eqn_flops(eqn, weighted) for eqn in jaxpr.eqns)


# What an element of a transcendental function costs, in flops: float64 tanh on a CPU takes about as long per
# element as a matrix product does per output of an 8-deep contraction (16 flops).
_TRANSCENDENTAL = 16.0
_TRANSCENDENTALS = frozenset({"exp", "exp2", "expm1", "log", "log1p", "tanh", "logistic", "sin", "cos", "tan", "asin",
                              "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "erf", "erfc",
                              "erf_inv", "lgamma", "digamma", "pow", "rsqrt", "sqrt", "cbrt"})


def _eqn_flops(eqn: Any, weighted: bool = False) -> float:
    """One equation's share of :func:`_jaxpr_flops`."""
    out = sum(math.prod(getattr(v.aval, "shape", ())) for v in eqn.outvars)
    if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total = 2.0 * out * math.prod(lhs[d] for d in lc)
    elif weighted and eqn.primitive.name in _TRANSCENDENTALS:
        total = _TRANSCENDENTAL * out
    else:
        total = float(out)
    trips = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    return total + sum(trips * _jaxpr_flops(sub, weighted) for sub in _sub_jaxprs(eqn))


def _dependence(jaxpr: Any, n_leaves: int) -> tuple:
    """Which of fn's (weighted) flops depend on which leaves (its first ``n_leaves`` inputs): ((mask, flops), ...),
    a bit per leaf. Calls (jit, custom rules) are followed inside; any other equation with a sub-computation (loops,
    branches) counts as a whole, each output depending on all its inputs."""
    costs: dict[int, float] = {}

    def walk(jx: Any, masks: dict) -> None:
        for eqn in jx.eqns:
            ins = [masks.get(id(v), 0) for v in eqn.invars]
            subs = _sub_jaxprs(eqn)
            if _is_call(eqn, subs):
                inner = {id(v): m for v, m in zip(subs[0].invars, ins, strict=True)}
                walk(subs[0], inner)
                outs = [inner.get(id(v), 0) for v in subs[0].outvars]
            else:
                m = functools.reduce(lambda x, y: x | y, ins, 0)
                costs[m] = costs.get(m, 0.0) + _eqn_flops(eqn, weighted=True)
                outs = [m] * len(eqn.outvars)
            masks.update((id(v), m) for v, m in zip(eqn.outvars, outs, strict=True))

    walk(jaxpr, {id(v): 1 << i for i, v in enumerate(jaxpr.invars[:n_leaves])})
    return tuple(sorted(costs.items()))


def _noise_precisions(jaxpr: Any, n_leaves: int) -> tuple:
    """Per leaf (fn's first ``n_leaves`` inputs), the lowest float precision among the values fn computes from it
    (on the way to its output): what rounds fn's value when only that leaf moves. What does not depend on the leaf
    is computed bit for bit alike at every perturbation of it, so its rounding cancels in a difference. Calls are
    followed inside, and scans, while loops and conds read through (see :func:`_control_flow`: data cast to
    bfloat16 inside a scan's body is no leaf's); any other equation with a sub-computation counts as a whole."""
    f64 = jnp.dtype(jnp.float64)
    by_mask: dict[int, Any] = {}  # the lowest precision computed from exactly the leaves a mask names

    def lower_where(mask: int, dt: Any) -> None:
        if mask and dt != f64:
            by_mask[mask] = _lower(by_mask.get(mask, f64), dt)

    def body(jx: Any, inner: dict) -> list:
        walk(jx, inner, lambda _: True)
        return [inner.get(id(v), 0) for v in jx.outvars]

    def walk(jx: Any, masks: dict, live: Callable[[Any], bool]) -> None:
        for eqn in jx.eqns:
            if not live(eqn):
                continue
            ins = [masks.get(id(v), 0) for v in eqn.invars]
            subs = _sub_jaxprs(eqn)
            looped = _control_flow(eqn, ins, body, lambda a, b: a | b)
            if looped is not None:
                outs = looped
            elif _is_call(eqn, subs):
                outs = body(subs[0], {id(v): m for v, m in zip(subs[0].invars, ins, strict=True)})
            else:
                m = functools.reduce(lambda x, y: x | y, ins, 0)
                for dt in _eqn_precisions(eqn):
                    lower_where(m, dt)
                outs = [m] * len(eqn.outvars)
            masks.update((id(v), m) for v, m in zip(eqn.outvars, outs, strict=True))

    needed, live = {id(v) for v in jaxpr.outvars}, set()
    for eqn in reversed(jaxpr.eqns):  # only what the output depends on: an aux output is not differentiated
        if any(id(v) in needed for v in eqn.outvars):
            live.add(id(eqn))
            needed.update(id(v) for v in eqn.invars)
    walk(jaxpr, {id(v): 1 << i for i, v in enumerate(jaxpr.invars[:n_leaves])}, lambda e: id(e) in live)
    lowest = [f64] * n_leaves
    for mask, dt in by_mask.items():
        for i in range(n_leaves):
            if mask >> i & 1:
                lowest[i] = _lower(lowest[i], dt)
    return tuple(lowest)


def _eqn_precisions(eqn: Any) -> list:
    """The float precisions an equation computes in: its float outputs' dtypes, what it rounds to, its inner one."""
    out = [dt for v in eqn.outvars if (dt := getattr(getattr(v, "aval", None), "dtype", None)) is not None
           and jnp.issubdtype(dt, jnp.floating)]
    return [*out, _rounds_to(eqn), _eqn_inner(eqn)]


@functools.lru_cache(maxsize=64)
def _runs(dependence: tuple, items: tuple[int, ...], jvps: tuple[int, ...], n: int,
          fixed: float = _RUN_FLOPS) -> tuple[tuple[int, ...], ...]:
    """The leaves (at most 64) grouped into runs of finite differences (see :func:`_eval_items`): a run over leaves
    S costs (4·its items + 2·its forward-mode checks)·U(S) flops, U(S) being what depends on some leaf of S, plus
    what depends on none (computed once per run) and a ``fixed`` cost (:data:`_RUN_FLOPS`, or
    :data:`_PROGRAM_FLOPS` for runs that are programs of their own). Greedily merges the pair of runs that saves the
    most, from a run per leaf with items, while a merge saves anything."""
    masks = np.array([m for m, _ in dependence], np.uint64)
    flops = np.array([c for _, c in dependence], np.float64)
    total = float(flops.sum())

    def cost(run: tuple[int, int, int]) -> float:
        bits, k, j = run
        u = float(flops[(masks & np.uint64(bits)) != 0].sum())
        return (len(_OFFSETS) * k + 2 * j) * u + (total - u) + fixed

    def merged(x: int, y: int) -> tuple[int, int, int]:
        return runs[x][0] | runs[y][0], runs[x][1] + runs[y][1], runs[x][2] + runs[y][2]

    runs = {i: (1 << i, items[i], jvps[i]) for i in range(n) if items[i]}  # id -> (leaf bits, items, jvps)
    own = {r: cost(v) for r, v in runs.items()}
    saved = {(x, y): own[x] + own[y] - cost(merged(x, y)) for x, y in itertools.combinations(sorted(runs), 2)}
    new = n
    while saved:
        (x, y), best = max(saved.items(), key=lambda kv: kv[1])
        if best <= 0:
            break
        runs[new] = merged(x, y)
        own[new] = cost(runs[new])
        del runs[x], runs[y]
        saved = {p: v for p, v in saved.items() if x not in p and y not in p}
        saved.update({(z, new): own[z] + own[new] - cost(merged(z, new)) for z in runs if z != new})
        new += 1
    return tuple(sorted(tuple(i for i in range(n) if bits >> i & 1) for bits, _, _ in runs.values()))
