"""Reading cpuset confinement over fake /proc and cgroup trees (v1 and v2), and pinning through it."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from tests.proctree import ProcTree, load
from tests.unit.test_reconciler import FIXED, make
from vcpud.cgroups import CgroupOps, CgroupOwner, Cgroups, Confinement, Owner, owner_of
from vcpud.cpuset import CpuSet
from vcpud.discovery import Role
from vcpud.pinning import Chain, Direct, Outcome, pin_one
from vcpud.placement import Assignment
from vcpud.reconciler import ScanReason

C = CpuSet.parse

@pytest.fixture
def tree(tmp_path: Path) -> ProcTree:
    return load(tmp_path / "proc")


V1_LINES = "12:cpuset:{path}\n11:memory:/\n1:name=systemd:/\n0::/\n"
V2_LINES = "0::{path}\n"


def cgdir(root: Path, rel: str, effective: str, tasks: list[int], version: int = 1, cpus: str | None = None) -> Path:
    d = root / ("cpuset" if version == 1 else "") / rel.strip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / ("cpuset.effective_cpus" if version == 1 else "cpuset.cpus.effective")).write_text(effective + "\n")
    (d / "cpuset.cpus").write_text((cpus or effective) + "\n")
    (d / ("tasks" if version == 1 else "cgroup.threads")).write_text("".join(f"{t}\n" for t in tasks))
    return d


def thread_in(proc: Path, pid: int, tid: int, path: str, version: int = 1) -> None:
    d = proc / str(pid) / "task" / str(tid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup").write_text((V1_LINES if version == 1 else V2_LINES).format(path=path))


@pytest.mark.parametrize("path,owner,role", [
    ("/", Owner.ROOT, ""),
    ("/machine/qemu-1-web.libvirt-qemu/vcpu0", Owner.LIBVIRT, "vcpu0"),
    ("/machine/qemu-12-db-1.libvirt-qemu/emulator", Owner.LIBVIRT, "emulator"),
    ("/machine/qemu-3-x.libvirt-qemu/iothread2", Owner.LIBVIRT, "iothread2"),
    ("/machine.slice/machine-qemu\\x2d1\\x2dweb.scope/libvirt/vcpu3", Owner.LIBVIRT, "vcpu3"),
    ("/machine.slice/machine-qemu\\x2d1\\x2dweb.scope/vcpu1", Owner.LIBVIRT, "vcpu1"),  # v1 under systemd
    ("/vcpud-test-1/machine/qemu-1-t.libvirt-qemu/vcpu0", Owner.LIBVIRT, "vcpu0"),  # anywhere: the tail
    ("/machine/qemu-1-web.libvirt-qemu", Owner.OTHER, ""),  # the VM's own cgroup, not per thread
    ("/machine/qemu-1-web.libvirt-qemu/vcpu0/extra", Owner.OTHER, ""),
    ("/qemu.slice/100.scope", Owner.SCOPE, ""),
    ("/machine.slice/machine-qemu\\x2d1\\x2dweb.scope", Owner.SCOPE, ""),
    ("/user.slice", Owner.SCOPE, ""),
    ("/docker/abc", Owner.OTHER, ""),
    ("/x/vcpu0", Owner.OTHER, ""),
])
def test_owner_layouts(path, owner, role):
    assert owner_of(path) == (owner, role)


def test_v1_per_thread_libvirt_and_shared_scope(tmp_path):
    proc, root = tmp_path / "proc", tmp_path / "cg"
    cgdir(root, "/machine/qemu-1-web.libvirt-qemu/vcpu0", "1", [101])
    cgdir(root, "/machine/qemu-1-web.libvirt-qemu/emulator", "0-1", [100, 102])
    cgdir(root, "/qemu.slice/100.scope", "1", [200, 201, 202])
    thread_in(proc, 100, 101, "/machine/qemu-1-web.libvirt-qemu/vcpu0")
    thread_in(proc, 100, 102, "/machine/qemu-1-web.libvirt-qemu/emulator")
    thread_in(proc, 200, 201, "/qemu.slice/100.scope")
    cg = Cgroups(proc, root)
    c = cg.confinement(100, 101)
    assert c == Confinement("/machine/qemu-1-web.libvirt-qemu/vcpu0", C("1"), Owner.LIBVIRT, True, 1,
                            root / "cpuset/machine/qemu-1-web.libvirt-qemu/vcpu0", "vcpu0")
    assert c.writable
    e = cg.confinement(100, 102)
    assert e is not None and e.owner is Owner.LIBVIRT and not e.per_thread and not e.writable
    s = cg.confinement(200, 201)
    assert s is not None and (s.path, s.effective, s.owner, s.per_thread) == ("/qemu.slice/100.scope", C("1"),
                                                                                Owner.SCOPE, False)
    assert "/qemu.slice/100.scope" in s.describe() and "AllowedCPUs" in s.hint() and "100.scope" in s.hint()
    assert cg.confinement(100, 999) is None  # gone


def test_v2_threaded_libvirt_and_v2_without_cpuset(tmp_path):
    proc, root = tmp_path / "proc", tmp_path / "cg"
    scope = "/machine.slice/machine-qemu\\x2d2\\x2ddb.scope"
    cgdir(root, scope + "/libvirt/vcpu1", "0", [301], version=2)
    thread_in(proc, 300, 301, scope + "/libvirt/vcpu1", version=2)
    c = Cgroups(proc, root).confinement(300, 301)
    assert c is not None and c.version == 2 and c.owner is Owner.LIBVIRT and c.per_thread and c.effective == C("0")
    # the unified hierarchy beside v1, without the cpuset controller: nothing confines
    thread_in(proc, 400, 401, "/system.slice/x.service", version=2)
    (root / "unified/system.slice/x.service").mkdir(parents=True)
    assert Cgroups(proc, root).confinement(400, 401) is None
    # the unified hierarchy at "unified" with cpuset
    cgdir(root / "unified", "/qemu.slice/101.scope", "1", [500, 501], version=2)
    thread_in(proc, 500, 501, "/qemu.slice/101.scope", version=2)
    c = Cgroups(proc, root).confinement(500, 501)
    assert c is not None and c.owner is Owner.SCOPE and not c.per_thread and c.effective == C("1")


def test_hostile_inputs_are_bounded_and_refused(tmp_path):
    proc, root = tmp_path / "proc", tmp_path / "cg"
    thread_in(proc, 1, 1, "/../../etc")  # another cgroup namespace's view
    assert Cgroups(proc, root).confinement(1, 1) is None
    thread_in(proc, 2, 2, "/big")
    d = cgdir(root, "/big", "0-1", [])
    (d / "tasks").write_text("2\n" * 100_000)  # past the limit: not per-thread
    c = Cgroups(proc, root).confinement(2, 2)
    assert c is not None and not c.per_thread
    (d / "cpuset.effective_cpus").write_text("garbage\n")
    c = Cgroups(proc, root).confinement(2, 2)
    assert c is not None and c.effective is None


def test_once_reads_each_cgroup_once_and_answers_alike(tmp_path, monkeypatch):
    proc, root = tmp_path / "proc", tmp_path / "cg"
    cgdir(root, "/qemu.slice/100.scope", "1", [200, 201, 202])
    cgdir(root, "/machine/qemu-1-web.libvirt-qemu/vcpu0", "1", [101])
    cgdir(root, "/", "0-1", [1, 2, 3])
    for tid in (200, 201, 202):
        thread_in(proc, 200, tid, "/qemu.slice/100.scope")
    thread_in(proc, 100, 101, "/machine/qemu-1-web.libvirt-qemu/vcpu0")
    thread_in(proc, 3, 3, "/")
    read: list[str] = []
    real_read = Cgroups._read

    def counting(self, path, *args):
        read.append(os.path.relpath(path, tmp_path))
        return real_read(self, path, *args)

    monkeypatch.setattr(Cgroups, "_read", counting)
    threads = [(200, 200), (200, 201), (200, 202), (100, 101), (3, 3), (200, 201)]
    fresh = [Cgroups(proc, root).confinement(pid, tid) for pid, tid in threads]
    assert "cg/cpuset/tasks" not in read  # the root cgroup lists every thread and is no thread's own
    assert read.count("cg/cpuset/qemu.slice/100.scope/tasks") == 4
    read.clear()
    once = Cgroups(proc, root, once=True)
    assert [once.confinement(pid, tid) for pid, tid in threads] == fresh
    assert fresh[3] is not None and fresh[3].per_thread and fresh[4] is not None and not fresh[4].per_thread
    assert read.count("cg/cpuset/qemu.slice/100.scope/tasks") == 1
    assert read.count("cg/cpuset/qemu.slice/100.scope/cpuset.effective_cpus") == 1
    assert sum(r.endswith("/cgroup") for r in read) == len(threads)  # which cgroup: asked every time


class FakeAffinity:
    def __init__(self, current: dict[int, CpuSet], cgroup_allows: dict[int, Path]) -> None:
        self.current = current
        self.allows = cgroup_allows  # tid -> its cgroup dir: set() fails EINVAL outside cpuset.cpus

    def get(self, tid):
        return self.current[tid]

    def set(self, pid, tid, cpus):
        d = self.allows.get(tid)
        if d is not None and not cpus <= C((d / "cpuset.cpus").read_text().strip()):
            raise OSError(errno.EINVAL, "Invalid argument")
        self.current[tid] = cpus


def assignment(pid, tid, cpus, label="vcpu 0"):
    return Assignment(pid=pid, tid=tid, label=label, role=Role.VCPU, cpus=C(cpus), rule="vcpupin[0]")


def test_cgroup_ops_write_per_thread_cgroup_then_affinity(tmp_path):
    proc, root = tmp_path / "proc", tmp_path / "cg"
    cgdir(root, "/t/machine", "0-1", [])
    d = cgdir(root, "/t/machine/qemu-1-web.libvirt-qemu/vcpu0", "1", [101])
    s = cgdir(root, "/qemu.slice/100.scope", "1", [201, 202])
    thread_in(proc, 100, 101, "/t/machine/qemu-1-web.libvirt-qemu/vcpu0")
    thread_in(proc, 200, 201, "/qemu.slice/100.scope")
    base = FakeAffinity({101: C("1"), 201: C("1")}, {101: d, 201: s})
    ops = CgroupOps(Cgroups(proc, root), base)
    # a dry run predicts: the per-thread cgroup can be written, the scope cannot
    assert pin_one(assignment(100, 101, "0"), ops, dry_run=True).outcome is Outcome.PLANNED
    p = pin_one(assignment(200, 201, "0"), ops, dry_run=True)
    assert p.outcome is Outcome.OUTSIDE_CPUSET and "/qemu.slice/100.scope" in p.detail and p.cgroup is not None
    r = pin_one(assignment(100, 101, "0"), ops)
    assert r.outcome is Outcome.PINNED and r.via == "cgroup"
    assert (d / "cpuset.cpus").read_text().strip() == "0"
    r = pin_one(assignment(200, 201, "0"), ops)
    assert r.outcome is Outcome.OUTSIDE_CPUSET and r.via == "sched_setaffinity"
    assert "/qemu.slice/100.scope" in r.detail and "allows 1" in r.detail
    assert (s / "cpuset.cpus").read_text().strip() == "1"  # a shared scope is never written
    # partly inside: the kernel would keep the intersection
    assert pin_one(assignment(200, 201, "0-1"), ops, dry_run=True).outcome is Outcome.MISMATCH


def test_cgroup_owner_only_for_libvirt_layouts_and_chain_falls_back(tmp_path, tree):
    proc, root = tree.root, tmp_path / "cg"
    named, unnamed = tree.pid("named"), tree.pid("unnamed")
    cgdir(root, "/machine/qemu-1-web.libvirt-qemu/emulator", "0-1", [named])
    cgdir(root, "/qemu.slice/100.scope", "0-1", [unnamed])
    (proc / str(named) / "task" / str(named) / "cgroup").write_text(
        V1_LINES.format(path="/machine/qemu-1-web.libvirt-qemu/emulator"))
    (proc / str(unnamed) / "task" / str(unnamed) / "cgroup").write_text(V1_LINES.format(path="/qemu.slice/100.scope"))
    rec, act, _ = make(tree)
    rec.rescan(ScanReason.STARTUP)
    owner = CgroupOwner(Cgroups(proc, root))
    vms = {st.vm.pid: st.vm for st in rec.vms.values()}
    assert owner.ops_for(vms[named]) is owner.ops
    assert owner.ops_for(vms[unnamed]) is None
    fallback = Direct(act).ops
    chain = Chain(owner, fallback=fallback)
    assert chain.ops_for(vms[named]) is owner.ops and chain.ops_for(vms[unnamed]) is fallback


def test_cgroup_owner_reads_cgroups_once_per_vm_until_recheck(tmp_path, tree):
    """Asked before every pin: a VM's cgroups are read once, and again only after ``recheck``."""
    proc, root = tree.root, tmp_path / "cg"
    named = tree.pid("named")
    cgdir(root, "/qemu.slice/100.scope", "0-1", [named])
    (proc / str(named) / "task" / str(named) / "cgroup").write_text(V1_LINES.format(path="/qemu.slice/100.scope"))
    rec, _, _ = make(tree)
    rec.rescan(ScanReason.STARTUP)
    vm = rec.vms[named].vm
    reads: list[int] = []
    cg = Cgroups(proc, root)
    real = cg.confinement
    cg.confinement = lambda pid, tid: reads.append(tid) or real(pid, tid)  # type: ignore[method-assign]
    now = [100.0]
    owner = CgroupOwner(cg, clock=lambda: now[0], recheck=10.0)
    assert [owner.ops_for(vm) for _ in range(50)] == [None] * 50
    assert len(reads) == 1
    # libvirt-style cgroups after all (someone moved it): seen at the next look, then for good
    cgdir(root, "/machine/qemu-1-web.libvirt-qemu/emulator", "0-1", [named])
    (proc / str(named) / "task" / str(named) / "cgroup").write_text(
        V1_LINES.format(path="/machine/qemu-1-web.libvirt-qemu/emulator"))
    assert owner.ops_for(vm) is None and len(reads) == 1
    now[0] += 10.0
    assert owner.ops_for(vm) is owner.ops and len(reads) == 2
    assert [owner.ops_for(vm) for _ in range(50)] == [owner.ops] * 50 and len(reads) == 2


class ScopeActuator:
    """The test reconciler's actuator inside a shared scope: EINVAL outside the scope's CPUs."""

    def __init__(self, act, cg: Cgroups, pid: int) -> None:
        self.act, self.cg, self.pid = act, cg, pid
        self.sets = 0

    def get(self, tid):
        return self.act.get(tid)

    def set(self, pid, tid, cpus):
        self.sets += pid == self.pid
        c = self.cg.confinement(pid, tid)
        if c is not None and c.effective is not None and not cpus & c.effective:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.act.set(pid, tid, cpus)

    def confinement(self, pid, tid):
        return self.cg.confinement(pid, tid)


def test_shared_scope_said_once_retried_only_on_change(tree, tmp_path, caplog):
    named = tree.pid("named")
    root = tmp_path / "cg"
    fs = tree.procfs()
    tids = fs.tids(named)
    scope = cgdir(root, "/qemu.slice/100.scope", "3", tids)
    for t in tids:
        tree.set_affinity(named, t, [3])
        (tree.root / str(named) / "task" / str(t) / "cgroup").write_text(V1_LINES.format(path="/qemu.slice/100.scope"))
    rec, act, _ = make(tree, FIXED % "0")
    ops = ScopeActuator(act, Cgroups(tree.root, root), named)
    rec.pinner.router = Direct(ops)
    with caplog.at_level(logging.DEBUG, logger="vcpud.reconciler"):
        rec.rescan(ScanReason.STARTUP)
        tries = ops.sets
        failed = rec.stats.pins[Outcome.OUTSIDE_CPUSET]
        assert tries == 5 and failed == tries
        for _ in range(5):
            rec.rescan(ScanReason.PERIODIC)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot pin" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert "/qemu.slice/100.scope" in msg and "allows 3" in msg and "AllowedCPUs" in msg
    assert ops.sets == tries  # not retried: nothing changed
    assert rec.stats.pins[Outcome.OUTSIDE_CPUSET] == 6 * failed  # but counted at every pass
    # the operator widens the scope: tried again, pinned
    (scope / "cpuset.effective_cpus").write_text("0-3\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vcpud.reconciler"):
        rec.rescan(ScanReason.PERIODIC)
    assert ops.sets > tries
    assert not rec.vms[named].failed and not rec.vms[named].blocked
    assert any("trying again" in r.getMessage() for r in caplog.records)
