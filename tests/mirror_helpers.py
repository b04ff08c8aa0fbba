"""Mirror test helpers shared by the mirror test files."""

from __future__ import annotations

from ckptctl.storage.atomic import verify_checksum
from ckptctl.storage.mirror import SyncReport, apply_sync_report, sync_run
from ckptctl.storage.runfiles import commit_index
from ckptctl.storage.scan import read_index


def sync_and_record(local, mirror, **kwargs) -> SyncReport:
    """sync_run, then record the report in the local index (as the mirror's owner does)."""
    report = sync_run(local, mirror, **kwargs)
    commit_index(local, apply_sync_report(read_index(local), report))
    return report


def assert_mirror_index_verifies(mirror) -> None:
    """Every checkpoint the mirror's index lists is there with its checksum."""
    for entry in read_index(mirror).checkpoints:
        verify_checksum(mirror / entry.path, entry.checksum)
