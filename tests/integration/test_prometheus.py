"""vcpud's metrics in a real Prometheus (Debian's /usr/bin/prometheus, scraping every second):

1. the harness against a standalone MetricsServer fed a fixed snapshot (no root, no qemu): values,
   a new snapshot, the alert rules loaded and evaluated, every dashboard and alert query;
2. `vcpud run --metrics-listen` pinning real qemu guests: the per-CPU grid Prometheus stores is what
   the guests' threads really are, a broken reload shows as vcpud_config_last_reload_successful 0
   (and the alert goes pending), and every dashboard panel query and alert expression runs clean.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from tests.conftest import run_vcpud, skip_or_fail
from tests.prometheus import (ALERTS, PROMETHEUS, PrometheusServer, alert_queries, alert_rules, dashboard_queries,
                              free_port, variable_queries)
from tests.qemu import RUN
from tests.unit.test_metrics import SCENARIO, Box, samples
from vcpud.metrics import MetricsServer, exposition

# Panels that must show data whenever vcpud is scraped (the rest may be legitimately empty:
# no pin in the window means no latency quantile, no waiting VM means nothing to draw...).
KEY_PANELS = ("Pinned threads per CPU", "VMs on each CPU", "VMs", "Pin operations by result", "Version")


def need_prometheus() -> None:
    if not os.access(PROMETHEUS, os.X_OK):
        skip_or_fail(f"{PROMETHEUS} not installed (Debian package prometheus; contrib/setup-dev.sh installs it)")


def check_all_queries(prom: PrometheusServer, instance: str) -> dict[str, int]:
    """Run every dashboard query ($instance as the regex ".+", any host: this Prometheus scrapes only
    ``instance``) and alert expression; all must succeed, the key panels must return data, and the
    $instance variable must offer ``instance``. Returns {where: number of series}."""
    sizes: dict[str, int] = {}
    errors = []
    for where, expr in dashboard_queries(instance=".+") + alert_queries():
        try:
            sizes[where] = len(prom.query(expr))
        except AssertionError as e:
            errors.append(f"{where}: {expr}\n    {e}")
    assert not errors, "queries failed:\n" + "\n".join(errors)
    empty = [w for w, n in sizes.items() if n == 0 and w.split(" / ")[0] in KEY_PANELS]
    assert not empty, f"key panels without data: {empty}"
    for title in KEY_PANELS:
        assert any(w.startswith(title + " / ") for w in sizes), f"no panel {title!r} in the dashboard"
    # the dashboard's variable: label_values(vcpud_build_info, instance) offers this host
    for name, selector, label in variable_queries():
        offered = {s["metric"].get(label) for s in prom.query(selector)}
        assert instance in offered, (name, offered)
    return sizes


def wait_rules_healthy(prom: PrometheusServer, timeout: float = 20.0) -> None:
    want = {r["alert"] for r in alert_rules()}
    deadline = time.monotonic() + timeout
    while True:
        rules = {r["name"]: r for r in prom.rules() if r["type"] == "alerting"}
        if set(rules) == want and all(r["health"] == "ok" for r in rules.values()):
            return
        assert time.monotonic() < deadline, f"alert rules not loaded and healthy: {rules}"
        time.sleep(0.25)


def test_harness_with_a_standalone_metrics_server(tmp_path):
    need_prometheus()
    box = Box(SCENARIO)
    server = MetricsServer(box)
    host, port = server.start("127.0.0.1:0")
    target = f"{host}:{port}"
    try:
        with PrometheusServer(tmp_path, [target], rule_files=[ALERTS]) as prom:
            prom.wait_target_up()
            want = {(dict(k)["cpu"], dict(k)["role"]): v
                    for k, v in samples(exposition(SCENARIO))["vcpud_cpu_pinned_threads"].items()}
            got = prom.values(f'vcpud_cpu_pinned_threads{{instance="{target}"}}', "cpu", "role")
            assert got == want
            assert prom.values("vcpud_build_info", "version", "job") == {("0.1.0", "vcpud"): 1}
            wait_rules_healthy(prom)
            # the scenario's last reload failed: the alert is pending (for: 5m)
            prom.wait_for('ALERTS{alertname="VcpudConfigReloadFailed", alertstate="pending"}', bool, timeout=15)
            check_all_queries(prom, target)

            box.snap = dataclasses.replace(SCENARIO, config_last_reload_successful=True)
            prom.wait_for("vcpud_config_last_reload_successful == 1", bool, timeout=15)
            prom.wait_for('ALERTS{alertname="VcpudConfigReloadFailed"}', lambda r: not r, timeout=15)

            server.stop()  # the target goes down; Prometheus notices
            prom.wait_for(f'up{{instance="{target}"}} == 0', bool, timeout=15)
            prom.wait_for('ALERTS{alertname="VcpudDown", alertstate="pending"}', bool, timeout=15)
    finally:
        server.stop()


# --- against `vcpud run` and real guests -----------------------------------------------------

# The host may run other guests: the policies match only this run's two guests, by exact name, so that
# the per-CPU sums count nothing but them.
WEB, CORE = f"{RUN}prom-web", f"{RUN}prom-core"
POLICY = f"""\
rescan_interval: 2s
policies:
  - name: core
    match: {{name: "{CORE}"}}
    vcpupin: {{0: "0", 1: "1"}}
    emulatorpin: "1"
  - name: web
    match: {{name: "{WEB}"}}
    affinity: "0"
"""


def scrape(target: str) -> str:
    """vcpud's own /metrics, the per-VM and per-CPU part (for failure messages)."""
    import urllib.request
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as r:
        body = r.read().decode()
    return "\n".join(line for line in body.splitlines()
                     if line.startswith(("vcpud_vm_info", "vcpud_cpu_pinned_threads", "vcpud_threads")))


def per_cpu_from_proc(guests) -> dict[str, int]:
    """What vcpud_cpu_pinned_threads summed over roles must be, from the kernel's side: the threads of
    the guests (all managed, every role with a rule) allowed on each CPU; kernel workers are never pinned."""
    out: dict[str, int] = {}
    for g in guests:
        for tid, comm in g.threads().items():
            if comm.startswith("kvm-"):
                continue
            try:
                cpus = g.affinity(tid)
            except OSError:
                continue
            for part in cpus.split(","):
                lo, _, hi = part.partition("-")
                for c in range(int(lo), int(hi or lo) + 1):
                    out[str(c)] = out.get(str(c), 0) + 1
    return out


@pytest.mark.qemu
def test_daemon_metrics_in_prometheus(tmp_path):
    from tests.daemon_harness import DaemonProc
    from tests.integration.test_apply_qemu import need_host
    from tests.qemu import start_guest

    need_host()
    need_prometheus()
    if "--metrics-listen" not in run_vcpud("run", "--help").stdout:
        skip_or_fail("`vcpud run` has no --metrics-listen option yet")
    cfg = tmp_path / "vcpud.yaml"
    cfg.write_text(POLICY)
    guests = []
    daemon = None
    try:
        guests.append(start_guest(tmp_path, WEB, smp="2"))
        guests.append(start_guest(tmp_path, CORE, smp="2"))
        port = free_port()
        target = f"127.0.0.1:{port}"
        daemon = DaemonProc(tmp_path, cfg, "--metrics-listen", target)
        with PrometheusServer(tmp_path, [target], rule_files=[ALERTS]) as prom:
            try:
                prom.wait_target_up()
            except AssertionError:
                raise AssertionError(f"vcpud's metrics never scraped; daemon log:\n{daemon.log()}") from None
            sel = f'{{instance="{target}"}}'
            # vCPUs: WEB's two on 0 (affinity "0"), CORE's vCPU 0 on 0 and vCPU 1 on 1
            prom.wait_for(f'vcpud_cpu_pinned_threads{{instance="{target}", role="vcpu"}}',
                          lambda r: {s["metric"]["cpu"]: float(s["value"][1]) for s in r} == {"0": 3, "1": 1},
                          timeout=20, what="vCPUs per CPU")
            # every pinned thread, by CPU, is what /proc says the guests' threads are allowed on
            deadline = time.monotonic() + 20
            while True:
                got = {k[0]: int(v) for k, v in prom.values(f"sum by (cpu) (vcpud_cpu_pinned_threads{sel})",
                                                            "cpu").items()}
                want = per_cpu_from_proc(guests)
                if got == want:
                    break
                assert time.monotonic() < deadline, f"Prometheus has {got}, /proc says {want}"
                time.sleep(0.5)
            emu = prom.values(f'vcpud_cpu_pinned_threads{{instance="{target}", role="emulator"}}', "cpu")
            assert emu[("0",)] >= 1 and emu[("1",)] >= 1, emu  # WEB's main thread on 0, CORE's on 1
            assert prom.values(f"vcpud_cpu_exclusive_vcpus{sel}", "cpu") == {("0",): 3, ("1",): 1}
            on_cpu = set(prom.values(f"vcpud_cpu_vm_info{sel}", "cpu", "role", "vm"))
            assert {("0", "vcpu", WEB), ("0", "emulator", WEB), ("0", "vcpu", CORE),
                    ("1", "vcpu", CORE), ("1", "emulator", CORE)} <= on_cpu, on_cpu
            assert not any(c == "1" and vm == WEB for c, _, vm in on_cpu), on_cpu
            # only this run's guests are managed (other guests on the host are policy="")
            assert {vm for _, _, vm in on_cpu} == {WEB, CORE}, on_cpu
            vms = prom.values(f'vcpud_vm_info{{instance="{target}", policy!=""}}', "vm", "policy")
            assert vms == {(WEB, "web"): 1, (CORE, "core"): 1}
            assert prom.values(f'vcpud_pin_operations_total{{instance="{target}", result="pinned"}}')[()] > 0
            assert prom.values(f"vcpud_config_last_reload_successful{sel}") == {(): 1}
            wait_rules_healthy(prom)

            # a broken policy: the reload fails, the old one stays, Prometheus sees the 0
            cfg.write_text(POLICY.replace('affinity: "0"', 'affinity: "0"\n    bogus: ['))
            n = len(daemon.notify.messages)
            daemon.hup()
            ready = daemon.notify.wait_for(lambda m: m.get("READY") == "1", start=n)
            assert "reload failed" in ready.get("STATUS", ""), ready
            prom.wait_for(f"vcpud_config_last_reload_successful{sel} == 0", bool, timeout=15,
                          what="reload failure in Prometheus")
            prom.wait_for('ALERTS{alertname="VcpudConfigReloadFailed", alertstate="pending"}', bool, timeout=15)
            after = prom.values(f'vcpud_cpu_pinned_threads{{instance="{target}", role="vcpu"}}', "cpu")
            assert after == {("0",): 3, ("1",): 1}, \
                f"a failed reload changed the pinning: {after}\n{scrape(target)}\n{daemon.log()[-6000:]}"

            sizes = check_all_queries(prom, target)
            print(f"{len(sizes)} queries ran; empty: {sorted(w for w, n in sizes.items() if not n)}")
            assert daemon.alive()
    finally:
        if daemon is not None:
            rc = daemon.stop()
            assert rc == 0, daemon.log()
        for g in guests:
            g.kill()
