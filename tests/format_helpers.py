"""Runs in both on-disk formats for the CLI tests, and format 2's bytes counted from the files themselves.

``write_run`` (tests/runs.py) writes format 2: checkpoint files are skeletons and the
tensors live in packs under ``objects/``. :func:`to_format1` turns such a run into the
format every run had before (each checkpoint file holds its whole payload, no
``objects/``), as the library of that time wrote it. The byte helpers read the files and
the raw JSON, never the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

from .runs import ckpt, index_of, write_index


def stored_packs(run: Path) -> dict[str, int]:
    """The pack files in ``run/objects``: name -> size."""
    folder = run / "objects"
    return {p.name[: -len(".safetensors")]: p.stat().st_size for p in folder.glob("*.safetensors")} if folder.is_dir() else {}


def disk_bytes(run: Path) -> int:
    """Every checkpoint file, ``best_model.pt`` and every pack of ``run``, each once: the run's unique bytes on disk."""
    files = list((run / "checkpoints").glob("checkpoint_*.pt")) + [run / "best_model.pt"]
    return sum(p.stat().st_size for p in files if p.is_file()) + sum(stored_packs(run).values())


def packs_of(run: Path, ids: Iterable[int], best: bool = False) -> set[str]:
    """The packs the index entries ``ids`` (and the best model's record, with ``best``) list."""
    ids = set(ids)
    names = {n for e in index_of(run)["checkpoints"] if e["id"] in ids for n in e.get("objects", {})}
    if best:
        names |= set(json.loads((run / "best_metadata.json").read_text()).get("objects", {}))
    return names


def to_format1(run: Path) -> Path:
    """Rewrite ``run`` in format 1: every checkpoint and the best model a full file, records without packs, no ``objects/``."""
    from ckptctl.storage.atomic import hash_file

    index = index_of(run)
    for entry in index["checkpoints"]:
        _full_file(ckpt(run, entry["id"]))
        entry["size_bytes"], entry["checksum"] = hash_file(ckpt(run, entry["id"]))
        entry.pop("objects", None), entry.pop("state_bytes", None)
    index["format_version"] = 1
    best_meta = run / "best_metadata.json"
    if best_meta.exists():
        best = json.loads(best_meta.read_text())
        _full_file(run / "best_model.pt")
        best["size_bytes"], best["checksum"] = hash_file(run / "best_model.pt")
        best.pop("objects", None), best.pop("state_bytes", None)
        best["format_version"] = 1
        best_meta.write_text(json.dumps(best, indent=2))
    write_index(run, index)
    shutil.rmtree(run / "objects", ignore_errors=True)
    return run


def _full_file(path: Path) -> None:
    """Replace a skeleton by its whole payload (``format_version`` 1), saved as format 1 saved it."""
    import torch

    from ckptctl.tensors import map_nested
    from ckptctl.torch_io import safe_load, write_checkpoint_file

    payload = map_nested(safe_load(path), lambda v, _: (True, v.clone()) if isinstance(v, torch.Tensor) else (False, None))
    payload["format_version"] = 1
    write_checkpoint_file(path, payload)
