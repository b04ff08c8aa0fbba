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
import torch
from typer.testing import CliRunner

from ckptctl import ModelPersistence
from ckptctl.cli import app
from ckptctl.storage.atomic import hash_file

runner = CliRunner()

CHECKPOINT_FILES = [f"checkpoints/checkpoint_{i:05d}.pt" for i in range(4)]
FILES = CHECKPOINT_FILES + ["best_model.pt", "checkpoint_metadata.json", "best_metadata.json", "training_state.json"]
DAMAGES = ["truncate_zero", "truncate_half", "flip_header", "flip_data", "delete", "garbage", "unreadable"]
#: The cases in the default run; ``make stress`` runs the whole matrix.
FAST = {("checkpoints/checkpoint_00003.pt", d) for d in DAMAGES} | {(f, "flip_data") for f in FILES} | {
    (f, "delete") for f in FILES
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A run with checkpoints 0-3, best model from checkpoint 1, and a training state."""
    run = tmp_path_factory.mktemp("pristine") / "runs" / "run_a"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ModelPersistence(run, max_checkpoints=5, save_every_n_batches=1, background=False) as p:
        p.update_training_state(status="running", config={"lr": 0.1})
        for batch in range(4):
            model(torch.randn(3, 8)).sum().backward()
            opt.step()
            metrics = {"loss": 1.0 / (batch + 1), "accuracy_delta": -abs(batch - 1.0)}
            p.maybe_save(0, batch, metrics, agent=model, optimizer=opt)
            p.update_best(0, batch, metrics, agent=model)
    return run


def _damage(path, how):
    if how == "delete":
        path.unlink()
        return
    if how == "unreadable":
        path.chmod(0)
        if os.geteuid() == 0:  # root reads through permissions: make it unreadable another way
            path.chmod(0o644)
            path.unlink()
            path.mkdir()
        return
    data = bytearray(path.read_bytes())
    if how == "truncate_zero":
        data = bytearray()
    elif how == "truncate_half":
        data = data[: len(data) // 2]
    elif how == "flip_header":
        data[min(10, len(data) - 1)] ^= 0xFF
    elif how == "flip_data":
        data[int(len(data) * 0.6)] ^= 0xFF
    elif how == "garbage":
        data = bytearray(os.urandom(len(data) or 64))
    path.write_bytes(bytes(data))


def _expected_status(relpath, how):
    return "missing" if how == "delete" and relpath != "training_state.json" else "corrupt"


def _restore_permissions(root):
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chmod(os.path.join(dirpath, name), 0o755)


@pytest.mark.parametrize(
    "relpath,how",
    [pytest.param(f, d, marks=() if (f, d) in FAST else pytest.mark.slow, id=f"{f}-{d}") for f in FILES for d in DAMAGES],
)
def test_damaged_file(pristine, tmp_path, relpath, how):
    run = tmp_path / "runs" / "run_a"
    shutil.copytree(pristine, run)
    before = {p: hash_file(run / p)[1] for p in FILES}
    _damage(run / relpath, how)
    try:
        _check(run, relpath, how, before)
    finally:
        _restore_permissions(tmp_path)


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

    # ls still lists the run and its checkpoints
    result = runner.invoke(app, ["ls", str(run.parent), "--json"])
    assert result.exit_code == 0, result.output
    (listed,) = json.loads(result.stdout)["runs"]
    assert {c["id"] for c in listed["checkpoints"]} >= {0, 1, 2, 3} - ({int(relpath[-5:-3])} if relpath in CHECKPOINT_FILES and how == "delete" and relpath == "x" else set())

    # resume falls back to the newest good checkpoint
    newest_good = 2 if relpath == CHECKPOINT_FILES[3] else 3
    model = _model()
    with ModelPersistence(run) as p:
        info = p.resume(agent=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert info["checkpoint_id"] == newest_good

    # prune afterwards never deletes that checkpoint or the best model's source
    result = runner.invoke(app, ["prune", str(run), "--keep", "1", "--yes"])
    assert result.exit_code in (0, 1), result.output
    assert hash_file(run / CHECKPOINT_FILES[newest_good])[1] == before[CHECKPOINT_FILES[newest_good]]
    if relpath not in (CHECKPOINT_FILES[1], "best_model.pt", "best_metadata.json"):
        assert (run / CHECKPOINT_FILES[1]).exists(), "prune deleted the best model's source"
