"""libvirt's domains, started by a real libvirtd while `vcpud run` runs, pinned through libvirt."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProc
from tests.libvirtd import Libvirtd, check_installed, domain, virsh
from tests.qemu import RUN

pytestmark = pytest.mark.qemu

# Generous functional bounds; the timings themselves belong to a benchmark.
ON_POLICY_WITHIN = 1.0   # s after `virsh start` returns: no sample off-policy later than this
RESCAN = "1s"

POLICY = f"""\
rescan_interval: {RESCAN}
policies:
  - name: lv
    match: {{name: "{RUN}lv-*"}}
    vcpupin: {{0: "0", 1: "1"}}
    emulatorpin: "0"
    iothreadpin: "1"
"""
# what the policy wants, by thread name
WANT = {"CPU 0/KVM": "0", "CPU 1/KVM": "1", "IO iothread1": "1", "qemu-system-x86": "0"}
# libvirt's own pins, each contradicting the policy
CONTRADICTING = ("<vcpupin vcpu='0' cpuset='1'/><vcpupin vcpu='1' cpuset='0'/>"
                 "<emulatorpin cpuset='1'/><iothreadpin iothread='1' cpuset='0'/>")


@pytest.fixture(scope="module")
def libvirtd():
    check_installed()
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    lv = Libvirtd()
    lv.start()
    try:
        yield lv
    finally:
        lv.stop()


@pytest.fixture
def vcpud(tmp_path, libvirtd):
    cfg = tmp_path / "vcpud.yaml"
    cfg.write_text(POLICY)
    d = DaemonProc(tmp_path, cfg)
    try:
        yield d
    finally:
        d.stop()


def affinities(pid: int) -> dict[int, tuple[str, str]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M)
        out[int(tid)] = (comm, m.group(1) if m else "?")
    return out


class Sampler:
    """Every few ms, each thread's affinity; ``off`` lists (time, comm, affinity) off-policy."""

    def __init__(self, pid_of, t0: float, period: float = 0.002) -> None:
        self.pid_of, self.t0, self.period = pid_of, t0, period
        self.off: list[tuple[float, str, str]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pid = self.pid_of()
                now = time.monotonic() - self.t0
                for comm, aff in affinities(pid).values():
                    if comm in WANT and aff != WANT[comm]:
                        self.off.append((now, comm, aff))
                self.samples += 1
            except (OSError, ValueError):
                pass
            time.sleep(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)


def virsh_pins(name: str) -> dict[str, str]:
    out = {}
    for line in virsh("vcpupin", name).splitlines():
        m = re.match(r"\s*(\d+)\s+(\S+)", line)
        if m:
            out[f"vcpu{m.group(1)}"] = m.group(2)
    m = re.search(r"\*:\s*(\S+)", virsh("emulatorpin", name))
    out["emulator"] = m.group(1) if m else "?"
    for line in virsh("iothreadinfo", name).splitlines():
        m = re.match(r"\s*(\d+)\s+(\S+)", line)
        if m:
            out[f"iothread{m.group(1)}"] = m.group(2)
    return out


def wait_on_policy(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = affinities(pid)
        if all(WANT[c] == a for c, a in now.values() if c in WANT):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not on policy: {now}")
        time.sleep(0.01)


def started_on_policy(dom, vcpud) -> None:
    """Start ``dom``; from `virsh start` returning on, sampled every 2 ms for 3 s: on policy after
    ON_POLICY_WITHIN, and libvirt agrees."""
    t0 = dom.start()
    sampler = Sampler(dom.pid, t0)
    time.sleep(3.0)
    sampler.stop()
    late = [s for s in sampler.off if s[0] > ON_POLICY_WITHIN]
    last = max((s[0] for s in sampler.off), default=0.0)
    print(f"{sampler.samples} samples; {len(sampler.off)} off-policy, the last {last * 1000:.0f} ms "
          "after virsh start returned")
    assert sampler.samples > 100
    assert not late, f"off-policy after {ON_POLICY_WITHIN}s: {late[:5]}\n{vcpud.log()[-3000:]}"
    assert virsh_pins(dom.name) == {"vcpu0": "0", "vcpu1": "1", "emulator": "0", "iothread1": "1"}
    log = vcpud.log()
    assert "through libvirt" in log
    assert "cannot pin" not in log, log
    assert "had been moved" not in log, log  # libvirt's own setup is not drift


def test_contradicting_cputune_is_overridden_through_libvirt(tmp_path, vcpud):
    import json

    from tests.conftest import run_vcpud

    with domain(tmp_path, "tune", cputune=CONTRADICTING) as dom:
        started_on_policy(dom, vcpud)
        # ps says which owner pins the domain's threads, and predicts no failure through it
        out = json.loads(run_vcpud("ps", "--json", "--config", str(tmp_path / "vcpud.yaml"), check=True).stdout)
        mine = [v for v in out["vms"] if v["pid"] == dom.pid()]
        assert len(mine) == 1, (dom.pid(), [(v["pid"], v["name"]) for v in out["vms"]])
        vm = mine[0]
        pinned = [t for t in vm["threads"] if t["want"] is not None]
        assert pinned and all(t["via"] == "libvirt" and t["would"] is None for t in pinned), pinned
        assert vm["status"] == "pinned", vm["status"]


def test_contradicting_vcpu_cpuset_is_overridden_through_libvirt(tmp_path, vcpud):
    # <vcpu placement='static' cpuset='1'>: every vCPU (and the emulator) confined to CPU 1
    with domain(tmp_path, "cpuset", vcpu_cpuset="1") as dom:
        started_on_policy(dom, vcpud)


def test_hotplugged_vcpu_ends_on_policy(tmp_path, vcpud):
    with domain(tmp_path, "hot", vcpus=1, maxvcpus=2) as dom:
        dom.start()
        pid = dom.pid()
        wait_on_policy(pid)
        virsh("setvcpus", dom.name, "2", "--live")
        deadline = time.monotonic() + 15  # functional; the timing is in tests/benchmarks/bench_libvirt.py
        while True:
            now = affinities(pid)
            if any(c == "CPU 1/KVM" for c, _ in now.values()) and all(WANT[c] == a for c, a in now.values()
                                                                      if c in WANT):
                break
            assert time.monotonic() < deadline, f"hot-plugged vCPU not on policy: {now}\n{vcpud.log()[-3000:]}"
            time.sleep(0.01)
        time.sleep(0.5)  # and it stays there: libvirt's own setup of the vCPU came before
        wait_on_policy(pid, timeout=0)
        assert virsh_pins(dom.name)["vcpu1"] == "1"
        assert "cannot pin" not in vcpud.log()


def test_virsh_vcpupin_is_drift_put_back(tmp_path, vcpud):
    with domain(tmp_path, "drift", cputune=CONTRADICTING) as dom:
        dom.start()
        pid = dom.pid()
        wait_on_policy(pid)
        start = len(vcpud.log())
        virsh("vcpupin", dom.name, "0", "1", "--live")
        t = time.monotonic()
        wait_on_policy(pid, timeout=2.0)  # one rescan (1 s), and the tunable event is faster still
        print(f"virsh vcpupin put back in {(time.monotonic() - t) * 1000:.0f} ms")
        assert virsh_pins(dom.name)["vcpu0"] == "0"
        vcpud.wait_log(r"had been moved to 1; put back on 0", start=start)
        time.sleep(2.5)  # two more rescans: nothing more to say
        later = vcpud.log()[start:]
        assert len(re.findall(r"WARNING", later)) == 1, later


def test_libvirtd_restart_reconnects(tmp_path, vcpud, libvirtd):
    with domain(tmp_path, "restart") as dom:
        dom.start()
        pid = dom.pid()
        wait_on_policy(pid)
        libvirtd.restart()
        vcpud.wait_log(r"connected to libvirt .*", count=2, timeout=30)
        virsh("vcpupin", dom.name, "1", "0", "--live")
        wait_on_policy(pid, timeout=3.0)
        assert virsh_pins(dom.name) == {"vcpu0": "0", "vcpu1": "1", "emulator": "0", "iothread1": "1"}


def test_one_shot_commands_pin_through_libvirt(tmp_path, libvirtd):
    """`apply`, `plan` and `ps` import libvirt-python only for a libvirt domain, and then use it."""
    import json

    from tests.conftest import run_vcpud

    cfg = tmp_path / "vcpud.yaml"
    cfg.write_text(POLICY + f"state_file: {tmp_path / 'state.json'}\n")
    with domain(tmp_path, "once", cputune=CONTRADICTING) as dom:
        dom.start()
        dry = run_vcpud("apply", "--dry-run", "--config", str(cfg))
        mine = [line for line in dry.stdout.splitlines() if line.startswith(dom.name)]
        assert len(mine) == 1 and "(via libvirt)" in mine[0], dry.stdout
        plan = run_vcpud("plan", "--config", str(cfg), check=True)
        assert "pinned via libvirt" in plan.stdout, plan.stdout
        real = run_vcpud("apply", "--config", str(cfg))
        assert real.returncode == 0, real.stdout + real.stderr
        assert virsh_pins(dom.name) == {"vcpu0": "0", "vcpu1": "1", "emulator": "0", "iothread1": "1"}
        wait_on_policy(dom.pid())
        out = json.loads(run_vcpud("ps", "--json", "--config", str(cfg), check=True).stdout)
        (vm,) = [v for v in out["vms"] if v["pid"] == dom.pid()]
        assert vm["status"] == "pinned" and {t["via"] for t in vm["threads"] if t["want"]} == {"libvirt"}, vm
