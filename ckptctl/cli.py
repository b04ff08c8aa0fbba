"""The ``ckptctl`` command line: a thin layer over the library; printing lives in :mod:`ckptctl.render`.

Every command takes a PATH that is a folder of runs, one run, or a Drive mirror root.
Exit codes: 0 ok, 1 problems found or the operation failed, 2 usage error (bad flag,
missing path, unknown run or id). Errors are one ``Error: ...`` line on stderr; set
``CKPTCTL_DEBUG=1`` to see the traceback instead. Commands that need torch import it
inside the command, so ``ckptctl --help`` and ``ckptctl ls`` start fast without it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperGroup

from ckptctl import __version__
from ckptctl.errors import (
    CheckpointIntegrityError,
    CkptctlError,
    CorruptIndexError,
    NoValidCheckpointError,
    NotFoundError,
    RunLockedError,
    UnsafePathError,
)

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
DEBUG_ENV = "CKPTCTL_DEBUG"

#: The one table from exception type to (exit code, hint). First match wins.
ERROR_TABLE: list[tuple[type[BaseException], int, str | None]] = [
    (NotFoundError, EXIT_USAGE, None),
    (RunLockedError, EXIT_PROBLEMS, "a trainer is using this run; stop it (or let it finish) and try again"),
    (CheckpointIntegrityError, EXIT_PROBLEMS, None),
    (NoValidCheckpointError, EXIT_PROBLEMS, None),
    (CorruptIndexError, EXIT_PROBLEMS, None),
    (UnsafePathError, EXIT_PROBLEMS, None),
    (CkptctlError, EXIT_PROBLEMS, None),
    (FileNotFoundError, EXIT_USAGE, None),
    (NotADirectoryError, EXIT_USAGE, None),
    (PermissionError, EXIT_PROBLEMS, None),
    (OSError, EXIT_PROBLEMS, None),
]


def error_message(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for ``exc``, from :data:`ERROR_TABLE`."""
    for kind, code, hint in ERROR_TABLE:
        if isinstance(exc, kind):
            if isinstance(exc, OSError) and not isinstance(exc, CkptctlError) and exc.strerror:
                text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
            else:
                text = str(exc) or kind.__name__
            return text + (f" ({hint})" if hint else ""), code
    return f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)", EXIT_PROBLEMS


def _lossless_output() -> None:
    """Print file names with undecodable bytes (``run_\\xff``) as those bytes, never crash on them."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="surrogateescape")
            except (ValueError, OSError):
                pass


class _Group(TyperGroup):
    """Runs each command inside the error table, and prints usage errors as one ``Error:`` line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's main, but a usage error is one line (``Error: … (see 'ckptctl CMD --help')``), exit 2."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()
            else:
                ctx = getattr(exc, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                sys.stderr.write(f"Error: {' '.join(exc.format_message().split())}{hint}\n")
            sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
        except typer.Abort:
            sys.stderr.write("Error: aborted\n")
            sys.exit(EXIT_PROBLEMS)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)

    def invoke(self, ctx):
        _lossless_output()
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            sys.stderr.write("Error: interrupted\n")
            raise typer.Exit(130) from None
        except Exception as exc:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            message, code = error_message(exc)
            sys.stderr.write(f"Error: {' '.join(message.split())}\n")
            raise typer.Exit(code) from None


app = typer.Typer(
    cls=_Group,
    name="ckptctl",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckptctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Inspect, check, prune and restore crash-safe PyTorch checkpoints (local runs/ and the Drive mirror).

    PATH arguments take a folder of runs, one run directory, or a Drive mirror root.
    Exit codes: 0 ok, 1 problems found or failed, 2 usage error. CKPTCTL_DEBUG=1 shows tracebacks.
    """


# --------------------------------------------------------------------------- completion helpers


def complete_run_paths(incomplete: str) -> List[str]:
    """Run directories for shell completion: under ``runs/`` by default, or under the folder typed so far."""
    from ckptctl.storage.scan import find_runs

    typed_dir = "/" in incomplete
    base = Path(incomplete[: incomplete.rindex("/") + 1]) if typed_dir else Path("runs")
    try:
        runs = find_runs(base)
    except OSError:
        return []
    prefix = incomplete[: incomplete.rindex("/") + 1] if typed_dir else "runs/"
    found = [prefix + r.name for r in runs if r != base]
    return [p for p in found if p.startswith(incomplete)]


def complete_drive_runs(ctx: typer.Context, incomplete: str) -> List[str]:
    """Run names on the Drive mirror (``--drive`` if already typed, else the default) for ``--run``."""
    from ckptctl.storage.restore import default_drive
    from ckptctl.storage.scan import find_runs

    drive = ctx.params.get("drive") or default_drive()
    try:
        return [r.name for r in find_runs(drive) if r.name.startswith(incomplete)]
    except OSError:
        return []


# --------------------------------------------------------------------------- helpers


def _runs_at(path: Path) -> list[Path]:
    from ckptctl.storage.scan import find_runs

    try:
        return find_runs(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise NotFoundError(str(exc)) from None


def _confirm(question: str, yes: bool) -> None:
    """Go on if ``--yes`` or the user agrees on a terminal; refuse (exit 1) without a terminal."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CkptctlError("refusing to delete without confirmation: not a terminal (pass --yes to go ahead)")
    if not typer.confirm(question, default=False, err=True):
        sys.stderr.write("Nothing deleted.\n")
        raise typer.Exit(EXIT_PROBLEMS)


PATH_HELP = "A folder of runs, one run directory, or a Drive mirror root."
JSON_HELP = "Print JSON on stdout (raw numbers: bytes as int, UTC ISO timestamps)."


# --------------------------------------------------------------------------- ls


@app.command("ls")
def ls_command(
    path: Path = typer.Argument(Path("runs"), metavar="PATH", help=PATH_HELP, autocompletion=complete_run_paths),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List runs and their checkpoints: id, epoch, batch, metrics, size, age, and marks.

    Marks: latest, best (the best model's source), drive (verified on the Drive mirror),
    pinned, unindexed (a file the index does not list), MISSING. Reads only metadata and
    file sizes, never checkpoint payloads, and does not import torch.

    \b
    Example:
        ckptctl ls runs/
        ckptctl ls /content/drive/MyDrive/ARC-EFE-Backups --json
    """
    from ckptctl import render
    from ckptctl.storage.listing import list_runs, listing_to_json

    try:
        runs = list_runs(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise NotFoundError(str(exc)) from None
    doc = listing_to_json(runs)
    if json_out:
        render.print_json(doc)
        for run in doc["runs"]:
            for problem in run["problems"]:
                render.warn(f"{run['name']}: {problem}")
    else:
        render.render_ls(doc)


# --------------------------------------------------------------------------- verify


@app.command("verify")
def verify_command(
    path: Path = typer.Argument(Path("runs"), metavar="PATH", help=PATH_HELP, autocompletion=complete_run_paths),
    deep: bool = typer.Option(False, "--deep", help="Also check that every floating-point tensor is finite."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Check every checkpoint and best model: checksum against the index, then a safe trial load.

    The trial load runs on CPU with weights_only=True, memory-mapped, so pickled code in a
    file is never run (such a file is reported 'unsafe'). Statuses: ok, corrupt, missing,
    unsafe, nonfinite. Exits 1 if any file has a problem or there was nothing to verify.

    \b
    Example:
        ckptctl verify runs/
        ckptctl verify runs/my_run --deep --json
    """
    from ckptctl import render

    runs = _runs_at(path)
    if not runs:
        raise CkptctlError(f"{path}: no runs here, nothing to verify")
    from ckptctl.ops import verify_runs

    with render.progress("verifying", enabled=not json_out) as on_progress:
        results = verify_runs(runs, deep=deep, on_progress=on_progress)
    if not results:
        raise CkptctlError(f"{path}: no checkpoints here, nothing to verify")
    ok = all(r.status == "ok" for r in results)
    doc = {"ok": ok, "results": [r.to_json() for r in results]}
    if json_out:
        render.print_json(doc)
    else:
        render.render_verify(doc)
    if not ok:
        raise typer.Exit(EXIT_PROBLEMS)


# --------------------------------------------------------------------------- show


@app.command("show")
def show_command(
    path: Path = typer.Argument(..., help="A run directory or a checkpoint file.", autocompletion=complete_run_paths),
    checkpoint: Optional[str] = typer.Argument(None, metavar="[ID]", help="Checkpoint id, or 'best'; default: the newest."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show one checkpoint in depth: components, tensors, parameters, dtypes, bytes, metrics, RNG, resume position.

    The file is checked against the index checksum (when it has one) and loaded safely.

    \b
    Example:
        ckptctl show runs/my_run          # the newest checkpoint
        ckptctl show runs/my_run 7
        ckptctl show runs/my_run best --json
    """
    from ckptctl import render
    from ckptctl.storage.select import select_checkpoint

    ref = select_checkpoint(path, checkpoint)
    from ckptctl.ops import describe_checkpoint

    data = describe_checkpoint(ref)
    if json_out:
        render.print_json(data)
    else:
        render.render_show(data)


# --------------------------------------------------------------------------- resume-info


@app.command("resume-info")
def resume_info_command(
    path: Path = typer.Argument(Path("runs"), metavar="PATH", help=PATH_HELP, autocompletion=complete_run_paths),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Say which checkpoint --resume would load and why, and which newer ones it would skip.

    Read-only: it checks checksums and trial-loads like resume does, but changes nothing.
    Exits 1 when a run has checkpoints but none of them verifies.

    \b
    Example:
        ckptctl resume-info runs/my_run
    """
    from ckptctl import render

    runs = _runs_at(path)
    if not runs:
        raise NotFoundError(f"{path}: no runs here")
    from ckptctl.ops import resume_info

    infos = [resume_info(run) for run in runs]
    if json_out:
        render.print_json({"runs": infos})
    else:
        for info in infos:
            render.render_resume_info(info)
    if any(i["checkpoint"] is None and i["skipped"] for i in infos):
        raise typer.Exit(EXIT_PROBLEMS)


# --------------------------------------------------------------------------- prune


@app.command("prune")
def prune_command(
    path: Path = typer.Argument(Path("runs"), metavar="PATH", help=PATH_HELP, autocompletion=complete_run_paths),
    keep: Optional[int] = typer.Option(None, "--keep", min=1, metavar="N", help="Keep the newest N checkpoints (plus protected ones)."),
    max_size: Optional[str] = typer.Option(None, "--max-size", metavar="SIZE", help="Per run, delete oldest until checkpoints fit, e.g. 15GB, 500MiB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop; delete nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Delete the oldest checkpoints until --keep N and/or --max-size SIZE holds.

    Never deletes the newest checkpoint that verifies, the best model or its source, a
    pinned checkpoint, or anything outside the run; entries with unsafe paths are skipped
    and listed. Prints the plan first; --dry-run stops there. Without --yes it asks on a
    terminal and refuses without one. Refuses while a trainer holds the run's lock.

    \b
    Example:
        ckptctl prune runs/ --keep 2 --dry-run
        ckptctl prune /content/drive/MyDrive/ARC-EFE-Backups --max-size 15GB --yes
    """
    from contextlib import ExitStack

    from ckptctl import render
    from ckptctl.core.units import parse_size
    from ckptctl.storage.lock import RunLock, is_locked
    from ckptctl.storage.plans import execute_prune, finish_interrupted_prune, plan_prune

    if keep is None and max_size is None:
        raise typer.BadParameter("give --keep N and/or --max-size SIZE", param_hint="'--keep' / '--max-size'")
    max_bytes = None
    if max_size is not None:
        try:
            max_bytes = parse_size(max_size)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--max-size'") from None
    runs = _runs_at(path)
    if not runs:
        render.info(f"{path}: no runs here, nothing to prune")
        if json_out:
            render.print_json(render.prune_plan_json([], dry_run))
        return
    failed = False
    with ExitStack() as locks:
        usable = []
        for run in runs:
            if dry_run:
                if is_locked(run):
                    render.warn(f"{run.name}: a trainer holds this run; the plan may change before you prune")
                usable.append(run)
                continue
            try:
                locks.enter_context(RunLock(run))
                usable.append(run)
                finished = finish_interrupted_prune(run)  # an earlier prune killed before its last delete
                if finished:
                    render.info(f"{run.name}: finished deleting {len(finished)} checkpoint file(s) an interrupted prune left: {', '.join(finished)}")
            except RunLockedError as exc:
                message, _ = error_message(exc)
                sys.stderr.write(f"Error: {message}\n")
                failed = True
        plans = [plan_prune(run, keep_last=keep, max_total_bytes=max_bytes, loads=_loads_safely) for run in usable]
        if json_out and (dry_run or not any(p.delete for p in plans)):
            render.print_json(render.prune_plan_json(plans, dry_run))
        elif not json_out:
            render.render_prune_plans(plans, dry_run)
        todo = [p for p in plans if p.delete]
        if not dry_run and todo:
            count = sum(len(p.delete) for p in todo)
            _confirm(f"Delete {count} checkpoint(s), freeing {render.size(sum(p.bytes_freed for p in todo))}?", yes)
            deleted = {}
            for plan in todo:
                deleted[str(plan.run_dir)] = execute_prune(plan)
            if json_out:
                render.print_json(render.prune_plan_json(plans, dry_run, deleted))
            else:
                render.info(f"Deleted {sum(len(v) for v in deleted.values())} checkpoint file(s).")
    if failed:
        raise typer.Exit(EXIT_PROBLEMS)


def _loads_safely(path: Path) -> bool:
    """The safe trial load prune needs for checkpoints without checksums (imports torch only then)."""
    from ckptctl.ops import loads_safely

    return loads_safely(path)


# --------------------------------------------------------------------------- promote


@app.command("promote")
def promote_command(
    run: Path = typer.Argument(..., help="The run directory.", autocompletion=complete_run_paths),
    checkpoint_id: int = typer.Argument(..., metavar="ID", help="The checkpoint to make the best model."),
    pin: bool = typer.Option(False, "--pin", help="Also pin the checkpoint so retention never deletes it."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Make checkpoint ID the run's best model (best_model.pt replaced atomically, marked as promoted by hand).

    The checkpoint must verify first. Takes the run lock: refuses while a trainer runs.

    \b
    Example:
        ckptctl promote runs/my_run 12 --pin
    """
    from ckptctl import render
    from ckptctl.storage.select import single_run

    run_dir = single_run(run)
    from ckptctl.ops import promote

    info = promote(run_dir, checkpoint_id, pin=pin)
    if json_out:
        render.print_json({"run": run_dir.name, "best": info.to_dict(), "pinned": pin})
    else:
        render.console().print(
            f"{run_dir.name}: best model is now checkpoint {checkpoint_id} "
            f"(epoch {info.epoch}, batch {info.batch}, {render.size(info.size_bytes)})" + (", pinned" if pin else "")
        )


# --------------------------------------------------------------------------- restore


@app.command("restore")
def restore_command(
    from_drive: bool = typer.Option(False, "--from-drive", help="Restore from the Drive mirror (required)."),
    drive: Optional[Path] = typer.Option(None, "--drive", metavar="PATH", help="Drive mirror root [default: $CKPTCTL_DRIVE, else /content/drive/MyDrive/ARC-EFE-Backups]."),
    run: Optional[str] = typer.Option(None, "--run", metavar="NAME", help="Run name on the mirror [default: the run with the newest checkpoint].", autocompletion=complete_drive_runs),
    checkpoint_id: Optional[int] = typer.Option(None, "--id", metavar="N", help="Restore only this checkpoint (plus the best model)."),
    to: Path = typer.Option(Path("runs"), "--to", metavar="DIR", help="Local folder of runs; the run lands in DIR/<run name>."),
    force: bool = typer.Option(False, "--force", help="Overwrite local checkpoints even when they are newer than the mirror's."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Copy a run back from the Drive mirror, verifying checksums as it copies.

    Only missing, older or damaged local files are copied; an interrupted restore continues
    where it stopped. A local checkpoint newer than the mirror's is kept unless --force.
    Exits 1 if some mirror entry could not be restored (each is listed).
    Afterwards `python -m ckptctl.trainloop --resume --output-dir DIR --run-name NAME`
    continues from it.

    \b
    Example:
        ckptctl restore --from-drive
        ckptctl restore --from-drive --drive /mnt/drive/backups --run my_run --to runs
    """
    from ckptctl import render
    from ckptctl.storage.restore import choose_mirror_run, default_drive, restore_run

    if not from_drive:
        raise typer.BadParameter("only --from-drive is supported: ckptctl restore --from-drive", param_hint="'--from-drive'")
    drive_root = drive if drive is not None else default_drive()
    mirror_run = choose_mirror_run(drive_root, run)
    dest = to / mirror_run.name
    render.info(f"restoring {mirror_run} -> {dest}")
    with render.progress("restoring", enabled=not json_out) as on_progress:
        report = restore_run(mirror_run, dest, only_id=checkpoint_id, force=force, on_progress=on_progress)
    if json_out:
        render.print_json(
            {
                "run": mirror_run.name,
                "source": str(report.source),
                "dest": str(report.dest),
                "copied": report.copied,
                "already_present": report.already,
                "kept_local": report.kept_local,
                "problems": report.problems,
                "bytes_copied": report.bytes_copied,
                "resume_id": report.resume_id,
            }
        )
    else:
        out = render.console()
        out.print(f"Restored {len(report.copied)} file(s) ({render.size(report.bytes_copied)}) into {report.dest}; {len(report.already)} already present.")
        for rel in report.kept_local:
            out.print(f"  kept local {rel}: newer than the mirror's (use --force to overwrite)")
        for problem in report.problems:
            render.warn(problem)
        if report.resume_id is not None:
            out.print(
                f"Resume will start from checkpoint {report.resume_id}: "
                f"python -m ckptctl.trainloop --resume --output-dir {to} --run-name {mirror_run.name}"
            )
    if report.problems:
        raise typer.Exit(EXIT_PROBLEMS)


# --------------------------------------------------------------------------- backup


@app.command("backup")
def backup_command(
    path: Path = typer.Argument(Path("runs"), help="A run directory or a folder of runs.", autocompletion=complete_run_paths),
    drive: Optional[Path] = typer.Option(None, "--drive", metavar="PATH", help="Drive mirror root [default: $CKPTCTL_DRIVE, else /content/drive/MyDrive/ARC-EFE-Backups]."),
    max_size: Optional[str] = typer.Option(None, "--max-size", metavar="SIZE", help="Per run, the most the mirror may hold, e.g. 14GB, 500MiB [default: Drive's free space plus the run's mirror, less 5%]."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Push runs to the Drive mirror now, newest checkpoint first, within a byte budget.

    Each file is copied to a temporary name, checked, then renamed; the mirror's index is
    written after its files. Then the best model, then older checkpoints newest to oldest
    while they fit in --max-size; to make room the mirror drops its own oldest copies
    (those local retention removed first), never its newest verified one. Dropped files
    are emptied before they are deleted, so Drive's trash does not keep their bytes.
    Exits 1 when a local checkpoint is damaged or the newest does not fit. Refuses a run
    a trainer is using (its own mirror is at work).

    \b
    Example:
        ckptctl backup runs/my_run --drive /content/drive/MyDrive/ARC-EFE-Backups
        ckptctl backup runs/ --max-size 14GB
    """
    from ckptctl import render
    from ckptctl.core.units import parse_size
    from ckptctl.storage.mirror import BUDGET_MARGIN, resolve_budget
    from ckptctl.storage.restore import backup_run, default_drive

    if max_size is not None:
        try:
            parse_size(max_size)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--max-size'") from None
    drive_root = drive if drive is not None else default_drive()
    runs = _runs_at(path)
    if not runs:
        raise NotFoundError(f"{path}: no runs here")
    reports = {}
    for run_dir in runs:
        budget = None
        if drive_root.is_dir():  # else backup_run says Drive is not mounted
            budget = resolve_budget(max_size, drive_root / run_dir.resolve().name)
        with render.progress(f"backing up {run_dir.name}", enabled=not json_out) as on_progress:
            reports[run_dir] = backup_run(run_dir, drive_root, max_bytes=budget, on_progress=on_progress)
    if json_out:
        render.print_json(
            {
                "drive": str(drive_root),
                "runs": [
                    {"run": r.name, "path": str(r), "mirror": str(drive_root / r.resolve().name), "copied": rep.copied,
                     "unchanged": rep.skipped, "deleted": rep.deleted, "bytes_copied": rep.bytes_copied,
                     "newest_verified_id": rep.newest_verified_id, "not_mirrored": rep.not_mirrored,
                     "used_bytes": rep.used_bytes, "budget_bytes": rep.budget_bytes, "too_big": rep.too_big,
                     "damaged": rep.damaged}
                    for r, rep in reports.items()
                ],
            }
        )
    else:
        out = render.console()
        for r, rep in reports.items():
            out.print(
                f"{r.name}: copied {len(rep.copied)} file(s) ({render.size(rep.bytes_copied)}), "
                f"{len(rep.skipped)} already on the mirror, {len(rep.deleted)} old removed -> {drive_root / r.resolve().name}"
            )
            if max_size is None and rep.budget_bytes is not None:
                out.print(
                    f"  Drive budget {render.size(rep.budget_bytes)} (free space plus this run's mirror, "
                    f"less {BUDGET_MARGIN:.0%}; --max-size sets it)"
                )
            if rep.not_mirrored:
                out.print(
                    f"  newest on the mirror: #{rep.newest_verified_id}; not mirrored: "
                    f"{', '.join(map(str, rep.not_mirrored))} ({render.size(rep.used_bytes)} used of {render.size(rep.budget_bytes)})"
                )
    problems = False
    for r, rep in reports.items():
        for item in rep.damaged:
            render.warn(f"{r.name}: checkpoint {item['id']} not backed up: {item['reason']}")
            problems = True
        if rep.too_big:
            render.warn(f"{r.name}: {rep.too_big}")
            problems = True
    if problems:
        raise typer.Exit(EXIT_PROBLEMS)


# --------------------------------------------------------------------------- diff


@app.command("diff")
def diff_command(
    a: str = typer.Argument(..., help="A checkpoint file, a run (its newest), or RUN:ID / RUN:best."),
    b: str = typer.Argument(..., help="The same forms as A."),
    atol: float = typer.Option(0.0, "--atol", min=0.0, metavar="X", help="Treat values within this absolute difference as equal (default 0: every byte must match)."),
    show_all: bool = typer.Option(False, "--all", help="List every tensor, not only those that differ."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Compare two checkpoints tensor by tensor: which changed, the max absolute difference, metrics side by side.

    Exits 0 when every tensor matches, 1 when any differs, like diff(1): use it to confirm
    a resumed run matches an uninterrupted one. By default tensors must be bit-identical
    (dtype, shape and every byte: -0.0 differs from 0.0); --atol compares values instead.

    \b
    Example:
        ckptctl diff runs/resumed:9 runs/straight:9
        ckptctl diff runs/a/checkpoints/checkpoint_00003.pt runs/b --json
    """
    from ckptctl import render
    from ckptctl.storage.select import parse_ref

    ref_a, ref_b = parse_ref(a), parse_ref(b)
    from ckptctl.ops import diff_checkpoints

    result = diff_checkpoints(ref_a, ref_b, atol=atol)
    if json_out:
        render.print_json(result)
    else:
        render.render_diff(result, show_all=show_all)
    if not result["identical"]:
        raise typer.Exit(EXIT_PROBLEMS)


# --------------------------------------------------------------------------- bench

BENCH_SECTIONS = ("save", "verify", "restore", "cli", "resume")
BENCH_ONLY_SECTIONS = ("scale",)


@app.command("bench")
def bench_command(
    size: str = typer.Option("1GiB", "--size", metavar="SIZE", help="Bytes of float32 tensors per checkpoint (1GiB, 256MB, ...)."),
    drive: Optional[Path] = typer.Option(None, "--drive", metavar="PATH", help="Folder to mirror to and restore from, e.g. the mounted Drive (default: a temporary folder)."),
    batch_time: float = typer.Option(0.5, "--batch-time", metavar="SECONDS", min=0.000001, help="Your seconds per training batch, for the --save-every advice."),
    repeats: int = typer.Option(3, "--repeats", min=1, max=50, help="Runs per timing; the median is reported."),
    sections: str = typer.Option(",".join(BENCH_SECTIONS), "--sections", metavar="LIST", help="Comma-separated parts to run: save,verify,restore,cli,resume (save always runs); or 'scale' alone: save and verify one checkpoint of --size (e.g. more than half the RAM) with default settings."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", metavar="DIR", help="Where local files are written (default: the system temp folder); removed afterwards."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Measure checkpointing on this machine against its anchors, side by side, and advise --save-every.

    Compares the training stall per save with DCP async_save and sync torch.save, the
    background save with a raw write+fsync, verify with a cold read (and its memory),
    restore from Drive with cp+fsync, `ckptctl ls`/--help with importing typer+rich+
    humanize, and resume with a plain torch.load. Each ratio shows its goal.

    \b
    Example:
        ckptctl bench --size 1GiB
        ckptctl bench --size 256MB --drive /content/drive/MyDrive --batch-time 0.8 --json
    """
    from ckptctl import render
    from ckptctl.core.units import parse_size

    try:
        size_bytes = parse_size(size)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--size") from None
    chosen = tuple(part.strip() for part in sections.split(",") if part.strip())
    unknown = [part for part in chosen if part not in BENCH_SECTIONS + BENCH_ONLY_SECTIONS]
    if "scale" in chosen and chosen != ("scale",):
        raise typer.BadParameter("'scale' runs on its own: --sections scale", param_hint="--sections")
    if unknown:
        raise typer.BadParameter(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(BENCH_SECTIONS)}", param_hint="--sections")
    for folder, flag in ((drive, "--drive"), (workdir, "--workdir")):
        if folder is not None and not folder.is_dir():
            raise NotFoundError(f"{flag} {folder}: no such directory")
    from ckptctl.bench import run_bench

    result = run_bench(
        size_bytes,
        drive=drive,
        workdir=workdir,
        repeats=repeats,
        batch_time_s=batch_time,
        sections=chosen,
        on_step=lambda step: render.info(f"bench: {step}"),
    )
    if json_out:
        render.print_json(result)
    else:
        render.render_bench(result)


# --------------------------------------------------------------------------- entry point


def main(argv: Optional[List[str]] = None) -> Any:
    """Console-script entry point: run the app; anything that escapes the commands' error table is mapped here too."""
    try:
        return app(args=argv, prog_name="ckptctl")
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
    except Exception as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message, code = error_message(exc)
        sys.stderr.write(f"Error: {' '.join(message.split())}\n")
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
