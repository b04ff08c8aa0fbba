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
import time
from pathlib import Path

from ckptctl.core.format import LOCK_FILE, utc_now_iso
from ckptctl.errors import CkptctlError, NotRegularFileError, RunLockedError, RunNotWritableError
from ckptctl.storage.atomic import open_regular

_PROC_LOCKS = "/proc/locks"

#: How long a refused acquire waits for the holder to write who it is.
HOLDER_DETAILS_WAIT = 0.5


class RunLock:
    """Exclusive, non-blocking writer lock on one run directory (a context manager)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunLockedError` naming the holder."""
        if self._fd is not None:
            return self
        try:
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT, 0o644, follow_symlinks=False)
        except NotRegularFileError as exc:  # a FIFO or device there would fail flock with EINVAL
            raise CkptctlError(f"{exc}: the run's lock file must be a plain file; remove it and try again") from None
        except OSError as exc:  # read-only, missing or not a folder: say so, not a traceback
            raise RunNotWritableError(
                f"{self.path.parent}: cannot take the run's writer lock ({exc.strerror or exc}); "
                "a run is written only in a writable folder: copy it somewhere writable to continue it"
            ) from None
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
            os.ftruncate(self._fd, 0)  # no stale holder for the fallback probe of is_locked
        except OSError:
            pass
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
    """True if some process currently holds the writer lock of ``run_dir``.

    A probe only looks: it reads the kernel's lock table (``/proc/locks``) for the lock
    file's device and inode, so ``watch ckptctl ls`` can never make a trainer's acquire
    fail (taking even a shared lock for an instant would). Where that table is not
    available, the holder recorded in the lock file is checked for being alive.
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        st = os.stat(path)
    except OSError:
        return False
    held = _flock_held_in_proc_locks(st)
    if held is None:
        held = _recorded_holder_alive(path)
    return held


def _flock_held_in_proc_locks(st: os.stat_result) -> bool | None:
    """Whether ``/proc/locks`` lists a FLOCK on that inode; None if it cannot be read.

    Matched by inode number alone: some filesystems (btrfs subvolumes, overlays) report
    another device there than ``stat`` does. A clash with another filesystem's inode
    only makes a run look busy in a listing; it never fails an acquire.
    """
    wanted = str(st.st_ino)
    try:
        with open(_PROC_LOCKS, encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 4447 fe:00:2155124 0 EOF" ("->" marks a blocked waiter)
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[2] != "->" and fields[5].rsplit(":", 1)[-1] == wanted:
                    return True
    except OSError:
        return None
    return False


def _recorded_holder_alive(lock_path: Path) -> bool:
    """Fallback probe: the pid recorded in the lock file is alive on this host (cleared on release)."""
    try:
        info = json.loads(lock_path.read_text())
        pid, host = int(info["pid"]), info.get("host")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if host != socket.gethostname():
        return True  # cannot check another machine's processes: assume it holds the run
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(lock_path: Path, wait: float = HOLDER_DETAILS_WAIT) -> str:
    """A short description of who holds ``lock_path``, from what it wrote there.

    A holder writes its details just after it takes the lock: a caller refused in that
    instant waits up to ``wait`` seconds for them rather than naming no one.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            info = json.loads(lock_path.read_text())
            return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
        except (OSError, ValueError, AttributeError):
            if time.monotonic() >= deadline:
                return "another process (it has not written its pid yet)"
            time.sleep(0.01)
