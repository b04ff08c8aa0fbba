"""The paired trainloop, for real: subprocesses on real ARC pairs, stopped with real signals.

The contract under test: on CPU, with the same flags and seed, a run that is SIGKILLed
(once or several times) or SIGTERMed and resumed each time ends with a final checkpoint
whose every tensor is bit-identical to an uninterrupted run's, and logs the same lines
after each resume point. The Drive mirror survives real faults without stopping training.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptctl import trainloop
from ckptctl.persistence import latest_run

from .mount_helpers import mount_loop_ext4
from .trainloop_helpers import (
    mirrored_checkpoints,
    wait_until,
    FAST_FLAGS,
    Trainer,
    assert_log_consistent,
    assert_mirror_verifies,
    assert_same_final_state,
    load_payload,
    metric_lines,
    newest_checkpoint,
    read_json,
    replace_flags,
    trainloop_cmd,
    trainloop_env,
)


class _Reference:
    """An uninterrupted run with FAST_FLAGS, started once per module in the background."""

    def __init__(self, root: Path):
        self.out = root / "runs"
        self._trainer = Trainer(trainloop_cmd(self.out, "reference"), root)
        self._rc: int | None = None

    @property
    def run_dir(self) -> Path:
        if self._rc is None:
            self._rc = self._trainer.finish()
            assert self._rc == 0, self._trainer.output[-3000:]
        return self.out / "reference"

    @property
    def log(self) -> str:
        return (self.run_dir / "training.log").read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> _Reference:
    return _Reference(tmp_path_factory.mktemp("reference"))


def _batch_lines(lines: list[str]) -> list[str]:
    return [l for l in metric_lines(lines) if ", Batch " in l]


# --------------------------------------------------------------------------- exact resume


def _indexed(run_dir: Path) -> int:
    """How many checkpoints the run's index lists (0 before its first save)."""
    try:
        return len(read_json(run_dir / "checkpoint_metadata.json")["checkpoints"])
    except FileNotFoundError:
        return 0


def test_sigkill_twice_then_resume_is_bit_exact(reference, tmp_path):
    rng = random.Random(20261129)
    out = tmp_path / "runs"
    rcs = []
    for attempt in range(2):
        extra = ("--resume",) if attempt else ()
        t = Trainer(trainloop_cmd(out, "killed", *extra), tmp_path)
        if attempt:
            assert t.wait_for(lambda ls: any(l.startswith("Resumed from checkpoint") for l in ls)), t.output
        assert t.wait_batches(rng.randint(3, 9)), t.output
        # (there must be a checkpoint to resume from, and two by the end for the fallback below;
        # on a loaded machine their background writes may lag the log lines)
        assert wait_until(lambda: _indexed(out / "killed") >= attempt + 1), t.output
        time.sleep(rng.uniform(0.0, 0.03))  # between log lines: often inside a background save
        t.kill(signal.SIGKILL)
        rcs.append(t.finish())
    assert rcs == [-signal.SIGKILL, -signal.SIGKILL], "a run ended before its kill; the test killed nothing"
    state = read_json(out / "killed" / "training_state.json")
    assert state["status"] == "running"  # SIGKILL leaves no chance to write anything else

    # And the newest checkpoint got damaged on disk: resume must fall back to the one before.
    entries = read_json(out / "killed" / "checkpoint_metadata.json")["checkpoints"]
    assert len(entries) >= 2, entries
    damaged = out / "killed" / entries[-1]["path"]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))

    t = Trainer(trainloop_cmd(out, "killed", "--resume"), tmp_path)
    assert t.finish() == 0, t.output
    assert f"skipped checkpoint {entries[-1]['id']}" in t.output
    assert f"Resumed from checkpoint {entries[-2]['id']} " in t.output

    assert_same_final_state(reference.run_dir, out / "killed")
    log = (out / "killed" / "training.log").read_text()
    assert assert_log_consistent(reference.log, log) == 3  # started, resumed, resumed (or restarted)
    assert log.count("Resumed from checkpoint") >= 1
    state = read_json(out / "killed" / "training_state.json")
    assert state["status"] == "completed"
    assert state["config"]["batch_size"] == 8 and state["progress"]["global_step"] == 24


def test_sigterm_saves_the_current_batch_then_fresh_machine_resumes_from_drive(reference, tmp_path):
    out, drive = tmp_path / "runs", tmp_path / "drive"
    drive.mkdir()
    t = Trainer(trainloop_cmd(out, "term", "--drive-backup", str(drive)), tmp_path)
    assert t.wait_batches(random.Random(5).randint(5, 12)), t.output
    t.kill(signal.SIGTERM)
    assert t.finish() == 128 + signal.SIGTERM, t.output
    assert "SIGTERM: finishing the current batch" in t.output

    run_dir = out / "term"
    state = read_json(run_dir / "training_state.json")
    assert state["status"] == "interrupted" and state["interrupted_by"] == "SIGTERM"
    # It finished the batch in progress, logged it, and saved exactly there.
    last = _batch_lines(t.lines)[-1]
    entry, path = newest_checkpoint(run_dir)
    assert last.startswith(f"Epoch {entry['epoch']}, Batch {entry['batch']}:"), (last, entry)
    assert state["last_checkpoint"] == entry["id"]
    assert load_payload(path)["extra"]["data_position"]["next_batch"] in (entry["batch"] + 1, 0)
    # close() waited for the mirror: Drive holds the interrupted state, verified.
    assert_mirror_verifies(run_dir, drive / "term")
    assert read_json(drive / "term" / "training_state.json")["status"] == "interrupted"

    shutil.rmtree(run_dir)  # a fresh machine: only Drive is left
    # The mirror is configured through CKPTCTL_DRIVE this time (same as --drive-backup).
    t = Trainer(trainloop_cmd(out, "term", "--resume"), tmp_path, env=trainloop_env(drive=str(drive)))
    assert t.finish() == 0, t.output
    assert "restoring it from the Drive mirror" in t.output
    assert_same_final_state(reference.run_dir, run_dir)
    assert assert_log_consistent(reference.log, (run_dir / "training.log").read_text()) == 2
    assert_mirror_verifies(run_dir, drive / "term")
    assert read_json(drive / "term" / "training_state.json")["status"] == "completed"


def test_resume_refuses_a_changed_data_position_unless_overridden(reference, tmp_path, capsys, in_process_torch_settings):
    out = tmp_path / "runs"
    shutil.copytree(reference.run_dir, out / "copy")
    before = newest_checkpoint(out / "copy")[0]["id"]
    flags = list(FAST_FLAGS)

    def with_flag(name: str, value: str) -> list[str]:
        changed = list(flags)
        changed[changed.index(name) + 1] = value
        return changed

    argv = ["--output-dir", str(out), "--run-name", "copy", "--resume"]
    assert trainloop.main(argv + with_flag("--batch-size", "4")) == 2
    err = capsys.readouterr().err
    assert "Error: cannot resume copy exactly" in err
    assert "batch_size: checkpoint 8, now 4" in err and "--allow-data-change" in err

    assert trainloop.main(argv + with_flag("--max-pairs", "60")) == 2
    err = capsys.readouterr().err
    assert "dataset_size: checkpoint 64, now 60" in err and "dataset_sha256" in err
    assert newest_checkpoint(out / "copy")[0]["id"] == before  # nothing was trained or saved

    # The explicit override resumes with the new layout (one more epoch in batches of 4).
    assert trainloop.main(argv + with_flag("--batch-size", "4") + ["--epochs", "4", "--allow-data-change"]) == 0
    entry = newest_checkpoint(out / "copy")[0]
    assert (entry["epoch"], entry["batch"], entry["global_step"]) == (3, 15, 24 + 16)
    assert read_json(out / "copy" / "training_state.json")["status"] == "completed"


def test_resume_with_more_epochs_and_a_new_lr_adapts_the_restored_schedule(reference, tmp_path, capsys, in_process_torch_settings):
    """The restored scheduler keeps the old length and rate: a longer run must still anneal to its end."""
    out = tmp_path / "runs"
    shutil.copytree(reference.run_dir, out / "copy")
    argv = ["--output-dir", str(out), "--run-name", "copy", "--resume"]
    assert trainloop.main(argv + list(replace_flags(FAST_FLAGS, {"--epochs": "4"})) + ["--lr", "0.006"]) == 0
    err = capsys.readouterr().err
    assert "warning: lr was 0.003, now 0.006" in err
    assert "the schedule was 24 batches long, now 32" in err
    entry, path = newest_checkpoint(out / "copy")
    assert entry["global_step"] == 32
    state = torch.load(path, weights_only=True)
    assert state["scheduler"]["T_max"] == 32 and state["scheduler"]["last_epoch"] == 32
    # at the end of the stretched cosine the rate is the new floor (5% of the new lr)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.006 * 0.05, rel=1e-9)
    # an unchanged resume says nothing of the schedule
    assert trainloop.main(argv + list(replace_flags(FAST_FLAGS, {"--epochs": "4"})) + ["--lr", "0.006"]) == 0
    assert "schedule" not in capsys.readouterr().err


def test_resume_without_run_name_picks_the_newest_run_by_metadata_not_mtime(reference, tmp_path, in_process_torch_settings):
    out = tmp_path / "runs"
    for name in ("older", "newer"):
        shutil.copytree(reference.run_dir, out / name)
    state_path = out / "older" / "training_state.json"
    state = read_json(state_path)
    state["updated_at"] = "2020-01-01T00:00:00+00:00"
    state_path.write_text(json.dumps(state))
    index_path = out / "older" / "checkpoint_metadata.json"
    index = read_json(index_path)
    for entry in index["checkpoints"]:
        entry["timestamp"] = "2020-01-01T00:00:00+00:00"
    index_path.write_text(json.dumps(index))
    future = time.time() + 3600  # the older run's files look newest on disk
    for path in (out / "older").rglob("*"):
        os.utime(path, (future, future))

    assert latest_run(out) == out / "newer"
    args = trainloop.parse_args(["--output-dir", str(out), "--resume"])
    assert trainloop._choose_run(args, out, print) == ("newer", True)

    empty = tmp_path / "empty"
    empty.mkdir()
    args = trainloop.parse_args(["--output-dir", str(empty), "--resume"])
    name, resuming = trainloop._choose_run(args, empty, print)  # nothing to resume: a fresh run
    assert not resuming and name.startswith("arc_complete_")


def test_help_explains_every_flag():
    parser = trainloop.build_parser()
    text = parser.format_help()
    for flag in ("--epochs", "--device", "--resume", "--output-dir", "--run-name", "--save-every",
                 "--save-every-minutes", "--max-checkpoints", "--drive-backup", "--seed", "--batch-size", "--lr"):
        assert flag in text
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    assert trainloop.parse_args([]).output_dir == "runs"
    assert trainloop.parse_args([]).save_every == 50 and trainloop.parse_args([]).max_checkpoints == 5


def test_the_progress_bar_on_a_terminal_leaves_the_rng_alone():
    """rich draws from Python's global RNG when imported: the console must not change the saved RNG."""
    code = (
        "import os, random, sys\n"
        "from ckptctl import trainloop\n"
        "assert 'rich' not in sys.modules\n"
        "random.seed(1); before = random.getstate()\n"
        "master, slave = os.openpty(); sys.stderr = open(slave, 'w')\n"
        "console = trainloop.Console(10, 0, show_progress=True)\n"
        "assert console._progress is not None and 'rich' in sys.modules\n"
        "console.advance(); console.stop()\n"
        "assert random.getstate() == before\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=trainloop_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_data_order_is_a_pure_function_of_seed_and_epoch():
    a = trainloop.epoch_order(100, seed=3, epoch=2)
    torch.manual_seed(999)  # the global RNG plays no part
    assert torch.equal(a, trainloop.epoch_order(100, seed=3, epoch=2))
    assert not torch.equal(a, trainloop.epoch_order(100, seed=3, epoch=3))
    assert not torch.equal(a, trainloop.epoch_order(100, seed=4, epoch=2))


# --------------------------------------------------------------------------- Drive faults


def test_drive_unmounted_mid_run_never_stops_training_and_the_mirror_catches_up(reference, tmp_path):
    out, drive, away = tmp_path / "runs", tmp_path / "drive", tmp_path / "drive_unmounted"
    drive.mkdir()
    # Saves by the clock only (every 30 ms): the save schedule must not change the training.
    flags = replace_flags(FAST_FLAGS, {"--save-every": "1000"}) + ("--save-every-minutes", "0.0005")
    t = Trainer(trainloop_cmd(out, "flaky", "--drive-backup", str(drive), flags=flags), tmp_path)
    try:
        assert wait_until(lambda: mirrored_checkpoints(drive / "flaky")), t.output
        # "Unmount": the Drive folder goes away and a plain file stands where it was.
        os.rename(drive, away)
        drive.write_text("Drive is not mounted\n")
        # Training runs to the end while Drive is gone...
        assert t.wait_for(lambda ls: any(l.startswith("Completed 3 epochs") for l in ls)), t.output
        assert t.proc.poll() is None  # ...and close() is now waiting for the mirror
    finally:
        if drive.is_file():
            drive.unlink()
            os.rename(away, drive)  # Drive comes back
    assert t.finish() == 0, t.output
    assert "Drive mirror" in t.output and "failed (will retry)" in t.output and "recovered" in t.output
    assert "WARNING Drive mirror" in (out / "flaky" / "training.log").read_text()
    assert_same_final_state(reference.run_dir, out / "flaky")
    assert_mirror_verifies(out / "flaky", drive / "flaky")
    assert read_json(drive / "flaky" / "training_state.json")["status"] == "completed"
    local = read_json(out / "flaky" / "checkpoint_metadata.json")["checkpoints"]
    assert local[-1]["mirrored"] and local[-1]["mirrored"]["checksum"] == local[-1]["checksum"]
    assert any(e["batch"] != 7 for e in local), "no checkpoint was saved by the clock"


def test_resume_completes_a_restore_from_drive_that_was_cut_short(reference, tmp_path, in_process_torch_settings):
    drive, out = tmp_path / "drive", tmp_path / "runs"
    shutil.copytree(reference.run_dir, drive / "cut")  # the mirror: same layout as a run
    mirror_index = read_json(drive / "cut" / "checkpoint_metadata.json")
    first = mirror_index["checkpoints"][0]
    # What an interrupted restore leaves: the oldest file, and an index listing only it.
    (out / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copy2(drive / "cut" / first["path"], out / "cut" / first["path"])
    partial = dict(mirror_index, checkpoints=[first], next_id=first["id"] + 1)
    (out / "cut" / "checkpoint_metadata.json").write_text(json.dumps(partial))

    args = trainloop.parse_args(["--output-dir", str(out), "--run-name", "cut", "--resume", "--drive-backup", str(drive)])
    assert trainloop._choose_run(args, out, print) == ("cut", True)
    local = read_json(out / "cut" / "checkpoint_metadata.json")
    assert [e["id"] for e in local["checkpoints"]] == [e["id"] for e in mirror_index["checkpoints"]]
    assert local["next_id"] == mirror_index["next_id"]  # ids are never reused after a restore
    restored = local["checkpoints"][1:]  # what this call copied is recorded as being on the mirror
    assert all(e["mirrored"] and e["mirrored"]["checksum"] == e["checksum"] for e in restored)
    assert_mirror_verifies(out / "cut", drive / "cut")


def test_restore_from_drive_skips_a_damaged_mirror_file_and_never_reuses_its_id(reference, tmp_path, capsys):
    drive, out = tmp_path / "drive", tmp_path / "runs"
    shutil.copytree(reference.run_dir, drive / "dmg")
    mirror_index = read_json(drive / "dmg" / "checkpoint_metadata.json")
    newest = mirror_index["checkpoints"][-1]
    damaged = drive / "dmg" / newest["path"]
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a copy cut short on Drive

    args = trainloop.parse_args(["--output-dir", str(out), "--run-name", "dmg", "--resume", "--drive-backup", str(drive)])
    assert trainloop._choose_run(args, out, print) == ("dmg", True)
    assert f"not restored from Drive: {newest['path']}" in capsys.readouterr().out
    local = read_json(out / "dmg" / "checkpoint_metadata.json")
    assert [e["id"] for e in local["checkpoints"]] == [e["id"] for e in mirror_index["checkpoints"][:-1]]
    assert not (out / "dmg" / newest["path"]).exists()
    assert local["next_id"] == mirror_index["next_id"] > newest["id"]
    assert (out / "dmg" / "best_model.pt").is_file() and (out / "dmg" / "training_state.json").is_file()

    # Nothing restorable at all: an error, never a silent fresh start.
    for entry in mirror_index["checkpoints"]:
        (drive / "dmg" / entry["path"]).write_bytes(b"damaged")
    args = trainloop.parse_args(["--output-dir", str(tmp_path / "other"), "--run-name", "dmg", "--resume",
                                 "--drive-backup", str(drive)])
    with pytest.raises(trainloop.CkptctlError, match="could be restored; not starting over"):
        trainloop._choose_run(args, tmp_path / "other", print)


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(where)], check=True)
    return ok


def _remount(where: Path, options: str) -> None:
    """Remount ``where``; a remount read-only is refused (busy) while a file there is open for
    writing (the mirror may be mid-copy), so it is retried until the mirror is between files."""
    assert wait_until(
        lambda: subprocess.run(["mount", "-o", f"remount,{options}", str(where)], capture_output=True).returncode == 0,
        timeout=60,
    ), f"cannot remount {where} with {options}"


def test_resume_info_and_the_restore_hint_fit_a_trainloop_run(reference, tmp_path):
    """The newest checkpoint is epoch 2's last batch (8 batches an epoch): training continues at the start of epoch 3,
    and a restore of the run says the trainloop's command (its training_state.json says the trainloop wrote it)."""
    from .cli_helpers import invoke

    assert read_json(reference.run_dir / "training_state.json")["written_by"] == "ckptctl.trainloop"
    info = invoke("resume-info", reference.run_dir)
    assert "training continues at epoch 3, batch 0" in info.stdout, info.stdout
    drive = tmp_path / "drive"
    shutil.copytree(reference.run_dir, drive / "ref")
    result = invoke("restore", "--from-drive", "--drive", drive, "--to", tmp_path / "runs")
    assert result.exit_code == 0, result.stderr
    command = f"python -m ckptctl.trainloop --resume --output-dir {tmp_path / 'runs'} --run-name ref"
    assert f"  {command}" in result.stdout.splitlines(), result.stdout


def test_a_fresh_start_never_reuses_a_run_name_that_drive_holds(reference, tmp_path):
    """No --resume, the local folder gone, the same --run-name: refused before anything is written to Drive."""
    drive, out = tmp_path / "drive", tmp_path / "runs"
    shutil.copytree(reference.run_dir, drive / "arc1")
    before = {p.relative_to(drive): p.read_bytes() for p in (drive / "arc1").rglob("*") if p.is_file()}
    args = trainloop.parse_args(["--output-dir", str(out), "--run-name", "arc1", "--drive-backup", str(drive)])
    with pytest.raises(trainloop.TrainloopError, match="has checkpoints on the Drive mirror.*add --resume"):
        trainloop._choose_run(args, out, print)
    assert {p.relative_to(drive): p.read_bytes() for p in (drive / "arc1").rglob("*") if p.is_file()} == before
    assert not (out / "arc1").exists()


@pytest.mark.root_only
def test_drive_full_then_read_only_never_stops_training_and_the_mirror_catches_up(reference, tmp_path):
    drive = tmp_path / "drive"
    if not _can_mount_tmpfs(drive):
        pytest.skip("needs root and mount(8) to make a real small/read-only filesystem for the Drive")
    out = tmp_path / "runs"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(drive)], check=True)
    try:
        # An explicit budget larger than the Drive: the real full filesystem (ENOSPC) limits the
        # mirror, which keeps its newest verified copy and says the next one does not fit.
        t = Trainer(trainloop_cmd(out, "full", "--drive-backup", str(drive), "--drive-max-size", "64MB"), tmp_path)
        try:
            assert t.wait_for(lambda ls: any("does not fit" in l for l in ls)), t.output
            _remount(drive, "size=64m,ro")  # room again, but read-only now
            assert t.wait_for(lambda ls: any("Read-only file system" in l for l in ls)), t.output
            assert t.wait_for(lambda ls: any(l.startswith("Completed 3 epochs") for l in ls)), t.output
            assert t.proc.poll() is None  # training is done; close() waits for the mirror
        finally:
            _remount(drive, "rw")
        assert t.finish() == 0, t.output
        assert "recovered" in t.output
        assert_same_final_state(reference.run_dir, out / "full")
        assert_mirror_verifies(out / "full", drive / "full")
        assert read_json(drive / "full" / "training_state.json")["status"] == "completed"
    finally:
        subprocess.run(["umount", "-l", str(drive)], capture_output=True)


@pytest.mark.root_only
def test_hung_drive_never_stops_training_and_the_mirror_catches_up(reference, tmp_path):
    drive = tmp_path / "drive"
    if not mount_loop_ext4(drive, tmp_path / "drive.img"):
        pytest.skip("needs root, a loop device, mkfs.ext4 and fsfreeze to hang a real filesystem")
    out = tmp_path / "runs"
    frozen = False
    try:
        t = Trainer(trainloop_cmd(out, "hung", "--drive-backup", str(drive)), tmp_path)
        # a copied checkpoint and the mirror index that lists it (written just after the copy)
        assert wait_until(lambda: (drive / "hung" / "checkpoint_metadata.json").exists()), t.output
        # Every write to Drive now blocks (a hung FUSE mount): the mirror thread gets stuck in it.
        subprocess.run(["fsfreeze", "-f", str(drive)], check=True)
        frozen = True
        assert t.wait_for(lambda ls: any(l.startswith("Completed 3 epochs") for l in ls)), t.output
        assert t.proc.poll() is None  # training is done; close() waits for the mirror
        local_newest = newest_checkpoint(out / "hung")[0]["id"]
        mirror_newest = max(e["id"] for e in read_json(drive / "hung" / "checkpoint_metadata.json")["checkpoints"])
        assert mirror_newest < local_newest  # the mirror really was stuck while training went on
        subprocess.run(["fsfreeze", "-u", str(drive)], check=True)
        frozen = False
        assert t.finish() == 0, t.output
        assert_same_final_state(reference.run_dir, out / "hung")
        assert_mirror_verifies(out / "hung", drive / "hung")
        assert read_json(drive / "hung" / "training_state.json")["status"] == "completed"
    finally:
        if frozen:
            subprocess.run(["fsfreeze", "-u", str(drive)], capture_output=True)
        subprocess.run(["umount", "-l", str(drive)], capture_output=True)
