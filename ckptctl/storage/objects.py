"""Tensor packs on disk (format 2): writing one, reading its header, checking it, and deleting unreferenced ones.

The layout and the accounting are in :mod:`ckptctl.core.objects`; tensors are turned into
bytes (and back) by :mod:`ckptctl.packs_io`, the torch side. Deleting packs is only for
the run's writer (the library while training, ``prune``/``promote`` under the run lock),
and only after the index and best-model record that stopped referencing them are durable.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterable

from ckptctl.core.manifest import parse_checksum
from ckptctl.core.objects import (
    OBJECTS_DIR,
    PACK_SUFFIX,
    PackTensor,
    layout_pack,
    pack_checksum,
    pack_relpath,
    parse_pack_filename,
    parse_pack_header,
)
from ckptctl.errors import CheckpointIntegrityError
from ckptctl.storage.scan import regular_files_named
from ckptctl.storage.atomic import (
    HashingWriter,
    ProgressCallback,
    atomic_write_named,
    fsync_dir,
    matching_checksum,
    open_regular,
    read_failure,
    remove_file,
    resolve_inside,
)

log = logging.getLogger("ckptctl")

#: One tensor to pack: key, safetensors dtype name, shape, and its bytes (any buffer).
PackItem = tuple[str, str, tuple[int, ...], memoryview]


def objects_dir(run_dir: str | os.PathLike) -> Path:
    """The run's ``objects/`` folder."""
    return Path(run_dir) / OBJECTS_DIR


def pack_path(run_dir: str | os.PathLike, name: str) -> Path:
    """The path of pack ``name`` inside ``run_dir`` (never outside it: names are hex digests)."""
    return resolve_inside(run_dir, pack_relpath(name))


def write_pack(run_dir: str | os.PathLike, items: list[PackItem]) -> tuple[str, int]:
    """Write ``items`` as one pack in ``run_dir/objects`` crash-safely; return ``(pack name, size)``."""
    header, layout = layout_pack((key, dtype, shape, len(data)) for key, dtype, shape, data in items)
    data_by_key = {key: data for key, _, _, data in items}

    def body(writer: HashingWriter) -> None:
        writer.write(header)
        for tensor in layout:
            if tensor.end > tensor.start:
                writer.write(data_by_key[tensor.key])

    folder = objects_dir(run_dir)
    folder.mkdir(exist_ok=True)
    path, size, checksum = atomic_write_named(folder, lambda cs: parse_checksum(cs)[1] + PACK_SUFFIX, body)
    return parse_pack_filename(path.name), size


def read_pack_header(path: str | os.PathLike) -> tuple[int, dict[str, PackTensor]]:
    """The layout of the pack at ``path`` (checked against its size): ``(data_start, {key: PackTensor})``.

    Raises :class:`CheckpointIntegrityError` (``missing`` or ``corrupt``) naming the pack.
    """
    path = Path(path)
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            header = f.read(min(length, size))
    except OSError as exc:
        raise read_failure(f"{OBJECTS_DIR}/{path.name}", exc) from None
    try:
        return parse_pack_header(prefix, header, size)
    except ValueError as exc:
        raise CheckpointIntegrityError(f"{OBJECTS_DIR}/{path.name}: {exc}") from None


class PackChecks:
    """Checksums of packs, each computed once per instance (a pack shared by many checkpoints is read once).

    A failure is remembered and raised again for every checkpoint that references the pack.
    """

    def __init__(self) -> None:
        self._results: dict[Path, CheckpointIntegrityError | None] = {}
        self._lock = threading.Lock()

    def check(self, run_dir: str | os.PathLike, name: str, on_progress: ProgressCallback = None) -> None:
        """Raise :class:`CheckpointIntegrityError` unless pack ``name`` of ``run_dir`` has the bytes its name says."""
        path = pack_path(run_dir, name)
        with self._lock:
            if path not in self._results:
                self._results[path] = _pack_failure(path, name, on_progress)
            failure = self._results[path]
        if failure is not None:
            raise CheckpointIntegrityError(str(failure), status=failure.status)


def _pack_failure(path: Path, name: str, on_progress: ProgressCallback) -> CheckpointIntegrityError | None:
    try:
        matching_checksum(path, (pack_checksum(name),), on_progress)
    except CheckpointIntegrityError as exc:
        status = getattr(exc, "status", "corrupt")
        detail = str(exc).replace(str(path), "").strip(": ") or status
        return CheckpointIntegrityError(f"shared object {pack_relpath(name)}: {detail}", status=status)
    return None


class PackTable:
    """Which pack holds each stored tensor (tensor key -> pack name): how a save finds what the run already has.

    Built from the headers of the packs the run references; a writer adds each pack it
    writes and forgets the packs it deletes.
    """

    def __init__(self) -> None:
        self.pack_of: dict[str, str] = {}
        #: Size of every known pack.
        self.size_of: dict[str, int] = {}
        self._keys_of: dict[str, list[str]] = {}

    def add(self, name: str, keys: Iterable[str], size: int) -> None:
        """Record that pack ``name`` (of ``size`` bytes) holds the tensors ``keys``."""
        keys = list(keys)
        self._keys_of[name] = keys
        self.size_of[name] = size
        for key in keys:
            self.pack_of.setdefault(key, name)

    def load(self, run_dir: str | os.PathLike, names: Iterable[str]) -> None:
        """Read the headers of packs ``names`` (a missing or damaged one is left out: its tensors are written again)."""
        for name in names:
            if name in self._keys_of:
                continue
            path = pack_path(run_dir, name)
            try:
                _, tensors = read_pack_header(path)
                size = path.stat().st_size
            except (CheckpointIntegrityError, OSError) as exc:
                log.warning("%s: %s; its tensors will be stored again", run_dir, exc)
                continue
            self.add(name, tensors, size)

    def forget(self, names: Iterable[str]) -> None:
        """Drop packs ``names`` (deleted); a tensor another pack also holds stays known there."""
        for name in names:
            self.size_of.pop(name, None)
            for key in self._keys_of.pop(name, []):
                if self.pack_of.get(key) == name:
                    del self.pack_of[key]
                    other = next((n for n, keys in self._keys_of.items() if key in keys), None)
                    if other is not None:
                        self.pack_of[key] = other


def stored_pack_names(run_dir: str | os.PathLike) -> dict[str, int]:
    """The packs in ``run_dir/objects`` (regular files with a pack name), name -> size."""
    return {name: size for name, (_, size) in regular_files_named(objects_dir(run_dir), parse_pack_filename).items()}


def collect_garbage(run_dir: str | os.PathLike, keep: Iterable[str], on_deleted: Callable[[list[str]], None] | None = None) -> list[str]:
    """Delete the packs of ``run_dir`` that are not in ``keep``; return the names deleted.

    Call only as the run's writer, after the metadata that stopped referencing them is
    durable. Only regular files named like packs inside ``objects/`` are ever deleted.
    """
    keep = set(keep)
    doomed = [name for name in stored_pack_names(run_dir) if name not in keep]
    deleted = [name for name in doomed if remove_file(objects_dir(run_dir) / f"{name}{PACK_SUFFIX}")]
    if deleted:
        fsync_dir(objects_dir(run_dir))
        if on_deleted is not None:
            on_deleted(deleted)
    return deleted


def check_record_objects(run_dir: str | os.PathLike, record: object, checks: PackChecks) -> None:
    """Checksum every pack an index entry or best-model record lists (``objects``); raise on the first bad one."""
    for name in getattr(record, "objects", None) or {}:
        checks.check(run_dir, name)
