"""Every command that names one checkpoint takes the same forms: ``PATH ID`` and ``RUN:ID`` (as ``diff`` does);
and ``diff --ignore-rng`` for runs whose RNG states differ by design."""

from __future__ import annotations

import json
import random

import pytest

from tests.cli_helpers import ckpt, invoke, write_run


def _best(run) -> dict:
    return json.loads((run / "best_metadata.json").read_text())


# ---------------------------------------------------------------------- promote and show


def test_promote_takes_run_colon_id_as_well_as_run_and_id(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=4, best_at=3)
    result = invoke("promote", "runs/run_a:1", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["best"]["source_id"] == 1
    assert _best(run)["source_id"] == 1 and (run / "best_model.pt").read_bytes() == ckpt(run, 1).read_bytes()
    assert invoke("promote", "runs/run_a", "2").exit_code == 0  # the old form still works
    assert _best(run)["source_id"] == 2
    assert invoke("promote", "runs/run_a:0", "0").exit_code == 0  # both forms, naming the same checkpoint
    assert _best(run)["source_id"] == 0


@pytest.mark.parametrize(
    "args, says",
    [
        (("runs/run_a:best",), "changes nothing"),
        (("runs/run_a:1", "2"), "names checkpoint '1' but ID says '2'"),
        (("runs/run_a",), "name the checkpoint to promote"),
        (("runs/run_a:one",), "'one' is not a checkpoint id"),
    ],
)
def test_promote_usage_errors_exit_2_and_change_nothing(tmp_path, args, says):
    run = write_run(tmp_path / "runs", "run_a", n=3)
    before = (run / "best_model.pt").read_bytes(), (run / "best_metadata.json").read_bytes()
    result = invoke("promote", *args)
    assert result.exit_code == 2, result.stdout
    assert result.stderr.startswith("Error: ") and says in result.stderr and len(result.stderr.splitlines()) == 1
    assert ((run / "best_model.pt").read_bytes(), (run / "best_metadata.json").read_bytes()) == before


def test_show_takes_run_colon_id_and_run_colon_best(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=3, best_at=1)
    by_colon = json.loads(invoke("show", "runs/run_a:0", "--json").stdout)
    by_arg = json.loads(invoke("show", "runs/run_a", "0", "--json").stdout)
    assert by_colon == by_arg and by_colon["id"] == 0
    best = invoke("show", "runs/run_a:best", "--json")
    assert best.exit_code == 0 and json.loads(best.stdout)["label"] == "run_a best"
    conflict = invoke("show", "runs/run_a:0", "1")
    assert conflict.exit_code == 2 and "names checkpoint '0' but ID says '1'" in conflict.stderr
    assert invoke("show", "runs/run_a:7").exit_code == 2  # an unknown id, as with PATH ID


# ---------------------------------------------------------------------- diff --ignore-rng


def test_diff_ignore_rng_leaves_out_rng_states_that_differ_between_unseeded_runs(tmp_path):
    """Same torch seed, same training: only the (unseeded) Python and NumPy RNG states differ."""
    write_run(tmp_path / "runs", "a", n=2, seed=3)
    random.random()  # the Python RNG, never seeded by the run, has moved on
    write_run(tmp_path / "runs", "b", n=2, seed=3)
    plain = invoke("diff", "runs/a:1", "runs/b:1", "--json")
    assert plain.exit_code == 1
    differing = [t["name"] for t in json.loads(plain.stdout)["tensors"] if t["status"] != "same"]
    assert differing and all(name.startswith("rng.") for name in differing)
    assert json.loads(plain.stdout)["rng_ignored"] is False

    ignored = invoke("diff", "runs/a:1", "runs/b:1", "--ignore-rng", "--json")
    assert ignored.exit_code == 0, ignored.stdout
    doc = json.loads(ignored.stdout)
    assert doc["rng_ignored"] is True and doc["identical"] is True
    assert doc["compared"] > 0 and not [t for t in doc["tensors"] if t["name"].startswith("rng.")]
    text = invoke("diff", "runs/a:1", "runs/b:1", "--ignore-rng")
    assert text.exit_code == 0 and "RNG states were ignored (--ignore-rng)" in text.stdout and "Identical" in text.stdout
    assert invoke("diff", "runs/a:0", "runs/b:1", "--ignore-rng").exit_code == 1  # the weights are still compared
