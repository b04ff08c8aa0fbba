"""Torch IO: the only storage code that imports torch (with :mod:`ckptctl.tensors`, its walk and compare).

Staging (a consistent CPU copy of the state into reusable buffers), serialising a
checkpoint crash-safely, loading it back safely (``weights_only=True``, memory-mapped),
verifying it, and capturing/restoring RNG states.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ckptctl.core.format import FORMAT_VERSION, RESERVED_CHECKPOINT_KEYS
from ckptctl.errors import CheckpointIntegrityError, DeviceUnavailableError, RestoreStateError
from ckptctl.storage.atomic import (
    BeforeReplace,
    ProgressCallback,
    atomic_write,
    atomic_write_by_name,
    matching_checksum,
    open_regular,
    read_failure,
)
from ckptctl import tensors as _tensors
from ckptctl.packs_io import Deduplicated, check_objects, deduplicate, references_objects, resolve_objects
from ckptctl.storage.objects import PackChecks, PackTable

log = logging.getLogger("ckptctl")

try:  # NumPy is optional for the library; its RNG is saved when it is installed.
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is a declared dependency
    _np = None


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Return Python, NumPy, torch CPU and (if initialised) CUDA RNG states, as tensors and plain values."""
    version, state, gauss_next = random.getstate()
    rng: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss_next": gauss_next},
        "torch_cpu": torch.get_rng_state(),
    }
    if _np is not None:
        algorithm, keys, pos, has_gauss, cached = _np.random.get_state()
        rng["numpy"] = {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(keys.astype(_np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = [state.cpu() for state in torch.cuda.get_rng_state_all()]
    return rng


def restore_rng(rng: Mapping[str, Any]) -> list[str]:
    """Restore the RNG states saved by :func:`capture_rng`; return the names restored.

    CUDA states are restored only when CUDA is available (a GPU checkpoint resumed on a
    CPU-only machine skips them). Anything malformed raises :class:`RestoreStateError`.
    """
    restored = []
    try:
        py = rng["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
        restored.append("python")
        # clone: set_rng_state reads from the start of the tensor's storage, ignoring its offset,
        # and a state loaded from a pack is a view into the pack's memory map
        torch.set_rng_state(rng["torch_cpu"].to(torch.uint8).clone())
        restored.append("torch_cpu")
        if "numpy" in rng:
            if _np is None:
                raise RestoreStateError("checkpoint has a NumPy RNG state but NumPy is not installed")
            st = rng["numpy"]
            keys = st["keys"].numpy().astype(_np.uint32)
            _np.random.set_state((st["algorithm"], keys, int(st["pos"]), int(st["has_gauss"]), float(st["cached_gaussian"])))
            restored.append("numpy")
        if "torch_cuda" in rng and torch.cuda.is_available():
            states = list(rng["torch_cuda"])
            if len(states) != torch.cuda.device_count():
                raise RestoreStateError(
                    f"checkpoint has CUDA RNG states for {len(states)} devices, this machine has {torch.cuda.device_count()}"
                )
            torch.cuda.set_rng_state_all([s.to(torch.uint8).clone() for s in states])
            restored.append("torch_cuda")
    except RestoreStateError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise RestoreStateError(f"cannot restore RNG state: {exc.__class__.__name__}: {exc}") from None
    return restored


# --------------------------------------------------------------------------- staging


class Stager:
    """Copies state dicts into CPU buffers that are reused from one save to the next.

    With ``copy=False`` it passes tensors through untouched (no memory cost), for a
    caller that writes them synchronously before training changes them.

    The first save allocates one buffer per tensor (the staging memory cost: one CPU copy
    of the saved state); later saves with the same shapes only ``copy_`` into them, which
    is the cheapest consistent snapshot. A caller must not stage again while a payload
    from the previous :meth:`stage` is still being written.
    """

    def __init__(self, copy: bool = True) -> None:
        self.copy = copy
        self._buffers: dict[tuple, torch.Tensor] = {}

    @property
    def staged_bytes(self) -> int:
        """Bytes held in staging buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def stage(self, obj: Any, key: tuple = ()) -> Any:
        """Return a copy of ``obj`` whose tensors live in this stager's CPU buffers."""
        return _tensors.map_nested(
            obj, lambda value, path: (True, self._stage_tensor(value, key + path)) if isinstance(value, torch.Tensor) else (False, None)
        )

    def _stage_tensor(self, tensor: torch.Tensor, key: tuple) -> torch.Tensor:
        tensor = tensor.detach()
        if not self.copy:
            return tensor  # pass-through: the caller writes before the state changes
        if tensor.layout != torch.strided or tensor.is_quantized:
            return tensor.to("cpu", copy=True)
        buf = self._buffers.get(key)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            self._buffers[key] = buf
        buf.copy_(tensor)
        return buf


def component_state(name: str, component: Any) -> Any:
    """The ``state_dict()`` of a component (model, optimizer, scheduler, GradScaler, loss module)."""
    if name in RESERVED_CHECKPOINT_KEYS:
        raise ValueError(f"component name {name!r} is reserved; pick another name")
    state_dict = getattr(component, "state_dict", None)
    if not callable(state_dict):
        raise TypeError(f"component {name!r} ({type(component).__name__}) has no state_dict()")
    return state_dict()


def component_states(components: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: state_dict()}`` for every component, checking names and types."""
    return {name: component_state(name, component) for name, component in components.items()}


#: Bytes a state's staging copy needs; its home is :mod:`ckptctl.tensors`, importable here for the persistence API.
tensor_bytes = _tensors.tensor_bytes


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def build_payload(
    stager: Stager,
    *,
    checkpoint_id: int | None,
    epoch: int,
    batch: int,
    global_step: int,
    metrics: Mapping[str, float],
    timestamp: str,
    states: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    sections: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Take a consistent CPU snapshot of every component's state plus RNG, as the dict that gets saved.

    ``states`` maps component names to their ``state_dict()`` (see :func:`component_states`);
    ``sections``: more top-level keys (reserved names: a distributed save's per-rank parts).
    """
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "epoch": int(epoch),
        "batch": int(batch),
        "global_step": int(global_step),
        "metrics": dict(metrics),
        "timestamp": timestamp,
        "components": sorted(states),
        "component_order": list(states),  # the order they were passed in: positional loads bind to it
        "extra": dict(extra or {}),
    }
    payload["rng"] = stager.stage(capture_rng(), ("__rng__",))
    for key, value in (sections or {}).items():
        payload[key] = stager.stage(value, ("__section__", key))
    for name, state in states.items():
        payload[name] = stager.stage(state, (name,))
    return payload


# --------------------------------------------------------------------------- save / load


#: Orders our saves' set/restore of torch's CRC option where that option is process-wide.
_CRC_LOCK = threading.Lock()


def _save_without_zip_crc(payload: Mapping[str, Any], writer: Any) -> None:
    """``torch.save`` with the zip container's CRC-32 turned off for this call.

    The CRC halves the write speed, and every file already carries our own checksum,
    computed in the same pass; files saved without it load normally with ``torch.load``
    (which does not check the CRC). The option is turned off and put back around the call,
    in the thread that saves. How far it reaches depends on torch (pyproject.toml allows 2.4 on):

    - torch 2.13 keeps it in ``torch.utils.serialization.config``, whose values are per thread
      (a ContextVar): only this save skips the CRC, and the lock merely orders our own saves;
    - the first torch versions with the option (2.6 on) kept it in one module-level variable,
      shared by every thread: the lock keeps two of our saves from putting back each other's
      value, and a ``torch.save`` that another thread runs meanwhile also skips its CRC;
    - torch 2.4 and 2.5 have no such option: the file is written with its CRC (slower, same file).
    """
    set_crc = getattr(torch.serialization, "set_crc32_options", None)
    get_crc = getattr(torch.serialization, "get_crc32_options", None)
    if set_crc is None or get_crc is None:
        torch.save(dict(payload), writer)
        return
    with _CRC_LOCK:
        previous = get_crc()
        set_crc(False)
        try:
            torch.save(dict(payload), writer)
        finally:
            set_crc(previous)


def write_checkpoint_file(
    path: str | os.PathLike, payload: Mapping[str, Any], *, before_replace: BeforeReplace = None
) -> tuple[int, str]:
    """``torch.save`` ``payload`` crash-safely to ``path``; return ``(size_bytes, checksum)``.

    Fast path: torch's native file writer on the temporary's name (several times faster
    than writing through a Python file object), then fsync and a checksum read back from
    the page cache. torch reports a failed write (disk full...) as a bare RuntimeError, so
    on one the save is redone through Python IO, whose OSError names the real cause; the
    same path serves names torch cannot take (not UTF-8). A RuntimeError that is not
    torch's write failure is logged (once per message) even when the redo succeeds: a
    regression of the fast path is never hidden.
    ``before_replace`` runs just before the rename (see :func:`atomic_write`).
    """
    if _is_utf8(os.fspath(path)):
        try:
            return atomic_write_by_name(path, lambda name: _save_without_zip_crc(payload, name), before_replace=before_replace)
        except RuntimeError as exc:
            # only the message is kept: the exception's frames hold torch's writer, whose open
            # descriptor would keep the removed temporary's blocks in use on a full disk
            message = _first_line(exc)
        if not any(marker in message for marker in _TORCH_WRITE_FAILURES):
            _warn_fast_path_failed(message)
    return atomic_write(path, lambda writer: _save_without_zip_crc(payload, writer), before_replace=before_replace)


def write_deduplicated(
    run_dir: str | os.PathLike,
    path: str | os.PathLike,
    payload: Mapping[str, Any],
    table: PackTable,
    *,
    before_replace: BeforeReplace = None,
    on_pack: Callable[[str], None] | None = None,
    stable: frozenset[tuple] = frozenset(),
) -> tuple[int, str, Deduplicated]:
    """Save ``payload`` in format 2: its new tensors as one pack of ``run_dir``, then its skeleton to ``path``.

    Returns the skeleton file's ``(size, checksum)`` and what it references. The pack is
    durable before the skeleton is renamed into place, and both before the caller commits
    the index, so a committed checkpoint never references a pack that is not on disk.
    ``on_pack(name)`` is told each new pack as soon as it is durable; ``stable``: see :func:`deduplicate`.
    """
    dedup = deduplicate(run_dir, payload, table, stable)
    for name in dedup.new_packs if on_pack is not None else ():
        on_pack(name)
    size, checksum = write_checkpoint_file(path, dedup.skeleton, before_replace=before_replace)
    return size, checksum, dedup


#: How torch's zip writer reports a failed write (disk full, I/O error): the errors the Python IO redo is for.
_TORCH_WRITE_FAILURES = ("file write failed", "unexpected pos")
_fast_path_warned: set[str] = set()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else exc.__class__.__name__


def _warn_fast_path_failed(message: str) -> None:
    """torch's native writer failed other than by a failed write: a regression to report, once per message."""
    if message not in _fast_path_warned:
        _fast_path_warned.add(message)
        log.warning("torch's file writer failed (%s); the checkpoint was written through Python IO instead (slower)", message)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _classify_load_error(path: Path, exc: BaseException) -> CheckpointIntegrityError:
    """``unsafe`` or ``corrupt``, with torch's cause whole on one line and no terminal escapes (see core.messages)."""
    from ckptctl.core.messages import load_failure_cause

    message = load_failure_cause(str(exc)) or exc.__class__.__name__
    if isinstance(exc, pickle.UnpicklingError) and (
        "weights_only" in str(exc) or "Unsupported global" in str(exc) or "Unsupported operand" in str(exc)
    ):
        return CheckpointIntegrityError(f"{path.name}: refuses to run pickled code: {message}", status="unsafe")
    return CheckpointIntegrityError(f"{path.name}: cannot load: {message}", status="corrupt")


def _utf8_path(path: Path, fd: int) -> str | Path:
    """A name torch can open for ``path``, already open as ``fd``: torch passes names to C++ as
    UTF-8, so a path with undecodable bytes (``run_\\xff``) is reached through ``/proc/self/fd`` instead."""
    if _is_utf8(str(path)):
        return path
    proc = f"/proc/self/fd/{fd}"
    if not os.path.exists(proc):
        raise CheckpointIntegrityError(f"{path.name!r}: file name is not valid UTF-8 and cannot be opened by torch here")
    return proc


def is_device(value: Any) -> bool:
    """True for what can stand where a device goes: a name (``"cuda:1"``), a ``torch.device``, a CUDA index, or None."""
    return value is None or (isinstance(value, (str, torch.device, int)) and not isinstance(value, bool))


def check_device(device: Any) -> None:
    """Raise :class:`DeviceUnavailableError` if ``device`` (``"cuda"``, ``"cuda:1"``, ``"mps"``...) is not usable here.

    Called before any checkpoint is loaded, so a missing GPU is one clear error instead of
    every checkpoint looking damaged. ``"cpu"``, ``"meta"`` and None (each tensor where it
    was saved) always pass. Anything that is not a device at all (a module, an optimizer:
    see :func:`is_device`) is a TypeError naming it.
    """
    if not is_device(device):
        raise TypeError(
            f"device must be a device name ('cpu', 'cuda', 'cuda:1'), a torch.device, a CUDA index or None, "
            f"not a {type(device).__name__}; pass components by position before device= or by name (agent=model)"
        )
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise DeviceUnavailableError(f"device {device!r} is not a device torch understands ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {device!r}: CUDA is not available on this machine (no GPU, or a CPU-only torch); "
                "pass device='cpu' to load there"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceUnavailableError(f"device {device!r}: MPS is not available on this machine; pass device='cpu'")


def safe_load(path: str | os.PathLike, device: str | torch.device = "cpu", *, mmap: bool = True) -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True`` (never runs pickled code): its full payload.

    A format-2 skeleton's tensors come from the run's packs (memory-mapped, see
    :func:`ckptctl.packs_io.resolve_objects`). Errors as :func:`load_skeleton`.
    """
    return resolve_objects(path, load_skeleton(path, device, mmap=mmap), device)


def load_skeleton(path: str | os.PathLike, device: str | torch.device = "cpu", *, mmap: bool = True) -> dict[str, Any]:
    """Load a checkpoint file as it is with ``weights_only=True`` (a format-2 file: its skeleton, references unresolved).

    Memory-mapped where the file allows it. Raises :class:`CheckpointIntegrityError` with
    status ``missing``, ``corrupt`` or ``unsafe``; anything but a regular file (a FIFO, a
    device, a socket, a directory, or a symlink to one) is ``corrupt`` and never opened
    in a way that could block (:func:`ckptctl.storage.atomic.open_regular`).
    """
    path = Path(path)
    try:
        fd = open_regular(path)  # torch.load would block on a FIFO: judge the file first
    except OSError as exc:
        raise read_failure(path.name, exc) from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not zipfile.is_zipfile(f):
                mmap = False  # legacy (non-zip) format cannot be memory-mapped
            data = torch.load(_utf8_path(path, fd), map_location=device, weights_only=True, mmap=mmap)
    except CheckpointIntegrityError:
        raise
    except MemoryError:
        raise CheckpointIntegrityError(f"{path.name}: absurd sizes in archive (out of memory)") from None
    except OSError as exc:  # e.g. deleted between the check above and the load (a trainer's retention)
        raise read_failure(path.name, exc) from None
    except Exception as exc:  # torch raises many types for damaged archives
        if not path.exists():  # torch's mmap open reports a vanished file as a RuntimeError
            raise CheckpointIntegrityError(f"{path.name}: file is missing", status="missing") from None
        raise _classify_load_error(path, exc) from None
    if not isinstance(data, dict):
        raise CheckpointIntegrityError(f"{path.name}: not a ckptctl checkpoint (top level is {type(data).__name__})")
    return data


def verify_file(
    path: str | os.PathLike,
    expected_checksum: str | tuple[str, ...] | None,
    *,
    deep: bool = False,
    on_progress: ProgressCallback = None,
    checks: PackChecks | None = None,
    device: str | torch.device = "cpu",
    unshard: bool = True,
) -> dict[str, Any]:
    """Checksum (when known) + safe trial load (+ finite check when ``deep``) of one file.

    ``expected_checksum`` may be several checksums, any of which is good (the best model
    during a replace). A format-2 file's packs are checked against their names too (each
    once per ``checks``, shared by the caller across the files of a run; a damaged pack
    fails every file that references it). Sharded state (FSDP2) is trial-loaded whole in this
    process through DCP, or with ``unshard=False`` only its record is checked and it stays
    as references (for a collective load). Returns the loaded payload. Raises
    :class:`CheckpointIntegrityError` with status ``missing``/``corrupt``/``unsafe``/``nonfinite``.
    """
    if expected_checksum is not None:
        candidates = (expected_checksum,) if isinstance(expected_checksum, str) else expected_checksum
        matching_checksum(path, candidates, on_progress)
    skeleton = load_skeleton(path, device, mmap=True)
    if references_objects(skeleton):
        check_objects(path, skeleton, checks if checks is not None else PackChecks())
    payload = resolve_objects(path, skeleton, device, unshard=unshard)
    if deep:
        bad = _tensors.find_nonfinite(payload)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise CheckpointIntegrityError(f"{Path(path).name}: non-finite values in {shown}", status="nonfinite")
    return payload


def apply_components(payload: Mapping[str, Any], components: Mapping[str, Any]) -> None:
    """Load each component's state from ``payload``; a missing or mismatching one raises RestoreStateError."""
    for name, component in components.items():
        if name not in payload or name in RESERVED_CHECKPOINT_KEYS:
            available = ", ".join(payload.get("components") or []) or "none"
            raise RestoreStateError(f"checkpoint has no component {name!r} (it has: {available})")
        try:
            component.load_state_dict(payload[name])
        except Exception as exc:
            raise RestoreStateError(f"cannot load component {name!r}: {str(exc).splitlines()[0][:300]}") from None


def payload_metadata(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The non-tensor description of a loaded checkpoint (what load/resume return)."""
    return {
        "checkpoint_id": payload.get("checkpoint_id"),
        "epoch": payload.get("epoch"),
        "batch": payload.get("batch"),
        "global_step": payload.get("global_step"),
        "metrics": dict(payload.get("metrics") or {}),
        "timestamp": payload.get("timestamp"),
        "components": list(payload.get("components") or []),
        "extra": dict(payload.get("extra") or {}),
    }

