"""A run folder: recognised before anything is written into it, and held by one writer at a time.

- Only a new or empty folder, or one that is recognisably a funcgrad run (its ``run.json`` marker, or a
  ``checkpoint.npz`` with a funcgrad header from before the marker existed), is ever written into; anything
  else is an error and no file in it changes.
- A writer holds an exclusive ``fcntl.flock`` on ``.funcgrad.lock`` in the folder. The OS releases it when
  the process ends, kill -9 included, so a lock is never stale; a second writer gets an error naming the PID
  that holds it. Readers (``funcgrad evaluate``) only look whether a writer is there.
- Temporary files of atomic writes (``.<name>.tmp-<pid>``) left by a killed process are removed when the
  folder is next opened for writing, if that PID is no longer running.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import time
import uuid
from pathlib import Path

import funcgrad
from funcgrad import checkpoint
from funcgrad._checks import describe
from funcgrad._io import FileError, open_fd, open_regular
from funcgrad.cli import _files as files

MARKER = "run.json"
RUN_FORMAT = "funcgrad-run-1"
LOCK = ".funcgrad.lock"
# The files funcgrad train writes into a run folder (and metrics.jsonl.<n>, set aside).
OWN_FILES = (MARKER, files.CONFIG, files.CHECKPOINT, files.METRICS, files.SUMMARY, "curves.png",
             "decision_boundary.png", "regression.png")
# Temporaries of atomic writes of those files only: a user's own ".notes.tmp-12" is never taken for ours.
_TEMP = re.compile(r"^\.(" + "|".join(re.escape(n) for n in OWN_FILES) + r"|" + re.escape(files.METRICS)
                   + r"\.\d+)\.tmp-(\d+)$")


class RunFolderError(Exception):
    """The folder cannot be used as asked; the message says why in one line."""


class ReadOnlyFolder(RunFolderError):
    """The lock file cannot be created: the folder is not writable."""


def _is_ours(name: str) -> bool:
    return name == LOCK or bool(_TEMP.match(name))


def _legacy_run(out: Path) -> bool:
    """A run written before the marker: a config and a funcgrad checkpoint (only its header is read)."""
    if not (out / files.CONFIG).is_file():
        return False
    try:
        with open_regular(out / files.CHECKPOINT) as f:
            checkpoint.metadata(f)
    except (files.FileError, checkpoint.CheckpointError):
        return False
    return True


def inspect(out: Path) -> str:
    """``"new"`` (absent), ``"empty"``, or ``"run"``; raises RunFolderError for anything else."""
    out = Path(out)
    try:
        exists = out.exists()
    except OSError as e:  # a name longer than the file system allows (ENAMETOOLONG), a loop of links, ...
        raise RunFolderError(f"--out {out}: cannot be used as a folder: {e.strerror or e}; choose another --out") from None
    if not exists:
        if out.is_symlink():
            raise RunFolderError(f"{out} is a symbolic link to nothing; choose another --out")
        return "new"
    if not out.is_dir():
        raise RunFolderError(f"{out} exists and is not a folder; choose another --out")
    try:
        names = sorted(n for n in os.listdir(out) if not _is_ours(n))
    except OSError as e:
        raise RunFolderError(f"cannot list {out}: {e.strerror}") from None
    if not names:
        return "empty"
    if MARKER in names:
        read_marker(out)
        return "run"
    if files.CHECKPOINT in names and _legacy_run(out):
        return "run"
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise RunFolderError(f"{out} is not a funcgrad run (no {MARKER}) and is not empty ({shown}); nothing of it is "
                         "changed: choose a new or empty --out")


def marker_record() -> dict:
    """The marker of a new run folder. ``run``: the run's identity, drawn once, when the folder becomes a run; each
    checkpoint carries it, so that another run's checkpoint copied in is refused rather than continued."""
    return {"format": RUN_FORMAT, "funcgrad": getattr(funcgrad, "__version__", "unknown"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": uuid.uuid4().hex}


def read_marker(out: Path) -> dict | None:
    """The run folder's marker, checked: None where there is none (a folder marked before markers, or one a process
    of a multi-host run does not share); RunFolderError where it is there but is not one funcgrad wrote (not a JSON
    object, another format, a run name that is not a string)."""
    path = Path(out) / MARKER
    if not path.exists() and not path.is_symlink():
        return None
    try:
        marker = files.json_load(path)
    except files.FileError as e:
        raise RunFolderError(f"{e}; {Path(out)} does not look like a funcgrad run") from None
    if marker.get("format") != RUN_FORMAT:
        raise RunFolderError(f"{path}: format {marker.get('format')!r}, expected {RUN_FORMAT!r}; "
                             "not a run of this funcgrad")
    if "run" in marker and not (isinstance(marker["run"], str) and marker["run"]):
        raise RunFolderError(f"{path}: 'run' is the run's name, a string funcgrad draws when the folder becomes a "
                             f"run; got {describe(marker['run'])}: the file is damaged (its checkpoints name the run "
                             "that wrote them)")
    return marker


def run_id(out: Path) -> str | None:
    """The run's name from its marker (see :func:`read_marker`, whose errors it raises); None for a folder without
    one, or marked before runs had names."""
    marker = read_marker(out)
    return None if marker is None else marker.get("run")


def _holder(path: Path) -> str:
    """Who holds the lock: its PID, written by the holder right after it took the lock (waited for briefly,
    for a holder that has just taken it)."""
    for _ in range(40):
        try:
            pid = path.read_text().strip()
        except OSError:
            pid = ""
        if pid.isdigit():
            return f"PID {pid}"
        time.sleep(0.025)
    return "another process"


def _flock_exclusive(fd: int, tries: int = 20, wait: float = 0.01) -> bool:
    """Takes the exclusive lock without blocking, trying a few times over ~0.2 s: a reader's probe
    (:func:`writer_pid`) holds a shared lock for an instant, which must not turn a writer away."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if attempt + 1 < tries:
                time.sleep(wait)
    return False


class Lock:
    """An exclusive lock on a run folder, held until :meth:`release` or the end of the process."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.fd: int | None = None
        for _ in range(10):
            try:  # never through a symbolic link: the lock file is truncated and written
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise ReadOnlyFolder(f"cannot create the lock file {self.path}: {e.strerror}") from None
                raise RunFolderError(f"cannot use the lock file {self.path}: {e.strerror} (it should be a regular "
                                     "file that funcgrad creates)") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise RunFolderError(f"{self.path} is not a regular file; remove it")
            if st.st_nlink > 1:  # a hard link to another file, which writing the PID would change
                os.close(fd)
                raise RunFolderError(f"{self.path} is a hard link to another file ({st.st_nlink} names); funcgrad "
                                     "writes its PID into the lock file, so it must be its own: remove it")
            if not _flock_exclusive(fd):
                os.close(fd)
                raise RunFolderError(f"{out} is in use: {_holder(self.path)} is training into it (lock "
                                     f"{self.path}); wait for it to finish, or train into another --out") from None
            # The file may have been removed by a holder releasing it between our open and our flock: then the
            # lock we hold is on a file nobody else will open. Hold it only if the path is still this file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise RunFolderError(f"cannot take the lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still held: a process that opens it next creates a new one
            os.close(self.fd)
            self.fd = None


def writer_pid(out: Path) -> int | None:
    """The PID of a process holding ``out``'s lock, or None; takes no lock (for readers such as evaluate)."""
    path = Path(out) / LOCK
    try:
        fd = open_fd(path)
    except FileError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(out: Path) -> list[str]:
    """Removes ``.<name>.tmp-<pid>`` files whose process is gone (killed while writing); returns their names."""
    removed = []
    for name in sorted(os.listdir(out)):
        m = _TEMP.match(name)
        if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
            try:
                os.unlink(Path(out) / name)
                removed.append(name)
            except OSError:
                pass
    return removed


def read_only_files(out: Path) -> list[str]:
    """The run's own files (and the folder) that cannot be written: a user who made them read-only meant it."""
    bad = []
    if not os.access(out, os.W_OK | os.X_OK) or not os.stat(out).st_mode & 0o222:
        bad.append(f"{out} (the folder)")
    for name in sorted(os.listdir(out)):
        if name in OWN_FILES or name.startswith(files.METRICS):
            path = Path(out) / name
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (not os.access(path, os.W_OK) or not st.st_mode & 0o222):
                bad.append(str(path))
    return bad


def write_marker(out: Path) -> None:
    if not (Path(out) / MARKER).exists():
        files.write_json(Path(out) / MARKER, marker_record())


__all__ = ["MARKER", "RUN_FORMAT", "LOCK", "RunFolderError", "ReadOnlyFolder", "inspect", "Lock", "writer_pid",
           "remove_stale_temporaries", "read_only_files", "write_marker", "run_id", "read_marker"]
