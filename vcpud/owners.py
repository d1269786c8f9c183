"""Who pins a VM's threads, for the daemon: libvirt's API for libvirt's VMs, a VM manager's
per-thread cgroups without it, sched_setaffinity for everything else.

libvirt's owner is made from when libvirtd listens (asked at start and at each rescan):
libvirt-python, ~14 MiB of the daemon's memory, is imported only then.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .cgroups import CgroupOwner, Cgroups
from .libvirtrun import SOCKETS, listening
from .pinning import AffinityOps, Chain, Owner

if TYPE_CHECKING:
    from .libvirt import LibvirtOwner


class Owners:
    def __init__(self, proc: Path, ops: AffinityOps, use_libvirt: bool = True,
                 sockets: tuple[Path, ...] = SOCKETS) -> None:
        self.proc = proc
        self.ops = ops
        self.use_libvirt = use_libvirt
        self.sockets = sockets
        self.libvirt: LibvirtOwner | None = None

    def router(self) -> Chain:
        owners: list[Owner] = [] if self.libvirt is None else [self.libvirt]
        return Chain(*owners, CgroupOwner(Cgroups(self.proc), self.ops), fallback=self.ops)

    def adopt(self) -> bool:
        """Make libvirt's owner if libvirtd listens now and it was not made yet: True when it was
        just made (the caller attaches it to its loop and routes through it)."""
        if self.libvirt is not None or not self.use_libvirt or not listening(self.sockets):
            return False
        from .libvirt import libvirt_owner

        self.libvirt = libvirt_owner()
        self.use_libvirt = self.libvirt is not None  # else libvirt-python is not installed: said once
        return self.libvirt is not None
