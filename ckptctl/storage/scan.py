"""Reading runs without torch: find run directories, read their metadata, list checkpoint files.

Scanning never raises because of one bad file: problems are collected in
:attr:`RunScan.problems` and the rest is still reported.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ckptctl.core.format import (
    BEST_METADATA_FILE,
    CHECKPOINT_DIR,
    INDEX_FILE,
    TRAINING_STATE_FILE,
    parse_checkpoint_filename,
)
from ckptctl.core.manifest import BestInfo, BestRecord, Index
from ckptctl.errors import CorruptIndexError, NotRegularFileError, UnsafePathError
from ckptctl.storage.atomic import open_regular
from ckptctl.storage import legacy

#: Metadata files larger than this are refused rather than parsed.
MAX_METADATA_BYTES = 64 * 1024 * 1024


def read_json_file(path: str | os.PathLike, max_bytes: int = MAX_METADATA_BYTES) -> Any:
    """Parse a metadata JSON file, refusing huge, non-UTF-8, or absurdly nested content.

    Raises FileNotFoundError if absent, :class:`CorruptIndexError` if unreadable or invalid.
    """
    path = Path(path)
    try:
        # opened, then judged by fstat: a FIFO or a device never blocks the read (nor is swapped in after a check)
        with os.fdopen(open_regular(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise CorruptIndexError(f"{path.name}: {size} bytes is larger than the {max_bytes}-byte limit")
            raw = f.read(max_bytes + 1)
    except (FileNotFoundError, CorruptIndexError):
        raise
    except NotRegularFileError as exc:
        raise CorruptIndexError(f"{path.name}: {exc.strerror}") from None
    except OSError as exc:
        raise CorruptIndexError(f"{path.name}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:  # grew after the fstat
        raise CorruptIndexError(f"{path.name}: larger than the {max_bytes}-byte limit")
    try:
        # NaN / Infinity are not JSON (Python writes them, other readers reject them): read
        # them as null, so whatever ckptctl writes back stays valid JSON.
        return json.loads(raw.decode("utf-8"), parse_constant=lambda _name: None)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptIndexError(f"{path.name}: not valid JSON ({exc.__class__.__name__})") from None
    except RecursionError:
        raise CorruptIndexError(f"{path.name}: JSON nested too deeply") from None


def read_index(run_dir: str | os.PathLike) -> Index:
    """Read ``checkpoint_metadata.json``; FileNotFoundError if absent, CorruptIndexError if bad."""
    run_dir = Path(run_dir)
    return Index.from_dict(read_json_file(run_dir / INDEX_FILE), default_run_name=run_dir.name)


def read_best_record(run_dir: str | os.PathLike) -> BestRecord | None:
    """Read ``best_metadata.json`` whole (committed and pending record); None if absent, CorruptIndexError/UnsafePathError if bad.

    For readers that check ``best_model.pt``'s bytes: during a replace (or after a crash
    in one) the file matches the committed or the pending record.
    """
    try:
        data = read_json_file(Path(run_dir) / BEST_METADATA_FILE)
    except FileNotFoundError:
        return None
    return BestRecord.from_dict(data)


def read_best(run_dir: str | os.PathLike) -> BestInfo | None:
    """The committed best-model record of ``best_metadata.json``; None if absent (or not committed yet), CorruptIndexError/UnsafePathError if bad."""
    record = read_best_record(run_dir)
    return record.current if record is not None else None


def read_training_state(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Read ``training_state.json``; None if absent or unreadable."""
    try:
        data = read_json_file(Path(run_dir) / TRAINING_STATE_FILE)
    except (FileNotFoundError, CorruptIndexError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_files_on_disk(run_dir: str | os.PathLike) -> dict[int, Path]:
    """Map id -> path for every committed ``checkpoints/checkpoint_NNNNN.pt`` regular file.

    Temporaries, symlinks (and a symlinked ``checkpoints/``) and anything not named like a
    checkpoint are ignored.
    """
    return _checkpoint_files_and_sizes(run_dir)[0]


def regular_files_named(folder: str | os.PathLike, key_of: Callable[[str], Any]) -> dict[Any, tuple[Path, int]]:
    """``{key_of(name): (path, size)}`` of the regular files directly in ``folder`` whose name ``key_of`` accepts (not None).

    One ``scandir`` (its cached lstat): symlinks, folders and other non-regular files are
    left out; a folder that cannot be read gives nothing.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return {}
    found = {}
    for entry in entries:
        key = key_of(entry.name)
        if key is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            found[key] = (Path(entry.path), st.st_size)
    return found


def _checkpoint_files_and_sizes(run_dir: str | os.PathLike) -> tuple[dict[int, Path], dict[int, int]]:
    """:func:`checkpoint_files_on_disk` and each file's size, from one ``scandir`` (its cached lstat)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if folder.is_symlink():
        return {}, {}  # a checkpoints/ link may lead anywhere: nothing under it is listed
    files = regular_files_named(folder, parse_checkpoint_filename)
    return {i: path for i, (path, _) in files.items()}, {i: size for i, (_, size) in files.items()}


def checkpoint_names_present(run_dir: str | os.PathLike) -> set[int]:
    """Ids of every name in ``checkpoints/`` that looks like a checkpoint, whatever it is (files, symlinks...)."""
    try:
        names = os.listdir(Path(run_dir) / CHECKPOINT_DIR)
    except OSError:
        return set()
    return {i for i in map(parse_checkpoint_filename, names) if i is not None}


def is_run_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds an index, or (a run copied by hand) a ``checkpoints/`` folder of checkpoints.

    An index the Colab guide wrote beside its checkpoint files, with no ``checkpoints/``
    folder (its flat Drive folder), is not a run: it is a group of loose files
    (:mod:`ckptctl.storage.foreign`).
    """
    path = Path(path)
    try:
        folder = path / CHECKPOINT_DIR
        if (path / INDEX_FILE).is_file():
            return folder.is_dir() or legacy.read_guide_index(path) is None
        if folder.is_dir() and not folder.is_symlink():
            return any(parse_checkpoint_filename(n) is not None for n in os.listdir(folder))
    except OSError:
        return False
    return False


def find_runs(path: str | os.PathLike) -> list[Path]:
    """The run directories at ``path``: itself if it is a run, else its run subfolders (one level).

    Raises FileNotFoundError if ``path`` does not exist, NotADirectoryError if it is a file.
    Symlinked subfolders are not followed. Sorted by name.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a directory")
    if is_run_dir(path):
        return [path]
    runs = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        try:
            if entry.is_dir(follow_symlinks=False) and is_run_dir(entry.path):
                runs.append(Path(entry.path))
        except OSError:
            continue
    return runs


@dataclass
class RunScan:
    """What could be read cheaply (no torch, no checkpoint payloads) about one run."""

    path: Path
    name: str
    index: Index | None = None
    best: BestInfo | None = None
    training_state: dict[str, Any] | None = None
    unindexed: dict[int, int] = field(default_factory=dict)  # id -> size of files not in the index
    #: Every committed checkpoint file (:func:`checkpoint_files_on_disk`) and its size, from one directory scan.
    on_disk: dict[int, Path] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: Metadata other code wrote (the Colab guide's): not a usable ckptctl index or best
    #: record, but not corrupt either; its per-id entries describe the unindexed files.
    legacy_entries: dict[int, Any] = field(default_factory=dict)  # id -> legacy.LegacyEntry
    legacy_index: bool = False
    legacy_best: Any = None  # legacy.LegacyEntry of best_metadata.json


def scan_run(run_dir: str | os.PathLike) -> RunScan:
    """Read one run's metadata and list its files; collect problems instead of raising."""
    run_dir = Path(run_dir)
    scan = RunScan(path=run_dir, name=run_dir.name)
    try:
        scan.index = read_index(run_dir)
        for raw_id, reason in scan.index.skipped:
            scan.problems.append(f"index entry {raw_id!r} skipped: {reason}")
    except FileNotFoundError:
        pass
    except CorruptIndexError as exc:
        guide = legacy.read_guide_index(run_dir)
        if guide is None:
            scan.problems.append(str(exc))
        else:  # written by other code: like a run without an index, described by its entries
            scan.legacy_index, scan.legacy_entries = True, guide
    try:
        scan.best = read_best(run_dir)
    except (CorruptIndexError, UnsafePathError) as exc:
        scan.legacy_best = legacy.read_guide_best(run_dir)
        if scan.legacy_best is None:
            scan.problems.append(f"{BEST_METADATA_FILE}: {exc}")
    scan.training_state = read_training_state(run_dir)
    indexed = set(scan.index.by_id()) if scan.index else set()
    deleting = set(scan.index.deleting) if scan.index else set()  # an interrupted removal's leftovers: already gone
    scan.on_disk, scan.sizes = _checkpoint_files_and_sizes(run_dir)
    for checkpoint_id, size in scan.sizes.items():
        if checkpoint_id not in indexed and checkpoint_id not in deleting:
            scan.unindexed[checkpoint_id] = size
    return scan


def _run_activity(run_dir: Path) -> _dt.datetime:
    """Time of the run's latest recorded activity, from its own metadata (the minimum if none)."""
    times = []
    state = read_training_state(run_dir) or {}
    if isinstance(state.get("updated_at"), str):
        times.append(state["updated_at"])
    try:
        latest = read_index(run_dir).latest
        if latest is not None:
            times.append(latest.timestamp)
    except (FileNotFoundError, CorruptIndexError):
        guide = legacy.read_guide_index(run_dir)  # the guide's own index dates its checkpoints too
        times += [entry.timestamp for entry in (guide or {}).values() if entry.timestamp]
    newest = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    for value in times:
        try:
            stamp = _dt.datetime.fromisoformat(value)
        except ValueError:
            continue
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=_dt.timezone.utc)
        newest = max(newest, stamp)
    return newest


def newest_run(path: str | os.PathLike) -> Path | None:
    """The run in the folder ``path`` with the most recent activity by its own metadata: the one policy.

    Activity is the later of ``training_state.json``'s ``updated_at`` and the newest
    checkpoint's timestamp in the index (ours or the guide's), never file modification
    times (a copy or a restore changes those). Ties go to the greater name. None when
    ``path`` holds no run. Used by ``trainloop --resume`` and ``restore --from-drive``.
    """
    try:
        return newest_of(find_runs(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def newest_of(runs: list[Path]) -> Path | None:
    """The newest of ``runs`` by the policy of :func:`newest_run`; None for none."""
    return max(runs, key=lambda run: (_run_activity(run), run.name), default=None)


def mtime_iso(path: Path) -> str | None:
    """``path``'s modification time as UTC ISO text, for display only (never to order anything); None if unreadable."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    return _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).isoformat(timespec="microseconds")
