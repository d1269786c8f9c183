"""The loop's event sources: signals (a wakeup socket), the netlink proc connector, uevents.

Each source registers with one selector; what it reads comes back as plain, typed events.
"""

from __future__ import annotations

import functools
import logging
import selectors
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Collection, Iterator

from .vocab import EventSource

log = logging.getLogger(__name__)

SignalHandler = Callable[[int, FrameType | None], None]


@dataclass(frozen=True, slots=True)
class Uevent:
    """What a uevent means to vcpud: a CPU came or went, a VM was created or destroyed,
    or uevents were lost (the kernel dropped them: ENOBUFS)."""

    kind: str            # "cpu", "kvm" or "lost"
    event: str = ""      # kvm: "create" or "destroy"
    pid: int = 0         # kvm: the thread that opened /dev/kvm


class Sources:
    def __init__(self, use_connector: bool = True, use_udev: bool = True) -> None:
        self.use_connector = use_connector
        self.use_udev = use_udev
        self.sel = selectors.DefaultSelector()
        self.connector: Any = None
        self.udev_monitor: Any = None
        self.udev_source = ""
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._watched: frozenset[int] | None = None  # what the connector's filter passes; None: all

    def open(self, on_stop: SignalHandler, on_hup: SignalHandler) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        self.sel.register(self._wake_r, selectors.EVENT_READ, EventSource.SIGNAL)
        if self.use_connector:
            self._open_connector()
        if self.use_udev:
            self._open_udev()

    def _open_connector(self) -> None:
        from .procconn import ProcConnector, ProcConnectorUnavailable

        try:
            self.connector = ProcConnector(events={"fork", "exec", "comm", "exit"})
        except ProcConnectorUnavailable as e:
            log.warning("netlink proc connector unavailable (%s): new threads are found by rescans only", e)
            return
        self.sel.register(self.connector.fileno(), selectors.EVENT_READ, EventSource.PROC_CONNECTOR)
        log.info("listening to the netlink proc connector")

    def watch(self, tgids: Collection[int]) -> None:
        """The processes whose fork/comm/exit events matter now; the connector's kernel filter is
        rebuilt only when the set changed (a frozenset compare per loop turn).

        The race this leaves, by design: qemu execs -> its EXEC passes -> the reconciler finds the
        VM in that loop turn -> the filter takes its tgid before the loop sleeps again. Threads it
        forked meanwhile had their FORK (and an early EXIT) dropped by the kernel. Their names
        still come through ("CPU "/"IO " COMM events pass from any process), and the reconciler
        reads a new VM again on its follow-up timers (FOLLOWUP_DELAYS) and on the kvm uevent
        until every vCPU is seen, which picks up unnamed threads too; the periodic rescan
        catches the rest. Dropped EXITs of processes in the reconciler's not-a-VM set leave
        stale entries there until the next full rescan prunes them.
        """
        if self.connector is None:
            return
        now = frozenset(tgids)
        if now != self._watched:
            self._watched = now
            self.connector.watch(now)

    def _open_udev(self) -> None:
        try:
            import pyudev
        except ImportError as e:
            log.warning("pyudev missing (%s): new VMs are found by rescans only", e)
            return
        # Without udevd nobody re-broadcasts uevents on the 'udev' group: listen to the kernel.
        self.udev_source = "udev" if Path("/run/udev/control").exists() else "kernel"
        try:
            mon = pyudev.Monitor.from_netlink(pyudev.Context(), source=self.udev_source)
            mon.filter_by("misc")
            mon.filter_by("cpu")  # CPU hot(un)plug: pooled CPUs come and go
            mon.set_receive_buffer_size(4 * 1024 * 1024)
            mon.start()
        except (OSError, ValueError) as e:
            log.warning("cannot watch uevents (%s): new VMs are found by rescans only", e)
            return
        self.udev_monitor = mon
        self.sel.register(mon.fileno(), selectors.EVENT_READ, EventSource.UDEV)
        log.info("watching kvm uevents from %s", self.udev_source)

    def ready(self, timeout: float) -> list[EventSource | Callable[[], None]]:
        """Wait up to ``timeout`` seconds; the sources that have something to read. An fd that
        another event loop registered (libvirt's, through ``vcpud.libvirt.SelectorEventImpl``)
        has a callable taking the event mask as its data: it comes back bound to that mask."""
        return [key.data if isinstance(key.data, EventSource) else functools.partial(key.data, mask)
                for key, mask in self.sel.select(timeout)]

    def wake(self) -> None:
        """Make the loop's select() return (from any thread): a reload finished."""
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # the socket is full: the loop is awake already, or closed

    def drain_signals(self) -> None:
        try:
            while self._wake_r is not None and self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def uevents(self) -> Iterator[Uevent]:
        """Every pending uevent that matters, without blocking."""
        while True:
            try:
                dev = self.udev_monitor.poll(timeout=0)
            except OSError as e:
                log.warning("uevent socket: %s; rescanning", e)
                yield Uevent("lost")
                return
            if dev is None:
                return
            if dev.subsystem == "cpu":
                if dev.action in ("online", "offline", "add", "remove"):
                    yield Uevent("cpu")
                continue
            props = dev.properties
            event = props.get("EVENT")
            if dev.sys_name == "kvm" and event in ("create", "destroy"):
                pid = props.get("PID", "")
                yield Uevent("kvm", event, int(pid) if pid.isdigit() else 0)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        if self.connector is not None:
            self.connector.close()
        self.sel.close()
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
