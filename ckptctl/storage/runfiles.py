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
from typing import Iterable

from ckptctl.core.format import (
    BEST_METADATA_FILE,
    CHECKPOINT_DIR,
    INDEX_FILE,
    checkpoint_relpath,
    parse_checkpoint_filename,
)
from ckptctl.core.manifest import BestInfo, CheckpointEntry, Index
from ckptctl.core.retention import RetentionItem
from ckptctl.errors import UnsafePathError
from ckptctl.storage.atomic import atomic_write_json, fsync_dir, remove_file, resolve_inside

log = logging.getLogger("ckptctl")


def commit_index(run_dir: str | os.PathLike, index: Index) -> None:
    """Durably replace the run's ``checkpoint_metadata.json`` with ``index``."""
    atomic_write_json(Path(run_dir) / INDEX_FILE, index.to_dict())


def commit_best(run_dir: str | os.PathLike, best: BestInfo) -> None:
    """Durably replace ``best_metadata.json`` (call only after ``best_model.pt`` is durable)."""
    atomic_write_json(Path(run_dir) / BEST_METADATA_FILE, best.to_dict())


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
