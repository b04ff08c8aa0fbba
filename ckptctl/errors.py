"""Exception types shared by every layer of ckptctl.

The CLI maps each of these to a one-line ``Error: ...`` and an exit code in one table.
"""

import errno
import os


class CkptctlError(Exception):
    """Base class of every error ckptctl raises on purpose."""


class UnsafePathError(CkptctlError):
    """A path from metadata (or a symlink) would leave the run directory."""


class CorruptIndexError(CkptctlError):
    """A metadata JSON file cannot be parsed or has the wrong shape."""


class RunLockedError(CkptctlError):
    """Another process holds the run directory's writer lock."""


class NoValidCheckpointError(CkptctlError):
    """Checkpoints exist but none of them verifies and loads."""


class CheckpointIntegrityError(CkptctlError):
    """One checkpoint file is missing, truncated, fails its checksum, or fails to load safely."""

    def __init__(self, message: str, status: str = "corrupt"):
        super().__init__(message)
        self.status = status


class BackgroundSaveError(CkptctlError):
    """A checkpoint save that ran in the background failed; reported on the next call."""


class DiskFullError(CkptctlError):
    """The disk is full and no checkpoint may be freed to make room for a new one."""


class RestoreStateError(CkptctlError):
    """A checkpoint loaded but restoring a component or an RNG state from it failed."""


class NotFoundError(CkptctlError):
    """A run, checkpoint id or file that the user named does not exist (a usage error in the CLI)."""


class DeviceUnavailableError(CkptctlError):
    """The device asked for (e.g. ``"cuda"``) does not exist on this machine; no file was judged."""


class RunNotWritableError(CkptctlError):
    """The run folder cannot be written (read-only, missing): its writer lock cannot be taken."""


class NotRegularFileError(CkptctlError, OSError):
    """A path that must be a regular file is a FIFO, a device, a socket, a directory (or, where
    links are not followed, a symlink). It was not read: opening such a thing can block forever.

    Also an :class:`OSError`, so every ``except OSError`` that handles an unreadable file
    handles this one the same way. ``kind`` names what was found (``"FIFO"``...).
    """

    def __init__(self, path: "str | os.PathLike", kind: str):
        OSError.__init__(self, errno.EINVAL, f"not a regular file ({kind})", os.fsdecode(path))
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class ReadOnlyRunError(CkptctlError):
    """The folder holds checkpoints ckptctl did not write (another tool's, or loose files): ckptctl never changes them."""
