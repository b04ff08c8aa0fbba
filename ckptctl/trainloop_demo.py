"""``make demo``: the paired trainloop on real ARC pairs, disconnected twice, resumed exactly.

1. starts an uninterrupted reference run in the background (``runs/demo_reference``);
2. starts the same training into ``runs/demo``, mirrored to ``drive/demo`` (a local folder
   standing in for Google Drive), and kills it with SIGKILL mid-run (a lost connection);
3. resumes it with ``--resume``, then kills it again and deletes ``runs/demo`` (a recycled VM);
4. resumes once more: with no local checkpoint it restores the run from the Drive mirror;
5. compares the final checkpoint, tensor by tensor, with the reference run's.

Usage: ``python -m ckptctl.trainloop_demo [RUNS_DIR] [DRIVE_DIR]`` (defaults ``runs``, ``drive``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

FLAGS = [
    "--epochs", "2", "--max-pairs", "512", "--batch-size", "16", "--save-every", "8",
    "--log-every", "8", "--max-checkpoints", "3", "--seed", "1", "--no-progress",
]


def _cmd(runs: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ckptctl.trainloop", "--output-dir", str(runs), "--run-name", name, *FLAGS, *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CKPTCTL_DRIVE", None)
    return env


def _run_until(cmd: list[str], stop_after: str | None) -> int:
    """Run ``cmd`` showing its output; SIGKILL it right after a line starting with ``stop_after``."""
    print("   $ " + " ".join(["python"] + cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        print("   | " + line.rstrip(), flush=True)
        if stop_after is not None and line.startswith(stop_after):
            os.kill(proc.pid, signal.SIGKILL)
            print(f"   !! simulated disconnect: SIGKILL to pid {proc.pid}", flush=True)
            break
    proc.stdout.close()
    return proc.wait()


def _final_payload(run_dir: Path):
    """The run's newest index entry and its checkpoint, loaded safely."""
    from ckptctl.torch_io import safe_load

    index = json.loads((run_dir / "checkpoint_metadata.json").read_text())
    entry = max(index["checkpoints"], key=lambda e: e["id"])
    return entry, safe_load(run_dir / entry["path"], "cpu", mmap=False)


def main(runs: str = "runs", drive: str = "drive") -> int:
    runs_dir, drive_dir = Path(runs), Path(drive)
    for path in (runs_dir / "demo", runs_dir / "demo_reference", drive_dir / "demo"):
        shutil.rmtree(path, ignore_errors=True)
    drive_dir.mkdir(parents=True, exist_ok=True)

    print("== [1/5] reference: the same training, never interrupted (in the background)", flush=True)
    reference = subprocess.Popen(_cmd(runs_dir, "demo_reference"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    print(f"== [2/5] training into {runs_dir / 'demo'}, mirrored to {drive_dir / 'demo'}", flush=True)
    rc = _run_until(_cmd(runs_dir, "demo", "--drive-backup", str(drive_dir)), "Epoch 0, Batch 23")
    print(f"   exit code {rc} (killed)", flush=True)

    print("== [3/5] same command with --resume: continues at the next batch after the last checkpoint", flush=True)
    rc = _run_until(_cmd(runs_dir, "demo", "--drive-backup", str(drive_dir), "--resume"), "Epoch 1, Batch 15")
    shutil.rmtree(runs_dir / "demo")
    print(f"   exit code {rc} (killed); the VM is recycled too: {runs_dir / 'demo'} deleted, only Drive is left", flush=True)

    print("== [4/5] --resume on the fresh machine: restores from the Drive mirror, verifies, continues", flush=True)
    rc = _run_until(_cmd(runs_dir, "demo", "--drive-backup", str(drive_dir), "--resume"), None)
    if rc != 0:
        print(f"demo: the resumed run failed (exit code {rc})", file=sys.stderr)
        return 1

    _, err = reference.communicate()
    if reference.returncode != 0:
        print(f"demo: the reference run failed:\n{err}", file=sys.stderr)
        return 1
    from ckptctl.tensors import compare_states

    entry_a, a = _final_payload(runs_dir / "demo")
    entry_b, b = _final_payload(runs_dir / "demo_reference")
    rows = compare_states(a, b)  # atol 0: dtype, shape and every byte
    differ = [r.name for r in rows if not r.bit_identical]
    print("== [5/5] final checkpoint vs the uninterrupted run", flush=True)
    print(f"   runs/demo checkpoint {entry_a['id']} (epoch {entry_a['epoch']}, batch {entry_a['batch']}) vs "
          f"runs/demo_reference checkpoint {entry_b['id']}: {len(rows)} tensors (weights, optimizer, scheduler, RNG) "
          + ("all bit-identical" if not differ else f"DIFFER: {', '.join(differ[:5])}"), flush=True)
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
