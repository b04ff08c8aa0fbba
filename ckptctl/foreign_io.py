"""Torch IO for checkpoints ckptctl did not write: safe trial loads and ``show``/``diff`` payloads.

The torch-side companion of :mod:`ckptctl.storage.foreign` (finding them) and
:mod:`ckptctl.storage.foreign_listing` (listing them without torch). Nothing here runs
pickled code and nothing here writes:

- torch files (``.pt``, ``.pth``, ``.bin``, Lightning's ``.ckpt``) go through
  :func:`ckptctl.torch_io.verify_file` (``weights_only=True``, memory-mapped): a file that
  needs pickled code is ``unsafe`` with torch's reason, never run;
- ``.safetensors`` files: the header and data bounds (:func:`read_header`), then every
  tensor read one at a time with the safetensors package (no pickle at all);
- a Trainer ``checkpoint-N/`` folder: each file the way the Trainer reads it back, safely:
  weights as above, ``optimizer.pt``/``scheduler.pt``/``scaler.pt`` with
  ``weights_only=True``, ``rng_state*.pth`` with ``weights_only=True`` plus NumPy's array
  reconstruction allowed (the allowlist the Trainer itself uses for that file),
  ``*.json`` parsed; ``training_args.bin`` is a pickled ``TrainingArguments`` object that
  resuming does not need: only its archive's CRCs are checked, it is never unpickled.

:func:`load_entry` gives ``show`` and ``diff`` one payload shaped like ckptctl's
(``epoch``, ``batch``, ``global_step``, ``metrics``, ``rng``, ``extra``, one key per component).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ckptctl.errors import CheckpointIntegrityError, CorruptIndexError
from ckptctl.storage.atomic import open_regular, read_failure
from ckptctl.storage.foreign import ForeignEntry
from ckptctl.storage.foreign_listing import hf_metrics, lightning_monitor, read_trainer_state
from ckptctl.storage.safetensors_header import read_header
from ckptctl.storage.scan import mtime_iso, read_json_file
from ckptctl.tensors import find_nonfinite
from ckptctl.torch_io import verify_file

#: The detail of every file ckptctl did not write that checked out: it has no checksum to compare.
NO_CHECKSUM_DETAIL = "no checksum (not written by ckptctl): checked by loading only"
#: Trainer files that hold the model's weights, in the order they are looked for.
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
#: How bad each status is, when a Trainer checkpoint's files disagree.
_SEVERITY = {"ok": 0, "nonfinite": 1, "unsafe": 2, "missing": 3, "corrupt": 4}


# --------------------------------------------------------------------------- single files


@contextlib.contextmanager
def numpy_arrays_allowed() -> Iterator[None]:
    """Within it, ``weights_only`` loads also rebuild NumPy arrays (the Trainer's allowlist for ``rng_state.pth``)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: no allowlist; such files then report unsafe
        yield
        return
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    with safe_globals([core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]):
        yield


def load_safetensors(path: Path, *, deep: bool = False, keep: bool = True) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors, after its header and bounds check; CheckpointIntegrityError otherwise.

    Tensors are read one at a time (``keep=False`` drops each after its check: flat memory);
    ``deep`` checks floating values are finite.
    """
    read_header(path)
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if deep and find_nonfinite({name: tensor}):
                    bad.append(name)
                if keep:
                    tensors[name] = tensor
    except OSError as exc:
        raise read_failure(path.name, exc) from None
    except Exception as exc:  # the safetensors package's own errors for damaged files
        raise CheckpointIntegrityError(f"{path.name}: cannot load: {str(exc).strip().splitlines()[0][:300]}") from None
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointIntegrityError(f"{path.name}: non-finite values in {shown}", status="nonfinite")
    return tensors


def check_pickle_archive(path: Path) -> None:
    """A torch zip archive's CRCs, without unpickling anything (for ``training_args.bin``); CheckpointIntegrityError otherwise."""
    try:
        with os.fdopen(open_regular(path), "rb") as f, zipfile.ZipFile(f) as archive:
            bad = archive.testzip()
    except OSError as exc:
        raise read_failure(path.name, exc) from None
    except (zipfile.BadZipFile, ValueError, RuntimeError, EOFError) as exc:
        raise CheckpointIntegrityError(f"{path.name}: not a readable archive ({exc})") from None
    if bad is not None:
        raise CheckpointIntegrityError(f"{path.name}: {bad} fails its CRC")


def _check_file(path: Path, deep: bool) -> str:
    """Check one file of a Trainer checkpoint by its name; return a note ('' usually). CheckpointIntegrityError when bad."""
    name = path.name
    if name.endswith(".safetensors"):
        load_safetensors(path, deep=deep, keep=False)
    elif name.endswith(".json"):
        try:
            read_json_file(path)
        except CorruptIndexError as exc:
            raise CheckpointIntegrityError(str(exc)) from None
    elif name == "training_args.bin":
        check_pickle_archive(path)
        return f"{name}: archive intact, not unpickled (a pickled TrainingArguments object; not needed to resume)"
    elif name.startswith("rng_state") and name.endswith(".pth"):
        with numpy_arrays_allowed():
            verify_file(path, None)
    elif name.endswith((".pt", ".pth", ".bin")):
        verify_file(path, None, deep=deep)
    return ""


def check_entry(entry: ForeignEntry, *, deep: bool = False) -> tuple[str, str]:
    """``(status, detail)`` of one entry, never raising for a bad file (see the module docstring)."""
    if entry.format != "hf-checkpoint":
        try:
            if entry.format == "safetensors":
                load_safetensors(entry.path, deep=deep, keep=False)
            else:
                verify_file(entry.path, None, deep=deep)
        except CheckpointIntegrityError as exc:
            return exc.status, str(exc)
        return "ok", NO_CHECKSUM_DETAIL
    return _check_hf_checkpoint(entry, deep)


def _check_hf_checkpoint(entry: ForeignEntry, deep: bool) -> tuple[str, str]:
    """Every file of a ``checkpoint-N/`` folder; the worst status wins and each problem is named."""
    status, problems, notes, checked = "ok", [], [], []
    if not any(name in entry.files for name in HF_WEIGHTS + ("model.safetensors.index.json", "pytorch_model.bin.index.json")):
        status, problems = "missing", [f"{entry.name}: no model weights ({', '.join(HF_WEIGHTS)})"]
    for name in entry.files:
        try:
            note = _check_file(entry.path / name, deep)
        except CheckpointIntegrityError as exc:
            problems.append(str(exc))
            status = max(status, exc.status, key=lambda s: _SEVERITY.get(s, 4))
            continue
        (notes if note else checked).append(note or name)
    if problems:
        return status, "; ".join(problems)
    return "ok", "; ".join([f"{NO_CHECKSUM_DETAIL} ({len(checked)} files)"] + notes)


# --------------------------------------------------------------------------- payloads for show / diff


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def lightning_payload(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A Lightning checkpoint as ckptctl's payload shape: its positions, the monitored score as a metric, every other key a component."""
    monitor = lightning_monitor(raw.get("callbacks"), _number)
    metrics = {monitor["metric"]: monitor["current_score"]} if monitor and monitor["metric"] and monitor["current_score"] is not None else {}
    described = {"epoch", "global_step", "pytorch-lightning_version", "hparams_name"}
    payload: dict[str, Any] = {
        "epoch": raw.get("epoch"),
        "batch": None,
        "global_step": raw.get("global_step"),
        "metrics": metrics,
        "extra": {"lightning_version": raw.get("pytorch-lightning_version"), "monitor": monitor, "hparams_name": raw.get("hparams_name")},
    }
    payload.update({k: v for k, v in raw.items() if k not in described})
    return payload


def _hf_weights(entry: ForeignEntry) -> dict[str, Any]:
    """The model's tensors of a Trainer checkpoint (all shards of a sharded one)."""
    shards = [n for n in entry.files if n.endswith(".safetensors")] or [n for n in entry.files if n in HF_WEIGHTS]
    weights: dict[str, Any] = {}
    for name in shards:
        path = entry.path / name
        weights.update(load_safetensors(path) if name.endswith(".safetensors") else verify_file(path, None))
    return weights


def hf_payload(entry: ForeignEntry) -> dict[str, Any]:
    """A Trainer ``checkpoint-N/`` folder as ckptctl's payload shape: model, optimizer, scheduler, scaler, RNG and the trainer state."""
    try:
        state = read_trainer_state(entry.path)
    except CorruptIndexError as exc:
        raise CheckpointIntegrityError(f"{entry.name}: {exc}") from None
    payload: dict[str, Any] = {
        "epoch": state.get("epoch"),
        "batch": None,
        "global_step": state.get("global_step", entry.id),
        "metrics": hf_metrics(state.get("log_history")),
        "extra": {k: state.get(k) for k in ("best_metric", "best_model_checkpoint", "max_steps", "num_train_epochs") if k in state},
        "model": _hf_weights(entry),
    }
    for key, name in (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"), ("scaler", "scaler.pt")):
        if name in entry.files:
            payload[key] = verify_file(entry.path / name, None)
    rng = sorted(n for n in entry.files if n.startswith("rng_state") and n.endswith(".pth"))
    if rng:
        with numpy_arrays_allowed():
            payload["rng"] = verify_file(entry.path / rng[0], None)
    return payload


def load_entry(path: Path, fmt: str) -> dict[str, Any]:
    """The payload of a checkpoint another tool wrote, for ``show`` and ``diff``: ``fmt`` is ``safetensors``, ``lightning`` or ``hf-checkpoint``.

    Raises :class:`CheckpointIntegrityError` when a file fails its check or safe load.
    """
    path = Path(path)
    if fmt == "safetensors":
        payload = {"model": load_safetensors(path)}
    elif fmt == "lightning":
        payload = lightning_payload(verify_file(path, None))
    elif fmt == "hf-checkpoint":
        files = tuple(sorted(p.name for p in path.iterdir() if p.is_file() and not p.is_symlink()))
        payload = hf_payload(ForeignEntry(path.name, path, None, fmt, 0, files))
    else:
        return verify_file(path, None)
    payload.setdefault("timestamp", mtime_iso(path / "trainer_state.json" if fmt == "hf-checkpoint" else path))
    return payload
