"""CPU pools: the top-level `pools` definitions and the policy keys that take CPUs from them.

`pools` (main file only) names sets of host CPUs in file order, ``name: {cpus: LIST,
exclusive: BOOL}``; pools must not overlap. A policy's ``vcpus: {pool: P, smt, numa, cache}``,
``emulatorpin: {pool: P}`` or ``{isolate: true}``, and ``on_exhausted`` refer to them; the
rules that depend on each other are checked in :func:`check_pool_rules`.
"""

# Decisions about pools, in one place:
#
# * Pools must not overlap; CPUs in no pool are fine (host housekeeping). `leave` and
#   `fail` are not pool names (see on_exhausted). An empty `pools:` holds none.
# * `vcpus: {pool: P, smt: S, numa: N, cache: C}`: with an exclusive pool each vCPU gets a
#   dedicated CPU of P (Policy.vcpus_rule; Policy.vcpus is None); smt/numa/cache pick which
#   (pools.SMT_MODES etc., default "any"). With a non-exclusive pool the vCPUs float over all
#   of P's CPUs, exactly as if its CPU list were written out (Policy.vcpus; vcpus_rule is
#   None), and smt/numa/cache are errors. `vcpupin` together with an exclusive `vcpus` pool
#   is an error (which vCPU gets which dedicated CPU would be ambiguous); with a CPU list or
#   a non-exclusive pool, vcpupin wins for its indices.
# * `emulatorpin: {pool: P}` floats the emulator threads over a non-exclusive pool
#   (Policy.emulatorpin = its CPUs, Policy.emulator_pool = P); `{isolate: true}` asks for one
#   more dedicated CPU from the exclusive vcpus pool (Policy.emulator_isolate);
#   `{isolate: false}` or `{}` is no rule.
# * `on_exhausted` (only with an exclusive vcpus pool) says what a VM does while its pool
#   has too few free CPUs: `leave` (the default: unpinned until CPUs free up), `fail`
#   (reported as a failure, also retried) or the name of a non-exclusive pool to float over.
# * A pool with any error is entered in Ctx.pools as None: policies naming it are not told
#   again that something is wrong with it.

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from yaml.nodes import MappingNode, Node

from ..cpuset import CpuSet, shorten
from ..pools import CACHE_MODES, NUMA_MODES, SMT_MODES, PlacementRule, PoolSpec
from .cpus import cpus
from .fields import Ctx, Field, apply_schema, boolean, choice, scalar_text, suggest
from .issues import Batch, Invalid
from .model import ON_EXHAUSTED_MODES, FrozenMap
from .yamlpos import BOOL, NULL, TEXT_TAGS, Entry, describe

# At most this many pools (each holds at least one CPU and they must not overlap; a host has
# at most MAX_CPUS), and this many overlaps spelled out.
MAX_POOLS = 1024
MAX_OVERLAPS_SHOWN = 20


def pools(ctx: Ctx, node: Node, key: str) -> FrozenMap[str, PoolSpec]:
    """The pools by name; each one is also entered in ``ctx.pools`` (None if it is broken)."""
    if not isinstance(node, MappingNode):
        raise ctx.invalid(
            node,
            f"{key!r} must be a mapping of pool name to {{cpus: LIST, exclusive: BOOL}}, got {describe(node)}",
            key,
        )
    if len(node.value) > MAX_POOLS:
        raise ctx.invalid(node, f"{key!r} defines {len(node.value)} pools: at most {MAX_POOLS} are allowed", key)
    out: dict[str, PoolSpec] = {}
    bits_of: dict[str, int] = {}  # every pool whose CPUs parse, bad or not otherwise, as a bitmask
    taken = 0  # the CPUs of all of them
    shown = 0  # overlaps reported
    unreported = 0  # pools overlapping an earlier one in a way not reported
    first_unreported: Node | None = None
    first_at: dict[str, Node] = {}
    batch = Batch()
    for _, knode, vnode in ctx.entries(node, key + "[{}]", batch):
        name = None
        with batch.catch():
            name = _pool_name(ctx, knode, key)
        if name is None:
            continue
        if name in first_at:  # `1:` and `"1":` are different YAML keys but the same name
            first_line = first_at[name].start_mark.line + 1
            batch.add(ctx.issue(knode, f"duplicate pool {shorten(name)} (first at line {first_line})", key))
            continue
        first_at[name] = knode
        ctx.pools[name] = None  # known, so references to it are not "unknown"
        path = f"{key}[{name}]"
        if not isinstance(vnode, MappingNode):
            example = '{cpus: "4-31", exclusive: true}'
            batch.add(ctx.issue(
                vnode, f"pool {shorten(name)} must be a mapping like {example}, got {describe(vnode)}", path
            ))
            continue
        own = Batch()
        entries = ctx.entries(vnode, path + ".{}", own)
        values = apply_schema(ctx, vnode, entries, POOL_FIELDS, f" in pool {shorten(name)}", own, prefix=path + ".")
        if "cpus" in values:  # overlaps are checked even if another key of the pool is wrong
            # Bitmasks against the union of the pools so far: linear in the pools, and only a
            # few overlaps are spelled out (1,000 pools on the same CPUs are 499,500 pairs).
            cpus_node = next(e.vnode for e in entries if e.key == "cpus")
            bits = values["cpus"].bits()
            if bits & taken:
                complete = True
                for other, other_bits in bits_of.items():
                    common_bits = other_bits & bits
                    if not common_bits:
                        continue
                    if shown >= MAX_OVERLAPS_SHOWN:
                        complete = False
                        break
                    shown += 1
                    common = CpuSet.from_bits(common_bits)
                    what = f"CPU {common}" if len(common) == 1 else f"CPUs {common}"
                    batch.add(ctx.issue(
                        cpus_node, f"pools {shorten(other)} and {shorten(name)} overlap on {what}", path + ".cpus",
                    ))
                if not complete:
                    unreported += 1
                    first_unreported = first_unreported or cpus_node
            bits_of[name] = bits
            taken |= bits
        with batch.catch():
            own.check()
            # Kept even when overlapping: the policies naming it are checked as usual.
            spec = PoolSpec(name=name, **values)
            ctx.pools[name] = spec
            out[name] = spec
    if first_unreported is not None:
        batch.add(ctx.issue(
            first_unreported,
            f"... and {unreported} more pool{'s' if unreported > 1 else ''} overlapping earlier ones "
            f"(only the first {MAX_OVERLAPS_SHOWN} overlaps are listed), from here on",
            key,
        ))
    batch.check()
    return FrozenMap(out)


def _pool_name(ctx: Ctx, knode: Node, key: str) -> str:
    if knode.tag in (BOOL, NULL):
        raise ctx.invalid(knode, f"pool names in {key!r} must be text, got {describe(knode)}", key)
    if knode.tag not in TEXT_TAGS:
        raise Invalid()  # an unsupported tag, reported with the file's tags
    text: str = knode.value
    if not text.strip() or not text.isprintable():
        raise ctx.invalid(knode, f"pool name {shorten(text)} in {key!r} must be non-empty printable text", key)
    if text in ON_EXHAUSTED_MODES:
        raise ctx.invalid(
            knode, f"{shorten(text)} cannot be a pool name: 'on_exhausted: {text}' means something else", key
        )
    return text


def _unknown_pool(
    ctx: Ctx, node: Node, key: str, text: str, extra: tuple[str, ...] = (), expected: str = ""
) -> Invalid:
    names = list(ctx.pools)
    hint = suggest(text, [*names, *extra])
    if not hint and not names:
        hint = " (no pools are defined: add them under the top-level 'pools')"
    return ctx.invalid(node, f"unknown pool {shorten(text)} for {key!r}{ctx.where}{expected}{hint}", key)


def pool_ref(ctx: Ctx, node: Node, key: str) -> str:
    """A defined pool's name; Invalid if unknown, or broken (reported at the pool)."""
    text = scalar_text(ctx, node, key, "a pool name")
    if text not in ctx.pools:
        raise _unknown_pool(ctx, node, key, text)
    if ctx.pools[text] is None:
        raise Invalid()  # the pool's own issues say why
    return text


_VCPUS_EXPECTED = 'a CPU list like "0-3,8" or a pool like {pool: NAME}'


def vcpus(ctx: Ctx, node: Node, key: str) -> tuple[CpuSet | None, PlacementRule | None]:
    """(CPUs to float over, None) or (None, the rule for dedicated CPUs)."""
    if not isinstance(node, MappingNode):
        return cpus(ctx, node, key, _VCPUS_EXPECTED), None
    batch = Batch()
    entries = ctx.entries(node, key + ".{}", batch)
    values = apply_schema(ctx, node, entries, VCPUS_FIELDS, ctx.container(key), batch, prefix=key + ".")
    batch.check()
    name = values.pop("pool")
    spec = ctx.pools[name]
    assert spec is not None
    if spec.exclusive:
        return None, PlacementRule(pool=name, **values)
    for text, knode, _ in entries:
        if text in values:
            batch.add(
                ctx.issue(
                    knode,
                    f"'{key}.{text}'{ctx.where}: smt/numa/cache only apply to an exclusive pool; "
                    f"pool {shorten(name)} is not exclusive, its vCPUs float over all of its CPUs",
                    f"{key}.{text}",
                )
            )
    batch.check()
    return spec.cpus, None


class Emulator(NamedTuple):
    """A converted `emulatorpin`, split into Policy fields by the policy schema."""

    cpus: CpuSet | None
    pool: str | None = None
    isolate: bool = False
    isolate_node: Node | None = None  # where to report an isolate that has no pool to come from


_EMULATOR_EXPECTED = 'a CPU list like "0-3,8", a pool like {pool: NAME} or {isolate: true}'


def emulatorpin(ctx: Ctx, node: Node, key: str) -> Emulator:
    if not isinstance(node, MappingNode):
        return Emulator(cpus(ctx, node, key, _EMULATOR_EXPECTED))
    batch = Batch()
    entries = ctx.entries(node, key + ".{}", batch)
    values = apply_schema(ctx, node, entries, EMULATOR_FIELDS, ctx.container(key), batch, prefix=key + ".")
    given = {e.key: e for e in entries}
    if "pool" in given and "isolate" in given:
        batch.add(ctx.issue(node, f"{key!r}{ctx.where} takes either 'pool' or 'isolate', not both", key))
    batch.check()
    if "pool" in given:
        name = values["pool"]
        spec = ctx.pools[name]
        assert spec is not None
        if spec.exclusive:
            raise ctx.invalid(
                given["pool"].vnode,
                f"pool {shorten(name)} for '{key}.pool'{ctx.where} is exclusive: its CPUs are for vCPUs only; "
                f"use '{key}: {{isolate: true}}' for a dedicated emulator CPU from the vcpus pool",
                key + ".pool",
            )
        return Emulator(spec.cpus, pool=name)
    isolate = values.get("isolate", False)
    return Emulator(None, isolate=isolate, isolate_node=given["isolate"].knode if isolate else None)


def on_exhausted(ctx: Ctx, node: Node, key: str) -> str:
    text = scalar_text(ctx, node, key, "'leave', 'fail' or the name of a non-exclusive pool")
    if text in ON_EXHAUSTED_MODES:
        return text
    if text not in ctx.pools:
        raise _unknown_pool(
            ctx, node, key, text, ON_EXHAUSTED_MODES, ": expected 'leave', 'fail' or a non-exclusive pool"
        )
    spec = ctx.pools[text]
    if spec is None:
        raise Invalid()  # the pool's own issues say why
    if spec.exclusive:
        raise ctx.invalid(
            node,
            f"{key!r}{ctx.where} names exclusive pool {shorten(text)}: a VM waiting for dedicated CPUs can only "
            "float over a non-exclusive pool (or use 'leave' or 'fail')",
            key,
        )
    return text


def check_pool_rules(ctx: Ctx, entries: list[Entry], values: dict[str, Any], batch: Batch) -> None:
    """Rules that depend on each other: vcpus pool vs vcpupin, isolate and on_exhausted."""
    keys = {e.key: e.knode for e in entries}
    if "vcpus" in keys and "vcpus" not in values:
        return  # a broken vcpus is reported; what it would have allowed is unknown
    rule = values["vcpus"][1] if "vcpus" in values else None
    if rule is not None and "vcpupin" in keys:
        batch.add(
            ctx.issue(
                keys["vcpupin"],
                f"'vcpupin'{ctx.where} cannot be combined with 'vcpus: {{pool: {rule.pool}}}': exclusive pool "
                f"{rule.pool!r} chooses every vCPU's CPU, so pinning some of them too is ambiguous; "
                "use one or the other",
                "vcpupin",
            )
        )
    if rule is not None:
        return
    emulator = values.get("emulatorpin")
    if emulator is not None and emulator.isolate:
        batch.add(
            ctx.issue(
                emulator.isolate_node,
                f"'emulatorpin: {{isolate: true}}'{ctx.where} needs 'vcpus: {{pool: ...}}' with an exclusive pool "
                "to take the emulator's dedicated CPU from",
                "emulatorpin.isolate",
            )
        )
    if "on_exhausted" in keys:
        batch.add(
            ctx.issue(
                keys["on_exhausted"],
                f"'on_exhausted'{ctx.where}: on_exhausted only applies to vcpus: {{pool: ...}} with an exclusive pool",
                "on_exhausted",
            )
        )


POOL_FIELDS: Mapping[str, Field] = {
    "cpus": Field(cpus, required=True),
    "exclusive": Field(boolean),
}

VCPUS_FIELDS: Mapping[str, Field] = {
    "pool": Field(pool_ref, required=True),
    "smt": Field(choice(SMT_MODES)),
    "numa": Field(choice(NUMA_MODES)),
    "cache": Field(choice(CACHE_MODES)),
}

EMULATOR_FIELDS: Mapping[str, Field] = {
    "pool": Field(pool_ref),
    "isolate": Field(boolean),
}
