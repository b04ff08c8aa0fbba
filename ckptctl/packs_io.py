"""The torch side of format 2: a payload's tensors into content-addressed packs, and back, memory-mapped.

Same layer as :mod:`ckptctl.torch_io` (it imports torch); the layout is in
:mod:`ckptctl.core.objects`, the files in :mod:`ckptctl.storage.objects`.

:func:`deduplicate` runs on the background worker (hashing costs training no stall): it
keys every tensor by the hash of its dtype, shape and bytes, writes the tensors the run
does not hold yet as one pack, and returns the *skeleton* (the payload with references
in place of tensors) that is saved as the checkpoint file. :func:`resolve_objects` is the
way back: each pack is memory-mapped (private, copy-on-write) and every reference becomes
a view of it, so loading costs no memory beyond the pages touched.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ckptctl.core.format import CHECKPOINT_DIR
from ckptctl.core.objects import DTYPE_SIZES, OBJECT_REF_KEY, OBJECTS_DIR, is_pack_name
from ckptctl.core.sharded import SHARDED_KEY, record_bytes, record_packs
from ckptctl.errors import CheckpointIntegrityError
from ckptctl.storage.atomic import new_hasher, open_regular, read_failure
from ckptctl.storage.objects import PackChecks, PackTable, pack_path, read_pack_header, write_pack
from ckptctl.tensors import map_nested

#: torch dtypes a pack can hold -> their safetensors names (and back, :data:`TORCH_DTYPES`).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_NAMES[getattr(torch, _name)] = _code
TORCH_DTYPES = {code: dtype for dtype, code in DTYPE_NAMES.items()}
assert set(TORCH_DTYPES) <= set(DTYPE_SIZES)


def packable(value: Any) -> bool:
    """True for a tensor a pack can hold: a plain dense tensor of a dtype safetensors names (others stay in the skeleton)."""
    return (
        type(value) in (torch.Tensor, torch.nn.Parameter)
        and value.layout == torch.strided
        and not value.is_quantized
        and value.dtype in DTYPE_NAMES
    )


def tensor_data(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` in C order (no copy for a contiguous CPU tensor)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_key(dtype: str, shape: tuple[int, ...], data: memoryview) -> str:
    """The content key of a tensor: xxh3_128 of its dtype, shape and bytes."""
    hasher = new_hasher("xxh3_128")
    hasher.update(f"{dtype}|{','.join(map(str, shape))}|".encode())
    hasher.update(data)
    return hasher.hexdigest()


@dataclass(frozen=True)
class Deduplicated:
    """A payload split for saving: the skeleton to write as the checkpoint file and what it references."""

    skeleton: dict[str, Any]
    #: Every pack the skeleton references, name -> size.
    objects: dict[str, int]
    #: The packs this save wrote (none when the run held every tensor already).
    new_packs: tuple[str, ...]
    #: Bytes of the tensors the skeleton references (what a load maps).
    tensor_bytes: int


#: Payload subtrees whose tensors stay in the skeleton: RNG states are a few kB, new with
#: every save where they are used, and one that never changes (an RNG the loop never draws
#: from) would otherwise keep the pack of the save that first stored it for the whole run.
INLINE_SUBTREES = {("rng",), ("rng_ranks",)}


def deduplicate(
    run_dir: str | os.PathLike, payload: Mapping[str, Any], table: PackTable, stable: frozenset[tuple] = frozenset()
) -> Deduplicated:
    """Write the tensors of ``payload`` that ``table`` does not know as packs; return the skeleton and its references.

    ``stable`` holds the paths (``("agent", "base.weight")``) of tensors expected never to
    change (frozen parameters): new ones go to a pack of their own, so the pack holding the
    trained state of this save is deleted with the last checkpoint that references it,
    instead of staying as long as the frozen weights do. ``table`` learns each new pack at
    once (the caller forgets it if the pack is deleted before a checkpoint references it).
    """
    items: dict[str, tuple[str, tuple[int, ...], memoryview]] = {}
    keys: dict[int, str] = {}
    stable_keys: set[str] = set()
    for path, tensor in _packable_tensors(payload):
        if path[:1] in INLINE_SUBTREES:
            continue  # stays in the skeleton (see INLINE_SUBTREES)
        if id(tensor) not in keys:
            dtype, shape = DTYPE_NAMES[tensor.dtype], tuple(tensor.shape)
            data = tensor_data(tensor)
            keys[id(tensor)] = tensor_key(dtype, shape, data)
            items.setdefault(keys[id(tensor)], (dtype, shape, data))
        if path in stable:
            stable_keys.add(keys[id(tensor)])
    new = [key for key in items if key not in table.pack_of]
    new_packs = []
    for group in ([k for k in new if k in stable_keys], [k for k in new if k not in stable_keys]):
        if group:
            name, size = write_pack(run_dir, [(key, *items[key]) for key in group])
            table.add(name, group, size)
            new_packs.append(name)
    skeleton = map_nested(payload, lambda value, _: _reference(value, keys, table))
    objects = {table.pack_of[key]: table.size_of[table.pack_of[key]] for key in items}
    tensor_bytes = sum(len(data) for _, _, data in items.values())
    record = payload.get(SHARDED_KEY)
    if record is not None:  # sharded state: its packs were written by every rank through DCP (ckptctl.sharded_io)
        objects.update(record_packs(record))
        tensor_bytes += record_bytes(record)
    skeleton["objects"] = sorted(objects)
    return Deduplicated(skeleton, objects, tuple(new_packs), tensor_bytes)


def _packable_tensors(payload: Any) -> list[tuple[tuple, torch.Tensor]]:
    found: list[tuple[tuple, torch.Tensor]] = []

    def visit(value: Any, path: tuple) -> tuple[bool, Any]:
        if packable(value):
            found.append((path, value))
            return True, value
        return False, None

    map_nested(payload, visit)
    return found


def frozen_paths(components: Mapping[str, Any]) -> frozenset[tuple]:
    """Payload paths of the module components' tensors that may never change: frozen parameters and buffers.

    ``{("agent", "base.weight"), ...}``. A buffer that does change (batch-norm statistics)
    only goes to a pack of its own each save; one that never does (a constant table) must not
    sit in the pack of the trained state, which would then live as long as the run.
    """
    paths = set()
    for name, component in components.items():
        if isinstance(component, torch.nn.Module):
            paths.update((name, key) for key, param in component.named_parameters() if not param.requires_grad)
            paths.update((name, key) for key, _ in component.named_buffers())
    return frozenset(paths)


def _reference(value: Any, keys: Mapping[int, str], table: PackTable) -> tuple[bool, Any]:
    key = keys.get(id(value)) if packable(value) else None
    if key is None:
        return False, None
    return True, {OBJECT_REF_KEY: key, "pack": table.pack_of[key]}


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run a checkpoint file belongs to: the parent of ``checkpoints/``, else the file's folder (``best_model.pt``)."""
    path = Path(path)
    return path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent


def references_objects(payload: Mapping[str, Any]) -> bool:
    """True for a format-2 skeleton (its tensors live in packs)."""
    return isinstance(payload.get("objects"), list)


def check_objects(path: str | os.PathLike, payload: Mapping[str, Any], checks: PackChecks) -> None:
    """Checksum every pack the skeleton at ``path`` references (each once per ``checks``); raise on the first bad one."""
    run_dir = run_dir_of(path)
    for name in _pack_names(path, payload):
        checks.check(run_dir, name)


def _pack_names(path: str | os.PathLike, payload: Mapping[str, Any]) -> list[str]:
    names = payload.get("objects")
    if not isinstance(names, list) or not all(is_pack_name(n) for n in names):
        raise CheckpointIntegrityError(f"{Path(path).name}: malformed list of objects")
    return names


def resolve_objects(path: str | os.PathLike, payload: dict[str, Any], device: Any = "cpu", *, unshard: bool = True) -> dict[str, Any]:
    """The full payload of the skeleton ``payload`` read from ``path``: every reference replaced by its tensor.

    Packs are memory-mapped privately (writes to a loaded tensor never reach the file) from
    the run's ``objects/``; a missing pack or a reference to a tensor a pack lacks raises
    :class:`CheckpointIntegrityError` naming the shared object. A format-1 payload is returned as it is.
    Sharded state (FSDP2) is read whole in this process (:func:`ckptctl.sharded_io.unshard`),
    or with ``unshard=False`` left as references and its record (checked) for a collective load.
    """
    if not references_objects(payload):
        return payload
    run_dir = run_dir_of(path)
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    shard_packs = set(record_packs(payload[SHARDED_KEY])) if isinstance(payload.get(SHARDED_KEY), Mapping) else set()
    for name in _pack_names(path, payload):
        if name not in shard_packs:  # sharded state's packs are read by DCP's reader (ckptctl.sharded_io), once
            tensors.update(((name, key), t) for key, t in map_pack(run_dir, name).items())
    move = torch.device(device) if device is not None else torch.device("cpu")
    handed_out: set[tuple[str, str]] = set()

    def resolve(value: Any, _key: tuple) -> tuple[bool, Any]:
        if not (isinstance(value, dict) and OBJECT_REF_KEY in value):
            return False, None
        ref = (value.get("pack"), value.get(OBJECT_REF_KEY))
        tensor = tensors.get(ref)
        if tensor is None:
            raise CheckpointIntegrityError(f"{Path(path).name}: references tensor {ref[1]!r} that no listed object holds")
        if ref in handed_out:  # equal tensors (two optimizer steps of 1.0...) must not share memory once loaded
            tensor = tensor.clone()
        handed_out.add(ref)
        return True, tensor if move.type == "cpu" else tensor.to(move)

    full = map_nested(payload, resolve)
    if SHARDED_KEY in full:
        from ckptctl import sharded_io

        if unshard:
            full = sharded_io.unshard(run_dir, full, Path(path).name)
        else:
            sharded_io.sharded_record(Path(path).name, full)
    del full["objects"]
    return full


def map_pack(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of pack ``name``, each over its own range of one private (copy-on-write) memory map of the file.

    Each tensor has a storage of its own (``torch.frombuffer``), so a loaded payload saves
    with ``torch.save`` like any other (``export``), and writing to it never reaches the file.
    """
    path = pack_path(run_dir, name)
    label = f"{OBJECTS_DIR}/{path.name}"
    data_start, layout = read_pack_header(path)
    try:
        fd = open_regular(path)
    except OSError as exc:
        raise read_failure(label, exc) from None
    try:
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as exc:
        raise CheckpointIntegrityError(f"{label}: cannot map ({exc})") from None
    finally:
        os.close(fd)
    if len(mapped) < data_start + max((t.end for t in layout.values()), default=0):
        raise CheckpointIntegrityError(f"{label}: shorter than its header says (changed while loading?)")
    out = {}
    for key, spec in layout.items():
        dtype = TORCH_DTYPES.get(spec.dtype)
        if dtype is None:
            raise CheckpointIntegrityError(f"{label}: tensor {key!r} has a dtype this torch lacks ({spec.dtype})")
        count = (spec.end - spec.start) // DTYPE_SIZES[spec.dtype]
        if count == 0:
            out[key] = torch.empty(spec.shape, dtype=dtype)
        else:
            out[key] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + spec.start).view(spec.shape)
    return out


def objects_of(path: str | os.PathLike, skeleton: Mapping[str, Any]) -> tuple[dict[str, int], int]:
    """What the skeleton at ``path`` references: ``({pack name: pack size}, bytes of the tensors it references)``.

    For a file found on disk without an index entry (adopted on open, a best model whose
    record is rebuilt). Raises :class:`CheckpointIntegrityError` for a missing or damaged pack.
    """
    if not references_objects(skeleton):
        return {}, 0
    run_dir = run_dir_of(path)
    refs: set[tuple[str, str]] = set()

    def collect(value: Any, _key: tuple) -> tuple[bool, Any]:
        if isinstance(value, dict) and OBJECT_REF_KEY in value:
            refs.add((value.get("pack"), value.get(OBJECT_REF_KEY)))
            return True, value
        return False, None

    map_nested(skeleton, collect)
    packs, layouts = {}, {}
    for name in _pack_names(path, skeleton):
        pack = pack_path(run_dir, name)
        _, layouts[name] = read_pack_header(pack)
        packs[name] = pack.stat().st_size
    tensor_bytes = 0
    for name, key in refs:
        spec = layouts.get(name, {}).get(key)
        if spec is None:
            raise CheckpointIntegrityError(f"{Path(path).name}: references tensor {key!r} that no listed object holds")
        tensor_bytes += spec.end - spec.start
    record = skeleton.get(SHARDED_KEY)
    return packs, tensor_bytes + (record_bytes(record) if isinstance(record, Mapping) and _sound(path, skeleton) else 0)


def _sound(path: str | os.PathLike, skeleton: Mapping[str, Any]) -> bool:
    from ckptctl.sharded_io import sharded_record

    return sharded_record(Path(path).name, skeleton) is not None
