"""Atomic writes, hashing, the run lock, and path resolution on a real filesystem."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ckptctl.core.format import TEMP_PREFIX
from ckptctl.errors import CheckpointIntegrityError, CkptctlError, RunLockedError, UnsafePathError
from ckptctl.storage.atomic import (
    atomic_copy,
    atomic_write,
    atomic_write_json,
    cleanup_temporaries,
    hash_file,
    resolve_inside,
    verify_checksum,
)
from ckptctl.storage.lock import RunLock, is_locked


def test_atomic_write_replaces_whole_file_and_reports_checksum(tmp_path):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    size, checksum = atomic_write(target, lambda w: (w.write(b"new "), w.write(bytearray(b"data"))))
    assert target.read_bytes() == b"new data" and size == 8
    assert hash_file(target) == (8, checksum)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    target = tmp_path / "f.json"
    atomic_write_json(target, {"v": 1})

    def boom(w):
        w.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, boom)
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert os.listdir(tmp_path) == ["f.json"]


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant: nan"):
        atomic_write_json(tmp_path / "x.json", {"v": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_verify_checksum_statuses(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"hello")
    _, good = hash_file(f)
    assert verify_checksum(f, good) == 5
    f.write_bytes(b"hellO")
    with pytest.raises(CheckpointIntegrityError) as err:
        verify_checksum(f, good)
    assert err.value.status == "corrupt"
    with pytest.raises(CheckpointIntegrityError) as err:
        verify_checksum(tmp_path / "gone", good)
    assert err.value.status == "missing"


def test_copy_verifies_and_never_replaces_with_bad_bytes(tmp_path):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    _, checksum = hash_file(src)
    seen = []
    assert atomic_copy(src, dst, expected_checksum=checksum, on_progress=lambda d, t: seen.append((d, t)))[1] == checksum
    assert dst.read_bytes() == src.read_bytes() and seen[-1][0] == seen[-1][1]
    dst.write_bytes(b"previous")
    with pytest.raises(CheckpointIntegrityError):
        atomic_copy(src, dst, expected_checksum="sha256:" + "0" * 64)
    assert dst.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]


def test_cleanup_removes_only_temporaries(tmp_path):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    (tmp_path / (TEMP_PREFIX + "checkpoint_00001.pt.ab")).write_bytes(b"x")
    (tmp_path / "checkpoint_00001.pt").write_bytes(b"y")
    removed = cleanup_temporaries(tmp_path)
    assert len(removed) == 1 and os.listdir(tmp_path) == ["checkpoint_00001.pt"]


def test_resolve_inside_rejects_escapes_and_outside_symlinks(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    outside = tmp_path / "secret.pt"
    outside.write_bytes(b"s")
    (run / "checkpoints" / "checkpoint_00001.pt").symlink_to(outside)
    assert resolve_inside(run, "checkpoints/x.pt") == run / "checkpoints/x.pt"
    for bad in ("../secret.pt", "/etc/passwd", "checkpoints/checkpoint_00001.pt"):
        with pytest.raises(UnsafePathError):
            resolve_inside(run, bad)


def test_lock_excludes_second_writer_and_is_released_when_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        assert is_locked(run)
        with pytest.raises(RunLockedError, match="locked by pid"):
            RunLock(run).acquire()
    assert not is_locked(run)
    code = textwrap.dedent(
        f"""
        import sys, time
        from ckptctl.storage.lock import RunLock
        RunLock({str(run)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert is_locked(run)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    assert not is_locked(run)
    RunLock(run).acquire().release()  # recoverable after a crash


def test_old_sha256_checksums_still_verify(tmp_path):
    import hashlib

    f = tmp_path / "old.pt"
    f.write_bytes(b"written by an older ckptctl")
    assert verify_checksum(f, "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()) == 27
    assert hash_file(f)[1].startswith("xxh3_128:")


def test_read_ahead_yields_every_byte_in_order_and_stops_cleanly(tmp_path):
    from ckptctl.storage.atomic import CHUNK_BYTES, read_ahead

    data = os.urandom(2 * CHUNK_BYTES + 12345)
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    assert b"".join(bytes(c) for c in read_ahead(f)) == data
    chunks = read_ahead(f)
    next(chunks)
    chunks.close()  # a consumer that stops early (an error mid-copy) leaves no thread behind
    import threading

    assert not [t for t in threading.enumerate() if t.name == "ckptctl-read-ahead"]
    with pytest.raises(FileNotFoundError):
        next(read_ahead(tmp_path / "missing"))


def _not_regular(tmp_path):
    """A FIFO, a directory, a Unix socket (and /dev/null's numbers where mknod is allowed), by kind."""
    import socket
    import stat as st

    made = {"FIFO": tmp_path / "fifo", "directory": tmp_path / "dir", "socket": tmp_path / "sock"}
    os.mkfifo(made["FIFO"])
    made["directory"].mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(made["socket"]))
    try:
        os.mknod(tmp_path / "null", 0o644 | st.S_IFCHR, os.makedev(1, 3))
        made["character device"] = tmp_path / "null"
    except OSError:
        pass
    return made


def test_open_regular_refuses_fifos_devices_sockets_directories_and_links_to_them(tmp_path):
    from ckptctl.errors import NotRegularFileError
    from ckptctl.storage.atomic import open_regular
    from tests.cli_helpers import no_hang

    regular = tmp_path / "regular"
    regular.write_bytes(b"ok")
    os.close(open_regular(regular))
    (tmp_path / "link-regular").symlink_to(regular)
    os.close(open_regular(tmp_path / "link-regular"))  # a symlink is followed and its target judged
    with pytest.raises(NotRegularFileError, match=r"not a regular file \(symlink\)"):
        open_regular(tmp_path / "link-regular", follow_symlinks=False)
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")
    with no_hang():
        for kind, path in _not_regular(tmp_path).items():
            (tmp_path / f"link-{path.name}").symlink_to(path)
            for target in (path, tmp_path / f"link-{path.name}"):
                for flags in (os.O_RDONLY, os.O_WRONLY | os.O_APPEND | os.O_CREAT):  # a reader, and a log appender
                    with pytest.raises(NotRegularFileError) as err:
                        open_regular(target, flags)
                    assert str(err.value) == f"{target}: not a regular file ({kind})"
                    assert isinstance(err.value, OSError)  # every `except OSError` handles it as unreadable


def test_hashing_verifying_and_copying_refuse_a_fifo_without_blocking(tmp_path):
    from ckptctl.errors import CorruptIndexError, NotRegularFileError
    from ckptctl.storage.atomic import read_ahead
    from ckptctl.storage.scan import read_json_file
    from tests.cli_helpers import no_hang

    fifo = tmp_path / "checkpoint_00001.pt"
    os.mkfifo(fifo)
    good = tmp_path / "good"
    good.write_bytes(b"payload")
    checksum = hash_file(good)[1]
    with no_hang():
        with pytest.raises(NotRegularFileError):
            hash_file(fifo)
        with pytest.raises(CheckpointIntegrityError, match=r"not a regular file \(FIFO\)") as err:
            verify_checksum(fifo, checksum)
        assert err.value.status == "corrupt"
        with pytest.raises(NotRegularFileError):
            atomic_copy(fifo, tmp_path / "copy")
        with pytest.raises(CheckpointIntegrityError, match=r"not a regular file \(FIFO\)"):
            atomic_copy(fifo, tmp_path / "copy", expected_checksum=checksum)  # the source is damaged
        with pytest.raises(NotRegularFileError):
            next(read_ahead(fifo))
        json_fifo = tmp_path / "checkpoint_metadata.json"
        os.mkfifo(json_fifo)
        with pytest.raises(CorruptIndexError, match=r"checkpoint_metadata.json: not a regular file \(FIFO\)"):
            read_json_file(json_fifo)
    assert not (tmp_path / "copy").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_a_lock_file_that_is_a_fifo_is_refused_in_one_clear_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / ".ckptctl.lock")
    with pytest.raises(CkptctlError, match=r"not a regular file \(FIFO\).*lock file must be a plain file"):
        RunLock(run).acquire()
    assert not is_locked(run)
