"""Kink sides: autodiff's gradient at a point with each kink taking a side of its own.

Where several kinks meet on one coordinate (``relu(a)`` and ``relu(−a)`` both at 0, a CReLU; integer data putting
ReLUs of several samples at 0), JAX's choice at each kink (relu'(0) = 0, ½ at a tie of ``jnp.maximum``) adds up to a
value that no point nearby gives: moving the parameters moves ``a`` and ``−a`` together, so one of the two ReLUs
is always on. Such a value is still a sum of valid one-sided choices, one per kink. This module samples those sums:
fn is re-evaluated from its jaxpr with every kink's choice made by a comparison moved by a tiny random amount δ,
independently of the others:

- at an exact tie only (a value never moves): ``max(a, b)`` where ``a == b`` picks a random side (``min``
  likewise), ``|x|`` at ``x == 0`` a random sign, ``>``, ``≥``, ``<``, ``≤`` of values depending on the parameters
  a random answer where they are equal (``==`` stays as it is), and a max (min) over axes, or ``argmax``, one of
  the elements tied at the extreme;
- a max over ``lax.reduce_window`` windows, cumulative maxima and sorts get their inputs moved by δ, a unit of
  their precision (a near-tie within a few units may take either side there);
- JAX's and the frameworks' own custom rules (``jax.nn.relu``) are replaced by their primals, differentiated so;
- anything else not known to be smooth (the user's own rules, loops, branches, sorts) gets its inputs moved by δ,
  so that the kinks inside it take a side too: no kink is evaluated exactly at the point, where a rule's own
  choice (a relu'(0) of 5) would be sampled as if it were a side.

Each draw has its own bias (from −4 to 4, over the draws): a tie's random side is the first operand's (a
comparison's True, ``|x|``'s +) with probability Φ(bias), a tied maximum's the first element's more likely the
higher the bias, and δ is moved by that many of its spreads: the draws at either end put nearly every kink on one
side (every ReLU off, as JAX's relu'(0) = 0 does at all of them, or every one on; every tie to its first maximum,
or to its last), those between mix them. A value changes by at most δ where inputs are moved (both sides of a kink
agree at it), not at all elsewhere, and its derivative follows the side chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

_CALLS = ("jit", "pjit", "closed_call", "core_call", "checkpoint", "remat")  # followed inside
_COMPARE = {"gt", "ge", "lt", "le"}
_BIAS = 4.0  # the draws' means of δ run from −_BIAS to _BIAS of its spread
_MIXED_PART = 4  # beyond the draws, a quarter as many mixed ones: each equation at either end, at random
# Primitives smooth wherever they are finite (or exact, as ``eq``): evaluated as they are. Everything else that is
# not a kink handled below gets its inputs moved.
_SMOOTH = frozenset({
    "add", "add_any", "sub", "mul", "div", "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin",
    "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt",
    "cbrt", "pow", "integer_pow", "square", "erf", "erfc", "erf_inv", "lgamma", "digamma", "dot_general",
    "conv_general_dilated", "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims",
    "convert_element_type", "reduce_sum", "reduce_prod", "cumsum", "cumprod", "cumlogsumexp", "concatenate", "pad",
    "slice", "dynamic_slice", "dynamic_update_slice", "gather", "scatter-add", "scatter_add", "select_n", "copy",
    "copy_p", "rev", "iota", "eq", "ne", "and", "or", "not", "xor", "stop_gradient", "reduce_precision", "real",
    "imag", "conj", "complex", "split", "mul_add", "nextafter", "is_finite", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "population_count", "random_bits", "random_wrap", "random_unwrap", "random_seed",
    "random_fold_in", "random_split", "threefry2x32", "sharding_constraint", "optimization_barrier", "pvary", "name",
})


def kink_sides(fn: Callable[[list], Any], dl: list, draws: int, seed: int) -> Iterator[list[np.ndarray]]:
    """The gradient of ``fn`` (a scalar function of the list of arrays ``dl``) at ``dl``, ``draws`` times, each
    with every kink on a random side of its own (see the module's docstring); then ``draws // 4`` mixed draws, in
    which each equation's kinks all take one side, that equation's own at random: every ReLU of a layer off while
    every ``|w|`` of an L1 penalty at w = 0 takes −1, a sum of one-sided choices that neither end of the draws gives
    (there every kink takes the same side). Raises what tracing fn raises (a function needing values in Python)."""
    closed = jax.make_jaxpr(fn)(dl)
    n = len(jax.tree_util.tree_leaves(dl))

    def sided(flat: list, key: jax.Array, bias: jax.Array, mixed: jax.Array) -> jax.Array:
        out, _ = _eval(closed.jaxpr, closed.consts, flat, [True] * n, (key, bias, mixed))
        return jnp.asarray(out[0]).astype(jnp.result_type(out[0]))

    grad = jax.jit(jax.grad(sided))
    flat = jax.tree_util.tree_leaves(dl)
    mixed = draws // _MIXED_PART if draws > 1 else 0
    keys = jax.random.split(jax.random.key(seed % 2**32), draws + mixed)
    biases = np.linspace(-_BIAS, _BIAS, draws) if draws > 1 else np.zeros(1)
    for k in range(draws + mixed):  # (one draw at a time: a gradient of the parameters' size each)
        yield [np.asarray(g) for g in grad(flat, keys[k], np.float32(biases[k] if k < draws else 0.0),
                                           np.bool_(k >= draws))]


_KINKS = frozenset({"max", "min", "abs", "sign", "floor", "ceil", "round", "clamp", "reduce_max", "reduce_min",
                    "argmax", "argmin", "reduce_window_max", "reduce_window_min", "reduce_window", "cummax", "cummin",
                    "sort", "top_k", "select_and_scatter_add", "select_and_gather_add", "custom_jvp_call",
                    "custom_vjp_call", "custom_vjp_call_jaxpr", "while", "cond"} | _COMPARE)


def has_kinks(fn: Callable[[list], Any], dl: list) -> bool:
    """Whether fn's jaxpr has anything that can put a kink in it (a max, |x|, a comparison, a sort, a custom rule,
    a branch), sub-computations included; True where fn cannot be traced (nothing is known then)."""
    try:
        closed = jax.make_jaxpr(fn)(dl)
    except Exception:  # noqa: BLE001 - Python control flow on a value: assume it may
        return True

    def walk(jaxpr: Any) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in _KINKS:
                return True
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns") and walk(inner):
                        return True
        return False

    return walk(closed.jaxpr)


def _unit(x: jax.Array) -> jax.Array:
    """A unit of x's precision at x's root mean square (at 1 where x is all zeros), as a constant."""
    xs = jax.lax.stop_gradient(x)
    rms = jnp.sqrt(jnp.mean(jnp.square(xs.astype(jnp.float32)))) if xs.size else jnp.float32(0)
    return jnp.where(rms > 0, rms, 1.0) * float(jnp.finfo(jnp.result_type(x)).eps)


def _delta(noise: tuple, x: jax.Array) -> jax.Array:
    """A tiny random displacement of x: (N(0, 1) + the draw's bias) units of :func:`_unit` per element, the random
    part fading out towards either end of the draws (where every element moves by the bias alone). ``noise``: (key,
    bias)."""
    key, bias = noise[:2]
    fade = jnp.maximum(0.0, 1.0 - jnp.abs(bias) / _BIAS)  # (none at either end: every element moved alike)
    return ((jax.random.normal(key, jnp.shape(x), jnp.float32) * fade + bias) * _unit(x)).astype(jnp.result_type(x))


def _moved(x: Any, d: jax.Array) -> jax.Array:
    """x + d, and a unit in the last place at least, towards d's sign (d below half a unit of x rounds away: 1110 in
    float32 would stay 1110, where a rule wrong at that value is then trusted at its kink)."""
    x = jnp.asarray(x)
    xs = jax.lax.stop_gradient(x)
    up = jnp.nextafter(xs, jnp.where(d < 0, -jnp.inf, jnp.inf).astype(xs.dtype)) - xs
    return x + jax.lax.stop_gradient(jnp.where(xs + d == xs, up, d))  # (a constant step: x's derivative stays 1)


def _apart(noise: tuple, x: jax.Array, d: jax.Array) -> jax.Array:
    """x moved by ``d`` (see :func:`_moved`), with elements equal in x that moved to equal values too moved apart:
    within each group of x's equal elements, in the order of their moved values (equal ones at random), each at
    least two units in the last place above the one before, the lowest where it was; each keeps the side its own
    move took wherever that is unambiguous. Moved by ``d`` alone, two tied inputs of an opaque rule stay tied about as
    often as their displacements round alike, and a rule wrong only at ties (a max-pool backward sending the gradient
    to every tied maximum) would then be read there, in draws meant to sample the rule's sides."""
    moved = _moved(x, d)
    n = int(np.prod(jnp.shape(x)))
    if n < 2:
        return moved
    xs = jnp.ravel(jax.lax.stop_gradient(jnp.asarray(x)))
    wide = jnp.float64 if xs.dtype == jnp.float64 else jnp.float32
    ys = jnp.ravel(jax.lax.stop_gradient(moved)).astype(wide)
    key, bias = noise[:2]
    # (equal moved values in a random order; at either end of the draws in raster order, the first element highest
    # or the last: every tie to its first maximum, in every window however they overlap, or to its last)
    at_end = jnp.abs(bias) >= _BIAS * (1 - 1e-6)
    raster = jnp.arange(n, dtype=jnp.float32) / n
    tie_break = jnp.where(at_end, -jnp.sign(bias) * raster, jax.random.uniform(jax.random.fold_in(key, 1), (n,)))
    order = jnp.lexsort((tie_break, ys, xs))
    sx, sy = xs[order], ys[order]
    fi = jnp.finfo(xs.dtype)
    step = 4 * float(fi.eps) * jnp.maximum(jnp.abs(sy), float(fi.tiny))  # (two units in the last place at least)
    new = jnp.concatenate([jnp.ones(1, bool), sx[1:] != sx[:-1]])
    pos = jnp.arange(n)
    first = jax.lax.cummax(jnp.where(new, pos, 0))
    j = (pos - first).astype(wide)
    s = _group_max(new, step) * (1 + 2 * n * float(fi.eps))  # (the group's largest, with room to grow)
    sorted_out = _segmented(jnp.maximum, new, sy - s * j) + s * j
    out = jnp.zeros(n, wide).at[order].set(sorted_out).astype(xs.dtype).reshape(jnp.shape(x))
    return jnp.asarray(x) + jax.lax.stop_gradient(out - jnp.asarray(xs).reshape(jnp.shape(x)))


def _segmented(op: Callable, new: jax.Array, v: jax.Array) -> jax.Array:
    """The running ``op`` (an associative max or min) of v within each run that ``new`` starts."""
    def combine(a: tuple, b: tuple) -> tuple:
        (fa, va), (fb, vb) = a, b
        return fa | fb, jnp.where(fb, vb, op(va, vb))

    return jax.lax.associative_scan(combine, (new, v))[1]


def _group_max(new: jax.Array, v: jax.Array) -> jax.Array:
    """Each element's run's (see :func:`_segmented`) largest v."""
    running = _segmented(jnp.maximum, new, v)
    ends = jnp.concatenate([new[1:], jnp.ones(1, bool)])  # (the last element of each run holds its maximum)
    back = _segmented(jnp.minimum, ends[::-1], jnp.where(ends, running, jnp.inf)[::-1])[::-1]
    return back


def _ramp(noise: tuple, x: jax.Array, periods: dict[int, int]) -> jax.Array:
    """δ for a choice among elements (ties of a max over windows, of a sort): random, without the draw's bias,
    plus the bias falling from +bias to −bias along each axis in ``periods`` over each run of that many elements
    (a window's): at either end of the draws every tie goes to its first element, or to its last."""
    key, bias = noise[:2]
    out = _delta((key, 0.0), x)
    ramp = jnp.zeros(jnp.shape(x), jnp.float32)
    used = {a: p for a, p in periods.items() if p > 1}
    for axis, period in used.items():
        pos = (jnp.arange(x.shape[axis]) % period).astype(jnp.float32)
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        ramp = ramp + (1 - 2 * pos / (period - 1)).reshape(shape) / len(used)
    return out + (bias * ramp * _unit(x)).astype(jnp.result_type(x))


def _coin(noise: tuple, like: jax.Array) -> jax.Array:
    """A random side per element, True with the probability the draw's bias gives (Φ(bias): nearly always at one
    end of the draws, nearly never at the other)."""
    key, bias = noise[:2]
    return jax.random.normal(key, jnp.shape(like), jnp.float32) + bias > 0


def _split(noise: tuple, n: int = 2) -> list[tuple]:
    key, *rest = noise
    return [(k, *rest) for k in jax.random.split(key, n)]


def _resolved(noise: tuple) -> tuple:
    """One equation's noise: in a mixed draw (``noise``'s third part true), its bias ±:data:`_BIAS` at random, for
    all of that equation's kinks together; else the draw's."""
    key, bias, *rest = noise
    if not rest:
        return noise
    coin = jax.random.uniform(jax.random.fold_in(key, 0x6D6978)) < 0.5
    return key, jnp.where(rest[0], jnp.where(coin, -_BIAS, _BIAS), bias)


def _float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _eval(jaxpr: Any, consts: Sequence, args: Sequence, dep_args: Sequence[bool], noise: tuple) -> tuple[list, tuple]:
    """Evaluates ``jaxpr`` with kinks sided: its outputs and the noise left (key, bias). ``dep_args``: which inputs
    depend on the parameters (only kinks of such values are moved)."""
    from funcgrad.verify._audit import _bind, _call_jaxpr, _identify  # noqa: PLC0415 - _audit imports _grad, which imports this

    env: dict = {}
    dep: set = set()

    def read(v: Any) -> Any:
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x, d in zip(jaxpr.invars, args, dep_args, strict=True):
        env[v] = x
        if d:
            dep.add(v)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        dins = [not isinstance(v, Literal) and v in dep for v in eqn.invars]
        outs = None
        if any(dins):
            name = eqn.primitive.name
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")) if name in _CALLS else None
            if inner is not None:
                outs, noise = _eval(getattr(inner, "jaxpr", inner), getattr(inner, "consts", ()), invals, dins, noise)
            elif name == "custom_jvp_call" and _identify(eqn).library:
                inner = _call_jaxpr(eqn)
                outs, noise = _eval(inner.jaxpr, inner.consts, invals, dins, noise)
            elif name not in _SMOOTH:
                noise, sub = _split(noise)
                sub = _resolved(sub)
                outs = _sided(eqn, invals, dins, sub)
                if outs is None:  # (not a kink known here: its inputs moved, so that its own kinks take a side)
                    subs = _split(sub, len(invals))
                    outs = _bind(eqn, [_apart(k, x, _delta(k, jnp.asarray(x))) if d and _float(x) else x
                                       for x, d, k in zip(invals, dins, subs, strict=True)])
                outs = _typed(eqn, outs)
        if outs is None:
            outs = _bind(eqn, invals)
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
            if any(dins):
                dep.add(v)
    return [read(v) for v in jaxpr.outvars], noise


def _sided(eqn: Any, invals: list, dins: list[bool], key: tuple) -> list | None:
    """One kink equation with its choice made by moved comparisons; None for any other equation."""
    from funcgrad.verify._audit import _bind  # noqa: PLC0415 - _audit imports _grad, which imports this
    name = eqn.primitive.name
    if name in ("max", "min") and all(_float(x) for x in invals):
        a, b = jnp.broadcast_arrays(jnp.asarray(invals[0]), jnp.asarray(invals[1]))
        first = (a > b) if name == "max" else (a < b)
        return [jnp.where(jnp.where(a == b, _coin(key, a), first), a, b)]  # (the bias favours the first operand)
    if name == "abs" and _float(invals[0]):
        x = jnp.asarray(invals[0])
        return [jnp.where(jnp.where(x == 0, _coin(key, x), x > 0), x, -x)]
    if name in _COMPARE and all(_float(x) for x in invals):
        a, b = jnp.broadcast_arrays(jnp.asarray(invals[0]), jnp.asarray(invals[1]))
        return [jnp.where(a == b, _coin(key, a), getattr(jax.lax, name)(a, b))]
    if name in ("reduce_window_max", "reduce_window_min") and _float(invals[0]):
        # (ties moved apart, at random or, at either end of the draws, in raster order: a window's first maximum, or
        # its last, for windows that overlap too, where a ramp repeating with the window's period is no order)
        x = jnp.asarray(invals[0])
        return _bind(eqn, [_apart(key, x, _delta(key, x)), *invals[1:]])
    if name in ("cummax", "cummin") and _float(invals[0]):
        x = jnp.asarray(invals[0])
        axis = int(eqn.params["axis"])
        return _bind(eqn, [_moved(x, _ramp(key, x, {axis: x.shape[axis]}))])
    if name in ("sort", "top_k") and all(_float(x) or not d for x, d in zip(invals, dins, strict=True)):
        axis = int(eqn.params.get("dimension", -1)) % max(jnp.ndim(invals[0]), 1)
        n_keys = int(eqn.params.get("num_keys", 1))
        keys = _split(key, len(invals))
        ranked = [_moved(x, _ramp(k, jnp.asarray(x), {axis: jnp.shape(x)[axis]})) if i < n_keys and d else x
                  for i, (x, d, k) in enumerate(zip(invals, dins, keys, strict=True))]
        return _bind(eqn, ranked)
    if name in ("reduce_max", "reduce_min", "argmax", "argmin") and _float(invals[0]):
        x = jnp.asarray(invals[0])
        axes = tuple(eqn.params["axes"])
        rest = [i for i in range(x.ndim) if i not in axes]
        flat = jnp.transpose(x, rest + list(axes)).reshape([x.shape[i] for i in rest] + [-1])
        best = (jnp.max if name in ("reduce_max", "argmax") else jnp.min)(flat, -1, keepdims=True)
        # (among the elements tied at the extreme only: a score falling along the axis with the draw's bias, and
        # random; an element a little below the maximum is never chosen)
        score = jnp.where(flat == best, _ramp(key, jnp.zeros(flat.shape, jnp.float32) + 1.0, {flat.ndim - 1: flat.shape[-1]}),
                          -jnp.inf)
        at = jnp.argmax(score, -1)
        if name.startswith("arg"):
            return [at.astype(eqn.params["index_dtype"])]
        return [jnp.take_along_axis(flat, at[..., None], -1)[..., 0]]
    return None


def _typed(eqn: Any, outs: list) -> list:
    """``outs`` in the dtypes the equation gives (a Python number among the inputs may have widened them)."""
    def typed(v: Any, o: Any) -> Any:
        dtype = getattr(getattr(v, "aval", None), "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or jnp.result_type(o) == dtype:
            return o
        return jnp.asarray(o).astype(dtype)

    return [typed(v, o) for v, o in zip(eqn.outvars, outs, strict=True)]
