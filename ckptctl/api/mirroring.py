"""The Drive mirror's bookkeeping in the local run: its budget, what each sync verified, and the lag warning.

The mirror thread (:class:`ckptctl.storage.mirror.BackgroundMirror`) copies; what it
verified is recorded here, in the run's index (through :class:`IndexState`, so it never
races a save) and in ``mirror_status.json``. Once the index is closed, reports are dropped:
a newer writer may own the run, and the next open reads the mirror's real state.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ckptctl.core.format import INDEX_FILE
from ckptctl.errors import CkptctlError
from ckptctl.storage.mirror import BackgroundMirror, SyncReport, apply_sync_report, read_mirror_status, resolve_budget, write_mirror_status

from ckptctl.api.index_state import IndexState

log = logging.getLogger("ckptctl")

#: Saves the newest checkpoint may be ahead of Drive before the library warns (naming the cause).
MIRROR_LAG_WARN_SAVES = 2


class MirrorBook:
    """The Drive mirror of one open run (or none: every method is then a no-op)."""

    def __init__(self, run_dir: Path, index: IndexState):
        self.run_dir = run_dir
        self.index = index
        self.mirror: BackgroundMirror | None = None
        #: The mirror's byte budget (None without a mirror).
        self.budget: int | None = None
        self.newest_on_drive: int | None = None
        self._problem: tuple[str, str] | None = None  # (what kind, message) of the last mirror trouble
        self._lag_warned_for: str | None = None

    @property
    def active(self) -> bool:
        """True when the run has a Drive mirror."""
        return self.mirror is not None

    def start(self, mirror_run: Path, drive_max_size: int | str | None, backoff: tuple[float, float]) -> None:
        """Resolve the budget, start the mirror thread on ``mirror_run`` and ask for a first sync."""
        self.budget = self._resolve_budget(drive_max_size, mirror_run)
        self.newest_on_drive = self._newest_known_on_drive()
        self.mirror = BackgroundMirror(
            self.run_dir,
            mirror_run,
            on_synced=self.apply_sync_report,
            on_failed=self.record_failure,
            max_bytes=self.budget,
            initial_backoff=backoff[0],
            max_backoff=backoff[1],
        )
        self.request()

    def _resolve_budget(self, drive_max_size: int | str | None, mirror_run: Path) -> int:
        """The mirror's byte budget (see ``drive_max_size``), logged once."""
        try:
            budget = resolve_budget(drive_max_size, mirror_run)
        except ValueError as exc:
            raise CkptctlError(str(exc)) from None
        how = "as given" if drive_max_size is not None else "free space on Drive plus this run's mirror, less a margin"
        log.info("%s: Drive mirror budget %d bytes (%s)", self.run_dir, budget, how)
        return budget

    def _newest_known_on_drive(self) -> int | None:
        """The newest checkpoint known to be verified on Drive: the last sync's status, or the index's ``mirrored`` records.

        A run just restored from Drive has no status file yet, but every restored entry is
        recorded as mirrored; without this, its first save would look many saves behind.
        """
        status = read_mirror_status(self.run_dir) or {}
        known = [status["newest_verified_id"]] if isinstance(status.get("newest_verified_id"), int) else []
        known += [e.id for e in self.index.current.checkpoints if e.mirrored]
        return max(known, default=None)

    def request(self) -> None:
        """Ask the Drive mirror for a sync, once the run has an index to mirror (a fresh run has none yet)."""
        if self.mirror is not None and (self.run_dir / INDEX_FILE).is_file():
            self.mirror.request()

    def apply_sync_report(self, report: SyncReport) -> None:
        """Record in the local run what a mirror sync verified: index entries and ``mirror_status.json``."""
        with self.index.lock:
            if self.index.closed:
                return  # closed: a newer writer may own the run's index now; the next open reads the mirror
            self.index.update(lambda index: apply_sync_report(index, report))
            self.newest_on_drive = report.newest_verified_id
            self._problem = ("too big", report.too_big) if report.too_big else None
            write_mirror_status(self.run_dir, report, mirror_run=self.mirror.mirror_run)

    def record_failure(self, error: str) -> None:
        """Record a failed mirror attempt's cause in ``mirror_status.json`` (the numbers stay as they were)."""
        with self.index.lock:
            if self.index.closed:
                return
            self._problem = (error.split(":", 1)[0], error)  # keyed by the error type, not its text
            write_mirror_status(self.run_dir, None, error=error, mirror_run=self.mirror.mirror_run)

    def warn_if_lags(self, newest_id: int) -> None:
        """Warn (once per cause) when the newest checkpoint has not reached Drive for more than 2 saves."""
        if self.mirror is None:
            return
        behind = newest_id - (self.newest_on_drive if self.newest_on_drive is not None else -1)
        if behind <= MIRROR_LAG_WARN_SAVES:
            self._lag_warned_for = None
            return
        key, cause = self._problem or ("slow", "Drive copies are slower than the saves")
        if key != self._lag_warned_for:
            self._lag_warned_for = key
            newest = "none yet" if self.newest_on_drive is None else f"#{self.newest_on_drive}"
            log.warning(
                "%s: the Drive mirror is %d saves behind (newest verified on Drive: %s): %s",
                self.run_dir, behind, newest, cause,
            )

    def stop(self, timeout: float | None) -> None:
        """Give the mirror up to ``timeout`` s to catch up, then stop its thread (a warning if it did not)."""
        if self.mirror is not None and not self.mirror.stop(timeout=timeout):
            log.warning("Drive mirror not fully synced at close: %s", self.mirror.last_error)
