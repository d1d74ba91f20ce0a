"""verify.audit: find the wrong custom derivative rule inside a whole model.

``fn`` is traced once; its jaxpr is then evaluated equation by equation (entering ``jit``, ``remat``, ``scan``,
``while``, ``cond`` and the primal of each custom rule), so that every call of a user-defined ``jax.custom_vjp``
or ``jax.custom_jvp`` rule is seen with the inputs it actually receives in this forward pass: the values of that
scan iteration, the whole batch of a ``vmap``. Each call is then checked in isolation with
:func:`~funcgrad.verify.check_grad` on the scalar ``⟨rule(x), u⟩`` for a random output cotangent u (whose
gradient is exactly the rule's VJP applied to u):

- "autodiff" is JAX's derivative through the equation, that is the custom rule (a custom JVP rule is also
  compared with itself in forward mode);
- "hand" is JAX's plain autodiff of the rule's primal function, traced without the rule (forward mode when
  reverse mode is unavailable; absent when the primal is not differentiable at all);
- finite differences of the primal arbitrate.

A rule that disagrees with both is wrong (``autodiff_wrong``). Where only the primal's plain autodiff disagrees
(an unstable formula: the reason the rule exists), the rule passes with a note. Rule and plain autodiff that agree
while confident finite differences do not (a ``stop_gradient`` copied into the rule) are ``both_wrong``.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import functools
import inspect
import itertools
import keyword
import linecache
import math
import os
import re
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal, jaxpr_as_fun

from funcgrad._checks import describe, in_range
from funcgrad.verify._compiled import _CUSTOM, _bind, _lower, _lowest_float, _scan_layout, _uses, _widened_params
from funcgrad.verify._compiled import _sub_jaxprs as _sub
from funcgrad.verify._fd import _default_rtol
from funcgrad.verify._grad import _check_grad_impl, _environment_versions, _g, _own_limit, _second_look
from funcgrad.verify._inputs import (
    _TRACE_ERRORS,
    _along_explicit_axes,
    _clean,
    _concrete_note,
    _concrete_tiers,
    _default_mask,
    _isolating,
    _replicated,
    _untraceable,
    _wrt_mask,
)
from funcgrad.verify._report import _FAILING, _LIST, AuditReport, AuditRow, GradReport, Row, Verdict, _combine_verdicts

# Primitives that call one sub-jaxpr with their own inputs and outputs.
_CALLS = {"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "remat2", "named_call"}
# Relative steps (of each element, see _second_differences) at which a reference's rounding is probed: small ones,
# and large ones, since rounding moves only with a step that changes what cancels (cos(1e-7 + d) == cos(1e-7) for
# |d| up to 1e-9). A smooth function's second difference at the large ones is a sizeable part of it, which the
# readings allow for: the rule's own must stay under 1% of the disagreement.
_JITTER_STEPS = (2.0**-30, 2.0**-20, 2.0**-14, 2.0**-10, 2.0**-6, 2.0**-2)
_NEAR_STEPS = _JITTER_STEPS[:4]  # (where a reference's smoothness is what lets it fail a rule: up to 1e-3 only)
# Rules defined in these packages are the framework's own, tested there; audit(library=True) includes them.
_LIBRARIES = ("jax", "jaxlib", "flax", "equinox", "optax", "chex", "haiku")
# Rules that mark a value as not to be differentiated and fail when it is (Equinox's filter_custom_vjp passes every
# argument but the first through one): a custom rule's input made by one is held fixed. (Probing by trying to
# differentiate fails inside the framework's rule and leaves its memoized traces unusable.)
_MARKERS = ("_nondifferentiable", "nondifferentiable")
# Primitives whose derivative JAX defines as zero: no gradient of the parameters passes them (hard pseudo-labels
# made by rounding, a sign).
_ZERO_DERIVATIVE = frozenset({"stop_gradient", "round", "floor", "ceil", "sign"})
_CUSTOM_ROOT = "_custom_root"  # the primal of lax.custom_root's custom_jvp
_SEARCH_LIMIT = 400  # objects looked at when searching a wrapper's closures for the user's function
_BROKEN = "the rule's derivative fails at this call: "  # a call whose rule cannot be differentiated (see _defect)
_SITE_LOOKBACK = 16  # equations looked back at for the call site of a rule traced without the user's frames
_BASIS_MAX = 4096  # differentiated input elements up to which a primal that refuses vmap is differentiated by
# forward mode one element at a time
_NOTHING = "nothing to differentiate: "  # a call without a derivative to check (integer inputs, say)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """A custom rule: its kind, its function's name and definition, and whether a framework defines it."""

    kind: str
    name: str
    source: str
    library: bool


class _Call(NamedTuple):
    """One call of a rule, with the values it received."""

    rule: _Rule
    eqn: Any
    inputs: tuple  # every input of the equation (the rule's consts first)
    on_path: bool  # some input depends on the selected parameters
    held: tuple[int, ...]  # inputs the rule refuses to be differentiated with respect to (see _MARKERS)
    where: str  # the nesting: jit(block) › scan iteration 3 › ...
    site: str  # the call site, file:line
    instance: int = 0  # which of the rule's function objects (rules a factory makes share a name and a source)
    live: tuple[int, ...] | None = None  # the outputs fn goes on to use (None: all)
    taint: tuple[bool, ...] = ()  # per input: whether it depends on the selected parameters
    literal: tuple[bool, ...] = ()  # per input: a constant written into fn (a Python number): never differentiated


# ---- identifying rules ----------------------------------------------------------------------------------------


@functools.cache
def _library_dirs(names: tuple[str, ...] = _LIBRARIES) -> tuple[str, ...]:
    dirs = []
    for name in names:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file:
            dirs.append(os.path.dirname(os.path.abspath(file)) + os.sep)
    return tuple(dirs)


def _is_library(filename: str, names: tuple[str, ...] = _LIBRARIES) -> bool:
    return os.path.abspath(filename).startswith(_library_dirs(names)) if filename and not filename.startswith("<") \
        else False


def _jax_own(eqn: Any) -> bool:
    """Whether a custom rule is JAX's own (jax.nn.relu's, logaddexp's custom JVP): its function and its rule both
    defined inside JAX; not a user's rule on a JAX function (``jax.custom_jvp(jnp.tanh)``), nor a framework's."""
    rule = _identify(eqn)
    return rule.library and _is_library(rule.source.rsplit(":", 1)[0], ("jax", "jaxlib"))


def _short(filename: str, line: int | str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        rel = filename
    return f"{filename if rel.startswith('..') else rel}:{line}"


def _user_function(root: Any) -> Any:
    """The first function defined outside the frameworks reachable from ``root`` through wrappers, partials,
    closures and the attributes of wrapper objects (e.g. the user's function inside
    ``equinox.filter_custom_vjp``), or None."""
    return next(_user_functions(root), None)


def _user_functions(root: Any) -> Any:
    """The functions defined outside the frameworks reachable from ``root`` (see :func:`_user_function`), nearest
    first."""
    queue: collections.deque = collections.deque([root])
    seen: set[int] = set()
    while queue and len(seen) < _SEARCH_LIMIT:
        obj = queue.popleft()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, types.ModuleType, type)):
            continue
        seen.add(id(obj))
        code = getattr(obj, "__code__", None)
        if isinstance(code, types.CodeType) and not _is_library(code.co_filename):
            yield obj
            continue
        for attr in ("f", "func", "fun", "__wrapped__", "__func__"):
            with contextlib.suppress(Exception):
                queue.append(getattr(obj, attr))
        for cell in getattr(obj, "__closure__", None) or ():
            with contextlib.suppress(ValueError):
                queue.append(cell.cell_contents)
        if isinstance(obj, functools.partial):
            queue.extend(obj.args)
        elif isinstance(obj, (list, tuple)):
            queue.extend(obj[:16])
        elif code is None and not isinstance(obj, (dict, jax.Array, np.ndarray)):
            with contextlib.suppress(TypeError):
                queue.extend(v for v in vars(obj).values() if callable(v) or hasattr(v, "__dict__"))
            # An object called as a function (a rule given as an instance of the user's class): its __call__.
            call = next((vars(k)["__call__"] for k in type(obj).__mro__ if "__call__" in vars(k)), None) \
                if callable(obj) else None
            if isinstance(getattr(call, "__code__", None), types.CodeType):
                queue.append(call)


def _primal_of(jvp: Any) -> Any:
    """The user's primal function of a framework's custom JVP object whose rule is the user's function ``jvp``
    (``equinox.filter_custom_jvp`` wraps both), looked for among the objects ``jvp`` refers to (its closure, and the
    globals it names: a JVP usually calls its own rule); None when not found. A rule is named after its primal, as
    ``jax.custom_jvp`` rules are."""
    refs = [c.cell_contents for c in getattr(jvp, "__closure__", None) or () if _has_contents(c)]
    names = set(jvp.__code__.co_names)
    refs += [v for k, v in getattr(jvp, "__globals__", {}).items() if k in names]
    for obj in refs:
        if isinstance(getattr(obj, "__code__", None), types.CodeType):
            continue  # a plain function the rule calls, not a rule object
        found = list(itertools.islice(_user_functions(obj), 4))
        if jvp in found and found[0] is not jvp:
            return found[0]
    return None


def _has_contents(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _call_jaxpr(eqn: Any) -> Any:
    return eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))


def _identify(eqn: Any) -> _Rule:
    kind = _CUSTOM[eqn.primitive.name]
    info = getattr(_call_jaxpr(eqn).jaxpr, "debug_info", None)
    m = re.match(r"^(.*) at (.*):(\d+)$", getattr(info, "func_src_info", None) or "")
    name, filename, line = (m.group(1), m.group(2), m.group(3)) if m else ("<unknown>", "", "?")
    if m and not _is_library(filename):
        return _Rule(kind, name, _short(filename, line), False)
    # A framework's wrapper (equinox.filter_custom_vjp, flax's nn.custom_vjp): look for the user's function inside
    # the rule, named after its primal (the user's function the primal's trace entered first).
    holder = eqn.params.get("bwd") if kind == "custom_vjp" else eqn.params.get(
        "jvp_jaxpr_fun", eqn.params.get("jvp_jaxpr_thunk"))
    user = _user_function(holder)
    if user is None and kind == "custom_vjp":  # jax.custom_gradient: the user's function is inside the forward
        user = next((u for k in ("fwd", "fwd_jaxpr_thunk") if (u := _user_function(eqn.params.get(k))) is not None),
                    None)
    if user is not None and kind == "custom_jvp":
        primal = _primal_of(user)
        if primal is None and m and _primal_frame(eqn) is None and f"{os.sep}jax{os.sep}" in m.group(2):
            # The user's rule on a JAX function (jax.custom_jvp(jnp.tanh), then defjvps(...)): no user code in the
            # primal. Named after that function (not after the rule, often a lambda), found at the rule. (A
            # framework's wrapper of an identity primal, equinox's fn_wrapper, is not such a function.)
            code = user.__code__
            return _Rule(kind, name, _short(code.co_filename, code.co_firstlineno), False)
        user = primal or user
    frame = _primal_frame(eqn) if user is not None else None  # (a rule of the user's; named after its primal)
    if frame is not None:
        fname = frame.function_name.rsplit(".", 1)[-1]
        if user.__name__ != fname:
            found = [f for f in itertools.islice(_user_functions(holder), 8)
                     if f.__name__ == fname and f.__code__.co_filename == frame.file_name]
            if not found:
                return _Rule(kind, fname, _short(frame.file_name, _def_line(frame)), False)
            user = found[0]
    if user is not None:
        code = user.__code__
        return _Rule(kind, getattr(user, "__name__", name), _short(code.co_filename, code.co_firstlineno), False)
    return _Rule(kind, name, _short(filename, line) if filename else "<unknown>", True)


def _frames(eqn: Any) -> Sequence:
    """The frames of an equation's trace, innermost first (none when JAX kept no traceback)."""
    return getattr(getattr(getattr(eqn, "source_info", None), "traceback", None), "frames", None) or ()


def _primal_frame(eqn: Any) -> Any:
    """The frame of the user's function that a framework-wrapped rule's primal was traced in: in the traces of the
    primal's first equations, the outermost frame of the user's code that the call site itself is not in."""
    site = {(f.file_name, f.function_name, f.line_num) for f in _frames(eqn)}
    for inner in _call_jaxpr(eqn).jaxpr.eqns[:_SITE_LOOKBACK]:
        for f in reversed(_frames(inner)):
            if (f.file_name, f.function_name, f.line_num) in site or _is_library(f.file_name) or \
                    f"{os.sep}funcgrad{os.sep}" in f.file_name:
                continue
            return f
    return None


def _def_line(frame: Any) -> int:
    """The line of the ``def`` of the function a frame runs in (looked for above the frame's line), else the frame's
    own line."""
    pattern = re.compile(rf"^\s*(async\s+)?def\s+{re.escape(frame.function_name.rsplit('.', 1)[-1])}\b")
    for line in range(frame.line_num, max(0, frame.line_num - 400), -1):
        if pattern.match(linecache.getline(frame.file_name, line)):
            return line
    return frame.line_num


def _call_site(eqn: Any) -> str:
    """The innermost frame of the user's code that made this call."""
    tb = getattr(getattr(eqn, "source_info", None), "traceback", None)
    for frame in getattr(tb, "frames", None) or ():
        fname = frame.file_name
        if not _is_library(fname) and f"{os.sep}funcgrad{os.sep}verify{os.sep}" not in fname:
            return _short(fname, frame.line_num)
    return "?"


# ---- rules a derivative inside fn inlined ----------------------------------------------------------------------

_RULE_CALLS = {"custom_vjp.__call__": "custom_vjp", "custom_jvp.__call__": "custom_jvp"}


def _users(frame: Any) -> bool:
    """Whether a frame runs the user's code (not JAX's, a framework's or funcgrad's checker)."""
    return not _is_library(frame.file_name) and f"{os.sep}funcgrad{os.sep}verify{os.sep}" not in frame.file_name


_MACHINERY = ("core.py", "custom_derivatives.py", "linear_util.py", "api_util.py", "pjit.py", "source_info_util.py",
              "traceback_util.py", "api.py", "dispatch.py", "ad_util.py")  # JAX's own tracing, in any rule's frames


def _machinery(frame: Any) -> bool:
    """Whether a frame is JAX's tracing machinery (which runs for every rule), not code that defines one."""
    name = frame.file_name
    return f"{os.sep}interpreters{os.sep}" in name or (_is_library(name) and name.endswith(_MACHINERY))


def _source(closed: Any) -> tuple[str, str, bool] | None:
    """(name, file:line, whether a framework's) of the function a jaxpr was traced from, as JAX records it."""
    info = getattr(getattr(closed, "jaxpr", None), "debug_info", None)
    m = re.match(r"^(.*) at (.*):(\d+)$", getattr(info, "func_src_info", None) or "")
    return (m.group(1), _short(m.group(2), m.group(3)), _is_library(m.group(2))) if m else None


def _users_solves(eqn: Any) -> list[tuple[str, str, bool]]:
    """A ``lax.custom_linear_solve``'s ``transpose_solve`` and ``solve`` that are the user's (its derivative is made
    of them; the libraries' own, jnp.linalg.solve's and jax.scipy's cg, are theirs), as :func:`_source` gives them."""
    fns = eqn.params["jaxprs"]
    given = [j for which in ("transpose_solve", "solve") if (j := getattr(fns, which, None)) is not None]
    # (a solve whose source JAX does not tell, a callable object, is taken as the user's)
    return [src for src in (_source(j) or ("solve", _call_site(eqn), False) for j in given) if not src[2]]


def _solver_rules(jaxpr: Any) -> collections.Counter:
    """The derivative rules that JAX's implicit-differentiation solvers take from the user, which audit does not
    check in isolation: a ``lax.custom_linear_solve`` whose ``solve`` or ``transpose_solve`` is the user's (its
    derivative is made of them; the libraries' own, jnp.linalg.solve's and jax.scipy's cg, are theirs), and a
    ``lax.custom_root`` (its ``tangent_solve`` gives the derivative). Counted per rule, at any depth."""
    found: collections.Counter = collections.Counter()
    seen: set[int] = set()

    def walk(jx: Any) -> None:
        if id(jx) in seen:
            return
        seen.add(id(jx))
        for eqn in jx.eqns:
            if eqn.primitive.name == "custom_linear_solve":
                user = _users_solves(eqn)
                if user:
                    name, where, _ = user[0]
                    found[_Rule("custom_linear_solve", name, where, False)] += 1
            elif eqn.primitive.name == "custom_jvp_call":
                src = _source(eqn.params.get("call_jaxpr"))
                if src is not None and src[0] == _CUSTOM_ROOT and src[2]:
                    found[_Rule("custom_root", "custom_root", _call_site(eqn), False)] += 1
                    continue  # (the solves it makes of tangent_solve are that one rule)
            elif eqn.primitive.name == "call_hi_primitive" and type(eqn.params.get("_prim")).__name__ == "CustomRoot":
                found[_Rule("custom_root", "custom_root", _call_site(eqn), False)] += 1  # (JAX 0.12's custom_root)
                continue
            for sub in _sub(eqn):
                walk(sub)

    walk(jaxpr)
    return found


def _inlined_sites(closed: Any) -> dict[tuple[str, str], tuple[Any, bool | None]]:
    """The call sites (file:line) of custom rules that a derivative taken inside fn (``jax.grad`` in a training
    step, a force from an energy) traced through: their calls leave no rule equation in fn's program, only the
    operations of their fwd and bwd, each traced inside the rule object's ``__call__``. Per site: the kind, the
    user's frame that made the call, and whose rule it is as its own frames tell: the user's (True: the user's
    code runs inside ``__call__``, a framework-wrapped rule included), a library's (False: only a library's code,
    as jax.nn.relu's), or not told (None: operations JAX re-emitted from a rule's cached trace, in a jitted helper
    or a loop). Every rule call on an operation's stack counts (a user's rule whose fwd calls jax.nn.relu).
    Equations inside a visible rule's own jaxprs are not looked at. Keyed by (site, kind)."""
    found: dict[tuple[str, str], tuple[Any, bool | None]] = {}
    seen: set[int] = set()

    def walk(jaxpr: Any, context: Any) -> None:
        if id(jaxpr) in seen:
            return
        seen.add(id(jaxpr))
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in _CUSTOM:
                continue
            frames = _frames(eqn)
            calls = [k for k, f in enumerate(frames) if f.function_name in _RULE_CALLS
                     and f.file_name.endswith("custom_derivatives.py")]
            for n, k in enumerate(calls):
                inside = frames[(calls[n - 1] + 1 if n else 0) : k]
                # the user's frame that made the call; a rule traced by jax.checkpoint keeps none of it: the
                # nearest enclosing equation's, then
                caller = next((g for g in frames[k + 1 :] if _users(g)), context)
                if caller is None:
                    continue
                mine: bool | None = True if any(_users(g) for g in inside) else (
                    False if any(not _machinery(g) for g in inside) else None)
                key = (_short(caller.file_name, caller.line_num), _RULE_CALLS[frames[k].function_name])
                if key not in found or (found[key][1] is not True and mine is not None):
                    found[key] = (caller, mine)
            inner = next((g for g in frames if _users(g)), context)
            for sub in _sub(eqn):
                walk(sub, inner)

    walk(closed.jaxpr, None)
    return found


def _rule_objects(frame: Any, kind: str) -> list[tuple[str, Any]]:
    """The custom rule objects of ``kind`` that the source line of ``frame`` calls by a name its module can resolve
    (``act(x)``, ``jax.nn.relu(x)``): (name, object) pairs."""
    line = linecache.getline(frame.file_name, frame.line_num)
    target = os.path.abspath(frame.file_name)
    module = next((m for m in list(sys.modules.values())
                   if isinstance(f := getattr(m, "__file__", None), str) and os.path.abspath(f) == target), None)
    cls = jax.custom_vjp if kind == "custom_vjp" else jax.custom_jvp
    out = []
    for dotted in re.findall(r"(?<![\w.])([A-Za-z_][\w.]*)\s*\(", line):
        obj: Any = module
        for part in dotted.split("."):
            obj = getattr(obj, part, None) if obj is not None else None
        if isinstance(obj, cls):
            out.append((dotted.rsplit(".", 1)[-1], obj))
    return out


def _inlined_rules(site: str, kind: str, frame: Any, mine: bool | None) -> list[_Rule]:
    """Rules found only by their call site: named after each rule object that the site's line calls, when its
    module resolves them (which also tells whether a library defines one, where the rule's own frames did not),
    else after the one plain name the line calls, else after the site. Undecided whose it is: the user's, so
    that it is reported rather than passed."""
    rules = []
    for name, obj in _rule_objects(frame, kind):
        fun = getattr(obj, "fun", None)
        code = getattr(inspect.unwrap(fun) if callable(fun) else fun, "__code__", None)
        module = str(getattr(fun, "__module__", None) or "")
        defined_by_library = _is_library(code.co_filename) if code is not None else \
            module.split(".", maxsplit=1)[0] in _LIBRARIES
        source = _short(code.co_filename, code.co_firstlineno) if code is not None else f"{module}.{name}"
        rules.append(_Rule(kind, name, source, defined_by_library if mine is None else not mine))
    if rules:
        return rules
    line = linecache.getline(frame.file_name, frame.line_num)
    # A rule local to a function: the one plain name the line calls, when there is one (not a method, not a builtin).
    bare = {n for n in re.findall(r"(?<![\w.])([A-Za-z_]\w*)\s*\(", line)
            if n not in dir(builtins) and n not in keyword.kwlist}
    return [_Rule(kind, bare.pop() if len(bare) == 1 else f"{kind} called at {site}", site, mine is False)]


def _fixed(jaxpr: Any, fixed_in: Sequence[bool] | None) -> set:
    """The values of a jaxpr that are constants of fn's: its constants (values fn closes over), the inputs
    ``fixed_in`` marks, and what equations compute from those and literals alone (``jnp.sqrt(4.0)``, a number
    passed through a jitted helper). No gradient of fn moves them."""
    fixed = set(jaxpr.constvars)
    if fixed_in is not None:
        fixed.update(v for v, f in zip(jaxpr.invars, fixed_in, strict=True) if f)
    for eqn in jaxpr.eqns:
        if all(isinstance(v, Literal) or v in fixed for v in eqn.invars):
            fixed.update(eqn.outvars)
    return fixed


def _reached(eqn: Any, ts: Sequence[bool]) -> list[bool]:
    """Which outputs of ``eqn`` a gradient of the parameters reaches, given which of its inputs it reaches (``ts``):
    its floating-point outputs when any input is reached, except through a step of zero derivative; a call (a
    jitted helper such as jnp.round) followed inside."""
    if not any(ts) or eqn.primitive.name in _ZERO_DERIVATIVE:
        return [False] * len(eqn.outvars)
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")) if eqn.primitive.name in _CALLS else None
    if inner is not None and len(_sub(eqn)) == 1:
        jaxpr = getattr(inner, "jaxpr", inner)
        env = {v: t for v, t in zip(jaxpr.invars, ts, strict=False)}
        for e in jaxpr.eqns:
            outs = _reached(e, [not isinstance(v, Literal) and env.get(v, False) for v in e.invars])
            env.update(zip(e.outvars, outs, strict=True))
        return [not isinstance(v, Literal) and env.get(v, False) and _inexact(o)
                for v, o in zip(jaxpr.outvars, eqn.outvars, strict=True)]
    return [_inexact(v) for v in eqn.outvars]


def _live(jaxpr: Any, live_out: Sequence[bool] | None) -> set:
    """The values of a jaxpr that a cotangent from its live outputs (``live_out``; all by default) reaches: read
    backwards, an equation passes it on to its inputs only through a floating-point output of its that is live,
    and stop_gradient never (dead code, a cond's predicate, an argmax or a value only stop_gradient reads carry
    none). A call of one jaxpr (a jitted helper, remat) is followed inside: it passes the cotangent of its live
    outputs to the inputs its body reads them from (flax.nnx.remat takes a whole module and returns its state
    unchanged, h96). Other equations holding jaxprs (loops, conds) pass it to all their inputs (an upper bound)."""
    live = {v for k, v in enumerate(jaxpr.outvars) if not isinstance(v, Literal) and (live_out is None or live_out[k])}
    for eqn in reversed(jaxpr.eqns):
        if eqn.primitive.name in _ZERO_DERIVATIVE:
            continue
        if not any(v in live and jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in eqn.outvars
                   if not isinstance(v, Literal) and hasattr(v, "aval")):
            continue
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")) if eqn.primitive.name in _CALLS else None
        body = getattr(inner, "jaxpr", inner)
        if body is not None and len(_sub(eqn)) == 1 and len(body.invars) == len(eqn.invars) \
                and len(body.outvars) == len(eqn.outvars):
            reached = _live(body, [not isinstance(v, Literal) and v in live for v in eqn.outvars])
            live.update(v for v, b in zip(eqn.invars, body.invars, strict=True)
                        if not isinstance(v, Literal) and b in reached)
            continue
        live.update(v for v in eqn.invars if not isinstance(v, Literal))
    return live


# ---- walking the model --------------------------------------------------------------------------------------


class _Walker:
    """Evaluates a jaxpr equation by equation, recording the calls of the rules it audits."""

    def __init__(self, max_calls: int, library: bool, exclude: Sequence[str]):
        self.max_calls, self.library, self.exclude = max_calls, library, set(exclude)
        self.matched: dict[str, set[_Rule]] = collections.defaultdict(set)  # each exclude entry's rules
        self.calls: dict[_Rule, list[_Call]] = collections.defaultdict(list)
        self.seen: collections.Counter = collections.Counter()  # calls made, sampled or not
        self.excluded: collections.Counter = collections.Counter()
        self.library_rules: collections.Counter = collections.Counter()
        self.unentered: collections.Counter = collections.Counter()  # primitives holding rules, not entered
        self.unentered_rules: dict[_Rule, str] = {}  # audited rules seen only inside such a primitive: which one
        self._rules: dict[int, _Rule] = {}
        self.rule_eqns: list = []  # every rule equation met, walked or counted
        self._holds: dict[int, bool] = {}
        self._within: dict[int, set] = {}
        self._hidden: dict[tuple[int, bool], set] = {}
        self._instances: dict[int, int] = {}
        self.recorded: set = set()  # (rule, instance) pairs with a call recorded
        self.sited: set = set()  # the rule equations (call sites) with a call recorded
        self._branching: dict[int, tuple[Callable, list] | None] = {}
        self._compiled: dict[int, Callable] = {}
        self._keep: list = []  # keeps the objects whose ids key the caches alive
        self._sites: list[str] = []  # the call sites of the equations entered, innermost last

    def site(self, eqn: Any, before: Sequence = ()) -> str:
        """An equation's call site; where its trace has no frame of the user's (a rule re-traced by a batching
        rule: a cond under vmap), the nearest of the equations ``before`` it in its jaxpr that has one, else the
        innermost enclosing equation's."""
        here = _call_site(eqn)
        for e in reversed(before[-_SITE_LOOKBACK:]):
            if here != "?":
                break
            here = _call_site(e)
        return here if here != "?" or not self._sites else self._sites[-1]

    def rule(self, eqn: Any) -> _Rule:
        if id(eqn) not in self._rules:
            self._keep.append(eqn)
            self.rule_eqns.append(eqn)
            self._rules[id(eqn)] = _identify(eqn)
        return self._rules[id(eqn)]

    def instance(self, eqn: Any) -> int:
        """Which function object defines this call's rule: the user's bwd (or JVP rule) function. A rule object
        called at many sites, or at each iteration of a loop, is one instance; rules that a factory makes (one per
        layer, say) are as many instances of one name and source."""
        if id(eqn) not in self._instances:
            self._keep.append(eqn)
            kind = _CUSTOM[eqn.primitive.name]
            # (a custom_vjp by its fwd and bwd: a factory's instances may share a module-level bwd)
            holders = [eqn.params.get("bwd"), eqn.params.get("fwd", eqn.params.get("fwd_jaxpr_thunk"))] \
                if kind == "custom_vjp" else [eqn.params.get("jvp_jaxpr_fun", eqn.params.get("jvp_jaxpr_thunk"))]
            users = [_user_function(h) for h in holders]
            self._keep.extend(users)
            self._instances[id(eqn)] = hash(tuple(id(u) if u is not None else 0 for u in users))
        return self._instances[id(eqn)]

    def audited(self, rule: _Rule) -> bool:
        # (lax.custom_root's rule is JAX's implicit differentiation around the user's tangent_solve: reported as not
        # checked, see _solver_rules; checked as a library rule, its f's constants moved apart from the solve's)
        return (self.library or not rule.library) and not self.excludes(rule) and rule.name != _CUSTOM_ROOT

    def excludes(self, rule: _Rule) -> bool:
        """Whether an entry of exclude names the rule: its name, or ``name@file:line`` (its source as the table
        shows it, or that source's end)."""
        hit = False
        for entry in self.exclude:
            name, at, where = entry.partition("@")
            if name == rule.name and (not at or rule.source == where or rule.source.endswith("/" + where)):
                self.matched[entry].add(rule)
                hit = True
        return hit

    def ambiguous(self) -> dict[str, list[str]]:
        """The bare names in exclude that named rules defined at several places: each with those places."""
        out = {}
        for entry, rules in self.matched.items():
            places = sorted({r.source for r in rules})
            if "@" not in entry and len(places) > 1:
                out[entry] = places
        return out

    def holds(self, jaxpr: Any) -> bool:
        """Whether the jaxpr calls, at any depth, a custom rule at all (audited or not)."""
        if id(jaxpr) not in self._holds:
            self._keep.append(jaxpr)
            self._holds[id(jaxpr)] = any(e.primitive.name in _CUSTOM or any(self.holds(s) for s in _sub(e))
                                         for e in jaxpr.eqns)
        return self._holds[id(jaxpr)]

    def compiled(self, closed: Any) -> Callable:
        if id(closed) not in self._compiled:
            self._keep.append(closed)
            self._compiled[id(closed)] = jax.jit(jaxpr_as_fun(closed))
        return self._compiled[id(closed)]

    def count(self, jaxpr: Any, times: int, within: str | None = None, taken: dict | None = None) -> None:
        """Counts the rule calls of a jaxpr run without being walked (``times`` runs of it; ``within``: the
        primitive funcgrad does not enter that holds it, whose audited rules are then reported unchecked;
        ``taken``: the branch each of some of its conds took, by the cond's id; every branch of the others is
        counted, an upper bound)."""
        for e in jaxpr.eqns:
            if e.primitive.name in _CUSTOM:
                rule = self.rule(e)
                self._tally(rule, times)
                if within is not None and self.audited(rule):
                    self.unentered_rules.setdefault(rule, within)
            trips = int(e.params.get("length", 1)) if e.primitive.name == "scan" else 1
            subs = [e.params["branches"][taken[id(e)]].jaxpr] if taken and id(e) in taken else _sub(e)
            for s in subs:
                if self.holds(s):
                    self.count(s, times * trips, within)

    def rules_in(self, jaxpr: Any) -> set:
        """The rules a jaxpr calls, at any depth: (rule, instance, id of the call's equation) triples."""
        if id(jaxpr) not in self._within:
            self._keep.append(jaxpr)
            found: set = set()
            for e in jaxpr.eqns:
                if e.primitive.name in _CUSTOM:
                    found.add((self.rule(e), self.instance(e), id(e)))
                for s in _sub(e):
                    if self.holds(s):
                        found |= self.rules_in(s)
            self._within[id(jaxpr)] = found
        return self._within[id(jaxpr)]

    def branching(self, body: Any) -> tuple[Callable, list] | None:
        """For a loop body whose conds (at its top level) hold rules: the body compiled to return, after its own
        outputs, the branch index of each such cond, and those conds; None when it has none."""
        if id(body) not in self._branching:
            self._keep.append(body)
            conds = [e for e in body.jaxpr.eqns if e.primitive.name == "cond"
                     and any(self.holds(b.jaxpr) for b in e.params["branches"])]
            probe = None
            if conds:
                info = body.jaxpr.debug_info
                info = info.with_unknown_names() if hasattr(info, "with_unknown_names") else info
                with contextlib.suppress(Exception):  # (a JAX whose jaxprs cannot be so extended: every branch counted)
                    jx = body.jaxpr.replace(outvars=[*body.jaxpr.outvars, *(e.invars[0] for e in conds)],
                                            debug_info=info)
                    probe = (jax.jit(jaxpr_as_fun(ClosedJaxpr(jx, body.consts))), conds)
            self._branching[id(body)] = probe
        return self._branching[id(body)]

    def hidden_conditional(self, jaxpr: Any, top: bool = True) -> set:
        """The rules a jaxpr calls inside conds that :meth:`branching` does not see (conds within a jit, a remat,
        an inner loop or a rule's primal), at any depth: (rule, instance) pairs. Whether a skipped iteration calls
        them is not known without walking it."""
        key = (id(jaxpr), top)
        if key not in self._hidden:
            self._keep.append(jaxpr)
            found: set = set()
            for e in jaxpr.eqns:
                if e.primitive.name == "cond" and not top:
                    found |= {x for b in e.params["branches"] for x in self.rules_in(b.jaxpr)}
                elif e.primitive.name == "cond":
                    for b in e.params["branches"]:
                        found |= self.hidden_conditional(b.jaxpr, False) if self.holds(b.jaxpr) else set()
                else:
                    for sub in _sub(e):
                        if self.holds(sub):
                            found |= self.hidden_conditional(sub, False)
            self._hidden[key] = found
        return self._hidden[key]

    def _wanted(self, rules: set) -> bool:
        """Whether a call of one of ``rules`` ((rule, instance, call site) triples) would be checked: an audited
        rule with no call recorded at that site, or fewer than max_calls in all."""
        return any(self.audited(r) and (e not in self.sited or len(self.calls[r]) < self.max_calls)
                   for r, _, e in rules)

    def unwalked(self, body: Any, args: list) -> list | None:
        """A loop iteration the sampling skips: evaluated compiled and its rule calls counted (the branches its
        conds took, where known). None when a cond there takes a branch holding an audited rule that no call has
        been recorded for yet, or fewer than ``max_calls`` calls: that iteration is then walked, so that a rule
        called only at some iterations (a warm-up step, every tenth step) is checked at up to max_calls of them
        rather than skipped. Conds the probe cannot see (inside a jit, a remat, an inner loop) holding such a rule:
        walked too."""
        if self._wanted(self.hidden_conditional(body.jaxpr)):
            return None  # (a cond it cannot see may call a rule still wanted: walked)
        probe = self.branching(body)
        if probe is None:
            out = list(self.compiled(body)(*args))
            self.count(body.jaxpr, 1)
            return out
        run, conds = probe
        res = list(run(*args))
        n = len(res) - len(conds)
        taken = {id(e): int(np.clip(int(i), 0, len(e.params["branches"]) - 1)) for e, i in zip(conds, res[n:],
                                                                                             strict=True)}
        for e in conds:
            if self._wanted(self.rules_in(e.params["branches"][taken[id(e)]].jaxpr)):
                return None
        self.count(body.jaxpr, 1, taken=taken)
        return res[:n]

    def _tally(self, rule: _Rule, times: int = 1) -> None:
        if rule.name == _CUSTOM_ROOT:
            return  # (a row of its own: see _solver_rules)
        if rule.library and not self.library:
            self.library_rules[rule] += times
        elif self.excludes(rule):
            self.excluded[rule] += times
        else:
            self.seen[rule] += times

    def run(self, jaxpr: Any, consts: Sequence, args: Sequence, taint: Sequence[bool], where: str,
            live_out: Sequence[bool] | None = None, fixed_in: Sequence[bool] | None = None) -> tuple[list, list]:
        """The jaxpr's outputs, and for each whether it depends on the selected parameters (``live_out``: which
        outputs the caller goes on to use, all by default; ``fixed_in``: which inputs are constants of fn's,
        none by default)."""
        env: dict[Any, tuple[Any, bool]] = {}
        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = (x, False)
        for v, x, t in zip(jaxpr.invars, args, taint, strict=True):
            env[v] = (x, t)

        def read(v: Any) -> tuple[Any, bool]:
            return (v.val, False) if isinstance(v, Literal) else env[v]

        marked: set = set()  # values made by a _MARKERS rule
        used = _live(jaxpr, live_out)
        fixed = _fixed(jaxpr, fixed_in)

        def constant(v: Any) -> bool:
            return isinstance(v, Literal) or v in fixed

        for k, eqn in enumerate(jaxpr.eqns):
            ins = [read(v) for v in eqn.invars]
            vals, ts = [x for x, _ in ins], [t for _, t in ins]
            if eqn.primitive.name in _CUSTOM:
                if self.rule(eqn).name in _MARKERS:
                    marked.update(eqn.outvars)
                held = tuple(i for i, v in enumerate(eqn.invars[int(eqn.params.get("num_consts", 0)):])
                             if not isinstance(v, Literal) and v in marked)
                live = tuple(j for j, v in enumerate(eqn.outvars) if v in used)
                outs, touts = self._custom(eqn, vals, ts, where, held, jaxpr.eqns[:k], live,
                                           tuple(constant(v) for v in eqn.invars))
            else:
                outs, touts = self.equation(eqn, vals, ts, where, [v in used for v in eqn.outvars],
                                            [constant(v) for v in eqn.invars])
            for v, x, t in zip(eqn.outvars, outs, touts, strict=True):
                env[v] = (x, t)
        res = [read(v) for v in jaxpr.outvars]
        return [x for x, _ in res], [t for _, t in res]

    def equation(self, eqn: Any, vals: list, ts: list, where: str, live: Sequence[bool] | None = None,
                 fixed: Sequence[bool] | None = None) -> tuple[list, list]:
        if not any(self.holds(s) for s in _sub(eqn)):
            # (no gradient of the parameters passes a stop_gradient or another step of zero derivative (round,
            # floor, ceil, sign), or reaches an integer or boolean value: an argmax's pseudo-labels, a mask)
            return _bind(eqn, vals), _reached(eqn, ts)
        ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
        self._sites.append(self.site(eqn))
        try:
            with ctx if ctx is not None else contextlib.nullcontext():
                return self._enter(eqn, vals, ts, where, live, fixed)
        finally:
            self._sites.pop()

    def _enter(self, eqn: Any, vals: list, ts: list, where: str, live: Sequence[bool] | None = None,
               fixed: Sequence[bool] | None = None) -> tuple[list, list]:
        """An equation holding rules, entered (``jit``, ``remat``, ``scan``, ``while``, ``cond``)."""
        name = eqn.primitive.name
        if name in _CALLS and len(_sub(eqn)) == 1:
            closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
            label = "remat" if name in ("checkpoint", "remat", "remat2") else f"{name}({eqn.params.get('name', '')})"
            return self.run(jaxpr, consts, vals, ts, _join(where, label), live, fixed)
        if name == "scan":
            return self._scan(eqn, vals, ts, where)
        if name == "while":
            return self._while(eqn, vals, ts, where)
        if name == "cond":
            index = int(vals[0])
            branch = eqn.params["branches"][index]
            return self.run(branch.jaxpr, branch.consts, vals[1:], ts[1:], _join(where, f"cond branch {index}"))
        # Anything else (shard_map, a primitive of another library): evaluated whole; its rules are counted.
        return self._whole(eqn, vals, ts)

    def _whole(self, eqn: Any, vals: list, ts: list) -> tuple[list, list]:
        """An equation funcgrad does not enter: evaluated whole; the rules inside are counted, not checked."""
        self.unentered[eqn.primitive.name] += 1
        for s in _sub(eqn):
            self.count(s, 1, within=eqn.primitive.name)
        return _bind(eqn, vals), [any(ts)] * len(eqn.outvars)

    def _custom(self, eqn: Any, vals: list, ts: list, where: str, held: tuple[int, ...],
                before: Sequence = (), live: tuple[int, ...] | None = None,
                fixed: tuple[bool, ...] = ()) -> tuple[list, list]:
        rule = self.rule(eqn)
        self._tally(rule)
        if self.audited(rule):
            # (on the path also through the values the rule closes over: its consts)
            instance = self.instance(eqn)
            self.recorded.add((rule, instance))
            self.sited.add(id(eqn))
            # (inputs a sharding of fn's own placed along explicit mesh axes are checked replicated: see _replicated)
            self.calls[rule].append(_Call(rule, eqn, _replicated(tuple(vals))[0], any(ts), held, where,
                                          self.site(eqn, before),
                                          instance, live, tuple(ts),
                                          fixed or tuple(isinstance(v, Literal) for v in eqn.invars)))
        closed = _call_jaxpr(eqn)
        if self.holds(closed.jaxpr):  # rules inside this rule's primal
            self._sites.append(self.site(eqn))
            try:
                outs, _ = self.run(closed.jaxpr, closed.consts, vals, ts, _join(where, rule.name))
            finally:
                self._sites.pop()
            # (the rule's own derivative decides what its outputs depend on, not its primal's: a straight-through
            # estimator's primal stops the gradient its rule passes)
            return outs, [any(ts)] * len(eqn.outvars)
        return _bind(eqn, vals), [any(ts)] * len(eqn.outvars)

    def _sample(self, n: int) -> set[int]:
        """The iterations of a loop of n that are walked: evenly spread, first and last included."""
        k = min(n, self.max_calls)
        return set(np.unique(np.round(np.linspace(0, n - 1, k)).astype(int)).tolist()) if k else set()

    def _scan(self, eqn: Any, vals: list, ts: list, where: str) -> tuple[list, list]:
        p = eqn.params
        body, length = p["jaxpr"], int(p["length"])
        layout = _scan_layout(p, len(vals))
        if layout is None:
            return self._whole(eqn, vals, ts)
        n_c, n_carry = layout
        consts, carry, xs = vals[:n_c], vals[n_c : n_c + n_carry], vals[n_c + n_carry :]
        t_consts, t_carry, t_xs = ts[:n_c], list(ts[n_c : n_c + n_carry]), ts[n_c + n_carry :]
        walk = self._sample(length)
        ys: list[list] = []
        t_ys = [False] * (len(eqn.outvars) - n_carry)
        for i in (reversed(range(length)) if p.get("reverse") else range(length)):
            x_i = [x[i] for x in xs]
            out = None if i in walk else self.unwalked(body, [*consts, *carry, *x_i])
            if out is None:
                out, t_out = self.run(body.jaxpr, body.consts, [*consts, *carry, *x_i], [*t_consts, *t_carry, *t_xs],
                                      _join(where, f"scan iteration {i}"))
            else:
                t_out = [any(t_consts) or any(t_carry) or any(t_xs)] * len(out)
            carry, t_carry = out[:n_carry], [a or b for a, b in zip(t_carry, t_out[:n_carry], strict=True)]
            ys.append(out[n_carry:])
            t_ys = [a or b for a, b in zip(t_ys, t_out[n_carry:], strict=True)]
        if p.get("reverse"):
            ys.reverse()
        stacked = [_stack([y[j] for y in ys]) if ys else jnp.zeros(v.aval.shape, v.aval.dtype)
                   for j, v in enumerate(eqn.outvars[n_carry:])]
        return [*carry, *stacked], [*t_carry, *t_ys]

    def _while(self, eqn: Any, vals: list, ts: list, where: str) -> tuple[list, list]:
        """A while loop: its trip count is found first (compiled), so that the iterations walked can be spread
        evenly over the whole loop, first and last included, as for a scan; then the loop is run again, walking
        those (a loop is a pure function of its inputs)."""
        p = eqn.params
        n_cc, n_bc = p["cond_nconsts"], p["body_nconsts"]
        cc, bc, carry = vals[:n_cc], vals[n_cc : n_cc + n_bc], vals[n_cc + n_bc :]
        t_bc, t_carry = ts[n_cc : n_cc + n_bc], list(ts[n_cc + n_bc :])
        cond, body = self.compiled(p["cond_jaxpr"]), p["body_jaxpr"]
        trips, probe = 0, carry
        while _any(cond(*cc, *probe)[0]):
            probe = list(self.compiled(body)(*bc, *probe))
            trips += 1
        walk = self._sample(trips)
        i = 0
        while _any(cond(*cc, *carry)[0]):
            out = None if i in walk else self.unwalked(body, [*bc, *carry])
            if out is None:
                carry, t_out = self.run(body.jaxpr, body.consts, [*bc, *carry], [*t_bc, *t_carry],
                                        _join(where, f"while iteration {i}"))
            else:
                carry, t_out = out, [any(t_bc) or any(t_carry)] * len(out)
            t_carry = [a or b for a, b in zip(t_carry, t_out, strict=True)]
            i += 1
        return carry, t_carry


def _any(pred: Any) -> bool:
    """A while loop's predicate: under vmap with a per-example stopping condition it is one per example, and the
    loop runs while any of them holds (the finished ones are kept as they are by the body's selects)."""
    return bool(np.any(np.asarray(pred)))


_STACK = 256  # arrays stacked by one operation: XLA's compile time grows faster than the operand count


def _stack(arrays: list) -> Any:
    """``jnp.stack(arrays)`` in pieces of :data:`_STACK` (each piece's program compiled once, whatever the loop's
    length), then joined: a scan of 10,000 iterations stacks in a second, not minutes."""
    if len(arrays) <= _STACK:
        return jnp.stack(arrays)
    return jnp.concatenate([jnp.stack(arrays[i : i + _STACK]) for i in range(0, len(arrays), _STACK)])


def _join(where: str, part: str) -> str:
    return f"{where} › {part}" if where else part


# ---- checking one call ----------------------------------------------------------------------------------------


class _Scalars(NamedTuple):
    """A call's equation as check_grad takes it: the scalar ⟨rule(x), u⟩ of the differentiated inputs, JAX's plain
    autodiff of the same scalar through the primal (None when the primal is not differentiable), and why not."""

    rule: Callable
    plain: Callable | None
    note: str
    primal: Callable | None = None  # the same scalar through the primal (for the second look's sides of its kinks)
    wide: Callable | None = None  # the primal's plain autodiff (reverse mode) with the primal evaluated in float64
    # (inputs, constants and literals widened): the reference where the primal loses precision at its own dtypes
    wide_value: Callable | None = None  # the same scalar through the primal evaluated in float64 (see _valued_wide)
    draws: bool = False  # the primal draws random numbers (see _at_model_precision)


def _scalars(eqn: Any, call: _Call, diff_pos: tuple[int, ...], float_outs: tuple[int, ...],
             plain: bool = True, forward: bool = False) -> _Scalars:
    """``forward``: the output elements that only the rule's forward gives finite (``extra``'s third part marks
    them; see :func:`_extra`) count too, evaluated as differentiation evaluates them (see :func:`_as_differentiated`):
    finite differences then move along the values the model computes on, and the rule's derivative is taken there."""
    n_c = int(eqn.params.get("num_consts", 0))
    dtypes = tuple(jnp.result_type(x) for x in call.inputs)  # the dtypes the rule was called with
    fixed_pos = tuple(i for i in range(len(call.inputs)) if i - n_c not in diff_pos)
    primal = _as_typed(eqn, jaxpr_as_fun(_call_jaxpr(eqn)))
    bind = _as_typed(eqn, lambda *xs: _bind(eqn, list(xs)))

    def inputs(diff: Sequence, fixed: Sequence, keep: Sequence) -> list:
        xs: list[Any] = [None] * len(dtypes)
        for i, d, (m, x0) in zip(diff_pos, diff, keep, strict=True):
            # (non-finite elements of the call's inputs stay as they were, not differentiated: see _extra)
            xs[n_c + i] = jnp.where(m, d.astype(dtypes[n_c + i]), x0.astype(dtypes[n_c + i]))
        for i, f in zip(fixed_pos, fixed, strict=True):
            xs[i] = f.astype(dtypes[i]) if hasattr(f, "astype") else f
        return xs

    def contract(outs: Sequence, ct: Sequence) -> Any:
        # (masked: output elements that are not finite at the call are left out, see _extra)
        return sum(jnp.vdot(jnp.where(m, outs[j], 0), c) for j, (c, m) in zip(float_outs, ct, strict=True))

    differentiated = _as_differentiated(eqn, n_c, diff_pos, float_outs) if forward else None

    def beyond(xs: list, ct: Sequence, masks: Sequence, outs: Sequence | None = None) -> Any:
        # (the elements only the forward gives finite: its values there, or ``outs``' (the primal's, for its plain
        # autodiff, which is not finite there))
        if outs is None:
            assert differentiated is not None
            outs = differentiated(xs)
        else:
            outs = [outs[j] for j in float_outs]
        return sum(jnp.vdot(jnp.where(m, y, 0), c) for y, (c, _), m in zip(outs, ct, masks, strict=True))

    def rule(diff: Any, fixed: Any, extra: Any) -> Any:
        ct, keep = extra[:2]
        xs = inputs(diff, fixed, keep)
        return contract(bind(*xs), ct) + (beyond(xs, ct, extra[2]) if forward else 0)

    def through_primal(diff: Any, fixed: Any, extra: Any) -> Any:
        ct, keep = extra[:2]
        xs = inputs(diff, fixed, keep)
        outs = primal(*xs)
        return contract(outs, ct) + (beyond(xs, ct, extra[2], outs) if forward else 0)

    def through_wide(diff: Any, fixed: Any, extra: Any) -> Any:
        # (the call's inputs in float64 rather than at the call's dtypes; the elements only the forward gives finite
        # at the call's dtypes count too, through the primal evaluated in float64: where the primal overflows at its
        # dtype, a softplus at 100 in float32, it is the one reference beside finite differences of the forward)
        ct, keep = extra[:2]
        xs = inputs(diff, fixed, keep)
        for i, d, (m, x0) in zip(diff_pos, diff, keep, strict=True):
            xs[n_c + i] = jnp.where(m, _widened(d), _widened(x0))
        closed = _call_jaxpr(eqn)
        outs = _as_typed(eqn, lambda *ys: _run_widened(closed.jaxpr, closed.consts, list(ys)))(*xs)
        total = sum(jnp.vdot(jnp.where(m, outs[j], 0), _widened(c)) for j, (c, m) in zip(float_outs, ct, strict=True))
        return total + beyond(xs, ct, extra[2], outs) if forward else total

    if not plain:
        return _Scalars(rule, None, "")
    example = (tuple(call.inputs[n_c + i] for i in diff_pos), tuple(call.inputs[i] for i in fixed_pos),
               _extra_shapes(eqn, call, diff_pos, float_outs, forward))
    reasons = []
    makers: tuple[tuple[str, Callable], ...] = (("reverse", jax.grad), ("forward", jax.jacfwd))
    if sum(int(np.size(x)) for x in example[0]) <= _BASIS_MAX:
        # (jacfwd vmaps the primal, which some kernels refuse: a Pallas call in interpret mode)
        makers += (("forward mode by basis vectors", _basis_forward),)
    for how, make in makers:
        plain_fn: Callable = make(through_primal)
        try:
            jax.eval_shape(plain_fn, *example)
        except Exception as e:  # noqa: BLE001 - any failure: try the other mode, else no plain autodiff
            reasons.append(f"{how} mode: {_clipped(str(e)) if str(e).strip() else type(e).__name__}")
            continue
        note = ("" if how == "reverse" else
                "the primal's plain autodiff is from forward mode (reverse mode failed)" if how == "forward" else
                "the primal's plain autodiff is from forward mode, one input element at a time (" + "; ".join(reasons)
                + ")")
        # (float64 reference only for a primal calling no other custom rule: evaluated in float64 such a rule runs
        # as its primal, so the reference would differ from plain autodiff by more than precision; nor one holding a
        # step of zero derivative, a stop_gradient whose plain autodiff a rule may copy, which the reference, never
        # checked against finite differences, would share: h95)
        # (nor one drawing random numbers: widened, a draw's float32 uniform becomes a float64 one, and the mask it
        # makes another)
        draws = _draws(_call_jaxpr(eqn).jaxpr)
        wide = how == "reverse" and not draws and not _uses(
            _call_jaxpr(eqn).jaxpr, lambda e: e.primitive.name in _CUSTOM or e.primitive.name in _ZERO_DERIVATIVE)
        # (the value alone, which finite differences read, keeps a stop_gradient's and another rule's primal value
        # in float64: a rule copying the stop_gradient is decided by them, as it is not by a float32 primal that
        # cancels; a step of zero derivative, which float64 may move across its jump, is not widened)
        wide_value = not draws and not _uses(_call_jaxpr(eqn).jaxpr,
                                             lambda e: e.primitive.name in _ZERO_DERIVATIVE - {"stop_gradient"})
        return _Scalars(rule, plain_fn, note, through_primal if how == "reverse" else None,
                        jax.grad(through_wide) if wide else None, through_wide if wide_value else None, draws)
    return _Scalars(rule, None, "JAX cannot differentiate the rule's primal without the rule (" + "; ".join(reasons)
                    + "): the rule is checked against finite differences only", draws=_draws(_call_jaxpr(eqn).jaxpr))


def _clipped(message: str, width: int = 160) -> str:
    """An error message's first line, cut at a word within ``width`` characters (with "…" where cut)."""
    line = message.strip().splitlines()[0]
    if len(line) <= width:
        return line
    return line[:width].rsplit(" ", 1)[0].rstrip(",;:") + "…"


def _basis_forward(f: Callable) -> Callable:
    """The gradient of a scalar ``f(diff, fixed, extra)`` with respect to ``diff`` by forward mode, one basis
    vector at a time in a ``lax.map`` (no vmap, which some primitives cannot batch)."""

    def grad(diff: Any, fixed: Any, extra: Any) -> Any:
        leaves, tree = jax.tree_util.tree_flatten(diff)

        def along(k: int, i: Any) -> Any:
            ts = [jnp.zeros_like(x) for x in leaves]
            ts[k] = jnp.zeros(leaves[k].size, leaves[k].dtype).at[i].set(1).reshape(leaves[k].shape)
            return jax.jvp(lambda *xs: f(jax.tree_util.tree_unflatten(tree, xs), fixed, extra), leaves, ts)[1]

        return jax.tree_util.tree_unflatten(tree, [
            jax.lax.map(functools.partial(along, k), jnp.arange(x.size)).reshape(x.shape).astype(x.dtype)
            for k, x in enumerate(leaves)])

    return grad


def _as_differentiated(eqn: Any, n_c: int, diff_pos: tuple[int, ...], float_outs: tuple[int, ...]) -> Callable:
    """The rule's floating outputs as a function of all its inputs (``xs``), evaluated as differentiation evaluates
    them: the primal outputs its ``fwd`` (custom_vjp) or its JVP rule (custom_jvp) returns, which a stable forward
    gives finite where the primal function overflows (logsumexp written plainly beside a max-shifted ``fwd``); and
    differentiated, with respect to the inputs ``diff_pos``, by the rule itself. Evaluated plainly (finite
    differences), the rule would give its primal function's values instead."""
    pos = [n_c + i for i in diff_pos]
    bind = _as_typed(eqn, lambda *xs: _bind(eqn, list(xs)))

    def outputs(d: Sequence, rest: Sequence) -> list:
        xs, it = list(rest), iter(d)
        for k in pos:
            xs.insert(k, next(it))
        out = bind(*xs)
        return [out[j] for j in float_outs]

    g: Callable
    if _CUSTOM[eqn.primitive.name] == "custom_jvp":
        @jax.custom_jvp
        def by_jvp(d: tuple, rest: tuple) -> list:
            return jax.jvp(lambda *v: outputs(v, rest), d, tuple(jnp.zeros_like(x) for x in d))[0]

        @by_jvp.defjvp
        def by_jvp_rule(primals: tuple, tangents: tuple) -> tuple:
            (d, rest), (t, _) = primals, tangents  # (the other inputs are held: no tangent moves them)
            t = tuple(jnp.zeros_like(x) if type(ti) is jax.custom_derivatives.SymbolicZero else ti
                      for x, ti in zip(d, t, strict=True))
            return jax.jvp(lambda *v: outputs(v, rest), d, t)

        g = by_jvp
    else:
        @jax.custom_vjp
        def by_vjp(d: tuple, rest: tuple) -> list:
            return jax.vjp(lambda *v: outputs(v, rest), *d)[0]

        def by_vjp_fwd(d: tuple, rest: tuple) -> tuple:
            y, back = jax.vjp(lambda *v: outputs(v, rest), *d)
            return y, (back, rest)

        def by_vjp_bwd(res: tuple, ct: list) -> tuple:
            back, rest = res
            return tuple(back(ct)), tuple(_no_cotangent(x) for x in rest)

        by_vjp.defvjp(by_vjp_fwd, by_vjp_bwd)
        g = by_vjp

    def differentiated(xs: Sequence) -> list:
        return g(tuple(xs[k] for k in pos), tuple(x for k, x in enumerate(xs) if k not in pos))

    return differentiated


def _no_cotangent(x: Any) -> Any:
    """A zero cotangent for ``x`` (float0 for an integer or boolean input)."""
    dt = jnp.result_type(x)
    return jnp.zeros_like(x) if jnp.issubdtype(dt, jnp.inexact) else np.zeros(np.shape(x), jax.dtypes.float0)


def _extra_shapes(eqn: Any, call: _Call, diff_pos: tuple[int, ...], float_outs: tuple[int, ...],
                  forward: bool = False) -> tuple:
    """The shapes of :func:`_extra`'s values (``forward``: with its third part)."""
    n_c = int(eqn.params.get("num_consts", 0))

    def struct(shape: tuple, dtype: Any) -> Any:
        return jax.ShapeDtypeStruct(shape, dtype)

    outs = tuple((struct(eqn.outvars[j].aval.shape, eqn.outvars[j].aval.dtype),
                  struct(eqn.outvars[j].aval.shape, jnp.bool_)) for j in float_outs)
    ins = tuple((struct(np.shape(call.inputs[n_c + i]), jnp.bool_),
                 struct(np.shape(call.inputs[n_c + i]), jnp.result_type(call.inputs[n_c + i]))) for i in diff_pos)
    if forward:
        return outs, ins, tuple(struct(eqn.outvars[j].aval.shape, jnp.bool_) for j in float_outs)
    return outs, ins


def _extra(eqn: Any, call: _Call, diff_pos: tuple[int, ...], float_outs: tuple[int, ...],
           rng: np.random.Generator) -> tuple[tuple, tuple, tuple, str]:
    """What a call's check takes beside the differentiated inputs: per floating output, a random cotangent and a
    mask of the elements that are finite at this call (the others, a log discarded by a ``jnp.where`` guard, say,
    are left out of the scalar); per differentiated input, a mask of its finite elements and the input itself
    (non-finite elements, a causal mask's -inf logits, are held as they are). Returns those, the differentiated
    inputs with their non-finite elements zeroed, and a note (empty when everything is finite).

    Output elements the primal function does not give finite but the rule's forward does (what differentiation
    computes: see :func:`_as_differentiated`) are not left out: a third part then marks them (for
    ``_scalars(..., forward=True)``)."""
    n_c = int(eqn.params.get("num_consts", 0))
    user_inputs = call.inputs[n_c:]
    outs = _as_typed(eqn, lambda *xs: _bind(eqn, list(xs)))(*call.inputs)
    # Where the primal function is not finite, the rule's forward may be (a max-shifted logsumexp's fwd beside its
    # plain primal): those elements are what the model computes on under differentiation, and are checked there.
    under = None
    if not all(np.isfinite(np.asarray(outs[j], np.float64)).all() for j in float_outs):
        try:
            under = [np.asarray(y, np.float64) for y in
                     _as_differentiated(eqn, n_c, diff_pos, float_outs)(list(call.inputs))]
        except Exception:  # noqa: BLE001 - a forward that fails here fails the rule's check, which says why
            under = None
    notes, cts, beyond = [], [], []
    for k, j in enumerate(float_outs):
        v = eqn.outvars[j].aval
        m = np.isfinite(np.asarray(outs[j], np.float64))
        mf = ~m & np.isfinite(under[k]) if under is not None else np.zeros_like(m)
        cts.append((np.where(m | mf, np.asarray(rng.standard_normal(v.shape), v.dtype), 0).astype(v.dtype), m))
        beyond.append(mf)
        if mf.any():
            notes.append(f"output {j}: {int(mf.sum())} of {m.size} element(s) not finite from the rule's primal "
                         "function at this call, but from its forward under differentiation: checked there as the "
                         "model computes them (finite differences of the forward's values)")
        if not (m | mf).all():
            notes.append(f"output {j}: {int(m.size - (m | mf).sum())} of {m.size} element(s) not finite at this call, "
                         "left out")
    # Where every floating output has an input's shape and none is finite at an element, that input is held there
    # too: an elementwise rule's derivative there is that of a point outside its primal's domain (sqrt of a negative,
    # in the branch a vmapped lax.cond computes for every example and then discards), NaN on both sides while the
    # scalar ignores it. (Where another output is finite, or of another shape, the element may reach it: checked.)
    shapes = {tuple(eqn.outvars[j].aval.shape) for j in float_outs}
    left_out = (np.logical_and.reduce([~m & ~mf for (_, m), mf in zip(cts, beyond, strict=True)])
                if len(shapes) == 1 and cts else None)
    keep, diff = [], []
    for i in diff_pos:
        x = np.asarray(user_inputs[i])
        finite = np.isfinite(x.astype(np.float64))
        m = finite & ~left_out if left_out is not None and shapes == {tuple(x.shape)} else finite
        keep.append((m, x))
        diff.append(np.where(m, x, 0).astype(x.dtype))
        if not finite.all():
            notes.append(f"input {i}: {int(finite.size - finite.sum())} of {finite.size} element(s) not finite at this "
                         "call, held as they are")
        if (finite & ~m).any():
            notes.append(f"input {i}: {int((finite & ~m).sum())} element(s) held as they are where no output is "
                         "finite")
    extra = (tuple(cts), tuple(keep)) + ((tuple(beyond),) if any(mf.any() for mf in beyond) else ())
    return extra, tuple(diff), tuple(m | mf for (_, m), mf in zip(cts, beyond, strict=True)), "; ".join(notes)


def _defect(e: BaseException) -> bool:
    """Whether an error raised while differentiating a rule is the rule's own defect: raised in the user's code (its
    fwd, bwd or jvp function), or JAX refusing what the rule returned (a cotangent of the wrong shape, dtype or
    structure). Anything else (a framework refusing to differentiate an input it marks as fixed, a limit of JAX,
    a rule that closes over a value traced in fn and so cannot be run outside fn's own trace) is not held against
    the rule."""
    if isinstance(e, jax.errors.UnexpectedTracerError):
        return False
    if _nonlinear_tangent(e) or _mismatched_tangent(e):
        return True
    tb = e.__traceback__
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename
        if not _is_library(fname) and f"{os.sep}funcgrad{os.sep}" not in fname and not fname.startswith("<"):
            return True
        tb = tb.tb_next
    text = str(e)
    return bool(re.search(r"custom_vjp|custom_jvp|bwd|jvp rule|cotangent|tangent output", text)) and bool(
        re.search(r"shape|dtype|structure|container|length|number|must (?:produce|return)", text))


def _mismatched_tangent(e: BaseException) -> bool:
    """Whether JAX's transpose of a rule's tangent computation failed on two values of different types (its internal
    assertion shows both): a tangent of another shape than its primal, which a custom_jvp's rule (or a ``defjvps``
    entry, whose tangents JAX adds as they come) gave by broadcasting. Forward mode through it may even run; reverse
    mode (jax.grad) through the rule always fails so."""
    return isinstance(e, AssertionError) and len(re.findall(r"ShapedArray\(", str(e))) >= 2


def _nonlinear_tangent(e: BaseException) -> bool:
    """Whether JAX failed to transpose a custom_jvp rule's tangent because it is not linear in it (``0.5 * t**2``):
    an internal assertion on the accumulated cotangents, which reverse mode through the rule always meets."""
    return (isinstance(e, AssertionError) and "Accum" in str(e)) or (
        isinstance(e, NotImplementedError) and "Transpose rule (for reverse-mode differentiation)" in str(e))


def _first_sentence(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text.split('. ')[0][:200]}" if text else type(e).__name__


def _error(e: BaseException) -> str:
    """An error in a line: its first paragraph (JAX's wrap mid-sentence), up to 600 characters."""
    if _nonlinear_tangent(e):
        return ("JAX cannot transpose the rule's tangent computation, so reverse mode (jax.grad) through the rule "
                "fails: is its tangent output not linear in the input tangents (a term like t**2, or t used in a "
                f"branch)? ({_first_sentence(e)})")
    if _mismatched_tangent(e):
        return ("JAX cannot transpose the rule's tangent computation, so reverse mode (jax.grad) through the rule "
                "fails: a tangent has another shape or dtype than its primal value (does the rule's JVP, or one of its "
                f"defjvps entries, return a tangent that only broadcasts to its output's shape?) ({_first_sentence(e)})")
    text = str(e).strip()
    msg = " ".join(text.split("\n\n")[0].split()) if text else ""
    msg = msg.split(" at loc(")[0]  # (an MLIR verifier's location dump: funcgrad's own frames, no help)
    msg = msg if len(msg) <= 600 else msg[:597] + "..."
    hint = ("; the check met two dtypes where the rule computes one: a value the rule holds at a fixed dtype (a "
            "NumPy float64 array in nondiff_argnums or closed over, which keeps the float32 that JAX converted it to "
            "once in this process; a constant made with jnp.float32) meets the float64 check's; make it a JAX array "
            "of the dtype the model computes in (jnp.asarray(a, jnp.float32)), make it follow the inputs' dtype, or "
            "pass it as an array argument" if "same dtypes" in text or "requires compatible types" in text else "")
    return (f"{type(e).__name__}: {msg}" if msg else type(e).__name__) + hint


def _differentiable(eqn: Any, call: _Call, diff_pos: tuple[int, ...],
                    float_outs: tuple[int, ...]) -> tuple[tuple[int, ...], str, str]:
    """The floating inputs the rule can be differentiated with respect to (``equinox.filter_custom_vjp``
    differentiates its first argument only, and refuses the others), a note on those it refuses, and, when the
    rule's derivative itself fails (see :func:`_defect`), what failed."""

    def works(pos: tuple[int, ...]) -> BaseException | None:
        s = _scalars(eqn, call, pos, float_outs, plain=False)
        n_c = int(eqn.params.get("num_consts", 0))
        fixed = tuple(call.inputs[i] for i in range(len(call.inputs)) if i - n_c not in pos)
        try:
            jax.eval_shape(jax.grad(s.rule), tuple(call.inputs[n_c + i] for i in pos), fixed,
                           _extra_shapes(eqn, call, pos, float_outs))
        except Exception as e:  # noqa: BLE001 - any refusal: the input is held fixed, or the rule is broken
            return e
        return None

    failed = works(diff_pos)
    if failed is None:
        return diff_pos, "", ""
    if _defect(failed):
        return (), "", _error(failed)
    errors = {i: works((i,)) for i in diff_pos}
    defects = [e for e in errors.values() if e is not None and _defect(e)]
    if defects:
        return (), "", _error(defects[0])
    ok = tuple(i for i, e in errors.items() if e is None)
    refused = [i for i, e in errors.items() if e is not None]
    first = errors[refused[0]] if refused else None
    why = _error(first if first is not None else failed)
    note = (f"the rule cannot be differentiated with respect to input(s) {refused} ({why}); they are held fixed"
            if ok else f"the rule cannot be differentiated with respect to any of its inputs ({why})")
    return (ok if works(ok) is None else ()), note, ""


def _with_inputs(call: _Call, n_c: int, diff_pos: tuple[int, ...], d: Sequence[Any]) -> list:
    """The call's inputs (its ``n_c`` constants first) with the differentiated ones (``diff_pos``) replaced by ``d``."""
    xs = list(call.inputs)
    for i, x in zip(diff_pos, d, strict=True):
        xs[n_c + i] = x
    return xs


def _explicit_type(aval: Any) -> bool:
    """Whether a value of this type is sharded along an explicit mesh axis (the sharding part of its type)."""
    return _along_explicit_axes(getattr(aval, "sharding", None))


def _as_typed(eqn: Any, f: Callable) -> Callable:
    """``f(*xs)`` (a rule's call, or its primal, at a call's inputs ``xs``) for a call of ``eqn``; where fn placed the
    rule's inputs or outputs along explicit mesh axes (shardings are part of JAX's types there, and a bwd handed a
    cotangent of another type is refused), the inputs, held replicated by the audit (see ``_replicated``), are
    placed as the call placed them and the outputs replicated, compiled (the placements are the jaxpr's abstract
    ones). Otherwise ``f`` itself."""
    ins = [v.aval for v in eqn.invars]
    if not any(_explicit_type(v.aval) for v in (*eqn.invars, *eqn.outvars)):
        return f

    @jax.jit
    def placed(*xs: Any) -> list:
        xs = tuple(jax.sharding.reshard(x, a.sharding) if _explicit_type(a) else x for x, a in zip(xs, ins, strict=True))
        outs = []
        for y in f(*xs):
            t = jax.typeof(y)
            outs.append(jax.sharding.reshard(y, jax.sharding.NamedSharding(t.sharding.mesh, jax.sharding.PartitionSpec()))
                        if _explicit_type(t) else y)
        return outs

    return placed


def _call_outputs(eqn: Any, call: _Call, diff_pos: tuple[int, ...], float_outs: tuple[int, ...]) -> Callable:
    """The rule's floating outputs at this call as a function of its differentiated inputs (bound as fn binds it)."""
    n_c = int(eqn.params.get("num_consts", 0))
    bind = _as_typed(eqn, lambda *xs: _bind(eqn, list(xs)))

    def outs(*d: Any) -> list:
        res = bind(*_with_inputs(call, n_c, diff_pos, d))
        return [res[j] for j in float_outs]

    return outs


class _Gap(NamedTuple):
    """Where the rule's forward differs from its primal at a call (see :func:`_forward_gap`)."""

    text: str = ""  # a description ("" where they agree)
    abs: float = 0.0  # the gap there, absolute and relative
    rel: float = 0.0
    unverified: str = ""  # what could not be compared, and why ("" for nothing)


_NO_GAP = _Gap()  # the rule's forward agrees with its primal (or was not compared)


def _forward_gap(eqn: Any, call: _Call, diff_pos: tuple[int, ...],
                 float_outs: tuple[int, ...]) -> _Gap:
    """Where the rule's primal output under differentiation (what its ``fwd``, or its JVP rule, returns) differs
    from its primal function's at this call, beyond the output dtype's tolerance: a description, else "". Under
    ``jax.grad`` the model then computes on from the rule's value, so its value and gradient are another
    function's, even when the rule's derivative matches the primal's. Output elements the primal does not give
    finite are compared with it evaluated in float64 (a stable forward where the plain formula overflows is the
    reason for a rule; one wrong only there is still wrong), and said to be unverified where that is not finite
    either. Also the absolute and relative gap there ("", 0, 0 where they agree)."""
    n_c = int(eqn.params.get("num_consts", 0))
    ins = list(call.inputs)

    outs = _call_outputs(eqn, call, diff_pos, float_outs)

    xs = [ins[n_c + i] for i in diff_pos]
    try:
        under = jax.vjp(outs, *xs)[0]
        plain = outs(*xs)
    except Exception:  # noqa: BLE001 - a rule that fails here fails its derivative's check, which says why
        return _NO_GAP
    # The forward and the primal compute the same values, each rounding at the lowest precision inside either: the
    # output dtype's tolerance of the element plus the outputs' typical size (at least 1), and where a lower
    # precision is computed inside (a fwd computing in bfloat16 for a float32 primal), 1024 units in its last place
    # (at most 5%) of the element plus the outputs' largest. (Not tighter: a primal that loses precision, a one-pass
    # variance beside a two-pass fwd at a mean of 30 standard deviations, differs from a correct fwd by 2e-4 in
    # float32; an approximation, tanh GELU for erf GELU at 5e-4, is then caught in float64 only.)
    try:
        inside = _lowest_float(jax.make_jaxpr(lambda *a: jax.vjp(outs, *a)[0])(*xs).jaxpr, top=False)
        inside = _lower(inside, _lowest_float(_call_jaxpr(eqn).jaxpr, top=False))
    except Exception:  # noqa: BLE001 - then the outputs' dtypes' tolerance, as for any value
        inside = None
    wide: list | None = None  # (the primal in float64, evaluated once, where it overflows at its own precision)
    jitter: tuple[list, list] | None = None  # (the primal's and the forward's values' second differences, once)
    unverified = 0
    for k, (j, u, p) in enumerate(zip(float_outs, under, plain, strict=True)):
        p64, u64 = np.asarray(p, np.float64), np.asarray(u, np.float64)
        beyond = ~np.isfinite(p64) & np.isfinite(u64)
        if beyond.any():
            # The forward's values where the primal overflows are what the model computes on (and what the rule's
            # derivative is checked along, see _extra): compared with the primal evaluated in float64 there.
            if wide is None:
                wide = _wide_primal(eqn, ins, float_outs) or []
            w = np.asarray(wide[k], np.float64) if wide else np.full_like(p64, np.nan)
            known = beyond & np.isfinite(w)
            p64 = np.where(known, w, p64)
            unverified += int((beyond & ~known).sum())
        fin = np.isfinite(p64)
        if not fin.any():
            continue
        out_eps = float(jnp.finfo(eqn.outvars[j].aval.dtype).eps)
        rtol = _default_rtol(out_eps)
        # (a lower precision inside widens it relative to the outputs themselves only, without the floor of 1 below:
        # a bfloat16 fwd returning twice outputs of 0.01 must not pass as 5% of 1)
        low = 0.0 if inside is None else max(0.0, min(0.05, 1024 * float(jnp.finfo(inside).eps)) - rtol)
        with np.errstate(invalid="ignore"):
            gap = np.where(fin, np.abs(u64 - p64), 0.0)
            # (per element, with a floor of the dtype's tolerance of 1 or of the outputs' typical size: a primal
            # that loses what a stable forward keeps, log(1 + x) at x = 1e-9, or outputs that cancel to rounding,
            # differ from it by far more than their own size; one large output must not hide the others)
            typical = float(np.median(np.abs(p64[fin])))
            # (the lower precision's rounding of the element plus the outputs' largest: near a ReLU's kink, where
            # most outputs are 0, a bfloat16 rounding of the pre-activation has no bound relative to the element)
            largest = float(np.max(np.abs(p64[fin])))
            bad = fin & ~(gap <= rtol * (np.abs(p64) + max(typical, 1.0)) + low * (np.abs(p64) + largest))
            if bad.any() and jnp.finfo(eqn.outvars[j].aval.dtype).bits < 64:
                # The primal may be what loses precision at its own dtype (a one-pass variance of data at an offset
                # beside a two-pass fwd, (1 - cos x)/x² beside its series, h93): where the forward agrees with the
                # primal evaluated in float64, the forward is right.
                if wide is None:
                    wide = _wide_primal(eqn, ins, float_outs) or []
                if wide:
                    w = np.asarray(wide[k], np.float64)
                    near = np.isfinite(w) & (np.abs(u64 - w) <= rtol * (np.abs(w) + max(typical, 1.0))
                                             + low * (np.abs(w) + largest))
                    bad &= ~near
        if bad.any():
            # The primal may lose precision even in float64 ((1 − cos x)/x² at 1e-7 is 0.4996 for 0.5): where its value
            # jumps between neighbouring inputs by as much as it differs from the forward, whose values stay smooth
            # there, the primal is rounding, not the forward wrong (see _beside_noisy_reference).
            if jitter is None:
                jitter = _value_jitter(outs, xs)
            if jitter is not None and jitter[0][k].shape == gap.shape:
                with np.errstate(invalid="ignore"):
                    bad &= ~((jitter[0][k] >= 0.25 * gap) & (jitter[1][k] <= 0.01 * gap))
        if bad.any():
            at = np.unravel_index(int(np.argmax(np.where(bad, np.nan_to_num(gap, nan=np.inf), -1.0))), p64.shape)
            return _Gap(f"under differentiation the rule's forward returns another primal output than its primal function: "
                    f"output {j} at {[int(i) for i in at]} is {u64[at]:.6g} there, {p64[at]:.6g} from the primal "
                    f"({int(bad.sum())} of {bad.size} element(s) differ, {rtol + low:.1g} of the element plus the outputs' "
                    "size allowed); jax.grad through the rule then computes from the wrong value",
                    float(gap[at]), float(gap[at]) / max(abs(float(p64[at])), 1e-300))
    if unverified:
        return _Gap(unverified=f"the forward's values at {unverified} element(s) where the primal function is not "
                              "finite, even in float64 (or where it cannot be evaluated in float64), are not compared "
                              "with it: the rule's derivative is checked along the forward's own values there")
    return _NO_GAP


def _value_jitter(outs: Callable, xs: Sequence[Any]) -> tuple[list, list] | None:
    """The second differences (see :func:`_second_differences`) of the primal's float outputs and of the rule's
    forward's at the call's differentiated inputs ``xs``; None where they cannot be evaluated."""
    try:
        with jax.enable_x64(True):
            primal = _second_differences(lambda d: outs(*d), tuple(xs), (), 1)[1]
            forward = _second_differences(lambda d: jax.vjp(outs, *d)[0], tuple(xs), (), 1)[1]
    except Exception:  # noqa: BLE001 - then the gap stands as measured
        return None
    return primal, forward


def _wide_primal(eqn: Any, ins: Sequence[Any], float_outs: tuple[int, ...]) -> list | None:
    """The rule's primal function at the call's inputs ``ins`` evaluated in float64 (its floating values, literals and
    dtypes widened), its floating outputs ``float_outs``; None where that cannot be done (a loop or a branch inside,
    a primitive that refuses float64)."""
    closed = _call_jaxpr(eqn)
    try:
        with jax.enable_x64(True):
            out = _as_typed(eqn, lambda *xs: _run_widened(closed.jaxpr, closed.consts, list(xs)))(*ins)
            return [np.asarray(out[j], np.float64) for j in float_outs]
    except Exception:  # noqa: BLE001 - not evaluable in float64: those elements stay unverified, and are said to be
        return None


def _widened(x: Any) -> Any:
    """A floating value in float64; others as they are."""
    dt = jnp.result_type(x)
    return jnp.asarray(x, jnp.float64) if jnp.issubdtype(dt, jnp.floating) else x


def _run_widened(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list:
    """``jaxpr`` evaluated in float64 (under x64): its floating inputs, constants, literals and dtype parameters
    widened, the calls inside followed (a custom rule's as its primal); raises :class:`_NotWidened` at a loop or a
    branch. Traceable: JAX differentiates through it."""
    env: dict = {}

    def read(v: Any) -> Any:
        return _widened(v.val) if isinstance(v, Literal) else env[v]

    for v, x in zip((*jaxpr.constvars, *jaxpr.invars), (*consts, *args), strict=True):
        env[v] = _widened(x)
    for e in jaxpr.eqns:
        invals = [read(v) for v in e.invars]
        inner = e.params.get("jaxpr", e.params.get("call_jaxpr"))
        if e.primitive.name in _WIDE_CALLS and inner is not None:
            outs = _run_widened(getattr(inner, "jaxpr", inner), getattr(inner, "consts", ()), invals)
        elif any(hasattr(getattr(x, "jaxpr", x), "eqns") for x in e.params.values()):
            raise _NotWidened(e.primitive.name)  # (a loop or a branch)
        else:
            outs = _bind(e, invals, _widened_params(e.params))
        for v, o in zip(e.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


class _NotWidened(Exception):
    """An equation :func:`_wide_primal` does not evaluate in float64 (one holding a sub-computation of its own)."""


_WIDE_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
                         "custom_vjp_call", "custom_vjp_call_jaxpr"})  # (evaluated through, as their primal)


def _inputs_to_check(call: _Call, n_c: int) -> tuple[tuple[int, ...], list[int], list[int], list[int]]:
    """The rule's inputs to differentiate at a call (floating, non-empty, not held by the framework), those held
    fixed besides: numbers written into fn (a hyperparameter, whose cotangent the bwd may leave None), and for a rule
    with symbolic zeros the inputs fn's gradient does not perturb (its fwd may take another path for them, reading
    ``.perturbed``: the rule is checked as fn's gradient runs it); and, among the inputs to differentiate, those off
    the parameters' gradient path beside ones on it."""
    user_inputs = call.inputs[n_c:]
    diff_pos = tuple(i for i, x in enumerate(user_inputs)
                     if jnp.issubdtype(jnp.result_type(x), jnp.floating) and np.size(x) > 0 and i not in call.held)
    constants = [i for i in diff_pos if call.literal and call.literal[n_c + i]]
    if len(constants) < len(diff_pos):
        diff_pos = tuple(i for i in diff_pos if i not in constants)
    else:  # only constants of fn's: the rule is still checked, at them (its derivative there is off fn's gradient path)
        constants = []
    # Inputs that do not depend on the selected parameters (labels, data) beside ones that do: no gradient of the
    # parameters passes through their cotangent. A rule with symbolic zeros is not even asked for it (unperturbed:
    # held); any other rule's is checked unless it gives none (see _declared_none), as a fused cross-entropy's None
    # for its labels.
    unperturbed: list[int] = []
    off_path: list[int] = []
    if call.taint and any(call.taint[n_c + i] for i in diff_pos):
        off_path = [i for i in diff_pos if not call.taint[n_c + i]]
        if call.eqn.params.get("symbolic_zeros"):
            unperturbed, off_path = off_path, []
            diff_pos = tuple(i for i in diff_pos if call.taint[n_c + i])
    return diff_pos, constants, unperturbed, off_path


def _inexact(v: Any) -> bool:
    """Whether a jaxpr variable holds floating-point (or complex) values, which a gradient can reach."""
    dt = getattr(getattr(v, "aval", None), "dtype", None)
    return dt is None or bool(jnp.issubdtype(dt, jnp.inexact))


def _hold_declared_none(eqn: Any, call: _Call, diff_pos: tuple[int, ...], off_path: list[int],
                        float_outs: tuple[int, ...], scalars: dict, made: tuple,
                        held: str) -> tuple[tuple[int, ...], str]:
    """The inputs to differentiate without those :func:`_declared_none` finds (while others remain), and the held
    note with theirs; the scalars for the inputs left are made. ``made``: :func:`_extra` for ``diff_pos``."""
    try:
        none = _declared_none(eqn, call, diff_pos, off_path, scalars, made)
    except Exception:  # noqa: BLE001 - the rule failing here fails in its check, and is reported there
        none = []
    if not none or len(none) == len(diff_pos):
        return diff_pos, held
    left = tuple(i for i in diff_pos if i not in none)
    if (id(eqn), left) not in scalars:
        scalars[id(eqn), left] = _scalars(eqn, call, left, float_outs)
    return left, "; ".join([n for n in (held,) if n] + [
        f"input(s) {none} held fixed: the rule gives them no cotangent (None, or zeros), and they are off the "
        "selected parameters' gradient path (data, labels, values under stop_gradient, made by round, floor, ceil "
        "or sign, or reached only by parameters wrt= leaves out), so no gradient of those parameters passes through "
        "it; pass them in params (selected by wrt=) to have it checked"])


def _declared_none(eqn: Any, call: _Call, diff_pos: tuple[int, ...], off_path: list[int], scalars: dict,
                   made: tuple) -> list[int]:
    """Of the inputs ``off_path`` (off the parameters' gradient path), those the rule gives no cotangent at this
    call (exact zeros at every element, as its bwd's None gives): the rule declares them not differentiated.
    ``made``: :func:`_extra` for ``diff_pos``, whose scalar is in ``scalars``."""
    if not off_path:
        return []
    extra, diff, _, _ = made
    n_c = int(eqn.params.get("num_consts", 0))
    fixed = tuple(call.inputs[i] for i in range(len(call.inputs)) if i - n_c not in diff_pos)
    g = jax.grad(scalars[id(eqn), diff_pos].rule)(tuple(jnp.asarray(d) for d in diff), fixed, extra)
    return [i for i, gi in zip(diff_pos, g, strict=True) if i in off_path and not np.any(np.asarray(gi))]


def _amended(report: GradReport, extra_rows: list[Row], left_out: bool) -> GradReport:
    """A call's report with the rows of the checks beyond check_grad (held inputs, linearity) and, at a call with
    outputs left out (``left_out``), a both_wrong where both sides are not finite made undecided: the NaN may be that
    of an output the scalar leaves out (a reduction in a vmapped cond's discarded branch), which fn's gradient
    discards too, not "a mistake both share"."""
    rows = report.rows
    if left_out:
        rows = tuple(
            dataclasses.replace(r, verdict=Verdict.MISMATCH, note=re.sub(
                r", confidently: a mistake both share \([^)]*\)", "; both are not finite, at a call with outputs left out: "
                "that may be those outputs' NaN, which fn may discard, so undecided", r.note))
            if r.verdict == Verdict.BOTH_WRONG and not math.isfinite(r.autodiff or math.nan)
            and not math.isfinite(r.hand if r.hand is not None else math.nan) else r for r in rows)
    return dataclasses.replace(report, rows=(*rows, *extra_rows)) if rows is not report.rows or extra_rows else report




def _scalars_key(scalars: dict, eqn: Any, call: _Call, diff_pos: tuple[int, ...], float_outs: tuple[int, ...],
                 forward: bool) -> tuple:
    """The key of a call's scalars in ``scalars``, made there if missing; ``forward``: with the output elements only
    the rule's forward gives finite (see :func:`_extra`)."""
    key = (id(eqn), diff_pos, "forward") if forward else (id(eqn), diff_pos)
    if key not in scalars:
        scalars[key] = _scalars(eqn, call, diff_pos, float_outs, forward=forward)
    return key


def _check_call(call: _Call, k: int, scalars: dict,
                options: dict) -> tuple[GradReport | None, tuple[int, ...], str, _Gap]:
    """check_grad of one call: the report, the rule's input number of each report row, a note when the call
    could not be checked, and where the rule's forward differs from its primal (see :func:`_forward_gap`)."""
    eqn = call.eqn
    n_c = int(eqn.params.get("num_consts", 0))
    user_inputs = call.inputs[n_c:]
    diff_pos, constants, unperturbed, off_path = _inputs_to_check(call, n_c)
    float_outs = tuple(j for j, v in enumerate(eqn.outvars) if jnp.issubdtype(v.aval.dtype, jnp.floating))
    complex_io = [f"input {i}" for i, x in enumerate(user_inputs)
                  if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating) and i not in call.held]
    complex_io += [f"output {j}" for j, v in enumerate(eqn.outvars) if jnp.issubdtype(v.aval.dtype, jnp.complexfloating)]
    if complex_io:  # undecided, not "nothing to differentiate": a complex rule's derivative is not checked here
        return None, (), (f"not checked at this call: {', '.join(complex_io)} complex; funcgrad checks real "
                          "derivatives only"), _NO_GAP
    # Only the outputs fn goes on to use carry a cotangent (Flax NNX's custom_vjp also returns its input state, which
    # fn drops, and whose cotangent its bwd builds itself); all of them when fn uses none.
    dropped = ""
    if call.live is not None and any(j in call.live for j in float_outs):
        unused = [j for j in float_outs if j not in call.live]
        float_outs = tuple(j for j in float_outs if j in call.live)
        dropped = (f"output(s) {unused} not used by fn at this call: the rule's handling of their cotangents is not "
                   "checked here (nor does it reach fn's gradient)") if unused else ""
    if not diff_pos or not float_outs:
        what = ("its floating-point inputs are all constants of fn's" if not diff_pos and constants else
                "no floating-point " + ("input" if not diff_pos else "output"))
        return None, (), _NOTHING + what, _NO_GAP
    if (id(eqn), "inputs") not in scalars:
        scalars[id(eqn), "inputs"] = _differentiable(eqn, call, diff_pos, float_outs)
    diff_pos, refused, broken = scalars[id(eqn), "inputs"]
    if broken:
        return None, (), _BROKEN + broken, _NO_GAP
    if not diff_pos:
        return None, (), refused, _NO_GAP
    key = (id(eqn), diff_pos)
    if key not in scalars:
        scalars[key] = _scalars(eqn, call, diff_pos, float_outs)
    held = "; ".join(
        [f"input(s) {list(call.held)} held fixed: the framework marks them as not differentiated"] * bool(call.held)
        + [f"input(s) {constants} held fixed: numbers written into fn, which no gradient moves"] * bool(constants)
        + [f"input(s) {unperturbed} held fixed: a rule with symbolic zeros is checked as fn's gradient (with respect "
           "to the selected parameters) runs it, and that does not perturb them"] * bool(unperturbed))
    try:
        made = _extra(eqn, call, diff_pos, float_outs, np.random.default_rng([options["seed"] % 2**32, k]))
        held_pos, held = _hold_declared_none(eqn, call, diff_pos, off_path, float_outs, scalars, made, held)
        if held_pos != diff_pos:  # (the scalar and its inputs, for the inputs left)
            diff_pos = held_pos
            made = _extra(eqn, call, diff_pos, float_outs, np.random.default_rng([options["seed"] % 2**32, k]))
    except Exception as e:  # noqa: BLE001 - the rule's primal failing on its own inputs: reported, not raised
        return None, (), f"could not be checked at this call ({_error(e)})", _NO_GAP
    extra, diff, out_masks, partial = made
    key = _scalars_key(scalars, eqn, call, diff_pos, float_outs, forward=len(extra) > 2)
    if not any(m.any() for m in out_masks):
        return None, (), (_NOTHING + "no output element is finite at this call, from the primal function or from the "
                          "rule's forward"), _NO_GAP
    if not any(m.any() for m, _ in extra[1]):
        return None, (), _NOTHING + "no input element is finite at this call", _NO_GAP
    s = scalars[key]._replace(note="; ".join(n for n in (scalars[key].note, refused, held, partial, dropped) if n))
    fixed = tuple(call.inputs[i] for i in range(len(call.inputs)) if i - n_c not in diff_pos)
    # Traced (reuse=False): a repeated audit of an unchanged model shares the first one's compilations (see
    # _traced). A rule with symbolic zeros (equinox.filter_custom_vjp's too), itself or called inside it, cannot be
    # differentiated once re-evaluated from its trace, and a failed try leaves its memoized traces unusable: such a
    # rule is checked as itself, compiled afresh at each audit.
    reuse = _symbolic_zeros(eqn)
    try:
        report = _rule_check(s, diff, (fixed, extra), options, options["seed"] + k, reuse)
        report = _second_cotangent(report, s, eqn, call, diff_pos, float_outs, fixed, options, k, reuse)
        extra_rows = [r for r in (_held_gap(eqn, call, diff_pos, float_outs, extra, s.plain is not None),
                                  _nonlinear_gap(eqn, call, diff_pos, float_outs, extra)) if r is not None]
    except Exception as e:  # noqa: BLE001 - the user's rule failing under check_grad: reported, not raised
        if _defect(e):
            return None, (), _BROKEN + _error(e), _NO_GAP
        if isinstance(e, jax.errors.UnexpectedTracerError):
            return None, (), ("could not be checked at this call: the rule's derivative closes over a value traced "
                              "inside fn (a parameter, say, or an array given through nondiff_argnums), so it cannot "
                              "be evaluated outside fn's own trace; pass that value to the rule as a differentiable "
                              "argument (not through nondiff_argnums; or use jax.closure_convert) to have it "
                              "checked"), _NO_GAP
        return None, (), f"could not be checked at this call ({_error(e)})", _NO_GAP
    report = _amended(report, extra_rows, left_out=not all(m.all() for m in out_masks))
    return report, diff_pos, s.note, _forward_gap(eqn, call, diff_pos, float_outs)


def _narrow(report: GradReport, diff: Any) -> bool:
    """Whether a passing check of a call read ok some element farther from its reference, relative to the element, than
    the tolerance of its input's dtype allows an element alone (``_default_rtol``): the tolerance also grows with the
    input's largest derivative, so an element that the random output cotangent happened to make small hides a gap
    there that a cotangent drawn again would show (a float32 layer norm's dgamma 5% off at one channel, which the
    first draw made 0.4% of the largest, passed so, h105)."""
    dtypes = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(diff)]

    def apart(a: float | None, b: float | None, rtol: float) -> bool:
        return a is None or b is None or not abs(a - b) <= rtol * abs(b)  # (NaN: apart)

    # Only rows that read ok, and whose rule lies apart from both the primal's plain autodiff and finite differences
    # at the deciding element: a row the check could not decide, beside a primal whose plain autodiff is rounding
    # noise say, is not made any surer by another draw (a draw where the noise happened to look confident failed a
    # right rule so), nor is a rule that agrees with finite differences where only the reference is off.
    return len(dtypes) == len(report.rows) and any(
        r.verdict == Verdict.OK and apart(r.autodiff, r.hand, rtol) and apart(r.autodiff, r.numeric, rtol)
        for r, d in zip(report.rows, dtypes, strict=True) if jnp.issubdtype(d, jnp.floating)
        for rtol in (_default_rtol(float(jnp.finfo(d).eps)),))


def _second_cotangent(report: GradReport, s: _Scalars, eqn: Any, call: _Call, diff_pos: tuple[int, ...],
                      float_outs: tuple[int, ...], fixed: tuple, options: dict, k: int, reuse: bool) -> GradReport:
    """A narrow pass (see :func:`_narrow`) checked again under an output cotangent drawn afresh (the same compiled
    programs: the cotangent is an argument): its failure, where it fails, else the first check (``report``)."""
    n_c = int(eqn.params.get("num_consts", 0))
    if not (report.ok and _narrow(report, [call.inputs[n_c + i] for i in diff_pos])):
        return report
    extra, diff, _, _ = _extra(eqn, call, diff_pos, float_outs, np.random.default_rng([options["seed"] % 2**32, k, 1]))
    again = _rule_check(s, diff, (fixed, extra), options, options["seed"] + k + 1, reuse)
    if again.ok:
        return report
    rows = tuple(dataclasses.replace(r, note=(
        "under a second random output cotangent (the first made the deciding element small beside the input's "
        f"largest derivative, which the tolerance grows with, and passed at most {report.rows[j].max_rel_err:.2g} of "
        f"an element apart): {r.note}" if r.note else "under a second random output cotangent"))
        if r.verdict in _FAILING else r for j, r in enumerate(again.rows))
    return dataclasses.replace(again, rows=rows)


@jax.custom_jvp
def _no_value(x: Any) -> Any:
    """0, with the derivative of ``x``: adds a scalar's derivative to another's value (see :func:`_valued_wide`). Its
    value does not read ``x``, so a program that only evaluates it does not compute ``x`` at all."""
    return jnp.zeros_like(x)


@_no_value.defjvp
def _no_value_jvp(primals: tuple, tangents: tuple) -> tuple:
    return jnp.zeros_like(primals[0]), tangents[0]


def _valued_wide(s: _Scalars, diff: Any, args: tuple) -> Callable:
    """The scalar a call's check differentiates: the rule's (``s.rule``: its derivative is the rule), with its value,
    which finite differences read, that of the primal evaluated in float64 (``s.wide_value``) where the call is below
    float64 and that value is finite at the call's inputs; else ``s.rule`` itself. check_grad's finite differences
    run in float64, but a rule's scalar evaluates the primal at the call's own dtypes (as the model computes it), and
    there a primal whose terms cancel ((1 − cos x)/x² at 5e-4 in float32, where 1 − cos x stays one constant over
    steps below 1e-4) is another smooth function at fine steps (c/x², slope −1700 where the true one is −4e-5), which
    finite differences read confidently: a right stable rule failed so. In the float64 check only (inputs in
    float64): at the parameters' own precision the scalar is the rule's, as before."""
    leaves = jax.tree_util.tree_leaves(diff)
    if s.wide_value is None or not any(_below_float64(leaves)):
        return s.rule
    wide_value = s.wide_value
    try:
        with jax.enable_x64(True):
            finite = bool(np.isfinite(float(wide_value(jax.tree_util.tree_map(_widened, diff), *args))))
    except Exception:  # noqa: BLE001 - the primal not evaluable in float64 here: finite differences as before
        return s.rule
    if not finite:  # (a primal that overflows even in float64, a softplus at 800: the forward's values, as before)
        return s.rule

    def valued(at: Any, *rest: Any) -> Any:
        if not all(jnp.result_type(x) == jnp.float64 for x in jax.tree_util.tree_leaves(at)
                   if jnp.issubdtype(jnp.result_type(x), jnp.floating)):
            return s.rule(at, *rest)
        # (no tangent reaches the primal in float64: another rule inside it, a pure_callback's, may have no JVP)
        return jax.lax.stop_gradient(wide_value(jax.lax.stop_gradient(at), *rest)) + _no_value(s.rule(at, *rest))

    return valued


def _wide_bound(dtype: Any) -> tuple[float, float]:
    """How far a rule's gradient at ``dtype`` may lie from a float64 reference: (rel, limit), allowed rel of each
    element plus limit of the input's largest: the dtype's own tolerance (``_default_rtol``, as check_grad's), at
    least 100 units in its last place (at least 1e-5, at most 5%: ``_own_limit``), and that limit of the largest."""
    eps = float(jnp.finfo(dtype).eps)
    limit = _own_limit(eps)
    return max(limit, _default_rtol(eps)), limit


def _draws(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (or one inside it) draws random numbers."""
    return _uses(jaxpr, lambda e: e.primitive.name.startswith("random_") or e.primitive.name == "threefry2x32")


def _at_model_precision(s: _Scalars, diff: Any, args: tuple) -> GradReport | None:
    """A call whose rule's primal draws random numbers (``s.draws``), and whose derivative draws others with 64-bit
    floats enabled, as
    check_grad's float64 check runs it (a fused dropout's bwd drawing its mask with ``jax.random.bernoulli(key, 1.0 -
    rate, ...)``: a Python float probability is float64 there, and the mask another): checked at the model's own
    setting only, the rule's derivative against the primal's plain autodiff (which replays the model's draws) to
    within the dtype's tolerance of each element plus 100 units in the last place of the input's largest; without
    finite differences, which would move along other draws. A row per input: ``ok`` where they agree, ``mismatch``
    where not (no finite differences to blame a side), ``fd_unreliable`` without a plain autodiff. None for any other
    call (the check as usual), and where the caller runs in 64-bit floats already."""
    if not s.draws or jax.config.read("jax_enable_x64"):
        return None
    def leaves64(f: Callable) -> list[np.ndarray]:
        return [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(f(diff, *args))]

    grad = jax.jit(jax.grad(s.rule))  # (compiled: a key array among the fixed inputs is only cast so inside a trace)
    try:
        own = leaves64(grad)
        with jax.enable_x64(True):
            wide = leaves64(grad)  # (traced again: the x64 setting is part of the compilation's key)
        ref = None if s.plain is None else leaves64(jax.jit(s.plain))
    except Exception:  # noqa: BLE001 - the derivative failing so: the check as usual, which reports it
        return None
    leaves = jax.tree_util.tree_leaves(diff)

    def gap(a: np.ndarray, b: np.ndarray, dt: Any) -> tuple[np.ndarray, np.ndarray]:  # |a - b|, and what it may be
        rel, limit = _wide_bound(dt)
        with np.errstate(invalid="ignore"):
            allowed = rel * np.abs(b) + limit * float(np.max(np.abs(b), initial=0.0))
            return np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b)), allowed

    if any(g.shape != w.shape for g, w in zip(own, wide, strict=True)):
        return None
    apart = [(g, w, d) for g, w, x in zip(own, wide, leaves, strict=True)
             for d, allowed in (gap(g, w, jnp.result_type(x)),) if not np.all(d <= allowed)]
    if not apart:
        return None  # (the same derivative either way: the check as usual)
    g0, w0, d0 = apart[0]
    k0 = int(np.nanargmax(d0)) if d0.size else 0
    why = (f"the rule's derivative draws other random numbers with 64-bit floats enabled, as the float64 check runs "
           f"it ({float(g0.flat[k0]):.6g} against {float(w0.flat[k0]):.6g} at one element: a Python float given to "
           "jax.random, say, which is float64 there; jnp.float32(p) draws the same either way): checked at the model's "
           "own precision only, against JAX's derivative of the primal (traced without the rule), without finite "
           "differences")
    rows = []
    for i, (g, x) in enumerate(zip(own, leaves, strict=True)):
        shape, size = tuple(np.shape(x)), int(np.size(x))
        if ref is None or ref[i].shape != g.shape:
            rows.append(Row(f"[{i}]", Verdict.FD_UNRELIABLE, None, math.nan, math.nan, None, None, None, "exact", size,
                            0, 0, f"{why}; JAX cannot differentiate the primal without the rule: not checked"))
            continue
        d, allowed = gap(g, ref[i], jnp.result_type(x))
        k = int(np.nanargmax(d / np.maximum(allowed, 1e-300))) if d.size else 0
        a, b = (float(g.flat[k]), float(ref[i].flat[k])) if d.size else (math.nan, math.nan)
        ok = bool(np.all(d <= allowed))
        rel = float(d.flat[k]) / max(abs(a), abs(b), 1e-300) if d.size else 0.0
        rows.append(Row(f"[{i}]", Verdict.OK if ok else Verdict.MISMATCH,
                        tuple(int(j) for j in np.unravel_index(k, shape)) if d.size else None,
                        float(d.flat[k]) if d.size else 0.0, rel, a, b, None, "exact", size, size, 0,
                        f"{why}: " + ("they agree at every element" if ok else
                                      f"they disagree at {int(np.sum(d > allowed))} element(s), the largest gap at "
                                      "the element shown")))
    return GradReport(tuple(rows), _combine_verdicts([r.verdict for r in rows]), notes=(why,))


def _rule_check(s: _Scalars, diff: Any, args: tuple, options: dict, seed: int, reuse: bool) -> GradReport:
    """check_grad of a rule's scalar at one call (against its primal's plain autodiff, the reference), with the
    second look where kinks meet: inputs where several kinks meet inside the primal (integer data at a fused
    dense + ReLU rule) are checked again off them, as check_grad does; the rule's inputs are moved off its kinks,
    never trusted at them. A rule whose derivative draws other random numbers in float64 is checked at the model's
    precision instead (see :func:`_at_model_precision`)."""
    drawn = _at_model_precision(s, diff, args)
    if drawn is not None:
        return drawn
    valued = _valued_wide(s, diff, args)

    def check(at: Any) -> GradReport:
        return _check_grad_impl(valued, at, args, hand=s.plain, has_aux=False, wrt=None, rtol=options["rtol"],
                                atol=options["atol"], mode=options["mode"], seed=seed, reuse=reuse,
                                hand_reference=True)

    report = _second_look(check(diff), check, s.rule, diff, args, hand=s.plain, has_aux=False, wrt=None, seed=seed,
                          primal=s.primal)
    if not report.ok and s.wide is not None:
        report = _beside_wide_primal(report, s, diff, args)
    if s.plain is None:
        return report

    def against_fd(at: Any) -> GradReport:
        return _check_grad_impl(valued, at, args, hand=None, has_aux=False, wrt=None, rtol=options["rtol"],
                                atol=options["atol"], mode=options["mode"], seed=seed, reuse=reuse)

    if any(r.verdict == Verdict.HAND_WRONG and r.numeric is not None for r in report.rows):
        report = _without_reference(report, s, diff, args, against_fd)
    if report.ok:
        return report
    return _beside_noisy_reference(report, s, diff, args, against_fd)


def _without_reference(report: GradReport, s: _Scalars, diff: Any, args: tuple,
                       against_fd: Callable[[Any], GradReport]) -> GradReport:
    """A check whose reference (the primal's plain autodiff: ``hand``) is off on its own at some rows
    (``hand_wrong``: the unstable formula a rule replaces, the rule passing beside finite differences), read again
    where that cannot be trusted:

    - where the call is below float64, the rule is compared with the primal's plain autodiff with the primal
      evaluated in float64 (``s.wide``) wherever that is finite: off it by more than the dtype's rtol of the element
      plus the input's largest, where that reference is smooth (see :func:`_second_differences`), the rule is
      ``autodiff_wrong``;
    - where the reference is larger than anything the rule gives, the tolerances, which grow with both sides' values,
      were the reference's: beside a plain autodiff of 5824 (for a true 0.063), a rule 20% off lay within them. Such a
      row is judged as the rule is without a reference, by finite differences alone (``against_fd``): ``ok`` only
      where they confirm the rule, ``fd_unreliable`` where they cannot decide (``kink`` and ``singular`` too: the
      primal's rounding passes for both), failing where they rule it out.

    Other rows stand."""
    leaves = jax.tree_util.tree_leaves(diff)
    if len(report.rows) != len(leaves):
        return report
    blamed = [r.verdict == Verdict.HAND_WRONG and r.numeric is not None for r in report.rows]
    low = _below_float64(leaves)
    try:
        with jax.enable_x64(True):
            rule = [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(jax.grad(s.rule)(diff, *args))]
            assert s.plain is not None
            plain = [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(s.plain(diff, *args))]
            wide: list = [None] * len(leaves)
            if s.wide is not None and any(b and lw for b, lw in zip(blamed, low, strict=True)):
                wide = list(zip(*_second_differences(s.wide, jax.tree_util.tree_map(_widened, diff), args, 1,
                                                     _NEAR_STEPS), strict=True))
    except Exception:  # noqa: BLE001 - the sides cannot be evaluated again: the check stands
        return report
    rows: list[Row | None] = []
    for row, b, lw, x, r, p, w in zip(report.rows, blamed, low, leaves, rule, plain, wide, strict=True):
        if not b or r.shape != p.shape:
            rows.append(row)
            continue
        if lw and w is not None and w[0].shape == r.shape:
            w64, wj = w
            # (as _beside_wide_primal reads a rule: the dtype's tolerance of the element plus 100 units in the last
            # place of the input's largest; a float32 rule 2% off at an element 2e-3 of the largest fails so, which
            # the dtype's rtol of the largest passed once finite differences in float64 confirmed it within it)
            rtol, limit = _wide_bound(jnp.result_type(x))
            fin = np.isfinite(w64) & np.isfinite(r)
            largest = float(np.max(np.abs(np.where(fin, w64, 0.0)), initial=0.0))
            with np.errstate(invalid="ignore"):
                gap = np.where(fin, np.abs(r - w64), 0.0)
                wrong = fin & (gap > rtol * np.abs(w64) + limit * largest) & (wj < 0.25 * gap)
            if np.any(wrong):
                k = int(np.argmax(np.where(wrong, gap, -1.0)))
                at = [int(i) for i in np.unravel_index(k, r.shape)] if r.ndim else []
                g_k = float(gap.flat[k])
                # (finite differences were read at the row's element, not necessarily this one: h111)
                rows.append(dataclasses.replace(row, verdict=Verdict.AUTODIFF_WRONG, worst_index=tuple(at),
                                                numeric=row.numeric if tuple(at) == row.worst_index else None,
                                                autodiff=float(r.flat[k]), hand=float(w64.flat[k]), max_abs_err=g_k,
                                                max_rel_err=g_k / max(abs(float(w64.flat[k])), 1e-300), note=(
                    # (check_grad's words, which the audit's row reads: autodiff is the rule, hand the plain autodiff)
                    f"hand is off on its own at {jnp.result_type(x)} ({row.note}); but with the primal evaluated in "
                    f"float64, hand gives {_g(float(w64.flat[k]))} at {at} where autodiff gives "
                    f"{_g(float(r.flat[k]))}: more than {rtol:.2g} of the element plus {limit:.2g} of the input's "
                    "largest apart, "
                    f"and this reference is smooth there (it changes by at most {_g(float(wj.flat[k]))} between "
                    "inputs up to 1e-3 of each element apart)")))
                continue
        fin_p = np.abs(np.where(np.isfinite(p), p, 0.0))
        top_r = float(np.max(np.abs(np.where(np.isfinite(r), r, 0.0)), initial=0.0))
        rows.append(None if float(np.max(fin_p, initial=0.0)) > 2 * top_r else row)
    if any(r is None for r in rows):
        alone = against_fd(diff)
        if len(alone.rows) != len(rows):
            return report
        for j, (row, a) in enumerate(zip(report.rows, alone.rows, strict=True)):
            if rows[j] is not None:
                continue
            if a.verdict == Verdict.OK:  # (the rule agrees with finite differences, as the row says)
                rows[j] = row
                continue
            verdict = Verdict.FD_UNRELIABLE if a.verdict in (Verdict.KINK, Verdict.SINGULAR) else a.verdict
            rows[j] = dataclasses.replace(a, verdict=verdict, note=(
                f"hand ({_g(row.hand)} at {list(row.worst_index or ())}) is off on its own (finite differences give "
                f"{_g(row.numeric)} there), and larger than anything autodiff gives, so autodiff is judged against "
                f"finite differences alone: {a.verdict.value}" + (f" ({a.note})" if a.note else "")
                + ("; finite differences cannot confirm autodiff" if verdict != a.verdict else "")))
    done = [r for r in rows if r is not None]
    return dataclasses.replace(report, rows=tuple(done), verdict=_combine_verdicts([r.verdict for r in done]))


# Verdicts a check at a call's own precision gives where the primal, not the rule, loses precision there.
# (not both_wrong: the rule agreeing with the primal's plain autodiff against finite differences, a stop_gradient the
# rule copied, agrees with it in float64 too)
_PRECISION_BLAMES = frozenset({Verdict.MISMATCH, Verdict.AUTODIFF_WRONG})


def _below_float64(leaves: Sequence[Any]) -> list[bool]:
    """Which of a call's inputs are of a floating dtype narrower than float64 (where the primal evaluated in float64
    is a wider reference)."""
    return [jnp.issubdtype(d, jnp.floating) and jnp.finfo(d).bits < 64 for d in map(jnp.result_type, leaves)]


def _beside_wide_primal(report: GradReport, s: _Scalars, diff: Any, args: tuple) -> GradReport:
    """A failing check of a call whose differentiated inputs are below float64, read again beside the primal's plain
    autodiff with the primal evaluated in float64 (``s.wide``). A row that blamed the rule or no side passes where
    the rule's gradient at the call's own precision agrees with that reference at every element of its input, to
    within the dtype's tolerance (``_default_rtol``, as check_grad's) of the element plus 100 units in the last
    place of the input's dtype (at least 1e-5, at most 5%) of the input's largest: the rule is right and accurate
    at its precision, and the primal is what loses precision there (a stable rule beside a formula that cancels,
    (1 − cos x)/x² near 0), which the primal's autodiff and finite differences at that precision inherit (h93).
    Other rows, and any failure outside such rows, stand."""
    leaves = jax.tree_util.tree_leaves(diff)
    dtypes = [jnp.result_type(x) for x in leaves]
    low = _below_float64(leaves)
    if len(report.rows) != len(leaves) or not any(r.verdict in _PRECISION_BLAMES and lw
                                                   for r, lw in zip(report.rows, low, strict=True)):
        return report
    assert s.wide is not None
    try:
        with jax.enable_x64(True):
            rule = jax.tree_util.tree_leaves(jax.grad(s.rule)(diff, *args))
            wide = jax.tree_util.tree_leaves(s.wide(jax.tree_util.tree_map(_widened, diff), *args))
    except Exception:  # noqa: BLE001 - no float64 reference (a primitive refusing float64): the check stands
        return report
    rows = []
    for row, d, lw, r, w in zip(report.rows, dtypes, low, rule, wide, strict=True):
        r64, w64 = np.asarray(r, np.float64), np.asarray(w, np.float64)
        if row.verdict not in _PRECISION_BLAMES or not lw or r64.shape != w64.shape or not (
                np.isfinite(r64).all() and np.isfinite(w64).all()):
            rows.append(row)
            continue
        # (each element to the dtype's own tolerance, as check_grad's: a right float32 rule that cancels itself,
        # (x·eˣ − expm1 x)/x² at 1e-3, is 2.7e-4 off on jaxlib 0.10 and 4e-5 on 0.12, h104)
        rel, limit = _wide_bound(d)
        largest = float(np.max(np.abs(w64), initial=0.0))
        gap = np.abs(r64 - w64)
        if not np.all(gap <= rel * np.abs(w64) + limit * largest):
            rows.append(row)
            continue
        k = int(np.argmax(gap)) if gap.size else 0
        rows.append(dataclasses.replace(row, verdict=Verdict.OK, note=(
            # (in check_grad's words, which the audit's row reads: autodiff is the rule, hand the plain autodiff)
            f"at {d}, autodiff, hand and finite differences of the primal read {row.verdict.value} ({row.note}); "
            f"with the primal evaluated in float64, hand agrees with autodiff's gradient at {d} to within {rel:.1g} "
            f"of each element plus {limit:.1g} of the input's largest (largest gap "
            f"{float(gap.flat[k]) if gap.size else 0.0:.3g}): "
            f"the primal loses precision at {d} (terms that cancel?), autodiff does not")))
    return dataclasses.replace(report, rows=tuple(rows), verdict=_combine_verdicts([r.verdict for r in rows]))


_JITTER_PASSES = frozenset({Verdict.OK, Verdict.KINK, Verdict.SINGULAR, Verdict.FD_UNRELIABLE})


def _second_differences(grad: Callable, diff: Any, args: tuple, seed: int,
                        steps: Sequence[float] = _JITTER_STEPS) -> tuple[list[np.ndarray], list]:
    """``grad``'s gradient leaves at ``diff`` (float64 NumPy) and, per element, the largest second difference
    |g(x + d) + g(x − d) − 2·g(x)| over the steps d = s·(|x| + 1e-6·max|x|)·u of ``steps`` (u: random
    signs). A smooth gradient's second difference is g''·d², small beside it at the small steps; one that is the
    rounding of terms that cancel changes at random between neighbouring inputs."""
    leaves, treedef = jax.tree_util.tree_flatten(diff)
    rng = np.random.default_rng(seed)
    signs = [rng.choice((-1.0, 1.0), size=np.shape(x)) for x in leaves]
    scale = [np.abs(np.asarray(x, np.float64)) + 1e-6 * float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))
             for x in leaves]
    run = jax.jit(grad)

    def at(step: float) -> list[np.ndarray]:
        moved = [jnp.asarray(np.asarray(x, np.float64) + step * s * u, jnp.result_type(x))
                 for x, s, u in zip(leaves, scale, signs, strict=True)]
        out = run(jax.tree_util.tree_unflatten(treedef, moved), *args)
        return [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(out)]

    centre = at(0.0)
    jitter = [np.zeros_like(g) for g in centre]
    for step in steps:
        for j, (p, m, c) in enumerate(zip(at(step), at(-step), centre, strict=True)):
            with np.errstate(invalid="ignore"):
                jitter[j] = np.fmax(jitter[j], np.abs(p + m - 2 * c))
    return centre, jitter


def _beside_noisy_reference(report: GradReport, s: _Scalars, diff: Any, args: tuple,
                            against_fd: Callable[[Any], GradReport]) -> GradReport:
    """A failing check read again where the reference, the primal's plain autodiff, is the rounding of terms that
    cancel rather than a derivative ((exp(x) − 1)/x at x = 1e-9, (1 − cos x)/x² at 1e-5, in float64 too: the
    reason a stable rule is written): at every element where the rule and the reference (evaluated in float64 where
    the call is below it, ``s.wide``) disagree beyond the tolerance, the reference's second difference at steps of
    1e-9 to 25% of the element (see :func:`_second_differences`) is at least a quarter of the disagreement, while
    the rule's is under 1% of it: the rule is smooth there and the reference is not reproducible. Such a row is
    decided by finite differences of the primal alone (``against_fd``), as where JAX cannot differentiate the
    primal: it passes if they confirm the rule (``ok``) or cannot decide (``fd_unreliable``, with the note), and
    the failing verdict stands otherwise. Rows where the reference is smooth stand as they are."""
    leaves = jax.tree_util.tree_leaves(diff)
    if len(report.rows) != len(leaves):
        return report
    # (mismatch only: a rule confidently off finite differences is wrong, whatever the reference)
    failing = [r.verdict == Verdict.MISMATCH for r in report.rows]
    if not any(failing):
        return report
    assert s.plain is not None
    wide = _below_float64(leaves)
    try:
        with jax.enable_x64(True):
            rule, rule_j = _second_differences(jax.grad(s.rule), diff, args, 1)
            if s.wide is not None and any(wide):
                ref, ref_j = _second_differences(s.wide, jax.tree_util.tree_map(_widened, diff), args, 1)
            else:
                ref, ref_j = _second_differences(s.plain, diff, args, 1)
    except Exception:  # noqa: BLE001 - the reference cannot be probed so: the check stands
        return report
    excused = []
    for x, fail, r, rj, p, pj in zip(leaves, failing, rule, rule_j, ref, ref_j, strict=True):
        if not fail or r.shape != p.shape or not np.all(np.isfinite(r)):
            excused.append(False)
            continue
        eps = float(jnp.finfo(jnp.result_type(x)).eps) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else 0.0
        mag = np.fmax(np.abs(r), np.where(np.isfinite(p), np.abs(p), 0.0))
        tol = _default_rtol(eps) * (mag + float(np.max(mag, initial=0.0)))
        with np.errstate(invalid="ignore"):
            gap = np.where(np.isfinite(p), np.abs(r - p), np.inf)
            beyond = ~(gap <= tol)
            noisy = (pj >= 0.25 * gap) & (rj <= 0.01 * gap) & np.isfinite(rj)
        excused.append(bool(np.any(beyond)) and bool(np.all(noisy | ~beyond)))
    if not any(excused):
        return report
    fd_only = against_fd(diff)
    if len(fd_only.rows) != len(report.rows):
        return report
    rows = []
    for row, ok, alone, pj, p in zip(report.rows, excused, fd_only.rows, ref_j, ref, strict=True):
        # (finite differences read the same primal: disagreeing along a random direction, no element of which they
        # single out, they read its rounding too; (1 − cos x)/x² at 1e-5 in float64 at some seeds)
        spread = alone.verdict is Verdict.MISMATCH and alone.worst_index is None
        if not ok or (alone.verdict not in _JITTER_PASSES and not spread):
            rows.append(row)
            continue
        verdict = Verdict.OK if alone.verdict is Verdict.OK else Verdict.FD_UNRELIABLE
        k = int(np.nanargmax(pj)) if pj.size and np.any(np.isfinite(pj)) else 0
        rows.append(dataclasses.replace(alone, verdict=verdict, note=(
            # (in check_grad's words, which the audit's row reads: autodiff is the rule, hand the plain autodiff)
            f"autodiff, hand and finite differences read {row.verdict.value} ({row.note}); but hand is not a "
            f"derivative here, it is rounding: it changes by up to {float(pj.flat[k]):.3g} (at {float(p.flat[k]):.3g}"
            f"{'' if p.size == 1 else ' at [' + ', '.join(map(str, np.unravel_index(k, p.shape))) + ']'}) between "
            f"inputs 1e-9 to 25% of each element apart, as much as it disagrees with autodiff, where autodiff's "
            f"gradient stays smooth (the primal loses precision there: terms that cancel?). Against finite "
            f"differences alone: {alone.verdict.value}" + (f" ({alone.note})" if alone.note else "")
            + ("" if verdict is Verdict.OK else "; finite differences cannot confirm autodiff there either"
               + (", as they read the same primal, rounding included: none of the elements along that direction "
                  "fails" if spread else "")))))
    return dataclasses.replace(report, rows=tuple(rows), verdict=_combine_verdicts([r.verdict for r in rows]))


def _held_gap(eqn: Any, call: _Call, diff_pos: tuple[int, ...], float_outs: tuple[int, ...], extra: tuple,
              plain: bool) -> Row | None:
    """The rule's cotangent at the inputs that are not finite at this call (a causal mask's −inf logits), which no
    finite difference can move: compared with JAX's plain autodiff of the primal there (``plain``: it has one), with
    the call's cotangent. A row when they differ: ``autodiff_wrong`` where only the rule's is not finite (a NaN there
    reaches fn's gradient through the mask's addition), ``mismatch`` where both are finite and apart; else None."""
    n_c = int(eqn.params.get("num_consts", 0))
    cts, keep = extra[:2]
    held = [~m & ~np.isfinite(np.asarray(x, np.float64)) for m, x in keep]
    if not plain or not any(h.any() for h in held):
        return None
    ins = list(call.inputs)
    primal = _as_typed(eqn, jaxpr_as_fun(_call_jaxpr(eqn)))
    through_rule = _as_typed(eqn, lambda *xs: _bind(eqn, list(xs)))

    def scalar(bind: Callable, *d: Any) -> Any:
        outs = bind(_with_inputs(call, n_c, diff_pos, d))
        return sum(jnp.vdot(jnp.where(m, outs[j], 0), c) for j, (c, m) in zip(float_outs, cts, strict=True))

    d0 = [ins[n_c + i] for i in diff_pos]
    argnums = tuple(range(len(d0)))
    try:
        rule = jax.grad(lambda *d: scalar(lambda xs: through_rule(*xs), *d), argnums=argnums)(*d0)
        ref = jax.grad(lambda *d: scalar(lambda xs: primal(*xs), *d), argnums=argnums)(*d0)
    except Exception:  # noqa: BLE001 - either failing here fails the main check, which says why
        return None
    for k, (h, r, p) in enumerate(zip(held, rule, ref, strict=True)):
        r64, p64 = np.asarray(r, np.float64), np.asarray(p, np.float64)
        rtol = _default_rtol(float(jnp.finfo(jnp.result_type(d0[k])).eps))
        with np.errstate(invalid="ignore"):
            # (where plain autodiff is not finite either, nothing is compared: a mask applied with jnp.where throws
            # such a cotangent away, an additive mask passes it on, and the call does not tell which)
            wrong = h & np.isfinite(p64) & ~np.isfinite(r64)
            scale = max(float(np.max(np.abs(np.where(np.isfinite(p64), p64, 0.0)), initial=0.0)), 1e-30)
            apart = h & np.isfinite(p64) & np.isfinite(r64) & ~(np.abs(r64 - p64) <= rtol * scale)
        for bad, verdict in ((wrong, Verdict.AUTODIFF_WRONG), (apart, Verdict.MISMATCH)):
            if bad.any():
                at = np.unravel_index(int(np.argmax(bad)), bad.shape)
                rv, pv = float(r64[at]), float(p64[at])
                gap = abs(rv - pv) if math.isfinite(rv) else math.inf
                # (in check_grad's words, which the audit's row reads: autodiff is the rule, hand the plain autodiff)
                note = (f"input {diff_pos[k]} is not finite at {int(h.sum())} element(s) at this call (held there: no "
                        f"finite difference moves them); there autodiff ({rv:.6g} at {[int(i) for i in at]}) "
                        f"{'is not finite, while hand is' if verdict == Verdict.AUTODIFF_WRONG else 'differs from hand'}"
                        f" ({pv:.6g}), at {int(bad.sum())} element(s)")
                return Row(f"[{k}]", verdict, tuple(int(i) for i in at), gap, gap / max(abs(pv), 1e-300), rv, pv,
                           math.nan, "exact", int(h.size), 0, note=note)
    return None


def _nonlinear_gap(eqn: Any, call: _Call, diff_pos: tuple[int, ...], float_outs: tuple[int, ...],
                   extra: tuple) -> Row | None:
    """Whether the rule's derivative is linear in the cotangent, as every VJP is: bwd(a·u) = a·bwd(u) for a = 2^±10
    and 2^±20 (powers of two scale floating-point values exactly: a scale whose cotangent would overflow or leave the
    dtype's normal range is skipped, and so is each result element that would). The check above uses one random
    cotangent of unit scale; a rule that clips or rescales its cotangent (by its norm, say) agrees with the primal's
    derivative there and not at the cotangents fn's gradient brings (a loss scaled by 1024). An ``autodiff_wrong``
    row where it is not, else None."""
    n_c = int(eqn.params.get("num_consts", 0))
    ins = list(call.inputs)
    cts = extra[0]

    outs = _call_outputs(eqn, call, diff_pos, float_outs)

    try:
        _, vjp = jax.vjp(outs, *(ins[n_c + i] for i in diff_pos))
        unit = [jnp.asarray(c) for c, _ in cts]
        # (the dtypes the derivative computes in: a rule that casts its cotangent to float16 inside a float32 model
        # rounds it there, in float16's narrower range, h100)
        vjp_jaxpr = jax.make_jaxpr(vjp)(unit).jaxpr
        if _uses(vjp_jaxpr, lambda e: e.primitive.name == "while"):
            # (a derivative that loops until it converges, an implicit fixed point's adjoint, need not stop at other
            # scales of its cotangent: its tolerance may lie below the dtype's spacing there, and it would never
            # return, h109; checked at the unit cotangent only)
            return None
        inner = _float_dtypes(vjp_jaxpr, tainted=True)
        # (compiled once for the five cotangents, the residuals passed as arguments, not embedded: a Pallas backward
        # compiles at every eager call)
        pull = functools.partial(jax.jit(lambda p, u: p(u)), vjp)
        base = [np.asarray(g, np.float64) for g in pull(unit)]

        def limits(dt: Any) -> tuple[float, float, float]:  # (tiny, max) of dt and the dtypes inside; dt's eps
            infos = [jnp.finfo(d) for d in {jnp.dtype(dt), *inner}]
            # (powers of two scale values exactly within those ranges: the tolerance stays the result's, h103)
            return (max(float(i.tiny) for i in infos), min(float(i.max) for i in infos), float(jnp.finfo(dt).eps))

        def exact(c: Any, a: float) -> bool:  # every nonzero cotangent element stays finite and normal scaled by a
            v = np.abs(np.asarray(c, np.float64)) * a
            tiny, top, _ = limits(jnp.result_type(c))
            return bool(np.all((v == 0) | ((v >= tiny) & (v <= top))))

        for a in (2.0**10, 2.0**-10, 2.0**20, 2.0**-20):
            if not all(exact(c, a) for c, _ in cts):
                continue  # (the scaled cotangent itself would round)
            raw = pull([jnp.asarray(c * a, c.dtype) for c, _ in cts])
            for k, (b, r) in enumerate(zip(base, raw, strict=False)):
                tiny, top, eps = limits(jnp.result_type(r))
                g = np.asarray(r, np.float64) / a
                # (compared where both are finite and b and a·b normal: XLA's CPU flushes subnormals to 0)
                with np.errstate(invalid="ignore", over="ignore"):
                    mag = np.abs(b)
                    normal = (mag == 0) | ((mag >= tiny) & (mag * a >= tiny) & (mag * a <= top))
                    judged = np.isfinite(b) & np.isfinite(g) & normal
                rtol = _default_rtol(eps)
                scale = float(np.max(np.where(judged, mag, 0.0), initial=0.0))
                with np.errstate(invalid="ignore"):
                    bad = judged & ~(np.abs(g - b) <= rtol * (mag + scale))
                if bad.any() and scale > 0:
                    at = np.unravel_index(int(np.argmax(np.where(bad, np.abs(g - b), -1.0))), b.shape)
                    gap = float(abs(g[at] - b[at]))
                    note = (f"the rule is not linear in its cotangent, as a derivative is: with the cotangent times "
                            f"2^{round(math.log2(a))}, its cotangent for input {diff_pos[k]} at {[int(i) for i in at]}, "
                            f"scaled back, is {g[at]:.6g}, against {b[at]:.6g} (a rule that clips or rescales its "
                            "cotangent gives jax.grad another function's gradient wherever fn's cotangents are large or "
                            "small)")
                    return Row(f"[{k}]", Verdict.AUTODIFF_WRONG, tuple(int(i) for i in at), gap,
                               gap / max(abs(float(b[at])), 1e-300), float(g[at]), None, math.nan, "exact",
                               int(b.size), 0, note=note)
    except Exception:  # noqa: BLE001 - a rule that fails here fails its derivative's check, which says why
        return None
    return None


def _float_dtypes(jaxpr: Any, tainted: bool = False) -> set:
    """The float dtypes of the values a jaxpr computes, sub-computations included; ``tainted``: only of those that
    depend on its inputs (a VJP's cotangents: a factor computed in float16 from the residuals does not narrow what
    the cotangent passes through, h103). A call (jit, remat) is followed inside; any other sub-computation with such
    an input counts whole."""
    found: set = set()

    def walk(jx: Any, live: set | None) -> None:
        for eqn in jx.eqns:
            ins = [id(v) in live for v in eqn.invars] if live is not None else []
            if live is not None and not any(ins):
                continue
            subs = _sub(eqn)
            if live is not None and eqn.primitive.name in _CALLS and len(subs) == 1 and \
                    len(subs[0].invars) == len(eqn.invars):
                inner = {id(v) for v, t in zip(subs[0].invars, ins, strict=True) if t}
                walk(subs[0], inner)
                outs = [id(v) in inner for v in subs[0].outvars]
                live.update(id(v) for v, t in zip(eqn.outvars, outs, strict=True) if t)
            else:
                for sub in subs:
                    walk(sub, None)
                if live is not None:
                    live.update(id(v) for v in eqn.outvars)
            for v in eqn.outvars:
                if live is None or id(v) in live:
                    dt = getattr(getattr(v, "aval", None), "dtype", None)
                    if dt is not None and jnp.issubdtype(dt, jnp.floating):
                        found.add(jnp.dtype(dt))

    walk(jaxpr, {id(v) for v in jaxpr.invars} if tainted else None)
    return found


def _symbolic_zeros(eqn: Any) -> bool:
    """Whether a custom rule with ``symbolic_zeros=True`` is this equation or is called inside it."""
    return bool(eqn.params.get("symbolic_zeros")) or any(_symbolic_zeros(e) for j in _sub(eqn) for e in j.eqns)


def _as_rule_verdict(row: Row) -> tuple[Verdict, str]:
    """A check_grad row read for the rule: hand (the primal's plain autodiff) being wrong is not the rule's fault.
    The row's note is told in the audit's words."""
    note = re.sub(r"\bhand\b", "the primal's plain autodiff", re.sub(r"\bautodiff\b", "the rule", row.note))
    if row.verdict == Verdict.HAND_WRONG and row.numeric is None:
        # (blamed where kinks meet, by the second look's ranges: no finite difference read)
        return Verdict.KINK, (
            f"{note}; the rule's values lie within that range: at the kinks it takes a choice, while JAX's plain "
            f"autodiff of its primal ({_g(row.hand)} at element {list(row.worst_index or ())}) does not, which is "
            "not the rule's fault")
    if row.verdict == Verdict.HAND_WRONG:
        # (what was left unchecked is still said: elements where the plain autodiff alone is not finite, beyond
        # the ones checked one by one)
        unchecked = [part for part in row.note.split("; ") if part.endswith("those were not checked")]
        return Verdict.OK, "; ".join([
            "the rule agrees with finite differences; JAX's plain autodiff of its primal does not (at element "
            f"{list(row.worst_index or ())}: {row.hand:.6g} against {row.numeric:.6g}), which is presumably why the "
            "rule exists", *unchecked])
    return row.verdict, note.replace("a stop_gradient, or a custom rule copied into the the primal's plain autodiff formula?",
                                     "a stop_gradient in the primal, copied by the rule?")


# ---- the audit ------------------------------------------------------------------------------------------------


@_isolating
def _audited(fn: Callable, leaves: list, traced: list[bool], treedef: Any, *xs: Any) -> Any:
    """fn's output from its traced arrays ``xs`` (the ``traced`` among ``leaves``, the flat (params, args,
    kwargs)), checked to be arrays."""
    it = iter(xs)
    p, a, k = jax.tree_util.tree_unflatten(treedef, [next(it) if t else x for x, t in zip(leaves, traced, strict=True)])
    out = fn(p, *a, **k)
    bad = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_flatten_with_path(out)[0]
           if not isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex))]
    if bad:
        path, x = bad[0]
        raise TypeError(f"audit: fn(params, *args, **kwargs) must return arrays (a loss, or a pytree of arrays); "
                        f"its output{' at ' + path if path else ''} is {describe(x)}")
    return out


def audit(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    wrt: Any = None,
    max_calls: int = 8,
    library: bool = False,
    exclude: Sequence[str] = (),
    rtol: float | None = None,
    atol: float | None = None,
    mode: str = "auto",
    seed: int = 0,
    **kwargs: Any,
) -> AuditReport:
    """Checks every custom derivative rule that ``fn(params, *args, **kwargs)`` calls, each in isolation at the
    inputs it receives in this forward pass.

    ``fn`` is traced once and its jaxpr walked through ``jit``, ``remat``, ``scan``, ``while``, ``cond``, vmapped
    bodies and the primals of custom rules; every call of a ``jax.custom_vjp`` / ``jax.custom_jvp`` rule defined
    outside JAX and the frameworks (Flax, Equinox, Optax, Chex, Haiku) is recorded with its actual inputs.
    Each call's rule is compared, per element, with JAX's plain autodiff of the rule's primal function and with
    finite differences (see :func:`check_grad`: the same kink, singular-point and dtype handling), under a
    random output cotangent. Calls are grouped by rule; a table row per rule.

    Args:
        fn: any function of ``params`` and the further arguments (a model's loss or its output: it need not be
            scalar, since ``fn`` itself is not differentiated).
        params: a pytree (dicts, Equinox modules, Flax states, Linen variables). Arrays are traced; other leaves
            are held static.
        *args, **kwargs: the further arguments of ``fn`` (data, keys). Keyword arguments other than the options
            below are passed to ``fn``.
        wrt: which leaves of ``params`` are the parameters (as in :func:`check_grad`; default: inexact arrays). Each
            row says whether the rule is on their gradient path, i.e. whether a wrong rule there corrupts their
            gradient. Every rule is checked either way (an input off their path that the rule gives no cotangent,
            None, is held fixed).
        max_calls: calls checked per rule at most, besides one at each call site (loop iterations aside); loops
            longer than this are sampled (evenly, first and last included) and the row shows how many calls were
            checked out of how many were made.
        library: also audit rules defined by JAX and the frameworks (``jax.nn.relu``'s custom JVP, ...).
        exclude: rules not to check (e.g. straight-through estimators, whose rule is deliberately not the
            derivative of their primal), each by its name or, where fn calls several rules of that name, as
            ``"name@file:line"`` (the source the table shows); they are listed in the notes. A bare name that
            names rules defined at several places is a ValueError.
        rtol, atol, mode, seed: as for :func:`check_grad`.

    Returns:
        An :class:`AuditReport`: a row per rule (``rule``, ``source``, ``kind``, ``calls``, ``verdict``,
        ``worst_index`` = (input number, element...), ``where``), printed as a table.

    Raises:
        TypeError, ValueError: ``fn`` not callable, a bad option, or ``fn`` failing to trace (the message says
            where).
    """
    start = time.perf_counter()
    clash = _clashes(fn, wrt=wrt, max_calls=max_calls, library=library, exclude=exclude, rtol=rtol, atol=atol,
                     mode=mode, seed=seed)
    (params, args, kwargs), sharded = _replicated((params, args, kwargs))
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
    n_params = len(jax.tree_util.tree_leaves(params))
    mask = _wrt_mask(params, wrt, n_params, "audit")
    if mask is not None and not any(mask):
        listed = ", ".join(f"{jax.tree_util.keystr(p) or '(params)'} {describe(x)}"
                           for p, x in jax.tree_util.tree_flatten_with_path(params)[0][:_LIST])
        raise ValueError(f"audit: wrt selects no leaf of params ({listed}{', ...' if n_params > _LIST else ''}); "
                         "select at least one floating-point array leaf, or leave wrt out (every one)")
    if mask is None:
        mask = _default_mask(leaves[:n_params])
    # (a Python float in params is traced where it is differentiated, as check_grad does; elsewhere it is static)
    is_arr = [isinstance(x, (jax.Array, np.ndarray, np.generic)) or (isinstance(x, float) and i < n_params and mask[i])
              for i, x in enumerate(leaves)]
    mask = [m and is_arr[i] for i, m in enumerate(mask)]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    # (arguments and fixed leaves whose values fn uses in Python, as jax.grad allows: held as values, tier by tier)
    diff = [i < n_params and mask[i] for i in range(len(leaves))]
    tiers = _concrete_tiers([x for i, x in enumerate(leaves) if is_arr[i] and not diff[i]])
    for tier, concrete in enumerate(tiers):
        traced = [a and (diff[i] or id(leaves[i]) not in concrete) for i, a in enumerate(is_arr)]
        arrays = [jnp.asarray(x) for x, a in zip(leaves, traced, strict=True) if a]
        taint = [diff[i] for i, a in enumerate(traced) if a]
        try:
            closed = jax.make_jaxpr(functools.partial(_audited, fn, leaves, traced, treedef))(*arrays)
            break
        except _TRACE_ERRORS as e:
            if tier + 1 == len(tiers):
                names = [paths[i] if i < n_params else None for i, a in enumerate(traced) if a]
                raise _clean(_untraceable(e, "audit", "xs", names)) from None
        except Exception as e:
            # (a leaf of params that is not an array, a string where an array belongs, reaches fn as it is: named)
            odd = [f"{paths[i] or '(params)'} {describe(x)}" for i, x in enumerate(leaves[:n_params]) if not is_arr[i]]
            e.add_note("funcgrad: verify.audit traces fn(params, *args, **kwargs) once to find its custom rules; "
                       "tracing failed" + (f"; params leaves that are not arrays reach fn as they are: "
                                           f"{', '.join(odd[:_LIST])}{', ...' if len(odd) > _LIST else ''}" if odd else ""))
            raise
    walker = _Walker(max_calls, library, exclude)
    walker.run(closed.jaxpr, closed.consts, arrays, taint, "")
    for rule in _solver_rules(closed.jaxpr) if exclude else ():
        walker.excludes(rule)  # (their names count for the ambiguity below too)
    ambiguous = walker.ambiguous()
    if ambiguous:
        # (Flax's nn.custom_vjp and jax.custom_jvp(lambda ...) name many rules alike: excluding a deliberate
        # straight-through estimator by its name hid a wrong rule of the same name elsewhere)
        name, places = next(iter(sorted(ambiguous.items())))
        raise ValueError(f"audit: exclude names {name!r}, but fn calls rules of that name defined at "
                         f"{len(places)} places ({', '.join(places[:6])}{'...' if len(places) > 6 else ''}): name the "
                         f"one to leave unchecked with its place, as in exclude=[{name + '@' + places[0]!r}]")
    # (a framework's marker rule, equinox's nondifferentiable, may sit at the same line as an inlined user rule)
    visible = {(_call_site(e), _CUSTOM[e.primitive.name]) for e in walker.rule_eqns
               if not walker.rule(e).library and walker.rule(e).name not in _MARKERS}
    inlined = [(site, rule) for (site, kind), (frame, lib) in _inlined_sites(closed).items() if (site, kind) not in visible
               for rule in _inlined_rules(site, kind, frame, lib)]

    options = {"rtol": rtol, "atol": atol, "mode": mode, "seed": seed, "max_calls": max_calls}
    rows = _through_failing_rules([_rule_row(rule, calls, walker.seen[rule], options)
                                   for rule, calls in walker.calls.items()], walker.calls)
    # Rules called only inside a primitive funcgrad does not enter (shard_map, pmap): undecided, so not ok.
    rows += [_valueless_row(rule, Verdict.FD_UNRELIABLE, seen=walker.seen[rule], note=(
                 f"not checked: its calls are inside {prim}, which funcgrad does not enter; audit the model without "
                 f"{prim} (e.g. the same function on one device) to check this rule"))
             for rule, prim in walker.unentered_rules.items() if rule not in walker.calls]
    # Rules that a derivative inside fn traced through (a training step's jax.grad): nothing left to check them by.
    rows += [_valueless_row(rule, Verdict.FD_UNRELIABLE, seen=1, note=(
                 f"not checked: called at {site} inside a derivative that fn takes itself (jax.grad, jax.vjp or "
                 "value_and_grad inside fn, as in a training step), which traces through the rule and leaves no call "
                 "of it in fn's program; audit the function that derivative is taken of (the loss) to check it"))
             for site, rule in inlined if walker.audited(rule)]
    # Rules called only at loop iterations the sampling skipped (a cond taken at one iteration): undecided too.
    rows += [_valueless_row(rule, Verdict.FD_UNRELIABLE, seen=n, note=(
                 f"not checked: called at most {n} time(s), only at loop iterations the sampling skipped "
                 f"(max_calls={max_calls} iterations walked per loop); audit with max_calls at least the loop's "
                 "length to check it"))
             for rule, n in walker.seen.items() if rule not in walker.calls and rule not in walker.unentered_rules]
    # The user's solves inside JAX's implicit-differentiation solvers: their derivative, not checked here.
    solvers = _solver_rules(closed.jaxpr)
    for rule, n in solvers.items():
        if walker.excludes(rule):
            walker.excluded[rule] += n
            continue
        what = ("its solve / transpose_solve define the derivative (of the solution with respect to b and to "
                "matvec's operands)") if rule.kind == "custom_linear_solve" else \
            "its tangent_solve defines the derivative (by the implicit function theorem)"
        rows.append(_valueless_row(rule, Verdict.FD_UNRELIABLE, seen=n, note=(
            f"not checked: lax.{rule.kind} at {rule.source}: {what}, and audit does not check such solvers in "
            "isolation; check_grad(fn, params, *args) checks the gradient they give, or exclude this rule by its "
            f"name ({rule.name!r})")))
    not_called = _not_called(closed.jaxpr, walker, {*(r for _, r in inlined), *solvers})
    notes = _notes(walker, any(walker.audited(r) for _, r in inlined), tuple(solvers), not_called)
    failing = [r for r in rows if r.verdict in _FAILING]
    if failing:
        first = failing[0]
        notes.append("a rule that is deliberately not its primal's derivative (a straight-through estimator, gradient "
                     f"clipping or reversal) fails so; to leave one unchecked, audit with exclude=[{first.rule!r}] (or "
                     f"{f'{first.rule}@{first.source}'!r} where several rules share its name; funcgrad verify --audit "
                     "takes --exclude)")
    if tier:
        notes.append(_concrete_note((params, args, kwargs), tiers[tier]))
    if clash:
        notes.append(_clash_note(clash))
    if sharded:
        notes.append(sharded)
    env = {**_environment_versions(), "max_calls": max_calls, "library": library, "exclude": sorted(exclude),
           "seed": seed, "mode": mode, "rtol": rtol, "atol": atol}
    return AuditReport(tuple(rows), _combine_verdicts([r.verdict for r in rows]), tuple(notes),
                       time.perf_counter() - start, env, not_called=not_called)


def _not_called(jaxpr: Any, walker: _Walker, found: set[_Rule]) -> tuple[str, ...]:
    """The audited rules in fn's program that no call reached at these inputs (a lax.cond / switch branch not taken, a
    loop that ran no iteration), as "name (source)": nothing at these inputs to check them at, so not failed, but
    said rather than passed over. ``found``: rules reported otherwise (inlined in a derivative fn takes, solvers)."""
    reached = {*walker.seen, *walker.excluded, *walker.unentered_rules, *found}
    # (not a while loop's cond function: the walk evaluates it whole, and no derivative flows there)
    return tuple(f"{r.name} ({r.source})" for r in sorted(_inner_rules(jaxpr, predicates=False),
                                                         key=lambda r: (r.name, r.source))
                 if r not in reached and walker.audited(r))


def _inner_rules(jaxpr: Any, predicates: bool = True) -> set[_Rule]:
    """The user's custom rules called anywhere inside a jaxpr (sub-computations and rules' own primals too;
    ``predicates``: a while loop's cond function too, where no derivative flows)."""
    found: set[_Rule] = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _CUSTOM:
            rule = _identify(eqn)
            if not rule.library:
                found.add(rule)
        skip = eqn.params["cond_jaxpr"].jaxpr if eqn.primitive.name == "while" and not predicates else None
        for sub in _sub(eqn):
            if sub is not skip:
                found |= _inner_rules(sub, predicates)
    return found


def _through_failing_rules(rows: list[AuditRow], calls: dict) -> list[AuditRow]:
    """A failing rule whose primal calls another of the user's rules that fails too: its reference (plain autodiff
    of the primal) runs through that rule's derivative, so its own failure may be only that one's. Said in its
    note; the verdict stays (the report fails either way, and the inner rule is named)."""
    failing = {(r.rule, r.source) for r in rows if r.verdict in _FAILING}
    out = []
    for given, (rule, rule_calls) in zip(rows, calls.items(), strict=True):
        row, bad = given, []
        if failing and row.note:  # (only the primals of a row whose note may speak of its reference are walked)
            inner = set().union(*(_inner_rules(_call_jaxpr(c.eqn).jaxpr) for c in rule_calls)) - {rule}
            bad = sorted({r.name for r in inner if (r.name, r.source) in failing})
        if bad and row.verdict in _FAILING:
            row = dataclasses.replace(row, note="; ".join(n for n in (row.note, (
                f"its primal calls {', '.join(bad)}, which fail(s) too: the primal's plain autodiff runs through "
                f"{'that rule' if len(bad) == 1 else 'those rules'}, so this rule may be right; fix "
                f"{', '.join(bad)} and audit again")) if n))
        elif bad and "plain autodiff of its primal does not" in row.note:
            # (finite differences of the primal's value, which runs the inner rules' primals, confirm this rule)
            row = dataclasses.replace(row, note=row.note.replace(
                "which is presumably why the rule exists",
                f"as it runs through the {'rule' if len(bad) == 1 else 'rules'} of {', '.join(bad)}, which the primal "
                f"calls and which fail{'s' if len(bad) == 1 else ''}"))
        out.append(row)
    return out


_LOW_PRECISION = re.compile(r"fn computes in (bfloat16|float16|float8\w*) even with float64 inputs.*?\(rtol ([0-9.e+-]+)\)")


def _with_precision_note(note: str, low: set[tuple[str, str]], verdict: Verdict) -> str:
    """A passing rule's note, with what its check could tell where the rule computes below float32 (``low``: the
    (dtype, rtol) its calls' checks read): said, not passed over in silence."""
    if not low or verdict in _FAILING:
        return note
    dtype, rtol = sorted(low)[0]
    return "; ".join([n for n in (note,) if n] + [
        f"the rule computes in {dtype}, so its derivative is compared with the primal's to {float(rtol):.0%} of each "
        "element plus the largest one (a rule off by less passes: a rule 10% off can); check it at float32 inputs "
        "to compare it more tightly"])


_ITERATION = re.compile(r"iteration \d+")


def _rule_row(rule: _Rule, calls: list[_Call], seen: int, options: dict) -> AuditRow:
    """The check of one rule over its calls (evenly sampled down to max_calls)."""
    max_calls = options["max_calls"]
    pick: Any = np.unique(np.round(np.linspace(0, len(calls) - 1, min(len(calls), max_calls))).astype(int)) if calls else []
    # Every instance of the rule is checked at least once, beyond max_calls if need be: one layer's rule of twelve
    # that a factory made can be the wrong one.
    # So is each call site (an equation of fn's, at its place in the nesting, loop iterations aside): a rare
    # branch's call, a call between two loops, or one of twelve unrolled layers can be the only one at inputs where
    # the rule is wrong (x < 0, say), beside the rule's many calls elsewhere. Only a loop's iterations are sampled.
    # And each signature (its inputs' shapes and dtypes), up to max_calls of them: a bottleneck's call at another
    # width can be the only one where the rule is wrong, and the only route to a parameter.
    first: dict[Any, int] = {}
    signatures: dict[Any, int] = {}
    for k, c in enumerate(calls):
        first.setdefault((c.instance, id(c.eqn), _ITERATION.sub("iteration", c.where), c.site), k)
        sig = (c.instance, tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__))) for x in c.inputs))
        if len(signatures) < max_calls:
            signatures.setdefault(sig, k)
    pick = sorted({int(k) for k in pick} | set(signatures.values()))
    pick = sorted({int(k) for k in pick} | set(first.values()))
    scalars: dict = {}
    low: set[tuple[str, str]] = set()  # (dtype, rtol) of calls whose rule computes below float32
    results = []  # (verdict, row, input number, call, note)
    skipped = []
    gaps = []  # (call, where the rule's forward differs from its primal)
    unverified = []  # (call, what of the forward could not be compared with the primal)
    for k in pick:
        call = calls[int(k)]
        report, diff_pos, note, gap = _check_call(call, int(k), scalars, options)
        if gap.text:
            gaps.append((call, gap))
        elif gap.unverified:
            unverified.append((call, gap.unverified))
        if report is None:
            skipped.append(f"{_call_name(call)}: {note}")
            continue
        low.update((m.group(1), m.group(2)) for n in report.notes if (m := _LOW_PRECISION.search(n)))
        for r in report.rows:
            verdict, why = _as_rule_verdict(r)
            number = diff_pos[int(r.path.strip("[]").split("]")[0])] if r.path.startswith("[") else 0
            results.append((verdict, r, number, call, "; ".join(p for p in (why, note) if p)))
    checked = len(pick) - len(skipped)
    on_path = any(c.on_path for c in calls)
    broken = [n for n in skipped if _BROKEN in n]
    if broken:  # JAX cannot differentiate through this rule: a gradient through it fails, whatever else passes
        return AuditRow(rule.name, rule.source, rule.kind, checked + len(broken), seen, Verdict.AUTODIFF_WRONG, None,
                        broken[0].split(": " + _BROKEN)[0], None, None, None, math.inf, math.inf, on_path,
                        f"{broken[0].split(': ' + _BROKEN)[1]} (the rule's derivative fails at {len(broken)} of "
                        f"{len(pick)} call(s) checked: a gradient through it cannot be computed)")
    if not results:
        why = skipped[0] if skipped else "no call to check"
        if skipped and all(_NOTHING in n for n in skipped):  # no derivative anywhere: nothing to be wrong about
            return _valueless_row(rule, Verdict.OK, why, seen=seen, on_path=on_path)
        # Could not be checked (see the reason): undecided, which AuditReport.assert_ok does not accept.
        return _valueless_row(rule, Verdict.FD_UNRELIABLE, f"not checked: {why}", seen=seen, on_path=on_path)
    verdict = _combine_verdicts([v for v, *_ in results])
    deciding = [x for x in results if x[0] == verdict] or [x for x in results if x[0] in _FAILING] or results
    v, r, number, call, why = max(deciding, key=lambda x: (x[1].worst_index is not None,
                                                          x[1].max_abs_err if math.isfinite(x[1].max_abs_err) else 1e308))
    index = (number, *r.worst_index) if r.worst_index is not None else (number,)
    note = _row_note(why if v != Verdict.OK or why else "", skipped, len(pick), seen, max_calls, unverified)
    note = _with_precision_note(note, low, verdict)
    if gaps:
        call0, gap0 = gaps[0]
        forward = f"{gap0.text} (at {len(gaps)} of {checked} call(s) checked)"
        if verdict not in _FAILING:  # the derivative itself matches: the row is the forward's
            return dataclasses.replace(
                _valueless_row(rule, Verdict.AUTODIFF_WRONG, "; ".join(n for n in (forward, note) if n), seen=seen,
                               checked=checked, where=_call_name(call0), on_path=on_path),
                max_abs_err=gap0.abs, max_rel_err=gap0.rel)
        note = f"{note}; also, at {_call_name(call0)}, {forward}"
    abs_err, rel_err = r.max_abs_err, r.max_rel_err
    if (r.hand is not None and not math.isfinite(r.hand) and r.autodiff is not None and r.numeric is not None
            and math.isfinite(r.autodiff) and math.isfinite(r.numeric)):
        # (the primal's plain autodiff not finite there, a softplus's overflow: how far the rule is from finite
        # differences, which decided)
        abs_err = abs(r.autodiff - r.numeric)
        rel_err = abs_err / max(abs(r.autodiff), abs(r.numeric), 1e-300)
    return AuditRow(rule.name, rule.source, rule.kind, checked, seen, verdict, index, _call_name(call), r.autodiff,
                    r.hand, r.numeric, abs_err, rel_err, on_path, note)


def _row_note(note: str, skipped: list[str], picked: int, seen: int, max_calls: int,
              unverified: list[tuple[_Call, str]]) -> str:
    """A rule's row note: the deciding call's, then the calls not checked (``skipped``: why, each), those the
    sampling left out, and what of the forward could not be compared with the primal (``unverified``)."""
    parts = [note] if note else []
    if skipped:
        parts.append(f"{len(skipped)} call(s) not checked ({skipped[0]})")
    if picked < seen:
        parts.append(f"{seen - picked} of its {seen} call(s) not checked (max_calls={max_calls}: at most that many "
                     "calls checked per rule, besides one at each call site, and per loop that many iterations walked, "
                     "evenly spread; the others' "
                     "calls are counted): a rule wrong only at those passes")
    if unverified:
        parts.append(f"at {_call_name(unverified[0][0])}, {unverified[0][1]}"
                     + (f" ({len(unverified)} call(s) so)" if len(unverified) > 1 else ""))
    return "; ".join(parts)


def _valueless_row(rule: _Rule, verdict: Verdict, note: str, *, seen: int, checked: int = 0, where: str = "",
                   on_path: bool = True) -> AuditRow:
    """A row without values at an element: a rule not checked at any call (``fd_unreliable``: undecided, so the
    report is not ok), with nothing to differentiate (``ok``), or whose forward alone is wrong."""
    return AuditRow(rule.name, rule.source, rule.kind, checked, seen, verdict, None, where, None, None, None, 0.0, 0.0,
                    on_path, note)


def _call_name(call: _Call) -> str:
    return f"{call.site}" + (f" ({call.where})" if call.where else "")


def _notes(walker: _Walker, inlined: bool = False, solvers: Sequence[_Rule] = (),
           not_called: Sequence[str] = ()) -> list[str]:
    notes = ["in each call's check, the rule is JAX's derivative through the call; it is compared with JAX's plain "
             "autodiff of the rule's primal (traced without the rule) and with finite differences of the primal"]
    if walker.library_rules:
        names = sorted({r.name for r in walker.library_rules})
        notes.append(f"{sum(walker.library_rules.values())} call(s) of rules defined by JAX or the frameworks "
                     f"({', '.join(names[:8])}) not audited (library=True audits them)")
    if walker.excluded:
        notes.append("excluded: " + ", ".join(f"{r.name} ({n} call(s))" for r, n in walker.excluded.items()))
    unused = sorted(e for e in walker.exclude if not walker.matched.get(e))
    if unused:
        names = sorted({r.name for r in walker.calls} | {r.name for r in walker.excluded} | {r.name for r in solvers})
        notes.append(f"exclude names {', '.join(map(repr, unused))}, but fn calls no rule of that name: nothing "
                     "excluded for it (a misspelt name?); the rules fn calls are named "
                     + (", ".join(map(repr, names[:12])) if names else "(none)")
                     + " (a rule on a library function, jax.custom_jvp(jnp.tanh), is named after that function)")
    if walker.unentered:
        notes.append("custom rules inside " + ", ".join(sorted(walker.unentered)) + " were counted but not checked: "
                     "funcgrad does not enter these primitives")
    if not walker.calls and not walker.unentered_rules and not inlined and not solvers:
        notes.append("fn calls no custom derivative rule that is audited: nothing to check")
    if not_called:
        notes.append(f"not called at these inputs, so not checked: {', '.join(not_called)}: each sits in fn's program "
                     "only where this forward pass does not go (a lax.cond or lax.switch branch not taken, a loop that "
                     "ran no iteration); its derivative takes no part in this gradient. Audit at inputs that call it "
                     "to check it")
    return notes


_AUDIT_DEFAULTS = {"wrt": None, "max_calls": 8, "library": False, "exclude": (), "rtol": None, "atol": None,
                   "mode": "auto", "seed": 0}


def _clashes(fn: Any, **given: Any) -> list[str]:
    """Checks audit's options (see :func:`_check_options`); returns those given (not at their defaults) that
    ``fn`` takes too, which went to audit and not to fn. An error says so where one of them is refused."""
    clash = [k for k, v in given.items() if _differs(v, _AUDIT_DEFAULTS[k]) and _takes_keyword(fn, k)]
    try:
        _check_options(fn, given["max_calls"], given["library"], given["exclude"], given["mode"], given["seed"],
                       given["rtol"], given["atol"])
    except (TypeError, ValueError) as e:
        if clash:
            raise type(e)(f"{e}; {_clash_note(clash)}") from None
        raise
    return clash


def _differs(value: Any, default: Any) -> bool:
    """Whether an option was given otherwise than its default (an array, a wrt mask, compares as given)."""
    if value is default:
        return False
    try:
        return bool(value != default)
    except (TypeError, ValueError):  # (an array's elementwise comparison)
        return True


def _takes_keyword(fn: Any, name: str) -> bool:
    """Whether ``fn`` has a parameter ``name`` (one of audit's own keywords, which are never passed to fn)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # (no signature: a builtin, some C callables)
        return False


def _clash_note(names: list[str]) -> str:
    listed = ", ".join(f"{k}=" for k in names)
    return (f"{listed} went to audit, whose own keyword{'s' if len(names) > 1 else ''} "
            f"{'they are' if len(names) > 1 else 'it is'}, not to fn, which also takes {listed.rstrip('=')}; to "
            f"pass {'them' if len(names) > 1 else 'it'} to fn, bind {'them' if len(names) > 1 else 'it'} first: "
            f"audit(functools.partial(fn, {names[0]}=...), params, *args)")


def _check_options(fn: Any, max_calls: Any, library: Any, exclude: Any, mode: Any, seed: Any, rtol: Any,
                   atol: Any) -> None:
    if not callable(fn):
        raise TypeError(f"audit: fn must be callable; got {describe(fn)}")
    if not isinstance(max_calls, (int, np.integer)) or isinstance(max_calls, bool) or max_calls < 1:
        raise ValueError(f"audit: max_calls must be an int >= 1; got {max_calls!r}")
    if not isinstance(library, bool):
        raise TypeError(f"audit: library must be True or False; got {describe(library)}")
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, (list, tuple, set, frozenset)) or not all(
            isinstance(x, str) for x in exclude):
        raise TypeError(f"audit: exclude must be a sequence of rule names (str); got {describe(exclude)}")
    if mode not in ("auto", "exact", "projection"):
        raise ValueError(f"audit: mode must be 'auto', 'exact' or 'projection'; got {mode!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"audit: seed must be an int; got {describe(seed)}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        expected = None if value is None else in_range(value, 0.0)
        if expected:
            raise ValueError(f"audit: {name} must be None or {expected}; got {value!r}")
