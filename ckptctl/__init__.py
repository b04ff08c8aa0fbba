"""ckptctl: crash-safe PyTorch checkpoints for training on machines that vanish.

Package layout (each layer imports only those above it in this list):

- ``ckptctl.core``      pure: on-disk format and naming, the index, retention rules
- ``ckptctl.storage``   file IO without torch: atomic writes, run lock, scanning, Drive mirror
- ``ckptctl.torch_io``  the only storage code importing torch: staging, save/load, verify, RNG
- ``ckptctl.persistence``  the API a training loop calls (``ModelPersistence``), a facade over ``ckptctl.api``
- ``ckptctl.trainloop`` the paired training loop; ``ckptctl.cli`` / ``ckptctl.render`` the CLI

Importing ``ckptctl`` itself does not import torch; the API names load on first use.
"""

__version__ = "0.1.0"
__all__ = ["ModelPersistence", "setup_drive_backup", "__version__"]


def __getattr__(name: str):
    if name in ("ModelPersistence", "setup_drive_backup"):
        from ckptctl import persistence

        return getattr(persistence, name)
    raise AttributeError(f"module 'ckptctl' has no attribute {name!r}")
