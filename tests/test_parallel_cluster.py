"""Multi-process launches detected from the launcher's environment (SLURM, Open MPI) by parallel.initialize.

The unit tests set the environment variables of each launcher and record the call to jax.distributed.initialize
instead of making it (this pytest process must stay a single-process JAX run). The last test is real: two
processes with the environment of a 2-task SLURM step on 127.0.0.1 join one run through JAX's own detection."""

import json
import os
import random
import socket
import subprocess
import sys

import jax
import pytest
from conftest import ROOT
from jax.sharding import AxisType

from funcgrad import parallel

LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "JAX_", "FUNCGRAD_DISTRIBUTED")


def _launcher_variable(name: str) -> bool:
    """A variable of a launcher, of JAX's (distributed settings, device counts; not conftest's rank promotion)
    or funcgrad's switch: the tests may themselves run under SLURM or Open MPI."""
    return name.startswith(LAUNCHER_PREFIXES) and name != "JAX_NUMPY_RANK_PROMOTION"


def _launcher_free_env() -> dict[str, str]:
    """This environment without launcher variables, proxies (gRPC would use one even for 127.0.0.1) or XLA flags
    (a forced device count)."""
    return {k: v for k, v in os.environ.items()
            if not _launcher_variable(k) and "_proxy" not in k.lower() and k != "XLA_FLAGS"}


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for k in list(os.environ):
        if _launcher_variable(k):
            monkeypatch.delenv(k)


@pytest.fixture
def calls(monkeypatch):
    """Records the calls to jax.distributed.initialize instead of making them."""
    made = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: made.append((args, kwargs)))
    return made


def slurm(monkeypatch, ntasks: int, procid: int = 0, job: str = "1234", **extra: str) -> None:
    env = {"SLURM_JOB_ID": job, "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid),
           "SLURM_LOCALID": str(procid), "SLURM_STEP_NODELIST": "node[001-002]", **extra}
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_a_two_task_slurm_step_is_joined_through_jax_own_detection(monkeypatch, calls):
    slurm(monkeypatch, 2, procid=1, SLURM_STEP_NUM_TASKS="2")
    assert parallel.cluster_environment() == "SLURM job 1234: 2 tasks, this is task 1"
    assert parallel.initialize() is True
    assert calls == [((), {})]  # no arguments: JAX derives the coordinator, the count and the id itself


@pytest.mark.parametrize("case", ["one task", "batch script", "ssh into the node", "srun -n1 --preserve-env"])
def test_slurm_without_a_multi_task_step_runs_alone(monkeypatch, calls, case):
    if case == "one task":  # salloc/sbatch of a single task, srun -n1
        slurm(monkeypatch, 1)
    elif case == "batch script":  # the batch script of a 2-task allocation: no step, so no SLURM_STEP_NODELIST
        slurm(monkeypatch, 2)
        monkeypatch.delenv("SLURM_STEP_NODELIST")
    elif case == "ssh into the node":  # only the job id reaches the shell
        monkeypatch.setenv("SLURM_JOB_ID", "1234")
    else:  # one task of a 2-task allocation whose SLURM_NTASKS was preserved
        slurm(monkeypatch, 2, SLURM_STEP_NUM_TASKS="1")
    assert parallel.cluster_environment() is None
    assert parallel.initialize() is False
    assert calls == []


def test_a_step_that_disagrees_with_slurm_ntasks_is_refused(monkeypatch, calls):
    slurm(monkeypatch, 4, SLURM_STEP_NUM_TASKS="2")  # JAX would wait for 4 processes; 2 start
    with pytest.raises(parallel.ParallelError, match=r"this step runs 2 tasks .* SLURM_NTASKS is 4"):
        parallel.initialize()
    assert calls == []


def test_malformed_slurm_variables_are_named(monkeypatch, calls):
    slurm(monkeypatch, 2)
    monkeypatch.setenv("SLURM_NTASKS", "2(x2)")
    with pytest.raises(parallel.ParallelError, match=r"SLURM job step .* but SLURM_NTASKS is '2\(x2\)'; expected an integer"):
        parallel.initialize()
    assert calls == []


def test_open_mpi_before_slurm(monkeypatch, calls):
    slurm(monkeypatch, 1)  # mpirun inside a SLURM allocation: JAX looks for Open MPI first, and so does funcgrad
    for k, v in {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4",
                 "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert parallel.cluster_environment() == "Open MPI job: 4 processes, this is rank 2"
    assert parallel.initialize() is True
    assert calls == [((), {})]


def test_open_mpi_5_is_bootstrapped_through_mpi4py(monkeypatch, calls):
    for k, v in {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert parallel.cluster_environment() == "Open MPI 5 job: 2 processes, this is rank 0"
    assert parallel.initialize() is True
    assert calls == [((), {"cluster_detection_method": "mpi4py"})]


def test_no_launcher(calls):
    assert parallel.cluster_environment() is None
    assert parallel.initialize() is False
    assert calls == []


def test_funcgrad_distributed_0_and_auto_false_turn_the_detection_off(monkeypatch, calls):
    slurm(monkeypatch, 2)
    assert parallel.initialize(auto=False) is False
    monkeypatch.setenv("FUNCGRAD_DISTRIBUTED", "0")
    assert parallel.cluster_environment() is None
    assert parallel.initialize() is False
    assert calls == []


def test_funcgrad_distributed_1_and_auto_true_leave_the_detection_to_jax(monkeypatch, calls):
    assert parallel.initialize(auto=True) is True  # no launcher funcgrad knows: JAX may know one (Cloud TPU, ...)
    slurm(monkeypatch, 1)
    monkeypatch.setenv("FUNCGRAD_DISTRIBUTED", "1")
    assert parallel.cluster_environment() == "SLURM job 1234: 1 task, this is task 0"
    assert parallel.initialize() is True
    assert calls == [((), {}), ((), {})]


def test_a_bad_funcgrad_distributed(monkeypatch, calls):
    monkeypatch.setenv("FUNCGRAD_DISTRIBUTED", "yes")
    with pytest.raises(parallel.ParallelError, match=r"FUNCGRAD_DISTRIBUTED must be 0 .*, 1 .* or unset/auto .*; got 'yes'"):
        parallel.initialize()


def test_an_explicit_configuration_comes_first(monkeypatch, calls):
    slurm(monkeypatch, 2)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert parallel.initialize() is True
    assert calls == [((), {"coordinator_address": "10.0.0.1:1234", "num_processes": 3, "process_id": 2})]


def test_an_initialized_run_is_not_initialized_again(monkeypatch, calls):
    slurm(monkeypatch, 2)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert parallel.initialize() is True
    assert parallel.initialize("10.0.0.1:1234", 2, 0) is True
    assert calls == []


def test_a_failed_join_names_the_job_and_what_to_check(monkeypatch):
    def unreachable(*args, **kwargs):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out")

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", unreachable)
    slurm(monkeypatch, 2, job="4321")
    with pytest.raises(parallel.ParallelError) as e:
        parallel.initialize()
    message = str(e.value)
    assert message.startswith("SLURM job 4321: 2 tasks, this is task 0: jax.distributed.initialize() failed: "
                              "DEADLINE_EXCEEDED: Barrier timed out; ")
    assert "srun -n 2" in message and "SLURM_STEP_NODELIST=node[001-002]" in message
    assert "FUNCGRAD_DISTRIBUTED=0" in message
    monkeypatch.setenv("FUNCGRAD_DISTRIBUTED", "1")
    for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(k)
    with pytest.raises(parallel.ParallelError, match=r"FUNCGRAD_DISTRIBUTED=1: .* found no cluster .* JAX_COORDINATOR_ADDRESS"):
        parallel.initialize()
    with pytest.raises(parallel.ParallelError, match=r"could not join the run of 2 processes as process 1 through the "
                                                     r"coordinator 10\.0\.0\.1:1234: DEADLINE_EXCEEDED"):
        parallel.initialize("10.0.0.1:1234", 2, 1)


def test_the_data_mesh_keeps_automatic_sharding():
    mesh = parallel.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == len(jax.devices())
    assert mesh.axis_types == (AxisType.Auto,)  # jax.make_mesh's default would be Explicit
    with pytest.raises(parallel.ParallelError, match=f"asked for {len(jax.devices()) + 1} devices"):
        parallel.data_mesh(len(jax.devices()) + 1)


CHILD = r"""
import json
import funcgrad.parallel as p
described = p.cluster_environment()
joined = p.initialize()
again = p.initialize()  # idempotent
import jax, numpy as np
from jax.experimental import multihost_utils
mesh = p.data_mesh()
gathered = multihost_utils.process_allgather(np.int32(jax.process_index() + 10))
print(json.dumps({"described": described, "joined": joined, "again": again, "index": jax.process_index(),
                  "count": jax.process_count(), "devices": len(jax.devices()), "mesh": int(mesh.devices.size),
                  "gathered": [int(v) for v in np.ravel(gathered)]}))
"""


def _free_job_id() -> int:
    """A job id whose coordinator port (JAX: 61440 + id mod 4096) is free here."""
    for _ in range(100):
        job = random.randint(1000, 999_999)
        with socket.socket() as s:
            try:
                s.bind(("", job % 2**12 + (65535 - 2**12 + 1)))
            except OSError:
                continue
        return job
    raise AssertionError("no free port in 61440-65535 for the coordinator")


@pytest.mark.slow
def test_two_tasks_of_a_slurm_step_on_127_0_0_1_join_one_run():
    job = _free_job_id()
    base = {**_launcher_free_env(), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "SLURM_JOB_ID": str(job),
            "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "127.0.0.1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
             for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"task {i} exited {p.returncode}\n{out}\n{err}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    for i, r in enumerate(results):
        assert r["described"] == f"SLURM job {job}: 2 tasks, this is task {i}"
        assert r["joined"] is True and r["again"] is True
        assert (r["index"], r["count"]) == (i, 2)  # SLURM_PROCID became the process index
        assert r["devices"] == r["mesh"] == 2  # one CPU device per process, both in the data mesh
        assert r["gathered"] == [10, 11]  # a collective across both processes
