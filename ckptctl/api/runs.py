"""Run-level helpers that need no open ModelPersistence: Drive setup, newest checkpoint, restore from the mirror."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ckptctl.errors import CkptctlError, CorruptIndexError
from ckptctl.storage.restore import RestoreReport, restore_run
from ckptctl.storage.scan import checkpoint_files_on_disk, newest_run, read_index

log = logging.getLogger("ckptctl")


def setup_drive_backup(path: str | os.PathLike) -> Path:
    """Check that ``path`` (e.g. ``/content/drive/MyDrive/ARC-EFE-Backups``) is a writable folder and return it.

    Creates it if its parent exists. Raises :class:`CkptctlError` naming the reason
    (not mounted, read-only, not a folder) so a training script can fail fast.
    """
    path = Path(path).expanduser()
    if not path.parent.exists():
        raise CkptctlError(f"Drive backup {path}: parent folder {path.parent} does not exist (is Drive mounted?)")
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise CkptctlError(f"Drive backup {path}: cannot create folder ({exc.strerror or exc})") from None
    if not path.is_dir():
        raise CkptctlError(f"Drive backup {path}: not a folder")
    probe = path / f".ckptctl-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CkptctlError(f"Drive backup {path}: not writable ({exc.strerror or exc})") from None
    return path


def run_has_checkpoints(run_dir: str | os.PathLike) -> bool:
    """True if ``run_dir`` lists a checkpoint in its index or holds a committed checkpoint file."""
    return newest_checkpoint_id(run_dir) is not None


def newest_checkpoint_id(run_dir: str | os.PathLike) -> int | None:
    """The highest checkpoint id that ``run_dir``'s index lists or its ``checkpoints/`` holds; None if none."""
    run_dir = Path(run_dir)
    ids = set(checkpoint_files_on_disk(run_dir))
    try:
        ids.update(entry.id for entry in read_index(run_dir).checkpoints)
    except (FileNotFoundError, NotADirectoryError, CorruptIndexError):
        pass
    return max(ids, default=None)


def latest_run(path: str | os.PathLike) -> Path | None:
    """The run in the folder ``path`` with the most recent activity by its own metadata (see :func:`ckptctl.storage.scan.newest_run`)."""
    return newest_run(path)


def restore_if_mirror_ahead(
    run_dir: str | os.PathLike, mirror_run: str | os.PathLike, *, lock_held: bool = False
) -> RestoreReport | None:
    """Restore ``run_dir`` from its Drive mirror when the mirror holds a newer checkpoint; else None.

    The one rule for "bring the run back from Drive first" (a fresh VM has no local
    checkpoint; an older local copy is behind the mirror): never start or continue a run
    while the mirror holds newer checkpoints that the local run lacks. The restore is
    the verified one of ``ckptctl restore --from-drive``. Raises :class:`CkptctlError`
    when the mirror has checkpoints but none of them could be restored (the caller must
    not start over), or when Drive fails mid-restore (open again to continue it).
    ``lock_held``: the caller already holds the run lock.
    """
    run_dir, mirror_run = Path(run_dir), Path(mirror_run)
    local_id, mirror_id = newest_checkpoint_id(run_dir), newest_checkpoint_id(mirror_run)
    if mirror_id is None or (local_id is not None and local_id >= mirror_id):
        return None
    what = "no local checkpoint" if local_id is None else f"the Drive mirror is ahead (checkpoint {mirror_id} > {local_id})"
    log.warning("%s: %s; restoring it from the Drive mirror %s", run_dir, what, mirror_run)
    try:
        report = restore_run(mirror_run, run_dir, lock_held=lock_held)
    except (OSError, CkptctlError) as exc:
        raise CkptctlError(
            f"restoring {run_dir.name} from the Drive mirror {mirror_run} failed ({exc.__class__.__name__}: {exc}); "
            "run the same thing again to continue the restore"
        ) from None
    for skipped in report.skipped:
        log.warning("%s: not restored from Drive: %s: %s", run_dir, skipped["path"], skipped["reason"])
    if not run_has_checkpoints(run_dir):
        raise CkptctlError(
            f"none of the Drive mirror's checkpoints of {run_dir.name} ({mirror_run}) could be restored; not starting over "
            "(check them with `ckptctl verify`, or start under another run name)"
        )
    log.warning("%s: restored %d file(s) from the Drive mirror", run_dir, len(report.copied))
    return report


def restore_from_drive(drive_root: str | os.PathLike, run_name: str, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Copy the mirrored run ``drive_root/run_name`` into ``output_dir/run_name``; return a report.

    The same verified restore as ``ckptctl restore --from-drive``
    (:func:`ckptctl.storage.restore.restore_run`): each file goes to a temporary name with
    its checksum checked in the same pass, the local index is committed after every file
    (an interrupted restore continues when called again), a mirror file that is missing or
    damaged is skipped and reported while older ones still restore, a local checkpoint that
    verifies and is newer is kept, and ``next_id`` becomes at least the mirror's. Raises
    :class:`CkptctlError` when the mirror has no readable index, and OSError when Drive
    fails mid-restore (call again to continue).

    Returns ``{"path", "copied": [relpaths], "skipped": [{"path", "reason"}]}``.
    """
    mirror = Path(drive_root) / run_name
    try:
        read_index(mirror)
    except (FileNotFoundError, NotADirectoryError):
        raise CkptctlError(f"{mirror}: no mirrored run there (no checkpoint_metadata.json)") from None
    except CorruptIndexError as exc:
        raise CkptctlError(f"{mirror}: mirror index unreadable ({exc})") from None
    report = restore_run(mirror, Path(output_dir) / run_name)
    return {"path": report.dest, "copied": list(report.copied), "skipped": list(report.skipped)}
