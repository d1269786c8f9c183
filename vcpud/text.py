"""Text from outside (guests' names and threads, user input) made safe to print."""

from __future__ import annotations

import sys


def _escape_char(c: str) -> str:
    if c == "\\":
        return "\\\\"
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def show(text: object) -> str:
    """Text a guest or a user chose (a VM name from qemu's -name, a thread name), safe to print:
    control and other non-printable characters, and backslashes, as escapes (``\\x1b``)."""
    s = str(text)
    if s.isprintable() and "\\" not in s:
        return s
    return "".join(c if c.isprintable() and c != "\\" else _escape_char(c) for c in s)


def printable_lines(text: str) -> str:
    """Every line of ``text`` with non-printable characters escaped (backslashes kept): the last
    guard before the terminal, for whatever text a field-level show() did not go through."""
    return "\n".join(
        line if line.isprintable() else "".join(c if c.isprintable() else _escape_char(c) for c in line)
        for line in text.split("\n"))


def emit(text: str) -> None:
    sys.stdout.write(printable_lines(text))


def short(text: str, n: int = 60) -> str:
    """User input for an error message: escaped as repr() does, and cut to about ``n`` characters."""
    return repr(text) if len(text) <= n else repr(text[:n]) + f"... ({len(text)} characters)"
