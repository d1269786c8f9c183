import errno

from vcpud.cpuset import CpuSet
from vcpud.discovery import Role
from vcpud.pinning import Outcome, pin_one
from vcpud.placement import Assignment

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
