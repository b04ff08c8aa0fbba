"""Delete plans for ``ckptctl prune``: build a frozen plan (read-only), show it, then execute it.

The rule itself is the pure :func:`ckptctl.core.retention.ids_to_delete`; this module
gathers its inputs from disk (sizes, the best model's source, the newest checkpoint
whose checksum verifies) and carries out a plan: index first, files after, shared tensor
packs last. No torch.

The whole workflow over several runs is :func:`open_prune`: it takes each run's lock
(not for a dry run), finishes what an interrupted prune left, plans, and hands back a
:class:`PruneSession` whose :meth:`~PruneSession.execute` deletes while the locks are
still held. The caller only shows the plan and asks before executing.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ckptctl.core.format import INDEX_FILE, checkpoint_relpath
from ckptctl.core.manifest import CheckpointEntry, Index
from ckptctl.core.resume import choose_resume_checkpoint
from ckptctl.core.objects import pack_relpath, referenced_packs
from ckptctl.core.retention import RetentionItem, ids_to_delete, protected_ids, protection_reasons, unique_bytes
from ckptctl.errors import CkptctlError, CorruptIndexError, RunLockedError, UnsafePathError
from ckptctl.storage import legacy
from ckptctl.storage.atomic import atomic_write_bytes, resolve_inside, verify_checksum
from ckptctl.storage.collect import collect_run_packs, pack_references
from ckptctl.storage.lock import RunLock, is_locked
from ckptctl.storage.objects import stored_pack_names
from ckptctl.storage.runfiles import (
    checkpoint_file_for_deletion,
    commit_removal,
    delete_checkpoint_files,
    finish_pending_removal,
    finish_removal,
    settle,
)
from ckptctl.storage.scan import checkpoint_files_on_disk, read_best_record, read_index, read_json_file


@dataclass(frozen=True)
class PrunePlan:
    """What pruning one run would do. ``skipped`` lists entries left alone and why."""

    run_dir: Path
    delete: tuple[CheckpointEntry, ...] = ()
    keep: tuple[CheckpointEntry, ...] = ()
    sizes: dict[int, int] = field(default_factory=dict)  # id -> bytes of its file on disk (0 if missing)
    #: Format 2: id -> the packs its entry references, with their sizes on disk (0 if missing).
    objects: dict[int, dict[str, int]] = field(default_factory=dict)
    #: The packs the deletions leave unreferenced (deleted after the index commit), name -> size.
    packs_freed: dict[str, int] = field(default_factory=dict)
    protected: dict[int, str] = field(default_factory=dict)  # id -> why no rule may delete it
    skipped: tuple[str, ...] = ()
    max_total_bytes: int | None = None
    fingerprint: tuple[tuple[int, str], ...] = ()
    #: ``"index"``: planned from ckptctl's index; ``"legacy"``: from the checkpoint files of a
    #: run whose index other code wrote (no checksums; the newest that loads is kept).
    source: str = "index"

    @property
    def bytes_freed(self) -> int:
        """Bytes the deletions free: the checkpoint files, and the packs no remaining checkpoint or best model references."""
        return sum(self.sizes.get(e.id, 0) for e in self.delete) + sum(self.packs_freed.values())

    @property
    def bytes_after(self) -> int:
        """Unique bytes the kept checkpoints take afterwards (a pack they share counts once)."""
        return unique_bytes(self._items(self.keep))

    def _items(self, entries: tuple[CheckpointEntry, ...]) -> list[RetentionItem]:
        return [RetentionItem(id=e.id, size_bytes=self.sizes.get(e.id, 0), objects=self.objects.get(e.id, {})) for e in entries]

    @property
    def fits(self) -> bool:
        """False when ``--max-size`` cannot be met because protected checkpoints alone exceed it."""
        return self.max_total_bytes is None or self.bytes_after <= self.max_total_bytes

    def to_json(self, deleted: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """One run of ``prune --json``; ``deleted``: the run-relative paths deleted when it was executed."""
        return {
            "run": self.run_dir.name,
            "path": str(self.run_dir),
            "delete": [{"id": e.id, "path": str(self.run_dir / e.path), "size_bytes": self.sizes.get(e.id, 0)} for e in self.delete],
            "keep": [{"id": e.id, "protected": self.protected.get(e.id)} for e in self.keep],
            "skipped": list(self.skipped),
            "bytes_freed": self.bytes_freed,
            "objects_bytes_freed": sum(self.packs_freed.values()),
            "bytes_after": self.bytes_after,
            "fits": self.fits,
            "deleted": list(deleted),
        }

    def execute(self, *, lock_held: bool = False) -> list[str]:
        """Carry out this plan (see :func:`execute_prune`); returns the run-relative paths deleted.

        Takes the run lock for the deletion unless the caller holds it (``lock_held``);
        raises RunLockedError while a trainer holds it, CkptctlError if the run changed
        since the plan was made (then nothing is deleted).
        """
        if lock_held:
            return execute_prune(self)
        with RunLock(self.run_dir):
            return execute_prune(self)


def _size_on_disk(run_dir: Path, entry: CheckpointEntry) -> int:
    """Bytes of the entry's file; 0 when missing or not a regular file (a directory's size frees nothing)."""
    try:
        st = resolve_inside(run_dir, entry.path).stat()
    except (OSError, UnsafePathError):
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _newest_verified(run_dir: Path, entries: list[CheckpointEntry]) -> int | None:
    """Id of the newest checkpoint whose file matches its index checksum (what resume would use)."""
    by_id = {e.id: e for e in entries}
    return choose_resume_checkpoint(by_id, lambda i: verify_checksum(resolve_inside(run_dir, by_id[i].path), by_id[i].checksum)).chosen_id


def plan_prune(
    run_dir: str | os.PathLike,
    *,
    keep_last: int | None = None,
    max_total_bytes: int | None = None,
    loads: Callable[[Path], bool] | None = None,
) -> PrunePlan:
    """Plan pruning of one run (reads, hashes the newest checkpoints, deletes nothing).

    Never plans to delete: the newest checkpoint that verifies, the best model's source,
    pinned checkpoints, entries whose path is unsafe (those are listed in ``skipped``),
    or anything when the index is missing or unreadable. A run whose index other code
    wrote (the Colab guide's) is planned from its checkpoint files, keeping the newest
    for which ``loads(path)`` (a safe trial load, supplied by the caller) is true;
    without ``loads`` nothing is pruned there.
    """
    run_dir = Path(run_dir)
    try:
        index = read_index(run_dir)
    except FileNotFoundError:
        return PrunePlan(run_dir, skipped=("no index (run copied by hand?): nothing pruned",), max_total_bytes=max_total_bytes)
    except CorruptIndexError as exc:
        if legacy.read_guide_index(run_dir) is not None:
            return _plan_prune_legacy(run_dir, keep_last, max_total_bytes, loads)
        return PrunePlan(run_dir, skipped=(f"index unreadable, nothing pruned: {exc}",), max_total_bytes=max_total_bytes)
    skipped = [f"index entry {raw_id!r}: {reason}" for raw_id, reason in index.skipped]
    usable = _deletable_entries(run_dir, index, skipped)
    best_source = _best_source(run_dir, skipped)
    newest_good = _newest_verified(run_dir, list(index.checkpoints))
    sizes = {e.id: _size_on_disk(run_dir, e) for e in usable}
    stored = stored_pack_names(run_dir)
    objects = {e.id: {name: stored.get(name, 0) for name in e.objects} for e in usable if e.objects}
    items = [RetentionItem(id=e.id, size_bytes=sizes[e.id], pinned=e.pinned, objects=objects.get(e.id, {})) for e in usable]
    rule = {"best_source_id": best_source, "newest_good_id": newest_good}
    victims = set(ids_to_delete(items, keep_last=keep_last, max_total_bytes=max_total_bytes, **rule))
    protected = protection_reasons(items, **rule)
    return PrunePlan(
        run_dir=run_dir,
        delete=tuple(e for e in usable if e.id in victims),
        keep=tuple(e for e in usable if e.id not in victims),
        sizes=sizes,
        objects=objects,
        packs_freed=_packs_freed(run_dir, index, victims, stored, skipped),
        protected=protected,
        skipped=tuple(skipped),
        max_total_bytes=max_total_bytes,
        fingerprint=tuple((e.id, e.checksum) for e in index.checkpoints),
    )


def _packs_freed(run_dir: Path, index: Index, victims: set[int], stored: dict[str, int], skipped: list[str]) -> dict[str, int]:
    """The packs on disk that deleting ``victims`` leaves unreferenced (none when the metadata cannot tell; noted in ``skipped``)."""
    doomed = referenced_packs(e for e in index.checkpoints if e.id in victims)
    if not doomed:
        return {}
    refs = pack_references(run_dir)
    if refs.blocked is not None:
        skipped.append(f"shared tensor objects are kept (collected later): {refs.blocked}")
        return {}
    live = referenced_packs(r for r in refs.records if getattr(r, "id", None) not in victims)
    return {name: stored[name] for name in doomed if name not in live and name in stored}


def _deletable_entries(run_dir: Path, index: Index, skipped: list[str]) -> list[CheckpointEntry]:
    """The index entries prune may act on; one whose file could not be safely deleted is noted in ``skipped``."""
    usable = []
    for entry in index.checkpoints:
        try:
            checkpoint_file_for_deletion(run_dir, entry)
        except UnsafePathError as exc:
            skipped.append(f"checkpoint {entry.id}: {exc}")
            continue
        usable.append(entry)
    return usable


def _best_source(run_dir: Path, skipped: list[str]) -> int | None:
    """The checkpoint the best model came from (after a crash mid-replace, the record its file matches)."""
    try:
        record = read_best_record(run_dir)
    except (CorruptIndexError, UnsafePathError) as exc:
        skipped.append(f"best metadata unreadable ({exc}); best model's source unknown")
        return None
    best = settle(run_dir, record)
    return best.source_id if best else None


def _legacy_fingerprint(run_dir: Path) -> tuple[tuple[int, str], ...]:
    """What a legacy plan depends on: each checkpoint file's size and mtime, and the index file's."""
    out = []
    for checkpoint_id, path in sorted(checkpoint_files_on_disk(run_dir).items()):
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((checkpoint_id, f"{st.st_size}:{st.st_mtime_ns}"))
    try:
        st = (run_dir / INDEX_FILE).stat()
        out.append((-1, f"{st.st_size}:{st.st_mtime_ns}"))
    except OSError:
        pass
    return tuple(out)


def _plan_prune_legacy(
    run_dir: Path, keep_last: int | None, max_total_bytes: int | None, loads: Callable[[Path], bool] | None
) -> PrunePlan:
    """Plan for a run whose index other code wrote: its checkpoint files, no checksums."""
    if loads is None:
        return PrunePlan(
            run_dir,
            skipped=(f"{INDEX_FILE} written by other code and no trial load available: nothing pruned",),
            max_total_bytes=max_total_bytes,
        )
    fingerprint = _legacy_fingerprint(run_dir)
    files = checkpoint_files_on_disk(run_dir)
    sizes = {i: int(stamp.split(":")[0]) for i, stamp in fingerprint if i in files}
    entries = [
        CheckpointEntry(id=i, path=checkpoint_relpath(i), epoch=0, batch=0, global_step=0, metrics={}, timestamp="", size_bytes=sizes[i], checksum="")
        for i in sorted(sizes)
    ]
    newest_good = next((i for i in sorted(sizes, reverse=True) if loads(files[i])), None)
    items = [RetentionItem(id=e.id, size_bytes=e.size_bytes) for e in entries]
    victims = set(ids_to_delete(items, keep_last=keep_last, max_total_bytes=max_total_bytes, newest_good_id=newest_good))
    protected = {i: ("newest that loads" if newest_good is not None else "newest (none loads)") for i in protected_ids(items, newest_good_id=newest_good)}
    return PrunePlan(
        run_dir=run_dir,
        delete=tuple(e for e in entries if e.id in victims),
        keep=tuple(e for e in entries if e.id not in victims),
        sizes=sizes,
        protected=protected,
        max_total_bytes=max_total_bytes,
        fingerprint=fingerprint,
        source="legacy",
    )


def _execute_prune_legacy(plan: PrunePlan) -> list[str]:
    """Delete a legacy plan's files: the other code's index first (its bytes kept as ``.legacy``), then the files."""
    run_dir = plan.run_dir
    if _legacy_fingerprint(run_dir) != plan.fingerprint:
        raise CkptctlError(f"{run_dir}: the run changed since the plan was made; nothing deleted, run prune again")
    raw = read_json_file(run_dir / INDEX_FILE)
    if legacy.guide_index_entries(raw) is None:
        raise CkptctlError(f"{run_dir}: the index changed since the plan was made; nothing deleted, run prune again")
    doomed = {e.id for e in plan.delete}
    legacy.keep_legacy_copy(run_dir / INDEX_FILE)
    remaining = {k: v for k, v in raw.items() if int(k) not in doomed}  # still in the other code's schema
    atomic_write_bytes(run_dir / INDEX_FILE, (json.dumps(remaining, indent=2) + "\n").encode("utf-8"))
    return delete_checkpoint_files(run_dir, plan.delete)


def finish_interrupted_prune(run_dir: str | os.PathLike) -> list[str]:
    """Delete the files an interrupted prune (or retention) left behind its tombstones; the caller holds the lock.

    Returns the run-relative paths deleted (none when the index is missing, unreadable or
    holds no tombstones).
    """
    try:
        index = read_index(run_dir)
    except (FileNotFoundError, CorruptIndexError):
        return []
    return finish_pending_removal(run_dir, index)[1]


def _finish_interrupted(run: Path) -> list[PruneNote]:
    """Under the lock: finish what an interrupted prune left (tombstoned files), then delete packs nothing references."""
    notes = []
    finished = finish_interrupted_prune(run)  # an earlier prune killed before its last delete
    if finished:
        notes.append(PruneNote("info", f"{run.name}: finished deleting {len(finished)} checkpoint file(s) an interrupted prune left: {', '.join(finished)}"))
    packs, _ = collect_run_packs(run)  # left by a kill after an index commit (a save's, a prune's)
    if packs:
        notes.append(PruneNote("info", f"{run.name}: deleted {len(packs)} tensor object(s) ({sum(packs.values())} bytes) that nothing references"))
    return notes


def execute_prune(plan: PrunePlan) -> list[str]:
    """Carry out ``plan``; the caller must hold the run lock. Returns the run-relative paths deleted.

    The index is rewritten first (durably, without the deleted entries and with their ids
    as tombstones in ``deleting``; deleted ids that were on the Drive mirror are added to
    its ``retired`` list), then the files are deleted, then the tombstones are cleared,
    and only then the tensor packs nothing references any more are deleted
    (:func:`ckptctl.storage.collect.collect_run_packs`; their paths end the list returned):
    the same rewrite (:mod:`ckptctl.storage.runfiles`) as the trainer's retention, which
    keeps every other entry, and every entry this version cannot read, as it was. A kill
    in between leaves tombstones that the next prune or library open finishes
    (:func:`ckptctl.storage.runfiles.finish_pending_removal`); their files are never adopted.
    Raises :class:`CkptctlError` if the run changed since the plan was made.
    """
    if not plan.delete:
        return []
    if plan.source == "legacy":
        return _execute_prune_legacy(plan)
    run_dir = plan.run_dir
    current = read_index(run_dir)
    if tuple((e.id, e.checksum) for e in current.checkpoints) != plan.fingerprint:
        raise CkptctlError(f"{run_dir}: the run changed since the plan was made; nothing deleted, run prune again")
    doomed = {e.id for e in plan.delete}
    remaining = current.with_entries([e for e in current.checkpoints if e.id not in doomed])
    mirrored = [e.id for e in plan.delete if e.mirrored]
    if mirrored:  # the Drive mirror may delete its copies of these now (see Index.retired)
        remaining = remaining.retire(mirrored)
    marked = commit_removal(run_dir, remaining, plan.delete)
    deleted = delete_checkpoint_files(run_dir, plan.delete)
    finish_removal(run_dir, marked, doomed)
    packs, _ = collect_run_packs(run_dir)  # only now: the index that stopped referencing them is durable
    return deleted + [pack_relpath(name) for name in sorted(packs)]


# --------------------------------------------------------------------------- the prune workflow


@dataclass(frozen=True)
class PruneReport:
    """What ``prune`` planned over its runs and, once executed, deleted.

    ``deleted`` maps a run's path to the run-relative paths deleted (None: not executed);
    ``refused`` names the runs left out because a trainer held them (the command fails).
    """

    plans: tuple[PrunePlan, ...] = ()
    dry_run: bool = False
    deleted: Mapping[str, tuple[str, ...]] | None = None
    refused: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """False when some run was refused (locked by a trainer)."""
        return not self.refused

    @property
    def todo(self) -> tuple[PrunePlan, ...]:
        """The plans that delete something."""
        return tuple(p for p in self.plans if p.delete)

    @property
    def delete_count(self) -> int:
        """Checkpoints the plans delete."""
        return sum(len(p.delete) for p in self.plans)

    @property
    def bytes_freed(self) -> int:
        """Bytes the plans free."""
        return sum(p.bytes_freed for p in self.plans)

    def to_json(self) -> dict[str, Any]:
        """The ``prune --json`` document."""
        deleted = self.deleted or {}
        return {
            "dry_run": self.dry_run,
            "runs": [p.to_json(deleted.get(str(p.run_dir), ())) for p in self.plans],
            "bytes_freed": self.bytes_freed,
        }


@dataclass(frozen=True)
class PruneNote:
    """Something to tell before the plan: ``level`` is ``"info"``, ``"warning"`` or ``"error"`` (``error`` set: a run refused)."""

    level: str
    message: str
    error: BaseException | None = None


@dataclass(frozen=True)
class PruneSession:
    """Plans made by :func:`open_prune`, with the runs' locks held (unless a dry run) until its block ends."""

    report: PruneReport
    notes: tuple[PruneNote, ...] = ()

    def execute(self) -> PruneReport:
        """Delete what the plans say (not for a dry run); the report with what was deleted."""
        if self.report.dry_run:
            raise CkptctlError("a dry run deletes nothing")
        deleted = {str(plan.run_dir): tuple(plan.execute(lock_held=True)) for plan in self.report.todo}
        return PruneReport(self.report.plans, False, deleted, self.report.refused)


@contextlib.contextmanager
def open_prune(
    run_dirs: list[Path],
    *,
    keep_last: int | None = None,
    max_total_bytes: int | None = None,
    dry_run: bool = False,
    loads: Callable[[Path], bool] | None = None,
) -> Iterator[PruneSession]:
    """Plan pruning of ``run_dirs`` and hold their locks while the caller shows the plan and executes it.

    Not a dry run: each run's lock is taken first (a run a trainer holds is refused: an
    ``"error"`` note, left out of the plan), and what an interrupted prune left behind its
    tombstones is deleted, then the tensor packs nothing references (``"info"`` notes). A
    dry run takes no lock and only warns when a trainer holds a run. ``loads`` is the safe
    trial load for runs without checksums (see :func:`plan_prune`).
    """
    notes: list[PruneNote] = []
    refused: list[str] = []
    usable: list[Path] = []
    with contextlib.ExitStack() as locks:
        for run in run_dirs:
            if dry_run:
                if is_locked(run):
                    notes.append(PruneNote("warning", f"{run.name}: a trainer holds this run; the plan may change before you prune"))
                usable.append(run)
                continue
            try:
                locks.enter_context(RunLock(run))
            except RunLockedError as exc:
                notes.append(PruneNote("error", str(exc), exc))
                refused.append(str(run))
                continue
            usable.append(run)
            notes.extend(_finish_interrupted(run))
        plans = tuple(plan_prune(run, keep_last=keep_last, max_total_bytes=max_total_bytes, loads=loads) for run in usable)
        yield PruneSession(PruneReport(plans, dry_run, None, tuple(refused)), tuple(notes))
