"""Shared helpers for the vcpud.pools.allocate tests: the invariants every result must satisfy
and small views of a topology (cores, nodes, what an allocation holds)."""

from __future__ import annotations

import dataclasses

from vcpud.cpuset import CpuSet
from vcpud.pools import Allocation, Failure, PlacementRule, PoolSpec
from vcpud.topology import Topology


def core_of(topo: Topology, cpu: int) -> frozenset[int]:
    """The host core (online SMT siblings) of an online CPU, as the test sees it."""
    c = next(x for x in topo.cpus if x.cpu == cpu)
    return frozenset((c.siblings.cpus | {cpu}) & topo.online.cpus)


def node_of(topo: Topology, cpu: int):
    return next(x for x in topo.cpus if x.cpu == cpu).node


def placed(a: Allocation) -> list[int]:
    return list(a.vcpus) + ([a.emulator] if a.emulator is not None else [])


def housekeeping_pool(topo: Topology, name: str = "dedicated") -> PoolSpec:
    """All online CPUs but the first core (left to the host)."""
    first = core_of(topo, min(topo.online.cpus))
    return PoolSpec(name, CpuSet(topo.online.cpus - first), exclusive=True)


def with_online(topo: Topology, online: frozenset[int]) -> Topology:
    online_set = CpuSet(frozenset(online))
    return dataclasses.replace(
        topo,
        online=online_set,
        offline=topo.present - online_set,
        cpus=tuple(dataclasses.replace(c, online=c.cpu in online) for c in topo.cpus),
    )


def check(topo: Topology, pools, requests, allocs, fails, fresh: bool = True) -> None:
    """What every result must satisfy. fresh: no CPU came online since the priors were made
    (a sibling that comes online next to an isolate / full-cores VM is not added to a kept
    allocation; it stays unused instead, which the last loop checks)."""
    by_key = {r.key: r for r in requests}
    assert set(allocs) | set(fails) == set(by_key)
    assert not set(allocs) & set(fails)
    owner: dict[int, object] = {}
    core_owner: dict[frozenset[int], object] = {}
    for k, a in allocs.items():
        req = by_key[k]
        assert a.key == k and a.pool == req.rule.pool
        assert len(a.vcpus) == req.vcpus
        assert (a.emulator is not None) == req.emulator_isolate
        held = placed(a) + sorted(a.reserved)
        assert len(set(held)) == len(held), f"{k} holds a CPU twice: {a}"
        usable = pools[req.rule.pool].cpus.cpus & topo.online.cpus
        for cpu in held:
            assert cpu in usable, f"{k}: CPU {cpu} is offline or outside pool {req.rule.pool}"
            assert cpu not in owner, f"CPU {cpu} given to both {owner[cpu]} and {k}"
            owner[cpu] = k
        smt = req.rule.smt
        if smt == "mirror":
            t = req.threads_per_core
            hosts = []
            for j in range(0, len(a.vcpus), t):
                group = a.vcpus[j : j + t]
                host = core_of(topo, group[0])
                assert set(group) <= host, f"{k}: guest core {j // t} {group} is not on one host core"
                hosts.append(host)
            assert len(set(hosts)) == len(hosts), f"{k}: two guest cores share a host core"
            assert not a.reserved
        elif smt == "any":
            assert not a.reserved
        if smt in ("isolate", "full-cores") and fresh:
            cores = {core_of(topo, c) for c in held}
            # the VM holds every pool CPU of the cores it touches: no sibling is left for another VM
            for core in cores:
                assert core & usable <= set(held), f"{k}: core {sorted(core)} not held whole"
        if smt == "isolate":
            pc = [core_of(topo, c) for c in placed(a)]
            assert len(set(pc)) == len(pc), f"{k}: two threads on one core under smt isolate"
            for c in a.reserved:
                assert core_of(topo, c) in pc
        if smt in ("isolate", "full-cores"):
            for core in {core_of(topo, c) for c in held}:
                assert core not in core_owner, f"core {sorted(core)} shared by {core_owner[core]} and {k}"
                core_owner[core] = k
        if req.rule.numa == "single":
            assert len({node_of(topo, c) for c in placed(a)}) == 1, f"{k}: numa single spans nodes: {a}"
        assert len(a.reasons) == len(placed(a))
    # cores held by isolate / full-cores VMs carry nobody else's CPU
    for core, k in core_owner.items():
        for cpu in core:
            assert owner.get(cpu, k) == k, f"CPU {cpu} of {k}'s exclusive core given to {owner.get(cpu)}"
    for f in fails.values():
        assert isinstance(f, Failure) and f.reason


def node_cores(topo: Topology, pool: PoolSpec, taken: set[int]):
    """node -> [(core, free pool CPUs of it)]"""
    usable = pool.cpus.cpus & topo.online.cpus
    out: dict = {}
    for core in {core_of(topo, c) for c in usable}:
        out.setdefault(node_of(topo, min(core)), []).append((core, core & usable - taken))
    return out


def held_all(allocs) -> set[int]:
    return set().union(*(a.cpus.cpus for a in allocs.values())) if allocs else set()


def rule(smt="any", numa="any", cache="any", pool="dedicated") -> PlacementRule:
    return PlacementRule(pool, smt, numa, cache)
