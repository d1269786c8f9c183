import json
import os
import shutil
from pathlib import Path

import pytest

from vcpud.cpuset import CpuSet
from vcpud.cli import main
from vcpud.lscpu import PARSE_HEADER, format_parse, format_summary
from vcpud.topology import Cpu, Topology, read_topology

from tests.conftest import DUMPS, SHARED_TOPOLOGIES as SHARED, skip_or_fail as _missing


@pytest.fixture(scope="session")
def topo_of(unpacked):
    cache: dict[str, Topology] = {}

    def get(name: str) -> Topology:
        if name not in DUMPS:
            _missing(f"topology dump {name!r} not found in {SHARED.resolve()}")
        if name not in cache:
            cache[name] = read_topology(unpacked(name))
        return cache[name]

    return get


def test_shared_dumps_present():
    if not DUMPS:
        _missing(f"no topology dumps (*.tar.gz) in {SHARED.resolve()}")
    for name in DUMPS:
        for suffix in (".parse", ".parse-physical"):
            assert (SHARED / f"{name}{suffix}").is_file(), f"{name}{suffix} missing beside {name}.tar.gz"


# --- lscpu --parse compatibility --------------------------------------------------------


def test_format_parse_matches_lscpu(dump):
    name, root = dump
    expected = (SHARED / f"{name}.parse").read_text()
    assert format_parse(read_topology(root)) == expected


def test_format_parse_physical_matches_lscpu(dump):
    name, root = dump
    expected = (SHARED / f"{name}.parse-physical").read_text()
    assert format_parse(read_topology(root), physical=True) == expected


def test_read_topology_accepts_str_root(dump):
    _, root = dump
    assert read_topology(str(root)) == read_topology(root)


# --- model ---------------------------------------------------------------------------

EXPECTED = {
    # name: (sockets, cores, threads/core, NUMA nodes, L3 domains, online, offline)
    "x86_64-64cpu": (4, 32, 2, [0, 2, 3], 4, "0-63", ""),
    "x86_64-dell_e4310": (1, 2, 2, [0], 1, "0-3", ""),
    "arm-A510-A710-A715-X3": (3, 8, 1, [], 1, "0-7", ""),
    "ppc64-POWER7-64cpu": (16, 16, 4, [0, 1], 0, "0-63", ""),
    "vmware_fpe": (2, 8, 2, [0, 1, 2, 3], 4, "0-15", ""),
    "s390-lpar": (7, 17, 1, [], 0, "1-5,8-19", "0,6-7"),
    "rv64-visionfive2": (1, 4, 1, [0], 0, "0-3", ""),
    "armv7": (1, 2, 1, [], 0, "0-1", ""),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_counts(topo_of, name):
    sockets, cores, threads, nodes, l3, online, offline = EXPECTED[name]
    t = topo_of(name)
    assert len(t.sockets) == sockets
    assert len(t.cores) == cores
    assert t.smt_threads_per_core == threads
    assert sorted(t.nodes) == nodes
    assert len(t.l3_domains) == l3
    assert t.online == CpuSet.parse(online)
    assert t.offline == (CpuSet.parse(offline) if offline else CpuSet())


def test_model_invariants(dump):
    _, root = dump
    t = read_topology(root)
    ids = [c.cpu for c in t.cpus]
    assert ids == sorted(set(ids))
    assert t.online <= t.present <= t.possible
    assert t.offline == t.present - t.online
    assert {c.cpu for c in t.cpus if c.online} == t.online.cpus
    for c in t.cpus:
        assert c.cpu_type is None or 0 <= c.cpu_type < len(t.cpu_types)
        if c.siblings:
            assert c.cpu in c.siblings
            assert c.siblings <= c.package_cpus or not c.package_cpus
        if c.node is not None:
            assert c.cpu in t.nodes[c.node]
        for ca in c.caches:
            assert ca.type in ("Data", "Instruction", "Unified")
            assert ca.level >= 1
            assert ca.name.startswith(f"L{ca.level}")
    # every online CPU is in exactly one core
    for cpu in t.online:
        assert sum(cpu in core for core in t.cores) == 1


def test_x86_64_64cpu_details(topo_of):
    t = topo_of("x86_64-64cpu")
    assert t.nodes[2] == CpuSet.of(range(1, 64, 4))
    assert t.nodes[3] == CpuSet.of(range(3, 64, 4))
    assert t.nodes[0] == CpuSet.of(range(0, 64, 2))
    cpu1 = t.cpus[1]
    assert (cpu1.core_id, cpu1.package_id, cpu1.node) == (0, 2, 2)
    assert cpu1.siblings == CpuSet.parse("1,33")
    assert [ca.name for ca in cpu1.caches] == ["L1d", "L1i", "L2", "L3"]
    l3 = cpu1.caches[-1]
    assert l3.size == 18 * 1024 * 1024 and l3.shared_cpus == cpu1.package_cpus
    assert CpuSet.parse("1,5,9,13,17,21,25,29,33,37,41,45,49,53,57,61") in t.l3_domains
    assert t.possible == CpuSet.parse("0-79") and t.present == CpuSet.parse("0-63")
    assert t.isolated == CpuSet() and t.nohz_full == CpuSet()


def test_s390_offline_cpus_without_topology(topo_of):
    t = topo_of("s390-lpar")
    assert t.offline == CpuSet.parse("0,6,7")
    assert t.present == CpuSet.parse("0-19") and t.possible == CpuSet.parse("0-63")
    cpu0 = t.cpus[0]
    assert cpu0 == Cpu(cpu=0, online=False, cpu_type=0)
    cpu8 = next(c for c in t.cpus if c.cpu == 8)
    assert (cpu8.book, cpu8.core_id, cpu8.package_id, cpu8.node) == (4, 1, None, None)
    assert not t.nodes
    parse_rows = [line.split(",")[0] for line in format_parse(t).splitlines() if not line.startswith("#")]
    assert CpuSet.parse(",".join(parse_rows)) == t.online


def test_big_little_cpu_types(topo_of):
    t = topo_of("arm-A510-A710-A715-X3")
    assert [ct.model for ct in t.cpu_types] == ["0xd46", "0xd47", "0xd4d", "0xd4e"]
    by_type = {}
    for c in t.cpus:
        by_type.setdefault(t.cpu_types[c.cpu_type].model, []).append(c.cpu)
    assert by_type == {"0xd46": [0, 1, 2], "0xd4d": [3, 4], "0xd47": [5, 6], "0xd4e": [7]}
    assert t.isolated == CpuSet()


def test_ppc64_package_id_minus_one_is_unknown(topo_of):
    t = topo_of("ppc64-POWER7-64cpu")
    assert all(c.package_id is None for c in t.cpus)
    assert t.nodes[1] == CpuSet()  # memory-only node
    assert len(t.cpu_types) == 1  # the trailing "model : IBM,..." section is not a second type
    assert t.cpu_types[0].model_name == "POWER7 (architected), altivec supported"


def test_armv7_without_cache_or_numa(topo_of):
    t = topo_of("armv7")
    assert all(c.caches == () and c.node is None for c in t.cpus)
    assert t.l3_domains == () and not t.nodes
    assert format_parse(t).splitlines()[3] == "# CPU,Core,Socket,Node"


def test_vmware_cache_ids_come_from_sysfs(topo_of):
    t = topo_of("vmware_fpe")
    l1d = [ca.id for c in t.cpus for ca in c.caches if ca.name == "L1d"]
    assert l1d == list(range(32, 40)) + list(range(64, 72))


# --- summary and JSON ------------------------------------------------------------------


def test_format_summary(dump):
    _, root = dump
    t = read_topology(root)
    text = format_summary(t)
    assert text.endswith("\n")
    assert "Socket(s):" in text
    socket_line = next(line for line in text.splitlines() if line.startswith("Socket(s):"))
    assert socket_line.split()[-1] == str(len(t.sockets))
    assert f"Thread(s) per core: {t.smt_threads_per_core}" in " ".join(text.split())
    for node in t.nodes:
        assert f"node{node}:" in text
    for dom in t.l3_domains:
        assert dom.format() in text


def test_to_json(dump):
    _, root = dump
    t = read_topology(root)
    data = json.loads(json.dumps(t.to_json()))
    assert data["online"] == t.online.format()
    assert len(data["cpus"]) == len(t.cpus)
    assert [c["cpu"] for c in data["cpus"]] == [c.cpu for c in t.cpus]
    assert data["nodes"] == {str(n): s.format() for n, s in t.nodes.items()}
    assert data["smt_threads_per_core"] == t.smt_threads_per_core


def test_topology_is_frozen_and_hashable(topo_of):
    t = topo_of("x86_64-dell_e4310")
    with pytest.raises(AttributeError):
        t.online = CpuSet()  # type: ignore[misc]
    with pytest.raises(TypeError):
        t.nodes[5] = CpuSet()  # type: ignore[index]
    assert hash(t) == hash(topo_of("x86_64-dell_e4310"))


# --- missing and odd files (synthetic roots) ---------------------------------------------


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_bare_cpu_dirs_only(tmp_path):
    for n in range(2):
        (tmp_path / f"sys/devices/system/cpu/cpu{n}").mkdir(parents=True)
    t = read_topology(tmp_path)
    assert [c.cpu for c in t.cpus] == [0, 1]
    assert t.online == t.present == t.possible == CpuSet.parse("0-1")
    assert t.cpu_types == () and not t.nodes
    assert t.cores == (CpuSet.of([0]), CpuSet.of([1]))
    assert t.sockets == ()
    assert format_parse(t).splitlines()[3:] == ["# CPU,Core,Socket,Node", "0,,,", "1,,,"]
    assert format_parse(t, physical=True).splitlines()[4:] == ["0,-,-,", "1,-,-,"]
    format_summary(t)
    json.dumps(t.to_json())


def test_per_cpu_online_files_when_online_list_missing(tmp_path):
    (tmp_path / "sys/devices/system/cpu/cpu0").mkdir(parents=True)
    _write(tmp_path, "sys/devices/system/cpu/cpu1/online", "0\n")
    _write(tmp_path, "sys/devices/system/cpu/cpu2/online", "1\n")
    t = read_topology(tmp_path)
    assert t.online == CpuSet.parse("0,2")
    assert t.offline == CpuSet.parse("1")


@pytest.mark.parametrize(
    "text,expected",
    [("(null)\n", ""), ("\n", ""), ("", ""), ("2-3\n", "2-3"), ("1,3\n", "1,3")],
)
def test_nohz_full_and_isolated(tmp_path, text, expected):
    _write(tmp_path, "sys/devices/system/cpu/online", "0-3\n")
    _write(tmp_path, "sys/devices/system/cpu/nohz_full", text)
    _write(tmp_path, "sys/devices/system/cpu/isolated", text)
    t = read_topology(tmp_path)
    want = CpuSet.parse(expected) if expected else CpuSet()
    assert t.nohz_full == want and t.isolated == want


def test_garbage_files_are_ignored(tmp_path):
    _write(tmp_path, "sys/devices/system/cpu/online", "0-1\n")
    _write(tmp_path, "sys/devices/system/cpu/isolated", "banana\n")
    _write(tmp_path, "sys/devices/system/cpu/cpu0/topology/core_id", "x\n")
    _write(tmp_path, "sys/devices/system/cpu/cpu0/topology/thread_siblings", "zz\n")
    _write(tmp_path, "sys/devices/system/cpu/cpu0/topology/thread_siblings_list", "0\n")
    _write(tmp_path, "sys/devices/system/cpu/cpu0/cache/index0/level", "1\n")  # no type: skipped
    _write(tmp_path, "sys/devices/system/cpu/cpu0/cache/index1/level", "2\n")
    _write(tmp_path, "sys/devices/system/cpu/cpu0/cache/index1/type", "Unified\n")
    _write(tmp_path, "sys/devices/system/cpu/cpu0/cache/index1/size", "1024K\n")
    _write(tmp_path, "sys/devices/system/cpu/cpu0/cache/index1/shared_cpu_list", "0-1\n")
    _write(tmp_path, "proc/cpuinfo", "junk without colon\nprocessor\t: 0\nmodel name\t: Test CPU\n\n")
    t = read_topology(tmp_path)
    c0 = t.cpus[0]
    assert t.isolated == CpuSet()
    assert c0.core_id is None
    assert c0.siblings == CpuSet.parse("0")
    assert [(ca.name, ca.size, ca.shared_cpus, ca.id) for ca in c0.caches] == [("L2", 1 << 20, CpuSet.parse("0-1"), 0)]
    assert [ct.model_name for ct in t.cpu_types] == ["Test CPU"]
    assert [c.cpu_type for c in t.cpus] == [0, 0]  # CPUs missing from cpuinfo get the default type


def test_missing_cpu_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sys/devices/system/cpu"):
        read_topology(tmp_path)



# --- legacy per-CPU cache files (sparc) ------------------------------------------------

_LEGACY_PREFIX = {("1", "Data"): "l1_d", ("1", "Instruction"): "l1_i", ("2", "Unified"): "l2_", ("3", "Unified"): "l3_"}


def _to_legacy_caches(root: Path) -> None:
    """Rewrite cpuN/cache/indexM/ as the cpuN/lX_Ycache_size files sparc kernels write (sizes in bytes)."""
    for cpu in sorted((root / "sys/devices/system/cpu").glob("cpu[0-9]*")):
        cache = cpu / "cache"
        if not cache.is_dir():
            continue
        for idx in sorted(cache.glob("index[0-9]*")):
            prefix = _LEGACY_PREFIX[((idx / "level").read_text().strip(), (idx / "type").read_text().strip())]
            size = (idx / "size").read_text().strip()
            assert size.endswith("K"), size
            (cpu / f"{prefix}cache_size").write_text(f"{int(size[:-1]) * 1024}\n")
            (cpu / f"{prefix}cache_line_size").write_text((idx / "coherency_line_size").read_text())
        shutil.rmtree(cache)


@pytest.fixture()
def legacy_dell(unpacked, tmp_path):
    if "x86_64-dell_e4310" not in DUMPS:
        _missing(f"topology dump 'x86_64-dell_e4310' not found in {SHARED.resolve()}")
    root = tmp_path / "dell-legacy"
    shutil.copytree(unpacked("x86_64-dell_e4310"), root, symlinks=True)
    _to_legacy_caches(root)
    assert (root / "sys/devices/system/cpu/cpu3/l3_cache_size").read_text() == "3145728\n"
    return root


# What util-linux 2.38.1 `lscpu --sysroot DIR -p [--physical]` prints for the dell dump rewritten by
# _to_legacy_caches: every cache private to its CPU, and no L3 (lscpu reads l1_i, l1_d and l2_ only).
_LEGACY_DELL_PARSE = (
    "# CPU,Core,Socket,Node,,L1d,L1i,L2\n"
    "0,0,0,0,,0,0,0\n"
    "1,1,0,0,,1,1,1\n"
    "2,0,0,0,,2,2,2\n"
    "3,1,0,0,,3,3,3\n"
)
_LEGACY_DELL_PHYSICAL = (
    "# CPU,Core,Socket,Node,,L1d,L1i,L2\n"
    "0,0,0,0,,0,0,0\n"
    "1,2,0,0,,1,1,1\n"
    "2,0,0,0,,2,2,2\n"
    "3,2,0,0,,3,3,3\n"
)


def test_legacy_cache_files_match_lscpu(legacy_dell):
    t = read_topology(legacy_dell)
    assert format_parse(t) == PARSE_HEADER + _LEGACY_DELL_PARSE
    assert format_parse(t, physical=True) == PARSE_HEADER + _LEGACY_DELL_PHYSICAL
    assert [(ca.name, ca.size, ca.shared_cpus, ca.id) for ca in t.cpus[2].caches] == [
        ("L1d", 32 << 10, CpuSet.of([2]), 2),
        ("L1i", 32 << 10, CpuSet.of([2]), 2),
        ("L2", 256 << 10, CpuSet.of([2]), 2),
    ]
    assert t.l3_domains == ()


def test_legacy_cache_files_through_the_cli(legacy_dell, capsys):
    assert main(["topology", "--sysroot", str(legacy_dell), "--parse"]) == 0
    assert capsys.readouterr().out == PARSE_HEADER + _LEGACY_DELL_PARSE


def test_legacy_cache_files_when_lscpu_ignores_them(tmp_path):
    cpu = "sys/devices/system/cpu"
    _write(tmp_path, f"{cpu}/online", "0-2\n")
    # cpu0: no l1_icache_size, so lscpu does not look at the other legacy files
    _write(tmp_path, f"{cpu}/cpu0/l1_dcache_size", "16384\n")
    _write(tmp_path, f"{cpu}/cpu0/l2_cache_size", "4194304\n")
    # cpu1: cache/index* wins over legacy files
    _write(tmp_path, f"{cpu}/cpu1/l1_icache_size", "16384\n")
    _write(tmp_path, f"{cpu}/cpu1/cache/index0/level", "2\n")
    _write(tmp_path, f"{cpu}/cpu1/cache/index0/type", "Unified\n")
    _write(tmp_path, f"{cpu}/cpu1/cache/index0/size", "512K\n")
    _write(tmp_path, f"{cpu}/cpu1/cache/index0/shared_cpu_list", "1\n")
    # cpu2: a size that is not a plain byte count is skipped, the rest is read
    _write(tmp_path, f"{cpu}/cpu2/l1_icache_size", "32K\n")
    _write(tmp_path, f"{cpu}/cpu2/l1_dcache_size", "8192\n")
    t = read_topology(tmp_path)
    assert t.cpus[0].caches == ()
    assert [(ca.name, ca.size) for ca in t.cpus[1].caches] == [("L2", 512 << 10)]
    assert [(ca.name, ca.size, ca.shared_cpus) for ca in t.cpus[2].caches] == [("L1d", 8192, CpuSet.of([2]))]

# --- live host ---------------------------------------------------------------------------


def test_live_host():
    t = read_topology(Path("/"))
    online = CpuSet.parse(Path("/sys/devices/system/cpu/online").read_text())
    assert t.online == online
    assert CpuSet.of(os.sched_getaffinity(0)) <= t.online
    assert t.online <= t.present <= t.possible
    assert len(t.cores) >= 1 and t.smt_threads_per_core >= 1
    format_parse(t)
    format_summary(t)
    json.dumps(t.to_json())
