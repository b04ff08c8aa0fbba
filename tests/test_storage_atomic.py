"""Atomic writes, hashing, the run lock, and path resolution on a real filesystem."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ckptctl.core.format import TEMP_PREFIX
from ckptctl.errors import CheckpointIntegrityError, RunLockedError, UnsafePathError
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

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert os.listdir(tmp_path) == ["f.json"]


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
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
