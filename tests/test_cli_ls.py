"""``ckptctl ls``: tables, --json shape, damaged and hand-copied runs, exit codes."""

from __future__ import annotations

import datetime as dt
import json
import os

from tests.cli_helpers import invoke
from tests.format_helpers import disk_bytes
from tests.runs import checksum, ckpt, index_of, write_index, write_run


def test_ls_table_marks_latest_best_and_totals(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=4, best_at=1)
    result = invoke("ls")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "run_a" in out and "runs/run_a" in out
    lines = {line.split()[0]: line for line in out.splitlines() if "│" in line}
    assert set(lines) == {"0", "1", "2", "3"}
    assert "best" in lines["1"] and "latest" not in lines["1"]
    assert "latest" in lines["3"]
    assert "4 checkpoint(s)" in out
    assert "best model: from checkpoint 1" in out


def test_ls_json_shape_and_raw_numbers(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=3)
    result = invoke("ls", "runs", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    (r,) = doc["runs"]
    # the shape the README documents (Output formats), exactly
    assert set(r) == {"name", "path", "kind", "total_bytes", "indexed", "locked", "status", "checkpoints", "best", "problems", "drive"}
    assert r["name"] == "run_a" and r["path"] == "runs/run_a" and r["kind"] == "ckptctl"
    # bytes (format 2, see test_cli_format2.py): the full state of each, the unique bytes of the run
    assert [c["size_bytes"] for c in r["checkpoints"]] == [e["state_bytes"] for e in index_of(run)["checkpoints"]]
    assert r["total_bytes"] == disk_bytes(run)
    for c in r["checkpoints"]:
        assert set(c) == {"id", "epoch", "batch", "global_step", "metrics", "size_bytes", "new_bytes", "timestamp", "path",
                          "checksum", "pinned", "mirrored", "indexed", "present", "latest", "best_source"}
        assert isinstance(c["size_bytes"], int)
        assert dt.datetime.fromisoformat(c["timestamp"]).utcoffset() == dt.timedelta(0)
        assert c["checksum"] == checksum(ckpt(run, c["id"]))
        assert os.path.isfile(c["path"])
    assert [c["latest"] for c in r["checkpoints"]] == [False, False, True]
    assert set(r["best"]) == {"source_id", "epoch", "batch", "metrics", "size_bytes", "new_bytes", "path", "metric", "value",
                              "promoted_by_hand", "present"}
    assert r["best"]["source_id"] == 2 and r["best"]["new_bytes"] == os.path.getsize(run / "best_model.pt")


def test_ls_one_run_directory_and_drive_root_alike(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir()
    write_run(tmp_path / "runs", "run_a", n=2, drive=drive)
    one = json.loads(invoke("ls", "runs/run_a", "--json").stdout)
    mirror = json.loads(invoke("ls", str(drive), "--json").stdout)
    assert [r["name"] for r in one["runs"]] == ["run_a"]
    assert [r["name"] for r in mirror["runs"]] == ["run_a"]
    assert [c["id"] for c in mirror["runs"][0]["checkpoints"]] == [0, 1]
    local = json.loads(invoke("ls", "runs", "--json").stdout)["runs"][0]
    assert all(c["mirrored"] for c in local["checkpoints"])
    assert "drive" in invoke("ls", "runs").stdout


def test_ls_empty_folder_is_an_empty_listing(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("ls", "empty", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"runs": []}
    assert invoke("ls", "empty").exit_code == 0


def test_ls_missing_path_is_a_usage_error(tmp_path):
    result = invoke("ls", "nowhere")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_ls_file_instead_of_folder_is_a_usage_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = invoke("ls", "afile")
    assert result.exit_code == 2 and result.stderr.startswith("Error: ")


def test_ls_run_without_index_lists_files_cheaply(make_run):
    run = make_run("copied", n=3, drop=["checkpoint_metadata.json"])
    result = invoke("ls", "--json")
    assert result.exit_code == 0
    (r,) = json.loads(result.stdout)["runs"]
    assert r["indexed"] is False
    assert [c["id"] for c in r["checkpoints"]] == [0, 1, 2]
    assert all(c["epoch"] is None and not c["indexed"] for c in r["checkpoints"])
    assert [c["size_bytes"] for c in r["checkpoints"]] == [os.path.getsize(ckpt(run, i)) for i in range(3)]
    assert "unindexed" in invoke("ls").stdout


def test_ls_garbage_index_still_lists_with_a_warning(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=2)
    (run / "checkpoint_metadata.json").write_bytes(b"\x00{not json")
    result = invoke("ls", "--json")
    assert result.exit_code == 0
    (r,) = json.loads(result.stdout)["runs"]
    assert [c["id"] for c in r["checkpoints"]] == [0, 1]
    assert "warning: run_a:" in result.stderr and "not valid JSON" in result.stderr


def test_ls_hostile_index_entry_is_reported_not_followed(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=2)
    outside = tmp_path / "secret.pt"
    outside.write_bytes(b"x" * 1234)
    index = index_of(run)
    evil = dict(index["checkpoints"][0], id=7, path="../../secret.pt")
    index["checkpoints"].append(evil)
    write_index(run, index)
    result = invoke("ls", "--json")
    assert result.exit_code == 0
    (r,) = json.loads(result.stdout)["runs"]
    assert [c["id"] for c in r["checkpoints"]] == [0, 1]
    assert "index entry 7 skipped" in result.stderr
    # the 1234 bytes outside are not counted
    assert r["total_bytes"] == disk_bytes(run)


def test_ls_missing_checkpoint_file_is_marked(make_run):
    make_run(n=3, drop=[1])
    result = invoke("ls", "--json")
    (r,) = json.loads(result.stdout)["runs"]
    assert [c["present"] for c in r["checkpoints"]] == [True, False, True]
    assert "missing" in result.stderr
    assert "MISSING" in invoke("ls").stdout


def test_names_that_look_like_markup_are_printed_as_they_are(tmp_path):
    write_run(tmp_path / "runs", "exp[red]1[b]", n=1)
    out = invoke("ls").stdout
    assert "exp[red]1[b]" in out
    assert "exp[red]1[b]" in invoke("verify").stdout


def test_the_drive_mark_belongs_to_the_run_it_was_verified_for_not_to_a_copy(tmp_path):
    import shutil

    from ckptctl import ModelPersistence, setup_drive_backup
    from ckptctl.storage.scan import read_index

    drive = setup_drive_backup(tmp_path / "drive")
    run = tmp_path / "runs" / "r"
    model = __import__("torch").nn.Linear(3, 3)
    with ModelPersistence(run, save_every_n_batches=1, drive_backup=drive) as p:
        for batch in range(2):
            p.maybe_save(0, batch, {"loss": 1.0}, agent=model)
    assert all(c.mirrored and c.mirrored["mirror"] == str(drive / "r") for c in read_index(run).checkpoints)
    shutil.copytree(run, tmp_path / "runs" / "r_copy")  # a copy under another name: its own mirror has nothing
    doc = json.loads(invoke("ls", str(tmp_path / "runs"), "--json").stdout)
    marks = {r["name"]: [c["mirrored"] for c in r["checkpoints"]] for r in doc["runs"]}
    assert marks == {"r": [True, True], "r_copy": [False, False]}
