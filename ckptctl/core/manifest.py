"""The index (``checkpoint_metadata.json``) and ``best_metadata.json``, as dataclasses.

Conversion to and from plain dicts validates shape and types so that a hand-edited or
hostile file becomes a :class:`CorruptIndexError` (or an entry reported as unsafe),
never an exception deep inside a reader. Pure: no IO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from ckptctl.core.format import BEST_MODEL_FILE, FORMAT_VERSION, check_relative_path, checkpoint_relpath
from ckptctl.core.objects import read_objects_field
from ckptctl.errors import CorruptIndexError, UnsafePathError

#: Checksum algorithms the readers understand; writers use the first. xxh3_128 detects
#: corruption (not tampering: ``weights_only`` loading is the safety against hostile
#: files) at over 10 GB/s, so hashing never limits a save or a verify; sha256 stays readable.
CHECKSUM_ALGORITHMS = ("xxh3_128", "sha256")

#: At most this many retired ids are remembered (the newest); older ones the mirror
#: has not deleted by then are left to its byte budget.
MAX_RETIRED = 1000


def format_checksum(algorithm: str, hexdigest: str) -> str:
    """Return the stored form of a checksum, ``"<algorithm>:<hex>"``."""
    return f"{algorithm}:{hexdigest}"


def parse_checksum(value: str) -> tuple[str, str]:
    """Split a stored checksum into ``(algorithm, hexdigest)``; raise ValueError if malformed."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"malformed checksum {value!r}")
    algorithm, hexdigest = value.split(":", 1)
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    if not hexdigest or any(c not in "0123456789abcdef" for c in hexdigest):
        raise ValueError(f"malformed checksum digest {hexdigest!r}")
    return algorithm, hexdigest


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Return ``metrics`` as ``{str: float}``; anything with ``float()`` (tensors too) is accepted."""
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        try:
            if hasattr(value, "item"):
                value = value.item()
            out[str(name)] = float(value)
        except (TypeError, ValueError, RuntimeError) as exc:  # a string, a tensor of many values...
            raise ValueError(f"metrics[{name!r}] is not a number ({type(value).__name__}: {exc})") from None
    return out


def check_extra(extra: Mapping[str, Any] | None, where: str = "extra") -> dict[str, Any]:
    """Return ``extra`` as a plain dict after checking it holds only JSON values; raise ValueError naming what is wrong.

    ``extra`` goes into the index (JSON) and into the checkpoint file (loaded with
    ``weights_only=True``), so it may hold only ``str``, ``int``, finite ``float``,
    ``bool``, ``None``, lists and dicts with string keys: no NaN (write it as None, or
    put it in ``metrics``), no tensors or NumPy scalars (convert with ``float()``).
    """
    return _json_extra(extra, where, problems=None)


def salvage_extra(extra: Any, where: str = "extra") -> tuple[dict[str, Any], list[str]]:
    """``extra`` read back from a file written before it was checked: JSON values kept, others replaced by None.

    Returns the cleaned dict and what was replaced (for a warning), so such a file can
    still be indexed and resumed.
    """
    problems: list[str] = []
    return _json_extra(extra, where, problems), problems


def _json_extra(extra: Any, where: str, problems: list[str] | None) -> dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        _reject(f"{where} must be a dict of JSON values, got {type(extra).__name__}", problems)
        return {}
    cleaned = _json_value(dict(extra), where, problems)
    return cleaned if isinstance(cleaned, dict) else {}


def _reject(message: str, problems: list[str] | None) -> None:
    if problems is None:
        raise ValueError(message)
    problems.append(message)


def _json_value(value: Any, where: str, problems: list[str] | None) -> Any:
    if value is None or isinstance(value, str) or type(value) in (int, bool):
        return value
    if type(value) is float:
        if math.isfinite(value):
            return value
        _reject(f"{where} is {value!r}: JSON has no NaN or infinity (store None, or put it in metrics)", problems)
        return None
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                _reject(f"{where} has the key {key!r}: keys must be strings", problems)
                continue
            out[key] = _json_value(item, f"{where}[{key!r}]", problems)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{where}[{i}]", problems) for i, item in enumerate(value)]
    kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
    _reject(
        f"{where} is a {kind}: extra holds JSON values only (numbers, strings, lists, dicts); "
        "convert it (float(x), x.item(), x.tolist()) or save tensors as a component",
        problems,
    )
    return None


def _json_metrics(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """JSON cannot hold NaN/inf portably: store them as None."""
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise CorruptIndexError(f"{what}: field {key!r} is missing or not {getattr(kind, '__name__', kind)}")
    return value


def _read_metrics(raw: Any, what: str) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CorruptIndexError(f"{what}: 'metrics' is not an object")
    out = {}
    for k, v in raw.items():
        if v is None:
            out[str(k)] = math.nan
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
        else:
            raise CorruptIndexError(f"{what}: metric {k!r} is not a number")
    return out


def mirrored_record(checksum: str, size_bytes: int, at: str, mirror: str) -> dict[str, Any]:
    """An entry's ``mirrored`` field: the copy verified on the Drive mirror folder ``mirror`` (checksum, size, when)."""
    return {"checksum": checksum, "size_bytes": size_bytes, "at": at, "mirror": mirror}


def _read_file_record(data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The fields every file record (an index entry, the best model's) shares: position, metrics, time, size, checksum."""
    checksum = _require(data, "checksum", str, what)
    try:
        parse_checksum(checksum)
    except ValueError as exc:
        raise CorruptIndexError(f"{what}: {exc}") from None
    try:
        objects = read_objects_field(data.get("objects"), what)
    except ValueError as exc:
        raise CorruptIndexError(str(exc)) from None
    state_bytes = data.get("state_bytes")
    return {
        "epoch": _require(data, "epoch", int, what),
        "batch": _require(data, "batch", int, what),
        "global_step": _require(data, "global_step", int, what),
        "metrics": _read_metrics(data.get("metrics"), what),
        "timestamp": _require(data, "timestamp", str, what),
        "size_bytes": _require(data, "size_bytes", int, what),
        "checksum": checksum,
        "objects": objects,
        "state_bytes": state_bytes if type(state_bytes) is int and state_bytes >= 0 else None,
    }


def _file_record_dict(record: Any) -> dict[str, Any]:
    """The JSON form of the fields :func:`_read_file_record` reads (non-finite metrics as null)."""
    return {
        "epoch": record.epoch,
        "batch": record.batch,
        "global_step": record.global_step,
        "metrics": _json_metrics(record.metrics),
        "timestamp": record.timestamp,
        "size_bytes": record.size_bytes,
        "checksum": record.checksum,
        **({"objects": dict(record.objects), "state_bytes": record.state_bytes} if record.objects else {}),
    }


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint as recorded in the index."""

    id: int
    path: str
    epoch: int
    batch: int
    global_step: int
    metrics: dict[str, float]
    timestamp: str
    size_bytes: int
    checksum: str
    pinned: bool = False
    mirrored: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Format 2: the packs (``objects/<name>.safetensors``) the file references, name -> size.
    objects: dict[str, int] = field(default_factory=dict)
    #: Format 2: bytes of the full state the checkpoint restores (its file plus the tensors it references).
    state_bytes: int | None = None

    @property
    def full_bytes(self) -> int:
        """Bytes of the full state this checkpoint restores (its file's size in format 1)."""
        return self.state_bytes if self.state_bytes is not None else self.size_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in ``checkpoint_metadata.json``."""
        return {
            "id": self.id,
            "path": self.path,
            **_file_record_dict(self),
            "pinned": self.pinned,
            "mirrored": self.mirrored,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "CheckpointEntry":
        """Parse one index entry; raise CorruptIndexError / UnsafePathError on bad input."""
        if not isinstance(data, dict):
            raise CorruptIndexError("index entry is not an object")
        what = f"index entry {data.get('id')!r}"
        entry_id = _require(data, "id", int, what)
        if entry_id < 0:
            raise CorruptIndexError(f"{what}: negative id")
        path = check_relative_path(data.get("path"))
        if path != checkpoint_relpath(entry_id):  # the file name carries the id: never another checkpoint's file
            raise UnsafePathError(f"{what}: path {path!r} is not the file of checkpoint {entry_id} ({checkpoint_relpath(entry_id)})")
        mirrored = data.get("mirrored")
        extra = data.get("extra") or {}
        return cls(
            id=entry_id,
            path=path,
            **_read_file_record(data, what),
            pinned=bool(data.get("pinned", False)),
            mirrored=mirrored if isinstance(mirrored, dict) else None,
            extra=extra if isinstance(extra, dict) else {},
        )


@dataclass(frozen=True)
class BestInfo:
    """What ``best_metadata.json`` records about ``best_model.pt``."""

    path: str
    source_id: int | None
    epoch: int
    batch: int
    global_step: int
    metrics: dict[str, float]
    timestamp: str
    size_bytes: int
    checksum: str
    metric: str | None
    mode: str
    value: float | None
    promoted_by_hand: bool = False
    #: Format 2: the packs ``best_model.pt`` references (name -> size); see :class:`CheckpointEntry`.
    objects: dict[str, int] = field(default_factory=dict)
    state_bytes: int | None = None

    @property
    def full_bytes(self) -> int:
        """Bytes of the full state the best model restores."""
        return self.state_bytes if self.state_bytes is not None else self.size_bytes

    @classmethod
    def of_model(
        cls,
        *,
        source_id: int | None,
        epoch: int,
        batch: int,
        global_step: int,
        metrics: Mapping[str, float],
        timestamp: str,
        size_bytes: int,
        checksum: str,
        metric: str | None,
        mode: str,
        promoted_by_hand: bool = False,
        objects: Mapping[str, int] | None = None,
        state_bytes: int | None = None,
    ) -> "BestInfo":
        """The record for a freshly written ``best_model.pt``; ``value`` is ``metrics[metric]`` when there."""
        return cls(
            path=BEST_MODEL_FILE,
            source_id=source_id,
            epoch=epoch,
            batch=batch,
            global_step=global_step,
            metrics=dict(metrics),
            timestamp=timestamp,
            size_bytes=size_bytes,
            checksum=checksum,
            metric=metric,
            mode=mode,
            value=metrics.get(metric) if metric else None,
            promoted_by_hand=promoted_by_hand,
            objects=dict(objects or {}),
            state_bytes=state_bytes,
        )

    @classmethod
    def of_checkpoint(
        cls, entry: CheckpointEntry, size_bytes: int, checksum: str, metric: str | None, mode: str, *, promoted_by_hand: bool = False
    ) -> "BestInfo":
        """The record for a ``best_model.pt`` copied from checkpoint ``entry`` (size and checksum of the copy)."""
        return cls.of_model(
            source_id=entry.id,
            epoch=entry.epoch,
            batch=entry.batch,
            global_step=entry.global_step,
            metrics=entry.metrics,
            timestamp=entry.timestamp,
            size_bytes=size_bytes,
            checksum=checksum,
            metric=metric,
            mode=mode,
            promoted_by_hand=promoted_by_hand,
            objects=entry.objects,
            state_bytes=entry.state_bytes,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in ``best_metadata.json``."""
        value = self.value if self.value is not None and math.isfinite(self.value) else None
        return {
            "format_version": FORMAT_VERSION,
            "path": self.path,
            "source_id": self.source_id,
            **_file_record_dict(self),
            "metric": self.metric,
            "mode": self.mode,
            "value": value,
            "promoted_by_hand": self.promoted_by_hand,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "BestInfo":
        """Parse ``best_metadata.json``; raise CorruptIndexError / UnsafePathError on bad input."""
        if not isinstance(data, dict):
            raise CorruptIndexError("best_metadata.json is not an object")
        what = "best_metadata.json"
        _check_version(data, what)
        source_id = data.get("source_id")
        if source_id is not None and (not isinstance(source_id, int) or isinstance(source_id, bool)):
            raise CorruptIndexError(f"{what}: 'source_id' is not an integer")
        record = _read_file_record(data, what)
        value = data.get("value")
        return cls(
            path=check_relative_path(data.get("path")),
            source_id=source_id,
            **record,
            metric=data.get("metric") if isinstance(data.get("metric"), str) else None,
            mode=data.get("mode") if data.get("mode") in ("max", "min") else "max",
            value=float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None,
            promoted_by_hand=bool(data.get("promoted_by_hand", False)),
        )


@dataclass(frozen=True)
class BestRecord:
    """All that ``best_metadata.json`` holds: the committed best model and, during a replace, the pending one.

    Replacing the best model is one commit, the rename of ``best_model.pt``: the new
    record is written first as ``pending`` (next to the old one), then the file is
    renamed over, then the metadata is settled to the new record alone. So whatever a
    reader or a crash sees, ``best_model.pt`` is described by one of the records here;
    :meth:`describing` tells which (by checksum). ``current`` is None while the first best
    model of a run is being written.
    """

    current: BestInfo | None
    pending: BestInfo | None = None

    def candidates(self) -> list[BestInfo]:
        """The records ``best_model.pt`` may match: the committed one first."""
        return [info for info in (self.current, self.pending) if info is not None]

    def checksums(self) -> tuple[str, ...]:
        """The checksums ``best_model.pt`` may have (one outside a replace)."""
        return tuple(dict.fromkeys(info.checksum for info in self.candidates()))

    def describing(self, checksum: str) -> BestInfo | None:
        """The record whose checksum is ``checksum`` (the pending one wins a tie: it is the newer)."""
        for info in reversed(self.candidates()):
            if info.checksum == checksum:
                return info
        return None

    def source_ids(self) -> set[int]:
        """Checkpoint ids any record here was copied from (retention keeps them all)."""
        return {info.source_id for info in self.candidates() if info.source_id is not None}

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: the committed record's fields, plus ``pending`` during a replace."""
        data = self.current.to_dict() if self.current is not None else {"format_version": FORMAT_VERSION}
        if self.pending is not None:
            data["pending"] = self.pending.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "BestRecord":
        """Parse ``best_metadata.json``; raise CorruptIndexError / UnsafePathError on bad input."""
        if not isinstance(data, dict):
            raise CorruptIndexError("best_metadata.json is not an object")
        raw_pending = data.get("pending")
        pending = BestInfo.from_dict(raw_pending) if raw_pending is not None else None
        current = BestInfo.from_dict(data) if pending is None or "checksum" in data else None
        return cls(current, pending)


def _read_ids(raw: Any) -> tuple[int, ...]:
    """A list of ids in an index, sorted; anything that is not a non-negative int is dropped."""
    if not isinstance(raw, list):
        return ()
    return tuple(sorted({v for v in raw if isinstance(v, int) and not isinstance(v, bool) and v >= 0}))


def _read_retired(raw: Any) -> tuple[int, ...]:
    """The ``retired`` list of an index; anything that is not a non-negative int is dropped."""
    return _read_ids(raw)[-MAX_RETIRED:]


def _check_version(data: Mapping[str, Any], what: str) -> None:
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorruptIndexError(f"{what}: missing 'format_version'")
    if version > FORMAT_VERSION:
        raise CorruptIndexError(
            f"{what}: format_version {version} is newer than this ckptctl understands ({FORMAT_VERSION})"
        )


@dataclass(frozen=True)
class Index:
    """The whole ``checkpoint_metadata.json``: the checkpoints in id order and the id counter.

    ``skipped`` holds entries that could not be used (unsafe path, wrong shape), each as
    ``(raw_id, reason)``; they are reported by readers and never touched by writers.
    """

    run_name: str
    next_id: int
    checkpoints: tuple[CheckpointEntry, ...] = ()
    skipped: tuple[tuple[Any, str], ...] = ()
    #: The unusable entries exactly as read, written back unchanged by :meth:`to_dict` so
    #: rewriting an index never silently drops what a person may want to inspect.
    raw_skipped: tuple[Any, ...] = ()
    #: Ids that local retention (the trainer's or ``prune``) removed after they existed in
    #: this run: the only copies the Drive mirror may delete for that reason (it never
    #: deletes a copy the local run never had, e.g. after a partial restore). An id leaves
    #: this list once the mirror reports it gone there.
    retired: tuple[int, ...] = ()
    #: Tombstones: ids whose entries were removed from the index (by ``prune`` or retention)
    #: while their files may still exist. Such a file is never adopted again; whoever opens
    #: the run next (the library, ``prune``) deletes it and clears the tombstone. An id
    #: listed in :attr:`checkpoints` is never a tombstone (the entry wins).
    deleting: tuple[int, ...] = ()

    @property
    def latest(self) -> CheckpointEntry | None:
        """The checkpoint with the highest id, or None."""
        return self.checkpoints[-1] if self.checkpoints else None

    def by_id(self) -> dict[int, CheckpointEntry]:
        """Map id -> entry."""
        return {c.id: c for c in self.checkpoints}

    def with_entries(self, entries: list[CheckpointEntry] | tuple[CheckpointEntry, ...]) -> "Index":
        """Return a copy holding ``entries`` (sorted by id); ``next_id`` never goes down."""
        ordered = tuple(sorted(entries, key=lambda c: c.id))
        next_id = max([self.next_id] + [c.id + 1 for c in ordered])
        listed = {c.id for c in ordered}
        deleting = tuple(i for i in self.deleting if i not in listed)
        return replace(self, checkpoints=ordered, next_id=next_id, deleting=deleting)

    def retire(self, ids: Iterable[int]) -> "Index":
        """Return a copy that records ``ids`` as removed by local retention (see :attr:`retired`)."""
        merged = sorted(set(self.retired) | {int(i) for i in ids})
        return replace(self, retired=tuple(merged[-MAX_RETIRED:]))

    def forget_retired(self, ids: Iterable[int]) -> "Index":
        """Return a copy whose :attr:`retired` no longer holds ``ids`` (gone from the mirror)."""
        gone = {int(i) for i in ids}
        return replace(self, retired=tuple(i for i in self.retired if i not in gone))

    def mark_deleting(self, ids: Iterable[int]) -> "Index":
        """Return a copy with ``ids`` as tombstones (see :attr:`deleting`); ``next_id`` stays above them."""
        listed = self.by_id()
        marked = tuple(sorted(set(self.deleting) | {int(i) for i in ids if int(i) not in listed}))
        return replace(self, deleting=marked, next_id=max([self.next_id] + [i + 1 for i in marked]))

    def forget_deleting(self, ids: Iterable[int]) -> "Index":
        """Return a copy whose :attr:`deleting` no longer holds ``ids`` (their files are gone)."""
        gone = {int(i) for i in ids}
        return replace(self, deleting=tuple(i for i in self.deleting if i not in gone))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in ``checkpoint_metadata.json`` (``deleting`` only while it holds ids)."""
        out = {
            "format_version": FORMAT_VERSION,
            "run_name": self.run_name,
            "next_id": self.next_id,
            "checkpoints": [c.to_dict() for c in self.checkpoints]
            + [raw for raw in self.raw_skipped if not (isinstance(raw, dict) and raw.get("id") in self.by_id())],
            "retired": list(self.retired),
        }
        if self.deleting:
            out["deleting"] = list(self.deleting)
        return out

    @classmethod
    def from_dict(cls, data: Any, default_run_name: str = "") -> "Index":
        """Parse the index. A malformed file raises; a single bad entry is skipped and noted."""
        if not isinstance(data, dict):
            raise CorruptIndexError("checkpoint_metadata.json is not an object")
        what = "checkpoint_metadata.json"
        _check_version(data, what)
        raw_entries = data.get("checkpoints")
        if not isinstance(raw_entries, list):
            raise CorruptIndexError(f"{what}: 'checkpoints' is not a list")
        entries: dict[int, CheckpointEntry] = {}
        skipped: list[tuple[Any, str]] = []
        raw_skipped: list[Any] = []
        for raw in raw_entries:
            raw_id = raw.get("id") if isinstance(raw, dict) else None
            try:
                entry = CheckpointEntry.from_dict(raw)
            except (CorruptIndexError, UnsafePathError) as exc:
                skipped.append((raw_id, str(exc)))
                raw_skipped.append(raw)
                continue
            if entry.id in entries:
                skipped.append((raw_id, f"duplicate id {entry.id} in index"))
                continue
            entries[entry.id] = entry
        next_id = data.get("next_id")
        if not isinstance(next_id, int) or isinstance(next_id, bool) or next_id < 0:
            next_id = 0
        run_name = data.get("run_name") if isinstance(data.get("run_name"), str) else default_run_name
        retired = _read_retired(data.get("retired"))
        deleting = _read_ids(data.get("deleting"))
        return cls(
            run_name=run_name, next_id=0, skipped=tuple(skipped), raw_skipped=tuple(raw_skipped), retired=retired,
            deleting=deleting,
        ).with_entries(
            list(entries.values())
        )._with_next_id_at_least(max([next_id] + [i + 1 for i in deleting]))

    def _with_next_id_at_least(self, next_id: int) -> "Index":
        return replace(self, next_id=max(self.next_id, next_id))
