"""The persistence API a training loop calls: :class:`ModelPersistence` and :func:`setup_drive_backup`.

Saving is split in two: the training thread only takes a consistent CPU snapshot of
the state into reusable staging buffers; serialising, fsync, checksum, index update,
retention and the Drive copy happen on a background worker, one save at a time.

This module is the facade; the work is done in :mod:`ckptctl.api` (``open``,
``index_state``, ``background``, ``saving``, ``best``, ``mirroring``, ``loading``,
``runs``, ``distributed``). The run-level helpers are re-exported here.

Under ``torch.distributed`` every public method runs its work on rank 0 (the writer) through
:meth:`ckptctl.api.distributed.Ranks.on_writer`; single-process, that is a plain call.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from ckptctl.api import open as opening
from ckptctl.api.background import BackgroundWorker
from ckptctl.api.best import BestKeeper, is_better
from ckptctl.api.components import DEFAULT_DEVICE, LoadCall, load_call
from ckptctl.api.distributed import Ranks, components_to_device, rank_sections
from ckptctl.api.index_state import IndexState
from ckptctl.api.loading import Loader
from ckptctl.api.mirroring import MIRROR_LAG_WARN_SAVES, MirrorBook
from ckptctl.api.packs import RunPacks
from ckptctl.api.runs import (
    latest_run,
    newest_checkpoint_id,
    restore_from_drive,
    restore_if_mirror_ahead,
    run_has_checkpoints,
    setup_drive_backup,
)
from ckptctl.api.saving import SavePolicy, SaveRequest, Saver, Sharded
from ckptctl.api.sharded import ShardSide
from ckptctl.core.format import CHECKPOINT_DIR, DEFAULT_MAX_CHECKPOINTS, FORMAT_VERSION, TRAINING_LOG_FILE, TRAINING_STATE_FILE, utc_now_iso
from ckptctl.core.manifest import CheckpointEntry, check_extra, clean_metrics
from ckptctl.core.sharded import SHARDED_KEY
from ckptctl.errors import BackgroundSaveError, CkptctlError
from ckptctl.storage.atomic import atomic_write_json, open_regular
from ckptctl.storage.lock import RunLock
from ckptctl.storage.mirror import check_mirror_apart
from ckptctl.storage.restore import RestoreReport
from ckptctl.packs_io import frozen_paths
from ckptctl.sharded_io import split_sharded
from ckptctl.torch_io import capture_rng, component_states

__all__ = [
    "ModelPersistence",
    "setup_drive_backup",
    "run_has_checkpoints",
    "newest_checkpoint_id",
    "latest_run",
    "restore_if_mirror_ahead",
    "restore_from_drive",
    "is_better",
    "MIRROR_LAG_WARN_SAVES",
    "TAKEOVER_MIRROR_TIMEOUT",
]

log = logging.getLogger("ckptctl")

T = TypeVar("T")

#: How long a writer that is taken over gives its Drive mirror to finish (a re-run cell
#: must not hang on a slow Drive; the new writer's mirror catches up).
TAKEOVER_MIRROR_TIMEOUT = 5.0


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
    Components are any objects with ``state_dict()``/``load_state_dict()``, passed by name;
    the loads also take them by position, in the order they were saved
    (``p.resume(model, opt)``).

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

    **Several processes (torchrun).** When ``torch.distributed`` is initialised, every rank
    constructs ModelPersistence on the same ``run_dir`` and makes the same calls; the
    methods marked *collective* must be called on every rank (calling one on some ranks
    only waits for the others until the process group's timeout). Rank 0 is the writer: it
    holds the lock, writes, mirrors and commits; the other ranks never read or write the
    run folder (it need not exist on their machine) and get what they need from rank 0.
    Replicated state (DDP) is saved once, from rank 0's components; each rank's RNG states
    and ``extra`` are saved per rank and restored per rank. An error on rank 0 is raised on
    every rank, as the same type. ``distributed=False`` opts out: this process works on its
    own as if there were no other ranks (e.g. an evaluation only rank 0 runs). With nccl,
    call ``torch.cuda.set_device(local_rank)`` first as usual; the object collectives run
    on a gloo group over the CPU.

    **Sharded state (FSDP2, DTensor)** is saved by every rank: each copies its own shards
    and writes them in the background through ``torch.distributed.checkpoint`` (as packs of
    the run, see :mod:`ckptctl.sharded_io`); rank 0 commits. The run folder must be on a
    filesystem every rank shares. Resumes reshard to the current world size and sharding
    (or to plain tensors in one process).
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
        distributed: bool | None = None,
    ):
        """Open the run (collective): rank 0 locks, repairs and reads it; every rank gets the outcome.

        ``distributed``: None (default) follows ``torch.distributed`` (collective when it is
        initialised); False keeps this process on its own.
        """
        policy = SavePolicy(max_checkpoints, save_every_n_batches, save_every_seconds, staging)  # checks them
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.run_dir = Path(run_dir)
        self.run_name = self.run_dir.resolve().name
        self.max_checkpoints = policy.max_checkpoints
        self.save_every_n_batches = policy.save_every_n_batches
        self.save_every_seconds = save_every_seconds
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.background = background
        self.staging = staging
        #: What opening restored from the Drive mirror (a fresh VM), or None.
        self.last_restore: RestoreReport | None = None
        self._policy = policy
        self._ranks = Ranks.detect(distributed)
        self._writer_key = str(self.run_dir.resolve())
        self._closed = False
        self._saved_components: dict[str, Any] = {}
        self._closed_because = "it is closed"
        self._loader = Loader(self.run_dir, keep_sharded=self._ranks.distributed)
        self._shards = ShardSide(self.run_dir, self._ranks, background)
        if not self._ranks.is_writer:  # a re-constructed object replaces this rank's earlier one, as rank 0's does
            opening.take_over_earlier_writer(self._writer_key)
        opened = self._ranks.on_writer(lambda: self._open_as_writer(policy, drive_backup, drive_max_size, mirror_backoff))
        self._global_step, self._training_state, self.last_restore = opened
        if not self._ranks.is_writer:
            opening.register_writer(self._writer_key, self)

    def _open_as_writer(
        self, policy: SavePolicy, drive_backup: str | os.PathLike | None, drive_max_size: int | str | None, backoff: tuple[float, float]
    ) -> tuple[int, dict[str, Any], RestoreReport | None]:
        """Rank 0 (or the only process): lock the run, open it; return what every rank keeps (step, training state, restore)."""
        (self.run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        opening.take_over_earlier_writer(self._writer_key)
        self._lock = RunLock(self.run_dir).acquire()
        self._worker = BackgroundWorker(self.background)
        try:
            self._open(policy, drive_backup, drive_max_size, backoff)
        except BaseException:
            self._worker.shutdown(wait=False)
            self._lock.release()
            raise
        opening.register_writer(self._writer_key, self)
        return self._global_step, self._training_state, self.last_restore

    def _open(
        self, policy: SavePolicy, drive_backup: str | os.PathLike | None, drive_max_size: int | str | None, backoff: tuple[float, float]
    ) -> None:
        """Under the run lock: clean up, restore from a mirror that is ahead, read and repair the run, start the mirror."""
        opening.cleanup_run_temporaries(self.run_dir)
        drive_root = setup_drive_backup(drive_backup) if drive_backup is not None else None  # fails fast if Drive is not mounted
        if drive_root is not None:
            check_mirror_apart(self.run_dir, drive_root / self.run_name)
            self.last_restore = restore_if_mirror_ahead(self.run_dir, drive_root / self.run_name, lock_held=True)
        self._index = IndexState(self.run_dir, opening.load_or_rebuild_index(self.run_dir, self.run_name))
        self._drive = MirrorBook(self.run_dir, self._index)
        best = opening.load_or_repair_best(self.run_dir, self._index.current, self.best_metric, self.best_mode)
        self._best = BestKeeper(self.run_dir, self._index, best, self.best_metric, self.best_mode, self._drive.request)
        self._best.packs = RunPacks(self.run_dir, self._index, lambda: self._best.info)
        self._best.packs.collect()  # what a kill left: packs of removed checkpoints, a save never committed
        self._saver = Saver(self.run_dir, policy, self._index, self._worker, self._best, self._drive, self._best.packs)
        latest = self._index.current.latest
        self._global_step = latest.global_step if latest else 0
        self._training_state = opening.load_training_state(self.run_dir)
        if drive_root is not None:
            self._drive.start(drive_root / self.run_name, drive_max_size, backoff)

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

        Collective under ``torch.distributed``: every rank calls it after every batch. The
        step rule gives the same answer on every rank; with ``save_every_seconds``, rank 0's
        clock decides for all (one small broadcast per call). The id is the same on every rank.
        """
        self._check_open()
        if not self._ranks.distributed:  # distributed: both surface at the save, on every rank
            self._worker.raise_error()
            extra = check_extra(extra)  # fails at the first call with bad extra, not at the first due save
        self._global_step = int(global_step) if global_step is not None else self._global_step + 1
        if not self._is_due(self._global_step):
            return None
        return self.save_checkpoint(epoch, batch, metrics, global_step=self._global_step, extra=extra, **components)

    def _is_due(self, global_step: int) -> bool:
        """``maybe_save``'s rule; a time-based one is rank 0's decision, broadcast."""
        if self._policy.save_every_seconds is None:
            return self._policy.due_by_step(global_step)
        return self._ranks.on_writer(lambda: self._saver.is_due(global_step))

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

        Collective under ``torch.distributed``: the components (replicated, as with DDP) and
        ``metrics`` are rank 0's, saved once; every rank's RNG states and ``extra`` (its data
        position) are gathered to rank 0 and saved per rank. Every rank gets the same id.
        """
        self._check_open()
        if not components:
            raise ValueError("save_checkpoint needs at least one component, e.g. agent=model")
        step = int(global_step) if global_step is not None else self._global_step
        states, shards = self._split_states(components)
        parts = self._ranks.gather(lambda: (self._shards.raise_error(), capture_rng(), check_extra(extra))[1:])
        checkpoint_id = self._ranks.on_writer(
            lambda: self._save_as_writer(epoch, batch, step, metrics, extra, components, parts, states, shards)
        )
        self._saved_components = dict(components)  # what a best model holds too (see update_best)
        if shards and not self._ranks.is_writer:
            self._shards.submit(shards)
        self._global_step = step
        return checkpoint_id

    def _split_states(self, components: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every component's state, with sharded tensors (DTensors) as references, and those tensors by fqn (none: empty)."""
        states, shards = split_sharded(component_states(components))
        if shards and not self._ranks.distributed:
            raise CkptctlError(
                f"{self.run_dir}: sharded state (DTensor, FSDP2) is saved by every rank together: "
                "construct ModelPersistence on every rank without distributed=False"
            )
        return states, shards

    def _save_as_writer(
        self, epoch: int, batch: int, step: int, metrics: Any, extra: Any, components: Mapping[str, Any], parts: Any,
        states: Mapping[str, Any], shards: Mapping[str, Any],
    ) -> int:
        self._worker.raise_error()
        # Everything that goes into the file and the index is checked before anything is written.
        metrics = clean_metrics(metrics)
        extra = check_extra(extra)
        sections = rank_sections(parts, self._ranks.world_size) if parts is not None else None
        sharded = Sharded(shards, self._ranks.shard_group) if shards else None
        return self._saver.save(epoch, batch, step, metrics, states, extra, sections, frozen_paths(components), sharded)

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

        Returns True when it became best. The best model always holds one set of
        components: every component of the latest save of this session, plus those given
        here (which win), so ``load_best_model`` takes the same components as
        ``load_checkpoint`` whatever the timing. If a checkpoint was just saved for the same
        step (and no component given here is missing from it), ``best_model.pt`` is a copy of
        that checkpoint (its source, costing no storage); otherwise that set is snapshotted
        and written like a checkpoint. NaN never becomes best.

        Collective under ``torch.distributed``: rank 0's metrics and components decide and
        are saved; every rank returns the same answer.
        """
        self._check_open()
        chosen = {**self._saved_components, **components}
        became, snapshot = self._ranks.on_writer(lambda: self._update_best_as_writer(epoch, batch, metrics, global_step, components, chosen))
        if snapshot and not self._ranks.is_writer:
            _, shards = self._split_states(chosen)  # the same components rank 0 snapshotted
            if shards:
                self._shards.submit(shards)
        return became

    def _update_best_as_writer(
        self, epoch: int, batch: int, metrics: Mapping[str, Any], global_step: int | None, components: Mapping[str, Any],
        chosen: Mapping[str, Any],
    ) -> tuple[bool, bool]:
        """Rank 0: ``(became best, written from a snapshot)`` (a sharded snapshot needs every rank's shards too)."""
        self._worker.raise_error()
        metrics = clean_metrics(metrics)
        if not self._best.beats(metrics):
            return False, False

        def snapshot() -> tuple[Mapping[str, Any], Sharded | None]:
            if not chosen:
                raise ValueError("update_best needs the components to save, e.g. agent=model")
            states, shards = self._split_states(chosen)
            return states, Sharded(shards, self._ranks.shard_group) if shards else None

        step = int(global_step) if global_step is not None else self._global_step
        same_set = set(components) <= set(self._saved_components)
        copied = self._saver.save_best(SaveRequest(-1, int(epoch), int(batch), step), metrics, snapshot, may_copy=same_set)
        self._best.accept(metrics)
        return True, not copied

    def pin(self, checkpoint_id: int, pinned: bool = True) -> None:
        """Keep checkpoint ``checkpoint_id`` out of retention (or release it with ``pinned=False``). Collective under ``torch.distributed``."""
        self._check_open()
        self._ranks.on_writer(lambda: self._pin_as_writer(checkpoint_id, pinned))

    def _pin_as_writer(self, checkpoint_id: int, pinned: bool) -> None:
        self._worker.flush()
        with self._index.lock:
            by_id = self._index.current.by_id()
            if checkpoint_id not in by_id:
                raise CkptctlError(f"{self.run_dir}: no checkpoint {checkpoint_id}")
            by_id[checkpoint_id] = CheckpointEntry(**{**by_id[checkpoint_id].__dict__, "pinned": pinned})
            self._index.commit(self._index.current.with_entries(list(by_id.values())))

    def flush(self) -> None:
        """Wait for all pending background saves; raise :class:`BackgroundSaveError` if one failed.

        Collective under ``torch.distributed``: every rank waits for its own shard writes,
        then returns once rank 0 has flushed (a barrier); the first error is raised on every rank.
        """
        flushed = self._ranks.gather(self._shards.flush)

        def work() -> None:
            for outcome in flushed or ():
                outcome.get()
            self._worker.flush()

        self._ranks.on_writer(work)

    # ------------------------------------------------------------------ training state and log

    def update_training_state(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` (JSON values, e.g. ``status="running"``, ``config={...}``) into training_state.json.

        Not collective: under ``torch.distributed`` only rank 0 writes the file; other ranks
        keep their merged copy (:attr:`training_state`).
        """
        self._check_open()
        state = {**self._training_state, **fields, "format_version": FORMAT_VERSION, "updated_at": utc_now_iso()}
        if self._ranks.is_writer:
            atomic_write_json(self.run_dir / TRAINING_STATE_FILE, state)
            self._drive.request()  # so the mirror's copy ends with the final status too
        self._training_state = state
        return dict(state)

    @property
    def training_state(self) -> dict[str, Any]:
        """The last training_state.json written or read."""
        return dict(self._training_state)

    def append_log(self, line: str) -> None:
        """Append one line to training.log (flushed, not fsynced).

        Only to a regular file: a FIFO, a device, a socket, a directory or a symlink at that
        name raises :class:`NotRegularFileError` at once (the open never blocks). Not
        collective: under ``torch.distributed`` only rank 0's lines are written.
        """
        if not self._ranks.is_writer:
            return
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        fd = open_regular(self.run_dir / TRAINING_LOG_FILE, flags, 0o644, follow_symlinks=False)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")

    # ------------------------------------------------------------------ reading and resuming

    @property
    def checkpoints(self) -> dict[int, dict[str, Any]]:
        """Committed checkpoints: ``{id: metadata}`` in id order (pending saves appear once written).

        Collective under ``torch.distributed`` (rank 0's index, broadcast).
        """
        return self._ranks.on_writer(lambda: {e.id: e.to_dict() for e in self._index.current.checkpoints})

    @property
    def best(self) -> dict[str, Any] | None:
        """``best_metadata.json`` as a dict, or None before any best model. Collective under ``torch.distributed``."""
        return self._ranks.on_writer(lambda: self._best.info.to_dict() if self._best.info else None)

    @property
    def global_step(self) -> int:
        """Batches completed since the start of the run, as the library counts them."""
        return self._global_step

    @property
    def drive_budget(self) -> int | None:
        """The Drive mirror's byte budget (None without ``drive_backup``, and on ranks other than 0)."""
        return self._drive.budget if self._ranks.is_writer else None

    @property
    def staging_bytes(self) -> int:
        """Bytes the reusable staging buffers hold between saves (0 before the first staged save, and on ranks other than 0)."""
        return self._saver.stager.staged_bytes if self._ranks.is_writer else 0

    @property
    def last_resume_skipped(self) -> list[dict[str, Any]]:
        """What the last :meth:`resume` skipped: ``[{"checkpoint_id", "reason", "status"}]``."""
        return self._loader.last_skipped

    def get_resume_info(self) -> dict[str, Any] | None:
        """What :meth:`resume` would load: the newest checkpoint whose checksum matches.

        Returns ``{"checkpoint_id", "epoch", "batch", "global_step", "metrics", "skipped"}``,
        or None when the run has no checkpoints. Raises :class:`NoValidCheckpointError`
        when checkpoints exist but none verifies. Collective under ``torch.distributed``
        (rank 0 checks, every rank gets the same answer).
        """
        self._check_open()

        def info() -> dict[str, Any] | None:
            self._worker.flush()
            return self._loader.resume_info(self._index.current)

        return self._ranks.on_writer(info)

    def load_checkpoint(
        self, checkpoint_id: int, *components_in_order: Any, device: Any = DEFAULT_DEVICE, restore_rng: bool = True, **components: Any
    ) -> dict[str, Any]:
        """Load checkpoint ``checkpoint_id`` into the components (and restore RNG states); return its metadata.

        Components by name (``agent=model``), or by position in the order the checkpoint
        saved them (``load_checkpoint(7, model, opt)``; see :mod:`ckptctl.api.components`).
        The file is checked against the index checksum and loaded with ``weights_only=True``.
        Collective under ``torch.distributed``, as :meth:`resume`.
        """
        call = self._prepare_load("load_checkpoint", components_in_order, device, components)
        loaded = self._read_on_writer(call, lambda dev: self._loader.checkpoint_payload(self._index.current, checkpoint_id, dev))
        return self._loaded(self._apply(loaded, call, restore_rng, per_rank=True), restore_rng)

    def resume(self, *components_in_order: Any, device: Any = DEFAULT_DEVICE, **components: Any) -> dict[str, Any] | None:
        """Load the newest checkpoint that verifies into the components and restore RNG; return its metadata.

        Components by name (``resume(agent=model, optimizer=opt)``), or by position in the
        order they were saved (``resume(model, opt)``; see :mod:`ckptctl.api.components`:
        with positional ones every saved component must be given, and a count that does not
        match is a TypeError listing what was passed and what was saved).
        Corrupt, truncated or missing newer checkpoints are skipped, logged, and listed under
        ``"skipped"`` in the result. Returns None when the run has no checkpoints; raises
        :class:`NoValidCheckpointError` when it has some but none verifies. Before touching
        any file: :class:`DeviceUnavailableError` when ``device`` is not usable here
        (``"cuda"`` on a machine without CUDA), TypeError when it is not a device at all.

        Collective under ``torch.distributed``: rank 0 chooses, verifies and reads the
        checkpoint and broadcasts it; every rank loads it into its components and restores
        its own RNG states, and gets the same metadata except ``"extra"``, which is the one
        that rank saved. A checkpoint saved by another number of ranks (2 -> 1, 1 -> 2) still
        loads: rank r restores rank r's RNG states and extra where saved, else rank 0's, and
        ``"world_size_changed": {"saved": 2, "now": 1}`` says so (warned once).
        """
        call = self._prepare_load("resume", components_in_order, device, components)
        loaded = self._read_on_writer(call, lambda dev: self._loader.resume_payload(self._index.current, dev))
        if loaded is None:
            return None
        if not self._ranks.is_writer:
            self._loader.last_skipped = list(loaded[1]["skipped"])
        return self._loaded(self._apply(loaded, call, True, per_rank=True), True)

    def load_best_model(self, *components_in_order: Any, device: Any = DEFAULT_DEVICE, **components: Any) -> dict[str, Any]:
        """Load ``best_model.pt`` into the components (no RNG restore); return its metadata.

        Components by name or by position, as for :meth:`resume`:
        ``load_best_model(agent, qwen, solver2, efe_loss, policy_rl, optimizer, device="cuda")``.
        Collective under ``torch.distributed``: rank 0 reads it, every rank loads it.
        """
        call = self._prepare_load("load_best_model", components_in_order, device, components)
        loaded = self._read_on_writer(call, lambda dev: self._loader.best_payload(self._index.current, self._best.info, dev))
        return self._apply(loaded, call, False, per_rank=False)

    def _prepare_load(self, method: str, positional: tuple[Any, ...], device: Any, named: Mapping[str, Any]) -> LoadCall:
        """Check the call (device, components) on this rank before any file is read."""
        self._check_open()
        return load_call(method, positional, device, named)

    def _read_on_writer(self, call: LoadCall, read: Callable[[Any], T]) -> T:
        """``read(device)`` on rank 0 after every rank's pending saves (to the CPU when it is then broadcast), its result on every rank."""
        flushed = self._ranks.gather(self._shards.flush)

        def work() -> T:
            for outcome in flushed or ():
                outcome.get()
            self._worker.flush()
            return read("cpu" if self._ranks.distributed else call.device)

        return self._ranks.on_writer(work)

    def _apply(self, loaded: tuple[Mapping[str, Any], dict[str, Any]], call: LoadCall, with_rng: bool, *, per_rank: bool) -> dict[str, Any]:
        """Load what rank 0 read into this rank's components; its own RNG states and extra when ``per_rank``.

        Sharded state (left as references by rank 0) is read by every rank into its own
        components' tensors first (collective, :meth:`ckptctl.api.sharded.ShardSide.fill`).
        """
        payload, meta = loaded
        if self._ranks.distributed:
            bound = call.bind(payload)
            if SHARDED_KEY in payload:
                payload = self._shards.fill(payload, bound, f"checkpoint {meta.get('checkpoint_id')}")
            payload = components_to_device(payload, list(bound), call.device)
        return self._loader.apply(payload, meta, call, with_rng, self._ranks if per_rank else None)

    def _loaded(self, meta: dict[str, Any], with_rng: bool) -> dict[str, Any]:
        """After a checkpoint was loaded: the step counter continues from it; the next best model will not copy the last save."""
        if with_rng and meta["global_step"] is not None:
            self._global_step = int(meta["global_step"])
        if self._ranks.is_writer:
            self._saver.forget_last_save()
        return meta

    # ------------------------------------------------------------------ closing

    def close(self, mirror_timeout: float | None = 60.0) -> None:
        """Flush pending saves, give the Drive mirror up to ``mirror_timeout`` s to catch up, release the lock.

        Raises :class:`BackgroundSaveError` (after releasing everything) if a save failed.
        Collective under ``torch.distributed``: every rank returns once rank 0 has closed (a
        barrier: a loop to a fixed total ends together), and rank 0's error is raised on
        every rank.
        """
        if self._closed:
            return
        try:
            flushed = self._ranks.gather(self._shards.flush)  # every rank's shard writes end before rank 0's last commit

            def work() -> None:
                self._close_here(mirror_timeout)
                for outcome in flushed or ():
                    outcome.get()

            self._ranks.on_writer(work)
        finally:
            if not self._ranks.is_writer:
                self._close_here(mirror_timeout)

    def _close_here(self, mirror_timeout: float | None) -> None:
        """Close this rank's object: on the writer, flush, stop the threads and release the lock; elsewhere only mark it closed."""
        if not self._ranks.is_writer:
            self._closed = True
            opening.unregister_writer(self._writer_key, self)
            self._shards.shutdown()
            return
        try:
            self._worker.flush()
        finally:
            self._closed = True
            self._worker.shutdown(wait=True)
            self._drive.stop(mirror_timeout)
            # A mirror thread still busy (Drive slow) must never write this closed object's
            # stale index over a newer writer's: from now on the index refuses every commit.
            self._index.close()
            self._lock.release()
            opening.unregister_writer(self._writer_key, self)

    def _close_for_takeover(self) -> None:
        """Closed by a newer ModelPersistence on the same run in this process: finish, stop, step aside (this rank only)."""
        self._closed_because = "a newer ModelPersistence on the same run took over from it"
        try:
            self._close_here(TAKEOVER_MIRROR_TIMEOUT)
        except BackgroundSaveError as exc:
            log.warning("%s: the earlier writer's last save failed: %s", self.run_dir, exc)

    def __enter__(self) -> "ModelPersistence":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None and self._ranks.distributed and not self._closed:
            self._close_here(60.0)  # leaving on an error: the other ranks may never reach a collective close
            return
        self.close()
