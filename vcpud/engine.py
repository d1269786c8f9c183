"""`vcpud apply`: one rescan of the reconciler, no loop, and the report it prints from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from .cpuset import CpuSet
from .discovery import ExeCheck, Scan
from .holdings import FileStore, StateStore
from .pinning import AffinityOps, Outcome, PinResult, Router
from .placement import VMPlan, arrival_order
from .procfs import Procfs
from .reconciler import Reconciler, ScanReason

if TYPE_CHECKING:
    from .config import Config
    from .topology import Topology


@dataclass(frozen=True, slots=True)
class VMReport:
    plan: VMPlan
    results: tuple[PinResult, ...]

    @property
    def failed(self) -> tuple[PinResult, ...]:
        return tuple(r for r in self.results if not r.outcome.ok)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.plan.problems

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)


@dataclass(frozen=True, slots=True)
class Report:
    scan: Scan
    vms: tuple[VMReport, ...]

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.vms)


def reconcile(
    config: "Config",
    online: CpuSet,
    procfs: Procfs,
    ops: AffinityOps,
    dry_run: bool = False,
    pids: Iterable[int] | None = None,
    topology: "Topology | None" = None,
    store: StateStore | None = None,
    exe_check: ExeCheck | None = None,
    router: Router | None = None,
) -> Report:
    """Discover VMs (all, or among ``pids``), plan them with ``config`` and apply the plan once.

    The state store is ``config.state_file`` unless given; a dry run reads it and writes nothing.
    """
    if store is None:
        store = FileStore(config.state_file)
    rec = Reconciler(config, online, procfs, ops, store, topology=topology, dry_run=dry_run, exe_check=exe_check,
                     router=router)
    result = rec.rescan(ScanReason.STARTUP, pids)
    by_tid = {r.assignment.tid: r for r in result.pins}
    reports = []
    for vm in arrival_order(st.vm for st in rec.vms.values()):
        st = rec.vms[vm.pid]
        if st.plan is None:
            continue
        reports.append(VMReport(st.plan, tuple(by_tid[a.tid] for a in st.plan.assignments if a.tid in by_tid)))
    return Report(scan=result.scan, vms=tuple(reports))
