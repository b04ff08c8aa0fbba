"""The run-directory layout, file naming, and the rules for paths stored in metadata.

A run directory looks like::

    <output_dir>/<run_name>/
      checkpoints/checkpoint_00000.pt   one file per checkpoint; the name carries the id
      objects/<xxh3 hex>.safetensors    format 2: tensor packs the checkpoints share (see core/objects.py)
      best_model.pt                     best so far by a metric
      best_metadata.json
      checkpoint_metadata.json          the index used for listing and resuming
      training_state.json               progress, status and the run's config
      training.log
      mirror_status.json                where the Drive mirror stands (written by its owner)

Pure functions only: nothing here reads or writes files.
"""

from __future__ import annotations

import datetime as _dt
import posixpath
import re

from ckptctl.errors import UnsafePathError

#: 2: tensors live in content-addressed packs under ``objects/`` (see :mod:`ckptctl.core.objects`);
#: 1: each checkpoint file holds its whole payload. Readers understand both.
FORMAT_VERSION = 2

CHECKPOINT_DIR = "checkpoints"
INDEX_FILE = "checkpoint_metadata.json"
BEST_MODEL_FILE = "best_model.pt"
BEST_METADATA_FILE = "best_metadata.json"
TRAINING_STATE_FILE = "training_state.json"
TRAINING_LOG_FILE = "training.log"
LOCK_FILE = ".ckptctl.lock"
#: Where the Drive mirror stands (newest verified copy, lag, budget, last error), in the local run.
MIRROR_STATUS_FILE = "mirror_status.json"

#: Prefix of every temporary file ckptctl writes; readers ignore such files.
TEMP_PREFIX = ".ckptctl-tmp-"

DEFAULT_MAX_CHECKPOINTS = 5
DEFAULT_RUN_PREFIX = "arc_complete_"

#: Keys of a checkpoint dict that are not components.
RESERVED_CHECKPOINT_KEYS = frozenset(
    {
        "format_version",
        "epoch",
        "batch",
        "global_step",
        "metrics",
        "timestamp",
        "rng",
        "components",
        "extra",
        "checkpoint_id",
        "objects",
        "component_order",
        # a distributed save's per-rank parts (ckptctl/api/distributed.py)
        "world_size",
        "rng_ranks",
        "extra_ranks",
        # sharded state's record (ckptctl/core/sharded.py)
        "sharded",
    }
)

#: Matched against the whole name (``fullmatch``: ``$`` would also accept a trailing newline),
#: ASCII digits only (``\d`` would accept ``٠٠٠٠٣``, whose id 3 names another file).
_CHECKPOINT_NAME = re.compile(r"checkpoint_([0-9]{5,})\.pt")


def checkpoint_filename(checkpoint_id: int) -> str:
    """Return the file name of checkpoint ``checkpoint_id`` (``checkpoint_00007.pt``)."""
    if checkpoint_id < 0:
        raise ValueError(f"checkpoint id must be >= 0, got {checkpoint_id}")
    return f"checkpoint_{checkpoint_id:05d}.pt"


def checkpoint_relpath(checkpoint_id: int) -> str:
    """Return the run-relative path of checkpoint ``checkpoint_id``."""
    return f"{CHECKPOINT_DIR}/{checkpoint_filename(checkpoint_id)}"


def parse_checkpoint_filename(name: str) -> int | None:
    """Return the id carried by a checkpoint file name, or None if ``name`` is not one."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def is_temporary_name(name: str) -> bool:
    """True for files ckptctl writes before committing them (readers must ignore these)."""
    return name.startswith(TEMP_PREFIX)


def default_run_name(now: _dt.datetime | None = None) -> str:
    """Return the default run name, ``arc_complete_YYYYMMDD_HHMMSS`` in local time."""
    now = now or _dt.datetime.now()
    return f"{DEFAULT_RUN_PREFIX}{now.strftime('%Y%m%d_%H%M%S')}"


def utc_now_iso() -> str:
    """Return the current UTC time as ISO-8601 with an explicit ``+00:00`` offset."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def check_relative_path(relpath: object) -> str:
    """Validate a path taken from metadata and return it normalised.

    It must be a non-empty, relative, POSIX-style string that stays inside the run
    directory after normalisation. Raises :class:`UnsafePathError` otherwise.
    """
    if not isinstance(relpath, str) or not relpath:
        raise UnsafePathError(f"path in metadata is not a non-empty string: {relpath!r}")
    if "\x00" in relpath or "\\" in relpath:
        raise UnsafePathError(f"path in metadata has forbidden characters: {relpath!r}")
    if relpath.startswith("/") or re.match(r"^[A-Za-z]:", relpath):
        raise UnsafePathError(f"path in metadata is absolute: {relpath!r}")
    normalised = posixpath.normpath(relpath)
    if normalised == ".." or normalised.startswith("../") or normalised == ".":
        raise UnsafePathError(f"path in metadata leaves the run directory: {relpath!r}")
    return normalised
