"""Turning what a user typed (a run folder, a file, an id) into one checkpoint file, without torch.

Used by ``show``, ``diff``, ``promote`` and ``resume-info``. Every path taken from
metadata goes through :func:`resolve_inside`, so a hostile index cannot point outside
the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ckptctl.core.format import BEST_MODEL_FILE, CHECKPOINT_DIR, parse_checkpoint_filename
from ckptctl.errors import CorruptIndexError, NotFoundError, UnsafePathError
from ckptctl.storage.atomic import resolve_inside
from ckptctl.storage.foreign import ForeignGroup, file_format, find_groups
from ckptctl.storage.foreign_listing import list_group, select_entry
from ckptctl.storage.scan import checkpoint_files_on_disk, find_runs, is_run_dir, read_best_record, read_index


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint file picked by the user; ``checksum`` is the index's, when there is one (the best model: any of its record's)."""

    path: Path
    label: str
    checkpoint_id: int | None = None
    checksum: str | tuple[str, ...] | None = None
    run_dir: Path | None = None
    #: Bytes of the full state it restores, from its record (format 2: more than the file); None without one.
    state_bytes: int | None = None
    #: A checkpoint another tool wrote (``safetensors``, ``lightning``, ``hf-checkpoint``): loaded by
    #: :func:`ckptctl.foreign_io.load_entry`; None for a torch file ckptctl's own loader reads.
    format: str | None = None


def single_run(path: str | os.PathLike) -> Path:
    """The one run directory at ``path``; NotFoundError if there is none, or several (name one)."""
    try:
        runs = find_runs(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise NotFoundError(str(exc)) from None
    if not runs:
        raise NotFoundError(f"{path}: no run here (no {CHECKPOINT_DIR}/ or checkpoint_metadata.json)")
    if len(runs) > 1:
        names = ", ".join(r.name for r in runs[:5]) + (" ..." if len(runs) > 5 else "")
        raise NotFoundError(f"{path}: holds {len(runs)} runs ({names}); name one")
    return runs[0]


def _ref_in_run(run_dir: Path, which: str | None) -> CheckpointRef:
    try:
        index = read_index(run_dir)
    except FileNotFoundError:
        index = None
    except CorruptIndexError:
        index = None  # fall back to the files themselves (checked by loading only)
    entries = index.by_id() if index else {}
    files = checkpoint_files_on_disk(run_dir)
    if which is not None and which.lower() == "best":
        try:
            record = read_best_record(run_dir)
        except (CorruptIndexError, UnsafePathError):
            record = None
        best = record.candidates()[0] if record else None  # the committed record (the pending one while the first best is written)
        path = resolve_inside(run_dir, best.path if best else BEST_MODEL_FILE)
        if not path.is_file():
            raise NotFoundError(f"{run_dir}: has no best model")
        # during a replace (or after a crash in one) the file may match either record
        checksums = record.checksums() if record else None
        state = best.full_bytes if best else None
        return CheckpointRef(path, f"{run_dir.name} best", best.source_id if best else None, checksums, run_dir, state)
    if which is None:
        ids = set(entries) | set(files)
        if not ids:
            raise NotFoundError(f"{run_dir}: has no checkpoints")
        checkpoint_id = max(ids)
    else:
        try:
            checkpoint_id = int(which)
        except ValueError:
            raise NotFoundError(f"{which!r} is not a checkpoint id (a number, or 'best')") from None
    if checkpoint_id in entries:
        entry = entries[checkpoint_id]
        path = resolve_inside(run_dir, entry.path)
        return CheckpointRef(path, f"{run_dir.name} #{checkpoint_id}", checkpoint_id, entry.checksum, run_dir, entry.full_bytes)
    if checkpoint_id in files:
        return CheckpointRef(files[checkpoint_id], f"{run_dir.name} #{checkpoint_id}", checkpoint_id, None, run_dir)
    known = sorted(set(entries) | set(files))
    have = f"it has {', '.join(map(str, known))}" if known else "it has none"
    raise NotFoundError(f"{run_dir}: no checkpoint {checkpoint_id} ({have})")


def select_checkpoint(path: str | os.PathLike, which: str | None = None) -> CheckpointRef:
    """Pick a checkpoint: ``path`` is a ``.pt`` file, or a run (``which``: an id, ``best``, or None for the newest).

    A file inside a run's ``checkpoints/`` folder gets its index checksum, so it is verified too.
    """
    path = Path(path)
    if path.is_file():
        if which is not None:
            raise NotFoundError(f"{path}: is a file; an id only goes with a run folder")
        checkpoint_id = parse_checkpoint_filename(path.name)
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        if is_run_dir(run_dir) and (checkpoint_id is not None or path.name == BEST_MODEL_FILE):
            try:
                ref = _ref_in_run(run_dir, "best" if checkpoint_id is None else str(checkpoint_id))
            except (NotFoundError, UnsafePathError):
                ref = None
            if ref is not None and ref.path.resolve() == path.resolve():
                return ref  # the file the index describes: check it against the index checksum too
        return CheckpointRef(path, path.name, checkpoint_id, format=_foreign_format(path.name))
    if not path.exists():
        raise NotFoundError(f"{path}: no such file or directory")
    groups = [] if find_runs(path) else find_groups(path)
    if groups:
        return _ref_in_group(path, groups, which)
    return _ref_in_run(single_run(path), which)


def _foreign_format(name: str) -> str | None:
    """How a checkpoint file is loaded: by ckptctl's torch loader (None), or as another tool's format."""
    fmt = file_format(name)
    return None if fmt == "torch" else fmt


def _ref_in_group(path: Path, groups: list[ForeignGroup], which: str | None) -> CheckpointRef:
    """One checkpoint of the one group at ``path`` (a folder ckptctl did not write): by id, name, ``best``, or the newest."""
    own = [g for g in groups if g.path == path]  # the folder's own files; its subfolders are named by their paths
    groups = own or groups
    if len(groups) > 1:
        names = ", ".join(g.name for g in groups[:5]) + (" ..." if len(groups) > 5 else "")
        raise NotFoundError(f"{path}: holds {len(groups)} folders of checkpoints ({names}); name one")
    listing = list_group(groups[0])
    entry = select_entry(listing, which)
    fmt = None if entry.format == "torch" else entry.format  # an hf-checkpoint folder keeps its format
    label = f"{listing.name} {entry.name}"
    return CheckpointRef(entry.path, label, entry.id, None, listing.path, state_bytes=entry.size_bytes, format=fmt)

