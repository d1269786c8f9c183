"""Prometheus metrics: built from the daemon's latest :class:`~vcpud.snapshot.Snapshot`, served over HTTP.

The event loop publishes an immutable snapshot after each reconcile (one reference swap).
Everything here reads that snapshot and nothing else: a scrape never touches /proc, never takes
a lock the loop holds, and every family of one scrape comes from the *same* snapshot object.
The HTTP server runs in its own daemon thread; its only coupling to the loop is the GIL.

Metrics (labels are bounded: CPU numbers, roles, VM names/uuids, pool and policy names,
states, results, event sources; never a PID or TID):

``vcpud_cpu_pinned_threads{cpu,role}``
    Threads of managed VMs (VMs a policy matched) that vcpud pinned (thread state ``pinned``)
    and that may run on that CPU; a thread allowed on k CPUs counts once on each of them.
    Threads with no rule for their role float over the host and are not counted here (see
    ``vcpud_threads``). There is a row for every online CPU and every pinnable role (vcpu,
    emulator, iothread, vhost) plus any other role seen, 0 where none, so that a grid has every CPU.
``vcpud_cpu_vcpus{cpu}`` / ``vcpud_cpu_exclusive_vcpus{cpu}``
    The same for vCPU threads only; the second counts only vCPUs pinned to that CPU alone.
``vcpud_cpu_vm_info{cpu,vm,role}``
    1 for each (CPU, managed VM, role) with at least one pinned thread allowed on that CPU.
    The largest family on a dense host: a VM floating over a 32-CPU pool is 32 series per role
    (200 such VMs with vCPUs and emulator threads there: ~13,000 series).
``vcpud_cpu_vcpu_seconds_total{cpu}``
    CPU time (user+system) that vCPU threads pinned to exactly that CPU spent, accumulated
    by the daemon. ``rate()`` of it is how busy the vCPUs pinned to that CPU are (1 = a whole CPU).
``vcpud_pool_cpus{pool,state}``
    Online CPUs of a pool, state ``free`` or ``allocated`` (held by VMs; always 0 for shared pools).
``vcpud_pool_exclusive{pool}``
    1 for an exclusive pool (each CPU to at most one VM), 0 for a shared one.
``vcpud_pool_waiting_vms{pool}``
    VMs that want CPUs from the pool and have none yet.
``vcpud_vms{policy}``
    VMs per matching policy; VMs no policy matched (unmanaged) have ``policy=""``, which
    Prometheus shows as no ``policy`` label at all (select them with ``{policy=""}``).
``vcpud_vms_by_status{status}``
    VMs per status: pinned, placed, waiting, failed, unmanaged (all five always present).
``vcpud_vm_info{vm,uuid,policy}``
    1 per VM (every VM on the host, unmanaged ones with ``policy=""``).
``vcpud_threads{role,state}``
    Threads of all VMs by role and state (pinned, unpinned, failed); every known role x state is
    present.
``vcpud_pin_operations_total{result}``
    Affinity operations by outcome (unchanged, pinned, vanished, outside-cpuset, no-permission,
    mismatch, error; all present from the start).
``vcpud_drift_corrections_total``
    Threads that had been moved away by someone else and were put back.
``vcpud_events_total{source}``
    Events the loop handled, by source: udev, proc_connector, rescan, signal.
``vcpud_pin_latency_seconds``
    Histogram: kernel event (thread created or named) to its affinity being set.
``vcpud_reconcile_duration_seconds``
    Histogram: one reconcile pass.
``vcpud_config_last_reload_successful``
    1 if the last configuration (re)load succeeded, else 0 (the previous policy stays in force).
``vcpud_config_last_reload_success_timestamp_seconds``
    Unix time of the last successful configuration load.
``vcpud_build_info{version}``
    Always 1.
``vcpud_snapshot_timestamp_seconds``
    Unix time the daemon took the snapshot this scrape shows (0 before the first one).

Before the daemon published its first snapshot (the source returns None) only
``vcpud_build_info`` is exposed.

Two serializers, one model (:func:`model`): :class:`SnapshotCollector` / :func:`render` go through
prometheus_client (``generate_latest``); :class:`MetricsServer` writes the same bytes with
:func:`exposition` at a fraction of the cost (tests hold the two equal, byte for byte), always in
the classic text format 0.0.4, and renders each snapshot object once (scrapes until the next
publish reuse the bytes). No process or GC collectors: the service manager and node_exporter
report the process; a scrape reports only the snapshot.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import socketserver
import threading
import time
from collections import Counter
from typing import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)
from prometheus_client.utils import floatToGoString

from . import __version__
from .config import listen as listen_grammar
from .snapshot import HistogramView, Snapshot

log = logging.getLogger(__name__)

PINNABLE_ROLES = ("vcpu", "emulator", "iothread", "vhost")
ROLES = PINNABLE_ROLES + ("kernel", "unknown")
THREAD_STATES = ("pinned", "unpinned", "failed")
VM_STATUSES = ("pinned", "placed", "waiting", "failed", "unmanaged")
EVENT_SOURCES = ("udev", "proc_connector", "rescan", "signal")
# vcpud.pinning.Outcome values that `vcpud run` can count ("planned" is for dry runs only)
PIN_RESULTS = ("unchanged", "pinned", "vanished", "outside-cpuset", "no-permission", "mismatch", "error")

# Always the classic text format: every Prometheus reads it, and vcpud has nothing that needs
# OpenMetrics (no exemplars, no _created series); Prometheus takes it whatever it asked for.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Source = Callable[[], "Snapshot | None"]


def _label(value: str) -> str:
    """A label value that encodes as UTF-8 (a VM name may carry undecodable bytes as surrogates)."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:  # bytes decoded with surrogateescape: show them as \xNN
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


class Family:
    """One metric family of the model both serializers use.

    ``name`` is the base name (a counter's without ``_total``, an info's without ``_info``),
    ``labels`` the label names in exposition order (sorted, as the text format sorts them), and each
    sample is ``(suffix, label values, value)`` with the sample name ``name + suffix``.
    """

    __slots__ = ("name", "type", "help", "labels", "samples")

    SUFFIX = {"gauge": "", "counter": "_total", "info": "_info"}

    def __init__(self, name: str, type: str, help: str, labels: tuple[str, ...] = ()) -> None:  # noqa: A002
        assert list(labels) == sorted(labels), f"{name}: labels must be in sorted order"
        self.name, self.type, self.help, self.labels = name, type, help, labels
        self.samples: list[tuple[str, tuple[str, ...], float]] = []

    def add(self, values: tuple[str, ...], value: float) -> None:
        self.samples.append((self.SUFFIX[self.type], values, value))

    def all_samples(self) -> list[tuple[str, tuple[str, ...], float]]:
        return self.samples

    def metric(self) -> Metric:
        """The prometheus_client metric family (through its public custom-collector classes)."""
        samples = self.all_samples()
        if self.type == "histogram":
            buckets = [(v[0], n) for sfx, v, n in samples if sfx == "_bucket"]
            total = next(n for sfx, _, n in samples if sfx == "_sum")
            return HistogramMetricFamily(self.name, self.help, buckets=buckets, sum_value=total)
        cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "info": InfoMetricFamily}[self.type]
        m = cls(self.name, self.help, labels=self.labels)
        for _, values, value in samples:
            if self.type == "info":
                m.add_metric(values, {})
            else:
                m.add_metric(values, value)
        return m


class CpuInfoFamily(Family):
    """An info family labelled ``cpu`` first, held as groups: ``(label values after cpu, CPU strings)``.

    vcpud_cpu_vm_info has a series for every CPU a VM's threads may run on: a VM floating over a
    32-CPU pool is 32 of them (and 200 such VMs 6,400). Grouped, the text serializer writes each
    group with one ``str.join``; the samples, in this order, are (cpu, *values) per CPU per group.
    """

    __slots__ = ("groups",)

    def __init__(self, name: str, help: str, labels: tuple[str, ...]) -> None:  # noqa: A002
        assert labels[0] == "cpu"
        super().__init__(name, "info", help, labels)
        self.groups: list[tuple[tuple[str, ...], list[str]]] = []

    def all_samples(self) -> list[tuple[str, tuple[str, ...], float]]:
        return [("_info", (c, *values), 1) for values, cpus in self.groups for c in cpus]


def _histogram(name: str, help: str, h: HistogramView) -> Family:  # noqa: A002
    """HistogramView counts are per bucket with +Inf last; Prometheus wants them cumulative."""
    bounds = [floatToGoString(b) for b in h.buckets] + ["+Inf"]
    counts = list(h.counts[: len(bounds)]) + [0] * (len(bounds) - len(h.counts))
    counts[-1] += sum(h.counts[len(bounds):])  # (a malformed view: anything extra is above the last bound)
    f = Family(name, "histogram", help, ("le",))
    total = 0
    for le, n in zip(bounds, counts):
        total += n
        f.samples.append(("_bucket", (le,), total))
    f.samples.append(("_count", (), total))
    f.samples.append(("_sum", (), float(h.sum)))
    return f


def model(snap: Snapshot | None) -> list[Family]:
    """Every metric family for one snapshot (pure: the same snapshot gives the same families)."""
    version = (snap.version if snap is not None and snap.version else __version__)
    build = Family("vcpud_build", "info", "vcpud's version; always 1.", ("version",))
    build.add((_label(version),), 1)
    if snap is None:
        return [build]

    pinned: Counter[tuple[int, str]] = Counter()
    vcpus: Counter[int] = Counter()
    exclusive: Counter[int] = Counter()
    vm_on_cpu: dict[tuple[str, str], frozenset[int]] = {}  # (vm, role) -> CPUs its pinned threads may use
    roles = set(PINNABLE_ROLES)
    threads: Counter[tuple[str, str]] = Counter({(r, s): 0 for r in ROLES for s in THREAD_STATES})
    by_policy: Counter[str] = Counter()
    by_status: Counter[str] = Counter({s: 0 for s in VM_STATUSES})
    vm_info: set[tuple[str, str, str]] = set()
    cpus_seen = set(snap.online.cpus)

    # Threads are grouped by (CPUs, role) first: the CPU sets of a VM's threads, and of VMs sharing
    # a pool, repeat a lot, and each distinct group is spread over its CPUs once.
    groups: Counter[tuple[frozenset[int], str]] = Counter()
    for vm in snap.vms:
        name = _label(vm.name)
        policy = _label(vm.policy)
        by_policy[policy] += 1
        by_status[_label(vm.status)] += 1
        vm_info.add((policy, name, _label(vm.uuid)))
        threads.update([(t.role, t.state) for t in vm.threads])
        if not vm.policy:
            continue
        mine = [(t.cpus.cpus, t.role) for t in vm.threads if t.state == "pinned"]
        groups.update(mine)
        for cs, role in set(mine):
            on = vm_on_cpu.get((name, role))
            vm_on_cpu[name, role] = cs if on is None or on == cs else on | cs
    for (cs, role), n in groups.items():
        cpus_seen.update(cs)
        for c in cs:
            pinned[c, role] += n
        if role == "vcpu":
            for c in cs:
                vcpus[c] += n
            if len(cs) == 1:
                for c in cs:
                    exclusive[c] += n
        else:
            roles.add(role)

    cpus = sorted(cpus_seen | set(snap.vcpu_seconds))
    cpu_str = {c: str(c) for c in cpus}
    roles_sorted = [(r, _label(r)) for r in sorted(roles)]
    out = [build]

    f = Family("vcpud_cpu_pinned_threads", "gauge",
               "Pinned threads of managed VMs allowed on this host CPU (a thread allowed on k CPUs counts on each).",
               ("cpu", "role"))
    f.samples += [("", (cpu_str[c], lr), pinned.get((c, r), 0)) for c in cpus for r, lr in roles_sorted]
    out.append(f)

    f = Family("vcpud_cpu_vcpus", "gauge", "Pinned vCPU threads of managed VMs allowed on this host CPU.", ("cpu",))
    f.samples += [("", (cpu_str[c],), vcpus.get(c, 0)) for c in cpus]
    out.append(f)

    f = Family("vcpud_cpu_exclusive_vcpus", "gauge", "vCPU threads pinned to this host CPU alone.", ("cpu",))
    f.samples += [("", (cpu_str[c],), exclusive.get(c, 0)) for c in cpus]
    out.append(f)

    g = CpuInfoFamily("vcpud_cpu_vm", "1 for each managed VM and role with pinned threads allowed on this CPU.",
                      ("cpu", "role", "vm"))
    cpu_lists: dict[frozenset[int], list[str]] = {}  # VMs in one pool share their CPU set: format it once
    for (name, role), on in sorted(vm_on_cpu.items()):
        cl = cpu_lists.get(on)
        if cl is None:
            cl = cpu_lists[on] = [cpu_str[c] for c in sorted(on)]
        g.groups.append(((_label(role), name), cl))
    out.append(g)

    f = Family("vcpud_cpu_vcpu_seconds", "counter", "CPU time spent by vCPU threads pinned to exactly this host CPU.",
               ("cpu",))
    secs = snap.vcpu_seconds
    f.samples += [("_total", (cpu_str[c],), float(secs.get(c, 0.0))) for c in cpus]
    out.append(f)

    pools = sorted(snap.pools, key=lambda p: p.name)
    f = Family("vcpud_pool_cpus", "gauge", "Online CPUs of a pool, free or allocated to VMs.", ("pool", "state"))
    for p in pools:
        alloc = len(p.allocated & p.cpus)
        f.add((_label(p.name), "allocated"), alloc)
        f.add((_label(p.name), "free"), len(p.cpus) - alloc)
    out.append(f)
    f = Family("vcpud_pool_exclusive", "gauge", "1 for an exclusive pool (a CPU to at most one VM), 0 for a shared one.",
               ("pool",))
    for p in pools:
        f.add((_label(p.name),), 1 if p.exclusive else 0)
    out.append(f)
    f = Family("vcpud_pool_waiting_vms", "gauge", "VMs that want CPUs from this pool and have none yet.", ("pool",))
    for p in pools:
        f.add((_label(p.name),), p.waiting)
    out.append(f)

    f = Family("vcpud_vms", "gauge", 'VMs by matching policy (policy="" for unmanaged VMs).', ("policy",))
    for policy in sorted(by_policy):
        f.add((policy,), by_policy[policy])
    out.append(f)
    f = Family("vcpud_vms_by_status", "gauge", "VMs by status.", ("status",))
    for status in sorted(by_status):
        f.add((status,), by_status[status])
    out.append(f)
    f = Family("vcpud_vm", "info", 'One per VM on the host (policy="" when no policy matches).',
               ("policy", "uuid", "vm"))
    f.samples += [("_info", (policy, uuid, name), 1)
                  for policy, name, uuid in sorted(vm_info, key=lambda i: (i[1], i[2], i[0]))]
    out.append(f)
    f = Family("vcpud_threads", "gauge", "Threads of all VMs by role and pinning state.", ("role", "state"))
    for role, state in sorted(threads):
        f.add((_label(role), _label(state)), threads[role, state])
    out.append(f)

    f = Family("vcpud_pin_operations", "counter", "Thread affinity operations by result.", ("result",))
    results = dict.fromkeys(PIN_RESULTS, 0)
    results.update(snap.pin_operations)
    for result in sorted(results):
        f.add((_label(result),), results[result])
    out.append(f)
    f = Family("vcpud_drift_corrections", "counter", "Threads moved away by someone else and put back.")
    f.add((), snap.drift_corrections)
    out.append(f)
    f = Family("vcpud_events", "counter", "Events handled by the loop, by source.", ("source",))
    events = dict.fromkeys(EVENT_SOURCES, 0)
    events.update(snap.events)
    for source in sorted(events):
        f.add((_label(source),), events[source])
    out.append(f)

    out.append(_histogram("vcpud_pin_latency_seconds",
                          "Kernel event (thread created or named) to the thread's affinity being set.",
                          snap.pin_latency))
    out.append(_histogram("vcpud_reconcile_duration_seconds", "Duration of one reconcile pass.",
                          snap.reconcile_duration))

    for name, help, value in (  # noqa: A001
            ("vcpud_config_last_reload_successful", "1 if the last configuration load succeeded, 0 if it failed.",
             1 if snap.config_last_reload_successful else 0),
            ("vcpud_config_last_reload_success_timestamp_seconds",
             "Unix time of the last successful configuration load.", snap.config_last_reload_success_timestamp),
            ("vcpud_snapshot_timestamp_seconds", "Unix time the daemon took the state these metrics show.",
             snap.taken_at)):
        f = Family(name, "gauge", help)
        f.add((), value)
        out.append(f)
    return out


def families(snap: Snapshot | None) -> list[Metric]:
    """The prometheus_client metric families for one snapshot."""
    return [f.metric() for f in model(snap)]


def _esc(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return v


class _Escaped(dict):
    """label value -> escaped, computed once per distinct value (lookups of hits stay in C)."""

    def __missing__(self, v: str) -> str:
        e = self[v] = _esc(v)
        return e


def text(fams: Iterable[Family]) -> bytes:
    """Text exposition format 0.0.4 of the model, byte for byte what prometheus_client's
    ``generate_latest`` writes for :func:`families` (a test holds them equal), at a fraction of the cost."""
    out: list[str] = []
    esc = _Escaped()
    for f in fams:
        expo = f.name + {"counter": "_total", "info": "_info"}.get(f.type, "")
        typ = "gauge" if f.type == "info" else f.type
        doc = f.help.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {expo} {doc}\n# TYPE {expo} {typ}\n")
        if isinstance(f, CpuInfoFamily):
            rest = "".join(f',{k}="%s"' for k in f.labels[1:])
            pre = f'{f.name}_info{{cpu="'
            for values, cpus in f.groups:
                if cpus:
                    post = '"' + rest % tuple(esc[v] for v in values) + "} 1.0\n"
                    out.append(pre + (post + pre).join(cpus) + post)
            continue
        templates: dict[tuple[str, int], str] = {}
        append = out.append
        for suffix, values, value in f.samples:
            n = len(values)
            tpl = templates.get((suffix, n))
            if tpl is None:
                inner = ",".join(f'{k}="%s"' for k in f.labels[:n])
                tpl = templates[suffix, n] = f.name + suffix + (f"{{{inner}}}" if inner else "") + " %s\n"
            num = f"{value}.0" if type(value) is int and 0 <= value < 1_000_000 else floatToGoString(value)
            if n == 0:
                append(tpl % num)
            elif n == 1:
                append(tpl % (esc[values[0]], num))
            elif n == 2:
                append(tpl % (esc[values[0]], esc[values[1]], num))
            else:
                append(tpl % (*[esc[v] for v in values], num))
    return "".join(out).encode("utf-8")


def exposition(snap: Snapshot | None) -> bytes:
    """What the server sends for a snapshot: the text format, equal to :func:`render`'s."""
    return text(model(snap))


class SnapshotCollector:
    """A prometheus_client collector over ``source()``, the daemon's latest snapshot.

    ``source`` must be cheap and non-blocking (the daemon passes ``lambda: self.snapshot``);
    it is called once per ``collect()``, so one scrape shows one snapshot.
    """

    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.source()))

    def describe(self) -> Iterable[Metric]:
        return ()  # names depend on the snapshot; nothing to check at registration


def registry_for(source: Source) -> CollectorRegistry:
    """A registry holding only a :class:`SnapshotCollector` (no process or GC collectors)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(source))
    return reg


def render(snapshot: Snapshot | None) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of one snapshot."""
    return generate_latest(registry_for(lambda: snapshot))


# --- HTTP ------------------------------------------------------------------------------------

class ListenError(OSError, ValueError):
    """A ``HOST:PORT`` that does not parse (an OSError too, so callers handling bind errors see it)."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[V6]:PORT"`` -> (host, port); the grammar is vcpud.config.listen's."""
    try:
        address = listen_grammar.parse_listen(listen)
    except listen_grammar.ListenAddressError as e:
        raise ListenError(f"bad listen address {listen!r}: {e}") from None
    if isinstance(address, str):
        raise ListenError(f"bad listen address {listen!r}: 'off' is no address to serve on")
    return address.host, address.port


class _Handler(WSGIRequestHandler):
    timeout = 10  # a client that connects and says nothing does not keep a thread forever

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple, family: int) -> None:
        self.address_family = family
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's FQDN (socket.getfqdn): never do that.
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("metrics: error serving %s", client_address, exc_info=True)


# Snapshots change after every event burst; rendering each at once would cost the loop GIL time.
PRERENDER_INTERVAL = 0.1


class MetricsServer:
    """Serves ``/metrics`` for ``source()`` from a daemon thread; ``start()`` then ``stop()``."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.registry = registry_for(source)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = False
        self._cache: tuple[object, bytes] | None = None
        self._render_lock = threading.Lock()
        self._pub_r: socket.socket | None = None
        self._pub_w: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    def start(self, listen: str) -> tuple[str, int]:
        """Bind ``listen`` (port 0: any free port) and serve; returns the bound (host, port).

        Raises OSError (ListenError for an address that does not parse) and then serves nothing.
        """
        if self._httpd is not None:
            raise RuntimeError("MetricsServer already started")
        host, port = parse_listen(listen)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host!r}: {e}") from e
        family, _, _, _, sockaddr = infos[0]
        httpd = _Server(sockaddr, family)
        httpd.set_app(self._app)
        self._httpd = httpd
        self._wake_r, self._wake_w = socket.socketpair()
        self._pub_r, self._pub_w = socket.socketpair()
        for sock in (self._pub_r, self._pub_w):
            sock.setblocking(False)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="vcpud-metrics", daemon=True)
        self._thread.start()
        bound = httpd.socket.getsockname()
        self.address = (bound[0], bound[1])
        return self.address

    def stop(self) -> None:
        """Stop serving and close the listening socket (returns at once; idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping = True
        assert self._wake_w is not None and self._thread is not None
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=2)
        httpd.server_close()
        for sock in (self._wake_r, self._wake_w, self._pub_r, self._pub_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = self._pub_r = self._pub_w = None
        self._thread = None

    def published(self) -> None:
        """The source has a new snapshot: render it ahead of the next scrape (never blocks)."""
        w = self._pub_w
        if w is not None:
            try:
                w.send(b"p")
            except OSError:
                pass  # full (a render is due anyway) or stopped

    def _serve(self) -> None:
        """Accept loop: sleeps until a client connects, a snapshot is published, or stop().

        A published snapshot is rendered here, at most every PRERENDER_INTERVAL seconds, so
        that a scrape finds the bytes ready instead of rendering while Prometheus waits.
        """
        httpd, wake, pub = self._httpd, self._wake_r, self._pub_r
        assert httpd is not None and wake is not None and pub is not None
        due: float | None = None
        last = 0.0
        with selectors.DefaultSelector() as sel:
            sel.register(httpd.socket, selectors.EVENT_READ)
            sel.register(wake, selectors.EVENT_READ)
            sel.register(pub, selectors.EVENT_READ)
            while not self._stopping:
                timeout = None if due is None else max(0.0, due - time.monotonic())
                for key, _ in sel.select(timeout):
                    if self._stopping:
                        return
                    if key.fileobj is httpd.socket:
                        httpd._handle_request_noblock()
                    elif key.fileobj is pub:
                        try:
                            while pub.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                        if due is None:
                            due = max(time.monotonic(), last + PRERENDER_INTERVAL)
                if due is not None and time.monotonic() >= due:
                    due, last = None, time.monotonic()
                    try:
                        self.scrape()
                    except Exception:  # the scrape itself will report it
                        log.exception("metrics: cannot render")

    def scrape(self) -> bytes:
        """The body of one scrape: the text format of ``source()``'s snapshot, rendered once per snapshot.

        The daemon publishes a new snapshot object after each reconcile; until it does, scrapes
        reuse the bytes rendered for the current one (Prometheus HA pairs, a dashboard and ``curl``
        then cost nothing). The cache is one (snapshot, bytes) tuple swapped whole.
        """
        with self._render_lock:  # a scrape during a pre-render waits for it rather than repeat it
            snap = self.source()
            cached = self._cache
            if cached is not None and cached[0] is snap:
                return cached[1]
            body = exposition(snap)
            self._cache = (snap, body)
            return body

    def _app(self, environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/":
            body = b'<html><head><title>vcpud</title></head><body><a href="/metrics">Metrics</a></body></html>\n'
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found; metrics are at /metrics\n"]
        try:
            body = self.scrape()
        except Exception as e:  # a bug here must not take the thread down; the scrape fails (up == 0)
            log.exception("metrics: cannot render")
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"cannot render metrics: {e}\n".encode("utf-8", "replace")]
        start_response("200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
