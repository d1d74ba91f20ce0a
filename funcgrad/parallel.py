"""Data parallelism on JAX's own SPMD engine: a ``data`` mesh axis, ``NamedSharding`` and ``jax.jit``.

The batch is split along its first (sample) axis over the devices of a one-dimensional mesh; parameters and
optimizer state are replicated. The program is the single-device program: XLA partitions it and inserts the
all-reduce of the gradient, so the loss is the mean over the *global* batch and training follows the same
trajectory as on one device (up to the order of floating-point additions).

Several processes (hosts) join with :func:`initialize` (``jax.distributed``), configured explicitly or detected
from the launcher (``srun``, ``mpirun``: see :func:`cluster_environment`); each process then feeds its
own contiguous slice of the full-batch data (``jax.make_array_from_process_local_data``). With a minibatch
size, every process holds the data set and each step's minibatch, drawn from the global permutation, is
constrained to the batch sharding, so the devices still split the work.

Policy when the batch does not divide over the devices: ``mode="data"`` is an error naming the sizes;
``mode="auto"`` uses the largest number of devices that divides the batch (all of them when it divides,
one device when only one device is visible).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from funcgrad._checks import is_typed_key, to_host

__all__ = ["ParallelError", "initialize", "cluster_environment", "data_mesh", "setup_for", "place", "gather", "is_writer",
           "describe_mesh", "any_process"]

AXIS = "data"


class ParallelError(ValueError):
    """A parallel setting that cannot work with these devices or this batch."""


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool | None = None) -> bool:
    """Joins a multi-process run (``jax.distributed.initialize``) when one is configured or detected; returns
    True when this process is part of one. Must run before any other JAX computation.

    Configured: by the arguments, or by the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (all three are needed, and they take precedence).

    Detected, when nothing is configured: a launcher that started several processes at once, found from its
    environment variables the way JAX's own cluster detection finds it (see :func:`cluster_environment`).
    This process then calls ``jax.distributed.initialize()`` without arguments, so JAX itself derives the
    coordinator address and port, the process count and this process's id, exactly as it documents. A launch
    of a single task (``salloc`` or ``sbatch`` of one task, a shell inside an allocation, ``srun -n1``) is
    not joined: the process runs alone. ``auto`` (default: the environment variable ``FUNCGRAD_DISTRIBUTED``)
    chooses: False / ``0`` never joins by detection (every launched process then runs alone, as process 0),
    True / ``1`` always calls ``jax.distributed.initialize()`` and leaves the detection to JAX (for the
    environments JAX knows and this module does not look for: Kubernetes Jobs and JobSets, Cloud TPU VMs),
    None / unset joins when :func:`cluster_environment` finds a multi-process launch.

    Idempotent: when ``jax.distributed`` is already initialized (``jax.distributed.is_initialized()``, which
    does not start a backend) it returns True and changes nothing, whatever the arguments. Errors of
    ``jax.distributed.initialize`` (a coordinator that cannot be reached, a backend already started) are
    raised as :class:`ParallelError` naming the run it tried to join and what to check."""
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    env_n, env_id = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    try:
        num_processes = num_processes if num_processes is not None else (int(env_n) if env_n else None)
        process_id = process_id if process_id is not None else (int(env_id) if env_id else None)
    except ValueError:
        raise ParallelError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers; got {env_n!r} / {env_id!r}") from None
    if coordinator is None and num_processes is None and process_id is None:
        return _join_detected(_setting(auto))
    missing = [n for n, v in (("coordinator address", coordinator), ("number of processes", num_processes),
                              ("process id", process_id)) if v is None]
    if missing:
        raise ParallelError(f"a multi-process run needs the coordinator address, the number of processes and this "
                            f"process's id; missing: {', '.join(missing)}")
    assert num_processes is not None and process_id is not None  # none is missing
    if not 0 <= process_id < num_processes:
        raise ParallelError(f"process id must lie in [0, {num_processes}); got {process_id}")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    except Exception as e:  # JAX raises RuntimeError, ValueError or its own runtime error type
        raise ParallelError(f"could not join the run of {num_processes} processes as process {process_id} through the "
                            f"coordinator {coordinator}: {_reason(e)}; check that every process started with the "
                            f"same coordinator address and number of processes, that process 0 runs on the host of "
                            f"that address, and that this host can reach its port") from e
    return True


def cluster_environment() -> str | None:
    """The multi-process launch that :func:`initialize` joins by detection, in words (e.g. ``"SLURM job 1234:
    2 tasks, this is task 0"``), or None: no launcher, one task, or detection turned off by
    ``FUNCGRAD_DISTRIBUTED=0``. (With ``FUNCGRAD_DISTRIBUTED=1`` a single-task launch is named too, since
    it is joined.) Reads environment variables only: it starts no backend and contacts nothing.

    Detected, in the order in which ``jax.distributed.initialize()`` looks for them (the first one wins):

    - Open MPI 4 and older (``mpirun``/``mpiexec`` with ORTE): ``OMPI_MCA_orte_hnp_uri`` is set; the process
      count and rank are ``OMPI_COMM_WORLD_SIZE`` and ``OMPI_COMM_WORLD_RANK``.
    - Open MPI 5 and newer (PRRTE): ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_RANK`` and
      ``OMPI_COMM_WORLD_LOCAL_RANK`` are set without ``OMPI_MCA_orte_hnp_uri``. JAX bootstraps these through
      mpi4py, which must be installed; :func:`initialize` asks for it (``cluster_detection_method="mpi4py"``).
    - SLURM job steps (``srun``): ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``,
      ``SLURM_PROCID`` and ``SLURM_LOCALID`` are all set (those JAX reads; ``SLURM_STEP_NODELIST`` exists only
      inside a step, so a batch script or an ``salloc`` shell is not a launch). The process count is
      ``SLURM_NTASKS``; a step whose ``SLURM_STEP_NUM_TASKS`` disagrees with it (``srun --preserve-env``) is
      an error, since JAX would wait for processes that never start. (JAX then restricts each task to the
      GPU whose index is ``SLURM_LOCALID`` among those it sees: launch one task per GPU of a node.)

    Not detected (use ``FUNCGRAD_DISTRIBUTED=1`` to let JAX detect them, or configure the run explicitly):
    Kubernetes Jobs and JobSets (the process count is known only to the Kubernetes API, and an indexed Job
    also runs independent work items), Cloud TPU VMs (JAX asks the metadata server), other MPI libraries
    (JAX's mpi4py detection is opt-in only). Raises :class:`ParallelError` when a detected launcher's
    variables are malformed (a count that is not an integer), naming the variable."""
    setting = _setting(None)
    cluster = None if setting == "off" else _detect()
    if cluster is None or (cluster.processes == 1 and setting != "force"):
        return None
    return cluster.description


class _Cluster(NamedTuple):
    description: str  # e.g. "SLURM job 1234: 2 tasks, this is task 0"
    processes: int
    method: str | None  # jax.distributed.initialize's cluster_detection_method; None: JAX's own search
    check: str  # what to check when joining fails


def _setting(auto: bool | None) -> str:
    """"off", "detect" or "force", from ``auto`` or else the environment variable FUNCGRAD_DISTRIBUTED."""
    if auto is not None:
        return "force" if auto else "off"
    value = os.environ.get("FUNCGRAD_DISTRIBUTED", "").strip()
    if value in ("", "auto"):
        return "detect"
    if value in ("0", "1"):
        return "off" if value == "0" else "force"
    raise ParallelError(f"FUNCGRAD_DISTRIBUTED must be 0 (never join a detected cluster), 1 (always call "
                        f"jax.distributed.initialize() and let JAX detect the cluster) or unset/auto (join a detected "
                        f"multi-process launch); got {value!r}")


def _env_int(name: str, why: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)  # type: ignore[arg-type]  # None raises TypeError, caught below
    except (TypeError, ValueError):
        raise ParallelError(f"{why}, but {name} is {'not set' if value is None else repr(value)}; expected an "
                            f"integer") from None


def _detect() -> _Cluster | None:
    env = os.environ
    mpi_check = ("check that every rank started (mpirun -n N), that rank 0's host is reachable from this one on the "
                 "coordinator port (JAX derives it from the job; JAX_COORDINATOR_PORT chooses another) and that no "
                 "*_proxy variable intercepts the connection")
    if "OMPI_MCA_orte_hnp_uri" in env:
        why = "OMPI_MCA_orte_hnp_uri is set (a process started by Open MPI's mpirun)"
        n, rank = _env_int("OMPI_COMM_WORLD_SIZE", why), _env_int("OMPI_COMM_WORLD_RANK", why)
        return _Cluster(f"Open MPI job: {_count(n, 'process', 'processes')}, this is rank {rank}", n, None, mpi_check)
    if all(v in env for v in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")):
        why = "Open MPI's OMPI_COMM_WORLD_* variables are set"
        n, rank = _env_int("OMPI_COMM_WORLD_SIZE", why), _env_int("OMPI_COMM_WORLD_RANK", why)
        return _Cluster(f"Open MPI 5 job: {_count(n, 'process', 'processes')}, this is rank {rank}", n, "mpi4py",
                        "JAX bootstraps Open MPI 5 through mpi4py: check that mpi4py is installed and works "
                        "(python -c 'from mpi4py import MPI'); " + mpi_check)
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm):
        why = "this process runs in a SLURM job step (srun)"
        job = env["SLURM_JOB_ID"]
        n, task = _env_int("SLURM_NTASKS", why), _env_int("SLURM_PROCID", why)
        for name in ("SLURM_JOB_ID", "SLURM_LOCALID"):
            _env_int(name, why)  # JAX parses them as integers too: a bad value is named here, not deep in JAX
        step = env.get("SLURM_STEP_NUM_TASKS")
        if step is not None and step != str(n):
            step_n = _env_int("SLURM_STEP_NUM_TASKS", why)
            if step_n == 1:
                return _Cluster(f"SLURM job {job}: 1 task, this is task 0", 1, None, "")
            raise ParallelError(f"SLURM job {job}: this step runs {step_n} tasks (SLURM_STEP_NUM_TASKS) but "
                                f"SLURM_NTASKS is {n}, which jax.distributed would wait for (srun --preserve-env?); "
                                f"launch with srun -n {step_n} without --preserve-env, or set FUNCGRAD_DISTRIBUTED=0")
        return _Cluster(f"SLURM job {job}: {_count(n, 'task', 'tasks')}, this is task {task}", n, None,
                        f"check that all {n} tasks of the step started (srun -n {n}; not one process started in a "
                        f"{n}-task allocation), that the first node of SLURM_STEP_NODELIST={env['SLURM_STEP_NODELIST']} "
                        f"is reachable from this node on the coordinator port (JAX derives it from the job id; "
                        f"JAX_COORDINATOR_PORT chooses another) and that no *_proxy variable intercepts the connection")
    return None


def _join_detected(setting: str) -> bool:
    if setting == "off":
        return False
    cluster = _detect()
    if setting == "detect" and (cluster is None or cluster.processes == 1):
        return False
    try:
        if cluster is not None and cluster.method is not None:
            jax.distributed.initialize(cluster_detection_method=cluster.method)
        else:
            jax.distributed.initialize()  # JAX's own detection: the coordinator, the count and the id
    except Exception as e:  # JAX raises RuntimeError, ValueError or its own runtime error type
        if cluster is None:
            raise ParallelError(f"FUNCGRAD_DISTRIBUTED=1: jax.distributed.initialize() found no cluster it could join: "
                                f"{_reason(e)}; JAX detects Open MPI, SLURM steps, Cloud TPU and Kubernetes "
                                f"Jobs (with jax[k8s]); elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                                f"JAX_PROCESS_ID, or unset FUNCGRAD_DISTRIBUTED") from e
        raise ParallelError(f"{cluster.description}: jax.distributed.initialize() failed: {_reason(e)}; "
                            f"{cluster.check}; FUNCGRAD_DISTRIBUTED=0 runs every process alone") from e
    return True


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _reason(e: BaseException) -> str:
    return str(e).strip() or type(e).__name__


def data_mesh(devices: int | None = None) -> Mesh:
    """A one-axis mesh named ``data`` over the first ``devices`` devices (default: all, across processes).

    Over all devices it is ``jax.make_mesh``'s, which orders them for the physical topology (a ring on
    TPUs), with the axis type ``Auto`` (``Mesh``'s default; ``jax.make_mesh`` defaults to ``Explicit``).
    A subset, and a topology ``jax.make_mesh`` does not support (several TPU slices), keeps the devices
    in ``jax.devices()`` order."""
    all_devices = jax.devices()
    n = len(all_devices) if devices is None else devices
    if not 1 <= n <= len(all_devices):
        raise ParallelError(f"asked for {n} devices; {len(all_devices)} are visible")
    if jax.process_count() > 1 and n != len(all_devices):
        raise ParallelError(f"a multi-process run uses all {len(all_devices)} devices; {n} do not divide the batch")
    if n == len(all_devices):
        try:
            return jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,), devices=all_devices)
        except ValueError:  # a multi-slice topology: jax.make_mesh refuses it, the plain order works
            pass
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
    sizes = {int(np.shape(a)[0]) for a in jax.tree.leaves(data) if np.ndim(a)}
    whole = any(n % mesh.size for n in sizes)  # a data set that does not divide: minibatches are split instead
    if whole and jax.process_count() > 1:
        raise ParallelError(f"{min(sizes)} samples do not divide over the {mesh.size} devices of a multi-process run; "
                            "each process feeds its own slice of the data: use a data set whose size is a multiple "
                            f"of {mesh.size}")
    data = jax.tree.map(lambda a: _global(a, replicated if whole else split, process_local=True), data)

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
