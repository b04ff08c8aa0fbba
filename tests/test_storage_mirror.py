"""The Drive mirror's sync on real folders: stale leftovers, damaged copies, retention order."""

from __future__ import annotations

import os

import pytest
import torch

from ckptctl import ModelPersistence
from ckptctl.core.format import TEMP_PREFIX
from ckptctl.storage.atomic import verify_checksum
from ckptctl.storage.mirror import sync_run
from ckptctl.storage.scan import read_index


def _run(path, n, keep=5):
    model = torch.nn.Linear(4, 4)
    with ModelPersistence(path, max_checkpoints=keep, save_every_n_batches=1, background=False) as p:
        for batch in range(n):
            with torch.no_grad():
                model.weight.add_(1.0)
            p.maybe_save(0, batch, {"loss": float(batch)}, agent=model)
    return path


def _assert_mirror_verifies(mirror):
    for entry in read_index(mirror).checkpoints:
        verify_checksum(mirror / entry.path, entry.checksum)


def test_stale_partial_files_are_cleaned_and_damaged_copies_replaced(tmp_path):
    local, mirror = _run(tmp_path / "runs" / "r", 3), tmp_path / "drive" / "r"
    sync_run(local, mirror)
    stale = mirror / "checkpoints" / f"{TEMP_PREFIX}checkpoint_00003.pt.0bad"
    stale.write_bytes(b"half a file from a session that died")
    victim = mirror / "checkpoints" / "checkpoint_00001.pt"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated on Drive after it was verified
    report = sync_run(local, mirror)
    assert not stale.exists()
    assert report.copied == ["checkpoints/checkpoint_00001.pt"]
    _assert_mirror_verifies(mirror)


def test_mirror_deletes_old_copies_only_after_the_newer_ones_verify(tmp_path):
    local, mirror = tmp_path / "runs" / "r", tmp_path / "drive" / "r"
    _run(local, 2, keep=2)
    sync_run(local, mirror)
    assert sorted(os.listdir(mirror / "checkpoints")) == ["checkpoint_00000.pt", "checkpoint_00001.pt"]
    _run(local, 2, keep=2)  # local now holds 2, 3 and has deleted 0, 1
    (mirror / "checkpoints" / "checkpoint_00003.pt").mkdir()  # this copy will fail (a Drive error)
    with pytest.raises(OSError):
        sync_run(local, mirror)
    # the old copies are still there, and the mirror index lists only verified files
    assert {"checkpoint_00000.pt", "checkpoint_00001.pt"} <= set(os.listdir(mirror / "checkpoints"))
    _assert_mirror_verifies(mirror)
    (mirror / "checkpoints" / "checkpoint_00003.pt").rmdir()  # Drive recovers
    sync_run(local, mirror)
    assert sorted(os.listdir(mirror / "checkpoints")) == ["checkpoint_00002.pt", "checkpoint_00003.pt"]
    assert [c.id for c in read_index(mirror).checkpoints] == [2, 3]
    _assert_mirror_verifies(mirror)
