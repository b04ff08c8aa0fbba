"""``make demo``: a short end-to-end run of the library on a tiny model.

Trains a small model for 20 batches with periodic checkpoints and best-model
tracking; run it again and it resumes where the last run stopped. Prints what is on disk. The paired trainloop (``python -m ckptctl.trainloop``) is the full demo.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ckptctl import ModelPersistence


def _train(p: ModelPersistence, model, opt, batches: range, epoch: int = 0) -> None:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(64, 8, generator=gen)
    y = x.sum(dim=1, keepdim=True)
    for batch in batches:
        idx = torch.randint(0, 64, (16,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = {"loss": loss.item(), "accuracy_delta": -loss.item()}
        if p.maybe_save(epoch, batch, metrics, agent=model, optimizer=opt) is not None:
            p.update_best(epoch, batch, metrics, agent=model)
        print(f"Epoch {epoch}, Batch {batch}: Loss={loss.item():.3f}")


def main(out: str = "runs/demo_library") -> int:
    """Run the library demo into ``out``; return an exit code."""
    run = Path(out)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    p = ModelPersistence(run, max_checkpoints=3, save_every_n_batches=5)
    info = p.resume(agent=model, optimizer=opt)
    start = 0 if info is None else info["batch"] + 1
    print(f"resuming after batch {info['batch']}" if info else "fresh run")
    _train(p, model, opt, range(start, start + 20))
    p.close()
    p = ModelPersistence(run)
    print(json.dumps({"checkpoints": list(p.checkpoints), "best": p.best and p.best["source_id"]}, indent=None))
    p.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
