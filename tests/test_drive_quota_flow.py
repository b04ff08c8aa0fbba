"""The Colab flow on a Drive that is nearly full, end to end through the library.

A real tmpfs (mounted in a private mount namespace with ``unshare -rm``) stands in for a
15 GB Drive with 5 GB checkpoints, scaled down: it holds about two checkpoints. A training
loop calls ``ModelPersistence(..., drive_backup=...)`` with the default budget (what the
filesystem reports free), keep-5, 20 saves. Then the VM "is recycled" (the local run is
deleted) and a new ModelPersistence on the same Drive restores and resumes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from .mount_helpers import can_mount_private_tmpfs

CHILD = textwrap.dedent(
    r"""
    import json, os, shutil, sys
    import torch
    from ckptctl import ModelPersistence
    from ckptctl.storage.mirror import tree_bytes
    from ckptctl.storage.scan import read_index, read_best
    from ckptctl.storage.atomic import verify_checksum

    run, drive = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 30))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sizes_after_sync = []

    p = ModelPersistence(run, max_checkpoints=5, save_every_n_batches=1, drive_backup=drive)
    for step in range(20):
        loss = model(torch.randn(16, 100)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        metrics = {"loss": loss.item(), "accuracy_delta": -abs(step - 12) / 10}  # best at step 12
        p.maybe_save(0, step, metrics, agent=model, optimizer=opt)
        p.update_best(0, step, metrics, agent=model, optimizer=opt)
        p.flush()
        p._drive.mirror.wait_idle(60)
        sizes_after_sync.append(tree_bytes(os.path.join(drive, "run")))
    budget = p.drive_budget
    p.close(mirror_timeout=60)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    mirror = os.path.join(drive, "run")
    local_newest = read_index(run).latest.id
    mirror_index = read_index(mirror)
    for entry in mirror_index.checkpoints:
        verify_checksum(os.path.join(mirror, entry.path), entry.checksum)
    best = read_best(mirror)
    verify_checksum(os.path.join(mirror, best.path), best.checksum)
    st = os.statvfs(drive)
    out = {
        "local_newest": local_newest,
        "mirror_ids": [e.id for e in mirror_index.checkpoints],
        "mirror_files": sorted(os.listdir(os.path.join(mirror, "checkpoints"))),
        "best_source": best.source_id,
        "budget": budget,
        "drive_size": st.f_blocks * st.f_frsize,
        "sizes_after_sync": sizes_after_sync,
        "status": json.load(open(os.path.join(run, "mirror_status.json"))),
        "checkpoint_bytes": read_index(run).latest.full_bytes,  # the state it restores (its file is a small skeleton)
    }

    shutil.rmtree(run)  # the VM is recycled
    fresh = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 30))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    with ModelPersistence(run, max_checkpoints=5, save_every_n_batches=1, drive_backup=drive) as q:
        info = q.resume(agent=fresh, optimizer=fresh_opt)
        out["resumed_from"] = info["checkpoint_id"]
        out["resumed_exactly"] = all(torch.equal(final[k], v) for k, v in fresh.state_dict().items())
        out["next_id"] = q.save_checkpoint(1, 0, {"loss": 0.0}, agent=fresh, optimizer=fresh_opt)
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def test_a_drive_that_holds_two_checkpoints_keeps_the_newest_and_restore_resumes_from_it(tmp_path):
    drive, run = tmp_path / "drive", tmp_path / "runs" / "run"
    if not can_mount_private_tmpfs(tmp_path):
        pytest.skip("this machine allows no private tmpfs mount (unshare -rm)")
    drive.mkdir()
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    # Each checkpoint is ~180 kB: the Drive holds three copies (newest, best, one in flight), like 15 GB for 5 GB checkpoints.
    script = f"mount -t tmpfs -o size=600k tmpfs {drive} && exec {sys.executable} {child} {run} {drive}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    print(f"\nDrive {out['drive_size']} B, budget {out['budget']} B, checkpoint {out['checkpoint_bytes']} B; "
          f"mirror holds {out['mirror_ids']} (best from {out['best_source']}); bytes after each sync {out['sizes_after_sync']}")
    assert out["checkpoint_bytes"] * 3 < out["drive_size"] < out["checkpoint_bytes"] * 4
    assert out["local_newest"] == 19
    assert 19 in out["mirror_ids"], out  # the newest reached Drive, however full it was
    assert max(out["sizes_after_sync"]) <= out["budget"]
    assert out["mirror_files"] == [f"checkpoint_{i:05d}.pt" for i in out["mirror_ids"]]  # nothing unindexed left
    assert out["best_source"] == 12
    assert out["status"]["newest_verified_id"] == 19 and out["status"]["last_error"] is None
    assert out["resumed_from"] == 19 and out["resumed_exactly"]
    assert out["next_id"] == 20
