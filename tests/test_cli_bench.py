"""``ckptctl bench``: every ratio is reported with its goal; bad flags are usage errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ckptctl.bench import GOALS, recommend_save_every, run_bench
from ckptctl.cli import BENCH_SECTIONS, app

runner = CliRunner()


def test_bench_json_reports_measured_ratios_and_advice(tmp_path):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    result = runner.invoke(
        app, ["bench", "--size", "2MiB", "--repeats", "1", "--sections", "save,verify,restore", "--workdir", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["size_bytes"] == 2 * 1024 * 1024
    m = doc["measurements"]
    for key in ("stall_s", "sync_save_s", "background_save_s", "raw_write_s", "verify_s", "cold_read_s", "restore_s", "cp_fsync_s"):
        assert isinstance(m[key], float) and m[key] > 0, key
    assert m["staging_bytes"] >= m["state_bytes"] == 2 * 1024 * 1024
    assert set(doc["ratios"]) == {name for name, *_ in GOALS}
    for name in ("stall_vs_sync_save", "background_save_vs_raw_write", "verify_vs_cold_read", "restore_vs_cp"):
        ratio = doc["ratios"][name]
        assert ratio["value"] > 0 and isinstance(ratio["ok"], bool)
    assert doc["ratios"]["ls_vs_import"]["value"] is None  # the cli section was not run
    assert doc["recommendation"]["save_every"] >= 1
    assert list(tmp_path.iterdir()) == []  # its work folder is removed


def test_bench_human_output_and_usage_errors(tmp_path):
    result = runner.invoke(app, ["bench", "--size", "1MiB", "--repeats", "1", "--sections", "save", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "training stall per save" in result.stdout and "--save-every" in result.stdout
    for args in (["--size", "lots"], ["--sections", "save,warp"], ["--drive", str(tmp_path / "nope")], ["--repeats", "0"]):
        bad = runner.invoke(app, ["bench", *args])
        assert bad.exit_code == 2, (args, bad.output)


def test_recommendation_keeps_stall_under_one_percent():
    assert recommend_save_every(0.05, 0.5) == 10  # 50 ms stall, 0.5 s batches
    assert recommend_save_every(0.0001, 1.0) == 1
    with pytest.raises(ValueError, match="batch time must be positive"):
        recommend_save_every(0.1, 0)


@pytest.mark.slow
def test_full_bench_runs_every_section(tmp_path):
    report = run_bench(16 * 1024 * 1024, workdir=tmp_path, repeats=1, sections=BENCH_SECTIONS + ("parallel",))
    measured = {name: r for name, r in report.ratios.items() if not name.startswith("scale_")}  # scale runs alone
    assert all(r["value"] is not None for r in measured.values()), report.ratios


def test_bench_scale_section_saves_and_verifies_one_checkpoint(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = runner.invoke(app, ["bench", "--sections", "scale", "--size", "4MB", "--workdir", str(work), "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)["measurements"]
    assert m["scale_bytes"] == 4_000_000 and m["scale_save_s"] > 0 and m["scale_verify_peak_rss_bytes"] > 0
    assert m["scale_staged_bytes"] >= 4_000_000  # small enough to stage
    assert runner.invoke(app, ["bench", "--sections", "scale,save"]).exit_code == 2


def test_bench_parallel_runs_a_torchrun_job_and_reports_its_ratios(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = runner.invoke(app, ["bench", "--parallel", "--size", "1MiB", "--repeats", "1", "--workdir", str(work), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    m = doc["measurements"]
    for key in ("parallel_stall_s", "parallel_dcp_async_blocking_s", "parallel_write_s", "parallel_raw_write_s"):
        assert isinstance(m[key], float) and m[key] > 0, key
    assert m["parallel_world_size"] == 2 and m["parallel_layout"] == "fsdp2" and m["parallel_layout_note"] is None
    assert m["parallel_written_bytes"] >= m["parallel_state_bytes"] > 0  # every tensor changed between saves
    assert m["parallel_raw_bytes"] >= m["parallel_written_bytes"]  # each rank wrote its share, rounded up
    assert "stall_s" not in m  # --parallel on its own runs no single-process section
    for name in ("parallel_stall_vs_dcp_async", "parallel_write_vs_raw"):
        ratio = doc["ratios"][name]
        assert ratio["value"] > 0 and isinstance(ratio["ok"], bool), name
    assert doc["ratios"]["stall_vs_sync_save"]["value"] is None
    assert doc["recommendation"]["stall_s"] == m["parallel_stall_s"]
    assert list(work.iterdir()) == []  # its work folder is removed


def test_bench_parallel_usage_errors_and_a_failing_job(tmp_path, monkeypatch):
    for args in (["--nproc", "2"], ["--parallel", "--nproc", "0"], ["--parallel", "--sections", "scale"], ["--sections", ","]):
        bad = runner.invoke(app, ["bench", *args])
        assert bad.exit_code == 2, (args, bad.output)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # every rank fails reading it
    failed = runner.invoke(app, ["bench", "--parallel", "--size", "1MiB", "--repeats", "1", "--workdir", str(work)])
    assert failed.exit_code == 1, failed.output
    last = failed.stderr.strip().splitlines()[-1]  # after the progress lines: the first failed rank's cause
    assert last == "Error: parallel bench: the torchrun job exited with status 1: ValueError: invalid literal for int() with base 10: 'many'"
    assert list(work.iterdir()) == []
