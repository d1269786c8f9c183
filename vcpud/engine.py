"""One reconcile pass: scan /proc, match policies, plan, pin. The CLI and the daemon share it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from .cpuset import CpuSet
from .discovery import Scan, scan
from .pinning import AffinityOps, Outcome, PinResult, apply
from .placement import Plan, VMPlan, plan
from .procfs import Procfs

if TYPE_CHECKING:
    from .policy import Config

log = logging.getLogger(__name__)


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
    plan: Plan
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
) -> Report:
    """Discover VMs (all, or among ``pids``), plan them with ``config`` and apply the plan."""
    found = scan(procfs, config.executables, pids)
    for r in found.rejected:
        log.debug("pid %d runs %s: not a VM (%s)", r.pid, r.exe, r.reason)
    p = plan(config, found.vms, online)
    reports = []
    for vp in p.vms:
        reports.append(VMReport(vp, tuple(apply(vp.assignments, ops, dry_run))))
    return Report(scan=found, plan=p, vms=tuple(reports))
