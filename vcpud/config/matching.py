"""A policy's `match`: which VMs it is for (name glob, UUID, cmdline regex, user, vCPU count)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from yaml.nodes import MappingNode, Node

from ..cpuset import shorten
from .fields import Ctx, Field, apply_schema, bounded_int, scalar_text
from .issues import Batch
from .model import Match
from .yamlpos import describe

# Largest uid the kernel hands out; (uid_t)-1 means "no uid".
MAX_UID = 2**32 - 2
# vCPU ids are 32-bit in KVM; a larger count is a typo.
MAX_VCPU_COUNT = 2**32 - 1

_DIGITS = re.compile(r"[0-9]+\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*\$?\Z")
_COUNT_RANGE = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?\Z")


def match(ctx: Ctx, node: Node, key: str) -> Match:
    if not isinstance(node, MappingNode):
        raise ctx.invalid(
            node, f"{key!r}{ctx.where} must be a mapping (use {{}} to match every VM), got {describe(node)}", key
        )
    batch = Batch()
    entries = ctx.entries(node, key + ".{}", batch)
    values = apply_schema(ctx, node, entries, MATCH_FIELDS, ctx.container(key), batch, prefix=key + ".")
    batch.check()
    return Match(**values)


def glob(ctx: Ctx, node: Node, key: str) -> str:
    text = scalar_text(ctx, node, key, "a name or glob pattern")
    if not text:
        raise ctx.invalid(node, f"{key!r}{ctx.where} must not be empty", key)
    return text


def uuid(ctx: Ctx, node: Node, key: str) -> str:
    text = scalar_text(ctx, node, key, "a UUID")
    if not _UUID.match(text.strip()):
        raise ctx.invalid(node, f"bad UUID {shorten(text)} for {key!r}{ctx.where}: expected 8-4-4-4-12 hex digits", key)
    return text.strip().lower()


def regex(ctx: Ctx, node: Node, key: str) -> re.Pattern[str]:
    text = scalar_text(ctx, node, key, "a regular expression")
    try:
        return re.compile(text)
    except re.error as e:
        where = f" at position {e.pos}" if e.pos is not None else ""
        message = f"invalid regex {shorten(text)} for {key!r}{ctx.where}: {e.msg}{where}"
    except (RecursionError, OverflowError):
        message = f"invalid regex {shorten(text)} for {key!r}{ctx.where}: too complex"
    raise ctx.invalid(node, message, key)


def user(ctx: Ctx, node: Node, key: str) -> str:
    text = scalar_text(ctx, node, key, "a user name or uid").strip()
    if _DIGITS.match(text):
        uid = bounded_int(text, MAX_UID)
        if uid is None:
            shown = text if len(text) <= 40 else shorten(text)
            raise ctx.invalid(node, f"uid {shown} for {key!r}{ctx.where} is out of range (max {MAX_UID})", key)
        return str(uid)
    if not _USER_NAME.match(text):
        raise ctx.invalid(
            node, f"bad user {shorten(text)} for {key!r}{ctx.where}: expected a user name or a numeric uid", key
        )
    return text


def count_range(ctx: Ctx, node: Node, key: str) -> tuple[int, int]:
    text = scalar_text(ctx, node, key, 'a vCPU count like 4 or a range like "4-16"')
    m = _COUNT_RANGE.match(text)
    if not m:
        raise ctx.invalid(
            node,
            f"bad vCPU count {shorten(text)} for {key!r}{ctx.where}: expected a count like 4 or a range like \"4-16\"",
            key,
        )
    lo = bounded_int(m.group(1), MAX_VCPU_COUNT)
    hi = bounded_int(m.group(2), MAX_VCPU_COUNT) if m.group(2) is not None else lo
    if lo is None or hi is None:
        raise ctx.invalid(
            node, f"bad vCPU count {shorten(text)} for {key!r}{ctx.where}: out of range (max {MAX_VCPU_COUNT})", key
        )
    if lo < 1:
        raise ctx.invalid(
            node, f"bad vCPU count {shorten(text)} for {key!r}{ctx.where}: a guest has at least 1 vCPU", key
        )
    if hi < lo:
        raise ctx.invalid(
            node, f"bad vCPU count range {shorten(text)} for {key!r}{ctx.where}: {lo} is more than {hi}", key
        )
    return (lo, hi)


MATCH_FIELDS: Mapping[str, Field] = {
    "name": Field(glob),
    "uuid": Field(uuid),
    "cmdline": Field(regex),
    "user": Field(user),
    "vcpus": Field(count_range),
}
