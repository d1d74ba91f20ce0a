"""Run folders as a hostile or careless user meets them: two writers, foreign folders, failed and forged
resumes, damaged files, resource bombs. Each failure must be one line on stderr, a non-zero exit, no
traceback, and no change to any file (compared byte for byte)."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_python, same_training_state

from funcgrad import checkpoint
from funcgrad.cli import _files as files
from funcgrad.cli import _rundir as rundir
from funcgrad.cli import main

SMALL = ["--set", "train.epochs=50", "--set", "train.fuse=10", "--set", "train.checkpoint_every=10",
         "--set", "train.log_every=5", "--set", "train.verify=false"]


@pytest.fixture(autouse=True)
def no_cache(monkeypatch):
    monkeypatch.setenv("FUNCGRAD_COMPILATION_CACHE", "0")


def cli(capsys, *args):
    """``funcgrad args...`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(folder):
    """Every entry of a folder (hidden ones too) with its bytes and mode: what 'nothing changed' compares."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            out[p.name] = ("link", os.readlink(p))
        elif p.is_file():
            out[p.name] = (p.read_bytes(), p.stat().st_mode)
        else:
            out[p.name] = ("special", p.stat().st_mode)
    return out


def assert_one_line_error(code, err, *needles):
    assert code != 0, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    for n in needles:
        assert n in err, err


def assert_resume_and_evaluate_refuse(capsys, run, *needles):
    """Both a resume and an evaluate of ``run`` are one-line errors with ``needles``, and change nothing."""
    before = snapshot(run)
    for args in (["train", "--out", run, "--resume", "--set", "train.epochs=60"], ["evaluate", "--run", run]):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, *needles)
    assert snapshot(run) == before


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 50-step spiral run (checkpoints every 10 steps, a metrics line every 5)."""
    out = tmp_path_factory.mktemp("base") / "run"
    os.environ.setdefault("FUNCGRAD_COMPILATION_CACHE", "0")
    assert main(["train", "--out", str(out), *SMALL]) == 0
    return out


@pytest.fixture
def run(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base, out, symlinks=True)
    return out


def like(run):
    """A template train state of the base run's shape (to write forged checkpoints)."""
    import funcgrad as fg
    from funcgrad import config

    setup = config.build(config.from_dict(json.loads((run / "config.json").read_text())))
    return fg.train.init(setup.params, setup.optimizer, jax.random.key(0))


# ----------------------------------------------------------------------------------------------------------
# One writer at a time; nothing of the user's overwritten


@pytest.mark.slow
def test_a_second_writer_is_refused_with_the_pid_of_the_first(tmp_path):
    out = tmp_path / "shared"
    env = dict(os.environ, PYTHONUNBUFFERED="1", FUNCGRAD_COMPILATION_CACHE="0")
    first = subprocess.Popen([sys.executable, "-m", "funcgrad", "train", "--out", str(out),
                              "--set", "train.epochs=400000", "--set", "train.fuse=200",
                              "--set", "train.checkpoint_every=200", "--set", "train.verify=false"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.npz").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None and (out / "checkpoint.npz").exists()
        config_before = (out / "config.json").read_bytes()
        second = run_python(["-m", "funcgrad", "train", "--out", str(out), "--set", "optimizer.learning_rate=0.01",
                             "--set", "train.epochs=10"], check=False)
        assert_one_line_error(second.returncode, second.stderr, f"PID {first.pid}", "in use")
        assert (out / "config.json").read_bytes() == config_before  # not a mixed folder
        resumed = run_python(["-m", "funcgrad", "train", "--out", str(out), "--resume", "--set", "train.epochs=400001"],
                             check=False)
        assert_one_line_error(resumed.returncode, resumed.stderr, f"PID {first.pid}")
        reader = run_python(["-m", "funcgrad", "evaluate", "--run", str(out)])
        assert f"PID {first.pid}" in reader.stdout and "latest checkpoint" in reader.stdout
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 leaves no stale lock: the OS released it with the process.
    step = checkpoint.metadata((out / "checkpoint.npz").read_bytes())["step"]
    done = run_python(["-m", "funcgrad", "train", "--out", str(out), "--resume", "--set", f"train.epochs={step}"])
    assert f"resume from step {step}" in done.stdout and (out / "summary.json").exists()


def test_a_folder_that_is_not_a_run_is_never_written(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in (("config.json", '{"mine": 1}'), ("summary.json", "{}"), ("curves.png", "png"),
                       ("notes.txt", "notes")):
        (out / name).write_text(text)
    before = snapshot(out)
    code, _, err = cli(capsys, "train", "--out", out, *SMALL)
    assert_one_line_error(code, err, "not a funcgrad run", "notes.txt", "nothing of it is changed")
    code, _, err = cli(capsys, "train", "--out", out, "--resume", *SMALL)
    assert_one_line_error(code, err, "not a funcgrad run")
    assert snapshot(out) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = cli(capsys, "train", "--out", afile, *SMALL)
    assert_one_line_error(code, err, "is not a folder")
    assert afile.read_text() == "x"


def test_an_out_name_too_long_for_the_file_system_is_a_usage_error(capsys, tmp_path):
    # (a parent that exists: stat() itself then fails with ENAMETOOLONG, not only mkdir)
    code, _, err = cli(capsys, "train", "--out", tmp_path / ("x" * 300), *SMALL)
    assert code == 2
    assert_one_line_error(code, err, "--out", "File name too long")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_empty_folder_and_a_new_one_are_fine_and_a_failed_start_leaves_no_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert cli(capsys, "train", "--out", tmp_path / "empty", *SMALL)[0] == 0
    assert json.loads((tmp_path / "empty" / "run.json").read_text())["format"] == "funcgrad-run-1"
    code, _, err = cli(capsys, "train", "--out", tmp_path / "new", *SMALL, "--set", "loss.l2={'dens1/W' = 5e-4}")
    assert_one_line_error(code, err, "loss.l2.dens1/W", "matches no parameter")
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------------------
# Resume: from the run's own configuration, validated before anything is written


@pytest.mark.slow
def test_resume_continues_the_runs_own_configuration(capsys, tmp_path):
    a, whole = tmp_path / "a", tmp_path / "whole"
    lr = ["--set", "optimizer.learning_rate=0.01"]
    assert cli(capsys, "train", "--out", a, *SMALL, *lr, "--set", "train.epochs=20")[0] == 0
    code, out, _ = cli(capsys, "train", "--out", a, "--resume", "--set", "train.epochs=50")
    assert code == 0 and "change train.epochs: 20 → 50" in out and "lr 0.01" in out
    assert json.loads((a / "config.json").read_text())["optimizer"]["learning_rate"] == 0.01
    assert json.loads((a / "summary.json").read_text())["steps"] == 50
    # Bit for bit where an uninterrupted run with the same settings ends.
    assert cli(capsys, "train", "--out", whole, *SMALL, *lr)[0] == 0
    assert same_training_state(a / "checkpoint.npz", whole / "checkpoint.npz")
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    whole_rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    # The 20-step run logged its end: a training row at step 19 and a validation row at step 20; the row after
    # them sums a window of 1 step (20) where the uninterrupted run's sums 5 (16..20). Everything else is equal.
    extra = [r for r in rows if (r["step"], r["split"]) in ((19, "train"), (20, "validation"))]
    assert len(extra) == 2
    rest = [r for r in rows if r not in extra]
    assert [r["step"] for r in rest] == [r["step"] for r in whole_rows]
    def points(row):
        return {k: v for k, v in row.items() if not k.endswith(("_mean", "_min", "_max", "window"))}

    for r, w in zip(rest, whole_rows, strict=True):
        if r["step"] == 20:
            assert r["window"] == 1 and w["window"] == 5
            assert points(r) == points(w)
        else:
            assert r == w


@pytest.mark.slow
def test_resume_with_config_must_match_and_only_some_keys_may_change(capsys, run):
    before = snapshot(run)
    spiral = ROOT / "configs" / "spiral.toml"
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--config", spiral)
    assert_one_line_error(code, err, "does not match the run", "train.epochs: run has 50, now 10001")
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "model.sizes=[32, 3]")
    assert_one_line_error(code, err, "model.sizes: run has [64, 3], now [32, 3]", "cannot change")
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=20")
    assert_one_line_error(code, err, "makes 20 steps", "already at step 50")
    assert snapshot(run) == before
    code, out, _ = cli(capsys, "train", "--out", run, "--resume", "--config", spiral, *SMALL,
                       "--set", "train.epochs=60")
    assert code == 0 and "resume from step 50" in out


def test_a_complete_run_says_so_and_keeps_everything(capsys, run):
    before = snapshot(run)
    code, out, err = cli(capsys, "train", "--out", run, "--resume")
    assert code == 0 and err == ""
    assert "is complete: 50 of 50 steps" in out and "--set train.epochs=N" in out and "nothing was changed" in out
    assert snapshot(run) == before  # summary.json keeps the original wall time


def write_checkpoint(run, state, meta):
    (run / "checkpoint.npz").write_bytes(checkpoint.to_bytes(state, meta))


@pytest.mark.parametrize("forged, message", [
    (-5, "its step is -5, below 1"),
    (50.0, "its step is 50.0, not a whole number"),
    (2**31 - 1, "the optimizer has made 50 updates"),
    (20, "the optimizer has made 50 updates"),
])
def test_a_forged_step_is_refused(capsys, run, forged, message):
    template = like(run)
    state, meta = checkpoint.from_bytes((run / "checkpoint.npz").read_bytes(), template), \
        checkpoint.metadata((run / "checkpoint.npz").read_bytes())
    write_checkpoint(run, state._replace(step=jnp.asarray(forged, jnp.int32)), {**meta, "step": forged})
    before = snapshot(run)
    for args in (["train", "--out", run, "--resume", "--set", "train.epochs=100"], ["evaluate", "--run", run]):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, message)
    assert snapshot(run) == before


def test_a_checkpoint_that_logged_past_its_step_is_refused(capsys, run):
    data = (run / "checkpoint.npz").read_bytes()
    state = checkpoint.from_bytes(data, like(run))
    meta = checkpoint.metadata(data)
    assert meta["last_logged"] == 49
    metrics = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics.splitlines()[:3]))
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert_one_line_error(code, err, "metrics.jsonl ends at step 10", "after step 49 was logged")
    (run / "metrics.jsonl").write_text(metrics)
    write_checkpoint(run, state, {**meta, "last_logged": 50})
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert_one_line_error(code, err, "logged step 50 before being written at step 50")


@pytest.mark.parametrize("edit", ["seed", "learning_rate"])
@pytest.mark.slow
def test_a_config_json_edited_by_hand_no_longer_matches_its_checkpoint(capsys, run, edit):
    # Another seed draws other data: evaluate reported "the run's validation data (as in summary.json)" on data
    # the run never saw, and a resume trained on it. A learning rate is a setting --resume may change.
    cfg = json.loads((run / "config.json").read_text())
    if edit == "seed":
        cfg["seed"] = cfg["seed"] + 1
    else:
        cfg["optimizer"]["learning_rate"] = cfg["optimizer"]["learning_rate"] / 2
    (run / "config.json").write_text(json.dumps(cfg))
    before = snapshot(run)
    for args in (["evaluate", "--run", run], ["train", "--out", run, "--resume", "--set", "train.epochs=60"]):
        code, _, err = cli(capsys, *args)
        if edit == "seed":
            assert_one_line_error(code, err, "written by a run with other settings than", "config.json edited?")
        else:
            assert code == 0, err
    if edit == "seed":
        assert snapshot(run) == before


@pytest.mark.slow
def test_a_ctrl_c_that_python_only_printed_as_ignored_still_stops_training(capsys, tmp_path, monkeypatch):
    # Ctrl-C landing in JAX's garbage-collection callback is printed as "Exception ignored" and swallowed: training
    # went on to its last step and exited 0. The flag the handler sets stops it at the next chunk.
    from funcgrad.cli import _train

    chunk = _train._Loop._chunk

    def swallowed(self, state, m):
        _train._INTERRUPTED.set()  # (what the handler records before Python drops its KeyboardInterrupt)
        return chunk(self, state, m)

    monkeypatch.setattr(_train._Loop, "_chunk", swallowed)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--out", out, *SMALL)
    assert code == 130 and "interrupted" in err, err
    monkeypatch.setattr(_train._Loop, "_chunk", chunk)
    code, _, err = cli(capsys, "train", "--out", out, "--resume")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 50


def test_a_checkpoint_written_by_another_config_is_refused(capsys, run):
    # spiral_l2's checkpoint has spiral's shapes: copied into a spiral run, it was continued with spiral's rate and
    # no L2 (and evaluated) as if it were that run's own.
    data = (run / "checkpoint.npz").read_bytes()
    state, meta = checkpoint.from_bytes(data, like(run)), checkpoint.metadata(data)
    assert meta["config"] == "spiral"
    write_checkpoint(run, state, {**meta, "config": "spiral_l2"})
    assert_resume_and_evaluate_refuse(capsys, run, "written by a run of config 'spiral_l2'", "this run's config is 'spiral'")


def test_a_sibling_runs_checkpoint_copied_in_is_refused_but_a_whole_copied_folder_continues(capsys, run):
    # A run of the same config and settings, trained elsewhere (another history: other steps logged, another data
    # order after a resume), has a checkpoint of the same shapes and the same settings digest. Each run folder's
    # marker names the run (drawn once, when the folder became a run), and each checkpoint carries that name.
    data = (run / "checkpoint.npz").read_bytes()
    state, meta = checkpoint.from_bytes(data, like(run)), checkpoint.metadata(data)
    own = json.loads((run / rundir.MARKER).read_text())["run"]
    assert meta["run"] == own and len(own) == 32  # (the fixture's folder is a whole copy of the base run's: its own)
    sibling = "0123456789abcdef" * 2
    write_checkpoint(run, state, {**meta, "run": sibling})
    assert_resume_and_evaluate_refuse(capsys, run, f"written by another run (run {sibling})", f"(run {own})",
                                      "copy the whole run folder")
    write_checkpoint(run, state, meta)  # its own again: the resume goes ahead
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert code == 0, err


@pytest.mark.parametrize("strip", ["delete", "not a string"])
def test_a_checkpoint_whose_identity_was_stripped_is_refused_in_a_named_run(capsys, run, strip):
    # Another run's checkpoint with its run, config and settings names deleted (or replaced by numbers) was
    # continued and evaluated as this run's: each check ran only where its name was a string.
    data = (run / "checkpoint.npz").read_bytes()
    state, meta = checkpoint.from_bytes(data, like(run)), checkpoint.metadata(data)
    keys = ("run", "config", "settings")
    stripped = {k: v for k, v in meta.items() if k not in keys} if strip == "delete" else {**meta, **dict.fromkeys(keys, 0)}
    write_checkpoint(run, state, stripped)
    assert_resume_and_evaluate_refuse(capsys, run, "checkpoint.npz: its metadata does not name the run",
                                      "'run' or 'config' or 'settings'", "run.json names this run")
    # One name missing is enough
    write_checkpoint(run, state, {k: v for k, v in meta.items() if k != "settings"})
    code, _, err = cli(capsys, "evaluate", "--run", run)
    assert_one_line_error(code, err, "no 'settings' string there")
    # A folder from before run names (its marker names none) continues a checkpoint that names none, as such
    # folders' own are, but not one that names a run
    marker = json.loads((run / rundir.MARKER).read_text())
    del marker["run"]
    (run / rundir.MARKER).write_text(json.dumps(marker))
    code, _, err = cli(capsys, "evaluate", "--run", run)
    assert_one_line_error(code, err, f"written by a run named {meta['run']!r}", "run.json names no run")
    write_checkpoint(run, state, {k: v for k, v in meta.items() if k != "run"})
    code, _, err = cli(capsys, "evaluate", "--run", run)
    assert code == 0, err


@pytest.mark.parametrize("value", [12345, "", None, ["a"]])
def test_a_run_name_that_is_not_a_string_is_a_damaged_marker(capsys, run, value):
    # A run.json whose "run" was not a string read as a folder from before run names: the sibling-run check was off.
    marker = json.loads((run / rundir.MARKER).read_text())
    (run / rundir.MARKER).write_text(json.dumps({**marker, "run": value}))
    assert_resume_and_evaluate_refuse(capsys, run, "run.json: 'run' is the run's name", "the file is damaged")


def test_a_run_file_that_cannot_be_read_says_why_not_that_it_is_not_json(capsys, run):
    (run / rundir.MARKER).unlink()
    (run / rundir.MARKER).mkdir()
    code, _, err = cli(capsys, "evaluate", "--run", run)
    assert_one_line_error(code, err, "run.json", "not a regular file")
    assert "not valid JSON" not in err


def test_a_new_run_folder_draws_its_own_run_name(capsys, tmp_path):
    names = set()
    for k in range(2):
        code, _, err = cli(capsys, "train", "--out", tmp_path / f"r{k}", "--set", "train.epochs=10", "--set",
                           "train.checkpoint_every=10", "--set", "train.verify=false", "--quiet")
        assert code == 0, err
        own = json.loads((tmp_path / f"r{k}" / rundir.MARKER).read_text())["run"]
        assert checkpoint.metadata((tmp_path / f"r{k}" / "checkpoint.npz").read_bytes())["run"] == own
        names.add(own)
    assert len(names) == 2


# ----------------------------------------------------------------------------------------------------------
# Damaged or hostile files


def rewrite(path, edit):
    """Rewrites an .npz: ``edit(members)`` changes the dict of member name -> bytes."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    edit(members)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for n, b in members.items():
            z.writestr(n, b)
    path.write_bytes(buf.getvalue())


def npy(arr, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def edit_header(change):
    def edit(members):
        header = json.loads(np.load(io.BytesIO(members["__funcgrad__.npy"])).tobytes())
        header = change(header)
        members["__funcgrad__.npy"] = npy(np.frombuffer(json.dumps(header).encode(), np.uint8))
    return edit


def bad_crc(path):
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("leaf0.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.file_size - 1] ^= 0xFF  # the last byte of the first leaf's data
    path.write_bytes(bytes(data))


def unknown_dtype(h):
    h["leaves"][0]["dtype"] = "float12"
    return h


def leaf_as_raw_bytes_of_bad_length(members):
    header = json.loads(np.load(io.BytesIO(members["__funcgrad__.npy"])).tobytes())
    header["leaves"][0]["dtype"] = "bfloat16"
    members["__funcgrad__.npy"] = npy(np.frombuffer(json.dumps(header).encode(), np.uint8))
    members["leaf0.npy"] = npy(np.zeros(7, np.uint8))


DAMAGE = {
    "zero bytes": (lambda p: p.write_bytes(b""), "the file is empty"),
    "broken CRC": (bad_crc, "cannot be read (BadZipFile"),
    "unknown dtype": (lambda p: rewrite(p, edit_header(unknown_dtype)), "unknown dtype 'float12'"),
    "header is a list": (lambda p: rewrite(p, edit_header(lambda h: [h])), "header is a JSON list"),
    "header lacks leaves": (lambda p: rewrite(p, edit_header(lambda h: {k: v for k, v in h.items() if k != "leaves"})),
                            "lacks the list of leaves"),
    "a directory": (lambda p: (p.unlink(), p.mkdir()), "is a folder, not a regular file"),
    "pickled object leaf": (lambda p: rewrite(p, lambda m: m.__setitem__("leaf0.npy", npy(np.array([{"x": 1}], object),
                                                                                           allow_pickle=True))),
                            "Object arrays cannot be loaded"),
    "raw bytes of no shape": (lambda p: rewrite(p, leaf_as_raw_bytes_of_bad_length),
                              # (the header's dtype is not the model's: refused before any leaf is read)
                              "stored bfloat16[2, 64], expected float32[2, 64]"),
    "a FIFO": (lambda p: (p.unlink(), os.mkfifo(p)), "is a FIFO (named pipe), not a regular file"),
    "symlink to /dev/zero": (lambda p: (p.unlink(), p.symlink_to("/dev/zero")), "is a character device"),
    "dangling symlink": (lambda p: (p.unlink(), p.symlink_to(p.parent / "gone.npz")),
                         "a symbolic link to", "gone.npz', which does not exist"),
    "far too large": (lambda p: p.write_bytes(p.read_bytes() + b"\0" * (4 << 20)), "more than the"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_and_changes_nothing(capsys, run, case):
    damage, *message = DAMAGE[case]
    damage(run / "checkpoint.npz")
    before = snapshot(run)
    for args in (["train", "--out", run, "--resume", "--set", "train.epochs=100"], ["evaluate", "--run", run]):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, "checkpoint.npz", *message)
    assert snapshot(run) == before


def test_damaged_run_files_and_configs(capsys, run, tmp_path):
    config = (run / "config.json").read_text()
    (run / "config.json").write_text("[1, 2]")
    before = snapshot(run)
    for args in (["train", "--out", run, "--resume", "--set", "train.epochs=100"], ["evaluate", "--run", run]):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, "config.json: expected a JSON object", "got a JSON list")
    assert snapshot(run) == before
    (run / "config.json").write_text(config)

    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    before = snapshot(run)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=100")
    assert_one_line_error(code, err, "metrics.jsonl: line 3 is not JSON")
    assert snapshot(run) == before
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    (run / "metrics.jsonl").chmod(0o444)
    before = snapshot(run)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=100")
    assert_one_line_error(code, err, "read-only", "metrics.jsonl", "nothing was changed")
    assert snapshot(run) == before

    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)))
    code, _, err = cli(capsys, "train", "--config", binary, "--out", tmp_path / "b")
    assert_one_line_error(code, err, "not a text file")
    code, _, err = cli(capsys, "train", "--config", "/dev/zero", "--out", tmp_path / "b")
    assert_one_line_error(code, err, "not a regular file")
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_stale_temporary_files_of_killed_processes_are_removed(capsys, run):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale, alive = run / f".checkpoint.npz.tmp-{int(dead.stdout)}", run / f".metrics.jsonl.tmp-{os.getppid()}"
    stale.write_bytes(b"half a checkpoint")
    alive.write_bytes(b"a live writer's")
    code, out, _ = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert code == 0 and stale.name in out
    assert not stale.exists() and alive.exists()


# ----------------------------------------------------------------------------------------------------------
# Non-finite parameters are never saved, resumed or evaluated


def test_non_finite_parameters_are_refused_naming_the_leaf(capsys, run):
    data = (run / "checkpoint.npz").read_bytes()
    state = checkpoint.from_bytes(data, like(run))
    params = jax.tree.map(lambda a: a, state.params)
    params["dense2"]["W"] = params["dense2"]["W"].at[3, 1].set(jnp.nan)
    write_checkpoint(run, state._replace(params=params), checkpoint.metadata(data))
    before = snapshot(run)
    for args in (["train", "--out", run, "--resume", "--set", "train.epochs=100"], ["evaluate", "--run", run]):
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, "non-finite", "params['dense2']['W'][3, 1] = nan")
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_diverging_run_keeps_only_a_checkpoint_with_a_finite_loss(capsys, tmp_path):
    out = tmp_path / "div"
    code, _, err = cli(capsys, "train", "--out", out, "--config", ROOT / "configs" / "sine.toml", "--set",
                       "optimizer.kind=sgd", "--set", "optimizer.learning_rate=3.0", "--set", "train.fuse=1",
                       "--set", "train.checkpoint_every=1", "--set", "train.log_every=1", "--set", "train.epochs=300",
                       "--set", "train.verify=false")
    assert code == 1 and "training stopped" in err and "so it is not saved" in err
    step = checkpoint.metadata((out / "checkpoint.npz").read_bytes())["step"]
    assert f"The last good checkpoint is step {step} " in err
    # The saved parameters' own loss (on the training data) is finite, however large; the next step's is not.
    code, text, _ = cli(capsys, "evaluate", "--run", out, "--seed", "0", "--json")
    loss = json.loads(text)["metrics"]["loss"]
    assert code == 0 and np.isfinite(loss) and loss > 1e6


# ----------------------------------------------------------------------------------------------------------
# Resource bombs and what the header says


def test_fuse_beyond_the_steps_allocates_only_the_steps(capsys, tmp_path):
    from funcgrad import train

    assert train.chunk_size(10**9, 50) == 50 and train.chunk_size(10**9, 10**9) == train.MAX_FUSE
    with pytest.raises(ValueError, match="fuse must be an int >= 1"):
        train.chunk_size(0, 10)
    code, out, _ = cli(capsys, "train", "--out", tmp_path / "f", *SMALL, "--set", "train.fuse=1000000000")
    assert code == 0
    assert checkpoint.metadata((tmp_path / "f" / "checkpoint.npz").read_bytes())["step"] == 50


def test_a_model_too_large_for_memory_is_refused_before_allocation(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--out", tmp_path / "big", "--set", "model.sizes=[100000000, 3]")
    assert_one_line_error(code, err, "needs about", "600000003 parameters", "is available")
    assert not (tmp_path / "big").exists()
    from funcgrad import config

    est = config.memory_estimate(config.loads("", overrides=["model.sizes=[100000000, 3]", "train.verify=false"]))
    assert est.parameters == 2 * 10**8 + 10**8 + 3 * 10**8 + 3 and est.total > 100e9


def test_the_header_says_what_minibatches_leave_out(capsys, tmp_path):
    code, out, _ = cli(capsys, "train", "--out", tmp_path / "mb", *SMALL, "--set", "train.batch_size=32",
                       "--set", "train.epochs=2")
    assert code == 0 and "batch 32 (9 per epoch; the last 12 of 300 samples" in out and "per minibatch" in out


def test_evaluate_labels_what_it_evaluates(capsys, run):
    summary = json.loads((run / "summary.json").read_text())
    code, text, _ = cli(capsys, "evaluate", "--run", run, "--json")
    default = json.loads(text)
    assert default["data"] == "validation" and default["step"] == 50
    assert default["metrics"]["loss"] == pytest.approx(summary["validation"]["loss"], rel=1e-6)
    code, text, _ = cli(capsys, "evaluate", "--run", run, "--seed", "0")
    assert "the training data" in text and "not fresh data" in text
    code, text, _ = cli(capsys, "evaluate", "--run", run, "--seed", "0", "--json")
    assert json.loads(text)["metrics"]["loss"] == pytest.approx(summary["train"]["loss"], rel=1e-6)
    code, text, _ = cli(capsys, "evaluate", "--run", run, "--seed", "7")
    assert "fresh spiral data (300, 2) drawn with seed 7" in text


@pytest.mark.slow
def test_kill_9_mid_write_leaves_a_temporary_that_the_next_train_removes(run):
    # A process killed between writing the temporary checkpoint and renaming it over the real one.
    killer = ("import os, signal, sys\n"
              "from pathlib import Path\n"
              "from funcgrad.cli import _files\n"
              "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
              "_files.atomic_write(Path(sys.argv[1]) / 'checkpoint.npz', b'half')\n")
    proc = subprocess.run([sys.executable, "-c", killer, str(run)], cwd=ROOT, capture_output=True, check=False)
    assert proc.returncode == -signal.SIGKILL
    left = list(run.glob(".checkpoint.npz.tmp-*"))
    assert len(left) == 1 and left[0].read_bytes() == b"half"
    before = (run / "checkpoint.npz").read_bytes()
    checkpoint.from_bytes(before, like(run))  # the real checkpoint is whole
    done = run_python(["-m", "funcgrad", "train", "--out", str(run), "--resume", "--set", "train.epochs=60"],
                      env={"FUNCGRAD_COMPILATION_CACHE": "0"})
    assert left[0].name in done.stdout and not left[0].exists()


@pytest.mark.slow
def test_special_files_in_a_real_process_never_hang(run):
    (run / "checkpoint.npz").unlink()
    os.mkfifo(run / "checkpoint.npz")
    for args in (["evaluate", "--run", str(run)], ["train", "--out", str(run), "--resume", "--set", "train.epochs=60"]):
        proc = run_python(["-m", "funcgrad", *args], check=False, timeout=60, env={"FUNCGRAD_COMPILATION_CACHE": "0"})
        assert_one_line_error(proc.returncode, proc.stderr, "is a FIFO (named pipe), not a regular file")


# ----------------------------------------------------------------------------------------------------------
# From review: reading never writes; the lock and temporaries are only ever funcgrad's own files


@pytest.mark.slow
def test_a_cut_last_metrics_line_is_repaired_only_by_a_resume_that_goes_ahead(capsys, run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5')  # a line cut short by kill -9
    (run / "summary.json").chmod(0o444)
    before = snapshot(run)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert_one_line_error(code, err, "read-only", "summary.json")
    assert snapshot(run) == before
    (run / "summary.json").chmod(0o644)
    (run / "metrics.jsonl").chmod(0o444)  # read-only and cut: still refused, still unchanged
    before = snapshot(run)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert_one_line_error(code, err, "read-only", "metrics.jsonl")
    assert snapshot(run) == before
    (run / "metrics.jsonl").chmod(0o644)
    assert cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")[0] == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(0, 50, 5)) + [49, 50, 55, 59]
    assert [r["step"] for r in rows if r["split"] == "validation"] == [50, 60]  # each run's last step


def test_a_symlinked_lock_file_writes_nothing_through_it(capsys, run, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (run / ".funcgrad.lock").symlink_to(victim)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert_one_line_error(code, err, ".funcgrad.lock")
    assert victim.read_text() == "precious"


def test_only_funcgrads_own_temporaries_are_its_own(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / ".notes.tmp-4242424").write_text("the user's")
    code, _, err = cli(capsys, "train", "--out", out, *SMALL)
    assert_one_line_error(code, err, "not a funcgrad run", ".notes.tmp-4242424")
    assert (out / ".notes.tmp-4242424").read_text() == "the user's"


@pytest.mark.slow
def test_a_run_from_before_the_marker_is_recognised_by_its_checkpoint_header(capsys, run):
    (run / "run.json").unlink()
    data = (run / "checkpoint.npz").read_bytes()  # (such a run's checkpoints name no run either)
    meta = checkpoint.metadata(data)
    write_checkpoint(run, checkpoint.from_bytes(data, like(run)), {k: v for k, v in meta.items() if k != "run"})
    code, out, _ = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert code == 0 and "resume from step 50" in out and (run / "run.json").exists()


def test_config_mismatches_and_huge_numbers_are_one_line(capsys, run, tmp_path):
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "sizes": [32, 3]}}))
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert_one_line_error(code, err, "does not match the template", "expected float32[2, 32]")
    code, _, err = cli(capsys, "train", "--out", tmp_path / "h", *SMALL, "--set",
                       "optimizer.learning_rate=1180591620717411303424" + "0" * 300)
    assert_one_line_error(code, err, "optimizer.learning_rate: expected a finite number > 0.0")


def test_empty_option_values_are_errors_not_the_defaults(capsys, run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where --out "" used to train into: runs/<name>
    for args, option in ((["--config", ""], "--config"), (["--out", ""], "--out"),
                         (["--out", "", "--resume"], "--out")):
        code, _, err = cli(capsys, "train", *args, *SMALL)
        assert code == 2
        assert_one_line_error(code, err, f"funcgrad train: {option}: expected ", "got an empty string")
    code, _, err = cli(capsys, "evaluate", "--run", "")
    assert code == 2
    assert_one_line_error(code, err, "funcgrad evaluate: --run: expected a run folder, got an empty string")
    assert list(tmp_path.iterdir()) == [run]


def test_an_init_scale_that_overflows_float32_is_a_config_error_before_anything_is_written(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--out", tmp_path / "big", *SMALL, "--set", "model.init_scale=1e308")
    assert code == 2
    assert_one_line_error(code, err, "model.init_scale: expected a finite number > 0.0 and < 1000.0, got 1e+308")
    assert not (tmp_path / "big").exists()


@pytest.mark.slow
def test_data_path_for_drawn_data_is_refused_but_the_default_in_an_older_runs_config_is_not(capsys, run, tmp_path):
    code, _, err = cli(capsys, "train", "--out", tmp_path / "p", *SMALL, "--set", "data.path=/nonexistent")
    assert code == 2
    assert_one_line_error(code, err, "data.path: not a setting of data.kind 'spiral'")
    assert not (tmp_path / "p").exists()
    config = json.loads((run / "config.json").read_text())
    assert "path" not in config["data"]
    # funcgrad before the check wrote the default data.path for every kind: such a run evaluates and resumes
    (run / "config.json").write_text(json.dumps({**config, "data": {**config["data"], "path": "fashion_mnist_images"}}))
    assert cli(capsys, "evaluate", "--run", run)[0] == 0
    code, out, _ = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert code == 0 and "resume from step 50" in out
    assert "path" not in json.loads((run / "config.json").read_text())["data"]
    # any other path there was set by hand: checked like a config file's
    (run / "config.json").write_text(json.dumps({**config, "data": {**config["data"], "path": "elsewhere"}}))
    before = snapshot(run)
    code, _, err = cli(capsys, "evaluate", "--run", run)
    assert_one_line_error(code, err, "config.json: data.path: not a setting of data.kind 'spiral'")
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=70")
    assert_one_line_error(code, err, "config.json: data.path: not a setting of data.kind 'spiral'")
    assert snapshot(run) == before


def test_a_finished_read_only_run_is_still_told_complete(capsys, run):
    for p in run.iterdir():
        p.chmod(0o444)
    before = snapshot(run)
    code, out, _ = cli(capsys, "train", "--out", run, "--resume")
    assert code == 0 and "is complete" in out
    assert snapshot(run) == before
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert_one_line_error(code, err, "read-only")


def test_a_failed_start_removes_only_the_folders_it_created(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--out", tmp_path / "a" / "b" / "run", "--set", "model.sizes=[100000000, 3]")
    assert_one_line_error(code, err, "needs about")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sine_data_is_labelled_the_training_data_whatever_the_seed(capsys, tmp_path):
    out = tmp_path / "sine"
    assert cli(capsys, "train", "--out", out, "--config", ROOT / "configs" / "sine.toml", "--set", "train.epochs=2",
               "--set", "train.verify=false")[0] == 0
    for seed in ([], ["--seed", "5"]):
        code, text, _ = cli(capsys, "evaluate", "--run", out, *seed)
        assert code == 0 and "the training data" in text and "not fresh data" in text


# ----------------------------------------------------------------------------------------------------------
# Links, deep nesting and damaged summaries: one-line errors, nothing written through a link


def test_a_metrics_file_that_is_a_link_is_never_written_through(capsys, run, tmp_path):
    outside = tmp_path / "users_file.txt"
    outside.write_bytes((run / "metrics.jsonl").read_bytes())
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    before, config = outside.read_bytes(), (run / "config.json").read_bytes()
    code, _, err = cli(capsys, "train", "--resume", "--out", run, "--set", "train.epochs=60")
    assert_one_line_error(code, err, "metrics.jsonl", "symbolic link")
    assert outside.read_bytes() == before
    assert (run / "config.json").read_bytes() == config  # refused before anything is written
    with pytest.raises(files.FileError, match="never through a link"):
        files.append_lines(run / "metrics.jsonl", [{"step": 1}])
    assert outside.read_bytes() == before


def test_deeply_nested_run_files_and_configs_are_one_line_errors(capsys, run, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 50, "x": ' + deep + "}\n")
    code, _, err = cli(capsys, "train", "--resume", "--out", run, "--set", "train.epochs=60")
    assert_one_line_error(code, err, "metrics.jsonl", "nested too deeply")
    config = tmp_path / "deep.toml"
    config.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    code, _, err = cli(capsys, "train", "--config", config, "--out", tmp_path / "new")
    assert_one_line_error(code, err, "deep.toml", "nested too deeply")
    code, _, err = cli(capsys, "train", "--out", tmp_path / "new", "--set", "train.epochs=" + deep)
    assert_one_line_error(code, err, "nested too deeply")
    assert not (tmp_path / "new").exists()


def test_a_complete_run_whose_summary_is_damaged_is_a_one_line_error_with_json(capsys, run):
    (run / "summary.json").write_text("garbage")
    code, out, err = cli(capsys, "train", "--resume", "--out", run, "--json")
    assert code == 2 and "Traceback" not in err and "summary.json" in err and "not valid JSON" in err, err


def test_a_link_planted_at_a_temporary_name_is_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = tmp_path / "summary.json"
    (tmp_path / f".summary.json.tmp-{os.getpid()}").symlink_to(victim)  # the name this process writes through
    files.write_json(path, {"ok": 1})
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and json.loads(path.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "victim.txt"]


@pytest.mark.parametrize(("line", "needle"), [
    ('{"step": 20, "split": "train", "loss": "x"}', "'loss' = 'x', not a number"),
    ('{"step": 20, "split": "train", "accuracy": [1]}', "not a number"),
    ('{"step": 20, "split": "test", "loss": 1.0}', "split 'test'"),
    ('{"step": 1000000, "split": "train", "loss": 1.0}', "past the run's last step"),
])
def test_a_metrics_line_that_is_not_a_record_stops_a_resume_before_anything_is_written(capsys, run, line, needle):
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + line + "\n" + '{"step": 50}\n')
    before = snapshot(run)
    code, _, err = cli(capsys, "train", "--resume", "--out", run, "--set", "train.epochs=60")
    assert_one_line_error(code, err, "metrics.jsonl", needle)
    assert snapshot(run) == before


@pytest.mark.parametrize("mode", ["--json", "--quiet"])
@pytest.mark.slow
def test_a_changed_learning_rate_on_resume_keeps_stdout_as_asked(capsys, run, mode):
    # A training row past the checkpoint (left by a killed attempt) and a new learning rate: the file is set aside,
    # and saying so goes where the run's other messages go (stderr with --json, nowhere with --quiet).
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    late = {**[r for r in rows if r.get("split") == "train"][-1], "step": 55}
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + json.dumps(late) + "\n")
    code, out, err = cli(capsys, "train", "--resume", "--out", run, "--set", "train.epochs=60",
                         "--set", "optimizer.learning_rate=0.01", mode)
    assert code == 0, err
    if mode == "--json":
        json.loads(out)  # stdout is the summary alone
        assert "the optimizer changed" in err
    else:
        assert out == "" and "the optimizer changed" not in err


def test_a_lock_file_hard_linked_to_another_file_is_refused(tmp_path):
    from funcgrad.cli import _rundir

    outside = tmp_path / "notes.txt"
    outside.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    os.link(outside, folder / _rundir.LOCK)
    with pytest.raises(_rundir.RunFolderError, match="hard link"):
        _rundir.Lock(folder)
    assert outside.read_text() == "precious"


def test_integers_too_long_for_python_and_infinite_penalties_are_one_line_errors(capsys, run, tmp_path):
    code, _, err = cli(capsys, "train", "--out", tmp_path / "a", "--set", "train.epochs=" + "9" * 5000)
    assert_one_line_error(code, err, "--set value")
    code, _, err = cli(capsys, "train", "--out", tmp_path / "b", "--set", "loss.l2={'dense1/W' = inf}")
    assert_one_line_error(code, err, "expected a finite number >= 0")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (run / "metrics.jsonl").write_text('{"step": 1' + "0" * 5000 + ', "split": "train", "loss": 1.0}\n'
                                       + (run / "metrics.jsonl").read_text())
    code, _, err = cli(capsys, "train", "--resume", "--out", run, "--set", "train.epochs=60")
    assert_one_line_error(code, err, "metrics.jsonl", "line 1 is not JSON")
    with pytest.raises(SystemExit) as exit_:  # (argparse's usage error: exit status 2)
        cli(capsys, "evaluate", "--run", run, "--seed", "9" * 30)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--seed" in err and "below 2**63" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_an_orbax_folder_that_is_a_link_is_refused_before_anything_is_written(capsys, tmp_path):
    # orbax deletes old steps where it writes (max_to_keep): through a link, someone else's checkpoints went.
    pytest.importorskip("orbax.checkpoint")
    out, elsewhere = tmp_path / "run", tmp_path / "someone_elses_checkpoints"
    orbax = ["--set", "checkpoint.backend=orbax", "--set", "train.epochs=10", "--quiet"]
    assert cli(capsys, "train", "--out", out, *orbax)[0] == 0
    (out / "orbax").rename(elsewhere)
    (out / "orbax").symlink_to(elsewhere)
    before = snapshot(elsewhere)
    code, _, err = cli(capsys, "train", "--resume", "--out", out, *orbax[:2], "--set", "train.epochs=20")
    assert_one_line_error(code, err, "orbax", "symbolic link")
    assert snapshot(elsewhere) == before


@pytest.mark.slow
def test_a_run_killed_past_its_checkpoint_can_be_finished_at_that_checkpoint(capsys, run):
    # A killed run has logged past its last checkpoint (step 50 here, rows to 55): resuming with epochs that end
    # at the checkpoint was refused as "damaged". The rows past it are kept aside; the run finishes there.
    (run / "summary.json").unlink()
    config = json.loads((run / "config.json").read_text())
    config["train"]["epochs"] = 60  # the run as it was planned: killed after its checkpoint at step 50
    (run / "config.json").write_text(json.dumps(config))
    rows = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(rows + '{"step": 55, "split": "train", "loss": 1.0}\n')
    code, out, err = cli(capsys, "train", "--resume", "--out", run, "--set", "train.epochs=50")
    assert code == 0 and "metrics past step 50 are kept in" in out, err
    assert (run / "summary.json").exists() and (run / "metrics.jsonl").read_text() == rows
    assert any('"step": 55' in p.read_text() for p in run.iterdir() if p.name.startswith("metrics.jsonl."))


def test_a_lock_file_that_cannot_be_written_stops_a_resume_but_not_a_complete_run(capsys, run, monkeypatch):
    # The folder and the run's files can be written, but the lock file cannot be opened for writing (immutable, or
    # 0444 for another user): the resume used to go on unlocked, and two of them trained into one run at once.
    def unwritable(out):
        raise rundir.ReadOnlyFolder(f"cannot create the lock file {out / rundir.LOCK}: Operation not permitted")

    monkeypatch.setattr(rundir, "Lock", unwritable)
    code, out, _ = cli(capsys, "train", "--out", run, "--resume")
    assert code == 0 and "is complete" in out  # a finished run is still told so: nothing is written
    before = snapshot(run)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert_one_line_error(code, err, "cannot lock the run", ".funcgrad.lock", "nothing was changed")
    assert snapshot(run) == before


def test_a_run_whose_summary_is_of_a_shorter_run_is_not_complete(capsys, run):
    # Extended to 50 steps and killed after its last checkpoint but before summary.json: the summary still
    # describes the earlier run. The run was told complete with the old numbers; it is finished now.
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "steps": 40}))
    code, out, err = cli(capsys, "train", "--out", run, "--resume")
    assert code == 0 and "is complete" not in out, out + err
    assert json.loads((run / "summary.json").read_text())["steps"] == 50
    validation = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"validation"' in x]
    assert [r["step"] for r in validation].count(50) == 1  # (its final row is not written twice)


def test_a_run_shortened_to_its_checkpoint_drops_rows_it_did_not_take_and_writes_its_last(capsys, run):
    # Planned for 60 steps, killed after its checkpoint at step 50 (before its summary, and before the validation
    # row at 50 that the 60-step run does not write), with a training row of step 50 (index 50: the 51st step, not
    # in the checkpoint). Finished at 50, the run keeps no row of a step it did not take and has its last row.
    (run / "summary.json").unlink()
    config = json.loads((run / "config.json").read_text())
    config["train"]["epochs"] = 60
    (run / "config.json").write_text(json.dumps(config))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["split"] == "validation" and r["step"] == 50]
    assert len(final) == 1  # (what an uninterrupted 50-step run writes)
    killed = [r for r in rows if r is not final[0]] + [{"step": 50, "split": "train", "loss": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in killed))
    code, out, err = cli(capsys, "train", "--resume", "--out", run, "--set", "train.epochs=50")
    assert code == 0, err
    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in after if r["split"] == "train") == 49
    assert [r for r in after if r["split"] == "validation" and r["step"] == 50] == final


@pytest.mark.slow
def test_a_fresh_run_sets_aside_an_earlier_attempts_metrics_whatever_steps_they_reach(capsys, run):
    # An attempt killed before its first checkpoint had logged to step 300; a fresh 50-step run was refused
    # ("line 12 records step 110, past the run's last step 50; the file is damaged").
    (run / "checkpoint.npz").unlink()
    (run / "summary.json").unlink()
    earlier = (run / "metrics.jsonl").read_text() + '{"step": 300, "split": "train", "loss": 1.0}\n'
    (run / "metrics.jsonl").write_text(earlier)
    code, out, err = cli(capsys, "train", "--out", run, *SMALL)
    assert code == 0 and "kept as" in out, err
    assert any(p.read_text() == earlier for p in run.iterdir() if p.name.startswith("metrics.jsonl."))


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_tensorboard_path_that_is_a_file_or_a_link_is_refused_before_anything_is_written(capsys, run, tmp_path,
                                                                                          kind):
    pytest.importorskip("tensorboardX")
    board = run / "tensorboard"
    if kind == "file":
        board.write_text("not a folder")
    else:
        (tmp_path / "elsewhere").mkdir()
        board.symlink_to(tmp_path / "elsewhere")
    before = snapshot(run)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60",
                       "--set", "train.tensorboard=true")
    assert_one_line_error(code, err, "tensorboard", "not a folder" if kind == "file" else "symbolic link")
    assert snapshot(run) == before
    if kind == "link":
        assert not any((tmp_path / "elsewhere").iterdir())


@pytest.mark.slow
def test_an_orbax_step_folder_that_is_a_link_is_refused_before_anything_is_written(capsys, tmp_path):
    pytest.importorskip("orbax.checkpoint")
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    orbax = ["--set", "checkpoint.backend=orbax", "--set", "train.epochs=10", "--quiet"]
    assert cli(capsys, "train", "--out", out, *orbax)[0] == 0
    step = sorted(p for p in (out / "orbax").iterdir() if p.is_dir())[-1]
    step.rename(elsewhere)
    step.symlink_to(elsewhere)
    before = snapshot(elsewhere)
    code, _, err = cli(capsys, "train", "--resume", "--out", out, *orbax[:2], "--set", "train.epochs=20")
    assert_one_line_error(code, err, step.name, "symbolic link")
    assert snapshot(elsewhere) == before


def test_a_metrics_file_with_more_records_than_a_run_can_write_is_damaged(capsys, run):
    # 24 MB of {"step": 1} rows made a no-op resume take 0.7 GB (the bound was a 1 GiB floor): refused by count.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 1}\n' * 500)
    before = snapshot(run)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert_one_line_error(code, err, "metrics.jsonl", "records", "damaged")
    assert snapshot(run) == before
    assert files.metrics_bound(50) < 2**21  # (a 50-step run's file is bounded by its steps, not by 1 GiB)


def test_a_readers_probe_of_the_lock_does_not_turn_a_writer_away(tmp_path):
    # evaluate's "is a writer there" probe holds a shared lock for an instant; a train taking the lock just then was
    # told the folder was in use (by the stale PID in the file).
    import fcntl
    import threading

    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.LOCK).write_text("99999\n")
    fd = os.open(out / rundir.LOCK, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    timer = threading.Timer(0.05, lambda: fcntl.flock(fd, fcntl.LOCK_UN))
    timer.start()
    try:
        lock = rundir.Lock(out)
        lock.release()
    finally:
        timer.join()
        os.close(fd)


def test_quiet_silences_the_absl_warnings_orbax_logs(capsys, run):
    # After a killed orbax save, a --quiet resume printed "WARNING:absl:Metadata file does not exist" three times.
    absl_logging = pytest.importorskip("absl.logging")
    before = absl_logging.get_verbosity()
    try:
        code, out, err = cli(capsys, "train", "--out", run, "--resume", "--quiet")
        assert code == 0 and out == err == ""
        assert absl_logging.get_verbosity() == absl_logging.ERROR
    finally:
        absl_logging.set_verbosity(before)


def _killed_extension(run, epochs, last_row):
    """The run extended to ``epochs`` and killed before its next checkpoint, having logged a row a step up to
    ``last_row`` (config.json says ``epochs``; summary.json still the 50-step run's)."""
    config = json.loads((run / "config.json").read_text())
    config["train"]["epochs"] = epochs
    (run / "config.json").write_text(json.dumps(config))
    row = {"split": "train", "loss": 1.0986, "accuracy": 0.3333, "lr": 0.05, "loss_mean": 1.0986, "loss_min": 1.0986,
           "loss_max": 1.0986, "accuracy_mean": 0.3333, "accuracy_min": 0.3333, "accuracy_max": 0.3333, "window": 1}
    with open(run / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps({"step": s, **row}) + "\n" for s in range(50, last_row + 1))


@pytest.mark.slow
def test_an_honest_metrics_file_of_a_long_killed_extension_is_not_too_large_for_a_shorter_resume(capsys, run):
    # Extended with log_every=1 and killed at step 8000 (1.6 MB of rows past the checkpoint at 50): a resume that
    # shortens the run was refused as "more than the 1048576 bytes such a file can have".
    _killed_extension(run, 60000, 8000)
    assert (run / "metrics.jsonl").stat().st_size > 2**20
    code, out, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=60")
    assert code == 0 and "metrics past step 50 are kept in" in out, err


def test_shortening_a_killed_extension_back_to_the_complete_run_restores_it(capsys, run):
    summary = json.loads((run / "summary.json").read_text())
    rows = (run / "metrics.jsonl").read_text()
    _killed_extension(run, 40000, 240)
    code, out, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=50")
    assert code == 0 and "is complete" not in out, out + err
    assert (run / "metrics.jsonl").read_text() == rows
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 50
    assert json.loads((run / "summary.json").read_text())["wall_seconds"] == summary["wall_seconds"]
    code, out, _ = cli(capsys, "train", "--out", run, "--resume")
    assert code == 0 and "is complete" in out


def test_a_learning_rate_change_stopped_before_its_config_is_written_is_judged_again(capsys, run, monkeypatch):
    # Stopped between its two writes, a resume that changes the learning rate left a config.json saying the new rate
    # and the abandoned rows past the checkpoint in place: the next resume kept them as the new rate's. The rows
    # are settled first now, so config.json still says the old rate until they are.
    _killed_extension(run, 60, 58)  # rows past the checkpoint at 50, at the old learning rate
    real = files.keep_copy

    def stopped(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "keep_copy", stopped)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "optimizer.learning_rate=0.02")
    assert code != 0 and "No space left" in err
    monkeypatch.setattr(files, "keep_copy", real)
    code, out, err = cli(capsys, "train", "--out", run, "--resume", "--set", "optimizer.learning_rate=0.02")
    assert code == 0 and "the optimizer changed" in out, out + err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["lr"] != 0.05 for r in rows if r["split"] == "train" and r["step"] >= 50)


@pytest.mark.parametrize("content", ["garbage", "[]", '{"steps": 50}'])
def test_a_damaged_summary_of_a_complete_run_is_a_one_line_error_without_json_too(capsys, run, content):
    (run / "summary.json").write_text(content)
    before = snapshot(run)
    code, out, err = cli(capsys, "train", "--resume", "--out", run)
    assert_one_line_error(code, err, "summary.json")
    assert snapshot(run) == before


def test_evaluate_before_the_first_checkpoint_names_the_trainer(capsys, tmp_path):
    # A folder a trainer has just started: its lock held, no checkpoint yet. evaluate said only "no finished or
    # checkpointed run there".
    out = tmp_path / "run"
    out.mkdir()
    lock = rundir.Lock(out)
    try:
        code, _, err = cli(capsys, "evaluate", "--run", out)
        assert_one_line_error(code, err, f"a training process (PID {os.getpid()}) is writing this run",
                              "first checkpoint")
    finally:
        lock.release()
    code, _, err = cli(capsys, "evaluate", "--run", out)  # nobody writing: as before
    assert_one_line_error(code, err, "no finished or checkpointed run there")
