"""Small synthetic CPU topologies (NUMA nodes, SMT cores, L3 groups) for unit tests."""

from __future__ import annotations

from types import MappingProxyType

from vcpud.cpuset import CpuSet
from vcpud.topology import Cache, Cpu, Topology


def synth(cores_per_node=(4,), smt=2, l3_per_node=1, numa=True, offline=()) -> Topology:
    """x86-style numbering: thread k of core c is CPU c + k * (total cores)."""
    total = sum(cores_per_node)
    cpus = []
    core_nodes = [n for n, k in enumerate(cores_per_node) for _ in range(k)]
    first_core = {n: sum(cores_per_node[:n]) for n in range(len(cores_per_node))}

    def l3_group(c):
        n = core_nodes[c]
        per = max(1, cores_per_node[n] // l3_per_node)
        return n, min((c - first_core[n]) // per, l3_per_node - 1)

    groups: dict = {}
    for c in range(total):
        groups.setdefault(l3_group(c), []).append(c)
    l3_ids = {g: i for i, g in enumerate(sorted(groups))}
    for k in range(smt):
        for c in range(total):
            cpu = c + k * total
            sib = CpuSet.of(c + j * total for j in range(smt))
            shared = CpuSet.of(cc + j * total for cc in groups[l3_group(c)] for j in range(smt))
            cpus.append(Cpu(
                cpu=cpu, online=cpu not in offline, core_id=c, package_id=core_nodes[c],
                node=core_nodes[c] if numa else None, siblings=sib, core_cpus=sib,
                caches=(Cache(3, "Unified", None, shared, l3_ids[l3_group(c)]),),
            ))
    cpus.sort(key=lambda x: x.cpu)
    present = CpuSet.of(range(total * smt))
    online = present - CpuSet.of(offline)
    nodes = {}
    if numa:
        for x in cpus:
            nodes.setdefault(x.node, set()).add(x.cpu)
    return Topology(
        cpus=tuple(cpus), possible=present, present=present, online=online, offline=present - online,
        isolated=CpuSet(), nohz_full=CpuSet(),
        nodes=MappingProxyType({n: CpuSet.of(s) for n, s in nodes.items()}),
    )
