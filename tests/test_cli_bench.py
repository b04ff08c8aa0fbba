"""``ckptctl bench``: every ratio is reported with its goal; bad flags are usage errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ckptctl.bench import GOALS, recommend_save_every, run_bench
from ckptctl.cli import app

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
    report = run_bench(16 * 1024 * 1024, workdir=tmp_path, repeats=1)
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
