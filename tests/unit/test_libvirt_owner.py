"""vcpud.libvirt without a libvirtd: the selector event impl, the Chain router, the owner's fallbacks."""

from __future__ import annotations

import logging
import selectors
import socket
from pathlib import Path

import pytest

from vcpud import libvirt as lv
from vcpud.cpuset import CpuSet
from vcpud.discovery import VM, Role, Smp, Thread
from vcpud.libvirtrun import OnDemand, started
from vcpud.pinning import Chain


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def vm(pid: int = 4242, name: str | None = "web1", threads: tuple[Thread, ...] = ()) -> VM:
    return VM(pid=pid, starttime=1, exe="/usr/bin/qemu-system-x86_64", cmdline=(), uid=0, user="root", name=name,
              uuid=None, smp=Smp(), threads=threads, debug_threads=True)


def test_handles_follow_what_libvirt_wants():
    sel = selectors.DefaultSelector()
    impl = lv.SelectorEventImpl(sel)
    a, b = socket.socketpair()
    calls = []
    w = impl.add_handle(a.fileno(), 1, lambda *args: calls.append(args), "op")
    assert sel.get_key(a.fileno()).events == selectors.EVENT_READ
    b.send(b"x")
    ready = [(key.data, mask) for key, mask in sel.select(1)]
    assert len(ready) == 1
    ready[0][0](ready[0][1])
    assert calls == [(w, a.fileno(), 1, "op")]
    impl.update_handle(w, 0)  # libvirt wants nothing: the fd leaves the selector
    with pytest.raises(KeyError):
        sel.get_key(a.fileno())
    impl.update_handle(w, 3)
    assert sel.get_key(a.fileno()).events == selectors.EVENT_READ | selectors.EVENT_WRITE
    w2 = impl.add_handle(a.fileno(), 1, lambda *args: None, None)  # two watches, one fd
    assert impl.remove_handle(w) == 0
    assert sel.get_key(a.fileno()).events == selectors.EVENT_READ
    assert impl.remove_handle(w2) == 0
    assert impl.remove_handle(w2) == -1
    assert not sel.get_map()
    a.close()
    b.close()
    sel.close()


def test_timers_fire_when_due_and_can_be_disabled():
    clock = Clock()
    impl = lv.SelectorEventImpl(selectors.DefaultSelector(), clock)
    fired = []
    t = impl.add_timeout(500, lambda timer, opaque: fired.append((timer, opaque)), "op")
    off = impl.add_timeout(-1, lambda *a: fired.append("never"), None)
    assert impl.next_deadline() == 100.5
    impl.run_timers()
    assert fired == []
    clock.t = 100.5
    impl.run_timers()
    assert fired == [(t, "op")]
    assert impl.next_deadline() == 101.0  # repeats at its interval
    impl.update_timeout(t, 0)  # every iteration: due now
    assert impl.next_deadline() == 100.5
    impl.update_timeout(t, -1)
    assert impl.next_deadline() is None
    assert impl.remove_timeout(t) == 0 and impl.remove_timeout(off) == 0 and impl.remove_timeout(t) == -1


class Claims:
    def __init__(self, ops):
        self.ops = ops

    def ops_for(self, vm):
        return self.ops


def test_chain_asks_owners_first_then_falls_back():
    direct, owned = object(), object()
    assert Chain(Claims(None), fallback=direct).ops_for(vm()) is direct
    assert Chain(Claims(owned), Claims(None), fallback=direct).ops_for(vm()) is owned


def test_owner_ignores_vms_libvirt_did_not_start(tmp_path: Path):
    owner = lv.LibvirtOwner(uri="test:///nowhere", run_dir=tmp_path)
    assert owner.ops_for(vm(name=None)) is None
    assert owner.ops_for(vm()) is None  # no pid file
    (tmp_path / "web1.pid").write_text("999\n")
    assert owner.ops_for(vm()) is None  # another process's pid file
    assert owner.conn is None  # never connected for them


@pytest.mark.skipif(lv.libvirt is None, reason="libvirt-python not installed")
def test_owner_unreachable_falls_back_and_retries_later(tmp_path: Path, caplog, capfd):
    caplog.set_level(logging.INFO, logger="vcpud.libvirt")
    clock = Clock()
    owner = lv.LibvirtOwner(uri="qemu+unix:///system?socket=/nonexistent/sock", run_dir=tmp_path, clock=clock)
    (tmp_path / "web1.pid").write_text("4242\n")
    assert owner.ops_for(vm()) is None
    assert owner.next_try == 101.0
    clock.t = 100.5
    assert owner.ops_for(vm()) is None  # not retried yet
    assert owner.failures == 1
    clock.t = 101.0
    assert owner.ops_for(vm()) is None
    assert owner.failures == 2
    assert sum("unreachable" in r.message for r in caplog.records) == 1  # said once
    assert capfd.readouterr().err == ""  # libvirt's own stderr printer is off


def test_domain_events_queue_the_qemu_pid(tmp_path: Path):
    owner = lv.LibvirtOwner(run_dir=tmp_path)
    (tmp_path / "web1.pid").write_text("4242\n")

    class Dom:
        def name(self) -> str:
            return "web1"

    if lv.libvirt is None:
        pytest.skip("libvirt-python not installed")
    owner._domain_event(None, Dom(), lv.libvirt.VIR_DOMAIN_EVENT_STARTED, 0, None)
    owner._domain_event(None, Dom(), {"cputune.vcpupin0": "1"}, None)
    owner._domain_event(None, Dom(), lv.libvirt.VIR_DOMAIN_EVENT_STOPPED, 0, None)
    assert owner.take() == ([4242], False)
    assert owner.take() == ([], False)


def test_actuator_routes_each_role_to_its_libvirt_call(monkeypatch):
    if lv.libvirt is None:
        pytest.skip("libvirt-python not installed")
    calls = []

    class Dom:
        def pinVcpuFlags(self, n, cpumap, flags):  # noqa: N802
            calls.append(("vcpu", n, cpumap, flags))

        def pinEmulator(self, cpumap, flags):  # noqa: N802
            calls.append(("emulator", cpumap, flags))

        def pinIOThread(self, n, cpumap, flags):  # noqa: N802
            calls.append(("iothread", n, cpumap, flags))

    threads = {1: Thread(1, "CPU 1/KVM", Role.VCPU, vcpu=1), 2: Thread(2, "qemu", Role.EMULATOR),
               3: Thread(3, "IO iothread7", Role.IOTHREAD, iothread="iothread7")}
    monkeypatch.setattr(lv.Path, "exists", lambda self: True)
    ops = lv.LibvirtAffinity(lv.LibvirtOwner(), Dom(), threads, 4)
    live = lv.libvirt.VIR_DOMAIN_AFFECT_LIVE
    for tid in (1, 2, 3):
        ops.set(99, tid, CpuSet.parse("1,3"))
    m = (False, True, False, True)
    assert calls == [("vcpu", 1, m, live), ("emulator", m, live), ("iothread", 7, m, live)]


STATUS = """<domstatus state='{state}' reason='{reason}' pid='{pid}'>
  <monitor path='/var/lib/libvirt/qemu/domain-1-web1/monitor.sock' type='unix'/>
  {job}
  <domain type='kvm' id='1'><name>web1</name></domain>
</domstatus>
"""


def status(tmp: Path, state: str = "running", reason: str = "booted", pid: int = 4242, job: str = "") -> None:
    path = tmp / "web1.xml"
    new = tmp / "web1.xml.new"
    new.write_text(STATUS.format(state=state, reason=reason, pid=pid, job=job))
    new.replace(path)  # as libvirt does: a new inode, so the cached answer is not reused


def test_busy_reads_libvirts_status_file(tmp_path: Path):
    owner = lv.LibvirtOwner(run_dir=tmp_path)
    v = vm()
    assert owner.busy(v) == "start"  # not written yet
    status(tmp_path, "paused", "starting up", job="<job type='none' async='start'/>")
    assert owner.busy(v) == "start"
    status(tmp_path, pid=1)  # a previous run's
    assert owner.busy(v) == "start"
    status(tmp_path, job="<job type='modify' async='none'>\n<x/></job>")
    assert owner.busy(v) == "modify job"
    status(tmp_path, "paused", "user")
    assert owner.busy(v) is None
    status(tmp_path)
    assert owner.busy(v) is None


@pytest.mark.skipif(lv.libvirt is None, reason="libvirt-python not installed")
def test_pins_wait_for_libvirts_job_without_asking_libvirt(tmp_path: Path, monkeypatch):
    calls: list[tuple] = []

    class Dom:
        def name(self) -> str:
            return "web1"

        def UUIDString(self) -> str:  # noqa: N802
            return "x"

        def ID(self) -> int:  # noqa: N802
            return 1

        def pinVcpuFlags(self, n, cpumap, flags):  # noqa: N802
            calls.append(("vcpu", n, cpumap))

        def pinEmulator(self, cpumap, flags):  # noqa: N802
            calls.append(("emulator", cpumap))

    class Conn:
        def lookupByName(self, name):  # noqa: N802
            calls.append(("lookup", name))
            return Dom()

    clock = Clock()
    owner = lv.LibvirtOwner(run_dir=tmp_path, clock=clock)
    owner.events = lv.SelectorEventImpl(selectors.DefaultSelector(), clock)  # in a loop
    owner.conn = Conn()
    owner.ncpus = 2
    (tmp_path / "web1.pid").write_text("4242\n")
    threads = (Thread(10, "CPU 0/KVM", Role.VCPU, vcpu=0), Thread(11, "qemu", Role.EMULATOR))
    v = vm(threads=threads)
    real = {10: CpuSet.parse("0-1"), 11: CpuSet.parse("0-1"), 12: CpuSet.parse("1")}
    monkeypatch.setattr(lv.os, "sched_getaffinity", lambda tid: set(real[tid].cpus))
    monkeypatch.setattr(lv.os, "sched_setaffinity", lambda tid, cpus: None)
    monkeypatch.setattr(lv.Path, "exists", lambda self: True)

    status(tmp_path, "paused", "starting up")
    ops = owner.ops_for(v)
    assert isinstance(ops, lv.DeferredAffinity)
    ops.set(4242, 10, CpuSet.parse("1"))
    ops.set(4242, 11, CpuSet.parse("0"))
    assert ops.get(10) == CpuSet.parse("1")  # what the reconciler reads back: kept
    assert owner.ops_for(v).get(12) == CpuSet()  # libvirt will set it: not on any CPUs yet, for us
    assert calls == []  # libvirt not asked while it starts the domain
    assert owner.next_deadline() == clock.t + lv.DEFERRED_POLL
    owner.run_due()
    assert calls == [] and owner.deferred
    status(tmp_path)  # the start job ended
    clock.t += lv.DEFERRED_POLL
    owner.run_due()
    assert calls == [("lookup", "web1"), ("vcpu", 0, (False, True)), ("emulator", (True, False))]
    assert not owner.deferred and owner.next_deadline() is None
    assert isinstance(owner.ops_for(v), lv.LibvirtAffinity)

    # a hotplug job: the new vCPU's pin waits for it, then is made at the next look
    calls.clear()
    status(tmp_path, job="<job type='modify' async='none'/>")
    ops = owner.ops_for(v)
    assert isinstance(ops, lv.DeferredAffinity) and ops.via(4242, 10) == "libvirt, once its modify job ends"
    ops.set(4242, 10, CpuSet.parse("0"))
    status(tmp_path)
    assert isinstance(owner.ops_for(v), lv.LibvirtAffinity)
    assert calls == [("vcpu", 0, (True, False))]

    # the domain stopped with pins waiting: forgotten
    status(tmp_path, "paused", "starting up")
    owner.ops_for(v).set(4242, 10, CpuSet.parse("1"))
    (tmp_path / "web1.pid").unlink()
    clock.t += 1
    owner.run_due()
    assert not owner.deferred


def test_outside_a_loop_pins_are_not_deferred(tmp_path: Path):
    if lv.libvirt is None:
        pytest.skip("libvirt-python not installed")
    owner = lv.LibvirtOwner(run_dir=tmp_path)
    (tmp_path / "web1.pid").write_text("4242\n")
    status(tmp_path, "paused", "starting up")
    owner.conn = type("Conn", (), {"lookupByName": lambda self, n: (_ for _ in ()).throw(lv.libvirt.libvirtError("x")),
                                   "isAlive": lambda self: 1})()
    assert owner.ops_for(vm()) is None  # `vcpud apply`: asks libvirt (and waits), never defers


def test_on_demand_owner_reads_pid_files_and_asks_libvirt_python_only_for_libvirts_vms(tmp_path: Path):
    owner = OnDemand(run_dir=tmp_path, uri="qemu+unix:///system?socket=/nonexistent/sock")
    assert not owner.owns(vm(name=None)) and not owner.owns(vm())  # no pid file
    (tmp_path / "web1.pid").write_text("999\n")
    assert not owner.owns(vm(pid=4243))  # another process's pid file
    assert owner.ops_for(vm(pid=4243)) is None
    assert owner._available is None and owner._owner is None  # libvirt-python never asked for
    (tmp_path / "web1.pid").write_text("4244\n")
    assert owner.owns(vm(pid=4244)) == lv.available()
    assert owner.ops_for(vm(pid=4244)) is None  # libvirtd unreachable (or libvirt-python missing)
    assert (owner._owner is not None) == lv.available()
    (tmp_path / "web1.pid").unlink()
    assert owner.owns(vm(pid=4244)) == lv.available()  # decided once per VM for the command


def test_on_demand_owner_without_libvirt_python(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(lv, "libvirt", None)
    owner = OnDemand(run_dir=tmp_path)
    (tmp_path / "web1.pid").write_text("4242\n")
    assert not owner.owns(vm()) and owner.ops_for(vm()) is None and owner._owner is None
    assert not owner.owns(vm(pid=4243))


def test_libvirt_owner_and_on_demand_agree_on_whose_vm_it_is(tmp_path: Path):
    (tmp_path / "web1.pid").write_text("4242")
    (tmp_path / "db.pid").write_text("12x\n")
    for v in (vm(), vm(pid=4243), vm(name="db"), vm(name="a/b"), vm(name=None)):
        assert lv.LibvirtOwner(run_dir=tmp_path).is_libvirts(v) == started(v, tmp_path) == (v.pid == 4242 and
                                                                                             v.name == "web1")


def test_the_daemon_imports_libvirt_python_only_once_libvirtd_listens(tmp_path):
    """libvirt-python costs the daemon ~14 MiB: not imported while nothing listens on libvirt's socket."""
    import subprocess
    import sys

    sock = tmp_path / "libvirt-sock"
    code = f"""
import socket, sys
from pathlib import Path
from vcpud.owners import Owners
from vcpud.pinning import OsAffinity
o = Owners(Path("/proc"), OsAffinity(), sockets=(Path({str(sock)!r}),))
assert not o.adopt() and o.libvirt is None
assert "libvirt" not in sys.modules and "vcpud.libvirt" not in sys.modules, "imported with nothing listening"
s = socket.socket(socket.AF_UNIX)
s.bind({str(sock)!r})
assert not o.adopt(), "a socket nobody listens on is not libvirtd"
s.listen()
made = o.adopt()
print("made" if made else "not-made", "libvirt" in sys.modules)
assert not o.adopt()  # once
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    from vcpud import libvirt as lv

    # With libvirt-python installed the owner is made (and libvirt imported) once libvirtd listens.
    assert out.stdout.split() == (["made", "True"] if lv.available() else ["not-made", "False"]), out.stdout
