"""A real libvirtd for integration tests: started by hand when systemd is not PID 1, and its domains.

The host's libvirtd (qemu:///system) is shared: when one already runs it is used and left running;
one this harness started is stopped at the end. /dev/kvm gets group kvm, mode 660 (libvirt's qemu
runs as libvirt-qemu) and is put back as it was, unless someone else changed it meanwhile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.conftest import skip_or_fail
from tests.qemu import RUN

PIDFILE = Path("/run/libvirtd.pid")
SOCK = Path("/run/libvirt/libvirt-sock")


def virsh(*args: str, check: bool = True, timeout: float = 60) -> str:
    p = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"virsh {' '.join(args)}: {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def _running(name: str) -> list[int]:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _reachable() -> bool:
    return subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                          timeout=30).returncode == 0


def check_installed() -> None:
    if os.geteuid() != 0:
        skip_or_fail("libvirt tests need root")
    for exe in ("libvirtd", "virtlogd", "virsh"):
        if shutil.which(exe) is None:
            skip_or_fail(f"{exe} not installed (apt-get install libvirt-daemon-system libvirt-clients)")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        skip_or_fail("libvirt-python not installed (pip install 'vcpud[libvirt]' or apt-get install python3-libvirt)")
    if not os.path.exists("/dev/kvm"):
        skip_or_fail("no /dev/kvm")


MACHINE_CPUSET = Path("/sys/fs/cgroup/cpuset/machine/cpuset.cpus")


def restore_machine_cpuset() -> None:
    """cgroup v1 cpusets never regain a CPU that went offline: after a CPU hot-unplug (a test of
    our own, or of anyone's) libvirt's `machine` cpuset keeps the shrunk list and `virsh start`
    or a pin to that CPU fails. Write the online list back, as an operator would."""
    if MACHINE_CPUSET.exists():
        online = Path("/sys/devices/system/cpu/online").read_text().strip()
        if MACHINE_CPUSET.read_text().strip() != online:
            MACHINE_CPUSET.write_text(online)


class Libvirtd:
    """libvirtd and virtlogd, running; ``stop()`` ends only what ``start()`` began."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.kvm_was: tuple[int, int] | None = None  # (gid, mode) of /dev/kvm before

    def start(self) -> None:
        restore_machine_cpuset()
        st = os.stat("/dev/kvm")
        import grp

        kvm_gid = grp.getgrnam("kvm").gr_gid
        if st.st_gid != kvm_gid or st.st_mode & 0o060 != 0o060:
            self.kvm_was = (st.st_gid, st.st_mode & 0o777)
            os.chown("/dev/kvm", -1, kvm_gid)
            os.chmod("/dev/kvm", 0o660)
        if not _running("virtlogd"):
            subprocess.run(["virtlogd", "-d"], check=True)
            self.started += _running("virtlogd")
        if not _running("libvirtd"):
            subprocess.run(["libvirtd", "-d"], check=True)
            deadline = time.monotonic() + 30
            while not (_running("libvirtd") and SOCK.exists() and _reachable()):
                if time.monotonic() > deadline:
                    raise AssertionError("libvirtd did not come up")
                time.sleep(0.1)
            self.started += _running("libvirtd")
        elif not _reachable():
            raise AssertionError("a libvirtd runs but qemu:///system does not answer")

    def pid(self) -> int:
        pids = _running("libvirtd")
        assert pids, "libvirtd is not running"
        return pids[0]

    def restart(self) -> None:
        """Stop and start libvirtd (its domains keep running)."""
        pid = self.pid()
        os.kill(pid, 15)
        _wait_gone(pid)
        self.started = [p for p in self.started if p != pid]
        subprocess.run(["libvirtd", "-d"], check=True)
        deadline = time.monotonic() + 30
        while not _reachable():
            if time.monotonic() > deadline:
                raise AssertionError("libvirtd did not come back")
            time.sleep(0.1)
        self.started += _running("libvirtd")

    def stop(self) -> None:
        # libvirtd first (it talks to virtlogd), each by its own pid
        for pid in sorted(self.started, key=lambda p: 0 if p in _running("libvirtd") else 1):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
            _wait_gone(pid)
        self.started = []
        if self.kvm_was is not None:
            st = os.stat("/dev/kvm")
            if st.st_mode & 0o777 == 0o660:  # nobody changed it meanwhile
                os.chown("/dev/kvm", -1, self.kvm_was[0])
                os.chmod("/dev/kvm", self.kvm_was[1])
            self.kvm_was = None


def _wait_gone(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            return
        time.sleep(0.05)


def domain_xml(name: str, vcpus: int = 2, maxvcpus: int | None = None, iothreads: int = 1,
               cputune: str = "", vcpu_cpuset: str = "") -> str:
    cpuset = f" cpuset='{vcpu_cpuset}'" if vcpu_cpuset else ""
    current = f" current='{vcpus}'" if maxvcpus else ""
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu placement='static'{cpuset}{current}>{maxvcpus or vcpus}</vcpu>
  <iothreads>{iothreads}</iothreads>
  <cputune>{cputune}</cputune>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class Domain:
    def __init__(self, name: str, xml: str, tmp: Path) -> None:
        self.name = name
        path = tmp / f"{name}.xml"
        path.write_text(xml)
        virsh("define", str(path))

    def start(self, paused: bool = True) -> float:
        """Start it; the monotonic time at which ``virsh start`` returned."""
        virsh("start", self.name, *(["--paused"] if paused else []))
        return time.monotonic()

    def pid(self) -> int:
        return int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text().strip())

    def destroy(self) -> None:
        virsh("destroy", self.name, check=False)
        virsh("undefine", self.name, check=False)


@contextmanager
def domain(tmp: Path, suffix: str, **kw: object) -> Iterator[Domain]:
    name = f"{RUN}lv-{suffix}"
    d = Domain(name, domain_xml(name, **kw), tmp)  # type: ignore[arg-type]
    try:
        yield d
    finally:
        d.destroy()
