"""``ckptctl bench --sections dedup``: what format 2's deduplication saves, in bytes (issue 12's two cases).

(a) an 8.4 MB frozen component next to a small trainable model with Adam (about 0.79 MB
of trainable state); (b) the same frozen weights as the base inside one module whose small
adapter is trained (the LoRA case). Each is saved 10 times with K = 5 and a best model,
mirrored to a Drive folder after every save. Reported: bytes on disk and on the mirror
against the goal ``1.3 x (frozen + 6 x trainable) + 1 MB``, and the bytes uploaded per
save once the frozen part is on the mirror against the trainable state. Byte counts, not
timings: they are the same on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

MB = 1_000_000
SAVES, KEEP = 10, 5


def _state_bytes(state: Any) -> int:
    from ckptctl.tensors import iter_tensors

    return sum(t.numel() * t.element_size() for _, t in iter_tensors(state))


class FrozenComponent:
    """(a) A frozen ``encoder`` component (8.4 MB) and a trainable ``agent`` with Adam."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(1448, 1448).requires_grad_(False)
        self.agent = torch.nn.Linear(256, 256)
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=1e-3)

    def components(self) -> dict[str, Any]:
        """The components every save holds."""
        return {"agent": self.agent, "encoder": self.encoder, "optimizer": self.optimizer}

    def frozen_bytes(self) -> int:
        """Bytes of the weights that never change."""
        return _state_bytes(self.encoder.state_dict())

    def step(self) -> None:
        """One training step of the trainable part."""
        self.optimizer.zero_grad()
        self.agent(torch.randn(4, 256)).pow(2).mean().backward()
        self.optimizer.step()


class Adapted(torch.nn.Module):
    """A frozen base and a small trained adapter in one module."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(1448, 1448).requires_grad_(False)
        self.adapter = torch.nn.Linear(1448, 64, bias=False)


class FrozenBase:
    """(b) The frozen base inside the one module whose adapter the optimizer trains."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.agent = Adapted()
        self.optimizer = torch.optim.Adam(self.agent.adapter.parameters(), lr=1e-3)

    def components(self) -> dict[str, Any]:
        """The components every save holds."""
        return {"agent": self.agent, "optimizer": self.optimizer}

    def frozen_bytes(self) -> int:
        """Bytes of the weights that never change."""
        return _state_bytes(self.agent.base.state_dict())

    def step(self) -> None:
        """One training step of the adapter."""
        self.optimizer.zero_grad()
        self.agent.adapter(torch.randn(4, 1448)).pow(2).mean().backward()
        self.optimizer.step()


def trainable_bytes(trainer: Any) -> int:
    """Bytes of the state that changes from save to save (weights and optimizer state)."""
    full = sum(_state_bytes(c.state_dict()) for c in trainer.components().values())
    return full - trainer.frozen_bytes()


def goal_bytes(trainer: Any) -> float:
    """The issue's bound for K = 5 checkpoints + best: ``1.3 x (frozen + 6 x trainable) + 1 MB``."""
    return 1.3 * (trainer.frozen_bytes() + 6 * trainable_bytes(trainer)) + MB


def folder_bytes(folder: Path) -> int:
    """Every byte of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_case(run: Path, drive: Path, trainer: Any, saves: int = SAVES) -> dict[str, Any]:
    """Save ``trainer`` ``saves`` times (K = 5, best by a metric that peaks twice), backing the run up to ``drive`` after each.

    Each save is one session (open, save, close), then ``ckptctl backup``'s sync, which
    records in the run what it mirrored (so retention's removals reach the mirror). Returns
    the bytes on disk, on the mirror, and uploaded by each sync (its ``uploaded_bytes``).
    """
    from ckptctl.persistence import ModelPersistence
    from ckptctl.storage.restore import backup_run

    uploads = []
    drive.mkdir(parents=True, exist_ok=True)
    for step in range(saves):
        with ModelPersistence(run, max_checkpoints=KEEP, save_every_n_batches=1, best_metric="score") as p:
            trainer.step()
            metrics = {"score": float(step % 4)}
            p.maybe_save(0, step, metrics, global_step=step + 1, **trainer.components())
            p.update_best(0, step, metrics, **trainer.components())
        uploads.append(backup_run(run, drive).uploaded_bytes)
    return {"disk_bytes": folder_bytes(run), "mirror_bytes": folder_bytes(drive / run.name), "uploads": uploads}


def bench_dedup(work: Path, step: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Both cases; measurements named ``dedup_<case>_*`` (see :func:`ckptctl.bench._dedup_ratios`)."""
    out: dict[str, Any] = {}
    for case, make in (("frozen_component", FrozenComponent), ("frozen_base", FrozenBase)):
        step and step(f"dedup: {SAVES} saves, keep {KEEP} + best, {case.replace('_', ' ')}, mirrored after each")
        trainer = make()
        measured = run_case(work / "dedup" / case / "run", work / "dedup" / case / "drive", trainer)
        out[f"dedup_{case}_frozen_bytes"] = trainer.frozen_bytes()
        out[f"dedup_{case}_trainable_bytes"] = trainable_bytes(trainer)
        out[f"dedup_{case}_bound_bytes"] = int(goal_bytes(trainer))
        out[f"dedup_{case}_disk_bytes"] = measured["disk_bytes"]
        out[f"dedup_{case}_mirror_bytes"] = measured["mirror_bytes"]
        later = measured["uploads"][1:]  # the first sync uploads the frozen part; every later one what changed
        out[f"dedup_{case}_upload_per_save_bytes"] = max(later) if later else None
    return out
