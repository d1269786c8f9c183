"""Which processes are VMs, what they are, and what role each of their threads plays.

The classification (:func:`classify`) is pure given a :class:`~vcpud.procfs.ProcessSnapshot`;
:func:`scan` is the edge that walks /proc and verifies executables.
"""

from __future__ import annotations

import enum
import fnmatch
import logging
import os
import pwd
import re
import stat
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Protocol, Sequence

from .cpuset import CpuSet
from .procfs import PF_KTHREAD, PF_USER_WORKER, ProcessSnapshot, Procfs, ThreadSnapshot, Vanished

log = logging.getLogger(__name__)

DEFAULT_EXECUTABLES = ("/usr/bin/qemu-system-*", "/usr/libexec/qemu-kvm", "/usr/bin/kvm")

# Syscall number of ioctl(2) per architecture, for reading /proc/TID/syscall.
IOCTL_NR = {"x86_64": 16, "aarch64": 29, "riscv64": 29, "s390x": 54, "ppc64le": 54, "ppc64": 54}
# KVM_RUN = _IO(KVMIO=0xAE, 0x80); powerpc's _IOC_NONE is 1, which sets bit 29.
KVM_RUN = {"ppc64le": 0x2000AE80, "ppc64": 0x2000AE80}
KVM_RUN_DEFAULT = 0xAE80

_VCPU_NAME = re.compile(r"CPU (\d+)/(KVM|TCG|HVF|WHPX|NVMM|HAX)\Z")
_DELETED = " (deleted)"
UNREADABLE = "cannot read /proc/PID/exe (not root / no CAP_SYS_PTRACE?)"


class Role(str, enum.Enum):
    VCPU = "vcpu"
    IOTHREAD = "iothread"
    VHOST = "vhost"
    EMULATOR = "emulator"
    KERNEL = "kernel"    # kernel workers living in the process: reported, never pinned
    UNKNOWN = "unknown"  # could not be told apart from a vCPU: reported, never pinned

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Smp:
    """Guest CPU topology as QEMU computes it from ``-smp``."""

    cpus: int = 1
    maxcpus: int = 1
    sockets: int = 1
    dies: int = 1
    clusters: int = 1
    cores: int = 1
    threads: int = 1

    def position(self, index: int) -> dict[str, int]:
        """Where guest vCPU ``index`` sits (QEMU numbers threads fastest, then cores, ...)."""
        thread = index % self.threads
        rest = index // self.threads
        core = rest % self.cores
        rest //= self.cores
        cluster = rest % self.clusters
        rest //= self.clusters
        die = rest % self.dies
        socket = rest // self.dies
        return {"socket": socket, "die": die, "cluster": cluster, "core": core, "thread": thread}


@dataclass(frozen=True, slots=True)
class Thread:
    tid: int
    comm: str
    role: Role
    vcpu: int | None = None        # vCPU index, for Role.VCPU
    iothread: str | None = None    # IO thread id, for Role.IOTHREAD
    how: str = "name"              # how the role was found: name, kvm_run, flags, default
    processor: int = -1            # CPU it last ran on (ps's psr)
    affinity: CpuSet = CpuSet()
    utime: int = 0
    stime: int = 0

    @property
    def label(self) -> str:
        if self.role is Role.VCPU:
            return f"vcpu {self.vcpu}"
        if self.role is Role.IOTHREAD:
            return f"iothread {self.iothread}"
        return self.role.value


@dataclass(frozen=True, slots=True)
class VM:
    pid: int
    starttime: int
    exe: str
    cmdline: tuple[str, ...]
    uid: int
    user: str | None
    name: str | None
    uuid: str | None
    smp: Smp
    threads: tuple[Thread, ...]
    debug_threads: bool
    vanished_threads: int = 0

    @property
    def key(self) -> tuple[int, int]:
        """Identity across scans: a reused PID has another start time."""
        return (self.pid, self.starttime)

    @property
    def display_name(self) -> str:
        return self.name if self.name is not None else f"pid{self.pid}"

    def vcpu_threads(self) -> tuple[Thread, ...]:
        return tuple(sorted((t for t in self.threads if t.role is Role.VCPU), key=lambda t: t.vcpu or 0))


@dataclass(frozen=True, slots=True)
class Rejected:
    pid: int
    exe: str
    reason: str


@dataclass(frozen=True, slots=True)
class Scan:
    vms: tuple[VM, ...]
    rejected: tuple[Rejected, ...] = ()
    vanished: int = 0  # processes and threads that went away while being read
    errors: tuple[str, ...] = ()
    unreadable: int = 0  # processes whose executable we may not read
    # qemu processes started with -daemonize that show no guest yet (no vCPU thread, no KVM VM
    # fd): the parents it forks through while daemonizing never will, the daemon soon will
    starting: tuple[int, ...] = ()
    # processes that are not VMs (other executables, kernel threads): not looked at again until
    # they exec (the reconciler's not_vm)
    not_vms: tuple[int, ...] = ()


# --- qemu command line --------------------------------------------------------------
def split_qemu_opts(text: str) -> list[str]:
    """Split a QemuOpts string on commas; ``,,`` is a literal comma."""
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


# qemu options that take no argument (qemu-options.hx entries without HAS_ARG); every
# other option consumes the next argv element, whatever it looks like.
_NO_ARG = frozenset("""
S s enable-kvm no-kvm nodefaults no-user-config nodefconfig daemonize snapshot nographic
no-reboot no-shutdown full-screen no-hpet no-acpi win2k-hack no-fd-bootchk only-migratable
preconfig enable-sync-profile version help h no-quit alt-grab ctrl-grab curses sdl no-frame
semihosting enable-fips perfmap jitdump singlestep one-insn-per-tb usb rtc-td-hack
no-kvm-pit-reinjection no-kvm-irqchip old-param xen-attach portrait
""".split())


def options(cmdline: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """Every option of a qemu argv in order: (name without dashes, its value or None)."""
    i = 1
    while i < len(cmdline):
        a = cmdline[i]
        i += 1
        if not a.startswith("-") or a in ("-", "--"):
            continue  # a stray positional (qemu's legacy disk image argument)
        name, eq, inline = a.lstrip("-").partition("=")
        if eq:
            yield name, inline
        elif name in _NO_ARG:
            yield name, None
        elif i < len(cmdline):
            yield name, cmdline[i]
            i += 1


def option_values(cmdline: Sequence[str], opt: str) -> list[str]:
    """Values of ``-opt VALUE`` / ``--opt VALUE`` / ``-opt=VALUE`` in argv order."""
    return [v for name, v in options(cmdline) if name == opt and v is not None]


def daemonizes(cmdline: Sequence[str]) -> bool:
    """Whether qemu was told to ``-daemonize`` (fork, setsid, fork again; the parents exit)."""
    return any(name == "daemonize" for name, _ in options(cmdline))


def parse_opts(text: str, implied: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, part in enumerate(split_qemu_opts(text)):
        k, eq, v = part.partition("=")
        if eq:
            out[k] = v
        elif i == 0 and part:
            out[implied] = part
        elif part:
            out[part] = "on"
    return out


_MACHINE_VERSION = re.compile(r"-(\d+)\.(\d+)\Z")


def _prefers_sockets(cmdline: Sequence[str]) -> bool:
    # QEMU < 6.2 machine types fill omitted -smp values with sockets; newer ones with cores.
    for m in option_values(cmdline, "machine") + option_values(cmdline, "M"):
        mtype = parse_opts(m, "type").get("type", "")
        v = _MACHINE_VERSION.search(mtype)
        if v and (int(v.group(1)), int(v.group(2))) < (6, 2):
            return True
    return False


def parse_smp(cmdline: Sequence[str]) -> Smp:
    vals = option_values(cmdline, "smp")
    if not vals:
        return Smp()
    o = parse_opts(vals[-1], "cpus")

    def num(k: str) -> int:
        try:
            return max(int(o.get(k, "0")), 0)
        except ValueError:
            return 0

    cpus, maxcpus = num("cpus"), num("maxcpus")
    sockets, dies, clusters = num("sockets"), num("dies") or 1, num("clusters") or 1
    cores, threads = num("cores"), num("threads")
    # hw/core/machine-smp.c: machine_parse_smp_config()
    if cpus == 0 and maxcpus == 0:
        sockets, cores, threads = sockets or 1, cores or 1, threads or 1
    else:
        maxcpus = maxcpus or cpus
        if _prefers_sockets(cmdline):
            if sockets == 0:
                cores, threads = cores or 1, threads or 1
                sockets = maxcpus // (dies * clusters * cores * threads) or 1
            elif cores == 0:
                threads = threads or 1
                cores = maxcpus // (sockets * dies * clusters * threads) or 1
        else:
            if cores == 0:
                sockets, threads = sockets or 1, threads or 1
                cores = maxcpus // (sockets * dies * clusters * threads) or 1
            elif sockets == 0:
                threads = threads or 1
                sockets = maxcpus // (dies * clusters * cores * threads) or 1
        if threads == 0:
            threads = maxcpus // (sockets * dies * clusters * cores) or 1
    maxcpus = maxcpus or sockets * dies * clusters * cores * threads
    cpus = cpus or maxcpus
    return Smp(cpus=cpus, maxcpus=maxcpus, sockets=sockets, dies=dies, clusters=clusters, cores=cores, threads=threads)


def parse_name(cmdline: Sequence[str]) -> tuple[str | None, bool]:
    """Guest name and whether debug-threads is on, from ``-name``."""
    vals = option_values(cmdline, "name")
    if not vals:
        return None, False
    o = parse_opts(vals[-1], "guest")
    return o.get("guest"), o.get("debug-threads", "off") in ("on", "yes", "true")


# qemu_uuid_is_valid(): 36 characters, hex digits with dashes at 8, 13, 18 and 23
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
# An unsigned number as qemu_strtou64(s, NULL, 0) takes it for a QEMU_OPT_NUMBER: leading
# white space, an optional "+", base 16 after 0x, base 8 after 0, nothing after the digits.
_C_NUMBER = re.compile(r"[ \t\n\v\f\r]*\+?(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<oct>0[0-7]*)|(?P<dec>[1-9][0-9]*))\Z")


def _c_number(text: str) -> int | None:
    m = _C_NUMBER.match(text)
    if m is None:
        return None
    if m.group("hex") is not None:
        return int(m.group("hex"), 16)
    if m.group("oct") is not None:
        return int(m.group("oct"), 8)
    return int(m.group("dec"))


def smbios_uuid(text: str) -> str | None:
    """The uuid an ``-smbios`` value sets, if any (lower case).

    hw/smbios/smbios.c smbios_entry_add(): ``file=`` loads a binary table and ignores the rest;
    otherwise only ``type=1`` (the system information) takes ``uuid=``, and it sets the VM's
    uuid as ``-uuid`` does. The QemuOpts have no implied key: a bare first word is a flag, not
    a type. The last of repeated keys counts; ``,,`` is a literal comma.
    """
    o: dict[str, str] = {}
    for part in split_qemu_opts(text):
        k, eq, v = part.partition("=")
        o[k] = v if eq else "on"
    if "file" in o or _c_number(o.get("type", "")) != 1:
        return None
    uuid = o.get("uuid")
    return uuid.lower() if uuid is not None and _UUID.match(uuid) else None


def parse_uuid(cmdline: Sequence[str]) -> str | None:
    """The VM's uuid: from ``-uuid`` or ``-smbios type=1,uuid=...`` (Proxmox uses the latter).

    QEMU applies both as it meets them on the command line, each overwriting the uuid: the
    last one wins, whichever option it came from (checked with query-uuid on QEMU 7.2).
    """
    uuid: str | None = None
    for name, value in options(cmdline):
        if value is None:
            continue
        if name == "uuid":
            uuid = value.lower()
        elif name == "smbios":
            uuid = smbios_uuid(value) or uuid
    return uuid


# --- thread roles -------------------------------------------------------------------
def kvm_run_fd(syscall: str | None, ioctl_nr: int, kvm_run: int) -> int | None:
    """The fd of a KVM_RUN ioctl the thread is blocked in, from /proc/TID/syscall."""
    if not syscall:
        return None
    parts = syscall.split()
    try:
        if len(parts) >= 3 and int(parts[0]) == ioctl_nr and int(parts[2], 16) == kvm_run:
            return int(parts[1], 16)
    except ValueError:
        return None
    return None


def _thread(t: ThreadSnapshot, role: Role, how: str = "name", **kw: object) -> Thread:
    return Thread(tid=t.tid, comm=t.comm, role=role, how=how, processor=t.processor, affinity=t.affinity,
                  utime=t.utime, stime=t.stime, **kw)  # type: ignore[arg-type]


def base_role(t: ThreadSnapshot) -> Thread | None:
    """Role from flags and name alone; None when the name says nothing (no debug-threads)."""
    # Kernel workers attached to the process (kvm-nx-lpage-recovery, vhost since 6.4) carry
    # PF_USER_WORKER; kvm-nx-lpage-re's /proc/TID/syscall shows the registers it was
    # copied from (a vCPU's KVM_RUN), so it must be recognised before looking there.
    if t.flags & (PF_USER_WORKER | PF_KTHREAD) or t.comm.startswith("kvm-nx-lpage"):
        if t.comm.startswith("vhost-"):
            return _thread(t, Role.VHOST, "flags")
        return _thread(t, Role.KERNEL, "flags")
    m = _VCPU_NAME.match(t.comm)
    if m:
        return _thread(t, Role.VCPU, vcpu=int(m.group(1)))
    if t.comm.startswith("IO "):
        ident = t.comm[3:]
        if ident == "mon_iothread":
            return _thread(t, Role.EMULATOR)
        return _thread(t, Role.IOTHREAD, iothread=ident)
    return None


def needs_syscall(snap: ProcessSnapshot) -> list[int]:
    """TIDs whose role can only come from /proc/TID/syscall (qemu without debug-threads)."""
    if any(_VCPU_NAME.match(t.comm) and not t.flags & (PF_USER_WORKER | PF_KTHREAD) for t in snap.threads):
        return []  # named vCPUs (what base_role would say, without making every Thread twice)
    roles = [base_role(t) for t in snap.threads]
    if any(r is not None and r.role is Role.VCPU for r in roles):
        return []
    return [t.tid for t, r in zip(snap.threads, roles, strict=True) if r is None and t.tid != snap.pid]


def classify(
    snap: ProcessSnapshot,
    syscalls: dict[int, str | None] | None = None,
    vcpu_fds: dict[int, int] | None = None,
    ioctl_nr: int = 16,
    kvm_run: int = KVM_RUN_DEFAULT,
    user: str | None = None,
) -> VM:
    """Turn a process snapshot into a VM with a role for every thread (pure)."""
    syscalls = syscalls or {}
    vcpu_fds = vcpu_fds or {}
    name, debug = parse_name(snap.cmdline)
    threads: list[Thread] = []
    pending: list[ThreadSnapshot] = []
    for t in snap.threads:
        r = base_role(t)
        if r is None:
            pending.append(t)
        else:
            threads.append(r)
    found: set[int] = set()
    rest: list[ThreadSnapshot] = []
    for t in pending:
        fd = kvm_run_fd(syscalls.get(t.tid), ioctl_nr, kvm_run)
        if t.tid != snap.pid and fd is not None and fd in vcpu_fds and vcpu_fds[fd] not in found:
            found.add(vcpu_fds[fd])
            threads.append(_thread(t, Role.VCPU, "kvm_run", vcpu=vcpu_fds[fd]))
        else:
            rest.append(t)
    named_vcpus = any(x.role is Role.VCPU and x.how == "name" for x in threads)
    # Without thread names a vCPU that is paused or on a CPU right now looks like any other
    # thread; while some vCPU is unaccounted for, the unnamed threads stay unknown rather
    # than risk pinning a vCPU as an emulator thread. The main thread is never a vCPU.
    # With no kvm-vcpu fds at all (TCG, or fds unreadable) nothing identifies them.
    unsure = not named_vcpus and (not vcpu_fds or bool(set(vcpu_fds.values()) - found))
    for t in rest:
        role = Role.UNKNOWN if unsure and t.tid != snap.pid else Role.EMULATOR
        threads.append(_thread(t, role, "default"))
    threads.sort(key=lambda x: x.tid)
    return VM(
        pid=snap.pid,
        starttime=snap.starttime,
        exe=snap.exe,
        cmdline=snap.cmdline,
        uid=snap.uid,
        user=user,
        name=name,
        uuid=parse_uuid(snap.cmdline),
        smp=parse_smp(snap.cmdline),
        threads=tuple(threads),
        debug_threads=debug,
        vanished_threads=snap.vanished_threads,
    )


# --- executables --------------------------------------------------------------------
def path_matches(path: str, patterns: Iterable[str]) -> bool:
    """Glob match where ``*`` never crosses a ``/``."""
    parts = path.split("/")
    for pat in patterns:
        pp = pat.split("/")
        if len(pp) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pp, strict=True)):
            return True
    return False


@dataclass(frozen=True, slots=True)
class FileFacts:
    """What the executable check looks at in a file's stat."""

    uid: int
    mode: int
    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileFacts:
        return cls(uid=st.st_uid, mode=st.st_mode, dev=st.st_dev, ino=st.st_ino)


class ExeCheck(Protocol):
    """Where :func:`verify_executable` gets its facts from; what they mean it decides alone.

    :class:`HostExeCheck` asks the live system; tests pass one backed by recorded facts.
    """

    def running(self, procfs: Procfs, pid: int) -> FileFacts:
        """The binary the process runs (/proc/PID/exe followed, deleted or not). Raises Vanished."""
        ...

    def at_path(self, path: str) -> FileFacts | None:
        """The file at ``path`` as vcpud resolves it; None when there is none."""
        ...

    def same_mount_ns(self, procfs: Procfs, pid: int) -> bool:
        """Whether the process resolves paths in our (or PID 1's) mount namespace. Raises Vanished."""
        ...


@dataclass(frozen=True, slots=True)
class HostExeCheck:
    """The facts as this host has them: what production uses."""

    def running(self, procfs: Procfs, pid: int) -> FileFacts:
        return FileFacts.of(procfs.exe_stat(pid))

    def at_path(self, path: str) -> FileFacts | None:
        try:
            return FileFacts.of(os.stat(path))
        except OSError:
            return None

    def same_mount_ns(self, procfs: Procfs, pid: int) -> bool:
        return procfs.same_mount_ns(pid)


def verify_executable(procfs: Procfs, pid: int, patterns: Sequence[str],
                      exe_check: ExeCheck | None = None) -> tuple[str | None, str | None]:
    """(exe, None) when the process runs a configured qemu binary, else (exe, reason).

    Raises Vanished. A name or argv[0] proves nothing: /proc/PID/exe must resolve to a
    configured path, the binary must be root-owned and not writable by others, and it
    must be the very file at that path on the host (not a look-alike in another mount
    namespace). A binary replaced on disk by a package upgrade shows as "(deleted)": it
    is accepted when the process shares our mount namespace, where only root could have
    put a root-owned file at that path. ``exe_check`` supplies the file facts (default:
    :class:`HostExeCheck`, the live host).
    """
    check: ExeCheck = exe_check if exe_check is not None else HostExeCheck()
    try:
        exe = procfs.exe(pid)
    except Vanished:
        # Kernel threads have no exe either: only a vanished /proc/PID is a vanished task.
        if procfs.exists(pid):
            return None, "no executable (kernel thread)"
        raise
    except PermissionError:
        return None, UNREADABLE
    except OSError as e:  # kernel threads: ENOENT is Vanished, others have no exe
        return None, str(e)
    deleted = exe.endswith(_DELETED)
    path = exe[: -len(_DELETED)] if deleted else exe
    if not path_matches(path, patterns):
        return exe, "not a configured executable"
    st = check.running(procfs, pid)
    if st.uid != 0 or st.mode & (stat.S_IWGRP | stat.S_IWOTH):
        return exe, "binary not root-owned or writable by others"
    if deleted:
        # The path it ran from is only meaningful if it was resolved in our mount namespace.
        if not check.same_mount_ns(procfs, pid):
            return exe, "deleted binary in another mount namespace"
    else:
        host = check.at_path(path)
        if host is None:
            return exe, "no such file on the host (other mount namespace?)"
        if (host.dev, host.ino) != (st.dev, st.ino):
            return exe, "not the host's file at that path (other mount namespace?)"
    return path, None


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def snapshot_vm(procfs: Procfs, pid: int, exe: str, arch: str | None = None) -> VM:
    """Read one verified VM process from /proc and classify it. Raises Vanished."""
    arch = arch or os.uname().machine
    snap = procfs.process(pid, exe)
    tids = needs_syscall(snap)
    syscalls: dict[int, str | None] = {}
    fds: dict[int, int] = {}
    if tids:
        try:
            fds = procfs.vcpu_fds(pid)
        except PermissionError:
            log.warning("cannot read fds of pid %d: vCPUs without thread names stay unknown", pid)
        if fds:
            for tid in tids:
                try:
                    syscalls[tid] = procfs.syscall_settled(pid, tid)
                except Vanished:
                    pass
    return classify(snap, syscalls, fds, IOCTL_NR.get(arch, 16), KVM_RUN.get(arch, KVM_RUN_DEFAULT),
                    user=user_name(snap.uid))


def shows_guest(procfs: Procfs, vm: VM) -> bool:
    """Whether the process runs a guest yet: a vCPU thread, or a KVM VM fd. Raises Vanished.

    ``qemu -daemonize`` forks, the child calls setsid() and forks again, and only that grandchild
    creates the guest; the first process waits for it to finish initialising and exits, the
    second exits at once. Both carry the same command line, hold neither a /dev/kvm nor a
    ``kvm-vm`` fd, and have no vCPU threads. A guest's process holds ``anon_inode:kvm-vm`` from
    KVM_CREATE_VM on (before its vCPU threads); a TCG guest shows only by its ``CPU N/TCG``
    threads. Unreadable fds count as a guest (what vcpud did before it asked).
    """
    if vm.vcpu_threads():
        return True
    try:
        return "anon_inode:kvm-vm" in procfs.fd_targets(vm.pid).values()
    except PermissionError:
        return True


def refresh_vm(procfs: Procfs, vm: VM) -> VM | None:
    """The same VM with current affinities if nothing else changed, else None. Raises Vanished.

    Cheap path for periodic rescans: same process (start time, executable), same threads
    with the same names, and every role known. Anything else wants a full snapshot.
    """
    if any(t.role is Role.UNKNOWN for t in vm.threads):
        return None
    if procfs.stat(vm.pid).starttime != vm.starttime or procfs.exe(vm.pid).removesuffix(_DELETED) != vm.exe:
        return None
    tids = procfs.tids(vm.pid)
    if tids != [t.tid for t in vm.threads]:
        return None
    threads = []
    for t in vm.threads:
        if procfs.comm(vm.pid, t.tid) != t.comm:
            return None
        threads.append(replace(t, affinity=procfs.affinity(vm.pid, t.tid)))
    return replace(vm, threads=tuple(threads), vanished_threads=0)


def scan(
    procfs: Procfs,
    executables: Sequence[str] = DEFAULT_EXECUTABLES,
    pids: Iterable[int] | None = None,
    exe_check: ExeCheck | None = None,
) -> Scan:
    """Find every VM among ``pids`` (default: all of /proc). Never raises for a vanished task.

    ``exe_check`` supplies the executable facts (default: the live host, see verify_executable).
    """
    vms: list[VM] = []
    rejected: list[Rejected] = []
    errors: list[str] = []
    starting: list[int] = []
    not_vms: list[int] = []
    vanished = unreadable = 0
    for pid in (procfs.pids() if pids is None else pids):
        try:
            exe, why = verify_executable(procfs, pid, executables, exe_check)
            if exe is None:
                if why == UNREADABLE:
                    unreadable += 1  # may be a VM: looked at again
                else:
                    not_vms.append(pid)  # a kernel thread
                continue
            if why is not None:
                not_vms.append(pid)
                if os.path.basename(exe.removesuffix(_DELETED)).startswith(("qemu", "kvm")):
                    rejected.append(Rejected(pid, exe, why))
                continue
            vm = snapshot_vm(procfs, pid, exe)
            vanished += vm.vanished_threads
            if daemonizes(vm.cmdline) and not shows_guest(procfs, vm):
                starting.append(pid)  # one of -daemonize's parents, or the daemon before KVM_CREATE_VM
                continue
            vms.append(vm)
        except Vanished:
            vanished += 1
        except OSError as e:
            errors.append(f"pid {pid}: {e}")
            log.warning("cannot read pid %d: %s", pid, e)
    return Scan(vms=tuple(vms), rejected=tuple(rejected), vanished=vanished, errors=tuple(errors),
                unreadable=unreadable, starting=tuple(starting), not_vms=tuple(not_vms))


def named_thread(procfs: Procfs, pid: int, tid: int, comm: str | None) -> Thread | None:
    """A vCPU or IO thread by the name its COMM event gave it, without reading /proc/TID/stat
    (~100 µs when the loop wakes for it): None for any other name (the flags then tell kernel
    workers apart: vhost and kvm-nx threads are named by the kernel, never ``CPU …``/``IO …``).
    Reads the thread's affinity (one syscall); raises Vanished."""
    if comm is None or not comm.startswith(("CPU ", "IO ")):
        return None
    snap = ThreadSnapshot(tid=tid, comm=comm, state="", flags=0, processor=-1, utime=0, stime=0, starttime=0,
                          affinity=procfs.affinity(pid, tid))
    t = base_role(snap)
    return t if t is not None and t.role in (Role.VCPU, Role.IOTHREAD) else None


def classify_new_thread(vm: VM, t: ThreadSnapshot) -> Thread | None:
    """Role of a thread that appeared in a known VM, from what it shows now (pure).

    None when only a look at the whole process can tell (qemu without thread names).
    """
    r = base_role(t)
    if r is not None:
        return r
    if t.tid == vm.pid or any(x.role is Role.VCPU and x.how == "name" for x in vm.threads):
        return _thread(t, Role.EMULATOR, "default")
    return None
