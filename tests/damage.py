"""Ways a run's files get damaged (a crash mid-copy, a bad disk, a person, an attacker): one home for all tests.

:data:`DAMAGES` names every way, for the tests that try each file with each of them; the run
factory (``tests/runs.py``) applies :func:`truncate`, :func:`flip_byte` and :func:`delete`
through its ``truncate=`` / ``corrupt=`` / ``drop=`` options.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut ``path`` short, as a crash mid-copy would (``keep_fraction=0``: empty)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def flip_byte(path: Path, offset: int | None = None, mask: int = 0x01) -> None:
    """XOR the byte at ``offset`` (default: the middle) with ``mask`` (default: one bit): silent corruption, same size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= mask
    path.write_bytes(bytes(data))


def garbage(path: Path) -> None:
    """Replace ``path`` with random bytes of the same length (64 if it was empty)."""
    path.write_bytes(os.urandom(path.stat().st_size or 64))


def delete(path: Path) -> None:
    """Remove ``path``."""
    path.unlink()


def unreadable(path: Path) -> None:
    """Make ``path`` unreadable: mode 0, or, for root (who reads through permissions), a directory in its place.

    Undo the modes with :func:`restore_permissions` before the test's folder is removed.
    """
    path.chmod(0)
    if os.geteuid() == 0:
        path.chmod(0o644)
        path.unlink()
        path.mkdir()


def restore_permissions(root: Path) -> None:
    """Make everything under ``root`` readable and writable again (after :func:`unreadable`)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chmod(os.path.join(dirpath, name), 0o755)


def flip_header(path: Path) -> None:
    """Invert a byte near the start of ``path`` (where a zip or JSON header is)."""
    flip_byte(path, min(10, path.stat().st_size - 1), mask=0xFF)


def flip_data(path: Path) -> None:
    """Invert a byte 60% into ``path`` (in the tensor data of a checkpoint)."""
    flip_byte(path, int(path.stat().st_size * 0.6), mask=0xFF)


#: Every way of damaging one file, by name (the ids of the parametrized corruption tests).
DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncate_zero": lambda path: truncate(path, 0),
    "truncate_half": truncate,
    "flip_header": flip_header,
    "flip_data": flip_data,
    "flip_bit": flip_byte,
    "delete": delete,
    "garbage": garbage,
    "unreadable": unreadable,
}


def damage(path: Path, how: str) -> None:
    """Damage ``path`` the way :data:`DAMAGES` names ``how``."""
    DAMAGES[how](path)


def replace_indexed_file(run_dir: Path, checkpoint_id: int, data: bytes) -> None:
    """Put ``data`` in place of a checkpoint and fix the index's size and checksum to match it."""
    from .runs import checksum, ckpt, index_of, write_index

    path = ckpt(run_dir, checkpoint_id)
    path.write_bytes(data)
    index = index_of(run_dir)
    for entry in index["checkpoints"]:
        if entry["id"] == checkpoint_id:
            entry["size_bytes"] = len(data)
            entry["checksum"] = checksum(path)
    write_index(run_dir, index)


class _Evil:
    """Unpickling this with arbitrary code allowed creates a file (``open(marker, 'w')``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_bytes(marker: Path) -> bytes:
    """A torch.save file that would create ``marker`` if loaded without ``weights_only=True``."""
    import torch

    buf = io.BytesIO()
    torch.save({"epoch": 0, "batch": 0, "global_step": 1, "metrics": {}, "payload": _Evil(marker)}, buf)
    return buf.getvalue()

