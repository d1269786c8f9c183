"""The Prometheus text format 0.0.4 of the model, written directly (no prometheus_client registry):
tests hold it byte for byte equal to prometheus_client's ``generate_latest``, at a fraction of the cost."""

from __future__ import annotations

from typing import Iterable

from prometheus_client.utils import floatToGoString

from ..snapshot import Snapshot
from .family import CpuInfoFamily, Family
from .model import model

# Always the classic text format: every Prometheus reads it, and vcpud has nothing that needs
# OpenMetrics (no exemplars, no _created series); Prometheus takes it whatever it asked for.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return v


class _Escaped(dict[str, str]):
    """label value -> escaped, computed once per distinct value (lookups of hits stay in C)."""

    def __missing__(self, v: str) -> str:
        e = self[v] = _esc(v)
        return e


def text(fams: Iterable[Family]) -> bytes:
    """The text exposition of these families."""
    out: list[str] = []
    esc = _Escaped()
    for f in fams:
        expo = f.exposed_name
        typ = "gauge" if f.type == "info" else f.type
        doc = f.help.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {expo} {doc}\n# TYPE {expo} {typ}\n")
        if isinstance(f, CpuInfoFamily):
            rest = "".join(f',{k}="%s"' for k in f.labels[1:])
            pre = f'{f.name}_info{{cpu="'
            for values, cpus in f.groups:
                if cpus:
                    post = '"' + rest % tuple(esc[v] for v in values) + "} 1.0\n"
                    out.append(pre + (post + pre).join(cpus) + post)
            continue
        templates: dict[tuple[str, int], str] = {}
        append = out.append
        for suffix, values, value in f.samples:
            n = len(values)
            tpl = templates.get((suffix, n))
            if tpl is None:
                inner = ",".join(f'{k}="%s"' for k in f.labels[:n])
                tpl = templates[suffix, n] = f.name + suffix + (f"{{{inner}}}" if inner else "") + " %s\n"
            num = f"{value}.0" if type(value) is int and 0 <= value < 1_000_000 else floatToGoString(value)
            if n == 0:
                append(tpl % num)
            elif n == 1:
                append(tpl % (esc[values[0]], num))
            elif n == 2:
                append(tpl % (esc[values[0]], esc[values[1]], num))
            else:
                append(tpl % (*[esc[v] for v in values], num))
    return "".join(out).encode("utf-8")


def exposition(snap: Snapshot | None) -> bytes:
    """What the server sends for a snapshot."""
    return text(model(snap))
