"""The best model is one commit: no reader and no crash ever sees best_model.pt without the record it matches.

Replacing it writes the new record as ``pending`` beside the committed one, renames the
file over (the commit), then settles the metadata. A real SIGKILL before every rename and
fsync of ``ckptctl backup`` (the Drive mirror's copy) and ``ckptctl promote`` must leave a
best model that ``verify`` passes as it lies, and the library must settle it on open.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ckptctl import ModelPersistence
from ckptctl.core.manifest import BestInfo, BestRecord
from ckptctl.errors import CorruptIndexError
from ckptctl.ops import verify_runs
from ckptctl.storage.atomic import hash_file
from ckptctl.storage.mirror import sync_run
from ckptctl.storage.runfiles import replace_best, settled_best
from ckptctl.storage.scan import read_best, read_best_record

from . import crash_child


def _info(checksum: str, source_id: int | None = 1, size: int = 10) -> BestInfo:
    return BestInfo.of_model(
        source_id=source_id, epoch=0, batch=source_id or 0, global_step=1, metrics={"acc": 0.5},
        timestamp="2026-01-01T00:00:00Z", size_bytes=size, checksum=checksum, metric="acc", mode="max",
    )


def _assert_verifies(run, *, best_only: bool = False) -> None:
    results = verify_runs([run])
    if best_only:  # a mirror cut short before its first index lists no checksums yet: not this test's subject
        results = [r for r in results if r.id is None and r.path.endswith(("best_model.pt", "best_metadata.json"))]
    bad = [r for r in results if r.status != "ok"]
    assert bad == []


def _better_best(run, value: float) -> None:
    """A new best model in ``run`` (a fresh payload, not a copy of a checkpoint)."""
    torch.manual_seed(int(value))
    model = torch.nn.Linear(16, 16)
    with ModelPersistence(run, max_checkpoints=2, best_metric="accuracy_delta") as p:
        assert p.update_best(0, 99, {"accuracy_delta": value}, agent=model)


@pytest.mark.parametrize("mirror_has_best", [False, True], ids=["first-best", "replaced-best"])
def test_backup_killed_anywhere_leaves_a_mirror_best_that_verifies(mirror_has_best, base_run, tmp_path, fork_context):
    source = tmp_path / "source"
    shutil.copytree(base_run, source / "run")
    drive_base = tmp_path / "drive-base"
    drive_base.mkdir()
    if mirror_has_best:  # the mirror already holds the run's best model; a better one replaces it
        sync_run(source / "run", drive_base / "run")
        _better_best(source / "run", 100.0)

    def make_case(case):
        shutil.copytree(source, case / "local")
        shutil.copytree(drive_base, case / "drive")

    def check(case):
        mirror_run = case / "drive" / "run"
        if mirror_run.exists():
            _assert_verifies(mirror_run, best_only=True)
        # the next backup converges: the mirror's best record settled, matching its file and the local best
        sync_run(case / "local" / "run", mirror_run)
        record = read_best_record(mirror_run)
        assert record.pending is None
        assert hash_file(mirror_run / "best_model.pt")[1] == record.current.checksum == read_best(case / "local" / "run").checksum

    kills = crash_child.kill_sweep(
        fork_context, tmp_path, make_case, lambda case: ["backup", str(case / "local" / "run"), "--drive", str(case / "drive")], check
    )
    assert kills >= 4


def test_promote_killed_anywhere_leaves_a_best_that_verifies_and_settles_on_open(base_run, tmp_path, fork_context):
    def make_case(case):
        shutil.copytree(base_run, case / "run")

    def check(case):
        run = case / "run"
        _assert_verifies(run)
        with ModelPersistence(run, max_checkpoints=2):
            pass
        record = read_best_record(run)
        assert record.pending is None  # settled on open
        assert hash_file(run / "best_model.pt")[1] == record.current.checksum
        assert record.current.source_id in (1, 2)  # the old best (from 2) or the promoted checkpoint 1

    kills = crash_child.kill_sweep(fork_context, tmp_path, make_case, lambda case: ["promote", str(case / "run"), "1"], check)
    assert kills >= 3


def test_best_record_round_trip_and_pending_alone():
    current, pending = _info("xxh3_128:" + "a" * 32, 1), _info("xxh3_128:" + "b" * 32, 2)
    record = BestRecord(current, pending)
    again = BestRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    assert again.checksums() == (current.checksum, pending.checksum)
    assert again.describing(pending.checksum) == pending and again.describing("xxh3_128:" + "c" * 32) is None
    assert again.source_ids() == {1, 2}
    first = BestRecord.from_dict(BestRecord(None, pending).to_dict())
    assert first.current is None and first.pending == pending
    with pytest.raises(CorruptIndexError, match="checksum"):
        BestRecord.from_dict({"format_version": 1})


def test_first_best_killed_before_its_rename_is_no_best(tmp_path):
    """A pending record alone, with no file: verify reports nothing, the library opens with no best model."""
    run = tmp_path / "run"
    with ModelPersistence(run) as p:
        p.save_checkpoint(0, 0, {"accuracy_delta": 0.1}, agent=torch.nn.Linear(2, 2))
    (run / "best_metadata.json").write_text(json.dumps(BestRecord(None, _info("xxh3_128:" + "b" * 32)).to_dict()))
    _assert_verifies(run)
    assert read_best(run) is None
    with ModelPersistence(run):
        pass
    assert not (run / "best_metadata.json").exists()


def test_replace_best_writes_the_pending_record_before_the_rename(tmp_path):
    """What a reader sees at the moment of the rename: the old file, described by the committed record, and the pending one."""
    run = tmp_path / "run"
    run.mkdir()
    seen = []

    def write_file(before):
        (run / "best_model.pt").write_bytes(b"new")
        _, checksum = hash_file(run / "best_model.pt")
        before(3, checksum)
        seen.append(read_best_record(run))
        return 3, checksum

    (run / "best_model.pt").write_bytes(b"old")
    old = _info(hash_file(run / "best_model.pt")[1], 1, 3)
    (run / "best_metadata.json").write_text(json.dumps(old.to_dict()))
    new = replace_best(run, write_file, lambda size, checksum: _info(checksum, 2, size))
    assert seen[0].current == old and seen[0].pending == new
    assert read_best_record(run) == BestRecord(new)
    assert settled_best(run) == new
