"""Pool vocabulary shared by the config, the allocator, the planner and the state file (pure data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from .cpuset import CpuSet

SMT_MODES = ("any", "mirror", "isolate", "full-cores")
NUMA_MODES = ("any", "single", "spread")
CACHE_MODES = ("any", "l3")


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """A named set of host CPUs; in an exclusive pool each CPU belongs to at most one VM."""

    name: str
    cpus: CpuSet
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class PlacementRule:
    """How a VM's vCPUs take CPUs from a pool (policy `vcpus: {pool: ..., smt: ..., ...}`)."""

    pool: str
    smt: str = "any"      # SMT_MODES
    numa: str = "any"     # NUMA_MODES
    cache: str = "any"    # CACHE_MODES


@dataclass(frozen=True, slots=True)
class Request:
    """One VM asking for dedicated CPUs."""

    key: Hashable            # the VM's identity: (pid, starttime) for live VMs
    name: str
    vcpus: int
    threads_per_core: int    # guest SMT (qemu -smp threads=)
    rule: PlacementRule
    emulator_isolate: bool = False  # one more dedicated CPU for the emulator threads


@dataclass(frozen=True, slots=True)
class Allocation:
    key: Hashable
    pool: str
    vcpus: tuple[int, ...]         # host CPU of vCPU 0, 1, ...
    emulator: int | None = None    # the isolated emulator CPU, if asked for
    reserved: CpuSet = CpuSet()    # held but unused: siblings kept free (isolate, full-cores)
    reasons: tuple[str, ...] = ()  # why each CPU: one per vCPU, then the emulator's

    @property
    def cpus(self) -> CpuSet:
        """Every CPU this allocation takes out of its pool."""
        held = set(self.vcpus) | set(self.reserved)
        if self.emulator is not None:
            held.add(self.emulator)
        return CpuSet(frozenset(held))


@dataclass(frozen=True, slots=True)
class Failure:
    key: Hashable
    reason: str
