"""``ckptctl verify``: every status (ok, corrupt, missing, unsafe, nonfinite), --json, exit codes."""

from __future__ import annotations

import json
import math

from tests.cli_helpers import invoke
from tests.damage import malicious_bytes, replace_indexed_file
from tests.runs import ckpt, index_of, write_index, write_run


def _by_id(doc):
    return {(r["run"], r["id"], r["path"].rsplit("/", 1)[-1]): r for r in doc["results"]}


def test_verify_healthy_run_json(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=3)
    result = invoke("verify", "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    assert [(r["id"], r["status"]) for r in doc["results"]] == [(0, "ok"), (1, "ok"), (2, "ok"), (None, "ok")]
    assert doc["results"][-1]["path"].endswith("best_model.pt")
    assert all(set(r) == {"run", "id", "path", "status", "detail"} for r in doc["results"])


def test_verify_table_and_exit_zero(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=2)
    result = invoke("verify", "runs/run_a")
    assert result.exit_code == 0
    assert "All good: 3 ok" in result.stdout


def test_verify_truncated_bitflipped_and_missing(make_run):
    make_run(n=4, truncate=[0], corrupt=[1], drop=[2])
    result = invoke("verify", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    status = {r["id"]: r["status"] for r in doc["results"]}
    assert status == {0: "corrupt", 1: "corrupt", 2: "missing", 3: "ok", None: "ok"}
    details = {r["id"]: r["detail"] for r in doc["results"]}
    assert "checksum mismatch" in details[1]
    table = invoke("verify")
    assert table.exit_code == 1 and "Problems found" in table.stdout and "corrupt" in table.stdout


def test_verify_malicious_pickle_is_unsafe_and_never_runs(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=2)
    marker = tmp_path / "pwned"
    replace_indexed_file(run, 0, malicious_bytes(marker))
    result = invoke("verify", "--json")
    assert result.exit_code == 1
    status = {r["id"]: r["status"] for r in json.loads(result.stdout)["results"]}
    assert status[0] == "unsafe" and status[1] == "ok"
    assert not marker.exists()


def test_verify_garbage_index_reports_and_still_checks_files(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=2)
    (run / "checkpoint_metadata.json").write_text("[1, 2")
    result = invoke("verify", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    first = doc["results"][0]
    assert first["status"] == "corrupt" and first["path"].endswith("checkpoint_metadata.json")
    loaded = [r for r in doc["results"] if r["id"] in (0, 1)]
    assert [r["status"] for r in loaded] == ["ok", "ok"]
    assert "not in the index" in loaded[0]["detail"]


def test_verify_hostile_paths_are_corrupt_and_not_read(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=2)
    outside = tmp_path / "outside.pt"
    outside.write_bytes(ckpt(run, 0).read_bytes())
    index = index_of(run)
    index["checkpoints"].append(dict(index["checkpoints"][0], id=5, path="../../outside.pt"))
    write_index(run, index)
    (run / "checkpoints" / "checkpoint_00009.pt").symlink_to(outside)
    index["checkpoints"].append(dict(index["checkpoints"][0], id=9, path="checkpoints/checkpoint_00009.pt"))
    write_index(run, index)
    result = invoke("verify", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    bad = {r["id"]: r for r in doc["results"] if r["status"] != "ok"}
    assert set(bad) == {5, 9}
    assert all(r["status"] == "corrupt" for r in bad.values())
    assert "outside the run" in bad[9]["detail"]


def test_verify_deep_finds_nonfinite(tmp_path):
    import torch

    from ckptctl import ModelPersistence

    run_dir = tmp_path / "runs" / "nan_run"
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    p = ModelPersistence(run_dir, save_every_n_batches=1, background=False)
    p.maybe_save(0, 0, {"loss": 1.0}, agent=model)
    p.close()
    shallow = invoke("verify", "--json")
    assert shallow.exit_code == 0
    deep = invoke("verify", "--deep", "--json")
    assert deep.exit_code == 1
    (r,) = json.loads(deep.stdout)["results"]
    assert r["status"] == "nonfinite" and "agent.weight" in r["detail"]


def test_verify_corrupt_best_model_has_null_id(make_run):
    make_run(n=2, corrupt=["best_model.pt"])
    doc = json.loads(invoke("verify", "--json").stdout)
    best = [r for r in doc["results"] if r["id"] is None]
    assert len(best) == 1 and best[0]["status"] == "corrupt" and best[0]["path"].endswith("best_model.pt")


def test_verify_nothing_to_verify_exits_1(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("verify", "empty")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "nothing to verify" in result.stderr


def test_verify_missing_path_exits_2(tmp_path):
    result = invoke("verify", "nope")
    assert result.exit_code == 2 and result.stderr.startswith("Error: ")


def test_verify_best_model_symlink_outside_is_not_read(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=1)
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes((run / "best_model.pt").read_bytes())
    (run / "best_metadata.json").unlink()
    (run / "best_model.pt").unlink()
    (run / "best_model.pt").symlink_to(outside)
    doc = json.loads(invoke("verify", "--json").stdout)
    (best,) = [r for r in doc["results"] if r["id"] is None]
    assert best["status"] == "corrupt" and "outside the run" in best["detail"]


def test_verify_ignores_a_checkpoint_a_live_trainer_pruned_meanwhile(tmp_path):
    """The race: verify read an index listing checkpoint 0, then the trainer's retention removed it."""
    from ckptctl import ModelPersistence
    from ckptctl.ops import _drop_pruned_meanwhile, verify_runs

    run = write_run(tmp_path / "runs", "run_a", n=3)
    ckpt(run, 0).unlink()  # the file is gone while the index (as verify read it) still lists it
    results = verify_runs([run])
    assert [(r.id, r.status) for r in results if r.status != "ok"] == [(0, "missing")]
    index = index_of(run)
    index["checkpoints"] = index["checkpoints"][1:]
    write_index(run, index)  # ...and the trainer has since committed an index without it
    # dropped whether or not a trainer still holds the lock: it may have closed just after pruning
    kept = _drop_pruned_meanwhile(results, [run])
    assert [r.id for r in kept] == [1, 2, None] and all(r.status == "ok" for r in kept)
    trainer = ModelPersistence(run)
    try:
        assert [r.id for r in _drop_pruned_meanwhile(results, [run])] == [1, 2, None]
    finally:
        trainer.close()
    # a file missing while the index still lists it is reported
    ckpt(run, 2).unlink()
    assert [(r.id, r.status) for r in verify_runs([run]) if r.status != "ok"] == [(2, "missing")]


def test_verify_checks_the_checkpoints_that_replaced_those_pruned_meanwhile(tmp_path):
    """A trainer saving faster than verify reads can prune every checkpoint verify listed: it checks the new ones."""
    from ckptctl.ops import verify_runs

    run = write_run(tmp_path / "runs", "run_a", n=2, keep=2)
    trained = []

    def train_two_more_batches(done, total):  # runs while verify is hashing the first checkpoint
        if not trained:
            trained.append(write_run(tmp_path / "runs", "run_a", n=2, keep=2))

    results = verify_runs([run], on_progress=train_two_more_batches)
    assert trained and sorted(index_of(run)["checkpoints"][i]["id"] for i in range(2)) == [2, 3]
    assert all(r.status == "ok" for r in results), [(r.id, r.status, r.detail) for r in results]
    assert [r.id for r in results] == [2, 3, None]
