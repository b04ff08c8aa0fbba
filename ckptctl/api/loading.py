"""Checked loads: a checkpoint's payload verified against the index, applied to components, RNG restored.

Which checkpoint a resume uses is decided once, by
:func:`ckptctl.core.resume.choose_resume_checkpoint`; this module only walks it with the
run's own checks (checksum for :meth:`Loader.resume_info`, checksum + safe load for
:meth:`Loader.resume`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from ckptctl.api.components import LoadCall
from ckptctl.api.distributed import Ranks, rank_view, warn_world_size_changed
from ckptctl.core.manifest import BestInfo, CheckpointEntry, Index
from ckptctl.core.resume import choose_resume_checkpoint
from ckptctl.errors import CheckpointIntegrityError, CkptctlError, NoValidCheckpointError, RestoreStateError, UnsafePathError
from ckptctl.storage import legacy
from ckptctl.storage.atomic import resolve_inside, verify_checksum
from ckptctl.storage.objects import PackChecks, check_record_objects
from ckptctl.torch_io import apply_components, payload_metadata, restore_rng, verify_file

log = logging.getLogger("ckptctl")


class Loader:
    """Loads of one run's checkpoints and best model into components."""

    def __init__(self, run_dir: Path, keep_sharded: bool = False):
        self.run_dir = run_dir
        #: Leave sharded state as references for a collective load (under torch.distributed), instead of reading it whole.
        self.keep_sharded = keep_sharded
        self._warned_no_rng = False
        #: What the last :meth:`resume` skipped: ``[{"checkpoint_id", "reason", "status"}]``.
        self.last_skipped: list[dict[str, Any]] = []

    def verified_payload(self, entry: CheckpointEntry, device: Any) -> dict[str, Any]:
        """``entry``'s file, checked against its index checksum and loaded with ``weights_only=True``."""
        try:
            path = resolve_inside(self.run_dir, entry.path)
        except UnsafePathError as exc:
            raise CheckpointIntegrityError(str(exc)) from None
        return verify_file(path, entry.checksum, device=device, unshard=not self.keep_sharded)

    def describe(self, index: Index, payload: Mapping[str, Any]) -> dict[str, Any]:
        """``payload``'s metadata (what the loads return); a step other code did not save comes from the index."""
        meta = payload_metadata(payload)
        if meta["global_step"] is None:  # written by other code: the step the index gave its position
            meta["global_step"] = legacy.global_step_at(index, meta["epoch"], meta["batch"])
        return meta

    def apply(
        self, payload: Mapping[str, Any], meta: Mapping[str, Any], components: LoadCall, with_rng: bool, ranks: Ranks | None = Ranks()
    ) -> dict[str, Any]:
        """Load ``payload`` into the call's ``components`` (and restore RNG states when ``with_rng``); return ``meta`` for this rank.

        ``ranks``: this process's place in the run; it restores its own RNG states and gets its
        own ``extra`` (:func:`~ckptctl.api.distributed.rank_view`), and ``"world_size_changed"``
        says when the checkpoint was saved by another number of ranks (warned once, by the
        writer). None for the best model: rank 0's parts, no world size.
        """
        apply_components(payload, components.bind(payload))
        meta = dict(meta)
        rng = payload.get("rng")
        if ranks is not None:
            view = rank_view(payload, ranks.rank)
            rng, meta["extra"] = view.rng, view.extra
            changed = view.world_size_changed(ranks.world_size)
            if changed is not None:
                meta["world_size_changed"] = changed
                if ranks.is_writer:
                    warn_world_size_changed(self.run_dir, meta.get("checkpoint_id"), changed)
        if with_rng:
            self._restore_rng(rng)
        return meta

    def _restore_rng(self, rng: Any) -> None:
        if rng is None:  # other code did not save RNG states: go on without them, say so once
            if not self._warned_no_rng:
                self._warned_no_rng = True
                log.warning("%s: RNG states were not saved by this checkpoint; continuing without restoring them", self.run_dir)
        elif not isinstance(rng, Mapping):
            raise RestoreStateError("checkpoint has no RNG state to restore")
        else:
            restore_rng(rng)

    def none_verified_message(self, skipped: list[dict[str, Any]]) -> str:
        """The message of :class:`NoValidCheckpointError`: how many were tried and the first reasons."""
        reasons = "; ".join(s["reason"] for s in skipped[:3])
        return f"{self.run_dir}: none of the {len(skipped)} checkpoint(s) verifies ({reasons})"

    def resume_info(self, index: Index) -> dict[str, Any] | None:
        """What a resume would load (checksums only); see ``ModelPersistence.get_resume_info``."""
        entries = index.by_id()
        checks = PackChecks()

        def check(i: int) -> None:
            verify_checksum(resolve_inside(self.run_dir, entries[i].path), entries[i].checksum)
            check_record_objects(self.run_dir, entries[i], checks)

        choice = choose_resume_checkpoint(entries, check)
        skipped = [{"checkpoint_id": i, "reason": str(exc)} for i, exc in choice.skipped]
        if choice.chosen_id is None:
            if skipped:
                raise NoValidCheckpointError(self.none_verified_message(skipped))
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

    def resume_payload(self, index: Index, device: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The newest checkpoint that verifies, loaded: ``(payload, metadata)`` (None without checkpoints); see :attr:`last_skipped`."""
        entries = index.by_id()
        choice = choose_resume_checkpoint(entries, lambda i: self.verified_payload(entries[i], device))
        skipped = []
        for checkpoint_id, exc in choice.skipped:
            log.warning("%s: skipping checkpoint %d for resume: %s", self.run_dir, checkpoint_id, exc)
            skipped.append({"checkpoint_id": checkpoint_id, "reason": str(exc), "status": getattr(exc, "status", "corrupt")})
        self.last_skipped = skipped
        if choice.chosen_id is None:
            if skipped:
                raise NoValidCheckpointError(self.none_verified_message(skipped))
            return None
        meta = self.describe(index, choice.result)
        meta["checkpoint_id"] = choice.chosen_id
        meta["skipped"] = skipped
        return choice.result, meta

    def checkpoint_payload(self, index: Index, checkpoint_id: int, device: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Checkpoint ``checkpoint_id``, verified and loaded: ``(payload, metadata)``."""
        entry = index.by_id().get(int(checkpoint_id))
        if entry is None:
            raise CkptctlError(f"{self.run_dir}: no checkpoint {checkpoint_id}")
        payload = self.verified_payload(entry, device)
        return payload, self.describe(index, payload)

    def best_payload(self, index: Index, best: BestInfo | None, device: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """``best_model.pt``, checked against its record and loaded: ``(payload, metadata)``."""
        if best is None:
            raise CkptctlError(f"{self.run_dir}: no best model yet")
        payload = verify_file(resolve_inside(self.run_dir, best.path), best.checksum, device=device, unshard=not self.keep_sharded)
        return payload, self.describe(index, payload)
