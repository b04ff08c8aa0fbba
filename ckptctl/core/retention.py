"""Retention rules as pure functions over the list of checkpoints.

The rule (see the interface contract): keep the last K checkpoints by id, **plus** the
checkpoint ``best_model.pt`` came from, **plus** pinned ones. ``prune --max-size`` adds a
size budget on top of that, but never removes a protected checkpoint; it counts unique
bytes (a tensor pack several checkpoints share counts once, see :func:`unique_bytes`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class RetentionItem:
    """What the rules need to know about one checkpoint (``objects``: the packs it references, name -> size)."""

    id: int
    size_bytes: int = 0
    pinned: bool = False
    objects: Mapping[str, int] = field(default_factory=dict, hash=False)


def unique_bytes(items: Iterable[RetentionItem]) -> int:
    """Bytes ``items`` take together: their own files, plus each pack they reference counted once."""
    return _UniqueTotal(items).total


class _UniqueTotal:
    """:func:`unique_bytes` of a set of items, kept up to date as items leave it."""

    def __init__(self, items: Iterable[RetentionItem]):
        self.total = 0
        self._uses: Counter[str] = Counter()
        for item in items:
            self.total += item.size_bytes
            for name, size in item.objects.items():
                if not self._uses[name]:
                    self.total += size
                self._uses[name] += 1

    def remove(self, item: RetentionItem) -> None:
        """Take ``item`` out: its file, and each pack no remaining item references."""
        self.total -= item.size_bytes
        for name, size in item.objects.items():
            self._uses[name] -= 1
            if not self._uses[name]:
                self.total -= size


def protected_ids(
    items: Sequence[RetentionItem],
    *,
    best_source_id: int | None = None,
    newest_good_id: int | None = None,
) -> set[int]:
    """Ids no rule may delete: pinned ones, the best model's source, and the newest good one.

    ``newest_good_id`` defaults to the highest id present (the checkpoint resume would use).
    """
    ids = {item.id for item in items}
    keep = {item.id for item in items if item.pinned}
    if best_source_id is not None and best_source_id in ids:
        keep.add(best_source_id)
    if newest_good_id is None and ids:
        newest_good_id = max(ids)
    if newest_good_id is not None and newest_good_id in ids:
        keep.add(newest_good_id)
    return keep


def protection_reasons(
    items: Sequence[RetentionItem],
    *,
    best_source_id: int | None = None,
    newest_good_id: int | None = None,
) -> dict[int, str]:
    """Why each id of :func:`protected_ids` is kept (``"pinned, best model's source"``), for the plan shown to the user."""
    newest = newest_good_id if newest_good_id is not None else max((i.id for i in items), default=None)
    reasons: dict[int, str] = {}
    for item in items:
        if item.id not in protected_ids(items, best_source_id=best_source_id, newest_good_id=newest_good_id):
            continue
        why = ["pinned"] if item.pinned else []
        if item.id == best_source_id:
            why.append("best model's source")
        if item.id == newest:
            why.append("newest verified" if newest_good_id is not None else "newest (none verifies)")
        reasons[item.id] = ", ".join(why)
    return reasons


def should_keep(
    items: Sequence[RetentionItem],
    *,
    keep_last: int | None = None,
    max_total_bytes: int | None = None,
    best_source_id: int | None = None,
    newest_good_id: int | None = None,
) -> list[bool]:
    """Return, aligned with ``items``, whether each checkpoint survives.

    - ``keep_last``: the ``keep_last`` highest ids survive (must be >= 1 when given).
    - ``max_total_bytes``: after that, the oldest unprotected survivors are dropped until
      the survivors' :func:`unique_bytes` fit (it may not fit if protected ones alone exceed it).
    - Protected ids (pinned, best source, newest good) always survive.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    if max_total_bytes is not None and max_total_bytes < 0:
        raise ValueError(f"max_total_bytes must be >= 0, got {max_total_bytes}")
    protected = protected_ids(items, best_source_id=best_source_id, newest_good_id=newest_good_id)
    by_age = sorted(items, key=lambda item: item.id)
    survivors = {item.id for item in by_age}
    if keep_last is not None:
        survivors = {item.id for item in by_age[-keep_last:]} | protected
    if max_total_bytes is not None:
        kept = _UniqueTotal(item for item in by_age if item.id in survivors)
        for item in by_age:
            if kept.total <= max_total_bytes:
                break
            if item.id in survivors and item.id not in protected:
                survivors.discard(item.id)
                kept.remove(item)
    return [item.id in survivors for item in items]


def ids_to_delete(items: Iterable[RetentionItem], **rules) -> list[int]:
    """The ids :func:`should_keep` drops, oldest first."""
    items = list(items)
    return sorted(item.id for item, keep in zip(items, should_keep(items, **rules)) if not keep)
