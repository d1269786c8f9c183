"""What vcpud knows about one VM while it runs (mutable, owned by the reconciler), and the
journal fields, say-once and one-line-per-VM logging that go with it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Hashable

from .discovery import VM, Role, Thread
from .cpuset import CpuSet
from .pinning import Outcome, PinResult
from .placement import Assignment, PoolDecision, VMPlan
from .vocab import VMStatus

if TYPE_CHECKING:
    from .config import Policy

log = logging.getLogger("vcpud.reconciler")  # one logger for what the reconciler says


@dataclass
class VMState:
    """What is known about one VM (managed or not). Mutable: the reconciler owns it."""

    vm: VM
    policy: "Policy | None"
    wanted: dict[int, Assignment] = field(default_factory=dict)  # tid -> what it was pinned to
    failed: dict[int, PinResult] = field(default_factory=dict)
    results: dict[int, PinResult] = field(default_factory=dict)  # tid -> the last attempt
    first_seen: float = 0.0
    followup: int = 0  # index into FOLLOWUP_DELAYS
    decision: PoolDecision = field(default_factory=PoolDecision)
    plan: VMPlan | None = None
    said: set[tuple[int, str]] = field(default_factory=set)  # (tid, reason) already logged
    # tid -> (what the failure depended on, the failure): a thread its cpuset cgroup keeps off its
    # CPUs is tried again only when that changes (the cgroup's CPUs, the wanted CPUs, the thread).
    blocked: dict[int, tuple[Hashable, PinResult]] = field(default_factory=dict)
    # What the publisher made of it, until something changes (dirty): a snapshot of 100 VMs
    # that did not move costs nothing to publish again.
    view: Any = None
    dirty: bool = True

    @classmethod
    def after(cls, prev: "VMState | None", vm: VM, policy: "Policy | None", decision: PoolDecision,
              now: float) -> "VMState":
        """The state of a VM read afresh: what was said, tried and followed up carries over."""
        if prev is None:
            return cls(vm=vm, policy=policy, first_seen=now, decision=decision)
        return cls(vm=vm, policy=policy, first_seen=prev.first_seen, followup=prev.followup, decision=decision,
                   said=prev.said, blocked=prev.blocked)

    def outgrows_allocation(self, t: Thread) -> bool:
        """A vCPU hot-plugged beyond the pooled CPUs the VM holds: it needs a bigger allocation."""
        held = self.decision.allocation
        return (t.role is Role.VCPU and self.policy is not None and self.policy.vcpus_rule is not None
                and held is not None and t.vcpu is not None and t.vcpu >= len(held.vcpus))

    def forget_thread(self, tid: int) -> None:
        """A thread exited: drop it, from the VM's threads too (else they pile up until the next
        rescan, and every snapshot and every new thread's pin walks them)."""
        self.dirty = True
        for d in (self.wanted, self.failed, self.results, self.blocked):
            d.pop(tid, None)
        if any(t.tid == tid for t in self.vm.threads):
            self.vm = replace(self.vm, threads=tuple(t for t in self.vm.threads if t.tid != tid))

    @property
    def complete(self) -> bool:
        """All the guest's vCPUs (as -smp says) have been seen."""
        return len({t.vcpu for t in self.vm.threads if t.role is Role.VCPU}) >= self.vm.smp.cpus

    @property
    def status(self) -> VMStatus:
        if self.policy is None:
            return VMStatus.UNMANAGED
        if self.failed:
            return VMStatus.FAILED
        return self.plan.status if self.plan is not None else VMStatus.PINNED

    @property
    def waiting(self) -> bool:
        return self.plan is not None and self.plan.waiting


def journal_fields(vm: VM, policy: str | None, *threads: Assignment) -> dict[str, Any]:
    """Journal fields for a log record (logging's extra=). Several threads: TID and ROLE (and CPUS
    where they differ) become fields with one value per thread (sdnotify sends them so)."""
    f: dict[str, Any] = {"VM": vm.display_name, "VM_PID": vm.pid, "POLICY": policy or ""}
    if len(threads) == 1:
        a = threads[0]
        f.update(TID=a.tid, ROLE=a.label, CPUS=a.cpus.format())
    elif threads:
        cpus = {a.cpus.format() for a in threads}
        f.update(TID=tuple(a.tid for a in threads), ROLE=tuple(a.label for a in threads),
                 CPUS=cpus.pop() if len(cpus) == 1 else tuple(sorted(cpus)))
    return f


def since(event_ns: int) -> float:
    # the connector's timestamp is ktime_get_ns(): CLOCK_MONOTONIC
    return (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - event_ns) / 1e9


def say_once(st: VMState, tid: int, reason: str, msg: str, *args: object, extra: dict[str, Any]) -> None:
    """A failure is a warning the first time for (thread, reason), then debug."""
    level = logging.DEBUG if (tid, reason) in st.said else logging.WARNING
    st.said.add((tid, reason))
    log.log(level, msg, *args, extra=extra)


def same_rules(a: "Policy | None", b: "Policy | None") -> bool:
    """Whether two policies pin alike (where in the file they were written does not matter)."""
    if a is None or b is None:
        return a is b
    return a is b or replace(a, pos=b.pos) == b


def pinned_text(a: Assignment) -> str:
    """How a pin is said in the log, on its own line or among a VM's others."""
    return f"tid {a.tid} ({a.label}) to {a.cpus} by {a.rule}"


class Bulk:
    """The pins of one pass over one VM, said in one line (and one for the threads put back)
    rather than a line per thread: a pass over 2,000 threads must not cost 4,000 log records."""

    def __init__(self, st: VMState) -> None:
        self.st = st
        self.results: list[PinResult] = []
        self._pinned: list[PinResult] = []
        self._back: list[tuple[Assignment, CpuSet | None]] = []

    def add(self, r: PinResult) -> None:
        self.results.append(r)
        if r.outcome is Outcome.PINNED:
            self._pinned.append(r)

    def moved(self, a: Assignment, now: CpuSet | None, r: PinResult) -> None:
        """``r`` pinned a thread that had been pinned to ``a`` already and was found on ``now``."""
        if r.outcome is not Outcome.PINNED:
            self.add(r)
            return
        self.results.append(r)
        self._back.append((a, now))

    def say(self) -> int:
        """Log what this pass did: a line per CPU set the VM's threads were pinned to (its journal
        entry carries every thread's TID and ROLE: ``journalctl TID=N`` finds it), one for the
        threads put back. Returns how many were put back (drift corrections)."""
        vm, policy = self.st.vm, self.st.policy.name if self.st.policy else None
        groups: dict[CpuSet, list[PinResult]] = {}
        for r in self._pinned if log.isEnabledFor(logging.INFO) else ():  # `vcpud apply` says it itself
            groups.setdefault(r.assignment.cpus, []).append(r)
        for rs in groups.values():
            via = {r.via for r in rs} - {"sched_setaffinity", ""}
            log.info("pinned VM %s %s%s", vm.display_name, "; ".join(pinned_text(r.assignment) for r in rs),
                     f" via {', '.join(sorted(via))}" if via else "",
                     extra=journal_fields(vm, policy, *(r.assignment for r in rs)))
        if len(self._back) == 1:
            a, now = self._back[0]
            log.warning("VM %s tid %d (%s) had been moved to %s; put back on %s", vm.display_name, a.tid, a.label,
                        now, a.cpus, extra=journal_fields(vm, policy, a))
        elif self._back:
            moves: dict[tuple[CpuSet | None, CpuSet], list[Assignment]] = {}
            for a, now in self._back:
                moves.setdefault((now, a.cpus), []).append(a)
            log.warning("VM %s: %d threads had been moved; put back: %s", vm.display_name, len(self._back),
                        "; ".join(f"{now} -> {cpus}: " + ", ".join([f"tid {a.tid} ({a.label})" for a in moved])
                                  for (now, cpus), moved in moves.items()),
                        extra=journal_fields(vm, policy, *(a for a, _ in self._back)))
        return len(self._back)


def say_exit(st: VMState) -> None:
    log.info("VM %s (pid %d) exited", st.vm.display_name, st.vm.pid,
             extra=journal_fields(st.vm, st.policy.name if st.policy else None))


def say_plan(st: VMState, prev: VMState | None) -> None:
    """Log a VM found, a plan whose status has a reason that changed, and its problems (once)."""
    vm, vp = st.vm, st.plan
    policy = st.policy.name if st.policy else None
    if prev is None:
        log.info("found VM %s (pid %d), policy %s", vm.display_name, vm.pid, policy or "none",
                 extra=journal_fields(vm, policy))
    if vp is None:
        return
    if vp.reason and (prev is None or prev.plan is None or prev.plan.status != vp.status):
        log.warning("VM %s %s: %s", vm.display_name, vp.status, vp.reason, extra=journal_fields(vm, vp.policy))
    for problem in vp.problems:
        say_once(st, 0, problem, "VM %s: %s", vm.display_name, problem, extra=journal_fields(vm, vp.policy))
