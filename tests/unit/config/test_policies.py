"""Policies of vcpud.config: required keys and names, `match` values and semantics, first match
wins, and the precedence of the pinning rules."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from vcpud.config import Config, Match, Policy
from vcpud.cpuset import CpuSet
from vcpud.discovery import Role

from tests.unit.config.helpers import assert_issue, cpus, cpus_for, issues, one_issue, parse, policy


# --- policies ----------------------------------------------------------------------------


def test_policy_without_rules_is_allowed():
    (p,) = parse("policies:\n  - {name: quiet, match: {name: quiet}}\n").policies
    assert p.all_cpus() == CpuSet()
    assert cpus_for(p, Role.VCPU, vcpu=0) is None and cpus_for(p, Role.EMULATOR) is None


def test_missing_required_keys():
    found = issues("policies:\n  - name: a\n  - match: {}\n  - {}\n")
    got = [(str(i.pos), i.key, i.message) for i in found]
    assert got == [
        ("t.yaml:2:5", "match", "missing required key 'match' in policy 'a'"),
        ("t.yaml:3:5", "name", "missing required key 'name' in policy #2"),
        ("t.yaml:4:5", "name", "missing required key 'name' in policy #3"),
        ("t.yaml:4:5", "match", "missing required key 'match' in policy #3"),
    ]


def test_duplicate_policy_name_in_one_file():
    issue = one_issue("policies:\n  - name: a\n    match: {}\n  - name: b\n    match: {}\n  - name: a\n    match: {}\n")
    assert_issue(issue, "t.yaml:6:11", "duplicate policy name 'a' (first at t.yaml:2)", key="name")


def test_bad_policy_names():
    assert_issue(one_issue("policies:\n  - name: ''\n    match: {}\n"), "t.yaml:2:11", "must be non-empty")
    assert parse("policies:\n  - name: 8\n    match: {}\n").policies[0].name == "8"


@pytest.mark.parametrize(
    "match, col, key, fragment",
    [
        ("{cmdline: '(qemu'}", 22, "match.cmdline",
         "invalid regex '(qemu' for 'match.cmdline' in policy 'p': missing )"),
        ("{vcpus: 5-2}", 20, "match.vcpus", "bad vCPU count range '5-2' for 'match.vcpus'"),
        ("{vcpus: four}", 20, "match.vcpus", "bad vCPU count 'four'"),
        ("{vcpus: 0}", 20, "match.vcpus", "at least 1 vCPU"),
        ("{vcpus: true}", 20, "match.vcpus", "a boolean ('true'"),
        ("{uuid: 1234}", 19, "match.uuid", "bad UUID '1234'"),
        ("{user: 'a b'}", 19, "match.user", "bad user 'a b'"),
        ("{user: 4294967295}", 19, "match.user", "out of range"),
        ("{name: ''}", 19, "match.name", "must not be empty"),
        ("{name: [a]}", 19, "match.name", "got a list"),
    ],
)
def test_bad_match_values(match, col, key, fragment):
    issue = one_issue(f"policies:\n  - name: p\n    match: {match}\n")
    assert_issue(issue, f"t.yaml:3:{col}", fragment, key=key)


# --- precedence --------------------------------------------------------------------------


def test_precedence_all_rules():
    (p,) = parse(
        policy(
            """\
            vcpupin: {0: "0"}
            vcpus: "1"
            emulatorpin: "2"
            iothreadpin: {io1: "3"}
            vhostpin: "4"
            affinity: "5"
            """
        )
    ).policies
    assert cpus_for(p, Role.VCPU, vcpu=0) == cpus("0")
    assert cpus_for(p, Role.VCPU, vcpu=1) == cpus("1")
    assert cpus_for(p, Role.EMULATOR) == cpus("2")
    assert cpus_for(p, Role.IOTHREAD, io="io1") == cpus("3")
    assert cpus_for(p, Role.IOTHREAD, io="io2") == cpus("5")  # not in the map: affinity
    assert cpus_for(p, Role.VHOST) == cpus("4")
    assert p.all_cpus() == cpus("0-5")


def test_precedence_falls_back_to_affinity_then_none():
    only_affinity = Policy(name="a", affinity=cpus("7"))
    assert cpus_for(only_affinity, Role.VCPU, vcpu=3) == cpus("7")
    assert cpus_for(only_affinity, Role.EMULATOR) == cpus("7")
    assert cpus_for(only_affinity, Role.IOTHREAD, io="x") == cpus("7")
    assert cpus_for(only_affinity, Role.VHOST) == cpus("7")

    pins = Policy(name="b", vcpupin={1: cpus("2")}, iothreadpin=cpus("3"))
    assert cpus_for(pins, Role.VCPU, vcpu=1) == cpus("2")
    assert cpus_for(pins, Role.VCPU, vcpu=0) is None  # no vcpus, no affinity: leave it
    assert cpus_for(pins, Role.EMULATOR) is None
    assert cpus_for(pins, Role.IOTHREAD, io="any") == cpus("3")
    assert cpus_for(pins, Role.VHOST) is None
    assert pins.all_cpus() == cpus("2-3")
    # Hand-built policies take plain dicts and stay hashable.
    assert hash(pins) == hash(Policy(name="b", vcpupin={1: cpus("2")}, iothreadpin=cpus("3")))


def test_iothread_map_beats_string_form():
    p = Policy(name="c", iothreadpin=cpus("1"), iothreadpin_by_id={"io1": cpus("2")}, affinity=cpus("3"))
    assert cpus_for(p, Role.IOTHREAD, io="io1") == cpus("2")
    assert cpus_for(p, Role.IOTHREAD, io="io2") == cpus("1")


# --- matching ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Smp:
    cpus: int


@dataclass
class VM:
    name: str | None = "web1"
    uuid: str | None = "6F1C6AD2-6D28-4F4E-9A1B-3C2D8E0A5B71"
    cmdline: tuple[str, ...] = ("/usr/bin/qemu-system-x86_64", "-name", "guest=web1", "-smp", "4")
    uid: int = 107
    user: str | None = "qemu"
    smp: Smp | None = Smp(4)


def match_of(text: str) -> Match:
    return parse(f"policies:\n  - name: p\n    match: {text}\n").policies[0].match


@pytest.mark.parametrize(
    "match, vm, expected",
    [
        ("{}", VM(), True),
        ("{}", VM(name=None, uuid=None, smp=None), True),
        ('{name: "web*"}', VM(), True),
        ('{name: "web?"}', VM(name="web10"), False),
        ('{name: "Web*"}', VM(), False),  # globs are case-sensitive
        ('{name: "web*"}', VM(name=None), False),  # no name: no match
        ("{uuid: 6f1c6ad2-6d28-4f4e-9a1b-3c2d8e0a5b71}", VM(), True),  # case-insensitive
        ("{uuid: 6f1c6ad2-6d28-4f4e-9a1b-3c2d8e0a5b72}", VM(), False),
        ("{uuid: 6f1c6ad2-6d28-4f4e-9a1b-3c2d8e0a5b71}", VM(uuid=None), False),
        ("{cmdline: 'guest=web1 -smp'}", VM(), True),  # searched in argv joined by spaces
        ("{cmdline: '^-name'}", VM(), False),
        ("{cmdline: 'qemu-system-x86_64'}", VM(), True),
        ("{user: qemu}", VM(), True),
        ("{user: root}", VM(), False),
        ("{user: 107}", VM(), True),
        ("{user: '107'}", VM(user=None), True),
        ("{user: 0}", VM(), False),
        ("{vcpus: 4}", VM(), True),
        ("{vcpus: 4}", VM(smp=Smp(5)), False),
        ('{vcpus: "2-4"}', VM(), True),
        ('{vcpus: "5-16"}', VM(), False),
        ("{vcpus: 4}", VM(smp=None), False),
        ('{name: "web*", user: qemu, vcpus: "1-8"}', VM(), True),
        ('{name: "web*", user: nobody}', VM(), False),  # all must hold
    ],
)
def test_match_semantics(match, vm, expected):
    assert match_of(match).matches(vm) is expected


def test_match_user_resolver():
    m = match_of("{user: libvirt-qemu}")
    vm = VM(user=None, uid=64055)
    assert not m.matches(vm)
    assert m.matches(vm, users={64055: "libvirt-qemu"}.get)
    assert not m.matches(vm, users=lambda uid: None)


def test_match_duck_typing_and_direct_construction():
    class Bare:
        name = "db1"

    assert Match(name="db*").matches(Bare())
    assert not Match(uuid="X").matches(Bare())
    assert not Match(vcpus=(1, 2)).matches(Bare())
    assert not Match(cmdline=re.compile("x")).matches(Bare())
    assert Match(uuid="ABC").matches(VM(uuid="abc"))


def test_first_policy_wins_and_no_match_is_none():
    cfg = parse(
        """\
        policies:
          - {name: exact, match: {name: web1}, affinity: 0}
          - {name: webs, match: {name: "web*"}, affinity: 1}
          - {name: big, match: {vcpus: "8-64"}}
        """
    )
    assert cfg.select(VM()).name == "exact"
    assert cfg.select(VM(name="web2")).name == "webs"
    assert cfg.select(VM(name="db", smp=Smp(16))).name == "big"
    assert cfg.select(VM(name="db")) is None
    assert Config().select(VM()) is None
