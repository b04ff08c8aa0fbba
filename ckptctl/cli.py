"""The ``ckptctl`` command line: each command calls the library and hands its report to :mod:`ckptctl.output`.

Every command takes a PATH that is a folder of runs, one run, or a Drive mirror root.
Printing lives in :mod:`ckptctl.output` (human / ``--json`` / ``--quiet``) and
:mod:`ckptctl.render` (the human views); exit codes and the one error table in
:mod:`ckptctl.exit_codes`: 0 ok, 1 problems found or the operation failed, 2 usage error
(bad flag, missing path, unknown run or id). Errors are one ``Error: ...`` line on stderr;
set ``CKPTCTL_DEBUG=1`` to see the traceback instead. Commands that need torch import it
inside the command, so ``ckptctl --help`` and ``ckptctl ls`` start fast without it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperGroup

from ckptctl import __version__
from ckptctl.config import DRIVE_OPTION_HELP, default_drive
from ckptctl.errors import CkptctlError, NotFoundError
from ckptctl.exit_codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, debug_enabled, error_line
from ckptctl.output import JSON_HELP, LIBRARY_LOGGER, QUIET_HELP, Output, until_closed
from ckptctl.render import stream_closed
from ckptctl.typer_app import App, PlainValues


def _lossless_output() -> None:
    """Print file names with undecodable bytes (``run_\\xff``) as those bytes, never crash on them."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="surrogateescape")
            except (ValueError, OSError):
                pass


def handle_error(exc: BaseException) -> int:
    """The CLI's one error handler: ``Error: …`` (one line, from the error table) on stderr; returns the exit code.

    Ctrl-C is ``Error: interrupted`` (exit 130). With ``CKPTCTL_DEBUG=1`` the exception
    propagates with its traceback instead.
    """
    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write("Error: interrupted\n")
        return EXIT_INTERRUPTED
    if debug_enabled():
        raise exc
    line, code = error_line(exc)
    with until_closed(sys.stderr):
        sys.stderr.write(line + "\n")
    return code


class _Group(PlainValues, TyperGroup):
    """Runs each command inside the error handler, and prints usage errors as one ``Error:`` line."""

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
                with until_closed(sys.stderr):
                    sys.stderr.write(f"Error: {' '.join(exc.format_message().split())}{hint}\n")
            sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
        except typer.Abort:
            sys.stderr.write("Error: aborted\n")
            sys.exit(EXIT_PROBLEMS)
        except Exception as exc:  # raised outside a command (parsing, callbacks)
            sys.exit(handle_error(exc))
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)

    def make_context(self, *args, **kwargs):
        """Click's, but ``ckptctl --help | head`` whose reader went away ends quietly, exit 0 (typer's own handler exits 1)."""
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            stream_closed()
            raise typer.Exit(EXIT_OK) from None

    def invoke(self, ctx):
        """Run the command; what it raises goes to :func:`handle_error` here, before click turns Ctrl-C into "Aborted".

        The library loggers' level (``--quiet`` raises it) is put back afterwards, for a
        process that runs several commands (tests, a notebook).
        """
        _lossless_output()
        library_log = logging.getLogger(LIBRARY_LOGGER)
        level = library_log.level
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except BrokenPipeError:  # printed outside the output object (a command's --help): see output.until_closed
            stream_closed()
            raise typer.Exit(EXIT_OK) from None
        except (Exception, KeyboardInterrupt) as exc:
            raise typer.Exit(handle_error(exc)) from None
        finally:
            library_log.setLevel(level)


app = App(
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


def split_ref(spec: str) -> tuple[str, str | None]:
    """``diff``'s argument form as (path, which): a file or a run (its newest), or ``RUN:ID`` / ``RUN:best``."""
    if not Path(spec).exists() and ":" in spec:
        run, _, which = spec.rpartition(":")
        return run, which
    return spec, None


def join_ref(spec: str, which: str | None, hint: str) -> tuple[str, str | None]:
    """``PATH [ID]`` or ``RUN:ID`` (the form ``diff`` takes) as (path, which); a usage error when both name different checkpoints."""
    path, inline = split_ref(spec)
    if inline is not None and which is not None and inline.lower() != which.lower():
        raise typer.BadParameter(f"{spec} names checkpoint {inline!r} but ID says {which!r}; give one of them", param_hint=hint)
    return path, inline if inline is not None else which


def complete_drive_runs(ctx: typer.Context, incomplete: str) -> List[str]:
    """Run names on the Drive mirror (``--drive`` if already typed, else the default) for ``--run``, and its folders of loose checkpoints."""
    from ckptctl.storage.foreign import find_groups
    from ckptctl.storage.scan import find_runs

    drive = ctx.params.get("drive") or default_drive()
    try:
        names = [r.name for r in find_runs(drive)] + [g.name for g in find_groups(drive) if g.kind == "loose"]
    except OSError:
        return []
    return [name for name in names if name.startswith(incomplete)]


# --------------------------------------------------------------------------- helpers


def _runs_at(path: Path) -> list[Path]:
    from ckptctl.storage.scan import find_runs

    try:
        return find_runs(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise NotFoundError(str(exc)) from None


def _own_runs(path: Path, verb: str, out: Output) -> list[Path]:
    """The ckptctl runs at ``path`` for a command that changes them; folders ckptctl did not write are left alone.

    With none of its own runs there, such folders are refused (ReadOnlyRunError, one line);
    beside runs of its own, they are named in a note and skipped.
    """
    runs = _runs_at(path)
    from ckptctl.errors import ReadOnlyRunError
    from ckptctl.storage.foreign import find_groups, read_only_message

    groups = find_groups(path)
    if groups and not runs:
        raise ReadOnlyRunError(f"{path}: {read_only_message(groups, verb)}")
    if groups:
        out.info(f"{path}: skipped: {read_only_message(groups, verb)}")
    return runs


def _size_option(value: str, flag: str) -> int:
    """Bytes from a size flag (``15GB``, ``500MiB``); a usage error if it is not a size."""
    from ckptctl.core.units import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None


PATH_HELP = "A folder of runs, one run directory, or a Drive mirror root."
#: ``--json`` / ``--quiet`` of every command (read by :meth:`ckptctl.output.Output.from_flags`).
JSON_OPTION = typer.Option(False, "--json", help=JSON_HELP)
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help=QUIET_HELP)


# --------------------------------------------------------------------------- ls


@app.command("ls")
def ls_command(
    path: Path = typer.Argument(Path("runs"), metavar="PATH", help=PATH_HELP, autocompletion=complete_run_paths),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
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
    from ckptctl.storage.listing import list_runs

    out = Output.from_flags(json_out, quiet)
    try:
        listing = list_runs(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise NotFoundError(str(exc)) from None
    out.finish(listing, render.render_ls)


# --------------------------------------------------------------------------- verify


@app.command("verify")
def verify_command(
    path: Path = typer.Argument(Path("runs"), metavar="PATH", help=PATH_HELP, autocompletion=complete_run_paths),
    deep: bool = typer.Option(False, "--deep", help="Also check that every floating-point tensor is finite."),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Check every checkpoint and best model: checksum against the index, then a safe trial load.

    The trial load runs on CPU with weights_only=True, memory-mapped, so pickled code in a
    file is never run (such a file is reported 'unsafe'). Statuses: ok, corrupt, missing,
    unsafe, nonfinite. Exits 1 if any file has a problem or there was nothing to verify.
    PATH may also be one checkpoint file, or a folder ckptctl did not write (loose .pt
    files, a Hugging Face Trainer output, Lightning .ckpt files, .safetensors files):
    those have no checksums and are checked by loading safely (safetensors: header and
    data bounds, then every tensor).

    \b
    Example:
        ckptctl verify runs/
        ckptctl verify runs/my_run --deep --json
        ckptctl verify /content/drive/MyDrive/ARC-EFE-Backups/checkpoint_00003.pt
    """
    from ckptctl import render

    out = Output.from_flags(json_out, quiet)
    runs, groups, files = _verify_targets(path)
    if not (runs or groups or files):
        raise CkptctlError(f"{path}: no runs here, nothing to verify")
    from ckptctl.ops import VerifyReport, verify_groups, verify_ref, verify_runs

    with out.progress("verifying") as on_progress:
        results = verify_runs(runs, deep=deep, on_progress=on_progress) + [verify_ref(ref, deep=deep) for ref in files]
        report = VerifyReport(tuple(results + verify_groups(groups, deep=deep, on_progress=on_progress)))
    if not report.results:
        raise CkptctlError(f"{path}: no checkpoints here, nothing to verify")
    from ckptctl.storage.collect import leftover_note

    for note in filter(None, map(leftover_note, runs)):
        out.info(note)
    out.finish(report, render.render_verify)


def _verify_targets(path: Path) -> tuple[list[Path], list[Any], list[Any]]:
    """What ``verify PATH`` checks: ckptctl runs, folders ckptctl did not write, and a file of a run's index (by its checksum)."""
    from ckptctl.storage.foreign import file_group, find_groups

    if path.is_file():
        from ckptctl.storage.select import select_checkpoint

        ref = select_checkpoint(path)
        return ([], [], [ref]) if ref.checksum is not None else ([], [file_group(path)], [])
    return _runs_at(path), find_groups(path), []


# --------------------------------------------------------------------------- show


@app.command("show")
def show_command(
    path: Path = typer.Argument(..., metavar="PATH", help="A run directory (or RUN:ID / RUN:best), a folder of other checkpoints, or a checkpoint file.", autocompletion=complete_run_paths),
    checkpoint: Optional[str] = typer.Argument(None, metavar="ID", help="Checkpoint id, 'best', or (other tools' folders) a checkpoint's name; default: the newest."),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Show one checkpoint in depth: components, tensors, parameters, dtypes, bytes, metrics, RNG, resume position.

    The file is checked against the index checksum (when it has one) and loaded safely.
    Other tools' checkpoints too: a .safetensors or Lightning .ckpt file, a Hugging Face
    Trainer checkpoint-N folder (or its output folder with ID N), loose .pt files.

    \b
    Example:
        ckptctl show runs/my_run          # the newest checkpoint
        ckptctl show runs/my_run 7        # or runs/my_run:7, as diff takes it
        ckptctl show runs/my_run:best --json
        ckptctl show hf_output 20         # hf_output/checkpoint-20
    """
    from ckptctl import render
    from ckptctl.storage.select import select_checkpoint

    out = Output.from_flags(json_out, quiet)
    ref = select_checkpoint(*join_ref(str(path), checkpoint, "PATH / ID"))
    from ckptctl.ops import describe_checkpoint

    out.finish(describe_checkpoint(ref), render.render_show)


# --------------------------------------------------------------------------- resume-info


@app.command("resume-info")
def resume_info_command(
    path: Path = typer.Argument(Path("runs"), metavar="PATH", help=PATH_HELP, autocompletion=complete_run_paths),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Say which checkpoint --resume would load and why, and which newer ones it would skip.

    Read-only: it checks checksums and trial-loads like resume does, but changes nothing.
    Exits 1 when a run has checkpoints but none of them verifies.

    \b
    Example:
        ckptctl resume-info runs/my_run
    """
    from ckptctl import render

    out = Output.from_flags(json_out, quiet)
    runs = _own_runs(path, "resume from", out)
    if not runs:
        raise NotFoundError(f"{path}: no runs here")
    from ckptctl.ops import ResumeInfoReport, resume_info

    out.finish(ResumeInfoReport(tuple(resume_info(run) for run in runs)), render.render_resume_info)


# --------------------------------------------------------------------------- prune


@app.command("prune")
def prune_command(
    path: Path = typer.Argument(Path("runs"), metavar="PATH", help=PATH_HELP, autocompletion=complete_run_paths),
    keep: Optional[int] = typer.Option(None, "--keep", min=1, metavar="N", help="Keep the newest N checkpoints (plus protected ones)."),
    max_size: Optional[str] = typer.Option(None, "--max-size", metavar="SIZE", help="Per run, delete oldest until checkpoints fit, e.g. 15GB, 500MiB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop; delete nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
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
    from ckptctl import render
    from ckptctl.storage.plans import PruneReport, open_prune

    out = Output.from_flags(json_out, quiet)
    if keep is None and max_size is None:
        raise typer.BadParameter("give --keep N and/or --max-size SIZE", param_hint="'--keep' / '--max-size'")
    max_bytes = _size_option(max_size, "'--max-size'") if max_size is not None else None
    runs = _own_runs(path, "prune", out)
    if not runs:
        out.info(f"{path}: no runs here, nothing to prune")
        out.emit(PruneReport(dry_run=dry_run))  # JSON only: an empty plan
        return
    with open_prune(runs, keep_last=keep, max_total_bytes=max_bytes, dry_run=dry_run, loads=_loads_safely) as session:
        for note in session.notes:
            if note.error is not None:
                out.error(note.error)
            else:
                (out.warn if note.level == "warning" else out.info)(note.message)
        plan = session.report
        if dry_run or not plan.todo:
            out.finish(plan, render.render_prune_plans)
            return
        out.human(render.render_prune_plans, plan)
        out.confirm_delete(f"Delete {plan.delete_count} checkpoint(s), freeing {render.size(plan.bytes_freed)}?", yes)
        out.finish(session.execute(), render.render_prune_done)


def _loads_safely(path: Path) -> bool:
    """The safe trial load prune needs for checkpoints without checksums (imports torch only then)."""
    from ckptctl.ops import loads_safely

    return loads_safely(path)


# --------------------------------------------------------------------------- promote


@app.command("promote")
def promote_command(
    run: Path = typer.Argument(..., metavar="RUN", help="The run directory, or RUN:ID.", autocompletion=complete_run_paths),
    checkpoint_id: Optional[int] = typer.Argument(None, metavar="ID", help="The checkpoint to make the best model (or give RUN:ID)."),
    pin: bool = typer.Option(False, "--pin", help="Also pin the checkpoint so retention never deletes it."),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Make checkpoint ID the run's best model (best_model.pt replaced atomically, marked as promoted by hand).

    The checkpoint must verify first. Takes the run lock: refuses while a trainer runs.

    \b
    Example:
        ckptctl promote runs/my_run 12 --pin
        ckptctl promote runs/my_run:12
    """
    from ckptctl import render
    from ckptctl.storage.select import single_run

    out = Output.from_flags(json_out, quiet)
    run, checkpoint_id = _promote_target(str(run), checkpoint_id)
    _own_runs(Path(run), "promote", out)
    run_dir = single_run(run)
    from ckptctl.ops import PromoteReport, promote

    out.finish(PromoteReport(run_dir.name, promote(run_dir, checkpoint_id, pin=pin), pin), render.render_promote)


def _promote_target(spec: str, checkpoint_id: Optional[int]) -> tuple[str, int]:
    """``promote``'s run and checkpoint id from ``RUN ID`` or ``RUN:ID``; usage errors for ``RUN:best``, no id, or two ids."""
    path, which = join_ref(spec, None if checkpoint_id is None else str(checkpoint_id), "RUN / ID")
    if which is None:
        raise typer.BadParameter("name the checkpoint to promote: RUN ID or RUN:ID", param_hint="ID")
    if which.lower() == "best":
        raise typer.BadParameter(f"{spec}: promoting the best model to itself changes nothing; name a checkpoint id (RUN:ID)", param_hint="RUN")
    if not (which.isascii() and which.isdigit()):
        raise typer.BadParameter(f"{which!r} is not a checkpoint id (a number)", param_hint="RUN:ID")
    return path, int(which)


# --------------------------------------------------------------------------- restore


@app.command("restore")
def restore_command(
    from_drive: bool = typer.Option(False, "--from-drive", help="Restore from the Drive mirror (required)."),
    drive: Optional[Path] = typer.Option(None, "--drive", metavar="PATH", help=DRIVE_OPTION_HELP),
    run: Optional[str] = typer.Option(None, "--run", metavar="NAME", help="Run name on the mirror [default: the run with the newest checkpoint].", autocompletion=complete_drive_runs),
    checkpoint_id: Optional[int] = typer.Option(None, "--id", metavar="N", help="Restore only this checkpoint (plus the best model)."),
    to: Path = typer.Option(Path("runs"), "--to", metavar="DIR", help="Local folder of runs; the run lands in DIR/<run name>."),
    as_name: Optional[str] = typer.Option(None, "--as", metavar="NAME", help="Local run name [default: the name on the mirror; for loose files, their folder's name]."),
    force: bool = typer.Option(False, "--force", help="Overwrite local checkpoints even when they are newer than the mirror's."),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Copy a run back from the Drive mirror, verifying checksums as it copies.

    Only missing, older or damaged local files are copied; an interrupted restore continues
    where it stopped. A local checkpoint newer than the mirror's is kept unless --force.
    Exits 1 if some mirror entry could not be restored (each is listed).
    Loose checkpoint files (the Colab guide's flat Drive folder, checkpoint_backup_*
    copies; --run names their folder, the Drive folder itself by its own name) become a
    new run (--as names it): their bytes copied as they are, then each loaded safely
    to build its index.
    Afterwards it says how to continue: `python -m ckptctl.trainloop --resume --output-dir
    DIR --run-name NAME` for a run the trainloop wrote, else `ModelPersistence("DIR/NAME",
    ...).resume(...)` in your own training loop.

    \b
    Example:
        ckptctl restore --from-drive
        ckptctl restore --from-drive --drive /mnt/drive/backups --run my_run --to runs
        ckptctl restore --from-drive --run checkpoint_backup_20250301_120000 --as arc1
    """
    from ckptctl import render
    from ckptctl.storage.restore import restore_run
    from ckptctl.storage.restore_loose import choose_restore_source, restore_loose

    out = Output.from_flags(json_out, quiet)
    if not from_drive:
        raise typer.BadParameter("only --from-drive is supported: ckptctl restore --from-drive", param_hint="'--from-drive'")
    if as_name is not None and (not as_name or as_name in (".", "..") or "/" in as_name or "\0" in as_name):
        raise typer.BadParameter(f"{as_name!r} is not a folder name", param_hint="'--as'")
    drive_root = drive if drive is not None else default_drive()
    source = choose_restore_source(drive_root, run)
    dest = to / (as_name or source.name)
    out.info(f"restoring {source if isinstance(source, Path) else source.path} -> {dest}")
    with out.progress("restoring") as on_progress:
        if isinstance(source, Path):
            report = restore_run(source, dest, only_id=checkpoint_id, force=force, on_progress=on_progress)
        else:
            report = _index_loose_restore(restore_loose(source, dest, only_id=checkpoint_id, force=force, on_progress=on_progress))
    out.finish(report, render.render_restore)


def _index_loose_restore(report: Any) -> Any:
    """Build the index of a run restored from loose files (each file loaded safely, as opening the run would); files left out become problems."""
    import dataclasses

    from ckptctl.api.adopt import index_restored_run

    index, left_out = index_restored_run(report.dest)
    bad = tuple(f"checkpoint {i} left out of the index: {why}" for i, why in left_out.items())
    return dataclasses.replace(report, problems=report.problems + bad, resume_id=max(index.by_id(), default=None))


# --------------------------------------------------------------------------- backup


@app.command("backup")
def backup_command(
    path: Path = typer.Argument(Path("runs"), metavar="PATH", help="A run directory or a folder of runs.", autocompletion=complete_run_paths),
    drive: Optional[Path] = typer.Option(None, "--drive", metavar="PATH", help=DRIVE_OPTION_HELP),
    max_size: Optional[str] = typer.Option(None, "--max-size", metavar="SIZE", help="Per run, the most the mirror may hold, e.g. 14GB, 500MiB [default: Drive's free space plus the run's mirror, less 5%]."),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
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
    from ckptctl.storage.restore import BackupReport, backup_to_drive

    out = Output.from_flags(json_out, quiet)
    if max_size is not None:
        _size_option(max_size, "'--max-size'")
    drive_root = drive if drive is not None else default_drive()
    runs = _own_runs(path, "back up", out)
    if not runs:
        raise NotFoundError(f"{path}: no runs here")
    done = []
    for run_dir in runs:
        with out.progress(f"backing up {run_dir.name}") as on_progress:
            done.append(backup_to_drive(run_dir, drive_root, max_size=max_size, on_progress=on_progress))
    out.finish(BackupReport(drive_root, tuple(done), budget_given=max_size is not None), render.render_backup)


# --------------------------------------------------------------------------- diff


@app.command("diff")
def diff_command(
    a: str = typer.Argument(..., metavar="A", help="A checkpoint file, a run (its newest), or RUN:ID / RUN:best."),
    b: str = typer.Argument(..., metavar="B", help="The same forms as A."),
    atol: float = typer.Option(0.0, "--atol", min=0.0, metavar="X", help="Treat values within this absolute difference as equal (default 0: every byte must match)."),
    show_all: bool = typer.Option(False, "--all", help="List every tensor, not only those that differ."),
    ignore_rng: bool = typer.Option(False, "--ignore-rng", help="Leave the saved RNG states out (they differ between unseeded runs)."),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Compare two checkpoints tensor by tensor: which changed, the max absolute difference, metrics side by side.

    Exits 0 when every tensor matches, 1 when any differs, like diff(1): use it to confirm
    a resumed run matches an uninterrupted one. By default tensors must be bit-identical
    (dtype, shape and every byte: -0.0 differs from 0.0); --atol compares values instead.
    --ignore-rng leaves the RNG states out (the output says so).

    \b
    Example:
        ckptctl diff runs/resumed:9 runs/straight:9
        ckptctl diff runs/a/checkpoints/checkpoint_00003.pt runs/b --json
        ckptctl diff runs/a:best runs/b:best --ignore-rng
    """
    from ckptctl import render
    from ckptctl.storage.select import select_checkpoint

    out = Output.from_flags(json_out, quiet)
    ref_a, ref_b = select_checkpoint(*split_ref(a)), select_checkpoint(*split_ref(b))
    from ckptctl.ops import diff_checkpoints

    out.finish(diff_checkpoints(ref_a, ref_b, atol=atol, ignore_rng=ignore_rng), lambda report: render.render_diff(report, show_all=show_all))


# --------------------------------------------------------------------------- export


@app.command("export")
def export_command(
    source: str = typer.Argument(..., metavar="RUN[:ID|:best]", help="A run (its newest checkpoint), RUN:ID, RUN:best, or a checkpoint file.", autocompletion=complete_run_paths),
    out: Path = typer.Argument(..., metavar="OUT", help="The file to write; its folder must exist."),
    safetensors: bool = typer.Option(False, "--safetensors", help="Write the model weights only (components that are flat name -> tensor state dicts, keys COMPONENT.NAME) as a safetensors file."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Write one checkpoint as a standalone file, whatever the run's format (shared tensors included).

    The file loads anywhere with torch.load(OUT, map_location="cpu", weights_only=True) and
    holds the full payload: format_version, epoch, batch, global_step, metrics, rng and one
    entry per component. With --safetensors it holds the model weights only. The checkpoint
    is verified first (a damaged one is refused, exit 1); OUT is written crash-safely
    (temporary name, fsync, rename). An existing OUT is refused without --force (exit 1);
    a missing run, id or folder of OUT is a usage error (exit 2).

    \b
    Example:
        ckptctl export runs/my_run model.pt              # the newest checkpoint
        ckptctl export runs/my_run:best best.safetensors --safetensors
        ckptctl export runs/my_run:12 step12.pt --force --json
    """
    from ckptctl import render
    from ckptctl.storage.select import select_checkpoint

    out_ = Output.from_flags(json_out, quiet)
    ref = select_checkpoint(*split_ref(source))
    from ckptctl.export import export_checkpoint

    out_.finish(export_checkpoint(ref, out, safetensors=safetensors, force=force), render.render_export)


# --------------------------------------------------------------------------- bench

BENCH_SECTIONS = ("save", "verify", "restore", "cli", "resume", "dedup")
#: Sections run only when asked for: ``parallel`` (a torchrun job; also ``--parallel``) and ``scale`` (on its own).
BENCH_OPTIONAL_SECTIONS = ("parallel", "scale")


def _bench_sections(sections: Optional[str], parallel: bool, nproc: Optional[int]) -> tuple[str, ...]:
    """The sections ``bench`` runs: ``--sections`` (default: all but the optional ones), with ``parallel`` added by ``--parallel`` (alone without ``--sections``)."""
    if sections is None:
        chosen = () if parallel else BENCH_SECTIONS
    else:
        chosen = tuple(part.strip() for part in sections.split(",") if part.strip())
    if parallel and "parallel" not in chosen:
        chosen += ("parallel",)
    unknown = [part for part in chosen if part not in BENCH_SECTIONS + BENCH_OPTIONAL_SECTIONS]
    if unknown:
        choices = ", ".join(BENCH_SECTIONS + BENCH_OPTIONAL_SECTIONS)
        raise typer.BadParameter(f"unknown section(s) {', '.join(unknown)}; choose from {choices}", param_hint="--sections")
    if not chosen:
        raise typer.BadParameter("no section given", param_hint="--sections")
    if "scale" in chosen and chosen != ("scale",):
        raise typer.BadParameter("'scale' runs on its own: --sections scale", param_hint="--sections")
    if nproc is not None and "parallel" not in chosen:
        raise typer.BadParameter("ranks of the parallel section: give --parallel too", param_hint="--nproc")
    return chosen


@app.command("bench")
def bench_command(
    size: str = typer.Option("1GiB", "--size", metavar="SIZE", help="Bytes of float32 tensors per checkpoint (1GiB, 256MB, ...)."),
    drive: Optional[Path] = typer.Option(None, "--drive", metavar="PATH", help="Folder to mirror to and restore from, e.g. the mounted Drive (default: a temporary folder)."),
    batch_time: float = typer.Option(0.5, "--batch-time", metavar="SECONDS", min=0.000001, help="Your seconds per training batch, for the --save-every advice."),
    repeats: int = typer.Option(3, "--repeats", min=1, max=50, help="Runs per timing; the median is reported."),
    sections: Optional[str] = typer.Option(None, "--sections", metavar="LIST", help="Comma-separated parts to run (default: save,verify,restore,cli,resume,dedup; save always runs with any of them; dedup: bytes on disk, on the mirror and uploaded per save with a frozen model); parallel: see --parallel; or 'scale' alone: save and verify one checkpoint of --size (e.g. more than half the RAM) with default settings."),
    parallel: bool = typer.Option(False, "--parallel", help="Run the parallel section: a torchrun job of --nproc ranks (gloo, CPU) saving an FSDP2-sharded model + AdamW state of --size against DCP async_save and a raw write by every rank at once. Alone unless --sections names others."),
    nproc: Optional[int] = typer.Option(None, "--nproc", metavar="N", min=1, max=64, help="Ranks of the parallel section's job (default: 2)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", metavar="DIR", help="Where local files are written (default: the system temp folder); removed afterwards."),
    json_out: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Measure checkpointing on this machine against its anchors, side by side, and advise --save-every.

    Compares the training stall per save with DCP async_save and sync torch.save, the
    background save with a raw write+fsync, verify with a cold read (and its memory),
    restore from Drive with cp+fsync, `ckptctl ls`/--help with importing typer+rich+
    humanize, and resume with a plain torch.load. With --parallel: a sharded save on N
    ranks against DCP async_save and a raw write by every rank. Each ratio shows its goal.

    \b
    Example:
        ckptctl bench --size 1GiB
        ckptctl bench --size 256MB --drive /content/drive/MyDrive --batch-time 0.8 --json
        ckptctl bench --parallel --nproc 4 --size 1GiB
    """
    from ckptctl import render

    out = Output.from_flags(json_out, quiet)
    size_bytes = _size_option(size, "--size")
    chosen = _bench_sections(sections, parallel, nproc)
    for folder, flag in ((drive, "--drive"), (workdir, "--workdir")):
        if folder is not None and not folder.is_dir():
            raise NotFoundError(f"{flag} {folder}: no such directory")
    from ckptctl.bench import run_bench

    report = run_bench(
        size_bytes,
        drive=drive,
        workdir=workdir,
        repeats=repeats,
        batch_time_s=batch_time,
        sections=chosen,
        nproc=nproc or 2,
        on_step=lambda step: out.info(f"bench: {step}"),
    )
    out.finish(report, render.render_bench)


# --------------------------------------------------------------------------- entry point


def main(argv: Optional[List[str]] = None) -> Any:
    """Console-script entry point: run the app (its group handles every error, see :func:`handle_error`)."""
    return app(args=argv, prog_name="ckptctl")


if __name__ == "__main__":  # pragma: no cover
    main()
