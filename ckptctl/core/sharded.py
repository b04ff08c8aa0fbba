"""Sharded state (FSDP2, DTensor) in a checkpoint: the record that describes it, and its checks. Pure: no IO.

A sharded save goes through ``torch.distributed.checkpoint`` (DCP): DCP plans which rank
writes which chunk of each tensor and reshards on load; ckptctl is its storage. Each rank
writes its chunks as one ordinary pack (``objects/<xxh3>.safetensors``, see
:mod:`ckptctl.core.objects`), and the writer keeps DCP's metadata, as plain data, in the
checkpoint's skeleton under :data:`SHARDED_KEY`::

    {"version": 1,
     "tensors": {<fqn>: {"dtype": "F32", "size": [1024, 512],
                         "chunks": [{"offsets": [0, 0], "sizes": [512, 512], "pack": <name>, "key": <key>}, ...]}},
     "packs": {<name>: <size>}}

and every sharded tensor in the skeleton's tree is ``{SHARD_REF_KEY: <fqn>}``. So the packs
of every rank are listed in the skeleton's and the index's ``objects``: checksums, verify,
retention, the Drive mirror, restore and ``ls`` treat them as any other pack, and nothing
is pickled (DCP's own ``.metadata`` file is a pickle, and its loader unpickles
non-tensor items with ``weights_only=False``; neither is used here).

An ``fqn`` is the JSON text of the tensor's path in the payload (``["agent", "0.weight"]``).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from ckptctl.core.objects import DTYPE_SIZES, is_pack_name

#: The skeleton's top-level key holding the record.
SHARDED_KEY = "sharded"
#: Marks a sharded tensor inside a skeleton's tree.
SHARD_REF_KEY = "__ckptctl_sharded__"
RECORD_VERSION = 1
#: A record with more tensors or chunks than this is refused (a hostile file could claim millions).
MAX_RECORD_ITEMS = 10_000_000


def fqn_of(path: Iterable[Any]) -> str:
    """The name DCP knows a sharded tensor by: the JSON text of its path (``'["agent", "0.weight"]'``)."""
    return json.dumps(list(path))


def record_packs(record: Mapping[str, Any]) -> dict[str, int]:
    """The packs a record's chunks live in, name -> size (none for a malformed record: :func:`check_record` says why)."""
    packs = record.get("packs")
    return dict(packs) if isinstance(packs, Mapping) else {}


def record_bytes(record: Mapping[str, Any]) -> int:
    """Bytes of the sharded state a record describes (each tensor once, whatever its chunks)."""
    return sum(_numel(spec["size"]) * DTYPE_SIZES[spec["dtype"]] for spec in record["tensors"].values())


def _numel(size: Iterable[int]) -> int:
    n = 1
    for dim in size:
        n *= dim
    return n


def check_record(record: Any, listed_packs: Iterable[str]) -> str | None:
    """Why ``record`` is not a sound description of sharded state whose packs are ``listed_packs``, or None.

    Checks the shape of the data, that every chunk's pack is listed, and that each
    tensor's chunks lie inside it and cover it exactly once (DCP's metadata checks).
    """
    if not isinstance(record, Mapping) or record.get("version") != RECORD_VERSION:
        return "sharded record of an unknown version"
    tensors, packs = record.get("tensors"), record.get("packs")
    if not isinstance(tensors, Mapping) or not isinstance(packs, Mapping):
        return "malformed sharded record"
    if not all(is_pack_name(p) and isinstance(s, int) and s >= 0 for p, s in packs.items()):
        return "malformed list of shard packs"
    listed = set(listed_packs)
    if not set(packs) <= listed:
        return "a shard pack is not listed among the checkpoint's objects"
    if len(tensors) > MAX_RECORD_ITEMS:
        return "sharded record too large"
    for fqn, spec in tensors.items():
        problem = _check_tensor(spec, set(packs))
        if problem is not None:
            return f"sharded tensor {fqn}: {problem}"
    return None


def _is_dims(value: Any, rank: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
        and (rank is None or len(value) == rank)
    )


def _check_tensor(spec: Any, packs: set[str]) -> str | None:
    if not isinstance(spec, Mapping) or spec.get("dtype") not in DTYPE_SIZES or not _is_dims(spec.get("size")):
        return "malformed entry"
    size, chunks = spec["size"], spec.get("chunks")
    if not isinstance(chunks, list) or len(chunks) > MAX_RECORD_ITEMS:
        return "malformed chunks"
    boxes = []
    for chunk in chunks:
        if not isinstance(chunk, Mapping) or not _is_dims(chunk.get("offsets"), len(size)) or not _is_dims(chunk.get("sizes"), len(size)):
            return "malformed chunk"
        if chunk.get("pack") not in packs or not isinstance(chunk.get("key"), str):
            return "a chunk names a pack the record does not list"
        if any(o + s > d for o, s, d in zip(chunk["offsets"], chunk["sizes"], size)):
            return "a chunk lies outside the tensor"
        boxes.append((chunk["offsets"], chunk["sizes"]))
    if sum(_numel(s) for _, s in boxes) != _numel(size) or _any_overlap(boxes):
        return "its chunks do not cover it exactly once"
    return None


def _any_overlap(boxes: list[tuple[list[int], list[int]]]) -> bool:
    """True when two non-empty chunks share an element (chunks per tensor are one per rank: pairwise is cheap)."""
    solid = [(o, s) for o, s in boxes if _numel(s) > 0]
    for i, (oa, sa) in enumerate(solid):
        for ob, sb in solid[i + 1 :]:
            if all(a < b + lb and b < a + la for a, la, b, lb in zip(oa, sa, ob, sb)):
                return True
    return False
