"""Whole configs and the top-level keys of vcpud.config: defaults, executables, rescan_interval,
metrics.listen, state_file, error reporting, and the shipped example config."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from vcpud.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_EXECUTABLES,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_STATE_FILE,
    Config,
    ConfigError,
    ConfigIssue,
    Match,
    Position,
    load_config,
    parse_config_text,
)
from vcpud.pools import PlacementRule, PoolSpec

from tests.conftest import REPO
from tests.unit.config.helpers import TWO_CPUS, assert_issue, cpus, issues, one_issue, parse


# --- a good config and the defaults ------------------------------------------------------


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


# --- error reporting ---------------------------------------------------------------------


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


# --- rescan_interval ---------------------------------------------------------------------


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


# --- metrics and the state file ----------------------------------------------------------


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


# --- the shipped example -----------------------------------------------------------------


@pytest.mark.parametrize("online", [None, TWO_CPUS], ids=["any-host", "two-cpus"])
def test_example_config_loads(online):
    path = REPO / "config" / "vcpud.yaml"
    cfg = load_config(path, online=online)
    assert cfg.files == (str(path),)
    assert cfg.policies, "the example should show policies"
    assert {p.name for p in cfg.policies} >= {"core8", "web"}
    for p in cfg.policies:
        assert p.all_cpus() <= TWO_CPUS


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
