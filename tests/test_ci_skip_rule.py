"""The CI rule of tests/conftest.py: with CI=true any skipped test fails the run, whatever plugins print.

Each case runs pytest in a subprocess on a throwaway test file with tests/conftest.py loaded as a
plugin (``-p tests.conftest``), the way it applies to the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SKIPS = {
    "call": "import pytest\n\ndef test_ok():\n    pass\n\ndef test_skips():\n    pytest.skip('not here')\n",
    "mark": "import pytest\n\ndef test_ok():\n    pass\n\n@pytest.mark.skip(reason='not here')\ndef test_skips():\n"
            "    pass\n",
    "fixture": "import pytest\n\n@pytest.fixture\ndef host():\n    pytest.skip('no host')\n\n"
               "def test_ok():\n    pass\n\ndef test_skips(host):\n    pass\n",
    "module": "import pytest\n\npytest.skip('no module here', allow_module_level=True)\n\ndef test_never():\n"
              "    pass\n",
}
NO_SKIP = "def test_ok():\n    pass\n\ndef test_ok_too():\n    assert 1 + 1 == 2\n"
OUTPUT = {"terminal": [], "no-terminal": ["-p", "no:terminal"]}


def run_pytest(tmp_path: Path, source: str, ci: str | None, extra: list[str]) -> subprocess.CompletedProcess:
    test = tmp_path / "test_sample.py"
    test.write_text(source)
    (tmp_path / "test_other.py").write_text("def test_elsewhere():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), *extra, str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("output", OUTPUT)
@pytest.mark.parametrize("kind", SKIPS)
def test_a_skip_fails_the_run_in_ci(tmp_path, kind, output):
    p = run_pytest(tmp_path, SKIPS[kind], "true", OUTPUT[output])
    assert p.returncode == pytest.ExitCode.TESTS_FAILED, p.stdout + p.stderr
    assert "CI=true: 1 test(s) skipped, failing the run: " in p.stderr, p.stderr
    assert "test_sample.py" in p.stderr.rsplit("failing the run: ", 1)[1]


@pytest.mark.parametrize("output", OUTPUT)
@pytest.mark.parametrize("kind", SKIPS)
def test_a_skip_passes_outside_ci(tmp_path, kind, output):
    p = run_pytest(tmp_path, SKIPS[kind], None, OUTPUT[output])
    assert p.returncode == pytest.ExitCode.OK, p.stdout + p.stderr
    assert "CI=true" not in p.stderr


def test_ci_run_without_skips_passes(tmp_path):
    # The rule fails runs that skipped, not every run.
    p = run_pytest(tmp_path, NO_SKIP, "true", ["-p", "no:terminal"])
    assert p.returncode == pytest.ExitCode.OK, p.stdout + p.stderr
    assert "CI=true" not in p.stderr


def test_ci_run_with_a_failure_keeps_its_exit_status(tmp_path):
    # The rule only turns a passing run into a failing one; it never hides why a run failed.
    p = run_pytest(tmp_path, SKIPS["call"] + "\ndef test_bad():\n    assert False\n", "true", [])
    assert p.returncode == pytest.ExitCode.TESTS_FAILED, p.stdout + p.stderr
    assert "CI=true" not in p.stderr
    assert "1 failed, 2 passed, 1 skipped" in p.stdout
