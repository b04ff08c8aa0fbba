"""The torch side of sharded state: ``torch.distributed.checkpoint`` (DCP) with ckptctl's packs as its storage.

DCP does what it is good at: planning which rank writes which chunk of each DTensor
(replicated chunks once), and resharding on load to any world size or to plain tensors in
one process. :class:`PackWriter` and :class:`PackReader` are its storage (the documented
``StorageWriter``/``StorageReader`` extension points): each rank writes its chunks as one
checksummed pack, and the metadata goes back to ckptctl as plain data (the record of
:mod:`ckptctl.core.sharded`), which the writer commits in the checkpoint's skeleton.

The training thread only splits the state (:func:`split_sharded`) and copies each rank's
local chunks into reusable CPU buffers (:func:`stage_shards`); :func:`save_shards` runs on
each rank's background worker, collective over a process group of its own.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ckptctl.core.sharded import RECORD_VERSION, SHARD_REF_KEY, SHARDED_KEY, check_record, fqn_of
from ckptctl.errors import CheckpointIntegrityError, CkptctlError, RestoreStateError
from ckptctl.packs_io import DTYPE_NAMES, TORCH_DTYPES, map_pack, tensor_data, tensor_key
from ckptctl.storage.objects import write_pack
from ckptctl.tensors import map_nested


def _dcp() -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp


def is_sharded(value: Any) -> bool:
    """True for a DTensor (FSDP2 parameters and their optimizer states, tensor parallel)."""
    module = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists (and none is imported for this)
    return module is not None and isinstance(value, module.DTensor)


def split_sharded(states: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``states`` with every DTensor replaced by a reference, and those DTensors by fqn (none: an empty dict)."""
    found: dict[str, Any] = {}

    def cut(value: Any, path: tuple) -> tuple[bool, Any]:
        if not is_sharded(value):
            return False, None
        fqn = fqn_of(path)
        found[fqn] = value
        return True, {SHARD_REF_KEY: fqn}

    tree = {name: map_nested(state, cut, (name,)) for name, state in states.items()}
    return tree, found


@dataclass
class StagedShard:
    """One rank's chunk of a DTensor, copied to the CPU: what DCP plans and writes in its place.

    It implements DCP's checkpointable protocol (the dunder methods DTensor implements), so
    the write needs no device mesh and no collective of the tensor's own device.
    """

    local: torch.Tensor
    offsets: torch.Size
    global_size: torch.Size

    def __create_write_items__(self, fqn: str, obj: Any) -> list[Any]:
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        chunk = self.__create_chunk_list__()[0]
        data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=self.local.dtype), size=self.global_size)
        return [WriteItem(index=MetadataIndex(fqn, self.offsets), type=WriteItemType.SHARD, tensor_data=data)]

    def __create_chunk_list__(self) -> list[Any]:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=self.offsets, sizes=self.local.shape)]

    def __get_tensor_shard__(self, index: Any) -> torch.Tensor:
        return self.local


def stage_shards(stage: Any, shards: Mapping[str, Any]) -> dict[str, StagedShard]:
    """Each DTensor's local chunk through ``stage(tensor, key)`` (a :class:`~ckptctl.torch_io.Stager`'s copy, or as it is)."""
    staged = {}
    for fqn, dtensor in shards.items():
        if dtensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"sharded tensor {fqn} has dtype {dtensor.dtype}, which ckptctl cannot store")
        chunk = dtensor.__create_chunk_list__()[0]
        local = stage(dtensor.to_local(), ("__shard__", fqn))
        staged[fqn] = StagedShard(local, torch.Size(chunk.offsets), dtensor.shape)
    return staged


class PackWriter:
    """DCP storage writer: this rank's chunks into one pack of ``run_dir``; the coordinator keeps the record."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        #: The record (set on the coordinator by :meth:`finish`).
        self.record: dict[str, Any] | None = None

    # DCP's StorageWriter interface (duck-typed; see torch.distributed.checkpoint.StorageWriter)
    def reset(self, checkpoint_id: Any = None) -> None:
        """Nothing to reset: every save makes a new writer."""

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Nothing to set up: packs name themselves."""

    def prepare_local_plan(self, plan: Any) -> Any:
        """This rank's plan, unchanged."""
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        """Every rank's plan, unchanged."""
        return plans

    def storage_meta(self) -> Any:
        """No storage metadata: the record is kept by ckptctl."""
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        """Any id: ckptctl names its checkpoints itself."""
        return True

    def write_data(self, plan: Any, planner: Any) -> Any:
        """Write this rank's chunks (tensors only) as one pack; each result names the pack and the chunk's key."""
        from torch.distributed.checkpoint.planner import WriteItemType
        from torch.distributed.checkpoint.storage import WriteResult

        keyed = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise CkptctlError(f"sharded saves hold tensors only; {item.index.fqn} is not one")
            tensor = planner.resolve_data(item).detach().to("cpu").contiguous()
            dtype, shape, data = DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), tensor_data(tensor)
            keyed.append((item, tensor_key(dtype, shape, data), dtype, shape, data))
        unique = {key: (key, dtype, shape, data) for _, key, dtype, shape, data in keyed}
        if not self.run_dir.is_dir():
            raise CkptctlError(
                f"{self.run_dir}: this rank cannot see the run folder: sharded saves need it on a filesystem every rank shares"
            )
        name, size = write_pack(self.run_dir, list(unique.values())) if unique else (None, 0)
        results = [
            WriteResult(index=item.index, size_in_bytes=len(data), storage_data={"pack": name, "key": key, "pack_size": size})
            for item, key, _, _, data in keyed
        ]
        done = torch.futures.Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        """On the coordinator: every rank's results and DCP's metadata become the record."""
        self.record = record_of(metadata, results)


def record_of(metadata: Any, results: list[list[Any]]) -> dict[str, Any]:
    """The plain-data record of a save (see :mod:`ckptctl.core.sharded`) from DCP's metadata and write results."""
    where = {result.index: result.storage_data for rank_results in results for result in rank_results}
    tensors, packs = {}, {}
    for fqn, md in metadata.state_dict_metadata.items():
        chunks = []
        for chunk in md.chunks:
            stored = where[_index(fqn, chunk.offsets)]
            packs[stored["pack"]] = int(stored["pack_size"])
            chunks.append({"offsets": list(chunk.offsets), "sizes": list(chunk.sizes), "pack": stored["pack"], "key": stored["key"]})
        tensors[fqn] = {"dtype": DTYPE_NAMES[md.properties.dtype], "size": list(md.size), "chunks": chunks}
    return {"version": RECORD_VERSION, "tensors": tensors, "packs": packs}


def _index(fqn: str, offsets: Any) -> Any:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(fqn, torch.Size(offsets))


def _save_planner() -> Any:
    """DCP's default save planner, looking up a staged chunk (its documented ``lookup_object`` extension)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class StagedSavePlanner(DefaultSavePlanner):
        def lookup_object(self, index: Any) -> Any:
            obj = self.state_dict.get(index.fqn)
            return obj.local if isinstance(obj, StagedShard) else super().lookup_object(index)

    return StagedSavePlanner()


def save_shards(run_dir: str | os.PathLike, staged: Mapping[str, StagedShard], process_group: Any = None) -> dict[str, Any] | None:
    """Collective: every rank writes its chunks through DCP; returns the record on the coordinator (rank 0), else None."""
    writer = PackWriter(run_dir)
    try:
        _dcp().save(dict(staged), storage_writer=writer, planner=_save_planner(), process_group=process_group)
    except _DCP_FAILURES() as exc:
        rank, cause = _first_failure(exc)
        if rank is None:
            raise
        detail = str(cause) if isinstance(cause, CkptctlError) else f"{type(cause).__name__}: {str(cause).splitlines()[0][:300]}"
        raise CkptctlError(f"sharded save failed on rank {rank}: {detail}") from None
    return writer.record


class PackReader:
    """DCP storage reader: the chunks of a record, memory-mapped from the run's packs."""

    def __init__(self, run_dir: str | os.PathLike, record: Mapping[str, Any], label: str):
        self.run_dir = Path(run_dir)
        self.label = label
        self.record = record
        self._packs: dict[str, dict[str, torch.Tensor]] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        """Nothing to reset: every load makes a new reader."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        """Any id: the record says what to read."""
        return True

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """DCP's metadata, rebuilt from the record (never unpickled)."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorProperties, TensorStorageMetadata

        state, where = {}, {}
        for fqn, spec in self.record["tensors"].items():
            chunks = [ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"])) for c in spec["chunks"]]
            props = TensorProperties(dtype=TORCH_DTYPES[spec["dtype"]])
            state[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(spec["size"]), chunks=chunks)
            for c in spec["chunks"]:
                where[_index(fqn, c["offsets"])] = (c["pack"], c["key"], tuple(c["sizes"]), spec["dtype"])
        return Metadata(state_dict_metadata=state, storage_data=where)

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Keep where each chunk is."""
        self._where = metadata.storage_data

    def prepare_local_plan(self, plan: Any) -> Any:
        """This rank's plan, unchanged."""
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        """Every rank's plan, unchanged."""
        return plans

    def read_data(self, plan: Any, planner: Any) -> Any:
        """Copy each planned piece of a stored chunk into its place in the caller's tensors."""
        for item in plan.items:
            stored = self._chunk(*self._where[item.storage_index])
            for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                stored = stored.narrow(dim, start, length)
            target = planner.resolve_tensor(item).detach()
            if target.shape != stored.shape:
                raise CheckpointIntegrityError(f"{self.label}: chunk of {item.storage_index.fqn} does not fit its place")
            target.copy_(stored)
            planner.commit_tensor(item, target)
        done = torch.futures.Future()
        done.set_result(None)
        return done

    def _chunk(self, pack: str, key: str, sizes: tuple[int, ...], dtype: str) -> torch.Tensor:
        if pack not in self._packs:
            self._packs[pack] = map_pack(self.run_dir, pack)
        tensor = self._packs[pack].get(key)
        if tensor is None or tuple(tensor.shape) != sizes or tensor.dtype != TORCH_DTYPES[dtype]:
            raise CheckpointIntegrityError(f"{self.label}: shard pack {pack} lacks a chunk the record names ({key})")
        return tensor


def sharded_record(label: str, payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checked record of a skeleton, or None when it holds no sharded state; a bad record is ``corrupt``."""
    record = payload.get(SHARDED_KEY)
    if record is None:
        return None
    problem = check_record(record, payload.get("objects") or [])
    if problem is not None:
        raise CheckpointIntegrityError(f"{label}: {problem}")
    return record


def load_shards(
    run_dir: str | os.PathLike, record: Mapping[str, Any], targets: Mapping[str, torch.Tensor], label: str, *, process_group: Any = None, no_dist: bool = False
) -> None:
    """Fill ``targets`` (fqn -> tensor or DTensor of any sharding) from the record's chunks, through DCP's resharding.

    Collective over ``process_group`` unless ``no_dist`` (one process filling plain tensors).
    """
    try:
        _dcp().load(dict(targets), storage_reader=PackReader(run_dir, record, label), process_group=process_group, no_dist=no_dist)
    except CheckpointIntegrityError:
        raise
    except _DCP_FAILURES() as exc:
        cause = _root_cause(exc)
        if isinstance(cause, (CheckpointIntegrityError, RestoreStateError)):
            raise cause from None
        raise RestoreStateError(f"{label}: cannot load sharded state: {type(cause).__name__}: {str(cause).splitlines()[0][:300]}") from None


def _DCP_FAILURES() -> tuple[type[BaseException], ...]:  # noqa: N802 (used as an exception tuple)
    """What a DCP call raises: DCP's CheckpointException is a BaseException (each rank's failure inside), and any Exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _root_cause(exc: BaseException) -> BaseException:
    """The first failure inside DCP's wrapper exception (a CheckpointException holds each rank's)."""
    return _first_failure(exc)[1]


def _first_failure(exc: BaseException) -> tuple[int | None, BaseException]:
    """``(rank, exception)`` of the lowest rank's failure inside DCP's CheckpointException; ``(None, exc)`` for any other."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, Mapping) and failures:
        rank = min(failures)
        first = failures[rank]
        return rank, first[0] if isinstance(first, tuple) else first
    return None, exc


def unshard(run_dir: str | os.PathLike, payload: dict[str, Any], label: str) -> dict[str, Any]:
    """``payload`` with every sharded reference replaced by the whole tensor, read in this one process (CPU)."""
    record = sharded_record(label, payload)
    if record is None:
        return payload
    full = {fqn: torch.empty(spec["size"], dtype=TORCH_DTYPES[spec["dtype"]]) for fqn, spec in record["tensors"].items()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        load_shards(run_dir, record, full, label, no_dist=True)
    out = fill_references(payload, full, label)
    del out[SHARDED_KEY]
    return out


def fill_references(tree: Any, tensors: Mapping[str, torch.Tensor], label: str) -> Any:
    """``tree`` with each sharded reference replaced by its tensor in ``tensors``."""

    def fill(value: Any, _path: tuple) -> tuple[bool, Any]:
        if not (isinstance(value, dict) and SHARD_REF_KEY in value):
            return False, None
        tensor = tensors.get(value[SHARD_REF_KEY])
        if tensor is None:
            raise CheckpointIntegrityError(f"{label}: references sharded tensor {value[SHARD_REF_KEY]!r} that its record lacks")
        return True, tensor

    return map_nested(tree, fill)


def references_of(tree: Any) -> list[tuple[tuple, str]]:
    """Every sharded reference in ``tree``: (its path, its fqn)."""
    found: list[tuple[tuple, str]] = []

    def visit(value: Any, path: tuple) -> tuple[bool, Any]:
        if isinstance(value, dict) and SHARD_REF_KEY in value:
            found.append((path, value[SHARD_REF_KEY]))
            return True, value
        return False, None

    map_nested(tree, visit)
    return found
