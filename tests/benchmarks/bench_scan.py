"""Cost of one discovery scan and one reconcile pass with N paused real guests.

Run: python3 -m tests.benchmarks.bench_scan [N]   (root; starts N qemu -S guests with 2 vCPUs)
Prints the median and p95 over repeated passes; nothing here is asserted.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.qemu import start_guest
from vcpud.discovery import scan
from vcpud.engine import reconcile
from vcpud.pinning import OsAffinity
from vcpud.config import parse_config_text
from vcpud.procfs import Procfs
from vcpud.topology import read_topology

CONFIG = """\
policies:
  - name: bench
    match: {name: "bench-*"}
    vcpupin: {0: "0", 1: "1"}
    emulatorpin: "0-1"
"""


def measure(fn, rounds: int) -> tuple[float, float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    online = read_topology(Path("/")).online
    cfg = parse_config_text(CONFIG, "bench.yaml", online)
    guests = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i in range(n):
                guests.append(start_guest(Path(tmp), f"bench-{i}", smp="2"))
            fs, ops = Procfs(), OsAffinity()
            threads = sum(len(g.threads()) for g in guests)
            med, p95 = measure(lambda: scan(fs), 30)
            print(f"scan of /proc, {n} VMs / {threads} threads: median {med * 1e3:.1f} ms, p95 {p95 * 1e3:.1f} ms")
            reconcile(cfg, online, fs, ops)  # first pass pins; later passes find nothing to change
            med, p95 = measure(lambda: reconcile(cfg, online, fs, ops), 30)
            print(f"reconcile, nothing to change: median {med * 1e3:.1f} ms, p95 {p95 * 1e3:.1f} ms")

            def repin():
                for g in guests:
                    g.unpin()
                t0 = time.perf_counter()
                reconcile(cfg, online, fs, ops)
                return time.perf_counter() - t0

            times = sorted(repin() for _ in range(10))
            print(f"reconcile, every thread re-pinned: median {statistics.median(times) * 1e3:.1f} ms")
            one = guests[0].pid
            med, p95 = measure(lambda: reconcile(cfg, online, fs, ops, pids=[one]), 100)
            print(f"reconcile of one VM by pid: median {med * 1e3:.2f} ms, p95 {p95 * 1e3:.2f} ms")
        finally:
            for g in guests:
                g.kill()


if __name__ == "__main__":
    main()
