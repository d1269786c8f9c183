"""Applies a plan with sched_setaffinity through a small AffinityOps protocol, and says why it failed."""

from __future__ import annotations

import enum
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AbstractSet, Protocol

from .cgroups import Cgroups, Confinement
from .cpuset import CpuSet
from .placement import Assignment

if TYPE_CHECKING:
    from .discovery import VM

log = logging.getLogger(__name__)


class AffinityOps(Protocol):
    def get(self, tid: int) -> CpuSet: ...

    def set(self, pid: int, tid: int, cpus: CpuSet) -> None: ...


class Router(Protocol):
    """Which actuator pins a VM's threads: sched_setaffinity, or the VM's owner (libvirt's API,
    its cgroup) where one confines them. Asked before every pin; cheap when nothing changed."""

    def ops_for(self, vm: "VM") -> AffinityOps: ...


class Owner(Protocol):
    """One owner of some VMs' threads (libvirt's API, their cgroups): an actuator for the VM, or
    None when it does not own that VM."""

    def ops_for(self, vm: "VM") -> AffinityOps | None: ...


class Chain:
    """A Router asking each owner in turn (libvirt first, then cgroups), else ``fallback``."""

    def __init__(self, *owners: Owner, fallback: AffinityOps) -> None:
        self.owners = owners
        self.fallback = fallback

    def ops_for(self, vm: "VM") -> AffinityOps:
        for owner in self.owners:
            ops = owner.ops_for(vm)
            if ops is not None:
                return ops
        return self.fallback


class Direct:
    """Every VM's threads through one actuator (sched_setaffinity by default)."""

    def __init__(self, ops: AffinityOps) -> None:
        self.ops = ops

    def ops_for(self, vm: "VM") -> AffinityOps:
        return self.ops


class Outcome(str, enum.Enum):
    UNCHANGED = "unchanged"      # already allowed on exactly those CPUs
    PINNED = "pinned"            # changed and read back equal
    PLANNED = "planned"          # dry run: would change
    VANISHED = "vanished"        # ESRCH / gone from /proc: the thread exited
    OUTSIDE_CPUSET = "outside-cpuset"  # EINVAL: its cpuset cgroup excludes those CPUs
    NO_PERMISSION = "no-permission"    # EPERM: no CAP_SYS_NICE over that thread
    MISMATCH = "mismatch"        # the kernel accepted but reads back something else
    ERROR = "error"

    def __str__(self) -> str:
        return self.value

    @property
    def ok(self) -> bool:
        return self in (Outcome.UNCHANGED, Outcome.PINNED, Outcome.PLANNED)


@dataclass(frozen=True, slots=True)
class PinResult:
    assignment: Assignment
    outcome: Outcome
    before: CpuSet | None = None
    after: CpuSet | None = None
    detail: str = ""
    via: str = ""  # the actuator that pinned (or would pin): sched_setaffinity, cgroup, libvirt
    cgroup: Confinement | None = None  # for a failure: the cpuset cgroup that confines the thread


class OsAffinity:
    """The real thing: sched_{get,set}affinity on TIDs, checked against /proc."""

    name = "sched_setaffinity"

    def __init__(self, proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> None:
        self.proc = proc
        self._proc = str(proc)
        self.cgroup = cgroup
        self.cgroups = Cgroups(proc, cgroup)

    def confinement(self, pid: int, tid: int) -> Confinement | None:
        return self.cgroups.confinement(pid, tid)

    def get(self, tid: int) -> CpuSet:
        return CpuSet.of_kernel(os.sched_getaffinity(tid))

    def set(self, pid: int, tid: int, cpus: CpuSet) -> None:
        # TIDs are recycled: make sure this one is still a thread of that process.
        if not os.path.exists(f"{self._proc}/{pid}/task/{tid}"):
            raise ProcessLookupError(errno.ESRCH, "thread is gone")
        os.sched_setaffinity(tid, cpus.cpus)

    def set_listed(self, tid: int, cpus: CpuSet) -> AbstractSet[int]:
        """Pin a thread the caller saw in its process's task list moments ago, and read it back
        (as the kernel gives it). No recycling check: the kernel hands out PIDs cyclically, so
        a TID is reused only after pid_max other tasks were created (32,768 here)."""
        os.sched_setaffinity(tid, cpus.cpus)
        return os.sched_getaffinity(tid)


def classify_errno(e: OSError) -> Outcome:
    if e.errno == errno.ESRCH or isinstance(e, ProcessLookupError):
        return Outcome.VANISHED
    if e.errno == errno.EINVAL:
        return Outcome.OUTSIDE_CPUSET
    if e.errno == errno.EPERM:
        return Outcome.NO_PERMISSION
    return Outcome.ERROR


def via(ops: AffinityOps, a: Assignment) -> str:
    """How ``ops`` pins that thread: sched_setaffinity, cgroup, libvirt."""
    how = getattr(ops, "via", None)
    if callable(how):
        return str(how(a.pid, a.tid))
    return str(getattr(ops, "name", "") or "")


def confinement(ops: AffinityOps, a: Assignment) -> Confinement | None:
    """The thread's cpuset cgroup, where ``ops`` can tell (None otherwise)."""
    how = getattr(ops, "confinement", None)
    if not callable(how):
        return None
    try:
        c = how(a.pid, a.tid)
    except OSError:
        return None
    return c if isinstance(c, Confinement) else None


def predict(a: Assignment, c: Confinement | None, cgroups: Cgroups | None = None) -> tuple[Outcome, str] | None:
    """What the kernel will say to pinning ``a`` inside ``c``: None (it will take it), or the
    failure (OUTSIDE_CPUSET: no CPU in common, EINVAL; MISMATCH: cut to the intersection)."""
    if c is None or c.effective is None:
        return None
    allowed = c.effective
    if c.writable:
        # Written as its owner would: bounded by the cgroup above it.
        parent = cgroups.parent_effective(c) if cgroups is not None else None
        if parent is None or a.cpus <= parent:
            return None
        allowed = parent
    if a.cpus <= allowed:
        return None
    outcome = Outcome.MISMATCH if a.cpus & allowed else Outcome.OUTSIDE_CPUSET
    return outcome, f"CPUs {a.cpus} are outside {c.describe()}; {c.hint()}"


def pin_one(a: Assignment, ops: AffinityOps, dry_run: bool = False, before: CpuSet | None = None) -> PinResult:
    """Pin one thread and read it back. ``before``: its affinity, when the caller just read it."""
    how = via(ops, a)
    if before is None:
        try:
            before = ops.get(a.tid)
        except OSError as e:
            return PinResult(a, classify_errno(e), detail=os.strerror(e.errno or 0), via=how)
    if before == a.cpus:
        return PinResult(a, Outcome.UNCHANGED, before, before, via=how)
    if dry_run:
        c = confinement(ops, a)
        failure = predict(a, c, getattr(ops, "cgroups", None))
        if failure is not None:
            return PinResult(a, failure[0], before, None, f"predicted: {failure[1]}", via=how, cgroup=c)
        return PinResult(a, Outcome.PLANNED, before, a.cpus, via=how)
    try:
        ops.set(a.pid, a.tid, a.cpus)
        after = ops.get(a.tid)
    except OSError as e:
        outcome = classify_errno(e)
        detail = {
            Outcome.VANISHED: "thread exited",
            Outcome.OUTSIDE_CPUSET: f"EINVAL: CPUs {a.cpus} are outside the thread's cpuset cgroup",
            Outcome.NO_PERMISSION: "EPERM: no CAP_SYS_NICE over this thread",
        }.get(outcome, f"{os.strerror(e.errno or 0)}")
        c = None
        if outcome is Outcome.OUTSIDE_CPUSET:
            c = confinement(ops, a)
            if c is not None:
                detail = f"EINVAL: CPUs {a.cpus} are outside {c.describe()}; {c.hint()}"
        return PinResult(a, outcome, before, None, detail, via=how, cgroup=c)
    if after != a.cpus:
        # A cpuset cgroup narrower than the request makes the kernel keep the intersection.
        c = confinement(ops, a)
        where = c.describe() if c is not None else "the thread's cpuset cgroup?"
        detail = f"asked for {a.cpus}, kernel kept {after}: {where}" + (f"; {c.hint()}" if c is not None else "")
        return PinResult(a, Outcome.MISMATCH, before, after, detail, via=how, cgroup=c)
    return PinResult(a, Outcome.PINNED, before, after, via=how)
