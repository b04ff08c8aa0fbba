"""``ckptctl restore --from-drive`` and ``backup``: verified copies, resuming, never clobbering newer local work."""

from __future__ import annotations

import json
import os

from tests.cli_helpers import invoke
from tests.runs import checksum, ckpt, fresh_components, index_of, write_index, write_run


def _drive(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir(exist_ok=True)
    return drive


def test_backup_then_restore_into_empty_runs_and_resume(tmp_path):
    from ckptctl import ModelPersistence

    drive = _drive(tmp_path)
    write_run(tmp_path / "work", "run_a", n=3)
    backup = invoke("backup", "work/run_a", "--drive", drive, "--json")
    assert backup.exit_code == 0, backup.stderr
    (b,) = json.loads(backup.stdout)["runs"]
    run = tmp_path / "work" / "run_a"
    assert sorted(b["copied"]) == ["best_model.pt"] + [f"checkpoints/checkpoint_0000{i}.pt" for i in range(3)]
    assert b["bytes_copied"] == sum(os.path.getsize(run / p) for p in b["copied"])
    assert all(e["mirrored"] for e in index_of(tmp_path / "work" / "run_a")["checkpoints"])

    result = invoke("restore", "--from-drive", "--drive", drive, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    local = tmp_path / "runs" / "run_a"
    assert doc["dest"] == "runs/run_a" and doc["resume_id"] == 2
    for i in range(3):
        assert ckpt(local, i).read_bytes() == ckpt(drive / "run_a", i).read_bytes()
    assert invoke("verify", "runs").exit_code == 0
    p = ModelPersistence(local)
    try:
        assert p.resume(**fresh_components())["checkpoint_id"] == 2
    finally:
        p.close()
    again = json.loads(invoke("restore", "--from-drive", "--drive", drive, "--json").stdout)
    assert again["copied"] == [] and len(again["already_present"]) == 4


def test_restore_uses_ckptctl_drive_and_picks_newest_run(tmp_path, monkeypatch):
    drive = _drive(tmp_path)
    monkeypatch.setenv("CKPTCTL_DRIVE", str(drive))
    write_run(tmp_path / "work", "old_run", n=1, drive=drive)
    write_run(tmp_path / "work", "new_run", n=2, drive=drive)
    result = invoke("restore", "--from-drive", "--to", "restored")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "restored" / "new_run" / "checkpoint_metadata.json").is_file()
    assert not (tmp_path / "restored" / "old_run").exists()
    assert "Resume will start from checkpoint 1" in result.stdout
    named = invoke("restore", "--from-drive", "--run", "old_run", "--to", "restored")
    assert named.exit_code == 0 and (tmp_path / "restored" / "old_run").is_dir()


def test_restore_continues_an_interrupted_restore(tmp_path):
    drive = _drive(tmp_path)
    write_run(tmp_path / "work", "run_a", n=4, drive=drive)
    assert invoke("restore", "--from-drive", "--drive", drive).exit_code == 0
    local = tmp_path / "runs" / "run_a"
    # as if killed while copying checkpoint 3: its file never got its final name, a temporary is left
    ckpt(local, 3).rename(local / "checkpoints" / ".ckptctl-tmp-checkpoint_00003.pt.dead")
    doc = json.loads(invoke("restore", "--from-drive", "--drive", drive, "--json").stdout)
    assert doc["copied"] == ["checkpoints/checkpoint_00003.pt"]
    assert len(doc["already_present"]) == 4
    assert not any(p.name.startswith(".ckptctl-tmp-") for p in (local / "checkpoints").iterdir())
    assert checksum(ckpt(local, 3)) == index_of(local)["checkpoints"][3]["checksum"]


def test_restore_repairs_a_damaged_local_copy(tmp_path):
    drive = _drive(tmp_path)
    write_run(tmp_path / "work", "run_a", n=2, drive=drive)
    invoke("restore", "--from-drive", "--drive", drive)
    local = tmp_path / "runs" / "run_a"
    ckpt(local, 1).write_bytes(b"garbage")
    doc = json.loads(invoke("restore", "--from-drive", "--drive", drive, "--json").stdout)
    assert doc["copied"] == ["checkpoints/checkpoint_00001.pt"]
    assert invoke("verify", "runs").exit_code == 0


def test_restore_never_overwrites_newer_local_without_force(tmp_path):
    drive = _drive(tmp_path)
    write_run(tmp_path / "work", "run_a", n=3, drive=drive)
    invoke("restore", "--from-drive", "--drive", drive)
    local = tmp_path / "runs" / "run_a"
    # local checkpoint 2 was rewritten later than the mirror's (different bytes, newer timestamp)
    newer = ckpt(local, 1).read_bytes()
    ckpt(local, 2).write_bytes(newer)
    index = index_of(local)
    index["checkpoints"][2].update(checksum=checksum(ckpt(local, 2)), size_bytes=len(newer), timestamp="2999-01-01T00:00:00+00:00")
    write_index(local, index)
    doc = json.loads(invoke("restore", "--from-drive", "--drive", drive, "--json").stdout)
    assert doc["kept_local"] == ["checkpoints/checkpoint_00002.pt"]
    assert ckpt(local, 2).read_bytes() == newer
    forced = json.loads(invoke("restore", "--from-drive", "--drive", drive, "--force", "--json").stdout)
    assert forced["copied"] == ["checkpoints/checkpoint_00002.pt"]
    assert ckpt(local, 2).read_bytes() == ckpt(drive / "run_a", 2).read_bytes()
    assert invoke("verify", "runs").exit_code == 0


def test_restore_keeps_local_checkpoints_beyond_the_mirror(tmp_path):
    drive = _drive(tmp_path)
    write_run(tmp_path / "runs", "run_a", n=2)
    assert invoke("backup", "runs/run_a", "--drive", drive).exit_code == 0
    write_run(tmp_path / "runs", "run_a", n=2)  # trains on locally: checkpoints 2, 3 are not on the mirror
    doc = json.loads(invoke("restore", "--from-drive", "--drive", drive, "--json").stdout)
    assert doc["copied"] == [] and doc["resume_id"] == 3
    assert [e["id"] for e in index_of(tmp_path / "runs" / "run_a")["checkpoints"]] == [0, 1, 2, 3]


def test_restore_single_id(tmp_path):
    drive = _drive(tmp_path)
    write_run(tmp_path / "work", "run_a", n=3, drive=drive)
    doc = json.loads(invoke("restore", "--from-drive", "--drive", drive, "--id", "1", "--json").stdout)
    local = tmp_path / "runs" / "run_a"
    assert "checkpoints/checkpoint_00001.pt" in doc["copied"]
    assert [e["id"] for e in index_of(local)["checkpoints"]] == [1]
    assert invoke("restore", "--from-drive", "--drive", drive, "--id", "9").exit_code == 2


def test_restore_errors(tmp_path):
    missing = invoke("restore", "--from-drive", "--drive", tmp_path / "not_mounted")
    assert missing.exit_code == 2 and "is Drive mounted" in missing.stderr
    default_missing = invoke("restore", "--from-drive")  # CKPTCTL_DRIVE points into tmp_path, not there
    assert default_missing.exit_code == 2 and "drive_default" in default_missing.stderr
    assert invoke("restore").exit_code == 2
    drive = _drive(tmp_path)
    write_run(tmp_path / "work", "run_a", n=1, drive=drive)
    unknown = invoke("restore", "--from-drive", "--drive", drive, "--run", "nope")
    assert unknown.exit_code == 2 and "run_a" in unknown.stderr


def test_restore_refuses_while_local_run_is_in_use(tmp_path):
    from ckptctl import ModelPersistence

    drive = _drive(tmp_path)
    write_run(tmp_path / "work", "run_a", n=2, drive=drive)
    trainer = ModelPersistence(tmp_path / "runs" / "run_a")
    try:
        result = invoke("restore", "--from-drive", "--drive", drive)
        assert result.exit_code == 1 and "locked" in result.stderr
    finally:
        trainer.close()


def test_restore_rejects_a_mirror_file_that_does_not_match_its_checksum(tmp_path):
    drive = _drive(tmp_path)
    write_run(tmp_path / "work", "run_a", n=2, drive=drive)
    bad = ckpt(drive / "run_a", 1)
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    result = invoke("restore", "--from-drive", "--drive", drive)
    assert result.exit_code == 1 and "checksum mismatch" in result.stderr
    assert not ckpt(tmp_path / "runs" / "run_a", 1).exists()
    assert [e["id"] for e in index_of(tmp_path / "runs" / "run_a")["checkpoints"]] == [0]


def test_backup_errors_and_lock(tmp_path, make_run):
    run = make_run(n=1)
    missing = invoke("backup", "runs", "--drive", tmp_path / "nodrive")
    assert missing.exit_code == 2 and "is Drive mounted" in missing.stderr
    assert invoke("backup", "nothere", "--drive", _drive(tmp_path)).exit_code == 2
    make_run.lock(run)
    locked = invoke("backup", "runs", "--drive", _drive(tmp_path))
    assert locked.exit_code == 1 and "locked" in locked.stderr
    make_run.unlock(run)
    not_yet = invoke("backup", "runs")  # default drive: $CKPTCTL_DRIVE, which does not exist yet
    assert not_yet.exit_code == 2
    os.makedirs(os.environ["CKPTCTL_DRIVE"])
    assert invoke("backup", "runs").exit_code == 0
    assert (tmp_path / "drive_default" / "run_a" / "checkpoint_metadata.json").is_file()


def test_restore_reports_hostile_mirror_entries_and_restores_the_rest(tmp_path):
    drive = _drive(tmp_path)
    write_run(tmp_path / "work", "run_a", n=2, drive=drive)
    secret = tmp_path / "secret.pt"
    secret.write_bytes(b"not yours")
    mirror = drive / "run_a"
    index = index_of(mirror)
    index["checkpoints"].append(dict(index["checkpoints"][0], id=7, path="../../secret.pt"))
    write_index(mirror, index)
    result = invoke("restore", "--from-drive", "--drive", drive, "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["problems"] == ["mirror index entry 7 skipped: path in metadata leaves the run directory: '../../secret.pt'"]
    local = tmp_path / "runs" / "run_a"
    assert [e["id"] for e in index_of(local)["checkpoints"]] == [0, 1]
    assert not any(p.read_bytes() == b"not yours" for p in local.rglob("*") if p.is_file())


def test_backup_of_a_run_without_index_is_refused(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=1)
    (run / "checkpoint_metadata.json").unlink()
    result = invoke("backup", "runs", "--drive", _drive(tmp_path))
    assert result.exit_code == 1 and "has no index" in result.stderr
