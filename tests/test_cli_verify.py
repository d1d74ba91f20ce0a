"""funcgrad verify: the table, --json, and the exit status."""

import json

import pytest
from conftest import run_python

from funcgrad import cli, verify
from funcgrad.cli import _verify  # noqa: F401  (monkeypatched below)


def test_verify_json_subset(tmp_path):
    proc = run_python(
        ["-m", "funcgrad", "verify", "--json", "--only", "rule relu", "rule dense", "rule softmax_jacobian"],
        env={"FUNCGRAD_COMPILATION_CACHE": str(tmp_path)},
    )
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True
    got = {c["name"]: c["verdict"] for c in doc["checks"]}
    assert got == {"rule dense": "ok", "rule relu": "kink", "rule softmax_jacobian": "ok"}
    relu = next(c for c in doc["checks"] if c["name"] == "rule relu")
    assert relu["report"]["rows"][0]["worst_index"] == [2, 3]  # the example's exact zero
    env = relu["report"]["environment"]  # what a bug report about a verdict needs
    assert env["jax"] and env["backend"] == "cpu" and env["mode"] == "auto" and env["rtol"] > 0
    assert all(c["seconds"] > 0 for c in doc["checks"])


def test_verify_table_and_exit_status_on_failure(monkeypatch, capsys):
    def failing_suite(seed=0, only=None):
        import jax.numpy as jnp

        report = verify.check_grad(lambda p: jnp.sum(p**2), jnp.array([1.0, 2.0]), hand=lambda p: 3 * p)
        return [{"name": "planted", "kind": "check_grad", "formula": "d(p²)/dp = 2p", "report": report, "seconds": 0.1}]

    monkeypatch.setattr(cli._verify, "verify_suite", failing_suite)
    monkeypatch.setenv("FUNCGRAD_COMPILATION_CACHE", "0")
    assert cli.main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "planted" in out and "hand_wrong" in out and "1 of 1 checks FAILED" in out
    assert cli.main(["verify", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_verify_unknown_filter(capsys, monkeypatch):
    monkeypatch.setenv("FUNCGRAD_COMPILATION_CACHE", "0")
    assert cli.main(["verify", "--only", "no-such-check"]) == 2


@pytest.mark.slow
def test_verify_everything_passes(tmp_path):
    proc = run_python(["-m", "funcgrad", "verify"], env={"FUNCGRAD_COMPILATION_CACHE": str(tmp_path)})
    assert "all 26 checks passed" in proc.stdout
