"""The state file: which VM holds which pooled CPUs, kept across restarts (atomic writes)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Mapping, TypeVar

from .cpuset import CpuSet
from .pools import Allocation

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

VERSION = 1


class StateError(Exception):
    """The state file is missing, unreadable or corrupt; str() says which."""


@dataclass(frozen=True, slots=True)
class Saved:
    """One VM's allocation as remembered: who (pid + start time, name) and what it holds."""

    pid: int
    starttime: int
    name: str
    policy: str
    allocation: Allocation


def encode(saved: Mapping[Hashable, Saved]) -> str:
    vms = []
    for s in sorted(saved.values(), key=lambda s: (s.starttime, s.pid)):
        a = s.allocation
        vms.append({
            "pid": s.pid, "starttime": s.starttime, "name": s.name, "policy": s.policy, "pool": a.pool,
            "vcpus": list(a.vcpus), "emulator": a.emulator, "reserved": list(a.reserved),
            "reasons": list(a.reasons),
        })
    return json.dumps({"version": VERSION, "vms": vms}, indent=1) + "\n"


def decode(text: str) -> dict[tuple[int, int], Saved]:
    """Parse a state file; raises StateError on anything malformed (never returns half)."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("vms"), list):
            raise StateError(f"not a version {VERSION} vcpud state file")
        out: dict[tuple[int, int], Saved] = {}
        for v in data["vms"]:
            key = (int(v["pid"]), int(v["starttime"]))
            emulator = v.get("emulator")
            alloc = Allocation(
                key=key, pool=str(v["pool"]), vcpus=tuple(int(c) for c in v["vcpus"]),
                emulator=None if emulator is None else int(emulator),
                reserved=CpuSet.of(int(c) for c in v.get("reserved", ())),
                reasons=tuple(str(r) for r in v.get("reasons", ())),
            )
            if key in out:
                raise StateError(f"VM pid {key[0]} listed twice")
            out[key] = Saved(pid=key[0], starttime=key[1], name=str(v.get("name", "")), policy=str(v.get("policy", "")),
                             allocation=alloc)
    except StateError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise StateError(f"corrupt state file: {e!r}") from None
    return out


def load(path: Path) -> dict[tuple[int, int], Saved]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StateError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StateError(f"cannot read {path}: {e}") from None
    return decode(text)


def save(path: Path, saved: Mapping[Hashable, Saved]) -> None:
    """Write atomically: a crash leaves the old file or the new one, never a mix."""
    data = encode(saved).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # The rename itself must reach the disk too.
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def conflicts(saved: Mapping[K, Saved]) -> list[str]:
    """CPUs claimed by two saved VMs (a state file that lies must not double-book)."""
    owner: dict[int, Saved] = {}
    out = []
    for s in saved.values():
        for cpu in s.allocation.cpus:
            if cpu in owner:
                out.append(f"CPU {cpu} held by pid {owner[cpu].pid} and pid {s.pid}")
            else:
                owner[cpu] = s
    return out
