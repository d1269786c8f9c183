"""The vcpud command as an operator runs it: exit codes, output, and errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import SHARED_TOPOLOGIES, run_vcpud
from vcpud.cpuset import CpuSet

ONLINE = CpuSet.parse(Path("/sys/devices/system/cpu/online").read_text().strip())
OFFLINE_CPU = max(ONLINE) + 1


def test_topology_parse_matches_lscpu_for_every_dump(dump):
    name, root = dump
    p = run_vcpud("topology", "--sysroot", str(root), "--parse")
    assert p.returncode == 0, p.stderr
    assert p.stdout == (SHARED_TOPOLOGIES / f"{name}.parse").read_text()
    p = run_vcpud("topology", "--sysroot", str(root), "--parse", "--physical")
    assert p.returncode == 0, p.stderr
    assert p.stdout == (SHARED_TOPOLOGIES / f"{name}.parse-physical").read_text()


def test_topology_summary_and_json_of_this_host():
    p = run_vcpud("topology")
    assert p.returncode == 0, p.stderr
    assert "ocket" in p.stdout and ONLINE.format() in p.stdout
    j = run_vcpud("topology", "--json")
    assert j.returncode == 0, j.stderr
    assert json.loads(j.stdout)["online"] == ONLINE.format()


def test_topology_bad_sysroot(tmp_path):
    p = run_vcpud("topology", "--sysroot", str(tmp_path / "nope"))
    assert p.returncode != 0 and "Traceback" not in p.stderr and "nope" in p.stderr


def test_check_example_config():
    repo = Path(__file__).resolve().parents[1]
    p = run_vcpud("check", "--config", str(repo / "config" / "vcpud.yaml"))
    assert p.returncode == 0, p.stderr
    assert "OK" in p.stdout


GOOD = """\
policies:
  - name: a
    match: {name: a}
    vcpupin: {0: "0"}
"""

# (name, main file, {extra files}, expected line:col, expected words in the message)
BROKEN = [
    ("yaml-syntax", "policies:\n  - name: a\n    match: {name: [a\n", {}, "4:1", ["YAML"]),
    ("unknown-key", "policies:\n  - name: a\n    match: {}\n    vcpupinn: {0: 0}\n", {}, "4:5",
     ["vcpupinn", "did you mean 'vcpupin'"]),
    ("duplicate-key", "policies:\n  - name: a\n    match: {}\n    name: b\n", {}, "4:5", ["duplicate key 'name'"]),
    ("wrong-type", "policies: web\n", {}, "1:11", ["policies"]),
    ("bool-cpus", "policies:\n  - name: a\n    match: {}\n    affinity: on\n", {}, "4:15", ["affinity"]),
    ("bad-cpu-token", "policies:\n  - name: a\n    match: {}\n    emulatorpin: \"3-x\"\n", {}, "4:18",
     ["'3-x'", "emulatorpin"]),
    ("cpu-offline", f"policies:\n  - name: a\n    match: {{}}\n    vcpus: \"{OFFLINE_CPU}\"\n", {}, "4:12",
     [f"CPU {OFFLINE_CPU} is not online"]),
    ("duplicate-policy", GOOD + "  - name: a\n    match: {}\n", {}, "5:11", ["'a'", "vcpud.yaml:2)"]),
    ("missing-match", "policies:\n  - name: a\n    affinity: \"0\"\n", {}, "2:5", ["match"]),
    ("bad-regex", "policies:\n  - name: a\n    match: {cmdline: \"(\"}\n", {}, "3:22", ["cmdline"]),
    ("include-nothing", "include: policies.d/*.yaml\n" + GOOD, {}, "1:10", ["matches no file"]),
    ("include-unreadable", "include: policies.d/*.yaml\n" + GOOD, {"policies.d/x.yaml": b"\xff\xfe bad"}, "1:10",
     ["x.yaml"]),
    ("error-in-include", "include: policies.d/*.yaml\n" + GOOD,
     {"policies.d/10-web.yaml": "policies:\n  - name: web\n    match: {}\n    affinty: \"0\"\n"}, "4:5",
     ["affinty", "did you mean 'affinity'"]),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
@pytest.mark.parametrize("command", ["check", "apply"])
def test_broken_configs_give_positions_no_traceback(tmp_path, case, command):
    name, main, extra, linecol, words = case
    cfg = tmp_path / "vcpud.yaml"
    cfg.write_text(main)
    expect_file = str(cfg)
    for rel, content in extra.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        (f.write_bytes if isinstance(content, bytes) else f.write_text)(content)
        if name == "error-in-include":
            expect_file = str(f)
    p = run_vcpud(command, "--config", str(cfg))
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith(f"{expect_file}:{linecol}: ")]
    assert lines, f"no {expect_file}:{linecol}: line in:\n{p.stderr}"
    for w in words:
        assert any(w in ln for ln in lines), f"{w!r} not in {lines}"
    assert p.stdout == ""  # nothing was applied


def test_every_error_is_reported_at_once(tmp_path):
    cfg = tmp_path / "vcpud.yaml"
    cfg.write_text(textwrap.dedent("""\
        policies:
          - name: a
            match: {}
            vcpupin: {0: "x"}
            emulatorpin: "5-2"
          - name: a
            match: {nam: b}
        """))
    p = run_vcpud("check", "--config", str(cfg))
    assert p.returncode == 2
    positions = [ln.split(": ", 1)[0] for ln in p.stderr.splitlines() if ln.startswith(str(cfg))]
    assert positions == [f"{cfg}:4:18", f"{cfg}:5:18", f"{cfg}:6:11", f"{cfg}:7:13"], p.stderr


def test_missing_config(tmp_path):
    p = run_vcpud("check", "--config", str(tmp_path / "absent.yaml"))
    assert p.returncode == 2 and f"{tmp_path / 'absent.yaml'}:1:1:" in p.stderr and "Traceback" not in p.stderr


def test_ps_without_vms_points_to_the_demo(tmp_path):
    proc = tmp_path / "proc"  # an empty process list (the hidden --proc): a host without a single VM
    proc.mkdir()
    cfg = tmp_path / "vcpud.yaml"
    cfg.write_text(GOOD)
    p = run_vcpud("ps", "--proc", str(proc), "--config", str(cfg), check=True)
    assert p.stdout == ("no VMs found; to see vcpud at work, run `vcpud demo` "
                        "(as root: three tiny guests for about 30 s)\n")
    j = run_vcpud("ps", "--json", "--proc", str(proc), "--config", str(cfg), check=True)
    assert json.loads(j.stdout) == {"vms": [], "vanished": 0}, "machine-readable output unchanged"


@pytest.mark.parametrize("command", ["check", "apply", "ps", "plan", "run"])
def test_unreadable_sysroot_is_an_error_not_a_traceback(command, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    p = run_vcpud(command, "--sysroot", str(tmp_path / "nope"), "--config", str(repo / "config" / "vcpud.yaml"))
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "nope" in p.stderr, p.stderr


@pytest.mark.parametrize("value, fragment", [
    (":9474", "the host is missing: write 0.0.0.0:9474 (every IPv4 interface) or [::]:9474 (every interface)"),
    ("9474", "expected HOST:PORT"),
    ("127.0.0.1:65536", "port '65536' must be a number from 0 to 65535"),
])
def test_run_refuses_a_bad_metrics_listen_before_starting(value, fragment):
    p = run_vcpud("run", "--metrics-listen", value, "--config", "/nonexistent/vcpud.yaml")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"argument --metrics-listen: bad listen address {value!r}: {fragment}" in p.stderr


@pytest.mark.parametrize("value, want", [
    ("127.0.0.1:0", "127.0.0.1:0"), (" [::]:9474 ", "[::]:9474"), ("OFF", "off"), ("0.0.0.0:09474", "0.0.0.0:9474"),
])
def test_run_metrics_listen_takes_the_config_grammar(value, want):
    from vcpud.cli import build_parser

    assert build_parser().parse_args(["run", "--metrics-listen", value]).metrics_listen == want


# What a one-shot command must not import: libvirt-python (~11 MiB and tens of ms) while no VM
# its policies manage is libvirt's, the daemon with its event sources, journal, metrics server
# and snapshots, nor what only writing the state file (tempfile) or an unknown config key
# (difflib) needs; shutil comes with argparse's help formatter unless told otherwise.
ONE_SHOT_UNWANTED = ("libvirt", "libvirtmod", "vcpud.libvirt", "prometheus_client", "pyudev", "systemd",
                     "systemd.journal", "http.server", "socketserver", "wsgiref", "selectors", "vcpud.daemon",
                     "vcpud.metrics", "vcpud.sources", "vcpud.procconn", "vcpud.sdnotify", "vcpud.reloader",
                     "vcpud.publisher", "vcpud.snapshot", "tempfile", "shutil", "difflib")
# ...and what only `apply` needs, what `check` does not (pinning), what `topology` does not (the config)
APPLY_ONLY = ("vcpud.engine", "vcpud.reconciler", "vcpud.pinner", "vcpud.activity")
NOT_FOR = {"check": ("vcpud.pinning", "vcpud.placement", "vcpud.cgroups", "vcpud.holdings", "vcpud.state"),
           "topology": ("yaml", "vcpud.config", "vcpud.discovery", "vcpud.pinning", "vcpud.placement")}
IMPORTS_CHILD = """\
import contextlib, io, sys
from vcpud import cli
with contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(sys.argv[1:])
print(code, *sorted(sys.modules))
"""


@pytest.mark.parametrize("command", [
    ["apply", "--dry-run"], ["apply"], ["check"], ["ps"], ["ps", "--json"], ["plan"], ["plan", "--json"],
    ["plan", "--what-if", "x:2"], ["topology"], ["topology", "--json"], ["topology", "--parse"],
], ids=" ".join)
def test_one_shot_commands_import_no_daemon_and_no_libvirt(tmp_path, command):
    cfg = tmp_path / "vcpud.yaml"
    cfg.write_text(f"state_file: {tmp_path / 'state.json'}\n"
                   "policies:\n  - {name: nomatch, match: {name: 'nomatch*'}, affinity: '0'}\n")
    argv = command if command[0] == "topology" else [*command, "--config", str(cfg)]
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", IMPORTS_CHILD, *argv], capture_output=True, text=True, cwd=repo,
                       env=dict(os.environ, PYTHONPATH=str(repo)), timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    code, *modules = p.stdout.split()
    assert code == "0", p.stderr
    unwanted = ONE_SHOT_UNWANTED + (() if command[0] == "apply" else APPLY_ONLY) + NOT_FOR.get(command[0], ())
    assert sorted(set(unwanted) & set(modules)) == []
