"""The one background worker of a ModelPersistence: jobs run in order, the first error wins.

A job may depend on an earlier one (the best-model copy of a checkpoint depends on that
checkpoint's write). When the earlier job failed, the dependent one is skipped: not run,
and not reported as an error of its own, so the error the caller sees is the real cause
(``ENOSPC``, ``EIO``), not "checkpoint 0 was not saved".
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from ckptctl.errors import BackgroundSaveError

log = logging.getLogger("ckptctl")


class BackgroundWorker:
    """One worker thread for saves and best-model writes, with first-error-wins reporting.

    ``background=False`` runs each job before :meth:`submit` returns and raises its error there.
    """

    def __init__(self, background: bool = True):
        self.background = background
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptctl-save")
        self._futures: list[Future] = []
        self._staging_future: Future | None = None
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()

    def _run(self, job: Callable[..., None], after: Future | None, args: tuple[Any, ...]) -> None:
        if after is not None and after.exception() is not None:
            log.info("skipping background work %s: the job it depends on failed", getattr(job, "__name__", job))
            return
        try:
            job(*args)
        except BaseException as exc:
            with self._error_lock:
                if self._error is None:  # the first error is the cause; later ones are its consequences
                    self._error = exc
            log.error("background checkpoint work failed: %s: %s", exc.__class__.__name__, exc)
            raise

    def submit(self, job: Callable[..., None], *args: Any, after: Future | None = None) -> Future:
        """Queue ``job(*args)``; skipped if ``after`` (an earlier job's future) failed. Returns its future."""
        future = self._executor.submit(self._run, job, after, args)
        self._futures = [f for f in self._futures if not f.done()] + [future]
        if not self.background:
            try:
                future.result()
            finally:
                self._clear_error()
        return future

    def _clear_error(self) -> BaseException | None:
        with self._error_lock:
            error, self._error = self._error, None
        return error

    def raise_error(self) -> None:
        """Raise the first background error not yet reported as :class:`BackgroundSaveError` (once)."""
        error = self._clear_error()
        if error is not None:
            raise BackgroundSaveError(f"a background save failed: {error.__class__.__name__}: {error}") from error

    def hold_staging(self, future: Future) -> None:
        """``future``'s job reads the reusable staging buffers: the next snapshot waits for it."""
        self._staging_future = future

    def wait_for_staging_buffers(self) -> None:
        """The staging buffers are reused: wait until the previous payload is written."""
        if self._staging_future is not None:
            _wait_quietly(self._staging_future)  # its error is reported through raise_error
            self._staging_future = None

    def wait(self, future: Future) -> None:
        """Wait for ``future``'s job, then raise the first background error, if any."""
        _wait_quietly(future)
        self.raise_error()

    def flush(self) -> None:
        """Wait for every queued job; raise :class:`BackgroundSaveError` if one failed."""
        for future in list(self._futures):
            _wait_quietly(future)
        self._futures = []
        self._staging_future = None
        self.raise_error()

    def shutdown(self, wait: bool = True) -> None:
        """Stop the worker thread (after its queued jobs when ``wait``)."""
        self._executor.shutdown(wait=wait)


def _wait_quietly(future: Future) -> None:
    try:
        future.result()
    except BaseException:
        pass
