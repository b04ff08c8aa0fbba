"""The paired trainloop's data order and data position: where a resumed run continues.

The order of an epoch is a pure function of ``(seed, epoch)``; every checkpoint records the
position of the next batch with a fingerprint (:func:`data_position`) that resume recomputes
from the current flags and compares (:func:`fingerprint_differences`).

Under torchrun (``--parallel``) every rank walks the same order and trains on its own part of
each batch (:func:`rank_part`); its data position fingerprints that part and names its rank and
the world size, so each rank's saved position restores exactly and a resume onto another
world size is seen as a changed data layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ckptctl.arcdata import PairSet, hash_ids
from ckptctl.core.resume import DATA_POSITION_KEY

__all__ = [
    "DATA_POSITION_KEY", "FINGERPRINT_FIELDS", "order_seed", "batch_indices", "batches_per_epoch", "data_position",
    "epoch_order", "fingerprint_differences", "rank_part",
]
#: Fingerprint fields compared on resume (the position itself is where we continue).
FINGERPRINT_FIELDS = (
    "seed", "order_seed", "next_batch_ids_sha256", "dataset_size", "dataset_sha256", "batch_size", "world_size", "rank",
)
#: The value of a fingerprint field that a position saved by one process leaves out.
_SINGLE_PROCESS = {"world_size": 1, "rank": 0}


def order_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s data order: a pure function of ``(seed, epoch)``."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch (its own Generator: the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(order_seed(seed, epoch))
    return torch.randperm(n, generator=gen)


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch; the last one may be smaller."""
    return max(1, math.ceil(n / batch_size))


def batch_indices(order: torch.Tensor, batch: int, batch_size: int) -> torch.Tensor:
    """The sample indices of batch ``batch`` in the epoch order ``order``."""
    return order[batch * batch_size : (batch + 1) * batch_size]


def rank_part(index: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s part of the batch ``index``: every ``world_size``-th sample from its ``rank``-th.

    As :class:`torch.utils.data.DistributedSampler` does for a whole epoch: a batch whose size
    is not a multiple of ``world_size`` is first padded with its own first samples, so every
    rank gets the same number of samples (at least one). One process gets the whole batch.
    """
    if world_size == 1 or len(index) == 0:
        return index
    size = -(-len(index) // world_size) * world_size  # rounded up to a multiple of world_size
    padded = index.repeat(-(-size // len(index)))[:size]
    return padded[rank::world_size]


def data_position(
    train: PairSet, seed: int, batch_size: int, next_epoch: int, next_batch: int, rank: int = 0, world_size: int = 1
) -> dict[str, Any]:
    """The fingerprint of the position ``(next_epoch, next_batch)``: where training continues.

    Under torchrun it is rank ``rank``'s own: the ids of its part of the next batch, its rank
    and the world size (left out for one process, so its positions stay as they were).
    """
    order = epoch_order(len(train), seed, next_epoch)
    part = rank_part(batch_indices(order, next_batch, batch_size), rank, world_size)
    ids = [train.ids[i] for i in part.tolist()]
    ranks = {} if world_size == 1 else {"world_size": int(world_size), "rank": int(rank)}
    return {
        "next_epoch": int(next_epoch),
        "next_batch": int(next_batch),
        "seed": int(seed),
        "order_seed": order_seed(seed, next_epoch),
        "next_batch_ids_sha256": hash_ids(ids),
        "dataset_size": len(train),
        "dataset_sha256": train.sha256,
        "batch_size": int(batch_size),
        **ranks,
    }


def fingerprint_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between a saved and a recomputed data position."""
    diffs = []
    for key in FINGERPRINT_FIELDS:
        a, b = saved.get(key, _SINGLE_PROCESS.get(key)), now.get(key, _SINGLE_PROCESS.get(key))
        if a != b:
            if isinstance(a, str) and isinstance(b, str) and len(a) > 16:
                a, b = a[:12] + "…", b[:12] + "…"
            diffs.append(f"{key}: checkpoint {a}, now {b}")
    return diffs

