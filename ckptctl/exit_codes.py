"""Exit codes, and the one table from exception type to exit code and one-line message.

The CLI's single error handler uses :func:`error_line`; the training loop can share the
same table (prepending its own rows, see :func:`error_message`). Imports neither torch
nor the CLI libraries, so any entry point can use it.

Exit codes: 0 ok, 1 problems found or the operation failed, 2 usage error (bad flag,
missing path, unknown run or id), 128+N stopped by signal N (130: Ctrl-C).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckptctl.core.messages import one_line
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
EXIT_INTERRUPTED = 130  # 128 + SIGINT
#: Set to anything but ``""``/``"0"`` to get the traceback instead of the one ``Error:`` line.
DEBUG_ENV = "CKPTCTL_DEBUG"


@dataclass(frozen=True)
class ErrorRule:
    """One row of an error table: exceptions of ``kind`` exit with ``code``; ``hint`` is appended in parentheses."""

    kind: type[BaseException]
    code: int
    hint: str | None = None


#: The one table from exception type to exit code (and hint). First match wins, so subclasses come first.
ERROR_TABLE: tuple[ErrorRule, ...] = (
    ErrorRule(NotFoundError, EXIT_USAGE),
    ErrorRule(RunLockedError, EXIT_PROBLEMS, "a trainer is using this run; stop it (or let it finish) and try again"),
    ErrorRule(CheckpointIntegrityError, EXIT_PROBLEMS),
    ErrorRule(NoValidCheckpointError, EXIT_PROBLEMS),
    ErrorRule(CorruptIndexError, EXIT_PROBLEMS),
    ErrorRule(UnsafePathError, EXIT_PROBLEMS),
    ErrorRule(CkptctlError, EXIT_PROBLEMS),
    ErrorRule(FileNotFoundError, EXIT_USAGE),
    ErrorRule(NotADirectoryError, EXIT_USAGE),
    ErrorRule(PermissionError, EXIT_PROBLEMS),
    ErrorRule(OSError, EXIT_PROBLEMS),
)


def debug_enabled() -> bool:
    """True when :data:`DEBUG_ENV` asks for tracebacks instead of one-line errors."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def signal_exit_code(signum: int) -> int:
    """The exit code of a process stopped by signal ``signum`` (the shell's convention, 128 + N)."""
    return 128 + signum


def error_message(exc: BaseException, table: tuple[ErrorRule, ...] = ERROR_TABLE) -> tuple[str, int]:
    """The message (with its hint) and exit code for ``exc`` from ``table``; first matching row wins.

    An :class:`OSError` that is not one of ckptctl's own errors reads ``FILE: strerror``
    (no ``[Errno N]``). An exception no row matches is unexpected: exit 1, and the message
    says how to see its traceback. A caller with errors of its own (the training loop's
    refused start, exit 2) passes ``(ErrorRule(ItsError, EXIT_USAGE), *ERROR_TABLE)``.
    """
    for rule in table:
        if isinstance(exc, rule.kind):
            if isinstance(exc, OSError) and not isinstance(exc, CkptctlError) and exc.strerror:
                text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
            else:
                text = str(exc) or rule.kind.__name__
            return text + (f" ({rule.hint})" if rule.hint else ""), rule.code
    return f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)", EXIT_PROBLEMS


def error_line(exc: BaseException, table: tuple[ErrorRule, ...] = ERROR_TABLE) -> tuple[str, int]:
    """``Error: …`` for ``exc`` as one line (whitespace collapsed, terminal escapes removed), and its exit code."""
    message, code = error_message(exc, table)
    return f"Error: {one_line(message)}", code
