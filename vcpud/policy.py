"""The policy config: its YAML schema, validation with FILE:LINE:COL errors, and VM matching."""

# Decisions about the config format, in one place:
#
# * The YAML is composed into a node tree (never safe_load'ed) so that every
#   error can point at the offending key or value, duplicate keys can be seen,
#   and YAML 1.1's number forms do not leak in: a CPU list, a vCPU index or a
#   name is taken as the source text the user typed, so `emulatorpin: 0x100` is
#   the mask for CPU 8 (YAML would say 256) and `vcpus: 010` is CPU 10 (YAML
#   would say 8). Only booleans (on/off/yes/no/true/false) and empty values are
#   refused where text is expected; quoting them fixes that.
# * Anchors and aliases are allowed, and so are merge keys (`<<: *base` or
#   `<<: [*a, *b]`) with YAML's rules: keys written out win over merged ones,
#   earlier merge sources win over later ones. Top-level keys starting with
#   `x-` are ignored, to give anchors a home outside any policy.
# * An empty value (`key:`) is an error except for `policies:` and `pools:`,
#   which then hold none. An empty file is a config without policies.
# * A policy without any pinning rule is allowed: it claims the VM (later
#   policies are not tried) and leaves all its threads where they are.
# * `include` (main file only) takes a glob or a list of globs, relative to the
#   including file's directory. Each glob's files are read in name order, globs
#   in the order given, all after the main file; a file matched twice (or the
#   main file itself) is read once. Included files hold only `policies:` (and
#   `x-` keys); an `include` inside one is an error. Policies are tried in that
#   same order: the main file's first.
# * ConfigIssue.key is the key's path inside its policy or the top level, as in
#   "emulatorpin", "match.cmdline", "vcpupin[3]", "iothreadpin[io1]", "include",
#   "vcpus.pool", "pools[dedicated].cpus", "metrics.listen".
# * `pools` (main file only; an empty `pools:` holds none) names sets of host
#   CPUs, in file order: `name: {cpus: LIST, exclusive: BOOL}` (exclusive
#   defaults to false). Pools must not overlap; CPUs in no pool are fine (host
#   housekeeping). `leave` and `fail` are not pool names (see on_exhausted).
#   The pools are read before the policies wherever `pools` stands in the file.
# * `vcpus: {pool: P, smt: S, numa: N, cache: C}`: with an exclusive pool each
#   vCPU gets a dedicated CPU of P (Policy.vcpus_rule; Policy.vcpus is None);
#   smt/numa/cache pick which (pools.SMT_MODES etc., default "any"). With a
#   non-exclusive pool the vCPUs float over all of P's CPUs, exactly as if its
#   CPU list were written out (Policy.vcpus; vcpus_rule is None), and
#   smt/numa/cache are errors. `vcpupin` together with an exclusive `vcpus`
#   pool is an error (which vCPU gets which dedicated CPU would be ambiguous);
#   with a CPU list or a non-exclusive pool, vcpupin wins for its indices.
# * `emulatorpin: {pool: P}` floats the emulator threads over a non-exclusive
#   pool (Policy.emulatorpin = its CPUs, Policy.emulator_pool = P);
#   `{isolate: true}` asks for one more dedicated CPU from the exclusive vcpus
#   pool (Policy.emulator_isolate); `{isolate: false}` or `{}` is no rule.
# * `on_exhausted` (only with an exclusive vcpus pool) says what a VM does
#   while its pool has too few free CPUs: `leave` (the default: unpinned until
#   CPUs free up), `fail` (reported as a failure, also retried) or the name of
#   a non-exclusive pool to float over meanwhile.
# * `metrics: {listen: HOST:PORT}` (main file only), IPv6 hosts in brackets
#   ("[::1]:9474"); `off` (quoted or not, or `false`/`no`) turns metrics off.
#   `state_file` (main file only) is an absolute path.

from __future__ import annotations

import codecs
import difflib
import fnmatch
import glob
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .cpuset import CpuSet, CpuSetError
from .discovery import DEFAULT_EXECUTABLES
from .pools import CACHE_MODES, NUMA_MODES, SMT_MODES, PlacementRule, PoolSpec

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/vcpud/vcpud.yaml")
DEFAULT_RESCAN_INTERVAL = 10.0
# Longer waits overflow some timer APIs and are surely a typo anyway.
MAX_RESCAN_INTERVAL = 86400.0
# Largest uid the kernel hands out; (uid_t)-1 means "no uid".
MAX_UID = 2**32 - 2
DEFAULT_METRICS_LISTEN = "127.0.0.1:9474"
DEFAULT_STATE_FILE = Path("/var/lib/vcpud/state.json")
# What a policy's on_exhausted takes besides a pool name; no pool may be called so.
ON_EXHAUSTED_MODES = ("leave", "fail")

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
_TIMESTAMP, _VALUE, _MERGE, _MAP, _SEQ = (_TAG + t for t in ("timestamp", "value", "merge", "map", "seq"))
# Scalars whose source text is used as typed (see the notes at the top).
_TEXT_TAGS = frozenset({_STR, _INT, _FLOAT, _TIMESTAMP, _VALUE, _MERGE})
_SCALAR_TAGS = _TEXT_TAGS | {_BOOL, _NULL}

_DIGITS = re.compile(r"[0-9]+\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*\$?\Z")
# QEMU's id_wellformed(): what `-object iothread,id=...` accepts.
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_COUNT_RANGE = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?\Z")
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?\s*\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")

_INVALID: Any = object()  # a converter's "already reported" result

K = TypeVar("K")
V = TypeVar("V")


# --- errors -----------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """A place in a config file; line and column count from 1, like compilers do."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class ConfigIssue:
    pos: Position
    message: str
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.pos}: {self.message}"


class ConfigError(Exception):
    """Everything wrong with a config, one issue per line when printed."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.issues,))


# --- the parsed config ----------------------------------------------------------


class FrozenMap(Mapping[K, V]):
    """A read-only, hashable mapping, so policies stay hashable values."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(items)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

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


_NOWHERE = Position("<unknown>", 0, 0)


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
    pos: Position = _NOWHERE
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
    metrics_listen: str = DEFAULT_METRICS_LISTEN  # "host:port" ("[v6]:port") or "off"
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


# --- loading --------------------------------------------------------------------


def load_config(path: Path, online: CpuSet | None = None) -> Config:
    """Read ``path`` and the files it includes; raise ConfigError listing every issue.

    With ``online``, every CPU the config names must be one of them.
    """
    path = Path(path)
    shown = str(path)
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        issue = ConfigIssue(Position(shown, 1, 1), f"cannot read config file: {_os_reason(e)}")
        raise ConfigError([issue]) from None
    try:
        text = _decode(data)
    except UnicodeDecodeError as e:
        line, col = _byte_position(data, e.start)
        raise ConfigError(
            [ConfigIssue(Position(shown, line, col), f"not valid UTF-8: byte {data[e.start]:#04x}")]
        ) from None
    return parse_config_text(text, shown, online, base_dir=path.parent)


def parse_config_text(
    text: str,
    filename: str = "<string>",
    online: CpuSet | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Parse a main config given as text. Includes resolve against ``base_dir``;
    without one, an ``include`` is an error."""
    ctx = _Ctx(online)
    seen: set[str] = set()  # real paths read, so an include never re-reads a file
    try:
        seen.add(os.path.realpath(filename))
    except ValueError:  # a NUL in a made-up name; nothing on disk to skip
        pass
    try:
        top = _parse_file(ctx, text, filename, included=False)
        policies = list(top.pop("policies", []))
        includes = top.pop("include", [])
        for shown, inc_text in _read_includes(ctx, base_dir, includes, seen):
            policies.extend(_parse_file(ctx, inc_text, shown, included=True).get("policies", []))
    except RecursionError:
        # Only a pathological file gets here (the schema walk is shallow).
        ctx.issues.append(ConfigIssue(Position(ctx.file or filename, 1, 1), "config nests too deeply"))
    if ctx.issues:
        raise ConfigError(ctx.sorted_issues())
    if "metrics" in top:
        top["metrics_listen"] = top.pop("metrics")
    config = Config(policies=tuple(policies), files=tuple(ctx.files), **top)
    log.debug("loaded %d policies from %s", len(config.policies), ", ".join(config.files))
    return config


# --- parsing machinery ----------------------------------------------------------


class _Ctx:
    """Mutable state of one load: issues so far and the file being walked."""

    def __init__(self, online: CpuSet | None) -> None:
        self.online = online
        self.issues: list[ConfigIssue] = []
        self.files: list[str] = []
        self.file = ""
        self.label = ""  # "policy 'x'" (or "policy #3" before its name is known) inside a policy
        self.where = ""  # " in " + label, or "" outside policies
        self.policy_names: dict[str, Position] = {}
        # Pools by name; None for a pool whose definition has errors (already reported).
        self.pools: dict[str, PoolSpec | None] = {}
        # Merge sources flattened so far, and those being flattened, by id(node);
        # only valid within one file's node tree.
        self.flattened: dict[int, list[tuple[str, Node, Node]]] = {}
        self.flattening: set[int] = set()

    def start_file(self, name: str) -> None:
        self.file = name
        self.files.append(name)
        self.flattened.clear()
        self.flattening.clear()

    def pos(self, node: Node) -> Position:
        mark = node.start_mark
        return Position(self.file, mark.line + 1, mark.column + 1)

    def error(self, at: Node | Position, message: str, key: str | None = None) -> None:
        pos = at if isinstance(at, Position) else self.pos(at)
        self.issues.append(ConfigIssue(pos, message, key))

    def sorted_issues(self) -> list[ConfigIssue]:
        rank = {f: i for i, f in enumerate(self.files)}
        # A merged anchor with a bad value is reported once per use; keep one.
        unique = list(dict.fromkeys(self.issues))
        return sorted(unique, key=lambda i: (rank.get(i.pos.file, len(rank)), i.pos.line, i.pos.col))


@dataclass(frozen=True)
class _Field:
    """One key of a mapping in the schema."""

    convert: Callable[[_Ctx, Node, str], Any]  # (ctx, value node, key path) -> value or _INVALID
    required: bool = False
    nullable: bool = False  # an empty value means "not given"
    main_only: bool = False  # top level: not allowed in included files


def _parse_file(ctx: _Ctx, text: str, shown: str, included: bool) -> dict[str, Any]:
    ctx.start_file(shown)
    root = _compose(ctx, text)
    if root is None or root is _INVALID:
        return {}
    _check_tags(ctx, root)
    if not isinstance(root, MappingNode):
        ctx.error(root, f"a config file must be a mapping (like 'policies: [...]'), got {_describe(root)}")
        return {}
    # Pools first, so that policies above them in the file can name them.
    entries = sorted(_entries(ctx, root), key=lambda e: e[0] != "pools")
    return _apply_schema(
        ctx, root, entries, _TOP_FIELDS, " at top level",
        included=included, extensions=True, hints=_TOP_HINTS,
    )


def _compose(ctx: _Ctx, text: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        # PyYAML's own order: "while parsing X at line N, expected Y, but found Z".
        parts = []
        if e.context:
            cmark = e.context_mark
            same_line = cmark is None or mark is None or cmark.line == mark.line
            parts.append(e.context if same_line else f"{e.context} at line {cmark.line + 1}")
        if e.problem:
            parts.append(e.problem)
        msg = "invalid YAML: " + (", ".join(parts) or "syntax error")
        if e.problem and "'\\t'" in e.problem:
            msg += " (indent with spaces: YAML does not allow tabs there)"
        pos = Position(ctx.file, mark.line + 1, mark.column + 1) if mark else Position(ctx.file, 1, 1)
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        msg = f"invalid YAML: unacceptable character #x{e.character:04x}: {e.reason}"
        pos = Position(ctx.file, line, col)
    except yaml.YAMLError as e:
        msg, pos = f"invalid YAML: {e}", Position(ctx.file, 1, 1)
    except RecursionError:
        msg, pos = "invalid YAML: nested too deeply", Position(ctx.file, 1, 1)
    ctx.error(pos, msg)
    return _INVALID


def _check_tags(ctx: _Ctx, root: Node) -> None:
    """Refuse explicit tags the safe loader would refuse (!!python/..., !!binary, !custom)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:  # aliases share nodes and may even form cycles
            continue
        seen.add(id(node))
        if isinstance(node, ScalarNode):
            ok = node.tag in _SCALAR_TAGS
        elif isinstance(node, SequenceNode):
            ok = node.tag == _SEQ
            stack.extend(node.value)
        else:
            ok = node.tag == _MAP
            for k, v in node.value:
                stack.extend((k, v))
        if not ok:
            ctx.error(node, f"unsupported YAML tag {_short_tag(node.tag)!r}")


def _entries(ctx: _Ctx, node: MappingNode, path: str = "{}") -> list[tuple[str, Node, Node]]:
    """The (key text, key node, value node) of a mapping, merge keys applied.

    Reports duplicate and non-scalar keys; a duplicate's value is skipped.
    ``path`` formats a key into the ConfigIssue.key reported for it.
    """
    own: list[tuple[str, Node, Node]] = []
    first_at: dict[tuple[str, str], Node] = {}
    merged: list[tuple[str, Node, Node]] = []
    for knode, vnode in node.value:
        if isinstance(knode, ScalarNode) and knode.tag == _MERGE:
            merged.extend(_merge_sources(ctx, vnode, path))
            continue
        if not isinstance(knode, ScalarNode):
            ctx.error(knode, f"keys must be plain words, got {_describe(knode)}")
            continue
        ident = (knode.tag, knode.value)
        if ident in first_at:
            ctx.error(
                knode,
                f"duplicate key {knode.value!r} (first at line {first_at[ident].start_mark.line + 1})",
                path.format(knode.value),
            )
            continue
        first_at[ident] = knode
        own.append((knode.value, knode, vnode))
    # YAML merge rules: written-out keys win, then earlier merge sources.
    taken = {(k.tag, k.value) for _, k, _ in own}
    for text, knode, vnode in merged:
        if (knode.tag, knode.value) not in taken:
            taken.add((knode.tag, knode.value))
            own.append((text, knode, vnode))
    return own


def _merge_sources(ctx: _Ctx, vnode: Node, path: str) -> list[tuple[str, Node, Node]]:
    sources = vnode.value if isinstance(vnode, SequenceNode) else [vnode]
    out: list[tuple[str, Node, Node]] = []
    for src in sources:
        if not isinstance(src, MappingNode):
            ctx.error(src, f"merge key '<<' takes a mapping or a list of mappings, got {_describe(src)}")
            continue
        if id(src) in ctx.flattening:
            ctx.error(src, "merge key '<<' merges a mapping into itself")
            continue
        if id(src) not in ctx.flattened:
            ctx.flattening.add(id(src))
            ctx.flattened[id(src)] = _entries(ctx, src, path)
            ctx.flattening.discard(id(src))
        out.extend(ctx.flattened[id(src)])
    return out


def _apply_schema(
    ctx: _Ctx,
    node: MappingNode,
    entries: list[tuple[str, Node, Node]],
    fields: Mapping[str, _Field],
    container: str,
    prefix: str = "",
    *,
    included: bool = False,
    extensions: bool = False,
    skip: frozenset[str] = frozenset(),
    hints: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Convert a mapping's entries by ``fields``; unknown and missing keys are reported."""
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
            hint = (hints or {}).get(key) or _suggest(key, fields)
            ctx.error(knode, f"unknown key {key!r}{container}{hint}", prefix + key)
            continue
        if included and spec.main_only:
            ctx.error(knode, f"{key!r} is only allowed in the main config file, not in an included one", key)
            continue
        if spec.nullable and _is_null(vnode):
            continue
        value = spec.convert(ctx, vnode, prefix + key)
        if value is not _INVALID:
            values[key] = value
    for key, spec in fields.items():
        if spec.required and key not in present:
            ctx.error(node, f"missing required key {key!r}{container}", prefix + key)
    return values


def _suggest(key: str, fields: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_includes(
    ctx: _Ctx, base_dir: Path | None, includes: list[tuple[str, Node]], seen: set[str]
) -> list[tuple[str, str]]:
    """Expand include globs into (shown path, text); problems are reported at the glob."""
    out: list[tuple[str, str]] = []
    for pattern, node in includes:
        if base_dir is None:
            ctx.error(node, "'include' cannot be resolved here: no base directory", "include")
            continue
        try:
            found = sorted(glob.glob(pattern, root_dir=base_dir))
        except (OSError, ValueError) as e:
            ctx.error(node, f"cannot expand include {pattern!r}: {_os_reason(e)}", "include")
            continue
        if not found:
            ctx.error(node, f"include {pattern!r} matches no file", "include")
            continue
        for rel in found:
            path = Path(base_dir, rel)  # an absolute pattern yields absolute matches
            shown = str(path)
            real = os.path.realpath(path)
            if real in seen:
                log.debug("%s: %s is already read, skipping it", ctx.file, shown)
                continue
            seen.add(real)
            try:
                data = path.read_bytes()
            except OSError as e:
                ctx.error(node, f"cannot read included file {shown!r}: {_os_reason(e)}", "include")
                continue
            try:
                out.append((shown, _decode(data)))
            except UnicodeDecodeError as e:
                line, col = _byte_position(data, e.start)
                ctx.error(
                    node,
                    f"cannot read included file {shown!r}: not valid UTF-8 (line {line}, column {col})",
                    "include",
                )
    return out


def _decode(data: bytes) -> str:
    # The BOM is stripped first so UnicodeDecodeError offsets index `data` as returned
    # by _strip_bom; callers compute positions on the same stripped bytes.
    return _strip_bom(data).decode("utf-8")


def _strip_bom(data: bytes) -> bytes:
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


def _byte_position(data: bytes, offset: int) -> tuple[int, int]:
    data = _strip_bom(data)
    line_start = data.rfind(b"\n", 0, offset) + 1
    col = len(data[line_start:offset].decode("utf-8", errors="replace")) + 1
    return data.count(b"\n", 0, offset) + 1, col


def _os_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


# --- node helpers ---------------------------------------------------------------


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    shown = node.value if len(node.value) <= 40 else node.value[:37] + "..."
    kinds = {
        _STR: "a string",
        _INT: "an integer",
        _FLOAT: "a number",
        _TIMESTAMP: "a date",
    }
    if node.tag == _NULL:
        return "an empty value"
    if node.tag == _BOOL:
        return f"a boolean ({shown!r}; YAML reads on/off/yes/no/true/false as booleans, quote it)"
    return f"{kinds.get(node.tag, 'a value')} ({shown!r})"


def _scalar_text(ctx: _Ctx, node: Node, key: str, expected: str) -> str:
    """The text the user typed for a scalar; booleans, empty values and collections are errors."""
    if not isinstance(node, ScalarNode) or node.tag in (_BOOL, _NULL):
        ctx.error(node, f"{key!r}{ctx.where} must be {expected}, got {_describe(node)}", key)
        return _INVALID
    if node.tag not in _TEXT_TAGS:
        return _INVALID  # reported by _check_tags
    return node.value


# --- converters: (ctx, value node, key path) -> value or _INVALID --------------------


def _cpus(ctx: _Ctx, node: Node, key: str, expected: str = 'a CPU list like "0-3,8"') -> CpuSet:
    text = _scalar_text(ctx, node, key, expected)
    if text is _INVALID:
        return _INVALID
    try:
        cpus = CpuSet.parse(text)
    except CpuSetError as e:
        detail = str(e).removesuffix(f" in {text.strip()!r}")
        ctx.error(node, f"bad CPU list {text!r} for {key!r}{ctx.where}: {detail}", key)
        return _INVALID
    if ctx.online is not None:
        missing = cpus - ctx.online
        if missing:
            what = f"CPU {missing} is" if len(missing) == 1 else f"CPUs {missing} are"
            online = ctx.online.format() or "none"
            ctx.error(node, f"{key!r}{ctx.where}: {what} not online on this host (online: {online})", key)
            return _INVALID
    return cpus


def _vcpupin(ctx: _Ctx, node: Node, key: str) -> FrozenMap[int, CpuSet]:
    if not isinstance(node, MappingNode):
        ctx.error(
            node, f"{key!r}{ctx.where} must be a mapping of vCPU index to CPU list, got {_describe(node)}", key
        )
        return _INVALID
    pins: dict[int, CpuSet] = {}
    first_at: dict[int, Node] = {}
    ok = True
    for text, knode, vnode in _entries(ctx, node, key + "[{}]"):
        # The source text, so that `010:` is vCPU 10 and `0x1:` is refused.
        if knode.tag not in (_INT, _STR) or not _DIGITS.match(text):
            ctx.error(knode, f"{key!r} keys must be vCPU indexes (integers from 0), got {_describe(knode)}", key)
            ok = False
            continue
        index = int(text)
        if index in first_at:  # `0:` and `"0":` are different YAML keys but the same vCPU
            ctx.error(
                knode,
                f"duplicate vCPU {index} in {key!r} (first at line {first_at[index].start_mark.line + 1})",
                key,
            )
            ok = False
            continue
        first_at[index] = knode
        cpus = _cpus(ctx, vnode, f"{key}[{index}]")
        if cpus is _INVALID:
            ok = False
        else:
            pins[index] = cpus
    return FrozenMap(sorted(pins.items())) if ok else _INVALID


def _iothreadpin(ctx: _Ctx, node: Node, key: str) -> tuple[CpuSet | None, FrozenMap[str, CpuSet]]:
    expected = 'a CPU list like "0-3,8" or a mapping of IO thread id to CPU list'
    if not isinstance(node, MappingNode):
        cpus = _cpus(ctx, node, key, expected)
        return _INVALID if cpus is _INVALID else (cpus, FrozenMap())
    pins: dict[str, CpuSet] = {}
    ok = True
    for text, knode, vnode in _entries(ctx, node, key + "[{}]"):
        if knode.tag != _STR or not _QEMU_ID.match(text):
            ctx.error(
                knode,
                f"bad IO thread id {text!r} in {key!r}{ctx.where}: QEMU ids start with a letter, "
                "then letters, digits, '-', '.' or '_'",
                key,
            )
            ok = False
            continue
        cpus = _cpus(ctx, vnode, f"{key}[{text}]")
        if cpus is _INVALID:
            ok = False
        else:
            pins[text] = cpus
    return (None, FrozenMap(pins)) if ok else _INVALID


def _policy_name(ctx: _Ctx, node: Node, key: str) -> str:
    text = _scalar_text(ctx, node, key, "a name (text)")
    if text is _INVALID:
        return _INVALID
    if not text.strip() or not text.isprintable():
        ctx.error(node, f"policy name {text!r} must be non-empty printable text", key)
        return _INVALID
    return text


def _glob(ctx: _Ctx, node: Node, key: str) -> str:
    text = _scalar_text(ctx, node, key, "a name or glob pattern")
    if text is not _INVALID and not text:
        ctx.error(node, f"{key!r}{ctx.where} must not be empty", key)
        return _INVALID
    return text


def _uuid(ctx: _Ctx, node: Node, key: str) -> str:
    text = _scalar_text(ctx, node, key, "a UUID")
    if text is _INVALID:
        return _INVALID
    if not _UUID.match(text.strip()):
        ctx.error(node, f"bad UUID {text!r} for {key!r}{ctx.where}: expected 8-4-4-4-12 hex digits", key)
        return _INVALID
    return text.strip().lower()


def _regex(ctx: _Ctx, node: Node, key: str) -> re.Pattern[str]:
    text = _scalar_text(ctx, node, key, "a regular expression")
    if text is _INVALID:
        return _INVALID
    try:
        return re.compile(text)
    except re.error as e:
        where = f" at position {e.pos}" if e.pos is not None else ""
        ctx.error(node, f"invalid regex {text!r} for {key!r}{ctx.where}: {e.msg}{where}", key)
    except (RecursionError, OverflowError):
        ctx.error(node, f"invalid regex {text!r} for {key!r}{ctx.where}: too complex", key)
    return _INVALID


def _user(ctx: _Ctx, node: Node, key: str) -> str:
    text = _scalar_text(ctx, node, key, "a user name or uid")
    if text is _INVALID:
        return _INVALID
    text = text.strip()
    if _DIGITS.match(text):
        if int(text) > MAX_UID:
            ctx.error(node, f"uid {text} for {key!r}{ctx.where} is out of range (max {MAX_UID})", key)
            return _INVALID
        return str(int(text))
    if not _USER_NAME.match(text):
        ctx.error(node, f"bad user {text!r} for {key!r}{ctx.where}: expected a user name or a numeric uid", key)
        return _INVALID
    return text


def _count_range(ctx: _Ctx, node: Node, key: str) -> tuple[int, int]:
    text = _scalar_text(ctx, node, key, 'a vCPU count like 4 or a range like "4-16"')
    if text is _INVALID:
        return _INVALID
    m = _COUNT_RANGE.match(text)
    if not m:
        ctx.error(
            node,
            f"bad vCPU count {text!r} for {key!r}{ctx.where}: expected a count like 4 or a range like \"4-16\"",
            key,
        )
        return _INVALID
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if lo < 1:
        ctx.error(node, f"bad vCPU count {text!r} for {key!r}{ctx.where}: a guest has at least 1 vCPU", key)
        return _INVALID
    if hi < lo:
        ctx.error(node, f"bad vCPU count range {text!r} for {key!r}{ctx.where}: {lo} is more than {hi}", key)
        return _INVALID
    return (lo, hi)


def _duration(ctx: _Ctx, node: Node, key: str) -> float:
    text = _scalar_text(ctx, node, key, 'a duration like 10 (seconds), "500ms", "10s" or "2m"')
    if text is _INVALID:
        return _INVALID
    m = _DURATION.match(text)
    if not m:
        ctx.error(
            node,
            f"bad duration {text!r} for {key!r}: expected seconds like 10 or a number with "
            'a unit ms, s, m or h like "500ms" or "2m"',
            key,
        )
        return _INVALID
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds <= 0:
        ctx.error(node, f"{key!r} must be more than zero, got {text!r}", key)
        return _INVALID
    if seconds > MAX_RESCAN_INTERVAL:
        ctx.error(node, f"{key!r} must be at most {MAX_RESCAN_INTERVAL:g}s (a day), got {text!r}", key)
        return _INVALID
    return seconds


def _text_list(ctx: _Ctx, node: Node, key: str, expected: str) -> list[tuple[str, Node]]:
    """A string or a non-empty list of strings, each with its node for later errors."""
    items = node.value if isinstance(node, SequenceNode) else [node]
    if isinstance(node, SequenceNode) and not items:
        ctx.error(node, f"{key!r} must not be an empty list", key)
        return _INVALID
    out: list[tuple[str, Node]] = []
    for item in items:
        text = _scalar_text(ctx, item, key, expected)
        if text is _INVALID:
            continue
        if not text.strip():
            ctx.error(item, f"{key!r} must not contain an empty entry", key)
            continue
        if "\0" in text:  # no path can hold one; os calls would raise ValueError
            ctx.error(item, f"{key!r} entry {text!r} contains a NUL character", key)
            continue
        out.append((text, item))
    return out if len(out) == len(items) else _INVALID


def _executables(ctx: _Ctx, node: Node, key: str) -> tuple[str, ...]:
    items = _text_list(ctx, node, key, "an absolute path or glob, or a list of them")
    if items is _INVALID:
        return _INVALID
    bad = [(t, n) for t, n in items if not t.startswith("/")]
    for text, item in bad:
        ctx.error(item, f"executable {text!r} in {key!r} must be an absolute path (globs allowed)", key)
    return _INVALID if bad else tuple(t for t, _ in items)


def _includes(ctx: _Ctx, node: Node, key: str) -> list[tuple[str, Node]]:
    return _text_list(ctx, node, key, "a file glob or a list of file globs")


def _container(ctx: _Ctx, key: str) -> str:
    """How unknown-key errors name a sub-mapping: " in 'match' of policy 'a'"."""
    return f" in {key!r} of {ctx.label}" if ctx.label else f" in {key!r}"


def _bool(ctx: _Ctx, node: Node, key: str) -> bool:
    if isinstance(node, ScalarNode) and node.tag == _BOOL:
        return node.value.lower() in ("yes", "true", "on")
    if isinstance(node, ScalarNode) and node.tag not in _SCALAR_TAGS:
        return _INVALID  # reported by _check_tags
    ctx.error(node, f"{key!r}{ctx.where} must be true or false, got {_describe(node)}", key)
    return _INVALID


def _choice(options: tuple[str, ...]) -> Callable[[_Ctx, Node, str], str]:
    """A converter taking one of ``options``, as typed."""
    listed = ", ".join(options)

    def convert(ctx: _Ctx, node: Node, key: str) -> str:
        text = _scalar_text(ctx, node, key, f"one of {listed}")
        if text is _INVALID:
            return _INVALID
        if text not in options:
            ctx.error(
                node,
                f"bad value {text!r} for {key!r}{ctx.where}: expected one of {listed}{_suggest(text, options)}",
                key,
            )
            return _INVALID
        return text

    return convert


# --- pools ----------------------------------------------------------------------


def _pools(ctx: _Ctx, node: Node, key: str) -> FrozenMap[str, PoolSpec]:
    if not isinstance(node, MappingNode):
        ctx.error(
            node,
            f"{key!r} must be a mapping of pool name to {{cpus: LIST, exclusive: BOOL}}, got {_describe(node)}",
            key,
        )
        return _INVALID
    out: dict[str, PoolSpec] = {}
    cpus_of: dict[str, CpuSet] = {}  # every pool whose CPUs parse, bad or not otherwise
    first_at: dict[str, Node] = {}
    ok = True
    for _, knode, vnode in _entries(ctx, node, key + "[{}]"):
        name = _pool_name(ctx, knode, key)
        if name is _INVALID:
            ok = False
            continue
        if name in first_at:  # `1:` and `"1":` are different YAML keys but the same name
            ctx.error(knode, f"duplicate pool {name!r} (first at line {first_at[name].start_mark.line + 1})", key)
            ok = False
            continue
        first_at[name] = knode
        ctx.pools[name] = None  # known, so references to it are not "unknown"
        path = f"{key}[{name}]"
        if not isinstance(vnode, MappingNode):
            ctx.error(
                vnode,
                f"pool {name!r} must be a mapping like {{cpus: \"4-31\", exclusive: true}}, got {_describe(vnode)}",
                path,
            )
            ok = False
            continue
        before = len(ctx.issues)
        entries = _entries(ctx, vnode, path + ".{}")
        values = _apply_schema(ctx, vnode, entries, _POOL_FIELDS, f" in pool {name!r}", prefix=path + ".")
        broken = len(ctx.issues) != before
        if "cpus" in values:  # overlaps are checked even if another key of the pool is wrong
            cpus_node = next(v for k, _, v in entries if k == "cpus")
            for other, other_cpus in cpus_of.items():
                common = other_cpus & values["cpus"]
                if common:
                    what = f"CPU {common}" if len(common) == 1 else f"CPUs {common}"
                    ctx.error(cpus_node, f"pools {other!r} and {name!r} overlap on {what}", path + ".cpus")
                    ok = False
            cpus_of[name] = values["cpus"]
        if broken:
            ok = False
            continue
        # Kept even when overlapping: the policies naming it are checked as usual.
        spec = PoolSpec(name=name, **values)
        ctx.pools[name] = spec
        out[name] = spec
    return FrozenMap(out) if ok else _INVALID


def _pool_name(ctx: _Ctx, knode: Node, key: str) -> str:
    if knode.tag in (_BOOL, _NULL):
        ctx.error(knode, f"pool names in {key!r} must be text, got {_describe(knode)}", key)
        return _INVALID
    if knode.tag not in _TEXT_TAGS:
        return _INVALID  # reported by _check_tags
    text = knode.value
    if not text.strip() or not text.isprintable():
        ctx.error(knode, f"pool name {text!r} in {key!r} must be non-empty printable text", key)
        return _INVALID
    if text in ON_EXHAUSTED_MODES:
        ctx.error(knode, f"{text!r} cannot be a pool name: 'on_exhausted: {text}' means something else", key)
        return _INVALID
    return text


def _unknown_pool(ctx: _Ctx, node: Node, key: str, text: str, extra: tuple[str, ...] = (), expected: str = "") -> None:
    names = list(ctx.pools)
    hint = _suggest(text, [*names, *extra])
    if not hint and not names:
        hint = " (no pools are defined: add them under the top-level 'pools')"
    ctx.error(node, f"unknown pool {text!r} for {key!r}{ctx.where}{expected}{hint}", key)


def _pool_ref(ctx: _Ctx, node: Node, key: str) -> str:
    """A defined pool's name; _INVALID if unknown (reported) or broken (reported at the pool)."""
    text = _scalar_text(ctx, node, key, "a pool name")
    if text is _INVALID:
        return _INVALID
    if text not in ctx.pools:
        _unknown_pool(ctx, node, key, text)
        return _INVALID
    return text if ctx.pools[text] is not None else _INVALID


_VCPUS_EXPECTED = 'a CPU list like "0-3,8" or a pool like {pool: NAME}'


def _vcpus(ctx: _Ctx, node: Node, key: str) -> tuple[CpuSet | None, PlacementRule | None]:
    """(CPUs to float over, None) or (None, the rule for dedicated CPUs)."""
    if not isinstance(node, MappingNode):
        cpus = _cpus(ctx, node, key, _VCPUS_EXPECTED)
        return _INVALID if cpus is _INVALID else (cpus, None)
    before = len(ctx.issues)
    entries = _entries(ctx, node, key + ".{}")
    values = _apply_schema(ctx, node, entries, _VCPUS_FIELDS, _container(ctx, key), prefix=key + ".")
    name = values.pop("pool", None)
    if name is None or len(ctx.issues) != before:
        return _INVALID
    spec = ctx.pools[name]
    assert spec is not None
    if spec.exclusive:
        return None, PlacementRule(pool=name, **values)
    for text, knode, _ in entries:
        if text in values:
            ctx.error(
                knode,
                f"'{key}.{text}'{ctx.where}: smt/numa/cache only apply to an exclusive pool; "
                f"pool {name!r} is not exclusive, its vCPUs float over all of its CPUs",
                f"{key}.{text}",
            )
    return _INVALID if values else (spec.cpus, None)


class _Emulator(NamedTuple):
    """A converted `emulatorpin`, split into Policy fields in _policy."""

    cpus: CpuSet | None
    pool: str | None = None
    isolate: bool = False
    isolate_node: Node | None = None  # where to report an isolate that has no pool to come from


_EMULATOR_EXPECTED = 'a CPU list like "0-3,8", a pool like {pool: NAME} or {isolate: true}'


def _emulatorpin(ctx: _Ctx, node: Node, key: str) -> _Emulator:
    if not isinstance(node, MappingNode):
        cpus = _cpus(ctx, node, key, _EMULATOR_EXPECTED)
        return _INVALID if cpus is _INVALID else _Emulator(cpus)
    before = len(ctx.issues)
    entries = _entries(ctx, node, key + ".{}")
    values = _apply_schema(ctx, node, entries, _EMULATOR_FIELDS, _container(ctx, key), prefix=key + ".")
    given = {k: (kn, vn) for k, kn, vn in entries}
    if "pool" in given and "isolate" in given:
        ctx.error(node, f"{key!r}{ctx.where} takes either 'pool' or 'isolate', not both", key)
    if len(ctx.issues) != before:
        return _INVALID
    if "pool" in given:
        name = values.get("pool")
        if name is None:
            return _INVALID
        spec = ctx.pools[name]
        assert spec is not None
        if spec.exclusive:
            ctx.error(
                given["pool"][1],
                f"pool {name!r} for '{key}.pool'{ctx.where} is exclusive: its CPUs are for vCPUs only; "
                f"use '{key}: {{isolate: true}}' for a dedicated emulator CPU from the vcpus pool",
                key + ".pool",
            )
            return _INVALID
        return _Emulator(spec.cpus, pool=name)
    isolate = values.get("isolate", False)
    return _Emulator(None, isolate=isolate, isolate_node=given["isolate"][0] if isolate else None)


def _on_exhausted(ctx: _Ctx, node: Node, key: str) -> str:
    text = _scalar_text(ctx, node, key, "'leave', 'fail' or the name of a non-exclusive pool")
    if text is _INVALID or text in ON_EXHAUSTED_MODES:
        return text
    if text not in ctx.pools:
        _unknown_pool(
            ctx, node, key, text, ON_EXHAUSTED_MODES, ": expected 'leave', 'fail' or a non-exclusive pool"
        )
        return _INVALID
    spec = ctx.pools[text]
    if spec is None:
        return _INVALID
    if spec.exclusive:
        ctx.error(
            node,
            f"{key!r}{ctx.where} names exclusive pool {text!r}: a VM waiting for dedicated CPUs can only "
            "float over a non-exclusive pool (or use 'leave' or 'fail')",
            key,
        )
        return _INVALID
    return text


def _check_pool_rules(ctx: _Ctx, entries: list[tuple[str, Node, Node]], values: dict[str, Any]) -> None:
    """Rules that depend on each other: vcpus pool vs vcpupin, isolate and on_exhausted."""
    keys = {k: kn for k, kn, _ in entries}
    if "vcpus" in keys and "vcpus" not in values:
        return  # a broken vcpus is reported; what it would have allowed is unknown
    rule = values["vcpus"][1] if "vcpus" in values else None
    if rule is not None and "vcpupin" in keys:
        ctx.error(
            keys["vcpupin"],
            f"'vcpupin'{ctx.where} cannot be combined with 'vcpus: {{pool: {rule.pool}}}': exclusive pool "
            f"{rule.pool!r} chooses every vCPU's CPU, so pinning some of them too is ambiguous; use one or the other",
            "vcpupin",
        )
    if rule is not None:
        return
    emulator = values.get("emulatorpin")
    if emulator is not None and emulator.isolate:
        ctx.error(
            emulator.isolate_node,
            f"'emulatorpin: {{isolate: true}}'{ctx.where} needs 'vcpus: {{pool: ...}}' with an exclusive pool "
            "to take the emulator's dedicated CPU from",
            "emulatorpin.isolate",
        )
    if "on_exhausted" in keys:
        ctx.error(
            keys["on_exhausted"],
            f"'on_exhausted'{ctx.where}: on_exhausted only applies to vcpus: {{pool: ...}} with an exclusive pool",
            "on_exhausted",
        )


# --- metrics and state ----------------------------------------------------------


def _metrics(ctx: _Ctx, node: Node, key: str) -> str:
    if not isinstance(node, MappingNode):
        example = f'{{listen: "{DEFAULT_METRICS_LISTEN}"}}'
        ctx.error(node, f"{key!r} must be a mapping like {example}, got {_describe(node)}", key)
        return _INVALID
    before = len(ctx.issues)
    entries = _entries(ctx, node, key + ".{}")
    values = _apply_schema(ctx, node, entries, _METRICS_FIELDS, f" in {key!r}", prefix=key + ".")
    return values.get("listen", DEFAULT_METRICS_LISTEN) if len(ctx.issues) == before else _INVALID


_LISTEN_EXPECTED = 'HOST:PORT like "127.0.0.1:9474" or "[::1]:9474", or off'


def _listen(ctx: _Ctx, node: Node, key: str) -> str:
    if isinstance(node, ScalarNode) and node.tag == _BOOL and node.value.lower() in ("off", "false", "no"):
        return "off"  # `listen: off` unquoted is YAML's false
    text = _scalar_text(ctx, node, key, _LISTEN_EXPECTED)
    if text is _INVALID:
        return _INVALID
    text = text.strip()
    if text.lower() == "off":
        return "off"
    problem = _listen_problem(text)
    if problem:
        ctx.error(node, f"bad listen address {text!r} for {key!r}: {problem}", key)
        return _INVALID
    return text


def _listen_problem(text: str) -> str | None:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return "missing ']' after the IPv6 address"
        host, rest = text[1:end], text[end + 1:]
        if not rest.startswith(":"):
            return 'expected [IPV6]:PORT like "[::1]:9474"'
        port = rest[1:]
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            return f"expected {_LISTEN_EXPECTED}"
    if not _PORT.match(port) or not 1 <= int(port) <= 65535:
        return f"port {port!r} must be a number from 1 to 65535"
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} in brackets is not an IPv6 address"
        return None
    if not host:
        return "the host is missing (0.0.0.0 or [::] listen on every address)"
    if ":" in host or "[" in host or "]" in host:
        return 'write an IPv6 address in brackets, like "[::1]:9474"'
    labels = host.split(".")
    if all(_DIGITS.match(label) for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host!r} is not an IPv4 address"
        return None
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        return f"{host!r} is not a host name or IP address"
    return None


def _state_file(ctx: _Ctx, node: Node, key: str) -> Path:
    text = _scalar_text(ctx, node, key, "an absolute file path")
    if text is _INVALID:
        return _INVALID
    if "\0" in text:
        ctx.error(node, f"{key!r} {text!r} contains a NUL character", key)
    elif not text.startswith("/"):
        ctx.error(node, f"{key!r} must be an absolute path, got {text!r}", key)
    elif text.endswith("/"):
        ctx.error(node, f"{key!r} must name a file, not a directory, got {text!r}", key)
    else:
        return Path(text)
    return _INVALID


def _match(ctx: _Ctx, node: Node, key: str) -> Match:
    if not isinstance(node, MappingNode):
        ctx.error(
            node, f"{key!r}{ctx.where} must be a mapping (use {{}} to match every VM), got {_describe(node)}", key
        )
        return _INVALID
    before = len(ctx.issues)
    container = f" in {key!r} of {ctx.label}" if ctx.label else f" in {key!r}"
    values = _apply_schema(ctx, node, _entries(ctx, node, key + ".{}"), _MATCH_FIELDS, container, prefix=key + ".")
    return Match(**values) if len(ctx.issues) == before else _INVALID


def _policies(ctx: _Ctx, node: Node, key: str) -> list[Policy]:
    if not isinstance(node, SequenceNode):
        ctx.error(node, f"{key!r} must be a list of mappings, got {_describe(node)}", key)
        return _INVALID
    out: list[Policy] = []
    for number, item in enumerate(node.value, 1):
        if not isinstance(item, MappingNode):
            ctx.error(item, f"policy #{number} in {key!r} must be a mapping, got {_describe(item)}", key)
            continue
        try:
            policy = _policy(ctx, item, number)
        finally:
            ctx.label = ctx.where = ""
        if policy is not None:
            out.append(policy)
    return out


def _policy(ctx: _Ctx, node: MappingNode, number: int) -> Policy | None:
    before = len(ctx.issues)
    entries = _entries(ctx, node)
    name_node = next((v for k, _, v in entries if k == "name"), None)
    name = _INVALID
    ctx.label = f"policy #{number}"
    ctx.where = f" in {ctx.label}"
    if name_node is not None:
        name = _policy_name(ctx, name_node, "name")
        if name is not _INVALID:
            ctx.label = f"policy {name!r}"
            ctx.where = f" in {ctx.label}"
            pos = ctx.pos(name_node)
            first = ctx.policy_names.setdefault(name, pos)
            if first is not pos:
                ctx.error(name_node, f"duplicate policy name {name!r} (first at {first.file}:{first.line})", "name")
    values = _apply_schema(
        ctx, node, entries, _POLICY_FIELDS, ctx.where,
        skip=frozenset({"name"}), hints=_POLICY_HINTS,
    )
    _check_pool_rules(ctx, entries, values)
    if len(ctx.issues) != before:
        return None
    if "iothreadpin" in values:
        values["iothreadpin"], values["iothreadpin_by_id"] = values["iothreadpin"]
    if "vcpus" in values:
        values["vcpus"], values["vcpus_rule"] = values["vcpus"]
    if "emulatorpin" in values:
        emulator = values.pop("emulatorpin")
        values.update(emulatorpin=emulator.cpus, emulator_pool=emulator.pool, emulator_isolate=emulator.isolate)
    policy = Policy(name=name, pos=ctx.pos(node), **values)
    if not policy.all_cpus() and policy.vcpus_rule is None:
        log.debug("%s: policy %r pins nothing: its VMs are left alone", policy.pos, name)
    return policy


# --- the schema -----------------------------------------------------------------
# Each key maps to a converter; Config/Policy/Match take the converted values by
# keyword, so a new key is a _Field here plus a field on the dataclass (a few
# values are split or renamed on the way: see parse_config_text and _policy).

_TOP_FIELDS: Mapping[str, _Field] = {
    "executables": _Field(_executables, main_only=True),
    "include": _Field(_includes, main_only=True),
    "rescan_interval": _Field(_duration, main_only=True),
    "pools": _Field(_pools, nullable=True, main_only=True),
    "metrics": _Field(_metrics, main_only=True),  # -> Config.metrics_listen
    "state_file": _Field(_state_file, main_only=True),
    "policies": _Field(_policies, nullable=True),
}

_POOL_FIELDS: Mapping[str, _Field] = {
    "cpus": _Field(_cpus, required=True),
    "exclusive": _Field(_bool),
}

_METRICS_FIELDS: Mapping[str, _Field] = {
    "listen": _Field(_listen),
}

_POLICY_FIELDS: Mapping[str, _Field] = {
    "name": _Field(_policy_name, required=True),
    "match": _Field(_match, required=True),
    "vcpupin": _Field(_vcpupin),
    "vcpus": _Field(_vcpus),  # -> Policy.vcpus, Policy.vcpus_rule
    "emulatorpin": _Field(_emulatorpin),  # -> Policy.emulatorpin, emulator_pool, emulator_isolate
    "iothreadpin": _Field(_iothreadpin),
    "vhostpin": _Field(_cpus),
    "affinity": _Field(_cpus),
    "on_exhausted": _Field(_on_exhausted),
}

_VCPUS_FIELDS: Mapping[str, _Field] = {
    "pool": _Field(_pool_ref, required=True),
    "smt": _Field(_choice(SMT_MODES)),
    "numa": _Field(_choice(NUMA_MODES)),
    "cache": _Field(_choice(CACHE_MODES)),
}

_EMULATOR_FIELDS: Mapping[str, _Field] = {
    "pool": _Field(_pool_ref),
    "isolate": _Field(_bool),
}

_MATCH_FIELDS: Mapping[str, _Field] = {
    "name": _Field(_glob),
    "uuid": _Field(_uuid),
    "cmdline": _Field(_regex),
    "user": _Field(_user),
    "vcpus": _Field(_count_range),
}

# Unknown keys that are known one level away get a pointer there.
_POLICY_HINTS: Mapping[str, str] = {
    **{k: " (it belongs under 'match')" for k in _MATCH_FIELDS if k not in _POLICY_FIELDS},
    **{k: " (it belongs under 'vcpus: {pool: ...}')" for k in _VCPUS_FIELDS},
    "isolate": " (write 'emulatorpin: {isolate: true}')",
}
_TOP_HINTS: Mapping[str, str] = {
    **{k: " (policy keys go into a list under 'policies')" for k in _POLICY_FIELDS if k not in _TOP_FIELDS},
    "listen": " (it belongs under 'metrics')",
}
