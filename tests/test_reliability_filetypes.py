"""Things at a run's paths that are not regular files, and names that only look like checkpoints.

A FIFO, a character device, a Unix socket, a directory, or a symlink to any of them, put
where a checkpoint, the best model, the log or a metadata file belongs (and odd names in
``checkpoints/``): every command and the library finish (a FIFO opened the ordinary way
blocks forever), exit 0/1/2 with one ``Error:`` line and no traceback, and no file that a
retained index entry needs is deleted or changed.

Every command runs in its own process with a timeout. To keep torch's import (seconds on
a busy machine) out of each one, a driver process imports everything once and forks one
child per command; a few cases also run through the real ``ckptctl`` executable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptctl.torch_io import safe_load
from tests.cli_helpers import REPO, ckptctl_cmd
from tests.runs import ckpt, fresh_components, write_run

CASE_TIMEOUT_S = 30.0

PLACES = [
    "checkpoints/checkpoint_00001.pt",
    "best_model.pt",
    "training.log",
    "checkpoint_metadata.json",
    "best_metadata.json",
    "training_state.json",
]
BASE_KINDS = ["regular", "fifo", "chardev", "socket", "directory"]
KINDS = BASE_KINDS + [f"symlink-{k}" for k in BASE_KINDS]

#: Names in checkpoints/ that look like a checkpoint's but are not (trailing newline, other
#: digits, a non-UTF-8 byte, as os.listdir decodes it).
ODD_NAMES = [
    "checkpoints/checkpoint_00002.pt\n",
    "checkpoints/checkpoint_00003.pt\r",
    "checkpoints/checkpoint_00001.pt ",
    "checkpoints/checkpoint_\u0660\u0660\u0660\u0660\u0663.pt",
    os.fsdecode(b"checkpoints/checkpoint_00003.pt\xff"),
    os.fsdecode(b"checkpoints/checkpoint_\xff\xfe.pt"),
]

#: name -> argv template ({run}, {drive}, {dest} filled in per case).
COMMANDS = {
    "ls": ["ls", "{run}"],
    "ls-json": ["ls", "--json", "{run}"],
    "verify": ["verify", "{run}"],
    "show": ["show", "{run}"],
    "resume-info": ["resume-info", "{run}"],
    "prune": ["prune", "{run}", "--keep", "1", "--yes"],
    "promote": ["promote", "{run}", "2"],
    "diff": ["diff", "{run}:2", "{run}:best"],
    "backup": ["backup", "{run}", "--drive", "{drive}"],
    # the odd file is on the mirror for these two
    "backup-to-odd-mirror": ["backup", "{run}", "--drive", "{drive}"],
    "restore": ["restore", "--from-drive", "--drive", "{drive}", "--run", "run_a", "--to", "{dest}"],
    "library": [],  # ModelPersistence: open, resume, append_log, close
}
ON_MIRROR = {"backup-to-odd-mirror", "restore"}


def _mknod_works() -> bool:
    probe = Path(f"/tmp/.ckptctl-mknod-probe-{os.getpid()}")
    try:
        os.mknod(probe, 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:
        return False
    probe.unlink()
    return True


MKNOD = _mknod_works()


# --------------------------------------------------------------------------- planting odd files


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _make(path: Path, kind: str) -> None:
    if kind == "regular":
        path.write_bytes(b"not what belongs here\n")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    elif kind == "socket":
        cwd = os.getcwd()  # bind by a short relative name: a socket path is limited to ~108 bytes
        os.chdir(path.parent)
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(path.name)
        finally:
            os.chdir(cwd)
    elif kind == "directory":
        path.mkdir()
    else:
        raise ValueError(kind)


def plant(path: Path, kind: str) -> None:
    """Put a ``kind`` at ``path`` (what was there goes); a ``symlink-X`` points to an X next to it."""
    _remove(path)
    if kind.startswith("symlink-"):
        target = path.with_name(f"odd-target-{len(os.fsencode(path.name))}")
        _make(target, kind[len("symlink-"):])
        os.symlink(target.name, path)
    else:
        _make(path, kind)


# --------------------------------------------------------------------------- the driver (a child process)


def _hash(path: Path) -> str | None:
    """Checksum of a regular file (never opens anything else), None otherwise."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    from ckptctl.storage.atomic import hash_file

    return hash_file(path)[1]


def _read_json(path: Path):
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _lost_files(run: Path, before: dict[str, str]) -> list[str]:
    """Files a retained index entry (or the best record) needs that are gone or changed."""
    lost = []
    index = _read_json(run / "checkpoint_metadata.json")
    entries = index.get("checkpoints", []) if isinstance(index, dict) else []
    for entry in entries:
        rel = entry.get("path") if isinstance(entry, dict) else None
        if rel in before and _hash(run / rel) != before[rel]:
            lost.append(f"{rel} (index entry {entry.get('id')})")
    newest = "checkpoints/checkpoint_00002.pt"  # the newest that verifies: never deleted, never changed
    if newest in before and _hash(run / newest) != before[newest]:
        lost.append(newest)
    if "best_model.pt" in before and _hash(run / "best_model.pt") not in (before["best_model.pt"], before.get(newest)):
        lost.append("best_model.pt")
    return lost


def _library(run: Path) -> None:
    from ckptctl import ModelPersistence

    p = ModelPersistence(run, background=False)
    try:
        info = p.resume(**fresh_components())
        print(json.dumps({"resumed": info and info["checkpoint_id"], "skipped": info and info.get("skipped")}))
        p.append_log("a line from the file-type fuzz test")
    finally:
        p.close()


def _child(argv: list[str], run: Path, out: Path, err: Path) -> None:
    """In the forked child: run one command with stdout/stderr going to files; never returns."""
    code = 3
    try:
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        if argv:
            from ckptctl.cli import main

            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:
            from ckptctl.errors import CkptctlError

            try:
                _library(run)
                code = 0
            except CkptctlError as exc:
                print(f"Error: {exc}", file=sys.stderr)
                code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 3
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run_case(case: dict, base: Path, work: Path) -> dict:
    here = work / f"case{case['n']}"
    runs, drive, dest = here / "runs", here / "drive", here / "dest"
    run = runs / "run_a"
    shutil.copytree(base / "runs" / "run_a", run, symlinks=True)
    if case["command"] in ON_MIRROR:
        shutil.copytree(base / "drive", drive, symlinks=True)
        plant(drive / "run_a" / case["place"], case["kind"])
    else:
        drive.mkdir()
        plant(run / case["place"], case["kind"])
    good = ["checkpoints/checkpoint_00000.pt", "checkpoints/checkpoint_00001.pt", "checkpoints/checkpoint_00002.pt", "best_model.pt"]
    before = {rel: _hash(base / "runs" / "run_a" / rel) for rel in good if rel != case["place"]}
    names = {"run": str(run), "drive": str(drive), "dest": str(dest)}
    argv = [a.format(**names) for a in COMMANDS[case["command"]]]
    out, err = here / "stdout", here / "stderr"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(argv, run, out, err)
    deadline = time.monotonic() + CASE_TIMEOUT_S
    rc = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    lost = _lost_files(run, before)
    if case["command"] == "restore" and rc == 0:
        lost += [f"restored {x}" for x in _lost_files(dest / "run_a", before)]
    result = {
        **case,
        "argv": argv,
        "rc": rc,
        "stdout": out.read_text(errors="replace")[-2000:] if out.exists() else "",
        "stderr": err.read_text(errors="replace")[-4000:] if err.exists() else "",
        "lost": lost,
    }
    shutil.rmtree(here, ignore_errors=True)
    return result


def driver_main(spec_path: str) -> None:
    """Entry point of the driver process: run every case of the spec, one JSON line per result."""
    import torch  # imported once here, before any fork

    import ckptctl.cli  # noqa: F401
    import ckptctl.ops  # noqa: F401
    import ckptctl.persistence  # noqa: F401
    import ckptctl.storage.restore  # noqa: F401

    # The first optimizer imports torch's compiler stack (seconds): once here, not in every child.
    # Tiny tensors only: nothing runs on a thread pool that a fork would leave broken.
    torch.optim.Adam(torch.nn.Linear(1, 1).parameters())
    spec = json.loads(Path(spec_path).read_text())
    base, work = Path(spec["base"]), Path(spec["work"])
    with open(spec["results"], "a", encoding="utf-8") as results:
        for case in spec["cases"]:
            results.write(json.dumps(_run_case(case, base, work)) + "\n")
            results.flush()


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A real small run (checkpoints 0-2, best = 2, a log and a training state) and its Drive mirror."""
    from ckptctl.storage.restore import backup_run

    root = tmp_path_factory.mktemp("filetypes_base")
    run = write_run(root / "runs", "run_a", n=3, state={"status": "running"}, log="started")
    (root / "drive").mkdir()
    backup_run(run, root / "drive")
    assert (root / "drive" / "run_a" / "best_model.pt").is_file()
    return root


def _drive(base: Path, tmp_path: Path, cases: list[tuple[str, str, str]]) -> list[dict]:
    spec = {
        "base": str(base),
        "work": str(tmp_path / "work"),
        "results": str(tmp_path / "results.jsonl"),
        "cases": [{"n": n, "place": p, "kind": k, "command": c} for n, (p, k, c) in enumerate(cases)],
    }
    (tmp_path / "work").mkdir()
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CKPTCTL_DEBUG", None)
    code = "import sys; from tests.test_reliability_filetypes import driver_main; driver_main(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "spec.json")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60 + len(cases) * CASE_TIMEOUT_S,
    )
    results_file = tmp_path / "results.jsonl"
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    assert proc.returncode == 0 and len(results) == len(cases), proc.stderr[-3000:]
    return results


def _problems(result: dict) -> list[str]:
    """What is wrong with one case's outcome (empty: fine)."""
    what = f"{result['command']} with a {result['kind']} at {result['place']!r}"
    if result["rc"] is None:
        return [f"{what}: still running after {CASE_TIMEOUT_S:.0f} s (hangs)"]
    found = []
    stderr = result["stderr"]
    if result["rc"] not in (0, 1, 2):
        found.append(f"{what}: exit {result['rc']}")
    if "Traceback" in stderr:
        found.append(f"{what}: traceback: {stderr[-1500:]}")
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    if len(errors) > 1:
        found.append(f"{what}: {len(errors)} Error lines: {errors}")
    if result["rc"] == 2 and not errors:
        found.append(f"{what}: exit 2 without an Error line: {stderr[-500:]}")
    if result["lost"]:
        found.append(f"{what}: needed files lost or changed: {result['lost']}")
    if result["command"] == "library" and result["rc"] == 0:
        outcome = json.loads(result["stdout"].strip().splitlines()[-1])
        if outcome["resumed"] != 2:
            found.append(f"{what}: resumed {outcome['resumed']}, not the newest good checkpoint 2")
    return found


def _check(results: list[dict]) -> None:
    problems = [p for r in results for p in _problems(r)]
    assert not problems, "\n".join(problems)


def _all_commands(places_kinds: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    return [(place, kind, command) for place, kind in places_kinds for command in COMMANDS]


#: The fast subset: a FIFO at each interesting place, a symlink to one, a FIFO with a trailing-newline name.
FAST = [(place, "fifo") for place in PLACES] + [
    ("checkpoints/checkpoint_00001.pt", "symlink-fifo"),
    ("checkpoints/checkpoint_00002.pt\n", "fifo"),
]


def test_a_fifo_anywhere_in_a_run_never_hangs_a_command_or_the_library(base, tmp_path):
    """Every command and the library, each in a child with a timeout, on the fast subset of cases."""
    results = _drive(base, tmp_path, _all_commands(FAST))
    _check(results)
    by = {(r["place"], r["kind"], r["command"]): r for r in results}
    for place, kind in (("checkpoints/checkpoint_00001.pt", "fifo"), ("best_model.pt", "fifo"), ("checkpoints/checkpoint_00001.pt", "symlink-fifo")):
        verify = by[(place, kind, "verify")]
        assert verify["rc"] == 1 and "1 corrupt" in verify["stdout"], verify
    log = by[("training.log", "fifo", "library")]
    assert log["rc"] == 1 and "training.log: not a regular file (FIFO)" in log["stderr"], log
    # a name with a trailing newline is not checkpoint 2: nothing about it reaches the output
    newline = by[("checkpoints/checkpoint_00002.pt\n", "fifo", "verify")]
    assert newline["rc"] == 0, newline


@pytest.mark.slow
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.root_only) if "chardev" in k else k for k in KINDS])  # mknod
def test_every_file_type_at_every_place_with_every_command(base, tmp_path, kind):
    if "chardev" in kind and not MKNOD:
        pytest.skip("mknod is not allowed here")
    cases = [(place, kind) for place in PLACES if (place, kind) not in FAST]
    if kind in ("regular", "fifo", "socket", "symlink-fifo"):
        cases += [(name, kind) for name in ODD_NAMES if (name, kind) not in FAST]
    _check(_drive(base, tmp_path, _all_commands(cases)))


def _real_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CKPTCTL_DEBUG", None)
    return subprocess.run([*ckptctl_cmd(), *args], capture_output=True, text=True, env=env, timeout=90)


def test_the_real_ckptctl_refuses_a_fifo_checkpoint_in_one_line(base, tmp_path):
    """Through the installed entry point, with a timeout: verify reports it, promote refuses it, prune goes on."""
    run = tmp_path / "run_a"
    shutil.copytree(base / "runs" / "run_a", run, symlinks=True)
    plant(ckpt(run, 1), "fifo")
    newest = (ckpt(run, 2)).read_bytes()
    verify = _real_cli("verify", str(run), "--json")
    assert verify.returncode == 1, verify.stderr
    rows = {r["id"]: r for r in json.loads(verify.stdout)["results"]}
    assert rows[1]["status"] == "corrupt" and "not a regular file (FIFO)" in rows[1]["detail"]
    assert {rows[i]["status"] for i in (0, 2, None)} == {"ok"}
    promote = _real_cli("promote", str(run), "1")
    assert promote.returncode == 1 and "Traceback" not in promote.stderr
    assert promote.stderr.strip().splitlines()[-1] == f"Error: {ckpt(run, 1)}: not a regular file (FIFO)"
    prune = _real_cli("prune", str(run), "--keep", "1", "--yes")
    assert prune.returncode == 0 and "Traceback" not in prune.stderr, prune.stderr
    assert "checkpoint 1: checkpoints/checkpoint_00001.pt: not a regular file; refusing to delete" in prune.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint_00001.pt", "checkpoint_00002.pt"]
    assert ckpt(run, 2).read_bytes() == newest


def test_resume_skips_a_fifo_newest_checkpoint_like_a_damaged_one(base, tmp_path):
    """In a child with a timeout: resume continues from checkpoint 1, reporting 2 as not a regular file."""
    run = tmp_path / "run_a"
    shutil.copytree(base / "runs" / "run_a", run, symlinks=True)
    for kind_path, kind in ((ckpt(run, 2), "fifo"), (run / "best_model.pt", "symlink-fifo")):
        plant(kind_path, kind)
    probe = (
        "import json, sys, torch\n"
        "from ckptctl import ModelPersistence\n"
        "m = torch.nn.Linear(4, 2); o = torch.optim.Adam(m.parameters(), lr=1e-2)\n"
        "with ModelPersistence(sys.argv[1], background=False) as p:\n"
        "    info = p.resume(agent=m, optimizer=o)\n"
        "print(json.dumps({'id': info['checkpoint_id'], 'skipped': info['skipped']}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True, text=True, env=env, timeout=90)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["id"] == 1
    assert [s["checkpoint_id"] for s in out["skipped"]] == [2]
    assert "not a regular file (FIFO)" in out["skipped"][0]["reason"]
    assert stat.S_ISFIFO(os.stat(ckpt(run, 2)).st_mode)  # reported, left where it is


def test_a_trailing_newline_name_does_not_shadow_checkpoint_2_after_an_index_rebuild(base, tmp_path):
    """``checkpoint_00002.pt\\n`` holding checkpoint 0's bytes: the rebuilt index's 2 is the real file."""
    import torch

    from ckptctl import ModelPersistence
    from ckptctl.storage.scan import checkpoint_files_on_disk, checkpoint_names_present

    run = tmp_path / "run_a"
    shutil.copytree(base / "runs" / "run_a", run, symlinks=True)
    shadow = run / "checkpoints" / "checkpoint_00002.pt\n"
    shutil.copyfile(ckpt(run, 0), shadow)
    (run / "checkpoint_metadata.json").unlink()
    assert checkpoint_files_on_disk(run) == {i: ckpt(run, i) for i in range(3)}
    assert checkpoint_names_present(run) == {0, 1, 2}
    real = safe_load(ckpt(run, 2))
    with ModelPersistence(run, background=False) as p:
        assert p.checkpoints[2]["path"] == "checkpoints/checkpoint_00002.pt"
        components = fresh_components()
        info = p.resume(**components)
    assert info["checkpoint_id"] == 2 and info["global_step"] == real["global_step"]
    assert torch.equal(components["agent"].weight, real["agent"]["weight"])
    assert shadow.exists()  # not ours: left alone
