"""Per host CPU families: where the pinned threads of managed VMs may run.

``vcpud_cpu_pinned_threads{cpu,role}`` counts threads of managed VMs (a policy matched) in thread
state ``pinned`` that may run on that CPU; a thread allowed on k CPUs counts once on each. Threads
with no rule for their role float over the host and count only in ``vcpud_threads``. There is a row
for every online CPU and every pinnable role, 0 where none, so that a grid has every CPU.
``vcpud_cpu_vcpus`` / ``vcpud_cpu_exclusive_vcpus`` are the same for vCPUs only (the second: pinned to
that CPU alone). ``vcpud_cpu_vm_info{cpu,role,vm}`` is the largest family on a dense host: a VM floating
over a 32-CPU pool is 32 series per role. ``vcpud_cpu_vcpu_seconds_total`` is the CPU time of vCPUs
pinned to exactly that CPU (``rate()`` of it: how busy they keep it, 1 = a whole CPU).
"""

from __future__ import annotations

from collections import Counter

from ..discovery import Role
from ..snapshot import Snapshot
from ..vocab import ThreadState
from .family import CpuInfoFamily, Family, label

# Roles a policy can pin; kernel workers and unknown threads are never pinned.
PINNABLE_ROLES = (Role.VCPU, Role.EMULATOR, Role.IOTHREAD, Role.VHOST)


def build(snap: Snapshot) -> list[Family]:
    pinned: Counter[tuple[int, Role]] = Counter()
    vcpus: Counter[int] = Counter()
    exclusive: Counter[int] = Counter()
    vm_on_cpu: dict[tuple[str, Role], frozenset[int]] = {}  # (vm, role) -> CPUs its pinned threads may use
    roles = set(PINNABLE_ROLES)
    cpus_seen = set(snap.online.cpus)

    # Threads are grouped by (CPUs, role) first: the CPU sets of a VM's threads, and of VMs sharing
    # a pool, repeat a lot, and each distinct group is spread over its CPUs once.
    groups: Counter[tuple[frozenset[int], Role]] = Counter()
    pinned_state = ThreadState.PINNED
    for vm in snap.vms:
        if not vm.policy:
            continue
        name = label(vm.name)
        mine = [(t.cpus.cpus, t.role) for t in vm.threads if t.state is pinned_state]
        groups.update(mine)
        for cs, role in set(mine):
            on = vm_on_cpu.get((name, role))
            vm_on_cpu[name, role] = cs if on is None or on == cs else on | cs
    for (cs, role), n in groups.items():
        cpus_seen.update(cs)
        for c in cs:
            pinned[c, role] += n
        if role is Role.VCPU:
            for c in cs:
                vcpus[c] += n
            if len(cs) == 1:
                for c in cs:
                    exclusive[c] += n
        else:
            roles.add(role)

    cpus = sorted(cpus_seen | set(snap.vcpu_seconds))
    cpu_str = {c: str(c) for c in cpus}
    roles_sorted = sorted(roles, key=lambda r: r.value)
    out = []

    f = Family("vcpud_cpu_pinned_threads", "gauge",
               "Pinned threads of managed VMs allowed on this host CPU (a thread allowed on k CPUs counts on each).",
               ("cpu", "role"))
    f.samples += [("", (cpu_str[c], r.value), pinned.get((c, r), 0)) for c in cpus for r in roles_sorted]
    out.append(f)

    f = Family("vcpud_cpu_vcpus", "gauge", "Pinned vCPU threads of managed VMs allowed on this host CPU.", ("cpu",))
    f.samples += [("", (cpu_str[c],), vcpus.get(c, 0)) for c in cpus]
    out.append(f)

    f = Family("vcpud_cpu_exclusive_vcpus", "gauge", "vCPU threads pinned to this host CPU alone.", ("cpu",))
    f.samples += [("", (cpu_str[c],), exclusive.get(c, 0)) for c in cpus]
    out.append(f)

    g = CpuInfoFamily("vcpud_cpu_vm", "1 for each managed VM and role with pinned threads allowed on this CPU.",
                      ("cpu", "role", "vm"))
    cpu_lists: dict[frozenset[int], list[str]] = {}  # VMs in one pool share their CPU set: format it once
    for (name, role), on in sorted(vm_on_cpu.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
        cl = cpu_lists.get(on)
        if cl is None:
            cl = cpu_lists[on] = [cpu_str[c] for c in sorted(on)]
        g.groups.append(((role.value, name), cl))
    out.append(g)

    f = Family("vcpud_cpu_vcpu_seconds", "counter", "CPU time spent by vCPU threads pinned to exactly this host CPU.",
               ("cpu",))
    secs = snap.vcpu_seconds
    f.samples += [("_total", (cpu_str[c],), float(secs.get(c, 0.0))) for c in cpus]
    out.append(f)
    return out
