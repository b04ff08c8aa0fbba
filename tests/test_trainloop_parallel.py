"""The paired trainloop under torchrun (``--parallel ddp|fsdp``), for real: 2 ranks, gloo, CPU, real ARC pairs.

Every job is ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m
ckptctl.trainloop --parallel MODE ...``, read line by line, stopped with real signals (SIGTERM
to torchrun; SIGKILL of torchrun and every worker, as a VM that dies takes them all).
Comparisons read what the job wrote (``ckptctl export`` of its newest checkpoint: FSDP2's
sharded state as whole tensors).
"""

from __future__ import annotations

import json
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptctl import trainloop
from ckptctl.arcdata import load_arc
from ckptctl.core.sharded import SHARDED_KEY
from ckptctl.tensors import jsonable
from ckptctl.torch_io import safe_load
from ckptctl.train_data import data_position, rank_part
from ckptctl.train_parallel import LaunchError, check_launch

from .cli_helpers import invoke
from .test_distributed import JOB_TIMEOUT, committed, job_env, kill_job
from .trainloop_helpers import (
    FAST_FLAGS,
    Trainer,
    assert_log_consistent,
    metric_lines,
    newest_checkpoint,
    read_json,
    replace_flags,
    tensor_differences,
    trainloop_cmd,
)

MODES = ["ddp", "fsdp"]

#: The quick jobs: 32 pairs in batches of 8 (4 batches per epoch), 2 epochs.
QUICK_FLAGS = replace_flags(FAST_FLAGS, {"--max-pairs": "32", "--max-eval-pairs": "16", "--epochs": "2"})


def job_cmd(nproc: int, output_dir: Path, run_name: str, *extra: str, flags: tuple[str, ...] = QUICK_FLAGS) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m ckptctl.trainloop ...`` (the trainloop's flags as trainloop_cmd gives them)."""
    module_and_flags = trainloop_cmd(output_dir, run_name, *extra, flags=flags)[1:]  # -m ckptctl.trainloop ...
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *module_and_flags]


def run_job(cmd: list[str], cwd: Path) -> str:
    """Run a job to its end; fail with its output unless it completed."""
    job = Trainer(cmd, cwd, job_env())
    rc = job.finish(JOB_TIMEOUT)
    assert rc == 0, job.output[-6000:]
    return job.output


def batch_lines(lines: list[str]) -> list[str]:
    return [line for line in metric_lines(lines) if ", Batch " in line]


def exported(run_dir: Path, out: Path) -> dict:
    """The run's newest checkpoint as one standalone payload (``ckptctl export``), loaded safely."""
    result = invoke("export", str(run_dir), str(out))
    assert result.exit_code == 0, result.stdout + result.stderr
    return safe_load(out)


def assert_same_final_payload(a: dict, b: dict) -> None:
    """Bit-identical tensors (weights, optimizer, every rank's RNG) and the same position, metrics and per-rank parts."""
    diffs = tensor_differences(a, b)
    assert not diffs, f"final checkpoints differ in {len(diffs)} tensor(s): {diffs[:10]}"
    for key in ("epoch", "batch", "global_step", "metrics", "components", "world_size", "extra_ranks"):
        assert a[key] == b[key], f"{key}: {a[key]!r} vs {b[key]!r}"
    assert jsonable(a["rng_ranks"]) == jsonable(b["rng_ranks"])  # also what is not a tensor (gauss_next, ...)


# ---------------------------------------------------------------------- launching: one line and exit 2


TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (["--parallel", "ddp"], {}, "Error: --parallel ddp needs the processes torchrun starts"),
        ([], TORCHRUN_ENV, "Error: torchrun started 2 processes but --parallel is not given"),
        (["--parallel", "ddp"], {**TORCHRUN_ENV, "RANK": "2"}, "Error: RANK=2 does not fit WORLD_SIZE=2"),
        (["--parallel", "ddp"], {"RANK": "0", "WORLD_SIZE": "2"}, "Error: torchrun's environment is incomplete (LOCAL_RANK, MASTER_ADDR"),
    ],
)
def test_parallel_and_torchrun_must_go_together(tmp_path, monkeypatch, capsys, flags, env, message):
    """A launch that does not fit is one Error line and exit 2, before any folder is made or any peer awaited."""
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert trainloop.main(["--output-dir", str(tmp_path / "runs"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()
    assert not torch.distributed.is_initialized()


def test_a_torchrun_job_of_one_process_needs_no_parallel_flag():
    assert check_launch(None, {}) is None
    assert check_launch(None, {**TORCHRUN_ENV, "WORLD_SIZE": "1"}) is None  # one process, as without torchrun
    assert check_launch("fsdp", {**TORCHRUN_ENV, "RANK": "1", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(LaunchError, match="whole numbers"):
        check_launch("ddp", {**TORCHRUN_ENV, "RANK": "zero"})


def test_each_rank_trains_its_own_part_of_every_batch():
    """Together the ranks cover the batch (a batch that does not divide is padded with its own first samples)."""
    batch = torch.arange(10, 18)
    parts = [rank_part(batch, r, 2).tolist() for r in range(2)]
    assert parts == [[10, 12, 14, 16], [11, 13, 15, 17]]
    assert [rank_part(torch.arange(3), r, 2).tolist() for r in range(2)] == [[0, 2], [1, 0]]
    assert [rank_part(torch.arange(1), r, 3).tolist() for r in range(3)] == [[0], [0], [0]]
    assert rank_part(batch, 0, 1) is batch

    train, _ = load_arc(32, 1)
    one = data_position(train, 7, 8, 1, 2)
    assert "world_size" not in one and "rank" not in one  # one process's positions are as they were
    mine, theirs = (data_position(train, 7, 8, 1, 2, rank, 2) for rank in (0, 1))
    assert (mine["world_size"], mine["rank"], theirs["rank"]) == (2, 0, 1)
    assert len({one["next_batch_ids_sha256"], mine["next_batch_ids_sha256"], theirs["next_batch_ids_sha256"]}) == 3
    assert "world_size: checkpoint 2, now 1" in trainloop.fingerprint_differences(mine, one)


# ---------------------------------------------------------------------- real jobs of 2 ranks


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_train_stop_together_on_sigterm_and_resume(tmp_path, mode, capsys, in_process_torch_settings):
    """A job of 2 ranks trains (only rank 0 prints), stops after the same batch on SIGTERM, saves each rank's
    RNG and data position, and resumes with --resume to the end; one process cannot resume it exactly."""
    out = tmp_path / "runs"
    job = Trainer(job_cmd(2, out, "par", "--parallel", mode), tmp_path, job_env())
    assert job.wait_batches(1, JOB_TIMEOUT), job.output[-6000:]
    job.kill(signal.SIGTERM)  # torchrun passes it on to every worker
    job.finish(JOB_TIMEOUT)
    stopped = [re.match(r"Interrupted by SIGTERM after Epoch (\d+), Batch (\d+); saved", line) for line in job.lines]
    stopped = [(int(m[1]), int(m[2])) for m in stopped if m]
    assert len(stopped) == 1, job.output[-6000:]  # rank 0 says it; both ranks stopped after that batch and saved
    assert read_json(out / "par" / "training_state.json")["status"] == "interrupted"
    epoch, batch = stopped[0]
    assert (epoch, batch) != (1, 3), "the job ended before its SIGTERM"

    output = run_job(job_cmd(2, out, "par", "--parallel", mode, "--resume"), tmp_path)
    assert "Completed 2 epochs (8 batches)" in output
    resumed = [line for line in output.splitlines() if line.startswith("Resumed from checkpoint ")]
    assert len(resumed) == 1 and resumed[0].endswith(f"at Epoch {epoch + batch // 3}, Batch {(batch + 1) % 4}")
    assert len(batch_lines(output.splitlines())) == len(set(batch_lines(output.splitlines())))  # no rank but 0 printed
    assert "Error" not in output and "rank 1" not in output

    payload = exported(out / "par", tmp_path / "final.pt")
    assert payload["world_size"] == 2 and payload["global_step"] == 8
    skeleton = torch.load(newest_checkpoint(out / "par")[1], map_location="cpu", weights_only=True)
    sharded = sorted({json.loads(fqn)[0] for fqn in skeleton.get(SHARDED_KEY, {}).get("tensors", {})})
    assert sharded == ({"ddp": [], "fsdp": ["agent", "critic", "loss_fn", "optimizer"]}[mode])  # FSDP2's DTensors
    assert payload["agent"]["copy_gain"].shape == {"ddp": (), "fsdp": (1,)}[mode]
    positions = [extra["data_position"] for extra in payload["extra_ranks"]]
    assert [(p["rank"], p["world_size"], p["next_epoch"], p["next_batch"]) for p in positions] == [(0, 2, 2, 0), (1, 2, 2, 0)]
    assert positions[0]["next_batch_ids_sha256"] != positions[1]["next_batch_ids_sha256"]
    assert tensor_differences(payload["rng_ranks"][0], payload["rng_ranks"][1])  # a stream of its own per rank
    state = read_json(out / "par" / "training_state.json")
    assert state["status"] == "completed" and state["config"]["parallel"] == mode and state["config"]["world_size"] == 2

    # One process on the same run: its data position differs (the world size: refused unless told);
    # FSDP2's layout of the agent (a one-element copy_gain) does not fit one process's model at all.
    argv = ["--output-dir", str(out), "--run-name", "par", "--resume", *replace_flags(QUICK_FLAGS, {"--epochs": "3"})]
    assert trainloop.main(argv) == 2
    assert {
        "ddp": "world_size: checkpoint 2, now 1",
        "fsdp": "does not fit the model (agent.copy_gain: parameter (), optimizer exp_avg (1,)): a run trained with --parallel fsdp",
    }[mode] in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_job_killed_at_a_seeded_moment_resumes_bit_identical(tmp_path, mode):
    """SIGKILL of torchrun and every worker mid-run, then --resume: weights, optimizer and every rank's RNG end
    bit-identical to an uninterrupted job of the same world size, and the log repeats its lines."""
    flags = (*FAST_FLAGS, "--parallel", mode)  # 64 pairs, 8 batches per epoch, 3 epochs
    out = tmp_path / "runs"
    run_job(job_cmd(2, out, "reference", flags=flags), tmp_path)

    rng = random.Random(f"trainloop-{mode}")
    job = Trainer(job_cmd(2, out, "killed", flags=flags), tmp_path, job_env())
    # at a seeded batch or, on a slow machine, as soon after as a first checkpoint is committed
    assert job.wait_batches(rng.randint(3, 14), JOB_TIMEOUT), job.output[-6000:]
    assert job.wait_for(lambda _: committed(out / "killed"), JOB_TIMEOUT), job.output[-6000:]
    time.sleep(rng.uniform(0.0, 0.03))  # between log lines: often inside a save
    kill_job(job)
    assert not any(line.startswith("Completed") for line in job.lines), "the job ended before its kill"

    output = run_job(job_cmd(2, out, "killed", "--resume", flags=flags), tmp_path)
    assert "Resumed from checkpoint" in output
    assert_same_final_payload(exported(out / "reference", tmp_path / "a.pt"), exported(out / "killed", tmp_path / "b.pt"))
    assert_log_consistent((out / "reference" / "training.log").read_text(), (out / "killed" / "training.log").read_text())
