"""Real Hugging Face Trainer and Lightning output, made by those libraries, read by ``ls``/``verify``/``show``/``diff``.

Slow (``make stress``), and it needs the optional ``interop`` extra
(``pip install -e '.[interop]'``: transformers, accelerate, lightning); without it the test
is skipped with that reason. The layouts the rest of the suite builds by hand
(tests/foreign_layouts.py) are checked here against the real thing. Nothing is downloaded:
the models are built from small configs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import invoke
from tests.foreign_layouts import snapshot

_MISSING = [m for m in ("transformers", "accelerate", "lightning") if importlib.util.find_spec(m) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_MISSING), reason=f"needs the interop extra (pip install -e '.[interop]'); missing: {', '.join(_MISSING)}"),
]


def _json(*args: str) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)


class _Pairs(torch.utils.data.Dataset):
    """Token sequences labelled by whether their first token is even: something a tiny model can learn."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 50, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(self.ids[i, 0] % 2)}


def _hf_trainer_output(out: Path) -> Path:
    """A real ``Trainer`` run: 20 steps, a checkpoint and an evaluation every 10, the best kept by eval_loss."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=20, save_steps=10, eval_strategy="steps", eval_steps=10, logging_steps=5,
        per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-3, use_cpu=True, report_to=[],
        disable_tqdm=True, load_best_model_at_end=True, metric_for_best_model="eval_loss", save_total_limit=3, seed=0,
    )
    transformers.Trainer(model=model, args=args, train_dataset=_Pairs(64, 1), eval_dataset=_Pairs(16, 2)).train()
    return out


def _lightning_output(root: Path) -> Path:
    """A real Lightning fit: 2 epochs, ``ModelCheckpoint`` on val_loss (top 2 and last), hyperparameters saved."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    class Regressor(L.LightningModule):
        def __init__(self, hidden: int = 8, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

        def _loss(self, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def training_step(self, batch, _):
            return self._loss(batch)

        def validation_step(self, batch, _):
            self.log("val_loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=CSVLogger(str(root)), enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=2, save_last=True)],
    )
    trainer.fit(Regressor(), loader, loader)
    return root / "lightning_logs" / "version_0"


def test_real_trainer_and_lightning_output_are_listed_verified_and_shown(tmp_path):
    logging.getLogger("lightning").setLevel(logging.ERROR)
    hf = _hf_trainer_output(tmp_path / "hf_out")
    version = _lightning_output(tmp_path)
    before = {p: snapshot(p) for p in (hf, version)}

    (run,) = _json("ls", str(hf))["runs"]
    assert run["kind"] == "hf-trainer"
    rows = {c["name"]: c for c in run["checkpoints"]}
    assert set(rows) == {"checkpoint-10", "checkpoint-20"}
    assert rows["checkpoint-20"]["global_step"] == 20 and rows["checkpoint-20"]["epoch"] > 0
    assert "eval_loss" in rows["checkpoint-20"]["metrics"] and "loss" in rows["checkpoint-20"]["metrics"]
    assert run["monitor"]["best_checkpoint"] in rows and [c["name"] for c in run["checkpoints"] if c["best_source"]] == [run["monitor"]["best_checkpoint"]]
    verified = _json("verify", str(hf))
    assert verified["ok"] is True, verified
    shown = _json("show", str(hf), "20")
    assert shown["global_step"] == 20 and shown["components"]["model"]["parameters"] > 1000
    assert {"optimizer", "scheduler"} <= set(shown["components"]) and "python" in shown["rng"]
    assert invoke("diff", f"{hf}:10", f"{hf}:20").exit_code == 1  # trained in between

    (run,) = _json("ls", str(version))["runs"]
    assert run["kind"] == "lightning"
    names = sorted(Path(c["name"]).name for c in run["checkpoints"])
    assert "last.ckpt" in names and len(names) == 3, names
    assert run["monitor"]["metric"] == "val_loss" and run["monitor"]["mode"] == "min" and run["monitor"]["best_score"] is not None
    assert all(c["global_step"] and c["epoch"] is not None for c in run["checkpoints"])
    verified = _json("verify", str(version))
    for result in verified["results"]:  # ok, or unsafe with the reason: what the file needs is never run
        assert result["status"] in ("ok", "unsafe"), result
        assert result["status"] == "ok" or "pickled code" in result["detail"], result
    safe = [r["path"] for r in verified["results"] if r["status"] == "ok"]
    if safe:
        shown = _json("show", safe[0])
        assert shown["components"]["state_dict"]["parameters"] == 4 * 8 + 8 + 8 + 1 and shown["global_step"] > 0

    assert {p: snapshot(p) for p in (hf, version)} == before  # read-only: not one byte or time changed
    assert not any(name.startswith(".ckptctl") for p in (hf, version) for name in os.listdir(p))
