"""What ``ckptctl ls`` shows, read cheaply: metadata and ``stat`` only, never a checkpoint payload.

:func:`list_runs` turns the run directories at a path into a frozen :class:`Listing` of
:class:`RunListing` records (raw ints for bytes, UTC ISO strings for times); their
``to_json()`` gives the stable ``--json`` shape. No torch here.

Bytes, with format 2's shared tensor packs: a checkpoint's ``size_bytes`` is the full state
it restores, ``new_bytes`` what it added to the run's storage (its file and the packs no
older checkpoint references), and a run's ``total_bytes`` the unique bytes on disk (each
pack in ``objects/`` once). In a format-1 run all three are file sizes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptctl.core.format import BEST_MODEL_FILE, checkpoint_relpath
from ckptctl.core.objects import new_bytes_by_id, pack_relpath, referenced_packs
from ckptctl.errors import UnsafePathError
from ckptctl.storage import legacy
from ckptctl.storage.atomic import resolve_inside
from ckptctl.storage.foreign import find_groups
from ckptctl.storage.foreign_listing import GroupListing, list_group
from ckptctl.storage.lock import is_locked
from ckptctl.storage.mirror import read_mirror_status
from ckptctl.storage.objects import stored_pack_names
from ckptctl.storage.scan import RunScan, find_runs, mtime_iso, scan_run


@dataclass(frozen=True)
class CheckpointRow:
    """One checkpoint as listed: from the index, or (``indexed=False``) just a file on disk.

    ``size_bytes``: the full state it restores; ``new_bytes``: what it added to the run's
    storage; ``file_bytes``: its own file (a format-2 skeleton). All equal in format 1.
    """

    id: int
    path: str
    size_bytes: int
    new_bytes: int = 0
    file_bytes: int = 0
    epoch: int | None = None
    batch: int | None = None
    global_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    timestamp: str | None = None
    checksum: str | None = None
    pinned: bool = False
    mirrored: bool = False
    indexed: bool = True
    present: bool = True


@dataclass(frozen=True)
class BestRow:
    """``best_model.pt`` as listed (bytes as :class:`CheckpointRow`'s; ``new_bytes``: what no checkpoint shares)."""

    path: str
    size_bytes: int
    new_bytes: int = 0
    file_bytes: int = 0
    source_id: int | None = None
    epoch: int | None = None
    batch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metric: str | None = None
    value: float | None = None
    promoted_by_hand: bool = False
    present: bool = True


@dataclass(frozen=True)
class RunListing:
    """One run as ``ls`` shows it. ``problems`` are warnings (bad index entries, unreadable files)."""

    name: str
    path: Path
    checkpoints: tuple[CheckpointRow, ...]
    best: BestRow | None
    problems: tuple[str, ...] = ()
    indexed: bool = True
    locked: bool = False
    status: str | None = None
    #: ``mirror_status.json`` as written by the run's Drive mirror (raw numbers), or None.
    drive: dict[str, Any] | None = None
    #: Bytes of the tensor packs in ``objects/`` (format 2), each counted once.
    objects_bytes: int = 0

    @property
    def latest_id(self) -> int | None:
        """Id of the newest checkpoint listed, or None."""
        return max((c.id for c in self.checkpoints), default=None)

    @property
    def total_bytes(self) -> int:
        """Unique bytes on disk: the checkpoint files present, ``best_model.pt``, and each tensor pack once."""
        total = sum(c.file_bytes for c in self.checkpoints if c.present) + self.objects_bytes
        if self.best is not None and self.best.present:
            total += self.best.file_bytes
        return total

    @property
    def newest_timestamp(self) -> str | None:
        """Timestamp of the newest checkpoint (by id), if known."""
        rows = [c for c in self.checkpoints if c.timestamp]
        return max(rows, key=lambda c: c.id).timestamp if rows else None

    def to_json(self) -> dict[str, Any]:
        """The ``ls --json`` form of this run (raw bytes, ISO timestamps, paths joined to the run path)."""
        best = None
        if self.best is not None:
            b = self.best
            best = {
                "source_id": b.source_id,
                "epoch": b.epoch,
                "batch": b.batch,
                "metrics": _json_metrics(b.metrics),
                "size_bytes": b.size_bytes,
                "new_bytes": b.new_bytes,
                "path": str(self.path / b.path),
                "metric": b.metric,
                "value": b.value if b.value is None or math.isfinite(b.value) else None,
                "promoted_by_hand": b.promoted_by_hand,
                "present": b.present,
            }
        latest = self.latest_id
        return {
            "name": self.name,
            "path": str(self.path),
            "kind": "ckptctl",
            "total_bytes": self.total_bytes,
            "indexed": self.indexed,
            "locked": self.locked,
            "status": self.status,
            "drive": self.drive,
            "checkpoints": [
                {
                    "id": c.id,
                    "epoch": c.epoch,
                    "batch": c.batch,
                    "global_step": c.global_step,
                    "metrics": _json_metrics(c.metrics),
                    "size_bytes": c.size_bytes,
                    "new_bytes": c.new_bytes,
                    "timestamp": c.timestamp,
                    "path": str(self.path / c.path),
                    "checksum": c.checksum,
                    "pinned": c.pinned,
                    "mirrored": c.mirrored,
                    "indexed": c.indexed,
                    "present": c.present,
                    "latest": c.id == latest,
                    "best_source": best is not None and c.id == self.best.source_id,
                }
                for c in self.checkpoints
            ],
            "best": best,
            "problems": list(self.problems),
        }


def _file_size(run_dir: Path, relpath: str) -> int | None:
    """Size of a run file named in metadata, or None if absent or unsafe (never follows an escape)."""
    try:
        path = resolve_inside(run_dir, relpath)
        return path.stat().st_size if path.is_file() else None
    except (UnsafePathError, OSError):
        return None


def mirrored_for_this_run(mirrored: dict | None, run_dir: Path) -> bool:
    """Whether an entry's ``mirrored`` record speaks of this run's mirror.

    The record names the mirror folder it was verified in; a run copied under another
    name keeps the records of the original, which say nothing about its own mirror.
    Records from before the mirror was named count as this run's.
    """
    if not mirrored:
        return False
    mirror = mirrored.get("mirror")
    return not isinstance(mirror, str) or Path(mirror).name == run_dir.name


def listing_from_scan(scan: RunScan) -> RunListing:
    """Build the listing of one scanned run (stat calls only)."""
    problems = list(scan.problems)
    stored = stored_pack_names(scan.path)
    rows = _indexed_rows(scan, stored, problems) + _unindexed_rows(scan)
    if scan.index is not None and scan.unindexed:
        problems.append(f"{len(scan.unindexed)} checkpoint file(s) not in the index")
    rows.sort(key=lambda r: r.id)
    status = scan.training_state.get("status") if scan.training_state else None
    return RunListing(
        name=scan.name,
        path=scan.path,
        checkpoints=tuple(rows),
        best=_best_row(scan, stored, problems),
        problems=tuple(problems),
        indexed=scan.index is not None,
        locked=is_locked(scan.path),
        status=status if isinstance(status, str) else None,
        drive=read_mirror_status(scan.path),
        objects_bytes=sum(stored.values()),
    )


def _missing_packs(record: Any, stored: dict[str, int], what: str, problems: list[str]) -> bool:
    """True when a pack ``record`` lists is not in ``objects/`` (a problem naming it: the state cannot be restored)."""
    missing = sorted(name for name in record.objects if name not in stored)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        problems.append(f"{what}: shared object {pack_relpath(missing[0])}{more} is missing")
    return bool(missing)


def _indexed_rows(scan: RunScan, stored: dict[str, int], problems: list[str]) -> list[CheckpointRow]:
    """A row per index entry; a missing file or pack is a problem (the row says not present)."""
    rows = []
    entries = scan.index.checkpoints if scan.index is not None else ()
    new_bytes = new_bytes_by_id(entries)
    for e in entries:
        # the scan already saw a regular file by that name; anything else takes the careful path
        size = scan.sizes.get(e.id) if e.path == checkpoint_relpath(e.id) else None
        if size is None:
            size = _file_size(scan.path, e.path)
        if size is None:
            problems.append(f"checkpoint {e.id}: file {e.path} is missing or outside the run")
        packs_missing = size is not None and _missing_packs(e, stored, f"checkpoint {e.id}", problems)
        rows.append(
            CheckpointRow(
                id=e.id,
                path=e.path,
                size_bytes=e.full_bytes,
                new_bytes=new_bytes[e.id],
                file_bytes=e.size_bytes,
                epoch=e.epoch,
                batch=e.batch,
                global_step=e.global_step,
                metrics=dict(e.metrics),
                timestamp=e.timestamp,
                checksum=e.checksum,
                pinned=e.pinned,
                mirrored=mirrored_for_this_run(e.mirrored, scan.path),
                present=size is not None and not packs_missing,
            )
        )
    return rows


def _unindexed_rows(scan: RunScan) -> list[CheckpointRow]:
    """A row per checkpoint file the index lacks, described by other code's index when it wrote one."""
    described = scan.legacy_entries  # an index other code wrote: its positions and metrics, for display
    steps = legacy.guide_global_steps(described, scan.training_state) if described else {}
    rows = []
    for checkpoint_id, size in sorted(scan.unindexed.items()):
        guide = described.get(checkpoint_id) or legacy.LegacyEntry()
        on_disk = scan.on_disk.get(checkpoint_id)
        rows.append(
            CheckpointRow(
                id=checkpoint_id,
                path=checkpoint_relpath(checkpoint_id),
                size_bytes=size,
                new_bytes=size,
                file_bytes=size,
                epoch=guide.epoch,
                batch=guide.batch,
                global_step=steps.get(checkpoint_id),
                metrics=dict(guide.metrics),
                timestamp=guide.timestamp or (mtime_iso(on_disk) if on_disk is not None else None),
                indexed=False,
            )
        )
    return rows


def _best_row(scan: RunScan, stored: dict[str, int], problems: list[str]) -> BestRow | None:
    """``best_model.pt`` as listed: from its record, else from the file (and other code's metadata, if any)."""
    b = scan.best
    if b is not None:
        size = _file_size(scan.path, b.path)
        if size is None:
            problems.append(f"best model file {b.path} is missing")
        packs_missing = size is not None and _missing_packs(b, stored, "best model", problems)
        shared = referenced_packs(scan.index.checkpoints if scan.index is not None else ())
        return BestRow(
            path=b.path,
            size_bytes=b.full_bytes,
            new_bytes=b.size_bytes + sum(n for name, n in b.objects.items() if name not in shared),
            file_bytes=b.size_bytes,
            source_id=b.source_id,
            epoch=b.epoch,
            batch=b.batch,
            metrics=dict(b.metrics),
            metric=b.metric,
            value=b.value,
            promoted_by_hand=b.promoted_by_hand,
            present=size is not None and not packs_missing,
        )
    size = _file_size(scan.path, BEST_MODEL_FILE)
    if size is None:
        return None
    guide = scan.legacy_best or legacy.LegacyEntry()  # best_metadata.json other code wrote, if any
    return BestRow(
        path=BEST_MODEL_FILE,
        size_bytes=size,
        new_bytes=size,
        file_bytes=size,
        epoch=guide.epoch,
        batch=guide.batch,
        metrics=dict(guide.metrics),
        metric=guide.metric,
        value=guide.value,
    )


def _json_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}


@dataclass(frozen=True)
class Listing:
    """What ``ckptctl ls`` reports: every run at a path (none for an existing folder without runs).

    ``runs`` also holds the folders ckptctl did not write
    (:class:`~ckptctl.storage.foreign_listing.GroupListing`, same ``to_json`` keys plus ``kind``).
    """

    runs: tuple[RunListing | GroupListing, ...] = ()

    @property
    def ok(self) -> bool:
        """Always True: a damaged run is listed with its problems, which are warnings."""
        return True

    @property
    def warnings(self) -> list[str]:
        """Each run's problems, as ``RUN: problem`` lines."""
        return [f"{run.name}: {problem}" for run in self.runs for problem in run.problems]

    def to_json(self) -> dict[str, Any]:
        """The whole ``ls --json`` document: ``{"runs": [...]}``."""
        return {"runs": [run.to_json() for run in self.runs]}


def list_runs(path: str | os.PathLike) -> Listing:
    """List every run at ``path`` (a run, a folder of runs, a Drive mirror root), then the folders ckptctl did not write.

    ``path`` may also be one checkpoint file (listed as a group of one). Raises
    FileNotFoundError for a missing ``path``; a damaged run is still listed, with its problems.
    """
    runs = find_runs(path) if Path(path).is_dir() or not Path(path).exists() else []
    groups = tuple(list_group(group) for group in find_groups(path))
    return Listing(tuple(listing_from_scan(scan_run(run)) for run in runs) + groups)
