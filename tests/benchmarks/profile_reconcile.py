"""Profile the reconciler in-process on real paused guests (root; prints timings and cProfile tops).

    python3 -m tests.benchmarks.profile_reconcile [--vms 30] [--profile startup,periodic,reload,apply] [--rounds N]

Each pass is timed as the daemon times it (Reconciler.rescan / reload); with --profile the
named passes are run again under cProfile and the top functions by cumulative time printed.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import io
import logging
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from tests.qemu import RUN, Guest, start_guest
from vcpud import cli
from vcpud.activity import Stats
from vcpud.config import load_config
from vcpud.holdings import FileStore
from vcpud.pinning import OsAffinity
from vcpud.procfs import Procfs
from vcpud.reconciler import Reconciler, ScanReason
from vcpud.topology import read_topology

CONFIG = """\
policies:
  - name: scale
    match: {{name: "{prefix}*"}}
    vcpus: "{vcpus}"
    emulatorpin: "0"
    iothreadpin: "1"
"""


def start(tmp: Path, n: int) -> list[Guest]:
    guests = [start_guest(tmp, f"{RUN}prof{i}", "-object", "iothread,id=io1", "-object", "iothread,id=io2",
                          smp="16", wait_vcpus=False) for i in range(n)]
    deadline = time.monotonic() + 120
    for g in guests:
        while sum(1 for c in g.threads().values() if c.startswith("CPU ")) < 16:
            if time.monotonic() > deadline or g.proc.poll() is not None:
                raise RuntimeError(f"guest {g.name} did not start: {g.log.read_text()}")
            time.sleep(0.05)
    return guests


def drift(guests: list[Guest]) -> int:
    """Move every thread to where its policy does not want it; returns how many."""
    n = 0
    for g in guests:
        for tid, comm in g.threads().items():
            want_one = comm.startswith("IO ") or (comm.startswith("CPU ") and int(comm[4:].split("/")[0]) % 2)
            os.sched_setaffinity(tid, {0} if want_one else {1})
            n += 1
    return n


def timed(what: str, f: Callable[[], object], prof: bool) -> None:
    t0 = time.perf_counter()
    if prof:
        p = cProfile.Profile()
        p.runcall(f)
        dt = time.perf_counter() - t0
        out = io.StringIO()
        pstats.Stats(p, stream=out).sort_stats(os.environ.get("PROFILE_SORT", "cumulative")).print_stats(25)
        print(f"--- {what}: {dt * 1e3:.1f} ms (under cProfile)\n{out.getvalue()}")
    else:
        c0 = time.process_time()
        f()
        print(f"{what}: {(time.perf_counter() - t0) * 1e3:.1f} ms ({(time.process_time() - c0) * 1e3:.1f} ms CPU)")


def cpu_ms(f: Callable[[], object]) -> float:
    c0 = time.process_time()
    f()
    return (time.process_time() - c0) * 1e3


def rounds(rec: Reconciler, guests: list[Guest], reload: Callable[[], object], n: int) -> None:
    periodic, reloads = [], []
    for _ in range(n):
        periodic.append(cpu_ms(lambda: rec.rescan(ScanReason.PERIODIC)))
        drift(guests)
        reloads.append(cpu_ms(reload))
    from vcpud.publisher import snapshot
    published = [cpu_ms(lambda: snapshot(rec)) for _ in range(n)]  # what the daemon does after each pass
    for what, xs in (("periodic rescan", periodic), ("reload after every thread drifted", reloads),
                     ("a snapshot for the metrics, nothing changed", published)):
        print(f"{what}, {n} rounds: CPU min {min(xs):.1f} ms, median {statistics.median(xs):.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=30)
    ap.add_argument("--profile", default="", help="comma-separated: startup,periodic,reload,apply")
    ap.add_argument("--rounds", type=int, default=1,
                    help="more rounds of periodic rescan + drift + reload: min and median CPU (a busy host)")
    args = ap.parse_args()
    prof = set(filter(None, args.profile.split(",")))
    # The daemon logs every pin at info level (to the journal or stderr): so does this, to /dev/null.
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.INFO,  # noqa: SIM115
                        format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = tmp / "vcpud.yaml"
        cfg.write_text(CONFIG.format(prefix=RUN, vcpus="0,1"))
        guests = start(tmp, args.vms)
        try:
            topo = read_topology(Path("/"))
            config = load_config(cfg, online=topo.online)
            nthreads = sum(len(g.threads()) for g in guests)
            print(f"{args.vms} guests, {nthreads} threads")
            for g in guests:
                g.unpin()
            if "apply" in prof:  # `vcpud apply` in this process (imports done): every thread to pin
                def apply() -> None:
                    with contextlib.redirect_stdout(io.StringIO()):
                        cli.main(["apply", "-c", str(cfg)])
                timed("vcpud apply, in-process", apply, True)
                for g in guests:
                    g.unpin()
            for p in (False, True) if prof - {"apply"} else (False,):
                rec = Reconciler(config, topo.online, Procfs(), OsAffinity(), FileStore(tmp / "state.json"),
                                 topology=topo, stats=Stats())
                rec.trust_events = True  # as in the daemon, with the proc connector
                timed("startup (every thread pinned)", lambda rec=rec: rec.rescan(ScanReason.STARTUP),
                      p and "startup" in prof)
                rec.watched()  # as the daemon: its proc connector filter passes these VMs' events now
                timed("first periodic rescan (reads the task lists)", lambda rec=rec: rec.rescan(ScanReason.PERIODIC),
                      False)
                timed("periodic rescan, nothing changed", lambda rec=rec: rec.rescan(ScanReason.PERIODIC),
                      p and "periodic" in prof)
                print(f"  drifted {drift(guests)} threads")
                timed("reload after every thread drifted", lambda rec=rec: rec.reload(config, topo.online, topo),
                      p and "reload" in prof)
                timed("periodic rescan, nothing changed", lambda rec=rec: rec.rescan(ScanReason.PERIODIC), False)
                if not p and args.rounds > 1:
                    rounds(rec, guests, lambda rec=rec: rec.reload(config, topo.online, topo), args.rounds)
                for g in guests:
                    g.unpin()
        finally:
            for g in guests:
                g.kill()


if __name__ == "__main__":
    main()
