"""Child side of the distributed tests: one script that every rank of ``torchrun`` runs (gloo, CPU).

``python -m torch.distributed.run --standalone --nproc_per_node N tests/ddp_child.py SCENARIO OUT [options]``

- ``train``: a small ``nn.Linear`` wrapped in DistributedDataParallel (SGD with momentum),
  trained to ``--total`` steps with ``maybe_save`` after every step; each step draws its
  data from the rank's own Python, NumPy and torch RNGs (seeded per rank), so a resume that
  restored another rank's RNG would diverge. Resumes first (``resume_rank<r>.json``: the
  metadata), prints ``rank R step N`` after every step, and at the end writes each rank's
  final state (weights, optimizer, RNG) to ``final_rank<r>.pt``.
- ``symptoms``: the issue's symptoms in one job: every rank constructs ModelPersistence,
  saves, closes; a new object resumes into scrambled components; rank 0's errors reach
  every rank. Writes ``symptoms_rank<r>.json``.
- ``cuda`` (nccl, needs a GPU): see :func:`cuda`. Writes ``cuda_rank<r>.json``.

``--node-dirs A,B,...``: rank r works in folder r (``chdir``) with the same relative run
path, as ranks on machines with their own local disks do.
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
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ckptctl.errors import CkptctlError, NoValidCheckpointError  # noqa: E402
from ckptctl.persistence import ModelPersistence  # noqa: E402
from ckptctl.torch_io import capture_rng  # noqa: E402


def say(line: str) -> None:
    """One line on stdout in one write (the ranks share torchrun's stdout: lines must not interleave)."""
    os.write(1, (line + "\n").encode())


def seed_rank(seed: int, rank: int) -> None:
    """A different stream per rank, in all three generators."""
    random.seed(seed * 100 + rank)
    np.random.seed(seed * 100 + rank)
    torch.manual_seed(seed * 100 + rank)


def make_model(rank: int) -> tuple[nn.Module, DistributedDataParallel, torch.optim.Optimizer]:
    model = nn.Linear(4, 2)
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's initial weights
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, ddp, opt


def train_step(ddp: DistributedDataParallel, opt: torch.optim.Optimizer) -> float:
    """One step on data drawn from this rank's RNGs (all three, so each must be restored)."""
    x = torch.randn(8, 4) + float(np.random.rand()) + random.random()
    y = torch.randn(8, 2)
    opt.zero_grad()
    loss = ((ddp(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def rng_fingerprint(rng: dict | None = None) -> dict:
    """RNG states (this process's, or ``rng`` as :func:`capture_rng` returns them) as plain JSON values, to compare."""
    rng = capture_rng() if rng is None else rng
    return {
        "python": rng["python"]["state"].tolist()[:8] + [rng["python"]["state"].tolist()[-1]],
        "numpy": rng["numpy"]["keys"].tolist()[:8] + [rng["numpy"]["pos"]],
        "torch": rng["torch_cpu"].tolist()[-16:],
    }


def flat(state: dict) -> dict:
    """A state dict's tensors as lists (optimizer state flattened by its keys)."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix] = value.tolist()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = value

    walk("", state)
    return out


def all_same(value, group=None) -> bool:
    """True when every rank holds an equal ``value``."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=group)
    return all(v == values[0] for v in values)


def train(args: argparse.Namespace, rank: int) -> None:
    seed_rank(args.seed, rank)
    model, ddp, opt = make_model(rank)
    p = ModelPersistence(args.run, save_every_n_batches=args.save_every, max_checkpoints=3)
    meta = p.resume(model=model, optimizer=opt)
    resumed = None if meta is None else {k: meta[k] for k in ("checkpoint_id", "global_step", "extra", "world_size_changed") if k in meta}
    report = {"meta": resumed, "same_on_every_rank": all_same(resumed and {**resumed, "extra": None}), "rng": rng_fingerprint()}
    (Path(args.out) / f"resume_rank{rank}.json").write_text(json.dumps(report))
    step = p.global_step
    while step < args.total:
        loss = train_step(ddp, opt)
        step += 1
        p.maybe_save(0, step - 1, {"loss": loss}, extra={"rank": rank, "samples": step * 8}, model=model, optimizer=opt)
        say(f"rank {rank} step {step}")
    p.close()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": capture_rng()}, Path(args.out) / f"final_rank{rank}.pt")
    say(f"rank {rank} done")


def symptoms(args: argparse.Namespace, rank: int) -> None:
    out: dict = {}
    seed_rank(args.seed, rank)
    model, ddp, opt = make_model(rank)
    p = ModelPersistence(args.run, save_every_n_batches=2, max_checkpoints=3)  # every rank, the same run: no RunLockedError
    out["fresh_resume"] = p.resume(model=model, optimizer=opt)
    ids = []
    for step in range(1, 7):
        train_step(ddp, opt)
        ids.append(p.maybe_save(0, step - 1, {"loss": float(step)}, extra={"rank": rank, "samples": step * 8}, model=model, optimizer=opt))
    out["ids"] = ids
    out["ids_same"] = all_same(ids)
    saved_rng = rng_fingerprint()  # the states the last save (step 6) captured on this rank
    saved_state = {"model": flat(model.state_dict()), "optimizer": flat(opt.state_dict())}
    became_best = p.update_best(0, 5, {"accuracy_delta": 1.0 if rank == 0 else 100.0}, model=model)
    p.flush()  # collective: the best model is written
    out["best"] = [became_best, all_same(became_best), p.best["metrics"]]
    out["checkpoints_same"] = all_same(sorted(p.checkpoints))
    p.close()

    # A new object (a restarted job): scrambled components, a consumed RNG, then resume.
    seed_rank(args.seed + 1 + rank, rank)
    model2, _ddp2, opt2 = make_model(rank)
    with torch.no_grad():
        model2.weight.add_(rank + 1.0)
    train_step(_ddp2, opt2)
    p = ModelPersistence(args.run, save_every_n_batches=2, max_checkpoints=3)
    meta = p.resume(model=model2, optimizer=opt2)
    out["resume"] = {k: meta[k] for k in ("checkpoint_id", "global_step", "extra")}
    out["resume_same"] = all_same({k: v for k, v in meta.items() if k != "extra"})
    out["weights_restored"] = flat(model2.state_dict()) == saved_state["model"]
    out["optimizer_restored"] = flat(opt2.state_dict()) == saved_state["optimizer"]
    out["own_rng_restored"] = rng_fingerprint() == saved_rng
    out["rng_differs_between_ranks"] = not all_same(saved_rng)
    out["resume_info_same"] = all_same(p.get_resume_info())
    out["global_step"] = p.global_step
    try:
        p.load_checkpoint(999, model=model2)
    except CkptctlError as exc:
        out["missing_id_error"] = type(exc).__name__
    p.close()

    # Another run whose files rank 0 finds damaged: every rank gets NoValidCheckpointError, none hangs.
    damaged = args.run + "_damaged"
    with ModelPersistence(damaged) as p:
        p.save_checkpoint(0, 0, model=model2, optimizer=opt2)
    if rank == 0:
        for f in (Path(damaged) / "checkpoints").glob("*.pt"):
            f.write_bytes(b"garbage")
    p = ModelPersistence(damaged)
    try:
        p.resume(model=model2, optimizer=opt2)
    except NoValidCheckpointError as exc:
        out["corrupt_error"] = type(exc).__name__
    p.close()
    (Path(args.out) / f"symptoms_rank{rank}.json").write_text(json.dumps(out))
    say(f"rank {rank} done")


def cuda(args: argparse.Namespace, rank: int) -> None:
    """Under nccl with the model on the GPU: the state and RNG travel over ckptctl's gloo group; each rank's CUDA RNG comes back.

    Every rank uses GPU 0 (one GPU is enough): nothing here may run an nccl collective,
    so the test's own checks use a gloo group as well. No training (it would need one):
    the replicated state is the same initial model and one identical optimizer step.
    """
    checks = dist.new_group(backend="gloo")
    out: dict = {"backend": str(dist.get_backend())}
    torch.cuda.set_device(0)
    torch.manual_seed(args.seed)  # the same model and data on every rank
    model = nn.Linear(4, 2).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(8, 4, device="cuda")).sum().backward()
    opt.step()
    seed_rank(args.seed, rank)
    torch.randn(rank + 1, device="cuda")  # each rank's CUDA stream somewhere else
    p = ModelPersistence(args.run)
    p.save_checkpoint(0, 0, extra={"rank": rank}, model=model, optimizer=opt)
    saved = {"cuda": torch.cuda.get_rng_state().tolist()[-16:], **rng_fingerprint()}
    p.close()

    torch.manual_seed(args.seed + 1 + rank)
    model2 = nn.Linear(4, 2).cuda()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    torch.randn(5, device="cuda")
    with ModelPersistence(args.run) as p:
        meta = p.resume(model=model2, optimizer=opt2, device="cuda")
    restored = {"cuda": torch.cuda.get_rng_state().tolist()[-16:], **rng_fingerprint()}
    out["extra"] = meta["extra"]
    out["own_rng_restored"] = restored == saved
    out["rng_differs_between_ranks"] = not all_same(saved, checks)
    out["weights_restored"] = all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), model.state_dict().values()))
    momentum = next(iter(opt2.state_dict()["state"].values()))["momentum_buffer"]
    out["optimizer_state_on"] = str(momentum.device)
    out["optimizer_restored"] = torch.equal(momentum, next(iter(opt.state_dict()["state"].values()))["momentum_buffer"])
    out["checkpoint_has_cuda_rng"] = "torch_cuda" in capture_rng()
    (Path(args.out) / f"cuda_rank{rank}.json").write_text(json.dumps(out))
    say(f"rank {rank} done")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=("train", "symptoms", "cuda"))
    parser.add_argument("out")
    parser.add_argument("--run", default="runs/ddp")
    parser.add_argument("--total", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--node-dirs", default=None)
    args = parser.parse_args()
    args.out = str(Path(args.out).resolve())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    dist.init_process_group("nccl" if args.scenario == "cuda" else "gloo")
    rank = dist.get_rank()
    if args.node_dirs:
        os.chdir(args.node_dirs.split(",")[rank])
    {"train": train, "symptoms": symptoms, "cuda": cuda}[args.scenario](args, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
