"""`vcpud run` with its event path timed stage by stage (benchmarks only; nothing in vcpud changes).

    VCPUD_TRACE=FILE python -m tests.benchmarks.trace_daemon run --config ...

Wraps, from outside, the functions a COMM event goes through in the daemon and, for each event
that ends in a pin, writes one JSON line to FILE with the time each stage took (ns):

- ``queued``: the connector's kernel timestamp -> the loop's select() returned; ``busy`` is the part
  of it when the loop was still doing something else (the previous turn), ``busy_publish`` and
  ``busy_rescan`` the part of that spent in Daemon.publish (the snapshot for the metrics) or in a
  periodic rescan;
- ``read``: recv() + parse of the whole batch; ``before``: the events ahead of it in that batch;
- ``thread``: Procfs.thread (the /proc read); ``classify``, ``assign``;
- ``route``: the router's ops_for (libvirt, cgroups); ``get1``/``check``/``setaff``/``get2``: pin_one's
  sched_getaffinity, OsAffinity.set's /proc/PID/task/TID existence check, sched_setaffinity and the
  read-back;
- ``latency``: what the daemon itself measured (event -> just before its log line), ``log``: that log
  line; ``other``: the rest of the way through on_comm.

and one line per Daemon.publish: how long it took, for how many VMs and threads.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import IO, Any, Callable

from vcpud import cli, daemon, pinner, pinning, reconciler, sources
from vcpud.procconn import ProcConnector
from vcpud.procfs import Procfs

now = time.monotonic_ns  # CLOCK_MONOTONIC, as the connector's timestamps
state: dict[str, Any] = {"select_in": 0, "woke": 0, "read_in": 0, "read_out": 0, "cur": None, "in_pin": False}
# stages timed by wrappers around whole calls; pin_one's parts are inside "pin_one"
STAGES = ("thread", "classify", "assign", "route", "pin_one", "log")


def timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, adding its duration to the current event's ``key`` (if an event is being traced)."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        cur = state["cur"]
        if cur is None:
            return fn(*a, **kw)
        t = now()
        try:
            return fn(*a, **kw)
        finally:
            cur[key] = cur.get(key, 0) + now() - t

    return wrapper


def patch(owner: Any, name: str, key: str) -> None:
    setattr(owner, name, timed(key, getattr(owner, name)))


def install(out: IO[str]) -> None:
    ready = sources.Sources.ready

    def traced_ready(self: sources.Sources, timeout: float) -> Any:
        state["select_in"] = now()
        try:
            return ready(self, timeout)
        finally:
            state["woke"] = now()

    sources.Sources.ready = traced_ready

    read = ProcConnector.read

    def traced_read(self: ProcConnector) -> Any:
        state["read_in"] = now()
        try:
            return read(self)
        finally:
            state["read_out"] = now()

    ProcConnector.read = traced_read

    on_comm = reconciler.Reconciler.on_comm

    def traced_on_comm(self: reconciler.Reconciler, pid: int, tgid: int, event_ns: int = 0) -> None:
        t = now()
        cur: dict[str, Any] = {"tid": pid}
        state["cur"] = cur
        try:
            on_comm(self, pid, tgid, event_ns)
        finally:
            state["cur"] = None
            end = now()
        if "latency" not in cur or not event_ns:
            return  # not pinned on this event
        for what in ("publish", "rescan"):  # of "busy": the loop was in one of those
            t_in, t_out = state.get(f"{what}_in", 0), state.get(f"{what}_out", 0)
            if t_in <= event_ns < t_out <= state["select_in"]:
                cur[f"busy_{what}"] = t_out - event_ns
        cur.update(queued=state["woke"] - event_ns, busy=max(0, state["select_in"] - event_ns),
                   read=state["read_out"] - state["read_in"], before=t - state["read_out"], total=end - event_ns)
        cur["check"] = cur.pop("set", 0) - cur.get("setaff", 0)
        cur["other"] = end - t - sum(cur.get(k, 0) for k in STAGES)
        out.write(json.dumps(cur) + "\n")

    reconciler.Reconciler.on_comm = traced_on_comm

    patch(Procfs, "thread", "thread")
    patch(reconciler, "classify_new_thread", "classify")
    for mod in (reconciler, pinner):  # whichever places a new thread
        if hasattr(mod, "assign"):
            patch(mod, "assign", "assign")
    for router in (pinning.Chain, pinning.Direct):
        patch(router, "ops_for", "route")
    patch(pinning.OsAffinity, "set", "set")  # the existence check and sched_setaffinity
    pin_one = pinner.pin_one

    def traced_pin_one(*a: Any, **kw: Any) -> Any:
        state["in_pin"] = True
        try:
            return pin_one(*a, **kw)
        finally:
            state["in_pin"] = False

    pinner.pin_one = timed("pin_one", traced_pin_one)
    setaff, getaff = os.sched_setaffinity, os.sched_getaffinity

    def traced_setaffinity(pid: int, mask: Any) -> None:
        cur = state["cur"]
        t = now()
        try:
            setaff(pid, mask)
        finally:
            if cur is not None:
                cur["setaff"] = cur.get("setaff", 0) + now() - t

    def traced_getaffinity(pid: int) -> Any:
        cur = state["cur"]
        t = now()
        try:
            return getaff(pid)
        finally:
            if cur is not None and state["in_pin"]:
                key = "get2" if "setaff" in cur else "get1"
                cur[key] = cur.get(key, 0) + now() - t

    os.sched_setaffinity = traced_setaffinity
    os.sched_getaffinity = traced_getaffinity

    since = pinner.since

    def traced_since(event_ns: int) -> float:
        cur = state["cur"]
        s = since(event_ns)
        if cur is not None and "latency" not in cur:
            cur["latency"] = int(s * 1e9)
        return s

    pinner.since = traced_since
    patch(pinner.log, "info", "log")

    publish = daemon.Daemon.publish

    def traced_publish(self: daemon.Daemon) -> None:
        state["publish_in"] = t = now()
        try:
            publish(self)
        finally:
            state["publish_out"] = now()
            vms = self.reconciler.vms.values()
            out.write(json.dumps({"publish": state["publish_out"] - t, "vms": len(vms),
                                  "threads": sum(len(st.vm.threads) for st in vms)}) + "\n")

    daemon.Daemon.publish = traced_publish
    periodic_rescan = daemon.Daemon.periodic_rescan

    def traced_rescan(self: daemon.Daemon) -> None:
        state["rescan_in"] = now()
        try:
            periodic_rescan(self)
        finally:
            state["rescan_out"] = now()

    daemon.Daemon.periodic_rescan = traced_rescan


if __name__ == "__main__":
    with open(os.environ["VCPUD_TRACE"], "w", buffering=1) as f:
        install(f)
        sys.exit(cli.main())
