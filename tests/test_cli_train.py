"""funcgrad train and funcgrad evaluate, end to end in subprocesses (as `make run` runs them)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_python, same_training_state

from funcgrad import checkpoint
from funcgrad.cli import _rundir


def train(out, *extra, env=None, check=True, cache=None):
    return run_python(["-m", "funcgrad", "train", "--out", str(out), *extra], check=check,
                      env={"FUNCGRAD_COMPILATION_CACHE": cache or "0", **(env or {})})


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, compile_cache):
    out = tmp_path_factory.mktemp("runs") / "spiral"
    proc = train(out, cache=compile_cache)  # no --config: configs/spiral.toml
    return out, proc


@pytest.mark.slow
def test_default_run_reproduces_chapter_11(default_run):
    out, proc = default_run
    summary = json.loads((out / "summary.json").read_text())
    # The band around the book's chapter-11 result (acc 0.983 / loss 0.074; 0.967 / 0.074 rerun today).
    assert summary["train"]["accuracy"] >= 0.95 and summary["train"]["loss"] <= 0.12, summary["train"]
    assert summary["validation"]["accuracy"] >= 0.75, summary["validation"]
    assert summary["steps"] == 10001 and summary["config"]["optimizer"]["learning_rate"] == 0.05
    assert summary["last_step"]["step"] == 10000
    assert summary["last_step"]["lr"] == pytest.approx(0.05 / (1 + 5e-7 * 10000))
    assert "check  hand-derived gradient vs JAX" in proc.stdout  # cross-checked before training
    assert "check_grad: kink (ok)" in proc.stdout
    assert "final  training:" in proc.stdout and "validation:" in proc.stdout
    assert "step 10001/10001" in proc.stderr and proc.stderr.count("\n") < 20  # a bar, not a line per step


def test_default_run_files(default_run):
    out, _ = default_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in lines] == list(range(0, 10001, 100))
    assert set(lines[0]) == {"step", "split", "loss", "data_loss", "reg_loss", "accuracy", "lr", "window",
                             *(f"{k}_{s}" for k in ("loss", "accuracy") for s in ("mean", "min", "max"))}
    assert [r["window"] for r in lines[:3]] == [1, 100, 100]
    # validation every train.eval_every = 1000 steps (a multiple of fuse) and at the last step, 10001
    val = [r for r in rows if r["split"] == "validation"]
    assert [r["step"] for r in val] == [*range(1000, 10001, 1000), 10001]
    summary = json.loads((out / "summary.json").read_text())
    assert val[-1]["accuracy"] == pytest.approx(summary["validation"]["accuracy"])
    for png in ("curves.png", "decision_boundary.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = (out / "checkpoint.npz").read_bytes()
    assert checkpoint.metadata(data)["step"] == 10001
    assert json.loads((out / "config.json").read_text())["name"] == "spiral"
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


@pytest.mark.slow
def test_evaluate_on_fresh_data(default_run, compile_cache):
    out, _ = default_run
    env = {"FUNCGRAD_COMPILATION_CACHE": compile_cache}
    a = json.loads(run_python(["-m", "funcgrad", "evaluate", "--run", str(out), "--json"], env=env).stdout)
    b = json.loads(
        run_python(["-m", "funcgrad", "evaluate", "--run", str(out), "--json", "--seed", "7"], env=env).stdout
    )
    assert a["step"] == 10001 and a["data"] == "validation" and a["seed"] is None
    assert b["data"] == "fresh" and b["seed"] == 7
    summary = json.loads((out / "summary.json").read_text())
    assert a["metrics"]["accuracy"] == pytest.approx(summary["validation"]["accuracy"])  # the run's validation data
    assert b["metrics"]["accuracy"] >= 0.75 and a["metrics"]["accuracy"] != b["metrics"]["accuracy"]
    text = run_python(["-m", "funcgrad", "evaluate", "--run", str(out)], env=env).stdout
    assert "validation: loss" in text and "the run's validation data" in text


@pytest.mark.slow
def test_a_run_is_never_overwritten(default_run):
    out, _ = default_run
    before = (out / "checkpoint.npz").read_bytes()
    proc = train(out, check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "--resume" in proc.stderr
    proc = train(out, "--resume", "--set", "model.sizes=[32, 3]", check=False)
    assert proc.returncode == 2 and "model.sizes: run has [64, 3], now [32, 3]" in proc.stderr
    assert (out / "checkpoint.npz").read_bytes() == before


def test_a_finished_run_whose_checkpoint_is_gone_is_not_overwritten(tmp_path):
    # A finished run's folder without its checkpoint.npz (removed to save space, or left out of a copy): a new
    # train there, as --resume's error advised, replaced its summary.json, config.json and plots (h83).
    out = tmp_path / "run"
    out.mkdir()
    kept = {"summary.json": '{"train": {"accuracy": 0.9}}\n', "config.json": "{}\n", "curves.png": "png"}
    for name, text in kept.items():
        (out / name).write_text(text)
    _rundir.write_marker(out)  # (funcgrad's run.json)
    kept["run.json"] = (out / "run.json").read_text()
    proc = train(out, "--resume", check=False)
    assert proc.returncode == 2 and "holds a finished run's results" in proc.stderr, proc.stderr
    assert "train without --resume" not in proc.stderr
    proc = train(out, check=False)
    assert proc.returncode == 2 and "a new run there would replace them" in proc.stderr, proc.stderr
    assert {p.name: p.read_text() for p in out.iterdir()} == kept


@pytest.mark.slow
def test_bad_config_values_exit_2(tmp_path):
    proc = train(tmp_path / "x", "--set", "optimizer.learning_rat=0.1", check=False)
    assert proc.returncode == 2
    assert "optimizer.learning_rat: unknown key; allowed keys in [optimizer]" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_python(["-m", "funcgrad", "evaluate", "--run", str(tmp_path)], check=False)
    assert proc.returncode == 2 and "no finished or checkpointed run" in proc.stderr


RESUME = ["--set", "train.epochs=20001", "--set", "train.fuse=500", "--set", "train.checkpoint_every=500",
          "--set", "train.verify=false"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path, compile_cache):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = dict(os.environ, PYTHONUNBUFFERED="1", FUNCGRAD_COMPILATION_CACHE=compile_cache)
    proc = subprocess.Popen([sys.executable, "-m", "funcgrad", "train", "--out", str(killed), *RESUME], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.npz").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = checkpoint.metadata((killed / "checkpoint.npz").read_bytes())["step"]
    assert 0 < step < 20001, "the run should have been killed mid-way"
    resumed = train(killed, "--resume", *RESUME, cache=compile_cache)
    assert f"resume from step {step}" in resumed.stdout
    train(whole, *RESUME, cache=compile_cache)
    assert same_training_state(killed / "checkpoint.npz", whole / "checkpoint.npz")
    assert (killed / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["train"] == json.loads((whole / "summary.json").read_text())["train"]


@pytest.mark.slow
def test_numerical_fault_stops_and_keeps_the_last_good_checkpoint(tmp_path, compile_cache):
    out = tmp_path / "sine"
    base = ["--config", str(ROOT / "configs" / "sine.toml"), "--set", "optimizer.kind=sgd", "--set", "train.fuse=100",
            "--set", "train.checkpoint_every=100", "--set", "train.verify=false"]
    train(out, *base, "--set", "train.epochs=200", "--set", "optimizer.learning_rate=0.01", cache=compile_cache)
    good = (out / "checkpoint.npz").read_bytes()
    metrics_before = (out / "metrics.jsonl").read_text()
    proc = train(out, *base, "--set", "train.epochs=400", "--set", "optimizer.learning_rate=100.0", "--resume",
                 check=False, cache=compile_cache)
    assert proc.returncode == 1
    assert "training stopped at step 20" in proc.stderr and "the loss is inf" in proc.stderr
    assert "The last good checkpoint is step 200" in proc.stderr
    assert (out / "checkpoint.npz").read_bytes() == good  # nothing saved was lost
    assert (out / "metrics.jsonl").read_text().startswith(metrics_before)


@pytest.mark.slow
def test_user_mistakes_get_one_line_errors(tmp_path, default_run):
    out, _ = default_run
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "run.json"):
        (damaged / name).write_text((out / name).read_text())
    (damaged / "checkpoint.npz").write_bytes(b"not a checkpoint")
    for args in (["train", "--out", str(damaged), "--resume"], ["evaluate", "--run", str(damaged)]):
        proc = run_python(["-m", "funcgrad", *args], check=False, env={"FUNCGRAD_COMPILATION_CACHE": "0"})
        assert proc.returncode == 2 and "not a readable funcgrad checkpoint" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    (tmp_path / "afile").write_text("x")
    proc = train(tmp_path / "afile", "--set", "train.epochs=1", check=False)
    assert proc.returncode == 2 and "exists and is not a folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = train(tmp_path / "p", "--set", "loss.l2={'dens1/W' = 5e-4}", check=False)
    assert proc.returncode == 2 and "loss.l2.dens1/W" in proc.stderr and "matches no parameter" in proc.stderr


@pytest.mark.slow
def test_resuming_off_the_checkpoint_grid_keeps_checkpointing(tmp_path, compile_cache):
    out = tmp_path / "grid"
    base = ["--set", "train.fuse=50", "--set", "train.checkpoint_every=100", "--set", "train.verify=false"]
    train(out, *base, "--set", "train.epochs=250", cache=compile_cache)
    assert checkpoint.metadata((out / "checkpoint.npz").read_bytes())["step"] == 250
    env = dict(os.environ, FUNCGRAD_COMPILATION_CACHE=compile_cache)
    proc = subprocess.Popen([sys.executable, "-m", "funcgrad", "train", "--out", str(out), *base,
                             "--set", "train.epochs=200250", "--resume"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, step = time.time() + 120, 250
    while step == 250 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        with contextlib.suppress(checkpoint.CheckpointError):
            step = checkpoint.metadata((out / "checkpoint.npz").read_bytes())["step"]
    proc.kill()
    proc.wait()
    # Checkpoints continue on the grid of checkpoint_every (the first after 250 is 300), not only at the end.
    assert step != 250 and step % 100 == 0 and step < 200250, step


@pytest.mark.slow
def test_earlier_metrics_are_set_aside_not_lost(tmp_path, compile_cache):
    out = tmp_path / "sine"
    base = ["--config", str(ROOT / "configs" / "sine.toml"), "--set", "optimizer.kind=sgd", "--set", "train.fuse=100",
            "--set", "train.checkpoint_every=100", "--set", "train.verify=false", "--set", "train.log_every=1"]
    # A diverging attempt that never reaches a checkpoint, then a fresh run in the same folder.
    train(out, *base, "--set", "train.epochs=300", "--set", "optimizer.learning_rate=100.0", check=False,
          cache=compile_cache)
    failed = (out / "metrics.jsonl").read_text()
    proc = train(out, *base, "--set", "train.epochs=200", "--set", "optimizer.learning_rate=0.01", cache=compile_cache)
    assert "kept as" in proc.stdout and (out / "metrics.jsonl.1").read_text() == failed
    # Diverge after the checkpoint at 200, then resume from it with a lower rate: the lines past 200 go aside.
    train(out, *base, "--set", "train.epochs=400", "--set", "optimizer.learning_rate=100.0", "--resume", check=False,
          cache=compile_cache)
    before = (out / "metrics.jsonl").read_text()
    train(out, *base, "--set", "train.epochs=300", "--set", "optimizer.learning_rate=0.02", "--resume",
          cache=compile_cache)
    assert (out / "metrics.jsonl.2").read_text() == before
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(300))


@pytest.mark.slow
def test_quiet_prints_no_warnings_of_a_run_that_succeeds(tmp_path):
    # A name of full-width letters: matplotlib warns, once per glyph, that its font lacks them.
    tiny = ["--set", "name='ｔｉｎｙ'", "--set", "data.samples=20", "--set", "model.sizes=[4, 3]", "--set", "train.epochs=20",
            "--set", "train.fuse=10", "--set", "train.verify=false"]
    proc = train(tmp_path / "quiet", "--quiet", *tiny)
    assert proc.stdout == "" and proc.stderr == ""
    assert (tmp_path / "quiet" / "curves.png").exists()
    loud = train(tmp_path / "loud", *tiny)  # without --quiet they are shown, as Python shows warnings
    assert "missing from font" in loud.stderr
