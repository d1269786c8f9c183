"""The README starts with two commands, and CI runs both exactly as written there."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_ci_runs_the_readmes_first_two_commands_verbatim():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```sh\n(.*?)\n```", readme, re.M | re.S)
    first, tests = blocks[0], blocks[1]
    assert first == "bash contrib/setup-dev.sh && .venv/bin/vcpud demo"
    assert tests == "bash contrib/setup-dev.sh && .venv/bin/python -m pytest -q tests"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert first in ci and tests in ci
    assert readme.index(first) < readme.index(tests) < readme.index("\n---\n"), "both before anything else"
