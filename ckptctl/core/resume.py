"""Which checkpoint a resume uses: the one rule, shared by every reader that must agree with it.

The newest checkpoint (by id, never by file time) whose check passes; the newer ones whose
check failed are reported, newest first. ``ModelPersistence.resume`` and
``get_resume_info``, ``ckptctl resume-info``, and ``prune``'s "never delete what resume
would use" all walk the candidates through :func:`choose_resume_checkpoint`; they differ
only in the check they pass (checksum, or checksum plus a safe trial load).

Where training continues after the chosen checkpoint (:func:`next_position`) and how to
resume a run (:func:`resume_command`) are decided here too, from the checkpoint's
``extra`` and the run's ``training_state.json``, already read.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

from ckptctl.errors import CheckpointIntegrityError, UnsafePathError

T = TypeVar("T")

#: What a failed check raises: the checkpoint is skipped, never the walk stopped.
CHECK_FAILURES: tuple[type[Exception], ...] = (CheckpointIntegrityError, UnsafePathError)


@dataclass(frozen=True)
class ResumeChoice(Generic[T]):
    """The checkpoint a resume uses (``chosen_id`` None: none passed), what its check returned, and the newer ones skipped."""

    chosen_id: int | None
    result: T | None
    skipped: tuple[tuple[int, Exception], ...]


def choose_resume_checkpoint(ids: Iterable[int], check: Callable[[int], T]) -> ResumeChoice[T]:
    """Walk ``ids`` newest first; the first whose ``check(id)`` returns (does not raise a :data:`CHECK_FAILURES`) is chosen."""
    skipped: list[tuple[int, Exception]] = []
    for checkpoint_id in sorted(set(ids), reverse=True):
        try:
            result = check(checkpoint_id)
        except CHECK_FAILURES as exc:
            skipped.append((checkpoint_id, exc))
            continue
        return ResumeChoice(checkpoint_id, result, tuple(skipped))
    return ResumeChoice(None, None, tuple(skipped))


# --------------------------------------------------------------------------- where training continues

#: The key of a checkpoint's ``extra`` where the trainloop records the next batch's position.
DATA_POSITION_KEY = "data_position"


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def epoch_length(extra: Mapping[str, Any] | None, training_state: Mapping[str, Any] | None) -> int | None:
    """Batches per epoch when the checkpoint or the run recorded it, else None.

    The first found of: the checkpoint's ``extra["batches_per_epoch"]``; in
    ``training_state.json``, ``config.batches_per_epoch`` (the trainloop's), a top-level
    ``batches_per_epoch`` (``update_training_state(batches_per_epoch=N)`` from a training
    loop of one's own) or ``total_batches`` (the Colab guide's name for it).
    """
    state = training_state if isinstance(training_state, Mapping) else {}
    config = state.get("config") if isinstance(state.get("config"), Mapping) else {}
    for value in ((extra or {}).get("batches_per_epoch"), config.get("batches_per_epoch"), state.get("batches_per_epoch"), state.get("total_batches")):
        if _count(value):
            return value
    return None


@dataclass(frozen=True)
class NextPosition:
    """Where training continues after a checkpoint: the next batch to train, and the epoch length if known."""

    epoch: int
    batch: int
    batches_per_epoch: int | None


def next_position(
    epoch: Any, batch: Any, extra: Mapping[str, Any] | None = None, training_state: Mapping[str, Any] | None = None
) -> NextPosition | None:
    """The batch after a checkpoint at ``(epoch, batch)`` (0-based, the last batch it includes); None if they are not counts.

    The trainloop's recorded data position (``extra["data_position"]``) when there is one;
    else, with a known epoch length (:func:`epoch_length`), the next batch of the epoch
    or, after its last batch, the first batch of the next epoch; else ``batch + 1`` of the
    same epoch (the epoch's length is unknown).
    """
    if not (isinstance(epoch, int) and isinstance(batch, int)) or isinstance(epoch, bool) or isinstance(batch, bool):
        return None
    per_epoch = epoch_length(extra, training_state)
    recorded = (extra or {}).get(DATA_POSITION_KEY)
    if isinstance(recorded, Mapping) and isinstance(recorded.get("next_epoch"), int) and isinstance(recorded.get("next_batch"), int):
        return NextPosition(recorded["next_epoch"], recorded["next_batch"], per_epoch)
    if per_epoch is not None and batch + 1 >= per_epoch:
        return NextPosition(epoch + 1, 0, per_epoch)
    return NextPosition(epoch, batch + 1, per_epoch)


# --------------------------------------------------------------------------- how to resume a run

#: ``training_state.json``'s ``written_by`` in runs the trainloop (``python -m ckptctl.trainloop``) writes.
TRAINLOOP_WRITER = "ckptctl.trainloop"
#: Config keys only the trainloop records (how runs it wrote before ``written_by`` existed are told apart).
_TRAINLOOP_CONFIG_KEYS = ("dataset_sha256", "batches_per_epoch", "save_every", "max_pairs")


def written_by_trainloop(training_state: Mapping[str, Any] | None) -> bool:
    """True when ``training_state.json`` says the trainloop wrote the run.

    Its ``written_by`` (the trainloop records it), or, for runs it wrote before it did, the
    trainloop's own config keys (``dataset_sha256``, ``batches_per_epoch``, ...).
    """
    if not isinstance(training_state, Mapping):
        return False
    if training_state.get("written_by") == TRAINLOOP_WRITER:
        return True
    config = training_state.get("config")
    return isinstance(config, Mapping) and all(key in config for key in _TRAINLOOP_CONFIG_KEYS)


def resume_command(run_dir: str | os.PathLike, training_state: Mapping[str, Any] | None) -> str:
    """How to continue the run at ``run_dir``: the trainloop's command for a run it wrote, else the library call."""
    path = PurePath(run_dir)
    if written_by_trainloop(training_state):
        return f"python -m ckptctl.trainloop --resume --output-dir {shlex.quote(str(path.parent))} --run-name {shlex.quote(path.name)}"
    return f"ModelPersistence({_python_str(str(path))}, ...).resume(...)"


def _python_str(text: str) -> str:
    """``text`` as a double-quoted Python string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
