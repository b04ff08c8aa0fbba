"""Committing a run's metadata and deleting its checkpoint files, safely.

Shared by the persistence API (while training) and the CLI (``prune``, ``promote``),
which must hold the run lock before calling these.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterable

from ckptctl.core.format import (
    BEST_METADATA_FILE,
    BEST_MODEL_FILE,
    CHECKPOINT_DIR,
    INDEX_FILE,
    checkpoint_relpath,
    parse_checkpoint_filename,
)
from ckptctl.core.manifest import BestInfo, BestRecord, CheckpointEntry, Index
from ckptctl.core.retention import RetentionItem
from ckptctl.errors import CheckpointIntegrityError, CorruptIndexError, UnsafePathError
from ckptctl.storage.atomic import BeforeReplace, atomic_write_json, fsync_dir, matching_checksum, remove_file, resolve_inside
from ckptctl.core.objects import referenced_packs
from ckptctl.storage.objects import collect_garbage
from ckptctl.storage.scan import read_best_record

log = logging.getLogger("ckptctl")


def commit_index(run_dir: str | os.PathLike, index: Index) -> None:
    """Durably replace the run's ``checkpoint_metadata.json`` with ``index``."""
    atomic_write_json(Path(run_dir) / INDEX_FILE, index.to_dict())


def commit_best(run_dir: str | os.PathLike, best: BestInfo) -> None:
    """Durably replace ``best_metadata.json`` by ``best`` alone (it must describe the ``best_model.pt`` there).

    To replace ``best_model.pt`` itself, use :func:`replace_best`.
    """
    atomic_write_json(Path(run_dir) / BEST_METADATA_FILE, best.to_dict())


WriteJson = Callable[[Path, Any], Any]


def replace_best(
    run_dir: str | os.PathLike,
    write_file: Callable[[BeforeReplace], tuple[int, str]],
    describe: Callable[[int, str], BestInfo],
    *,
    write_json: WriteJson = atomic_write_json,
) -> BestInfo:
    """Replace ``best_model.pt`` and its record as one commit: the rename of the file. Return the new record.

    ``write_file(before_replace)`` writes the new file crash-safely (an atomic write or copy
    to ``best_model.pt``) and calls ``before_replace(size, checksum)`` between its fsync and
    its rename; ``describe(size, checksum)`` makes the new record. At that moment the new
    record is written as ``pending`` beside the committed one, so before the rename the
    file matches the committed record and after it the pending one; the metadata is then
    settled to the new record alone. No reader and no crash sees ``best_model.pt`` without
    its record. ``write_json`` writes the metadata (the Drive mirror passes its own, which
    truncates what it replaces).
    """
    run_dir = Path(run_dir)
    current = settled_best(run_dir)
    made: list[BestInfo] = []

    def announce(size: int, checksum: str) -> None:
        made.append(describe(size, checksum))
        write_json(run_dir / BEST_METADATA_FILE, BestRecord(current, made[0]).to_dict())

    write_file(announce)
    write_json(run_dir / BEST_METADATA_FILE, made[0].to_dict())
    return made[0]


def settled_best(run_dir: str | os.PathLike) -> BestInfo | None:
    """The record that describes the ``best_model.pt`` there now; None if none does (or the metadata is unusable).

    Outside a replace that is the committed record. After a crash inside one, the file is
    hashed to tell whether the rename happened.
    """
    try:
        record = read_best_record(run_dir)
    except (CorruptIndexError, UnsafePathError):
        return None
    return settle(run_dir, record)


def settle(run_dir: str | os.PathLike, record: BestRecord | None) -> BestInfo | None:
    """The record of ``record`` (read by the caller) that describes the ``best_model.pt`` there now; None if none does.

    The committed one outside a replace; after a crash inside one, the one the file's bytes
    match (the file is hashed only then).
    """
    if record is None or record.pending is None:
        return record.current if record is not None else None
    try:
        return record.describing(matching_checksum(Path(run_dir) / BEST_MODEL_FILE, record.checksums()))
    except CheckpointIntegrityError:
        return None


def set_aside(path: str | os.PathLike, reason: str) -> Path | None:
    """Rename a damaged file to ``<name>.corrupt-<UTC stamp>`` (kept for forensics); return the new path."""
    path = Path(path)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    fsync_dir(path.parent)
    log.warning("%s: %s; kept as %s", path.name, reason, aside.name)
    return aside


def retention_items(entries: Iterable[CheckpointEntry]) -> list[RetentionItem]:
    """The retention view of index entries."""
    return [RetentionItem(id=e.id, size_bytes=e.size_bytes, pinned=e.pinned) for e in entries]


def checkpoint_file_for_deletion(run_dir: str | os.PathLike, entry: CheckpointEntry) -> Path:
    """The file of ``entry`` if it is safe to delete: its own ``checkpoints/checkpoint_NNNNN.pt`` inside the run.

    Raises :class:`UnsafePathError` for anything else (other names, a name carrying
    another id, symlinks, escapes, directories and other non-regular files).
    """
    parts = entry.path.split("/")
    if len(parts) != 2 or parts[0] != CHECKPOINT_DIR or parse_checkpoint_filename(parts[1]) is None:
        raise UnsafePathError(f"{entry.path}: not a checkpoint file path; refusing to delete")
    if parse_checkpoint_filename(parts[1]) != entry.id:
        raise UnsafePathError(f"{entry.path}: not the file of checkpoint {entry.id}; refusing to delete")
    return _deletable(run_dir, entry.path)


def _deletable(run_dir: str | os.PathLike, relpath: str) -> Path:
    path = resolve_inside(run_dir, relpath)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise UnsafePathError(f"{relpath}: cannot inspect ({exc.strerror or exc}); refusing to delete") from None
    if stat.S_ISLNK(mode):
        raise UnsafePathError(f"{relpath}: is a symlink; refusing to delete")
    if not stat.S_ISREG(mode):
        raise UnsafePathError(f"{relpath}: not a regular file; refusing to delete")
    return path


def delete_checkpoint_files(run_dir: str | os.PathLike, entries: Iterable[CheckpointEntry]) -> list[str]:
    """Delete the files of ``entries`` (already removed from a durable index); return paths deleted.

    Unsafe entries are logged and left alone; nothing outside the run is ever touched.
    """
    deleted = []
    for entry in entries:
        try:
            path = checkpoint_file_for_deletion(run_dir, entry)
        except UnsafePathError as exc:
            log.warning("not deleting: %s", exc)
            continue
        if remove_file(path):
            deleted.append(entry.path)
    if deleted:
        fsync_dir(Path(run_dir) / CHECKPOINT_DIR)
    return deleted


# Removing checkpoints survives a kill between the index write and the last delete:
# commit_removal (index without the victims, their ids as tombstones) -> delete_checkpoint_files
# -> finish_removal (tombstones cleared). A run found with tombstones is finished by
# finish_pending_removal (the library's open, the start of prune); their files are never adopted.


def commit_removal(run_dir: str | os.PathLike, index: Index, victims: Iterable[CheckpointEntry]) -> Index:
    """Durably commit ``index`` (which must no longer list ``victims``) with the victims' ids in ``deleting``; return it."""
    marked = index.mark_deleting(v.id for v in victims)
    commit_index(run_dir, marked)
    return marked


def finish_removal(run_dir: str | os.PathLike, index: Index, ids: Iterable[int]) -> Index:
    """After the files of ``ids`` are deleted: durably commit ``index`` without those tombstones; return it."""
    ids = set(ids)
    if not ids & set(index.deleting):
        return index
    done = index.forget_deleting(ids)
    commit_index(run_dir, done)
    return done


def finish_pending_removal(run_dir: str | os.PathLike, index: Index) -> tuple[Index, list[str]]:
    """Finish a removal a kill interrupted: delete the files of ``index.deleting``, clear the tombstones.

    Only each tombstone's own ``checkpoints/checkpoint_NNNNN.pt`` (a regular file inside
    the run) is deleted. Returns the committed index and the run-relative paths deleted.
    """
    if not index.deleting:
        return index, []
    deleted, gone = [], []
    for checkpoint_id in index.deleting:
        relpath = checkpoint_relpath(checkpoint_id)
        try:
            if remove_file(_deletable(run_dir, relpath)):
                deleted.append(relpath)
            gone.append(checkpoint_id)
        except UnsafePathError as exc:  # not a plain file: left alone, and no longer ours to finish
            log.warning("not deleting: %s", exc)
            gone.append(checkpoint_id)
    if deleted:
        fsync_dir(Path(run_dir) / CHECKPOINT_DIR)
        log.info("%s: finished deleting %d checkpoint file(s) an interrupted removal left: %s", run_dir, len(deleted), ", ".join(deleted))
    return finish_removal(run_dir, index, gone), deleted


def collect_packs(run_dir: str | os.PathLike, records: Iterable[Any], keep: Iterable[str] = ()) -> list[str]:
    """Delete the run's packs that none of ``records`` (index entries, best-model records) references; return their names.

    The one way packs are deleted. Call it as the run's writer, after the index and
    best-model record passed here are durable (and their tombstoned files deleted), so a
    kill at any point leaves every referenced pack on disk; what a kill leaves behind is
    collected by the next call. ``keep`` protects packs written for a save not committed yet.
    """
    live = set(referenced_packs(records)) | set(keep)
    deleted = collect_garbage(run_dir, live)
    if deleted:
        log.info("%s: deleted %d tensor pack(s) no checkpoint references", run_dir, len(deleted))
    return deleted


def best_records(record: BestRecord | None) -> list[BestInfo]:
    """Every best-model record that may describe ``best_model.pt`` (both during a replace): their packs are kept."""
    return record.candidates() if record is not None else []
