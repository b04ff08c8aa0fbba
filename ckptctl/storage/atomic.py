"""Crash-safe file writes: temporary name in the same directory, fsync, rename, fsync the directory.

A reader never sees a partly written file under a final name: either the old file or the
new one is there. Temporaries carry :data:`TEMP_PREFIX`, are ignored by every reader, and
are removed by :func:`cleanup_temporaries`.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import stat
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional


from ckptctl.core.format import TEMP_PREFIX, check_relative_path, is_temporary_name
from ckptctl.core.manifest import CHECKSUM_ALGORITHMS, format_checksum, parse_checksum
from ckptctl.errors import CheckpointIntegrityError, NotRegularFileError, UnsafePathError

CHUNK_BYTES = 8 * 1024 * 1024
DEFAULT_ALGORITHM = CHECKSUM_ALGORITHMS[0]

ProgressCallback = Optional[Callable[[int, int], None]]
#: Called with ``(size_bytes, checksum)`` of a written temporary, after its fsync and before
#: the rename that commits it: the moment to record what is about to appear (the best model's
#: pending record). An exception from it removes the temporary and leaves the old file.
BeforeReplace = Optional[Callable[[int, str], None]]


def new_hasher(algorithm: str = DEFAULT_ALGORITHM):
    """Return a fresh hash object for ``algorithm`` (one of :data:`CHECKSUM_ALGORITHMS`)."""
    if algorithm == "xxh3_128":
        import xxhash  # imported on first use: listing never hashes

        return xxhash.xxh3_128()
    if algorithm in CHECKSUM_ALGORITHMS:
        import hashlib

        return hashlib.new(algorithm)
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return kind
    return "unknown type"


def open_regular(
    path: str | os.PathLike,
    flags: int = os.O_RDONLY,
    mode: int = 0o644,
    *,
    follow_symlinks: bool = True,
) -> int:
    """Open ``path`` only if it is a regular file; return the descriptor (the caller closes it).

    The one place every reader of a run's files (checkpoints, the best model, metadata,
    logs) opens them: a FIFO, a device, a socket or a directory at such a path raises
    :class:`NotRegularFileError` at once instead of blocking or reading garbage. The open
    itself never blocks (``O_NONBLOCK``: a FIFO opens without a peer, or refuses a writer
    with ENXIO), then ``fstat`` on the descriptor decides, so what is judged is what was
    opened. ``follow_symlinks=False`` adds ``O_NOFOLLOW`` (a symlink is then refused too);
    by default a symlink is followed and its target judged. ``flags`` may add ``O_CREAT``,
    ``O_APPEND``... (``mode`` is used on creation). A missing file raises FileNotFoundError.
    """
    extra = os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags | extra, mode)
    except OSError as exc:
        # ENXIO: a socket, or a FIFO with no reader opened for writing; EISDIR: a directory
        # opened for writing; ELOOP: a symlink under O_NOFOLLOW. Name the kind when it is one.
        if exc.errno in (errno.ENXIO, errno.EISDIR, errno.ELOOP, errno.ENODEV, errno.EOPNOTSUPP):
            try:
                st = os.stat(path, follow_symlinks=follow_symlinks)
            except OSError:
                raise exc from None
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFileError(path, _file_kind(st.st_mode)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, _file_kind(st.st_mode))
        os.set_blocking(fd, True)  # a regular file ignores O_NONBLOCK; cleared so nothing else sees it
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so a rename or unlink inside it is durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: A write at least this large is hashed on a helper thread while it is written (xxhash and
#: the write both release the GIL), so hashing adds no time to a large write.
PARALLEL_HASH_BYTES = 1 << 20
_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()


def _hashing_pool() -> ThreadPoolExecutor:
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptctl-hash")
        return _hash_pool


class HashingWriter:
    """A binary file wrapper that hashes and counts every byte written through it."""

    def __init__(self, raw, algorithm: str = DEFAULT_ALGORITHM):
        self._raw = raw
        self._hasher = new_hasher(algorithm)
        self.algorithm = algorithm
        self.bytes_written = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        """Write ``data`` and feed it to the hash.

        An OSError (disk full, I/O error) is remembered in :attr:`error` before it is
        raised, because some callers (torch's zip writer) replace it with their own error.
        A large ``data`` is hashed on a helper thread during the write.
        """
        size = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        hashing = _hashing_pool().submit(self._hasher.update, data) if size >= PARALLEL_HASH_BYTES else None
        if hashing is None:
            self._hasher.update(data)
        try:
            written = self._raw.write(data)
        except OSError as exc:
            self.error = exc
            raise
        finally:
            if hashing is not None:
                hashing.result()
        self.bytes_written += size
        return written

    def flush(self) -> None:
        """Flush the underlying file."""
        self._raw.flush()

    def checksum(self) -> str:
        """The stored-form checksum of everything written so far."""
        return format_checksum(self.algorithm, self._hasher.hexdigest())


#: Marks the temporaries this machine writes (``.<name>.<host token><random>``), so a clean-up
#: of a folder no lock covers (a Drive mirror) can tell this machine's leftovers (a killed
#: copy) from another machine's copy in flight.
HOST_TOKEN = f"{zlib.crc32(os.uname().nodename.encode('utf-8', 'surrogateescape')):08x}"


def temporary_path_for(final_path: str | os.PathLike) -> Path:
    """A fresh temporary path next to ``final_path`` (same directory, so rename is atomic)."""
    final_path = Path(final_path)
    return final_path.with_name(f"{TEMP_PREFIX}{final_path.name}.{HOST_TOKEN}{os.urandom(4).hex()}")


def _written_here(name: str) -> bool:
    """True for a temporary whose name carries this machine's :data:`HOST_TOKEN`."""
    return name.rsplit(".", 1)[-1].startswith(HOST_TOKEN)


def atomic_write(
    final_path: str | os.PathLike,
    write_body: Callable[[HashingWriter], None],
    *,
    algorithm: str = DEFAULT_ALGORITHM,
    before_replace: BeforeReplace = None,
) -> tuple[int, str]:
    """Write a file crash-safely and return ``(size_bytes, checksum)`` of what was written.

    ``write_body`` receives a :class:`HashingWriter`. The data goes to a temporary file in
    the same directory, which is flushed, fsynced, renamed over ``final_path``; then the
    directory is fsynced. On any error the temporary is removed and the old file (if
    any) is untouched. ``before_replace`` (see :data:`BeforeReplace`) runs just before the rename.
    """
    final_path = Path(final_path)
    tmp = temporary_path_for(final_path)
    writer = None
    try:
        with open(tmp, "xb") as raw:
            writer = HashingWriter(raw, algorithm)
            write_body(writer)
            raw.flush()
            os.fsync(raw.fileno())
        if before_replace is not None:
            before_replace(writer.bytes_written, writer.checksum())
        os.replace(tmp, final_path)
    except BaseException as exc:
        _remove_quietly(tmp)
        if writer is not None and writer.error is not None and writer.error is not exc:
            raise _naming(writer.error, final_path) from None  # the real cause (e.g. ENOSPC), not the caller's wrapper
        if isinstance(exc, OSError) and not exc.filename:
            raise _naming(exc, final_path) from None
        raise
    fsync_dir(final_path.parent)
    return writer.bytes_written, writer.checksum()


def atomic_write_named(
    directory: str | os.PathLike, name_for: Callable[[str], str], write_body: Callable[[HashingWriter], None]
) -> tuple[Path, int, str]:
    """Like :func:`atomic_write`, for a file named after its own content: return ``(path, size, checksum)``.

    The data goes to a temporary in ``directory``, is fsynced, and is renamed to
    ``name_for(checksum)`` (an existing file of that name has the same bytes, so the rename
    may replace it); then the directory is fsynced.
    """
    directory = Path(directory)
    tmp = temporary_path_for(directory / "object")
    writer = None
    try:
        with open(tmp, "xb") as raw:
            writer = HashingWriter(raw)
            write_body(writer)
            raw.flush()
            os.fsync(raw.fileno())
        final_path = directory / name_for(writer.checksum())
        os.replace(tmp, final_path)
    except BaseException as exc:
        _remove_quietly(tmp)
        if writer is not None and writer.error is not None and writer.error is not exc:
            raise _naming(writer.error, tmp) from None
        if isinstance(exc, OSError) and not exc.filename:
            raise _naming(exc, tmp) from None
        raise
    fsync_dir(directory)
    return final_path, writer.bytes_written, writer.checksum()


def _naming(exc: BaseException, path: Path) -> BaseException:
    """``exc``, or for an OSError that names no file (a failed write: ENOSPC, EIO), the same error naming ``path``."""
    if isinstance(exc, OSError) and not exc.filename and exc.errno is not None:
        return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))
    return exc


def atomic_write_by_name(
    final_path: str | os.PathLike,
    write_to: Callable[[str], None],
    *,
    algorithm: str = DEFAULT_ALGORITHM,
    before_replace: BeforeReplace = None,
) -> tuple[int, str]:
    """Like :func:`atomic_write`, for writers that need a file name (e.g. torch's native writer).

    ``write_to(temporary_name)`` creates the file; it is then fsynced, hashed by reading it
    back (from the page cache), renamed over ``final_path``, and the directory fsynced.
    """
    final_path = Path(final_path)
    tmp = temporary_path_for(final_path)
    try:
        write_to(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        size, checksum = hash_file(tmp, algorithm)
        if before_replace is not None:
            before_replace(size, checksum)
        os.replace(tmp, final_path)
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, OSError) and not exc.filename:
            raise _naming(exc, final_path) from None
        raise
    fsync_dir(final_path.parent)
    return size, checksum


def atomic_write_bytes(final_path: str | os.PathLike, data: bytes) -> tuple[int, str]:
    """Crash-safe write of ``data``; returns ``(size_bytes, checksum)``."""
    return atomic_write(final_path, lambda w: w.write(data))


def atomic_write_json(final_path: str | os.PathLike, obj: Any) -> tuple[int, str]:
    """Crash-safe write of ``obj`` as indented UTF-8 JSON (NaN is not allowed)."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write_bytes(final_path, text.encode("utf-8"))


def hash_file(
    path: str | os.PathLike,
    algorithm: str = DEFAULT_ALGORITHM,
    on_progress: ProgressCallback = None,
) -> tuple[int, str]:
    """Stream ``path`` through the hash; return ``(size_bytes, checksum)``.

    Only a regular file is read (:func:`open_regular`); anything else raises :class:`NotRegularFileError`.
    """
    hasher = new_hasher(algorithm)
    with os.fdopen(open_regular(path), "rb", buffering=0) as f:
        total = os.fstat(f.fileno()).st_size
        done = 0
        for chunk in read_ahead(f):
            hasher.update(chunk)
            done += len(chunk)
            if on_progress:
                on_progress(done, total)
    return done, format_checksum(algorithm, hasher.hexdigest())


def read_ahead(source: str | os.PathLike | BinaryIO, depth: int = 3) -> Iterator[memoryview]:
    """Yield the bytes of ``source`` chunk by chunk while a thread reads the next ones.

    Reading overlaps whatever the caller does with each chunk (hashing, writing): both
    release the GIL, so a copy or a checksum runs at the speed of the slower side instead
    of the sum of both. Each chunk is valid until the next one is requested.

    ``source`` is a path (opened with :func:`open_regular`, so a missing file or one that
    is not a regular file raises at once) or a binary file already opened that way; either
    is closed when the iteration ends.
    """
    if isinstance(source, (str, bytes, os.PathLike)):
        f = os.fdopen(open_regular(source), "rb", buffering=0)
    else:
        f = source
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    filled: queue.Queue = queue.Queue()
    free: queue.Queue = queue.Queue()
    for _ in range(depth):
        free.put(bytearray(CHUNK_BYTES))
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                buf = free.get()
                if buf is None:
                    return
                n = f.readinto(buf)
                filled.put((buf, n))
                if not n:
                    return
        except BaseException as exc:  # handed to the consumer
            filled.put((exc, 0))

    thread = threading.Thread(target=reader, name="ckptctl-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            buf, n = filled.get()
            if isinstance(buf, BaseException):
                raise buf
            if not n:
                return
            yield memoryview(buf)[:n]
            free.put(buf)
    finally:
        stop.set()
        free.put(None)
        thread.join()
        f.close()


def read_failure(label: str | os.PathLike, exc: OSError) -> CheckpointIntegrityError:
    """How a checkpoint that could not be read is reported: ``missing`` if absent, else ``corrupt`` with the reason.

    The one classification for every reader of checkpoint files (checksums, safe loads):
    a FIFO or directory says what it is, anything else the system's reason.
    """
    if isinstance(exc, FileNotFoundError):
        return CheckpointIntegrityError(f"{label}: file is missing", status="missing")
    if isinstance(exc, NotRegularFileError):
        return CheckpointIntegrityError(f"{label}: {exc.strerror}")
    return CheckpointIntegrityError(f"{label}: cannot read ({exc.strerror or exc})")


def verify_checksum(path: str | os.PathLike, expected: str, on_progress: ProgressCallback = None) -> int:
    """Raise :class:`CheckpointIntegrityError` unless ``path`` hashes to ``expected``; return its size.

    The error's ``status`` is ``missing`` when the file is absent, ``corrupt`` otherwise.
    """
    try:
        algorithm, _ = parse_checksum(expected)
    except ValueError as exc:
        raise CheckpointIntegrityError(f"{path}: {exc}") from None
    try:
        size, actual = hash_file(path, algorithm, on_progress)
    except OSError as exc:
        raise read_failure(path, exc) from None
    if actual != expected:
        raise CheckpointIntegrityError(f"{path}: checksum mismatch (expected {expected[:19]}…, got {actual[:19]}…)")
    return size


def matching_checksum(path: str | os.PathLike, candidates: tuple[str, ...] | list[str], on_progress: ProgressCallback = None) -> str:
    """The one of ``candidates`` that ``path`` hashes to (read once per checksum algorithm among them).

    Raises :class:`CheckpointIntegrityError` (``missing`` when absent) when it matches none:
    e.g. ``best_model.pt`` against the committed and the pending record of a replace.
    """
    if len(candidates) == 1:
        verify_checksum(path, candidates[0], on_progress)
        return candidates[0]
    actual = ""
    for algorithm in dict.fromkeys(parse_checksum(c)[0] for c in candidates):
        try:
            _, actual = hash_file(path, algorithm, on_progress)
        except OSError as exc:
            raise read_failure(path, exc) from None
        if actual in candidates:
            return actual
    expected = " or ".join(c[:19] + "…" for c in candidates)
    raise CheckpointIntegrityError(f"{path}: checksum mismatch (expected {expected}, got {actual[:19]}…)")


def atomic_copy(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    expected_checksum: str | None = None,
    on_progress: ProgressCallback = None,
    before_replace: BeforeReplace = None,
) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` crash-safely, hashing in the same pass; return ``(size, checksum)``.

    If ``expected_checksum`` is given and the copied bytes do not match, the temporary is
    removed, ``dst`` is left as it was, and :class:`CheckpointIntegrityError` is raised (also
    when ``src`` is not a regular file; without a checksum that is :class:`NotRegularFileError`).
    ``before_replace`` runs after the checksum matched, just before the rename.
    """
    algorithm = parse_checksum(expected_checksum)[0] if expected_checksum else DEFAULT_ALGORITHM

    def body(writer: HashingWriter) -> None:
        done = 0
        for chunk in read_ahead(source):
            writer.write(chunk)
            done += len(chunk)
            if on_progress:
                on_progress(done, total)
        if expected_checksum and writer.checksum() != expected_checksum:
            raise CheckpointIntegrityError(f"{src}: checksum mismatch while copying")

    # opened before the temporary exists: a FIFO or a device source is refused at once
    try:
        fd = open_regular(src)
    except NotRegularFileError as exc:
        if expected_checksum:  # the caller expects certain bytes there: that file is damaged
            raise CheckpointIntegrityError(f"{src}: {exc.strerror}") from None
        raise
    with os.fdopen(fd, "rb", buffering=0) as source:
        total = os.fstat(source.fileno()).st_size
        return atomic_write(dst, body, algorithm=algorithm, before_replace=before_replace)


def cleanup_temporaries(directory: str | os.PathLike, *, idle_for: float | None = None) -> list[Path]:
    """Remove leftover ckptctl temporaries directly inside ``directory``; return what was removed.

    Only call this while holding the run lock: a live writer's temporary looks the same.
    Where no lock covers the folder (a Drive mirror that another machine may be writing
    to), pass ``idle_for``: another machine's temporaries go only once they have not been
    written to for that many seconds (a live writer's keeps changing; file times only tell
    staleness here, never order); this machine's go at once (the caller holds the run
    lock, so none of them is in flight).
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if is_temporary_name(name):
            path = Path(directory) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if idle_for is not None and not _written_here(name) and now - st.st_mtime < idle_for:
                continue
            _remove_quietly(path)
            removed.append(path)
    return removed


def resolve_inside(run_dir: str | os.PathLike, relpath: str) -> Path:
    """Join a metadata path to ``run_dir`` and make sure the result stays inside it.

    Rejects absolute paths, ``..`` escapes, and symlinks (anywhere along the path) that
    lead outside the run directory. Raises :class:`UnsafePathError`.
    """
    relpath = check_relative_path(relpath)
    candidate = os.path.join(run_dir, relpath)
    # Fast path (runs once per file listed): a normalised relative path none of whose
    # components is a symlink cannot leave the run directory.
    current = os.fspath(run_dir)
    for part in relpath.split("/"):
        current = os.path.join(current, part)
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                break
        except FileNotFoundError:
            return Path(candidate)  # nothing further exists, so nothing to follow
        except OSError:
            break
    else:
        return Path(candidate)
    root = os.path.realpath(run_dir)
    resolved = os.path.realpath(candidate)
    if resolved != root and not resolved.startswith(root.rstrip(os.sep) + os.sep):
        raise UnsafePathError(f"{relpath}: resolves outside the run directory (symlink?)")
    return Path(candidate)


def remove_file(path: str | os.PathLike) -> bool:
    """Unlink ``path`` (never a directory); return True if something was removed."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
