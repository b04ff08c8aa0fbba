"""Which packs a run's metadata on disk references, and collecting the others, for commands over a locked run.

The library collects packs from its own view of the run while it trains
(:class:`ckptctl.api.packs.RunPacks`). ``prune`` and ``promote`` hold the run lock with no
such view: they read the references from the durable metadata (index entries and every
best-model record, both during a replace). They collect only when that metadata accounts
for every file that may reference a pack. A checkpoint file the index does not list (the
library's next open adopts it), an index entry this version cannot read, a removal still
in progress, or a ``best_model.pt`` no record describes would make its packs look
unreferenced: then nothing is deleted and :attr:`PackReferences.blocked` says why (the
library's next open collects them once it has adopted or repaired what it found). No torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptctl.core.format import BEST_MODEL_FILE
from ckptctl.core.objects import referenced_packs
from ckptctl.errors import CorruptIndexError, UnsafePathError
from ckptctl.storage.lock import is_locked
from ckptctl.storage.objects import stored_pack_names
from ckptctl.storage.runfiles import best_records, collect_packs
from ckptctl.storage.scan import checkpoint_files_on_disk, read_best_record, read_index


@dataclass(frozen=True)
class PackReferences:
    """What a run's durable metadata references: its index entries and best-model records, or why it cannot be trusted to."""

    records: tuple[Any, ...] = ()
    #: Why the metadata may not account for every reference (None: it does, packs may be collected).
    blocked: str | None = None

    @property
    def packs(self) -> dict[str, int]:
        """Every pack the records reference, name -> size as recorded."""
        return referenced_packs(self.records)


def pack_references(run_dir: str | os.PathLike) -> PackReferences:
    """Read the references of ``run_dir``'s packs from its index and ``best_metadata.json`` (see the module docstring)."""
    run_dir = Path(run_dir)
    try:
        index = read_index(run_dir)
    except FileNotFoundError:
        return PackReferences(blocked="the run has no index")
    except (CorruptIndexError, UnsafePathError) as exc:
        return PackReferences(blocked=f"its index is unreadable ({exc})")
    if index.skipped:
        return PackReferences(blocked=f"the index has entries this version cannot read ({len(index.skipped)})")
    if index.deleting:
        return PackReferences(blocked="a removal is still in progress")
    unindexed = sorted(set(checkpoint_files_on_disk(run_dir)) - set(index.by_id()))
    if unindexed:
        return PackReferences(blocked=f"checkpoint file(s) {', '.join(map(str, unindexed))} are not in the index")
    try:
        record = read_best_record(run_dir)
    except (CorruptIndexError, UnsafePathError) as exc:
        return PackReferences(blocked=f"best_metadata.json is unreadable ({exc})")
    if record is None and os.path.lexists(run_dir / BEST_MODEL_FILE):
        return PackReferences(blocked=f"{BEST_MODEL_FILE} has no record")
    return PackReferences(tuple(index.checkpoints) + tuple(best_records(record)))


def unreferenced_packs(run_dir: str | os.PathLike, refs: PackReferences | None = None) -> dict[str, int]:
    """The packs in ``run_dir/objects`` that ``refs`` (default: the metadata on disk) does not reference, name -> size; none when blocked."""
    refs = refs if refs is not None else pack_references(run_dir)
    if refs.blocked is not None:
        return {}
    live = refs.packs
    return {name: size for name, size in stored_pack_names(run_dir).items() if name not in live}


def collect_run_packs(run_dir: str | os.PathLike) -> tuple[dict[str, int], str | None]:
    """Delete the packs of ``run_dir`` its durable metadata does not reference; return ``({name: size} deleted, why not)``.

    Call holding the run lock, after the metadata that stopped referencing them is durable
    and tombstoned files are deleted. Deletes nothing (and says why) when the metadata may
    not account for every reference (see :func:`pack_references`).
    """
    refs = pack_references(run_dir)
    if refs.blocked is not None:
        return {}, refs.blocked
    sizes = stored_pack_names(run_dir)
    deleted = collect_packs(run_dir, refs.records)
    return {name: sizes.get(name, 0) for name in deleted}, None


def leftover_note(run_dir: str | os.PathLike) -> str | None:
    """A note on the packs of an idle run that nothing references (a kill's leftovers), or None: not an error, they are collected later."""
    if is_locked(run_dir):  # a trainer's save writes its pack just before the index lists it
        return None
    leftover = unreferenced_packs(run_dir)
    if not leftover:
        return None
    return (
        f"{Path(run_dir).name}: {len(leftover)} tensor object(s) ({sum(leftover.values())} bytes) in objects/ that nothing "
        "references (left by an interrupted save or prune); the next prune or training session deletes them"
    )
