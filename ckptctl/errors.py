"""Exception types shared by every layer of ckptctl.

The CLI maps each of these to a one-line ``Error: ...`` and an exit code in one table.
"""


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
