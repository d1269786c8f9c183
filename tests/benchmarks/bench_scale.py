"""vcpud at host scale against the seed's way, on N real paused guests (root; prints numbers, asserts nothing).

    python3 -m tests.benchmarks.bench_scale [--vms 100] [--idle-seconds 60] [--flood-rates 1000,2000]
        [--flood-seconds S] [--event-flood-rate 1000] [--iothreads 200] [--quick]

Starts N guests (`-S -smp 16`, IO threads io1 and io2, debug-threads: 20 threads each) named after
this run only, and a policy that pins every thread of theirs to CPU 0 or 1 (vCPU i to i % 2, io1 to 0,
io2 to 1, emulator to 0): from qemu's initial 0-1 every thread needs a pin, and "drift" moves every
thread to the other CPU. Prints one Markdown table, each number against the seed's way measured in the
same run on the same threads (one `ps -eLo pid,lwp,comm`, one `taskset -pc CPU TID` per thread):
`vcpud apply` as a whole process; `vcpud run`'s reconcile after every thread drifted and SIGHUP (its
own vcpud_reconcile_duration_seconds histogram); its CPU idle and while another process forks children
that exit at once R times a second; its RSS; COMM event -> pinned for IO threads made by QMP object-add
under a fork flood. --quick: 10 guests, 5 s windows, 50 IO threads. --vms 500 needs ~12.5 GB: checked
first. Other work on the machine (other engineers' tests) shows in every number: the load is printed.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.benchmarks.bench_daemon import cpu_seconds, rss_kib
from tests.conftest import REPO
from tests.daemon_harness import DaemonProc, Qmp
from tests.qemu import QEMU, RUN, Guest, kvm_usable, start_guest

SMP = 16
PER_GUEST = SMP + 4  # vCPUs, io1 and io2, two emulator threads
MIB_PER_GUEST = 25
PREFIX = f"{RUN}scale-"
GUEST_ARGS = ("-object", "iothread,id=io1", "-object", "iothread,id=io2")
VCPU = re.compile(r"CPU (\d+)/(KVM|TCG)$")
ENV = dict(os.environ, PYTHONPATH=str(REPO))
RESCAN_S = 10  # rescan_interval below

# A process that forks children which exit at once, `rate` a second; on SIGTERM it prints "forks seconds".
FLOOD = """\
import os, signal, sys, time
rate, stop = float(sys.argv[1]), []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
t0, n = time.monotonic(), 0
while not stop:
    due = t0 + n / rate - time.monotonic()
    if due > 0:
        time.sleep(due)
    if os.fork() == 0:
        os._exit(0)
    n += 1
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
print(n, time.monotonic() - t0, flush=True)
"""


def config_text(state: Path) -> str:
    vcpupin = ", ".join(f'{i}: "{i % 2}"' for i in range(SMP))
    return f"""\
rescan_interval: {RESCAN_S}s
state_file: {state}
policies:
  - name: lat
    match: {{name: "{PREFIX}lat"}}
    vcpus: "1"
    emulatorpin: "0"
    iothreadpin: "1"
  - name: scale
    match: {{name: "{PREFIX}vm*"}}
    vcpupin: {{{vcpupin}}}
    emulatorpin: "0"
    iothreadpin: {{io1: "0", io2: "1"}}
"""


def want(comm: str) -> int | None:
    """The CPU the `scale` policy wants a thread on, by its name (None: a kernel worker, never pinned)."""
    m = VCPU.match(comm)
    if m:
        return int(m.group(1)) % 2
    if comm in ("IO io1", "IO io2"):
        return int(comm[-1]) - 1
    return None if comm.startswith("kvm") else 0


def wanted(guests: list[Guest]) -> dict[int, int]:
    """tid -> wanted CPU, for every thread of these guests."""
    return {tid: cpu for g in guests for tid, comm in g.threads().items() if (cpu := want(comm)) is not None}


def misplaced(tids: dict[int, int]) -> int:
    """How many of the threads are not on exactly their wanted CPU, seen from outside."""
    bad = 0
    for tid, cpu in tids.items():
        try:
            bad += os.sched_getaffinity(tid) != {cpu}
        except OSError:
            bad += 1
    return bad


def drift(tids: dict[int, int]) -> None:
    for tid, cpu in tids.items():
        os.sched_setaffinity(tid, {1 - cpu})


def wait_pinned(tids: dict[int, int], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (bad := misplaced(tids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return bad


def start_guests(tmp: Path, n: int, guests: list[Guest], batch: int = 25) -> None:
    """Start n guests, `batch` at a time without waiting, then wait for each batch's named threads."""
    for first in range(0, n, batch):
        group = []
        for i in range(first, min(n, first + batch)):
            group.append(start_guest(tmp, f"{PREFIX}vm{i}", *GUEST_ARGS, smp=str(SMP), wait_vcpus=False))
            guests.append(group[-1])
        for g in group:
            deadline = time.monotonic() + 60
            while len([c for c in g.threads().values() if VCPU.match(c) or c.startswith("IO ")]) < SMP + 2:
                if g.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"guest {g.name} did not come up: {g.log.read_text()[-2000:]}")
                time.sleep(0.01)


def cpu_used() -> float:
    """CPU time of this process and its reaped children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def seed_way(pids: set[int]) -> tuple[float, float, int]:
    """One `ps -eLo pid,lwp,comm`, then `taskset -pc CPU TID` for every thread of these processes:
    (wall seconds, CPU seconds, tasksets run)."""
    c0, t0 = cpu_used(), time.perf_counter()
    ps = subprocess.run(["ps", "-eLo", "pid,lwp,comm"], capture_output=True, text=True, check=True).stdout
    n = 0
    for line in ps.splitlines()[1:]:
        pid, lwp, comm = line.split(None, 2)
        cpu = want(comm.strip()) if int(pid) in pids else None
        if cpu is not None:
            subprocess.run(["taskset", "-pc", str(cpu), lwp], stdout=subprocess.DEVNULL, check=True)
            n += 1
    return time.perf_counter() - t0, cpu_used() - c0, n


def apply_once(cfg: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "vcpud", "apply", "--config", str(cfg)],
                       capture_output=True, text=True, env=ENV)
    took = time.perf_counter() - t0
    if r.returncode:
        print(f"note: vcpud apply exited {r.returncode}: {(r.stdout + r.stderr)[-1000:]}")
    return took


def scrape(port: int) -> dict[str, float]:
    """The daemon's metrics (one snapshot), by name with labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return {k: float(v) for k, v in re.findall(r"^(vcpud_\S+) (\S+)$", r.read().decode(), re.M)}


RECONCILES = ("vcpud_reconcile_duration_seconds_sum", "vcpud_reconcile_duration_seconds_count",
              'vcpud_config_reloads_total{result="success"}')


def reload_after_drift(d: DaemonProc, port: int, tids: dict[int, int]) -> tuple[float, int, int]:
    """Drift every thread, SIGHUP, wait for the snapshot that has the reload (its reconcile is in the same
    snapshot): (seconds of the reconciles in the window, how many, threads still misplaced afterwards)."""
    s0, c0, r0 = map(scrape(port).get, RECONCILES)
    drift(tids)
    d.hup()
    deadline = time.monotonic() + 120
    while (now := list(map(scrape(port).get, RECONCILES)))[2] == r0:  # all three from one scrape
        if time.monotonic() > deadline:
            raise RuntimeError(f"no reload in 120 s:\n{d.log()[-3000:]}")
        time.sleep(0.05)
    return (now[0] or 0) - (s0 or 0), int((now[1] or 0) - (c0 or 0)), misplaced(tids)


def forks() -> int:
    """Processes and threads created on the host since boot."""
    return next(int(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("processes "))


def cpu_pct(pid: int, seconds: float) -> tuple[float, float, float]:
    """The process's (CPU seconds, % of one core) over the next `seconds`, and the host's forks per second."""
    c0, f0, t0 = cpu_seconds(pid), forks(), time.monotonic()
    time.sleep(seconds)
    c1, f1, t1 = cpu_seconds(pid), forks(), time.monotonic()
    return c1 - c0, (c1 - c0) / (t1 - t0) * 100, (f1 - f0) / (t1 - t0)


def start_flood(rate: int, floods: list[subprocess.Popen]) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-I", "-S", "-c", FLOOD, str(rate)], stdout=subprocess.PIPE, text=True)
    floods.append(p)
    return p


def stop_flood(p: subprocess.Popen) -> float:
    """Stop it; the rate it achieved over its life, forks per second."""
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    n, took = out.split()
    return int(n) / float(took)


def event_path(tmp: Path, d: DaemonProc, port: int, guests: list[Guest], floods: list[subprocess.Popen], m: int,
               rate: int) -> tuple[list[int], str]:
    """(latencies in us of the event-driven IO thread pins, what happened besides)."""
    qmp_path = tmp / "qmp.sock"
    g = start_guest(tmp, f"{PREFIX}lat", "-qmp", f"unix:{qmp_path},server=on,wait=off", smp="1")
    guests.append(g)
    qmp = Qmp(qmp_path)
    try:
        vcpu = next(t for t, c in g.threads().items() if VCPU.match(c))
        wait_pinned({vcpu: 1}, 30)
        fl = start_flood(rate, floods) if rate else None
        time.sleep(1)
        start, over0 = len(d.log()), scrape(port)["vcpud_proc_connector_overruns_total"]
        t0 = time.monotonic()
        for i in range(m):
            qmp.cmd("object-add", **{"qom-type": "iothread", "id": f"b{i}"})
        t1 = time.monotonic()
        io = dict.fromkeys((t for t, c in g.threads().items() if c.startswith("IO b")), 1)
        left = wait_pinned(io, 60)  # under the flood still: a lagging daemon catches up
        took = time.monotonic() - t1
        achieved = stop_flood(fl) if fl else 0.0
        time.sleep(0.5)
        over = scrape(port)["vcpud_proc_connector_overruns_total"] - over0
    finally:
        qmp.close()
    found = re.findall(rf"pinned VM {re.escape(g.name)} .* by iothreadpin \((\d+) us after the event\)",
                       d.log()[start:])
    return sorted(int(x) for x in found), (
        f"{len(io) - left} of {m} pinned seen from outside, the last {took:.2f} s after the last object-add "
        f"(they took {t1 - t0:.2f} s); "
        f"{over:.0f} proc connector overruns; fork flood achieved {achieved:,.0f}/s")


def meminfo(key: str) -> int:
    return int(re.findall(rf"^{key}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)[0])


def qemus() -> int:
    """qemu processes on the host (call it while this run has none)."""
    return len(subprocess.run(["pgrep", "qemu-system"], capture_output=True, text=True).stdout.split())


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "?")
    qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return (f"{os.cpu_count()} CPUs ({model}), {meminfo('MemTotal') / 2**20:.1f} GiB RAM, Linux {os.uname().release}, "
            f"{'KVM' if kvm_usable() else 'TCG (no usable /dev/kvm)'}, {qemu}")


def fits(n: int) -> str | None:
    """Why n guests cannot be started here, or None."""
    need, avail = (n + 1) * MIB_PER_GUEST + 512, meminfo("MemAvailable") // 1024
    if need > avail:
        return f"{n} guests need about {need} MiB ({MIB_PER_GUEST} MiB each + 512), MemAvailable is {avail} MiB"
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    tasks = int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    if n * PER_GUEST + 2000 > pid_max - tasks:
        return f"{n} guests need {n * PER_GUEST} thread ids; pid_max is {pid_max} and {tasks} are in use"
    return None


def ms(s: float) -> str:
    return f"{s * 1e3:,.0f} ms" if s >= 0.01 else f"{s * 1e3:.2f} ms"


def rel(seed: float, x: float, better: str = "faster", worse: str = "slower") -> str:
    """x against the seed's number, lower is better."""
    if not x or not seed:
        return "-"
    return f"{seed / x:.1f}× {better}" if x <= seed else f"{x / seed:.1f}× {worse}"


Rows = list[tuple[str, str, str]]


def bench_oneshot(cfg: Path, guests: list[Guest], tids: dict[int, int], rows: Rows, notes: list[str]) -> tuple[
        float, float]:
    """The seed's way and `vcpud apply`: (the seed's CPU seconds per pass, its wall seconds after a drift)."""
    pids = {g.pid for g in guests}
    for g in guests:
        g.unpin()
    seed, seed_cpu, n = seed_way(pids)
    rows.append((f"seed's way: `ps -eLo` + {n:,} × `taskset -pc`, from unpinned", ms(seed), "1× (reference)"))
    # As installed (a package ships its bytecode): compiled once, read by every run even where
    # PYTHONDONTWRITEBYTECODE is set (it is in CI and on the development VMs).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).resolve().parents[2] / "vcpud")],
                   check=True)
    runs = []
    for _ in range(3):
        for g in guests:
            g.unpin()
        runs.append(apply_once(cfg))
        if left := misplaced(tids):
            notes.append(f"vcpud apply left {left} of {len(tids)} threads misplaced")
    best, med = min(runs), statistics.median(runs)
    rows.append(("`vcpud apply`, whole process, from unpinned (3 runs)", f"best {ms(best)}, median {ms(med)}",
                 f"{rel(seed, best)} (median: {rel(seed, med)})"))
    drift(tids)
    seed_drift, _, n = seed_way(pids)
    rows.append((f"seed's way after every thread drifted ({n:,} × `taskset -pc`)", ms(seed_drift),
                 "1× (reference for the next row)"))
    if left := misplaced(tids):
        notes.append(f"the seed's way left {left} threads misplaced")
    return seed_cpu, seed_drift


def bench_reconcile(d: DaemonProc, port: int, tids: dict[int, int], seed_drift: float, rows: Rows,
                    notes: list[str]) -> None:
    # A first reload restarts the rescan timer: no periodic rescan falls in the rounds below. A round
    # in whose window anything else was reconciled (another user's qemu starting) is repeated.
    reload_after_drift(d, port, {})
    took: list[float] = []
    dropped = 0
    while len(took) < 3 and dropped < 6:
        s, k, left = reload_after_drift(d, port, tids)
        if left:
            notes.append(f"after a drift round {left} threads were left misplaced")
        if k == 1:
            took.append(s)
        else:
            dropped += 1
            notes.append(f"a drift round was repeated: {k} reconciles in its window ({ms(s)} together)")
    rec = statistics.median(took) if took else 0.0
    rows.append((f"daemon, every thread drifted, SIGHUP: its reconcile (own histogram, {len(took)} runs)",
                 f"median {ms(rec)} ({', '.join(ms(x) for x in took)})", rel(seed_drift, rec)))


def bench_cpu(d: DaemonProc, what: str, seconds: float, seed_pct: float, rows: Rows, floods: list[subprocess.Popen],
              flood: int = 0) -> None:
    """The daemon's CPU over `seconds`, with a `flood` of forks a second meanwhile if not 0."""
    fl = start_flood(flood, floods) if flood else None
    time.sleep(1 if fl else 2)
    cpu, pct, fps = cpu_pct(d.pid, seconds)
    if fl is not None:
        what += f" (achieved {stop_flood(fl):,.0f}/s)"
    rows.append((f"{what}, {seconds:.0f} s", f"{pct:.2f} % of one core ({cpu:.2f} s CPU; host forks {fps:,.0f}/s)",
                 f"{rel(seed_pct, pct, 'less', 'more')} than {seed_pct:.1f} % *"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vms", type=int)
    ap.add_argument("--idle-seconds", type=float)
    ap.add_argument("--flood-seconds", type=float, help="each flood window (default: --idle-seconds)")
    ap.add_argument("--flood-rates", default="1000,2000")
    ap.add_argument("--event-flood-rate", type=int, default=1000)
    ap.add_argument("--iothreads", type=int)
    ap.add_argument("--quick", action="store_true", help="10 guests, 5 s windows, 50 IO threads")
    a = ap.parse_args()
    vms = a.vms or (10 if a.quick else 100)
    idle_s = a.idle_seconds or (5 if a.quick else 60)
    n_io = a.iothreads or (50 if a.quick else 200)
    if os.geteuid() != 0:
        sys.exit("bench_scale: run as root (it pins other processes' threads)")
    if (why := fits(vms)) is not None:
        sys.exit(f"bench_scale: refusing to start: {why}; try fewer --vms")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (finally) on SIGTERM too

    began, load0, others0 = time.monotonic(), os.getloadavg(), qemus()
    guests: list[Guest] = []
    floods: list[subprocess.Popen] = []
    d: DaemonProc | None = None
    rows: Rows = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as t:
        tmp = Path(t)
        cfg = tmp / "vcpud.yaml"
        cfg.write_text(config_text(tmp / "state.json"))
        try:
            start_guests(tmp, vms, guests)
            tids = wanted(guests)
            threads = f"{vms} VMs, {len(tids):,} threads"
            print(f"started {threads} in {time.monotonic() - began:.1f} s", flush=True)
            seed_cpu, seed_drift = bench_oneshot(cfg, guests, tids, rows, notes)

            for g in guests:
                g.unpin()
            t0 = time.monotonic()
            d = DaemonProc(tmp, cfg, "--metrics-listen", "127.0.0.1:0")
            left = wait_pinned(tids, 120)
            notes.append(f"`vcpud run` start -> all {len(tids):,} threads pinned (seen from outside): "
                         f"{time.monotonic() - t0:.2f} s, {left} left misplaced")
            d.wait_log(r"serving metrics on http://")
            port = int(re.findall(r"serving metrics on http://127\.0\.0\.1:(\d+)/", d.log())[0])
            bench_reconcile(d, port, tids, seed_drift, rows, notes)

            # The seed's way keeps nothing running: to catch drift as the daemon does it would run every
            # rescan_interval; its CPU time per pass over that interval is what the CPU rows compare with.
            seed_pct = seed_cpu / RESCAN_S * 100
            bench_cpu(d, f"idle daemon, {vms} VMs, nothing changing", idle_s, seed_pct, rows, floods)
            for rate in (int(r) for r in a.flood_rates.split(",") if r):
                bench_cpu(d, f"same, while another process forks and exits {rate:,}/s", a.flood_seconds or idle_s,
                          seed_pct, rows, floods, rate)

            lat, also = event_path(tmp, d, port, guests, floods, n_io, a.event_flood_rate)
            rows.append(("daemon resident memory (VmRSS) after all of this", f"{rss_kib(d.pid) / 1024:.1f} MiB",
                         "- (the seed's way keeps no process)"))
            res = f"measured {len(lat)} of {n_io}; {also}"
            if lat:
                p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                res = f"p50 {p50:,} µs, p99 {p99:,} µs, max {lat[-1]:,} µs; " + res
            rows.append((f"COMM event -> pinned, {n_io} IO threads by QMP `object-add` on one more guest, "
                         f"{a.event_flood_rate:,}/s fork flood, {vms} VMs idle", res,
                         "- (the seed's way pins a new thread at its next run)"))
        finally:
            for p in [*floods, *(g.proc for g in guests)]:
                if p.poll() is None:
                    p.kill()
            if d is not None:
                d.stop()
            for p in [*floods, *(g.proc for g in guests)]:
                p.wait(timeout=30)

    print(f"\nMeasured {time.strftime('%Y-%m-%d %H:%M')} on {machine()}; {threads} (`-S -smp 16`, 2 IO threads). "
          f"Not alone on the machine: load average {load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
          f"{others0} qemu processes of others at the start, {qemus()} at the end (after ours exited).\n")
    print("| what | result | vs the seed's way |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n\\* the seed's way run every {RESCAN_S} s (rescan_interval) to catch drift as the daemon does: "
          f"{seed_cpu:.2f} s CPU per pass (ps, the tasksets and the loop starting them)")
    for note in notes:
        print(f"- {note}")
    print(f"\nthe whole run took {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
