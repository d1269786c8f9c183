"""A real Prometheus server for tests: Debian's /usr/bin/prometheus on 127.0.0.1, a free port, its
TSDB in a temporary directory, scraping given targets every second and evaluating given rule files
every second; queried through the HTTP API. Also the PromQL of contrib/: every expression of the
Grafana dashboard and of the alert rules, with the dashboard's variables substituted.

    with PrometheusServer(tmp, ["127.0.0.1:9474"], rule_files=[ALERTS]) as prom:
        prom.wait_target_up()
        prom.query('vcpud_cpu_pinned_threads{cpu="0"}')
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from tests.conftest import REPO

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
DASHBOARD = REPO / "contrib" / "grafana" / "vcpud-dashboard.json"
ALERTS = REPO / "contrib" / "prometheus" / "vcpud-alerts.yml"
ALERT_TESTS = REPO / "contrib" / "prometheus" / "vcpud-alerts.test.yml"
JOB = "vcpud"  # the job name the alert rules expect


class PromQLError(AssertionError):
    """The API answered status=error (bad expression, execution error)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    def __init__(self, tmp: Path, targets: list[str], rule_files: list[Path] = (), job: str = JOB,
                 interval: str = "1s") -> None:
        self.dir = Path(tmp) / f"prometheus-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        self.targets = list(targets)
        self.job = job
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "rule_files": [str(Path(r).resolve()) for r in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": self.targets}]}],
        }, sort_keys=False))
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "PrometheusServer":
        last = ""
        for _ in range(3):  # the free port may be taken between finding and binding it
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            log = self.log_path.open("a")
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=info"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                start_new_session=True)  # its own process group: a stop kills nothing else
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                        if r.status == 200:
                            return self
                except (OSError, urllib.error.URLError):
                    pass
                time.sleep(0.1)
            last = self.log()
            self.stop()
            if "address already in use" not in last:
                break
        raise AssertionError(f"prometheus did not become ready:\n{last[-4000:]}")

    def stop(self, timeout: float = 10.0) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- the HTTP API -------------------------------------------------------------------------
    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422/503 carry a JSON error
            raw = e.read()
            try:
                body = json.loads(raw)
            except ValueError:
                raise PromQLError(f"{path} {params}: HTTP {e.code}: {raw[:500]!r}") from None
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query; the result as the API gives it (vector: [{metric, value: [t, "v"]}])."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def values(self, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        """{(label values...): value} of an instant vector query."""
        return {tuple(s["metric"].get(k, "") for k in labels): float(s["value"][1]) for s in self.query(expr)}

    def wait_for(self, expr: str, pred: Callable[[list[dict]], bool], timeout: float = 30.0,
                 what: str = "") -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if pred(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or expr}: not as expected after {timeout}s; last result {result}")
            time.sleep(0.25)

    def active_targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_target_up(self, timeout: float = 30.0) -> None:
        """Until every target has been scraped successfully at least twice (so rate() has two points)."""
        deadline = time.monotonic() + timeout
        while True:
            ts = self.active_targets()
            if len(ts) == len(self.targets) and all(t["health"] == "up" for t in ts):
                expr = f'count_over_time(up{{job="{self.job}"}}[1m]) >= 2'
                if len(self.query(expr)) == len(self.targets):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"targets not up after {timeout}s: {ts}")
            time.sleep(0.25)

    def rules(self) -> list[dict]:
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]


# --- the PromQL that contrib/ ships ----------------------------------------------------------

def _walk_panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from _walk_panels(p.get("panels", []))


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict | None = None) -> list[dict]:
    return [p for p in _walk_panels((dash or dashboard())["panels"]) if p.get("type") != "row"]


def substitute(expr: str, instance: str = ".+") -> str:
    """A dashboard expression as Grafana would send it: variables replaced (instance by a regex that
    matches any host), $__rate_interval by 1m (4 scrapes at the tests' 1 s interval, and then some)."""
    out = expr.replace("$__rate_interval", "1m").replace("${__rate_interval}", "1m")
    out = re.sub(r"\$\{?__(interval|range)\}?", "1m", out)
    out = out.replace("${instance}", instance).replace("$instance", instance)
    leftover = re.search(r"\$\{?\w+", out)
    assert leftover is None, f"unsubstituted variable {leftover.group(0)} in {expr!r}"
    return out


def dashboard_queries(dash: dict | None = None, instance: str = ".+") -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) for every query target of every panel."""
    out = []
    for p in dashboard_panels(dash):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"{p['title']} / {t.get('refId', '?')}", substitute(t["expr"], instance)))
    return out


def variable_queries(dash: dict | None = None) -> list[tuple[str, str, str]]:
    """(variable, metric selector, label) for each label_values(selector, label) query variable."""
    out = []
    for v in (dash or dashboard())["templating"]["list"]:
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q)
        assert m, f"variable {v['name']}: unsupported query {q!r}"
        out.append((v["name"], m.group(1), m.group(2)))
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def alert_queries() -> list[tuple[str, str]]:
    return [(r.get("alert") or r.get("record"), r["expr"]) for r in alert_rules()]
