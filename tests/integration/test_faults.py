"""Faults with real guests and the real daemon: SIGKILL + restart with the state file damaged at
random and VMs starting and stopping meanwhile. After every restart the daemon must reach READY,
and /proc must show no exclusive CPU in two VMs' vCPU affinities."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.daemon_harness import DaemonProc
from tests.integration.test_apply_qemu import ONLINE, need_host
from tests.qemu import RUN, Guest, start_guest

pytestmark = pytest.mark.qemu

# CPU 1 exclusive, CPU 0 housekeeping: one 1-vCPU VM holds CPU 1, the others wait on CPU 0.
CONFIG = """\
state_file: {state}
rescan_interval: 1h
pools:
  dedicated: {{cpus: "1", exclusive: true}}
policies:
  - name: db
    match: {{name: "{run}fault*"}}
    vcpus: {{pool: dedicated}}
    on_exhausted: leave
"""


def damage(state: Path, rng: random.Random, pids: list[int]) -> str:
    """Do one bad thing to the state file; say which."""
    if state.is_dir() and not state.is_symlink():
        state.rmdir()
    elif state.exists() or state.is_symlink():
        state.unlink()
    kind = rng.choice(["missing", "empty", "garbage", "nesting", "huge", "types", "liar", "dir", "fifo", "truncated"])
    vm = {"pid": pids[0] if pids else 1, "starttime": 1, "name": "x", "policy": "db", "pool": "dedicated",
          "vcpus": [1], "emulator": None, "reserved": [], "reasons": []}
    if kind == "empty":
        state.write_bytes(b"")
    elif kind == "garbage":
        state.write_bytes(os.urandom(4096))
    elif kind == "nesting":
        state.write_text("[" * 100_000)
    elif kind == "huge":
        state.write_text(json.dumps({"version": 1, "vms": [dict(vm, pid="PID")]}).replace('"PID"', "1e400"))
    elif kind == "types":
        state.write_text(json.dumps({"version": 1, "vms": [dict(vm, vcpus=[True], starttime="1")]}))
    elif kind == "liar":  # every live VM claims CPU 1, with its real start time unknown
        state.write_text(json.dumps({"version": 1, "vms": [dict(vm, pid=p, starttime=i) for i, p in enumerate(pids)]}))
    elif kind == "dir":
        state.mkdir()
    elif kind == "fifo":
        os.mkfifo(state)
    elif kind == "truncated":
        state.write_text(json.dumps({"version": 1, "vms": [vm]})[:40])
    return kind


def vcpu_affinity(g: Guest) -> set[int]:
    tid = next(t for t, c in g.threads().items() if c == "CPU 0/KVM")
    cpus: set[int] = set()
    for part in g.affinity(tid).split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def test_sigkill_restart_with_damaged_state_never_double_books(tmp_path):
    need_host()
    if not {0, 1} <= set(ONLINE):
        skip_or_fail("needs CPUs 0 and 1")
    state, cfg = tmp_path / "state.json", tmp_path / "vcpud.yaml"
    cfg.write_text(CONFIG.format(state=state, run=RUN))
    rng = random.Random(9)
    guests: list[Guest] = []
    daemons: list[DaemonProc] = []
    seen: list[str] = []
    try:
        for i in range(12):
            if len(guests) < 3 and (not guests or rng.random() < 0.6):
                guests.append(start_guest(tmp_path, f"{RUN}fault{i}", smp="1"))
            elif len(guests) > 1 and rng.random() < 0.4:
                guests.pop(rng.randrange(len(guests))).kill()
            seen.append(damage(state, rng, [g.pid for g in guests]))
            d = DaemonProc(tmp_path, cfg)  # raises unless READY comes
            daemons.append(d)
            # READY comes after the startup pass pinned every VM that was there
            affs = {g.name: vcpu_affinity(g) for g in guests}
            on_1 = [n for n, a in affs.items() if 1 in a]
            assert len(on_1) == 1, f"after {seen[-1]!r}: CPU 1 in {on_1}: {affs}\n{d.log()[-3000:]}"
            assert all(a == {0} for n, a in affs.items() if n not in on_1), affs
            time.sleep(rng.uniform(0, 0.05))
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
        assert len(set(seen)) >= 6, seen  # the seed exercises most kinds of damage
    finally:
        for d in daemons:
            d.stop()
        for g in guests:
            g.kill()
