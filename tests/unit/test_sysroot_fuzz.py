"""Fuzzing --sysroot (issue 9): trees cut from the real machines' sysfs dumps, then broken.

Files and directories deleted, values truncated, replaced with huge numbers or garbage bytes,
made a FIFO, a directory or a link to /dev/zero. Every command runs in-process through
``vcpud.cli.main`` and must return 0, 1 or 2 without raising, each run within 1 s of CPU and
without raising the process's peak RSS by 200 MB. Seeded (derandomize=True): the same trees every run.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import DUMPS, SHARED_TOPOLOGIES, run_vcpud
from vcpud import cli

CPUS_KEPT = 4  # CPU directories kept from each dump: enough topology, small trees
# What the topology reader opens, relative to the root.
_WANTED = re.compile(
    r"(proc/cpuinfo"
    r"|sys/devices/system/cpu/(possible|present|online|isolated|nohz_full)"
    r"|sys/devices/system/cpu/cpu(\d+)/(online|topology/[a-z_]+|cache/index\d+/[a-z_]+|l[12]_[di]?cache_size)"
    r"|sys/devices/system/node/node\d+/(cpumap|cpulist))\Z")

Tree = dict[str, bytes]


def _cut(root: Path) -> Tree:
    tree: Tree = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        m = _WANTED.match(rel)
        if m and p.is_file() and not p.is_symlink() and (m.group(3) is None or int(m.group(3)) < CPUS_KEPT):
            tree[rel] = p.read_bytes()
    return tree


@pytest.fixture(scope="module")
def trees(unpacked) -> dict[str, Tree]:
    if not DUMPS:
        pytest.fail(f"no topology dumps in {SHARED_TOPOLOGIES}")
    return {name: _cut(unpacked(name)) for name in DUMPS}


HUGE = ["1" * 5000, "9" * 21, "-" + "1" * 5000, "0-99999999", "8192", "0-8192", "f" * 3000, "ffffffff," * 2000,
        "4294967296", "18446744073709551616K", "processor\t: " + "7" * 5000, "cpu number : 99999"]
GARBAGE = [b"\xff\xfe\x00garbage", b"\x00" * 100, b"\x1b[2J\x1b]0;t\x07", b"\xb2", "٣".encode(), b"0-", b",", b"-1",
           b"(null)", b"", b"0x", b" \n\t", "²".encode()]

# Half the time one of the files every tree has and every command depends on, else any file.
KEY_FILES = ["sys/devices/system/cpu/online", "sys/devices/system/cpu/present", "sys/devices/system/cpu/possible",
             "proc/cpuinfo", "sys/devices/system/cpu/cpu0/topology/thread_siblings",
             "sys/devices/system/cpu/cpu0/topology/core_cpus_list", "sys/devices/system/cpu/cpu1/topology/core_id",
             "sys/devices/system/cpu/cpu0/cache/index0/size", "sys/devices/system/cpu/cpu0/cache/index3/shared_cpu_map",
             "sys/devices/system/node/node0/cpulist"]
target = st.one_of(st.sampled_from(KEY_FILES), st.integers(0, 10**6))
mutation = st.one_of(
    st.tuples(st.just("delete"), target),
    st.tuples(st.just("delete-dir"), target),
    st.tuples(st.just("truncate"), target, st.integers(0, 8)),
    st.tuples(st.just("huge"), target, st.sampled_from(HUGE)),
    st.tuples(st.just("garbage"), target, st.sampled_from(GARBAGE)),
    st.tuples(st.just("bytes"), target, st.binary(max_size=40)),
    st.tuples(st.just("fifo"), target),
    st.tuples(st.just("directory"), target),
    st.tuples(st.just("dev-zero"), target),
    st.tuples(st.just("new-cpu"), st.sampled_from(["cpu8191", "cpu8192", "cpu99999999", "cpu" + "9" * 200])),
)


def hash_index(where: int | str) -> int:
    return where if isinstance(where, int) else sum(where.encode())


def _mutate(tree: Tree, mutations: list[tuple]) -> tuple[Tree, dict[str, str]]:
    """The tree with ``mutations`` applied, and the special files to make: path -> fifo|dir|zero."""
    files = dict(tree)
    special: dict[str, str] = {}
    for kind, where, *arg in mutations:
        names = sorted(files)
        if kind == "new-cpu":
            files[f"sys/devices/system/cpu/{where}/topology/core_id"] = b"0\n"
            continue
        if not names:
            break
        name = where if isinstance(where, str) and where in files else names[hash_index(where) % len(names)]
        if kind == "delete":
            del files[name]
        elif kind == "delete-dir":
            parent = name.rsplit("/", 1)[0]
            for n in [n for n in files if n.startswith(parent + "/")]:
                del files[n]
        elif kind == "truncate":
            files[name] = files[name][: arg[0]]
        elif kind == "huge":
            files[name] = arg[0].encode() + b"\n"
        elif kind in ("garbage", "bytes"):
            files[name] = arg[0]
        else:
            del files[name]
            special[name] = kind
    return files, special


def _write(root: Path, files: Tree, special: dict[str, str]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for rel, kind in special.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        # a special file replaces whatever the mutations put at that path before it
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        if kind == "fifo":
            os.mkfifo(p)
        elif kind == "directory":
            p.mkdir()
        else:
            p.symlink_to("/dev/zero")
    (root / "sys/devices/system/cpu").mkdir(parents=True, exist_ok=True)


def _config(tmp: Path) -> Path:
    cfg = tmp / "vcpud.yaml"
    cfg.write_text(f"""\
state_file: {tmp / 'state.json'}
pools:
  dedicated: {{cpus: "0", exclusive: true}}
policies:
  - name: w
    match: {{name: "w*"}}
    vcpus: {{pool: dedicated, smt: mirror, numa: single, cache: l3}}
    on_exhausted: leave
""")
    return cfg


def _commands(root: Path, cfg: Path, proc: Path) -> list[list[str]]:
    sysroot = ["--sysroot", str(root)]
    conf = ["--config", str(cfg)]
    return [
        ["topology", *sysroot],
        ["topology", "--parse", *sysroot],
        ["topology", "--json", *sysroot],
        ["check", *sysroot, *conf],
        ["plan", *sysroot, *conf, "--what-if", "w1:2", "--what-if", "w2:4:2", "-v"],
        ["ps", *sysroot, *conf, "--proc", str(proc)],
    ]


def _run_in_process(argv: list[str]) -> tuple[int, float]:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.process_time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    cpu = time.process_time() - t0
    assert "Traceback" not in err.getvalue()
    if rc != 0:
        assert err.getvalue().strip(), (argv, "failed without saying why")
    return rc, cpu


@settings(derandomize=True, max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(dump=st.sampled_from(sorted(DUMPS) or ["none"]), mutations=st.lists(mutation, max_size=6))
def test_every_command_survives_a_broken_sysroot(trees, dump, mutations):
    files, special = _mutate(trees[dump], mutations)
    # The process's peak before this example: what other tests in this process did does not count.
    start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        root = tmp / "root"
        _write(root, files, special)
        (tmp / "proc").mkdir()
        cfg = _config(tmp)
        for argv in _commands(root, cfg, tmp / "proc"):
            rc, cpu = _run_in_process(argv)
            assert rc in (0, 1, 2), (argv, rc)
            assert cpu < 1.0, (argv, cpu)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_kb) / 1024
    assert grown_mb < 200, grown_mb


def test_the_fuzzer_breaks_things(trees):
    """The mutations reach the reader: some trees fail to read, and untouched ones read fine."""
    name = sorted(trees)[0]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "root"
        _write(root, *_mutate(trees[name], []))
        assert _run_in_process(["topology", "--sysroot", str(root)])[0] == 0
        root2 = Path(d) / "root2"
        files, special = _mutate(trees[name], [("fifo", "sys/devices/system/cpu/online")])
        _write(root2, files, special)
        assert _run_in_process(["topology", "--sysroot", str(root2)])[0] == 1


def test_no_traceback_from_the_real_command(trees, tmp_path):
    """One subprocess per command over a tree with a huge number, a FIFO and /dev/zero in it."""
    name = "x86_64-64cpu" if "x86_64-64cpu" in trees else sorted(trees)[0]
    files, special = _mutate(trees[name], [
        ("dev-zero", "proc/cpuinfo"),
        ("fifo", "sys/devices/system/cpu/cpu0/topology/core_id"),
    ])
    root = tmp_path / "root"
    _write(root, files, special)
    (tmp_path / "proc").mkdir()
    for argv in _commands(root, _config(tmp_path), tmp_path / "proc")[::3]:
        p = run_vcpud(*argv)
        assert p.returncode == 1 and "Traceback" not in p.stderr and "cannot read the CPU topology" in p.stderr, \
            p.stderr
    shutil.rmtree(root)
