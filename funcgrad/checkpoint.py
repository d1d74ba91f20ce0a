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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad._checks import is_typed_key

__all__ = ["FORMAT", "CheckpointError", "to_bytes", "from_bytes", "metadata"]

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
        entry = {"path": jax.tree_util.keystr(path), "name": f"leaf{i}"}
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
    np.savez(buf, **arrays)
    return buf.getvalue()


def _open(data: bytes) -> tuple[Any, dict]:
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        header = json.loads(z[_META].tobytes())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise CheckpointError(f"not a readable funcgrad checkpoint ({type(e).__name__}: {e})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"unknown checkpoint format {header.get('format')!r}; expected {FORMAT!r}")
    return z, header


def metadata(data: bytes) -> dict[str, Any]:
    """The ``meta`` dict stored with a checkpoint."""
    return _open(data)[1]["meta"]


def from_bytes(data: bytes, like: Any) -> Any:
    """The tree stored in ``data``, with the structure of ``like`` (a template such as a freshly initialised
    train state). Every leaf's path, shape and dtype must match the template's."""
    z, header = _open(data)
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    stored = header["leaves"]
    want = [jax.tree_util.keystr(p) for p, _ in flat]
    got = [e["path"] for e in stored]
    if want != got:
        missing = [p for p in want if p not in got]
        extra = [p for p in got if p not in want]
        raise CheckpointError(
            f"checkpoint does not match the template: missing {missing}, unexpected {extra}"
            if missing or extra else "checkpoint leaves are in another order than the template's"
        )
    out, bad = [], []
    for (path, ref), entry in zip(flat, stored):
        name = jax.tree_util.keystr(path)
        try:
            arr = z[entry["name"]]
        except KeyError:
            raise CheckpointError(f"checkpoint is damaged: no array for {name}") from None
        dtype = np.dtype(jnp.dtype(entry["dtype"]))
        if arr.dtype == np.uint8 and dtype != np.uint8:
            arr = arr.view(dtype).reshape(entry["shape"])
        if is_typed_key(ref):
            ref_data = jax.random.key_data(ref)
            if arr.shape != ref_data.shape or entry.get("key_impl") != str(jax.random.key_impl(ref)):
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
        raise CheckpointError("checkpoint does not match the template:\n  " + "\n  ".join(bad))
    return jax.tree_util.tree_unflatten(treedef, out)
