"""Running the real trainloop in subprocesses, killing it for real, and comparing its results.

No mocks: every run is ``python -m ckptctl.trainloop`` in its own process, stopped with
real signals; comparisons read the files it wrote (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable


from ckptctl.tensors import compare_states, flat_tensors
from ckptctl.torch_io import safe_load

#: Small, fast settings: 64 training pairs in batches of 8 (8 batches per epoch).
FAST_FLAGS = (
    "--max-pairs", "64", "--max-eval-pairs", "48", "--batch-size", "8", "--epochs", "3",
    "--save-every", "2", "--log-every", "1", "--max-checkpoints", "3", "--seed", "7", "--no-progress",
    "--drive-retry-max", "1",
)


def replace_flags(flags: tuple[str, ...], changes: dict[str, str]) -> tuple[str, ...]:
    """``flags`` with the values of the flags named in ``changes`` replaced."""
    out = list(flags)
    for name, value in changes.items():
        out[out.index(name) + 1] = value
    return tuple(out)


_METRIC_LINE = re.compile(r"^Epoch (\d+)(?:, Batch (\d+):| validation:)")
_RESUMED = re.compile(r"^Resumed from checkpoint \d+ at Epoch (\d+), Batch (\d+)$")


def trainloop_env(drive: str | None = None) -> dict[str, str]:
    """The environment of a trainloop subprocess: no inherited Drive unless ``drive`` is given."""
    env = dict(os.environ)
    env.pop("CKPTCTL_DRIVE", None)
    if drive is not None:
        env["CKPTCTL_DRIVE"] = str(drive)
    env["PYTHONUNBUFFERED"] = "1"
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def trainloop_cmd(output_dir: Path, run_name: str, *extra: str, flags: tuple[str, ...] = FAST_FLAGS) -> list[str]:
    return [sys.executable, "-m", "ckptctl.trainloop", "--output-dir", str(output_dir), "--run-name", run_name, *flags, *extra]


class Trainer:
    """One trainloop subprocess whose merged output is read line by line on a thread."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.cmd = cmd
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env or trainloop_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 120.0) -> bool:
        """Wait until ``predicate(lines)`` holds; False if the process ended (or timed out) first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.lines):
                if not self._reader.is_alive() or time.monotonic() > deadline:
                    return predicate(self.lines)
                self._cond.wait(0.05)
            return True

    def wait_batches(self, n: int, timeout: float = 120.0) -> bool:
        """Wait for ``n`` batch log lines from this process."""
        return self.wait_for(lambda lines: sum(1 for l in lines if ", Batch " in l and l.startswith("Epoch ")) >= n, timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def finish(self, timeout: float = 180.0) -> int:
        """Wait for the process and its output; return the exit code."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"trainloop did not finish in {timeout}s; output:\n{self.output[-3000:]}")
        self._reader.join(timeout=10)
        return rc


def run_trainloop(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 180.0) -> tuple[int, str]:
    trainer = Trainer(cmd, cwd, env)
    rc = trainer.finish(timeout)
    return rc, trainer.output


# --------------------------------------------------------------------------- reading results


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def newest_checkpoint(run_dir: Path) -> tuple[dict, Path]:
    index = read_json(run_dir / "checkpoint_metadata.json")
    entry = max(index["checkpoints"], key=lambda e: e["id"])
    return entry, run_dir / entry["path"]


def load_payload(path: Path) -> dict:
    return safe_load(path)


def tensor_differences(a: dict, b: dict) -> list[str]:
    """Tensors that are not bit-identical (dtype, shape and every byte) between two payloads, as ``name: status``."""
    return [f"{r.name}: {r.status}" for r in compare_states(a, b) if not r.bit_identical]


def assert_same_final_state(run_a: Path, run_b: Path) -> None:
    """The newest checkpoints of two runs hold bit-identical tensors and the same position/metrics."""
    entry_a, path_a = newest_checkpoint(run_a)
    entry_b, path_b = newest_checkpoint(run_b)
    pa, pb = load_payload(path_a), load_payload(path_b)
    diffs = tensor_differences(pa, pb)
    assert not diffs, f"final checkpoints differ in {len(diffs)} tensor(s): {diffs[:10]}"
    assert len(flat_tensors(pa)) > 20  # the comparison covered the real state, RNG included
    for key in ("epoch", "batch", "global_step", "metrics", "components"):
        assert pa[key] == pb[key], f"{key}: {pa[key]!r} vs {pb[key]!r}"
    assert pa["extra"]["data_position"] == pb["extra"]["data_position"]


def metric_lines(lines: list[str]) -> list[str]:
    return [l for l in lines if _METRIC_LINE.match(l)]


def _key(line: str) -> tuple[int, int]:
    m = _METRIC_LINE.match(line)
    assert m, line
    return int(m.group(1)), int(m.group(2)) if m.group(2) is not None else 10**9


def log_segments(log_text: str) -> list[tuple[tuple[int, int], list[str]]]:
    """Split a training.log into attempts: ``[(position it started at, its metric lines), ...]``.

    An attempt starts at a "Started run" line (position (0, 0)) or a "Resumed ... at Epoch E,
    Batch B" line (position (E, B), the next batch it trains).
    """
    segments: list[tuple[tuple[int, int], list[str]]] = []
    for line in log_text.splitlines():
        m = _RESUMED.match(line)
        if m:
            segments.append(((int(m.group(1)), int(m.group(2))), []))
        elif line.startswith("Started run "):
            segments.append(((0, 0), []))
        elif _METRIC_LINE.match(line):
            assert segments, f"metric line before any start line: {line}"
            segments[-1][1].append(line)
    return segments


def assert_log_consistent(reference_log: str, resumed_log: str) -> int:
    """Every attempt's log lines equal the uninterrupted run's from its start point on, the last
    attempt's up to the end. Returns the number of attempts."""
    reference = metric_lines(reference_log.splitlines())
    segments = log_segments(resumed_log)
    assert segments, "empty log"
    for i, (start, lines) in enumerate(segments):
        expected = [l for l in reference if _key(l) >= start]
        if i == len(segments) - 1:
            assert lines == expected, f"after the last resume (at {start}) the log differs"
        else:
            assert lines == expected[: len(lines)], f"attempt {i} (from {start}) logged different lines"
    return len(segments)


def file_checksum(path: Path, like: str) -> str:
    """The checksum of ``path`` in the algorithm of the stored checksum ``like``."""
    from ckptctl.storage.atomic import hash_file

    return hash_file(path, like.split(":", 1)[0])[1]


def assert_mirror_verifies(local_run: Path, mirror_run: Path, *, every_local: bool = True) -> None:
    """The mirror is a consistent copy: its index's files exist with the recorded checksums, it
    holds the local newest checkpoint and best model (``every_local``: every local checkpoint;
    not so under a byte budget), and no temporaries are left."""
    mirror_index = read_json(mirror_run / "checkpoint_metadata.json")
    local_index = read_json(local_run / "checkpoint_metadata.json")
    assert mirror_index["checkpoints"], "mirror index is empty"
    for entry in mirror_index["checkpoints"]:
        assert file_checksum(mirror_run / entry["path"], entry["checksum"]) == entry["checksum"], entry["path"]
        if (local_run / entry["path"]).exists():
            assert filecmp.cmp(mirror_run / entry["path"], local_run / entry["path"], shallow=False), entry["path"]
        load_payload(mirror_run / entry["path"])
    local_newest = max(local_index["checkpoints"], key=lambda e: e["id"])
    mirrored = {e["id"]: e for e in mirror_index["checkpoints"]}
    assert local_newest["id"] in mirrored and mirrored[local_newest["id"]]["checksum"] == local_newest["checksum"]
    if every_local:
        assert {e["id"] for e in local_index["checkpoints"]} <= set(mirrored)
    best = read_json(mirror_run / "best_metadata.json")
    assert file_checksum(mirror_run / "best_model.pt", best["checksum"]) == best["checksum"]
    assert best["checksum"] == read_json(local_run / "best_metadata.json")["checksum"]
    assert filecmp.cmp(mirror_run / "best_model.pt", local_run / "best_model.pt", shallow=False)
    leftovers = [p.name for p in mirror_run.rglob(".ckptctl-tmp-*")]
    assert not leftovers, f"temporaries left on the mirror: {leftovers}"


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll ``predicate`` every 10 ms until it holds; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def mirrored_checkpoints(mirror_run: Path) -> list[Path]:
    """The checkpoint files present in a mirror run (none if it has no checkpoints folder yet)."""
    return sorted((mirror_run / "checkpoints").glob("checkpoint_*.pt")) if (mirror_run / "checkpoints").is_dir() else []
