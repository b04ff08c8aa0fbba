"""Child side of the crash-injection tests: SIGKILL this process at the k-th call of an IO step.

Runs in a separate process (forked from a forkserver that preloaded torch, so each
child starts fast). The kill is real: ``os.kill(os.getpid(), SIGKILL)``, right before
the chosen call would run, so every boundary between the steps of a save is hit.
:func:`kill_sweep` is the parent side for the CLI: one child per kill point.
"""

from __future__ import annotations

import os
import signal

#: The IO steps a save is made of, as the functions the storage layer calls.
TARGETS = ("os.fsync", "os.replace", "os.unlink", "write")
#: The IO steps the CLI sweeps (:func:`kill_sweep`) kill before: every rename and every fsync.
KILL_TARGETS = ("os.replace", "os.fsync")
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


def kill_sweep(fork_context, tmp_path, make_case, args_for, check) -> int:
    """Kill ``ckptctl ARGS`` before its k-th call of each target, for every k; run ``check`` after each kill."""
    kills = 0
    for target in KILL_TARGETS:
        for kill_at in range(1, 200):
            case = tmp_path / f"{target}-{kill_at}"
            make_case(case)
            child = fork_context.Process(target=cli, args=(args_for(case), target, kill_at))
            child.start()
            child.join(timeout=120)
            assert child.exitcode in (0, 1, -signal.SIGKILL), child.exitcode
            check(case)
            if child.exitcode != -signal.SIGKILL:
                break  # k passed the number of such calls: every boundary was covered
            kills += 1
    print(f"{args_for(tmp_path)[0]}: {kills} kills")
    return kills
