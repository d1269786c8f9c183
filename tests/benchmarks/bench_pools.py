"""Cost of one exclusive-pool plan: 500 imagined VMs on the largest topology dump.

Run: python3 -m tests.benchmarks.bench_pools [N]   (no root needed; N VMs, default 500)

Unpacks the dumps from ../shared/topologies to a temporary directory, takes the one(s) with
the most CPUs, and times vcpud.pools.allocate for N requests of mixed sizes
(smt mirror, numa single, cache l3; every fourth with an isolated emulator CPU):
from scratch, again with the previous plan as prior (steady state), and after a tenth of
the VMs left. Prints the median and worst of several runs. The acceptance bar
(`vcpud plan --what-if` with 500 VMs) is well under 1 s; exits 1 if a median reaches it.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import DUMPS, SHARED_TOPOLOGIES, _unpack
from vcpud.cpuset import CpuSet
from vcpud.pools import PlacementRule, PoolSpec, Request, allocate
from vcpud.topology import read_topology

ROUNDS = 15
SIZES = (1, 2, 4, 6, 8, 2, 4, 16)


def timed(fn, rounds: int = ROUNDS) -> tuple[float, float, object]:
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times), out


MIXED = [PlacementRule("dedicated", smt, numa, cache)
         for smt in ("mirror", "isolate", "full-cores", "any")
         for numa in ("single", "spread", "any")
         for cache in ("l3", "any")]


def bench(name: str, root: Path, n: int) -> float:
    topo = read_topology(root)
    first = min(topo.online.cpus)
    housekeeping = next((c.siblings.cpus for c in topo.cpus if c.cpu == first and c.siblings), {first})
    pool = PoolSpec("dedicated", CpuSet(topo.online.cpus - housekeeping), exclusive=True)
    pools = {"dedicated": pool}
    t = 2 if topo.smt_threads_per_core >= 2 else 1
    rule = PlacementRule("dedicated", smt="mirror", numa="single", cache="l3")
    reqs = [Request((4000 + i, i), f"db-{i}", SIZES[i % len(SIZES)], t, rule, emulator_isolate=i % 4 == 0)
            for i in range(n)]
    nodes = len({c.node for c in topo.cpus if c.online})
    print(f"{name}: {len(topo.online)} CPUs online, SMT {topo.smt_threads_per_core}, "
          f"{nodes} node(s), pool {pool.cpus} ({len(pool.cpus)} CPUs), {n} requests")

    worst = 0.0
    med, mx, (allocs, fails) = timed(lambda: allocate(topo, pools, reqs))
    held = sum(len(a.cpus) for a in allocs.values())
    print(f"  from scratch:      median {med * 1e3:7.2f} ms, max {mx * 1e3:7.2f} ms "
          f"({len(allocs)} placed holding {held} CPUs, {len(fails)} failed)")
    worst = max(worst, med)

    med, mx, (again, _) = timed(lambda: allocate(topo, pools, reqs, allocs))
    assert all(again[k] is a for k, a in allocs.items()), "a VM moved in steady state"
    print(f"  steady (prior):    median {med * 1e3:7.2f} ms, max {mx * 1e3:7.2f} ms")
    worst = max(worst, med)

    leaving = set(list(allocs)[::10])
    rest = [r for r in reqs if r.key not in leaving]
    prior = {k: a for k, a in allocs.items() if k not in leaving}
    med, mx, (after, _) = timed(lambda: allocate(topo, pools, rest, prior))
    print(f"  churn (-{len(leaving)} VMs): median {med * 1e3:7.2f} ms, max {mx * 1e3:7.2f} ms "
          f"({len(after)} placed)")
    worst = max(worst, med)

    mixed = [Request(i, f"vm-{i}", SIZES[i % len(SIZES)], t, MIXED[i % len(MIXED)], emulator_isolate=i % 3 == 0)
             for i in range(n)]
    med, mx, (allocs, fails) = timed(lambda: allocate(topo, pools, mixed))
    print(f"  mixed smt/numa/cache rules: median {med * 1e3:7.2f} ms, max {mx * 1e3:7.2f} ms "
          f"({len(allocs)} placed, {len(fails)} failed)")
    worst = max(worst, med)
    return worst


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    if not DUMPS:
        print(f"no topology dumps in {SHARED_TOPOLOGIES.resolve()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        roots = {name: _unpack(SHARED_TOPOLOGIES / f"{name}.tar.gz", Path(tmp)) for name in DUMPS}
        size = {name: len(read_topology(root).online) for name, root in roots.items()}
        top = max(size.values())
        worst = max(bench(name, roots[name], n) for name in sorted(roots) if size[name] == top)
    verdict = "OK" if worst < 1.0 else "TOO SLOW"
    print(f"worst median {worst * 1e3:.2f} ms for {n} VMs: {verdict} (bar: well under 1 s)")
    return 0 if worst < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
