"""Mirroring a run to a second folder (a mounted Google Drive) with the same layout, within a byte budget.

:func:`sync_run` copies the newest local checkpoint first, then the best model, then older
checkpoints newest to oldest as the budget allows. Each copy goes to a temporary name, is
fsynced, renamed, then read back and checked against the local checksum; the mirror's
index lists only verified copies. To make room it frees the mirror's lowest-priority
copies first (see :func:`sync_run`) and never the newest verified checkpoint before a
newer one is verified. A full Drive (ENOSPC/EDQUOT) is handled the same way, and an item
that cannot fit or a damaged local checkpoint is skipped and reported, never retried
forever. :class:`BackgroundMirror` runs it on a thread with retry and backoff, so a slow,
full or unmounted Drive never blocks training.

Deleting on Drive: a file removed through the Drive mount goes to Drive's trash, which
counts against the quota for 30 days. So every copy the mirror drops is first removed
from the mirror index (durably), then truncated to zero bytes, then unlinked; every file
the mirror replaces (a re-copied checkpoint, ``best_model.pt``, the JSON files, logs) is
held open across the rename and truncated through that handle afterwards. A crash
between the steps leaves an unindexed file that the next sync removes.

Format 2 (tensor packs, :mod:`ckptctl.core.objects`): the unit copied is the stored object.
For each checkpoint (and the best model) the packs it lists that the mirror does not hold
verified yet are copied first (checked by their names), then its skeleton, then the
mirror's index. A pack is verified on the mirror when the mirror's own committed index or
best record references it (and it has its size there), or when this sync copied it or read
it back; it is never uploaded again, so a save uploads only what changed. A pack is deleted
(truncated, then unlinked) only after the mirror's index and best record that stopped
referencing it are durable.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from ckptctl.core.format import (
    BEST_METADATA_FILE,
    BEST_MODEL_FILE,
    CHECKPOINT_DIR,
    INDEX_FILE,
    MIRROR_STATUS_FILE,
    TRAINING_LOG_FILE,
    TRAINING_STATE_FILE,
    checkpoint_relpath,
    utc_now_iso,
)
from ckptctl.core.manifest import BestInfo, CheckpointEntry, Index, mirrored_record
from ckptctl.core.objects import pack_checksum, pack_relpath, referenced_packs
from ckptctl.core.units import parse_size
from ckptctl.errors import CheckpointIntegrityError, CkptctlError, CorruptIndexError, UnsafePathError
from ckptctl.storage.atomic import (
    BeforeReplace,
    ProgressCallback,
    atomic_copy,
    atomic_write_json,
    cleanup_temporaries,
    fsync_dir,
    hash_file,
    remove_file,
    resolve_inside,
)
from ckptctl.storage.objects import objects_dir, stored_pack_names
from ckptctl.storage.runfiles import best_records, checkpoint_file_for_deletion, replace_best, settle
from ckptctl.storage.scan import checkpoint_files_on_disk, is_run_dir, mtime_iso, read_best_record, read_index, read_json_file

log = logging.getLogger("ckptctl.mirror")

#: Errors that mean "the Drive is full" (or the quota is): handled by freeing a copy and retrying.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

#: :func:`default_budget` keeps this fraction of (free space + this run's mirror) unused:
#: room for the JSON files, for other writers on the same Drive, and for a filesystem
#: that reports free space a little optimistically (Drive's FUSE layer does).
BUDGET_MARGIN = 0.05

#: A temporary on the mirror not written to for this long is a leftover of a killed copy.
STALE_TEMPORARY_SECONDS = 600.0

#: Room kept for the mirror's JSON files on top of the index's current size (growth by one
#: entry, and its temporary while it is rewritten).
METADATA_RESERVE = 8192

# Priority classes of what the mirror holds; a lower key is freed first.
_RETIRED, _UNLISTED, _OLDER, _BEST, _NEWEST = range(5)
_BEST_KEY = (_BEST, 0)

#: Warnings already logged (a damaged checkpoint, a checkpoint too big): each once per process.
_logged: set[tuple] = set()


class MirrorError(CkptctlError):
    """The mirror folder cannot be written or a copy did not verify."""


@dataclass
class SyncReport:
    """What one :func:`sync_run` did, and where the mirror stands afterwards.

    ``mirrored`` maps every local checkpoint id whose copy is verified on the mirror (same
    checksum) to ``{"checksum", "size_bytes", "at"}``; :func:`apply_sync_report` records it
    in the local index. Ids, bytes and times are raw values.
    """

    #: Checkpoint files and ``best_model.pt`` copied (run-relative), and their bytes (packs: ``objects_*``).
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: Files removed from the mirror (checkpoint copies, the best model, packs nothing references).
    deleted: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    mirrored: dict[int, dict] = field(default_factory=dict)
    #: Highest checkpoint id verified on the mirror after this sync (None: none there).
    newest_verified_id: int | None = None
    #: When that copy was verified (ISO, UTC), as far as known.
    newest_verified_at: str | None = None
    #: Ids in the local index that are not verified on the mirror (budget, damage, too big).
    not_mirrored: list[int] = field(default_factory=list)
    #: Bytes of every file under the mirror run after the sync.
    used_bytes: int = 0
    #: The byte budget the sync kept to (None: none given, only a full Drive limited it).
    budget_bytes: int | None = None
    deleted_ids: list[int] = field(default_factory=list)
    #: Checkpoint ids present on the mirror after the sync (indexed or not).
    mirror_ids: list[int] = field(default_factory=list)
    #: Set when even the newest local checkpoint could not be placed: why, with sizes.
    too_big: str | None = None
    #: Local entries that could not be copied: ``{"id", "path", "reason"}``.
    damaged: list[dict] = field(default_factory=list)
    #: Tensor packs (``objects/<name>.safetensors``) uploaded by this sync, and their bytes.
    objects_copied: list[str] = field(default_factory=list)
    objects_bytes: int = 0

    @property
    def uploaded_bytes(self) -> int:
        """Every byte this sync uploaded: checkpoint files, the best model and packs (a save's new data only)."""
        return self.bytes_copied + self.objects_bytes


# --------------------------------------------------------------------------- small file helpers


def _is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def _open_regular_for_truncation(path: Path) -> int | None:
    """A write handle on ``path`` if it is a regular file (never through a symlink); else None."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _truncate_fd(fd: int, what: Path) -> None:
    try:
        os.ftruncate(fd, 0)
        os.fsync(fd)
    except OSError as exc:  # a Drive that refuses: the old bytes stay in its trash, nothing worse
        log.debug("could not truncate the old %s: %s", what, exc)


@contextlib.contextmanager
def _truncating_replaced(path: Path, keep_if_same_as: Path | None = None) -> Iterator[None]:
    """Around an atomic replace of ``path``: afterwards truncate the file it replaced.

    The old file is held open across the rename and truncated through that handle, so the
    inode Drive moves to its trash holds no bytes. Nothing happens if the body fails (the
    old file is still the live one), or when the old file is the same inode as
    ``keep_if_same_as`` (a mirror that shares files with the local run).
    """
    fd = _open_regular_for_truncation(path)
    try:
        yield
        if fd is not None and not _same_inode(fd, keep_if_same_as):
            _truncate_fd(fd, path)
    finally:
        if fd is not None:
            os.close(fd)


def _same_inode(fd: int, other: Path | None) -> bool:
    if other is None:
        return False
    try:
        a, b = os.fstat(fd), os.stat(other)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _truncate_and_unlink(path: Path, keep_if_same_as: Path | None = None) -> bool:
    """Remove a mirror file without leaving its bytes in Drive's trash: truncate, fsync, unlink, fsync dir."""
    fd = _open_regular_for_truncation(path)
    if fd is None:
        return False  # absent, a symlink, or not a regular file: not ours to remove
    try:
        if not _same_inode(fd, keep_if_same_as):
            _truncate_fd(fd, path)
    finally:
        os.close(fd)
    removed = remove_file(path)
    if removed:
        fsync_dir(path.parent)
    return removed


def _write_json(path: Path, obj: Any) -> None:
    """:func:`atomic_write_json` on the mirror, truncating the file it replaces."""
    with _truncating_replaced(path):
        atomic_write_json(path, obj)


def _write_best_json(path: Path, obj: dict[str, Any]) -> None:
    """The mirror's best_metadata.json writer: settling it may fail on a full Drive (its pending record still describes the copy)."""
    try:
        _write_json(path, obj)
    except OSError as exc:
        if "pending" in obj or not _is_no_space(exc):
            raise
        log.info("best model metadata not settled on the mirror this time (Drive full); its pending record describes the copy")


def _copy_verified(
    src: Path, dst: Path, checksum: str | None, on_progress: ProgressCallback, *, before_replace: BeforeReplace = None
) -> int:
    """Atomic copy (old ``dst`` truncated after the rename), then read back and compare; return the size."""
    with _truncating_replaced(dst, keep_if_same_as=src):
        size, copied_sum = atomic_copy(src, dst, expected_checksum=checksum, on_progress=on_progress, before_replace=before_replace)
    expected = checksum or copied_sum
    read_size, read_sum = hash_file(dst, expected.split(":", 1)[0])
    if read_sum != expected or read_size != size:
        _truncate_and_unlink(dst)
        raise MirrorError(f"{dst}: read-back after copy does not match the source checksum")
    return size


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of every regular file under ``path`` (symlinks are not followed, not counted)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _read_mirror_index(mirror_run: Path, run_name: str) -> Index:
    try:
        return read_index(mirror_run)
    except (FileNotFoundError, CorruptIndexError):
        return Index(run_name=run_name, next_id=0)


# --------------------------------------------------------------------------- budget


def check_mirror_apart(local_run: str | os.PathLike, mirror_run: str | os.PathLike) -> None:
    """Raise :class:`MirrorError` when the mirror folder is the run itself, inside it, or contains it.

    Such a mirror would copy the run onto itself and its clean-up would delete the
    trainer's own files in flight.
    """
    run, mirror = Path(local_run).resolve(), Path(mirror_run).resolve()
    if mirror == run:
        where = "is the run folder itself"
    elif run in mirror.parents:
        where = "is inside the run folder"
    elif mirror in run.parents:
        where = "contains the run folder"
    else:
        return
    raise MirrorError(f"Drive mirror {mirror} {where} {run}; choose a Drive folder outside the run's folder")


def default_budget(mirror_root_or_run: str | os.PathLike) -> int:
    """The byte budget used when none is given: free space + this run's mirror, less :data:`BUDGET_MARGIN`.

    Free space is what the Drive folder's filesystem reports (``statvfs``: ``f_bavail *
    f_frsize``) for the path or, if it does not exist yet, its nearest existing parent.
    "This run's mirror" counts only when the path is a mirror run (a root holding several
    runs counts none of them). The caller logs the result once.
    """
    path = Path(mirror_root_or_run)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    st = os.statvfs(probe)
    free = st.f_bavail * st.f_frsize
    used = tree_bytes(path) if path.is_dir() and (is_run_dir(path) or (path / CHECKPOINT_DIR).is_dir()) else 0
    return int((free + used) * (1.0 - BUDGET_MARGIN))


def resolve_budget(value: int | str | None, mirror_run: str | os.PathLike) -> int:
    """Turn a budget setting into bytes: an int as it is, a size string (``"14GB"``, ``"500MiB"``), or None for :func:`default_budget`.

    Raises ValueError for a string that is not a size, or a budget that is not positive.
    """
    if value is None:
        return default_budget(mirror_run)
    if isinstance(value, bool):
        raise ValueError(f"Drive max size must be bytes or a size like 14GB, not {value!r}")
    if isinstance(value, str):
        try:
            value = parse_size(value)
        except ValueError as exc:
            raise ValueError(f"Drive max size: {exc}") from None
    if not isinstance(value, int):
        raise ValueError(f"Drive max size must be bytes or a size like 14GB, not {value!r}")
    if value <= 0:
        raise ValueError(f"Drive max size must be positive, got {value}")
    return value


# --------------------------------------------------------------------------- one sync


class _Sync:
    """The state of one :func:`sync_run` (the mirror's verified copies, the budget, the report)."""

    def __init__(self, local_run: Path, mirror_run: Path, max_bytes: int | None, on_progress: ProgressCallback):
        check_mirror_apart(local_run, mirror_run)
        self.local_run = local_run
        self.mirror_run = mirror_run
        self.max_bytes = max_bytes
        self.on_progress = on_progress
        self.report = SyncReport(budget_bytes=max_bytes)
        self.local_index = read_index(local_run)
        self.local = self.local_index.by_id()
        self.newest_local = self.local_index.latest.id if self.local_index.latest else None
        self.retired = set(self.local_index.retired) - set(self.local)
        # Not parents=True: a Drive folder that vanished (unmounted) must fail here, not be
        # recreated on the local disk under the mount point and reported as mirrored.
        mirror_run.mkdir(exist_ok=True)
        (mirror_run / CHECKPOINT_DIR).mkdir(exist_ok=True)
        # No lock covers a Drive folder: another machine (or a writer this one took over
        # from) may be copying into it. Only temporaries idle long enough are leftovers.
        cleanup_temporaries(mirror_run, idle_for=STALE_TEMPORARY_SECONDS)
        cleanup_temporaries(mirror_run / CHECKPOINT_DIR, idle_for=STALE_TEMPORARY_SECONDS)
        cleanup_temporaries(objects_dir(mirror_run), idle_for=STALE_TEMPORARY_SECONDS)
        self.mirror_index = _read_mirror_index(mirror_run, self.local_index.run_name)
        self.verified: dict[int, CheckpointEntry] = dict(self.mirror_index.by_id())
        self.durable: list[CheckpointEntry] = list(self.mirror_index.checkpoints)  # what the mirror's index file lists
        self.packs_ok: set[str] = set()  # packs verified on the mirror (see the module docstring)
        self.placing: set[str] = set()  # packs of the item being copied: never collected meanwhile
        self.verified_at: dict[int, str] = {}
        self.no_room_from: int | None = None  # after a full Drive with nothing to free: sizes >= this are skipped
        self.best_stuck = False  # the mirror's best model could not be removed (not a plain file we may write)

    # ---------------------------------------------------------------- bookkeeping

    def used(self) -> int:
        return tree_bytes(self.mirror_run)

    def reserve(self) -> int:
        return (_size_or_none(self.mirror_run / INDEX_FILE) or 0) + METADATA_RESERVE

    def write_index(self) -> None:
        next_id = max(self.local_index.next_id, self.mirror_index.next_id)
        self.mirror_index = replace(self.mirror_index, next_id=next_id).with_entries(list(self.verified.values()))
        _write_json(self.mirror_run / INDEX_FILE, self.mirror_index.to_dict())
        self.durable = list(self.mirror_index.checkpoints)

    def newest_verified(self) -> int | None:
        return max(self.verified) if self.verified else None

    def key(self, checkpoint_id: int) -> tuple[int, int]:
        """Priority of a checkpoint copy: freed lowest first (retired, unlisted, older kept; oldest first)."""
        if checkpoint_id in self.local:
            return (_NEWEST, 0) if checkpoint_id == self.newest_local else (_OLDER, checkpoint_id)
        if checkpoint_id in self.retired:
            return (_RETIRED, checkpoint_id)
        return (_UNLISTED, checkpoint_id)

    def best_on_mirror(self) -> bool:
        path = self.mirror_run / BEST_MODEL_FILE
        return not self.best_stuck and path.is_file() and not path.is_symlink()

    # ---------------------------------------------------------------- freeing

    def free_one(self, below: tuple[int, int] | None, own: int | str | None = None) -> bool:
        """Free the lowest-priority copy whose key is below ``below`` (None: any); the item's own old copy last.

        Packs nothing references (a cut sync's) go before any copy. The newest verified
        checkpoint copy is never freed. Returns False when nothing may go.
        """
        if self.collect_packs():
            return True
        protect = self.newest_verified()
        candidates: list[tuple[tuple[int, int], object]] = [
            (self.key(i), i) for i in self.verified if i != protect and i != own
        ]
        if own != "best" and self.best_on_mirror():
            candidates.append((_BEST_KEY, "best"))
        allowed = [c for c in candidates if below is None or c[0] < below]
        if allowed:
            victim = min(allowed, key=lambda c: c[0])[1]
        elif own == "best" and self.best_on_mirror():
            victim = "best"
        elif isinstance(own, int) and own in self.verified and own != protect:
            victim = own
        else:
            return False
        if victim == "best":
            self.delete_best()
        else:
            self.delete_copy(victim)
        return True

    def delete_copy(self, checkpoint_id: int) -> None:
        """Drop a checkpoint copy: out of the mirror index (durably), then truncate, then unlink."""
        entry = self.verified.pop(checkpoint_id)
        try:
            if entry.path != checkpoint_relpath(checkpoint_id):
                raise UnsafePathError(f"{entry.path}: not the file of checkpoint {checkpoint_id}")
            path = checkpoint_file_for_deletion(self.mirror_run, entry)
        except UnsafePathError as exc:
            log.warning("mirror: dropping index entry %s without touching its file: %s", checkpoint_id, exc)
            path = None
        local_path = self.local_run / entry.path if path is not None else None
        try:
            self.write_index()
        except OSError as exc:
            if not _is_no_space(exc) or path is None:
                self.verified[checkpoint_id] = entry
                raise
            # Not even room for the index: free the file's bytes first, then write the index.
            # (A crash between leaves an indexed empty file, which the next sync drops.)
            fd = _open_regular_for_truncation(path)
            if fd is not None:
                try:
                    _truncate_fd(fd, path)
                finally:
                    os.close(fd)
            self.write_index()
        if path is not None and _truncate_and_unlink(path, keep_if_same_as=local_path):
            self.report.deleted.append(entry.path)
        if checkpoint_id not in self.report.deleted_ids:
            self.report.deleted_ids.append(checkpoint_id)
        self.collect_packs()

    def delete_best(self) -> None:
        """Drop the mirror's best model: its metadata first, then the truncated file."""
        if remove_file(self.mirror_run / BEST_METADATA_FILE):
            fsync_dir(self.mirror_run)
        if _truncate_and_unlink(self.mirror_run / BEST_MODEL_FILE, keep_if_same_as=self.local_run / BEST_MODEL_FILE):
            self.report.deleted.append(BEST_MODEL_FILE)
        else:
            self.best_stuck = True
        self.collect_packs()

    def place(self, key: tuple[int, int], size: int, own: int | str | None, copy: Callable[[], None]) -> bool:
        """Make room for ``size`` bytes (budget first, then a full Drive) and run ``copy``; False if it cannot fit."""
        if self.no_room_from is not None and size >= self.no_room_from:
            return False
        while True:
            if self.max_bytes is not None and self.used() + size + self.reserve() > self.max_bytes:
                if not self.free_one(key, own):
                    return False
                continue
            try:
                copy()
                return True
            except OSError as exc:
                if not _is_no_space(exc):
                    raise
                if not self.free_one(key, own):
                    self.no_room_from = size if self.no_room_from is None else min(self.no_room_from, size)
                    log.debug("mirror: Drive full, %d bytes do not fit: %s", size, exc)
                    return False

    def write_index_making_room(self, key: tuple[int, int]) -> None:
        while True:
            try:
                self.write_index()
                return
            except OSError as exc:
                if not _is_no_space(exc) or not self.free_one(key):
                    raise

    # ---------------------------------------------------------------- packs

    def pack_paths(self, name: str) -> tuple[Path, Path]:
        """The local and the mirror path of pack ``name``."""
        relpath = pack_relpath(name)
        return self.local_run / relpath, self.mirror_run / relpath

    def pack_on_mirror(self, name: str, size: int) -> bool:
        """True if pack ``name`` is verified on the mirror; one there unverified (a cut sync's) is read back and adopted."""
        if name in self.packs_ok:
            return True
        dst = self.pack_paths(name)[1]
        if _size_or_none(dst) == size and self._matches(dst, pack_checksum(name)):
            self.packs_ok.add(name)
            return True
        return False

    def new_pack_bytes(self, record: CheckpointEntry | BestInfo) -> int:
        """Bytes of the packs ``record`` lists that the mirror does not hold verified: what its copy uploads besides the file."""
        return sum(size for name, size in record.objects.items() if not self.pack_on_mirror(name, size))

    def copy_packs(self, record: CheckpointEntry | BestInfo) -> None:
        """Copy the packs ``record`` lists that the mirror lacks, each checked by its name (before the file that lists them)."""
        for name in record.objects:
            if name in self.packs_ok:
                continue
            src, dst = self.pack_paths(name)
            dst.parent.mkdir(exist_ok=True)
            size = _copy_verified(src, dst, pack_checksum(name), self.on_progress)
            self.packs_ok.add(name)
            self.report.objects_copied.append(pack_relpath(name))
            self.report.objects_bytes += size

    @contextlib.contextmanager
    def placing_packs(self, record: CheckpointEntry | BestInfo) -> Iterator[None]:
        """While ``record`` is copied and indexed: its packs are kept by :meth:`collect_packs`."""
        self.placing = set(record.objects)
        try:
            yield
        finally:
            self.placing = set()

    def collect_packs(self) -> bool:
        """Delete (truncate, unlink) the mirror's packs that its durable index and best record do not reference; True if any went.

        Nothing is deleted while the mirror's best metadata is unreadable (its packs are
        unknown; the next best-model copy rewrites it).
        """
        try:
            best = best_records(read_best_record(self.mirror_run))
        except (CorruptIndexError, UnsafePathError):
            return False
        live = set(referenced_packs([*self.durable, *self.verified.values(), *best])) | self.placing
        deleted = False
        for name in sorted(set(stored_pack_names(self.mirror_run)) - live):
            self.packs_ok.discard(name)
            local, path = self.pack_paths(name)
            if _truncate_and_unlink(path, keep_if_same_as=local):
                self.report.deleted.append(pack_relpath(name))
                deleted = True
        return deleted

    def _missing_source(self, sources: list[Path]) -> Path | None:
        """The first of ``sources`` (local files of one copy) that is gone; None when all are there (the mirror side failed)."""
        return next((path for path in sources if not path.exists()), None)

    # ---------------------------------------------------------------- steps

    def reconcile(self) -> None:
        """Make the mirror index match its files, and deal with files it does not list (crash leftovers)."""
        changed = False
        stored = stored_pack_names(self.mirror_run)
        for checkpoint_id, entry in list(self.verified.items()):
            try:
                size = _size_or_none(resolve_inside(self.mirror_run, entry.path))
            except UnsafePathError:
                size = None
            packs_there = all(stored.get(name) == n for name, n in entry.objects.items())
            if size != entry.size_bytes or not packs_there:  # gone or truncated since it was verified: not a verified copy
                del self.verified[checkpoint_id]
                changed = True
        self.packs_ok = self._committed_packs(stored)
        for checkpoint_id, path in sorted(checkpoint_files_on_disk(self.mirror_run).items()):
            entry = self.verified.get(checkpoint_id)
            if entry is not None and entry.path == f"{CHECKPOINT_DIR}/{path.name}":
                continue
            size = _size_or_none(path)
            mine = self.local.get(checkpoint_id)
            if size == 0 or (checkpoint_id in self.retired and entry is None):
                _truncate_and_unlink(path)
            elif mine is not None and entry is None:
                if size == mine.size_bytes and self._matches(path, mine.checksum) and self.new_pack_bytes(mine) == 0:
                    self.verified[checkpoint_id] = replace(mine, mirrored=None)  # adopted: no re-upload
                    self.verified_at[checkpoint_id] = mtime_iso(path) or utc_now_iso()
                    changed = True
                else:
                    _truncate_and_unlink(path, keep_if_same_as=self.local_run / mine.path)
            # anything else is not ours to delete (its bytes still count against the budget)
        if changed:
            self.write_index_making_room((_NEWEST, 0))

    def _committed_packs(self, stored: dict[str, int]) -> set[str]:
        """Packs the mirror's index or best record references that are there with their size: verified when copied."""
        try:
            best = best_records(read_best_record(self.mirror_run))
        except (CorruptIndexError, UnsafePathError):
            best = []
        referenced = referenced_packs([*self.verified.values(), *best])
        return {name for name, size in referenced.items() if stored.get(name) == size}

    @staticmethod
    def _matches(path: Path, checksum: str) -> bool:
        try:
            return hash_file(path, checksum.split(":", 1)[0])[1] == checksum
        except (OSError, ValueError):
            return False

    def sync_checkpoint(self, entry: CheckpointEntry) -> None:
        have = self.verified.get(entry.id)
        if have is not None and have.checksum == entry.checksum:
            self.report.skipped.append(entry.path)  # verified when copied; reconcile re-checked its size
            if have != replace(entry, mirrored=None):
                self.verified[entry.id] = replace(entry, mirrored=None)  # pinned etc. changed locally
            return
        try:
            src = resolve_inside(self.local_run, entry.path)
            dst = resolve_inside(self.mirror_run, entry.path)
        except UnsafePathError as exc:
            self._damaged(entry, str(exc))
            return
        size = _size_or_none(src)
        if size is None:
            self._missing(entry, entry.path)
            return
        with self.placing_packs(entry):
            self._place_checkpoint(entry, src, dst, size + self.new_pack_bytes(entry))

    def _place_checkpoint(self, entry: CheckpointEntry, src: Path, dst: Path, size: int) -> None:
        """Copy checkpoint ``entry`` (its new packs, then its file; ``size`` bytes to upload), then list it in the mirror's index."""
        copied: list[int] = []

        def copy() -> None:
            self.copy_packs(entry)
            copied.append(_copy_verified(src, dst, entry.checksum, self.on_progress))

        key = self.key(entry.id)
        try:
            placed = self.place(key, size, entry.id, copy)
        except CheckpointIntegrityError as exc:
            self._damaged(entry, str(exc))
            return
        except FileNotFoundError:
            gone = self._missing_source([src, *(self.pack_paths(name)[0] for name in entry.objects)])
            if gone is None:
                raise  # the mirror side failed
            self._missing(entry, gone.relative_to(self.local_run).as_posix())
            return
        if not placed:
            if entry.id == self.newest_local:
                self._too_big(entry, size)
            return
        self.report.copied.append(entry.path)
        self.report.bytes_copied += copied[0]
        self.verified[entry.id] = replace(entry, mirrored=None)
        self.verified_at[entry.id] = utc_now_iso()
        self.write_index_making_room(key)

    def _missing(self, entry: CheckpointEntry, relpath: str) -> None:
        """A local file of ``entry`` (``relpath``) is gone: damaged if the local index still lists it, else pruned meanwhile."""
        try:
            still_listed = entry.id in read_index(self.local_run).by_id()
        except (OSError, CorruptIndexError):
            still_listed = True
        if still_listed:
            self._damaged(entry, f"{relpath}: file is missing")
        # else: local retention deleted it since the index was read; nothing to mirror

    def _damaged(self, entry: CheckpointEntry, reason: str) -> None:
        logged_key = ("damaged", str(self.mirror_run), entry.id, entry.checksum)
        if logged_key not in _logged:  # once, not at every sync (the report carries it each time)
            _logged.add(logged_key)
            log.warning("not mirroring checkpoint %s: %s", entry.id, reason)
        self.report.damaged.append({"id": entry.id, "path": entry.path, "reason": reason})

    def _too_big(self, entry: CheckpointEntry, size: int) -> None:
        kept = self.newest_verified()
        used = self.used()
        limit = f"the {self.max_bytes}-byte budget" if self.max_bytes is not None else "the space left on Drive"
        message = (
            f"checkpoint {entry.id} ({size} bytes) does not fit in {limit} "
            f"({used} bytes on the mirror that may not be freed); "
            + (f"keeping checkpoint {kept} there" if kept is not None else "no checkpoint is on the mirror")
        )
        self.report.too_big = message
        # once per distinct sizes (to two significant digits: checkpoints of one run differ by a few bytes)
        logged_key = ("too big", str(self.mirror_run), self.max_bytes, round(size, -max(0, len(str(size)) - 2)))
        if logged_key not in _logged:
            _logged.add(logged_key)
            log.warning("Drive mirror %s: %s", self.mirror_run, message)

    def sync_best(self) -> None:
        try:
            record = read_best_record(self.local_run)
        except (CorruptIndexError, UnsafePathError) as exc:
            log.warning("not mirroring the best model: %s", exc)
            return
        # during the trainer's replace (or after a crash in one): the record the file matches now
        best = settle(self.local_run, record)
        if best is None:
            return
        mirror_best = self._settled_mirror_best()
        try:
            src = resolve_inside(self.local_run, best.path)
            dst = resolve_inside(self.mirror_run, best.path)
        except UnsafePathError as exc:
            log.warning("not mirroring the best model: %s", exc)
            return
        if (
            mirror_best is not None
            and mirror_best.checksum == best.checksum
            and _size_or_none(dst) == best.size_bytes
            and all(name in self.packs_ok for name in best.objects)
        ):
            self.report.skipped.append(best.path)
            return
        size = _size_or_none(src)
        if size is None:
            return
        with self.placing_packs(best):
            self._place_best(best, src, dst, size + self.new_pack_bytes(best))

    def _settled_mirror_best(self) -> BestInfo | None:
        """The mirror's best record; a replace there that a kill cut short is settled first (its record written alone).

        Otherwise a mirror killed between its rename and its metadata would keep the two
        records for good: the copy it holds is up to date, so it is never replaced again.
        """
        try:
            record = read_best_record(self.mirror_run)
        except (CorruptIndexError, UnsafePathError):
            return None
        best = settle(self.mirror_run, record)
        if best is not None and record.pending is not None:
            try:
                _write_best_json(self.mirror_run / BEST_METADATA_FILE, best.to_dict())
            except OSError as exc:
                log.info("best model metadata not settled on the mirror this time: %s", exc)
        return best

    def _place_best(self, best: BestInfo, src: Path, dst: Path, size: int) -> None:
        """Copy the best model (its new packs, then the file and its record in one commit; ``size`` bytes to upload)."""
        copied: list[int] = []

        def copy() -> None:
            def write_file(before: BeforeReplace) -> tuple[int, str]:
                copied.append(_copy_verified(src, dst, best.checksum, self.on_progress, before_replace=before))
                return copied[-1], best.checksum

            self.copy_packs(best)
            replace_best(self.mirror_run, write_file, lambda _size, _checksum: best, write_json=_write_best_json)

        try:
            placed = self.place(_BEST_KEY, size, "best", copy)
        except (CheckpointIntegrityError, FileNotFoundError) as exc:
            sources = [src, *(self.pack_paths(name)[0] for name in best.objects)]
            if isinstance(exc, FileNotFoundError) and self._missing_source(sources) is None:
                raise
            # The trainer may replace best_model.pt during the copy (which then fails its
            # checksum); it asks for another sync once its replace is settled. A damaged local
            # best is verify's to report. Either way the mirror keeps its previous best, and
            # the rest of this sync goes on.
            log.info("best model not mirrored this time: %s", exc)
            return
        if not placed:
            log.info("best model (%d bytes) does not fit on the mirror this time", size)
            return
        self.report.copied.append(best.path)
        self.report.bytes_copied += copied[-1]

    def retire(self) -> None:
        """Delete copies local retention removed (ids in the local index's ``retired``), older than every kept one."""
        if not self.local:
            return
        oldest_kept = min(self.local)
        protect = self.newest_verified()
        for checkpoint_id in sorted(self.verified):
            if checkpoint_id in self.retired and checkpoint_id < oldest_kept and checkpoint_id != protect:
                self.delete_copy(checkpoint_id)

    def sync_logs(self) -> None:
        for name in (TRAINING_STATE_FILE, TRAINING_LOG_FILE):
            src = self.local_run / name
            if not src.is_file() or src.is_symlink():
                continue
            size = _size_or_none(src) or 0

            def copy(src: Path = src, name: str = name) -> None:
                with _truncating_replaced(self.mirror_run / name, keep_if_same_as=src):
                    atomic_copy(src, self.mirror_run / name)

            try:
                # logs may free only copies of checkpoints local retention removed
                if not self.place((_UNLISTED, -1), size, None, copy):
                    log.info("%s not mirrored this time: no room within the budget", name)
            except FileNotFoundError:
                if src.exists():
                    raise

    def trim(self) -> None:
        """Free lowest-priority copies until the mirror is within the budget (the newest verified stays)."""
        if self.max_bytes is None:
            return
        while self.used() > self.max_bytes and self.free_one(None):
            pass

    def finish(self) -> SyncReport:
        self.write_index_making_room((_NEWEST, 0))
        self.collect_packs()  # packs of copies dropped, of a cut sync, of a replaced best model
        report = self.report
        now = utc_now_iso()
        for checkpoint_id, entry in sorted(self.local.items()):
            have = self.verified.get(checkpoint_id)
            if have is None or have.checksum != entry.checksum:
                report.not_mirrored.append(checkpoint_id)
                continue
            if (
                entry.mirrored
                and entry.mirrored.get("checksum") == entry.checksum
                and entry.mirrored.get("mirror", str(self.mirror_run)) == str(self.mirror_run)
                and checkpoint_id not in self.verified_at
            ):
                report.mirrored[checkpoint_id] = dict(entry.mirrored)
            else:
                at = self.verified_at.get(checkpoint_id, now)
                report.mirrored[checkpoint_id] = mirrored_record(entry.checksum, have.size_bytes, at, str(self.mirror_run))
        newest = self.newest_verified()
        report.newest_verified_id = newest
        if newest is not None:
            info = report.mirrored.get(newest)
            report.newest_verified_at = (
                self.verified_at.get(newest)
                or (info or {}).get("at")
                or mtime_iso(self.mirror_run / self.verified[newest].path)
            )
        report.mirror_ids = sorted(set(self.verified) | set(checkpoint_files_on_disk(self.mirror_run)))
        report.used_bytes = self.used()
        return report


def sync_run(
    local_run: str | os.PathLike,
    mirror_run: str | os.PathLike,
    *,
    max_bytes: int | None = None,
    on_progress: ProgressCallback = None,
    include_logs: bool = True,
) -> SyncReport:
    """Bring ``mirror_run`` up to date with ``local_run`` within ``max_bytes``; return what was done.

    Order: the newest local checkpoint, the best model, then older checkpoints newest to
    oldest as the budget allows; then the logs. The budget counts every file under
    ``mirror_run`` (so each pack once, however many checkpoints share it) plus what the
    copy in flight uploads (and a little room for the index). To make room
    the mirror frees, lowest priority first: copies of checkpoints local retention removed
    (ids in the local index's ``retired``), then copies of ids the local run does not list,
    then older kept ones (oldest first in each group), the best model's copy last; never
    the newest verified checkpoint copy, and never a copy of higher priority than the
    item being placed. Packs nothing on the mirror references (a cut sync's) go first; a
    freed copy's packs go with it unless another copy or the best model there references
    them. A full Drive (ENOSPC/EDQUOT) is handled the same way. An item that
    cannot fit is left out (``report.not_mirrored``; for the newest, ``report.too_big``),
    a damaged local checkpoint is skipped (``report.damaged``), and the rest goes on.

    Without budget pressure the mirror deletes only copies of retired ids older than the
    local run's oldest kept checkpoint (never its newest verified copy). Copies of ids the
    local run never had (a partial restore, a fresh start) stay, on disk and in the
    mirror's index. ``max_bytes=None``: no budget, only a full Drive limits.

    Raises OSError (EIO, EROFS, ENOENT...) or :class:`MirrorError` on other failures; the
    mirror is then left consistent (its index lists only verified files).
    """
    state = _Sync(Path(local_run), Path(mirror_run), max_bytes, on_progress)
    state.reconcile()
    order = list(state.local_index.checkpoints)
    if order:
        state.sync_checkpoint(order[-1])
    state.sync_best()
    for entry in reversed(order[:-1]):
        state.sync_checkpoint(entry)
    state.retire()
    if include_logs:
        state.sync_logs()
    state.trim()
    return state.finish()


# --------------------------------------------------------------------------- applying a report


def apply_sync_report(index: Index, report: SyncReport) -> Index:
    """Return ``index`` with what ``report`` says about the mirror recorded in it.

    Entries verified on the mirror (same checksum) get ``mirrored``, naming the mirror (an
    earlier record of the same checksum and mirror is kept as it is); entries the sync saw
    that are not verified there (dropped for the budget, never copied) lose it; entries
    newer than the sync are left alone. Ids no longer on the mirror leave ``retired``.
    """
    seen = set(report.mirrored) | set(report.not_mirrored)
    entries = []
    for entry in index.checkpoints:
        info = report.mirrored.get(entry.id)
        if info is not None and info.get("checksum") == entry.checksum:
            if entry.mirrored != info:  # the sync keeps a still-valid earlier record as it is
                entry = replace(entry, mirrored=dict(info))
        elif entry.id in seen and entry.mirrored is not None:
            entry = replace(entry, mirrored=None)
        entries.append(entry)
    on_mirror = set(report.mirror_ids)
    updated = index.with_entries(entries)
    return updated.forget_retired([i for i in updated.retired if i not in on_mirror])


# --------------------------------------------------------------------------- mirror_status.json

_STATUS_NUMBERS = ("newest_verified_id", "newest_verified_at", "not_mirrored", "used_bytes", "budget_bytes", "too_big", "uploaded_bytes")


def write_mirror_status(
    run_dir: str | os.PathLike,
    report: SyncReport | None,
    *,
    error: str | None = None,
    mirror_run: str | os.PathLike,
) -> dict[str, Any]:
    """Write ``<run>/mirror_status.json`` atomically (raw numbers) and return what was written.

    With a report: where the mirror stands after that sync (``last_error`` = ``error``,
    normally None; ``uploaded_bytes``: what that sync uploaded). Without one (a failed
    attempt): the previous numbers are kept and ``last_error`` is set.
    """
    now = utc_now_iso()
    if report is not None:
        status: dict[str, Any] = {
            "mirror": str(mirror_run),
            "newest_verified_id": report.newest_verified_id,
            "newest_verified_at": report.newest_verified_at,
            "not_mirrored": len(report.not_mirrored),
            "used_bytes": report.used_bytes,
            "budget_bytes": report.budget_bytes,
            "last_error": error,
            "too_big": report.too_big,
            "uploaded_bytes": report.uploaded_bytes,
            "updated_at": now,
        }
    else:
        previous = read_mirror_status(run_dir) or {}
        status = {"mirror": str(mirror_run)}
        status.update({k: previous.get(k) for k in _STATUS_NUMBERS})
        status.update({"last_error": error, "updated_at": now})
    atomic_write_json(Path(run_dir) / MIRROR_STATUS_FILE, status)
    return status


def read_mirror_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``<run>/mirror_status.json`` as a dict, or None when absent or unreadable (never raises)."""
    try:
        data = read_json_file(Path(run_dir) / MIRROR_STATUS_FILE, max_bytes=1024 * 1024)
    except Exception:  # scan-safe: a damaged status file only hides the Drive line
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- background


def _reason_key(exc: BaseException) -> tuple:
    """What makes two failures "the same": the error type and errno (messages carry temp names)."""
    errno_ = getattr(exc, "errno", None)
    return (exc.__class__.__name__, errno_) if errno_ is not None else (exc.__class__.__name__, str(exc))


class BackgroundMirror:
    """Runs :func:`sync_run` on a daemon thread whenever :meth:`request` is called.

    Failures are logged once per distinct reason and retried with exponential backoff
    (``initial_backoff`` doubling up to ``max_backoff`` seconds); when Drive comes back
    the next attempt catches up. ``on_synced(report)`` is called after each completed
    sync (also one that left items out for the budget or as damaged: no retry then, the
    next :meth:`request` syncs again), ``on_failed(error_text)`` after each failed attempt.
    ``max_bytes`` is passed to :func:`sync_run`.
    """

    def __init__(
        self,
        local_run: str | os.PathLike,
        mirror_run: str | os.PathLike,
        *,
        on_synced: Callable[[SyncReport], None] | None = None,
        on_failed: Callable[[str], None] | None = None,
        max_bytes: int | None = None,
        initial_backoff: float = 1.0,
        max_backoff: float = 300.0,
    ):
        self.local_run = Path(local_run)
        self.mirror_run = Path(mirror_run)
        self.max_bytes = max_bytes
        self._on_synced = on_synced
        self._on_failed = on_failed
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._wake = threading.Condition()
        self._pending = False
        self._busy = False
        self._stop = False
        self.last_error: str | None = None
        self._last_key: tuple | None = None
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

    def _callback(self, callback: Callable | None, arg: Any) -> None:
        if callback is None:
            return
        try:
            callback(arg)
        except Exception as exc:  # a callback bug must not kill the mirror thread
            log.warning("mirror callback failed: %s", exc)

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
                report = sync_run(self.local_run, self.mirror_run, max_bytes=self.max_bytes)
            except Exception as exc:  # Drive fails in many ways; none may reach training
                key = _reason_key(exc)
                if key != self._last_key:  # once per cause, not per temporary file name
                    log.warning("Drive mirror %s failed (will retry): %s: %s", self.mirror_run, exc.__class__.__name__, exc)
                self._last_key = key
                self.last_error = f"{exc.__class__.__name__}: {exc}"
                self._callback(self._on_failed, self.last_error)
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
            self._callback(self._on_synced, report)
            with self._wake:
                self._busy = False
                self._wake.notify_all()
