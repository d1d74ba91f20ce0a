"""What is differentiated, and the user's functions as the checks see them: the selection of leaves (``wrt``) and
the flat layout of the differentiated ones; further arguments split into traced arrays and static values; fn and
hand bound to the differentiated leaves; checks of their outputs' structure, shapes and dtypes, and the errors
they raise."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad._checks import check_finite_tree, describe, is_tracer
from funcgrad.verify._report import _LIST

# ---- 64-bit scopes -----------------------------------------------------------------------------------------
# JAX caches what it makes of a NumPy array a function closes over (the array of the dropout mask the book draws
# with np.random.binomial, say) without the x64 setting in the key: once fn has been traced at one setting, a
# trace at the other reuses that dtype (a float32 mask in the float64 check: "lax.mul requires arguments to have
# the same dtypes"), and the cached float64 copy leaks into the user's own 32-bit programs afterwards. A check
# that fails so runs again with JAX's caches cleared at every change of the setting (see _isolating).
_ISOLATE: contextvars.ContextVar[bool] = contextvars.ContextVar("funcgrad_isolate_x64", default=False)
_DTYPE_CLASH = re.compile(r"same dtypes|verifier error|ProgramInputMismatch|evaluated in float64|"
                          r"(float|int)(32|64)\b.{0,40}\b(float|int)(32|64)")


@contextlib.contextmanager
def _x64(on: bool) -> Iterator[None]:
    """``jax.enable_x64(on)``; in an isolated check, with JAX's caches cleared on entering and on leaving."""
    isolate = _ISOLATE.get()
    if isolate:
        jax.clear_caches()
    try:
        with jax.enable_x64(on):
            yield
    finally:
        if isolate:
            jax.clear_caches()


def _isolating(check: Callable) -> Callable:
    """A check that, when it fails with a clash of 32- and 64-bit dtypes, runs once more isolated: JAX's caches
    cleared at every change of the x64 setting, and once more at the end so that nothing of the check's
    64-bit traces is left for the user's programs (which recompile once)."""

    @functools.wraps(check)
    def run(*args: Any, **kwargs: Any) -> Any:
        (args, kwargs), note = _replicated((args, kwargs))
        return _noted(isolated(*args, **kwargs), note)

    def isolated(*args: Any, **kwargs: Any) -> Any:
        if _ISOLATE.get():
            return check(*args, **kwargs)
        try:
            return check(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is the clash
            text = " ".join([str(e), *getattr(e, "__notes__", ())])
            if not _DTYPE_CLASH.search(text):
                raise
        token = _ISOLATE.set(True)
        try:
            jax.clear_caches()
            return check(*args, **kwargs)
        finally:
            jax.clear_caches()
            _ISOLATE.reset(token)

    return run


# ---- arrays sharded with explicit axes ------------------------------------------------------------------------
# Under JAX's explicit sharding (``jax.make_mesh``'s default axis types), an array's sharding is part of its type:
# flattening a sharded leaf, taking one element of it or perturbing it along a direction of another type is a type
# error ("This reshape is not supported ..."), and a custom rule's bwd handed an unsharded cotangent for a sharded
# input is refused by JAX. A check's arithmetic is the same on any layout: such inputs are checked replicated on
# their mesh (what fn computes inside, shardings of its own included, is as the user wrote it).


def _along_explicit_axes(sharding: Any) -> bool:
    """Whether a (named) sharding, a concrete array's or one in a type, places values along an explicit mesh axis."""
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or spec is None:
        return False
    explicit = {n for n, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ()), strict=False)
                if t == jax.sharding.AxisType.Explicit}
    return bool(explicit & {n for p in spec if p is not None for n in ((p,) if isinstance(p, str) else p)})


def _explicitly_sharded(x: Any) -> bool:
    """Whether ``x`` is a concrete array sharded along some explicit mesh axis (the sharding in its type)."""
    return isinstance(x, jax.Array) and not is_tracer(x) and _along_explicit_axes(getattr(x, "sharding", None))


def _replicated(tree: Any) -> tuple[Any, str]:
    """``tree`` with every array sharded along an explicit mesh axis replicated on its mesh (the same values), and a
    note naming them ("" when there are none: then ``tree`` itself)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    sharded = [(p, x) for p, x in flat if _explicitly_sharded(x)]
    if not sharded:
        return tree, ""
    ids = {id(x) for _, x in sharded}
    leaves = [jax.device_put(x, jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec()))
              if id(x) in ids else x for _, x in flat]
    shown = ", ".join(f"{jax.typeof(x)}" for _, x in sharded[:_LIST]) + ("..." if len(sharded) > _LIST else "")
    return jax.tree_util.tree_unflatten(treedef, leaves), (
        f"{len(sharded)} input array(s) sharded along explicit mesh axes ({shown}) checked replicated on their mesh "
        "(the same values): a check flattens, slices and perturbs its inputs, which explicit sharding types refuse")


def _noted(report: Any, note: str) -> Any:
    """``report`` with ``note`` added to its notes (when it has notes and the note is not empty)."""
    notes = getattr(report, "notes", None)
    if not note or not isinstance(notes, tuple) or isinstance(report, type) or not dataclasses.is_dataclass(report):
        return report
    given: Any = report
    return dataclasses.replace(given, notes=(*notes, note))


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
        leaves = [theta[o : o + s].reshape(shape) for o, s, shape in zip(self.offsets, self.sizes, self.shapes, strict=True)]
        if dtypes is not None:
            leaves = [leaf.astype(d) for leaf, d in zip(leaves, dtypes, strict=True)]
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
        return tuple(p for p, d in zip(self.paths, self.diff, strict=True) if d)

    def split(self) -> tuple[list, list]:
        return ([x for x, d in zip(self.leaves, self.diff, strict=True) if d],
                [x for x, d in zip(self.leaves, self.diff, strict=True) if not d])

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


def _default_mask(leaves: Sequence[Any]) -> list[bool]:
    """The leaves differentiated by default: inexact arrays; and Python floats, which are points to differentiate
    at (the book's chapter-9 examples: f(2.0)) when no other leaf is a floating array. Beside arrays (a module's
    hyperparameters: equinox.nn.Dropout's p) they are held fixed, as equinox.filter_grad holds them. ints stay
    integers."""
    floats_are_points = not any(_is_inexact(x) for x in leaves if not isinstance(x, float))
    return [floats_are_points if isinstance(x, float) else _is_inexact(x) for x in leaves]


def _nnx_class(t: type, names: tuple[str, ...]) -> bool:
    """Whether the class ``t`` is one of Flax NNX's classes ``names`` or derives from one, told by its classes' names
    and modules, so that Flax is never imported for it."""
    return any(c.__name__ in names and c.__module__.startswith("flax.nnx") for c in t.__mro__)


def _is_nnx(x: Any, name: str = "Variable") -> bool:
    """Whether ``x`` is an instance of Flax NNX's class ``name`` (``Variable``: a Param, BatchStat, RngKey... or an
    older Flax's VariableState)."""
    return _nnx_class(type(x), (name,))


def _nnx_filter(wrt: Any) -> bool:
    """Whether ``wrt`` is a Flax NNX filter, as ``nnx.state(model, filter)`` takes: a Variable type (``nnx.Param``), an
    object of ``flax.nnx.filterlib`` (``nnx.PathContains("l1")``, ``nnx.Not(nnx.BatchStat)``, ``nnx.Any(...)``), a
    tag (a string), ``...``, or a tuple or list of them (any of them). A bool, a tuple of bools or a plain function is
    funcgrad's own (a pytree prefix of bools, a predicate on leaves)."""
    if isinstance(wrt, type):
        return _nnx_class(wrt, ("Variable", "VariableState"))
    if isinstance(wrt, str) or wrt is Ellipsis:
        return True
    if isinstance(wrt, (tuple, list)) and not hasattr(wrt, "_fields"):
        return bool(wrt) and all(_nnx_filter(w) for w in wrt)
    return callable(wrt) and type(wrt).__module__.startswith("flax.nnx")


def _nnx_key(k: Any) -> Any:
    """A JAX key path entry as Flax NNX names it in a state's paths: the attribute, dict key or index."""
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def _nnx_root(x: Any) -> bool:
    """Whether ``x`` is a Flax NNX module (any NNX pytree object) or state, whose Variables NNX names by paths from it."""
    return _nnx_class(type(x), ("Pytree", "Object", "State"))


def _two_arguments(f: Any) -> bool:
    """Whether ``f`` is a plain function of two positional arguments, not one: NNX's ``(path, value) -> bool``."""
    if isinstance(f, type) or not callable(f):
        return False
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):
        return False
    try:
        sig.bind(None)
    except TypeError:
        try:
            sig.bind(None, None)
        except TypeError:
            return False
        return True
    return False


def _nnx_mask(params: Any, wrt: Any, who: str) -> list[bool] | None:
    """``wrt`` as one bool per leaf when it is a Flax NNX filter (see :func:`_nnx_filter`; or a function of
    ``(path, value)``, when ``params`` holds NNX Variables), else None. Within each NNX module or state in
    ``params`` (the outermost), each Variable, and each array that is not in one, is selected as
    ``nnx.state(model, wrt)`` selects it, by its path from that module or state; its floating-point leaves are
    differentiated, the others held fixed (an nnx.Rngs' counters and keys). Leaves outside any module or state are
    held fixed."""
    if isinstance(wrt, type) and wrt.__module__.startswith("flax.nnx.filterlib"):
        raise TypeError(f"{who}: wrt={wrt.__name__} is the class of a Flax NNX filter; pass an instance: "
                        f"wrt=nnx.{wrt.__name__}(...)")
    nnx_filter = _nnx_filter(wrt)
    if not nnx_filter and not _two_arguments(wrt):
        return None
    nodes = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_nnx)[0]
    if not any(_is_nnx(x) for _, x in nodes):
        if not nnx_filter or isinstance(wrt, (str, tuple, list)) or wrt is Ellipsis:
            return None  # (not meant for NNX: said as any other wrong wrt is)
        raise TypeError(f"{who}: wrt={wrt!r} is a Flax NNX filter, which selects nnx.Variable's (Param, BatchStat, ...), "
                        f"but params ({describe(params)}) holds none; pass the NNX module itself or its state "
                        "(nnx.split(model) or nnx.state(model)), or choose leaves with a predicate (leaf -> bool) or "
                        "a pytree of bools")
    from flax.nnx import filterlib  # noqa: PLC0415 - only an NNX filter needs it (Flax is imported already then)

    try:
        pred = filterlib.to_predicate(wrt)
    except TypeError as e:
        raise TypeError(f"{who}: wrt={wrt!r} is not a Flax NNX filter Flax accepts: {e}") from None
    roots = jax.tree_util.tree_flatten_with_path(params, is_leaf=_nnx_root)[0]
    if not any(_nnx_root(r) for _, r in roots):
        roots = [((), params)]  # (Variables in a plain container: paths from params)
    mask: list[bool] = []
    for root_path, root in roots:
        if not (_nnx_root(root) or root_path == ()):
            mask += [False] * len(jax.tree_util.tree_leaves(root))
            continue
        for path, node in jax.tree_util.tree_flatten_with_path(root, is_leaf=_is_nnx)[0]:
            keys = tuple(_nnx_key(k) for k in path)
            try:
                v = pred(keys, node)
            except Exception as e:  # noqa: BLE001 - the user's filter failing: said so, with the Variable's path
                raise TypeError(f"{who}: the Flax NNX filter wrt={wrt!r} failed on "
                                f"{jax.tree_util.keystr((*root_path, *path))} ({type(node).__name__}): {e}") from None
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{who}: the Flax NNX filter wrt={wrt!r} must return True or False; for "
                                f"{jax.tree_util.keystr((*root_path, *path))} it returned {describe(v)}")
            # (a filter selects Variables, not dtypes: the integer counters and keys of an nnx.Rngs that
            # nnx.Not(...) or ... selects are held fixed, as the default holds them)
            mask += [bool(v) and _is_inexact(x) for x in jax.tree_util.tree_leaves(node)]
    return mask


def _wrt_mask(params: Any, wrt: Any, n: int, who: str = "check_grad") -> list[bool] | None:
    """``wrt`` as one bool per leaf: None (default), a predicate, a pytree (prefix) of bools, or a Flax NNX filter
    (``who``: the function whose argument it is, for the messages)."""
    if wrt is None:
        return None
    nnx_mask = _nnx_mask(params, wrt, who)
    if nnx_mask is not None:
        return nnx_mask
    # A predicate is a callable leaf; an equinox filter spec is a Module, callable but a pytree.
    if callable(wrt) and not isinstance(wrt, bool) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(wrt)):
        out = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            try:
                v = wrt(leaf)
            except Exception as e:  # noqa: BLE001 - the user's predicate failing: said where, with its error
                raise TypeError(f"{who}: wrt must be a predicate taking one leaf (leaf -> bool); calling it on "
                                f"{jax.tree_util.keystr(path) or 'params'} ({describe(leaf)}) failed: "
                                f"{type(e).__name__}: {e}") from (None if isinstance(e, TypeError) else e)
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{who}: wrt(leaf) must return True or False; for {jax.tree_util.keystr(path)} "
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
            f"{who}: wrt must be a predicate (leaf -> bool) or a pytree of bools with the structure of params "
            f"(or a prefix of it, as in equinox.partition); it does not match params: "
            + (_prefix_mismatch(wrt, params) or " ".join(x.strip() for x in str(e).splitlines() if x.strip())[:600])
        ) from None
    bad = [describe(m) for m in mask if not isinstance(m, (bool, np.bool_))]
    if bad or len(mask) != n:
        raise TypeError(f"{who}: wrt must be None, a predicate (leaf -> bool) or a pytree of bools with the structure "
                        f"of params; its leaves must be True or False, got {bad[:3] or mask[:3]}")
    return [bool(m) for m in mask]


def _tied_notes(params: Any) -> list[str]:
    """A note for each Flax NNX Variable that ``params`` holds at several paths (weights tied in a module)."""
    if "flax.nnx" not in sys.modules:
        return []
    where: dict[int, list[str]] = {}
    for path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_nnx)[0]:
        if _is_nnx(node):
            where.setdefault(id(node), []).append(jax.tree_util.keystr(path))
    return [f"{' and '.join(ps[:_LIST])} are one nnx.Variable (tied): as a pytree, a module holds it once per path, "
            "and each path's gradient is its use there alone (as jax.grad of the module gives it); the whole gradient "
            "of the tied weight is their sum, which nnx.split(model)'s state, holding it once, gives"
            for ps in where.values() if len(ps) > 1]


def _select(params: Any, wrt: Any) -> tuple[_Selection, list[str]]:
    """Decides which leaves are differentiated; returns the selection and notes on the leaves held fixed."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError("check_grad: params has no leaves; pass the arrays to differentiate with respect to")
    paths = tuple(jax.tree_util.keystr(p) for p, _ in flat)
    raw = [x for _, x in flat]
    mask = _wrt_mask(params, wrt, len(raw))
    if mask is None:
        mask = _default_mask(raw)
    # A differentiated Python float becomes an array; one held fixed stays a Python float, static to fn's trace
    # (a module's `if self.scale != 1.0:` must see a number, as it does under equinox.filter_grad).
    leaves = tuple(jnp.asarray(x) if isinstance(x, float) and m else x for x, m in zip(raw, mask, strict=True))
    errors = []
    for path, leaf, d in zip(paths, leaves, mask, strict=True):
        if not d:
            continue
        dt = _leaf_dtype(leaf)
        name = "params" + path
        if dt is None or not jnp.issubdtype(dt, jnp.inexact):
            by = "selected by wrt, " if wrt is not None else ""
            errors.append(f"{name} ({by}{describe(leaf)}) is not a floating-point array" + _opaque_hint(leaf))
        elif jnp.issubdtype(dt, jnp.complexfloating):
            errors.append(f"{name} is complex ({describe(leaf)}); only real floating leaves can be checked: hold it "
                          "fixed with wrt=")
    if wrt is None:  # (held fixed by default, an object JAX sees as one leaf would hide its arrays from the check)
        errors += [f"params{p} ({describe(x)}) is not a floating-point array{_opaque_hint(x)}"
                   for p, x, d in zip(paths, leaves, mask, strict=True) if not d and _opaque_arrays(x)]
    if errors:
        raise TypeError("check_grad: cannot differentiate:\n  " + "\n  ".join(errors))
    if not any(mask):
        listed = ", ".join(f"{p or '(params)'} {describe(x)}" for p, x in list(zip(paths, leaves, strict=True))[:_LIST])
        if wrt is not None:
            raise ValueError(f"check_grad: nothing to differentiate: wrt selects no leaf of params ({listed}); "
                             "select at least one floating-point array leaf")
        raise TypeError(
            "check_grad: nothing to differentiate: params has no floating-point array leaves "
            f"({listed}{', ...' if len(leaves) > _LIST else ''}). Write parameters as floats (1.0, not 1; "
            "x.astype(jnp.float32)), or choose the leaves with wrt=."
        )
    check_finite_tree(jax.tree_util.tree_unflatten(treedef, [x if d else None for x, d in zip(leaves, mask, strict=True)]),
                      "params")
    fixed = [(p, x) for p, x, d in zip(paths, leaves, mask, strict=True) if not d]
    notes = _tied_notes(params)
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


def _opaque_arrays(x: Any) -> list[str]:
    """The attributes of ``x``, an object JAX sees as one leaf (a class not registered as a pytree: not an array, a
    number, a string or a function), that hold floating-point arrays (directly, or in a list, tuple or dict)."""
    if x is None or callable(x) or isinstance(x, (jax.Array, np.ndarray, np.generic, str, bytes, int, float, complex,
                                                  type)):
        return []
    try:
        fields = vars(x)
    except TypeError:
        return []

    def floating(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return any(floating(u) for u in v)
        if isinstance(v, dict):
            return any(floating(u) for u in v.values())
        return isinstance(v, (jax.Array, np.ndarray)) and jnp.issubdtype(v.dtype, jnp.inexact)

    return [k for k, v in fields.items() if floating(v)]


def _opaque_hint(x: Any) -> str:
    """Where ``x`` is an object holding floating arrays that JAX sees as one leaf: what to do (else "")."""
    names = _opaque_arrays(x)
    if not names:
        return ""
    return (f": it is a {type(x).__name__}, a class not registered as a pytree, holding floating arrays ("
            f"{', '.join(names[:_LIST])}{', ...' if len(names) > _LIST else ''}), which JAX sees as one leaf and "
            "jax.grad refuses; register it (jax.tree_util.register_dataclass, flax.struct.dataclass, an "
            "equinox.Module), or pass it among args to hold it fixed")


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


def _split_args(args: Any, concrete: frozenset[int] = frozenset()) -> tuple[list, tuple]:
    """The arrays of ``args`` (traced), and the spec that puts them back among its other (static) values. Arrays
    whose ``id`` is in ``concrete`` are static too: fn sees their values (see :func:`_concrete_tiers`)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    dyn: list[Any] = []
    spec: list[Any] = []  # _DYN for each array, else the static value (or a _ById of it)
    for leaf in leaves:
        if _is_array(leaf) and id(leaf) not in concrete:
            dyn.append(leaf)
            spec.append(_DYN)
        else:
            try:
                hash(leaf)
            except TypeError:
                spec.append(_ById(leaf))
            else:
                spec.append(leaf)
    return dyn, (treedef, tuple(spec))


def _concrete_tiers(held: Sequence) -> list[frozenset[int]]:
    """Which of the arrays ``held`` (arguments and fixed leaves, never differentiated) a check holds as concrete
    values, tier by tier: none (all traced: compilations are shared across data); those that are not floats
    (labels, masks, keys: ``int(y.max()) + 1``); all of them (``if x.max() > 1:``). ``jax.grad`` traces only what
    it differentiates, so a function may use these values in Python; a check moves to the next tier when tracing
    fails for want of a concrete value. Tiers that hold nothing more are left out."""
    arrays = [x for x in held if _is_array(x)]
    ints = frozenset(id(x) for x in arrays if not jnp.issubdtype(jnp.result_type(x), jnp.inexact))
    every = frozenset(id(x) for x in arrays)
    tiers: list[frozenset[int]] = [frozenset()]
    for t in (ints, every):
        if len(t) > len(tiers[-1]):
            tiers.append(t)
    return tiers


def _concrete_note(held: Any, concrete: frozenset[int]) -> str:
    """The report's note for a check that holds the arrays ``concrete`` (of the pytree ``held``) as values."""
    floats = any(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jax.tree_util.tree_leaves(held)
                 if _is_array(x) and id(x) in concrete)
    which = "arguments and fixed leaves" if floats else "non-float arguments and fixed leaves (labels, masks, keys)"
    return (f"fn uses the values of its {which} in Python (NumPy, or an if on them), as jax.grad allows: they are "
            "held as constants, as if fn closed over them" + (" (at their own dtypes in the float64 check)"
                                                             if floats else ""))


def _untraceable(e: Exception, what: str, arg: str, paths: Sequence[str | None]) -> Exception:
    """A clean error for a function JAX cannot trace (a value it uses in Python is traced), naming the leaf of
    params when JAX's message says which input it was (``arg[k]``: the tracing function's argument ``arg`` held the
    leaves ``paths``, None where not a leaf of params)."""
    m = re.search(rf"argument {arg}\[(\d+)\]", str(e))
    path = paths[int(m.group(1))] if m and int(m.group(1)) < len(paths) else None
    leaf = "" if path is None else f" (it needs the value of {path or 'params'})"
    return _UserTypeError(
        f"{what}: JAX cannot trace fn{leaf}: {_first_line(e).rstrip('.')}. {what} traces fn as jax.jit does "
        "(as a training step is compiled), so fn must compute with jax.numpy on traced values: no int(), float(), "
        "bool() (a Python if) or np.asarray of the parameters, nor of what jax.numpy computes from them or from "
        "the arguments inside the trace (jnp.max(y)); the arguments themselves are held as values when that is "
        "all fn needs (NumPy on them works). Compute such values outside fn and pass them as Python numbers "
        "(n_classes = int(y.max()) + 1), branch with jnp.where or jax.lax.cond, and hold a hyperparameter that "
        "must stay a Python number fixed with wrt=")


def _join_args(dyn: Sequence, spec: tuple) -> Any:
    treedef, static = spec
    it = iter(dyn)
    return jax.tree_util.tree_unflatten(
        treedef, [next(it) if s is _DYN else (s.value if isinstance(s, _ById) else s) for s in static])


def _fresh(fn: Callable) -> Callable:
    """A new function object that calls ``fn``: compiled programs are cached per function object."""
    return lambda *a, **k: fn(*a, **k)  # noqa: PLW0108 - the new object is the point, not the call


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


class _UndefinedValue(_UserValueError):
    """fn's value is NaN at the given params (see :func:`_check_value`)."""


class _UserTypeError(TypeError):
    """A user error detected while JAX traces the user's function (re-raised clean, without JAX's notes)."""


def _clean(e: Exception) -> Exception:
    """A user error raised inside a JAX trace, as a plain ValueError/TypeError without the trace's notes."""
    return (ValueError if isinstance(e, ValueError) else TypeError)(*e.args)


def _leaked_tracer(e: BaseException) -> bool:
    """Whether JAX failed on a value traced in one function and used outside its trace (a custom rule closing over
    a scan's input, say): JAX's UnexpectedTracerError, or XLA finding that tracer among a program's constants."""
    return isinstance(e, jax.errors.UnexpectedTracerError) or (
        isinstance(e, TypeError) and "constant handler" in str(e) and "Tracer" in str(e))


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


def _views(xs: Sequence) -> list:
    """The NumPy arrays among ``xs`` as fresh views (the same memory), the rest as they are. JAX keeps what it made
    of a NumPy array under one x64 setting (a float32 copy of a float64 array a trace closed over), by the array
    object, for as long as that is alive (in a jit cache, a trace a custom rule holds): passed again under the other
    setting, the same object gets that copy, with float64 claimed for float32 data (a runtime error, or a silent
    float32 value). A view JAX has not seen gets its own conversion."""
    return [x.view() if type(x) is np.ndarray else x for x in xs]


def _host_tree(tree: Any, float64: bool, own: frozenset[int] = frozenset()) -> Any:
    """:func:`_host` of every leaf; those whose ids are in ``own`` keep their dtypes."""
    return jax.tree_util.tree_map(lambda x: _host(x, float64 and id(x) not in own), tree)


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
        """fn's output. ``packed`` is (fixed leaves, args), or (fixed leaves, args, constants) for a traced fn
        (see :mod:`funcgrad.verify._traced`), which takes the differentiated leaves and packed as they are."""
        if getattr(self.fn, "traced", False):
            return self.fn(dl, packed)
        fixed, args = packed[0], packed[1]
        return self.fn(self.merge(dl, fixed), *args)

    def value(self, dl: Sequence, packed: Any) -> Any:
        # (as an array: a Python float, a constant loss, has no astype)
        return jnp.asarray(_main_output(self.raw(dl, packed), self.has_aux))

    def grad(self, dl: Sequence, packed: Any) -> list:
        if self.hand is None:  # unreachable: called only for checks with a hand
            raise TypeError("_Bound.grad: no hand to call")
        if getattr(self.hand, "traced", False):
            return self.hand(dl, packed)  # traced from this very method: its leaves, checked at tracing
        fixed, args = packed[0], packed[1]
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
        raise _UserValueError(f"{what} must return a gradient with the structure of params; got {describe(out)} "
                              f"({e})") from None
    got = {jax.tree_util.keystr(p): x for p, x in flat}
    paths = b.paths
    known = set(paths)
    diff = [s for s, d in zip(b.specs, b.diff, strict=True) if d]
    missing = [p for p, _, _ in diff if p not in got or got[p] is None]
    extra = [p for p, x in got.items() if p not in known and x is not None]
    if missing or extra:
        # The same names in another container: an nnx.State (what nnx.grad returns) for a module's parameters, its
        # Variables named by their NNX paths (['l1']['kernel'].value for the module's .l1.kernel.value), or nested
        # dicts of those names without the Variables' .value (what nnx.State.to_pure_dict gives, what a NumPy
        # hand writes): taken where every name matches one leaf of params and no two the same
        mine = {_path_keys(p.removesuffix(".value")): p for p in paths}
        ours = [_path_keys(q.removesuffix(".value")) for q in got]
        if len(mine) == len(paths) and len(set(ours)) == len(ours) and all(k in mine for k in ours):
            got = {mine[k]: x for k, x in zip(ours, got.values(), strict=True)}
            missing, extra = [p for p, _, _ in diff if got.get(p) is None], []
    if missing or extra:
        detail = []

        def named(ps: Any) -> list[str]:  # (the root leaf, a single array's, by the name the other messages use)
            return [q or "(params)" for q in ps]

        if missing:
            detail.append(f"missing {named(missing)}" if got and not (len(got) == 1 and "" in got) else
                          f"{_describe_out(out)}, not a tree of gradients")
        if extra:
            detail.append(f"unexpected {extra}")
        held = [p for p, d in zip(paths, b.diff, strict=True) if not d]
        raise _UserValueError(
            f"{what} must return a gradient with the same structure as params; it returned {'; '.join(detail)}. "
            f"params leaves: {named(paths)}" + (f" (held fixed, may be None: {named(held)})" if held else "")
            + _pair_hint(out, b, what) + _wrt_hint(missing, extra, got, diff)
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
    return [_unplaced(h) for h in leaves]


def _unplaced(x: Any) -> Any:
    """``x`` replicated where its type places it along explicit mesh axes (a hand that mirrors fn's own
    shardings): the checks flatten it (see _replicated); anything else as it is."""
    if not isinstance(x, jax.Array):
        return x
    typed: Any = getattr(jax.typeof(x), "sharding", None)
    if not _along_explicit_axes(typed):
        return x
    if is_tracer(x):
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(typed.mesh, jax.sharding.PartitionSpec()))
    placed: Any = x.sharding  # (a NamedSharding on the concrete mesh)
    return jax.device_put(x, jax.sharding.NamedSharding(placed.mesh, jax.sharding.PartitionSpec()))


def _prefix_mismatch(wrt: Any, params: Any, most: int = 8) -> str:
    """Where the pytree ``wrt`` is no prefix of ``params``: its leaves that name nothing in params, and params'
    leaves that no leaf of wrt covers, by path ("" when that finds nothing)."""
    try:
        mine = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(
            wrt, is_leaf=lambda x: isinstance(x, (bool, np.bool_)))[0]]
        theirs = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    except Exception:  # noqa: BLE001 - unflattenable: JAX's own words then
        return ""
    stray = [m for m in mine if not any(t[: len(m)] == m for t in theirs)]
    bare = [t for t in theirs if not any(t[: len(m)] == m for m in mine)]

    def listed(ps: list) -> str:
        names = [jax.tree_util.keystr(p) or "(root)" for p in ps[:most]]
        return str(names) + (f" and {len(ps) - most} more" if len(ps) > most else "")

    parts = ([f"wrt has {listed(stray)}, which params lacks"] if stray else []) + (
        [f"no leaf of wrt covers params' {listed(bare)}"] if bare else [])
    return "; ".join(parts)


def _pair_hint(out: Any, b: _Bound, what: str) -> str:
    """Where ``what`` returned a pair one of whose parts is a gradient of params' structure ((loss, grads) as
    jax.value_and_grad gives, (grads, aux)): a sentence saying so, else ""."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return ""
    for k, name in ((1, "(value, gradient), as jax.value_and_grad gives"), (0, "(gradient, aux)")):
        try:
            _extract_grad(out[k], b, what)
        except Exception:  # noqa: BLE001, S112 - not a gradient of params' structure: not this part
            continue
        return f"; it returned a pair whose [{k}] is such a gradient: {name}? return the gradient alone"
    return ""


def _wrt_hint(missing: list[str], extra: list[str], got: dict, diff: list) -> str:
    """Where a gradient holds some of the differentiated leaves and nothing else: how to check those alone."""
    if extra or not missing or not any(got.get(p) is not None for p, _, _ in diff):
        return ""
    return ("; to check only the leaves it returns, hold the others fixed with wrt= (a predicate on leaves, a "
            "pytree of bools, or an NNX filter)")


def _path_keys(path: str) -> tuple[str, ...]:
    """A leaf's path (as jax.tree_util.keystr writes it) as its keys alone, whether attributes, dict keys or indices:
    ``.l1.kernel.value`` and ``['l1']['kernel'].value`` are both ('l1', 'kernel', 'value')."""
    return tuple(a or b or c for a, b, c in re.findall(r"\.(\w+)|\['((?:[^'\\]|\\.)*)'\]|\[(-?\d+)\]", path))


def _first_line(e: Exception) -> str:
    lines = [s for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _check_value(value: Any) -> None:
    """fn's value must be a number; ±inf (a log of 0) is a singular point, reported as such."""
    v = float(value)
    if math.isnan(v):
        raise _UndefinedValue(f"fn(params, *args) = {v} at the given params: the function itself is not defined "
                              "there, so it has no derivative to check (a sqrt or log of a negative number, 0/0, "
                              "inf − inf?)")
