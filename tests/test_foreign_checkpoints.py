"""Folders ckptctl did not write: the guide's loose files, a Trainer output, Lightning checkpoints, .safetensors files.

Each layout is built for real (tests/foreign_layouts.py). ``ls`` lists it with its kind and
what its files record (without torch), ``verify`` checks it safely, ``show``/``diff`` read
it, writers refuse it and never change a byte, and loose files restore into a run that
the library resumes from.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptctl import ModelPersistence
from ckptctl.storage.scan import read_index
from ckptctl.tensors import compare_states
from tests.cli_helpers import REPO, invoke, malicious_bytes, truncate
from tests.foreign_layouts import (
    GUIDE_DELTAS,
    GUIDE_POSITIONS,
    snapshot,
    write_guide_flat,
    write_hf_output,
    write_lightning_ckpt,
    write_lightning_version,
)
from tests.test_legacy_runs import GuideModels


def _json(*args: str) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)


def _runs(path: Path) -> dict[str, dict]:
    return {run["name"]: run for run in _json("ls", str(path))["runs"]}


def _drive(tmp_path: Path) -> Path:
    """The guide's Drive folder plus a ``cp -r checkpoints/`` backup of it and a ckptctl mirror run."""
    drive, _ = write_guide_flat(tmp_path / "drive" / "ARC-EFE-Backups")
    backup = drive / "checkpoint_backup_20250301_120000"
    backup.mkdir()
    for name in ("checkpoint_00000.pt", "checkpoint_00001.pt"):
        (backup / name).write_bytes((drive / name).read_bytes())
    return drive


# ---------------------------------------------------------------------- ls: listed by kind, without torch


def test_ls_lists_the_guides_flat_drive_folder_and_backup_copies_as_loose_groups(tmp_path, make_run):
    drive = _drive(tmp_path)
    make_run("mirrored", n=2, parent=drive)  # ckptctl's own mirror run beside them
    runs = _runs(drive)
    assert {name: run["kind"] for name, run in runs.items()} == {
        "mirrored": "ckptctl", "ARC-EFE-Backups": "loose", "checkpoint_backup_20250301_120000": "loose",
    }
    flat = runs["ARC-EFE-Backups"]
    rows = flat["checkpoints"]
    assert [(c["id"], c["name"], c["epoch"], c["batch"]) for c in rows] == [
        (i, f"checkpoint_{i:05d}.pt", e, b) for i, (e, b) in enumerate(GUIDE_POSITIONS)
    ]
    assert [c["metrics"]["accuracy_delta"] for c in rows] == GUIDE_DELTAS
    assert [c["latest"] for c in rows] == [False, False, True]
    assert [c["best_source"] for c in rows] == [False, True, False]  # best_model.pt records checkpoint 1's position
    assert flat["best"]["source_id"] == 1 and flat["best"]["path"].endswith("best_model.pt")
    assert rows[0]["timestamp"] == "2025-03-01T12:00:00.000000+00:00"  # the payload's own time, not the file's
    assert flat["total_bytes"] == sum(p.stat().st_size for p in drive.iterdir() if p.is_file())
    human = invoke("ls", str(drive))
    assert human.exit_code == 0 and "No runs found" not in human.stdout
    assert "ARC-EFE-Backups" in human.stdout and "loose checkpoint files, read-only" in human.stdout


def test_ls_of_foreign_folders_does_not_import_torch(tmp_path):
    _drive(tmp_path)
    write_hf_output(tmp_path / "drive" / "hf")
    write_lightning_version(tmp_path / "drive" / "version_0")
    probe = (
        "import sys, json\nfrom ckptctl.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write('TORCH=%s' % ('torch' in sys.modules))\n"
    )
    for path in ("drive", "drive/ARC-EFE-Backups", "drive/hf", "drive/version_0"):
        proc = subprocess.run([sys.executable, "-c", probe, "ls", path, "--json"], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert "TORCH=False" in proc.stderr, (path, proc.stderr)
        assert json.loads(proc.stdout)["runs"], path
    kinds = {r["name"]: r["kind"] for r in json.loads(proc.stdout)["runs"]}
    assert kinds == {"version_0": "lightning"}


def test_a_guide_index_beside_flat_files_describes_a_loose_group_not_an_empty_run(tmp_path):
    drive, _ = write_guide_flat(tmp_path / "flat")
    (drive / "checkpoint_metadata.json").write_text(json.dumps({"0": {"epoch": 0, "batch": 49, "metrics": {}, "timestamp": "2025-03-01T12:00:00"}}))
    (run,) = _runs(drive).values()
    assert run["kind"] == "loose" and len(run["checkpoints"]) == 3


def test_ls_lists_a_trainer_output_with_steps_epochs_metrics_and_its_best_checkpoint(tmp_path):
    hf = write_hf_output(tmp_path / "out")
    (run,) = _runs(hf).values()
    assert run["kind"] == "hf-trainer" and run["name"] == "out"
    rows = run["checkpoints"]
    assert [(c["id"], c["name"], c["global_step"], c["epoch"]) for c in rows] == [(10, "checkpoint-10", 10, 1.0), (20, "checkpoint-20", 20, 2.0)]
    assert rows[1]["metrics"]["eval_loss"] == pytest.approx(1 / 20) and "loss" in rows[1]["metrics"]
    assert "eval_runtime" not in rows[1]["metrics"] and "step" not in rows[1]["metrics"]
    assert sorted(rows[0]["files"]) == sorted(p.name for p in (hf / "checkpoint-10").iterdir())
    assert rows[0]["size_bytes"] == sum(p.stat().st_size for p in (hf / "checkpoint-10").iterdir())
    assert [c["best_source"] for c in rows] == [False, True] and [c["latest"] for c in rows] == [False, True]
    assert run["monitor"]["best_score"] == pytest.approx(1 / 20) and run["monitor"]["best_checkpoint"] == "checkpoint-20"
    (one,) = _runs(hf / "checkpoint-10").values()  # one checkpoint folder given as PATH
    assert one["kind"] == "hf-trainer" and [c["id"] for c in one["checkpoints"]] == [10]


def test_ls_lists_lightning_checkpoints_with_epoch_step_and_monitor(tmp_path):
    version = write_lightning_version(tmp_path / "lightning_logs" / "version_0")
    for path in (tmp_path / "lightning_logs", version, version / "checkpoints"):
        (run,) = _runs(path).values()
        assert run["kind"] == "lightning", path
        rows = run["checkpoints"]
        assert [(c["epoch"], c["global_step"]) for c in rows] == [(0, 10), (1, 20)]
        assert [c["metrics"]["val_loss"] for c in rows] == [pytest.approx(0.5), pytest.approx(0.3)]
        assert run["monitor"] == {"metric": "val_loss", "mode": "min", "current_score": pytest.approx(0.3),
                                  "best_score": pytest.approx(0.3), "best_checkpoint": "epoch=1-step=20.ckpt"}
        assert [c["best_source"] for c in rows] == [False, True]
    (single,) = _runs(version / "checkpoints" / "epoch=0-step=10.ckpt").values()
    assert single["kind"] == "lightning" and single["checkpoints"][0]["global_step"] == 10


# ---------------------------------------------------------------------- verify


def test_verify_checks_loose_files_and_a_single_file(tmp_path):
    drive = _drive(tmp_path)
    doc = _json("verify", str(drive))
    assert doc["ok"] is True and len(doc["results"]) == 6  # 3 + best in the flat folder, 2 in the backup copy
    assert all("no checksum" in r["detail"] for r in doc["results"])
    single = invoke("verify", str(drive / "checkpoint_00001.pt"))
    assert single.exit_code == 0 and "not a directory" not in single.stderr
    truncate(drive / "checkpoint_00002.pt")
    bad = _json("verify", str(drive / "checkpoint_00002.pt"))
    assert bad["ok"] is False and bad["results"][0]["status"] == "corrupt"
    assert invoke("verify", str(drive)).exit_code == 1


def test_verify_a_file_of_a_ckptctl_run_checks_it_against_its_index(tmp_path, make_run):
    run = make_run("run_a", n=2)
    doc = _json("verify", str(run / "checkpoints" / "checkpoint_00001.pt"))
    assert doc["ok"] is True and doc["results"][0]["detail"] == ""  # checksum-verified, not "no checksum"
    data = bytearray((run / "checkpoints" / "checkpoint_00001.pt").read_bytes())
    data[-30] ^= 0xFF  # inside the zip's end records: still loads, fails the checksum
    (run / "checkpoints" / "checkpoint_00001.pt").write_bytes(bytes(data))
    bad = _json("verify", str(run / "checkpoints" / "checkpoint_00001.pt"))
    assert bad["ok"] is False and "checksum" in bad["results"][0]["detail"]


def test_verify_never_runs_code_in_a_loose_file(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "loose"
    folder.mkdir()
    (folder / "checkpoint_00000.pt").write_bytes(malicious_bytes(marker))
    doc = _json("verify", str(folder))
    assert doc["results"][0]["status"] == "unsafe" and "pickled code" in doc["results"][0]["detail"]
    assert _runs(folder)["loose"]["checkpoints"][0]["global_step"] == 1  # ls read its record without running it
    assert not marker.exists()


def test_verify_checks_a_trainer_output_file_by_file(tmp_path):
    hf = write_hf_output(tmp_path / "out")
    doc = _json("verify", str(hf))
    assert doc["ok"] is True and [r["id"] for r in doc["results"]] == [10, 20]
    assert "training_args.bin: archive intact, not unpickled" in doc["results"][0]["detail"]
    truncate(hf / "checkpoint-20" / "optimizer.pt")
    doc = _json("verify", str(hf))
    assert [r["status"] for r in doc["results"]] == ["ok", "corrupt"]
    assert "optimizer.pt" in doc["results"][1]["detail"]
    (hf / "checkpoint-10" / "model.safetensors").unlink()
    assert _json("verify", str(hf / "checkpoint-10"))["results"][0]["status"] == "missing"


def test_verify_checks_safetensors_header_and_data_bounds(tmp_path):
    good = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.arange(6, dtype=torch.int64)}, good)
    assert _json("verify", str(good))["ok"] is True
    data = good.read_bytes()
    short = tmp_path / "short.safetensors"
    short.write_bytes(data[:-8])
    (result,) = _json("verify", str(short))["results"]
    assert result["status"] == "corrupt" and "truncated" in result["detail"]
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["a"]["data_offsets"] = [0, 10**12]  # claims a terabyte that is not there
    lying = json.dumps(header).encode()
    (tmp_path / "lying.safetensors").write_bytes(struct.pack("<Q", len(lying)) + lying + data[8 + length :])
    (result,) = _json("verify", str(tmp_path / "lying.safetensors"))["results"]
    assert result["status"] == "corrupt" and "needs" in result["detail"]
    nan = tmp_path / "nan.safetensors"
    save_file({"a": torch.tensor([1.0, float("nan")])}, nan)
    assert _json("verify", str(nan))["ok"] is True
    assert _json("verify", str(nan), "--deep")["results"][0]["status"] == "nonfinite"


def test_verify_reports_a_lightning_checkpoint_that_needs_pickled_code_as_unsafe(tmp_path):
    import argparse

    version = write_lightning_version(tmp_path / "version_0")
    folder = version / "checkpoints"
    write_lightning_ckpt(folder / "last.ckpt", 1, 20, 0.3, folder / "epoch=1-step=20.ckpt", 0.3, hparams={"args": argparse.Namespace(lr=0.1)})
    doc = _json("verify", str(version))
    statuses = {Path(r["path"]).name: r["status"] for r in doc["results"]}
    assert statuses == {"epoch=0-step=10.ckpt": "ok", "epoch=1-step=20.ckpt": "ok", "last.ckpt": "unsafe"}
    assert doc["ok"] is False
    (last,) = [r for r in doc["results"] if r["path"].endswith("last.ckpt")]
    assert "pickled code" in last["detail"] and "argparse.Namespace" in last["detail"]  # the real cause, whole
    rows = {c["name"]: c for c in _runs(version)["version_0"]["checkpoints"]}
    assert rows["checkpoints/last.ckpt"]["global_step"] == 20  # ls still reads what it records


# ---------------------------------------------------------------------- show and diff


def test_show_a_safetensors_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.float16)}, path)
    result = invoke("show", str(path))
    assert result.exit_code == 0, result.stderr
    assert "not installed" not in result.stdout + result.stderr
    doc = _json("show", str(path))
    assert doc["components"]["model"] == {"tensors": 2, "elements": 9, "bytes": 30, "dtypes": ["float16", "float32"], "parameters": 9}


def test_show_and_diff_a_trainer_output(tmp_path):
    hf = write_hf_output(tmp_path / "out")
    doc = _json("show", str(hf))  # the newest checkpoint
    assert (doc["id"], doc["global_step"], doc["epoch"]) == (20, 20, 2.0)
    assert set(doc["components"]) == {"model", "optimizer", "scheduler"}
    assert doc["components"]["model"]["parameters"] == 4 * 8 + 8 + 8 * 2 + 2
    assert doc["rng"] == ["cpu", "numpy", "python"]
    assert doc["size_bytes"] == sum(p.stat().st_size for p in (hf / "checkpoint-20").iterdir())
    assert _json("show", str(hf / "checkpoint-10"))["global_step"] == 10
    assert _json("show", str(hf), "best")["id"] == 20
    diff = invoke("diff", f"{hf}:10", f"{hf}:20")
    assert diff.exit_code == 1 and "Different" in diff.stdout
    same = _json("diff", f"{hf}:10", str(hf / "checkpoint-10"))
    assert same["bit_identical"] is True and same["compared"] > 0


def test_show_and_diff_lightning_checkpoints(tmp_path):
    version = write_lightning_version(tmp_path / "version_0")
    doc = _json("show", str(version / "checkpoints" / "epoch=1-step=20.ckpt"))
    assert (doc["epoch"], doc["global_step"], doc["metrics"]) == (1, 20, {"val_loss": pytest.approx(0.3)})
    assert doc["components"]["state_dict"]["parameters"] == 3 * 2 + 2
    assert doc["extra"]["monitor"]["metric"] == "val_loss"
    assert _json("show", str(version), "best")["path"].endswith("epoch=1-step=20.ckpt")
    diff = _json("diff", f"{version}:epoch=0-step=10.ckpt", f"{version}:epoch=1-step=20.ckpt")
    assert diff["identical"] is False and any(t["name"] == "state_dict.model.weight" and t["status"] == "changed" for t in diff["tensors"])


def test_show_and_diff_loose_files(tmp_path):
    drive = _drive(tmp_path)
    doc = _json("show", str(drive))  # the folder's own files (its backup subfolder is named by its path)
    assert (doc["epoch"], doc["batch"], doc["label"]) == (1, 49, "ARC-EFE-Backups checkpoint_00002.pt")
    same = _json("diff", f"{drive}:1", f"{drive}:best")
    assert same["bit_identical"] is True
    assert _json("show", str(drive / "checkpoint_backup_20250301_120000"), "0")["batch"] == 49
    missing = invoke("show", str(drive / "checkpoint_backup_20250301_120000"), "best")
    assert missing.exit_code == 2 and "no best model" in missing.stderr


# ---------------------------------------------------------------------- read-only


def test_writers_refuse_folders_they_did_not_write_and_change_nothing(tmp_path):
    drive = _drive(tmp_path)
    hf = write_hf_output(tmp_path / "out")
    version = write_lightning_version(tmp_path / "version_0")
    before = {p: snapshot(p) for p in (drive, hf, version)}
    for path in (drive, hf, version):
        for args in (["prune", str(path), "--keep", "1", "--yes"], ["backup", str(path), "--drive", str(tmp_path)], ["promote", str(path), "1"]):
            result = invoke(*args)
            assert result.exit_code == 1, (args, result.stdout, result.stderr)
            assert "read-only" in result.stderr and result.stderr.startswith("Error: "), result.stderr
        assert invoke("resume-info", str(path)).exit_code == 1
        for args in (["ls", str(path)], ["verify", str(path)], ["show", str(path)] if path != drive else ["show", str(drive), "1"]):
            invoke(*args)
    assert invoke("restore", "--from-drive", "--drive", str(tmp_path), "--run", "out", "--to", str(tmp_path / "runs")).exit_code == 1
    assert {p: snapshot(p) for p in (drive, hf, version)} == before


def test_prune_beside_foreign_folders_prunes_its_own_runs_and_names_the_others(tmp_path, make_run):
    drive = _drive(tmp_path)
    run = make_run("mine", n=4, parent=drive)
    before = snapshot(drive / "checkpoint_backup_20250301_120000")
    result = invoke("prune", str(drive), "--keep", "1", "--yes")
    assert result.exit_code == 0, result.stderr
    assert "skipped" in result.stderr and "ARC-EFE-Backups (loose)" in result.stderr
    assert len(list((run / "checkpoints").iterdir())) < 4
    assert snapshot(drive / "checkpoint_backup_20250301_120000") == before
    assert len([p for p in drive.iterdir() if p.suffix == ".pt"]) == 4


# ---------------------------------------------------------------------- restore loose files into a run, then resume


def test_restore_the_guides_flat_folder_into_a_new_run_and_resume_exactly(tmp_path):
    drive, final = write_guide_flat(tmp_path / "drive" / "ARC-EFE-Backups")
    before = snapshot(drive)
    result = invoke("restore", "--from-drive", "--drive", str(drive), "--run", "ARC-EFE-Backups", "--to", "runs", "--as", "arc1")
    assert result.exit_code == 0, result.stderr
    assert 'ModelPersistence("runs/arc1", ...).resume(...)' in result.stdout and "checkpoint 2" in result.stdout
    run = tmp_path / "runs" / "arc1"
    for i in range(3):  # bytes kept exactly
        assert (run / "checkpoints" / f"checkpoint_{i:05d}.pt").read_bytes() == (drive / f"checkpoint_{i:05d}.pt").read_bytes()
    assert (run / "best_model.pt").read_bytes() == (drive / "best_model.pt").read_bytes()
    assert _runs(tmp_path / "runs")["arc1"]["best"]["source_id"] == 1  # best_model.pt is a copy of checkpoint 1
    index = read_index(run)  # built from the files, with checksums
    assert [(e.id, e.epoch, e.batch) for e in index.checkpoints] == [(i, e, b) for i, (e, b) in enumerate(GUIDE_POSITIONS)]
    assert all(e.checksum for e in index.checkpoints)
    assert _runs(tmp_path / "runs")["arc1"]["kind"] == "ckptctl"
    assert _json("verify", str(run))["ok"] is True
    fresh = GuideModels(seed=99)
    with ModelPersistence(run, background=False) as p:  # the guide's call: components by position, in the order saved
        info = p.resume(fresh.agent, fresh.qwen, fresh.solver2, fresh.efe_loss, fresh.policy_rl, fresh.optimizer)
    assert info["checkpoint_id"] == 2 and (info["epoch"], info["batch"]) == GUIDE_POSITIONS[2]
    for name, module in fresh.modules().items():
        assert [r.name for r in compare_states(module.state_dict(), final[name]) if not r.bit_identical] == [], name
    assert snapshot(drive) == before  # the user's files are never modified


def test_restore_a_backup_copy_by_name_and_continue_an_interrupted_one(tmp_path):
    drive = _drive(tmp_path)
    backup = drive / "checkpoint_backup_20250301_120000"
    (backup / "notes.safetensors").write_bytes(b"")  # not a training checkpoint: left out with a note
    save_file({"w": torch.ones(1)}, backup / "weights.safetensors")
    args = ["restore", "--from-drive", "--drive", str(drive), "--run", backup.name, "--to", "runs", "--as", "arc2"]
    first = invoke(*args)
    assert first.exit_code == 0, first.stderr
    assert "weights.safetensors not restored" in first.stderr
    run = tmp_path / "runs" / "arc2"
    assert sorted(read_index(run).by_id()) == [0, 1] and not (run / "best_model.pt").exists()
    (run / "checkpoints" / "checkpoint_00001.pt").unlink()  # cut short: run it again
    again = _json(*args)
    assert again["copied"] == ["checkpoints/checkpoint_00001.pt"] and again["already_present"] == ["checkpoints/checkpoint_00000.pt"]
    assert sorted(read_index(run).by_id()) == [0, 1]


def test_restore_gives_loose_files_without_an_id_the_next_ids_in_training_order(tmp_path):
    folder = tmp_path / "drive" / "by_hand"
    folder.mkdir(parents=True)
    g = GuideModels()
    for name, (epoch, batch) in (("late.pt", (1, 10)), ("checkpoint_3.pt", (0, 50)), ("early.pth", (0, 90))):
        torch.save(g.payload(epoch, batch, {"loss": 1.0}, "2025-03-01T12:00:00"), folder / name)
    assert invoke("restore", "--from-drive", "--drive", str(tmp_path / "drive"), "--to", "runs").exit_code == 0
    index = read_index(tmp_path / "runs" / "by_hand")
    assert [(e.id, e.epoch, e.batch) for e in index.checkpoints] == [(3, 0, 50), (4, 0, 90), (5, 1, 10)]


def test_restore_refuses_other_tools_checkpoints_and_asks_which_of_several_loose_folders(tmp_path):
    write_hf_output(tmp_path / "drive" / "out")
    refused = invoke("restore", "--from-drive", "--drive", str(tmp_path / "drive"), "--to", "runs")
    assert refused.exit_code == 1 and "read-only" in refused.stderr
    named = invoke("restore", "--from-drive", "--drive", str(tmp_path / "drive"), "--run", "out", "--to", "runs")
    assert named.exit_code == 1 and "hf-trainer" in named.stderr
    _drive(tmp_path)
    several = invoke("restore", "--from-drive", "--drive", str(tmp_path / "drive" / "ARC-EFE-Backups"), "--to", "runs")
    assert several.exit_code == 2 and "name one with --run" in several.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------- the record reader runs no code


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_record",))


def test_the_record_reader_resolves_no_code_and_decodes_scalars(tmp_path):
    import numpy as np

    from ckptctl.storage.torchfile import Opaque, read_record, scalar_value

    path = tmp_path / "x.pt"
    torch.save({"epoch": 3, "boom": _Boom(), "np": np.float64(2.5), "t": torch.tensor(0.25), "bf": torch.tensor([1.5], dtype=torch.bfloat16),
                "big": torch.ones(3)}, path)
    record = read_record(path)
    assert not (tmp_path / "pwned_by_record").exists()
    assert isinstance(record.obj["boom"], Opaque) and record.obj["boom"].global_name in ("posix.system", "os.system")
    values = {k: scalar_value(record, record.obj[k]) for k in ("epoch", "np", "t", "bf", "big")}
    assert values == {"epoch": 3, "np": 2.5, "t": 0.25, "bf": 1.5, "big": None}
    with pytest.raises(pickle.UnpicklingError):  # the control: a plain unpickler would run it
        torch.load(path, weights_only=True)


def test_trainloop_resumes_exactly_from_exported_checkpoints_restored_into_a_new_run(tmp_path):
    """A trainloop's checkpoints exported (``ckptctl export``: standalone full payloads) to a backup folder; the machine is gone; restore, then --resume."""
    import shutil
    import signal

    from tests.trainloop_helpers import FAST_FLAGS, Trainer, assert_same_final_state, replace_flags, trainloop_cmd, wait_until

    flags = replace_flags(FAST_FLAGS, {"--epochs": "1"})
    out = tmp_path / "runs"
    straight = Trainer(trainloop_cmd(out, "straight", flags=flags), tmp_path)  # the uninterrupted reference, meanwhile
    killed = Trainer(trainloop_cmd(out, "killed", flags=flags), tmp_path)
    assert killed.wait_batches(5), killed.output
    assert wait_until(lambda: len(list((out / "killed" / "checkpoints").glob("checkpoint_*.pt"))) >= 2)
    killed.kill(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    backup = tmp_path / "drive" / "checkpoint_backup_20250301_120000"
    backup.mkdir(parents=True)
    for path in (out / "killed" / "checkpoints").glob("checkpoint_*.pt"):
        exported = invoke("export", str(path), str(backup / path.name))
        assert exported.exit_code == 0, exported.stderr
    shutil.rmtree(out / "killed")  # the machine is gone
    newest = max(int(p.stem.split("_")[1]) for p in backup.glob("checkpoint_*.pt"))
    restored = invoke("restore", "--from-drive", "--drive", str(tmp_path / "drive"), "--run", backup.name, "--to", str(out), "--as", "arc1")
    assert restored.exit_code == 0, restored.stderr
    resumed = Trainer(trainloop_cmd(out, "arc1", "--resume", flags=flags), tmp_path)
    assert resumed.finish() == 0, resumed.output
    assert f"Resumed from checkpoint {newest} " in resumed.output
    assert straight.finish() == 0, straight.output
    assert_same_final_state(out / "straight", out / "arc1")


def test_checkpoint_files_copied_without_their_runs_objects_are_named_not_restored(tmp_path, make_run):
    """``cp -r checkpoints/`` of a run whose tensors live in objects/ (format 2): the copies alone hold no tensors."""
    import shutil

    run = make_run("run_a", n=2)
    backup = tmp_path / "drive" / "checkpoint_backup_20250301_120000"
    shutil.copytree(run / "checkpoints", backup)
    listing = _runs(backup)["checkpoint_backup_20250301_120000"]
    assert [c["epoch"] for c in listing["checkpoints"]] == [0, 0]
    assert len(listing["problems"]) == 2 and "objects/ folder" in listing["problems"][0]
    statuses = {r["status"] for r in _json("verify", str(backup))["results"]}
    assert statuses <= {"missing", "corrupt"} and statuses
    result = invoke("restore", "--from-drive", "--drive", str(tmp_path / "drive"), "--to", "runs", "--as", "back")
    assert result.exit_code == 2 and "copy or restore the whole run folder" in result.stderr
    assert not (tmp_path / "runs" / "back").exists()


def test_verify_labels_only_best_model_pt_as_the_best_model(tmp_path):
    folder = tmp_path / "by_hand"
    folder.mkdir()
    g = GuideModels()
    torch.save(g.payload(0, 9, {"loss": 1.0}, "2025-03-01T12:00:00"), folder / "model.pt")  # no id in its name
    result = invoke("verify", str(folder))
    assert result.exit_code == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if "model.pt" in line]
    assert "best" not in row.split()[:4] and " - " in row
    torch.save(g.payload(0, 9, {"loss": 1.0}, "2025-03-01T12:00:00"), folder / "best_model.pt")
    rows = [line for line in invoke("verify", str(folder)).stdout.splitlines() if "best_model.pt" in line]
    assert rows and "best" in rows[0].split()
