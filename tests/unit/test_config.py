"""Tests for vcpud.config: config parsing, error positions, matching and precedence."""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from textwrap import dedent

import pytest

from vcpud.discovery import Role, Thread
from vcpud.placement import rule_for
from vcpud.cpuset import CpuSet
from vcpud.pools import CACHE_MODES, NUMA_MODES, SMT_MODES, PlacementRule, PoolSpec
from vcpud.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_EXECUTABLES,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_STATE_FILE,
    Config,
    ConfigError,
    ConfigIssue,
    FrozenMap,
    Match,
    Policy,
    Position,
    load_config,
    parse_config_text,
)

REPO = Path(__file__).resolve().parents[2]
TWO_CPUS = CpuSet.parse("0-1")


# --- helpers ----------------------------------------------------------------------


def parse(text: str, **kw) -> Config:
    return parse_config_text(dedent(text), "t.yaml", **kw)


def issues(text: str, **kw) -> tuple[ConfigIssue, ...]:
    with pytest.raises(ConfigError) as ei:
        parse(text, **kw)
    return ei.value.issues


def one_issue(text: str, **kw) -> ConfigIssue:
    found = issues(text, **kw)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def assert_issue(issue: ConfigIssue, where: str, *fragments: str, key: str | None = "ANY") -> None:
    assert str(issue).startswith(where + ": "), str(issue)
    for f in fragments:
        assert f in issue.message, (f, str(issue))
    if key != "ANY":
        assert issue.key == key, (issue.key, str(issue))


def policy(body: str) -> str:
    """A one-policy config whose extra lines (4-space indented) start on line 4."""
    lines = dedent(body).splitlines()
    return "policies:\n  - name: p\n    match: {}\n" + "".join(f"    {line}\n" for line in lines)


def cpus(text: str) -> CpuSet:
    return CpuSet.parse(text)


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


# --- a good config ----------------------------------------------------------------


def test_full_config_parses():
    cfg = parse(
        """\
        executables: [/usr/bin/qemu-system-x86_64]
        rescan_interval: 500ms
        policies:
          - name: core8
            match: {name: "core8"}
            vcpupin: {0: "0", 1: 1}
            vcpus: "0-1"
            emulatorpin: "1"
            iothreadpin: "1"
          - name: web
            match: {name: "web*"}
            affinity: 0
            iothreadpin: {io1: "0", io2: 0x2}
        """
    )
    assert cfg.executables == ("/usr/bin/qemu-system-x86_64",)
    assert cfg.rescan_interval == 0.5
    assert cfg.files == ("t.yaml",)
    core8, web = cfg.policies
    assert core8.name == "core8" and core8.match == Match(name="core8")
    assert dict(core8.vcpupin) == {0: cpus("0"), 1: cpus("1")}
    assert core8.vcpus == cpus("0-1") and core8.emulatorpin == cpus("1") and core8.iothreadpin == cpus("1")
    assert core8.pos == Position("t.yaml", 4, 5)
    assert web.affinity == cpus("0")
    assert web.iothreadpin is None
    assert dict(web.iothreadpin_by_id) == {"io1": cpus("0"), "io2": cpus("1")}
    # Frozen values: hashable, comparable, immutable.
    hash(cfg)
    with pytest.raises(AttributeError):
        core8.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        core8.vcpupin[5] = cpus("0")  # type: ignore[index]


def test_defaults_and_empty_files():
    cfg = parse("")
    assert cfg == Config(files=("t.yaml",))
    assert cfg.executables == DEFAULT_EXECUTABLES
    assert cfg.rescan_interval == 10.0
    assert cfg.policies == ()
    assert parse("# only a comment\npolicies:\n").policies == ()
    assert DEFAULT_CONFIG_PATH == Path("/etc/vcpud/vcpud.yaml")
    assert "/usr/libexec/qemu-kvm" in DEFAULT_EXECUTABLES


def test_single_executable_string_and_x_keys_ignored():
    cfg = parse("executables: /usr/bin/kvm\nx-anchors: {whatever: [1, 2]}\n")
    assert cfg.executables == ("/usr/bin/kvm",)


def test_policy_without_rules_is_allowed():
    (p,) = parse("policies:\n  - {name: quiet, match: {name: quiet}}\n").policies
    assert p.all_cpus() == CpuSet()
    assert cpus_for(p, Role.VCPU, vcpu=0) is None and cpus_for(p, Role.EMULATOR) is None


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


# --- YAML syntax ----------------------------------------------------------------------


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


# --- unknown and duplicate keys ---------------------------------------------------------


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


# --- wrong types -----------------------------------------------------------------------


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


# --- CPU values ----------------------------------------------------------------------------


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


# --- policies ------------------------------------------------------------------------------


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


def test_many_errors_are_all_reported_in_order():
    text = """\
    rescan_interval: 0s
    policies:
      - name: a
        match: {vcpus: 9-3}
        emulatorpin: 3-x
        vcpupinn: {}
      - name: a
        affinity: 7
      - oops
    polices: x
    """
    found = issues(text, online=TWO_CPUS)
    got = [str(i.pos) for i in found]
    assert got == [
        "t.yaml:1:18",  # rescan_interval 0
        "t.yaml:4:20",  # match range
        "t.yaml:5:18",  # bad CPU
        "t.yaml:6:5",  # unknown key
        "t.yaml:7:5",  # policy 'a' (second) lacks match
        "t.yaml:7:11",  # duplicate name
        "t.yaml:8:15",  # CPU 7 offline
        "t.yaml:9:5",  # not a mapping
        "t.yaml:10:1",  # unknown top-level key
    ]
    text_err = str(ConfigError(found))
    assert text_err.splitlines() == [str(i) for i in found]


def test_config_error_format_and_pickle():
    issue = ConfigIssue(Position("f.yaml", 3, 7), "boom", "name")
    assert str(issue) == "f.yaml:3:7: boom"
    err = ConfigError([issue, ConfigIssue(Position("g.yaml", 1, 1), "bang", None)])
    assert str(err) == "f.yaml:3:7: boom\ng.yaml:1:1: bang"
    again = pickle.loads(pickle.dumps(err))
    assert again.issues == err.issues and str(again) == str(err)


# --- rescan_interval ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [("10", 10.0), ("2.5", 2.5), ('"10s"', 10.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0),
     ("1.5s", 1.5), ('"0.25"', 0.25), ("10 s", 10.0)],
)
def test_rescan_interval(value, seconds):
    assert parse(f"rescan_interval: {value}\n").rescan_interval == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value, fragment",
    [("0", "more than zero"), ("0ms", "more than zero"), ("-1", "bad duration"), ("10x", "bad duration"),
     ("1:30", "bad duration"), ("1e3", "bad duration"), ("yes", "a boolean"), ("", "got an empty value"),
     ("[1]", "got a list"), ("2d", "bad duration"), ("25h", "at most")],
)
def test_bad_rescan_interval(value, fragment):
    issue = one_issue(f"rescan_interval: {value}\n")
    assert_issue(issue, "t.yaml:1:18" if value else "t.yaml:1:17", fragment, key="rescan_interval")


# --- files and includes --------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dedent(text))
    return path


def test_missing_main_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    (issue,) = ei.value.issues
    assert issue.pos == Position(str(path), 1, 1)
    assert "cannot read config file: No such file or directory" in issue.message


def test_main_file_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path)
    assert str(ei.value).startswith(f"{tmp_path}:1:1: cannot read config file")


def test_main_file_not_utf8(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_bytes(b"\xef\xbb\xbfpolicies: []\nx: ab\xffc\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    (issue,) = ei.value.issues
    assert str(issue).startswith(f"{path}:2:6: not valid UTF-8")


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_bytes(b"\xef\xbb\xbfpolicies:\n  - {name: a, match: {}, affinity: z}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(ei.value.issues[0].pos) == f"{path}:2:36"


def test_includes_in_name_order_relative_to_the_including_file(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    main = write(
        etc / "vcpud.yaml",
        """\
        include: [policies.d/*.yaml, extra.yaml]
        policies:
          - {name: main, match: {name: main}}
        """,
    )
    write(etc / "policies.d" / "20-b.yaml", "policies:\n  - {name: b, match: {}}\n")
    write(etc / "policies.d" / "10-a.yaml", "policies:\n  - {name: a, match: {}}\n")
    write(etc / "policies.d" / "30-c.yaml", "")  # empty drop-in: no policies
    write(etc / "policies.d" / "ignored.txt", "not: yaml: at all")
    write(etc / "policies.d" / ".hidden.yaml", "junk: 1\n")
    write(etc / "extra.yaml", "policies:\n  - {name: extra, match: {}}\n")
    monkeypatch.chdir(tmp_path)  # relative to the file, not to the working directory
    cfg = load_config(Path("etc/vcpud.yaml"))
    assert [p.name for p in cfg.policies] == ["main", "a", "b", "extra"]
    assert cfg.files == (
        "etc/vcpud.yaml",
        "etc/policies.d/10-a.yaml",
        "etc/policies.d/20-b.yaml",
        "etc/policies.d/30-c.yaml",
        "etc/extra.yaml",
    )
    assert cfg.policies[1].pos == Position("etc/policies.d/10-a.yaml", 2, 5)
    assert load_config(main).files[1] == str(etc / "policies.d" / "10-a.yaml")


def test_include_string_absolute_and_read_once(tmp_path):
    inc = write(tmp_path / "d" / "p.yaml", "policies:\n  - {name: a, match: {}}\n")
    main = write(tmp_path / "main.yaml", f"include: [{inc}, d/*.yaml, '*.yaml']\n")
    cfg = load_config(main)
    # Matched three times (the last glob also matches main.yaml itself), read once.
    assert cfg.files == (str(main), str(inc))
    assert [p.name for p in cfg.policies] == ["a"]


def test_include_glob_matching_the_main_file_by_relative_path(tmp_path, monkeypatch):
    write(tmp_path / "etc" / "vcpud.yaml", "include: '*.yaml'\n")
    write(tmp_path / "etc" / "more.yaml", "policies:\n  - {name: more, match: {}}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("etc/vcpud.yaml"))
    assert cfg.files == ("etc/vcpud.yaml", "etc/more.yaml")


def test_include_matching_nothing(tmp_path):
    main = write(tmp_path / "vcpud.yaml", "policies: []\ninclude: policies.d/*.yaml\n")
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    (issue,) = ei.value.issues
    assert str(issue) == f"{main}:2:10: include 'policies.d/*.yaml' matches no file"
    assert issue.key == "include"


def test_include_unreadable_files(tmp_path):
    main = write(tmp_path / "vcpud.yaml", "include:\n  - d/*\n  - bin.yaml\n")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "bin.yaml").write_bytes(b"policies: []\n# caf\xe9\n")
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    found = ei.value.issues
    assert [str(i.pos) for i in found] == [f"{main}:2:5", f"{main}:3:5"]
    assert f"cannot read included file '{tmp_path}/d/sub': Is a directory" in found[0].message
    assert "not valid UTF-8 (line 2, column 6)" in found[1].message


def test_include_permission_denied(tmp_path, monkeypatch):
    main = write(tmp_path / "vcpud.yaml", "include: p.yaml\n")
    p = write(tmp_path / "p.yaml", "policies: []\n")
    if os.geteuid() == 0:  # root reads files whatever their mode
        import vcpud.bounded

        real_read = vcpud.bounded.read_bytes

        def read_bytes(path: Path, limit: int) -> bytes:
            if Path(path) == p:
                raise PermissionError(13, "Permission denied", str(path))
            return real_read(path, limit)

        monkeypatch.setattr(vcpud.bounded, "read_bytes", read_bytes)
    else:
        p.chmod(0)
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    assert str(ei.value) == f"{main}:1:10: cannot read included file '{p}': Permission denied"


def test_nul_in_paths_is_a_config_error(tmp_path):
    main = write(tmp_path / "vcpud.yaml", 'include: "a\\0*.yaml"\nexecutables: ["/usr/bin/q\\0"]\n')
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    assert [(str(i.pos), i.key) for i in ei.value.issues] == [
        (f"{main}:1:10", "include"), (f"{main}:2:15", "executables")
    ]
    assert "NUL character" in ei.value.issues[0].message
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "x\0.yaml")
    assert ei.value.issues[0].pos.line == 1


def test_errors_inside_included_files(tmp_path):
    main = write(
        tmp_path / "vcpud.yaml",
        """\
        include: policies.d/*.yaml
        policies:
          - {name: web, match: {}}
        """,
    )
    write(tmp_path / "policies.d" / "a.yaml", "policies:\n  - name: web\n    match: {}\n")
    write(tmp_path / "policies.d" / "b.yaml", "include: x.yaml\nrescan_interval: 5\npolicies:\n\t- x\n")
    write(tmp_path / "policies.d" / "c.yaml", "policies:\n  - name: c\n    match: {}\n    affinity: 5\n")
    with pytest.raises(ConfigError) as ei:
        load_config(main, online=TWO_CPUS)
    found = [str(i) for i in ei.value.issues]
    d = tmp_path / "policies.d"
    assert found[0] == f"{d}/a.yaml:2:11: duplicate policy name 'web' (first at {main}:3)"
    # b.yaml: a syntax error stops that file only.
    assert found[1].startswith(f"{d}/b.yaml:4:1: invalid YAML")
    assert found[2].startswith(f"{d}/c.yaml:4:15: 'affinity' in policy 'c': CPU 5 is not online")
    assert len(found) == 3


def test_included_files_hold_only_policies(tmp_path):
    main = write(tmp_path / "vcpud.yaml", "include: p.yaml\n")
    write(tmp_path / "p.yaml", "include: q.yaml\nexecutables: [/x]\nx-ok: 1\npolicies: []\n")
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    found = ei.value.issues
    assert [(str(i.pos), i.key) for i in found] == [
        (f"{tmp_path}/p.yaml:1:1", "include"),
        (f"{tmp_path}/p.yaml:2:1", "executables"),
    ]
    assert "'include' is only allowed in the main config file" in found[0].message


def test_parse_config_text_include_needs_base_dir(tmp_path):
    write(tmp_path / "p.yaml", "policies:\n  - {name: a, match: {}}\n")
    issue = one_issue("include: p.yaml\n")
    assert_issue(issue, "t.yaml:1:10", "no base directory", key="include")
    cfg = parse("include: p.yaml\n", base_dir=tmp_path)
    assert [p.name for p in cfg.policies] == ["a"]
    assert cfg.files == ("t.yaml", str(tmp_path / "p.yaml"))


# --- the shipped example -------------------------------------------------------------------


@pytest.mark.parametrize("online", [None, TWO_CPUS], ids=["any-host", "two-cpus"])
def test_example_config_loads(online):
    path = REPO / "config" / "vcpud.yaml"
    cfg = load_config(path, online=online)
    assert cfg.files == (str(path),)
    assert cfg.policies, "the example should show policies"
    assert {p.name for p in cfg.policies} >= {"core8", "web"}
    for p in cfg.policies:
        assert p.all_cpus() <= TWO_CPUS


# --- precedence ----------------------------------------------------------------------------


def cpus_for(p, role, vcpu=None, io=None):
    """What the planner gives a thread of that role under policy p (precedence lives there)."""
    r = rule_for(p, Thread(tid=1, comm="x", role=role, vcpu=vcpu, iothread=io))
    return None if r is None else r[1]


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


# --- matching ------------------------------------------------------------------------------


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


# --- pools, metrics and the state file -----------------------------------------------------

POOLS = 'pools:\n  dedicated: {cpus: "4-31", exclusive: true}\n  shared: {cpus: "2-3"}\n'


def pooled(body: str) -> str:
    """POOLS plus a one-policy config 'p' whose extra lines start on line 7."""
    return POOLS + policy(body)


def test_pools_and_pool_rules_parse():
    cfg = parse(
        """\
        policies:
          - name: db
            match: {name: "db-*"}
            vcpus: {pool: dedicated, smt: mirror, numa: single, cache: l3}
            emulatorpin: {pool: shared}
            on_exhausted: shared
          - name: web
            match: {name: "web*"}
            vcpus: {pool: dedicated}
            emulatorpin: {isolate: true}
            on_exhausted: fail
        pools:                      # after the policies naming them: fine
          dedicated: {cpus: "4-31", exclusive: true}
          shared:    {cpus: "2-3"}
          spare:     {cpus: 32, exclusive: false}
        metrics:
          listen: "[::1]:9474"
        state_file: /run/vcpud/state.json
        """
    )
    assert list(cfg.pools) == ["dedicated", "shared", "spare"]  # file order
    assert cfg.pools["dedicated"] == PoolSpec("dedicated", cpus("4-31"), exclusive=True)
    assert cfg.pools["shared"] == PoolSpec("shared", cpus("2-3"), exclusive=False)
    assert cfg.pools["spare"].exclusive is False
    assert isinstance(cfg.pools, FrozenMap)
    assert cfg.metrics_listen == "[::1]:9474"
    assert cfg.state_file == Path("/run/vcpud/state.json")
    db, web = cfg.policies
    assert db.vcpus is None
    assert db.vcpus_rule == PlacementRule("dedicated", smt="mirror", numa="single", cache="l3")
    assert db.emulatorpin == cpus("2-3") and db.emulator_pool == "shared" and db.emulator_isolate is False
    assert db.on_exhausted == "shared"
    assert web.vcpus_rule == PlacementRule("dedicated", smt="any", numa="any", cache="any")
    assert web.emulator_isolate is True and web.emulatorpin is None and web.emulator_pool is None
    assert web.on_exhausted == "fail"
    # The planner's view: pooled vCPUs have no fixed CPUs; a pool's emulator CPUs do.
    assert cpus_for(db, Role.VCPU, vcpu=0) is None
    assert cpus_for(db, Role.EMULATOR) == cpus("2-3")
    assert cpus_for(web, Role.EMULATOR) is None
    hash(cfg)


def test_pool_defaults():
    cfg = parse("")
    assert cfg.pools == {} and isinstance(cfg.pools, FrozenMap)
    assert cfg.metrics_listen == DEFAULT_METRICS_LISTEN == "127.0.0.1:9474"
    assert cfg.state_file == DEFAULT_STATE_FILE == Path("/var/lib/vcpud/state.json")
    assert parse("pools:\n").pools == {} and parse("pools: {}\n").pools == {}
    assert parse("metrics: {}\n").metrics_listen == "127.0.0.1:9474"
    (p,) = parse(pooled("vcpus: {pool: dedicated}\n")).policies
    assert p.vcpus_rule == PlacementRule("dedicated")
    assert (p.on_exhausted, p.emulator_isolate, p.emulator_pool, p.emulatorpin) == ("leave", False, None, None)
    plain = Policy(name="x")
    assert (plain.vcpus_rule, plain.on_exhausted, plain.emulator_isolate, plain.emulator_pool) == (
        None, "leave", False, None)
    # Hand-built configs take plain dicts and stay hashable.
    assert hash(Config(pools={"a": PoolSpec("a", cpus("1"))})) == hash(Config(pools={"a": PoolSpec("a", cpus("1"))}))


@pytest.mark.parametrize("smt", SMT_MODES)
@pytest.mark.parametrize("numa", NUMA_MODES)
@pytest.mark.parametrize("cache", CACHE_MODES)
def test_every_placement_mode(smt, numa, cache):
    (p,) = parse(pooled(f"vcpus: {{pool: dedicated, smt: {smt}, numa: {numa}, cache: {cache}}}\n")).policies
    assert p.vcpus_rule == PlacementRule("dedicated", smt, numa, cache)


def test_non_exclusive_vcpus_pool_floats_like_a_cpu_list():
    (p,) = parse(pooled('vcpus: {pool: shared}\nvcpupin: {0: "1"}\nemulatorpin: {isolate: false}\n')).policies
    assert p.vcpus == cpus("2-3") and p.vcpus_rule is None
    assert p.emulatorpin is None and not p.emulator_isolate
    # vcpupin wins for its indexes, as with a CPU list.
    assert cpus_for(p, Role.VCPU, vcpu=0) == cpus("1")
    assert cpus_for(p, Role.VCPU, vcpu=1) == cpus("2-3")
    assert p.all_cpus() == cpus("1-3")


def test_pools_shared_between_policies_and_empty_emulatorpin():
    cfg = parse(
        POOLS + "policies:\n"
        "  - {name: a, match: {name: a}, vcpus: {pool: dedicated}, on_exhausted: shared}\n"
        "  - {name: b, match: {name: b}, vcpus: {pool: dedicated}, emulatorpin: {}}\n"
        "  - {name: c, match: {name: c}, emulatorpin: {pool: shared}, affinity: 1}\n"
    )
    a, b, c = cfg.policies
    assert a.vcpus_rule == b.vcpus_rule == PlacementRule("dedicated")
    assert b.emulatorpin is None and not b.emulator_isolate
    assert c.emulatorpin == cpus("2-3") and c.emulator_pool == "shared"


def test_pool_cpus_outside_online_and_cpus_in_no_pool():
    # CPUs 0-1 are in no pool: fine. Pools must be online when that is known.
    cfg = parse('pools: {a: {cpus: "1"}}\n', online=TWO_CPUS)
    assert cfg.pools["a"].cpus == cpus("1")
    issue = one_issue(POOLS, online=cpus("0-3"))
    assert_issue(issue, "t.yaml:2:21", "'pools[dedicated].cpus': CPUs 4-31 are not online on this host (online: 0-3)",
                 key="pools[dedicated].cpus")


@pytest.mark.parametrize(
    "text, where, key, message",
    [
        ('pools:\n  a: {cpus: "0-5"}\n  b: {cpus: "4-7"}\n', "t.yaml:3:13", "pools[b].cpus",
         "pools 'a' and 'b' overlap on CPUs 4-5"),
        ('pools:\n  a: {cpus: "0-5", exclusive: true}\n  b: {cpus: "5", exclusive: true}\n', "t.yaml:3:13",
         "pools[b].cpus", "pools 'a' and 'b' overlap on CPU 5"),
        ('pools:\n  a: {cpus: "3-x"}\n', "t.yaml:2:13", "pools[a].cpus",
         "bad CPU list '3-x' for 'pools[a].cpus': bad range '3-x'"),
        ('pools:\n  a: {cpus: "1", exclusiv: true}\n', "t.yaml:2:18", "pools[a].exclusiv",
         "unknown key 'exclusiv' in pool 'a' (did you mean 'exclusive'?)"),
        ('pools:\n  a: {cpus: "1", exclusive: "yes"}\n', "t.yaml:2:29", "pools[a].exclusive",
         "'pools[a].exclusive' must be true or false, got a string ('yes')"),
        ('pools:\n  a: {cpus: "1", exclusive: 1}\n', "t.yaml:2:29", "pools[a].exclusive",
         "'pools[a].exclusive' must be true or false, got an integer ('1')"),
        ('pools:\n  a: {exclusive: true}\n', "t.yaml:2:6", "pools[a].cpus", "missing required key 'cpus' in pool 'a'"),
        ('pools:\n  "": {cpus: "1"}\n', "t.yaml:2:3", "pools",
         "pool name '' in 'pools' must be non-empty printable text"),
        ('pools:\n  " ": {cpus: "1"}\n', "t.yaml:2:3", "pools", "pool name ' ' in 'pools' must be non-empty"),
        ('pools:\n  yes: {cpus: "1"}\n', "t.yaml:2:3", "pools", "pool names in 'pools' must be text, got a boolean"),
        ('pools:\n  leave: {cpus: "1"}\n', "t.yaml:2:3", "pools", "'leave' cannot be a pool name"),
        ('pools:\n  fail: {cpus: "1"}\n', "t.yaml:2:3", "pools", "'fail' cannot be a pool name"),
        ('pools:\n  1: {cpus: "1"}\n  "1": {cpus: "2"}\n', "t.yaml:3:3", "pools",
         "duplicate pool '1' (first at line 2)"),
        ('pools:\n  a: "4-7"\n', "t.yaml:2:6", "pools[a]",
         "pool 'a' must be a mapping like {cpus: \"4-31\", exclusive: true}, got a string ('4-7')"),
        ("pools: [a, b]\n", "t.yaml:1:8", "pools",
         "'pools' must be a mapping of pool name to {cpus: LIST, exclusive: BOOL}"),
    ],
)
def test_bad_pools(text, where, key, message):
    assert_issue(one_issue(text), where, message, key=key)


def test_every_overlap_is_reported_even_in_otherwise_bad_pools():
    found = issues('pools:\n  a: {cpus: "4-7"}\n  b: {cpus: "6-8", exclusiv: true}\n  c: {cpus: 6}\n')
    assert [(str(i.pos), i.message) for i in found] == [
        ("t.yaml:3:13", "pools 'a' and 'b' overlap on CPUs 6-7"),
        ("t.yaml:3:20", "unknown key 'exclusiv' in pool 'b' (did you mean 'exclusive'?)"),
        ("t.yaml:4:13", "pools 'a' and 'c' overlap on CPU 6"),
        ("t.yaml:4:13", "pools 'b' and 'c' overlap on CPU 6"),
    ]


@pytest.mark.parametrize(
    "body, where, key, message",
    [
        # unknown pools, with the nearest name
        ("vcpus: {pool: dedicatd}\n", "t.yaml:7:19", "vcpus.pool",
         "unknown pool 'dedicatd' for 'vcpus.pool' in policy 'p' (did you mean 'dedicated'?)"),
        ("emulatorpin: {pool: shard}\n", "t.yaml:7:25", "emulatorpin.pool",
         "unknown pool 'shard' for 'emulatorpin.pool' in policy 'p' (did you mean 'shared'?)"),
        ("vcpus: {pool: dedicated}\non_exhausted: sharde\n", "t.yaml:8:19", "on_exhausted",
         "unknown pool 'sharde' for 'on_exhausted' in policy 'p': expected 'leave', 'fail' or a non-exclusive pool "
         "(did you mean 'shared'?)"),
        ("vcpus: {pool: dedicated}\non_exhausted: lave\n", "t.yaml:8:19", "on_exhausted",
         "(did you mean 'leave'?)"),
        # emulatorpin
        ("vcpus: {pool: dedicated}\nemulatorpin: {pool: dedicated}\n", "t.yaml:8:25", "emulatorpin.pool",
         "pool 'dedicated' for 'emulatorpin.pool' in policy 'p' is exclusive: its CPUs are for vCPUs only; "
         "use 'emulatorpin: {isolate: true}' for a dedicated emulator CPU from the vcpus pool"),
        ("emulatorpin: {isolate: true}\n", "t.yaml:7:19", "emulatorpin.isolate",
         "'emulatorpin: {isolate: true}' in policy 'p' needs 'vcpus: {pool: ...}' with an exclusive pool"),
        ('vcpus: "1"\nemulatorpin: {isolate: true}\n', "t.yaml:8:19", "emulatorpin.isolate",
         "needs 'vcpus: {pool: ...}' with an exclusive pool"),
        ("vcpus: {pool: shared}\nemulatorpin: {isolate: yes}\n", "t.yaml:8:19", "emulatorpin.isolate",
         "needs 'vcpus: {pool: ...}' with an exclusive pool"),
        ("vcpus: {pool: dedicated}\nemulatorpin: {pool: shared, isolate: false}\n", "t.yaml:8:18", "emulatorpin",
         "'emulatorpin' in policy 'p' takes either 'pool' or 'isolate', not both"),
        ("vcpus: {pool: dedicated}\nemulatorpin: {isolate: 1}\n", "t.yaml:8:28", "emulatorpin.isolate",
         "'emulatorpin.isolate' in policy 'p' must be true or false, got an integer ('1')"),
        ("emulatorpin: {pool: shared, cpus: 1}\n", "t.yaml:7:33", "emulatorpin.cpus",
         "unknown key 'cpus' in 'emulatorpin' of policy 'p'"),
        ("emulatorpin: [1]\n", "t.yaml:7:18", "emulatorpin",
         "'emulatorpin' in policy 'p' must be a CPU list like \"0-3,8\", a pool like {pool: NAME} or {isolate: true}"),
        # on_exhausted
        ("vcpus: {pool: dedicated}\non_exhausted: dedicated\n", "t.yaml:8:19", "on_exhausted",
         "'on_exhausted' in policy 'p' names exclusive pool 'dedicated': a VM waiting for dedicated CPUs can only "
         "float over a non-exclusive pool"),
        ("on_exhausted: shared\n", "t.yaml:7:5", "on_exhausted",
         "'on_exhausted' in policy 'p': on_exhausted only applies to vcpus: {pool: ...} with an exclusive pool"),
        ("vcpus: {pool: shared}\non_exhausted: leave\n", "t.yaml:8:5", "on_exhausted",
         "on_exhausted only applies to vcpus: {pool: ...}"),
        ("vcpus: {pool: dedicated}\non_exhausted: [leave]\n", "t.yaml:8:19", "on_exhausted",
         "'on_exhausted' in policy 'p' must be 'leave', 'fail' or the name of a non-exclusive pool, got a list"),
        # vcpus mapping
        ("vcpus: {smt: mirror}\n", "t.yaml:7:12", "vcpus.pool", "missing required key 'pool' in 'vcpus' of policy 'p'"),
        ("vcpus: {pool: dedicated, smt: mirorr}\n", "t.yaml:7:35", "vcpus.smt",
         "bad value 'mirorr' for 'vcpus.smt' in policy 'p': expected one of any, mirror, isolate, full-cores "
         "(did you mean 'mirror'?)"),
        ("vcpus: {pool: dedicated, numa: one}\n", "t.yaml:7:36", "vcpus.numa",
         "bad value 'one' for 'vcpus.numa' in policy 'p': expected one of any, single, spread"),
        ("vcpus: {pool: dedicated, cache: L3}\n", "t.yaml:7:37", "vcpus.cache", "expected one of any, l3"),
        ("vcpus: {pool: dedicated, smt: off}\n", "t.yaml:7:35", "vcpus.smt",
         "'vcpus.smt' in policy 'p' must be one of any, mirror, isolate, full-cores, got a boolean ('off'"),
        ("vcpus: {pool: dedicated, nuam: single}\n", "t.yaml:7:30", "vcpus.nuam",
         "unknown key 'nuam' in 'vcpus' of policy 'p' (did you mean 'numa'?)"),
        ("vcpus: {pool: shared, smt: mirror}\n", "t.yaml:7:27", "vcpus.smt",
         "'vcpus.smt' in policy 'p': smt/numa/cache only apply to an exclusive pool; pool 'shared' is not exclusive"),
        ("vcpus: {pool: shared, cache: any}\n", "t.yaml:7:27", "vcpus.cache",
         "smt/numa/cache only apply to an exclusive pool"),
        ("vcpus: {pool: dedicated}\nvcpupin: {0: 1}\n", "t.yaml:8:5", "vcpupin",
         "'vcpupin' in policy 'p' cannot be combined with 'vcpus: {pool: dedicated}'"),
        # pool keys written straight into the policy
        ("smt: mirror\n", "t.yaml:7:5", "smt",
         "unknown key 'smt' in policy 'p' (it belongs under 'vcpus: {pool: ...}')"),
        ("isolate: true\n", "t.yaml:7:5", "isolate", "(write 'emulatorpin: {isolate: true}')"),
    ],
)
def test_bad_pool_rules(body, where, key, message):
    assert_issue(one_issue(pooled(body)), where, message, key=key)


def test_vcpupin_with_an_exclusive_pool_says_why():
    issue = one_issue(pooled("vcpus: {pool: dedicated}\nvcpupin: {0: 1}\n"))
    assert "ambiguous" in issue.message


def test_unknown_pool_without_any_pools():
    issue = one_issue(policy("vcpus: {pool: dedicated}\n"))
    assert_issue(issue, "t.yaml:4:19", "unknown pool 'dedicated' for 'vcpus.pool' in policy 'p' "
                 "(no pools are defined: add them under the top-level 'pools')", key="vcpus.pool")


def test_broken_pools_and_rules_do_not_cascade():
    # A pool with an error is known: naming it is not "unknown", and nothing more is said.
    text = 'pools:\n  d: {cpus: "x", exclusive: true}\n' + policy(
        "vcpus: {pool: d}\nemulatorpin: {isolate: true}\non_exhausted: d\n")
    (issue,) = issues(text)
    assert_issue(issue, "t.yaml:2:13", "bad CPU list 'x'", key="pools[d].cpus")
    # A broken vcpus hides what it would have allowed: no isolate/on_exhausted errors.
    found = issues(pooled("vcpus: {pool: nope}\nemulatorpin: {isolate: true}\non_exhausted: shared\n"))
    assert [i.key for i in found] == ["vcpus.pool"]


def test_pool_rule_errors_are_all_reported():
    found = issues(
        POOLS + "policies:\n"
        "  - {name: a, match: {}, vcpus: {pool: dedicated}, vcpupin: {0: 1}, on_exhausted: dedicated}\n"
        "  - {name: b, match: {}, emulatorpin: {isolate: true}, on_exhausted: fail}\n"
    )
    assert [(str(i.pos), i.key) for i in found] == [
        ("t.yaml:5:52", "vcpupin"),
        ("t.yaml:5:83", "on_exhausted"),
        ("t.yaml:6:40", "emulatorpin.isolate"),
        ("t.yaml:6:56", "on_exhausted"),
    ]
    assert "policy 'a'" in found[0].message and "policy 'b'" in found[3].message


@pytest.mark.parametrize(
    "value, listen",
    [('"127.0.0.1:9474"', "127.0.0.1:9474"), ("0.0.0.0:80", "0.0.0.0:80"), ('"[::]:9474"', "[::]:9474"),
     ('"[fe80::1%eth0]:1"', "[fe80::1%eth0]:1"), ("localhost:65535", "localhost:65535"),
     ("metrics.example.org:9474", "metrics.example.org:9474"), ("off", "off"), ('"off"', "off"), ("Off", "off"),
     ("false", "off"), ("no", "off"), ('"127.0.0.1:0"', "127.0.0.1:0"), ('"[::]:0"', "[::]:0"),
     ('" 0.0.0.0:080 "', "0.0.0.0:80"), ('"[FE80::1]:9474"', "[FE80::1]:9474")],
)
def test_metrics_listen(value, listen):
    assert parse(f"metrics:\n  listen: {value}\n").metrics_listen == listen


@pytest.mark.parametrize(
    "value, fragment",
    [('"9474"', "expected HOST:PORT"), ('"::1:9474"', "write an IPv6 address in brackets"),
     ('"[::1]"', "expected [IPV6]:PORT"), ('"[::1:9474"', "missing ']'"), ('"[1.2.3.4]:80"', "is not an IPv6 address"),
     ('"127.0.0.1:65536"', "port '65536' must be a number from 0 to 65535"),
     ('"127.0.0.1:"', "port ''"), ('"127.0.0.1:http"', "port 'http'"),
     ('":9474"', "the host is missing: write 0.0.0.0:9474 (every IPv4 interface) or [::]:9474 (every interface)"),
     ('"1.2.3.256:80"', "'1.2.3.256' is not an IPv4 address"), ('"bad_host:80"', "is not a host name or IP address"),
     ("1:30", "'1' is not an IPv4 address")],
)
def test_bad_metrics_listen(value, fragment):
    issue = one_issue(f"metrics:\n  listen: {value}\n")
    assert_issue(issue, "t.yaml:2:11", "for 'metrics.listen'", fragment, key="metrics.listen")


@pytest.mark.parametrize(
    "text, where, key, fragment",
    [
        ("metrics:\n  listen: on\n", "t.yaml:2:11", "metrics.listen",
         "'metrics.listen' must be HOST:PORT like \"127.0.0.1:9474\" or \"[::1]:9474\", or off, got a boolean ('on'"),
        ("metrics:\n  listen: [a]\n", "t.yaml:2:11", "metrics.listen", "got a list"),
        ("metrics: 127.0.0.1:9474\n", "t.yaml:1:10", "metrics",
         "'metrics' must be a mapping like {listen: \"127.0.0.1:9474\"}, got a string"),
        ("metrics:\n  lisen: off\n", "t.yaml:2:3", "metrics.lisen",
         "unknown key 'lisen' in 'metrics' (did you mean 'listen'?)"),
        ("listen: off\n", "t.yaml:1:1", "listen", "unknown key 'listen' at top level (it belongs under 'metrics')"),
        ("state_file: state.json\n", "t.yaml:1:13", "state_file",
         "'state_file' must be an absolute path, got 'state.json'"),
        ("state_file: /var/lib/vcpud/\n", "t.yaml:1:13", "state_file", "must name a file, not a directory"),
        ('state_file: "/var/\\0x"\n', "t.yaml:1:13", "state_file", "contains a NUL character"),
        ("state_file:\n", "t.yaml:1:12", "state_file",
         "'state_file' must be an absolute file path, got an empty value"),
        ("state_file: [/a]\n", "t.yaml:1:13", "state_file", "got a list"),
    ],
)
def test_bad_metrics_and_state_file(text, where, key, fragment):
    assert_issue(one_issue(text), where, fragment, key=key)


def test_pools_metrics_state_file_only_in_the_main_file(tmp_path):
    main = write(tmp_path / "vcpud.yaml", POOLS + "include: p.yaml\n")
    write(
        tmp_path / "p.yaml",
        'pools: {x: {cpus: "1"}}\nmetrics: {listen: off}\nstate_file: /x\n'
        "policies:\n  - {name: inc, match: {}, vcpus: {pool: dedicated}, on_exhausted: shared}\n",
    )
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    found = ei.value.issues
    assert [(str(i.pos), i.key) for i in found] == [
        (f"{tmp_path}/p.yaml:1:1", "pools"),
        (f"{tmp_path}/p.yaml:2:1", "metrics"),
        (f"{tmp_path}/p.yaml:3:1", "state_file"),
    ]
    assert found[0].message == "'pools' is only allowed in the main config file, not in an included one"
    # Included policies name the main file's pools.
    write(
        tmp_path / "p.yaml", "policies:\n  - {name: inc, match: {}, vcpus: {pool: dedicated}, on_exhausted: shared}\n"
    )
    (inc,) = load_config(main).policies
    assert inc.vcpus_rule == PlacementRule("dedicated") and inc.on_exhausted == "shared"


def uncomment(text: str, first: str) -> str:
    """Uncomment the example block whose first line is ``first`` (as in the file) and its deeper lines."""
    lines = text.splitlines()
    start = lines.index(first)
    indent = first[: len(first) - len(first.lstrip())]
    prefix = indent + "# "
    lines[start] = indent + lines[start][len(prefix):]
    n = start + 1
    while n < len(lines) and lines[n].startswith(prefix + " "):
        lines[n] = indent + lines[n][len(prefix):]
        n += 1
    return "\n".join(lines) + "\n"


def test_example_config_commented_blocks_load():
    text = (REPO / "config" / "vcpud.yaml").read_text()
    for first in ("# metrics:", "# state_file: /var/lib/vcpud/state.json", "# pools:", "  # - name: db-dedicated"):
        text = uncomment(text, first)
    cfg = parse_config_text(text, "example.yaml")
    assert cfg.metrics_listen == DEFAULT_METRICS_LISTEN and cfg.state_file == DEFAULT_STATE_FILE
    assert cfg.pools == {
        "dedicated": PoolSpec("dedicated", cpus("4-31"), True), "shared": PoolSpec("shared", cpus("2-3"))
    }
    db = next(p for p in cfg.policies if p.name == "db-dedicated")
    assert db.vcpus_rule == PlacementRule("dedicated", "mirror", "single", "l3")
    assert db.emulator_pool == "shared" and db.on_exhausted == "shared"
    # As shipped, with the blocks commented out: defaults, and no pools.
    shipped = load_config(REPO / "config" / "vcpud.yaml")
    assert shipped.pools == {} and shipped.metrics_listen == DEFAULT_METRICS_LISTEN
