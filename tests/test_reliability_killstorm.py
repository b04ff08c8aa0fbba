"""Kill storm: SIGKILL the real trainloop at many seeded random instants, resume each time.

After every kill, everything the local and Drive indexes list must be there and match
its checksum (nothing half-written is visible). Every resume must load a checkpoint that
verifies, never one older than the last durable checkpoint (the newest the index listed
at the moment of the kill, or a newer committed file), and the final state must be
bit-identical to an uninterrupted run, with no temporaries left. Counts are printed:
kills, resumes (required), max batches lost, kills inside a write (a checkpoint save, a
Drive copy). The default run does a few kills; ``make stress`` does 50+ (``-m slow``)
and requires kills inside both kinds of write.
"""

from __future__ import annotations

import itertools
import random
import re
import signal
import time
from pathlib import Path

import pytest

from ckptctl.core.format import TEMP_PREFIX
from ckptctl.storage.atomic import verify_checksum
from ckptctl.storage.mirror import tree_bytes
from ckptctl.storage.scan import read_index

from .trainloop_helpers import (
    FAST_FLAGS,
    Trainer,
    assert_log_consistent,
    assert_mirror_verifies,
    assert_same_final_state,
    replace_flags,
    trainloop_cmd,
    trainloop_env,
)

BATCHES_PER_EPOCH = 8  # FAST_FLAGS: 64 pairs in batches of 8
_BATCH_LINE = re.compile(r"^Epoch (\d+), Batch (\d+):")
_RESUMED = re.compile(r"^Resumed from checkpoint (\d+) at Epoch (\d+), Batch (\d+)")


def _position(epoch: str, batch: str) -> int:
    return int(epoch) * BATCHES_PER_EPOCH + int(batch)


def _last_durable_id(run: Path) -> int | None:
    """The newest checkpoint the index lists whose file verifies, right after a kill."""
    try:
        index = read_index(run)
    except (FileNotFoundError, Exception):
        return None
    for entry in reversed(index.checkpoints):
        try:
            verify_checksum(run / entry.path, entry.checksum)
            return entry.id
        except Exception:
            continue
    return None


def _temporaries(*folders: Path) -> int:
    return sum(1 for folder in folders if folder.is_dir() for p in folder.rglob(f"{TEMP_PREFIX}*"))


def _assert_nothing_half_written(run_dir: Path) -> None:
    """Every checkpoint the index lists (local run or Drive mirror) is there and matches its checksum."""
    if not (run_dir / "checkpoint_metadata.json").exists():
        return
    for entry in read_index(run_dir).checkpoints:
        verify_checksum(run_dir / entry.path, entry.checksum)


def kill_storm(
    root: Path, kills: int, seed: int, epochs: int, until_both_kinds: bool = False, drive_max_size: int | None = None
) -> dict[str, int]:
    """Run the storm in ``root``; return the counts. Asserts every per-kill guarantee.

    With ``until_both_kinds``, kills go on past ``kills`` (up to twice as many) until at
    least one has landed inside a checkpoint save and one inside a Drive copy. With
    ``drive_max_size``, the mirror runs under that byte budget: after every kill the
    mirror uses no more, and at the end it holds the newest checkpoint and the best model.
    """
    rng = random.Random(seed)
    flags = replace_flags(FAST_FLAGS, {"--epochs": str(epochs)})
    out, drive = root / "runs", root / "drive"
    drive.mkdir()
    reference = Trainer(trainloop_cmd(root / "reference", "reference", flags=flags), root)
    env = trainloop_env(drive=None)
    storm = ["--drive-backup", str(drive)]
    if drive_max_size is not None:
        storm += ["--drive-max-size", str(drive_max_size)]
    run = out / "storm"
    # resumes_expected: restarts after a kill that left a durable checkpoint (each must resume);
    # resumes: all restarts that resumed, which also counts a checkpoint committed just
    # before the kill but not yet in the index (the next open adopts it).
    stats = {"kills": 0, "resumes_expected": 0, "resumes": 0, "max_batches_lost": 0, "kills_inside_a_write": 0,
             "kills_inside_a_save": 0, "kills_inside_a_drive_copy": 0}
    durable: int | None = None
    last_trained: int | None = None
    for attempt in itertools.count():  # each round that does not break adds one kill
        both_kinds = stats["kills_inside_a_save"] and stats["kills_inside_a_drive_copy"]
        if attempt >= kills and not (until_both_kinds and not both_kinds and attempt < 2 * kills):
            break
        extra = ("--resume",) if attempt else ()
        trainer = Trainer(trainloop_cmd(out, "storm", *storm, *extra, flags=flags), root, env)
        if attempt:
            assert trainer.wait_for(lambda ls: any(_RESUMED.match(l) or _BATCH_LINE.match(l) for l in ls)), trainer.output
            resumed = next((m for m in map(_RESUMED.match, trainer.lines) if m), None)
            if durable is not None:
                stats["resumes_expected"] += 1
                assert resumed is not None, f"attempt {attempt}: checkpoints existed but it did not resume\n{trainer.output[-2000:]}"
                assert int(resumed.group(1)) >= durable, f"attempt {attempt}: resumed {resumed.group(1)}, older than durable {durable}"
            if resumed is not None:
                stats["resumes"] += 1
                if last_trained is not None:
                    lost = last_trained + 1 - _position(resumed.group(2), resumed.group(3))
                    stats["max_batches_lost"] = max(stats["max_batches_lost"], lost)
        seen = sum(1 for l in trainer.lines if _BATCH_LINE.match(l))
        if not trainer.wait_batches(seen + rng.randint(1, 3), timeout=120):
            break  # training finished before this kill
        time.sleep(rng.uniform(0.0, 0.04))  # land anywhere between batches: in a save, index update, Drive copy
        trainer.kill(signal.SIGKILL)
        rc = trainer.finish()
        if rc != -signal.SIGKILL:
            break
        stats["kills"] += 1
        stats["kills_inside_a_write"] += bool(_temporaries(run, drive))
        stats["kills_inside_a_save"] += bool(_temporaries(run / "checkpoints"))
        stats["kills_inside_a_drive_copy"] += bool(_temporaries(drive / "storm"))
        _assert_nothing_half_written(run)
        _assert_nothing_half_written(drive / "storm")
        if drive_max_size is not None:
            assert tree_bytes(drive / "storm") <= drive_max_size, f"attempt {attempt}: the mirror outgrew its budget"
        positions = [_position(*m.groups()) for m in map(_BATCH_LINE.match, trainer.lines) if m]
        last_trained = max(positions) if positions else last_trained
        durable = _last_durable_id(run)
    final = Trainer(trainloop_cmd(out, "storm", *storm, "--resume", flags=flags), root, env)
    assert final.finish(timeout=600) == 0, final.output[-3000:]
    assert reference.finish(timeout=600) == 0, reference.output[-3000:]
    assert_same_final_state(root / "reference" / "reference", run)
    assert_log_consistent((root / "reference" / "reference" / "training.log").read_text(), (run / "training.log").read_text())
    assert_mirror_verifies(run, drive / "storm", every_local=drive_max_size is None)
    if drive_max_size is not None:
        assert tree_bytes(drive / "storm") <= drive_max_size
    assert not _temporaries(run), "a resumed run cleans up the temporaries of killed saves"
    print(
        f"\nkill storm (seed {seed}): kills={stats['kills']}, resumes={stats['resumes']} (required {stats['resumes_expected']}), "
        f"max batches lost={stats['max_batches_lost']}, kills inside a write={stats['kills_inside_a_write']} "
        f"(a checkpoint save: {stats['kills_inside_a_save']}, a Drive copy: {stats['kills_inside_a_drive_copy']})"
    )
    return stats


def test_kill_storm_fast(tmp_path):
    stats = kill_storm(tmp_path, kills=4, seed=11, epochs=3)
    assert stats["kills"] >= 3 and stats["resumes"] >= stats["resumes_expected"] >= 2, stats
    assert stats["max_batches_lost"] <= 2 + 3  # save every 2 batches, plus what ran after the last log line


@pytest.mark.slow
def test_kill_storm_full(tmp_path):
    stats = kill_storm(tmp_path, kills=55, seed=2026, epochs=20, until_both_kinds=True)
    assert stats["kills"] >= 50, stats
    assert stats["resumes"] >= stats["resumes_expected"] >= stats["kills"] - 5, stats
    assert stats["kills_inside_a_save"] >= 1, f"no kill landed inside a checkpoint save: instants are not random enough ({stats})"
    assert stats["kills_inside_a_drive_copy"] >= 1, f"no kill landed inside a Drive copy: instants are not random enough ({stats})"


@pytest.mark.slow
def test_kill_storm_with_a_drive_budget_of_about_two_checkpoints(tmp_path):
    """A Drive that holds about two checkpoints (each ~250 kB here): kills land in copies that must
    make room first; the mirror never outgrows the budget and ends with the newest and the best."""
    stats = kill_storm(tmp_path, kills=12, seed=909, epochs=6, drive_max_size=700_000)
    assert stats["kills"] >= 10 and stats["resumes"] >= stats["resumes_expected"] >= stats["kills"] - 3, stats
