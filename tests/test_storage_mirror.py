"""The Drive mirror's sync on real folders: stale leftovers, damaged copies, retention order."""

from __future__ import annotations

import os
import time

import pytest
import torch

from ckptctl import ModelPersistence
from ckptctl.core.format import TEMP_PREFIX
from ckptctl.storage.mirror import sync_run
from ckptctl.storage.scan import read_index

from .damage import truncate
from .mirror_helpers import assert_mirror_index_verifies, sync_and_record


#: The runs these tests mirror: checkpoints of a bare Linear(4, 4), no optimizer, no best model.
BARE = {"shape": (4, 4), "optimizer": None, "best": False}


def test_stale_partial_files_are_cleaned_and_damaged_copies_replaced(tmp_path, make_run):
    local, mirror = make_run("r", 3, **BARE), tmp_path / "drive" / "r"
    mirror.parent.mkdir()
    sync_run(local, mirror)
    stale = mirror / "checkpoints" / f"{TEMP_PREFIX}checkpoint_00003.pt.0bad"
    stale.write_bytes(b"half a file from a session that died")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    in_flight = mirror / "checkpoints" / f"{TEMP_PREFIX}checkpoint_00007.pt.0ther"
    in_flight.write_bytes(b"another machine is copying this right now")
    victim = mirror / "checkpoints" / "checkpoint_00001.pt"
    truncate(victim)  # truncated on Drive after it was verified
    report = sync_run(local, mirror)
    assert not stale.exists()
    assert in_flight.exists()  # not this writer's, and still being written: never deleted
    assert report.copied == ["checkpoints/checkpoint_00001.pt"]
    assert_mirror_index_verifies(mirror)


def test_mirror_deletes_old_copies_only_after_the_newer_ones_verify(tmp_path, make_run):
    local, mirror = tmp_path / "runs" / "r", tmp_path / "drive" / "r"
    mirror.parent.mkdir()
    make_run("r", 2, keep=2, **BARE)
    sync_and_record(local, mirror)
    assert sorted(os.listdir(mirror / "checkpoints")) == ["checkpoint_00000.pt", "checkpoint_00001.pt"]
    make_run("r", 2, keep=2, **BARE)  # local now holds 2, 3 and has deleted (retired) the mirrored 0, 1
    assert read_index(local).retired == (0, 1)
    (mirror / "checkpoints" / "checkpoint_00003.pt").mkdir()  # this copy will fail (a Drive error)
    with pytest.raises(IsADirectoryError, match="checkpoint_00003.pt"):
        sync_run(local, mirror)
    # the old copies are still there (and no temporary is left), and the mirror index lists only verified files
    assert sorted(os.listdir(mirror / "checkpoints")) == ["checkpoint_00000.pt", "checkpoint_00001.pt", "checkpoint_00003.pt"]
    assert_mirror_index_verifies(mirror)
    (mirror / "checkpoints" / "checkpoint_00003.pt").rmdir()  # Drive recovers
    sync_and_record(local, mirror)
    assert sorted(os.listdir(mirror / "checkpoints")) == ["checkpoint_00002.pt", "checkpoint_00003.pt"]
    assert [c.id for c in read_index(mirror).checkpoints] == [2, 3]
    assert_mirror_index_verifies(mirror)


def test_a_vanished_drive_folder_is_not_recreated_on_the_local_disk(tmp_path, make_run):
    local = make_run("r", 1, **BARE)
    drive = tmp_path / "drive"  # never mounted / unmounted: the folder is gone
    with pytest.raises(FileNotFoundError):
        sync_run(local, drive / "r")
    assert not drive.exists()


def test_background_mirror_backs_off_and_logs_a_cause_once(tmp_path, make_run, caplog, monkeypatch):
    import logging
    import time

    from ckptctl.storage import mirror as mirror_module

    local = make_run("r", 1, **BARE)
    drive = tmp_path / "drive"
    attempts = []
    real_sync = mirror_module.sync_run
    monkeypatch.setattr(mirror_module, "sync_run", lambda *a, **k: (attempts.append(1), real_sync(*a, **k))[1])
    caplog.set_level(logging.WARNING, logger="ckptctl.mirror")
    mirror = mirror_module.BackgroundMirror(local, drive / "r", initial_backoff=0.3, max_backoff=0.3)
    for _ in range(40):  # a save every 10 ms must not turn the backoff into a busy retry loop
        mirror.request()
        time.sleep(0.01)
    assert len(attempts) <= 3, attempts  # ~0.4 s at one try per 0.3 s
    failures = [r for r in caplog.records if "failed (will retry)" in r.getMessage()]
    assert len(failures) == 1  # one line for one cause
    drive.mkdir()  # Drive comes back
    assert mirror.wait_idle(timeout=5)
    assert mirror.stop(timeout=5)
    assert_mirror_index_verifies(drive / "r")
    assert any("recovered" in r.getMessage() for r in caplog.records)


def test_copies_of_a_sync_that_failed_later_are_still_recorded_as_mirrored(tmp_path, make_run):
    """A failed sync's report is lost; the next sync skips those copies but must still report them mirrored."""
    local, mirror = make_run("r", 2, **BARE), tmp_path / "drive" / "r"
    mirror.mkdir(parents=True)
    (mirror / "checkpoints").mkdir()
    (mirror / "checkpoints" / "checkpoint_00000.pt").mkdir()  # the copy of 0 fails, after 1 (newest first) is copied
    with pytest.raises(IsADirectoryError, match="checkpoint_00000.pt"):
        sync_run(local, mirror)
    (mirror / "checkpoints" / "checkpoint_00000.pt").rmdir()
    report = sync_run(local, mirror)
    assert report.copied == ["checkpoints/checkpoint_00000.pt"] and report.skipped == ["checkpoints/checkpoint_00001.pt"]
    checksums = {e.id: e.checksum for e in read_index(local).checkpoints}
    assert {i: m["checksum"] for i, m in report.mirrored.items()} == checksums


def test_a_best_model_that_changed_under_the_sync_is_left_for_the_next_one(tmp_path):
    """best_model.pt is replaced before best_metadata.json: a sync between the two must not fail as a whole."""
    local, mirror = tmp_path / "runs" / "r", tmp_path / "drive" / "r"
    mirror.parent.mkdir()
    model = torch.nn.Linear(4, 4)
    with ModelPersistence(local, max_checkpoints=2, save_every_n_batches=1, background=False, best_metric="acc") as p:
        for batch in range(2):
            p.maybe_save(0, batch, {"acc": float(batch)}, agent=model)
            p.update_best(0, batch, {"acc": float(batch)}, agent=model)
    sync_and_record(local, mirror)
    mirrored_best = (mirror / "best_model.pt").read_bytes()
    with ModelPersistence(local, max_checkpoints=2, save_every_n_batches=1, background=False, best_metric="acc") as p:
        p.maybe_save(0, 2, {"acc": 2.0}, agent=model)  # checkpoint 2; 0 is pruned
        p.update_best(0, 2, {"acc": 2.0}, agent=model)  # a new best the mirror has not seen...
    best = (local / "best_model.pt").read_bytes()
    (local / "best_model.pt").write_bytes(best[:-8] + b"newer!!!")  # ...already replaced by a newer one
    report = sync_run(local, mirror)
    assert report.copied == ["checkpoints/checkpoint_00002.pt"]
    assert (mirror / "best_model.pt").read_bytes() == mirrored_best  # the previous best is kept
    assert sorted(os.listdir(mirror / "checkpoints")) == ["checkpoint_00001.pt", "checkpoint_00002.pt"]
    assert_mirror_index_verifies(mirror)
