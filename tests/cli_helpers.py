"""Helpers for the CLI tests: ckptctl in-process, in a real subprocess, and a guard against hangs.

The run factory and its file accessors live in ``tests/runs.py``, the ways to damage a run in
``tests/damage.py``; they are imported here too for the tests that take them from this module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ckptctl.cli import app

from .damage import flip_byte, malicious_bytes, replace_indexed_file, truncate
from .runs import checksum, ckpt, index_of, write_index, write_run

__all__ = [
    "REPO", "Hung", "ckptctl_cmd", "invoke", "no_hang", "run_cli",
    # from tests/runs.py and tests/damage.py
    "checksum", "ckpt", "flip_byte", "index_of", "malicious_bytes", "replace_indexed_file", "truncate", "write_index", "write_run",
]

REPO = Path(__file__).resolve().parent.parent


def invoke(*args: str, input: str | None = None):
    """Run ``ckptctl ARGS`` in-process; stdout and stderr are kept apart (``.stdout`` / ``.stderr``)."""
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def ckptctl_cmd() -> list[str]:
    """The installed ``ckptctl`` console script if there is one next to this Python, else ``python -m ckptctl``."""
    script = Path(sys.executable).parent / "ckptctl"
    if script.exists():
        return [str(script)]
    found = shutil.which("ckptctl")
    return [found] if found else [sys.executable, "-m", "ckptctl"]


def modules_imported_by(first: list[str], watched: tuple[str, ...], then: list[str]) -> tuple[list[str], bool]:
    """In a fresh interpreter: which of ``watched`` importing the modules ``first`` pulls in, and whether
    importing ``then`` as well pulls in torch (the layer checks of the import graph)."""
    probe = (
        "import sys, importlib\n"
        f"for m in {first!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in {watched!r} if m in sys.modules)\n"
        f"for m in {then!r}: importlib.import_module(m)\n"
        "print(','.join(bad) or '-', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found, torch_loaded = proc.stdout.split()
    return ([] if found == "-" else found.split(",")), torch_loaded == "True"


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
