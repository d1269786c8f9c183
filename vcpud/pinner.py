"""Pinning a VM's threads through its owner, and keeping the account: counted by outcome, said
once per (thread, reason) or in one line per VM for a whole plan, and a cgroup refusal not
retried until what it depended on changes."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, AbstractSet, Callable, Hashable, Sequence

from .activity import Stats
from .pinning import AffinityOps, Outcome, PinResult, Router, confinement, pin_one
from .cpuset import CpuSet
from .discovery import Thread
from .placement import Assignment, assign
from .vmstate import Bulk, VMState, journal_fields, pinned_text, say_once, since

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("vcpud.reconciler")


class Pinner:
    def __init__(self, router: Router, stats: Stats, dry_run: bool = False) -> None:
        self.router = router
        self.stats = stats
        self.dry_run = dry_run

    @staticmethod
    def blocker(ops: AffinityOps, a: Assignment) -> tuple[Hashable, str] | None:
        """What a cgroup failure of ``a`` depends on, and the reason to say it under (one warning
        per VM for a cgroup all its threads share); None when the thread's cgroup cannot be seen."""
        c = confinement(ops, a)
        if c is None:
            return None
        try:
            now = ops.get(a.tid)
        except OSError:
            return None
        key = (a.cpus, c.path, c.effective, c.per_thread, now)
        return key, f"{c.path} {c.effective}"

    def pin(self, st: VMState, a: Assignment, event_ns: int = 0, quiet: bool = False,
            ops: AffinityOps | None = None, before: CpuSet | None = None) -> PinResult:
        """Pin ``a`` through the VM's owner (``ops``: the one the router gives, when the caller
        asked it already); record, count and say the outcome (``quiet``: the caller says a success,
        for the whole VM). ``before``: the thread's affinity, when the caller just read it."""
        ops = ops if ops is not None else self.router.ops_for(st.vm)
        st.dirty = True
        vm, policy = st.vm, st.policy.name if st.policy else None
        held = st.blocked.get(a.tid)
        if held is not None:
            blocker = self.blocker(ops, a)
            if blocker is not None and blocker[0] == held[0]:
                # Nothing changed since it failed: the same answer, counted, not said again.
                r = held[1]
                self.stats.pins[r.outcome] += 1
                st.results[a.tid] = r
                st.failed[a.tid] = r
                return r
            del st.blocked[a.tid]
            log.info("VM %s tid %d (%s): its cpuset cgroup or its wanted CPUs changed; trying again",
                     vm.display_name, a.tid, a.label, extra=journal_fields(vm, policy, a))
        r = pin_one(a, ops, self.dry_run, before)
        self.stats.pins[r.outcome] += 1
        if r.outcome is Outcome.PINNED:
            if event_ns:
                self.stats.latency_hist.observe(since(event_ns))
            if not quiet:  # else the caller says it, with the VM's other threads
                after = f" ({since(event_ns) * 1e6:.0f} us after the event)" if event_ns else ""
                via = f" via {r.via}" if r.via and r.via != "sched_setaffinity" else ""
                log.info("pinned VM %s %s%s%s", vm.display_name, pinned_text(a), after, via,
                         extra=journal_fields(vm, policy, a))
        elif r.outcome is Outcome.UNCHANGED and event_ns:
            # An event about a thread already where it belongs (it inherited the CPUs): no pin, no latency.
            log.debug("VM %s tid %d (%s) already on %s (%s): nothing to pin", vm.display_name, a.tid, a.label,
                      a.cpus, a.rule, extra=journal_fields(vm, policy, a))
        elif r.outcome is Outcome.VANISHED:
            self.stats.vanished += 1
            log.debug("VM %s tid %d (%s) exited before it was pinned (%s)", vm.display_name, a.tid, a.label,
                      r.detail, extra=journal_fields(vm, policy, a))
        elif not r.outcome.ok:
            blocker = self.blocker(ops, a) if r.outcome in (Outcome.OUTSIDE_CPUSET, Outcome.MISMATCH) \
                and not self.dry_run else None
            if blocker is not None:
                st.blocked[a.tid] = (blocker[0], r)
                # One warning per VM and cgroup (and its CPUs); the other threads at debug level.
                say_once(st, 0, f"{r.outcome.value} {blocker[1]}", "cannot pin VM %s tid %d (%s) to %s: %s %s",
                         vm.display_name, a.tid, a.label, a.cpus, r.outcome, r.detail,
                         extra=journal_fields(vm, policy, a))
            else:
                say_once(st, a.tid, r.outcome.value, "cannot pin VM %s tid %d (%s) to %s: %s %s",
                          vm.display_name, a.tid, a.label, a.cpus, r.outcome, r.detail,
                          extra=journal_fields(vm, policy, a))
        if r.outcome.ok:
            self._took(st, r)
        else:
            st.results[a.tid] = r
            if r.outcome is not Outcome.VANISHED:
                st.failed[a.tid] = r
        return r

    def _fast(self, ops: AffinityOps, listed: bool) -> tuple[Callable[[int, CpuSet], AbstractSet[int]], str] | None:
        """The actuator's two-syscall pin for threads just seen in their task list, if it has one."""
        fast = getattr(ops, "set_listed", None) if listed and not self.dry_run else None
        return (fast, str(getattr(ops, "name", ""))) if fast is not None else None

    def _pin_listed(self, st: VMState, a: Assignment, ops: AffinityOps,
                    fast: tuple[Callable[[int, CpuSet], AbstractSet[int]], str], before: CpuSet | None) -> PinResult:
        """Pin a thread just seen in its VM's task list: set and read back (a reload after a
        host-wide taskset puts back thousands of threads); anything but a clean pin, or a thread
        held back by its cgroup, goes the whole way (:meth:`pin`: said, counted, classified)."""
        if a.tid not in st.blocked:
            try:
                before = ops.get(a.tid) if before is None else before
                after = fast[0](a.tid, a.cpus) if before != a.cpus else None
            except OSError:
                after = None
            if after is not None and after == a.cpus.cpus:
                r = PinResult(a, Outcome.PINNED, before, a.cpus, via=fast[1])
                self.stats.pins[Outcome.PINNED] += 1
                self._took(st, r)
                return r
        return self.pin(st, a, quiet=True, ops=ops, before=before)

    @staticmethod
    def _took(st: VMState, r: PinResult) -> None:
        a = r.assignment
        st.results[a.tid] = r
        st.wanted[a.tid] = a
        st.failed.pop(a.tid, None)
        st.blocked.pop(a.tid, None)
        if st.said:
            st.said = {s for s in st.said if s[0] != a.tid}  # a later failure is news again

    # --- one VM ---------------------------------------------------------------------------
    def pin_plan(self, st: VMState, prev: VMState | None, listed: bool = False) -> list[PinResult]:
        """Pin every assignment of ``st.plan``; a thread ``prev`` had pinned to the same CPUs and
        that is found elsewhere was moved by someone (drift, counted). One log line for the VM.
        ``listed``: the VM's threads were just read from its task list."""
        bulk = Bulk(st)
        ops = self.router.ops_for(st.vm)
        fast = self._fast(ops, listed)
        for a in st.plan.assignments if st.plan is not None else ():
            before = prev.wanted.get(a.tid) if prev else None
            r = self._pin_listed(st, a, ops, fast, None) if fast else self.pin(st, a, quiet=True, ops=ops)
            if before is not None and before.cpus == a.cpus:
                bulk.moved(a, r.before, r)
            else:
                bulk.add(r)
        self.stats.drift_corrections += bulk.say()
        return bulk.results

    def put_back(self, st: VMState, drifted: Sequence[tuple[Assignment, CpuSet]],
                 listed: bool = False) -> list[PinResult]:
        """Under an unchanged plan: put back the threads found moved, try the failed ones again.
        ``listed``: the drifted threads were just seen in the VM's task list."""
        if not drifted and not st.failed:
            return []  # the usual rescan: nothing to ask the VM's owner
        bulk = Bulk(st)
        ops = self.router.ops_for(st.vm)
        fast = self._fast(ops, listed)
        for a, now in drifted:
            bulk.moved(a, now, self._pin_listed(st, a, ops, fast, now) if fast else
                       self.pin(st, a, quiet=True, ops=ops, before=now))
        st.dirty = True
        for failed in list(st.failed.values()):
            bulk.add(self.pin(st, failed.assignment, quiet=True, ops=ops))
        self.stats.drift_corrections += bulk.say()
        return bulk.results

    def place(self, st: VMState, t: Thread, config: "Config", online: CpuSet, isolated: CpuSet,
              event_ns: int = 0) -> bool:
        """Pin one new or renamed thread by its VM's policy and pool decision. False when the VM
        must be planned again first (a vCPU hot-plugged past the pool CPUs it holds)."""
        st.dirty = True
        if st.policy is None:
            return True
        if st.outgrows_allocation(t):
            return False
        rule = assign(t, st.vm, st.policy, config, st.decision, isolated)
        if rule is None:
            st.wanted.pop(t.tid, None)
            return True
        usable = rule[1] & online
        if usable:
            self.pin(st, Assignment(pid=st.vm.pid, tid=t.tid, label=t.label, role=t.role, cpus=usable, rule=rule[0]),
                     event_ns)
        return True
