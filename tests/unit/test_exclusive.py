"""Exclusive pools never double-booked, whatever pins, restarts and exits do (issue 9, item 1).

Driven by the reconciler over the captured /proc tree: `fixture-named` (2 vCPUs, older) and
`fixture-deleted` (1 vCPU) both want the exclusive pool; the fake actuator is the kernel.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proctree import ProcTree, load
from tests.synth_topology import synth
from tests.unit.test_reconciler import POOLED, MemoryStore, affinity, make, unpin_all
from vcpud import state
from vcpud.cpuset import CpuSet
from vcpud.discovery import Role
from vcpud.reconciler import Reconciler, ScanReason
from vcpud.vocab import VMStatus

C = CpuSet.parse
LEAVE = POOLED
TOPO = synth(cores_per_node=(2,), smt=2)  # CPUs 0-3


def vcpu_affinities(tree: ProcTree, rec: Reconciler) -> dict[int, CpuSet]:
    """pid -> union of its vCPU threads' affinities, as the kernel (the tree) has them."""
    out = {}
    for pid, st_ in rec.vms.items():
        if st_.policy is None:
            continue
        cpus = CpuSet()
        for t in st_.vm.threads:
            if t.role is Role.VCPU:
                cpus |= tree.procfs().affinity(pid, t.tid)
        out[pid] = cpus
    return out


def assert_never_double_booked(tree: ProcTree, rec: Reconciler) -> None:
    affs = vcpu_affinities(tree, rec)
    held = {pid: rec.allocations[st_.vm.key].cpus for pid, st_ in rec.vms.items() if st_.vm.key in rec.allocations}
    seen: dict[int, int] = {}
    for pid, cpus in held.items():  # the ledger itself never gives a CPU twice
        for c in cpus:
            assert c not in seen, f"CPU {c} held by {seen[c]} and {pid}"
            seen[c] = pid
    for pid, cpus in held.items():  # and no other managed VM's vCPU may run on a held CPU
        for other, aff in affs.items():
            if other != pid:
                assert not (aff & cpus), f"VM {other} may run on {aff & cpus}, held by {pid}"


def test_waiting_vm_runs_beside_the_pool_and_is_put_back_there():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        tree = load(Path(d) / "proc")
        unpin_all(tree)
        rec, act, _ = make(tree, LEAVE % ("1-2", "leave"), topology=TOPO)
        rec.rescan(ScanReason.STARTUP)
        named, deleted = tree.pid("named"), tree.pid("deleted")
        assert rec.vms[named].status is VMStatus.PLACED and rec.vms[deleted].status is VMStatus.WAITING
        # waiting: off the pool's CPUs, on the housekeeping ones
        assert affinity(tree, deleted, "CPU 0/KVM") == C("0,3")
        tree.set_affinity(deleted, tree.tid_by_comm(deleted, "CPU 0/KVM"), [1])  # an admin's taskset
        rec.rescan(ScanReason.PERIODIC)
        assert affinity(tree, deleted, "CPU 0/KVM") == C("0,3")
        assert_never_double_booked(tree, rec)
        # restart without the state file: adoption gives CPU 1 to one VM only
        tree.set_affinity(deleted, tree.tid_by_comm(deleted, "CPU 0/KVM"), [1])
        rec2, _, _ = make(tree, LEAVE % ("1-2", "leave"), store=MemoryStore(), topology=TOPO)
        rec2.rescan(ScanReason.STARTUP)
        assert_never_double_booked(tree, rec2)
        assert rec2.vms[deleted].status is VMStatus.WAITING


def test_pool_covering_every_cpu_leaves_the_waiting_vm_on_every_cpu():
    """Nothing outside the pool and nothing free: vcpud cannot stop a VM, so the waiting one is
    spread over all online CPUs rather than confined to CPUs that another VM holds."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        tree = load(Path(d) / "proc")
        unpin_all(tree)
        rec, _, _ = make(tree, (LEAVE % ("0-3", "leave")).replace('{name: "fixture-*"}', '{}'), topology=TOPO)
        rec.rescan(ScanReason.STARTUP)
        statuses = sorted(s.status.value for s in rec.vms.values())
        assert statuses == ["placed", "placed", "waiting"]  # 2 + 2 + 1 vCPUs for 4 CPUs
        (waiting,) = [p for p, s in rec.vms.items() if s.status is VMStatus.WAITING]
        assert vcpu_affinities(tree, rec)[waiting] == C("0-3")


ACTIONS = st.lists(st.tuples(st.sampled_from(["pin", "rescan", "restart", "corrupt", "exit"]),
                             st.integers(0, 2), st.sets(st.integers(0, 3), min_size=1)), max_size=12)


@settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=ACTIONS, mode=st.sampled_from(["leave", "fail"]), pool=st.sampled_from(["1-2", "1-3", "0-2"]))
def test_no_exclusive_cpu_in_two_vms_whatever_happens(actions, mode, pool):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        tree = load(Path(d) / "proc")
        cfg = (LEAVE % (pool, mode)).replace('{name: "fixture-*"}', '{}')
        store = MemoryStore()
        rec, _, _ = make(tree, cfg, store=store, topology=TOPO)
        rec.rescan(ScanReason.STARTUP)
        for what, which, cpus in actions:
            pids = sorted(rec.vms)
            if what == "pin" and pids:
                pid = pids[which % len(pids)]
                vcpus = [t.tid for t in rec.vms[pid].vm.threads if t.role is Role.VCPU]
                if vcpus:
                    tree.set_affinity(pid, vcpus[which % len(vcpus)], sorted(cpus))
                rec.rescan(ScanReason.PERIODIC)
            elif what == "rescan":
                rec.rescan(ScanReason.PERIODIC)
            elif what in ("restart", "corrupt"):
                if what == "corrupt" and which == 0 or not rec.allocations:
                    store.saved = None  # deleted
                elif what == "corrupt":  # two dead VMs claiming the same CPUs: not to be trusted
                    a = next(iter(rec.allocations.values()))
                    store.saved = {(1, 1): state.Saved(1, 1, "x", "p", a), (2, 2): state.Saved(2, 2, "y", "p", a)}
                rec, _, _ = make(tree, cfg, store=store, topology=TOPO)
                rec.rescan(ScanReason.STARTUP)
            elif what == "exit" and len(pids) > 1:
                pid = pids[which % len(pids)]
                tree.remove_process(pid)
                rec.on_exit(pid, pid)
                rec.run_due(now=rec.clock() + 10)
            assert_never_double_booked(tree, rec)
