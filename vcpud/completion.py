"""What shell completion asks vcpud: `vcpud __complete what-if [CONFIG]` (hidden, for the scripts
in packaging/completion/).

It prints, one a line, ``NAME:`` or ``NAME:VCPUS`` values for ``plan --what-if`` that the
config's policies would select, each with a tab and ``policy NAME`` after it (zsh shows that).
A what-if VM has only a name and a vCPU count, so a name comes from the policy's ``match.name``
glob (or the policy's own name when it does not match on names), with the bounds of its
``match.vcpus`` range; a candidate is offered only if the planner's own VM for it
(whatif.what_if_vm) is selected by that very policy, so policies matching on a UUID, command line or
user, and names an earlier policy takes, are left out. The config is read as `vcpud plan` reads
it, but not checked against this host's CPUs. Completion must never disturb the shell: any
problem (no config, a broken one, an unknown question) prints nothing and exits 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config, Policy

HOOK = "__complete"
# Names a shell can take without quoting; anything else is not offered.
_PLAIN = re.compile(r"[A-Za-z0-9_.@%+,/=-]+\Z")
# A few characters to try for '?' and for a '[!...]' set.
_FILLERS = "1xa0_"


def glob_sample(glob: str) -> str | None:
    """A plain name that ``glob`` matches (fnmatch syntax, ``*`` matching nothing), or None."""
    import fnmatch

    out: list[str] = []
    i = 0
    while i < len(glob):
        c = glob[i]
        i += 1
        if c == "*":
            continue
        if c == "?":
            out.append(_FILLERS[0])
        elif c == "[" and (end := _set_end(glob, i)) is not None:
            body = glob[i:end]
            i = end + 1
            negate = body.startswith("!")  # fnmatch negates with '!' only
            members = _set_members(body[1:] if negate else body)
            pick = next((f for f in _FILLERS if f not in members), None) if negate else \
                next(iter(sorted(members)), None)
            if pick is None:
                return None
            out.append(pick)
        else:
            out.append(c)
    sample = "".join(out)
    return sample if sample and fnmatch.fnmatchcase(sample, glob) else None


def _set_end(glob: str, start: int) -> int | None:
    """Index of the ']' closing a set opened before ``start``, as fnmatch finds it."""
    j = start
    if j < len(glob) and glob[j] == "!":
        j += 1
    if j < len(glob) and glob[j] == "]":
        j += 1
    end = glob.find("]", j)
    return None if end < 0 else end


def _set_members(body: str) -> set[str]:
    members: set[str] = set()
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            lo, hi = body[k], body[k + 2]
            members.update(chr(x) for x in range(ord(lo), min(ord(hi), ord(lo) + 256) + 1))
            k += 3
        else:
            members.add(body[k])
            k += 1
    return members


def what_if_candidates(config: Config) -> Iterator[tuple[str, str]]:
    """(value for --what-if, the policy it selects), in policy order, without repeats."""
    from .whatif import what_if_vm

    seen: set[str] = set()
    for policy in config.policies:
        name = glob_sample(policy.match.name) if policy.match.name is not None else policy.name
        if name is None or not _PLAIN.match(name) or ":" in name:
            continue
        counts = _counts(policy)
        for count in counts or (1,):
            vm = what_if_vm(0, f"{name}:{count}")
            chosen = config.select(vm)
            value = f"{name}:{count}" if counts else f"{name}:"
            if chosen is policy and value not in seen:
                seen.add(value)
                yield value, policy.name


def _counts(policy: Policy) -> tuple[int, ...]:
    """The vCPU counts to offer: the bounds of ``match.vcpus`` (none: any count is selected)."""
    from .whatif import MAX_VM_VCPUS

    if policy.match.vcpus is None:
        return ()
    lo, hi = policy.match.vcpus
    return tuple(dict.fromkeys(n for n in (lo, hi) if n <= MAX_VM_VCPUS))


def main(argv: Sequence[str]) -> int:
    """Print the answer to one completion question; always 0."""
    try:
        if list(argv[:1]) != ["what-if"] or len(argv) > 2:
            return 0
        from .config import DEFAULT_CONFIG_PATH, ConfigError, load_config

        path = Path(argv[1]) if len(argv) > 1 and argv[1] else DEFAULT_CONFIG_PATH
        try:
            config = load_config(path)
        except ConfigError:
            return 0
        lines = [f"{value}\tpolicy {policy}" for value, policy in what_if_candidates(config)
                 if policy.isprintable() and "\t" not in policy]
        if lines:
            print("\n".join(lines))
    except Exception:  # noqa: BLE001 - a completion that fails shows nothing, never a traceback
        return 0
    return 0
