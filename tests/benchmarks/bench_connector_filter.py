"""What the proc connector's BPF filter saves a listener, and what it costs the kernel per event.

Run: python3 -m tests.benchmarks.bench_connector_filter [--seconds 5] (root; no daemon, no qemu)

1. A child process forks (each child exits at once) at 1,000 and 2,000 forks/s (and 0: the
   host's own events); this process reads a ProcConnector (the kinds `vcpud run` asks for)
   without a filter and with watch() of 10, 100 and 500 tgids that are not the flood's. Printed:
   the reader's CPU time per second of flood, the events it received per second and how many of
   them were the flood's FORKs, the fork rate the child reached and its CPU time per fork.
2. The per-event cost of the program in the kernel, paid by the task that generates the event:
   100 connector sockets carry the same filter, so every event runs it 100 times (and clones
   the event 100 times: the row without any tgid shows that part); a child renames itself
   (prctl PR_SET_NAME, one COMM event each, a name no filter passes) in a tight loop. Printed:
   its CPU time per rename, and per socket above the row with none of ours open, for filters
   watching 0, 10, 500 and 2,700 tgids, and 500 with leaves of 250 tests (close to a linear list
   of comparisons); "run" is the instructions run for such an event.

Other listeners on the host (other daemons) add to every event's cost alike; the machine's load
varies: compare the rows of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import subprocess
import sys
import time

from vcpud import procfilter
from vcpud.procconn import Overrun, ProcConnector

KINDS = {"fork", "exec", "comm", "exit"}
PID_MAX = 4194304

FLOOD = r"""
import os, signal, sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children: no waiting on them
sys.stdin.readline()
t0 = time.monotonic()
next_at, n = t0, 0
if rate == 0:
    time.sleep(seconds)
while rate and (now := time.monotonic()) < t0 + seconds:
    if now < next_at:
        time.sleep(next_at - now)
    next_at += 1 / rate
    if os.fork() == 0:
        os._exit(0)
    n += 1
elapsed = time.monotonic() - t0
ru = os.times()
print(n / elapsed, (ru.user + ru.system) / max(n, 1) * 1e6, flush=True)
"""

RENAMES = r"""
import ctypes, sys, time
libc = ctypes.CDLL(None)
n = int(sys.argv[1])
names = [b"bench-a", b"bench-b"]
sys.stdin.readline()
t0 = time.thread_time_ns()
for i in range(n):
    libc.prctl(15, names[i & 1], 0, 0, 0)
print((time.thread_time_ns() - t0) / n, flush=True)
"""


def strangers(n: int, avoid: int) -> set[int]:
    """n tgids that are not the flood's (its children get pids near its own)."""
    rng = random.Random(n)
    return set([t for t in rng.sample(range(2, PID_MAX), 2 * n) if abs(t - avoid) > 100_000][:n])


def flood(pc: ProcConnector, rate: int, seconds: float) -> tuple[float, float, float, float, float, int]:
    """(reader CPU seconds per second, events per second, of which the flood's forks, forks per second,
    the flooder's µs of CPU per fork, overruns)."""
    child = subprocess.Popen([sys.executable, "-S", "-c", FLOOD, str(rate), str(seconds)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    events = overruns = its_forks = 0
    poller = select.poll()
    poller.register(pc.fileno(), select.POLLIN)
    while pc.read():  # what came before
        pass
    return_tuple: list[str] | None = None
    cpu0, t0 = time.process_time(), time.monotonic()
    child.stdin.write("go\n")
    child.stdin.flush()
    poller.register(child.stdout.fileno(), select.POLLIN)
    while return_tuple is None:
        for fd, _ in poller.poll(1000):
            if fd == pc.fileno():
                try:
                    got = pc.read()
                except Overrun as e:
                    overruns += 1
                    got = e.events
                events += len(got)
                its_forks += sum(1 for ev in got if ev.what == "fork" and ev.parent_tgid == child.pid)
            elif fd == child.stdout.fileno():
                return_tuple = child.stdout.readline().split()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    child.wait()
    rate_done, us_per_fork = float(return_tuple[0]), float(return_tuple[1])
    return cpu / wall, events / wall, its_forks / wall, rate_done, us_per_fork, overruns


def rename_cost(n: int, reader: ProcConnector | None) -> float:
    """ns of CPU per prctl(PR_SET_NAME) in a child, while `reader` (if any) is drained here."""
    child = subprocess.Popen([sys.executable, "-S", "-c", RENAMES, str(n)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    poller = select.poll()
    poller.register(child.stdout.fileno(), select.POLLIN)
    if reader is not None:
        poller.register(reader.fileno(), select.POLLIN)
    while True:
        for fd, _ in poller.poll(1000):
            if reader is not None and fd == reader.fileno():
                try:
                    reader.read()
                except Overrun:
                    pass
            elif fd == child.stdout.fileno():
                out = float(child.stdout.readline())
                child.wait()
                return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="of fork flood per row (default 5)")
    ap.add_argument("--renames", type=int, default=50_000, help="per run of part 2 (default 50,000)")
    ap.add_argument("--sockets", type=int, default=100, help="part 2: connector sockets with the filter (default 100)")
    ap.add_argument("--rounds", type=int, default=7, help="part 2: rows are the median of this many runs")
    args = ap.parse_args()

    print(f"kernel {os.uname().release}, bpf_jit_enable={open('/proc/sys/net/core/bpf_jit_enable').read().strip()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print("\n1. fork flood (each fork: FORK + EXIT events); the reader: ProcConnector.read() in a poll loop")
    print(f"{'rate/s':>7} {'filter':>14} {'reader CPU':>11} {'events/s':>9} {'its forks/s':>12} {'forks/s':>8} "
          f"{'µs/fork':>8} {'overruns':>8}")
    with ProcConnector(events=KINDS) as pc:
        for rate in (0, 1000, 2000):
            for watch in (None, 10, 100, 500):
                if watch is not None:
                    t = time.perf_counter()
                    pc.watch(strangers(watch, os.getpid()))
                    built = (time.perf_counter() - t) * 1e3
                else:
                    pc.watch(None)
                label = "none" if watch is None else f"{watch} tgids"
                cpu, evs, its, done, us, ov = flood(pc, rate, args.seconds)
                us_s = f"{us:.1f}" if rate else "-"
                print(f"{rate:>7} {label:>14} {cpu * 100:>10.2f}% {evs:>9.0f} {its:>12.0f} {done:>8.0f} {us_s:>8} "
                      f"{ov:>8}")
                if watch is not None and rate == 0:
                    print(f"{'':>7} {'':>14} (watch() of {watch} tgids took {built:.2f} ms)")

    print(f"\n2. per-event cost of the program in the kernel: {args.sockets} connector sockets, all with the same "
          f"filter, each runs it on every event; a child renames itself {args.renames:,} times per run (a COMM "
          f"every filter drops, after its longest path); median of {args.rounds} runs, the rows interleaved")
    rows: list[tuple[str, list[procfilter.Insn] | None]] = [("none of ours open", None)]
    for n, leaf in ((0, procfilter.LEAF), (10, procfilter.LEAF), (500, procfilter.LEAF), (500, 250),
                    (2700, procfilter.LEAF)):
        rows.append((f"{n} tgids, leaves of {leaf}", procfilter.build(strangers(n, os.getpid()), KINDS, leaf)))
    results: dict[str, list[float]] = {label: [] for label, _ in rows}
    for _ in range(args.rounds):
        for label, prog in rows:
            socks: list[ProcConnector] = []
            try:
                while prog is not None and len(socks) < args.sockets:
                    socks.append(ProcConnector(events=KINDS))
                    procfilter.attach(socks[-1]._sock, prog)  # any leaf size, which watch() does not offer
                results[label].append(rename_cost(args.renames, None))
            finally:
                for pc in socks:
                    pc.close()
    base = sorted(results[rows[0][0]])[args.rounds // 2]
    print(f"{'filter':>26} {'ns/rename':>10} {'min':>6} {'max':>6} {'ns/socket':>10} {'insns':>6} {'run':>4}")
    for label, prog in rows:
        r = sorted(results[label])
        med = r[len(r) // 2]
        per = f"{(med - base) / args.sockets:.1f}" if prog is not None else ""
        size = str(len(prog)) if prog is not None else ""
        ran = str(longest_path(prog)) if prog is not None else ""
        print(f"{label:>26} {med:>10.0f} {r[0]:>6.0f} {r[-1]:>6.0f} {per:>10} {size:>6} {ran:>4}")


def longest_path(prog: list[procfilter.Insn]) -> int:
    """Instructions run for the benchmark's COMM (unwatched tgid, a name that is no vCPU's): the
    tree's deepest leaf, all its tests failing."""
    best = 0

    def walk(pc: int, steps: int) -> None:
        nonlocal best
        code, jt, jf, k = prog[pc]
        if code == procfilter.RET:
            best = max(best, steps + 1)
        elif code == procfilter.JA:
            walk(pc + 1 + k, steps + 1)
        elif code & 0x07 == procfilter.BPF_JMP:
            walk(pc + 1 + jt, steps + 1)
            if jf != jt:
                walk(pc + 1 + jf, steps + 1)
        else:
            walk(pc + 1, steps + 1)

    walk(0, 0)
    return best


if __name__ == "__main__":
    main()
