"""Exclusive CPU pools: topology-aware, deterministic, never double-booked allocation (pure)."""

from __future__ import annotations

import logging
from typing import Hashable, Iterable, Mapping, Sequence

from .cpuset import CpuSet
from .pooltypes import CACHE_MODES, NUMA_MODES, SMT_MODES, Allocation, Failure, PlacementRule, PoolSpec, Request
from .topology import Topology

__all__ = ["CACHE_MODES", "NUMA_MODES", "SMT_MODES", "Allocation", "Failure", "PlacementRule", "PoolSpec",
           "Request", "allocate", "free_cpus"]

log = logging.getLogger(__name__)

# =====================================================================================
# Allocation
#
# Model: a "host core" is a set of online SMT siblings (Cpu.siblings), split by NUMA node
# so that no core spans two nodes.  One call of allocate() precomputes, per topology, the
# core, node and L3 domain of every online CPU, and per pool the cores that hold pool
# CPUs.  It then keeps still-valid priors (request order), and places the remaining
# requests one by one (request order) with greedy best-fit choices whose ties all fall
# to the lowest core / node / L3 number.  A global `taken` set makes double booking
# impossible; `blocked` marks cores owned by an isolate / full-cores VM, whose CPUs no
# other VM may use (even a sibling that comes online after the owner was placed).
# =====================================================================================

_ANY, _MIRROR, _ISOLATE, _FULL = SMT_MODES


def _nk(node: int | None) -> int:
    """Sort key of a node: topologies without NUMA information have node None, first."""
    return -1 if node is None else node


class _Core:
    __slots__ = ("first", "cpus", "node", "l3", "number", "label")

    def __init__(self, cpus: tuple[int, ...], node: int | None, l3: int | None, number: int, label: str):
        self.first = cpus[0]
        self.cpus = cpus          # online CPUs of this core, ascending
        self.node = node
        self.l3 = l3              # index into the sorted L3 domains, None without L3 info
        self.number = number      # position in Topology.cores (stable when CPUs go offline)
        self.label = label        # the host core's CPUs, as a cpulist


class _Index:
    """Per-topology lookups, built once per allocate() call."""

    def __init__(self, topology: Topology) -> None:
        self.online = frozenset(topology.online.cpus)
        self.smt_width = topology.smt_threads_per_core
        by_cpu = {c.cpu: c for c in topology.cpus}
        node_of = {n: (by_cpu[n].node if n in by_cpu else None) for n in self.online}

        domains = sorted(
            {ca.shared_cpus for c in topology.cpus for ca in c.caches if ca.level == 3 and ca.shared_cpus},
            key=lambda s: (s.first(), len(s)),
        )
        l3_of: dict[int, int] = {}
        for i, dom in enumerate(domains):
            for n in dom.cpus:
                l3_of.setdefault(n, i)

        all_cores = topology.cores
        number_of: dict[int, int] = {}
        for i, members in enumerate(all_cores):
            for n in members.cpus:
                number_of.setdefault(n, i)

        # Union-find over sibling links between online CPUs of the same node.
        parent = {n: n for n in self.online}

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for n in sorted(self.online):
            c = by_cpu.get(n)
            if c is None:
                continue
            for s in c.siblings.cpus:
                if s in parent and node_of[s] == node_of[n]:
                    a, b = find(n), find(s)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
        groups: dict[int, list[int]] = {}
        for n in sorted(self.online):
            groups.setdefault(find(n), []).append(n)

        self.cores: list[_Core] = []
        self.core_of: dict[int, _Core] = {}
        spare = len(all_cores)
        for root in sorted(groups):
            cpus = tuple(groups[root])
            first = cpus[0]
            if first in number_of:
                number = number_of[first]
                label = all_cores[number].format()
            else:  # a CPU sysfs gave no siblings for
                number, spare = spare, spare + 1
                label = CpuSet.of(cpus).format()
            core = _Core(cpus, node_of[first], l3_of.get(first), number, label)
            self.cores.append(core)
            for n in cpus:
                self.core_of[n] = core
        self.node_of = node_of


class _PoolCtx:
    """One exclusive pool on this topology: its usable CPUs and its cores by node."""

    __slots__ = ("spec", "usable", "by_node", "nodes")

    def __init__(self, spec: PoolSpec, index: _Index) -> None:
        self.spec = spec
        self.usable = frozenset(spec.cpus.cpus) & index.online
        by_node: dict[int | None, list[tuple[_Core, tuple[int, ...], tuple[int, ...]]]] = {}
        for core in index.cores:  # ascending first CPU
            mine = tuple(n for n in core.cpus if n in self.usable)
            if mine:
                outside = tuple(n for n in core.cpus if n not in self.usable)
                by_node.setdefault(core.node, []).append((core, mine, outside))
        self.by_node = by_node
        self.nodes = sorted(by_node, key=_nk)


class _View:
    """A core as a request sees it now: its free pool CPUs, and whether all of it is free."""

    __slots__ = ("core", "free", "whole")

    def __init__(self, core: _Core, free: tuple[int, ...], whole: bool) -> None:
        self.core = core
        self.free = free
        self.whole = whole


class _NoFit(Exception):
    pass


_Picks = list[tuple[_View, tuple[int, ...]]]  # views chosen, with the CPUs taken from each
_NodeViews = Mapping[int | None, list[_View]]  # per NUMA node (None: no NUMA information)
_Portion = tuple[int | None, int, Sequence[int]]  # node, first unit, demand placed there


# --- choosing cores inside one group of views (all planners are greedy best-fit) --------


def _pick_mirror(views: list[_View], needs: Sequence[int]) -> _Picks:
    """Guest cores (needs = threads each) onto distinct host cores; stops at the first that fails."""
    used: set[int] = set()
    out: _Picks = []
    for need in needs:
        best = None
        for v in views:
            if len(v.free) >= need and v.core.first not in used and (best is None or len(v.free) < len(best.free)):
                best = v
        if best is None:
            break
        used.add(best.core.first)
        out.append((best, best.free[:need]))
    return out


def _pick_whole(views: list[_View], k: int) -> list[_View]:
    """Up to k whole free cores, smallest first (least to reserve), then lowest."""
    whole = sorted((v for v in views if v.whole), key=lambda v: (len(v.free), v.core.first))[:k]
    whole.sort(key=lambda v: v.core.first)
    return whole


def _pack(views: list[_View], k: int) -> list[tuple[_View, int]]:
    """Up to k CPUs from as few cores as possible: an exact fit, else the largest core that
    fits entirely, else the smallest core bigger than what is left. Ties: lowest core."""
    avail = list(views)
    out: list[tuple[_View, int]] = []
    rem = k
    while rem > 0 and avail:
        pick = -1
        for i, v in enumerate(avail):
            if len(v.free) == rem:
                pick = i
                break
        if pick < 0:
            for i, v in enumerate(avail):
                if len(v.free) < rem and (pick < 0 or len(v.free) > len(avail[pick].free)):
                    pick = i
        if pick < 0:
            for i, v in enumerate(avail):
                if pick < 0 or len(v.free) < len(avail[pick].free):
                    pick = i
        v = avail.pop(pick)
        take = min(rem, len(v.free))
        out.append((v, take))
        rem -= take
    return out


def _plan(mode: str, views: list[_View], demand: Sequence[int]) -> tuple[_Picks, int]:
    """Place as much of `demand` (mirror: threads per guest core; else one per vCPU) as fits.

    Returns (placements, units placed): per guest core for mirror, per vCPU for isolate,
    per core chunk for full-cores / any."""
    if mode == _MIRROR:
        got = _pick_mirror(views, demand)
        return got, len(got)
    k = len(demand)
    if mode == _ISOLATE:
        return [(v, v.free[:1]) for v in _pick_whole(views, k)], min(k, sum(1 for v in views if v.whole))
    pool = [v for v in views if v.whole] if mode == _FULL else views
    chunks = _pack(pool, k)
    return [(v, v.free[:n]) for v, n in chunks], sum(n for _, n in chunks)


def _capacity(mode: str, views: list[_View], demand: Sequence[int]) -> int:
    """How many units of `demand` these views could take."""
    if mode == _MIRROR:
        return len(_pick_mirror(views, demand))
    if mode == _ISOLATE:
        return sum(1 for v in views if v.whole)
    if mode == _FULL:
        return sum(len(v.free) for v in views if v.whole)
    return sum(len(v.free) for v in views)


def _cpus_of(views: list[_View], mode: str) -> int:
    if mode in (_ISOLATE, _FULL):
        return sum(len(v.free) for v in views if v.whole)
    return sum(len(v.free) for v in views)


def _by_l3(views: list[_View]) -> list[tuple[int | None, list[_View]]]:
    groups: dict[int | None, list[_View]] = {}
    for v in views:
        groups.setdefault(v.core.l3, []).append(v)
    return sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))


def _in_node(mode: str, views: list[_View], demand: Sequence[int], l3: bool, one_l3_only: bool) -> _Picks:
    """Place the whole `demand` in one node's views, or raise _NoFit."""
    if l3:
        groups = _by_l3(views)
        best_fit = sorted(groups, key=lambda g: (_cpus_of(g[1], mode), g[0] is None, g[0] or 0))
        for _, g in best_fit:
            got, n = _plan(mode, g, demand)
            if n == len(demand):
                return got
        if one_l3_only or len(groups) == 1:
            raise _NoFit
        order = [g for _, g in sorted(groups, key=lambda g: (-_cpus_of(g[1], mode), g[0] is None, g[0] or 0))]
    else:
        order = [views]
    out: _Picks = []
    rest = list(demand)
    for g in order:
        if not rest:
            break
        got, n = _plan(mode, g, rest)
        out += got
        rest = rest[n:]
    if rest:
        raise _NoFit
    return out


# --- one request --------------------------------------------------------------------


class _Draft:
    """CPUs chosen for one request, not yet committed."""

    __slots__ = ("vcpus", "where", "emulator", "reserved", "leftover", "cpus")

    def __init__(self, n: int) -> None:
        self.vcpus: list[int] = [-1] * n
        self.where: dict[int, tuple[_Core, str]] = {}  # per vCPU: its host core, and why
        self.emulator: tuple[int, _Core] | None = None  # the emulator's CPU and its host core
        self.reserved: list[int] = []
        self.leftover: list[tuple[int, _Core]] = []  # full-cores: unused CPUs of the VM's cores
        self.cpus: set[int] = set()


def _on(core: _Core, mode: str) -> str:
    kind = {_ISOLATE: "alone on host core", _FULL: "of whole host core"}.get(mode, "of host core")
    s = f" {kind} {core.number} (CPUs {core.label})"
    if core.node is not None:
        s += f", node {core.node}"
    if core.l3 is not None:
        s += f", L3 #{core.l3}"
    return s


class _Allocator:
    def __init__(self, topology: Topology, pools: Mapping[str, PoolSpec]) -> None:
        self.index = _Index(topology)
        self.pools = pools
        self.ctx: dict[str, _PoolCtx] = {}
        self.taken: set[int] = set()
        self.blocked: set[int] = set()  # first CPU of cores owned by an isolate / full-cores VM

    def pool(self, name: str) -> _PoolCtx:
        if name not in self.ctx:
            self.ctx[name] = _PoolCtx(self.pools[name], self.index)
        return self.ctx[name]

    def views(self, pc: _PoolCtx, node: int | None, busy: set[int] | frozenset[int]) -> list[_View]:
        out = []
        blocked = self.blocked
        for core, mine, outside in pc.by_node.get(node, ()):
            if core.first in blocked:
                continue
            free = tuple(n for n in mine if n not in busy)
            if free:
                whole = len(free) == len(mine) and not any(n in busy for n in outside)
                out.append(_View(core, free, whole))
        return out

    # --- priors ---------------------------------------------------------------------

    def prior_ok(self, req: Request, a: Allocation, pc: _PoolCtx) -> bool:
        rule = req.rule
        if not isinstance(a, Allocation) or a.key != req.key or a.pool != rule.pool:
            return False
        if len(a.vcpus) != req.vcpus or (a.emulator is not None) != req.emulator_isolate:
            return False
        placed = list(a.vcpus) + ([a.emulator] if a.emulator is not None else [])
        held = placed + sorted(a.reserved.cpus)
        if len(set(held)) != len(held):
            return False
        for n in held:
            if n not in pc.usable or n in self.taken:
                return False
        core_of = self.index.core_of
        cores = {core_of[n].first: core_of[n] for n in held}
        if rule.smt in (_ANY, _MIRROR):
            if a.reserved or any(f in self.blocked for f in cores):
                return False
            if rule.smt == _MIRROR:
                t = req.threads_per_core
                seen: set[int] = set()
                for j in range(0, len(a.vcpus), t):
                    group = {core_of[n].first for n in a.vcpus[j : j + t]}
                    if len(group) != 1 or group & seen:
                        return False
                    seen |= group
        else:
            # Whole cores: nothing on them may belong to anyone else.
            if any(n in self.taken for core in cores.values() for n in core.cpus):
                return False
            if rule.smt == _ISOLATE:
                firsts = [core_of[n].first for n in placed]
                if len(set(firsts)) != len(firsts) or not {core_of[n].first for n in a.reserved.cpus} <= set(firsts):
                    return False
        if rule.numa == "single" and len({self.index.node_of[n] for n in placed}) > 1:
            return False
        return True

    def keep(self, req: Request, a: Allocation) -> None:
        cpus = a.cpus.cpus
        self.taken |= cpus
        if req.rule.smt in (_ISOLATE, _FULL):
            self.blocked |= {self.index.core_of[n].first for n in cpus}

    # --- new placements ---------------------------------------------------------------

    def place(self, req: Request) -> Allocation | str:
        rule, idx = req.rule, self.index
        pc = self.pool(rule.pool)
        mode = rule.smt
        t = req.threads_per_core if mode == _MIRROR else 1
        if mode == _MIRROR and t > idx.smt_width:
            return (
                f"smt mirror: the guest has {t} threads per core but host cores have at most "
                f"{idx.smt_width} SMT thread{'s' if idx.smt_width != 1 else ''}"
            )
        if mode == _MIRROR:
            demand = [min(t, req.vcpus - j) for j in range(0, req.vcpus, t)]
        else:
            demand = [1] * req.vcpus
        want = req.vcpus + (1 if req.emulator_isolate else 0)
        l3 = rule.cache == "l3"

        node_views = {n: self.views(pc, n, self.taken) for n in pc.nodes}
        node_free = {n: sum(len(v.free) for v in vs) for n, vs in node_views.items()}
        free = sum(node_free.values())
        if free < want:
            return self.exhausted(req, pc, node_views, want, free)

        if rule.numa in ("single", "any"):
            order = sorted((n for n in pc.nodes if node_free[n] >= want), key=lambda n: (node_free[n], _nk(n)))
            for one_l3 in (True, False) if l3 else (False,):
                for n in order:
                    try:
                        return self.finish(req, pc, self.build(req, pc, node_views, [(n, 0, demand)], [n], l3, one_l3))
                    except _NoFit:
                        pass
            if rule.numa == "single":
                try:
                    self.spanning(req, pc, node_views, demand, l3)
                except _NoFit:
                    return self.exhausted(req, pc, node_views, want, free)
                have = ", ".join(
                    f"{'node ' + str(n) if n is not None else 'no node'}: {node_free[n]}" for n in pc.nodes
                )
                return (
                    f"does not fit in one NUMA node: needs {want} CPU{'s' if want != 1 else ''} "
                    f"(smt {mode}) from pool '{rule.pool}', whose nodes have {have} free"
                )
            try:
                return self.finish(req, pc, self.spanning(req, pc, node_views, demand, l3))
            except _NoFit:
                return self.exhausted(req, pc, node_views, want, free)

        # spread: balance units (guest cores for mirror, else vCPUs) over the pool's nodes.
        caps = {n: _capacity(mode, node_views[n], demand) for n in pc.nodes}
        counts = dict.fromkeys(pc.nodes, 0)
        for _ in demand:
            cands = [n for n in pc.nodes if counts[n] < caps[n]]
            if not cands:
                return self.exhausted(req, pc, node_views, want, free)
            n = min(cands, key=lambda n: (counts[n], _nk(n)))
            counts[n] += 1
        try:
            portions = self.portions(pc.nodes, counts, demand)
            return self.finish(req, pc, self.build(req, pc, node_views, portions, None, l3, False))
        except _NoFit:
            return self.exhausted(req, pc, node_views, want, free)

    @staticmethod
    def portions(
        nodes: Sequence[int | None], counts: Mapping[int | None, int], demand: Sequence[int]
    ) -> list[_Portion]:
        out: list[_Portion] = []
        start = 0
        for n in nodes:
            if counts[n]:
                out.append((n, start, demand[start : start + counts[n]]))
                start += counts[n]
        return out

    def spanning(self, req: Request, pc: _PoolCtx, node_views: _NodeViews, demand: Sequence[int], l3: bool) -> _Draft:
        """Over as few nodes as possible: the roomiest first."""
        mode = req.rule.smt
        caps = {n: _capacity(mode, node_views[n], demand) for n in pc.nodes}
        counts: dict[int | None, int] = {}
        rest = len(demand)
        for n in sorted(pc.nodes, key=lambda n: (-caps[n], _nk(n))):
            counts[n] = min(rest, caps[n])
            rest -= counts[n]
        if rest:
            raise _NoFit
        return self.build(req, pc, node_views, self.portions(pc.nodes, counts, demand), None, l3, False)

    def build(
        self,
        req: Request,
        pc: _PoolCtx,
        node_views: _NodeViews,
        portions: Sequence[_Portion],
        emu_nodes: Sequence[int | None] | None,
        l3: bool,
        one_l3: bool,
    ) -> _Draft:
        """Choose CPUs for each (node, first unit, demand) portion, then the emulator.

        emu_nodes None: the emulator goes to the nodes holding most of the VM first."""
        mode = req.rule.smt
        d = _Draft(req.vcpus)
        per_node: dict[int | None, int] = {}
        for node, start, dem in portions:
            got = _in_node(mode, node_views[node], dem, l3, one_l3)
            per_node[node] = len(dem)
            if mode == _MIRROR:
                t = req.threads_per_core
                for j, (v, cpus) in enumerate(got, start):
                    for i, n in enumerate(cpus):
                        d.vcpus[j * t + i] = n
                        d.where[j * t + i] = (v.core, f"guest core {j} thread {i}")
            elif mode == _ISOLATE:
                for i, (v, cpus) in enumerate(got, start):
                    d.vcpus[i] = cpus[0]
                    d.where[i] = (v.core, f"vCPU {i}")
                    d.reserved += v.free[1:]
            else:
                if mode == _FULL:  # whole cores in core order, the partly used one last
                    got.sort(key=lambda p: (len(p[1]) < len(p[0].free), p[0].core.first))
                else:
                    got.sort(key=lambda p: p[0].core.first)
                i = start
                for v, cpus in got:
                    for n in cpus:
                        d.vcpus[i] = n
                        d.where[i] = (v.core, f"vCPU {i}")
                        i += 1
                    if mode == _FULL:
                        d.leftover += [(n, v.core) for n in v.free[len(cpus) :]]
        d.cpus = set(d.vcpus) | set(d.reserved)
        if req.emulator_isolate:
            if emu_nodes is None:
                emu_nodes = sorted(pc.nodes, key=lambda n: (-per_node.get(n, 0), _nk(n)))
            for node in emu_nodes:
                if self.emulator(req, pc, d, node):
                    break
            else:
                raise _NoFit
        emu_cpu = d.emulator[0] if d.emulator is not None else None
        d.reserved += [n for n, _ in d.leftover if n != emu_cpu]
        return d

    def emulator(self, req: Request, pc: _PoolCtx, d: _Draft, node: int | None) -> bool:
        mode, core_of = req.rule.smt, self.index.core_of
        l3s = [core_of[n].l3 for n in d.vcpus if core_of[n].node == node]
        pref = min(set(l3s), key=lambda x: (-l3s.count(x), x is None, x or 0)) if l3s else None

        def near(c: _Core) -> tuple[bool, int]:
            return (c.l3 != pref, c.first)

        if mode == _FULL:
            mine = [(n, c) for n, c in d.leftover if c.node == node]
            if mine:
                n, c = min(mine, key=lambda p: (near(p[1]), p[0]))
                d.emulator = (n, c)
                d.cpus.add(n)
                return True
        views = self.views(pc, node, self.taken | d.cpus)
        groups = [[v for v in views if v.core.l3 == pref], views]
        for g in groups:
            if mode in (_ISOLATE, _FULL):
                whole = _pick_whole(g, 1)
                if whole:
                    v = whole[0]
                    d.emulator = (v.free[0], v.core)
                    d.reserved += v.free[1:]
                    d.cpus |= set(v.free)
                    return True
            else:
                packed = _pack(g, 1)
                if packed:
                    v = packed[0][0]
                    d.emulator = (v.free[0], v.core)
                    d.cpus.add(v.free[0])
                    return True
        return False

    def finish(self, req: Request, pc: _PoolCtx, d: _Draft) -> Allocation:
        rule = req.rule
        head = f"pool {rule.pool}, smt {rule.smt}: "
        reasons = []
        for i, n in enumerate(d.vcpus):
            core, what = d.where[i]
            reasons.append(head + f"{what} -> CPU {n}{_on(core, rule.smt)}")
        emulator = None
        if d.emulator is not None:
            emulator, emu_core = d.emulator
            reasons.append(head + f"emulator -> CPU {emulator}{_on(emu_core, rule.smt)}")
        alloc = Allocation(
            key=req.key,
            pool=rule.pool,
            vcpus=tuple(d.vcpus),
            emulator=emulator,
            reserved=CpuSet(frozenset(d.reserved)),
            reasons=tuple(reasons),
        )
        self.keep(req, alloc)
        return alloc

    def exhausted(self, req: Request, pc: _PoolCtx, node_views: _NodeViews, want: int, free: int) -> str:
        rule = req.rule
        msg = f"pool '{rule.pool}' exhausted: needs {want} CPU{'s' if want != 1 else ''}, {free} free"
        views = [v for vs in node_views.values() for v in vs]
        if rule.smt == _MIRROR:
            t = req.threads_per_core
            g = -(-req.vcpus // t)
            ok = sum(1 for v in views if len(v.free) >= t)
            msg += (
                f" (smt mirror needs {g} host core{'s' if g != 1 else ''} with {t} free SMT "
                f"sibling{'s' if t != 1 else ''}, {ok} have them)"
            )
        elif rule.smt == _ISOLATE:
            ok = sum(1 for v in views if v.whole)
            msg += f" (smt isolate needs {want} whole free core{'s' if want != 1 else ''}, {ok} free)"
        elif rule.smt == _FULL:
            ok = sum(len(v.free) for v in views if v.whole)
            msg += f" (smt full-cores needs whole free cores, which hold {ok} CPUs)"
        return msg


def _invalid(req: Request, pools: Mapping[str, PoolSpec]) -> str | None:
    rule = req.rule
    if rule.pool not in pools:
        return f"unknown pool '{rule.pool}'"
    if not pools[rule.pool].exclusive:
        return f"pool '{rule.pool}' is not exclusive: only exclusive pools hand out dedicated CPUs"
    if rule.smt not in SMT_MODES:
        return f"unknown smt mode '{rule.smt}' (one of {', '.join(SMT_MODES)})"
    if rule.numa not in NUMA_MODES:
        return f"unknown numa mode '{rule.numa}' (one of {', '.join(NUMA_MODES)})"
    if rule.cache not in CACHE_MODES:
        return f"unknown cache mode '{rule.cache}' (one of {', '.join(CACHE_MODES)})"
    if not isinstance(req.vcpus, int) or req.vcpus < 1:
        return f"needs at least one vCPU, asks for {req.vcpus!r}"
    if not isinstance(req.threads_per_core, int) or req.threads_per_core < 1:
        return f"bad guest threads per core {req.threads_per_core!r}"
    return None


def allocate(
    topology: Topology,
    pools: Mapping[str, PoolSpec],
    requests: Sequence[Request],
    prior: Mapping[Hashable, Allocation] | None = None,
) -> tuple[dict[Hashable, Allocation], dict[Hashable, Failure]]:
    """Give each request dedicated CPUs from its exclusive pool, or a Failure saying why.

    Still-valid priors are kept exactly (in request order), then the other requests are
    placed in request order. The returned allocations never share a CPU, and the result
    depends only on the arguments' values (and request order)."""
    al = _Allocator(topology, pools)
    prior = prior or {}
    failures: dict[Hashable, Failure] = {}
    todo: list[Request] = []
    seen: set[Hashable] = set()
    for req in requests:
        if req.key in seen:
            failures.setdefault(req.key, Failure(req.key, f"{req.name}: duplicate request for the same VM"))
            continue
        seen.add(req.key)
        why = _invalid(req, pools)
        if why:
            failures[req.key] = Failure(req.key, why)
        else:
            todo.append(req)

    done: dict[Hashable, Allocation | Failure] = {}
    for req in todo:
        a = prior.get(req.key)
        if a is not None and al.prior_ok(req, a, al.pool(req.rule.pool)):
            al.keep(req, a)
            done[req.key] = a
    for req in todo:
        if req.key not in done:
            got = al.place(req)
            done[req.key] = got if isinstance(got, Allocation) else Failure(req.key, got)
            if isinstance(got, str):
                log.debug("%s: %s", req.name, got)

    allocations: dict[Hashable, Allocation] = {}
    fails: dict[Hashable, Failure] = {}
    for req in requests:  # both dicts in request order
        r = done.get(req.key) or failures.get(req.key)
        if isinstance(r, Allocation):
            allocations.setdefault(req.key, r)
        elif r is not None and req.key not in allocations:
            fails.setdefault(req.key, r)
    return allocations, fails


def free_cpus(
    pools: Mapping[str, PoolSpec],
    topology: Topology,
    allocations: Mapping[Hashable, Allocation] | Iterable[Allocation],
) -> dict[str, CpuSet]:
    """Per exclusive pool (by name), its online CPUs that no allocation holds."""
    allocs = allocations.values() if isinstance(allocations, Mapping) else allocations
    held: set[int] = set()
    for a in allocs:
        held |= a.cpus.cpus
    return {
        name: CpuSet(frozenset(pools[name].cpus.cpus & topology.online.cpus) - held)
        for name in sorted(pools)
        if pools[name].exclusive
    }
