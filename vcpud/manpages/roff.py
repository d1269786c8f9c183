"""Writing man(7) roff: escaping text, a small inline markup, and the macros the pages use.

Inline markup of the prose (outside it, every character is taken literally):

* ```word``` is bold: commands, options, keys, literal values; nothing inside is markup.
* ``<word>`` is italic: a placeholder the reader replaces (``<FILE>``).

Every output line is ASCII: groff reads its input as Latin-1 unless preconv runs first, so a
UTF-8 character would come out as two wrong ones on some systems.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_INLINE = re.compile(r"`([^`]*)`|<([A-Za-z][^<>`]*)>")
# Characters that need a roff escape anywhere in text (the hyphen: a minus sign, so that
# options copied from the page work; the apostrophe and grave: the ASCII ones, not quotes).
_ESCAPES = {"\\": "\\e", "-": "\\-", "'": "\\(aq", "`": "\\(ga", "^": "\\(ha", "~": "\\(ti"}
_NON_ASCII = {"\u2014": "\\(em", "\u2013": "\\(en", "\u2192": "\\(->", "\u00b5": "\\(mc"}


class RoffError(ValueError):
    """Text the pages cannot carry (a character without an ASCII rendering, a broken markup)."""


def escape(text: str) -> str:
    """``text`` as literal roff text, for use inside a line (not at its start: see :func:`line`)."""
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c in _NON_ASCII:
            out.append(_NON_ASCII[c])
        elif c == "\n" or not (" " <= c <= "~"):
            raise RoffError(f"character {c!r} in {text!r} has no place in a man page line")
        else:
            out.append(c)
    return "".join(out)


def line(text: str) -> str:
    """A text line: a leading '.' or "'" would make it a request, a leading space a break."""
    text = text.strip()
    return "\\&" + text if text[:1] in (".", "'") else text


def inline(text: str) -> str:
    """Prose with ```bold``` and ``<italic>`` markup as escaped roff (one logical line)."""
    out: list[str] = []
    pos = 0
    for m in _INLINE.finditer(text):
        out.append(escape(text[pos:m.start()]))
        bold, italic = m.group(1), m.group(2)
        # \% keeps groff from hyphenating the word: an option or a path must stay whole.
        words = " ".join("\\%" + escape(w) for w in (bold if bold is not None else italic).split(" "))
        out.append(f"\\fB{words}\\fR" if bold is not None else f"\\fI{words}\\fR")
        pos = m.end()
    rest = text[pos:]
    if "`" in rest:
        raise RoffError(f"unbalanced ` in {text!r}")
    out.append(escape(rest))
    return "".join(out)


def paragraphs(text: str) -> list[str]:
    """Prose with blank lines between paragraphs: one roff line per sentence-ish line, .PP between.

    Lines of the source are joined within a paragraph; a line ending a sentence keeps its own
    output line, as roff wants (it then puts two spaces after the full stop).
    """
    out: list[str] = []
    for i, para in enumerate(p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()):
        if i:
            out.append(".PP")
        out += [line(inline(s)) for s in _sentences(" ".join(para.split()))]
    return out


def _sentences(text: str) -> list[str]:
    """Split after '. ' (not inside ```...```): roff ends a sentence at the end of an input line."""
    parts: list[str] = []
    start = 0
    in_code = False
    for i, c in enumerate(text):
        if c == "`":
            in_code = not in_code
        elif not in_code and c == " " and text[i - 1:i] in (".", "?", "!") \
                and (text[i + 1:i + 2].isupper() or text[i + 1:i + 2] == "`"):
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def heading(title: str) -> str:
    return f".SH {escape(title)}" if " " not in title else f'.SH "{escape(title)}"'


def subheading(title: str) -> str:
    return f'.SS "{escape(title)}"'


def tagged(tag: str, body: str) -> list[str]:
    """A .TP item: ``tag`` in inline markup on its own line, then the prose of ``body``."""
    return [".TP", line(inline(tag)), *paragraphs(body)]


def example(lines: Iterable[str]) -> list[str]:
    """Literal lines (a shell session, a YAML file), indented, in a fixed-width font."""
    # No-fill mode keeps each line's leading blanks (YAML indentation); only a control
    # character in the first column needs guarding.
    body = [("\\&" if x[:1] in (".", "'") else "") + escape(x.rstrip()) for x in lines]
    return [".RS 4", ".nf", ".ft CR", *body, ".ft R", ".fi", ".RE"]


def synopsis(command: str, words: Sequence[str]) -> list[str]:
    """One synopsis: the command, then words in inline markup, continued lines indented (.SY/.YS)."""
    return [f".SY {escape(command)}", *(line(inline(w)) for w in words), ".YS"]


def title(name: str, section: str, date: str, source: str, manual: str) -> str:
    return f'.TH "{escape(name.upper())}" "{section}" "{date}" "{escape(source)}" "{escape(manual)}"'
