"""Immutable set of host CPU numbers with strict parsing and formatting.

Accepted syntaxes (what ``taskset -c``, the kernel's cpulist and /proc print):
lists and ranges ``0-3,8``, strides ``0-15:2``, hex masks ``0x100`` (CPU 8),
and /proc's comma-grouped masks ``ff,ffffffff`` via :meth:`CpuSet.from_mask`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator

# The kernel's own limit (CONFIG_NR_CPUS max); anything above is a typo, not a CPU.
MAX_CPUS = 8192

_NUM = re.compile(r"[0-9]+\Z")
_HEX = re.compile(r"[0-9a-fA-F]+\Z")
# Digits of the largest CPU number, and hex digits of the widest mask: longer tokens are
# refused before int() (which would also refuse more than 4,300 digits with a ValueError).
_MAX_DIGITS = len(str(MAX_CPUS - 1))
_MAX_HEX_DIGITS = (MAX_CPUS + 3) // 4
# The CPU numbers as shared int objects, so big sets do not each hold their own ints.
_CPU_INTS = tuple(range(MAX_CPUS))
_SHOWN = 40


def shorten(text: str) -> str:
    """``repr(text)``, cut to a readable length for messages (a config can hold megabytes)."""
    if len(text) <= _SHOWN:
        return repr(text)
    return f"{text[:_SHOWN - 3]!r}... ({len(text)} characters)"


class CpuSetError(ValueError):
    """A CPU list or mask that does not parse; ``token`` is the offending piece."""

    def __init__(self, message: str, token: str) -> None:
        super().__init__(message)
        self.token = token


def _num(tok: str, whole: str) -> int:
    tok_s = tok.strip()
    if not _NUM.match(tok_s):
        raise CpuSetError(f"bad CPU number {shorten(tok_s)} in {shorten(whole)}", tok_s)
    digits = tok_s.lstrip("0") or "0"
    # Checked before int(): no CPU number has more digits than the largest one.
    if len(digits) > _MAX_DIGITS or int(digits) >= MAX_CPUS:
        raise CpuSetError(
            f"CPU {digits if len(digits) <= _SHOWN else shorten(digits)} out of range "
            f"(max {MAX_CPUS - 1}, the kernel's largest NR_CPUS) in {shorten(whole)}",
            tok_s,
        )
    return int(digits)


def _from_bits(value: int) -> frozenset[int]:
    """The CPUs of a bitmask below 1 << MAX_CPUS, with shared int objects."""
    ints = _CPU_INTS
    return frozenset(ints[i] for i, bit in enumerate(reversed(bin(value)[2:])) if bit == "1")


@lru_cache(maxsize=64)
def _stride_pattern(stride: int) -> int:
    """Bits 0, stride, 2*stride, ... below MAX_CPUS."""
    value = 0
    for i in range(0, MAX_CPUS, stride):
        value |= 1 << i
    return value


@dataclass(frozen=True, slots=True)
class CpuSet:
    """A frozen set of CPU numbers. Compare, combine and iterate in ascending order."""

    cpus: frozenset[int] = frozenset()

    @classmethod
    def of(cls, cpus: Iterable[int]) -> "CpuSet":
        s = frozenset(int(c) for c in cpus)
        for c in s:
            if c < 0 or c >= MAX_CPUS:
                shown = str(c) if -MAX_CPUS < c < 10**_SHOWN else f"more than {_SHOWN} digits"
                raise CpuSetError(f"CPU {shown} out of range", shown)
        return cls(s)

    @classmethod
    def of_kernel(cls, cpus: Iterable[int]) -> "CpuSet":
        """The CPUs the kernel reported (sched_getaffinity): valid CPU numbers, not checked again."""
        return cls(frozenset(cpus))

    @classmethod
    def parse(cls, text: str | int) -> "CpuSet":
        """Parse a cpulist (``0-3,8``, ``0-15:2``) or a ``0x`` hex mask. Never empty."""
        if isinstance(text, bool):
            raise CpuSetError(f"expected a CPU list, got {text!r}", str(text))
        if isinstance(text, int):
            if text < 0 or text >= MAX_CPUS:  # before str(): a huge int has too many digits for it
                shown = str(text) if -MAX_CPUS < text < 10**_SHOWN else f"more than {_SHOWN} digits"
                what = "bad CPU number" if text < 0 else f"out of range (max {MAX_CPUS - 1}):"
                raise CpuSetError(f"{what} {shown}", shown)
            text = str(text)
        if not isinstance(text, str):
            raise CpuSetError(f"expected a CPU list, got {type(text).__name__}", repr(text))
        whole = text.strip()
        if whole == "":
            raise CpuSetError("empty CPU list ''", "")
        if whole[:2].lower() == "0x":
            return cls._parse_mask(whole[2:], whole)
        # Each part is combined as a bitmask, never expanded: the work is bounded by the
        # number of parts, and there are at most as many parts as CPUs.
        if whole.count(",") >= MAX_CPUS:
            raise CpuSetError(
                f"CPU list {shorten(whole)} has more than {MAX_CPUS} elements (the kernel's largest NR_CPUS)",
                whole,
            )
        bits = 0
        for part in whole.split(","):
            bits |= _parse_part(part, whole)
        return cls(_from_bits(bits))

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
                raise CpuSetError(f"bad hex mask group {shorten(g)} in {shorten(whole)}", g)
        digits = ("".join(g.zfill(8) for g in groups) if len(groups) > 1 else groups[0]).lstrip("0")
        # The digit count first: converting and expanding a mask of megabytes takes minutes.
        if len(digits) > _MAX_HEX_DIGITS or (digits and int(digits, 16).bit_length() > MAX_CPUS):
            raise CpuSetError(
                f"mask {shorten(whole)} names CPUs beyond {MAX_CPUS - 1} (the kernel's largest NR_CPUS)", whole
            )
        value = int(digits, 16) if digits else 0
        if not value and not allow_empty:
            raise CpuSetError(f"mask {shorten(whole)} selects no CPU", whole)
        return cls(_from_bits(value))

    # --- formatting -------------------------------------------------------------
    def format(self) -> str:
        """Kernel cpulist form: ``0-3,8``; the empty set formats as ``''``."""
        return _format(self.cpus)

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
        """The CPUs as a bitmask (bit N: CPU N)."""
        if not self.cpus:
            return 0
        buf = bytearray((max(self.cpus) >> 3) + 1)
        for c in self.cpus:
            buf[c >> 3] |= 1 << (c & 7)
        return int.from_bytes(buf, "little")

    @classmethod
    def from_bits(cls, value: int) -> "CpuSet":
        """The CPUs of a bitmask (bit N: CPU N); raise CpuSetError past MAX_CPUS."""
        if value < 0 or value.bit_length() > MAX_CPUS:
            raise CpuSetError(f"bitmask names CPUs beyond {MAX_CPUS - 1}", "")
        return cls(_from_bits(value))

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


@lru_cache(maxsize=4096)
def _format(cpus: frozenset[int]) -> str:
    # A host's pins repeat the same few sets: a bulk pass logs thousands of them.
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in CpuSet(cpus).ranges())


def _parse_part(part: str, whole: str) -> int:
    """One element of a CPU list as a bitmask."""
    p = part.strip()
    if p == "":
        raise CpuSetError(f"empty element in CPU list {shorten(whole)}", part)
    stride = 1
    if ":" in p:
        rng, _, st = p.partition(":")
        if "-" not in rng:
            raise CpuSetError(f"stride {shorten(p)} needs a range (like 0-15:2) in {shorten(whole)}", p)
        stride = _num(st, whole)
        if stride == 0:
            raise CpuSetError(f"stride 0 in {shorten(p)} of {shorten(whole)}", p)
        p = rng
    if "-" in p:
        lo_s, _, hi_s = p.partition("-")
        if lo_s.strip() == "" or hi_s.strip() == "":
            raise CpuSetError(f"bad range {shorten(part.strip())} in {shorten(whole)}", part.strip())
        try:
            lo, hi = _num(lo_s, whole), _num(hi_s, whole)
        except CpuSetError as e:
            # A number too large says why; anything else is just a bad range.
            why = f": {str(e).removesuffix(f' in {shorten(whole)}')}" if " out of range " in str(e) else ""
            raise CpuSetError(f"bad range {shorten(part.strip())}{why} in {shorten(whole)}", part.strip()) from e
        if hi < lo:
            raise CpuSetError(f"range {shorten(part.strip())} runs backwards in {shorten(whole)}", part.strip())
        span = (1 << (hi + 1)) - (1 << lo)  # bits lo..hi
        return span if stride == 1 else (_stride_pattern(stride) << lo) & span
    return 1 << _num(p, whole)
