"""YAML layer of vcpud.config (yamlpos): syntax errors and their positions, tags, anchors and
merge keys, YAML 1.1 number forms, duplicate and non-scalar keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from yaml.nodes import ScalarNode, SequenceNode

from tests.unit.config.helpers import assert_issue, cpus, issues, one_issue, parse, policy
from vcpud.config import yamlpos
from vcpud.config.issues import Invalid

GOOD_POOLS = """\
pools:
  dedicated: {cpus: "4-31", exclusive: true}
  shared: {cpus: "2-3"}
policies:
  - name: db
    match: {name: "db-*", vcpus: "2-8", user: "0"}
    vcpus: {pool: dedicated, smt: mirror, numa: single, cache: l3}
    vcpupin: {0: 1, "1": 0}
    emulatorpin: {pool: shared}  # -> shared
    iothreadpin: {io1: "0x3"}
"""


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


# --- libyaml where it reads as PyYAML does ------------------------------------------------

EXAMPLE = (Path(__file__).resolve().parents[3] / "config" / "vcpud.yaml").read_text()


def _tree(doc: yamlpos.Document) -> list[tuple[object, ...]]:
    """Every node once, in order: kind, tag, position (none for an empty value: libyaml places
    those elsewhere, and the loader reads a config with any issue again through PyYAML), text."""
    out: list[tuple[object, ...]] = []
    seen: set[int] = set()
    stack = [doc.root] if doc.root is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            out.append(("alias",))
            continue
        seen.add(id(node))
        empty = isinstance(node, ScalarNode) and node.value == "" and node.tag == yamlpos.NULL
        out.append((type(node).__name__, node.tag, None if empty else str(doc.pos(node)),
                    node.value if isinstance(node, ScalarNode) else None))
        children = node.value if isinstance(node, SequenceNode) else [] if isinstance(node, ScalarNode) \
            else [n for pair in node.value for n in pair]
        stack.extend(reversed(children))
    return out


def _composed(text: str, fast: bool) -> tuple[str, object]:
    try:
        return "ok", _tree(yamlpos.compose(text, "t.yaml", fast=fast))
    except Invalid as e:
        return "invalid", [str(i) for i in e.issues]


def test_the_example_config_goes_through_libyaml():
    assert yamlpos._LibyamlLoader is not None, "PyYAML without libyaml: configs load 10-20 times slower"
    assert yamlpos.fast_composable(EXAMPLE)
    assert _composed(EXAMPLE, True) == _composed(EXAMPLE, False)


@pytest.mark.parametrize("text", [
    "a: 1\t# a tab\n", "a: >#\n", "a: |#\n  x\n", "[a.? - a\n]\n", "{a: !x 1}\n", "a: 1 # \ufeff\n",
    "a: 1 #\u2028b: 2\n", "a: 1\r\nb: 2\n", "a: 'x\n  #>'\n", "a: `b`\n", "a: b'c # ?\n", "a: b#?\n",
    "a: 'x|y'\n",
])
def test_libyaml_is_not_asked_where_it_reads_otherwise(text):
    assert not yamlpos.fast_composable(text)
    assert _composed(text, True) == _composed(text, False)


@pytest.mark.parametrize("text", [
    "a: 1  # `comment` -> with | ? ! @ %\n", "# ?\n  # |\na: 'x # y'  # ?\nb: \"y \\\" # z\"  # >\n", "a: b#c # ?\n",
])
def test_comments_may_hold_anything_printable(text):
    assert yamlpos.fast_composable(text)
    assert _composed(text, True) == _composed(text, False)


@pytest.mark.parametrize("text, where", [
    ("pools:\n  p: {cpus: , exclusive: true}\n", "t.yaml:2:12"),
    ('policies:\n  - name: a\n    match: {}\n    vcpupin: {0: "0", 1: }\n', "t.yaml:4:25"),
])
def test_an_empty_value_is_where_pyyaml_puts_it(text, where):
    # libyaml puts these one column on, after the blank: the loader reads the config again
    assert yamlpos.fast_composable(text)
    assert_issue(one_issue(text), where, "got an empty value")


PIECES = [*"-:,[]{}a1 \n*&#'\".~!|>`@%?\t\r", "- ", ": ", "\n  ", "&x ", "*x", "<<: ", "---", "...", "é", "\\",
          "\ufeff", "\x85", "\u2028", "\x07", "\ud800", " #", "# `x`\n", "''", '\\"']


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.sampled_from([EXAMPLE, GOOD_POOLS]), st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 2), st.sampled_from(PIECES), st.integers(1, 20)),
    min_size=1, max_size=5))
def test_libyaml_composes_what_pyyaml_composes(base, edits):
    """Mutated configs: the same nodes at the same places, or the same error, either way."""
    text = base
    for at, op, piece, n in edits:
        at %= len(text) + 1
        text = text[:at] + piece + text[at:] if op == 0 else text[:at] + text[at + n:] if op == 1 \
            else text[:at] + text[at // 2:at // 2 + n] + text[at:]
    assert _composed(text, True) == _composed(text, False), repr(text)


def test_nodes_per_character_stay_under_the_bound():
    # FAST_MAX_CHARS assumes a node takes at least a third of a character.
    for text in ["?", "? \n? \n", "[,]", "{: , : }", "- - - -", "[[[[]]]]", "a:\nb:\nc:\n", ":\n:\n"]:
        try:
            doc = yamlpos.compose(text, "t.yaml")
        except Invalid:
            continue
        assert len(_tree(doc)) <= 3 * len(text)


def test_without_libyaml_pyyaml_composes_everything(monkeypatch):
    monkeypatch.setattr(yamlpos, "_LibyamlLoader", None)
    assert not yamlpos.fast_composable("a: 1\n")
    assert parse(policy('affinity: "0"\n')).policies[0].affinity == cpus("0")
