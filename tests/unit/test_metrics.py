"""vcpud.metrics: the exposition of a fixed snapshot (golden file, promtool-clean), the fast
serializer against prometheus_client's (tests/unit/metrics_oracle.py), label escaping, the README's
metric list, and MetricsServer over real sockets.

Regenerate the golden file after an intended change with
``VCPUD_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_metrics.py``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, skip_or_fail
from tests.unit.metrics_oracle import render
from vcpud import __version__
from vcpud.cpuset import CpuSet
from vcpud.discovery import Role
from vcpud.metrics import ListenError, MetricsServer, exposition, model, parse_listen
from vcpud.pinning import Outcome
from vcpud.snapshot import (DURATION_BUCKETS, LATENCY_BUCKETS, Histogram, PoolView, Snapshot, ThreadView,
                            VMView)
from vcpud.vocab import EventSource, ThreadState, VMStatus

GOLDEN = Path(__file__).parent / "golden" / "metrics.txt"
PROMTOOL = "/usr/bin/promtool"


def _hist(buckets, values) -> object:
    h = Histogram(buckets)
    for v in values:
        h.observe(v)
    return h.view()


def T(role: str, cpus: str, state: str = "pinned", vcpu: int | None = None) -> ThreadView:  # noqa: N802
    return ThreadView(role=role, cpus=CpuSet.parse(cpus), state=state, vcpu=vcpu)


# Four online CPUs: a shared pool on 0-1, an exclusive one on 2-3.
CORE8 = VMView(name="core8", uuid="6f1c3a9e-2b1d-4c55-9d0e-0a1b2c3d4e5f", policy="core", status="pinned", threads=(
    T("emulator", "1"), T("emulator", "1"), T("iothread", "1"),
    T("vcpu", "2", vcpu=0), T("vcpu", "3", vcpu=1),
    T("kernel", "0-3", "unpinned"),
))
WEB1 = VMView(name="web1", uuid="", policy="web", status="pinned", threads=(
    T("emulator", "0-1"), T("vhost", "0-1"),
    T("vcpu", "0-1", vcpu=0), T("vcpu", "0-1", vcpu=1), T("vcpu", "3", "failed", vcpu=2),
    T("kernel", "0-3", "unpinned"),
))
NODBG = VMView(name="nodbg", uuid="", policy="", status="unmanaged", threads=(
    T("emulator", "0-3", "unpinned"), T("vcpu", "0-3", "unpinned", vcpu=0), T("unknown", "0-3", "unpinned"),
))
SCENARIO = Snapshot(
    version="0.1.0",
    taken_at=1700000123.5,
    online=CpuSet.parse("0-3"),
    vms=(CORE8, WEB1, NODBG),
    pools=(PoolView(name="shared", cpus=CpuSet.parse("0-1"), allocated=CpuSet(), exclusive=False),
           PoolView(name="dedicated", cpus=CpuSet.parse("2-3"), allocated=CpuSet.parse("2-3"), exclusive=True,
                    waiting=1)),
    vcpu_seconds=MappingProxyType({2: 12.5, 3: 0.75}),
    pin_operations=MappingProxyType({Outcome.PINNED: 9, Outcome.UNCHANGED: 3, Outcome.VANISHED: 1,
                                     Outcome.NO_PERMISSION: 2}),
    drift_corrections=1,
    events=MappingProxyType({EventSource.UDEV: 4, EventSource.PROC_CONNECTOR: 120, EventSource.RESCAN: 6,
                             EventSource.SIGNAL: 1}),
    rescans=8,
    vanished=5,
    proc_connector_overruns=2,
    pin_latency=_hist(LATENCY_BUCKETS, [0.00008, 0.00015, 0.0002, 0.0004, 0.003, 2.0]),
    reconcile_duration=_hist(DURATION_BUCKETS, [0.004, 0.004, 0.03]),
    config_last_reload_successful=False,
    config_last_reload_success_timestamp=1700000000.0,
    config_reloads_succeeded=3,
    config_reloads_failed=1,
)


def samples(body: bytes) -> dict[str, dict[tuple, float]]:
    """sample name -> {sorted label items: value}, parsed back with prometheus_client's parser."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            key = tuple(sorted(s.labels.items()))
            assert key not in out.setdefault(s.name, {}), f"duplicate series {s.name}{dict(key)}"
            out[s.name][key] = s.value
    return out


def promtool() -> str:
    if not os.access(PROMTOOL, os.X_OK):
        skip_or_fail(f"{PROMTOOL} not installed (Debian package prometheus; contrib/setup-dev.sh installs it)")
    return PROMTOOL


def check_metrics(body: bytes) -> None:
    p = subprocess.run([promtool(), "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), \
        f"promtool check metrics (rc {p.returncode}):\n{p.stdout.decode()}{p.stderr.decode()}"


# --- the exposition ------------------------------------------------------------------------

def test_golden():
    body = exposition(SCENARIO)
    if os.environ.get("VCPUD_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(body)
    assert body.decode() == GOLDEN.read_text(), "exposition() changed; see the module docstring to regenerate"


def test_fast_serializer_equals_prometheus_client():
    assert exposition(SCENARIO) == render(SCENARIO)
    assert exposition(None) == render(None)
    assert exposition(Snapshot()) == render(Snapshot())


def test_promtool_check_metrics_is_clean():
    check_metrics(exposition(SCENARIO))
    check_metrics(exposition(Snapshot()))


def test_scenario_values():
    s = samples(exposition(SCENARIO))
    pinned = {(dict(k)["cpu"], dict(k)["role"]): v for k, v in s["vcpud_cpu_pinned_threads"].items()}
    # every online CPU x every pinnable role, 0 where none
    assert set(pinned) == {(str(c), r) for c in range(4) for r in ("vcpu", "emulator", "iothread", "vhost")}
    assert {k: v for k, v in pinned.items() if v} == {
        ("0", "vcpu"): 2, ("1", "vcpu"): 2, ("2", "vcpu"): 1, ("3", "vcpu"): 1,  # web1's two float on 0-1
        ("0", "emulator"): 1, ("1", "emulator"): 3,   # web1's on 0-1, core8's two on 1
        ("1", "iothread"): 1, ("0", "vhost"): 1, ("1", "vhost"): 1}
    # the failed vCPU of web1, the kernel worker and the unmanaged VM count nowhere
    by_cpu = lambda name: {dict(k)["cpu"]: v for k, v in s[name].items()}  # noqa: E731
    assert by_cpu("vcpud_cpu_vcpus") == {"0": 2, "1": 2, "2": 1, "3": 1}
    assert by_cpu("vcpud_cpu_exclusive_vcpus") == {"0": 0, "1": 0, "2": 1, "3": 1}
    assert by_cpu("vcpud_cpu_vcpu_seconds_total") == {"0": 0, "1": 0, "2": 12.5, "3": 0.75}
    info = {tuple(v for _, v in k) for k in s["vcpud_cpu_vm_info"]}
    assert info == {("0", "emulator", "web1"), ("0", "vcpu", "web1"), ("0", "vhost", "web1"),
                    ("1", "emulator", "core8"), ("1", "emulator", "web1"), ("1", "iothread", "core8"),
                    ("1", "vcpu", "web1"), ("1", "vhost", "web1"), ("2", "vcpu", "core8"), ("3", "vcpu", "core8")}
    assert s["vcpud_pool_cpus"] == {
        (("pool", "dedicated"), ("state", "allocated")): 2, (("pool", "dedicated"), ("state", "free")): 0,
        (("pool", "shared"), ("state", "allocated")): 0, (("pool", "shared"), ("state", "free")): 2}
    assert s["vcpud_pool_waiting_vms"] == {(("pool", "dedicated"),): 1, (("pool", "shared"),): 0}
    assert s["vcpud_pool_exclusive"] == {(("pool", "dedicated"),): 1, (("pool", "shared"),): 0}
    assert s["vcpud_vms"] == {(("policy", ""),): 1, (("policy", "core"),): 1, (("policy", "web"),): 1}
    assert s["vcpud_vms_by_status"] == {(("status", k),): v for k, v in
                                        {"pinned": 2, "placed": 0, "floating": 0, "waiting": 0, "failed": 0,
                                         "unmanaged": 1}.items()}
    assert set(s["vcpud_vm_info"]) == {
        (("policy", "core"), ("uuid", CORE8.uuid), ("vm", "core8")),
        (("policy", "web"), ("uuid", ""), ("vm", "web1")), (("policy", ""), ("uuid", ""), ("vm", "nodbg"))}
    threads = {tuple(v for _, v in k): n for k, n in s["vcpud_threads"].items()}
    assert len(threads) == 6 * 3
    assert {k: v for k, v in threads.items() if v} == {
        ("emulator", "pinned"): 3, ("iothread", "pinned"): 1, ("vcpu", "pinned"): 4, ("vhost", "pinned"): 1,
        ("vcpu", "failed"): 1, ("kernel", "unpinned"): 2, ("emulator", "unpinned"): 1, ("vcpu", "unpinned"): 1,
        ("unknown", "unpinned"): 1}
    ops = {dict(k)["result"]: v for k, v in s["vcpud_pin_operations_total"].items()}
    assert ops == {"pinned": 9, "unchanged": 3, "vanished": 1, "no-permission": 2, "outside-cpuset": 0,
                   "mismatch": 0, "error": 0}  # no "planned": only dry runs have it
    assert s["vcpud_drift_corrections_total"] == {(): 1}
    assert s["vcpud_rescans_total"] == {(): 8}
    assert s["vcpud_vanished_total"] == {(): 5}
    assert s["vcpud_proc_connector_overruns_total"] == {(): 2}
    assert s["vcpud_config_reloads_total"] == {(("result", "success"),): 3, (("result", "failure"),): 1}
    assert {dict(k)["source"]: v for k, v in s["vcpud_events_total"].items()} == \
        {"udev": 4, "proc_connector": 120, "rescan": 6, "signal": 1}
    # histograms: cumulative buckets, +Inf == count
    lat = {dict(k)["le"]: v for k, v in s["vcpud_pin_latency_seconds_bucket"].items()}
    assert lat["0.0001"] == 1 and lat["0.00025"] == 3 and lat["0.0005"] == 4 and lat["0.005"] == 5
    assert lat["1.0"] == 5 and lat["+Inf"] == 6 == s["vcpud_pin_latency_seconds_count"][()]
    assert s["vcpud_pin_latency_seconds_sum"][()] == pytest.approx(2.00383)
    dur = {dict(k)["le"]: v for k, v in s["vcpud_reconcile_duration_seconds_bucket"].items()}
    assert dur["0.0025"] == 0 and dur["0.005"] == 2 and dur["0.05"] == 3 and dur["+Inf"] == 3
    assert s["vcpud_config_last_reload_successful"] == {(): 0}
    assert s["vcpud_config_last_reload_success_timestamp_seconds"] == {(): 1700000000.0}
    assert s["vcpud_snapshot_timestamp_seconds"] == {(): 1700000123.5}
    assert s["vcpud_build_info"] == {(("version", "0.1.0"),): 1}


def test_no_snapshot_yet_exposes_build_info_only():
    s = samples(exposition(None))
    assert s == {"vcpud_build_info": {(("version", __version__),): 1}}


def test_empty_snapshot_has_all_fixed_series():
    s = samples(exposition(Snapshot(online=CpuSet.parse("0-1"))))
    assert len(s["vcpud_cpu_pinned_threads"]) == 2 * 4
    assert s["vcpud_events_total"] == {(("source", e.value),): 0 for e in EventSource}
    assert s["vcpud_threads"] == {(("role", r.value), ("state", t.value)): 0 for r in Role for t in ThreadState}
    assert s["vcpud_vms_by_status"] == {(("status", v.value),): 0 for v in VMStatus}
    assert s["vcpud_pin_operations_total"] == {(("result", o.value),): 0 for o in Outcome if o is not Outcome.PLANNED}
    assert s["vcpud_config_reloads_total"] == {(("result", "success"),): 0, (("result", "failure"),): 0}
    for name in ("vcpud_rescans_total", "vcpud_vanished_total", "vcpud_proc_connector_overruns_total"):
        assert s[name] == {(): 0}
    assert s["vcpud_pin_latency_seconds_count"] == {(): 0}


def test_floating_vms_are_counted():
    """A VM floating over its on_exhausted pool has a status of its own, always present."""
    snap = Snapshot(online=CpuSet.parse("0-1"), vms=(
        VMView(name="a", uuid="", policy="p", status=VMStatus.FLOATING, threads=(T("vcpu", "0-1", vcpu=0),)),
        VMView(name="b", uuid="", policy="p", status="floating"),  # a value string is taken too
        VMView(name="c", uuid="", policy="p", status=VMStatus.PLACED)))
    by_status = {dict(k)["status"]: v for k, v in samples(exposition(snap))["vcpud_vms_by_status"].items()}
    assert by_status == {"pinned": 0, "placed": 1, "floating": 2, "waiting": 0, "failed": 0, "unmanaged": 0}
    assert exposition(snap) == render(snap)


def test_views_hold_enum_members():
    t = ThreadView(role="iothread", cpus=CpuSet.parse("0"), state="failed")
    assert t.role is Role.IOTHREAD and t.state is ThreadState.FAILED
    assert VMView(name="x", uuid="", policy="", status="waiting").status is VMStatus.WAITING
    with pytest.raises(ValueError):
        VMView(name="x", uuid="", policy="", status="asleep")
    with pytest.raises(ValueError):
        ThreadView(role="vcpu", cpus=CpuSet(), state="half-pinned")


def readme_metrics() -> dict[str, set[str] | None]:
    """Metric name -> its labels (None where the README gives none), from the README's Metrics section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, set[str] | None] = {}
    for name, labels in re.findall(r"`(vcpud_[a-z0-9_]+)(?:\{([a-z_,]*)\})?`", section):
        assert name not in found, f"README names {name} twice"
        found[name] = set(labels.split(",")) if labels else None
    return found


def test_readme_lists_every_family():
    exported = {f.exposed_name: set(f.labels) for f in model(SCENARIO)}
    documented = readme_metrics()
    assert set(documented) == set(exported), (
        f"missing from README: {sorted(set(exported) - set(documented))}; "
        f"not exported: {sorted(set(documented) - set(exported))}")
    for name, labels in documented.items():
        if labels is not None:
            assert labels == exported[name], f"README: {name} has labels {sorted(exported[name])}"


NASTY = ['web "quoted"', "back\\slash", "new\nline", 'all\\"\n\\n', "ünïcödé ☃", "tab\there", "{x=\"y\"}"]


def test_label_values_are_escaped():
    vms = tuple(VMView(name=n, uuid=f"u{i}", policy=n, status=VMStatus.PINNED, threads=(T("vcpu", "0", vcpu=0),))
                for i, n in enumerate(NASTY))
    snap = Snapshot(online=CpuSet.parse("0"), vms=vms)
    body = render(snap)
    assert b'vm="web \\"quoted\\""' in body and b'vm="back\\\\slash"' in body and b'vm="new\\nline"' in body
    assert exposition(snap) == body
    s = samples(body)
    assert {dict(k)["vm"] for k in s["vcpud_vm_info"]} == set(NASTY)
    assert {dict(k)["vm"] for k in s["vcpud_cpu_vm_info"]} == set(NASTY)
    assert {dict(k)["policy"] for k in s["vcpud_vms"]} == set(NASTY)
    check_metrics(body)


def test_undecodable_vm_name_still_renders():
    name = b"vm-\xff\xfe".decode("utf-8", "surrogateescape")
    snap = Snapshot(online=CpuSet.parse("0"), vms=(VMView(name=name, uuid="", policy="p", status=VMStatus.PINNED,
                                                          threads=(T("vcpu", "0", vcpu=0),)),))
    body = render(snap)
    assert exposition(snap) == body
    assert {dict(k)["vm"] for k in samples(body)["vcpud_vm_info"]} == {"vm-\\xff\\xfe"}


# Random snapshots: the fast serializer writes exactly what prometheus_client writes.
_names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_threads = st.builds(ThreadView, role=st.sampled_from(Role),
                     cpus=st.builds(CpuSet.of, st.frozensets(st.integers(0, 9), max_size=4)),
                     state=st.sampled_from(ThreadState))
_vms = st.builds(VMView, name=_names, uuid=_names, policy=_names, status=st.sampled_from(VMStatus),
                 threads=st.lists(_threads, max_size=6).map(tuple))
_snaps = st.builds(
    Snapshot, version=_names, taken_at=st.floats(0, 2e9), online=st.builds(CpuSet.of, st.frozensets(st.integers(0, 7))),
    vms=st.lists(_vms, max_size=5).map(tuple),
    vcpu_seconds=st.dictionaries(st.integers(0, 9), st.floats(0, 1e9)).map(MappingProxyType),
    pin_operations=st.dictionaries(st.sampled_from(Outcome), st.integers(0, 10**12)).map(MappingProxyType),
    events=st.dictionaries(st.sampled_from(EventSource), st.integers(0, 10**12)).map(MappingProxyType),
    drift_corrections=st.integers(0, 10**7), rescans=st.integers(0, 10**7), vanished=st.integers(0, 10**7),
    proc_connector_overruns=st.integers(0, 10**7), config_reloads_succeeded=st.integers(0, 10**7),
    config_reloads_failed=st.integers(0, 10**7),
    config_last_reload_successful=st.booleans(), config_last_reload_success_timestamp=st.floats(0, 2e9))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_snaps)
def test_fast_serializer_matches_on_random_snapshots(snap):
    assert exposition(snap) == render(snap)


# --- the server ----------------------------------------------------------------------------

class Box:
    """What the daemon does: a reference the loop replaces whole."""

    def __init__(self, snap) -> None:
        self.snap = snap
        self.reads = 0

    def __call__(self):
        self.reads += 1
        return self.snap


def get(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def server():
    made: list[MetricsServer] = []

    def start(source, listen: str = "127.0.0.1:0") -> tuple[MetricsServer, str]:
        m = MetricsServer(source)
        host, port = m.start(listen)
        made.append(m)
        return m, f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    yield start
    for m in made:
        m.stop()


def test_server_serves_scrapes_new_snapshots_and_frees_its_port(server):
    box = Box(SCENARIO)
    m, base = server(box)
    host, port = m.address
    assert host == "127.0.0.1" and port > 0
    status, headers, body = get(base + "/metrics")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert body == exposition(SCENARIO)
    assert box.reads == 1, "one scrape must read the snapshot once"
    s = samples(body)
    assert s["vcpud_cpu_pinned_threads"][(("cpu", "1"), ("role", "emulator"))] == 3

    box.snap = dataclasses.replace(SCENARIO, config_last_reload_successful=True, drift_corrections=7)
    s = samples(get(base + "/metrics")[2])
    assert s["vcpud_config_last_reload_successful"] == {(): 1}
    assert s["vcpud_drift_corrections_total"] == {(): 7}

    assert get(base + "/")[0] == 200
    assert get(base + "/nope")[0] == 404
    status, headers, body = get(base + "/metrics", method="HEAD")
    assert status == 200 and body == b""

    t0 = time.monotonic()
    m.stop()
    assert time.monotonic() - t0 < 0.5, "stop() must not wait for a poll interval"
    m.stop()  # idempotent
    assert not any(t.name == "vcpud-metrics" for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    again = MetricsServer(box)  # the same port can be served again at once
    try:
        assert again.start(f"127.0.0.1:{port}") == ("127.0.0.1", port)
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        again.stop()


def test_one_snapshot_per_scrape_under_concurrent_swaps(server):
    """While the 'loop' swaps snapshots as fast as it can, every scrape shows exactly one of them."""
    snaps = [dataclasses.replace(SCENARIO, drift_corrections=i, taken_at=1700000000.0 + i) for i in range(50)]
    bodies = {exposition(s) for s in snaps}
    box = Box(snaps[0])
    stop = threading.Event()

    def swapper():
        i = 0
        while not stop.is_set():
            box.snap = snaps[i % len(snaps)]
            i += 1

    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    try:
        _, base = server(box)
        for _ in range(40):
            assert get(base + "/metrics")[2] in bodies
    finally:
        stop.set()
        t.join()


def test_same_snapshot_is_rendered_once(server, monkeypatch):
    import vcpud.metrics.server as server_module
    calls = []
    real = server_module.exposition
    monkeypatch.setattr(server_module, "exposition", lambda s: calls.append(s) or real(s))
    box = Box(SCENARIO)
    _, base = server(box)
    for _ in range(3):
        assert get(base + "/metrics")[2] == exposition(SCENARIO)
    box.snap = dataclasses.replace(SCENARIO)
    get(base + "/metrics")
    assert len(calls) == 2


def test_source_error_is_a_500_and_the_server_lives_on(server):
    box = Box(SCENARIO)
    _, base = server(box)
    box.snap = object()  # not a snapshot: rendering fails
    assert get(base + "/metrics")[0] == 500
    box.snap = SCENARIO
    assert get(base + "/metrics")[0] == 200


def test_idle_client_does_not_block_scrapes(server):
    _, base = server(Box(SCENARIO))
    port = int(base.rsplit(":", 1)[1])
    idle = socket.create_connection(("127.0.0.1", port))  # connects, says nothing
    try:
        t0 = time.monotonic()
        assert get(base + "/metrics")[0] == 200
        assert time.monotonic() - t0 < 1
    finally:
        idle.close()


def test_ipv6_loopback(server):
    if not socket.has_ipv6:
        skip_or_fail("no IPv6 support")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as e:
        skip_or_fail(f"no IPv6 loopback: {e}")
    m, base = server(Box(SCENARIO), "[::1]:0")
    assert m.address[0] == "::1"
    assert get(base + "/metrics")[0] == 200


def test_bind_errors_are_oserrors():
    a = MetricsServer(Box(SCENARIO))
    host, port = a.start("127.0.0.1:0")
    try:
        b = MetricsServer(Box(SCENARIO))
        with pytest.raises(OSError):
            b.start(f"127.0.0.1:{port}")
        b.stop()
    finally:
        a.stop()
    with pytest.raises(OSError):
        MetricsServer(Box(SCENARIO)).start("192.0.2.1:0")  # TEST-NET-1: on no interface here


@pytest.mark.parametrize("spec,want", [
    ("127.0.0.1:9474", ("127.0.0.1", 9474)), ("[::1]:9474", ("::1", 9474)), ("[::]:0", ("::", 0)),
    ("0.0.0.0:9474", ("0.0.0.0", 9474)), ("localhost:1", ("localhost", 1)), (" 0.0.0.0:65535 ", ("0.0.0.0", 65535)),
    ("127.0.0.1:0", ("127.0.0.1", 0)), ("[fe80::1%lo]:9474", ("fe80::1%lo", 9474)),
])
def test_parse_listen(spec, want):
    assert parse_listen(spec) == want


@pytest.mark.parametrize("spec", ["9474", "127.0.0.1", "::1:9474", "[::1]9474", "[nope]:1", "h:65536", "h:-1",
                                  "h:x", "h:", "[::1]:", "h:１２", ":9474", ":0", "off", "bad_host:1", "1.2.3.256:1"])
def test_parse_listen_rejects(spec):
    with pytest.raises(ListenError) as e:
        parse_listen(spec)
    assert isinstance(e.value, OSError) and isinstance(e.value, ValueError)


def test_parse_listen_wants_an_explicit_host_to_listen_everywhere():
    # `:PORT` used to bind every IPv4 interface; binding beyond loopback is written out now.
    with pytest.raises(ListenError, match=r"the host is missing: write 0\.0\.0\.0:9474 .* or \[::\]:9474"):
        parse_listen(":9474")


def test_setup_script_installs_promtool():
    """The test suite needs promtool and prometheus: contrib/setup-dev.sh must install them."""
    text = (REPO / "contrib" / "setup-dev.sh").read_text()
    need = next(line for line in text.splitlines() if line.startswith("need=("))
    assert " prometheus" in need.replace(")", " )"), need
    if shutil.which("promtool") is None:
        skip_or_fail("promtool not installed: run contrib/setup-dev.sh")


def test_each_snapshot_is_rendered_once_at_the_scrape_that_finds_it():
    box = {"snap": Snapshot(version="a")}
    server = MetricsServer(lambda: box["snap"])
    server.start("127.0.0.1:0")
    try:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            assert r.read() == exposition(box["snap"])
        first = server._cache
        assert first is not None and first[0] is box["snap"]
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            assert r.read() == exposition(box["snap"])
        assert server._cache is first  # the same snapshot: the same bytes, not rendered again
        new = Snapshot(version="b", online=CpuSet.parse("0-3"))
        box["snap"] = new  # what the daemon's publish does: one reference swap
        assert server._cache is first  # nothing rendered until someone asks
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            assert r.read() == exposition(new)
        assert server._cache is not None and server._cache[0] is new
    finally:
        server.stop()
