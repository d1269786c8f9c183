"""`vcpud apply` and `vcpud ps` against real qemu-system-x86_64 guests on this host."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import run_vcpud, skip_or_fail
from tests.qemu import QEMU, RUN, Guest, kvm_usable, start_guest
from vcpud import cli
from vcpud.cpuset import CpuSet
from vcpud.discovery import scan
from vcpud.engine import reconcile
from vcpud.pinning import OsAffinity, Outcome
from vcpud.config import load_config
from vcpud.procfs import Procfs

pytestmark = pytest.mark.qemu

ONLINE = CpuSet.of(os.sched_getaffinity(0))

POLICY = """\
policies:
  - name: core8
    match: {name: @core8}
    vcpupin: {0: "0", 1: "1", 2: "0"}
    vcpus: "1"
    emulatorpin: "1"
    iothreadpin: "0"
  - name: web
    match: {name: "@web*"}
    affinity: "0"
  - name: nodbg
    match: {name: @nodbg}
    vcpupin: {0: "1", 1: "0"}
    emulatorpin: "0"
  - name: catch-all          # a look-alike vcpud took for a VM would be pinned to CPU 1
    match: {cmdline: 'MARK_RE'}
    affinity: "1"
"""
# The look-alikes' last argument (a duration sleep accepts): the catch-all policy matches it and nothing
# else, so that `vcpud apply` leaves alone the other guests this host may run.
MARK = f"1000.{os.getpid()}"
POLICY = POLICY.replace("MARK_RE", f" {re.escape(MARK)}$").replace("@", RUN)


def need_host():
    if os.geteuid() != 0:
        skip_or_fail("needs root to pin other processes' threads")
    if not Path(QEMU).exists():
        skip_or_fail("qemu-system-x86_64 is not installed (apt install qemu-system-x86)")
    if len(ONLINE) < 2 or ONLINE != CpuSet.parse("0-1") and not ONLINE.cpus >= {0, 1}:
        skip_or_fail(f"the policy needs CPUs 0 and 1 online, have {ONLINE}")


def wait_nodbg_vcpus(g: Guest, n: int, timeout: float = 30.0) -> None:
    """A running guest without thread names: wait until each vCPU is seen inside KVM_RUN."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = scan(Procfs(), pids=[g.pid])
        if found.vms and len(found.vms[0].vcpu_threads()) == n:
            return
        time.sleep(0.1)
    raise AssertionError(f"vCPUs of {g.name} never seen in KVM_RUN: {found}")


@pytest.fixture(scope="module")
def lookalikes(tmp_path_factory):
    """Processes that look like qemu by name or path but are not a configured qemu binary."""
    need_host()
    tmp = tmp_path_factory.mktemp("lookalike")
    fake_dir = tmp / "usr" / "bin"
    fake_dir.mkdir(parents=True)
    fake = fake_dir / "qemu-system-x86_64"
    shutil.copy("/bin/sleep", fake)
    procs = [
        # another binary with qemu's file name
        subprocess.Popen([str(fake), MARK]),
        # a script whose argv[0] claims to be qemu, with a -name that would match a policy
        subprocess.Popen(["bash", "-c", "exec -a qemu-system-x86_64 python3 -c 'import time; time.sleep(1000)' "
                          f"-name guest=web9 -smp 2 {MARK}"]),
    ]
    # the real path, but another file: a bind mount in a private mount namespace
    procs.append(subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount --bind {fake} {QEMU} && exec {QEMU} {MARK}"]))
    # the same, but the fake binary deleted afterwards: /proc/PID/exe says "(deleted)"
    gone = tmp / "gone"
    shutil.copy("/bin/sleep", gone)
    procs.append(subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount --bind {gone} {QEMU} && exec {QEMU} {MARK}"]))
    try:
        time.sleep(0.5)
        gone.unlink()
        assert os.readlink(f"/proc/{procs[3].pid}/exe") == QEMU + " (deleted)"
        # unshare execs sh which execs the fake: the pid stays the same
        assert all(p.poll() is None for p in procs), "a look-alike died"
        assert os.readlink(f"/proc/{procs[2].pid}/exe") == QEMU, "bind-mount look-alike not in place"
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    need_host()
    tmp = tmp_path_factory.mktemp("guests")
    gs = {}
    try:
        gs["core8"] = start_guest(tmp, f"{RUN}core8", "-object", "iothread,id=io1", "-object", "iothread,id=io2",
                                  smp="4,sockets=1,cores=2,threads=2")
        gs["web1"] = start_guest(tmp, f"{RUN}web1", smp="2")
        gs["nodbg"] = start_guest(tmp, f"{RUN}nodbg", debug_threads=False, paused=False, smp="2")
        if not kvm_usable():
            skip_or_fail("/dev/kvm unusable: a TCG guest has no kvm-vcpu fds, nodbg's vCPUs can't be found")
        wait_nodbg_vcpus(gs["nodbg"], 2)
        yield gs
    finally:
        for g in gs.values():
            g.kill()


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "vcpud.yaml"
    p.write_text(POLICY)
    return p


def affinities(g: Guest) -> dict[str, str]:
    """comm or role-ish label -> Cpus_allowed_list for every thread."""
    return {f"{tid}:{comm}": g.affinity(tid) for tid, comm in g.threads().items()}


def reset(*gs: Guest) -> None:
    for g in gs:
        g.unpin()


def header_lines(stdout: str, *gs: Guest) -> dict[int, str]:
    """pid -> the `NAME (pid PID) ...` line `vcpud apply` printed for each of these guests."""
    out = {}
    for g in gs:
        (line,) = [ln for ln in stdout.splitlines() if ln.startswith(f"{g.name} (pid {g.pid}) ")] or [None]
        assert line is not None, f"no line for {g.name} pid {g.pid}:\n{stdout}"
        out[g.pid] = line
    return out


def counts(header: str) -> tuple[int, int, int]:
    """(pinned, unchanged, failed) from an apply line `NAME (pid PID) policy P: 3 pinned, 0 unchanged, 0 failed`."""
    m = re.search(r": (\d+) pinned, (\d+) unchanged, (\d+) failed$", header)
    assert m, header
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_apply_pins_every_thread_as_the_policy_says(guests, lookalikes, config):
    core8, web1, nodbg = guests["core8"], guests["web1"], guests["nodbg"]
    reset(core8, web1, nodbg)
    before_fakes = {pid: Path(f"/proc/{pid}/status").read_text() for pid in lookalikes}
    p = run_vcpud("apply", "--config", str(config))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    first = {pid: counts(line) for pid, line in header_lines(p.stdout, core8, web1, nodbg).items()}
    for pinned, unchanged, failed in first.values():
        assert pinned > 0 and unchanged == 0 and failed == 0, p.stdout  # reset: every wanted thread moves

    want_core8 = {"CPU 0/KVM": "0", "CPU 1/KVM": "1", "CPU 2/KVM": "0", "CPU 3/KVM": "1",
                  "IO io1": "0", "IO io2": "0"}
    seen = {tid: (comm, core8.affinity(tid)) for tid, comm in core8.threads().items()}
    assert {comm for comm, _ in seen.values()} >= set(want_core8), seen
    for tid, (comm, cpus) in seen.items():
        if comm in want_core8:
            assert cpus == want_core8[comm], f"{comm}: {seen}"
        elif not comm.startswith("kvm-nx"):
            # main loop, call_rcu (named or not: qemu 7.2 starts it before parsing -name), workers
            assert cpus == "1", f"emulator thread {tid} {comm}: {seen}"
    assert seen[core8.pid][1] == "1"

    for tid, comm in web1.threads().items():
        if not comm.startswith("kvm-nx"):
            assert web1.affinity(tid) == "0", (comm, affinities(web1))

    # nodbg: vCPUs told apart by the fd of their KVM_RUN ioctl, pinned by index
    vm = scan(Procfs(), pids=[nodbg.pid]).vms[0]
    by_role = {t.label: t.tid for t in vm.threads if t.role.value == "vcpu"}
    assert set(by_role) == {"vcpu 0", "vcpu 1"}
    assert nodbg.affinity(by_role["vcpu 0"]) == "1"
    assert nodbg.affinity(by_role["vcpu 1"]) == "0"
    assert nodbg.affinity(nodbg.pid) == "0"  # main thread: emulatorpin

    # look-alikes: untouched (the catch-all policy would have moved them to CPU 1)
    catch_all = load_config(config, online=ONLINE).policies[-1]
    assert catch_all.match.matches(SimpleNamespace(name=None, cmdline=(QEMU, MARK))), "catch-all misses look-alikes"
    for pid, status in before_fakes.items():
        now = Path(f"/proc/{pid}/status").read_text()
        assert _line(now, "Cpus_allowed_list") == _line(status, "Cpus_allowed_list") == ONLINE.format()

    # a second run changes nothing and says so
    p2 = run_vcpud("apply", "--config", str(config))
    assert p2.returncode == 0, p2.stdout + p2.stderr
    second = {pid: counts(line) for pid, line in header_lines(p2.stdout, core8, web1, nodbg).items()}
    assert second == {pid: (0, pinned, 0) for pid, (pinned, _, _) in first.items()}, p2.stdout


def test_kvm_nx_worker_is_reported_never_pinned(guests, config):
    # kvm-nx-lpage-recovery shows a vCPU's KVM_RUN in /proc/TID/syscall but is no vCPU
    nodbg = guests["nodbg"]
    reset(nodbg)
    nx = [tid for tid, comm in nodbg.threads().items() if comm.startswith("kvm-nx-lpage")]
    if not nx:
        skip_or_fail("this kernel starts no kvm-nx-lpage-recovery worker in the VM process")
    run_vcpud("apply", "--config", str(config), check=True)
    vm = scan(Procfs(), pids=[nodbg.pid]).vms[0]
    assert {t.tid: t.role.value for t in vm.threads}[nx[0]] == "kernel"
    assert nodbg.affinity(by_label(vm)["vcpu 1"]) == "0"  # the policy was applied to the rest of the VM
    assert nodbg.affinity(nx[0]) == ONLINE.format()  # reported, never pinned


def by_label(vm) -> dict[str, int]:
    return {t.label: t.tid for t in vm.threads}


def _line(status: str, key: str) -> str:
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(key)


def all_affinities(gs) -> dict[tuple[int, int], str]:
    """(pid, tid) -> Cpus_allowed_list, for every thread of these guests, read from /proc."""
    return {(g.pid, tid): g.affinity(tid) for g in gs for tid in g.threads()}


VCPU_COMM = re.compile(r"CPU (\d+)/(KVM|TCG)$")


def test_dry_run_changes_nothing(guests, config):
    core8, web1 = guests["core8"], guests["web1"]
    reset(*guests.values())
    before = all_affinities(guests.values())
    assert set(before.values()) == {ONLINE.format()}
    p = run_vcpud("apply", "--dry-run", "--config", str(config))
    assert p.returncode == 0, p.stdout + p.stderr
    assert all_affinities(guests.values()) == before

    # web1 (affinity: "0"): one "would pin" line for each of its threads but the kernel worker
    lines = p.stdout.splitlines()
    head = header_lines(p.stdout, web1)[web1.pid]
    threads = {tid: comm for tid, comm in web1.threads().items() if not comm.startswith("kvm-nx")}
    assert head.endswith(f" policy web: {len(threads)} to pin, 0 already right, 0 failed"), head
    block = lines[lines.index(head) + 1:lines.index(head) + 1 + len(threads)]
    want = set()
    for tid, comm in threads.items():
        m = VCPU_COMM.match(comm)
        label = f"vcpu {m.group(1)}" if m else "emulator"
        want.add(f"  would pin tid {tid} {label}: {ONLINE.format()} -> 0 (affinity)")
    assert set(block) == want, p.stdout

    # core8: its vCPU 1 by vcpupin[1], its IO thread io2 by iothreadpin
    head = header_lines(p.stdout, core8)[core8.pid]
    assert " to pin, 0 already right, 0 failed" in head, head
    tid = {comm: tid for tid, comm in core8.threads().items()}
    assert f"  would pin tid {tid['CPU 1/KVM']} vcpu 1: {ONLINE.format()} -> 1 (vcpupin[1])" in lines, p.stdout
    assert f"  would pin tid {tid['CPU 3/KVM']} vcpu 3: {ONLINE.format()} -> 1 (vcpus)" in lines, p.stdout


def test_ps_json_shows_vms_roles_affinities(guests, lookalikes, config):
    reset(*guests.values())
    run_vcpud("apply", "--config", str(config), check=True)
    p = run_vcpud("ps", "--json", "--config", str(config))
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    # by pid: other guests on the host may have the same names
    by_pid = {v["pid"]: v for v in data["vms"]}
    by_name = {name: by_pid[g.pid] for name, g in guests.items()}
    for name, vm in by_name.items():
        assert vm["name"] == guests[name].name, vm
    assert set(lookalikes).isdisjoint(v["pid"] for v in data["vms"])
    core8 = by_name["core8"]
    assert core8["policy"] == "core8"
    assert core8["smp"] == {"cpus": 4, "maxcpus": 4, "sockets": 1, "dies": 1, "clusters": 1, "cores": 2, "threads": 2}
    labels = {t["label"]: t for t in core8["threads"]}
    assert {"vcpu 0", "vcpu 1", "vcpu 2", "vcpu 3", "iothread io1", "iothread io2", "emulator"} <= set(labels)
    assert labels["vcpu 1"]["affinity"] == "1" and labels["vcpu 1"]["want"] == "1"
    assert labels["vcpu 1"]["rule"] == "vcpupin[1]"
    assert labels["vcpu 3"]["rule"] == "vcpus"
    assert all(t["ok"] for t in core8["threads"])
    assert all(isinstance(t["psr"], int) and t["psr"] in ONLINE for t in core8["threads"])
    nodbg = by_name["nodbg"]
    assert {t["found_by"] for t in nodbg["threads"] if t["role"] == "vcpu"} == {"kvm_run"}

    table = run_vcpud("ps", "--config", str(config))
    assert table.returncode == 0
    assert all(len(ln) <= 80 for ln in table.stdout.splitlines()), table.stdout
    assert guests["core8"].name in table.stdout and "vcpu 3" in table.stdout
    for pid in lookalikes:
        assert f"pid {pid} " not in table.stdout


def test_explicit_missing_config_is_an_error(guests, tmp_path):
    p = run_vcpud("ps", "--json", "--config", str(tmp_path / "nothing.yaml"))
    assert p.returncode == 2  # an explicitly named config that does not exist is an error
    assert "nothing.yaml:1:1" in p.stderr


class KillingOps(OsAffinity):
    """Real sched_{get,set}affinity, but SIGKILLs one guest as its first thread is looked at."""

    def __init__(self, victim: Guest):
        super().__init__()
        self.victim = victim
        self.victim_tids = set(victim.threads())
        self.killed = False

    def get(self, tid):
        if tid in self.victim_tids and not self.killed:
            self.victim.kill()  # SIGKILL and reap, as libvirtd would
            self.killed = True
        return super().get(tid)


def test_vm_killed_during_apply_does_not_stop_the_others(tmp_path, config):
    need_host()
    victim = start_guest(tmp_path, f"{RUN}web-victim", smp="2")
    other = start_guest(tmp_path, f"{RUN}web-other", smp="2")
    try:
        cfg = load_config(config, online=ONLINE)
        ops = KillingOps(victim)
        # victim first, so the others come after the kill
        report = reconcile(cfg, ONLINE, Procfs(), ops, pids=[victim.pid, other.pid])
        assert ops.killed
        by_pid = {v.plan.vm.pid: v for v in report.vms}
        assert all(r.outcome is Outcome.VANISHED for r in by_pid[victim.pid].results)
        assert not by_pid[victim.pid].ok and not report.ok
        assert by_pid[other.pid].ok
        assert all(other.affinity(tid) == "0" for tid, c in other.threads().items() if not c.startswith("kvm-nx"))
    finally:
        victim.kill()
        other.kill()


class KillingProcfs(Procfs):
    """The real /proc, but one guest is SIGKILLed (and reaped) as the scan lists its threads: after
    /proc was listed, its executable verified and its stat, status and cmdline read."""

    victim: Guest | None = None
    killed = False

    def tids(self, pid):
        v = KillingProcfs.victim
        if v is not None and pid == v.pid and not KillingProcfs.killed:
            v.kill()
            KillingProcfs.killed = True
        return super().tids(pid)


def test_vm_killed_during_apply_scan_is_reported_vanished_not_failed(tmp_path, config, monkeypatch, capsys):
    need_host()
    victim = start_guest(tmp_path, f"{RUN}web-gone", smp="2")
    other = start_guest(tmp_path, f"{RUN}web-stays", smp="2")
    try:
        reset(other)
        monkeypatch.setattr(KillingProcfs, "victim", victim)
        monkeypatch.setattr(KillingProcfs, "killed", False)
        monkeypatch.setattr(cli, "Procfs", KillingProcfs)
        rc = cli.main(["apply", "--config", str(config)])  # the real command, in this process
        out = capsys.readouterr().out
        assert KillingProcfs.killed and victim.proc.returncode == -signal.SIGKILL
        assert f"(pid {victim.pid})" not in out  # read halfway: no VM to report
        m = re.search(r"^\((\d+) processes or threads vanished during the scan\)$", out, re.M)
        assert m and int(m.group(1)) >= 1, out  # the victim (other processes on the host may have exited too)
        threads = {tid: c for tid, c in other.threads().items() if not c.startswith("kvm-nx")}
        assert counts(header_lines(out, other)[other.pid]) == (len(threads), 0, 0), out
        assert {other.affinity(tid) for tid in threads} == {"0"}
        assert rc == cli.EXIT_OK, out  # a VM that is gone is nothing left to pin: no failure
    finally:
        victim.kill()
        other.kill()


def make_cpuset_cgroup(name: str, cpus: str) -> tuple[Path, str]:
    """A cpuset cgroup like the ones libvirt puts each vCPU in; returns (dir, file to write TIDs to)."""
    v1 = Path("/sys/fs/cgroup/cpuset")
    if (v1 / "cpuset.cpus").exists():
        d = v1 / name
        d.mkdir(exist_ok=True)
        (d / "cpuset.cpus").write_text(cpus)
        (d / "cpuset.mems").write_text((v1 / "cpuset.mems").read_text().strip() or "0")
        return d, "tasks"
    for v2 in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and "cpuset" in controllers.read_text().split():
            (v2 / "cgroup.subtree_control").write_text("+cpuset")
            d = v2 / name
            d.mkdir(exist_ok=True)
            (d / "cpuset.cpus").write_text(cpus)
            return d, "cgroup.procs"
    skip_or_fail("no cpuset cgroup controller on this host")
    raise AssertionError


def remove_cgroup(d: Path, tasks: str) -> None:
    parent_tasks = d.parent / tasks
    for tid in (d / tasks).read_text().split():
        try:
            parent_tasks.write_text(tid)
        except OSError:
            pass
    for _ in range(50):
        try:
            d.rmdir()
            return
        except OSError:
            time.sleep(0.05)


def test_cpuset_cgroup_excluding_the_cpus_is_reported(tmp_path, config):
    need_host()
    g = start_guest(tmp_path, f"{RUN}web-caged", smp="1")
    d, tasks = make_cpuset_cgroup(f"vcpud-test-{os.getpid()}", "1")
    try:
        # like libvirt: the guest may only run on CPU 1, and policy "web" wants CPU 0
        if tasks == "tasks":
            for tid in g.threads():
                (d / tasks).write_text(str(tid))
        else:
            (d / tasks).write_text(str(g.pid))
        p = run_vcpud("apply", "--config", str(config))
        assert p.returncode == 1, p.stdout + p.stderr
        mine = [ln for ln in p.stdout.splitlines() if g.name in ln or "outside-cpuset" in ln]
        assert any("outside-cpuset" in ln and d.name in ln and "allows 1" in ln for ln in mine), p.stdout
        assert all(g.affinity(tid) == "1" for tid in g.threads())
    finally:
        g.kill()
        remove_cgroup(d, tasks)


def test_vm_whose_binary_was_upgraded_away_is_still_managed(tmp_path):
    """A package upgrade deletes the running qemu's binary: the VM must stay managed."""
    need_host()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.chmod(tmp_path, 0o755)
    exe = bindir / "qemu-system-x86_64"
    shutil.copy(QEMU, exe)
    cfg = tmp_path / "vcpud.yaml"
    cfg.write_text(f"executables: [{bindir}/qemu-system-*]\n" + POLICY)
    g = start_guest(tmp_path, f"{RUN}web-upgraded", smp="1", exe=str(exe))
    try:
        exe.unlink()
        assert os.readlink(f"/proc/{g.pid}/exe").endswith(" (deleted)")
        p = run_vcpud("apply", "--config", str(cfg))
        assert p.returncode == 0, p.stdout + p.stderr
        assert any(ln.startswith(f"{g.name} (pid {g.pid})") for ln in p.stdout.splitlines()), p.stdout
        assert all(g.affinity(tid) == "0" for tid, c in g.threads().items() if not c.startswith("kvm-nx"))
    finally:
        g.kill()
