"""Shared fixtures: every test runs inside its own tmp_path, and small real runs are easy to make."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Load the CI rule (tests/ci_rules.py): under CKPTCTL_CI=1 a skipped root-only test fails the run."""
    from tests import ci_rules

    if not config.pluginmanager.is_registered(ci_rules):
        config.pluginmanager.register(ci_rules, "ckptctl-ci-rules")


@pytest.fixture(autouse=True)
def _inside_tmp_path(tmp_path, monkeypatch):
    """Keep every test inside tmp_path: cwd, HOME, and the default Drive path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CKPTCTL_DRIVE", str(tmp_path / "drive_default"))
    yield


class RunFactory:
    """``make_run(name, n, ...)``: :func:`tests.runs.write_run` into ``tmp_path/runs`` (or ``parent=``), plus ``lock=``.

    Every option of ``write_run`` applies (``keep``, ``best_at``, ``best``, ``drive``, ``state``,
    ``truncate=``/``corrupt=``/``drop=`` files, ...). ``lock=True`` returns the run while its lock
    is held, as a live trainer holds it (:meth:`lock` takes it later); :meth:`unlock` releases it
    early, the test's end at the latest.
    """

    def __init__(self, tmp_path: Path):
        self._tmp_path = tmp_path
        self._locks: dict[Path, object] = {}

    def __call__(self, name: str = "run_a", n: int = 4, *, parent: Path | None = None, lock: bool = False, **options) -> Path:
        from .runs import write_run

        run = write_run(parent or self._tmp_path / "runs", name, n, **options)
        if lock:
            self.lock(run)
        return run

    def lock(self, run: Path) -> None:
        """Take ``run``'s lock (the one a live trainer holds) until :meth:`unlock` or the test's end."""
        from ckptctl.storage.lock import RunLock

        self._locks[run] = RunLock(run).acquire()

    def unlock(self, run: Path) -> None:
        """Release the lock taken by ``lock=True`` or :meth:`lock`."""
        self._locks.pop(run).release()

    def close(self) -> None:
        """Release every lock still held."""
        for run in list(self._locks):
            self.unlock(run)


@pytest.fixture
def make_run(tmp_path) -> Iterator[RunFactory]:
    """The run factory: real small runs written through ModelPersistence (see :class:`RunFactory`)."""
    factory = RunFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def fork_context():
    """A forkserver context for the SIGKILL tests, with the heavy imports preloaded once."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    # torch._dynamo is imported lazily by the first optimizer step (~2 s): preload it once.
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "ckptctl.persistence", "ckptctl.cli", "tests.crash_child"])
    return ctx


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A small real run (keep 2, three saves, a best model) that the SIGKILL tests copy and crash (crash_child.MODEL)."""
    from .crash_child import MODEL
    from .runs import write_run

    return write_run(tmp_path_factory.mktemp("base"), "run", n=3, keep=2, **MODEL)


@pytest.fixture
def in_process_torch_settings():
    """Running the trainloop's main() in-process sets torch's threads and determinism: put them back."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
