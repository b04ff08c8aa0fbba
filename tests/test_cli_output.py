"""The output object and the error table: --quiet on every command, --json/--quiet together, one ``Error:`` line per failure."""

from __future__ import annotations

import errno
import json

import pytest

from ckptctl.cli import app
from ckptctl.errors import (
    CheckpointIntegrityError,
    CkptctlError,
    CorruptIndexError,
    NotFoundError,
    NotRegularFileError,
    RunLockedError,
)
from ckptctl.exit_codes import (
    DEBUG_ENV,
    ERROR_TABLE,
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    ErrorRule,
    error_line,
    error_message,
)
from tests.cli_helpers import invoke, modules_imported_by, run_cli
from tests.damage import flip_byte
from tests.runs import ckpt


def _params(command_name: str) -> set[str]:
    command = next(c for c in app.registered_commands if c.name == command_name)
    return {opt for p in command.callback.__defaults__ or () if hasattr(p, "param_decls") for opt in p.param_decls or ()}


def test_every_command_with_json_has_quiet():
    names = [c.name for c in app.registered_commands]
    with_json = [n for n in names if "--json" in _params(n)]
    assert sorted(with_json) == sorted(names)  # today every command has --json
    for name in with_json:
        assert {"--quiet", "-q"} <= _params(name), name
        assert "--quiet" in invoke(name, "--help").stdout


def test_shell_completion_offers_quiet(tmp_path):
    env = {"_CKPTCTL_COMPLETE": "complete_bash", "COMP_WORDS": "ckptctl verify --", "COMP_CWORD": "2"}
    proc = run_cli(env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {"--json", "--quiet"} <= set(proc.stdout.split())


def _quiet(*args: str, code: int):
    """Run with -q: nothing on stdout, nothing on stderr (no notes, no warnings), and the exit code ``code``."""
    result = invoke(*args, "-q")
    assert result.exit_code == code, (args, result.stdout, result.stderr)
    assert result.stdout == "", (args, result.stdout)
    assert result.stderr == "", (args, result.stderr)
    return result


def test_quiet_on_a_good_run_prints_nothing_and_exits_0(tmp_path, make_run):
    drive = tmp_path / "drive"
    drive.mkdir()
    run = make_run(n=3)
    for args in (
        ["ls"],
        ["verify"],
        ["show", "runs/run_a"],
        ["resume-info", "runs/run_a"],
        ["diff", "runs/run_a:2", "runs/run_a:2"],
        ["prune", "--keep", "2", "--dry-run"],
        ["backup", "runs/run_a", "--drive", str(drive)],
        ["restore", "--from-drive", "--drive", str(drive), "--to", "restored"],
        ["promote", "runs/run_a", "1"],
        ["prune", "--keep", "2", "--yes"],
    ):
        _quiet(*args, code=EXIT_OK)
    assert not ckpt(run, 0).exists() and ckpt(run, 1).exists()  # prune -q --yes did delete
    assert (tmp_path / "restored" / "run_a" / "checkpoint_metadata.json").exists()  # restore -q did restore


def test_quiet_on_a_damaged_run_prints_nothing_and_exits_1(tmp_path, make_run):
    drive = tmp_path / "drive"
    drive.mkdir()
    run = make_run(n=3, corrupt=[2])
    _quiet("ls", code=EXIT_OK)  # listing reads no payload: a flipped byte is not its business
    _quiet("verify", code=EXIT_PROBLEMS)
    _quiet("verify", "--deep", code=EXIT_PROBLEMS)
    _quiet("diff", "runs/run_a:0", "runs/run_a:1", code=EXIT_PROBLEMS)  # two good checkpoints that differ
    backup = run_cli("backup", "runs/run_a", "--drive", str(drive), "-q", cwd=tmp_path)  # a real process: the
    assert (backup.returncode, backup.stdout, backup.stderr) == (EXIT_PROBLEMS, "", "")  # mirror's logged warning too
    assert invoke("backup", "runs/run_a", "--drive", str(drive), "--json").exit_code == EXIT_PROBLEMS  # checkpoint 2 still not
    for n in (0, 1):
        flip_byte(ckpt(run, n))
    _quiet("resume-info", "runs/run_a", code=EXIT_PROBLEMS)  # none verifies


def test_quiet_still_prints_errors(make_run):
    run = make_run(n=3, corrupt=[1])
    for args, code in ((["ls", "missing"], EXIT_USAGE), (["show", "runs/run_a", "1"], EXIT_PROBLEMS), (["promote", "runs/run_a", "7"], EXIT_USAGE)):
        result = invoke(*args, "--quiet")
        assert result.exit_code == code, (args, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    refused = invoke("prune", "--keep", "1", "-q")  # no terminal, no --yes: refuses, says why, deletes nothing
    assert refused.exit_code == EXIT_PROBLEMS and refused.stdout == "" and "--yes" in refused.stderr
    assert ckpt(run, 0).exists()


def test_quiet_drops_warnings_that_json_and_tables_print(make_run):
    make_run(n=2, drop=[0])  # the listing warns: file missing
    shown = invoke("ls")
    as_json = invoke("ls", "--json")
    assert "warning: run_a: checkpoint 0" in shown.stderr and shown.stderr == as_json.stderr
    assert json.loads(as_json.stdout)["runs"][0]["problems"]
    _quiet("ls", code=EXIT_OK)


def test_json_and_quiet_together_is_a_usage_error(tmp_path):
    result = invoke("ls", "--json", "--quiet")
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and "--quiet" in result.stderr and result.stderr.count("\n") == 1


# --------------------------------------------------------------------------- the error table


@pytest.mark.parametrize(
    "exc, message, code",
    [
        (NotFoundError("runs/x: no checkpoint 9"), "runs/x: no checkpoint 9", EXIT_USAGE),
        (
            RunLockedError("runs/x: run is locked by pid 1"),
            "runs/x: run is locked by pid 1 (a trainer is using this run; stop it (or let it finish) and try again)",
            EXIT_PROBLEMS,
        ),
        (CheckpointIntegrityError("c.pt: checksum mismatch"), "c.pt: checksum mismatch", EXIT_PROBLEMS),
        (CorruptIndexError("index: not JSON"), "index: not JSON", EXIT_PROBLEMS),
        (CkptctlError(""), "CkptctlError", EXIT_PROBLEMS),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "runs/x"), "runs/x: No such file or directory", EXIT_USAGE),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory"), "Not a directory", EXIT_USAGE),
        (PermissionError(errno.EACCES, "Permission denied", "runs/x"), "runs/x: Permission denied", EXIT_PROBLEMS),
        (OSError(errno.EIO, "Input/output error", "c.pt"), "c.pt: Input/output error", EXIT_PROBLEMS),
        # one of ckptctl's own errors that is also an OSError: its own words, the ckptctl row
        (NotRegularFileError("runs/x/.ckptctl.lock", "FIFO"), "runs/x/.ckptctl.lock: not a regular file (FIFO)", EXIT_PROBLEMS),
        (ValueError("boom"), f"unexpected ValueError: boom (set {DEBUG_ENV}=1 for the traceback)", EXIT_PROBLEMS),
    ],
)
def test_error_table_maps_each_exception_to_its_code_and_line(exc, message, code):
    assert error_message(exc) == (message, code)
    line, line_code = error_line(exc)
    assert line == f"Error: {message}" and line_code == code


def test_error_line_is_one_line():
    line, _ = error_line(CkptctlError("first line\n  second   line"))
    assert line == "Error: first line second line"


def test_a_caller_can_put_its_own_rows_first():
    class Refused(CkptctlError):
        pass

    table = (ErrorRule(Refused, EXIT_USAGE, "pick another --run-name"), *ERROR_TABLE)
    assert error_message(Refused("run exists"), table) == ("run exists (pick another --run-name)", EXIT_USAGE)
    assert error_message(Refused("run exists")) == ("run exists", EXIT_PROBLEMS)  # the default table: a CkptctlError


def test_subclasses_come_before_their_bases_in_the_table():
    kinds = [rule.kind for rule in ERROR_TABLE]
    for i, kind in enumerate(kinds):
        assert not any(issubclass(later, kind) and later is not kind for later in kinds[i + 1 :]), kind


def test_exit_codes_and_output_import_no_torch():
    """The trainloop and the CLI share exit_codes: it imports neither torch nor the CLI libraries."""
    found = modules_imported_by(["ckptctl.exit_codes"], ("torch", "typer", "click", "rich", "humanize"), ["ckptctl.output"])
    assert found == ([], False)
