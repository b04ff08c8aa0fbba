"""Sharded state (FSDP2, DTensor) under ``torch.distributed``: every rank's part of a save and of a load.

A sharded save is collective like every other call, but every rank writes: after rank 0 has
queued its job (which ends in the commit of the index, see
:meth:`ckptctl.api.saving.Saver.save`), each other rank copies its local chunks into its own
reusable CPU buffers and queues :func:`ckptctl.sharded_io.save_shards` on its own
background worker. The workers meet in DCP's collectives over a gloo group of their own
(:attr:`ckptctl.api.distributed.Ranks.shard_group`), never training's. Every rank writes
into the run's ``objects/``: sharded saves need the run folder on a filesystem every rank
shares (rank 0 refuses to commit a checkpoint whose shard packs it cannot see).

A load reads the checkpoint's skeleton on rank 0 (checked, sharded tensors left as
references) and broadcasts it; then every rank fills its components' tensors of any
sharding (or plain ones) through DCP's resharding (:meth:`ShardSide.fill`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ckptctl.api.background import BackgroundWorker
from ckptctl.api.distributed import Ranks
from ckptctl.core.sharded import SHARDED_KEY
from ckptctl.errors import CkptctlError, RestoreStateError
from ckptctl.sharded_io import fill_references, load_shards, references_of, save_shards, stage_shards
from ckptctl.storage.objects import pack_path
from ckptctl.torch_io import Stager


class ShardSide:
    """This rank's sharded saves (a rank other than 0: its own worker and staging buffers) and loads."""

    def __init__(self, run_dir: Path, ranks: Ranks, background: bool):
        self.run_dir = run_dir
        self.ranks = ranks
        self.worker = BackgroundWorker(background) if not ranks.is_writer else None
        self.stager = Stager()

    def submit(self, shards: Mapping[str, Any]) -> None:
        """A rank other than 0: stage this rank's chunks and queue their write (DCP, collective with the other workers)."""
        self.worker.wait_for_staging_buffers()
        staged = stage_shards(self.stager.stage, shards)
        self.worker.hold_staging(self.worker.submit(save_shards, self.run_dir, staged, self.ranks.shard_group))

    def raise_error(self) -> None:
        """Raise this rank's first failed shard write (nothing on rank 0, whose writes are its saver's)."""
        if self.worker is not None:
            self.worker.raise_error()

    def flush(self) -> None:
        """Wait for this rank's pending shard writes; raise the first failure."""
        if self.worker is not None:
            self.worker.flush()

    def shutdown(self) -> None:
        """Stop this rank's worker thread."""
        if self.worker is not None:
            self.worker.shutdown(wait=True)

    def fill(self, payload: Mapping[str, Any], components: Mapping[str, Any], label: str) -> dict[str, Any]:
        """Collective: ``payload`` with the sharded tensors of ``components`` read into tensors shaped like theirs.

        Each target takes its sharding from the component's current state (an FSDP2 module's
        DTensors, or plain tensors: DCP reshards either way); an optimizer that has not
        stepped yet gets its states shaped like its parameters.
        """
        record = payload[SHARDED_KEY]
        targets = {}
        for name, component in components.items():
            refs = [(path, fqn) for path, fqn in references_of({name: payload.get(name)}) if fqn in record["tensors"]]
            if refs:
                current = component.state_dict()
                targets.update({fqn: _target(component, current, path[1:], record["tensors"][fqn], fqn) for path, fqn in refs})
        load_shards(self.run_dir, record, targets, label, process_group=self.ranks.shard_group)
        filled = fill_references({k: v for k, v in payload.items() if k in components}, targets, label)
        return {**payload, **filled}


def _target(component: Any, current: Any, path: tuple, spec: Mapping[str, Any], fqn: str) -> torch.Tensor:
    """An empty tensor to load sharded tensor ``fqn`` into: like the component's tensor at ``path``."""
    from ckptctl.packs_io import TORCH_DTYPES

    like = _at(current, path)
    if like is None and isinstance(component, torch.optim.Optimizer) and len(path) == 3 and path[0] == "state":
        params = [p for group in component.param_groups for p in group["params"]]
        like = params[path[1]] if isinstance(path[1], int) and path[1] < len(params) else None
    if not isinstance(like, torch.Tensor) or list(like.shape) != list(spec["size"]):
        raise RestoreStateError(f"cannot load sharded tensor {fqn}: the component has no tensor of shape {spec['size']} there")
    return torch.empty_like(like, dtype=TORCH_DTYPES[spec["dtype"]])


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        if isinstance(tree, Mapping) and key in tree:
            tree = tree[key]
        elif isinstance(tree, (list, tuple)) and isinstance(key, int) and key < len(tree):
            tree = tree[key]
        else:
            return None
    return tree


def check_shard_packs(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Rank 0, before the commit: every rank's shard pack is here (the run folder is shared), of its size."""
    for name, size in record["packs"].items():
        path = pack_path(run_dir, name)
        try:
            found = path.stat().st_size
        except OSError:
            found = None
        if found != size:
            raise CkptctlError(
                f"{run_dir}: a shard pack another rank wrote is not in this run folder ({path.name}): "
                "sharded saves need the run folder on a filesystem every rank shares"
            )
