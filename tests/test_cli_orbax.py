"""funcgrad train with checkpoint.backend = "orbax": saved, kept, resumed and evaluated like the npz default."""

import json

import pytest
from conftest import run_python

pytest.importorskip("orbax.checkpoint")

BASE = ["--set", "train.fuse=20", "--set", "train.checkpoint_every=20", "--set", "train.log_every=10",
        "--set", "train.verify=false", "--quiet"]


def train(out, *extra, check=True):
    config = [] if "--resume" in extra else ["--config", "sine"]  # a resumed run reads its own config.json
    return run_python(["-m", "funcgrad", "train", "--out", str(out), *config, *BASE, *extra],
                      env={"FUNCGRAD_COMPILATION_CACHE": "0"}, check=check)


def steps_kept(out):
    return sorted(int(p.name) for p in (out / "orbax").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_orbax_checkpoints_keep_the_latest_and_resume_to_the_same_run(tmp_path):
    orbax = ["--set", "checkpoint.backend=orbax", "--set", "checkpoint.max_to_keep=2"]
    part, whole, npz = tmp_path / "part", tmp_path / "whole", tmp_path / "npz"
    train(part, *orbax, "--set", "train.epochs=60")
    assert steps_kept(part) == [40, 60] and not (part / "checkpoint.npz").exists()
    proc = train(part, "--resume", "--set", "train.epochs=100", "--set", "checkpoint.max_to_keep=3")
    assert proc.returncode == 0
    assert steps_kept(part) == [60, 80, 100]
    train(whole, *orbax, "--set", "train.epochs=100")
    train(npz, "--set", "train.epochs=100")
    final = [json.loads((run / "summary.json").read_text()) for run in (part, whole, npz)]
    assert final[0]["train"] == final[1]["train"] == final[2]["train"]  # bit for bit, whichever backend
    ev = json.loads(run_python(["-m", "funcgrad", "evaluate", "--run", str(part), "--json"],
                               env={"FUNCGRAD_COMPILATION_CACHE": "0"}).stdout)
    assert ev["step"] == 100 and ev["metrics"] == final[0]["validation"]


@pytest.mark.slow
def test_a_run_cannot_switch_backend_on_resume_and_an_orbax_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    train(out, "--set", "checkpoint.backend=orbax", "--set", "train.epochs=20")
    proc = train(out, "--resume", "--set", "checkpoint.backend=npz", "--set", "train.epochs=40", check=False)
    assert proc.returncode == 2 and "checkpoint.backend" in proc.stderr and "cannot change" in proc.stderr
    proc = train(out, "--set", "train.epochs=40", check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr


def test_orbax_backend_without_orbax_is_a_clear_error(monkeypatch):
    import sys

    from funcgrad.cli._train import _orbax_missing

    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    assert "pip install 'funcgrad[orbax]'" in _orbax_missing()
