"""Where training continues (``resume-info``, ``show``) and how to resume a restored run: wording that fits the run.

Real runs written through ModelPersistence (a library user's own loop) and the Colab
guide's plain ``torch.save`` runs; the trainloop's own runs are checked in
``tests/test_trainloop.py`` on its reference run.
"""

from __future__ import annotations

import json

from .cli_helpers import invoke
from .damage import truncate
from .runs import ckpt, write_run
from .test_legacy_runs import write_guide_run


def _resume_info(path) -> dict:
    result = invoke("resume-info", path, "--json")
    assert result.exit_code == 0, result.stderr
    (info,) = json.loads(result.stdout)["runs"]
    return info["checkpoint"]


# ---------------------------------------------------------------------- where training continues


def test_a_checkpoint_at_an_epochs_last_batch_continues_at_the_start_of_the_next_epoch(tmp_path):
    """12 batches of a 4-batch epoch, recorded by the user's loop: the newest is epoch 2's last batch."""
    write_run(tmp_path / "runs", "run_a", n=12, keep=3, batches_per_epoch=4, state={"batches_per_epoch": 4})
    c = _resume_info("runs/run_a")
    assert (c["epoch"], c["batch"]) == (2, 3)
    assert (c["next_epoch"], c["next_batch"], c["batches_per_epoch"]) == (3, 0, 4)
    text = invoke("resume-info", "runs/run_a").stdout
    assert "training continues at epoch 3, batch 0 (the start of the epoch)" in text
    assert "epoch 2, batch 4" not in text

    shown = invoke("show", "runs/run_a").stdout
    assert "resuming from it continues at epoch 3, batch 0" in shown
    doc = json.loads(invoke("show", "runs/run_a", "--json").stdout)
    assert doc["resume"]["next_epoch"] == 3 and doc["resume"]["next_batch"] == 0
    mid = json.loads(invoke("show", "runs/run_a", "10", "--json").stdout)["resume"]  # (2, 2): the same epoch goes on
    assert (mid["next_epoch"], mid["next_batch"]) == (2, 3)


def test_the_guides_run_knows_its_epoch_length_from_its_training_state(tmp_path):
    """The guide's total_batches (100): resume falls back to checkpoint 1 at (0, 99), the epoch's last batch."""
    run, _, _ = write_guide_run(tmp_path)
    truncate(ckpt(run, 2))  # no checksum in the guide's files: a cut file is what fails to load
    c = _resume_info(run)
    assert c["id"] == 1 and (c["epoch"], c["batch"]) == (0, 99)
    assert (c["next_epoch"], c["next_batch"], c["batches_per_epoch"]) == (1, 0, 100)
    assert "training continues at epoch 1, batch 0" in invoke("resume-info", run).stdout


def test_without_a_known_epoch_length_the_next_batch_of_the_same_epoch_is_said(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=4, batches_per_epoch=4)  # nothing records the epoch's length
    c = _resume_info("runs/run_a")
    assert (c["epoch"], c["batch"]) == (0, 3)
    assert (c["next_epoch"], c["next_batch"], c["batches_per_epoch"]) == (0, 4, None)
    assert "training continues at epoch 0, batch 4" in invoke("resume-info", "runs/run_a").stdout


def test_next_position_prefers_the_recorded_data_position_then_the_epoch_length():
    from ckptctl.core.resume import next_position

    recorded = {"data_position": {"next_epoch": 5, "next_batch": 0}}
    assert (next_position(4, 39, recorded).epoch, next_position(4, 39, recorded).batch) == (5, 0)
    assert next_position(2, 39, {"batches_per_epoch": 40}).batch == 0
    assert next_position(2, 39, None, {"config": {"batches_per_epoch": 40}}).epoch == 3
    assert next_position(2, 38, None, {"total_batches": 40}).batch == 39
    assert next_position(2, 39, None, {"total_batches": True}).epoch == 2  # not a count: unknown
    assert next_position(None, 3) is None


# ---------------------------------------------------------------------- the hint after a restore


def test_restore_of_a_library_run_hints_the_library_call_on_one_unwrapped_line(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir()
    name = "a_run_with_a_rather_long_name_as_the_default_ones_are_" + "x" * 40
    write_run(tmp_path / "work", name, n=2, drive=drive)
    to = tmp_path / "restored_runs_in_a_folder_whose_path_is_long_too"
    result = invoke("restore", "--from-drive", "--drive", drive, "--to", to)
    assert result.exit_code == 0, result.stderr
    call = f'ModelPersistence("{to / name}", ...).resume(...)'
    assert len(call) > 120  # wider than the console: it must not be wrapped
    assert "Resume will start from checkpoint 1, with:" in result.stdout
    assert f"  {call}" in result.stdout.splitlines()
    assert "ckptctl.trainloop" not in result.stdout
    doc = json.loads(invoke("restore", "--from-drive", "--drive", drive, "--to", to, "--json").stdout)
    assert doc["resume_command"] == call


def test_restore_of_a_trainloop_run_hints_the_trainloop_command(tmp_path):
    """What the trainloop records in training_state.json (its written_by; before that, its config keys)."""
    from ckptctl.core.resume import resume_command, written_by_trainloop

    drive = tmp_path / "drive"
    drive.mkdir()
    old_config = {"dataset_sha256": "ab", "batches_per_epoch": 8, "save_every": 2, "max_pairs": 64}
    write_run(tmp_path / "work", "tl", n=2, drive=drive, state={"written_by": "ckptctl.trainloop"})
    write_run(tmp_path / "work", "old_tl", n=2, drive=drive, state={"config": old_config})
    for name in ("tl", "old_tl"):
        result = invoke("restore", "--from-drive", "--drive", drive, "--run", name, "--to", "runs")
        assert result.exit_code == 0, result.stderr
        assert f"  python -m ckptctl.trainloop --resume --output-dir runs --run-name {name}" in result.stdout.splitlines()
    assert written_by_trainloop({"config": {"batches_per_epoch": 8}}) is False  # a user's own config
    assert resume_command("my runs/a b", {"written_by": "ckptctl.trainloop"}).endswith("--output-dir 'my runs' --run-name 'a b'")
