"""Signals at random moments on the real trainloop (``make stress``): repeated SIGINT, a second
signal while close() waits for a dead Drive, and the ``make demo`` script end to end.

The SIGKILL storm is ``tests/test_reliability_killstorm.py``.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from .trainloop_helpers import (
    mirrored_checkpoints,
    wait_until,
    Trainer,
    assert_log_consistent,
    assert_mirror_verifies,
    assert_same_final_state,
    load_payload,
    newest_checkpoint,
    read_json,
    run_trainloop,
    trainloop_cmd,
)

pytestmark = pytest.mark.slow


def test_sigint_at_random_moments_always_resumes_exactly(tmp_path):
    out = tmp_path / "runs"
    reference = Trainer(trainloop_cmd(out, "reference"), tmp_path)
    rng = random.Random(99)
    stops = 0
    for attempt in range(4):
        t = Trainer(trainloop_cmd(out, "int", *(("--resume",) if attempt else ())), tmp_path)
        t.wait_batches(rng.randint(1, 5))
        time.sleep(rng.uniform(0.0, 0.03))
        t.kill(signal.SIGINT)
        rc = t.finish()
        if rc == 0:
            break
        assert rc == 128 + signal.SIGINT, t.output
        assert read_json(out / "int" / "training_state.json")["status"] == "interrupted"
        stops += 1
    assert stops >= 2
    rc, output = run_trainloop(trainloop_cmd(out, "int", "--resume"), tmp_path)
    assert rc == 0, output
    assert reference.finish() == 0
    assert_same_final_state(out / "reference", out / "int")
    assert_log_consistent((out / "reference" / "training.log").read_text(), (out / "int" / "training.log").read_text())


def test_second_signal_exits_at_once_while_close_waits_for_a_dead_drive(tmp_path):
    out, drive, away = tmp_path / "runs", tmp_path / "drive", tmp_path / "gone"
    drive.mkdir()
    t = Trainer(trainloop_cmd(out, "twice", "--drive-backup", str(drive)), tmp_path)
    assert wait_until(lambda: mirrored_checkpoints(drive / "twice")), t.output
    os.rename(drive, away)
    drive.write_text("gone\n")
    t.kill(signal.SIGINT)
    # The first signal: finish the batch, save locally, then close() waits (up to 20 s) for Drive.
    assert t.wait_for(lambda ls: any(l.startswith("Interrupted by SIGINT") for l in ls)), t.output
    started = time.monotonic()
    t.kill(signal.SIGINT)
    assert t.finish(timeout=15) == 128 + signal.SIGINT
    assert time.monotonic() - started < 5.0
    assert "SIGINT again: exiting now" in t.output
    state = read_json(out / "twice" / "training_state.json")
    assert state["status"] == "interrupted"
    entry, path = newest_checkpoint(out / "twice")
    assert state["last_checkpoint"] == entry["id"]
    load_payload(path)


def test_make_demo_script_shows_a_disconnect_and_an_exact_resume(tmp_path):
    """``make demo``'s driver, end to end, into a temporary folder."""
    import subprocess
    import sys

    from .trainloop_helpers import trainloop_env

    proc = subprocess.run(
        [sys.executable, "-m", "ckptctl.trainloop_demo", str(tmp_path / "runs"), str(tmp_path / "drive")],
        cwd=tmp_path, env=trainloop_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("simulated disconnect: SIGKILL") == 2
    assert "restoring it from the Drive mirror" in proc.stdout
    assert "all bit-identical" in proc.stdout
    assert_mirror_verifies(tmp_path / "runs" / "demo", tmp_path / "drive" / "demo")
