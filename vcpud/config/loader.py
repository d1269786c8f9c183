"""Loading a whole config: the main file, then its includes; every issue of every file in one ConfigError."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..bounded import CONFIG_LIMIT
from ..cpuset import CpuSet, shorten
from .fields import Ctx
from .issues import Batch, ConfigError, ConfigIssue, Invalid, Position
from .model import Config, Policy
from .schema import parse_file
from .sources import read_includes, read_main

log = logging.getLogger(__name__)


# Issues printed for one config: the rest are summed up in one more line.
MAX_ISSUES = 50


def load_config(path: Path, online: CpuSet | None = None) -> Config:
    """Read ``path`` and the files it includes; raise ConfigError listing every issue.

    With ``online``, every CPU the config names must be one of them. Nothing else is raised:
    whatever the files hold (a reload must never kill the daemon).
    """
    path = Path(path)
    try:
        text = read_main(path)
    except Invalid as e:
        raise ConfigError(e.issues) from None
    except Exception as e:  # noqa: BLE001 - see _internal_error
        raise _internal_error(str(path), e) from None
    return parse_config_text(text, str(path), online, base_dir=path.parent)


def parse_config_text(
    text: str,
    filename: str = "<string>",
    online: CpuSet | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Parse a main config given as text. Includes resolve against ``base_dir``;
    without one, an ``include`` is an error. Raises ConfigError and nothing else."""
    try:
        return _parse(text, filename, online, base_dir)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - see _internal_error
        raise _internal_error(filename, e) from None


def _internal_error(filename: str, e: Exception) -> ConfigError:
    """The last resort: an unexpected exception is a bug, but it must not escape as a traceback
    (a SIGHUP reload would end the daemon); it becomes one issue naming the file."""
    log.debug("unexpected error loading %s", filename, exc_info=e)
    return ConfigError([
        ConfigIssue(
            Position(filename, 1, 1),
            f"cannot load this config: {type(e).__name__}: {shorten(str(e))} "
            "(a bug in vcpud: please report it; --log-level debug shows where)",
        )
    ])


def _parse(text: str, filename: str, online: CpuSet | None, base_dir: Path | None, fast: bool = True) -> Config:
    """The config; ``fast``: its files composed through libyaml where it reads them as PyYAML does,
    and, should there be any issue, everything read again through PyYAML (yamlpos.FAST_MAX_CHARS)."""
    size = len(text.encode("utf-8", "surrogatepass")) if len(text) * 4 > CONFIG_LIMIT else len(text)
    if size > CONFIG_LIMIT:
        raise ConfigError([
            ConfigIssue(Position(filename, 1, 1), f"config file too large: {size} bytes (at most {CONFIG_LIMIT})")
        ])
    ctx = Ctx(online)
    ctx.fast_yaml = fast
    batch = Batch()
    files: list[str] = []
    seen: set[str] = set()  # real paths read, so an include never re-reads a file
    try:
        seen.add(os.path.realpath(filename))
    except ValueError:  # a NUL in a made-up name; nothing on disk to skip
        pass
    top: dict[str, Any] = {}
    found: list[Policy] = []
    try:
        files.append(filename)
        top = parse_file(ctx, text, filename, False, batch)
        found = list(top.pop("policies", []))
        for shown, inc_text in read_includes(ctx.doc, base_dir, top.pop("include", []), seen, batch):
            files.append(shown)
            found.extend(parse_file(ctx, inc_text, shown, True, batch).get("policies", []))
    except RecursionError:
        # Only a pathological file gets here (the schema walk is shallow).
        batch.add(ConfigIssue(Position(ctx.doc.file or filename, 1, 1), "config nests too deeply"))
    if batch.issues and fast:
        return _parse(text, filename, online, base_dir, fast=False)
    if batch.issues:
        raise ConfigError(_sorted(batch.issues, files))
    assert not batch.failed, "a value was refused without any issue saying why"
    if "metrics" in top:
        top["metrics_listen"] = top.pop("metrics")
    config = Config(policies=tuple(found), files=tuple(files), **top)
    log.debug("loaded %d policies from %s", len(config.policies), ", ".join(config.files))
    return config


def _sorted(issues: Iterable[ConfigIssue], files: list[str]) -> list[ConfigIssue]:
    """In reading order of the files, then by position; a merged anchor's issue, reported once per use, once."""
    rank = {f: i for i, f in enumerate(files)}
    unique = list(dict.fromkeys(issues))
    ordered = sorted(unique, key=lambda i: (rank.get(i.pos.file, len(rank)), i.pos.line, i.pos.col))
    if len(ordered) > MAX_ISSUES:
        more = len(ordered) - MAX_ISSUES
        summary = ConfigIssue(ordered[MAX_ISSUES].pos, f"... and {more} more issues, from here on (not shown)")
        ordered = [*ordered[:MAX_ISSUES], summary]
    return ordered
