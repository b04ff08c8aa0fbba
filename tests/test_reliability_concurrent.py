"""Concurrent tools: verify, prune, promote and backup in a loop against a run that is training.

The trainer must never crash, the index must always parse, every checkpoint verify
reports must be ok (a checkpoint retention removes mid-check is not a problem), and the
mutating commands must refuse cleanly (exit 1, one line) while the trainer holds the lock.
"""

from __future__ import annotations

import json
import signal

from typer.testing import CliRunner

from ckptctl.cli import app
from ckptctl.storage.scan import read_index

from .trainloop_helpers import FAST_FLAGS, Trainer, replace_flags, trainloop_cmd, wait_until

runner = CliRunner()


def test_tools_in_a_loop_against_a_training_run(tmp_path):
    out, drive = tmp_path / "runs", tmp_path / "drive"
    drive.mkdir()
    flags = replace_flags(FAST_FLAGS, {"--epochs": "5", "--save-every": "1", "--max-checkpoints": "2"})
    trainer = Trainer(trainloop_cmd(out, "live", flags=flags), tmp_path)
    run = out / "live"
    assert trainer.wait_batches(2), trainer.output
    # Saves are written in the background: until the first is committed there is nothing to verify.
    assert wait_until(lambda: (run / "checkpoint_metadata.json").exists()), trainer.output
    rounds = {"verify": 0, "refused": 0, "index_reads": 0}
    try:
        while trainer.proc.poll() is None:
            read_index(run)  # always parses: it is only ever replaced atomically
            rounds["index_reads"] += 1
            result = runner.invoke(app, ["verify", str(run), "--json"])
            assert result.exit_code == 0 and result.stdout, (result.exit_code, result.stderr, repr(result.exception))
            doc = json.loads(result.stdout)
            assert [r for r in doc["results"] if r["status"] != "ok"] == [], [(r["id"], r["status"], r["detail"]) for r in doc["results"]]
            rounds["verify"] += 1
            for args in (["prune", str(run), "--keep", "1", "--yes"], ["promote", str(run), "0"], ["backup", str(run), "--drive", str(drive)]):
                result = runner.invoke(app, args)
                if result.exit_code == 0:  # only once training is over and the lock released
                    assert json.loads((run / "training_state.json").read_text())["status"] == "completed", result.output
                    break
                assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: "), result.stderr
                if args[0] == "promote" and result.exit_code == 2:
                    assert "no checkpoint 0" in result.stderr  # retention removed it before the lock check
                    continue
                assert result.exit_code == 1 and "locked" in result.stderr, (args, result.output)
                rounds["refused"] += 1
    finally:
        trainer.kill(signal.SIGKILL)
    assert trainer.finish() == 0, trainer.output[-3000:]
    assert rounds["verify"] >= 3 and rounds["refused"] >= 3, rounds
    result = runner.invoke(app, ["verify", str(run)])
    assert result.exit_code == 0, result.output
