"""The one output object of the CLI: every command hands its report here, in one of three modes.

- ``human`` (default): the report's renderer from :mod:`ckptctl.render` draws tables on
  stdout; notes, warnings and (on a terminal) progress bars go to stderr.
- ``json`` (``--json``): ``report.to_json()`` as one JSON document on stdout; notes and
  warnings still go to stderr; no progress bars.
- ``quiet`` (``--quiet``/``-q``): nothing on stdout and no notes or warnings (the library's
  logged warnings included); the exit code alone carries the result. ``Error: …`` lines
  still go to stderr.

A report is any object with ``to_json()`` and ``ok`` (False makes the command exit 1); it
may also have ``warnings`` (lines for stderr, printed after the data in human and JSON
modes). No torch here.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol

import typer

from ckptctl import render
from ckptctl.errors import CkptctlError
from ckptctl.exit_codes import EXIT_PROBLEMS, error_line

ProgressCallback = Optional[Callable[[int, int], None]]

JSON_HELP = "Print JSON on stdout (raw numbers: bytes as int, UTC ISO timestamps)."
QUIET_HELP = "Print nothing but errors; the exit code alone says how it went."


class Report(Protocol):
    """What a command hands to :meth:`Output.emit`: a frozen dataclass of the library's results."""

    @property
    def ok(self) -> bool: ...

    def to_json(self) -> Any: ...


class Mode(enum.Enum):
    """How a command prints its report."""

    HUMAN = "human"
    JSON = "json"
    QUIET = "quiet"


def print_json(data: Any) -> None:
    """Write ``data`` to stdout as indented JSON (raw numbers, NaN refused)."""
    sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def until_closed(stream: Any) -> Iterator[None]:
    """Print to ``stream`` until its reader goes away (``ckptctl ls | head``): then stop printing, quietly.

    A closed pipe is not an error: no message, no traceback, and the command goes on to
    exit with its own code (0 when all is well; ``verify`` still 1 when it found problems).
    ckptctl does not die of SIGPIPE as ``git log | head`` does (141 under ``pipefail``): a
    reader going away never stops a prune or a restore half-way.
    """
    try:
        yield
    except BrokenPipeError:
        render.stream_closed(stream)


#: The library's loggers (``ckptctl``, ``ckptctl.mirror``, ...): quiet mode raises their level to ERROR.
LIBRARY_LOGGER = "ckptctl"


def _silence_library_warnings() -> None:
    """Keep the library's logged warnings off stderr (errors still show); the CLI's group restores the level afterwards."""
    logging.getLogger(LIBRARY_LOGGER).setLevel(logging.ERROR)


@dataclass(frozen=True)
class Output:
    """Prints reports, notes and errors for one command run in one :class:`Mode`."""

    mode: Mode = Mode.HUMAN

    @classmethod
    def from_flags(cls, json_out: bool = False, quiet: bool = False) -> "Output":
        """The output for ``--json`` / ``--quiet`` (a usage error when both are given)."""
        if json_out and quiet:
            raise typer.BadParameter("--json and --quiet exclude each other", param_hint="'--json' / '--quiet'")
        if quiet:
            _silence_library_warnings()
        return cls(Mode.JSON if json_out else Mode.QUIET if quiet else Mode.HUMAN)

    def emit(self, report: Report, human: Callable[[Any], None] | None = None) -> None:
        """Print ``report``: its JSON, or ``human(report)`` (nothing if None), or nothing when quiet; then its warnings."""
        if self.mode is Mode.QUIET:
            return
        with until_closed(sys.stdout):
            if self.mode is Mode.JSON:
                print_json(report.to_json())
            elif human is not None:
                human(report)
        for line in getattr(report, "warnings", ()):
            self.warn(line)

    def finish(self, report: Report, human: Callable[[Any], None] | None = None) -> None:
        """:meth:`emit` the report, then exit 1 when it is not ok (the command's last step)."""
        self.emit(report, human)
        if not report.ok:
            raise typer.Exit(EXIT_PROBLEMS)

    def human(self, render_fn: Callable[..., None], *args: Any) -> None:
        """Call a human renderer only in human mode (e.g. a plan shown before a question)."""
        if self.mode is Mode.HUMAN:
            with until_closed(sys.stdout):
                render_fn(*args)

    def info(self, message: str) -> None:
        """A note on stderr (not when quiet)."""
        if self.mode is not Mode.QUIET:
            with until_closed(sys.stderr):
                render.info(message)

    def warn(self, message: str) -> None:
        """``warning: …`` on stderr (not when quiet)."""
        if self.mode is not Mode.QUIET:
            with until_closed(sys.stderr):
                render.warn(message)

    def error(self, exc: BaseException) -> int:
        """``Error: …`` for ``exc`` on stderr, in every mode (for a failure the command goes on after); returns its exit code."""
        line, code = error_line(exc)
        with until_closed(sys.stderr):
            sys.stderr.write(line + "\n")
        return code

    def progress(self, description: str) -> AbstractContextManager[ProgressCallback]:
        """A progress callback drawing a bar on stderr in human mode on a terminal; None otherwise."""
        return render.progress(description, enabled=self.mode is Mode.HUMAN)

    def confirm_delete(self, question: str, yes: bool) -> None:
        """Go on deleting if ``yes`` (``--yes``) or the user agrees on a terminal; exit 1 if not.

        Without a terminal it refuses at once (exit 1, "pass --yes") instead of waiting for
        an answer that cannot come.
        """
        if yes:
            return
        if not sys.stdin.isatty():
            raise CkptctlError("refusing to delete without confirmation: not a terminal (pass --yes to go ahead)")
        if not typer.confirm(question, default=False, err=True):
            self.info("Nothing deleted.")
            raise typer.Exit(EXIT_PROBLEMS)
