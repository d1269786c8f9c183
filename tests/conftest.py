"""Shared test helpers: where the shared data lives, and the CI rule that nothing may skip."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import warnings
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


DUMPS = sorted(p.name[: -len(".tar.gz")] for p in SHARED_TOPOLOGIES.glob("*.tar.gz")) \
    if SHARED_TOPOLOGIES.is_dir() else []


def _safe_members(tar: tarfile.TarFile):
    """Fallback for Pythons without extraction filters: plain files and dirs inside the archive only."""
    for m in tar:
        parts = Path(m.name).parts
        if (m.isfile() or m.isdir()) and not Path(m.name).is_absolute() and ".." not in parts:
            yield m


def _unpack(archive: Path, dest: Path) -> Path:
    skipped = []
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            for member in tar:
                try:
                    tar.extract(member, dest, filter="data")
                except (tarfile.TarError, OSError) as e:
                    # Dumps of /sys can hold odd entries (links leaving the tree, devices...);
                    # none of them is a file the topology reader needs.
                    skipped.append(f"{member.name}: {e}")
        else:
            tar.extractall(dest, members=_safe_members(tar))
    if skipped:
        warnings.warn(f"{archive.name}: skipped {len(skipped)} entries, e.g. {skipped[0]}", stacklevel=2)
    root = dest / archive.name[: -len(".tar.gz")]
    assert root.is_dir(), f"{archive} did not unpack to {root.name}/"
    return root


@pytest.fixture(scope="session")
def unpacked(tmp_path_factory):
    """name -> unpacked sysroot, each archive extracted once per session."""
    base = tmp_path_factory.mktemp("topologies")
    roots: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in roots:
            roots[name] = _unpack(SHARED_TOPOLOGIES / f"{name}.tar.gz", base)
        return roots[name]

    return get


DUMP_PARAMS = DUMPS or [pytest.param(None, id="no-dumps")]


@pytest.fixture(params=DUMP_PARAMS)
def dump(request, unpacked):
    if request.param is None:
        skip_or_fail(f"no topology dumps (*.tar.gz) in {SHARED_TOPOLOGIES.resolve()}")
    return request.param, unpacked(request.param)



def run_vcpud(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "vcpud", *args], capture_output=True, text=True,
                       env=env, timeout=120, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"vcpud {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


class SkipCounter:
    """Counts skipped tests from their reports, whichever plugins print them (or none does)."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # A test skips once: in setup (a mark, a fixture that skips) or in call (pytest.skip()).
        # An xfail reports as skipped too, and is no pass either.
        if report.skipped:
            self.skipped.append(report.nodeid)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a module skipped at import: pytest.skip(allow_module_level=True)
            self.skipped.append(report.nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # CI must not count a skipped test as passing: any skip fails the run.
        # (A run whose only module skipped at import collected no tests: exit 5, failed here too.)
        if IN_CI and self.skipped and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            sys.stderr.write(f"\nCI=true: {len(self.skipped)} test(s) skipped, failing the run: "
                             f"{', '.join(self.skipped)}\n")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipCounter(), "vcpud-skip-counter")
