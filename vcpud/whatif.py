"""`plan --what-if`: imagined VMs from NAME:VCPUS[:THREADS], and their limits."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from .text import short

if TYPE_CHECKING:
    from .discovery import VM

# `plan --what-if`: at most this many imagined VMs, each of at most MAX_VM_VCPUS vCPUs (KVM's
# KVM_MAX_VCPUS on x86 with CONFIG_MAXSMP; no guest has more). Not the host's CPU count: a
# VM floating over a shared pool may have more vCPUs than the pool has CPUs.
MAX_WHAT_IF = 1000
MAX_VM_VCPUS = 4096
_WHAT_IF_RE = re.compile(r"([^:]+):([0-9]+)(?::([0-9]+))?\Z")
WHAT_IF_EXPECTED = "expected NAME:VCPUS[:THREADS], VCPUS and THREADS positive decimal numbers"


def what_if_vm(i: int, spec: str) -> VM:
    """An imagined VM from NAME:VCPUS[:THREADS] (THREADS = guest threads per core).

    ValueError, saying what is expected, for anything else and for more than MAX_VM_VCPUS vCPUs.
    """
    from .discovery import VM, Smp

    m = _WHAT_IF_RE.match(spec)
    if m is None or not m.group(2).strip("0") or (m.group(3) is not None and not m.group(3).strip("0")):
        raise ValueError(f"--what-if {short(spec)}: {WHAT_IF_EXPECTED}")
    name, vcpus, threads = m.group(1), m.group(2).lstrip("0"), (m.group(3) or "1").lstrip("0")
    # Length before int(): 5,000 digits would be a bare ValueError, and ten million vCPUs a minute of work.
    if len(vcpus) > len(str(MAX_VM_VCPUS)) or int(vcpus) > MAX_VM_VCPUS:
        raise ValueError(f"--what-if {short(spec)}: a VM has at most {MAX_VM_VCPUS} vCPUs (KVM's limit)")
    n = int(vcpus)
    if len(threads) > len(vcpus) or int(threads) > n:
        raise ValueError(f"--what-if {short(spec)}: more threads per core than the VM's {n} vCPUs")
    t = int(threads)
    if n % t:
        raise ValueError(f"--what-if {short(spec)}: {n} vCPUs are not whole cores of {t} threads")
    # Negative pids and start times after every live VM: imagined VMs arrive last, in order.
    return VM(pid=-(i + 1), starttime=2**62 + i, exe="", cmdline=(), uid=0, user=None, name=name, uuid=None,
              smp=Smp(cpus=n, maxcpus=n, cores=n // t, threads=t), threads=(), debug_threads=True)


def what_if_vms(specs: Sequence[str]) -> list[VM]:
    """Every --what-if VM; ValueError for a bad one or for more than MAX_WHAT_IF of them."""
    if len(specs) > MAX_WHAT_IF:
        raise ValueError(f"{len(specs)} --what-if VMs: at most {MAX_WHAT_IF} at a time")
    return [what_if_vm(i, spec) for i, spec in enumerate(specs)]
