"""The command line against hostile input (issue 9): sysfs dumps no kernel writes, a /proc that is
not there, bad --metrics-listen values, huge or many --what-if VMs, names holding escape sequences.

Every case runs ``vcpud.cli.main([...])`` in-process and wants an exit code with one clear line on
stderr, never an exception; a few subprocess checks make sure no traceback reaches a terminal.
"""

from __future__ import annotations

import functools
import os
import resource
import time
from pathlib import Path

import pytest

from tests.conftest import DUMPS, run_vcpud
from tests.proctree import load
from vcpud import cli
from vcpud.discovery import scan
from vcpud.topology import MAX_CPUS, TopologyError, read_topology

DUMP = "x86_64-64cpu"
CPU = "sys/devices/system/cpu"
BIG = "1" * 5000
ESC = "\x1b[2J\x1b]0;owned\x07"  # clear the screen, set the terminal's title


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small real dump (4 CPUs of x86_64-64cpu) to break, copied per test by `root`."""
    if DUMP not in DUMPS:
        pytest.fail(f"{DUMP} dump missing")
    from tests.conftest import SHARED_TOPOLOGIES, _unpack
    return _unpack(SHARED_TOPOLOGIES / f"{DUMP}.tar.gz", tmp_path_factory.mktemp("dump"))


@pytest.fixture
def root(base, tmp_path) -> Path:
    """A fresh copy of the parts of the dump the reader reads."""
    dst = tmp_path / "root"
    for rel in ("proc/cpuinfo", f"{CPU}/online", f"{CPU}/possible", f"{CPU}/present"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes((base / rel).read_bytes())
    for n in range(4):
        src = base / CPU / f"cpu{n}"
        for f in src.rglob("*"):
            if f.is_file() and "cpufreq" not in f.parts and "power" not in f.parts:
                t = dst / CPU / f"cpu{n}" / f.relative_to(src)
                t.parent.mkdir(parents=True, exist_ok=True)
                t.write_bytes(f.read_bytes())
    return dst


@pytest.fixture
def config(tmp_path) -> Path:
    cfg = tmp_path / "vcpud.yaml"
    cfg.write_text(f"""\
state_file: {tmp_path / 'state.json'}
pools:
  dedicated: {{cpus: "1-3", exclusive: true}}
policies:
  - name: w
    match: {{name: "w*"}}
    vcpus: {{pool: dedicated}}
""")
    return cfg


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr); an exception fails the test."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse's usage errors
        rc = e.code if isinstance(e.code, int) else 2
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- 1. --sysroot: one path for every command -------------------------------------------------
def _cpu8192(root: Path) -> str:
    (root / CPU / "cpu8192").mkdir()
    return f"{CPU}/cpu8192"


def _huge_online(root: Path) -> str:
    (root / CPU / "online").write_text(BIG + "\n")
    return f"{CPU}/online"


def _huge_range(root: Path) -> str:
    (root / CPU / "present").write_text("0-99999999\n")
    return f"{CPU}/present"


def _huge_cache_size(root: Path) -> str:
    (root / CPU / "cpu0/cache/index0/size").write_text(BIG + "K\n")
    return f"{CPU}/cpu0/cache/index0/size"


def _huge_core_id(root: Path) -> str:
    (root / CPU / "cpu1/topology/core_id").write_text(BIG + "\n")
    return f"{CPU}/cpu1/topology/core_id"


def _huge_processor(root: Path) -> str:
    with (root / "proc/cpuinfo").open("a") as f:
        f.write(f"processor\t: {BIG}\n")
    return "proc/cpuinfo"


def _huge_mask(root: Path) -> str:
    (root / CPU / "cpu0/topology/thread_siblings").write_text("f" * 60000 + "\n")
    return f"{CPU}/cpu0/topology/thread_siblings"


def _fifo_online(root: Path) -> str:
    (root / CPU / "online").unlink()
    os.mkfifo(root / CPU / "online")
    return f"{CPU}/online"


def _dev_zero_cpuinfo(root: Path) -> str:
    (root / "proc/cpuinfo").unlink()
    (root / "proc/cpuinfo").symlink_to("/dev/zero")
    return "proc/cpuinfo"


def _directory_core_id(root: Path) -> str:
    (root / CPU / "cpu0/topology/core_id").unlink()
    (root / CPU / "cpu0/topology/core_id").mkdir()
    return f"{CPU}/cpu0/topology/core_id"


def _oversize_online(root: Path) -> str:
    (root / CPU / "online").write_text("0" + " " * (1 << 20) + "\n")
    return f"{CPU}/online"


BREAKAGES = [_cpu8192, _huge_online, _huge_range, _huge_cache_size, _huge_core_id, _huge_processor, _huge_mask,
             _fifo_online, _dev_zero_cpuinfo, _directory_core_id, _oversize_online]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_read_topology_raises_topology_error_naming_the_file(root, breakage):
    rel = breakage(root)
    t0 = time.process_time()
    with pytest.raises(TopologyError) as info:
        read_topology(root)
    assert time.process_time() - t0 < 1
    assert isinstance(info.value, OSError)  # what the daemon catches
    assert str(root / rel) in str(info.value) and len(str(info.value)) < 400, str(info.value)


@pytest.mark.parametrize("command", ["topology", "check", "plan", "ps", "apply"])
@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_every_command_reports_a_bad_sysroot_the_same_way(root, config, tmp_path, capsys, command, breakage):
    rel = breakage(root)
    argv = [command, "--sysroot", str(root), "--proc", str(tmp_path)]
    if command != "topology":
        argv += ["--config", str(config)]
    rc, out, err = run(capsys, *argv)
    assert rc == 1 and out == ""
    assert err.startswith(f"vcpud: cannot read the CPU topology under {root}: {root / rel}: "), err
    assert err.count("\n") == 1 and len(err) < 500, err


def test_numbers_at_the_limits_are_read(root):
    (root / CPU / "cpu1/topology/core_id").write_text(f"{(1 << 31) - 1}\n")
    (root / CPU / "possible").write_text(f"0-{MAX_CPUS - 1}\n")
    t = read_topology(root)
    assert t.cpus[1].core_id == (1 << 31) - 1 and len(t.possible) == MAX_CPUS


def test_garbage_is_still_ignored_not_an_error(root):
    (root / CPU / "cpu0/topology/core_id").write_text("²\n")
    (root / CPU / "isolated").write_text("0-²\n")
    with (root / "proc/cpuinfo").open("a") as f:
        f.write("processor\t: ²\n")
    t = read_topology(root)
    assert t.cpus[0].core_id is None and not t.isolated


def test_no_traceback_reaches_the_terminal(root, config):
    _huge_online(root)
    for command in ("check", "plan", "ps"):
        p = run_vcpud(command, "--sysroot", str(root), "--config", str(config))
        assert p.returncode == 1 and "Traceback" not in p.stderr and "online" in p.stderr, p.stderr


# --- 2. the hidden --proc --------------------------------------------------------------------
@pytest.mark.parametrize("command", ["ps", "apply", "plan"])
@pytest.mark.parametrize("proc", ["/nonexistent", "/etc/hostname"])
def test_an_unreadable_proc_is_an_error(command, proc, capsys):
    example = Path(__file__).resolve().parents[1] / "config" / "vcpud.yaml"  # loads on this host
    rc, out, err = run(capsys, command, "--proc", proc, "--config", str(example))
    assert rc == 1, err
    assert f"vcpud: cannot read the process list in {proc!r}" in err and err.count("\n") == 1, err


def test_an_unreadable_proc_through_the_real_command():
    p = run_vcpud("ps", "--proc", "/nonexistent")
    assert p.returncode == 1 and "Traceback" not in p.stderr and "/nonexistent" in p.stderr, p.stderr


# --- 3. --metrics-listen ---------------------------------------------------------------------
@pytest.mark.parametrize("value, fragment", [
    ("a..b:0", "'a..b' is not a host name"),
    ("a" * 300 + ":9474", "longer than 253 characters"),
    (".".join(["a" * 63] * 4) + ":1", "longer than 253 characters"),
    ("a" * 64 + ".example:1", "is not a host name"),
    ("host.example.:1", "is not a host name"),
    ("-a.example:1", "is not a host name"),
    ("a-.example:1", "is not a host name"),
    ("a_b:1", "is not a host name"),
    ("bücher.example:1", "is not a host name"),
    ("a\x1b[2J:1", "bad listen address 'a\\x1b[2J:1'"),
    ("a\x1b.b:1", "is not a host name"),
    ("127.0.0.1:" + "9" * 5000, "must be a number from 0 to 65535"),
    ("127.0.0.1:٣", "must be a number from 0 to 65535"),
    ("[::1]:" + "1" * 5000, "must be a number from 0 to 65535"),
])
def test_bad_metrics_listen_is_a_usage_error(value, fragment, capsys):
    rc, _, err = run(capsys, "run", f"--metrics-listen={value}", "--config", "/nonexistent/vcpud.yaml")
    assert rc == 2 and fragment in err, err
    assert len(err.splitlines()[-1]) < 400, err  # the input is cut, not echoed whole
    assert "\x1b" not in err


@pytest.mark.parametrize("value", ["a.b:0", ".".join(["a" * 63] * 3) + "." + "a" * 61 + ":1", "0x7f.1:9474"])
def test_good_host_names_still_parse(value):
    assert cli._listen_arg(value) == value


# --- 4. plan --what-if -----------------------------------------------------------------------
def _usage(capsys, root, config, *what_if: str) -> tuple[int, str, str, float]:
    t0 = time.process_time()
    rc, out, err = run(capsys, "plan", "--sysroot", str(root), "--config", str(config), *what_if)
    return rc, out, err, time.process_time() - t0


@pytest.mark.parametrize("spec", ["w1:10000000", "w1:4097", "w1:" + "9" * 5000, "w1:2:" + "9" * 5000])
def test_a_vm_larger_than_kvm_allows_is_refused_at_once(root, config, capsys, spec):
    rc, out, err, cpu = _usage(capsys, root, config, "--what-if", spec)
    assert rc == 2 and out == "" and cpu < 2
    assert ("at most 4096 vCPUs" in err or "more threads per core" in err) and len(err) < 300, err


def test_the_largest_vm_is_still_planned(root, config, capsys):
    rc, out, err, cpu = _usage(capsys, root, config, "--what-if", "w1:4096")
    assert rc == 0 and out.startswith("w1 ") and cpu < 5, err


def test_more_than_max_what_if_is_refused(root, config, capsys):
    many = [a for i in range(cli.MAX_WHAT_IF + 1) for a in ("--what-if", f"w{i}:1")]
    rc, out, err, cpu = _usage(capsys, root, config, *many)
    assert rc == 2 and f"at most {cli.MAX_WHAT_IF}" in err and cpu < 5, err


def test_fifty_thousand_what_if_flags_are_refused_before_argparse(root, config, capsys):
    many = [a for i in range(50_000) for a in ("--what-if", f"w{i}:1")]
    rc, out, err, cpu = _usage(capsys, root, config, *many)
    assert rc == 2 and "too many" in err and f"at most {cli.MAX_WHAT_IF} --what-if" in err and cpu < 2, err


def test_max_what_if_vms_are_planned(root, config, capsys):
    many = [a for i in range(cli.MAX_WHAT_IF) for a in ("--what-if", f"w{i}:1")]
    rc, out, err, cpu = _usage(capsys, root, config, *many)
    assert rc == 0 and cpu < 10, err
    assert [ln.split()[0] for ln in out.splitlines() if ln.startswith("w")] == [f"w{i}" for i in range(cli.MAX_WHAT_IF)]


@pytest.mark.parametrize("spec", ["a:²", "a:٣", "a:0", "a:2:0", "a:-1", ":2", "a", "a:1:2:3", "a: 2", "a:0x2"])
def test_bad_what_if_says_what_is_expected(root, config, capsys, spec):
    rc, out, err, _ = _usage(capsys, root, config, "--what-if", spec)
    assert rc == 2 and "expected NAME:VCPUS[:THREADS], VCPUS and THREADS positive decimal numbers" in err, err
    assert "invalid literal" not in err


def test_what_if_names_are_printed_escaped(root, config, capsys):
    name = f"w{ESC}\nfake line\\"
    rc, out, err, _ = _usage(capsys, root, config, "--what-if", f"{name}:2", "-v")
    assert rc == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\nfake line" not in out
    assert out.startswith("w\\x1b[2J\\x1b]0;owned\\x07\\x0afake line\\\\ "), out
    rc, out, err, _ = _usage(capsys, root, config, "--what-if", f"{name}:2", "--json")
    assert rc == 0 and "\x1b" not in out and '"name": "w\\u001b[2J' in out


def test_a_bad_what_if_name_is_escaped_in_the_error(root, config, capsys):
    rc, out, err, _ = _usage(capsys, root, config, "--what-if", f"{ESC}:²")
    assert rc == 2 and "\x1b" not in err and "\\x1b" in err


# --- 4. ps: a guest's -name and thread names ---------------------------------------------------
def test_ps_escapes_names_from_the_guest(tmp_path, root, monkeypatch, capsys):
    (tmp_path / "empty.yaml").write_text(f"state_file: {tmp_path / 'state.json'}\n")
    tree = load(tmp_path / "proc")
    pid = tree.pid("named")
    cmdline = (tmp_path / "proc" / str(pid) / "cmdline").read_bytes().split(b"\0")
    i = cmdline.index(b"-name")
    cmdline[i + 1] = f"guest=evil{ESC}\nx,debug-threads=on".encode()
    (tmp_path / "proc" / str(pid) / "cmdline").write_bytes(b"\0".join(cmdline))
    tid = tree.tid_by_comm(pid, "CPU 0/KVM")
    tree.rename_thread(pid, tid, "C\x1b[31m\tx")
    monkeypatch.setattr(cli, "scan", functools.partial(scan, exe_check=tree.exe_check()))
    rc, out, err = run(capsys, "ps", "--proc", str(tmp_path / "proc"), "--sysroot", str(root),
                       "--config", str(tmp_path / "empty.yaml"))
    assert rc == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\t" not in out
    assert "evil\\x1b[2J\\x1b]0;owned\\x07\\x0ax" in out, out
    assert "C\\x1b[31m\\x09x" in out, out
    rc, out, err = run(capsys, "ps", "--json", "--proc", str(tmp_path / "proc"), "--sysroot", str(root),
                       "--config", str(tmp_path / "empty.yaml"))
    assert rc == 0 and "\x1b" not in out and "evil\\u001b[2J" in out


def test_show_and_printable_lines():
    assert cli.show("web1 ok-é") == "web1 ok-é"
    assert cli.show("a\\b\x1b\u202e\U000e0001") == "a\\\\b\\x1b\\u202e\\U000e0001"
    assert cli.printable_lines("a\x1b\nb\\") == "a\\x1b\nb\\"


def test_memory_stays_small():
    # The checks above run in this process; a 10,000,000-vCPU plan took 1.8 GB before.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 600_000  # KiB
