"""Pool families: CPUs free and allocated, exclusive or shared, and VMs waiting for CPUs."""

from __future__ import annotations

from ..snapshot import Snapshot
from .family import Family, label


def build(snap: Snapshot) -> list[Family]:
    pools = sorted(snap.pools, key=lambda p: p.name)
    names = [label(p.name) for p in pools]
    cpus = Family("vcpud_pool_cpus", "gauge", "Online CPUs of a pool, free or allocated to VMs.", ("pool", "state"))
    exclusive = Family("vcpud_pool_exclusive", "gauge",
                       "1 for an exclusive pool (a CPU to at most one VM), 0 for a shared one.", ("pool",))
    waiting = Family("vcpud_pool_waiting_vms", "gauge", "VMs that want CPUs from this pool and have none yet.",
                     ("pool",))
    for p, name in zip(pools, names, strict=True):
        alloc = len(p.allocated & p.cpus)  # allocated is always empty for a shared pool
        cpus.add((name, "allocated"), alloc)
        cpus.add((name, "free"), len(p.cpus) - alloc)
        exclusive.add((name,), 1 if p.exclusive else 0)
        waiting.add((name,), p.waiting)
    return [cpus, exclusive, waiting]
