import errno
import os
import threading
import time

import pytest

from vcpud.activity import Stats
from vcpud.cpuset import CpuSet
from vcpud.discovery import VM, Role, Smp
from vcpud.pinner import Pinner
from vcpud.pinning import Direct, OsAffinity, Outcome, pin_one
from vcpud.placement import Assignment, VMPlan
from vcpud.vmstate import VMState

C = CpuSet.parse


class FakeOps:
    """In-memory affinities; a tid mapped to an errno fails with it."""

    def __init__(self, current, fail=None, narrow=None):
        self.current = dict(current)
        self.fail = fail or {}
        self.narrow = narrow or {}
        self.sets = []

    def get(self, tid):
        if tid not in self.current:
            raise ProcessLookupError(errno.ESRCH, "No such process")
        return self.current[tid]

    def set(self, pid, tid, cpus):
        self.sets.append(tid)
        if tid in self.fail:
            raise OSError(self.fail[tid], "fail")
        self.current[tid] = cpus & self.narrow.get(tid, cpus)


def a(tid, cpus):
    return Assignment(pid=1, tid=tid, label="vcpu 0", role=Role.VCPU, cpus=C(cpus), rule="vcpupin[0]")


def test_skips_what_already_matches():
    ops = FakeOps({1: C("0"), 2: C("0-1")})
    res = [pin_one(x, ops) for x in (a(1, "0"), a(2, "1"))]
    assert [r.outcome for r in res] == [Outcome.UNCHANGED, Outcome.PINNED]
    assert ops.sets == [2] and ops.current[2] == C("1")


def test_errno_classification_and_continue():
    ops = FakeOps({1: C("0-1"), 2: C("0-1"), 3: C("0-1"), 5: C("0-1")},
                  fail={1: errno.EINVAL, 2: errno.EPERM, 3: errno.ESRCH})
    res = [pin_one(a(tid, "1"), ops) for tid in (1, 2, 3, 4, 5)]
    assert [r.outcome for r in res] == [Outcome.OUTSIDE_CPUSET, Outcome.NO_PERMISSION, Outcome.VANISHED,
                                        Outcome.VANISHED, Outcome.PINNED]
    assert "EINVAL" in res[0].detail and "cpuset" in res[0].detail
    assert "EPERM" in res[1].detail and "CAP_SYS_NICE" in res[1].detail
    assert not any(r.outcome.ok for r in res[:4]) and res[4].outcome.ok


def test_readback_mismatch():
    ops = FakeOps({1: C("0-3")}, narrow={1: C("0")})
    r = pin_one(a(1, "0-1"), ops)
    assert r.outcome is Outcome.MISMATCH and r.after == C("0")


def test_dry_run_changes_nothing():
    ops = FakeOps({1: C("0-1")})
    r = pin_one(a(1, "1"), ops, dry_run=True)
    assert r.outcome is Outcome.PLANNED and ops.sets == [] and r.outcome.ok


class Recording(OsAffinity):
    """The real actuator, noting the pins that went the whole way (checked against /proc first)."""

    def __init__(self) -> None:
        super().__init__()
        self.slow: list[int] = []

    def set(self, pid: int, tid: int, cpus: CpuSet) -> None:
        self.slow.append(tid)
        super().set(pid, tid, cpus)


@pytest.fixture
def live_threads():
    """Two live threads of this process and the TID of one that has exited (TIDs are reused
    only after pid_max other tasks were created)."""
    stop = threading.Event()
    tids: list[int] = []
    started = threading.Barrier(3)

    def worker() -> None:
        tids.append(threading.get_native_id())
        started.wait()
        stop.wait()

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    started.wait()
    exited: list[int] = []
    t = threading.Thread(target=lambda: exited.append(threading.get_native_id()))
    t.start()
    t.join()
    # join() returns when Python is done with the thread; the kernel's task may live a moment longer.
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/self/task/{exited[0]}"):
        assert time.monotonic() < deadline, "an exited thread's task did not go away"
        time.sleep(0.001)
    try:
        yield tids, exited[0]
    finally:
        stop.set()
        for w in workers:
            w.join()


def live_vm() -> VMState:
    vm = VM(pid=os.getpid(), starttime=1, exe="/usr/bin/python3", cmdline=(), uid=0, user="root", name="t",
            uuid=None, smp=Smp(cpus=2), threads=(), debug_threads=True)
    return VMState(vm=vm, policy=None)


def assignment(tid: int, i: int, cpus: CpuSet) -> Assignment:
    return Assignment(pid=os.getpid(), tid=tid, label=f"vcpu {i}", role=Role.VCPU, cpus=cpus, rule="vcpupin")


def test_put_back_of_listed_threads_pins_real_threads_and_sends_the_rest_the_whole_way(live_threads):
    """The re-check's fast path on real threads of this process: two syscalls each, read back;
    a thread that exited in between goes the whole way and is found gone, not pinned."""
    tids, gone = live_threads
    cpus = sorted(os.sched_getaffinity(0))
    here, there = C(str(cpus[0])), C(str(cpus[-1]))
    for tid in tids:
        os.sched_setaffinity(tid, there.cpus)  # "drifted"
    st, stats, ops = live_vm(), Stats(), Recording()
    drifted = [(assignment(t, i, here), there) for i, t in enumerate([*tids, gone])]
    results = Pinner(Direct(ops), stats).put_back(st, drifted, listed=True)
    assert ops.slow == [gone]
    assert [r.outcome for r in results] == [Outcome.PINNED, Outcome.PINNED, Outcome.VANISHED]
    assert all(CpuSet.of_kernel(os.sched_getaffinity(t)) == here for t in tids)
    assert results[0].before == there and results[0].after == here and results[0].via == "sched_setaffinity"
    assert stats.pins[Outcome.PINNED] == 2 and stats.pins[Outcome.VANISHED] == 1
    assert set(st.wanted) == set(tids) and gone not in st.failed
    assert stats.drift_corrections == (2 if len(cpus) > 1 else 0)


def test_a_plan_for_threads_just_listed_is_pinned_in_two_syscalls_a_thread(live_threads):
    tids, gone = live_threads
    cpus = sorted(os.sched_getaffinity(0))
    here, there = C(str(cpus[0])), C(str(cpus[-1]))
    os.sched_setaffinity(tids[0], here.cpus)  # already where the plan wants it
    os.sched_setaffinity(tids[1], there.cpus)
    st, stats, ops = live_vm(), Stats(), Recording()
    st.plan = VMPlan(vm=st.vm, policy="p", assignments=tuple(assignment(t, i, here) for i, t in
                                                              enumerate([*tids, gone])))
    results = Pinner(Direct(ops), stats).pin_plan(st, None, listed=True)
    assert ops.slow == []  # the gone one fails its first read: nothing to set
    pinned = Outcome.PINNED if len(cpus) > 1 else Outcome.UNCHANGED
    assert [r.outcome for r in results] == [Outcome.UNCHANGED, pinned, Outcome.VANISHED]
    assert all(CpuSet.of_kernel(os.sched_getaffinity(t)) == here for t in tids)
    assert set(st.wanted) == set(tids)
    # Not listed just now (a plan from an older read): every change goes the whole way.
    os.sched_setaffinity(tids[1], there.cpus)
    Pinner(Direct(ops), stats).pin_plan(st, None, listed=False)
    assert ops.slow == ([tids[1]] if len(cpus) > 1 else [])
