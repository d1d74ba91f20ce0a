"""The CLI's file handling: atomic writes and metrics lines that survive a killed process."""

import json
import os

import pytest

from funcgrad.cli import _files as files


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "a.json"
    files.write_json(path, {"x": 1, "nan": float("nan")})
    files.write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_a_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 100}')  # killed between the record and its newline
    files.append_lines(path, [{"step": 200}])
    assert [r["step"] for r in files.read_metrics(path)] == [0, 100, 200]


def test_a_cut_off_last_line_is_dropped_and_others_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1')
    assert files.read_metrics(path) == [{"step": 0}]
    assert path.read_text() == '{"step": 0}\n{"step": 1'  # reading alone changes nothing
    assert files.read_metrics(path, repair=True) == [{"step": 0}]
    assert path.read_text() == '{"step": 0}\n'


def test_keep_copy_leaves_the_original_until_it_is_replaced(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n')
    kept = files.keep_copy(path)
    assert kept.name == "metrics.jsonl.1" and kept.read_text() == path.read_text()
    files.write_lines(path, [{"step": 0}])
    assert path.read_text() == '{"step": 0}\n' and kept.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_set_aside_never_overwrites(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("first")
    assert files.set_aside(path).name == "metrics.jsonl.1"
    path.write_text("second")
    assert files.set_aside(path).name == "metrics.jsonl.2"
    assert (tmp_path / "metrics.jsonl.1").read_text() == "first" and files.set_aside(path) is None


def test_appending_to_a_hard_linked_metrics_file_leaves_the_other_name_as_it_was(tmp_path):
    # A snapshot of a run folder made with hard links (cp -al, rsync --link-dest): appending in place changed the
    # snapshot's metrics too (h83). The run's file gets a copy of its own first.
    path, snap = tmp_path / "metrics.jsonl", tmp_path / "snapshot.jsonl"
    path.write_text('{"step": 0}\n')
    os.link(path, snap)
    files.append_lines(path, [{"step": 1}])
    assert [r["step"] for r in files.read_metrics(path)] == [0, 1]
    assert snap.read_text() == '{"step": 0}\n' and os.stat(path).st_nlink == 1


def test_rows_out_of_order_or_repeated_are_damage(tmp_path):
    # A run logs each step once, in order, per split: rows 0, 10, 20 appended again were accepted by --resume (h83).
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "split": "train"}\n{"step": 0, "split": "validation"}\n{"step": 10, "split": "train"}\n')
    assert len(files.read_metrics(path)) == 3
    path.write_text(path.read_text() + '{"step": 10, "split": "train"}\n')
    with pytest.raises(files.FileError, match=r"line 4 records step 10 after step 10 of split 'train', out of order"):
        files.read_metrics(path)
