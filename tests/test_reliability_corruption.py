"""Corruption matrix: every file of a run damaged every way; verify, ls, resume and prune cope.

For each file (each checkpoint, best_model.pt, each metadata JSON) and each damage
(truncate to 0 / half, flip a byte in the header / in the data, delete, garbage,
unreadable): ``verify`` flags it with the right status and exits 1; ``ls`` still lists
the run and its other checkpoints; ``resume`` falls back to the newest good checkpoint;
``prune --keep 1`` afterwards keeps that checkpoint and the best model's source.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from ckptctl import ModelPersistence
from ckptctl.cli import app
from ckptctl.storage.atomic import hash_file

from .damage import DAMAGES, damage, restore_permissions
from .runs import fresh_components, write_run

runner = CliRunner()

CHECKPOINT_FILES = [f"checkpoints/checkpoint_{i:05d}.pt" for i in range(4)]
FILES = CHECKPOINT_FILES + ["best_model.pt", "checkpoint_metadata.json", "best_metadata.json", "training_state.json"]
DAMAGE_NAMES = [d for d in DAMAGES if d != "flip_bit"]  # flip_header and flip_data flip bytes at known places
#: The cases in the default run; ``make stress`` runs the whole matrix.
FAST = {("checkpoints/checkpoint_00003.pt", d) for d in DAMAGE_NAMES} | {(f, "flip_data") for f in FILES} | {
    (f, "delete") for f in FILES
}


#: The model and optimizer of the pristine run, to resume it.
MODEL = {"shape": (8, 2), "optimizer": "sgd"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A run with checkpoints 0-3, best model from checkpoint 1, and a training state."""
    return write_run(
        tmp_path_factory.mktemp("pristine") / "runs", "run_a", n=4, keep=5, best_at=1,
        state={"status": "running", "config": {"lr": 0.1}}, **MODEL,
    )


def _expected_status(relpath, how):
    return "missing" if how == "delete" and relpath != "training_state.json" else "corrupt"


@pytest.mark.parametrize(
    "relpath,how",
    [pytest.param(f, d, marks=() if (f, d) in FAST else pytest.mark.slow, id=f"{f}-{d}") for f in FILES for d in DAMAGE_NAMES],
)
def test_damaged_file(pristine, tmp_path, relpath, how):
    run = tmp_path / "runs" / "run_a"
    shutil.copytree(pristine, run)
    before = {p: hash_file(run / p)[1] for p in FILES}
    damage(run / relpath, how)
    try:
        _check(run, relpath, how, before)
    finally:
        restore_permissions(tmp_path)


def _check(run, relpath, how, before):
    # verify: the damaged file is flagged with the right status, exit 1
    result = runner.invoke(app, ["verify", str(run), "--json"])
    doc = json.loads(result.stdout)
    flagged = {r["path"]: r["status"] for r in doc["results"] if r["status"] != "ok"}
    if relpath == "training_state.json" and how == "delete":
        assert result.exit_code == 0 and doc["ok"], flagged  # a run may have no training state
    else:
        assert result.exit_code == 1, result.output
        assert flagged.get(str(run / relpath)) == _expected_status(relpath, how), flagged
    # what was not damaged is not flagged (a damaged best_metadata also makes best_model.pt unverifiable)
    collateral = {str(run / "best_model.pt")} if relpath == "best_metadata.json" else set()
    assert set(flagged) - {str(run / relpath)} - collateral == set(), flagged

    # ls still lists the run and every checkpoint its index names (a missing file is marked, not dropped)
    result = runner.invoke(app, ["ls", str(run.parent), "--json"])
    assert result.exit_code == 0, result.output
    (listed,) = json.loads(result.stdout)["runs"]
    assert [c["id"] for c in listed["checkpoints"]] == [0, 1, 2, 3]

    # resume falls back to the newest good checkpoint
    newest_good = 2 if relpath == CHECKPOINT_FILES[3] else 3
    with ModelPersistence(run) as p:
        info = p.resume(**fresh_components(**MODEL))
    assert info["checkpoint_id"] == newest_good

    # prune afterwards never deletes that checkpoint, the newest or the best model's source (1)
    result = runner.invoke(app, ["prune", str(run), "--keep", "1", "--yes"])
    assert result.exit_code == 0, result.output
    assert hash_file(run / CHECKPOINT_FILES[newest_good])[1] == before[CHECKPOINT_FILES[newest_good]]
    assert sorted(int(f.name[-8:-3]) for f in (run / "checkpoints").iterdir()) == _left_after_prune(relpath, how, newest_good)


def _left_after_prune(relpath, how, newest_good):
    """The checkpoint files ``prune --keep 1`` leaves: the newest (3), the newest good one, the best model's source (1);
    a deleted file stays gone, and a directory in a checkpoint's place (``unreadable`` as root) is never deleted."""
    left = {3, newest_good, 1}
    if relpath in CHECKPOINT_FILES:
        damaged_id = CHECKPOINT_FILES.index(relpath)
        if how == "delete":
            left.discard(damaged_id)
        elif how == "unreadable" and os.geteuid() == 0:
            left.add(damaged_id)
    return sorted(left)
