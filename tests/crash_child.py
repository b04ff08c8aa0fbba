"""Child side of the crash-injection tests: SIGKILL this process at the k-th call of an IO step.

Runs in a separate process (forked from a forkserver that preloaded torch, so each
child starts fast). The kill is real: ``os.kill(os.getpid(), SIGKILL)``, right before
the chosen call would run, so every boundary between the steps of a save is hit.
"""

from __future__ import annotations

import os
import signal

#: The IO steps a save is made of, as the functions the storage layer calls.
TARGETS = ("os.fsync", "os.replace", "os.unlink", "write")
#: The model of the run these children save to (conftest's ``base_run``), as ``tests.runs`` options.
#: The frozen ``encoder`` makes every save share a pack with the ones before it (format 2's deduplication).
MODEL = {"shape": (16, 16), "optimizer": "sgd", "frozen": 32}


def _arm(target: str, kill_at: int) -> None:
    calls = {"n": 0}

    def wrap(original):
        def hooked(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        return hooked

    if target == "write":
        from ckptctl.storage.atomic import HashingWriter

        HashingWriter.write = wrap(HashingWriter.write)
    else:
        name = target.split(".", 1)[1]
        setattr(os, name, wrap(getattr(os, name)))


def save_cycles(run_dir: str, target: str, kill_at: int, cycles: int) -> None:
    """Open the run, resume, arm the hook, then do ``cycles`` of save + update_best + close."""
    import torch

    from ckptctl import ModelPersistence

    from .runs import fresh_components

    torch.manual_seed(0)
    components = fresh_components(**MODEL)
    model, opt = components["agent"], components["optimizer"]
    p = ModelPersistence(run_dir, max_checkpoints=2, save_every_n_batches=1)
    info = p.resume(**components)
    start = info["batch"] + 1
    _arm(target, kill_at)
    for batch in range(start, start + cycles):
        model(torch.randn(2, 16)).sum().backward()
        opt.step()
        metrics = {"accuracy_delta": float(batch)}
        p.maybe_save(0, batch, metrics, **components)
        p.update_best(0, batch, metrics, **components)
    p.close()


def prune_cli(run_dir: str, target: str, kill_at: int, keep: int) -> None:
    """Run ``ckptctl prune RUN --keep N --yes`` in this process, killed at the ``kill_at``-th ``target`` call."""
    from ckptctl.cli import main

    _arm(target, kill_at)
    main(["prune", run_dir, "--keep", str(keep), "--yes"])


def cli(args: list[str], target: str, kill_at: int) -> None:
    """Run ``ckptctl ARGS`` in this process, killed at the ``kill_at``-th ``target`` call."""
    from ckptctl.cli import main

    _arm(target, kill_at)
    main(args)
