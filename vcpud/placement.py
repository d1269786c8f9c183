"""Pure planner: (topology, policies, VMs, prior allocations) -> which CPUs each thread may use."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable, Iterable, Mapping, Sequence

from .cpuset import CpuSet
from .discovery import VM, Role, Thread
from .pools import Allocation, Failure, Request, allocate
from .vocab import VMStatus

if TYPE_CHECKING:
    from .config import Config, Policy
    from .topology import Topology

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
    status: VMStatus = VMStatus.PINNED
    allocation: Allocation | None = None
    reason: str = ""                   # why it is floating, waiting or failed

    @property
    def waiting(self) -> bool:
        """Asked for dedicated pool CPUs and holds none (floating, waiting or failed)."""
        return self.status.waiting

    def wanted(self, tid: int) -> Assignment | None:
        for a in self.assignments:
            if a.tid == tid:
                return a
        return None


@dataclass(frozen=True, slots=True)
class Plan:
    vms: tuple[VMPlan, ...]
    allocations: Mapping[Hashable, Allocation] = field(default_factory=dict)  # by VM key

    def assignments(self) -> Iterable[Assignment]:
        for v in self.vms:
            yield from v.assignments

    def by_tid(self) -> dict[int, CpuSet]:
        return {a.tid: a.cpus for a in self.assignments()}


@dataclass(frozen=True, slots=True)
class PoolDecision:
    """What the pools gave one VM: an allocation, or a failure and what to do instead."""

    allocation: Allocation | None = None
    failure: Failure | None = None
    # Without an allocation (on_exhausted: leave or fail): where its vCPUs may run meanwhile.
    meanwhile: CpuSet = CpuSet()


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


def vcpu_count(vm: VM) -> int:
    """vCPUs to place: the -smp count, or more if vCPUs were hot-plugged beyond it."""
    idx = [t.vcpu for t in vm.threads if t.role is Role.VCPU and t.vcpu is not None]
    return max([vm.smp.cpus, *(i + 1 for i in idx)])


def pool_request(vm: VM, policy: "Policy") -> Request | None:
    if policy.vcpus_rule is None:
        return None
    return Request(key=vm.key, name=vm.display_name, vcpus=vcpu_count(vm), threads_per_core=vm.smp.threads,
                   rule=policy.vcpus_rule, emulator_isolate=policy.emulator_isolate)


def assign(thread: Thread, vm: VM, policy: "Policy", config: "Config", decision: PoolDecision,
           isolated: CpuSet) -> tuple[str, CpuSet] | None:
    """The rule and CPUs for one thread of a VM, pools included; None leaves it alone."""
    rule = policy.vcpus_rule
    if rule is not None and thread.role is Role.VCPU and thread.vcpu is not None:
        a = decision.allocation
        if a is not None:
            if thread.vcpu < len(a.vcpus):
                return f"pool {a.pool}", CpuSet(frozenset((a.vcpus[thread.vcpu],)))
            return None  # hot-plugged past the allocation: the next plan grows it
        if policy.on_exhausted in config.pools:
            name = policy.on_exhausted
            return f"on_exhausted: {name}", config.pools[name].cpus
        # Waiting (leave) or failed: never confined to CPUs that other VMs hold.
        return (f"on_exhausted: {policy.on_exhausted}", decision.meanwhile) if decision.meanwhile else None
    if thread.role is Role.EMULATOR and policy.emulator_isolate:
        a = decision.allocation
        if a is not None and a.emulator is not None:
            return "emulatorpin: isolate", CpuSet(frozenset((a.emulator,)))
        if a is None and policy.on_exhausted in config.pools:
            name = policy.on_exhausted
            return f"on_exhausted: {name}", config.pools[name].cpus - isolated or config.pools[name].cpus
        if a is None and decision.meanwhile:
            return f"on_exhausted: {policy.on_exhausted}", decision.meanwhile
        return None
    r = rule_for(policy, thread)
    if r is not None and thread.role is Role.EMULATOR and policy.emulator_pool is not None:
        # Emulator threads never land on isolated CPUs through a pool, only through a fixed list.
        cpus = r[1] - isolated
        return (r[0], cpus) if cpus else r
    return r


def plan_vm(vm: VM, policy: "Policy | None", online: CpuSet, config: "Config",
            decision: PoolDecision | None = None, isolated: CpuSet | None = None) -> VMPlan:
    """One VM's assignments under its policy (pool CPUs as ``decision`` gave them)."""
    decision = decision if decision is not None else PoolDecision()
    isolated = isolated if isolated is not None else CpuSet()
    if policy is None:
        return VMPlan(vm=vm, policy=None, assignments=(), status=VMStatus.UNMANAGED)
    out: list[Assignment] = []
    problems: list[str] = []
    status, reason = VMStatus.PINNED, ""
    if policy.vcpus_rule is not None:
        if decision.allocation is not None:
            status = VMStatus.PLACED
        else:
            reason = decision.failure.reason if decision.failure else "no CPUs allocated"
            status = {"leave": VMStatus.WAITING, "fail": VMStatus.FAILED}.get(policy.on_exhausted, VMStatus.FLOATING)
            if status is VMStatus.FAILED:
                problems.append(f"{reason} (on_exhausted: fail)")
    for t in vm.threads:
        r = assign(t, vm, policy, config, decision, isolated)
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
    return VMPlan(vm=vm, policy=policy.name, assignments=tuple(out), problems=tuple(problems), status=status,
                  allocation=decision.allocation, reason=reason)


def decide_pools(config: "Config", topology: "Topology | None", vms: Sequence[VM],
                 policies: Sequence["Policy | None"],
                 prior: Mapping[Hashable, Allocation] | None = None) -> dict[Hashable, PoolDecision]:
    """Allocate dedicated pool CPUs for every VM whose policy asks, in the order given."""
    requests = [r for vm, p in zip(vms, policies, strict=True)
                if p is not None and (r := pool_request(vm, p)) is not None]
    if not requests:
        return {}
    if topology is None:
        raise ValueError("pool placement needs the host topology")
    allocs, fails = allocate(topology, config.pools, requests, prior or {})
    out = {k: PoolDecision(allocation=a) for k, a in allocs.items()}
    meanwhile = meanwhile_cpus(config, topology, allocs.values())
    out.update({k: PoolDecision(failure=f, meanwhile=meanwhile) for k, f in fails.items()})
    return out


def meanwhile_cpus(config: "Config", topology: "Topology", held: Iterable[Allocation]) -> CpuSet:
    """Where the vCPUs of a VM that waits for exclusive CPUs (on_exhausted: leave or fail) may run.

    Online CPUs in no exclusive pool (housekeeping and shared pools), not isolated; failing
    those, the exclusive pools' CPUs nobody holds; failing those too (every online CPU held),
    all online CPUs: vcpud cannot stop a VM, only keep it from being confined to CPUs that
    other VMs hold.
    """
    online = topology.online
    exclusive = CpuSet()
    for p in config.pools.values():
        if p.exclusive:
            exclusive |= p.cpus
    outside = online - exclusive
    if outside - topology.isolated:
        return outside - topology.isolated
    if outside:
        return outside
    taken = CpuSet()
    for a in held:
        taken |= a.cpus
    return (online & exclusive) - taken or online


def plan(config: "Config", vms: Iterable[VM], online: CpuSet, topology: "Topology | None" = None,
         prior: Mapping[Hashable, Allocation] | None = None) -> Plan:
    """Match every VM to its policy (first match wins), place pooled ones, resolve each thread.

    VMs are considered in the order given (callers pass arrival order); VMs holding a still
    valid prior allocation keep it.
    """
    vms = list(vms)
    policies = [config.select(vm) for vm in vms]
    decisions = decide_pools(config, topology, vms, policies, prior)
    isolated = topology.isolated if topology is not None else CpuSet()
    vps = tuple(plan_vm(vm, pol, online, config, decisions.get(vm.key, PoolDecision()), isolated)
                for vm, pol in zip(vms, policies, strict=True))
    allocations = {k: d.allocation for k, d in decisions.items() if d.allocation is not None}
    return Plan(vms=vps, allocations=allocations)


def arrival_order(vms: Iterable[VM]) -> list[VM]:
    """Oldest first: the order in which VMs get their claim on pooled CPUs."""
    return sorted(vms, key=lambda vm: (vm.starttime, vm.pid))


def adopt(config: "Config", vms: Iterable[VM], online: CpuSet,
          topology: "Topology | None" = None) -> dict[Hashable, Allocation]:
    """Allocations read back from the threads' current affinities (no state file to trust).

    A VM is adopted when each of its vCPUs 0..n-1 is pinned to one CPU of its policy's
    exclusive pool, none of them taken by a VM adopted before it (arrival order). The
    allocator then keeps what still satisfies the policy and re-places the rest; a CPU is
    never adopted twice. For `isolate` and `full-cores` the free siblings of its cores are
    held too (given the topology), as the allocator would have done.
    """
    siblings = {c.cpu: c.siblings for c in topology.cpus} if topology is not None else {}
    taken: set[int] = set()
    out: dict[Hashable, Allocation] = {}
    for vm in arrival_order(vms):
        policy = config.select(vm)
        if policy is None or policy.vcpus_rule is None:
            continue
        pool = config.pools.get(policy.vcpus_rule.pool)
        if pool is None or not pool.exclusive:
            continue
        usable = pool.cpus & online
        by_index = {t.vcpu: t.affinity for t in vm.threads if t.role is Role.VCPU and t.vcpu is not None}
        n = vcpu_count(vm)
        cpus = []
        for i in range(n):
            aff = by_index.get(i)
            if aff is None or len(aff) != 1 or not aff <= usable or aff.first() in taken or aff.first() in cpus:
                break
            cpus.append(aff.first())
        else:
            emulator = None
            if policy.emulator_isolate:
                main = next((t for t in vm.threads if t.tid == vm.pid), None)
                if main is not None and len(main.affinity) == 1 and main.affinity <= usable \
                        and main.affinity.first() not in taken and main.affinity.first() not in cpus:
                    emulator = main.affinity.first()
                else:
                    continue
            used = set(cpus) | ({emulator} if emulator is not None else set())
            reserved = CpuSet()
            if policy.vcpus_rule.smt in ("isolate", "full-cores") and siblings:
                reserved = CpuSet(frozenset(s for c in used for s in siblings.get(c, ()))) & usable
                reserved = reserved - CpuSet(frozenset(used))
                if reserved.cpus & taken:
                    continue  # its core is shared with a VM adopted before: let the allocator re-place it
            out[vm.key] = Allocation(key=vm.key, pool=pool.name, vcpus=tuple(cpus), emulator=emulator,
                                     reserved=reserved,
                                     reasons=("adopted from its affinity",) * (n + (emulator is not None)))
            taken.update(used | set(reserved))
    return out
