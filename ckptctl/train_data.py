"""The paired trainloop's data order and data position: where a resumed run continues.

The order of an epoch is a pure function of ``(seed, epoch)``; every checkpoint records the
position of the next batch with a fingerprint (:func:`data_position`) that resume recomputes
from the current flags and compares (:func:`fingerprint_differences`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ckptctl.arcdata import PairSet, hash_ids
from ckptctl.core.resume import DATA_POSITION_KEY

__all__ = ["DATA_POSITION_KEY", "FINGERPRINT_FIELDS", "order_seed", "batch_indices", "batches_per_epoch", "data_position", "epoch_order", "fingerprint_differences"]
#: Fingerprint fields compared on resume (the position itself is where we continue).
FINGERPRINT_FIELDS = ("seed", "order_seed", "next_batch_ids_sha256", "dataset_size", "dataset_sha256", "batch_size")


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


def data_position(train: PairSet, seed: int, batch_size: int, next_epoch: int, next_batch: int) -> dict[str, Any]:
    """The fingerprint of the position ``(next_epoch, next_batch)``: where training continues."""
    order = epoch_order(len(train), seed, next_epoch)
    ids = [train.ids[i] for i in batch_indices(order, next_batch, batch_size).tolist()]
    return {
        "next_epoch": int(next_epoch),
        "next_batch": int(next_batch),
        "seed": int(seed),
        "order_seed": order_seed(seed, next_epoch),
        "next_batch_ids_sha256": hash_ids(ids),
        "dataset_size": len(train),
        "dataset_sha256": train.sha256,
        "batch_size": int(batch_size),
    }


def fingerprint_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between a saved and a recomputed data position."""
    diffs = []
    for key in FINGERPRINT_FIELDS:
        if saved.get(key) != now.get(key):
            a, b = saved.get(key), now.get(key)
            if isinstance(a, str) and isinstance(b, str) and len(a) > 16:
                a, b = a[:12] + "…", b[:12] + "…"
            diffs.append(f"{key}: checkpoint {a}, now {b}")
    return diffs

