"""The reconciler: owns what vcpud knows about VMs and turns what happens on the host into pins.

`vcpud apply` is one `rescan()`; `vcpud run` feeds it events (exec, fork, comm, exit, kvm
uevents, rescans, reloads) from its selectors loop. Everything that touches the OS is handed
in: the /proc reader, the affinity actuator, the state store and a clock.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Hashable, Iterable

from .activity import Stats
from .cpuset import CpuSet
from .discovery import VM, ExeCheck, Scan, Thread, classify_new_thread, named_thread, scan, verify_executable
from .holdings import Ledger, StateStore
from .pinner import Pinner
from .pinning import AffinityOps, Direct, Outcome, PinResult, Router
from .recheck import Coverage, Recheck, recheck_all
from .vmstate import VMState, same_rules, say_exit, say_plan
from .placement import PoolDecision, arrival_order, plan_vm
from .pools import Allocation
from .procfs import Procfs, Vanished

if TYPE_CHECKING:
    from .config import Config
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


@dataclass(frozen=True, slots=True)
class RescanResult:
    scan: Scan
    pins: tuple[PinResult, ...]


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
        self.ledger = Ledger(store, dry_run)
        self.clock = clock
        self.stats = stats if stats is not None else Stats()
        self.pinner = Pinner(router if router is not None else Direct(actuator), self.stats, dry_run)
        self.exe_check = exe_check  # None: the live host's files
        self.vms: dict[int, VMState] = {}
        self.not_vm: set[int] = set()  # tgids known not to be VMs (until they exec or exit)
        self.due: dict[int, float] = {}  # pid -> when to look at that process again
        # tid -> (tgid, when, the FORK's timestamp): new threads awaiting a name
        self.unnamed: dict[int, tuple[int, float, int]] = {}
        # -daemonize qemus with no guest yet -> follow-ups done: not VMs, looked at until they are
        self.starting: dict[int, int] = {}
        self.rescan_wanted = False  # events were lost: the caller should rescan soon
        # The caller hears every FORK/COMM/EXIT of known VMs (the proc connector): rescans then
        # re-check known VMs by task list and affinities only, until events are lost.
        self.trust_events = self.events_lost = False
        # the next rescan reads every process whole (executables changed); re-plans every VM
        self._reread = self._inputs_changed = False
        self.changed = True  # what readers see moved since the caller last published
        self.coverage = Coverage()  # the VMs whose task lists rescans need not read

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

    def on_fork(self, pid: int, tgid: int, event_ns: int = 0) -> None:
        if tgid in self.vms and pid != tgid:
            # Named threads are pinned on their COMM event; give the rename a moment.
            self.unnamed[pid] = (tgid, self.clock() + UNNAMED_GRACE, event_ns)

    def on_comm(self, pid: int, tgid: int, event_ns: int = 0, comm: str | None = None) -> None:
        st = self.vms.get(tgid)
        if st is not None:
            self.unnamed.pop(pid, None)
            self._pin_thread(st, pid, event_ns, comm)
        elif tgid not in self.not_vm:
            self._consider(tgid)

    def on_exit(self, pid: int, tgid: int) -> None:
        self.unnamed.pop(pid, None)
        if pid == tgid:
            self.not_vm.discard(tgid)
            self.starting.pop(tgid, None)
            if tgid in self.vms:
                say_exit(self.vms[tgid])
            self.forget(tgid)
        elif tgid in self.vms:
            self.vms[tgid].forget_thread(pid)
            self.changed = True

    def on_kvm_uevent(self, event: str, pid: int) -> None:
        """misc/kvm `change` with EVENT=create|destroy; PID is the thread that opened /dev/kvm."""
        if event == "destroy" and pid in self.vms and not self.procfs.exists(pid):
            self.forget(pid)
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
        self.events_lost = True  # renames may have been missed: the rescan re-reads names too

    def watched(self) -> frozenset[int]:
        """The processes whose fork, comm and exit events matter (procfilter): the VMs, the
        -daemonize qemus awaiting their guest, and those due a look (a kvm uevent's, a follow-up's)."""
        return self.coverage.watch(self.vms.keys() | self.starting.keys() | self.due.keys())

    # --- timers ---------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When run_due() has work next (follow-ups, threads awaiting a name), if ever."""
        times = list(self.due.values()) + [t for _, t, _ in self.unnamed.values()]
        return min(times) if times else None

    def run_due(self, now: float | None = None, budget: float = TURN_BUDGET) -> None:
        now = self.clock() if now is None else now
        deadline = self.clock() + budget
        for tid, (tgid, when, event_ns) in list(self.unnamed.items()):
            if when <= now:
                del self.unnamed[tid]
                st = self.vms.get(tgid)
                if st is not None:
                    self._pin_thread(st, tid, event_ns)  # its latency counts from the FORK
        for _, pid in sorted((t, p) for p, t in self.due.items() if t <= now):
            del self.due[pid]
            self.look_at([pid])
            if self.clock() > deadline:
                break  # the rest stay due: events get a look in between

    # --- whole passes ---------------------------------------------------------------------
    def rescan(self, reason: ScanReason = ScanReason.PERIODIC, pids: Iterable[int] | None = None) -> RescanResult:
        """Scan /proc (or only ``pids``): new VMs, lost events, and drift; pin what is off.

        Known VMs get a second look (:mod:`vcpud.recheck`: task list and affinities) unless this
        is the first look, ``pids`` are named or the executables changed; only new processes and
        VMs that look different are read whole."""
        log.debug("full scan (%s)", reason.value)
        t0, self.rescan_wanted = time.perf_counter(), False
        self.stats.rescans += 1
        careful, self.events_lost = self.events_lost or not self.trust_events, False
        kept: dict[int, Recheck] = {}
        todo: list[int] | None = None if pids is None else list(pids)
        if todo is None and reason is not ScanReason.STARTUP and not self._reread:
            kept = recheck_all(self.procfs, self.vms, careful, self.stats, self.coverage)
            listed = self.procfs.pids()
            self.not_vm &= set(listed)  # exits lost to a connector overrun leave stale entries
            # Without trusted events a PID known not to be a VM may have been reused unseen.
            skip = self.not_vm if not careful else set()
            todo = [p for p in listed if p not in kept and p not in skip]
        found, pins = self._pass(todo, kept, reason, whole=pids is None, t0=t0)
        log.debug("%s: %d VMs re-checked%s, %d read whole", reason.value, len(kept), " (careful)" * careful,
                  len(found.vms))
        self._reread = self._inputs_changed = False
        return RescanResult(scan=found, pins=tuple(pins))

    def look_at(self, pids: list[int]) -> None:
        """Read these processes afresh (a VM that is starting, one that must be re-placed)."""
        self._pass(pids, {}, None, whole=False)

    def _pass(self, todo: list[int] | None, kept: dict[int, Recheck], reason: ScanReason | None,
              whole: bool, t0: float | None = None) -> tuple[Scan, list[PinResult]]:
        """Read ``todo`` (None: all of /proc) whole, settle the ``kept`` VMs, place and pin. ``whole``:
        every process was looked at (VMs neither read nor kept are gone); ``t0``: the reconcile's start."""
        t0 = time.perf_counter() if t0 is None else t0
        found = scan(self.procfs, self.config.executables, todo, exe_check=self.exe_check)
        self.stats.vanished += found.vanished
        self.not_vm |= set(found.not_vms)
        read = {vm.pid for vm in found.vms}
        alive = read | set(kept)
        for pid in list(self.vms) if whole else list(todo or ()):
            if pid not in alive:
                self.forget(pid)
        if whole:
            self.starting = {p: n for p, n in self.starting.items() if p in found.starting}
        self._await_guest(found.starting)
        if reason is ScanReason.STARTUP:
            self.ledger.start(self.config, arrival_order(found.vms), self.online, self.topology)
        others = [st.vm for pid, st in self.vms.items() if pid not in read]
        # At startup the store is rewritten whole: it may have been corrupt, or name dead VMs.
        decisions = self.ledger.place(self.config, self.topology, others + list(found.vms),
                                      save=reason is ScanReason.STARTUP and bool(self.allocations))
        pins: list[PinResult] = []
        for vm in arrival_order(found.vms):
            pins += self._apply_vm(vm, decisions.get(vm.key, PoolDecision()), listed=True)
        replan = reason in (ScanReason.RELOAD, ScanReason.TOPOLOGY)
        for pid, r in kept.items():
            pins += self._settle(self.vms[pid], r, decisions.get(r.vm.key, PoolDecision()), replan)
        self._follow_decisions(decisions, alive)
        self.stats.reconcile_hist.observe(time.perf_counter() - t0)
        self.changed = True  # counters and the reconcile histogram moved
        return found, pins

    def _settle(self, st: VMState, r: Recheck, decision: PoolDecision, replan: bool) -> list[PinResult]:
        """Bring a re-checked VM in line: re-plan it if its policy, pool CPUs or inputs changed;
        otherwise place its new threads, put back what was moved and retry what failed."""
        for tid in r.gone:
            st.forget_thread(tid)
        if r.vm is not st.vm:
            st.vm, st.dirty = r.vm, True
        policy = self.config.select(st.vm) if replan else st.policy
        if decision != st.decision or not same_rules(policy, st.policy) or (replan and self._inputs_changed):
            return self._apply_vm(st.vm, decision, r.listed)
        for t in r.new:
            self._place_thread(st, t)
        return self.pinner.put_back(st, r.drifted, listed=r.listed)

    def _await_guest(self, pids: Iterable[int]) -> None:
        """Look again at -daemonize processes with no guest yet (found by their kvm uevent or a
        vCPU's COMM: this covers KVM_CREATE_VM's uevent before its fd, and lost events)."""
        for pid in pids:
            n = self.starting.get(pid, 0)
            if n < len(FOLLOWUP_DELAYS):
                self.due[pid] = min(self.due.get(pid, float("inf")), self.clock() + FOLLOWUP_DELAYS[n])
            self.starting[pid] = n + 1

    def _follow_decisions(self, decisions: dict[Hashable, PoolDecision], done: set[int]) -> None:
        """Re-pin the VMs not just read whose pool decision changed (what others hold moved)."""
        for pid, st in list(self.vms.items()):
            new = decisions.get(st.vm.key)
            if pid not in done and new is not None and new != st.decision:
                self._apply_vm(st.vm, new)

    def reload(self, config: "Config", online: CpuSet, topology: "Topology | None") -> tuple[int, int]:
        """Take a new (valid) policy and re-pin by it: (VMs re-pinned, threads changed). Only VMs
        whose policy, pool CPUs or plan inputs changed are planned again; all are re-checked."""
        old_pins = {(pid, tid): a.cpus for pid, st in self.vms.items() for tid, a in st.wanted.items()}
        old = self.config
        self._reread = config.executables != old.executables
        self._inputs_changed = (config.pools, online, topology and topology.isolated) != \
            (old.pools, self.online, self.topology and self.topology.isolated)
        self.config, self.online, self.topology = config, online, topology
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
        self._inputs_changed = True
        self.online = online
        self.topology = topology
        self.rescan(ScanReason.TOPOLOGY)
        return True

    def forget(self, pid: int) -> None:
        """A VM is gone: drop its state and free its pool CPUs for VMs still waiting."""
        st = self.vms.pop(pid, None)
        self.due.pop(pid, None)
        self.coverage.forget(pid)
        if st is None:
            return
        self.changed = True
        if self.ledger.release(st.vm, [(x.vm, x.policy.name) for x in self.vms.values() if x.policy is not None]):
            self.due.update({other.vm.pid: self.clock() for other in self.vms.values() if other.waiting})

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

    def _apply_vm(self, vm: VM, decision: PoolDecision, listed: bool = False) -> list[PinResult]:
        prev = self.vms.get(vm.pid)
        if prev is not None and prev.vm.key != vm.key:
            prev = None  # the PID was reused by another process
        policy = self.config.select(vm)
        st = VMState.after(prev, vm, policy, decision, self.clock())
        self.starting.pop(vm.pid, None)  # it shows a guest now
        st.plan = plan_vm(vm, policy, self.online, self.config, decision, self.isolated)
        say_plan(st, prev)
        results = self.pinner.pin_plan(st, prev, listed)
        self.vms[vm.pid] = st
        self.changed = True
        if policy is not None and not st.complete and st.followup < len(FOLLOWUP_DELAYS):
            self.due[vm.pid] = self.clock() + FOLLOWUP_DELAYS[st.followup]
            st.followup += 1
        return results

    def _pin_thread(self, st: VMState, tid: int, event_ns: int = 0, comm: str | None = None) -> None:
        """Fast path: one new or renamed thread of a known VM (``comm``: the name its COMM event gave)."""
        try:
            t = named_thread(self.procfs, st.vm.pid, tid, comm) or \
                classify_new_thread(st.vm, self.procfs.thread(st.vm.pid, tid))
        except Vanished:
            self.stats.vanished += 1
            log.debug("VM %s tid %d exited before it could be read", st.vm.display_name, tid)
            return
        if t is None:
            self.due[st.vm.pid] = min(self.due.get(st.vm.pid, float("inf")), self.clock())
            return
        others = (x for x in st.vm.threads if x.tid != tid)  # sorted by TID, as a whole read gives them
        st.vm = replace(st.vm, threads=tuple(sorted((*others, t), key=lambda x: x.tid)))
        self._place_thread(st, t, event_ns)

    def _place_thread(self, st: VMState, t: Thread, event_ns: int = 0) -> None:
        """Pin one thread of a known VM (already in its model) by the VM's plan."""
        self.changed = True
        if not self.pinner.place(st, t, self.config, self.online, self.isolated, event_ns):
            self.due[st.vm.pid] = self.clock()  # a vCPU past the VM's pool CPUs: re-plan it
