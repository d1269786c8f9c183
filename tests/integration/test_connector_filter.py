"""ProcConnector.watch() on the real kernel: what a watched connector receives while another
process forks, execs and renames itself; an overrun still comes through; the event-type filter of
older kernels (which ignore the mask) is done by the BPF program.

Never "wait, then check nothing came": every test ends its reading on a positive marker, an event
that the kernel generated after everything the test expects to be dropped.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.unit.test_procconn import collect, of, open_connector, overflow_then_rename
from vcpud.procconn import ProcConnector, ProcEvent, parse

DAEMON_KINDS = {"fork", "exec", "comm", "exit"}
STORM = 300  # forks of the unwatched process

# The watched process: on each line read, a thread named as the line says is started and
# joined; its tid is printed. Nothing else happens in it.
WATCHED = r"""
import ctypes, sys, threading
libc = ctypes.CDLL(None)
print("ready", flush=True)
for line in sys.stdin:
    t = threading.Thread(target=lambda: libc.prctl(15, line.strip().encode(), 0, 0, 0))
    t.start()
    t.join()
    print(t.native_id, flush=True)
"""

# The unwatched one: on "go", forks STORM children that exit at once, three that exec true(1),
# renames itself "foo-renamed" and starts a thread it names "CPU 5/KVM"; then prints the
# children's pids and that thread's tid, having reaped every child.
UNWATCHED = r"""
import ctypes, os, sys, threading
libc = ctypes.CDLL(None)
print("ready", flush=True)
sys.stdin.readline()
kids = []
for i in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    kids.append(pid)
    os.waitpid(pid, 0)
execd = []
for i in range(3):
    pid = os.fork()
    if pid == 0:
        os.execv("/bin/true", ["true"])
    execd.append(pid)
    os.waitpid(pid, 0)
libc.prctl(15, b"foo-renamed", 0, 0, 0)
t = threading.Thread(target=lambda: libc.prctl(15, b"CPU 5/KVM", 0, 0, 0))
t.start()
t.join()
print(" ".join(map(str, kids)), "|", " ".join(map(str, execd)), "|", t.native_id, flush=True)
sys.stdin.readline()
"""


class Child:
    def __init__(self, script: str, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        self.pid = self.p.pid
        assert self.line() == "ready"

    def line(self) -> str:
        assert self.p.stdout is not None
        out = self.p.stdout.readline().strip()
        assert out, "the child died"
        return out

    def say(self, text: str) -> str:
        assert self.p.stdin is not None
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()
        return self.line()

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


@pytest.fixture
def children():
    made: list[Child] = []

    def start(script: str, *args: str) -> Child:
        made.append(Child(script, *args))
        return made[-1]

    yield start
    for c in made:
        c.close()


def until_named(tgid: int, name: str):
    return lambda evs: any(ev.what == "comm" and ev.tgid == tgid and ev.comm == name for ev in evs)


def test_watched_events_arrive_and_an_unwatched_storm_does_not(children):
    watched, storm = children(WATCHED), children(UNWATCHED, str(STORM))
    with open_connector(events=DAEMON_KINDS) as filtered, open_connector(events=DAEMON_KINDS) as control:
        filtered.watch({watched.pid})
        worker = int(watched.say("worker-a"))
        kids_s, execd_s, cpu5_s = storm.say("go").split("|")
        kids, execd, cpu5 = set(map(int, kids_s.split())), set(map(int, execd_s.split())), int(cpu5_s)
        # Kernel quirk: a task's EXIT event is sent after its parent (waitpid) or joiner is woken,
        # so the storm's replies do not prove its events were sent. The control socket (no
        # filter) seeing them all does: the kernel gives each event to every socket at once.
        everything = collect(control, lambda evs: {ev.pid for ev in evs if ev.what == "exit"}
                             >= kids | execd | {cpu5, worker}, timeout=30)
        marker = int(watched.say("marker"))  # after all of it: its COMM ends the filtered reading
        got = collect(filtered, until_named(watched.pid, "marker"), timeout=10)

    # the watched process: everything about its threads
    mine = [(ev.what, ev.pid, ev.comm) for ev in got if ev.tgid == watched.pid]
    threads = [e for e in mine if e[1] in (worker, marker)]
    assert ("exit", worker, None) in threads
    assert [e for e in threads if e[0] != "exit"] == [("fork", worker, None), ("comm", worker, "worker-a"),
                                                       ("fork", marker, None), ("comm", marker, "marker")]

    # the unwatched one: its children's execs, its thread's "CPU " name, and nothing else
    def about_storm(evs: list[ProcEvent]) -> list[ProcEvent]:
        return [ev for ev in evs if ev.tgid in kids | execd | {storm.pid}]

    seen = about_storm(got)
    assert {ev.pid for ev in seen if ev.what == "exec"} == execd
    assert [ev for ev in seen if ev.what != "exec"] == [ev for ev in seen if ev.what == "comm" and ev.pid == cpu5]
    assert [ev.comm for ev in seen if ev.what == "comm"] == ["CPU 5/KVM"]

    # what the kernel dropped for the filtered socket: the same socket without a filter got it all
    unfiltered = about_storm(everything)
    forks = {ev.pid for ev in unfiltered if ev.what == "fork"}
    exits = {ev.pid for ev in unfiltered if ev.what == "exit"}
    assert forks == exits == kids | execd | {cpu5} and len(kids) == STORM
    assert "foo-renamed" in [ev.comm for ev in unfiltered if ev.what == "comm"]
    print(f"\nstorm of {STORM} forks: {len(unfiltered)} events about it without the filter, {len(seen)} with; "
          f"{len(everything)} / {len(got)} events in all")


def test_watch_can_change_and_none_passes_everything(children):
    a, b = children(WATCHED), children(WATCHED)
    with open_connector(events=DAEMON_KINDS) as pc:
        pc.watch({a.pid})
        dropped = int(b.say("b-early"))
        a.say("a-1")
        pc.watch({b.pid})
        kept = int(b.say("b-late"))
        a_dropped = int(a.say("a-2"))
        pc.watch(None)
        a_again = int(a.say("a-3"))
        # b-late's EXIT may trail a-3 (a thread's EXIT is sent after its joiner wakes); it passes all the same
        named_a3 = until_named(a.pid, "a-3")
        events = collect(pc, lambda evs: named_a3(evs) and bool(of(evs, "exit", kept)), timeout=10)
    named = [(ev.tgid, ev.comm) for ev in events if ev.what == "comm" and ev.tgid in (a.pid, b.pid)]
    assert named == [(a.pid, "a-1"), (b.pid, "b-late"), (a.pid, "a-3")]
    assert not of(events, "fork", dropped) and not of(events, "fork", a_dropped)
    assert of(events, "fork", kept) and of(events, "exit", kept) and of(events, "fork", a_again)


def test_too_many_tgids_pass_everything_and_say_so_once(children, caplog):
    a = children(WATCHED)
    many = set(range(10**6, 10**6 + 5000))
    with open_connector(events=DAEMON_KINDS) as pc, caplog.at_level("WARNING", logger="vcpud.procconn"):
        pc.watch(many)
        pc.watch(many | {1})
        tid = int(a.say("over"))
        events = collect(pc, until_named(a.pid, "over"), timeout=10)
    assert of(events, "fork", tid), "every fork passes"
    said = [r.getMessage() for r in caplog.records if "every fork, comm and exit passes" in r.getMessage()]
    assert len(said) == 1 and "5000 processes" in said[0], said


def test_a_refused_program_leaves_no_filter(children, monkeypatch, caplog):
    from vcpud import procfilter
    from vcpud.procfilter import JA, RET, Insn

    a = children(WATCHED)
    with open_connector(events=DAEMON_KINDS) as pc:
        pc.watch({1})  # a filter that drops a's events...
        monkeypatch.setattr(procfilter, "build", lambda *args, **kw: [Insn(JA, 0, 0, 9), Insn(RET, 0, 0, 0)])
        with caplog.at_level("WARNING", logger="vcpud.procconn"):
            pc.watch({2})  # ...and one the kernel refuses: the old one must not stay
        tid = int(a.say("refused"))
        events = collect(pc, until_named(a.pid, "refused"), timeout=10)
    assert of(events, "fork", tid)
    assert "cannot set the proc connector filter" in caplog.text


def test_overrun_is_still_reported_with_a_filter():
    with open_connector(rcvbuf=16 * 1024, events=DAEMON_KINDS) as pc:
        pc.watch({os.getpid()})
        overflow_then_rename(pc, b"after")


def test_older_kernels_ignore_the_mask_and_the_filter_drops_the_other_kinds(children, monkeypatch):
    """An older kernel ignores the 8-byte LISTEN with the event-type mask: emulated by not sending
    it. Then uid/gid/sid/ptrace events come to the socket; the BPF filter of a connector that
    asked for some kinds drops them. Read raw (parse, not read(), which filters kinds itself)."""
    real = ProcConnector._send
    monkeypatch.setattr(ProcConnector, "_send", lambda self, m: None if len(m) == 44 else real(self, m))
    a = children(WATCHED)
    with open_connector(events=DAEMON_KINDS) as bare, open_connector(events=DAEMON_KINDS) as pc:
        pc.watch({a.pid})
        setpriv = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "true"])
        assert setpriv.returncode == 0
        a.say("after-setpriv")
        done = until_named(a.pid, "after-setpriv")
        raw, unfiltered = drain_raw(pc, done), drain_raw(bare, done)
    assert any(ev.what == "other" for ev in unfiltered), "the emulated old kernel sends uid/gid events"
    assert not [ev for ev in raw if ev.what == "other"]
    assert [ev for ev in raw if ev.what == "exec"], "execs pass"


def drain_raw(pc: ProcConnector, done) -> list[ProcEvent]:
    import select
    import time

    events: list[ProcEvent] = []
    poller = select.poll()
    poller.register(pc.fileno(), select.POLLIN)
    deadline = time.monotonic() + 10
    while not done(events) and time.monotonic() < deadline:
        poller.poll(100)
        try:
            while data := pc._recv():
                events.extend(parse(data))
        except BlockingIOError:
            pass
    assert done(events), "the marker never came"
    return events
