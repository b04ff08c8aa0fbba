"""Copying runs between a local ``runs/`` folder and the Drive mirror on request: restore and backup.

Restore copies a mirror run into ``<dest>/<run_name>`` with the same crash-safe, verified
copy the background mirror uses (temporary name, checksum checked in the same pass,
rename). The local index is committed after every file, so an interrupted restore
continues where it stopped, and a local checkpoint newer than the mirror's is never
overwritten unless ``force``. A format-2 checkpoint (or best model) has the packs it lists
copied first, each checked by its name (one already here that verifies is not copied
again), then its file, then its index entry. No torch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping
from pathlib import Path

from ckptctl.core.format import (
    BEST_METADATA_FILE,
    BEST_MODEL_FILE,
    CHECKPOINT_DIR,
    INDEX_FILE,
    TRAINING_LOG_FILE,
    TRAINING_STATE_FILE,
    checkpoint_relpath,
    utc_now_iso,
)
from ckptctl.core.manifest import BestInfo, CheckpointEntry, Index, mirrored_record
from ckptctl.core.objects import pack_checksum, pack_relpath
from ckptctl.core.resume import resume_command
from ckptctl.errors import CheckpointIntegrityError, CkptctlError, CorruptIndexError, NotFoundError, UnsafePathError
from ckptctl.storage.atomic import (
    ProgressCallback,
    atomic_copy,
    cleanup_temporaries,
    hash_file,
    resolve_inside,
    verify_checksum,
)
from ckptctl.storage import legacy
from ckptctl.storage.lock import RunLock
from ckptctl.storage.mirror import SyncReport, apply_sync_report, resolve_budget, sync_run, write_mirror_status
from ckptctl.storage.objects import objects_dir, pack_path
from ckptctl.storage.runfiles import commit_index, replace_best, set_aside, settle, settled_best
from ckptctl.storage.scan import checkpoint_files_on_disk, find_runs, newest_of, read_best_record, read_index, read_training_state


def choose_mirror_run(drive: str | os.PathLike, run: str | None = None) -> Path:
    """The mirror run to restore: the one named ``run``, else the newest (:func:`ckptctl.storage.scan.newest_of`, never file times)."""
    drive = Path(drive)
    try:
        runs = find_runs(drive)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"Drive folder {drive} not found (is Drive mounted? set --drive or CKPTCTL_DRIVE)") from None
    if run is not None:
        for candidate in runs:
            if candidate.name == run:
                return candidate
        names = ", ".join(r.name for r in runs) or "none"
        raise NotFoundError(f"{drive}: no run named {run!r} (runs there: {names})")
    if not runs:
        raise NotFoundError(f"{drive}: no runs to restore")
    return newest_of(runs)


@dataclass(frozen=True)
class RestoreReport:
    """What one restore did (run-relative paths)."""

    source: Path
    dest: Path
    copied: tuple[str, ...] = ()
    already: tuple[str, ...] = ()
    kept_local: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    bytes_copied: int = 0
    resume_id: int | None = None
    skipped: tuple[dict[str, str], ...] = ()  # {"path", "reason"} of files not restored
    resume_command: str | None = None  # how to continue the run: the trainloop's command or the library call
    #: Tensor packs copied (``objects/<name>.safetensors``) and their bytes; ``copied``/``bytes_copied`` are the other files.
    objects_copied: tuple[str, ...] = ()
    objects_bytes: int = 0
    notes: tuple[str, ...] = ()  # source files left out on purpose (not checkpoints a run can resume from)

    @property
    def ok(self) -> bool:
        """True when every mirror entry asked for was restored (or already present)."""
        return not self.problems

    def to_json(self) -> dict:
        """The ``restore --json`` document."""
        return {
            "run": self.source.name,
            "source": str(self.source),
            "dest": str(self.dest),
            "copied": list(self.copied),
            "already_present": list(self.already),
            "kept_local": list(self.kept_local),
            "problems": list(self.problems),
            "bytes_copied": self.bytes_copied,
            "objects_copied": list(self.objects_copied),
            "objects_bytes": self.objects_bytes,
            "resume_id": self.resume_id,
            "resume_command": self.resume_command,
            "notes": list(self.notes),
        }


@dataclass
class _RestoreLog:
    """What a restore has done so far, built up while it runs; :meth:`freeze` makes its :class:`RestoreReport`."""

    copied: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    kept_local: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    resume_id: int | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    objects_copied: list[str] = field(default_factory=list)
    objects_bytes: int = 0

    def skip(self, relpath: str, reason: str) -> None:
        """Record a mirror file that could not be restored (the rest of the restore goes on)."""
        self.skipped.append({"path": relpath, "reason": reason})
        self.problems.append(f"{relpath} not restored: {reason}")

    def freeze(self, source: Path, dest: Path) -> RestoreReport:
        """The report of this restore (how to resume it fits the run: :func:`ckptctl.core.resume.resume_command`)."""
        command = resume_command(dest, read_training_state(dest)) if self.resume_id is not None else None
        return RestoreReport(
            source, dest, tuple(self.copied), tuple(self.already), tuple(self.kept_local), tuple(self.problems),
            self.bytes_copied, self.resume_id, tuple(self.skipped), command, tuple(self.objects_copied), self.objects_bytes,
        )


@dataclass
class _Copy:
    relpath: str
    src: Path
    dst: Path
    checksum: str | None
    size: int
    entry: CheckpointEntry | None = None
    best: BestInfo | None = None
    #: The packs the file lists (copied before it): name -> size.
    objects: dict[str, int] = field(default_factory=dict)


@dataclass
class _Progress:
    """One progress bar over a restore's files and packs: each copy reports from where the previous ones ended."""

    callback: ProgressCallback
    total: int
    done: int = 0

    def next_file(self, size: int) -> ProgressCallback:
        """The callback for the next copy, of ``size`` bytes (counted as done afterwards, copied or not)."""
        base, self.done = self.done, self.done + size
        if self.callback is None:
            return None
        return lambda d, _t: self.callback(min(base + d, self.total), self.total)


def _local_ok(path: Path, checksum: str) -> bool:
    try:
        verify_checksum(path, checksum)
        return True
    except CheckpointIntegrityError:
        return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _same_file(a: Path, b: Path) -> bool:
    """True if ``a`` and ``b`` hold the same bytes (sizes first, then checksums)."""
    try:
        return _size(a) == _size(b) and hash_file(a)[1] == hash_file(b)[1]
    except OSError:
        return False


def _copy_guide_metadata(mirror_run: Path, dest_run: Path, report: _RestoreLog, with_best: bool) -> None:
    """Copy the metadata files other code wrote (the Colab guide's) as they are, where the local run lacks them.

    The local run then is what the mirror holds: ``ls``/``verify`` describe it by them,
    and ``ModelPersistence`` keeps their bytes as ``.legacy`` when it builds its index.
    The checkpoint files (and ``best_model.pt``) are already durable; these go last.
    """
    names = [INDEX_FILE] + ([BEST_METADATA_FILE] if with_best and (dest_run / BEST_MODEL_FILE).is_file() else [])
    for name in names:
        src, dst = mirror_run / name, dest_run / name
        if src.is_file() and not src.is_symlink() and not dst.exists():
            atomic_copy(src, dst)
            report.copied.append(name)


def _copy_file(c: _Copy, dest_run: Path, on_progress: ProgressCallback) -> tuple[int, str]:
    """Copy one file of a restore, checked against its checksum; the best model in one commit with its record."""
    if c.best is None:
        return atomic_copy(c.src, c.dst, expected_checksum=c.checksum, on_progress=on_progress)
    best = c.best
    info = replace_best(
        dest_run,
        lambda before: atomic_copy(c.src, c.dst, expected_checksum=c.checksum, on_progress=on_progress, before_replace=before),
        lambda _size, _checksum: best,
    )
    return info.size_bytes, info.checksum


def restore_run(
    mirror_run: str | os.PathLike,
    dest_run: str | os.PathLike,
    *,
    only_id: int | None = None,
    force: bool = False,
    on_progress: ProgressCallback = None,
    lock_held: bool = False,
    source_files: Mapping[int, Path] | None = None,
    source_best: Path | None = None,
) -> RestoreReport:
    """Restore ``mirror_run`` into ``dest_run`` holding its run lock; return what was done.

    Copies the mirror's checkpoints (or only ``only_id``), best model and training state
    that are missing locally, older locally, or damaged locally. A local checkpoint or best
    model that verifies and is newer than the mirror's is kept unless ``force``. Raises
    RunLockedError while a trainer holds ``dest_run``. ``lock_held``: the caller (a
    ModelPersistence opening the run) already holds the run lock. ``source_files`` (id ->
    file) and ``source_best`` replace the mirror's ``checkpoints/`` and ``best_model.pt``:
    loose files (:mod:`ckptctl.storage.restore_loose`), copied by name without checksums.
    """
    job = _Restore(Path(mirror_run), Path(dest_run), force, source_files=source_files, source_best=source_best)
    job.read_mirror(only_id)
    (job.dest_run / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if lock_held else RunLock(job.dest_run):
        cleanup_temporaries(job.dest_run)
        cleanup_temporaries(job.dest_run / CHECKPOINT_DIR)
        cleanup_temporaries(objects_dir(job.dest_run))
        job.read_local()
        copies = job.plan_checkpoints() + job.plan_best()
        job.copy_all(copies, on_progress)
        job.finish()
    return job.log.freeze(job.mirror_run, job.dest_run)


@dataclass
class _Restore:
    """One restore, in the order it runs: read the mirror, read the local run, plan, copy, commit."""

    mirror_run: Path
    dest_run: Path
    force: bool
    log: _RestoreLog = field(default_factory=_RestoreLog)
    mirror_index: Index = field(init=False)
    mirror_guide: Any = None  # the mirror's index, when other code (the guide) wrote it
    mirror_entries: dict[int, CheckpointEntry] = field(default_factory=dict)
    mirror_files: dict[int, Path] = field(default_factory=dict)  # unindexed checkpoint files on the mirror
    local_index: Index = field(init=False)
    local_indexed: bool = True  # the local run has a ckptctl index
    local: dict[int, CheckpointEntry] = field(default_factory=dict)
    guide_best: Any = None
    local_packs: dict[str, bool] = field(default_factory=dict)  # pack name -> verified here (checked once)
    bad_packs: dict[str, str] = field(default_factory=dict)  # pack name -> why its copy from the mirror failed
    source_files: Mapping[int, Path] | None = None  # loose files to copy instead of the mirror's checkpoints/
    source_best: Path | None = None  # a loose best_model.pt, copied by name

    def read_mirror(self, only_id: int | None) -> None:
        """The mirror's index (other code's, or none: its files by name) and which of its checkpoints to restore."""
        try:
            self.mirror_index = read_index(self.mirror_run)
        except FileNotFoundError:
            self.mirror_index = Index(run_name=self.mirror_run.name, next_id=0)
        except CorruptIndexError as exc:
            self.mirror_guide = legacy.read_guide_index(self.mirror_run)  # other code's index: copy its files by name, no problem
            if self.mirror_guide is None:
                self.log.problems.append(f"mirror index unreadable ({exc}); copying its checkpoint files by name")
            self.mirror_index = Index(run_name=self.mirror_run.name, next_id=0)
        for raw_id, reason in self.mirror_index.skipped:
            self.log.problems.append(f"mirror index entry {raw_id!r} skipped: {reason}")
        entries = self.mirror_index.by_id()
        found = checkpoint_files_on_disk(self.mirror_run) if self.source_files is None else self.source_files
        files = {i: p for i, p in found.items() if i not in entries}
        if only_id is not None:
            if only_id not in entries and only_id not in files:
                have = ", ".join(map(str, sorted(set(entries) | set(files)))) or "none"
                raise NotFoundError(f"{self.mirror_run}: no checkpoint {only_id} on the mirror (it has {have})")
            entries = {k: v for k, v in entries.items() if k == only_id}
            files = {k: v for k, v in files.items() if k == only_id}
        self.mirror_entries, self.mirror_files = entries, files

    def read_local(self) -> None:
        """The local index; other code's is kept as ``.legacy``, an unreadable one refused unless ``force``."""
        fresh = Index(run_name=self.mirror_index.run_name or self.mirror_run.name, next_id=0)
        try:
            self.local_index = read_index(self.dest_run)
        except FileNotFoundError:
            self.local_indexed, self.local_index = False, fresh
        except CorruptIndexError as exc:
            if legacy.read_guide_index(self.dest_run) is not None:  # other code's index: its bytes kept before it is replaced
                legacy.keep_legacy_copy(self.dest_run / INDEX_FILE)
                self.local_indexed = False
            elif not self.force:
                raise CkptctlError(f"{self.dest_run}: local index unreadable ({exc}); use --force to set it aside and restore") from None
            else:
                set_aside(self.dest_run / INDEX_FILE, "unreadable; replaced by restore --force")
            self.local_index = fresh
        self.local = self.local_index.by_id()

    def plan_checkpoints(self) -> list[_Copy]:
        """The checkpoint copies to make: the mirror's entries, then its unindexed files."""
        local_files = checkpoint_files_on_disk(self.dest_run)
        copies = [c for i, m in sorted(self.mirror_entries.items()) if (c := self._plan_entry(i, m, local_files)) is not None]
        for checkpoint_id, src in sorted(self.mirror_files.items()):
            rel = checkpoint_relpath(checkpoint_id)
            try:
                dst = resolve_inside(self.dest_run, rel)
            except UnsafePathError as exc:
                self.log.problems.append(f"checkpoint {checkpoint_id}: {exc}")
                continue
            if dst.exists() and not self.force:
                (self.log.already if _same_file(src, dst) else self.log.kept_local).append(rel)
                continue
            copies.append(_Copy(rel, src, dst, None, _size(src)))
        return copies

    def _plan_entry(self, checkpoint_id: int, m: CheckpointEntry, local_files: dict[int, Path]) -> _Copy | None:
        """The copy of one indexed mirror checkpoint, or None when the local one stays (same, newer, or kept)."""
        report = self.log
        try:
            src, dst = resolve_inside(self.mirror_run, m.path), resolve_inside(self.dest_run, m.path)
        except UnsafePathError as exc:
            report.problems.append(f"checkpoint {checkpoint_id}: {exc}")
            return None
        if not src.is_file():
            report.problems.append(f"checkpoint {checkpoint_id}: {m.path} is listed on the mirror but missing")
            return None
        mine = self.local.get(checkpoint_id)
        if mine is not None and self.local_good(dst, mine):
            if mine.checksum == m.checksum:
                report.already.append(m.path)
                return None
            if mine.timestamp > m.timestamp and not self.force:
                report.kept_local.append(m.path)
                return None
        elif mine is None and checkpoint_id in local_files and dst.is_file():
            if hash_file(dst)[1] == m.checksum:
                if self.packs_here(m):
                    self.local[checkpoint_id] = m
                    report.already.append(m.path)
                    return None
                # the same file, its packs not all here: copied below (only the packs missing)
            elif not self.force:
                report.kept_local.append(m.path)
                return None
        return _Copy(m.path, src, dst, m.checksum, _size(src), entry=m, objects=dict(m.objects))

    def pack_here(self, name: str) -> bool:
        """True if pack ``name`` is in the local run with the bytes its name says (hashed once per restore)."""
        if name not in self.local_packs:
            self.local_packs[name] = _local_ok(pack_path(self.dest_run, name), pack_checksum(name))
        return self.local_packs[name]

    def packs_here(self, record: CheckpointEntry | BestInfo) -> bool:
        """True if every pack ``record`` lists verifies in the local run."""
        return all(self.pack_here(name) for name in record.objects)

    def local_good(self, path: Path, record: CheckpointEntry | BestInfo) -> bool:
        """True if the local file ``path`` of ``record`` and every pack it lists verify."""
        return path.is_file() and _local_ok(path, record.checksum) and self.packs_here(record)

    def copy_packs(self, c: _Copy, progress: _Progress) -> None:
        """Copy the packs of ``c`` that the local run lacks, each checked by its name; raise CheckpointIntegrityError naming a bad one."""
        for name, size in c.objects.items():
            if self.pack_here(name):
                continue
            if name in self.bad_packs:  # already failed for another checkpoint: not read from Drive again
                raise CheckpointIntegrityError(self.bad_packs[name])
            src, dst = pack_path(self.mirror_run, name), pack_path(self.dest_run, name)
            dst.parent.mkdir(exist_ok=True)
            try:
                copied, _ = atomic_copy(src, dst, expected_checksum=pack_checksum(name), on_progress=progress.next_file(size))
            except FileNotFoundError:
                if src.exists():
                    raise  # the local side failed
                self.bad_packs[name] = f"shared object {pack_relpath(name)} is listed on the mirror but missing there"
                raise CheckpointIntegrityError(self.bad_packs[name]) from None
            except CheckpointIntegrityError as exc:  # damaged on Drive
                self.bad_packs[name] = f"shared object {pack_relpath(name)}: {exc}"
                raise CheckpointIntegrityError(self.bad_packs[name]) from None
            self.local_packs[name] = True
            self.log.objects_copied.append(pack_relpath(name))
            self.log.objects_bytes += copied

    def plan_best(self) -> list[_Copy]:
        """The best model's copy, if the mirror's is to replace the local one (other code's is copied by name)."""
        report = self.log
        try:
            # the record the mirror's file matches (after a crash mid-replace, by its bytes)
            mirror_best = settle(self.mirror_run, read_best_record(self.mirror_run))
        except (CorruptIndexError, UnsafePathError) as exc:
            mirror_best = None
            self.guide_best = legacy.read_guide_best(self.mirror_run)
            if self.guide_best is None:
                report.problems.append(f"mirror best model not restored: {exc}")
        src, dst = self.source_best or self.mirror_run / BEST_MODEL_FILE, self.dest_run / BEST_MODEL_FILE
        by_name = self.guide_best is not None or self.source_best is not None
        if by_name and src.is_file() and not src.is_symlink():  # no checksum: copied by name
            if dst.exists() and not self.force:
                (report.already if _same_file(src, dst) else report.kept_local).append(BEST_MODEL_FILE)
                return []
            return [_Copy(BEST_MODEL_FILE, src, dst, None, _size(src))]
        if mirror_best is None:
            return []
        try:
            src, dst = resolve_inside(self.mirror_run, mirror_best.path), resolve_inside(self.dest_run, mirror_best.path)
        except UnsafePathError as exc:
            report.problems.append(f"mirror best model not restored: {exc}")
            return []
        local_best = settled_best(self.dest_run)
        local_good = local_best is not None and self.local_good(dst, local_best)
        if not src.is_file():
            report.problems.append(f"mirror best model {mirror_best.path} is missing")
        elif local_good and local_best.checksum == mirror_best.checksum:
            report.already.append(mirror_best.path)
        elif local_good and local_best.timestamp > mirror_best.timestamp and not self.force:
            report.kept_local.append(mirror_best.path)
        else:
            objects = dict(mirror_best.objects)
            return [_Copy(mirror_best.path, src, dst, mirror_best.checksum, _size(src), best=mirror_best, objects=objects)]
        return []

    def copy_all(self, copies: list[_Copy], on_progress: ProgressCallback) -> None:
        """Copy each file's packs, then the file, all checked; the index is committed after each checkpoint (a cut restore resumes there)."""
        packs = {name: size for c in copies for name, size in c.objects.items() if not self.pack_here(name)}
        progress = _Progress(on_progress, sum(c.size for c in copies) + sum(packs.values()))
        for c in copies:
            try:
                self.copy_packs(c, progress)
            except CheckpointIntegrityError as exc:  # a pack damaged or missing on Drive: the file is not copied
                progress.next_file(c.size)
                self.log.skip(c.relpath, str(exc))
                continue
            try:
                size, checksum = _copy_file(c, self.dest_run, progress.next_file(c.size))
            except FileNotFoundError:
                self.log.skip(c.relpath, "listed on the mirror but missing there")
                continue
            except CheckpointIntegrityError as exc:  # damaged on Drive: skip it, the others still restore
                self.log.skip(c.relpath, str(exc))
                continue
            self.log.copied.append(c.relpath)
            self.log.bytes_copied += size
            if c.entry is not None:
                self.local[c.entry.id] = replace(c.entry, mirrored=mirrored_record(checksum, size, utc_now_iso(), str(self.mirror_run)))
                self.local_index = self.local_index.with_entries(list(self.local.values()))
                commit_index(self.dest_run, self.local_index)

    def finish(self) -> None:
        """The final index (or other code's metadata, kept in its format), then the training state and log."""
        final = self.local_index.with_entries(list(self.local.values()))
        # replace, not a new Index: the local index's retired ids (and unreadable entries) stay;
        # an id restored here is listed again, so it is no longer retired
        final = replace(final, next_id=max(final.next_id, self.mirror_index.next_id)).forget_retired(final.by_id())
        if self.mirror_guide is not None and not self.local_indexed and not final.checkpoints:
            _copy_guide_metadata(self.mirror_run, self.dest_run, self.log, self.guide_best is not None)  # stays in the other code's format
        else:
            commit_index(self.dest_run, final)
        for name in (TRAINING_STATE_FILE, TRAINING_LOG_FILE):
            src, dst = self.mirror_run / name, self.dest_run / name
            if src.is_file() and not src.is_symlink() and (self.force or not dst.exists()):
                atomic_copy(src, dst)
                self.log.copied.append(name)
        ids = set(final.by_id()) | set(checkpoint_files_on_disk(self.dest_run))
        self.log.resume_id = max(ids) if ids else None


def backup_run(
    local_run: str | os.PathLike,
    drive: str | os.PathLike,
    *,
    max_bytes: int | str | None = None,
    on_progress: ProgressCallback = None,
) -> SyncReport:
    """Push ``local_run`` to ``<drive>/<run name>`` now, holding the run lock; return what was done.

    Uses :func:`ckptctl.storage.mirror.sync_run` (the background mirror's verified, atomic
    copy, newest first) within ``max_bytes`` (bytes or a size string like ``"14GB"``;
    None: no budget, only a full Drive limits), then records the report in the local index
    (:func:`~ckptctl.storage.mirror.apply_sync_report`) and in ``mirror_status.json``; a
    failed sync records its error there before it is raised. Raises RunLockedError while
    a trainer holds the run (its own mirror is at work then).
    """
    local_run, drive = Path(local_run), Path(drive)
    if not drive.is_dir():
        raise NotFoundError(f"Drive folder {drive} not found (is Drive mounted? set --drive or CKPTCTL_DRIVE)")
    try:
        read_index(local_run)
    except FileNotFoundError:
        raise CkptctlError(
            f"{local_run}: has no index (copied by hand?); open it once with the library so it is rebuilt, then back it up"
        ) from None
    mirror_run = drive / local_run.resolve().name
    budget = resolve_budget(max_bytes, mirror_run) if max_bytes is not None else None
    with RunLock(local_run):
        try:
            report = sync_run(local_run, mirror_run, max_bytes=budget, on_progress=on_progress)
        except Exception as exc:
            write_mirror_status(local_run, None, error=f"{exc.__class__.__name__}: {exc}", mirror_run=mirror_run)
            raise
        index = read_index(local_run)
        updated = apply_sync_report(index, report)
        if updated != index:
            commit_index(local_run, updated)
        write_mirror_status(local_run, report, mirror_run=mirror_run)
    return report


@dataclass(frozen=True)
class RunBackup:
    """One run pushed by ``ckptctl backup``: the local run, its mirror folder, and what the sync did."""

    run_dir: Path
    mirror: Path
    sync: SyncReport

    @property
    def problems(self) -> list[str]:
        """Damaged local checkpoints that were not backed up, and a newest checkpoint too big for the budget."""
        lines = [f"checkpoint {item['id']} not backed up: {item['reason']}" for item in self.sync.damaged]
        return lines + ([self.sync.too_big] if self.sync.too_big else [])

    def to_json(self) -> dict:
        """One run of ``backup --json``."""
        rep = self.sync
        return {
            "run": self.run_dir.name, "path": str(self.run_dir), "mirror": str(self.mirror), "copied": rep.copied,
            "unchanged": rep.skipped, "deleted": rep.deleted, "bytes_copied": rep.bytes_copied,
            "newest_verified_id": rep.newest_verified_id, "not_mirrored": rep.not_mirrored,
            "used_bytes": rep.used_bytes, "budget_bytes": rep.budget_bytes, "too_big": rep.too_big,
            "damaged": rep.damaged, "objects_copied": rep.objects_copied, "uploaded_bytes": rep.uploaded_bytes,
        }


@dataclass(frozen=True)
class BackupReport:
    """What ``ckptctl backup`` did over its runs; ``budget_given``: the budget came from ``--max-size``, not Drive's free space."""

    drive: Path
    runs: tuple[RunBackup, ...]
    budget_given: bool = False

    @property
    def ok(self) -> bool:
        """False when a local checkpoint was damaged or the newest did not fit."""
        return not self.warnings

    @property
    def warnings(self) -> list[str]:
        """Every run's problems, as ``RUN: problem`` lines."""
        return [f"{run.run_dir.name}: {line}" for run in self.runs for line in run.problems]

    def to_json(self) -> dict:
        """The ``backup --json`` document."""
        return {"drive": str(self.drive), "runs": [run.to_json() for run in self.runs]}


def backup_to_drive(
    local_run: str | os.PathLike,
    drive: str | os.PathLike,
    *,
    max_size: int | str | None = None,
    on_progress: ProgressCallback = None,
) -> RunBackup:
    """``ckptctl backup`` of one run: :func:`backup_run` within ``max_size``, by default the Drive budget.

    The default (``max_size`` None) is :func:`ckptctl.storage.mirror.default_budget`: the
    Drive folder's free space plus what the run's mirror holds, less a margin. When the
    Drive folder is missing, :func:`backup_run` says Drive is not mounted.
    """
    local_run, drive = Path(local_run), Path(drive)
    mirror = drive / local_run.resolve().name
    budget = resolve_budget(max_size, mirror) if drive.is_dir() else None
    return RunBackup(local_run, mirror, backup_run(local_run, drive, max_bytes=budget, on_progress=on_progress))
