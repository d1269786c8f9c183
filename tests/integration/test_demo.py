"""`vcpud demo` as an operator runs it: each step shown and met, nothing it started left running
(after it ends, after SIGINT or SIGTERM midway, after it is SIGKILLed), other VMs untouched, and
neither the service's state file nor its metrics port used.

What a demo started is found by its marker: its guests are named `vcpud-demo-PID-N` and its
directory `/tmp/vcpud-demo-PID-…` is in the command line of each guest and of its daemon. Other
VMs on this host (other test runs, anyone's) never carry it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, skip_or_fail
from tests.qemu import QEMU, RUN, Guest, start_guest

pytestmark = pytest.mark.qemu

SERVICE_STATE = Path("/var/lib/vcpud/state.json")
FINISH_WITHIN = 120.0  # seconds for a whole run at --pace 0 (about 5 here)
STOP_WITHIN = 10.0     # seconds from a stop signal to the demo's exit, its children stopped


def need_host() -> None:
    if os.geteuid() != 0:
        skip_or_fail("the demo needs root")
    if not Path(QEMU).exists():
        skip_or_fail("qemu-system-x86_64 is not installed (apt install qemu-system-x86)")


def marked(marker: str) -> dict[int, str]:
    """pid -> command line of every process whose command line contains ``marker``."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                out[int(entry)] = cmdline
    return out


def running(pid: int, marker: str) -> bool:
    """Whether ``pid`` is still the process the demo started (not a reused pid, not a zombie)."""
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class DemoRun:
    """`vcpud demo` as a subprocess, its output read as it comes."""

    def __init__(self, pace: str = "0", code: str | None = None) -> None:
        argv = ["-c", code] if code else ["-m", "vcpud", "demo", "--pace", pace]
        self.proc = subprocess.Popen([sys.executable, *argv],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.marker = f"vcpud-demo-{self.proc.pid}-"
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(s, buf), daemon=True)
                         for s, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    def _read(self, stream, buf: list[str]) -> None:
        for line in stream:
            with self._cond:
                buf.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "".join(self.out)

    def wait_line(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = re.search(pattern, "".join(self.out), re.M)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._readers[0].is_alive()):
                    raise AssertionError(f"{pattern!r} not in the demo's output:\n{''.join(self.out)}"
                                         f"\nstderr:\n{''.join(self.err)}")
                self._cond.wait(min(left, 0.5))

    def finish(self, timeout: float = FINISH_WITHIN) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=10)
        return rc

    def report(self) -> str:
        return f"exit {self.proc.returncode}\nstdout:\n{''.join(self.out)}\nstderr:\n{''.join(self.err)}"

    def started(self) -> dict[str, int]:
        """What it said it started: guest name or "vcpud run" -> pid."""
        text = self.text()
        found = {name: int(pid) for name, pid in re.findall(r"started guest (\S+) \(pid (\d+)\)", text)}
        daemon = re.search(r"vcpud run \(pid (\d+)\) is ready", text)
        if daemon:
            found["vcpud run"] = int(daemon.group(1))
        return found

    def workdir(self) -> Path:
        return Path(self.wait_line(r"Everything lives in (\S+) and").group(1))


@pytest.fixture
def demos():
    need_host()
    made: list[DemoRun] = []

    def start(pace: str = "0", code: str | None = None) -> DemoRun:
        d = DemoRun(pace, code)
        made.append(d)
        return d

    yield start
    for d in made:  # a test that failed midway: the kernel stops the children of a killed demo
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        deadline = time.monotonic() + STOP_WITHIN
        while marked(d.marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in marked(d.marker):  # the test failed because they outlived it: still, leave nothing behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        m = re.search(r"Everything lives in (\S+) and", d.text())
        if m:
            shutil.rmtree(m.group(1), ignore_errors=True)


@pytest.fixture
def bystanders(tmp_path):
    made: list[Guest] = []

    def start(name: str) -> Guest:
        g = start_guest(tmp_path, name, smp="2")
        made.append(g)
        return g

    yield start
    for g in made:
        g.kill()


def section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


def table_rows(text: str) -> list[str]:
    """The thread rows of `vcpud ps` tables as the demo indents them (3 spaces)."""
    return [ln for ln in text.splitlines() if re.match(r"^    [ !] *\d+  ", ln)]


def test_demo_shows_each_step_and_leaves_nothing_running(demos):
    state_before = SERVICE_STATE.stat() if SERVICE_STATE.exists() else None
    d = demos()
    rc = d.finish()
    out = d.text()
    assert rc == 0, d.report()
    started = d.started()
    assert len(started) == 4, f"three guests and the daemon: {started}"

    assert re.search(r"^host: CPUs \S+ usable here; accelerator (KVM|TCG \(no KVM: .+\))$", out, re.M), out
    workdir = d.workdir()
    assert f"state_file: {workdir}/state.json" in out and 'metrics: {listen: "127.0.0.1:0"}' in out
    before = table_rows(section(out, "== `vcpud ps` before", "== start the daemon"))
    after = table_rows(section(out, "now (this run's guests only)", "== hot-plug"))
    assert len(before) >= 3 * 4 and len(after) == len(before), out
    assert any(r[4] == "!" for r in before), "before the daemon runs, threads are not where the policy wants"
    assert not [r for r in after if r[4] == "!"], "with the daemon running, every thread is"
    assert re.search(r"ready after [\d.]+ s: .*\n   every thread where its policy wants it", out), out

    m = re.search(r"new thread CPU 2 \(tid (\d+)\), born on CPUs (\S+), pinned to CPU (\S+) [\d.]+ ms after "
                  r"device_add", out)
    assert m and m.group(2) != m.group(3), out
    assert re.search(rf"pinned VM {d.marker}1 tid {m.group(1)} \(vcpu 2\) to {m.group(3)} by vcpupin\[2\] "
                     r"\(\d+ us after the event\)", out), "the daemon pinned it, on the event"
    m = re.search(r"\$ taskset -pc (\S+) (\d+)\n.*\n.*new affinity list: (\S+)\n"
                  r"   put back on CPU (\S+) [\d.]+ s later", out)
    assert m and m.group(1) == m.group(3) != m.group(4), out
    assert re.search(rf"VM {d.marker}1 tid {m.group(2)} \(vcpu 0\) had been moved to {m.group(1)}; "
                     rf"put back on {m.group(4)}", out), out

    url = re.search(r"== a few metric lines from http://127\.0\.0\.1:(\d+)/metrics", out)
    assert url and int(url.group(1)) != 9474, "a free loopback port, not the service's"
    metrics = dict(re.findall(r"^   (vcpud_\S+) (\S+)$", out, re.M))
    assert metrics["vcpud_drift_corrections_total"] == "1"
    assert all(metrics[f'vcpud_vms{{policy="{p}"}}'] == "1" for p in ("pinned", "dedicated", "floating")), metrics
    assert float(metrics["vcpud_pin_latency_seconds_count"]) >= 1, "the hot-plugged vCPU, pinned on its event"

    assert f"removed {workdir}; no process mentions it" in out
    assert not workdir.exists()
    assert marked(d.marker) == {}, "the demo waited for everything it started"
    assert not [what for what, pid in started.items() if running(pid, d.marker)]
    state_after = SERVICE_STATE.stat() if SERVICE_STATE.exists() else None
    assert (state_before is None) == (state_after is None), "the service's state file is not the demo's"
    if state_before is not None and state_after is not None:
        assert (state_before.st_ino, state_before.st_mtime_ns) == (state_after.st_ino, state_after.st_mtime_ns)
    print(out)


# The demo as `vcpud demo --pace 0` runs it, on a host where /dev/kvm cannot be used.
WITHOUT_KVM = """\
import sys
from vcpud import demo
demo.kvm_unusable = lambda: "switched off by the test"
sys.exit(demo.main(0))
"""


def test_without_kvm_the_guests_run_on_tcg_and_it_says_so(demos):
    d = demos(code=WITHOUT_KVM)
    rc = d.finish()
    out = d.text()
    assert rc == 0, d.report()
    assert "accelerator TCG (no KVM: switched off by the test)" in out
    assert " -accel tcg,thread=multi " in out and "-accel kvm" not in out
    assert re.search(r"vcpu 0 .* CPU 0/TCG$", out, re.M), "the guests' vCPU threads are TCG's"
    assert re.search(r"new thread CPU 2 \(tid \d+\), born on CPUs \S+, pinned to CPU", out)
    assert re.search(r"put back on CPU \S+ [\d.]+ s later", out)
    assert marked(d.marker) == {}


@pytest.mark.parametrize("sig, when", [
    (signal.SIGINT, r"started guest vcpud-demo-\d+-3 "),   # guests up, no daemon yet
    (signal.SIGINT, r"vcpud run \(pid \d+\) is ready"),     # guests and daemon up
    (signal.SIGTERM, r"vcpud run \(pid \d+\) is ready"),
], ids=["SIGINT-guests-up", "SIGINT-daemon-up", "SIGTERM-daemon-up"])
def test_a_stop_signal_midway_stops_everything_promptly(demos, sig, when):
    d = demos(pace="1")
    d.wait_line(when)
    up = marked(d.marker)
    assert len(up) >= 3, f"the guests are up: {up}"
    started = d.started()
    t0 = time.monotonic()
    d.proc.send_signal(sig)
    rc = d.finish(timeout=STOP_WITHIN)
    took = time.monotonic() - t0
    assert rc == 128 + sig, d.report()
    out = d.text()
    assert f"{sig.name}: stopping what the demo started" in out
    assert "no process mentions it" in out, d.report()
    assert marked(d.marker) == {}, "everything it started is gone when it exits"
    assert not [what for what, pid in started.items() if running(pid, d.marker)]
    assert not d.workdir().exists()
    print(f"{sig.name}: the demo and its {len(up)} processes gone {took:.2f} s after the signal")


def test_a_killed_demo_takes_its_guests_and_daemon_along(demos):
    d = demos(pace="1")
    d.wait_line(r"vcpud run \(pid \d+\) is ready")
    up = marked(d.marker)
    assert len(up) == 4, up
    d.proc.kill()  # no finally, no handler: only PR_SET_PDEATHSIG can stop them
    d.finish(timeout=STOP_WITHIN)
    t0 = time.monotonic()
    while marked(d.marker):
        assert time.monotonic() - t0 < STOP_WITHIN, f"left running after the demo was killed: {marked(d.marker)}"
        time.sleep(0.02)
    print(f"all {len(up)} gone {time.monotonic() - t0:.2f} s after SIGKILL")


def test_other_guests_keep_their_threads_where_they_are(demos, bystanders):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        skip_or_fail("needs two CPUs to tell a moved thread from one left alone")
    d = demos(pace="1")
    # One guest no demo policy names; one named as this demo's second guest, started outside its
    # directory: a look-alike the demo's policy must not take for its own.
    others = [bystanders(f"{RUN}bystander"), bystanders(f"{d.marker}2")]
    for g in others:
        for tid, comm in g.threads().items():  # affinities no demo policy would give
            mask = {"CPU 0/KVM": {cpus[-1]}, "CPU 0/TCG": {cpus[-1]}, "CPU 1/KVM": {cpus[0]},
                    "CPU 1/TCG": {cpus[0]}}.get(comm, set(cpus))
            os.sched_setaffinity(tid, mask)
    before = {g.name: {tid: g.affinity(tid) for tid in g.threads()} for g in others}

    # The drift is put back at a rescan: the daemon has passed over every process by then.
    d.wait_line(r"put back on CPU \S+ [\d.]+ s later")
    during = {g.name: {tid: g.affinity(tid) for tid in g.threads()} for g in others}
    assert during == before
    assert d.finish() == 0, d.report()
    assert all(g.proc.poll() is None for g in others), "the bystanders still run"
    assert {g.name: {tid: g.affinity(tid) for tid in g.threads()} for g in others} == before
