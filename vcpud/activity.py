"""What vcpud did, counted: pins by outcome, drift, events, reloads, latencies; vCPU time per CPU.

Stats are mutable and owned by the event loop (or one `apply`); the publisher copies them into
snapshots. The VcpuClock belongs to the metrics server, which asks it at scrape time.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from .pinning import Outcome
from .procfs import Procfs, Vanished
from .histogram import DURATION_BUCKETS, LATENCY_BUCKETS, Histogram
from .vocab import EventSource


@dataclass
class Stats:
    pins: Counter[Outcome] = field(default_factory=Counter)
    drift_corrections: int = 0
    events: Counter[EventSource] = field(default_factory=Counter)
    vanished: int = 0          # processes and threads that exited while being read or pinned
    rescans: int = 0
    overruns: int = 0          # proc connector buffer overruns (events lost)
    reloads_ok: int = 0
    reloads_failed: int = 0
    # seconds from the kernel's COMM/FORK event to the thread's affinity being set
    latency_hist: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    reconcile_hist: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    last_reload_ok: bool = True
    last_reload_success: float = 0.0  # unix time

    def count_event(self, source: EventSource, n: int = 1) -> None:
        self.events[source] += n


class VcpuClock:
    """CPU time of vCPUs pinned to exactly one CPU, added up per CPU when someone asks (a scrape).

    Reads one file per such vCPU (``schedstat``: nanoseconds on a CPU since the thread started),
    at most every ``min_interval`` seconds: an idle daemon nobody scrapes reads nothing. Time a
    thread spent before it was first seen pinned to that CPU (or by a recycled TID) is nobody's.
    """

    def __init__(self, procfs: Procfs, min_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.procfs = procfs
        self.min_interval = min_interval
        self.clock = clock
        self.seconds: dict[int, float] = {}
        self._ns: dict[int, tuple[int, int]] = {}  # tid -> (cpu, runtime ns) at the last look
        self._last = -float("inf")
        self.version = 0  # how many samples were taken
        self._lock = threading.Lock()  # two scrapes may ask at once

    def sample(self, pinned: Iterable[tuple[int, int, int]]) -> Mapping[int, float]:
        """CPU -> seconds so far; ``pinned``: (pid, tid, cpu) of every vCPU pinned to one CPU."""
        with self._lock:
            now = self.clock()
            if now - self._last >= self.min_interval:
                self._last = now
                self.version += 1
                self._sample(pinned)
            return MappingProxyType(dict(self.seconds))

    def _sample(self, pinned: Iterable[tuple[int, int, int]]) -> None:
        seen: dict[int, tuple[int, int]] = {}
        for pid, tid, cpu in pinned:
            try:
                ns = self.procfs.runtime_ns(pid, tid)
            except (Vanished, OSError):
                continue  # exited
            prev = self._ns.get(tid)
            if prev is not None and prev[0] == cpu and ns >= prev[1]:
                self.seconds[cpu] = self.seconds.get(cpu, 0.0) + (ns - prev[1]) / 1e9
            seen[tid] = (cpu, ns)
        self._ns = seen
