"""Reading a file that may be hostile: only a regular file (never a FIFO, a device or a folder, also behind a
symbolic link), opened without blocking, checked with ``fstat`` on the open file, and read only up to a size
it can honestly have. Used by :func:`funcgrad.config.load` and by the CLI's run files."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["FileError", "open_fd", "open_regular", "read_regular"]


class FileError(ValueError):
    """A file that cannot be read as what it should be; the message names the file."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading if it is a regular file (checked on the open file, without blocking)."""
    fd = open_fd(Path(path))
    with os.fdopen(fd, "rb") as f:
        yield f


def open_fd(path: Path) -> int:
    """A file descriptor of ``path`` opened for reading, if it is a regular file (else a FileError)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if path.is_symlink():  # (the link is there; what it points to is not)
            raise FileError(f"{path}: a symbolic link to {os.readlink(path)!r}, which does not exist") from None
        raise FileError(f"{path}: no such file") from None
    except OSError as e:
        raise FileError(f"{path}: cannot open it ({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise FileError(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise FileError(f"{path}: is {kind}, not a regular file")
    return fd


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``. Opened without blocking (a FIFO
    never hangs), checked with ``fstat`` on the open file (no race with a swapped path), then read."""
    path = Path(path)
    fd = open_fd(path)
    try:
        st = os.fstat(fd)
        if st.st_size > max_bytes:
            raise FileError(f"{path}: {st.st_size} bytes, more than the {max_bytes} such a file can have")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 24, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise FileError(f"{path}: grew past {max_bytes} bytes while being read")
        return b"".join(chunks)
    except OSError as e:
        raise FileError(f"{path}: cannot read it ({e.strerror})") from None
    finally:
        os.close(fd)
