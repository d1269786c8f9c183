"""Config files as text: reading, UTF-8 decoding with positioned errors, and include globs.

``include`` takes globs relative to the including file's directory; each glob's files are
read in name order, globs in the order given. A file matched twice, or the main file itself,
is read once.
"""

from __future__ import annotations

import codecs
import errno
import glob
import logging
import os
from pathlib import Path

from yaml.nodes import Node

from .. import bounded
from ..cpuset import shorten
from .issues import Batch, ConfigIssue, Invalid, Position
from .yamlpos import Document

log = logging.getLogger(__name__)

# Files the includes of one config may read; each file is at most bounded.CONFIG_LIMIT bytes.
MAX_INCLUDED_FILES = 256


def read_main(path: Path) -> str:
    """The text of the main config file; raise Invalid if it cannot be read or decoded."""
    shown = str(path)
    try:
        # Only a regular file of bounded size: a FIFO would hang, /dev/zero would fill memory.
        data = bounded.read_bytes(path, bounded.CONFIG_LIMIT)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise Invalid(ConfigIssue(Position(shown, 1, 1), f"cannot read config file: {os_reason(e)}")) from None
    try:
        return decode(data)
    except UnicodeDecodeError as e:
        line, col = byte_position(data, e.start)
        raise Invalid(
            ConfigIssue(Position(shown, line, col), f"not valid UTF-8: byte {strip_bom(data)[e.start]:#04x}")
        ) from None


def read_includes(
    doc: Document, base_dir: Path | None, includes: list[tuple[str, Node]], seen: set[str], batch: Batch
) -> list[tuple[str, str]]:
    """Expand the include globs ``doc`` names into (shown path, text) of the files not in ``seen``.

    Problems go to ``batch``, positioned at the glob; ``seen`` (real paths) gains the files read.
    """
    out: list[tuple[str, str]] = []
    read = 0
    for pattern, node in includes:
        if base_dir is None:
            batch.add(doc.issue(node, "'include' cannot be resolved here: no base directory", "include"))
            continue
        try:
            found = sorted(glob.glob(pattern, root_dir=base_dir))
        except (OSError, ValueError) as e:
            batch.add(doc.issue(node, f"cannot expand include {shorten(pattern)}: {os_reason(e)}", "include"))
            continue
        if not found:
            batch.add(doc.issue(node, f"include {shorten(pattern)} matches no file", "include"))
            continue
        for rel in found:
            path = Path(base_dir, rel)  # an absolute pattern yields absolute matches
            shown = str(path)
            real = os.path.realpath(path)
            if real in seen:
                log.debug("%s: %s is already read, skipping it", doc.file, shown)
                continue
            seen.add(real)
            read += 1
            if read > MAX_INCLUDED_FILES:
                batch.add(doc.issue(
                    node,
                    f"include {shorten(pattern)}: more than {MAX_INCLUDED_FILES} included files; "
                    f"{shown!r} and the rest are not read",
                    "include",
                ))
                return out
            with batch.catch():
                out.append((shown, _read_included(doc, node, path)))
    return out


def _read_included(doc: Document, node: Node, path: Path) -> str:
    shown = str(path)
    try:
        data = bounded.read_bytes(path, bounded.CONFIG_LIMIT)
    except (OSError, ValueError) as e:
        raise Invalid(doc.issue(node, f"cannot read included file {shown!r}: {os_reason(e)}", "include")) from None
    try:
        return decode(data)
    except UnicodeDecodeError as e:
        line, col = byte_position(data, e.start)
        raise Invalid(
            doc.issue(
                node, f"cannot read included file {shown!r}: not valid UTF-8 (line {line}, column {col})", "include"
            )
        ) from None


def decode(data: bytes) -> str:
    # The BOM is stripped first so UnicodeDecodeError offsets index `data` as returned
    # by strip_bom; callers compute positions on the same stripped bytes.
    return strip_bom(data).decode("utf-8")


def strip_bom(data: bytes) -> bytes:
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


def byte_position(data: bytes, offset: int) -> tuple[int, int]:
    data = strip_bom(data)
    line_start = data.rfind(b"\n", 0, offset) + 1
    col = len(data[line_start:offset].decode("utf-8", errors="replace")) + 1
    return data.count(b"\n", 0, offset) + 1, col


def os_reason(e: Exception) -> str:
    reason = getattr(e, "strerror", None) or str(e)
    if isinstance(e, bounded.ReadError) and ": " in reason:
        reason = reason.split(": ")[-1]  # ReadError's strerror starts with the path, shown already
        if reason == "a directory":
            reason = os.strerror(errno.EISDIR)
    return reason
