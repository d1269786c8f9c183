"""Exclusive pools with the real daemon and real guests: restarts, corrupt state, waiting VMs, CPU hot-unplug."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.daemon_harness import DaemonProc
from tests.integration.test_apply_qemu import ONLINE, need_host
from tests.qemu import RUN, Guest, start_guest

pytestmark = pytest.mark.qemu

CONFIG = """\
state_file: {state}
rescan_interval: {rescan}
pools:
  dedicated: {{cpus: "0-1", exclusive: true}}
policies:
  - name: db
    match: {{name: "{run}db*"}}
    vcpus: {{pool: dedicated}}
    on_exhausted: leave
"""


@pytest.fixture
def env(tmp_path):
    need_host()
    if ONLINE != frozenset({0, 1}) and not {0, 1} <= set(ONLINE):
        skip_or_fail("needs CPUs 0 and 1")
    daemons: list[DaemonProc] = []
    guests: list[Guest] = []

    class Env:
        state = tmp_path / "state.json"
        cfg = tmp_path / "vcpud.yaml"

        def write(self, rescan="1h"):
            self.cfg.write_text(CONFIG.format(state=self.state, rescan=rescan, run=RUN))

        def daemon(self) -> DaemonProc:
            d = DaemonProc(tmp_path, self.cfg)
            daemons.append(d)
            return d

        def guest(self, name) -> Guest:
            g = start_guest(tmp_path, RUN + name, smp="1")
            guests.append(g)
            return g

    e = Env()
    e.write()
    yield e
    for d in daemons:
        d.stop()
    for g in guests:
        g.kill()


def vcpu_cpus(g: Guest) -> str:
    tid = next(t for t, c in g.threads().items() if c == "CPU 0/KVM")
    return g.affinity(tid)


def wait_for(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.01)


def dedicated(gs: list[Guest]) -> dict[str, str]:
    """name -> the single CPU its vCPU is pinned to, once every guest has one."""
    out = {g.name.removeprefix(RUN): vcpu_cpus(g) for g in gs}
    return out if all(v in ("0", "1") for v in out.values()) else {}


def test_restart_keeps_cpus_and_corrupt_state_is_rebuilt(env):
    d = env.daemon()
    db1, db2 = env.guest("db1"), env.guest("db2")
    placed = wait_for(lambda: dedicated([db1, db2]), what="both VMs placed")
    assert placed["db1"] != placed["db2"]
    saved = json.loads(env.state.read_text())
    assert sorted((v["name"], v["vcpus"]) for v in saved["vms"]) == \
        sorted((RUN + n, [int(c)]) for n, c in placed.items())

    # kill -9 the daemon and start it again: the same VMs keep the same CPUs
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    d2 = env.daemon()
    assert dedicated([db1, db2]) == placed
    assert "rebuilt from live affinities" not in d2.log()
    assert f"pinned VM {RUN}db" not in d2.log()  # nothing had to move

    # a corrupt state file: rebuilt from what the threads show, still no CPU twice
    d2.proc.send_signal(signal.SIGKILL)
    d2.proc.wait()
    env.state.write_text('{"version": 1, "vms": [{"pid": "garbage"')
    d3 = env.daemon()
    assert "rebuilt from live affinities: adopted 2 VMs" in d3.log(), d3.log()
    assert f"adopted pid {db1.pid}:" in d3.log() and f"adopted pid {db2.pid}:" in d3.log(), d3.log()
    assert dedicated([db1, db2]) == placed
    assert json.loads(env.state.read_text())["version"] == 1  # rewritten whole


def test_waiting_vm_placed_when_cpus_free_up(env):
    d = env.daemon()
    db1, db2 = env.guest("db1"), env.guest("db2")
    wait_for(lambda: dedicated([db1, db2]), what="both VMs placed")
    db3 = env.guest("db3")
    status = d.notify.wait_for(lambda m: "waiting for pool CPUs" in m.get("STATUS", ""), timeout=15)
    assert "1 VMs waiting" in status["STATUS"]
    # that STATUS is sent after the scan that placed db3 as waiting: the daemon has looked at it
    assert vcpu_cpus(db3) == ONLINE.format()  # on_exhausted: leave -> left where it was
    freed = vcpu_cpus(db1)
    db1.kill()
    wait_for(lambda: vcpu_cpus(db3) == freed, what="waiting VM placed on the freed CPU")
    assert vcpu_cpus(db2) != freed


def test_cpu_hot_unplug_replaces_and_replug_reuses(env):
    online_file = Path("/sys/devices/system/cpu/cpu1/online")
    if not online_file.exists():
        skip_or_fail("CPU 1 cannot be taken offline here")
    d = env.daemon()
    db1, db2 = env.guest("db1"), env.guest("db2")
    placed = wait_for(lambda: dedicated([db1, db2]), what="both VMs placed")
    on1 = db1 if placed["db1"] == "1" else db2
    on0 = db2 if on1 is db1 else db1
    try:
        online_file.write_text("0")
        def last_status() -> str:
            return d.notify.messages[-1].get("STATUS", "") if d.notify.messages else ""

        # the VM that had CPU 1 loses it: it waits (pool has only CPU 0, held by the other)
        wait_for(lambda: "waiting for pool CPUs" in last_status(), timeout=5, what="STATUS reports a waiting VM")
        assert vcpu_cpus(on0) == "0"  # the other one never moves
    finally:
        online_file.write_text("1")
        from tests.libvirtd import restore_machine_cpuset

        restore_machine_cpuset()  # libvirt's v1 `machine` cpuset would stay without CPU 1
    wait_for(lambda: vcpu_cpus(on1) == "1", timeout=5, what="VM placed on CPU 1 again")
    assert vcpu_cpus(on0) == "0"
    assert "online CPUs changed" in d.log()


def test_kill_9_at_any_moment_never_double_books(env):
    gs = [env.guest(f"db{i}") for i in range(3)]  # 3 VMs, 2 CPUs: one always waits
    rng = random.Random(4)
    for _ in range(8):
        d = env.daemon()
        time.sleep(rng.uniform(0, 0.15))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        singles = [vcpu_cpus(g) for g in gs]
        held = [c for c in singles if c in ("0", "1")]
        assert len(held) == len(set(held)), f"double-booked: {singles}"
    d = env.daemon()
    final = wait_for(lambda: sorted(c for c in (vcpu_cpus(g) for g in gs) if c in ("0", "1")) == ["0", "1"]
                     and [vcpu_cpus(g) for g in gs], what="two VMs placed")
    assert final.count("0") == 1 and final.count("1") == 1, final
    assert d.alive()
