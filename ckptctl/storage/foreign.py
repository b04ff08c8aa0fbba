"""Folders of checkpoints that ckptctl did not write: finding them by their files, without torch.

A *group* is what ``ls``/``verify``/``show`` treat like a run when a folder has no run
marker (CONTRACT "Folders ckptctl did not write"). Its ``kind`` (``ls --json``'s
``"kind"``; ckptctl's own runs are ``"ckptctl"``):

- ``loose``: ``.pt``/``.pth``/``.safetensors`` files without our index, in the folder or
  in its ``checkpoints/`` subfolder: the Colab guide's flat Drive folder
  (``checkpoint_0000N.pt`` + ``best_model.pt``), ``checkpoint_backup_<time>/`` copies of
  a ``checkpoints/`` folder, files copied by hand, or one such file given as PATH.
  ``checkpoint_N.pt`` carries id N; ``best_model.pt`` is the group's best model.
- ``hf-trainer``: a Hugging Face Trainer output folder of ``checkpoint-N/`` folders (id N),
  or one ``checkpoint-N/`` folder; top-level weight files are entries too.
- ``lightning``: ``.ckpt`` files (Lightning's ``ModelCheckpoint``), in the folder or its
  ``checkpoints/`` subfolder (``lightning_logs/version_0``), or one ``.ckpt`` file.

Every group is read-only: ckptctl's writers refuse them (:class:`ReadOnlyRunError`,
:func:`refuse_read_only`); ``restore`` copies a loose group's files into a new ckptctl
run. Finding groups costs directory listings and ``stat`` calls only; symlinks are
never followed and temporaries never listed.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ckptctl.core.format import BEST_MODEL_FILE, CHECKPOINT_DIR, is_temporary_name
from ckptctl.errors import ReadOnlyRunError
from ckptctl.storage.scan import is_run_dir, regular_files_named

KINDS = ("ckptctl", "loose", "hf-trainer", "lightning")

#: File name endings of loose checkpoint files, and of Lightning's.
LOOSE_SUFFIXES = (".pt", ".pth", ".safetensors")
LIGHTNING_SUFFIX = ".ckpt"

_HF_CHECKPOINT = re.compile(r"checkpoint-([0-9]+)")
_LOOSE_ID = re.compile(r"checkpoint_([0-9]+)\.(?:pt|pth)")
#: Weight files a Trainer writes at the top of its output folder (``trainer.save_model()``).
HF_TOP_LEVEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class ForeignEntry:
    """One checkpoint of a group: a file, or (``hf-checkpoint``) a ``checkpoint-N/`` folder of ``files``.

    ``name`` is its path relative to the group's folder; ``format`` is ``torch``,
    ``safetensors``, ``lightning`` or ``hf-checkpoint``; ``best``: the group's ``best_model.pt``.
    """

    name: str
    path: Path
    id: int | None
    format: str
    size_bytes: int
    files: tuple[str, ...] = ()
    best: bool = False


@dataclass(frozen=True)
class ForeignGroup:
    """Checkpoints in a folder (or one file) that ckptctl did not write; ``kind`` is one of :data:`KINDS` but ``ckptctl``."""

    path: Path
    name: str
    kind: str
    entries: tuple[ForeignEntry, ...]

    @property
    def total_bytes(self) -> int:
        """Bytes of every entry's files."""
        return sum(e.size_bytes for e in self.entries)


def _name(path: Path) -> str:
    """A group's name: its folder's (or file's) name, also for ``.`` (``os.path.abspath``, no symlink resolved)."""
    return Path(os.path.abspath(path)).name


def file_format(name: str) -> str:
    """How a checkpoint file is read, by its name: ``safetensors``, ``lightning`` (``.ckpt``) or ``torch``."""
    if name.endswith(".safetensors"):
        return "safetensors"
    return "lightning" if name.endswith(LIGHTNING_SUFFIX) else "torch"


def _regular_files(folder: Path) -> list[tuple[str, int]]:
    """``(name, size)`` of the regular files directly in ``folder`` (no symlinks, temporaries or hidden files), by name."""
    visible = regular_files_named(folder, lambda name: None if name.startswith(".") or is_temporary_name(name) else name)
    return sorted((name, size) for name, (_, size) in visible.items())


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _checkpoint_files(folder: Path, prefix: str = "") -> list[ForeignEntry]:
    """Loose and Lightning checkpoint files directly in ``folder``, named ``prefix + name``."""
    entries = []
    for name, size in _regular_files(folder):
        if name.endswith(LOOSE_SUFFIXES + (LIGHTNING_SUFFIX,)):
            match = _LOOSE_ID.fullmatch(name)
            entries.append(
                ForeignEntry(prefix + name, folder / name, int(match.group(1)) if match else None, file_format(name), size, best=name == BEST_MODEL_FILE)
            )
    return entries


def _hf_checkpoint(folder: Path) -> ForeignEntry | None:
    """The entry of one Trainer ``checkpoint-N/`` folder, or None when ``folder`` is not one (or holds no files)."""
    match = _HF_CHECKPOINT.fullmatch(_name(folder))
    files = _regular_files(folder) if match else []
    if not files:
        return None
    return ForeignEntry(_name(folder), folder, int(match.group(1)), "hf-checkpoint", sum(s for _, s in files), tuple(n for n, _ in files))


def _unique_ids(entries: list[ForeignEntry]) -> tuple[ForeignEntry, ...]:
    """The entries with ids that name one entry only (a repeated id is dropped from all but the first)."""
    seen: set[int] = set()
    out = []
    for e in entries:
        if e.id is not None and e.id in seen:
            e = ForeignEntry(e.name, e.path, None, e.format, e.size_bytes, e.files, e.best)
        if e.id is not None:
            seen.add(e.id)
        out.append(e)
    return tuple(out)


def group_at(folder: Path) -> tuple[ForeignGroup | None, set[str]]:
    """The group ``folder`` itself holds (or None), and the names of its subfolders that group consists of."""
    single = _hf_checkpoint(folder)
    if single is not None and any(n in single.files for n in ("trainer_state.json",) + HF_TOP_LEVEL_WEIGHTS):
        return ForeignGroup(folder, _name(folder), "hf-trainer", (single,)), set()
    subfolders = [folder / n for n in _subfolder_names(folder)]
    hf = sorted((e for e in map(_hf_checkpoint, subfolders) if e is not None), key=lambda e: e.id)
    if hf:
        top = [e for e in _checkpoint_files(folder) if e.name in HF_TOP_LEVEL_WEIGHTS]
        return ForeignGroup(folder, _name(folder), "hf-trainer", _unique_ids(hf + top)), {e.name for e in hf}
    files = _checkpoint_files(folder)
    used = set()
    if _real_dir(folder / CHECKPOINT_DIR):
        inner = _checkpoint_files(folder / CHECKPOINT_DIR, CHECKPOINT_DIR + "/")
        if inner:
            files, used = files + inner, {CHECKPOINT_DIR}
    if not files:
        return None, set()
    kind = "lightning" if all(e.format == "lightning" for e in files) else "loose"
    return ForeignGroup(folder, _name(folder), kind, _unique_ids(files)), used


def _subfolder_names(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    except OSError:
        return []


def file_group(path: Path) -> ForeignGroup:
    """A group of one file given as PATH (``verify x.ckpt``): ``lightning`` for ``.ckpt``, else ``loose``."""
    size = path.stat().st_size
    match = _LOOSE_ID.fullmatch(path.name)
    entry = ForeignEntry(_name(path), path, int(match.group(1)) if match else None, file_format(path.name), size, best=path.name == BEST_MODEL_FILE)
    return ForeignGroup(path, _name(path), "lightning" if entry.format == "lightning" else "loose", (entry,))


def find_groups(path: str | os.PathLike) -> list[ForeignGroup]:
    """The groups at ``path``: a file is a group of one; a folder is a group if it holds checkpoints, and so is each subfolder (one level).

    ckptctl runs (:func:`ckptctl.storage.scan.is_run_dir`) are never groups, nor is
    anything under one. Raises FileNotFoundError when ``path`` does not exist,
    NotADirectoryError for a file not named like a checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        if not path.name.endswith(LOOSE_SUFFIXES + (LIGHTNING_SUFFIX, ".bin")):
            raise NotADirectoryError(f"{path}: not a directory or a checkpoint file ({', '.join(LOOSE_SUFFIXES)}, {LIGHTNING_SUFFIX}, .bin)")
        return [file_group(path)]
    if is_run_dir(path):
        return []
    group, used = group_at(path)
    groups = [group] if group is not None else []
    for name in _subfolder_names(path):
        child = path / name
        if name in used or is_run_dir(child):
            continue
        found, _ = group_at(child)
        if found is not None:
            groups.append(found)
    return groups


def read_only_message(groups: list[ForeignGroup], verb: str) -> str:
    """Why ``verb`` (prune, promote, back up) leaves ``groups`` alone, in one line."""
    shown = ", ".join(f"{g.name} ({g.kind})" for g in groups[:4]) + (" ..." if len(groups) > 4 else "")
    hint = ""
    if any(g.kind == "loose" for g in groups):
        hint = "; copy loose files into a ckptctl run with: ckptctl restore --from-drive --drive FOLDER --run NAME --as NEW_NAME"
    return f"ckptctl does not {verb} checkpoints it did not write: {shown} (read-only){hint}"


def refuse_read_only(path: str | os.PathLike, verb: str) -> None:
    """Raise :class:`ReadOnlyRunError` when ``path`` holds groups ckptctl did not write (and no run of its own)."""
    try:
        groups = find_groups(path)
    except FileNotFoundError:
        return
    if groups:
        raise ReadOnlyRunError(f"{path}: {read_only_message(groups, verb)}")
