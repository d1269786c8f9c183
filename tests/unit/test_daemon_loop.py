"""The daemon's loop in-process: real signals and wakeup socket, the reconciler over a captured /proc
tree, a recording notifier, a fake clock and actuator; no root, no qemu, no netlink."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from textwrap import dedent

import pytest

from tests.proctree import ProcTree, load
from tests.unit.test_reconciler import FIXED, Actuator, Clock
from vcpud.cpuset import CpuSet
from vcpud.daemon import PUBLISH_INTERVAL, Daemon
from vcpud.reconciler import ScanReason
from vcpud.sdnotify import Notifier
from vcpud.vocab import EventSource


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, str]] = []
        self.watchdog_interval = None

    def send(self, *lines: str) -> None:
        self.messages.append(dict(line.split("=", 1) for line in lines))


@pytest.fixture
def daemon(tmp_path: Path, unpacked):
    tree: ProcTree = load(tmp_path / "proc")
    cfg = tmp_path / "vcpud.yaml"
    cfg.write_text(dedent(FIXED % "2") + f"rescan_interval: 10s\nstate_file: {tmp_path}/state.json\n")
    act, clock, notifier = Actuator(tree), Clock(), RecordingNotifier()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    # x86_64-dell_e4310: 4 CPUs, 2 cores x 2 threads; the fixtures' CPUs are 0-3
    d = Daemon(cfg, sysroot=unpacked("x86_64-dell_e4310"), proc=tree.root, ops=act, notifier=notifier,
               use_udev=False, use_connector=False, clock=clock, exe_check=tree.exe_check(), use_libvirt=False)
    d.metrics_listen = "off"
    d.load()
    d.open_sources()
    d.reconciler.rescan(ScanReason.STARTUP)
    d.publish()
    d.next_rescan = clock() + 10
    try:
        yield d, tree, act, clock, notifier, cfg
    finally:
        d.close()
        for s, h in saved.items():
            signal.signal(s, h)


def reload_and_wait(d: Daemon) -> None:
    """SIGHUP, then turn the loop until the background read is taken up (the loader wakes it)."""
    done = d.stats.reloads_ok + d.stats.reloads_failed
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(100):
        d.turn()
        if d.stats.reloads_ok + d.stats.reloads_failed > done:
            d.clock.advance(PUBLISH_INTERVAL)  # type: ignore[attr-defined]
            d.turn()  # the snapshot readers see: published at most every PUBLISH_INTERVAL
            return
    raise AssertionError("the reload never finished")


def test_reload_by_sighup_keeps_the_policy_on_errors_and_applies_a_good_one(daemon):
    d, tree, act, clock, notifier, cfg = daemon
    named = tree.pid("named")
    assert tree.procfs().affinity(named, named) == CpuSet.parse("0")
    good = cfg.read_text()
    cfg.write_text("policies: [\n")
    reload_and_wait(d)
    ready = [m for m in notifier.messages if m.get("READY") == "1"]
    assert ready and ready[-1]["STATUS"].startswith("reload failed")
    assert d.snapshot.config_last_reload_successful is False
    assert d.snapshot.config_reloads_failed == 1
    assert d.snapshot.events[EventSource.SIGNAL] >= 1
    cfg.write_text(good.replace('emulatorpin: "0"', 'emulatorpin: "3"'))
    reload_and_wait(d)
    assert tree.procfs().affinity(named, named) == CpuSet.parse("3")
    assert d.snapshot.config_last_reload_successful is True
    assert "reload failed" not in notifier.messages[-1]["STATUS"]


def test_drift_is_corrected_by_the_due_rescan(daemon):
    d, tree, act, clock, notifier, cfg = daemon
    named = tree.pid("named")
    vcpu1 = tree.tid_by_comm(named, "CPU 1/KVM")
    tree.set_affinity(named, vcpu1, [0])
    rescans = d.snapshot.rescans
    clock.advance(10)
    d.turn()
    assert tree.procfs().affinity(named, vcpu1) == CpuSet.parse("1")
    assert d.snapshot.rescans == rescans + 1 and d.snapshot.drift_corrections == 1
    assert d.next_rescan == clock() + 10


def test_sigterm_stops_the_loop(daemon):
    d, *_ = daemon
    os.kill(os.getpid(), signal.SIGTERM)
    d.turn()
    assert d.stop_requested


def test_a_slow_reload_does_not_hold_up_pinning(daemon, monkeypatch):
    """While the new configuration is being read, new threads are still pinned by the old one."""
    import threading

    import vcpud.reloader

    d, tree, act, clock, notifier, cfg = daemon
    gate, reading = threading.Event(), threading.Event()
    real = vcpud.reloader.load_config

    def slow(*args, **kw):
        reading.set()
        assert gate.wait(30), "the test never let the reload finish"
        return real(*args, **kw)

    monkeypatch.setattr(vcpud.reloader, "load_config", slow)
    cfg.write_text(cfg.read_text().replace('iothreadpin: "1"', 'iothreadpin: "3"'))
    named = tree.pid("named")
    os.kill(os.getpid(), signal.SIGHUP)
    d.turn()
    assert reading.wait(30) and d.loader.busy
    tree.add_thread(named, 15000, "IO io2")
    tree.set_affinity(named, 15000, [0, 1, 2, 3])
    d.reconciler.on_fork(15000, named)
    clock.advance(0.01)
    d.turn()  # the read is still blocked: the loop pins by the running policy all the same
    assert d.loader.busy and act.moved()[15000] == CpuSet.parse("1")
    gate.set()
    for _ in range(100):
        d.turn()
        if not d.loader.busy:
            break
    assert tree.procfs().affinity(named, 15000) == CpuSet.parse("3")
    assert d.stats.reloads_ok == 1


def test_a_reload_that_raises_anything_is_a_failed_reload_not_a_dead_daemon(daemon, monkeypatch):
    import vcpud.reloader

    d, tree, act, clock, notifier, cfg = daemon

    def broken(*args, **kw):
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

    monkeypatch.setattr(vcpud.reloader, "load_config", broken)
    reload_and_wait(d)
    assert d.stats.reloads_failed == 1 and not d.stop_requested
    assert "internal error" in notifier.messages[-1]["STATUS"]


class WatchRecorder:
    """Stands in for the ProcConnector (never registered with the selector): records watch()."""

    def __init__(self) -> None:
        self.calls: list[frozenset[int]] = []

    def watch(self, tgids) -> None:
        self.calls.append(frozenset(tgids))

    def close(self) -> None:
        pass


def test_the_connector_watches_the_vms_and_processes_due_and_only_on_a_change(daemon):
    d, tree, act, clock, notifier, cfg = daemon
    rec = d.reconciler
    d.sources.connector = conn = WatchRecorder()

    def turn() -> None:
        clock.advance(10)  # a timer is due: the turn does not sleep (the clock is not the select's)
        d.turn()

    vms = set(rec.vms)
    assert tree.pid("named") in vms and tree.pid("shell") not in vms
    due = set(rec.due)
    turn()
    assert conn.calls[0] == frozenset(vms | due)  # before the loop first sleeps
    while rec.due:  # the follow-ups of the VMs found at startup end
        turn()
    turn()
    assert conn.calls[-1] == frozenset(vms)
    calls = len(conn.calls)
    turn()
    turn()
    assert len(conn.calls) == calls, "an unchanged set rebuilds nothing"
    new = 31000
    tree.clone_process(tree.pid("named"), new)
    rec.on_exec(new)  # the exec of a new VM passed the filter: the next turn watches it
    turn()
    assert new in conn.calls[-1] and vms <= conn.calls[-1]
    rec.on_kvm_uevent("create", tree.pid("shell"))  # due for a look: watched until looked at
    assert tree.pid("shell") in rec.watched()
    tree.remove_process(new)
    rec.on_exit(new, new)
    while rec.due:
        turn()
    turn()
    assert conn.calls[-1] == frozenset(vms)
