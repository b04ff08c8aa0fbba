"""The CLI's outer contract: real subprocesses, no torch for --help/ls, one-line errors, docs and completions in step."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptctl.cli import app
from ckptctl.completions_gen import FILES, completion_script
from tests.cli_helpers import REPO, ckptctl_cmd, invoke, modules_imported_by, run_cli
from tests.damage import flip_byte
from tests.format_helpers import stored_packs
from tests.runs import ckpt, write_run

COMMANDS = sorted(c.name for c in app.registered_commands)

_NO_TORCH_WRAPPER = """
import sys
from ckptctl.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
sys.stderr.write("TORCH_IMPORTED=%s\\n" % ("torch" in sys.modules))
sys.exit(code)
"""


def _without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _NO_TORCH_WRAPPER, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )


def test_expected_commands():
    assert COMMANDS == sorted(["ls", "verify", "show", "resume-info", "prune", "promote", "restore", "backup", "diff", "export", "bench"])


def test_help_and_ls_do_not_import_torch(tmp_path):
    write_run(tmp_path / "runs", "run_a", n=2)
    for args in (["--help"], ["ls"], ["ls", "--json"], ["ls", "--help"], ["prune", "--help"], ["bench", "--help"]):
        proc = _without_torch(*args)
        assert proc.returncode == 0, proc.stderr
        assert "TORCH_IMPORTED=False" in proc.stderr, args
    ls = _without_torch("ls", "--json")
    assert [c["id"] for c in json.loads(ls.stdout)["runs"][0]["checkpoints"]] == [0, 1]
    # the control: a command that loads checkpoints does import torch, so the probe can fail
    assert "TORCH_IMPORTED=True" in _without_torch("verify").stderr


def test_installed_console_script_end_to_end(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=3)
    ls = run_cli("ls", "runs", "--json", cwd=tmp_path)
    assert ls.returncode == 0, ls.stderr
    assert json.loads(ls.stdout)["runs"][0]["name"] == "run_a"
    assert run_cli("verify", cwd=tmp_path).returncode == 0
    flip_byte(ckpt(run, 1))
    bad = run_cli("verify", "--json", cwd=tmp_path)
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False
    dry = run_cli("prune", "--keep", "1", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and len(list((run / "checkpoints").iterdir())) == 3
    refused = run_cli("prune", "--keep", "1", cwd=tmp_path)  # stdin is not a terminal
    assert refused.returncode == 1 and "--yes" in refused.stderr


def test_errors_are_one_line_without_traceback(tmp_path, make_run):
    make_run(n=1, corrupt=[0])
    for args, code in ((["ls", "missing"], 2), (["show", "runs/run_a"], 1), (["verify", "missing"], 2)):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_debug_variable_shows_the_traceback(tmp_path, make_run):
    make_run(n=1, corrupt=[0])
    proc = run_cli("show", "runs/run_a", cwd=tmp_path, env={"CKPTCTL_DEBUG": "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "CheckpointIntegrityError" in proc.stderr


def test_unknown_command_and_flag_exit_2():
    assert invoke("frobnicate").exit_code == 2
    assert invoke("ls", "--nope").exit_code == 2
    assert invoke("--version").stdout.startswith("ckptctl ")


# --------------------------------------------------------------------------- docs


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_with_an_example(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.stdout and f"ckptctl {name}" in result.stdout
    command = next(c for c in app.registered_commands if c.name == name)
    assert command.callback.__doc__ and len(command.callback.__doc__.strip()) > 40


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_is_in_the_readme(name):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The ckptctl CLI") :]
    assert re.search(rf"ckptctl {re.escape(name)}\b", section), f"README's CLI section does not mention `ckptctl {name}`"


def test_readme_documents_exit_codes_and_completions():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for heading in ("## The ckptctl CLI", "## Output formats and exit codes", "## Shell completions"):
        assert heading in readme
    for name in FILES.values():
        assert name in readme


# --------------------------------------------------------------------------- completions


def test_committed_completion_scripts_are_current(tmp_path):
    committed = REPO / "completions"
    for shell, name in FILES.items():
        assert (committed / name).read_text(encoding="utf-8") == completion_script(shell), (
            f"completions/{name} is stale: run `python -m ckptctl.completions_gen`"
        )
    assert sorted(p.name for p in committed.iterdir() if not p.name.startswith(".")) == sorted(FILES.values())


def _complete(env: dict, cwd: Path) -> list[str]:
    proc = run_cli(env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_completion_protocol_returns_commands_and_run_names(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir()
    write_run(tmp_path / "runs", "alpha", n=1, drive=drive)
    write_run(tmp_path / "runs", "beta", n=1)
    commands = _complete({"_CKPTCTL_COMPLETE": "complete_bash", "COMP_WORDS": "ckptctl ", "COMP_CWORD": "1"}, tmp_path)
    assert sorted(commands) == COMMANDS
    runs = _complete({"_CKPTCTL_COMPLETE": "complete_bash", "COMP_WORDS": "ckptctl verify runs/", "COMP_CWORD": "2"}, tmp_path)
    assert runs == ["runs/alpha", "runs/beta"]
    some = _complete({"_CKPTCTL_COMPLETE": "complete_bash", "COMP_WORDS": "ckptctl promote runs/b", "COMP_CWORD": "2"}, tmp_path)
    assert some == ["runs/beta"]
    on_drive = _complete(
        {"_CKPTCTL_COMPLETE": "complete_bash", "COMP_WORDS": f"ckptctl restore --from-drive --drive {drive} --run ", "COMP_CWORD": "6"},
        tmp_path,
    )
    assert on_drive == ["alpha"]
    zsh = run_cli(env={"_CKPTCTL_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "ckptctl res"}, cwd=tmp_path).stdout
    assert "resume-info" in zsh and "restore" in zsh and "prune" not in zsh
    fish = run_cli(
        env={"_CKPTCTL_COMPLETE": "complete_fish", "_TYPER_COMPLETE_ARGS": "ckptctl ls runs/", "_TYPER_COMPLETE_FISH_ACTION": "get-args"},
        cwd=tmp_path,
    ).stdout
    assert "runs/alpha" in fish and "runs/beta" in fish


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_committed_bash_script_completes_in_a_real_bash(tmp_path):
    write_run(tmp_path / "runs", "gamma", n=1)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "ckptctl"
    shim.write_text("#!/bin/sh\nexec " + " ".join(f"'{p}'" for p in ckptctl_cmd()) + ' "$@"\n')
    shim.chmod(0o755)
    script = f"""
source '{REPO / "completions" / "ckptctl.bash"}'
COMP_WORDS=(ckptctl pru); COMP_CWORD=1
_ckptctl_completion ckptctl
echo "CMD:${{COMPREPLY[*]}}"
COMP_WORDS=(ckptctl ls runs/g); COMP_CWORD=2
_ckptctl_completion ckptctl
echo "RUN:${{COMPREPLY[*]}}"
"""
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**__import__("os").environ, "PATH": f"{bindir}:{__import__('os').environ['PATH']}", "PYTHONPATH": str(REPO)},
    )
    assert "CMD:prune" in proc.stdout, proc.stdout + proc.stderr
    assert "RUN:runs/gamma" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "args",
    [["prune", "--keep", "0"], ["ls", "--bogus"], ["--bogus"], ["frobnicate"], ["restore"], ["diff", "only_one"]],
)
def test_usage_errors_are_one_line_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "--help" in result.stderr


def _in_pty(args: list[str], answer: bytes, cwd: Path) -> tuple[int, str]:
    """Run ckptctl with stdin/stdout/stderr on a pseudo-terminal, type ``answer``; return (exit code, output)."""
    import os
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.chdir(cwd)
            os.environ["PYTHONPATH"] = str(REPO)
            os.environ["TERM"] = "xterm"  # rich draws nothing live on TERM=dumb (or unset in some CI shells)
            cmd = ckptctl_cmd() + args
            os.execv(cmd[0], cmd)
        finally:
            os._exit(127)
    output = b""
    sent = False
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
        if not sent and b"[y/N]" in output:
            os.write(fd, answer)
            sent = True
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_prune_asks_on_a_terminal(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=3)
    code, out = _in_pty(["prune", "--keep", "1"], b"n\n", tmp_path)
    assert code == 1 and "[y/N]" in out and "Nothing deleted" in out
    assert len(list((run / "checkpoints").iterdir())) == 3
    code, out = _in_pty(["prune", "--keep", "1"], b"y\n", tmp_path)
    assert code == 0, out
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint_00002.pt"]


def test_verify_on_a_terminal_draws_progress_and_still_reports(tmp_path):
    run = write_run(tmp_path / "runs", "run_a", n=2)
    code, out = _in_pty(["verify"], b"", tmp_path)
    assert code == 0, out
    assert "All good: 3 ok" in out
    # the bar (rich, on the terminal's stderr): its description, then all the bytes of the 3 files and their packs hashed
    total = sum(p.stat().st_size for p in [ckpt(run, 0), ckpt(run, 1), run / "best_model.pt"]) + sum(stored_packs(run).values())
    bars = re.findall(r"\x1b\[2K(\S*)verifying .*?([\d.]+)/([\d.]+) kB", out)
    assert bars and bars[-1] == ("", f"{total / 1000:.1f}", f"{total / 1000:.1f}"), repr(out[:2000])
    code, plain = _in_pty(["verify", "--json"], b"", tmp_path)  # no bar in JSON mode
    assert code == 0 and "verifying" not in plain and json.loads(plain)["ok"] is True


def test_layers_import_only_what_they_may():
    """Storage modules the CLI added import neither torch nor the CLI libraries; render imports no torch."""
    storage = ["ckptctl.storage.listing", "ckptctl.storage.plans", "ckptctl.storage.collect", "ckptctl.storage.restore", "ckptctl.storage.select", "ckptctl.core.units",
               "ckptctl.storage.foreign", "ckptctl.storage.foreign_listing", "ckptctl.storage.torchfile",
               "ckptctl.storage.safetensors_header", "ckptctl.storage.restore_loose"]
    assert modules_imported_by(storage, ("torch", "typer", "rich", "humanize"), ["ckptctl.render"]) == ([], False)
