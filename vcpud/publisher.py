"""Turns the reconciler's state into what readers see: the immutable Snapshot and the status line."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import MappingProxyType

from . import __version__
from .reconciler import Reconciler
from .snapshot import PoolView, Snapshot, ThreadView, VMView
from .vocab import ThreadState


@dataclass(frozen=True, slots=True)
class ConfigInfo:
    """Where the running policy came from, for the status line."""

    loaded_at: str = ""       # HH:MM:SS of the last successful load
    reload_error: str = ""    # why the last reload failed, "" when it did not


def snapshot(rec: Reconciler) -> Snapshot:
    vms = []
    for st in rec.vms.values():
        threads = []
        for t in st.vm.threads:
            a = st.wanted.get(t.tid)
            state = ThreadState.PINNED if a is not None else \
                ThreadState.FAILED if t.tid in st.failed else ThreadState.UNPINNED
            threads.append(ThreadView(role=t.role, cpus=a.cpus if a else t.affinity, state=state,
                                      vcpu=t.vcpu))
        vms.append(VMView(name=st.vm.display_name, uuid=st.vm.uuid or "", policy=st.policy.name if st.policy else "",
                          status=st.status, threads=tuple(threads)))
    pools = tuple(PoolView(name=p.name, cpus=p.cpus & rec.online, allocated=rec.ledger.held(p.name),
                           exclusive=p.exclusive, waiting=_waiting(rec, p.name))
                  for p in rec.config.pools.values())
    s = rec.stats
    return Snapshot(
        version=__version__, taken_at=time.time(), online=rec.online, vms=tuple(vms), pools=pools,
        vcpu_seconds=MappingProxyType(dict(s.vcpu_seconds)),
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
