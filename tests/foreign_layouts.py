"""Folders ckptctl did not write, built for real with plain torch and safetensors (no Trainer, no Lightning needed).

- :func:`write_guide_flat`: the Colab guide's flat Drive folder (``checkpoint_0000N.pt`` and
  ``best_model.pt``, plain ``torch.save`` dicts of :class:`tests.test_legacy_runs.GuideModels`);
- :func:`write_hf_output`: a Hugging Face Trainer output folder, ``checkpoint-N/`` with the
  files a Trainer writes (``model.safetensors`` by ``safetensors.torch.save_file``, ``optimizer.pt``,
  ``scheduler.pt``, ``rng_state.pth`` as the Trainer saves it, ``trainer_state.json``,
  ``training_args.bin`` a pickled arguments object);
- :func:`write_lightning_ckpt`: a ``.ckpt`` dict with the keys Lightning's ``ModelCheckpoint`` writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.test_legacy_runs import GuideModels

#: (epoch, batch) of the guide's flat-folder checkpoints 0, 1, 2 (it saved every 50 of 100 batches).
GUIDE_POSITIONS = [(0, 49), (0, 99), (1, 49)]
GUIDE_DELTAS = [0.01, 0.05, 0.02]


def write_guide_flat(folder: Path, *, best_at: int = 1) -> tuple[Path, dict]:
    """The guide's Drive folder: checkpoints 0..2 and ``best_model.pt`` (a copy of ``best_at``) side by side.

    Returns the folder and every module's state at the newest checkpoint (cloned) for exact comparison.
    """
    folder.mkdir(parents=True, exist_ok=True)
    g = GuideModels()
    for checkpoint_id, (epoch, batch) in enumerate(GUIDE_POSITIONS):
        loss = g.step()
        metrics = {"loss": loss, "accuracy": 0.5 + 0.1 * checkpoint_id, "accuracy_delta": GUIDE_DELTAS[checkpoint_id]}
        payload = g.payload(epoch, batch, metrics, f"2025-03-01T12:0{checkpoint_id}:00.000000")
        torch.save(payload, folder / f"checkpoint_{checkpoint_id:05d}.pt")
        if checkpoint_id == best_at:
            shutil.copyfile(folder / f"checkpoint_{checkpoint_id:05d}.pt", folder / "best_model.pt")
    final = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in g.modules().items()}
    return folder, final


@dataclasses.dataclass
class TrainingArguments:
    """Stands in for transformers' TrainingArguments: a pickled object a ``weights_only`` load refuses."""

    output_dir: str = "out"
    learning_rate: float = 5e-5


def write_hf_output(folder: Path, steps: tuple[int, ...] = (10, 20), *, seed: int = 0) -> Path:
    """A Trainer output folder with one ``checkpoint-N/`` per step (a real small model trained between them)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 100)
    log: list[dict] = []
    done = 0
    for step in steps:
        while done < step:
            loss = model(torch.randn(3, 4)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            done += 1
        log += [
            {"epoch": step / 10, "grad_norm": 0.5, "learning_rate": scheduler.get_last_lr()[0], "loss": loss.detach().item(), "step": step},
            {"epoch": step / 10, "eval_loss": 1.0 / step, "eval_runtime": 0.1, "eval_samples_per_second": 30.0, "step": step},
        ]
        out = folder / f"checkpoint-{step}"
        out.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors", metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), out / "optimizer.pt")
        torch.save(scheduler.state_dict(), out / "scheduler.pt")
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}, out / "rng_state.pth")
        torch.save(TrainingArguments(str(folder)), out / "training_args.bin")
        state = {
            "best_global_step": steps[-1], "best_metric": 1.0 / steps[-1], "best_model_checkpoint": str(folder / f"checkpoint-{steps[-1]}"),
            "epoch": step / 10, "eval_steps": 10, "global_step": step, "is_hyper_param_search": False,
            "is_local_process_zero": True, "is_world_process_zero": True, "log_history": list(log), "logging_steps": 10,
            "max_steps": steps[-1], "num_input_tokens_seen": 0, "num_train_epochs": 2, "save_steps": 10,
            "stateful_callbacks": {}, "total_flos": 12.0, "train_batch_size": 3, "trial_name": None, "trial_params": None,
        }
        (out / "trainer_state.json").write_text(json.dumps(state, indent=2))
    return folder


MONITOR_KEY = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, 'train_time_interval': None}"


def write_lightning_ckpt(path: Path, epoch: int, step: int, val_loss: float, best_path: Path, best_score: float, *, seed: int = 0, hparams: dict | None = None) -> Path:
    """One ``.ckpt`` with the keys Lightning 2.x writes (state_dict, optimizer_states, callbacks' ModelCheckpoint state, loops...)."""
    torch.manual_seed(seed + epoch)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint = {
        "epoch": epoch,
        "global_step": step,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": epoch + 1}}}},
        "callbacks": {
            MONITOR_KEY: {
                "monitor": "val_loss", "best_model_score": torch.tensor(best_score), "best_model_path": str(best_path),
                "current_score": torch.tensor(val_loss), "dirpath": str(path.parent), "best_k_models": {str(best_path): torch.tensor(best_score)},
                "kth_best_model_path": str(best_path), "kth_value": torch.tensor(best_score), "last_model_path": "",
            }
        },
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams if hparams is not None else {"lr": 0.1, "hidden": 2},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def write_lightning_version(version: Path) -> Path:
    """``lightning_logs/version_0``: ``checkpoints/`` with two epochs' ``.ckpt`` files (val_loss 0.5 then 0.3)."""
    folder = version / "checkpoints"
    best = folder / "epoch=1-step=20.ckpt"
    write_lightning_ckpt(folder / "epoch=0-step=10.ckpt", 0, 10, 0.5, folder / "epoch=0-step=10.ckpt", 0.5)
    write_lightning_ckpt(best, 1, 20, 0.3, best, 0.3)
    (version / "hparams.yaml").write_text("lr: 0.1\nhidden: 2\n")
    return version


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and folder under ``folder`` with its bytes and modification time: what "never modified" is checked against."""
    found = {".": (b"", os.stat(folder).st_mtime_ns)}
    for p in sorted(folder.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            found[str(p.relative_to(folder)) + "/"] = (b"", p.stat().st_mtime_ns)
        elif p.is_file() and not p.is_symlink():
            found[str(p.relative_to(folder))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return found
