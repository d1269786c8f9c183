"""VM and thread families: VMs by policy and by status, one info series per VM, threads by role and state.

Unmanaged VMs (no policy matched) have ``policy=""``, which Prometheus shows as no ``policy`` label.
Every status and every role x state is present, 0 where none.
"""

from __future__ import annotations

from collections import Counter

from ..discovery import Role
from ..snapshot import Snapshot
from ..vocab import ThreadState, VMStatus
from .family import Family, label


def build(snap: Snapshot) -> list[Family]:
    by_policy: Counter[str] = Counter()
    by_status: Counter[VMStatus] = Counter()
    threads: Counter[tuple[Role, ThreadState]] = Counter()
    vm_info: set[tuple[str, str, str]] = set()
    for vm in snap.vms:
        policy = label(vm.policy)
        by_policy[policy] += 1
        by_status[vm.status] += 1
        vm_info.add((policy, label(vm.name), label(vm.uuid)))
        threads.update([(t.role, t.state) for t in vm.threads])

    out = []
    f = Family("vcpud_vms", "gauge", 'VMs by matching policy (policy="" for unmanaged VMs).', ("policy",))
    for policy in sorted(by_policy):
        f.add((policy,), by_policy[policy])
    out.append(f)
    f = Family("vcpud_vms_by_status", "gauge", "VMs by status.", ("status",))
    for status in sorted(VMStatus, key=lambda s: s.value):
        f.add((status.value,), by_status[status])
    out.append(f)
    f = Family("vcpud_vm", "info", 'One per VM on the host (policy="" when no policy matches).',
               ("policy", "uuid", "vm"))
    f.samples += [("_info", (policy, uuid, name), 1)
                  for policy, name, uuid in sorted(vm_info, key=lambda i: (i[1], i[2], i[0]))]
    out.append(f)
    f = Family("vcpud_threads", "gauge", "Threads of all VMs by role and pinning state.", ("role", "state"))
    for role in sorted(Role, key=lambda r: r.value):
        for state in sorted(ThreadState, key=lambda s: s.value):
            f.add((role.value, state.value), threads[role, state])
    out.append(f)
    return out
