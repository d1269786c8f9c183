"""contrib/prometheus and contrib/grafana: the alert rules pass `promtool check rules` and their
unit tests (`promtool test rules`); the dashboard is well-formed and asks only for metrics that
vcpud exposes. (tests/integration/test_prometheus.py runs all of their PromQL on a live Prometheus.)
"""

from __future__ import annotations

import functools
import os
import re
import subprocess

import pytest

from tests.conftest import skip_or_fail
from tests.prometheus import (ALERT_TESTS, ALERTS, PROMTOOL, alert_queries, alert_rules, dashboard, dashboard_panels,
                              dashboard_queries, variable_queries)
from tests.unit.test_metrics import SCENARIO, samples
from vcpud.metrics import exposition


def promtool(*args: str) -> subprocess.CompletedProcess:
    if not os.access(PROMTOOL, os.X_OK):
        skip_or_fail(f"{PROMTOOL} not installed (Debian package prometheus; contrib/setup-dev.sh installs it)")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def test_promtool_check_rules():
    p = promtool("check", "rules", str(ALERTS))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in p.stdout, p.stdout


def test_promtool_test_rules():
    p = promtool("test", "rules", str(ALERT_TESTS))
    assert p.returncode == 0 and "SUCCESS" in p.stdout, p.stdout + p.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    import yaml
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for a in t.get("alert_rule_test", []):
            (firing if a.get("exp_alerts") else quiet).add(a["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names == firing == quiet, (names, firing, quiet)
    assert {"VcpudDown", "VcpudConfigReloadFailed", "VcpudPoolExhausted", "VcpudVMsWaitingForCPUs",
            "VcpudCPUOvercommitted", "VcpudPinErrorsRising"} <= names


def test_alerts_are_annotated():
    for r in alert_rules():
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r
        assert r["annotations"]["summary"] and r["annotations"]["description"], r


@functools.cache
def exposed_names() -> frozenset[str]:
    """Every sample name vcpud exposes (the scenario has a series in every family)."""
    return frozenset(samples(exposition(SCENARIO)))


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bvcpud_[a-z0-9_]+", expr))


@pytest.mark.parametrize("where,expr", dashboard_queries() + alert_queries())
def test_queries_ask_for_exposed_metrics(where, expr):
    names = metric_names(expr)
    assert names or re.search(r"\bup\b", expr), f"{where}: no vcpud metric in {expr!r}"
    assert names <= exposed_names(), f"{where}: {sorted(names - exposed_names())} not exposed by vcpud"


def test_dashboard_shape():
    d = dashboard()
    assert d["schemaVersion"] >= 36
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    assert [(n, sel, label) for n, sel, label in variable_queries(d)] == [("instance", "vcpud_build_info", "instance")]
    panels = dashboard_panels(d)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {p["title"] for p in panels}
    for want in ("Pinned threads per CPU", "VMs on each CPU", "vCPU load per CPU", "Pool usage", "Overcommitted CPUs",
                 "Pin latency", "Last reload", "Last successful reload", "Pin operations by result", "Version"):
        assert want in titles, want
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("targets"), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert '=~"$instance"' in t["expr"], f"{p['title']}: every query must select $instance: {t['expr']}"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


def test_dashboard_has_no_overlapping_panels():
    cells: dict[tuple[int, int], str] = {}
    d = dashboard()
    for p in d["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
