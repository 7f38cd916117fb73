"""An advisory file lock (``flock``) that serializes catalog writers across processes and threads.

Writers hold it exclusively, readers shared, and only while their short catalog connection is open. The
kernel drops it when the holder exits, even on SIGKILL, so a crashed writer never leaves it stuck. Each
acquisition opens its own file descriptor, so threads of one process exclude each other too.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockTimeout(TimeoutError):
    """The lock stayed held by someone else for longer than the timeout."""


@contextmanager
def file_lock(path: Path, *, shared: bool, timeout_s: float) -> Iterator[None]:
    """Hold ``path`` locked (shared or exclusive) for the duration of the block."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        if not shared:
            raise
        try:  # a reader without write access to the folder: lock the existing file read-only
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # no lock file and no right to create one: rely on DuckDB's own lock
            yield
            return
    try:
        _acquire(fd, path, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, timeout_s)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _acquire(fd: int, path: Path, operation: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockTimeout(f"{path} stayed locked for {timeout_s:.0f} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
