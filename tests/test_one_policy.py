"""Decisions made in one place: which run is newest, which checkpoint a resume uses."""

from __future__ import annotations

import json
import os

import torch

from ckptctl import ModelPersistence
from ckptctl.core.resume import choose_resume_checkpoint
from ckptctl.errors import CheckpointIntegrityError
from ckptctl.ops import resume_info
from ckptctl.persistence import latest_run
from ckptctl.storage.plans import plan_prune
from ckptctl.storage.restore import choose_mirror_run


def _run(path, saves: int) -> None:
    with ModelPersistence(path, max_checkpoints=5) as p:
        for batch in range(saves):
            p.save_checkpoint(0, batch, {"loss": 1.0}, agent=torch.nn.Linear(2, 2))


def test_restore_from_drive_and_resume_pick_the_same_newest_run(tmp_path):
    """By the runs' own metadata, never file times: run a trained last (its training state says so)."""
    drive = tmp_path / "drive"
    _run(drive / "a", 1)
    _run(drive / "b", 1)
    index_b = json.loads((drive / "b" / "checkpoint_metadata.json").read_text())
    index_b["checkpoints"][0]["timestamp"] = "2030-01-01T00:00:00+00:00"  # b's checkpoint is newer than a's...
    (drive / "b" / "checkpoint_metadata.json").write_text(json.dumps(index_b))
    (drive / "a" / "training_state.json").write_text(json.dumps({"updated_at": "2031-01-01T00:00:00+00:00"}))  # ...a ran later
    for path in (drive / "a").rglob("*"):  # and a's files are the oldest on disk: mtime must not decide
        os.utime(path, (1, 1))
    assert latest_run(drive).name == "a"
    assert choose_mirror_run(drive).name == "a"


def test_resume_resume_info_and_prune_agree_on_the_checkpoint_resume_uses(tmp_path):
    run = tmp_path / "run"
    _run(run, 4)
    (run / "checkpoints" / "checkpoint_00003.pt").write_bytes(b"damaged")  # the newest no longer verifies
    assert resume_info(run).checkpoint["id"] == 2
    plan = plan_prune(run, keep_last=1)
    assert 2 not in {e.id for e in plan.delete} and "newest" in plan.protected[2]
    with ModelPersistence(run) as p:
        assert p.get_resume_info()["checkpoint_id"] == 2
        meta = p.resume(agent=torch.nn.Linear(2, 2))
        assert meta["checkpoint_id"] == 2 and [s["checkpoint_id"] for s in meta["skipped"]] == [3]


def test_choose_resume_checkpoint_walks_newest_first_and_reports_what_it_skipped():
    def check(i):
        if i > 5:
            raise CheckpointIntegrityError(f"{i} is damaged")
        return f"payload {i}"

    choice = choose_resume_checkpoint([3, 7, 5, 6], check)
    assert (choice.chosen_id, choice.result) == (5, "payload 5")
    assert [(i, str(e)) for i, e in choice.skipped] == [(7, "7 is damaged"), (6, "6 is damaged")]
    none = choose_resume_checkpoint([9], check)
    assert none.chosen_id is None and none.result is None and len(none.skipped) == 1
