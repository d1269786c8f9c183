"""Who holds which pooled CPUs across restarts: the state store and the priors read from it.

The store is a small protocol so the reconciler can be driven in tests without files;
`FileStore` is the real one (the `state_file` setting, written atomically).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Iterable, Mapping, Protocol

from . import state
from .cpuset import CpuSet
from .discovery import VM
from .placement import PoolDecision, adopt, arrival_order, decide_pools
from .pools import Allocation

if TYPE_CHECKING:
    from .config import Config
    from .topology import Topology

log = logging.getLogger(__name__)

Key = tuple[int, int]


class StateStore(Protocol):
    def load(self) -> dict[Key, state.Saved]:
        """Raises state.StateError when missing or corrupt."""

    def save(self, saved: Mapping[Any, state.Saved]) -> None:
        """Raises OSError."""

    def exists(self) -> bool: ...

    def describe(self) -> str: ...


class FileStore:
    """The state file on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[Key, state.Saved]:
        """Raises state.StateError only, whatever is (or is not) at the path."""
        return state.load(self.path)

    def save(self, saved: Mapping[Any, state.Saved]) -> None:
        state.save(self.path, saved)

    def exists(self) -> bool:
        # Something there, even a dangling symlink or a path we may not stat, deserves a warning.
        try:
            return os.path.lexists(self.path) or self.path.exists()
        except OSError:
            return True

    def describe(self) -> str:
        return str(self.path)


def load_priors(config: "Config", store: StateStore, vms: Iterable[VM], online: CpuSet,
                topology: "Topology | None" = None) -> dict[Hashable, Allocation]:
    """Who holds which pooled CPUs: the store for VMs still alive (same pid and start
    time), or, when it is missing or corrupt, what the live affinities show."""
    vms = list(vms)
    if not any(p is not None and p.vcpus_rule is not None for p in map(config.select, vms)):
        return {}
    try:
        saved = store.load()
        bad = state.conflicts(saved)
        if bad:
            raise state.StateError("state file double-books: " + "; ".join(bad))
    except state.StateError as e:
        adopted = adopt(config, vms, online, topology)
        # No file yet is the first start; a file we cannot trust deserves a warning.
        log.log(logging.WARNING if store.exists() else logging.INFO,
                "%s; rebuilt from live affinities: adopted %d VMs", e, len(adopted))
        for key, a in adopted.items():
            log.info("adopted pid %s: vCPUs on %s", vm_pid(key), ",".join(map(str, a.vcpus)))
        return adopted
    alive = {vm.key for vm in vms}
    dead = [k for k in saved if k not in alive]
    if dead:
        log.info("state file: %d VMs no longer run; their CPUs are free", len(dead))
    return {k: s.allocation for k, s in saved.items() if k in alive}


def vm_pid(key: Hashable) -> object:
    """The pid in a VM key ((pid, starttime) for live VMs)."""
    return key[0] if isinstance(key, tuple) else key


def save_holders(store: StateStore, holders: Iterable[tuple[VM, str, Allocation]]) -> None:
    """Write who holds which pooled CPUs: (VM, its policy's name, its allocation) each."""
    saved = {vm.key: state.Saved(pid=vm.pid, starttime=vm.starttime, name=vm.display_name, policy=policy,
                                 allocation=a)
             for vm, policy, a in holders}
    try:
        store.save(saved)
    except OSError as e:
        log.error("cannot write state file %s: %s", store.describe(), e)


class Ledger:
    """The pooled CPUs each live VM holds, written to the store whenever they change."""

    def __init__(self, store: StateStore, dry_run: bool = False) -> None:
        self.store = store
        self.dry_run = dry_run  # reads the store, never writes it
        self.allocations: dict[Hashable, Allocation] = {}  # VM key -> pooled CPUs it holds

    def start(self, config: "Config", vms: Iterable[VM], online: CpuSet, topology: "Topology | None") -> None:
        self.allocations = load_priors(config, self.store, vms, online, topology)

    def place(self, config: "Config", topology: "Topology | None", vms: Iterable[VM],
              save: bool = False) -> dict[Hashable, PoolDecision]:
        """Pool CPUs for every live VM (arrival order; VMs keep what they hold); saves changes."""
        order = arrival_order(vms)
        policies = [config.select(vm) for vm in order]
        decisions = decide_pools(config, topology, order, policies, self.allocations)
        allocations = {k: d.allocation for k, d in decisions.items() if d.allocation is not None}
        if allocations != self.allocations or save:
            for k, a in allocations.items():
                if self.allocations.get(k) != a:
                    log.info("pid %s gets pool %s CPUs %s", vm_pid(k), a.pool, a.cpus)
            self.allocations = allocations
            self.save([(vm, p.name, allocations[vm.key])
                       for vm, p in zip(order, policies, strict=True) if p is not None and vm.key in allocations])
        return decisions

    def release(self, vm: VM, holders: Iterable[tuple[VM, str]]) -> bool:
        """A VM is gone: free what it held; ``holders`` are the VMs still alive with their policy."""
        if self.allocations.pop(vm.key, None) is None:
            return False
        self.save([(x, policy, self.allocations[x.key]) for x, policy in holders if x.key in self.allocations])
        return True

    def held(self, pool: str) -> CpuSet:
        out = CpuSet()
        for a in self.allocations.values():
            if a.pool == pool:
                out |= a.cpus
        return out

    def save(self, holders: Iterable[tuple[VM, str, Allocation]]) -> None:
        if not self.dry_run:
            save_holders(self.store, holders)
