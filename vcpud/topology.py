"""Host CPU topology: sysfs -> frozen model, with lscpu-compatible output.

Reading a tree (the live one or a ``--sysroot`` dump) is bounded: every file is read with
:func:`vcpud.bounded.read_bytes` (a FIFO, a device or an oversize file is an error, never a
hang), every number is length-checked before ``int()`` and range-checked. The one failure
:func:`read_topology` raises is :class:`TopologyError` (an OSError), whose message names the file.
"""

from __future__ import annotations

import errno
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from vcpud import bounded
from vcpud.cpuset import MAX_CPUS, CpuSet, CpuSetError

log = logging.getLogger(__name__)

CPU_DIR = Path("sys/devices/system/cpu")
NODE_DIR = Path("sys/devices/system/node")
CPUINFO = Path("proc/cpuinfo")

# /proc/cpuinfo grows with the CPUs (about 1.6 KiB each on x86): room for MAX_CPUS of them.
CPUINFO_LIMIT = 16 << 20
# The kernel's largest NUMA node count (CONFIG_NODES_SHIFT is at most 10).
MAX_NODES = 1 << 10
# Other kernel IDs (core, package, die, book, drawer, cache id and level) are C ints.
MAX_ID = (1 << 31) - 1
# Cache sizes: anything from 2**50 bytes (a PiB) up is not a cache.
MAX_CACHE_SIZE = (1 << 50) - 1
# More digits than this cannot be a number vcpud accepts; checked before int(), whose
# own limit (4,300 digits) would raise a bare ValueError.
_MAX_DIGITS = 20
# A cpulist naming every CPU below MAX_CPUS one by one is about 40 KiB; a mask is 2,303 characters.
_MAX_MASK_LEN = MAX_CPUS // 4 + MAX_CPUS // 32 + 2

# /proc/cpuinfo keys that describe the CPU type, and the field each fills (util-linux lscpu's table).
_TYPE_KEYS = {
    "ASEs implemented": "flags",
    "Address Sizes": "addrsz",
    "BogoMIPS": "bogomips",
    "CPU Family": "family",
    "CPU Revision": "revision",
    "CPU implementer": "vendor",
    "CPU part": "model",
    "CPU revision": "revision",
    "CPU variant": "stepping",
    "Features": "flags",
    "ISA": "isa",
    "Model Name": "model_name",
    "address sizes": "addrsz",
    "bogomips per cpu": "bogomips",
    "cpu": "model_name",
    "cpu family": "family",
    "cpu model": "model",
    "family": "family",
    "features": "flags",
    "flags": "flags",
    "marchid": "family",
    "max thread id": "mtid",
    "mimpid": "model",
    "model": "model",
    "model name": "model_name",
    "mvendorid": "vendor",
    "revision": "revision",
    "stepping": "stepping",
    "type": "flags",
    "uarch": "model_name",
    "vendor": "vendor",
    "vendor_id": "vendor",
}
_PROCESSOR_KEYS = frozenset({"processor", "cpu number"})
_TYPE_IDENTITY = ("vendor", "model", "model_name", "stepping")
_TYPE_SUBSET_CHECK = ("model", "model_name", "vendor", "bogomips", "revision")

_CPU_DIR_RE = re.compile(r"cpu([0-9]+)\Z")
_NODE_DIR_RE = re.compile(r"node([0-9]+)\Z")
_TRAILING_NUM_RE = re.compile(r"[0-9]+\Z")
_SIZE_RE = re.compile(r"([0-9]+)\s*([KMGT]?)(?:i?B)?\Z", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_DECIMAL_RE = re.compile(r"[0-9]+\Z")
# What the kernel writes in a cpulist / a cpumask file (only these are range-checked as such).
_CPULIST_RE = re.compile(r"[0-9]+(?:-[0-9]+(?::[0-9]+)?)?(?:,[0-9]+(?:-[0-9]+(?::[0-9]+)?)?)*\Z")
_MASK_RE = re.compile(r"(?:0[xX])?[0-9a-fA-F]+(?:,[0-9a-fA-F]{1,8})*\Z")
_CPULIST_ITEM_RE = re.compile(r"([0-9]+)(?:-([0-9]+)(?::([0-9]+))?)?")
# Legacy per-CPU cache files (cpuN/<prefix>cache_size) as lscpu reads them: prefix, level, type.
_LEGACY_CACHES = (("l1_d", 1, "Data"), ("l1_i", 1, "Instruction"), ("l2_", 2, "Unified"))


@dataclass(frozen=True, slots=True)
class Cache:
    """One cache as a CPU sees it. ``id`` is the kernel's, or lscpu's stand-in when sysfs has none."""

    level: int
    type: str  # 'Data', 'Instruction' or 'Unified'
    size: int | None  # bytes
    shared_cpus: CpuSet
    id: int

    @property
    def name(self) -> str:
        """lscpu's name: ``L1d``, ``L1i``, ``L2``..."""
        suffix = {"Data": "d", "Instruction": "i"}.get(self.type, "")
        return f"L{self.level}{suffix}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "level": self.level,
            "type": self.type,
            "size": self.size,
            "shared_cpus": self.shared_cpus.format(),
            "id": self.id,
        }


@dataclass(frozen=True, slots=True)
class CpuType:
    """A kind of core as /proc/cpuinfo describes it (big.LITTLE hosts have several)."""

    vendor: str | None = None
    model: str | None = None
    model_name: str | None = None
    stepping: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "model": self.model,
            "model_name": self.model_name,
            "stepping": self.stepping,
        }


@dataclass(frozen=True, slots=True)
class Cpu:
    """One logical CPU. IDs are the kernel's; None where sysfs does not say."""

    cpu: int
    online: bool
    core_id: int | None = None
    package_id: int | None = None
    die_id: int | None = None
    book: int | None = None
    drawer: int | None = None
    node: int | None = None
    siblings: CpuSet = CpuSet()  # SMT threads of this core (thread_siblings)
    core_cpus: CpuSet = CpuSet()  # kernel's core_cpus; equals siblings on current kernels
    package_cpus: CpuSet = CpuSet()  # core_siblings: CPUs in the same package
    caches: tuple[Cache, ...] = ()
    cpu_type: int | None = None  # index into Topology.cpu_types

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "online": self.online,
            "core_id": self.core_id,
            "package_id": self.package_id,
            "die_id": self.die_id,
            "book": self.book,
            "drawer": self.drawer,
            "node": self.node,
            "siblings": self.siblings.format(),
            "core_cpus": self.core_cpus.format(),
            "package_cpus": self.package_cpus.format(),
            "caches": [c.to_json() for c in self.caches],
            "cpu_type": self.cpu_type,
        }


@dataclass(frozen=True, slots=True)
class Topology:
    """The host's CPUs as sysfs describes them. CPU sets serialise as cpulist strings."""

    cpus: tuple[Cpu, ...]
    possible: CpuSet
    present: CpuSet
    online: CpuSet
    offline: CpuSet  # present but not online
    isolated: CpuSet
    nohz_full: CpuSet
    nodes: Mapping[int, CpuSet] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    cpu_types: tuple[CpuType, ...] = ()

    @property
    def sockets(self) -> tuple[CpuSet, ...]:
        """Distinct packages, each as the set of its CPUs, ordered by first CPU."""
        by_set: set[CpuSet] = set()
        by_id: dict[tuple[int | None, int | None, int], set[int]] = {}
        for c in self.cpus:
            if c.package_cpus:
                by_set.add(c.package_cpus)
            elif c.package_id is not None:
                by_id.setdefault((c.drawer, c.book, c.package_id), set()).add(c.cpu)
        return _ordered(by_set | {CpuSet.of(s) for s in by_id.values()})

    @property
    def cores(self) -> tuple[CpuSet, ...]:
        """Physical cores, each as the set of its SMT siblings, ordered by first CPU."""
        found: set[CpuSet] = set()
        for c in self.cpus:
            if c.siblings:
                found.add(c.siblings)
            elif c.online:
                found.add(CpuSet.of([c.cpu]))
        return _ordered(found)

    @property
    def l3_domains(self) -> tuple[CpuSet, ...]:
        """Distinct sets of CPUs sharing one L3 cache, ordered by first CPU."""
        return _ordered({ca.shared_cpus for c in self.cpus for ca in c.caches if ca.level == 3 and ca.shared_cpus})

    @property
    def smt_threads_per_core(self) -> int:
        return max((len(c.siblings) for c in self.cpus), default=0) or 1

    def to_json(self) -> dict[str, Any]:
        return {
            "possible": self.possible.format(),
            "present": self.present.format(),
            "online": self.online.format(),
            "offline": self.offline.format(),
            "isolated": self.isolated.format(),
            "nohz_full": self.nohz_full.format(),
            "nodes": {str(n): s.format() for n, s in self.nodes.items()},
            "sockets": [s.format() for s in self.sockets],
            "cores": [s.format() for s in self.cores],
            "l3_domains": [s.format() for s in self.l3_domains],
            "smt_threads_per_core": self.smt_threads_per_core,
            "cpu_types": [t.to_json() for t in self.cpu_types],
            "cpus": [c.to_json() for c in self.cpus],
        }


def _ordered(sets: Iterable[CpuSet]) -> tuple[CpuSet, ...]:
    return tuple(sorted(sets, key=lambda s: (s.first(), len(s))))


# --- reading -------------------------------------------------------------------------


class TopologyError(OSError):
    """The tree cannot be read as a CPU topology; str() names the file and says why.

    An OSError, so that callers that handle unreadable files (the daemon) handle it too.
    """

    def __init__(self, path: Path | str, why: str, code: int = errno.EINVAL) -> None:
        super().__init__(code, f"{path}: {why}")
        self.path = str(path)

    def __str__(self) -> str:
        return str(self.strerror)


class NoCpuDirectory(TopologyError, FileNotFoundError):
    """``sys/devices/system/cpu`` is missing (a TopologyError and a FileNotFoundError)."""


def read_topology(sysroot: Path = Path("/")) -> Topology:
    """Read SYSROOT/sys/devices/system/{cpu,node} and SYSROOT/proc/cpuinfo into a Topology.

    Missing files leave the matching attributes empty or None, and so does text that is no
    number or CPU list at all (ignored with a warning, as lscpu does). Raises TopologyError,
    naming the file, for what no kernel writes and vcpud must not try to use: a missing
    ``sys/devices/system/cpu`` directory, a file that is not a regular file (FIFO, device,
    directory) or is larger than its limit, a number too long or out of range, and a CPU
    number at or beyond MAX_CPUS anywhere (a ``cpuN`` directory, a CPU list or mask, a
    ``processor`` line).
    """
    root = Path(sysroot)
    cpu_dir = root / CPU_DIR
    try:
        is_dir = cpu_dir.is_dir()
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise TopologyError(cpu_dir, f"cannot be read: {e}") from None
    if not is_dir:
        raise NoCpuDirectory(cpu_dir, f"is missing: {root} does not look like a Linux root", errno.ENOENT)

    dirs = _cpu_dirs(cpu_dir)
    possible_f = _read_cpus(cpu_dir / "possible")
    present_f = _read_cpus(cpu_dir / "present")
    online_f = _read_cpus(cpu_dir / "online")
    if present_f is not None:
        present = present_f
    else:
        present = (CpuSet.of(dirs) | (online_f or CpuSet())) or possible_f or CpuSet()
    ids = sorted(present.cpus | set(dirs))
    if online_f is not None:
        online = online_f
    else:
        online = CpuSet.of(n for n in ids if _cpu_online_flag(cpu_dir / f"cpu{n}"))
    possible = possible_f if possible_f is not None else CpuSet.of(ids) | online

    nodes = _read_nodes(root / NODE_DIR)
    cpuinfo = _read(root / CPUINFO, CPUINFO_LIMIT)
    cpu_types, type_of = _cpu_types(cpuinfo or "", ids, root / CPUINFO)

    registry: dict[tuple[str, int, int], CpuSet] = {}  # caches by (type, level, id), in discovery order
    cpus = []
    for n in ids:
        path = cpu_dir / f"cpu{n}"
        topo = path / "topology"
        siblings = _first_cpus(topo, "thread_siblings", "thread_siblings_list", "core_cpus", "core_cpus_list")
        package = _first_cpus(topo, "core_siblings", "core_siblings_list", "package_cpus", "package_cpus_list")
        cpus.append(
            Cpu(
                cpu=n,
                online=n in online,
                core_id=_read_id(topo / "core_id"),
                package_id=_read_id(topo / "physical_package_id"),
                die_id=_read_id(topo / "die_id"),
                book=_read_id(topo / "book_id"),
                drawer=_read_id(topo / "drawer_id"),
                node=next((k for k, s in nodes.items() if n in s), None),
                siblings=siblings or CpuSet(),
                core_cpus=_first_cpus(topo, "core_cpus", "core_cpus_list") or siblings or CpuSet(),
                package_cpus=package or CpuSet(),
                caches=_read_caches(path, n, registry),
                cpu_type=type_of.get(n),
            )
        )

    return Topology(
        cpus=tuple(cpus),
        possible=possible,
        present=present,
        online=online,
        offline=present - online,
        isolated=_read_cpus(cpu_dir / "isolated") or CpuSet(),
        nohz_full=_read_cpus(cpu_dir / "nohz_full") or CpuSet(),
        nodes=MappingProxyType(nodes),
        cpu_types=cpu_types,
    )


def _read(path: Path, limit: int = bounded.SYSFS_LIMIT) -> str | None:
    """The text of a file, None when it cannot be opened; TopologyError when it is no attribute file."""
    try:
        data = bounded.read_bytes(path, limit)
    except bounded.ReadError as e:
        raise TopologyError(path, str(e.strerror).removeprefix(f"{path}: ")) from None
    except OSError as e:
        log.debug("cannot read %s: %s", path, e)
        return None
    return data.decode("utf-8", errors="replace")


def _number(path: Path, text: str, limit: int) -> int:
    """Decimal digits ``text`` as an int from 0 to ``limit``; TopologyError beyond."""
    if len(text) > _MAX_DIGITS:
        raise TopologyError(path, f"number of {len(text)} digits is out of range (at most {limit})")
    value = int(text)
    if value > limit:
        raise TopologyError(path, f"{value} is out of range (at most {limit})")
    return value


def _read_id(path: Path, limit: int = MAX_ID) -> int | None:
    """An integer sysfs attribute; -1 (the kernel's "unknown") and missing both give None."""
    text = _read(path)
    if text is None:
        return None
    body = text.strip()
    digits = body.removeprefix("-")
    if not _DECIMAL_RE.match(digits):
        log.warning("ignoring non-numeric %s: %r", path, body[:40])
        return None
    value = _number(path, digits, limit)
    return None if body.startswith("-") else value


def _read_cpus(path: Path, mask: bool = False) -> CpuSet | None:
    """A CPU set file, as a cpulist (``0-3,8``) or a hex mask (``ff,00000000``).

    Text that is no cpulist (mask) is ignored with a warning; a well-formed one that names
    a CPU at or beyond MAX_CPUS (or a number too long to be one) is a TopologyError.
    """
    text = _read(path)
    if text is None:
        return None
    body = text.strip()
    # nohz_full prints "(null)" when the boot option is absent.
    if body in ("", "(null)"):
        return CpuSet()
    if not (_MASK_RE if mask else _CPULIST_RE).match(body):
        log.warning("ignoring unparseable %s: %r", path, body[:40])
        return None
    if mask:
        return _parse_mask(path, body)
    span = 0
    for m in _CPULIST_ITEM_RE.finditer(body):
        lo = _number(path, m.group(1), MAX_CPUS - 1)
        hi = lo if m.group(2) is None else _number(path, m.group(2), MAX_CPUS - 1)
        if m.group(3) is not None:
            _number(path, m.group(3), MAX_CPUS - 1)
        span += max(hi - lo + 1, 0)
    if span > MAX_CPUS:
        # The kernel's lists never overlap; this one would make CpuSet.parse() spin.
        log.warning("ignoring %s: ranges overlap (%d CPUs listed)", path, span)
        return None
    try:
        return CpuSet.parse(body)
    except CpuSetError as e:
        log.warning("ignoring unparseable %s: %s", path, str(e)[:100])
        return None


def _parse_mask(path: Path, body: str) -> CpuSet | None:
    """A well-formed hex mask; TopologyError when it names a CPU at or beyond MAX_CPUS."""
    if len(body) > _MAX_MASK_LEN:
        raise TopologyError(path, f"mask of {len(body)} characters names CPUs beyond {MAX_CPUS - 1}")
    groups = body.split(",")
    try:
        return CpuSet.from_mask(body)
    except CpuSetError as e:
        if len(groups) > 1 and len(groups[0]) > 8:  # not /proc's 32-bit groups: garbage
            log.warning("ignoring unparseable %s: %s", path, str(e)[:100])
            return None
        raise TopologyError(path, f"mask names CPUs beyond {MAX_CPUS - 1}") from None


def _first_cpus(directory: Path, *names: str) -> CpuSet | None:
    """The first of NAMES that exists; ``*list`` files are cpulists, the rest masks."""
    for name in names:
        found = _read_cpus(directory / name, mask=not name.endswith("list"))
        if found is not None:
            return found
    return None


def _cpu_dirs(cpu_dir: Path) -> list[int]:
    try:
        entries = list(cpu_dir.iterdir())
    except OSError as e:
        log.warning("cannot list %s: %s", cpu_dir, e)
        return []
    found = []
    for p in entries:
        if (m := _CPU_DIR_RE.match(p.name)) and p.is_dir():
            found.append(_number(p, m.group(1), MAX_CPUS - 1))
    return sorted(found)


def _cpu_online_flag(path: Path) -> bool:
    # cpu0 usually has no "online" file: it cannot be hot-unplugged.
    text = _read(path / "online")
    if text is None:
        return path.is_dir()
    return text.strip() == "1"


def _read_nodes(node_dir: Path) -> dict[int, CpuSet]:
    try:
        entries = list(node_dir.iterdir())
    except OSError as e:
        log.debug("no NUMA information at %s: %s", node_dir, e)
        return {}
    nodes: dict[int, CpuSet] = {}
    for p in entries:
        m = _NODE_DIR_RE.match(p.name)
        if m and p.is_dir():
            nodes[_number(p, m.group(1), MAX_NODES - 1)] = _first_cpus(p, "cpumap", "cpulist") or CpuSet()
    return dict(sorted(nodes.items()))


def _parse_size(path: Path, text: str | None) -> int | None:
    """A cache ``size`` (``32K``); None when absent or not a size, TopologyError when out of range."""
    if text is None:
        return None
    m = _SIZE_RE.match(text.strip())
    if not m:
        return None
    shift = _SIZE_SHIFT[m.group(2).upper()]
    return _number(path, m.group(1), MAX_CACHE_SIZE >> shift) << shift


def _read_caches(cpu_path: Path, cpu: int, registry: dict[tuple[str, int, int], CpuSet]) -> tuple[Cache, ...]:
    if not (cpu_path / "cache" / "index0").exists() and (cpu_path / "l1_icache_size").exists():
        return _read_legacy_caches(cpu_path, cpu, registry)
    caches = []
    i = 0
    while (idx := cpu_path / "cache" / f"index{i}").exists():
        i += 1
        level = _read_id(idx / "level")
        ctype = (_read(idx / "type") or "").strip()
        if level is None or not ctype:
            continue
        shared = _first_cpus(idx, "shared_cpu_map", "shared_cpu_list") or CpuSet()
        cid = _read_id(idx / "id")
        if cid is None:
            cid = _synthetic_cache_id(registry, cpu, ctype, level)
        if not registry.get((ctype, level, cid)):
            registry[(ctype, level, cid)] = shared
        size = _parse_size(idx / "size", _read(idx / "size"))
        caches.append(Cache(level=level, type=ctype, size=size, shared_cpus=shared, id=cid))
    return tuple(caches)


def _read_legacy_caches(cpu_path: Path, cpu: int, registry: dict[tuple[str, int, int], CpuSet]) -> tuple[Cache, ...]:
    """Per-CPU ``l1_dcache_size``-style files (sparc kernels), read the way lscpu reads them.

    lscpu only looks at them when ``cache/index0`` is missing and ``l1_icache_size`` exists,
    takes each size as a plain byte count, and reads L1d, L1i and L2 but not ``l3_cache_size``
    (newer sparc kernels write one; lscpu's legacy reader never asks for it). There is no
    sharing map, so each cache is private to its CPU.
    """
    caches = []
    for prefix, level, ctype in _LEGACY_CACHES:
        text = (_read(cpu_path / f"{prefix}cache_size") or "").strip()
        if not _DECIMAL_RE.match(text):
            continue
        shared = CpuSet.of([cpu])
        cid = _synthetic_cache_id(registry, cpu, ctype, level)
        if not registry.get((ctype, level, cid)):
            registry[(ctype, level, cid)] = shared
        size = _number(cpu_path / f"{prefix}cache_size", text, MAX_CACHE_SIZE)
        caches.append(Cache(level=level, type=ctype, size=size, shared_cpus=shared, id=cid))
    return tuple(caches)


def _synthetic_cache_id(registry: dict[tuple[str, int, int], CpuSet], cpu: int, ctype: str, level: int) -> int:
    """lscpu's numbering when sysfs has no cache ``id``: order of first discovery."""
    idx = 0
    for (etype, elevel, _), shared in registry.items():
        if etype != ctype or elevel != level:
            continue
        if cpu in shared:
            return idx
        idx += 1
    return idx


def _cpu_types(cpuinfo: str, cpus: Iterable[int], path: Path = CPUINFO) -> tuple[tuple[CpuType, ...], dict[int, int]]:
    """Group CPUs into types the way lscpu does: one per cpuinfo block, then de-duplicated.

    A processor number at or beyond MAX_CPUS, or more blocks than CPUs could have, is a
    TopologyError naming ``path``.
    """
    known = set(cpus)
    types: list[dict[str, str]] = []
    owner: dict[int, int] = {}
    cur_type: int | None = None
    cur_cpu: int | None = None
    for raw in io.StringIO(cpuinfo):  # line by line: no list of every line of a 16 MiB file
        name, sep, value = raw.strip().partition(":")
        value = value.strip()
        if not sep or not value:
            continue
        key = name[:127].rstrip()
        keynum = None
        if m := _TRAILING_NUM_RE.search(key):
            keynum = _number(path, m.group(0), MAX_CPUS - 1)
            key = key[: m.start()].rstrip()
        if key in _PROCESSOR_KEYS:
            # s390 writes "processor 3: version = ...": the number is in the key.
            # A number in ASCII digits only: str.isdigit() also takes "²", which int() refuses.
            cid = keynum if keynum is not None else \
                (_number(path, value, MAX_CPUS - 1) if _DECIMAL_RE.match(value) else 0)
            if cur_cpu is not None and cur_type is not None:
                owner[cur_cpu] = cur_type
            cur_cpu = cid if cid in known else None
        elif key in _TYPE_KEYS:
            member = _TYPE_KEYS[key]
            if cur_type is None or member in types[cur_type]:
                if len(types) > MAX_CPUS:
                    raise TopologyError(path, f"more than {MAX_CPUS} CPU descriptions")
                types.append({})
                cur_type = len(types) - 1
            types[cur_type][member] = value
        elif key == "bogomips" and cur_type is not None:
            types[cur_type].setdefault("bogomips", value)
    if cur_cpu is not None and cur_type is not None and cur_cpu not in owner:
        owner[cur_cpu] = cur_type
    if not types:
        return (), {}

    def identity(i: int) -> tuple[tuple[bool, str], ...]:
        return tuple((m in types[i], types[i].get(m, "")) for m in _TYPE_IDENTITY)

    uniq: list[int] = []
    remap: dict[int, int] = {}
    for i in sorted(range(len(types)), key=identity):
        if not uniq or identity(uniq[-1]) != identity(i):
            uniq.append(i)
        remap[i] = len(uniq) - 1
    if len(uniq) == 2:
        # A trailing machine-wide cpuinfo section (ppc "model : IBM,...") makes the
        # last block look like a second type; lscpu folds a subset type into the other.
        sub, master = types[uniq[0]], types[uniq[1]]
        if all(m not in sub or sub[m] == master.get(m) for m in _TYPE_SUBSET_CHECK):
            uniq = [uniq[1]]
            remap = dict.fromkeys(remap, 0)
    result = tuple(CpuType(**{m: types[i].get(m) for m in _TYPE_IDENTITY}) for i in uniq)
    return result, {n: remap[owner[n]] if n in owner else 0 for n in known}
