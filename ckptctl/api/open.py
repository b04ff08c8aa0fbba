"""Opening a run: leftover temporaries, takeover of an earlier writer, the index rebuilt, files adopted, the best model repaired.

Everything here runs once, under the run lock, before the first save; each function
returns what it read or repaired and commits what it had to fix.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any, Mapping, Protocol

from ckptctl.core.format import (
    BEST_METADATA_FILE,
    BEST_MODEL_FILE,
    CHECKPOINT_DIR,
    INDEX_FILE,
    TRAINING_STATE_FILE,
    checkpoint_relpath,
    utc_now_iso,
)
from ckptctl.core.manifest import BestInfo, BestRecord, CheckpointEntry, Index, clean_metrics, salvage_extra
from ckptctl.errors import CheckpointIntegrityError, CorruptIndexError, UnsafePathError
from ckptctl.storage import legacy
from ckptctl.storage.atomic import cleanup_temporaries, hash_file, matching_checksum, read_failure, remove_file
from ckptctl.storage.runfiles import commit_best, commit_index, finish_pending_removal, set_aside
from ckptctl.storage.scan import (
    checkpoint_files_on_disk,
    checkpoint_names_present,
    read_best_record,
    read_index,
    read_training_state,
)
from ckptctl.packs_io import objects_of
from ckptctl.storage.objects import objects_dir
from ckptctl.torch_io import load_skeleton

log = logging.getLogger("ckptctl")


# ---------------------------------------------------------------------- one writer per run in this process


class Writer(Protocol):
    """What the takeover needs of an open ModelPersistence."""

    run_dir: Path
    _closed: bool

    def _close_for_takeover(self) -> None: ...


#: The open (not yet closed) ModelPersistence of each run in this process, by resolved
#: path: a re-run notebook cell's new object takes over from the one it replaces.
_OPEN_WRITERS: dict[str, Writer] = {}
_OPEN_WRITERS_LOCK = threading.Lock()


def take_over_earlier_writer(writer_key: str) -> None:
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


def register_writer(writer_key: str, writer: Writer) -> None:
    """Record ``writer`` as the open writer of its run in this process."""
    with _OPEN_WRITERS_LOCK:
        _OPEN_WRITERS[writer_key] = writer


def unregister_writer(writer_key: str, writer: Writer) -> None:
    """Forget ``writer`` (closed), unless a newer writer replaced it already."""
    with _OPEN_WRITERS_LOCK:
        if _OPEN_WRITERS.get(writer_key) is writer:
            del _OPEN_WRITERS[writer_key]


def cleanup_run_temporaries(run_dir: Path) -> None:
    """Remove temporaries a crash left in the run folder, ``checkpoints/`` and ``objects/``."""
    cleanup_temporaries(run_dir)
    cleanup_temporaries(run_dir / CHECKPOINT_DIR)
    cleanup_temporaries(objects_dir(run_dir))


# ---------------------------------------------------------------------- the index


def load_or_rebuild_index(run_dir: Path, run_name: str) -> Index:
    """Read the index; set a corrupt one aside; adopt committed checkpoint files it lacks.

    An index other code wrote (the Colab guide's ``{"0": {...}}``) is not corrupt: its
    bytes are kept as ``checkpoint_metadata.json.legacy`` before the new index replaces
    it, and its entries describe the files adopted (see :mod:`ckptctl.storage.legacy`).
    """
    index, guide = _read_or_set_aside(run_dir, run_name)
    for raw_id, reason in index.skipped:
        log.warning("%s: ignoring index entry %r: %s", run_dir, raw_id, reason)
    index, finished = finish_pending_removal(run_dir, index)  # tombstoned files: deleted, never adopted
    if finished:
        log.warning("%s: finished deleting %d checkpoint file(s) an interrupted removal left", run_dir, len(finished))
    known = index.by_id()
    adopted = _adopt_unindexed_files(run_dir, set(known), guide)
    index = index.with_entries(list(known.values()) + adopted)
    ids_taken = checkpoint_names_present(run_dir)
    if ids_taken:  # never reuse an id that has a file (even unreadable, even a symlink)
        index = dataclasses.replace(index, next_id=max(index.next_id, max(ids_taken) + 1))
    if adopted or index.skipped:
        commit_index(run_dir, index)
        log.warning("%s: adopted %d checkpoint file(s) missing from the index", run_dir, len(adopted))
    return index


def _read_or_set_aside(run_dir: Path, run_name: str) -> tuple[Index, Mapping[int, legacy.LegacyEntry] | None]:
    """The index as read (an empty one if missing or unreadable) and the guide's entries if other code wrote it."""
    try:
        return read_index(run_dir), None
    except FileNotFoundError:
        return Index(run_name=run_name, next_id=0), None
    except CorruptIndexError as exc:
        guide = legacy.read_guide_index(run_dir)  # written by other code: kept, not set aside
        if guide is None:
            set_aside(run_dir / INDEX_FILE, f"unreadable ({exc}); rebuilding from checkpoint files")
        else:
            kept = legacy.keep_legacy_copy(run_dir / INDEX_FILE)
            log.warning(
                "%s: %s was written by other code; kept as %s, rebuilding the index from the checkpoint files",
                run_dir, INDEX_FILE, kept and kept.name,
            )
        return Index(run_name=run_name, next_id=0), guide


def _adopt_unindexed_files(
    run_dir: Path, known: set[int], guide: Mapping[int, legacy.LegacyEntry] | None
) -> list[CheckpointEntry]:
    """Entries for the committed checkpoint files the index lacks (files that do not load are logged and left)."""
    on_disk = checkpoint_files_on_disk(run_dir)
    adopted = []
    for checkpoint_id in sorted(set(on_disk) - known):
        try:
            adopted.append(entry_from_file(checkpoint_id, on_disk[checkpoint_id], guide))
        except (CheckpointIntegrityError, CorruptIndexError) as exc:
            log.warning("%s: ignoring checkpoint file that does not load: %s", run_dir, exc)
    return legacy.assign_global_steps(adopted, read_training_state(run_dir))  # files other code wrote


def entry_from_file(checkpoint_id: int, path: Path, guide: Mapping[int, legacy.LegacyEntry] | None = None) -> CheckpointEntry:
    """The index entry of the committed checkpoint file ``path`` (read from its payload; other code's via the guide's index)."""
    size, checksum = hash_file(path)
    payload = load_skeleton(path, "cpu", mmap=True)
    objects, tensor_bytes = objects_of(path, payload)  # format 2: its packs must all be there
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
            extra=salvaged_extra(path, payload.get("extra")),
            objects=objects,
            state_bytes=size + tensor_bytes if objects else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptIndexError(f"{path.name}: not a ckptctl checkpoint ({exc})") from None


def salvaged_extra(path: Path, extra: Any) -> dict[str, Any]:
    """A checkpoint file's ``extra`` made JSON-safe for the index (files from before it was checked on save)."""
    cleaned, problems = salvage_extra(extra)
    for problem in problems:
        log.warning("%s: %s; stored as null in the index", path.name, problem)
    return cleaned


def load_training_state(run_dir: Path) -> dict[str, Any]:
    """training_state.json as a dict; an unreadable one is set aside (the next update rewrites it)."""
    path = run_dir / TRAINING_STATE_FILE
    state = read_training_state(run_dir)
    if state is None and (path.exists() or path.is_symlink()):
        set_aside(path, "unreadable; the next update writes a fresh one")
    elif legacy.is_foreign_training_state(state):  # other code wrote it: keep its bytes before an update replaces it
        legacy.keep_legacy_copy(path)
    return state or {}


# ---------------------------------------------------------------------- the best model


def best_record_matching(run_dir: Path, record: BestRecord | None) -> BestInfo | None:
    """The record of ``record`` that best_model.pt's bytes match, or None."""
    if record is None:
        return None
    try:
        return record.describing(matching_checksum(run_dir / BEST_MODEL_FILE, record.checksums()))
    except CheckpointIntegrityError:
        return None


def load_or_repair_best(run_dir: Path, index: Index, metric: str, mode: str) -> BestInfo | None:
    """The record of best_model.pt: a replace a crash cut short is settled; metadata that does not match the file is rebuilt from it."""
    record = _read_best_record_or_set_aside(run_dir)
    best = record.current if record is not None else None
    if not (run_dir / BEST_MODEL_FILE).is_file():
        if record is not None and record.pending is not None and best is None:
            remove_file(run_dir / BEST_METADATA_FILE)  # the first best model's write never reached its rename
        return None if best is None or best.path == BEST_MODEL_FILE else best
    matched = best_record_matching(run_dir, record)
    if matched is not None:
        if record.pending is not None:  # a replace a crash cut short: the file says which side of the rename
            commit_best(run_dir, matched)
        return matched
    return _rebuild_best_record(run_dir, index, metric, mode)


def _read_best_record_or_set_aside(run_dir: Path) -> BestRecord | None:
    """best_metadata.json's record; an unusable one is set aside (other code's kept as ``.legacy``) and None returned."""
    try:
        return read_best_record(run_dir)
    except (CorruptIndexError, UnsafePathError) as exc:
        if legacy.read_guide_best(run_dir) is None:
            set_aside(run_dir / BEST_METADATA_FILE, f"unusable ({exc}); rebuilding it from best_model.pt")
        else:  # written by other code: its bytes are kept, then it is rebuilt from best_model.pt
            legacy.keep_legacy_copy(run_dir / BEST_METADATA_FILE)
        return None


def _rebuild_best_record(run_dir: Path, index: Index, metric: str, mode: str) -> BestInfo | None:
    """A new record of best_model.pt made from the file itself (committed), or None when it does not load."""
    best_path = run_dir / BEST_MODEL_FILE
    try:
        size, checksum = hash_file(best_path)
    except OSError as exc:  # unreadable (permissions, I/O error): as good as damaged, never a crash on open
        exc = read_failure(best_path, exc)
        log.warning("%s: best_model.pt cannot be read (%s); it will be replaced by the next best", run_dir, exc)
        return None
    try:
        payload = load_skeleton(best_path, "cpu", mmap=True)
        objects, tensor_bytes = objects_of(best_path, payload)
    except CheckpointIntegrityError as exc:
        log.warning("%s: best_model.pt does not load (%s); it will be replaced by the next best", run_dir, exc)
        return None
    epoch, batch = payload.get("epoch"), payload.get("batch")
    copy_of = next((e.id for e in index.checkpoints if e.checksum == checksum), None)  # a byte copy of a checkpoint (cp)
    repaired = BestInfo.of_model(
        source_id=payload.get("checkpoint_id") if isinstance(payload.get("checkpoint_id"), int) else copy_of,
        epoch=int(payload.get("epoch", 0)),
        batch=int(payload.get("batch", 0)),
        global_step=int(payload.get("global_step", legacy.global_step_at(index, epoch, batch) or 0)),
        metrics=clean_metrics(payload.get("metrics")),
        timestamp=legacy.utc_timestamp(payload.get("timestamp")) or utc_now_iso(),
        size_bytes=size,
        checksum=checksum,
        metric=metric,
        mode=mode,
        objects=objects,
        state_bytes=size + tensor_bytes if objects else None,
    )
    commit_best(run_dir, repaired)
    return repaired
