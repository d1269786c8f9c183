"""Which cpuset cgroup confines a thread, who owns it, and pinning through it.

A thread's CPUs are bounded by its cpuset cgroup: sched_setaffinity outside the cgroup's
effective CPUs fails (EINVAL) or is cut to the intersection. VM managers confine qemu that way:

- libvirt, cgroup v1: ``machine/qemu-N-NAME.libvirt-qemu/{emulator,vcpuN,iothreadN}`` (or, under
  systemd, ``machine.slice/machine-qemu…scope/{emulator,…}``), one cgroup per vCPU and IO thread;
- libvirt, cgroup v2: ``machine.slice/machine-qemu…scope/libvirt/{emulator,vcpuN,iothreadN}``
  (threaded cgroups);
- Proxmox and other systemd users: one scope for the whole process (``qemu.slice/100.scope``).

Where the cgroup holds just the one thread and is laid out by a known VM manager, vcpud pins as
that manager does: it writes the cgroup's ``cpuset.cpus``, then sets the affinity
(:class:`CgroupOps`). A shared cgroup is never written: it confines every thread in it, and its
owner (systemd, Proxmox) decides it.

Everything is read rooted (``proc``, ``root``) and bounded.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from .bounded import SYSFS_LIMIT, read_text
from .cpuset import CpuSet

if TYPE_CHECKING:
    from .discovery import VM

log = logging.getLogger(__name__)

# A cgroup's task list past this size is not a per-thread cgroup anyway.
TASKS_LIMIT = 64 << 10

# libvirt's per-thread cgroups, matched on the tail of the path so that the tree may sit anywhere
# (a test parent, a nested hierarchy): v1 without systemd, v1 under systemd, v2 (".../libvirt/").
_LIBVIRT = re.compile(
    r"(?:^|/)(?:qemu-[0-9]+-[^/]+\.libvirt-qemu|machine-qemu[^/]*\.scope(?:/libvirt)?)"
    r"/(emulator|vcpu[0-9]+|iothread[0-9]+)\Z")


class Owner(str, enum.Enum):
    """Who laid out the cgroup that confines a thread."""

    ROOT = "root"        # the hierarchy's root: nothing confines it beyond the online CPUs
    LIBVIRT = "libvirt"  # one of libvirt's per-thread cgroups (emulator, vcpuN, iothreadN)
    SCOPE = "scope"      # a systemd scope or slice shared by the process (Proxmox's qemu.slice/100.scope)
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Confinement:
    """The cpuset cgroup of one thread."""

    path: str                    # as /proc/PID/task/TID/cgroup names it ("/qemu.slice/100.scope")
    effective: CpuSet | None     # its effective CPUs (None: unreadable)
    owner: Owner
    per_thread: bool             # the cgroup holds only this thread
    version: int = 1             # 1: the v1 cpuset hierarchy; 2: the unified hierarchy
    directory: Path | None = None  # where it is on this host
    role: str = ""               # libvirt's name for it: emulator, vcpu0, iothread1

    @property
    def writable(self) -> bool:
        """vcpud may pin through it: a per-thread cgroup of a known VM manager's layout."""
        return self.per_thread and self.owner is Owner.LIBVIRT and self.directory is not None

    def describe(self) -> str:
        cpus = self.effective.format() if self.effective is not None else "?"
        share = "this thread alone" if self.per_thread else "shared"
        return (f"cpuset cgroup {self.path} (allows {cpus}: its effective CPUs; cgroup v{self.version}, {share}, "
                f"{self.owner})")

    def hint(self) -> str:
        """What the operator can change."""
        if self.owner is Owner.SCOPE:
            unit = self.path.rstrip("/").rsplit("/", 1)[-1]
            return (f"widen the cgroup (systemctl set-property --runtime {unit} AllowedCPUs=...; on Proxmox the "
                    f"VM's 'affinity' option), or change the policy to CPUs within {self.effective}")
        if self.owner is Owner.LIBVIRT:
            return ("widen libvirt's pinning (virsh vcpupin/emulatorpin/iothreadpin, <cputune>, <vcpu cpuset>) "
                    f"or change the policy to CPUs within {self.effective}")
        return f"widen that cgroup's cpuset.cpus, or change the policy to CPUs within {self.effective}"


def owner_of(path: str) -> tuple[Owner, str]:
    """The layout a cgroup path belongs to, and libvirt's role name for it."""
    if path in ("", "/"):
        return Owner.ROOT, ""
    m = _LIBVIRT.search(path)
    if m:
        return Owner.LIBVIRT, m.group(1)
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if last.endswith((".scope", ".slice")):
        return Owner.SCOPE, ""
    return Owner.OTHER, ""


def _ids(text: str) -> list[int]:
    return [int(x) for x in text.split()]


class Cgroups:
    """Reads threads' cpuset confinement under ``proc`` and ``root`` (the cgroup mounts).

    ``once``: each cgroup's CPUs and threads read once, for `ps` and `plan`, which ask about every
    thread of every VM: a cgroup the VMs share lists all their threads, read for each of them (a
    quadratic 3 s for 1,800 threads). Not for whoever pins through cgroups, which change them.
    """

    def __init__(self, proc: Path = Path("/proc"), root: Path = Path("/sys/fs/cgroup"), once: bool = False) -> None:
        self.proc = Path(proc)
        self.root = Path(root)
        # (mount, path, version) -> the cgroup's directory, effective CPUs, threads; None: not kept
        self._dirs: dict[tuple[str, str, int], tuple[Path, CpuSet | None, tuple[int, ...] | None]] | None = \
            {} if once else None

    def _read(self, path: Path | str, limit: int = SYSFS_LIMIT) -> str | None:
        try:
            return read_text(path, limit)
        except (OSError, UnicodeDecodeError):
            return None

    def _cpus(self, d: Path, names: tuple[str, ...]) -> CpuSet | None:
        for name in names:
            text = self._read(d / name)
            if text is not None:
                try:
                    return CpuSet.parse(text.strip())
                except ValueError:
                    return None
        return None

    def confinement(self, pid: int, tid: int) -> Confinement | None:
        """The thread's cpuset cgroup, or None when it has none vcpud can see (or is gone)."""
        text = self._read(f"{self.proc}/{pid}/task/{tid}/cgroup")  # no Path joins: ps asks for every thread
        if text is None:
            return None
        v1: tuple[str, str] | None = None
        v2: str | None = None
        for line in text.splitlines():
            hier, _, rest = line.partition(":")
            ctrls, _, path = rest.partition(":")
            if "cpuset" in ctrls.split(","):
                v1 = (ctrls, path)
            elif hier == "0" and not ctrls:
                v2 = path
        if v1 is not None:
            ctrls, path = v1
            return self._at(tid, path, 1, ("cpuset",) + ((ctrls,) if ctrls != "cpuset" else ()))
        if v2 is not None:
            return self._at(tid, v2, 2, ("", "unified"))
        return None

    def _at(self, tid: int, path: str, version: int, mounts: tuple[str, ...]) -> Confinement | None:
        """``mounts``: where under the root the hierarchy may be mounted."""
        rel = path.strip("/")
        if not path.startswith("/") or ".." in rel.split("/"):
            return None  # outside vcpud's cgroup namespace: not a path on this host
        owner, role = owner_of(path)
        for mount in mounts:
            d, effective, threads = self._dir(mount, rel, version, owner is not Owner.ROOT)
            if effective is None:
                continue
            return Confinement(path, effective, owner, threads == (tid,), version, d, role)
        # A v2 hierarchy without the cpuset controller confines nothing.
        return None if version == 2 else Confinement(path, None, owner, False, version, None, role)

    def _dir(self, mount: str, rel: str, version: int,
             threads: bool) -> tuple[Path, CpuSet | None, tuple[int, ...] | None]:
        """The directory of cgroup ``rel`` under ``mount``, its effective CPUs (None: no cpuset
        there) and, when ``threads`` (the root cgroup, which lists every thread on the host, is
        never a thread's own), the threads it lists (None: unreadable)."""
        key = (mount, rel, version)
        if self._dirs is not None and key in self._dirs:
            return self._dirs[key]
        m = self.root / mount if mount else self.root
        d = m / rel if rel else m
        names = ("cpuset.effective_cpus", "cpuset.cpus.effective") if version == 1 else ("cpuset.cpus.effective",)
        effective = self._cpus(d, names)
        listed: tuple[int, ...] | None = None
        if effective is not None and threads:
            listing = self._read(d / ("tasks" if version == 1 else "cgroup.threads"), TASKS_LIMIT)
            try:
                listed = None if listing is None else tuple(_ids(listing))
            except ValueError:
                listed = None
        if self._dirs is not None:
            self._dirs[key] = (d, effective, listed)
        return d, effective, listed

    def parent_effective(self, c: Confinement) -> CpuSet | None:
        """The effective CPUs of the cgroup above ``c``: what writing ``c`` may ask for."""
        if c.directory is None:
            return None
        names = ("cpuset.effective_cpus", "cpuset.cpus.effective") if c.version == 1 else ("cpuset.cpus.effective",)
        return self._cpus(c.directory.parent, names)


class _Affinity(Protocol):  # pinning.AffinityOps, which imports this module
    def get(self, tid: int) -> CpuSet: ...

    def set(self, pid: int, tid: int, cpus: CpuSet) -> None: ...


class _SchedAffinity:
    def get(self, tid: int) -> CpuSet:
        return CpuSet.of_kernel(os.sched_getaffinity(tid))

    def set(self, pid: int, tid: int, cpus: CpuSet) -> None:
        os.sched_setaffinity(tid, cpus.cpus)


class CgroupOps:
    """An AffinityOps that pins a thread in its own cgroup of a known VM-manager layout as that
    manager does (``cpuset.cpus``, then the affinity through ``base``, sched_setaffinity by
    default), and any other thread through ``base`` alone."""

    name = "cgroup"

    def __init__(self, cgroups: Cgroups, base: _Affinity | None = None) -> None:
        self.cgroups = cgroups
        self.base = base if base is not None else _SchedAffinity()

    def get(self, tid: int) -> CpuSet:
        return self.base.get(tid)

    def via(self, pid: int, tid: int) -> str:
        c = self.cgroups.confinement(pid, tid)
        return "cgroup" if c is not None and c.writable else "sched_setaffinity"

    def confinement(self, pid: int, tid: int) -> Confinement | None:
        return self.cgroups.confinement(pid, tid)

    def set(self, pid: int, tid: int, cpus: CpuSet) -> None:
        if not (self.cgroups.proc / str(pid) / "task" / str(tid)).exists():
            raise ProcessLookupError(errno.ESRCH, "thread is gone")
        c = self.cgroups.confinement(pid, tid)
        if c is not None and c.writable and c.effective != cpus:
            assert c.directory is not None
            write_cpus(c.directory, cpus)
            log.debug("wrote %s to %s/cpuset.cpus", cpus, c.path)
        self.base.set(pid, tid, cpus)


def write_cpus(directory: Path, cpus: CpuSet) -> None:
    """Write a cgroup's cpuset.cpus (EINVAL: outside its parent's CPUs)."""
    fd = os.open(directory / "cpuset.cpus", os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_TRUNC)
    try:
        os.write(fd, (cpus.format() + "\n").encode())
    finally:
        os.close(fd)


class CgroupOwner:
    """The VM's cgroups as owner (no libvirt API): for a VM some of whose threads sit in a known
    VM manager's per-thread cgroups, :class:`CgroupOps`; for any other VM None, and the caller falls
    back to sched_setaffinity (which gets EINVAL outside a shared scope's CPUs).

    Asked before every pin, so the answer is remembered per VM: a VM manager puts its process in
    its cgroups before exec, so a VM found in a known layout stays there; a VM found elsewhere is
    looked at again after ``recheck`` seconds (someone may move it), not at every pin (reading a
    thread's cgroups costs ~0.1 ms, some 70 times the sched_setaffinity it would precede).
    """

    def __init__(self, cgroups: Cgroups | None = None, base: _Affinity | None = None,
                 clock: Callable[[], float] = time.monotonic, recheck: float = 10.0) -> None:
        self.cgroups = cgroups or Cgroups()
        self.ops = CgroupOps(self.cgroups, base)
        self.clock = clock
        self.recheck = recheck
        self._known: set[object] = set()  # VM keys found in a known layout
        self._elsewhere: dict[object, float] = {}  # VM keys found in none -> when to look again

    def ops_for(self, vm: "VM") -> CgroupOps | None:
        if vm.key in self._known:
            return self.ops
        now = self.clock()
        if self._elsewhere.get(vm.key, 0.0) > now:
            return None
        # libvirt moves the main thread into the VM's "emulator" cgroup.
        c = self.cgroups.confinement(vm.pid, vm.pid)
        if c is not None and c.owner is Owner.LIBVIRT:
            if len(self._known) > 4096:
                self._known.clear()
            self._known.add(vm.key)
            self._elsewhere.pop(vm.key, None)
            return self.ops
        if len(self._elsewhere) > 4096:
            self._elsewhere = {k: t for k, t in self._elsewhere.items() if t > now}
        self._elsewhere[vm.key] = now + self.recheck
        return None
