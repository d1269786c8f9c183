"""Rescans of VMs the reconciler already knows, as the daemon runs them with the proc connector
(trusted events): task lists and affinities only; and what a reload re-plans. Captured /proc trees,
no root, no qemu (see test_reconciler.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from textwrap import dedent

import pytest

from tests.proctree import ProcTree, load
from tests.unit.test_reconciler import FIXED, ONLINE, C, make, roles
from vcpud.activity import VcpuClock
from vcpud.config import parse_config_text
from vcpud.discovery import Role
from vcpud.procfs import Procfs
from vcpud.reconciler import Reconciler, ScanReason


@pytest.fixture
def tree(tmp_path: Path) -> ProcTree:
    return load(tmp_path / "proc")


class CountingProcfs(Procfs):
    """A Procfs that counts the files it reads, by name (stat, comm, status, syscall, cmdline)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def _read(self, path: str) -> str:
        self.reads.append(path.rsplit("/", 1)[1])
        return super()._read(path)

    def task_ids(self, pid: int) -> set[int]:
        self.reads.append(f"task of {pid}")
        return super().task_ids(pid)


def trusting(tree: ProcTree, text: str = FIXED % "0") -> tuple[Reconciler, object, CountingProcfs]:
    rec, act, _ = make(tree, text)
    fs = CountingProcfs(tree.root)
    rec.procfs = fs
    rec.trust_events = True
    rec.rescan(ScanReason.STARTUP)
    return rec, act, fs


def test_quiet_rescan_reads_no_thread_files(tree):
    rec, act, fs = trusting(tree)
    named = tree.pid("named")
    assert act.moved()  # the first look pinned things, reading every thread
    act.calls.clear()
    fs.reads.clear()
    rec.rescan(ScanReason.PERIODIC)
    # Task lists and affinities only: the tree's affinities live in status files (the live /proc
    # answers sched_getaffinity instead), so no stat, comm, syscall or cmdline is read.
    assert not {"stat", "comm", "syscall", "cmdline"} & set(fs.reads), fs.reads
    assert not act.calls
    assert roles(rec, named)  # still known


def test_thread_whose_events_were_missed_is_found_by_the_task_list(tree):
    rec, act, fs = trusting(tree)
    named = tree.pid("named")
    tree.add_thread(named, 15100, "IO io9")  # its FORK and COMM never arrived (the BPF filter race)
    tree.set_affinity(named, 15100, [0, 1, 2, 3])
    fs.reads.clear()
    rec.rescan(ScanReason.PERIODIC)
    assert act.moved()[15100] == C("1")
    assert roles(rec, named)[15100] is Role.IOTHREAD
    assert fs.reads.count("stat") == 1  # the new thread alone was read whole


def test_gone_thread_is_dropped_without_events(tree):
    rec, _, _ = trusting(tree)
    named = tree.pid("named")
    io = tree.tid_by_comm(named, "IO io1")
    assert io in rec.vms[named].wanted
    tree.remove_thread(named, io)
    rec.rescan(ScanReason.PERIODIC)
    assert io not in roles(rec, named) and io not in rec.vms[named].wanted


def listings(fs: CountingProcfs) -> list[str]:
    return [r for r in fs.reads if r.startswith("task of ")]


def test_a_vm_listed_while_its_events_pass_the_filter_is_not_listed_again(tree):
    rec, act, fs = trusting(tree)
    named = tree.pid("named")
    vms = sorted(rec.vms)
    rec.rescan(ScanReason.PERIODIC)
    assert rec.coverage.covered == set()  # no filter told about yet (watched() not asked): listed each time
    rec.watched()  # the daemon asks before each sleep and makes its connector filter pass these
    fs.reads.clear()
    rec.rescan(ScanReason.PERIODIC)
    # (the tree's affinities live in status files, read where the live /proc answers sched_getaffinity)
    assert listings(fs) == [f"task of {pid}" for pid in vms]  # the last listing each needs
    assert rec.coverage.covered == set(vms)
    fs.reads.clear()
    rec.rescan(ScanReason.PERIODIC)
    assert listings(fs) == []  # affinities only: new threads come with a FORK that passes the filter
    # A thread that exited is found by its affinity read failing.
    io = tree.tid_by_comm(named, "IO io1")
    tree.remove_thread(named, io)
    rec.rescan(ScanReason.PERIODIC)
    assert io not in roles(rec, named) and io not in rec.vms[named].wanted
    # Drift: that VM's task list is read before its threads are pinned, the others' are not.
    vcpu0 = tree.tid_by_comm(named, "CPU 0/KVM")
    tree.set_affinity(named, vcpu0, [3])
    fs.reads.clear()
    act.calls.clear()
    rec.rescan(ScanReason.PERIODIC)
    assert listings(fs) == [f"task of {named}"], fs.reads
    assert act.moved() == {vcpu0: C("0")}
    # Lost events: every VM is read again, carefully; a VM forgotten is no longer covered.
    rec.on_events_lost()
    fs.reads.clear()
    rec.rescan(ScanReason.PERIODIC)
    assert "comm" in fs.reads
    rec.forget(named)
    assert named not in rec.coverage.covered


def test_drift_of_many_threads_is_put_back_and_said_in_one_line(tree, caplog):
    rec, _, _ = trusting(tree)
    named = tree.pid("named")
    moved = [tree.tid_by_comm(named, "CPU 0/KVM"), tree.tid_by_comm(named, "CPU 1/KVM")]
    for tid in moved:
        tree.set_affinity(named, tid, [3])
    with caplog.at_level(logging.INFO, logger="vcpud.reconciler"):
        rec.rescan(ScanReason.PERIODIC)
    assert tree.procfs().affinity(named, moved[0]) == C("0") and tree.procfs().affinity(named, moved[1]) == C("1")
    assert rec.stats.drift_corrections == 2
    said = [r.getMessage() for r in caplog.records if "had been moved" in r.getMessage()]
    assert len(said) == 1 and f"3 -> 0: tid {moved[0]} (vcpu 0)" in said[0], said
    assert f"3 -> 1: tid {moved[1]} (vcpu 1)" in said[0], said
    pinned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pinned VM")]
    assert pinned == [], pinned  # the put-back line says it: not once more per thread


def test_unknown_roles_are_read_whole_again(tree):
    rec, _, fs = trusting(tree, FIXED % "2")
    unnamed = tree.pid("unnamed")
    busy = sorted(t for t, r in roles(rec, unnamed).items() if r is Role.VCPU)[1]
    tree.set_syscall(unnamed, busy, "running")
    rec.look_at([unnamed])
    assert Role.UNKNOWN in roles(rec, unnamed).values()
    fs.reads.clear()
    rec.rescan(ScanReason.PERIODIC)
    assert "stat" in fs.reads  # a VM with threads of unknown role is looked at whole each time


def test_lost_events_make_the_next_rescan_read_names(tree):
    rec, act, fs = trusting(tree)
    named = tree.pid("named")
    emu = next(t for t, r in roles(rec, named).items() if r is Role.EMULATOR and t != named)
    tree.rename_thread(named, emu, "IO io8")  # its COMM event was lost in an overrun
    rec.on_events_lost()
    rec.rescan(ScanReason.PERIODIC)
    assert roles(rec, named)[emu] is Role.IOTHREAD and act.moved()[emu] == C("1")
    fs.reads.clear()
    rec.rescan(ScanReason.PERIODIC)  # back to task lists and affinities
    assert "comm" not in fs.reads


def test_reload_replans_only_the_vms_whose_policy_changed(tree):
    text = FIXED % "0"
    rec, act, _ = trusting(tree, text)
    named, unnamed = tree.pid("named"), tree.pid("unnamed")
    plans = {pid: st.plan for pid, st in rec.vms.items()}
    act.calls.clear()
    # The same rules, written two lines lower: nothing to re-plan.
    rec.reload(parse_config_text(dedent("\n\n" + text), "t.yaml", online=ONLINE), ONLINE, None)
    assert all(rec.vms[pid].plan is plans[pid] for pid in plans)
    assert not act.calls
    # The named VMs' policy changes: only they are re-planned.
    new = parse_config_text(dedent(text.replace('emulatorpin: "0"', 'emulatorpin: "3"')), "t.yaml", online=ONLINE)
    rec.reload(new, ONLINE, None)
    assert rec.vms[named].plan is not plans[named] and rec.vms[unnamed].plan is plans[unnamed]
    assert tree.procfs().affinity(named, named) == C("3")


def test_vcpu_clock_counts_time_on_the_cpu_since_first_seen(tmp_path):
    stat = tmp_path / "10" / "task" / "11" / "schedstat"
    stat.parent.mkdir(parents=True)
    now = [0.0]
    clock = VcpuClock(Procfs(tmp_path), min_interval=1.0, clock=lambda: now[0])
    stat.write_text("5000000000 0 0\n")
    assert dict(clock.sample([(10, 11, 3)])) == {}  # the baseline: earlier time is nobody's
    stat.write_text("7500000000 0 0\n")
    assert dict(clock.sample([(10, 11, 3)])) == {}  # asked again within min_interval: not read
    now[0] = 1.0
    assert dict(clock.sample([(10, 11, 3)])) == {3: 2.5}
    stat.write_text("8500000000 0 0\n")
    now[0] = 2.0
    assert dict(clock.sample([(10, 11, 2)])) == {3: 2.5}  # moved to CPU 2: a new baseline there
    stat.write_text("100 0 0\n")  # a recycled TID starts from zero
    now[0] = 3.0
    assert dict(clock.sample([(10, 11, 2)])) == {3: 2.5}
    stat.unlink()
    now[0] = 4.0
    assert dict(clock.sample([(10, 11, 2)])) == {3: 2.5}  # exited


def test_a_record_about_several_threads_gives_the_journal_a_field_per_thread(monkeypatch):
    """One journal entry per VM and CPU set, with TID= and ROLE= once per thread."""
    pytest.importorskip("systemd.journal")  # CI installs python-systemd: a skip there fails the run
    from systemd import journal

    from vcpud.discovery import Smp
    from vcpud.discovery import VM as VMModel
    from vcpud.placement import Assignment
    from vcpud.sdnotify import send_fields
    from vcpud.vmstate import journal_fields

    sent: list[tuple] = []
    monkeypatch.setattr(journal, "sendv", lambda *args: sent.append(args))
    vm = VMModel(pid=7, starttime=1, exe="/usr/bin/qemu-system-x86_64", cmdline=(), uid=0, user="root",
                 name="web1", uuid=None, smp=Smp(), threads=(), debug_threads=True)
    a = [Assignment(pid=7, tid=t, label=f"vcpu {i}", role=Role.VCPU, cpus=C("0"), rule="vcpus")
         for i, t in enumerate((11, 12))]
    send_fields("pinned", PRIORITY="6", CODE_LINE=3, **journal_fields(vm, "web", *a))
    assert sent and set(sent[0]) >= {"MESSAGE=pinned", "VM=web1", "VM_PID=7", "POLICY=web", "TID=11", "TID=12",
                                     "ROLE=vcpu 0", "ROLE=vcpu 1", "CPUS=0", "PRIORITY=6", "CODE_LINE=3"}
    assert journal_fields(vm, "web", a[0])["TID"] == 11


def test_a_thread_named_by_its_comm_event_is_pinned_without_reading_its_stat(tree):
    rec, act, fs = trusting(tree)
    named = tree.pid("named")
    tree.add_thread(named, 15200, "IO io5")
    tree.set_affinity(named, 15200, [0, 1, 2, 3])
    tree.add_thread(named, 15201, "worker")
    tree.set_affinity(named, 15201, [2])
    fs.reads.clear()
    rec.on_comm(15200, named, comm="IO io5")
    assert "stat" not in fs.reads and act.moved()[15200] == C("1")  # the event named its role
    assert roles(rec, named)[15200] is Role.IOTHREAD
    assert [t.tid for t in rec.vms[named].vm.threads] == sorted(t.tid for t in rec.vms[named].vm.threads)
    rec.on_comm(15201, named, comm="worker")  # a name that says nothing: /proc tells (flags, role)
    assert "stat" in fs.reads and act.moved()[15201] == C("0")
