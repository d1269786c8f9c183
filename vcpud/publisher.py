"""Turns the reconciler's state into what readers see: the immutable Snapshot and the status line."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import MappingProxyType

from . import __version__
from .discovery import Role
from .reconciler import Reconciler
from .vmstate import VMState
from .snapshot import PoolView, Snapshot, ThreadView, VMView
from .vocab import ThreadState


@dataclass(frozen=True, slots=True)
class ConfigInfo:
    """Where the running policy came from, for the status line."""

    loaded_at: str = ""       # HH:MM:SS of the last successful load
    reload_error: str = ""    # why the last reload failed, "" when it did not


def vm_view(st: VMState) -> tuple[VMView, tuple[tuple[int, int, int], ...]]:
    """What readers see of one VM, and its vCPUs pinned to one CPU (pid, tid, cpu)."""
    threads = []
    for t in st.vm.threads:
        a = st.wanted.get(t.tid)
        state = ThreadState.PINNED if a is not None else \
            ThreadState.FAILED if t.tid in st.failed else ThreadState.UNPINNED
        threads.append(ThreadView(role=t.role, cpus=a.cpus if a else t.affinity, state=state, vcpu=t.vcpu))
    vcpus = tuple((st.vm.pid, tid, a.cpus.first()) for tid, a in st.wanted.items()
                  if a.role is Role.VCPU and len(a.cpus) == 1)
    view = VMView(name=st.vm.display_name, uuid=st.vm.uuid or "", policy=st.policy.name if st.policy else "",
                  status=st.status, threads=tuple(threads))
    return view, vcpus


def snapshot(rec: Reconciler) -> Snapshot:
    vms = []
    pinned_vcpus: list[tuple[int, int, int]] = []
    for st in rec.vms.values():
        if st.dirty or st.view is None:
            st.view, st.dirty = vm_view(st), False
        vms.append(st.view[0])
        pinned_vcpus += st.view[1]
    pools = tuple(PoolView(name=p.name, cpus=p.cpus & rec.online, allocated=rec.ledger.held(p.name),
                           exclusive=p.exclusive, waiting=_waiting(rec, p.name))
                  for p in rec.config.pools.values())
    s = rec.stats
    return Snapshot(
        version=__version__, taken_at=time.time(), online=rec.online, vms=tuple(vms), pools=pools,
        pinned_vcpus=tuple(pinned_vcpus),
        pin_operations=MappingProxyType(dict(s.pins)),
        drift_corrections=s.drift_corrections,
        events=MappingProxyType(dict(s.events)),
        pin_latency=s.latency_hist.view(), reconcile_duration=s.reconcile_hist.view(),
        config_last_reload_successful=s.last_reload_ok,
        config_last_reload_success_timestamp=s.last_reload_success,
        rescans=s.rescans, vanished=s.vanished, proc_connector_overruns=s.overruns,
        config_reloads_succeeded=s.reloads_ok, config_reloads_failed=s.reloads_failed,
    )


def _waiting(rec: Reconciler, pool: str) -> int:
    return sum(1 for st in rec.vms.values()
               if st.waiting and st.policy is not None and st.policy.vcpus_rule is not None
               and st.policy.vcpus_rule.pool == pool)


def status_line(rec: Reconciler, info: ConfigInfo) -> str:
    managed = [st for st in rec.vms.values() if st.policy is not None]
    pinned = sum(len(st.wanted) for st in managed)
    failed = sum(len(st.failed) for st in managed)
    line = f"{len(managed)} VMs, {pinned} threads pinned, {failed} failed, policy from {info.loaded_at}"
    waiting = sum(1 for st in managed if st.waiting)
    if waiting:
        line = f"{line}; {waiting} VMs waiting for pool CPUs"
    if info.reload_error:
        line = f"{info.reload_error}; {line}"
    return line
