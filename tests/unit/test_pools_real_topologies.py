"""Exclusive CPU pools: vcpud.pools.allocate on real machines' topologies (filling a pool past
exhaustion, and a hypothesis property test of arrivals, departures and CPU hotplug)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vcpud.cpuset import CpuSet
from vcpud.pools import PoolSpec, Request, allocate
from vcpud.topology import Topology, read_topology

from tests.conftest import DUMPS, SHARED_TOPOLOGIES, skip_or_fail
from tests.unit.pool_checks import check, core_of, held_all, housekeeping_pool, node_cores, node_of, rule, with_online

SMT_DUMPS = ["x86_64-64cpu", "x86_64-dell_e4310", "ppc64-POWER7-64cpu", "vmware_fpe"]
PROPERTY_DUMPS = ["x86_64-64cpu", "ppc64-POWER7-64cpu", "x86_64-dell_e4310"]


@pytest.fixture(scope="session")
def topo_of(unpacked):
    cache: dict[str, Topology] = {}

    def get(name: str) -> Topology:
        if name not in DUMPS:
            skip_or_fail(f"topology dump {name!r} not found in {SHARED_TOPOLOGIES.resolve()}")
        if name not in cache:
            cache[name] = read_topology(unpacked(name))
        return cache[name]

    return get


# --- real topologies: fill a pool past exhaustion -------------------------------------------


def test_smt_dumps_present():
    for name in SMT_DUMPS:
        if name not in DUMPS:
            skip_or_fail(f"topology dump {name!r} not found in {SHARED_TOPOLOGIES.resolve()}")


def test_fill_mirror_single(dump, topo_of):
    name, _ = dump
    topo = topo_of(name)
    t = 2 if topo.smt_threads_per_core >= 2 else 1
    pool = housekeeping_pool(topo)
    pools = {"dedicated": pool}
    size = len(pool.cpus)
    # more 2-vCPU requests than the pool could ever hold: the tail must fail
    reqs = [
        Request(("vm", i), f"db-{i}", [2, 4, 6, 8][i % 4], t, rule("mirror", "single", "l3"))
        for i in range(4 * (size // 2 + 2))
    ]
    allocs, fails = allocate(topo, pools, reqs)
    check(topo, pools, reqs, allocs, fails)
    assert fails, "the pool never ran out"
    assert all(r.key in fails for r in reqs[-4:]), "the last requests should find the pool exhausted"
    for f in fails.values():
        assert "exhausted" in f.reason or "does not fit in one NUMA node" in f.reason, f.reason
    # no false failure: free space only shrinks in one call, so a request that failed
    # must still have no node with enough host cores of t free siblings at the end.
    by_node = node_cores(topo, pool, held_all(allocs))
    for r in reqs:
        if r.key in fails:
            g = -(-r.vcpus // t)
            for node, cores in by_node.items():
                fit = sum(1 for _, free in cores if len(free) >= t)
                assert fit < g, f"{name}: {r.name} failed ({fails[r.key].reason}) but node {node} has {fit} cores"
    if topo.smt_threads_per_core >= 2:
        assert allocs, f"{name}: nothing allocated"
        assert any(len(set(core_of(topo, c) for c in a.vcpus)) < len(a.vcpus) for a in allocs.values())


@pytest.mark.parametrize("smt", ["isolate", "full-cores"])
def test_fill_whole_cores(dump, topo_of, smt):
    name, _ = dump
    topo = topo_of(name)
    pool = housekeeping_pool(topo)
    pools = {"dedicated": pool}
    reqs = [
        Request(("vm", i), f"db-{i}", [1, 2, 3, 4][i % 4], 1, rule(smt, "single", "l3"), emulator_isolate=i % 3 == 0)
        for i in range(len(pool.cpus) + 8)
    ]
    allocs, fails = allocate(topo, pools, reqs)
    check(topo, pools, reqs, allocs, fails)
    assert fails and all(r.key in fails for r in reqs[-4:])
    if topo.smt_threads_per_core >= 2 and smt == "isolate" and allocs:
        assert any(a.reserved for a in allocs.values()), "isolate reserved no sibling on an SMT host"
    by_node = node_cores(topo, pool, held_all(allocs))
    for r in reqs:
        if r.key in fails:
            want = r.vcpus + r.emulator_isolate
            for node, cores in by_node.items():
                whole = [core & pool.cpus.cpus for core, free in cores if free == core & pool.cpus.cpus]
                have = len(whole) if smt == "isolate" else sum(len(c) for c in whole)
                assert have < want, f"{name}: {r.name} failed ({fails[r.key].reason}) but node {node} could hold it"


@pytest.mark.parametrize("variant", [("any", 1), ("mirror", 2)])
def test_spread_balanced(dump, topo_of, variant):
    """Each spread VM's units (vCPUs, or guest cores for mirror) differ by at most one between
    the pool's nodes, unless the node with fewer had no room left."""
    name, _ = dump
    topo = topo_of(name)
    smt, t = variant
    t = min(t, topo.smt_threads_per_core)
    pool = housekeeping_pool(topo)
    pools = {"dedicated": pool}
    nodes = sorted({node_of(topo, c) for c in pool.cpus}, key=lambda n: -1 if n is None else n)
    reqs: list[Request] = []
    allocs: dict = {}
    for i in range(len(pool.cpus) // 2 + 4):
        reqs.append(Request(i, f"vm{i}", [2, 4, 6, 8, 3][i % 5] if t == 1 else [2, 4, 6, 8][i % 4], t,
                            rule(smt, "spread")))
        new, fails = allocate(topo, pools, reqs, allocs)
        check(topo, pools, reqs, new, fails)
        for k, a in allocs.items():
            assert new[k] is a
        allocs = new
        if i not in allocs:
            continue
        units = {n: 0 for n in nodes}
        for j in range(0, len(allocs[i].vcpus), t):
            units[node_of(topo, allocs[i].vcpus[j])] += 1
        top = max(units.values())
        by_node = node_cores(topo, pool, held_all(allocs))
        for n, u in units.items():
            if u < top - 1:
                room = sum(1 for _, free in by_node[n] if len(free) >= t)
                assert room == 0, f"{name}: vm{i} spread {units} although node {n} had room"


# --- real topologies: arrivals, departures, CPU hotplug --------------------------------------

VARIANTS = [
    # (smt, numa, cache, guest threads per core)
    ("mirror", "single", "l3", 2),
    ("mirror", "spread", "any", 1),
    ("mirror", "any", "l3", 4),
    ("isolate", "any", "l3", 1),
    ("full-cores", "single", "any", 2),
    ("any", "any", "l3", 1),
    ("any", "spread", "any", 1),
]

STATS = {"steps": 0, "allocated": 0, "failed": 0, "moved": 0}  # what the property test exercised

ARRIVE = st.tuples(
    st.just("arrive"), st.integers(1, 12), st.integers(0, len(VARIANTS) - 1), st.booleans(), st.booleans()
)
EVENT = st.one_of(
    ARRIVE, ARRIVE, ARRIVE,  # arrivals outnumber the rest, so pools do fill up
    st.tuples(st.just("depart"), st.integers(0, 10**6)),
    st.tuples(st.just("offline"), st.integers(0, 10**6)),
    st.tuples(st.just("online"), st.integers(0, 10**6)),
)


@pytest.mark.parametrize("name", PROPERTY_DUMPS)
def test_arrivals_departures_hotplug(topo_of, name):
    topo = topo_of(name)
    width = topo.smt_threads_per_core
    base = housekeeping_pool(topo)
    upper = sorted(base.cpus)[len(base.cpus) // 2 :]
    pools = {
        "dedicated": PoolSpec("dedicated", base.cpus | (topo.present - topo.online), exclusive=True),
        # overlaps "dedicated": allocations from both must still never share a CPU
        "upper": PoolSpec("upper", CpuSet.of(upper), exclusive=True),
    }
    keep_online = core_of(topo, min(topo.online.cpus))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(events=st.lists(EVENT, min_size=8, max_size=60))
    def run(events):
        online = set(topo.online.cpus)
        live: dict[int, Request] = {}
        prev: dict = {}
        serial = 0
        for ev in events:
            before = frozenset(online)
            if ev[0] == "arrive":
                _, size, v, emu, upper_pool = ev
                smt, numa, cache, t = VARIANTS[v]
                t = min(t, width)
                size = max(size - size % t, t) if smt == "mirror" else size
                live[serial] = Request(serial, f"vm{serial}", size, t,
                                       rule(smt, numa, cache, "upper" if upper_pool else "dedicated"), emu)
                serial += 1
            elif ev[0] == "depart" and live:
                del live[sorted(live)[ev[1] % len(live)]]
            elif ev[0] == "offline":
                cands = sorted(online - keep_online)
                if len(cands) > 1:
                    online.discard(cands[ev[1] % len(cands)])
            elif ev[0] == "online":
                cands = sorted(topo.present.cpus - online)
                if cands:
                    online.add(cands[ev[1] % len(cands)])
            now = with_online(topo, frozenset(online))
            reqs = list(live.values())
            prior = {k: a for k, a in prev.items() if k in live}
            allocs, fails = allocate(now, pools, reqs, prior)
            assert (allocs, fails) == allocate(now, pools, reqs, prior), "not deterministic"
            check(now, pools, reqs, allocs, fails, fresh=False)
            for k, a in prior.items():
                if a.cpus.cpus <= online:
                    assert allocs.get(k) is a, f"{k} moved though all its CPUs stayed: {a} -> {allocs.get(k)}"
                else:
                    assert ev[0] == "offline" and a.cpus.cpus <= before  # only an offline event moves it
                    STATS["moved"] += 1
            STATS["steps"] += 1
            STATS["allocated"] += len(allocs)
            STATS["failed"] += len(fails)
            prev = allocs

    run()
