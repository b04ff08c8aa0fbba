"""``ckptctl bench``: measure ckptctl against its anchors on this machine, side by side.

Each goal is a ratio of two timings taken in the same run (so machine noise cancels):
training stall vs DCP ``async_save`` and sync ``torch.save``; background save vs raw
write+fsync; verify vs a cold sequential read (and its peak memory); restore vs ``cp``
+fsync; ``ckptctl ls``/``--help`` vs importing typer+rich+humanize; resume vs a plain
``torch.load`` start-up; and (``parallel``, :mod:`ckptctl.bench_parallel`) a sharded save
on N ranks of a torchrun job vs DCP ``async_save`` and a raw write by every rank at once.
Times are medians of ``repeats`` runs. Nothing here asserts a timing: the numbers are
reported, and the CLI renders them.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from ckptctl.core.format import CHECKPOINT_DIR, checkpoint_relpath, utc_now_iso
from ckptctl.core.objects import PACK_SUFFIX, pack_relpath
from ckptctl.core.manifest import CheckpointEntry, Index
from ckptctl.storage.runfiles import commit_index

StepCallback = Optional[Callable[[str], None]]

#: (name, goal, direction, what it compares) for every ratio reported.
GOALS = [
    ("stall_vs_dcp_async", 0.5, "<=", "training stall per save / DCP async_save blocking time"),
    ("stall_vs_sync_save", 0.1, "<=", "training stall per save / sync torch.save+fsync"),
    ("background_save_vs_raw_write", 0.8, ">=", "background save throughput / raw write+fsync"),
    ("verify_vs_cold_read", 0.8, ">=", "verify (checksum+trial load) speed / cold sequential read"),
    ("verify_rss_vs_file", 0.25, "<=", "verify peak RSS above baseline / file size"),
    ("restore_vs_cp", 0.8, ">=", "restore from Drive speed / cp+fsync"),
    ("ls_vs_import", 3.0, "<=", "ckptctl ls (100 runs x 5) / import typer, rich, humanize"),
    ("ls_large_vs_small", 1.5, "<=", "ckptctl ls with 1 GB checkpoints / with 1 MB ones"),
    ("help_vs_import", 3.0, "<=", "ckptctl --help / import typer, rich, humanize"),
    ("resume_vs_plain_load", 1.5, "<=", "resume to first step / plain torch.load start-up"),
    ("scale_verify_rss_vs_file", 0.25, "<=", "scale: verify peak RSS above baseline / file size"),
    ("dedup_disk_frozen_component", 1.0, "<=", "dedup: disk bytes, K=5 + best, frozen component / (1.3 x (frozen + 6 x trainable) + 1 MB)"),
    ("dedup_disk_frozen_base", 1.0, "<=", "dedup: disk bytes, K=5 + best, frozen base in one module / (1.3 x (frozen + 6 x trainable) + 1 MB)"),
    ("dedup_mirror_frozen_component", 1.0, "<=", "dedup: Drive mirror bytes, frozen component / the same bound"),
    ("dedup_mirror_frozen_base", 1.0, "<=", "dedup: Drive mirror bytes, frozen base in one module / the same bound"),
    ("upload_per_save_vs_trainable", 1.3, "<=", "dedup: bytes uploaded per save once the frozen part is on Drive / trainable state"),
    ("parallel_stall_vs_dcp_async", 0.5, "<=", "parallel: training stall per save / DCP async_save blocking time"),
    ("parallel_write_vs_raw", 0.8, ">=", "parallel: background write throughput, all ranks / raw write+fsync, all ranks"),
]


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn round by round (A B A B ...), so a slow
    spell of the disk falls on all of them alike instead of on whichever ran then."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _drop_cache(path: Path) -> None:
    """Ask the kernel to forget ``path``'s cached pages, so the next read is cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_all(path: Path) -> int:
    done = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * 1024 * 1024)
        while n := f.readinto(buf):
            done += n
    return done


def _make_blob(size_bytes: int, tensors: int = 16, random: bool = True):
    """A module holding ``size_bytes`` of float32 buffers in ``tensors`` pieces (the saved state)."""
    import torch

    class Blob(torch.nn.Module):
        pass

    blob = Blob()
    per = max(1, size_bytes // 4 // tensors)
    gen = torch.Generator().manual_seed(0)
    for i in range(tensors):
        blob.register_buffer(f"w{i}", torch.rand(per, generator=gen) if random else torch.full((per,), float(i)))
    return blob


def _bench_scale(work: Path, size_bytes: int, step: StepCallback) -> dict[str, Any]:
    """Save and verify one checkpoint of ``size_bytes`` (meant: more than half the RAM) with default settings."""
    from ckptctl.persistence import ModelPersistence
    from ckptctl.torch_io import available_memory_bytes

    step and step(f"scale: building {size_bytes} bytes of state")
    blob = _make_blob(size_bytes, random=False)
    out: dict[str, Any] = {"scale_bytes": size_bytes, "memory_available_bytes": available_memory_bytes()}
    run = work / "runs" / "scale_run"
    step and step("scale: saving it (staging=auto)")
    with ModelPersistence(run, save_every_n_batches=1) as p:
        start = time.perf_counter()
        p.save_checkpoint(0, 0, {}, agent=blob)
        out["scale_stall_s"] = time.perf_counter() - start
        p.flush()
        out["scale_save_s"] = time.perf_counter() - start
        out["scale_staged_bytes"] = p.staging_bytes
        entry = p.checkpoints[0]
    del blob
    path = run / entry["path"]
    step and step("scale: verifying it in a fresh process")
    _drop_cache(path)
    start = time.perf_counter()
    out["scale_verify_peak_rss_bytes"] = _child_peak_rss(["verify", str(path), entry["checksum"]])
    out["scale_verify_s"] = time.perf_counter() - start
    out.setdefault("baseline_peak_rss_bytes", _child_peak_rss(["baseline"]))
    return out


def _bench_saves(work: Path, size_bytes: int, repeats: int, step: StepCallback) -> dict[str, Any]:
    """ckptctl's save against its anchors, interleaved round by round so disk noise hits all alike."""
    import torch

    from ckptctl.persistence import ModelPersistence

    blob = _make_blob(size_bytes)
    state = blob.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    out: dict[str, Any] = {"state_bytes": nbytes}
    run = work / "runs" / "bench_run"
    sync_path, raw_path = work / "sync.pt", work / "raw.bin"
    views = [memoryview(t.numpy()).cast("B") for t in state.values()]
    p = ModelPersistence(run, max_checkpoints=2, save_every_n_batches=1)
    p.save_checkpoint(0, 0, {"loss": 0.0}, agent=blob)
    p.flush()  # the first save allocates the staging buffers
    dcp = _DcpAnchor(work, state)
    times: dict[str, list[float]] = {"stall_s": [], "background_save_s": [], "sync_save_s": [], "raw_write_s": [], "dcp": []}

    def sync_save() -> None:
        with open(sync_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    def raw_write() -> None:
        with open(raw_path, "wb", buffering=0) as f:
            for view in views:
                f.write(view)
            os.fsync(f.fileno())

    for i in range(repeats):
        step and step(f"save: round {i + 1}/{repeats}: ckptctl, sync torch.save, raw write, DCP async_save")
        with torch.no_grad():  # training changed every tensor (else the save would write nothing new)
            for buffer in blob.buffers():
                buffer.add_(1.0)
        start = time.perf_counter()
        p.save_checkpoint(0, i + 1, {"loss": float(i)}, agent=blob)
        returned = time.perf_counter()
        p.flush()
        times["stall_s"].append(returned - start)
        times["background_save_s"].append(time.perf_counter() - returned)
        times["sync_save_s"].append(_median_time(sync_save, 1))
        times["raw_write_s"].append(_median_time(raw_write, 1))
        blocking = dcp.blocking_time()
        if blocking is not None:
            times["dcp"].append(blocking)
    out["staging_bytes"] = p.staging_bytes
    latest = p.checkpoints[max(p.checkpoints)]
    out["checkpoint_path"] = str(run / latest["path"])
    out["checkpoint_checksum"] = latest["checksum"]
    out["checkpoint_bytes"] = latest.get("state_bytes") or latest["size_bytes"]
    out["checkpoint_files"] = [str(run / latest["path"])] + [str(run / pack_relpath(name)) for name in latest.get("objects") or {}]
    out["plain_path"] = str(sync_path)  # the resume anchor loads the same state saved by torch.save
    p.close()
    for key in ("stall_s", "background_save_s", "sync_save_s", "raw_write_s"):
        out[key] = statistics.median(times[key])
    out["dcp_async_blocking_s"] = statistics.median(times["dcp"]) if times["dcp"] else None
    raw_path.unlink(missing_ok=True)
    return out


class _DcpAnchor:
    """``torch.distributed.checkpoint.async_save`` in one process; None where it is unavailable."""

    def __init__(self, work: Path, state: dict):
        self.work, self.state, self.calls = work, state, 0
        try:
            import torch.distributed.checkpoint as dcp

            self._dcp = dcp
            self.blocking_time()  # the first call warms DCP up
        except Exception:
            self._dcp = None

    def blocking_time(self) -> float | None:
        """Seconds the caller is blocked by one async_save (the rest is awaited, not counted)."""
        import warnings

        if self._dcp is None:
            return None
        target = self.work / f"dcp_{self.calls}"
        self.calls += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                future = self._dcp.async_save(self.state, checkpoint_id=str(target))
                blocking = time.perf_counter() - start
                future.result()
        except Exception:
            self._dcp = None
            return None
        finally:
            shutil.rmtree(target, ignore_errors=True)
        return blocking


_VERIFY_CHILD = textwrap.dedent(
    """
    import resource, sys
    from ckptctl.torch_io import verify_file
    if sys.argv[1] == "verify":
        verify_file(sys.argv[2], sys.argv[3])
    # VmHWM is this process's own peak; ru_maxrss can carry the parent's peak across exec.
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak)
    """
)


def _child_peak_rss(args: list[str]) -> int:
    result = subprocess.run([sys.executable, "-c", _VERIFY_CHILD, *args], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def _bench_verify(saves: dict[str, Any], repeats: int, step: StepCallback) -> dict[str, Any]:
    from ckptctl.torch_io import verify_file

    path = Path(saves["checkpoint_path"])
    files = [Path(f) for f in saves["checkpoint_files"]]  # the checkpoint file and the packs it references
    checksum = saves["checkpoint_checksum"]
    step and step("verify: checksum + trial load, cold cache")

    def verify_cold() -> None:
        for f in files:
            _drop_cache(f)
        verify_file(path, checksum)

    def read_cold() -> None:
        for f in files:
            _drop_cache(f)
            _read_all(f)

    out = _interleaved({"verify_s": verify_cold, "cold_read_s": read_cold}, repeats)
    step and step("verify: peak memory of a verify process")
    for f in files:
        _drop_cache(f)
    out["verify_peak_rss_bytes"] = _child_peak_rss(["verify", str(path), checksum])
    out["baseline_peak_rss_bytes"] = _child_peak_rss(["baseline"])
    return out


def _bench_restore(work: Path, saves: dict[str, Any], drive: Path | None, repeats: int, step: StepCallback) -> dict[str, Any]:
    from ckptctl.storage.mirror import sync_run
    from ckptctl.storage.restore import restore_run
    from ckptctl.storage.objects import objects_dir
    from ckptctl.storage.scan import checkpoint_files_on_disk

    run = Path(saves["checkpoint_path"]).parent.parent
    drive_root = Path(drive) if drive else work / "drive"
    mirror = drive_root / f"ckptctl-bench-{os.getpid()}" / run.name
    mirror.parent.mkdir(parents=True, exist_ok=True)
    step and step(f"restore: mirror to {drive_root}")
    start = time.perf_counter()
    sync_run(run, mirror)
    out: dict[str, Any] = {"backup_s": time.perf_counter() - start}
    files = sorted(checkpoint_files_on_disk(mirror).values()) + sorted(objects_dir(mirror).glob(f"*{PACK_SUFFIX}"))
    out["restore_bytes"] = sum(f.stat().st_size for f in files)

    step and step("restore: copy + checksum back from the mirror")
    restored = work / "restored"

    def restore() -> None:
        shutil.rmtree(restored, ignore_errors=True)
        for f in files:
            _drop_cache(f)
        restore_run(mirror, restored / run.name)

    def cp_fsync() -> None:
        target = work / "cp"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for f in files:
            _drop_cache(f)
            dst = target / f.name
            shutil.copyfile(f, dst)
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    out.update(_interleaved({"restore_s": restore, "cp_fsync_s": cp_fsync}, repeats))
    shutil.rmtree(mirror.parent, ignore_errors=True)
    return out


def _write_listing_fixture(root: Path, runs: int, per_run: int, checkpoint_bytes: int) -> None:
    """Runs with a real index and sparse checkpoint files of the given size (ls must not read them)."""
    for r in range(runs):
        run = root / f"run_{r:03d}"
        (run / CHECKPOINT_DIR).mkdir(parents=True)
        entries = []
        for i in range(per_run):
            rel = checkpoint_relpath(i)
            with open(run / rel, "wb") as f:
                f.truncate(checkpoint_bytes)
            entries.append(CheckpointEntry(
                id=i, path=rel, epoch=0, batch=i * 50 + 49, global_step=i * 50 + 50,
                metrics={"loss": 1.0 / (i + 1), "accuracy_delta": 0.01 * i}, timestamp=utc_now_iso(),
                size_bytes=checkpoint_bytes, checksum="xxh3_128:" + "0" * 32,
            ))
        commit_index(run, Index(run_name=run.name, next_id=0).with_entries(entries))


def _cli_time(args: list[str], repeats: int) -> float:
    def run() -> None:
        subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    run()  # warm the file cache
    return _median_time(run, repeats)


def _bench_cli(work: Path, repeats: int, step: StepCallback) -> dict[str, Any]:
    step and step("listing: ckptctl ls over 100 runs x 5 checkpoints")
    small, large = work / "ls_small", work / "ls_large"
    _write_listing_fixture(small, 100, 5, 1_000_000)
    _write_listing_fixture(large, 100, 5, 1_000_000_000)
    cli = [sys.executable, "-m", "ckptctl"]
    reps = max(repeats, 5)
    out = {
        "import_typer_rich_humanize_s": _cli_time([sys.executable, "-c", "import typer, rich, humanize"], reps),
        "ls_small_s": _cli_time(cli + ["ls", str(small)], reps),
        "ls_large_s": _cli_time(cli + ["ls", str(large)], reps),
        "help_s": _cli_time(cli + ["--help"], reps),
    }
    shutil.rmtree(small, ignore_errors=True)
    shutil.rmtree(large, ignore_errors=True)
    return out


_RESUME_CHILD = textwrap.dedent(
    """
    import sys, time
    start = time.perf_counter()
    import torch
    from ckptctl.bench import _make_blob
    blob = _make_blob(int(sys.argv[3]))
    if sys.argv[1] == "resume":
        from ckptctl.persistence import ModelPersistence
        p = ModelPersistence(sys.argv[2])
        p.resume(agent=blob)
    else:
        blob.load_state_dict(torch.load(sys.argv[2], map_location="cpu", weights_only=True))
    next(iter(blob.buffers())).add_(1.0)  # the first step
    print(time.perf_counter() - start)
    if sys.argv[1] == "resume":
        p.close()
    """
)


def _bench_resume(saves: dict[str, Any], repeats: int, step: StepCallback) -> dict[str, Any]:
    step and step("resume: process start to first step")
    path = Path(saves["checkpoint_path"])
    run = path.parent.parent
    size = str(saves["state_bytes"])

    def child(mode: str, target: Path) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _RESUME_CHILD, mode, str(target), size], check=True, capture_output=True)
        return time.perf_counter() - start

    resume = statistics.median(child("resume", run) for _ in range(repeats))
    plain = statistics.median(child("plain", Path(saves["plain_path"])) for _ in range(repeats))
    return {"resume_s": resume, "plain_load_s": plain}


def _ratios(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def safe(a: float | None, b: float | None) -> float | None:
        if a is None or b is None or b == 0:
            return None
        return a / b

    def rss_above_baseline(key: str) -> float | None:
        return None if key not in m else max(0, m[key] - m["baseline_peak_rss_bytes"])

    values = {
        "stall_vs_dcp_async": safe(m.get("stall_s"), m.get("dcp_async_blocking_s")),
        "stall_vs_sync_save": safe(m.get("stall_s"), m.get("sync_save_s")),
        "background_save_vs_raw_write": safe(m.get("raw_write_s"), m.get("background_save_s")),
        "verify_vs_cold_read": safe(m.get("cold_read_s"), m.get("verify_s")),
        "verify_rss_vs_file": safe(rss_above_baseline("verify_peak_rss_bytes"), m.get("checkpoint_bytes")),
        "restore_vs_cp": safe(m.get("cp_fsync_s"), m.get("restore_s")),
        "ls_vs_import": safe(m.get("ls_large_s"), m.get("import_typer_rich_humanize_s")),
        "ls_large_vs_small": safe(m.get("ls_large_s"), m.get("ls_small_s")),
        "help_vs_import": safe(m.get("help_s"), m.get("import_typer_rich_humanize_s")),
        "resume_vs_plain_load": safe(m.get("resume_s"), m.get("plain_load_s")),
        "scale_verify_rss_vs_file": safe(rss_above_baseline("scale_verify_peak_rss_bytes"), m.get("scale_bytes")),
        **_dedup_ratios(m, safe),
        "parallel_stall_vs_dcp_async": safe(m.get("parallel_stall_s"), m.get("parallel_dcp_async_blocking_s")),
        "parallel_write_vs_raw": safe(_per_second(m, "parallel_written_bytes", "parallel_write_s"), _per_second(m, "parallel_raw_bytes", "parallel_raw_write_s")),
    }
    out = {}
    for name, goal, direction, what in GOALS:
        value = values[name]
        ok = None if value is None else (value <= goal if direction == "<=" else value >= goal)
        out[name] = {"value": value, "goal": goal, "direction": direction, "ok": ok, "what": what}
    return out


def _per_second(m: dict[str, Any], bytes_key: str, seconds_key: str) -> float | None:
    """Bytes per second from two measurements (None when either is missing or the time is 0)."""
    done, seconds = m.get(bytes_key), m.get(seconds_key)
    return None if done is None or not seconds else done / seconds


def _dedup_ratios(m: dict[str, Any], safe: Callable[[Any, Any], float | None]) -> dict[str, float | None]:
    out = {}
    for case in ("frozen_component", "frozen_base"):
        bound = m.get(f"dedup_{case}_bound_bytes")
        out[f"dedup_disk_{case}"] = safe(m.get(f"dedup_{case}_disk_bytes"), bound)
        out[f"dedup_mirror_{case}"] = safe(m.get(f"dedup_{case}_mirror_bytes"), bound)
    out["upload_per_save_vs_trainable"] = safe(m.get("dedup_frozen_component_upload_per_save_bytes"), m.get("dedup_frozen_component_trainable_bytes"))
    return out


def recommend_save_every(stall_s: float, batch_time_s: float, budget: float = 0.01) -> int:
    """The smallest ``--save-every`` (batches) keeping the training stall under ``budget`` of training time."""
    if batch_time_s <= 0:
        raise ValueError("batch time must be positive")
    return max(1, math.ceil(stall_s / (budget * batch_time_s)))


@dataclass(frozen=True)
class BenchReport:
    """What ``bench`` measured: raw timings and bytes, each ratio against its goal, and the ``--save-every`` advice."""

    size_bytes: int
    measurements: dict[str, Any]
    ratios: dict[str, dict[str, Any]]
    recommendation: dict[str, Any] | None

    ok: ClassVar[bool] = True  # a goal missed is reported, not a failure

    def to_json(self) -> dict[str, Any]:
        """The ``bench --json`` document."""
        return {"size_bytes": self.size_bytes, "measurements": self.measurements, "ratios": self.ratios, "recommendation": self.recommendation}


def _bench_single(work: Path, size_bytes: int, drive: Path | None, repeats: int, sections: tuple[str, ...], step: StepCallback) -> dict[str, Any]:
    """The single-process sections: save (always: the others use its checkpoint), then those of ``sections``."""
    saves = _bench_saves(work, size_bytes, repeats, step)
    out = dict(saves)
    if "verify" in sections:
        out.update(_bench_verify(saves, repeats, step))
    if "restore" in sections:
        out.update(_bench_restore(work, saves, drive, repeats, step))
    if "cli" in sections:
        out.update(_bench_cli(work, repeats, step))
    if "resume" in sections:
        out.update(_bench_resume(saves, repeats, step))
    if "dedup" in sections:
        from ckptctl.bench_dedup import bench_dedup

        out.update(bench_dedup(work, step))
    for key in ("checkpoint_path", "checkpoint_checksum", "checkpoint_files", "plain_path"):
        out.pop(key, None)
    return out


def run_bench(
    size_bytes: int = 1 << 30,
    *,
    drive: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    repeats: int = 3,
    batch_time_s: float = 0.5,
    sections: tuple[str, ...] = ("save", "verify", "restore", "cli", "resume", "dedup"),
    nproc: int = 2,
    on_step: StepCallback = None,
) -> BenchReport:
    """Run the benchmark and report its measurements, ratios and advice.

    Works in a temporary folder under ``workdir`` (default: the system temp dir) that is
    removed afterwards; ``drive`` is where the Drive mirror part copies to and from.
    ``"parallel"`` in ``sections`` adds a torchrun job of ``nproc`` ranks
    (:mod:`ckptctl.bench_parallel`); on its own it runs without the save section, and the
    advice then uses its stall.
    """
    if size_bytes < 1024:
        raise ValueError("size must be at least 1 KiB")
    work = Path(tempfile.mkdtemp(prefix="ckptctl-bench-", dir=workdir))
    measurements: dict[str, Any] = {"size_bytes": size_bytes}
    try:
        if sections == ("scale",):  # on its own: a state this large leaves no room for the anchors' copies
            measurements.update(_bench_scale(work, size_bytes, on_step))
            return BenchReport(size_bytes, measurements, _ratios(measurements), None)
        if any(section != "parallel" for section in sections):
            measurements.update(_bench_single(work, size_bytes, Path(drive) if drive else None, repeats, sections, on_step))
        if "parallel" in sections:
            from ckptctl.bench_parallel import bench_parallel

            measurements.update(bench_parallel(work / "parallel", size_bytes, repeats, nproc, on_step))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stall = measurements["stall_s"] if "stall_s" in measurements else measurements["parallel_stall_s"]
    advice = {"batch_time_s": batch_time_s, "save_every": recommend_save_every(stall, batch_time_s), "stall_s": stall}
    return BenchReport(size_bytes, measurements, _ratios(measurements), advice)
