"""Cheap second looks at VMs vcpud already knows: which threads came and went, which were moved.

A rescan must not re-read /proc files for every thread of every VM: a thread's name, flags and
role do not change without a proc connector event saying so (COMM, EXIT, FORK), and reading
them costs ~10 µs a thread against 0.6 µs for its affinity. So while events are trusted a known
VM is re-checked by its task list (new and gone threads) and the affinity of each thread;
only new threads are read whole. Without trusted events (no connector, or some were lost) the
careful look also re-reads the start time, the executable and every thread's name
(:func:`vcpud.discovery.refresh_vm`). A VM whose task list was read while the proc connector's
filter already passed its FORK events is not listed again: every thread since came with a FORK
(a gone one fails its affinity read with ESRCH); it is listed when one of its threads drifted,
so that the pins go to threads seen in the process moments ago.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, AbstractSet, Mapping

from .cpuset import CpuSet
from .discovery import VM, Role, Thread, classify_new_thread, refresh_vm
from .placement import Assignment
from .procfs import Procfs, Vanished

if TYPE_CHECKING:
    from .activity import Stats
    from .vmstate import VMState


@dataclass(frozen=True, slots=True)
class Recheck:
    """What changed in one known VM since the last look."""

    vm: VM                                          # its model now (threads added, removed, moved)
    new: tuple[Thread, ...] = ()                    # threads that appeared (roles known)
    gone: tuple[int, ...] = ()                      # TIDs that exited
    drifted: tuple[tuple[Assignment, CpuSet], ...] = ()  # pinned threads that are elsewhere now: (wanted, now)
    listed: bool = False                            # the task list was read in this look


def recheck(procfs: Procfs, vm: VM, wanted: dict[int, Assignment], careful: bool,
            list_tasks: bool = True) -> Recheck | None:
    """The VM as it is now, or None when only a full read can tell (a new thread whose role
    needs the whole process, threads without a known role, or the careful look saw a change).
    ``list_tasks``: read the task list (new and gone threads) even if none drifted.
    Raises Vanished when the process is gone."""
    if careful:
        fresh = refresh_vm(procfs, vm)
        if fresh is None:
            return None
        return Recheck(vm=fresh, drifted=tuple((wanted[t.tid], t.affinity) for t in fresh.threads
                                               if t.tid in wanted and t.affinity != wanted[t.tid].cpus),
                       listed=True)
    tids = procfs.task_ids(vm.pid) if list_tasks else None
    new: list[Thread] = []
    drifted: list[tuple[Assignment, CpuSet]] = []
    moved: dict[int, Thread] = {}  # unpinned threads whose affinity changed
    gone: list[int] = []
    affinity, want, unknown = procfs.affinity_getter(vm.pid), wanted.get, Role.UNKNOWN
    for t in vm.threads:  # every rescan, every thread: kept lean
        if t.role is unknown:
            return None
        tid = t.tid
        if tids is not None and tid not in tids:
            gone.append(tid)
            continue
        # The kernel's answer, whoever pinned it (sched_setaffinity, libvirt, a cgroup): one
        # syscall, compared as a set; a CpuSet is made only for what moved.
        try:
            now = affinity(tid)
        except (ProcessLookupError, Vanished):
            gone.append(tid)
            continue
        a = want(tid)
        if a is not None:
            if now != a.cpus.cpus:
                drifted.append((a, CpuSet.of_kernel(now)))
        elif now != t.affinity.cpus:
            moved[tid] = replace(t, affinity=CpuSet.of_kernel(now))  # reports: where it may run
    if drifted and tids is None:
        # They are about to be pinned: by TIDs this process's task list holds now.
        tids = procfs.task_ids(vm.pid)
        gone += [a.tid for a, _ in drifted if a.tid not in tids]
        drifted = [(a, now) for a, now in drifted if a.tid in tids]
    if tids is not None and len(tids) != len(vm.threads) - len(gone):
        known = {t.tid for t in vm.threads}
        for tid in sorted(tids - known):
            try:
                snap = procfs.thread(vm.pid, tid)
            except Vanished:
                continue  # came and went between two looks
            role = classify_new_thread(vm, snap)
            if role is None:
                return None
            new.append(role)
    if new or gone or moved:
        dead = set(gone)
        kept = [moved.get(t.tid, t) for t in vm.threads if t.tid not in dead]
        vm = replace(vm, threads=tuple(sorted(kept + new, key=lambda t: t.tid)), vanished_threads=0)
    return Recheck(vm=vm, new=tuple(new), gone=tuple(gone), drifted=tuple(drifted), listed=tids is not None)


class Coverage:
    """Which VMs' task lists a rescan need not read: those read while the caller's proc connector
    filter already passed their FORK events (the listing saw what came before, events tell what
    came after). A VM not yet watched, or forgotten, is listed again."""

    def __init__(self) -> None:
        self.watching: frozenset[int] = frozenset()  # what the filter passes (the caller's word)
        self.covered: set[int] = set()

    def watch(self, pids: AbstractSet[int]) -> frozenset[int]:
        self.watching = frozenset(pids)
        return self.watching

    def forget(self, pid: int) -> None:
        self.covered.discard(pid)


def recheck_all(procfs: Procfs, vms: Mapping[int, "VMState"], careful: bool, stats: "Stats",
                coverage: Coverage | None = None) -> dict[int, Recheck]:
    """A second look at every known VM: pid -> what changed, for those still the same VM (the
    others, gone or to be read whole, are left out). ``coverage``: which task lists to read."""
    covered = coverage.covered if coverage is not None else set()
    out: dict[int, Recheck] = {}
    for pid, st in vms.items():
        try:
            r = recheck(procfs, st.vm, st.wanted, careful, pid not in covered)
        except Vanished:
            stats.vanished += 1
            continue
        if r is not None:
            out[pid] = r
    if coverage is not None:
        coverage.covered |= {pid for pid, r in out.items() if r.listed} & coverage.watching
    return out
