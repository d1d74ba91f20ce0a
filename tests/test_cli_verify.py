"""funcgrad verify: the table, --json, and the exit status."""

import json
import sys

import pytest
from conftest import run_python

from funcgrad import cli, verify
from funcgrad.cli import _verify  # noqa: F401  (monkeypatched below)


@pytest.mark.slow
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


# ---- funcgrad verify --audit TARGET ----------------------------------------------------------------------------

TARGET = '''
import sys

import jax
import jax.numpy as jnp


@jax.custom_vjp
def cube(x):
    return x**3


cube.defvjp(lambda x: (x**3, x), lambda x, g: (g * 3 * x**2,))


@jax.custom_jvp
def swish(x):
    return x * jax.nn.sigmoid(x)


@swish.defjvp
def swish_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    s = jax.nn.sigmoid(x)
    d = s * (1 + x * (1 - s))
    return swish(x), (d.at[1].multiply(1.5) if WRONG else d) * t


WRONG = False


def setup():
    return (lambda w, x: (cube(w * x) + swish(w)).sum()), jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 1.0, -1.0])


def planted():
    global WRONG
    WRONG = True
    return setup()


def not_a_tuple():
    return 3


def one_element():
    return (jnp.sum,)


def not_callable():
    return jnp.ones(2), jnp.ones(2)


def raises():
    raise RuntimeError("the data folder is missing")


def exits():
    sys.exit(0)


def exits_in_fn():
    def fn(w):
        sys.exit(0)

    return fn, jnp.ones(2)


def fails_to_trace():
    return (lambda w: w @ jnp.ones(3)), jnp.ones(2)


def takes_args(n, scale=1.0):
    return setup()


def no_rules():
    return (lambda w: jnp.sum(jnp.tanh(w))), jnp.ones(2)


number = 4
'''


@pytest.fixture
def target(tmp_path, monkeypatch):
    monkeypatch.setenv("FUNCGRAD_COMPILATION_CACHE", "0")
    path = tmp_path / "my_model.py"
    path.write_text(TARGET)
    return path


@pytest.mark.slow
def test_audit_of_a_correct_target_prints_the_table_and_exits_0(target, capsys):
    assert cli.main(["verify", "--audit", f"{target}:setup"]) == 0
    out = capsys.readouterr().out
    assert "audit: ok (ok) — 2 custom rule(s)" in out
    assert "cube" in out and "custom_vjp" in out and "swish" in out and "custom_jvp" in out
    assert "all 2 custom rule(s) passed" in out


@pytest.mark.slow
def test_audit_of_a_planted_wrong_rule_exits_1_and_names_it(target, capsys):
    assert cli.main(["verify", "--audit", f"{target}:planted", "--seed", "3", "--max-calls", "2"]) == 1
    out = capsys.readouterr().out
    assert "failing: swish (autodiff_wrong at input [0, 1])" in out
    assert "1 of 2 custom rule(s) FAILED: swish" in out

    assert cli.main(["verify", "--audit", f"{target}:planted", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["verdict"] == "autodiff_wrong" and doc["target"] == f"{target}:planted"
    rows = {r["rule"]: r for r in doc["rows"]}
    assert rows["swish"]["verdict"] == "autodiff_wrong" and rows["swish"]["worst_index"] == [0, 1]
    assert rows["cube"]["ok"] is True and rows["cube"]["kind"] == "custom_vjp"
    assert doc["environment"]["max_calls"] == 8

    # (h80: the failing audit's note named exclude=, which the CLI did not take)
    assert "funcgrad verify --audit takes --exclude" in " ".join(doc["notes"])
    assert cli.main(["verify", "--audit", f"{target}:planted", "--exclude", "swish", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["environment"]["exclude"] == ["swish"]


@pytest.mark.parametrize("package", [False, True])
def test_audit_of_a_module_target(target, capsys, monkeypatch, package):
    monkeypatch.chdir(target.parent)  # package.module:FUNCTION is imported from the working directory
    name = "my_model"
    if package:  # a package is a folder too: imported, not refused as a folder (h86)
        name = "my_pkg"
        (target.parent / name).mkdir()
        (target.parent / name / "__init__.py").write_text(TARGET)
    try:
        assert cli.main(["verify", "--audit", f"{name}:setup", "--json"]) == 0
    finally:
        sys.modules.pop(name, None)
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and {r["rule"] for r in doc["rows"]} == {"cube", "swish"}


@pytest.mark.parametrize(("spec", "message"), [
    ("{t}", "--audit expects path/to/file.py:FUNCTION or package.module:FUNCTION; got"),
    ("{t}:", "--audit expects path/to/file.py:FUNCTION"),
    ("{d}/missing.py:setup", "no such file"),
    ("{t}:nope", "defines no 'nope'"),
    ("{t}:number", "'number' is not a function (int 4)"),
    ("{t}:not_a_tuple", "not_a_tuple() must return a tuple (fn, params, *args); it returned int 3"),
    ("{t}:one_element", "one_element() must return a tuple (fn, params, *args); it returned a tuple of 1"),
    ("{t}:not_callable", "its first element is float32[2], not callable"),
    ("no_such_module_here:setup", "no module named 'no_such_module_here'"),
    # (h80: a traceback, then the line; importlib's traceback; "no such file"; exit 0 for nothing audited)
    ("{t}:takes_args", "takes_args() takes argument(s) n without defaults; funcgrad calls it with none"),
    (".:setup", "'.' is a folder; give the Python file in it"),
    (".my_model:setup", "'.my_model' is a relative module name"),
    ("{d}:setup", "is a folder; give the Python file in it"),
    ("{t}:no_rules", "no custom rule to check: the function calls none defined outside JAX and the frameworks; "
                     "nothing was audited"),
])
def test_audit_of_a_bad_target_exits_2_with_one_line(target, capsys, spec, message):
    assert cli.main(["verify", "--audit", spec.format(t=target, d=target.parent)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("funcgrad verify: ") and message in lines[0], captured.err


def test_audit_of_a_target_that_raises_shows_where_and_exits_2(target, capsys):
    assert cli.main(["verify", "--audit", f"{target}:raises"]) == 2
    err = capsys.readouterr().err
    assert "RuntimeError: the data folder is missing" in err  # the user's traceback
    last = err.strip().splitlines()[-1]
    assert last == f"funcgrad verify: --audit {target}:raises: loading or calling it raised RuntimeError"
    assert cli.main(["verify", "--audit", f"{target}:fails_to_trace"]) == 2
    assert "the function failed to trace (TypeError)" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["setup", "file", "fn"])
def test_audit_of_a_target_that_exits_is_not_a_pass(target, capsys, where):
    # A file ending in sys.exit(0) (a script) audited nothing, silently, with status 0: a CI job read that as a pass.
    if where == "file":
        target.write_text(target.read_text() + "\nsys.exit(0)\n")
    name = {"setup": "exits", "file": "setup", "fn": "exits_in_fn"}[where]
    assert cli.main(["verify", "--audit", f"{target}:{name}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "SystemExit: 0" in captured.err and "nothing was audited" in captured.err


def test_audit_options_that_do_not_combine(target, capsys):
    assert cli.main(["verify", "--max-calls", "2", "--only", "rule relu"]) == 2
    assert "--max-calls applies to --audit only" in capsys.readouterr().err
    assert cli.main(["verify", "--exclude", "swish", "--only", "rule relu"]) == 2
    assert "--exclude applies to --audit only" in capsys.readouterr().err
    assert cli.main(["verify", "--audit", f"{target}:setup", "--only", "relu"]) == 2
    assert "cannot be combined with --audit" in capsys.readouterr().err
    assert cli.main(["verify", "--audit", f"{target}:setup", "--max-calls", "0"]) == 2
    assert "--max-calls must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", "x"])
def test_verify_seed_must_be_a_non_negative_int(seed, capsys):
    try:
        status = cli.main(["verify", f"--seed={seed}", "--only", "rule relu"])
    except SystemExit as e:  # argparse's usage error
        status = e.code
    assert status == 2
    assert "--seed" in capsys.readouterr().err
