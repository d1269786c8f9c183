from vcpud.cpuset import CpuSet
from vcpud.discovery import classify
from vcpud.placement import plan, plan_vm, rule_for
from vcpud.config import Config, Match, Policy

from tests.unit.test_discovery import CORE8, NODBG, NODBG_FDS, NODBG_SYSCALLS

C = CpuSet.parse
ONLINE = C("0-7")


def test_precedence_vcpus():
    pol = Policy(name="p", vcpupin={0: C("4")}, vcpus=C("5-6"), affinity=C("7"), emulatorpin=C("1"),
                 iothreadpin=C("2"), iothreadpin_by_id={"io1": C("3")})
    vm = classify(CORE8)
    got = {a.label: (a.rule, a.cpus.format()) for a in plan_vm(vm, pol, ONLINE, Config()).assignments}
    assert got["vcpu 0"] == ("vcpupin[0]", "4")
    assert got["vcpu 1"] == ("vcpus", "5-6")
    assert got["iothread io1"] == ("iothreadpin[io1]", "3")
    assert got["emulator"] == ("emulatorpin", "1")
    assert got["vhost"] == ("affinity", "7")   # no vhostpin: affinity
    assert "kernel" not in got                 # kernel workers are never pinned


def test_affinity_covers_every_role_but_kernel():
    vm = classify(CORE8)
    vp = plan_vm(vm, Policy(name="w", affinity=C("0")), ONLINE, Config())
    roles = {a.role.value for a in vp.assignments}
    assert roles == {"vcpu", "iothread", "emulator", "vhost"}
    assert all(a.cpus == C("0") and a.rule == "affinity" for a in vp.assignments)
    assert len(vp.assignments) == len(vm.threads) - 1


def test_role_without_rule_is_left_alone():
    vm = classify(CORE8)
    vp = plan_vm(vm, Policy(name="only-vcpu0", vcpupin={0: C("1")}), ONLINE, Config())
    assert [(a.label, a.cpus.format()) for a in vp.assignments] == [("vcpu 0", "1")]


def test_unknown_threads_never_pinned():
    vm = classify(NODBG, {4203: "running"}, NODBG_FDS)
    vp = plan_vm(vm, Policy(name="all", affinity=C("1")), ONLINE, Config())
    assert {a.label for a in vp.assignments} == {"emulator"}  # only the main thread is sure


def test_offline_cpus():
    vm = classify(NODBG, NODBG_SYSCALLS, NODBG_FDS)
    vp = plan_vm(vm, Policy(name="p", vcpupin={0: C("9"), 1: C("1,9")}), C("0-1"), Config())
    assert [(a.label, a.cpus.format()) for a in vp.assignments] == [("vcpu 1", "1")]
    assert len(vp.problems) == 1 and "vcpu 0" in vp.problems[0] and "not online" in vp.problems[0]


def test_first_matching_policy_wins_and_unmatched_left_alone():
    cfg = Config(policies=(Policy(name="a", match=Match(name="core*"), affinity=C("1")),
                           Policy(name="b", match=Match(), affinity=C("2"))))
    p = plan(cfg, [classify(CORE8), classify(NODBG, NODBG_SYSCALLS, NODBG_FDS)], ONLINE)
    assert [v.policy for v in p.vms] == ["a", "b"]
    p2 = plan(Config(policies=(cfg.policies[0],)), [classify(NODBG, NODBG_SYSCALLS, NODBG_FDS)], ONLINE)
    assert p2.vms[0].policy is None and p2.vms[0].assignments == ()
    assert p.by_tid()[4142] == C("1")


def test_rule_for_kernel_is_none():
    vm = classify(CORE8)
    k = [t for t in vm.threads if t.role.value == "kernel"][0]
    assert rule_for(Policy(name="x", affinity=C("0")), k) is None


# --- pools -----------------------------------------------------------------------------------
import dataclasses  # noqa: E402

from vcpud.procfs import ProcessSnapshot, ThreadSnapshot  # noqa: E402
from vcpud.placement import adopt, arrival_order  # noqa: E402
from vcpud.config import parse_config_text  # noqa: E402
from tests.synth_topology import synth  # noqa: E402


def guest(pid, name, vcpus=2, affinity=None, start=None):
    """A debug-threads guest: main thread + vCPU threads, each with the given affinity."""
    aff = affinity or {}
    threads = [ThreadSnapshot(pid, "qemu-system-x86", "S", 138412480, 0, 0, 0, 1, aff.get("main", C("0-15")))]
    threads += [ThreadSnapshot(pid + 1 + i, f"CPU {i}/KVM", "S", 138412224, 0, 0, 0, 1, aff.get(i, C("0-15")))
                for i in range(vcpus)]
    snap = ProcessSnapshot(pid=pid, starttime=start or pid, comm="qemu-system-x86", exe="/usr/bin/qemu-system-x86_64",
                           cmdline=("qemu-system-x86_64", "-name", f"guest={name},debug-threads=on",
                                    "-smp", str(vcpus)), uid=0, threads=tuple(threads))
    return classify(snap)


POOLS = """\
pools:
  dedicated: {{cpus: "{dedicated}", exclusive: true}}
  shared: {{cpus: "0,8"}}
policies:
  - name: db
    match: {{name: "db*"}}
    vcpus: {{pool: dedicated}}
    emulatorpin: {{pool: shared}}
    on_exhausted: shared
"""


def test_reload_that_shrinks_a_pool_moves_only_the_vms_that_must():
    topo = synth(cores_per_node=(8,), smt=2)  # CPUs 0-15, core c = {c, c+8}
    vms = [guest(100, "db1"), guest(200, "db2"), guest(300, "db3")]
    before = parse_config_text(POOLS.format(dedicated="1-7,9-15"))
    p1 = plan(before, vms, topo.online, topo)
    held = {vm.pid: p1.allocations[vm.key].vcpus for vm in vms}
    assert len({c for v in held.values() for c in v}) == 6
    # take away exactly the CPUs db2 holds
    shrunk = parse_config_text(POOLS.format(dedicated=(CpuSet.parse("1-7,9-15") - CpuSet.of(held[200])).format()))
    p2 = plan(shrunk, vms, topo.online, topo, prior=p1.allocations)
    assert p2.allocations[vms[0].key] is p1.allocations[vms[0].key]
    assert p2.allocations[vms[2].key] is p1.allocations[vms[2].key]
    assert p2.allocations[vms[1].key].vcpus != held[200]
    assert not set(p2.allocations[vms[1].key].vcpus) & set(held[200])


def test_emulator_never_on_isolated_cpus_through_a_pool():
    topo = dataclasses.replace(synth(cores_per_node=(8,), smt=2), isolated=CpuSet.parse("8"))
    cfg = parse_config_text(POOLS.format(dedicated="1-7,9-15"))
    vp = plan(cfg, [guest(100, "db1")], topo.online, topo).vms[0]
    emu = {a.label: a for a in vp.assignments}["emulator"]
    assert emu.cpus == C("0")  # the shared pool is 0,8 but 8 is isolated
    assert vp.status == "placed"


def test_exhausted_vm_floats_over_on_exhausted_pool_and_emulator_follows():
    topo = synth(cores_per_node=(8,), smt=2)
    cfg = parse_config_text(POOLS.format(dedicated="1-2"))
    p = plan(cfg, [guest(100, "db1"), guest(200, "db2")], topo.online, topo)
    first, second = p.vms
    assert first.status == "placed" and second.status == "floating"
    assert "exhausted" in second.reason
    assert {a.label: a.cpus for a in second.assignments}["vcpu 0"] == C("0,8")


def test_adopt_from_live_affinities_never_twice():
    topo = synth(cores_per_node=(8,), smt=2)
    cfg = parse_config_text(POOLS.format(dedicated="1-7,9-15"))
    a = guest(100, "db1", affinity={0: C("3"), 1: C("4")})
    b = guest(200, "db2", affinity={0: C("4"), 1: C("5")})   # claims 4 too: younger, not adopted
    c = guest(300, "db3", affinity={0: C("6"), 1: C("0")})   # 0 is outside the pool
    d = guest(400, "db4", affinity={0: C("9"), 1: C("10")})
    got = adopt(cfg, [d, c, b, a], topo.online)
    assert {k[0]: v.vcpus for k, v in got.items()} == {100: (3, 4), 400: (9, 10)}
    assert [vm.pid for vm in arrival_order([d, c, b, a])] == [100, 200, 300, 400]


def test_adopt_isolate_holds_the_siblings():
    topo = synth(cores_per_node=(8,), smt=2)
    cfg = parse_config_text(POOLS.format(dedicated="1-7,9-15").replace("{pool: dedicated}",
                                                                        "{pool: dedicated, smt: isolate}"))
    a = guest(100, "db1", affinity={0: C("3"), 1: C("4")})
    b = guest(200, "db2", affinity={0: C("11"), 1: C("5")})  # 11 is 3's sibling, held for db1
    got = adopt(cfg, [a, b], topo.online, topo)
    assert got[a.key].reserved == C("11-12")
    assert b.key not in got
