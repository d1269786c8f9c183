"""The parsed configuration: frozen, hashable values (Config, Policy, Match) and their defaults."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..cpuset import CpuSet
from ..discovery import DEFAULT_EXECUTABLES
from ..pools import PlacementRule, PoolSpec
from .issues import NOWHERE, Position

DEFAULT_CONFIG_PATH = Path("/etc/vcpud/vcpud.yaml")
DEFAULT_RESCAN_INTERVAL = 10.0
DEFAULT_METRICS_LISTEN = "127.0.0.1:9474"
DEFAULT_STATE_FILE = Path("/var/lib/vcpud/state.json")
# What a policy's on_exhausted takes besides a pool name; no pool may be called so.
ON_EXHAUSTED_MODES = ("leave", "fail")

_DIGITS = re.compile(r"[0-9]+\Z")

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """A read-only, hashable mapping, so policies stay hashable values."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(items)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data  # Mapping's would raise and catch KeyError for every miss

    def get(self, key: K, default: Any = None) -> Any:
        return self._data.get(key, default)

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


@dataclass(frozen=True)
class Match:
    """Which VMs a policy is for. Every field given must hold; no field matches all VMs."""

    name: str | None = None  # fnmatch glob over the guest name
    uuid: str | None = None  # compared case-insensitively
    cmdline: re.Pattern[str] | None = None  # re.search over argv joined with spaces
    user: str | None = None  # user name, or a uid as decimal digits
    vcpus: tuple[int, int] | None = None  # inclusive range of the guest's vCPU count

    def matches(self, vm: Any, users: Callable[[int], str | None] | None = None) -> bool:
        """Whether ``vm`` (duck-typed: name, uuid, cmdline, uid, user, smp.cpus) matches.

        ``users`` maps a uid to a user name, for VMs whose ``user`` is not resolved.
        A field asked for but unknown on the VM means no match.
        """
        if self.name is not None:
            name = getattr(vm, "name", None)
            if name is None or not fnmatch.fnmatchcase(name, self.name):
                return False
        if self.uuid is not None:
            uuid = getattr(vm, "uuid", None)
            if uuid is None or uuid.lower() != self.uuid.lower():
                return False
        if self.vcpus is not None:
            count = getattr(getattr(vm, "smp", None), "cpus", None)
            if count is None or not self.vcpus[0] <= count <= self.vcpus[1]:
                return False
        if self.user is not None and not self._user_matches(vm, users):
            return False
        if self.cmdline is not None:
            argv = getattr(vm, "cmdline", None)
            if argv is None or self.cmdline.search(" ".join(argv)) is None:
                return False
        return True

    def _user_matches(self, vm: Any, users: Callable[[int], str | None] | None) -> bool:
        assert self.user is not None
        uid = getattr(vm, "uid", None)
        if _DIGITS.match(self.user):
            return uid is not None and uid == int(self.user)
        name = getattr(vm, "user", None)
        if name is None and users is not None and uid is not None:
            name = users(uid)
        return name is not None and name == self.user


@dataclass(frozen=True)
class Policy:
    """Where one kind of VM's threads may run. ``None`` rules leave threads alone."""

    name: str
    match: Match = Match()
    vcpupin: Mapping[int, CpuSet] = FrozenMap()
    vcpus: CpuSet | None = None
    emulatorpin: CpuSet | None = None
    iothreadpin: CpuSet | None = None
    iothreadpin_by_id: Mapping[str, CpuSet] = FrozenMap()
    vhostpin: CpuSet | None = None
    affinity: CpuSet | None = None
    pos: Position = NOWHERE
    # Dedicated vCPUs from an exclusive pool (`vcpus: {pool: ...}`); `vcpus` is then None.
    vcpus_rule: PlacementRule | None = None
    # One more dedicated CPU from the vcpus_rule pool for the emulator threads.
    emulator_isolate: bool = False
    # The non-exclusive pool `emulatorpin` names (emulatorpin holds its CPUs), for reports.
    emulator_pool: str | None = None
    # With vcpus_rule, while too few CPUs are free: "leave", "fail" or a non-exclusive pool.
    on_exhausted: str = "leave"

    def __post_init__(self) -> None:
        # Accept plain dicts from code that builds policies by hand.
        for attr in ("vcpupin", "iothreadpin_by_id"):
            value = getattr(self, attr)
            if not isinstance(value, FrozenMap):
                object.__setattr__(self, attr, FrozenMap(value))

    def all_cpus(self) -> CpuSet:
        """Every CPU any rule of this policy names."""
        out = CpuSet()
        for s in (self.vcpus, self.emulatorpin, self.iothreadpin, self.vhostpin, self.affinity):
            if s is not None:
                out |= s
        for s in (*self.vcpupin.values(), *self.iothreadpin_by_id.values()):
            out |= s
        return out


@dataclass(frozen=True)
class Config:
    executables: tuple[str, ...] = DEFAULT_EXECUTABLES
    policies: tuple[Policy, ...] = ()
    rescan_interval: float = DEFAULT_RESCAN_INTERVAL
    files: tuple[str, ...] = ()  # every file read, in reading order
    pools: Mapping[str, PoolSpec] = FrozenMap()  # by name, in file order
    # "off", or an address in the grammar of listen.parse_listen, written as str(ListenAddress).
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    state_file: Path = DEFAULT_STATE_FILE

    def __post_init__(self) -> None:
        if not isinstance(self.pools, FrozenMap):
            object.__setattr__(self, "pools", FrozenMap(self.pools))

    def select(self, vm: Any, users: Callable[[int], str | None] | None = None) -> Policy | None:
        """The first policy matching ``vm``, or None: leave the VM alone."""
        for policy in self.policies:
            if policy.match.matches(vm, users):
                return policy
        return None
