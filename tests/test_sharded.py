"""Sharded state (FSDP2) under torchrun: saved through DCP as packs, listed, verified, mirrored, restored, exported, resharded.

Real ``torchrun`` jobs of :mod:`tests.fsdp_child` (gloo, CPU); the checks in between run
in this process or through the CLI, as a user would.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptctl.core.sharded import SHARDED_KEY, check_record
from ckptctl.persistence import ModelPersistence
from ckptctl.torch_io import load_skeleton, safe_load

from .cli_helpers import run_cli
from .damage import truncate
from .test_distributed import JOB_TIMEOUT, committed, job_env, kill_job, read, run_job, same_tensors, torchrun
from .trainloop_helpers import Trainer

CHILD = Path(__file__).with_name("fsdp_child.py")


def fsdp_job(cwd: Path, nproc: int, *args: str) -> str:
    return run_job(cwd, nproc, *args, child=CHILD)


def plain_model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    """The child's model unsharded, in this one process."""
    from .fsdp_child import make_model

    model = make_model(7, plain=True)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def index(run: Path) -> dict:
    return json.loads((run / "checkpoint_metadata.json").read_text())


def shard_packs(run: Path, checkpoint_id: int) -> dict[str, int]:
    """The packs the ranks wrote for a checkpoint's sharded state."""
    skeleton = load_skeleton(run / "checkpoints" / f"checkpoint_{checkpoint_id:05d}.pt")
    return skeleton[SHARDED_KEY]["packs"]


def test_an_fsdp2_run_saves_shards_that_every_command_reads(tmp_path):
    """2 ranks save through DCP; verify, ls, export, a one-process resume, the mirror and restore all see every shard."""
    drive = tmp_path / "drive"
    drive.mkdir()
    fsdp_job(tmp_path, 2, str(tmp_path / "out"), "--total", "6", "--drive", str(drive))
    run = tmp_path / "runs" / "fsdp"
    ids = [e["id"] for e in index(run)["checkpoints"]]
    assert ids == [0, 1, 2]
    packs = shard_packs(run, 2)
    assert len(packs) == 2  # one pack per rank
    entry = index(run)["checkpoints"][-1]
    assert set(packs) <= set(entry["objects"])  # the index commit names every rank's shards

    # one process reads the whole state: it is the final state of the job
    final = torch.load(tmp_path / "out" / "final_rank0.pt", weights_only=True)
    payload = safe_load(run / "checkpoints" / "checkpoint_00002.pt")
    assert same_tensors(payload["model"], final["model"]) == []
    assert same_tensors(payload["optimizer"]["state"], final["optimizer"]) == []
    assert payload["world_size"] == 2 and [e["rank"] for e in payload["extra_ranks"]] == [0, 1]

    verify = run_cli("verify", run, "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    statuses = {r["id"]: r["status"] for r in json.loads(verify.stdout)["results"]}
    assert statuses == {0: "ok", 1: "ok", 2: "ok", None: "ok"}  # and the best model
    listing = json.loads(run_cli("ls", run, "--json").stdout)
    sizes = {c["id"]: c["size_bytes"] for c in listing["runs"][0]["checkpoints"]}
    assert sizes[2] > sum(t.numel() * t.element_size() for t in final["model"].values())

    out = tmp_path / "export.pt"
    assert run_cli("export", f"{run}:2", out).returncode == 0
    exported = torch.load(out, map_location="cpu", weights_only=True)
    assert same_tensors(exported["model"], final["model"]) == [] and SHARDED_KEY not in exported

    # 2 -> 1: a plain model in one process resumes the sharded state
    model, opt = plain_model_and_optimizer()
    with ModelPersistence(run) as p:
        meta = p.resume(model=model, optimizer=opt)
    assert meta["checkpoint_id"] == 2 and meta["world_size_changed"] == {"saved": 2, "now": 1}
    assert same_tensors(model.state_dict(), final["model"]) == []
    assert same_tensors(opt.state_dict()["state"], final["optimizer"]) == []

    # the mirror carried every shard; a fresh machine restores and verifies them
    mirror = drive / "fsdp"
    assert all((mirror / "objects" / f"{name}.safetensors").is_file() for e in index(mirror)["checkpoints"] for name in e["objects"])
    restored = run_cli("restore", "--from-drive", "--drive", drive, "--run", "fsdp", "--to", tmp_path / "fresh")
    assert restored.returncode == 0, restored.stderr
    verify = run_cli("verify", tmp_path / "fresh" / "fsdp")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert same_tensors(safe_load(tmp_path / "fresh" / "fsdp" / "checkpoints" / "checkpoint_00002.pt")["model"], final["model"]) == []


@pytest.mark.slow
def test_a_truncated_or_missing_shard_is_corrupt_and_resume_falls_back(tmp_path):
    """Damage one rank's shard of the newest checkpoint: verify says corrupt, resume (2 ranks) takes the one before."""
    fsdp_job(tmp_path, 2, str(tmp_path / "out"), "--total", "4")
    run = tmp_path / "runs" / "fsdp"
    newest, older = shard_packs(run, 1), shard_packs(run, 0)
    only_newest = sorted(set(newest) - set(older))
    assert len(only_newest) == 2
    truncate(run / "objects" / f"{only_newest[0]}.safetensors")
    verify = run_cli("verify", run, "--json")
    assert verify.returncode == 1
    by_id = {r["id"]: r for r in json.loads(verify.stdout)["results"]}
    assert by_id[1]["status"] == "corrupt" and by_id[0]["status"] == "ok", by_id
    (run / "objects" / f"{only_newest[1]}.safetensors").unlink()

    fsdp_job(tmp_path, 2, str(tmp_path / "out2"), "--total", "4")
    for rank in (0, 1):
        meta = read(tmp_path / "out2", f"resume_rank{rank}.json")["meta"]
        assert meta["checkpoint_id"] == 0 and meta["global_step"] == 2, meta
        assert meta["extra"] == {"rank": rank, "samples": 16}


@pytest.mark.slow
def test_sharded_saves_on_per_node_disks_are_refused_not_committed(tmp_path):
    """Rank 1 writes its shards on its own disk: rank 0 cannot see them, commits nothing, and every rank is told why."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    job = Trainer(torchrun(2, str(tmp_path / "out"), "--total", "4", "--node-dirs", ",".join(map(str, nodes)), child=CHILD), nodes[0], job_env())
    assert job.finish(JOB_TIMEOUT) != 0
    assert "a filesystem every rank shares" in job.output, job.output[-3000:]
    run = nodes[0] / "runs" / "fsdp"
    assert not committed(run) and list((run / "checkpoints").iterdir()) == []


@pytest.mark.slow
def test_an_fsdp2_run_killed_and_resumed_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    """SIGKILL of torchrun and every rank at a seeded moment, resumed: weights, optimizer and every rank's RNG end bit-identical."""
    total = ["--total", "14", "--save-every", "3"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fsdp_job(tmp_path / "a", 2, str(tmp_path / "a" / "out"), *total)

    kill_at = random.Random(15).randint(5, 10)
    job = Trainer(torchrun(2, str(tmp_path / "b" / "out"), *total, child=CHILD), tmp_path / "b", job_env())
    due = lambda lines: f"rank 0 step {kill_at}" in lines and committed(tmp_path / "b" / "runs" / "fsdp")  # noqa: E731
    assert job.wait_for(due, JOB_TIMEOUT), job.output[-6000:]
    kill_job(job)
    assert "rank 0 done" not in job.lines
    fsdp_job(tmp_path / "b", 2, str(tmp_path / "b" / "out"), *total)

    for rank in (0, 1):
        resumed = read(tmp_path / "b" / "out", f"resume_rank{rank}.json")["meta"]
        assert resumed["checkpoint_id"] is not None and "world_size_changed" not in resumed
        a = torch.load(tmp_path / "a" / "out" / f"final_rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / "out" / f"final_rank{rank}.pt", weights_only=True)
        assert same_tensors(a, b) == [], f"rank {rank}"
        assert a["rng"]["python"]["gauss_next"] == b["rng"]["python"]["gauss_next"]
    run = tmp_path / "b" / "runs" / "fsdp"
    assert run_cli("verify", run).returncode == 0
    assert index(run)["best"] if "best" in index(run) else (run / "best_model.pt").is_file()


@pytest.mark.slow
def test_an_fsdp2_checkpoint_resumes_in_1_and_in_2_ranks(tmp_path):
    """2 -> 1 -> 2 under torchrun: DCP reshards, each resume says what changed, and the state carries over exactly."""
    fsdp_job(tmp_path, 2, str(tmp_path / "out2"), "--total", "4")
    fsdp_job(tmp_path, 1, str(tmp_path / "out1"), "--total", "6")
    meta = read(tmp_path / "out1", "resume_rank0.json")["meta"]
    assert meta["checkpoint_id"] == 1 and meta["world_size_changed"] == {"saved": 2, "now": 1}
    run = tmp_path / "runs" / "fsdp"
    assert len(shard_packs(run, 2)) == 1  # one rank, one pack
    fsdp_job(tmp_path, 2, str(tmp_path / "out3"), "--total", "8")
    for rank in (0, 1):
        meta = read(tmp_path / "out3", f"resume_rank{rank}.json")["meta"]
        assert meta["checkpoint_id"] == 2 and meta["world_size_changed"] == {"saved": 1, "now": 2}
    # the state the 1-rank job ended with is what the 2-rank job started from: its checkpoint, read whole
    one = torch.load(tmp_path / "out1" / "final_rank0.pt", weights_only=True)
    assert same_tensors(safe_load(run / "checkpoints" / "checkpoint_00002.pt")["model"], one["model"]) == []
    # and a plain (unsharded) model under torchrun resumes the sharded state too
    fsdp_job(tmp_path, 2, str(tmp_path / "out4"), "--total", "10", "--plain")
    assert read(tmp_path / "out4", "resume_rank1.json")["meta"]["checkpoint_id"] == 3


# ---------------------------------------------------------------------- the record, in one process


def _record(**tensor) -> dict:
    spec = {"dtype": "F32", "size": [4, 2], "chunks": [
        {"offsets": [0, 0], "sizes": [2, 2], "pack": "a" * 32, "key": "k0"},
        {"offsets": [2, 0], "sizes": [2, 2], "pack": "b" * 32, "key": "k1"},
    ]}  # fmt: skip
    spec.update(tensor)
    return {"version": 1, "tensors": {'["m", "w"]': spec}, "packs": {"a" * 32: 10, "b" * 32: 10}}


def test_a_hostile_or_damaged_record_is_refused_before_anything_is_read():
    """Chunks outside the tensor, overlapping, leaving a gap, naming unlisted packs, or malformed: each is named."""
    listed = ["a" * 32, "b" * 32]
    assert check_record(_record(), listed) is None
    outside = _record(chunks=[{"offsets": [3, 0], "sizes": [2, 2], "pack": "a" * 32, "key": "k"}])
    assert "outside" in check_record(outside, listed)
    overlap = _record(chunks=[
        {"offsets": [0, 0], "sizes": [3, 2], "pack": "a" * 32, "key": "k0"},
        {"offsets": [1, 0], "sizes": [3, 2], "pack": "b" * 32, "key": "k1"},
    ])  # fmt: skip
    assert "exactly once" in check_record(overlap, listed)
    gap = _record(chunks=[{"offsets": [0, 0], "sizes": [2, 2], "pack": "a" * 32, "key": "k0"}])
    assert "exactly once" in check_record(gap, listed)
    assert "not listed" in check_record(_record(), listed[:1])
    assert "malformed" in check_record(_record(size=[4, -2]), listed)
    assert "malformed" in check_record(_record(dtype="F128"), listed)
    assert "unknown version" in check_record({"version": 99}, listed)
    assert "malformed" in check_record({**_record(), "packs": {"../../etc": 1}}, listed)


def test_no_component_may_take_the_name_of_the_record(tmp_path):
    """``sharded`` is the skeleton's record: a component of that name is refused before anything is written."""
    model = nn.Linear(2, 2)
    with ModelPersistence(tmp_path / "run") as p, pytest.raises(ValueError, match="reserved"):
        p.save_checkpoint(0, 0, **{SHARDED_KEY: model})
    assert not list((tmp_path / "run" / "checkpoints").iterdir())
