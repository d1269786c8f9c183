"""Benchmark of vcpud's /metrics (no root, no qemu; prints numbers, asserts nothing).

    python3 -m tests.benchmarks.bench_metrics [--vms 200] [--cpus 64] [--scrapes 100] [--seconds 3]

1. scrape time over HTTP on loopback (urllib, new connection each time, like Prometheus without
   keep-alive), for a snapshot of --vms VMs (4-8 threads each) on --cpus online CPUs:
   a) "cold": the daemon published a new snapshot before every scrape, so every scrape renders;
   b) "cached": the same snapshot again (the server keeps the bytes of the last one it rendered);
   and the render alone (exposition(), no HTTP) for comparison.
2. what scraping does to the event loop. The server thread and the loop share nothing but the GIL:
   a scrape reads one reference (the snapshot) and renders in its own thread. A thread stands in
   for the loop: it sleeps in select() with a 1 ms timeout, as the loop sleeps on its event sources,
   and records how late it wakes (the kernel wakes it on time; any extra is waiting for the GIL).
   Measured with no scrapes, then while another *process* scrapes 10 times a second and back to back
   (Prometheus scrapes every 15-60 s: both are far worse than real), with a new snapshot published
   every millisecond so that every scrape renders.
"""

from __future__ import annotations

import argparse
import dataclasses
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from types import MappingProxyType

from vcpud.cpuset import CpuSet
from vcpud.metrics import MetricsServer, exposition
from vcpud.snapshot import (DURATION_BUCKETS, LATENCY_BUCKETS, Histogram, PoolView, Snapshot, ThreadView, VMView)


def big_snapshot(n_vms: int, n_cpus: int) -> Snapshot:
    """Half the host a shared pool, half exclusive. Every third VM gets dedicated CPUs (vcpupin, one
    CPU per vCPU, emulator on a CPU of its own), the others float over the shared pool; 4-8 threads each."""
    shared = CpuSet.of(range(n_cpus // 2))
    dedicated = list(range(n_cpus // 2, n_cpus))
    vms, allocated, next_cpu = [], set(), 0
    for i in range(n_vms):
        n_vcpus = 2 + i % 4                      # 2..5 vCPUs
        threads = []
        if i % 3 == 0:                           # dedicated: vcpupin
            policy = "dedicated"
            for v in range(n_vcpus):
                cpu = dedicated[next_cpu % len(dedicated)]
                next_cpu += 1
                allocated.add(cpu)
                threads.append(ThreadView("vcpu", CpuSet.of([cpu]), "pinned", v))
            emu = CpuSet.of([dedicated[next_cpu % len(dedicated)]])
        else:                                    # shared pool, floating
            policy = "web" if i % 3 == 1 else "batch"
            threads += [ThreadView("vcpu", shared, "pinned", v) for v in range(n_vcpus)]
            emu = shared
        threads.append(ThreadView("emulator", emu, "pinned"))
        threads.append(ThreadView("emulator", emu, "pinned"))
        if i % 2:
            threads.append(ThreadView("iothread", emu, "pinned"))
        threads.append(ThreadView("kernel", CpuSet.of(range(n_cpus)), "unpinned"))
        vms.append(VMView(name=f"vm{i:03d}", uuid=f"00000000-0000-4000-8000-{i:012d}", policy=policy,
                          status="pinned", threads=tuple(threads[:8])))
    lat, dur = Histogram(LATENCY_BUCKETS), Histogram(DURATION_BUCKETS)
    for k in range(1000):
        lat.observe(0.0001 + (k % 50) * 1e-5)
        dur.observe(0.002 + (k % 20) * 1e-3)
    return Snapshot(
        version="bench", taken_at=time.time(), online=CpuSet.of(range(n_cpus)), vms=tuple(vms),
        pools=(PoolView("shared", shared, CpuSet(), False),
               PoolView("dedicated", CpuSet.of(dedicated), CpuSet.of(allocated), True, waiting=2)),
        vcpu_seconds=MappingProxyType({c: 1000.0 + c for c in dedicated}),
        pin_operations=MappingProxyType({"pinned": 123456, "unchanged": 999999, "vanished": 42}),
        drift_corrections=17, events=MappingProxyType({"udev": 400, "proc_connector": 123456, "rescan": 8640}),
        pin_latency=lat.view(), reconcile_duration=dur.view(), config_last_reload_success_timestamp=time.time())


def stats_ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return (f"p50 {statistics.median(xs) * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms  max {xs[-1] * 1e3:6.2f} ms"
            f"  (n={len(xs)})")


def stats_us(xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    p999 = xs[min(len(xs) - 1, int(len(xs) * 0.999))]
    return (f"p50 {statistics.median(xs) * 1e6:7.0f} us  p99 {p99 * 1e6:7.0f} us  p99.9 {p999 * 1e6:7.0f} us"
            f"  max {xs[-1] * 1e6:7.0f} us  (n={len(xs)})")


def scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def bench_scrapes(snap: Snapshot, n: int) -> None:
    box = {"snap": snap}
    server = MetricsServer(lambda: box["snap"])
    host, port = server.start("127.0.0.1:0")
    url = f"http://{host}:{port}/metrics"
    try:
        body = scrape(url)
        n_samples = sum(1 for line in body.splitlines() if not line.startswith(b"#"))
        print(f"exposition: {len(body) / 1024:.0f} KiB, {n_samples} samples")
        renders = []
        for _ in range(n):
            t0 = time.perf_counter()
            exposition(snap)
            renders.append(time.perf_counter() - t0)
        print(f"render only (exposition())       {stats_ms(renders)}")
        cold = []
        for _ in range(n):
            box["snap"] = dataclasses.replace(snap)  # a new snapshot object: nothing cached
            t0 = time.perf_counter()
            scrape(url)
            cold.append(time.perf_counter() - t0)
        print(f"scrape, new snapshot each time   {stats_ms(cold)}  (what a scrape after a publish costs)")
        warm = []
        for _ in range(n):
            t0 = time.perf_counter()
            scrape(url)
            warm.append(time.perf_counter() - t0)
        print(f"scrape, same snapshot (cached)   {stats_ms(warm)}")
    finally:
        server.stop()


SCRAPER = """
import sys, time, urllib.request
url, until, every = sys.argv[1], time.monotonic() + float(sys.argv[2]), float(sys.argv[3])
n = 0
while time.monotonic() < until:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=10) as r:
        r.read()
    n += 1
    time.sleep(max(0.0, every - (time.monotonic() - t0)))
print(n)
"""


def loop_lateness(seconds: float, out: list[float]) -> None:
    """The stand-in event loop: select() with a 1 ms timeout on a socket nobody writes to."""
    a, b = socket.socketpair()
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            sel.select(0.001)
            out.append(time.perf_counter() - t0 - 0.001)
    a.close()
    b.close()


def bench_loop(snap: Snapshot, seconds: float) -> None:
    box = {"snap": snap}
    server = MetricsServer(lambda: box["snap"])
    host, port = server.start("127.0.0.1:0")
    url = f"http://{host}:{port}/metrics"
    try:
        idle: list[float] = []
        loop_lateness(seconds, idle)
        print(f"loop wake-up lateness, no scrapes           {stats_us(idle)}")
        for every, what in ((0.1, "10 scrapes/s"), (0.0, "back-to-back scrapes")):
            stop = threading.Event()

            def publisher(stop: threading.Event) -> None:  # new snapshots all the time: every scrape renders
                while not stop.is_set():
                    box["snap"] = dataclasses.replace(snap)
                    time.sleep(0.001)

            pub = threading.Thread(target=publisher, args=(stop,), daemon=True)
            pub.start()
            scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, url, str(seconds + 0.5), str(every)],
                                       stdout=subprocess.PIPE, text=True)
            time.sleep(0.3)
            busy: list[float] = []
            loop_lateness(seconds, busy)
            n = int(scraper.communicate(timeout=60)[0].strip() or 0)
            stop.set()
            pub.join()
            late = sum(1 for x in busy if x > 0.001)
            print(f"loop wake-up lateness, {what:<20} {stats_us(busy)}")
            print(f"  {n} scrapes in {seconds + 0.5:.1f} s by another process, each of a new snapshot; "
                  f"{late / len(busy):.1%} of wake-ups more than 1 ms late")
        print(f"  (a scrape renders in the server thread holding the GIL; a thread waiting for it gets it "
              f"when the render ends or after the {sys.getswitchinterval() * 1e3:g} ms switch interval)")
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--cpus", type=int, default=64)
    ap.add_argument("--scrapes", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=3.0, help="per phase of the loop measurement")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval() in seconds (vcpud run sets 0.0005 when it serves metrics)")
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    snap = big_snapshot(args.vms, args.cpus)
    threads = sum(len(v.threads) for v in snap.vms)
    print(f"snapshot: {len(snap.vms)} VMs, {threads} threads, {len(snap.online)} online CPUs")
    bench_scrapes(snap, args.scrapes)
    bench_loop(snap, args.seconds)


if __name__ == "__main__":
    main()
