"""Helpers for the CLI tests: real small runs written through ModelPersistence, and ways to damage them.

Plain functions (not fixtures) so each test says exactly what run it builds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ckptctl.cli import app

REPO = Path(__file__).resolve().parent.parent


def invoke(*args: str, input: str | None = None):
    """Run ``ckptctl ARGS`` in-process; stdout and stderr are kept apart (``.stdout`` / ``.stderr``)."""
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def write_run(
    parent: Path,
    name: str = "run_a",
    n: int = 4,
    keep: int = 10,
    best_at: int | None = None,
    seed: int = 0,
    drive: Path | None = None,
    batches_per_epoch: int = 100,
) -> Path:
    """Write a real run of ``n`` checkpoints (one per batch) of a tiny Linear(4, 2) + Adam; return its directory.

    Metric ``accuracy_delta`` peaks at batch ``best_at`` (default: the last), so the best
    model's source is that checkpoint while it is retained.
    """
    import torch

    from ckptctl import ModelPersistence

    run_dir = parent / name
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    p = ModelPersistence(run_dir, max_checkpoints=keep, save_every_n_batches=1, background=False, drive_backup=drive)
    info = p.resume(agent=model, optimizer=opt)
    start = 0 if info is None else info["global_step"]
    for step in range(start, start + n):
        loss = model(torch.randn(3, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = float(step if best_at is None else -abs(step - best_at))
        metrics = {"loss": loss.item(), "accuracy_delta": acc}
        epoch, batch = divmod(step, batches_per_epoch)
        p.maybe_save(epoch, batch, metrics, agent=model, optimizer=opt)
        p.update_best(epoch, batch, metrics, agent=model, optimizer=opt)
    p.close(mirror_timeout=30)
    return run_dir


def ckpt(run_dir: Path, checkpoint_id: int) -> Path:
    """The file of checkpoint ``checkpoint_id``."""
    return run_dir / "checkpoints" / f"checkpoint_{checkpoint_id:05d}.pt"


def index_of(run_dir: Path) -> dict:
    """The run's index as raw JSON."""
    return json.loads((run_dir / "checkpoint_metadata.json").read_text())


def write_index(run_dir: Path, data: dict) -> None:
    """Overwrite the run's index with ``data``."""
    (run_dir / "checkpoint_metadata.json").write_text(json.dumps(data, indent=2))


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut ``path`` short, as a crash mid-copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Flip one bit in the middle of ``path`` (silent corruption)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def checksum(path: Path) -> str:
    """The stored-form checksum of ``path``, as the library writes it."""
    from ckptctl.storage.atomic import hash_file

    return hash_file(path)[1]


def replace_indexed_file(run_dir: Path, checkpoint_id: int, data: bytes) -> None:
    """Put ``data`` in place of a checkpoint and fix the index's size and checksum to match it."""
    path = ckpt(run_dir, checkpoint_id)
    path.write_bytes(data)
    index = index_of(run_dir)
    for entry in index["checkpoints"]:
        if entry["id"] == checkpoint_id:
            entry["size_bytes"] = len(data)
            entry["checksum"] = checksum(path)
    write_index(run_dir, index)


class _Evil:
    """Unpickling this with arbitrary code allowed creates a file (``open(marker, 'w')``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_bytes(marker: Path) -> bytes:
    """A torch.save file that would create ``marker`` if loaded without ``weights_only=True``."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"epoch": 0, "batch": 0, "global_step": 1, "metrics": {}, "payload": _Evil(marker)}, buf)
    return buf.getvalue()


def ckptctl_cmd() -> list[str]:
    """The installed ``ckptctl`` console script if there is one next to this Python, else ``python -m ckptctl``."""
    script = Path(sys.executable).parent / "ckptctl"
    if script.exists():
        return [str(script)]
    found = shutil.which("ckptctl")
    return [found] if found else [sys.executable, "-m", "ckptctl"]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ckptctl in a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([*ckptctl_cmd(), *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120)


class Hung(BaseException):
    """Raised by :func:`no_hang`; a BaseException, so no ``except OSError``/``except Exception`` swallows it."""


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    """Fail with :class:`Hung` instead of blocking forever (e.g. a FIFO opened the ordinary way).

    SIGALRM interrupts a blocking open() or read() in the main thread and the handler's
    exception ends it (re-armed every second in case one is swallowed), so a regression
    fails the test instead of hanging the suite.
    """

    def on_alarm(signum, frame):
        signal.alarm(1)
        raise Hung(f"blocked for {seconds} s or more")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
