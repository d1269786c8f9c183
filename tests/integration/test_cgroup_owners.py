"""Real qemu guests in real cgroup v1 cpusets made for the test: a Proxmox-style shared scope that
refuses the policy (said once, predicted), and libvirt-style per-thread cgroups pinned by writing them."""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import run_vcpud, skip_or_fail
from tests.daemon_harness import DaemonProc
from tests.qemu import QEMU, RUN, start_guest

pytestmark = pytest.mark.qemu

CPUSET = Path("/sys/fs/cgroup/cpuset")


def need_host() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root to make cpuset cgroups and pin")
    if not Path(QEMU).exists():
        skip_or_fail("qemu-system-x86_64 is not installed")
    if not (CPUSET / "tasks").exists():
        skip_or_fail("no cgroup v1 cpuset hierarchy at /sys/fs/cgroup/cpuset")
    if not {0, 1} <= os.sched_getaffinity(0):
        skip_or_fail("needs CPUs 0 and 1")


def mkcg(d: Path, cpus: str) -> Path:
    d.mkdir()
    (d / "cpuset.mems").write_text((d.parent / "cpuset.mems").read_text())
    (d / "cpuset.cpus").write_text(cpus)
    return d


@pytest.fixture
def parent():
    """vcpud-test-PID under the cpuset root; removed (deepest first) after the guests are killed."""
    need_host()
    top = mkcg(CPUSET / f"vcpud-test-{os.getpid()}", "0-1")
    try:
        yield top
    finally:
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)  # the killed guest's threads still leaving


def move(cg: Path, tid: int) -> None:
    (cg / "tasks").write_text(str(tid))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pins(port: int, result: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf'^vcpud_pin_operations_total\{{result="{re.escape(result)}"\}} (\S+)$', text, re.M)
    assert m, text[:2000]
    return float(m.group(1))


def test_shared_scope_refuses_once_predicted_and_not_retried(tmp_path, parent):
    scope = mkcg(mkcg(parent / "qemu.slice", "0-1") / "100.scope", "1")
    g = start_guest(tmp_path, f"{RUN}pve")
    try:
        (scope / "cgroup.procs").write_text(str(g.pid))  # every thread, as systemd puts a process in a scope
        assert all(g.affinity(t) == "1" for t in g.threads())
        cfg = tmp_path / "vcpud.yaml"
        cfg.write_text(f'rescan_interval: 200ms\nstate_file: {tmp_path / "state.json"}\npolicies:\n'
                       f'  - name: pve\n    match: {{name: "{RUN}pve"}}\n    affinity: "0"\n')
        where = f"/vcpud-test-{os.getpid()}/qemu.slice/100.scope"

        dry = run_vcpud("apply", "--dry-run", "--config", str(cfg))
        assert dry.returncode == 1, dry.stdout + dry.stderr
        assert "would fail (outside-cpuset)" in dry.stdout and where in dry.stdout, dry.stdout
        assert "allows 1" in dry.stdout

        real = run_vcpud("apply", "--config", str(cfg))
        assert real.returncode == 1, real.stdout + real.stderr
        mine = [line for line in real.stdout.splitlines() if where in line]
        assert len(mine) == 1, real.stdout  # one message naming the cgroup, not one per thread
        assert "failed (outside-cpuset)" in mine[0] and "AllowedCPUs" in mine[0] and "vcpu 0" in mine[0]
        assert all(g.affinity(t) == "1" for t in g.threads())

        ps = run_vcpud("ps", "--json", "--config", str(cfg), check=True)
        import json
        vm = next(v for v in json.loads(ps.stdout)["vms"] if v["pid"] == g.pid)
        assert vm["status"] == "failed"
        vcpus = [t for t in vm["threads"] if t["role"] == "vcpu"]
        assert vcpus and all(not t["ok"] and t["would"] == "outside-cpuset" and t["cgroup"]["path"] == where
                             and t["via"] == "sched_setaffinity" for t in vcpus)
        plan = run_vcpud("plan", "--config", str(cfg), check=True)
        assert "would fail (outside-cpuset)" in plan.stdout and where in plan.stdout, plan.stdout

        port = free_port()
        d = DaemonProc(tmp_path, cfg, "--metrics-listen", f"127.0.0.1:{port}")
        try:
            d.wait_log(r"cannot pin VM .*pve", timeout=10)
            first = pins(port, "outside-cpuset")
            rescans = d.log().count("full scan (rescan)")
            time.sleep(2.0)
            assert d.log().count("full scan (rescan)") >= rescans + 5
            assert pins(port, "outside-cpuset") > first  # counted at every rescan
            log = d.log()
            warned = [line for line in log.splitlines() if "WARNING" in line and "cannot pin" in line and "pve" in line]
            assert len(warned) == 1, warned
            assert where in warned[0] and "allows 1" in warned[0]
            assert "trying again" not in log
            # the operator widens the scope: tried again and pinned at the next rescan
            (scope / "cpuset.cpus").write_text("0-1")
            d.wait_log(r"pinned VM .*pve.*vcpu 0", timeout=10)
            assert all(g.affinity(t) == "0" for t, comm in g.threads().items() if comm.startswith("CPU "))
        finally:
            d.stop()
    finally:
        g.kill()


def test_libvirt_layout_pinned_by_writing_its_per_thread_cgroups(tmp_path, parent):
    name = f"{RUN}lv"
    vmcg = mkcg(mkcg(parent / "machine", "0-1") / f"qemu-1-{name}.libvirt-qemu", "0-1")
    cgs = {n: mkcg(vmcg / n, "1") for n in ("emulator", "vcpu0", "vcpu1")}
    g = start_guest(tmp_path, name)
    try:
        for tid, comm in g.threads().items():
            m = re.match(r"CPU (\d+)/", comm)
            move(cgs[f"vcpu{m.group(1)}"] if m else cgs["emulator"], tid)
        assert all(g.affinity(t) == "1" for t in g.threads())
        cfg = tmp_path / "vcpud.yaml"
        cfg.write_text(f'state_file: {tmp_path / "state.json"}\npolicies:\n'
                       f'  - name: lv\n    match: {{name: "{name}"}}\n    vcpupin: {{0: "0", 1: "0"}}\n'
                       f'    emulatorpin: "1"\n')

        dry = run_vcpud("apply", "--dry-run", "--config", str(cfg))
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "via cgroup" in dry.stdout and (cgs["vcpu0"] / "cpuset.cpus").read_text().strip() == "1"
        plan = run_vcpud("plan", "--config", str(cfg), check=True)
        assert "pinned via cgroup" in plan.stdout, plan.stdout

        real = run_vcpud("apply", "--config", str(cfg))
        assert real.returncode == 0, real.stdout + real.stderr
        assert "(via cgroup)" in real.stdout, real.stdout
        for i in (0, 1):
            assert (cgs[f"vcpu{i}"] / "cpuset.cpus").read_text().strip() == "0"
        vcpus = {t for t, comm in g.threads().items() if comm.startswith("CPU ")}
        assert len(vcpus) == 2 and all(g.affinity(t) == "0" for t in vcpus)
        assert (cgs["emulator"] / "cpuset.cpus").read_text().strip() == "1"  # shared: never written
        again = run_vcpud("apply", "--config", str(cfg))
        assert again.returncode == 0 and "0 pinned" in again.stdout, again.stdout
    finally:
        g.kill()
