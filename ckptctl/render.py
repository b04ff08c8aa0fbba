"""The human views of the CLI's reports: tables on stdout, warning lines and progress bars on stderr.

Each ``render_*`` takes the report a command got from the library; most draw its
``to_json()`` document, so people and scripts see the same data. Which view (human, JSON
or nothing) is printed is decided in :mod:`ckptctl.output`. Bytes are humanized only
here; JSON carries raw numbers. No torch, no file IO of runs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import select
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import humanize

from ckptctl.core.format import BEST_MODEL_FILE

if TYPE_CHECKING:  # rich is imported on first use: `ckptctl ls` prints plain text and never needs it
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

#: Metrics shown first in tables when a run has them; other metrics follow by name.
PREFERRED_METRICS = ("loss", "accuracy", "accuracy_delta", "val_loss", "val_accuracy")
MAX_METRIC_COLUMNS = 3


def _table(**kwargs: Any) -> "Table":
    from rich.table import Table

    return Table(**kwargs)


def _text(*args: Any, **kwargs: Any) -> "Text":
    from rich.text import Text

    return Text(*args, **kwargs)


#: Columns for output that goes to no terminal when ``COLUMNS`` does not say (a pipe, a log, a notebook cell).
DEFAULT_WIDTH = 80


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def width(stream: Any = None) -> int:
    """Columns to lay out for on ``stream`` (stdout): ``COLUMNS`` when set, else the terminal's width, else 80."""
    return _known_width(sys.stdout if stream is None else stream) or DEFAULT_WIDTH


def _known_width(stream: Any) -> int | None:
    """``COLUMNS`` when set, else the width of the terminal ``stream`` is; None when neither says."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if _is_tty(stream):
        try:
            return os.get_terminal_size(stream.fileno()).columns or None
        except (AttributeError, ValueError, OSError):
            pass
    return None


def colour(stream: Any = None) -> bool:
    """True when ``stream`` (stdout) is a colour terminal: a terminal, ``NO_COLOR`` unset or empty, ``TERM`` not ``dumb``.

    Everywhere else (pipes, files, ``NO_COLOR``, ``--json``) ckptctl writes no escape sequence at all.
    """
    stream = sys.stdout if stream is None else stream
    return _is_tty(stream) and not os.environ.get("NO_COLOR") and os.environ.get("TERM", "") != "dumb"


def console(stderr: bool = False) -> "Console":
    """A rich console on the current stdout (or stderr), :func:`width` columns wide, styled only on a :func:`colour` terminal.

    Tables are laid out for that width. Lines of text wrap at spaces only when the width is
    known (a terminal, or ``COLUMNS``); in a pipe they stay whole, for the reader to wrap.

    When the reader of the stream goes away (``ckptctl show | head``) the console falls
    silent (see :func:`stream_closed`) instead of exiting.
    """
    stream = sys.stderr if stderr else sys.stdout
    # markup=False: run names, paths and error details are printed as they are, never parsed as [style] tags.
    from rich.console import Console

    styled = colour(stream)
    out = Console(
        file=stream,
        width=width(stream),
        color_system="auto" if styled else None,
        highlight=False,
        markup=False,
        soft_wrap=_known_width(stream) is None,
    )

    def on_broken_pipe() -> None:
        stream_closed(stream)
        out.quiet = True

    out.on_broken_pipe = on_broken_pipe  # type: ignore[method-assign]  # rich's default exits 1
    return out


def stream_closed(stream: Any = None) -> None:
    """A reader went away (``ckptctl ls | head``): the rest of what goes to that pipe goes to /dev/null, quietly.

    Which of stdout and stderr lost its reader is asked of the pipes (both, for ``2>&1 |
    head``); ``stream`` is the one taken when that cannot be told. No message and no exit:
    the command finishes and its exit code is its own, as if everything had been read.
    """
    fds = [fd for fd in (_fileno(sys.stdout), _fileno(sys.stderr)) if fd is not None and _reader_gone(fd)]
    if not fds and _fileno(stream) is not None:
        fds = [_fileno(stream)]
    if not fds:
        return  # not a real file (a test's capture): nothing to redirect
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None


def _reader_gone(fd: int) -> bool:
    """True when ``fd`` is a pipe nobody reads any more (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or a closed fd
        return False


def heading(name: str, rest: str = "") -> "Text":
    """A bold run or checkpoint name followed by plain text."""
    text = _text(name, style="bold")
    if rest:
        text.append(f"  {rest}")
    return text


def warn(message: str) -> None:
    """One warning line on stderr."""
    sys.stderr.write(f"warning: {message}\n")


def info(message: str) -> None:
    """One informational line on stderr (hints, notes)."""
    sys.stderr.write(f"{message}\n")


def size(n: int | None) -> str:
    """Human size, decimal units as Drive quotas are sold (``1.2 GB``)."""
    return "-" if n is None else humanize.naturalsize(n, binary=False)


def age(timestamp: str | None, now: _dt.datetime | None = None) -> str:
    """``3 minutes ago`` from an ISO timestamp; ``-`` if unknown."""
    if not timestamp:
        return "-"
    try:
        when = _dt.datetime.fromisoformat(timestamp)
    except ValueError:
        return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return humanize.naturaltime(now - when)


def metric(value: Any) -> str:
    """A metric value, short."""
    if value is None:
        return "-"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def _metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for name in row.get("metrics") or {}:
            if name not in names:
                names.append(name)
    ordered = [m for m in PREFERRED_METRICS if m in names] + sorted(m for m in names if m not in PREFERRED_METRICS)
    return ordered[:MAX_METRIC_COLUMNS]


# --------------------------------------------------------------------------- progress


@contextlib.contextmanager
def progress(description: str, enabled: bool = True) -> Iterator[Optional[Callable[[int, int], None]]]:
    """Yield an ``on_progress(done, total)`` callback drawing a bytes bar on stderr, or None when not on a :func:`colour` terminal."""
    if not enabled or not colour(sys.stderr):
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        # the console parses no markup (run names are printed as they are): the style goes on the column
        TextColumn("{task.description}", markup=False, style="progress.description"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield on_progress


# --------------------------------------------------------------------------- ls


def plain_table(
    headers: list[str],
    rows: list[list[str]],
    right: set[int],
    notes: list[str] | None = None,
    paint: Callable[[int, str], str] | None = None,
) -> str:
    """A table in the look of rich's edge-less tables, built with plain string padding.

    ``ls`` prints one table per run; for a folder of 100 runs rich's layout engine costs
    over a second, this costs milliseconds. Columns in ``right`` are right-justified. Cells
    are never wrapped (a path stays whole; a row wider than the screen runs past its edge).
    ``notes[i]``, when given, goes under row ``i`` in the last column, wrapped at spaces to
    :func:`width`. ``paint(column, padded_cell)`` may style body cells (colour on a terminal).
    """
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str], sep: str, painted: bool = False) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        if painted and paint is not None:
            padded = [paint(i, c) for i, c in enumerate(padded)]
        return sep.join(padded).rstrip()

    rule = "━╇━".join("━" * w for w in widths)
    indent = sum(widths[:-1]) + 3 * (len(widths) - 1)
    out = [line(headers, " ┃ "), rule]
    for n, row in enumerate(rows):
        out.append(line(row, " │ ", painted=True))
        for text in wrap_words(notes[n] if notes else "", width() - indent):
            out.append(line([""] * (len(widths) - 1) + [text], " │ "))
    return "\n".join(out)


def wrap_words(text: str, columns: int, least: int = 30) -> list[str]:
    """``text`` in lines of at most ``columns`` (``least`` when that is narrower), broken only at spaces: a name longer than a line stays whole."""
    if not text:
        return []
    return textwrap.wrap(text, width=max(columns, least), break_long_words=False, break_on_hyphens=False) or [text]


def render_ls(listing: Any) -> None:
    """Tables of ``ls`` (a :class:`~ckptctl.storage.listing.Listing`): one per run, marks for latest / best source / Drive / pinned, then totals.

    Size is the full state a checkpoint restores, New what it added to the run's storage
    (tensors older checkpoints already hold are stored once); a run's total is its unique
    bytes on disk.

    Plain text written in one go (bold run names on a terminal): a folder of 100 runs
    prints in milliseconds, and names are never parsed as markup. The runs' problems are
    the report's warnings, printed by the output object.
    """
    runs = listing.to_json()["runs"]
    if not runs:
        sys.stdout.write("No runs found.\n")
        return
    bold = (lambda t: f"\x1b[1m{t}\x1b[0m") if colour() else (lambda t: t)
    lines: list[str] = []
    total_bytes = 0
    total_checkpoints = 0
    for run in runs:
        rows = run["checkpoints"]
        total_bytes += run["total_bytes"]
        total_checkpoints += len(rows)
        if run.get("kind", "ckptctl") != "ckptctl":  # a folder ckptctl did not write
            lines.extend(foreign_lines(run, bold(run["name"])) + [""])
            continue
        flags = []
        if run.get("status"):
            flags.append(run["status"])
        if run.get("locked"):
            flags.append("in use by a trainer")
        if not run.get("indexed"):
            flags.append("no index")
        lines.append(f"{bold(run['name'])}  {run['path']}" + (f"  ({', '.join(flags)})" if flags else ""))
        metrics = _metric_columns(rows)
        headers = ["ID", "Epoch", "Batch", "Step", *metrics, "Size", "New", "Age", "Marks"]
        right = set(range(len(headers) - 2))
        cells = [_ls_cells(row, metrics) for row in rows]
        lines.append(plain_table(headers, cells, right))
        best = run.get("best")
        if best is not None:
            source = f"from checkpoint {best['source_id']}" if best["source_id"] is not None else "saved separately"
            how = ", promoted by hand" if best.get("promoted_by_hand") else ""
            value = f", {best['metric']}={metric(best.get('value'))}" if best.get("metric") else ""
            missing = " (MISSING)" if not best.get("present", True) else ""
            adds = f" (adds {size(best['new_bytes'])})" if best["new_bytes"] != best["size_bytes"] else ""
            lines.append(f"  best model: {source}{value}{how}, {size(best['size_bytes'])}{adds}{missing}")
        lines.append(f"  {len(rows)} checkpoint(s), {size(run['total_bytes'])} in total")
        lines.extend(drive_lines(run.get("drive"), latest_id=max((r["id"] for r in rows), default=None)))
        lines.append("")
    if len(runs) > 1:
        lines.append(f"{len(runs)} runs, {total_checkpoints} checkpoints, {size(total_bytes)} in total")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


#: How ``ls`` names each kind of folder ckptctl did not write.
FOREIGN_KINDS = {"loose": "loose checkpoint files", "hf-trainer": "Hugging Face Trainer output", "lightning": "Lightning checkpoints"}


def foreign_lines(run: dict[str, Any], name: str) -> list[str]:
    """``ls`` lines of a folder ckptctl did not write (a run's ``ls --json`` form with a ``kind``): read-only, listed by name.

    Epoch, batch, step and metrics are what the files record (empty where they record
    none); marks: latest, best (the best model's source, or the monitor's best).
    """
    rows = run["checkpoints"]
    lines = [f"{name}  {run['path']}  ({FOREIGN_KINDS.get(run['kind'], run['kind'])}, read-only)"]
    metrics = _metric_columns(rows)
    headers = ["Name", "Epoch", "Batch", "Step", *metrics, "Size", "Age", "Marks"]
    cells = []
    for row in rows:
        marks = [mark for key, mark in (("latest", "latest"), ("best_source", "best")) if row[key]]
        cells.append([
            row["name"], *(_position_cell(row[k]) for k in ("epoch", "batch", "global_step")),
            *[metric(row["metrics"].get(m)) for m in metrics], size(row["size_bytes"]), age(row["timestamp"]), " ".join(marks),
        ])
    if rows:
        lines.append(plain_table(headers, cells, set(range(1, len(headers) - 2))))
    best, monitor = run.get("best"), run.get("monitor")
    if best is not None:
        where = f"epoch {best['epoch']}, batch {best['batch']}" if best["epoch"] is not None else "position not recorded"
        lines.append(f"  best model: {Path(best['path']).name} ({where}), {size(best['size_bytes'])}")
    if monitor:
        what = monitor.get("metric") or "best metric"
        mode = f" ({monitor['mode']})" if monitor.get("mode") else ""
        lines.append(f"  monitor: {what}{mode}, best {metric(monitor.get('best_score'))} at {monitor.get('best_checkpoint') or '-'}")
    lines.append(f"  {len(rows)} checkpoint(s), {size(run['total_bytes'])} in total")
    return lines


def _position_cell(value: Any) -> str:
    """An epoch, batch or step: exact when an integer (a Trainer's epoch may be fractional)."""
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else metric(value)


def drive_lines(status: dict[str, Any] | None, latest_id: int | None = None) -> list[str]:
    """The Drive mirror's lag under a run in ``ls``, from ``mirror_status.json`` (none when it has none).

    ``Drive: newest #19 verified 12 seconds ago; 2 older not mirrored (1.2 GB used, budget 14 GB)``,
    then the last error and a checkpoint too big for the budget, when there are.
    """
    if not isinstance(status, dict):
        return []
    newest = status.get("newest_verified_id")
    if isinstance(newest, int):
        text = f"Drive: newest #{newest} verified {age(status.get('newest_verified_at'))}"
    else:
        text = "Drive: no checkpoint verified there yet"
    missing = status.get("not_mirrored")
    if isinstance(missing, int) and missing > 0:
        older = " older" if isinstance(newest, int) and newest == latest_id else ""
        text += f"; {missing}{older} not mirrored"
    used, budget = status.get("used_bytes"), status.get("budget_bytes")
    details = []
    if isinstance(used, int):
        details.append(f"{size(used)} used")
    if isinstance(budget, int):
        details.append(f"budget {size(budget)}")
    if details:
        text += f" ({', '.join(details)})"
    lines = [f"  {text}"]
    if status.get("too_big"):
        lines.append(f"  Drive: {status['too_big']}")
    if status.get("last_error"):
        lines.append(f"  Drive last error: {status['last_error']}")
    return lines


def _ls_cells(row: dict[str, Any], metrics: list[str]) -> list[str]:
    marks = []
    for key, mark in (("latest", "latest"), ("best_source", "best"), ("mirrored", "drive"), ("pinned", "pinned")):
        if row[key]:
            marks.append(mark)
    if not row["indexed"]:
        marks.append("unindexed")
    if not row["present"]:
        marks.append("MISSING")
    return [
        str(row["id"]),
        "-" if row["epoch"] is None else str(row["epoch"]),
        "-" if row["batch"] is None else str(row["batch"]),
        "-" if row["global_step"] is None else str(row["global_step"]),
        *[metric(row["metrics"].get(m)) for m in metrics],
        size(row["size_bytes"]),
        size(row["new_bytes"]),
        age(row["timestamp"]),
        " ".join(marks),
    ]


# --------------------------------------------------------------------------- verify

#: ANSI colours (SGR codes) of verify's statuses, on a colour terminal only.
_STATUS_COLOUR = {"ok": "32", "corrupt": "31", "missing": "31", "unsafe": "35", "nonfinite": "33"}


def render_verify(report: Any) -> None:
    """The ``verify`` table (of a :class:`~ckptctl.ops.VerifyReport`), each problem's detail under its row, and a one-line summary.

    Paths are never split: the detail wraps at spaces to the width (``COLUMNS``, the
    terminal's, or 80), a path wider than that runs past the edge whole.
    """
    doc = report.to_json()
    rows = []
    for r in doc["results"]:
        is_best = r["id"] is None and r["path"].rpartition("/")[2] == BEST_MODEL_FILE  # a loose x.pt has no id either
        shown_id = "best" if is_best else ("-" if r["id"] is None else str(r["id"]))
        rows.append([r["run"], shown_id, r["status"], r["path"]])

    def paint(column: int, cell: str) -> str:
        code = _STATUS_COLOUR.get(cell.strip()) if column == 2 else None
        return f"\x1b[{code}m{cell}\x1b[0m" if code else cell

    table = plain_table(
        ["Run", "ID", "Status", "Path"], rows, right=set(), notes=[r["detail"] for r in doc["results"]], paint=paint if colour() else None
    )
    counts: dict[str, int] = {}
    for r in doc["results"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: kv[0] != "ok"))
    sys.stdout.write(f"{table}\n{'All good: ' if doc['ok'] else 'Problems found: '}{summary}\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- show


def render_show(report: Any) -> None:
    """``show``: one checkpoint in depth (a :class:`~ckptctl.ops.CheckpointDescription`)."""
    d = report.to_json()
    out = console()
    out.print(heading(d["label"], d["path"]))
    shared = f" (its file {size(d['file_bytes'])}, the rest in shared tensor objects)" if d["file_bytes"] != d["size_bytes"] else ""
    out.print(f"  size {size(d['size_bytes'])}{shared}, saved {age(d['timestamp'])} ({d['timestamp']})")
    out.print(f"  checksum against index: {'verified' if d['checksum_verified'] else 'not in an index (loaded safely only)'}")
    out.print(f"  epoch {d['epoch']}, batch {d['batch']}, global step {d['global_step']}")
    if d["metrics"]:
        out.print("  metrics: " + ", ".join(f"{k}={metric(v)}" for k, v in d["metrics"].items()))
    table = _table(show_edge=False, pad_edge=False)
    for name, justify in (("Component", "left"), ("Tensors", "right"), ("Elements", "right"), ("Bytes", "right"), ("Dtypes", "left")):
        table.add_column(name, justify=justify)
    for name, c in d["components"].items():
        table.add_row(name, str(c["tensors"]), f"{c['elements']:,}", size(c["bytes"]), ", ".join(c["dtypes"]))
    out.print(table)
    out.print(f"  {d['tensors']} tensors, {d['parameters']:,} model parameters")
    out.print(f"  RNG states: {', '.join(d['rng']) if d['rng'] else 'none (resume cannot restore randomness)'}")
    r = d.get("resume")
    if r:
        out.print(f"  resuming from it continues at {_position(r['next_epoch'], r['next_batch'])} (global step {r['global_step']} done)")


# --------------------------------------------------------------------------- diff


def render_diff(report: Any, show_all: bool = False) -> None:
    """``diff`` (a :class:`~ckptctl.ops.DiffReport`): positions and metrics side by side, then the tensors that differ (all with ``show_all``)."""
    d = report.to_json()
    out = console()
    a, b = d["a"], d["b"]
    # plain tables: metric and tensor names are never split or cut (a long one runs past the edge whole)
    head = [[key, str(a[key]), str(b[key])] for key in ("epoch", "batch", "global_step")]
    for name in sorted(set(a["metrics"]) | set(b["metrics"])):
        head.append([name, metric(a["metrics"].get(name)), metric(b["metrics"].get(name))])
    out.print(plain_table(["", "A: " + a["label"], "B: " + b["label"]], head, right=set()), soft_wrap=True)
    rows = [t for t in d["tensors"] if show_all or t["status"] != "same"]
    if rows:
        cells = []
        for t in rows:
            shape_a = "-" if t["shape_a"] is None else "×".join(map(str, t["shape_a"])) or "scalar"
            shape_b = "-" if t["shape_b"] is None else "×".join(map(str, t["shape_b"])) or "scalar"
            cells.append([t["name"], t["status"], shape_a, shape_b, _max_abs_diff(t)])
        out.print(plain_table(["Tensor", "Status", "Shape A", "Shape B", "Max |A-B|"], cells, right=set()), soft_wrap=True)
    if d.get("rng_ignored"):
        out.print("RNG states were ignored (--ignore-rng)")
    if d["bit_identical"]:
        out.print(f"Identical: all {d['compared']} tensors are bit-identical")
    elif d["identical"]:
        out.print(f"Identical: all {d['compared']} tensors match within {d['atol']:g}")
    else:
        out.print(f"Different: {d['changed']} of {d['compared']} tensors differ")


def _max_abs_diff(t: dict[str, Any]) -> str:
    """A ``diff`` row's largest difference: exact for integers; a changed row at 0 differs in its bits (-0.0, a NaN's payload)."""
    worst = t["max_abs_diff"]
    if worst is None:
        return "-"
    if isinstance(worst, int):
        return str(worst)
    if worst == 0 and t["status"] == "changed":
        return "0 (bits differ)"
    return f"{worst:.3g}"


# --------------------------------------------------------------------------- resume-info


def render_resume_info(report: Any) -> None:
    """``resume-info`` (a :class:`~ckptctl.ops.ResumeInfoReport`): per run, what resume would load and what it would skip."""
    for info in report.runs:
        _render_resume_info_run(info.to_json())


def _render_resume_info_run(d: dict[str, Any]) -> None:
    out = console()
    out.print(heading(d["run"], d["path"]))
    if d.get("index_problem"):
        out.print(f"  index unreadable ({d['index_problem']}); resume rebuilds it from the checkpoint files")
    for s in d["skipped"]:
        out.print(f"  skip checkpoint {s['id']}: {s['status']} - {s['detail']}")
    c = d["checkpoint"]
    if c is None:
        out.print(f"  {d['reason']}")
        return
    out.print(f"  would load checkpoint {c['id']}: {c['path']}")
    out.print(f"  epoch {c['epoch']}, batch {c['batch']}, global step {c['global_step']}, saved {age(c['timestamp'])}")
    if c["metrics"]:
        out.print("  metrics: " + ", ".join(f"{k}={metric(v)}" for k, v in c["metrics"].items()))
    out.print(f"  why: {d['reason']}")
    if c.get("next_epoch") is not None:
        out.print(f"  training continues at {_position(c['next_epoch'], c['next_batch'])}")


def _position(epoch: int, batch: int) -> str:
    """Where training continues, as ``epoch 3, batch 0 (the start of the epoch)``."""
    return f"epoch {epoch}, batch {batch}" + (" (the start of the epoch)" if batch == 0 else "")


# --------------------------------------------------------------------------- prune


def render_prune_plans(report: Any) -> None:
    """The delete plan of each run (a :class:`~ckptctl.storage.plans.PruneReport`): what goes, what stays and why, bytes freed."""
    out = console()
    dry_run = report.dry_run
    for plan in report.plans:
        out.print(heading(plan.run_dir.name, str(plan.run_dir)))
        for entry in plan.delete:
            out.print(f"  delete checkpoint {entry.id:>4}  {size(plan.sizes.get(entry.id, 0)):>9}  {entry.path}")
        for entry in plan.keep:
            why = plan.protected.get(entry.id)
            out.print(f"  keep   checkpoint {entry.id:>4}  {size(plan.sizes.get(entry.id, 0)):>9}" + (f"  ({why})" if why else ""))
        for reason in plan.skipped:
            out.print(f"  skip   {reason}")
        shared = sum(plan.packs_freed.values())
        of_shared = f" ({size(shared)} of it shared tensor objects no kept checkpoint uses)" if shared else ""
        out.print(f"  frees {size(plan.bytes_freed)}{of_shared}; {size(plan.bytes_after)} of checkpoints stay")
        if not plan.fits:
            warn(f"{plan.run_dir.name}: protected checkpoints alone take {size(plan.bytes_after)}, more than --max-size {size(plan.max_total_bytes)}")
    verb = "Would delete" if dry_run else "Plan: delete"
    out.print(f"{verb} {report.delete_count} checkpoint(s), freeing {size(report.bytes_freed)}." + (" (dry run: nothing deleted)" if dry_run else ""))


def render_prune_done(report: Any) -> None:
    """After ``prune`` executed its plan: how many files it deleted (a note on stderr; the plan was shown before)."""
    paths = [path for done in (report.deleted or {}).values() for path in done]
    packs = sum(1 for path in paths if path.startswith("objects/"))
    also = f" and {packs} shared tensor object(s) nothing else references" if packs else ""
    info(f"Deleted {len(paths) - packs} checkpoint file(s){also}.")


# --------------------------------------------------------------------------- promote, restore, backup


def render_promote(report: Any) -> None:
    """``promote`` (a :class:`~ckptctl.ops.PromoteReport`): the run's new best model in one line."""
    best = report.best
    console().print(
        f"{report.run}: best model is now checkpoint {best.source_id} "
        f"(epoch {best.epoch}, batch {best.batch}, {size(best.size_bytes)})" + (", pinned" if report.pinned else "")
    )


def render_restore(report: Any) -> None:
    """``restore`` (a :class:`~ckptctl.storage.restore.RestoreReport`): what was copied, kept, and where resume starts."""
    out = console()
    packs = f" and {len(report.objects_copied)} tensor pack(s)" if report.objects_copied else ""
    copied = size(report.bytes_copied + report.objects_bytes)
    out.print(f"Restored {len(report.copied)} file(s){packs} ({copied}) into {report.dest}; {len(report.already)} already present.")
    for rel in report.kept_local:
        out.print(f"  kept local {rel}: newer than the mirror's (use --force to overwrite)")
    for note in getattr(report, "notes", ()):
        info(note)
    for problem in report.problems:
        warn(problem)
    if report.resume_id is not None:
        out.print(f"Resume will start from checkpoint {report.resume_id}, with:")
        out.print(f"  {report.resume_command}", soft_wrap=True)  # one line, never wrapped: it is copied and pasted


def render_backup(report: Any) -> None:
    """``backup`` (a :class:`~ckptctl.storage.restore.BackupReport`): per run, what was copied and what is not on the mirror."""
    from ckptctl.storage.mirror import BUDGET_MARGIN

    out = console()
    for run in report.runs:
        rep = run.sync
        out.print(
            f"{run.run_dir.name}: copied {len(rep.copied)} file(s)"
            + (f" and {len(rep.objects_copied)} tensor pack(s)" if rep.objects_copied else "")
            + f" ({size(rep.uploaded_bytes)} uploaded), "
            f"{len(rep.skipped)} already on the mirror, {len(rep.deleted)} old removed -> {run.mirror}"
        )
        if not report.budget_given and rep.budget_bytes is not None:
            out.print(
                f"  Drive budget {size(rep.budget_bytes)} (free space plus this run's mirror, "
                f"less {BUDGET_MARGIN:.0%}; --max-size sets it)"
            )
        if rep.not_mirrored:
            out.print(
                f"  newest on the mirror: #{rep.newest_verified_id}; not mirrored: "
                f"{', '.join(map(str, rep.not_mirrored))} ({size(rep.used_bytes)} used of {size(rep.budget_bytes)})"
            )


# --------------------------------------------------------------------------- export


def render_export(report: Any) -> None:
    """``export`` (a :class:`~ckptctl.export.ExportReport`): what was written where, in one line, and what was left out."""
    what = "model weights" if report.format == "safetensors" else "full checkpoint"
    console().print(
        f"Exported {report.label} ({what}: {report.tensors} tensors of {', '.join(report.components)}) "
        f"to {report.out}, {size(report.size_bytes)}"
    )
    if report.left_out:
        info(f"left out (not model weights): {', '.join(report.left_out)}")


# --------------------------------------------------------------------------- bench

_BENCH_TIMES = [
    ("stall_s", "training stall per save (ckptctl)"),
    ("dcp_async_blocking_s", "DCP async_save, blocking part"),
    ("sync_save_s", "sync torch.save + fsync"),
    ("background_save_s", "ckptctl background save (write, fsync, checksum, index)"),
    ("raw_write_s", "raw write + fsync"),
    ("verify_s", "ckptctl verify (checksum + trial load), cold"),
    ("cold_read_s", "cold sequential read"),
    ("restore_s", "restore from the mirror (copy + checksum)"),
    ("cp_fsync_s", "cp + fsync"),
    ("ls_small_s", "ckptctl ls, 100 runs x 5 x 1 MB"),
    ("ls_large_s", "ckptctl ls, 100 runs x 5 x 1 GB"),
    ("help_s", "ckptctl --help"),
    ("import_typer_rich_humanize_s", "python -c 'import typer, rich, humanize'"),
    ("resume_s", "resume: process start to first step"),
    ("plain_load_s", "plain torch.load: process start to first step"),
    ("parallel_stall_s", "parallel: training stall per save (ckptctl, slowest rank)"),
    ("parallel_dcp_async_blocking_s", "parallel: DCP async_save, blocking part (slowest rank)"),
    ("parallel_write_s", "parallel: ckptctl save call to flush end (all ranks)"),
    ("parallel_raw_write_s", "parallel: raw write + fsync (all ranks at once)"),
]


def _render_parallel_note(out: Any, m: dict[str, Any]) -> None:
    """What the parallel section saved and wrote (and, on stderr, why its state was not sharded when it was not)."""
    layout = "FSDP2-sharded" if m["parallel_layout"] == "fsdp2" else "DDP-replicated"
    out.print(
        f"parallel: {m['parallel_world_size']} ranks (gloo, CPU), {layout} model + AdamW state of {size(m['parallel_state_bytes'])}; "
        f"ckptctl wrote {size(m['parallel_written_bytes'])} per save, the raw write {size(m['parallel_raw_bytes'])}"
    )
    if m.get("parallel_layout_note"):
        warn(f"parallel: measured a DDP-replicated state: {m['parallel_layout_note']}")


def render_bench(report: Any) -> None:
    """The ``bench`` tables (a :class:`~ckptctl.bench.BenchReport`): timings, ratios against their goals, and the --save-every advice."""
    result = report.to_json()
    out = console()
    m = result["measurements"]
    out.print(heading("ckptctl bench", f"{size(result['size_bytes'])} of float32 tensors"))
    times = _table(show_edge=False, pad_edge=False)
    times.add_column("Operation")
    times.add_column("Time", justify="right")
    for key, label in _BENCH_TIMES:
        if m.get(key) is not None:
            times.add_row(label, f"{m[key] * 1000:.1f} ms" if m[key] < 1 else f"{m[key]:.2f} s")
    out.print(times)
    if m.get("staging_bytes") is not None:
        out.print(f"staging memory: {size(m['staging_bytes'])} (one CPU copy of the saved state, reused)")
    if m.get("verify_peak_rss_bytes") is not None:
        out.print(f"verify peak memory: {size(m['verify_peak_rss_bytes'])} (interpreter baseline {size(m['baseline_peak_rss_bytes'])})")
    if m.get("parallel_world_size") is not None:
        _render_parallel_note(out, m)
    out.print()
    ratios = _table(show_edge=False, pad_edge=False)
    ratios.add_column("Goal")
    ratios.add_column("Ratio", justify="right")
    ratios.add_column("Target", justify="right")
    ratios.add_column("Met")
    for name, r in result["ratios"].items():
        value = "-" if r["value"] is None else f"{r['value']:.3g}"
        met = "-" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        ratios.add_row(r["what"], value, f"{r['direction']} {r['goal']}", met)
    out.print(ratios)
    if m.get("scale_bytes") is not None:
        staged = "a staged copy" if m["scale_staged_bytes"] else "no staging copy (written from the live tensors)"
        out.print(
            f"scale: {size(m['scale_bytes'])} saved in {m['scale_save_s']:.1f} s with {staged}; "
            f"verified in {m['scale_verify_s']:.1f} s with a peak of {size(m['scale_verify_peak_rss_bytes'])}"
        )
    rec = result["recommendation"]
    if rec is None:
        return
    out.print(
        f"With {rec['batch_time_s']} s per batch, --save-every {rec['save_every']} keeps the training stall "
        f"({rec['stall_s'] * 1000:.1f} ms per save) under 1% of training time."
    )
