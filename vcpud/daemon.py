"""`vcpud run`: a selectors loop feeding the reconciler (event sources, timers, signals, watchdog).

The loop owns no VM state: the Reconciler does. After each turn that changed something the
loop publishes a fresh Snapshot (what the metrics server reads) and the systemd status line.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import bounded
from .activity import Stats, VcpuClock
from .cpuset import CpuSet
from .discovery import ExeCheck
from .config import Config, load_config
from .holdings import FileStore
from .owners import Owners
from .pinning import AffinityOps, OsAffinity
from .procfs import Procfs
from .publisher import ConfigInfo, snapshot, status_line
from .reconciler import Reconciler, ScanReason
from .reloader import BackgroundLoader, Failed, Loaded
from .sdnotify import Notifier
from .snapshot import Snapshot
from .sources import Sources
from .topology import Topology, read_topology
from .vocab import EventSource

if TYPE_CHECKING:
    from .libvirt import LibvirtOwner

log = logging.getLogger(__name__)

# A snapshot for the metrics costs ~0.3 ms with 100 VMs here: a burst of events (a VM starting,
# IO threads added) publishes one at most this often instead of one per event.
PUBLISH_INTERVAL = 0.02


def online_now(sysroot: Path) -> CpuSet | None:
    """The kernel's online CPU list, or None when it cannot be read."""
    try:
        text = bounded.read_text(sysroot / "sys/devices/system/cpu/online", bounded.SYSFS_LIMIT)
        return CpuSet.parse(text.strip())
    except (OSError, ValueError):  # UnicodeDecodeError and CpuSetError are ValueErrors
        return None


def reread_topology(sysroot: Path) -> Topology | None:
    try:
        return read_topology(sysroot)
    except OSError as e:
        log.warning("cannot re-read the CPU topology: %s", e)
        return None


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
        exe_check: ExeCheck | None = None,
        use_libvirt: bool = True,
    ) -> None:
        self.config_path = config_path
        self.sysroot = sysroot
        self.procfs = Procfs(proc)
        self.proc = proc
        self.ops = ops or OsAffinity(proc)
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.exe_check = exe_check  # None: the live host's files
        self.stats = Stats()
        self.rec: Reconciler | None = None
        self.info = ConfigInfo()
        self.metrics_listen: str | None = None  # overrides the config's metrics.listen
        self.metrics_server: Any = None
        self.metrics_address: tuple[str, int] | None = None
        # What readers (the metrics thread) see: replaced whole, never mutated.
        self.snapshot = Snapshot(version="")
        self.next_rescan = 0.0
        self.next_watchdog = 0.0
        self.next_publish = 0.0  # during a burst of events, a snapshot at most every PUBLISH_INTERVAL
        self.stop_requested = False
        self.reload_requested = False
        self.reload_again = False
        self.topology_changed = False
        self.sources = Sources(use_connector, use_udev)
        self.loader = BackgroundLoader(config_path, sysroot, self.sources.wake)
        self._status_sent = ""
        self.owners = Owners(proc, self.ops, use_libvirt)

    @property
    def reconciler(self) -> Reconciler:
        if self.rec is None:
            raise RuntimeError("load() first")
        return self.rec

    # --- setup --------------------------------------------------------------------------
    def load(self) -> None:
        """First configuration load; raises ConfigError (or OSError for the topology)."""
        topology = read_topology(self.sysroot)
        config = load_config(self.config_path, online=topology.online)
        self.owners.adopt()
        self.rec = Reconciler(config, topology.online, self.procfs, self.ops, FileStore(config.state_file),
                              topology=topology, clock=self.clock, stats=self.stats, exe_check=self.exe_check,
                              router=self.owners.router())
        self.info = ConfigInfo(loaded_at=datetime.now().strftime("%H:%M:%S"))
        self.stats.last_reload_success = time.time()
        log.info("loaded %d policies from %s", len(config.policies), ", ".join(config.files))

    @property
    def libvirt(self) -> "LibvirtOwner | None":
        return self.owners.libvirt

    def adopt_libvirt(self) -> None:
        """libvirtd listens since the last look: pin libvirt's VMs through it from now on."""
        if self.owners.adopt() and self.rec is not None and self.libvirt is not None:
            self.libvirt.attach(self.sources.sel)  # the loop runs: its sources are open
            self.rec.pinner.router = self.owners.router()
            self.rec.rescan_wanted = True  # libvirt's VMs pinned so far went around it

    def open_sources(self) -> None:
        self.sources.open(self._on_stop, self._on_hup)
        if self.libvirt is not None:
            self.libvirt.attach(self.sources.sel)

    def close(self) -> None:
        if self.libvirt is not None:
            self.libvirt.close()
        self.sources.close()
        self.notifier.close()

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        rec = self.reconciler
        # A scrape (metrics thread) or a reload (loader thread) holds the GIL while it works; an
        # event that wakes the loop waits for it up to the switch interval (5 ms by default).
        # 0.5 ms keeps either from delaying a pin beyond the 1 ms target
        # (tests/benchmarks/bench_metrics.py).
        sys.setswitchinterval(0.0005)
        self.open_sources()
        # With the connector every FORK/COMM/EXIT of a known VM reaches the reconciler: its
        # rescans re-check known VMs by task list and affinities (vcpud.recheck).
        rec.trust_events = self.sources.connector is not None
        try:
            self.start_metrics()
            rec.rescan(ScanReason.STARTUP)
            self.publish()
            self.notifier.ready(self.status_line())
            log.info("ready: %s", self.status_line())
            now = self.clock()
            self.next_rescan = now + rec.config.rescan_interval
            if self.notifier.watchdog_interval:
                self.next_watchdog = now
            while not self.stop_requested:
                self.turn()
            self.notifier.stopping()
            log.info("stopping; pins are left in place")
            return 0
        finally:
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.close()

    def turn(self) -> None:
        """One loop iteration: wait for an event or the next timer, then do what is due."""
        rec = self.reconciler
        self.sources.watch(rec.watched())  # before sleeping: the kernel drops what no VM needs
        due = (rec.next_deadline(), self.libvirt.next_deadline() if self.libvirt is not None else None,
               self.next_watchdog if self.notifier.watchdog_interval else None,
               self.next_publish if rec.changed else None)
        timers = [self.next_rescan, *(t for t in due if t is not None)]
        for source in self.sources.ready(max(0.0, min(timers) - self.clock())):
            self.dispatch(source)
            if self.stop_requested:
                return
        if self.libvirt is not None:
            self.on_libvirt()
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        result = self.loader.result()
        if result is not None:
            self.finish_reload(result)
            if self.reload_again:
                self.reload_again = False
                self.reload()
        now = self.clock()
        if self.notifier.watchdog_interval and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.notifier.watchdog_interval
        if self.topology_changed:
            self.topology_changed = False
            self.refresh_topology()
        rec.run_due(now)
        if now >= self.next_rescan or rec.rescan_wanted:
            self.periodic_rescan()
            self.next_rescan = self.clock() + rec.config.rescan_interval
        if rec.changed and now >= self.next_publish:
            self.publish()

    def dispatch(self, source: EventSource | Callable[[], None]) -> None:
        if source is EventSource.SIGNAL:
            self.sources.drain_signals()
            self.stats.count_event(EventSource.SIGNAL)
        elif source is EventSource.PROC_CONNECTOR:
            self.on_connector()
        elif source is EventSource.UDEV:
            self.on_udev()
        elif not isinstance(source, EventSource):
            source()  # libvirt's own fds: its callbacks queue what the reconciler should see

    # --- event sources ------------------------------------------------------------------
    def on_connector(self) -> None:
        from .procconn import Overrun

        rec = self.reconciler
        try:
            events = self.sources.connector.read()
        except Overrun as e:
            self.stats.overruns += 1
            log.warning("proc connector overrun: events lost, rescanning")
            rec.on_events_lost()
            events = e.events
        self.stats.count_event(EventSource.PROC_CONNECTOR, len(events))
        for ev in events:
            if ev.what == "comm":
                rec.on_comm(ev.pid, ev.tgid, ev.timestamp_ns, ev.comm)
            elif ev.what == "fork":
                rec.on_fork(ev.pid, ev.tgid, ev.timestamp_ns)
            elif ev.what == "exec":
                rec.on_exec(ev.tgid)
            elif ev.what == "exit":
                rec.on_exit(ev.pid, ev.tgid)

    def on_udev(self) -> None:
        rec = self.reconciler
        for ev in self.sources.uevents():
            if ev.kind == "lost":
                rec.on_events_lost()  # the rescan catches what the lost uevents said
                continue
            self.stats.count_event(EventSource.UDEV)
            if ev.kind == "cpu":
                self.topology_changed = True
            elif ev.pid:
                rec.on_kvm_uevent(ev.event, ev.pid)

    def on_libvirt(self) -> None:
        """Run libvirt's due timers (its events are dispatched from them), reconnect when due,
        then look again at the VMs libvirt reported started, resumed or re-tuned."""
        assert self.libvirt is not None
        self.libvirt.run_due()
        pids, rescan = self.libvirt.take()
        if rescan:
            self.reconciler.rescan_wanted = True  # libvirtd restarted: what did we miss?
        if pids:
            self.reconciler.look_at(pids)

    # --- topology and rescans -----------------------------------------------------------
    def refresh_topology(self) -> bool:
        """Re-read the topology; when the online CPUs changed, the reconciler re-places every VM."""
        topo = reread_topology(self.sysroot)
        return topo is not None and self.reconciler.set_topology(topo.online, topo)

    def periodic_rescan(self) -> None:
        online = online_now(self.sysroot)
        if online not in (None, self.reconciler.online) and self.refresh_topology():
            return  # a CPU came or went and no uevent told us: that was a full rescan
        self.stats.count_event(EventSource.RESCAN)
        self.adopt_libvirt()
        self.reconciler.rescan(ScanReason.PERIODIC)
        self.notifier.status(self.status_line())

    # --- reload -------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: read the configuration in the background; a second SIGHUP meanwhile reads again after."""
        if self.loader.busy:
            self.reload_again = True
            return
        self.notifier.reloading()
        log.info("reloading %s", self.config_path)
        self.loader.start()

    def finish_reload(self, result: Loaded | Failed) -> None:
        rec = self.reconciler
        if isinstance(result, Failed):
            self.stats.reloads_failed += 1
            self.stats.last_reload_ok = False
            rec.changed = True
            for issue in result.issues:
                log.error("reload: %s", issue)
            why = f" ({result.why})" if result.issues else f": {result.why}"
            self.info = ConfigInfo(self.info.loaded_at, f"reload failed at {datetime.now():%H:%M:%S}{why}")
            log.error("reload failed, keeping the running policy from %s", self.info.loaded_at)
            self.notifier.ready(self.status_line())
            return
        new, topo = result.config, result.topology
        if new.metrics_listen != rec.config.metrics_listen and self.metrics_listen is None:
            log.warning("metrics.listen changed to %s: takes effect when vcpud restarts", new.metrics_listen)
        self.stats.reloads_ok += 1
        self.stats.last_reload_ok = True
        self.stats.last_reload_success = time.time()
        self.info = ConfigInfo(loaded_at=datetime.now().strftime("%H:%M:%S"))
        rec.ledger.store = FileStore(new.state_file)
        moved, changed = rec.reload(new, topo.online, topo)
        log.info("reloaded: %d policies; %d VMs re-pinned, %d threads changed", len(new.policies), moved, changed)
        self.next_rescan = self.clock() + new.rescan_interval
        self.notifier.ready(self.status_line())

    # --- what readers see ---------------------------------------------------------------
    def start_metrics(self) -> None:
        config: Config = self.reconciler.config
        listen = self.metrics_listen or config.metrics_listen
        if listen == "off":
            return
        from .metrics import MetricsServer

        server = MetricsServer(lambda: self.snapshot, VcpuClock(self.procfs))
        try:
            self.metrics_address = server.start(listen)
        except OSError as e:
            log.error("cannot serve metrics on %s: %s", listen, e)
            return
        self.metrics_server = server
        log.info("serving metrics on http://%s:%d/metrics", *self.metrics_address)

    def publish(self) -> None:
        """Replace the snapshot readers see (one reference swap: readers never see half of it)."""
        rec = self.reconciler
        self.next_publish = self.clock() + PUBLISH_INTERVAL
        self.snapshot = snapshot(rec)
        rec.changed = False
        line = self.status_line()
        if line != self._status_sent:
            self.notifier.status(line)
            self._status_sent = line

    def status_line(self) -> str:
        return status_line(self.reconciler, self.info)
