"""fn and hand as the checks compile them: traced afresh at every check, keyed on what the trace contains.

A check traces the user's function at the parameters' own precision and in float64 (``jax.make_jaxpr``); the
compiled pieces then evaluate those jaxprs, with the constants the function closes over passed as arguments
rather than embedded in every compiled program. Two checks whose traces are identical (same equations, same
literals, constants of the same shapes and dtypes) are the same function as far as XLA is concerned, so they share
compilations: a repeated check of an unchanged function compiles nothing. A function whose globals changed traces
differently and is compiled afresh. A user's ``custom_vjp``/``custom_jvp`` rule, whose derivative function the
jaxpr does not show (JAX traces it only when differentiating), is keyed on that function traced at the rule's
inputs (its VJP or JVP), so a rule whose backward reads a changed global is compiled afresh too. Traces whose
meaning is still not in the key (a callback, a rule that cannot be traced on its own, a primitive JAX does not
define) get a key of their own and are never shared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr

from funcgrad.verify._inputs import _DYN, _join_args, _x64

_DIGEST_LIMIT = 1 << 20  # constants of inner jaxprs hashed by value up to this many bytes; larger ones never shared


# Callable parameters that are plain values (a jit's mesh context).
_SAFE = (jax.sharding.Mesh, jax.sharding.AbstractMesh, jax.sharding.Sharding)


class _Unique:
    """A key part equal only to itself: the trace is never shared."""


def _const_key(c: Any) -> Any:
    """An inner constant by value (a digest), or, when large, a key equal only to itself."""
    a = np.asarray(c)
    return hashlib.blake2b(a.tobytes()).hexdigest() + str(a.dtype) + str(a.shape) if a.nbytes <= _DIGEST_LIMIT \
        else _Unique()


def _rule_key(eqn: Any, kind: str, active: frozenset) -> Any:
    """A user's custom rule as it is now: its VJP (custom_vjp: forward and backward functions) or JVP (custom_jvp)
    traced at this call's inputs, as jaxpr text and constants (``active``: the rules being keyed, this one among
    them). A key equal only to itself when that cannot be traced (then the trace is never shared)."""
    from funcgrad.verify._audit import _bind  # noqa: PLC0415 - _audit imports this module

    ins = [v.aval for v in eqn.invars]
    diff = [i for i, a in enumerate(ins) if jnp.issubdtype(a.dtype, jnp.inexact)]

    def derivative(xs: list, ts: list) -> Any:
        def part(*fs: Any) -> list:
            full = list(xs)
            for i, f in zip(diff, fs, strict=True):
                full[i] = f
            return _bind(eqn, full)

        primals = [xs[i] for i in diff]
        if kind == "custom_jvp":
            return jax.jvp(part, primals, ts)
        outs, pull = jax.vjp(part, *primals)
        return pull([t if jnp.issubdtype(o.dtype, jnp.inexact) else np.zeros(o.shape, jax.dtypes.float0)
                     for o, t in zip(outs, ts, strict=True)])

    tangents = [ins[i] for i in diff] if kind == "custom_jvp" else [v.aval for v in eqn.outvars]
    try:
        closed = jax.make_jaxpr(derivative)([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ins],
                                            [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in tangents])
    except Exception:  # noqa: BLE001 - whatever the rule cannot do alone, it is then never shared
        return _Unique()
    inner: list = []
    # (The trace holds the rule's own call again, for its primal: its derivative is not traced a second time; other
    # user rules its derivative calls are keyed on theirs.)
    _params_key(closed.jaxpr, inner, active)
    return (tuple(inner), tuple(_const_key(c) for c in closed.consts))


def _literal_key(x: Any) -> tuple:
    """A literal by its bytes, dtype and shape (a NaN literal equals itself; 1 and True do not)."""
    a = np.asarray(x.val)
    return ("lit", a.dtype.str, a.shape, a.tobytes(), x.aval)


def _value_key(v: Any) -> Any:
    """An equation parameter that is a plain hashable value, with its type (1, 1.0 and True differ; NaN equals
    itself)."""
    if isinstance(v, float):
        return (float, v.hex())
    return (type(v), v)


def _plain(v: Any) -> bool:
    """A plain value (number, string, None, or a tuple of them), not a function or a jaxpr."""
    return isinstance(v, (int, float, str, type(None))) or (isinstance(v, tuple) and all(map(_plain, v)))


def _hashable(v: Any) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def _params_key(jaxpr: Any, out: list, active: frozenset = frozenset()) -> None:
    """Appends to ``out`` everything the jaxpr computes: its variables' types, each equation's primitive, inputs,
    outputs and parameters (a structural copy of what str(jaxpr) shows, without the cost of printing it), inner
    constants, and what a user's custom rule computes for its derivative (``active``: the rules whose derivatives
    are being traced for the key, keyed here by name only)."""
    from funcgrad.verify._audit import _CUSTOM_ROOT, _call_jaxpr, _identify, _source  # noqa: PLC0415 - _audit imports this module
    from funcgrad.verify._compiled import _CUSTOM, _jax_primitives  # noqa: PLC0415 - (beside it)

    names: dict[Any, int] = {}

    def define(vs: Sequence) -> tuple:
        for v in vs:
            names[v] = len(names)
        return tuple(v.aval for v in vs)

    def use(vs: Sequence) -> tuple:
        return tuple(_literal_key(v) if hasattr(v, "val") else names.get(v, -1) for v in vs)

    out.append(("in", define(jaxpr.constvars), define(jaxpr.invars)))
    for eqn in jaxpr.eqns:
        out.append((eqn.primitive.name, use(eqn.invars), define(eqn.outvars)))
        if id(eqn.primitive) not in _jax_primitives(len(sys.modules)):
            # A primitive JAX does not define (the user's jax.extend.core.Primitive): its rules, which another of
            # the same name may not share, are not in the jaxpr.
            out.append(_Unique())
        if eqn.primitive.name in _CUSTOM:
            rule = _identify(eqn)
            # A framework's rule (jax.nn.relu's custom JVP) is the same code at every trace; a user's rule may read
            # globals that changed, in a derivative function the jaxpr does not show: keyed on its trace. So is
            # lax.custom_root's, JAX's rule made of the user's tangent_solve.
            mine = not rule.library or (_source(_call_jaxpr(eqn)) or ("",))[0] == _CUSTOM_ROOT
            out.append(("rule", rule.kind, _rule_key(eqn, rule.kind, active | {rule})) if mine and rule not in active
                       else ("rule", rule.kind, rule.name, rule.source))
            call = _call_jaxpr(eqn)
            _params_key(call.jaxpr, out, active)
            out.extend(_const_key(c) for c in call.consts)
            # Its other parameters (num_consts, symbolic_zeros, ...); the functions among them are the rule's
            # derivative, keyed above.
            out.extend(_value_key(v) for _, v in sorted(eqn.params.items()) if _plain(v))
            continue
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                _param_key(v, out, active)
    out.append(("out", use(jaxpr.outvars)))


def _param_key(v: Any, out: list, active: frozenset, depth: int = 0) -> None:
    """Appends to ``out`` one equation parameter: a jaxpr by what it computes, a frozen dataclass (a Pallas call's
    GridMapping, holding its index maps' jaxprs, made afresh at every trace of a kernel's backward, and equal only
    to itself then) by its fields, a plain value by value; a callback, or anything else unhashable, by a key equal
    only to itself."""
    if isinstance(v, ClosedJaxpr):
        _params_key(v.jaxpr, out, active)
        out.extend(_const_key(c) for c in v.consts)
    elif hasattr(v, "eqns"):
        _params_key(v, out, active)
    elif _jax_function(v):
        out.append(("jax function", id(v)))  # (a PRNG implementation's threefry_split: the same code)
    elif callable(v) and not isinstance(v, _SAFE):
        out.append(_Unique())  # a callback or rule traced later: its meaning is not in the jaxpr
    elif depth < 8 and dataclasses.is_dataclass(v) and not isinstance(v, type) and _frozen(v):
        out.append(("dataclass", type(v).__module__, type(v).__qualname__))
        for f in dataclasses.fields(v):
            out.append(f.name)
            _param_key(getattr(v, f.name), out, active, depth + 1)
    elif depth and isinstance(v, (tuple, list)):  # (inside a dataclass: its fields' tuples, item by item)
        out.append((type(v), len(v)))
        for u in v:
            _param_key(u, out, active, depth + 1)
    else:
        out.append(_value_key(v) if _hashable(v) else _Unique())


def _frozen(v: Any) -> bool:
    """Whether ``v``, a dataclass instance, is of a frozen dataclass (its fields are all it holds, for good)."""
    params = getattr(type(v), "__dataclass_params__", None)
    return bool(getattr(params, "frozen", False))


def _jax_function(v: Any) -> bool:
    """Whether ``v`` is a function JAX defines at a module's top level (``random_wrap``'s PRNG implementation holds
    threefry_seed, threefry_split, ...): the same code at every trace, keyed by identity. A closure, a method or a
    callable object (a checkpoint policy holding names) may hold values the key does not see: never shared."""
    return (isinstance(v, types.FunctionType) and v.__closure__ is None and "<locals>" not in v.__qualname__
            and (v.__module__ or "").split(".")[0] in ("jax", "jaxlib")
            and getattr(sys.modules.get(v.__module__), v.__name__, None) is v)


def _key(closed: ClosedJaxpr) -> tuple:
    extra: list = []
    _params_key(closed.jaxpr, extra)
    consts = tuple((tuple(np.shape(c)), str(jnp.result_type(c))) for c in closed.consts)
    return (tuple(extra), consts)


@dataclasses.dataclass(frozen=True, eq=False)
class _Trace:
    """One trace: the jaxpr, where its constants sit among the check's hoisted constants, the avals it was traced
    at, and the output structure."""

    jaxpr: Any  # without its constants' values (see _open)
    const_avals: tuple  # the avals of its constants, which come first
    const_index: tuple[int, ...]
    in_avals: tuple[tuple[tuple[int, ...], Any], ...]  # (shape, dtype) of each input: the differentiated leaves, then dyn
    out_tree: Any


@dataclasses.dataclass(frozen=True, eq=False)
class _Traced:
    """A user function (fn, or a traced hand) as its traces at the two precisions. Equal, and hashed, by the
    traces' keys: jit then reuses compilations across checks of identical traces."""

    key: tuple
    traces: tuple[_Trace, ...]
    spec: tuple  # where the arrays go among the static values of (fixed leaves, args)
    fallback: Callable  # the function itself: for inputs of another precision than either trace
    what: str  # "fn" or "hand"
    fell_back: list = dataclasses.field(default_factory=list)  # non-empty once the function itself was called
    traced = True  # what _Bound looks for

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        # (once either has called the function itself, what it compiled holds that function's values, which the key
        # does not see: equal then only to the same function, h97)
        return isinstance(other, _Traced) and other.key == self.key and (
            not (self.fell_back or other.fell_back) or self.fallback is other.fallback)

    def __call__(self, dl: Sequence, packed: tuple) -> Any:
        """fn(params, *args) (or hand's leaves), from the differentiated leaves and ``packed = (fixed leaves,
        args, hoisted constants)``."""
        fixed, args, consts = packed
        _, static = self.spec
        flat = jax.tree_util.tree_leaves((fixed, args))
        dyn = [x for x, s in zip(flat, static, strict=True) if s is _DYN]
        sig = _signature([*dl, *dyn])
        for t in self.traces:
            if sig == t.in_avals:
                cs = [jnp.asarray(consts[i]).astype(a.dtype) for i, a in zip(t.const_index, t.const_avals, strict=True)]
                # (a jaxpr whose constants were detached takes them as its leading inputs)
                outs = (jax.core.eval_jaxpr(t.jaxpr, cs, *dl, *dyn) if len(t.jaxpr.constvars) == len(cs) else
                        jax.core.eval_jaxpr(t.jaxpr, [], *cs, *dl, *dyn))
                return jax.tree_util.tree_unflatten(t.out_tree, outs)
        self.fell_back.append(True)
        return self.fallback(dl, (fixed, args))


def _signature(xs: Sequence[Any]) -> tuple:
    """(shape, dtype) of each input as JAX takes it under the current x64 setting (a NumPy float64 array is float32
    without x64): how a trace's inputs are recorded and how a call is matched to a trace."""
    return tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in xs)


def _detached(c: Any) -> Any:
    """A traced constant without JAX's wrapper: the NumPy array under a ``TypedNdArray`` (the same memory). JAX
    caches what it makes of a NumPy array that a function closes over (a float64 dropout mask becomes float32
    without x64) by the array, whatever the x64 setting, for as long as what it made is alive: holding it would
    give the trace at the other setting (and the user's programs after the check) this one's dtype."""
    base = getattr(c, "base", None)
    if type(c) is not np.ndarray and isinstance(c, np.ndarray) and isinstance(base, np.ndarray) \
            and base.dtype == c.dtype and base.shape == c.shape:
        return base
    return c


def _open(closed: Any) -> tuple[Any, tuple]:
    """A closed jaxpr's equations without its constants' values, and the constants' avals. From JAX 0.12 a jaxpr
    holds its constants' values itself (``closed.jaxpr`` is ``closed``): kept so, JAX's converted copy of a NumPy
    array fn closes over (float32 without x64) stays alive, and the trace at the other setting is given it (see
    :func:`_detached`); detached, the constants are its leading inputs."""
    jaxpr = closed.jaxpr
    avals = tuple(v.aval for v in jaxpr.constvars)
    if getattr(jaxpr, "consts", None) and hasattr(jaxpr, "with_consts"):
        return jaxpr.with_consts([]), avals
    return jaxpr, avals


def trace_pair(fn: Callable, dl_user: Sequence, dl64: Sequence, dyn_user: Sequence, dyn64: Sequence, spec: tuple,
               what: str, consts: list) -> _Traced:
    """``fn(dl, packed)`` traced at the user's precision and in float64. The constants it closes over are added
    to ``consts`` (once each), which the checks pass as arguments.

    Raises whatever tracing raises (the caller falls back to calling fn itself)."""

    def flat(dl: Sequence, dyn: Sequence) -> Any:
        return fn(list(dl), _join_args(list(dyn), spec))

    traces_closed = []
    closed_u, out_u = jax.make_jaxpr(flat, return_shape=True)(list(dl_user), list(dyn_user))
    key_u = _key(closed_u)
    # (JAX's converted constants are let go of before the other trace: see _detached)
    traces_closed.append((*_open(closed_u), [_detached(c) for c in closed_u.consts], out_u,
                          _signature([*dl_user, *dyn_user])))
    del closed_u
    with _x64(True):  # (a custom rule's derivative is traced for the key as the float64 check will)
        closed_64, out_64 = jax.make_jaxpr(flat, return_shape=True)(list(dl64), list(dyn64))
        key_64 = _key(closed_64)
        traces_closed.append((*_open(closed_64), [_detached(c) for c in closed_64.consts], out_64,
                              _signature([*dl64, *dyn64])))
        del closed_64
    ids: dict[int, int] = {id(c): i for i, c in enumerate(consts)}
    traces = []
    for jaxpr, const_avals, closed_consts, out, sig in traces_closed:
        index = []
        for c in closed_consts:
            if id(c) not in ids:
                ids[id(c)] = len(consts)
                consts.append(c)
            index.append(ids[id(c)])
        traces.append(_Trace(jaxpr, const_avals, tuple(index), sig, jax.tree_util.tree_structure(out)))
    # Everything the traced function reads, except the constants' values (arguments of the compiled programs):
    # where its constants sit among the check's (shared with hand when both close over the same array), too.
    key = (what, key_u, key_64, tuple((t.out_tree, t.const_index, t.in_avals) for t in traces), spec)
    return _Traced(key, tuple(traces), spec, fn, what)
