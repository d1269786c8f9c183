"""Immutable set of host CPU numbers with strict parsing and formatting.

Accepted syntaxes (what ``taskset -c``, the kernel's cpulist and /proc print):
lists and ranges ``0-3,8``, strides ``0-15:2``, hex masks ``0x100`` (CPU 8),
and /proc's comma-grouped masks ``ff,ffffffff`` via :meth:`CpuSet.from_mask`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

# The kernel's own limit (CONFIG_NR_CPUS max); anything above is a typo, not a CPU.
MAX_CPUS = 8192

_NUM = re.compile(r"[0-9]+\Z")
_HEX = re.compile(r"[0-9a-fA-F]+\Z")


class CpuSetError(ValueError):
    """A CPU list or mask that does not parse; ``token`` is the offending piece."""

    def __init__(self, message: str, token: str) -> None:
        super().__init__(message)
        self.token = token


def _num(tok: str, whole: str) -> int:
    tok_s = tok.strip()
    if not _NUM.match(tok_s):
        raise CpuSetError(f"bad CPU number {tok_s!r} in {whole!r}", tok_s)
    n = int(tok_s)
    if n >= MAX_CPUS:
        raise CpuSetError(f"CPU {n} out of range (max {MAX_CPUS - 1}) in {whole!r}", tok_s)
    return n


@dataclass(frozen=True, slots=True)
class CpuSet:
    """A frozen set of CPU numbers. Compare, combine and iterate in ascending order."""

    cpus: frozenset[int] = frozenset()

    @classmethod
    def of(cls, cpus: Iterable[int]) -> "CpuSet":
        s = frozenset(int(c) for c in cpus)
        for c in s:
            if c < 0 or c >= MAX_CPUS:
                raise CpuSetError(f"CPU {c} out of range", str(c))
        return cls(s)

    @classmethod
    def parse(cls, text: str | int) -> "CpuSet":
        """Parse a cpulist (``0-3,8``, ``0-15:2``) or a ``0x`` hex mask. Never empty."""
        if isinstance(text, bool):
            raise CpuSetError(f"expected a CPU list, got {text!r}", str(text))
        if isinstance(text, int):
            if text < 0:
                raise CpuSetError(f"bad CPU number {text!r}", str(text))
            text = str(text)
        if not isinstance(text, str):
            raise CpuSetError(f"expected a CPU list, got {type(text).__name__}", repr(text))
        whole = text.strip()
        if whole == "":
            raise CpuSetError("empty CPU list ''", "")
        if whole[:2].lower() == "0x":
            return cls._parse_mask(whole[2:], whole)
        cpus: set[int] = set()
        for part in whole.split(","):
            cpus |= _parse_part(part, whole)
        return cls(frozenset(cpus))

    @classmethod
    def from_mask(cls, text: str) -> "CpuSet":
        """Parse a hex mask as /proc prints it (``ff,ffffffff``) or taskset takes it (``0xff``).

        Unlike :meth:`parse`, an all-zero mask gives the empty set: /proc can print one.
        """
        whole = text.strip()
        body = whole[2:] if whole[:2].lower() == "0x" else whole
        return cls._parse_mask(body, whole, allow_empty=True)

    @classmethod
    def _parse_mask(cls, body: str, whole: str, allow_empty: bool = False) -> "CpuSet":
        groups = body.split(",")
        # /proc prints 32-bit groups separated by commas; taskset masks have none.
        for g in groups:
            if not _HEX.match(g) or (len(groups) > 1 and len(g) > 8):
                raise CpuSetError(f"bad hex mask group {g!r} in {whole!r}", g)
        if len(groups) > 1:
            value = 0
            for g in groups:
                value = (value << 32) | int(g, 16)
        else:
            value = int(groups[0], 16)
        cpus = frozenset(i for i in range(value.bit_length()) if value >> i & 1)
        if cpus and max(cpus) >= MAX_CPUS:
            raise CpuSetError(f"mask {whole!r} names CPUs beyond {MAX_CPUS - 1}", whole)
        if not cpus and not allow_empty:
            raise CpuSetError(f"mask {whole!r} selects no CPU", whole)
        return cls(cpus)

    # --- formatting -------------------------------------------------------------
    def format(self) -> str:
        """Kernel cpulist form: ``0-3,8``; the empty set formats as ``''``."""
        out: list[str] = []
        for lo, hi in self.ranges():
            out.append(str(lo) if lo == hi else f"{lo}-{hi}")
        return ",".join(out)

    def ranges(self) -> list[tuple[int, int]]:
        items = sorted(self.cpus)
        runs: list[tuple[int, int]] = []
        for c in items:
            if runs and runs[-1][1] == c - 1:
                runs[-1] = (runs[-1][0], c)
            else:
                runs.append((c, c))
        return runs

    def to_mask(self) -> str:
        """/proc form: 32-bit hex groups, ``ff,ffffffff``; empty set is ``0``."""
        value = self.bits()
        groups: list[str] = []
        while True:
            groups.append(f"{value & 0xFFFFFFFF:08x}")
            value >>= 32
            if not value:
                break
        groups.reverse()
        groups[0] = groups[0].lstrip("0") or "0"
        return ",".join(groups)

    def hex(self) -> str:
        """taskset form: ``0x100``."""
        return hex(self.bits())

    def bits(self) -> int:
        v = 0
        for c in self.cpus:
            v |= 1 << c
        return v

    # --- set behaviour ----------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.cpus))

    def __len__(self) -> int:
        return len(self.cpus)

    def __contains__(self, cpu: object) -> bool:
        return cpu in self.cpus

    def __bool__(self) -> bool:
        return bool(self.cpus)

    def __or__(self, other: "CpuSet") -> "CpuSet":
        return CpuSet(self.cpus | other.cpus)

    def __and__(self, other: "CpuSet") -> "CpuSet":
        return CpuSet(self.cpus & other.cpus)

    def __sub__(self, other: "CpuSet") -> "CpuSet":
        return CpuSet(self.cpus - other.cpus)

    def __le__(self, other: "CpuSet") -> bool:
        return self.cpus <= other.cpus

    def __lt__(self, other: "CpuSet") -> bool:
        return self.cpus < other.cpus

    def issubset(self, other: "CpuSet") -> bool:
        return self.cpus <= other.cpus

    def first(self) -> int:
        return min(self.cpus)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"CpuSet({self.format()!r})"


def _parse_part(part: str, whole: str) -> set[int]:
    p = part.strip()
    if p == "":
        raise CpuSetError(f"empty element in CPU list {whole!r}", part)
    stride = 1
    if ":" in p:
        rng, _, st = p.partition(":")
        if "-" not in rng:
            raise CpuSetError(f"stride {p!r} needs a range (like 0-15:2) in {whole!r}", p)
        stride = _num(st, whole)
        if stride == 0:
            raise CpuSetError(f"stride 0 in {p!r} of {whole!r}", p)
        p = rng
    if "-" in p:
        lo_s, _, hi_s = p.partition("-")
        if lo_s.strip() == "" or hi_s.strip() == "":
            raise CpuSetError(f"bad range {part.strip()!r} in {whole!r}", part.strip())
        try:
            lo, hi = _num(lo_s, whole), _num(hi_s, whole)
        except CpuSetError as e:
            raise CpuSetError(f"bad range {part.strip()!r} in {whole!r}", part.strip()) from e
        if hi < lo:
            raise CpuSetError(f"range {part.strip()!r} runs backwards in {whole!r}", part.strip())
        return set(range(lo, hi + 1, stride))
    return {_num(p, whole)}
