"""Delete plans for ``ckptctl prune``: build a frozen plan (read-only), show it, then execute it.

The rule itself is the pure :func:`ckptctl.core.retention.ids_to_delete`; this module
gathers its inputs from disk (sizes, the best model's source, the newest checkpoint
whose checksum verifies) and carries out a plan: index first, files after. No torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ckptctl.core.format import INDEX_FILE
from ckptctl.core.manifest import CheckpointEntry, Index
from ckptctl.core.retention import RetentionItem, ids_to_delete, protected_ids
from ckptctl.errors import CheckpointIntegrityError, CkptctlError, CorruptIndexError, UnsafePathError
from ckptctl.storage.atomic import atomic_write_json, resolve_inside, verify_checksum
from ckptctl.storage.runfiles import checkpoint_file_for_deletion, delete_checkpoint_files
from ckptctl.storage.scan import read_best, read_index, read_json_file


@dataclass(frozen=True)
class PrunePlan:
    """What pruning one run would do. ``skipped`` lists entries left alone and why."""

    run_dir: Path
    delete: tuple[CheckpointEntry, ...] = ()
    keep: tuple[CheckpointEntry, ...] = ()
    sizes: dict[int, int] = field(default_factory=dict)  # id -> bytes on disk (0 if missing)
    protected: dict[int, str] = field(default_factory=dict)  # id -> why no rule may delete it
    skipped: tuple[str, ...] = ()
    max_total_bytes: int | None = None
    fingerprint: tuple[tuple[int, str], ...] = ()

    @property
    def bytes_freed(self) -> int:
        """Bytes the deletions free."""
        return sum(self.sizes.get(e.id, 0) for e in self.delete)

    @property
    def bytes_after(self) -> int:
        """Bytes the kept checkpoints take afterwards."""
        return sum(self.sizes.get(e.id, 0) for e in self.keep)

    @property
    def fits(self) -> bool:
        """False when ``--max-size`` cannot be met because protected checkpoints alone exceed it."""
        return self.max_total_bytes is None or self.bytes_after <= self.max_total_bytes


def _size_on_disk(run_dir: Path, entry: CheckpointEntry) -> int:
    try:
        return resolve_inside(run_dir, entry.path).stat().st_size
    except (OSError, UnsafePathError):
        return 0


def _newest_verified(run_dir: Path, entries: list[CheckpointEntry]) -> int | None:
    """Id of the newest checkpoint whose file matches its index checksum (what resume would use)."""
    for entry in sorted(entries, key=lambda e: e.id, reverse=True):
        try:
            verify_checksum(resolve_inside(run_dir, entry.path), entry.checksum)
        except (CheckpointIntegrityError, UnsafePathError):
            continue
        return entry.id
    return None


def plan_prune(
    run_dir: str | os.PathLike,
    *,
    keep_last: int | None = None,
    max_total_bytes: int | None = None,
) -> PrunePlan:
    """Plan pruning of one run (reads, hashes the newest checkpoints, deletes nothing).

    Never plans to delete: the newest checkpoint that verifies, the best model's source,
    pinned checkpoints, entries whose path is unsafe (those are listed in ``skipped``),
    or anything when the index is missing or unreadable.
    """
    run_dir = Path(run_dir)
    try:
        index = read_index(run_dir)
    except FileNotFoundError:
        return PrunePlan(run_dir, skipped=("no index (run copied by hand?): nothing pruned",), max_total_bytes=max_total_bytes)
    except CorruptIndexError as exc:
        return PrunePlan(run_dir, skipped=(f"index unreadable, nothing pruned: {exc}",), max_total_bytes=max_total_bytes)
    skipped = [f"index entry {raw_id!r}: {reason}" for raw_id, reason in index.skipped]
    usable: list[CheckpointEntry] = []
    for entry in index.checkpoints:
        try:
            checkpoint_file_for_deletion(run_dir, entry)
        except UnsafePathError as exc:
            skipped.append(f"checkpoint {entry.id}: {exc}")
            continue
        usable.append(entry)
    try:
        best = read_best(run_dir)
    except (CorruptIndexError, UnsafePathError) as exc:
        best = None
        skipped.append(f"best metadata unreadable ({exc}); best model's source unknown")
    best_source = best.source_id if best else None
    newest_good = _newest_verified(run_dir, list(index.checkpoints))
    sizes = {e.id: _size_on_disk(run_dir, e) for e in usable}
    items = [RetentionItem(id=e.id, size_bytes=sizes[e.id], pinned=e.pinned) for e in usable]
    victims = set(
        ids_to_delete(
            items,
            keep_last=keep_last,
            max_total_bytes=max_total_bytes,
            best_source_id=best_source,
            newest_good_id=newest_good,
        )
    )
    protected: dict[int, str] = {}
    never = protected_ids(items, best_source_id=best_source, newest_good_id=newest_good)
    for item in items:
        if item.id in never:
            reasons = []
            if item.pinned:
                reasons.append("pinned")
            if item.id == best_source:
                reasons.append("best model's source")
            if item.id == (newest_good if newest_good is not None else max(i.id for i in items)):
                reasons.append("newest verified" if newest_good is not None else "newest (none verifies)")
            protected[item.id] = ", ".join(reasons)
    return PrunePlan(
        run_dir=run_dir,
        delete=tuple(e for e in usable if e.id in victims),
        keep=tuple(e for e in usable if e.id not in victims),
        sizes=sizes,
        protected=protected,
        skipped=tuple(skipped),
        max_total_bytes=max_total_bytes,
        fingerprint=tuple((e.id, e.checksum) for e in index.checkpoints),
    )


def execute_prune(plan: PrunePlan) -> list[str]:
    """Carry out ``plan``; the caller must hold the run lock. Returns the run-relative paths deleted.

    The index is rewritten first (durably, without the deleted entries; every other entry,
    even one this version cannot read, is kept as it was), then the files are deleted.
    Raises :class:`CkptctlError` if the run changed since the plan was made.
    """
    if not plan.delete:
        return []
    run_dir = plan.run_dir
    current = read_index(run_dir)
    if tuple((e.id, e.checksum) for e in current.checkpoints) != plan.fingerprint:
        raise CkptctlError(f"{run_dir}: the run changed since the plan was made; nothing deleted, run prune again")
    doomed = {e.id for e in plan.delete}
    raw = read_json_file(run_dir / INDEX_FILE)
    raw["checkpoints"] = [e for e in raw["checkpoints"] if not (isinstance(e, dict) and e.get("id") in doomed)]
    remaining = Index.from_dict(raw, default_run_name=run_dir.name)
    if {e.id for e in remaining.checkpoints} & doomed:
        raise CkptctlError(f"{run_dir}: could not drop the planned entries from the index; nothing deleted")
    atomic_write_json(run_dir / INDEX_FILE, raw)
    return delete_checkpoint_files(run_dir, plan.delete)
