"""Vocabularies shared by the code and what it exports (metrics, ps, the status line).

Thread roles live in ``discovery.Role`` and pin outcomes in ``pinning.Outcome``; these are the rest.
"""

from __future__ import annotations

import enum


class VMStatus(str, enum.Enum):
    """Where a VM stands with its policy."""

    PINNED = "pinned"        # fixed lists applied
    PLACED = "placed"       # pool CPUs allocated and applied
    FLOATING = "floating"    # pool exhausted, on_exhausted: POOL: floats over that pool
    WAITING = "waiting"      # pool exhausted, on_exhausted: leave: left where it is until CPUs free up
    FAILED = "failed"        # pool exhausted with on_exhausted: fail, or a thread could not be pinned
    UNMANAGED = "unmanaged"  # no policy matches

    def __str__(self) -> str:
        return self.value

    @property
    def waiting(self) -> bool:
        """Wants pool CPUs it does not hold yet."""
        return self in (VMStatus.FLOATING, VMStatus.WAITING, VMStatus.FAILED)


class ThreadState(str, enum.Enum):
    PINNED = "pinned"        # where its policy wants it
    UNPINNED = "unpinned"    # no rule for it, or the VM is unmanaged
    FAILED = "failed"        # a rule, and the kernel refused it

    def __str__(self) -> str:
        return self.value


class EventSource(str, enum.Enum):
    PROC_CONNECTOR = "proc_connector"
    UDEV = "udev"
    RESCAN = "rescan"
    SIGNAL = "signal"

    def __str__(self) -> str:
        return self.value
