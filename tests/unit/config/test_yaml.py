"""YAML layer of vcpud.config (yamlpos): syntax errors and their positions, tags, anchors and
merge keys, YAML 1.1 number forms, duplicate and non-scalar keys."""

from __future__ import annotations


import pytest


from tests.unit.config.helpers import assert_issue, cpus, issues, one_issue, parse, policy


# --- anchors, merge keys and number forms ------------------------------------------------


def test_yaml_11_number_forms_are_taken_as_typed():
    cfg = parse(policy('emulatorpin: 0x100\nvcpus: 010\nvcpupin: {010: 1, 3: 0-15:2}\naffinity: "8"\n'))
    (p,) = cfg.policies
    assert p.emulatorpin == cpus("8")  # a mask, not CPU 256
    assert p.vcpus == cpus("10")  # not octal 8
    assert set(p.vcpupin) == {10, 3}
    assert p.vcpupin[3] == cpus("0-14:2")


def test_anchors_and_merge_keys():
    cfg = parse(
        """\
        x-base: &base
          emulatorpin: "1"
          iothreadpin: "1"
        x-more: &more
          emulatorpin: "0"
          vhostpin: "0"
        policies:
          - name: a
            match: &m {name: "a*"}
            <<: *base
          - name: b
            match: *m
            emulatorpin: "0-1"
            <<: [*base, *more]
        """
    )
    a, b = cfg.policies
    assert a.emulatorpin == cpus("1") and a.iothreadpin == cpus("1")
    assert b.match == a.match
    assert b.emulatorpin == cpus("0-1")  # written out beats merged
    assert b.vhostpin == cpus("0")  # from the second source
    assert b.iothreadpin == cpus("1")


def test_merged_mapping_errors_point_at_the_anchor():
    found = issues(
        """\
        x-base: &base
          emulatorpin: "1-x"
        policies:
          - {name: a, match: {}, <<: *base}
          - {name: b, match: {}, <<: *base}
        """
    )
    # Same place, but once per policy: the message names each policy.
    assert [str(i.pos) for i in found] == ["t.yaml:2:16", "t.yaml:2:16"]
    assert "policy 'a'" in found[0].message and "policy 'b'" in found[1].message


def test_recursive_merge_is_an_error():
    issue = one_issue("policies:\n  - &p {name: a, match: {}, <<: *p}\n")
    assert_issue(issue, "t.yaml:2:5", "merges a mapping into itself")


def test_bad_merge_value():
    issue = one_issue(policy("<<: 3\n"))
    assert_issue(issue, "t.yaml:4:9", "merge key '<<' takes a mapping")


# --- YAML syntax -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, where, fragment",
    [
        ("policies:\n\t- name: a\n", "t.yaml:2:1", "found character '\\t'"),
        ("policies:\n  - name: a\n    match: {name: [x}\n", "t.yaml:3:21", "expected ',' or ']'"),
        ("policies: []\n---\npolicies: []\n", "t.yaml:2:1", "expected a single document"),
        ("policies:\n  - name: a\n    match: {}\n   emulatorpin: 1\n", "t.yaml:4:4", "expected <block end>"),
        ('policies:\n  - {name: "a\n', "t.yaml:3:1", "unexpected end of stream"),
        ("a: \x07\n", "t.yaml:1:4", "unacceptable character #x0007"),
        ("a: *nothing\n", "t.yaml:1:4", "found undefined alias"),
    ],
)
def test_yaml_syntax_errors(text, where, fragment):
    issue = one_issue(text)
    assert_issue(issue, where, "invalid YAML", fragment, key=None)


def test_tab_error_has_hint():
    assert "tabs" in one_issue("policies:\n\t- name: a\n").message


def test_unsupported_tags():
    found = issues(policy("emulatorpin: !!binary aGVsbG8=\naffinity: !custom 1\nvhostpin: !!python/name:os.system 1\n"))
    assert [str(i.pos) for i in found] == ["t.yaml:4:18", "t.yaml:5:15", "t.yaml:6:15"]
    assert "'!!binary'" in found[0].message and "'!custom'" in found[1].message
    assert "!!python/name:os.system" in found[2].message


def test_top_level_must_be_a_mapping():
    assert_issue(one_issue("- name: a\n"), "t.yaml:1:1", "must be a mapping", "got a list")


def test_deep_nesting_is_a_config_error():
    text = "policies: " + "[" * 5000 + "]" * 5000 + "\n"
    found = issues(text)
    assert found and all(i.pos.file == "t.yaml" for i in found)


# --- duplicate keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, where, message, key",
    [
        ("policies: []\npolicies: []\n", "t.yaml:2:1", "duplicate key 'policies' (first at line 1)", "policies"),
        ("policies:\n  - name: a\n    match: {}\n    name: b\n", "t.yaml:4:5", "duplicate key 'name' (first at line 2)",
         "name"),
        ("policies:\n  - name: a\n    match:\n      name: a\n      name: b\n", "t.yaml:5:7",
         "duplicate key 'name' (first at line 4)", "match.name"),
        ("policies:\n  - name: a\n    match: {}\n    iothreadpin: {io1: 1, io1: 0}\n", "t.yaml:4:27",
         "duplicate key 'io1' (first at line 4)", "iothreadpin[io1]"),
        ("policies:\n  - name: a\n    match: {}\n    vcpupin:\n      0: 1\n      0: 0\n", "t.yaml:6:7",
         "duplicate key '0' (first at line 5)", "vcpupin[0]"),
        ("policies:\n  - name: a\n    'name': b\n    match: {}\n", "t.yaml:3:5",
         "duplicate key 'name' (first at line 2)",
         "name"),
    ],
)
def test_duplicate_keys(text, where, message, key):
    assert_issue(one_issue(text), where, message, key=key)


def test_duplicate_vcpu_index_written_differently():
    issue = one_issue(policy('vcpupin: {0: 1, "0": 1}\n'))
    assert_issue(issue, "t.yaml:4:21", "duplicate vCPU 0 in 'vcpupin' (first at line 4)", key="vcpupin")


def test_non_scalar_key():
    issue = one_issue(policy("? [a]\n: 1\n"))
    assert_issue(issue, "t.yaml:4:7", "keys must be plain words", "got a list")
