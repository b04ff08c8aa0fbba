"""The open run's tensor packs: what a save deduplicates against, and deleting the ones nothing references any more.

Only the background worker uses it (saves, best-model writes, retention run there one at a
time), so the table and the packs on disk never disagree behind a save's back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from ckptctl.core.manifest import BestInfo
from ckptctl.core.objects import referenced_packs
from ckptctl.storage.objects import PackTable
from ckptctl.storage.runfiles import collect_packs

from ckptctl.api.index_state import IndexState


class RunPacks:
    """The pack table of one open run and its garbage collection."""

    def __init__(self, run_dir: Path, index: IndexState, best_info: Callable[[], BestInfo | None]):
        self.run_dir = run_dir
        self.index = index
        self._best_info = best_info
        self.table = PackTable()
        self.table.load(run_dir, referenced_packs(self._records()))

    def _records(self) -> list:
        return [*self.index.current.checkpoints, self._best_info()]

    def collect(self, in_flight: Iterable[str] = ()) -> list[str]:
        """Delete the packs no checkpoint in the (durable) index and no best model references, except ``in_flight``."""
        deleted = collect_packs(self.run_dir, self._records(), keep=in_flight)
        self.table.forget(deleted)
        return deleted
