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
from vcpud.daemon import Daemon
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
               use_udev=False, use_connector=False, clock=clock, exe_check=tree.exe_check())
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


def test_reload_by_sighup_keeps_the_policy_on_errors_and_applies_a_good_one(daemon):
    d, tree, act, clock, notifier, cfg = daemon
    named = tree.pid("named")
    assert tree.procfs().affinity(named, named) == CpuSet.parse("0")
    good = cfg.read_text()
    cfg.write_text("policies: [\n")
    os.kill(os.getpid(), signal.SIGHUP)
    d.turn()
    ready = [m for m in notifier.messages if m.get("READY") == "1"]
    assert ready and ready[-1]["STATUS"].startswith("reload failed")
    assert d.snapshot.config_last_reload_successful is False
    assert d.snapshot.config_reloads_failed == 1
    assert d.snapshot.events[EventSource.SIGNAL] == 1
    cfg.write_text(good.replace('emulatorpin: "0"', 'emulatorpin: "3"'))
    os.kill(os.getpid(), signal.SIGHUP)
    d.turn()
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
