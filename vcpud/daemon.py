"""The long-running service: one selectors loop that owns all state, reacts to events and reloads."""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

from . import __version__
from .cpuset import CpuSet
from .discovery import VM, Role, classify_new_thread, scan, verify_executable
from .engine import load_priors, save_state
from .pinning import AffinityOps, OsAffinity, Outcome, PinResult, pin_one
from .placement import Assignment, PoolDecision, VMPlan, arrival_order, assign, decide_pools, plan_vm
from .config import Config, ConfigError, Policy, load_config
from .procfs import Procfs, Vanished
from .sdnotify import Notifier
from .snapshot import (DURATION_BUCKETS, LATENCY_BUCKETS, Histogram, PoolView, Snapshot, ThreadView,
                       VMView)
from .topology import read_topology

log = logging.getLogger(__name__)

# After a kvm "create" uevent (which comes before any vCPU thread exists) or a new VM
# found otherwise, look again at these delays until all its vCPUs are seen.
FOLLOWUP_DELAYS = (0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
# A thread that appeared (FORK) and was not named within this time is judged as it is.
UNNAMED_GRACE = 0.005
# Work done per loop turn before looking at the event sources again (udev storms).
TURN_BUDGET = 0.05


@dataclass
class VMState:
    """What the loop knows about one managed (or unmanaged) VM. Mutable: the loop owns it."""

    vm: VM
    policy: Policy | None
    wanted: dict[int, Assignment] = field(default_factory=dict)  # tid -> what we pinned it to
    failed: dict[int, PinResult] = field(default_factory=dict)
    first_seen: float = 0.0
    followup: int = 0  # index into FOLLOWUP_DELAYS
    decision: PoolDecision = field(default_factory=PoolDecision)
    plan: VMPlan | None = None

    @property
    def complete(self) -> bool:
        """All the guest's vCPUs (as -smp says) have been seen."""
        return len({t.vcpu for t in self.vm.threads if t.role is Role.VCPU}) >= self.vm.smp.cpus


@dataclass
class Stats:
    pins: dict[str, int] = field(default_factory=dict)  # outcome -> count
    drift_corrections: int = 0
    events: dict[str, int] = field(default_factory=dict)  # source -> count
    vanished: int = 0
    rescans: int = 0
    overruns: int = 0
    reloads_ok: int = 0
    reloads_failed: int = 0
    # seconds from the kernel's COMM/FORK event to the thread's affinity being set
    pin_latency: deque = field(default_factory=lambda: deque(maxlen=100_000))
    latency_hist: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    reconcile_hist: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    # CPU time of vCPU threads pinned to a single CPU, per CPU (seconds, only ever grows)
    vcpu_seconds: dict[int, float] = field(default_factory=dict)
    thread_ticks: dict[int, tuple[int, int]] = field(default_factory=dict)  # tid -> (cpu, utime+stime)
    last_reload_ok: bool = True
    last_reload_success: float = 0.0  # unix time

    def count_event(self, source: str, n: int = 1) -> None:
        self.events[source] = self.events.get(source, 0) + n


def _fields(vm: VM, policy: str | None, a: Assignment | None = None) -> dict[str, Any]:
    """Journal fields for a log record (logging's extra=)."""
    f: dict[str, Any] = {"VM": vm.display_name, "VM_PID": vm.pid, "POLICY": policy or ""}
    if a is not None:
        f.update(TID=a.tid, ROLE=a.label, CPUS=a.cpus.format())
    return f


class Daemon:
    def __init__(
        self,
        config_path: Path,
        sysroot: Path = Path("/"),
        proc: Path = Path("/proc"),
        ops: AffinityOps | None = None,
        notifier: Notifier | None = None,
        use_udev: bool = True,
        use_connector: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config_path = config_path
        self.sysroot = sysroot
        self.procfs = Procfs(proc)
        self.ops = ops or OsAffinity(proc)
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.use_udev = use_udev
        self.use_connector = use_connector
        self.config: Config = Config()
        self.config_time = ""
        self.reload_error = ""
        self.topology: Any = None
        self.online = CpuSet()
        self.vms: dict[int, VMState] = {}
        self.allocations: dict[Any, Any] = {}  # VM key -> pools.Allocation it holds
        self.not_vm: set[int] = set()  # tgids known not to be VMs (until they exec or exit)
        self.due: dict[int, float] = {}  # pid -> when to look at that process again
        self.unnamed: dict[int, tuple[int, float]] = {}  # tid -> (tgid, when) new threads awaiting a name
        self.stats = Stats()
        self.next_rescan = 0.0
        self.next_watchdog = 0.0
        self.stop_requested = False
        self.reload_requested = False
        self.topology_changed = False
        self.sel = selectors.DefaultSelector()
        self.connector: Any = None
        self.udev_monitor: Any = None
        self.udev_source = ""
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        # What readers (the metrics thread) see: replaced whole, never mutated.
        self.snapshot = Snapshot(version=__version__)
        self._dirty = True
        self._status_sent = ""
        self.metrics_listen: str | None = None  # overrides the config's metrics.listen
        self.metrics_server: Any = None
        self.metrics_address: tuple[str, int] | None = None

    # --- setup --------------------------------------------------------------------------
    def load(self) -> None:
        """First configuration load; raises ConfigError."""
        self.topology = read_topology(self.sysroot)
        self.online = self.topology.online
        self.config = load_config(self.config_path, online=self.online)
        self.config_time = datetime.now().strftime("%H:%M:%S")
        self.stats.last_reload_success = time.time()
        log.info("loaded %d policies from %s", len(self.config.policies), ", ".join(self.config.files))

    def open_sources(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "signal")
        if self.use_connector:
            self._open_connector()
        if self.use_udev:
            self._open_udev()

    def _open_connector(self) -> None:
        try:
            from .procconn import ProcConnector, ProcConnectorUnavailable
        except ImportError as e:  # pragma: no cover - module ships with vcpud
            log.warning("proc connector support missing: %s", e)
            return
        try:
            self.connector = ProcConnector(events={"fork", "exec", "comm", "exit"})
        except ProcConnectorUnavailable as e:
            log.warning("netlink proc connector unavailable (%s): new threads are found by rescans only", e)
            return
        self.sel.register(self.connector.fileno(), selectors.EVENT_READ, "proc_connector")
        log.info("listening to the netlink proc connector")

    def _open_udev(self) -> None:
        try:
            import pyudev
        except ImportError as e:
            log.warning("pyudev missing (%s): new VMs are found by rescans only", e)
            return
        # Without udevd nobody re-broadcasts uevents on the 'udev' group: listen to the kernel.
        self.udev_source = "udev" if Path("/run/udev/control").exists() else "kernel"
        try:
            ctx = pyudev.Context()
            mon = pyudev.Monitor.from_netlink(ctx, source=self.udev_source)
            mon.filter_by("misc")
            mon.filter_by("cpu")  # CPU hot(un)plug: pooled CPUs come and go
            mon.set_receive_buffer_size(4 * 1024 * 1024)
            mon.start()
        except (OSError, ValueError) as e:
            log.warning("cannot watch uevents (%s): new VMs are found by rescans only", e)
            return
        self.udev_monitor = mon
        self.sel.register(mon.fileno(), selectors.EVENT_READ, "udev")
        log.info("watching kvm uevents from %s", self.udev_source)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        if self.connector is not None:
            self.connector.close()
        self.sel.close()
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        self.open_sources()
        try:
            self.start_metrics()
            self.rescan("startup")
            self.publish()
            self.notifier.ready(self.status_line())
            log.info("ready: %s", self.status_line())
            now = self.clock()
            self.next_rescan = now + self.config.rescan_interval
            if self.notifier.watchdog_interval:
                self.next_watchdog = now
            while not self.stop_requested:
                self.turn()
            self.notifier.stopping()
            lat = sorted(self.stats.pin_latency)
            if lat:
                log.info("pin latency from event: n=%d p50=%.0fus p99=%.0fus max=%.0fus", len(lat),
                         lat[len(lat) // 2] * 1e6, lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6, lat[-1] * 1e6)
            log.info("stopping; pins are left in place")
            return 0
        finally:
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.close()

    def turn(self) -> None:
        """One loop iteration: wait for an event or the next timer, then do what is due."""
        now = self.clock()
        timers = [self.next_rescan]
        if self.due:
            timers.append(min(self.due.values()))
        if self.unnamed:
            timers.append(min(t for _, t in self.unnamed.values()))
        if self.notifier.watchdog_interval:
            timers.append(self.next_watchdog)
        timeout = max(0.0, min(timers) - now)
        for key, _ in self.sel.select(timeout):
            self.dispatch(key.data)
            if self.stop_requested:
                return
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        now = self.clock()
        if self.notifier.watchdog_interval and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.notifier.watchdog_interval
        if self.topology_changed:
            self.topology_changed = False
            self.refresh_topology()
        self.run_due(now)
        if now >= self.next_rescan:
            self.rescan("rescan")
            self.next_rescan = self.clock() + self.config.rescan_interval
        if self._dirty:
            self.publish()
            line = self.status_line()
            if line != self._status_sent:
                self.notifier.status(line)
                self._status_sent = line

    def dispatch(self, source: str) -> None:
        if source == "signal":
            try:
                while self._wake_r is not None and self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
            self.stats.count_event("signal")
        elif source == "proc_connector":
            self.on_connector()
        elif source == "udev":
            self.on_udev()

    # --- event sources ------------------------------------------------------------------
    def on_connector(self) -> None:
        from .procconn import Overrun

        try:
            events = self.connector.read()
        except Overrun as e:
            self.stats.overruns += 1
            log.warning("proc connector overrun: events lost, rescanning")
            self.next_rescan = self.clock()
            events = e.events
        self.stats.count_event("proc_connector", len(events))
        for ev in events:
            try:
                self.on_proc_event(ev)
            except Vanished:
                self.stats.vanished += 1

    def on_proc_event(self, ev: Any) -> None:
        what = ev.what
        if what == "comm":
            if ev.tgid in self.vms:
                self.unnamed.pop(ev.pid, None)
                self.pin_thread(self.vms[ev.tgid], ev.pid, ev.timestamp_ns)
            elif ev.tgid not in self.not_vm:
                self.consider(ev.tgid)
        elif what == "fork":
            if ev.tgid in self.vms and ev.pid != ev.tgid:
                # Named threads are pinned on their COMM event; give the rename a moment.
                self.unnamed[ev.pid] = (ev.tgid, self.clock() + UNNAMED_GRACE)
        elif what == "exec":
            self.not_vm.discard(ev.tgid)
            self.forget(ev.tgid)
            self.consider(ev.tgid)
        elif what == "exit":
            self.unnamed.pop(ev.pid, None)
            if ev.pid == ev.tgid:
                self.not_vm.discard(ev.tgid)
                st = self.vms.get(ev.tgid)
                if st is not None:
                    log.info("VM %s (pid %d) exited", st.vm.display_name, st.vm.pid, extra=_fields(st.vm, st.policy and st.policy.name))
                self.forget(ev.tgid)
            elif ev.tgid in self.vms:
                st = self.vms[ev.tgid]
                st.wanted.pop(ev.pid, None)
                st.failed.pop(ev.pid, None)

    def on_udev(self) -> None:
        while True:
            try:
                dev = self.udev_monitor.poll(timeout=0)
            except OSError as e:
                # ENOBUFS: the kernel dropped uevents; the rescan catches what they said.
                log.warning("uevent socket: %s; rescanning", e)
                self.next_rescan = self.clock()
                return
            if dev is None:
                return
            props = dev.properties
            if dev.subsystem == "cpu":
                if dev.action in ("online", "offline", "add", "remove"):
                    self.stats.count_event("udev")
                    self.topology_changed = True
                continue
            if dev.sys_name != "kvm" or props.get("EVENT") not in ("create", "destroy"):
                continue
            self.stats.count_event("udev")
            pid_s = props.get("PID", "")
            if not pid_s.isdigit():
                continue
            pid = int(pid_s)
            if props.get("EVENT") == "destroy":
                if pid in self.vms and not self.procfs.exists(pid):
                    self.forget(pid)
                continue
            try:
                # The uevent's PID is the thread that opened the VM; its process is the Tgid.
                tgid = self.procfs.tgid(pid)
            except (Vanished, KeyError, ValueError):
                self.stats.vanished += 1
                continue
            self.not_vm.discard(tgid)
            if tgid not in self.vms:
                self.due[tgid] = self.clock()

    # --- reconciling --------------------------------------------------------------------
    def consider(self, tgid: int) -> None:
        """A process we know nothing about showed up (exec, thread renamed): is it a VM?"""
        exe, why = verify_executable(self.procfs, tgid, self.config.executables)
        if why is None:
            self.reconcile_pids([tgid])
        else:
            self.not_vm.add(tgid)

    def run_due(self, now: float) -> None:
        deadline = self.clock() + TURN_BUDGET
        for tid, (tgid, when) in list(self.unnamed.items()):
            if when <= now:
                del self.unnamed[tid]
                st = self.vms.get(tgid)
                if st is not None:
                    try:
                        self.pin_thread(st, tid)
                    except Vanished:
                        self.stats.vanished += 1
        pids = sorted((t, p) for p, t in self.due.items() if t <= now)
        for _, pid in pids:
            del self.due[pid]
            self.reconcile_pids([pid])
            if self.clock() > deadline:
                break  # the rest stay due: events get a look in between

    def _online_now(self) -> CpuSet | None:
        try:
            return CpuSet.parse((self.sysroot / "sys/devices/system/cpu/online").read_text().strip())
        except (OSError, ValueError):
            return None

    def refresh_topology(self) -> None:
        """Re-read the topology; when the online CPUs changed, re-plan every VM."""
        try:
            topo = read_topology(self.sysroot)
        except OSError as e:
            log.warning("cannot re-read the CPU topology: %s", e)
            return
        if topo.online != self.online:
            log.warning("online CPUs changed from %s to %s: re-placing VMs", self.online, topo.online)
            self.topology = topo
            self.online = topo.online
            self.rescan("topology")

    def rescan(self, reason: str) -> None:
        """Full scan of /proc: new VMs, lost events, and drift."""
        if reason == "rescan" and self._online_now() not in (None, self.online):
            self.refresh_topology()  # a CPU came or went and no uevent told us
            return
        self.stats.rescans += 1
        t0 = time.perf_counter()
        log.debug("full scan (%s)", reason)
        if reason == "rescan":
            self.stats.count_event("rescan")
        # After a reload every VM is read afresh: its policy may now want other threads.
        known = {pid: st.vm for pid, st in self.vms.items()} if reason == "rescan" else None
        found = scan(self.procfs, self.config.executables, known=known)
        self.stats.vanished += found.vanished
        # Exits lost to a connector overrun would leave stale entries behind.
        self.not_vm &= set(self.procfs.pids())
        alive = {vm.pid for vm in found.vms}
        for pid in list(self.vms):
            if pid not in alive:
                self.forget(pid)
        if reason == "startup":
            self.allocations = load_priors(self.config, arrival_order(found.vms), self.online, self.topology)
        # At startup the file is rewritten whole: it may have been corrupt, or name dead VMs.
        policies, decisions = self.place(found.vms, save=reason == "startup" and bool(self.allocations))
        for vm in arrival_order(found.vms):
            self.apply_vm(vm, policies[vm.key], decisions.get(vm.key, PoolDecision()))
        self.sample_vcpu_time()
        self.stats.reconcile_hist.observe(time.perf_counter() - t0)
        self._dirty = True  # CPU times, counters and the reconcile histogram moved
        self.notifier.status(self.status_line())

    def reconcile_pids(self, pids: list[int]) -> None:
        t0 = time.perf_counter()
        found = scan(self.procfs, self.config.executables, pids)
        self.stats.vanished += found.vanished
        fresh = {vm.pid for vm in found.vms}
        for pid in pids:
            if pid not in fresh:
                self.forget(pid)
        others = [st.vm for pid, st in self.vms.items() if pid not in fresh]
        policies, decisions = self.place(others + list(found.vms))
        for vm in arrival_order(found.vms):
            self.apply_vm(vm, policies[vm.key], decisions.get(vm.key, PoolDecision()))
        self.stats.reconcile_hist.observe(time.perf_counter() - t0)
        self._dirty = True

    def place(self, vms: list[VM], save: bool = False) -> tuple[dict[Any, Policy | None], dict[Any, PoolDecision]]:
        """Each live VM's policy and pool CPUs (arrival order; VMs keep what they hold); saves changes."""
        order = arrival_order(vms)
        policies = {vm.key: self.config.select(vm) for vm in order}
        decisions = decide_pools(self.config, self.topology, order, [policies[vm.key] for vm in order],
                                 self.allocations)
        allocations = {k: d.allocation for k, d in decisions.items() if d.allocation is not None}
        if allocations != self.allocations or save:
            for k, a in allocations.items():
                if self.allocations.get(k) != a:
                    log.info("pid %d gets pool %s CPUs %s", k[0], a.pool, a.cpus)
            self.allocations = allocations
            save_state(self.config, [(vm, policies[vm.key].name, allocations[vm.key])  # type: ignore[union-attr]
                                     for vm in order if vm.key in allocations])
        return policies, decisions

    def forget(self, pid: int) -> None:
        """A VM is gone: drop its state and free its pool CPUs for VMs still waiting."""
        st = self.vms.pop(pid, None)
        self.due.pop(pid, None)
        if st is None:
            return
        if self.allocations.pop(st.vm.key, None) is not None:
            save_state(self.config, [(x.vm, x.policy.name, self.allocations[x.vm.key])  # type: ignore[union-attr]
                                     for x in self.vms.values() if x.vm.key in self.allocations])
            for other in self.vms.values():
                if other.plan is not None and other.plan.waiting:
                    self.due[other.vm.pid] = self.clock()

    def apply_vm(self, vm: VM, policy: Policy | None, decision: PoolDecision = PoolDecision()) -> None:
        prev = self.vms.get(vm.pid)
        if prev is not None and prev.vm.key != vm.key:
            prev = None  # the PID was reused by another process
        st = VMState(vm=vm, policy=policy, first_seen=prev.first_seen if prev else self.clock(),
                     followup=prev.followup if prev else 0, decision=decision)
        if prev is None:
            log.info("found VM %s (pid %d), policy %s", vm.display_name, vm.pid, policy.name if policy else "none",
                     extra=_fields(vm, policy and policy.name))
        vp = plan_vm(vm, policy, self.online, self.config, decision, self.isolated)
        st.plan = vp
        if vp.reason and (prev is None or prev.plan is None or prev.plan.status != vp.status):
            log.warning("VM %s %s: %s", vm.display_name, vp.status, vp.reason, extra=_fields(vm, vp.policy))
        for problem in vp.problems:
            log.warning("VM %s: %s", vm.display_name, problem, extra=_fields(vm, vp.policy))
        for a in vp.assignments:
            before = prev.wanted.get(a.tid) if prev else None
            r = self._pin(vm, vp.policy, a)
            if r.outcome is Outcome.PINNED and before is not None and before.cpus == a.cpus:
                self.stats.drift_corrections += 1
                log.warning("VM %s tid %d (%s) had been moved to %s; put back on %s", vm.display_name, a.tid,
                            a.label, r.before, a.cpus, extra=_fields(vm, vp.policy, a))
            self._record(st, a, r)
        self.vms[vm.pid] = st
        if policy is not None and not st.complete and st.followup < len(FOLLOWUP_DELAYS):
            self.due[vm.pid] = self.clock() + FOLLOWUP_DELAYS[st.followup]
            st.followup += 1

    @property
    def isolated(self) -> CpuSet:
        return self.topology.isolated if self.topology is not None else CpuSet()

    def pin_thread(self, st: VMState, tid: int, event_ns: int = 0) -> None:
        """Fast path: one new or renamed thread of a known VM."""
        snap = self.procfs.thread(st.vm.pid, tid)
        t = classify_new_thread(st.vm, snap)
        if t is None:
            self.due[st.vm.pid] = min(self.due.get(st.vm.pid, float("inf")), self.clock())
            return
        threads = tuple(x for x in st.vm.threads if x.tid != tid) + (t,)
        st.vm = replace(st.vm, threads=threads)
        if st.policy is None:
            return
        a_ = st.decision.allocation
        if t.role is Role.VCPU and st.policy.vcpus_rule is not None and a_ is not None and t.vcpu is not None \
                and t.vcpu >= len(a_.vcpus):
            # A vCPU hot-plugged beyond what the VM holds: it needs a bigger allocation.
            self.due[st.vm.pid] = self.clock()
            return
        r = assign(t, st.vm, st.policy, self.config, st.decision, self.isolated)
        if r is None:
            st.wanted.pop(tid, None)
            return
        rule, cpus = r
        usable = cpus & self.online
        if not usable:
            return
        a = Assignment(pid=st.vm.pid, tid=tid, label=t.label, role=t.role, cpus=usable, rule=rule)
        r = self._pin(st.vm, st.policy.name, a)
        if event_ns and r.outcome is Outcome.PINNED:
            # the connector's timestamp is ktime_get_ns(): CLOCK_MONOTONIC
            lat = (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - event_ns) / 1e9
            self.stats.pin_latency.append(lat)
            self.stats.latency_hist.observe(lat)
        self._record(st, a, r)

    def _pin(self, vm: VM, policy: str | None, a: Assignment) -> PinResult:
        r = pin_one(a, self.ops)
        self._dirty = True
        self.stats.pins[r.outcome.value] = self.stats.pins.get(r.outcome.value, 0) + 1
        if r.outcome is Outcome.PINNED:
            log.info("pinned VM %s tid %d (%s) to %s by %s", vm.display_name, a.tid, a.label, a.cpus, a.rule,
                     extra=_fields(vm, policy, a))
        elif r.outcome is Outcome.VANISHED:
            self.stats.vanished += 1
        elif not r.outcome.ok:
            log.warning("cannot pin VM %s tid %d (%s) to %s: %s %s", vm.display_name, a.tid, a.label, a.cpus,
                        r.outcome, r.detail, extra=_fields(vm, policy, a))
        return r

    @staticmethod
    def _record(st: VMState, a: Assignment, r: PinResult) -> None:
        if r.outcome.ok:
            st.wanted[a.tid] = a
            st.failed.pop(a.tid, None)
        elif r.outcome is not Outcome.VANISHED:
            st.failed[a.tid] = r

    # --- reload -------------------------------------------------------------------------
    def reload(self) -> None:
        self.notifier.reloading()
        log.info("reloading %s", self.config_path)
        try:
            topo = read_topology(self.sysroot)
            online = topo.online
            new = load_config(self.config_path, online=online)
        except ConfigError as e:
            self.stats.reloads_failed += 1
            self.stats.last_reload_ok = False
            self._dirty = True
            for issue in e.issues:
                log.error("reload: %s", issue)
            self.reload_error = f"reload failed at {datetime.now():%H:%M:%S} ({len(e.issues)} errors, see log)"
            log.error("reload failed, keeping the running policy from %s", self.config_time)
            self.notifier.ready(self.status_line())
            return
        except OSError as e:
            self.stats.reloads_failed += 1
            self.stats.last_reload_ok = False
            self._dirty = True
            self.reload_error = f"reload failed at {datetime.now():%H:%M:%S}: {e}"
            log.error("reload failed (%s), keeping the running policy", e)
            self.notifier.ready(self.status_line())
            return
        if new.metrics_listen != self.config.metrics_listen and self.metrics_listen is None:
            log.warning("metrics.listen changed to %s: takes effect when vcpud restarts", new.metrics_listen)
        self.stats.reloads_ok += 1
        self.stats.last_reload_ok = True
        self.stats.last_reload_success = time.time()
        self.topology = topo
        self.online = online
        old_pins = {(pid, tid): a.cpus for pid, st in self.vms.items() for tid, a in st.wanted.items()}
        self.config = new
        self.config_time = datetime.now().strftime("%H:%M:%S")
        self.reload_error = ""
        self.not_vm.clear()  # the executables may have changed
        changed_before = self.stats.pins.get(Outcome.PINNED.value, 0)
        self.rescan("reload")
        changed = self.stats.pins.get(Outcome.PINNED.value, 0) - changed_before
        moved = {pid for pid, st in self.vms.items()
                 for tid, a in st.wanted.items() if old_pins.get((pid, tid)) not in (None, a.cpus)}
        log.info("reloaded: %d policies; %d VMs re-pinned, %d threads changed", len(new.policies), len(moved), changed)
        self.next_rescan = self.clock() + self.config.rescan_interval
        self.notifier.ready(self.status_line())

    # --- metrics ------------------------------------------------------------------------
    def start_metrics(self) -> None:
        listen = self.metrics_listen or getattr(self.config, "metrics_listen", "off")
        if listen == "off":
            return
        from .metrics import MetricsServer

        server = MetricsServer(lambda: self.snapshot)
        try:
            self.metrics_address = server.start(listen)
        except OSError as e:
            log.error("cannot serve metrics on %s: %s", listen, e)
            return
        self.metrics_server = server
        # A scrape renders in the server thread holding the GIL; when an event wakes the loop
        # it waits for the GIL up to the switch interval (5 ms by default). 0.5 ms keeps a
        # scrape from delaying a pin beyond the 1 ms target (tests/benchmarks/bench_metrics.py).
        sys.setswitchinterval(0.0005)
        log.info("serving metrics on http://%s:%d/metrics", *self.metrics_address)

    def sample_vcpu_time(self) -> None:
        """Add the CPU time vCPUs pinned to one CPU spent since the last look to that CPU."""
        tick = os.sysconf("SC_CLK_TCK")
        seen: dict[int, tuple[int, int]] = {}
        for st in self.vms.values():
            for tid, a in st.wanted.items():
                if a.role is not Role.VCPU or len(a.cpus) != 1:
                    continue
                try:
                    stat = self.procfs.stat(st.vm.pid, tid)
                except (Vanished, OSError):
                    continue
                cpu, ticks = a.cpus.first(), stat.utime + stat.stime
                prev = self.stats.thread_ticks.get(tid)
                # Time from before it was pinned there (or from a recycled TID) is nobody's.
                if prev is not None and prev[0] == cpu and ticks >= prev[1]:
                    self.stats.vcpu_seconds[cpu] = self.stats.vcpu_seconds.get(cpu, 0.0) + (ticks - prev[1]) / tick
                seen[tid] = (cpu, ticks)
        self.stats.thread_ticks = seen

    def publish(self) -> None:
        """Replace the snapshot readers see (one reference swap: readers never see half of it)."""
        vms = []
        for st in self.vms.values():
            policy = st.policy.name if st.policy else ""
            threads = []
            for t in st.vm.threads:
                a = st.wanted.get(t.tid)
                state = "pinned" if a is not None else "failed" if t.tid in st.failed else "unpinned"
                threads.append(ThreadView(role=t.role.value, cpus=a.cpus if a else t.affinity, state=state,
                                          vcpu=t.vcpu))
            status = "unmanaged" if not policy else "failed" if st.failed else st.plan.status if st.plan else "pinned"
            vms.append(VMView(name=st.vm.display_name, uuid=st.vm.uuid or "", policy=policy, status=status,
                              threads=tuple(threads)))
        pools = tuple(PoolView(name=p.name, cpus=p.cpus & self.online, allocated=self.pool_allocated(p.name),
                               exclusive=p.exclusive, waiting=self.pool_waiting(p.name))
                      for p in getattr(self.config, "pools", {}).values())
        s = self.stats
        self.snapshot = Snapshot(
            version=__version__, taken_at=time.time(), online=self.online, vms=tuple(vms), pools=pools,
            vcpu_seconds=MappingProxyType(dict(s.vcpu_seconds)), pin_operations=MappingProxyType(dict(s.pins)),
            drift_corrections=s.drift_corrections, events=MappingProxyType(dict(s.events)),
            pin_latency=s.latency_hist.view(), reconcile_duration=s.reconcile_hist.view(),
            config_last_reload_successful=s.last_reload_ok,
            config_last_reload_success_timestamp=s.last_reload_success,
        )
        self._dirty = False
        if self.metrics_server is not None:
            self.metrics_server.published()

    def pool_allocated(self, pool: str) -> CpuSet:
        held = CpuSet()
        for a in self.allocations.values():
            if a.pool == pool:
                held |= a.cpus
        return held

    def pool_waiting(self, pool: str) -> int:
        return sum(1 for st in self.vms.values()
                   if st.plan is not None and st.plan.waiting
                   and st.policy is not None and st.policy.vcpus_rule is not None
                   and st.policy.vcpus_rule.pool == pool)

    # --- reporting ----------------------------------------------------------------------
    def status_line(self) -> str:
        managed = [st for st in self.vms.values() if st.policy is not None]
        pinned = sum(len(st.wanted) for st in managed)
        failed = sum(len(st.failed) for st in managed)
        line = f"{len(managed)} VMs, {pinned} threads pinned, {failed} failed, policy from {self.config_time}"
        waiting = sum(1 for st in managed if st.plan is not None and st.plan.waiting)
        if waiting:
            line = f"{line}; {waiting} VMs waiting for pool CPUs"
        if self.reload_error:
            line = f"{self.reload_error}; {line}"
        return line
