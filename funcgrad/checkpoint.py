"""Checkpoints as bytes: any pytree of arrays (PRNG keys included) in NumPy's ``.npz`` format.

Loading never executes code: arrays are read with ``allow_pickle=False`` and the tree's structure comes from
a template (``like``), not from the file. The file carries each leaf's pytree path, dtype and shape, so a
mismatch is reported by path. Writing the bytes to disk atomically is the CLI's job (``funcgrad train``).

A leaf is a JAX or NumPy array of numbers (bfloat16 included), a Python or NumPy number (stored as a 0-d
array) or a typed PRNG key (``jax.random.key``); anything else (a string, an object array, a function) is a
:class:`CheckpointError` naming its pytree path. Numbers are stored as JAX holds them: without
``jax_enable_x64``, a NumPy int64 or float64 is stored as int32 or float32 (an integer that does not fit is an
error, never wrapped).

* :func:`to_bytes` / :func:`from_bytes` / :func:`metadata`: save, restore onto a template, read the ``meta``
  dict only. ``from_bytes(..., check_finite=True)`` also rejects a NaN or inf in a floating leaf (off by
  default: a checkpoint is restored as it was saved).
* :func:`load_flat`: the arrays without a template, as ``{pytree path: array}`` (for inspection and tools).
* :func:`orbax_manager`: the same trees in a directory of steps written by orbax-checkpoint (optional,
  ``pip install "funcgrad[orbax]"``): sharded arrays saved and restored by every process (multi-host), saves
  in the background, the last ``max_to_keep`` steps kept; restored with the same checks by path as
  :func:`from_bytes` (see ``funcgrad._orbax.OrbaxManager``). ``import funcgrad`` never imports orbax.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from funcgrad import checkpoint
    >>> tree = {"w": jnp.arange(3.0), "key": jax.random.key(0)}
    >>> restored = checkpoint.from_bytes(checkpoint.to_bytes(tree, {"step": 7}), like=tree)
    >>> restored["w"].tolist(), checkpoint.metadata(checkpoint.to_bytes(tree, {"step": 7}))
    ([0.0, 1.0, 2.0], {'step': 7})
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad._checks import is_typed_key

if TYPE_CHECKING:
    from funcgrad._orbax import OrbaxManager

__all__ = ["FORMAT", "CheckpointError", "from_bytes", "load_flat", "metadata", "orbax_manager", "size_bound", "to_bytes"]

FORMAT = "funcgrad-checkpoint-1"
_META = "__funcgrad__"


class CheckpointError(ValueError):
    """The checkpoint is not a funcgrad checkpoint, is damaged, or does not match the template; or a tree to save
    has a leaf no checkpoint can hold."""


# --- Leaves: what a checkpoint can hold, as (shape, dtype, PRNG key implementation) --------------------------------

_EXPECTED = "a checkpoint holds arrays of numbers (JAX or NumPy), Python or NumPy numbers, and PRNG keys (jax.random.key)"

# A leaf's shape, the dtype it is stored with (a PRNG key's: its key data's) and a PRNG key's implementation.
_Spec = tuple[tuple[int, ...], np.dtype, "str | None"]


def _type_name(x: Any) -> str:
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _is_number_dtype(dtype: Any) -> bool:
    """Numbers and bools, bfloat16 and JAX's other extended floats included; never objects, strings or records."""
    try:
        return bool(jnp.issubdtype(dtype, np.number) or jnp.issubdtype(dtype, np.bool_))
    except TypeError:
        return False


def _not_storable(name: str, leaf: Any, role: str) -> CheckpointError:
    if isinstance(leaf, (np.ndarray, np.generic)):
        what = f"a NumPy {'array' if isinstance(leaf, np.ndarray) else 'scalar'} of dtype {leaf.dtype}"
    elif isinstance(leaf, jax.ShapeDtypeStruct):
        what = f"a jax.ShapeDtypeStruct of dtype {leaf.dtype}"
    else:
        name_of = _type_name(leaf)
        what = f"{'an' if name_of[:1].lower() in 'aeiou' else 'a'} {name_of}"
    return CheckpointError(f"{role} {name or '(the whole tree)'} is {what}; {_EXPECTED}")


def _key_impl(leaf: Any) -> str:
    """The name of a typed PRNG key's implementation (e.g. threefry2x32), of an array or of its ShapeDtypeStruct."""
    impl = jax.random.key_impl(leaf if isinstance(leaf, jax.Array) else jnp.zeros((), leaf.dtype))
    return str(impl)


def _spec(name: str, leaf: Any, role: str = "template leaf") -> _Spec:
    """A leaf's shape, stored dtype and key implementation; a CheckpointError naming ``name`` for a leaf that is
    not an array, a number or a PRNG key. Reads shapes and dtypes only (a ShapeDtypeStruct is a template too)."""
    if is_typed_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return tuple(data.shape), np.dtype(data.dtype), _key_impl(leaf)
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        if not _is_number_dtype(leaf.dtype):
            raise _not_storable(name, leaf, role)
        return tuple(leaf.shape), np.dtype(leaf.dtype), None
    if isinstance(leaf, (bool, int, float, complex, np.ndarray, np.generic)):
        arr = np.asarray(leaf)
        if not _is_number_dtype(arr.dtype):
            if isinstance(leaf, int):
                raise CheckpointError(f"{role} {name} is an int too large for int64 ({str(leaf)[:20]}...)")
            raise _not_storable(name, leaf, role)
        return tuple(arr.shape), np.dtype(jax.dtypes.canonicalize_dtype(arr.dtype)), None
    raise _not_storable(name, leaf, role)


def _leaf_data(name: str, leaf: Any) -> tuple[Any, str | None]:
    """A leaf to save: a JAX array as it is (its sharding kept), a PRNG key as its key data, anything else as a
    NumPy array of the dtype JAX would hold it in; and the key's implementation."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise CheckpointError(f"leaf {name} is a jax.ShapeDtypeStruct, a shape without values: there is nothing to save")
    _, dtype, impl = _spec(name, leaf, role="leaf")
    if impl is not None:
        return jax.random.key_data(leaf), impl
    if isinstance(leaf, jax.Array):
        return leaf, None
    arr = np.asarray(leaf)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        data = arr.astype(dtype, copy=False)
    if data.dtype != arr.dtype and arr.dtype.kind in "iu" and not np.array_equal(data, arr):
        raise CheckpointError(f"leaf {name} holds {arr.dtype} values that {dtype} cannot (JAX's integers without "
                              "jax_enable_x64); enable x64 or store them as floats")
    if data.dtype != arr.dtype and arr.dtype.kind in "fc":
        # Narrowing rounds (JAX holds float64 as float32 without x64); it must not make a value inf, or 0 of one
        # that was not.
        parts = [(arr.real, data.real), (arr.imag, data.imag)] if arr.dtype.kind == "c" else [(arr, data)]
        lost = np.zeros(arr.shape, bool)
        for a, d in parts:  # (each part of a complex number: 1e-50 + 1j must not become 1j)
            lost |= (np.isfinite(a) & ~np.isfinite(d)) | ((a != 0) & (d == 0))
        if lost.any():
            at = tuple(int(i) for i in np.unravel_index(int(np.argmax(lost)), arr.shape))
            raise CheckpointError(f"leaf {name} holds {arr.dtype} values that {dtype} cannot: {arr[at].item()!r} at "
                                  f"{list(at)} would be stored as {data[at].item()!r} (JAX's floats without jax_enable_x64); "
                                  "enable x64 or rescale them")
    return data, None


def _describe(shape: tuple[int, ...], dtype: Any, impl: str | None) -> str:
    kind = f"{np.dtype(dtype)}{list(shape)}"
    return kind if impl is None else f"a {impl} PRNG key (key data {kind})"


def _template(like: Any) -> tuple[list[str], list[_Spec], Any]:
    """The template's leaf paths, their specs (every leaf checked) and its treedef."""
    flat, treedef = _flatten(like, "template")
    names = [jax.tree_util.keystr(p) for p, _ in flat]
    return names, [_spec(n, leaf) for n, (_, leaf) in zip(names, flat, strict=True)], treedef


def _match_paths(names: list[str], stored: list[dict]) -> None:
    """The stored leaves (header entries) must have the template's paths, in its order."""
    got = [e["path"] for e in stored]
    if names != got:
        missing = [p for p in names if p not in got]
        extra = [p for p in got if p not in names]
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(extra)}"] if extra else [])
        raise CheckpointError(
            f"checkpoint does not match the template: {', '.join(parts)}"
            if parts else "checkpoint leaves are in another order than the template's"
        )


def _match_specs(names: list[str], specs: list[_Spec], stored: list[dict]) -> None:
    """Each stored leaf (header entry) must have its template leaf's shape, dtype and key implementation."""
    bad = []
    for name, spec, entry in zip(names, specs, stored, strict=True):
        found = (tuple(entry["shape"]), _dtype(entry), entry.get("key_impl"))
        if found != spec:
            bad.append(f"{name}: stored {_describe(*found)}, expected {_describe(*spec)}")
    if bad:
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError("checkpoint does not match the template: " + "; ".join(bad[:3]) + more)


def _check_finite(named: list[tuple[str, Any]]) -> None:
    """A CheckpointError naming every floating leaf (NumPy or JAX array) that holds a NaN or an inf."""
    bad = []
    for name, arr in named:
        if not jnp.issubdtype(arr.dtype, jnp.inexact):
            continue
        # a JAX array is counted where it lies (sharded across processes too); a NumPy one on the host
        n = int(jnp.sum(~jnp.isfinite(arr)) if isinstance(arr, jax.Array) else np.count_nonzero(~np.isfinite(arr)))
        if n:
            bad.append(f"{name} has {n} of {arr.size} values NaN or inf")
    if bad:
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError("checkpoint holds non-finite values: " + "; ".join(bad[:3]) + more)


# --- The .npz format -----------------------------------------------------------------------------------------------


def _flatten(tree: Any, role: str) -> tuple[list, Any]:
    """The tree's leaves with their paths; a CheckpointError for a tree JAX cannot flatten (a dict whose keys
    cannot be sorted, as 1 and "a")."""
    try:
        return jax.tree_util.tree_flatten_with_path(tree)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the {role} cannot be flattened as a pytree ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}); a dict's keys "
                              "must be sortable together (all str, or all int)") from None


def to_bytes(tree: Any, meta: dict[str, Any] | None = None) -> bytes:
    """The tree's leaves and ``meta`` (JSON-able) as the bytes of an ``.npz`` file. A leaf that is not an array,
    a number or a PRNG key raises :class:`CheckpointError` naming its pytree path."""
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"meta must be a dict (stored as a JSON object); got {_type_name(meta)}")
    flat, _ = _flatten(tree, "tree")
    arrays: dict[str, np.ndarray] = {}
    leaves = []
    for i, (path, leaf) in enumerate(flat):
        entry: dict[str, Any] = {"path": jax.tree_util.keystr(path), "name": f"leaf{i}"}
        value, impl = _leaf_data(entry["path"], leaf)
        data = np.asarray(value)
        if impl is not None:
            entry["key_impl"] = impl
        entry["dtype"], entry["shape"] = str(data.dtype), list(data.shape)
        if data.dtype.kind not in "biufc":  # e.g. bfloat16: store the raw bytes, rebuild from the dtype's name
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # flat: (nbytes,)
        arrays[entry["name"]] = data
        leaves.append(entry)
    header = {"format": FORMAT, "leaves": leaves, "meta": meta or {}}
    try:
        text = json.dumps(header)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"meta must hold only JSON values (dicts, lists, strings, numbers, booleans, "
                              f"None): {e}") from None
    arrays[_META] = np.frombuffer(text.encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types the first keyword as allow_pickle
    return buf.getvalue()


# The kinds of dtype a leaf may have: numbers, and raw bytes of e.g. bfloat16 (kind "V"). Never objects.
_NUMERIC_KINDS = "biufcV"
# Room for a member's .npy header beside its data, and for the header member (names and shapes of the leaves).
_NPY_HEADER_ROOM = 64 * 1024
_MAX_HEADER_BYTES = 64 * 1024 * 1024


def _header_problem(header: Any, fmt: str = FORMAT) -> str | None:
    """What is wrong with a parsed header, or None: the file carries the structure it claims, so every field
    is checked before it is used."""
    if not isinstance(header, dict):
        return f"its header is a JSON {type(header).__name__}, not an object"
    if header.get("format") != fmt:
        return f"unknown checkpoint format {header.get('format')!r}; expected {fmt!r}"
    leaves = header.get("leaves")
    if not isinstance(leaves, list):
        return "its header lacks the list of leaves" if leaves is None else "its header's leaves are not a list"
    if not isinstance(header.get("meta", {}), dict):
        return "its header's meta is not an object"
    for i, e in enumerate(leaves):
        if not (isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("path", "name", "dtype"))):
            return f"header entry {i} is not a leaf (path, name, dtype, shape)"
        shape = e.get("shape")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            return f"leaf {e['path']}: its shape {shape!r} is not a list of sizes"
        if "key_impl" in e and not isinstance(e["key_impl"], str):
            return f"leaf {e['path']}: its key_impl is not a name"
    for field in ("path", "name"):
        seen: set[str] = set()
        for e in leaves:
            if e[field] in seen:
                return f"leaf {e['path']}: its {field} {e[field]!r} appears twice in the header"
            seen.add(e[field])
    return None


# Deflate expands at most about 1032:1: no member of an honest archive holds more than this many bytes per byte of it.
_MAX_EXPANSION = 1100
_UNREADABLE = (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile, NotImplementedError, MemoryError,
               OverflowError, RecursionError)


def _source(data: Any) -> BinaryIO:
    """``data`` as a seekable binary file; a TypeError naming the argument for anything else (a path above all:
    this module deals in bytes, and opening files is the caller's)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(data)
    expected = "data must be bytes or a seekable binary file object"
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        shown = repr(path) if len(path) <= 80 else repr(path[:77]) + "..."
        raise TypeError(f"{expected}; got {_type_name(data)} {shown}, a path: to read a file, pass it open, "
                        "open(path, 'rb'), or its bytes, open(path, 'rb').read()")
    if isinstance(data, io.TextIOBase):
        raise TypeError(f"{expected}; got a text-mode file ({_type_name(data)}): open it with mode 'rb'")
    if not (callable(getattr(data, "read", None)) and callable(getattr(data, "seek", None))):
        array = isinstance(data, (np.ndarray, jax.Array))
        what = ("None" if data is None else "a jax.Array" if isinstance(data, jax.Array)
                else "a NumPy array" if array else _type_name(data))
        raise TypeError(f"{expected}; got {what}" + (" (if it holds the file's bytes, pass data.tobytes())" if array else ""))
    if getattr(data, "closed", False):
        raise TypeError(f"{expected}; got a closed file ({_type_name(data)})")
    seekable = getattr(data, "seekable", None)
    if callable(seekable) and not seekable():
        raise TypeError(f"{expected}; got a file that cannot seek ({_type_name(data)}: a pipe, socket or stream): "
                        "read it into bytes first, data.read()")
    return data


def _open(data: bytes | BinaryIO) -> tuple[zipfile.ZipFile, dict, int]:
    """The archive, its parsed header, and the most bytes any of its members can honestly hold."""
    source = _source(data)
    total = source.seek(0, io.SEEK_END)
    if total == 0:
        raise CheckpointError("not a readable funcgrad checkpoint: the file is empty (0 bytes)")
    source.seek(0)
    try:
        z = zipfile.ZipFile(source)
        # Stored or deflated members only (what NumPy writes): deflate expands at most ~1000-fold, which bounds
        # every member by the file's size; bzip2 or lzma would let a few kilobytes declare gigabytes.
        odd = [i for i in z.infolist() if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)]
        if odd:
            raise ValueError(f"member {odd[0].filename!r} is compressed with method {odd[0].compress_type}; "
                             "checkpoints hold stored or deflated members")
        names = [i.filename for i in z.infolist()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # (zipfile reads the last of them: which one a reader takes is not the writer's to say)
            raise ValueError(f"member {twice[0]!r} appears {names.count(twice[0])} times; a checkpoint names each once")
        info = z.getinfo(_META + ".npy")
        if info.file_size > min(_MAX_HEADER_BYTES, _MAX_EXPANSION * total):
            raise ValueError(f"a header of {info.file_size} bytes in a file of {total}")
        with z.open(info) as f:  # what the header member declares, before anything is allocated for it
            shape, dtype = _npy_header(f)
        if dtype != np.uint8 or len(shape) != 1 or shape[0] > _MAX_HEADER_BYTES:
            raise ValueError(f"a header member of {dtype}{list(shape)}, not the bytes of a header")
        with z.open(info) as f:
            raw = np.lib.format.read_array(f, allow_pickle=False)
        header = json.loads(raw.tobytes())
    except KeyError:
        raise CheckpointError("not a readable funcgrad checkpoint: an archive without a funcgrad header") from None
    except _UNREADABLE as e:
        raise CheckpointError(f"not a readable funcgrad checkpoint ({type(e).__name__}: {e})") from None
    problem = _header_problem(header)
    if problem:
        raise CheckpointError(f"not a readable funcgrad checkpoint: {problem}")
    return z, header, _MAX_EXPANSION * total + _MAX_HEADER_BYTES


def metadata(data: bytes | BinaryIO) -> dict[str, Any]:
    """The ``meta`` dict stored with a checkpoint: its bytes, or a seekable binary file, of which only the
    archive's directory and header are read."""
    return _open(data)[1].get("meta", {})


def _dtype(entry: dict) -> np.dtype:
    try:
        dtype = np.dtype(jnp.dtype(entry["dtype"]))
    except (TypeError, ValueError):
        raise CheckpointError(f"checkpoint is damaged: leaf {entry['path']} has an unknown dtype {entry['dtype']!r}") from None
    if dtype.kind not in _NUMERIC_KINDS or not _is_number_dtype(dtype):
        raise CheckpointError(f"checkpoint is damaged: leaf {entry['path']} has dtype {entry['dtype']!r}, not a number type")
    return dtype


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an ``.npy`` stream declares (read before its data, so nothing is allocated for it)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"an .npy of version {version[0]}.{version[1]}")
    if fortran and len(shape) > 1:  # (funcgrad writes C order: the same bytes in Fortran order are another array)
        raise ValueError("an .npy in Fortran order, which funcgrad never writes")
    return tuple(shape), np.dtype(dtype)


def _read_leaf(z: zipfile.ZipFile, entry: dict, bound: int) -> np.ndarray:
    """One leaf's array, its declared size checked before a byte is decompressed (``bound``: the most an honest
    member of this archive can hold), never unpickled."""
    path, shape, dtype = entry["path"], tuple(entry["shape"]), _dtype(entry)
    nbytes = math.prod(shape) * dtype.itemsize  # (Python ints: a declared size never overflows)
    if nbytes > bound:
        raise CheckpointError(f"checkpoint is damaged: leaf {path} declares {entry['dtype']}{list(shape)}, {nbytes} "
                              "bytes, more than this file can hold")
    try:
        info = z.getinfo(entry["name"] + ".npy")
    except KeyError:
        raise CheckpointError(f"checkpoint is damaged: no array for {path}") from None
    if info.file_size > nbytes + _NPY_HEADER_ROOM:
        raise CheckpointError(f"checkpoint is damaged: leaf {path} holds {info.file_size} bytes; "
                              f"{entry['dtype']}{list(shape)} needs {nbytes}")
    raw = dtype.kind not in "biufc"  # raw bytes of a dtype NumPy cannot store (e.g. bfloat16)
    try:
        with z.open(info) as f:
            npy_shape, npy_dtype = _npy_header(f)
        if npy_dtype.hasobject:  # NumPy's words for it (nothing is unpickled)
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        # (raw bytes: written flat; files written before that keep the leaf's leading dimensions, same bytes)
        if raw and npy_dtype == np.uint8 and math.prod(npy_shape) != nbytes:
            raise CheckpointError(f"checkpoint is damaged: leaf {path} holds {math.prod(npy_shape)} bytes; "
                                  f"{entry['dtype']}{list(shape)} needs {nbytes}")
        if (npy_dtype, npy_shape) != ((np.dtype(np.uint8), npy_shape) if raw else (dtype, shape)):
            raise CheckpointError(f"checkpoint is damaged: leaf {path} is {npy_dtype}{list(npy_shape)}; its header says "
                                  f"{entry['dtype']}{list(shape)}")
        with z.open(info) as f:
            arr = np.lib.format.read_array(f, allow_pickle=False)
    except _UNREADABLE as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint is damaged: leaf {path} cannot be read ({type(e).__name__}: {e})") from None
    return arr.reshape(-1).view(dtype).reshape(shape) if raw else arr


def _few(names: list[str]) -> str:
    return str(names[:4])[:-1] + f", and {len(names) - 4} more]" if len(names) > 4 else str(names)


def size_bound(like: Any) -> int:
    """The most bytes a checkpoint of trees shaped like ``like`` can take (a file is read only below it): the
    leaves' bytes, room for each one's headers and the metadata; computed from shapes, nothing is copied."""
    _, specs, _ = _template(like)
    data = sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype, _ in specs)
    return data + 4096 * (len(specs) + 1) + 1024 * 1024


def from_bytes(data: bytes | BinaryIO, like: Any, *, check_finite: bool = False) -> Any:
    """The tree stored in ``data`` (bytes, or a seekable binary file), with the structure of ``like`` (a template
    such as a freshly initialised train state; its leaves may be ``jax.ShapeDtypeStruct``). Every leaf's path,
    shape and dtype must match the template's. A damaged or foreign file raises :class:`CheckpointError` naming
    the leaf; nothing in the file is executed (no pickle). With ``check_finite``, a NaN or inf in a floating leaf
    is a CheckpointError naming it too (off by default: the tree comes back as it was saved)."""
    z, header, bound = _open(data)
    names, specs, treedef = _template(like)
    stored = header["leaves"]
    _match_paths(names, stored)
    _match_specs(names, specs, stored)  # (from the header alone: nothing of a file for another model is read)
    # each as its header says (else damaged), its declared size bounded by the file's before anything is allocated
    arrays = [_read_leaf(z, entry, bound) for entry in stored]
    if check_finite:
        _check_finite([(n, a) for n, a, (_, _, impl) in zip(names, arrays, specs, strict=True) if impl is None])
    out = [jnp.asarray(a) if impl is None else jax.random.wrap_key_data(jnp.asarray(a), impl=impl)
           for a, (_, _, impl) in zip(arrays, specs, strict=True)]
    # A 64-bit leaf restored while JAX's 64-bit types are off would become 32-bit: rounded, or wrapped.
    narrowed = [n for n, a, o, (_, _, impl) in zip(names, arrays, out, specs, strict=True)
                if impl is None and o.dtype != a.dtype]
    if narrowed:
        a = arrays[names.index(narrowed[0])]
        raise CheckpointError(f"leaf {narrowed[0]} is {a.dtype}, but JAX's 64-bit types are off here (jax_enable_x64), "
                              f"so it would become {jnp.asarray(a).dtype}: restore it inside `with "
                              "jax.enable_x64(True):`, or read it with load_flat (NumPy arrays)"
                              + (f"; also {_few(narrowed[1:])}" if len(narrowed) > 1 else ""))
    return jax.tree_util.tree_unflatten(treedef, out)


def load_flat(data: bytes | BinaryIO, *, check_finite: bool = False) -> dict[str, np.ndarray]:
    """Every array in a checkpoint (bytes, or a seekable binary file) without a template: ``{pytree path: array}``
    in the order they were saved, paths as ``jax.tree_util.keystr`` writes them. A PRNG key comes back as its key
    data (uint32; ``jax.random.wrap_key_data`` makes it a key of the default implementation again). Read with the
    checks of :func:`from_bytes` (header, sizes, dtypes, never unpickled), ``check_finite`` included.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from funcgrad import checkpoint
        >>> data = checkpoint.to_bytes({"w": jnp.arange(3.0), "opt": [jnp.int32(4)], "key": jax.random.key(0)})
        >>> {path: (a.dtype.name, a.shape) for path, a in checkpoint.load_flat(data).items()}
        {"['key']": ('uint32', (2,)), "['opt'][0]": ('int32', ()), "['w']": ('float32', (3,))}
    """
    z, header, bound = _open(data)
    flat = {entry["path"]: _read_leaf(z, entry, bound) for entry in header["leaves"]}
    if check_finite:
        _check_finite(list(flat.items()))
    return flat


def orbax_manager(directory: str | Path, *, max_to_keep: int | None = 3, async_save: bool = True) -> OrbaxManager:
    """A directory of checkpoints by step, written with orbax-checkpoint (``pip install "funcgrad[orbax]"``).

    The manager's ``save(step, tree, meta)`` writes a tree (sharded JAX arrays from every process, PRNG keys,
    numbers) and a JSON-able ``meta`` dict, in the background when ``async_save`` (``wait()`` blocks until it is
    on disk); the newest ``max_to_keep`` steps are kept (None: all). ``restore(like, step=None,
    check_finite=False)`` returns ``(tree, meta)`` with the checks of :func:`from_bytes` (paths, shapes, dtypes,
    by pytree path), its arrays placed with the template's shardings. ``latest_step()``, ``all_steps()`` and
    ``close()`` (or ``with``) complete it. Raises ImportError if orbax-checkpoint is not installed."""
    from funcgrad._orbax import OrbaxManager  # noqa: PLC0415  # orbax only when asked for: `import funcgrad` stays light

    return OrbaxManager(directory, max_to_keep=max_to_keep, async_save=async_save)
