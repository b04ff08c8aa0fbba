"""Runs under ``torch.distributed``: which rank this process is, the collectives of the API, and the per-rank parts of a checkpoint.

Every rank constructs :class:`~ckptctl.persistence.ModelPersistence` on the same run and
makes the same calls. Rank 0 is the run's one *writer*: it holds the lock, reads and
writes the files, mirrors and commits. The other ranks never touch the run folder (it
need not exist on their machine: per-node local disks); what they need travels over the
process group:

- :meth:`Ranks.on_writer` runs a piece of work on rank 0 and hands every rank its result,
  or raises rank 0's exception on every rank (the same type), so a failure never leaves
  a rank waiting in a collective;
- :meth:`Ranks.gather` brings each rank's own part (RNG states, data position) to rank 0.

Object collectives pickle their objects. They run over the default group when it has a
CPU backend (gloo, ``"cpu:gloo,cuda:nccl"``) and otherwise over a gloo group created once
(so a checkpoint's state never has to fit in GPU memory on its way to the other ranks).
Everything sent holds CPU tensors only: loads are read to CPU on rank 0 and moved to the
caller's device on each rank after the broadcast. The default timeout of the process
group applies: a rank waits for rank 0's verify or restore as long as that timeout allows.

Per-rank parts of a checkpoint saved under ``torch.distributed`` (top-level payload keys):
``"world_size"``; ``"rng_ranks"``: each rank's RNG states, in rank order (``"rng"`` stays
rank 0's, so single-process readers work); ``"extra_ranks"``: each rank's ``extra``
(``"extra"`` stays rank 0's, as the index records it). A payload without them was saved
by one process (world size 1).

A sharded (FSDP2/DCP) path builds on the same context: every rank writes its shards, the
writer gathers their sizes and checksums with :meth:`Ranks.gather` and commits with
:meth:`Ranks.on_writer`.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch

from ckptctl.errors import CkptctlError

log = logging.getLogger("ckptctl")

T = TypeVar("T")

#: The payload keys of the per-rank parts (reserved: no component may use these names).
WORLD_SIZE_KEY = "world_size"
RNG_RANKS_KEY = "rng_ranks"
EXTRA_RANKS_KEY = "extra_ranks"

#: ``(default group, gloo group)`` for object collectives when the default backend has no CPU side.
_CPU_GROUP: tuple[Any, Any] | None = None
#: ``(default group, gloo group)`` of sharded saves and loads (DCP), apart from training's collectives.
_SHARD_GROUP: tuple[Any, Any] | None = None


def _dist() -> Any:
    """``torch.distributed`` when it is available and initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _cpu_group(dist: Any) -> Any:
    """The group the object collectives use: None (the default group) when it has a CPU backend, else a gloo group made once."""
    global _CPU_GROUP
    if "gloo" in str(dist.get_backend()):
        return None
    world = dist.group.WORLD
    if _CPU_GROUP is None or _CPU_GROUP[0] is not world:
        _CPU_GROUP = (world, dist.new_group(backend="gloo"))  # collective: every rank constructs ModelPersistence
    return _CPU_GROUP[1]


def _shard_group(dist: Any) -> Any:
    """A gloo group of every rank, made once, for DCP: its collectives run on the background workers
    while training's own collectives use the default group, so they must never share one."""
    global _SHARD_GROUP
    world = dist.group.WORLD
    if _SHARD_GROUP is None or _SHARD_GROUP[0] is not world:
        _SHARD_GROUP = (world, dist.new_group(backend="gloo"))  # collective: every rank constructs ModelPersistence
    return _SHARD_GROUP[1]


@dataclass(frozen=True)
class Outcome:
    """One rank's result of a piece of work: its value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None

    def get(self) -> Any:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value


def run_caught(work: Callable[[], T]) -> Outcome:
    """``work()`` as an :class:`Outcome` (an :class:`Exception` is caught, not raised)."""
    try:
        return Outcome(value=work())
    except Exception as exc:  # every failure must reach the other ranks
        return Outcome(error=exc)


def _sendable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling as its own type, else a :class:`CkptctlError` naming it."""
    try:
        if type(pickle.loads(pickle.dumps(exc))) is type(exc):
            return exc
    except Exception:
        pass
    return CkptctlError(f"{type(exc).__name__}: {exc}")


def _sendable(outcome: Outcome) -> Outcome:
    """``outcome`` in a form every rank can unpickle; a result that does not pickle becomes an error saying why.

    A collective must never fail on one rank only: an error is checked both ways (some
    exception types pickle but cannot be rebuilt), a result only for pickling (a payload is
    not unpickled twice).
    """
    if outcome.error is not None:
        return Outcome(error=_sendable_error(outcome.error))
    try:
        pickle.dumps(outcome)
        return outcome
    except Exception as exc:
        return Outcome(error=CkptctlError(f"cannot send the result to the other ranks: {type(exc).__name__}: {exc}"))


def _from_rank(exc: BaseException, rank: int) -> BaseException:
    """``exc`` as raised on another rank, with a note saying which (Python 3.11+)."""
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(f"(raised on rank {rank}, the run's writer)")
    return exc


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: its rank, the world size, and whether calls are collective.

    ``distributed`` is False for one process on its own (``torch.distributed`` not
    initialised, or ``ModelPersistence(..., distributed=False)``): then every method below
    is a plain local call.
    """

    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @classmethod
    def detect(cls, distributed: bool | None = None) -> "Ranks":
        """This process's ranks: collective when ``torch.distributed`` is initialised (unless ``distributed=False``)."""
        dist = _dist()
        if distributed is False or dist is None:
            if distributed:
                raise CkptctlError("distributed=True needs torch.distributed initialised first (init_process_group)")
            return cls()
        _cpu_group(dist)
        _shard_group(dist)
        return cls(dist.get_rank(), dist.get_world_size(), True)

    @property
    def shard_group(self) -> Any:
        """The gloo group sharded saves and loads run over (DCP's collectives, on each rank's background worker)."""
        return _shard_group(_dist()) if self.distributed else None

    @property
    def is_writer(self) -> bool:
        """True on rank 0, the run's one writer."""
        return self.rank == 0

    def on_writer(self, work: Callable[[], T]) -> T:
        """Collective: ``work()`` runs on rank 0 only; every rank returns its result or raises its exception."""
        if not self.distributed:
            return work()
        mine = run_caught(work) if self.is_writer else None
        sent = _sendable(mine) if mine is not None else None
        received = self._broadcast(sent)
        if mine is not None:  # rank 0 raises its own exception (its type and traceback), or why its result could not be sent
            return (sent if mine.error is None else mine).get()
        if received.error is not None:
            raise _from_rank(received.error, 0)
        return received.value

    def broadcast(self, value: T) -> T:
        """Collective: rank 0's ``value`` on every rank."""
        return value if not self.distributed else self._broadcast(value if self.is_writer else None)

    def _broadcast(self, obj: Any) -> Any:
        dist = _dist()
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=_cpu_group(dist), device=torch.device("cpu"))
        return box[0]

    def gather(self, work: Callable[[], T]) -> list[Outcome] | None:
        """Collective: every rank runs ``work()``; rank 0 gets each rank's :class:`Outcome` in rank order, the others None.

        A rank whose work fails sends its exception; rank 0 raises it from the writer work
        that follows (:meth:`on_writer`), so every rank sees it. Not distributed: None.
        """
        if not self.distributed:
            return None
        mine = _sendable(run_caught(work))
        dist = _dist()
        out: list[Any] | None = [None] * self.world_size if self.is_writer else None
        dist.gather_object(mine, out, dst=0, group=_cpu_group(dist))
        return out

    def barrier(self) -> None:
        """Collective: wait until every rank got here (nothing when not distributed)."""
        self.on_writer(lambda: None)


# ---------------------------------------------------------------------- the per-rank parts of a checkpoint


def rank_sections(gathered: list[Outcome], world_size: int) -> dict[str, Any]:
    """The per-rank payload keys from each rank's ``(rng, extra)``; raises the first rank's failure."""
    parts = [outcome.get() for outcome in gathered]
    return {
        WORLD_SIZE_KEY: int(world_size),
        RNG_RANKS_KEY: [rng for rng, _ in parts],
        EXTRA_RANKS_KEY: [dict(extra) for _, extra in parts],
    }


@dataclass(frozen=True)
class RankView:
    """What one rank restores from a checkpoint: its RNG states, its ``extra``, and whether the world size changed."""

    rng: Any
    extra: dict[str, Any]
    saved_world_size: int

    def world_size_changed(self, now: int) -> dict[str, int] | None:
        """``{"saved": n, "now": m}`` when the checkpoint was saved by another number of ranks, else None."""
        return None if self.saved_world_size == now else {"saved": self.saved_world_size, "now": int(now)}


def rank_view(payload: Mapping[str, Any], rank: int) -> RankView:
    """Rank ``rank``'s own RNG states and ``extra`` in ``payload``: its per-rank entry when there is one, else rank 0's."""
    saved = payload.get(WORLD_SIZE_KEY, 1)
    saved = saved if isinstance(saved, int) and saved >= 1 else 1
    rng_ranks = payload.get(RNG_RANKS_KEY)
    extra_ranks = payload.get(EXTRA_RANKS_KEY)
    rng = rng_ranks[rank] if isinstance(rng_ranks, list) and rank < len(rng_ranks) else payload.get("rng")
    if isinstance(extra_ranks, list) and rank < len(extra_ranks) and isinstance(extra_ranks[rank], Mapping):
        extra = dict(extra_ranks[rank])
    else:
        extra = dict(payload.get("extra") or {})
    return RankView(rng, extra, saved)


def warn_world_size_changed(run_dir: Any, checkpoint_id: Any, changed: Mapping[str, int]) -> None:
    """The one warning of a resume onto another world size (logged by the writer)."""
    log.warning(
        "%s: checkpoint %s was saved by %d rank(s), resuming with %d: per-rank RNG streams and data positions cannot "
        "carry over exactly (rank r restores rank r's saved states and extra where they exist, else rank 0's, so such "
        "ranks draw the same random numbers as rank 0: reseed them if their streams must differ)",
        run_dir,
        checkpoint_id,
        changed["saved"],
        changed["now"],
    )


def components_to_device(payload: Mapping[str, Any], names: Any, device: Any) -> Mapping[str, Any]:
    """``payload`` with the tensors of the components ``names`` on ``device`` (RNG states stay on the CPU)."""
    from ckptctl.tensors import map_nested

    target = torch.device(device)
    if target.type == "cpu":
        return payload
    move = lambda v, _k: (True, v.to(target)) if isinstance(v, torch.Tensor) else (False, None)  # noqa: E731
    return {**payload, **{name: map_nested(payload[name], move) for name in names if name in payload}}
