"""Building the index of a run that has checkpoint files but no index (loose files just restored into it).

The same steps as opening the run with :class:`~ckptctl.persistence.ModelPersistence`
(:mod:`ckptctl.api.open`): every committed checkpoint file is loaded safely, hashed and
adopted (the guide's files by :mod:`ckptctl.storage.legacy`'s rules, its metadata kept
as ``.legacy``), and ``best_model.pt`` gets a record made from the file, all under the
run lock. A file that does not load is logged and left unindexed.
"""

from __future__ import annotations

from pathlib import Path

from ckptctl.core.manifest import Index
from ckptctl.errors import CheckpointIntegrityError
from ckptctl.storage import legacy
from ckptctl.storage.lock import RunLock
from ckptctl.storage.scan import checkpoint_files_on_disk
from ckptctl.torch_io import verify_file

from ckptctl.api import open as opening


def index_restored_run(run_dir: str | Path) -> tuple[Index, dict[int, str]]:
    """Adopt ``run_dir``'s unindexed checkpoint files and best model into its index, as opening the run would.

    Returns the index and, for each checkpoint file that stays out of it, why (the safe
    load's reason). The best model's record names the metric the guide's
    ``best_metadata.json`` tracked, if there is one (a later ``ModelPersistence`` compares
    by its own ``best_metric``). Raises RunLockedError while a trainer holds the run.
    """
    run_dir = Path(run_dir)
    with RunLock(run_dir):
        opening.cleanup_run_temporaries(run_dir)
        index = opening.load_or_rebuild_index(run_dir, run_dir.resolve().name)
        guide_best = legacy.read_guide_best(run_dir)
        opening.load_or_repair_best(run_dir, index, guide_best.metric if guide_best else None, "max")
    left_out = {}
    for checkpoint_id, path in sorted(checkpoint_files_on_disk(run_dir).items()):
        if checkpoint_id not in index.by_id():
            try:
                verify_file(path, None)
                left_out[checkpoint_id] = f"{path.name}: not a ckptctl checkpoint"
            except CheckpointIntegrityError as exc:
                left_out[checkpoint_id] = str(exc)
    return index, left_out
