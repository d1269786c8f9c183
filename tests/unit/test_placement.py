from vcpud.cpuset import CpuSet
from vcpud.discovery import classify
from vcpud.placement import plan, plan_vm, rule_for
from vcpud.policy import Config, Match, Policy

from tests.unit.test_discovery import CORE8, NODBG, NODBG_FDS, NODBG_SYSCALLS

C = CpuSet.parse
ONLINE = C("0-7")


def test_precedence_vcpus():
    pol = Policy(name="p", vcpupin={0: C("4")}, vcpus=C("5-6"), affinity=C("7"), emulatorpin=C("1"),
                 iothreadpin=C("2"), iothreadpin_by_id={"io1": C("3")})
    vm = classify(CORE8)
    got = {a.label: (a.rule, a.cpus.format()) for a in plan_vm(vm, pol, ONLINE).assignments}
    assert got["vcpu 0"] == ("vcpupin[0]", "4")
    assert got["vcpu 1"] == ("vcpus", "5-6")
    assert got["iothread io1"] == ("iothreadpin[io1]", "3")
    assert got["emulator"] == ("emulatorpin", "1")
    assert got["vhost"] == ("affinity", "7")   # no vhostpin: affinity
    assert "kernel" not in got                 # kernel workers are never pinned


def test_affinity_covers_every_role_but_kernel():
    vm = classify(CORE8)
    vp = plan_vm(vm, Policy(name="w", affinity=C("0")), ONLINE)
    roles = {a.role.value for a in vp.assignments}
    assert roles == {"vcpu", "iothread", "emulator", "vhost"}
    assert all(a.cpus == C("0") and a.rule == "affinity" for a in vp.assignments)
    assert len(vp.assignments) == len(vm.threads) - 1


def test_role_without_rule_is_left_alone():
    vm = classify(CORE8)
    vp = plan_vm(vm, Policy(name="only-vcpu0", vcpupin={0: C("1")}), ONLINE)
    assert [(a.label, a.cpus.format()) for a in vp.assignments] == [("vcpu 0", "1")]


def test_unknown_threads_never_pinned():
    vm = classify(NODBG, {4203: "running"}, NODBG_FDS)
    vp = plan_vm(vm, Policy(name="all", affinity=C("1")), ONLINE)
    assert {a.label for a in vp.assignments} == {"emulator"}  # only the main thread is sure


def test_offline_cpus():
    vm = classify(NODBG, NODBG_SYSCALLS, NODBG_FDS)
    vp = plan_vm(vm, Policy(name="p", vcpupin={0: C("9"), 1: C("1,9")}), C("0-1"))
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
