"""Prometheus metrics of the daemon's latest :class:`~vcpud.snapshot.Snapshot`, served over HTTP.

One builder per area (:mod:`.cpu`, :mod:`.pools`, :mod:`.vms`, :mod:`.activity`) turns a snapshot
into :class:`~.family.Family` objects; :mod:`.model` puts them in order, :mod:`.textformat` writes
the text format and :mod:`.server` serves it. Labels are bounded (CPU numbers, roles, VM names and
uuids, pool and policy names, states, results, event sources), never a PID or TID.
"""

from __future__ import annotations

from .family import CpuInfoFamily, Family
from .model import model
from .server import ListenError, MetricsServer, Source, parse_listen
from .textformat import CONTENT_TYPE, exposition, text

__all__ = ["CONTENT_TYPE", "CpuInfoFamily", "Family", "ListenError", "MetricsServer", "Source",
           "exposition", "model", "parse_listen", "text"]
