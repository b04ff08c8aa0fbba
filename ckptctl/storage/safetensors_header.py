"""A ``.safetensors`` file's header and data bounds, checked without torch (and without the safetensors package).

The format: 8 bytes (little-endian u64) giving the header's length, the header (JSON:
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the tensors' bytes. :func:`read_header` parses it and checks every tensor's bytes
against its dtype and shape, and that the tensors tile the data exactly inside the
file; a file that fails any of this is :class:`CheckpointIntegrityError` (``corrupt``).
No torch here: ``ls`` reads names, shapes and sizes from the header alone.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptctl.core.objects import DTYPE_SIZES
from ckptctl.errors import CheckpointIntegrityError
from ckptctl.storage.atomic import open_regular, read_failure

#: The safetensors library refuses headers over 100 MB; so does this reader.
MAX_HEADER_BYTES = 100_000_000

#: Bytes per element of each dtype (packed sub-byte types are not size-checked): the one table, shared with ckptctl's packs.
DTYPE_BYTES = DTYPE_SIZES


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: the tensors in data order and the free-form ``__metadata__``."""

    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    data_bytes: int = 0

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtypes present, sorted."""
        return tuple(sorted({t.dtype for t in self.tensors}))


def _bad(path: Path, why: str) -> CheckpointIntegrityError:
    return CheckpointIntegrityError(f"{path.name}: not a valid safetensors file: {why}")


def _tensor(path: Path, name: str, raw: Any) -> TensorInfo:
    if not isinstance(raw, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(path, f"tensor {name!r} has no valid dtype and shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise _bad(path, f"tensor {name!r} has no valid data_offsets")
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(path: Path, tensors: list[TensorInfo], data_bytes: int) -> None:
    """Every tensor's byte range matches its dtype and shape; the ranges tile [0, data_bytes) without gaps or overlaps."""
    at = 0
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        width = DTYPE_BYTES.get(t.dtype)
        if width is not None and t.numel * width != t.end - t.begin:
            raise _bad(path, f"tensor {t.name!r} ({t.dtype}, shape {list(t.shape)}) needs {t.numel * width} bytes, has {t.end - t.begin}")
        if t.begin != at:
            raise _bad(path, f"tensor {t.name!r} starts at byte {t.begin}, expected {at} (gap or overlap)")
        at = t.end
    if at > data_bytes:
        raise _bad(path, f"tensors need {at} bytes of data, the file holds {data_bytes} (truncated?)")
    if at < data_bytes:
        raise _bad(path, f"{data_bytes - at} bytes after the last tensor")


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check ``path``'s header against the file's size (see the module docstring).

    Raises :class:`CheckpointIntegrityError`: ``missing`` for an absent file, ``corrupt``
    for anything that is not a whole, well-formed safetensors file.
    """
    path = Path(path)
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes is too short for a header")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise _bad(path, f"header length {length} does not fit in the file ({size} bytes)")
            raw = f.read(length)
    except OSError as exc:
        raise read_failure(path.name, exc) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad(path, "header is not JSON") from None
    if not isinstance(data, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = data.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _bad(path, "__metadata__ is not an object")
    tensors = [_tensor(path, str(name), raw_tensor) for name, raw_tensor in data.items()]
    data_bytes = size - 8 - length
    _check_tiling(path, tensors, data_bytes)
    return SafetensorsHeader(tuple(sorted(tensors, key=lambda t: t.begin)), {str(k): str(v) for k, v in metadata.items()}, data_bytes)


def is_safetensors_name(name: str) -> bool:
    """True for a file name ending in ``.safetensors``."""
    return name.endswith(".safetensors")
