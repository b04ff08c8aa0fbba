"""Mirroring a run to a second folder (a mounted Google Drive) with the same layout.

:func:`sync_run` copies what the mirror lacks, each file to a temporary name, fsynced,
renamed, then read back and checked against the local checksum; the mirror's index is
written after its files, and mirror files the local run no longer lists are deleted only
after every newer file is verified there. :class:`BackgroundMirror` runs it on a thread
with retry and backoff, so a slow, full or unmounted Drive never blocks training.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ckptctl.core.format import (
    BEST_METADATA_FILE,
    CHECKPOINT_DIR,
    INDEX_FILE,
    TRAINING_LOG_FILE,
    TRAINING_STATE_FILE,
    utc_now_iso,
)
from ckptctl.core.manifest import Index
from ckptctl.errors import CheckpointIntegrityError, CkptctlError, CorruptIndexError, UnsafePathError
from ckptctl.storage.atomic import (
    ProgressCallback,
    atomic_copy,
    atomic_write_json,
    cleanup_temporaries,
    fsync_dir,
    hash_file,
    remove_file,
    resolve_inside,
)
from ckptctl.storage.scan import checkpoint_files_on_disk, read_best, read_index

log = logging.getLogger("ckptctl.mirror")


class MirrorError(CkptctlError):
    """The mirror folder cannot be written or a copy did not verify."""


@dataclass
class SyncReport:
    """What one :func:`sync_run` did."""

    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    mirrored: dict[int, dict] = field(default_factory=dict)  # id -> {"checksum", "size_bytes", "at"}


def _copy_verified(src: Path, dst: Path, checksum: str, on_progress: ProgressCallback) -> int:
    """Atomic copy, then read the destination back and compare; return its size."""
    size, _ = atomic_copy(src, dst, expected_checksum=checksum, on_progress=on_progress)
    read_size, read_sum = hash_file(dst, checksum.split(":", 1)[0])
    if read_sum != checksum or read_size != size:
        remove_file(dst)
        raise MirrorError(f"{dst}: read-back after copy does not match the source checksum")
    return size


def _copy_unless_source_gone(src: Path, dst: Path, checksum: str, on_progress: ProgressCallback) -> int | None:
    """:func:`_copy_verified`, or None when the local file is gone (a trainer's retention deleted it)."""
    try:
        return _copy_verified(src, dst, checksum, on_progress)
    except FileNotFoundError:
        if src.exists():
            raise  # the mirror side failed
        return None


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _read_mirror_index(mirror_run: Path, run_name: str) -> Index:
    try:
        return read_index(mirror_run)
    except (FileNotFoundError, CorruptIndexError):
        return Index(run_name=run_name, next_id=0)


def sync_run(
    local_run: str | os.PathLike,
    mirror_run: str | os.PathLike,
    *,
    on_progress: ProgressCallback = None,
    include_logs: bool = True,
) -> SyncReport:
    """Bring ``mirror_run`` up to date with ``local_run``; return what was done.

    Raises OSError (ENOSPC, EIO, EROFS, ENOENT...) or :class:`MirrorError` on failure; the
    mirror is then left consistent (its index lists only verified files).
    """
    local_run, mirror_run = Path(local_run), Path(mirror_run)
    report = SyncReport()
    local_index = read_index(local_run)
    # Not parents=True: a Drive folder that vanished (unmounted) must fail here, not be
    # recreated on the local disk under the mount point and reported as mirrored.
    mirror_run.mkdir(exist_ok=True)
    (mirror_run / CHECKPOINT_DIR).mkdir(exist_ok=True)
    cleanup_temporaries(mirror_run)
    cleanup_temporaries(mirror_run / CHECKPOINT_DIR)
    mirror_index = _read_mirror_index(mirror_run, local_index.run_name)
    have = mirror_index.by_id()
    on_mirror_disk = checkpoint_files_on_disk(mirror_run)

    for entry in local_index.checkpoints:
        existing = have.get(entry.id)
        if (
            existing is not None
            and existing.checksum == entry.checksum
            and entry.id in on_mirror_disk
            and _size_or_none(on_mirror_disk[entry.id]) == entry.size_bytes
        ):
            report.skipped.append(entry.path)  # verified when copied; a cheap size check catches truncation since
            if not entry.mirrored or entry.mirrored.get("checksum") != entry.checksum:
                # copied by a sync that failed later (its report was lost): record it now
                report.mirrored[entry.id] = {"checksum": entry.checksum, "size_bytes": entry.size_bytes, "at": utc_now_iso()}
            continue
        try:
            src = resolve_inside(local_run, entry.path)
        except UnsafePathError as exc:
            log.warning("not mirroring %s: %s", entry.path, exc)
            continue
        size = _copy_unless_source_gone(src, resolve_inside(mirror_run, entry.path), entry.checksum, on_progress)
        if size is None:
            continue  # deleted by retention since the index was read
        report.copied.append(entry.path)
        report.bytes_copied += size
        report.mirrored[entry.id] = {"checksum": entry.checksum, "size_bytes": size, "at": utc_now_iso()}
        have[entry.id] = replace(entry, mirrored=None)
        mirror_index = mirror_index.with_entries(list(have.values()))
        atomic_write_json(mirror_run / INDEX_FILE, mirror_index.to_dict())

    _sync_best(local_run, mirror_run, report, on_progress)
    if include_logs:
        for name in (TRAINING_STATE_FILE, TRAINING_LOG_FILE):
            src = local_run / name
            if src.is_file() and not src.is_symlink():
                atomic_copy(src, mirror_run / name)

    # Retention: only now that every local checkpoint is verified on the mirror.
    keep = {e.id for e in local_index.checkpoints}
    final = [e for i, e in have.items() if i in keep]
    mirror_index = Index(run_name=local_index.run_name, next_id=local_index.next_id).with_entries(final)
    atomic_write_json(mirror_run / INDEX_FILE, mirror_index.to_dict())
    for checkpoint_id, path in checkpoint_files_on_disk(mirror_run).items():
        if checkpoint_id not in keep and checkpoint_id < (local_index.latest.id if local_index.latest else -1):
            if remove_file(path):
                report.deleted.append(f"{CHECKPOINT_DIR}/{path.name}")
    if report.deleted:
        fsync_dir(mirror_run / CHECKPOINT_DIR)
    return report


def _sync_best(local_run: Path, mirror_run: Path, report: SyncReport, on_progress: ProgressCallback) -> None:
    try:
        best = read_best(local_run)
    except (CorruptIndexError, UnsafePathError) as exc:
        log.warning("not mirroring the best model: %s", exc)
        return
    if best is None:
        return
    try:
        mirror_best = read_best(mirror_run)
    except (CorruptIndexError, UnsafePathError):
        mirror_best = None
    dst = resolve_inside(mirror_run, best.path)
    if mirror_best is not None and mirror_best.checksum == best.checksum and dst.exists():
        report.skipped.append(best.path)
        return
    try:
        size = _copy_unless_source_gone(resolve_inside(local_run, best.path), dst, best.checksum, on_progress)
    except CheckpointIntegrityError as exc:
        # The trainer replaces best_model.pt, then best_metadata.json, and asks for another
        # sync once both are written; a damaged local best is verify's to report. Either way
        # the mirror keeps its previous best, and the rest of this sync goes on.
        log.info("best model not mirrored this time: %s", exc)
        return
    if size is None:
        return
    report.copied.append(best.path)
    report.bytes_copied += size
    atomic_write_json(mirror_run / BEST_METADATA_FILE, best.to_dict())


def _reason_key(exc: BaseException) -> tuple:
    """What makes two failures "the same": the error type and errno (messages carry temp names)."""
    errno_ = getattr(exc, "errno", None)
    return (exc.__class__.__name__, errno_) if errno_ is not None else (exc.__class__.__name__, str(exc))


class BackgroundMirror:
    """Runs :func:`sync_run` on a daemon thread whenever :meth:`request` is called.

    Failures are logged once per distinct reason and retried with exponential backoff
    (``initial_backoff`` doubling up to ``max_backoff`` seconds); when Drive comes back
    the next attempt catches up. ``on_synced(report)`` is called after each success.
    """

    def __init__(
        self,
        local_run: str | os.PathLike,
        mirror_run: str | os.PathLike,
        *,
        on_synced: Callable[[SyncReport], None] | None = None,
        initial_backoff: float = 1.0,
        max_backoff: float = 300.0,
    ):
        self.local_run = Path(local_run)
        self.mirror_run = Path(mirror_run)
        self._on_synced = on_synced
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._wake = threading.Condition()
        self._pending = False
        self._busy = False
        self._stop = False
        self.last_error: str | None = None
        self._last_key: tuple | None = None
        self.last_report: SyncReport | None = None
        self._thread = threading.Thread(target=self._loop, name="ckptctl-mirror", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Ask for a sync soon (coalesces with a pending request)."""
        with self._wake:
            self._pending = True
            self._wake.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no sync is pending or running; False on timeout (Drive still failing)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            while self._pending or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wake.wait(remaining)
        return True

    def stop(self, timeout: float | None = None) -> bool:
        """Finish pending work (up to ``timeout`` seconds) and stop the thread; True if fully synced."""
        synced = self.wait_idle(timeout)
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=1.0)
        return synced

    def _loop(self) -> None:
        backoff = self._initial_backoff
        while True:
            with self._wake:
                while not self._pending and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                self._pending = False
                self._busy = True
            try:
                report = sync_run(self.local_run, self.mirror_run)
            except Exception as exc:  # Drive fails in many ways; none may reach training
                key = _reason_key(exc)
                if key != self._last_key:  # once per cause, not per temporary file name
                    log.warning("Drive mirror %s failed (will retry): %s: %s", self.mirror_run, exc.__class__.__name__, exc)
                self._last_key = key
                self.last_error = f"{exc.__class__.__name__}: {exc}"
                with self._wake:
                    self._busy = False
                    self._pending = True
                    self._wake.notify_all()
                    deadline = time.monotonic() + backoff  # new saves do not cut the backoff short; stop() does
                    while not self._stop and deadline - time.monotonic() > 0:
                        self._wake.wait(deadline - time.monotonic())
                backoff = min(backoff * 2, self._max_backoff)
                continue
            if self.last_error is not None:
                log.warning("Drive mirror %s recovered", self.mirror_run)
            self.last_error = None
            self._last_key = None
            backoff = self._initial_backoff
            self.last_report = report
            if self._on_synced is not None:
                try:
                    self._on_synced(report)
                except Exception as exc:  # a callback bug must not kill the mirror thread
                    log.warning("mirror callback failed: %s", exc)
            with self._wake:
                self._busy = False
                self._wake.notify_all()
