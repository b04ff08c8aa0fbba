"""``ckptctl export``: one checkpoint as a standalone file, whatever the run's on-disk format.

Since format 2 a checkpoint file is a skeleton whose tensors live in the run's shared
packs (``objects/``). An export holds the full payload in one file, loadable anywhere
with ``torch.load(OUT, map_location="cpu", weights_only=True)``: ``format_version``,
``epoch``/``batch``/``global_step``, ``metrics``, ``rng`` and one entry per component, and
no reference to a pack. ``--safetensors`` writes the model weights only, as a safetensors
file. The checkpoint is verified first (checksum, its packs, a safe load); the file is
written crash-safely (a temporary name, fsync, rename), so ``OUT`` is either the old file
or the whole new one. The tensors are read memory-mapped; a tensor that is a view of a
larger storage is copied out first (so no more than its own bytes are written), and
``--safetensors`` copies the weights into memory once (safetensors' writer needs bytes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from ckptctl.core.format import BEST_MODEL_FILE, CHECKPOINT_DIR, RESERVED_CHECKPOINT_KEYS
from ckptctl.core.objects import OBJECTS_DIR
from ckptctl.errors import CkptctlError, NotFoundError
from ckptctl.storage.atomic import atomic_write_by_name
from ckptctl.storage.objects import PackChecks
from ckptctl.storage.scan import is_run_dir
from ckptctl.storage.select import CheckpointRef
from ckptctl.tensors import map_nested
from ckptctl.torch_io import verify_file, write_checkpoint_file


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` wrote: from which checkpoint, where, in which format, and which components."""

    source: str
    label: str
    out: str
    format: str  # "torch" or "safetensors"
    size_bytes: int
    checksum: str
    tensors: int
    components: tuple[str, ...]
    #: ``--safetensors``: components left out (not a flat name -> tensor state dict, e.g. an optimizer).
    left_out: tuple[str, ...] = ()

    ok: ClassVar[bool] = True  # a refusal raises instead

    def to_json(self) -> dict[str, Any]:
        """The ``export --json`` document."""
        return {
            "source": self.source,
            "label": self.label,
            "out": self.out,
            "format": self.format,
            "size_bytes": self.size_bytes,
            "checksum": self.checksum,
            "tensors": self.tensors,
            "components": list(self.components),
            "left_out": list(self.left_out),
        }


def check_destination(out: str | os.PathLike, ref: CheckpointRef, *, force: bool = False) -> Path:
    """``out`` if ``export`` may write it; raise otherwise (nothing written).

    NotFoundError (a usage error) when its folder does not exist; CkptctlError when it
    exists and ``force`` is not given, is a directory, or is a file of a run (its
    ``checkpoints/``, ``objects/`` or ``best_model.pt``: an export never replaces them).
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise NotFoundError(f"{out.parent}: no such directory (the folder of {out.name} must exist)")
    if out.is_dir():
        raise CkptctlError(f"{out}: is a directory; give the file to write")
    resolved = out.resolve()
    in_run = resolved.parent.name in (CHECKPOINT_DIR, OBJECTS_DIR) and is_run_dir(resolved.parent.parent)
    if resolved == ref.path.resolve() or in_run or (resolved.name == BEST_MODEL_FILE and is_run_dir(resolved.parent)):
        raise CkptctlError(f"{out}: is a file of a run; export writes a file outside runs' checkpoint folders")
    if os.path.lexists(out) and not force:
        raise CkptctlError(f"{out}: already exists; pass --force to overwrite it")
    return out


def export_checkpoint(ref: CheckpointRef, out: str | os.PathLike, *, safetensors: bool = False, force: bool = False) -> ExportReport:
    """Write checkpoint ``ref`` to ``out`` as one standalone file (see the module docstring); return what was written.

    The checkpoint must verify first (else CheckpointIntegrityError, nothing written).
    ``safetensors``: only the components whose state is a flat name -> tensor mapping (model
    weights), keys ``<component>.<name>``; CkptctlError when there is none.
    """
    out = check_destination(out, ref, force=force)
    payload = verify_file(ref.path, ref.checksum, checks=PackChecks())
    components = component_names(payload)
    if safetensors:
        weights, kept = model_weights(payload, components)
        size, checksum = _write_safetensors(out, weights, payload)
        left_out = tuple(name for name in components if name not in kept)
        return ExportReport(str(ref.path), ref.label, str(out), "safetensors", size, checksum, len(weights), kept, left_out)
    standalone = standalone_payload(payload)
    size, checksum = write_checkpoint_file(out, standalone)
    tensors = sum(1 for name in components for _ in _tensors_of(standalone[name]))
    return ExportReport(str(ref.path), ref.label, str(out), "torch", size, checksum, tensors, tuple(components))


def component_names(payload: Mapping[str, Any]) -> list[str]:
    """The components of a loaded checkpoint: those it lists, then any other non-reserved key (files other code wrote)."""
    names = [n for n in payload.get("components") or [] if isinstance(n, str) and n in payload]
    return names + [n for n in payload if isinstance(n, str) and n not in RESERVED_CHECKPOINT_KEYS and n not in names]


def standalone_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` with every tensor in storage of its own size (a view of a memory-mapped pack is copied out)."""
    full = map_nested(dict(payload), lambda value, _: (True, _compact(value)) if isinstance(value, torch.Tensor) else (False, None))
    full.pop("objects", None)
    return full


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when it owns its storage (sharing kept: tied weights stay tied), else a compact copy."""
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def model_weights(payload: Mapping[str, Any], components: list[str]) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The tensors of the components that are flat name -> tensor mappings, as ``{"<component>.<name>": tensor}``."""
    weights: dict[str, torch.Tensor] = {}
    kept = []
    for name in components:
        state = payload[name]
        if not (isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
            continue
        kept.append(name)
        for key, tensor in state.items():
            weights[f"{name}.{key}"] = tensor
    if not weights:
        raise CkptctlError(f"no component holds model weights (a flat name -> tensor state dict) among: {', '.join(components) or 'none'}")
    return weights, tuple(kept)


def _write_safetensors(out: Path, weights: dict[str, torch.Tensor], payload: Mapping[str, Any]) -> tuple[int, str]:
    """Write ``weights`` with safetensors crash-safely; each tensor contiguous, in storage of its own (safetensors requires it)."""
    from safetensors.torch import save_file

    owned: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in weights.items():
        tensor = tensor.detach().to("cpu")
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(tensor.untyped_storage().data_ptr())
        owned[key] = tensor
    metadata = {"format": "pt", **{k: str(payload[k]) for k in ("epoch", "batch", "global_step") if payload.get(k) is not None}}

    def write(name: str) -> None:
        save_file(owned, name, metadata=metadata)
        os.chmod(name, 0o666 & ~_umask())  # safetensors creates its files private (0600); an export is an ordinary file

    return atomic_write_by_name(out, write)


def _umask() -> int:
    """This process's umask, read without changing it (Linux); the usual 022 where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _tensors_of(state: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_nested(state, lambda value, _: (True, found.append(value)) if isinstance(value, torch.Tensor) else (False, None))
    return found
