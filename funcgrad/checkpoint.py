"""Checkpoints as bytes: any pytree of arrays (PRNG keys included) in NumPy's ``.npz`` format.

Loading never executes code: arrays are read with ``allow_pickle=False`` and the tree's structure comes from
a template (``like``), not from the file. The file carries each leaf's pytree path, dtype and shape, so a
mismatch is reported by path. Writing the bytes to disk atomically is the CLI's job (``funcgrad train``).

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
import zipfile
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad._checks import is_typed_key

__all__ = ["FORMAT", "CheckpointError", "to_bytes", "from_bytes", "metadata", "size_bound"]

FORMAT = "funcgrad-checkpoint-1"
_META = "__funcgrad__"


class CheckpointError(ValueError):
    """The checkpoint is not a funcgrad checkpoint, is damaged, or does not match the template."""


def to_bytes(tree: Any, meta: dict[str, Any] | None = None) -> bytes:
    """The tree's leaves and ``meta`` (JSON-able) as the bytes of an ``.npz`` file."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    arrays: dict[str, np.ndarray] = {}
    leaves = []
    for i, (path, leaf) in enumerate(flat):
        entry: dict[str, Any] = {"path": jax.tree_util.keystr(path), "name": f"leaf{i}"}
        if is_typed_key(leaf):
            data = np.asarray(jax.random.key_data(leaf))
            entry["key_impl"] = str(jax.random.key_impl(leaf))
        else:
            data = np.asarray(leaf)
        entry["dtype"], entry["shape"] = str(data.dtype), list(data.shape)
        if data.dtype.kind not in "biufc":  # e.g. bfloat16: store the raw bytes, rebuild from the dtype's name
            data = np.ascontiguousarray(data).view(np.uint8)
        arrays[entry["name"]] = data
        leaves.append(entry)
    header = {"format": FORMAT, "leaves": leaves, "meta": meta or {}}
    arrays[_META] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types the first keyword as allow_pickle
    return buf.getvalue()


# The kinds of dtype a leaf may have: numbers, and raw bytes of e.g. bfloat16 (kind "V"). Never objects.
_NUMERIC_KINDS = "biufcV"
# Room for a member's .npy header beside its data, and for the header member (names and shapes of the leaves).
_NPY_HEADER_ROOM = 64 * 1024
_MAX_HEADER_BYTES = 64 * 1024 * 1024


def _header_problem(header: Any) -> str | None:
    """What is wrong with a parsed header, or None: the file carries the structure it claims, so every field
    is checked before it is used."""
    if not isinstance(header, dict):
        return f"its header is a JSON {type(header).__name__}, not an object"
    if header.get("format") != FORMAT:
        return f"unknown checkpoint format {header.get('format')!r}; expected {FORMAT!r}"
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
    return None


def _open(data: bytes | BinaryIO) -> tuple[zipfile.ZipFile, dict]:
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if source.seek(0, io.SEEK_END) == 0:
        raise CheckpointError("not a readable funcgrad checkpoint: the file is empty (0 bytes)")
    source.seek(0)
    try:
        z = zipfile.ZipFile(source)
        info = z.getinfo(_META + ".npy")
        if info.file_size > _MAX_HEADER_BYTES:
            raise ValueError(f"a header of {info.file_size} bytes")
        with z.open(info) as f:
            raw = np.lib.format.read_array(f, allow_pickle=False)
        header = json.loads(raw.tobytes())
    except KeyError:
        raise CheckpointError("not a readable funcgrad checkpoint: an archive without a funcgrad header") from None
    except (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile, NotImplementedError) as e:
        raise CheckpointError(f"not a readable funcgrad checkpoint ({type(e).__name__}: {e})") from None
    problem = _header_problem(header)
    if problem:
        raise CheckpointError(f"not a readable funcgrad checkpoint: {problem}")
    return z, header


def metadata(data: bytes | BinaryIO) -> dict[str, Any]:
    """The ``meta`` dict stored with a checkpoint: its bytes, or a seekable binary file, of which only the
    archive's directory and header are read."""
    return _open(data)[1].get("meta", {})


def _dtype(entry: dict) -> np.dtype:
    try:
        dtype = np.dtype(jnp.dtype(entry["dtype"]))
    except (TypeError, ValueError):
        raise CheckpointError(f"checkpoint is damaged: leaf {entry['path']} has an unknown dtype {entry['dtype']!r}") from None
    if dtype.kind not in _NUMERIC_KINDS:
        raise CheckpointError(f"checkpoint is damaged: leaf {entry['path']} has dtype {entry['dtype']!r}, not a number type")
    return dtype


def _read_leaf(z: zipfile.ZipFile, entry: dict) -> np.ndarray:
    """One leaf's array, its declared size checked before a byte is decompressed, never unpickled."""
    path, shape, dtype = entry["path"], tuple(entry["shape"]), _dtype(entry)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    try:
        info = z.getinfo(entry["name"] + ".npy")
    except KeyError:
        raise CheckpointError(f"checkpoint is damaged: no array for {path}") from None
    if info.file_size > nbytes + _NPY_HEADER_ROOM:
        raise CheckpointError(f"checkpoint is damaged: leaf {path} holds {info.file_size} bytes; "
                              f"{entry['dtype']}{list(shape)} needs {nbytes}")
    try:
        with z.open(info) as f:
            arr = np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile, NotImplementedError) as e:
        raise CheckpointError(f"checkpoint is damaged: leaf {path} cannot be read ({type(e).__name__}: {e})") from None
    if arr.dtype == np.uint8 and dtype != np.uint8:  # raw bytes of a dtype NumPy cannot store (e.g. bfloat16)
        if arr.size != nbytes:
            raise CheckpointError(f"checkpoint is damaged: leaf {path} holds {arr.size} bytes; "
                                  f"{entry['dtype']}{list(shape)} needs {nbytes}")
        return arr.view(dtype).reshape(shape)
    if arr.dtype != dtype or arr.shape != shape:
        raise CheckpointError(f"checkpoint is damaged: leaf {path} is {arr.dtype}{list(arr.shape)}; its header says "
                              f"{entry['dtype']}{list(shape)}")
    return arr


def _few(names: list[str]) -> str:
    return str(names[:4])[:-1] + f", and {len(names) - 4} more]" if len(names) > 4 else str(names)


def size_bound(like: Any) -> int:
    """The most bytes a checkpoint of trees shaped like ``like`` can take (a file is read only below it): the
    leaves' bytes, room for each one's headers and the metadata; computed from shapes, nothing is copied."""
    leaves = jax.tree.leaves(like)
    data = 0
    for leaf in leaves:
        shaped = jax.eval_shape(jax.random.key_data, leaf) if is_typed_key(leaf) else leaf
        data += int(np.prod(np.shape(shaped), dtype=np.int64)) * np.dtype(jnp.result_type(shaped)).itemsize
    return data + 4096 * (len(leaves) + 1) + 1024 * 1024


def from_bytes(data: bytes, like: Any) -> Any:
    """The tree stored in ``data``, with the structure of ``like`` (a template such as a freshly initialised
    train state). Every leaf's path, shape and dtype must match the template's. A damaged or foreign file
    raises :class:`CheckpointError` naming the leaf; nothing in the file is executed (no pickle)."""
    z, header = _open(data)
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    stored = header["leaves"]
    want = [jax.tree_util.keystr(p) for p, _ in flat]
    got = [e["path"] for e in stored]
    if want != got:
        missing = [p for p in want if p not in got]
        extra = [p for p in got if p not in want]
        raise CheckpointError(
            f"checkpoint does not match the template: missing {_few(missing)}, unexpected {_few(extra)}"
            if missing or extra else "checkpoint leaves are in another order than the template's"
        )
    out, bad = [], []
    for (path, ref), entry in zip(flat, stored, strict=True):
        name = jax.tree_util.keystr(path)
        arr = _read_leaf(z, entry)
        if is_typed_key(ref):
            ref_data = jax.random.key_data(ref)
            impl = str(jax.random.key_impl(ref))
            if arr.shape != ref_data.shape or arr.dtype != ref_data.dtype or entry.get("key_impl") != impl:
                bad.append(f"{name}: a PRNG key of another kind ({entry.get('key_impl')}, {list(arr.shape)})")
                continue
            out.append(jax.random.wrap_key_data(jnp.asarray(arr), impl=jax.random.key_impl(ref)))
            continue
        ref_shape, ref_dtype = tuple(jnp.shape(ref)), jnp.result_type(ref)
        if tuple(arr.shape) != ref_shape or arr.dtype != ref_dtype:
            bad.append(f"{name}: stored {arr.dtype}{list(arr.shape)}, expected {ref_dtype}{list(ref_shape)}")
            continue
        out.append(jnp.asarray(arr))
    if bad:
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError("checkpoint does not match the template: " + "; ".join(bad[:3]) + more)
    return jax.tree_util.tree_unflatten(treedef, out)
