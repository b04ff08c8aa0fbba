"""The CLI over format-2 runs (tensors shared in packs under ``objects/``), and format-1 runs beside them.

verify checks each shared pack once per run and reports a bad one against every checkpoint
and best model that uses it; ls counts each checkpoint's full state, what it added, and the
run's unique bytes; prune and promote delete the packs nothing references any more, only
after the metadata is durable (a SIGKILL at any point never deletes a referenced pack, and
what it leaves is collected later); export writes one standalone file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal

import pytest
import torch

from ckptctl import ModelPersistence
from ckptctl.ops import verify_runs
from ckptctl.tensors import compare_states
from ckptctl.torch_io import safe_load

from . import crash_child
from .cli_helpers import invoke
from .damage import flip_byte
from .format_helpers import disk_bytes, packs_of, stored_packs, to_format1
from .runs import ckpt, index_of, write_index, write_run

KILL_TARGETS = ("os.replace", "os.fsync", "os.unlink")


def _ids(run):
    return [e["id"] for e in index_of(run)["checkpoints"]]


def _pack(run, name):
    return run / "objects" / f"{name}.safetensors"


def _shared_pack(run):
    """The pack every checkpoint and the best model of the base run list (the first save's frozen ``encoder``)."""
    (name,) = set.intersection(*(packs_of(run, [i]) for i in _ids(run))) & packs_of(run, [], best=True)
    return name


def _referenced(run):
    return packs_of(run, _ids(run), best=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A format-2 run of 4 checkpoints (keep 10) with a frozen component, whose best model is checkpoint 3, and a copy in format 1."""
    parent = tmp_path_factory.mktemp("base")
    run = write_run(parent, "run2", n=4, frozen=64)
    shutil.copytree(run, parent / "run1")
    return run, to_format1(parent / "run1")


@pytest.fixture
def run2(base, tmp_path):
    shutil.copytree(base[0], tmp_path / "runs" / "run_a")
    return tmp_path / "runs" / "run_a"


@pytest.fixture
def run1(base, tmp_path):
    shutil.copytree(base[1], tmp_path / "v1" / "run_a")
    return tmp_path / "v1" / "run_a"


# --------------------------------------------------------------------------- verify, show, diff, resume-info


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_verify_reports_a_bad_shared_pack_against_every_user_once_hashed(run2, damage):
    shared = _shared_pack(run2)
    assert len(stored_packs(run2)) > 1
    (flip_byte if damage == "corrupt" else os.unlink)(_pack(run2, shared))
    seen = []
    results = verify_runs([run2], on_progress=lambda done, total: seen.append((done, total)))
    assert [(r.id, r.status) for r in results] == [(0, damage), (1, damage), (2, damage), (3, damage), (None, damage)]
    assert all(f"shared object objects/{shared}.safetensors" in r.detail for r in results), [r.detail for r in results]
    # progress counts each file and each pack once (the shared pack is hashed once, not five times)
    skeletons = sum(ckpt(run2, i).stat().st_size for i in range(4)) + (run2 / "best_model.pt").stat().st_size
    packs = {n: s for e in index_of(run2)["checkpoints"] for n, s in e["objects"].items()}
    assert seen[-1] == (skeletons + sum(packs.values()), skeletons + sum(packs.values()))
    cli = invoke("verify", str(run2), "--json")
    assert cli.exit_code == 1 and [r["status"] for r in json.loads(cli.stdout)["results"]] == [damage] * 5
    info = json.loads(invoke("resume-info", str(run2), "--json").stdout)["runs"][0]
    assert info["checkpoint"] is None and [s["id"] for s in info["skipped"]] == [3, 2, 1, 0]
    assert all(shared in s["detail"] for s in info["skipped"])


def test_verify_checks_every_pack_the_index_lists_and_notes_unreferenced_ones(run2):
    index = index_of(run2)
    ghost = "f" * 32  # listed by checkpoint 1's entry, not on disk: a copy of this run would lack it
    index["checkpoints"][1]["objects"][ghost] = 10
    write_index(run2, index)
    leftover = _pack(run2, "e" * 32)
    shutil.copyfile(_pack(run2, _shared_pack(run2)), leftover)  # a pack nothing references (a kill's leftover)
    result = invoke("verify", str(run2), "--json")
    assert result.exit_code == 1
    bad = [r for r in json.loads(result.stdout)["results"] if r["status"] != "ok"]
    assert [(r["id"], r["status"]) for r in bad] == [(1, "missing")] and ghost in bad[0]["detail"]
    assert "1 tensor object(s)" in result.stderr and "nothing references" in result.stderr
    assert leftover.exists()  # verify changes nothing


def test_show_diff_and_resume_info_read_both_formats_alike(run2):
    other = run2.parent / "run_b"
    shutil.copytree(run2, other)
    to_format1(other)
    diff = invoke("diff", f"{run2}:2", f"{other}:2", "--json")
    assert diff.exit_code == 0, diff.stdout + diff.stderr
    assert json.loads(diff.stdout)["bit_identical"] and json.loads(diff.stdout)["compared"] > 4
    assert invoke("diff", f"{run2}:best", str(run2)).exit_code == 0  # the best model is checkpoint 3
    for run in (run2, other):
        shown = json.loads(invoke("show", str(run), "1", "--json").stdout)
        assert shown["components"]["agent"]["tensors"] == 2 and shown["checksum_verified"]
        entry = index_of(run)["checkpoints"][1]  # the size of the state it restores, as ls says
        assert (shown["size_bytes"], shown["file_bytes"]) == (entry.get("state_bytes", entry["size_bytes"]), ckpt(run, 1).stat().st_size)
        assert json.loads(invoke("resume-info", str(run), "--json").stdout)["runs"][0]["checkpoint"]["id"] == 3
    assert not (other / "objects").exists() and index_of(other)["format_version"] == 1


# --------------------------------------------------------------------------- ls


def _new_bytes(run):
    """Each checkpoint's own file plus the packs no lower id lists (sizes from the disk)."""
    stored, seen, out = stored_packs(run), set(), {}
    for e in index_of(run)["checkpoints"]:
        out[e["id"]] = os.path.getsize(ckpt(run, e["id"])) + sum(stored[n] for n in e.get("objects", {}) if n not in seen)
        seen |= set(e.get("objects", {}))
    return out


def test_ls_counts_full_state_new_bytes_and_unique_total(run2, run1):
    for run in (run2, run1):
        result = invoke("ls", str(run), "--json")
        assert result.exit_code == 0 and result.stderr == ""
        (r,) = json.loads(result.stdout)["runs"]
        full = {e["id"]: e.get("state_bytes", e["size_bytes"]) for e in index_of(run)["checkpoints"]}
        assert {c["id"]: c["size_bytes"] for c in r["checkpoints"]} == full
        assert {c["id"]: c["new_bytes"] for c in r["checkpoints"]} == _new_bytes(run)
        assert r["total_bytes"] == disk_bytes(run)
        best = json.loads((run / "best_metadata.json").read_text())
        assert r["best"]["size_bytes"] == best.get("state_bytes", best["size_bytes"])
        assert r["best"]["new_bytes"] == os.path.getsize(run / "best_model.pt")  # it shares every pack with checkpoint 3
    (r2,) = json.loads(invoke("ls", str(run2), "--json").stdout)["runs"]
    (r1,) = json.loads(invoke("ls", str(run1), "--json").stdout)["runs"]
    assert [c["size_bytes"] for c in r1["checkpoints"]] == [os.path.getsize(ckpt(run1, i)) for i in range(4)]
    assert sum(c["new_bytes"] for c in r2["checkpoints"][1:]) < sum(c["size_bytes"] for c in r2["checkpoints"][1:])
    assert r2["total_bytes"] < r1["total_bytes"]  # the frozen-from-the-start tensors (RNG state...) are stored once
    table = invoke("ls", str(run2)).stdout
    assert "New" in table and "adds" in table  # the best model adds its small file only


def test_ls_marks_a_checkpoint_whose_pack_is_missing(run2):
    (name,) = packs_of(run2, [1]) - packs_of(run2, [0, 2, 3], best=True)  # the pack checkpoint 1 wrote
    _pack(run2, name).unlink()
    result = invoke("ls", str(run2), "--json")
    (r,) = json.loads(result.stdout)["runs"]
    assert [c["present"] for c in r["checkpoints"]] == [True, False, True, True]
    assert f"checkpoint 1: shared object objects/{name}.safetensors is missing" in result.stderr
    assert "MISSING" in invoke("ls", str(run2)).stdout


def test_a_format1_run_with_format2_saves_after_it(run1):
    write_run(run1.parent, run1.name, n=2)  # resumes the format-1 run; the new saves share packs
    assert _ids(run1) == [0, 1, 2, 3, 4, 5] and stored_packs(run1)
    (r,) = json.loads(invoke("ls", str(run1), "--json").stdout)["runs"]
    assert r["total_bytes"] == disk_bytes(run1)
    assert {c["id"]: c["new_bytes"] for c in r["checkpoints"]} == _new_bytes(run1)
    assert invoke("verify", str(run1)).exit_code == 0
    assert invoke("prune", str(run1), "--keep", "1", "--yes").exit_code == 0
    assert _ids(run1) == [5] and set(stored_packs(run1)) == _referenced(run1)
    assert invoke("verify", str(run1)).exit_code == 0
    out = run1.parent / "five.pt"
    assert invoke("export", f"{run1}:5", str(out)).exit_code == 0
    rows = compare_states(safe_load(ckpt(run1, 5)), torch.load(out, map_location="cpu", weights_only=True))
    assert rows and all(r.status == "same" for r in rows)


# --------------------------------------------------------------------------- prune and promote


def test_prune_frees_the_packs_only_deleted_checkpoints_used(run2):
    doomed = packs_of(run2, [0, 1]) - packs_of(run2, [2, 3], best=True)
    stored = stored_packs(run2)
    assert doomed
    plan = json.loads(invoke("prune", str(run2), "--keep", "2", "--dry-run", "--json").stdout)["runs"][0]
    files = sum(os.path.getsize(ckpt(run2, i)) for i in (0, 1))
    assert plan["objects_bytes_freed"] == sum(stored[n] for n in doomed)
    assert plan["bytes_freed"] == files + sum(stored[n] for n in doomed)
    assert set(stored_packs(run2)) == set(stored)  # a dry run deletes nothing
    result = invoke("prune", str(run2), "--keep", "2", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    deleted = json.loads(result.stdout)["runs"][0]["deleted"]
    assert sorted(p for p in deleted if p.startswith("objects/")) == sorted(f"objects/{n}.safetensors" for n in doomed)
    assert set(stored_packs(run2)) == set(stored) - doomed == _referenced(run2)
    assert "shared tensor object(s)" in invoke("prune", str(run2), "--keep", "1", "--yes").stderr
    assert invoke("verify", str(run2)).exit_code == 0


def test_prune_keeps_packs_a_checkpoint_file_outside_the_index_may_use(run2):
    """A file the index does not list (a save killed before its index commit): resume adopts it, so its packs stay."""
    index = index_of(run2)
    index["checkpoints"] = [e for e in index["checkpoints"] if e["id"] != 3]
    write_index(run2, index)
    before = set(stored_packs(run2))
    result = invoke("prune", str(run2), "--keep", "1", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    (r,) = json.loads(result.stdout)["runs"]
    assert any("not in the index" in s for s in r["skipped"]) and r["objects_bytes_freed"] == 0
    assert set(stored_packs(run2)) == before
    with ModelPersistence(run2) as p:  # the library adopts checkpoint 3 first, then collects
        assert sorted(p.checkpoints) == [2, 3]
    assert set(stored_packs(run2)) == _referenced(run2) and invoke("verify", str(run2)).exit_code == 0


def test_promote_deletes_the_packs_only_the_old_best_used(run2):
    with ModelPersistence(run2, best_metric="accuracy_delta") as p:  # a best model of its own tensors
        assert p.update_best(0, 99, {"accuracy_delta": 100.0}, agent=torch.nn.Linear(4, 2))
    own = packs_of(run2, [], best=True) - packs_of(run2, _ids(run2))
    assert own and own <= set(stored_packs(run2))
    result = invoke("promote", str(run2), "1")
    assert result.exit_code == 0, result.stderr
    assert not own & set(stored_packs(run2)) and set(stored_packs(run2)) == _referenced(run2)
    best = json.loads((run2 / "best_metadata.json").read_text())
    assert best["source_id"] == 1 and best["objects"] == index_of(run2)["checkpoints"][1]["objects"]
    assert invoke("verify", str(run2)).exit_code == 0


def test_prune_and_promote_work_on_format1_runs(run1):
    assert invoke("promote", str(run1), "1").exit_code == 0
    result = invoke("prune", str(run1), "--keep", "1", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    (r,) = json.loads(result.stdout)["runs"]
    assert r["bytes_freed"] == sum(d["size_bytes"] for d in r["delete"]) > 0 and r["objects_bytes_freed"] == 0
    assert _ids(run1) == [1, 3] and not (run1 / "objects").exists()
    assert invoke("verify", str(run1)).exit_code == 0


def _kill_sweep(fork_context, tmp_path, base_run, args, check):
    """Run ``ckptctl ARGS`` on a copy of ``base_run``, SIGKILLed before its k-th call of each target, for every k."""
    kills = 0
    for target in KILL_TARGETS:
        for kill_at in range(1, 100):
            run = tmp_path / f"{target}-{kill_at}" / base_run.name
            shutil.copytree(base_run, run)
            child = fork_context.Process(target=crash_child.cli, args=([args[0], str(run), *args[1:]], target, kill_at))
            child.start()
            child.join(timeout=120)
            assert child.exitcode in (0, -signal.SIGKILL), (target, kill_at, child.exitcode)
            check(run, kills)
            if child.exitcode == 0:
                break  # k passed the number of such calls: every boundary was covered
            kills += 1
    return kills


def _assert_intact(run):
    """Every checkpoint and the best model verify: no pack they reference was deleted."""
    bad = [(r.id, r.status, r.detail) for r in verify_runs([run]) if r.status != "ok"]
    assert bad == []
    assert _referenced(run) <= set(stored_packs(run))


def test_prune_killed_anywhere_never_deletes_a_referenced_pack(base, tmp_path, fork_context):
    run2 = base[0]

    def check(run, kills):
        _assert_intact(run)
        if kills % 2:  # the leftovers go with the next prune ...
            assert invoke("prune", str(run), "--keep", "1", "--yes").exit_code == 0
            assert _ids(run) == [3]
        else:  # ... or the library's next open
            with ModelPersistence(run):
                pass
        assert set(stored_packs(run)) == _referenced(run)
        _assert_intact(run)

    kills = _kill_sweep(fork_context, tmp_path, run2, ["prune", "--keep", "1", "--yes"], check)
    assert kills >= 8


def test_promote_killed_anywhere_never_deletes_a_referenced_pack(base, tmp_path, fork_context):
    source = tmp_path / "source" / "run_a"
    shutil.copytree(base[0], source)
    with ModelPersistence(source, best_metric="accuracy_delta") as p:
        assert p.update_best(0, 99, {"accuracy_delta": 100.0}, agent=torch.nn.Linear(4, 2))

    def check(run, kills):
        _assert_intact(run)
        assert invoke("prune", str(run), "--keep", "10", "--yes").exit_code == 0  # collects what the kill left
        assert set(stored_packs(run)) == _referenced(run)
        _assert_intact(run)

    assert _kill_sweep(fork_context, tmp_path, source, ["promote", "1"], check) >= 4


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", [2, 1])
@pytest.mark.parametrize("which", ["", ":1", ":best", "file"])
def test_export_writes_a_standalone_full_payload(base, tmp_path, fmt, which):
    run = tmp_path / "runs" / "run_a"
    shutil.copytree(base[0] if fmt == 2 else base[1], run)
    source = {"": ckpt(run, 3), ":1": ckpt(run, 1), ":best": run / "best_model.pt", "file": ckpt(run, 2)}[which]
    expected = safe_load(source)
    out = tmp_path / "out" / "model.pt"
    out.parent.mkdir()
    spec = str(source) if which == "file" else f"{run}{which}"
    result = invoke("export", spec, str(out), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["format"] == "torch" and doc["size_bytes"] == out.stat().st_size and doc["components"] == ["agent", "encoder", "optimizer"]
    shutil.rmtree(run)  # standalone: nothing of the run is needed any more
    data = torch.load(out, map_location="cpu", weights_only=True)
    assert "objects" not in data and data["format_version"] == fmt
    for key in ("epoch", "batch", "global_step", "metrics", "rng", "agent", "encoder", "optimizer"):
        assert key in data, key
    assert (data["epoch"], data["batch"], data["global_step"]) == (expected["epoch"], expected["batch"], expected["global_step"])
    rows = compare_states(expected, data)
    assert rows and all(r.status == "same" and r.bit_identical for r in rows), [r for r in rows if r.status != "same"]
    plain = io.BytesIO()
    torch.save(data, plain)  # its tensors alone, each in storage of its own size
    assert abs(out.stat().st_size - plain.getbuffer().nbytes) < 1024  # no pack dragged along whole


def test_export_safetensors_holds_the_model_weights_only(run2, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "best.safetensors"
    result = invoke("export", f"{run2}:best", str(out), "--safetensors")
    assert result.exit_code == 0, result.stderr
    assert "left out (not model weights): optimizer" in result.stderr
    weights = load_file(out)
    agent = safe_load(run2 / "best_model.pt")["agent"]
    assert sorted(weights) == ["agent.bias", "agent.weight", "encoder.bias", "encoder.weight"]
    assert all(torch.equal(weights[f"agent.{k}"], v) for k, v in agent.items())
    assert out.stat().st_mode & 0o044  # an ordinary file, readable like torch.save's


def test_export_refusals(run2, tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"precious")
    exists = invoke("export", str(run2), str(out))
    assert exists.exit_code == 1 and "--force" in exists.stderr and out.read_bytes() == b"precious"
    assert invoke("export", f"{run2}:9", str(tmp_path / "x.pt")).exit_code == 2  # unknown id
    assert invoke("export", str(tmp_path / "nowhere"), str(tmp_path / "x.pt")).exit_code == 2  # no run
    missing_dir = invoke("export", str(run2), str(tmp_path / "no" / "x.pt"))
    assert missing_dir.exit_code == 2 and missing_dir.stderr.startswith("Error: ")
    inside = invoke("export", f"{run2}:1", str(ckpt(run2, 1)), "--force")
    assert inside.exit_code == 1 and invoke("verify", str(run2)).exit_code == 0
    flip_byte(_pack(run2, _shared_pack(run2)))
    damaged = invoke("export", f"{run2}:2", str(tmp_path / "bad.pt"))
    assert damaged.exit_code == 1 and "shared object" in damaged.stderr and not (tmp_path / "bad.pt").exists()
    assert [p.name for p in tmp_path.iterdir() if "bad.pt" in p.name] == []  # no temporary left either
    assert invoke("export", str(run2), str(out), "--force").exit_code == 1  # the newest uses the pack too: refused
    assert out.read_bytes() == b"precious"


def test_export_killed_before_its_rename_leaves_the_old_file(run2, tmp_path, fork_context):
    out = tmp_path / "model.pt"
    out.write_bytes(b"old")
    child = fork_context.Process(target=crash_child.cli, args=(["export", str(run2), str(out), "--force"], "os.replace", 1))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    assert out.read_bytes() == b"old"
    assert invoke("export", str(run2), str(out), "--force").exit_code == 0
    assert torch.load(out, weights_only=True)["checkpoint_id"] == 3
