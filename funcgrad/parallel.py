"""Data parallelism on JAX's own SPMD engine: a ``data`` mesh axis, ``NamedSharding`` and ``jax.jit``.

The batch is split along its first (sample) axis over the devices of a one-dimensional mesh; parameters and
optimizer state are replicated. The program is the single-device program: XLA partitions it and inserts the
all-reduce of the gradient, so the loss is the mean over the *global* batch and training follows the same
trajectory as on one device (up to the order of floating-point additions).

Several processes (hosts) join with :func:`initialize` (``jax.distributed``); each process then feeds its
own contiguous slice of the full-batch data (``jax.make_array_from_process_local_data``). With a minibatch
size, every process holds the data set and each step's minibatch, drawn from the global permutation, is
constrained to the batch sharding, so the devices still split the work.

Policy when the batch does not divide over the devices: ``mode="data"`` is an error naming the sizes;
``mode="auto"`` uses the largest number of devices that divides the batch (all of them when it divides,
one device when only one device is visible).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from funcgrad._checks import is_typed_key, to_host

__all__ = ["ParallelError", "initialize", "data_mesh", "setup_for", "place", "gather", "is_writer", "describe_mesh",
           "any_process"]

AXIS = "data"


class ParallelError(ValueError):
    """A parallel setting that cannot work with these devices or this batch."""


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Joins a multi-process run with ``jax.distributed.initialize`` when one is configured, by arguments or
    by the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
    Must run before any other JAX computation. Returns True when it joined one."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    env_n, env_id = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    try:
        num_processes = num_processes if num_processes is not None else (int(env_n) if env_n else None)
        process_id = process_id if process_id is not None else (int(env_id) if env_id else None)
    except ValueError:
        raise ParallelError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers; got {env_n!r} / {env_id!r}") from None
    if coordinator is None and num_processes is None and process_id is None:
        return False
    missing = [n for n, v in (("coordinator address", coordinator), ("number of processes", num_processes),
                              ("process id", process_id)) if v is None]
    if missing:
        raise ParallelError(f"a multi-process run needs the coordinator address, the number of processes and this "
                            f"process's id; missing: {', '.join(missing)}")
    assert num_processes is not None and process_id is not None  # none is missing
    if not 0 <= process_id < num_processes:
        raise ParallelError(f"process id must lie in [0, {num_processes}); got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def data_mesh(devices: int | None = None) -> Mesh:
    """A one-axis mesh named ``data`` over the first ``devices`` devices (default: all, across processes)."""
    all_devices = jax.devices()
    n = len(all_devices) if devices is None else devices
    if not 1 <= n <= len(all_devices):
        raise ParallelError(f"asked for {n} devices; {len(all_devices)} are visible")
    if jax.process_count() > 1 and n != len(all_devices):
        raise ParallelError(f"a multi-process run uses all {len(all_devices)} devices; {n} do not divide the batch")
    return Mesh(np.array(all_devices[:n]), (AXIS,))


def setup_for(mode: str, data: Any, batch_size: int | None) -> Mesh | None:
    """The mesh for a run: None for one device."""
    n_dev = len(jax.devices())
    batch = batch_size if batch_size is not None else jax.tree.leaves(data)[0].shape[0]
    if mode == "none" or (mode == "auto" and n_dev == 1):
        if jax.process_count() > 1:
            raise ParallelError("a multi-process run needs parallel.mode = 'data' or 'auto'")
        return None
    if mode == "data":
        if batch % n_dev:
            raise ParallelError(f"a batch of {batch} samples does not divide over {n_dev} devices; choose a batch size "
                                f"divisible by {n_dev}, or parallel.mode = 'auto' (largest dividing device count)")
        return data_mesh(n_dev)
    if mode != "auto":
        raise ParallelError(f"parallel mode must be 'auto', 'none' or 'data'; got {mode!r}")
    n = max(d for d in range(1, n_dev + 1) if batch % d == 0)
    return data_mesh(n) if n > 1 or jax.process_count() > 1 else None


def place(mesh: Mesh | None, state: Any, data: Any) -> tuple[Any, Any, Any]:
    """Puts the train state (replicated) and the data (split over ``data``, or replicated when minibatches
    are drawn from it) on the mesh; returns them and the per-step batch constraint for
    :func:`funcgrad.train.make_step`'s ``shard_batch``."""
    if mesh is None:
        return state, data, None
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec(AXIS))
    state = jax.tree.map(lambda a: _global(a, replicated), state)
    data = jax.tree.map(lambda a: _global(a, split, process_local=True), data)

    def shard_batch(batch):
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, split), batch)

    return state, data, shard_batch


def _global(a: Any, sharding: NamedSharding, process_local: bool = False) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    a = np.asarray(jax.device_get(a)) if not is_typed_key(a) else a
    if is_typed_key(a):
        return jax.random.wrap_key_data(_global(jax.random.key_data(a), sharding), impl=jax.random.key_impl(a))
    if process_local and sharding.spec != PartitionSpec():
        n, p, i = a.shape[0], jax.process_count(), jax.process_index()
        if n % p:
            raise ParallelError(f"{n} samples do not divide over {p} processes")
        local = a[i * n // p : (i + 1) * n // p]  # this process feeds its own slice
        return jax.make_array_from_process_local_data(sharding, local, a.shape)
    return jax.make_array_from_process_local_data(sharding, a, a.shape)


def gather(tree: Any) -> Any:
    """The tree with every array held whole by this process (e.g. to checkpoint it): replicated arrays give
    their local copy, split ones are gathered from every process."""
    def fetch(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return a
        if is_typed_key(a):
            return jax.random.wrap_key_data(jnp.asarray(to_host(jax.random.key_data(a))), impl=jax.random.key_impl(a))
        return jnp.asarray(to_host(a))

    return jax.tree.map(fetch, tree)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any of them (a collective: every process must call it).
    How the processes of a run agree to stop together when one of them (process 0, which alone reads and
    writes the run folder) cannot go on; with one process, ``flag`` itself."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # noqa: PLC0415 - only multi-process runs need it

    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def is_writer() -> bool:
    """Only process 0 writes checkpoints, metrics and plots."""
    return jax.process_index() == 0


def describe_mesh(mesh: Mesh | None) -> str:
    platform = jax.devices()[0].platform
    if mesh is None:
        return f"1 device ({platform})"
    procs = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"data parallel over {mesh.devices.size} devices{procs} ({platform})"
