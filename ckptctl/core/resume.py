"""Which checkpoint a resume uses: the one rule, shared by every reader that must agree with it.

The newest checkpoint (by id, never by file time) whose check passes; the newer ones whose
check failed are reported, newest first. ``ModelPersistence.resume`` and
``get_resume_info``, ``ckptctl resume-info``, and ``prune``'s "never delete what resume
would use" all walk the candidates through :func:`choose_resume_checkpoint`; they differ
only in the check they pass (checksum, or checksum plus a safe trial load).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Iterable, TypeVar

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
