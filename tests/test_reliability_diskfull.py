"""A real full disk: a 1 MiB tmpfs mounted in a private mount namespace (``unshare -rm``).

Training keeps going by freeing the oldest unprotected checkpoint early; when nothing
may be freed, the save fails with an error naming the cause, the previous checkpoint
stays intact and resumable, and no partial file is left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from .mount_helpers import can_mount_private_tmpfs

CHILD = textwrap.dedent(
    """
    import json, logging, os, sys, threading
    import torch
    from ckptctl import ModelPersistence
    from ckptctl.errors import BackgroundSaveError
    from ckptctl.storage.atomic import verify_checksum
    from ckptctl.storage.scan import read_index

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    root = sys.argv[1]
    out = {}
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)  # ~263 KB per checkpoint: about 3 fit in 1 MiB

    # 1. retention frees space early and training continues
    run = os.path.join(root, "a", "run")
    with ModelPersistence(run, max_checkpoints=10, save_every_n_batches=1) as p:
        for batch in range(8):
            with torch.no_grad():
                model.weight.add_(0.01)
            p.maybe_save(0, batch, {"loss": float(batch)}, agent=model)
        p.flush()
        out["a_ids"] = sorted(p.checkpoints)
    index = read_index(run)
    for e in index.checkpoints:
        verify_checksum(os.path.join(run, e.path), e.checksum)
    out["a_files"] = sorted(os.listdir(os.path.join(run, "checkpoints")))

    # 2. nothing may be freed: a clear error, the previous checkpoint survives
    run = os.path.join(root, "b", "run")
    p = ModelPersistence(run, max_checkpoints=10, save_every_n_batches=1)
    p.save_checkpoint(0, 0, {}, agent=model)
    p.flush()
    first_weights = model.weight.detach().clone()
    free = os.statvfs(run).f_bavail * os.statvfs(run).f_frsize
    with open(os.path.join(root, "b", "filler"), "wb") as f:
        f.write(b"x" * max(0, free - 100_000))
    with torch.no_grad():
        model.weight.add_(1.0)
    gate = threading.Event()
    p._worker.submit(gate.wait)  # holds the worker: the best copy is queued behind the save before it fails
    p.save_checkpoint(0, 1, {}, agent=model)
    p.update_best(0, 1, {"accuracy_delta": 1.0}, agent=model)  # its copy depends on the failing save: skipped
    gate.set()
    try:
        p.flush()
        out["b_error"] = None
    except BackgroundSaveError as exc:
        out["b_error"] = str(exc)
    out["b_files"] = sorted(os.listdir(os.path.join(run, "checkpoints")))
    p.close()
    fresh = torch.nn.Linear(256, 256)
    with ModelPersistence(run) as p:
        out["b_resumed"] = p.resume(agent=fresh)["checkpoint_id"]
    out["b_weights_are_first_save"] = bool(torch.equal(fresh.weight, first_weights))
    print(json.dumps(out))
    """
)


def _run_in_small_tmpfs(tmp_path) -> subprocess.CompletedProcess:
    root = tmp_path / "small"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {root}/a && mount -t tmpfs -o size=1m tmpfs {root}/b && "
        f'exec "{sys.executable}" -c "$CHILD" {root}'
    )
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "CHILD": CHILD},
    )


def test_disk_full_frees_space_or_fails_cleanly(tmp_path):
    if not can_mount_private_tmpfs(tmp_path):
        pytest.skip("this machine allows no private tmpfs mount (unshare -rm); disk-full test needs one")
    result = _run_in_small_tmpfs(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # 1: all 8 saves happened; the oldest were freed early; what is listed verifies
    assert out["a_ids"][-1] == 7 and len(out["a_ids"]) < 8
    assert out["a_files"] == [f"checkpoint_{i:05d}.pt" for i in out["a_ids"]]
    assert "disk full writing checkpoints/checkpoint_" in result.stderr
    # 2: an error naming the real cause (not the best copy queued behind it), no partial file, the first checkpoint resumes
    assert out["b_error"] is not None and "disk full" in out["b_error"] and "No space left" in out["b_error"]
    assert out["b_files"] == ["checkpoint_00000.pt"]
    assert out["b_resumed"] == 0 and out["b_weights_are_first_save"]


def test_restore_onto_a_full_disk_names_the_file_it_could_not_write(tmp_path, make_run):
    """ckptctl restore --from-drive onto a real full tmpfs: one Error line naming the file, exit 1."""
    if not can_mount_private_tmpfs(tmp_path):
        pytest.skip("this machine allows no private tmpfs mount (unshare -rm); disk-full test needs one")
    drive = tmp_path / "drive"
    make_run("big", n=3, parent=drive)
    small = tmp_path / "small"
    small.mkdir()
    script = (
        f"mount -t tmpfs -o size=48k tmpfs {small} && "
        f'exec "{sys.executable}" -m ckptctl restore --from-drive --drive {drive} --run big --to {small}'
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{small}/big/" in lines[0] and "No space left on device" in lines[0], lines[0]
