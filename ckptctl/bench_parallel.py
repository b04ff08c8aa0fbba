"""``ckptctl bench --parallel``: a real ``torchrun`` job measuring a sharded save on N ranks (gloo, CPU).

The parent side: starts ``python -m torch.distributed.run --standalone --nproc_per_node N
-m ckptctl.bench_parallel_child`` (see that module for what each round measures), passes
rank 0's progress lines to ``on_step``, and returns the measurements rank 0 wrote as JSON
(all named ``parallel_*``). Imports no torch: only the child does.

Measured, medians of interleaved rounds: ckptctl's training stall per save and DCP
``async_save``'s blocking time (slowest rank), on the same FSDP2 state and world size;
ckptctl's background write (bytes of all ranks' written data / time from the save call to
the end of ``flush()``) and a raw write+fsync of the same bytes by every rank at once.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from ckptctl.core.messages import shorten
from ckptctl.errors import CkptctlError

#: Rank 0's progress lines on the job's stdout start with this (everything else is torch's own output).
STEP_PREFIX = "ckptctl-bench: "
CHILD_MODULE = "ckptctl.bench_parallel_child"
#: A rank that fails writes ``ExceptionType: message`` here, in the job's work folder.
ERROR_FILE = "error_rank{rank}.txt"
#: Lines of the job's output kept for the error message when it fails.
TAIL_LINES = 40


def job_command(work: Path, size_bytes: int, repeats: int, nproc: int, out: Path) -> list[str]:
    """The ``torchrun`` command of the job (this interpreter's torch, a free port on this machine)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", CHILD_MODULE, "--work", str(work), "--size", str(size_bytes), "--repeats", str(repeats), "--out", str(out),
    ]  # fmt: skip


def job_env(nproc: int) -> dict[str, str]:
    """This environment, with ckptctl importable in the ranks, unbuffered output, and the CPU cores split between the ranks."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def job_failure(rc: int, work: Path, tail: collections.deque) -> CkptctlError:
    """The error of a job that failed: its exit status and the cause of the first rank that failed (else torchrun's last error line)."""
    written = sorted(work.glob(ERROR_FILE.format(rank="*")), key=lambda path: path.stat().st_mtime_ns)
    if written:
        cause = written[0].read_text(errors="replace")
    else:
        lines = [line.strip() for line in tail if line.strip()]
        errors = [line for line in lines if "Error" in line.split(":", 1)[0]]
        cause = errors[-1] if errors else (lines[-1] if lines else "no output")
    return CkptctlError(f"parallel bench: the torchrun job exited with status {rc}: {shorten(cause)}")


def bench_parallel(
    work: Path, size_bytes: int, repeats: int, nproc: int = 2, step: Optional[Callable[[str], None]] = None
) -> dict[str, Any]:
    """Run the job of ``nproc`` ranks in ``work`` and return its measurements (``parallel_*``)."""
    import json

    if nproc < 1:
        raise ValueError("nproc must be at least 1")
    work.mkdir(parents=True, exist_ok=True)
    out = work / "parallel.json"
    step and step(f"parallel: torchrun job of {nproc} ranks (gloo, CPU)")
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    job = subprocess.Popen(
        job_command(work, size_bytes, repeats, nproc, out), env=job_env(nproc), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True,
    )  # fmt: skip
    try:
        for line in job.stdout:
            if line.startswith(STEP_PREFIX):
                step and step("parallel: " + line[len(STEP_PREFIX):].rstrip())
            else:
                tail.append(line)
        rc = job.wait()
    except BaseException:  # Ctrl-C or a closed pipe: the ranks must not outlive the bench
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        raise
    if rc != 0 or not out.is_file():
        raise job_failure(rc, work, tail)
    return json.loads(out.read_text())
