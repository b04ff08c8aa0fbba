"""Runs written by other code in our layout (the Colab guide's own ``model_persistence.py``).

The guide wrote ``checkpoints/checkpoint_NNNNN.pt`` as plain ``torch.save`` dicts
(``epoch``, ``batch``, ``metrics``, ``timestamp`` and one entry per component; no
``format_version``, ``global_step``, ``rng`` or ``components``) and its own JSON:

- ``checkpoint_metadata.json``: ``{"0": {"epoch", "batch", "metrics", "timestamp"}, ...}``
- ``best_metadata.json``: ``{"epoch", "batch", "metrics", "metric_tracked", "timestamp"}``
- ``training_state.json``: ``{"epoch", "batch", "total_batches", "checkpoint_id", "timestamp"}``

This module recognises those schemas (read-only), keeps the user's bytes aside
(:func:`keep_legacy_copy`, before ckptctl rewrites a file) and turns a legacy entry into
our fields. No torch: payloads arrive here already loaded, as plain dicts.

The ``global_step`` rule (these files never stored one): a checkpoint's global step is
the number of batches completed, ``epoch * batches_per_epoch + batch + 1``, where
``batches_per_epoch`` is ``training_state.json``'s ``total_batches`` when it is an
integer larger than every batch index seen (the guide stored the epoch's length
there), else 1 + the largest batch index among the guide's checkpoints (exact for a
guide that saved at every epoch's end; otherwise a lower bound that still orders the
checkpoints as the guide wrote them). The rule used is recorded in each adopted
entry's ``extra["legacy"]``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from ckptctl.core.format import BEST_METADATA_FILE, INDEX_FILE, TRAINING_STATE_FILE
from ckptctl.core.manifest import CheckpointEntry, Index
from ckptctl.errors import CorruptIndexError
from ckptctl.storage.atomic import atomic_write_bytes, open_regular

#: A user's metadata file is kept as ``<name>.legacy`` (``.legacy-2``, ... when taken).
LEGACY_SUFFIX = ".legacy"

#: The key under an adopted entry's ``extra`` describing where its fields came from.
EXTRA_KEY = "legacy"


@dataclass(frozen=True)
class LegacyEntry:
    """One checkpoint (or the best model) as other code described it; unknown fields are None."""

    epoch: int | None = None
    batch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    timestamp: str | None = None
    metric: str | None = None  # best_metadata.json's ``metric_tracked``

    @property
    def value(self) -> float | None:
        """The tracked metric's value, when there is one."""
        return self.metrics.get(self.metric) if self.metric else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _metrics(raw: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if not isinstance(raw, Mapping):
        return out
    for name, value in raw.items():
        if hasattr(value, "item"):  # a tensor in a payload
            try:
                value = value.item()
            except (TypeError, ValueError, RuntimeError):
                continue
        if value is None:
            out[str(name)] = math.nan
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(name)] = float(value)
    return out


def utc_timestamp(value: Any) -> str | None:
    """An ISO timestamp as ours are stored (UTC, explicit offset); a naive one is taken as UTC.

    The guide wrote ``datetime.now().isoformat()``: local time without an offset, which
    on Colab is UTC (and ckptctl reads naive times as UTC everywhere). None if unparseable.
    """
    if not isinstance(value, str):
        return None
    try:
        when = _dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).isoformat(timespec="microseconds")


def _entry(raw: Mapping[str, Any]) -> LegacyEntry:
    metric = raw.get("metric_tracked")
    return LegacyEntry(
        epoch=_int(raw.get("epoch")),
        batch=_int(raw.get("batch")),
        metrics=_metrics(raw.get("metrics")),
        timestamp=utc_timestamp(raw.get("timestamp")),
        metric=metric if isinstance(metric, str) else None,
    )


# --------------------------------------------------------------------------- recognising


def guide_index_entries(data: Any) -> dict[int, LegacyEntry] | None:
    """The entries of a guide ``checkpoint_metadata.json`` by id, or None if ``data`` is not one.

    A guide index is an object without ``format_version`` whose keys are all ids
    (``"0"``, ``"1"``, ...) and whose values are all objects; ``{}`` is one with no entries.
    """
    if not isinstance(data, dict) or "format_version" in data:
        return None
    entries: dict[int, LegacyEntry] = {}
    for key, value in data.items():
        if not (isinstance(key, str) and key.isdigit() and key.isascii()) or not isinstance(value, dict):
            return None
        entries[int(key)] = _entry(value)
    return entries


def guide_best(data: Any) -> LegacyEntry | None:
    """A guide ``best_metadata.json`` as a :class:`LegacyEntry`, or None if ``data`` is not one."""
    if not isinstance(data, dict) or "format_version" in data or "checksum" in data:
        return None
    if not any(key in data for key in ("epoch", "batch", "metrics", "metric_tracked")):
        return None
    return _entry(data)


def is_foreign_training_state(data: Any) -> bool:
    """True for a ``training_state.json`` object that ckptctl did not write (no ``format_version``)."""
    return isinstance(data, dict) and "format_version" not in data


def _read(path: Path) -> Any:
    from ckptctl.storage.scan import read_json_file  # scan imports this module

    try:
        return read_json_file(path)
    except (FileNotFoundError, NotADirectoryError, CorruptIndexError):
        return None


def read_guide_index(run_dir: str | os.PathLike) -> dict[int, LegacyEntry] | None:
    """The run's ``checkpoint_metadata.json`` if it is a guide index (read-only), else None."""
    return guide_index_entries(_read(Path(run_dir) / INDEX_FILE))


def read_guide_best(run_dir: str | os.PathLike) -> LegacyEntry | None:
    """The run's ``best_metadata.json`` if it is a guide one (read-only), else None."""
    return guide_best(_read(Path(run_dir) / BEST_METADATA_FILE))


def read_foreign_training_state(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``training_state.json`` if other code wrote it (read-only), else None."""
    data = _read(Path(run_dir) / TRAINING_STATE_FILE)
    return data if is_foreign_training_state(data) else None


# --------------------------------------------------------------------------- keeping the user's bytes


def keep_legacy_copy(path: str | os.PathLike) -> Path | None:
    """Copy ``path``'s bytes durably to ``<name>.legacy`` before ckptctl replaces the file; return the copy.

    The copy goes to a temporary name, is fsynced, renamed and the folder fsynced
    (:func:`ckptctl.storage.atomic.atomic_write_bytes`). An existing ``.legacy`` with the
    same bytes is reused; one with other bytes is never overwritten: the copy goes to
    ``.legacy-2``, ``.legacy-3``, ... instead. The caller holds the run lock. None when
    ``path`` is absent.
    """
    path = Path(path)
    try:
        with os.fdopen(open_regular(path), "rb") as f:  # only a regular file's bytes (never a FIFO's wait)
            data = f.read()
    except FileNotFoundError:
        return None
    n = 1
    while True:
        candidate = path.with_name(path.name + LEGACY_SUFFIX + ("" if n == 1 else f"-{n}"))
        if not (candidate.exists() or candidate.is_symlink()):
            atomic_write_bytes(candidate, data)
            return candidate
        if candidate.is_file() and not candidate.is_symlink() and candidate.read_bytes() == data:
            return candidate
        n += 1


# --------------------------------------------------------------------------- our fields from theirs


@dataclass(frozen=True)
class StepRule:
    """``global_step = epoch * batches_per_epoch + batch + 1``; ``source`` says where the epoch length came from."""

    batches_per_epoch: int
    source: str

    def step(self, epoch: int, batch: int) -> int:
        """The global step (batches completed) after ``batch`` of ``epoch``."""
        return epoch * self.batches_per_epoch + batch + 1

    def describe(self) -> str:
        """The rule as recorded in ``extra["legacy"]``."""
        return f"epoch * {self.batches_per_epoch} + batch + 1 ({self.source})"


def step_rule(positions: Iterable[tuple[int | None, int | None]], training_state: Mapping[str, Any] | None) -> StepRule:
    """The :class:`StepRule` for checkpoints at ``positions`` (see the module docstring)."""
    batches = [b for _, b in positions if b is not None]
    state = training_state if is_foreign_training_state(training_state) else {}
    if _int(state.get("batch")) is not None:
        batches.append(state["batch"])
    largest = max(batches, default=0)
    total = _int(state.get("total_batches"))
    if total is not None and total > largest:
        return StepRule(total, "training_state.json total_batches")
    return StepRule(largest + 1, "largest batch index seen + 1")


def is_foreign_payload(payload: Mapping[str, Any]) -> bool:
    """True for a checkpoint dict other code wrote: no ``format_version`` and no ``global_step``."""
    return "format_version" not in payload and "global_step" not in payload


def entry_from_payload(
    checkpoint_id: int,
    relpath: str,
    payload: Mapping[str, Any],
    described: LegacyEntry | None,
    size_bytes: int,
    checksum: str,
    now: str,
) -> CheckpointEntry | None:
    """Our index entry for a foreign checkpoint file, or None when its position is unknown.

    Epoch, batch, metrics and timestamp come from the payload, else from the guide's
    metadata entry ``described``; a missing timestamp becomes ``now``. ``global_step``
    is 0 here until :func:`assign_global_steps` applies the rule to all adopted entries.
    """
    described = described or LegacyEntry()
    epoch = _int(payload.get("epoch"))
    batch = _int(payload.get("batch"))
    epoch = described.epoch if epoch is None else epoch
    batch = described.batch if batch is None else batch
    if epoch is None or batch is None:
        return None
    metrics = _metrics(payload.get("metrics")) or dict(described.metrics)
    timestamp = utc_timestamp(payload.get("timestamp")) or described.timestamp or now
    return CheckpointEntry(
        id=checkpoint_id,
        path=relpath,
        epoch=epoch,
        batch=batch,
        global_step=0,
        metrics=metrics,
        timestamp=timestamp,
        size_bytes=size_bytes,
        checksum=checksum,
        extra={EXTRA_KEY: {"written_by": "other code", "global_step": None}},
    )


def is_legacy_entry(entry: CheckpointEntry) -> bool:
    """True for an index entry adopted from a foreign file."""
    return isinstance(entry.extra.get(EXTRA_KEY), dict)


def assign_global_steps(entries: list[CheckpointEntry], training_state: Mapping[str, Any] | None) -> list[CheckpointEntry]:
    """Give the foreign entries among ``entries`` their global step by one :class:`StepRule`."""
    foreign = [e for e in entries if is_legacy_entry(e)]
    if not foreign:
        return entries
    rule = step_rule(((e.epoch, e.batch) for e in foreign), training_state)
    out = []
    for e in entries:
        if is_legacy_entry(e):
            info = {**e.extra[EXTRA_KEY], "global_step": rule.describe(), "batches_per_epoch": rule.batches_per_epoch}
            e = replace(e, global_step=rule.step(e.epoch, e.batch), extra={**e.extra, EXTRA_KEY: info})
        out.append(e)
    return out


def global_step_at(index: Index, epoch: Any, batch: Any) -> int | None:
    """The global step of a foreign payload at ``(epoch, batch)``, from the index.

    The entry at that position if there is one, else the rule recorded in the index's
    adopted entries; None when neither applies.
    """
    epoch, batch = _int(epoch), _int(batch)
    if epoch is None or batch is None:
        return None
    for entry in reversed(index.checkpoints):
        if (entry.epoch, entry.batch) == (epoch, batch):
            return entry.global_step
    for entry in reversed(index.checkpoints):
        per_epoch = entry.extra.get(EXTRA_KEY, {}).get("batches_per_epoch") if is_legacy_entry(entry) else None
        if _int(per_epoch):
            return epoch * per_epoch + batch + 1
    return None


def guide_global_steps(entries: Mapping[int, LegacyEntry], training_state: Mapping[str, Any] | None) -> dict[int, int]:
    """Read-only view for listings: the global step each guide entry would get when adopted."""
    known = {i: e for i, e in entries.items() if e.epoch is not None and e.batch is not None}
    rule = step_rule(((e.epoch, e.batch) for e in known.values()), training_state)
    return {i: rule.step(e.epoch, e.batch) for i, e in known.items()}
