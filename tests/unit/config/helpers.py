"""Shared helpers for the vcpud.config tests: parse a config text, collect its issues, check an issue."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from vcpud.config import Config, ConfigError, ConfigIssue, parse_config_text
from vcpud.cpuset import CpuSet
from vcpud.discovery import Thread
from vcpud.placement import rule_for

TWO_CPUS = CpuSet.parse("0-1")


def parse(text: str, **kw) -> Config:
    return parse_config_text(dedent(text), "t.yaml", **kw)


def issues(text: str, **kw) -> tuple[ConfigIssue, ...]:
    with pytest.raises(ConfigError) as ei:
        parse(text, **kw)
    return ei.value.issues


def one_issue(text: str, **kw) -> ConfigIssue:
    found = issues(text, **kw)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def assert_issue(issue: ConfigIssue, where: str, *fragments: str, key: str | None = "ANY") -> None:
    assert str(issue).startswith(where + ": "), str(issue)
    for f in fragments:
        assert f in issue.message, (f, str(issue))
    if key != "ANY":
        assert issue.key == key, (issue.key, str(issue))


def policy(body: str) -> str:
    """A one-policy config whose extra lines (4-space indented) start on line 4."""
    lines = dedent(body).splitlines()
    return "policies:\n  - name: p\n    match: {}\n" + "".join(f"    {line}\n" for line in lines)


def cpus(text: str) -> CpuSet:
    return CpuSet.parse(text)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dedent(text))
    return path


def cpus_for(p, role, vcpu=None, io=None):
    """What the planner gives a thread of that role under policy p (precedence lives there)."""
    r = rule_for(p, Thread(tid=1, comm="x", role=role, vcpu=vcpu, iothread=io))
    return None if r is None else r[1]
