"""ModelPersistence under torchrun: every rank runs the same script (gloo on CPU, real ``torchrun`` jobs).

The child is :mod:`tests.ddp_child`; each job is ``python -m torch.distributed.run
--standalone --nproc_per_node N``, read line by line, and killed for real (SIGKILL of
torchrun and every worker) where a test crashes it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptctl.persistence import ModelPersistence
from ckptctl.tensors import flat_tensors
from ckptctl.torch_io import capture_rng, safe_load

from .ddp_child import rng_fingerprint
from .trainloop_helpers import Trainer, trainloop_env

CHILD = Path(__file__).with_name("ddp_child.py")
JOB_TIMEOUT = 300.0


def torchrun(nproc: int, *args: str, child: Path = CHILD) -> list[str]:
    """The command of a ``torchrun`` job of ``nproc`` ranks running ``child`` with ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(child), *args]


def job_env() -> dict[str, str]:
    env = trainloop_env()
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_job(cwd: Path, nproc: int, *args: str, child: Path = CHILD) -> str:
    """Run a job to its end; fail with its output unless every rank ended cleanly."""
    job = Trainer(torchrun(nproc, *args, child=child), cwd, job_env())
    rc = job.finish(JOB_TIMEOUT)
    assert rc == 0, job.output[-6000:]
    for rank in range(nproc):
        assert f"rank {rank} done" in job.lines, job.output[-6000:]
    return job.output


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_job(job: Trainer) -> None:
    """SIGKILL torchrun and every worker at once, as a VM that dies takes them all."""
    for pid in [job.proc.pid, *descendants(job.proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.finish(60)


def committed(run: Path) -> bool:
    """True once the run's index lists a checkpoint."""
    try:
        return bool(json.loads((run / "checkpoint_metadata.json").read_text())["checkpoints"])
    except (OSError, ValueError, KeyError):
        return False


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def same_tensors(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ (or exist on one side only) between two saved states."""
    fa, fb = flat_tensors(a), flat_tensors(b)
    return sorted(k for k in fa.keys() | fb.keys() if k not in fa or k not in fb or not torch.equal(fa[k], fb[k]))


def check_symptoms(out: Path) -> None:
    """What every rank reported: one run, rank 0's state with its own RNG, rank 0's errors on every rank."""
    for rank in (0, 1):
        r = read(out, f"symptoms_rank{rank}.json")
        assert r["fresh_resume"] is None
        assert r["ids"] == [None, 0, None, 1, None, 2] and r["ids_same"]
        assert r["best"] == [True, True, {"loss": 6.0, "accuracy_delta": 1.0}]  # rank 0's metrics decided
        assert r["checkpoints_same"] and r["resume_same"] and r["resume_info_same"]
        assert r["resume"] == {"checkpoint_id": 2, "global_step": 6, "extra": {"rank": rank, "samples": 48}}
        assert r["global_step"] == 6
        assert r["weights_restored"] and r["optimizer_restored"], r
        assert r["own_rng_restored"] and r["rng_differs_between_ranks"], r
        assert r["missing_id_error"] == "CkptctlError"
        assert r["corrupt_error"] == "NoValidCheckpointError"


@pytest.mark.parametrize("disks", ["shared", "per-node"])
def test_every_rank_opens_the_run_and_resumes_rank_0s_state_with_its_own_rng(tmp_path, disks, caplog):
    """The issue's symptoms: no RunLockedError, rank 1 resumes rank 0's weights/optimizer/step and its own RNG, clean end."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    args = ["symptoms", str(tmp_path / "out")]
    if disks == "per-node":  # rank 1's machine has no run folder: it must neither read nor write one
        args += ["--node-dirs", ",".join(map(str, nodes))]
    run_job(nodes[0], 2, *args)
    check_symptoms(tmp_path / "out")
    if disks == "per-node":
        assert list(nodes[1].iterdir()) == []  # rank 1 wrote nothing: no run, no lock of its own
    run = nodes[0] / "runs" / "ddp"
    payload = safe_load(run / "checkpoints" / "checkpoint_00002.pt")
    assert payload["world_size"] == 2 and [e["rank"] for e in payload["extra_ranks"]] == [0, 1]
    assert rng_fingerprint(payload["rng"]) == rng_fingerprint(payload["rng_ranks"][0]) != rng_fingerprint(payload["rng_ranks"][1])
    assert payload["extra"] == {"rank": 0, "samples": 48}

    # The same run resumed by one process (2 -> 1): rank 0's RNG and extra, and it says what changed.
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with caplog.at_level(logging.WARNING, logger="ckptctl"), ModelPersistence(run) as p:
        meta = p.resume(model=model, optimizer=opt)
        assert rng_fingerprint(capture_rng()) == rng_fingerprint(payload["rng_ranks"][0])
    assert meta["world_size_changed"] == {"saved": 2, "now": 1}
    assert meta["extra"] == {"rank": 0, "samples": 48}
    assert torch.equal(model.weight, payload["model"]["weight"])
    assert sum("saved by 2 rank(s), resuming with 1" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
def test_a_ddp_run_killed_and_resumed_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    """SIGKILL of the whole job at a seeded moment, resumed: weights, optimizer and every rank's RNG end bit-identical."""
    total = ["--total", "14", "--save-every", "3"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_job(tmp_path / "a", 2, "train", str(tmp_path / "a" / "out"), *total)

    kill_at = random.Random(14).randint(5, 10)
    job = Trainer(torchrun(2, "train", str(tmp_path / "b" / "out"), *total), tmp_path / "b", job_env())
    # at step kill_at or, on a slow machine, as soon after as a first checkpoint is committed (so there is one to resume)
    due = lambda lines: f"rank 0 step {kill_at}" in lines and committed(tmp_path / "b" / "runs" / "ddp")  # noqa: E731
    assert job.wait_for(due, JOB_TIMEOUT), job.output[-6000:]
    kill_job(job)
    assert "rank 0 done" not in job.lines
    run_job(tmp_path / "b", 2, "train", str(tmp_path / "b" / "out"), *total)

    for rank in (0, 1):
        resumed = read(tmp_path / "b" / "out", f"resume_rank{rank}.json")
        assert resumed["meta"]["checkpoint_id"] is not None and resumed["same_on_every_rank"]
        assert "world_size_changed" not in resumed["meta"]
        assert resumed["meta"]["extra"] == {"rank": rank, "samples": resumed["meta"]["global_step"] * 8}
        a = torch.load(tmp_path / "a" / "out" / f"final_rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / "out" / f"final_rank{rank}.pt", weights_only=True)
        assert same_tensors(a, b) == [], f"rank {rank}"
        assert a["rng"]["python"]["gauss_next"] == b["rng"]["python"]["gauss_next"]
    a0 = torch.load(tmp_path / "a" / "out" / "final_rank0.pt", weights_only=True)
    a1 = torch.load(tmp_path / "a" / "out" / "final_rank1.pt", weights_only=True)
    assert same_tensors(a0["model"], a1["model"]) == [] and same_tensors(a0["rng"], a1["rng"]) != []


@pytest.mark.slow
def test_resume_onto_another_world_size_says_what_changed(tmp_path):
    """1 -> 2: both ranks start from the one process's RNG (so their streams stay equal); 2 -> 1: rank 0's; each resume says so."""
    torch.manual_seed(3)
    random.seed(3)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with ModelPersistence("runs/ddp") as p:  # one process, no torch.distributed: world size 1
        p.save_checkpoint(0, 3, global_step=4, extra={"rank": 0, "samples": 32}, model=model, optimizer=opt)
    single = safe_load(Path("runs/ddp/checkpoints/checkpoint_00000.pt"))
    assert "world_size" not in single and "rng_ranks" not in single

    run_job(tmp_path, 2, "train", str(tmp_path / "out2"), "--total", "8", "--save-every", "2")
    for rank in (0, 1):
        r = read(tmp_path / "out2", f"resume_rank{rank}.json")
        assert r["meta"] == {
            "checkpoint_id": 0,
            "global_step": 4,
            "extra": {"rank": 0, "samples": 32},
            "world_size_changed": {"saved": 1, "now": 2},
        }
        assert r["same_on_every_rank"] and r["rng"] == rng_fingerprint(single["rng"])

    run_job(tmp_path, 1, "train", str(tmp_path / "out1"), "--total", "10", "--save-every", "2")
    newest = safe_load(Path("runs/ddp/checkpoints/checkpoint_00002.pt"))
    assert newest["world_size"] == 2 and newest["global_step"] == 8
    r = read(tmp_path / "out1", "resume_rank0.json")
    assert r["meta"] == {
        "checkpoint_id": 2,
        "global_step": 8,
        "extra": {"rank": 0, "samples": 64},
        "world_size_changed": {"saved": 2, "now": 1},
    }
    assert r["rng"] == rng_fingerprint(newest["rng_ranks"][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nccl)")
def test_under_nccl_the_state_goes_over_a_gloo_group_and_each_rank_gets_its_cuda_rng(tmp_path):
    """nccl as the default backend, the model on the GPU: save and resume work, each rank's CUDA RNG comes back."""
    run_job(tmp_path, 2, "cuda", str(tmp_path / "out"))
    for rank in (0, 1):
        r = read(tmp_path / "out", f"cuda_rank{rank}.json")
        assert r["backend"] == "nccl" and r["extra"] == {"rank": rank}
        assert r["own_rng_restored"] and r["rng_differs_between_ranks"] and r["checkpoint_has_cuda_rng"], r
        assert r["weights_restored"] and r["optimizer_restored"] and r["optimizer_state_on"].startswith("cuda"), r


# ---------------------------------------------------------------------- the parts, in one process


def test_each_rank_views_its_own_parts_and_falls_back_to_rank_0s():
    """rank_view: a rank's own RNG and extra where saved, else rank 0's; a payload without them is world size 1."""
    from ckptctl.api.distributed import rank_view

    payload = {"rng": "r0", "extra": {"pos": 0}, "world_size": 2, "rng_ranks": ["r0", "r1"], "extra_ranks": [{"pos": 0}, {"pos": 1}]}
    assert rank_view(payload, 1).rng == "r1" and rank_view(payload, 1).extra == {"pos": 1}
    assert rank_view(payload, 2).rng == "r0" and rank_view(payload, 2).extra == {"pos": 0}  # 2 -> 3 ranks
    assert rank_view(payload, 0).world_size_changed(1) == {"saved": 2, "now": 1}
    assert rank_view(payload, 0).world_size_changed(2) is None
    single = {"rng": "r0", "extra": {"pos": 0}}
    assert rank_view(single, 1).rng == "r0" and rank_view(single, 0).world_size_changed(2) == {"saved": 1, "now": 2}


def test_what_cannot_travel_to_the_other_ranks_becomes_an_error_that_can():
    """An exception that does not pickle as itself travels as a CkptctlError naming it; a result that does not pickle, as an error."""
    from ckptctl.api.distributed import Outcome, _sendable
    from ckptctl.errors import CheckpointIntegrityError, CkptctlError, NotRegularFileError

    kept = _sendable(Outcome(error=CheckpointIntegrityError("truncated", status="missing"))).error
    assert type(kept) is CheckpointIntegrityError and kept.status == "missing"
    odd = _sendable(Outcome(error=NotRegularFileError("/x", "FIFO"))).error
    assert type(odd) is CkptctlError and "NotRegularFileError" in str(odd) and "FIFO" in str(odd)
    unpicklable = _sendable(Outcome(value=lambda: None))
    assert isinstance(unpicklable.error, CkptctlError) and "cannot send" in str(unpicklable.error)
    assert _sendable(Outcome(value={"a": 1})).get() == {"a": 1}
