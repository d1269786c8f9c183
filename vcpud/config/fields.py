"""Schema machinery: the per-load context, mapping fields and their converters, and generic converters.

A converter is ``(ctx, value node, key path) -> value``; it raises Invalid when the value
cannot be used. :func:`apply_schema` converts a mapping field by field and collects each
field's issues, so one bad key never hides the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..cpuset import MAX_CPUS, CpuSet, shorten
from ..pools import PoolSpec
from .issues import Batch, ConfigIssue, Invalid, Position
from .yamlpos import BOOL, NULL, SCALAR_TAGS, TEXT_TAGS, Document, Entry, describe, is_null


# How many CPUs all distinct CPU lists of one config may name together: 128 different lists of
# every CPU of the largest possible host; a config past that is not written by hand.
MAX_CPUS_NAMED = 128 * MAX_CPUS


def bounded_int(text: str, maximum: int) -> int | None:
    """The value of the digit string ``text`` if it is at most ``maximum``, else None.

    The length is checked before int(): config text can hold numbers of any length, and
    int() refuses more than 4,300 digits with a ValueError.
    """
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(maximum)):
        return None
    value = int(digits)
    return value if value <= maximum else None


class Ctx:
    """Mutable state of one load: the file being walked, the policy being read, the pools so far."""

    def __init__(self, online: CpuSet | None) -> None:
        self.online = online
        self.doc = Document("", None)
        self.label = ""  # "policy 'x'" (or "policy #3" before its name is known) inside a policy
        self.where = ""  # " in " + label, or "" outside policies
        self.policy_names: dict[str, Position] = {}
        # Pools by name; None for a pool whose definition has errors (already reported).
        self.pools: dict[str, PoolSpec | None] = {}
        # Every distinct CPU list parsed so far, so equal lists share one CpuSet, and how many
        # more CPUs distinct lists may still name (bounds the memory of a hostile config).
        self.cpusets: dict[CpuSet, CpuSet] = {}
        self.cpus_left = MAX_CPUS_NAMED
        self.policy_count = 0  # policies seen in all files so far, read or not
        self.fast_yaml = False  # compose through libyaml where it reads the file as PyYAML does

    def pos(self, node: Node) -> Position:
        return self.doc.pos(node)

    def issue(self, at: Node | Position, message: str, key: str | None = None) -> ConfigIssue:
        return self.doc.issue(at, message, key)

    def invalid(self, at: Node | Position, message: str, key: str | None = None) -> Invalid:
        """An Invalid with one issue, to raise."""
        return Invalid(self.doc.issue(at, message, key))

    def entries(self, node: MappingNode, path: str, batch: Batch) -> list[Entry]:
        """The mapping's usable entries; its duplicate keys and bad merges go to ``batch``."""
        entries, issues = self.doc.entries(node, path)
        batch.add(*issues)
        return entries

    def container(self, key: str) -> str:
        """How unknown-key errors name a sub-mapping: " in 'match' of policy 'a'"."""
        return f" in {key!r} of {self.label}" if self.label else f" in {key!r}"


Converter = Callable[[Ctx, Node, str], Any]


@dataclass(frozen=True)
class Field:
    """One key of a mapping in the schema."""

    convert: Converter
    required: bool = False
    nullable: bool = False  # an empty value means "not given"
    main_only: bool = False  # top level: not allowed in included files


def apply_schema(
    ctx: Ctx,
    node: MappingNode,
    entries: list[Entry],
    fields: Mapping[str, Field],
    container: str,
    batch: Batch,
    prefix: str = "",
    *,
    included: bool = False,
    extensions: bool = False,
    skip: frozenset[str] = frozenset(),
    hints: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Convert a mapping's entries by ``fields``; the fields that convert, by key.

    Unknown keys, missing required keys and each field's own issues go to ``batch``.
    """
    values: dict[str, Any] = {}
    present: set[str] = set()
    for key, knode, vnode in entries:
        present.add(key)
        if key in skip:
            continue
        spec = fields.get(key)
        if spec is None:
            if extensions and key.startswith("x-"):
                continue
            hint = (hints or {}).get(key) or suggest(key, fields)
            batch.add(ctx.issue(knode, f"unknown key {key!r}{container}{hint}", prefix + key))
            continue
        if included and spec.main_only:
            batch.add(
                ctx.issue(knode, f"{key!r} is only allowed in the main config file, not in an included one", key)
            )
            continue
        if spec.nullable and is_null(vnode):
            continue
        with batch.catch():
            values[key] = spec.convert(ctx, vnode, prefix + key)
    for key, spec in fields.items():
        if spec.required and key not in present:
            batch.add(ctx.issue(node, f"missing required key {key!r}{container}", prefix + key))
    return values


def suggest(key: str, fields: Iterable[str]) -> str:
    import difflib  # here: only a config with an unknown key needs it

    close = difflib.get_close_matches(key, list(fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def scalar_text(ctx: Ctx, node: Node, key: str, expected: str) -> str:
    """The text the user typed for a scalar; booleans, empty values and collections are Invalid."""
    if not isinstance(node, ScalarNode) or node.tag in (BOOL, NULL):
        raise ctx.invalid(node, f"{key!r}{ctx.where} must be {expected}, got {describe(node)}", key)
    if node.tag not in TEXT_TAGS:
        raise Invalid()  # an unsupported tag, reported with the file's tags
    text: str = node.value
    return text


def boolean(ctx: Ctx, node: Node, key: str) -> bool:
    if isinstance(node, ScalarNode) and node.tag == BOOL:
        return node.value.lower() in ("yes", "true", "on")
    if isinstance(node, ScalarNode) and node.tag not in SCALAR_TAGS:
        raise Invalid()  # an unsupported tag, reported with the file's tags
    raise ctx.invalid(node, f"{key!r}{ctx.where} must be true or false, got {describe(node)}", key)


def choice(options: tuple[str, ...]) -> Converter:
    """A converter taking one of ``options``, as typed."""
    listed = ", ".join(options)

    def convert(ctx: Ctx, node: Node, key: str) -> str:
        text = scalar_text(ctx, node, key, f"one of {listed}")
        if text not in options:
            raise ctx.invalid(
                node,
                f"bad value {shorten(text)} for {key!r}{ctx.where}: expected one of {listed}{suggest(text, options)}",
                key,
            )
        return text

    return convert


def text_list(ctx: Ctx, node: Node, key: str, expected: str) -> list[tuple[str, Node]]:
    """A string or a non-empty list of strings, each with its node for later errors."""
    items = node.value if isinstance(node, SequenceNode) else [node]
    if isinstance(node, SequenceNode) and not items:
        raise ctx.invalid(node, f"{key!r} must not be an empty list", key)
    out: list[tuple[str, Node]] = []
    batch = Batch()
    for item in items:
        with batch.catch():
            text = scalar_text(ctx, item, key, expected)
            if not text.strip():
                raise ctx.invalid(item, f"{key!r} must not contain an empty entry", key)
            if "\0" in text:  # no path can hold one; os calls would raise ValueError
                raise ctx.invalid(item, f"{key!r} entry {shorten(text)} contains a NUL character", key)
            out.append((text, item))
    batch.check()
    return out
