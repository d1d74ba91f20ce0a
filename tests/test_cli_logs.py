"""What `funcgrad train` logs: window statistics, validation rows, the progress line, --json/--quiet, TensorBoard."""

import io
import json
import struct

import numpy as np
import pytest
from conftest import run_python

from funcgrad.cli import _log as log
from funcgrad.cli import _plots as plots
from funcgrad.cli._progress import Progress, format_duration


def chunk(steps, rs):
    return {"step": np.asarray(steps), "loss": rs.rand(len(steps)) * 3, "accuracy": rs.rand(len(steps)),
            "lr": np.full(len(steps), 0.1)}


def test_window_statistics_cover_every_step_since_the_last_row_across_chunks():
    rs = np.random.RandomState(0)
    chunks = [chunk(range(0, 7), rs), chunk(range(7, 14), rs), chunk(range(14, 20), rs)]
    window, rows, last = log.Window(), [], -1
    for m in chunks:
        new = log.chunk_rows(m, len(m["step"]), window, last_logged=last, log_every=5, last_step=19)
        rows += new
        last = max([last] + [r["step"] for r in new])
    loss = np.concatenate([m["loss"] for m in chunks])
    acc = np.concatenate([m["accuracy"] for m in chunks])
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 19]
    bounds = [(0, 1), (1, 6), (6, 11), (11, 16), (16, 20)]  # the steps (previous row, this row]
    for r, (lo, hi) in zip(rows, bounds, strict=True):
        assert r["split"] == "train" and r["window"] == hi - lo
        assert r["loss"] == pytest.approx(loss[r["step"]])  # the step's own value
        assert r["loss_mean"] == pytest.approx(loss[lo:hi].mean())
        assert (r["loss_min"], r["loss_max"]) == pytest.approx((loss[lo:hi].min(), loss[lo:hi].max()))
        assert r["accuracy_mean"] == pytest.approx(acc[lo:hi].mean())
        assert (r["accuracy_min"], r["accuracy_max"]) == pytest.approx((acc[lo:hi].min(), acc[lo:hi].max()))
        assert "lr_mean" not in r


def test_a_resumed_run_neither_rewrites_nor_counts_steps_already_logged():
    rs = np.random.RandomState(1)
    m = chunk(range(10, 20), rs)
    rows = log.chunk_rows(m, 10, log.Window(), last_logged=15, log_every=5, last_step=99)
    assert [r["step"] for r in rows] == []  # 16..19: no multiple of 5
    window = log.Window()
    rows = log.chunk_rows(m, 10, window, last_logged=12, log_every=5, last_step=99)
    assert [r["step"] for r in rows] == [15] and rows[0]["window"] == 3  # steps 13, 14, 15
    assert rows[0]["loss_max"] == pytest.approx(m["loss"][3:6].max())
    assert window.count == 4  # 16..19 wait for the next row


def test_a_window_is_continued_from_a_checkpoint_only_if_such_a_window_could_be():
    rs = np.random.RandomState(3)
    m = chunk(range(0, 4), rs)
    saved = log.Window()
    saved.add(m, 0, 4)
    state = json.loads(json.dumps(saved.state()))  # as a checkpoint's metadata keeps it
    window = log.Window()
    assert window.restore(state, steps=4)
    assert window.take() == pytest.approx(saved.take())

    def forged(**edit):
        out = json.loads(json.dumps(state))
        for name, value in edit.items():
            out[name] = value if name == "count" else {**out[name], "loss": value}
        return out

    # (h71: a well-typed but forged window was continued, and the first row after a resume reported it)
    for bad, steps in ((state, 3),  # more steps than since the last row
                       (forged(sums=1e9), 4),  # a mean above the max
                       (forged(mins=5.0), 4),  # min above max
                       (forged(maxs=float("nan")), 4), (forged(count=-1), 4), (forged(count=True), 4)):
        window = log.Window()
        assert not window.restore(bad, steps=steps), bad
        assert window.count == 0 and window.sums == {}
    assert not log.Window().restore({"count": "a"}, steps=4)


def test_steps_after_a_non_finite_loss_are_not_logged():
    rs = np.random.RandomState(2)
    m = chunk(range(0, 10), rs)
    m["loss"][7] = np.nan
    rows = log.chunk_rows(m, 7, log.Window(), last_logged=-1, log_every=5, last_step=9)
    assert [r["step"] for r in rows] == [0, 5]


def test_old_rows_without_a_split_are_training_rows():
    records = [{"step": 0, "loss": 1.0}, {"step": 5, "split": "validation", "loss": 2.0}]
    assert log.train_rows(records) == records[:1] and log.validation_rows(records) == records[1:]


def test_the_progress_line_shows_the_recent_rate_and_the_time_left():
    t = [0.0]
    p = Progress(1000, stream=io.StringIO(), clock=lambda: t[0])
    t[0] = 30.0  # the first chunk, with compilation: 100 steps in 30 s
    first = p.line(100, {"loss": 3.2e-05, "accuracy": 0.5, "lr": 0.001})
    assert "loss 3.2e-05" in first and "lr 0.001" in first  # .4g: an MSE is not 0.0000
    assert "3.33 steps/s" in first and "ETA 4m30s" in first
    for i in range(2, 6):  # then 100 steps a second
        t[0] = 30.0 + (i - 1)
        line = p.line(100 * i, {"loss": 0.25})
    assert "100 steps/s" in line and "ETA 5s" in line
    assert "ETA" not in p.line(1000, {"loss": 0.1})
    assert [format_duration(s) for s in (42, 185, 7620, float("nan"))] == ["42s", "3m05s", "2h07m", "?"]


def test_curves_are_drawn_from_old_and_new_rows(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 1 / (s + 1), "accuracy": s / 10, "lr": 0.05 - 1e-6 * s,
             "loss_min": 0.5 / (s + 1), "loss_max": 2 / (s + 1), "accuracy_min": 0, "accuracy_max": 1,
             "loss_mean": 1 / (s + 1), "accuracy_mean": 0.5, "window": 1} for s in range(10)]
    rows += [{"step": 5, "split": "validation", "loss": 0.3, "accuracy": 0.4}]
    plots.curves(tmp_path / "new.png", rows, "new", "accuracy (the book's)")
    plots.curves(tmp_path / "old.png", [{"step": s, "loss": 1.0, "accuracy": 0.5} for s in range(3)], "old")
    for name in ("new.png", "old.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _train(out, *extra, check=True):
    return run_python(["-m", "funcgrad", "train", "--config", "sine", "--out", str(out), "--set", "train.epochs=60",
                       "--set", "train.fuse=20", "--set", "train.log_every=10", "--set", "train.eval_every=25",
                       "--set", "train.verify=false", *extra], env={"FUNCGRAD_COMPILATION_CACHE": "0"}, check=check)


@pytest.fixture(scope="module")
def json_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("logs") / "sine"
    return out, _train(out, "--json", "--set", "train.tensorboard=true")


@pytest.mark.slow
def test_json_prints_the_summary_alone_on_stdout(json_run):
    out, proc = json_run
    summary = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["last_step"]["step"] == 59 and summary["run"] == str(out)
    assert "final  training:" in proc.stderr  # the rest goes to stderr


def test_validation_rows_every_eval_every_rounded_to_the_fused_chunks(json_run):
    out, _ = json_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "validation"]
    assert [r["step"] for r in val] == [40, 60]  # eval_every 25 -> 40 (fuse 20); the last step always
    assert [r["step"] for r in rows if r["split"] == "train"] == [0, 10, 20, 30, 40, 50, 59]
    assert set(val[0]) == {"step", "split", "loss", "data_loss", "reg_loss", "accuracy"}


def _events(folder):
    """(tag, step, value) of every scalar in a TensorBoard event file, read with tensorboardX's own protobuf."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord: length (8), its CRC (4), the record, its CRC (4)
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_scalars_match_the_metrics_file(json_run):
    pytest.importorskip("tensorboardX")
    out, _ = json_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = {(tag, step): value for tag, step, value in _events(out / "tensorboard")}
    for r in rows:
        prefix = r["split"]
        assert events[f"{prefix}/loss", r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        if prefix == "train":
            assert events["train/loss_mean", r["step"]] == pytest.approx(r["loss_mean"], rel=1e-6)
            assert events["train/lr", r["step"]] == pytest.approx(r["lr"], rel=1e-6)
    assert not any(tag.endswith(("_min", "_max")) for tag, _ in events)


@pytest.mark.slow
def test_quiet_prints_nothing(tmp_path):
    proc = _train(tmp_path / "q", "--quiet")
    assert proc.stdout == "" and proc.stderr == ""
    assert (tmp_path / "q" / "summary.json").exists()


def test_tensorboard_without_tensorboardx_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    message = log.tensorboard_missing()
    assert "pip install 'funcgrad[tensorboard]'" in message and "train.tensorboard = false" in message
