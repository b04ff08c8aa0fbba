"""Shared fixtures: every test runs inside its own tmp_path, and small real runs are easy to make."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture(autouse=True)
def _inside_tmp_path(tmp_path, monkeypatch):
    """Keep every test inside tmp_path: cwd, HOME, and the default Drive path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CKPTCTL_DRIVE", str(tmp_path / "drive_default"))
    yield


class TinyTrainer:
    """A real (tiny) model, optimizer and scheduler that take deterministic training steps."""

    def __init__(self, seed: int = 0):
        import torch

        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.5)

    def step(self) -> float:
        import torch

        x = torch.randn(5, 4)
        loss = self.model(x).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return float(loss)

    def components(self) -> dict:
        return {"agent": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}


@pytest.fixture
def make_run(tmp_path) -> Callable[..., Path]:
    """Write a real run with ``n`` checkpoints (one per batch) and a best model; return its directory."""

    def _make(name: str = "run_a", n: int = 3, keep: int = 5, parent: Path | None = None, best_at: int | None = None) -> Path:
        from ckptctl import ModelPersistence

        run_dir = (parent or tmp_path / "runs") / name
        trainer = TinyTrainer()
        p = ModelPersistence(run_dir, max_checkpoints=keep, save_every_n_batches=1, background=False)
        for batch in range(n):
            loss = trainer.step()
            metrics = {"loss": loss, "accuracy_delta": float(batch if best_at is None else -abs(batch - best_at))}
            p.maybe_save(0, batch, metrics, **trainer.components())
            p.update_best(0, batch, metrics, **trainer.components())
        p.close()
        return run_dir

    return _make


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
    """A small real run (keep 2, three saves, a best model) that the SIGKILL tests copy and crash."""
    import torch

    from ckptctl import ModelPersistence

    run = tmp_path_factory.mktemp("base") / "run"
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ModelPersistence(run, max_checkpoints=2, save_every_n_batches=1) as p:
        for batch in range(3):
            p.maybe_save(0, batch, {"accuracy_delta": float(batch)}, agent=model, optimizer=opt)
            p.update_best(0, batch, {"accuracy_delta": float(batch)}, agent=model, optimizer=opt)
    return run
