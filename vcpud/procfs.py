"""Thin readers of /proc rooted at a path; a process or thread that is gone raises Vanished."""

from __future__ import annotations

import errno
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .cpuset import CpuSet

log = logging.getLogger(__name__)

# errno values meaning "that task is gone" when reading /proc/PID/...: the directory
# vanished (ENOENT), the task exited between open and read (ESRCH), or we raced a
# zombie whose mm is gone (EACCES/EPERM can't be told apart from a real permission
# problem, so they are not in this list).
_GONE = {errno.ENOENT, errno.ESRCH}

# task flags from include/linux/sched.h
PF_KTHREAD = 0x00200000
PF_USER_WORKER = 0x00004000  # kernel-created thread inside a user process (vhost, kvm-nx-lpage-recovery)


# The most vcpud reads of one /proc file: a cmdline is at most ARG_MAX (2 MiB by default, a quarter
# of the stack limit); no stat, status or comm comes near.
READ_LIMIT = 4 << 20


class Vanished(Exception):
    """The process or thread went away while being read."""


@contextmanager
def _vanishing(what: object) -> Iterator[None]:
    """Turn "that task is gone" errors into Vanished."""
    try:
        yield
    except OSError as e:
        if e.errno in _GONE:
            raise Vanished(str(what)) from None
        raise


@dataclass(frozen=True, slots=True)
class ThreadSnapshot:
    tid: int
    comm: str
    state: str
    flags: int
    processor: int
    utime: int
    stime: int
    starttime: int
    affinity: CpuSet


@dataclass(frozen=True, slots=True)
class ProcessSnapshot:
    pid: int
    starttime: int
    comm: str
    exe: str
    cmdline: tuple[str, ...]
    uid: int
    threads: tuple[ThreadSnapshot, ...]
    vanished_threads: int = 0


@dataclass(frozen=True, slots=True)
class StatFields:
    comm: str
    state: str
    ppid: int
    flags: int
    utime: int
    stime: int
    starttime: int
    processor: int


def parse_stat(text: str) -> StatFields:
    # comm may itself contain spaces and parentheses: it ends at the LAST ')'.
    lpar = text.index("(")
    rpar = text.rindex(")")
    comm = text[lpar + 1 : rpar]
    rest = text[rpar + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3]
    return StatFields(
        comm=comm,
        state=rest[0],
        ppid=int(rest[1]),
        flags=int(rest[6]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        starttime=int(rest[19]),
        processor=int(rest[36]),
    )


def parse_status(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k] = v.strip()
    return out


class Procfs:
    """Reads one /proc tree. Every method raises Vanished when its task is gone."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = Path(root)
        # Plain strings: a rescan builds tens of thousands of these paths, and pathlib
        # costs more than the reads themselves.
        self._r = str(self.root)
        # On the live /proc a thread's affinity is one syscall away; formatting
        # /proc/TID/status for it costs ten times that.
        self._live = os.path.realpath(self._r) == "/proc"

    # --- primitive readers ------------------------------------------------------
    def _read(self, path: str) -> str:
        # os.open/os.read: a rescan reads thousands of these, and a Python file object costs
        # more than the kernel's work. The loop bounds the read (a /proc file is never endless).
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in _GONE:
                raise Vanished(path) from None
            raise
        try:
            chunks = []
            total = 0
            while total < READ_LIMIT:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except OSError as e:
            if e.errno in _GONE:
                raise Vanished(path) from None
            raise
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8", "replace")

    def _readlink(self, path: str) -> str:
        with _vanishing(path):
            return os.readlink(path)

    def _listdir(self, path: str) -> list[str]:
        with _vanishing(path):
            return os.listdir(path)

    def _task(self, pid: int, tid: int | None) -> str:
        return f"{self._r}/{pid}" if tid is None else f"{self._r}/{pid}/task/{tid}"

    def pids(self) -> list[int]:
        # /proc/TID of a thread that is not a group leader can be opened but is not listed.
        # A copied tree (tests/proctree.py) models those as symlinks to PID/task/TID: they
        # are skipped here. On the real /proc readdir's d_type says DT_DIR: no extra syscall.
        with os.scandir(self._r) as it:
            return sorted(int(e.name) for e in it if e.name.isdigit() and not e.is_symlink())

    def exists(self, pid: int) -> bool:
        return os.path.exists(f"{self._r}/{pid}")

    def tids(self, pid: int) -> list[int]:
        return sorted(self.task_ids(pid))

    def task_ids(self, pid: int) -> set[int]:
        """The process's TIDs, unordered (what a re-check compares with what it knows)."""
        return {int(n) for n in self._listdir(f"{self._r}/{pid}/task") if n.isdigit()}

    def exe(self, pid: int) -> str:
        return self._readlink(f"{self._r}/{pid}/exe")

    def exe_stat(self, pid: int) -> os.stat_result:
        """stat of the running binary itself (works even when it was deleted on disk)."""
        with _vanishing(pid):
            return os.stat(f"{self._r}/{pid}/exe")

    def same_mount_ns(self, pid: int) -> bool:
        """Whether the process resolves paths in our mount namespace or the host's (PID 1's).

        Under systemd's sandboxing (ProtectSystem=, PrivateTmp=...) vcpud itself runs in a
        private mount namespace whose files are the host's: the VMs live in PID 1's.
        """
        try:
            theirs = os.stat(f"{self._r}/{pid}/ns/mnt")
        except OSError as e:
            if e.errno in _GONE:
                raise Vanished(str(pid)) from None
            return False
        for ref in ("self", "1"):
            try:
                ours = os.stat(f"{self._r}/{ref}/ns/mnt")
            except OSError:
                continue
            if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
                return True
        return False

    def cmdline(self, pid: int) -> tuple[str, ...]:
        raw = self._read(f"{self._r}/{pid}/cmdline")
        return tuple(raw.split("\0")[:-1]) if raw.endswith("\0") else tuple(raw.split("\0"))

    def stat(self, pid: int, tid: int | None = None) -> StatFields:
        p = self._task(pid, tid) + "/stat"
        text = self._read(p)
        if not text:
            raise Vanished(p)
        return parse_stat(text)

    def status(self, pid: int, tid: int | None = None) -> dict[str, str]:
        return parse_status(self._read(self._task(pid, tid) + "/status"))

    def comm(self, pid: int, tid: int) -> str:
        return self._read(f"{self._r}/{pid}/task/{tid}/comm").rstrip("\n")

    def affinity_getter(self, pid: int) -> Callable[[int], frozenset[int] | set[int]]:
        """TID -> the CPUs it may run on, as the kernel gives them, for the threads of ``pid`` (a
        re-check of thousands of threads compares these with what it pinned). Raises
        ProcessLookupError or Vanished for a thread that is gone."""
        if self._live:
            return os.sched_getaffinity
        return lambda tid: self.affinity(pid, tid).cpus

    def affinity(self, pid: int, tid: int) -> CpuSet:
        if self._live:
            try:
                return CpuSet.of_kernel(os.sched_getaffinity(tid))
            except ProcessLookupError:
                raise Vanished(str(tid)) from None
        cal = self.status(pid, tid).get("Cpus_allowed_list")
        return CpuSet.parse(cal) if cal else CpuSet()

    def runtime_ns(self, pid: int, tid: int) -> int:
        """Nanoseconds the thread has spent on a CPU since it started (schedstat's first field)."""
        text = self._read(f"{self._r}/{pid}/task/{tid}/schedstat")
        try:
            return int(text.split()[0])
        except (ValueError, IndexError):
            raise Vanished(str(tid)) from None  # empty: a zombie's

    def syscall(self, pid: int, tid: int) -> str:
        return self._read(f"{self._r}/{pid}/task/{tid}/syscall").strip()

    def tgid(self, tid: int) -> int:
        """The process a TID belongs to (uevents and netlink may name a thread)."""
        return int(self.status(tid)["Tgid"])

    def fd_targets(self, pid: int) -> dict[int, str]:
        d = f"{self._r}/{pid}/fd"
        out: dict[int, str] = {}
        for name in self._listdir(d):
            try:
                out[int(name)] = os.readlink(f"{d}/{name}")
            except OSError:
                continue  # fd closed between listdir and readlink
        return out

    # --- snapshots --------------------------------------------------------------
    def thread(self, pid: int, tid: int) -> ThreadSnapshot:
        """Snapshot one thread (its syscall is read separately, only where needed)."""
        st = self.stat(pid, tid)
        return ThreadSnapshot(
            tid=tid,
            comm=st.comm,
            state=st.state,
            flags=st.flags,
            processor=st.processor,
            utime=st.utime,
            stime=st.stime,
            starttime=st.starttime,
            affinity=self.affinity(pid, tid),
        )

    def syscall_settled(self, pid: int, tid: int, tries: int = 25, pause: float = 0.004) -> str | None:
        """Read /proc/TID/syscall, retrying while the thread is on a CPU.

        The kernel answers "running" for a task that is on-CPU at that instant; a busy
        vCPU spends its time in guest mode, so a few short retries usually catch it
        back inside the KVM_RUN ioctl. Returns None if it never settles.
        """
        try:
            for _ in range(tries):
                text = self.syscall(pid, tid)
                if text != "running":
                    return text
                time.sleep(pause)
        except PermissionError:
            log.debug("no permission to read syscall of %d/%d", pid, tid)
            return None
        return None

    def vcpu_fds(self, pid: int) -> dict[int, int]:
        """fd -> vCPU index for every ``anon_inode:kvm-vcpu:N`` the process holds."""
        prefix = "anon_inode:kvm-vcpu:"
        out: dict[int, int] = {}
        for fd, target in self.fd_targets(pid).items():
            if target.startswith(prefix) and target[len(prefix):].isdigit():
                out[fd] = int(target[len(prefix):])
        return out

    def process(self, pid: int, exe: str) -> ProcessSnapshot:
        """Snapshot a process and all its threads; threads that vanish meanwhile are counted."""
        st = self.stat(pid)
        status = self.status(pid)
        uid = int(status["Uid"].split()[0])
        cmdline = self.cmdline(pid)
        threads: list[ThreadSnapshot] = []
        vanished = 0
        for tid in self.tids(pid):
            try:
                threads.append(self.thread(pid, tid))
            except Vanished:
                vanished += 1
        if not threads:
            raise Vanished(str(pid))
        return ProcessSnapshot(
            pid=pid,
            starttime=st.starttime,
            comm=st.comm,
            exe=exe,
            cmdline=cmdline,
            uid=uid,
            threads=tuple(threads),
            vanished_threads=vanished,
        )
