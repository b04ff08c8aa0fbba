"""Unlucky inputs from the training loop and hand-edited metadata never make a run unopenable.

Issue "Hostile and unlucky inputs", item 2: a NaN, a tensor or a NumPy scalar in ``extra``
used to be written into the checkpoint file, then fail the index write, leaving a file that
every later open adopted and failed on the same way.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ckptctl import ModelPersistence
from ckptctl.cli import app
from ckptctl.core.format import INDEX_FILE
from ckptctl.storage.scan import read_index

from .test_persistence import Rig


@pytest.mark.parametrize(
    "extra, named",
    [
        ({"val_loss": float("nan")}, "extra['val_loss'] is nan"),
        ({"stats": {"best": float("inf")}}, "extra['stats']['best'] is inf"),
        ({"t": torch.tensor(1.0)}, "extra['t'] is a torch.Tensor"),
        ({"n": np.float64(0.5)}, "extra['n'] is a numpy.float64"),
        ({"xs": [1, np.int64(2)]}, "extra['xs'][1] is a numpy.int64"),
        ({3: "x"}, "keys must be strings"),
    ],
)
def test_bad_extra_is_refused_before_anything_is_written_and_the_run_still_opens(tmp_path, extra, named):
    run = tmp_path / "r"
    rig = Rig()
    with ModelPersistence(run, save_every_n_batches=2) as p:
        with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
            p.save_checkpoint(0, 0, {"loss": 1.0}, extra=extra, **rig.components())
        with pytest.raises(ValueError, match="extra"):
            p.maybe_save(0, 0, {"loss": 1.0}, extra=extra, **rig.components())  # not due yet: refused all the same
        assert p.global_step == 0  # the refused call did not count a batch
        assert not list((run / "checkpoints").iterdir()) and not (run / INDEX_FILE).exists()
        assert p.save_checkpoint(0, 0, {"loss": 1.0}, extra={"ok": [1, 2.5, None, "x"]}, **rig.components()) == 0
    with ModelPersistence(run) as p:
        assert p.checkpoints[0]["extra"] == {"ok": [1, 2.5, None, "x"]}
        assert p.resume(**Rig().components())["checkpoint_id"] == 0


def test_a_metric_that_is_not_a_number_is_named(tmp_path):
    with ModelPersistence(tmp_path / "r") as p:
        with pytest.raises(ValueError, match=r"metrics\['acc'\] is not a number"):
            p.save_checkpoint(0, 0, {"acc": "high"}, **Rig().components())


def test_a_file_written_before_extra_was_checked_is_adopted_with_its_bad_values_as_null(tmp_path, caplog):
    run = tmp_path / "r"
    rig = Rig()
    with ModelPersistence(run) as p:
        p.save_checkpoint(0, 0, {"loss": 1.0}, extra={"step": 1}, **rig.components())
    # What an older ckptctl left behind: the file committed, the index write failed on NaN.
    path = run / "checkpoints" / "checkpoint_00000.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["extra"] = {"step": 1, "val_loss": float("nan")}
    torch.save(payload, path)
    (run / INDEX_FILE).unlink()
    with ModelPersistence(run) as p:  # before: every open failed ("Out of range float values ...")
        assert p.checkpoints[0]["extra"] == {"step": 1, "val_loss": None}
        assert p.resume(**Rig().components())["checkpoint_id"] == 0
    assert any("val_loss" in r.getMessage() and "null" in r.getMessage() for r in caplog.records)
    assert CliRunner().invoke(app, ["verify", str(run)]).exit_code == 0


def test_nan_in_a_hand_edited_index_never_stops_open_or_prune(tmp_path):
    run = tmp_path / "r"
    rig = Rig()
    with ModelPersistence(run, save_every_n_batches=1) as p:
        for batch in range(3):
            rig.step()
            p.maybe_save(0, batch, {"loss": 1.0}, **rig.components())
    text = (run / INDEX_FILE).read_text()
    index = json.loads(text)
    index["checkpoints"].append({"id": "seven", "path": "checkpoints/x.pt", "score": 1.5})  # skipped, kept as it is
    raw = json.dumps(index, indent=2).replace('"score": 1.5', '"score": NaN')
    (run / INDEX_FILE).write_text(raw)
    result = CliRunner().invoke(app, ["prune", str(run), "--keep", "1", "--yes"])
    assert result.exit_code == 0, result.output
    with ModelPersistence(run) as p:
        assert sorted(p.checkpoints) == [2]
        p.save_checkpoint(0, 3, {"loss": 0.5}, **rig.components())
    kept = json.loads((run / INDEX_FILE).read_text())  # valid JSON: no NaN written back
    assert any(isinstance(c, dict) and c.get("id") == "seven" for c in kept["checkpoints"])
    assert [c.id for c in read_index(run).checkpoints] == [2, 3]
    assert not any(isinstance(v, float) and math.isnan(v) for c in kept["checkpoints"] for v in c.values() if isinstance(c, dict))
