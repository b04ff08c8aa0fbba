"""The paired trainloop under torchrun (``--parallel ddp|fsdp``): the process group, the wrapped modules, what the ranks agree on.

``torchrun --nproc_per_node N -m ckptctl.trainloop --parallel ddp ...`` starts N processes
with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. :func:`start_world` checks them against
``--parallel`` and initialises the process group: gloo on the CPU; nccl with ``--device cuda``,
after ``torch.cuda.set_device(LOCAL_RANK)``. ``--parallel`` without torchrun, or torchrun with
several processes and no ``--parallel``, is a usage error (:class:`LaunchError`, exit 2).
Without either, :class:`World` is one process and each of its methods is a plain local call.

- ``ddp``: each trained module (agent, critic, loss) is wrapped in DistributedDataParallel for
  the training step; the components saved are the plain modules, under their usual names.
- ``fsdp``: FSDP2 ``fully_shard`` on each layer of a trained module (each submodule holding
  parameters), then on the module itself. Their state dicts (and the optimizer's) hold
  DTensors, which ModelPersistence saves sharded. FSDP2 refuses 0-dim parameters: such a
  parameter becomes a one-element vector first (the agent's ``copy_gain`` has shape ``(1,)``),
  so an fsdp run resumes under ``--parallel fsdp`` only (the trainloop refuses the others).
- The frozen encoder is never wrapped: every rank builds the same copy from the seed.

Every rank builds the model from ``--seed`` (the same initial weights on every rank) and seeds
its RNG streams (dropout, Python, NumPy) from ``--seed + rank``; it trains on its own part of
each batch (:func:`ckptctl.train_data.rank_part`) and saves its own data position, so a
resumed run of the same world size repeats an uninterrupted one bit for bit (CPU). Every rank
constructs ModelPersistence and makes the same calls (rank 0 writes). Only rank 0 prints.
After every batch the ranks agree on the metrics to log (their mean over the ranks) and on
whether a signal asked to stop, so that they save and stop after the same batch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import nn

from ckptctl.errors import CkptctlError

T = TypeVar("T")

#: The values of ``--parallel``.
PARALLEL_MODES = ("ddp", "fsdp")

#: What torchrun sets in every process it starts (the env:// rendezvous needs all of them).
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: The note :meth:`ckptctl.api.distributed.Ranks.on_writer` adds to rank 0's exceptions on the other ranks.
_WRITER_NOTE = "(raised on rank 0,"


class LaunchError(CkptctlError):
    """``--parallel`` and the torchrun environment do not fit together: a usage error (exit 2)."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: the parallel mode (None: one process), its rank, the world size, its local rank."""

    mode: str | None = None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0 (and for one process): the rank that prints."""
        return self.rank == 0

    def wrap(self) -> Callable[[nn.Module], nn.Module] | None:
        """How each trained module is wrapped for the mode (see the module docstring); None for one process."""
        return {"ddp": _ddp, "fsdp": _fully_shard}.get(self.mode or "")

    def seed(self, seed: int) -> int:
        """The seed of this rank's RNG streams: ``seed + rank`` (``seed`` for one process)."""
        return int(seed) + self.rank

    def config(self) -> dict[str, Any]:
        """What training_state.json's config records about the ranks (nothing for one process)."""
        return {} if self.mode is None else {"parallel": self.mode, "world_size": self.world_size}

    def on_main(self, work: Callable[[], T]) -> T:
        """Collective: ``work()`` on rank 0 only; every rank returns its result or raises its exception."""
        if self.mode is None:
            return work()
        from ckptctl.api.distributed import Ranks

        return Ranks.detect().on_writer(work)

    def mean_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Collective: each metric's mean over the ranks (summed in rank order, the same on every rank); one process's as they are."""
        if self.mode is None:
            return dict(metrics)
        every = self._all_gather(dict(metrics))
        return {key: sum(m[key] for m in every) / len(every) for key in metrics}

    def agreed_signal(self, signum: int | None) -> int | None:
        """Collective: the first signal any rank was asked to stop by (in rank order), or None."""
        return next((s for s in self._all_gather(signum) if s is not None), None)

    def first_problems(self, problems: list[str]) -> list[str]:
        """Collective: the first rank's non-empty ``problems`` (in rank order), so every rank refuses together."""
        return next((p for p in self._all_gather(list(problems)) if p), [])

    def _all_gather(self, value: T) -> list[T]:
        if self.mode is None:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def torchrun_env(environ: Mapping[str, str]) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables, or None when none of them is set.

    Raises :class:`LaunchError` when only some are set, or their values do not fit together.
    """
    present = [name for name in TORCHRUN_ENV[:3] if name in environ]
    if not present:
        return None
    missing = [name for name in TORCHRUN_ENV if name not in environ]
    if missing:
        raise LaunchError(f"torchrun's environment is incomplete ({', '.join(missing)} not set): start the trainloop with torchrun")
    try:
        rank, world_size, local_rank = (int(environ[name]) for name in TORCHRUN_ENV[:3])
    except ValueError:
        raise LaunchError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (as torchrun sets them)") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise LaunchError(f"RANK={rank} does not fit WORLD_SIZE={world_size} (LOCAL_RANK={local_rank}): start the trainloop with torchrun")
    return rank, world_size, local_rank


def check_launch(mode: str | None, environ: Mapping[str, str]) -> tuple[int, int, int] | None:
    """The torchrun ranks ``mode`` runs on, or None for one process; :class:`LaunchError` when they do not fit.

    ``--parallel`` needs torchrun's processes; torchrun with several processes needs
    ``--parallel`` (each would otherwise train a run of its own, on the same folder). A
    torchrun job of one process without ``--parallel`` is one process, as without torchrun.
    """
    ranks = torchrun_env(environ)
    if mode is None:
        if ranks is not None and ranks[1] > 1:
            raise LaunchError(
                f"torchrun started {ranks[1]} processes but --parallel is not given: add --parallel ddp or "
                "--parallel fsdp (one process needs neither)"
            )
        return None
    if ranks is None:
        raise LaunchError(
            f"--parallel {mode} needs the processes torchrun starts (RANK, WORLD_SIZE, LOCAL_RANK are not set): "
            f"torchrun --nproc_per_node N -m ckptctl.trainloop --parallel {mode} ..."
        )
    return ranks


def start_world(mode: str | None, device: torch.device, environ: Mapping[str, str] | None = None) -> World:
    """Check the launch (:func:`check_launch`) and, under torchrun with ``--parallel``, initialise the process group.

    gloo on the CPU; nccl on CUDA, after ``torch.cuda.set_device(LOCAL_RANK)``.
    """
    ranks = check_launch(mode, os.environ if environ is None else environ)
    if ranks is None:
        return World()
    import torch.distributed as dist

    rank, world_size, local_rank = ranks
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(mode, dist.get_rank(), dist.get_world_size(), local_rank)


def leave_process_group() -> None:
    """Tear down the process group :func:`start_world` initialised (nothing when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """False only on a rank other than 0 of an initialised process group: the ranks that do not print."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def error_prefix(exc: BaseException) -> str | None:
    """How this process prints the error line of ``exc``: as it is (``""``) on rank 0 or alone;
    ``"rank N: "`` first for an error of rank N's own; None (not at all) for rank 0's error
    raised on every rank, which rank 0 prints."""
    import torch.distributed as dist

    if is_main_process():
        return ""
    if any(_WRITER_NOTE in note for note in getattr(exc, "__notes__", ())):
        return None
    return f"rank {dist.get_rank()}: "


# ---------------------------------------------------------------------- wrapping the trained modules


def _ddp(module: nn.Module) -> nn.Module:
    """``module`` in DistributedDataParallel (which broadcasts rank 0's weights); the component stays ``module``."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module)


def _fully_shard(module: nn.Module) -> nn.Module:
    """FSDP2: shard each layer of ``module`` (a submodule holding parameters), then ``module`` itself, in place."""
    from torch.distributed.fsdp import fully_shard

    # train_model's critic returns a view (squeeze); nothing modifies it in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    _no_scalar_parameters(module)
    for layer in list(module.modules()):
        if layer is not module and next(layer.parameters(recurse=False), None) is not None:
            fully_shard(layer)
    fully_shard(module)
    return module


def _no_scalar_parameters(module: nn.Module) -> None:
    """Make every 0-dim parameter of ``module`` a one-element vector (FSDP2 shards along dimension 0)."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.ndim == 0:
                setattr(sub, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
