"""Cheap second looks at VMs vcpud already knows: which threads came and went, which were moved.

A rescan must not re-read /proc files for every thread of every VM: a thread's name, flags and
role do not change without a proc connector event saying so (COMM, EXIT, FORK), and reading
them costs ~10 µs a thread against 0.6 µs for its affinity. So while events are trusted a known
VM is re-checked by its task list (new and gone threads) and the affinity of each thread;
only new threads are read whole. Without trusted events (no connector, or some were lost) the
careful look also re-reads the start time, the executable and every thread's name
(:func:`vcpud.discovery.refresh_vm`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Mapping

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


def recheck(procfs: Procfs, vm: VM, wanted: dict[int, Assignment], careful: bool) -> Recheck | None:
    """The VM as it is now, or None when only a full read can tell (a new thread whose role
    needs the whole process, threads without a known role, or the careful look saw a change).
    Raises Vanished when the process is gone."""
    if careful:
        fresh = refresh_vm(procfs, vm)
        if fresh is None:
            return None
        return Recheck(vm=fresh, drifted=tuple((wanted[t.tid], t.affinity) for t in fresh.threads
                                               if t.tid in wanted and t.affinity != wanted[t.tid].cpus))
    if any(t.role is Role.UNKNOWN for t in vm.threads):
        return None
    tids = procfs.task_ids(vm.pid)
    new: list[Thread] = []
    drifted: list[tuple[Assignment, CpuSet]] = []
    moved: dict[int, Thread] = {}  # unpinned threads whose affinity changed
    gone: list[int] = []
    for t in vm.threads:
        tid = t.tid
        if tid not in tids:
            gone.append(tid)
            continue
        # The kernel's answer, whoever pinned it (sched_setaffinity, libvirt, a cgroup): one
        # syscall, compared as a set; a CpuSet is made only for what moved.
        try:
            now = procfs.affinity_set(vm.pid, tid)
        except Vanished:
            gone.append(tid)
            continue
        a = wanted.get(tid)
        if a is not None:
            if now != a.cpus.cpus:
                drifted.append((a, CpuSet.of_kernel(now)))
        elif now != t.affinity.cpus:
            moved[tid] = replace(t, affinity=CpuSet.of_kernel(now))  # reports: where it may run
    if len(tids) != len(vm.threads) - len(gone):
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
    return Recheck(vm=vm, new=tuple(new), gone=tuple(gone), drifted=tuple(drifted))


def recheck_all(procfs: Procfs, vms: Mapping[int, "VMState"], careful: bool, stats: "Stats") -> dict[int, Recheck]:
    """A second look at every known VM: pid -> what changed, for those still the same VM (the
    others, gone or to be read whole, are left out)."""
    out: dict[int, Recheck] = {}
    for pid, st in vms.items():
        try:
            r = recheck(procfs, st.vm, st.wanted, careful)
        except Vanished:
            stats.vanished += 1
            continue
        if r is not None:
            out[pid] = r
    return out
