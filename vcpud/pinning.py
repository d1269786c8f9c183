"""Applies a plan with sched_setaffinity through a small AffinityOps protocol, and says why it failed."""

from __future__ import annotations

import enum
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

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


class OsAffinity:
    """The real thing: sched_{get,set}affinity on TIDs, checked against /proc."""

    def __init__(self, proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> None:
        self.proc = proc
        self.cgroup = cgroup

    def get(self, tid: int) -> CpuSet:
        return CpuSet.of(os.sched_getaffinity(tid))

    def set(self, pid: int, tid: int, cpus: CpuSet) -> None:
        # TIDs are recycled: make sure this one is still a thread of that process.
        if not (self.proc / str(pid) / "task" / str(tid)).exists():
            raise ProcessLookupError(errno.ESRCH, "thread is gone")
        os.sched_setaffinity(tid, cpus.cpus)

    def cpuset_of(self, tid: int) -> tuple[str, CpuSet | None]:
        """The thread's cpuset cgroup and the CPUs it allows, to explain an EINVAL."""
        try:
            lines = (self.proc / str(tid) / "cgroup").read_text().splitlines()
        except OSError:
            return "", None
        candidates: list[tuple[str, Path]] = []
        for line in lines:
            hier, _, rest = line.partition(":")
            ctrls, _, path = rest.partition(":")
            rel = path.lstrip("/")
            if "cpuset" in ctrls.split(","):  # cgroup v1: its own hierarchy
                candidates.append((path, self.cgroup / "cpuset" / rel))
            elif hier == "0":  # cgroup v2, mounted alone or as "unified" beside v1
                candidates += [(path, self.cgroup / rel), (path, self.cgroup / "unified" / rel)]
        for path, d in candidates:
            for name in ("cpuset.cpus.effective", "cpuset.effective_cpus"):
                try:
                    return path, CpuSet.parse((d / name).read_text().strip())
                except (OSError, ValueError):
                    continue
        return (candidates[0][0] if candidates else ""), None


def classify_errno(e: OSError) -> Outcome:
    if e.errno == errno.ESRCH or isinstance(e, ProcessLookupError):
        return Outcome.VANISHED
    if e.errno == errno.EINVAL:
        return Outcome.OUTSIDE_CPUSET
    if e.errno == errno.EPERM:
        return Outcome.NO_PERMISSION
    return Outcome.ERROR


def pin_one(a: Assignment, ops: AffinityOps, dry_run: bool = False) -> PinResult:
    try:
        before = ops.get(a.tid)
    except OSError as e:
        return PinResult(a, classify_errno(e), detail=os.strerror(e.errno or 0))
    if before == a.cpus:
        return PinResult(a, Outcome.UNCHANGED, before, before)
    if dry_run:
        return PinResult(a, Outcome.PLANNED, before, a.cpus)
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
        if outcome is Outcome.OUTSIDE_CPUSET and isinstance(ops, OsAffinity):
            path, allowed = ops.cpuset_of(a.tid)
            if path:
                detail += f" {path}" + (f" (allows {allowed})" if allowed is not None else "")
        return PinResult(a, outcome, before, None, detail)
    if after != a.cpus:
        # A cpuset cgroup narrower than the request makes the kernel keep the intersection.
        detail = f"asked for {a.cpus}, kernel kept {after} (cpuset cgroup?)"
        return PinResult(a, Outcome.MISMATCH, before, after, detail)
    return PinResult(a, Outcome.PINNED, before, after)
