"""The reconciler driven by event sequences over captured /proc trees: no root, no qemu.

A fake clock, a fake affinity actuator that edits the tree as sched_setaffinity would, and an
in-memory state store; everything else (discovery, placement, pools) is the real code.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from textwrap import dedent
from typing import Any, Mapping

import pytest

from tests.proctree import ProcTree, load
from tests.synth_topology import synth
from vcpud import state
from vcpud.cpuset import CpuSet
from vcpud.discovery import Role
from vcpud.engine import reconcile
from vcpud.pinning import Outcome
from vcpud.config import parse_config_text
from vcpud.reconciler import FOLLOWUP_DELAYS, UNNAMED_GRACE, Reconciler, ScanReason
from vcpud.vocab import VMStatus

C = CpuSet.parse
ONLINE = C("0-3")

FIXED = """
executables: [/usr/bin/qemu-system-*]
policies:
  - name: named
    match: {name: fixture-named}
    vcpupin: {0: "0", 1: "1"}
    vcpus: "2-3"
    emulatorpin: "0"
    iothreadpin: "1"
  - name: rest
    match: {}
    affinity: "%s"
"""


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class Actuator:
    """sched_{get,set}affinity over the tree; records every change, refuses on request."""

    def __init__(self, tree: ProcTree) -> None:
        self.tree = tree
        self.calls: list[tuple[int, CpuSet]] = []
        self.refuse: dict[int, int] = {}  # tid -> errno

    def _status(self, tid: int) -> Path:
        return self.tree.root / str(tid) / "status"

    def get(self, tid: int) -> CpuSet:
        try:
            text = self._status(tid).read_text()
        except FileNotFoundError:
            raise ProcessLookupError(errno.ESRCH, "no such thread") from None
        line = next(x for x in text.splitlines() if x.startswith("Cpus_allowed_list:"))
        return C(line.split(":", 1)[1].strip())

    def set(self, pid: int, tid: int, cpus: CpuSet) -> None:
        if not (self.tree.root / str(pid) / "task" / str(tid)).is_dir():
            raise ProcessLookupError(errno.ESRCH, "no such thread")
        if tid in self.refuse:
            raise OSError(self.refuse[tid], "refused")
        self.tree.set_affinity(pid, tid, list(cpus))
        self.calls.append((tid, cpus))

    def moved(self) -> dict[int, CpuSet]:
        return dict(self.calls)


class MemoryStore:
    def __init__(self) -> None:
        self.saved: dict[Any, state.Saved] | None = None
        self.writes = 0

    def load(self) -> dict[Any, state.Saved]:
        if self.saved is None:
            raise state.StateError("nothing saved")
        return dict(self.saved)

    def save(self, saved: Mapping[Any, state.Saved]) -> None:
        self.saved = dict(saved)
        self.writes += 1

    def exists(self) -> bool:
        return self.saved is not None

    def describe(self) -> str:
        return "memory"


@pytest.fixture
def tree(tmp_path: Path) -> ProcTree:
    return load(tmp_path / "proc")


def make(tree: ProcTree, text: str = FIXED % "0", store: MemoryStore | None = None, topology: Any = None,
         online: CpuSet = ONLINE) -> tuple[Reconciler, Actuator, Clock]:
    act, clock = Actuator(tree), Clock()
    cfg = parse_config_text(dedent(text), "t.yaml", online=online)
    rec = Reconciler(cfg, online, tree.procfs(), act, store or MemoryStore(), topology=topology, clock=clock,
                     exe_check=tree.exe_check())
    return rec, act, clock


def affinity(tree: ProcTree, pid: int, comm: str) -> CpuSet:
    return tree.procfs().affinity(pid, tree.tid_by_comm(pid, comm))


def roles(rec: Reconciler, pid: int) -> dict[int, Role]:
    return {t.tid: t.role for t in rec.vms[pid].vm.threads}


# --- startup ----------------------------------------------------------------------------------
def test_startup_pins_each_thread_by_its_role_and_leaves_the_rest(tree):
    named, unnamed, deleted = tree.pid("named"), tree.pid("unnamed"), tree.pid("deleted")
    for pid in (named, unnamed, deleted):
        for tid in tree.procfs().tids(pid):
            tree.set_affinity(pid, tid, [0, 1, 2, 3])
    rec, act, _ = make(tree, FIXED % "2")
    rec.rescan(ScanReason.STARTUP)
    assert set(rec.vms) == {named, unnamed, deleted}  # the look-alike and the shell are not VMs
    assert affinity(tree, named, "CPU 0/KVM") == C("0")
    assert affinity(tree, named, "CPU 1/KVM") == C("1")
    assert affinity(tree, named, "IO io1") == C("1")
    assert tree.procfs().affinity(named, named) == C("0")
    # The unnamed guest: vCPUs told apart by KVM_RUN, the kvm-nx worker never touched.
    r = roles(rec, unnamed)
    assert sorted(role.value for role in r.values()).count("vcpu") == 2
    nx = tree.tid_by_comm(unnamed, "kvm-nx-lpage-re")
    assert r[nx] is Role.KERNEL and nx not in act.moved()
    assert tree.procfs().affinity(unnamed, nx) == C("0-3")
    assert all(cpus == C("2") for tid, cpus in act.calls if tid in r)
    assert not {t for t in act.moved()} & set(tree.procfs().tids(tree.pid("lookalike")))
    assert {st.status for st in rec.vms.values()} == {VMStatus.PINNED}


def test_nothing_to_do_on_a_second_pass(tree):
    rec, act, _ = make(tree)
    rec.rescan(ScanReason.STARTUP)
    n = len(act.calls)
    rec.rescan(ScanReason.PERIODIC)
    assert len(act.calls) == n
    assert rec.stats.pins[Outcome.UNCHANGED] > 0 and rec.stats.drift_corrections == 0


def test_unnamed_vcpu_not_in_kvm_run_stays_unknown_and_unpinned_until_seen(tree):
    unnamed = tree.pid("unnamed")
    rec, act, _ = make(tree, FIXED % "2")
    rec.rescan(ScanReason.STARTUP)
    vcpus = sorted(t for t, r in roles(rec, unnamed).items() if r is Role.VCPU)
    busy = vcpus[1]
    line = (tree.root / str(unnamed) / "task" / str(busy) / "syscall").read_text()
    tree.set_syscall(unnamed, busy, "running")  # on a CPU right now: no KVM_RUN to see
    tree.set_affinity(unnamed, busy, [0, 1, 2, 3])
    act.calls.clear()
    rec.look_at([unnamed])  # read afresh (a reload re-checks what it knows; roles stay)
    r = roles(rec, unnamed)
    unknown = [t for t, role in r.items() if role is Role.UNKNOWN]
    assert busy in unknown and not set(unknown) & set(act.moved())
    tree.set_syscall(unnamed, busy, line)
    rec.rescan(ScanReason.PERIODIC)
    assert roles(rec, unnamed)[busy] is Role.VCPU and act.moved()[busy] == C("2")


def test_apply_dry_run_changes_nothing_and_reports_what_would(tree):
    cfg = parse_config_text(dedent(FIXED % "2"), "t.yaml", online=ONLINE)
    act, store = Actuator(tree), MemoryStore()
    report = reconcile(cfg, ONLINE, tree.procfs(), act, dry_run=True, store=store, exe_check=tree.exe_check())
    assert not act.calls and store.writes == 0
    planned = [r for v in report.vms for r in v.results if r.outcome is Outcome.PLANNED]
    assert planned and report.ok
    assert {v.plan.vm.pid for v in report.vms} == {tree.pid(n) for n in ("named", "unnamed", "deleted")}


# --- threads coming and going ------------------------------------------------------------------
def test_new_io_thread_pinned_on_its_comm_event(tree):
    named = tree.pid("named")
    rec, act, _ = make(tree)
    rec.rescan(ScanReason.STARTUP)
    tree.add_thread(named, 15000, "qemu-system-x86")
    tree.set_affinity(named, 15000, [0, 1, 2, 3])
    rec.on_fork(15000, named)
    assert 15000 not in act.moved()  # not named yet: wait for the COMM event
    tree.rename_thread(named, 15000, "IO io2")
    rec.on_comm(15000, named)
    assert act.moved()[15000] == C("1")
    assert roles(rec, named)[15000] is Role.IOTHREAD
    assert rec.next_deadline() is None or 15000 not in rec.unnamed


def test_thread_never_named_is_judged_after_the_grace(tree):
    named = tree.pid("named")
    rec, act, clock = make(tree)
    rec.rescan(ScanReason.STARTUP)
    tree.add_thread(named, 15001, "qemu-system-x86")
    tree.set_affinity(named, 15001, [3])
    rec.on_fork(15001, named)
    deadline = rec.next_deadline()
    assert deadline is not None and deadline == pytest.approx(clock() + UNNAMED_GRACE)
    rec.run_due()
    assert 15001 not in act.moved()
    clock.advance(UNNAMED_GRACE)
    rec.run_due()
    assert act.moved()[15001] == C("0")  # a named VM's unnamed thread is an emulator thread


def test_a_pin_after_the_grace_is_timed_from_the_fork_event(tree, caplog):
    named = tree.pid("named")
    rec, act, clock = make(tree)
    rec.rescan(ScanReason.STARTUP)
    tree.add_thread(named, 15001, "qemu-system-x86")
    tree.set_affinity(named, 15001, [3])
    rec.on_fork(15001, named, time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    clock.advance(UNNAMED_GRACE)
    with caplog.at_level(logging.INFO, logger="vcpud"):
        rec.run_due()
    assert act.moved()[15001] == C("0")
    assert rec.stats.latency_hist.view().count == 1  # an event-driven pin: in vcpud_pin_latency_seconds
    assert "us after the event)" in caplog.text


def test_hotplugged_vcpu_gets_its_rule(tree):
    named = tree.pid("named")
    rec, act, _ = make(tree)
    rec.rescan(ScanReason.STARTUP)
    tree.add_thread(named, 15002, "CPU 2/KVM")
    rec.on_fork(15002, named)
    rec.on_comm(15002, named)
    assert act.moved()[15002] == C("2-3")  # not in vcpupin: the vcpus list


def test_thread_exit_forgets_it(tree):
    named = tree.pid("named")
    rec, _, _ = make(tree)
    rec.rescan(ScanReason.STARTUP)
    io = tree.tid_by_comm(named, "IO io1")
    assert io in rec.vms[named].wanted
    tree.remove_thread(named, io)
    rec.on_exit(io, named)
    assert io not in rec.vms[named].wanted
    # gone from the VM's threads too: not shown in snapshots, nor walked for each new thread
    assert io not in {t.tid for t in rec.vms[named].vm.threads}


def test_vm_exit_forgets_the_vm(tree):
    named = tree.pid("named")
    rec, _, _ = make(tree)
    rec.rescan(ScanReason.STARTUP)
    tree.remove_process(named)
    rec.on_exit(named, named)
    assert named not in rec.vms


# --- drift, PID reuse, exec, uevents -------------------------------------------------------------
def test_drift_is_put_back_and_counted_once(tree, caplog):
    named = tree.pid("named")
    rec, act, _ = make(tree)
    rec.rescan(ScanReason.STARTUP)
    vcpu1 = tree.tid_by_comm(named, "CPU 1/KVM")
    tree.set_affinity(named, vcpu1, [0])  # someone ran taskset
    with caplog.at_level(logging.WARNING, logger="vcpud.reconciler"):
        rec.rescan(ScanReason.PERIODIC)
    assert affinity(tree, named, "CPU 1/KVM") == C("1")
    assert rec.stats.drift_corrections == 1
    assert f"tid {vcpu1} (vcpu 1) had been moved to 0; put back on 1" in caplog.text


def test_reused_pid_is_a_new_vm_not_drift(tree):
    named = tree.pid("named")
    rec, act, _ = make(tree)
    rec.rescan(ScanReason.STARTUP)
    old_key = rec.vms[named].vm.key
    tree.clone_process(named)  # same pid, later start time: another process
    for tid in tree.procfs().tids(named):
        tree.set_affinity(named, tid, [3])
    rec.rescan(ScanReason.PERIODIC)
    assert rec.vms[named].vm.key != old_key
    assert affinity(tree, named, "CPU 0/KVM") == C("0")
    assert rec.stats.drift_corrections == 0


def test_exec_of_a_non_vm_is_remembered_and_a_kvm_uevent_finds_a_vm(tree):
    named, shell = tree.pid("named"), tree.pid("shell")
    rec, act, clock = make(tree)
    rec.on_exec(shell)
    assert shell in rec.not_vm and not act.calls
    # a VM we have not scanned yet: the uevent comes from the thread that opened /dev/kvm
    rec.on_kvm_uevent("create", tree.tid_by_comm(named, "CPU 0/KVM"))
    assert rec.due.get(named) == clock()
    rec.run_due()
    assert named in rec.vms and affinity(tree, named, "CPU 1/KVM") == C("1")


def test_new_vm_followed_up_until_all_vcpus_are_seen(tree):
    named = tree.pid("named")
    vcpu1 = tree.tid_by_comm(named, "CPU 1/KVM")
    tree.rename_thread(named, vcpu1, "qemu-system-x86")  # not named yet
    rec, act, clock = make(tree)
    rec.look_at([named])
    assert rec.due[named] == pytest.approx(clock() + FOLLOWUP_DELAYS[0])
    tree.rename_thread(named, vcpu1, "CPU 1/KVM")
    clock.advance(FOLLOWUP_DELAYS[0])
    rec.run_due()
    assert act.moved()[vcpu1] == C("1") and named not in rec.due


# --- failures ------------------------------------------------------------------------------------
def test_refused_pin_is_said_once_per_thread_and_reason(tree, caplog):
    named = tree.pid("named")
    vcpu0 = tree.tid_by_comm(named, "CPU 0/KVM")
    tree.set_affinity(named, vcpu0, [3])
    rec, act, _ = make(tree)
    act.refuse[vcpu0] = errno.EINVAL  # a cpuset cgroup that does not allow CPU 0
    with caplog.at_level(logging.DEBUG, logger="vcpud.reconciler"):
        rec.rescan(ScanReason.STARTUP)
        rec.rescan(ScanReason.PERIODIC)
        rec.rescan(ScanReason.PERIODIC)
    said = [r for r in caplog.records if f"tid {vcpu0}" in r.getMessage() and "cannot pin" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert rec.stats.pins[Outcome.OUTSIDE_CPUSET] == 3
    assert rec.vms[named].status is VMStatus.FAILED
    del act.refuse[vcpu0]
    rec.rescan(ScanReason.PERIODIC)
    assert rec.vms[named].status is VMStatus.PINNED


def test_thread_vanishing_mid_pin_is_not_a_failure(tree):
    named = tree.pid("named")
    io = tree.tid_by_comm(named, "IO io1")
    tree.set_affinity(named, io, [3])
    rec, act, _ = make(tree)
    act.refuse[io] = errno.ESRCH
    rec.rescan(ScanReason.STARTUP)
    assert rec.stats.pins[Outcome.VANISHED] == 1 and rec.stats.vanished >= 1
    assert io not in rec.vms[named].failed


# --- reload --------------------------------------------------------------------------------------
def test_reload_repins_by_the_new_policy(tree):
    named = tree.pid("named")
    rec, act, _ = make(tree)
    rec.rescan(ScanReason.STARTUP)
    new = parse_config_text(dedent(FIXED.replace('emulatorpin: "0"', 'emulatorpin: "3"') % "0"), "t.yaml",
                            online=ONLINE)
    moved, changed = rec.reload(new, ONLINE, None)
    assert moved == 1 and changed == len([t for t in tree.procfs().tids(named)
                                          if roles(rec, named)[t] is Role.EMULATOR])
    assert tree.procfs().affinity(named, named) == C("3")


# --- pools and the state store -------------------------------------------------------------------
# the fixture's named VMs in one exclusive pool: (the pool's CPUs, on_exhausted)
POOLED = """
executables: [/usr/bin/qemu-system-*]
pools:
  dedicated: {cpus: "%s", exclusive: true}
policies:
  - name: pooled
    match: {name: "fixture-*"}
    vcpus: {pool: dedicated}
    on_exhausted: %s
"""
POOLS = POOLED % ("1-3", "leave")


def pooled_vcpus(rec: Reconciler, pid: int) -> tuple[int, ...]:
    a = rec.allocations[rec.vms[pid].vm.key]
    return a.vcpus


def test_restart_keeps_pool_cpus_from_the_store_and_moves_nothing(tree):
    topo = synth(cores_per_node=(2,), smt=2)  # CPUs 0-3
    store = MemoryStore()
    rec, act, _ = make(tree, POOLS, store=store, topology=topo)
    rec.rescan(ScanReason.STARTUP)
    named, deleted = tree.pid("named"), tree.pid("deleted")
    held = {pid: pooled_vcpus(rec, pid) for pid in (named, deleted)}
    assert not set(held[named]) & set(held[deleted]) and store.saved is not None
    rec2, act2, _ = make(tree, POOLS, store=store, topology=topo)
    rec2.rescan(ScanReason.STARTUP)
    assert {pid: pooled_vcpus(rec2, pid) for pid in (named, deleted)} == held
    assert not act2.calls


def test_corrupt_store_is_rebuilt_from_live_affinities(tree, caplog):
    topo = synth(cores_per_node=(2,), smt=2)
    store = MemoryStore()
    rec, _, _ = make(tree, POOLS, store=store, topology=topo)
    rec.rescan(ScanReason.STARTUP)
    named = tree.pid("named")
    held = pooled_vcpus(rec, named)
    store.saved = {}  # loads, but
    other = next(iter(rec.allocations.values()))
    store.saved = {(1, 1): state.Saved(1, 1, "a", "p", other), (2, 2): state.Saved(2, 2, "b", "p", other)}
    with caplog.at_level(logging.WARNING, logger="vcpud.holdings"):
        rec2, act2, _ = make(tree, POOLS, store=store, topology=topo)
        rec2.rescan(ScanReason.STARTUP)
    assert "double-books" in caplog.text and "adopted" in caplog.text
    assert pooled_vcpus(rec2, named) == held and not act2.calls


def unpin_all(tree: ProcTree) -> None:
    fs = tree.procfs()
    for pid in fs.pids():
        for tid in fs.tids(pid):
            tree.set_affinity(pid, tid, [0, 1, 2, 3])


def test_waiting_vm_placed_when_a_holder_exits(tree):
    topo = synth(cores_per_node=(2,), smt=2)
    unpin_all(tree)  # nothing to adopt: placed in arrival order
    rec, act, clock = make(tree, POOLS.replace('"1-3"', '"1-2"'), topology=topo)
    rec.rescan(ScanReason.STARTUP)
    # 2 + 1 vCPUs for 2 CPUs: the older VM is placed, the younger waits
    older, younger = sorted((tree.pid("named"), tree.pid("deleted")), key=lambda p: rec.vms[p].vm.key[::-1])
    assert rec.vms[older].status is VMStatus.PLACED
    assert rec.vms[younger].status is VMStatus.WAITING
    assert "exhausted" in rec.vms[younger].plan.reason
    tree.remove_process(older)
    rec.on_exit(older, older)
    assert rec.due[younger] == clock()
    rec.run_due()
    assert rec.vms[younger].status is VMStatus.PLACED
    cpus = pooled_vcpus(rec, younger)
    assert set(cpus) <= {1, 2}
    assert affinity(tree, younger, "CPU 0/KVM") == CpuSet.of([cpus[0]])


def test_cpu_going_offline_replaces_the_vms_on_it(tree):
    topo = synth(cores_per_node=(2,), smt=2)
    rec, act, _ = make(tree, POOLS, topology=topo)
    rec.rescan(ScanReason.STARTUP)
    named = tree.pid("named")
    lost = pooled_vcpus(rec, named)[0]
    online = ONLINE - CpuSet.of([lost])
    assert rec.set_topology(online, synth(cores_per_node=(2,), smt=2, offline=(lost,)))
    assert lost not in {c for a in rec.allocations.values() for c in a.vcpus}
    assert not rec.set_topology(online, None)  # no change, no work


# --- what readers see ----------------------------------------------------------------------------
def test_snapshot_and_status_line_follow_the_reconciler(tree):
    from vcpud.metrics import exposition
    from vcpud.publisher import ConfigInfo, snapshot, status_line
    from vcpud.vocab import ThreadState

    named = tree.pid("named")
    vcpu0 = tree.tid_by_comm(named, "CPU 0/KVM")
    tree.set_affinity(named, vcpu0, [3])
    rec, act, _ = make(tree)
    act.refuse[vcpu0] = errno.EPERM
    rec.rescan(ScanReason.STARTUP)
    snap = snapshot(rec)
    views = {v.name: v for v in snap.vms}
    assert views["fixture-named"].status is VMStatus.FAILED
    states = {t.vcpu: t.state for t in views["fixture-named"].threads if t.role is Role.VCPU}
    assert states == {0: ThreadState.FAILED, 1: ThreadState.PINNED}
    assert snap.rescans == 1 and snap.pin_operations[Outcome.NO_PERMISSION] == 1
    text = exposition(snap).decode()
    assert 'vcpud_vms_by_status{status="failed"} 1.0' in text
    assert "vcpud_rescans_total 1.0" in text
    line = status_line(rec, ConfigInfo(loaded_at="12:00:00"))
    assert line.startswith("3 VMs, ") and "1 failed" in line and "12:00:00" in line
    assert status_line(rec, ConfigInfo("12:00:00", "reload failed at 12:01:00")).startswith("reload failed")
