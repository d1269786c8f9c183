"""Which VMs libvirt started, from its pid files, without libvirt-python; and the libvirt owner
of a one-shot command, which imports libvirt-python only for such a VM.

libvirt writes ``/run/libvirt/qemu/NAME.pid`` for each domain it runs: reading it is all it takes
to know that a VM is libvirt's. Importing libvirt-python costs tens of ms and ~11 MiB, which
`vcpud apply`, `ps` and `plan` pay only when a VM their policies manage is libvirt's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Hashable

from . import bounded

if TYPE_CHECKING:
    from .discovery import VM
    from .libvirt import DeferredAffinity, LibvirtAffinity, LibvirtOwner

RUN_DIR = Path("/run/libvirt/qemu")
# Where qemu:///system listens: the monolithic libvirtd, or the modular virtqemud.
SOCKETS = (Path("/run/libvirt/libvirt-sock"), Path("/run/libvirt/virtqemud-sock"))


def listening(sockets: tuple[Path, ...] = SOCKETS) -> bool:
    """Whether libvirt's daemon (or systemd's socket for it) accepts connections: what the daemon
    asks before importing libvirt-python (~14 MiB), at start and at each rescan until it does."""
    import socket

    for path in sockets:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(0.1)
            try:
                s.connect(str(path))
            except OSError:
                continue
            return True
    return False


def pidfile(run_dir: Path, name: str) -> int:
    """The pid libvirt's pid file for domain ``name`` holds; 0 when there is none (or no pid in it)."""
    try:
        text = bounded.read_text(run_dir / f"{name}.pid", 64).strip()
    except (OSError, ValueError):
        return 0
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 10 else 0


def started(vm: "VM", run_dir: Path = RUN_DIR) -> bool:
    """libvirt started ``vm``: its pid file for the VM's name names this very process."""
    return vm.name is not None and "/" not in vm.name and pidfile(run_dir, vm.name) == vm.pid


class OnDemand:
    """The libvirt owner of one command (an Owner for its Chain): libvirt-python is imported, and
    a LibvirtOwner made, at the first VM libvirt started. Whether a VM is libvirt's is decided
    once per VM for the command's life (the reconciler asks before every pin)."""

    def __init__(self, run_dir: Path = RUN_DIR, uri: str | None = None) -> None:
        self.run_dir = run_dir
        self.uri = uri  # None: LibvirtOwner's (qemu:///system)
        self._available: bool | None = None  # libvirt-python importable; None: not asked yet
        self._owner: LibvirtOwner | None = None
        self._libvirts: dict[Hashable, bool] = {}

    def available(self) -> bool:
        """libvirt-python is installed (imported at the first question)."""
        if self._available is None:
            from .libvirt import available

            self._available = available()
        return self._available

    def owns(self, vm: "VM") -> bool:
        """libvirt started ``vm`` and vcpud pins it through libvirt (libvirt-python is installed)."""
        known = self._libvirts.get(vm.key)
        if known is None:
            known = self._available is not False and started(vm, self.run_dir) and self.available()
            self._libvirts[vm.key] = known
        return known

    def ops_for(self, vm: "VM") -> LibvirtAffinity | DeferredAffinity | None:
        if not self.owns(vm):
            return None
        if self._owner is None:
            from .libvirt import LibvirtOwner

            self._owner = LibvirtOwner(run_dir=self.run_dir) if self.uri is None \
                else LibvirtOwner(self.uri, run_dir=self.run_dir)
        return self._owner.ops_for(vm)
