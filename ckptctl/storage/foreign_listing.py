"""What ``ckptctl ls`` shows of a folder ckptctl did not write, read cheaply and without torch.

Per entry, only small records are read, never tensor data:

- a torch file (``.pt``/``.pth``/``.ckpt``): its pickled record (``data.pkl``), unpickled by
  :mod:`ckptctl.storage.torchfile`, which runs none of the file's code; epoch, batch,
  global step and metrics from its top-level keys (the guide's and ckptctl's files), and
  for Lightning the ``ModelCheckpoint`` callback's monitor, mode and scores;
- a ``.safetensors`` file: its header (tensor count; it holds no positions);
- a Trainer ``checkpoint-N/`` folder: its ``trainer_state.json`` (global step, epoch,
  the last value of each logged metric, ``best_metric``, ``best_model_checkpoint``).

A record that cannot be read cheaply (too large, not a zip archive, damaged) leaves the
fields empty: ``verify`` is the judge of a file. The frozen :class:`GroupListing` has the
``ls --json`` shape of a ckptctl run plus ``kind``, a ``name``/``format``/``files`` per
checkpoint, and ``monitor``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ckptctl.core.format import CHECKPOINT_DIR
from ckptctl.errors import CheckpointIntegrityError, CorruptIndexError, NotFoundError, UnsafePathError
from ckptctl.storage import legacy
from ckptctl.storage.foreign import ForeignEntry, ForeignGroup
from ckptctl.storage.objects import pack_path
from ckptctl.storage.safetensors_header import read_header
from ckptctl.storage.scan import mtime_iso, read_json_file
from ckptctl.storage.torchfile import RecordUnavailable, TorchRecord, read_record, scalar_value

#: ``trainer_state.json`` log keys that are bookkeeping, not metrics.
_HF_NOT_METRICS = ("epoch", "step", "total_flos", "num_input_tokens_seen")
_HF_NOT_METRIC_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


@dataclass(frozen=True)
class EntryInfo:
    """What an entry records about itself (None: not recorded, or not readable cheaply)."""

    epoch: int | float | None = None
    batch: int | None = None
    global_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    timestamp: str | None = None
    monitor: dict[str, Any] | None = None  # Lightning's ModelCheckpoint / the Trainer's best checkpoint
    problem: str | None = None
    record_read: bool = False  # a torch file's record was read (its empty fields are really not recorded)
    missing_objects: tuple[str, ...] = ()  # a ckptctl format-2 skeleton's packs that are not beside it


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _scalars(record: TorchRecord, raw: Any) -> dict[str, float]:
    """The number-valued entries of a metrics mapping (tensors and NumPy scalars read from the archive)."""
    out = {}
    for name, value in (raw.items() if isinstance(raw, Mapping) else ()):
        number = scalar_value(record, value)
        if number is not None and not isinstance(number, bool):
            out[str(name)] = float(number)
    return out


def lightning_monitor(callbacks: Any, number: Callable[[Any], Any]) -> dict[str, Any] | None:
    """The ``ModelCheckpoint`` callback's state in a Lightning checkpoint: monitor, mode, current and best score, best path.

    ``number`` turns a recorded score (a tensor, as read) into a plain number or None.
    """
    for key, state in (callbacks.items() if isinstance(callbacks, Mapping) else ()):
        if isinstance(key, str) and key.startswith("ModelCheckpoint") and isinstance(state, Mapping):
            mode = re.search(r"'mode': '(min|max)'", key)
            best_path = state.get("best_model_path")
            return {
                "metric": state.get("monitor") if isinstance(state.get("monitor"), str) else None,
                "mode": mode.group(1) if mode else None,
                "current_score": _number(number(state.get("current_score"))),
                "best_score": _number(number(state.get("best_model_score"))),
                "best_checkpoint": Path(best_path).name if isinstance(best_path, str) and best_path else None,
            }
    return None


def _torch_info(entry: ForeignEntry) -> EntryInfo:
    """Positions, metrics and (Lightning) the monitor from a torch file's record."""
    try:
        record = read_record(entry.path)
    except RecordUnavailable:
        return EntryInfo(timestamp=mtime_iso(entry.path))
    obj = record.obj if isinstance(record.obj, Mapping) else {}
    monitor = lightning_monitor(obj.get("callbacks"), lambda value: scalar_value(record, value))
    metrics = _scalars(record, obj.get("metrics"))
    if monitor and monitor["metric"] and monitor["current_score"] is not None:
        metrics.setdefault(monitor["metric"], float(monitor["current_score"]))
    missing = _missing_packs(entry.path, obj.get("objects"))
    return EntryInfo(
        epoch=_count(obj.get("epoch")),
        batch=_count(obj.get("batch")),
        global_step=_count(obj.get("global_step")),
        metrics=metrics,
        timestamp=legacy.utc_timestamp(obj.get("timestamp")) or mtime_iso(entry.path),
        monitor=monitor,
        problem=f"{entry.name}: {SKELETON_WITHOUT_OBJECTS}" if missing else None,
        record_read=True,
        missing_objects=missing,
    )


#: Why a ckptctl checkpoint file copied on its own (``cp -r checkpoints/``) cannot be loaded or restored.
SKELETON_WITHOUT_OBJECTS = (
    "a ckptctl checkpoint whose tensors are in the objects/ folder of the run it was copied from, which is not here "
    "(copy or restore the whole run folder)"
)


def _missing_packs(path: Path, names: Any) -> tuple[str, ...]:
    """The packs a format-2 skeleton lists (``objects``) that are missing where its loader looks (:func:`ckptctl.packs_io.run_dir_of`)."""
    if not isinstance(names, list):
        return ()
    run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    missing = []
    for name in names:
        try:
            if not pack_path(run_dir, name).is_file():
                missing.append(str(name))
        except (ValueError, UnsafePathError):
            missing.append(str(name))
    return tuple(missing)


def hf_metrics(log_history: Any) -> dict[str, float]:
    """The last logged value of each metric in a ``trainer_state.json`` ``log_history`` (loss, eval_loss, ...)."""
    metrics: dict[str, float] = {}
    for row in log_history if isinstance(log_history, list) else ():
        for name, value in (row.items() if isinstance(row, dict) else ()):
            if name in _HF_NOT_METRICS or name.endswith(_HF_NOT_METRIC_SUFFIXES) or _number(value) is None:
                continue
            metrics[name] = float(value)
    return metrics


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """A Trainer checkpoint's ``trainer_state.json`` (``{}`` when absent); CorruptIndexError when unreadable."""
    try:
        data = read_json_file(folder / "trainer_state.json")
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise CorruptIndexError("trainer_state.json is not a JSON object")
    return data


def _hf_info(entry: ForeignEntry) -> EntryInfo:
    """Step, epoch, metrics and the best checkpoint from a ``checkpoint-N/`` folder's ``trainer_state.json``."""
    stamp = mtime_iso(entry.path / "trainer_state.json") or mtime_iso(entry.path)
    try:
        state = read_trainer_state(entry.path)
    except CorruptIndexError as exc:
        return EntryInfo(global_step=entry.id, timestamp=stamp, problem=f"{entry.name}: {exc}")
    best = state.get("best_model_checkpoint")
    monitor = None
    if isinstance(best, str) and best:
        monitor = {"metric": None, "mode": None, "current_score": None, "best_score": _number(state.get("best_metric")), "best_checkpoint": Path(best).name}
    step = _count(state.get("global_step"))
    return EntryInfo(
        epoch=_number(state.get("epoch")),
        global_step=step if step is not None else entry.id,
        metrics=hf_metrics(state.get("log_history")),
        timestamp=stamp,
        monitor=monitor,
    )


def entry_info(entry: ForeignEntry) -> EntryInfo:
    """What ``ls`` shows of one entry (see the module docstring)."""
    if entry.format == "hf-checkpoint":
        return _hf_info(entry)
    if entry.format == "safetensors":
        try:
            read_header(entry.path)
        except CheckpointIntegrityError as exc:
            return EntryInfo(timestamp=mtime_iso(entry.path), problem=str(exc))
        return EntryInfo(timestamp=mtime_iso(entry.path))
    return _torch_info(entry)


def _order(pair: tuple[ForeignEntry, EntryInfo]) -> tuple:
    """How entries are ordered, oldest first: by global step, epoch, batch, id, then time and name."""
    entry, info = pair
    key = [info.global_step, info.epoch, info.batch, entry.id]
    return tuple((v is not None, v or 0) for v in key) + (info.timestamp or "", entry.name)


@dataclass(frozen=True)
class GroupListing:
    """A group as ``ls`` shows it (frozen; ``to_json()`` is its ``ls --json`` form, ``"kind"`` included)."""

    group: ForeignGroup
    entries: tuple[tuple[ForeignEntry, EntryInfo], ...]  # oldest first; best_model.pt not among them
    best: tuple[ForeignEntry, EntryInfo] | None
    problems: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The group's name (its folder's or file's)."""
        return self.group.name

    @property
    def path(self) -> Path:
        """The group's folder (or file)."""
        return self.group.path

    @property
    def latest(self) -> ForeignEntry | None:
        """The newest entry (the last in order), or None."""
        return self.entries[-1][0] if self.entries else None

    @property
    def monitor(self) -> dict[str, Any] | None:
        """The newest entry's monitor record (Lightning's ModelCheckpoint, the Trainer's best checkpoint)."""
        return next((info.monitor for _, info in reversed(self.entries) if info.monitor), None)

    def best_source(self) -> str | None:
        """The name of the entry the group's best model is (or was copied from), when known."""
        monitor = self.monitor
        if monitor and monitor.get("best_checkpoint"):
            return next((e.name for e, _ in self.entries if Path(e.name).name == monitor["best_checkpoint"]), None)
        if self.best is not None:
            _, b = self.best
            same = [e.name for e, i in self.entries if b.epoch is not None and (i.epoch, i.batch, i.global_step) == (b.epoch, b.batch, b.global_step)]
            return same[-1] if same else None
        return None

    def to_json(self) -> dict[str, Any]:
        """The ``ls --json`` form: a run's keys (nothing indexed, locked or mirrored) plus ``kind`` and ``monitor``."""
        latest, source = self.latest, self.best_source()
        rows = [_entry_json(e, i, latest is e, e.name == source) for e, i in self.entries]
        best = None
        if self.best is not None:
            entry, info = self.best
            source_id = next((e.id for e, _ in self.entries if e.name == source), None)
            best = {
                "source_id": source_id, "epoch": info.epoch, "batch": info.batch, "metrics": _finite(info.metrics),
                "size_bytes": entry.size_bytes, "path": str(entry.path), "metric": None, "value": None,
                "promoted_by_hand": False, "present": True,
            }
        return {
            "name": self.name, "path": str(self.path), "kind": self.group.kind, "total_bytes": self.group.total_bytes,
            "indexed": False, "locked": False, "status": None, "drive": None,
            "checkpoints": rows, "best": best, "monitor": self.monitor, "problems": list(self.problems),
        }


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _entry_json(entry: ForeignEntry, info: EntryInfo, latest: bool, best_source: bool) -> dict[str, Any]:
    return {
        "id": entry.id, "name": entry.name, "format": entry.format, "epoch": info.epoch, "batch": info.batch,
        "global_step": info.global_step, "metrics": _finite(info.metrics), "size_bytes": entry.size_bytes,
        "timestamp": info.timestamp, "path": str(entry.path), "files": list(entry.files), "checksum": None,
        "pinned": False, "mirrored": False, "indexed": False, "present": True, "latest": latest, "best_source": best_source,
    }


def list_group(group: ForeignGroup) -> GroupListing:
    """Describe every entry of ``group`` cheaply (no torch, no tensor data) and order them oldest first."""
    described = [(e, entry_info(e)) for e in group.entries]
    problems = tuple(info.problem for _, info in described if info.problem)
    best = next((pair for pair in described if pair[0].best), None)
    entries = sorted((pair for pair in described if not pair[0].best), key=_order)
    return GroupListing(group, tuple(entries), best, problems)


def select_entry(listing: GroupListing, which: str | None) -> ForeignEntry:
    """The entry ``which`` names: None for the newest, ``best``, an id (``20`` for ``checkpoint-20``), or a name.

    Raises NotFoundError naming what the group has.
    """
    entries = [e for e, _ in listing.entries] + ([listing.best[0]] if listing.best else [])
    if which is None:
        chosen = listing.latest or (entries[0] if entries else None)
    elif which.lower() == "best":
        source = listing.best_source() if listing.best is None else None
        chosen = listing.best[0] if listing.best else next((e for e in entries if e.name == source), None)
    elif which.isdigit():
        chosen = next((e for e in entries if e.id == int(which)), None)
    else:
        chosen = next((e for e in entries if which in (e.name, Path(e.name).name)), None)
    if chosen is None:
        if not entries:
            raise NotFoundError(f"{listing.path}: has no checkpoints")
        if which.lower() == "best":
            raise NotFoundError(f"{listing.path}: has no best model (no best_model.pt, and its files name no best checkpoint)")
        have = ", ".join(e.name for e in entries[:8]) + (" ..." if len(entries) > 8 else "")
        raise NotFoundError(f"{listing.path}: no checkpoint {which} (it has {have})")
    return chosen
