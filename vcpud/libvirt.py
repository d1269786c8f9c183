"""libvirt's VMs pinned through libvirt: its API on the live domain, its events in the daemon's loop.

libvirt confines each thread of its domains with a cpuset cgroup of its own and resets their
affinities while it starts a domain or hot-plugs a vCPU; sched_setaffinity alone either fails
(EINVAL) or is undone. ``LibvirtOwner.ops_for(vm)`` gives an actuator that pins with
``virDomainPinVcpuFlags``/``PinEmulator``/``PinIOThread`` (VIR_DOMAIN_AFFECT_LIVE), so that the
kernel, libvirt's cgroups and ``virsh vcpupin`` all agree; None for VMs libvirt does not run, or
while libvirtd cannot be reached (the caller then pins directly). ``SelectorEventImpl`` runs
libvirt's event loop (handles and timers) inside the daemon's one selectors loop, and the
owner's domain event callbacks queue the qemu pids the reconciler should look at again.

A pin through libvirt waits for the domain's current libvirt job (its start, a vCPU hotplug) to
end, and lookups wait for the domain's lock that the start holds while qemu initialises: the
daemon's loop must never wait on them. While libvirt's status file for the domain
(``/run/libvirt/qemu/NAME.xml``, rewritten whenever a tracked job begins or ends) says it is
starting up or busy with a job, ``ops_for`` gives a ``DeferredAffinity`` instead: the pin is
applied with sched_setaffinity where the kernel allows it, kept, and made through libvirt as
soon as the job has ended (polled every few ms, and at libvirt's STARTED/RESUMED events).

libvirt-python is optional (``pip install 'vcpud[libvirt]'``): without it nothing here is used.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import selectors
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable

from .cpuset import CpuSet
from .discovery import Role
from .libvirtrun import RUN_DIR, pidfile, started

if TYPE_CHECKING:
    from .discovery import VM, Thread

try:
    import libvirt
except ImportError:  # the optional extra is not installed
    libvirt = None

log = logging.getLogger(__name__)

URI = "qemu:///system"
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0)  # seconds between reconnection attempts
IOTHREAD_ID = re.compile(r"iothread(\d+)")
DEFERRED_POLL = 0.002  # s between looks at the status files of domains whose pins wait for a job
DOMSTATUS = re.compile(r"<domstatus\b([^>]*)>")
JOB = re.compile(r"<job\b([^>]*)>")
ATTR = re.compile(r"(\w+)='([^']*)'")


def available() -> bool:
    return libvirt is not None


# --- libvirt's event loop in a selectors loop ---------------------------------------------------
class SelectorEventImpl:
    """virEventRegisterImpl callbacks over a selector the caller owns.

    File handles are registered with the selector with a callable as their data: the caller calls
    it with the selector's event mask when select() reports the fd. Timers are kept here: the
    caller adds ``next_deadline()`` to its timeouts and calls ``run_timers()`` after each select.
    Everything runs in the loop's thread: libvirt calls these hooks from the API calls the loop
    makes and from the callbacks it dispatches.
    """

    def __init__(self, sel: selectors.BaseSelector, clock: Callable[[], float] = time.monotonic) -> None:
        self.sel = sel
        self.clock = clock
        self._next_id = 1
        self.handles: dict[int, list[Any]] = {}  # watch -> [fd, events, cb, opaque]
        self.timers: dict[int, list[Any]] = {}   # timer -> [interval ms (-1 off), due, cb, opaque]

    def register(self) -> None:
        assert libvirt is not None
        libvirt.virEventRegisterImpl(self.add_handle, self.update_handle, self.remove_handle,
                                     self.add_timeout, self.update_timeout, self.remove_timeout)

    def rebind(self, sel: selectors.BaseSelector) -> None:
        """Serve another selector (libvirt takes one event impl per process, for good)."""
        self.sel = sel
        for fd in {h[0] for h in self.handles.values()}:
            self._sync_fd(fd)

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # handles
    def _sync_fd(self, fd: int) -> None:
        """(Re)register ``fd`` for the union of what its watches want."""
        mask = 0
        for h in self.handles.values():
            if h[0] == fd:
                if h[1] & 1:  # VIR_EVENT_HANDLE_READABLE
                    mask |= selectors.EVENT_READ
                if h[1] & 2:  # VIR_EVENT_HANDLE_WRITABLE
                    mask |= selectors.EVENT_WRITE
        try:
            key = self.sel.get_key(fd)
        except (KeyError, ValueError):
            key = None
        if key is not None and not mask:
            self.sel.unregister(fd)
        elif key is not None:
            self.sel.modify(fd, mask, functools.partial(self._ready, fd))
        elif mask:
            self.sel.register(fd, mask, functools.partial(self._ready, fd))

    def add_handle(self, fd: int, events: int, cb: Any, opaque: Any) -> int:
        watch = self._id()
        self.handles[watch] = [fd, events, cb, opaque]
        self._sync_fd(fd)
        return watch

    def update_handle(self, watch: int, events: int) -> None:
        h = self.handles.get(watch)
        if h is not None:
            h[1] = events
            self._sync_fd(h[0])

    def remove_handle(self, watch: int) -> int:
        h = self.handles.pop(watch, None)
        if h is None:
            return -1
        self._sync_fd(h[0])
        return 0

    def _ready(self, fd: int, mask: int) -> None:
        events = (1 if mask & selectors.EVENT_READ else 0) | (2 if mask & selectors.EVENT_WRITE else 0)
        for watch, h in list(self.handles.items()):
            if h[0] == fd and watch in self.handles and h[1] & events:
                h[2](watch, fd, h[1] & events, h[3])

    # timers
    def add_timeout(self, interval: int, cb: Any, opaque: Any) -> int:
        timer = self._id()
        self.timers[timer] = [interval, self.clock() + max(interval, 0) / 1000, cb, opaque]
        return timer

    def update_timeout(self, timer: int, interval: int) -> None:
        t = self.timers.get(timer)
        if t is not None:
            t[0] = interval
            t[1] = self.clock() + max(interval, 0) / 1000

    def remove_timeout(self, timer: int) -> int:
        return 0 if self.timers.pop(timer, None) is not None else -1

    def next_deadline(self) -> float | None:
        due = [t[1] for t in self.timers.values() if t[0] >= 0]
        return min(due) if due else None

    def run_timers(self) -> None:
        now = self.clock()
        for timer, t in list(self.timers.items()):
            if timer in self.timers and t[0] >= 0 and t[1] <= now:
                t[1] = now + t[0] / 1000
                t[2](timer, t[3])


_IMPL: SelectorEventImpl | None = None  # virEventRegisterImpl works once per process


# --- pinning through libvirt -----------------------------------------------------------------
def _error_to_oserror(e: Exception, what: str) -> OSError:
    """A libvirt error as the OSError pin_one understands."""
    code = e.get_error_code() if hasattr(e, "get_error_code") else None
    if libvirt is not None and code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
        return ProcessLookupError(errno.ESRCH, f"{what}: {e}")
    if libvirt is not None and code == libvirt.VIR_ERR_INVALID_ARG:
        return OSError(errno.EINVAL, f"{what}: {e}")
    return OSError(errno.EIO, f"{what}: {e}")


class LibvirtAffinity:
    """An AffinityOps for one domain's threads: the kernel is read, libvirt is written."""

    def __init__(self, owner: "LibvirtOwner", dom: Any, threads: dict[int, "Thread"], ncpus: int) -> None:
        self.owner = owner
        self.dom = dom
        self.threads = threads
        self.ncpus = ncpus

    def get(self, tid: int) -> CpuSet:
        return CpuSet.of_kernel(os.sched_getaffinity(tid))

    def via(self, pid: int, tid: int) -> str:
        t = self.threads.get(tid)
        has_pin = t is not None and (t.role in (Role.VCPU, Role.EMULATOR) or IOTHREAD_ID.fullmatch(t.iothread or ""))
        return "libvirt" if has_pin else "sched_setaffinity"

    def set(self, pid: int, tid: int, cpus: CpuSet) -> None:
        assert libvirt is not None
        if not Path(f"/proc/{pid}/task/{tid}").exists():
            raise ProcessLookupError(errno.ESRCH, "thread is gone")
        t = self.threads.get(tid)
        cpumap = tuple(i in cpus.cpus for i in range(max(self.ncpus, max(cpus.cpus, default=0) + 1)))
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        iothread = IOTHREAD_ID.fullmatch(t.iothread or "") if t is not None and t.role is Role.IOTHREAD else None
        try:
            if t is not None and t.role is Role.VCPU and t.vcpu is not None:
                self.dom.pinVcpuFlags(t.vcpu, cpumap, flags)
            elif t is not None and t.role is Role.EMULATOR:
                self.dom.pinEmulator(cpumap, flags)
            elif iothread is not None:
                self.dom.pinIOThread(int(iothread.group(1)), cpumap, flags)
            else:
                # a thread libvirt has no pin for (vhost, qemu's monitor IO thread): the kernel
                os.sched_setaffinity(tid, cpus.cpus)
        except libvirt.libvirtError as e:
            self.owner.check_alive()
            raise _error_to_oserror(e, f"libvirt domain {self.dom.name()}") from e


class DeferredAffinity:
    """An AffinityOps for a domain libvirt is busy with (starting it, hot-plugging a vCPU).

    A pin through libvirt now would wait for libvirt's job, and the loop with it. The pin is kept
    by the owner and made through libvirt when the job ends; meanwhile the thread gets the CPUs
    with sched_setaffinity where its cgroup allows (libvirt may still reset it: the pin through
    libvirt after the job is what lasts). ``get`` answers the kept pin, so the reconciler sees
    the thread as pinned, and a look after the job ends sees no drift.
    """

    def __init__(self, owner: "LibvirtOwner", vm: "VM", why: str) -> None:
        self.owner = owner
        self.vm = vm
        self.why = why

    def via(self, pid: int, tid: int) -> str:
        return f"libvirt, once its {self.why} ends"

    def get(self, tid: int) -> CpuSet:
        kept = self.owner.deferred.get(self.vm.key)
        if kept is not None and tid in kept[1]:
            return kept[1][tid]
        now = CpuSet.of_kernel(os.sched_getaffinity(tid))
        # While libvirt starts the domain it sets every thread's CPUs itself, later: what the
        # thread has now says nothing, so every pin is kept for after the start (else a thread
        # already on its CPUs would be found moved by libvirt, as if it had drifted).
        return CpuSet() if self.why == "start" else now

    def set(self, pid: int, tid: int, cpus: CpuSet) -> None:
        if not Path(f"/proc/{pid}/task/{tid}").exists():
            raise ProcessLookupError(errno.ESRCH, "thread is gone")
        if not self.owner.deferred:
            self.owner.poll_at = self.owner.clock() + DEFERRED_POLL
        kept = self.owner.deferred.get(self.vm.key)
        pins = dict(kept[1]) if kept is not None else {}
        pins[tid] = cpus
        self.owner.deferred[self.vm.key] = (self.vm, pins)  # the newest view of its threads
        try:
            os.sched_setaffinity(tid, cpus.cpus)
        except OSError:
            pass  # confined by libvirt's cgroup for now: the pin through libvirt will do
        log.debug("libvirt: domain %s is busy (%s): tid %d to %s once it is done", self.vm.name, self.why, tid, cpus)


def libvirt_owner() -> "LibvirtOwner | None":
    """The libvirt owner, or None (said once) when libvirt-python is not installed."""
    if available():
        return LibvirtOwner()
    log.info("libvirt-python not installed: libvirt's VMs are pinned with sched_setaffinity "
             "(pip install 'vcpud[libvirt]' to pin them through libvirt)")
    return None


class LibvirtOwner:
    """libvirt's domains: found by their pid file, pinned through libvirt's API, watched by events.

    Connects lazily; a lost connection (libvirtd restarted) makes ``ops_for`` answer None (the
    caller pins directly) until a reconnection, tried at most every few seconds, succeeds.
    """

    def __init__(self, uri: str = URI, run_dir: Path = RUN_DIR, clock: Callable[[], float] = time.monotonic) -> None:
        self.uri = uri
        self.run_dir = run_dir
        self.clock = clock
        self.conn: Any = None
        self.events: SelectorEventImpl | None = None
        self.ncpus = os.cpu_count() or 1
        self.next_try = 0.0
        self.failures = 0
        self.said_down = False
        self.was_connected = False
        self.pending: set[int] = set()  # qemu pids libvirt told us about: look at them again
        self.reconnected = False        # the caller should rescan: events may have been missed
        self.domains: dict[tuple[int, int], Any] = {}  # vm.key -> virDomain (None: not libvirt's)
        self.lost = False  # the close callback fired: drop the connection outside libvirt's dispatch
        # vm.key -> (the VM, tid -> CPUs): pins waiting for libvirt's job on that domain to end
        self.deferred: dict[Hashable, tuple["VM", dict[int, CpuSet]]] = {}
        self.poll_at = 0.0
        self._status: dict[Hashable, tuple[tuple[int, int, int], str | None]] = {}
        if libvirt is not None:
            # libvirt prints every error to stderr by default; ours are raised and logged once
            libvirt.registerErrorHandler(lambda ctx, err: None, None)

    # --- connection ---------------------------------------------------------------------
    def attach(self, sel: selectors.BaseSelector) -> None:
        """Run libvirt's events in this selector's loop (before the first connection), and connect."""
        if libvirt is None:
            return
        global _IMPL
        if _IMPL is None:
            _IMPL = SelectorEventImpl(sel, self.clock)
            _IMPL.register()
        else:
            _IMPL.rebind(sel)
        self.events = _IMPL
        self.connection()

    def connection(self) -> Any:
        """The open connection, or None (libvirtd unreachable: retried later)."""
        if self.conn is not None or libvirt is None:
            return self.conn
        now = self.clock()
        if now < self.next_try:
            return None
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            self.next_try = now + RETRY_DELAYS[min(self.failures, len(RETRY_DELAYS) - 1)]
            self.failures += 1
            if not self.said_down:
                # a host without libvirtd is normal; one that went away is news
                log.log(logging.WARNING if self.was_connected else logging.INFO,
                        "libvirt %s unreachable (%s): its VMs are pinned with sched_setaffinity until it is back",
                        self.uri, str(e).strip())
                self.said_down = True
            return None
        self.conn = conn
        try:
            self.ncpus = conn.getCPUMap()[0]
        except libvirt.libvirtError:
            pass
        self.failures = 0
        self.said_down = False
        self.domains.clear()
        if self.events is not None:
            try:
                conn.registerCloseCallback(self._closed, None)
                conn.setKeepAlive(5, 3)
                for ev in (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, libvirt.VIR_DOMAIN_EVENT_ID_TUNABLE):
                    conn.domainEventRegisterAny(None, ev, self._domain_event, None)
            except libvirt.libvirtError as e:
                log.warning("libvirt %s: cannot watch domain events (%s): found by rescans only", self.uri, e)
        log.info("connected to libvirt %s: its VMs are pinned through libvirt", self.uri)
        if self.was_connected:
            self.reconnected = True
        self.was_connected = True
        return conn

    def _closed(self, conn: Any, reason: int, opaque: Any) -> None:
        # Called from inside libvirt's dispatch: closing the connection here would deadlock.
        log.warning("libvirt %s closed the connection (reason %d): reconnecting", self.uri, reason)
        self.lost = True

    def _drop(self) -> None:
        self.lost = False
        conn, self.conn = self.conn, None
        self.domains.clear()
        self.next_try = self.clock() + RETRY_DELAYS[0]
        if conn is not None:
            try:
                conn.unregisterCloseCallback()
            except libvirt.libvirtError:
                pass
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    def check_alive(self) -> None:
        """After a failed call: drop a connection that is dead."""
        if self.conn is not None:
            try:
                alive = self.conn.isAlive()
            except libvirt.libvirtError:
                alive = 0
            if not alive:
                log.warning("lost the connection to libvirt %s: reconnecting", self.uri)
                self._drop()

    def next_deadline(self) -> float | None:
        """When the loop must wake for us: libvirt's timers, a reconnection attempt."""
        times = []
        if self.events is not None:
            t = self.events.next_deadline()
            if t is not None:
                times.append(t)
            if self.conn is None and libvirt is not None:
                times.append(self.next_try)
            if self.deferred:
                times.append(self.poll_at)
        return min(times) if times else None

    def run_due(self) -> None:
        if self.events is not None:
            self.events.run_timers()
            if self.lost:
                self._drop()
            if self.conn is None:
                self.connection()
            if self.deferred and self.clock() >= self.poll_at:
                self.poll_at = self.clock() + DEFERRED_POLL
                self.poll_deferred()

    def take(self) -> tuple[list[int], bool]:
        """(pids to look at again, whether to rescan everything), and forget them."""
        pids, self.pending = sorted(self.pending), set()
        rescan, self.reconnected = self.reconnected, False
        return pids, rescan

    def close(self) -> None:
        if self.conn is not None:
            self._drop()

    # --- pins waiting for a job -----------------------------------------------------------
    def busy(self, vm: "VM") -> str | None:
        """What libvirt is doing with this domain that a pin would wait for ("start", "modify
        job"...), read from its status file without asking libvirt; None when nothing."""
        path = self.run_dir / f"{vm.name}.xml"
        try:
            st = os.stat(path)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._status.get(vm.key)
            if cached is not None and cached[0] == sig:
                return cached[1]
            with open(path, "rb") as f:
                head = f.read(65536).decode(errors="replace").split("<domain", 1)[0]
        except OSError:
            return "start"  # not written yet: libvirt writes it once qemu is up
        why: str | None = None
        m = DOMSTATUS.search(head)
        attrs = dict(ATTR.findall(m.group(1))) if m else {}
        if attrs.get("pid") != str(vm.pid) or attrs.get("reason") == "starting up":
            why = "start"  # a previous run's file, or qemu still being set up
        else:
            job = JOB.search(head)
            if job is not None:
                kind = dict(ATTR.findall(job.group(1)))
                why = kind["async"] if kind.get("async", "none") != "none" else f"{kind.get('type', '?')} job"
        if len(self._status) > 4096:
            self._status.clear()
        self._status[vm.key] = (sig, why)
        return why

    def poll_deferred(self) -> None:
        """Make the pins of domains whose job has ended; forget those of VMs gone."""
        for key, (vm, _) in list(self.deferred.items()):
            if self._pidfile(vm.name or "") != vm.pid:
                self.deferred.pop(key, None)  # stopped (or failed to start)
            elif self.busy(vm) is None:
                self.flush(vm)

    def flush(self, vm: "VM") -> None:
        """Pin through libvirt what waited for its job on this domain."""
        kept = self.deferred.pop(vm.key, None)
        if kept is None:
            return
        dom = self.domain(kept[0])
        if dom is None or self.conn is None:
            self.pending.add(vm.pid)  # the reconciler looks again and pins some other way
            return
        ops = LibvirtAffinity(self, dom, {t.tid: t for t in kept[0].threads}, self.ncpus)
        for tid, cpus in sorted(kept[1].items()):
            try:
                ops.set(vm.pid, tid, cpus)
            except ProcessLookupError:
                continue
            except OSError as e:
                log.warning("libvirt: domain %s tid %d: the pin to %s that waited for its job failed: %s",
                            vm.name, tid, cpus, e)
                self.pending.add(vm.pid)
        log.debug("libvirt: domain %s: %d pins made after its job", vm.name, len(kept[1]))

    # --- events -------------------------------------------------------------------------
    def _domain_event(self, conn: Any, dom: Any, *args: Any) -> None:
        """Lifecycle (event, detail, opaque) and tunable (params, opaque) events: queue the qemu pid."""
        try:
            name = dom.name()
        except libvirt.libvirtError:
            return
        if len(args) == 3:
            event, detail = args[0], args[1]
            log.debug("libvirt: domain %s lifecycle event %d/%d", name, event, detail)
            if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
                return
        else:
            log.debug("libvirt: domain %s tunables changed: %s", name, args[0] if args else "")
        pid = self._pidfile(name)
        if pid:
            self.pending.add(pid)

    def _pidfile(self, name: str) -> int:
        return pidfile(self.run_dir, name)

    # --- the router's question ----------------------------------------------------------
    def is_libvirts(self, vm: "VM") -> bool:
        """libvirt started it: its pid file for the VM's name names this very process."""
        return started(vm, self.run_dir)

    def domain(self, vm: "VM") -> Any:
        if vm.key in self.domains:
            return self.domains[vm.key]
        if not self.is_libvirts(vm):
            return None
        conn = self.connection()
        if conn is None:
            return None
        try:
            dom = conn.lookupByName(vm.name)
            if vm.uuid is not None and dom.UUIDString().lower() != vm.uuid.lower():
                dom = None
            elif dom.ID() < 0:
                dom = None
        except libvirt.libvirtError as e:
            log.debug("libvirt: no live domain %s: %s", vm.name, e)
            self.check_alive()
            return None
        if len(self.domains) > 4096:
            self.domains.clear()
        self.domains[vm.key] = dom
        return dom

    def ops_for(self, vm: "VM") -> LibvirtAffinity | DeferredAffinity | None:
        if libvirt is None:
            return None
        if self.lost:
            return None
        if self.events is not None:
            # In the daemon's loop: look before asking libvirt about a domain it may be busy
            # with (even a lookup waits while its start holds the domain's lock).
            if self.domains.get(vm.key, 0) is None or not self.is_libvirts(vm) or self.connection() is None:
                return None
            why = self.busy(vm)
            if why is not None:
                return DeferredAffinity(self, vm, why)
            if vm.key in self.deferred:
                self.flush(vm)
        dom = self.domain(vm)
        if dom is None or self.conn is None:
            return None
        return LibvirtAffinity(self, dom, {t.tid: t for t in vm.threads}, self.ncpus)
