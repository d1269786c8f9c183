"""Pinning one thread of a VM through its owner, and keeping the account: counted by outcome,
said once per (thread, reason), and a cgroup refusal not retried until what it depended on changes."""

from __future__ import annotations

import logging
from typing import Hashable

from .activity import Stats
from .pinning import AffinityOps, Outcome, PinResult, Router, confinement, pin_one
from .placement import Assignment
from .vmstate import VMState, journal_fields, say_once, since

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

    def pin(self, st: VMState, a: Assignment, event_ns: int = 0, quiet: bool = False) -> PinResult:
        """Pin ``a`` through the VM's owner; record, count and say the outcome (``quiet``: a
        success at debug level only, the caller says it for the whole VM)."""
        ops = self.router.ops_for(st.vm)
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
        r = pin_one(a, ops, self.dry_run)
        self.stats.pins[r.outcome] += 1
        if r.outcome is Outcome.PINNED:
            if event_ns:
                self.stats.latency_hist.observe(since(event_ns))
            if not quiet:  # else the caller says it, with the VM's other threads
                after = f" ({since(event_ns) * 1e6:.0f} us after the event)" if event_ns else ""
                log.info("pinned VM %s tid %d (%s) to %s by %s%s%s", vm.display_name, a.tid, a.label, a.cpus, a.rule,
                         after, f" via {r.via}" if r.via and r.via != "sched_setaffinity" else "",
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
        st.results[a.tid] = r
        if r.outcome.ok:
            st.wanted[a.tid] = a
            st.failed.pop(a.tid, None)
            st.blocked.pop(a.tid, None)
            st.said = {s for s in st.said if s[0] != a.tid}  # a later failure is news again
        elif r.outcome is not Outcome.VANISHED:
            st.failed[a.tid] = r
        return r
