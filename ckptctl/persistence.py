"""The persistence API a training loop calls: :class:`ModelPersistence` and :func:`setup_drive_backup`.

Saving is split in two: the training thread only takes a consistent CPU snapshot of
the state into reusable staging buffers; serialising, fsync, checksum, index update,
retention and the Drive copy happen on a background worker, one save at a time.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ckptctl.core.format import (
    BEST_METADATA_FILE,
    BEST_MODEL_FILE,
    CHECKPOINT_DIR,
    DEFAULT_MAX_CHECKPOINTS,
    TRAINING_LOG_FILE,
    TRAINING_STATE_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    checkpoint_relpath,
    utc_now_iso,
)
from ckptctl.core.manifest import BestInfo, BestRecord, CheckpointEntry, Index, check_extra, clean_metrics, salvage_extra
from ckptctl.core.resume import choose_resume_checkpoint
from ckptctl.core.retention import ids_to_delete, protected_ids
from ckptctl.errors import (
    BackgroundSaveError,
    CheckpointIntegrityError,
    CkptctlError,
    CorruptIndexError,
    DiskFullError,
    NoValidCheckpointError,
    RestoreStateError,
    UnsafePathError,
)
from ckptctl.storage import legacy
from ckptctl.storage.atomic import (
    atomic_copy,
    atomic_write_json,
    cleanup_temporaries,
    hash_file,
    matching_checksum,
    open_regular,
    remove_file,
    resolve_inside,
    verify_checksum,
)
from ckptctl.storage.lock import RunLock
from ckptctl.storage.mirror import (
    BackgroundMirror,
    SyncReport,
    apply_sync_report,
    check_mirror_apart,
    read_mirror_status,
    resolve_budget,
    write_mirror_status,
)
from ckptctl.storage.restore import RestoreReport, restore_run
from ckptctl.storage.runfiles import (
    commit_best,
    commit_index,
    commit_removal,
    delete_checkpoint_files,
    finish_pending_removal,
    finish_removal,
    replace_best,
    retention_items,
    set_aside,
)
from ckptctl.storage.scan import (
    checkpoint_files_on_disk,
    checkpoint_names_present,
    newest_run,
    read_best_record,
    read_index,
    read_training_state,
)
from ckptctl.torch_io import (
    Stager,
    check_device,
    apply_components,
    build_payload,
    component_states,
    available_memory_bytes,
    tensor_bytes,
    payload_metadata,
    restore_rng,
    safe_load,
    write_checkpoint_file,
)

log = logging.getLogger("ckptctl")

#: The open (not yet closed) ModelPersistence of each run in this process, by resolved
#: path: a re-run notebook cell's new object takes over from the one it replaces.
_OPEN_WRITERS: dict[str, "ModelPersistence"] = {}
_OPEN_WRITERS_LOCK = threading.Lock()

#: How long a writer that is taken over gives its Drive mirror to finish (a re-run cell
#: must not hang on a slow Drive; the new writer's mirror catches up).
TAKEOVER_MIRROR_TIMEOUT = 5.0

#: Saves the newest checkpoint may be ahead of Drive before the library warns (naming the cause).
MIRROR_LAG_WARN_SAVES = 2


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


def _take_over_earlier_writer(writer_key: str) -> None:
    """Close this process's earlier, unclosed ModelPersistence on the same run (a re-run cell), warning once."""
    with _OPEN_WRITERS_LOCK:
        earlier = _OPEN_WRITERS.pop(writer_key, None)
    if earlier is None or earlier._closed:
        return
    log.warning(
        "%s: an earlier ModelPersistence on this run is still open in this process (a re-run cell?); "
        "finishing its pending save and taking over from it",
        earlier.run_dir,
    )
    earlier._close_for_takeover()


@dataclass(frozen=True)
class _SaveRequest:
    checkpoint_id: int
    epoch: int
    batch: int
    global_step: int


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if mode == "max" else value < best


class ModelPersistence:
    """Crash-safe checkpoints of one run directory (``runs/<run_name>``).

    Example::

        p = ModelPersistence("runs/my_run", max_checkpoints=5, save_every_n_batches=50)
        info = p.resume(agent=model, optimizer=opt)          # None on a fresh run
        for epoch ...:
            for batch ...:
                ...
                p.maybe_save(epoch, batch, {"loss": loss}, agent=model, optimizer=opt)
        p.close()

    The run directory is locked while this object is open (one writer at a time).
    Components are any objects with ``state_dict()``/``load_state_dict()``, passed by name.

    ``staging``: ``"copy"`` snapshots into reusable CPU buffers (one CPU copy of the
    state) and writes in the background; ``"none"`` writes the live tensors before
    returning (no extra memory, the whole write stalls training); ``"auto"`` (default)
    copies unless the buffers would need more than half of the available memory.

    ``drive_backup``: a mounted Drive folder; the run is mirrored to ``<drive_backup>/<run
    name>`` in the background, newest checkpoint first, then the best model, then older
    ones as ``drive_max_size`` allows (bytes or a size string such as ``"14GB"``; default:
    the free space Drive reports at start plus what this run's mirror already uses, less
    a margin). Opening a run whose mirror holds newer checkpoints than the local folder
    (a fresh VM) restores them first, verified, so :meth:`resume` continues from the
    newest; nothing ever starts a fresh run over a mirror's checkpoints.

    A second ModelPersistence on the same run in the same process (a re-run notebook
    cell) takes over from an unclosed earlier one: that one's pending save finishes, its
    threads stop, later calls on it raise. Another live process holding the run is
    refused with :class:`RunLockedError` naming its pid and host.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        max_checkpoints: int = DEFAULT_MAX_CHECKPOINTS,
        save_every_n_batches: int = 50,
        best_metric: str = "accuracy_delta",
        best_mode: str = "max",
        drive_backup: str | os.PathLike | None = None,
        *,
        save_every_seconds: float | None = None,
        background: bool = True,
        staging: str = "auto",
        mirror_backoff: tuple[float, float] = (1.0, 300.0),
        drive_max_size: int | str | None = None,
    ):
        if int(max_checkpoints) < 1:
            raise ValueError(f"max_checkpoints must be at least 1, got {max_checkpoints}")
        if int(save_every_n_batches) < 1:
            raise ValueError(f"save_every_n_batches must be at least 1, got {save_every_n_batches}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if staging not in ("auto", "copy", "none"):
            raise ValueError(f"staging must be 'auto', 'copy' or 'none', got {staging!r}")
        if save_every_seconds is not None and save_every_seconds <= 0:
            raise ValueError(f"save_every_seconds must be positive, got {save_every_seconds}")
        self.run_dir = Path(run_dir)
        self.run_name = self.run_dir.resolve().name
        self.max_checkpoints = int(max_checkpoints)
        self.save_every_n_batches = int(save_every_n_batches)
        self.save_every_seconds = save_every_seconds
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.background = background
        self.staging = staging
        self.last_resume_skipped: list[dict[str, Any]] = []

        (self.run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        self._writer_key = str(self.run_dir.resolve())
        self._closed_because = "it is closed"
        _take_over_earlier_writer(self._writer_key)
        self._lock = RunLock(self.run_dir).acquire()
        self._index_lock = threading.RLock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptctl-save")
        self._futures: list[Future] = []
        self._staging_future: Future | None = None
        self._bg_error: BaseException | None = None
        self._stager = Stager()
        self._last_save: _SaveRequest | None = None
        self._last_save_time = time.monotonic()
        self._mirror: BackgroundMirror | None = None
        self._closed = False
        self._drop_mirror_reports = False
        self._newest_on_drive: int | None = None
        self._mirror_problem: tuple[str, str] | None = None  # (what kind, message) of the last mirror trouble
        self._lag_warned_for: str | None = None
        #: The Drive mirror's byte budget (None without ``drive_backup``).
        self.drive_budget: int | None = None
        #: What opening restored from the Drive mirror (a fresh VM), or None.
        self.last_restore: RestoreReport | None = None
        try:
            cleanup_temporaries(self.run_dir)
            cleanup_temporaries(self.run_dir / CHECKPOINT_DIR)
            drive_root = setup_drive_backup(drive_backup) if drive_backup is not None else None  # fails fast if Drive is not mounted
            if drive_root is not None:
                check_mirror_apart(self.run_dir, drive_root / self.run_name)
                self.last_restore = restore_if_mirror_ahead(self.run_dir, drive_root / self.run_name, lock_held=True)
            self._index = self._load_or_rebuild_index()
            self._best = self._load_or_repair_best()
            self._best_value = self._best.metrics.get(best_metric) if self._best else None
            self._next_id = self._index.next_id
            latest = self._index.latest
            self._global_step = latest.global_step if latest else 0
            self._training_state = self._load_training_state()
            if drive_root is not None:
                budget = self._drive_budget(drive_max_size, drive_root / self.run_name)
                self._newest_on_drive = self._newest_known_on_drive()
                self._mirror = BackgroundMirror(
                    self.run_dir,
                    drive_root / self.run_name,
                    on_synced=self._apply_sync_report,
                    on_failed=self._record_mirror_failure,
                    max_bytes=budget,
                    initial_backoff=mirror_backoff[0],
                    max_backoff=mirror_backoff[1],
                )
                self._request_mirror()
        except BaseException:
            self._executor.shutdown(wait=False)
            self._lock.release()
            raise
        with _OPEN_WRITERS_LOCK:
            _OPEN_WRITERS[self._writer_key] = self

    # ------------------------------------------------------------------ opening

    def _newest_known_on_drive(self) -> int | None:
        """The newest checkpoint known to be verified on Drive: the last sync's status, or the index's ``mirrored`` records.

        A run just restored from Drive has no status file yet, but every restored entry is
        recorded as mirrored; without this, its first save would look many saves behind.
        """
        status = read_mirror_status(self.run_dir) or {}
        known = [status["newest_verified_id"]] if isinstance(status.get("newest_verified_id"), int) else []
        known += [e.id for e in self._index.checkpoints if e.mirrored]
        return max(known, default=None)

    def _drive_budget(self, drive_max_size: int | str | None, mirror_run: Path) -> int:
        """The mirror's byte budget (see ``drive_max_size``), logged once."""
        try:
            budget = resolve_budget(drive_max_size, mirror_run)
        except ValueError as exc:
            raise CkptctlError(str(exc)) from None
        how = "as given" if drive_max_size is not None else "free space on Drive plus this run's mirror, less a margin"
        log.info("%s: Drive mirror budget %d bytes (%s)", self.run_dir, budget, how)
        self.drive_budget = budget
        return budget

    def _load_or_rebuild_index(self) -> Index:
        """Read the index; set a corrupt one aside; adopt committed checkpoint files it lacks.

        An index other code wrote (the Colab guide's ``{"0": {...}}``) is not corrupt: its
        bytes are kept as ``checkpoint_metadata.json.legacy`` before the new index replaces
        it, and its entries describe the files adopted (see :mod:`ckptctl.storage.legacy`).
        """
        guide = None
        try:
            index = read_index(self.run_dir)
        except FileNotFoundError:
            index = Index(run_name=self.run_name, next_id=0)
        except CorruptIndexError as exc:
            guide = legacy.read_guide_index(self.run_dir)  # written by other code: kept, not set aside
            if guide is None:
                set_aside(self.run_dir / "checkpoint_metadata.json", f"unreadable ({exc}); rebuilding from checkpoint files")
            else:
                kept = legacy.keep_legacy_copy(self.run_dir / INDEX_FILE)
                log.warning("%s: %s was written by other code; kept as %s, rebuilding the index from the checkpoint files", self.run_dir, INDEX_FILE, kept and kept.name)
            index = Index(run_name=self.run_name, next_id=0)
        for raw_id, reason in index.skipped:
            log.warning("%s: ignoring index entry %r: %s", self.run_dir, raw_id, reason)
        index, finished = finish_pending_removal(self.run_dir, index)  # tombstoned files: deleted, never adopted
        if finished:
            log.warning("%s: finished deleting %d checkpoint file(s) an interrupted removal left", self.run_dir, len(finished))
        on_disk = checkpoint_files_on_disk(self.run_dir)
        known = index.by_id()
        adopted = []
        for checkpoint_id in sorted(set(on_disk) - set(known)):
            try:
                adopted.append(self._entry_from_file(checkpoint_id, on_disk[checkpoint_id], guide))
            except (CheckpointIntegrityError, CorruptIndexError) as exc:
                log.warning("%s: ignoring checkpoint file that does not load: %s", self.run_dir, exc)
        adopted = legacy.assign_global_steps(adopted, read_training_state(self.run_dir))  # files other code wrote
        index = index.with_entries(list(known.values()) + adopted)
        ids_taken = checkpoint_names_present(self.run_dir)
        if ids_taken:  # never reuse an id that has a file (even unreadable, even a symlink)
            index = dataclasses.replace(index, next_id=max(index.next_id, max(ids_taken) + 1))
        if adopted or index.skipped:
            commit_index(self.run_dir, index)
            log.warning("%s: adopted %d checkpoint file(s) missing from the index", self.run_dir, len(adopted))
        return index

    def _entry_from_file(
        self, checkpoint_id: int, path: Path, guide: Mapping[int, legacy.LegacyEntry] | None = None
    ) -> CheckpointEntry:
        size, checksum = hash_file(path)
        payload = safe_load(path, "cpu", mmap=True)
        if legacy.is_foreign_payload(payload):  # written by other code; global_step assigned by the caller
            entry = legacy.entry_from_payload(
                checkpoint_id, checkpoint_relpath(checkpoint_id), payload, (guide or {}).get(checkpoint_id), size, checksum, utc_now_iso()
            )
            if entry is None:
                raise CorruptIndexError(f"{path.name}: not a ckptctl checkpoint (no epoch/batch in it or in the index)")
            return entry
        try:
            return CheckpointEntry(
                id=checkpoint_id,
                path=checkpoint_relpath(checkpoint_id),
                epoch=int(payload["epoch"]),
                batch=int(payload["batch"]),
                global_step=int(payload["global_step"]),
                metrics=clean_metrics(payload.get("metrics")),
                timestamp=str(payload.get("timestamp") or utc_now_iso()),
                size_bytes=size,
                checksum=checksum,
                extra=self._salvaged_extra(path, payload.get("extra")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptIndexError(f"{path.name}: not a ckptctl checkpoint ({exc})") from None

    def _salvaged_extra(self, path: Path, extra: Any) -> dict[str, Any]:
        """A checkpoint file's ``extra`` made JSON-safe for the index (files from before it was checked on save)."""
        cleaned, problems = salvage_extra(extra)
        for problem in problems:
            log.warning("%s: %s; stored as null in the index", path.name, problem)
        return cleaned

    def _load_training_state(self) -> dict[str, Any]:
        """training_state.json as a dict; an unreadable one is set aside (the next update rewrites it)."""
        path = self.run_dir / TRAINING_STATE_FILE
        state = read_training_state(self.run_dir)
        if state is None and (path.exists() or path.is_symlink()):
            set_aside(path, "unreadable; the next update writes a fresh one")
        elif legacy.is_foreign_training_state(state):  # other code wrote it: keep its bytes before an update replaces it
            legacy.keep_legacy_copy(path)
        return state or {}

    def _best_record_matching(self, record: BestRecord | None) -> BestInfo | None:
        """The record of ``record`` that best_model.pt's bytes match, or None."""
        if record is None:
            return None
        try:
            return record.describing(matching_checksum(self.run_dir / BEST_MODEL_FILE, record.checksums()))
        except CheckpointIntegrityError:
            return None

    def _load_or_repair_best(self) -> BestInfo | None:
        """The record of best_model.pt: a replace a crash cut short is settled; metadata that does not match the file is rebuilt from it."""
        best_path = self.run_dir / BEST_MODEL_FILE
        try:
            record = read_best_record(self.run_dir)
        except (CorruptIndexError, UnsafePathError) as exc:
            if legacy.read_guide_best(self.run_dir) is None:
                set_aside(self.run_dir / BEST_METADATA_FILE, f"unusable ({exc}); rebuilding it from best_model.pt")
            else:  # written by other code: its bytes are kept, then it is rebuilt from best_model.pt
                legacy.keep_legacy_copy(self.run_dir / BEST_METADATA_FILE)
            record = None
        best = record.current if record is not None else None
        if not best_path.is_file():
            if record is not None and record.pending is not None and best is None:
                remove_file(self.run_dir / BEST_METADATA_FILE)  # the first best model's write never reached its rename
            return None if best is None or best.path == BEST_MODEL_FILE else best
        matched = self._best_record_matching(record)
        if matched is not None:
            if record.pending is not None:  # a replace a crash cut short: the file says which side of the rename
                commit_best(self.run_dir, matched)
            return matched
        size, checksum = hash_file(best_path)
        try:
            payload = safe_load(best_path, "cpu", mmap=True)
        except CheckpointIntegrityError as exc:
            log.warning("%s: best_model.pt does not load (%s); it will be replaced by the next best", self.run_dir, exc)
            return None
        metrics = clean_metrics(payload.get("metrics"))
        repaired = BestInfo.of_model(
            source_id=payload.get("checkpoint_id") if isinstance(payload.get("checkpoint_id"), int) else None,
            epoch=int(payload.get("epoch", 0)),
            batch=int(payload.get("batch", 0)),
            global_step=int(payload.get("global_step", legacy.global_step_at(self._index, payload.get("epoch"), payload.get("batch")) or 0)),
            metrics=metrics,
            timestamp=legacy.utc_timestamp(payload.get("timestamp")) or utc_now_iso(),
            size_bytes=size,
            checksum=checksum,
            metric=self.best_metric,
            mode=self.best_mode,
        )
        commit_best(self.run_dir, repaired)
        return repaired

    # ------------------------------------------------------------------ background work

    def _run_job(self, job: Callable[..., None], *args: Any) -> None:
        try:
            job(*args)
        except BaseException as exc:
            self._bg_error = exc
            log.error("background checkpoint work failed: %s: %s", exc.__class__.__name__, exc)
            raise

    def _submit(self, job: Callable[..., None], *args: Any) -> Future:
        future = self._executor.submit(self._run_job, job, *args)
        self._futures = [f for f in self._futures if not f.done()] + [future]
        if not self.background:
            try:
                future.result()
            finally:
                self._bg_error = None
        return future

    def _raise_background_error(self) -> None:
        error, self._bg_error = self._bg_error, None
        if error is not None:
            raise BackgroundSaveError(f"a background save failed: {error.__class__.__name__}: {error}") from error

    def _wait_for_staging_buffers(self) -> None:
        """The staging buffers are reused: wait until the previous payload is written."""
        if self._staging_future is not None:
            try:
                self._staging_future.result()
            except BaseException:
                pass  # reported through _raise_background_error
            self._staging_future = None

    def _check_open(self) -> None:
        if self._closed:
            raise CkptctlError(f"{self.run_dir}: this ModelPersistence cannot be used: {self._closed_because}")

    # ------------------------------------------------------------------ saving

    def maybe_save(
        self,
        epoch: int,
        batch: int,
        metrics: Mapping[str, Any] | None = None,
        *,
        global_step: int | None = None,
        extra: Mapping[str, Any] | None = None,
        **components: Any,
    ) -> int | None:
        """Call once after every completed batch; saves a checkpoint when one is due.

        Rule: the global step is ``global_step`` if given, else the library's counter plus
        one (the counter starts at the resumed checkpoint's ``global_step``, or 0). A save is
        due when ``global_step % save_every_n_batches == 0``, or when ``save_every_seconds``
        have passed since the last save. Returns the new checkpoint id, or None.
        """
        self._check_open()
        self._raise_background_error()
        extra = check_extra(extra)  # fails at the first call with bad extra, not at the first due save
        self._global_step = int(global_step) if global_step is not None else self._global_step + 1
        due = self._global_step % self.save_every_n_batches == 0
        if not due and self.save_every_seconds is not None:
            due = time.monotonic() - self._last_save_time >= self.save_every_seconds
        if not due:
            return None
        return self.save_checkpoint(epoch, batch, metrics, global_step=self._global_step, extra=extra, **components)

    def save_checkpoint(
        self,
        epoch: int,
        batch: int,
        metrics: Mapping[str, Any] | None = None,
        *,
        global_step: int | None = None,
        extra: Mapping[str, Any] | None = None,
        **components: Any,
    ) -> int:
        """Save a checkpoint now and return its id.

        ``batch`` is the 0-based index of the last batch the state includes. Blocks only for
        the in-memory snapshot (and for the previous save, if it is still being written);
        the file is written in the background unless ``background=False``.
        """
        self._check_open()
        self._raise_background_error()
        if not components:
            raise ValueError("save_checkpoint needs at least one component, e.g. agent=model")
        # Everything that goes into the file and the index is checked before anything is written.
        metrics = clean_metrics(metrics)
        extra = check_extra(extra)
        if global_step is not None:
            self._global_step = int(global_step)
        states = component_states(components)
        self._wait_for_staging_buffers()
        self._raise_background_error()
        checkpoint_id = self._next_id
        self._next_id += 1
        request = _SaveRequest(checkpoint_id, int(epoch), int(batch), self._global_step)
        self._last_save = request
        self._last_save_time = time.monotonic()
        self._snapshot_and_submit(self._write_checkpoint_job, request, checkpoint_id, metrics, states, extra)
        self._warn_if_mirror_lags(checkpoint_id)
        return checkpoint_id

    def _should_stage(self, states: Mapping[str, Any]) -> bool:
        """Copy into staging buffers unless told not to, or (``auto``) the copy would not fit in memory."""
        if self.staging != "auto":
            return self.staging == "copy"
        needed = tensor_bytes(states) - self._stager.staged_bytes
        available = available_memory_bytes()
        return needed <= 0 or available is None or needed <= available // 2

    def _snapshot_and_submit(
        self,
        job: Callable[..., None],
        request: _SaveRequest,
        checkpoint_id: int | None,
        metrics: dict[str, float],
        states: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Snapshot ``states`` with RNG and queue ``job(request, payload)``.

        Staged (copied into the reusable buffers), the call returns at once. Without
        staging (``staging="none"``, or a state too large to copy), the live tensors are
        written before this returns, so training cannot change them mid-write.
        """
        stager = self._stager if self._should_stage(states) else Stager(copy=False)
        payload = build_payload(
            stager,
            checkpoint_id=checkpoint_id,
            epoch=request.epoch,
            batch=request.batch,
            global_step=request.global_step,
            metrics=metrics,
            timestamp=utc_now_iso(),
            states=states,
            extra=extra,
        )
        future = self._submit(job, request, payload)
        if stager.copy:
            self._staging_future = future
            return
        try:
            future.result()
        except BaseException:
            pass
        self._raise_background_error()

    def _write_checkpoint_job(self, request: _SaveRequest, payload: dict[str, Any]) -> None:
        relpath = checkpoint_relpath(request.checkpoint_id)
        size, checksum = self._write_making_room(relpath, payload)
        entry = CheckpointEntry(
            id=request.checkpoint_id,
            path=relpath,
            epoch=request.epoch,
            batch=request.batch,
            global_step=request.global_step,
            metrics=dict(payload["metrics"]),
            timestamp=payload["timestamp"],
            size_bytes=size,
            checksum=checksum,
            extra=dict(payload["extra"]),
        )
        with self._index_lock:
            grown = self._index.with_entries(list(self._index.checkpoints) + [entry])
            victims = set(
                ids_to_delete(
                    retention_items(grown.checkpoints),
                    keep_last=self.max_checkpoints,
                    best_source_id=self._best.source_id if self._best else None,
                    newest_good_id=entry.id,
                )
            )
            kept = self._retire(grown.with_entries([e for e in grown.checkpoints if e.id not in victims]), grown.checkpoints, victims)
            # the new file is durable; now the index (the victims as tombstones until their files are gone)
            self._index = commit_removal(self.run_dir, kept, [e for e in grown.checkpoints if e.id in victims])
        self._remove_files([e for e in grown.checkpoints if e.id in victims])
        self._request_mirror()

    def _remove_files(self, victims: list[CheckpointEntry]) -> None:
        """Delete the files of ``victims`` (committed as tombstones), then clear their tombstones."""
        if not victims:
            return
        delete_checkpoint_files(self.run_dir, victims)
        with self._index_lock:
            self._index = finish_removal(self.run_dir, self._index, [v.id for v in victims])

    def _retire(self, index: Index, removed_from: Any, ids: set[int]) -> Index:
        """Record in ``index`` which of the removed checkpoints the Drive mirror may now delete too.

        With a mirror, every removed id (it may hold a copy whose report is not applied
        yet); without one, those recorded as mirrored by an earlier session.
        """
        retired = [e.id for e in removed_from if e.id in ids and (self._mirror is not None or e.mirrored)]
        return index.retire(retired) if retired else index

    def _write_making_room(self, relpath: str, payload: dict[str, Any]) -> tuple[int, str]:
        """Write a checkpoint file; on a full disk free the oldest unprotected checkpoint and retry.

        The newest checkpoint, the best model's source and pinned ones are never freed, so
        the run stays resumable; when nothing else is left, :class:`DiskFullError` says so.
        """
        while True:
            try:
                return write_checkpoint_file(self.run_dir / relpath, payload)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                victim = self._oldest_unprotected()
                if victim is None:
                    raise DiskFullError(
                        f"{self.run_dir}: disk full writing {relpath} ({exc.strerror}); nothing left to free "
                        "(the newest checkpoint, the best model's source and pinned ones are kept)"
                    ) from None
                log.warning("%s: disk full writing %s; freeing checkpoint %d early", self.run_dir, relpath, victim.id)
                self._drop_entries([victim])

    def _oldest_unprotected(self) -> CheckpointEntry | None:
        with self._index_lock:
            entries = self._index.checkpoints
            keep = protected_ids(
                retention_items(entries), best_source_id=self._best.source_id if self._best else None
            )
            return next((e for e in entries if e.id not in keep), None)

    def _drop_entries(self, victims: list[CheckpointEntry]) -> None:
        """Remove ``victims`` from the index, then delete their files (files first if the index cannot be written)."""
        gone = {v.id for v in victims}
        with self._index_lock:
            smaller = self._retire(
                self._index.with_entries([e for e in self._index.checkpoints if e.id not in gone]), victims, gone
            )
            try:
                smaller = commit_removal(self.run_dir, smaller, victims)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                delete_checkpoint_files(self.run_dir, victims)  # old, not the newest: resume is unaffected
                commit_index(self.run_dir, smaller)
            self._index = smaller
        self._remove_files(victims)

    def update_best(
        self,
        epoch: int,
        batch: int,
        metrics: Mapping[str, Any],
        *,
        global_step: int | None = None,
        **components: Any,
    ) -> bool:
        """Make this state the best model if ``metrics[best_metric]`` beats the best so far.

        Returns True when it became best. If a checkpoint was just saved for the same
        step, ``best_model.pt`` is a verified copy of that file (its source); otherwise the
        state is snapshotted and written like a checkpoint. NaN never becomes best.
        """
        self._check_open()
        self._raise_background_error()
        metrics = clean_metrics(metrics)
        if self.best_metric not in metrics:
            raise KeyError(f"metrics has no {self.best_metric!r} (the best_metric); got {sorted(metrics)}")
        value = metrics[self.best_metric]
        if not _is_better(value, self._best_value, self.best_mode):
            return False
        step = int(global_step) if global_step is not None else self._global_step
        last = self._last_save
        if last is not None and (last.global_step, last.epoch, last.batch) == (step, int(epoch), int(batch)):
            self._submit(self._best_from_checkpoint_job, last, metrics)
        else:
            if not components:
                raise ValueError("update_best needs the components to save, e.g. agent=model")
            states = component_states(components)
            self._wait_for_staging_buffers()
            request = _SaveRequest(-1, int(epoch), int(batch), step)
            self._snapshot_and_submit(self._best_from_payload_job, request, None, metrics, states)
        self._best_value = value
        return True

    def _best_from_checkpoint_job(self, request: _SaveRequest, metrics: dict[str, float]) -> None:
        entry = self._index.by_id().get(request.checkpoint_id)
        if entry is None:
            raise CkptctlError(f"checkpoint {request.checkpoint_id} was not saved; cannot copy it to best_model.pt")
        src = resolve_inside(self.run_dir, entry.path)
        # The metrics update_best was given are what made this the best (the checkpoint's own
        # may not even hold the best metric); they win over the checkpoint's where both have a name.
        judged = dataclasses.replace(entry, metrics={**entry.metrics, **metrics})
        self._best = replace_best(
            self.run_dir,
            lambda before: atomic_copy(src, self.run_dir / BEST_MODEL_FILE, expected_checksum=entry.checksum, before_replace=before),
            lambda size, checksum: BestInfo.of_checkpoint(judged, size, checksum, self.best_metric, self.best_mode),
        )
        self._request_mirror()

    def _best_from_payload_job(self, request: _SaveRequest, payload: dict[str, Any]) -> None:
        def describe(size: int, checksum: str) -> BestInfo:
            return BestInfo.of_model(
                source_id=None,
                epoch=payload["epoch"],
                batch=payload["batch"],
                global_step=payload["global_step"],
                metrics=payload["metrics"],
                timestamp=payload["timestamp"],
                size_bytes=size,
                checksum=checksum,
                metric=self.best_metric,
                mode=self.best_mode,
            )

        self._best = replace_best(
            self.run_dir, lambda before: write_checkpoint_file(self.run_dir / BEST_MODEL_FILE, payload, before_replace=before), describe
        )
        self._request_mirror()

    def _apply_sync_report(self, report: SyncReport) -> None:
        """Record in the local run what a mirror sync verified: index entries and ``mirror_status.json``."""
        with self._index_lock:
            if self._drop_mirror_reports:
                return  # closed: a newer writer may own the run's index now; the next open reads the mirror
            updated = apply_sync_report(self._index, report)
            if updated != self._index:
                commit_index(self.run_dir, updated)
                self._index = updated
            self._newest_on_drive = report.newest_verified_id
            self._mirror_problem = ("too big", report.too_big) if report.too_big else None
            write_mirror_status(self.run_dir, report, mirror_run=self._mirror.mirror_run)

    def _record_mirror_failure(self, error: str) -> None:
        """Record a failed mirror attempt's cause in ``mirror_status.json`` (the numbers stay as they were)."""
        with self._index_lock:
            if self._drop_mirror_reports:
                return
            self._mirror_problem = (error.split(":", 1)[0], error)  # keyed by the error type, not its text
            write_mirror_status(self.run_dir, None, error=error, mirror_run=self._mirror.mirror_run)

    def _warn_if_mirror_lags(self, newest_id: int) -> None:
        """Warn (once per cause) when the newest checkpoint has not reached Drive for more than 2 saves."""
        if self._mirror is None:
            return
        behind = newest_id - (self._newest_on_drive if self._newest_on_drive is not None else -1)
        if behind <= MIRROR_LAG_WARN_SAVES:
            self._lag_warned_for = None
            return
        key, cause = self._mirror_problem or ("slow", "Drive copies are slower than the saves")
        if key != self._lag_warned_for:
            self._lag_warned_for = key
            newest = "none yet" if self._newest_on_drive is None else f"#{self._newest_on_drive}"
            log.warning(
                "%s: the Drive mirror is %d saves behind (newest verified on Drive: %s): %s",
                self.run_dir, behind, newest, cause,
            )

    def pin(self, checkpoint_id: int, pinned: bool = True) -> None:
        """Keep checkpoint ``checkpoint_id`` out of retention (or release it with ``pinned=False``)."""
        self._check_open()
        self.flush()
        with self._index_lock:
            by_id = self._index.by_id()
            if checkpoint_id not in by_id:
                raise CkptctlError(f"{self.run_dir}: no checkpoint {checkpoint_id}")
            by_id[checkpoint_id] = CheckpointEntry(**{**by_id[checkpoint_id].__dict__, "pinned": pinned})
            updated = self._index.with_entries(list(by_id.values()))
            commit_index(self.run_dir, updated)
            self._index = updated

    # ------------------------------------------------------------------ training state and log

    def update_training_state(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` (JSON values, e.g. ``status="running"``, ``config={...}``) into training_state.json."""
        self._check_open()
        state = {**self._training_state, **fields, "format_version": FORMAT_VERSION, "updated_at": utc_now_iso()}
        atomic_write_json(self.run_dir / TRAINING_STATE_FILE, state)
        self._training_state = state
        self._request_mirror()  # so the mirror's copy ends with the final status too
        return dict(state)

    def _request_mirror(self) -> None:
        """Ask the Drive mirror for a sync, once the run has an index to mirror (a fresh run has none yet)."""
        if self._mirror is not None and (self.run_dir / INDEX_FILE).is_file():
            self._mirror.request()

    @property
    def training_state(self) -> dict[str, Any]:
        """The last training_state.json written or read."""
        return dict(self._training_state)

    def append_log(self, line: str) -> None:
        """Append one line to training.log (flushed, not fsynced).

        Only to a regular file: a FIFO, a device, a socket, a directory or a symlink at that
        name raises :class:`NotRegularFileError` at once (the open never blocks).
        """
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        fd = open_regular(self.run_dir / TRAINING_LOG_FILE, flags, 0o644, follow_symlinks=False)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")

    # ------------------------------------------------------------------ reading and resuming

    @property
    def checkpoints(self) -> dict[int, dict[str, Any]]:
        """Committed checkpoints: ``{id: metadata}`` in id order (pending saves appear once written)."""
        with self._index_lock:
            return {e.id: e.to_dict() for e in self._index.checkpoints}

    @property
    def best(self) -> dict[str, Any] | None:
        """``best_metadata.json`` as a dict, or None before any best model."""
        return self._best.to_dict() if self._best else None

    @property
    def global_step(self) -> int:
        """Batches completed since the start of the run, as the library counts them."""
        return self._global_step

    def flush(self) -> None:
        """Wait for all pending background saves; raise :class:`BackgroundSaveError` if one failed."""
        for future in list(self._futures):
            try:
                future.result()
            except BaseException:
                pass
        self._futures = []
        self._staging_future = None
        self._raise_background_error()

    def _verified_payload(self, entry: CheckpointEntry, device: Any) -> dict[str, Any]:
        try:
            path = resolve_inside(self.run_dir, entry.path)
        except UnsafePathError as exc:
            raise CheckpointIntegrityError(str(exc)) from None
        verify_checksum(path, entry.checksum)
        return safe_load(path, device)

    def _apply(self, payload: Mapping[str, Any], components: Mapping[str, Any], with_rng: bool) -> dict[str, Any]:
        apply_components(payload, components)
        meta = payload_metadata(payload)
        if meta["global_step"] is None:  # written by other code: the step the index gave its position
            meta["global_step"] = legacy.global_step_at(self._index, meta["epoch"], meta["batch"])
        if with_rng:
            if "rng" not in payload:  # other code did not save RNG states: go on without them, say so once
                if not getattr(self, "_warned_no_rng", False):
                    self._warned_no_rng = True
                    log.warning("%s: RNG states were not saved by this checkpoint; continuing without restoring them", self.run_dir)
            elif not isinstance(payload.get("rng"), Mapping):
                raise RestoreStateError("checkpoint has no RNG state to restore")
            else:
                restore_rng(payload["rng"])
            if meta["global_step"] is not None:
                self._global_step = int(meta["global_step"])
        return meta

    def get_resume_info(self) -> dict[str, Any] | None:
        """What :meth:`resume` would load: the newest checkpoint whose checksum matches.

        Returns ``{"checkpoint_id", "epoch", "batch", "global_step", "metrics", "skipped"}``,
        or None when the run has no checkpoints. Raises :class:`NoValidCheckpointError`
        when checkpoints exist but none verifies.
        """
        self._check_open()
        self.flush()
        entries = self._index.by_id()
        choice = choose_resume_checkpoint(
            entries, lambda i: verify_checksum(resolve_inside(self.run_dir, entries[i].path), entries[i].checksum)
        )
        skipped = [{"checkpoint_id": i, "reason": str(exc)} for i, exc in choice.skipped]
        if choice.chosen_id is None:
            if skipped:
                raise NoValidCheckpointError(self._none_verified_message(skipped))
            return None
        entry = entries[choice.chosen_id]
        return {
            "checkpoint_id": entry.id,
            "epoch": entry.epoch,
            "batch": entry.batch,
            "global_step": entry.global_step,
            "metrics": dict(entry.metrics),
            "skipped": skipped,
        }

    def _none_verified_message(self, skipped: list[dict[str, Any]]) -> str:
        reasons = "; ".join(s["reason"] for s in skipped[:3])
        return f"{self.run_dir}: none of the {len(skipped)} checkpoint(s) verifies ({reasons})"

    def load_checkpoint(self, checkpoint_id: int, device: Any = "cpu", *, restore_rng: bool = True, **components: Any) -> dict[str, Any]:
        """Load checkpoint ``checkpoint_id`` into ``components`` (and restore RNG states); return its metadata.

        The file is checked against the index checksum and loaded with ``weights_only=True``.
        """
        self._check_open()
        check_device(device)
        self.flush()
        entry = self._index.by_id().get(int(checkpoint_id))
        if entry is None:
            raise CkptctlError(f"{self.run_dir}: no checkpoint {checkpoint_id}")
        meta = self._apply(self._verified_payload(entry, device), components, restore_rng)
        self._last_save = None
        return meta

    def resume(self, device: Any = "cpu", **components: Any) -> dict[str, Any] | None:
        """Load the newest checkpoint that verifies into ``components`` and restore RNG; return its metadata.

        Corrupt, truncated or missing newer checkpoints are skipped, logged, and listed under
        ``"skipped"`` in the result. Returns None when the run has no checkpoints; raises
        :class:`NoValidCheckpointError` when it has some but none verifies; raises
        :class:`DeviceUnavailableError` before touching any file when ``device`` is not
        usable here (``"cuda"`` on a machine without CUDA).
        """
        self._check_open()
        check_device(device)
        self.flush()
        entries = self._index.by_id()
        choice = choose_resume_checkpoint(entries, lambda i: self._verified_payload(entries[i], device))
        skipped = []
        for checkpoint_id, exc in choice.skipped:
            log.warning("%s: skipping checkpoint %d for resume: %s", self.run_dir, checkpoint_id, exc)
            skipped.append({"checkpoint_id": checkpoint_id, "reason": str(exc), "status": getattr(exc, "status", "corrupt")})
        self.last_resume_skipped = skipped
        if choice.chosen_id is None:
            if skipped:
                raise NoValidCheckpointError(self._none_verified_message(skipped))
            return None
        meta = self._apply(choice.result, components, True)
        meta["checkpoint_id"] = choice.chosen_id
        meta["skipped"] = skipped
        self._last_save = None
        return meta

    def load_best_model(self, device: Any = "cpu", **components: Any) -> dict[str, Any]:
        """Load ``best_model.pt`` into ``components`` (no RNG restore); return its metadata."""
        self._check_open()
        check_device(device)
        self.flush()
        if self._best is None:
            raise CkptctlError(f"{self.run_dir}: no best model yet")
        path = resolve_inside(self.run_dir, self._best.path)
        verify_checksum(path, self._best.checksum)
        return self._apply(safe_load(path, device), components, False)

    # ------------------------------------------------------------------ closing

    def close(self, mirror_timeout: float | None = 60.0) -> None:
        """Flush pending saves, give the Drive mirror up to ``mirror_timeout`` s to catch up, release the lock.

        Raises :class:`BackgroundSaveError` (after releasing everything) if a save failed.
        """
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)
            if self._mirror is not None and not self._mirror.stop(timeout=mirror_timeout):
                log.warning("Drive mirror not fully synced at close: %s", self._mirror.last_error)
            with self._index_lock:
                # A mirror thread still busy (Drive slow) must never write this closed
                # object's stale index over a newer writer's: its reports are dropped from
                # now on, and the next open reads the mirror's real state.
                self._drop_mirror_reports = True
            self._lock.release()
            with _OPEN_WRITERS_LOCK:
                if _OPEN_WRITERS.get(self._writer_key) is self:
                    del _OPEN_WRITERS[self._writer_key]

    def _close_for_takeover(self) -> None:
        """Closed by a newer ModelPersistence on the same run in this process: finish, stop, step aside."""
        self._closed_because = "a newer ModelPersistence on the same run took over from it"
        try:
            self.close(mirror_timeout=TAKEOVER_MIRROR_TIMEOUT)
        except BackgroundSaveError as exc:
            log.warning("%s: the earlier writer's last save failed: %s", self.run_dir, exc)

    def __enter__(self) -> "ModelPersistence":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------- finding and restoring runs


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
    from ckptctl.storage.restore import restore_run

    mirror = Path(drive_root) / run_name
    try:
        read_index(mirror)
    except (FileNotFoundError, NotADirectoryError):
        raise CkptctlError(f"{mirror}: no mirrored run there (no checkpoint_metadata.json)") from None
    except CorruptIndexError as exc:
        raise CkptctlError(f"{mirror}: mirror index unreadable ({exc})") from None
    report = restore_run(mirror, Path(output_dir) / run_name)
    return {"path": report.dest, "copied": report.copied, "skipped": report.skipped}

