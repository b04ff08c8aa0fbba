"""ModelPersistence on real files with real torch: round trips, retention, fallbacks, safety."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading

import numpy as np
import pytest
import torch

from ckptctl import ModelPersistence, setup_drive_backup
from ckptctl.core.format import BEST_MODEL_FILE, INDEX_FILE, TEMP_PREFIX
from ckptctl.errors import (
    BackgroundSaveError,
    CheckpointIntegrityError,
    CkptctlError,
    NoValidCheckpointError,
    RestoreStateError,
)
from ckptctl.storage.scan import read_best, read_index
from ckptctl.tensors import compare_states
from ckptctl.torch_io import safe_load

from .damage import damage
from .runs import ckpt, fresh_components


class LearnableLoss(torch.nn.Module):
    """A loss module with a learnable temperature (a component of its own)."""

    def __init__(self):
        super().__init__()
        self.log_temp = torch.nn.Parameter(torch.zeros(()))

    def forward(self, logits, target):
        return torch.nn.functional.cross_entropy(logits * self.log_temp.exp(), target)


class Rig:
    """Model + loss + optimizer + scheduler + GradScaler, stepping deterministically from the global RNGs."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.agent = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Dropout(0.3), torch.nn.Linear(12, 3))
        self.loss = LearnableLoss()
        params = list(self.agent.parameters()) + list(self.loss.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=20)
        self.scaler = torch.amp.GradScaler("cpu", enabled=True)

    def step(self):
        x = torch.randn(8, 6)
        y = torch.from_numpy(np.random.randint(0, 3, size=8))
        noise = random.random()
        loss = self.loss(self.agent(x), y) + 0 * noise
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item(), noise

    def components(self):
        return dict(agent=self.agent, loss_fn=self.loss, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def flat_state(rig):
    out = {}
    for name, comp in rig.components().items():
        for k, v in comp.state_dict().items():
            out[f"{name}.{k}"] = v
    return out


def assert_same_state(a, b):
    """Every tensor, nested ones included (optimizer moments), bit-identical; every other top-level value equal."""
    assert a.keys() == b.keys()
    differ = [(r.name, r.status) for r in compare_states(a, b) if not r.bit_identical]
    assert not differ, differ
    for k in a:
        if not isinstance(a[k], (torch.Tensor, dict)):
            assert a[k] == b[k], k


def test_round_trip_of_all_components_and_rng_gives_identical_continuation(tmp_path):
    run = tmp_path / "runs" / "r"
    seed_all(1)
    rig = Rig()
    with ModelPersistence(run, save_every_n_batches=3) as p:
        for batch in range(3):
            rig.step()
            p.maybe_save(0, batch, {"loss": 1.0}, **rig.components())
        reference = [rig.step() for _ in range(5)]  # continues after the checkpoint
        reference_state = flat_state(rig)

    seed_all(999)  # different RNG state and fresh weights: resume must restore everything
    other = Rig(seed=5)
    with ModelPersistence(run) as p:
        info = p.resume(**other.components())
        assert (info["checkpoint_id"], info["epoch"], info["batch"], info["global_step"]) == (0, 0, 2, 3)
        assert info["skipped"] == []
        continued = [other.step() for _ in range(5)]
    assert continued == reference
    assert_same_state(flat_state(other), reference_state)


def test_checkpoint_file_loads_with_weights_only_and_has_the_documented_keys(tmp_path):
    run = tmp_path / "r"
    rig = Rig()
    with ModelPersistence(run) as p:
        p.save_checkpoint(2, 7, {"loss": torch.tensor(0.25)}, global_step=42, **rig.components())
    # format 2: the file is a skeleton (tensors replaced by references to packs), loadable with weights_only
    skeleton = torch.load(run / "checkpoints" / "checkpoint_00000.pt", map_location="cpu", weights_only=True)
    assert skeleton["format_version"] == 2 and skeleton["objects"] and not any(
        isinstance(v, torch.Tensor) for v in skeleton["agent"].values()
    )
    data = safe_load(run / "checkpoints" / "checkpoint_00000.pt")
    for key in ("format_version", "epoch", "batch", "global_step", "metrics", "timestamp", "rng", "agent", "optimizer", "scheduler", "scaler", "loss_fn"):
        assert key in data, key
    assert (data["epoch"], data["batch"], data["global_step"], data["metrics"]) == (2, 7, 42, {"loss": 0.25})
    assert set(data["rng"]) >= {"python", "numpy", "torch_cpu"}
    index = json.loads((run / INDEX_FILE).read_text())
    assert index["format_version"] == 2
    (entry,) = index["checkpoints"]
    assert entry["path"] == "checkpoints/checkpoint_00000.pt"
    assert entry["size_bytes"] == os.path.getsize(run / entry["path"])
    assert entry["checksum"].startswith("xxh3_128:")


def test_maybe_save_rule_counts_global_steps_across_epochs(tmp_path):
    rig = Rig()
    saved = []
    with ModelPersistence(tmp_path / "r", save_every_n_batches=4, max_checkpoints=10) as p:
        for epoch in range(3):
            for batch in range(3):  # 3 batches per epoch: global steps 1..9
                if p.maybe_save(epoch, batch, {}, **rig.components()) is not None:
                    saved.append((epoch, batch, p.global_step))
        assert p.maybe_save(5, 0, {}, global_step=12, **rig.components()) == 2
        assert p.maybe_save(5, 1, {}, global_step=13, **rig.components()) is None
    assert saved == [(1, 0, 4), (2, 1, 8)]


def test_retention_keeps_last_k_plus_best_source_and_ids_are_never_reused(tmp_path):
    run = tmp_path / "r"
    rig = Rig()
    with ModelPersistence(run, max_checkpoints=2, save_every_n_batches=1, best_mode="min", best_metric="loss") as p:
        for batch, loss in enumerate([5.0, 1.0, 3.0, 4.0, 6.0]):
            p.maybe_save(0, batch, {"loss": loss}, **rig.components())
            p.update_best(0, batch, {"loss": loss}, **rig.components())
        p.flush()
        assert sorted(p.checkpoints) == [1, 3, 4]  # 1 is the best model's source
        assert p.best["source_id"] == 1
    assert sorted(os.listdir(run / "checkpoints")) == ["checkpoint_00001.pt", "checkpoint_00003.pt", "checkpoint_00004.pt"]
    with ModelPersistence(run, max_checkpoints=2, save_every_n_batches=1) as p:
        p.resume(**rig.components())
        assert p.save_checkpoint(0, 5, {}, **rig.components()) == 5


def test_update_best_by_metric_mode_nan_and_without_a_matching_checkpoint(tmp_path):
    run = tmp_path / "r"
    rig = Rig()
    with ModelPersistence(run, best_metric="acc") as p:
        assert p.update_best(0, 0, {"acc": 0.5}, **rig.components()) is True
        assert p.update_best(0, 1, {"acc": 0.4}, **rig.components()) is False
        assert p.update_best(0, 2, {"acc": float("nan")}, **rig.components()) is False
        with pytest.raises(KeyError, match="acc"):
            p.update_best(0, 3, {"loss": 1.0}, **rig.components())
        p.flush()
        assert p.best["source_id"] is None and p.best["value"] == 0.5
    best = read_best(run)
    assert best.metrics == {"acc": 0.5} and best.checksum.startswith("xxh3_128:")
    # the best value survives a restart: a worse one does not replace it
    with ModelPersistence(run, best_metric="acc") as p:
        assert p.update_best(1, 0, {"acc": 0.45}, **rig.components()) is False
        assert p.update_best(1, 1, {"acc": 0.9}, **rig.components()) is True


def test_best_copied_from_checkpoint_is_byte_identical_and_loads(tmp_path):
    run = tmp_path / "r"
    rig = Rig()
    with ModelPersistence(run, save_every_n_batches=1) as p:
        rig.step()
        cid = p.maybe_save(0, 0, {"accuracy_delta": 0.1}, **rig.components())
        assert p.update_best(0, 0, {"accuracy_delta": 0.1}, **rig.components()) is True
        p.flush()
        assert (run / BEST_MODEL_FILE).read_bytes() == (run / "checkpoints" / "checkpoint_00000.pt").read_bytes()
        assert p.best["source_id"] == cid
        expected = {k: v.clone() for k, v in rig.agent.state_dict().items()}
        rig.step()
        meta = p.load_best_model(agent=rig.agent)
    assert meta["batch"] == 0
    for k, v in rig.agent.state_dict().items():
        assert torch.equal(v, expected[k])


@pytest.mark.parametrize(
    "how,error",
    [("truncate_half", "checksum mismatch"), ("truncate_zero", "checksum mismatch"), ("flip_bit", "checksum mismatch"),
     ("delete", "file is missing"), ("garbage", "checksum mismatch")],
)
def test_resume_falls_back_past_a_damaged_newest_checkpoint(make_run, how, error):
    run = make_run("r", n=3, keep=5, best=False)
    damage(ckpt(run, 2), how)
    with ModelPersistence(run) as p:
        with pytest.raises(CheckpointIntegrityError, match=error):
            p.load_checkpoint(2, **fresh_components())
        info = p.resume(**fresh_components())
        assert info["checkpoint_id"] == 1
        assert [s["checkpoint_id"] for s in info["skipped"]] == [2]
        assert p.get_resume_info()["checkpoint_id"] == 1


def test_resume_with_nothing_valid_says_so_instead_of_starting_over(tmp_path, make_run):
    run = make_run("r", n=2, keep=5, best=False, corrupt=[0, 1])
    with ModelPersistence(run) as p:
        with pytest.raises(NoValidCheckpointError, match="none of the 2"):
            p.resume(**fresh_components())
        with pytest.raises(NoValidCheckpointError, match="none of the 2"):
            p.get_resume_info()
    with ModelPersistence(tmp_path / "fresh") as p:
        assert p.resume(**Rig().components()) is None and p.get_resume_info() is None


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", json.dumps({"format_version": 1}).encode(), b"\xff\xfe garbage"])
def test_garbage_index_is_set_aside_and_rebuilt_from_checkpoint_files(make_run, content):
    run = make_run("r", n=3, keep=5, best=False)
    original = read_index(run)
    (run / INDEX_FILE).write_bytes(content)
    with ModelPersistence(run) as p:
        assert sorted(p.checkpoints) == [0, 1, 2]
        info = p.resume(**fresh_components())
        assert info["checkpoint_id"] == 2
    rebuilt = read_index(run)
    assert [(c.id, c.checksum, c.global_step) for c in rebuilt.checkpoints] == [
        (c.id, c.checksum, c.global_step) for c in original.checkpoints
    ]
    assert [n for n in os.listdir(run) if n.startswith(INDEX_FILE + ".corrupt-")]  # kept for forensics


def test_restoring_with_a_missing_component_or_bad_rng_is_an_error(tmp_path):
    run = tmp_path / "r"
    rig = Rig()
    with ModelPersistence(run) as p:
        p.save_checkpoint(0, 0, {}, agent=rig.agent)
        with pytest.raises(RestoreStateError, match="no component 'optimizer'"):
            p.load_checkpoint(0, agent=rig.agent, optimizer=rig.optimizer)
        with pytest.raises(RestoreStateError, match="cannot load component 'agent'"):
            p.load_checkpoint(0, agent=torch.nn.Linear(2, 2))
    payload = torch.load(run / "checkpoints/checkpoint_00000.pt", weights_only=True)
    payload["rng"]["python"]["state"] = torch.zeros(3, dtype=torch.int64)
    # a checkpoint written by hand with a broken RNG state: restoring it fails loudly
    from ckptctl.torch_io import restore_rng

    with pytest.raises(RestoreStateError, match="cannot restore RNG state"):
        restore_rng(payload["rng"])


def test_background_failure_is_reported_on_next_call_and_leaves_nothing_visible(tmp_path):
    run = tmp_path / "r"

    class Unsaveable:
        def state_dict(self):
            return {"fn": lambda: 1}  # torch.save cannot pickle this

    rig = Rig()
    p = ModelPersistence(run, save_every_n_batches=1)
    p.save_checkpoint(0, 0, {}, **rig.components())
    p.save_checkpoint(0, 1, {}, bad=Unsaveable())
    with pytest.raises(BackgroundSaveError, match="background save failed"):
        p.flush()
    assert sorted(p.checkpoints) == [0]
    assert os.listdir(run / "checkpoints") == ["checkpoint_00000.pt"]
    assert p.save_checkpoint(0, 2, {}, **rig.components()) == 2
    p.close()
    assert sorted(read_index(run).by_id()) == [0, 2]


def test_a_failed_save_is_the_error_reported_not_the_best_copy_that_depended_on_it(tmp_path):
    """First error wins: the queued best-model copy of a save that failed is skipped, and the save's own cause is raised."""
    run = tmp_path / "r"
    rig = Rig()
    p = ModelPersistence(run, save_every_n_batches=1)
    (run / "checkpoints").rmdir()
    (run / "checkpoints").write_bytes(b"not a folder")  # every checkpoint write now fails for real (ENOTDIR)
    gate = threading.Event()
    p._worker.submit(gate.wait)  # holds the one worker: both jobs below are queued before the save runs and fails
    p.save_checkpoint(0, 0, {}, **rig.components())
    assert p.update_best(0, 0, {"accuracy_delta": 1.0}, **rig.components())  # copies checkpoint 0, once written
    gate.set()
    with pytest.raises(BackgroundSaveError) as raised:
        p.flush()
    assert "NotADirectoryError" in str(raised.value) and "was not saved" not in str(raised.value)
    assert isinstance(raised.value.__cause__, NotADirectoryError)
    assert not (run / BEST_MODEL_FILE).exists()
    p.flush()  # reported once; the skipped copy is not a second error
    p.close()


def test_leftover_temporaries_are_ignored_and_cleaned(make_run):
    run = make_run("r", n=1, keep=5, best=False)
    stale = run / "checkpoints" / f"{TEMP_PREFIX}checkpoint_00001.pt.dead"
    stale.write_bytes(b"half a checkpoint")
    with ModelPersistence(run) as p:
        assert sorted(p.checkpoints) == [0]
    assert not stale.exists()


def test_unindexed_committed_file_is_adopted_not_lost(make_run):
    """A crash after the file was committed but before the index: the checkpoint is kept."""
    run = make_run("r", n=3, keep=5, best=False)
    index = json.loads((run / INDEX_FILE).read_text())
    index["checkpoints"] = index["checkpoints"][:2]
    index["next_id"] = 2
    (run / INDEX_FILE).write_text(json.dumps(index))
    with ModelPersistence(run) as p:
        assert p.get_resume_info()["checkpoint_id"] == 2


def test_nothing_from_metadata_escapes_the_run_directory(tmp_path, make_run):
    outside = tmp_path / "precious.pt"
    shutil.copy(ckpt(make_run("elsewhere", n=1, best=False), 0), outside)
    run = make_run("r", n=2, keep=2, best=False, parent=tmp_path)  # "../precious.pt" is `outside`
    index = json.loads((run / INDEX_FILE).read_text())
    hostile = dict(index["checkpoints"][-1], id=7, path="../precious.pt")
    absolute = dict(index["checkpoints"][-1], id=8, path=str(outside))
    index["checkpoints"] += [hostile, absolute]
    (run / INDEX_FILE).write_text(json.dumps(index))
    link = run / "checkpoints" / "checkpoint_00009.pt"
    link.symlink_to(outside)
    components = fresh_components()
    with ModelPersistence(run, max_checkpoints=1, save_every_n_batches=1) as p:
        assert sorted(p.checkpoints) == [0, 1]  # hostile entries and the symlink are not used
        assert p.resume(**components)["checkpoint_id"] == 1
        new_ids = [p.maybe_save(0, batch, {}, **components) for batch in range(2, 5)]
        assert new_ids == [10, 11, 12]  # ids never collide with a file present on disk (checkpoint_00009.pt)
    assert outside.exists() and link.is_symlink()
    index_after = read_index(run)
    assert all(not c.path.startswith("..") for c in index_after.checkpoints)
    raw_paths = [c["path"] for c in json.loads((run / INDEX_FILE).read_text())["checkpoints"]]
    assert "../precious.pt" in raw_paths and str(outside) in raw_paths  # kept for the user to see, never used


def test_drive_backup_mirrors_with_same_layout_and_records_it(tmp_path):
    run = tmp_path / "runs" / "r"
    drive = setup_drive_backup(tmp_path / "drive")
    rig = Rig()
    with ModelPersistence(run, save_every_n_batches=1, max_checkpoints=2, drive_backup=drive) as p:
        for batch in range(4):
            rig.step()
            p.maybe_save(0, batch, {"accuracy_delta": float(batch)}, **rig.components())
            p.update_best(0, batch, {"accuracy_delta": float(batch)}, **rig.components())
    mirror = drive / "r"
    local_index, mirror_index = read_index(run), read_index(mirror)
    assert [(c.id, c.checksum) for c in mirror_index.checkpoints] == [(c.id, c.checksum) for c in local_index.checkpoints]
    assert sorted(os.listdir(mirror / "checkpoints")) == sorted(os.listdir(run / "checkpoints"))
    assert (mirror / BEST_MODEL_FILE).read_bytes() == (run / BEST_MODEL_FILE).read_bytes()
    assert all(c.mirrored and c.mirrored["checksum"] == c.checksum for c in local_index.checkpoints)


def test_setup_drive_backup_explains_a_missing_mount(tmp_path):
    with pytest.raises(CkptctlError, match="is Drive mounted"):
        setup_drive_backup(tmp_path / "not" / "mounted" / "Backups")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CkptctlError, match="cannot create folder"):
        setup_drive_backup(tmp_path / "file")


def test_invalid_arguments_are_rejected(tmp_path):
    for kwargs in ({"max_checkpoints": 0}, {"save_every_n_batches": 0}, {"best_mode": "up"}, {"staging": "maybe"}):
        (name, value), = kwargs.items()
        with pytest.raises(ValueError, match=f"^{name} must be .*, got {value!r}$"):
            ModelPersistence(tmp_path / "r", **kwargs)
    with ModelPersistence(tmp_path / "r") as p:
        with pytest.raises(ValueError, match="reserved"):
            p.save_checkpoint(0, 0, {}, rng=torch.nn.Linear(1, 1))
        with pytest.raises(ValueError, match="at least one component"):
            p.save_checkpoint(0, 0, {})


@pytest.mark.parametrize("staging", ["copy", "none", "auto"])
def test_every_staging_mode_saves_the_state_of_the_moment(tmp_path, staging):
    """Without staging the write finishes before save returns, so later training cannot leak in."""
    run = tmp_path / staging
    rig = Rig()
    with ModelPersistence(run, staging=staging, save_every_n_batches=1) as p:
        expected = {k: v.clone() for k, v in rig.agent.state_dict().items()}
        p.save_checkpoint(0, 0, {}, **rig.components())
        with torch.no_grad():
            for param in rig.agent.parameters():
                param.add_(100.0)  # training goes on right after the call returns
        p.flush()
    saved = safe_load(run / "checkpoints" / "checkpoint_00000.pt")["agent"]
    for name, value in expected.items():
        assert torch.equal(saved[name], value), name
