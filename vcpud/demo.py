"""`vcpud demo`: the main job in about 30 s on three tiny guests of its own, and what it shows.

Starts the guests and `vcpud run` on an example policy that matches only them, shows `vcpud ps`
before and after, a vCPU hot-plugged and pinned, a `taskset` drift put back and a few metric
lines, then stops everything it started (on success, failure, Ctrl-C, SIGTERM; the kernel stops
the rest if the demo is killed: demoprocs). Every step waits on a condition with a timeout; the
pauses between steps (--pace) are for the reader only.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, TypeVar

from .cpuset import CpuSet
from .demoprocs import (STOP_SIGNALS, Child, Children, affinity, guest_argv, has_vcpus, kvm_unusable,
                        other_daemons, processes_mentioning, threads_named)
from .qmp import Qmp, QmpError
from .sdnotify import NotifyListener

if TYPE_CHECKING:
    from .config import Config
    from .placement import VMPlan
    from .topology import Topology

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
QEMUS = ("/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm", "/usr/bin/kvm")  # all in the default executables
RESCAN = "1s"      # the demo's rescan_interval: drift is put back within a second (the service: 10s)
PINNED_VCPUS, PINNED_MAXCPUS = 2, 3  # the pinned guest gets vCPU 2 hot-plugged
HOTPLUGGED = PINNED_MAXCPUS - 1
STEP_TIMEOUT = 15.0  # seconds for any one condition; all of them are met in well under one here
MAX_PACE = 60.0
T = TypeVar("T")


class Role(str, enum.Enum):
    """The demo's guests, each showing one kind of policy (the value is the policy's name)."""

    PINNED = "pinned"          # one fixed host CPU per vCPU (vcpupin)
    DEDICATED = "dedicated"    # CPUs of its own from an exclusive pool
    FLOATING = "floating"      # vCPUs float over a set of CPUs

    def __str__(self) -> str:
        return self.value

    @property
    def number(self) -> int:
        return list(Role).index(self) + 1


@dataclass(frozen=True)
class Layout:
    """Which of the CPUs the demo may use each policy gets; CPU ``housekeeping`` takes the
    emulator threads, like CPU 0 on most hosts."""

    housekeeping: int
    fixed: tuple[int, ...]   # vcpupin of the pinned guest: vCPU i -> fixed[i]
    floating: CpuSet
    pool: CpuSet             # the exclusive pool; empty when there is only one CPU

    @property
    def dedicated_vcpus(self) -> int:
        return max(1, min(2, len(self.pool)))

    @property
    def pin_emulator(self) -> bool:
        """Whether the pinned guest's emulator threads go to the housekeeping CPU too. Not when
        its vCPUs share that CPU (two CPUs or one): a thread is born with the affinity of the
        thread that creates it (QEMU's main thread for a hot-plugged vCPU), so the new vCPU
        would be born where its policy wants it and the demo could not show it being pinned."""
        return self.housekeeping not in self.fixed


def layout(cpus: CpuSet) -> Layout:
    """The first CPU for housekeeping, the upper half an exclusive pool, the rest (or, on two
    CPUs, the housekeeping CPU) for fixed pins and floating vCPUs. On one CPU, no pool."""
    c = sorted(cpus)
    if not c:
        raise ValueError("no CPU to use")
    split = max(1, (len(c) + 1) // 2)
    rest = c[1:split] or c[:1]
    return Layout(housekeeping=c[0], fixed=tuple(rest[i % len(rest)] for i in range(PINNED_MAXCPUS)),
                  floating=CpuSet.of(rest), pool=CpuSet.of(c[split:]))


def guest_smp(role: Role, lay: Layout) -> str:
    """The guest's -smp: the pinned one has room for a hot-plugged vCPU; the dedicated one as
    many vCPUs as its pool has CPUs, up to 2."""
    if role is Role.PINNED:
        return f"{PINNED_VCPUS},maxcpus={PINNED_MAXCPUS}"
    return str(lay.dedicated_vcpus) if role is Role.DEDICATED else "2"


def usable_cpus(topo: Topology) -> CpuSet:
    """The online CPUs the demo's own affinity allows (a cpuset may restrict it), without the
    isolated ones unless nothing else is left."""
    mine = topo.online & CpuSet.of_kernel(os.sched_getaffinity(0))
    return (mine - topo.isolated) or mine


@dataclass(frozen=True)
class Run:
    """This run of the demo: its pid makes the guests' names unique, its directory (mkdtemp)
    holds the config, state file, sockets and logs and appears in every guest's command line."""

    pid: int
    workdir: Path

    def name(self, role: Role) -> str:
        return f"vcpud-demo-{self.pid}-{role.number}"

    @property
    def marker(self) -> str:
        """A regex for `match: {cmdline}`: this run's directory ('-' needs no escape outside [])."""
        return re.escape(f"{self.workdir}/").replace("\\-", "-")


def config_text(run: Run, lay: Layout) -> str:
    """The demo's policy: only this run's guests (name and directory), its own state file and a
    free loopback port, never the service's."""
    hk = f'"{lay.housekeeping}"'
    emulatorpin = f"    emulatorpin: {hk}\n"

    def policy(role: Role, comment: str, rules: str) -> str:
        head = f"  - name: {role}"
        return (f"{head:<34}# {comment}\n"
                f'    match: {{name: "{run.name(role)}", cmdline: *this_run}}\n{rules}')

    pin = ", ".join(f'{i}: "{cpu}"' for i, cpu in enumerate(lay.fixed))
    if lay.pin_emulator:
        pinned = f"    vcpupin: {{{pin}}}\n    emulatorpin: {hk:<20}# QEMU's own threads elsewhere\n"
    else:
        pinned = (f"    vcpupin: {{{pin}}}\n"
                  f"    # no emulatorpin: it would be CPU {lay.housekeeping}, the vCPUs' CPU, and a vCPU hot-plugged\n"
                  "    # later would be born pinned (a new thread starts with the CPUs of the thread that\n"
                  "    # makes it, QEMU's main thread)\n")
    if lay.pool:
        pools = f'pools:\n  dedicated: {{cpus: "{lay.pool.format()}", exclusive: true}}   # a CPU to one VM at most\n'
        dedicated = "    vcpus: {pool: dedicated}\n"
    else:
        pools = "# one CPU: no room for an exclusive pool\n"
        dedicated = f'    vcpus: "{lay.floating.format()}"\n'
    return (
        f"# vcpud demo {run.pid}: only this run's guests (their name, and this directory in their command line)\n"
        f"state_file: {run.workdir}/state.json   # not the service's /var/lib/vcpud\n"
        'metrics: {listen: "127.0.0.1:0"}   # a free loopback port, not 9474\n'
        f"rescan_interval: {RESCAN}   # the service's default is 10s\n"
        f"{pools}"
        f"x-this-run: &this_run '{run.marker}'\n"
        "policies:\n"
        + policy(Role.PINNED, "a host CPU per vCPU, like virsh vcpupin", pinned)
        + policy(Role.DEDICATED, "CPUs of its own, chosen by vcpud", dedicated + emulatorpin)
        + policy(Role.FLOATING, "vCPUs float over a set of CPUs", f'    vcpus: "{lay.floating.format()}"\n'
                 + emulatorpin)
    )


class StepFailed(Exception):
    """A step's condition was not met in time; the message says which and what was seen."""


class Stopped(BaseException):
    """A stop signal arrived (not an Exception: no step's error handling may swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_stop_signal(signum: int, frame: object) -> None:
    # Only the first stop signal interrupts; a second one (an impatient Ctrl-C) must not break
    # the cleanup that the first one started.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = STEP_TIMEOUT,
             alive: Callable[[], str | None] = lambda: None, interval: float = 0.002) -> tuple[T, float]:
    """Poll ``probe`` until it returns something; that and the seconds it took. StepFailed after
    ``timeout``, or as soon as ``alive()`` names a process that died."""
    t0 = time.monotonic()
    while True:
        got = probe()
        if got is not None:
            return got, time.monotonic() - t0
        dead = alive()
        if dead:
            raise StepFailed(f"{what}: {dead}")
        if time.monotonic() - t0 > timeout:
            raise StepFailed(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def off_policy(plans: list[VMPlan], expected: int) -> str | None:
    """Why the guests are not all where their policies want them (None: they are)."""
    if len(plans) != expected:
        return f"{len(plans)} of {expected} guests found"
    for vp in plans:
        if vp.policy is None or vp.waiting:
            return f"{vp.vm.display_name}: {vp.status} {vp.reason}".rstrip()
        for t in vp.vm.threads:
            a = vp.wanted(t.tid)
            if a is not None and a.cpus != t.affinity:
                return f"{vp.vm.display_name} {t.label} (tid {t.tid}) on {t.affinity.format()}, wanted {a.cpus}"
    return None


def plans_of(config: Config, topo: Topology, pids: list[int]) -> list[VMPlan]:
    """What `vcpud ps` shows for these processes (the demo's guests only: the host may run others)."""
    from .discovery import scan
    from .holdings import FileStore, load_priors
    from .placement import arrival_order, plan
    from .procfs import Procfs

    vms = arrival_order(scan(Procfs(), config.executables, pids=pids).vms)
    priors = load_priors(config, FileStore(config.state_file), vms, topo.online, topo)
    return list(plan(config, vms, topo.online, topo, priors).vms)


def last_line(path: Path, pattern: str) -> str | None:
    """The last line of the file at ``path`` matching regex ``pattern``."""
    found = [ln for ln in path.read_text(errors="replace").splitlines() if re.search(pattern, ln)]
    return found[-1] if found else None


def write_private(path: Path, text: str) -> None:
    """A new file only root reads, whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def find_qemu() -> str | None:
    return next((q for q in QEMUS if os.access(q, os.X_OK)), None)


def metric_lines(text: str) -> dict[str, float]:
    """The samples of a Prometheus text page: series -> value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            try:
                out[series] = float(value)
            except ValueError:
                pass
    return out


# Metric series the demo shows, as regexes over the series (names and labels).
SHOWN_METRICS = (r"vcpud_vms\{policy=", r"vcpud_vms_by_status\{status=\"(pinned|placed)\"",
                 r"vcpud_threads\{role=\"vcpu\",state=\"pinned\"", r"vcpud_pool_cpus\{",
                 r"vcpud_pin_operations_total\{result=\"pinned\"", r"vcpud_drift_corrections_total$",
                 r"vcpud_pin_latency_seconds_count$")


class Demo:
    """The steps, in order, and the cleanup that follows whatever happened."""

    def __init__(self, pace: float, out: IO[str] | None = None) -> None:
        self.pace = pace
        self.out = out or sys.stdout
        self.children = Children()
        self.run: Run | None = None
        self.guests: dict[Role, Child] = {}
        self.daemon: Child | None = None
        self.daemon_log: Path | None = None
        self.notify: NotifyListener | None = None
        self.qmp: Qmp | None = None
        self.kvm = True
        self.cpus = CpuSet()      # what the demo may use
        self.drifted = False      # the drift step moved a thread (not on a one-CPU host)

    # --- output -------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except (OSError, ValueError):
            pass  # the terminal went away (SIGHUP) or the reader closed the pipe: the cleanup goes on

    def step(self, title: str) -> None:
        if self.pace:
            time.sleep(self.pace)  # for the reader only: every result is waited on by a condition
        self.say(f"\n== {title}")

    def indented(self, text: str) -> None:
        for line in text.rstrip("\n").split("\n"):
            self.say("   " + line if line else "")

    def daemon_says(self, pattern: str) -> str | None:
        """The daemon's last log line matching ``pattern``."""
        return last_line(self.daemon_log, pattern) if self.daemon_log is not None else None

    def alive(self) -> str | None:
        """What died of what the demo started, with the end of its output (None: all alive)."""
        for child in [*self.guests.values(), *([self.daemon] if self.daemon else [])]:
            if child.proc.poll() is not None:
                last = child.log.read_text(errors="replace").strip().splitlines()[-3:] if child.log.exists() else []
                return (f"{child.what} (pid {child.pid}) exited with status {child.proc.returncode}"
                        + "".join(f"\n  {line}" for line in last))
        return None

    # --- the whole run ------------------------------------------------------------------
    def main(self) -> int:
        previous = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
        code = EXIT_FAILED
        try:
            try:
                self.show()
                code = EXIT_OK
            except Stopped as e:
                code = 128 + e.signum
                self.say(f"\n{signal.Signals(e.signum).name}: stopping what the demo started")
            except StepFailed as e:
                print(f"vcpud demo: FAILED: {e}", file=sys.stderr)
                self.tail_daemon_log()
            except (OSError, QmpError, subprocess.SubprocessError) as e:
                print(f"vcpud demo: FAILED: {e}", file=sys.stderr)
                self.tail_daemon_log()
        finally:
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
            self.cleanup()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if code == EXIT_OK:
            self.say("\ndemo done. Next: `vcpud ps` lists this host's VMs; config/vcpud.yaml is a commented example "
                     "policy; README.md tells how to run `vcpud run` as a service.")
        return code

    def tail_daemon_log(self, lines: int = 15) -> None:
        if self.daemon_log is not None and self.daemon_log.exists():
            text = self.daemon_log.read_text(errors="replace").splitlines()[-lines:]
            print("the daemon's last log lines:\n  " + "\n  ".join(text), file=sys.stderr)

    def cleanup(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        stopped = self.children.stop_all()
        if self.notify is not None:
            self.notify.close()
        if self.run is not None:
            shutil.rmtree(self.run.workdir, ignore_errors=True)
        if stopped:
            self.say("\n== cleanup")
            for c in reversed(stopped):  # in the order stop_all() stopped them
                self.say(f"   stopped {c.what} (pid {c.pid})")
        if self.run is not None:
            left = processes_mentioning(str(self.run.workdir))
            self.say(f"   removed {self.run.workdir}; "
                     + ("no process mentions it" if not left else f"STILL RUNNING: pids {left}"))

    def show(self) -> None:
        from .config import load_config
        from .topology import read_topology

        qemu = find_qemu()
        if qemu is None:
            raise StepFailed(f"no QEMU found at {', '.join(QEMUS)}: install qemu-system-x86 "
                             "(bash contrib/setup-dev.sh does)")
        topo = read_topology(Path("/"))
        self.cpus = usable_cpus(topo)
        lay = layout(self.cpus)
        why_not_kvm = kvm_unusable()
        self.kvm = why_not_kvm is None
        self.run = Run(os.getpid(), Path(tempfile.mkdtemp(prefix=f"vcpud-demo-{os.getpid()}-")))
        self.say("vcpud demo: three tiny guests of its own, an example policy, and `vcpud run` pinning them.")
        self.say(f"Everything lives in {self.run.workdir} and is stopped at the end, also on Ctrl-C.")
        accel = "KVM" if self.kvm else f"TCG (no KVM: {why_not_kvm})"
        self.say(f"host: CPUs {self.cpus.format()} usable here; accelerator {accel}")
        others = other_daemons()
        if others:
            self.say(f"note: another `vcpud run` runs here (pid {', '.join(map(str, others))}); the demo's guests "
                     "are its own unless that one's policies match every VM")
        cfg_path, text = self.run.workdir / "vcpud.yaml", config_text(self.run, lay)
        write_private(cfg_path, text)
        config = load_config(cfg_path, online=topo.online)

        self.step(f"the policy ({cfg_path})")
        self.indented(text)
        self.start_guests(qemu, lay)
        self.step("`vcpud ps` before the daemon runs: threads float over every CPU ('!': not where the policy wants)")
        self.show_ps(config, topo)
        ready = self.start_daemon()
        _, took = wait_for("every thread where its policy wants it",
                           lambda: None if off_policy(self.plans(config, topo), len(self.guests)) else True,
                           alive=self.alive)
        self.say(f"   ready after {ready:.2f} s: it pins the VMs it finds before it says READY=1")
        self.say(f"   every thread where its policy wants it, seen from here {took * 1000:.0f} ms later")
        self.step(f"`vcpud ps --config {cfg_path}` now (this run's guests only)")
        self.show_ps(config, topo)
        self.say("   (PSR: the CPU a thread last ran on; one that has not run since it was pinned shows the old one)")
        self.hotplug(lay)
        self.drift(lay)
        self.metrics()

    # --- steps --------------------------------------------------------------------------
    def start_guests(self, qemu: str, lay: Layout) -> None:
        assert self.run is not None
        run = self.run
        self.step("three guests, paused before their first instruction (-S): 64 MiB, no disk, no devices")
        smp = {role: guest_smp(role, lay) for role in Role}
        for role, s in smp.items():
            argv = guest_argv(qemu, run.name(role), s, self.kvm,
                              ["-qmp", f"unix:{run.workdir}/qmp-{role}.sock,server=on,wait=off"])
            if role is Role.PINNED:
                self.say(f"   $ {shlex.join(argv)}")
            child = self.children.start(f"guest {run.name(role)}", argv, run.workdir / f"qemu-{role}.log",
                                        signal.SIGKILL)
            self.guests[role] = child
            self.say(f"   started guest {run.name(role)} (pid {child.pid}): -smp {s}")
        for role, s in smp.items():
            n, pid = int(s.split(",")[0]), self.guests[role].pid
            wait_for(f"the vCPU threads of {run.name(role)}", functools.partial(has_vcpus, pid, n), alive=self.alive)

    def plans(self, config: Config, topo: Topology) -> list[VMPlan]:
        return plans_of(config, topo, [g.pid for g in self.guests.values()])

    def show_ps(self, config: Config, topo: Topology) -> None:
        from .cli import ps_table

        self.indented(ps_table(self.plans(config, topo)))

    def start_daemon(self) -> float:
        """`vcpud run` on the demo's config; seconds until it said READY=1."""
        assert self.run is not None
        cfg = self.run.workdir / "vcpud.yaml"
        self.notify = NotifyListener(self.run.workdir / "notify.sock")
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        self.daemon_log = self.run.workdir / "vcpud.log"
        argv = [sys.executable, "-m", "vcpud", "run", "--config", str(cfg), "--log-level", "info"]
        self.step(f"start the daemon: vcpud run --config {cfg}")
        # SIGTERM if the demo dies: the daemon stops within a second, leaving the pins
        self.daemon = self.children.start("vcpud run", argv, self.daemon_log, signal.SIGTERM, env=env)
        t0 = time.monotonic()
        if self.notify.wait_for(lambda m: m.get("READY") == "1", STEP_TIMEOUT,
                                alive=lambda: self.daemon is not None and self.daemon.proc.poll() is None) is None:
            raise StepFailed(f"vcpud run (pid {self.daemon.pid}) did not get ready: "
                             f"{self.alive() or f'not within {STEP_TIMEOUT:.0f} s'}")
        took = time.monotonic() - t0
        self.say(f"   vcpud run (pid {self.daemon.pid}) is ready; it tells systemd: STATUS={self.notify.status}")
        return took

    def hotplug(self, lay: Layout) -> None:
        assert self.run is not None
        role = Role.PINNED
        name, pid = self.run.name(role), self.guests[role].pid
        want = CpuSet.of([lay.fixed[HOTPLUGGED]])
        self.step(f"hot-plug vCPU {HOTPLUGGED} into {name} through QMP (device_add): "
                  f"policy {role} wants it on CPU {want}")
        self.qmp = Qmp(self.run.workdir / f"qmp-{role}.sock")
        free = [c for c in self.qmp.cmd("query-hotpluggable-cpus") if "qom-path" not in c]
        if not free:
            raise StepFailed(f"{name} has no free vCPU slot (query-hotpluggable-cpus)")
        slot = sorted(free, key=lambda c: sorted(c["props"].items()))[0]
        born = affinity(pid)  # QEMU's main thread creates the vCPU thread: it starts with these CPUs
        t0 = time.monotonic()
        self.qmp.cmd("device_add", driver=slot["type"], id=f"cpu{HOTPLUGGED}", **slot["props"])

        def pinned() -> int | None:
            tid = next((t for c, t in threads_named(pid).items() if c.startswith(f"CPU {HOTPLUGGED}/")), None)
            return tid if tid is not None and affinity(tid) == want else None

        tid, _ = wait_for(f"hot-plugged vCPU {HOTPLUGGED} of {name} pinned to CPU {want}", pinned, alive=self.alive)
        took = time.monotonic() - t0
        if born == want:
            self.say(f"   new thread CPU {HOTPLUGGED} (tid {tid}) was born on CPU {want}, the CPUs of QEMU's "
                     "main thread: nothing to pin")
            return
        self.say(f"   new thread CPU {HOTPLUGGED} (tid {tid}), born on CPUs {born.format() if born else '?'}, "
                 f"pinned to CPU {want} {took * 1000:.1f} ms after device_add was sent (seen from here)")
        said = self.daemon_says(rf"pinned VM {re.escape(name)}\b.*\btid {tid} \(")
        if said:
            self.say(f"   {said}")

    def drift(self, lay: Layout) -> None:
        assert self.run is not None
        name, pid = self.run.name(Role.PINNED), self.guests[Role.PINNED].pid
        want = CpuSet.of([lay.fixed[0]])
        elsewhere = self.cpus - want
        tid = threads_named(pid).get("CPU 0/KVM") or threads_named(pid).get("CPU 0/TCG")
        if tid is None:
            raise StepFailed(f"no vCPU 0 thread in {name}")
        self.step(f"drift: someone moves vCPU 0 of {name} (tid {tid}) with taskset")
        if not elsewhere:
            self.say("   one CPU only: nowhere to move it (skipped)")
            return
        taskset = shutil.which("taskset")
        if taskset is None:
            raise StepFailed("taskset not found (Debian package util-linux)")
        cmd = [taskset, "-pc", elsewhere.format(), str(tid)]
        self.say(f"   $ taskset -pc {elsewhere.format()} {tid}")
        t0 = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False)
        self.indented(done.stdout + done.stderr)
        if done.returncode != 0:
            raise StepFailed(f"taskset exited {done.returncode}")
        wait_for(f"vCPU 0 of {name} put back on CPU {want}", lambda: True if affinity(tid) == want else None,
                 alive=self.alive)
        took = time.monotonic() - t0
        self.drifted = True
        self.say(f"   put back on CPU {want} {took:.2f} s later, at the daemon's next rescan "
                 f"(rescan_interval {RESCAN})")
        said = self.daemon_says(rf"VM {re.escape(name)} tid {tid}\b.*put back")
        if said:
            self.say(f"   {said}")

    def metrics(self) -> None:
        line = self.daemon_says(r"serving metrics on http://")
        m = re.search(r"(http://\S+/metrics)", line or "")
        if m is None:
            raise StepFailed("the daemon does not say where it serves metrics")
        url = m.group(1)
        self.step(f"a few metric lines from {url}")

        def scrape() -> str | None:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
            # the daemon publishes a snapshot at most every 20 ms after a change
            counted = metric_lines(text).get("vcpud_drift_corrections_total", 0) >= 1
            return text if counted or not self.drifted else None

        text, _ = wait_for("a scrape counting the drift (vcpud_drift_corrections_total)", scrape,
                           alive=self.alive, interval=0.05)
        for series, value in metric_lines(text).items():
            if any(re.match(p, series) for p in SHOWN_METRICS):
                self.say(f"   {series} {value:g}")


def main(pace: float) -> int:
    if not 0 <= pace <= MAX_PACE:
        print(f"vcpud demo: --pace {pace:g}: expected seconds from 0 to {MAX_PACE:g}", file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() != 0:
        print("vcpud demo: must run as root: it pins the threads of the guests it starts and listens to the "
              "kernel's proc connector (try: sudo .venv/bin/vcpud demo)", file=sys.stderr)
        return EXIT_FAILED
    return Demo(pace).main()
