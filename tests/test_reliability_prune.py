"""prune and retention never delete the wrong file, and a kill mid-removal is finished, never undone.

Issue 10 items 1 and 5: an index entry whose path names another checkpoint's file is not
a usable entry (the file name carries the id); a directory named like a checkpoint frees
nothing; a prune (or the library's retention) killed by a real SIGKILL between its index
write and its last delete leaves tombstones (``deleting``) that the next prune or open
finishes: the files are deleted, never adopted again, and ids are never reused.
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from ckptctl import ModelPersistence
from ckptctl.core.manifest import CheckpointEntry
from ckptctl.errors import UnsafePathError
from ckptctl.storage.atomic import verify_checksum
from ckptctl.storage.runfiles import checkpoint_file_for_deletion
from ckptctl.storage.scan import checkpoint_files_on_disk, read_index

from . import crash_child
from .cli_helpers import invoke
from .format_helpers import packs_of, stored_packs
from .runs import ckpt, fresh_components, index_of, write_index, write_run

HUGE_ID = 2**64 + 5


def _resume_id(run):
    with ModelPersistence(run, max_checkpoints=10, background=False) as p:
        info = p.resume(**fresh_components())
    return info["checkpoint_id"], info["skipped"]


# --------------------------------------------------------------------------- item 1


def test_prune_never_deletes_the_newest_through_an_entry_naming_its_file(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=10)
    index = index_of(run)
    index["checkpoints"][0]["path"] = "checkpoints/checkpoint_00009.pt"
    hostile = dict(index["checkpoints"][0])
    write_index(run, index)
    result = invoke("prune", "runs/run_a", "--keep", "3", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    (r,) = json.loads(result.stdout)["runs"]
    assert all(d["id"] != 0 for d in r["delete"]), r["delete"]
    assert any("checkpoint_00009.pt" in s and "checkpoint 0" in s for s in r["skipped"]), r["skipped"]
    assert ckpt(run, 9).exists() and ckpt(run, 8).exists() and ckpt(run, 7).exists()
    assert ckpt(run, 0).exists()  # entry 0 is not usable: its own file is left alone too
    assert hostile in index_of(run)["checkpoints"]  # written back as it was, for a person to inspect
    assert _resume_id(run) == (9, [])


def test_prune_huge_id_entry_naming_checkpoint_0_is_skipped(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=10)
    index = index_of(run)
    index["checkpoints"].append(dict(index["checkpoints"][0], id=HUGE_ID))  # path: checkpoints/checkpoint_00000.pt
    write_index(run, index)
    result = invoke("prune", "runs/run_a", "--keep", "3", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    (r,) = json.loads(result.stdout)["runs"]
    assert [k["id"] for k in r["keep"]] == [7, 8, 9]
    assert any(str(HUGE_ID) in s for s in r["skipped"]), r["skipped"]
    assert sorted(checkpoint_files_on_disk(run)) == [7, 8, 9]
    assert _resume_id(run) == (9, [])
    with ModelPersistence(run, max_checkpoints=10, background=False) as p:
        assert sorted(p.checkpoints) == [7, 8, 9]
        assert p._index.current.next_id == 10  # the skipped entry does not move the id counter


def test_verify_ls_and_resume_info_report_an_entry_naming_another_file(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=3)
    index = index_of(run)
    index["checkpoints"][0]["path"] = "checkpoints/checkpoint_00002.pt"
    write_index(run, index)
    result = invoke("verify", "runs/run_a", "--json")
    assert result.exit_code == 1, result.stdout + result.stderr
    results = json.loads(result.stdout)["results"]
    bad = [r for r in results if r["status"] == "corrupt"]
    assert len(bad) == 1 and bad[0]["id"] == 0 and "not the file of checkpoint 0" in bad[0]["detail"], bad
    assert {r["id"] for r in results if r["status"] == "ok"} == {0, 1, 2, None}  # file 0 checked as unindexed
    listing = invoke("ls", "runs/run_a", "--json")
    assert listing.exit_code == 0, listing.stderr
    (lr,) = json.loads(listing.stdout)["runs"]
    assert any("index entry 0 skipped" in p and "checkpoint_00002.pt" in p for p in lr["problems"]), lr["problems"]
    info = invoke("resume-info", "runs/run_a", "--json")
    assert json.loads(info.stdout)["runs"][0]["checkpoint"]["id"] == 2, info.stdout


def test_deletion_refuses_a_name_carrying_another_id(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=2)
    entry = read_index(run).by_id()[0]
    other = CheckpointEntry(**{**entry.__dict__, "path": "checkpoints/checkpoint_00001.pt"})
    with pytest.raises(UnsafePathError, match="not the file of checkpoint 0"):
        checkpoint_file_for_deletion(run, other)
    assert checkpoint_file_for_deletion(run, entry) == ckpt(run, 0)


def test_prune_plan_counts_no_bytes_for_a_directory_named_like_a_checkpoint(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=5)
    ckpt(run, 1).unlink()
    ckpt(run, 1).mkdir()
    (ckpt(run, 1) / "inner").write_bytes(b"x" * 10)
    result = invoke("prune", "runs/run_a", "--keep", "1", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    (r,) = json.loads(result.stdout)["runs"]
    rows = r["delete"] + [dict(k, size_bytes=None) for k in r["keep"]]
    assert all(d["size_bytes"] == 0 for d in r["delete"] if d["id"] == 1), rows
    freed_packs = packs_of(run, [0, 2, 3]) - packs_of(run, [1, 4], best=True)  # entry 1 stays: its path is not a file
    assert r["bytes_freed"] == sum(ckpt(run, i).stat().st_size for i in (0, 2, 3)) + sum(stored_packs(run)[n] for n in freed_packs)
    human = invoke("prune", "runs/run_a", "--keep", "1", "--dry-run")
    assert "4.1 kB" not in human.stdout, human.stdout
    result = invoke("prune", "runs/run_a", "--keep", "1", "--yes")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert ckpt(run, 1).is_dir() and (ckpt(run, 1) / "inner").exists()
    assert sorted(checkpoint_files_on_disk(run)) == [4]


# --------------------------------------------------------------------------- item 5


def _kill_prune(fork_context, run, target, kill_at, keep):
    child = fork_context.Process(target=crash_child.prune_cli, args=(str(run), target, kill_at, keep))
    child.start()
    child.join(timeout=120)
    return child.exitcode


@pytest.mark.parametrize(("target", "kill_at", "left"), [("os.unlink", 1, 4), ("os.unlink", 3, 2), ("os.replace", 2, 0)])
def test_prune_killed_mid_removal_is_finished_by_the_next_prune(tmp_path, fork_context, target, kill_at, left):
    run = write_run(tmp_path / "runs", "run_a", n=6)
    assert _kill_prune(fork_context, run, target, kill_at, 2) == -signal.SIGKILL
    index = read_index(run)
    assert sorted(index.by_id()) == [4, 5]  # the kill hit after the index write ...
    assert len(set(checkpoint_files_on_disk(run)) - {4, 5}) == left  # ... and before the last delete / the last write
    # read-only commands see a run of 4 and 5, no problems, nothing to adopt
    (lr,) = json.loads(invoke("ls", "runs/run_a", "--json").stdout)["runs"]
    assert [c["id"] for c in lr["checkpoints"]] == [4, 5] and lr["problems"] == [], lr
    verified = invoke("verify", "runs/run_a", "--json")
    assert verified.exit_code == 0, verified.stdout
    assert json.loads(invoke("resume-info", "runs/run_a", "--json").stdout)["runs"][0]["checkpoint"]["id"] == 5
    assert index_of(run).get("deleting") == [0, 1, 2, 3]  # the tombstones say what prune decided
    # the rerun finishes the job
    result = invoke("prune", "runs/run_a", "--keep", "2", "--yes")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert sorted(checkpoint_files_on_disk(run)) == [4, 5]
    assert "deleting" not in index_of(run)
    assert read_index(run).next_id == 6


def test_open_after_a_killed_prune_deletes_the_leftovers_and_never_reuses_ids(tmp_path, fork_context):
    run = write_run(tmp_path / "runs", "run_a", n=6)
    assert _kill_prune(fork_context, run, "os.unlink", 1, 2) == -signal.SIGKILL
    assert sorted(checkpoint_files_on_disk(run)) == [0, 1, 2, 3, 4, 5]
    components = fresh_components()
    with ModelPersistence(run, max_checkpoints=10, save_every_n_batches=1, background=False) as p:
        assert sorted(p.checkpoints) == [4, 5]  # not adopted again
        assert sorted(checkpoint_files_on_disk(run)) == [4, 5]
        assert p.resume(**components)["checkpoint_id"] == 5
        assert p.save_checkpoint(0, 99, {}, **components) == 6
    assert "deleting" not in index_of(run)


def test_retention_killed_between_index_and_delete_is_finished_on_open(tmp_path, fork_context, base_run):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    assert sorted(read_index(run).by_id()) == [1, 2]
    child = fork_context.Process(target=crash_child.save_cycles, args=(str(run), "os.unlink", 1, 1))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    index = read_index(run)
    assert sorted(index.by_id()) == [2, 3]  # killed after the index write
    assert ckpt(run, 1).exists()  # ... before the delete
    (lr,) = json.loads(invoke("ls", str(run), "--json").stdout)["runs"]
    assert [c["id"] for c in lr["checkpoints"]] == [2, 3] and lr["problems"] == [], lr
    assert index_of(run).get("deleting") == [1]
    with ModelPersistence(run, max_checkpoints=2) as p:
        assert sorted(p.checkpoints) == [2, 3]
        assert not ckpt(run, 1).exists()
        assert p._index.current.next_id == 4
    for entry in read_index(run).checkpoints:
        verify_checksum(run / entry.path, entry.checksum)
    assert "deleting" not in index_of(run)
