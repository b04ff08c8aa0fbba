"""Content-addressed tensor storage (format 2): the pack layout, its header, and the byte accounting.

Since format 2 a checkpoint is two kinds of file:

- ``checkpoints/checkpoint_NNNNN.pt`` (and ``best_model.pt``): a small ``torch.save``
  *skeleton*, the whole payload with every tensor replaced by a reference
  ``{"__ckptctl_object__": <tensor key>, "pack": <pack name>}``;
- ``objects/<pack name>.safetensors``: *packs* holding the tensor data. A save writes one
  pack with the tensors the run does not hold yet (none when nothing changed), so a
  frozen model, the frozen base inside a module, and a best model equal to a checkpoint
  are stored once. A pack is a plain safetensors file (a JSON header, then raw bytes:
  memory-mapped on load, no pickle), named by its own checksum (xxh3_128 of the file), so
  a copy is verified by its name alone and an object already on the Drive mirror is never
  uploaded again. A tensor's key is the hash of its dtype, shape and bytes.

The index entry of a checkpoint lists the packs it references (``objects``: name ->
size) and the bytes of the state it restores (``state_bytes``); a pack is deleted only when
no index entry and no best-model record references it (see :func:`referenced_packs`).
Pure: no IO.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Iterable

OBJECTS_DIR = "objects"
PACK_SUFFIX = ".safetensors"
#: The algorithm that names packs (the stored checksum of a pack is ``xxh3_128:<name>``).
PACK_ALGORITHM = "xxh3_128"
#: Marks a tensor reference inside a skeleton.
OBJECT_REF_KEY = "__ckptctl_object__"
PACK_METADATA = {"format": "ckptctl-pack", "version": "1"}
#: Data starts at a multiple of this (header padded with spaces, as safetensors allows), and
#: tensors are laid out by element size, largest first, so every tensor is aligned to its element.
DATA_ALIGNMENT = 64
#: A pack header larger than this is refused (a hostile file could claim gigabytes).
MAX_HEADER_BYTES = 100 * 1024 * 1024

_PACK_NAME = re.compile(r"[0-9a-f]{32}")

#: safetensors dtype names -> element size in bytes.
DTYPE_SIZES = {
    "F64": 8, "I64": 8, "U64": 8, "C64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "E8M0": 1,
}  # fmt: skip


def is_pack_name(name: object) -> bool:
    """True for a pack name: 32 lowercase hex digits (an xxh3_128 digest)."""
    return isinstance(name, str) and _PACK_NAME.fullmatch(name) is not None


def pack_relpath(name: str) -> str:
    """The run-relative path of pack ``name`` (``objects/<name>.safetensors``)."""
    if not is_pack_name(name):
        raise ValueError(f"not a pack name: {name!r}")
    return f"{OBJECTS_DIR}/{name}{PACK_SUFFIX}"


def pack_checksum(name: str) -> str:
    """The stored-form checksum a pack file named ``name`` must have."""
    return f"{PACK_ALGORITHM}:{name}"


def parse_pack_filename(filename: str) -> str | None:
    """The pack name of a file in ``objects/`` (``<name>.safetensors``), or None."""
    if not filename.endswith(PACK_SUFFIX):
        return None
    name = filename[: -len(PACK_SUFFIX)]
    return name if is_pack_name(name) else None


@dataclass(frozen=True)
class PackTensor:
    """Where one tensor lies in a pack: dtype (safetensors name), shape, and byte range in the data section."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def layout_pack(tensors: Iterable[tuple[str, str, tuple[int, ...], int]]) -> tuple[bytes, list[PackTensor]]:
    """Plan a pack for ``(key, dtype, shape, nbytes)`` tensors: return the header bytes (length prefix included) and the layout.

    Tensors are ordered by element size (largest first) so each starts aligned to its
    element, and the header is padded so the data starts at :data:`DATA_ALIGNMENT`.
    """
    ordered = sorted(tensors, key=lambda t: (-DTYPE_SIZES[t[1]], t[0]))
    layout, offset = [], 0
    for key, dtype, shape, nbytes in ordered:
        layout.append(PackTensor(key, dtype, tuple(int(s) for s in shape), offset, offset + nbytes))
        offset += nbytes
    header: dict[str, Any] = {"__metadata__": PACK_METADATA}
    for t in layout:
        header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    padded = len(text) + (-(8 + len(text)) % DATA_ALIGNMENT)
    return struct.pack("<Q", padded) + text.ljust(padded, b" "), layout


def parse_pack_header(prefix: bytes, header: bytes, file_size: int) -> tuple[int, dict[str, PackTensor]]:
    """Check a pack's header against the file's size; return ``(data_start, {key: PackTensor})``.

    ``prefix`` is the file's first 8 bytes, ``header`` the JSON that follows. Raises
    ValueError naming what is wrong: unknown dtypes, shapes that do not match their byte
    ranges, ranges outside the file or misaligned for their dtype.
    """
    if len(prefix) != 8:
        raise ValueError("pack is shorter than its header length")
    (length,) = struct.unpack("<Q", prefix)
    data_start = 8 + length
    if length > MAX_HEADER_BYTES or data_start > file_size or len(header) != length:
        raise ValueError(f"pack header claims {length} bytes; the file has {file_size}")
    try:
        raw = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"pack header is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError("pack header is not an object")
    tensors = {}
    for key, spec in raw.items():
        if key != "__metadata__":
            tensors[key] = _pack_tensor(key, spec, data_start, file_size)
    return data_start, tensors


def _pack_tensor(key: str, spec: Any, data_start: int, file_size: int) -> PackTensor:
    if not isinstance(spec, dict) or spec.get("dtype") not in DTYPE_SIZES:
        raise ValueError(f"pack tensor {key!r}: missing or unknown dtype")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ValueError(f"pack tensor {key!r}: bad shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
        raise ValueError(f"pack tensor {key!r}: bad data_offsets {offsets!r}")
    itemsize = DTYPE_SIZES[spec["dtype"]]
    numel = 1
    for s in shape:
        numel *= s
    start, end = offsets
    if end - start != numel * itemsize or data_start + end > file_size:
        raise ValueError(f"pack tensor {key!r}: bytes {start}..{end} do not hold shape {shape} or lie outside the file")
    if (data_start + start) % itemsize:
        raise ValueError(f"pack tensor {key!r}: misaligned for {spec['dtype']}")
    return PackTensor(key, spec["dtype"], tuple(shape), start, end)


def read_objects_field(raw: Any, what: str) -> dict[str, int]:
    """An index or best record's ``objects`` (pack name -> size); raise ValueError if malformed."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: 'objects' is not an object")
    out = {}
    for name, size in raw.items():
        if not is_pack_name(name) or type(size) is not int or size < 0:
            raise ValueError(f"{what}: bad object {name!r}: {size!r}")
        out[name] = size
    return out


def referenced_packs(records: Iterable[Any]) -> dict[str, int]:
    """Every pack referenced by ``records`` (index entries, best-model records: anything with ``objects``), with its size."""
    packs: dict[str, int] = {}
    for record in records:
        if record is not None:
            packs.update(getattr(record, "objects", None) or {})
    return packs


def new_bytes_by_id(entries: Iterable[Any]) -> dict[int, int]:
    """What each checkpoint added to the run's storage: its own file plus the packs no lower id references.

    ``entries`` are index entries (``id``, ``size_bytes``, ``objects``) in any order.
    """
    seen: set[str] = set()
    out: dict[int, int] = {}
    for entry in sorted(entries, key=lambda e: e.id):
        packs = getattr(entry, "objects", None) or {}
        out[entry.id] = entry.size_bytes + sum(size for name, size in packs.items() if name not in seen)
        seen.update(packs)
    return out
