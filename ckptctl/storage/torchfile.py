"""The small record of a ``torch.save`` file, read without torch and without running any of its code.

A torch zip checkpoint holds ``<prefix>/data.pkl`` (the saved object tree, every tensor a
reference to a storage) and ``<prefix>/data/<key>`` (the raw bytes of each storage).
:func:`read_record` unpickles ``data.pkl`` with an unpickler that resolves **no** global
to real code: tensors and storages become :class:`TensorRef` / :class:`StorageRef`
records, a handful of harmless containers (``OrderedDict``, ``set``...) are the real
types, and every other global becomes an inert :class:`Opaque` placeholder that only
remembers its name and arguments. So ``ckptctl ls`` can read a checkpoint's epoch, step
and metrics (and a scalar tensor's value, :func:`scalar_value`) from other tools' files
without importing torch and without reading tensor data; the trial load with
``weights_only=True`` stays the job of ``verify``.

Only the zip format (torch >= 1.6) is read; the legacy format and anything unreadable
give :class:`RecordUnavailable`. No torch here.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptctl.storage.atomic import open_regular

#: A ``data.pkl`` larger than this is not read by ``ls`` (a state with millions of entries).
MAX_RECORD_BYTES = 32 * 1024 * 1024

#: struct format and size of one element, by the storage class name torch pickles (``FloatStorage``) or dtype name.
_ELEMENTS: dict[str, tuple[str, int]] = {
    "Float": ("f", 4), "float32": ("f", 4),
    "Double": ("d", 8), "float64": ("d", 8),
    "Half": ("e", 2), "float16": ("e", 2),
    "BFloat16": ("bf16", 2), "bfloat16": ("bf16", 2),
    "Long": ("q", 8), "int64": ("q", 8),
    "Int": ("i", 4), "int32": ("i", 4),
    "Short": ("h", 2), "int16": ("h", 2),
    "Char": ("b", 1), "int8": ("b", 1),
    "Byte": ("B", 1), "uint8": ("B", 1),
    "Bool": ("?", 1), "bool": ("?", 1),
    "uint16": ("H", 2), "uint32": ("I", 4), "uint64": ("Q", 8),
}


class RecordUnavailable(Exception):
    """The file's record cannot be read cheaply (not a torch zip file, too large, damaged)."""


class Opaque:
    """An object of a global the file names (a class or function) that was not resolved: nothing of it ran.

    :func:`opaque_global` makes one subclass per global name; creating, calling or
    building it (``__setstate__``) only records the arguments and state.
    """

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on an opaque mapping
        if not isinstance(self.state, dict):
            self.state = {}
        self.state[key] = value

    def append(self, value: Any) -> None:
        """APPEND on an opaque list: the value is kept in ``state``."""
        if not isinstance(self.state, list):
            self.state = []
        self.state.append(value)

    def extend(self, values: Any) -> None:
        """APPENDS on an opaque list."""
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"<{self.global_name}>"


def opaque_global(name: str) -> type[Opaque]:
    """A placeholder class for the global ``name`` (``module.qualname``)."""
    return type(name.rpartition(".")[2] or "Opaque", (Opaque,), {"global_name": name})


@dataclass(frozen=True)
class StorageRef:
    """A storage of the file: ``archive/data/<key>``, ``numel`` elements of ``element`` (``FloatStorage`` -> ``Float``)."""

    element: str
    key: str
    numel: int | None


@dataclass
class TensorRef:
    """A tensor of the file, as recorded: its storage, offset (in elements), shape and dtype name."""

    storage: Any
    offset: int = 0
    shape: tuple = ()
    dtype: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        n = 1
        for dim in self.shape:
            n *= dim if isinstance(dim, int) else 0
        return n


def _rebuild_tensor(storage: Any, offset: Any = 0, size: Any = (), *_rest: Any) -> TensorRef:
    return TensorRef(storage, offset if isinstance(offset, int) else 0, tuple(size) if isinstance(size, (tuple, list)) else ())


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, grad: Any, hooks: Any, dtype: Any = None, *_: Any) -> TensorRef:
    ref = _rebuild_tensor(storage, offset, size)
    ref.dtype = dtype.global_name.rpartition(".")[2] if isinstance(dtype, type) and issubclass(dtype, Opaque) else None
    return ref


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


def _encode_latin1(text: Any, encoding: Any = "latin1") -> Any:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (``latin1`` only; anything else stays opaque)."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin1")
    return opaque_global("_codecs.encode")(text, encoding)


#: The only globals resolved to something real: containers, and the tensor rebuilders mapped to records.
_KNOWN: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _encode_latin1,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RecordUnpickler(pickle.Unpickler):
    """Resolves globals only through :data:`_KNOWN` (else :class:`Opaque`) and storages as :class:`StorageRef`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._placeholders: dict[str, type[Opaque]] = {}

    def find_class(self, module: str, name: str) -> Any:
        """A known harmless global, else the placeholder class for ``module.name`` (one per name)."""
        known = _KNOWN.get((module, name))
        if known is not None:
            return known
        full = f"{module}.{name}"
        if full not in self._placeholders:
            self._placeholders[full] = opaque_global(full)
        return self._placeholders[full]

    def persistent_load(self, pid: Any) -> Any:
        """A storage reference (``('storage', type, key, location, numel)``) as a :class:`StorageRef`."""
        if isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage":
            kind = pid[1].global_name.rpartition(".")[2] if isinstance(pid[1], type) and issubclass(pid[1], Opaque) else ""
            numel = pid[4] if len(pid) > 4 and isinstance(pid[4], int) else None
            return StorageRef(kind.removesuffix("Storage"), str(pid[2]), numel)
        return opaque_global("persistent")(pid)


@dataclass(frozen=True)
class TorchRecord:
    """The unpickled object tree of a torch zip file (tensors as :class:`TensorRef`) and where its storages are."""

    obj: Any
    path: Path
    prefix: str
    little_endian: bool = True


def _member_bytes(f: Any, archive: zipfile.ZipFile, info: zipfile.ZipInfo, start: int = 0, length: int | None = None) -> bytes:
    """Bytes ``[start, start + length)`` of a zip member; a stored member is read in place, without its CRC.

    torch writes members uncompressed, and ckptctl saves without the zip CRC (its own
    checksum covers the file), which :mod:`zipfile` would reject: the bytes are read at
    their offset instead (``zipfile`` checks the CRC of a compressed member as usual).
    """
    length = info.file_size - start if length is None else length
    if info.compress_type != zipfile.ZIP_STORED:
        return archive.read(info)[start : start + length]
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len + start)
    return f.read(max(0, min(length, info.file_size - start)))


def read_record(path: str | os.PathLike, max_bytes: int = MAX_RECORD_BYTES) -> TorchRecord:
    """Read the object tree of a ``torch.save`` zip file without torch (see the module docstring).

    Raises :class:`RecordUnavailable` for anything else: not a regular file, not a torch
    zip file, a record over ``max_bytes``, or a record that does not unpickle.
    """
    path = Path(path)
    try:
        with os.fdopen(open_regular(path), "rb") as f, zipfile.ZipFile(f) as archive:
            names = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(names) != 1:
                raise RecordUnavailable(f"{path.name}: not a torch checkpoint archive")
            info = archive.getinfo(names[0])
            if info.file_size > max_bytes:
                raise RecordUnavailable(f"{path.name}: record of {info.file_size} bytes is over the {max_bytes}-byte limit")
            raw = _member_bytes(f, archive, info)
            prefix = names[0][: -len("data.pkl")]
            order = _member_bytes(f, archive, archive.getinfo(prefix + "byteorder")) if prefix + "byteorder" in archive.namelist() else b"little"
    except RecordUnavailable:
        raise
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError, EOFError) as exc:
        raise RecordUnavailable(f"{path.name}: {exc.__class__.__name__}: {exc}") from None
    try:
        obj = _RecordUnpickler(io.BytesIO(raw), encoding="utf-8").load()
    except Exception as exc:  # any damage in the pickle stream: no record, never a crash
        raise RecordUnavailable(f"{path.name}: record does not unpickle ({exc.__class__.__name__})") from None
    return TorchRecord(obj, path, prefix, order.strip() != b"big")


#: NumPy's dtype codes (``numpy.dtype('f8')``) of the scalars :func:`scalar_value` decodes, as struct formats.
_NUMPY_CODES = {"f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b", "u8": "Q", "u4": "I", "u2": "H", "u1": "B", "b1": "?"}


def _numpy_scalar(value: Opaque) -> float | int | bool | None:
    """A pickled NumPy scalar (``numpy.core.multiarray.scalar(dtype, bytes)``) decoded from its bytes, else None."""
    if not value.global_name.endswith("multiarray.scalar") or len(value.args) < 2:
        return None
    dtype, data = value.args[0], value.args[1]
    if not isinstance(dtype, Opaque) or not dtype.args or not isinstance(data, bytes):
        return None
    fmt = _NUMPY_CODES.get(str(dtype.args[0]))
    state = dtype.state if isinstance(dtype.state, tuple) else ()
    endian = ">" if len(state) > 1 and state[1] == ">" else "<"
    if fmt is None or struct.calcsize(fmt) != len(data):
        return None
    return struct.unpack(endian + fmt, data)[0]


def scalar_value(record: TorchRecord, value: Any) -> float | int | bool | None:
    """``value`` as a plain number: itself when it is one, a NumPy scalar or one-element tensor's value (read from the archive), else None."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return value
    if isinstance(value, Opaque):
        return _numpy_scalar(value)
    if not isinstance(value, TensorRef) or value.numel != 1 or not isinstance(value.storage, StorageRef):
        return None
    element = _ELEMENTS.get(value.dtype or value.storage.element)
    if element is None:
        return None
    fmt, width = element
    try:
        with os.fdopen(open_regular(record.path), "rb") as f, zipfile.ZipFile(f) as archive:
            data = _member_bytes(f, archive, archive.getinfo(f"{record.prefix}data/{value.storage.key}"), value.offset * width, width)
    except (OSError, KeyError, zipfile.BadZipFile, ValueError, RuntimeError, EOFError):
        return None
    if len(data) != width:
        return None
    endian = "<" if record.little_endian else ">"
    if fmt == "bf16":  # the upper half of a float32
        data = (b"\0\0" + data) if record.little_endian else (data + b"\0\0")
        fmt = "f"
    return struct.unpack(endian + fmt, data)[0]
