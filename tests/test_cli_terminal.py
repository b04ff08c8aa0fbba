"""Output where users run ckptctl: pipes, notebook cells, NO_COLOR, `| head`, a terminal of 80 columns.

Real files and real processes: a checkpoint torch refuses for a numpy scalar, ckptctl on a
pseudo-terminal of a chosen size, and pipes whose reader has gone.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptctl.cli import app
from tests.cli_helpers import REPO, ckptctl_cmd, invoke
from tests.damage import replace_indexed_file
from tests.runs import write_run

#: torch's words for a numpy scalar it will not unpickle (numpy 2 has ``numpy._core``, numpy 1 ``numpy.core``).
NUMPY_CAUSE = re.compile(r"Unsupported global: GLOBAL numpy\.(_core|core)\.multiarray\.scalar was not an allowed global by default")


def _env(**extra: str) -> dict[str, str]:
    """The environment of a ckptctl child: this checkout, no COLUMNS or NO_COLOR from the test's own shell."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR", "LINES")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _ckptctl(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """ckptctl in a real process, stdout and stderr pipes (no terminal)."""
    return subprocess.run([*ckptctl_cmd(), *args], capture_output=True, text=True, cwd=cwd, env=_env(**env), timeout=120)


def _on_terminal(args: list[str], cwd: Path, columns: int = 80, **env: str) -> tuple[int, str]:
    """ckptctl with stdin/stdout/stderr on a pseudo-terminal ``columns`` wide; (exit code, everything it drew)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # child: never return into pytest
        try:
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
            os.chdir(cwd)
            cmd = ckptctl_cmd() + args
            os.execve(cmd[0], cmd, _env(TERM="xterm", **env))
        finally:
            os._exit(127)
    output = b""
    while select.select([fd], [], [], 60)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def _numpy_scalar_run(tmp_path: Path) -> Path:
    """A run whose checkpoint 1 holds a numpy scalar (saved the ordinary way): weights_only refuses it."""
    import numpy as np
    import torch

    run = write_run(tmp_path / "runs", "run_a", n=3)
    buf = io.BytesIO()
    torch.save({"epoch": 0, "batch": 1, "global_step": 2, "metrics": {"loss": np.float64(0.5)}}, buf)
    replace_indexed_file(run, 1, buf.getvalue())
    return run


# --------------------------------------------------------------------------- 1. causes, whole and plain


def test_unsafe_detail_is_torchs_cause_without_escapes(tmp_path):
    _numpy_scalar_run(tmp_path)
    as_json = _ckptctl("verify", "--json", cwd=tmp_path)
    assert as_json.returncode == 1, as_json.stderr
    detail = {r["id"]: r for r in json.loads(as_json.stdout)["results"]}[1]
    assert detail["status"] == "unsafe"
    assert NUMPY_CAUSE.search(detail["detail"]), detail["detail"]
    assert detail["detail"].startswith("checkpoint_00001.pt: refuses to run pickled code: Unsupported global")
    for args, env in ((["verify"], {}), (["verify"], {"NO_COLOR": "1"}), (["show", "runs/run_a", "1"], {})):
        proc = _ckptctl(*args, cwd=tmp_path, **env)
        assert proc.returncode == 1, (args, proc.stderr)
        assert "\x1b" not in proc.stdout + proc.stderr, (args, env)
        assert re.search(r"GLOBAL numpy\.(_core|core)\.multiarray\.scalar\b", proc.stdout + proc.stderr), proc.stdout + proc.stderr
    shown = _ckptctl("show", "runs/run_a", "1", cwd=tmp_path)
    assert shown.stderr.count("\n") == 1 and NUMPY_CAUSE.search(shown.stderr), shown.stderr


class LongNamedThing:
    """Stands for a class of the user's with a long dotted name (its name is lengthened below)."""


LONG_NAME = "ThingWithAVeryLongName" + "X" * 240
LongNamedThing.__name__ = LongNamedThing.__qualname__ = LONG_NAME
globals()[LONG_NAME] = LongNamedThing


def test_a_refused_global_is_named_whole_even_when_long(tmp_path):
    import torch

    run = write_run(tmp_path / "runs", "run_a", n=2)
    buf = io.BytesIO()
    torch.save({"epoch": 0, "batch": 1, "global_step": 2, "metrics": {}, "thing": LongNamedThing()}, buf)
    replace_indexed_file(run, 1, buf.getvalue())
    result = invoke("verify", "--json")
    detail = {r["id"]: r for r in json.loads(result.stdout)["results"]}[1]["detail"]
    assert f"Unsupported global: GLOBAL {__name__}.{LONG_NAME} was not an allowed global" in detail, detail


def test_error_lines_carry_no_escapes():
    from ckptctl.core.messages import load_failure_cause, one_line
    from ckptctl.exit_codes import error_line

    assert error_line(ValueError("\x1b[1mbold\x1b[0m\n  next"))[0].endswith("unexpected ValueError: bold next (set CKPTCTL_DEBUG=1 for the traceback)")
    assert one_line("a\x1b]8;;http://x\x07link\x1b]8;;\x07 b\x1b[31m") == "alink b"
    assert load_failure_cause("first\nsecond") == "first"
    long_word = "n" * 500
    assert load_failure_cause(f"bad {long_word}") in (f"bad {long_word}", "bad …")  # cut at a word, never inside one


# --------------------------------------------------------------------------- 2. widths


def _lines_without(paths: list[str], text: str) -> list[str]:
    """The lines of ``text`` that hold none of ``paths`` and are not the header rule (those are as wide as the paths)."""
    return [line for line in text.splitlines() if not any(p in line for p in paths) and set(line) - set("━╇")]


@pytest.mark.parametrize("columns", [60, 80, 200])
def test_verify_follows_columns_and_keeps_paths_whole(tmp_path, columns):
    _numpy_scalar_run(tmp_path)
    proc = _ckptctl("verify", cwd=tmp_path, COLUMNS=str(columns))
    paths = [r["path"] for r in json.loads(_ckptctl("verify", "--json", cwd=tmp_path).stdout)["results"]]
    lines = proc.stdout.splitlines()
    for path in paths:  # every path whole on one line of its own row
        assert any(path in line for line in lines), (path, proc.stdout)
    assert all(len(line) <= columns for line in _lines_without(paths, proc.stdout)), proc.stdout
    detail = [line for line in lines if "refuses to run" in line][0]
    if columns == 200:  # the detail takes the room it is given
        assert NUMPY_CAUSE.search(detail), proc.stdout


def test_piped_output_without_columns_is_80_wide(tmp_path):
    _numpy_scalar_run(tmp_path)
    proc = _ckptctl("verify", cwd=tmp_path)
    assert proc.returncode == 1
    assert max(len(line) for line in _lines_without(["runs/run_a/"], proc.stdout)) <= 80, proc.stdout
    assert "refuses to run pickled code:" in proc.stdout


def test_on_an_80_column_terminal_no_path_is_split(tmp_path):
    _numpy_scalar_run(tmp_path)
    code, out = _on_terminal(["verify"], tmp_path, columns=80)
    assert code == 1, out
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    for n in range(3):
        assert f"runs/run_a/checkpoints/checkpoint_{n:05d}.pt" in plain, out
    assert "\x1b[35munsafe" in out  # a colour terminal gets colour


def test_diff_on_a_narrow_terminal_keeps_tensor_and_metric_names_whole(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=3)
    report = json.loads(invoke("diff", "runs/run_a:0", "runs/run_a:2", "--json").stdout)
    names = [t["name"] for t in report["tensors"] if t["status"] != "same"] + list(report["a"]["metrics"])
    assert any(len(name) > 20 for name in names)
    code, out = _on_terminal(["diff", "runs/run_a:0", "runs/run_a:2"], tmp_path, columns=40)
    assert code == 1, out
    for name in names:
        assert re.search(rf"(^|\n){re.escape(name)} ", out), (name, out)


# --------------------------------------------------------------------------- 3. terminals without colour (no progress bar either)


def test_no_color_on_a_terminal_writes_no_escape_at_all(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=2)
    for args in (["verify"], ["ls"], ["show", "runs/run_a"], ["diff", "runs/run_a:0", "runs/run_a:1"], ["resume-info", "runs/run_a"]):
        code, out = _on_terminal(args, tmp_path, NO_COLOR="1")
        assert code in (0, 1) and "run_a" in out, (args, out)
        assert "\x1b" not in out, (args, out)


# --------------------------------------------------------------------------- 4. broken pipes


def _into_closed_pipe(*args: str, cwd: Path) -> tuple[int, str]:
    """Run ckptctl with stdout a pipe whose reader is already gone (as after ``| head`` has exited)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*ckptctl_cmd(), *args], stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=cwd, env=_env(), timeout=120)
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    "args",
    [["ls"], ["ls", "--json"], ["verify"], ["verify", "--json"], ["show", "runs/run_a"], ["show", "runs/run_a", "--json"],
     ["diff", "--json", "runs/run_a:0", "runs/run_a:0"], ["diff", "--all", "runs/run_a:0", "runs/run_a:0"], ["show", "--help"]],
)
def test_a_closed_pipe_ends_quietly_with_the_commands_own_code(tmp_path, args):
    write_run(tmp_path / "runs", "run_a", n=2)
    assert _into_closed_pipe(*args, cwd=tmp_path) == (0, "")


def test_verify_into_a_closed_pipe_still_reports_problems_by_its_exit_code(tmp_path):
    _numpy_scalar_run(tmp_path)
    assert _into_closed_pipe("verify", cwd=tmp_path) == (1, "")


def test_into_head_in_a_shell_pipeline(tmp_path):
    """``ckptctl … | head``: ``head -n 0`` has gone before ckptctl writes; ``head -n 1`` of a listing larger than a pipe holds."""
    run = write_run(tmp_path / "runs", "run_000", n=2)
    for i in range(1, 120):
        shutil.copytree(run, tmp_path / "runs" / f"run_{i:03d}")
    assert len(_ckptctl("ls", cwd=tmp_path).stdout.encode()) > 65536  # more than a pipe holds
    cli = " ".join(map(shlex.quote, ckptctl_cmd()))
    for args, head in (("ls", "head -n 0"), ("ls --json", "head -n 0"), ("ls", "head -n 1"), ("verify runs/run_000", "head -n 0")):
        script = f"set -o pipefail; {cli} {args} | {head}"
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
        assert (proc.returncode, proc.stderr) == (0, ""), (args, head, proc.stderr)
        assert proc.stdout.count("\n") == int(head[-1])


# --------------------------------------------------------------------------- 5. usage lines


@pytest.mark.parametrize(
    "command, usage",
    [("show", "PATH [ID]"), ("promote", "RUN [ID]"), ("diff", "A B"), ("ls", "[PATH]"), ("verify", "[PATH]"), ("backup", "[PATH]")],
)
def test_usage_lines_name_arguments_plainly(command, usage):
    first = invoke(command, "--help").stdout.splitlines()[0]
    assert first == f"Usage: ckptctl {command} [OPTIONS] {usage}"


def test_no_usage_line_has_braces_or_lowercase_arguments():
    for command in sorted(c.name for c in app.registered_commands):
        first = invoke(command, "--help").stdout.splitlines()[0]
        assert "{" not in first and not re.search(r"\[[a-z]", first.split("[OPTIONS]")[1]), first
    missing = invoke("show")
    assert missing.exit_code == 2 and "Missing argument 'PATH'" in missing.stderr


# --------------------------------------------------------------------------- 6. start-up without pydantic

_PROBE = """
import sys
from ckptctl.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
sys.stderr.write("IMPORTED=%s\\n" % ",".join(m for m in ("torch", "pydantic") if m in sys.modules))
sys.exit(code)
"""


def test_ls_and_help_import_neither_pydantic_nor_torch(tmp_path):
    """typer 0.29 coerces values with pydantic (~0.2 s); ckptctl's typer classes keep it off these paths."""
    write_run(tmp_path / "runs", "run_a", n=2)
    for args in (["ls"], ["ls", "runs", "--json"], ["--help"], ["ls", "--help"], ["show", "--help"], ["--version"]):
        proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
        assert proc.returncode == 0, (args, proc.stderr)
        assert proc.stderr.splitlines()[-1] == "IMPORTED=", (args, proc.stderr)


def test_plain_values_convert_as_typer_does(tmp_path):
    from ckptctl.typer_app import PlainValue

    assert PlainValue(Path).coerce("runs/x") == Path("runs/x")
    assert PlainValue(Path).coerce(os.fsencode("run_\udcff")) == Path("run_\udcff")
    assert PlainValue(str).coerce(None) is None
    assert PlainValue(bool).coerce("yes") is True and PlainValue(bool).coerce("0") is False
    result = invoke("ls", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "nowhere" in result.stderr
