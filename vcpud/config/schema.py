"""The config schema: the top-level keys of a file, the policies list and each policy's keys.

Decisions about the config format, in one place (YAML itself: see yamlpos; files and
includes: see sources; pools: see pooldefs):

* A CPU list, a vCPU index or a name is the source text the user typed. Only booleans
  (on/off/yes/no/true/false) and empty values are refused where text is expected; quoting
  them fixes that. Top-level keys starting with ``x-`` are ignored, to give anchors a home
  outside any policy.
* An empty value (``key:``) is an error except for ``policies:`` and ``pools:``, which then
  hold none. An empty file is a config without policies.
* A policy without any pinning rule is allowed: it claims the VM (later policies are not
  tried) and leaves all its threads where they are.
* ``include`` (main file only): included files hold only ``policies:`` (and ``x-`` keys); an
  ``include`` inside one is an error. Policies are tried in reading order, the main file's first.
* ConfigIssue.key is the key's path inside its policy or the top level, as in "emulatorpin",
  "match.cmdline", "vcpupin[3]", "iothreadpin[io1]", "include", "vcpus.pool",
  "pools[dedicated].cpus", "metrics.listen".
* The pools are read before the policies wherever ``pools`` stands in the file.
* ``metrics: {listen: ...}`` (main file only) takes the grammar of listen.parse_listen;
  ``off`` (quoted or not, or ``false``/``no``) turns metrics off. ``state_file`` (main file
  only) is an absolute path.

Each key maps to a converter; Config/Policy/Match take the converted values by keyword, so a
new key is a Field here plus a field on the dataclass (a few values are split or renamed on
the way: see :func:`policy` and loader.parse_config_text).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..cpuset import shorten
from . import listen as listen_grammar
from .cpus import cpus, iothreadpin, vcpupin
from .fields import Ctx, Field, apply_schema, scalar_text, text_list
from .issues import Batch, Invalid
from .matching import MATCH_FIELDS, match
from .model import DEFAULT_METRICS_LISTEN, Policy
from .pooldefs import VCPUS_FIELDS, check_pool_rules, emulatorpin, on_exhausted, pools, vcpus
from .yamlpos import BOOL, Document, compose, describe

log = logging.getLogger(__name__)

# Longer waits overflow some timer APIs and are surely a typo anyway.
MAX_RESCAN_INTERVAL = 86400.0
# Shorter ones would make the daemon rescan /proc in a busy loop.
MIN_RESCAN_INTERVAL = 0.1
# Policies in all files together: far more than VMs a host runs; bounds the work of a load.
MAX_POLICIES = 10_000

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?\s*\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_file(ctx: Ctx, text: str, shown: str, included: bool, batch: Batch) -> dict[str, Any]:
    """The top-level values of one file that convert; every issue goes to ``batch``."""
    ctx.doc = Document(shown, None)
    try:
        ctx.doc = compose(text, shown, ctx.fast_yaml)
    except Invalid as e:
        batch.add(*e.issues)
        return {}
    root = ctx.doc.root
    if root is None:
        return {}
    batch.add(*ctx.doc.tag_issues())
    if not isinstance(root, MappingNode):
        batch.add(ctx.issue(root, f"a config file must be a mapping (like 'policies: [...]'), got {describe(root)}"))
        return {}
    # Pools first, so that policies above them in the file can name them.
    entries = sorted(ctx.entries(root, "{}", batch), key=lambda e: e.key != "pools")
    return apply_schema(
        ctx, root, entries, TOP_FIELDS, " at top level", batch,
        included=included, extensions=True, hints=TOP_HINTS,
    )


# --- top level ------------------------------------------------------------------


def executables(ctx: Ctx, node: Node, key: str) -> tuple[str, ...]:
    items = text_list(ctx, node, key, "an absolute path or glob, or a list of them")
    bad = [
        ctx.issue(item, f"executable {shorten(text)} in {key!r} must be an absolute path (globs allowed)", key)
        for text, item in items
        if not text.startswith("/")
    ]
    if bad:
        raise Invalid(*bad)
    return tuple(t for t, _ in items)


def includes(ctx: Ctx, node: Node, key: str) -> list[tuple[str, Node]]:
    return text_list(ctx, node, key, "a file glob or a list of file globs")


def duration(ctx: Ctx, node: Node, key: str) -> float:
    text = scalar_text(ctx, node, key, 'a duration like 10 (seconds), "500ms", "10s" or "2m"')
    m = _DURATION.match(text)
    if not m:
        raise ctx.invalid(
            node,
            f"bad duration {shorten(text)} for {key!r}: expected seconds like 10 or a number with "
            'a unit ms, s, m or h like "500ms" or "2m"',
            key,
        )
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds <= 0:
        raise ctx.invalid(node, f"{key!r} must be more than zero, got {shorten(text)}", key)
    if seconds < MIN_RESCAN_INTERVAL:
        raise ctx.invalid(
            node,
            f"{key!r} must be at least {MIN_RESCAN_INTERVAL * 1000:g}ms (shorter rescans only burn CPU), "
            f"got {shorten(text)}",
            key,
        )
    if seconds > MAX_RESCAN_INTERVAL:
        raise ctx.invalid(node, f"{key!r} must be at most {MAX_RESCAN_INTERVAL:g}s (a day), got {shorten(text)}", key)
    return seconds


def metrics(ctx: Ctx, node: Node, key: str) -> str:
    """The listen address, as Config.metrics_listen holds it."""
    if not isinstance(node, MappingNode):
        example = f'{{listen: "{DEFAULT_METRICS_LISTEN}"}}'
        raise ctx.invalid(node, f"{key!r} must be a mapping like {example}, got {describe(node)}", key)
    batch = Batch()
    entries = ctx.entries(node, key + ".{}", batch)
    values = apply_schema(ctx, node, entries, METRICS_FIELDS, f" in {key!r}", batch, prefix=key + ".")
    batch.check()
    listen: str = values.get("listen", DEFAULT_METRICS_LISTEN)
    return listen


def listen(ctx: Ctx, node: Node, key: str) -> str:
    if isinstance(node, ScalarNode) and node.tag == BOOL and node.value.lower() in ("off", "false", "no"):
        return listen_grammar.OFF  # `listen: off` unquoted is YAML's false
    text = scalar_text(ctx, node, key, listen_grammar.EXPECTED).strip()
    try:
        return str(listen_grammar.parse_listen(text))
    except listen_grammar.ListenAddressError as e:
        raise ctx.invalid(node, f"bad listen address {shorten(text)} for {key!r}: {e}", key) from None


def state_file(ctx: Ctx, node: Node, key: str) -> Path:
    text = scalar_text(ctx, node, key, "an absolute file path")
    if "\0" in text:
        raise ctx.invalid(node, f"{key!r} {shorten(text)} contains a NUL character", key)
    if not text.startswith("/"):
        raise ctx.invalid(node, f"{key!r} must be an absolute path, got {shorten(text)}", key)
    if text.endswith("/"):
        raise ctx.invalid(node, f"{key!r} must name a file, not a directory, got {shorten(text)}", key)
    return Path(text)


# --- policies -------------------------------------------------------------------


def policies(ctx: Ctx, node: Node, key: str) -> list[Policy]:
    """Every policy of the list; each bad policy's issues are collected, the next one is still read."""
    if not isinstance(node, SequenceNode):
        raise ctx.invalid(node, f"{key!r} must be a list of mappings, got {describe(node)}", key)
    out: list[Policy] = []
    batch = Batch()
    for number, item in enumerate(node.value, 1):
        ctx.policy_count += 1
        if ctx.policy_count > MAX_POLICIES:
            batch.add(ctx.issue(
                item,
                f"too many policies: at most {MAX_POLICIES} are allowed in all config files together; "
                "this one and the rest are not read",
                key,
            ))
            break
        if not isinstance(item, MappingNode):
            batch.add(ctx.issue(item, f"policy #{number} in {key!r} must be a mapping, got {describe(item)}", key))
            continue
        try:
            with batch.catch():
                out.append(policy(ctx, item, number))
        finally:
            ctx.label = ctx.where = ""
    batch.check()
    return out


def policy(ctx: Ctx, node: MappingNode, number: int) -> Policy:
    batch = Batch()
    entries = ctx.entries(node, "{}", batch)
    name_node = next((e.vnode for e in entries if e.key == "name"), None)
    name: str | None = None
    ctx.label = f"policy #{number}"
    ctx.where = f" in {ctx.label}"
    if name_node is not None:
        with batch.catch():
            name = policy_name(ctx, name_node, "name")
            ctx.label = f"policy {shorten(name)}"
            ctx.where = f" in {ctx.label}"
            pos = ctx.pos(name_node)
            first = ctx.policy_names.setdefault(name, pos)
            if first is not pos:
                batch.add(
                    ctx.issue(
                        name_node, f"duplicate policy name {shorten(name)} (first at {first.file}:{first.line})", "name"
                    )
                )
    values = apply_schema(
        ctx, node, entries, POLICY_FIELDS, ctx.where, batch,
        skip=frozenset({"name"}), hints=POLICY_HINTS,
    )
    check_pool_rules(ctx, entries, values, batch)
    batch.check()
    assert name is not None  # a missing or bad name is an issue
    if "iothreadpin" in values:
        values["iothreadpin"], values["iothreadpin_by_id"] = values["iothreadpin"]
    if "vcpus" in values:
        values["vcpus"], values["vcpus_rule"] = values["vcpus"]
    if "emulatorpin" in values:
        emulator = values.pop("emulatorpin")
        values.update(emulatorpin=emulator.cpus, emulator_pool=emulator.pool, emulator_isolate=emulator.isolate)
    result = Policy(name=name, pos=ctx.pos(node), **values)
    if not result.all_cpus() and result.vcpus_rule is None:
        log.debug("%s: policy %r pins nothing: its VMs are left alone", result.pos, name)
    return result


def policy_name(ctx: Ctx, node: Node, key: str) -> str:
    text = scalar_text(ctx, node, key, "a name (text)")
    if not text.strip() or not text.isprintable():
        raise ctx.invalid(node, f"policy name {shorten(text)} must be non-empty printable text", key)
    return text


# --- the tables -----------------------------------------------------------------

TOP_FIELDS: Mapping[str, Field] = {
    "executables": Field(executables, main_only=True),
    "include": Field(includes, main_only=True),
    "rescan_interval": Field(duration, main_only=True),
    "pools": Field(pools, nullable=True, main_only=True),
    "metrics": Field(metrics, main_only=True),  # -> Config.metrics_listen
    "state_file": Field(state_file, main_only=True),
    "policies": Field(policies, nullable=True),
}

METRICS_FIELDS: Mapping[str, Field] = {
    "listen": Field(listen),
}

POLICY_FIELDS: Mapping[str, Field] = {
    "name": Field(policy_name, required=True),
    "match": Field(match, required=True),
    "vcpupin": Field(vcpupin),
    "vcpus": Field(vcpus),  # -> Policy.vcpus, Policy.vcpus_rule
    "emulatorpin": Field(emulatorpin),  # -> Policy.emulatorpin, emulator_pool, emulator_isolate
    "iothreadpin": Field(iothreadpin),  # -> Policy.iothreadpin, iothreadpin_by_id
    "vhostpin": Field(cpus),
    "affinity": Field(cpus),
    "on_exhausted": Field(on_exhausted),
}

# Unknown keys that are known one level away get a pointer there.
POLICY_HINTS: Mapping[str, str] = {
    **{k: " (it belongs under 'match')" for k in MATCH_FIELDS if k not in POLICY_FIELDS},
    **{k: " (it belongs under 'vcpus: {pool: ...}')" for k in VCPUS_FIELDS},
    "isolate": " (write 'emulatorpin: {isolate: true}')",
}
TOP_HINTS: Mapping[str, str] = {
    **{k: " (policy keys go into a list under 'policies')" for k in POLICY_FIELDS if k not in TOP_FIELDS},
    "listen": " (it belongs under 'metrics')",
}
