"""The CI rule (tests/ci_rules.py): a root-only test may skip with its reason, but never under CI."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from tests.ci_rules import CI_VARIABLE, MARKER
from tests.cli_helpers import REPO

PROBE = f'''
import pytest

@pytest.mark.{MARKER}
def test_needs_a_mount():
    pytest.skip("needs root and mount(8)")

def test_needs_no_cuda():
    pytest.skip("needs a machine without CUDA")

@pytest.mark.{MARKER}
def test_root_only_that_runs():
    pass
'''


def _pytest(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != CI_VARIABLE}
    env["PYTHONPATH"] = str(REPO)
    if ci:
        env[CI_VARIABLE] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.ci_rules", "-p", "no:cacheprovider", "-q", "-rfEs", "test_probe.py"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )


def test_a_root_only_test_skips_with_its_reason_outside_ci(tmp_path):
    proc = _pytest(tmp_path, ci=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SKIPPED [1] test_probe.py:6: needs root and mount(8)" in proc.stdout
    assert "1 passed, 2 skipped" in proc.stdout


def test_a_root_only_test_that_skips_under_ci_fails_the_run(tmp_path):
    proc = _pytest(tmp_path, ci=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"root-only test skipped under CI ({CI_VARIABLE}=1, uid {os.geteuid()}): Skipped: needs root and mount(8)" in proc.stdout
    assert "FAILED test_probe.py::test_needs_a_mount" in proc.stdout
    # any other skip stays a skip, printed with its reason
    assert "SKIPPED [1] test_probe.py:9: needs a machine without CUDA" in proc.stdout
    assert "1 failed, 1 passed, 1 skipped" in proc.stdout


def _skips_for_root(function: ast.FunctionDef) -> bool:
    """Whether ``function`` calls ``pytest.skip`` with a reason that names root."""
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.skip" and node.args:
            if isinstance(node.args[0], ast.Constant) and "root" in str(node.args[0].value):
                return True
    return False


def test_every_test_that_skips_for_want_of_root_is_marked_root_only():
    """So the CI rule sees it: a test that says it needs root carries @pytest.mark.root_only."""
    unmarked = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and _skips_for_root(node):
                if f"pytest.mark.{MARKER}" not in [ast.unparse(d) for d in node.decorator_list]:
                    unmarked.append(f"{path.name}::{node.name}")
    assert unmarked == []
