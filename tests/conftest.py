"""Shared test helpers: where the shared data lives, and the CI rule that nothing may skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_TOPOLOGIES = REPO.parent / "shared" / "topologies"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip with a reason on a developer's machine; in CI a skip is a failure."""
    if IN_CI:
        pytest.fail(f"would skip in CI, which must run everything: {reason}")
    pytest.skip(reason)


def run_vcpud(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "vcpud", *args], capture_output=True, text=True,
                       env=env, timeout=120, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"vcpud {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def pytest_sessionfinish(session, exitstatus):
    # CI must not count a skipped test as passing: any skip fails the run.
    if IN_CI and exitstatus == 0:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        skipped = reporter.stats.get("skipped", []) if reporter else []
        if skipped:
            print(f"\nCI=true: {len(skipped)} test(s) skipped; failing the run", file=sys.stderr)
            session.exitstatus = 1
