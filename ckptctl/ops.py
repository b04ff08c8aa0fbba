"""Checks and changes over whole runs that need torch: verify, show, diff, resume-info, promote.

This sits beside the persistence API (it uses :mod:`ckptctl.torch_io` for every load,
always ``weights_only=True``); the CLI imports it only inside the commands that need it,
so ``ckptctl ls`` and ``ckptctl --help`` never import torch. Results are frozen
dataclasses with raw numbers whose ``to_json()`` is the command's ``--json`` document;
nothing here prints.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional


from ckptctl.core.format import BEST_METADATA_FILE, BEST_MODEL_FILE, INDEX_FILE, RESERVED_CHECKPOINT_KEYS, TRAINING_STATE_FILE
from ckptctl.core.manifest import BestInfo
from ckptctl.core.objects import referenced_packs
from ckptctl.core.resume import choose_resume_checkpoint, next_position
from ckptctl.errors import CheckpointIntegrityError, CorruptIndexError, NotFoundError, UnsafePathError
from ckptctl.storage import legacy
from ckptctl.storage.atomic import atomic_copy, open_regular, resolve_inside
from ckptctl.storage.collect import collect_run_packs
from ckptctl.storage.lock import RunLock
from ckptctl.storage.objects import PackChecks, check_record_objects
from ckptctl.storage.runfiles import commit_index, replace_best
from ckptctl.storage.scan import checkpoint_files_on_disk, read_best, read_best_record, read_index, read_json_file, read_training_state
from ckptctl.storage.foreign import ForeignGroup
from ckptctl.storage.select import CheckpointRef
from ckptctl.tensors import TensorDiff, compare_states, jsonable, summarize
from ckptctl.torch_io import verify_file

ProgressCallback = Optional[Callable[[int, int], None]]

STATUSES = ("ok", "corrupt", "missing", "unsafe", "nonfinite")

#: The detail of a file that other code's metadata describes (the Colab guide's): no checksum exists.
LEGACY_DETAIL = "no checksum ({what} written by other code): checked by loading only"


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyResult:
    """The outcome for one file: ``status`` is one of :data:`STATUSES`; ``id`` is None for the best model and metadata."""

    run: str
    id: int | None
    path: str
    status: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """The ``verify --json`` form."""
        return {"run": self.run, "id": self.id, "path": self.path, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found: one result per file checked (see :func:`verify_runs`)."""

    results: tuple[VerifyResult, ...]

    @property
    def ok(self) -> bool:
        """True when every file checked is ok."""
        return all(r.status == "ok" for r in self.results)

    def to_json(self) -> dict[str, Any]:
        """The ``verify --json`` document."""
        return {"ok": self.ok, "results": [r.to_json() for r in self.results]}


@dataclass
class _Job:
    id: int | None
    path: Path | None
    shown: str
    checksum: str | tuple[str, ...] | None  # the best model: any of its record's checksums
    detail: str = ""
    size: int = 0  # bytes this job hashes: its file, plus the packs no earlier job of the run lists
    #: Format 2: the packs its index entry / best-model records list (name -> size).
    objects: dict[str, int] = field(default_factory=dict)
    #: The packs of ``objects`` no earlier job of the run lists: hashed (with progress) by this job.
    first_packs: tuple[str, ...] = ()


def _plan_verify_best(run_dir: Path, jobs: list[_Job], bad: Callable[..., None]) -> None:
    """The best model's job: its file against every checksum its metadata allows (one, outside a replace)."""
    try:
        record = read_best_record(run_dir)
        best_detail = "no best_metadata.json: checked by loading only"
    except (CorruptIndexError, UnsafePathError) as exc:
        record = None
        if legacy.read_guide_best(run_dir) is None:
            best_detail = "no usable best_metadata.json: checked by loading only"
            bad(None, str(run_dir / BEST_METADATA_FILE), f"best metadata unreadable: {exc}")
        else:
            best_detail = LEGACY_DETAIL.format(what=BEST_METADATA_FILE)
    relpath = record.candidates()[-1].path if record is not None else BEST_MODEL_FILE
    shown = str(run_dir / relpath)
    try:
        best_file = resolve_inside(run_dir, relpath)
    except UnsafePathError as exc:
        bad(None, shown, f"not read: {exc}")
        return
    if record is not None and (record.current is not None or best_file.is_file()):  # pending alone: the first best is not there yet
        jobs.append(_Job(None, best_file, shown, record.checksums(), objects=referenced_packs(record.candidates())))
    elif record is None and best_file.is_file():
        jobs.append(_Job(None, best_file, shown, None, best_detail))
        if not (run_dir / BEST_METADATA_FILE).exists():
            bad(None, str(run_dir / BEST_METADATA_FILE), "missing: best_model.pt has no checksum to check against", "missing")


def _plan_verify(run_dir: Path) -> tuple[list[_Job], list[VerifyResult]]:
    """Every file to check in one run, plus problems found without opening any payload."""
    jobs: list[_Job] = []
    found: list[VerifyResult] = []
    name = run_dir.name

    def bad(checkpoint_id, shown, detail, status="corrupt"):
        found.append(VerifyResult(name, checkpoint_id, shown, status, detail))

    unindexed_detail = "not in the index: checked by loading only"
    try:
        index = read_index(run_dir)
    except FileNotFoundError:
        index = None
    except CorruptIndexError as exc:
        index = None
        if legacy.read_guide_index(run_dir) is None:
            bad(None, str(run_dir / INDEX_FILE), f"index unreadable: {exc}")
        else:
            unindexed_detail = LEGACY_DETAIL.format(what=INDEX_FILE)
    if index is not None:
        for raw_id, reason in index.skipped:
            bad(raw_id if isinstance(raw_id, int) else None, str(run_dir / INDEX_FILE), f"index entry skipped: {reason}")
        for entry in index.checkpoints:
            shown = str(run_dir / entry.path)
            try:
                path = resolve_inside(run_dir, entry.path)
            except UnsafePathError as exc:
                bad(entry.id, shown, f"not read: {exc}")
                continue
            jobs.append(_Job(entry.id, path, shown, entry.checksum, objects=dict(entry.objects)))
    indexed = set(index.by_id()) if index else set()
    indexed |= set(index.deleting) if index else set()  # tombstoned leftovers of an interrupted removal: not checkpoints
    on_disk = checkpoint_files_on_disk(run_dir)
    if index is None and on_disk and not (run_dir / INDEX_FILE).exists():
        bad(None, str(run_dir / INDEX_FILE), "no index: checksums unknown, checkpoints checked by loading only", "missing")
    for checkpoint_id, path in sorted(on_disk.items()):
        if checkpoint_id not in indexed:
            jobs.append(_Job(checkpoint_id, path, str(path), None, unindexed_detail))
    _plan_verify_best(run_dir, jobs, bad)
    state_path = run_dir / TRAINING_STATE_FILE
    if state_path.exists() or state_path.is_symlink():
        try:
            if not isinstance(read_json_file(state_path), dict):
                bad(None, str(state_path), "training state is not a JSON object")
        except (CorruptIndexError, FileNotFoundError) as exc:
            bad(None, str(state_path), f"training state unreadable: {exc}")
    _size_jobs(jobs)
    return jobs, found


def _size_jobs(jobs: list[_Job]) -> None:
    """Each job's bytes to hash: its file, plus the packs it is the first of the run to list (each pack is hashed once)."""
    seen: set[str] = set()
    for job in jobs:
        try:
            job.size = job.path.stat().st_size if job.path else 0
        except OSError:
            job.size = 0
        job.first_packs = tuple(name for name in job.objects if name not in seen)
        seen.update(job.objects)
        job.size += sum(job.objects[name] for name in job.first_packs)


def verify_runs(
    run_dirs: list[Path],
    *,
    deep: bool = False,
    on_progress: ProgressCallback = None,
) -> list[VerifyResult]:
    """Verify every checkpoint and best model of ``run_dirs``: checksum, safe trial load, finite values if ``deep``.

    Format 2: every pack a checkpoint references is checked against its name, once per run
    (:class:`~ckptctl.storage.objects.PackChecks`); a missing or damaged pack is reported
    against every checkpoint and best model that uses it, naming the pack. Never raises
    for a bad file; each becomes a result. ``on_progress(done_bytes, total_bytes)`` is
    called as files and packs are hashed.
    """
    planned = [(run, *_plan_verify(run)) for run in run_dirs]
    total = sum(job.size for _, jobs, _ in planned for job in jobs)
    done = 0
    results: list[VerifyResult] = []
    for run, jobs, found in planned:
        results.extend(found)
        checks = PackChecks()
        for job in jobs:
            base = done

            def progress(d: int, _t: int, base=base) -> None:
                if on_progress:
                    on_progress(min(base + d, total), total)

            results.append(_verify_job(run, job, deep, progress, checks))
            done = base + job.size
            if on_progress:
                on_progress(done, total)
    for run in run_dirs:
        results = _catch_up_pruned(run, results, deep)
        results = _recheck_live_best(run, results, deep)
    return results


def verify_ref(ref: CheckpointRef, *, deep: bool = False) -> VerifyResult:
    """Verify one file picked by path (``verify FILE``) against the checksum(s) its run's index gives it."""
    run = ref.run_dir if ref.run_dir is not None else ref.path.parent
    return _verify_job(run, _Job(ref.checkpoint_id, ref.path, str(ref.path), ref.checksum), deep)


def verify_groups(groups: list[ForeignGroup], *, deep: bool = False, on_progress: ProgressCallback = None) -> list[VerifyResult]:
    """Verify every checkpoint of folders ckptctl did not write (:mod:`ckptctl.foreign_io`: safe loads, no checksums).

    One result per entry (a Trainer ``checkpoint-N/`` folder is one, its files checked
    together); never raises for a bad file. ``on_progress(done_bytes, total_bytes)`` per entry.
    """
    from ckptctl.foreign_io import check_entry

    total, done, results = sum(g.total_bytes for g in groups), 0, []
    for group in groups:
        for entry in group.entries:
            status, detail = check_entry(entry, deep=deep)
            results.append(VerifyResult(group.name, entry.id, str(entry.path), status, detail))
            done += entry.size_bytes
            if on_progress:
                on_progress(done, total)
    return results


def loads_safely(path: Path) -> bool:
    """True if ``path`` passes the safe trial load (``weights_only=True``, memory-mapped); for ``prune`` of files without checksums."""
    try:
        verify_file(path, None)
        return True
    except CheckpointIntegrityError:
        return False


def _verify_job(
    run: Path, job: _Job, deep: bool, on_progress: ProgressCallback = None, checks: PackChecks | None = None
) -> VerifyResult:
    """Checksum and safe trial load of one file and its packs, as a result (never raises for a bad file).

    The file's own problems (its checksum, its load) come first; then a bad pack, which is
    reported against every job that uses it (``checks``, shared by the jobs of one run,
    remembers each pack's outcome).
    """
    checks = checks if checks is not None else PackChecks()
    _hash_first_packs(run, job, checks, on_progress)
    try:
        verify_file(job.path, job.checksum, deep=deep, on_progress=_after(job, on_progress), checks=checks)
        check_record_objects(run, job, checks)  # packs its record lists beyond those the file references
        return VerifyResult(run.name, job.id, job.shown, "ok", job.detail)
    except CheckpointIntegrityError as exc:
        return VerifyResult(run.name, job.id, job.shown, exc.status, str(exc))


def _hash_first_packs(run: Path, job: _Job, checks: PackChecks, on_progress: ProgressCallback) -> None:
    """Hash the packs ``job`` is the first of its run to list, with progress; their outcome is kept in ``checks``."""
    offset = 0
    for name in job.first_packs:
        def progress(d: int, t: int, offset=offset) -> None:
            if on_progress:
                on_progress(offset + d, t)

        try:
            checks.check(run, name, progress)
        except CheckpointIntegrityError:
            pass  # remembered: raised for the file below, after its own problems
        offset += job.objects[name]


def _after(job: _Job, on_progress: ProgressCallback) -> ProgressCallback:
    """Progress of the file itself, counted after the packs ``job`` hashed first."""
    offset = sum(job.objects[name] for name in job.first_packs)
    if on_progress is None:
        return None
    return lambda d, t: on_progress(offset + d, t)


def _catch_up_pruned(run: Path, results: list[VerifyResult], deep: bool, rounds: int = 5) -> list[VerifyResult]:
    """A live trainer may prune checkpoints while they are checked: drop those, verify what replaced them.

    Without this, a slow verify of a run that saves often could find every listed
    checkpoint pruned and report nothing at all. A checkpoint that verified and was
    pruned afterwards stays in the report as ok.
    """
    for _ in range(rounds):
        kept = _drop_pruned_meanwhile(results, [run])
        if len(kept) == len(results):
            return results
        checked = {r.id for r in kept if r.run == run.name and r.id is not None}
        jobs, _ = _plan_verify(run)
        checks = PackChecks()
        results = kept + [_verify_job(run, job, deep, checks=checks) for job in jobs if job.id is not None and job.id not in checked]
    return _drop_pruned_meanwhile(results, [run])  # still outpaced: report what was checked before it went


_BEST_FILES = (BEST_MODEL_FILE, BEST_METADATA_FILE)


def _best_results(run: Path, results: list[VerifyResult]) -> list[VerifyResult]:
    return [r for r in results if r.run == run.name and r.id is None and Path(r.path).name in _BEST_FILES]


def _recheck_live_best(run: Path, results: list[VerifyResult], deep: bool, rounds: int = 5) -> list[VerifyResult]:
    """A best-model problem is checked again while best_metadata.json changes under the check.

    A live trainer may replace the best model between verify reading its record and
    hashing its file (the file then matches a newer record). Every replace rewrites
    best_metadata.json before and after its one rename, so a check during which the
    metadata stayed byte-identical saw a consistent pair: its problem is real.
    """
    if all(r.status == "ok" for r in _best_results(run, results)):
        return results
    fresh: list[VerifyResult] = []
    for _ in range(rounds):
        before = _best_metadata_bytes(run)
        jobs, found = _plan_verify(run)
        fresh = [r for r in found if Path(r.path).name in _BEST_FILES and r.id is None]
        fresh += [_verify_job(run, job, deep) for job in jobs if job.id is None]
        if all(r.status == "ok" for r in fresh) or _best_metadata_bytes(run) == before:
            break
    old = set(map(id, _best_results(run, results)))
    return [r for r in results if id(r) not in old] + fresh


def _best_metadata_bytes(run: Path) -> bytes | None:
    """best_metadata.json's bytes (None if unreadable): whether a replace happened between two reads."""
    try:
        with os.fdopen(open_regular(run / BEST_METADATA_FILE), "rb") as f:
            return f.read(1 << 20)
    except OSError:
        return None


def _drop_pruned_meanwhile(results: list[VerifyResult], run_dirs: list[Path]) -> list[VerifyResult]:
    """A live trainer's retention may delete a checkpoint between reading the index and hashing it: not a problem."""
    gone: dict[str, set[int]] = {}
    for run in run_dirs:
        if any(r.run == run.name and r.status == "missing" for r in results):  # trainer may have just closed
            try:
                still = set(read_index(run).by_id())
            except (FileNotFoundError, CorruptIndexError):
                continue
            gone[run.name] = {r.id for r in results if r.run == run.name and r.id is not None and r.id not in still}
    return [r for r in results if not (r.status == "missing" and r.id in gone.get(r.run, ()))]


# --------------------------------------------------------------------------- show


def _load(ref: CheckpointRef) -> dict[str, Any]:
    """Checksum (when the index knows it) and safe load; CheckpointIntegrityError otherwise. Other tools' formats: :mod:`ckptctl.foreign_io`."""
    if ref.format is not None:
        from ckptctl.foreign_io import load_entry

        return load_entry(ref.path, ref.format)
    return verify_file(ref.path, ref.checksum)


@dataclass(frozen=True)
class CheckpointDescription:
    """Everything ``show`` prints about one checkpoint (raw numbers; ``components`` maps name -> summary)."""

    path: str
    label: str
    id: int | None
    size_bytes: int  # the full state it restores (format 2: its file plus the tensors it references)
    file_bytes: int  # its own file
    checksum_verified: bool
    format_version: Any
    timestamp: Any
    epoch: Any
    batch: Any
    global_step: Any
    metrics: dict[str, float | None]
    components: dict[str, dict[str, Any]]
    tensors: int
    parameters: int
    rng: list[str]
    extra: Any
    resume: dict[str, Any] | None

    ok: ClassVar[bool] = True  # a file that fails to load raises instead

    def to_json(self) -> dict[str, Any]:
        """The ``show --json`` document."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def describe_checkpoint(ref: CheckpointRef) -> CheckpointDescription:
    """Everything ``show`` prints about one checkpoint.

    Raises :class:`CheckpointIntegrityError` if the file fails its checksum or the safe load.
    """
    payload = _load(ref)
    names = [n for n in (payload.get("components") or []) if n in payload]
    names += [n for n in payload if n not in RESERVED_CHECKPOINT_KEYS and n not in names]
    components = {name: summarize(payload[name]).to_json() for name in names}
    rng = payload.get("rng")
    metrics = payload.get("metrics") if isinstance(payload.get("metrics"), Mapping) else {}
    position = {k: payload.get(k) for k in ("epoch", "batch", "global_step")}
    if position["global_step"] is None and ref.run_dir is not None and ref.checkpoint_id is not None:
        guide = legacy.read_guide_index(ref.run_dir)  # a file other code wrote: the step its run's index will give it
        if guide:
            position["global_step"] = legacy.guide_global_steps(guide, read_training_state(ref.run_dir)).get(ref.checkpoint_id)
    resume = None
    if all(isinstance(v, int) for v in position.values()):
        resume = {**position, **_continues_at(payload, read_training_state(ref.run_dir) if ref.run_dir is not None else None)}
    size = ref.path.stat().st_size if ref.path.is_file() else (ref.state_bytes or 0)  # a Trainer's checkpoint-N/ is a folder
    return CheckpointDescription(
        path=str(ref.path),
        label=ref.label,
        id=payload.get("checkpoint_id") if isinstance(payload.get("checkpoint_id"), int) else ref.checkpoint_id,
        size_bytes=ref.state_bytes if ref.state_bytes is not None else size,
        file_bytes=size,
        checksum_verified=ref.checksum is not None,
        format_version=payload.get("format_version"),
        timestamp=payload.get("timestamp"),
        epoch=position["epoch"],
        batch=position["batch"],
        global_step=position["global_step"],
        metrics={str(k): _finite(v) for k, v in metrics.items()},
        components=components,
        tensors=sum(c["tensors"] for c in components.values()),
        parameters=sum(c["parameters"] or 0 for c in components.values()),
        rng=sorted(rng) if isinstance(rng, Mapping) else [],
        extra=jsonable(payload.get("extra") or {}),
        resume=resume,
    )


def _finite(value: Any) -> float | None:
    try:
        value = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None



# --------------------------------------------------------------------------- diff


@dataclass(frozen=True)
class DiffSide:
    """One side of a ``diff``: which checkpoint, its position and metrics."""

    path: str
    label: str
    epoch: Any
    batch: Any
    global_step: Any
    metrics: dict[str, float | None]

    def to_json(self) -> dict[str, Any]:
        """``diff --json``'s ``a`` / ``b``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DiffReport:
    """How two checkpoints compare, tensor by tensor; ``ok`` (identical) when every tensor matches."""

    a: DiffSide
    b: DiffSide
    atol: float
    rows: tuple[TensorDiff, ...]
    rng_ignored: bool = False  # the ``rng`` subtree was left out of the comparison (``--ignore-rng``)

    @property
    def changed(self) -> int:
        """How many tensors differ (in value, shape or dtype, or are on one side only)."""
        return sum(1 for r in self.rows if r.status != "same")

    @property
    def identical(self) -> bool:
        """True when both hold the same tensor names and every tensor matches."""
        return self.changed == 0

    @property
    def bit_identical(self) -> bool:
        """True when every tensor is byte for byte the same (whatever ``atol``)."""
        return all(r.bit_identical for r in self.rows)

    @property
    def ok(self) -> bool:
        """Identical (``diff`` exits 1 otherwise, like diff(1))."""
        return self.identical

    def to_json(self) -> dict[str, Any]:
        """The ``diff --json`` document."""
        return {
            "a": self.a.to_json(),
            "b": self.b.to_json(),
            "atol": self.atol,
            "identical": self.identical,
            "bit_identical": self.bit_identical,
            "tensors": [r.to_json() for r in self.rows],
            "changed": self.changed,
            "compared": len(self.rows),
            "rng_ignored": self.rng_ignored,
        }


def diff_checkpoints(a: CheckpointRef, b: CheckpointRef, *, atol: float = 0.0, ignore_rng: bool = False) -> DiffReport:
    """Compare every tensor (model, optimizer, RNG, ...) of two checkpoints; with ``ignore_rng`` not the ``rng`` subtree.

    With ``atol == 0`` (the default) tensors match only when dtype, shape and every byte
    agree (:func:`ckptctl.tensors.compare_tensors`). ``identical`` is True when both hold the
    same tensor names and every tensor matches; ``bit_identical`` when, in addition, every
    tensor is byte for byte the same (whatever ``atol``). Raises CheckpointIntegrityError if
    either fails to load.
    """
    pa, pb = _load(a), _load(b)
    if ignore_rng:  # unseeded runs differ there by design
        rows = compare_states({k: v for k, v in pa.items() if k != "rng"}, {k: v for k, v in pb.items() if k != "rng"}, atol)
    else:
        rows = compare_states(pa, pb, atol)

    def side(ref: CheckpointRef, payload: Mapping[str, Any]) -> DiffSide:
        metrics = payload.get("metrics") if isinstance(payload.get("metrics"), Mapping) else {}
        metrics = {str(k): _finite(v) for k, v in metrics.items()}
        return DiffSide(str(ref.path), ref.label, payload.get("epoch"), payload.get("batch"), payload.get("global_step"), metrics)

    return DiffReport(side(a, pa), side(b, pb), atol, tuple(rows), ignore_rng)


# --------------------------------------------------------------------------- resume-info


@dataclass(frozen=True)
class ResumeInfo:
    """What resume would load from one run (``checkpoint`` None: none), why, and the newer ones it would skip."""

    run: str
    path: str
    checkpoint: dict[str, Any] | None
    reason: str
    skipped: tuple[dict[str, Any], ...]
    index_problem: str | None

    @property
    def ok(self) -> bool:
        """False when the run has checkpoints but none of them verifies (resume would fail)."""
        return self.checkpoint is not None or not self.skipped

    def to_json(self) -> dict[str, Any]:
        """One run of ``resume-info --json``."""
        return {
            "run": self.run,
            "path": self.path,
            "checkpoint": self.checkpoint,
            "reason": self.reason,
            "skipped": list(self.skipped),
            "index_problem": self.index_problem,
        }


@dataclass(frozen=True)
class ResumeInfoReport:
    """``resume-info`` over the runs at a path."""

    runs: tuple[ResumeInfo, ...]

    @property
    def ok(self) -> bool:
        """False when some run has checkpoints but none that verifies."""
        return all(info.ok for info in self.runs)

    def to_json(self) -> dict[str, Any]:
        """The ``resume-info --json`` document."""
        return {"runs": [info.to_json() for info in self.runs]}


def resume_info(run_dir: Path) -> ResumeInfo:
    """What ``ModelPersistence.resume`` (and ``trainloop --resume``) would load from ``run_dir``, read-only.

    Walks the checkpoints newest first, as resume does: checksum against the index, then a
    safe trial load. Checkpoint files missing from the index (which resume adopts) are
    checked by loading.
    """
    guide = None
    try:
        index, index_problem = read_index(run_dir), None
    except FileNotFoundError:
        index, index_problem = None, None
    except CorruptIndexError as exc:
        guide = legacy.read_guide_index(run_dir)  # other code's index: not a problem, it describes the files
        index, index_problem = None, (None if guide is not None else str(exc))
    candidates = _resume_candidates(run_dir, index)
    checks = PackChecks()  # a pack the candidates share is hashed once

    def check(checkpoint_id: int) -> dict[str, Any]:
        path, checksum, _, entry = candidates[checkpoint_id]
        if path is None:
            raise CheckpointIntegrityError(f"not read: {entry}")
        return verify_file(path, checksum, checks=checks)

    choice = choose_resume_checkpoint(candidates, check)
    skipped = tuple(
        {"id": i, "path": candidates[i][2], "status": getattr(exc, "status", "corrupt"), "detail": str(exc)} for i, exc in choice.skipped
    )
    chosen = None
    if choice.chosen_id is not None:
        _, checksum, shown, _ = candidates[choice.chosen_id]
        state = read_training_state(run_dir)
        chosen = _chosen_checkpoint(choice.chosen_id, choice.result, shown, checksum is not None, state)
        if chosen["global_step"] is None and guide:  # the step resume's index will give it
            chosen["global_step"] = legacy.guide_global_steps(guide, state).get(choice.chosen_id)
    return ResumeInfo(run_dir.name, str(run_dir), chosen, _resume_reason(chosen, skipped), skipped, index_problem)


def _resume_candidates(run_dir: Path, index: Any) -> dict[int, tuple[Path | None, str | None, str, Any]]:
    """id -> (file or None when unsafe, index checksum or None, path shown, entry or the reason it is unsafe)."""
    candidates: dict[int, tuple[Path | None, str | None, str, Any]] = {}
    for entry in index.checkpoints if index is not None else ():
        try:
            candidates[entry.id] = (resolve_inside(run_dir, entry.path), entry.checksum, str(run_dir / entry.path), entry)
        except UnsafePathError as exc:
            candidates[entry.id] = (None, None, str(run_dir / entry.path), str(exc))
    deleting = set(index.deleting) if index is not None else set()  # never adopted: the next open deletes them
    for checkpoint_id, path in checkpoint_files_on_disk(run_dir).items():
        if checkpoint_id not in deleting:
            candidates.setdefault(checkpoint_id, (path, None, str(path), None))
    return candidates


def _chosen_checkpoint(
    checkpoint_id: int, payload: Mapping[str, Any], shown: str, indexed: bool, training_state: Mapping[str, Any] | None
) -> dict[str, Any]:
    """resume-info's description of the checkpoint resume would load, and where training continues after it."""
    return {
        "id": checkpoint_id,
        "path": shown,
        "epoch": payload.get("epoch"),
        "batch": payload.get("batch"),
        "global_step": payload.get("global_step"),
        "metrics": {str(k): _finite(v) for k, v in (payload.get("metrics") or {}).items()},
        "timestamp": payload.get("timestamp"),
        "checksum_verified": indexed,
        "indexed": indexed,
        **_continues_at(payload, training_state),
    }


def _continues_at(payload: Mapping[str, Any], training_state: Mapping[str, Any] | None) -> dict[str, Any]:
    """``next_epoch`` / ``next_batch`` after a checkpoint, and ``batches_per_epoch`` when known (all None when unknown)."""
    extra = payload.get("extra") if isinstance(payload.get("extra"), Mapping) else None
    after = next_position(payload.get("epoch"), payload.get("batch"), extra, training_state)
    if after is None:
        return {"next_epoch": None, "next_batch": None, "batches_per_epoch": None}
    return {"next_epoch": after.epoch, "next_batch": after.batch, "batches_per_epoch": after.batches_per_epoch}


def _resume_reason(chosen: dict[str, Any] | None, skipped: tuple[dict[str, Any], ...]) -> str:
    """Why resume would load ``chosen`` (or nothing), in one sentence."""
    if chosen is None:
        return "no checkpoint verifies: resume would fail" if skipped else "no checkpoints: resume would start fresh"
    if chosen["checksum_verified"]:
        reason = f"checkpoint {chosen['id']} is the newest whose checksum matches the index and that loads safely"
    else:
        reason = f"checkpoint {chosen['id']} is the newest that loads safely (it is not in the index; resume adopts it)"
    if skipped:
        reason += f"; skipped {len(skipped)} newer one(s) that do not verify"
    return reason


# --------------------------------------------------------------------------- promote


@dataclass(frozen=True)
class PromoteReport:
    """What ``promote`` did: the run's new best model and whether its checkpoint was pinned."""

    run: str
    best: BestInfo
    pinned: bool

    ok: ClassVar[bool] = True  # a refusal raises instead

    def to_json(self) -> dict[str, Any]:
        """The ``promote --json`` document."""
        return {"run": self.run, "best": self.best.to_dict(), "pinned": self.pinned}


def promote(run_dir: Path, checkpoint_id: int, *, pin: bool = False) -> BestInfo:
    """Make checkpoint ``checkpoint_id`` the run's best model, holding the run lock.

    The checkpoint must verify (checksum + safe load, its packs included). ``best_model.pt``
    is replaced by a verified atomic copy, one commit with its record (``promoted_by_hand:
    true``); a format-2 copy references the checkpoint's packs, and the packs only the old
    best model referenced are deleted afterwards. With ``pin`` the checkpoint is also
    pinned in the index so retention keeps it. Raises
    RunLockedError while a trainer holds the run, NotFoundError for an unknown id.
    """
    with RunLock(run_dir):
        index = read_index(run_dir)
        entries = index.by_id()
        entry = entries.get(checkpoint_id)
        if entry is None:
            have = ", ".join(map(str, sorted(entries))) or "none"
            raise NotFoundError(f"{run_dir}: no checkpoint {checkpoint_id} in the index (it has {have})")
        try:
            path = resolve_inside(run_dir, entry.path)
        except UnsafePathError as exc:
            raise CheckpointIntegrityError(f"checkpoint {checkpoint_id}: {exc}") from None
        checks = PackChecks()
        verify_file(path, entry.checksum, checks=checks)
        check_record_objects(run_dir, entry, checks)  # the new best record lists them too
        try:
            old = read_best(run_dir)
        except (CorruptIndexError, UnsafePathError):
            old = None
        metric = old.metric if old and old.metric else None
        mode = old.mode if old else "max"
        info = replace_best(
            run_dir,
            lambda before: atomic_copy(path, run_dir / BEST_MODEL_FILE, expected_checksum=entry.checksum, before_replace=before),
            lambda size, checksum: BestInfo.of_checkpoint(entry, size, checksum, metric, mode, promoted_by_hand=True),
        )
        if pin and not entry.pinned:
            entries[checkpoint_id] = replace(entry, pinned=True)
            commit_index(run_dir, index.with_entries(list(entries.values())))
        collect_run_packs(run_dir)  # the old best model's packs, once its record is replaced durably
        return info
