"""Where ckptctl looks when the user does not say: the environment and the Colab default.

Read only by the entry points (the CLI and the training loop); the library and the storage
layer take every path explicitly. Imports nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable naming the Drive mirror root.
DRIVE_ENV = "CKPTCTL_DRIVE"
#: The Drive folder of the Colab guide (Drive mounted at /content/drive).
COLAB_DRIVE_DEFAULT = "/content/drive/MyDrive/ARC-EFE-Backups"
#: The ``--drive`` help of the CLI commands that default to it.
DRIVE_OPTION_HELP = f"Drive mirror root [default: ${DRIVE_ENV}, else {COLAB_DRIVE_DEFAULT}]."


def drive_from_env() -> str | None:
    """``$CKPTCTL_DRIVE`` if set and not empty, else None."""
    return os.environ.get(DRIVE_ENV) or None


def default_drive() -> Path:
    """The Drive mirror root: ``$CKPTCTL_DRIVE`` if set, else the Colab default."""
    return Path(drive_from_env() or COLAB_DRIVE_DEFAULT)
