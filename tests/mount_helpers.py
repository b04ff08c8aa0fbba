"""Real small filesystems for tests: a private tmpfs (``unshare -rm``) and a freezable ext4 image."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def can_mount_private_tmpfs(tmp_path: Path) -> bool:
    """True if this machine lets the tests mount a tmpfs in a private mount namespace (``unshare -rm``)."""
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "tmpfs-probe"
    probe.mkdir(exist_ok=True)
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True)
    return result.returncode == 0


def mount_loop_ext4(where: Path, image: Path) -> bool:
    """Mount a fresh 32 MiB ext4 image at ``where`` (a filesystem fsfreeze(8) can hang); False if not possible."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("mkfs.ext4", "mount", "fsfreeze")):
        return False
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    if subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True).returncode != 0:
        return False
    where.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-o", "loop", str(image), str(where)], capture_output=True).returncode == 0
