"""Child side of the sharded tests: one script every rank of ``torchrun`` runs (FSDP2 ``fully_shard``, gloo, CPU).

``python -m torch.distributed.run --standalone --nproc_per_node N tests/fsdp_child.py OUT [options]``

A small MLP (one layer of 5 rows, so 2 ranks hold uneven shards) sharded with FSDP2, AdamW,
trained to ``--total`` steps with ``maybe_save`` after every step and ``update_best`` after
every save. Each step draws its data from the rank's own Python, NumPy and torch RNGs, so a
resume that restored another rank's RNG would diverge. Resumes first (``resume_rank<r>.json``),
and after a resume makes the resumed state the best model (a sharded snapshot, as the
trainloop does). Prints ``rank R step N`` after every step; at the end writes each rank's
final state, unsharded (weights, optimizer, RNG), to ``final_rank<r>.pt``.
``--plain``: no FSDP (every rank holds the whole model: a resume onto plain tensors).
``--drive D``: mirror the run to ``D``. ``--node-dirs A,B``: rank r works in folder r (per-node disks).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ckptctl.persistence import ModelPersistence  # noqa: E402
from ckptctl.torch_io import capture_rng  # noqa: E402


def say(line: str) -> None:
    """One line on stdout in one write (the ranks share torchrun's stdout)."""
    os.write(1, (line + "\n").encode())


def make_model(seed: int, plain: bool) -> nn.Module:
    """The same initial model on every rank, sharded per layer then as a whole (FSDP2), unless ``plain``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    if not plain:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model


def seed_rank(seed: int, rank: int) -> None:
    random.seed(seed * 100 + rank)
    np.random.seed(seed * 100 + rank)
    torch.manual_seed(seed * 100 + rank)


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    x = torch.randn(8, 6) + float(np.random.rand()) + random.random()
    y = torch.randn(8, 3)
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    if not hasattr(model, "reshard"):  # plain: the ranks' gradients averaged, as FSDP does
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    opt.step()
    return float(loss.detach())


def whole(value):
    """A tensor unsharded (collective for a DTensor), others as they are."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def final_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    osd = opt.state_dict()
    state = {i: {k: whole(v) for k, v in s.items()} for i, s in osd["state"].items()}
    return {"model": {k: whole(v) for k, v in model.state_dict().items()}, "optimizer": state, "rng": capture_rng()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--run", default="runs/fsdp")
    parser.add_argument("--total", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--drive", default=None)
    parser.add_argument("--node-dirs", default=None, help="rank r works in folder r (its own disk)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.node_dirs:
        os.chdir(args.node_dirs.split(",")[rank])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model = make_model(args.seed, args.plain)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    seed_rank(args.seed, rank)
    p = ModelPersistence(args.run, save_every_n_batches=args.save_every, max_checkpoints=3, best_metric="score", drive_backup=args.drive)
    meta = p.resume(model=model, optimizer=opt)
    if meta is not None:
        p.update_best(meta["epoch"], meta["batch"], {"score": meta["global_step"] + 0.5}, model=model, optimizer=opt)
    keep = ("checkpoint_id", "global_step", "extra", "world_size_changed")
    resumed = None if meta is None else {k: meta[k] for k in keep if k in meta}
    (Path(args.out) / f"resume_rank{rank}.json").write_text(json.dumps({"meta": resumed}))
    step = p.global_step
    while step < args.total:
        loss = train_step(model, opt)
        step += 1
        saved = p.maybe_save(0, step - 1, {"loss": loss}, extra={"rank": rank, "samples": step * 8}, model=model, optimizer=opt)
        if saved is not None:
            p.update_best(0, step - 1, {"score": float(step)}, model=model, optimizer=opt)
        say(f"rank {rank} step {step}")
    p.close()
    torch.save(final_state(model, opt), Path(args.out) / f"final_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    say(f"rank {rank} done")


if __name__ == "__main__":
    main()
