"""The one run factory of the test suite: small real runs written through ModelPersistence.

Tests take the ``make_run`` fixture (``tests/conftest.py``), which calls :func:`write_run`
with a default folder and adds the run lock; module-scoped fixtures and child processes call
:func:`write_run` directly. Ways to damage a run's files are in ``tests/damage.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Union

from . import damage

#: A file of a run: a checkpoint id, or a path relative to the run directory (``"best_model.pt"``).
Target = Union[int, str]


class TinyModel:
    """A ``Linear(*shape)`` and its optimizer, trained on random inputs from torch's global RNG.

    ``optimizer`` is ``"adam"``, ``"sgd"`` or None; with None only the model is a component
    and each step still moves its weights (so every checkpoint holds different tensors).
    ``frozen=N`` adds a frozen component ``encoder`` (a ``Linear(N, N)`` that never changes:
    every checkpoint shares its tensors).
    """

    def __init__(self, shape: tuple[int, int] = (4, 2), optimizer: str | None = "adam", frozen: int = 0):
        import torch

        self.agent = torch.nn.Linear(*shape)
        self.encoder = torch.nn.Linear(frozen, frozen).requires_grad_(False) if frozen else None
        self.optimizer = {
            "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
            "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
            None: lambda params: None,
        }[optimizer](self.agent.parameters())

    def components(self) -> dict:
        """The components a checkpoint of this model holds (the keyword arguments of save and resume)."""
        components = {"agent": self.agent} if self.optimizer is None else {"agent": self.agent, "optimizer": self.optimizer}
        return components if self.encoder is None else {**components, "encoder": self.encoder}

    def step(self) -> float:
        """One training step on a batch of 3 random inputs; return its loss."""
        import torch

        loss = self.agent(torch.randn(3, self.agent.in_features)).pow(2).mean()
        if self.optimizer is None:
            with torch.no_grad():
                for param in self.agent.parameters():
                    param.add_(0.01)
            return loss.item()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()


def write_run(
    parent: Path,
    name: str = "run_a",
    n: int = 4,
    keep: int = 10,
    best_at: int | None = None,
    seed: int = 0,
    drive: Path | None = None,
    batches_per_epoch: int = 100,
    *,
    best: bool = True,
    shape: tuple[int, int] = (4, 2),
    optimizer: str | None = "adam",
    frozen: int = 0,
    trainer=None,
    state: dict | None = None,
    log: str | None = None,
    truncate: Iterable[Target] = (),
    corrupt: Iterable[Target] = (),
    drop: Iterable[Target] = (),
) -> Path:
    """Write (or, if it exists, continue) a real run of ``n`` more checkpoints, one per batch; return its directory.

    The model is a :class:`TinyModel` (``shape``, ``optimizer``; torch seeded with ``seed``
    first), or ``trainer`` (anything with ``step()`` and ``components()``; the caller keeps
    its state). An existing run is resumed first, so ids and global steps go on from it.
    Metric ``accuracy_delta`` peaks at global step ``best_at`` (default: the last), so the
    best model's source is that checkpoint while it is retained; ``best=False`` writes no
    best model. ``drive`` mirrors the run to ``drive/<name>`` as it trains. ``state`` is
    passed to ``update_training_state`` and ``log`` appended to the run's log.

    Then the files named in ``truncate`` (cut in half), ``corrupt`` (one bit flipped, same
    size) and ``drop`` (deleted) are damaged, after the writer closed.
    """
    import torch

    from ckptctl import ModelPersistence

    run_dir = parent / name
    if trainer is None:
        torch.manual_seed(seed)
        trainer = TinyModel(shape, optimizer, frozen)
    p = ModelPersistence(run_dir, max_checkpoints=keep, save_every_n_batches=1, background=False, drive_backup=drive)
    try:
        if state is not None:
            p.update_training_state(**state)
        if log is not None:
            p.append_log(log)
        info = p.resume(**trainer.components())
        start = 0 if info is None else info["global_step"]
        for step in range(start, start + n):
            loss = trainer.step()
            acc = float(step if best_at is None else -abs(step - best_at))
            metrics = {"loss": float(loss[0] if isinstance(loss, tuple) else loss), "accuracy_delta": acc}
            epoch, batch = divmod(step, batches_per_epoch)
            p.maybe_save(epoch, batch, metrics, **trainer.components())
            if best:
                p.update_best(epoch, batch, metrics, **trainer.components())
    finally:
        p.close(mirror_timeout=30)
    _damage_files(run_dir, truncate=truncate, corrupt=corrupt, drop=drop)
    return run_dir


def _damage_files(run_dir: Path, **targets: Iterable[Target]) -> None:
    how = {"truncate": damage.truncate, "corrupt": damage.flip_byte, "drop": damage.delete}
    for option, files in targets.items():
        for target in files:
            how[option](run_file(run_dir, target))


def run_file(run_dir: Path, target: Target) -> Path:
    """The file ``target`` names: checkpoint ``target`` if it is an id, else ``run_dir / target``."""
    return ckpt(run_dir, target) if isinstance(target, int) else run_dir / target


def ckpt(run_dir: Path, checkpoint_id: int) -> Path:
    """The file of checkpoint ``checkpoint_id``."""
    return run_dir / "checkpoints" / f"checkpoint_{checkpoint_id:05d}.pt"


def index_of(run_dir: Path) -> dict:
    """The run's index as raw JSON."""
    return json.loads((run_dir / "checkpoint_metadata.json").read_text())


def write_index(run_dir: Path, data: dict) -> None:
    """Overwrite the run's index with ``data``."""
    (run_dir / "checkpoint_metadata.json").write_text(json.dumps(data, indent=2))


def checksum(path: Path) -> str:
    """The stored-form checksum of ``path``, as the library writes it."""
    from ckptctl.storage.atomic import hash_file

    return hash_file(path)[1]


def fresh_components(shape: tuple[int, int] = (4, 2), optimizer: str | None = "adam", frozen: int = 0) -> dict:
    """New components of the shape :func:`write_run` saves by default, to resume or load a run into."""
    return TinyModel(shape, optimizer, frozen).components()
