"""Captured /proc trees for unit tests: the text archive format, loading it, and editing the loaded tree.

Archive (``tests/fixtures/proc.ttar``, written by ``tests/fixtures/capture.py``), like
prometheus/procfs's ttar but smaller. Entries follow one another; ``#`` lines and blank lines
between entries are comments::

    Fixture: named 4140                  which process plays which part
    Path: 4140/stat                      a file under the /proc root
    Lines: 1                             N lines follow, each ending in "\\n" ...
    4140 (qemu-system-x86) S 1 ...
    Path: 4140/cmdline
    Lines: 12 nul                        ... or, with "nul", each ending in "\\0" (argv)
    qemu-system-x86_64
    Path: 4140/fd/12
    SymlinkTo: anon_inode:kvm-vcpu:0     a symlink (exe, fd/N, ns/mnt, self/ns/mnt)
    Path: 4140/exe
    SymlinkTo: /usr/bin/qemu-system-x86_64
    Stat: uid=0 mode=0o100755 dev=2049 ino=1234   the running binary (stat of /proc/PID/exe)
    Host: /usr/bin/qemu-system-x86_64    the file at that path as vcpud sees it on the host
    Stat: uid=0 mode=0o100755 dev=2049 ino=1234

:func:`load` unpacks it into a directory that :class:`vcpud.procfs.Procfs` reads; the recorded
file facts go to sidecar files there (``PID/.exe-facts``, ``.host-facts``) that only
:class:`RecordedExeCheck` reads. :class:`ProcTree` then edits the tree the way the kernel would
change /proc, for tests driven by sequences of events.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Mapping

from vcpud.discovery import FileFacts
from vcpud.procfs import PF_KTHREAD, PF_USER_WORKER, Procfs, Vanished

ARCHIVE = Path(__file__).resolve().parent / "fixtures" / "proc.ttar"
TASK_COMM_LEN = 16  # include/linux/sched.h: comm holds 15 bytes and a NUL; longer names are cut


# --- the archive format ---------------------------------------------------------------------
def format_facts(f: FileFacts) -> str:
    return f"uid={f.uid} mode={f.mode:#o} dev={f.dev} ino={f.ino}"


def parse_facts(text: str) -> FileFacts:
    kv = dict(part.split("=", 1) for part in text.split())
    return FileFacts(uid=int(kv["uid"], 0), mode=int(kv["mode"], 0), dev=int(kv["dev"], 0), ino=int(kv["ino"], 0))


def _encode(data: bytes, path: str) -> list[str]:
    """Content as header + lines; raises for anything the two line forms cannot carry exactly."""
    text = data.decode("utf-8")
    if not text:
        return ["Lines: 0"]
    if text.endswith("\n") and "\0" not in text:
        lines, suffix = text[:-1].split("\n"), ""
    elif text.endswith("\0") and "\n" not in text:
        lines, suffix = text[:-1].split("\0"), " nul"
    else:
        raise ValueError(f"{path}: neither newline- nor NUL-terminated lines: {text[:60]!r}")
    return [f"Lines: {len(lines)}{suffix}", *lines]


@dataclass
class ArchiveWriter:
    """Builds an archive's text, entry by entry (used by the capture script)."""

    out: list[str] = field(default_factory=list)

    def comment(self, text: str) -> None:
        self.out.append(f"# {text}")

    def fixture(self, name: str, pid: int) -> None:
        self.out.append(f"Fixture: {name} {pid}")

    def file(self, path: str, data: bytes) -> None:
        self.out += [f"Path: {path}", *_encode(data, path)]

    def symlink(self, path: str, target: str, facts: FileFacts | None = None) -> None:
        self.out += [f"Path: {path}", f"SymlinkTo: {target}"]
        if facts is not None:
            self.out.append(f"Stat: {format_facts(facts)}")

    def host(self, path: str, facts: FileFacts) -> None:
        self.out += [f"Host: {path}", f"Stat: {format_facts(facts)}"]

    def text(self) -> str:
        return "".join(line + "\n" for line in self.out)


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    content: bytes | None = None      # a regular file
    symlink: str | None = None        # or a symlink
    facts: FileFacts | None = None    # for exe links: the running binary


@dataclass(frozen=True, slots=True)
class Archive:
    entries: tuple[Entry, ...]
    fixtures: Mapping[str, int]
    host: Mapping[str, FileFacts]


def parse_archive(text: str) -> Archive:
    lines = text.split("\n")
    entries: list[Entry] = []
    fixtures: dict[str, int] = {}
    host: dict[str, FileFacts] = {}
    i = 0

    def take(key: str) -> str:
        nonlocal i
        if i >= len(lines) or not lines[i].startswith(key + ": "):
            raise ValueError(f"line {i + 1}: expected {key!r}, got {lines[i] if i < len(lines) else 'EOF'!r}")
        i += 1
        return lines[i - 1][len(key) + 2:]

    while i < len(lines):
        line = lines[i]
        if not line or line.startswith("#"):
            i += 1
        elif line.startswith("Fixture: "):
            name, pid = take("Fixture").split()
            fixtures[name] = int(pid)
        elif line.startswith("Host: "):
            path = take("Host")
            host[path] = parse_facts(take("Stat"))
        else:
            path = take("Path")
            p = PurePosixPath(path)
            if p.is_absolute() or ".." in p.parts:
                raise ValueError(f"line {i}: path outside the tree: {path}")
            if lines[i].startswith("SymlinkTo: "):
                target = take("SymlinkTo")
                facts = parse_facts(take("Stat")) if i < len(lines) and lines[i].startswith("Stat: ") else None
                entries.append(Entry(path, symlink=target, facts=facts))
            else:
                count, _, how = take("Lines").partition(" ")
                n = int(count)
                end = "\0" if how == "nul" else "\n"
                entries.append(Entry(path, content="".join(x + end for x in lines[i:i + n]).encode()))
                i += n
    return Archive(tuple(entries), fixtures, host)


# --- the loaded tree ------------------------------------------------------------------------
EXE_FACTS = ".exe-facts"    # PID/.exe-facts: stat facts of the binary the process runs
HOST_FACTS = ".host-facts"  # one "PATH<TAB>facts" line per host file


def load(root: Path, archive: Path = ARCHIVE) -> ProcTree:
    """Unpack ``archive`` into the empty or new directory ``root``; return the tree."""
    a = parse_archive(archive.read_text())
    root.mkdir(parents=True, exist_ok=True)
    for e in a.entries:
        dst = root / e.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        if e.symlink is not None:
            dst.symlink_to(e.symlink)
            if e.facts is not None:
                (dst.parent / EXE_FACTS).write_text(format_facts(e.facts) + "\n")
        else:
            assert e.content is not None
            dst.write_bytes(e.content)
    tree = ProcTree(root, a.fixtures)
    tree.set_host_files(a.host)
    for pid in tree.procfs().pids():
        for tid in tree.procfs().tids(pid):
            tree._link_thread(pid, tid)
    return tree


@dataclass(frozen=True, slots=True)
class RecordedExeCheck:
    """:class:`vcpud.discovery.ExeCheck` over the facts recorded in a loaded tree."""

    root: Path

    def running(self, procfs: Procfs, pid: int) -> FileFacts:
        try:
            return parse_facts((self.root / str(pid) / EXE_FACTS).read_text())
        except FileNotFoundError:
            if not (self.root / str(pid)).is_dir():
                raise Vanished(str(pid)) from None
            raise

    def at_path(self, path: str) -> FileFacts | None:
        return _read_host(self.root).get(path)

    def same_mount_ns(self, procfs: Procfs, pid: int) -> bool:
        # The link reads "mnt:[INODE]": the nsfs inode that Procfs.same_mount_ns compares by stat().
        try:
            theirs = os.readlink(self.root / str(pid) / "ns" / "mnt")
        except FileNotFoundError:
            raise Vanished(str(pid)) from None
        return theirs == os.readlink(self.root / "self" / "ns" / "mnt")


def _read_host(root: Path) -> dict[str, FileFacts]:
    out: dict[str, FileFacts] = {}
    for line in (root / HOST_FACTS).read_text().splitlines():
        path, _, facts = line.partition("\t")
        out[path] = parse_facts(facts)
    return out


def _set_field(text: str, key: str, value: str) -> str:
    """Replace ``key:<TAB>...`` lines of a status file (absent keys stay absent)."""
    return re.sub(rf"^{re.escape(key)}:\t.*$", lambda _: f"{key}:\t{value}", text, flags=re.M)


def _edit_stat(text: str, tid: int | None = None, comm: str | None = None, starttime: int | None = None) -> str:
    lpar, rpar = text.index("("), text.rindex(")")
    head, name, rest = text[:lpar], text[lpar + 1:rpar], text[rpar + 2:].split(" ")
    if starttime is not None:
        rest[19] = str(starttime)  # field 22; rest[0] is field 3
    return f"{tid if tid is not None else head.strip()} ({comm if comm is not None else name}) {' '.join(rest)}"


def _mask(cpus: list[int], like: str) -> str:
    """A cpumask as /proc prints it (%*pb): hex, 32-bit groups joined by commas, nr_cpu_ids wide."""
    digits = len(like.replace(",", ""))
    value = sum(1 << c for c in cpus)
    if value >> (4 * digits):
        raise ValueError(f"CPUs {cpus} beyond the {4 * digits} this tree knows")
    h = f"{value:0{digits}x}"
    groups = [h[max(0, k - 8):k] for k in range(len(h), 0, -8)]
    return ",".join(reversed(groups))


@dataclass(frozen=True, slots=True)
class ProcTree:
    """A /proc tree on disk (from :func:`load`) and the edits the kernel would make to it.

    Thread files edited: task/TID/{stat,status,comm,syscall}; a thread that is the process's
    main thread has its edits mirrored to PID/{stat,status,comm}, as /proc shows them. Thread
    counts (status Threads:, stat field 20) are not kept up to date: vcpud reads neither.
    """

    root: Path
    fixtures: Mapping[str, int]

    def procfs(self) -> Procfs:
        return Procfs(self.root)

    def exe_check(self) -> RecordedExeCheck:
        return RecordedExeCheck(self.root)

    def pid(self, fixture: str) -> int:
        """The pid of a named fixture process (named, unnamed, deleted, lookalike, shell)."""
        return self.fixtures[fixture]

    def tid_by_comm(self, pid: int, comm: str) -> int:
        """The one thread of ``pid`` named ``comm``."""
        fs = self.procfs()
        (tid,) = [t for t in fs.tids(pid) if fs.comm(pid, t) == comm]
        return tid

    # --- threads ----------------------------------------------------------------------------
    def add_thread(self, pid: int, tid: int, comm: str, syscall: str | None = None, like: int | None = None,
                   starttime: int | None = None) -> None:
        """A new thread: a copy of thread ``like`` (default: the last ordinary non-main thread)
        with a new tid, name, and syscall line (default: like's)."""
        task = self.root / str(pid) / "task"
        if (task / str(tid)).exists() or (self.root / str(tid)).exists():
            raise ValueError(f"tid {tid} is taken")
        if like is None:
            fs = self.procfs()
            ordinary = [t for t in fs.tids(pid)
                        if t != pid and not fs.stat(pid, t).flags & (PF_USER_WORKER | PF_KTHREAD)]
            like = ordinary[-1] if ordinary else pid
        shutil.copytree(task / str(like), task / str(tid), symlinks=True)
        d = task / str(tid)
        (d / "stat").write_text(_edit_stat((d / "stat").read_text(), tid=tid, starttime=starttime))
        status = (d / "status").read_text()
        for key in ("Pid", "NSpid"):
            status = _set_field(status, key, str(tid))
        (d / "status").write_text(status)
        if syscall is not None:
            (d / "syscall").write_text(syscall.rstrip("\n") + "\n")
        self.rename_thread(pid, tid, comm)
        self._link_thread(pid, tid)

    def rename_thread(self, pid: int, tid: int, comm: str) -> None:
        """What prctl(PR_SET_NAME)/pthread_setname_np does (the name is cut to 15 bytes)."""
        comm = comm.encode()[:TASK_COMM_LEN - 1].decode(errors="ignore")
        for d in self._dirs(pid, tid):
            (d / "stat").write_text(_edit_stat((d / "stat").read_text(), comm=comm))
            (d / "status").write_text(_set_field((d / "status").read_text(), "Name", comm))
            (d / "comm").write_text(comm + "\n")

    def set_syscall(self, pid: int, tid: int, text: str) -> None:
        """What task/TID/syscall says: ``running``, or ``NR ARG1 ... SP PC`` in hex."""
        (self.root / str(pid) / "task" / str(tid) / "syscall").write_text(text.rstrip("\n") + "\n")

    def set_affinity(self, pid: int, tid: int, cpus: list[int]) -> None:
        """What sched_setaffinity does to Cpus_allowed / Cpus_allowed_list."""
        from vcpud.cpuset import CpuSet

        listed = str(CpuSet.of(cpus))
        for d in self._dirs(pid, tid):
            status = (d / "status").read_text()
            like = re.search(r"^Cpus_allowed:\t(.*)$", status, re.M)
            if like:
                status = _set_field(status, "Cpus_allowed", _mask(sorted(cpus), like.group(1)))
            (d / "status").write_text(_set_field(status, "Cpus_allowed_list", listed))

    def remove_thread(self, pid: int, tid: int) -> None:
        """The thread exited (a main thread cannot: remove the process)."""
        if tid == pid:
            raise ValueError("the main thread leaves with its process: use remove_process")
        shutil.rmtree(self.root / str(pid) / "task" / str(tid))
        (self.root / str(tid)).unlink(missing_ok=True)

    # --- processes --------------------------------------------------------------------------
    def remove_process(self, pid: int) -> None:
        for tid in self.procfs().tids(pid):
            if tid != pid:
                (self.root / str(tid)).unlink(missing_ok=True)
        shutil.rmtree(self.root / str(pid))

    def clone_process(self, pid: int, new_pid: int | None = None, starttime: int | None = None) -> dict[int, int]:
        """The same VM again as another process: tids shifted by ``new_pid - pid``, a new start time
        (default: 100 ticks later). ``new_pid`` defaults to ``pid``: the old process is replaced,
        as after PID reuse. Returns old tid -> new tid."""
        new_pid = pid if new_pid is None else new_pid
        fs = self.procfs()
        old_start = fs.stat(pid).starttime
        starttime = old_start + 100 if starttime is None else starttime
        if new_pid == pid and starttime == old_start:
            raise ValueError("a reused pid needs another start time")
        tids = {t: new_pid + (t - pid) for t in fs.tids(pid)}
        tmp = self.root / f".clone-{new_pid}"
        shutil.copytree(self.root / str(pid), tmp, symlinks=True)
        for old, new in tids.items():
            (tmp / "task" / str(old)).rename(tmp / "task" / f".{new}")
        for new in tids.values():
            (tmp / "task" / f".{new}").rename(tmp / "task" / str(new))
            d = tmp / "task" / str(new)
            self._renumber(d, new, new_pid, starttime)
        self._renumber(tmp, new_pid, new_pid, starttime)
        if new_pid == pid:
            self.remove_process(pid)
        elif (self.root / str(new_pid)).exists():
            shutil.rmtree(tmp)
            raise ValueError(f"pid {new_pid} is taken")
        tmp.rename(self.root / str(new_pid))
        for new in tids.values():
            self._link_thread(new_pid, new)
        # A vhost worker is named after the thread that asked for it (qemu's main thread).
        for new in tids.values():
            if fs.comm(new_pid, new) == f"vhost-{pid}":
                self.rename_thread(new_pid, new, f"vhost-{new_pid}")
        return tids

    def set_exe(self, pid: int, target: str, facts: FileFacts | None = None) -> None:
        """Point /proc/PID/exe elsewhere (and, given ``facts``, at another file)."""
        link = self.root / str(pid) / "exe"
        link.unlink()
        link.symlink_to(target)
        if facts is not None:
            (self.root / str(pid) / EXE_FACTS).write_text(format_facts(facts) + "\n")

    def set_mount_ns(self, pid: int, target: str) -> None:
        """Point /proc/PID/ns/mnt at another namespace (``mnt:[INODE]``)."""
        link = self.root / str(pid) / "ns" / "mnt"
        link.unlink()
        link.symlink_to(target)

    def set_host_files(self, files: Mapping[str, FileFacts | None]) -> None:
        """Replace what the host has at each path (None: nothing there), e.g. a package upgrade."""
        path = self.root / HOST_FACTS
        current = _read_host(self.root) if path.exists() else {}
        for p, f in files.items():
            if f is None:
                current.pop(p, None)
            else:
                current[p] = f
        path.write_text("".join(f"{p}\t{format_facts(f)}\n" for p, f in sorted(current.items())))

    # --- internals --------------------------------------------------------------------------
    def _dirs(self, pid: int, tid: int) -> list[Path]:
        d = self.root / str(pid) / "task" / str(tid)
        if not d.is_dir():
            raise ValueError(f"no thread {tid} in {pid}")
        return [d, self.root / str(pid)] if tid == pid else [d]

    def _link_thread(self, pid: int, tid: int) -> None:
        # /proc/TID opens for every thread, though only group leaders are listed:
        # Procfs.tgid() reads /proc/TID/status for thread ids from netlink and uevents.
        if tid != pid:
            link = self.root / str(tid)
            link.unlink(missing_ok=True)
            link.symlink_to(f"{pid}/task/{tid}")

    @staticmethod
    def _renumber(d: Path, tid: int, pid: int, starttime: int) -> None:
        (d / "stat").write_text(_edit_stat((d / "stat").read_text(), tid=tid, starttime=starttime))
        status = (d / "status").read_text()
        for key, value in (("Pid", tid), ("NSpid", tid), ("Tgid", pid), ("NStgid", pid)):
            status = _set_field(status, key, str(value))
        (d / "status").write_text(status)

