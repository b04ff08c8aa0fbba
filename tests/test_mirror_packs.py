"""The Drive mirror, backup and restore of format-2 runs: tensor packs are the unit copied.

A frozen component is uploaded once; each later save uploads only its new tensors; the
budget counts unique bytes; restore copies each checkpoint's packs (checked by name) before
its file; a damaged pack on Drive is never restored as good; a SIGKILL anywhere in a backup
or a restore leaves nothing that lists a missing pack. Real runs, real folders as the Drive.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ckptctl import torch_io
from ckptctl.core.objects import pack_relpath, referenced_packs
from ckptctl.ops import verify_runs
from ckptctl.storage import mirror as mirror_module
from ckptctl.storage.mirror import read_mirror_status, sync_run, tree_bytes
from ckptctl.storage.objects import stored_pack_names
from ckptctl.storage.runfiles import best_records, collect_packs, commit_removal, delete_checkpoint_files, finish_removal
from ckptctl.storage.scan import read_best, read_best_record, read_index
from ckptctl.tensors import compare_states, tensor_bytes
from tests.cli_helpers import invoke

from . import crash_child
from .damage import flip_byte
from .mirror_helpers import sync_and_record
from .runs import ckpt, write_run


class FrozenAndTrained:
    """A frozen ``Linear(*frozen)`` (never stepped) beside a trained ``Linear(*trained)`` with Adam (a ``tests.runs`` trainer)."""

    def __init__(self, frozen: tuple[int, int], trained: tuple[int, int]):
        self.frozen = torch.nn.Linear(*frozen).requires_grad_(False)
        self.agent = torch.nn.Linear(*trained)
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=1e-2)

    def components(self) -> dict:
        return {"frozen": self.frozen, "agent": self.agent, "optimizer": self.optimizer}

    def step(self) -> float:
        loss = self.agent(torch.randn(3, self.agent.in_features)).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def state_bytes(self) -> tuple[int, int]:
        """Bytes of (the frozen state, the trained state: weights and Adam's two moments of each)."""
        return tensor_bytes(self.frozen.state_dict()), 3 * tensor_bytes(self.agent.state_dict())


def _snapshot(trainer: FrozenAndTrained) -> dict:
    """The state a checkpoint of ``trainer`` must restore, copied now."""
    return {
        "frozen": {k: v.clone() for k, v in trainer.frozen.state_dict().items()},
        "agent": {k: v.clone() for k, v in trainer.agent.state_dict().items()},
        "optimizer_state": {k: {n: t.clone() for n, t in s.items()} for k, s in trainer.optimizer.state_dict()["state"].items()},
    }


def _same_state(payload: dict, expected: dict) -> list[str]:
    """Names of the tensors of ``payload`` that differ from ``expected`` (a :func:`_snapshot`); empty when all are bit-identical."""
    got = {"frozen": payload["frozen"], "agent": payload["agent"], "optimizer_state": payload["optimizer"]["state"]}
    want = {k: expected[k] for k in got}
    rows = compare_states(got, want)
    assert rows, "no tensors compared"
    return [r.name for r in rows if not r.bit_identical]


def _packs_listed(run) -> dict[str, int]:
    """Every pack the run's index and best record list."""
    return referenced_packs([*read_index(run).checkpoints, *best_records(read_best_record(run))])


def _assert_every_listed_pack_is_there(run) -> None:
    stored = stored_pack_names(run)
    missing = {name: size for name, size in _packs_listed(run).items() if stored.get(name) != size}
    assert missing == {}, f"{run} lists packs it does not hold: {missing}"


# --------------------------------------------------------------------------- a frozen component, end to end


def test_a_frozen_component_is_uploaded_once_and_every_checkpoint_restores_from_drive(tmp_path):
    """8 MB frozen + 0.8 MB trained (with Adam), save 10, keep 5, a best model, mirrored within a unique-bytes budget."""
    torch.manual_seed(0)
    trainer = FrozenAndTrained(frozen=(1024, 2048), trained=(256, 256))
    frozen, trained = trainer.state_bytes()
    assert frozen > 8_000_000 and 700_000 < trained < 900_000
    goal = 1.3 * (frozen + 6 * trained) + 1_000_000  # the goal for keep-5 plus the best model
    drive, local = tmp_path / "drive", tmp_path / "work" / "r"
    drive.mkdir()
    expected, uploads = {}, []
    for save in range(10):
        write_run(local.parent, "r", n=1, keep=5, best_at=3, trainer=trainer)  # the best model stays checkpoint 3's
        expected[save] = _snapshot(trainer)
        report = sync_and_record(local, drive / "r", max_bytes=int(goal))
        assert report.newest_verified_id == save and report.not_mirrored == [] and report.damaged == []
        uploads.append(report.uploaded_bytes)
    # each save after the first uploads about its trained state; the frozen part went once
    assert uploads[0] > frozen
    assert all(trained <= u < 1.2 * trained + 50_000 for u in uploads[1:]), (uploads, trained)
    assert tree_bytes(drive / "r") <= goal  # full copies would be 6 x 9.2 MB
    on_drive = [e.id for e in read_index(drive / "r").checkpoints]
    assert {e.id for e in read_index(local).checkpoints} <= set(on_drive) and on_drive[-1] == 9  # (3: the best's source)
    assert read_best(drive / "r").source_id == 3 and read_best(drive / "r").checksum == read_best(local).checksum
    _assert_every_listed_pack_is_there(drive / "r")
    assert set(stored_pack_names(drive / "r")) == set(_packs_listed(drive / "r"))  # retired copies' packs went
    assert all(r.status == "ok" for r in verify_runs([drive / "r"]))

    again = invoke("backup", local, "--drive", drive, "--json")  # everything is there: nothing is uploaded again
    assert again.exit_code == 0, again.stderr
    (run_doc,) = json.loads(again.stdout)["runs"]
    assert run_doc["uploaded_bytes"] == 0 and run_doc["objects_copied"] == []
    assert read_mirror_status(local)["uploaded_bytes"] == 0

    restored = invoke("restore", "--from-drive", "--drive", drive, "--to", tmp_path / "fresh", "--json")
    assert restored.exit_code == 0, restored.stderr
    doc = json.loads(restored.stdout)
    assert len(doc["objects_copied"]) == len(_packs_listed(drive / "r")) and doc["resume_id"] == 9
    fresh = tmp_path / "fresh" / "r"
    for checkpoint_id in on_drive:
        assert _same_state(torch_io.safe_load(ckpt(fresh, checkpoint_id)), expected[checkpoint_id]) == []
    assert _same_state(torch_io.safe_load(fresh / "best_model.pt"), expected[3]) == []
    assert all(r.status == "ok" for r in verify_runs([fresh]))
    listed = lambda run: {e.id: (e.objects, e.state_bytes) for e in read_index(run).checkpoints}  # noqa: E731
    assert listed(fresh) == listed(drive / "r") and read_best(fresh).objects == read_best(local).objects


# --------------------------------------------------------------------------- damage and races


def _small_run(parent, n: int, keep: int = 5, trainer: FrozenAndTrained | None = None):
    torch.manual_seed(0)
    trainer = trainer or FrozenAndTrained(frozen=(64, 64), trained=(8, 8))
    return write_run(parent, "r", n=n, keep=keep, trainer=trainer), trainer


def test_a_damaged_pack_on_drive_is_not_restored_as_good(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir()
    local, _ = _small_run(tmp_path / "work", 3, keep=5)
    assert invoke("backup", local, "--drive", drive).exit_code == 0
    mirror = drive / "r"
    newest = read_index(mirror).latest
    own = [name for name in newest.objects if name not in read_index(mirror).checkpoints[0].objects]
    assert len(own) == 1  # the newest checkpoint's own pack (the others share the first save's)
    flip_byte(mirror / pack_relpath(own[0]))

    result = invoke("restore", "--from-drive", "--drive", drive, "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    problems = [p for p in doc["problems"] if p.startswith(newest.path)]
    assert len(problems) == 1 and pack_relpath(own[0]) in problems[0] and "checksum mismatch" in problems[0]
    restored = tmp_path / "runs" / "r"
    assert [e.id for e in read_index(restored).checkpoints] == [0, 1]  # the others restore; the damaged one is not listed
    assert not ckpt(restored, newest.id).exists() and own[0] not in stored_pack_names(restored)
    assert not (restored / "best_model.pt").exists()  # the best model (a copy of the newest) uses that pack too
    assert all(r.status == "ok" for r in verify_runs([restored]))

    # a damaged pack shared by every checkpoint: none of them is restored as good
    shutil.rmtree(restored)
    flip_byte(mirror / pack_relpath(next(iter(read_index(mirror).checkpoints[0].objects))))
    shared = invoke("restore", "--from-drive", "--drive", drive, "--json")
    assert shared.exit_code == 1
    assert read_index(restored).checkpoints == () and not (restored / "best_model.pt").exists()
    assert len(json.loads(shared.stdout)["problems"]) == 4  # three checkpoints and the best model, each named


def test_a_pack_retention_deletes_during_its_copy_is_skipped_like_a_pruned_checkpoint(tmp_path, monkeypatch):
    """Local retention removes checkpoint 1 (index, file, then its pack) between the mirror's look at it and its pack copy."""
    local, _ = _small_run(tmp_path / "work", 3, keep=5)
    mirror = tmp_path / "drive" / "r"
    mirror.parent.mkdir()
    victim = read_index(local).by_id()[1]
    victim_pack = next(name for name in victim.objects if name not in read_index(local).checkpoints[0].objects)
    real_copy = mirror_module._copy_verified

    def retention_strikes_first(src, dst, *args, **kwargs):
        if dst.name.startswith(victim_pack):  # what the trainer's retention does, in its order
            index = read_index(local)
            kept = index.with_entries([e for e in index.checkpoints if e.id != 1]).retire([1])
            committed = commit_removal(local, kept, [victim])
            delete_checkpoint_files(local, [victim])
            finish_removal(local, committed, [1])
            assert victim_pack in collect_packs(local, [*read_index(local).checkpoints, read_best(local)])
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(mirror_module, "_copy_verified", retention_strikes_first)
    report = sync_run(local, mirror)  # no failure, no retry: the checkpoint is simply gone
    assert report.damaged == [] and 1 not in {e.id for e in read_index(mirror).checkpoints}
    assert report.newest_verified_id == 2
    _assert_every_listed_pack_is_there(mirror)
    assert all(r.status == "ok" for r in verify_runs([mirror]))


def test_an_interrupted_restore_copies_only_what_is_missing_and_repairs_a_damaged_local_pack(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir()
    local, _ = _small_run(tmp_path / "work", 3, keep=5)
    assert invoke("backup", local, "--drive", drive).exit_code == 0
    assert invoke("restore", "--from-drive", "--drive", drive).exit_code == 0
    restored = tmp_path / "runs" / "r"
    # as a kill after checkpoint 2's packs were copied, before its file: its file and index entry are not there
    ckpt(restored, 2).unlink()
    raw = json.loads((restored / "checkpoint_metadata.json").read_text())
    raw["checkpoints"] = [e for e in raw["checkpoints"] if e["id"] != 2]
    (restored / "checkpoint_metadata.json").write_text(json.dumps(raw))
    doc = json.loads(invoke("restore", "--from-drive", "--drive", drive, "--json").stdout)
    assert doc["copied"] == ["checkpoints/checkpoint_00002.pt"] and doc["objects_copied"] == []  # its packs are there
    # a damaged local pack is copied again (only it), for every checkpoint that uses it
    shared = next(iter(read_index(restored).checkpoints[0].objects))
    flip_byte(restored / pack_relpath(shared))
    doc = json.loads(invoke("restore", "--from-drive", "--drive", drive, "--json").stdout)
    assert doc["objects_copied"] == [pack_relpath(shared)] and doc["problems"] == []
    assert all(r.status == "ok" for r in verify_runs([restored]))


# --------------------------------------------------------------------------- SIGKILL anywhere


@pytest.fixture(scope="module")
def moving_run(tmp_path_factory):
    """A run mirrored once (saves 0-2), then trained on (3-5, keep 2): a backup copies new packs and deletes old ones."""
    base = tmp_path_factory.mktemp("moving")
    torch.manual_seed(0)
    trainer = FrozenAndTrained(frozen=(64, 64), trained=(8, 8))
    local = write_run(base / "local", "r", n=3, keep=2, best_at=2, trainer=trainer)
    (base / "drive").mkdir()
    sync_and_record(local, base / "drive" / "r")
    # the best model stays checkpoint 2's, which retention removes: its pack stays for the best model alone
    write_run(base / "local", "r", n=3, keep=2, best_at=2, trainer=trainer)
    assert read_index(local).retired  # mirrored copies local retention removed: the backup deletes them and their packs
    return base


def _assert_mirror_lists_only_what_it_holds(mirror) -> None:
    """What verify checks after a kill: everything listed verifies; an emptied leftover of a deletion may remain."""
    _assert_every_listed_pack_is_there(mirror)
    indexed = {e.id for e in read_index(mirror).checkpoints}
    for result in verify_runs([mirror]):
        leftover = result.id is not None and result.id not in indexed and ckpt(mirror, result.id).stat().st_size == 0
        assert result.status == "ok" or leftover, result


def test_backup_killed_anywhere_never_leaves_the_mirror_listing_a_missing_pack(moving_run, tmp_path, fork_context):
    def make_case(case):
        shutil.copytree(moving_run, case)

    def check(case):
        mirror = case / "drive" / "r"
        _assert_mirror_lists_only_what_it_holds(mirror)
        sync_run(case / "local" / "r", mirror)  # the next sync finishes the job and collects what the kill left
        assert all(r.status == "ok" for r in verify_runs([mirror]))
        assert set(stored_pack_names(mirror)) == set(_packs_listed(mirror))
        assert [e.id for e in read_index(mirror).checkpoints] == [e.id for e in read_index(case / "local" / "r").checkpoints]

    args = lambda case: ["backup", str(case / "local" / "r"), "--drive", str(case / "drive")]  # noqa: E731
    assert crash_child.kill_sweep(fork_context, tmp_path, make_case, args, check) >= 10


@pytest.mark.slow
def test_restore_killed_anywhere_continues_and_restores_every_checkpoint(moving_run, tmp_path, fork_context):
    source = tmp_path / "source"
    shutil.copytree(moving_run, source)
    sync_and_record(source / "local" / "r", source / "drive" / "r")
    expected = {e.id: torch_io.safe_load(ckpt(source / "local" / "r", e.id)) for e in read_index(source / "local" / "r").checkpoints}

    def make_case(case):
        shutil.copytree(source / "drive", case / "drive")

    def check(case):
        restored = case / "runs" / "r"
        if (restored / "checkpoint_metadata.json").exists():
            _assert_every_listed_pack_is_there(restored)
            assert all(r.status == "ok" for r in verify_runs([restored]))
        again = invoke("restore", "--from-drive", "--drive", case / "drive", "--to", case / "runs")
        assert again.exit_code == 0, again.stderr
        assert sorted(e.id for e in read_index(restored).checkpoints) == sorted(expected)
        for checkpoint_id, payload in expected.items():
            rows = compare_states(torch_io.safe_load(ckpt(restored, checkpoint_id)), payload)
            assert rows and all(r.bit_identical for r in rows)

    args = lambda case: ["restore", "--from-drive", "--drive", str(case / "drive"), "--to", str(case / "runs")]  # noqa: E731
    assert crash_child.kill_sweep(fork_context, tmp_path, make_case, args, check) >= 6
