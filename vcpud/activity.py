"""What vcpud did, counted: pins by outcome, drift, events, reloads, latencies, vCPU time per CPU.

Mutable and owned by the event loop (or one `apply`); the publisher copies it into snapshots.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from .discovery import Role
from .pinning import Outcome
from .placement import Assignment
from .procfs import Procfs, Vanished
from .snapshot import DURATION_BUCKETS, LATENCY_BUCKETS, Histogram
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
    # CPU time of vCPU threads pinned to a single CPU, per CPU (seconds, only ever grows)
    vcpu_seconds: dict[int, float] = field(default_factory=dict)
    thread_ticks: dict[int, tuple[int, int]] = field(default_factory=dict)  # tid -> (cpu, utime+stime)
    last_reload_ok: bool = True
    last_reload_success: float = 0.0  # unix time

    def count_event(self, source: EventSource, n: int = 1) -> None:
        self.events[source] += n


def sample_vcpu_time(stats: Stats, procfs: Procfs, pinned: Iterable[tuple[int, Assignment]]) -> None:
    """Add the CPU time that vCPUs pinned to one CPU spent since the last look to that CPU.

    ``pinned``: (pid, assignment) for every thread as vcpud pinned it.
    """
    tick = os.sysconf("SC_CLK_TCK")
    seen: dict[int, tuple[int, int]] = {}
    for pid, a in pinned:
        if a.role is not Role.VCPU or len(a.cpus) != 1:
            continue
        try:
            stat = procfs.stat(pid, a.tid)
        except (Vanished, OSError):
            continue
        cpu, ticks = a.cpus.first(), stat.utime + stat.stime
        prev = stats.thread_ticks.get(a.tid)
        # Time from before it was pinned there (or from a recycled TID) is nobody's.
        if prev is not None and prev[0] == cpu and ticks >= prev[1]:
            stats.vcpu_seconds[cpu] = stats.vcpu_seconds.get(cpu, 0.0) + (ticks - prev[1]) / tick
        seen[a.tid] = (cpu, ticks)
    stats.thread_ticks = seen
