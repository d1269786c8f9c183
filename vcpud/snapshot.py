"""Immutable picture of the daemon's state that the event loop publishes for readers (metrics)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .cpuset import CpuSet

# Pin latency is microseconds to milliseconds; a reconcile is milliseconds to seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(frozen=True, slots=True)
class HistogramView:
    buckets: tuple[float, ...]   # upper bounds, ascending, without +Inf
    counts: tuple[int, ...]      # observations per bucket (not cumulative); one more for +Inf
    sum: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    """Mutable accumulator owned by the event loop; view() is what snapshots carry."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def view(self) -> HistogramView:
        return HistogramView(self.buckets, tuple(self.counts), self.sum)


@dataclass(frozen=True, slots=True)
class ThreadView:
    role: str                 # vcpu, emulator, iothread, vhost, kernel, unknown
    cpus: CpuSet              # where it may run now
    state: str                # pinned (as its policy wants), unpinned (no rule / unmanaged), failed
    vcpu: int | None = None


@dataclass(frozen=True, slots=True)
class VMView:
    name: str
    uuid: str                 # "" when qemu has no -uuid
    policy: str               # "" when no policy matches
    status: str               # pinned, placed, waiting, failed, unmanaged
    threads: tuple[ThreadView, ...] = ()


@dataclass(frozen=True, slots=True)
class PoolView:
    name: str
    cpus: CpuSet              # its online CPUs
    allocated: CpuSet         # held by VMs (exclusive pools; empty for shared ones)
    exclusive: bool
    waiting: int = 0          # VMs that want CPUs from it and have none yet


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str = ""
    taken_at: float = 0.0                 # unix time
    online: CpuSet = CpuSet()
    vms: tuple[VMView, ...] = ()
    pools: tuple[PoolView, ...] = ()
    # CPU time of vCPU threads pinned to exactly that CPU, accumulated (monotonic) per CPU
    vcpu_seconds: Mapping[int, float] = field(default_factory=lambda: _frozen({}))
    pin_operations: Mapping[str, int] = field(default_factory=lambda: _frozen({}))  # result -> count
    drift_corrections: int = 0
    events: Mapping[str, int] = field(default_factory=lambda: _frozen({}))  # source -> count
    pin_latency: HistogramView = HistogramView(LATENCY_BUCKETS, (0,) * (len(LATENCY_BUCKETS) + 1))
    reconcile_duration: HistogramView = HistogramView(DURATION_BUCKETS, (0,) * (len(DURATION_BUCKETS) + 1))
    config_last_reload_successful: bool = True
    config_last_reload_success_timestamp: float = 0.0
