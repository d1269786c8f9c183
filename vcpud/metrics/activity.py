"""Activity families: what the loop did (pin operations, drift corrections, events, rescans, threads
that vanished, proc connector overruns, configuration reloads) and how long it took (histograms).

Every pin outcome `vcpud run` can have, every event source and both reload results are present from
the start, 0 until they happen.
"""

from __future__ import annotations

from ..pinning import Outcome
from ..snapshot import Snapshot
from ..vocab import EventSource
from .family import Family, counter, gauge, histogram

# "planned" is the outcome of dry runs (`vcpud apply --dry-run`); the daemon never counts it.
RUN_OUTCOMES = tuple(sorted((o for o in Outcome if o is not Outcome.PLANNED), key=lambda o: o.value))


def build(snap: Snapshot) -> list[Family]:
    out = []
    f = Family("vcpud_pin_operations", "counter", "Thread affinity operations by result.", ("result",))
    for outcome in RUN_OUTCOMES:
        f.add((outcome.value,), snap.pin_operations.get(outcome, 0))
    out.append(f)
    out.append(counter("vcpud_drift_corrections", "Threads moved away by someone else and put back.",
                       snap.drift_corrections))
    f = Family("vcpud_events", "counter", "Events handled by the loop, by source.", ("source",))
    for source in sorted(EventSource, key=lambda s: s.value):
        f.add((source.value,), snap.events.get(source, 0))
    out.append(f)
    out.append(counter("vcpud_rescans", "Full scans of /proc (periodic, at startup, after a reload or a CPU change).",
                       snap.rescans))
    out.append(counter("vcpud_vanished", "Threads or processes that exited while vcpud read or pinned them.",
                       snap.vanished))
    out.append(counter("vcpud_proc_connector_overruns",
                       "Times the kernel's proc connector dropped events (each is followed by a rescan).",
                       snap.proc_connector_overruns))

    out.append(histogram("vcpud_pin_latency_seconds",
                         "Kernel event (thread created or named) to the thread's affinity being set.",
                         snap.pin_latency))
    out.append(histogram("vcpud_reconcile_duration_seconds",
                         "Duration of one reconcile pass (a rescan: its re-checks and pins).", snap.reconcile_duration))

    f = Family("vcpud_config_reloads", "counter", "Configuration reloads by result (the initial load is not one).",
               ("result",))
    f.add(("failure",), snap.config_reloads_failed)
    f.add(("success",), snap.config_reloads_succeeded)
    out.append(f)
    out.append(gauge("vcpud_config_last_reload_successful",
                     "1 if the last configuration load succeeded, 0 if it failed.",
                     1 if snap.config_last_reload_successful else 0))
    out.append(gauge("vcpud_config_last_reload_success_timestamp_seconds",
                     "Unix time of the last successful configuration load.", snap.config_last_reload_success_timestamp))
    return out
