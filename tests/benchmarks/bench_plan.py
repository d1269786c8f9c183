"""`vcpud plan --what-if` with 500 imagined VMs on the largest topology dump, timed end to end.

Run: python3 -m tests.benchmarks.bench_plan   (prints wall times of the whole command; target < 1 s)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import DUMPS, REPO, SHARED_TOPOLOGIES, _unpack
from tests.test_plan_cli import config_for
from vcpud.topology import read_topology


def main() -> None:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        roots = {n: _unpack(SHARED_TOPOLOGIES / f"{n}.tar.gz", tmp) for n in DUMPS}
        name = max(roots, key=lambda n: len(read_topology(roots[n]).online))
        topo = read_topology(roots[name])
        cfg, _ = config_for(tmp, topo)
        t_per_core = topo.smt_threads_per_core
        args = [sys.executable, "-m", "vcpud", "plan", "--config", str(cfg), "--sysroot", str(roots[name]), "--json"]
        for i in range(500):
            args += ["--what-if", f"db{i}:{t_per_core * (1 + i % 4)}:{t_per_core}"]
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            p = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
            times.append(time.perf_counter() - t0)
            assert p.returncode == 0, p.stderr
        print(f"vcpud plan, 500 imagined VMs on {name} ({len(topo.online)} CPUs): "
              f"median {statistics.median(times) * 1e3:.0f} ms, max {max(times) * 1e3:.0f} ms (whole command)")


if __name__ == "__main__":
    main()
