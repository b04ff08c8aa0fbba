"""A real SIGKILL between every step of a save never leaves an unreadable "latest".

For each IO step (fsync, rename, unlink, each chunk written) and each k, a child
process is killed right before its k-th such call while saving; afterwards the run must
open, its index must parse, everything it lists must verify, resume must need no
fallback and must not go back past the last durable checkpoint.
"""

from __future__ import annotations

import shutil
import signal

import pytest

from ckptctl import ModelPersistence
from ckptctl.ops import verify_runs
from ckptctl.storage.atomic import verify_checksum
from ckptctl.core.objects import referenced_packs
from ckptctl.storage.objects import stored_pack_names
from ckptctl.storage.runfiles import best_records
from ckptctl.storage.scan import checkpoint_files_on_disk, read_best, read_best_record, read_index

from . import crash_child
from .runs import fresh_components

CYCLES = 2
WRITE_KILL_POINTS = (1, 2, 3, 5, 8, 13)


def _check_run_after_crash(run, last_durable_id):
    index = read_index(run)  # parses
    for entry in index.checkpoints:
        verify_checksum(run / entry.path, entry.checksum)
    # as the crash left it, before any repair on open: every file checks out (the best model's
    # replace is one commit, so no kill leaves best_model.pt without the record it matches)
    bad = [r for r in verify_runs([run]) if r.status != "ok"]
    assert bad == []
    with ModelPersistence(run, max_checkpoints=2) as p:
        info = p.resume(**fresh_components(**crash_child.MODEL))
        assert info["skipped"] == []
        assert info["checkpoint_id"] >= last_durable_id
        best = read_best(run)
        if best is not None:
            verify_checksum(run / best.path, best.checksum)
        # every committed file is listed (adopted if the crash hit before the index update)
        assert set(checkpoint_files_on_disk(run)) <= set(p.checkpoints)
    # the packs a kill left unreferenced (a save never committed, a removal cut short) are gone after the open
    referenced = referenced_packs([*read_index(run).checkpoints, *best_records(read_best_record(run))])
    assert set(stored_pack_names(run)) <= set(referenced)
    return info["checkpoint_id"]


@pytest.mark.parametrize("target", crash_child.TARGETS)
def test_sigkill_between_save_steps(target, base_run, tmp_path, fork_context):
    kills = 0
    points = WRITE_KILL_POINTS if target == "write" else range(1, 100)
    for kill_at in points:
        run = tmp_path / f"k{kill_at}" / "run"
        shutil.copytree(base_run, run)
        child = fork_context.Process(target=crash_child.save_cycles, args=(str(run), target, kill_at, CYCLES))
        child.start()
        child.join(timeout=120)
        assert child.exitcode in (0, -signal.SIGKILL), child.exitcode
        _check_run_after_crash(run, last_durable_id=2)
        if child.exitcode == 0:
            break  # k passed the number of such calls: every boundary was covered
        kills += 1
    print(f"\ncrash injection: {kills} SIGKILLs before a {target} call, every one reopened and resumed")
    assert kills >= (1 if target == "os.unlink" else 3)
