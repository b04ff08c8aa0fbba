"""The Drive mirror within a byte budget (issue 9): newest first, never stuck, trash-safe, lag recorded.

Real runs written by ModelPersistence, real folders, and a real small filesystem (a tmpfs
mounted with ``unshare -rm``) standing in for a Drive that holds about two checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ckptctl import ModelPersistence
from ckptctl.core.format import MIRROR_STATUS_FILE
from ckptctl.core.objects import new_bytes_by_id
from ckptctl.storage.atomic import hash_file
from ckptctl.storage.mirror import (
    BUDGET_MARGIN,
    BackgroundMirror,
    default_budget,
    read_mirror_status,
    resolve_budget,
    sync_run,
    tree_bytes,
    write_mirror_status,
)
from ckptctl.storage.restore import backup_run, restore_run
from ckptctl.storage.runfiles import commit_index
from ckptctl.storage.scan import checkpoint_files_on_disk, read_best, read_index
from tests.cli_helpers import invoke

from .damage import flip_byte
from .mirror_helpers import assert_mirror_index_verifies, sync_and_record
from .mount_helpers import can_mount_private_tmpfs
from .runs import ckpt, write_run


# --------------------------------------------------------------------------- a real small Drive

CHILD = textwrap.dedent(
    """
    import json, logging, os, sys
    import torch
    from ckptctl import ModelPersistence
    from ckptctl.storage.atomic import verify_checksum
    from ckptctl.storage.mirror import sync_run
    from ckptctl.storage.restore import restore_run
    from ckptctl.storage.scan import read_index

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    drive, work = sys.argv[1], sys.argv[2]
    local, mirror = os.path.join(work, "runs", "r"), os.path.join(drive, "r")
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)  # ~263 KB of new tensors per save; the Drive holds about two besides the first save's pack
    out = {"newest_verified": [], "too_big": [], "errors": []}
    with ModelPersistence(local, max_checkpoints=5, save_every_n_batches=1, background=False, best_metric="acc") as p:
        for batch in range(20):
            with torch.no_grad():
                model.weight.add_(0.01)
            metrics = {"acc": -abs(batch - 3.0)}  # the best model stays checkpoint 3's
            p.maybe_save(0, batch, metrics, agent=model)
            p.update_best(0, batch, metrics, agent=model)
            try:
                report = sync_run(local, mirror)
            except Exception as exc:
                out["errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            out["newest_verified"].append(report.newest_verified_id)
            out["too_big"].append(report.too_big)
            for entry in read_index(mirror).checkpoints:
                verify_checksum(os.path.join(mirror, entry.path), entry.checksum)
    out["local_newest"] = read_index(local).latest.id
    out["mirror_ids"] = sorted(e.id for e in read_index(mirror).checkpoints)
    out["mirror_has_best"] = os.path.isfile(os.path.join(mirror, "best_model.pt"))
    final_weights = model.weight.detach().clone()

    restored = os.path.join(work, "restored", "r")
    restore_run(mirror, restored)
    fresh = torch.nn.Linear(256, 256)
    with ModelPersistence(restored, max_checkpoints=5, save_every_n_batches=1, background=False) as p:
        info = p.resume(agent=fresh)
        out["resumed_id"] = info["checkpoint_id"]
        out["resumed_weights_match"] = bool(torch.equal(fresh.weight, final_weights))
        with torch.no_grad():
            fresh.weight.add_(0.01)
        p.maybe_save(0, 20, {"acc": -17.0}, agent=fresh)  # training continues from it
        out["continued_id"] = p.flush() or read_index(restored).latest.id
    print(json.dumps(out))
    """
)


def test_a_drive_that_holds_two_checkpoints_always_gets_the_newest(tmp_path):
    """Keep 5 locally, 20 saves, a Drive of ~2.6 checkpoints: before, the third copy failed forever.

    Besides them the Drive holds the first save's pack for good: the tensors that never
    change (the bias, the Python and NumPy RNG states) are in it, so it is never freed.
    """
    if not can_mount_private_tmpfs(tmp_path):
        pytest.skip("this machine allows no private tmpfs mount (unshare -rm); the small-Drive test needs one")
    drive, work = tmp_path / "drive", tmp_path / "work"
    drive.mkdir()
    work.mkdir()
    script = f'mount -t tmpfs -o size=980k tmpfs {drive} && exec "{sys.executable}" -c "$CHILD" {drive} {work}'
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CHILD": CHILD},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["errors"] == []  # a full Drive is not a failed sync
    assert out["newest_verified"] == list(range(20))  # every sync got the newest checkpoint there
    assert out["too_big"] == [None] * 20
    assert out["local_newest"] == 19 and out["mirror_ids"][-1] == 19
    assert out["resumed_id"] == 19 and out["resumed_weights_match"]
    assert out["continued_id"] == 20


# --------------------------------------------------------------------------- an explicit budget


def test_an_explicit_budget_is_never_exceeded_and_the_newest_verified_copy_never_missing(tmp_path):
    local, mirror = tmp_path / "runs" / "r", tmp_path / "drive" / "r"
    mirror.parent.mkdir()
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 128)  # ~68 KB per checkpoint
    budget = None
    previous_newest = None
    newest_seen = []

    def check_during_copy(done, total):
        # mid-copy: the previous newest verified copy is still there, unless a newer one is
        if previous_newest is not None:
            newest = max(e.id for e in read_index(mirror).checkpoints)
            assert newest >= previous_newest and ckpt(mirror, newest).is_file()

    with ModelPersistence(local, max_checkpoints=5, save_every_n_batches=1, background=False, best_metric="acc") as p:
        for batch in range(20):
            with torch.no_grad():
                model.weight.add_(0.01)
            metrics = {"acc": -abs(batch - 3.0)}
            p.maybe_save(0, batch, metrics, agent=model)
            p.update_best(0, batch, metrics, agent=model)
            if budget is None:  # newest, best, one older, a copy in flight, and the first save's pack (never freed:
                # the tensors that never change, the bias and the RNG states, are in it)
                budget = int(4.5 * read_index(local).latest.full_bytes)
            report = sync_run(local, mirror, max_bytes=budget, on_progress=check_during_copy)
            used = tree_bytes(mirror)
            assert used <= budget and report.used_bytes == used and report.budget_bytes == budget
            assert report.newest_verified_id == batch  # the newest always fits
            assert report.too_big is None and report.damaged == []
            best = read_best(local)
            assert read_best(mirror).checksum == best.checksum and hash_file(mirror / "best_model.pt")[1] == best.checksum
            assert_mirror_index_verifies(mirror)
            previous_newest = report.newest_verified_id
            newest_seen.append(report.newest_verified_id)
            local_ids = {e.id for e in read_index(local).checkpoints}
            assert set(report.not_mirrored) == local_ids - {e.id for e in read_index(mirror).checkpoints}
    assert newest_seen == list(range(20))
    assert len(report.not_mirrored) >= 2  # older ones left out for the budget, and reported


#: ~68 KB checkpoints of a bare Linear(128, 128) (no optimizer, no best model): every one the same size.
SAME_SIZE = {"shape": (128, 128), "optimizer": None, "best": False}


def test_budget_room_frees_retired_then_unlisted_then_older_kept_copies(tmp_path, make_run):
    local, mirror = tmp_path / "runs" / "r", tmp_path / "drive" / "r"
    mirror.parent.mkdir()
    make_run("r", 6, **SAME_SIZE)
    sync_and_record(local, mirror)  # 0-5 on the mirror
    index = read_index(local)
    # local retention removed 0 and 1 (retired); 2 left the index some other way (not retired)
    commit_index(local, index.with_entries([e for e in index.checkpoints if e.id >= 3]).retire([0, 1]))
    for i in (0, 1, 2):
        ckpt(local, i).unlink()
    # full: each new copy needs one old copy to go (a copy's room is freed with its own pack: RNG states
    # stay in the checkpoint file, so no never-changing tensor keeps the first save's pack)
    budget = tree_bytes(mirror)
    deleted = []
    for expected in ([0, 1], [2], [3]):
        make_run("r", 1, **SAME_SIZE)
        report = sync_run(local, mirror, max_bytes=budget)
        assert report.newest_verified_id == read_index(local).latest.id
        assert tree_bytes(mirror) <= budget
        deleted.append(report.deleted_ids)
    # retired copies first (oldest first), then the copy the local run no longer lists, then the oldest kept
    assert deleted == [[0, 1], [2], [3]]


# --------------------------------------------------------------------------- deleting on Drive


def test_deleted_and_replaced_mirror_files_are_emptied_first(tmp_path):
    """Drive keeps removed files in its trash (counted against the quota): their bytes must go first."""
    local, mirror = tmp_path / "runs" / "r", tmp_path / "drive" / "r"
    mirror.parent.mkdir()
    write_run(local.parent, "r", n=2, keep=2)
    sync_and_record(local, mirror)
    held = tmp_path / "held_by_trash"  # what Drive's trash would keep: the old inode
    held.mkdir()
    os.link(ckpt(mirror, 0), held / "c0")
    os.link(mirror / "best_model.pt", held / "best")
    assert os.path.getsize(held / "c0") > 0
    write_run(local.parent, "r", n=2, keep=2)  # 2, 3; retention removes 0, 1 (mirrored: retired) and a new best
    assert read_index(local).retired == (0, 1)
    report = sync_and_record(local, mirror)
    assert sorted(report.deleted_ids) == [0, 1]
    assert not ckpt(mirror, 0).exists() and 0 not in {e.id for e in read_index(mirror).checkpoints}
    assert os.path.getsize(held / "c0") == 0  # truncated before it was unlinked
    assert os.path.getsize(held / "best") == 0  # the replaced best model, too
    assert hash_file(mirror / "best_model.pt")[1] == read_best(local).checksum
    assert read_index(local).retired == ()  # gone from the mirror: no longer retired
    assert_mirror_index_verifies(mirror)


def test_crash_leftovers_on_the_mirror(tmp_path):
    local, mirror = tmp_path / "runs" / "r", tmp_path / "drive" / "r"
    mirror.parent.mkdir()
    write_run(local.parent, "r", n=3, keep=5)
    sync_and_record(local, mirror)
    # a crash between "index entry removed" and "file unlinked": a zero-size unindexed file
    (ckpt(mirror, 1)).write_bytes(b"")
    # a crash after a copy was renamed but before the index listed it
    raw = json.loads((mirror / "checkpoint_metadata.json").read_text())
    raw["checkpoints"] = [e for e in raw["checkpoints"] if e["id"] != 2]
    (mirror / "checkpoint_metadata.json").write_text(json.dumps(raw))
    inode_before = os.stat(ckpt(mirror, 2)).st_ino
    # somebody else's file that looks like a checkpoint: not ours to delete
    foreign = ckpt(mirror, 77)
    foreign.write_bytes(b"x" * 1000)
    report = sync_run(local, mirror)
    assert report.copied == ["checkpoints/checkpoint_00001.pt"]  # the empty one was removed, then copied again
    assert os.stat(ckpt(mirror, 2)).st_ino == inode_before  # adopted after a read-back, not uploaded again
    assert {e.id for e in read_index(mirror).checkpoints} == {0, 1, 2}
    assert foreign.read_bytes() == b"x" * 1000 and 77 in report.mirror_ids
    assert_mirror_index_verifies(mirror)
    # an empty leftover of an id the local run never had is removed by the next sync too
    ckpt(mirror, 40).write_bytes(b"")
    sync_run(local, mirror)
    assert not ckpt(mirror, 40).exists()


# --------------------------------------------------------------------------- damage and partial restores


def test_a_damaged_pinned_local_checkpoint_does_not_block_newer_copies(tmp_path):
    local, mirror = tmp_path / "runs" / "r", tmp_path / "drive" / "r"
    mirror.parent.mkdir()
    write_run(local.parent, "r", n=3, keep=2)
    with ModelPersistence(local, max_checkpoints=2, background=False) as p:
        p.pin(1)  # protected: retention keeps it, so every sync meets it
    flip_byte(ckpt(local, 1))
    write_run(local.parent, "r", n=3, keep=2)  # 3, 4, 5
    report = sync_run(local, mirror)
    assert [d["id"] for d in report.damaged] == [1] and "checksum" in report.damaged[0]["reason"]
    assert report.newest_verified_id == 5 and 1 in report.not_mirrored
    assert [e.id for e in read_index(mirror).checkpoints] == [4, 5]
    write_run(local.parent, "r", n=1, keep=2)  # and the next sync goes on the same way
    report = sync_run(local, mirror)
    assert report.newest_verified_id == 6 and [d["id"] for d in report.damaged] == [1]
    assert_mirror_index_verifies(mirror)


def test_a_partial_restore_then_backup_keeps_every_mirror_copy(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir()
    run = write_run(tmp_path / "runs", "r", n=10, keep=10)
    backup_run(run, drive)
    mirror = drive / "r"
    shutil.rmtree(run)  # a fresh machine
    restore_run(mirror, run, only_id=5)
    assert [e.id for e in read_index(run).checkpoints] == [5]
    report = backup_run(run, drive)
    assert sorted(checkpoint_files_on_disk(mirror)) == list(range(10))
    mirror_index = read_index(mirror)
    assert [e.id for e in mirror_index.checkpoints] == list(range(10)) and mirror_index.next_id == 10
    assert report.deleted_ids == [] and report.newest_verified_id == 9
    assert_mirror_index_verifies(mirror)


def test_prune_retires_mirrored_ids_and_the_next_backup_removes_them(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir()
    run = write_run(tmp_path / "runs", "r", n=5, keep=10)
    backup_run(run, drive)
    result = invoke("prune", run, "--keep", "2", "--yes")
    assert result.exit_code == 0, result.stderr
    assert read_index(run).retired == (0, 1, 2)
    report = backup_run(run, drive)
    assert sorted(report.deleted_ids) == [0, 1, 2]
    assert sorted(checkpoint_files_on_disk(drive / "r")) == [3, 4]
    assert read_index(run).retired == ()


# --------------------------------------------------------------------------- budget settings and status


def test_budget_settings(tmp_path):
    assert resolve_budget(123, tmp_path) == 123
    assert resolve_budget("14GB", tmp_path) == 14 * 10**9
    assert resolve_budget("500MiB", tmp_path) == 500 * 2**20
    for bad in ("lots", "-1GB", 0, True):
        with pytest.raises(ValueError, match="Drive max size"):
            resolve_budget(bad, tmp_path)
    mirror = tmp_path / "drive" / "r"
    mirror.mkdir(parents=True)
    (mirror / "checkpoints").mkdir()
    (mirror / "checkpoints" / "checkpoint_00000.pt").write_bytes(b"x" * 10_000)
    st = os.statvfs(mirror)
    budget = default_budget(mirror)
    expected = (st.f_bavail * st.f_frsize + 10_000) * (1 - BUDGET_MARGIN)
    assert abs(budget - expected) < 0.01 * expected
    assert resolve_budget(None, mirror) == pytest.approx(budget, rel=0.01)
    assert default_budget(tmp_path / "drive" / "not_yet") > 0  # a mirror run not created yet


def test_mirror_status_keeps_numbers_on_error_and_never_raises_on_read(tmp_path):
    local, mirror = tmp_path / "runs" / "r", tmp_path / "drive" / "r"
    mirror.parent.mkdir()
    write_run(local.parent, "r", n=2)
    assert read_mirror_status(local) is None
    report = sync_run(local, mirror, max_bytes=10**9)
    status = write_mirror_status(local, report, mirror_run=mirror)
    assert status["newest_verified_id"] == 1 and status["not_mirrored"] == 0 and status["budget_bytes"] == 10**9
    write_mirror_status(local, None, error="OSError: [Errno 5] Input/output error", mirror_run=mirror)
    after = read_mirror_status(local)
    assert after["newest_verified_id"] == 1 and after["used_bytes"] == report.used_bytes
    assert after["last_error"] == "OSError: [Errno 5] Input/output error"
    (local / MIRROR_STATUS_FILE).write_text("{not json")
    assert read_mirror_status(local) is None


def test_background_mirror_reports_failures_and_does_not_spin_on_a_partial_sync(tmp_path, monkeypatch):
    import time

    from ckptctl.storage import mirror as mirror_module

    local = write_run(tmp_path / "runs", "r", n=2)
    drive = tmp_path / "drive"
    failures, synced, attempts = [], [], []
    real_sync = mirror_module.sync_run
    monkeypatch.setattr(mirror_module, "sync_run", lambda *a, **k: (attempts.append(k.get("max_bytes")), real_sync(*a, **k))[1])
    m = BackgroundMirror(local, drive / "r", on_synced=synced.append, on_failed=failures.append, max_bytes=1000,
                         initial_backoff=0.1, max_backoff=0.1)
    m.request()
    deadline = time.monotonic() + 5
    while not failures and time.monotonic() < deadline:
        time.sleep(0.02)
    assert failures and "FileNotFoundError" in failures[0]  # Drive not mounted yet
    drive.mkdir()
    assert m.wait_idle(timeout=5)
    assert synced and synced[-1].too_big is not None  # 1000 bytes hold nothing: completed, reported
    count = len(attempts)
    time.sleep(0.5)
    assert len(attempts) == count  # no retry loop after a sync that completed with items left out
    assert set(attempts) == {1000}
    m.stop(timeout=5)


def test_cli_backup_max_size_and_ls_show_the_drive_line(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir()
    run = write_run(tmp_path / "runs", "run_a", n=6, keep=10)
    new_bytes = new_bytes_by_id(read_index(run).checkpoints)  # what each save added: its file and its new pack
    bad = invoke("backup", "runs/run_a", "--drive", drive, "--max-size", "lots")
    assert bad.exit_code == 2 and bad.stderr.startswith("Error: ") and len(bad.stderr.strip().splitlines()) == 1
    assert "--max-size" in bad.stderr
    budget = new_bytes[0] + 3 * new_bytes[5] + 20_000  # the first save's pack, newest, best, and one or two older ones
    result = invoke("backup", "runs/run_a", "--drive", drive, "--max-size", str(budget), "--json")
    assert result.exit_code == 0, result.stderr
    (b,) = json.loads(result.stdout)["runs"]
    assert b["budget_bytes"] == budget and b["used_bytes"] <= budget and b["newest_verified_id"] == 5
    assert b["not_mirrored"] and max(b["not_mirrored"]) < 5
    assert tree_bytes(drive / "run_a") <= budget

    text = invoke("ls", "runs")
    assert text.exit_code == 0, text.stderr
    assert "Drive: newest #5 verified" in text.stdout
    assert f"{len(b['not_mirrored'])} older not mirrored" in text.stdout and "budget" in text.stdout
    doc = json.loads(invoke("ls", "runs", "--json").stdout)
    status = doc["runs"][0]["drive"]
    assert status["newest_verified_id"] == 5 and status["budget_bytes"] == budget
    assert status["not_mirrored"] == len(b["not_mirrored"]) and isinstance(status["used_bytes"], int)
    assert status["last_error"] is None and status["mirror"] == str(drive / "run_a")
    # a run that never had a mirror: null
    write_run(tmp_path / "runs", "run_b", n=1)
    doc = json.loads(invoke("ls", "runs", "--json").stdout)
    assert {r["name"]: r["drive"] is None for r in doc["runs"]} == {"run_a": False, "run_b": True}
    # a failed backup keeps the numbers and shows the error
    shutil.rmtree(drive / "run_a" / "checkpoints")
    (drive / "run_a" / "checkpoints").write_text("not a folder")
    failed = invoke("backup", "runs/run_a", "--drive", drive, "--max-size", "14GB")
    assert failed.exit_code == 1
    text = invoke("ls", "runs/run_a")
    assert "Drive: newest #5 verified" in text.stdout and "Drive last error: FileExistsError" in text.stdout
