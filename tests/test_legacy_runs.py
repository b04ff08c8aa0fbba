"""Runs written by the Colab guide's own ``model_persistence.py`` open without losing anything.

The guide wrote our layout with its own schema: plain ``torch.save`` dicts without
``format_version`` / ``global_step`` / ``rng``, and JSON metadata keyed by id strings.
Every run here is written with real ``torch.save`` calls, the way the guide did.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ckptctl import ModelPersistence
from ckptctl.core.format import BEST_METADATA_FILE, FORMAT_VERSION, INDEX_FILE, TRAINING_STATE_FILE
from ckptctl.storage.legacy import LEGACY_SUFFIX
from ckptctl.storage.scan import read_index
from ckptctl.tensors import compare_states
from tests.cli_helpers import invoke

BATCHES_PER_EPOCH = 100
#: (epoch, batch) of the guide's checkpoints 0, 1, 2: it saved every 50 batches.
POSITIONS = [(0, 49), (0, 99), (1, 49)]


class GuideModels:
    """The guide's five modules and one Adam optimizer over all of them (small)."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.agent = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        self.qwen = torch.nn.Linear(3, 5)
        self.solver2 = torch.nn.Linear(5, 2)
        self.efe_loss = torch.nn.Linear(2, 1)
        self.policy_rl = torch.nn.Linear(3, 2)
        params = [p for m in self.modules().values() for p in m.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=1e-2)

    def modules(self) -> dict:
        return {"agent": self.agent, "qwen": self.qwen, "solver2": self.solver2, "efe_loss": self.efe_loss, "policy_rl": self.policy_rl}

    def step(self) -> float:
        x = torch.randn(6, 4)
        h = self.agent(x)
        loss = self.efe_loss(self.solver2(self.qwen(h))).pow(2).mean() + self.policy_rl(h).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def payload(self, epoch: int, batch: int, metrics: dict, timestamp: str) -> dict:
        """What the guide's save_checkpoint handed to torch.save."""
        return {
            "epoch": epoch,
            "batch": batch,
            "metrics": metrics,
            "timestamp": timestamp,
            **{name: m.state_dict() for name, m in self.modules().items()},
            "optimizer": self.optimizer.state_dict(),
        }


def write_guide_run(parent: Path, name: str = "guide_run") -> tuple[Path, GuideModels, dict]:
    """A guide-format run: 3 checkpoints, best model (checkpoint 1's state), metadata files.

    Returns the run directory, the models (in their final state, = checkpoint 2) and the
    state dict of every module at checkpoint 2 (cloned) for exact comparison.
    """
    run = parent / name
    (run / "checkpoints").mkdir(parents=True)
    g = GuideModels()
    metadata: dict = {}
    best_agent = None
    for checkpoint_id, (epoch, batch) in enumerate(POSITIONS):
        loss = g.step()
        metrics = {"loss": loss, "accuracy": 0.5 + 0.1 * checkpoint_id, "accuracy_delta": [0.01, 0.05, 0.02][checkpoint_id]}
        stamp = f"2025-01-01T12:0{checkpoint_id}:00.123456"
        payload = g.payload(epoch, batch, metrics, stamp)
        torch.save(payload, run / "checkpoints" / f"checkpoint_{checkpoint_id:05d}.pt")
        metadata[str(checkpoint_id)] = {"epoch": epoch, "batch": batch, "metrics": metrics, "timestamp": stamp}
        with open(run / INDEX_FILE, "w") as f:
            json.dump(metadata, f, indent=2)
        if checkpoint_id == 1:
            best_agent = {k: v.clone() for k, v in payload["agent"].items()}  # the state dict aliases live tensors
            torch.save(payload, run / "best_model.pt")
            with open(run / BEST_METADATA_FILE, "w") as f:
                json.dump({"epoch": epoch, "batch": batch, "metrics": metrics, "metric_tracked": "accuracy_delta", "timestamp": stamp}, f, indent=2)
        with open(run / TRAINING_STATE_FILE, "w") as f:
            json.dump({"epoch": epoch, "batch": batch, "total_batches": BATCHES_PER_EPOCH, "checkpoint_id": checkpoint_id, "timestamp": stamp}, f, indent=2)
    final = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in g.modules().items()}
    final["best_agent"] = best_agent
    return run, g, final


def _not_bit_identical(a: dict, b: dict) -> list[str]:
    """Names of the tensors of two state dicts that are not bit-identical (or in only one)."""
    return [r.name for r in compare_states(a, b) if not r.bit_identical]


def original_bytes(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in (INDEX_FILE, BEST_METADATA_FILE, TRAINING_STATE_FILE)}


def checkpoint_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "checkpoints").iterdir())}


def all_files(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------- library


def test_opening_keeps_the_guides_metadata_and_indexes_its_checkpoints(tmp_path):
    run, _, _ = write_guide_run(tmp_path)
    before = original_bytes(run)
    ckpts = checkpoint_bytes(run)
    with ModelPersistence(run, background=False) as p:
        assert sorted(p.checkpoints) == [0, 1, 2]
        for checkpoint_id, (epoch, batch) in enumerate(POSITIONS):
            entry = p.checkpoints[checkpoint_id]
            assert (entry["epoch"], entry["batch"]) == (epoch, batch)
            assert entry["path"] == f"checkpoints/checkpoint_{checkpoint_id:05d}.pt"
            # the documented rule: training_state's total_batches is the epoch length
            assert entry["global_step"] == epoch * BATCHES_PER_EPOCH + batch + 1
            assert entry["metrics"]["accuracy_delta"] == [0.01, 0.05, 0.02][checkpoint_id]
        assert p.best is not None and p.best["metric"] == "accuracy_delta" and p.best["value"] == 0.05
        p.update_training_state(status="running")
    # the user's files are kept byte for byte, beside the rewritten ones
    for name, data in before.items():
        assert (run / (name + LEGACY_SUFFIX)).read_bytes() == data
    assert json.loads((run / INDEX_FILE).read_text())["format_version"] == FORMAT_VERSION
    assert json.loads((run / TRAINING_STATE_FILE).read_text())["status"] == "running"
    assert not [n for n in os.listdir(run) if ".corrupt-" in n]
    assert checkpoint_bytes(run) == ckpts
    assert sorted(read_index(run).by_id()) == [0, 1, 2]


def test_legacy_copy_never_overwrites_a_different_one(tmp_path):
    run, _, _ = write_guide_run(tmp_path)
    (run / (INDEX_FILE + LEGACY_SUFFIX)).write_bytes(b"an older legacy copy")
    guide = (run / INDEX_FILE).read_bytes()
    ModelPersistence(run).close()
    assert (run / (INDEX_FILE + LEGACY_SUFFIX)).read_bytes() == b"an older legacy copy"
    copies = [n for n in os.listdir(run) if n.startswith(INDEX_FILE + LEGACY_SUFFIX) and n != INDEX_FILE + LEGACY_SUFFIX]
    assert len(copies) == 1 and (run / copies[0]).read_bytes() == guide


def test_resume_restores_the_newest_guide_checkpoint_exactly_and_warns_once_about_rng(tmp_path, caplog):
    run, _, final = write_guide_run(tmp_path)
    fresh = GuideModels(seed=123)
    caplog.set_level(logging.WARNING, logger="ckptctl")
    with ModelPersistence(run, background=False) as p:
        info = p.resume(**fresh.modules(), optimizer=fresh.optimizer)
        assert info["checkpoint_id"] == 2
        assert (info["epoch"], info["batch"]) == POSITIONS[2]
        assert info["global_step"] == 1 * BATCHES_PER_EPOCH + 49 + 1
        for name, module in fresh.modules().items():
            assert _not_bit_identical(module.state_dict(), final[name]) == [], name
        assert fresh.optimizer.state_dict()["state"]  # Adam moments came back
        p.load_checkpoint(1, agent=fresh.agent)
        p.resume(agent=fresh.agent)
        best = GuideModels(seed=7)
        p.load_best_model(agent=best.agent)
        assert _not_bit_identical(best.agent.state_dict(), final["best_agent"]) == []
    rng_warnings = [r for r in caplog.records if "RNG" in r.getMessage()]
    assert len(rng_warnings) == 1


def test_new_saves_continue_after_the_guides_ids_and_leave_its_files_alone(tmp_path):
    run, _, _ = write_guide_run(tmp_path)
    ckpts = checkpoint_bytes(run)
    best_model = (run / "best_model.pt").read_bytes()
    g = GuideModels(seed=1)
    with ModelPersistence(run, background=False, max_checkpoints=10, save_every_n_batches=1) as p:
        info = p.resume(**g.modules(), optimizer=g.optimizer)
        g.step()
        new_id = p.maybe_save(info["epoch"], info["batch"] + 1, {"accuracy_delta": 0.0}, agent=g.agent, optimizer=g.optimizer)
        assert new_id == 3
        assert p.checkpoints[3]["global_step"] == info["global_step"] + 1
        assert not p.update_best(1, 50, {"accuracy_delta": 0.0}, agent=g.agent)  # 0.05 stays the best
    for name, data in ckpts.items():
        assert (run / "checkpoints" / name).read_bytes() == data
    assert (run / "best_model.pt").read_bytes() == best_model
    with ModelPersistence(run) as p:
        assert sorted(p.checkpoints) == [0, 1, 2, 3]


def test_unparseable_guide_index_is_set_aside_with_its_new_name_and_checkpoints_still_open(tmp_path, caplog):
    run, _, _ = write_guide_run(tmp_path)
    (run / INDEX_FILE).write_bytes(b'{"0": {"epoch": 0, "bat')  # the guide died mid-write
    caplog.set_level(logging.WARNING, logger="ckptctl")
    with ModelPersistence(run) as p:
        assert sorted(p.checkpoints) == [0, 1, 2]
        assert (p.checkpoints[2]["epoch"], p.checkpoints[2]["batch"]) == POSITIONS[2]
    aside = [n for n in os.listdir(run) if n.startswith(INDEX_FILE + ".corrupt-")]
    assert len(aside) == 1
    assert (run / aside[0]).read_bytes() == b'{"0": {"epoch": 0, "bat'
    assert any(aside[0] in r.getMessage() for r in caplog.records)
    assert not (run / (INDEX_FILE + LEGACY_SUFFIX)).exists()


# ---------------------------------------------------------------------- CLI on a run the library never opened


def test_cli_ls_json_lists_the_guides_checkpoints_without_writing(tmp_path):
    run, _, _ = write_guide_run(tmp_path)
    files = all_files(run)
    result = invoke("ls", run, "--json")
    assert result.exit_code == 0, result.output
    (listed,) = json.loads(result.stdout)["runs"]
    assert [c["id"] for c in listed["checkpoints"]] == [0, 1, 2]
    assert [(c["epoch"], c["batch"]) for c in listed["checkpoints"]] == POSITIONS
    assert listed["checkpoints"][1]["metrics"]["accuracy_delta"] == 0.05
    assert listed["checkpoints"][2]["global_step"] == 150
    assert listed["problems"] == []
    assert listed["best"]["metric"] == "accuracy_delta" and listed["best"]["value"] == 0.05
    assert "corrupt" not in result.stderr and "format_version" not in result.stderr
    assert all_files(run) == files


def test_cli_verify_and_resume_info_treat_guide_files_as_checkpoints(tmp_path):
    run, _, _ = write_guide_run(tmp_path)
    files = all_files(run)
    result = invoke("verify", run, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"]
    assert sorted((r["id"] is None, r["id"]) for r in doc["results"]) == [(False, 0), (False, 1), (False, 2), (True, None)]
    assert all("checksum" in r["detail"] for r in doc["results"])
    info = invoke("resume-info", run, "--json")
    assert info.exit_code == 0, info.output
    (run_info,) = json.loads(info.stdout)["runs"]
    assert run_info["checkpoint"]["id"] == 2 and run_info["index_problem"] is None
    shown = invoke("show", run, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["epoch"] == 1
    assert all_files(run) == files


def test_cli_prune_keeps_the_newest_guide_checkpoint_that_loads(tmp_path):
    run, _, _ = write_guide_run(tmp_path)
    guide_index = (run / INDEX_FILE).read_bytes()
    (run / "checkpoints" / "checkpoint_00003.pt").write_bytes(b"not a checkpoint")  # newest, does not load
    dry = invoke("prune", run, "--keep", "1", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    (plan,) = json.loads(dry.stdout)["runs"]
    assert sorted(d["id"] for d in plan["delete"]) == [0, 1]
    result = invoke("prune", run, "--keep", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(run / "checkpoints")) == ["checkpoint_00002.pt", "checkpoint_00003.pt"]
    assert (run / (INDEX_FILE + LEGACY_SUFFIX)).read_bytes() == guide_index
    assert sorted(json.loads((run / INDEX_FILE).read_text())) == ["2"]  # the guide's own index stays consistent
    with ModelPersistence(run) as p:
        assert sorted(p.checkpoints) == [2]


def test_cli_restore_from_a_guide_format_drive_folder(tmp_path):
    drive = tmp_path / "drive"
    mirror, _, final = write_guide_run(drive, "guide_run")
    result = invoke("restore", "--from-drive", "--drive", drive, "--to", tmp_path / "runs", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["problems"] == []
    local = tmp_path / "runs" / "guide_run"
    assert checkpoint_bytes(local) == checkpoint_bytes(mirror)
    assert (local / "best_model.pt").read_bytes() == (mirror / "best_model.pt").read_bytes()
    assert original_bytes(local) == original_bytes(mirror)
    fresh = GuideModels(seed=5)
    with ModelPersistence(local) as p:
        assert p.resume(**fresh.modules(), optimizer=fresh.optimizer)["checkpoint_id"] == 2
    assert _not_bit_identical(fresh.agent.state_dict(), final["agent"]) == []


def test_global_step_rule_falls_back_to_the_largest_batch_seen():
    from ckptctl.storage.legacy import LegacyEntry, guide_global_steps

    entries = {0: LegacyEntry(epoch=0, batch=49), 1: LegacyEntry(epoch=0, batch=99), 2: LegacyEntry(epoch=1, batch=49)}
    assert guide_global_steps(entries, {"total_batches": 100, "batch": 49}) == {0: 50, 1: 100, 2: 150}
    # total_batches that cannot be the epoch length (not above every batch index) is not used
    assert guide_global_steps(entries, {"total_batches": 60}) == {0: 50, 1: 100, 2: 150}
    assert guide_global_steps(entries, None) == {0: 50, 1: 100, 2: 150}
    # a training_state.json ckptctl wrote is not the guide's
    assert guide_global_steps(entries, {"format_version": 1, "total_batches": 1000}) == {0: 50, 1: 100, 2: 150}
