"""Restoring loose checkpoint files (the guide's flat Drive folder, ``checkpoint_backup_*`` copies) into a new ckptctl run.

``ckptctl restore --from-drive --run NAME --as NEW`` picks the source with
:func:`choose_restore_source`: a ckptctl run on the mirror as before, else a group of
loose files (:mod:`ckptctl.storage.foreign`). :func:`restore_loose` copies that group's
training checkpoints into ``<dest>/checkpoints/checkpoint_NNNNN.pt`` (an id from the file
name, ``checkpoint_7.pt`` -> 7, else the next free id in training order) and its
``best_model.pt``, with the same crash-safe copy as every restore
(:func:`ckptctl.storage.restore.restore_run`: temporary name, hashed in the same pass,
fsync, rename; an interrupted restore continues). The source files are only read, and
their bytes are kept exactly. Files that are not training checkpoints (a ``.safetensors``
or Lightning file, a torch file recording no epoch and batch) are left out, with a note.
The index is then built by the library's adoption of unindexed files
(:func:`ckptctl.api.adopt.index_restored_run`, which loads each file safely). No torch here.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ckptctl.errors import NotFoundError, ReadOnlyRunError
from ckptctl.storage.atomic import ProgressCallback
from ckptctl.storage.foreign import ForeignEntry, ForeignGroup, find_groups
from ckptctl.storage.foreign_listing import SKELETON_WITHOUT_OBJECTS, EntryInfo, list_group
from ckptctl.storage.restore import RestoreReport, choose_mirror_run, restore_run


def _restorable(group: ForeignGroup) -> ForeignGroup:
    if group.kind != "loose":
        raise ReadOnlyRunError(
            f"{group.path}: {group.kind} checkpoints cannot be restored into a ckptctl run (read-only: "
            "ckptctl ls/verify/show/diff read them where they are); restore takes ckptctl runs and loose checkpoint files"
        )
    return group


def choose_restore_source(drive: str | os.PathLike, run: str | None = None) -> Path | ForeignGroup:
    """What ``restore --from-drive`` copies: a ckptctl run (:func:`choose_mirror_run`), else a group of loose files.

    With ``run``, the run or group of that name (a flat folder's name is the folder's own);
    without, the newest ckptctl run, else the only group of loose files. Raises
    NotFoundError (nothing, or several groups: name one) or ReadOnlyRunError (another
    tool's checkpoints).
    """
    try:
        return choose_mirror_run(drive, run)
    except NotFoundError as exc:
        if not Path(drive).is_dir():
            raise
        groups = find_groups(drive)
        chosen = [g for g in groups if g.name == run] if run is not None else [g for g in groups if g.kind == "loose"]
        if len(chosen) == 1:
            return _restorable(chosen[0])
        names = ", ".join(f"{g.name} ({g.kind})" for g in groups)
        if len(chosen) > 1:
            raise NotFoundError(f"{drive}: holds no ckptctl run and {len(chosen)} folders of loose checkpoints ({names}); name one with --run NAME") from None
        if run is None and groups:
            raise ReadOnlyRunError(f"{drive}: holds no ckptctl run or loose checkpoint files to restore, only {names} (read-only)") from None
        raise NotFoundError(f"{exc}" + (f"; other checkpoints there: {names}" if names else "")) from None


def _resumable(entry: ForeignEntry, info: EntryInfo) -> str | None:
    """Why ``entry`` cannot become a checkpoint of a ckptctl run, or None when it can (or only loading it can tell)."""
    if entry.format != "torch":
        return f"a {entry.format} file records no training position: not a checkpoint a run resumes from"
    if info.record_read and (info.epoch is None or info.batch is None):
        return "records no epoch and batch: not a training checkpoint"
    if info.missing_objects:
        return SKELETON_WITHOUT_OBJECTS
    return None


def plan_loose(group: ForeignGroup) -> tuple[dict[int, Path], Path | None, list[str]]:
    """The files of a loose group to copy: ``{id: file}``, its ``best_model.pt``, and a note per file left out.

    A file keeps the id its name carries; the others get the next free ids, oldest first.
    """
    listing = list_group(group)
    files: dict[int, Path] = {}
    unnumbered: list[ForeignEntry] = []
    notes = []
    for entry, info in listing.entries:
        why = _resumable(entry, info)
        if why is not None:
            notes.append(f"{entry.name} not restored: {why}")
        elif entry.id is not None:
            files[entry.id] = entry.path
        else:
            unnumbered.append(entry)
    next_id = max(files, default=-1) + 1
    for offset, entry in enumerate(unnumbered):
        files[next_id + offset] = entry.path
    return files, (listing.best[0].path if listing.best else None), notes


def restore_loose(
    group: ForeignGroup,
    dest_run: str | os.PathLike,
    *,
    only_id: int | None = None,
    force: bool = False,
    on_progress: ProgressCallback = None,
) -> RestoreReport:
    """Copy a loose group's checkpoints and best model into the run ``dest_run`` (see the module docstring); return what was done."""
    files, best, notes = plan_loose(_restorable(group))
    if not files:
        raise NotFoundError(f"{group.path}: no training checkpoints to restore" + (f" ({'; '.join(notes)})" if notes else ""))
    report = restore_run(group.path, dest_run, only_id=only_id, force=force, on_progress=on_progress, source_files=files, source_best=best)
    return replace(report, notes=tuple(notes))
