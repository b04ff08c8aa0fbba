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
    assert d["resume"] == {"epoch": 0, "batch": 2, "global_step": 3, "next_batch": 3}
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
    assert d["identical"] and d["changed"] == 0 and d["compared"] > 5


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
    assert loose.exit_code == 0 and json.loads(loose.stdout)["identical"]


def test_diff_resumed_run_matches_uninterrupted(tmp_path):
    write_run(tmp_path / "runs", "straight", n=6, seed=3)
    write_run(tmp_path / "runs", "resumed", n=3, seed=3)
    write_run(tmp_path / "runs", "resumed", n=3, seed=99)  # resume restores the model, optimizer and RNG
    result = invoke("diff", "runs/straight:5", "runs/resumed:5", "--json")
    d = json.loads(result.stdout)
    assert result.exit_code == 0, [t for t in d["tensors"] if t["status"] != "same"]
    assert d["identical"]


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
