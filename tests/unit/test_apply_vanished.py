"""`vcpud apply` when a VM exits in the middle of the pass, over the captured /proc tree.

The tree's "named" VM is removed while the pass is reading it (after /proc was listed) or while it
is being pinned; the other VMs must be pinned all the same, and the outcome is the one the README
documents: a VM gone before vcpud finished reading it is counted in "vanished during the scan" and
is no failure (exit 0); threads that exit between being read and being pinned are pinned-not-done,
reported per thread as `vanished`, and make `apply` exit 1.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from textwrap import dedent

import pytest

from tests.proctree import ProcTree, load
from tests.unit.test_reconciler import Actuator, MemoryStore
from vcpud import cli
from vcpud.config import parse_config_text
from vcpud.cpuset import CpuSet
from vcpud.discovery import Role
from vcpud.engine import reconcile
from vcpud.pinning import Outcome
from vcpud.procfs import Procfs

ONLINE = CpuSet.parse("0-3")
POLICY = """
executables: [/usr/bin/qemu-system-*]
state_file: {state}
policies:
  - name: all
    match: {{}}
    affinity: "0"
"""


@pytest.fixture
def tree(tmp_path: Path) -> ProcTree:
    t = load(tmp_path / "proc")
    for name in ("named", "unnamed", "deleted"):
        pid = t.pid(name)
        for tid in t.procfs().tids(pid):
            t.set_affinity(pid, tid, [0, 1])  # every thread starts off its policy's CPU 0
    return t


class VanishingProcfs(Procfs):
    """The tree's /proc, where the victim exits once its threads are being listed: after /proc was
    listed, its executable checked and its stat, status and cmdline read."""

    def __init__(self, root: Path, tree: ProcTree, victim: int) -> None:
        super().__init__(root)
        self.tree, self.victim, self.gone = tree, victim, False

    def tids(self, pid: int) -> list[int]:
        if pid == self.victim and not self.gone:
            self.gone = True
            self.tree.remove_process(pid)
        return super().tids(pid)


class VanishingActuator(Actuator):
    """The fake sched_*affinity; the victim exits as the first of its threads is looked at."""

    def __init__(self, tree: ProcTree, victim: int) -> None:
        super().__init__(tree)
        self.victim, self.victim_tids, self.gone = victim, set(tree.procfs().tids(victim)), False

    def get(self, tid: int) -> CpuSet:
        if tid in self.victim_tids and not self.gone:
            self.gone = True
            self.tree.remove_process(self.victim)
        return super().get(tid)


def expected_pins(tree: ProcTree, pid: int) -> set[int]:
    """The threads the catch-all policy pins: all but kernel workers and threads of no known role."""
    report = reconcile(parse_config_text(dedent(POLICY.format(state="/nonexistent")), "t.yaml", online=ONLINE),
                       ONLINE, tree.procfs(), Actuator(tree), dry_run=True, pids=[pid], store=MemoryStore(),
                       exe_check=tree.exe_check())
    (vm,) = report.vms
    assert not {a.role for a in vm.plan.assignments} & {Role.KERNEL, Role.UNKNOWN}
    assert {a.role for a in vm.plan.assignments} >= {Role.VCPU, Role.EMULATOR}
    return {a.tid for a in vm.plan.assignments}


def run(tree: ProcTree, procfs: Procfs, act: Actuator):
    cfg = parse_config_text(dedent(POLICY.format(state="/nonexistent")), "t.yaml", online=ONLINE)
    return reconcile(cfg, ONLINE, procfs, act, store=MemoryStore(), exe_check=tree.exe_check())


def test_vm_gone_while_the_scan_reads_it_is_counted_vanished_and_the_others_pinned(tree):
    victim, others = tree.pid("named"), [tree.pid("unnamed"), tree.pid("deleted")]
    want = {pid: expected_pins(tree, pid) for pid in others}
    procfs = VanishingProcfs(tree.root, tree, victim)
    act = Actuator(tree)
    report = run(tree, procfs, act)
    assert procfs.gone and not (tree.root / str(victim)).exists()
    assert report.scan.vanished == 1
    assert [v.plan.vm.pid for v in report.vms] == others  # the victim is in no report line
    assert report.ok
    for v in report.vms:
        assert {r.assignment.tid: r.outcome for r in v.results} == dict.fromkeys(want[v.plan.vm.pid], Outcome.PINNED)
    assert set(act.moved()) == want[others[0]] | want[others[1]]
    assert set(act.moved().values()) == {CpuSet.parse("0")}


def test_vm_gone_while_being_pinned_is_reported_vanished_and_the_others_pinned(tree):
    victim, others = tree.pid("named"), [tree.pid("unnamed"), tree.pid("deleted")]
    want = {pid: expected_pins(tree, pid) for pid in [victim, *others]}
    act = VanishingActuator(tree, victim)
    report = run(tree, tree.procfs(), act)
    assert act.gone
    assert report.scan.vanished == 0  # it was read whole
    by_pid = {v.plan.vm.pid: v for v in report.vms}
    assert set(by_pid) == {victim, *others}
    assert {r.assignment.tid: r.outcome for r in by_pid[victim].results} == dict.fromkeys(want[victim],
                                                                                          Outcome.VANISHED)
    for pid in others:
        assert by_pid[pid].ok
        assert {r.assignment.tid: r.outcome for r in by_pid[pid].results} == dict.fromkeys(want[pid], Outcome.PINNED)
    assert not by_pid[victim].ok and not report.ok  # README: apply exits 1, the line says `vanished`
    assert set(act.moved()) == want[others[0]] | want[others[1]]


# --- what `vcpud apply` prints and returns ------------------------------------------------------
def cli_apply(tree: ProcTree, tmp_path: Path, monkeypatch, capsys, procfs: type | None = None,
              actuator: type | None = None, victim: int = 0) -> tuple[int, list[str]]:
    cfg = tmp_path / "vcpud.yaml"
    cfg.write_text(dedent(POLICY.format(state=tmp_path / "state.json")))
    # The real command over the tree: its /proc, the fake actuator, the recorded executable facts.
    if procfs is not None:
        monkeypatch.setattr(cli, "Procfs", lambda root: procfs(root, tree, victim))
    act = actuator(tree, victim) if actuator is not None else Actuator(tree)
    monkeypatch.setattr(cli, "OsAffinity", lambda root: act)
    monkeypatch.setattr(cli, "reconcile", functools.partial(reconcile, exe_check=tree.exe_check()))
    rc = cli.main(["apply", "--config", str(cfg), "--proc", str(tree.root)])
    out = capsys.readouterr().out
    return rc, out.splitlines()


def headers(lines: list[str]) -> dict[int, str]:
    out = {}
    for line in lines:
        m = re.match(r"\S+ \(pid (\d+)\) ", line)
        if m:
            out[int(m.group(1))] = line
    return out


def test_apply_prints_a_vm_gone_during_the_scan_as_vanished_and_exits_0(tree, tmp_path, monkeypatch, capsys):
    victim, others = tree.pid("named"), [tree.pid("unnamed"), tree.pid("deleted")]
    want = {pid: expected_pins(tree, pid) for pid in others}
    rc, lines = cli_apply(tree, tmp_path, monkeypatch, capsys, procfs=VanishingProcfs, victim=victim)
    online = cli.read_topology(Path("/")).online  # apply plans against this host's CPUs
    assert not (tree.root / str(victim)).exists()
    assert rc == cli.EXIT_OK, lines
    assert lines[-1] == "(1 processes or threads vanished during the scan)", lines
    h = headers(lines)
    assert set(h) == set(others), lines
    for pid in others:
        assert h[pid].endswith(f" policy all: {len(want[pid])} pinned, 0 unchanged, 0 failed"), h[pid]
    assert not any("FAILED" in line for line in lines), lines
    for pid in others:
        for tid in want[pid]:
            assert tree.procfs().affinity(pid, tid) == CpuSet.parse("0") & online


def test_apply_prints_threads_gone_before_their_pin_as_vanished_and_exits_1(tree, tmp_path, monkeypatch, capsys):
    victim, others = tree.pid("named"), [tree.pid("unnamed"), tree.pid("deleted")]
    want = {pid: expected_pins(tree, pid) for pid in [victim, *others]}
    rc, lines = cli_apply(tree, tmp_path, monkeypatch, capsys, actuator=VanishingActuator, victim=victim)
    assert not (tree.root / str(victim)).exists()
    assert rc == cli.EXIT_FAILED, lines
    h = headers(lines)
    assert set(h) == {victim, *others}, lines
    n = len(want[victim])
    assert h[victim].endswith(f" policy all: 0 pinned, 0 unchanged, {n} failed"), h[victim]
    failed = [line for line in lines if line.startswith("  FAILED ")]
    assert {int(line.split()[2]) for line in failed} == want[victim], lines
    assert all(line.endswith(": vanished: No such process") for line in failed), failed
    for pid in others:
        assert h[pid].endswith(f" policy all: {len(want[pid])} pinned, 0 unchanged, 0 failed"), h[pid]
    assert not any("vanished during the scan" in line for line in lines), lines
