"""Best-model tracking: is a value better, and the two ways ``best_model.pt`` is written.

If a checkpoint was just saved for the step that became best, ``best_model.pt`` is a
verified copy of that file (its source); otherwise the state is written like a
checkpoint. Both go through :func:`ckptctl.storage.runfiles.replace_best` (one commit).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

from ckptctl.core.format import BEST_MODEL_FILE
from ckptctl.core.manifest import BestInfo
from ckptctl.errors import CkptctlError
from ckptctl.storage.atomic import atomic_copy, resolve_inside
from ckptctl.storage.runfiles import replace_best
from ckptctl.packs_io import deduplicate
from ckptctl.torch_io import write_checkpoint_file

from ckptctl.api.index_state import IndexState
from ckptctl.api.packs import RunPacks


def is_better(value: float, best: float | None, mode: str) -> bool:
    """True if ``value`` beats ``best`` under ``mode`` (``"max"``/``"min"``); NaN never wins, anything beats none or NaN."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if mode == "max" else value < best


class BestKeeper:
    """The run's best model: its record, the value to beat, and the jobs that replace it.

    ``on_written`` runs after each replace (the Drive mirror is asked to sync).
    """

    def __init__(self, run_dir: Path, index: IndexState, info: BestInfo | None, metric: str, mode: str, on_written: Callable[[], None]):
        self.run_dir = run_dir
        #: The run's packs (set by the owner once both exist): a best model's tensors are deduplicated like a checkpoint's.
        self.packs: RunPacks | None = None
        self.index = index
        self.info = info
        self.metric = metric
        self.mode = mode
        self.value: float | None = info.metrics.get(metric) if info else None
        self._on_written = on_written

    @property
    def source_id(self) -> int | None:
        """The checkpoint ``best_model.pt`` was copied from (retention keeps it), or None."""
        return self.info.source_id if self.info else None

    def beats(self, metrics: dict[str, float]) -> bool:
        """True if ``metrics[metric]`` beats the best so far (KeyError when ``metrics`` lacks the metric)."""
        if self.metric not in metrics:
            raise KeyError(f"metrics has no {self.metric!r} (the best_metric); got {sorted(metrics)}")
        return is_better(metrics[self.metric], self.value, self.mode)

    def accept(self, metrics: dict[str, float]) -> None:
        """``metrics[metric]`` is the value to beat from now on (its write is queued)."""
        self.value = metrics[self.metric]

    def copy_checkpoint_job(self, checkpoint_id: int, metrics: dict[str, float]) -> None:
        """Background job: ``best_model.pt`` becomes a verified copy of checkpoint ``checkpoint_id``."""
        entry = self.index.current.by_id().get(checkpoint_id)
        if entry is None:
            raise CkptctlError(f"checkpoint {checkpoint_id} was not saved; cannot copy it to best_model.pt")
        src = resolve_inside(self.run_dir, entry.path)
        # The metrics update_best was given are what made this the best (the checkpoint's own
        # may not even hold the best metric); they win over the checkpoint's where both have a name.
        judged = dataclasses.replace(entry, metrics={**entry.metrics, **metrics})
        self.info = replace_best(
            self.run_dir,
            lambda before: atomic_copy(src, self.run_dir / BEST_MODEL_FILE, expected_checksum=entry.checksum, before_replace=before),
            lambda size, checksum: BestInfo.of_checkpoint(judged, size, checksum, self.metric, self.mode),
        )
        self._written()

    def _written(self) -> None:
        """After a replace: the old best model's packs go if nothing else references them; the mirror is asked to sync."""
        if self.packs is not None:
            self.packs.collect()
        self._on_written()

    def write_payload_job(self, payload: dict[str, Any]) -> None:
        """Background job: ``best_model.pt`` is written from a snapshot ``payload`` (no checkpoint of that step)."""
        dedup = deduplicate(self.run_dir, payload, self.packs.table)  # its pack is kept: collected only after the replace

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
                metric=self.metric,
                mode=self.mode,
                objects=dedup.objects,
                state_bytes=size + dedup.tensor_bytes,
            )

        self.info = replace_best(
            self.run_dir,
            lambda before: write_checkpoint_file(self.run_dir / BEST_MODEL_FILE, dedup.skeleton, before_replace=before),
            describe,
        )
        self._written()
