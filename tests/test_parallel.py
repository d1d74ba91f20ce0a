"""Data parallelism: 8 simulated CPU devices in one process, and 2 processes joined by jax.distributed.

JAX reads the device count when it starts, so each scenario runs in a fresh interpreter."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_python

from funcgrad import checkpoint

EIGHT = {"JAX_NUM_CPU_DEVICES": "8", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

SCRIPT = r"""
import json, sys
import jax, numpy as np
import funcgrad as fg
from funcgrad import parallel
assert len(jax.devices()) == 8, jax.devices()
X, y = fg.data.spiral(96, 3, key=0)  # 288 samples: divisible by 8
model = fg.nn.mlp([64, 3], output="softmax")
obj = fg.Objective(model, "categorical_crossentropy", l2={"dense1/*": 5e-4})
params = model.init(jax.random.key(0), (2,))

def run(mode, tx, steps, batch_size=None, n=len(X)):
    mesh = parallel.setup_for(mode, (X[:n], y[:n]), batch_size)
    state = fg.train.init(params, tx, jax.random.key(1))
    state, data, shard = parallel.place(mesh, state, (X[:n], y[:n]))
    losses = []
    for state, m in fg.train.chunks(obj.train_loss, tx, state, data, steps=steps, fuse=50, batch_size=batch_size,
                                    shard_batch=shard):
        losses.append(m["loss"])
    sharding = str(data[0].sharding) if mesh else "single"
    return parallel.gather(state).params, np.concatenate(losses), parallel.describe_mesh(mesh), sharding

out = {}
for name, tx, steps, bs, n in [("sgd_full", fg.optim.sgd(0.5), 300, None, 288),
                               ("sgd_minibatch", fg.optim.sgd(0.2), 300, 96, 288),
                               ("momentum_full", fg.optim.sgd(0.2, momentum=0.9), 200, None, 288),
                               # 284 samples do not divide over 8 devices; minibatches of 96 do
                               ("sgd_minibatch_ragged", fg.optim.sgd(0.2), 100, 96, 284)]:
    p1, l1, _, _ = run("none", tx, steps, bs, n)
    p8, l8, desc, sharding = run("data", tx, steps, bs, n)
    out[name] = {"loss_diff": float(np.abs(l1 - l8).max()), "loss_scale": float(np.abs(l1).max()),
                 "param_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                   for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8))),
                 "param_scale": max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(p1)),
                 "describe": desc, "sharding": sharding}
out["auto_300"] = parallel.describe_mesh(parallel.setup_for("auto", fg.data.spiral(100, 3), None))
try:
    parallel.setup_for("data", fg.data.spiral(100, 3), None)
except parallel.ParallelError as e:
    out["data_300"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_devices():
    return json.loads(run_python(["-c", SCRIPT], env=EIGHT).stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["sgd_full", "sgd_minibatch", "momentum_full", "sgd_minibatch_ragged"])
@pytest.mark.slow
def test_eight_devices_follow_the_single_device_run(eight_devices, case):
    r = eight_devices[case]
    assert r["describe"] == "data parallel over 8 devices (cpu)"
    # Same program, partitioned: only the order of floating-point additions differs. (Adam is left out on
    # purpose: it divides by √v, which turns rounding noise in near-zero gradients into full-size steps.)
    assert r["loss_diff"] <= 1e-5 * max(1.0, r["loss_scale"]), r
    assert r["param_diff"] <= 1e-3 * max(1.0, r["param_scale"]), r
    if case.endswith("full"):
        assert "spec=P('data',)" in r["sharding"]  # the batch really is split over the devices


def test_batches_that_do_not_divide(eight_devices):
    assert eight_devices["auto_300"] == "data parallel over 6 devices (cpu)"  # the largest dividing count
    assert "a batch of 300 samples does not divide over 8 devices" in eight_devices["data_300"]


@pytest.mark.slow  # a CLI run on 8 simulated devices (~8 s); the library's 8-device runs stay in the default suite
def test_cli_on_eight_devices(tmp_path, compile_cache):
    proc = run_python(["-m", "funcgrad", "train", "--out", str(tmp_path / "run"), "--set", "train.epochs=200",
                       "--set", "train.verify=false"], env={**EIGHT, "FUNCGRAD_COMPILATION_CACHE": compile_cache})
    assert "data parallel over 6 devices (cpu)" in proc.stdout
    proc = run_python(["-m", "funcgrad", "train", "--out", str(tmp_path / "bad"), "--set", "parallel.mode=data"],
                      env=EIGHT, check=False)
    assert proc.returncode == 2 and "does not divide over 8 devices" in proc.stderr


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STABLE = ["--set", "optimizer.kind=sgd", "--set", "optimizer.learning_rate=0.5", "--set", "optimizer.decay=0.0",
          "--set", "train.fuse=100", "--set", "train.checkpoint_every=100", "--set", "train.verify=false"]


def _two_processes(out, *extra):
    port = _port()
    procs = [subprocess.Popen([sys.executable, "-m", "funcgrad", "train", "--out", str(out), *STABLE, *extra,
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, "FUNCGRAD_COMPILATION_CACHE": "0"})
             for i in (1, 0)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, f"{o}\n{e}"
    return outs[1], outs[0]  # process 0's, then process 1's


def _params(path):
    with np.load(path / "checkpoint.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k.startswith("leaf")}


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path):
    (out0, err0), (out1, err1) = _two_processes(tmp_path / "two", "--set", "train.epochs=200")
    assert "data parallel over 2 devices in 2 processes (cpu)" in out0
    assert "funcgrad train" not in out1  # only process 0 prints ...
    assert checkpoint.metadata((tmp_path / "two" / "checkpoint.npz").read_bytes())["step"] == 200
    (out0, _), _ = _two_processes(tmp_path / "two", "--set", "train.epochs=300", "--resume")  # ... and writes
    assert "resume from step 200" in out0
    run_python(["-m", "funcgrad", "train", "--out", str(tmp_path / "one"), *STABLE, "--set", "train.epochs=300"])
    two, one = _params(tmp_path / "two"), _params(tmp_path / "one")
    assert two.keys() == one.keys()
    for k in one:
        np.testing.assert_allclose(two[k].astype(float), one[k].astype(float), rtol=1e-3, atol=1e-4)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    # Training: every log_every steps, and the last step of each run; validation: at the end of each run.
    assert [r["step"] for r in rows if r["split"] == "train"] == [0, 100, 199, 200, 299]
    assert [r["step"] for r in rows if r["split"] == "validation"] == [200, 300]


@pytest.mark.slow
def test_a_refusal_by_process_0_stops_every_process(tmp_path):
    out = tmp_path / "run"
    run_python(["-m", "funcgrad", "train", "--out", str(out), *STABLE, "--set", "train.epochs=100"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    port = _port()
    procs = [subprocess.Popen([sys.executable, "-m", "funcgrad", "train", "--out", str(out), *STABLE,
                               "--set", "train.epochs=200", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                               "2", "--process-id", str(i)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**__import__("os").environ, "FUNCGRAD_COMPILATION_CACHE": "0"})
             for i in (1, 0)]
    (_, err1), (_, err0) = [p.communicate(timeout=120) for p in procs]
    # No --resume into a finished run: process 0 refuses, and process 1 stops with it instead of training alone.
    assert procs[1].returncode == 2 and "already holds a run" in err0 and "Traceback" not in err0
    assert procs[0].returncode == 2 and "process 0 refused the run" in err1 and "Traceback" not in err1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
