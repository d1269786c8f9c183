"""Exclusive CPU pools: vcpud.pools.allocate on small synthetic topologies (SMT modes, NUMA,
L3, priors, determinism)."""

from __future__ import annotations

from vcpud.cpuset import CpuSet
from vcpud.pools import Allocation, PlacementRule, PoolSpec, Request, allocate, free_cpus

from tests.synth_topology import synth
from tests.unit.pool_checks import check, held_all, node_of, placed, rule, with_online


def P(cpus: str, name="dedicated", exclusive=True) -> dict[str, PoolSpec]:
    return {name: PoolSpec(name, CpuSet.parse(cpus), exclusive)}


def R(key, vcpus, smt="any", numa="any", cache="any", t=1, emu=False, pool="dedicated") -> Request:
    return Request(key, f"vm-{key}", vcpus, t, rule(smt, numa, cache, pool), emu)


def test_synth_shape():
    topo = synth((2, 2), smt=2)
    assert topo.smt_threads_per_core == 2
    assert [str(c) for c in topo.cores] == ["0,4", "1,5", "2,6", "3,7"]
    assert topo.nodes[1] == CpuSet.parse("2-3,6-7")


def test_mirror_maps_guest_cores_onto_host_cores():
    topo = synth((4,), smt=2)  # cores 0,4 1,5 2,6 3,7
    a, f = allocate(topo, P("1-3,5-7"), [R("a", 4, "mirror", t=2)])
    assert not f
    assert a["a"].vcpus == (1, 5, 2, 6)
    assert a["a"].reasons[1].startswith(
        "pool dedicated, smt mirror: guest core 0 thread 1 -> CPU 5 of host core 1 (CPUs 1,5), node 0, L3 #0"
    )


def test_mirror_threads_one_gives_distinct_cores():
    topo = synth((4,), smt=2)
    a, _ = allocate(topo, P("0-7"), [R("a", 3, "mirror", t=1)])
    assert len({c % 4 for c in a["a"].vcpus}) == 3


def test_mirror_leaves_leftover_siblings_to_others():
    topo = synth((2,), smt=4)  # cores 0,2,4,6 and 1,3,5,7
    a, f = allocate(topo, P("0-7"), [R("a", 4, "mirror", t=2), R("b", 4, "mirror", t=2)])
    assert not f
    assert a["a"].vcpus == (0, 2, 1, 3) and a["b"].vcpus == (4, 6, 5, 7)


def test_mirror_needs_enough_free_siblings():
    topo = synth((2,), smt=2)  # cores 0,2 and 1,3
    a, f = allocate(topo, P("0-3"), [R("x", 1), R("y", 1), R("m", 2, "mirror", t=2)])
    assert a["x"].vcpus == (0,) and a["y"].vcpus == (2,)  # best fit: the half-used core first
    assert a["m"].vcpus == (1, 3) and not f
    # two CPUs free, but on different cores
    held = {"x": Allocation("x", "dedicated", (0,)), "y": Allocation("y", "dedicated", (1,))}
    a, f = allocate(topo, P("0-3"), [R("x", 1), R("y", 1), R("m", 2, "mirror", t=2)], held)
    assert f["m"].reason == ("pool 'dedicated' exhausted: needs 2 CPUs, 2 free "
                             "(smt mirror needs 1 host core with 2 free SMT siblings, 0 have them)")


def test_mirror_more_guest_threads_than_host_smt():
    topo = synth((4,), smt=2)
    a, f = allocate(topo, P("0-7"), [R("a", 4, "mirror", t=4)])
    assert not a and "4 threads per core" in f["a"].reason and "at most 2" in f["a"].reason


def test_mirror_with_partial_last_guest_core():
    topo = synth((4,), smt=2)
    a, f = allocate(topo, P("0-7"), [R("a", 3, "mirror", t=2)])
    assert not f
    v = a["a"].vcpus
    assert v[1] == v[0] + 4 and v[2] % 4 != v[0] % 4


def test_isolate_reserves_siblings():
    topo = synth((4,), smt=2)
    a, f = allocate(topo, P("0-7"), [R("a", 2, "isolate", emu=True), R("b", 1, "any")])
    al = a["a"]
    assert al.vcpus == (0, 1) and al.emulator == 2 and al.reserved == CpuSet.parse("4-6")
    assert a["b"].vcpus == (3,)
    assert "alone on host core" in al.reasons[0] and "emulator -> CPU 2" in al.reasons[2]


def test_isolate_needs_whole_free_cores():
    topo = synth((2,), smt=2)
    a, f = allocate(topo, P("0-3"), [R("x", 1), R("i", 2, "isolate")])
    assert "i" in f and "whole free core" in f["i"].reason
    a, f = allocate(topo, P("0-3"), [R("x", 1), R("i", 1, "isolate")])
    assert a["i"].vcpus == (1,) and a["i"].reserved == CpuSet.parse("3")


def test_isolate_uses_a_core_whose_sibling_is_offline():
    topo = synth((2,), smt=2, offline=(2,))  # core 0 has only CPU 0 online
    a, _ = allocate(topo, P("0-3"), [R("i", 1, "isolate")])
    assert a["i"].vcpus == (0,) and not a["i"].reserved  # best fit: nothing to waste


def test_full_cores_packs_and_reserves_the_rest():
    topo = synth((4,), smt=2)
    a, f = allocate(topo, P("0-7"), [R("a", 3, "full-cores"), R("b", 1, "any")])
    assert a["a"].vcpus == (0, 4, 1) and a["a"].reserved == CpuSet.parse("5")
    assert a["b"].vcpus == (2,)
    a, f = allocate(topo, P("0-7"), [R("a", 3, "full-cores", emu=True)])
    assert a["a"].vcpus == (0, 4, 1) and a["a"].emulator == 5 and not a["a"].reserved


def test_full_cores_never_shares_a_core():
    topo = synth((3,), smt=2)
    a, f = allocate(topo, P("0-5"), [R("x", 1, "any"), R("fc", 5, "full-cores")])
    assert "fc" in f and "whole free cores, which hold 4 CPUs" in f["fc"].reason
    a, f = allocate(topo, P("0-5"), [R("x", 1, "any"), R("fc", 3, "full-cores")])
    assert a["fc"].cpus == CpuSet.parse("1-2,4-5")


def test_full_cores_emulator_takes_a_whole_core_when_none_left_over():
    topo = synth((4,), smt=2)
    a, _ = allocate(topo, P("0-7"), [R("a", 2, "full-cores", emu=True)])
    assert a["a"].vcpus == (0, 4) and a["a"].emulator == 1 and a["a"].reserved == CpuSet.parse("5")


def test_any_is_compact():
    topo = synth((4,), smt=2)
    a, _ = allocate(topo, P("0-7"), [R("a", 3), R("b", 1), R("c", 2)])
    assert a["a"].vcpus == (0, 4, 1)
    assert a["b"].vcpus == (5,)  # fills the half-used core
    assert a["c"].vcpus == (2, 6)


def test_single_best_fit_node():
    topo = synth((4, 2), smt=2)  # node 0: cores 0-3 (CPUs 0-3,6-9); node 1: cores 4,5 (CPUs 4,5,10,11)
    a, f = allocate(topo, P("0-11"), [R("a", 2, "mirror", "single", t=2), R("b", 6, "any", "single")])
    assert set(a["a"].vcpus) == {4, 10}  # the fullest node that fits
    assert {node_of(topo, c) for c in a["b"].vcpus} == {0}


def test_single_does_not_fit_one_node():
    topo = synth((2, 2), smt=2)
    a, f = allocate(topo, P("0-7"), [R("a", 6, "any", "single")])
    assert not a
    assert "does not fit in one NUMA node" in f["a"].reason and "needs 6 CPUs" in f["a"].reason
    assert "node 0: 4" in f["a"].reason and "node 1: 4" in f["a"].reason
    a, f = allocate(topo, P("0-7"), [R("a", 6, "any", "any")])
    assert not f and len({node_of(topo, c) for c in a["a"].vcpus}) == 2


def test_single_counts_the_emulator():
    topo = synth((2, 2), smt=2)
    a, f = allocate(topo, P("0-7"), [R("a", 4, "any", "single", emu=True)])
    assert "does not fit in one NUMA node" in f["a"].reason
    a, f = allocate(topo, P("0-7"), [R("a", 3, "any", "single", emu=True)])
    assert len({node_of(topo, c) for c in placed(a["a"])}) == 1


def test_exhausted_and_failure_takes_nothing():
    topo = synth((2,), smt=2)
    a, f = allocate(topo, P("0-3"), [R("a", 3), R("big", 2), R("c", 1)])
    assert f["big"].reason == "pool 'dedicated' exhausted: needs 2 CPUs, 1 free"
    assert a["c"].vcpus == (3,)


def test_spread_balances_nodes():
    topo = synth((2, 2, 2), smt=2)
    a, _ = allocate(topo, P("0-11"), [R("a", 4, "any", "spread")])
    counts = sorted(sum(1 for c in a["a"].vcpus if node_of(topo, c) == n) for n in range(3))
    assert counts == [1, 1, 2]
    a, _ = allocate(topo, P("0-11"), [R("a", 4, "mirror", "spread", t=2)])
    assert sorted({node_of(topo, c) for c in a["a"].vcpus}) == [0, 1]


def test_spread_over_full_nodes():
    topo = synth((2, 2), smt=2)
    a, f = allocate(topo, P("0-7"), [R("x", 3, "any", "single"), R("s", 4, "any", "spread")])
    assert not f
    nodes = [node_of(topo, c) for c in a["s"].vcpus]
    assert nodes.count(0) == 1 and nodes.count(1) == 3


def test_any_numa_prefers_one_node():
    topo = synth((2, 2), smt=2)
    a, _ = allocate(topo, P("0-7"), [R("a", 3)])
    assert len({node_of(topo, c) for c in a["a"].vcpus}) == 1


def test_l3_preference():
    topo = synth((4,), smt=2, l3_per_node=2)  # L3 #0: cores 0,1; L3 #1: cores 2,3
    a, _ = allocate(topo, P("1-7"), [R("a", 4, "mirror", "single", "l3", t=1)])
    # fits one L3 domain only if it can use two cores: 4 guest cores need 4 host cores -> spans
    assert len(a["a"].vcpus) == 4
    a, _ = allocate(topo, P("1-7"), [R("a", 2, "mirror", "single", "l3", t=1)])
    assert a["a"].vcpus == (4, 1)  # best fit: the L3 domain with fewer free CPUs that fits
    # L3 #0 holds CPUs 4,5 only: 3 vCPUs fit in L3 #1 alone
    a, _ = allocate(topo, P("2-7"), [R("a", 3, "any", "single", "l3")])
    assert a["a"].vcpus == (2, 6, 3)
    a, _ = allocate(topo, P("2-7"), [R("a", 3, "any", "single", "any")])
    assert a["a"].vcpus == (4, 2, 6)  # no cache preference: just compact


def test_l3_emulator_stays_near():
    topo = synth((4,), smt=2, l3_per_node=2)
    a, _ = allocate(topo, P("0-7"), [R("x", 1), R("a", 2, "mirror", "single", "l3", t=2, emu=True)])
    assert a["x"].vcpus == (0,)
    # L3 #0 (CPUs 0,1,4,5) is the best fit for the vCPUs; the emulator takes its last CPU
    assert a["a"].vcpus == (1, 5) and a["a"].emulator == 4
    assert a["a"].reasons[2].endswith("node 0, L3 #0")


def test_no_numa_information_is_one_node():
    topo = synth((2, 2), smt=2, numa=False)
    a, f = allocate(topo, P("0-7"), [R("a", 6, "mirror", "single", t=2), R("b", 2, "any", "spread")])
    assert not f and len(a["a"].vcpus) == 6
    assert all(", node" not in r and ", L3 #" in r for r in a["a"].reasons)


def test_bad_requests():
    topo = synth((2,), smt=2)
    pools = {**P("0-3"), **P("0-3", "shared", exclusive=False)}
    reqs = [
        R("u", 1, pool="nope"), R("s", 1, pool="shared"), R("z", 0),
        Request("m", "vm-m", 1, 1, PlacementRule("dedicated", "weird")),
        Request("n", "vm-n", 1, 1, PlacementRule("dedicated", "any", "everywhere")),
        Request("c", "vm-c", 1, 1, PlacementRule("dedicated", cache="l2")),
        Request("t", "vm-t", 2, 0, PlacementRule("dedicated", "mirror")),
    ]
    a, f = allocate(topo, pools, reqs)
    assert not a and list(f) == ["u", "s", "z", "m", "n", "c", "t"]
    assert "unknown pool 'nope'" in f["u"].reason
    assert "not exclusive" in f["s"].reason
    assert "weird" in f["m"].reason and "everywhere" in f["n"].reason and "l2" in f["c"].reason


def test_duplicate_keys():
    topo = synth((2,), smt=2)
    a, f = allocate(topo, P("0-3"), [R("a", 1), R("a", 2)])
    assert a["a"].vcpus == (0,) and not f


def test_pool_cpus_offline_are_not_used():
    topo = synth((2,), smt=2, offline=(0,))
    a, f = allocate(topo, P("0-3"), [R("a", 3)])
    assert 0 not in a["a"].vcpus and len(a["a"].vcpus) == 3


def test_two_pools_never_double_book():
    topo = synth((4,), smt=2)
    pools = {**P("0-7", "a"), **P("2-3,6-7", "b")}
    al, f = allocate(topo, pools, [R("x", 7, pool="a"), R("y", 2, pool="b")])
    assert "y" in f and "1 free" in f["y"].reason


# --- priors -------------------------------------------------------------------------------


def test_prior_kept_exactly():
    topo = synth((6,), smt=2)
    pools = P("0-7")
    reqs = [R("a", 2, "mirror", t=2), R("b", 2, "isolate", emu=True)]
    first, _ = allocate(topo, pools, reqs)
    # in a different order and with a newcomer first, both stay put
    again, _ = allocate(topo, pools, [R("new", 2)] + reqs[::-1], first)
    assert again["a"] is first["a"] and again["b"] is first["b"]
    assert not set(again["new"].vcpus) & (held_all(first))


def test_prior_honoured_before_new_requests():
    topo = synth((2,), smt=2)
    old = Allocation("b", "dedicated", (3,), reasons=("x",))
    a, f = allocate(topo, P("0-3"), [R("a", 4), R("b", 1)], {"b": old})
    assert a["b"] is old and "a" in f


def test_prior_invalidated():
    topo = synth((4,), smt=2)
    pools = P("0-7")
    req = R("a", 2, "mirror", t=2)
    first, _ = allocate(topo, pools, [req])
    a0 = first["a"]
    # one of its CPUs went offline
    gone = with_online(topo, topo.online.cpus - {a0.vcpus[1]})
    moved, _ = allocate(gone, pools, [req], first)
    assert moved["a"] != a0 and a0.vcpus[1] not in moved["a"].cpus
    # left the pool
    moved, _ = allocate(topo, P("1-3,5-7"), [req], first)
    assert moved["a"] != a0
    # the request changed: more vCPUs, an emulator CPU, another SMT mode, another pool
    for changed in (R("a", 4, "mirror", t=2), R("a", 2, "mirror", t=2, emu=True), R("a", 2, "isolate"),
                    R("a", 2, "mirror", t=2, pool="other")):
        pools2 = {**pools, **P("0-7", "other")}
        again, f = allocate(topo, pools2, [changed], first)
        assert again["a"] is not a0
        check(topo, pools2, [changed], again, f)
    # guest threads changed so the prior no longer mirrors them
    again, _ = allocate(topo, pools, [R("a", 2, "mirror", t=1)], first)
    assert len({c % 4 for c in again["a"].vcpus}) == 2
    # numa single and the prior spans nodes
    t2 = synth((2, 2), smt=2)
    spans = Allocation("a", "dedicated", (0, 2))
    again, _ = allocate(t2, P("0-7"), [R("a", 2, numa="single")], {"a": spans})
    assert again["a"] != spans and len({node_of(t2, c) for c in again["a"].vcpus}) == 1
    again, _ = allocate(t2, P("0-7"), [R("a", 2, numa="any")], {"a": spans})
    assert again["a"] is spans


def test_prior_taken_by_earlier_prior():
    topo = synth((4,), smt=2)
    p = {"a": Allocation("a", "dedicated", (0, 1)), "b": Allocation("b", "dedicated", (1, 2))}
    a, f = allocate(topo, P("0-7"), [R("a", 2), R("b", 2)], p)
    assert a["a"] is p["a"] and a["b"] != p["b"] and not set(a["b"].vcpus) & {0, 1}


def test_isolate_sibling_coming_online_stays_reserved():
    topo = synth((2,), smt=2, offline=(2,))  # core 0 is just CPU 0 for now
    pools = P("0-3")
    first, _ = allocate(topo, pools, [R("i", 1, "isolate")])
    assert first["i"].vcpus == (0,)
    back = with_online(topo, topo.online.cpus | {2})
    a, f = allocate(back, pools, [R("i", 1, "isolate"), R("x", 3)], first)
    assert a["i"] is first["i"]
    assert "x" in f  # CPU 2 shares core 0 with the isolated VM: not for anyone else
    a, f = allocate(back, pools, [R("i", 1, "isolate"), R("x", 2)], first)
    assert set(a["x"].vcpus) == {1, 3}


def test_deterministic_whatever_the_dict_order():
    topo = synth((4, 4), smt=2, l3_per_node=2)
    pools = {**P("1-15"), **P("0-15", "other", exclusive=False)}
    reqs = [R(i, 1 + i % 5, ["any", "mirror", "isolate", "full-cores"][i % 4],
              ["single", "spread", "any"][i % 3], ["l3", "any"][i % 2], t=1 + i % 2, emu=i % 2 == 1)
            for i in range(8)]
    a1, f1 = allocate(topo, pools, reqs)
    a2, f2 = allocate(topo, dict(reversed(list(pools.items()))), reqs)
    assert (a1, f1) == (a2, f2)
    prior = dict(list(a1.items())[:4])
    b1 = allocate(topo, pools, reqs, prior)
    b2 = allocate(topo, pools, reqs, dict(reversed(list(prior.items()))))
    assert b1 == b2
    check(topo, pools, reqs, a1, f1)


def test_reasons_one_per_cpu():
    topo = synth((2, 2), smt=2, l3_per_node=1)
    a, _ = allocate(topo, P("0-7"), [R("a", 2, "full-cores", "single", "l3", emu=True)])
    r = a["a"].reasons
    assert len(r) == 3
    assert r[0] == "pool dedicated, smt full-cores: vCPU 0 -> CPU 0 of whole host core 0 (CPUs 0,4), node 0, L3 #0"
    assert r[2].startswith("pool dedicated, smt full-cores: emulator -> CPU 1 of whole host core 1 (CPUs 1,5)")


def test_free_cpus():
    topo = synth((2,), smt=2, offline=(3,))
    pools = {**P("0-3"), **P("0-3", "shared", exclusive=False)}
    a, _ = allocate(topo, pools, [R("a", 1, "isolate")])
    assert a["a"].vcpus == (1,) and not a["a"].reserved  # core 1,3 has CPU 3 offline: nothing to reserve
    assert free_cpus(pools, topo, a) == {"dedicated": CpuSet.parse("0,2")}
    assert free_cpus(pools, topo, list(a.values())) == {"dedicated": CpuSet.parse("0,2")}
