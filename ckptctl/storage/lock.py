"""The run directory's writer lock.

``fcntl.flock`` on ``<run>/.ckptctl.lock``: the kernel drops it when the holder exits or
is killed, so a crashed trainer never leaves a run locked. The file records who holds
it (pid, host, time) for error messages.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from ckptctl.core.format import LOCK_FILE, utc_now_iso
from ckptctl.errors import RunLockedError


class RunLock:
    """Exclusive, non-blocking writer lock on one run directory (a context manager)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunLockedError` naming the holder."""
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(f"{self.path.parent}: run is locked by {describe_holder(self.path)}") from None
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now_iso()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (idempotent). The lock file stays; it is harmless."""
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(run_dir: str | os.PathLike) -> bool:
    """True if some process currently holds the writer lock of ``run_dir``."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def describe_holder(lock_path: Path) -> str:
    """A short description of who holds ``lock_path``, from what it wrote there."""
    try:
        info = json.loads(lock_path.read_text())
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
    except (OSError, ValueError, AttributeError):
        return "another process"
