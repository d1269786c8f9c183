"""YAML text to positioned nodes: composing, tags, merge keys and duplicate keys; no schema.

The text is composed into PyYAML's node tree, never constructed, so every node keeps its
FILE:LINE:COL and its source text (a scalar is taken as typed, not as YAML 1.1 reads it).
Anchors, aliases and merge keys (``<<: *base`` or ``<<: [*a, *b]``) follow YAML's rules:
keys written out win over merged ones, earlier merge sources over later ones.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .issues import ConfigIssue, Invalid, Position

# libyaml's parser and composer, in C; None when PyYAML was built without it
_LibyamlLoader: type[yaml.CSafeLoader] | None = getattr(yaml, "CSafeLoader", None)

TAG = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL = (TAG + t for t in ("str", "int", "float", "bool", "null"))
TIMESTAMP, VALUE, MERGE, MAP, SEQ = (TAG + t for t in ("timestamp", "value", "merge", "map", "seq"))
# Scalars whose source text is used as typed.
TEXT_TAGS = frozenset({STR, INT, FLOAT, TIMESTAMP, VALUE, MERGE})
SCALAR_TAGS = TEXT_TAGS | {BOOL, NULL}


# Bounds on one file's YAML: nodes as written (the pure-Python composer takes ~30 us and ~600
# bytes a node), and nodes and scalar characters once every alias is expanded (what the schema
# walk and its messages can cost; an alias bomb is small as written).
MAX_NODES = 100_000
MAX_EXPANDED_NODES = 200_000
MAX_EXPANDED_CHARS = 4 << 20


class _TooManyNodes(Exception):
    def __init__(self, mark: yaml.Mark | None) -> None:
        super().__init__()
        self.mark = mark


class _CountingLoader(yaml.SafeLoader):
    """The safe loader's composer, refusing a document of more than MAX_NODES nodes."""

    nodes = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _TooManyNodes(self.peek_event().start_mark)
        node: Node | None = super().compose_node(parent, index)
        return node


# libyaml composes the same nodes at the same positions as PyYAML's own parser, 20 times faster
# (0.2 ms for the example config instead of 3.4 ms), for the YAML configs are written in. Fuzzed
# against PyYAML it differs where PyYAML refuses or reads otherwise: tabs, byte-order marks, line
# breaks other than LF, tags (!), block scalars (| >), '?' keys, the reserved ` @ %; and it puts
# an empty value after the blanks that follow its ':' where PyYAML puts it right after the ':'.
# So libyaml (``fast=True``) only takes text without the first three at all, with the others in
# comments only (and no quoted scalar over several lines, where a '#' is no comment), and short
# enough that it cannot hold MAX_NODES nodes (a node takes at least a third of a character: "?"
# alone is three). Every YAML error comes from PyYAML, and the loader reads a config with any
# issue again through PyYAML, whose positions of empty values its messages give.
FAST_MAX_CHARS = MAX_NODES // 4
_FAST_NEVER = re.compile("[\t\r\x85\u2028\u2029\ufeff]")  # not even in comments
_FAST_REFUSED = re.compile(r"[!|>`@%?]")  # allowed in comments
# One line: its content (plain text, '#' inside a word, quoted scalars closed on the line), an
# optional comment, the line break.
_LINE = re.compile(r"""((?:[^'"#\n]|(?<=\S)#|'(?:[^'\n]|'')*'|"(?:[^"\\\n]|\\.)*")*)(?:(?<!\S)#[^\n]*)?(?:\n|\Z)""")


def fast_composable(text: str) -> bool:
    """Whether libyaml composes ``text`` as PyYAML would (see FAST_MAX_CHARS)."""
    if _LibyamlLoader is None or len(text) > FAST_MAX_CHARS or _FAST_NEVER.search(text):
        return False
    if not _FAST_REFUSED.search(text):
        return True
    pos, end = 0, len(text)
    while pos < end:
        m = _LINE.match(text, pos)
        if m is None or m.end() == pos or _FAST_REFUSED.search(m.group(1)):
            return False  # a quoted scalar over several lines, or such a character outside comments
        pos = m.end()
    return True


class Entry(NamedTuple):
    """One key of a mapping: its text, the key node and the value node."""

    key: str
    knode: Node
    vnode: Node


class Document:
    """One file's node tree and what it knows about it: positions and flattened merge sources."""

    def __init__(self, file: str, root: Node | None) -> None:
        self.file = file
        self.root = root  # None: an empty file
        # Merge sources flattened so far, and those being flattened, by id(node).
        self._flattened: dict[int, list[Entry]] = {}
        self._flattening: set[int] = set()

    def pos(self, node: Node) -> Position:
        mark = node.start_mark
        return Position(self.file, mark.line + 1, mark.column + 1)

    def issue(self, at: Node | Position, message: str, key: str | None = None) -> ConfigIssue:
        return ConfigIssue(at if isinstance(at, Position) else self.pos(at), message, key)

    def tag_issues(self) -> list[ConfigIssue]:
        """Explicit tags the safe loader would refuse (!!python/..., !!binary, !custom)."""
        out: list[ConfigIssue] = []
        seen: set[int] = set()
        stack = [self.root] if self.root is not None else []
        while stack:
            node = stack.pop()
            if id(node) in seen:  # aliases share nodes and may even form cycles
                continue
            seen.add(id(node))
            if isinstance(node, ScalarNode):
                ok = node.tag in SCALAR_TAGS
            elif isinstance(node, SequenceNode):
                ok = node.tag == SEQ
                stack.extend(node.value)
            else:
                ok = node.tag == MAP
                for k, v in node.value:
                    stack.extend((k, v))
            if not ok:
                out.append(self.issue(node, f"unsupported YAML tag {short_tag(node.tag)!r}"))
        return out

    def expansion_issue(self) -> ConfigIssue | None:
        """An issue if the document, every alias expanded, exceeds MAX_EXPANDED_NODES or _CHARS.

        Aliases share nodes, so the sizes are computed once per node (children first, without
        recursion); an alias back into its own ancestors counts as one node.
        """
        if self.root is None:
            return None
        size: dict[int, tuple[int, int]] = {}  # id -> (nodes, characters) expanded
        on_path: set[int] = set()
        stack: list[tuple[Node, bool]] = [(self.root, False)]
        while stack:
            node, done = stack.pop()
            key = id(node)
            if done:
                nodes, chars = 1, 0
                for child in _children(node):
                    n, c = size.get(id(child), (1, 0))  # absent: a cycle back to an ancestor
                    nodes, chars = nodes + n, chars + c
                on_path.discard(key)
                size[key] = (min(nodes, MAX_EXPANDED_NODES + 1), min(chars, MAX_EXPANDED_CHARS + 1))
                if nodes > MAX_EXPANDED_NODES or chars > MAX_EXPANDED_CHARS:
                    return self.issue(
                        node,
                        f"aliases expand this to more than {MAX_EXPANDED_NODES} values or "
                        f"{MAX_EXPANDED_CHARS} characters (an alias bomb?)",
                    )
                continue
            if key in size or key in on_path:
                continue
            if isinstance(node, ScalarNode):
                size[key] = (1, len(node.value))
                continue
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in size)
        return None

    def entries(self, node: MappingNode, path: str = "{}") -> tuple[list[Entry], list[ConfigIssue]]:
        """The entries of a mapping, merge keys applied, and the issues found on the way.

        Duplicate and non-scalar keys are issues and their entries are left out; the rest
        is usable. ``path`` formats a key into the ConfigIssue.key reported for it. A merge
        source's own issues are reported only the first time it is merged.
        """
        issues: list[ConfigIssue] = []
        return self._entries(node, path, issues), issues

    def _entries(self, node: MappingNode, path: str, issues: list[ConfigIssue]) -> list[Entry]:
        own: list[Entry] = []
        first_at: dict[tuple[str, str], Node] = {}
        merged: list[Entry] = []
        for knode, vnode in node.value:
            if isinstance(knode, ScalarNode) and knode.tag == MERGE:
                merged.extend(self._merge_sources(vnode, path, issues))
                continue
            if not isinstance(knode, ScalarNode):
                issues.append(self.issue(knode, f"keys must be plain words, got {describe(knode)}"))
                continue
            ident = (knode.tag, knode.value)
            if ident in first_at:
                first_line = first_at[ident].start_mark.line + 1
                issues.append(
                    self.issue(knode, f"duplicate key {knode.value!r} (first at line {first_line})",
                               path.format(knode.value))
                )
                continue
            first_at[ident] = knode
            own.append(Entry(knode.value, knode, vnode))
        # YAML merge rules: written-out keys win, then earlier merge sources.
        taken = {(e.knode.tag, e.knode.value) for e in own}
        for entry in merged:
            if (entry.knode.tag, entry.knode.value) not in taken:
                taken.add((entry.knode.tag, entry.knode.value))
                own.append(entry)
        return own

    def _merge_sources(self, vnode: Node, path: str, issues: list[ConfigIssue]) -> list[Entry]:
        sources = vnode.value if isinstance(vnode, SequenceNode) else [vnode]
        out: list[Entry] = []
        for src in sources:
            if not isinstance(src, MappingNode):
                issues.append(
                    self.issue(src, f"merge key '<<' takes a mapping or a list of mappings, got {describe(src)}")
                )
                continue
            if id(src) in self._flattening:
                issues.append(self.issue(src, "merge key '<<' merges a mapping into itself"))
                continue
            if id(src) not in self._flattened:
                self._flattening.add(id(src))
                self._flattened[id(src)] = self._entries(src, path, issues)
                self._flattening.discard(id(src))
            out.extend(self._flattened[id(src)])
        return out


def compose(text: str, file: str, fast: bool = False) -> Document:
    """The node tree of ``text``; raise Invalid (one issue, positioned) if it is not YAML.

    ``fast``: through libyaml when :func:`fast_composable` says it reads ``text`` as PyYAML does
    (empty values aside: see FAST_MAX_CHARS), else and on any error through PyYAML.
    """
    if fast and fast_composable(text):
        fast_doc = _libyaml_compose(text, file)
        if fast_doc is not None:
            return fast_doc
    loader: _CountingLoader | None = None
    try:
        loader = _CountingLoader(text)  # checks the characters already
        doc = Document(file, loader.get_single_node())
    except _TooManyNodes as e:
        mark = e.mark
        msg = f"too much YAML: more than {MAX_NODES} values in one file"
        pos = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        # PyYAML's own order: "while parsing X at line N, expected Y, but found Z".
        parts = []
        if e.context:
            cmark = e.context_mark
            if cmark is None or mark is None or cmark.line == mark.line:
                parts.append(e.context)
            else:
                parts.append(f"{e.context} at line {cmark.line + 1}")
        if e.problem:
            parts.append(e.problem)
        msg = "invalid YAML: " + (", ".join(parts) or "syntax error")
        if e.problem and "'\\t'" in e.problem:
            msg += " (indent with spaces: YAML does not allow tabs there)"
        pos = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        msg = f"invalid YAML: unacceptable character #x{e.character:04x}: {e.reason}"
        pos = Position(file, line, col)
    except yaml.YAMLError as e:
        msg, pos = f"invalid YAML: {e}", Position(file, 1, 1)
    except RecursionError:
        msg, pos = "invalid YAML: nested too deeply", Position(file, 1, 1)
    else:
        too_big = doc.expansion_issue()
        if too_big is None:
            return doc
        raise Invalid(too_big)
    finally:
        if loader is not None:
            loader.dispose()
    raise Invalid(ConfigIssue(pos, msg))


def _libyaml_compose(text: str, file: str) -> Document | None:
    """libyaml's tree of ``text``; None for any error (PyYAML's composer then says what and where)."""
    if _LibyamlLoader is None:
        return None
    loader = None
    try:
        loader = _LibyamlLoader(text)
        doc = Document(file, loader.get_single_node())
    except Exception:  # noqa: BLE001 - not even a lone surrogate's UnicodeEncodeError is ours to report
        return None
    finally:
        if loader is not None:
            loader.dispose()
    return doc if doc.expansion_issue() is None else None


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == NULL


def short_tag(tag: str) -> str:
    return "!!" + tag[len(TAG):] if tag.startswith(TAG) else tag


def describe(node: Node) -> str:
    """What a node is, for messages: "a list", "a string ('x')", "a boolean (...)"."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    shown = node.value if len(node.value) <= 40 else node.value[:37] + "..."
    kinds = {
        STR: "a string",
        INT: "an integer",
        FLOAT: "a number",
        TIMESTAMP: "a date",
    }
    if node.tag == NULL:
        return "an empty value"
    if node.tag == BOOL:
        return f"a boolean ({shown!r}; YAML reads on/off/yes/no/true/false as booleans, quote it)"
    return f"{kinds.get(node.tag, 'a value')} ({shown!r})"
