"""What lscpu prints, made from the topology model: `--parse [--physical]` and the summary."""

from __future__ import annotations

from typing import Iterable

from .cpuset import CpuSet
from .topology import Cache, Topology

PARSE_HEADER = (
    "# The following is the parsable format, which can be fed to other\n"
    "# programs. Each different item in every column has an unique ID\n"
    "# starting usually from zero.\n"
)


def format_parse(topo: Topology, physical: bool = False) -> str:
    """What ``lscpu --parse [--physical] --sysroot DIR`` prints for the same sysfs."""
    caches = _cache_instances(topo)
    names = list(dict.fromkeys(name for name, _, _ in caches))
    out = [PARSE_HEADER, "# CPU,Core,Socket,Node"]
    if names:
        out.append(",," + ",".join(names))
    out.append("\n")

    # lscpu numbers cores and sockets per CPU type, in order of first appearance.
    coremaps: dict[int | None, list[CpuSet]] = {}
    socketmaps: dict[int | None, list[CpuSet]] = {}
    for c in topo.cpus:
        if not c.siblings:
            continue
        if c.siblings not in (cm := coremaps.setdefault(c.cpu_type, [])):
            cm.append(c.siblings)
        if c.package_cpus and c.package_cpus not in (sm := socketmaps.setdefault(c.cpu_type, [])):
            sm.append(c.package_cpus)

    for c in topo.cpus:
        if not c.online or c.cpu not in topo.present:
            continue
        if physical:
            core, socket = _physical_id(c.core_id), _physical_id(c.package_id)
        else:
            core = _logical_id(c.cpu, coremaps.get(c.cpu_type, ()))
            socket = _logical_id(c.cpu, socketmaps.get(c.cpu_type, ()))
        node = "" if c.node is None else str(c.node)
        row = f"{c.cpu},{core},{socket},{node}"
        if names:
            ids = []
            for want in names:
                cid = next((i for name, i, shared in caches if name == want and c.cpu in shared), None)
                if cid is not None:
                    ids.append(str(cid))
            row += ",," + ",".join(ids)
        out.append(row + "\n")
    return "".join(out)


def _cache_instances(topo: Topology) -> list[tuple[str, int, CpuSet]]:
    """Distinct caches (name, id, CPUs sharing it) sorted by name; first-seen CPU set wins, as in lscpu."""
    seen: dict[tuple[str, int, int], Cache] = {}
    for c in topo.cpus:
        for ca in c.caches:
            key = (ca.type, ca.level, ca.id)
            if key not in seen or not seen[key].shared_cpus:
                seen[key] = ca
    return sorted(((ca.name, ca.id, ca.shared_cpus) for ca in seen.values()), key=lambda e: e[0])


def _logical_id(cpu: int, maps: Iterable[CpuSet]) -> str:
    return next((str(i) for i, s in enumerate(maps) if cpu in s), "")


def _physical_id(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_summary(topo: Topology) -> str:
    """A short human-readable description of the host's CPUs."""
    sockets, cores = topo.sockets, topo.cores
    per_socket = sorted({sum(1 for core in cores if core <= s) for s in sockets})
    if not per_socket:
        cores_per_socket = "0"
    elif len(per_socket) == 1:
        cores_per_socket = str(per_socket[0])
    else:
        cores_per_socket = f"{per_socket[0]}-{per_socket[-1]}"
    rows: list[tuple[str, str]] = [
        ("CPU(s) present", f"{len(topo.present)} ({_cpus(topo.present)})"),
        ("CPU(s) online", f"{len(topo.online)} ({_cpus(topo.online)})"),
        ("CPU(s) offline", f"{len(topo.offline)} ({_cpus(topo.offline)})"),
        ("Socket(s)", str(len(sockets))),
        ("Core(s) per socket", cores_per_socket),
        ("Core(s) total", str(len(cores))),
        ("Thread(s) per core", str(topo.smt_threads_per_core)),
    ]
    for i, t in enumerate(topo.cpu_types if len(topo.cpu_types) > 1 else ()):
        members = CpuSet.of(c.cpu for c in topo.cpus if c.cpu_type == i)
        label = t.model_name or "/".join(x for x in (t.vendor, t.model, t.stepping) if x) or "?"
        rows.append((f"CPU type {i}", f"{label}: {_cpus(members)}"))
    rows.append(("NUMA node(s)", str(len(topo.nodes))))
    rows += [(f"  node{n}", _cpus(s)) for n, s in topo.nodes.items()]
    l3 = topo.l3_domains
    rows.append(("L3 domain(s)", str(len(l3))))
    rows += [(f"  L3 #{i}", _cpus(s)) for i, s in enumerate(l3)]
    rows.append(("Isolated CPU(s)", _cpus(topo.isolated)))
    rows.append(("nohz_full CPU(s)", _cpus(topo.nohz_full)))
    width = max(len(k) for k, _ in rows) + 2
    return "".join(f"{k + ':':<{width}}{v}\n" for k, v in rows)


def _cpus(s: CpuSet) -> str:
    return s.format() or "none"
