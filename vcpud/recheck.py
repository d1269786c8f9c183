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
from .pinning import AffinityOps, Router
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


def recheck(procfs: Procfs, vm: VM, wanted: dict[int, Assignment], ops: AffinityOps,
            careful: bool) -> Recheck | None:
    """The VM as it is now, or None when only a full read can tell (a new thread whose role
    needs the whole process, threads without a known role, or the careful look saw a change).
    Raises Vanished when the process is gone."""
    if careful:
        fresh = refresh_vm(procfs, vm)
        if fresh is None:
            return None
        return Recheck(vm=fresh, drifted=_drifted(fresh, wanted, ops))
    if any(t.role is Role.UNKNOWN for t in vm.threads):
        return None
    tids = procfs.tids(vm.pid)
    known = {t.tid: t for t in vm.threads}
    threads: list[Thread] = []
    new: list[Thread] = []
    changed = len(tids) != len(known)
    for tid in tids:
        t = known.get(tid)
        if t is None:
            try:
                snap = procfs.thread(vm.pid, tid)
            except Vanished:
                continue  # came and went between two looks
            t = classify_new_thread(vm, snap)
            if t is None:
                return None
            new.append(t)
            changed = True
        elif tid not in wanted:
            # Unpinned threads keep what they show now (reports: where it may run).
            try:
                now = procfs.affinity(vm.pid, tid)
            except Vanished:
                changed = True
                continue
            if now != t.affinity:
                t = replace(t, affinity=now)
                changed = True
        threads.append(t)
    seen = {t.tid for t in threads}
    gone = tuple(tid for tid in known if tid not in seen)
    if changed or gone:
        vm = replace(vm, threads=tuple(threads), vanished_threads=0)
    return Recheck(vm=vm, new=tuple(new), gone=gone, drifted=_drifted(vm, wanted, ops, seen))


def recheck_all(procfs: Procfs, vms: Mapping[int, "VMState"], router: Router, careful: bool,
                stats: "Stats") -> dict[int, Recheck]:
    """A second look at every known VM: pid -> what changed, for those still the same VM (the
    others, gone or to be read whole, are left out)."""
    out: dict[int, Recheck] = {}
    for pid, st in vms.items():
        try:
            r = recheck(procfs, st.vm, st.wanted, router.ops_for(st.vm), careful)
        except Vanished:
            stats.vanished += 1
            continue
        if r is not None:
            out[pid] = r
    return out


def _drifted(vm: VM, wanted: dict[int, Assignment], ops: AffinityOps,
             alive: set[int] | None = None) -> tuple[tuple[Assignment, CpuSet], ...]:
    """Pinned threads no longer allowed exactly where they were pinned (someone ran taskset)."""
    out = []
    for tid, a in wanted.items():
        if alive is not None and tid not in alive:
            continue
        try:
            now = ops.get(tid)
        except OSError:
            continue  # exited since the task list was read: its EXIT event or the next look says so
        if now != a.cpus:
            out.append((a, now))
    return tuple(out)
