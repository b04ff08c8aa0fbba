"""The trainloop when its run folder goes away or is read-only: one line, a next step, data intact.

Issue "Hostile and unlucky inputs", item 7: these used to end in Python tracebacks.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ckptctl.storage.atomic import verify_checksum
from ckptctl.storage.scan import read_index

from .trainloop_helpers import FAST_FLAGS, Trainer, replace_flags, run_trainloop, trainloop_cmd, wait_until

FLAGS = replace_flags(FAST_FLAGS, {"--epochs": "4"})


def _assert_one_error_line(output: str) -> str:
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def test_the_run_folder_deleted_mid_run_ends_with_one_line(tmp_path):
    out = tmp_path / "runs"
    t = Trainer(trainloop_cmd(out, "gone", flags=FLAGS), tmp_path)
    assert t.wait_batches(3), t.output
    assert wait_until(lambda: (out / "gone" / "checkpoint_metadata.json").exists()), t.output
    moved = tmp_path / "moved_away"
    os.rename(out / "gone", moved)  # renamed (or deleted) while training
    rc = t.finish()
    assert rc == 1, t.output
    line = _assert_one_error_line(t.output)
    assert "--resume" in line
    for entry in read_index(moved).checkpoints:  # what was committed is intact where it went
        verify_checksum(moved / entry.path, entry.checksum)


@pytest.mark.root_only
def test_resume_on_a_read_only_run_is_one_line_and_touches_nothing(tmp_path):
    out = tmp_path / "runs"
    rc, output = run_trainloop(trainloop_cmd(out, "ro", flags=replace_flags(FLAGS, {"--epochs": "1"})), tmp_path)
    assert rc == 0, output
    run = out / "ro"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount(8) for a real read-only bind mount")
    if subprocess.run(["mount", "--bind", str(run), str(run)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts are not allowed here")
    try:
        assert subprocess.run(["mount", "-o", "remount,bind,ro", str(run)], capture_output=True).returncode == 0
        rc, output = run_trainloop(trainloop_cmd(out, "ro", "--resume", flags=FLAGS), tmp_path)
        assert rc == 1, output
        line = _assert_one_error_line(output)
        assert "writable" in line
    finally:
        assert wait_until(lambda: subprocess.run(["umount", str(run)], capture_output=True).returncode == 0, timeout=30)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
