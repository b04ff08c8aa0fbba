"""Recovery in the real notebook flow: re-run cells, fresh VMs, a missing GPU, the best metric, lock probes.

Each test here reproduces a way a library user lost progress (issue "Never lose progress in
the real Colab flow") on real files, real threads and real processes.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from ckptctl import ModelPersistence, setup_drive_backup
from ckptctl.core.format import BEST_MODEL_FILE
from ckptctl.errors import CkptctlError, DeviceUnavailableError, RunLockedError
from ckptctl.storage.lock import RunLock, is_locked
from ckptctl.storage.scan import read_best, read_index

from .damage import flip_byte
from .test_persistence import Rig, assert_same_state, flat_state, seed_all
from .mount_helpers import mount_loop_ext4
from .trainloop_helpers import wait_until


def _train(p: ModelPersistence, rig: Rig, batches: range, epoch: int = 0) -> None:
    for batch in batches:
        rig.step()
        metrics = {"loss": 1.0 / (batch + 1), "accuracy_delta": float(batch)}
        p.maybe_save(epoch, batch, metrics, **rig.components())
        p.update_best(epoch, batch, metrics, **rig.components())


# ---------------------------------------------------------------------- re-running a notebook cell


def test_a_second_writer_in_the_same_process_takes_over_from_an_unclosed_one(tmp_path, caplog):
    run = tmp_path / "runs" / "r"
    rig = Rig()
    first = ModelPersistence(run, save_every_n_batches=1)
    first.save_checkpoint(0, 0, {"loss": 1.0}, **rig.components())  # may still be writing
    with caplog.at_level(logging.WARNING, logger="ckptctl"):
        second = ModelPersistence(run, save_every_n_batches=1)  # the cell ran again; first never closed
    takeovers = [r for r in caplog.records if "taking over" in r.getMessage()]
    assert len(takeovers) == 1, [r.getMessage() for r in caplog.records]
    assert sorted(second.checkpoints) == [0]  # the earlier writer's pending save finished first
    with pytest.raises(CkptctlError, match="took over"):
        first.save_checkpoint(0, 1, {}, **rig.components())
    with pytest.raises(CkptctlError, match="took over"):
        first.resume(**rig.components())
    assert second.save_checkpoint(0, 1, {}, **rig.components()) == 1
    first.close()  # harmless on a taken-over writer
    second.close()
    assert [c.id for c in read_index(run).checkpoints] == [0, 1]


def test_another_live_process_is_refused_naming_its_pid_and_host(tmp_path):
    run = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from ckptctl import ModelPersistence
            p = ModelPersistence({str(run)!r})
            print("ready", flush=True)
            sys.stdin.read()
            p.close()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(RunLockedError) as caught:
            ModelPersistence(run)
        assert f"pid {holder.pid}" in str(caught.value) and socket.gethostname() in str(caught.value)
    finally:
        holder.communicate("", timeout=60)
    ModelPersistence(run).close()


# ---------------------------------------------------------------------- probing a lock


def test_probing_the_lock_never_makes_a_trainer_start_fail(tmp_path):
    """`watch ckptctl ls` (is_locked in a tight loop) against a trainer starting over and over."""
    run = tmp_path / "r"
    run.mkdir()
    RunLock(run).acquire().release()  # the lock file exists, as it does for every opened run
    prober = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from ckptctl.storage.lock import is_locked
            print("ready", flush=True)
            n = 0
            while not sys.stdin.closed:
                for _ in range(200):
                    is_locked({str(run)!r}); n += 1
                import select
                if select.select([sys.stdin], [], [], 0)[0]:
                    break
            print(n, flush=True)
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    failures = 0
    try:
        assert prober.stdout.readline().strip() == "ready"
        for _ in range(4000):
            lock = RunLock(run)
            try:
                lock.acquire()
            except RunLockedError:
                failures += 1
                continue
            lock.release()
    finally:
        out, _ = prober.communicate("stop\n", timeout=60)
    assert int(out.split()[-1]) > 1000, "the prober did not run alongside"
    assert failures == 0


def test_is_locked_tells_held_from_free_without_taking_the_lock(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    assert not is_locked(run)  # no lock file at all
    lock = RunLock(run).acquire()
    try:
        assert is_locked(run)
    finally:
        lock.release()
    assert not is_locked(run)


# ---------------------------------------------------------------------- device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error_and_no_checkpoint_is_called_damaged(tmp_path, caplog):
    run = tmp_path / "r"
    rig = Rig()
    with ModelPersistence(run, save_every_n_batches=1) as p:
        _train(p, rig, range(3))
    with ModelPersistence(run) as p, caplog.at_level(logging.WARNING, logger="ckptctl"):
        for call in (lambda: p.resume(device="cuda", **rig.components()),
                     lambda: p.load_checkpoint(2, device="cuda", **rig.components()),
                     lambda: p.load_best_model(device="cuda:0", **rig.components())):
            with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
                call()
        assert not [r for r in caplog.records if "skipping checkpoint" in r.getMessage()]
        assert p.resume(device="cpu", **rig.components())["checkpoint_id"] == 2  # the files were fine


# ---------------------------------------------------------------------- best metric


def test_update_best_right_after_a_save_records_the_metric_it_was_given_across_a_restart(tmp_path):
    run = tmp_path / "r"
    rig = Rig()
    with ModelPersistence(run, save_every_n_batches=1, best_metric="accuracy_delta") as p:
        rig.step()
        p.maybe_save(0, 0, {"loss": 0.5}, **rig.components())
        assert p.update_best(0, 0, {"accuracy_delta": 0.9}, **rig.components()) is True
    best = read_best(run)
    assert best.value == 0.9 and best.source_id == 0 and best.metrics["accuracy_delta"] == 0.9
    with ModelPersistence(run, save_every_n_batches=1, best_metric="accuracy_delta") as p:
        rig.step()
        p.maybe_save(0, 1, {"loss": 0.4}, **rig.components())
        assert p.update_best(0, 1, {"accuracy_delta": 0.5}, **rig.components()) is False  # worse: not the best
    assert read_best(run).value == 0.9 and read_best(run).source_id == 0


# ---------------------------------------------------------------------- fresh VM


def _mirrored_run(make_run, tmp_path, batches=4):
    """A run of a :class:`Rig` (returned, in its final state) mirrored to ``tmp_path/drive`` as it trained."""
    drive = setup_drive_backup(tmp_path / "drive")
    seed_all(3)
    rig = Rig()
    return make_run("r", n=batches, keep=5, drive=drive, trainer=rig), drive, rig


def test_a_fresh_vm_restores_from_drive_on_open_and_resumes_from_the_newest(tmp_path, make_run):
    run, drive, rig = _mirrored_run(make_run, tmp_path)
    reference = flat_state(rig)
    mirror_best = (drive / "r" / BEST_MODEL_FILE).read_bytes()
    shutil.rmtree(run)  # the VM was recycled
    other = Rig(seed=9)
    with ModelPersistence(run, save_every_n_batches=1, max_checkpoints=5, drive_backup=drive) as p:
        assert p.last_restore is not None and p.last_restore.copied
        info = p.resume(**other.components())
        assert info["checkpoint_id"] == 3
        assert_same_state(flat_state(other), reference)
        assert p.save_checkpoint(0, 4, {"loss": 0.1}, **other.components()) == 4  # ids continue
        assert p.update_best(0, 4, {"accuracy_delta": -1.0}, **other.components()) is False  # the restored best still rules
    mirror_ids = [c.id for c in read_index(drive / "r").checkpoints]
    assert mirror_ids == [0, 1, 2, 3, 4]  # nothing overwritten, nothing orphaned
    assert (drive / "r" / BEST_MODEL_FILE).read_bytes() == mirror_best


def test_nothing_starts_over_a_mirror_whose_checkpoints_do_not_restore(tmp_path, make_run):
    run, drive, _ = _mirrored_run(make_run, tmp_path, batches=2)
    shutil.rmtree(run)
    for path in (drive / "r" / "checkpoints").iterdir():
        flip_byte(path)
    before = {p.name: p.read_bytes() for p in (drive / "r" / "checkpoints").iterdir()}
    index_before = (drive / "r" / "checkpoint_metadata.json").read_bytes()
    with pytest.raises(CkptctlError, match="not starting over"):
        ModelPersistence(run, drive_backup=drive)
    assert {p.name: p.read_bytes() for p in (drive / "r" / "checkpoints").iterdir()} == before
    assert (drive / "r" / "checkpoint_metadata.json").read_bytes() == index_before
    ModelPersistence(run).close()  # the refused open left the run usable (lock released)


def test_an_older_local_copy_catches_up_from_a_mirror_that_is_ahead(tmp_path, make_run):
    run, drive, _ = _mirrored_run(make_run, tmp_path, batches=3)
    stale = tmp_path / "stale"
    shutil.copytree(run, stale)
    with ModelPersistence(run, save_every_n_batches=1, max_checkpoints=5, drive_backup=drive) as p:
        _train(p, Rig(), range(3, 5))
    shutil.rmtree(run)
    shutil.copytree(stale, run)  # an old disk image: checkpoints 0-2, the mirror has 0-4
    with ModelPersistence(run, drive_backup=drive) as p:
        assert p.get_resume_info()["checkpoint_id"] == 4
    assert json.loads((run / "checkpoint_metadata.json").read_text())["next_id"] == 5


# ---------------------------------------------------------------------- a mirror thread outliving close()


@pytest.mark.root_only
def test_a_mirror_thread_that_outlives_close_never_writes_the_closed_writers_index(tmp_path):
    """Drive hangs (a frozen filesystem), close() gives up waiting, a new writer saves more;
    when Drive thaws, the old thread's report must not put the old index back."""
    drive = tmp_path / "drive"
    if not mount_loop_ext4(drive, tmp_path / "drive.img"):
        pytest.skip("needs root, a loop device, mkfs.ext4 and fsfreeze to hang a real filesystem")
    run, rig = tmp_path / "runs" / "r", Rig()
    frozen = False
    try:
        first = ModelPersistence(run, save_every_n_batches=1, max_checkpoints=10, drive_backup=drive)
        _train(first, rig, range(2))
        first.flush()
        index_file = drive / "r" / "checkpoint_metadata.json"  # written once the first copy (packs, then file) is done
        assert wait_until(lambda: index_file.is_file() and [c.id for c in read_index(drive / "r").checkpoints] == [0, 1])
        subprocess.run(["fsfreeze", "-f", str(drive)], check=True)
        frozen = True
        first.maybe_save(0, 2, {"loss": 0.3}, **rig.components())  # its copy to Drive hangs
        first.close(mirror_timeout=0.5)
        assert first._drive.mirror._thread.is_alive()  # still stuck in a write to Drive
        with ModelPersistence(run, save_every_n_batches=1, max_checkpoints=10) as second:  # a re-run cell, no Drive
            _train(second, rig, range(3, 5))
        ids = [c.id for c in read_index(run).checkpoints]
        assert ids == [0, 1, 2, 3, 4]
        subprocess.run(["fsfreeze", "-u", str(drive)], check=True)
        frozen = False
        first._drive.mirror._thread.join(timeout=60)
        assert not first._drive.mirror._thread.is_alive()
        assert [c.id for c in read_index(run).checkpoints] == ids  # the stale index was not written back
    finally:
        if frozen:
            subprocess.run(["fsfreeze", "-u", str(drive)], capture_output=True)
        subprocess.run(["umount", "-l", str(drive)], capture_output=True)


# ---------------------------------------------------------------------- lag is visible


def test_a_mirror_that_falls_behind_is_recorded_and_warned_about_naming_the_cause(tmp_path, caplog):
    run, drive = tmp_path / "runs" / "r", setup_drive_backup(tmp_path / "drive")
    rig = Rig()
    with caplog.at_level(logging.WARNING, logger="ckptctl"):
        with ModelPersistence(run, save_every_n_batches=1, drive_backup=drive, drive_max_size="2KB") as p:
            assert p.drive_budget == 2000
            for batch in range(6):
                rig.step()
                p.maybe_save(0, batch, {"loss": 1.0}, **rig.components())
                p.flush()
                p._drive.mirror.wait_idle(30)
    lag = [r.getMessage() for r in caplog.records if "saves behind" in r.getMessage()]
    assert len(lag) == 1, lag  # once per cause, not once per save
    assert "newest verified on Drive: none yet" in lag[0] and "does not fit" in lag[0]
    status = json.loads((run / "mirror_status.json").read_text())
    assert status["budget_bytes"] == 2000 and status["newest_verified_id"] is None
    assert status["not_mirrored"] == 5 and status["too_big"]
    with pytest.raises(CkptctlError, match="not a size"):
        ModelPersistence(tmp_path / "runs" / "x", drive_backup=drive, drive_max_size="lots")


def test_a_run_restored_from_drive_does_not_look_behind_on_its_first_save(tmp_path, make_run, caplog):
    run, drive, rig = _mirrored_run(make_run, tmp_path, batches=5)
    shutil.rmtree(run)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ckptctl"):
        with ModelPersistence(run, save_every_n_batches=1, max_checkpoints=5, drive_backup=drive) as p:
            p.resume(**rig.components())
            assert p.save_checkpoint(0, 5, {"loss": 0.1}, **rig.components()) == 5
    assert not [r for r in caplog.records if "saves behind" in r.getMessage()]


def test_a_best_model_before_the_first_checkpoint_does_not_set_the_mirror_failing(tmp_path, caplog):
    run, drive = tmp_path / "runs" / "r", setup_drive_backup(tmp_path / "drive")
    rig = Rig()
    with caplog.at_level(logging.WARNING, logger="ckptctl"):
        with ModelPersistence(run, save_every_n_batches=5, drive_backup=drive) as p:
            assert p.update_best(0, 0, {"accuracy_delta": 0.5}, **rig.components()) is True  # no checkpoint, no index yet
            p.flush()
            p.save_checkpoint(0, 1, {"accuracy_delta": 0.4}, **rig.components())
    assert not [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert (drive / "r" / BEST_MODEL_FILE).read_bytes() == (run / BEST_MODEL_FILE).read_bytes()
    assert [c.id for c in read_index(drive / "r").checkpoints] == [0]


@pytest.mark.parametrize("where", ["is the run", "inside the run", "around the run"])
def test_a_drive_folder_that_is_the_run_inside_it_or_around_it_is_refused(tmp_path, where):
    """The mirror (<drive>/<run name>) must be apart from the run: before, its temporary
    clean-up deleted the trainer's saves in flight (BackgroundSaveError after 2-3 saves)."""
    run = tmp_path / "r" / "runs" / "r" if where == "around the run" else tmp_path / "runs" / "r"
    drive = {"is the run": run.parent, "inside the run": run / "backup", "around the run": tmp_path}[where]
    run.mkdir(parents=True)
    drive.mkdir(parents=True, exist_ok=True)
    with pytest.raises(CkptctlError, match="choose a Drive folder outside"):
        ModelPersistence(run, drive_backup=drive)
    ModelPersistence(run).close()  # the refused open left nothing locked


def test_a_writer_refused_while_the_holder_writes_its_details_still_names_it(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, json, os, socket, sys, time
            fd = os.open({str(run / ".ckptctl.lock")!r}, os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("locked", flush=True)
            time.sleep(0.2)  # the instant between taking the lock and writing who holds it
            os.pwrite(fd, json.dumps({{"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}}).encode(), 0)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on"):
            ModelPersistence(run)
    finally:
        holder.communicate("", timeout=60)
