"""One reconcile pass: scan /proc, match policies, place, pin; and the state file around it.

The CLI's `apply` and the daemon share these pieces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Iterable, Mapping

from . import state
from .cpuset import CpuSet
from .discovery import VM, Scan, scan
from .pinning import AffinityOps, Outcome, PinResult, apply
from .placement import Plan, VMPlan, adopt, arrival_order, plan
from .pools import Allocation
from .procfs import Procfs

if TYPE_CHECKING:
    from .config import Config
    from .topology import Topology

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


def load_priors(config: "Config", vms: Iterable[VM], online: CpuSet,
                topology: "Topology | None" = None) -> dict[Hashable, Allocation]:
    """Who holds which pooled CPUs: the state file for VMs still alive (same pid and start
    time), or, when it is missing or corrupt, what the live affinities show."""
    vms = list(vms)
    if not any(p is not None and p.vcpus_rule is not None for p in map(config.select, vms)):
        return {}
    try:
        saved = state.load(config.state_file)
        bad = state.conflicts(saved)
        if bad:
            raise state.StateError("state file double-books: " + "; ".join(bad))
    except state.StateError as e:
        adopted = adopt(config, vms, online, topology)
        # No file yet is the first start; a file we cannot trust deserves a warning.
        log.log(logging.INFO if not config.state_file.exists() else logging.WARNING,
                "%s; rebuilt from live affinities: adopted %d VMs", e, len(adopted))
        for key, a in adopted.items():
            log.info("adopted pid %d: vCPUs on %s", key[0], ",".join(map(str, a.vcpus)))
        return adopted
    alive = {vm.key for vm in vms}
    dead = [k for k in saved if k not in alive]
    if dead:
        log.info("state file: %d VMs no longer run; their CPUs are free", len(dead))
    return {k: s.allocation for k, s in saved.items() if k in alive}


def save_state(config: "Config", holders: Iterable[tuple[VM, str, Allocation]]) -> None:
    """Write who holds which pooled CPUs: (VM, its policy's name, its allocation) each."""
    saved = {vm.key: state.Saved(pid=vm.pid, starttime=vm.starttime, name=vm.display_name, policy=policy,
                                 allocation=a)
             for vm, policy, a in holders}
    try:
        state.save(config.state_file, saved)
    except OSError as e:
        log.error("cannot write state file %s: %s", config.state_file, e)


def reconcile(
    config: "Config",
    online: CpuSet,
    procfs: Procfs,
    ops: AffinityOps,
    dry_run: bool = False,
    pids: Iterable[int] | None = None,
    topology: "Topology | None" = None,
    prior: Mapping[Hashable, Allocation] | None = None,
) -> Report:
    """Discover VMs (all, or among ``pids``), plan them with ``config`` and apply the plan."""
    found = scan(procfs, config.executables, pids)
    for r in found.rejected:
        log.debug("pid %d runs %s: not a VM (%s)", r.pid, r.exe, r.reason)
    vms = arrival_order(found.vms)
    if prior is None:
        prior = load_priors(config, vms, online, topology)
    p = plan(config, vms, online, topology, prior)
    reports = []
    for vp in p.vms:
        reports.append(VMReport(vp, tuple(apply(vp.assignments, ops, dry_run))))
    if p.allocations and not dry_run:
        save_state(config, [(vp.vm, vp.policy or "", p.allocations[vp.vm.key])
                            for vp in p.vms if vp.vm.key in p.allocations])
    return Report(scan=found, plan=p, vms=tuple(reports))
