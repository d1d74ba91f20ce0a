"""Input validation shared by every module: clear errors that name the argument or pytree path.

Checks run on shapes and dtypes, which are static under `jax.jit`, so they cost nothing at run time. Checks on
values (labels in range, finiteness) run only when the value is concrete (not a tracer); the training loop
validates its data once, before the first step, so they are not lost under jit.
"""

from __future__ import annotations

import contextvars
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

_Tracer = getattr(jax.core, "Tracer", None)


def is_tracer(x: Any) -> bool:
    """True when `x` is an abstract value inside a JAX transformation (its values are unknown)."""
    if _Tracer is not None:
        return isinstance(x, _Tracer)
    return hasattr(x, "aval") and not hasattr(x, "addressable_shards")  # concrete arrays have shards


def x64_enabled() -> bool:
    """Whether 64-bit JAX is on here (globally or in a ``jax.enable_x64`` scope)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64


def describe(x: Any) -> str:
    """A short description of a value for error messages, e.g. ``float32[300,2]``."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{_dtype_name(x.dtype)}[{','.join(str(d) for d in x.shape)}]"
    if isinstance(x, (bool, int, float, complex)):
        return f"{type(x).__name__} {x!r}"
    return type(x).__name__


def _dtype_name(dtype: Any) -> str:
    try:
        return str(jnp.dtype(dtype))
    except TypeError:
        return str(dtype)


def path_name(path: tuple, root: str = "") -> str:
    """``root`` followed by the pytree path in `jax.tree_util.keystr` form, e.g. ``params['dense1']['W']``."""
    return root + jax.tree_util.keystr(path)


def as_array(x: Any, name: str) -> jax.Array:
    """Converts `x` to an array, or raises a TypeError naming `name`."""
    if isinstance(x, (jax.Array, np.ndarray)) or is_tracer(x):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array (or convertible to one); got {describe(x)}: {e}") from None


def dtype_of(x: Any) -> Any:
    """The dtype of an array, tracer, ShapeDtypeStruct or Python scalar."""
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def is_float(x: Any) -> bool:
    return jnp.issubdtype(dtype_of(x), jnp.floating)


def require_float(x: Any, name: str) -> None:
    """Raises a TypeError naming `name` unless `x` has a floating dtype."""
    if not is_float(x):
        raise TypeError(
            f"{name} must have a floating dtype (e.g. float32); got {describe(x)}. "
            f"Convert it with .astype(jnp.float32)."
        )


def require_ndim(x: Any, ndim: int | tuple[int, ...], name: str, what: str = "") -> None:
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if jnp.ndim(x) not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must be {want}{extra}; got {describe(x)}")


def require_same_shape(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """No silent broadcasting: `a` and `b` must have exactly the same shape."""
    if jnp.shape(a) != jnp.shape(b):
        hint = ""
        sa, sb = jnp.shape(a), jnp.shape(b)
        if len(sa) == 2 and sa[1] == 1 and sb == sa[:1]:
            hint = f" Reshape {name_b} with .reshape(-1, 1)."
        elif len(sb) == 2 and sb[1] == 1 and sa == sb[:1]:
            hint = f" Reshape {name_a} with .reshape(-1, 1)."
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (no broadcasting); "
            f"got {name_a} {describe(a)} and {name_b} {describe(b)}.{hint}"
        )


def nonfinite_entries(tree: Any, root: str) -> list[str]:
    """The first non-finite element of each floating leaf of ``tree`` (concrete values only), each as
    ``root[path][index] = value (n non-finite element(s))``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    bad = []
    for path, leaf in flat:
        if is_tracer(leaf) or not is_float(leaf):
            continue
        arr = np.asarray(leaf)
        finite = np.isfinite(arr)
        if not finite.all():
            idx = tuple(int(i) for i in np.argwhere(~finite)[0])
            n = int((~finite).sum())
            bad.append(f"{path_name(path, root)}{list(idx) if idx else ''} = {arr[idx]} ({n} non-finite element(s))")
    return bad


def check_finite_tree(tree: Any, root: str) -> None:
    """Raises a ValueError naming the first non-finite element of each floating leaf (concrete values only)."""
    bad = nonfinite_entries(tree, root)
    if bad:
        raise ValueError("non-finite values (nan or inf) in " + root + ":\n  " + "\n  ".join(bad))


# Set while funcgrad.losses.checked traces a function: label checks become checkify checks.
LABEL_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("funcgrad_label_checks", default=False)


def check_labels(labels: Any, n_classes: int, n_samples: int, name: str = "labels") -> None:
    """Integer labels of shape (N,) in [0, n_classes), or one-hot of shape (N, n_classes)."""
    shape = jnp.shape(labels)
    if jnp.result_type(labels) == jnp.bool_:
        raise TypeError(f"{name}: bool labels {describe(labels)}; class labels must be integer indices of shape "
                        f"({n_samples},) or float one-hot rows of shape ({n_samples}, {n_classes}); convert with "
                        f"{name}.astype(int)")
    if jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        if shape != (n_samples,):
            hint = " Pass integer class indices of shape (N,), or one-hot rows of shape (N, C)."
            if len(shape) == 2 and shape[1] == 1 and shape[0] == n_samples:
                hint = " Flatten them with .reshape(-1)."
            raise ValueError(
                f"{name}: integer class labels must have shape ({n_samples},) to match the predictions; "
                f"got {describe(labels)}.{hint}"
            )
        if is_tracer(labels):
            # Under jit the values are unknown here. Inside funcgrad.losses.checked (checkify) the range becomes a
            # run-time check; elsewhere nothing is added to the program (a check there would cost a host callback
            # per step), and the losses return NaN for an out-of-range label instead.
            if LABEL_CHECKS.get():
                checkify.check(jnp.all((labels >= 0) & (labels < n_classes)),
                               f"{name}: class labels must lie in [0, {n_classes}) for {n_classes} classes; got "
                               "min {lo}, max {hi}", lo=jnp.min(labels), hi=jnp.max(labels))
        else:
            arr = np.asarray(labels)
            if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
                bad = int(np.argmax((arr < 0) | (arr >= n_classes)))
                raise ValueError(
                    f"{name}: class labels must lie in [0, {n_classes}) for {n_classes} classes; "
                    f"{name}[{bad}] = {arr[bad]} (min {arr.min()}, max {arr.max()})"
                )
    elif jnp.issubdtype(jnp.result_type(labels), jnp.floating):
        if shape != (n_samples, n_classes):
            raise ValueError(
                f"{name}: one-hot labels must have shape ({n_samples}, {n_classes}) to match the predictions; "
                f"got {describe(labels)}. Integer class indices of shape ({n_samples},) are also accepted."
            )
    else:
        raise TypeError(f"{name} must be integer class indices or float one-hot rows; got {describe(labels)}")


def in_range(value: Any, low: float, high: float | None = None, *, low_open: bool = False) -> str | None:
    """None when ``value`` is a real number in the range; else what was expected, e.g. "a number >= 0"."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        try:
            value = float(value)  # a huge int (10**30) becomes a float; one beyond float range cannot
        except OverflowError:
            ok = False
    if ok:
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and (high is None or value < high)
    if ok:
        return None
    return f"a finite number {'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")


def is_typed_key(x: Any) -> bool:
    """A new-style PRNG key array (``jax.random.key``)."""
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def is_key(x: Any) -> bool:
    """A single PRNG key: typed (``jax.random.key``) or raw uint32[2] (``jax.random.PRNGKey``)."""
    if is_typed_key(x):
        return jnp.shape(x) == ()
    return hasattr(x, "dtype") and x.dtype == jnp.uint32 and jnp.shape(x) == (2,)


def as_shape(input_shape: Any, where: str) -> tuple[int, ...]:
    """An input shape as a tuple of positive ints (an int n is (n,)); else an error naming ``where``."""
    if isinstance(input_shape, (int, np.integer)):
        input_shape = (int(input_shape),)
    try:
        shape = tuple(int(d) for d in input_shape)
    except TypeError:
        raise TypeError(f"{where}: input_shape must be an int or a tuple of ints, e.g. (2,); got {input_shape!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"{where}: input_shape must be a non-empty tuple of positive ints, e.g. (2,); got {input_shape!r}")
    return shape


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of an array, also of one replicated over the devices of several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils  # noqa: PLC0415 - only multi-process runs need it

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def is_strength(value: Any) -> bool:
    """A penalty strength λ: a finite real number >= 0 (not a bool). The one rule for Objective's and config's
    tables."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < math.inf
