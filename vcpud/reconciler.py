"""The reconciler: owns what vcpud knows about VMs and turns what happens on the host into pins.

`vcpud apply` is one `rescan()`; `vcpud run` feeds it events (exec, fork, comm, exit, kvm
uevents, rescans, reloads) from its selectors loop. Everything that touches the OS is handed
in: the /proc reader, the affinity actuator, the state store and a clock.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable

from .activity import Stats, sample_vcpu_time
from .cpuset import CpuSet
from .discovery import VM, ExeCheck, Role, Scan, classify_new_thread, scan, verify_executable
from .holdings import Ledger, StateStore
from .pinning import AffinityOps, Direct, Outcome, PinResult, Router, confinement, pin_one
from .placement import Assignment, PoolDecision, VMPlan, arrival_order, assign, plan_vm
from .pools import Allocation
from .procfs import Procfs, Vanished
from .vocab import VMStatus

if TYPE_CHECKING:
    from .config import Config, Policy
    from .topology import Topology

log = logging.getLogger(__name__)

# After a kvm "create" uevent (which comes before any vCPU thread exists) or a new VM
# found otherwise, look again at these delays until all its vCPUs are seen.
FOLLOWUP_DELAYS = (0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
# A thread that appeared (FORK) and was not named within this time is judged as it is.
UNNAMED_GRACE = 0.005
# Work done per run_due() before the caller looks at its event sources again (udev storms).
TURN_BUDGET = 0.05


class ScanReason(str, enum.Enum):
    STARTUP = "startup"      # first look: priors from the state store, the store rewritten whole
    PERIODIC = "rescan"      # lost events and drift
    RELOAD = "reload"        # a new policy: every VM read afresh
    TOPOLOGY = "topology"    # CPUs came or went


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


@dataclass(frozen=True, slots=True)
class RescanResult:
    scan: Scan
    pins: tuple[PinResult, ...]


def _fields(vm: VM, policy: str | None, a: Assignment | None = None) -> dict[str, Any]:
    """Journal fields for a log record (logging's extra=)."""
    f: dict[str, Any] = {"VM": vm.display_name, "VM_PID": vm.pid, "POLICY": policy or ""}
    if a is not None:
        f.update(TID=a.tid, ROLE=a.label, CPUS=a.cpus.format())
    return f


def _since(event_ns: int) -> float:
    # the connector's timestamp is ktime_get_ns(): CLOCK_MONOTONIC
    return (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - event_ns) / 1e9


def _say_once(st: VMState, tid: int, reason: str, msg: str, *args: object, extra: dict[str, Any]) -> None:
    """A failure is a warning the first time for (thread, reason), then debug."""
    level = logging.DEBUG if (tid, reason) in st.said else logging.WARNING
    st.said.add((tid, reason))
    log.log(level, msg, *args, extra=extra)


class Reconciler:
    """VM state and the one pipeline: discover -> match -> place -> pin -> record."""

    def __init__(self, config: "Config", online: CpuSet, procfs: Procfs, actuator: AffinityOps,
                 store: StateStore, topology: "Topology | None" = None,
                 clock: Callable[[], float] = time.monotonic, stats: Stats | None = None,
                 dry_run: bool = False, exe_check: ExeCheck | None = None, router: Router | None = None) -> None:
        self.config = config
        self.online = online
        self.topology = topology
        self.procfs = procfs
        self.actuator = actuator
        self.router: Router = router if router is not None else Direct(actuator)
        self.ledger = Ledger(store, dry_run)
        self.clock = clock
        self.stats = stats if stats is not None else Stats()
        self.dry_run = dry_run
        self.exe_check = exe_check  # None: the live host's files
        self.vms: dict[int, VMState] = {}
        self.not_vm: set[int] = set()  # tgids known not to be VMs (until they exec or exit)
        self.due: dict[int, float] = {}  # pid -> when to look at that process again
        self.unnamed: dict[int, tuple[int, float]] = {}  # tid -> (tgid, when): new threads awaiting a name
        # -daemonize qemu processes with no guest yet (Scan.starting) -> follow-ups done: not VMs
        # (no "found VM", no pins), looked at again until they show one or exit
        self.starting: dict[int, int] = {}
        self.rescan_wanted = False  # events were lost: the caller should rescan soon
        self.changed = True  # what readers see moved since the caller last published

    @property
    def allocations(self) -> dict[Hashable, Allocation]:
        """VM key -> the pooled CPUs it holds."""
        return self.ledger.allocations

    @property
    def isolated(self) -> CpuSet:
        return self.topology.isolated if self.topology is not None else CpuSet()

    # --- events ---------------------------------------------------------------------------
    def on_exec(self, tgid: int) -> None:
        self.not_vm.discard(tgid)
        self.starting.pop(tgid, None)
        self.forget(tgid)
        self._consider(tgid)

    def on_fork(self, pid: int, tgid: int) -> None:
        if tgid in self.vms and pid != tgid:
            # Named threads are pinned on their COMM event; give the rename a moment.
            self.unnamed[pid] = (tgid, self.clock() + UNNAMED_GRACE)

    def on_comm(self, pid: int, tgid: int, event_ns: int = 0) -> None:
        st = self.vms.get(tgid)
        if st is not None:
            self.unnamed.pop(pid, None)
            self._pin_thread(st, pid, event_ns)
        elif tgid not in self.not_vm:
            self._consider(tgid)

    def on_exit(self, pid: int, tgid: int) -> None:
        self.unnamed.pop(pid, None)
        if pid == tgid:
            self.not_vm.discard(tgid)
            self.starting.pop(tgid, None)
            st = self.vms.get(tgid)
            if st is not None:
                log.info("VM %s (pid %d) exited", st.vm.display_name, st.vm.pid,
                         extra=_fields(st.vm, st.policy.name if st.policy else None))
            self.forget(tgid)
        elif tgid in self.vms:
            st = self.vms[tgid]
            st.wanted.pop(pid, None)
            st.failed.pop(pid, None)
            st.results.pop(pid, None)
            st.blocked.pop(pid, None)
            self.changed = True

    def on_kvm_uevent(self, event: str, pid: int) -> None:
        """misc/kvm `change` with EVENT=create|destroy; PID is the thread that opened /dev/kvm."""
        if event == "destroy":
            if pid in self.vms and not self.procfs.exists(pid):
                self.forget(pid)
            return
        if event != "create":
            return
        try:
            tgid = self.procfs.tgid(pid)
        except (Vanished, KeyError, ValueError):
            self.stats.vanished += 1
            return
        self.not_vm.discard(tgid)
        if tgid not in self.vms:
            self.due[tgid] = self.clock()

    def on_events_lost(self) -> None:
        self.rescan_wanted = True

    # --- timers ---------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When run_due() has work next (follow-ups, threads awaiting a name), if ever."""
        times = list(self.due.values()) + [t for _, t in self.unnamed.values()]
        return min(times) if times else None

    def run_due(self, now: float | None = None, budget: float = TURN_BUDGET) -> None:
        now = self.clock() if now is None else now
        deadline = self.clock() + budget
        for tid, (tgid, when) in list(self.unnamed.items()):
            if when <= now:
                del self.unnamed[tid]
                st = self.vms.get(tgid)
                if st is not None:
                    self._pin_thread(st, tid)
        for _, pid in sorted((t, p) for p, t in self.due.items() if t <= now):
            del self.due[pid]
            self.look_at([pid])
            if self.clock() > deadline:
                break  # the rest stay due: events get a look in between

    # --- whole passes ---------------------------------------------------------------------
    def rescan(self, reason: ScanReason = ScanReason.PERIODIC, pids: Iterable[int] | None = None) -> RescanResult:
        """Scan /proc (or only ``pids``): new VMs, lost events, and drift; pin what is off."""
        t0 = time.perf_counter()
        log.debug("full scan (%s)", reason.value)
        self.stats.rescans += 1
        self.rescan_wanted = False
        pids = None if pids is None else list(pids)
        # A periodic rescan refreshes unchanged VMs cheaply; otherwise every VM is read afresh
        # (after a reload its policy may want other threads).
        known = {pid: st.vm for pid, st in self.vms.items()} if reason is ScanReason.PERIODIC else None
        found = scan(self.procfs, self.config.executables, pids, known=known, exe_check=self.exe_check)
        self.stats.vanished += found.vanished
        alive = {vm.pid for vm in found.vms}
        if pids is None:
            # Exits lost to a connector overrun would leave stale entries behind.
            self.not_vm &= set(self.procfs.pids())
        for pid in list(self.vms) if pids is None else pids:
            if pid not in alive:
                self.forget(pid)
        if pids is None:
            self.starting = {p: n for p, n in self.starting.items() if p in found.starting}
        self._await_guest(found.starting)
        if reason is ScanReason.STARTUP:
            self.ledger.start(self.config, arrival_order(found.vms), self.online, self.topology)
        others = [st.vm for pid, st in self.vms.items() if pid not in alive]
        # At startup the store is rewritten whole: it may have been corrupt, or name dead VMs.
        decisions = self.ledger.place(self.config, self.topology, others + list(found.vms),
                                      save=reason is ScanReason.STARTUP and bool(self.allocations))
        pins: list[PinResult] = []
        for vm in arrival_order(found.vms):
            pins += self._apply_vm(vm, decisions.get(vm.key, PoolDecision()))
        self._follow_decisions(decisions, alive)
        sample_vcpu_time(self.stats, self.procfs,
                         ((st.vm.pid, a) for st in self.vms.values() for a in st.wanted.values()))
        self.stats.reconcile_hist.observe(time.perf_counter() - t0)
        self.changed = True  # CPU times, counters and the reconcile histogram moved
        return RescanResult(scan=found, pins=tuple(pins))

    def look_at(self, pids: list[int]) -> None:
        """Read these processes afresh (a VM that is starting, one that must be re-placed)."""
        t0 = time.perf_counter()
        found = scan(self.procfs, self.config.executables, pids, exe_check=self.exe_check)
        self.stats.vanished += found.vanished
        fresh = {vm.pid for vm in found.vms}
        for pid in pids:
            if pid not in fresh:
                self.forget(pid)
        self._await_guest(found.starting)
        others = [st.vm for pid, st in self.vms.items() if pid not in fresh]
        decisions = self.ledger.place(self.config, self.topology, others + list(found.vms))
        for vm in arrival_order(found.vms):
            self._apply_vm(vm, decisions.get(vm.key, PoolDecision()))
        self._follow_decisions(decisions, fresh)
        self.stats.reconcile_hist.observe(time.perf_counter() - t0)
        self.changed = True

    def _await_guest(self, pids: Iterable[int]) -> None:
        """Look again at -daemonize processes that show no guest yet. The daemon that will run
        it is found on its kvm "create" uevent or a vCPU's COMM event; this covers the moment
        between KVM_CREATE_VM's uevent and its fd, and lost events. The parents exit meanwhile."""
        for pid in pids:
            n = self.starting.get(pid, 0)
            if n < len(FOLLOWUP_DELAYS):
                self.due[pid] = min(self.due.get(pid, float("inf")), self.clock() + FOLLOWUP_DELAYS[n])
            self.starting[pid] = n + 1

    def _follow_decisions(self, decisions: dict[Hashable, PoolDecision], done: set[int]) -> None:
        """Re-pin the VMs not just read whose pool decision changed (where a waiting VM may run
        depends on what the others hold)."""
        for pid, st in list(self.vms.items()):
            new = decisions.get(st.vm.key)
            if pid not in done and new is not None and new != st.decision:
                self._apply_vm(st.vm, new)

    def reload(self, config: "Config", online: CpuSet, topology: "Topology | None") -> tuple[int, int]:
        """Take a new (valid) policy and re-pin by it: (VMs re-pinned, threads changed)."""
        old_pins = {(pid, tid): a.cpus for pid, st in self.vms.items() for tid, a in st.wanted.items()}
        self.config = config
        self.online = online
        self.topology = topology
        self.not_vm.clear()  # the executables may have changed
        before = self.stats.pins[Outcome.PINNED]
        self.rescan(ScanReason.RELOAD)
        moved = {pid for pid, st in self.vms.items()
                 for tid, a in st.wanted.items() if old_pins.get((pid, tid)) not in (None, a.cpus)}
        return len(moved), self.stats.pins[Outcome.PINNED] - before

    def set_topology(self, online: CpuSet, topology: "Topology | None") -> bool:
        """CPUs came or went: re-place every VM. False when the online CPUs did not change."""
        if online == self.online:
            return False
        log.warning("online CPUs changed from %s to %s: re-placing VMs", self.online, online)
        self.online = online
        self.topology = topology
        self.rescan(ScanReason.TOPOLOGY)
        return True

    def forget(self, pid: int) -> None:
        """A VM is gone: drop its state and free its pool CPUs for VMs still waiting."""
        st = self.vms.pop(pid, None)
        self.due.pop(pid, None)
        if st is None:
            return
        self.changed = True
        if self.ledger.release(st.vm, [(x.vm, x.policy.name) for x in self.vms.values() if x.policy is not None]):
            for other in self.vms.values():
                if other.waiting:
                    self.due[other.vm.pid] = self.clock()

    # --- the pipeline ---------------------------------------------------------------------
    def _consider(self, tgid: int) -> None:
        """A process we know nothing about showed up (exec, thread renamed): is it a VM?"""
        try:
            _, why = verify_executable(self.procfs, tgid, self.config.executables, self.exe_check)
        except Vanished:
            self.stats.vanished += 1
            return
        if why is None:
            self.look_at([tgid])
        else:
            self.not_vm.add(tgid)

    def _apply_vm(self, vm: VM, decision: PoolDecision) -> list[PinResult]:
        prev = self.vms.get(vm.pid)
        if prev is not None and prev.vm.key != vm.key:
            prev = None  # the PID was reused by another process
        policy = self.config.select(vm)
        st = VMState(vm=vm, policy=policy, first_seen=prev.first_seen if prev else self.clock(),
                     followup=prev.followup if prev else 0, decision=decision,
                     said=prev.said if prev else set(), blocked=prev.blocked if prev else {})
        if prev is None:
            self.starting.pop(vm.pid, None)
            log.info("found VM %s (pid %d), policy %s", vm.display_name, vm.pid, policy.name if policy else "none",
                     extra=_fields(vm, policy.name if policy else None))
        vp = plan_vm(vm, policy, self.online, self.config, decision, self.isolated)
        st.plan = vp
        if vp.reason and (prev is None or prev.plan is None or prev.plan.status != vp.status):
            log.warning("VM %s %s: %s", vm.display_name, vp.status, vp.reason, extra=_fields(vm, vp.policy))
        for problem in vp.problems:
            _say_once(st, 0, problem, "VM %s: %s", vm.display_name, problem, extra=_fields(vm, vp.policy))
        results = []
        for a in vp.assignments:
            before = prev.wanted.get(a.tid) if prev else None
            r = self._pin(st, a)
            if r.outcome is Outcome.PINNED and before is not None and before.cpus == a.cpus:
                self.stats.drift_corrections += 1
                log.warning("VM %s tid %d (%s) had been moved to %s; put back on %s", vm.display_name, a.tid,
                            a.label, r.before, a.cpus, extra=_fields(vm, vp.policy, a))
            results.append(r)
        self.vms[vm.pid] = st
        self.changed = True
        if policy is not None and not st.complete and st.followup < len(FOLLOWUP_DELAYS):
            self.due[vm.pid] = self.clock() + FOLLOWUP_DELAYS[st.followup]
            st.followup += 1
        return results

    def _pin_thread(self, st: VMState, tid: int, event_ns: int = 0) -> None:
        """Fast path: one new or renamed thread of a known VM."""
        try:
            snap = self.procfs.thread(st.vm.pid, tid)
        except Vanished:
            self.stats.vanished += 1
            return
        t = classify_new_thread(st.vm, snap)
        if t is None:
            self.due[st.vm.pid] = min(self.due.get(st.vm.pid, float("inf")), self.clock())
            return
        st.vm = replace(st.vm, threads=tuple(x for x in st.vm.threads if x.tid != tid) + (t,))
        self.changed = True
        if st.policy is None:
            return
        held = st.decision.allocation
        if t.role is Role.VCPU and st.policy.vcpus_rule is not None and held is not None and t.vcpu is not None \
                and t.vcpu >= len(held.vcpus):
            # A vCPU hot-plugged beyond what the VM holds: it needs a bigger allocation.
            self.due[st.vm.pid] = self.clock()
            return
        rule = assign(t, st.vm, st.policy, self.config, st.decision, self.isolated)
        if rule is None:
            st.wanted.pop(tid, None)
            return
        usable = rule[1] & self.online
        if not usable:
            return
        a = Assignment(pid=st.vm.pid, tid=tid, label=t.label, role=t.role, cpus=usable, rule=rule[0])
        r = self._pin(st, a, event_ns)
        if event_ns and r.outcome is Outcome.PINNED:
            self.stats.latency_hist.observe(_since(event_ns))

    @staticmethod
    def _blocker(ops: AffinityOps, a: Assignment) -> tuple[Hashable, str] | None:
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

    def _pin(self, st: VMState, a: Assignment, event_ns: int = 0) -> PinResult:
        ops = self.router.ops_for(st.vm)
        held = st.blocked.get(a.tid)
        if held is not None:
            blocker = self._blocker(ops, a)
            if blocker is not None and blocker[0] == held[0]:
                # Nothing changed since it failed: the same answer, counted, not said again.
                r = held[1]
                self.stats.pins[r.outcome] += 1
                st.results[a.tid] = r
                st.failed[a.tid] = r
                return r
            del st.blocked[a.tid]
            log.info("VM %s tid %d (%s): its cpuset cgroup or its wanted CPUs changed; trying again",
                     st.vm.display_name, a.tid, a.label, extra=_fields(st.vm, st.policy.name if st.policy else None, a))
        r = pin_one(a, ops, self.dry_run)
        self.stats.pins[r.outcome] += 1
        self.changed = True
        vm, policy = st.vm, st.policy.name if st.policy else None
        if r.outcome is Outcome.PINNED:
            after = f" ({_since(event_ns) * 1e6:.0f} us after the event)" if event_ns else ""
            log.info("pinned VM %s tid %d (%s) to %s by %s%s%s", vm.display_name, a.tid, a.label, a.cpus, a.rule,
                     after, f" via {r.via}" if r.via and r.via != "sched_setaffinity" else "",
                     extra=_fields(vm, policy, a))
        elif r.outcome is Outcome.VANISHED:
            self.stats.vanished += 1
        elif not r.outcome.ok:
            blocker = self._blocker(ops, a) if r.outcome in (Outcome.OUTSIDE_CPUSET, Outcome.MISMATCH) \
                and not self.dry_run else None
            if blocker is not None:
                st.blocked[a.tid] = (blocker[0], r)
                # One warning per VM and cgroup (and its CPUs); the other threads at debug level.
                _say_once(st, 0, f"{r.outcome.value} {blocker[1]}", "cannot pin VM %s tid %d (%s) to %s: %s %s",
                          vm.display_name, a.tid, a.label, a.cpus, r.outcome, r.detail, extra=_fields(vm, policy, a))
            else:
                _say_once(st, a.tid, r.outcome.value, "cannot pin VM %s tid %d (%s) to %s: %s %s",
                          vm.display_name, a.tid, a.label, a.cpus, r.outcome, r.detail,
                          extra=_fields(vm, policy, a))
        st.results[a.tid] = r
        if r.outcome.ok:
            st.wanted[a.tid] = a
            st.failed.pop(a.tid, None)
            st.blocked.pop(a.tid, None)
            st.said = {s for s in st.said if s[0] != a.tid}  # a later failure is news again
        elif r.outcome is not Outcome.VANISHED:
            st.failed[a.tid] = r
        return r
