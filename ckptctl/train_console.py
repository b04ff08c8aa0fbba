"""The paired trainloop's terminal: log lines and a progress bar, library warnings, and signals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
from typing import Any, Callable, Iterator


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
        """Print one line to stderr (above the bar, when there is one)."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def advance(self) -> None:
        """One more batch done."""
        if self._progress is not None:
            self._progress.advance(self._task)

    def stop(self) -> None:
        """Remove the bar (safe to call twice)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class RunLogHandler(logging.Handler):
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
def ckptctl_warnings_to(say: Callable[[str], None]) -> Iterator[None]:
    """Show the library's warnings inside this block through ``say`` (and only there)."""
    logger = logging.getLogger("ckptctl")
    handler = RunLogHandler(lambda line: say(line.replace("WARNING ", "warning: ", 1)))
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.propagate = propagate
        logger.removeHandler(handler)


class StopRequest:
    """SIGTERM/SIGINT: the first asks to finish the batch, save and exit; the second exits at once."""

    def __init__(self, announce: bool = True) -> None:
        """``announce``: say on stderr what a signal does (under torchrun, rank 0 says it for every rank)."""
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            # os.write, not print: the main thread may be inside a print when this runs
            if self.announce:
                os.write(2, f"{name}: finishing the current batch, saving, then exiting (send again to exit at once)\n".encode())
        else:
            if self.announce:
                os.write(2, f"{name} again: exiting now without waiting for the save\n".encode())
            os._exit(128 + signum)

