"""The suite's rule for CI: a test that needs root may skip on a laptop, never silently in CI.

A test marked ``root_only`` (real mounts, loop devices, ``fsfreeze``) skips with its reason
where it cannot run. Under CI (``CKPTCTL_CI=1``, exported by ``.ci/run``) such a skip is turned
into a failure naming the reason: CI runs as root so that these tests run, and a missing tool
or a refused mount must be seen, not counted as a pass. Loaded by ``tests/conftest.py``.
"""

from __future__ import annotations

import os

import pytest

#: The environment variable that says "this is CI" (set to 1 by ``.ci/run``).
CI_VARIABLE = "CKPTCTL_CI"
MARKER = "root_only"


def under_ci() -> bool:
    """True when the suite runs under CI (``CKPTCTL_CI=1``)."""
    return os.environ.get(CI_VARIABLE) == "1"


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``root_only`` marker."""
    config.addinivalue_line(
        "markers", f"{MARKER}: needs root (mounts, loop devices, fsfreeze); under CI ({CI_VARIABLE}=1) its skip fails the run"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI, report a skipped ``root_only`` test as failed, with the reason it gave."""
    report = (yield).get_result()
    if report.skipped and under_ci() and item.get_closest_marker(MARKER) is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"root-only test skipped under CI ({CI_VARIABLE}=1, uid {os.geteuid()}): {reason}\n"
            "CI must run the tests that need root: run it as root, with the tools and mounts the reason names."
        )
