"""Benchmarks of `vcpud run` on real guests (root; prints numbers, asserts nothing).

    python3 -m tests.benchmarks.bench_daemon [--threads 1000] [--starts 20] [--idle-seconds 60]

1. pin latency: kernel COMM event -> sched_setaffinity done, for IO threads created through QMP
   object-add (p50/p99 measured by the daemon from the connector's own timestamps), while other
   guests idle. Each IO thread starts off-policy (qemu's main loop, which runs QMP commands and
   creates them, is on the emulatorpin CPU, not the iothreadpin one) and lives until the daemon
   has logged what it did about it (at most 0.2 s): every one is measured, or said why not.
   --trace FILE times the daemon's event path stage by stage (tests/benchmarks/trace_daemon.py);
2. qemu start -> all vCPUs pinned, seen from outside by polling /proc;
3. idle cost: the daemon's CPU time and RSS over a quiet minute with 20 guests;
4. vCPU hotplug (QMP device_add) -> the new vCPU thread pinned, seen from outside;
5. watchdog: with WATCHDOG_USEC=200000 (pings due every 100 ms), the gaps between WATCHDOG=1 messages.

tests/integration/test_daemon.py checks the same behaviours with generous deadlines only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from tests.daemon_harness import DaemonProc, Qmp
from tests.qemu import RUN, start_guest

# Guests are named RUN + "bench...", and the policy matches only those: another run's daemon (or
# anyone's) on the same host never pins this run's guests, nor this daemon theirs.
BENCH = f"{RUN}bench"
CONFIG = f"""\
rescan_interval: 10s
policies:
  - name: bench
    match: {{name: "{BENCH}*"}}
    vcpus: "1"
    emulatorpin: "0"
    iothreadpin: "1"
"""
EMULATOR_CPUS, IOTHREAD_CPUS = {0}, {1}


def cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads, in ns precision (schedstat's first field)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total / 1e9


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentile(xs: list[Any], q: float) -> Any:
    """The value at quantile q of sorted ``xs`` (nearest rank)."""
    return xs[min(len(xs) - 1, max(0, int(len(xs) * q + 0.5) - 1))]


def host_noise() -> str:
    """What else is running: the load average and qemu processes that are not this run's."""
    others = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        others += "qemu-system" in exe and f"guest={RUN}".encode() not in cmd
    load = Path("/proc/loadavg").read_text().split()[:3]
    return f"load average {' '.join(load)}, {others} other qemu processes running"


def cpu_times() -> tuple[int, int, int]:
    """The host's (total, idle, stolen) CPU time so far, in ticks (/proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(f), f[3] + f[4], f[7]


def cpu_use(t0: tuple[int, int, int], t1: tuple[int, int, int]) -> str:
    total = max(1, t1[0] - t0[0])
    return (f"{100 * (total - (t1[1] - t0[1])) / total:.0f} % busy (this run's processes included), "
            f"{100 * (t1[2] - t0[2]) / total:.1f} % stolen by the hypervisor")


def wait_host_idle(idle: float = 0.9, window: float = 2.0, timeout: float = 60.0) -> str:
    """Until the host's CPUs were at least ``idle`` idle over ``window`` seconds (the guests just
    started settle), at most ``timeout`` seconds; what the last window showed."""
    deadline = time.monotonic() + timeout
    while True:
        t0 = cpu_times()
        time.sleep(window)
        t1 = cpu_times()
        if (t1[1] - t0[1]) / max(1, t1[0] - t0[0]) >= idle or time.monotonic() > deadline:
            return cpu_use(t0, t1)


class LogTail:
    """A growing log file, read as it grows."""

    def __init__(self, path: Path) -> None:
        self._f = path.open(encoding="utf-8", errors="replace")
        self._text = ""

    def wait_for(self, needle: str, timeout: float, poll: float = 0.0005) -> bool:
        """Until ``needle`` shows up in what was written since the last wait_for() that found its needle."""
        deadline = time.monotonic() + timeout
        while True:
            self._text += self._f.read()
            at = self._text.find(needle)
            if at >= 0:
                self._text = self._text[at:]
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)

    def close(self) -> None:
        self._f.close()


def wait_in_place(g, timeout: float = 10.0) -> None:
    """Until the daemon has put the guest's emulator (its main loop) on the emulatorpin CPUs."""
    deadline = time.monotonic() + timeout
    while os.sched_getaffinity(g.pid) != EMULATOR_CPUS:
        if time.monotonic() > deadline:
            raise AssertionError(f"the daemon did not pin {g.name}'s main thread to {EMULATOR_CPUS}")
        time.sleep(0.01)


def scrape_latency_count(d: DaemonProc) -> int | None:
    """vcpud_pin_latency_seconds_count from the daemon's metrics, or None."""
    m = re.search(r"serving metrics on (http://\S+/metrics)", d.log())
    if m is None:
        return None
    text = urllib.request.urlopen(m.group(1), timeout=5).read().decode()
    c = re.search(r"^vcpud_pin_latency_seconds_count(?:\{\})? (\S+)$", text, re.M)
    return int(float(c.group(1))) if c else None


def account(log: str, vm: str, tids: dict[int, str]) -> tuple[dict[int, int], Counter[str]]:
    """What the daemon's log says it did about each created IO thread: (tid -> latency in us of
    those pinned on their event, what happened to the others)."""
    pinned_on_event: dict[int, int] = {}
    pinned_otherwise: set[int] = set()
    in_place: set[int] = set()
    exited: set[int] = set()
    name = re.escape(vm)
    for m in re.finditer(rf"pinned VM {name} tid (\d+) \(iothread [^)]*\) to \S+ by \w+"
                         r"(?: \((\d+) us after the event\))?", log):
        tid = int(m.group(1))
        if m.group(2) is not None:
            pinned_on_event.setdefault(tid, int(m.group(2)))
        else:
            pinned_otherwise.add(tid)
    for m in re.finditer(rf"VM {name} tid (\d+) \(iothread [^)]*\) already on", log):
        in_place.add(int(m.group(1)))
    for m in re.finditer(rf"VM {name} tid (\d+) (?:\([^)]*\) )?exited before", log):
        exited.add(int(m.group(1)))
    others: Counter[str] = Counter()
    for tid in tids:
        if tid in pinned_on_event:
            continue
        if tid in pinned_otherwise:
            others["pinned without an event (rescan or follow-up)"] += 1
        elif tid in in_place:
            others["already in place (nothing to pin)"] += 1
        elif tid in exited:
            others["exited before the daemon pinned it"] += 1
        else:
            others["nothing logged (a lost event?)"] += 1
    return {t: pinned_on_event[t] for t in tids if t in pinned_on_event}, others


def bench_latency(tmp: Path, cfg: Path, n: int, idle: int, settle: float = 0.005, hold: float = 0.2,
                  keep_log: Path | None = None, trace: Path | None = None, metrics: bool = True,
                  crowd: int = 0) -> None:
    print(f"[latency] before: {host_noise()}")
    others = [start_guest(tmp, f"{BENCH}-idle{i}", smp="2") for i in range(idle)]
    # --crowd: more VMs on the host that no policy matches (the daemon still follows and publishes them)
    others += [start_guest(tmp, f"{RUN}crowd{i}", smp="16") for i in range(crowd)]
    # --trace: the daemon's event path timed stage by stage (tests/benchmarks/trace_daemon.py)
    traced = {"env": {"VCPUD_TRACE": str(trace)}, "module": "tests.benchmarks.trace_daemon"} if trace else {}
    # Metrics served, as by default (the server renders each new snapshot in its own thread, holding
    # the GIL): the pins must show in vcpud_pin_latency_seconds too.
    d = DaemonProc(tmp, cfg, "--metrics-listen", "127.0.0.1:0" if metrics else "off", **traced)
    qmp_path = tmp / "qmp.sock"
    name = f"{BENCH}-lat"
    g = start_guest(tmp, name, "-qmp", f"unix:{qmp_path},server=on,wait=off", smp="1")
    qmp = Qmp(qmp_path)
    tids: dict[int, str] = {}  # tid -> the IO thread's id, as query-iothreads reported it
    seen: dict[int, str] = {}  # tid -> what the benchmark saw of it: affinity first, last, and when
    started_in_place = not_pinned = 0
    tail = LogTail(d.log_path)
    try:
        wait_in_place(g)
        time.sleep(1.0)  # the daemon's follow-up looks at the new VM, which would pin a new thread without its event
        print(f"[latency] host before the run: {wait_host_idle()}")
        c0 = cpu_times()
        t0 = time.monotonic()
        for i in range(n):
            qmp.cmd("object-add", **{"qom-type": "iothread", "id": f"b{i}"})
            iothreads = qmp.cmd("query-iothreads")
            assert isinstance(iothreads, list)
            tid = next(int(t["thread-id"]) for t in iothreads if t["id"] == f"b{i}")
            tids[tid] = f"b{i}"
            t1 = time.monotonic()
            first = os.sched_getaffinity(tid)
            started_in_place += first == IOTHREAD_CPUS
            # Keep it until the daemon is done with it (it logs a pin after reading the affinity
            # back), so that none exits first: asleep at first (a poller would compete with the
            # daemon for the 2 CPUs), then reading the daemon's log every 0.5 ms.
            time.sleep(settle)
            if not tail.wait_for(f" tid {tid} (iothread ", hold):
                not_pinned += 1
            seen[tid] = (f"first on {sorted(first)}, on {sorted(os.sched_getaffinity(tid))} "
                         f"{(time.monotonic() - t1) * 1e3:.1f} ms later")
            qmp.cmd("object-del", id=f"b{i}")
        took = time.monotonic() - t0
        during = cpu_use(c0, cpu_times())
        time.sleep(0.2)  # the daemon's last log lines
        in_histogram = scrape_latency_count(d) if metrics else "not served (--no-metrics)"
    finally:
        tail.close()
        qmp.close()
        d.stop()
        g.kill()
        for o in others:
            o.kill()
    log = d.log()
    if keep_log is not None:
        keep_log.write_text(log)
        (keep_log.parent / (keep_log.name + ".tids")).write_text("".join(f"{t} {i}\n" for t, i in tids.items()))
    lat_by_tid, unmeasured = account(log, name, tids)
    overruns = log.count("proc connector overrun")
    print(f"[latency] {n} IO threads created, each kept until the daemon logged it (at most {hold * 1e3:.0f} ms), "
          "then destroyed, "
          f"in {took:.1f}s with {idle} other guests idle{f' and {crowd} unmanaged ones' if crowd else ''}; "
          f"after: {host_noise()}")
    print(f"[latency] host during the run: {during}")
    print(f"[latency] seen by the benchmark: {len(tids)} distinct tids, {started_in_place} already on "
          f"{sorted(IOTHREAD_CPUS)} when it first looked (after query-iothreads), "
          f"{not_pinned} the daemon said nothing about within {hold * 1e3:.0f} ms")
    rest = "; ".join(f"{v} {k}" for k, v in unmeasured.most_common()) or "none"
    for tid in [t for t in tids if t not in lat_by_tid][:5]:
        said = re.findall(rf"^.*\btid {tid} .*$", log, re.M)
        print(f"[latency]   not measured: {tids[tid]} tid {tid}: the benchmark saw it {seen.get(tid)}; "
              f"the daemon said: {said or 'nothing'}")
    print(f"[latency] measured {len(lat_by_tid)} of {len(tids)}; the others: {rest}; {overruns} connector overruns")
    every = len(re.findall(r"us after the event\)", log))
    print(f"[latency] the daemon's vcpud_pin_latency_seconds_count: {in_histogram} "
          f"(event-driven pins it logged with a latency, all VMs: {every})")
    lat = sorted(lat_by_tid.values())
    if lat:
        print(f"[latency] COMM event -> affinity set: n={len(lat)} p50={percentile(lat, 0.5)} us "
              f"p99={percentile(lat, 0.99)} us max={lat[-1]} us; over 1 ms: {sum(x > 1000 for x in lat)}")
    else:
        print("[latency] the daemon reported no latencies:\n" + log[-2000:])
    if trace is not None:
        print_trace(trace, set(lat_by_tid))


def print_trace(path: Path, tids: set[int]) -> None:
    """p50/p99/max of each stage of the event path over the traced pins of ``tids``, in us."""
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    pubs = sorted(r["publish"] / 1e3 for r in lines if "publish" in r)
    if pubs:
        sizes = [(r["vms"], r["threads"]) for r in lines if "publish" in r]
        print(f"[trace] {len(pubs)} publishes (snapshot for the metrics after a turn that changed something) of "
              f"{min(sizes)[0]}-{max(sizes)[0]} VMs, {min(s[1] for s in sizes)}-{max(s[1] for s in sizes)} threads: "
              f"p50 {percentile(pubs, 0.5):.0f} us, p99 {percentile(pubs, 0.99):.0f} us, max {pubs[-1]:.0f} us")
    recs = [r for r in lines if r.get("tid") in tids]
    if not recs:
        print("[trace] nothing traced")
        return
    print(f"[trace] {len(recs)} pins; stage: p50 / p99 / max us (mean us); the slowest 1 % of pins, mean us")
    slow = sorted(recs, key=lambda r: r["latency"])[-max(1, len(recs) // 100):]
    for key in ("latency", "queued", "busy", "busy_publish", "busy_rescan", "read", "before", "thread", "classify",
                "assign", "route", "pin_one", "get1", "check", "setaff", "get2", "log", "other"):
        xs = sorted(r.get(key, 0) / 1e3 for r in recs)
        print(f"[trace]   {key:13} {percentile(xs, 0.5):8.1f} {percentile(xs, 0.99):8.1f} {xs[-1]:8.1f} "
              f"({statistics.fmean(xs):7.1f})   slowest: {statistics.fmean(r.get(key, 0) / 1e3 for r in slow):8.1f}")


def bench_start(tmp: Path, cfg: Path, starts: int) -> None:
    d = DaemonProc(tmp, cfg)
    seen, pinned = [], []
    try:
        for i in range(starts):
            t0 = time.monotonic()
            g = start_guest(tmp, f"{BENCH}-start{i}", smp="4", wait_vcpus=False)
            t_seen = t_pinned = None
            while time.monotonic() - t0 < 5:
                threads = g.threads()
                vcpus = [t for t, c in threads.items() if c.startswith("CPU ")]
                if len(vcpus) == 4:
                    t_seen = t_seen or time.monotonic() - t0
                    try:
                        if all(g.affinity(t) == "1" for t in vcpus):
                            t_pinned = time.monotonic() - t0
                            break
                    except OSError:
                        pass
                time.sleep(0.0002)
            g.kill()
            if t_seen and t_pinned:
                seen.append(t_seen)
                pinned.append(t_pinned)
    finally:
        d.stop()
    print(f"[start] qemu start -> 4 vCPU threads named: median {statistics.median(seen) * 1e3:.1f} ms")
    print(f"[start] qemu start -> 4 vCPUs pinned: median {statistics.median(pinned) * 1e3:.1f} ms, "
          f"max {max(pinned) * 1e3:.1f} ms over {len(pinned)} starts")
    gaps = sorted(p - s for p, s in zip(pinned, seen, strict=True))
    print("[start] last vCPU named -> all pinned (as seen by a 0.2 ms poller): "
          f"median {statistics.median(gaps) * 1e3:.2f} ms")


def bench_idle(tmp: Path, cfg: Path, seconds: float) -> None:
    guests = [start_guest(tmp, f"{BENCH}-quiet{i}", smp="2") for i in range(20)]
    d = DaemonProc(tmp, cfg)
    try:
        time.sleep(2)
        c0, t0 = cpu_seconds(d.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(d.pid), time.monotonic()
        print(f"[idle] 20 guests, {seconds:.0f}s: daemon CPU {c1 - c0:.4f}s = {(c1 - c0) / (t1 - t0) * 100:.3f} % "
              f"of one core; RSS {rss_kib(d.pid) / 1024:.1f} MiB")
    finally:
        d.stop()
        for g in guests:
            g.kill()


def bench_hotplug(tmp: Path, cfg: Path, n: int = 3) -> None:
    d = DaemonProc(tmp, cfg)
    qmp_path = tmp / "qmp-hot.sock"
    g = start_guest(tmp, f"{BENCH}-hot", "-qmp", f"unix:{qmp_path},server=on,wait=off", smp=f"1,maxcpus={n + 1}")
    qmp = Qmp(qmp_path)
    took = []
    try:
        for i in range(n):
            free = [c for c in qmp.cmd("query-hotpluggable-cpus") if "qom-path" not in c]
            slot = sorted(free, key=lambda c: sorted(c["props"].items()))[0]
            before = set(g.threads())
            t0 = time.monotonic()
            qmp.cmd("device_add", driver=slot["type"], id=f"hot{i}", **slot["props"])
            while time.monotonic() - t0 < 10:
                new = [t for t, c in g.threads().items() if t not in before and c.startswith("CPU ")]
                try:
                    if new and g.affinity(new[0]) == "1":
                        took.append(time.monotonic() - t0)
                        break
                except OSError:
                    pass
                time.sleep(0.0002)
    finally:
        qmp.close()
        d.stop()
        g.kill()
    print("[hotplug] device_add -> new vCPU pinned: " + ", ".join(f"{t * 1e3:.1f} ms" for t in took)
          + f" ({len(took)} of {n}; the target is 100 ms)")


def bench_watchdog(tmp: Path, cfg: Path, seconds: float = 3.0) -> None:
    d = DaemonProc(tmp, cfg, env={"WATCHDOG_USEC": "200000"})
    at, seen = [], 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            n = sum(m.get("WATCHDOG") == "1" for m in list(d.notify.messages))
            at += [time.monotonic()] * (n - seen)
            seen = n
            time.sleep(0.001)
    finally:
        d.stop()
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    if gaps:
        print(f"[watchdog] {len(at)} pings in {seconds:.0f}s; gap median {statistics.median(gaps) * 1e3:.0f} ms, "
              f"max {max(gaps) * 1e3:.0f} ms (WATCHDOG_USEC 200 ms: must stay well under 200)")
    else:
        print(f"[watchdog] {len(at)} pings in {seconds:.0f}s")


PARTS = ["latency", "start", "hotplug", "watchdog", "idle"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1000)
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--only", action="append", choices=PARTS,
                    help="run only this part (repeatable); default: all of them")
    ap.add_argument("--keep-log", type=Path, help="latency: keep the daemon's log there (and the tids in FILE.tids)")
    ap.add_argument("--trace", type=Path, help="latency: time the daemon's event path stage by stage into FILE")
    ap.add_argument("--no-metrics", dest="metrics", action="store_false",
                    help="latency: no metrics server in the daemon (the harness default, as this part ran before)")
    ap.add_argument("--crowd", type=int, default=0,
                    help="latency: also start this many idle 16-vCPU guests that no policy matches")
    ap.add_argument("--settle", type=float, default=0.005,
                    help="latency: seconds to sleep after creating an IO thread before polling for its pin")
    args = ap.parse_args()
    parts = args.only or PARTS
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        cfg = tmp / "vcpud.yaml"
        cfg.write_text(CONFIG)
        if "latency" in parts:
            bench_latency(tmp, cfg, args.threads, idle=5, settle=args.settle, keep_log=args.keep_log,
                          trace=args.trace, metrics=args.metrics, crowd=args.crowd)
        if "start" in parts:
            bench_start(tmp, cfg, args.starts)
        if "hotplug" in parts:
            bench_hotplug(tmp, cfg)
        if "watchdog" in parts:
            bench_watchdog(tmp, cfg)
        if "idle" in parts:
            bench_idle(tmp, cfg, args.idle_seconds)


if __name__ == "__main__":
    main()
