"""All metric families of one snapshot, in exposition order: build info, then each area's builder,
then the snapshot's own timestamp. Before the first snapshot (None) only ``vcpud_build_info``."""

from __future__ import annotations

from .. import __version__
from ..snapshot import Snapshot
from . import activity, cpu, pools, vms
from .family import Family, gauge, label


def model(snap: Snapshot | None) -> list[Family]:
    """Every metric family for one snapshot (pure: the same snapshot gives the same families)."""
    version = snap.version if snap is not None and snap.version else __version__
    build = Family("vcpud_build", "info", "vcpud's version; always 1.", ("version",))
    build.add((label(version),), 1)
    if snap is None:
        return [build]
    return [build, *cpu.build(snap), *pools.build(snap), *vms.build(snap), *activity.build(snap),
            gauge("vcpud_snapshot_timestamp_seconds", "Unix time the daemon took the state these metrics show.",
                  snap.taken_at)]
