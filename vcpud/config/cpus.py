"""CPU-list rules of a policy: plain CPU lists (checked against the online CPUs), vcpupin, iothreadpin.

A CPU list is the source text as typed, so ``0x100`` is the mask for CPU 8 (YAML would say
256) and ``010`` is CPU 10 (YAML would say 8).
"""

from __future__ import annotations

import re

from yaml.nodes import MappingNode, Node

from ..cpuset import CpuSet, CpuSetError, shorten
from .fields import MAX_CPUS_NAMED, Ctx, bounded_int, scalar_text
from .issues import Batch
from .model import FrozenMap
from .yamlpos import INT, STR, describe

_DIGITS = re.compile(r"[0-9]+\Z")
# QEMU's id_wellformed(): what `-object iothread,id=...` accepts.
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")

CPUS_EXPECTED = 'a CPU list like "0-3,8"'
# vCPU ids are 32-bit in KVM; a larger index is a typo.
MAX_VCPU_INDEX = 2**32 - 1


def cpus(ctx: Ctx, node: Node, key: str, expected: str = CPUS_EXPECTED) -> CpuSet:
    text = scalar_text(ctx, node, key, expected)
    try:
        found = CpuSet.parse(text)
    except CpuSetError as e:
        detail = str(e).removesuffix(f" in {shorten(text.strip())}")
        raise ctx.invalid(node, f"bad CPU list {shorten(text)} for {key!r}{ctx.where}: {detail}", key) from None
    known = ctx.cpusets.get(found)
    if known is not None:
        found = known
    else:
        ctx.cpus_left -= len(found)
        if ctx.cpus_left < 0:
            raise ctx.invalid(
                node,
                f"{key!r}{ctx.where}: too many different CPU lists: together they name more than "
                f"{MAX_CPUS_NAMED} CPUs",
                key,
            )
        ctx.cpusets[found] = found
    if ctx.online is not None:
        missing = found - ctx.online
        if missing:
            what = f"CPU {missing} is" if len(missing) == 1 else f"CPUs {missing} are"
            online = ctx.online.format() or "none"
            raise ctx.invalid(node, f"{key!r}{ctx.where}: {what} not online on this host (online: {online})", key)
    return found


def vcpupin(ctx: Ctx, node: Node, key: str) -> FrozenMap[int, CpuSet]:
    if not isinstance(node, MappingNode):
        raise ctx.invalid(
            node, f"{key!r}{ctx.where} must be a mapping of vCPU index to CPU list, got {describe(node)}", key
        )
    pins: dict[int, CpuSet] = {}
    first_at: dict[int, Node] = {}
    batch = Batch()
    for text, knode, vnode in ctx.entries(node, key + "[{}]", batch):
        # The source text, so that `010:` is vCPU 10 and `0x1:` is refused.
        if knode.tag not in (INT, STR) or not _DIGITS.match(text):
            batch.add(
                ctx.issue(knode, f"{key!r} keys must be vCPU indexes (integers from 0), got {describe(knode)}", key)
            )
            continue
        index = bounded_int(text, MAX_VCPU_INDEX)
        if index is None:
            batch.add(
                ctx.issue(knode, f"vCPU index {shorten(text)} in {key!r}{ctx.where} is out of range "
                                 f"(max {MAX_VCPU_INDEX})", key)
            )
            continue
        if index in first_at:  # `0:` and `"0":` are different YAML keys but the same vCPU
            first_line = first_at[index].start_mark.line + 1
            batch.add(ctx.issue(knode, f"duplicate vCPU {index} in {key!r} (first at line {first_line})", key))
            continue
        first_at[index] = knode
        with batch.catch():
            pins[index] = cpus(ctx, vnode, f"{key}[{index}]")
    batch.check()
    return FrozenMap(sorted(pins.items()))


def iothreadpin(ctx: Ctx, node: Node, key: str) -> tuple[CpuSet | None, FrozenMap[str, CpuSet]]:
    """(CPUs for every IO thread, None) or (None, CPUs by IO thread id)."""
    expected = 'a CPU list like "0-3,8" or a mapping of IO thread id to CPU list'
    if not isinstance(node, MappingNode):
        return cpus(ctx, node, key, expected), FrozenMap()
    pins: dict[str, CpuSet] = {}
    batch = Batch()
    for text, knode, vnode in ctx.entries(node, key + "[{}]", batch):
        if knode.tag != STR or not _QEMU_ID.match(text):
            batch.add(
                ctx.issue(
                    knode,
                    f"bad IO thread id {shorten(text)} in {key!r}{ctx.where}: QEMU ids start with a letter, "
                    "then letters, digits, '-', '.' or '_'",
                    key,
                )
            )
            continue
        with batch.catch():
            pins[text] = cpus(ctx, vnode, f"{key}[{text}]")
    batch.check()
    return None, FrozenMap(pins)
