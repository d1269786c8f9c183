"""Pure planner: (online CPUs, policies, VMs) -> which CPUs each thread should be allowed on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from .cpuset import CpuSet
from .discovery import VM, Role, Thread

if TYPE_CHECKING:
    from .policy import Config, Policy

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Assignment:
    pid: int
    tid: int
    label: str       # "vcpu 0", "emulator", "iothread io1", ...
    role: Role
    cpus: CpuSet     # what the thread should be allowed on
    rule: str        # which policy key chose it: "vcpupin[0]", "vcpus", "affinity", ...


@dataclass(frozen=True, slots=True)
class VMPlan:
    vm: VM
    policy: str | None                 # None: no policy matched, the VM is left alone
    assignments: tuple[Assignment, ...]
    problems: tuple[str, ...] = ()     # threads the policy wants pinned but cannot be

    def wanted(self, tid: int) -> Assignment | None:
        for a in self.assignments:
            if a.tid == tid:
                return a
        return None


@dataclass(frozen=True, slots=True)
class Plan:
    vms: tuple[VMPlan, ...]

    def assignments(self) -> Iterable[Assignment]:
        for v in self.vms:
            yield from v.assignments

    def by_tid(self) -> dict[int, CpuSet]:
        return {a.tid: a.cpus for a in self.assignments()}


def rule_for(policy: "Policy", thread: Thread) -> tuple[str, CpuSet] | None:
    """The policy key that governs a thread and its CPUs; None leaves the thread alone.

    Precedence: vcpupin[N] > vcpus > affinity; emulatorpin / iothreadpin / vhostpin > affinity.
    Kernel workers and threads of unknown role are never pinned.
    """
    if thread.role is Role.VCPU and thread.vcpu is not None:
        if thread.vcpu in policy.vcpupin:
            return f"vcpupin[{thread.vcpu}]", policy.vcpupin[thread.vcpu]
        if policy.vcpus is not None:
            return "vcpus", policy.vcpus
    elif thread.role is Role.EMULATOR:
        if policy.emulatorpin is not None:
            return "emulatorpin", policy.emulatorpin
    elif thread.role is Role.IOTHREAD and thread.iothread is not None:
        if thread.iothread in policy.iothreadpin_by_id:
            return f"iothreadpin[{thread.iothread}]", policy.iothreadpin_by_id[thread.iothread]
        if policy.iothreadpin is not None:
            return "iothreadpin", policy.iothreadpin
    elif thread.role is Role.VHOST:
        if policy.vhostpin is not None:
            return "vhostpin", policy.vhostpin
    else:
        return None
    if policy.affinity is not None:
        return "affinity", policy.affinity
    return None


def plan_vm(vm: VM, policy: "Policy | None", online: CpuSet) -> VMPlan:
    if policy is None:
        return VMPlan(vm=vm, policy=None, assignments=())
    out: list[Assignment] = []
    problems: list[str] = []
    for t in vm.threads:
        r = rule_for(policy, t)
        if r is None:
            continue
        rule, cpus = r
        usable = cpus & online
        if not usable:
            problems.append(f"{t.label} (tid {t.tid}): {rule} CPUs {cpus} are not online (online: {online})")
            continue
        if usable != cpus:
            # sched_setaffinity would silently drop offline CPUs too; say so instead.
            log.warning("VM %s %s: %s CPUs %s not online, using %s", vm.display_name, t.label, rule,
                        cpus - online, usable)
        out.append(Assignment(pid=vm.pid, tid=t.tid, label=t.label, role=t.role, cpus=usable, rule=rule))
    return VMPlan(vm=vm, policy=policy.name, assignments=tuple(out), problems=tuple(problems))


def plan(config: "Config", vms: Iterable[VM], online: CpuSet) -> Plan:
    """Match every VM to its policy (first match wins) and resolve each thread's CPUs."""
    return Plan(vms=tuple(plan_vm(vm, config.select(vm), online) for vm in vms))
