"""Committing a run's metadata and deleting its checkpoint files, safely.

Shared by the persistence API (while training) and the CLI (``prune``, ``promote``),
which must hold the run lock before calling these.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Iterable

from ckptctl.core.format import (
    BEST_METADATA_FILE,
    CHECKPOINT_DIR,
    INDEX_FILE,
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
    """The file of ``entry`` if it is safe to delete: a ``checkpoints/checkpoint_NNNNN.pt`` inside the run.

    Raises :class:`UnsafePathError` for anything else (other names, symlinks, escapes).
    """
    parts = entry.path.split("/")
    if len(parts) != 2 or parts[0] != CHECKPOINT_DIR or parse_checkpoint_filename(parts[1]) is None:
        raise UnsafePathError(f"{entry.path}: not a checkpoint file path; refusing to delete")
    path = resolve_inside(run_dir, entry.path)
    if path.is_symlink():
        raise UnsafePathError(f"{entry.path}: is a symlink; refusing to delete")
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
