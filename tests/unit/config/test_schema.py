"""Config keys and value types (vcpud.config schema, fields, cpus): unknown keys, wrong types,
CPU lists and offline CPUs."""

from __future__ import annotations


import pytest


from tests.unit.config.helpers import TWO_CPUS, assert_issue, cpus, issues, one_issue, parse, policy


# --- unknown keys ------------------------------------------------------------------------


def test_unknown_policy_key_with_suggestion():
    issue = one_issue("policies:\n  - name: core8\n    match: {}\n    vcpupinn: {0: 1}\n")
    assert_issue(
        issue, "t.yaml:4:5", "unknown key 'vcpupinn' in policy 'core8' (did you mean 'vcpupin'?)", key="vcpupinn"
    )


def test_unknown_keys_at_every_level():
    found = issues(
        """\
        polices: []
        policies:
          - name: a
            match: {nmae: a, colour: red}
            emulatorpn: 1
            uuid: x
        name: a
        """
    )
    got = [(str(i.pos), i.key) for i in found]
    assert got == [
        ("t.yaml:1:1", "polices"),
        ("t.yaml:4:13", "match.nmae"),
        ("t.yaml:4:22", "match.colour"),
        ("t.yaml:5:5", "emulatorpn"),
        ("t.yaml:6:5", "uuid"),
        ("t.yaml:7:1", "name"),
    ]
    assert "unknown key 'polices' at top level (did you mean 'policies'?)" == found[0].message
    assert "unknown key 'nmae' in 'match' of policy 'a' (did you mean 'name'?)" == found[1].message
    assert "did you mean" not in found[2].message
    assert "(did you mean 'emulatorpin'?)" in found[3].message
    assert "belongs under 'match'" in found[4].message
    assert "under 'policies'" in found[5].message


# --- wrong types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, where, key, fragments",
    [
        ("policies: web\n", "t.yaml:1:11", "policies", ["'policies' must be a list of mappings, got a string"]),
        ("policies: {name: a}\n", "t.yaml:1:11", "policies", ["must be a list of mappings, got a mapping"]),
        ("policies:\n  - web\n", "t.yaml:2:5", "policies", ["policy #1 in 'policies' must be a mapping, got a string"]),
        ("policies:\n  - name: a\n    match: [x]\n", "t.yaml:3:12", "match",
         ["'match' in policy 'a' must be a mapping", "got a list"]),
        ("policies:\n  - name: a\n    match:\n", "t.yaml:3:11", "match",
         ["use {} to match every VM", "got an empty value"]),
        ("policies:\n  - name: yes\n    match: {}\n", "t.yaml:2:11", "name",
         ["'name' in policy #1 must be a name", "a boolean ('yes'"]),
        ("policies:\n  - name: [a]\n    match: {}\n", "t.yaml:2:11", "name", ["must be a name", "got a list"]),
        (policy("emulatorpin: on\n"), "t.yaml:4:18", "emulatorpin",
         ["'emulatorpin' in policy 'p' must be a CPU list", "a boolean ('on'", "quote it"]),
        (policy("affinity:\n"), "t.yaml:4:14", "affinity", ["must be a CPU list", "got an empty value"]),
        (policy("vcpus: [0, 1]\n"), "t.yaml:4:12", "vcpus", ["must be a CPU list", "got a list"]),
        (policy("vcpupin: [0, 1]\n"), "t.yaml:4:14", "vcpupin", ["must be a mapping of vCPU index to CPU list"]),
        (policy("vcpupin: {-1: 0}\n"), "t.yaml:4:15", "vcpupin", ["keys must be vCPU indexes", "'-1'"]),
        (policy("vcpupin: {on: 0}\n"), "t.yaml:4:15", "vcpupin", ["keys must be vCPU indexes", "a boolean ('on'"]),
        (policy("vcpupin: {0x1: 0}\n"), "t.yaml:4:15", "vcpupin", ["keys must be vCPU indexes", "'0x1'"]),
        (policy("vcpupin: {1.5: 0}\n"), "t.yaml:4:15", "vcpupin", ["keys must be vCPU indexes", "a number ('1.5')"]),
        (policy("iothreadpin: [1]\n"), "t.yaml:4:18", "iothreadpin",
         ["or a mapping of IO thread id to CPU list", "got a list"]),
        (policy("iothreadpin: {1io: 1}\n"), "t.yaml:4:19", "iothreadpin", ["bad IO thread id '1io'"]),
        (policy("match: {}\n"), "t.yaml:4:5", "match", ["duplicate key 'match' (first at line 3)"]),
        ("executables: [qemu]\n", "t.yaml:1:15", "executables", ["'qemu' in 'executables' must be an absolute path"]),
        ("executables: []\n", "t.yaml:1:14", "executables", ["must not be an empty list"]),
        ("executables: {a: b}\n", "t.yaml:1:14", "executables", ["got a mapping"]),
        ("include: [a.yaml, 3, '']\n", "t.yaml:1:22", "include", ["must not contain an empty entry"]),
    ],
)
def test_wrong_types(text, where, key, fragments):
    assert_issue(one_issue(text), where, *fragments, key=key)


# --- CPU values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, col, token",
    [
        ('"3-x"', 18, "bad range '3-x'"),
        ("1,,2", 18, "empty element"),
        ("0x", 18, "bad hex mask group ''"),
        ("1_0", 18, "bad CPU number '1_0'"),
        ("99999", 18, "out of range"),
        ('""', 18, "empty CPU list"),
        ("5-2", 18, "runs backwards"),
    ],
)
def test_bad_cpu_tokens(value, col, token):
    issue = one_issue(policy(f"emulatorpin: {value}\n"))
    assert_issue(issue, f"t.yaml:4:{col}", "bad CPU list", "for 'emulatorpin'", token, key="emulatorpin")


def test_bad_cpu_message_matches_contract():
    issue = one_issue("policies:\n  - name: core8\n    match: {}\n    emulatorpin: 3-x\n")
    assert issue.message == "bad CPU list '3-x' for 'emulatorpin' in policy 'core8': bad range '3-x'"


def test_bad_cpu_in_vcpupin_and_iothread_map_entries():
    found = issues(policy('vcpupin: {0: "0", 1: "z"}\niothreadpin:\n  io1: "1-"\n'))
    assert_issue(found[0], "t.yaml:4:26", "for 'vcpupin[1]'", "bad CPU number 'z'", key="vcpupin[1]")
    assert_issue(found[1], "t.yaml:6:12", "for 'iothreadpin[io1]'", "bad range '1-'", key="iothreadpin[io1]")


def test_offline_cpus():
    text = policy('emulatorpin: 9\nvcpupin: {0: "0-3"}\nvcpus: "0-1"\n')
    found = issues(text, online=TWO_CPUS)
    assert len(found) == 2
    assert_issue(found[0], "t.yaml:4:18", "'emulatorpin' in policy 'p': CPU 9 is not online on this host (online: 0-1)",
                 key="emulatorpin")
    assert_issue(found[1], "t.yaml:5:18", "CPUs 2-3 are not online on this host (online: 0-1)", key="vcpupin[0]")
    # Without `online` the same file is fine.
    assert parse(text).policies[0].emulatorpin == cpus("9")
