"""Checkpoints written with orbax-checkpoint: a directory of steps, sharded arrays saved and restored by every process,
saves in the background. Optional (``pip install "funcgrad[orbax]"``); made by :func:`funcgrad.checkpoint.orbax_manager`,
and never imported by ``import funcgrad`` (orbax itself is imported when a manager is made).

A step's directory holds three orbax items: ``state``, the tree's leaves as a flat dict ``{"leaf0": array, ...}``
(a PRNG key as its key data); ``layout``, JSON naming each leaf's pytree path, dtype, shape and key implementation
(the header of :mod:`funcgrad.checkpoint`'s ``.npz`` files); and ``meta``, the caller's JSON dict. A restore checks
the layout against the template by path and orbax's own metadata of every array against the layout before reading
any data, since orbax would otherwise cast a dtype to the requested one.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from funcgrad import checkpoint as _ckpt
from funcgrad._checks import is_typed_key

__all__ = ["LAYOUT_FORMAT", "OrbaxManager"]

LAYOUT_FORMAT = "funcgrad-orbax-1"


def _import_orbax() -> Any:
    """``orbax.checkpoint``, imported when a manager is made (so this module imports, and its docs build, without it)."""
    try:
        import orbax.checkpoint as ocp  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(f'funcgrad.checkpoint.orbax_manager needs orbax-checkpoint ({e}); install it with: '
                          'pip install "funcgrad[orbax]"') from e
    return ocp


def _brief(e: BaseException, where: str) -> str:
    """orbax's or tensorstore's error in one line: its first, without the tensorstore spec (kilobytes of JSON) or
    the step's folder that the message names already, and at most 300 characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" [tensorstore_spec=", 1)[0].replace(f"{where}: ", "")
    return text if len(text) <= 300 else text[:297] + "..."


def _sharding(ref: Any) -> jax.sharding.Sharding:
    """Where a restored leaf goes: the template's sharding (a PRNG key's: its key data's), else the default device,
    where :func:`funcgrad.checkpoint.from_bytes` puts it."""
    if is_typed_key(ref) and isinstance(ref, jax.Array):
        return jax.random.key_data(ref).sharding
    sharding = getattr(ref, "sharding", None)
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


class OrbaxManager:
    """Saves and restores pytrees (train states: arrays, numbers, PRNG keys) by step in ``directory`` with an orbax
    ``CheckpointManager``; see :func:`funcgrad.checkpoint.orbax_manager`. Every process of a multi-process run makes
    one and calls ``save``/``restore`` with the same steps (orbax coordinates the writes)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, async_save: bool = True) -> None:
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None (keep every step), not {max_to_keep!r}")
        self._ocp = ocp = _import_orbax()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "layout": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._failed = False  # a read failed (see _read)

    def __repr__(self) -> str:
        return f"OrbaxManager({str(self.directory)!r}, steps={self.all_steps()})"

    def __enter__(self) -> OrbaxManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(self, step: int, tree: Any, meta: dict[str, Any] | None = None) -> bool:
        """Writes ``tree`` and ``meta`` (a JSON-able dict) as ``step``; in the background if the manager saves
        asynchronously (the arrays are copied first: the caller may update or donate them at once). A leaf that is
        not an array, a number or a PRNG key raises :class:`~funcgrad.checkpoint.CheckpointError` naming its path.
        Steps are saved in increasing order: a step not after the latest one is a CheckpointError (orbax would skip
        it silently). Returns whether orbax saved the step."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, not {step!r}")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise _ckpt.CheckpointError(f"{self.directory}: cannot save step {step}: steps are saved in increasing order and "
                                        f"it has step {latest} (delete the later steps, or save in another directory)")
        meta = dict(meta or {})
        json.dumps(meta)  # a TypeError now, not in the background thread
        arrays: dict[str, Any] = {}
        leaves = []
        for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
            entry: dict[str, Any] = {"path": jax.tree_util.keystr(path), "name": f"leaf{i}"}
            data, impl = _ckpt._leaf_data(entry["path"], leaf)
            if impl is not None:
                entry["key_impl"] = impl
            entry["dtype"], entry["shape"] = str(np.dtype(data.dtype)), list(data.shape)
            arrays[entry["name"]] = data
            leaves.append(entry)
        layout = {"format": LAYOUT_FORMAT, "leaves": leaves}
        ocp = self._ocp
        items = {"layout": ocp.args.JsonSave(layout), "meta": ocp.args.JsonSave(meta)}
        if arrays:  # orbax refuses an empty item
            items["state"] = ocp.args.StandardSave(arrays)
        args = ocp.args.Composite(**items)
        return bool(self._manager.save(step, args=args))

    def _where(self, step: int) -> str:
        return f"{self.directory / str(step)}"

    def _read(self, step: int, what: str, read: Any) -> Any:
        """orbax's answer, or a CheckpointError naming the step's directory (orbax raises many kinds of error)."""
        try:
            return read()
        except Exception as e:  # noqa: BLE001 - re-raised below, outside this block
            problem = f"{type(e).__name__}: {_brief(e, self._where(step))}"
        # Raised without orbax's exception attached, and its failed futures collected now: kept alive until the
        # interpreter exits, their callbacks printed tracebacks into a closed event loop after the error.
        self._failed = True
        raise _ckpt.CheckpointError(f"{self._where(step)}: not a readable funcgrad orbax checkpoint: its {what} cannot "
                                    f"be read ({problem})")

    def restore(self, like: Any, step: int | None = None, *, check_finite: bool = False) -> tuple[Any, dict[str, Any]]:
        """The tree saved at ``step`` (the latest if None) with the structure of ``like``, and its meta dict. As
        :func:`funcgrad.checkpoint.from_bytes`: every leaf's path, shape and dtype must match the template's (a
        :class:`~funcgrad.checkpoint.CheckpointError` names the leaves that do not), and with ``check_finite`` a NaN
        or inf in a floating leaf is an error naming it. A leaf is placed with the template leaf's sharding (a
        ``jax.Array`` or a ``jax.ShapeDtypeStruct`` with one), else on the default device."""
        self.wait()  # a save still in flight is part of the directory
        if step is None:
            step = self.latest_step()
            if step is None:
                raise _ckpt.CheckpointError(f"{self.directory}: no checkpoint (no step saved)")
        elif step not in self.all_steps():
            raise _ckpt.CheckpointError(f"{self.directory}: no checkpoint of step {step}; it has steps {self.all_steps()}")
        names, specs, treedef = _ckpt._template(like)
        ocp = self._ocp
        restored = self._read(step, "layout", lambda: self._manager.restore(step, args=ocp.args.Composite(
            layout=ocp.args.JsonRestore())))
        layout = restored["layout"]
        problem = _ckpt._header_problem(layout, LAYOUT_FORMAT)
        if problem:
            raise _ckpt.CheckpointError(f"{self._where(step)}: not a readable funcgrad orbax checkpoint: {problem}")
        stored = layout["leaves"]
        try:
            _ckpt._match_paths(names, stored)
            self._match_arrays(step, stored)
            _ckpt._match_specs(names, specs, stored)
        except _ckpt.CheckpointError as e:
            where = self._where(step)
            raise _ckpt.CheckpointError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        refs = jax.tree_util.tree_leaves(like)
        abstract = {e["name"]: jax.ShapeDtypeStruct(tuple(e["shape"]), _ckpt._dtype(e), sharding=_sharding(ref))
                    for e, ref in zip(stored, refs, strict=True)}
        items = {"meta": ocp.args.JsonRestore()}
        if abstract:
            items["state"] = ocp.args.StandardRestore(abstract)
        restored = self._read(step, "arrays", lambda: self._manager.restore(step, args=ocp.args.Composite(**items)))
        meta = restored["meta"]
        if not isinstance(meta, dict):
            raise _ckpt.CheckpointError(f"{self._where(step)}: its meta is a JSON {type(meta).__name__}, not an object")
        arrays = [restored["state"][e["name"]] for e in stored] if abstract else []
        if check_finite:
            try:
                _ckpt._check_finite([(n, a) for n, a, (_, _, impl) in zip(names, arrays, specs, strict=True) if impl is None])
            except _ckpt.CheckpointError as e:
                raise _ckpt.CheckpointError(f"{self._where(step)}: {e}") from None
        out = [a if impl is None else jax.random.wrap_key_data(a, impl=impl)
               for a, (_, _, impl) in zip(arrays, specs, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, out), meta

    def _match_arrays(self, step: int, stored: list[dict]) -> None:
        """orbax's metadata of each array must be what the layout says (orbax would cast or refuse otherwise)."""
        if not stored:
            return
        metadata = self._read(step, "array metadata", lambda: self._manager.item_metadata(step)["state"])
        tree = getattr(metadata, "tree", metadata)
        for entry in stored:
            found = tree.get(entry["name"]) if hasattr(tree, "get") else None
            if found is None:
                raise _ckpt.CheckpointError(f"checkpoint is damaged: no array for {entry['path']}")
            shape, dtype = tuple(found.shape), np.dtype(found.dtype)
            if (shape, dtype) != (tuple(entry["shape"]), _ckpt._dtype(entry)):
                raise _ckpt.CheckpointError(f"checkpoint is damaged: leaf {entry['path']} is {dtype}{list(shape)}; its layout "
                                            f"says {entry['dtype']}{entry['shape']}")

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until every save started is on disk (and steps beyond ``max_to_keep`` are deleted)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the saves in flight and releases orbax's resources."""
        self._manager.close()
        if self._failed:
            gc.collect()  # what a failed read left (see _read)
