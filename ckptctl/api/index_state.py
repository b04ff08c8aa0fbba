"""The run's index while a ModelPersistence is open: held thread-safely, every commit goes through here.

Three threads change the index: the training thread (``pin``), the background worker
(a save and its retention, disk-full recovery) and the Drive mirror's thread (what a
sync verified). Each change reads the current index, derives the new one, writes it
durably and keeps it, all under one lock, so no change is lost between a read and its
commit. After :meth:`IndexState.close` nothing writes the index any more: a newer writer
may own the run by then.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterable

from ckptctl.core.manifest import CheckpointEntry, Index
from ckptctl.errors import CkptctlError
from ckptctl.storage import runfiles


class IndexClosedError(CkptctlError):
    """A commit was asked of the index of a closed ModelPersistence."""


class IndexState:
    """The current :class:`Index` of ``run_dir`` and the one lock over reading, deriving and committing it.

    Hold :attr:`lock` around a decision that reads :attr:`current` and then commits, so the
    decision and its commit see the same index (the lock is re-entrant).
    """

    def __init__(self, run_dir: Path, index: Index):
        self.run_dir = Path(run_dir)
        self.lock = threading.RLock()
        self._index = index
        self._closed = False

    @property
    def current(self) -> Index:
        """The index as last committed (or as opened)."""
        with self.lock:
            return self._index

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran: every commit is refused from then on."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise IndexClosedError(f"{self.run_dir}: this ModelPersistence is closed; it no longer writes the run's index")

    def commit(self, index: Index) -> Index:
        """Durably write ``index`` as the run's index and keep it."""
        with self.lock:
            self._check_open()
            runfiles.commit_index(self.run_dir, index)
            self._index = index
            return index

    def update(self, change: Callable[[Index], Index]) -> Index:
        """Commit ``change(current)`` (nothing is written when it returns an equal index); return the result."""
        with self.lock:
            updated = change(self._index)
            return updated if updated == self._index else self.commit(updated)

    def commit_removal(self, kept: Index, victims: Iterable[CheckpointEntry]) -> Index:
        """Commit ``kept`` with ``victims`` as tombstones until their files are gone (see :func:`runfiles.commit_removal`)."""
        with self.lock:
            self._check_open()
            self._index = runfiles.commit_removal(self.run_dir, kept, victims)
            return self._index

    def finish_removal(self, ids: Iterable[int]) -> Index:
        """Clear the tombstones of ``ids``, whose files are deleted (see :func:`runfiles.finish_removal`)."""
        with self.lock:
            self._check_open()
            self._index = runfiles.finish_removal(self.run_dir, self._index, ids)
            return self._index

    def close(self) -> None:
        """Refuse every later commit (waiting for one in progress)."""
        with self.lock:
            self._closed = True
