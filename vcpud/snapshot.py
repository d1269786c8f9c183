"""Immutable picture of the daemon's state that the event loop publishes for readers (metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, TypeVar

from .cpuset import CpuSet
from .discovery import Role
from .histogram import DURATION_BUCKETS, LATENCY_BUCKETS, Histogram, HistogramView
from .pinning import Outcome
from .vocab import EventSource, ThreadState, VMStatus

__all__ = ["DURATION_BUCKETS", "LATENCY_BUCKETS", "Histogram", "HistogramView", "PoolView", "Snapshot",
           "ThreadView", "VMView"]

_K = TypeVar("_K")
_V = TypeVar("_V")


def _coerce(view: object, name: str, enum_type: type) -> None:
    # Callers may still pass the value strings ("vcpu"); the views hold enum members.
    value = getattr(view, name)
    if type(value) is not enum_type:
        object.__setattr__(view, name, enum_type(value))


@dataclass(frozen=True, slots=True)
class ThreadView:
    role: Role
    cpus: CpuSet              # where it may run now
    state: ThreadState
    vcpu: int | None = None

    def __post_init__(self) -> None:
        _coerce(self, "role", Role)
        _coerce(self, "state", ThreadState)


@dataclass(frozen=True, slots=True)
class VMView:
    name: str
    uuid: str                 # "" when qemu has no -uuid
    policy: str               # "" when no policy matches
    status: VMStatus
    threads: tuple[ThreadView, ...] = ()

    def __post_init__(self) -> None:
        _coerce(self, "status", VMStatus)


@dataclass(frozen=True, slots=True)
class PoolView:
    name: str
    cpus: CpuSet              # its online CPUs
    allocated: CpuSet         # held by VMs (exclusive pools; empty for shared ones)
    exclusive: bool
    waiting: int = 0          # VMs that want CPUs from it and have none yet


def _frozen(d: Mapping[_K, _V]) -> Mapping[_K, _V]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str = ""
    taken_at: float = 0.0                 # unix time
    online: CpuSet = CpuSet()
    vms: tuple[VMView, ...] = ()
    pools: tuple[PoolView, ...] = ()
    # CPU time of vCPU threads pinned to exactly that CPU, accumulated (monotonic) per CPU: filled
    # in at scrape time from pinned_vcpus (activity.VcpuClock)
    vcpu_seconds: Mapping[int, float] = field(default_factory=lambda: _frozen({}))
    pinned_vcpus: tuple[tuple[int, int, int], ...] = ()  # (pid, tid, cpu) of vCPUs pinned to one CPU
    pin_operations: Mapping[Outcome, int] = field(default_factory=lambda: _frozen({}))
    drift_corrections: int = 0
    events: Mapping[EventSource, int] = field(default_factory=lambda: _frozen({}))
    rescans: int = 0                      # full scans of /proc, whatever the reason
    vanished: int = 0                     # threads/processes that exited while being read or pinned
    proc_connector_overruns: int = 0      # times the kernel dropped proc connector events
    pin_latency: HistogramView = HistogramView(LATENCY_BUCKETS, (0,) * (len(LATENCY_BUCKETS) + 1))
    reconcile_duration: HistogramView = HistogramView(DURATION_BUCKETS, (0,) * (len(DURATION_BUCKETS) + 1))
    config_last_reload_successful: bool = True
    config_last_reload_success_timestamp: float = 0.0
    config_reloads_succeeded: int = 0     # reloads (SIGHUP) only: the initial load is not one
    config_reloads_failed: int = 0
