"""``ckptctl prune`` and ``promote``: plans, protection rules, confirmation, the run lock."""

from __future__ import annotations

import json
import os

import pytest

from tests.cli_helpers import invoke
from tests.damage import flip_byte
from tests.format_helpers import packs_of, stored_packs
from tests.runs import ckpt, fresh_components, index_of, write_index, write_run


def _ids(run):
    return [e["id"] for e in index_of(run)["checkpoints"]]


def _files(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _checkpoint_paths(deleted):
    """The checkpoint files among the paths prune reports deleted (the packs it collected follow them)."""
    return sorted(p for p in deleted if p.startswith("checkpoints/"))


def _freed_by(run, ids):
    """Bytes deleting checkpoints ``ids`` frees: their files, and the packs no other checkpoint nor the best model lists."""
    others = packs_of(run, {e["id"] for e in index_of(run)["checkpoints"]} - set(ids), best=True)
    stored = stored_packs(run)
    return sum(os.path.getsize(ckpt(run, i)) for i in ids) + sum(stored[n] for n in packs_of(run, ids) - others)


def test_prune_dry_run_deletes_nothing(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=5)
    before_files, before_index = _files(run), (run / "checkpoint_metadata.json").read_bytes()
    result = invoke("prune", "--keep", "2", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "Would delete 3 checkpoint(s)" in result.stdout and "dry run" in result.stdout
    assert _files(run) == before_files
    assert (run / "checkpoint_metadata.json").read_bytes() == before_index
    doc = json.loads(invoke("prune", "--keep", "2", "--dry-run", "--json").stdout)
    (r,) = doc["runs"]
    assert [d["id"] for d in r["delete"]] == [0, 1, 2]
    assert r["bytes_freed"] == _freed_by(run, [0, 1, 2]) > sum(os.path.getsize(ckpt(run, i)) for i in range(3))
    assert _files(run) == before_files


def test_prune_keep_deletes_oldest_but_keeps_best_source(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=6, best_at=1)
    result = invoke("prune", "runs/run_a", "--keep", "2", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    assert _ids(run) == [1, 4, 5]
    assert _files(run) == ["checkpoint_00001.pt", "checkpoint_00004.pt", "checkpoint_00005.pt"]
    (r,) = json.loads(result.stdout)["runs"]
    assert _checkpoint_paths(r["deleted"]) == [f"checkpoints/checkpoint_0000{i}.pt" for i in (0, 2, 3)]
    assert invoke("verify", "runs/run_a").exit_code == 0


def test_prune_never_deletes_newest_verified_or_pinned(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=5, best_at=4)
    index = index_of(run)
    index["checkpoints"][1]["pinned"] = True
    write_index(run, index)
    flip_byte(ckpt(run, 4))  # the newest is corrupt: checkpoint 3 is what resume would load
    result = invoke("prune", "--keep", "1", "--yes")
    assert result.exit_code == 0, result.stderr
    assert _ids(run) == [1, 3, 4]
    assert "newest verified" in result.stdout and "pinned" in result.stdout


def _unique_bytes(run, ids):
    """What checkpoints ``ids`` take on disk together: their files, and each pack they list once."""
    stored = stored_packs(run)
    return sum(os.path.getsize(ckpt(run, i)) for i in ids) + sum(stored[n] for n in packs_of(run, ids))


def test_prune_max_size(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=5, frozen=64)
    budget = _unique_bytes(run, [3, 4])
    full = {e["id"]: e["state_bytes"] for e in index_of(run)["checkpoints"]}
    assert budget < full[3] + full[4]  # the budget holds 3 and 4 only because the tensors they share count once
    result = invoke("prune", "--max-size", str(budget), "--yes")
    assert result.exit_code == 0, result.stderr
    assert _ids(run) == [3, 4]
    tiny = invoke("prune", "--max-size", "1B", "--yes")
    assert tiny.exit_code == 0 and "more than --max-size" in tiny.stderr
    assert _ids(run) == [4]


@pytest.mark.parametrize(
    "args",
    [["--dry-run"], ["--keep", "0"], ["--keep", "x"], ["--max-size", "lots"], ["--max-size", "5XB"], ["--bogus"]],
)
def test_prune_bad_flags_are_usage_errors(tmp_path, args):
    run = write_run(tmp_path / "runs", "run_a", n=3)
    result = invoke("prune", *args)
    assert result.exit_code == 2
    assert "Error" in result.stderr and "Traceback" not in result.stderr
    assert _ids(run) == [0, 1, 2]


def test_prune_without_terminal_or_yes_refuses(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=4)
    result = invoke("prune", "--keep", "1")
    assert result.exit_code == 1
    assert "--yes" in result.stderr
    assert _ids(run) == [0, 1, 2, 3] and len(_files(run)) == 4


def test_prune_refuses_while_a_trainer_holds_the_lock(make_run):
    run = make_run(n=4, lock=True)
    result = invoke("prune", "--keep", "1", "--yes")
    assert result.exit_code == 1
    assert "locked" in result.stderr
    assert len(_files(run)) == 4
    assert invoke("prune", "--keep", "1", "--dry-run").exit_code == 0
    make_run.unlock(run)
    assert invoke("prune", "--keep", "1", "--yes").exit_code == 0
    assert _ids(run) == [3]


def test_prune_plan_execute_takes_the_run_lock_itself(make_run):
    """The library's plan -> execute without the CLI: execute() refuses while a trainer holds the run, deletes after."""
    from ckptctl.errors import RunLockedError
    from ckptctl.storage.plans import plan_prune

    run = make_run(n=4)
    plan = plan_prune(run, keep_last=1)
    assert [e.id for e in plan.delete] == [0, 1, 2]
    make_run.lock(run)
    with pytest.raises(RunLockedError):
        plan.execute()
    assert len(_files(run)) == 4
    make_run.unlock(run)
    assert _checkpoint_paths(plan.execute()) == [f"checkpoints/checkpoint_0000{i}.pt" for i in range(3)]
    assert _ids(run) == [3] and _files(run) == ["checkpoint_00003.pt"]


def test_open_prune_holds_the_locks_from_plan_to_execute(make_run):
    """open_prune locks every run before planning; a locked run is an error note, left out, and the report is not ok."""
    from ckptctl.errors import CkptctlError, RunLockedError
    from ckptctl.storage.lock import is_locked
    from ckptctl.storage.plans import open_prune

    a = make_run("run_a", n=3)
    b = make_run("run_b", n=3, lock=True)
    with open_prune([a, b], keep_last=1) as session:
        assert is_locked(a)  # held while the caller shows the plan and asks
        (note,) = session.notes
        assert note.level == "error" and isinstance(note.error, RunLockedError)
        assert [p.run_dir for p in session.report.plans] == [a] and not session.report.ok
        done = session.execute()
    assert not is_locked(a)
    assert _checkpoint_paths(done.to_json()["runs"][0]["deleted"]) == ["checkpoints/checkpoint_00000.pt", "checkpoints/checkpoint_00001.pt"]
    assert not done.ok and len(_files(b)) == 3
    make_run.unlock(b)
    with open_prune([a, b], keep_last=1, dry_run=True) as dry:
        assert not is_locked(b) and dry.notes == ()
        with pytest.raises(CkptctlError):
            dry.execute()
    assert len(_files(b)) == 3


def test_prune_skips_hostile_entries_and_deletes_nothing_outside(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=4)
    victim = tmp_path / "precious.pt"
    victim.write_bytes(b"keep me")
    index = index_of(run)
    index["checkpoints"].insert(0, dict(index["checkpoints"][0], id=100, path="../../precious.pt"))
    link = run / "checkpoints" / "checkpoint_00050.pt"
    link.symlink_to(victim)
    index["checkpoints"].insert(0, dict(index["checkpoints"][0], id=50, path="checkpoints/checkpoint_00050.pt"))
    write_index(run, index)
    result = invoke("prune", "--keep", "1", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    assert victim.read_bytes() == b"keep me" and link.is_symlink()
    (r,) = json.loads(result.stdout)["runs"]
    assert r["skipped"] == [
        "index entry 100: path in metadata leaves the run directory: '../../precious.pt'",
        "checkpoint 50: checkpoints/checkpoint_00050.pt: resolves outside the run directory (symlink?)",
        # an entry this version cannot read may reference packs: none is deleted while it is there
        "shared tensor objects are kept (collected later): the index has entries this version cannot read (1)",
    ]
    assert not ckpt(run, 0).exists() and ckpt(run, 3).exists()


def test_prune_folder_without_runs_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    assert invoke("prune", "empty", "--keep", "1").exit_code == 0
    assert invoke("prune", "nowhere", "--keep", "1").exit_code == 2


def test_promote_replaces_best_and_pins(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=4, best_at=3)
    result = invoke("promote", "runs/run_a", "1", "--pin")
    assert result.exit_code == 0, result.stderr
    best = json.loads((run / "best_metadata.json").read_text())
    assert best["source_id"] == 1 and best["promoted_by_hand"] is True
    assert (run / "best_model.pt").read_bytes() == ckpt(run, 1).read_bytes()
    assert [e["pinned"] for e in index_of(run)["checkpoints"]] == [False, True, False, False]
    assert invoke("verify", "runs/run_a").exit_code == 0
    invoke("prune", "--keep", "1", "--yes")
    assert _ids(run) == [1, 3]
    listing = json.loads(invoke("ls", "--json").stdout)["runs"][0]
    assert listing["best"]["source_id"] == 1 and listing["best"]["promoted_by_hand"]


def test_promote_refuses_corrupt_checkpoint(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=3)
    before = (run / "best_model.pt").read_bytes(), (run / "best_metadata.json").read_bytes()
    flip_byte(ckpt(run, 0))
    result = invoke("promote", "runs/run_a", "0")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ")
    assert ((run / "best_model.pt").read_bytes(), (run / "best_metadata.json").read_bytes()) == before


def test_promote_unknown_id_and_locked_run(make_run):
    run = make_run(n=2)
    assert invoke("promote", "runs/run_a", "9").exit_code == 2
    make_run.lock(run)
    locked = invoke("promote", "runs/run_a", "0")
    assert locked.exit_code == 1 and "locked" in locked.stderr


def test_library_keeps_a_promoted_best_until_a_better_one(tmp_path):
    """After a promotion the trainer reopens cleanly and the promoted file is what load_best_model gives."""
    from ckptctl import ModelPersistence

    run = write_run(tmp_path / "runs", "run_a", n=3)
    assert invoke("promote", "runs/run_a", "0").exit_code == 0
    p = ModelPersistence(run)
    try:
        meta = p.load_best_model(**fresh_components())
        assert meta["checkpoint_id"] == 0
    finally:
        p.close()
