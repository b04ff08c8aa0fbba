"""``ckptctl show``, ``diff`` and ``resume-info`` on real runs."""

from __future__ import annotations

import json

from tests.cli_helpers import ckpt, flip_byte, invoke, malicious_bytes, replace_indexed_file, truncate, write_run


def test_show_newest_by_default(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=3)
    result = invoke("show", "runs/run_a", "--json")
    assert result.exit_code == 0, result.stderr
    d = json.loads(result.stdout)
    assert d["id"] == 2 and d["epoch"] == 0 and d["batch"] == 2 and d["global_step"] == 3
    assert d["checksum_verified"] is True
    assert set(d["components"]) == {"agent", "optimizer"}
    agent = d["components"]["agent"]
    assert agent["tensors"] == 2 and agent["parameters"] == 10 and agent["bytes"] == 40 and agent["dtypes"] == ["float32"]
    assert d["parameters"] == 10
    assert {"python", "torch_cpu"} <= set(d["rng"])
    assert d["resume"] == {"epoch": 0, "batch": 2, "global_step": 3, "next_epoch": 0, "next_batch": 3, "batches_per_epoch": None}
    assert set(d["metrics"]) == {"loss", "accuracy_delta"}


def test_show_by_id_best_and_file(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=3, best_at=1)
    assert json.loads(invoke("show", "runs/run_a", "1", "--json").stdout)["batch"] == 1
    best = json.loads(invoke("show", "runs/run_a", "best", "--json").stdout)
    assert best["batch"] == 1 and best["checksum_verified"]
    by_file = json.loads(invoke("show", str(ckpt(run, 0)), "--json").stdout)
    assert by_file["id"] == 0 and by_file["checksum_verified"]
    text = invoke("show", "runs", "0")
    assert text.exit_code == 0
    assert "agent" in text.stdout and "10 model parameters" in text.stdout and "continues at epoch 0, batch 1" in text.stdout


def test_show_unknown_id_or_ambiguous_folder_is_usage_error(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=2)
    write_run(tmp_path / "runs", "run_b", n=1)
    unknown = invoke("show", "runs/run_a", "42")
    assert unknown.exit_code == 2 and "no checkpoint 42" in unknown.stderr
    ambiguous = invoke("show", "runs")
    assert ambiguous.exit_code == 2 and "holds 2 runs" in ambiguous.stderr
    assert invoke("show", "runs/run_a", "x").exit_code == 2


def test_show_corrupt_and_unsafe_exit_1_with_reason(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=2)
    truncate(ckpt(run, 1))
    result = invoke("show", "runs/run_a", "1")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "checksum mismatch" in result.stderr
    marker = tmp_path / "pwned"
    replace_indexed_file(run, 0, malicious_bytes(marker))
    unsafe = invoke("show", "runs/run_a", "0")
    assert unsafe.exit_code == 1 and "pickled code" in unsafe.stderr
    assert not marker.exists()


def test_diff_same_checkpoint_is_identical(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=2)
    result = invoke("diff", "runs/run_a:1", str(ckpt(run, 1)), "--json")
    assert result.exit_code == 0
    d = json.loads(result.stdout)
    assert d["identical"] and d["bit_identical"] and d["changed"] == 0 and d["compared"] > 5
    text = invoke("diff", "runs/run_a:1", str(ckpt(run, 1)))
    assert text.exit_code == 0 and f"Identical: all {d['compared']} tensors are bit-identical" in text.stdout


def _nan(payload: int):
    """A float32 NaN whose low mantissa bits are ``payload``."""
    import torch

    return torch.tensor([0x7FC00000 | payload], dtype=torch.int32).view(torch.float32)


def _saved_pair(tmp_path, a, b) -> tuple[str, str]:
    """Two checkpoint files written with ``torch.save``: ``{"agent": {"w": a}}`` and the same with ``b``."""
    import torch

    for name, value in (("a.pt", a), ("b.pt", b)):
        torch.save({"epoch": 0, "batch": 0, "global_step": 1, "agent": {"w": value, "bias": torch.ones(2)}}, tmp_path / name)
    return str(tmp_path / "a.pt"), str(tmp_path / "b.pt")


def _changed_rows(result) -> dict:
    return {t["name"]: t for t in json.loads(result.stdout)["tensors"] if t["status"] != "same"}


def test_diff_tells_negative_zero_from_zero(tmp_path):
    """Numerically equal (a float64 comparison calls them the same) but not the same bytes: an exact resume differs."""
    import torch

    a, b = _saved_pair(tmp_path, torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]))
    result = invoke("diff", a, b, "--json")
    assert result.exit_code == 1, result.stdout
    d = json.loads(result.stdout)
    assert not d["identical"] and not d["bit_identical"] and d["changed"] == 1
    assert _changed_rows(result) == {"agent.w": {"name": "agent.w", "status": "changed", "shape_a": [2], "shape_b": [2], "max_abs_diff": 0.0}}
    text = invoke("diff", a, b)
    assert text.exit_code == 1 and "0 (bits differ)" in text.stdout and "Different: 1 of 2 tensors differ" in text.stdout
    loose = invoke("diff", a, b, "--atol", "1e-12")
    assert loose.exit_code == 0 and "Identical: all 2 tensors match within 1e-12" in loose.stdout
    assert "bit-identical" not in loose.stdout


def test_diff_tells_nan_payloads_apart(tmp_path):
    a, b = _saved_pair(tmp_path, _nan(0), _nan(1))
    result = invoke("diff", a, b, "--json")
    assert result.exit_code == 1, result.stdout
    assert list(_changed_rows(result)) == ["agent.w"]
    same = invoke("diff", a, str(tmp_path / "a.pt"), "--json")
    assert same.exit_code == 0 and json.loads(same.stdout)["bit_identical"]
    loose = invoke("diff", a, b, "--atol", "1e-6", "--json")  # numerically NaN matches NaN
    assert loose.exit_code == 0 and json.loads(loose.stdout)["identical"] and not json.loads(loose.stdout)["bit_identical"]


def test_diff_int64_beyond_float64_precision_through_the_library(tmp_path):
    """Two checkpoints saved by ModelPersistence whose int64 buffer holds 2**53 and 2**53 + 1 (equal as float64)."""
    import random

    import numpy as np
    import torch

    from ckptctl import ModelPersistence

    counter = torch.nn.Module()
    counter.register_buffer("n", torch.tensor([2**53, 7]))
    with ModelPersistence(tmp_path / "runs" / "r", save_every_n_batches=1, background=False) as p:
        for batch, value in enumerate((2**53, 2**53 + 1)):
            counter.n[0] = value
            random.seed(0)  # the same RNG states in both checkpoints
            np.random.seed(0)
            torch.manual_seed(0)
            p.save_checkpoint(0, batch, {"loss": 1.0}, counter=counter)
    result = invoke("diff", "runs/r:0", "runs/r:1", "--json")
    assert result.exit_code == 1, result.stdout
    assert _changed_rows(result) == {"counter.n": {"name": "counter.n", "status": "changed", "shape_a": [2], "shape_b": [2], "max_abs_diff": 1}}
    assert '"max_abs_diff": 1\n' in result.stdout  # an exact integer, not 1.0
    text = invoke("diff", "runs/r:0", "runs/r:1")
    assert text.exit_code == 1 and "counter.n" in text.stdout and "Different: 1 of" in text.stdout
    assert invoke("diff", "runs/r:0", "runs/r:1", "--atol", "0.5").exit_code == 1  # integers compared in int64
    assert invoke("diff", "runs/r:0", "runs/r:1", "--atol", "1").exit_code == 0


def test_diff_reports_changed_tensors_and_exits_1(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=3)
    result = invoke("diff", "runs/run_a:0", "runs/run_a", "--json")
    assert result.exit_code == 1
    d = json.loads(result.stdout)
    rows = {t["name"]: t for t in d["tensors"]}
    assert rows["agent.weight"]["status"] == "changed" and rows["agent.weight"]["max_abs_diff"] > 0
    assert d["a"]["batch"] == 0 and d["b"]["batch"] == 2
    text = invoke("diff", "runs/run_a:0", "runs/run_a:2")
    assert text.exit_code == 1 and "agent.weight" in text.stdout and "Different:" in text.stdout
    loose = invoke("diff", "runs/run_a:0", "runs/run_a:2", "--atol", "1e9", "--json")
    assert loose.exit_code == 0 and json.loads(loose.stdout)["identical"] and not json.loads(loose.stdout)["bit_identical"]


def test_diff_resumed_run_matches_uninterrupted(tmp_path):
    write_run(tmp_path / "runs", "straight", n=6, seed=3)
    write_run(tmp_path / "runs", "resumed", n=3, seed=3)
    write_run(tmp_path / "runs", "resumed", n=3, seed=99)  # resume restores the model, optimizer and RNG
    result = invoke("diff", "runs/straight:5", "runs/resumed:5", "--json")
    d = json.loads(result.stdout)
    assert result.exit_code == 0, [t for t in d["tensors"] if t["status"] != "same"]
    assert d["identical"] and d["bit_identical"]


def test_diff_unreadable_side_exits_1(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=2)
    flip_byte(ckpt(run, 0))
    result = invoke("diff", "runs/run_a:0", "runs/run_a:1")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ")
    assert invoke("diff", "runs/run_a:7", "runs/run_a:1").exit_code == 2


def test_resume_info_healthy(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=3)
    result = invoke("resume-info", "runs/run_a", "--json")
    assert result.exit_code == 0
    (info,) = json.loads(result.stdout)["runs"]
    assert info["checkpoint"]["id"] == 2 and info["skipped"] == []
    assert "newest" in info["reason"]
    text = invoke("resume-info", "runs/run_a").stdout
    assert "would load checkpoint 2" in text and "continues at epoch 0, batch 3" in text


def test_resume_info_skips_corrupt_newer(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=4)
    truncate(ckpt(run, 3))
    ckpt(run, 2).unlink()
    (info,) = json.loads(invoke("resume-info", "--json").stdout)["runs"]
    assert info["checkpoint"]["id"] == 1
    assert [(s["id"], s["status"]) for s in info["skipped"]] == [(3, "corrupt"), (2, "missing")]


def test_resume_info_none_verifies_exits_1(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=2)
    flip_byte(ckpt(run, 0))
    flip_byte(ckpt(run, 1))
    result = invoke("resume-info", "runs/run_a")
    assert result.exit_code == 1 and "no checkpoint verifies" in result.stdout


def test_resume_info_agrees_with_library_resume(tmp_path):
    import torch

    from ckptctl import ModelPersistence

    run = write_run(tmp_path / "runs", "run_a", n=4)
    flip_byte(ckpt(run, 3))
    (info,) = json.loads(invoke("resume-info", "runs/run_a", "--json").stdout)["runs"]
    model = torch.nn.Linear(4, 2)
    p = ModelPersistence(run)
    try:
        meta = p.resume(agent=model, optimizer=torch.optim.Adam(model.parameters()))
    finally:
        p.close()
    assert meta["checkpoint_id"] == info["checkpoint"]["id"] == 2
