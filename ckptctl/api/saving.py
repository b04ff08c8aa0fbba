"""Saving: when a save is due, whether to stage, the snapshot, and the background write with retention.

The training thread only snapshots (into reusable staging buffers, or, without staging,
waits for the live tensors to be written); the worker writes the file, commits the index
with retention's victims as tombstones, deletes their files and asks the mirror to sync.
On a full disk the oldest unprotected checkpoint is freed early and the write retried.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ckptctl.core.format import checkpoint_relpath, utc_now_iso
from ckptctl.core.manifest import CheckpointEntry, Index
from ckptctl.core.retention import ids_to_delete, protected_ids
from ckptctl.core.sharded import SHARDED_KEY, record_packs
from ckptctl.errors import CkptctlError, DiskFullError
from ckptctl.sharded_io import save_shards, stage_shards
from ckptctl.storage.runfiles import delete_checkpoint_files, retention_items
from ckptctl.packs_io import Deduplicated
from ckptctl.torch_io import Stager, available_memory_bytes, build_payload, tensor_bytes, write_deduplicated

from ckptctl.api.background import BackgroundWorker
from ckptctl.api.best import BestKeeper
from ckptctl.api.index_state import IndexState
from ckptctl.api.mirroring import MirrorBook
from ckptctl.api.packs import RunPacks
from ckptctl.api.sharded import check_shard_packs

log = logging.getLogger("ckptctl")

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class SaveRequest:
    """The position a save (or a best-model write, ``checkpoint_id=-1``) records."""

    checkpoint_id: int
    epoch: int
    batch: int
    global_step: int


@dataclass(frozen=True)
class SavePolicy:
    """When saves are due, how many checkpoints retention keeps, and the staging mode."""

    max_checkpoints: int
    save_every_n_batches: int
    save_every_seconds: float | None
    staging: str

    def __post_init__(self) -> None:
        if int(self.max_checkpoints) < 1:
            raise ValueError(f"max_checkpoints must be at least 1, got {self.max_checkpoints}")
        if int(self.save_every_n_batches) < 1:
            raise ValueError(f"save_every_n_batches must be at least 1, got {self.save_every_n_batches}")
        if self.staging not in ("auto", "copy", "none"):
            raise ValueError(f"staging must be 'auto', 'copy' or 'none', got {self.staging!r}")
        if self.save_every_seconds is not None and self.save_every_seconds <= 0:
            raise ValueError(f"save_every_seconds must be positive, got {self.save_every_seconds}")
        object.__setattr__(self, "max_checkpoints", int(self.max_checkpoints))
        object.__setattr__(self, "save_every_n_batches", int(self.save_every_n_batches))

    def due_by_step(self, global_step: int) -> bool:
        """The step half of the rule: every ``save_every_n_batches`` steps (the same on every rank)."""
        return global_step % self.save_every_n_batches == 0


@dataclass(frozen=True)
class Sharded:
    """Sharded tensors of a save (fqn -> DTensor, or staged chunks) and the process group DCP writes them over."""

    tensors: Mapping[str, Any]
    group: Any


class Saver:
    """Schedules, snapshots and writes the checkpoints of one open run."""

    def __init__(
        self,
        run_dir: Path,
        policy: SavePolicy,
        index: IndexState,
        worker: BackgroundWorker,
        best: BestKeeper,
        mirror: MirrorBook,
        packs: RunPacks,
    ):
        self.run_dir = run_dir
        self.packs = packs
        self.policy = policy
        self.index = index
        self.worker = worker
        self.best = best
        self.mirror = mirror
        self.stager = Stager()
        self.next_id = index.current.next_id
        self.last_save: SaveRequest | None = None
        self._last_save_future: Future | None = None
        self._last_save_time = time.monotonic()
        #: Packs written for the checkpoint being written, not referenced by the index yet.
        self._in_flight: set[str] = set()

    # ------------------------------------------------------------------ the training thread

    def is_due(self, global_step: int) -> bool:
        """The rule of ``maybe_save``: every ``save_every_n_batches`` steps, or ``save_every_seconds`` since the last save."""
        if self.policy.due_by_step(global_step):
            return True
        every = self.policy.save_every_seconds
        return every is not None and time.monotonic() - self._last_save_time >= every

    def save(
        self,
        epoch: int,
        batch: int,
        global_step: int,
        metrics: dict[str, float],
        states: Mapping[str, Any],
        extra: Mapping[str, Any],
        sections: Mapping[str, Any] | None = None,
        stable: frozenset[tuple] = frozenset(),
        shards: Sharded | None = None,
    ) -> int:
        """Snapshot ``states`` as the next checkpoint and queue its write; return its id.

        ``sections``: more top-level payload keys (the per-rank parts of a distributed save,
        :func:`ckptctl.api.distributed.rank_sections`); ``stable``: the frozen tensors' paths
        (:func:`ckptctl.packs_io.frozen_paths`); ``shards``: rank 0's sharded tensors (by fqn,
        ``states`` holding references to them) and the group the ranks write them over.
        """
        self.worker.wait_for_staging_buffers()
        self.worker.raise_error()
        staged = self._stage_shards(shards) if shards is not None else None
        checkpoint_id = self.next_id
        self.next_id += 1
        request = SaveRequest(checkpoint_id, int(epoch), int(batch), global_step)
        self.last_save = request
        self._last_save_time = time.monotonic()
        self._last_save_future = None  # a snapshot that fails leaves no write for a best copy to wait for
        job = functools.partial(self._write_checkpoint_job, request, stable)
        if staged is not None:
            job = functools.partial(self._write_sharded_job, job, staged)
        self._last_save_future = self.snapshot_and_submit(job, request, checkpoint_id, metrics, states, extra, sections, shards is not None)
        self.mirror.warn_if_lags(checkpoint_id)
        return checkpoint_id

    def save_best(
        self,
        request: SaveRequest,
        metrics: dict[str, float],
        snapshot: Callable[[], tuple[Mapping[str, Any], Sharded | None]],
        *,
        may_copy: bool = True,
    ) -> bool:
        """Queue the best model's write: a copy of the checkpoint saved at ``request``'s position (when ``may_copy``), else a snapshot.

        ``snapshot()`` gives the states to snapshot and their sharded tensors (called only
        when there is no copy to make). Returns True for a copy. The copy depends on that
        checkpoint's write: if the write fails, the copy is skipped and the write's own error
        is what the caller sees. A snapshot of sharded state is written by every rank, as a checkpoint is.
        """
        last = self.last_save
        same_step = last is not None and (last.global_step, last.epoch, last.batch) == (request.global_step, request.epoch, request.batch)
        if may_copy and same_step:
            self.worker.submit(self.best.copy_checkpoint_job, last.checkpoint_id, metrics, after=self._last_save_future)
            return True
        states, shards = snapshot()
        self.worker.wait_for_staging_buffers()
        job = self.best.write_payload_job
        if shards is not None:
            job = functools.partial(self._write_sharded_job, job, self._stage_shards(shards))
        self.snapshot_and_submit(job, request, None, metrics, states, sharded=shards is not None)
        return False

    def forget_last_save(self) -> None:
        """After a load, the state is no longer the one last saved: a best model will not copy that checkpoint."""
        self.last_save = None

    def should_stage(self, states: Mapping[str, Any]) -> bool:
        """Copy into staging buffers unless told not to, or (``auto``) the copy would not fit in memory."""
        if self.policy.staging != "auto":
            return self.policy.staging == "copy"
        needed = tensor_bytes(states) - self.stager.staged_bytes
        available = available_memory_bytes()
        return needed <= 0 or available is None or needed <= available // 2

    def snapshot_and_submit(
        self,
        job: Callable[[dict[str, Any]], None],
        request: SaveRequest,
        checkpoint_id: int | None,
        metrics: dict[str, float],
        states: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
        sections: Mapping[str, Any] | None = None,
        sharded: bool = False,
    ) -> Future:
        """Snapshot ``states`` with RNG and queue ``job(payload)``; return its future.

        Staged (copied into the reusable buffers), the call returns at once. Without
        staging (``staging="none"``, or a state too large to copy), the live tensors are
        written before this returns, so training cannot change them mid-write. A sharded
        save always stages: rank 0 must not wait for a write the other ranks join later.
        """
        stager = self.stager if sharded or self.should_stage(states) else Stager(copy=False)
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
            sections=sections,
        )
        future = self.worker.submit(job, payload)
        if stager.copy:
            self.worker.hold_staging(future)
        else:
            self.worker.wait(future)
        return future

    def _stage_shards(self, shards: Sharded) -> Sharded:
        """Rank 0's chunks of the sharded tensors, copied into the staging buffers."""
        if self.policy.staging == "none":
            raise CkptctlError("staging='none' cannot save sharded state: every rank writes its shards in the background")
        return Sharded(stage_shards(self.stager.stage, shards.tensors), shards.group)

    # ------------------------------------------------------------------ the background worker

    def _write_sharded_job(self, write: Callable[[dict[str, Any]], None], staged: Sharded, payload: dict[str, Any]) -> None:
        """Every rank writes its shards (DCP, collective); then the skeleton with DCP's record, and the commit."""
        record = save_shards(self.run_dir, staged.tensors, staged.group)
        check_shard_packs(self.run_dir, record)
        payload[SHARDED_KEY] = record
        write(payload)

    def _write_checkpoint_job(self, request: SaveRequest, stable: frozenset[tuple], payload: dict[str, Any]) -> None:
        relpath = checkpoint_relpath(request.checkpoint_id)
        size, checksum, dedup = self._write_making_room(relpath, payload, stable)
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
            objects=dedup.objects,
            state_bytes=size + dedup.tensor_bytes,
        )
        with self.index.lock:
            grown = self.index.current.with_entries(list(self.index.current.checkpoints) + [entry])
            victims = set(
                ids_to_delete(
                    retention_items(grown.checkpoints),
                    keep_last=self.policy.max_checkpoints,
                    best_source_id=self.best.source_id,
                    newest_good_id=entry.id,
                )
            )
            removed = [e for e in grown.checkpoints if e.id in victims]
            kept = self._retire(grown.with_entries([e for e in grown.checkpoints if e.id not in victims]), removed)
            # the new file is durable; now the index (the victims as tombstones until their files are gone)
            self.index.commit_removal(kept, removed)
        self._remove_files(removed)
        self.mirror.request()

    def _remove_files(self, victims: list[CheckpointEntry]) -> None:
        """Delete the files of ``victims`` (committed as tombstones), clear their tombstones, then the packs nothing references."""
        if not victims:
            return
        delete_checkpoint_files(self.run_dir, victims)
        self.index.finish_removal([v.id for v in victims])
        self.packs.collect(self._in_flight)

    def _retire(self, index: Index, removed: Iterable[CheckpointEntry]) -> Index:
        """Record in ``index`` which of the ``removed`` checkpoints the Drive mirror may now delete too.

        With a mirror, every removed id (it may hold a copy whose report is not applied
        yet); without one, those recorded as mirrored by an earlier session.
        """
        retired = [e.id for e in removed if self.mirror.active or e.mirrored]
        return index.retire(retired) if retired else index

    def _write_making_room(self, relpath: str, payload: dict[str, Any], stable: frozenset[tuple]) -> tuple[int, str, Deduplicated]:
        """Write a checkpoint (its new pack, then its file); on a full disk free the oldest unprotected checkpoint and retry.

        The newest checkpoint, the best model's source and pinned ones are never freed, so
        the run stays resumable; when nothing else is left, :class:`DiskFullError` says so.
        A pack written before the disk filled is kept for the retry (not yet referenced).
        """
        self._in_flight = set(record_packs(payload[SHARDED_KEY])) if SHARDED_KEY in payload else set()
        try:
            return self._write_retrying(relpath, payload, stable)
        finally:
            self._in_flight = set()

    def _write_retrying(self, relpath: str, payload: dict[str, Any], stable: frozenset[tuple]) -> tuple[int, str, Deduplicated]:
        while True:
            try:
                return write_deduplicated(
                    self.run_dir, self.run_dir / relpath, payload, self.packs.table, on_pack=self._in_flight.add, stable=stable
                )
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
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
        entries = self.index.current.checkpoints
        keep = protected_ids(retention_items(entries), best_source_id=self.best.source_id)
        return next((e for e in entries if e.id not in keep), None)

    def _drop_entries(self, victims: list[CheckpointEntry]) -> None:
        """Remove ``victims`` from the index, then delete their files (files first if the index cannot be written)."""
        gone = {v.id for v in victims}
        with self.index.lock:
            current = self.index.current
            smaller = self._retire(current.with_entries([e for e in current.checkpoints if e.id not in gone]), victims)
            try:
                self.index.commit_removal(smaller, victims)
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
                    raise
                delete_checkpoint_files(self.run_dir, victims)  # old, not the newest: resume is unaffected
                self.index.commit(smaller)
        self._remove_files(victims)
