"""The torchrun child of ``ckptctl bench --parallel``: every rank runs this module (gloo, CPU).

``python -m torch.distributed.run --standalone --nproc_per_node N -m ckptctl.bench_parallel_child
--work DIR --size BYTES --repeats R --out FILE``

Builds a model of a few ``Linear`` layers sized so that its weights and AdamW's two moments
come to ``--size`` bytes, sharded with FSDP2 (``fully_shard``), and steps the optimizer
once so it has state. Then, round by round (interleaved, so a slow spell of the disk falls
on all alike), after one optimizer step that changes every tensor:

- ours: every rank calls ``ModelPersistence.save_checkpoint(model=m, optimizer=opt)``
  (the stall: until it returns, on the slowest rank), then ``flush()``; the background
  write is the bytes of the files the save added to the run over the time from the save
  call to the end of the flush;
- the raw-write anchor: every rank at once writes its share of those bytes with plain
  write+fsync to a file of its own in the run's folder;
- the DCP anchor: ``torch.distributed.checkpoint.async_save`` of the same state
  (``get_state_dict``) on the same ranks; its blocking time (until it returns, slowest
  rank), then its future is awaited before the next round.

Rank 0 writes the medians as JSON to ``--out`` (see :mod:`ckptctl.bench_parallel`) and
prints progress lines prefixed with :data:`STEP_PREFIX`. Where this torch has no FSDP2, the
same measurements run on a DDP-replicated model and the JSON says why
(``parallel_layout_note``); ``--layout ddp`` asks for that model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ckptctl.bench_parallel import ERROR_FILE, STEP_PREFIX

#: Linear layers of the model; with AdamW's two moments the saved state is 3x the weights.
LAYERS = 4
BATCH = 8


def say(line: str) -> None:
    """A progress line from rank 0, in one write (the ranks share torchrun's stdout)."""
    if dist.get_rank() == 0:
        os.write(1, f"{STEP_PREFIX}{line}\n".encode())


def layer_width(size_bytes: int, world_size: int) -> int:
    """The width ``w`` of ``LAYERS`` ``Linear(w, w)`` layers whose weights and two AdamW moments (float32) come to about ``size_bytes``; a multiple of ``world_size``."""
    width = int((size_bytes / (3 * 4 * LAYERS)) ** 0.5)
    return max(world_size, width - width % world_size)


def make_model(width: int, layout: str) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """``(model, wrapped, optimizer)``: the layers sharded by FSDP2 (``wrapped`` is the model itself) or replicated under DDP."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(LAYERS)])
    if layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(wrapped, optimizer, width)
    return model, wrapped, optimizer


def train_step(wrapped: nn.Module, optimizer: torch.optim.Optimizer, width: int) -> None:
    """One step: every weight and both moments change (so no save can dedup them away)."""
    optimizer.zero_grad()
    wrapped(torch.randn(BATCH, width)).pow(2).mean().backward()
    optimizer.step()


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's own part of the weights and optimizer state (a DTensor counts its local shard)."""
    from ckptctl.tensors import iter_tensors

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()["state"]}
    return sum(local(t).numel() * local(t).element_size() for _, t in iter_tensors(state))


def slowest(seconds: float) -> float:
    """Collective: the largest of every rank's ``seconds``."""
    box = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return float(box.item())


def all_ranks(ok: bool) -> bool:
    """Collective: True when ``ok`` is True on every rank."""
    box = torch.tensor([1 if ok else 0])
    dist.all_reduce(box, op=dist.ReduceOp.MIN)
    return bool(box.item())


def files_in(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` by relative path, with its size."""
    out = {}
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                out[str(path.relative_to(folder))] = path.stat().st_size
        except OSError:  # removed while listed (retention)
            pass
    return out


def added_bytes(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes of the files in ``after`` that ``before`` did not have."""
    return sum(size for name, size in after.items() if name not in before)


def choose_layout(requested: str) -> tuple[str, str | None]:
    """``(layout, note)``: ``fsdp2`` unless this torch has no ``fully_shard`` (then ``ddp``, and why)."""
    import torch.distributed.fsdp as fsdp

    if requested == "auto" and not hasattr(fsdp, "fully_shard"):
        return "ddp", f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return ("fsdp2" if requested == "auto" else requested), None


class Rounds:
    """The three measurements of one job on one state, each a callable run once per round."""

    def __init__(self, work: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer):
        from ckptctl.persistence import ModelPersistence

        self.work, self.wrapped, self.optimizer = work, wrapped, optimizer
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run = work / "run"
        self.persistence = ModelPersistence(self.run, max_checkpoints=2, save_every_n_batches=1)
        self.saves = 0
        self.dcp_calls = 0
        self.share = 0  # bytes this rank writes in the raw anchor: its share of what the last save wrote
        self.block = os.urandom(8 * 1024 * 1024)  # incompressible, made once

    def ours(self) -> dict[str, float]:
        """One ckptctl save: the stall (slowest rank), and the bytes the save added to the run over the time to the end of its flush."""
        before = files_in(self.run) if self.rank == 0 else {}
        dist.barrier()
        start = time.perf_counter()
        self.persistence.save_checkpoint(0, self.saves, model=self.wrapped, optimizer=self.optimizer)
        stall = time.perf_counter() - start
        self.persistence.flush()
        dist.barrier()
        write = time.perf_counter() - start
        self.saves += 1
        written = torch.tensor([added_bytes(before, files_in(self.run)) if self.rank == 0 else 0])
        dist.broadcast(written, src=0)
        self.share = -(-int(written.item()) // self.world)
        return {"stall_s": slowest(stall), "write_s": write, "written_bytes": float(written.item())}

    def raw(self) -> dict[str, float]:
        """Every rank at once writes its share of the last save's bytes with write+fsync; the wall time until the last one is done."""
        target = self.run.parent / f"raw_rank{self.rank}.bin"
        block = memoryview(self.block)
        dist.barrier()
        start = time.perf_counter()
        with open(target, "wb", buffering=0) as f:
            left = self.share
            while left > 0:
                left -= f.write(block[: min(left, len(block))])
            os.fsync(f.fileno())
        dist.barrier()
        seconds = time.perf_counter() - start
        target.unlink()
        return {"raw_write_s": seconds, "raw_bytes": float(self.share * self.world)}

    def dcp(self) -> dict[str, float]:
        """One DCP ``async_save`` of the same state: its blocking time (slowest rank); its future is awaited, then its files removed."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        target = self.work / f"dcp_{self.dcp_calls}"
        self.dcp_calls += 1
        model_state, optimizer_state = get_state_dict(self.wrapped, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dist.barrier()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            future = dcp.async_save(state, checkpoint_id=str(target))
            blocking = time.perf_counter() - start
            _await(future)
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(target, ignore_errors=True)
        return {"dcp_async_blocking_s": slowest(blocking)}

    def close(self) -> None:
        """Close the run (collective)."""
        self.persistence.close()


def _await(future: Any) -> None:
    """Wait for an ``async_save`` result: a future, or a response holding the upload's future (newer torch)."""
    completion = getattr(future, "upload_completion", None)
    (completion if completion is not None else future).result()


def measure(work: Path, size_bytes: int, repeats: int, layout: str) -> dict[str, Any]:
    """The whole job: medians of ``repeats`` interleaved rounds (after one warm-up round that is not counted)."""
    world = dist.get_world_size()
    layout, note = choose_layout(layout)
    width = layer_width(size_bytes, world)
    say(f"{layout} model of {LAYERS} Linear({width}, {width}) layers + AdamW on {world} ranks")
    model, wrapped, optimizer = make_model(width, layout)
    state_bytes = torch.tensor([local_state_bytes(model, optimizer)])
    if layout == "fsdp2":
        dist.all_reduce(state_bytes)
    rounds = Rounds(work, wrapped, optimizer)
    steps: dict[str, Callable[[], dict[str, float]]] = {"ours": rounds.ours, "raw": rounds.raw, "dcp": rounds.dcp}
    samples: dict[str, list[float]] = {}
    for i in range(repeats + 1):
        say("warm-up round" if i == 0 else f"round {i}/{repeats}: ckptctl save + flush, raw write, DCP async_save")
        train_step(wrapped, optimizer, width)
        for step in steps.values():
            for key, value in step().items():
                if i > 0:
                    samples.setdefault(key, []).append(value)
    rounds.close()  # collective: not after a failure (torchrun ends the other ranks)
    out = {f"parallel_{key}": statistics.median(values) for key, values in samples.items()}
    for key in ("parallel_written_bytes", "parallel_raw_bytes"):
        out[key] = int(out[key])
    out.update(
        parallel_world_size=world, parallel_layout=layout, parallel_layout_note=note,
        parallel_state_bytes=int(state_bytes.item()), parallel_layer_width=width,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of every rank: run the job; rank 0 writes the JSON to ``--out``; a rank that fails writes why to :data:`ERROR_FILE` in ``--work``."""
    parser = argparse.ArgumentParser(prog="python -m ckptctl.bench_parallel_child")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layout", choices=("auto", "fsdp2", "ddp"), default="auto")
    args = parser.parse_args(argv)
    try:
        run_job(args)
    except BaseException as exc:  # the parent shows the first rank's cause, not torchrun's summary
        rank = os.environ.get("RANK", "0")
        (args.work / ERROR_FILE.format(rank=rank)).write_text(f"{type(exc).__name__}: {exc}")
        raise


def run_job(args: argparse.Namespace) -> None:
    """Initialise the process group, measure, and write rank 0's JSON."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    dist.init_process_group("gloo")
    try:
        result = measure(args.work, args.size, args.repeats, args.layout)
        if dist.get_rank() == 0:
            partial = args.out.with_name(args.out.name + ".partial")
            partial.write_text(json.dumps(result))
            partial.replace(args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
